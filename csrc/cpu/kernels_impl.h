// Bodies of the kernels declared in kernels.h. Included by one .cpp per CPU capability,
// each of which defines CPU_CAPABILITY (and CPU_CAPABILITY_AVX2 or CPU_CAPABILITY_AVX512)
// and is compiled with that capability's instruction set.
//
// The kernels are written with the compiler's vector types (64 bytes in the AVX-512
// build, 32 in the others: 16 or 8 floats) rather than at::vec::Vectorized, so that the
// small-matrix kernel keeps its accumulators in registers and the activations inline: the
// float exp below is a few instructions where a library call costs many more.
#pragma once

#include "../steps.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace fused_lstm::cpu::CPU_CAPABILITY {

#if defined(CPU_CAPABILITY_AVX512)
constexpr int kVectorBytes = 64;
#else
constexpr int kVectorBytes = 32;
#endif

template <typename scalar_t>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float type __attribute__((vector_size(kVectorBytes)));
  typedef int32_t mask __attribute__((vector_size(kVectorBytes)));
};
template <>
struct Lanes<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
  typedef int64_t mask __attribute__((vector_size(kVectorBytes)));
};
template <typename scalar_t>
using lanes_t = typename Lanes<scalar_t>::type;
template <typename scalar_t>
using mask_t = typename Lanes<scalar_t>::mask;
template <typename scalar_t>
constexpr int64_t kLanes = sizeof(lanes_t<scalar_t>) / sizeof(scalar_t);

template <typename scalar_t>
inline lanes_t<scalar_t> broadcast(scalar_t x) {
  return x - lanes_t<scalar_t>{};  // x - 0 is x, signed zeros included
}

// a where the mask is set, b elsewhere
template <typename scalar_t>
inline lanes_t<scalar_t> select(mask_t<scalar_t> m, lanes_t<scalar_t> a, lanes_t<scalar_t> b) {
  return (lanes_t<scalar_t>)((m & (mask_t<scalar_t>)a) | (~m & (mask_t<scalar_t>)b));
}

inline lanes_t<float> fmadd(lanes_t<float> a, lanes_t<float> b, lanes_t<float> c) {
#if defined(CPU_CAPABILITY_AVX512)
  return (lanes_t<float>)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(CPU_CAPABILITY_AVX2)
  return (lanes_t<float>)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}
inline lanes_t<double> fmadd(lanes_t<double> a, lanes_t<double> b, lanes_t<double> c) {
#if defined(CPU_CAPABILITY_AVX512)
  return (lanes_t<double>)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#elif defined(CPU_CAPABILITY_AVX2)
  return (lanes_t<double>)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
  return a * b + c;
#endif
}

// The first `count` values from p (zeros after them).
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

// exp for float to about one unit in the last place: exp(x) = 2^n exp(r) with
// n = round(x / ln 2) and r = x - n ln 2 (ln 2 in two parts, so r is exact), and exp(r)
// by its Taylor series to r^7 (|r| <= ln(2)/2: truncation below 1e-8 relative).
// Its argument is clamped to [-87, 88] so that 2^n stays a normal float: below -87 it
// returns exp(-87) ~ 1.6e-38 instead of denormals or zero, and on (88, ln(FLT_MAX)] it
// returns exp(88); the kernels only use it where the result is added to 1 (sigmoid, and
// tanh's exp(-2|x|) <= 1), which makes both invisible. NaN stays NaN; above ln(FLT_MAX)
// it is inf.
inline lanes_t<float> exp(lanes_t<float> x) {
  using F = lanes_t<float>;
  const F clamped = select<float>(x < broadcast(-87.0f), broadcast(-87.0f),
                                  select<float>(x > broadcast(88.0f), broadcast(88.0f), x));
  const F shifter = broadcast(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const F n = (clamped * 1.44269504088896341f + shifter) - shifter;
  const F r = (clamped - n * 0.693359375f) - n * -2.12194440e-4f;
  F p = broadcast(1.0f / 5040);
  p = fmadd(p, r, broadcast(1.0f / 720));
  p = fmadd(p, r, broadcast(1.0f / 120));
  p = fmadd(p, r, broadcast(1.0f / 24));
  p = fmadd(p, r, broadcast(1.0f / 6));
  p = fmadd(p, r, broadcast(0.5f));
  p = fmadd(p, r, broadcast(1.0f));
  p = fmadd(p, r, broadcast(1.0f));
  const mask_t<float> two_to_n = (__builtin_convertvector(n, mask_t<float>) + 127) << 23;
  return select<float>(x > broadcast(88.72283935546875f),
                       broadcast(std::numeric_limits<float>::infinity()), p * (F)two_to_n);
}

// float64 (for gradcheck; speed is not its point): the library's functions, lane by lane.
inline lanes_t<double> exp(lanes_t<double> x) {
  for (int i = 0; i < kLanes<double>; ++i) x[i] = std::exp(x[i]);
  return x;
}

template <typename scalar_t>
inline lanes_t<scalar_t> sigmoid(lanes_t<scalar_t> x) {
  // exp(-x) is inf for very negative x, giving 1 / inf = 0; NaN stays NaN.
  return scalar_t(1) / (scalar_t(1) + exp(-x));
}

// tanh for float to within a few units in the last place: (1 - t) / (1 + t) with
// t = exp(-2|x|) where that loses little to cancellation, and tanh's odd Taylor series
// (to x^11: error below 1e-9 relative) for |x| < 0.3. NaN and infinities come out as
// tanh's.
inline lanes_t<float> tanh(lanes_t<float> x) {
  using F = lanes_t<float>;
  const mask_t<float> sign = (mask_t<float>)x & (mask_t<float>)broadcast(-0.0f);
  const F magnitude = (F)((mask_t<float>)x ^ sign);
  const F t = exp(magnitude * -2.0f);
  const F far = (1.0f - t) / (1.0f + t);
  const F x2 = x * x;
  F series = broadcast(-1382.0f / 155925.0f);
  series = fmadd(series, x2, broadcast(62.0f / 2835.0f));
  series = fmadd(series, x2, broadcast(-17.0f / 315.0f));
  series = fmadd(series, x2, broadcast(2.0f / 15.0f));
  series = fmadd(series, x2, broadcast(-1.0f / 3.0f));
  series = fmadd(series * x2, magnitude, magnitude);
  const F result = select<float>(magnitude < broadcast(0.3f), series, far);
  return (F)((mask_t<float>)result | sign);  // tanh is odd
}

inline lanes_t<double> tanh(lanes_t<double> x) {
  for (int i = 0; i < kLanes<double>; ++i) x[i] = std::tanh(x[i]);
  return x;
}

// Runs body(j, count) over [j0, j1) in pieces of one vector; the last may be partial.
template <typename scalar_t, typename F>
inline void for_each_vector(int64_t j0, int64_t j1, const F& body) {
  constexpr int64_t width = kLanes<scalar_t>;
  int64_t j = j0;
  for (; j + width <= j1; j += width) body(j, width);
  if (j < j1) body(j, j1 - j);
}

template <typename scalar_t>
void cell_forward(const CellForwardRow<scalar_t>& row, int64_t H, int64_t j0, int64_t j1) {
  for_each_vector<scalar_t>(j0, j1, [&](int64_t j, int64_t n) {
    scalar_t* g = row.gates;
    const auto i = sigmoid<scalar_t>(load_lanes(g + j, n));
    const auto f = sigmoid<scalar_t>(load_lanes(g + H + j, n));
    const auto cand = tanh(load_lanes(g + 2 * H + j, n));
    const auto o = sigmoid<scalar_t>(load_lanes(g + 3 * H + j, n));
    const auto c = f * load_lanes(row.c_prev + j, n) + i * cand;
    store_lanes(i, g + j, n);
    store_lanes(f, g + H + j, n);
    store_lanes(cand, g + 2 * H + j, n);
    store_lanes(o, g + 3 * H + j, n);
    store_lanes(c, row.c + j, n);
    store_lanes(o * tanh(c), row.h + j, n);
  });
}

// The sum of a vector's lanes.
template <typename scalar_t>
inline scalar_t sum_lanes(lanes_t<scalar_t> v) {
  scalar_t sum = 0;
  for (int64_t i = 0; i < kLanes<scalar_t>; ++i) sum += v[i];
  return sum;
}

// gates[q·H + j] += w[q·H + j] · v for the four gates q and the units [j0, j1): one row's
// products with w as nn.LSTM stores it ([4H, K], no packing), four weight rows at a time,
// each a dot product of contiguous values (a partial sum per lane).
template <typename scalar_t>
void gate_products(const scalar_t* w, int64_t K, const scalar_t* v, scalar_t* gates, int64_t H,
                   int64_t j0, int64_t j1) {
  using V = lanes_t<scalar_t>;
  for (int64_t q = 0; q < 4; ++q) {
    int64_t r = q * H + j0;
    const int64_t end = q * H + j1;
    for (; r + 4 <= end; r += 4) {
      const scalar_t* w0 = w + r * K;
      V a0{}, a1{}, a2{}, a3{};
      const auto four = [&](int64_t k, int64_t n) {
        const V x = load_lanes(v + k, n);
        a0 = fmadd(load_lanes(w0 + k, n), x, a0);
        a1 = fmadd(load_lanes(w0 + K + k, n), x, a1);
        a2 = fmadd(load_lanes(w0 + 2 * K + k, n), x, a2);
        a3 = fmadd(load_lanes(w0 + 3 * K + k, n), x, a3);
      };
      // Whole vectors, then the tail: with the count a constant the loads are plain
      // (a count tested at every load made the loop 6 instructions per multiply-add,
      // twice the cost of reading the weights at T = 1, B = 1, H = 256).
      for_each_vector<scalar_t>(0, K, four);
      gates[r] += sum_lanes<scalar_t>(a0);
      gates[r + 1] += sum_lanes<scalar_t>(a1);
      gates[r + 2] += sum_lanes<scalar_t>(a2);
      gates[r + 3] += sum_lanes<scalar_t>(a3);
    }
    for (; r < end; ++r) {
      V a{};
      for_each_vector<scalar_t>(0, K, [&](int64_t k, int64_t n) {
        a = fmadd(load_lanes(w + r * K + k, n), load_lanes(v + k, n), a);
      });
      gates[r] += sum_lanes<scalar_t>(a);
    }
  }
}

template <typename scalar_t>
void cell_backward(const CellBackwardRow<scalar_t>& row, int64_t H, int64_t j0, int64_t j1) {
  for_each_vector<scalar_t>(j0, j1, [&](int64_t j, int64_t n) {
    const scalar_t* g = row.gates;
    const auto i = load_lanes(g + j, n);
    const auto f = load_lanes(g + H + j, n);
    const auto cand = load_lanes(g + 2 * H + j, n);
    const auto o = load_lanes(g + 3 * H + j, n);
    const auto tanh_c = tanh(load_lanes(row.c + j, n));
    const auto grad_h = load_lanes(row.grad_h + j, n);
    // c_t feeds h_t (through o * tanh) and c_{t+1} (whose gradient grad_c brings).
    const auto grad_c = load_lanes(row.grad_c + j, n) + grad_h * o * (scalar_t(1) - tanh_c * tanh_c);
    scalar_t* dg = row.grad_gates;
    store_lanes(grad_c * cand * i * (scalar_t(1) - i), dg + j, n);
    store_lanes(grad_c * load_lanes(row.c_prev + j, n) * f * (scalar_t(1) - f), dg + H + j, n);
    store_lanes(grad_c * i * (scalar_t(1) - cand * cand), dg + 2 * H + j, n);
    store_lanes(grad_h * tanh_c * o * (scalar_t(1) - o), dg + 3 * H + j, n);
    store_lanes(grad_c * f, row.grad_c + j, n);
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

template <typename scalar_t>
constexpr int64_t kPanel = 2 * kLanes<scalar_t>;

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
  // The products are summed from zero and C is added once at the end, as a library GEMM
  // with beta = 1 does: summed onto C (the gates' x·w_ihᵀ + bias, often larger than each
  // product), every one of the K additions would round at C's size, and over the steps the
  // float32 state drifted to 3x nn.LSTM's error.
  L acc[MR][NP][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) acc[r][p][0] = acc[r][p][1] = L{};
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
      if constexpr (kAccumulate) {
        acc[r][p][0] += load_lanes(row, panels[p].count);
        acc[r][p][1] += load_lanes(row + W, panels[p].count - W);
      }
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

// C[rows, panels] (+)= A[rows, K] * B[K, panels] as one running sum per value (multiply_panels
// calls it per block of the depth).
template <typename scalar_t, bool kAccumulate, typename RowA, typename RowC>
void multiply_panels_to_depth(int64_t rows, int64_t K, const std::vector<Panel<scalar_t>>& panels,
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

// Depth of one block of the sum: C is summed block by block, each block's products from
// zero (multiply_tile), as library GEMMs block their K. A single running sum over the whole
// depth (4H in the backward) rounds every addition at the size of the sum so far: the
// gradient of h0 came out 2-2.4x nn.LSTM's error at H = 512 (float32), 1.0x blocked.
constexpr int64_t kDepthBlock = 256;

// C[rows, panels] (+)= A[rows, K] * B[K, panels], rows given by row_a(r) and row_c(r).
template <typename scalar_t, bool kAccumulate, typename RowA, typename RowC>
void multiply_panels(int64_t rows, int64_t K, const std::vector<Panel<scalar_t>>& panels,
                     const RowA& row_a, const RowC& row_c) {
  std::vector<Panel<scalar_t>> block = panels;
  for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += kDepthBlock) {
    const int64_t depth = std::min(kDepthBlock, K - k0);
    for (size_t p = 0; p < panels.size(); ++p) block[p].b = panels[p].b + k0 * kPanel<scalar_t>;
    const auto row_a_block = [&](int64_t r) { return row_a(r) + k0; };
    if (k0 == 0) {
      multiply_panels_to_depth<scalar_t, kAccumulate>(rows, depth, block, row_a_block, row_c);
    } else {
      multiply_panels_to_depth<scalar_t, true>(rows, depth, block, row_a_block, row_c);
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
    const int64_t u0 = std::min(H, first * PW), u1 = std::min(H, end * PW), units = u1 - u0;
    // w_hh gate by gate, each thread packing its own units. For our kernel in panels of
    // PW units: value (k, x) of panel (q, j) is w_hh[q*H + j*PW + x][k]. For the
    // library's, gate q as one [H, H] matrix: value (k, u) is w_hh[q*H + u][k]. Neither
    // layout depends on how the units are split, so a later call may reuse it.
    std::vector<Panel<scalar_t>> panels;
    for (int64_t q = 0; q < 4; ++q) {
      if (a.library_product) {
        scalar_t* packed = a.workspace + q * H * H;
        for (int64_t k = 0; a.pack && k < H; ++k) {
          for (int64_t u = u0; u < u1; ++u) packed[k * H + u] = a.w_hh[(q * H + u) * H + k];
        }
        continue;
      }
      for (int64_t j = first; j < end; ++j) {
        scalar_t* packed = a.workspace + (q * gate_panels + j) * H * PW;
        const int64_t count = std::min(PW, H - j * PW);
        for (int64_t k = 0; a.pack && k < H; ++k) {
          for (int64_t x = 0; x < PW; ++x) {
            packed[k * PW + x] = x < count ? a.w_hh[(q * H + j * PW + x) * H + k] : scalar_t(0);
          }
        }
        panels.push_back({packed, q * H + j * PW, count});
      }
    }
    for (int64_t s = 0; s < T; ++s) {
      const StepRows step = step_rows(s, T, a.reverse, a.live, B);
      scalar_t* gates = a.gates + step.t * B * 4 * H;
      scalar_t* cells = a.cells + step.t * B * H;
      scalar_t* output = a.output + step.t * B * H;
      const scalar_t* prev_output = a.output + step.t_prev * B * H;
      const scalar_t* prev_cells = a.cells + step.t_prev * B * H;
      if (units > 0) {
        if (a.library_product) {
          // Rows carried over read the previous step's h, the others h0.
          for (int64_t q = 0; q < 4; ++q) {
            const scalar_t* packed = a.workspace + q * H * H + u0;
            scalar_t* c = gates + q * H + u0;
            library_product(step.carried, units, H, prev_output, H, packed, H, c, 4 * H, true);
            library_product(step.rows - step.carried, units, H, a.h0 + step.carried * H, H, packed,
                            H, c + step.carried * 4 * H, 4 * H, true);
          }
        } else {
          multiply_panels<scalar_t, true>(
              step.rows, H, panels,
              [&](int64_t b) { return (b < step.carried ? prev_output : a.h0) + b * H; },
              [&](int64_t b) { return gates + b * 4 * H; });
        }
        for (int64_t b = 0; b < step.rows; ++b) {
          const CellForwardRow<scalar_t> row{gates + b * 4 * H,
                                             (b < step.carried ? prev_cells : a.c0) + b * H,
                                             cells + b * H, output + b * H};
          cell_forward<scalar_t>(row, H, u0, u1);
        }
        for (int64_t q = 0; q < 4; ++q) zero_rows(gates, 4 * H, step.rows, B, q * H + u0, units);
        zero_rows(cells, H, step.rows, B, u0, units);
        zero_rows(output, H, step.rows, B, u0, units);
      }
      barrier();  // this step's h is complete before any thread multiplies it
    }
  });
}

template <typename scalar_t>
void recurrent_backward(const RecurrentBackward<scalar_t>& a) {
  const int64_t T = a.seq_len, B = a.batch, H = a.hidden, PW = kPanel<scalar_t>;
  for_each_thread_slice<scalar_t>(H, [&](int64_t first, int64_t end, const auto& barrier) {
    // Columns of w_hh in panels of PW: value (k, x) of panel j is w_hh[k][j*PW + x], so
    // that this thread computes the gradient of h_{t-1} for its own units.
    // The library's kernel reads this thread's columns of w_hh in place.
    std::vector<Panel<scalar_t>> panels;
    for (int64_t j = first; j < end && !a.library_product; ++j) {
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
      const StepRows step = step_rows(s, T, a.reverse, a.live, B);
      const scalar_t* gates = a.gates + step.t * B * 4 * H;
      const scalar_t* cells = a.cells + step.t * B * H;
      const scalar_t* prev_cells = a.cells + step.t_prev * B * H;
      scalar_t* grad_gates = a.grad_gates + step.t * B * 4 * H;
      if (u1 > u0) {
        for (int64_t b = 0; b < step.rows; ++b) {
          if (a.grad_output != nullptr) {
            scalar_t* grad_h = a.grad_h + b * H;
            const scalar_t* grad_out = a.grad_output + (step.t * B + b) * H;
            for (int64_t u = u0; u < u1; ++u) grad_h[u] += grad_out[u];
          }
          const CellBackwardRow<scalar_t> row{
              gates + b * 4 * H, cells + b * H, (b < step.carried ? prev_cells : a.c0) + b * H,
              a.grad_h + b * H, a.grad_c + b * H, grad_gates + b * 4 * H};
          cell_backward<scalar_t>(row, H, u0, u1);
        }
        for (int64_t q = 0; q < 4; ++q) {
          zero_rows(grad_gates, 4 * H, step.rows, B, q * H + u0, u1 - u0);
        }
      }
      barrier();  // every unit's gate gradients are in before they are multiplied
      if (u1 > u0 && a.library_product) {
        // In blocks of the depth 4H, as multiply_panels sums (kDepthBlock).
        for (int64_t k0 = 0; k0 < 4 * H; k0 += kDepthBlock) {
          library_product(step.rows, u1 - u0, std::min(kDepthBlock, 4 * H - k0), grad_gates + k0,
                          4 * H, a.w_hh + k0 * H + u0, H, a.grad_h + u0, H, k0 > 0);
        }
      } else if (u1 > u0) {
        multiply_panels<scalar_t, false>(
            step.rows, 4 * H, panels, [&](int64_t b) { return grad_gates + b * 4 * H; },
            [&](int64_t b) { return a.grad_h + b * H; });
      }
    }
  });
}

template <typename scalar_t>
CpuKernels<scalar_t> make_cpu_kernels() {
  return {&cell_forward<scalar_t>, &cell_backward<scalar_t>, &gate_products<scalar_t>,
          &recurrent_forward<scalar_t>, &recurrent_backward<scalar_t>,
          &recurrent_workspace_size<scalar_t>};
}

}  // namespace fused_lstm::cpu::CPU_CAPABILITY
