// CPU kernels of the fused_lstm ops (schemas and semantics in ops.cpp and lstm.h).
//
// Forward: the input projection of all T steps is one library GEMM written into `gates`.
// The recurrence then runs on one of two paths:
// - persistent (the default without a projection; kernels.h): the whole time loop in one
//   parallel region, each thread owning a slice of hidden units with its rows of w_hh
//   packed for its own small-matrix kernel, one barrier per step;
// - step by step (with a projection, or FUSED_LSTM_CPU_PATH=stepwise): per step one
//   library GEMM adds h_{t-1}·w_hhᵀ into that step's gates in place, then one vectorized
//   pass applies the activations and the cell update.
// Either way the activated gates and c_t stay where the backward finds them, and the
// hidden state of step t is output[t] itself.
// Backward: reverse time, the same two paths for the gate gradients and the gradient of
// h_{t-1}; then the weight gradients as a few library GEMMs over all steps at once.
// bfloat16/float16 inputs run in float32 and are rounded once at the end.
#include "../lstm.h"
#include "../steps.h"
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

namespace fused_lstm::cpu {

namespace {

// The best build of the kernels that this CPU runs, as torch sees it (so that
// ATEN_CPU_CAPABILITY=avx2 or =default selects the lower builds too). setup.py compiles the
// AVX2 and AVX-512 builds on x86-64 only.
enum class Capability { kDefault, kAvx2, kAvx512 };

Capability capability() {
#if defined(FUSED_LSTM_HAVE_AVX2)
  const std::string torch_capability = at::get_cpu_capability();
  if (torch_capability == "AVX512") return Capability::kAvx512;
  if (torch_capability == "AVX2") return Capability::kAvx2;
#endif
  return Capability::kDefault;
}

}  // namespace

const char* cpu_capability() {
  switch (capability()) {
    case Capability::kAvx512: return "AVX512";
    case Capability::kAvx2: return "AVX2";
    default: return "DEFAULT";
  }
}

bool has_library_product() {
#if defined(CPUBLAS_BRGEMM_F32F32F32)
  // Where torch runs AVX-512 (oneDNN generates the kernel for the CPU itself). Measured on
  // an AMD EPYC Zen 5 (see the commit that chose it); on AVX2-only CPUs, unmeasured, our
  // kernels and MKL stay.
  return capability() == Capability::kAvx512;
#else
  return false;
#endif
}

template <typename scalar_t>
CpuKernels<scalar_t> pick_cpu_kernels() {
  switch (capability()) {
#if defined(FUSED_LSTM_HAVE_AVX2)
    case Capability::kAvx512: return AVX512::make_cpu_kernels<scalar_t>();
    case Capability::kAvx2: return AVX2::make_cpu_kernels<scalar_t>();
#endif
    default: return DEFAULT::make_cpu_kernels<scalar_t>();
  }
}

template <typename scalar_t>
const CpuKernels<scalar_t>& cpu_kernels() {
  static const CpuKernels<scalar_t> kernels = pick_cpu_kernels<scalar_t>();
  return kernels;
}

namespace {

// The persistent recurrence (kernels.h) runs the whole time loop in one parallel region
// with the weights packed per thread; it has no projection. The step-by-step path runs
// one library GEMM per step, with no parallel region of its own for a small batch and
// nothing packed: below kPersistentMinSteps steps packing w_hh costs more than the steps
// gain (one call of T = 1, B = 1, H = 256 on a Zen 5 core: 196 us persistent, 67 us step
// by step, CPU time). FUSED_LSTM_CPU_PATH=stepwise|persistent forces either (tests and
// benchmarks compare the two).
constexpr int64_t kPersistentMinSteps = 8;

bool use_persistent(bool projected, int64_t seq_len) {
  if (projected) return false;
  const char* forced = std::getenv("FUSED_LSTM_CPU_PATH");
  if (forced != nullptr && std::strcmp(forced, "stepwise") == 0) return false;
  if (forced != nullptr && std::strcmp(forced, "persistent") == 0) return true;
  return seq_len >= kPersistentMinSteps;
}

// Whether the recurrent products of this call run ATen's brgemm (kernels.h) rather than
// our kernel: float32 where has_library_product(), for batches of at least 4 rows (a
// single row is a matrix-vector product bound by reading w_hh, where ours is as fast and
// needs no kernel generated per shape). FUSED_LSTM_CPU_PRODUCT=ours|library forces either
// (tests and benchmarks compare the two).
template <typename scalar_t>
bool use_library_product(int64_t batch) {
  if (!std::is_same_v<scalar_t, float> || !has_library_product()) return false;
  const char* forced = std::getenv("FUSED_LSTM_CPU_PRODUCT");
  if (forced != nullptr && std::strcmp(forced, "ours") == 0) return false;
  if (forced != nullptr && std::strcmp(forced, "library") == 0) return true;
  return batch >= 4;
}

// Whether a step-by-step call of this batch runs its products row by row in our kernel
// (kernels.h: gate_products), each thread on its own hidden units with the activations
// and the cell update right after, in one parallel region per step, rather than as
// library GEMMs (the projection of all steps, then one per step) and a pass for the cell.
// For a few rows each product is a matrix-vector product, bound by reading the weights:
// MKL's (sgemv) took 90 us for T = 1, B = 1, H = I = 256 on one AMD EPYC Zen 3 core,
// ours 45, and it runs on one thread where ours splits the units. Above a few rows the
// library's blocking wins. FUSED_LSTM_CPU_PRODUCT=library forces the library's.
constexpr int64_t kRowProductsMaxBatch = 4;

bool use_row_products(int64_t batch) {
  const char* forced = std::getenv("FUSED_LSTM_CPU_PRODUCT");
  if (forced != nullptr && std::strcmp(forced, "library") == 0) return false;
  return batch <= kRowProductsMaxBatch;
}

// gates2d = bias + x2d·w_ihᵀ. With the library product (w_ih_t = w_ihᵀ contiguous, made
// once per call), by brgemm over tiles of the output (oneDNN's kernel: 180 against MKL's
// 110 GFLOP/s on one Zen 5 core for the mid shape), the bias written into each tile just
// before its product.
template <typename scalar_t>
void input_projection(const at::Tensor& x2d, const at::Tensor& w_ih, const at::Tensor& w_ih_t,
                      const at::Tensor& bias, at::Tensor& gates2d, bool library) {
  if (!library) {
    if (bias.defined()) {
      at::addmm_out(gates2d, bias, x2d, w_ih.t());
    } else {
      at::mm_out(gates2d, x2d, w_ih.t());
    }
    return;
  }
  constexpr int64_t kTile = 256;
  const int64_t M = x2d.size(0), K = x2d.size(1), N = gates2d.size(1);
  const scalar_t* a = x2d.data_ptr<scalar_t>();
  const scalar_t* b = w_ih_t.data_ptr<scalar_t>();
  const scalar_t* bias_p = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  scalar_t* c = gates2d.data_ptr<scalar_t>();
  const int64_t m_tiles = (M + kTile - 1) / kTile, n_tiles = (N + kTile - 1) / kTile;
  at::parallel_for(0, m_tiles * n_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t m0 = tile / n_tiles * kTile, n0 = tile % n_tiles * kTile;
      const int64_t rows = std::min(kTile, M - m0), cols = std::min(kTile, N - n0);
      scalar_t* c_tile = c + m0 * N + n0;
      if (bias_p != nullptr) {
        for (int64_t r = 0; r < rows; ++r) std::copy_n(bias_p + n0, cols, c_tile + r * N);
      }
      library_product(rows, cols, K, a + m0 * K, K, b + n0, N, c_tile, N, bias_p != nullptr);
    }
  });
}

// Calls fn(row, j0, j1) for rows [0, rows) and hidden units [0, H) split in chunks,
// in parallel when there is enough work for more than one thread.
template <typename F>
void for_rows_and_units(int64_t rows, int64_t H, const F& fn) {
  constexpr int64_t kUnits = 64;            // hidden units per task (a multiple of any vector)
  constexpr int64_t kElementsPerTask = 4096;  // below this a thread is not worth waking
  const int64_t chunks = (H + kUnits - 1) / kUnits;
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::min(H, kUnits));
  at::parallel_for(0, rows * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t chunk = w % chunks;
      fn(w / chunks, chunk * kUnits, std::min(H, (chunk + 1) * kUnits));
    }
  });
}

// Calls fn(j0, j1) for hidden units [0, H) split in chunks, in parallel when the work
// (about `work_per_unit` multiply-adds a unit) is worth more than one thread.
template <typename F>
void for_units(int64_t H, int64_t work_per_unit, const F& fn) {
  constexpr int64_t kUnits = 16;        // a multiple of any vector; 8 chunks at H = 128
  constexpr int64_t kWorkPerTask = 1 << 14;
  const int64_t chunks = (H + kUnits - 1) / kUnits;
  const int64_t grain = std::max<int64_t>(1, kWorkPerTask / std::max<int64_t>(1, work_per_unit * kUnits));
  at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      fn(chunk * kUnits, std::min(H, (chunk + 1) * kUnits));
    }
  });
}

// Rows [begin, begin + count) of a matrix: the matrix itself when that is all of it.
// Views are not free (a dispatcher call each, about 1 us), and a call of one step (a cell,
// a streaming model) would otherwise make a dozen of them.
at::Tensor row_block(const at::Tensor& m, int64_t begin, int64_t count) {
  return begin == 0 && count == m.size(0) ? m : m.narrow(0, begin, count);
}

// Zeros rows [n, B) of a step's [B, width] block at `step`: the rows not live at it.
template <typename scalar_t>
void zero_dead_rows(scalar_t* step, int64_t n, int64_t B, int64_t width) {
  if (n < B) std::fill(step + n * width, step + B * width, scalar_t(0));
}

// The step-by-step forward: one library GEMM per step (and one for the projection).
// gates2d [T·B, 4H] (x·w_ihᵀ + bias in, the activations out), cells and output as in
// lstm.h, as raw rows; only the products see tensors.
//
// With row products (use_row_products), x2d holds the chunk's input rows and gates2d
// nothing yet: each step computes bias + x·w_ihᵀ + h_{t-1}·w_hhᵀ and the cell of its
// units in one pass.
template <typename scalar_t>
void forward_steps(const Dims& d, const int64_t* live, const at::Tensor& h0,
                   const at::Tensor& c0, const at::Tensor& w_hh, const at::Tensor& w_hr,
                   bool reverse, at::Tensor& gates2d, scalar_t* cells, at::Tensor& output2d,
                   const at::Tensor& x2d, const at::Tensor& w_ih, const at::Tensor& bias,
                   bool row_products) {
  const int64_t T = d.seq_len, B = d.batch, H = d.hidden_size, P = d.output_size;
  const bool projected = w_hr.defined();
  const auto& kernels = cpu_kernels<scalar_t>();
  at::Tensor hidden = projected ? at::empty({B, H}, gates2d.options()) : at::Tensor();
  const at::Tensor w_hh_t = w_hh.t();
  scalar_t* const gates = gates2d.data_ptr<scalar_t>();
  scalar_t* const output = output2d.data_ptr<scalar_t>();
  const scalar_t* c_initial = c0.data_ptr<scalar_t>();
  const scalar_t* h_initial = h0.data_ptr<scalar_t>();
  const int64_t I = d.input_size;
  const scalar_t* x = row_products ? x2d.data_ptr<scalar_t>() : nullptr;
  const scalar_t* w_ih_ptr = w_ih.data_ptr<scalar_t>();
  const scalar_t* w_hh_ptr = w_hh.data_ptr<scalar_t>();
  const scalar_t* b_ptr = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  for (int64_t s = 0; s < T; ++s) {
    const StepRows r = step_rows(s, T, reverse, live, B);
    const int64_t t = r.t, n = r.rows, carried = r.carried;
    scalar_t* g = gates + t * B * 4 * H;
    scalar_t* c = cells + t * B * H;
    const scalar_t* c_carried = cells + r.t_prev * B * H;
    scalar_t* h = projected ? hidden.data_ptr<scalar_t>() : output + t * B * P;
    const auto cell_row = [&](int64_t b) {
      return CellForwardRow<scalar_t>{g + b * 4 * H, (b < carried ? c_carried : c_initial) + b * H,
                                      c + b * H, h + b * H};
    };
    if (row_products) {
      const scalar_t* h_carried = output + r.t_prev * B * P;
      for_units(H, 4 * (I + P) * n, [&](int64_t j0, int64_t j1) {
        for (int64_t b = 0; b < n; ++b) {
          scalar_t* gb = g + b * 4 * H;
          for (int64_t q = 0; q < 4; ++q) {
            scalar_t* from = gb + q * H + j0;
            if (b_ptr != nullptr) {
              std::copy(b_ptr + q * H + j0, b_ptr + q * H + j1, from);
            } else {
              std::fill(from, from + (j1 - j0), scalar_t(0));
            }
          }
          kernels.gate_products(w_ih_ptr, I, x + (t * B + b) * I, gb, H, j0, j1);
          kernels.gate_products(w_hh_ptr, P, (b < carried ? h_carried : h_initial) + b * P, gb,
                                H, j0, j1);
          kernels.cell_forward(cell_row(b), H, j0, j1);
        }
      });
    } else {
      if (carried > 0) {
        row_block(gates2d, t * B, carried)
            .addmm_(row_block(output2d, r.t_prev * B, carried), w_hh_t);
      }
      if (n > carried) {
        row_block(gates2d, t * B + carried, n - carried)
            .addmm_(row_block(h0, carried, n - carried), w_hh_t);
      }
      for_rows_and_units(n, H, [&](int64_t b, int64_t j0, int64_t j1) {
        kernels.cell_forward(cell_row(b), H, j0, j1);
      });
    }
    if (projected) {
      at::Tensor out_live = row_block(output2d, t * B, n);
      at::mm_out(out_live, row_block(hidden, 0, n), w_hr.t());
    }
    zero_dead_rows(g, n, B, 4 * H);
    zero_dead_rows(c, n, B, H);
    zero_dead_rows(output + t * B * P, n, B, P);
  }
}

// Steps per chunk of the forward: all of them when the gates and cells are kept for the
// backward; otherwise enough for about 2^18 gate values (1 MiB in float32), so that
// inference holds only one chunk of them, in cache, while its input projection is
// still one GEMM.
int64_t steps_per_chunk(const Dims& d, bool save_for_backward) {
  if (save_for_backward) return d.seq_len;
  const int64_t per_step = d.batch * 4 * d.hidden_size;
  return std::clamp<int64_t>((int64_t(1) << 18) / std::max<int64_t>(per_step, 1), 1, d.seq_len);
}

template <typename scalar_t>
ForwardResult forward_impl(const Dims& d, const std::vector<int64_t>& live, const at::Tensor& x,
                           const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                           const at::Tensor& w_hh, const at::Tensor& bias,
                           const at::Tensor& w_hr, bool reverse, bool save_for_backward) {
  const int64_t T = d.seq_len, B = d.batch, H = d.hidden_size, P = d.output_size;
  const bool projected = w_hr.defined();
  const auto opts = x.options();
  const int64_t chunk = steps_per_chunk(d, save_for_backward);
  at::Tensor gates = at::empty({chunk, B, 4 * H}, opts);
  at::Tensor cells = at::empty({chunk, B, H}, opts);
  at::Tensor output = at::empty({T, B, P}, opts);
  at::Tensor h_n = at::empty({B, P}, opts);
  at::Tensor c_n = at::empty({B, H}, opts);

  const bool library = use_library_product<scalar_t>(B);
  const at::Tensor w_ih_t = library ? w_ih.t().contiguous() : at::Tensor();  // [I, 4H]
  const bool persistent = use_persistent(projected, T);
  const bool row_products = !persistent && use_row_products(B);
  const auto& kernels = cpu_kernels<scalar_t>();
  at::Tensor workspace =
      persistent ? at::empty({kernels.recurrent_workspace_size(H)}, opts) : at::Tensor();
  // The state a chunk starts from: rows carried over from the step processed just before
  // it, the others h0/c0 (rows that start later, in reverse).
  at::Tensor h_start = h0, c_start = c0;
  int64_t prev_t0 = 0;
  const at::Tensor x2d = x.view({T * B, d.input_size});
  at::Tensor gates2d = gates.view({chunk * B, 4 * H});
  at::Tensor output2d = output.view({T * B, P});
  scalar_t* const out = output.data_ptr<scalar_t>();
  scalar_t* const c = cells.data_ptr<scalar_t>();
  for (int64_t first = 0; first < T; first += chunk) {
    const int64_t steps = std::min(chunk, T - first);
    const int64_t t0 = reverse ? T - first - steps : first;  // the chunk holds [t0, t0 + steps)
    if (first > 0) {
      const StepRows r = step_rows(first, T, reverse, live.data(), B);
      if (h_start.is_same(h0)) {
        h_start = h0.clone();
        c_start = c0.clone();
      }
      h_start.narrow(0, 0, r.carried).copy_(output[r.t_prev].narrow(0, 0, r.carried));
      c_start.narrow(0, 0, r.carried).copy_(cells[r.t_prev - prev_t0].narrow(0, 0, r.carried));
    }
    Dims dc = d;
    dc.seq_len = steps;
    const int64_t* live_chunk = live.data() + t0;
    at::Tensor g2d = row_block(gates2d, 0, steps * B);
    const at::Tensor x_chunk = row_block(x2d, t0 * B, steps * B);
    if (!row_products) input_projection<scalar_t>(x_chunk, w_ih, w_ih_t, bias, g2d, library);
    if (persistent) {
      kernels.recurrent_forward({steps, B, H, live_chunk, reverse, library, first == 0,
                                 w_hh.data_ptr<scalar_t>(), workspace.data_ptr<scalar_t>(),
                                 h_start.data_ptr<scalar_t>(), c_start.data_ptr<scalar_t>(),
                                 g2d.data_ptr<scalar_t>(), c, out + t0 * B * P});
    } else {
      at::Tensor out2d = row_block(output2d, t0 * B, steps * B);
      forward_steps<scalar_t>(dc, live_chunk, h_start, c_start, w_hh, w_hr, reverse, g2d, c,
                              out2d, x_chunk, w_ih, bias, row_products);
    }
    // Each row's final state is that of its last live step (going forward, rows
    // [live[t+1], live[t]) end at step t; in reverse, every row ends at time 0): rows
    // [rows_next, rows) of the step, contiguous in output, cells, h_n and c_n.
    for (int64_t s = first; s < first + steps; ++s) {
      const StepRows r = step_rows(s, T, reverse, live.data(), B);
      if (const int64_t ending = ending_rows(r); ending > 0) {
        std::copy_n(out + (r.t * B + r.rows_next) * P, ending * P,
                    h_n.data_ptr<scalar_t>() + r.rows_next * P);
        std::copy_n(c + ((r.t - t0) * B + r.rows_next) * H, ending * H,
                    c_n.data_ptr<scalar_t>() + r.rows_next * H);
      }
    }
    prev_t0 = t0;
  }
  if (!save_for_backward) {
    gates = at::empty({0}, opts);
    cells = at::empty({0}, opts);
  }
  return {output, h_n, c_n, gates, cells};
}

// The step-by-step backward: one library GEMM per step for the gradient of h_{t-1} (and
// one for the projection's). As the forward, raw rows but for the products.
template <typename scalar_t>
void backward_steps(const Dims& d, const std::vector<int64_t>& live,
                    const at::Tensor& grad_output, const at::Tensor& c0, const at::Tensor& w_hh,
                    const at::Tensor& w_hr, bool reverse, const at::Tensor& gates,
                    const at::Tensor& cells, at::Tensor& grad_h, at::Tensor& grad_c,
                    at::Tensor& grad_gates, at::Tensor& grad_h_steps) {
  const int64_t T = d.seq_len, B = d.batch, H = d.hidden_size, P = d.output_size;
  const bool projected = w_hr.defined();
  const auto& kernels = cpu_kernels<scalar_t>();
  // With a projection: the gradient of o * tanh(c), the projection's input.
  at::Tensor grad_hidden = projected ? at::empty({B, H}, gates.options()) : at::Tensor();
  at::Tensor grad_gates2d = grad_gates.view({T * B, 4 * H});
  const scalar_t* g_all = gates.data_ptr<scalar_t>();
  const scalar_t* c_all = cells.data_ptr<scalar_t>();
  const scalar_t* c_initial = c0.data_ptr<scalar_t>();
  const scalar_t* grad_out = grad_output.defined() ? grad_output.data_ptr<scalar_t>() : nullptr;
  scalar_t* dh_carried = grad_h.data_ptr<scalar_t>();
  scalar_t* dg_all = grad_gates.data_ptr<scalar_t>();
  for (int64_t s = T - 1; s >= 0; --s) {
    const StepRows r = step_rows(s, T, reverse, live.data(), B);
    const int64_t t = r.t, n = r.rows, carried = r.carried;
    if (grad_out != nullptr) {
      const scalar_t* from = grad_out + t * B * P;
      for (int64_t k = 0; k < n * P; ++k) dh_carried[k] += from[k];
    }
    at::Tensor grad_h_live = row_block(grad_h, 0, n);
    if (projected) {
      scalar_t* steps_t = grad_h_steps.data_ptr<scalar_t>() + t * B * P;
      std::copy_n(dh_carried, n * P, steps_t);
      zero_dead_rows(steps_t, n, B, P);
      at::Tensor grad_hidden_live = row_block(grad_hidden, 0, n);
      at::mm_out(grad_hidden_live, grad_h_live, w_hr);
    }

    const scalar_t* g = g_all + t * B * 4 * H;
    const scalar_t* c = c_all + t * B * H;
    const scalar_t* c_carried = c_all + r.t_prev * B * H;
    const scalar_t* dh = projected ? grad_hidden.data_ptr<scalar_t>() : dh_carried;
    scalar_t* dc = grad_c.data_ptr<scalar_t>();
    scalar_t* dg = dg_all + t * B * 4 * H;
    for_rows_and_units(n, H, [&](int64_t b, int64_t j0, int64_t j1) {
      const CellBackwardRow<scalar_t> row{g + b * 4 * H, c + b * H,
                                          (b < carried ? c_carried : c_initial) + b * H,
                                          dh + b * H, dc + b * H, dg + b * 4 * H};
      kernels.cell_backward(row, H, j0, j1);
    });
    zero_dead_rows(dg, n, B, 4 * H);
    at::mm_out(grad_h_live, row_block(grad_gates2d, t * B, n), w_hh);
  }
}

template <typename scalar_t>
BackwardResult backward_impl(const Dims& d, const std::vector<int64_t>& live,
                             const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                             const at::Tensor& grad_c_n, const at::Tensor& x,
                             const at::Tensor& h0, const at::Tensor& c0,
                             const at::Tensor& w_ih, const at::Tensor& w_hh,
                             const at::Tensor& w_hr, bool reverse, const at::Tensor& output,
                             const at::Tensor& gates, const at::Tensor& cells, bool input_grad) {
  const int64_t T = d.seq_len, B = d.batch, H = d.hidden_size, P = d.output_size;
  const bool projected = w_hr.defined();
  const auto opts = x.options();
  at::Tensor grad_gates = at::empty({T, B, 4 * H}, opts);
  // Gradients of the state carried between steps; rows not live keep theirs.
  at::Tensor grad_h = grad_h_n.defined() ? grad_h_n.clone() : at::zeros({B, P}, opts);
  at::Tensor grad_c = grad_c_n.defined() ? grad_c_n.clone() : at::zeros({B, H}, opts);
  // With a projection, the gradient of each step's h (for grad_w_hr).
  at::Tensor grad_h_steps = projected ? at::empty({T, B, P}, opts) : at::Tensor();

  const auto& kernels = cpu_kernels<scalar_t>();
  if (use_persistent(projected, T)) {
    at::Tensor workspace = at::empty({kernels.recurrent_workspace_size(H)}, opts);
    kernels.recurrent_backward(
        {T, B, H, live.data(), reverse, use_library_product<scalar_t>(B),
         w_hh.data_ptr<scalar_t>(), workspace.data_ptr<scalar_t>(),
         c0.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(), cells.data_ptr<scalar_t>(),
         grad_output.defined() ? grad_output.data_ptr<scalar_t>() : nullptr,
         grad_h.data_ptr<scalar_t>(), grad_c.data_ptr<scalar_t>(), grad_gates.data_ptr<scalar_t>()});
  } else {
    backward_steps<scalar_t>(d, live, grad_output, c0, w_hh, w_hr, reverse, gates, cells, grad_h,
                             grad_c, grad_gates, grad_h_steps);
  }

  auto [grad_input, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr] = input_and_weight_grads(
      d, live, reverse, grad_gates, x, h0, w_ih, output, gates, cells, grad_h_steps, input_grad);
  return {grad_input, grad_h, grad_c, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

ForwardResult forward_cpu(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                          const at::Tensor& w_ih, const at::Tensor& w_hh,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& w_hr,
                          const std::optional<at::Tensor>& batch_sizes, bool reverse,
                          bool save_for_backward) {
  // The tensors made and viewed in here never need autograd's bookkeeping: without this
  // guard each narrow() and select() of the step loop goes through the autograd and
  // ADInplaceOrView kernels (a differentiable view each), most of a one-step call's cost.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Dims d = check_forward_args(input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes);
  const auto live = live_rows(batch_sizes, d);
  const auto acc = accumulate_type(input.scalar_type());
  ForwardResult result;
  AT_DISPATCH_FLOATING_TYPES(acc, "fused_lstm_forward_cpu", [&] {
    result = forward_impl<scalar_t>(d, live, prepare(input, acc), prepare(h0, acc),
                                    prepare(c0, acc), prepare(w_ih, acc), prepare(w_hh, acc),
                                    prepare(bias, acc), prepare(w_hr, acc), reverse,
                                    save_for_backward);
  });
  return to_input_dtype(std::move(result), input.scalar_type());
}

BackwardResult backward_cpu(const std::optional<at::Tensor>& grad_output,
                            const std::optional<at::Tensor>& grad_h_n,
                            const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
                            const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                            const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                            const std::optional<at::Tensor>& batch_sizes, bool reverse,
                            const at::Tensor& output, const at::Tensor& gates,
                            const at::Tensor& cells, bool input_grad) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in forward_cpu
  const Dims d = check_backward_args(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh,
                                     w_hr, batch_sizes, output, gates, cells);
  const auto live = live_rows(batch_sizes, d);
  const auto acc = accumulate_type(input.scalar_type());
  BackwardResult result;
  AT_DISPATCH_FLOATING_TYPES(acc, "fused_lstm_backward_cpu", [&] {
    result = backward_impl<scalar_t>(
        d, live, prepare(grad_output, acc), prepare(grad_h_n, acc), prepare(grad_c_n, acc),
        prepare(input, acc), prepare(h0, acc), prepare(c0, acc), prepare(w_ih, acc),
        prepare(w_hh, acc), prepare(w_hr, acc), reverse, prepare(output, acc),
        gates.contiguous(), cells.contiguous(), input_grad);
  });
  return to_input_dtype(std::move(result), input.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_lstm, m) {
  // Which build of the CPU kernels runs here: "AVX512", "AVX2" or "DEFAULT".
  m.def("cpu_capability() -> str", [] { return std::string(cpu_capability()); });
}

TORCH_LIBRARY_IMPL(fused_lstm, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("backward", &backward_cpu);
}

}  // namespace fused_lstm::cpu
