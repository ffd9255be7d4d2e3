// A small CUDA runtime emulation: the kernels of csrc/ compile unchanged with the host C++ compiler (C++20).
//
// A launch spawns one OS thread per thread of the block. Each OS thread walks the blocks of the grid in the same
// order, so exactly one block runs at a time; a barrier after each block keeps them in step. Consequently
//   * __syncthreads() is a std::barrier shared by the block's threads,
//   * __shared__ is `static` (one instance, used by one block at a time) and the dynamic shared memory of the
//     launch is one buffer,
//   * warp shuffles go through a per-warp exchange buffer between two warp barriers,
//   * atomics are std::atomic_ref operations.
// Launches are serialised by a process-wide mutex. As on a GPU, every thread of a block must reach each
// __syncthreads() (no early return before one): otherwise the emulated block deadlocks.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = void*;

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

// Device code calls min/max unqualified, as CUDA's built-in overloads allow.
using std::max;
using std::min;

namespace vitkern::emu {

constexpr int kMaxShuffleBytes = 8;

// One warp's shuffle exchange: a slot per lane and a barrier over the warp's lanes.
struct Warp {
  explicit Warp(int lanes_) : lanes(lanes_), barrier(lanes_) {}
  int lanes;  // warpSize, or fewer in a block's last warp
  std::barrier<> barrier;
  alignas(8) unsigned char slots[warpSize][kMaxShuffleBytes] = {};
};

// What one emulated thread knows about the block it belongs to.
struct ThreadContext {
  std::barrier<>* block_barrier = nullptr;
  Warp* warp = nullptr;
  int lane = 0;
  unsigned char* dynamic_shared = nullptr;
};

inline thread_local ThreadContext context;

inline std::mutex& launch_mutex() {
  static std::mutex mutex;
  return mutex;
}

inline unsigned char* dynamic_shared_memory() { return context.dynamic_shared; }

template <typename T>
T shuffle(T value, int src_lane) {
  static_assert(sizeof(T) <= kMaxShuffleBytes && std::is_trivially_copyable_v<T>, "shuffle of an unsupported type");
  Warp& warp = *context.warp;
  std::memcpy(warp.slots[context.lane], &value, sizeof(T));
  warp.barrier.arrive_and_wait();
  T result;
  std::memcpy(&result, warp.slots[src_lane < warp.lanes ? src_lane : context.lane], sizeof(T));
  warp.barrier.arrive_and_wait();
  return result;
}

// Runs kernel(args...) over grid x block, one block at a time, with `shared_bytes` of dynamic shared memory.
template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, std::size_t shared_bytes, Args&&... args) {
  std::lock_guard<std::mutex> lock(launch_mutex());
  const unsigned int threads = block.x * block.y * block.z;
  const unsigned long long blocks = 1ull * grid.x * grid.y * grid.z;
  if (threads == 0 || blocks == 0) {
    return;
  }
  std::barrier<> block_barrier(threads);
  std::vector<std::unique_ptr<Warp>> warps;
  for (unsigned int first = 0; first < threads; first += warpSize) {
    warps.push_back(std::make_unique<Warp>(static_cast<int>(std::min<unsigned int>(warpSize, threads - first))));
  }
  std::vector<std::max_align_t> shared((shared_bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t));
  unsigned char* shared_ptr = reinterpret_cast<unsigned char*>(shared.data());

  auto body = [&](unsigned int tid) {
    threadIdx = dim3(tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y));
    blockDim = block;
    gridDim = grid;
    context = ThreadContext{&block_barrier, warps[tid / warpSize].get(), static_cast<int>(tid % warpSize), shared_ptr};
    for (unsigned long long b = 0; b < blocks; ++b) {
      blockIdx = dim3(b % grid.x, (b / grid.x) % grid.y, b / (1ull * grid.x * grid.y));
      kernel(args...);
      block_barrier.arrive_and_wait();
    }
  };
  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (unsigned int tid = 0; tid < threads; ++tid) {
    workers.emplace_back(body, tid);
  }
  for (auto& worker : workers) {
    worker.join();
  }
}

}  // namespace vitkern::emu

inline void __syncthreads() { vitkern::emu::context.block_barrier->arrive_and_wait(); }

// Shuffles: every lane of the warp must take part (full mask), as the kernels here always do.
template <typename T>
T __shfl_sync(unsigned int, T value, int src_lane, int width = warpSize) {
  const int lane = vitkern::emu::context.lane;
  return vitkern::emu::shuffle(value, (lane / width) * width + src_lane % width);
}

template <typename T>
T __shfl_xor_sync(unsigned int, T value, int lane_mask, int width = warpSize) {
  const int lane = vitkern::emu::context.lane;
  const int src = lane ^ lane_mask;
  return vitkern::emu::shuffle(value, src / width == lane / width ? src : lane);
}

template <typename T>
T __shfl_down_sync(unsigned int, T value, unsigned int delta, int width = warpSize) {
  const int lane = vitkern::emu::context.lane;
  const int src = lane + static_cast<int>(delta);
  return vitkern::emu::shuffle(value, src / width == lane / width ? src : lane);
}

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
