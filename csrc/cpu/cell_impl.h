// Vectorized bodies of the kernels declared in cell.h. Included by one .cpp per CPU
// capability, each of which defines CPU_CAPABILITY (and the matching CPU_CAPABILITY_*
// macro) first, so that at::vec::Vectorized is that capability's.
#pragma once

#include "cell.h"

#include <ATen/cpu/vec/vec.h>

namespace fused_lstm::cpu::CPU_CAPABILITY {

template <typename scalar_t>
using Vec = at::vec::Vectorized<scalar_t>;

template <typename scalar_t>
inline Vec<scalar_t> sigmoid(const Vec<scalar_t>& x) {
  // exp(-x) overflows to inf for very negative x, giving 1 / inf = 0; NaN stays NaN.
  return (Vec<scalar_t>(scalar_t(1)) + x.neg().exp()).reciprocal();
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
    const V cand = V::loadu(g + 2 * H + j, n).tanh();
    const V o = sigmoid<scalar_t>(V::loadu(g + 3 * H + j, n));
    const V c = f * V::loadu(row.c_prev + j, n) + i * cand;
    const V h = o * c.tanh();
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
    const V tanh_c = V::loadu(row.c + j, n).tanh();
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
    (V::loadu(gates + 3 * H + j, n) * V::loadu(c + j, n).tanh()).store(h + j, n);
  });
}

template <typename scalar_t>
CellKernels<scalar_t> make_cell_kernels() {
  return {&cell_forward<scalar_t>, &cell_backward<scalar_t>, &cell_hidden<scalar_t>};
}

}  // namespace fused_lstm::cpu::CPU_CAPABILITY
