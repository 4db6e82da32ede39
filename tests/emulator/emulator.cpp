// The CUDA op with its kernels emulated on the host, for the tests of a machine without a
// GPU. Test code: built by the tests as its own extension (tests/emulator/__init__.py),
// never into the user's fused_lstm._C. It runs the same host code (lstm_layer.h) and the
// same block programs (lstm_kernels.cuh, persistent_program.cuh) as lstm_cuda.cu.
//
// Concurrency. Every GPU thread of a launch is a fiber of its own, running the whole
// block program as the GPU thread does, and threads meet only where the program calls a
// barrier: Block::sync() (__syncthreads), Grid::sync() (the cooperative grid barrier) and
// the warp's tensor-core instruction (its 32 lanes). One deterministic schedule, chosen so
// that a missing barrier shows:
// - blocks run one at a time, each until all its threads wait at the grid barrier (or
//   have finished): a block whose barrier is missing runs ahead into the next step and
//   reads what the others have not yet written;
// - within a block, each thread runs until it reaches its next barrier before the next
//   thread starts (thread-major): a thread reads shared memory that threads after it
//   have not yet written, or overwrites what they have not yet read;
// - the order (of blocks at a grid barrier, of threads at a block barrier) alternates
//   from one barrier to the next, so that neither the first nor the last is always ahead;
// - the lanes of a warp meet at its mma and go on together.
// What nobody has written yet is poisoned (all bits set: NaN in floating point) so that
// reading it shows in the results: each block's shared memory and each thread's
// registers at launch; before a layer's first launch its output, cells, h_n, c_n (or
// grad_gates), whole; and before each step's launch what it writes (cells, hidden or
// grad_gates). Buffers read and written in place (gates, grad_h, grad_c) keep their inputs.
//
// What it still cannot see, left for compute-sanitizer and the GPU tests:
// - memory ordering: a write here is visible to every later read at once. The GPU's
//   weak ordering, the fence in the grid barrier, volatile/atomic accesses, the
//   read-only (non-coherent) cache and L1 staleness across blocks are not modelled;
// - other schedules: one interleaving is run, so a race that this schedule does not
//   order badly passes; a barrier that only orders what a later barrier orders anyway
//   cannot fail here (it cannot fail on the GPU either);
// - warp-synchronous code: lanes are independent threads here, and only the mma is a
//   warp-wide meeting point; shuffles, votes, __syncwarp and the convergence that
//   mma.sync requires (all 32 lanes at the same instruction) are not checked;
// - the mma unit itself: its fragments are computed from the lanes' registers as the
//   PTX ISA lays them out, but with sums in order of k, where the tensor cores have
//   their own order and rounding;
// - speed, occupancy, co-residency of the cooperative grid (the emulated device counts
//   shared memory only), bank conflicts, out-of-bounds accesses (ASan's job).
//
// Test-only ops, on CPU tensors, with the arguments of forward / backward, as
// torch.ops.fused_lstm_emulated.*:
// - forward / backward: the step kernels;
// - persistent_forward / persistent_backward, plus the emulated device's SM count and
//   shared memory per block: the persistent kernel (an error where it does not fit; the
//   step kernels with a projection, as on the GPU);
// - persistent_plan: the geometry the persistent kernel would have.
#include "../../csrc/cuda/lstm_layer.h"

// The op's shared host code, compiled into this one translation unit (each translation
// unit with ATen's headers costs tens of seconds to build on a small machine).
#include "../../csrc/checks.cpp"
#include "../../csrc/gradients.cpp"

#include <torch/library.h>

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <vector>

namespace fused_lstm::cuda {
namespace {

// Garbage (NaN for floating point) where a program reads what nobody wrote.
constexpr unsigned char kPoison = 0xff;

template <typename T>
void poison(T* p, int64_t count) {
  if (p != nullptr) std::memset(static_cast<void*>(p), kPoison, sizeof(T) * count);
}

// The saved state of a fiber, and the switch from one to another: on x86-64 by hand (the
// callee-saved registers, the stack pointer and the floating-point control words: a few
// nanoseconds), elsewhere by ucontext (which also saves the signal mask: a system call
// per switch). The emulated threads switch at every barrier, hundreds of thousands of
// times per launch of the persistent kernel.
#if defined(__x86_64__) && defined(__linux__)
asm(R"(
  .pushsection .text
  .p2align 4
  .globl fused_lstm_emulator_switch
  .hidden fused_lstm_emulator_switch
  .type fused_lstm_emulator_switch, @function
fused_lstm_emulator_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fused_lstm_emulator_switch, .-fused_lstm_emulator_switch
  .popsection
)");
extern "C" void fused_lstm_emulator_switch(void** save_sp, void* load_sp);

struct Context {
  void* sp = nullptr;

  // Switched to, the context calls entry() (which never returns) on the given stack.
  void prepare(unsigned char* stack, size_t bytes, void (*entry)()) {
    auto top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15);
    // What fused_lstm_emulator_switch pops, from the lowest address: the control words,
    // r15, r14, r13, r12, rbx, rbp, then the return address, which is 16-byte aligned
    // (entry() then starts as if called); above it a null return address for entry().
    auto* frame = reinterpret_cast<uint64_t*>(top - 16) - 7;
    std::memset(frame, 0, 9 * sizeof(uint64_t));
    uint32_t mxcsr;
    uint16_t fpcw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpcw));
    std::memcpy(frame, &mxcsr, 4);
    std::memcpy(reinterpret_cast<unsigned char*>(frame) + 4, &fpcw, 2);
    frame[7] = reinterpret_cast<uint64_t>(entry);
    sp = frame;
  }
  static void jump(Context& from, Context& to) { fused_lstm_emulator_switch(&from.sp, to.sp); }
};
#else
struct Context {
  ucontext_t context;

  void prepare(unsigned char* stack, size_t bytes, void (*entry)()) {
    getcontext(&context);
    context.uc_stack.ss_sp = stack;
    context.uc_stack.ss_size = bytes;
    context.uc_link = nullptr;
    makecontext(&context, entry, 0);
  }
  static void jump(Context& from, Context& to) { swapcontext(&from.context, &to.context); }
};
#endif

// Stacks for the fibers of one block, kept from launch to launch (a fresh mapping would
// page-fault into every stack again). At most kKept blocks' worth stays mapped.
class StackPool {
 public:
  static constexpr int kMaxThreads = 256;
  static constexpr size_t kStackBytes = 64 * 1024;
  static constexpr size_t kBytes = kStackBytes * kMaxThreads;
  static constexpr size_t kKept = 64;

  ~StackPool() {
    for (unsigned char* stacks : free_) munmap(stacks, kBytes);
  }
  unsigned char* take() {
    if (free_.empty()) {
      void* p = mmap(nullptr, kBytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      TORCH_CHECK(p != MAP_FAILED, "fused_lstm emulator: no memory for the fibers' stacks");
      return static_cast<unsigned char*>(p);
    }
    unsigned char* stacks = free_.back();
    free_.pop_back();
    return stacks;
  }
  void give(unsigned char* stacks) {
    if (free_.size() < kKept) {
      free_.push_back(stacks);
    } else {
      munmap(stacks, kBytes);
    }
  }

 private:
  std::vector<unsigned char*> free_;
};

thread_local StackPool stack_pool;

// The fibers of one launch: `blocks` blocks of `threads` threads, each running
// body(block, tid) on its own stack, scheduled as the top of this file says.
class Launch {
 public:
  using Body = std::function<void(int64_t block, int tid)>;

  Launch(int64_t blocks, int threads) : blocks_(blocks), threads_(threads) {
    TORCH_CHECK(threads > 0 && threads % 32 == 0 && threads <= kMaxThreads,
                "fused_lstm emulator: blocks of whole warps, at most ", kMaxThreads,
                " threads, got ", threads);
  }
  Launch(const Launch&) = delete;
  Launch& operator=(const Launch&) = delete;
  ~Launch() {
    for (BlockState& s : state_) {
      if (s.stacks != nullptr) stack_pool.give(s.stacks);
    }
  }

  void run(const Body& body) {
    body_ = &body;
    std::deque<int64_t> ready;
    for (int64_t b = 0; b < blocks_; ++b) ready.push_back(b);
    state_.resize(blocks_);
    for (int64_t barrier = 0;; ++barrier) {
      for (; !ready.empty(); ready.pop_front()) run_block(ready.front());
      const bool finished = std::all_of(state_.begin(), state_.end(),
                                        [&](const BlockState& s) { return s.done == threads_; });
      if (finished) return;
      // Every block waits at the grid barrier: all go on, in alternating order.
      for (int64_t i = 0; i < blocks_; ++i) {
        const int64_t b = barrier % 2 == 0 ? blocks_ - 1 - i : i;
        TORCH_CHECK(state_[b].at_grid == threads_, "fused_lstm emulator: block ", b,
                    " finished while others wait at the grid barrier");
        state_[b].at_grid = 0;
        release(state_[b], Wait::grid, /*front=*/false, 0, threads_);
        ready.push_back(b);
      }
    }
  }

  // What a thread calls, from its fiber: its index in the block, and the barriers, at
  // which it waits until every thread it meets has arrived.
  int thread() const { return current_thread_; }

  void block_sync() {
    BlockState& s = arrive(Wait::block);
    if (++s.at_block == threads_) {
      s.at_block = 0;
      release(s, Wait::block, /*front=*/false, 0, threads_);
    }
    yield();
  }

  // The warp's lanes meet; the last to arrive runs `all_arrived(first_lane)` (an
  // instruction of the whole warp), then the warp goes on first.
  void warp_sync(const std::function<void(int first_lane)>& all_arrived) {
    BlockState& s = arrive(Wait::warp);
    const int warp = current_thread_ / 32;
    if (++s.at_warp[warp] == 32) {
      s.at_warp[warp] = 0;
      all_arrived(warp * 32);
      release(s, Wait::warp, /*front=*/true, warp * 32, warp * 32 + 32);
    }
    yield();
  }

  void grid_sync() {
    ++arrive(Wait::grid).at_grid;
    yield();
  }

 private:
  static constexpr int kMaxThreads = StackPool::kMaxThreads;
  static constexpr size_t kStackBytes = StackPool::kStackBytes;
  static constexpr uint64_t kCanary = 0x5a5a5a5a5a5a5a5aull;  // at the bottom of each stack

  enum class Wait : uint8_t { none, block, warp, grid, done };

  struct Fiber {
    Context context;
    Wait wait = Wait::none;
  };

  struct BlockState {
    std::vector<Fiber> fibers;  // created when the block first runs
    unsigned char* stacks = nullptr;
    std::deque<int> ready;
    int at_block = 0, at_grid = 0, done = 0;
    int at_warp[kMaxThreads / 32] = {};
    int64_t releases = 0;  // for the alternating order
  };

  static void entry() { current_->fiber_main(); }

  void fiber_main() {
    try {
      (*body_)(current_block_, current_thread_);
    } catch (...) {
      if (!error_) error_ = std::current_exception();
    }
    Fiber& f = state_[current_block_].fibers[current_thread_];
    f.wait = Wait::done;
    Context::jump(f.context, scheduler_);  // never resumed
  }

  void start(BlockState& s) {
    s.stacks = stack_pool.take();
    s.fibers.resize(threads_);
    for (int t = 0; t < threads_; ++t) {
      unsigned char* stack = s.stacks + t * kStackBytes;
      std::memcpy(stack, &kCanary, sizeof(kCanary));
      s.fibers[t].context.prepare(stack, kStackBytes, &Launch::entry);
      s.ready.push_back(t);
    }
  }

  // Runs block b's threads until none can go on.
  void run_block(int64_t b) {
    BlockState& s = state_[b];
    if (s.fibers.empty()) start(s);
    current_ = this;
    current_block_ = b;
    for (; !s.ready.empty();) {
      current_thread_ = s.ready.front();
      s.ready.pop_front();
      Context::jump(scheduler_, s.fibers[current_thread_].context);
      if (error_) std::rethrow_exception(error_);
      if (s.fibers[current_thread_].wait == Wait::done) ++s.done;
    }
    if (s.done == threads_) {
      for (int t = 0; t < threads_; ++t) {
        uint64_t bottom;
        std::memcpy(&bottom, s.stacks + t * kStackBytes, sizeof(bottom));
        TORCH_CHECK(bottom == kCanary, "fused_lstm emulator: a fiber overflowed its stack");
      }
      stack_pool.give(s.stacks);
      s.stacks = nullptr;
      std::vector<Fiber>().swap(s.fibers);
      return;
    }
    TORCH_CHECK(s.at_grid == threads_, "fused_lstm emulator: the threads of block ", b,
                " wait at different barriers (", s.at_block, " at the block's, ", s.at_grid,
                " at the grid's, ", s.done, " finished): a barrier in divergent code");
  }

  // Makes the threads [begin, end) waiting at `what` ready: at the back of the queue in
  // the block's alternating order, or at the front in order.
  void release(BlockState& s, Wait what, bool front, int begin, int end) {
    const bool backwards = front || s.releases++ % 2 == 1;
    for (int i = 0; i < end - begin; ++i) {
      const int t = backwards ? end - 1 - i : begin + i;
      if (s.fibers[t].wait != what) continue;
      s.fibers[t].wait = Wait::none;
      if (front) {
        s.ready.push_front(t);
      } else {
        s.ready.push_back(t);
      }
    }
  }

  BlockState& arrive(Wait what) {
    BlockState& s = state_[current_block_];
    s.fibers[current_thread_].wait = what;
    return s;
  }

  // Back to the scheduler, until the thread is released (it may be already).
  void yield() { Context::jump(state_[current_block_].fibers[current_thread_].context, scheduler_); }

  static thread_local Launch* current_;

  int64_t blocks_;
  int threads_;
  const Body* body_ = nullptr;
  std::vector<BlockState> state_;
  Context scheduler_;
  int64_t current_block_ = 0;
  int current_thread_ = 0;
  std::exception_ptr error_;
};

thread_local Launch* Launch::current_ = nullptr;

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

// One emulated GPU thread as the block programs see it (ThisThread on the GPU): a phase
// runs for this thread only, sync() is the block's barrier, warp_mma() the warp's.
// `threads` holds the registers of every thread of the block (the mma reads the lanes').
template <typename Thread>
struct EmulatedThread {
  Launch& launch;
  Thread* threads;

  template <typename F>
  void for_each_thread(const F& f) {
    const int tid = launch.thread();
    f(tid, threads[tid]);
  }
  void sync() { launch.block_sync(); }
  template <typename scalar_t>
  void warp_mma() {
    launch.warp_sync([&](int first_lane) { emulate_mma<scalar_t>(threads + first_lane); });
  }
};

// The registers of every thread of `blocks` blocks, poisoned.
template <typename Thread>
std::vector<Thread> poisoned_threads(int64_t count) {
  std::vector<Thread> threads(count);
  poison(threads.data(), count);
  return threads;
}

// The persistent kernel's grid as one emulated thread sees it (GpuGrid on the GPU): its
// own block, with that block's shared memory, and sync() the grid barrier.
template <typename Thread>
struct EmulatedGrid {
  EmulatedThread<Thread> thread;
  unsigned char* shared;
  int64_t unit_block, row_group;

  template <typename F>
  void for_each_block(const F& f) {
    f(thread, shared, unit_block, row_group);
  }
  void sync() { thread.launch.grid_sync(); }
};

// What a launch writes (whole, before anything reads it), poisoned before it.
template <typename scalar_t, typename acc_t>
void poison_outputs(const ForwardStep<scalar_t, acc_t>& p) {
  poison(p.cells, p.batch * p.hidden_size);
  poison(p.hidden, p.batch * p.hidden_size);
}
template <typename scalar_t, typename acc_t>
void poison_outputs(const BackwardStep<scalar_t, acc_t>& p) {
  poison(p.grad_gates, p.batch * 4 * p.hidden_size);
}
template <typename scalar_t, typename acc_t>
void poison_outputs(const ForwardSequence<scalar_t, acc_t>& seq) {
  const int64_t T = seq.seq_len, B = seq.batch;
  poison(seq.output, T * B * seq.output_size);
  poison(seq.cells, T * B * seq.hidden_size);
  poison(seq.h_n, B * seq.output_size);
  poison(seq.c_n, B * seq.hidden_size);
}
template <typename scalar_t, typename acc_t>
void poison_outputs(const BackwardSequence<scalar_t, acc_t>& seq) {
  poison(seq.grad_gates, seq.seq_len * seq.batch * 4 * seq.hidden_size);
}

// The step kernels: one launch of row_blocks × unit_blocks blocks per step.
struct OnHost {
  template <typename Tile, typename Step>
  static void run(const Step& step, int64_t row_blocks, int64_t unit_blocks) {
    using Program = StepBlock<Tile, Step>;
    using Thread = typename Program::Thread;
    poison_outputs(step);
    const int64_t blocks = row_blocks * unit_blocks;
    std::vector<typename Program::Shared> shared(blocks);
    poison(shared.data(), blocks);
    std::vector<Thread> threads = poisoned_threads<Thread>(blocks * Tile::kThreads);
    Launch launch(blocks, Tile::kThreads);
    launch.run([&](int64_t b, int) {
      EmulatedThread<Thread> thread{launch, threads.data() + b * Tile::kThreads};
      run_block<Tile>(thread, shared[b], step, b / unit_blocks * Tile::kRows,
                      b % unit_blocks * Tile::kUnits);
    });
  }

  // Asked before the steps of a layer without a projection: the step kernels run it, so
  // all they will write is poisoned first.
  template <typename Sequence>
  bool persistent(const Sequence& seq, const std::vector<int64_t>&) const {
    poison_outputs(seq);
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
    using Thread = typename Program::Thread;
    const PersistentProblem problem = Program::problem(seq);
    const auto plan = device.plan(problem);
    if (!plan) {
      persistent_does_not_fit(problem, "the emulated device", device.multiprocessors,
                              device.max_shared_bytes);
    }
    poison_outputs(seq);
    const int64_t blocks = plan->unit_blocks * plan->row_groups;
    std::vector<unsigned char> shared(blocks * plan->shared_bytes, kPoison);
    std::vector<Thread> threads = poisoned_threads<Thread>(blocks * kPersistentThreads);
    Launch launch(blocks, kPersistentThreads);
    launch.run([&](int64_t b, int) {
      EmulatedGrid<Thread> grid{{launch, threads.data() + b * kPersistentThreads},
                                shared.data() + b * plan->shared_bytes, b % plan->unit_blocks,
                                b / plan->unit_blocks};
      run_persistent<Program>(grid, seq, *plan);
    });
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

TORCH_LIBRARY(fused_lstm_emulated, m) {
  m.def("forward", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(emulated_forward)));
  m.def("backward", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(emulated_backward)));
  m.def(
      "persistent_forward(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? bias, Tensor? w_hr, Tensor? batch_sizes, bool reverse, int multiprocessors, "
      "int shared_memory) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(emulated_persistent_forward)));
  m.def(
      "persistent_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, "
      "Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, "
      "Tensor? batch_sizes, bool reverse, Tensor output, Tensor gates, Tensor cells, "
      "int multiprocessors, int shared_memory) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
      torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(emulated_persistent_backward)));
  m.def("persistent_plan(int hidden_size, int batch, ScalarType dtype, bool backward, "
        "int multiprocessors, int shared_memory) -> int[]",
        &emulated_persistent_plan);
}

}  // namespace fused_lstm::cuda
