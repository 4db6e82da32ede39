// The portable kernels of cell_impl.h (whatever vector width the compiler's flags allow).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT

#include "cell_impl.h"

namespace fused_lstm::cpu::DEFAULT {
template CellKernels<float> make_cell_kernels<float>();
template CellKernels<double> make_cell_kernels<double>();
}  // namespace fused_lstm::cpu::DEFAULT
