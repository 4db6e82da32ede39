// The persistent kernels (forward and backward) for float32 inputs: see persistent_kernel.cuh.
#include "persistent_kernel.cuh"

namespace fused_lstm::cuda {
FUSED_LSTM_PERSISTENT_KERNELS(float, float)
}  // namespace fused_lstm::cuda
