// The GPU side of the block programs (lstm_kernels.cuh, persistent_program.cuh): one
// thread's view of its block, the tensor-core instruction, and the declaration of the
// persistent kernels, which are compiled one dtype per file (persistent_<dtype>.cu).
#pragma once

#include "persistent_program.cuh"

#include <cuda_runtime.h>

FUSED_LSTM_DEVICE_CODE_BEGIN

namespace fused_lstm::cuda {

// D += A·B on tensor cores for one 16 × 8 × 16 tile of a warp, in the registers laid
// out as MmaLayout says; the whole warp executes it together.
template <typename scalar_t>
__device__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ inline void mma_m16n8k16<c10::BFloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                   const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // the host never plans tensor cores below compute capability 8.0
#endif
}

template <>
__device__ inline void mma_m16n8k16<c10::Half>(float (&d)[4], const uint32_t (&a)[4],
                                               const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

// The block-program interface for one GPU thread: a phase runs for this thread only,
// the barrier between phases is the block's, and a warp's tensor-core tile runs on this
// lane's registers (every lane of the warp reaches it together).
template <typename Thread>
struct ThisThread {
  Thread state;
  template <typename F>
  __device__ void for_each_thread(const F& f) { f(static_cast<int>(threadIdx.x), state); }
  __device__ void sync() { __syncthreads(); }
  template <typename scalar_t>
  __device__ void warp_mma() {
    for (int half = 0; half < 2; ++half) {
      mma_m16n8k16<scalar_t>(state.acc[half], state.a, state.b[half]);
    }
  }
};

// The persistent kernel of one PersistentProgram: its function (for occupancy queries and
// attributes) and a cooperative launch of it on `stream` with `plan`'s geometry, which
// returns the runtime's answer unchecked: the caller may take the step kernels instead
// where the launch is refused.
// Defined in persistent_kernel.cuh, instantiated per dtype in persistent_<dtype>.cu.
template <typename Program>
struct PersistentKernel {
  static const void* function();
  static cudaError_t launch(const typename Program::Sequence& seq, const PersistentPlan& plan,
                            cudaStream_t stream);
};

}  // namespace fused_lstm::cuda

FUSED_LSTM_DEVICE_CODE_END
