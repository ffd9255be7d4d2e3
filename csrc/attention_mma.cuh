// Tensor-core attention kernels for 16-bit storage (fp16, bf16): the products q k^T, P v, and in the backward
// v dO^T, P^T dO, dS^T q and dS k run as warp-wide mma.m16n8k16 with fp32 accumulators (csrc/mma.h); softmax,
// bias, mask, lse and every sum of a gradient stay fp32. Included by attention_kernels.cuh, whose Params,
// bias_at, gather_table_grad and launchers they share; the semantics are those of the fp32 kernels there.
//
// Numerics: q, k, v, dO are the storage values; P and dS are rounded to the storage dtype before they enter a
// product (as FlashAttention-2 does); every accumulator is fp32.
//
// Shared memory holds 16-bit tiles: rows of a head dim padded with zeros to the kernel's compile-time width kD
// (16, 32, 64 or 128), row stride kD + 8 elements (rows 16-byte aligned, the eight row addresses of an ldmatrix in
// distinct 16-byte bank groups). Key rows past Nk are zeros.
//
// Forward (attention_fwd_mma_kernel). A warp owns 16 query rows of one (batch, head) pair: a block of kMmaWarps
// warps holds K and V of its pairs for up to kMmaKeyTile keys (all keys of N <= 256: read once) and packs several
// pairs when Nq is small (4 pairs of 16 queries, 2 pairs of 17-32, ...). Over the keys, in steps of kMmaKeyStep,
// the warp computes its 16 x kMmaKeyStep scores in registers and folds them into the output with the online
// softmax (FlashAttention-2, Algorithm 1); the probabilities go from the score fragments straight into the
// A fragments of P v. Longer sequences stream K and V through shared memory in tiles of kMmaKeyTile keys.
//
// Backward (attention_bwd_mma_kernel), head dims up to 64, Nk up to kMaxResidentKeys (the launcher takes the fp32
// kernel otherwise). A block owns kMmaBwdKeys = 16 * kMmaWarps keys of one head and a run of batch entries, as the
// fp32 backward does (grid (chunks * H, key tiles)); warp w owns keys 16w .. 16w + 15 and keeps their K and V
// fragments and dK, dV accumulators in registers. For each group of 16 query rows it computes
// S^T = K Q^T, P^T = exp(scale S^T + bias - lse) and dP^T = V dO^T (each (query, key) pair once), dS^T =
// P^T (dP^T - delta), adds dV += P^T dO and dK += dS^T Q, and leaves dS in shared memory, from which the block forms
// the group's dq partial of its key tile (dS K, the warps splitting the head dim) and the table gradient
// (gather_table_grad, fixed order) or the dense-bias gradient (one owner per element). Bitwise deterministic, no
// atomics; the table path never holds a (B, H, Nq, Nk) tensor.
#pragma once

#include "mma.h"

namespace vitkern::attn {

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = kMmaWarps * 32;
constexpr int kMmaKeyTile = kMaxResidentKeys;  // keys of K and V held in shared memory at once (forward)
constexpr int kMmaKeyStep = 64;                // keys per online-softmax step: 16 x 64 fp32 scores per warp
constexpr int kMmaBwdKeys = 16 * kMmaWarps;    // keys per backward block
constexpr int kMmaBwdMaxHeadDim = 64;          // the backward's register budget: K, V, dK, dV of 16 keys per warp

// fn(std::integral_constant<int, W>{}) with W the compile-time width of a head dim of n <= kMax columns: the
// smallest of 16, 32, 64, 128 that holds it (kMax 64 or 128: the widths instantiated).
template <int kMax, typename Fn>
void with_width(int n, Fn&& fn) {
  static_assert(kMax == 64 || kMax == 128, "with_width: kMax is 64 or 128");
  if (n <= 16) {
    fn(std::integral_constant<int, 16>{});
  } else if (n <= 32) {
    fn(std::integral_constant<int, 32>{});
  } else if (kMax == 64 || n <= 64) {
    fn(std::integral_constant<int, 64>{});
  } else {
    fn(std::integral_constant<int, kMax>{});
  }
}

// Row stride (elements) of a 16-bit shared tile kCols wide.
__host__ __device__ constexpr int tile_stride(int cols) { return cols + 8; }

__host__ __device__ constexpr std::size_t align16(std::size_t bytes) { return (bytes + 15) / 16 * 16; }

// dst[r][c] (row stride ld) = src[r * cols + c] for r < valid_rows, c < cols, and zeros elsewhere in
// [0, rows) x [0, kCols), by `threads` threads from tid. 16-byte accesses when cols is a multiple of 8 (a row of
// src is then 16-byte aligned: src comes from a contiguous tensor), element accesses otherwise.
template <int kCols, typename T>
__device__ inline void stage_tile(T* dst, int ld, const T* src, int cols, int rows, int valid_rows, int tid,
                                  int threads) {
  if (cols % 8 == 0) {
    constexpr int kChunks = kCols / 8;
    for (int e = tid; e < rows * kChunks; e += threads) {
      const int r = e / kChunks, c = e % kChunks * 8;
      uint4 value{0u, 0u, 0u, 0u};
      if (r < valid_rows && c < cols) {
        value = load_vector<uint4>(src + static_cast<int64_t>(r) * cols + c);
      }
      store_vector<uint4>(dst + r * ld + c, value);
    }
  } else {
    const T zero = mma::Element<T>::from_float(0.0f);
    for (int e = tid; e < rows * kCols; e += threads) {
      const int r = e / kCols, c = e % kCols;
      dst[r * ld + c] = r < valid_rows && c < cols ? src[static_cast<int64_t>(r) * cols + c] : zero;
    }
  }
}

// The A fragment (16 x 16, rows = this warp's rows) of two adjacent 16 x 8 accumulator tiles (columns 0-7 and 8-15),
// rounded to T: the C layout of mma.h maps onto the A layout register for register.
template <typename T>
__device__ inline mma::FragA to_a(const mma::FragC& lo, const mma::FragC& hi) {
  mma::FragA a;
  a.reg[0] = mma::pack<T>(lo.reg[0], lo.reg[1]);
  a.reg[1] = mma::pack<T>(lo.reg[2], lo.reg[3]);
  a.reg[2] = mma::pack<T>(hi.reg[0], hi.reg[1]);
  a.reg[3] = mma::pack<T>(hi.reg[2], hi.reg[3]);
  return a;
}

__device__ inline void zero(mma::FragC& c) {
  VITKERN_UNROLL
  for (int e = 0; e < 4; ++e) {
    c.reg[e] = 0.0f;
  }
}

// --- forward -----------------------------------------------------------------------------------------------------

struct MmaFwdLayout {
  int key_tile, pairs_per_block, warps_per_pair;
  std::size_t shared_bytes;
};

inline std::size_t fwd_mma_shared_bytes(int key_tile, int pairs, int width_d, int width_dv) {
  return 2 * (static_cast<std::size_t>(pairs) * key_tile * (tile_stride(width_d) + tile_stride(width_dv)) +
              static_cast<std::size_t>(kMmaWarps) * 16 * tile_stride(width_d));
}

// Key tile: all Nk keys (rounded up to 16) up to kMmaKeyTile, else balanced tiles. Pairs per block: as many as
// fit in kMmaWarps warps of 16 query rows when the keys fit one tile.
inline MmaFwdLayout plan_fwd_mma(int64_t nq, int64_t nk, int width_d, int width_dv) {
  const int64_t tiles = std::max<int64_t>(1, (nk + kMmaKeyTile - 1) / kMmaKeyTile);
  const int key_tile = static_cast<int>(((nk + tiles - 1) / tiles + 15) / 16 * 16);
  const int64_t row_tiles = std::max<int64_t>(1, (nq + 15) / 16);
  int pairs = 1;
  if (tiles == 1 && row_tiles < kMmaWarps) {
    pairs = static_cast<int>(kMmaWarps / row_tiles);
    while (pairs > 1 && fwd_mma_shared_bytes(key_tile, pairs, width_d, width_dv) > kSharedBudget) {
      --pairs;
    }
  }
  const int warps_per_pair = pairs > 1 ? static_cast<int>(row_tiles) : kMmaWarps;
  return {key_tile, pairs, warps_per_pair, fwd_mma_shared_bytes(key_tile, pairs, width_d, width_dv)};
}

// out, lse as attention_fwd_kernel. Grid (ceil(B*H / pairs_per_block), ceil(ceil(Nq / 16) / warps_per_pair)),
// kMmaThreads threads; warp w takes pair w / warps_per_pair of the block and query rows
// 16 * (blockIdx.y * warps_per_pair + w % warps_per_pair) ..  kD, kDv: the widths of d and dv (with_width).
template <typename scalar_t, int kD, int kDv>
__global__ void __launch_bounds__(kMmaThreads, 1)
    attention_fwd_mma_kernel(Params<scalar_t> p, int pairs_per_block, int warps_per_pair, const scalar_t* q,
                             const scalar_t* k, const scalar_t* v, scalar_t* out, float* lse) {
  using mma::FragA;
  using mma::FragB;
  using mma::FragC;
  constexpr int kSd = tile_stride(kD), kSdv = tile_stride(kDv);
  VITKERN_DYNAMIC_SHARED(scalar_t, smem);
  const int d = p.d, dv = p.dv, kt = p.key_tile;
  scalar_t* sk = smem;                                  // [pairs][kt][kSd]
  scalar_t* sv = sk + pairs_per_block * kt * kSd;       // [pairs][kt][kSdv]
  scalar_t* sq = sv + pairs_per_block * kt * kSdv;      // [kMmaWarps][16][kSd]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, group = lane / 4, quad = lane % 4;
  const int64_t pairs = p.batch * p.heads;
  const int64_t pair0 = static_cast<int64_t>(blockIdx.x) * pairs_per_block;
  const int block_pairs = static_cast<int>(min(static_cast<int64_t>(pairs_per_block), pairs - pair0));

  // This warp's pair and rows; a warp without rows still loads tiles and meets every barrier.
  const int local_pair = warp / warps_per_pair;
  const int64_t pair = pair0 + local_pair;
  const int row0 = 16 * (static_cast<int>(blockIdx.y) * warps_per_pair + warp % warps_per_pair);
  const bool active = local_pair < block_pairs && row0 < p.nq;
  const int64_t b = pair / p.heads, h = pair % p.heads;

  for (int w = 0; w < kMmaWarps; ++w) {
    const int lp = w / warps_per_pair;
    const int r0 = 16 * (static_cast<int>(blockIdx.y) * warps_per_pair + w % warps_per_pair);
    const int64_t left = p.nq - r0;
    const int valid = lp < block_pairs && left > 0 ? static_cast<int>(min(static_cast<int64_t>(16), left)) : 0;
    stage_tile<kD>(sq + w * 16 * kSd, kSd, q + ((pair0 + lp) * p.nq + r0) * d, d, 16, valid, tid, kMmaThreads);
  }

  FragA qa[kD / 16];
  FragC o[kDv / 8];
  float m[2] = {kNegInf, kNegInf}, l[2] = {0.0f, 0.0f};  // rows group and group + 8; l: this lane's partial sum
  VITKERN_UNROLL
  for (FragC& c : o) {
    zero(c);
  }

  for (int64_t j0 = 0; j0 < p.nk; j0 += kt) {
    const int tile = static_cast<int>(min(static_cast<int64_t>(kt), p.nk - j0));
    const int padded = (tile + 15) / 16 * 16;
    __syncthreads();  // the previous tile's readers are done
    for (int pl = 0; pl < block_pairs; ++pl) {
      stage_tile<kD>(sk + pl * kt * kSd, kSd, k + ((pair0 + pl) * p.nk + j0) * d, d, padded, tile, tid, kMmaThreads);
      stage_tile<kDv>(sv + pl * kt * kSdv, kSdv, v + ((pair0 + pl) * p.nk + j0) * dv, dv, padded, tile, tid,
                      kMmaThreads);
    }
    __syncthreads();
    if (!active) {
      continue;  // uniform over the warp
    }
    if (j0 == 0) {
      VITKERN_UNROLL
      for (int c = 0; c < kD / 16; ++c) {
        mma::ldmatrix_a(qa[c], sq + warp * 16 * kSd + 16 * c, kSd);
      }
    }
    const scalar_t* kb = sk + local_pair * kt * kSd;
    const scalar_t* vb = sv + local_pair * kt * kSdv;
    for (int c0 = 0; c0 < padded; c0 += kMmaKeyStep) {
      const int step = min(kMmaKeyStep, padded - c0);  // a multiple of 16
      FragC s[kMmaKeyStep / 8];
      float step_max[2] = {kNegInf, kNegInf};
      VITKERN_UNROLL
      for (int n = 0; n < kMmaKeyStep / 8; ++n) {
        if (8 * n >= step) {
          continue;
        }
        zero(s[n]);
        VITKERN_UNROLL
        for (int c = 0; c < kD / 16; ++c) {
          FragB kf;
          mma::ldmatrix_b(kf, kb + (c0 + 8 * n) * kSd + 16 * c, kSd);
          mma::mma_m16n8k16<scalar_t>(s[n], qa[c], kf, s[n]);
        }
        VITKERN_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int i = row0 + group + 8 * (e / 2);
          const int64_t j = j0 + c0 + 8 * n + 2 * quad + e % 2;
          float score = kNegInf;
          if (j < p.nk && i < p.nq) {
            score = s[n].reg[e] * p.scale + bias_at(p, b, h, i, static_cast<int>(j));
          }
          s[n].reg[e] = score;
          step_max[e / 2] = fmaxf(step_max[e / 2], score);
        }
      }
      float alpha[2], m_use[2];
      VITKERN_UNROLL
      for (int r = 0; r < 2; ++r) {  // the four lanes of a group hold the row
        step_max[r] = fmaxf(step_max[r], __shfl_xor_sync(0xffffffffu, step_max[r], 1));
        step_max[r] = fmaxf(step_max[r], __shfl_xor_sync(0xffffffffu, step_max[r], 2));
        const float m_new = fmaxf(m[r], step_max[r]);
        m_use[r] = m_new == kNegInf ? 0.0f : m_new;
        alpha[r] = expf(m[r] - m_use[r]);
        m[r] = m_new;
        l[r] *= alpha[r];
      }
      VITKERN_UNROLL
      for (FragC& c : o) {
        VITKERN_UNROLL
        for (int e = 0; e < 4; ++e) {
          c.reg[e] *= alpha[e / 2];
        }
      }
      VITKERN_UNROLL
      for (int n = 0; n < kMmaKeyStep / 8; ++n) {
        if (8 * n >= step) {
          continue;
        }
        VITKERN_UNROLL
        for (int e = 0; e < 4; ++e) {
          s[n].reg[e] = expf(s[n].reg[e] - m_use[e / 2]);
          l[e / 2] += s[n].reg[e];
        }
      }
      VITKERN_UNROLL
      for (int c = 0; c < kMmaKeyStep / 16; ++c) {
        if (16 * c >= step) {
          continue;
        }
        const FragA pa = to_a<scalar_t>(s[2 * c], s[2 * c + 1]);
        VITKERN_UNROLL
        for (int n = 0; n < kDv / 8; ++n) {
          FragB vf;
          mma::ldmatrix_b_trans(vf, vb + (c0 + 16 * c) * kSdv + 8 * n, kSdv);
          mma::mma_m16n8k16<scalar_t>(o[n], pa, vf, o[n]);
        }
      }
    }
  }

  if (!active) {
    return;
  }
  VITKERN_UNROLL
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  VITKERN_UNROLL
  for (int e = 0; e < 4; ++e) {
    const int i = row0 + group + 8 * (e / 2);
    if (i >= p.nq) {
      continue;
    }
    const float lr = l[e / 2];
    const float inv = lr > 0.0f ? 1.0f / lr : 0.0f;
    scalar_t* row = out + (pair * p.nq + i) * dv;
    VITKERN_UNROLL
    for (int n = 0; n < kDv / 8; ++n) {
      const int col = 8 * n + 2 * quad + e % 2;
      if (col < dv) {
        row[col] = mma::Element<scalar_t>::from_float(o[n].reg[e] * inv);
      }
    }
    if (quad == 0 && e % 2 == 0) {
      lse[pair * p.nq + i] = lr > 0.0f ? m[e / 2] + logf(lr) : kNegInf;
    }
  }
}

// --- backward ----------------------------------------------------------------------------------------------------

inline std::size_t bwd_mma_shared_bytes(int width_d, int width_dv) {
  const std::size_t k_tile = 2ull * kMmaBwdKeys * tile_stride(width_d);
  const std::size_t v_tile = 2ull * kMmaBwdKeys * tile_stride(width_dv);
  const std::size_t q_tile = 2ull * 16 * tile_stride(width_d);
  const std::size_t do_tile = 2ull * 16 * tile_stride(width_dv);
  const std::size_t ds16 = 2ull * 16 * tile_stride(kMmaBwdKeys);
  const std::size_t ds32 = 4ull * 16 * kMmaBwdKeys;
  return align16(k_tile) + align16(v_tile) + align16(q_tile) + align16(do_tile) + align16(ds16) + align16(ds32) +
         4 * 2 * 16;
}

// Gradients of the forward (either kernel) for 16-bit storage, head dims up to kMmaBwdMaxHeadDim, with the
// buffers and grid of attention_bwd_kernel and p.key_tile = kMmaBwdKeys.
template <typename scalar_t, int kD, int kDv>
__global__ void __launch_bounds__(kMmaThreads, 1)
    attention_bwd_mma_kernel(Params<scalar_t> p, int64_t batch_per_chunk, const scalar_t* q, const scalar_t* k,
                             const scalar_t* v, const scalar_t* out, const scalar_t* dout, const float* lse,
                             float* dq_partial, scalar_t* dk, scalar_t* dv_out, float* table_partial,
                             float* dense_grad) {
  using mma::FragA;
  using mma::FragB;
  using mma::FragC;
  static_assert(kD <= kMmaBwdMaxHeadDim && kDv <= kMmaBwdMaxHeadDim, "attention_bwd_mma_kernel: head dims up to 64");
  constexpr int kSd = tile_stride(kD), kSdv = tile_stride(kDv), kSs = tile_stride(kMmaBwdKeys);
  VITKERN_DYNAMIC_SHARED(unsigned char, smem);
  std::size_t offset = 0;
  auto carve = [&](std::size_t bytes) {
    unsigned char* at = smem + offset;
    offset += align16(bytes);
    return at;
  };
  auto* sk = reinterpret_cast<scalar_t*>(carve(2ull * kMmaBwdKeys * kSd));    // [keys][kSd]
  auto* sv = reinterpret_cast<scalar_t*>(carve(2ull * kMmaBwdKeys * kSdv));   // [keys][kSdv]
  auto* sq = reinterpret_cast<scalar_t*>(carve(2ull * 16 * kSd));             // [16 queries][kSd]
  auto* sdo = reinterpret_cast<scalar_t*>(carve(2ull * 16 * kSdv));           // [16 queries][kSdv]
  auto* sds = reinterpret_cast<scalar_t*>(carve(2ull * 16 * kSs));            // dS [16 queries][kSs], rounded
  auto* sdsf = reinterpret_cast<float*>(carve(4ull * 16 * kMmaBwdKeys));      // dS [16 queries][keys], fp32
  auto* slse = reinterpret_cast<float*>(carve(4ull * 16));                    // [16]
  auto* sdelta = slse + 16;                                                   // [16]
  const int d = p.d, dv = p.dv;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, group = lane / 4, quad = lane % 4;
  const int64_t h = blockIdx.x % p.heads, chunk = blockIdx.x / p.heads;
  const int64_t key_tiles = gridDim.y;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kMmaBwdKeys;
  const int tile = static_cast<int>(min(static_cast<int64_t>(kMmaBwdKeys), p.nk - j0));
  const int64_t entries = table_entries(p.bias_mode, p.geo0, p.geo1);
  float* tpart =
      table_partial == nullptr ? nullptr : table_partial + ((chunk * key_tiles + blockIdx.y) * p.heads + h) * entries;
  const int64_t b_end = min(p.batch, (chunk + 1) * batch_per_chunk);
  const int key0 = 16 * warp;  // this warp's first key in the tile

  for (int64_t b = chunk * batch_per_chunk; b < b_end; ++b) {
    const int64_t pair = b * p.heads + h;
    __syncthreads();  // the previous entry's readers are done
    stage_tile<kD>(sk, kSd, k + (pair * p.nk + j0) * d, d, kMmaBwdKeys, tile, tid, kMmaThreads);
    stage_tile<kDv>(sv, kSdv, v + (pair * p.nk + j0) * dv, dv, kMmaBwdKeys, tile, tid, kMmaThreads);
    __syncthreads();
    FragA ka[kD / 16], va[kDv / 16];
    VITKERN_UNROLL
    for (int c = 0; c < kD / 16; ++c) {
      mma::ldmatrix_a(ka[c], sk + key0 * kSd + 16 * c, kSd);
    }
    VITKERN_UNROLL
    for (int c = 0; c < kDv / 16; ++c) {
      mma::ldmatrix_a(va[c], sv + key0 * kSdv + 16 * c, kSdv);
    }
    FragC dka[kD / 8], dva[kDv / 8];
    VITKERN_UNROLL
    for (FragC& c : dka) {
      zero(c);
    }
    VITKERN_UNROLL
    for (FragC& c : dva) {
      zero(c);
    }

    for (int64_t q0 = 0; q0 < p.nq; q0 += 16) {
      const int rows = static_cast<int>(min(static_cast<int64_t>(16), p.nq - q0));
      __syncthreads();  // the previous group's readers are done
      stage_tile<kD>(sq, kSd, q + (pair * p.nq + q0) * d, d, 16, rows, tid, kMmaThreads);
      stage_tile<kDv>(sdo, kSdv, dout + (pair * p.nq + q0) * dv, dv, 16, rows, tid, kMmaThreads);
      if (tid < 16) {
        float delta = 0.0f, row_lse = 0.0f;
        if (tid < rows) {
          const int64_t row = pair * p.nq + q0 + tid;
          for (int c = 0; c < dv; ++c) {
            delta = fmaf(mma::Element<scalar_t>::to_float(dout[row * dv + c]),
                         mma::Element<scalar_t>::to_float(out[row * dv + c]), delta);
          }
          row_lse = lse[row] == kNegInf ? 0.0f : lse[row];  // P = 0 there anyway
        }
        sdelta[tid] = delta;
        slse[tid] = row_lse;
      }
      __syncthreads();

      // S^T and dP^T (this warp's 16 keys x the group's 16 queries: two 16 x 8 tiles each).
      FragC st[2], dpt[2];
      VITKERN_UNROLL
      for (int n = 0; n < 2; ++n) {
        zero(st[n]);
        zero(dpt[n]);
        VITKERN_UNROLL
        for (int c = 0; c < kD / 16; ++c) {
          FragB qf;
          mma::ldmatrix_b(qf, sq + 8 * n * kSd + 16 * c, kSd);
          mma::mma_m16n8k16<scalar_t>(st[n], ka[c], qf, st[n]);
        }
        VITKERN_UNROLL
        for (int c = 0; c < kDv / 16; ++c) {
          FragB of;
          mma::ldmatrix_b(of, sdo + 8 * n * kSdv + 16 * c, kSdv);
          mma::mma_m16n8k16<scalar_t>(dpt[n], va[c], of, dpt[n]);
        }
        // P^T into st, dS^T into dpt; dS to shared memory (rounded for dS K, fp32 for the bias gradients).
        VITKERN_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int jl = key0 + group + 8 * (e / 2);  // key within the tile
          const int il = 8 * n + 2 * quad + e % 2;    // query within the group
          float pij = 0.0f, ds = 0.0f;
          if (jl < tile && il < rows) {
            const int i = static_cast<int>(q0) + il, j = static_cast<int>(j0) + jl;
            pij = expf(st[n].reg[e] * p.scale + bias_at(p, b, h, i, j) - slse[il]);
            ds = pij * (dpt[n].reg[e] - sdelta[il]);
            if (dense_grad != nullptr) {
              dense_grad[((chunk * p.heads + h) * p.nq + i) * p.nk + j] += ds;
            }
          }
          st[n].reg[e] = pij;
          dpt[n].reg[e] = ds;
          sds[il * kSs + jl] = mma::Element<scalar_t>::from_float(ds);
          sdsf[il * kMmaBwdKeys + jl] = ds;
        }
      }
      // dV += P^T dO, dK += dS^T Q (keys x queries times queries x head dim).
      const FragA pa = to_a<scalar_t>(st[0], st[1]);
      const FragA dsa = to_a<scalar_t>(dpt[0], dpt[1]);
      VITKERN_UNROLL
      for (int n = 0; n < kDv / 8; ++n) {
        FragB of;
        mma::ldmatrix_b_trans(of, sdo + 8 * n, kSdv);
        mma::mma_m16n8k16<scalar_t>(dva[n], pa, of, dva[n]);
      }
      VITKERN_UNROLL
      for (int n = 0; n < kD / 8; ++n) {
        FragB qf;
        mma::ldmatrix_b_trans(qf, sq + 8 * n, kSd);
        mma::mma_m16n8k16<scalar_t>(dka[n], dsa, qf, dka[n]);
      }
      __syncthreads();  // dS of every warp is in shared memory
      // dq partial of this key tile: dS (16 x keys) K (keys x d), head-dim tiles of 8 split over the warps.
      for (int n = warp; n < kD / 8; n += kMmaWarps) {
        FragC acc;
        zero(acc);
        VITKERN_UNROLL
        for (int c = 0; c < kMmaBwdKeys / 16; ++c) {
          FragA da;
          FragB kf;
          mma::ldmatrix_a(da, sds + 16 * c, kSs);
          mma::ldmatrix_b_trans(kf, sk + 16 * c * kSd + 8 * n, kSd);
          mma::mma_m16n8k16<scalar_t>(acc, da, kf, acc);
        }
        VITKERN_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int il = group + 8 * (e / 2), col = 8 * n + 2 * quad + e % 2;
          if (il < rows && col < d) {
            dq_partial[((blockIdx.y * p.batch * p.heads + pair) * p.nq + q0 + il) * d + col] = acc.reg[e] * p.scale;
          }
        }
      }
      if (tpart != nullptr) {
        gather_table_grad(p, sdsf, q0, j0, tile, tpart);
      }
    }

    VITKERN_UNROLL
    for (int e = 0; e < 4; ++e) {
      const int jl = key0 + group + 8 * (e / 2);
      if (jl >= tile) {
        continue;
      }
      const int64_t row = pair * p.nk + j0 + jl;
      VITKERN_UNROLL
      for (int n = 0; n < kD / 8; ++n) {
        const int col = 8 * n + 2 * quad + e % 2;
        if (col < d) {
          dk[row * d + col] = mma::Element<scalar_t>::from_float(dka[n].reg[e] * p.scale);
        }
      }
      VITKERN_UNROLL
      for (int n = 0; n < kDv / 8; ++n) {
        const int col = 8 * n + 2 * quad + e % 2;
        if (col < dv) {
          dv_out[row * dv + col] = mma::Element<scalar_t>::from_float(dva[n].reg[e]);
        }
      }
    }
  }
}

}  // namespace vitkern::attn
