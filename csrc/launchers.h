// Host entry points of the kernels, called by bindings.cpp. Plain C++: raw device pointers, sizes, a dtype code and a
// stream; no PyTorch. Arguments are validated in bindings.cpp; these functions trust them.
#pragma once

#include <cstdint>

#include "runtime.h"

namespace lego {

// Element type of every floating-point tensor of one call (statistics and workspaces are always fp32).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---- adaLN (adaln.cu) ----------------------------------------------------------------------------------------------
// Rows are the N * S tokens of x [N, S, d]; row r belongs to sequence n = r / S, whose image is image_index[n], or
// n / (N / B) when image_index is null. shift/scale/gate are [B, d].

// Largest hidden size d the adaLN kernels take.
constexpr int64_t kAdalnMaxWidth = 8192;

// gated == false: h = LN(x) * (1 + scale[b]) + shift[b]       (y, gate, x_out unused)
// gated == true:  x_out = x + gate[b] * y;  h = LN(x_out) * (1 + scale[b]) + shift[b]
// mean, rstd: fp32 [N * S], the statistics of LN's input.
void adaln_forward(int dtype, bool gated, const void* x, const void* y, const void* gate, const void* shift,
                   const void* scale, const int64_t* image_index, void* x_out, void* h, float* mean, float* rstd,
                   int64_t N, int64_t S, int64_t d, int64_t B, cudaStream_t stream);

// gated == false: (dh, x, scale, mean, rstd) -> dx, dshift, dscale                     (dx_out, y, gate, dy, dgate unused)
// gated == true:  (dx_out, dh, x = x_out, y, gate, scale, mean, rstd) -> dx, dy, dgate, dshift, dscale
// image_order: nullptr (N / B consecutive sequences per image) or int64 [2, N]: image_index sorted (stably), then the
// sequence at each sorted position (torch.sort(image_index, stable=True)); the rows are walked in that order.
// workspace: fp32 [3, kAdalnBackwardMaxBlocks + B, d] (only [2, ...] used when !gated), no clearing needed: each
// block stores its runs' per-image sums there and a second kernel adds them per image in a fixed order (adaln.cu), so
// the sums are deterministic.
constexpr int64_t kAdalnBackwardMaxBlocks = 1024;
void adaln_backward(int dtype, bool gated, const void* dh, const void* dx_out, const void* x, const void* y,
                    const void* gate, const void* scale, const int64_t* image_order, const float* mean,
                    const float* rstd, void* dx, void* dy, void* dgate, void* dshift, void* dscale, float* workspace,
                    int64_t N, int64_t S, int64_t d, int64_t B, cudaStream_t stream);

// ---- short attention (short_attention.cu) --------------------------------------------------------------------------
// qkv [N, S, 3, H, D] (the QKV linear's output [N, S, 3d] with d = H * D); o [N, S, H, D]; lse fp32 [N, H, S].

constexpr int kShortAttentionMaxSeq = 16;
// Head sizes compiled in (a compile-time switch each; see short_attention.cu).
constexpr int kShortAttentionHeadDims[] = {32, 48, 64, 72, 80, 96, 128};

bool short_attention_supports_head_dim(int64_t head_dim);

void short_attention_forward(int dtype, const void* qkv, void* o, float* lse, int64_t N, int64_t S, int64_t H,
                             int64_t head_dim, cudaStream_t stream);

void short_attention_backward(int dtype, const void* dout, const void* qkv, const void* o, const float* lse, void* dqkv,
                              int64_t N, int64_t S, int64_t H, int64_t head_dim, cudaStream_t stream);

}  // namespace lego
