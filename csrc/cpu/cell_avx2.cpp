// The AVX2 + FMA kernels of cell_impl.h. setup.py compiles this file alone with
// -mavx2 -mfma (on x86-64 only); cell_kernels() runs them only on CPUs that have both.
#if defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2

#include "cell_impl.h"

namespace fused_lstm::cpu::AVX2 {
template CellKernels<float> make_cell_kernels<float>();
template CellKernels<double> make_cell_kernels<double>();
}  // namespace fused_lstm::cpu::AVX2
#endif
