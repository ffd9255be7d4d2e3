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
// Backward. dz = dy * scale * act'(z) is computed where it is loaded (never stored).
//   dx:      the transposed convolution of dz, tiled like the forward.
//   dweight: grid (G, channel blocks, tap chunks); each block loops over its 1/G share of the (batch, tile) items,
//            loads the dz tile and the x tile with its halo into shared memory once per item and accumulates every
//            tap of its chunk from there, so x and dy are read once per tap chunk, not once per tap. Per-block
//            results go to partials[C, G, taps], which reduce_partials sums in a fixed order: deterministic, no
//            atomics. The same blocks also produce the per-channel sums for dbias, dscale and dshift.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "launch.h"

namespace vitkern::dwconv {

constexpr int kThreads = 256;
constexpr int kOutputsPerThread = 4;                            // forward and dx
constexpr int kMaxTileOutputs = kThreads * kOutputsPerThread;  // th * tw * cb
constexpr int kAccPerThread = 16;                               // dweight accumulators per thread
constexpr int kMaxTapSlots = kThreads * kAccPerThread;          // taps of a chunk x cb
constexpr int kMaxChannelBlock = 32;
constexpr int kEpilogueSums = 3;                                // dbias, dscale, dshift
constexpr std::size_t kSharedBudget = 48 * 1024;
constexpr int kTargetBlocks = 1024;                             // dweight: how many blocks to aim for

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

template <typename acc_t>
__device__ __forceinline__ acc_t activate(acc_t z, int act) {
  if (act == kGelu) {
    return acc_t(0.5) * z * (acc_t(1) + erff(z * acc_t(kSqrtHalf)));
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
      const int64_t offset = n * sy.n + c * sy.c + oh * sy.h + ow * sy.w;
      acc_t v = acc[k];
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
  }
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

// dweight partials and the epilogue sums. grid (G, ceil(C / cb), tap chunks), block kThreads, shared: the dz
// tile then the x tile of one tap chunk. Block (g, cblock, chunk) handles items [g * per_block, (g + 1) *
// per_block) of the N * tiles_h * tiles_w (batch, output tile) items.
// partial_w: (C, G, kh * kw); partial_sums: (C, G, kEpilogueSums), written by the chunk-0 blocks; either null
// when not needed. The launch bounds require only one resident block per SM, which lets ptxas keep the
// kAccPerThread accumulators in registers instead of spilling them.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1)
    depthwise_conv2d_dweight_kernel(GradSource<scalar_t, acc_t> grad, const scalar_t* __restrict__ x,
                                    acc_t* __restrict__ partial_w, acc_t* __restrict__ partial_sums, Geometry g,
                                    Strides sx, Strides sy, Tiling t, int per_block) {
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

  // 32-bit item arithmetic (the launcher checks the count fits): 64-bit division is a subroutine call on the GPU.
  const int tiles = t.tiles_h * t.tiles_w;
  const int items = static_cast<int>(g.n) * tiles;
  const int item_end = min(items, static_cast<int>(blockIdx.x + 1) * per_block);
  for (int item = static_cast<int>(blockIdx.x) * per_block; item < item_end; ++item) {
    const int64_t n = item / tiles;
    const int tile = item % tiles;
    const int oh0 = (tile / t.tiles_w) * t.th;
    const int ow0 = (tile % t.tiles_w) * t.tw;
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
  }

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

template <typename scalar_t, typename acc_t>
void launch_fwd(const scalar_t* x, const scalar_t* weight, const scalar_t* bias, const scalar_t* scale,
                const scalar_t* shift, const scalar_t* residual, scalar_t* y, scalar_t* z, const Geometry& g,
                const Strides& sx, const Strides& sy, int act, cudaStream_t stream) {
  Tiling t = base_tiling(sx, g, g.oh, g.ow, kMaxTileOutputs);
  fit_shared(t, g, sizeof(acc_t), [&](const Tiling& u) { return fwd_tile_floats(u, g); });
  finish_tiling(t, g.oh, g.ow, sx, g, Vector16<scalar_t>::kSize, aligned16(x));
  const dim3 grid(t.tiles_h * t.tiles_w, static_cast<unsigned int>((g.c + t.cb - 1) / t.cb), g.n);
  launch(depthwise_conv2d_fwd_kernel<scalar_t, acc_t>, grid, dim3(kThreads), fwd_tile_floats(t, g) * sizeof(acc_t),
         stream, x, weight, bias, scale, shift, residual, y, z, g, sx, sy, t, act);
}

template <typename scalar_t, typename acc_t>
void launch_dx(const GradSource<scalar_t, acc_t>& grad, const scalar_t* weight, scalar_t* dx, const Geometry& g,
               const Strides& sx, const Strides& sy, cudaStream_t stream) {
  Tiling t = base_tiling(sx, g, g.h, g.w, kMaxTileOutputs);
  fit_shared(t, g, sizeof(acc_t), [&](const Tiling& u) { return dx_tile_floats(u, g); });
  finish_tiling(t, g.h, g.w, sx, g, Vector16<scalar_t>::kSize, false);
  const dim3 grid(t.tiles_h * t.tiles_w, static_cast<unsigned int>((g.c + t.cb - 1) / t.cb), g.n);
  launch(depthwise_conv2d_dx_kernel<scalar_t, acc_t>, grid, dim3(kThreads), dx_tile_floats(t, g) * sizeof(acc_t),
         stream, grad, weight, dx, g, sx, sy, t);
}

// The dweight launch's cut of the work; the caller allocates partials of (C, blocks_g, taps) and
// (C, blocks_g, kEpilogueSums) accumulators. The kernels index (batch, tile) items and C * taps in 32 bits:
// fits() says whether this shape allows that.
struct DweightPlan {
  Tiling tiling;
  int blocks_g;
  int chunks;
  int per_block;
  int64_t items;

  bool fits(const Geometry& g) const {
    return items <= INT32_MAX && g.c * g.kh * g.kw <= INT32_MAX && g.c * kEpilogueSums <= INT32_MAX;
  }
};

template <typename scalar_t, typename acc_t>
DweightPlan plan_dweight(const scalar_t* x, const Geometry& g, const Strides& sx) {
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
  finish_tiling(t, g.oh, g.ow, sx, g, Vector16<scalar_t>::kSize, aligned16(x));
  DweightPlan plan{};
  plan.tiling = t;
  plan.chunks = ((g.kh + t.rc - 1) / t.rc) * ((g.kw + t.cc - 1) / t.cc);
  plan.items = g.n * t.tiles_h * t.tiles_w;
  const int64_t other_blocks = ((g.c + cb - 1) / cb) * plan.chunks;
  const int64_t wanted = std::min(plan.items, std::max<int64_t>(1, (kTargetBlocks + other_blocks - 1) / other_blocks));
  plan.per_block = static_cast<int>((plan.items + wanted - 1) / wanted);
  plan.blocks_g = static_cast<int>((plan.items + plan.per_block - 1) / plan.per_block);
  return plan;
}

// Runs the dweight kernel and sums its partials: dweight_acc (C, taps) and sums_acc (C, kEpilogueSums), either
// null when not wanted (with its partials).
template <typename scalar_t, typename acc_t>
void launch_dweight(const DweightPlan& plan, const GradSource<scalar_t, acc_t>& grad, const scalar_t* x,
                    acc_t* partial_w, acc_t* partial_sums, acc_t* dweight_acc, acc_t* sums_acc, const Geometry& g,
                    const Strides& sx, const Strides& sy, cudaStream_t stream) {
  const Tiling& t = plan.tiling;
  const dim3 grid(plan.blocks_g, static_cast<unsigned int>((g.c + t.cb - 1) / t.cb),
                  partial_w != nullptr ? plan.chunks : 1);
  launch(depthwise_conv2d_dweight_kernel<scalar_t, acc_t>, grid, dim3(kThreads),
         dweight_shared_floats(t, g) * sizeof(acc_t), stream, grad, x, partial_w, partial_sums, g, sx, sy, t,
         plan.per_block);
  const int taps = g.kh * g.kw;
  if (dweight_acc != nullptr) {
    const int64_t count = g.c * taps;
    launch(reduce_partials_kernel<acc_t>, dim3(static_cast<unsigned int>((count + kThreads - 1) / kThreads)),
           dim3(kThreads), 0, stream, static_cast<const acc_t*>(partial_w), dweight_acc, static_cast<int>(g.c),
           plan.blocks_g, taps);
  }
  if (sums_acc != nullptr) {
    const int64_t count = g.c * kEpilogueSums;
    launch(reduce_partials_kernel<acc_t>, dim3(static_cast<unsigned int>((count + kThreads - 1) / kThreads)),
           dim3(kThreads), 0, stream, static_cast<const acc_t*>(partial_sums), sums_acc, static_cast<int>(g.c),
           plan.blocks_g, kEpilogueSums);
  }
}

}  // namespace vitkern::dwconv
