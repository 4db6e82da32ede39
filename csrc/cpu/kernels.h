// CPU kernels that are compiled once per CPU capability (kernels_default.cpp,
// kernels_avx2.cpp with -mavx2 -mfma, kernels_avx512.cpp with AVX-512 F/BW/VL/DQ):
// kernels_impl.h holds their bodies, written with the compiler's vector types.
// cpu_kernels() picks the best build this CPU runs.
//
// Two families:
// - Kernels over one row and a range of hidden units, used by the step-by-step path of
//   lstm_cpu.cpp: the gate activations and the cell update, their gradient, and the
//   gates' products with unpacked weights for a step of a few rows.
// - The persistent recurrence: the whole time loop of one layer in one parallel region.
//   Thread k owns a slice of hidden units for the whole sequence: it keeps its w_hh rows
//   packed in panels for its own small-matrix kernel, computes the four gates of its
//   units (recurrent GEMM + activations + cell update) and meets the other threads at
//   one barrier per step. No projection (P = H). With `library_product` (float32 only,
//   where has_library_product()), the recurrent GEMM of each step is ATen's
//   cpublas::brgemm (oneDNN's micro-kernel, generated for the CPU at hand) instead of ours.
#pragma once

#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>

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

// One layer's forward over all steps (see lstm.h for the layout and the meaning of
// live rows). `gates` holds x·w_ihᵀ + bias on entry.
template <typename scalar_t>
struct RecurrentForward {
  int64_t seq_len, batch, hidden;
  const int64_t* live;  // [T]: live rows per step
  bool reverse;
  bool library_product;
  bool pack;             // pack w_hh into workspace first (false: an earlier call did)
  const scalar_t* w_hh;  // [4H, H]
  scalar_t* workspace;   // recurrent_workspace_size(H) elements
  const scalar_t* h0;    // [B, H]
  const scalar_t* c0;    // [B, H]
  scalar_t* gates;       // [T, B, 4H]
  scalar_t* cells;       // [T, B, H]
  scalar_t* output;      // [T, B, H]
};

// One layer's backward over all steps, up to the gradient of the pre-activations.
template <typename scalar_t>
struct RecurrentBackward {
  int64_t seq_len, batch, hidden;
  const int64_t* live;
  bool reverse;
  bool library_product;
  const scalar_t* w_hh;         // [4H, H]
  scalar_t* workspace;          // recurrent_workspace_size(H) elements
  const scalar_t* c0;           // [B, H]
  const scalar_t* gates;        // [T, B, 4H]: saved activations
  const scalar_t* cells;        // [T, B, H]
  const scalar_t* grad_output;  // [T, B, H], or null for zeros
  scalar_t* grad_h;             // [B, H]: grad of h_n in, grad of h0 out
  scalar_t* grad_c;             // [B, H]: grad of c_n in, grad of c0 out
  scalar_t* grad_gates;         // [T, B, 4H] out
};

template <typename scalar_t>
struct CpuKernels {
  // Each element-wise kernel works on the hidden units [j0, j1) of one row.
  void (*cell_forward)(const CellForwardRow<scalar_t>& row, int64_t H, int64_t j0, int64_t j1);
  void (*cell_backward)(const CellBackwardRow<scalar_t>& row, int64_t H, int64_t j0, int64_t j1);
  // gates[q·H + j] += w[q·H + j, :K] · v for the gates q and units [j0, j1) of one row
  // (w [4H, K] as nn.LSTM stores it): the products of a step of a few rows.
  void (*gate_products)(const scalar_t* w, int64_t K, const scalar_t* v, scalar_t* gates,
                        int64_t H, int64_t j0, int64_t j1);
  void (*recurrent_forward)(const RecurrentForward<scalar_t>& args);
  void (*recurrent_backward)(const RecurrentBackward<scalar_t>& args);
  // Elements of workspace the persistent kernels need for hidden size H.
  int64_t (*recurrent_workspace_size)(int64_t H);
};

// The kernels for the best capability of this CPU that this build has ("AVX512", "AVX2"
// or "DEFAULT", as cpu_capability() names it).
template <typename scalar_t>
const CpuKernels<scalar_t>& cpu_kernels();
const char* cpu_capability();

// Whether this build and CPU run ATen's cpublas::brgemm for float32 (the persistent
// kernels' library_product and the input projection).
bool has_library_product();

// C[rows, N] (+)= A[rows, K] * B[K, N] by ATen's cpublas::brgemm (row-major, leading
// dimensions given): float32 only, where has_library_product() holds.
template <typename scalar_t>
inline void library_product(int64_t rows, int64_t N, int64_t K, const scalar_t* a, int64_t ld_a,
                     const scalar_t* b, int64_t ld_b, scalar_t* c, int64_t ld_c, bool accumulate) {
#if defined(CPUBLAS_BRGEMM_F32F32F32)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (rows > 0) {
      at::native::cpublas::brgemm(rows, N, K, ld_a, ld_b, ld_c, accumulate, a, b, c, false);
    }
    return;
  }
#endif
  TORCH_INTERNAL_ASSERT(false, "fused_lstm: the library product is float32 only");
}

// Declared per capability; defined by the files that compile kernels_impl.h.
namespace DEFAULT {
template <typename scalar_t>
CpuKernels<scalar_t> make_cpu_kernels();
}
namespace AVX2 {
template <typename scalar_t>
CpuKernels<scalar_t> make_cpu_kernels();
}
namespace AVX512 {
template <typename scalar_t>
CpuKernels<scalar_t> make_cpu_kernels();
}

}  // namespace fused_lstm::cpu
