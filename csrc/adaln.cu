// adaLN: LayerNorm (eps 1e-6, no affine, biased variance) + per-image modulation, and the gated residual fused with
// it. The math and shapes are in the docstring of lego_kernels/adaln.py; in short, for token row r of image b:
//
//   forward   v = x            (adaln_modulate)   or   v = x_out = x + gate[b] * y   (gated_residual_adaln)
//             h = (v - mean) * rstd * (1 + scale[b]) + shift[b]
//   backward  g = dh * (1 + scale[b]);  xhat = (v - mean) * rstd
//             dv = rstd * (g - mean(g) - xhat * mean(g * xhat))          (+ dx_out when gated)
//             dshift[b] = sum_r dh,  dscale[b] = sum_r dh * xhat,  dgate[b] = sum_r dv * y,  dy = dv * gate[b]
//
// One block owns a contiguous range of rows and walks it row by row; each thread keeps a fixed slice of the d
// channels (CHUNKS packs of VEC channels) in registers, so a row is read once and the row statistics are two block
// sums. The backward walks the rows in IMAGE order (with image_index, through `order`, the sequences sorted by image
// on the host side), so a block sees each of its images as one run of rows. It sums each run's dshift/dscale/dgate
// per thread in registers and stores the sum, without atomics, into workspace slot (block + image): that slot is
// unique because images never decrease along the rows (two runs k + b = k' + b' with k < k' would need b' < b). A
// second kernel then adds, per image, the slots of the blocks that cover it, in block order. So every gradient,
// the per-image sums included, is bitwise the same from run to run on a device (the grid follows the device's SM
// count, so another GPU model may round differently).
//
// Compile-time switches: T (fp32, fp16, bf16; all arithmetic in fp32), VEC (16-byte packs when d and the pointers
// allow, else single elements), CHUNKS (packs per thread: 1, 2, 4 ... up to 16 channels) and GATED.
#include <algorithm>
#include <initializer_list>
#include <type_traits>

#include "common.cuh"

namespace lego {
namespace {

constexpr float kEps = 1e-6f;

// Packs per thread go up to max_chunks (16 channels per thread when packed, 8 single channels); a block has at most
// 256 threads, except at max_chunks, where the widest rows (d up to kAdalnMaxWidth) take 512 (packed) or 1024 threads.
// The bound tells the compiler how many registers it may use: up to 255 at 256 threads, 128 at 512, 64 at 1024.
constexpr int max_chunks(int vec) { return vec == 1 ? 8 : 16 / vec; }
constexpr int max_threads(int vec, int chunks) { return chunks < max_chunks(vec) ? 256 : (vec == 1 ? 1024 : 512); }

__device__ __forceinline__ int64_t image_of_row(int64_t row, int64_t seq_len, const int64_t* image_index,
                                                int64_t seqs_per_image) {
  const int64_t n = row / seq_len;
  return image_index != nullptr ? image_index[n] : n / seqs_per_image;
}

// This thread's slice of a row: pack c holds channels [col, col + VEC) with col = (c * blockDim.x + threadIdx.x) * VEC;
// packs past the end of the row read as 0 and are not written.
template <typename T, int VEC, int CHUNKS>
__device__ __forceinline__ void load_row(const T* __restrict__ row, int d, float (&v)[CHUNKS][VEC]) {
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = (c * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * VEC;
    if (col < d) {
      load_pack<T, VEC>(row + col, v[c]);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[c][e] = 0.f;
    }
  }
}

template <typename T, int VEC, int CHUNKS>
__device__ __forceinline__ void store_row(T* __restrict__ row, int d, const float (&v)[CHUNKS][VEC]) {
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = (c * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * VEC;
    if (col < d) store_pack<T, VEC>(row + col, v[c]);
  }
}

// Image b's vector of a [B, d] tensor, plus `add` (1 for the 1 + scale factor); NaN for an image index outside
// [0, B), so that a bad image_index poisons the rows that use it instead of reading out of bounds.
template <typename T, int VEC, int CHUNKS>
__device__ __forceinline__ void load_image_vector(const T* __restrict__ vecs, int64_t b, int64_t num_images, int d,
                                                  float add, float (&v)[CHUNKS][VEC]) {
  if (b >= 0 && b < num_images) {
    load_row<T, VEC, CHUNKS>(vecs + b * d, d, v);
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[c][e] += add;
  } else {
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[c][e] = __int_as_float(0x7fc00000);  // NaN
  }
}

// This thread's channels of one run's per-image sum -> its workspace slot (plain stores: one writer per slot).
template <int VEC, int CHUNKS>
__device__ __forceinline__ void store_sums(float* __restrict__ slot, int d, const float (&acc)[CHUNKS][VEC]) {
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = (c * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * VEC;
    if (col < d) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) slot[col + e] = acc[c][e];
    }
  }
}

template <typename T, int VEC, int CHUNKS, bool GATED>
__global__ void __launch_bounds__(max_threads(VEC, CHUNKS)) adaln_fwd_kernel(
    const T* __restrict__ x,                  // (rows, d)
    const T* __restrict__ y,                  // (rows, d); GATED only
    const T* __restrict__ gate,               // (B, d); GATED only
    const T* __restrict__ shift,              // (B, d)
    const T* __restrict__ scale,              // (B, d)
    const int64_t* __restrict__ image_index,  // (N,) or nullptr
    T* __restrict__ x_out,                    // (rows, d); GATED only
    T* __restrict__ h,                        // (rows, d)
    float* __restrict__ mean,                 // (rows,)
    float* __restrict__ rstd,                 // (rows,)
    int64_t rows, int64_t seq_len, int d, int64_t seqs_per_image, int64_t num_images, int64_t rows_per_block) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t last = first + rows_per_block < rows ? first + rows_per_block : rows;
  float gt[CHUNKS][VEC] = {}, sh[CHUNKS][VEC] = {}, sc1[CHUNKS][VEC] = {};  // the current image's gate, shift, 1 + scale
  int64_t image = -1;
  for (int64_t r = first; r < last; ++r) {
    const int64_t b = image_of_row(r, seq_len, image_index, seqs_per_image);
    if (b != image || r == first) {  // b is the same for the whole block: no divergence
      if constexpr (GATED) load_image_vector<T, VEC, CHUNKS>(gate, b, num_images, d, 0.f, gt);
      load_image_vector<T, VEC, CHUNKS>(shift, b, num_images, d, 0.f, sh);
      load_image_vector<T, VEC, CHUNKS>(scale, b, num_images, d, 1.f, sc1);
      image = b;
    }
    float v[CHUNKS][VEC];
    load_row<T, VEC, CHUNKS>(x + r * d, d, v);
    if constexpr (GATED) {
      float yv[CHUNKS][VEC];
      load_row<T, VEC, CHUNKS>(y + r * d, d, yv);
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[c][e] = to_float(from_float<T>(v[c][e] + gt[c][e] * yv[c][e]));
      // LN reads x_out as stored (rounded to T), so the saved mean/rstd describe exactly the x_out the backward gets.
      store_row<T, VEC, CHUNKS>(x_out + r * d, d, v);
    }
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
      for (int e = 0; e < VEC; ++e) sum += v[c][e];  // channels past d hold 0
    const float mu = block_sum(sum) / d;
    float sq = 0.f;  // two passes over the registers: no cancellation when |mean| >> std
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int col = (c * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * VEC;
      if (col < d) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) sq += (v[c][e] - mu) * (v[c][e] - mu);
      }
    }
    const float rs = rsqrtf(block_sum(sq) / d + kEps);
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[c][e] = (v[c][e] - mu) * rs * sc1[c][e] + sh[c][e];
    store_row<T, VEC, CHUNKS>(h + r * d, d, v);
    if (threadIdx.x == 0) {
      mean[r] = mu;
      rstd[r] = rs;
    }
  }
}

template <typename T, int VEC, int CHUNKS, bool GATED>
__global__ void __launch_bounds__(max_threads(VEC, CHUNKS)) adaln_bwd_kernel(
    const T* __restrict__ dh,                 // (rows, d) gradient of h (of y for adaln_modulate)
    const T* __restrict__ dx_out,             // (rows, d) gradient of x_out; GATED only
    const T* __restrict__ x,                  // (rows, d) LN's input: x, or x_out when GATED
    const T* __restrict__ y,                  // (rows, d); GATED only
    const T* __restrict__ gate,               // (B, d); GATED only
    const T* __restrict__ scale,              // (B, d)
    const int64_t* __restrict__ sorted_image,  // (N,) image_index sorted, or nullptr (then N / B per image)
    const int64_t* __restrict__ order,         // (N,) the sequence at each sorted position (with sorted_image)
    const float* __restrict__ mean,           // (rows,)
    const float* __restrict__ rstd,           // (rows,)
    T* __restrict__ dx,                       // (rows, d)
    T* __restrict__ dy,                       // (rows, d); GATED only
    float* __restrict__ slots,                // (3, slots_per_kind, d): dshift, dscale, dgate (GATED) per run
    int64_t rows, int64_t seq_len, int d, int64_t seqs_per_image, int64_t num_images, int64_t rows_per_block,
    int64_t slots_per_kind) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t last = first + rows_per_block < rows ? first + rows_per_block : rows;
  const int64_t plane = slots_per_kind * d;
  float gt[CHUNKS][VEC] = {}, sc1[CHUNKS][VEC] = {};
  float acc_shift[CHUNKS][VEC] = {}, acc_scale[CHUNKS][VEC] = {}, acc_gate[CHUNKS][VEC] = {};
  int64_t image = -1;
  // Position first's sequence (in image order), token and image, then advanced by counting: no 64-bit division (a
  // called subroutine in SASS) per row.
  int64_t seq = first / seq_len, tok = first - seq * seq_len;
  int64_t img = sorted_image != nullptr ? 0 : seq / seqs_per_image, seq_in_img = seq - img * seqs_per_image;
  for (int64_t pos = first; pos < last; ++pos) {  // positions in image order
    const int64_t b = sorted_image != nullptr ? sorted_image[seq] : img;
    const int64_t r = (sorted_image != nullptr ? order[seq] : seq) * seq_len + tok;  // the row
    if (b != image || pos == first) {
      if (pos != first && image >= 0 && image < num_images) {
        float* slot = slots + (blockIdx.x + image) * d;
        store_sums<VEC, CHUNKS>(slot, d, acc_shift);
        store_sums<VEC, CHUNKS>(slot + plane, d, acc_scale);
        if constexpr (GATED) store_sums<VEC, CHUNKS>(slot + 2 * plane, d, acc_gate);
      }
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc_shift[c][e] = acc_scale[c][e] = acc_gate[c][e] = 0.f;
      if constexpr (GATED) load_image_vector<T, VEC, CHUNKS>(gate, b, num_images, d, 0.f, gt);
      load_image_vector<T, VEC, CHUNKS>(scale, b, num_images, d, 1.f, sc1);
      image = b;
    }
    const float mu = mean[r];
    const float rs = rstd[r];
    float dhv[CHUNKS][VEC], xhat[CHUNKS][VEC], g[CHUNKS][VEC];
    load_row<T, VEC, CHUNKS>(dh + r * d, d, dhv);
    load_row<T, VEC, CHUNKS>(x + r * d, d, xhat);
    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int col = (c * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * VEC;
      const bool valid = col < d;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        xhat[c][e] = valid ? (xhat[c][e] - mu) * rs : 0.f;
        g[c][e] = valid ? dhv[c][e] * sc1[c][e] : 0.f;
        sum_g += g[c][e];
        sum_gx += g[c][e] * xhat[c][e];
        acc_shift[c][e] += dhv[c][e];
        acc_scale[c][e] += dhv[c][e] * xhat[c][e];
      }
    }
    block_sum2(sum_g, sum_gx);
    const float mean_g = sum_g / d;
    const float mean_gx = sum_gx / d;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
      for (int e = 0; e < VEC; ++e) g[c][e] = rs * (g[c][e] - mean_g - xhat[c][e] * mean_gx);  // g is now dLN-input
    if constexpr (GATED) {
      float t[CHUNKS][VEC];
      load_row<T, VEC, CHUNKS>(dx_out + r * d, d, t);
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
        for (int e = 0; e < VEC; ++e) g[c][e] += t[c][e];  // total gradient of x_out = gradient of x
      store_row<T, VEC, CHUNKS>(dx + r * d, d, g);
      load_row<T, VEC, CHUNKS>(y + r * d, d, t);
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          acc_gate[c][e] += g[c][e] * t[c][e];
          t[c][e] = g[c][e] * gt[c][e];
        }
      store_row<T, VEC, CHUNKS>(dy + r * d, d, t);
    } else {
      store_row<T, VEC, CHUNKS>(dx + r * d, d, g);
    }
    if (++tok == seq_len) {
      tok = 0;
      ++seq;
      if (++seq_in_img == seqs_per_image) {  // never true with sorted_image (seqs_per_image 0)
        seq_in_img = 0;
        ++img;
      }
    }
  }
  if (first < last && image >= 0 && image < num_images) {
    float* slot = slots + (blockIdx.x + image) * d;
    store_sums<VEC, CHUNKS>(slot, d, acc_shift);
    store_sums<VEC, CHUNKS>(slot + plane, d, acc_scale);
    if constexpr (GATED) store_sums<VEC, CHUNKS>(slot + 2 * plane, d, acc_gate);
  }
}

// First sorted position (in [0, n]) whose image is >= b.
__device__ __forceinline__ int64_t lower_bound(const int64_t* __restrict__ sorted, int64_t n, int64_t b) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (sorted[mid] < b)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// The runs' sums -> the [B, d] gradients in T: image b's value adds the slots (k + b) of the blocks k that cover b's
// positions, in increasing k (a fixed order, so the result is deterministic); zero for an image without rows.
template <typename T>
__global__ void __launch_bounds__(256) reduce_slots_kernel(
    const float* __restrict__ slots,           // (kinds, slots_per_kind, d)
    const int64_t* __restrict__ sorted_image,  // (N,) or nullptr
    T* __restrict__ out0,                      // (B, d) dshift
    T* __restrict__ out1,                      // (B, d) dscale
    T* __restrict__ out2,                      // (B, d) dgate, or nullptr
    int64_t num_seq, int64_t seq_len, int d, int64_t seqs_per_image, int64_t num_images, int64_t rows_per_block,
    int64_t slots_per_kind) {
  const int64_t count = num_images * d;
  const int64_t plane = slots_per_kind * d;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    const int64_t b = i / d, c = i % d;
    int64_t lo, hi;  // image b's positions [lo, hi)
    if (sorted_image != nullptr) {
      lo = lower_bound(sorted_image, num_seq, b) * seq_len;
      hi = lower_bound(sorted_image, num_seq, b + 1) * seq_len;
    } else {
      lo = b * seqs_per_image * seq_len;
      hi = lo + seqs_per_image * seq_len;
    }
    float s0 = 0.f, s1 = 0.f, s2 = 0.f;
    if (lo < hi) {
      for (int64_t k = lo / rows_per_block; k <= (hi - 1) / rows_per_block; ++k) {
        const float* slot = slots + (k + b) * d + c;
        s0 += slot[0];
        s1 += slot[plane];
        if (out2 != nullptr) s2 += slot[2 * plane];
      }
    }
    out0[i] = from_float<T>(s0);
    out1[i] = from_float<T>(s1);
    if (out2 != nullptr) out2[i] = from_float<T>(s2);
  }
}

// ---- host side ------------------------------------------------------------------------------------------------------

struct RowLayout {
  int vec;      // channels per pack: 16 bytes' worth, or 1 when d or a pointer does not allow 16-byte accesses
  int chunks;   // packs per thread (1, 2, 4 or 8)
  int threads;  // threads per block (a multiple of 32)
};

bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// Fewest packs per thread (1, 2, 4, ... up to max_chunks) that keep the block at <= 256 threads; at max_chunks the
// block grows instead (512 or 1024 threads for d = kAdalnMaxWidth).
RowLayout row_layout(int64_t d, int pack16, bool aligned) {
  RowLayout L{};
  L.vec = (aligned && d % pack16 == 0) ? pack16 : 1;
  const int64_t packs = d / L.vec;
  for (L.chunks = 1; L.chunks < max_chunks(L.vec) && ceil_div(packs, L.chunks) > 256; L.chunks *= 2) {
  }
  L.threads = static_cast<int>(ceil_div(ceil_div(packs, L.chunks), 32) * 32);
  if (L.threads > max_threads(L.vec, L.chunks))
    throw std::invalid_argument("lego_kernels._C: adaLN hidden size " + std::to_string(d) + " is too large");
  return L;
}

struct AdalnProblem {
  int64_t rows, seq_len, d, seqs_per_image, num_images;
  const int64_t* image_index;
  cudaStream_t stream;
};

template <typename T, int VEC, int CHUNKS, bool GATED>
void run_forward(const RowLayout& L, const AdalnProblem& p, const T* x, const T* y, const T* gate, const T* shift,
                 const T* scale, T* x_out, T* h, float* mean, float* rstd) {
  auto kernel = &adaln_fwd_kernel<T, VEC, CHUNKS, GATED>;
  const int64_t grid0 = std::min(p.rows, resident_blocks(kernel, L.threads, 0));
  const int64_t per_block = ceil_div(p.rows, grid0);
  const int64_t grid = ceil_div(p.rows, per_block);
  LEGO_LAUNCH(kernel, static_cast<unsigned>(grid), L.threads, 0, p.stream, x, y, gate, shift, scale, p.image_index,
              x_out, h, mean, rstd, p.rows, p.seq_len, static_cast<int>(p.d), p.seqs_per_image, p.num_images,
              per_block);
  check_launch("adaln forward kernel");
}

template <typename T, int VEC, int CHUNKS, bool GATED>
void run_backward(const RowLayout& L, const AdalnProblem& p, const int64_t* sorted_image, const int64_t* order,
                  const T* dh, const T* dx_out, const T* x, const T* y, const T* gate, const T* scale,
                  const float* mean, const float* rstd, T* dx, T* dy, T* dgate, T* dshift, T* dscale, float* slots) {
  auto kernel = &adaln_bwd_kernel<T, VEC, CHUNKS, GATED>;
  const int64_t grid0 = std::min({p.rows, resident_blocks(kernel, L.threads, 0), kAdalnBackwardMaxBlocks});
  const int64_t per_block = ceil_div(p.rows, grid0);
  const int64_t grid = ceil_div(p.rows, per_block);
  const int64_t slots_per_kind = kAdalnBackwardMaxBlocks + p.num_images;  // the workspace's layout, see launchers.h
  LEGO_LAUNCH(kernel, static_cast<unsigned>(grid), L.threads, 0, p.stream, dh, dx_out, x, y, gate, scale,
              sorted_image, order, mean, rstd, dx, dy, slots, p.rows, p.seq_len, static_cast<int>(p.d),
              p.seqs_per_image, p.num_images, per_block, slots_per_kind);
  check_launch("adaln backward kernel");
  const int64_t reduce_grid = std::min<int64_t>(ceil_div(p.num_images * p.d, 256), 4096);
  auto reduce = &reduce_slots_kernel<T>;
  LEGO_LAUNCH(reduce, static_cast<unsigned>(reduce_grid), 256, 0, p.stream, slots, sorted_image, dshift, dscale,
              GATED ? dgate : nullptr, p.rows / p.seq_len, p.seq_len, static_cast<int>(p.d), p.seqs_per_image,
              p.num_images, per_block, slots_per_kind);
  check_launch("adaln backward: per-image sums");
}

// Calls fn.template operator()<VEC, CHUNKS>() for the layout's compile-time shape (only the shapes row_layout makes
// are instantiated).
template <int PACK, typename Fn>
void dispatch_layout(const RowLayout& L, Fn&& fn) {
  auto with_chunks = [&]<int VEC>() {
    switch (L.chunks) {
      case 1:
        return fn.template operator()<VEC, 1>();
      case 2:
        return fn.template operator()<VEC, 2>();
      case 4:
        if constexpr (max_chunks(VEC) >= 4) return fn.template operator()<VEC, 4>();
        break;
      case 8:
        if constexpr (max_chunks(VEC) >= 8) return fn.template operator()<VEC, 8>();
        break;
    }
    throw std::logic_error("lego_kernels._C: adaLN layout without a kernel");
  };
  if (L.vec == 1)
    with_chunks.template operator()<1>();
  else
    with_chunks.template operator()<PACK>();
}

}  // namespace

void adaln_forward(int dtype, bool gated, const void* x, const void* y, const void* gate, const void* shift,
                   const void* scale, const int64_t* image_index, void* x_out, void* h, float* mean, float* rstd,
                   int64_t N, int64_t S, int64_t d, int64_t B, cudaStream_t stream) {
  const AdalnProblem p{N * S, S, d, image_index ? 0 : N / B, B, image_index, stream};
  if (p.rows == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const RowLayout L = row_layout(d, kPack16<T>, aligned16({x, y, gate, shift, scale, x_out, h}));
    auto cx = static_cast<const T*>(x), cy = static_cast<const T*>(y), cg = static_cast<const T*>(gate);
    auto csh = static_cast<const T*>(shift), csc = static_cast<const T*>(scale);
    auto xo = static_cast<T*>(x_out), hh = static_cast<T*>(h);
    dispatch_layout<kPack16<T>>(L, [&]<int VEC, int CHUNKS>() {
      if (gated)
        run_forward<T, VEC, CHUNKS, true>(L, p, cx, cy, cg, csh, csc, xo, hh, mean, rstd);
      else
        run_forward<T, VEC, CHUNKS, false>(L, p, cx, cy, cg, csh, csc, xo, hh, mean, rstd);
    });
  });
}

void adaln_backward(int dtype, bool gated, const void* dh, const void* dx_out, const void* x, const void* y,
                    const void* gate, const void* scale, const int64_t* image_order, const float* mean,
                    const float* rstd, void* dx, void* dy, void* dgate, void* dshift, void* dscale, float* workspace,
                    int64_t N, int64_t S, int64_t d, int64_t B, cudaStream_t stream) {
  const int64_t* sorted_image = image_order;
  const int64_t* order = image_order != nullptr ? image_order + N : nullptr;
  const AdalnProblem p{N * S, S, d, image_order ? 0 : N / B, B, sorted_image, stream};
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto odg = static_cast<T*>(dgate), ods = static_cast<T*>(dshift), odc = static_cast<T*>(dscale);
    if (p.rows == 0) {  // no rows: every per-image sum is zero
      for (T* out : {ods, odc, gated ? odg : nullptr})
        if (out != nullptr) check_cuda(cudaMemsetAsync(out, 0, sizeof(T) * B * d, stream), "zeroing the sums");
      return;
    }
    const RowLayout L = row_layout(d, kPack16<T>, aligned16({dh, dx_out, x, y, gate, scale, dx, dy}));
    auto cdh = static_cast<const T*>(dh), cdxo = static_cast<const T*>(dx_out), cx = static_cast<const T*>(x);
    auto cy = static_cast<const T*>(y), cg = static_cast<const T*>(gate), csc = static_cast<const T*>(scale);
    auto odx = static_cast<T*>(dx), ody = static_cast<T*>(dy);
    dispatch_layout<kPack16<T>>(L, [&]<int VEC, int CHUNKS>() {
      if (gated)
        run_backward<T, VEC, CHUNKS, true>(L, p, sorted_image, order, cdh, cdxo, cx, cy, cg, csc, mean, rstd, odx,
                                           ody, odg, ods, odc, workspace);
      else
        run_backward<T, VEC, CHUNKS, false>(L, p, sorted_image, order, cdh, cdxo, cx, cy, cg, csc, mean, rstd, odx,
                                            ody, odg, ods, odc, workspace);
    });
  });
}

}  // namespace lego
