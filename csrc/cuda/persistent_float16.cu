// The persistent kernels (forward and backward) for float16 inputs: see persistent_kernel.cuh.
#include "persistent_kernel.cuh"

namespace fused_lstm::cuda {
FUSED_LSTM_PERSISTENT_KERNELS(c10::Half, float)
}  // namespace fused_lstm::cuda
