// A CPU emulator for the small subset of CUDA that the kernels in csrc/ use, so that the very same kernel source can
// be compiled with a host C++ compiler (-DLEGO_EMULATE) and checked against the PyTorch references on a machine with
// no GPU (tests/test_cuda_ext.py builds it with g++). It is a test tool, not a general CUDA emulator:
//
// - A block's threads are cooperative fibers (ucontext) on one OS thread; blocks run one after another.
//   __syncthreads() and the warp shuffles are barriers between those fibers, so a barrier that not every thread of
//   the block (or of the warp) reaches is reported as a deadlock instead of passing silently.
// - Warp shuffles need the full mask and all 32 lanes, as the kernels promise; blockDim must be a multiple of 32.
// - __shared__ arrays are function-local statics (fine: one block at a time); dynamic shared memory is filled with
//   0xff bytes (NaN as float) before each block, so reading what nobody wrote shows up.
// - Only the runtime calls the launchers make are provided; they act on host memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <ucontext.h>
#include <vector_types.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)

#define LEGO_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::lego_emu::state().smem.data())
#define LEGO_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::lego_emu::launch((kernel), dim3(grid), dim3(block), (smem), __VA_ARGS__)

#define threadIdx (::lego_emu::state().thread_idx)
#define blockIdx (::lego_emu::state().block_idx)
#define blockDim (::lego_emu::state().block_dim)
#define gridDim (::lego_emu::state().grid_dim)

namespace lego_emu {

struct Barrier {
  int arrived = 0;
  uint64_t generation = 0;
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  bool done = true;
  uint3 thread_idx;
};

struct State {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  int current = -1;
  uint3 thread_idx{}, block_idx{};
  dim3 block_dim, grid_dim;
  int num_threads = 0;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> shuffle_slots;
  std::vector<unsigned char> smem;
  uint64_t progress = 0;  // barrier arrivals + finished threads: unchanged over a full round means deadlock
  std::function<void()> body;
};

inline State& state() {
  static State s;
  return s;
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "lego CUDA emulator: %s\n", what);
  std::abort();
}

inline void yield_to_scheduler() {
  State& s = state();
  swapcontext(&s.fibers[s.current].context, &s.scheduler);
}

inline void wait_at(Barrier& b, int participants) {
  State& s = state();
  const uint64_t generation = b.generation;
  ++s.progress;
  if (++b.arrived == participants) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == generation) yield_to_scheduler();
}

inline int linear_thread() {
  const State& s = state();
  return static_cast<int>(s.thread_idx.x + s.block_dim.x * (s.thread_idx.y + s.block_dim.y * s.thread_idx.z));
}

inline void fiber_entry() {
  State& s = state();
  s.body();
  s.fibers[s.current].done = true;
  ++s.progress;
}  // returns to uc_link: the scheduler

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, Args... args) {
  static std::mutex one_launch_at_a_time;
  std::lock_guard<std::mutex> lock(one_launch_at_a_time);
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel called with the wrong number of arguments");
  std::tuple<Params...> params(static_cast<Params>(args)...);
  State& s = state();
  const int n = static_cast<int>(block.x * block.y * block.z);
  if (n <= 0 || n > 1024 || n % 32 != 0) fail("blockDim must hold 32..1024 threads, a multiple of 32");
  if (smem_bytes > 227 * 1024) fail("more dynamic shared memory than a GPU has");
  constexpr size_t kStack = 256 * 1024;
  if (static_cast<int>(s.fibers.size()) < n) s.fibers.resize(n);
  for (int t = 0; t < n; ++t)
    if (!s.fibers[t].stack) s.fibers[t].stack.reset(new char[kStack]);
  s.block_dim = block;
  s.grid_dim = grid;
  s.num_threads = n;
  s.body = [&] { std::apply(kernel, params); };
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        s.block_idx = uint3{bx, by, bz};
        s.smem.assign(smem_bytes, 0xff);
        s.block_barrier = Barrier{};
        s.warp_barriers.assign(n / 32, Barrier{});
        s.shuffle_slots.assign(n, 0);
        for (int t = 0; t < n; ++t) {
          Fiber& f = s.fibers[t];
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.get();
          f.context.uc_stack.ss_size = kStack;
          f.context.uc_link = &s.scheduler;
          makecontext(&f.context, fiber_entry, 0);
          f.done = false;
          f.thread_idx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
        }
        for (;;) {
          bool alive = false;
          const uint64_t before = s.progress;
          for (int t = 0; t < n; ++t) {
            if (s.fibers[t].done) continue;
            alive = true;
            s.current = t;
            s.thread_idx = s.fibers[t].thread_idx;
            swapcontext(&s.scheduler, &s.fibers[t].context);
          }
          if (!alive) break;
          if (s.progress == before) fail("deadlock: a __syncthreads() or warp shuffle that not all threads reach");
        }
      }
  s.current = -1;
}

}  // namespace lego_emu

// ---- device functions ---------------------------------------------------------------------------------------------

inline void __syncthreads() {
  lego_emu::State& s = lego_emu::state();
  lego_emu::wait_at(s.block_barrier, s.num_threads);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 8 bytes");
  if (mask != 0xffffffffu) lego_emu::fail("warp shuffles must use the full mask");
  lego_emu::State& s = lego_emu::state();
  const int t = lego_emu::linear_thread();
  const int warp = t / 32;
  const int lane = t % 32;
  std::memcpy(&s.shuffle_slots[t], &value, sizeof(T));
  lego_emu::wait_at(s.warp_barriers[warp], 32);
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  T out;
  std::memcpy(&out, &s.shuffle_slots[warp * 32 + src], sizeof(T));
  lego_emu::wait_at(s.warp_barriers[warp], 32);
  return out;
}

inline float atomicAdd(float* address, float value) {  // one fiber runs at a time: a plain add is atomic
  const float old = *address;
  *address = old + value;
  return old;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, sizeof(f));
  return f;
}

// ---- runtime API (host memory, one pretend device) ----------------------------------------------------------------

inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorName(cudaError_t) { return "cudaErrorEmulated"; }
inline const char* cudaGetErrorString(cudaError_t) { return "error in the CPU emulator"; }
inline cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? 3 : 0;  // few SMs: persistent kernels get several rows each
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, size_t) {
  *blocks = 1;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}
