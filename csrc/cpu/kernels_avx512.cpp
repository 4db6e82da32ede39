// The AVX-512 kernels of kernels_impl.h (64-byte vectors). setup.py compiles this file
// alone with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma (on x86-64 only);
// cpu_kernels() runs them only where torch's own capability is AVX512.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__FMA__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512

#include "kernels_impl.h"

namespace fused_lstm::cpu::AVX512 {
template CpuKernels<float> make_cpu_kernels<float>();
template CpuKernels<double> make_cpu_kernels<double>();
}  // namespace fused_lstm::cpu::AVX512
#endif
