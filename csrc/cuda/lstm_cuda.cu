// CUDA kernels of the fused_lstm ops (schemas and semantics in ops.cpp and lstm.h). The
// host side (lstm_layer.h) runs the input projection as one cuBLAS GEMM through ATen, then
// the recurrence on one of two kernels, then the weight gradients as GEMMs:
// - persistent (stage B of DESIGN.md; persistent_program.cuh): one cooperative launch for
//   all time steps, each block keeping its slice of w_hh in shared memory;
// - step by step (stage A; lstm_kernels.cuh): one launch per time step, block (x, y)
//   owning a tile of batch rows and hidden units.
//
// Which one (the rule, also in README.md): the persistent kernel wherever it fits, the
// step kernels otherwise. It fits when the layer has no projection, the device supports
// cooperative launches (and, for bfloat16/float16, has mma.sync: compute capability 8.0
// or more), and some geometry (plan_persistent) gives each block a slice of w_hh that
// fits in the block's shared memory (the device's opt-in limit) with every block of the
// grid co-resident (the occupancy the runtime reports for that shared memory, times the
// SMs). All of it is read off the device, so an H100, H200 or A100 each get their own.
// Two exceptions take the step kernels for the call at hand:
// - the stream is being captured into a CUDA graph. NVIDIA documents a graph kernel node
//   as able to be cooperative (cudaLaunchAttributeCooperative, "Valid for graph nodes,
//   launches", driver_types.h of CUDA 13.0; CUkernelNodeAttrValue::cooperative since the
//   CUDA 11.1 driver API), but not that capturing cudaLaunchCooperativeKernel records one,
//   nor what a replay does where the grid is no longer co-resident (it could not fall
//   back): see benchmarks/NOTES.md, "Cooperative launch and CUDA graphs";
// - the runtime refuses the cooperative launch (cudaErrorCooperativeLaunchTooLarge and
//   the like: fewer SMs than the device reports, under MPS, a green context, or another
//   process's kernels): one warning names the reason.
// FUSED_LSTM_CUDA_PATH=persistent or =stepwise forces either for layers without a
// projection (a captured call still takes the step kernels); persistent where it does
// not fit, or is refused, is an error.
// Test only: FUSED_LSTM_TEST_OVERSIZED_GRID=1 asks the cooperative launch for 65535 rows
// of blocks, more than any GPU holds at once, so that the runtime refuses it
// (tests/test_cuda_launch.py).
//
// Device guard, the current stream, tensors from the caching allocator, a launch check
// after every launch, no host synchronisation (so CUDA graphs capture it).
#include "lstm_layer.h"
#include "on_gpu.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>

namespace fused_lstm::cuda {
namespace {

template <typename Tile, typename Step>
__global__ void __launch_bounds__(Tile::kThreads) step_kernel(const Step step) {
  using Program = StepBlock<Tile, Step>;
  __shared__ typename Program::Shared shared;
  ThisThread<typename Program::Thread> block;
  run_block<Tile>(block, shared, step, static_cast<int64_t>(blockIdx.x) * Tile::kRows,
                  static_cast<int64_t>(blockIdx.y) * Tile::kUnits);
}

enum class CudaPath { automatic, persistent, stepwise };

CudaPath cuda_path() {
  const char* forced = std::getenv("FUSED_LSTM_CUDA_PATH");
  if (forced == nullptr || *forced == '\0') return CudaPath::automatic;
  if (std::strcmp(forced, "persistent") == 0) return CudaPath::persistent;
  if (std::strcmp(forced, "stepwise") == 0) return CudaPath::stepwise;
  TORCH_CHECK(false, "fused_lstm: FUSED_LSTM_CUDA_PATH must be persistent or stepwise (or unset), "
              "got '", forced, "'");
}

// What the persistent kernel's plan depends on, read once per device.
struct DeviceLimits {
  std::string name;
  int64_t multiprocessors;
  int64_t max_shared_bytes;  // dynamic shared memory per block, with the opt-in
  bool cooperative;          // cudaLaunchCooperativeKernel is supported
  bool tensor_cores;         // mma.sync m16n8k16 with bfloat16/float16 (sm_80 and later)
};

DeviceLimits read_limits(int device) {
  const auto attribute = [&](cudaDeviceAttr a) {
    int value = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, a, device));
    return value;
  };
  return {at::cuda::getDeviceProperties(device)->name,
          attribute(cudaDevAttrMultiProcessorCount),
          attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin),
          attribute(cudaDevAttrCooperativeLaunch) != 0,
          attribute(cudaDevAttrComputeCapabilityMajor) >= 8};
}

// Plans per (device, kernel, layer sizes): the occupancy queries run once per shape.
class PlanCache {
 public:
  template <typename Program>
  std::optional<PersistentPlan> plan(int device, const PersistentProblem& problem,
                                     const DeviceLimits& limits) {
    const void* function = PersistentKernel<Program>::function();
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto key = std::make_tuple(device, function, problem.hidden_size, problem.batch);
    const auto found = plans_.find(key);
    if (found != plans_.end()) return found->second;
    std::optional<PersistentPlan> plan;
    if (limits.cooperative && (limits.tensor_cores || !problem.tensor_cores)) {
      // Shared memory past 48 KiB per block has to be opted into, per kernel and device.
      C10_CUDA_CHECK(cudaFuncSetAttribute(function, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(limits.max_shared_bytes)));
      plan = plan_persistent(problem, limits.multiprocessors, limits.max_shared_bytes,
                             [&](int64_t shared_bytes) {
                               int blocks = 0;
                               C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                                   &blocks, function, kPersistentThreads,
                                   static_cast<size_t>(shared_bytes)));
                               return static_cast<int64_t>(blocks);
                             });
    }
    plans_.emplace(key, plan);
    return plan;
  }

 private:
  std::mutex mutex_;
  std::map<std::tuple<int, const void*, int64_t, int64_t>, std::optional<PersistentPlan>> plans_;
};

const DeviceLimits& device_limits(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceLimits> limits;
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = limits.find(device);
  if (found == limits.end()) found = limits.emplace(device, read_limits(device)).first;
  return found->second;
}

// Up to kValues live-row counts, written into device memory by one launch: the values
// travel in the launch's parameters, so no host memory is read when a CUDA graph replays.
constexpr int kLiveValues = 256;
struct LiveChunk {
  int64_t values[kLiveValues];
};

__global__ void write_live(const LiveChunk chunk, int64_t count, int64_t* out) {
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) out[i] = chunk.values[i];
}

// Launches the kernels: the step kernels' grids, and the persistent kernel where it is
// chosen.
struct OnGpu {
  template <typename Tile, typename Step>
  static void run(const Step& step, int64_t row_blocks, int64_t unit_blocks) {
    TORCH_CHECK(unit_blocks <= 65535, "fused_lstm: hidden_size ", step.hidden_size,
                " is too large for the CUDA kernels (at most ", 65535 * Tile::kUnits, ")");
    TORCH_CHECK(row_blocks <= std::numeric_limits<int32_t>::max(), "fused_lstm: batch ",
                step.batch, " is too large for the CUDA kernels");
    const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(unit_blocks));
    step_kernel<Tile><<<grid, Tile::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(step);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Runs the sequence on the persistent kernel and returns true, or returns false for the
  // step kernels (see the rule at the top of this file).
  template <typename Sequence>
  bool persistent(const Sequence& seq, const std::vector<int64_t>& live) const {
    using Program = PersistentProgram<Sequence>;
    const CudaPath path = cuda_path();
    if (path == CudaPath::stepwise) return false;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    if (capture != cudaStreamCaptureStatusNone) return false;
    static PlanCache cache;
    const int device = c10::cuda::current_device();
    const DeviceLimits& limits = device_limits(device);
    const PersistentProblem problem = Program::problem(seq);
    const auto plan = cache.plan<Program>(device, problem, limits);
    if (!plan) {
      if (path == CudaPath::persistent) {
        persistent_does_not_fit(problem, limits.name, limits.multiprocessors,
                                limits.max_shared_bytes);
      }
      return false;
    }
    Sequence on_device = seq;
    const at::Tensor live_table = device_live_rows(live, seq.batch);
    on_device.live = live_table.defined() ? live_table.data_ptr<int64_t>() : nullptr;
    PersistentPlan launched = *plan;
    if (oversized_grid_for_tests()) launched.row_groups = 65535;
    const cudaError_t error = PersistentKernel<Program>::launch(on_device, launched, stream);
    if (error == cudaSuccess) return true;
    if (!refused(error)) C10_CUDA_CHECK(error);
    // The refusal is also the runtime's last error, which the next launch check would raise.
    (void)cudaGetLastError();
    const int64_t blocks = launched.unit_blocks * launched.row_groups;
    if (path == CudaPath::persistent) {
      TORCH_CHECK(false, "fused_lstm: FUSED_LSTM_CUDA_PATH=persistent, but the persistent kernel ",
                  "does not fit on ", limits.name, " now: its cooperative launch of ", blocks,
                  " blocks with ", launched.shared_bytes, " bytes of shared memory each was "
                  "refused (", cudaGetErrorString(error), "). Unset FUSED_LSTM_CUDA_PATH, or set "
                  "it to stepwise.");
    }
    TORCH_WARN_ONCE("fused_lstm: the cooperative launch of the persistent kernel (", blocks,
                    " blocks with ", launched.shared_bytes, " bytes of shared memory each, planned "
                    "for ", limits.multiprocessors, " SMs of ", limits.name, ") was refused: ",
                    cudaGetErrorString(error), ". Fewer SMs may be available than the device "
                    "has (MPS, a green context, other processes). Such calls run on the step "
                    "kernels instead; this warning is shown once.");
    return false;
  }

  // What the runtime answers where the grid cannot be co-resident, or a cooperative launch
  // is not allowed in this context: the step kernels can still run the call.
  static bool refused(cudaError_t error) {
    return error == cudaErrorCooperativeLaunchTooLarge || error == cudaErrorNotSupported ||
           error == cudaErrorNotPermitted || error == cudaErrorLaunchOutOfResources;
  }

  static bool oversized_grid_for_tests() {
    const char* value = std::getenv("FUSED_LSTM_TEST_OVERSIZED_GRID");
    return value != nullptr && std::strcmp(value, "1") == 0;
  }

  // batch_sizes on the device, or undefined where every row is live at every step.
  static at::Tensor device_live_rows(const std::vector<int64_t>& live, int64_t batch) {
    if (std::all_of(live.begin(), live.end(), [&](int64_t rows) { return rows == batch; })) {
      return at::Tensor();
    }
    const int64_t T = static_cast<int64_t>(live.size());
    at::Tensor table = at::empty({T}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA));
    for (int64_t t0 = 0; t0 < T; t0 += kLiveValues) {
      LiveChunk chunk{};
      const int64_t count = std::min<int64_t>(kLiveValues, T - t0);
      std::copy(live.begin() + t0, live.begin() + t0 + count, chunk.values);
      write_live<<<1, kLiveValues, 0, c10::cuda::getCurrentCUDAStream()>>>(
          chunk, count, table.data_ptr<int64_t>() + t0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return table;
  }
};

ForwardResult forward_cuda(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                           const at::Tensor& w_ih, const at::Tensor& w_hh,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& w_hr,
                           const std::optional<at::Tensor>& batch_sizes, bool reverse,
                           bool save_for_backward) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  ForwardResult result =
      forward(OnGpu{}, input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse);
  if (!save_for_backward) {  // computed all the same on CUDA; returned empty as the schema says
    std::get<3>(result) = at::empty({0}, std::get<3>(result).options());
    std::get<4>(result) = at::empty({0}, std::get<4>(result).options());
  }
  return result;
}

BackwardResult backward_cuda(const std::optional<at::Tensor>& grad_output,
                             const std::optional<at::Tensor>& grad_h_n,
                             const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
                             const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                             const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                             const std::optional<at::Tensor>& batch_sizes, bool reverse,
                             const at::Tensor& output, const at::Tensor& gates,
                             const at::Tensor& cells, bool input_grad) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  return backward(OnGpu{}, grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr,
                  batch_sizes, reverse, output, gates, cells, input_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, CUDA, m) {
  m.impl("forward", &forward_cuda);
  m.impl("backward", &backward_cuda);
}

}  // namespace fused_lstm::cuda
