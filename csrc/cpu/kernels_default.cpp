// The portable kernels of kernels_impl.h (whatever vector width the compiler's flags allow).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT

#include "kernels_impl.h"

namespace fused_lstm::cpu::DEFAULT {
template CpuKernels<float> make_cpu_kernels<float>();
template CpuKernels<double> make_cpu_kernels<double>();
}  // namespace fused_lstm::cpu::DEFAULT
