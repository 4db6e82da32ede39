// The AVX2 + FMA kernels of kernels_impl.h. setup.py compiles this file alone with
// -mavx2 -mfma (on x86-64 only); cpu_kernels() runs them only on CPUs that have both.
#if defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2

#include "kernels_impl.h"

namespace fused_lstm::cpu::AVX2 {
template CpuKernels<float> make_cpu_kernels<float>();
template CpuKernels<double> make_cpu_kernels<double>();
}  // namespace fused_lstm::cpu::AVX2
#endif
