// The element-wise part of one LSTM step on the CPU (gate activations and the cell
// update, and its gradient), as kernels over one row of the batch and a range of hidden
// units. cell_impl.h holds their vectorized bodies, compiled once per CPU capability
// (cell_default.cpp, cell_avx2.cpp); cell_kernels() picks the best one this CPU runs.
#pragma once

#include <cstdint>

namespace fused_lstm::cpu {

template <typename scalar_t>
struct CellForwardRow {
  scalar_t* gates;         // [4H]: pre-activations in, activations [i|f|g|o] out
  const scalar_t* c_prev;  // [H]
  scalar_t* c;             // [H]: c_t out
  scalar_t* h;             // [H]: o * tanh(c_t) out
};

template <typename scalar_t>
struct CellBackwardRow {
  const scalar_t* gates;   // [4H]: the activations the forward saved
  const scalar_t* c;       // [H]: c_t
  const scalar_t* c_prev;  // [H]
  const scalar_t* grad_h;  // [H]: gradient of o * tanh(c_t)
  scalar_t* grad_c;        // [H]: gradient of c_t in, gradient of c_{t-1} out
  scalar_t* grad_gates;    // [4H]: gradient of the pre-activations out
};

template <typename scalar_t>
struct CellKernels {
  // Each works on the hidden units [j0, j1) of one row; H is the row's hidden size.
  void (*forward)(const CellForwardRow<scalar_t>& row, int64_t H, int64_t j0, int64_t j1);
  void (*backward)(const CellBackwardRow<scalar_t>& row, int64_t H, int64_t j0, int64_t j1);
  // h = o * tanh(c) from saved gates and cells (the projection's input, for its gradient)
  void (*hidden)(const scalar_t* gates, const scalar_t* c, scalar_t* h, int64_t H, int64_t j0,
                 int64_t j1);
};

// The kernels for the best capability of this CPU (as torch reports it, so that
// ATEN_CPU_CAPABILITY=default selects the portable ones too).
template <typename scalar_t>
const CellKernels<scalar_t>& cell_kernels();

// Declared per capability; defined by the files that compile cell_impl.h.
namespace DEFAULT {
template <typename scalar_t>
CellKernels<scalar_t> make_cell_kernels();
}
namespace AVX2 {
template <typename scalar_t>
CellKernels<scalar_t> make_cell_kernels();
}

}  // namespace fused_lstm::cpu
