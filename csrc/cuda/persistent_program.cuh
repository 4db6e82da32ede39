// The persistent kernel (stage B of DESIGN.md; Diamos et al., "Persistent RNNs", ICML
// 2016): one cooperative launch runs every time step of a layer. Like lstm_kernels.cuh,
// everything here is __host__ __device__ over plain pointers, so that the tests' emulator
// (tests/emulator) runs the same block programs for every block and thread on the host,
// with the grid barrier between steps.
//
// Ownership. Block (x, y) owns hidden units [x·U, (x+1)·U) and batch rows
// [y·group_rows, (y+1)·group_rows). It keeps its weight rows in shared memory for the
// whole sequence: forward, the 4U rows of w_hh of its units (gate q of unit u at row
// u·4 + q); backward, the U columns of w_hh (w_hhᵀ's rows). Each step it reads the whole
// depth of the previous step's activations (h_{t-1}, or grad_gates of step s+1) from
// global memory (L2) and writes only its own units' outputs; every block then meets the
// others at one grid barrier, after which the next step may read those outputs.
//
// One step of a block. Its rows are taken in chunks of 16·n_tiles; for each chunk the
// activations are staged in shared memory (in the input's dtype) chunk_depth columns at a
// time, and the 8 warps multiply: warp w owns one 16 × 16 tile (16 weight rows × 16 batch
// rows) and one of `splits` interleaved parts of the depth, in steps of 16. Its sums go
// to shared memory, and the epilogue (one thread per (unit, row)) adds the splits in a
// fixed order, so results do not depend on scheduling, then runs the cell (`update` of
// the step, as the step kernels do). bfloat16/float16 multiply on tensor cores
// (mma.sync m16n8k16, FP32 accumulation). Their weights are exact in the input's dtype;
// the activations (float32) are not. Rounded to it once, h broke the accuracy rule in the
// backward at H = 257 with saturating weights (benchmarks/NOTES.md, "Precision"), so the
// forward stages and multiplies each chunk twice: hi = round(h), then lo = round(h - hi),
// and the product carries about twice the input dtype's bits of h. The backward's
// grad_gates are rounded once (split alone, they changed no figure: the error came from
// the forward). float32 and float64 multiply with FMAs in their own precision (never TF32).
//
// Barriers: per chunk (and per part, hi and lo, in the forward on tensor cores), one
// after each staging (and one before each further staging) and one after the sums are
// written; per step, the grid barrier. Memory ordering across
// blocks: all writes of a step happen before the grid barrier
// (cooperative_groups::grid_group::sync(), which orders memory for the whole grid), all
// reads of them after it; nothing another block writes is read through the read-only
// (non-coherent) cache.
#pragma once

#include "lstm_kernels.cuh"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>

FUSED_LSTM_DEVICE_CODE_BEGIN

namespace fused_lstm::cuda {

constexpr int kPersistentThreads = 256;
constexpr int kPersistentWarps = kPersistentThreads / 32;
constexpr int kWarpTile = 16;  // a warp's tile: 16 weight rows × 16 rows, depth steps of 16

template <typename scalar_t>
struct UsesTensorCores : std::false_type {};
template <>
struct UsesTensorCores<c10::BFloat16> : std::true_type {};
template <>
struct UsesTensorCores<c10::Half> : std::true_type {};

// The fragments of mma.sync.m16n8k16 with 16-bit inputs and float accumulators (PTX ISA,
// "Matrix Fragments for mma.m16n8k16 with floating point type"): lane = 4·group + index.
struct MmaLayout {
  // Register r (0..3) of A holds A[row][col] (low half) and A[row][col + 1].
  C10_HOST_DEVICE static int a_row(int lane, int r) { return lane / 4 + 8 * (r % 2); }
  C10_HOST_DEVICE static int a_col(int lane, int r) { return 2 * (lane % 4) + 8 * (r / 2); }
  // Register r (0..1) of B holds B[k][n] (low half) and B[k + 1][n].
  C10_HOST_DEVICE static int b_k(int lane, int r) { return 2 * (lane % 4) + 8 * r; }
  C10_HOST_DEVICE static int b_n(int lane) { return lane / 4; }
  // Value r (0..3) of C and D is D[row][col].
  C10_HOST_DEVICE static int d_row(int lane, int r) { return lane / 4 + 8 * (r / 2); }
  C10_HOST_DEVICE static int d_col(int lane, int r) { return 2 * (lane % 4) + r % 2; }
};

// The registers of one lane for a 16 × 16 tile on tensor cores: A holds 16 weight rows by
// 16 of depth, B and D two halves of 8 batch rows each. Block::warp_mma<scalar_t>() runs
// D[j] += A·B[j] for the whole warp.
struct MmaThread {
  uint32_t a[4];
  uint32_t b[2][2];
  float acc[2][4];
};

// The registers of one lane for a 16 × 16 tile with FMAs: 4 weight rows by 2 batch rows.
template <typename acc_t>
struct FmaThread {
  acc_t acc[4][2];
};

// The geometry of one persistent launch (see the top of this file). Sizes in elements
// unless said otherwise.
struct PersistentPlan {
  int64_t units;              // U, hidden units per block
  int64_t unit_blocks;        // blocks along the units: ceil(H / U)
  int64_t row_groups;         // blocks along the batch
  int64_t group_rows;         // batch rows per row group
  int64_t weight_rows;        // kGates · U
  int64_t m_tiles, n_tiles;   // 16-row tiles of the weight rows, and of a chunk of batch rows
  int64_t splits;             // warps per tile, each over an interleaved part of the depth
  int64_t depth;              // the product's depth, rounded up to 16·splits
  int64_t chunk_depth;        // depth staged at a time: a multiple of 16·splits
  int64_t weight_stride, activation_stride;  // row strides in shared memory
  int64_t activation_offset, partial_offset, shared_bytes;  // bytes

  C10_HOST_DEVICE int64_t chunk_rows() const { return kWarpTile * n_tiles; }
  C10_HOST_DEVICE int64_t partial_rows() const { return kWarpTile * m_tiles; }
};

// What a plan depends on: the layer's sizes and the kernel's element types.
struct PersistentProblem {
  int64_t hidden_size, batch;
  int64_t depth;             // of the recurrent product: P forward, 4H backward
  int64_t gates;             // weight rows per unit: 4 forward, 1 backward
  int64_t element_size, accumulator_size;
  bool tensor_cores;
};

namespace detail {

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// The shared-memory layout of a block with `units` units and up to `rows` batch rows, or
// nothing if even the smallest chunk does not fit in `max_shared_bytes`. More rows per
// chunk first (fewer chunks per step), then the deepest staging that fits.
inline std::optional<PersistentPlan> block_layout(const PersistentProblem& p, int64_t units,
                                                  int64_t rows, int64_t max_shared_bytes) {
  PersistentPlan plan{};
  plan.units = units;
  plan.weight_rows = p.gates * units;
  plan.m_tiles = ceil_div(plan.weight_rows, kWarpTile);
  if (plan.m_tiles > kPersistentWarps) return std::nullopt;
  // 16 bytes of padding per row: rows then start an odd number of 16-byte units apart, so
  // that the 8 rows read by one fragment load fall in different banks.
  const int64_t pad = 16 / p.element_size;
  for (int64_t n_tiles = std::min(kPersistentWarps / plan.m_tiles, ceil_div(rows, kWarpTile));
       n_tiles >= 1; --n_tiles) {
    plan.n_tiles = n_tiles;
    plan.splits = kPersistentWarps / (plan.m_tiles * n_tiles);
    const int64_t step = kWarpTile * plan.splits;
    plan.depth = round_up(p.depth, step);
    plan.weight_stride = plan.depth + pad;
    plan.activation_offset = round_up(plan.weight_rows * plan.weight_stride * p.element_size, 16);
    const int64_t partial_bytes =
        plan.splits * plan.chunk_rows() * plan.partial_rows() * p.accumulator_size;
    const int64_t free_bytes = max_shared_bytes - plan.activation_offset - partial_bytes;
    const int64_t row_bytes = plan.chunk_rows() * p.element_size;  // per staged column
    const int64_t columns = free_bytes / row_bytes - pad;
    plan.chunk_depth = std::min(plan.depth, columns / step * step);
    if (plan.chunk_depth < step) continue;
    plan.activation_stride = plan.chunk_depth + pad;
    const int64_t staging_bytes = plan.chunk_rows() * plan.activation_stride * p.element_size;
    plan.partial_offset = plan.activation_offset + round_up(staging_bytes, 16);
    plan.shared_bytes = plan.partial_offset + partial_bytes;
    return plan;
  }
  return std::nullopt;
}

}  // namespace detail

// The persistent kernel's geometry for a problem on a device with `multiprocessors` SMs,
// at most `max_shared_bytes` of dynamic shared memory per block, and
// `blocks_per_multiprocessor(shared_bytes)` co-resident blocks (the occupancy), or nothing
// if no geometry has its weight slices in shared memory and its grid co-resident.
//
// Units per block come in multiples of what fills a warp tile's 16 weight rows on tensor
// cores (4 units forward, 16 backward; with FMAs, a thread's 4 weight rows). First the
// fewest units that spread the layer over the SMs with one block each, then more units
// per block (fewer blocks), then fewer (several blocks per SM: each block reads all of
// the activations every step, so an SM with two reads them twice). SMs left over split
// the batch into row groups of at least 16 rows.
template <typename Occupancy>
std::optional<PersistentPlan> plan_persistent(const PersistentProblem& p, int64_t multiprocessors,
                                              int64_t max_shared_bytes,
                                              const Occupancy& blocks_per_multiprocessor) {
  using detail::ceil_div;
  using detail::round_up;
  if (p.batch <= 0 || p.hidden_size <= 0 || multiprocessors <= 0) return std::nullopt;
  const int64_t granule = std::max<int64_t>(1, (p.tensor_cores ? kWarpTile : 4) / p.gates);
  const int64_t most = ceil_div(p.hidden_size, granule);  // in granules
  const int64_t spread =
      std::min(most, ceil_div(ceil_div(p.hidden_size, multiprocessors), granule));
  for (int64_t candidate = 0; candidate < most; ++candidate) {
    const int64_t units =
        granule * (spread + candidate <= most ? spread + candidate : most - candidate);
    const auto layout = detail::block_layout(p, units, p.batch, max_shared_bytes);
    if (!layout) continue;
    const int64_t unit_blocks = ceil_div(p.hidden_size, units);
    const int64_t slots = blocks_per_multiprocessor(layout->shared_bytes) * multiprocessors;
    if (unit_blocks > slots) continue;
    int64_t row_groups = std::min(slots / unit_blocks, ceil_div(p.batch, kWarpTile));
    const int64_t group_rows = ceil_div(p.batch, row_groups);
    row_groups = ceil_div(p.batch, group_rows);
    PersistentPlan plan = *layout;
    if (row_groups > 1) {
      // Fewer rows per block may take fewer row tiles, and more splits of the depth.
      const auto smaller = detail::block_layout(p, units, group_rows, max_shared_bytes);
      if (smaller && unit_blocks * row_groups <=
                         blocks_per_multiprocessor(smaller->shared_bytes) * multiprocessors) {
        plan = *smaller;
      }
    }
    plan.unit_blocks = unit_blocks;
    plan.row_groups = row_groups;
    plan.group_rows = group_rows;
    return plan;
  }
  return std::nullopt;
}

// Two consecutive 16-bit values from shared memory as one register (4-byte aligned).
template <typename scalar_t>
C10_HOST_DEVICE inline uint32_t load_pair(const scalar_t* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const uint32_t*>(p);
#else
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
#endif
}

// 16 bytes of values from shared memory (16-byte aligned), as one vector load on the GPU.
template <typename T>
struct alignas(16) Vector16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T>
C10_HOST_DEVICE inline Vector16<T> load_vector(const T* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const Vector16<T>*>(p);
#else
  Vector16<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
#endif
}

// The block program of the persistent kernel for a ForwardSequence or a BackwardSequence.
template <typename Sequence_>
struct PersistentProgram {
  using Sequence = Sequence_;
  using Step = typename Sequence::Step;
  using scalar_t = typename Step::scalar_t;
  using acc_t = typename Step::acc_t;
  static constexpr int kGates = Step::kGates;
  static constexpr bool kTensorCores = UsesTensorCores<scalar_t>::value;
  // Parts staged per activation (see the top of this file): hi, and lo in the forward on
  // tensor cores. A second pass over the same staging keeps the plan (and its shared
  // memory) as it is; it reads the chunk from L2 again.
  static constexpr int kParts = kTensorCores && kGates == 4 ? 2 : 1;
  using Thread = std::conditional_t<kTensorCores, MmaThread, FmaThread<acc_t>>;

  static PersistentProblem problem(const Sequence& seq) {
    return {seq.hidden_size, seq.batch, seq.depth(), kGates, sizeof(scalar_t), sizeof(acc_t),
            kTensorCores};
  }

  // The warp's tile: its first weight row and batch row (in the chunk), and its split.
  struct WarpRole {
    bool active;
    int m0, n0, split;
  };

  C10_HOST_DEVICE static WarpRole role(const PersistentPlan& plan, int warp) {
    const int tiles = static_cast<int>(plan.m_tiles * plan.n_tiles);
    const int m_tiles = static_cast<int>(plan.m_tiles);
    if (warp >= tiles * plan.splits) return {false, 0, 0, 0};
    const int tile = warp % tiles;
    return {true, tile % m_tiles * kWarpTile, tile / m_tiles * kWarpTile, warp / tiles};
  }

  C10_HOST_DEVICE static scalar_t* weights(unsigned char* shared) {
    return reinterpret_cast<scalar_t*>(shared);
  }
  C10_HOST_DEVICE static scalar_t* activations(unsigned char* shared, const PersistentPlan& plan) {
    return reinterpret_cast<scalar_t*>(shared + plan.activation_offset);
  }
  // The sums of each split: [splits][chunk_rows][partial_rows].
  C10_HOST_DEVICE static acc_t* partials(unsigned char* shared, const PersistentPlan& plan) {
    return reinterpret_cast<acc_t*>(shared + plan.partial_offset);
  }

  // Once per launch: the block's weight rows into shared memory, zero past the depth.
  template <typename Block>
  C10_HOST_DEVICE static void load_weights(Block& block, unsigned char* shared, const Step& p,
                                           const PersistentPlan& plan, int64_t unit_block) {
    // Within a block, counts fit in 32 bits (shared memory is far smaller), and 64-bit
    // divisions are slow on the GPU.
    const int64_t unit0 = unit_block * plan.units;
    const int rows = static_cast<int>(plan.weight_rows), depth = static_cast<int>(plan.depth);
    scalar_t* w = weights(shared);
    block.for_each_thread([&](int tid, Thread&) {
      for (int e = tid; e < rows * depth; e += kPersistentThreads) {
        const int m = Step::kDepthContiguous ? e / depth : e % rows;
        const int k = Step::kDepthContiguous ? e % depth : e / rows;
        w[m * plan.weight_stride + k] = p.weight(unit0 + m / kGates, m % kGates, k);
      }
    });
    block.sync();
  }

  // One time step of the block (unit_block, row_group).
  template <typename Block>
  C10_HOST_DEVICE static void run_step(Block& block, unsigned char* shared, const Step& p,
                                       const PersistentPlan& plan, int64_t unit_block,
                                       int64_t row_group) {
    const int64_t unit0 = unit_block * plan.units;
    const int64_t group_begin = row_group * plan.group_rows;
    const int64_t group_end = min_of(p.batch, group_begin + plan.group_rows);
    for (int64_t n0 = group_begin; n0 < group_end; n0 += plan.chunk_rows()) {
      // The same for every thread of the block: no barrier is skipped by some threads only.
      const bool with_product = n0 < p.product_rows();
      if (with_product) {
        block.for_each_thread([&](int, Thread& th) { clear(th); });
        for (int64_t k0 = 0; k0 < plan.depth; k0 += plan.chunk_depth) {
          const int64_t length = min_of(plan.chunk_depth, plan.depth - k0);
          for (int part = 0; part < kParts; ++part) {
            if (k0 > 0 || part > 0) block.sync();  // every warp is done with the last staging
            block.for_each_thread([&](int tid, Thread&) {
              stage(shared, p, plan, n0, group_end, k0, length, part, tid);
            });
            block.sync();
            multiply(block, shared, plan, k0, length);
          }
        }
        block.for_each_thread([&](int tid, Thread& th) { write_sums(shared, plan, tid, th); });
        block.sync();
      }
      block.for_each_thread([&](int tid, Thread&) {
        epilogue(shared, p, plan, unit0, n0, group_end, with_product, tid);
      });
    }
  }

  C10_HOST_DEVICE static void clear(Thread& th) {
    if constexpr (kTensorCores) {
      for (auto& half : th.acc)
        for (float& v : half) v = 0.0f;
    } else {
      for (auto& row : th.acc)
        for (acc_t& v : row) v = acc_t(0);
    }
  }

  // The activations of rows [n0, n0 + chunk_rows) over columns [k0, k0 + length), in the
  // input's dtype (part 0), or what that rounding left (part 1); zero for rows outside the
  // group and wherever the step has none.
  // Consecutive threads take consecutive columns. Each thread loads kStagedLoads values
  // before it stores any: the loads come from L2, and issued together they wait for it
  // once rather than once each.
  static constexpr int kStagedLoads = 8;

  C10_HOST_DEVICE static void stage(unsigned char* shared, const Step& p,
                                    const PersistentPlan& plan, int64_t n0, int64_t group_end,
                                    int64_t k0, int64_t length, int part, int tid) {
    scalar_t* a = activations(shared, plan);
    const int columns = static_cast<int>(length);
    const int count = static_cast<int>(plan.chunk_rows()) * columns;
    for (int first = tid; first < count; first += kPersistentThreads * kStagedLoads) {
      acc_t values[kStagedLoads];
      FUSED_LSTM_UNROLL
      for (int i = 0; i < kStagedLoads; ++i) {
        const int e = first + i * kPersistentThreads;
        const int64_t b = n0 + e / columns;
        values[i] = e < count && b < group_end ? p.activation(b, k0 + e % columns) : acc_t(0);
      }
      FUSED_LSTM_UNROLL
      for (int i = 0; i < kStagedLoads; ++i) {
        const int e = first + i * kPersistentThreads;
        if (e < count) {
          const scalar_t hi = static_cast<scalar_t>(values[i]);
          a[e / columns * plan.activation_stride + e % columns] =
              part == 0 ? hi : static_cast<scalar_t>(values[i] - static_cast<acc_t>(hi));
        }
      }
    }
  }

  // The product over the staged columns [k0, k0 + length): each active warp over its
  // split's steps of 16.
  template <typename Block>
  C10_HOST_DEVICE static void multiply(Block& block, unsigned char* shared,
                                       const PersistentPlan& plan, int64_t k0, int64_t length) {
    const int steps = static_cast<int>(length / (kWarpTile * plan.splits));
    if constexpr (kTensorCores) {
      for (int i = 0; i < steps; ++i) {
        block.for_each_thread(
            [&](int tid, Thread& th) { load_fragments(shared, plan, k0, i, tid, th); });
        block.template warp_mma<scalar_t>();
      }
    } else {
      block.for_each_thread([&](int tid, Thread& th) {
        for (int i = 0; i < steps; ++i) multiply_step(shared, plan, k0, i, tid, th);
      });
    }
  }

  // Step i of the warp's split: columns k..k+16 of the staging (k0 + k of the weights).
  C10_HOST_DEVICE static int split_column(const PersistentPlan& plan, const WarpRole& r, int i) {
    return (r.split + static_cast<int>(plan.splits) * i) * kWarpTile;
  }

  // Weight rows past the block's last are read as its last (their sums are never used).
  C10_HOST_DEVICE static int weight_row(const PersistentPlan& plan, int m) {
    return m < plan.weight_rows ? m : static_cast<int>(plan.weight_rows) - 1;
  }

  C10_HOST_DEVICE static void load_fragments(unsigned char* shared, const PersistentPlan& plan,
                                             int64_t k0, int i, int tid, Thread& th) {
    const WarpRole r = role(plan, tid / 32);
    const int lane = tid % 32;
    if (!r.active) {
      // Idle warps multiply zeros: the warp-wide instruction runs on every warp alike.
      for (auto& v : th.a) v = 0;
      for (auto& half : th.b)
        for (auto& v : half) v = 0;
      return;
    }
    const int k = split_column(plan, r, i);
    const scalar_t* w = weights(shared);
    const scalar_t* a = activations(shared, plan);
    for (int reg = 0; reg < 4; ++reg) {
      const int m = weight_row(plan, r.m0 + MmaLayout::a_row(lane, reg));
      th.a[reg] = load_pair(w + m * plan.weight_stride + k0 + k + MmaLayout::a_col(lane, reg));
    }
    for (int half = 0; half < 2; ++half) {
      const int n = r.n0 + 8 * half + MmaLayout::b_n(lane);
      for (int reg = 0; reg < 2; ++reg) {
        th.b[half][reg] = load_pair(a + n * plan.activation_stride + k + MmaLayout::b_k(lane, reg));
      }
    }
  }

  // With FMAs: lane = 8·group + pair owns weight rows m0 + 4·group + (0..3) and batch rows
  // n0 + 2·pair + (0..1).
  C10_HOST_DEVICE static void multiply_step(unsigned char* shared, const PersistentPlan& plan,
                                            int64_t k0, int i, int tid, Thread& th) {
    const WarpRole r = role(plan, tid / 32);
    if (!r.active) return;
    const int lane = tid % 32;
    const int k = split_column(plan, r, i);
    const scalar_t* w = weights(shared);
    const scalar_t* a = activations(shared, plan);
    const scalar_t* w_row[4];
    const scalar_t* a_row[2];
    for (int q = 0; q < 4; ++q) {
      w_row[q] = w + weight_row(plan, r.m0 + 4 * (lane / 8) + q) * plan.weight_stride + k0 + k;
    }
    for (int n = 0; n < 2; ++n) {
      a_row[n] = a + (r.n0 + 2 * (lane % 8) + n) * plan.activation_stride + k;
    }
    constexpr int kWidth = Vector16<scalar_t>::kSize;
    FUSED_LSTM_UNROLL
    for (int kk = 0; kk < kWarpTile; kk += kWidth) {
      Vector16<scalar_t> wv[4], av[2];
      for (int q = 0; q < 4; ++q) wv[q] = load_vector(w_row[q] + kk);
      for (int n = 0; n < 2; ++n) av[n] = load_vector(a_row[n] + kk);
      FUSED_LSTM_UNROLL
      for (int v = 0; v < kWidth; ++v)
        FUSED_LSTM_UNROLL
        for (int q = 0; q < 4; ++q)
          FUSED_LSTM_UNROLL
          for (int n = 0; n < 2; ++n) th.acc[q][n] += wv[q].v[v] * av[n].v[v];
    }
  }

  // The warp's sums into shared memory, at [split][batch row][weight row].
  C10_HOST_DEVICE static void write_sums(unsigned char* shared, const PersistentPlan& plan, int tid,
                                         const Thread& th) {
    const WarpRole r = role(plan, tid / 32);
    if (!r.active) return;
    const int lane = tid % 32;
    acc_t* sums = partials(shared, plan) + r.split * plan.chunk_rows() * plan.partial_rows();
    const auto put = [&](int m, int n, acc_t v) {
      sums[(r.n0 + n) * plan.partial_rows() + r.m0 + m] = v;
    };
    if constexpr (kTensorCores) {
      for (int half = 0; half < 2; ++half)
        for (int reg = 0; reg < 4; ++reg)
          put(MmaLayout::d_row(lane, reg), 8 * half + MmaLayout::d_col(lane, reg),
              th.acc[half][reg]);
    } else {
      for (int q = 0; q < 4; ++q)
        for (int n = 0; n < 2; ++n) put(4 * (lane / 8) + q, 2 * (lane % 8) + n, th.acc[q][n]);
    }
  }

  // The cells of the chunk's (unit, row) pairs: consecutive threads take consecutive units.
  C10_HOST_DEVICE static void epilogue(unsigned char* shared, const Step& p,
                                       const PersistentPlan& plan, int64_t unit0, int64_t n0,
                                       int64_t group_end, bool with_product, int tid) {
    const acc_t* sums = partials(shared, plan);
    const int64_t slice = plan.chunk_rows() * plan.partial_rows();
    const int units = static_cast<int>(plan.units);
    for (int e = tid; e < units * static_cast<int>(plan.chunk_rows()); e += kPersistentThreads) {
      const int u = e % units, n = e / units;
      const int64_t b = n0 + n, j = unit0 + u;
      if (b >= group_end || j >= p.hidden_size) continue;
      acc_t product[kGates];
      for (int q = 0; q < kGates; ++q) {
        product[q] = acc_t(0);
        if (!with_product) continue;
        const acc_t* sum = sums + n * plan.partial_rows() + u * kGates + q;
        for (int64_t s = 0; s < plan.splits; ++s) product[q] += sum[s * slice];
      }
      p.update(b, j, product);
    }
  }
};

// All steps of a sequence on a grid: Grid::for_each_block(f) calls
// f(block, shared, unit_block, row_group) for its own block (on the GPU and in the
// emulator alike, with the block's shared memory kept from step to step), and
// Grid::sync() is the grid-wide barrier.
template <typename Program, typename Grid>
C10_HOST_DEVICE void run_persistent(Grid& grid, const typename Program::Sequence& seq,
                                    const PersistentPlan& plan) {
  const auto first = seq.step(0);
  grid.for_each_block([&](auto& block, unsigned char* shared, int64_t unit_block, int64_t) {
    Program::load_weights(block, shared, first, plan, unit_block);
  });
  for (int64_t i = 0; i < seq.steps(); ++i) {
    if (i > 0) grid.sync();  // step i-1's outputs are complete before step i reads them
    const auto step = seq.step(i);
    grid.for_each_block(
        [&](auto& block, unsigned char* shared, int64_t unit_block, int64_t row_group) {
          Program::run_step(block, shared, step, plan, unit_block, row_group);
        });
  }
}

}  // namespace fused_lstm::cuda

FUSED_LSTM_DEVICE_CODE_END
