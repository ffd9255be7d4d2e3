// A small CUDA runtime emulation: the kernels of csrc/ compile unchanged with the host C++ compiler (C++20).
//
// A launch spawns one OS thread per thread of the block. Each OS thread walks the blocks of the grid in the same
// order, so exactly one block runs at a time; a barrier after each block keeps them in step. Consequently
//   * __syncthreads() is a std::barrier shared by the block's threads,
//   * __shared__ is `static` (one instance, used by one block at a time) and the dynamic shared memory of the
//     launch is one buffer,
//   * warp shuffles and the warp-collective helpers (csrc/mma.h) go through a per-warp exchange buffer between
//     two warp barriers,
//   * atomics are std::atomic_ref operations.
// Launches are serialised by a process-wide mutex. As on a GPU, every thread of a block must reach each
// __syncthreads() (no early return before one), and every lane of a warp each shuffle: otherwise the emulated
// block deadlocks.
//
// Stricter than it has to be, so that what would break on a GPU breaks here too:
//   * Blocks run in a shuffled order: a permutation of the grid drawn from std::mt19937_64 seeded with the
//     environment variable VITKERN_EMULATION_SEED (an unsigned integer, default 0), the same for every launch of
//     the same number of blocks, so a run is reproducible and another seed gives another order.
//   * At the start of every block, static and dynamic shared memory hold 0xFF bytes (a NaN in every float width),
//     never what the previous block left. The static __shared__ variables of a kernel are found, at its first
//     launch, in the ELF symbol table of the file it was loaded from: its static locals are the symbols named
//     _ZZ<kernel's mangled name without _Z>E... (Itanium C++ ABI, "Scope Encoding"). Only a kernel's own
//     __shared__ variables are poisoned, not those of __device__ functions it calls. (A linker section for
//     __shared__ variables, bounded by __start_/__stop_ symbols, would need no symbol table, but GCC ignores the
//     section attribute on the static locals of function templates, as GCC 12 does.)
//   * Vector accesses (vitkern::load_vector / store_vector of csrc/launch.h) and the fragment loads of csrc/mma.h
//     check their alignment; a misaligned one aborts with a message naming the kernel and the address.
#pragma once

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// CUDA's vector types, with their alignment (vector_types.h).
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
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

// The 16-bit float types of cuda_fp16.h and cuda_bf16.h, as storage with the conversions kernels call.
struct __half {
  std::uint16_t bits;
};
struct __nv_bfloat16 {
  std::uint16_t bits;
};

inline __half __float2half_rn(float v) { return {std::bit_cast<std::uint16_t>(static_cast<_Float16>(v))}; }
inline float __half2float(__half v) { return static_cast<float>(std::bit_cast<_Float16>(v.bits)); }

// Round to nearest even on the upper 16 bits; a NaN stays a (quiet) NaN.
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    return {static_cast<std::uint16_t>((u >> 16) | 0x40u)};
  }
  return {static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 v) { return std::bit_cast<float>(static_cast<std::uint32_t>(v.bits) << 16); }

namespace vitkern::emu {

constexpr int kExchangeBytes = 48;  // per lane: enough for the operands of one mma (csrc/mma.h)
constexpr std::uint64_t kDefaultSeed = 0;
constexpr unsigned char kSharedPoison = 0xFF;

// One warp's exchange: a slot per lane and a barrier over the warp's lanes.
struct Warp {
  explicit Warp(int lanes_) : lanes(lanes_), barrier(lanes_) {}
  int lanes;  // warpSize, or fewer in a block's last warp
  std::barrier<> barrier;
  alignas(16) unsigned char slots[warpSize][kExchangeBytes] = {};
};

struct KernelInfo;

// What one emulated thread knows about the block it belongs to.
struct ThreadContext {
  std::barrier<>* block_barrier = nullptr;
  Warp* warp = nullptr;
  int lane = 0;
  unsigned char* dynamic_shared = nullptr;
  std::size_t dynamic_shared_bytes = 0;
  const KernelInfo* kernel = nullptr;
};

inline thread_local ThreadContext context;

inline std::mutex& launch_mutex() {
  static std::mutex mutex;
  return mutex;
}

inline unsigned char* dynamic_shared_memory() { return context.dynamic_shared; }

inline std::string demangle(const std::string& name) {
  int status = 0;
  std::unique_ptr<char, decltype(&std::free)> out(abi::__cxa_demangle(name.c_str(), nullptr, nullptr, &status),
                                                  &std::free);
  return status == 0 && out ? std::string(out.get()) : name;
}

// A symbol of an ELF .symtab, at its address in this process.
struct Symbol {
  std::string name;
  std::uintptr_t address;
  std::size_t size;
  unsigned char type;  // STT_FUNC, STT_OBJECT, ...
  bool writable;       // in a writable section
};

// The .symtab of the ELF file at `path`, loaded at `base` (empty when the file has none).
inline std::vector<Symbol> read_symbols(const std::string& path, std::uintptr_t base) {
  std::ifstream file(path, std::ios::binary);
  const std::vector<char> image((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  std::vector<Symbol> symbols;
  Elf64_Ehdr header;
  if (image.size() < sizeof(header)) {
    return symbols;
  }
  std::memcpy(&header, image.data(), sizeof(header));
  if (std::memcmp(header.e_ident, ELFMAG, SELFMAG) != 0 || header.e_ident[EI_CLASS] != ELFCLASS64 ||
      header.e_shoff + 1ull * header.e_shnum * sizeof(Elf64_Shdr) > image.size()) {
    return symbols;
  }
  const std::uintptr_t offset = header.e_type == ET_DYN ? base : 0;
  std::vector<Elf64_Shdr> sections(header.e_shnum);
  std::memcpy(sections.data(), image.data() + header.e_shoff, sections.size() * sizeof(Elf64_Shdr));
  for (const Elf64_Shdr& table : sections) {
    if (table.sh_type != SHT_SYMTAB || table.sh_link >= sections.size() ||
        table.sh_offset + table.sh_size > image.size()) {
      continue;
    }
    const Elf64_Shdr& names = sections[table.sh_link];
    if (names.sh_offset + names.sh_size > image.size()) {
      continue;
    }
    for (std::size_t at = 0; at + sizeof(Elf64_Sym) <= table.sh_size; at += sizeof(Elf64_Sym)) {
      Elf64_Sym sym;
      std::memcpy(&sym, image.data() + table.sh_offset + at, sizeof(sym));
      if (sym.st_name >= names.sh_size || sym.st_shndx == SHN_UNDEF || sym.st_shndx >= sections.size()) {
        continue;
      }
      const char* name = image.data() + names.sh_offset + sym.st_name;
      symbols.push_back({std::string(name, strnlen(name, names.sh_size - sym.st_name)), offset + sym.st_value,
                         sym.st_size, static_cast<unsigned char>(ELF64_ST_TYPE(sym.st_info)),
                         (sections[sym.st_shndx].sh_flags & SHF_WRITE) != 0});
    }
  }
  return symbols;
}

// What the emulation knows of a launched kernel: its name and its static __shared__ variables.
struct KernelInfo {
  std::string name;
  std::vector<std::pair<unsigned char*, std::size_t>> shared;  // (address, bytes) of each
};

// The kernel at `kernel`, looked up once in the symbol table of the file it was loaded from (see the top of
// this file). Called with the launch mutex held.
inline const KernelInfo& kernel_info(const void* kernel) {
  static std::map<const void*, KernelInfo> kernels;
  static std::map<std::string, std::vector<Symbol>> files;
  const auto known = kernels.find(kernel);
  if (known != kernels.end()) {
    return known->second;
  }
  Dl_info dl{};
  if (dladdr(kernel, &dl) == 0) {
    throw std::runtime_error("vitkern emulation: dladdr finds no loaded file holding the kernel launched");
  }
  const std::string path = dl.dli_fname != nullptr && dl.dli_fname[0] != '\0' ? dl.dli_fname : "/proc/self/exe";
  auto file = files.find(path);
  if (file == files.end()) {
    file = files.emplace(path, read_symbols(path, reinterpret_cast<std::uintptr_t>(dl.dli_fbase))).first;
  }
  const std::vector<Symbol>& symbols = file->second;
  const auto self = std::find_if(symbols.begin(), symbols.end(), [&](const Symbol& sym) {
    return sym.type == STT_FUNC && sym.address == reinterpret_cast<std::uintptr_t>(kernel);
  });
  if (self == symbols.end()) {
    throw std::runtime_error("vitkern emulation: the kernel launched is not in the symbol table of " + path +
                             ", which the emulation needs to find its static shared memory (is the file stripped?)");
  }
  KernelInfo info{demangle(self->name), {}};
  // Static locals of _Z<encoding> are _ZZ<encoding>E<name>; of an extern "C" function f, _ZZ<len>fE<name>.
  const std::string prefix = self->name.rfind("_Z", 0) == 0 ? "_ZZ" + self->name.substr(2) + "E"
                                                              : "_ZZ" + std::to_string(self->name.size()) + self->name + "E";
  for (const Symbol& sym : symbols) {
    if (sym.type == STT_OBJECT && sym.writable && sym.size > 0 && sym.name.rfind(prefix, 0) == 0) {
      info.shared.emplace_back(reinterpret_cast<unsigned char*>(sym.address), sym.size);
    }
  }
  return kernels.emplace(kernel, std::move(info)).first->second;
}

// Prints what went wrong, where (kernel, block, thread), and aborts: no kernel may go on after a fault.
[[noreturn]] inline void fault(const std::string& what) {
  std::fprintf(stderr, "vitkern emulation: %s in kernel %s, block (%u, %u, %u), thread (%u, %u, %u)\n", what.c_str(),
               context.kernel->name.c_str(), blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y,
               threadIdx.z);
  std::fflush(stderr);
  std::abort();
}

// A GPU faults on a misaligned vector or matrix access: so does the emulation.
inline void check_aligned(const void* address, std::size_t alignment, const char* access) {
  if (reinterpret_cast<std::uintptr_t>(address) % alignment != 0) {
    char what[160];
    std::snprintf(what, sizeof(what), "misaligned %s at address %p (needs %zu-byte alignment)", access, address,
                  alignment);
    fault(what);
  }
}

// Shared-memory instructions (ldmatrix) take only shared addresses: the kernel's static __shared__ variables or
// the launch's dynamic shared memory.
inline void check_shared(const void* address, std::size_t bytes, const char* access) {
  const auto* p = static_cast<const unsigned char*>(address);
  auto inside = [&](const unsigned char* begin, std::size_t size) { return p >= begin && p + bytes <= begin + size; };
  bool shared = inside(context.dynamic_shared, context.dynamic_shared_bytes);
  for (const auto& [begin, size] : context.kernel->shared) {
    shared = shared || inside(begin, size);
  }
  if (!shared) {
    char what[160];
    std::snprintf(what, sizeof(what), "%s of %zu bytes at address %p, outside shared memory", access, bytes, address);
    fault(what);
  }
}

// Warp-collective instructions need every lane of a full warp.
inline void require_full_warp(const char* op) {
  if (context.warp->lanes != warpSize) {
    fault(std::string(op) + " in a warp of " + std::to_string(context.warp->lanes) + " threads: it needs all " +
          std::to_string(warpSize));
  }
}

// A warp-collective step: every lane of the warp calls it with its `mine`; combine(lanes) then sees every lane's
// value (lanes[i] from lane i, lanes.size() the warp's lane count) and its result is this lane's return value.
template <typename Mine, typename Combine>
auto warp_collective(const Mine& mine, Combine&& combine) {
  static_assert(sizeof(Mine) <= kExchangeBytes && std::is_trivially_copyable_v<Mine>,
                "warp exchange of an unsupported type");
  Warp& warp = *context.warp;
  std::memcpy(warp.slots[context.lane], &mine, sizeof(Mine));
  warp.barrier.arrive_and_wait();
  std::array<Mine, warpSize> lanes;
  for (int lane = 0; lane < warp.lanes; ++lane) {
    std::memcpy(&lanes[lane], warp.slots[lane], sizeof(Mine));
  }
  warp.barrier.arrive_and_wait();
  return combine(std::span<const Mine>(lanes.data(), warp.lanes));
}

template <typename T>
T shuffle(T value, int src_lane) {
  return warp_collective(value, [&](std::span<const T> lanes) {
    return lanes[src_lane < static_cast<int>(lanes.size()) ? src_lane : context.lane];
  });
}

inline std::uint64_t block_order_seed() {
  const char* text = std::getenv("VITKERN_EMULATION_SEED");
  if (text == nullptr || text[0] == '\0') {
    return kDefaultSeed;
  }
  char* end = nullptr;
  const unsigned long long seed = std::strtoull(text, &end, 10);
  if (*end != '\0' || text[0] == '-') {
    throw std::invalid_argument(std::string("VITKERN_EMULATION_SEED: expected an unsigned integer, got '") + text +
                                "'");
  }
  return seed;
}

// The order in which the blocks of a launch run: a permutation of 0 .. blocks - 1 (see the top of this file).
inline std::vector<unsigned long long> block_order(unsigned long long blocks) {
  std::vector<unsigned long long> order(blocks);
  std::iota(order.begin(), order.end(), 0ull);
  std::mt19937_64 rng(block_order_seed());
  std::shuffle(order.begin(), order.end(), rng);
  return order;
}

// Fills the kernel's static shared memory and the launch's dynamic shared memory with kSharedPoison.
struct PoisonShared {
  const KernelInfo* kernel;
  unsigned char* dynamic_shared;
  std::size_t dynamic_bytes;
  void operator()() const noexcept {
    for (const auto& [begin, size] : kernel->shared) {
      std::memset(begin, kSharedPoison, size);
    }
    std::memset(dynamic_shared, kSharedPoison, dynamic_bytes);
  }
};

// Runs kernel(args...) over grid x block, one block at a time in a shuffled order, with `shared_bytes` of
// dynamic shared memory.
template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, std::size_t shared_bytes, Args&&... args) {
  std::lock_guard<std::mutex> lock(launch_mutex());
  const unsigned int threads = block.x * block.y * block.z;
  const unsigned long long blocks = 1ull * grid.x * grid.y * grid.z;
  if (threads == 0 || blocks == 0) {
    return;
  }
  const KernelInfo& info = kernel_info(reinterpret_cast<const void*>(kernel));
  const std::vector<unsigned long long> order = block_order(blocks);
  std::barrier<> block_barrier(threads);
  std::vector<std::unique_ptr<Warp>> warps;
  for (unsigned int first = 0; first < threads; first += warpSize) {
    warps.push_back(std::make_unique<Warp>(static_cast<int>(std::min<unsigned int>(warpSize, threads - first))));
  }
  std::vector<std::max_align_t> shared((shared_bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t));
  unsigned char* shared_ptr = reinterpret_cast<unsigned char*>(shared.data());
  // The last thread to finish a block poisons shared memory before any thread starts the next one.
  const PoisonShared poison{&info, shared_ptr, shared.size() * sizeof(std::max_align_t)};
  std::barrier<PoisonShared> block_end(threads, poison);
  poison();

  auto body = [&](unsigned int tid) {
    threadIdx = dim3(tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y));
    blockDim = block;
    gridDim = grid;
    context = ThreadContext{&block_barrier, warps[tid / warpSize].get(), static_cast<int>(tid % warpSize), shared_ptr,
                            shared_bytes, &info};
    for (const unsigned long long b : order) {
      blockIdx = dim3(b % grid.x, (b / grid.x) % grid.y, b / (1ull * grid.x * grid.y));
      kernel(args...);
      block_end.arrive_and_wait();
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
