// Device helpers shared by the kernels: dtype conversion, 16-byte packs, warp and block sums, dtype dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launchers.h"
#include "runtime.h"

namespace lego {

// ---- dtypes ---------------------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements of T in one 16-byte load: 4 for fp32, 8 for fp16/bf16.
template <typename T>
constexpr int kPack16 = 16 / static_cast<int>(sizeof(T));

// Calls body.template operator()<T>() with T the element type of `dtype` (a DType code).
template <typename Body>
void dispatch_dtype(int dtype, Body&& body) {
  switch (dtype) {
    case kFloat32:
      body(float{});
      return;
    case kFloat16:
      body(__half{});
      return;
    case kBFloat16:
      body(__nv_bfloat16{});
      return;
    default:
      throw std::invalid_argument("lego_kernels._C: unknown dtype code " + std::to_string(dtype));
  }
}

// ---- packs: VEC consecutive elements moved as one aligned load/store ------------------------------------------------

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = to_float(pk.v[e]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int e = 0; e < VEC; ++e) pk.v[e] = from_float<T>(in[e]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// ---- reductions -----------------------------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sums a and b over the whole block (blockDim.x a multiple of 32); every thread gets both totals. Every thread of the
// block must call it (it synchronizes), and it may be called again right away (it ends with a barrier).
__device__ __forceinline__ void block_sum2(float& a, float& b) {
  __shared__ float red_a[32];
  __shared__ float red_b[32];
  a = warp_sum(a);
  b = warp_sum(b);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) {
    red_a[warp] = a;
    red_b[warp] = b;
  }
  __syncthreads();
  const int num_warps = blockDim.x >> 5;
  a = lane < num_warps ? red_a[lane] : 0.f;
  b = lane < num_warps ? red_b[lane] : 0.f;
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();
}

__device__ __forceinline__ float block_sum(float a) {
  float unused = 0.f;
  block_sum2(a, unused);
  return a;
}

// ---- launch geometry ------------------------------------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks that fit on the current device at once for `kernel` with `threads` threads and `smem` bytes of dynamic
// shared memory: the grid of a persistent kernel that loops over its share of the rows.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, int threads, size_t smem) {
  int device = 0;
  int sms = 0;
  int per_sm = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem), "occupancy query");
  return static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
}

}  // namespace lego
