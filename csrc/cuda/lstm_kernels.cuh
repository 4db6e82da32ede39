// The work of one block for one time step of the CUDA kernels, written once for the GPU
// and for the host: every function here is __host__ __device__ over plain pointers, so
// that lstm_emulated.cpp can run the very same code for every (block, thread) of a launch
// on a machine without a GPU. No ATen here.
//
// A block program is a sequence of phases separated by barriers; `Block` runs one phase
// for its threads (on the GPU: this thread; on the host: each thread in turn) and
// `Block::sync()` is the barrier (__syncthreads() on the GPU). Each thread keeps its
// registers in a `Thread` state and the block shares one `Shared`.
//
// Tiling (both directions): block (x, y) owns batch rows [x·kRows, (x+1)·kRows) and hidden
// units [y·kUnits, (y+1)·kUnits); each thread owns kThreadRows × kThreadUnits of those
// (row, unit) pairs, strided so that neighbouring threads own neighbouring units. The
// recurrent product is accumulated over kDepth-wide slices staged in shared memory, with
// one barrier after each load and one after each use. All arithmetic is in acc_t (FP32
// FMAs for float, bfloat16 and float16, never TF32; FP64 for double); weights are read in
// the input's dtype and widened when staged.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FUSED_LSTM_UNROLL _Pragma("unroll")
#else
#define FUSED_LSTM_UNROLL
#endif

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

// Which rows do what at processing step s (steps run backwards in time with reverse).
struct StepRows {
  int64_t t;          // the time index of step s
  int64_t t_prev;     // the time index of step s-1 (t itself at s = 0)
  int64_t rows;       // rows live at step s: b < rows
  int64_t carried;    // rows whose previous state is step s-1's; the others start from h0, c0
  int64_t rows_next;  // rows live at step s+1 (0 at the last step): the others end at step s
};

inline StepRows step_rows(int64_t s, int64_t T, bool reverse, const int64_t* live) {
  const auto time = [&](int64_t k) { return reverse ? T - 1 - k : k; };
  const int64_t t = time(s);
  const int64_t t_prev = s > 0 ? time(s - 1) : t;
  const int64_t carried = s > 0 ? (live[t] < live[t_prev] ? live[t] : live[t_prev]) : 0;
  return {t, t_prev, live[t], carried, s + 1 < T ? live[time(s + 1)] : 0};
}

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

// The work of one block of a step kernel (Program: ForwardBlock or BackwardBlock) on
// rows [row0, row0 + kRows) and units [unit0, unit0 + kUnits): the recurrent product in
// kDepth slices, each staged in shared memory between two barriers, then the cell.
template <typename Program, typename Tile, typename Block>
C10_HOST_DEVICE void run_block(Block& block, typename Program::Shared& s,
                               const typename Program::Step& p, int64_t row0, int64_t unit0) {
  using Thread = typename Program::Thread;
  block.for_each_thread([&](int, Thread& th) { Program::clear(th); });
  const int64_t depth = Program::depth(p);
  for (int64_t k0 = 0; k0 < depth; k0 += Tile::kDepth) {
    block.for_each_thread([&](int tid, Thread&) { Program::load(s, p, row0, unit0, k0, tid); });
    block.sync();
    block.for_each_thread([&](int tid, Thread& th) { Program::multiply(s, tid, th); });
    block.sync();
  }
  block.for_each_thread([&](int tid, Thread& th) { Program::finish(p, row0, unit0, tid, th); });
}

template <typename Tile, typename scalar_t, typename acc_t>
struct ForwardBlock;
template <typename Tile, typename scalar_t, typename acc_t>
struct BackwardBlock;

// One forward step. Row-major [B, ·] slices of step t; acc_t unless said otherwise.
template <typename scalar_t, typename acc_t>
struct ForwardStep {
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
  int64_t rows, carried, rows_next;         // see StepRows

  template <typename Tile>
  using Program = ForwardBlock<Tile, scalar_t, acc_t>;
};

// Forward step, one block: gates of its (row, unit) tile = the pre-activations already in
// `gates` + h_{t-1}·w_hhᵀ over the four gate rows of each unit, then the cell update in
// registers. Rows that are not live get zero gates, cells and hidden.
template <typename Tile, typename scalar_t, typename acc_t>
struct ForwardBlock {
  struct Shared {
    acc_t h[Tile::kDepth][Tile::kRows + 1];         // h_{t-1}[rows, k-slice], transposed
    acc_t w[Tile::kDepth][4 * Tile::kUnits + 1];    // w_hh[4 gate rows × units, k-slice], transposed
  };
  struct Thread {
    acc_t acc[Tile::kThreadRows][Tile::kThreadUnits][4];
  };
  using Step = ForwardStep<scalar_t, acc_t>;

  // The length of the recurrent product: over the P columns of h_{t-1}.
  C10_HOST_DEVICE static int64_t depth(const Step& p) { return p.output_size; }

  C10_HOST_DEVICE static void clear(Thread& th) {
    for (int m = 0; m < Tile::kThreadRows; ++m)
      for (int u = 0; u < Tile::kThreadUnits; ++u)
        for (int q = 0; q < 4; ++q) th.acc[m][u][q] = acc_t(0);
  }

  // Stages h_{t-1}[row0.., k0..] and w_hh[q·H + unit0.., k0..]; zeros outside the
  // matrices and for rows that are not live. Consecutive threads read consecutive k.
  C10_HOST_DEVICE static void load(Shared& s, const Step& p, int64_t row0, int64_t unit0,
                                   int64_t k0, int tid) {
    const int64_t H = p.hidden_size, P = p.output_size;
    for (int e = tid; e < Tile::kDepth * Tile::kRows; e += Tile::kThreads) {
      const int kd = e % Tile::kDepth, m = e / Tile::kDepth;
      const int64_t b = row0 + m, k = k0 + kd;
      acc_t v(0);
      if (b < p.rows && k < P) v = (b < p.carried ? p.h_carried : p.h_initial)[b * P + k];
      s.h[kd][m] = v;
    }
    for (int e = tid; e < Tile::kDepth * 4 * Tile::kUnits; e += Tile::kThreads) {
      const int kd = e % Tile::kDepth, r = e / Tile::kDepth;
      const int64_t j = unit0 + r % Tile::kUnits, k = k0 + kd;
      const int q = r / Tile::kUnits;
      s.w[kd][r] = (j < H && k < P) ? static_cast<acc_t>(p.w_hh[(q * H + j) * P + k]) : acc_t(0);
    }
  }

  C10_HOST_DEVICE static void multiply(const Shared& s, int tid, Thread& th) {
    FUSED_LSTM_UNROLL
    for (int kd = 0; kd < Tile::kDepth; ++kd) {
      FUSED_LSTM_UNROLL
      for (int m = 0; m < Tile::kThreadRows; ++m) {
        const acc_t h = s.h[kd][Tile::row(tid, m)];
        FUSED_LSTM_UNROLL
        for (int u = 0; u < Tile::kThreadUnits; ++u)
          FUSED_LSTM_UNROLL
          for (int q = 0; q < 4; ++q)
            th.acc[m][u][q] += h * s.w[kd][q * Tile::kUnits + Tile::unit(tid, u)];
      }
    }
  }

  C10_HOST_DEVICE static void finish(const Step& p, int64_t row0, int64_t unit0, int tid, Thread& th) {
    const int64_t H = p.hidden_size;
    Tile::for_each_pair(tid, row0, unit0, p.batch, H, [&](int m, int u, int64_t b, int64_t j) {
      acc_t* g = p.gates + b * 4 * H + j;
      const int64_t at = b * H + j;
      if (b >= p.rows) {
        g[0] = g[H] = g[2 * H] = g[3 * H] = acc_t(0);
        p.cells[at] = p.hidden[at] = acc_t(0);
        return;
      }
      UnitGates<acc_t> gates{g[0] + th.acc[m][u][0], g[H] + th.acc[m][u][1],
                             g[2 * H] + th.acc[m][u][2], g[3 * H] + th.acc[m][u][3]};
      acc_t c, h;
      cell_forward(gates, (b < p.carried ? p.c_carried : p.c_initial)[at], c, h);
      g[0] = gates.i;
      g[H] = gates.f;
      g[2 * H] = gates.g;
      g[3 * H] = gates.o;
      p.cells[at] = c;
      p.hidden[at] = h;
      if (b >= p.rows_next) {
        p.c_n[at] = c;
        if (p.h_n) p.h_n[at] = h;
      }
    });
  }
};

// One backward step (steps in reverse processing order). The gradient of h reaching
// step s is the recurrent one, grad_gates of step s+1 times w_hh, for the rows live at
// s+1, and the carried `grad_h` for the others.
template <typename scalar_t, typename acc_t>
struct BackwardStep {
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
  int64_t rows, carried, rows_next;  // see StepRows; rows = 0 for the last launch

  template <typename Tile>
  using Program = BackwardBlock<Tile, scalar_t, acc_t>;
};

// Backward step, one block: the recurrent gradient of its (row, unit) tile,
// grad_gates_{s+1}[rows, 0..4H)·w_hh[0..4H, units], then the cell's gradient in registers.
template <typename Tile, typename scalar_t, typename acc_t>
struct BackwardBlock {
  struct Shared {
    acc_t g[Tile::kDepth][Tile::kRows + 1];  // grad_gates_{s+1}[rows, k-slice], transposed
    acc_t w[Tile::kDepth][Tile::kUnits];     // w_hh[k-slice, units]
  };
  struct Thread {
    acc_t acc[Tile::kThreadRows][Tile::kThreadUnits];
  };
  using Step = BackwardStep<scalar_t, acc_t>;

  // The length of the recurrent product: over the 4H gate rows (none without grad_gates_next).
  C10_HOST_DEVICE static int64_t depth(const Step& p) {
    return p.grad_gates_next ? 4 * p.hidden_size : 0;
  }

  C10_HOST_DEVICE static void clear(Thread& th) {
    for (int m = 0; m < Tile::kThreadRows; ++m)
      for (int u = 0; u < Tile::kThreadUnits; ++u) th.acc[m][u] = acc_t(0);
  }

  // grad_gates_{s+1} is read along k (consecutive threads, consecutive k), w_hh along
  // units (consecutive threads, consecutive units).
  C10_HOST_DEVICE static void load(Shared& s, const Step& p, int64_t row0, int64_t unit0,
                                   int64_t k0, int tid) {
    const int64_t H = p.hidden_size;
    for (int e = tid; e < Tile::kDepth * Tile::kRows; e += Tile::kThreads) {
      const int kd = e % Tile::kDepth, m = e / Tile::kDepth;
      const int64_t b = row0 + m, k = k0 + kd;
      s.g[kd][m] = (b < p.rows_next && k < 4 * H) ? p.grad_gates_next[b * 4 * H + k] : acc_t(0);
    }
    for (int e = tid; e < Tile::kDepth * Tile::kUnits; e += Tile::kThreads) {
      const int u = e % Tile::kUnits, kd = e / Tile::kUnits;
      const int64_t j = unit0 + u, k = k0 + kd;
      s.w[kd][u] = (j < H && k < 4 * H) ? static_cast<acc_t>(p.w_hh[k * H + j]) : acc_t(0);
    }
  }

  C10_HOST_DEVICE static void multiply(const Shared& s, int tid, Thread& th) {
    FUSED_LSTM_UNROLL
    for (int kd = 0; kd < Tile::kDepth; ++kd) {
      FUSED_LSTM_UNROLL
      for (int m = 0; m < Tile::kThreadRows; ++m) {
        const acc_t g = s.g[kd][Tile::row(tid, m)];
        FUSED_LSTM_UNROLL
        for (int u = 0; u < Tile::kThreadUnits; ++u) th.acc[m][u] += g * s.w[kd][Tile::unit(tid, u)];
      }
    }
  }

  C10_HOST_DEVICE static void finish(const Step& p, int64_t row0, int64_t unit0, int tid, Thread& th) {
    const int64_t H = p.hidden_size;
    Tile::for_each_pair(tid, row0, unit0, p.batch, H, [&](int m, int u, int64_t b, int64_t j) {
      const int64_t at = b * H + j;
      if (b >= p.rows) {
        // Not live at s: a row live at s+1 started there from h0, so this is grad_h0.
        // (grad_h of a row live at neither step is not read: with a projection it is
        // never written.)
        if (b < p.rows_next) p.grad_h[at] = th.acc[m][u];
        if (p.grad_gates) {
          acc_t* dg = p.grad_gates + b * 4 * H + j;
          dg[0] = dg[H] = dg[2 * H] = dg[3 * H] = acc_t(0);
        }
        return;
      }
      const acc_t grad_h = b < p.rows_next ? th.acc[m][u] : p.grad_h[at];
      const acc_t* g = p.gates + b * 4 * H + j;
      const UnitGates<acc_t> gates{g[0], g[H], g[2 * H], g[3 * H]};
      const UnitGates<acc_t> grad = cell_backward(
          gates, p.cells[at], (b < p.carried ? p.c_carried : p.c_initial)[at],
          grad_h + (p.grad_output ? p.grad_output[at] : acc_t(0)), p.grad_c[at]);
      acc_t* dg = p.grad_gates + b * 4 * H + j;
      dg[0] = grad.i;
      dg[H] = grad.f;
      dg[2 * H] = grad.g;
      dg[3 * H] = grad.o;
    });
  }
};

// Runs the blocks of one step (a ForwardStep or a BackwardStep) as
// Run::run<Program, Tile>(step, row_blocks, unit_blocks), with the tile for its batch
// size: on the GPU, or emulated on the host. Nothing to run without rows.
template <typename Run, typename Step>
void run_step(const Step& step) {
  const auto grid = [&](auto tile) {
    using T = decltype(tile);
    Run::template run<typename Step::template Program<T>, T>(
        step, (step.batch + T::kRows - 1) / T::kRows, (step.hidden_size + T::kUnits - 1) / T::kUnits);
  };
  if (step.batch == 0) return;
  if (step.batch <= kSmallBatch) {
    grid(SmallBatchTile{});
  } else {
    grid(LargeBatchTile{});
  }
}

}  // namespace fused_lstm::cuda
