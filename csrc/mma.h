// Tensor-core helpers: the warp-wide m16n8k16 matrix multiply-accumulate (16-bit inputs, fp32 accumulators), the
// shared-memory fragment loads that feed it (ldmatrix), and where each lane's fragment elements sit.
//
// Under nvcc they are inline PTX (mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 and
// ldmatrix.sync.aligned.m8n8.{x4,x2,x2.trans}.shared.b16, sm_80 and later). Under the emulation
// (VITKERN_EMULATION) each helper is a warp-collective operation: every lane of the warp calls it, the lanes
// exchange their fragments or row addresses through the warp's exchange buffer (csrc/emulation/cuda_emulation.h),
// and each lane gets exactly the elements the PTX ISA assigns to it.
//
// Layouts: PTX ISA (docs.nvidia.com/cuda/parallel-thread-execution), section "Matrix Fragments for
// mma.m16n8k16 with floating point type", under "Warp Level Matrix Multiply-Accumulate Instructions". With
// groupID = lane / 4 and threadID_in_group = lane % 4:
//   A (16 x 16, row-major), a0..a7: row = groupID (+ 8 for a2, a3, a6, a7)
//                                   col = 2 * threadID_in_group + (i & 1) (+ 8 for a4..a7)
//   B (16 x 8, k x n),      b0..b3: row = 2 * threadID_in_group + (i & 1) (+ 8 for b2, b3), col = groupID
//   C, D (16 x 8, fp32),    c0..c3: row = groupID (+ 8 for c2, c3), col = 2 * threadID_in_group + (i & 1)
// Two consecutive 16-bit elements share a 32-bit register, the lower-numbered one in the low half.
//
// The ldmatrix helpers read a tile of the kernel's own __shared__ arrays or of its dynamic shared memory; the
// emulation faults on any other address (global memory, or a __shared__ array of a __device__ function, which
// it does not track).
// ldmatrix (PTX ISA, section "Warp-level matrix load instruction: ldmatrix"): lanes 8m .. 8m + 7 give the
// addresses of rows 0..7 of matrix m (16 bytes each, 16-byte aligned, in shared memory); register m of lane l
// receives row l / 4, columns 2 * (l % 4) and 2 * (l % 4) + 1 of matrix m, or with .trans rows 2 * (l % 4) and
// 2 * (l % 4) + 1 of column l / 4.
#pragma once

#include <cstdint>
#include <cstring>

#include "launch.h"

#ifndef VITKERN_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#if __has_include(<c10/util/Half.h>)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#define VITKERN_MMA_C10_TYPES 1
#endif

namespace vitkern::mma {

struct FragA {  // 16 x 16 A, row-major: 8 elements per lane as 4 packed pairs
  uint32_t reg[4];
};
struct FragB {  // 16 x 8 B (k x n), "col" layout: 4 elements per lane as 2 packed pairs
  uint32_t reg[2];
};
struct FragC {  // 16 x 8 C or D, fp32
  float reg[4];
};

// The 16-bit float types the mma takes: whether it is bf16 (else fp16), and its conversions.
template <typename T>
struct Element;

template <>
struct Element<__half> {
  static constexpr bool kBf16 = false;
  __host__ __device__ static float to_float(__half v) { return __half2float(v); }
  __host__ __device__ static __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Element<__nv_bfloat16> {
  static constexpr bool kBf16 = true;
  __host__ __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __host__ __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

#ifdef VITKERN_MMA_C10_TYPES
template <>
struct Element<c10::Half> {
  static constexpr bool kBf16 = false;
  __host__ __device__ static float to_float(c10::Half v) { return static_cast<float>(v); }
  __host__ __device__ static c10::Half from_float(float v) { return c10::Half(v); }
};

template <>
struct Element<c10::BFloat16> {
  static constexpr bool kBf16 = true;
  __host__ __device__ static float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
  __host__ __device__ static c10::BFloat16 from_float(float v) { return c10::BFloat16(v); }
};
#endif

// This thread's lane in its warp.
__device__ inline int lane_id() {
#ifdef VITKERN_EMULATION
  return emu::context.lane;
#else
  return static_cast<int>((threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x) % warpSize;
#endif
}

// Element coordinates (row, col) of a lane's fragment entries, from the tables above.
// A: i in 0..7, the element order of FragA (element i in reg[i / 2], half i % 2).
__host__ __device__ inline void a_coord(int lane, int i, int& row, int& col) {
  row = lane / 4 + ((i / 2) % 2) * 8;
  col = (lane % 4) * 2 + i % 2 + (i / 4) * 8;
}

// B: i in 0..3 (element i in reg[i / 2], half i % 2); row = k, col = n.
__host__ __device__ inline void b_coord(int lane, int i, int& row, int& col) {
  row = (lane % 4) * 2 + i % 2 + (i / 2) * 8;
  col = lane / 4;
}

// C and D: i in 0..3, the index into FragC::reg.
__host__ __device__ inline void c_coord(int lane, int i, int& row, int& col) {
  row = lane / 4 + (i / 2) * 8;
  col = (lane % 4) * 2 + i % 2;
}

// Two T from floats (round to nearest) in one register, `lo` in the low half.
template <typename T>
__host__ __device__ inline uint32_t pack(float lo, float hi) {
  static_assert(sizeof(T) == 2, "pack: T must be a 16-bit float type");
  const T l = Element<T>::from_float(lo);
  const T h = Element<T>::from_float(hi);
  uint16_t bl, bh;
  std::memcpy(&bl, &l, sizeof(bl));
  std::memcpy(&bh, &h, sizeof(bh));
  return static_cast<uint32_t>(bl) | (static_cast<uint32_t>(bh) << 16);
}

// Half `half` (0 low, 1 high) of a packed register, as float.
template <typename T>
__host__ __device__ inline float unpack(uint32_t reg, int half) {
  static_assert(sizeof(T) == 2, "unpack: T must be a 16-bit float type");
  const uint16_t bits = static_cast<uint16_t>(half != 0 ? reg >> 16 : reg & 0xffffu);
  T v;
  std::memcpy(&v, &bits, sizeof(v));
  return Element<T>::to_float(v);
}

#ifdef VITKERN_EMULATION
namespace detail {

// ldmatrix over `matrices` 8x8 matrices of 16-bit elements: this lane gives `row_address` (used when its lane
// is below 8 * matrices) and receives regs[0 .. matrices - 1].
inline void ldmatrix(uint32_t* regs, int matrices, bool trans, const void* row_address, const char* op) {
  emu::require_full_warp(op);
  const int lane = lane_id();
  if (lane < 8 * matrices) {
    emu::check_shared(row_address, 16, op);
    emu::check_aligned(row_address, 16, op);
  }
  emu::warp_collective(row_address, [&](std::span<const void* const> rows) {
    for (int m = 0; m < matrices; ++m) {
      uint16_t e[2];
      for (int h = 0; h < 2; ++h) {
        const int row = trans ? (lane % 4) * 2 + h : lane / 4;
        const int col = trans ? lane / 4 : (lane % 4) * 2 + h;
        std::memcpy(&e[h], static_cast<const unsigned char*>(rows[8 * m + row]) + 2 * col, sizeof(uint16_t));
      }
      regs[m] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
    }
    return 0;
  });
}

}  // namespace detail
#endif

// d = a * b + c over the warp (every lane calls it; d may be c).
template <typename T>
__device__ inline void mma_m16n8k16(FragC& d, const FragA& a, const FragB& b, const FragC& c) {
  static_assert(sizeof(T) == 2, "mma_m16n8k16: T must be a 16-bit float type");
#ifdef VITKERN_EMULATION
  struct Operands {
    FragA a;
    FragB b;
    FragC c;
  };
  emu::require_full_warp("mma_m16n8k16");
  const int lane = lane_id();
  d = emu::warp_collective(Operands{a, b, c}, [&](std::span<const Operands> lanes) {
    float am[16][16], bm[16][8];
    for (int l = 0; l < warpSize; ++l) {
      for (int i = 0; i < 8; ++i) {
        int row, col;
        a_coord(l, i, row, col);
        am[row][col] = unpack<T>(lanes[l].a.reg[i / 2], i % 2);
      }
      for (int i = 0; i < 4; ++i) {
        int row, col;
        b_coord(l, i, row, col);
        bm[row][col] = unpack<T>(lanes[l].b.reg[i / 2], i % 2);
      }
    }
    FragC out;
    for (int i = 0; i < 4; ++i) {
      int row, col;
      c_coord(lane, i, row, col);
      float acc = lanes[lane].c.reg[i];
      for (int k = 0; k < 16; ++k) {
        acc += am[row][k] * bm[k][col];
      }
      out.reg[i] = acc;
    }
    return out;
  });
#else
// AB: the spelling of the 16-bit input type in the instruction, "bf16" or "f16".
#define VITKERN_MMA_M16N8K16(AB)                                                                                 \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." AB "." AB ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "   \
               "{%8, %9}, {%10, %11, %12, %13};\n"                                                               \
               : "=f"(d.reg[0]), "=f"(d.reg[1]), "=f"(d.reg[2]), "=f"(d.reg[3])                                   \
               : "r"(a.reg[0]), "r"(a.reg[1]), "r"(a.reg[2]), "r"(a.reg[3]), "r"(b.reg[0]), "r"(b.reg[1]),        \
                 "f"(c.reg[0]), "f"(c.reg[1]), "f"(c.reg[2]), "f"(c.reg[3]))
  if constexpr (Element<T>::kBf16) {
    VITKERN_MMA_M16N8K16("bf16");
  } else {
    VITKERN_MMA_M16N8K16("f16");
  }
#undef VITKERN_MMA_M16N8K16
#endif
}

namespace detail {

// ldmatrix .x<kMatrices> (.trans with kTrans) from this lane's row address: regs[0 .. kMatrices - 1].
template <int kMatrices, bool kTrans>
__device__ inline void load_matrices(uint32_t (&regs)[kMatrices], const void* row, const char* op) {
  static_assert(kMatrices == 2 || (kMatrices == 4 && !kTrans), "ldmatrix: .x2, .x2.trans or .x4");
#ifdef VITKERN_EMULATION
  ldmatrix(regs, kMatrices, kTrans, row, op);
#else
  (void)op;
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (kMatrices == 4) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(regs[0]), "=r"(regs[1]), "=r"(regs[2]), "=r"(regs[3])
                 : "r"(address));
  } else if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(regs[0]), "=r"(regs[1])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(regs[0]), "=r"(regs[1])
                 : "r"(address));
  }
#endif
}

}  // namespace detail

// A 16 x 16 tile at smem (shared memory, row stride ld elements; every row 16-byte aligned): ldmatrix .x4 with
// matrices (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15) = reg[0..3].
template <typename T>
__device__ inline void ldmatrix_a(FragA& a, const T* smem, int ld) {
  static_assert(sizeof(T) == 2, "ldmatrix_a: T must be a 16-bit float type");
  const int lane = lane_id();
  detail::load_matrices<4, false>(a.reg, smem + (lane % 8 + ((lane / 8) % 2) * 8) * ld + (lane / 16) * 8,
                                  "ldmatrix_a");
}

// B (16 x 8, k x n) stored transposed, [n][k] with k contiguous (row stride ld): ldmatrix .x2, matrices
// (k 0-7), (k 8-15) = reg[0..1]. Lanes 16-31 repeat the addresses of lanes 0-15.
template <typename T>
__device__ inline void ldmatrix_b(FragB& b, const T* smem, int ld) {
  static_assert(sizeof(T) == 2, "ldmatrix_b: T must be a 16-bit float type");
  const int lane = lane_id();
  detail::load_matrices<2, false>(b.reg, smem + (lane % 8) * ld + ((lane / 8) % 2) * 8, "ldmatrix_b");
}

// B (16 x 8, k x n) stored [k][n] with n contiguous (row stride ld): ldmatrix .x2.trans, matrices (k 0-7),
// (k 8-15) = reg[0..1]. Lanes 16-31 repeat the addresses of lanes 0-15.
template <typename T>
__device__ inline void ldmatrix_b_trans(FragB& b, const T* smem, int ld) {
  static_assert(sizeof(T) == 2, "ldmatrix_b_trans: T must be a 16-bit float type");
  detail::load_matrices<2, true>(b.reg, smem + (lane_id() % 16) * ld, "ldmatrix_b_trans");
}

}  // namespace vitkern::mma
