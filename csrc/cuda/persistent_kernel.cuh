// The persistent kernel itself (its block program is in persistent_program.cuh): one block
// of kPersistentThreads threads per (unit block, row group), the block's weight slices in
// dynamic shared memory for the whole launch, cooperative_groups' grid barrier between
// time steps. Included only by persistent_<dtype>.cu, each of which instantiates it for
// one dtype, so that the dtypes compile in parallel.
#pragma once

#include "on_gpu.cuh"

#include <cooperative_groups.h>

FUSED_LSTM_DEVICE_CODE_BEGIN

namespace fused_lstm::cuda {

// The grid of a cooperative launch as the block programs see it: each block runs its own
// programs, and sync() is the grid-wide barrier. grid_group::sync() makes the writes
// before it visible to the reads after it across the grid (it fences as well as waits).
template <typename Thread>
struct GpuGrid {
  unsigned char* shared;
  template <typename F>
  __device__ void for_each_block(const F& f) {
    ThisThread<Thread> block;
    f(block, shared, static_cast<int64_t>(blockIdx.x), static_cast<int64_t>(blockIdx.y));
  }
  __device__ void sync() { cooperative_groups::this_grid().sync(); }
};

// One block per SM at most of the block's registers: each block holds a large slice of
// shared memory, so registers are not what limits occupancy.
template <typename Program>
__global__ void __launch_bounds__(kPersistentThreads, 1)
    persistent_kernel(const typename Program::Sequence seq, const PersistentPlan plan) {
  extern __shared__ __align__(16) unsigned char shared[];
  GpuGrid<typename Program::Thread> grid{shared};
  run_persistent<Program>(grid, seq, plan);
}

template <typename Program>
const void* PersistentKernel<Program>::function() {
  return reinterpret_cast<const void*>(&persistent_kernel<Program>);
}

template <typename Program>
cudaError_t PersistentKernel<Program>::launch(const typename Program::Sequence& seq,
                                              const PersistentPlan& plan, cudaStream_t stream) {
  auto seq_arg = seq;
  auto plan_arg = plan;
  void* args[] = {&seq_arg, &plan_arg};
  const dim3 grid(static_cast<unsigned>(plan.unit_blocks), static_cast<unsigned>(plan.row_groups));
  return cudaLaunchCooperativeKernel(function(), grid, dim3(kPersistentThreads), args,
                                     static_cast<size_t>(plan.shared_bytes), stream);
}

// The forward and backward persistent kernels of one dtype.
#define FUSED_LSTM_PERSISTENT_KERNELS(scalar_t, acc_t)                                   \
  template struct PersistentKernel<PersistentProgram<ForwardSequence<scalar_t, acc_t>>>; \
  template struct PersistentKernel<PersistentProgram<BackwardSequence<scalar_t, acc_t>>>;

}  // namespace fused_lstm::cuda

FUSED_LSTM_DEVICE_CODE_END
