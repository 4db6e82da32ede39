// The CUDA op with its kernels emulated on the host, for the tests of a machine without a
// GPU: the same host code (lstm_layer.h) and the same block programs (lstm_kernels.cuh,
// persistent_program.cuh) as lstm_cuda.cu, with every block of a launch run in turn and
// every thread of a block run in turn through each phase between two barriers; a warp's
// tensor-core instruction is computed from its 32 lanes' registers, laid out as the PTX
// ISA lays them out. Indexing, tiling, masking of dead rows, the order of steps and the
// persistent kernel's geometry are all exercised; what is left for a GPU is scheduling,
// the barriers themselves, the mma instruction itself and speed.
//
// Test-only ops, on CPU tensors, with the arguments of forward / backward:
// - _emulated_cuda_forward / _emulated_cuda_backward: the step kernels;
// - _emulated_cuda_persistent_forward / _backward, plus the emulated device's SM count and
//   shared memory per block: the persistent kernel (an error where it does not fit; the
//   step kernels with a projection, as on the GPU);
// - _emulated_cuda_persistent_plan: the geometry the persistent kernel would have.
#include "lstm_layer.h"

#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace fused_lstm::cuda {
namespace {

// Garbage (NaN for floating point) where a program reads what it did not write.
constexpr unsigned char kPoison = 0xff;

template <typename Thread>
std::vector<Thread> poisoned_threads(int count) {
  std::vector<Thread> threads(count);
  std::memset(static_cast<void*>(threads.data()), kPoison, sizeof(Thread) * threads.size());
  return threads;
}

// The value of half e (0: the low 16 bits) of a register holding two scalar_t.
template <typename scalar_t>
float half_of(uint32_t reg, int e) {
  const auto bits = static_cast<uint16_t>(e == 0 ? reg & 0xffffu : reg >> 16);
  return static_cast<float>(scalar_t(bits, scalar_t::from_bits()));
}

// mma.sync.m16n8k16 (float accumulators) for one warp, twice: D[j] += A·B[j] from the
// registers of lanes[0..32) (MmaLayout). Products of 16-bit values are exact in float;
// the sums here run in order of k, where the tensor cores have their own order.
template <typename scalar_t>
void emulate_mma(MmaThread* lanes) {
  float a[16][16], b[2][16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const MmaThread& th = lanes[lane];
    for (int r = 0; r < 4; ++r) {
      for (int e = 0; e < 2; ++e) {
        a[MmaLayout::a_row(lane, r)][MmaLayout::a_col(lane, r) + e] = half_of<scalar_t>(th.a[r], e);
      }
    }
    for (int j = 0; j < 2; ++j) {
      for (int r = 0; r < 2; ++r) {
        for (int e = 0; e < 2; ++e) {
          const int k = MmaLayout::b_k(lane, r) + e;
          b[j][k][MmaLayout::b_n(lane)] = half_of<scalar_t>(th.b[j][r], e);
        }
      }
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    for (int j = 0; j < 2; ++j) {
      for (int r = 0; r < 4; ++r) {
        float& d = lanes[lane].acc[j][r];
        const int row = MmaLayout::d_row(lane, r), col = MmaLayout::d_col(lane, r);
        for (int k = 0; k < 16; ++k) d += a[row][k] * b[j][k][col];
      }
    }
  }
}

template <typename Thread>
struct EmulatedBlock {
  std::vector<Thread> threads;
  template <typename F>
  void for_each_thread(const F& f) {
    for (int tid = 0; tid < static_cast<int>(threads.size()); ++tid) f(tid, threads[tid]);
  }
  void sync() {}
  template <typename scalar_t>
  void warp_mma() {
    for (size_t lane0 = 0; lane0 < threads.size(); lane0 += 32) {
      emulate_mma<scalar_t>(&threads[lane0]);
    }
  }
};

// The persistent kernel's grid: every block in turn between two grid barriers, each with
// its own shared memory for the whole launch. The order of the blocks alternates from one
// barrier to the next, so that a block reading what another writes in the same step (a
// missing barrier on the GPU) changes the results.
template <typename Thread>
struct EmulatedGrid {
  const PersistentPlan& plan;
  std::vector<unsigned char> shared;
  int64_t barriers = 0;

  explicit EmulatedGrid(const PersistentPlan& p)
      : plan(p), shared(p.unit_blocks * p.row_groups * p.shared_bytes, kPoison) {}

  template <typename F>
  void for_each_block(const F& f) {
    const int64_t blocks = plan.unit_blocks * plan.row_groups;
    for (int64_t i = 0; i < blocks; ++i) {
      const int64_t index = barriers % 2 == 0 ? i : blocks - 1 - i;
      EmulatedBlock<Thread> block{poisoned_threads<Thread>(kPersistentThreads)};
      f(block, shared.data() + index * plan.shared_bytes, index % plan.unit_blocks,
        index / plan.unit_blocks);
    }
  }
  void sync() { ++barriers; }
};

// The step kernels: every block of a launch in turn.
struct OnHost {
  template <typename Tile, typename Step>
  static void run(const Step& step, int64_t row_blocks, int64_t unit_blocks) {
    using Program = StepBlock<Tile, Step>;
    for (int64_t x = 0; x < row_blocks; ++x) {
      for (int64_t y = 0; y < unit_blocks; ++y) {
        typename Program::Shared shared;
        std::memset(static_cast<void*>(&shared), kPoison, sizeof(shared));
        EmulatedBlock<typename Program::Thread> block{
            poisoned_threads<typename Program::Thread>(Tile::kThreads)};
        run_block<Tile>(block, shared, step, x * Tile::kRows, y * Tile::kUnits);
      }
    }
  }

  template <typename Sequence>
  bool persistent(const Sequence&, const std::vector<int64_t>&) const {
    return false;
  }
};

// A device with `multiprocessors` SMs, each with `max_shared_bytes` of shared memory for
// its blocks, which may each take all of it; at most 8 blocks of 256 threads per SM.
struct EmulatedDevice {
  int64_t multiprocessors, max_shared_bytes;

  std::optional<PersistentPlan> plan(const PersistentProblem& problem) const {
    return plan_persistent(problem, multiprocessors, max_shared_bytes, [&](int64_t shared_bytes) {
      return std::min<int64_t>(8, max_shared_bytes / shared_bytes);
    });
  }
};

// The persistent kernel on an emulated device, wherever the layer has no projection.
struct OnHostPersistent : OnHost {
  EmulatedDevice device;

  template <typename Sequence>
  bool persistent(const Sequence& seq, const std::vector<int64_t>&) const {
    using Program = PersistentProgram<Sequence>;
    const PersistentProblem problem = Program::problem(seq);
    const auto plan = device.plan(problem);
    if (!plan) {
      persistent_does_not_fit(problem, "the emulated device", device.multiprocessors,
                              device.max_shared_bytes);
    }
    EmulatedGrid<typename Program::Thread> grid(*plan);
    run_persistent<Program>(grid, seq, *plan);
    return true;
  }
};

ForwardResult emulated_forward(const at::Tensor& input, const at::Tensor& h0,
                               const at::Tensor& c0, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& w_hr,
                               const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  return forward(OnHost{}, input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse);
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
  return backward(OnHost{}, grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr,
                  batch_sizes, reverse, output, gates, cells);
}

EmulatedDevice emulated_device(int64_t multiprocessors, int64_t shared_memory) {
  TORCH_CHECK(multiprocessors > 0 && shared_memory > 0, "fused_lstm: the emulated device needs ",
              "at least one SM and some shared memory, got ", multiprocessors, " and ",
              shared_memory);
  return {multiprocessors, shared_memory};
}

ForwardResult emulated_persistent_forward(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes,
    bool reverse, int64_t multiprocessors, int64_t shared_memory) {
  const OnHostPersistent run{{}, emulated_device(multiprocessors, shared_memory)};
  return forward(run, input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse);
}

BackwardResult emulated_persistent_backward(
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes,
    bool reverse, const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells,
    int64_t multiprocessors, int64_t shared_memory) {
  const OnHostPersistent run{{}, emulated_device(multiprocessors, shared_memory)};
  return backward(run, grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr,
                  batch_sizes, reverse, output, gates, cells);
}

// [units, unit_blocks, row_groups, group_rows, m_tiles, n_tiles, splits, depth, chunk_depth,
//  shared_bytes] of the persistent kernel for a layer without a projection, or [] where it
// does not fit.
std::vector<int64_t> emulated_persistent_plan(int64_t hidden_size, int64_t batch,
                                              at::ScalarType dtype, bool backward,
                                              int64_t multiprocessors, int64_t shared_memory) {
  const EmulatedDevice device = emulated_device(multiprocessors, shared_memory);
  const auto acc = accumulate_type(dtype);
  const PersistentProblem problem{hidden_size, batch, backward ? 4 * hidden_size : hidden_size,
                                  backward ? 1 : 4, static_cast<int64_t>(c10::elementSize(dtype)),
                                  static_cast<int64_t>(c10::elementSize(acc)),
                                  dtype == at::kHalf || dtype == at::kBFloat16};
  const auto plan = device.plan(problem);
  if (!plan) return {};
  return {plan->units, plan->unit_blocks, plan->row_groups, plan->group_rows, plan->m_tiles,
          plan->n_tiles, plan->splits, plan->depth, plan->chunk_depth, plan->shared_bytes};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_lstm, m) {
  m.def("_emulated_cuda_forward", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(emulated_forward)));
  m.def("_emulated_cuda_backward", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(emulated_backward)));
  m.def(
      "_emulated_cuda_persistent_forward(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, "
      "Tensor w_hh, Tensor? bias, Tensor? w_hr, Tensor? batch_sizes, bool reverse, "
      "int multiprocessors, int shared_memory) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(emulated_persistent_forward)));
  m.def(
      "_emulated_cuda_persistent_backward(Tensor? grad_output, Tensor? grad_h_n, "
      "Tensor? grad_c_n, Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? w_hr, Tensor? batch_sizes, bool reverse, Tensor output, Tensor gates, "
      "Tensor cells, int multiprocessors, int shared_memory) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
      torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(emulated_persistent_backward)));
  m.def("_emulated_cuda_persistent_plan(int hidden_size, int batch, ScalarType dtype, "
        "bool backward, int multiprocessors, int shared_memory) -> int[]",
        &emulated_persistent_plan);
}

}  // namespace fused_lstm::cuda
