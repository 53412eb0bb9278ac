// Attention over many short sequences (S <= 16 tokens: a patch-brick's patches), forward and backward.
// The math is in the docstring of lego_kernels/short_attention.py; per sequence n and head h, with D the head size:
//
//   P = softmax(q k^T / sqrt(D)),  o = P v,  lse = log(sum_j exp(q k_j^T / sqrt(D)))             (forward)
//   dv = P^T do,  dP = do v^T,  dS = P * (dP - rowsum(do * o)),  dq = dS k / sqrt(D),  dk = dS^T q / sqrt(D)
//
// The backward recomputes P from q, k and the saved lse (flash-attention's scheme), so nothing S x S is stored.
//
// Layout of the work: a (sequence, head) pair is one problem; a block takes `pairs_per_block` consecutive pairs
// (consecutive heads of one sequence: neighbouring memory) and first copies their q, k, v (and do) rows into shared
// memory with 16-byte loads: one pass over qkv, coalesced. Then thread (pair, i) owns query row i: its S scores, its
// softmax and its output row live in registers (S <= 16, fp32). In the backward the same thread then owns key row i
// for dk and dv, reading the pair's P and dS from shared memory. Each shared-memory row is padded to an odd number of
// 16-byte units so that the rows read by one quarter-warp fall in different banks.
//
// Compile-time switches: T (fp32, fp16, bf16; arithmetic in fp32), D (the head sizes in kShortAttentionHeadDims) and
// S_MAX (4 or 16: the register arrays for the scores; S itself is a runtime value <= S_MAX).
#include <algorithm>
#include <cmath>

#include "common.cuh"

namespace lego {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Dynamic shared memory per block; at most 48 KiB needs no opt-in and leaves room for 4 blocks per SM.
constexpr size_t kSmemBudget = 48 * 1024;
constexpr int kMaxThreads = 128;

template <typename T, int D>
struct HeadTile {
  static constexpr int kVec = kPack16<T>;  // elements per 16-byte unit
  static_assert(D % kVec == 0, "a head row must be a whole number of 16-byte units");
  static constexpr int kUnits = D / kVec;
  static constexpr int kStride = (kUnits % 2 == 1 ? kUnits : kUnits + 1) * kVec;  // shared-memory row, elements
};

// Copies the rows of `pairs` (sequence, head) pairs starting at pair `first` into shared memory:
// tiles[pl][part][s][:] with part 0, 1, 2 = q, k, v from qkv and part 3 = do (when PARTS == 4).
// A thread owns fixed 16-byte slots (part, s, u) of a pair, decomposed once, and walks the block's pairs with a
// pointer that steps one head (or on to the next sequence): no integer division per load. Loads go out kBatch at a
// time before their stores, so each thread keeps kBatch 16-byte loads in flight.
template <typename T, int D, int PARTS>
__device__ __forceinline__ void stage_tiles(T* __restrict__ tiles,      // (pairs, PARTS, S, kStride)
                                            const T* __restrict__ qkv,  // (N, S, 3, H, D)
                                            const T* __restrict__ dout, // (N, S, H, D); PARTS == 4 only
                                            int64_t first, int pairs, int S, int H) {
  using Tile = HeadTile<T, D>;
  constexpr int kBatch = 4;
  const int64_t d = static_cast<int64_t>(H) * D;
  const int64_t n0 = first / H;  // the block's first pair: sequence n0, head h0
  const int h0 = static_cast<int>(first - n0 * H);
  const int slots = PARTS * S * Tile::kUnits;  // 16-byte units of one pair
  const int pair_elems = PARTS * S * Tile::kStride;
  for (int slot = threadIdx.x; slot < slots; slot += blockDim.x) {
    const int u = slot % Tile::kUnits;  // compile-time divisor
    const int s = (slot / Tile::kUnits) % S;
    const int part = slot / (Tile::kUnits * S);
    const bool from_qkv = part < 3;
    const int64_t row_elems = from_qkv ? 3 * d : d;  // one token row of qkv or of dout
    const int64_t seq_step = S * row_elems - static_cast<int64_t>(H) * D;  // from past the last head to head 0
    const T* src = (from_qkv ? qkv + part * d : dout) + (n0 * S + s) * row_elems + h0 * D + u * Tile::kVec;
    T* dst = tiles + (part * S + s) * Tile::kStride + u * Tile::kVec;
    int head = h0;
    for (int pl0 = 0; pl0 < pairs; pl0 += kBatch) {
      uint4 buf[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        if (pl0 + b < pairs) buf[b] = *reinterpret_cast<const uint4*>(src);
        src += D;
        if (++head == H) {
          head = 0;
          src += seq_step;
        }
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b)
        if (pl0 + b < pairs) *reinterpret_cast<uint4*>(dst + (pl0 + b) * pair_elems) = buf[b];
    }
  }
}

template <typename T, int D, int S_MAX>
__global__ void __launch_bounds__(kMaxThreads) short_attention_fwd_kernel(
    const T* __restrict__ qkv,  // (N, S, 3, H, D)
    T* __restrict__ o,          // (N, S, H, D)
    float* __restrict__ lse,    // (N, H, S)
    int64_t num_pairs, int S, int H, int pairs_per_block, float scale_log2) {
  using Tile = HeadTile<T, D>;
  constexpr int VEC = Tile::kVec;
  constexpr int STRIDE = Tile::kStride;
  LEGO_DYNAMIC_SMEM(T, tiles);  // (pairs_per_block, 3, S, STRIDE)
  const int64_t first = static_cast<int64_t>(blockIdx.x) * pairs_per_block;
  const int pairs = static_cast<int>(num_pairs - first < pairs_per_block ? num_pairs - first : pairs_per_block);
  stage_tiles<T, D, 3>(tiles, qkv, nullptr, first, pairs, S, H);
  __syncthreads();

  const int pl = threadIdx.x / S;
  const int i = threadIdx.x % S;
  if (pl >= pairs) return;  // no barrier below
  const T* q = tiles + ((pl * 3 + 0) * S + i) * STRIDE;
  const T* k = tiles + (pl * 3 + 1) * S * STRIDE;
  const T* v = tiles + (pl * 3 + 2) * S * STRIDE;

  float p[S_MAX];  // scores, then probabilities, of query row i
#pragma unroll
  for (int j = 0; j < S_MAX; ++j) p[j] = 0.f;
#pragma unroll 2
  for (int u = 0; u < Tile::kUnits; ++u) {
    float qf[VEC];
    load_pack<T, VEC>(q + u * VEC, qf);
#pragma unroll
    for (int j = 0; j < S_MAX; ++j) {
      if (j < S) {
        float kf[VEC];
        load_pack<T, VEC>(k + j * STRIDE + u * VEC, kf);
#pragma unroll
        for (int e = 0; e < VEC; ++e) p[j] += qf[e] * kf[e];
      }
    }
  }
  float m = -INFINITY;  // in log2 units: exp2 is one instruction
#pragma unroll
  for (int j = 0; j < S_MAX; ++j) {
    if (j < S) {
      p[j] *= scale_log2;
      m = fmaxf(m, p[j]);
    }
  }
  float l = 0.f;
#pragma unroll
  for (int j = 0; j < S_MAX; ++j) {
    p[j] = j < S ? exp2f(p[j] - m) : 0.f;
    l += p[j];
  }
  const float inv_l = 1.f / l;

  const int64_t pair = first + pl;
  const int64_t n = pair / H;
  const int64_t head = pair % H;
  lse[pair * S + i] = (m + log2f(l)) * kLn2;
  T* orow = o + ((n * S + i) * H + head) * D;
#pragma unroll 2
  for (int u = 0; u < Tile::kUnits; ++u) {
    float acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
#pragma unroll
    for (int j = 0; j < S_MAX; ++j) {
      if (j < S) {
        float vf[VEC];
        load_pack<T, VEC>(v + j * STRIDE + u * VEC, vf);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += p[j] * vf[e];
      }
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] *= inv_l;
    store_pack<T, VEC>(orow + u * VEC, acc);
  }
}

template <typename T, int D, int S_MAX>
__global__ void __launch_bounds__(kMaxThreads) short_attention_bwd_kernel(
    const T* __restrict__ dout,     // (N, S, H, D)
    const T* __restrict__ qkv,      // (N, S, 3, H, D)
    const T* __restrict__ o,        // (N, S, H, D)
    const float* __restrict__ lse,  // (N, H, S)
    T* __restrict__ dqkv,           // (N, S, 3, H, D)
    int64_t num_pairs, int S, int H, int pairs_per_block, float scale, float scale_log2) {
  using Tile = HeadTile<T, D>;
  constexpr int VEC = Tile::kVec;
  constexpr int STRIDE = Tile::kStride;
  LEGO_DYNAMIC_SMEM(T, tiles);  // (pairs_per_block, 4, S, STRIDE) then fp32 P and dS, (pairs_per_block, S, S) each
  const int64_t first = static_cast<int64_t>(blockIdx.x) * pairs_per_block;
  const int pairs = static_cast<int>(num_pairs - first < pairs_per_block ? num_pairs - first : pairs_per_block);
  float* probs = reinterpret_cast<float*>(tiles + static_cast<int64_t>(pairs_per_block) * 4 * S * STRIDE);
  float* dscores = probs + pairs_per_block * S * S;
  stage_tiles<T, D, 4>(tiles, qkv, dout, first, pairs, S, H);
  __syncthreads();

  const int pl = threadIdx.x / S;
  const int i = threadIdx.x % S;
  const bool active = pl < pairs;
  const int64_t pair = first + pl;
  const int64_t n = pair / H;
  const int64_t head = pair % H;
  const int64_t d = static_cast<int64_t>(H) * D;
  const T* q = tiles + (pl * 4 + 0) * S * STRIDE;
  const T* k = tiles + (pl * 4 + 1) * S * STRIDE;
  const T* v = tiles + (pl * 4 + 2) * S * STRIDE;
  const T* dob = tiles + (pl * 4 + 3) * S * STRIDE;
  T* dq_row = dqkv + (n * S + i) * 3 * d + head * D;  // part 0; the k and v parts are d and 2d further

  if (active) {  // thread = query row i: P[i, :], dS[i, :] and dq[i]
    const T* qi = q + i * STRIDE;
    const T* doi = dob + i * STRIDE;
    const T* oi = o + ((n * S + i) * H + head) * D;
    float s[S_MAX], dp[S_MAX];
#pragma unroll
    for (int j = 0; j < S_MAX; ++j) s[j] = dp[j] = 0.f;
    float delta = 0.f;  // rowsum(do * o) = rowsum(P * dP)
#pragma unroll 2
    for (int u = 0; u < Tile::kUnits; ++u) {
      float qf[VEC], df[VEC], of[VEC];
      load_pack<T, VEC>(qi + u * VEC, qf);
      load_pack<T, VEC>(doi + u * VEC, df);
      load_pack<T, VEC>(oi + u * VEC, of);
#pragma unroll
      for (int e = 0; e < VEC; ++e) delta += df[e] * of[e];
#pragma unroll
      for (int j = 0; j < S_MAX; ++j) {
        if (j < S) {
          float kf[VEC], vf[VEC];
          load_pack<T, VEC>(k + j * STRIDE + u * VEC, kf);
          load_pack<T, VEC>(v + j * STRIDE + u * VEC, vf);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            s[j] += qf[e] * kf[e];
            dp[j] += df[e] * vf[e];
          }
        }
      }
    }
    const float lse_i = lse[pair * S + i] * kLog2e;
#pragma unroll
    for (int j = 0; j < S_MAX; ++j) {
      if (j < S) {
        const float pij = exp2f(s[j] * scale_log2 - lse_i);
        s[j] = pij * (dp[j] - delta);  // s now holds dS[i, :]
        probs[(pl * S + i) * S + j] = pij;
        dscores[(pl * S + i) * S + j] = s[j];
      }
    }
#pragma unroll 2
    for (int u = 0; u < Tile::kUnits; ++u) {
      float acc[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
#pragma unroll
      for (int j = 0; j < S_MAX; ++j) {
        if (j < S) {
          float kf[VEC];
          load_pack<T, VEC>(k + j * STRIDE + u * VEC, kf);
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[e] += s[j] * kf[e];
        }
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] *= scale;
      store_pack<T, VEC>(dq_row + u * VEC, acc);
    }
  }
  __syncthreads();  // P and dS of the whole pair are in shared memory

  if (active) {  // thread = key row j = i: dk[j] = scale * dS[:, j]^T q,  dv[j] = P[:, j]^T do
    const int j = i;
    float pc[S_MAX], dsc[S_MAX];
#pragma unroll
    for (int r = 0; r < S_MAX; ++r) {
      pc[r] = r < S ? probs[(pl * S + r) * S + j] : 0.f;
      dsc[r] = r < S ? dscores[(pl * S + r) * S + j] : 0.f;
    }
#pragma unroll 2
    for (int u = 0; u < Tile::kUnits; ++u) {
      float dk[VEC], dv[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) dk[e] = dv[e] = 0.f;
#pragma unroll
      for (int r = 0; r < S_MAX; ++r) {
        if (r < S) {
          float qf[VEC], df[VEC];
          load_pack<T, VEC>(q + r * STRIDE + u * VEC, qf);
          load_pack<T, VEC>(dob + r * STRIDE + u * VEC, df);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            dk[e] += dsc[r] * qf[e];
            dv[e] += pc[r] * df[e];
          }
        }
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) dk[e] *= scale;
      store_pack<T, VEC>(dq_row + d + u * VEC, dk);
      store_pack<T, VEC>(dq_row + 2 * d + u * VEC, dv);
    }
  }
}

// ---- host side ------------------------------------------------------------------------------------------------------

struct Geometry {
  int pairs_per_block, threads;
  size_t smem;
  int64_t blocks;
};

// As many pairs as fit in kMaxThreads threads (one per query row) and in the shared-memory budget.
Geometry geometry(int64_t num_pairs, int64_t S, size_t bytes_per_pair) {
  Geometry g{};
  g.pairs_per_block = static_cast<int>(std::max<int64_t>(1, kMaxThreads / S));
  g.pairs_per_block = static_cast<int>(std::min<size_t>(g.pairs_per_block, std::max<size_t>(1, kSmemBudget / bytes_per_pair)));
  g.threads = static_cast<int>(ceil_div(g.pairs_per_block * S, 32) * 32);
  g.smem = g.pairs_per_block * bytes_per_pair;
  g.blocks = ceil_div(num_pairs, g.pairs_per_block);
  return g;
}

template <typename T, int D, int S_MAX>
void run_forward(const T* qkv, T* o, float* lse, int64_t N, int S, int H, cudaStream_t stream) {
  using Tile = HeadTile<T, D>;
  const int64_t num_pairs = N * H;
  const Geometry g = geometry(num_pairs, S, 3 * S * Tile::kStride * sizeof(T));
  auto kernel = &short_attention_fwd_kernel<T, D, S_MAX>;
  const float scale_log2 = kLog2e / std::sqrt(static_cast<float>(D));
  LEGO_LAUNCH(kernel, static_cast<unsigned>(g.blocks), g.threads, g.smem, stream, qkv, o, lse, num_pairs, S, H,
              g.pairs_per_block, scale_log2);
  check_launch("short_attention forward kernel");
}

template <typename T, int D, int S_MAX>
void run_backward(const T* dout, const T* qkv, const T* o, const float* lse, T* dqkv, int64_t N, int S, int H,
                  cudaStream_t stream) {
  using Tile = HeadTile<T, D>;
  const int64_t num_pairs = N * H;
  const Geometry g = geometry(num_pairs, S, 4 * S * Tile::kStride * sizeof(T) + 2 * S * S * sizeof(float));
  auto kernel = &short_attention_bwd_kernel<T, D, S_MAX>;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  LEGO_LAUNCH(kernel, static_cast<unsigned>(g.blocks), g.threads, g.smem, stream, dout, qkv, o, lse, dqkv, num_pairs,
              S, H, g.pairs_per_block, scale, scale * kLog2e);
  check_launch("short_attention backward kernel");
}

// Calls fn.template operator()<D, S_MAX>() for a supported head size (checked by the caller).
template <typename Fn>
void dispatch_shape(int64_t head_dim, int64_t S, Fn&& fn) {
  auto with_seq = [&]<int D>() {
    if (S <= 4)
      fn.template operator()<D, 4>();
    else
      fn.template operator()<D, kShortAttentionMaxSeq>();
  };
  switch (head_dim) {
    case 32:
      return with_seq.template operator()<32>();
    case 48:
      return with_seq.template operator()<48>();
    case 64:
      return with_seq.template operator()<64>();
    case 72:
      return with_seq.template operator()<72>();
    case 80:
      return with_seq.template operator()<80>();
    case 96:
      return with_seq.template operator()<96>();
    case 128:
      return with_seq.template operator()<128>();
    default:
      throw std::invalid_argument("lego_kernels._C: short_attention has no kernel for head size " +
                                  std::to_string(head_dim));
  }
}

}  // namespace

bool short_attention_supports_head_dim(int64_t head_dim) {
  for (int dh : kShortAttentionHeadDims)
    if (dh == head_dim) return true;
  return false;
}

void short_attention_forward(int dtype, const void* qkv, void* o, float* lse, int64_t N, int64_t S, int64_t H,
                             int64_t head_dim, cudaStream_t stream) {
  if (N == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_shape(head_dim, S, [&]<int D, int S_MAX>() {
      run_forward<T, D, S_MAX>(static_cast<const T*>(qkv), static_cast<T*>(o), lse, N, static_cast<int>(S),
                               static_cast<int>(H), stream);
    });
  });
}

void short_attention_backward(int dtype, const void* dout, const void* qkv, const void* o, const float* lse, void* dqkv,
                              int64_t N, int64_t S, int64_t H, int64_t head_dim, cudaStream_t stream) {
  if (N == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_shape(head_dim, S, [&]<int D, int S_MAX>() {
      run_backward<T, D, S_MAX>(static_cast<const T*>(dout), static_cast<const T*>(qkv), static_cast<const T*>(o), lse,
                                static_cast<T*>(dqkv), N, static_cast<int>(S), static_cast<int>(H), stream);
    });
  });
}

}  // namespace lego
