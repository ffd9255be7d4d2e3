// Standalone checks of the emulation runtime and of the depthwise-convolution kernels (float), without torch.
// tests/test_cuda_emulation.py builds it with g++ (plain, and with -fsanitize=thread or address) and runs one
// mode (the table kModes at the end):
//
//   selftest barrier | shared | dynamic_shared | grid | shuffle | atomic   runtime semantics
//   selftest conv                                                         kernels against naive loops,
//                                                                         and their choice of loads
//   selftest attention                                                    attention kernels against naive loops
//   selftest race                                                         a kernel missing a __syncthreads()
//   selftest overflow                                                     a kernel writing past its shared memory
//
// Prints "<mode> ok" and exits 0 on success; prints what differs and exits 1 otherwise.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "attention_kernels.cuh"
#include "depthwise_conv_kernels.cuh"

namespace {

using vitkern::launch;
namespace dw = vitkern::dwconv;

bool report(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAILED: %s\n", what);
  }
  return ok;
}

// --- runtime ------------------------------------------------------------------------------------------------------

constexpr int kPhases = 64;

// Each phase every thread writes its slot, then reads its neighbour's: wrong without a working barrier.
__global__ void barrier_kernel(int* errors) {
  __shared__ int slots[128];
  const int tid = threadIdx.x;
  for (int phase = 0; phase < kPhases; ++phase) {
    slots[tid] = phase * 1000 + tid;
    __syncthreads();
    const int neighbour = (tid + 1) % blockDim.x;
    if (slots[neighbour] != phase * 1000 + neighbour) {
      atomicAdd(errors, 1);
    }
    __syncthreads();
  }
}

// A block sums its threads' values through static shared memory; every block writes its own total.
__global__ void shared_kernel(int* totals) {
  __shared__ int values[64];
  values[threadIdx.x] = static_cast<int>(blockIdx.x) * 100 + static_cast<int>(threadIdx.x);
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
    for (unsigned int i = 0; i < blockDim.x; ++i) {
      total += values[i];
    }
    totals[blockIdx.x] = total;
  }
  __syncthreads();
}

// Dynamic shared memory: a reversal through the launch's buffer.
__global__ void dynamic_shared_kernel(const float* in, float* out) {
  VITKERN_DYNAMIC_SHARED(float, buffer);
  const int n = blockDim.x;
  buffer[threadIdx.x] = in[blockIdx.x * n + threadIdx.x];
  __syncthreads();
  out[blockIdx.x * n + threadIdx.x] = buffer[n - 1 - threadIdx.x];
}

// Every (block, thread) of a 3-D grid of 3-D blocks runs exactly once and sees consistent indices.
__global__ void grid_kernel(int* hits) {
  const unsigned int block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const unsigned int thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  atomicAdd(&hits[block * blockDim.x * blockDim.y * blockDim.z + thread], 1);
}

// Warp sums by butterfly (xor) and by tree (down), and a broadcast from lane 3.
__global__ void shuffle_kernel(float* xor_sums, float* down_sums, int* broadcast) {
  const int lane = threadIdx.x % warpSize;
  float a = static_cast<float>(threadIdx.x);
  float b = a;
  for (int offset = warpSize / 2; offset > 0; offset /= 2) {
    a += __shfl_xor_sync(0xffffffffu, a, offset);
    b += __shfl_down_sync(0xffffffffu, b, offset);
  }
  xor_sums[threadIdx.x] = a;
  if (lane == 0) {
    down_sums[threadIdx.x / warpSize] = b;
  }
  broadcast[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 3);
}

__global__ void atomic_kernel(int* counter, float* total) {
  atomicAdd(counter, 1);
  atomicAdd(total, 0.5f);
}

// Reads a neighbour's shared slot with no barrier in between: ThreadSanitizer must report the race.
__global__ void racy_kernel(int* out) {
  __shared__ int slots[64];
  slots[threadIdx.x] = static_cast<int>(threadIdx.x);
  out[threadIdx.x] = slots[(threadIdx.x + 1) % blockDim.x];
}

// Writes one element past the launch's dynamic shared memory: AddressSanitizer must report it.
__global__ void overflow_kernel(int elements) {
  VITKERN_DYNAMIC_SHARED(float, buffer);
  buffer[threadIdx.x == 0 ? elements : threadIdx.x] = 1.0f;
}

bool run_barrier() {
  int errors = 0;
  launch(barrier_kernel, dim3(3), dim3(128), 0, nullptr, &errors);
  return report(errors == 0, "neighbour reads across __syncthreads() saw stale values");
}

bool run_shared() {
  constexpr int kBlocks = 5, kThreadsPerBlock = 64;
  std::vector<int> totals(kBlocks, -1);
  launch(shared_kernel, dim3(kBlocks), dim3(kThreadsPerBlock), 0, nullptr, totals.data());
  bool ok = true;
  for (int b = 0; b < kBlocks; ++b) {
    ok &= totals[b] == b * 100 * kThreadsPerBlock + kThreadsPerBlock * (kThreadsPerBlock - 1) / 2;
  }
  return report(ok, "per-block shared-memory sums");
}

bool run_dynamic_shared() {
  constexpr int kBlocks = 4, kThreadsPerBlock = 96;
  std::vector<float> in(kBlocks * kThreadsPerBlock), out(in.size(), -1.0f);
  for (std::size_t i = 0; i < in.size(); ++i) {
    in[i] = static_cast<float>(i);
  }
  launch(dynamic_shared_kernel, dim3(kBlocks), dim3(kThreadsPerBlock), kThreadsPerBlock * sizeof(float), nullptr,
         static_cast<const float*>(in.data()), out.data());
  bool ok = true;
  for (int b = 0; b < kBlocks; ++b) {
    for (int t = 0; t < kThreadsPerBlock; ++t) {
      ok &= out[b * kThreadsPerBlock + t] == in[b * kThreadsPerBlock + kThreadsPerBlock - 1 - t];
    }
  }
  return report(ok, "reversal through dynamic shared memory");
}

bool run_grid() {
  const dim3 grid(3, 2, 2), block(4, 3, 2);
  std::vector<int> hits(3 * 2 * 2 * 4 * 3 * 2, 0);
  launch(grid_kernel, grid, block, 0, nullptr, hits.data());
  bool ok = true;
  for (int h : hits) {
    ok &= h == 1;
  }
  return report(ok, "every (block, thread) of a 3-D launch runs once");
}

bool run_shuffle() {
  constexpr int kWarps = 3, kThreadsPerBlock = kWarps * 32;
  std::vector<float> xor_sums(kThreadsPerBlock), down_sums(kWarps);
  std::vector<int> broadcast(kThreadsPerBlock);
  launch(shuffle_kernel, dim3(1), dim3(kThreadsPerBlock), 0, nullptr, xor_sums.data(), down_sums.data(),
         broadcast.data());
  bool ok = true;
  for (int t = 0; t < kThreadsPerBlock; ++t) {
    const int warp = t / 32;
    const float expected = static_cast<float>(32 * warp * 32 + 31 * 32 / 2);
    ok &= xor_sums[t] == expected;
    ok &= broadcast[t] == warp * 32 + 3;
    if (t % 32 == 0) {
      ok &= down_sums[warp] == expected;
    }
  }
  return report(ok, "warp sums by __shfl_xor_sync and __shfl_down_sync, broadcast by __shfl_sync");
}

bool run_atomic() {
  int counter = 0;
  float total = 0.0f;
  launch(atomic_kernel, dim3(7), dim3(64), 0, nullptr, &counter, &total);
  return report(counter == 7 * 64 && total == 0.5f * 7 * 64, "atomicAdd on int and float");
}

bool run_race() {
  std::vector<int> out(64);
  launch(racy_kernel, dim3(2), dim3(64), 0, nullptr, out.data());
  return true;
}

bool run_overflow() {
  constexpr int kElements = 64;
  launch(overflow_kernel, dim3(1), dim3(kElements), kElements * sizeof(float), nullptr, kElements);
  return true;
}

// --- depthwise convolution against naive loops -----------------------------------------------------------------

struct Case {
  int n, c, h, w, kh, kw, sh, sw, dh, dw, top, bottom, left, right;
  bool channels_last;
  int act;
  bool epilogue;  // bias, scale, shift and residual
};

dw::Strides strides_of(int n, int c, int h, int w, bool channels_last) {
  (void)n;
  if (channels_last) {
    return {static_cast<int64_t>(h) * w * c, 1, static_cast<int64_t>(w) * c, c};
  }
  return {static_cast<int64_t>(c) * h * w, static_cast<int64_t>(h) * w, w, 1};
}

double act_ref(double z, int act) {
  if (act == dw::kGelu) {
    return 0.5 * z * (1.0 + std::erf(z / std::sqrt(2.0)));
  }
  if (act == dw::kRelu) {
    return z > 0 ? z : 0.0;
  }
  return z;
}

double act_grad_ref(double z, int act) {
  if (act == dw::kGelu) {
    return 0.5 * (1.0 + std::erf(z / std::sqrt(2.0))) + z * std::exp(-0.5 * z * z) / std::sqrt(2.0 * M_PI);
  }
  if (act == dw::kRelu) {
    return z > 0 ? 1.0 : 0.0;
  }
  return 1.0;
}

bool close(const std::vector<float>& got, const std::vector<double>& want, const char* what, const Case& k) {
  double worst = 0.0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(got[i] - want[i]) / (1.0 + std::fabs(want[i]));
    worst = std::max(worst, std::isnan(err) ? 1e30 : err);
  }
  if (worst > 1e-4) {
    std::printf("FAILED: %s (case %dx%dx%dx%d k%dx%d s%d,%d d%d,%d cl=%d act=%d): max rel error %.3e\n", what, k.n,
                k.c, k.h, k.w, k.kh, k.kw, k.sh, k.sw, k.dh, k.dw, k.channels_last, k.act, worst);
    return false;
  }
  return true;
}

bool run_case(const Case& k, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto random = [&](std::size_t count) {
    std::vector<float> v(count);
    for (auto& e : v) {
      e = normal(rng);
    }
    return v;
  };
  dw::Geometry g{};
  g.n = k.n, g.c = k.c, g.h = k.h, g.w = k.w;
  g.kh = k.kh, g.kw = k.kw, g.sh = k.sh, g.sw = k.sw, g.dh = k.dh, g.dw = k.dw, g.pad_top = k.top;
  g.pad_left = k.left;
  g.oh = (k.h + k.top + k.bottom - k.dh * (k.kh - 1) - 1) / k.sh + 1;
  g.ow = (k.w + k.left + k.right - k.dw * (k.kw - 1) - 1) / k.sw + 1;
  const dw::Strides sx = strides_of(k.n, k.c, k.h, k.w, k.channels_last);
  const dw::Strides sy = strides_of(k.n, k.c, g.oh, g.ow, k.channels_last);
  const std::size_t in_count = static_cast<std::size_t>(k.n) * k.c * k.h * k.w;
  const std::size_t out_count = static_cast<std::size_t>(k.n) * k.c * g.oh * g.ow;
  const int taps = k.kh * k.kw;
  const auto x = random(in_count), weight = random(static_cast<std::size_t>(k.c) * taps), bias = random(k.c),
             scale = random(k.c), shift = random(k.c), residual = random(out_count), dy = random(out_count);
  std::vector<float> y(out_count), z(out_count);
  const float* ep = nullptr;
  dw::launch_fwd<float, float>(x.data(), weight.data(), k.epilogue ? bias.data() : ep,
                               k.epilogue ? scale.data() : ep, k.epilogue ? shift.data() : ep,
                               k.epilogue ? residual.data() : ep, y.data(), z.data(), g, sx, sy, k.act, nullptr);

  // Naive forward in double, and the backward from the kernel's own z (as the op's backward receives it).
  std::vector<double> y_ref(out_count), z_ref(out_count), dx_ref(in_count, 0.0),
      dw_ref(static_cast<std::size_t>(k.c) * taps, 0.0), sums_ref(static_cast<std::size_t>(k.c) * 3, 0.0);
  for (int n = 0; n < k.n; ++n) {
    for (int c = 0; c < k.c; ++c) {
      for (int oh = 0; oh < g.oh; ++oh) {
        for (int ow = 0; ow < g.ow; ++ow) {
          const int64_t o = n * sy.n + c * sy.c + oh * sy.h + ow * sy.w;
          const double grad_z = dy[o] * (k.epilogue ? scale[c] : 1.0) * act_grad_ref(z[o], k.act);
          double acc = 0.0;
          for (int i = 0; i < k.kh; ++i) {
            for (int j = 0; j < k.kw; ++j) {
              const int ih = oh * k.sh - k.top + i * k.dh, iw = ow * k.sw - k.left + j * k.dw;
              if (ih < 0 || ih >= k.h || iw < 0 || iw >= k.w) {
                continue;
              }
              const int64_t xi = n * sx.n + c * sx.c + ih * sx.h + iw * sx.w;
              acc += static_cast<double>(x[xi]) * weight[c * taps + i * k.kw + j];
              dx_ref[xi] += grad_z * weight[c * taps + i * k.kw + j];
              dw_ref[c * taps + i * k.kw + j] += grad_z * x[xi];
            }
          }
          z_ref[o] = acc + (k.epilogue ? bias[c] : 0.0);
          y_ref[o] = act_ref(z_ref[o], k.act);
          if (k.epilogue) {
            y_ref[o] = y_ref[o] * scale[c] + shift[c] + residual[o];
          }
          sums_ref[c * 3 + 0] += grad_z;
          sums_ref[c * 3 + 1] += dy[o] * act_ref(z[o], k.act);
          sums_ref[c * 3 + 2] += dy[o];
        }
      }
    }
  }

  const dw::GradSource<float, float> grad{dy.data(), k.act != dw::kNone || k.epilogue ? z.data() : nullptr,
                                          k.epilogue ? scale.data() : nullptr, k.act};
  std::vector<float> dx(in_count), dz(out_count);
  const dw::ConvLaunch dx_launch = dw::plan_dx<float, float>(g, sx, sy, true);
  dw::launch_dx<float, float>(dx_launch, grad, dz.data(), weight.data(), dx.data(), g, sx, sy, nullptr);
  const dw::DweightPlan plan = dw::plan_dweight<float, float>(g, sx, dw::aligned16(x.data()));
  std::vector<float> partial_w(static_cast<std::size_t>(k.c) * plan.blocks_g * taps),
      partial_sums(static_cast<std::size_t>(k.c) * plan.blocks_g * dw::kEpilogueSums),
      dweight(static_cast<std::size_t>(k.c) * taps), sums(static_cast<std::size_t>(k.c) * dw::kEpilogueSums);
  dw::launch_dweight<float, float>(plan, grad, x.data(), partial_w.data(), partial_sums.data(), dweight.data(),
                                   sums.data(), g, sx, sy, nullptr);
  bool ok = close(y, y_ref, "y", k) && close(z, z_ref, "z", k) && close(dx, dx_ref, "dx", k) &&
            close(dweight, dw_ref, "dweight", k);
  if (k.epilogue) {
    ok = ok && close(sums, sums_ref, "dbias/dscale/dshift", k);
  }
  return ok;
}

// FastDiv against / and % for divisors and dividends of every size the window kernels use, and the largest.
bool run_fast_div() {
  bool ok = true;
  for (int d = 1; d <= 1100; ++d) {
    const dw::FastDiv fast(d);
    for (int n : {0, 1, d - 1, d, d + 1, 2 * d + 3, 65535, 1 << 20, INT32_MAX - 1, INT32_MAX}) {
      if (n >= 0 && (fast.div(n) != n / d || fast.mod(n) != n % d)) {
        ok = false;
      }
    }
    for (int n = 0; n < 4096; ++n) {
      ok = ok && fast.div(n) == n / d && fast.mod(n) == n % d;
    }
  }
  return report(ok, "FastDiv: quotients and remainders of divisors 1 to 1100");
}

// Which loads load_mode() picks: vectors only where the layout, the sizes and the alignment allow.
bool run_load_modes() {
  auto mode = [](int n, int c, int h, int w, bool channels_last, int vector_size, bool aligned) {
    dw::Geometry g{};
    g.n = n, g.c = c, g.h = h, g.w = w;
    dw::Tiling t{};
    t.cb = channels_last ? 8 : 1;
    return dw::load_mode(t, strides_of(n, c, h, w, channels_last), g, vector_size, aligned);
  };
  bool ok = true;
  ok &= report(mode(2, 3, 10, 16, false, 4, true) == dw::kRowVectors, "NCHW, width 16, fp32: row vectors");
  ok &= report(mode(2, 3, 10, 16, false, 8, true) == dw::kRowVectors, "NCHW, width 16, fp16: row vectors");
  ok &= report(mode(1, 1, 9, 8, false, 8, true) == dw::kRowVectors, "NCHW, one image of one channel: row vectors");
  ok &= report(mode(2, 3, 10, 12, false, 8, true) == dw::kScalarLoads, "NCHW, width 12, fp16: scalar loads");
  ok &= report(mode(2, 3, 10, 16, false, 4, false) == dw::kScalarLoads, "NCHW, misaligned: scalar loads");
  ok &= report(mode(2, 8, 5, 7, true, 4, true) == dw::kChannelVectors, "channels_last, 8 channels: channel vectors");
  ok &= report(mode(2, 6, 5, 7, true, 4, true) == dw::kScalarLoads, "channels_last, 6 channels: scalar loads");
  ok &= report(mode(2, 8, 5, 7, true, 4, false) == dw::kScalarLoads, "channels_last, misaligned: scalar loads");
  return ok;
}

// Which kernel the forward and dx launchers pick: the sliding-window kernel for the compile-time sizes at stride 1
// and dilation 1, the generic kernel otherwise, so that the cases of run_conv() cover both.
bool run_kernel_choice() {
  auto windows = [](int c, int h, int w, int k, int stride, int dilation, bool channels_last) {
    dw::Geometry g{};
    g.n = 2, g.c = c, g.h = h, g.w = w, g.kh = k, g.kw = k, g.sh = stride, g.sw = stride, g.dh = dilation,
    g.dw = dilation, g.pad_top = k / 2, g.pad_left = k / 2;
    g.oh = (h + 2 * (k / 2) - dilation * (k - 1) - 1) / stride + 1;
    g.ow = (w + 2 * (k / 2) - dilation * (k - 1) - 1) / stride + 1;
    const dw::Strides sx = strides_of(2, c, h, w, channels_last);
    const int fwd = dw::plan_fwd<float, float>(g, sx, true).window;
    const int dx = dw::plan_dx<float, float>(g, sx, sx, true).window;
    return fwd == dx ? fwd : -1;
  };
  bool ok = true;
  ok &= report(windows(20, 12, 19, 9, 1, 1, true) == 9, "9x9 channels_last: sliding window");
  ok &= report(windows(3, 21, 37, 31, 1, 1, false) == 31, "31x31 NCHW: sliding window");
  ok &= report(windows(3, 9, 11, 3, 1, 1, false) == 3, "3x3 NCHW: sliding window");
  ok &= report(windows(5, 10, 7, 7, 2, 1, true) == 0, "7x7 stride 2: generic kernel");
  ok &= report(windows(2, 12, 13, 5, 1, 2, false) == 0, "5x5 dilation 2: generic kernel");
  ok &= report(windows(4, 12, 12, 11, 1, 1, false) == 0, "11x11 (no compile-time size): generic kernel");
  ok &= report(windows(16, 40, 40, 31, 1, 1, true) == 0, "31x31 channels_last (weights over shared memory): generic");
  return ok;
}

// Which dweight kernel the plan picks: runs of taps at stride 1 and dilation 1, the generic kernel otherwise.
bool run_dweight_choice() {
  auto run = [](int c, int h, int w, int kh, int kw, int stride, int dilation, bool channels_last) {
    dw::Geometry g{};
    g.n = 2, g.c = c, g.h = h, g.w = w, g.kh = kh, g.kw = kw, g.sh = stride, g.sw = stride, g.dh = dilation,
    g.dw = dilation, g.pad_top = kh / 2, g.pad_left = kw / 2;
    g.oh = (h + 2 * (kh / 2) - dilation * (kh - 1) - 1) / stride + 1;
    g.ow = (w + 2 * (kw / 2) - dilation * (kw - 1) - 1) / stride + 1;
    return dw::plan_dweight<float, float>(g, strides_of(2, c, h, w, channels_last), true).run;
  };
  bool ok = true;
  ok &= report(run(1536, 32, 32, 9, 9, 1, 1, true) == 9, "dweight 9x9 channels_last: runs of 9 taps");
  ok &= report(run(192, 28, 28, 7, 7, 1, 1, false) == 7, "dweight 7x7 NCHW: runs of 7 taps");
  ok &= report(run(64, 56, 56, 3, 3, 1, 1, true) == 3, "dweight 3x3 channels_last: runs of 3 taps");
  ok &= report(run(8, 40, 40, 31, 31, 1, 1, true) == 8, "dweight 31x31: runs of 8 taps");
  ok &= report(run(8, 20, 20, 13, 13, 1, 1, false) == 7, "dweight 13x13: runs of 7 taps");
  ok &= report(run(5, 10, 7, 7, 7, 2, 1, true) == 0, "dweight 7x7 stride 2: generic kernel");
  ok &= report(run(2, 12, 13, 5, 5, 1, 2, false) == 0, "dweight 5x5 dilation 2: generic kernel");
  return ok;
}

bool run_conv() {
  const Case cases[] = {
      // n  c   h   w  kh  kw sh sw dh dw top bot left right  cl    act        epilogue
      {2, 3, 9, 11, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, false, dw::kGelu, true},
      {1, 5, 10, 7, 7, 7, 2, 2, 1, 1, 3, 3, 3, 3, true, dw::kRelu, true},
      {1, 2, 12, 13, 5, 3, 1, 1, 2, 2, 4, 4, 2, 2, false, dw::kNone, false},
      {1, 8, 9, 9, 13, 13, 1, 1, 1, 1, 6, 6, 6, 6, true, dw::kGelu, true},
      {1, 3, 11, 10, 4, 6, 2, 1, 2, 1, 3, 2, 3, 2, true, dw::kNone, true},
      {1, 1, 8, 8, 63, 63, 1, 1, 2, 2, 62, 62, 62, 62, false, dw::kGelu, true},
      // NCHW widths that are multiples of the vector: rows read as 16-byte vectors, tile rows starting mid-vector
      {2, 3, 10, 16, 7, 7, 1, 1, 1, 1, 3, 3, 3, 3, false, dw::kGelu, true},
      {1, 4, 9, 12, 5, 4, 2, 2, 1, 2, 2, 2, 1, 5, false, dw::kRelu, true},
      // Sliding-window kernels: channels not a multiple of the channel block, widths not a multiple of the run,
      // asymmetric padding, several channel planes per block, 31x31, scalar channel loads
      {2, 20, 12, 19, 9, 9, 1, 1, 1, 1, 4, 4, 4, 4, true, dw::kGelu, true},
      {1, 3, 21, 37, 31, 31, 1, 1, 1, 1, 15, 15, 15, 15, false, dw::kNone, true},
      {1, 3, 6, 5, 5, 5, 1, 1, 1, 1, 2, 2, 2, 2, true, dw::kRelu, false},
      {3, 5, 40, 9, 3, 3, 1, 1, 1, 1, 0, 2, 1, 0, false, dw::kGelu, true},
      // dweight in runs of taps (stride 1, dilation 1): channels not a multiple of the channel block, widths not a
      // multiple of the run, tap rows in chunks, several units a thread (31x31, 40 channels), both layouts
      {2, 37, 13, 11, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, true, dw::kGelu, true},
      {2, 3, 17, 19, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, false, dw::kRelu, true},
      {2, 20, 14, 15, 7, 7, 1, 1, 1, 1, 3, 3, 3, 3, true, dw::kGelu, true},
      {1, 3, 15, 23, 7, 7, 1, 1, 1, 1, 3, 3, 2, 4, false, dw::kNone, true},
      {2, 40, 12, 13, 9, 9, 1, 1, 1, 1, 4, 4, 4, 4, true, dw::kGelu, true},
      {2, 5, 11, 20, 9, 9, 1, 1, 1, 1, 4, 4, 4, 4, false, dw::kGelu, false},
      {1, 40, 9, 10, 31, 31, 1, 1, 1, 1, 15, 15, 15, 15, true, dw::kNone, true},
      {1, 2, 33, 35, 31, 31, 1, 1, 1, 1, 15, 15, 15, 15, false, dw::kRelu, true},
      {2, 6, 9, 9, 11, 5, 1, 1, 1, 1, 5, 5, 2, 2, true, dw::kNone, false},
      {1, 3, 70, 66, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, false, dw::kGelu, true},
      {2, 4, 7, 8, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, true, dw::kRelu, true},
      {2, 3, 8, 9, 2, 2, 1, 1, 1, 1, 1, 0, 0, 1, false, dw::kGelu, true},
  };
  std::mt19937 rng(1234);
  bool ok = true;
  for (const Case& k : cases) {
    ok &= run_case(k, rng);
  }
  return ok && run_fast_div() && run_load_modes() && run_kernel_choice() && run_dweight_choice();
}

// --- attention against naive loops ----------------------------------------------------------------------------

namespace at_ = vitkern::attn;

struct AttentionCase {
  int64_t batch, heads, nq, nk;
  int d, dv, bias_mode, geo0, geo1;
  int64_t num_windows;  // 0: no mask
  int64_t chunks;       // batch chunks of the backward (fewer than batch: several entries per block)
};

// bias + mask of one score, from the coordinates, as vitkern/reference/attention.py builds the index.
double naive_bias(const AttentionCase& c, const std::vector<float>& bias, const std::vector<float>& mask, int64_t b,
                  int64_t h, int64_t i, int64_t j) {
  double s = 0.0;
  if (c.bias_mode == at_::kBiasRelPos) {
    const int64_t ww = c.geo1;
    s = bias[((i / ww - j / ww + c.geo0 - 1) * (2 * ww - 1) + (i % ww - j % ww + ww - 1)) * c.heads + h];
  } else if (c.bias_mode == at_::kBiasLevit) {
    const int64_t r = c.geo0, st = c.geo1, rq = (r - 1) / st + 1;
    s = bias[h * r * r + std::abs(i / rq * st - j / r) * r + std::abs(i % rq * st - j % r)];
  } else if (c.bias_mode == at_::kBiasDense) {
    s = bias[((h * c.nq) + i) * c.nk + j];  // (1, H, Nq, Nk): broadcast over the batch
  }
  if (c.num_windows > 0) {
    s += mask[((b % c.num_windows) * c.nq + i) * c.nk + j];
  }
  return s;
}

bool close_to(const std::vector<float>& got, const std::vector<double>& want, const char* what) {
  for (std::size_t e = 0; e < want.size(); ++e) {
    if (!(std::fabs(got[e] - want[e]) <= 1e-4 * (1.0 + std::fabs(want[e])))) {
      std::printf("attention %s[%zu]: got %g, want %g\n", what, e, got[e], want[e]);
      return false;
    }
  }
  return true;
}

bool run_attention_case(const AttentionCase& c, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  auto randn = [&](int64_t n) {
    std::vector<float> t(n);
    for (float& x : t) {
      x = normal(rng);
    }
    return t;
  };
  const int64_t pairs = c.batch * c.heads;
  const std::vector<float> q = randn(pairs * c.nq * c.d), k = randn(pairs * c.nk * c.d),
                           v = randn(pairs * c.nk * c.dv), dout = randn(pairs * c.nq * c.dv);
  const int64_t entries = at_::table_entries(c.bias_mode, c.geo0, c.geo1);
  std::vector<float> bias = c.bias_mode == at_::kBiasDense ? randn(c.heads * c.nq * c.nk)
                            : entries > 0                  ? randn(entries * c.heads)
                                                           : std::vector<float>{};
  std::vector<float> mask(std::max<int64_t>(c.num_windows, 0) * c.nq * c.nk, 0.0f);
  for (std::size_t e = 0; e < mask.size(); e += 3) {
    mask[e] = -INFINITY;  // every third score of each window masked
  }
  const float scale = 0.3f;

  at_::Params<float> p{};
  p.batch = c.batch;
  p.heads = c.heads;
  p.nq = c.nq;
  p.nk = c.nk;
  p.d = c.d;
  p.dv = c.dv;
  p.scale = scale;
  p.bias_mode = c.bias_mode;
  p.geo0 = c.geo0;
  p.geo1 = c.geo1;
  p.bias = bias.empty() ? nullptr : bias.data();
  if (c.bias_mode == at_::kBiasRelPos) {
    p.bias_s0 = c.heads, p.bias_s1 = 1;
  } else if (c.bias_mode == at_::kBiasLevit) {
    p.bias_s0 = static_cast<int64_t>(c.geo0) * c.geo0, p.bias_s1 = 1;
  } else if (c.bias_mode == at_::kBiasDense) {
    p.bias_s0 = 0, p.bias_s1 = c.nq * c.nk, p.bias_s2 = c.nk, p.bias_s3 = 1;
  }
  p.mask = c.num_windows > 0 ? mask.data() : nullptr;
  p.num_windows = std::max<int64_t>(c.num_windows, 1);

  std::vector<float> out(pairs * c.nq * c.dv), lse(pairs * c.nq);
  at_::launch_fwd<float>(p, q.data(), k.data(), v.data(), out.data(), lse.data(), nullptr);
  const at_::BwdLayout layout = at_::plan_bwd<float>(c.nk, c.d, c.dv);
  const int64_t per_chunk = (c.batch + c.chunks - 1) / c.chunks;
  std::vector<float> dq_partial(layout.key_tiles * pairs * c.nq * c.d, 0.0f), dk(pairs * c.nk * c.d),
      dv(pairs * c.nk * c.dv);
  std::vector<float> table_partial(c.chunks * layout.key_tiles * c.heads * entries, 0.0f);
  std::vector<float> dense_grad(c.bias_mode == at_::kBiasDense ? c.chunks * c.heads * c.nq * c.nk : 0, 0.0f);
  at_::launch_bwd<float>(p, layout, c.chunks, per_chunk, q.data(), k.data(), v.data(), out.data(), dout.data(),
                         lse.data(), dq_partial.data(), dk.data(), dv.data(),
                         entries > 0 ? table_partial.data() : nullptr,
                         dense_grad.empty() ? nullptr : dense_grad.data(), nullptr);

  std::vector<double> want_out(out.size(), 0.0), want_dq(pairs * c.nq * c.d, 0.0), want_dk(dk.size(), 0.0),
      want_dv(dv.size(), 0.0), want_dbias(bias.size(), 0.0);
  std::vector<double> prob(c.nk);
  for (int64_t b = 0; b < c.batch; ++b) {
    for (int64_t h = 0; h < c.heads; ++h) {
      const int64_t pair = b * c.heads + h;
      for (int64_t i = 0; i < c.nq; ++i) {
        double mx = -INFINITY;
        for (int64_t j = 0; j < c.nk; ++j) {
          double s = 0.0;
          for (int t = 0; t < c.d; ++t) {
            s += static_cast<double>(q[(pair * c.nq + i) * c.d + t]) * k[(pair * c.nk + j) * c.d + t];
          }
          prob[j] = s * scale + naive_bias(c, bias, mask, b, h, i, j);
          mx = std::max(mx, prob[j]);
        }
        double sum = 0.0;
        for (int64_t j = 0; j < c.nk; ++j) {
          prob[j] = mx == -INFINITY ? 0.0 : std::exp(prob[j] - mx);
          sum += prob[j];
        }
        double delta = 0.0;
        for (int64_t j = 0; j < c.nk; ++j) {
          prob[j] = sum > 0.0 ? prob[j] / sum : 0.0;
          for (int t = 0; t < c.dv; ++t) {
            want_out[(pair * c.nq + i) * c.dv + t] += prob[j] * v[(pair * c.nk + j) * c.dv + t];
          }
        }
        for (int t = 0; t < c.dv; ++t) {
          delta += dout[(pair * c.nq + i) * c.dv + t] * want_out[(pair * c.nq + i) * c.dv + t];
        }
        for (int64_t j = 0; j < c.nk; ++j) {
          double dp = 0.0;
          for (int t = 0; t < c.dv; ++t) {
            dp += static_cast<double>(dout[(pair * c.nq + i) * c.dv + t]) * v[(pair * c.nk + j) * c.dv + t];
            want_dv[(pair * c.nk + j) * c.dv + t] += prob[j] * dout[(pair * c.nq + i) * c.dv + t];
          }
          const double ds = prob[j] * (dp - delta);
          for (int t = 0; t < c.d; ++t) {
            want_dq[(pair * c.nq + i) * c.d + t] += scale * ds * k[(pair * c.nk + j) * c.d + t];
            want_dk[(pair * c.nk + j) * c.d + t] += scale * ds * q[(pair * c.nq + i) * c.d + t];
          }
          if (c.bias_mode == at_::kBiasRelPos) {
            const int64_t ww = c.geo1;
            want_dbias[((i / ww - j / ww + c.geo0 - 1) * (2 * ww - 1) + (i % ww - j % ww + ww - 1)) * c.heads + h] += ds;
          } else if (c.bias_mode == at_::kBiasLevit) {
            const int64_t r = c.geo0, st = c.geo1, rq = (r - 1) / st + 1;
            want_dbias[h * r * r + std::abs(i / rq * st - j / r) * r + std::abs(i % rq * st - j % r)] += ds;
          } else if (c.bias_mode == at_::kBiasDense) {
            want_dbias[(h * c.nq + i) * c.nk + j] += ds;
          }
        }
      }
    }
  }
  // The caller's reductions: dq over key tiles, the table partials over chunks and key tiles (into the table's
  // (entries, heads) or (heads, entries) layout), the dense buffer over chunks.
  std::vector<float> dq(want_dq.size(), 0.0f), dbias(bias.size(), 0.0f);
  for (int64_t t = 0; t < layout.key_tiles; ++t) {
    for (std::size_t e = 0; e < dq.size(); ++e) {
      dq[e] += dq_partial[t * dq.size() + e];
    }
  }
  for (int64_t part = 0; part < c.chunks * layout.key_tiles; ++part) {
    for (int64_t h = 0; h < c.heads; ++h) {
      for (int64_t e = 0; e < entries; ++e) {
        const float g = table_partial[(part * c.heads + h) * entries + e];
        dbias[c.bias_mode == at_::kBiasRelPos ? e * c.heads + h : h * entries + e] += g;
      }
    }
  }
  for (std::size_t e = 0; e < dense_grad.size(); ++e) {
    dbias[e % dbias.size()] += dense_grad[e];
  }
  bool ok = close_to(out, want_out, "out") && close_to(dq, want_dq, "dq") && close_to(dk, want_dk, "dk") &&
            close_to(dv, want_dv, "dv") && close_to(dbias, want_dbias, "dbias");
  if (!ok) {
    std::printf("  case B=%lld H=%lld Nq=%lld Nk=%lld D=%d Dv=%d mode=%d\n", static_cast<long long>(c.batch),
                static_cast<long long>(c.heads), static_cast<long long>(c.nq), static_cast<long long>(c.nk), c.d,
                c.dv, c.bias_mode);
  }
  return ok;
}

bool run_attention() {
  const AttentionCase cases[] = {
      // B  H  Nq   Nk   D   Dv  mode geometry  windows chunks
      {2, 2, 6, 6, 16, 16, at_::kBiasRelPos, 2, 3, 0, 2},
      {4, 1, 9, 9, 8, 24, at_::kBiasRelPos, 3, 3, 2, 1},   // mask, all entries in one chunk
      {3, 2, 4, 16, 16, 32, at_::kBiasLevit, 4, 2, 0, 2},  // pairs packed per block
      {2, 1, 17, 33, 33, 16, at_::kBiasDense, 0, 0, 0, 1},
      {1, 1, 3, 300, 16, 8, at_::kBiasNone, 0, 0, 0, 1},   // two key tiles
  };
  std::mt19937 rng(4321);
  bool ok = true;
  for (const AttentionCase& c : cases) {
    ok &= run_attention_case(c, rng);
  }
  return ok;
}

// The modes, by name. A family of kernels checked against naive loops goes here and in KERNEL_MODES of
// tests/test_cuda_emulation.py, which runs it plainly and under AddressSanitizer and ThreadSanitizer.
struct Mode {
  const char* name;
  bool (*run)();
};

constexpr Mode kModes[] = {
    {"barrier", run_barrier}, {"shared", run_shared}, {"dynamic_shared", run_dynamic_shared},
    {"grid", run_grid},       {"shuffle", run_shuffle}, {"atomic", run_atomic},
    {"conv", run_conv},       {"attention", run_attention}, {"race", run_race},
    {"overflow", run_overflow},
};

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc == 2 ? argv[1] : "";
  for (const Mode& m : kModes) {
    if (mode == m.name) {
      const bool ok = m.run();
      if (ok) {
        std::printf("%s ok\n", m.name);
      }
      return ok ? 0 : 1;
    }
  }
  std::printf("usage: %s MODE, one of:", argv[0]);
  for (const Mode& m : kModes) {
    std::printf(" %s", m.name);
  }
  std::printf("\n");
  return 2;
}
