// Bodies of the kernels declared in kernels.h. Included by one .cpp per CPU capability,
// each of which defines CPU_CAPABILITY (and the matching CPU_CAPABILITY_* macro) first, so
// that at::vec::Vectorized is that capability's.
#pragma once

#include "kernels.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fused_lstm::cpu::CPU_CAPABILITY {

template <typename scalar_t>
using Vec = at::vec::Vectorized<scalar_t>;

template <typename scalar_t>
inline Vec<scalar_t> sigmoid(const Vec<scalar_t>& x) {
  // exp(-x) overflows to inf for very negative x, giving 1 / inf = 0; NaN stays NaN.
  return (Vec<scalar_t>(scalar_t(1)) + x.neg().exp()).reciprocal();
}

// tanh to within a few units in the last place, much cheaper than the library's float
// tanh: (1 - t) / (1 + t) with t = exp(-2|x|) where that loses little to cancellation,
// and the odd Taylor series of tanh (to x^11, error below 1e-9 relative) near zero.
// NaN and infinities come out as tanh's. float64 keeps the library's tanh.
template <typename scalar_t>
inline Vec<scalar_t> tanh(const Vec<scalar_t>& x) {
  return x.tanh();
}

template <>
inline Vec<float> tanh<float>(const Vec<float>& x) {
  using V = Vec<float>;
  const V one(1.0f);
  const V magnitude = x.abs();
  const V t = (magnitude * V(-2.0f)).exp();
  const V far = (one - t) / (one + t);
  const V x2 = x * x;
  V series(-1382.0f / 155925.0f);
  series = at::vec::fmadd(series, x2, V(62.0f / 2835.0f));
  series = at::vec::fmadd(series, x2, V(-17.0f / 315.0f));
  series = at::vec::fmadd(series, x2, V(2.0f / 15.0f));
  series = at::vec::fmadd(series, x2, V(-1.0f / 3.0f));
  series = at::vec::fmadd(series * x2, magnitude, magnitude);
  const V near = magnitude < V(0.3f);
  const V result = V::blendv(far, series, near);
  return result | (x & V(-0.0f));  // tanh is odd: the sign of x
}

// Runs body(j, count) over [j0, j1) in vector-sized pieces; the last may be partial.
template <typename scalar_t, typename F>
inline void for_each_vector(int64_t j0, int64_t j1, const F& body) {
  constexpr int64_t width = Vec<scalar_t>::size();
  int64_t j = j0;
  for (; j + width <= j1; j += width) body(j, width);
  if (j < j1) body(j, j1 - j);
}

template <typename scalar_t>
void cell_forward(const CellForwardRow<scalar_t>& row, int64_t H, int64_t j0, int64_t j1) {
  using V = Vec<scalar_t>;
  for_each_vector<scalar_t>(j0, j1, [&](int64_t j, int64_t n) {
    scalar_t* g = row.gates;
    const V i = sigmoid<scalar_t>(V::loadu(g + j, n));
    const V f = sigmoid<scalar_t>(V::loadu(g + H + j, n));
    const V cand = tanh<scalar_t>(V::loadu(g + 2 * H + j, n));
    const V o = sigmoid<scalar_t>(V::loadu(g + 3 * H + j, n));
    const V c = f * V::loadu(row.c_prev + j, n) + i * cand;
    const V h = o * tanh<scalar_t>(c);
    i.store(g + j, n);
    f.store(g + H + j, n);
    cand.store(g + 2 * H + j, n);
    o.store(g + 3 * H + j, n);
    c.store(row.c + j, n);
    h.store(row.h + j, n);
  });
}

template <typename scalar_t>
void cell_backward(const CellBackwardRow<scalar_t>& row, int64_t H, int64_t j0, int64_t j1) {
  using V = Vec<scalar_t>;
  const V one(scalar_t(1));
  for_each_vector<scalar_t>(j0, j1, [&](int64_t j, int64_t n) {
    const scalar_t* g = row.gates;
    const V i = V::loadu(g + j, n);
    const V f = V::loadu(g + H + j, n);
    const V cand = V::loadu(g + 2 * H + j, n);
    const V o = V::loadu(g + 3 * H + j, n);
    const V tanh_c = tanh<scalar_t>(V::loadu(row.c + j, n));
    const V grad_h = V::loadu(row.grad_h + j, n);
    // c_t feeds h_t (through o * tanh) and c_{t+1} (whose gradient grad_c brings).
    const V grad_c = V::loadu(row.grad_c + j, n) + grad_h * o * (one - tanh_c * tanh_c);
    scalar_t* dg = row.grad_gates;
    (grad_c * cand * i * (one - i)).store(dg + j, n);
    (grad_c * V::loadu(row.c_prev + j, n) * f * (one - f)).store(dg + H + j, n);
    (grad_c * i * (one - cand * cand)).store(dg + 2 * H + j, n);
    (grad_h * tanh_c * o * (one - o)).store(dg + 3 * H + j, n);
    (grad_c * f).store(row.grad_c + j, n);
  });
}

template <typename scalar_t>
void cell_hidden(const scalar_t* gates, const scalar_t* c, scalar_t* h, int64_t H, int64_t j0,
                 int64_t j1) {
  using V = Vec<scalar_t>;
  for_each_vector<scalar_t>(j0, j1, [&](int64_t j, int64_t n) {
    (V::loadu(gates + 3 * H + j, n) * tanh<scalar_t>(V::loadu(c + j, n))).store(h + j, n);
  });
}

// ---------------------------------------------------------------------------------
// The persistent recurrence.
//
// Matrices are multiplied in panels of kPanel columns (two vectors wide): a panel of
// B holds K rows of kPanel contiguous values, so that the inner loop loads two vectors
// of B and broadcasts one value of A per row. A tile is MR rows by NP panels of C, kept
// in registers for the whole K loop: 6 x 1 panel (12 accumulators) for batches, 1 x 4
// panels for a single row (a matrix-vector product, bound by reading the weights).

// The small-matrix kernel uses the compiler's vector types rather than Vectorized, so
// that its accumulators stay in registers through the K loop.
template <typename scalar_t>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Lanes<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <typename scalar_t>
using lanes_t = typename Lanes<scalar_t>::type;
template <typename scalar_t>
constexpr int64_t kLanes = sizeof(lanes_t<scalar_t>) / sizeof(scalar_t);
template <typename scalar_t>
constexpr int64_t kPanel = 2 * kLanes<scalar_t>;

inline lanes_t<float> fmadd(lanes_t<float> a, lanes_t<float> b, lanes_t<float> c) {
#if defined(CPU_CAPABILITY_AVX2)
  return (lanes_t<float>)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}
inline lanes_t<double> fmadd(lanes_t<double> a, lanes_t<double> b, lanes_t<double> c) {
#if defined(CPU_CAPABILITY_AVX2)
  return (lanes_t<double>)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
  return a * b + c;
#endif
}

template <typename scalar_t>
inline lanes_t<scalar_t> load_lanes(const scalar_t* p, int64_t count) {
  lanes_t<scalar_t> v{};
  if (count >= kLanes<scalar_t>) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    for (int64_t i = 0; i < count; ++i) v[i] = p[i];
  }
  return v;
}

template <typename scalar_t>
inline void store_lanes(lanes_t<scalar_t> v, scalar_t* p, int64_t count) {
  if (count >= kLanes<scalar_t>) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    for (int64_t i = 0; i < count; ++i) p[i] = v[i];
  }
}

template <typename scalar_t>
struct Panel {
  const scalar_t* b;  // K x kPanel packed values
  int64_t column;     // of C
  int64_t count;      // valid columns, <= kPanel (the last panel of a row may be short)
};

// C[r, panel p] (+)= sum_k A[r][k] * B_p[k], for MR rows and NP panels.
template <typename scalar_t, int MR, int NP, bool kAccumulate>
inline void multiply_tile(int64_t K, const scalar_t* const* a, const Panel<scalar_t>* panels,
                          scalar_t* const* c) {
  using L = lanes_t<scalar_t>;
  constexpr int64_t W = kLanes<scalar_t>;
  L acc[MR][NP][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      if constexpr (kAccumulate) {
        const scalar_t* row = c[r] + panels[p].column;
        acc[r][p][0] = load_lanes(row, panels[p].count);
        acc[r][p][1] = load_lanes(row + W, panels[p].count - W);
      } else {
        acc[r][p][0] = acc[r][p][1] = L{};
      }
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    L b0[NP], b1[NP];
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      std::memcpy(&b0[p], panels[p].b + k * 2 * W, sizeof(L));
      std::memcpy(&b1[p], panels[p].b + k * 2 * W + W, sizeof(L));
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const L a_rk = a[r][k] - L{};  // a broadcast (x - 0 is x, signed zeros included)
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) {
        acc[r][p][0] = fmadd(a_rk, b0[p], acc[r][p][0]);
        acc[r][p][1] = fmadd(a_rk, b1[p], acc[r][p][1]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      scalar_t* row = c[r] + panels[p].column;
      store_lanes(acc[r][p][0], row, panels[p].count);
      store_lanes(acc[r][p][1], row + W, panels[p].count - W);
    }
  }
}

template <typename scalar_t, int MR, bool kAccumulate, typename RowA, typename RowC>
inline void multiply_rows(int64_t r0, int64_t K, const RowA& row_a, const Panel<scalar_t>& panel,
                          const RowC& row_c) {
  const scalar_t* a[MR];
  scalar_t* c[MR];
  for (int r = 0; r < MR; ++r) {
    a[r] = row_a(r0 + r);
    c[r] = row_c(r0 + r);
  }
  multiply_tile<scalar_t, MR, 1, kAccumulate>(K, a, &panel, c);
}

// C[rows, panels] (+)= A[rows, K] * B[K, panels], rows given by row_a(r) and row_c(r).
template <typename scalar_t, bool kAccumulate, typename RowA, typename RowC>
void multiply_panels(int64_t rows, int64_t K, const std::vector<Panel<scalar_t>>& panels,
                     const RowA& row_a, const RowC& row_c) {
  const int64_t num = static_cast<int64_t>(panels.size());
  if (rows == 1) {
    const scalar_t* a[1] = {row_a(0)};
    scalar_t* c[1] = {row_c(0)};
    int64_t p = 0;
    for (; p + 4 <= num; p += 4) multiply_tile<scalar_t, 1, 4, kAccumulate>(K, a, &panels[p], c);
    for (; p < num; ++p) multiply_tile<scalar_t, 1, 1, kAccumulate>(K, a, &panels[p], c);
    return;
  }
  // Rows in blocks of at most 6, as even as possible: a block of fewer than 4 rows has
  // too few independent accumulators to keep both FMA pipes busy.
  const int64_t blocks = (rows + 5) / 6;
  for (const auto& panel : panels) {
    for (int64_t block = 0, r0 = 0; block < blocks; ++block) {
      const int64_t size = (rows - r0) / (blocks - block);
      switch (size) {
        case 6: multiply_rows<scalar_t, 6, kAccumulate>(r0, K, row_a, panel, row_c); break;
        case 5: multiply_rows<scalar_t, 5, kAccumulate>(r0, K, row_a, panel, row_c); break;
        case 4: multiply_rows<scalar_t, 4, kAccumulate>(r0, K, row_a, panel, row_c); break;
        case 3: multiply_rows<scalar_t, 3, kAccumulate>(r0, K, row_a, panel, row_c); break;
        case 2: multiply_rows<scalar_t, 2, kAccumulate>(r0, K, row_a, panel, row_c); break;
        default: multiply_rows<scalar_t, 1, kAccumulate>(r0, K, row_a, panel, row_c); break;
      }
      r0 += size;
    }
  }
}

template <typename scalar_t>
int64_t panels_per_gate(int64_t H) {
  return (H + kPanel<scalar_t> - 1) / kPanel<scalar_t>;
}

template <typename scalar_t>
int64_t recurrent_workspace_size(int64_t H) {
  return 4 * panels_per_gate<scalar_t>(H) * H * kPanel<scalar_t>;
}

// Runs body(first_panel, end_panel) on each thread of one parallel region, the hidden
// units split in whole panels, with barrier() meeting all of them. Nested in another
// parallel region (or without OpenMP) it runs on one thread.
template <typename scalar_t, typename Body>
void for_each_thread_slice(int64_t H, const Body& body) {
  const int64_t panels = panels_per_gate<scalar_t>(H);
#ifdef _OPENMP
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), panels);
#pragma omp parallel num_threads(threads) if (threads > 1 && !at::in_parallel_region())
  {
    const int64_t team = omp_get_num_threads(), k = omp_get_thread_num();
    body(panels * k / team, panels * (k + 1) / team, [] {
#pragma omp barrier
    });
  }
#else
  body(int64_t(0), panels, [] {});
#endif
}

// Time index, live rows and rows carried over from the previous step, of step s.
struct Step {
  int64_t t, prev_t, live, carried;
  Step(int64_t s, int64_t T, bool reverse, const int64_t* live_rows)
      : t(reverse ? T - 1 - s : s),
        prev_t(s == 0 ? t : (reverse ? t + 1 : t - 1)),
        live(live_rows[t]),
        carried(s == 0 ? 0 : std::min(live_rows[t], live_rows[prev_t])) {}
};

template <typename scalar_t>
void zero_rows(scalar_t* base, int64_t row_stride, int64_t from, int64_t to, int64_t column,
               int64_t width) {
  for (int64_t b = from; b < to; ++b) std::fill_n(base + b * row_stride + column, width, scalar_t(0));
}

template <typename scalar_t>
void recurrent_forward(const RecurrentForward<scalar_t>& a) {
  const int64_t T = a.seq_len, B = a.batch, H = a.hidden, PW = kPanel<scalar_t>;
  const int64_t gate_panels = panels_per_gate<scalar_t>(H);
  for_each_thread_slice<scalar_t>(H, [&](int64_t first, int64_t end, const auto& barrier) {
    // This thread's rows of w_hh, gate by gate, in panels of PW units: value (k, x) of
    // panel (q, j) is w_hh[q*H + j*PW + x][k].
    std::vector<Panel<scalar_t>> panels;
    for (int64_t q = 0; q < 4; ++q) {
      for (int64_t j = first; j < end; ++j) {
        scalar_t* packed = a.workspace + (q * gate_panels + j) * H * PW;
        const int64_t count = std::min(PW, H - j * PW);
        for (int64_t k = 0; k < H; ++k) {
          for (int64_t x = 0; x < PW; ++x) {
            packed[k * PW + x] = x < count ? a.w_hh[(q * H + j * PW + x) * H + k] : scalar_t(0);
          }
        }
        panels.push_back({packed, q * H + j * PW, count});
      }
    }
    const int64_t u0 = std::min(H, first * PW), u1 = std::min(H, end * PW);
    const auto& cell = cell_forward<scalar_t>;
    for (int64_t s = 0; s < T; ++s) {
      const Step step(s, T, a.reverse, a.live);
      scalar_t* gates = a.gates + step.t * B * 4 * H;
      scalar_t* cells = a.cells + step.t * B * H;
      scalar_t* output = a.output + step.t * B * H;
      const scalar_t* prev_output = a.output + step.prev_t * B * H;
      const scalar_t* prev_cells = a.cells + step.prev_t * B * H;
      if (u1 > u0) {
        multiply_panels<scalar_t, true>(
            step.live, H, panels,
            [&](int64_t b) { return (b < step.carried ? prev_output : a.h0) + b * H; },
            [&](int64_t b) { return gates + b * 4 * H; });
        for (int64_t b = 0; b < step.live; ++b) {
          const CellForwardRow<scalar_t> row{gates + b * 4 * H,
                                             (b < step.carried ? prev_cells : a.c0) + b * H,
                                             cells + b * H, output + b * H};
          cell(row, H, u0, u1);
        }
        for (int64_t q = 0; q < 4; ++q) zero_rows(gates, 4 * H, step.live, B, q * H + u0, u1 - u0);
        zero_rows(cells, H, step.live, B, u0, u1 - u0);
        zero_rows(output, H, step.live, B, u0, u1 - u0);
      }
      barrier();  // this step's h is complete before any thread multiplies it
    }
  });
}

template <typename scalar_t>
void recurrent_backward(const RecurrentBackward<scalar_t>& a) {
  using V = Vec<scalar_t>;
  const int64_t T = a.seq_len, B = a.batch, H = a.hidden, PW = kPanel<scalar_t>;
  for_each_thread_slice<scalar_t>(H, [&](int64_t first, int64_t end, const auto& barrier) {
    // Columns of w_hh in panels of PW: value (k, x) of panel j is w_hh[k][j*PW + x], so
    // that this thread computes the gradient of h_{t-1} for its own units.
    std::vector<Panel<scalar_t>> panels;
    for (int64_t j = first; j < end; ++j) {
      scalar_t* packed = a.workspace + j * 4 * H * PW;
      const int64_t count = std::min(PW, H - j * PW);
      for (int64_t k = 0; k < 4 * H; ++k) {
        for (int64_t x = 0; x < PW; ++x) {
          packed[k * PW + x] = x < count ? a.w_hh[k * H + j * PW + x] : scalar_t(0);
        }
      }
      panels.push_back({packed, j * PW, count});
    }
    const int64_t u0 = std::min(H, first * PW), u1 = std::min(H, end * PW);
    for (int64_t s = T - 1; s >= 0; --s) {
      const Step step(s, T, a.reverse, a.live);
      const scalar_t* gates = a.gates + step.t * B * 4 * H;
      const scalar_t* cells = a.cells + step.t * B * H;
      const scalar_t* prev_cells = a.cells + step.prev_t * B * H;
      scalar_t* grad_gates = a.grad_gates + step.t * B * 4 * H;
      if (u1 > u0) {
        for (int64_t b = 0; b < step.live; ++b) {
          if (a.grad_output != nullptr) {
            at::vec::map2<scalar_t>([](V x, V y) { return x + y; }, a.grad_h + b * H + u0,
                                    a.grad_h + b * H + u0,
                                    a.grad_output + (step.t * B + b) * H + u0, u1 - u0);
          }
          const CellBackwardRow<scalar_t> row{
              gates + b * 4 * H, cells + b * H, (b < step.carried ? prev_cells : a.c0) + b * H,
              a.grad_h + b * H, a.grad_c + b * H, grad_gates + b * 4 * H};
          cell_backward<scalar_t>(row, H, u0, u1);
        }
        for (int64_t q = 0; q < 4; ++q) {
          zero_rows(grad_gates, 4 * H, step.live, B, q * H + u0, u1 - u0);
        }
      }
      barrier();  // every unit's gate gradients are in before they are multiplied
      if (u1 > u0) {
        multiply_panels<scalar_t, false>(
            step.live, 4 * H, panels, [&](int64_t b) { return grad_gates + b * 4 * H; },
            [&](int64_t b) { return a.grad_h + b * H; });
      }
    }
  });
}

template <typename scalar_t>
CpuKernels<scalar_t> make_cpu_kernels() {
  return {&cell_forward<scalar_t>,      &cell_backward<scalar_t>,
          &cell_hidden<scalar_t>,       &recurrent_forward<scalar_t>,
          &recurrent_backward<scalar_t>, &recurrent_workspace_size<scalar_t>};
}

}  // namespace fused_lstm::cpu::CPU_CAPABILITY
