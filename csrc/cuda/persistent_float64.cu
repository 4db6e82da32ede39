// The persistent kernels (forward and backward) for float64 inputs: see persistent_kernel.cuh.
#include "persistent_kernel.cuh"

namespace fused_lstm::cuda {
FUSED_LSTM_PERSISTENT_KERNELS(double, double)
}  // namespace fused_lstm::cuda
