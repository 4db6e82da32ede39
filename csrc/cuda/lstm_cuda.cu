// CUDA kernels of the fused_lstm ops (schemas and semantics in ops.cpp and lstm.h):
// stage A of DESIGN.md. The host side (lstm_layer.h) runs the input projection as one
// cuBLAS GEMM through ATen, then one launch per time step of the block programs of
// lstm_kernels.cuh: block (x, y) owns a tile of batch rows and hidden units, computes the
// four gate rows of its units (h_{t-1}·w_hhᵀ) and the cell update in registers; the
// backward mirrors it in reverse time (the gradient of h through w_hh, then the cell's
// gradient), with the weight gradients as GEMMs after the loop.
//
// Device guard, the current stream, tensors from the caching allocator, a launch check
// after every launch, no host synchronisation (so CUDA graphs capture it).
#include "lstm_layer.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

namespace fused_lstm::cuda {
namespace {

// The block-program interface for one GPU thread: a phase runs for this thread only,
// and the barrier between phases is the block's.
template <typename Thread>
struct ThisThread {
  Thread state;
  template <typename F>
  __device__ void for_each_thread(const F& f) { f(static_cast<int>(threadIdx.x), state); }
  __device__ void sync() { __syncthreads(); }
};

template <typename Program, typename Tile, typename Step>
__global__ void __launch_bounds__(Tile::kThreads) step_kernel(const Step step) {
  __shared__ typename Program::Shared shared;
  ThisThread<typename Program::Thread> block;
  run_block<Program, Tile>(block, shared, step, static_cast<int64_t>(blockIdx.x) * Tile::kRows,
                           static_cast<int64_t>(blockIdx.y) * Tile::kUnits);
}

// Launches one step's grid on the current stream.
struct OnGpu {
  template <typename Program, typename Tile, typename Step>
  static void run(const Step& step, int64_t row_blocks, int64_t unit_blocks) {
    TORCH_CHECK(unit_blocks <= 65535, "fused_lstm: hidden_size ", step.hidden_size,
                " is too large for the CUDA kernels (at most ", 65535 * Tile::kUnits, ")");
    TORCH_CHECK(row_blocks <= std::numeric_limits<int32_t>::max(), "fused_lstm: batch ",
                step.batch, " is too large for the CUDA kernels");
    const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(unit_blocks));
    step_kernel<Program, Tile><<<grid, Tile::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(step);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

ForwardResult forward_cuda(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                           const at::Tensor& w_ih, const at::Tensor& w_hh,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& w_hr,
                           const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  return forward<OnGpu>(input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse);
}

BackwardResult backward_cuda(const std::optional<at::Tensor>& grad_output,
                             const std::optional<at::Tensor>& grad_h_n,
                             const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
                             const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                             const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                             const std::optional<at::Tensor>& batch_sizes, bool reverse,
                             const at::Tensor& output, const at::Tensor& gates,
                             const at::Tensor& cells) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  return backward<OnGpu>(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh,
                  w_hr, batch_sizes, reverse, output, gates, cells);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, CUDA, m) {
  m.impl("forward", &forward_cuda);
  m.impl("backward", &backward_cuda);
}

}  // namespace fused_lstm::cuda
