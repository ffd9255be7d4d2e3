// Depthwise convolution with a fused per-channel epilogue: kernels and their launchers.
//
//   z = conv(x, weight) + bias,   y = act(z) * scale + shift + residual
//
// Torch-free on purpose: csrc/depthwise_conv.cu instantiates them for float, at::Half and at::BFloat16 with
// acc_t = at::opmath_type<scalar_t>, and the standalone test driver csrc/emulation/selftest_main.cpp for float.
//
// Layout. Every tensor is addressed through its (n, c, h, w) strides, so one kernel serves NCHW and channels_last.
// A block owns an output tile of th x tw pixels times cb channels. Its threads map over that tile channel-fastest:
// with cb = 1 (NCHW) consecutive threads take consecutive columns, with cb > 1 (channels_last) consecutive
// channels, so global loads are coalesced in both layouts. The input tile is read in 16-byte vectors where the
// layout allows: across channels in channels_last when the channel count is a multiple of the vector, along rows
// in NCHW when the width is (each tile row is then covered by the aligned vectors around it). cb is a power of
// two that divides kThreads, so a thread always sees the same channel.
//
// Shared memory. The input tile of an output tile, halo included, goes to shared memory in fp32. Its size grows
// with kernel size x dilation; when it exceeds kSharedBudget the taps are processed in rectangular chunks
// (rc x cc taps at a time, loading each chunk's halo), so any kernel, stride and dilation fits.
//
// Backward. dz = dy * scale * act'(z) is computed where it is loaded (never stored) by the generic dx and the
// dweight kernels; the sliding-window dx (below) reads it from depthwise_conv2d_dz_kernel's buffer instead.
//   dx:      the transposed convolution of dz, tiled like the forward.
//   dweight: grid (G, channel blocks, tap chunks); each block loops over its 1/G share of the (batch, tile) items,
//            loads the dz tile and the x tile with its halo into shared memory once per item and accumulates every
//            tap of its chunk from there, so x and dy are read once per tap chunk, not once per tap. Per-block
//            results go to partials[C, G, taps], which reduce_partials sums in a fixed order: deterministic, no
//            atomics. The same blocks also produce the per-channel sums for dbias, dscale and dshift. At stride 1
//            and dilation 1 a thread owns one channel and a run of consecutive taps of one tap row, and walks the
//            pixels with a register window of x, so each value read from shared memory feeds a run of FMAs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "launch.h"

namespace vitkern::dwconv {

constexpr int kThreads = 256;
constexpr int kOutputsPerThread = 4;                            // forward and dx
constexpr int kMaxTileOutputs = kThreads * kOutputsPerThread;  // th * tw * cb
constexpr int kAccPerThread = 16;                               // dweight accumulators per thread
constexpr int kMaxTapSlots = kThreads * kAccPerThread;          // taps of a chunk x cb
constexpr int kDweightUnits = 2;                                // dweight runs: units per thread
constexpr int kMaxChannelBlock = 32;
constexpr int kEpilogueSums = 3;                                // dbias, dscale, dshift
constexpr std::size_t kSharedBudget = 48 * 1024;
// The sliding-window kernels' tiles: more than the 48 KiB default (allow_shared), within sm_80's 163 KiB.
constexpr std::size_t kWindowSharedBudget = 96 * 1024;
constexpr int kTargetBlocks = 1024;                             // dweight: how many blocks to aim for

// A list of compile-time sizes (kernel sizes, run lengths) to dispatch over.
template <int... Ks>
struct KernelSizes {};

// fn(std::integral_constant<int, R>{}) for the R of Rs equal to value (nothing when none is).
template <int R, int... Rs, typename Fn>
void with_size(int value, KernelSizes<R, Rs...>, Fn&& fn) {
  if (value == R) {
    fn(std::integral_constant<int, R>{});
  } else if constexpr (sizeof...(Rs) > 0) {
    with_size(value, KernelSizes<Rs...>{}, fn);
  }
}

constexpr float kSqrtHalf = 0.70710678118654752f;     // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;   // 1 / sqrt(2 * pi)

enum Activation : int { kNone = 0, kGelu = 1, kRelu = 2 };

struct Geometry {
  int64_t n, c, h, w;  // input
  int64_t oh, ow;      // output
  int kh, kw, sh, sw, dh, dw, pad_top, pad_left;
};

struct Strides {
  int64_t n, c, h, w;
};

// How the input tile is read: element by element, or in 16-byte vectors across channels (channels_last) or
// along rows (NCHW).
enum LoadMode : int { kScalarLoads = 0, kChannelVectors = 1, kRowVectors = 2 };

// How a kernel cuts its work: output tile th x tw x cb, taps in chunks of rc x cc.
struct Tiling {
  int th, tw, cb, rc, cc;
  int tiles_h, tiles_w;
  LoadMode load_mode;
};

__host__ __device__ __forceinline__ int div_floor(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
__host__ __device__ __forceinline__ int div_ceil(int a, int b) { return div_floor(a + b - 1, b); }

// Phi(z), the standard normal CDF, as 0.5 * erfc(-z / sqrt(2)) with erfc from Abramowitz and Stegun 7.1.26
// (|error| <= 1.5e-7 in erf, so GELU stays within 1e-6 of the exact one for |z| < 5; the fp32 tolerances are
// 1e-4): a reciprocal, an exponential and five multiply-adds, where erff spends about twice that selecting
// between two polynomials.
template <typename acc_t>
__device__ __forceinline__ acc_t normal_cdf(acc_t z) {
  const acc_t x = fabsf(z) * acc_t(kSqrtHalf);
  const acc_t t = acc_t(1) / (acc_t(1) + acc_t(0.3275911f) * x);
  const acc_t poly =
      t * (acc_t(0.254829592f) +
           t * (acc_t(-0.284496736f) + t * (acc_t(1.421413741f) + t * (acc_t(-1.453152027f) + t * acc_t(1.061405429f)))));
  const acc_t tail = acc_t(0.5) * poly * expf(-x * x);  // 0.5 * erfc(|z| / sqrt(2)) = Phi(-|z|)
  return z >= acc_t(0) ? acc_t(1) - tail : tail;
}

template <typename acc_t>
__device__ __forceinline__ acc_t activate(acc_t z, int act) {
  if (act == kGelu) {
    return z * normal_cdf(z);
  }
  if (act == kRelu) {
    return z > acc_t(0) ? z : acc_t(0);
  }
  return z;
}

template <typename acc_t>
__device__ __forceinline__ acc_t activate_grad(acc_t z, int act) {
  if (act == kGelu) {
    const acc_t cdf = acc_t(0.5) * (acc_t(1) + erff(z * acc_t(kSqrtHalf)));
    const acc_t pdf = expf(acc_t(-0.5) * z * z) * acc_t(kInvSqrt2Pi);
    return cdf + z * pdf;
  }
  if (act == kRelu) {
    return z > acc_t(0) ? acc_t(1) : acc_t(0);
  }
  return acc_t(1);
}

template <typename scalar_t>
struct alignas(16) Vector16 {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

// What a forward or dx block owns: grid (tiles_h * tiles_w, ceil(C / cb), N), one th x tw x cb tile per block.
struct BlockTile {
  int row0, col0;  // the tile's first pixel
  int64_t c0, n;   // the block's first channel, its image
  int cl;          // this thread's channel within the block (a thread always sees the same one)
  int64_t c;       // c0 + cl
  int outputs;     // th * tw * cb
};

__device__ __forceinline__ BlockTile block_tile(const Tiling& t) {
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * t.cb;
  const int cl = static_cast<int>(threadIdx.x) % t.cb;
  return {static_cast<int>(blockIdx.x / t.tiles_w) * t.th, static_cast<int>(blockIdx.x % t.tiles_w) * t.tw, c0,
          static_cast<int64_t>(blockIdx.z), cl, c0 + cl, t.th * t.tw * t.cb};
}

// NCHW (cb = 1) rows of whole 16-byte vectors: tile[r * cols + col] = src[n, c, row0 + r, col0 + col] (0 outside
// the tensor), read through the aligned vectors that cover each tile row. The width and the row, channel and
// batch strides are multiples of the vector and src is 16-byte aligned, so a vector lies wholly inside a row of
// the tensor or wholly outside it.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_input_rows(acc_t* tile, const scalar_t* __restrict__ src, const Geometry& g,
                                                const Strides& s, int64_t n, int64_t c, int row0, int col0, int rows,
                                                int cols) {
  constexpr int kVec = Vector16<scalar_t>::kSize;
  const int lead = col0 - div_floor(col0, kVec) * kVec;  // where tile column 0 sits in its vector
  const int per_row = (lead + cols + kVec - 1) / kVec;
  for (int e = threadIdx.x; e < rows * per_row; e += kThreads) {
    const int r = e / per_row;
    const int first = (e % per_row) * kVec - lead;  // tile column of the vector's first element
    const int ih = row0 + r;
    const int iw = col0 + first;
    const bool inside = c < g.c && ih >= 0 && ih < g.h && iw >= 0 && iw < g.w;
    Vector16<scalar_t> chunk;
    if (inside) {
      chunk = load_vector<Vector16<scalar_t>>(src + n * s.n + c * s.c + ih * s.h + iw);
    }
    VITKERN_UNROLL
    for (int k = 0; k < kVec; ++k) {
      const int col = first + k;
      if (col >= 0 && col < cols) {
        tile[r * cols + col] = inside ? static_cast<acc_t>(chunk.v[k]) : acc_t(0);
      }
    }
  }
}

// tile[(r * cols + col) * cb + cl] = src[n, c0 + cl, row0 + r, col0 + col] (0 outside the tensor), for
// r < rows, col < cols, cl < cb.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_input_tile(acc_t* tile, const scalar_t* __restrict__ src, const Geometry& g,
                                                const Strides& s, int64_t n, int64_t c0, int cb, int row0,
                                                int col0, int rows, int cols, LoadMode mode) {
  if (mode == kRowVectors) {
    load_input_rows(tile, src, g, s, n, c0, row0, col0, rows, cols);
    return;
  }
  const int total = rows * cols * cb;
  const int vec = mode == kChannelVectors ? Vector16<scalar_t>::kSize : 1;
  for (int e = threadIdx.x * vec; e < total; e += kThreads * vec) {
    const int cl = e % cb;
    const int q = e / cb;
    const int ih = row0 + q / cols;
    const int iw = col0 + q % cols;
    const int64_t c = c0 + cl;
    const bool inside = c < g.c && ih >= 0 && ih < g.h && iw >= 0 && iw < g.w;
    const int64_t offset = n * s.n + c * s.c + ih * s.h + iw * s.w;
    if (vec > 1) {
      Vector16<scalar_t> chunk;
      if (inside) {
        chunk = load_vector<Vector16<scalar_t>>(src + offset);
      }
      VITKERN_UNROLL
      for (int k = 0; k < Vector16<scalar_t>::kSize; ++k) {
        tile[e + k] = inside ? static_cast<acc_t>(chunk.v[k]) : acc_t(0);
      }
    } else {
      tile[e] = inside ? static_cast<acc_t>(src[offset]) : acc_t(0);
    }
  }
}

// dz at (n, c, oh, ow) from dy, z and scale; 0 outside the output. Also returns dy and act(z) for the sums.
template <typename scalar_t, typename acc_t>
struct GradSource {
  const scalar_t* __restrict__ dy;
  const scalar_t* __restrict__ z;      // (N, C, OH, OW) or null when act == kNone and no dscale is needed
  const scalar_t* __restrict__ scale;  // (C,) or null
  int act;

  __device__ __forceinline__ acc_t at(int64_t offset, int64_t c, acc_t& dy_out, acc_t& act_out) const {
    const acc_t d = static_cast<acc_t>(dy[offset]);
    acc_t grad = d;
    act_out = acc_t(0);
    if (z != nullptr) {
      const acc_t zz = static_cast<acc_t>(z[offset]);
      act_out = activate(zz, act);
      grad *= activate_grad(zz, act);
    }
    if (scale != nullptr) {
      grad *= static_cast<acc_t>(scale[c]);
    }
    dy_out = d;
    return grad;
  }
};

// tile[(r * cols + col) * cb + cl] = dz[n, c0 + cl, row0 + r, col0 + col] (0 outside the output). With `sums`,
// adds dz, dy * act(z) and dy of the loaded elements to sums[0..2]: a thread always loads the same channel
// (tid % cb), so these are per-channel partial sums.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_grad_tile(acc_t* tile, const GradSource<scalar_t, acc_t>& src,
                                               const Geometry& g, const Strides& s, int64_t n, int64_t c0, int cb,
                                               int row0, int col0, int rows, int cols, acc_t* sums) {
  const int total = rows * cols * cb;
  for (int e = threadIdx.x; e < total; e += kThreads) {
    const int cl = e % cb;
    const int q = e / cb;
    const int oh = row0 + q / cols;
    const int ow = col0 + q % cols;
    const int64_t c = c0 + cl;
    acc_t value = acc_t(0);
    if (c < g.c && oh >= 0 && oh < g.oh && ow >= 0 && ow < g.ow) {
      acc_t d, a;
      value = src.at(n * s.n + c * s.c + oh * s.h + ow * s.w, c, d, a);
      if (sums != nullptr) {
        sums[0] += value;
        sums[1] += d * a;
        sums[2] += d;
      }
    }
    tile[e] = value;
  }
}

// The forward's per-channel epilogue: z = conv + bias (stored when z is not null), y = act(z) * scale + shift +
// residual. Pointers as for the forward kernels.
template <typename scalar_t, typename acc_t>
struct Epilogue {
  const scalar_t* __restrict__ bias;
  const scalar_t* __restrict__ scale;
  const scalar_t* __restrict__ shift;
  const scalar_t* __restrict__ residual;
  scalar_t* __restrict__ y;
  scalar_t* __restrict__ z;
  int act;

  // Stores the output at y[offset] (and z[offset]) of channel c from its convolution sum.
  __device__ __forceinline__ void store(acc_t v, int64_t offset, int64_t c) const {
    if (bias != nullptr) {
      v += static_cast<acc_t>(bias[c]);
    }
    if (z != nullptr) {
      z[offset] = static_cast<scalar_t>(v);
    }
    v = activate(v, act);
    if (scale != nullptr) {
      v *= static_cast<acc_t>(scale[c]);
    }
    if (shift != nullptr) {
      v += static_cast<acc_t>(shift[c]);
    }
    if (residual != nullptr) {
      v += static_cast<acc_t>(residual[offset]);
    }
    y[offset] = static_cast<scalar_t>(v);
  }
};

// Forward. grid (tiles_h * tiles_w, ceil(C / cb), N), block kThreads, shared: the input tile of one tap chunk.
// x: (N, C, H, W) strides sx; weight: (C, 1, kh, kw) contiguous; bias, scale, shift: (C,) or null;
// residual, y, z: (N, C, OH, OW) strides sy; residual and z may be null.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    depthwise_conv2d_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                                const scalar_t* __restrict__ bias, const scalar_t* __restrict__ scale,
                                const scalar_t* __restrict__ shift, const scalar_t* __restrict__ residual,
                                scalar_t* __restrict__ y, scalar_t* __restrict__ z, Geometry g, Strides sx,
                                Strides sy, Tiling t, int act) {
  VITKERN_DYNAMIC_SHARED(acc_t, tile);
  const int tid = threadIdx.x;
  const auto [oh0, ow0, c0, n, cl, c, tile_outputs] = block_tile(t);
  const int taps = g.kh * g.kw;
  const Epilogue<scalar_t, acc_t> epilogue{bias, scale, shift, residual, y, z, act};

  acc_t acc[kOutputsPerThread];
  for (int k = 0; k < kOutputsPerThread; ++k) {
    acc[k] = acc_t(0);
  }

  for (int r0 = 0; r0 < g.kh; r0 += t.rc) {
    const int rc = min(t.rc, g.kh - r0);
    const int rows = (t.th - 1) * g.sh + (rc - 1) * g.dh + 1;
    for (int q0 = 0; q0 < g.kw; q0 += t.cc) {
      const int cc = min(t.cc, g.kw - q0);
      const int cols = (t.tw - 1) * g.sw + (cc - 1) * g.dw + 1;
      __syncthreads();
      load_input_tile(tile, x, g, sx, n, c0, t.cb, oh0 * g.sh - g.pad_top + r0 * g.dh,
                      ow0 * g.sw - g.pad_left + q0 * g.dw, rows, cols, t.load_mode);
      __syncthreads();
      if (c < g.c) {
        int base[kOutputsPerThread];  // where each output's window starts in the tile
        for (int k = 0; k < kOutputsPerThread; ++k) {
          const int p = (tid + k * kThreads) / t.cb;
          base[k] = ((p / t.tw) * g.sh * cols + (p % t.tw) * g.sw) * t.cb + cl;
        }
        for (int i = 0; i < rc; ++i) {
          for (int j = 0; j < cc; ++j) {
            const acc_t wv = static_cast<acc_t>(weight[c * taps + (r0 + i) * g.kw + q0 + j]);
            const int tap = (i * g.dh * cols + j * g.dw) * t.cb;
            for (int k = 0; k < kOutputsPerThread; ++k) {
              if (tid + k * kThreads < tile_outputs) {
                acc[k] += wv * tile[base[k] + tap];
              }
            }
          }
        }
      }
    }
  }

  for (int k = 0; k < kOutputsPerThread; ++k) {
    const int p = (tid + k * kThreads) / t.cb;
    const int oh = oh0 + p / t.tw;
    const int ow = ow0 + p % t.tw;
    if (tid + k * kThreads < tile_outputs && c < g.c && oh < g.oh && ow < g.ow) {
      epilogue.store(acc[k], n * sy.n + c * sy.c + oh * sy.h + ow * sy.w, c);
    }
  }
}

// --- sliding-window kernels: stride 1, dilation 1, a square K x K kernel known at compile time -----------------
//
// Each thread computes a run of R consecutive outputs of one row (R compile-time, one of the run lists below), the
// register-blocked direct convolution of CUTLASS's depthwise kernels (examples/19_large_depthwise_conv2d_torch_
// extension, include/cutlass/conv/threadblock/depthwise_fprop_direct_conv_multistage.h), on CUDA cores:
//   NCHW: a block holds `groups` channel planes, each a th x tw output tile, tile[plane][row][cols] and
//     weights[plane][kernel row][round4(K)] in shared memory. Per kernel row a thread reads its run's input window
//     (R + K - 1 values, 16 bytes at a time where R % 4 == 0, else 8) and that row's weights (16-byte reads, the
//     same for every thread of a plane), then does K * R FMAs from registers.
//   channels_last: a block holds kClChannels channels of a th x tw tile, tile[(row * cols + col) * kClChannels +
//     channel] and weights[tap][kClChannels] (tap-major: their load reads the weight tensor coalesced per channel).
//     A thread owns kChannelVector channels of R pixels; per kernel row it keeps the row's K weight vectors in
//     registers and streams the window's R + K - 1 pixels through them, one 16-byte read feeding up to
//     min(K, R) x kChannelVector FMAs.
// The run is picked per width so that as few outputs as possible are computed past the row's end, and the block
// has as many threads as the tiling uses (rounded up to a warp). The input tile is stored in fp32: each value is
// read by every window that covers it, so it is converted once, when loaded from global memory, in the widest
// aligned vectors the layout allows. Per-thread indices of the load and of the epilogue are computed once; the
// epilogue loads its per-channel vectors once per thread and writes each run in the widest aligned vectors.
// dx is the same correlation over dz with the kernel flipped (stride 1): dz itself comes from
// depthwise_conv2d_dz_kernel where the epilogue makes it differ from dy, so the tile load is the forward's.

constexpr int kChannelVector = 4;  // fp32 values of a 16-byte shared-memory read
constexpr int kClChannels = 16;    // channels of a channels_last block: 32 bytes of fp16 a pixel, one DRAM sector
constexpr int kClLanes = kClChannels / kChannelVector;

// The run lengths of the sliding-window kernels.
using NchwRuns = KernelSizes<16, 14>;
using ClRuns = KernelSizes<8, 7>;

__host__ __device__ constexpr int round_up(int v, int m) { return (v + m - 1) / m * m; }
__host__ __device__ constexpr int round4(int v) { return round_up(v, 4); }

// n / d and n % d for 0 <= n < 2^31 by a divisor fixed at launch, by a multiply and a shift (the host finds the
// magic number: Granlund and Montgomery, as PyTorch's IntDivider).
struct FastDiv {
  uint32_t divisor = 1, magic = 1, shift = 0;

  FastDiv() = default;
  explicit FastDiv(int d) : divisor(static_cast<uint32_t>(d)) {
    while ((uint64_t{1} << shift) < divisor) {
      ++shift;
    }
    magic = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - divisor)) / divisor + 1);
  }
  __host__ __device__ __forceinline__ int div(int n) const {
    const uint32_t high = static_cast<uint32_t>((static_cast<uint64_t>(n) * magic) >> 32);
    return static_cast<int>((high + static_cast<uint32_t>(n)) >> shift);
  }
  __host__ __device__ __forceinline__ int mod(int n) const { return n - div(n) * static_cast<int>(divisor); }
};

// Tile column 0 of an NCHW shared row: room on its left for the part of the first vector read before it.
constexpr int kRowLead = 8;
constexpr int kNchwRows = 2;  // NCHW: output rows a thread computes (its runs are one above the other)

// How a sliding-window launch cuts its work (see above).
struct WindowTiling {
  int run;         // outputs a thread computes along a row (the kernel's R)
  int th, tw;      // output tile
  int tc;          // threads across a tile row (tw / run)
  int groups;      // NCHW: channel planes per block; channels_last: 1
  int threads;     // the block's threads (a multiple of the warp)
  int rows, cols;  // shared input tile of a plane: th + K - 1 rows of cols (NCHW: a row's floats, kRowLead first)
  int tiles_h, tiles_w;
  int vec;         // elements a global read of the input tile takes: along rows (NCHW), across channels (cl)
  int per_row;     // NCHW: the vectors a tile row is read in
  int step;        // channels_last: the pixels a pass of the block's loads covers
  FastDiv tiles_w_div, per_group_div, tc_div, load_div;  // load_div: by rows (NCHW), by cols (cl)
};

// The tensor a sliding-window kernel correlates: x (forward) or dz (dx), h x w, and where its tile starts
// relative to the output tile's first pixel.
template <typename scalar_t>
struct WindowSource {
  const scalar_t* __restrict__ data;
  Strides s;
  int h, w;
  int row_offset, col_offset;
};

template <typename T, int V>
struct alignas(sizeof(T) * V) VectorN {
  T v[V];
};

// NCHW: tile[r * t.cols + kRowLead + col] = plane[row0 + r, col0 + col] (0 outside the tensor or past the
// channels) for each of a block's planes, read in aligned vectors of V elements along rows (V > 1: the width and
// the row stride are multiples of V, so a vector lies wholly inside or outside a row; V == 1: any strides). A
// thread loads whole tile rows (of the block's planes, one after another), t.per_row vectors from the one holding
// column col0, which may reach past the tile's columns into the row's lead and tail. Rows outside the tensor or
// past the channels are 0; a vector outside the row is read at the row's nearest one and replaced by 0.
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_window_rows(acc_t* tile, int plane_floats, const WindowSource<scalar_t>& src,
                                                 const WindowTiling& t, int64_t n, int64_t c0, int64_t channels,
                                                 int row0, int col0) {
  using Vec = VectorN<scalar_t, V>;
  const int lead = col0 & (V - 1);  // where column col0 sits in its vector (V is a power of two)
  const int first_col = col0 - lead;  // the image column of the first vector (a multiple of V)
  const int planes_inside = channels - c0 < t.groups ? static_cast<int>(channels - c0) : t.groups;
  const scalar_t* planes = src.data + n * src.s.n + c0 * src.s.c;
  // Stores as wide as the tile row's offset in shared memory allows (the same for every thread of the block).
  auto rows = [&](auto width) {
    constexpr int W = decltype(width)::value;
    for (int e = threadIdx.x; e < t.groups * t.rows; e += blockDim.x) {
      const int p = t.load_div.div(e);  // load_div: by t.rows
      const int r = e - p * t.rows;
      const int ih = row0 + r;
      const bool row_inside = p < planes_inside && ih >= 0 && ih < src.h;
      // Every read is of the tensor: outside it, the nearest row, plane and vector are read (and replaced by 0).
      const int ih_read = ih < 0 ? 0 : ih < src.h ? ih : src.h - 1;
      const int p_read = p < planes_inside ? p : planes_inside - 1;
      const scalar_t* in = planes + p_read * src.s.c + static_cast<int64_t>(ih_read) * src.s.h;
      acc_t* out = tile + p * plane_floats + r * t.cols + kRowLead - lead;
      for (int j = 0; j < t.per_row; ++j) {
        const int iw = first_col + j * V;
        const bool inside = row_inside && iw >= 0 && iw < src.w;
        const int iw_read = iw < 0 ? 0 : iw < src.w ? iw : src.w - V;
        const Vec chunk = load_vector<Vec>(in + static_cast<int64_t>(iw_read) * src.s.w);
        VITKERN_UNROLL
        for (int k = 0; k < V; k += W) {
          VectorN<acc_t, W> values;
          VITKERN_UNROLL
          for (int q = 0; q < W; ++q) {
            values.v[q] = inside ? static_cast<acc_t>(chunk.v[k + q]) : acc_t(0);
          }
          store_vector(out + j * V + k, values);
        }
      }
    }
  };
  const int offset = (kRowLead - lead) & 3;
  if constexpr (V >= 4) {
    if (offset == 0) {
      return rows(std::integral_constant<int, 4>{});
    }
  }
  if constexpr (V >= 2) {
    if ((offset & 1) == 0) {
      return rows(std::integral_constant<int, 2>{});
    }
  }
  rows(std::integral_constant<int, 1>{});
}

// channels_last: tile[(r * cols + col) * kClChannels + cl] = src[n, c0 + cl, row0 + r, col0 + col] (0 outside the
// tensor and the channels), read in vectors of V channels (V > 1: the channel count and every stride but the
// channels' are multiples of V, the channel stride is 1). A thread loads whole pixels, t.step (the block's
// threads) apart, walking them with an incremental (row, column).
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_window_pixels(acc_t* tile, const WindowSource<scalar_t>& src,
                                                   const WindowTiling& t, int64_t n, int64_t c0, int64_t channels,
                                                   int row0, int col0) {
  using Vec = VectorN<scalar_t, V>;
  constexpr int kPerPixel = kClChannels / V;
  const int pixels = t.rows * t.cols;
  const int step_rows = t.load_div.div(t.step);
  const int step_cols = t.step - step_rows * t.cols;
  int p = threadIdx.x;
  int r = t.load_div.div(p);
  int col = p - r * t.cols;
  bool channel_inside[kPerPixel];
  int channel_read[kPerPixel];  // the first channel read, relative to c0: the last vector's past the channels
  const int last = static_cast<int>((channels - c0 - 1) / V) * V;
  VITKERN_UNROLL
  for (int q = 0; q < kPerPixel; ++q) {
    channel_inside[q] = c0 + q * V < channels;
    channel_read[q] = channel_inside[q] ? q * V : last;
  }
  const int row_stride = static_cast<int>(src.s.h);
  const int col_stride = static_cast<int>(src.s.w);
  const int channel_stride = static_cast<int>(src.s.c);
  const scalar_t* base = src.data + n * src.s.n + c0 * src.s.c;
  acc_t* dst = tile + p * kClChannels;
  for (; p < pixels; p += t.step) {
    // Every read is of the tensor: outside it, the nearest pixel (and channel vector) is read and replaced by 0.
    const int ih = row0 + r;
    const int iw = col0 + col;
    const bool pixel_inside = ih >= 0 && ih < src.h && iw >= 0 && iw < src.w;
    const int ih_read = ih < 0 ? 0 : ih < src.h ? ih : src.h - 1;
    const int iw_read = iw < 0 ? 0 : iw < src.w ? iw : src.w - 1;
    const scalar_t* at = base + (ih_read * row_stride + iw_read * col_stride);
    VITKERN_UNROLL
    for (int q = 0; q < kPerPixel; ++q) {
      const bool inside = pixel_inside && channel_inside[q];
      const Vec chunk = load_vector<Vec>(at + channel_read[q] * channel_stride);
      if constexpr (V % kChannelVector == 0) {
        VITKERN_UNROLL
        for (int k = 0; k < V; k += kChannelVector) {
          Vector16<acc_t> out;
          VITKERN_UNROLL
          for (int e = 0; e < kChannelVector; ++e) {
            out.v[e] = inside ? static_cast<acc_t>(chunk.v[k + e]) : acc_t(0);
          }
          store_vector(dst + q * V + k, out);
        }
      } else {
        VITKERN_UNROLL
        for (int k = 0; k < V; ++k) {
          dst[q * V + k] = inside ? static_cast<acc_t>(chunk.v[k]) : acc_t(0);
        }
      }
    }
    dst += t.step * kClChannels;
    col += step_cols;
    r += step_rows;
    if (col >= t.cols) {
      col -= t.cols;
      ++r;
    }
  }
}

// The widest vector (elements, a power of two) runs of R values at p, p + step, p + 2 * step, ... can be written
// or read in: one that divides R, p's alignment and step, where the run's values are adjacent (stride 1).
template <int R, typename scalar_t>
__device__ __forceinline__ int run_vector(const scalar_t* p, int64_t stride, int64_t step) {
  if (p == nullptr || stride != 1) {
    return 1;
  }
  const auto address = reinterpret_cast<std::uintptr_t>(p);
  int v = 16 / sizeof(scalar_t);
  while (v > 1 && ((address & (v * sizeof(scalar_t) - 1)) != 0 || R % v != 0 || step % v != 0)) {
    v /= 2;
  }
  return v;
}

// fn(std::integral_constant<int, W>{}) for the widest vector W of 8, 4 or 2 elements that vec (run_vector) allows
// and R is a multiple of, spelled out so that the vector type is known at compile time; false where there is none.
template <int R, typename scalar_t, typename Fn>
__device__ __forceinline__ bool with_run_width(int vec, Fn&& fn) {
  if constexpr (16 / sizeof(scalar_t) >= 8 && R % 8 == 0) {
    if (vec >= 8) {
      fn(std::integral_constant<int, 8>{});
      return true;
    }
  }
  if constexpr (R % 4 == 0) {
    if (vec >= 4) {
      fn(std::integral_constant<int, 4>{});
      return true;
    }
  }
  if constexpr (R % 2 == 0) {
    if (vec >= 2) {
      fn(std::integral_constant<int, 2>{});
      return true;
    }
  }
  return false;
}

// out[k * stride] = v[k] for k < count: in vectors of vec (run_vector) where the run is whole.
template <int R, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_run(scalar_t* out, int64_t stride, const acc_t (&v)[R], int count, int vec) {
  auto store = [&](auto width) {
    constexpr int W = decltype(width)::value;
    VITKERN_UNROLL
    for (int k = 0; k < R; k += W) {
      VectorN<scalar_t, W> chunk;
      VITKERN_UNROLL
      for (int e = 0; e < W; ++e) {
        chunk.v[e] = static_cast<scalar_t>(v[k + e]);
      }
      store_vector(out + k, chunk);
    }
  };
  if (count == R && with_run_width<R, scalar_t>(vec, store)) {
    return;
  }
  VITKERN_UNROLL
  for (int k = 0; k < R; ++k) {
    if (k < count) {
      out[k * stride] = static_cast<scalar_t>(v[k]);
    }
  }
}

// v[k] = in[k * stride] for k < count (0 past it), in vectors as store_run.
template <int R, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_run(const scalar_t* in, int64_t stride, acc_t (&v)[R], int count, int vec) {
  auto load = [&](auto width) {
    constexpr int W = decltype(width)::value;
    VITKERN_UNROLL
    for (int k = 0; k < R; k += W) {
      const auto chunk = load_vector<VectorN<scalar_t, W>>(in + k);
      VITKERN_UNROLL
      for (int e = 0; e < W; ++e) {
        v[k + e] = static_cast<acc_t>(chunk.v[e]);
      }
    }
  };
  if (count == R && with_run_width<R, scalar_t>(vec, load)) {
    return;
  }
  VITKERN_UNROLL
  for (int k = 0; k < R; ++k) {
    v[k] = k < count ? static_cast<acc_t>(in[k * stride]) : acc_t(0);
  }
}

// The forward's epilogue over a run of R outputs of one channel (NCHW: along a row) or of one pixel's channels
// (channels_last: R = kChannelVector), `stride` apart: z = conv + bias, y = act(z) * scale + shift + residual.
template <typename scalar_t, typename acc_t>
struct RunEpilogue {
  Epilogue<scalar_t, acc_t> e;
  Strides s;  // the output's

  // The per-channel vectors of channel c (bias 0, scale 1, shift 0 where absent).
  struct Channel {
    acc_t bias, scale, shift;
  };
  __device__ __forceinline__ Channel channel(int64_t c) const {
    return {e.bias != nullptr ? static_cast<acc_t>(e.bias[c]) : acc_t(0),
            e.scale != nullptr ? static_cast<acc_t>(e.scale[c]) : acc_t(1),
            e.shift != nullptr ? static_cast<acc_t>(e.shift[c]) : acc_t(0)};
  }

  // The vector widths of a thread's runs of R, the first at `offset`, the others `step` after it.
  struct Vectors {
    int y, z, residual;
  };
  template <int R>
  __device__ __forceinline__ Vectors vectors(int64_t offset, int64_t stride, int64_t step) const {
    return {run_vector<R>(e.y + offset, stride, step), e.z == nullptr ? 1 : run_vector<R>(e.z + offset, stride, step),
            e.residual == nullptr ? 1 : run_vector<R>(e.residual + offset, stride, step)};
  }

  // Writes y (and z) of the run at `offset` from its sums v, each with its channel's vectors.
  template <int R>
  __device__ __forceinline__ void store(acc_t (&v)[R], const Channel (&ch)[R], int64_t offset, int64_t stride,
                                        int count, const Vectors& vec) const {
    VITKERN_UNROLL
    for (int k = 0; k < R; ++k) {
      v[k] += ch[k].bias;
    }
    if (e.z != nullptr) {
      store_run(e.z + offset, stride, v, count, vec.z);
    }
    acc_t res[R];
    if (e.residual != nullptr) {
      load_run(e.residual + offset, stride, res, count, vec.residual);
    }
    VITKERN_UNROLL
    for (int k = 0; k < R; ++k) {
      v[k] = activate(v[k], e.act) * ch[k].scale + ch[k].shift;
      if (e.residual != nullptr) {
        v[k] += res[k];
      }
    }
    store_run(e.y + offset, stride, v, count, vec.y);
  }
};

// dx's output: a plain store of the sums.
template <typename scalar_t, typename acc_t>
struct RunStore {
  scalar_t* __restrict__ out;
  Strides s;  // the output's

  struct Channel {};
  __device__ __forceinline__ Channel channel(int64_t) const { return {}; }
  using Vectors = int;
  template <int R>
  __device__ __forceinline__ Vectors vectors(int64_t offset, int64_t stride, int64_t step) const {
    return run_vector<R>(out + offset, stride, step);
  }

  template <int R>
  __device__ __forceinline__ void store(acc_t (&v)[R], const Channel (&)[R], int64_t offset, int64_t stride,
                                        int count, const Vectors& vec) const {
    store_run(out + offset, stride, v, count, vec);
  }
};

// The body of a sliding-window block over an out_h x out_w output: grid (tiles_h * tiles_w, channel blocks, N),
// block t.threads. weight: (C, 1, K, K) contiguous, read flipped (tap K * K - 1 - tap) with kFlip; out writes the
// runs (RunEpilogue or RunStore, whose strides are the output's).
template <typename scalar_t, typename acc_t, int K, int R, bool kChannelsLast, bool kFlip, typename Out>
__device__ __forceinline__ void window_conv(const WindowTiling& t, const WindowSource<scalar_t>& src,
                                            const scalar_t* __restrict__ weight, int64_t channels, int out_h,
                                            int out_w, const Out& out) {
  auto weight_at = [&](const scalar_t* row, int tap) { return static_cast<acc_t>(row[kFlip ? K * K - 1 - tap : tap]); };
  static_assert(sizeof(acc_t) * kChannelVector == 16, "the shared tile is read as 16-byte vectors of fp32");
  using Vec4 = Vector16<acc_t>;
  constexpr int kPitch = round4(K);  // NCHW: weights per kernel row in shared memory
  VITKERN_DYNAMIC_SHARED(acc_t, smem);
  const int tid = threadIdx.x;
  const int64_t n = blockIdx.z;
  const int tile_row = t.tiles_w_div.div(static_cast<int>(blockIdx.x));
  const int oh0 = tile_row * t.th;
  const int ow0 = (static_cast<int>(blockIdx.x) - tile_row * t.tiles_w) * t.tw;
  const int plane = t.rows * t.cols * (kChannelsLast ? kClChannels : 1);
  acc_t* tile = smem;
  acc_t* wts = smem + t.groups * plane;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * (kChannelsLast ? kClChannels : t.groups);
  const int row0 = oh0 + src.row_offset;
  const int col0 = ow0 + src.col_offset;

  // The input tile, in the widest vectors the plan found (a uniform branch).
  auto load = [&](auto width) {
    constexpr int V = decltype(width)::value;
    if constexpr (kChannelsLast) {
      load_window_pixels<V>(tile, src, t, n, c0, channels, row0, col0);
    } else {
      load_window_rows<V>(tile, plane, src, t, n, c0, channels, row0, col0);
    }
  };
  constexpr int kMaxVec = 16 / sizeof(scalar_t);
  if (kMaxVec >= 8 && t.vec >= 8) {
    load(std::integral_constant<int, (kMaxVec >= 8 ? 8 : 1)>{});
  } else if (t.vec >= 4) {
    load(std::integral_constant<int, 4>{});
  } else if (t.vec >= 2) {
    load(std::integral_constant<int, 2>{});
  } else {
    load(std::integral_constant<int, 1>{});
  }
  if constexpr (kChannelsLast) {
    // blockDim.x is a multiple of kClChannels, so a thread loads the taps of one channel.
    const int64_t c = c0 + tid % kClChannels;
    const scalar_t* row = weight + c * (K * K);
    for (int tap = tid / kClChannels; tap < K * K; tap += blockDim.x / kClChannels) {
      wts[tap * kClChannels + tid % kClChannels] = c < channels ? weight_at(row, tap) : acc_t(0);
    }
  } else {
    const scalar_t* rows = weight + c0 * (K * K);
    for (int e = tid; e < t.groups * K * kPitch; e += blockDim.x) {
      const int p = e / (K * kPitch);
      const int i = (e / kPitch) % K;
      const int j = e % kPitch;
      wts[e] = j < K && c0 + p < channels ? weight_at(rows + p * (K * K), i * K + j) : acc_t(0);
    }
  }
  __syncthreads();

  if constexpr (kChannelsLast) {
    const int lane = tid % kClLanes;
    const int trow = t.per_group_div.div(tid);  // per_group: kClLanes * tc
    const int tcol = (tid - trow * kClLanes * t.tc) / kClLanes;
    const int oh = oh0 + trow;
    const int ow = ow0 + tcol * R;
    if (trow >= t.th) {
      return;
    }
    const acc_t* in = tile + (trow * t.cols + tcol * R) * kClChannels + lane * kChannelVector;
    const acc_t* w = wts + lane * kChannelVector;
    acc_t acc[R][kChannelVector] = {};
    VITKERN_NO_UNROLL
    for (int i = 0; i < K; ++i) {
      Vec4 wv[K];
      VITKERN_UNROLL
      for (int j = 0; j < K; ++j) {
        wv[j] = load_vector<Vec4>(w + j * kClChannels);
      }
      VITKERN_UNROLL
      for (int q = 0; q < R + K - 1; ++q) {
        const Vec4 v = load_vector<Vec4>(in + q * kClChannels);
        VITKERN_UNROLL
        for (int j = 0; j < K; ++j) {
          if (q - j >= 0 && q - j < R) {
            VITKERN_UNROLL
            for (int e = 0; e < kChannelVector; ++e) {
              acc[q - j][e] += wv[j].v[e] * v.v[e];
            }
          }
        }
      }
      in += t.cols * kClChannels;
      w += K * kClChannels;
    }
    const int64_t c = c0 + lane * kChannelVector;
    if (oh >= out_h || c >= channels) {
      return;
    }
    const int count = channels - c < kChannelVector ? static_cast<int>(channels - c) : kChannelVector;
    typename Out::Channel ch[kChannelVector];
    VITKERN_UNROLL
    for (int e = 0; e < kChannelVector; ++e) {
      ch[e] = out.channel(e < count ? c + e : c);
    }
    const int64_t offset = n * out.s.n + c * out.s.c + static_cast<int64_t>(oh) * out.s.h +
                           static_cast<int64_t>(ow) * out.s.w;
    const auto vec = out.template vectors<kChannelVector>(offset, out.s.c, out.s.w);
    VITKERN_UNROLL
    for (int r = 0; r < R; ++r) {
      if (ow + r < out_w) {
        out.store(acc[r], ch, offset + r * out.s.w, out.s.c, count, vec);
      }
    }
  } else {
    constexpr int kRead = R % 4 == 0 ? 4 : 2;  // fp32 values of a window read: 16 or 8 bytes
    static_assert(R % 2 == 0, "an NCHW run starts on an 8-byte boundary of the shared tile");
    constexpr int kWindow = round_up(R + K - 1, kRead);
    using ReadVec = VectorN<acc_t, kRead>;
    const int group = t.per_group_div.div(tid);  // per_group: tc * th / kNchwRows
    const int within = tid - group * (t.tc * t.th / kNchwRows);
    const int pair = t.tc_div.div(within);
    const int tcol = within - pair * t.tc;
    if (group >= t.groups) {
      return;
    }
    const int oh = oh0 + pair * kNchwRows;
    const int ow = ow0 + tcol * R;
    const acc_t* in = tile + group * plane + pair * kNchwRows * t.cols + kRowLead + tcol * R;
    const acc_t* w = wts + group * K * kPitch;
    // Input row i of the pair's window feeds output row 0 through kernel row i and output row 1 through kernel
    // row i - 1: K + 1 rows, each read once for both.
    acc_t acc[kNchwRows][R] = {};
    auto window = [&](acc_t (&v)[kWindow]) {
      VITKERN_UNROLL
      for (int q = 0; q < kWindow; q += kRead) {
        const ReadVec chunk = load_vector<ReadVec>(in + q);
        VITKERN_UNROLL
        for (int e = 0; e < kRead; ++e) {
          v[q + e] = chunk.v[e];
        }
      }
      in += t.cols;
    };
    auto weights = [&](acc_t (&wv)[kPitch], const acc_t* row) {
      VITKERN_UNROLL
      for (int q = 0; q < kPitch; q += kChannelVector) {
        const Vec4 chunk = load_vector<Vec4>(row + q);
        VITKERN_UNROLL
        for (int e = 0; e < kChannelVector; ++e) {
          wv[q + e] = chunk.v[e];
        }
      }
    };
    auto fma = [&](acc_t (&a)[R], const acc_t (&wv)[kPitch], const acc_t (&v)[kWindow]) {
      VITKERN_UNROLL
      for (int j = 0; j < K; ++j) {
        VITKERN_UNROLL
        for (int r = 0; r < R; ++r) {
          a[r] += wv[j] * v[r + j];
        }
      }
    };
    {
      acc_t v[kWindow], wv[kPitch];
      window(v);
      weights(wv, w);
      fma(acc[0], wv, v);
    }
    VITKERN_NO_UNROLL
    for (int i = 1; i < K; ++i) {
      acc_t v[kWindow], wv[kPitch], wv_above[kPitch];
      window(v);
      weights(wv, w + i * kPitch);
      weights(wv_above, w + (i - 1) * kPitch);
      fma(acc[0], wv, v);
      fma(acc[1], wv_above, v);
    }
    {
      acc_t v[kWindow], wv[kPitch];
      window(v);
      weights(wv, w + (K - 1) * kPitch);
      fma(acc[1], wv, v);
    }
    const int64_t c = c0 + group;
    if (c >= channels || ow >= out_w) {
      return;
    }
    const typename Out::Channel one = out.channel(c);
    typename Out::Channel ch[R];
    VITKERN_UNROLL
    for (int r = 0; r < R; ++r) {
      ch[r] = one;
    }
    const int count = out_w - ow < R ? out_w - ow : R;
    const int64_t offset = n * out.s.n + c * out.s.c + static_cast<int64_t>(oh) * out.s.h +
                           static_cast<int64_t>(ow) * out.s.w;
    const auto vec = out.template vectors<R>(offset, out.s.w, out.s.h);
    VITKERN_UNROLL
    for (int row = 0; row < kNchwRows; ++row) {
      if (oh + row < out_h) {
        out.store(acc[row], ch, offset + row * out.s.h, out.s.w, count, vec);
      }
    }
  }
}

// Forward over the window (see above); pointers as for depthwise_conv2d_fwd_kernel. One resident block per SM is
// all the launch bounds require, so ptxas never spills to fit more.
template <typename scalar_t, typename acc_t, int K, int R, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads, 1)
    depthwise_conv2d_fwd_window_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                                       const scalar_t* __restrict__ bias, const scalar_t* __restrict__ scale,
                                       const scalar_t* __restrict__ shift, const scalar_t* __restrict__ residual,
                                       scalar_t* __restrict__ y, scalar_t* __restrict__ z, Geometry g, Strides sx,
                                       Strides sy, WindowTiling t, int act) {
  const WindowSource<scalar_t> src{x, sx, static_cast<int>(g.h), static_cast<int>(g.w), -g.pad_top, -g.pad_left};
  const RunEpilogue<scalar_t, acc_t> out{{bias, scale, shift, residual, y, z, act}, sy};
  window_conv<scalar_t, acc_t, K, R, kChannelsLast, false>(t, src, weight, g.c, static_cast<int>(g.oh),
                                                            static_cast<int>(g.ow), out);
}

// dx over the window: the correlation of dz (N, C, OH, OW) strides sy with the flipped kernel, dz padded by K - 1
// - padding; dx: (N, C, H, W) strides sx.
template <typename scalar_t, typename acc_t, int K, int R, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads, 1)
    depthwise_conv2d_dx_window_kernel(const scalar_t* __restrict__ dz, const scalar_t* __restrict__ weight,
                                      scalar_t* __restrict__ dx, Geometry g, Strides sx, Strides sy, WindowTiling t) {
  const WindowSource<scalar_t> src{dz, sy, static_cast<int>(g.oh), static_cast<int>(g.ow), g.pad_top - (K - 1),
                                   g.pad_left - (K - 1)};
  window_conv<scalar_t, acc_t, K, R, kChannelsLast, true>(t, src, weight, g.c, static_cast<int>(g.h),
                                                           static_cast<int>(g.w), RunStore<scalar_t, acc_t>{dx, sx});
}

// dz = dy * act'(z) * scale, element-wise over the output (N, C, OH, OW), stored in the storage dtype for the
// sliding-window dx. The output is dense (NCHW or channels_last, strides s): element i of channel (i / plane) %
// channels, plane = OH * OW (NCHW) or 1 (channels_last). grid ceil(numel / (kThreads * V)), V elements a thread:
// V > 1 needs numel, the pointers' alignment and, NCHW, the plane (channels_last: the channel count) to be
// multiples of V, so that a vector stays inside one channel (NCHW) or one pixel (channels_last).
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
    depthwise_conv2d_dz_kernel(GradSource<scalar_t, acc_t> grad, scalar_t* __restrict__ dz, int64_t numel,
                               int64_t channels, int64_t plane) {
  using Vec = VectorN<scalar_t, V>;
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V;
  if (i >= numel) {
    return;
  }
  // 32-bit division where the output allows it (a uniform branch).
  const int64_t c = numel <= INT32_MAX ? static_cast<int64_t>(static_cast<uint32_t>(i) / static_cast<uint32_t>(plane) %
                                                              static_cast<uint32_t>(channels))
                                       : i / plane % channels;
  const Vec d = load_vector<Vec>(grad.dy + i);
  Vec zz;
  if (grad.z != nullptr) {
    zz = load_vector<Vec>(grad.z + i);
  }
  Vec out;
  VITKERN_UNROLL
  for (int k = 0; k < V; ++k) {
    acc_t value = static_cast<acc_t>(d.v[k]);
    if (grad.z != nullptr) {
      value *= activate_grad(static_cast<acc_t>(zz.v[k]), grad.act);
    }
    if (grad.scale != nullptr) {
      value *= static_cast<acc_t>(grad.scale[plane == 1 ? c + k : c]);
    }
    out.v[k] = static_cast<scalar_t>(value);
  }
  store_vector(dz + i, out);
}

// dx, the transposed convolution of dz. grid (tiles_h * tiles_w over the input, ceil(C / cb), N), block
// kThreads, shared: the dz tile of one tap chunk. dy, z: (N, C, OH, OW) strides sy; weight: (C, 1, kh, kw)
// contiguous; dx: (N, C, H, W) strides sx.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    depthwise_conv2d_dx_kernel(GradSource<scalar_t, acc_t> grad, const scalar_t* __restrict__ weight,
                               scalar_t* __restrict__ dx, Geometry g, Strides sx, Strides sy, Tiling t) {
  VITKERN_DYNAMIC_SHARED(acc_t, tile);
  const int tid = threadIdx.x;
  const auto [ih0, iw0, c0, n, cl, c, tile_outputs] = block_tile(t);
  const int taps = g.kh * g.kw;
  const int dh_q = g.dh / g.sh, dh_r = g.dh % g.sh;
  const int dw_q = g.dw / g.sw, dw_r = g.dw % g.sw;

  acc_t acc[kOutputsPerThread];
  for (int k = 0; k < kOutputsPerThread; ++k) {
    acc[k] = acc_t(0);
  }

  for (int r0 = 0; r0 < g.kh; r0 += t.rc) {
    const int rc = min(t.rc, g.kh - r0);
    // Output rows reached from input rows [ih0, ih0 + th) through taps [r0, r0 + rc).
    const int row_lo = div_ceil(ih0 + g.pad_top - (r0 + rc - 1) * g.dh, g.sh);
    const int rows = div_floor(ih0 + t.th - 1 + g.pad_top - r0 * g.dh, g.sh) - row_lo + 1;
    for (int q0 = 0; q0 < g.kw; q0 += t.cc) {
      const int cc = min(t.cc, g.kw - q0);
      const int col_lo = div_ceil(iw0 + g.pad_left - (q0 + cc - 1) * g.dw, g.sw);
      const int cols = div_floor(iw0 + t.tw - 1 + g.pad_left - q0 * g.dw, g.sw) - col_lo + 1;
      __syncthreads();
      load_grad_tile<scalar_t, acc_t>(tile, grad, g, sy, n, c0, t.cb, row_lo, col_lo, max(rows, 0), max(cols, 0),
                                      nullptr);
      __syncthreads();
      if (c < g.c) {
        for (int k = 0; k < kOutputsPerThread; ++k) {
          if (tid + k * kThreads >= tile_outputs) {
            continue;
          }
          const int p = (tid + k * kThreads) / t.cb;
          // Tap (i, j) reads dz at tile row (ih + pad_top - (r0 + i) * dh) / sh - row_lo when that divides
          // exactly, and likewise for columns. Quotient and remainder are stepped tap by tap (no division).
          const int row_start = ih0 + p / t.tw + g.pad_top - r0 * g.dh - row_lo * g.sh;
          const int col_start = iw0 + p % t.tw + g.pad_left - q0 * g.dw - col_lo * g.sw;
          const int col_q0 = div_floor(col_start, g.sw);
          const int col_r0 = col_start - col_q0 * g.sw;
          int row_q = div_floor(row_start, g.sh);
          int row_r = row_start - row_q * g.sh;
          for (int i = 0; i < rc; ++i) {
            if (row_r == 0 && row_q >= 0) {
              int col_q = col_q0;
              int col_r = col_r0;
              const scalar_t* w_row = weight + c * taps + (r0 + i) * g.kw + q0;
              for (int j = 0; j < cc; ++j) {
                if (col_r == 0 && col_q >= 0) {
                  acc[k] += static_cast<acc_t>(w_row[j]) * tile[(row_q * cols + col_q) * t.cb + cl];
                }
                col_r -= dw_r;
                col_q -= dw_q;
                if (col_r < 0) {
                  col_r += g.sw;
                  col_q -= 1;
                }
              }
            }
            row_r -= dh_r;
            row_q -= dh_q;
            if (row_r < 0) {
              row_r += g.sh;
              row_q -= 1;
            }
          }
        }
      }
    }
  }

  for (int k = 0; k < kOutputsPerThread; ++k) {
    const int p = (tid + k * kThreads) / t.cb;
    const int ih = ih0 + p / t.tw;
    const int iw = iw0 + p % t.tw;
    if (tid + k * kThreads < tile_outputs && c < g.c && ih < g.h && iw < g.w) {
      dx[n * sx.n + c * sx.c + ih * sx.h + iw * sx.w] = static_cast<scalar_t>(acc[k]);
    }
  }
}

// Calls fn(n, oh0, ow0) for each (image, output tile) item [blockIdx.x * per_block, (blockIdx.x + 1) * per_block)
// of a dweight launch, in order. 32-bit item arithmetic (the launcher checks the count fits): 64-bit division is a
// subroutine call on the GPU.
template <typename Fn>
__device__ __forceinline__ void for_each_item(const Tiling& t, const Geometry& g, int per_block, Fn&& fn) {
  const int tiles = t.tiles_h * t.tiles_w;
  const int items = static_cast<int>(g.n) * tiles;
  const int item_end = min(items, static_cast<int>(blockIdx.x + 1) * per_block);
  for (int item = static_cast<int>(blockIdx.x) * per_block; item < item_end; ++item) {
    const int tile = item % tiles;
    fn(static_cast<int64_t>(item / tiles), (tile / t.tiles_w) * t.th, (tile % t.tiles_w) * t.tw);
  }
}

// dweight partials and the epilogue sums, any stride and dilation. grid (G, ceil(C / cb), tap chunks), block
// kThreads, shared: the dz tile then the x tile of one tap chunk. Block (g, cblock, chunk) handles items
// [g * per_block, (g + 1) * per_block) of the N * tiles_h * tiles_w (batch, output tile) items.
// partial_w: (C, G, kh * kw); partial_sums: (C, G, kEpilogueSums), written by the chunk-0 blocks; either null
// when not needed.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void dweight_generic(const GradSource<scalar_t, acc_t>& grad,
                                                const scalar_t* __restrict__ x, acc_t* __restrict__ partial_w,
                                                acc_t* __restrict__ partial_sums, const Geometry& g,
                                                const Strides& sx, const Strides& sy, const Tiling& t,
                                                int per_block) {
  VITKERN_DYNAMIC_SHARED(acc_t, smem);
  const int tid = threadIdx.x;
  const int blocks_g = gridDim.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * t.cb;
  const int chunks_w = (g.kw + t.cc - 1) / t.cc;
  const int r0 = (blockIdx.z / chunks_w) * t.rc;
  const int q0 = (blockIdx.z % chunks_w) * t.cc;
  const int rc = min(t.rc, g.kh - r0);
  const int cc = min(t.cc, g.kw - q0);
  const int rows = (t.th - 1) * g.sh + (rc - 1) * g.dh + 1;
  const int cols = (t.tw - 1) * g.sw + (cc - 1) * g.dw + 1;
  const int tile_pixels = t.th * t.tw;
  acc_t* grad_tile = smem;
  acc_t* x_tile = smem + tile_pixels * t.cb;

  // Slot s = (tap of the chunk) * cb + channel. With fewer slots than threads, `replicas` threads share a slot,
  // each taking every replicas-th pixel of the tile.
  const int slots = rc * cc * t.cb;
  const int replicas = slots >= kThreads ? 1 : kThreads / slots;
  const int replica = tid % replicas;
  const int first_slot = tid / replicas;
  const int slot_step = kThreads / replicas;
  const bool want_w = partial_w != nullptr;
  const bool want_sums = partial_sums != nullptr && blockIdx.z == 0;

  acc_t acc[kAccPerThread];
  for (int k = 0; k < kAccPerThread; ++k) {
    acc[k] = acc_t(0);
  }
  acc_t sums[kEpilogueSums] = {acc_t(0), acc_t(0), acc_t(0)};

  for_each_item(t, g, per_block, [&](int64_t n, int oh0, int ow0) {
    __syncthreads();
    load_grad_tile<scalar_t, acc_t>(grad_tile, grad, g, sy, n, c0, t.cb, oh0, ow0, t.th, t.tw,
                                    want_sums ? sums : nullptr);
    if (want_w) {
      load_input_tile(x_tile, x, g, sx, n, c0, t.cb, oh0 * g.sh - g.pad_top + r0 * g.dh,
                      ow0 * g.sw - g.pad_left + q0 * g.dw, rows, cols, t.load_mode);
    }
    __syncthreads();
    if (want_w) {
      for (int k = 0; k < kAccPerThread; ++k) {
        const int s = first_slot + k * slot_step;
        if (s >= slots) {
          break;
        }
        const int cl = s % t.cb;
        const int tap = s / t.cb;
        const int base = ((tap / cc) * g.dh * cols + (tap % cc) * g.dw) * t.cb + cl;
        acc_t a = acc[k];
        for (int p = replica; p < tile_pixels; p += replicas) {
          const int in = ((p / t.tw) * g.sh * cols + (p % t.tw) * g.sw) * t.cb;
          a += grad_tile[p * t.cb + cl] * x_tile[in + base];
        }
        acc[k] = a;
      }
    }
  });

  // Fixed-order reductions through shared memory: replicas of a slot, then the threads of a channel.
  acc_t* red_w = smem;
  acc_t* red_sums = smem + kThreads;
  __syncthreads();
  if (want_w && replicas > 1 && first_slot < slots) {
    red_w[first_slot * replicas + replica] = acc[0];
  }
  for (int j = 0; j < kEpilogueSums; ++j) {
    red_sums[j * kThreads + tid] = sums[j];
  }
  __syncthreads();
  const int taps = g.kh * g.kw;
  if (want_w) {
    for (int k = 0; k < kAccPerThread; ++k) {
      const int s = first_slot + k * slot_step;
      if (s >= slots || replica != 0) {
        break;
      }
      acc_t total = acc[k];
      if (replicas > 1) {
        total = acc_t(0);
        for (int r = 0; r < replicas; ++r) {
          total += red_w[s * replicas + r];
        }
      }
      const int64_t c = c0 + s % t.cb;
      const int tap = s / t.cb;
      if (c < g.c) {
        partial_w[(c * blocks_g + blockIdx.x) * taps + (r0 + tap / cc) * g.kw + q0 + tap % cc] = total;
      }
    }
  }
  if (want_sums && tid < t.cb && c0 + tid < g.c) {
    for (int j = 0; j < kEpilogueSums; ++j) {
      acc_t total = acc_t(0);
      for (int u = tid; u < kThreads; u += t.cb) {
        total += red_sums[j * kThreads + u];
      }
      partial_sums[((c0 + tid) * blocks_g + blockIdx.x) * kEpilogueSums + j] = total;
    }
  }
}

// dweight at stride 1 and dilation 1, in runs of kRun consecutive taps of one tap row. Taps are chunked by rows
// only (t.cc == kw); a tap row is covered by ceil(kw / kRun) runs, the taps of the last run past kw computed on
// the x tile's extra columns and dropped. A unit is (tap row, run, channel), channel fastest; a thread owns up to
// kDweightUnits units, with kRun accumulators each. With fewer units than threads, `replicas` threads share a unit,
// each taking its own jobs: a job is one tile row's segment of whole kRun-pixel groups (t.tw is a multiple of
// kRun). A job walks its pixels keeping the kRun x values the run needs in a register window (a ring indexed at
// compile time, the pixel loop unrolled by kRun, or by 2 * kRun for short runs), so each dz and x value read from
// shared memory feeds kRun FMAs.
// Shared: the dz tile (th x tw x cb), then the x tile (th + rc - 1 rows of tw + runs * kRun - 1 columns).
template <typename scalar_t, typename acc_t, int kRun>
__device__ __forceinline__ void dweight_runs(const GradSource<scalar_t, acc_t>& grad, const scalar_t* __restrict__ x,
                                             acc_t* __restrict__ partial_w, acc_t* __restrict__ partial_sums,
                                             const Geometry& g, const Strides& sx, const Strides& sy,
                                             const Tiling& t, int per_block) {
  VITKERN_DYNAMIC_SHARED(acc_t, smem);
  const int tid = threadIdx.x;
  const int blocks_g = gridDim.x;
  const int cb = t.cb;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * cb;
  const int r0 = static_cast<int>(blockIdx.z) * t.rc;
  const int rc = min(t.rc, g.kh - r0);
  const int runs = (g.kw + kRun - 1) / kRun;
  const int rows = t.th + rc - 1;
  const int cols = t.tw + runs * kRun - 1;
  acc_t* grad_tile = smem;
  acc_t* x_tile = smem + t.th * t.tw * cb;

  const int units = rc * runs * cb;
  const int replicas = units >= kThreads ? 1 : kThreads / units;
  const int replica = units >= kThreads ? 0 : tid / units;
  const int first_unit = units >= kThreads ? tid : tid % units;
  const bool active = replica < replicas;
  // Jobs: th rows times `segments` segments of seg_groups kRun-pixel groups, enough for the replicas.
  const int groups_w = t.tw / kRun;
  const int wanted_segments = min(groups_w, (replicas + t.th - 1) / t.th);
  const int seg_groups = (groups_w + wanted_segments - 1) / wanted_segments;
  const int segments = (groups_w + seg_groups - 1) / seg_groups;
  const int jobs = t.th * segments;
  const bool want_w = partial_w != nullptr;
  const bool want_sums = partial_sums != nullptr && blockIdx.z == 0;
  // Short runs walk their pixels two groups an iteration, so the loop's own instructions weigh less.
  constexpr bool kPairs = kRun <= 5;

  acc_t acc[kDweightUnits][kRun];
  VITKERN_UNROLL
  for (int u = 0; u < kDweightUnits; ++u) {
    VITKERN_UNROLL
    for (int e = 0; e < kRun; ++e) {
      acc[u][e] = acc_t(0);
    }
  }
  acc_t sums[kEpilogueSums] = {acc_t(0), acc_t(0), acc_t(0)};

  for_each_item(t, g, per_block, [&](int64_t n, int oh0, int ow0) {
    __syncthreads();
    if (want_sums) {  // two calls, not a conditional pointer: sums stays in registers
      load_grad_tile<scalar_t, acc_t>(grad_tile, grad, g, sy, n, c0, cb, oh0, ow0, t.th, t.tw, sums);
    } else {
      load_grad_tile<scalar_t, acc_t>(grad_tile, grad, g, sy, n, c0, cb, oh0, ow0, t.th, t.tw, nullptr);
    }
    if (want_w) {
      load_input_tile(x_tile, x, g, sx, n, c0, cb, oh0 - g.pad_top + r0, ow0 - g.pad_left, rows, cols,
                      t.load_mode);
    }
    __syncthreads();
    if (want_w && active) {
      VITKERN_UNROLL
      for (int u = 0; u < kDweightUnits; ++u) {
        const int s = first_unit + u * kThreads;
        if (s < units) {
          const int cl = s % cb;
          const int run = (s / cb) % runs;
          const int i = s / cb / runs;
          const acc_t* x_unit = x_tile + (i * cols + run * kRun) * cb + cl;
          // The jobs of this unit, with the pixel stride of the tiles (cb) as kStride when that is not 0, so that
          // the loop's shared-memory reads take constant offsets.
          auto walk = [&](auto stride_constant) {
            constexpr int kStride = decltype(stride_constant)::value;
            const int stride = kStride > 0 ? kStride : cb;
            VITKERN_NO_UNROLL
            for (int job = replica; job < jobs; job += replicas) {
              const int py = job / segments;
              const int px0 = (job % segments) * seg_groups * kRun;
              const int px1 = min(t.tw, px0 + seg_groups * kRun);
              const acc_t* xp = x_unit + (py * cols + px0) * stride;
              const acc_t* dp = grad_tile + (py * t.tw + px0) * stride + cl;
              // win[(q + e) % kRun] holds x at pixel column px + q + e, for the q-th pixel of a group at px.
              acc_t win[kRun];
              VITKERN_UNROLL
              for (int e = 0; e + 1 < kRun; ++e) {
                win[e] = xp[e * stride];
              }
              // One group of kRun pixels; the ring is back where it started after it.
              auto group = [&] {
                VITKERN_UNROLL
                for (int q = 0; q < kRun; ++q) {
                  win[(q + kRun - 1) % kRun] = xp[(q + kRun - 1) * stride];
                  const acc_t d = dp[q * stride];
                  VITKERN_UNROLL
                  for (int e = 0; e < kRun; ++e) {
                    acc[u][e] += d * win[(q + e) % kRun];
                  }
                }
                xp += kRun * stride;
                dp += kRun * stride;
              };
              int px = px0;
              if constexpr (kPairs) {
                VITKERN_NO_UNROLL
                for (; px + 2 * kRun <= px1; px += 2 * kRun) {
                  group();
                  group();
                }
              }
              VITKERN_NO_UNROLL
              for (; px < px1; px += kRun) {
                group();
              }
            }
          };
          if (cb == 1) {
            walk(std::integral_constant<int, 1>{});
          } else if (cb == kMaxChannelBlock) {
            walk(std::integral_constant<int, kMaxChannelBlock>{});
          } else {
            walk(std::integral_constant<int, 0>{});
          }
        }
      }
    }
  });

  // Fixed-order reductions through shared memory: replicas of a unit, then the threads of a channel.
  acc_t* red_w = smem;
  acc_t* red_sums = smem + kThreads * kRun;
  __syncthreads();
  if (want_w && replicas > 1 && active) {
    VITKERN_UNROLL
    for (int e = 0; e < kRun; ++e) {
      red_w[(first_unit * kRun + e) * replicas + replica] = acc[0][e];
    }
  }
  for (int j = 0; j < kEpilogueSums; ++j) {
    red_sums[j * kThreads + tid] = sums[j];
  }
  __syncthreads();
  const int taps = g.kh * g.kw;
  if (want_w && replica == 0) {
    VITKERN_UNROLL
    for (int u = 0; u < kDweightUnits; ++u) {
      const int s = first_unit + u * kThreads;
      if (s < units) {
        const int64_t c = c0 + s % cb;
        const int run = (s / cb) % runs;
        const int i = s / cb / runs;
        VITKERN_UNROLL
        for (int e = 0; e < kRun; ++e) {
          acc_t total = acc[u][e];
          if (replicas > 1) {
            total = acc_t(0);
            for (int r = 0; r < replicas; ++r) {
              total += red_w[(s * kRun + e) * replicas + r];
            }
          }
          const int j = run * kRun + e;
          if (c < g.c && j < g.kw) {
            partial_w[(c * blocks_g + blockIdx.x) * taps + (r0 + i) * g.kw + j] = total;
          }
        }
      }
    }
  }
  if (want_sums && tid < cb && c0 + tid < g.c) {
    for (int j = 0; j < kEpilogueSums; ++j) {
      acc_t total = acc_t(0);
      for (int u = tid; u < kThreads; u += cb) {
        total += red_sums[j * kThreads + u];
      }
      partial_sums[((c0 + tid) * blocks_g + blockIdx.x) * kEpilogueSums + j] = total;
    }
  }
}

// dweight partials and the epilogue sums: dweight_runs for kRun > 0 (stride 1, dilation 1), dweight_generic for
// kRun == 0. grid (G, ceil(C / cb), tap chunks), block kThreads; arguments as for dweight_generic. The launch
// bounds require only one resident block per SM, which lets ptxas keep the accumulators in registers.
template <typename scalar_t, typename acc_t, int kRun>
__global__ void __launch_bounds__(kThreads, 1)
    depthwise_conv2d_dweight_kernel(GradSource<scalar_t, acc_t> grad, const scalar_t* __restrict__ x,
                                    acc_t* __restrict__ partial_w, acc_t* __restrict__ partial_sums, Geometry g,
                                    Strides sx, Strides sy, Tiling t, int per_block) {
  if constexpr (kRun > 0) {
    dweight_runs<scalar_t, acc_t, kRun>(grad, x, partial_w, partial_sums, g, sx, sy, t, per_block);
  } else {
    dweight_generic<scalar_t, acc_t>(grad, x, partial_w, partial_sums, g, sx, sy, t, per_block);
  }
}

// out[r, j] = sum over g in order of partial[r, g, j]. partial: (rows, G, cols), out: (rows, cols).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    reduce_partials_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ out, int rows, int blocks_g,
                           int cols) {
  const int idx = static_cast<int>(blockIdx.x) * kThreads + static_cast<int>(threadIdx.x);
  if (idx < rows * cols) {
    const int64_t r = idx / cols;
    const int j = idx % cols;
    acc_t total = acc_t(0);
    for (int b = 0; b < blocks_g; ++b) {
      total += partial[(r * blocks_g + b) * cols + j];
    }
    out[idx] = total;
  }
}

// --- launchers ---------------------------------------------------------------------------------------------------

inline int pow2_ceil(int64_t v) {
  int p = 1;
  while (p < v && p < (1 << 20)) {
    p *= 2;
  }
  return p;
}

inline bool channels_last(const Strides& s, const Geometry& g) { return s.c == 1 && g.c > 1; }

// Output tile and channel block of a forward/dx launch over an out_h x out_w grid.
inline Tiling base_tiling(const Strides& s, const Geometry& g, int64_t out_h, int64_t out_w, int max_outputs) {
  Tiling t{};
  t.cb = channels_last(s, g) ? static_cast<int>(std::min<int64_t>(kMaxChannelBlock, pow2_ceil(g.c))) : 1;
  const int pixels = max_outputs / t.cb;
  t.tw = std::min(pow2_ceil(out_w), t.cb > 1 ? 8 : 32);
  t.th = std::min(pow2_ceil(out_h), std::max(1, pixels / t.tw));
  t.tw = std::min(pow2_ceil(out_w), std::max(1, pixels / t.th));
  t.rc = g.kh;
  t.cc = g.kw;
  return t;
}

// Shrinks the tap chunk, then the tile, until shared_floats(t) fits the budget.
template <typename SharedFloats>
void fit_shared(Tiling& t, const Geometry& g, std::size_t acc_bytes, SharedFloats shared_floats) {
  while (shared_floats(t) * acc_bytes > kSharedBudget) {
    if (t.rc > 1 && (t.rc * g.dh >= t.cc * g.dw || t.cc == 1)) {
      t.rc = (t.rc + 1) / 2;
    } else if (t.cc > 1) {
      t.cc = (t.cc + 1) / 2;
    } else if (t.th >= t.tw && t.th > 1) {
      t.th /= 2;
    } else {
      t.tw /= 2;
    }
  }
}

// Whether `stride` keeps 16-byte vectors aligned along a dimension of `size` (any stride does for size 1).
inline bool vector_stride(int64_t stride, int64_t size, int vector_size) {
  return size == 1 || stride % vector_size == 0;
}

// How the input tile can be read (see LoadMode); `aligned`: x is 16-byte aligned.
inline LoadMode load_mode(const Tiling& t, const Strides& s, const Geometry& g, int vector_size, bool aligned) {
  if (!aligned || !vector_stride(s.n, g.n, vector_size) || !vector_stride(s.h, g.h, vector_size)) {
    return kScalarLoads;
  }
  if (channels_last(s, g)) {
    const bool whole_pixels = t.cb % vector_size == 0 && g.c % vector_size == 0 && vector_stride(s.w, g.w, vector_size);
    return whole_pixels ? kChannelVectors : kScalarLoads;
  }
  const bool whole_rows = s.w == 1 && g.w % vector_size == 0 && vector_stride(s.c, g.c, vector_size);
  return t.cb == 1 && whole_rows ? kRowVectors : kScalarLoads;
}

inline void finish_tiling(Tiling& t, int64_t out_h, int64_t out_w, const Strides& s, const Geometry& g,
                          int vector_size, bool aligned) {
  t.tiles_h = static_cast<int>((out_h + t.th - 1) / t.th);
  t.tiles_w = static_cast<int>((out_w + t.tw - 1) / t.tw);
  t.load_mode = load_mode(t, s, g, vector_size, aligned);
}

inline int64_t fwd_tile_floats(const Tiling& t, const Geometry& g) {
  return static_cast<int64_t>((t.th - 1) * g.sh + (t.rc - 1) * g.dh + 1) * ((t.tw - 1) * g.sw + (t.cc - 1) * g.dw + 1) *
         t.cb;
}

inline int64_t dx_tile_floats(const Tiling& t, const Geometry& g) {
  return static_cast<int64_t>((t.th - 1 + (t.rc - 1) * g.dh) / g.sh + 2) * ((t.tw - 1 + (t.cc - 1) * g.dw) / g.sw + 2) *
         t.cb;
}

inline int64_t dweight_shared_floats(const Tiling& t, const Geometry& g) {
  return std::max<int64_t>(t.th * t.tw * t.cb + fwd_tile_floats(t, g), kThreads * (1 + kEpilogueSums));
}

template <typename scalar_t>
bool aligned16(const scalar_t* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

// --- launch plans: what the launchers below launch, also reported by the depthwise_conv2d_plan op -------------

// How c++filt spells a kernel parameter's type in the kernel's demangled name. depthwise_conv.cu adds the
// torch storage types.
template <typename T>
struct Spelling;
template <>
struct Spelling<float> {
  static std::string get() { return "float"; }
};
template <>
struct Spelling<int> {
  static std::string get() { return "int"; }
};
template <>
struct Spelling<long> {
  static std::string get() { return "long"; }
};
template <typename T>
struct Spelling<const T> {
  static std::string get() { return Spelling<T>::get() + " const"; }
};
template <typename T>
struct Spelling<T*> {
  static std::string get() { return Spelling<T>::get() + "*"; }
};
template <>
struct Spelling<Geometry> {
  static std::string get() { return "vitkern::dwconv::Geometry"; }
};
template <>
struct Spelling<Strides> {
  static std::string get() { return "vitkern::dwconv::Strides"; }
};
template <>
struct Spelling<Tiling> {
  static std::string get() { return "vitkern::dwconv::Tiling"; }
};
template <typename scalar_t, typename acc_t>
struct Spelling<GradSource<scalar_t, acc_t>> {
  static std::string get() {
    return "vitkern::dwconv::GradSource<" + Spelling<scalar_t>::get() + ", " + Spelling<acc_t>::get() + ">";
  }
};

// The demangled name of kernel `name`<template_args> (as c++filt prints the symbol), its parameter types read off
// the kernel's own type so that the two cannot drift apart.
template <typename... Params>
std::string kernel_name(const char* name, const std::string& template_args, void (*)(Params...)) {
  std::string params;
  ((params += (params.empty() ? "" : ", ") + Spelling<Params>::get()), ...);
  return std::string("void vitkern::dwconv::") + name + "<" + template_args + ">(" + params + ")";
}

// One kernel launch: "<demangled kernel name>|gx,gy,gz|bx,by,bz|dynamic_smem_bytes".
inline std::string describe_launch(const std::string& kernel, dim3 grid, dim3 block, std::size_t shared_bytes) {
  auto dims = [](dim3 d) {
    return std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z);
  };
  return kernel + "|" + dims(grid) + "|" + dims(block) + "|" + std::to_string(shared_bytes);
}

template <typename scalar_t, typename acc_t>
std::string type_args() {
  return Spelling<scalar_t>::get() + ", " + Spelling<acc_t>::get();
}

template <>
struct Spelling<WindowTiling> {
  static std::string get() { return "vitkern::dwconv::WindowTiling"; }
};

// The kernel sizes with a sliding-window kernel (compile-time K x K, stride 1, dilation 1).
using WindowKernelSizes = KernelSizes<3, 5, 7, 9, 13, 31>;

// The run of Rs that computes the fewest outputs past the end of a row of `width` (ties: the longer run).
template <int... Rs>
int best_window_run(int64_t width, KernelSizes<Rs...>) {
  int best = 0;
  int64_t best_cols = INT64_MAX;
  for (int r : {Rs...}) {
    const int64_t cols = (width + r - 1) / r * r;
    if (cols < best_cols || (cols == best_cols && r > best)) {
      best = r;
      best_cols = cols;
    }
  }
  return best;
}

// The widest vector (elements, at most kMax) the sliding-window tile load can read src (strides s, h x w, c
// channels) in: across channels in channels_last, along rows in NCHW; 1 when src is not 16-byte aligned.
inline int window_vector(const Strides& s, int64_t n, int64_t c, int64_t h, int64_t w, bool cl, int max_vector,
                         bool aligned) {
  if (!aligned) {
    return 1;
  }
  for (int v = max_vector; v > 1; v /= 2) {
    const bool outer = vector_stride(s.n, n, v) && vector_stride(s.h, h, v);
    const bool fits = cl ? outer && s.c == 1 && c % v == 0 && v <= kClChannels && vector_stride(s.w, w, v)
                         : outer && s.w == 1 && w % v == 0 && vector_stride(s.c, c, v);
    if (fits) {
      return v;
    }
  }
  return 1;
}

// Sets t to the sliding-window tiling of a K x K kernel over an out_h x out_w output (the forward's output, or
// dx's input) whose tile is read from src (strides s, src_h x src_w); false when shared memory cannot hold even
// the smallest tile. `aligned`: src is 16-byte aligned.
inline bool window_tiling(const Geometry& g, const Strides& s, int64_t src_h, int64_t src_w, int64_t out_h,
                          int64_t out_w, int max_vector, bool aligned, WindowTiling& t) {
  const int k = g.kh;
  const bool cl = channels_last(s, g);
  const int lanes = cl ? kClLanes : 1;
  const int ow = static_cast<int>(out_w);
  const int oh = static_cast<int>(out_h);
  t = WindowTiling{};
  t.run = cl ? best_window_run(out_w, ClRuns{}) : best_window_run(out_w, NchwRuns{});
  t.vec = window_vector(s, g.n, g.c, src_h, src_w, cl, max_vector, aligned);
  // At most a quarter of the block across a row.
  const int tc_max = kThreads / lanes / 4;
  t.tc = std::min((ow + t.run - 1) / t.run, tc_max);
  t.tw = t.tc * t.run;
  // As many rows as the block's threads allow, balanced over the row tiles (NCHW: kNchwRows a thread, so an
  // even number).
  const int rows_per_thread = cl ? 1 : kNchwRows;
  const int th_max = kThreads / (lanes * t.tc) * rows_per_thread;  // a multiple of rows_per_thread
  t.th = round_up((oh + (oh + th_max - 1) / th_max - 1) / ((oh + th_max - 1) / th_max), rows_per_thread);
  t.groups = cl ? 1 : kThreads / (t.tc * t.th / kNchwRows);
  // NCHW rows: the columns the windows read, in vectors from the one holding the first, whatever its offset.
  auto row_vectors = [&] { return (t.vec - 1 + t.tw + round4(k - 1) + t.vec - 1) / t.vec; };
  auto shared_floats = [&] {
    t.rows = t.th + k - 1;
    t.cols = cl ? t.tw + k - 1 : round4(kRowLead + row_vectors() * t.vec);
    const int64_t planes = static_cast<int64_t>(t.rows) * t.cols * (cl ? kClChannels : t.groups);
    return planes + static_cast<int64_t>(k) * (cl ? k * kClChannels : round4(k) * t.groups);
  };
  while (shared_floats() * static_cast<int64_t>(sizeof(float)) > static_cast<int64_t>(kWindowSharedBudget)) {
    if (t.groups > 1) {
      --t.groups;
    } else if (t.th > rows_per_thread) {
      t.th = round_up((t.th + 1) / 2, rows_per_thread);
    } else if (t.tc > 1) {
      t.tc = (t.tc + 1) / 2;
      t.tw = t.tc * t.run;
    } else {
      return false;
    }
  }
  if (!cl) {
    // Of the plane counts that fit, the one that leaves the fewest lanes idle over all channel blocks (whole warps,
    // no planes past the channels); ties: the most planes a block.
    const int per_group = t.tc * t.th / kNchwRows;
    const int most = t.groups;
    int64_t best_lanes = INT64_MAX;
    for (int groups = most; groups >= 1; --groups) {
      const int64_t lanes_used = (g.c + groups - 1) / groups * round_up(groups * per_group, 32);
      if (lanes_used < best_lanes) {
        best_lanes = lanes_used;
        t.groups = groups;
      }
    }
    shared_floats();
  }
  // The threads the tiling computes with.
  const int used = lanes * t.tc * t.th / rows_per_thread * t.groups;
  t.per_row = cl ? 0 : row_vectors();
  t.threads = round_up(used, 32);
  t.step = cl ? t.threads : 0;
  t.tiles_h = (oh + t.th - 1) / t.th;
  t.tiles_w = (ow + t.tw - 1) / t.tw;
  t.tiles_w_div = FastDiv(t.tiles_w);
  t.per_group_div = FastDiv(cl ? kClLanes * t.tc : t.tc * t.th / kNchwRows);
  t.tc_div = FastDiv(t.tc);
  t.load_div = FastDiv(cl ? t.cols : t.rows);
  return true;
}

// A forward or dx launch: the generic kernel (window == 0, tiling) or the sliding-window kernel for K = window
// (window_tiling, channels_last as `cl`).
struct ConvLaunch {
  int window;
  bool cl;
  Tiling tiling;
  WindowTiling window_tiling;
  dim3 grid, block;
  std::size_t shared_bytes;
};

template <int... Ks>
bool has_window_kernel(int k, KernelSizes<Ks...>) {
  return ((k == Ks) || ...);
}

// The sliding-window launch over out_h x out_w reading src (strides s, src_h x src_w) when g allows one (else
// window == 0).
template <typename scalar_t, typename acc_t>
ConvLaunch plan_window(const Geometry& g, const Strides& s, int64_t src_h, int64_t src_w, int64_t out_h,
                       int64_t out_w, bool aligned) {
  ConvLaunch l{};
  const bool window = g.kh == g.kw && g.sh == 1 && g.sw == 1 && g.dh == 1 && g.dw == 1 &&
                      has_window_kernel(g.kh, WindowKernelSizes{}) && std::is_same_v<acc_t, float> &&
                      out_h <= INT32_MAX / 2 && out_w <= INT32_MAX / 2 &&
                      // the tile load reads the nearest pixel for one outside: there must be one
                      src_h > 0 && src_w > 0 && out_h > 0 && out_w > 0 &&
                      // offsets within an image, and (NCHW) within the block's planes, in 32 bits
                      s.h * src_h + s.w * src_w + s.c * std::min<int64_t>(g.c, kThreads) <= INT32_MAX;
  if (window && window_tiling(g, s, src_h, src_w, out_h, out_w, Vector16<scalar_t>::kSize, aligned,
                              l.window_tiling)) {
    const WindowTiling& t = l.window_tiling;
    l.window = g.kh;
    l.cl = channels_last(s, g);
    const int64_t channels = l.cl ? kClChannels : t.groups;
    l.grid = dim3(t.tiles_h * t.tiles_w, static_cast<unsigned int>((g.c + channels - 1) / channels), g.n);
    l.block = dim3(t.threads);
    const int64_t planes = static_cast<int64_t>(t.rows) * t.cols * (l.cl ? kClChannels : t.groups);
    const int64_t weights = static_cast<int64_t>(g.kh) * (l.cl ? g.kh * kClChannels : round4(g.kh) * t.groups);
    l.shared_bytes = (planes + weights) * sizeof(acc_t);
  }
  return l;
}

// The launch of the forward (kDx false: outputs of g.oh x g.ow from x, strides sx) or of dx (kDx true: inputs of
// g.h x g.w from dz, strides sy), as the sliding-window kernel when it applies, else as the generic tiled kernel.
// `aligned`: the tensor the tile is read from (x, or dz) is 16-byte aligned.
template <typename scalar_t, typename acc_t, bool kDx>
ConvLaunch plan_conv(const Geometry& g, const Strides& sx, const Strides& sy, bool aligned) {
  const int64_t rows = kDx ? g.h : g.oh;
  const int64_t cols = kDx ? g.w : g.ow;
  ConvLaunch l = kDx ? plan_window<scalar_t, acc_t>(g, sy, g.oh, g.ow, rows, cols, aligned)
                     : plan_window<scalar_t, acc_t>(g, sx, g.h, g.w, rows, cols, aligned);
  if (l.window != 0) {
    return l;
  }
  const auto tile_floats = [&](const Tiling& u) { return kDx ? dx_tile_floats(u, g) : fwd_tile_floats(u, g); };
  Tiling t = base_tiling(sx, g, rows, cols, kMaxTileOutputs);
  fit_shared(t, g, sizeof(acc_t), tile_floats);
  // The generic dx kernel reads dz element by element; the forward's load mode is x's.
  finish_tiling(t, rows, cols, sx, g, Vector16<scalar_t>::kSize, !kDx && aligned);
  l.tiling = t;
  l.grid = dim3(t.tiles_h * t.tiles_w, static_cast<unsigned int>((g.c + t.cb - 1) / t.cb), g.n);
  l.block = dim3(kThreads);
  l.shared_bytes = tile_floats(t) * sizeof(acc_t);
  return l;
}

template <typename scalar_t, typename acc_t>
ConvLaunch plan_fwd(const Geometry& g, const Strides& sx, bool aligned) {
  return plan_conv<scalar_t, acc_t, false>(g, sx, sx, aligned);
}

// dy and dz are laid out like x (the op makes them so).
template <typename scalar_t, typename acc_t>
ConvLaunch plan_dx(const Geometry& g, const Strides& sx, const Strides& sy, bool aligned) {
  return plan_conv<scalar_t, acc_t, true>(g, sx, sy, aligned);
}

// The sliding-window kernel (forward, or dx with kDx) for K x K (one of Ks) and the launch's run, handed to fn as
// with_conv_kernel does.
template <typename scalar_t, typename acc_t, bool kDx, bool kChannelsLast, typename Fn, int K, int... Ks>
void with_window_kernel(const ConvLaunch& l, Fn&& fn, KernelSizes<K, Ks...>) {
  if (l.window == K) {
    auto with_run = [&](auto run) {
      constexpr int R = decltype(run)::value;
      auto name = [](const char* base, auto kernel_ptr) {
        return kernel_name(base,
                           type_args<scalar_t, acc_t>() + ", " + std::to_string(K) + ", " + std::to_string(R) + ", " +
                               (kChannelsLast ? "true" : "false"),
                           kernel_ptr);
      };
      if constexpr (kDx) {
        constexpr auto kernel = depthwise_conv2d_dx_window_kernel<scalar_t, acc_t, K, R, kChannelsLast>;
        fn(kernel, [&] { return name("depthwise_conv2d_dx_window_kernel", kernel); }, l.window_tiling);
      } else {
        constexpr auto kernel = depthwise_conv2d_fwd_window_kernel<scalar_t, acc_t, K, R, kChannelsLast>;
        fn(kernel, [&] { return name("depthwise_conv2d_fwd_window_kernel", kernel); }, l.window_tiling);
      }
    };
    if constexpr (kChannelsLast) {
      with_size(l.window_tiling.run, ClRuns{}, with_run);
    } else {
      with_size(l.window_tiling.run, NchwRuns{}, with_run);
    }
  } else if constexpr (sizeof...(Ks) > 0) {
    with_window_kernel<scalar_t, acc_t, kDx, kChannelsLast>(l, fn, KernelSizes<Ks...>{});
  }
}

// The kernel a forward (or, with kDx, dx) launch runs, handed to fn(kernel, name, tiling): name() is its demangled
// name, tiling the kernel's tiling argument.
template <typename scalar_t, typename acc_t, bool kDx, typename Fn>
void with_conv_kernel(const ConvLaunch& l, Fn&& fn) {
  if (l.window != 0 && l.cl) {
    with_window_kernel<scalar_t, acc_t, kDx, true>(l, fn, WindowKernelSizes{});
  } else if (l.window != 0) {
    with_window_kernel<scalar_t, acc_t, kDx, false>(l, fn, WindowKernelSizes{});
  } else if constexpr (kDx) {
    constexpr auto kernel = depthwise_conv2d_dx_kernel<scalar_t, acc_t>;
    fn(kernel, [&] { return kernel_name("depthwise_conv2d_dx_kernel", type_args<scalar_t, acc_t>(), kernel); },
       l.tiling);
  } else {
    constexpr auto kernel = depthwise_conv2d_fwd_kernel<scalar_t, acc_t>;
    fn(kernel, [&] { return kernel_name("depthwise_conv2d_fwd_kernel", type_args<scalar_t, acc_t>(), kernel); },
       l.tiling);
  }
}

template <typename scalar_t, typename acc_t>
std::vector<std::string> describe_fwd(const Geometry& g, const Strides& sx) {
  const ConvLaunch l = plan_fwd<scalar_t, acc_t>(g, sx, true);
  std::vector<std::string> out;
  with_conv_kernel<scalar_t, acc_t, false>(l, [&](auto, auto name, const auto&) {
    out.push_back(describe_launch(name(), l.grid, l.block, l.shared_bytes));
  });
  return out;
}

// Whether the sliding-window dx of launch l reads a dz computed first (depthwise_conv2d_dz_kernel into a buffer
// like dy): where the epilogue makes dz differ from dy. The generic dx kernel computes dz as it loads it.
template <typename scalar_t, typename acc_t>
bool dx_needs_dz(const ConvLaunch& l, const GradSource<scalar_t, acc_t>& grad) {
  return l.window != 0 && ((grad.z != nullptr && grad.act != kNone) || grad.scale != nullptr);
}

// The launches of dx, in order: depthwise_conv2d_dz_kernel into dz where dx_needs_dz, then the dx kernel.
// fn(kernel, name, grid, block, shared_bytes, args...) is called for each, as by dweight_launches.
template <typename scalar_t, typename acc_t, typename Fn>
void dx_launches(const ConvLaunch& l, const Geometry& g, const GradSource<scalar_t, acc_t>& grad, scalar_t* dz,
                 const scalar_t* weight, scalar_t* dx, const Strides& sx, const Strides& sy, Fn&& fn) {
  if (l.window == 0) {
    constexpr auto kernel = depthwise_conv2d_dx_kernel<scalar_t, acc_t>;
    fn(kernel, [&] { return kernel_name("depthwise_conv2d_dx_kernel", type_args<scalar_t, acc_t>(), kernel); },
       l.grid, l.block, l.shared_bytes, grad, weight, dx, g, sx, sy, l.tiling);
    return;
  }
  const scalar_t* src = grad.dy;
  if (dx_needs_dz(l, grad)) {
    constexpr int kMaxVec = Vector16<scalar_t>::kSize;
    const int64_t numel = g.n * g.c * g.oh * g.ow;
    const int64_t plane = l.cl ? 1 : g.oh * g.ow;
    const bool aligned = aligned16(grad.dy) && aligned16(dz) && (grad.z == nullptr || aligned16(grad.z));
    const bool whole = numel % kMaxVec == 0 && (plane % kMaxVec == 0 || (plane == 1 && g.c % kMaxVec == 0));
    auto dz_kernel = [&](auto kernel, int vec) {
      fn(kernel,
         [&] {
           return kernel_name("depthwise_conv2d_dz_kernel", type_args<scalar_t, acc_t>() + ", " + std::to_string(vec),
                              kernel);
         },
         dim3(static_cast<unsigned int>((numel / vec + kThreads - 1) / kThreads)), dim3(kThreads), 0, grad, dz,
         numel, g.c, plane);
    };
    if (aligned && whole) {
      dz_kernel(depthwise_conv2d_dz_kernel<scalar_t, acc_t, kMaxVec>, kMaxVec);
    } else {
      dz_kernel(depthwise_conv2d_dz_kernel<scalar_t, acc_t, 1>, 1);
    }
    src = dz;
  }
  auto window = [&](auto kernel, auto name, const auto& tiling) {
    fn(kernel, name, l.grid, l.block, l.shared_bytes, src, weight, dx, g, sx, sy, tiling);
  };
  if (l.cl) {
    with_window_kernel<scalar_t, acc_t, true, true>(l, window, WindowKernelSizes{});
  } else {
    with_window_kernel<scalar_t, acc_t, true, false>(l, window, WindowKernelSizes{});
  }
}

// The launches of dx for an epilogue with activation `act` (and a scale where act is one), as described
// launches.
template <typename scalar_t, typename acc_t>
std::vector<std::string> describe_dx(const Geometry& g, const Strides& sx, int act) {
  const ConvLaunch l = plan_dx<scalar_t, acc_t>(g, sx, sx, true);
  // Made-up 16-byte aligned addresses: only which pointers are null matters to the plan.
  const auto fake = reinterpret_cast<scalar_t*>(std::uintptr_t{1} << 20);
  const GradSource<scalar_t, acc_t> grad{fake, act != kNone ? fake : nullptr, act != kNone ? fake : nullptr, act};
  std::vector<std::string> out;
  dx_launches<scalar_t, acc_t>(l, g, grad, fake, fake, fake, sx, sx,
                               [&](auto, auto name, dim3 grid, dim3 block, std::size_t shared_bytes, auto&&...) {
                                 out.push_back(describe_launch(name(), grid, block, shared_bytes));
                               });
  return out;
}

template <typename scalar_t, typename acc_t>
void launch_fwd(const scalar_t* x, const scalar_t* weight, const scalar_t* bias, const scalar_t* scale,
                const scalar_t* shift, const scalar_t* residual, scalar_t* y, scalar_t* z, const Geometry& g,
                const Strides& sx, const Strides& sy, int act, cudaStream_t stream) {
  const ConvLaunch l = plan_fwd<scalar_t, acc_t>(g, sx, aligned16(x));
  with_conv_kernel<scalar_t, acc_t, false>(l, [&](auto kernel, auto, const auto& tiling) {
    if (l.shared_bytes > kSharedBudget) {
      allow_shared(kernel, l.shared_bytes);
    }
    launch(kernel, l.grid, l.block, l.shared_bytes, stream, x, weight, bias, scale, shift, residual, y, z, g, sx, sy,
           tiling, act);
  });
}

// dx of launch l (plan_dx); dz: a buffer like dy where dx_needs_dz(l, grad), else unused.
template <typename scalar_t, typename acc_t>
void launch_dx(const ConvLaunch& l, const GradSource<scalar_t, acc_t>& grad, scalar_t* dz, const scalar_t* weight,
               scalar_t* dx, const Geometry& g, const Strides& sx, const Strides& sy, cudaStream_t stream) {
  dx_launches<scalar_t, acc_t>(l, g, grad, dz, weight, dx, sx, sy,
                               [&](auto kernel, auto, dim3 grid, dim3 block, std::size_t shared_bytes,
                                   auto&&... args) {
                                 if (shared_bytes > kSharedBudget) {
                                   allow_shared(kernel, shared_bytes);
                                 }
                                 launch(kernel, grid, block, shared_bytes, stream, args...);
                               });
}

// The dweight launch's cut of the work; the caller allocates partials of (C, blocks_g, taps) and
// (C, blocks_g, kEpilogueSums) accumulators. The kernels index (batch, tile) items and C * taps in 32 bits:
// fits() says whether this shape allows that.
struct DweightPlan {
  Tiling tiling;
  int run;  // taps per run of the stride-1 kernel (one of DweightRuns), 0 for the generic kernel
  int blocks_g;
  int chunks;
  int per_block;
  int64_t items;

  bool fits(const Geometry& g) const {
    return items <= INT32_MAX && g.c * g.kh * g.kw <= INT32_MAX && g.c * kEpilogueSums <= INT32_MAX;
  }
};

// The run lengths of the stride-1 dweight kernel.
using DweightRuns = KernelSizes<3, 5, 7, 8, 9>;

template <int... Rs>
int best_run(int kw, KernelSizes<Rs...>) {
  // Each run of R taps costs about R FMAs and 3 other instructions per pixel: the fewest in all.
  int best = 0;
  int64_t best_cost = INT64_MAX;
  for (int r : {Rs...}) {
    const int64_t cost = static_cast<int64_t>((kw + r - 1) / r) * (r + 3);
    if (cost < best_cost || (cost == best_cost && r > best)) {
      best = r;
      best_cost = cost;
    }
  }
  return best;
}

inline int64_t dweight_run_shared_floats(const Tiling& t, const Geometry& g, int run) {
  const int runs = (g.kw + run - 1) / run;
  const int64_t tiles = static_cast<int64_t>(t.th) * t.tw * t.cb +
                        static_cast<int64_t>(t.th + t.rc - 1) * (t.tw + runs * run - 1) * t.cb;
  return std::max<int64_t>(tiles, static_cast<int64_t>(kThreads) * (run + kEpilogueSums));
}

// The stride-1 tiling for runs of `run` taps, the best scored over the largest channel blocks and every chunk
// height: the share of busy threads (units a multiple or a divisor of kThreads, at most kDweightUnits units a
// thread) over the cost of extra tap-row chunks (each reads dz and x again) and of smaller channel blocks. The
// tile is as wide as the forward's (a multiple of run) and as tall as shared memory allows. False when nothing
// fits.
inline bool dweight_run_tiling(const Geometry& g, const Strides& sx, int run, Tiling& best) {
  const int runs = (g.kw + run - 1) / run;
  const int cb_max = channels_last(sx, g) ? static_cast<int>(std::min<int64_t>(kMaxChannelBlock, pow2_ceil(g.c))) : 1;
  double best_score = -1.0;
  for (int cb = cb_max; cb >= std::max(1, cb_max / 4); cb /= 2) {
    for (int rc = g.kh; rc >= 1; --rc) {
      const int units = rc * runs * cb;
      if (units > kDweightUnits * kThreads) {
        continue;
      }
      const int per = (units + kThreads - 1) / kThreads;
      const double busy = units >= kThreads ? static_cast<double>(units) / (per * kThreads)
                                            : static_cast<double>(kThreads / units * units) / kThreads;
      const int chunks = (g.kh + rc - 1) / rc;
      // Smaller channel blocks read global memory in shorter pieces (and share a warp between tap rows).
      const double score = busy / (1.0 + 0.5 * (chunks - 1)) * std::sqrt(static_cast<double>(cb) / cb_max);
      if (score <= best_score) {
        continue;
      }
      Tiling t{};
      t.cb = cb;
      t.rc = rc;
      t.cc = g.kw;
      const int width = static_cast<int>(std::clamp<int64_t>(g.ow, 1, cb > 1 ? 8 : 32));
      t.tw = (width + run - 1) / run * run;
      t.th = static_cast<int>(std::clamp<int64_t>(g.oh, 1, std::max(1, 4 * kMaxTileOutputs / cb / t.tw)));
      const auto too_big = [&] { return dweight_run_shared_floats(t, g, run) * sizeof(float) > kSharedBudget; };
      while (t.th > 1 && too_big()) {
        --t.th;
      }
      while (t.tw > run && too_big()) {
        t.tw -= run;
      }
      if (too_big()) {
        continue;
      }
      best = t;
      best_score = score;
    }
  }
  return best_score >= 0.0;
}

// The (batch, tile) items of plan.tiling and their split over the grid's x dimension: enough blocks in all
// (with the channel blocks and tap chunks) to aim for kTargetBlocks, each taking per_block consecutive items.
inline void split_items(DweightPlan& plan, const Geometry& g) {
  const Tiling& t = plan.tiling;
  plan.items = g.n * t.tiles_h * t.tiles_w;
  const int64_t other_blocks = ((g.c + t.cb - 1) / t.cb) * plan.chunks;
  const int64_t wanted = std::min(plan.items, std::max<int64_t>(1, (kTargetBlocks + other_blocks - 1) / other_blocks));
  plan.per_block = static_cast<int>((plan.items + wanted - 1) / wanted);
  plan.blocks_g = static_cast<int>((plan.items + plan.per_block - 1) / plan.per_block);
}

template <typename scalar_t, typename acc_t>
DweightPlan plan_dweight(const Geometry& g, const Strides& sx, bool aligned) {
  DweightPlan plan{};
  if (g.sh == 1 && g.sw == 1 && g.dh == 1 && g.dw == 1 && sizeof(acc_t) == sizeof(float) && g.ow <= INT32_MAX / 2) {
    const int run = best_run(g.kw, DweightRuns{});
    Tiling t{};
    if (dweight_run_tiling(g, sx, run, t)) {
      finish_tiling(t, g.oh, g.ow, sx, g, Vector16<scalar_t>::kSize, aligned);
      plan.tiling = t;
      plan.run = run;
      plan.chunks = (g.kh + t.rc - 1) / t.rc;
      split_items(plan, g);
      return plan;
    }
  }
  const int taps = g.kh * g.kw;
  int cb = channels_last(sx, g) ? static_cast<int>(std::min<int64_t>(kMaxChannelBlock, pow2_ceil(g.c))) : 1;
  while (cb > 1 && taps * cb > kMaxTapSlots) {
    cb /= 2;
  }
  Tiling t = base_tiling(sx, g, g.oh, g.ow, kMaxTileOutputs);
  t.cb = cb;
  t.th = std::min(pow2_ceil(g.oh), std::max(1, kMaxTileOutputs / cb / t.tw));
  while (t.rc * t.cc * cb > kMaxTapSlots) {
    if (t.rc >= t.cc) {
      t.rc = (t.rc + 1) / 2;
    } else {
      t.cc = (t.cc + 1) / 2;
    }
  }
  fit_shared(t, g, sizeof(acc_t), [&](const Tiling& u) { return dweight_shared_floats(u, g); });
  finish_tiling(t, g.oh, g.ow, sx, g, Vector16<scalar_t>::kSize, aligned);
  plan.tiling = t;
  plan.chunks = ((g.kh + t.rc - 1) / t.rc) * ((g.kw + t.cc - 1) / t.cc);
  split_items(plan, g);
  return plan;
}


// The launches of a weight-gradient pass, in order: the dweight kernel, then reduce_partials for the weight
// partials (want_w) and for the epilogue sums (want_sums). fn(kernel, name, grid, block, shared_bytes, args...)
// is called for each; name() is the kernel's demangled name.
template <typename scalar_t, typename acc_t, typename Fn>
void dweight_launches(const DweightPlan& plan, const Geometry& g, const GradSource<scalar_t, acc_t>& grad,
                      const scalar_t* x, acc_t* partial_w, acc_t* partial_sums, acc_t* dweight_acc, acc_t* sums_acc,
                      const Strides& sx, const Strides& sy, bool want_w, bool want_sums, Fn&& fn) {
  const Tiling& t = plan.tiling;
  const dim3 grid(plan.blocks_g, static_cast<unsigned int>((g.c + t.cb - 1) / t.cb), want_w ? plan.chunks : 1);
  auto main_kernel = [&](auto kernel, int run) {
    const std::size_t shared_floats = run > 0 ? dweight_run_shared_floats(t, g, run) : dweight_shared_floats(t, g);
    fn(kernel,
       [&] {
         return kernel_name("depthwise_conv2d_dweight_kernel",
                            type_args<scalar_t, acc_t>() + ", " + std::to_string(run), kernel);
       },
       grid, dim3(kThreads), shared_floats * sizeof(acc_t), grad, x, partial_w, partial_sums, g, sx, sy, t,
       plan.per_block);
  };
  if (plan.run == 0) {
    main_kernel(depthwise_conv2d_dweight_kernel<scalar_t, acc_t, 0>, 0);
  } else {
    with_size(plan.run, DweightRuns{}, [&](auto run) {
      main_kernel(depthwise_conv2d_dweight_kernel<scalar_t, acc_t, decltype(run)::value>, decltype(run)::value);
    });
  }
  constexpr auto reduce = reduce_partials_kernel<acc_t>;
  auto reduce_name = [&] { return kernel_name("reduce_partials_kernel", Spelling<acc_t>::get(), reduce); };
  const int taps = g.kh * g.kw;
  if (want_w) {
    const int64_t count = g.c * taps;
    fn(reduce, reduce_name, dim3(static_cast<unsigned int>((count + kThreads - 1) / kThreads)), dim3(kThreads), 0,
       static_cast<const acc_t*>(partial_w), dweight_acc, static_cast<int>(g.c), plan.blocks_g, taps);
  }
  if (want_sums) {
    const int64_t count = g.c * kEpilogueSums;
    fn(reduce, reduce_name, dim3(static_cast<unsigned int>((count + kThreads - 1) / kThreads)), dim3(kThreads), 0,
       static_cast<const acc_t*>(partial_sums), sums_acc, static_cast<int>(g.c), plan.blocks_g, kEpilogueSums);
  }
}

// The weight gradient alone (no epilogue sums), as described launches.
template <typename scalar_t, typename acc_t>
std::vector<std::string> describe_dweight(const Geometry& g, const Strides& sx) {
  const DweightPlan plan = plan_dweight<scalar_t, acc_t>(g, sx, true);
  std::vector<std::string> out;
  dweight_launches<scalar_t, acc_t>(
      plan, g, GradSource<scalar_t, acc_t>{}, nullptr, nullptr, nullptr, nullptr, nullptr, sx, sx, true, false,
      [&](auto, auto name, dim3 grid, dim3 block, std::size_t shared_bytes, auto&&...) {
        out.push_back(describe_launch(name(), grid, block, shared_bytes));
      });
  return out;
}

// Runs the dweight kernel and sums its partials: dweight_acc (C, taps) and sums_acc (C, kEpilogueSums), either
// null when not wanted (with its partials).
template <typename scalar_t, typename acc_t>
void launch_dweight(const DweightPlan& plan, const GradSource<scalar_t, acc_t>& grad, const scalar_t* x,
                    acc_t* partial_w, acc_t* partial_sums, acc_t* dweight_acc, acc_t* sums_acc, const Geometry& g,
                    const Strides& sx, const Strides& sy, cudaStream_t stream) {
  dweight_launches<scalar_t, acc_t>(
      plan, g, grad, x, partial_w, partial_sums, dweight_acc, sums_acc, sx, sy, partial_w != nullptr,
      sums_acc != nullptr,
      [&](auto kernel, auto, dim3 grid, dim3 block, std::size_t shared_bytes, auto&&... args) {
        launch(kernel, grid, block, shared_bytes, stream, args...);
      });
}

}  // namespace vitkern::dwconv
