// Which rows do what at each step of one layer (lstm.h: with batch_sizes, row b is live
// at time t while b < batch_sizes[t]; with reverse, steps run from T-1 down to 0): the
// bookkeeping of every kernel, written once for the CPU (cpu/), the GPU (cuda/) and the
// tests' emulator of the GPU on the host (tests/emulator). Small functions over a
// table of live rows per time index, for the host and the device; no ATen here.
//
// A step is s, in processing order; its time index is t = time_of(s). At step s the live
// rows [0, rows) run the cell; rows [0, carried) start from step s-1's state and
// [carried, rows) from h0, c0 (in reverse, rows start later as their sequences are
// shorter); rows [rows_next, rows) end here: their h_n, c_n are step s's.
//
// The functions are static: each translation unit keeps its own copy, so that a copy
// compiled with AVX-512 (cpu/kernels_avx512.cpp) is never the one that another, compiled
// for any CPU, calls.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FUSED_LSTM_HOST_DEVICE __host__ __device__
#else
#define FUSED_LSTM_HOST_DEVICE
#endif

namespace fused_lstm {

// The time index of processing step s.
FUSED_LSTM_HOST_DEVICE static inline int64_t time_of(int64_t s, int64_t T, bool reverse) {
  return reverse ? T - 1 - s : s;
}

// Which rows do what at processing step s (see the top of this file).
struct StepRows {
  int64_t t;          // the time index of step s
  int64_t t_prev;     // the time index of step s-1 (t itself at s = 0)
  int64_t rows;       // rows live at step s: b < rows
  int64_t carried;    // rows whose previous state is step s-1's; the others start from h0, c0
  int64_t rows_next;  // rows live at step s+1 (0 at the last step): the others end at step s
};

// The rows live at processing step s. `live` holds the live rows of each time index (from
// batch_sizes); null means all `batch` rows at every step.
FUSED_LSTM_HOST_DEVICE static inline int64_t live_rows_at(int64_t s, int64_t T, bool reverse,
                                                          const int64_t* live, int64_t batch) {
  return live ? live[time_of(s, T, reverse)] : batch;
}

// The rows of processing step s, with `live` as above. (No std::min: it is a __host__
// function.)
FUSED_LSTM_HOST_DEVICE static inline StepRows step_rows(int64_t s, int64_t T, bool reverse,
                                                        const int64_t* live, int64_t batch) {
  const int64_t rows = live_rows_at(s, T, reverse, live, batch);
  const int64_t rows_prev = s > 0 ? live_rows_at(s - 1, T, reverse, live, batch) : 0;
  return {time_of(s, T, reverse), time_of(s > 0 ? s - 1 : s, T, reverse), rows,
          rows < rows_prev ? rows : rows_prev,
          s + 1 < T ? live_rows_at(s + 1, T, reverse, live, batch) : 0};
}

// How many rows end at the step: [r.rows_next, r.rows_next + ending_rows(r)).
FUSED_LSTM_HOST_DEVICE static inline int64_t ending_rows(const StepRows& r) {
  return r.rows > r.rows_next ? r.rows - r.rows_next : 0;
}

}  // namespace fused_lstm
