// The work of one block for one time step of the CUDA kernels, written once for the GPU
// and for the host: every function here is __host__ __device__ over plain pointers, so
// that the tests' emulator (tests/emulator) can run the very same code for every (block,
// thread) of a launch on a machine without a GPU. No ATen here.
//
// A time step is described by a ForwardStep or a BackwardStep: the pointers of that step,
// which rows are live, and per element what the step multiplies (`activation`, `weight`)
// and what it does with the product (`update`: the cell and its writes). Both kernels use
// them: the step kernels below (stage A, one launch per step) and the persistent kernel
// (persistent_program.cuh, one launch for the whole sequence). A ForwardSequence or
// BackwardSequence gives the step of each processing index, on the host or the device.
//
// A block program is a sequence of phases separated by barriers; `Block` runs one phase
// for its threads (this thread, on the GPU and in the emulator alike) and
// `Block::sync()` is the barrier (__syncthreads() on the GPU). Each thread keeps its
// registers in a `Thread` state and the block shares one `Shared`.
//
// Step kernel tiling (both directions): block (x, y) owns batch rows [x·kRows, (x+1)·kRows)
// and hidden units [y·kUnits, (y+1)·kUnits); each thread owns kThreadRows × kThreadUnits of
// those (row, unit) pairs, strided so that neighbouring threads own neighbouring units. The
// recurrent product is accumulated over kDepth-wide slices staged in shared memory, with
// one barrier after each load and one after each use. All arithmetic is in acc_t (FP32
// FMAs for float, bfloat16 and float16, never TF32; FP64 for double); weights are read in
// the input's dtype and widened when staged.
#pragma once

#include "../steps.h"

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FUSED_LSTM_UNROLL _Pragma("unroll")
// Around the device code of each of our headers: a call from __host__ __device__ code to a
// __host__ function is an error, not nvcc's warning. nvcc warns (20011; without
// --expt-relaxed-constexpr, 20013 and 20015 for a constexpr one such as std::min) and
// compiles the call into a trap: the kernel then keeps what comes before it and drops the
// rest. torch's build adds --expt-relaxed-constexpr (so std::min would work there) and
// setup.py makes 20011 an error; any other build of these headers (a standalone harness
// for compute-sanitizer, CMake) fails here instead of computing garbage.
#define FUSED_LSTM_DEVICE_CODE_BEGIN                                              \
  _Pragma("nv_diagnostic push") _Pragma("nv_diag_error 20011")                    \
      _Pragma("nv_diag_error 20013") _Pragma("nv_diag_error 20015")
#define FUSED_LSTM_DEVICE_CODE_END _Pragma("nv_diagnostic pop")
#else
#define FUSED_LSTM_UNROLL
#define FUSED_LSTM_DEVICE_CODE_BEGIN
#define FUSED_LSTM_DEVICE_CODE_END
#endif

FUSED_LSTM_DEVICE_CODE_BEGIN

namespace fused_lstm::cuda {

template <int Rows, int Units, int ThreadRows, int ThreadUnits, int Depth>
struct Tile {
  static constexpr int kRows = Rows;                // batch rows of one block
  static constexpr int kUnits = Units;              // hidden units of one block
  static constexpr int kThreadRows = ThreadRows;    // rows of one thread
  static constexpr int kThreadUnits = ThreadUnits;  // units of one thread
  static constexpr int kDepth = Depth;              // reduction slice staged per barrier
  static constexpr int kColumns = Units / ThreadUnits;  // threads side by side along units
  static constexpr int kThreads = (Rows / ThreadRows) * kColumns;
  static_assert(Rows % ThreadRows == 0 && Units % ThreadUnits == 0, "tiles must divide");

  // The m-th row and u-th unit (within the block's tile) of thread `tid`.
  C10_HOST_DEVICE static int row(int tid, int m) { return tid / kColumns + m * (Rows / ThreadRows); }
  C10_HOST_DEVICE static int unit(int tid, int u) { return tid % kColumns + u * kColumns; }

  // Calls f(m, u, b, j) for the pairs of thread `tid` that lie inside the [batch, H]
  // matrix: its m-th row b and u-th unit j.
  template <typename F>
  C10_HOST_DEVICE static void for_each_pair(int tid, int64_t row0, int64_t unit0, int64_t batch,
                                            int64_t H, const F& f) {
    FUSED_LSTM_UNROLL
    for (int m = 0; m < ThreadRows; ++m) {
      FUSED_LSTM_UNROLL
      for (int u = 0; u < ThreadUnits; ++u) {
        const int64_t b = row0 + row(tid, m), j = unit0 + unit(tid, u);
        if (b < batch && j < H) f(m, u, b, j);
      }
    }
  }
};

// Few rows: more, smaller blocks so that a small batch still spreads over the SMs.
using SmallBatchTile = Tile<4, 32, 1, 1, 32>;    // 128 threads
using LargeBatchTile = Tile<32, 32, 2, 2, 16>;   // 256 threads
constexpr int64_t kSmallBatch = 64;              // the largest batch run with SmallBatchTile

// std::min is a __host__ function: see FUSED_LSTM_DEVICE_CODE_BEGIN.
C10_HOST_DEVICE constexpr int64_t min_of(int64_t a, int64_t b) { return a < b ? a : b; }

C10_HOST_DEVICE inline float exp_of(float x) { return ::expf(x); }
C10_HOST_DEVICE inline double exp_of(double x) { return ::exp(x); }
C10_HOST_DEVICE inline float tanh_of(float x) { return ::tanhf(x); }
C10_HOST_DEVICE inline double tanh_of(double x) { return ::tanh(x); }

template <typename acc_t>
C10_HOST_DEVICE inline acc_t sigmoid(acc_t x) {
  // exp(-x) overflows to inf for very negative x, giving 1 / inf = 0; NaN stays NaN.
  return acc_t(1) / (acc_t(1) + exp_of(-x));
}

// The gates [i | f | g | o] of one hidden unit of one row.
template <typename acc_t>
struct UnitGates {
  acc_t i, f, g, o;
};

// The activations and the cell update of one unit: pre-activations in `gates`, the
// activated gates out, with c_t and h_t = o·tanh(c_t).
template <typename acc_t>
C10_HOST_DEVICE inline void cell_forward(UnitGates<acc_t>& gates, acc_t c_prev, acc_t& c, acc_t& h) {
  gates = {sigmoid(gates.i), sigmoid(gates.f), tanh_of(gates.g), sigmoid(gates.o)};
  c = gates.f * c_prev + gates.i * gates.g;
  h = gates.o * tanh_of(c);
}

// Its gradient: from the saved gates and c_t, the gradient of h_t (`grad_h`) and of c_t
// through c_{t+1} (`grad_c`, replaced by the gradient of c_{t-1}), the gradients of the
// four pre-activations.
template <typename acc_t>
C10_HOST_DEVICE inline UnitGates<acc_t> cell_backward(const UnitGates<acc_t>& gates, acc_t c,
                                                      acc_t c_prev, acc_t grad_h, acc_t& grad_c) {
  const acc_t one(1);
  const acc_t tanh_c = tanh_of(c);
  const acc_t grad_c_t = grad_c + grad_h * gates.o * (one - tanh_c * tanh_c);
  grad_c = grad_c_t * gates.f;
  return {grad_c_t * gates.g * gates.i * (one - gates.i),
          grad_c_t * c_prev * gates.f * (one - gates.f),
          grad_c_t * gates.i * (one - gates.g * gates.g),
          grad_h * tanh_c * gates.o * (one - gates.o)};
}

// One forward step. Row-major [B, ·] slices of step t; acc_t unless said otherwise.
//
// The recurrent product of row b and unit j has kGates = 4 values, one per gate q:
// sum over k < depth() of activation(b, k) · weight(j, q, k), i.e. h_{t-1}·w_hhᵀ.
template <typename scalar_t_, typename acc_t_>
struct ForwardStep {
  using scalar_t = scalar_t_;
  using acc_t = acc_t_;
  static constexpr int kGates = 4;
  // A weight row (gate q of unit j) is contiguous in w_hh along the depth.
  static constexpr bool kDepthContiguous = true;

  const scalar_t* w_hh;     // [4H, P], the input's dtype
  const acc_t* h_carried;   // [B, P]: h of step s-1, read for rows < carried
  const acc_t* h_initial;   // [B, P]: h0, read for the other live rows
  const acc_t* c_carried;   // [B, H]
  const acc_t* c_initial;   // [B, H]
  acc_t* gates;             // [B, 4H]: x·w_ihᵀ + bias in, the activated gates out
  acc_t* cells;             // [B, H]: c_t out
  acc_t* hidden;            // [B, H]: o·tanh(c_t) out (the output itself without w_hr)
  acc_t* h_n;               // [B, H]: h_t of the rows that end here, or null (with w_hr)
  acc_t* c_n;               // [B, H]: c_t of the rows that end here
  int64_t batch, hidden_size, output_size;  // B, H, P
  int64_t rows, carried, rows_next;         // see StepRows (steps.h)

  // The length of the recurrent product (over the P columns of h_{t-1}), and the rows it
  // is needed for.
  C10_HOST_DEVICE int64_t depth() const { return output_size; }
  C10_HOST_DEVICE int64_t product_rows() const { return rows; }

  // h_{t-1}[b, k]: zero where b is not live or k is outside [0, P).
  C10_HOST_DEVICE acc_t activation(int64_t b, int64_t k) const {
    if (b >= rows || k >= output_size) return acc_t(0);
    return (b < carried ? h_carried : h_initial)[b * output_size + k];
  }

  // w_hh[q·H + j, k]: zero outside the matrix.
  C10_HOST_DEVICE scalar_t weight(int64_t j, int q, int64_t k) const {
    if (j >= hidden_size || k >= output_size) return scalar_t(0);
    return w_hh[(q * hidden_size + j) * output_size + k];
  }

  // The cell of row b, unit j, given its recurrent product: gates from the
  // pre-activations already in `gates` plus the product, then c_t and h_t, written out
  // (and into h_n, c_n where the row ends). A row that is not live gets zero gates,
  // cells and hidden; its product is not read.
  C10_HOST_DEVICE void update(int64_t b, int64_t j, const acc_t* product) const {
    const int64_t H = hidden_size;
    acc_t* g = gates + b * 4 * H + j;
    const int64_t at = b * H + j;
    if (b >= rows) {
      g[0] = g[H] = g[2 * H] = g[3 * H] = acc_t(0);
      cells[at] = hidden[at] = acc_t(0);
      return;
    }
    UnitGates<acc_t> unit{g[0] + product[0], g[H] + product[1], g[2 * H] + product[2],
                          g[3 * H] + product[3]};
    acc_t c, h;
    cell_forward(unit, (b < carried ? c_carried : c_initial)[at], c, h);
    g[0] = unit.i;
    g[H] = unit.f;
    g[2 * H] = unit.g;
    g[3 * H] = unit.o;
    cells[at] = c;
    hidden[at] = h;
    if (b >= rows_next) {
      c_n[at] = c;
      if (h_n) h_n[at] = h;
    }
  }
};

// One backward step (steps in reverse processing order). The gradient of h reaching
// step s is the recurrent one, grad_gates of step s+1 times w_hh, for the rows live at
// s+1, and the carried `grad_h` for the others.
//
// The recurrent product of row b and unit j is one value (kGates = 1): the sum over
// k < depth() of activation(b, k) · weight(j, 0, k), i.e. grad_gates_{s+1}·w_hh.
template <typename scalar_t_, typename acc_t_>
struct BackwardStep {
  using scalar_t = scalar_t_;
  using acc_t = acc_t_;
  static constexpr int kGates = 1;
  // A weight row (the column of unit j) is strided in w_hh: contiguous along the units.
  static constexpr bool kDepthContiguous = false;

  const scalar_t* w_hh;            // [4H, H], the input's dtype; unused without grad_gates_next
  const acc_t* grad_gates_next;    // [B, 4H]: grad_gates of step s+1, or null (none, or w_hr)
  const acc_t* grad_output;        // [B, H]: at step t, or null
  const acc_t* gates;              // [B, 4H]: saved activated gates of step t
  const acc_t* cells;              // [B, H]: c_t
  const acc_t* c_carried;          // [B, H]: c of step s-1, read for rows < carried
  const acc_t* c_initial;          // [B, H]: c0
  acc_t* grad_h;                   // [B, H]: gradient of h for the rows not live at s+1;
                                   // rows live at s+1 but not at s get theirs written here
  acc_t* grad_c;                   // [B, H]: gradient of c_t in, of c_{t-1} out (live rows)
  acc_t* grad_gates;               // [B, 4H]: out, zero for rows not live; null: no step
  int64_t batch, hidden_size;      // B, H
  int64_t rows, carried, rows_next;  // see StepRows (steps.h); rows = 0 for the last launch

  // The length of the recurrent product (over the 4H gate rows; none without
  // grad_gates_next), and the rows it is needed for.
  C10_HOST_DEVICE int64_t depth() const { return grad_gates_next ? 4 * hidden_size : 0; }
  C10_HOST_DEVICE int64_t product_rows() const { return grad_gates_next ? rows_next : 0; }

  // grad_gates_{s+1}[b, k]: zero for rows not live at s+1 and outside the matrix.
  C10_HOST_DEVICE acc_t activation(int64_t b, int64_t k) const {
    if (b >= product_rows() || k >= 4 * hidden_size) return acc_t(0);
    return grad_gates_next[b * 4 * hidden_size + k];
  }

  // w_hh[k, j]: zero outside the matrix.
  C10_HOST_DEVICE scalar_t weight(int64_t j, int, int64_t k) const {
    if (j >= hidden_size || k >= 4 * hidden_size) return scalar_t(0);
    return w_hh[k * hidden_size + j];
  }

  // The cell's gradient of row b, unit j, given the recurrent product (read only for the
  // rows live at s+1).
  C10_HOST_DEVICE void update(int64_t b, int64_t j, const acc_t* product) const {
    const int64_t H = hidden_size;
    const int64_t at = b * H + j;
    if (b >= rows) {
      // Not live at s: a row live at s+1 started there from h0, so this is grad_h0.
      // (grad_h of a row live at neither step is not read: with a projection it is never
      // written.)
      if (b < rows_next) grad_h[at] = product[0];
      if (grad_gates) {
        acc_t* dg = grad_gates + b * 4 * H + j;
        dg[0] = dg[H] = dg[2 * H] = dg[3 * H] = acc_t(0);
      }
      return;
    }
    const acc_t grad_h_t = b < rows_next ? product[0] : grad_h[at];
    const acc_t* g = gates + b * 4 * H + j;
    const UnitGates<acc_t> unit{g[0], g[H], g[2 * H], g[3 * H]};
    const UnitGates<acc_t> grad = cell_backward(
        unit, cells[at], (b < carried ? c_carried : c_initial)[at],
        grad_h_t + (grad_output ? grad_output[at] : acc_t(0)), grad_c[at]);
    acc_t* dg = grad_gates + b * 4 * H + j;
    dg[0] = grad.i;
    dg[H] = grad.f;
    dg[2 * H] = grad.g;
    dg[3 * H] = grad.o;
  }
};

// The steps of one forward layer without a projection, over whole-sequence buffers:
// step(s) for s in [0, steps()), in processing order. `live` may point to device memory
// when the steps are built on the device.
template <typename scalar_t, typename acc_t>
struct ForwardSequence {
  using Step = ForwardStep<scalar_t, acc_t>;
  const scalar_t* w_hh;
  acc_t* output;         // [T, B, P]
  const acc_t* h0;       // [B, P]
  acc_t* cells;          // [T, B, H]
  const acc_t* c0;       // [B, H]
  acc_t* gates;          // [T, B, 4H]: x·w_ihᵀ + bias in
  acc_t* h_n;            // [B, P]
  acc_t* c_n;            // [B, H]
  int64_t seq_len, batch, hidden_size, output_size;
  bool reverse;
  const int64_t* live;   // [T] live rows at each time index, or null: all

  C10_HOST_DEVICE int64_t steps() const { return seq_len; }
  C10_HOST_DEVICE int64_t depth() const { return output_size; }  // of the recurrent product

  C10_HOST_DEVICE Step step(int64_t s) const {
    const int64_t B = batch, H = hidden_size, P = output_size;
    const StepRows r = step_rows(s, seq_len, reverse, live, batch);
    return {w_hh, output + r.t_prev * B * P, h0, cells + r.t_prev * B * H, c0,
            gates + r.t * B * 4 * H, cells + r.t * B * H, output + r.t * B * P, h_n, c_n,
            B, H, P, r.rows, r.carried, r.rows_next};
  }
};

// The steps of one backward layer without a projection: step(i) for i < T is processing
// step s = T-1-i, whose product takes grad_gates of step s+1 (none at s = T-1); the last,
// step(T), has no cell: only the product of step 0's grad_gates, written into grad_h as
// grad_h0 for the rows live at step 0.
template <typename scalar_t, typename acc_t>
struct BackwardSequence {
  using Step = BackwardStep<scalar_t, acc_t>;
  const scalar_t* w_hh;
  const acc_t* grad_output;  // [T, B, H] or null
  const acc_t* gates;        // [T, B, 4H]: saved
  const acc_t* cells;        // [T, B, H]: saved
  const acc_t* c0;           // [B, H]
  acc_t* grad_h;             // [B, H]: grad_h_n in, grad_h0 out
  acc_t* grad_c;             // [B, H]: grad_c_n in, grad_c0 out
  acc_t* grad_gates;         // [T, B, 4H] out
  int64_t seq_len, batch, hidden_size;
  bool reverse;
  const int64_t* live;       // [T] or null: all

  C10_HOST_DEVICE int64_t steps() const { return seq_len + 1; }
  C10_HOST_DEVICE int64_t depth() const { return 4 * hidden_size; }  // of the recurrent product

  C10_HOST_DEVICE Step step(int64_t i) const {
    const int64_t T = seq_len, B = batch, H = hidden_size;
    const int64_t s = T - 1 - i;
    const acc_t* grad_gates_next =
        s + 1 < T ? grad_gates + time_of(s + 1, T, reverse) * B * 4 * H : nullptr;
    if (s < 0) {
      const int64_t first_rows = live_rows_at(0, T, reverse, live, B);
      return {w_hh, grad_gates_next, nullptr, nullptr, nullptr, nullptr, nullptr, grad_h, grad_c,
              nullptr, B, H, 0, 0, first_rows};
    }
    const StepRows r = step_rows(s, T, reverse, live, batch);
    return {w_hh, grad_gates_next, grad_output ? grad_output + r.t * B * H : nullptr,
            gates + r.t * B * 4 * H, cells + r.t * B * H, cells + r.t_prev * B * H, c0, grad_h,
            grad_c, grad_gates + r.t * B * 4 * H, B, H, r.rows, r.carried, r.rows_next};
  }
};

// The work of one block of a step kernel on rows [row0, row0 + kRows) and units
// [unit0, unit0 + kUnits): the recurrent product of its (row, unit) tile in kDepth
// slices, each staged in shared memory between two barriers, then the cell (`update`)
// in registers. Weight rows are staged in the order q·kUnits + u (gate q of unit u).
template <typename Tile, typename Step>
struct StepBlock {
  using acc_t = typename Step::acc_t;
  static constexpr int kGates = Step::kGates;
  static constexpr int kWeightRows = kGates * Tile::kUnits;

  struct Shared {
    acc_t a[Tile::kDepth][Tile::kRows + 1];   // the activations [rows, k-slice], transposed
    acc_t w[Tile::kDepth][kWeightRows + 1];   // the weight rows [k-slice], transposed
  };
  struct Thread {
    acc_t acc[Tile::kThreadRows][Tile::kThreadUnits][kGates];
  };

  C10_HOST_DEVICE static void clear(Thread& th) {
    for (int m = 0; m < Tile::kThreadRows; ++m)
      for (int u = 0; u < Tile::kThreadUnits; ++u)
        for (int q = 0; q < kGates; ++q) th.acc[m][u][q] = acc_t(0);
  }

  // Stages the activations of rows row0.. and the weight rows of units unit0.. over
  // k0..k0+kDepth. Consecutive threads read consecutive addresses: along k for the
  // activations, and along k or along the units for the weights, whichever is contiguous.
  C10_HOST_DEVICE static void load(Shared& s, const Step& p, int64_t row0, int64_t unit0,
                                   int64_t k0, int tid) {
    for (int e = tid; e < Tile::kDepth * Tile::kRows; e += Tile::kThreads) {
      const int kd = e % Tile::kDepth, m = e / Tile::kDepth;
      s.a[kd][m] = p.activation(row0 + m, k0 + kd);
    }
    for (int e = tid; e < Tile::kDepth * kWeightRows; e += Tile::kThreads) {
      const int kd = Step::kDepthContiguous ? e % Tile::kDepth : e / kWeightRows;
      const int r = Step::kDepthContiguous ? e / Tile::kDepth : e % kWeightRows;
      const int64_t j = unit0 + r % Tile::kUnits;
      s.w[kd][r] = static_cast<acc_t>(p.weight(j, r / Tile::kUnits, k0 + kd));
    }
  }

  C10_HOST_DEVICE static void multiply(const Shared& s, int tid, Thread& th) {
    FUSED_LSTM_UNROLL
    for (int kd = 0; kd < Tile::kDepth; ++kd) {
      FUSED_LSTM_UNROLL
      for (int m = 0; m < Tile::kThreadRows; ++m) {
        const acc_t a = s.a[kd][Tile::row(tid, m)];
        FUSED_LSTM_UNROLL
        for (int u = 0; u < Tile::kThreadUnits; ++u)
          FUSED_LSTM_UNROLL
          for (int q = 0; q < kGates; ++q)
            th.acc[m][u][q] += a * s.w[kd][q * Tile::kUnits + Tile::unit(tid, u)];
      }
    }
  }
};

// The block program of a step kernel: run_block(block, shared, step, row0, unit0).
template <typename Tile, typename Step, typename Block>
C10_HOST_DEVICE void run_block(Block& block, typename StepBlock<Tile, Step>::Shared& s,
                               const Step& p, int64_t row0, int64_t unit0) {
  using Program = StepBlock<Tile, Step>;
  using Thread = typename Program::Thread;
  block.for_each_thread([&](int, Thread& th) { Program::clear(th); });
  const int64_t depth = p.depth();
  for (int64_t k0 = 0; k0 < depth; k0 += Tile::kDepth) {
    block.for_each_thread([&](int tid, Thread&) { Program::load(s, p, row0, unit0, k0, tid); });
    block.sync();
    block.for_each_thread([&](int tid, Thread& th) { Program::multiply(s, tid, th); });
    block.sync();
  }
  block.for_each_thread([&](int tid, Thread& th) {
    Tile::for_each_pair(tid, row0, unit0, p.batch, p.hidden_size,
                        [&](int m, int u, int64_t b, int64_t j) { p.update(b, j, th.acc[m][u]); });
  });
}

// Runs the blocks of one step (a ForwardStep or a BackwardStep) as
// Run::run<Tile>(step, row_blocks, unit_blocks), with the tile for its batch size: on
// the GPU, or emulated on the host. Nothing to run without rows.
template <typename Run, typename Step>
void run_step(const Step& step) {
  const auto grid = [&](auto tile) {
    using T = decltype(tile);
    Run::template run<T>(step, (step.batch + T::kRows - 1) / T::kRows,
                         (step.hidden_size + T::kUnits - 1) / T::kUnits);
  };
  if (step.batch == 0) return;
  if (step.batch <= kSmallBatch) {
    grid(SmallBatchTile{});
  } else {
    grid(LargeBatchTile{});
  }
}

}  // namespace fused_lstm::cuda

FUSED_LSTM_DEVICE_CODE_END
