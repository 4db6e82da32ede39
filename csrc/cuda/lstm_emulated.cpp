// The CUDA op with its step kernels emulated on the host, for the tests of a machine
// without a GPU: the same host code (lstm_layer.h) and the same block programs
// (lstm_kernels.cuh) as lstm_cuda.cu, with every block of a launch run in turn and every
// thread of a block run in turn through each phase between two barriers. Indexing,
// tiling, masking of dead rows and the order of steps are all exercised; what is left
// for a GPU is scheduling, the barriers themselves and speed.
//
// torch.ops.fused_lstm._emulated_cuda_forward / _emulated_cuda_backward take the
// arguments of forward / backward, on CPU tensors. Test-only.
#include "lstm_layer.h"

#include <torch/library.h>

#include <cstring>
#include <vector>

namespace fused_lstm::cuda {
namespace {

template <typename Thread>
struct EmulatedBlock {
  std::vector<Thread> threads;
  template <typename F>
  void for_each_thread(const F& f) {
    for (int tid = 0; tid < static_cast<int>(threads.size()); ++tid) f(tid, threads[tid]);
  }
  void sync() {}
};

struct OnHost {
  template <typename Program, typename Tile, typename Step>
  static void run(const Step& step, int64_t row_blocks, int64_t unit_blocks) {
    for (int64_t x = 0; x < row_blocks; ++x) {
      for (int64_t y = 0; y < unit_blocks; ++y) {
        // Garbage (NaN for floating point) where a program reads what it did not write.
        typename Program::Shared shared;
        std::memset(&shared, 0xff, sizeof(shared));
        EmulatedBlock<typename Program::Thread> block{
            std::vector<typename Program::Thread>(Tile::kThreads)};
        for (auto& thread : block.threads) std::memset(&thread, 0xff, sizeof(thread));
        run_block<Program, Tile>(block, shared, step, x * Tile::kRows, y * Tile::kUnits);
      }
    }
  }
};

ForwardResult emulated_forward(const at::Tensor& input, const at::Tensor& h0,
                               const at::Tensor& c0, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& w_hr,
                               const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  return forward<OnHost>(input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse);
}

BackwardResult emulated_backward(const std::optional<at::Tensor>& grad_output,
                                 const std::optional<at::Tensor>& grad_h_n,
                                 const std::optional<at::Tensor>& grad_c_n,
                                 const at::Tensor& input, const at::Tensor& h0,
                                 const at::Tensor& c0, const at::Tensor& w_ih,
                                 const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                                 const std::optional<at::Tensor>& batch_sizes, bool reverse,
                                 const at::Tensor& output, const at::Tensor& gates,
                                 const at::Tensor& cells) {
  return backward<OnHost>(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr,
                          batch_sizes, reverse, output, gates, cells);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_lstm, m) {
  m.def("_emulated_cuda_forward", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(emulated_forward)));
  m.def("_emulated_cuda_backward", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(emulated_backward)));
}

}  // namespace fused_lstm::cuda
