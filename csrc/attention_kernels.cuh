// Attention with learned position biases, softmax(scale * q @ k^T + bias + mask) @ v: kernels and launchers.
//
// Torch-free on purpose: csrc/attention.cu instantiates them for float, at::Half and at::BFloat16, and the
// standalone test driver csrc/emulation/selftest_main.cpp for float. The kernels of this file compute every product
// as an fp32 FMA on values held in fp32 in shared memory: they serve fp32 storage, and the fp16 / bf16 backward past
// the tensor-core kernels' limits (attention_mma.cuh; the launchers below choose).
//
// Bias modes (compile-time-uniform branches on Params::bias_mode): 0 none; 1 relative-position table
// ((2Wh-1)(2Ww-1), H), geometry [Wh, Ww]; 2 LeViT biases (H, R*R), geometry [R, stride], queries on the stride
// grid; 3 a dense bias read through its (b, h, i, j) strides (0 on broadcast dims). The bias index is computed from
// the token coordinates, as vitkern/reference/attention.py builds it. The optional mask (num_windows, Nq, Nk) is
// added to the scores of batch entry b as mask[b % num_windows].
//
// Forward (attention_fwd_kernel). A block is kWarps warps of kRowsPerWarp query rows (kBlockRows rows). Keys are
// processed in tiles of key_tile keys held in shared memory; when key_tile >= Nk (up to kMaxResidentKeys keys)
// K and V of the (batch, head) pair are resident and read once, and a block packs several pairs when Nq is small
// (pairs_per_block * Nq <= kBlockRows). Longer sequences stream over key tiles with the online softmax of
// FlashAttention-2 (Dao, 2023, arXiv:2307.08691, Algorithm 1): per row a running max m, sum l and output acc.
// Lanes split the keys of a tile for the scores (K rows padded by one float: conflict-free column reads) and the
// value columns for the output (lane owns columns lane + 32u).
//
// Backward (attention_bwd_kernel), FlashAttention-2 Algorithm 2 with the key tile outermost: a block owns one key
// tile of one head and a run of batch entries; for each it keeps K, V and the dK, dV accumulators of its tile in
// shared memory and sweeps the query rows in groups of kBlockRows. For each group it computes P = exp(S - lse) once
// and from it dP = dO V^T, dS = P * (dP - delta) (delta = rowsum(dO * O)), then
//   dq rows  = scale * dS K       (to an fp32 partial per key tile, summed in key-tile order by the caller),
//   dV      += P^T dO,  dK += dS^T Q  (each accumulator element owned by one thread, rows summed in order),
//   the table / biases gradient: each thread owns table entries and gathers the group's dS at the (i, j) pairs
//            that index the entry, in row order, into partial[chunk, key tile, head, entry] (fp32);
//   a dense bias: dS added into buffer[chunk, head, i, j] by the one thread owning (i, j).
// No float atomics, every sum in a fixed order: bitwise deterministic. The table path never holds a
// (B, H, Nq, Nk) tensor; its partials are (chunks, key tiles, H, entries).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "launch.h"

namespace vitkern::attn {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;
constexpr int kBlockRows = kWarps * kRowsPerWarp;  // query rows per block (forward) or per group (backward)
constexpr int kMaxHeadDim = 128;                   // q/k and v head dims
constexpr int kMaxResidentKeys = 256;              // the largest key tile: K and V of N <= 256 stay resident
constexpr std::size_t kSharedBudget = 160 * 1024;  // dynamic shared memory per block: fits sm_80 (163 KiB opt-in)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

enum BiasMode : int { kBiasNone = 0, kBiasRelPos = 1, kBiasLevit = 2, kBiasDense = 3 };

template <typename scalar_t>
struct Params {
  int64_t batch, heads, nq, nk;
  int d, dv;
  float scale;
  int bias_mode;
  int geo0, geo1;                       // [Wh, Ww] (mode 1) or [R, stride] (mode 2)
  const scalar_t* bias;                 // null for mode 0
  int64_t bias_s0, bias_s1, bias_s2, bias_s3;  // mode 1: (entry, head); mode 2: (head, entry); mode 3: (b, h, i, j)
  const scalar_t* mask;                 // (num_windows, nq, nk) contiguous, or null
  int64_t num_windows;
  int key_tile;                         // keys per shared-memory tile
};

// Table entries of bias modes 1 and 2 (the length of the gradient partials' last dim); 0 otherwise.
__host__ __device__ inline int64_t table_entries(int bias_mode, int geo0, int geo1) {
  if (bias_mode == kBiasRelPos) {
    return static_cast<int64_t>(2 * geo0 - 1) * (2 * geo1 - 1);
  }
  if (bias_mode == kBiasLevit) {
    return static_cast<int64_t>(geo0) * geo0;
  }
  return 0;
}

// bias + mask added to the score of query i and key j of pair (b, h).
template <typename scalar_t>
__device__ inline float bias_at(const Params<scalar_t>& p, int64_t b, int64_t h, int i, int j) {
  float s = 0.0f;
  if (p.bias_mode == kBiasRelPos) {
    const int ww = p.geo1;
    const int idx = (i / ww - j / ww + p.geo0 - 1) * (2 * ww - 1) + (i % ww - j % ww + ww - 1);
    s = static_cast<float>(p.bias[idx * p.bias_s0 + h * p.bias_s1]);
  } else if (p.bias_mode == kBiasLevit) {
    const int r = p.geo0, stride = p.geo1;
    const int rq = (r - 1) / stride + 1;
    const int dy = abs(i / rq * stride - j / r), dx = abs(i % rq * stride - j % r);
    s = static_cast<float>(p.bias[h * p.bias_s0 + (dy * r + dx) * p.bias_s1]);
  } else if (p.bias_mode == kBiasDense) {
    s = static_cast<float>(p.bias[b * p.bias_s0 + h * p.bias_s1 + i * p.bias_s2 + j * p.bias_s3]);
  }
  if (p.mask != nullptr) {
    s += static_cast<float>(p.mask[((b % p.num_windows) * p.nq + i) * p.nk + j]);
  }
  return s;
}

__device__ inline float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

__device__ inline float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

__device__ inline float dot(const float* a, const float* b, int n) {
  float acc = 0.0f;
  for (int d = 0; d < n; ++d) {
    acc = fmaf(a[d], b[d], acc);
  }
  return acc;
}

// --- forward -----------------------------------------------------------------------------------------------------

struct FwdLayout {
  int key_tile, pairs_per_block, rows_per_pair;
  std::size_t shared_bytes;
};

inline std::size_t fwd_shared_bytes(int key_tile, int pairs, int d, int dv) {
  return sizeof(float) * (static_cast<std::size_t>(pairs) * key_tile * (d + 1 + dv) +
                          static_cast<std::size_t>(kBlockRows) * (d + key_tile));
}

// The key tile (all Nk keys when they fit, else balanced tiles) and the pairs packed per block.
inline FwdLayout plan_fwd(int64_t nq, int64_t nk, int d, int dv) {
  int max_tile = kMaxResidentKeys;
  while (max_tile > 32 && fwd_shared_bytes(max_tile, 1, d, dv) > kSharedBudget) {
    max_tile -= 32;
  }
  const int64_t tiles = std::max<int64_t>(1, (nk + max_tile - 1) / max_tile);
  const int key_tile = static_cast<int>(std::max<int64_t>(1, (nk + tiles - 1) / tiles));
  int pairs = 1;
  if (tiles == 1 && nq < kBlockRows) {
    pairs = static_cast<int>(kBlockRows / std::max<int64_t>(nq, 1));
    while (pairs > 1 && fwd_shared_bytes(key_tile, pairs, d, dv) > kSharedBudget) {
      --pairs;
    }
  }
  const int rows_per_pair = pairs > 1 ? static_cast<int>(nq) : kBlockRows;
  return {key_tile, pairs, rows_per_pair, fwd_shared_bytes(key_tile, pairs, d, dv)};
}

// out = softmax(scale * q k^T + bias + mask) v, lse = logsumexp of the scores per row (-inf for a row whose every
// score is -inf; its out row is zeros).
// Grid (ceil(B*H / pairs_per_block), ceil(Nq / rows_per_pair)), kThreads threads.
// q: (B, H, Nq, D), k: (B, H, Nk, D), v: (B, H, Nk, Dv), out: (B, H, Nq, Dv), all contiguous; lse: (B, H, Nq) fp32.
// kDvLanes = ceil(Dv / 32) output columns per lane.
template <typename scalar_t, int kDvLanes>
__global__ void __launch_bounds__(kThreads)
    attention_fwd_kernel(Params<scalar_t> p, int pairs_per_block, int rows_per_pair, const scalar_t* q,
                         const scalar_t* k, const scalar_t* v, scalar_t* out, float* lse) {
  VITKERN_DYNAMIC_SHARED(float, smem);
  const int d = p.d, dv = p.dv, kt = p.key_tile, ks = p.d + 1;
  float* sk = smem;                                         // [pairs][kt][d + 1]
  float* sv = sk + pairs_per_block * kt * ks;               // [pairs][kt][dv]
  float* sq = sv + pairs_per_block * kt * dv;               // [kBlockRows][d]
  float* ss = sq + kBlockRows * d;                          // [kBlockRows][kt]: scores, then probabilities
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t pairs = p.batch * p.heads;
  const int64_t pair0 = static_cast<int64_t>(blockIdx.x) * pairs_per_block;

  // slot s of the block: pair pair0 + s / rows_per_pair, query row blockIdx.y * rows_per_pair + s % rows_per_pair.
  auto slot_pair = [&](int s) { return s / rows_per_pair; };
  auto slot_row = [&](int s) { return static_cast<int>(blockIdx.y) * rows_per_pair + s % rows_per_pair; };
  auto slot_valid = [&](int s) {
    return slot_pair(s) < pairs_per_block && pair0 + slot_pair(s) < pairs && slot_row(s) < p.nq;
  };

  for (int e = tid; e < kBlockRows * d; e += kThreads) {
    const int s = e / d;
    sq[e] = slot_valid(s) ? static_cast<float>(q[((pair0 + slot_pair(s)) * p.nq + slot_row(s)) * d + e % d]) : 0.0f;
  }

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kDvLanes];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = kNegInf;
    l[r] = 0.0f;
#pragma unroll
    for (int u = 0; u < kDvLanes; ++u) {
      acc[r][u] = 0.0f;
    }
  }

  for (int64_t j0 = 0; j0 < p.nk; j0 += kt) {
    const int tile = static_cast<int>(min(static_cast<int64_t>(kt), p.nk - j0));
    __syncthreads();  // the previous tile's readers are done
    for (int pl = 0; pl < pairs_per_block && pair0 + pl < pairs; ++pl) {
      const scalar_t* kp = k + ((pair0 + pl) * p.nk + j0) * d;
      const scalar_t* vp = v + ((pair0 + pl) * p.nk + j0) * dv;
      for (int e = tid; e < tile * d; e += kThreads) {
        sk[(pl * kt + e / d) * ks + e % d] = static_cast<float>(kp[e]);
      }
      for (int e = tid; e < tile * dv; e += kThreads) {
        sv[pl * kt * dv + e] = static_cast<float>(vp[e]);
      }
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int s = warp * kRowsPerWarp + r;
      if (!slot_valid(s)) {
        continue;  // uniform over the warp: every lane of a warp holds the same rows
      }
      const int64_t pair = pair0 + slot_pair(s);
      const int64_t b = pair / p.heads, h = pair % p.heads;
      const int i = slot_row(s);
      const float* kb = sk + slot_pair(s) * kt * ks;
      float* sr = ss + s * kt;
      float tile_max = kNegInf;
      for (int j = lane; j < tile; j += 32) {
        const float score = dot(sq + s * d, kb + j * ks, d) * p.scale + bias_at(p, b, h, i, static_cast<int>(j0) + j);
        sr[j] = score;
        tile_max = fmaxf(tile_max, score);
      }
      const float m_new = fmaxf(m[r], warp_max(tile_max));
      const float m_use = m_new == kNegInf ? 0.0f : m_new;
      const float alpha = expf(m[r] - m_use);
      float sum = 0.0f;
      for (int j = lane; j < tile; j += 32) {
        const float e = expf(sr[j] - m_use);
        sr[j] = e;
        sum += e;
      }
      l[r] = l[r] * alpha + warp_sum(sum);
      m[r] = m_new;
#pragma unroll
      for (int u = 0; u < kDvLanes; ++u) {
        acc[r][u] *= alpha;
      }
    }
    __syncthreads();  // every lane's probabilities are visible to its warp
    // acc += P V with the keys outermost: each V element loaded feeds every row of the warp that shares its pair
    // (invalid rows have probabilities of their own slot, never read: their acc is never stored).
    const int first = warp * kRowsPerWarp;
    auto pair_slot = [&](int s) { return min(slot_pair(s), pairs_per_block - 1); };  // in bounds for invalid rows
    const bool one_pair = pair_slot(first) == pair_slot(first + kRowsPerWarp - 1);
    for (int j = 0; j < tile; ++j) {
#pragma unroll
      for (int u = 0; u < kDvLanes; ++u) {
        const int c = lane + 32 * u;
        if (c >= dv) {
          continue;
        }
        const float vj = sv[(pair_slot(first) * kt + j) * dv + c];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const float vr = one_pair ? vj : sv[(pair_slot(first + r) * kt + j) * dv + c];
          acc[r][u] = fmaf(ss[(first + r) * kt + j], vr, acc[r][u]);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int s = warp * kRowsPerWarp + r;
    if (!slot_valid(s)) {
      continue;
    }
    const int64_t row = (pair0 + slot_pair(s)) * p.nq + slot_row(s);
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
#pragma unroll
    for (int u = 0; u < kDvLanes; ++u) {
      const int c = lane + 32 * u;
      if (c < dv) {
        out[row * dv + c] = static_cast<scalar_t>(acc[r][u] * inv);
      }
    }
    if (lane == 0) {
      lse[row] = l[r] > 0.0f ? m[r] + logf(l[r]) : kNegInf;
    }
  }
}

// --- backward ----------------------------------------------------------------------------------------------------

struct BwdLayout {
  int key_tile;
  int64_t key_tiles;
  std::size_t shared_bytes;
  bool tensor_cores;  // attention_bwd_mma_kernel (attention_mma.cuh), else attention_bwd_kernel
};

inline std::size_t bwd_shared_bytes(int key_tile, int d, int dv) {
  return sizeof(float) * (static_cast<std::size_t>(key_tile) * (2 * d + 2 * dv + 2 + 2 * kBlockRows) +
                          static_cast<std::size_t>(kBlockRows) * (d + dv + 2));
}

// The fp32 kernel's layout: key tiles of up to kMaxResidentKeys keys that fit the shared memory.
inline BwdLayout plan_bwd_fp32(int64_t nk, int d, int dv) {
  int max_tile = kMaxResidentKeys;
  while (max_tile > 16 && bwd_shared_bytes(max_tile, d, dv) > kSharedBudget) {
    max_tile -= 16;
  }
  const int64_t tiles = std::max<int64_t>(1, (nk + max_tile - 1) / max_tile);
  const int key_tile = static_cast<int>(std::max<int64_t>(1, (nk + tiles - 1) / tiles));
  return {key_tile, tiles, bwd_shared_bytes(key_tile, d, dv), false};
}

// acc (tile x cols, row-major) += a^T b over `rows` rows: a (rows x tile, row stride lda), b (rows x cols,
// row-major). Each of the block's kThreads threads (tid) owns accumulator elements and sums the rows in order.
__device__ inline void add_transposed_product(float* acc, const float* a, int lda, const float* b, int cols, int tile,
                                              int rows, int tid) {
  for (int e = tid; e < tile * cols; e += kThreads) {
    const int j = e / cols, c = e % cols;
    float sum = acc[e];
    for (int s = 0; s < rows; ++s) {
      sum = fmaf(a[s * lda + j], b[s * cols + c], sum);
    }
    acc[e] = sum;
  }
}

// Adds the group's dS (kBlockRows rows from q0, keys j0 .. j0 + tile) at the (i, j) pairs that index each table
// entry into partial[entry] (fp32, the block's own slice), in row order. Modes 1 and 2 only.
template <typename scalar_t>
__device__ void gather_table_grad(const Params<scalar_t>& p, const float* sds, int64_t q0, int64_t j0, int tile,
                                  float* partial) {
  const int64_t entries = table_entries(p.bias_mode, p.geo0, p.geo1);
  for (int64_t e = threadIdx.x; e < entries; e += kThreads) {
    float acc = 0.0f;
    for (int s = 0; s < kBlockRows && q0 + s < p.nq; ++s) {
      const int i = static_cast<int>(q0 + s);
      const float* row = sds + s * p.key_tile;
      auto add = [&](int yj, int xj, int width, int height) {
        if (yj >= 0 && yj < height && xj >= 0 && xj < width) {
          const int64_t j = static_cast<int64_t>(yj) * width + xj - j0;
          if (j >= 0 && j < tile) {
            acc += row[j];
          }
        }
      };
      if (p.bias_mode == kBiasRelPos) {
        const int wh = p.geo0, ww = p.geo1;
        const int dy = static_cast<int>(e / (2 * ww - 1)) - (wh - 1), dx = static_cast<int>(e % (2 * ww - 1)) - (ww - 1);
        add(i / ww - dy, i % ww - dx, ww, wh);
      } else {
        const int r = p.geo0, stride = p.geo1, rq = (r - 1) / stride + 1;
        const int ay = static_cast<int>(e / r), ax = static_cast<int>(e % r);
        const int qy = i / rq * stride, qx = i % rq * stride;
        for (int sy = 0; sy < (ay == 0 ? 1 : 2); ++sy) {
          for (int sx = 0; sx < (ax == 0 ? 1 : 2); ++sx) {
            add(sy == 0 ? qy - ay : qy + ay, sx == 0 ? qx - ax : qx + ax, r, r);
          }
        }
      }
    }
    partial[e] += acc;
  }
}

// Gradients of attention_fwd_kernel for dout = dL/dout.
// Grid (chunks * H, key tiles), kThreads threads; block (x, y) takes head x % H, key tile y (keys
// y * key_tile ..), and batch entries [c * batch_per_chunk, (c + 1) * batch_per_chunk) of chunk c = x / H.
// q, dq_partial-less inputs as the forward; out, dout: (B, H, Nq, Dv); lse: the forward's.
// dq_partial: (key tiles, B, H, Nq, D) fp32, one slice per key tile (the caller sums them in order);
// dk: (B, H, Nk, D), dv: (B, H, Nk, Dv) in the storage dtype;
// table_partial: (chunks, key tiles, H, entries) fp32 zeroed, modes 1 and 2 with the table gradient asked for, else
// null; dense_grad: (chunks, H, Nq, Nk) fp32 zeroed, mode 3 with the bias gradient asked for, else null.
// At least one block per SM: without the second bound ptxas caps the backward at 80-96 registers and spills on sm_90.
template <typename scalar_t, int kDLanes>
__global__ void __launch_bounds__(kThreads, 1)
    attention_bwd_kernel(Params<scalar_t> p, int64_t batch_per_chunk, const scalar_t* q, const scalar_t* k,
                         const scalar_t* v, const scalar_t* out, const scalar_t* dout, const float* lse,
                         float* dq_partial, scalar_t* dk, scalar_t* dv_out, float* table_partial, float* dense_grad) {
  VITKERN_DYNAMIC_SHARED(float, smem);
  const int d = p.d, dv = p.dv, kt = p.key_tile, ks = d + 1, vs = dv + 1;
  float* sk = smem;                       // [kt][d + 1]
  float* sv = sk + kt * ks;               // [kt][dv + 1]
  float* sdk = sv + kt * vs;              // [kt][d]
  float* sdv = sdk + kt * d;              // [kt][dv]
  float* sp = sdv + kt * dv;              // [kBlockRows][kt]
  float* sds = sp + kBlockRows * kt;      // [kBlockRows][kt]
  float* sq = sds + kBlockRows * kt;      // [kBlockRows][d]
  float* sdo = sq + kBlockRows * d;       // [kBlockRows][dv]
  float* sdelta = sdo + kBlockRows * dv;  // [kBlockRows]
  float* slse = sdelta + kBlockRows;      // [kBlockRows]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t h = blockIdx.x % p.heads, chunk = blockIdx.x / p.heads;
  const int64_t key_tiles = gridDim.y;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kt;
  const int tile = static_cast<int>(min(static_cast<int64_t>(kt), p.nk - j0));
  const int64_t entries = table_entries(p.bias_mode, p.geo0, p.geo1);
  float* tpart = table_partial == nullptr ? nullptr : table_partial + ((chunk * key_tiles + blockIdx.y) * p.heads + h) * entries;
  const int64_t b_end = min(p.batch, (chunk + 1) * batch_per_chunk);

  for (int64_t b = chunk * batch_per_chunk; b < b_end; ++b) {
    const int64_t pair = b * p.heads + h;
    __syncthreads();  // the previous entry's accumulators are written out
    for (int e = tid; e < tile * d; e += kThreads) {
      sk[(e / d) * ks + e % d] = static_cast<float>(k[(pair * p.nk + j0) * d + e]);
      sdk[e] = 0.0f;
    }
    for (int e = tid; e < tile * dv; e += kThreads) {
      sv[(e / dv) * vs + e % dv] = static_cast<float>(v[(pair * p.nk + j0) * dv + e]);
      sdv[e] = 0.0f;
    }
    for (int64_t q0 = 0; q0 < p.nq; q0 += kBlockRows) {
      const int rows = static_cast<int>(min(static_cast<int64_t>(kBlockRows), p.nq - q0));
      __syncthreads();  // the previous group's readers are done
      for (int e = tid; e < kBlockRows * d; e += kThreads) {
        sq[e] = e / d < rows ? static_cast<float>(q[(pair * p.nq + q0) * d + e]) : 0.0f;
      }
      for (int e = tid; e < kBlockRows * dv; e += kThreads) {
        sdo[e] = e / dv < rows ? static_cast<float>(dout[(pair * p.nq + q0) * dv + e]) : 0.0f;
      }
      __syncthreads();
      if (tid < rows) {
        const int64_t row = pair * p.nq + q0 + tid;
        float delta = 0.0f;
        for (int c = 0; c < dv; ++c) {
          delta = fmaf(sdo[tid * dv + c], static_cast<float>(out[row * dv + c]), delta);
        }
        sdelta[tid] = delta;
        slse[tid] = lse[row] == kNegInf ? 0.0f : lse[row];  // P = 0 there anyway
      }
      __syncthreads();
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int s = warp * kRowsPerWarp + r;
        float* pr = sp + s * kt;
        float* dsr = sds + s * kt;
        if (s >= rows) {
          for (int j = lane; j < tile; j += 32) {
            pr[j] = 0.0f;
            dsr[j] = 0.0f;
          }
          continue;
        }
        const int i = static_cast<int>(q0 + s);
        for (int j = lane; j < tile; j += 32) {
          const int jj = static_cast<int>(j0) + j;
          const float score = dot(sq + s * d, sk + j * ks, d) * p.scale + bias_at(p, b, h, i, jj);
          const float pij = expf(score - slse[s]);
          const float ds = pij * (dot(sdo + s * dv, sv + j * vs, dv) - sdelta[s]);
          pr[j] = pij;
          dsr[j] = ds;
          if (dense_grad != nullptr) {
            dense_grad[((chunk * p.heads + h) * p.nq + i) * p.nk + jj] += ds;
          }
        }
      }
      __syncthreads();
      // dq rows of this key tile.
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int s = warp * kRowsPerWarp + r;
        if (s >= rows) {
          continue;
        }
        float* dq_row = dq_partial + ((blockIdx.y * p.batch * p.heads + pair) * p.nq + q0 + s) * d;
#pragma unroll
        for (int u = 0; u < kDLanes; ++u) {
          const int c = lane + 32 * u;
          if (c < d) {
            float acc = 0.0f;
            for (int j = 0; j < tile; ++j) {
              acc = fmaf(sds[s * kt + j], sk[j * ks + c], acc);
            }
            dq_row[c] = acc * p.scale;
          }
        }
      }
      // dV += P^T dO and dK += dS^T Q, one thread per accumulator element, rows in order.
      add_transposed_product(sdv, sp, kt, sdo, dv, tile, rows, tid);
      add_transposed_product(sdk, sds, kt, sq, d, tile, rows, tid);
      if (tpart != nullptr) {
        gather_table_grad(p, sds, q0, j0, tile, tpart);
      }
    }
    __syncthreads();
    for (int e = tid; e < tile * d; e += kThreads) {
      dk[(pair * p.nk + j0) * d + e] = static_cast<scalar_t>(sdk[e] * p.scale);
    }
    for (int e = tid; e < tile * dv; e += kThreads) {
      dv_out[(pair * p.nk + j0) * dv + e] = static_cast<scalar_t>(sdv[e]);
    }
  }
}

}  // namespace vitkern::attn

#include "attention_mma.cuh"  // the tensor-core kernels for 16-bit storage

namespace vitkern::attn {

// --- launchers ---------------------------------------------------------------------------------------------------

// The kernel choice. fp16 / bf16 take the tensor-core kernels of attention_mma.cuh: the forward always (any head
// dim up to 128, any Nk: K and V stream in tiles past 256 keys), the backward for head dims up to
// kMmaBwdMaxHeadDim and Nk up to kMaxResidentKeys. Everything else (fp32 storage, wider heads or longer sequences
// in the backward) takes the fp32-FMA kernels above.
template <typename scalar_t>
constexpr bool kTensorCores = sizeof(scalar_t) == 2;

template <typename scalar_t>
BwdLayout plan_bwd(int64_t nk, int d, int dv) {
  if (kTensorCores<scalar_t> && nk <= kMaxResidentKeys && d <= kMmaBwdMaxHeadDim && dv <= kMmaBwdMaxHeadDim) {
    std::size_t bytes = 0;
    with_width<64>(d, [&](auto wd) { with_width<64>(dv, [&](auto wdv) { bytes = bwd_mma_shared_bytes(wd, wdv); }); });
    return {kMmaBwdKeys, std::max<int64_t>(1, (nk + kMmaBwdKeys - 1) / kMmaBwdKeys), bytes, true};
  }
  return plan_bwd_fp32(nk, d, dv);
}

// fn(std::integral_constant<int, L>{}) with L = 1, 2 or 4 lanes of 32 columns, the fewest that cover n <= 128
// columns: the kernels' kDLanes / kDvLanes.
template <typename Fn>
void with_lanes(int n, Fn&& fn) {
  if (n <= 32) {
    fn(std::integral_constant<int, 1>{});
  } else if (n <= 64) {
    fn(std::integral_constant<int, 2>{});
  } else {
    fn(std::integral_constant<int, 4>{});
  }
}

template <typename scalar_t>
void launch_fwd(Params<scalar_t> p, const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* out,
                float* lse, cudaStream_t stream) {
  const int64_t pairs = p.batch * p.heads;
  if constexpr (kTensorCores<scalar_t>) {
    with_width<128>(p.d, [&](auto wd) {
      with_width<128>(p.dv, [&](auto wdv) {
        const MmaFwdLayout layout = plan_fwd_mma(p.nq, p.nk, wd, wdv);
        p.key_tile = layout.key_tile;
        const int64_t row_tiles = (p.nq + 15) / 16;
        const dim3 grid(static_cast<unsigned int>((pairs + layout.pairs_per_block - 1) / layout.pairs_per_block),
                        static_cast<unsigned int>((row_tiles + layout.warps_per_pair - 1) / layout.warps_per_pair));
        auto kernel = attention_fwd_mma_kernel<scalar_t, decltype(wd)::value, decltype(wdv)::value>;
        allow_shared(kernel, layout.shared_bytes);
        launch(kernel, grid, dim3(kMmaThreads), layout.shared_bytes, stream, p, layout.pairs_per_block,
               layout.warps_per_pair, q, k, v, out, lse);
      });
    });
    return;
  }
  const FwdLayout layout = plan_fwd(p.nq, p.nk, p.d, p.dv);
  p.key_tile = layout.key_tile;
  const dim3 grid(static_cast<unsigned int>((pairs + layout.pairs_per_block - 1) / layout.pairs_per_block),
                  static_cast<unsigned int>((p.nq + layout.rows_per_pair - 1) / layout.rows_per_pair));
  auto run = [&](auto kernel) {
    allow_shared(kernel, layout.shared_bytes);
    launch(kernel, grid, dim3(kThreads), layout.shared_bytes, stream, p, layout.pairs_per_block,
           layout.rows_per_pair, q, k, v, out, lse);
  };
  with_lanes(p.dv, [&](auto lanes) { run(attention_fwd_kernel<scalar_t, decltype(lanes)::value>); });
}

// batch_per_chunk and chunks (grid.x / H) as the caller sized table_partial / dense_grad.
template <typename scalar_t>
void launch_bwd(Params<scalar_t> p, const BwdLayout& layout, int64_t chunks, int64_t batch_per_chunk,
                const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* out, const scalar_t* dout,
                const float* lse, float* dq_partial, scalar_t* dk, scalar_t* dv, float* table_partial,
                float* dense_grad, cudaStream_t stream) {
  p.key_tile = layout.key_tile;
  const dim3 grid(static_cast<unsigned int>(chunks * p.heads), static_cast<unsigned int>(layout.key_tiles));
  auto run = [&](auto kernel, int threads) {
    allow_shared(kernel, layout.shared_bytes);
    launch(kernel, grid, dim3(threads), layout.shared_bytes, stream, p, batch_per_chunk, q, k, v, out, dout, lse,
           dq_partial, dk, dv, table_partial, dense_grad);
  };
  if constexpr (kTensorCores<scalar_t>) {
    if (layout.tensor_cores) {
      with_width<64>(p.d, [&](auto wd) {
        with_width<64>(p.dv, [&](auto wdv) {
          run(attention_bwd_mma_kernel<scalar_t, decltype(wd)::value, decltype(wdv)::value>, kMmaThreads);
        });
      });
      return;
    }
  }
  with_lanes(p.d, [&](auto lanes) { run(attention_bwd_kernel<scalar_t, decltype(lanes)::value>, kThreads); });
}

}  // namespace vitkern::attn
