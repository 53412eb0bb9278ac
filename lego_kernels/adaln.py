"""adaLN modulation, and the gated residual fused with the next adaLN.

Math, per sequence n of image b (b = n // (N / B), or ``image_index[n]``), token s, channel c:

    adaln_modulate:        y[n,s] = LN(x[n,s]) * (1 + scale[b]) + shift[b]
                           LN(v) = (v - mean(v)) / sqrt(var(v) + 1e-6)   (no affine; biased variance)
    gated_residual_adaln:  x_out[n,s] = x[n,s] + gate[b] * y[n,s]
                           h[n,s]     = adaln_modulate(x_out)[n,s]

Shapes: x, y [N, S, d]; shift, scale, gate [B, d] (one vector per IMAGE, never per patch); image_index [N] int.
The conditioning vectors are per image: a brick's N sequences (its patches) share their image's vectors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lego_kernels._checks import check_float, check_index, check_same
from lego_kernels._dispatch import resolve_backend

EPS = 1e-6

# Backends besides "torch" that this file implements.
_IMPLEMENTED: tuple[str, ...] = ()


def _per_sequence(v: torch.Tensor, num_seq: int, image_index: torch.Tensor | None) -> torch.Tensor:
    """[B, d] per-image vectors -> [N, 1, d] per-sequence vectors (a view when image_index is None)."""
    if image_index is not None:
        return v[image_index].unsqueeze(1)
    b = v.shape[0]
    return v[:, None, None, :].expand(b, num_seq // b, 1, v.shape[1]).reshape(num_seq, 1, v.shape[1])


def adaln_modulate_ref(x, shift, scale, image_index=None):
    n = x.shape[0]
    y = F.layer_norm(x, (x.shape[-1],), eps=EPS)
    return y * (1 + _per_sequence(scale, n, image_index)) + _per_sequence(shift, n, image_index)


def gated_residual_adaln_ref(x, y, gate, shift=None, scale=None, image_index=None):
    x_out = x + _per_sequence(gate, x.shape[0], image_index) * y
    if shift is None:
        return x_out
    return x_out, adaln_modulate_ref(x_out, shift, scale, image_index)


def _check(op, x, image_index, **per_image):
    check_float(op, "x", x, 3)
    vecs = {k: v for k, v in per_image.items() if v is not None}
    for name, v in vecs.items():
        check_float(op, name, v, 2)
        if v.shape[1] != x.shape[2]:
            raise ValueError(f"{op}: {name} has width {v.shape[1]} but x has hidden size {x.shape[2]}")
    check_same(op, "x", x, **vecs)
    batch = {v.shape[0] for v in vecs.values()}
    if len(batch) > 1:
        raise ValueError(f"{op}: the per-image vectors disagree on the batch size: {sorted(batch)}")
    if image_index is None:
        num_images = batch.pop() if batch else 1
        if x.shape[0] % num_images:
            raise ValueError(
                f"{op}: x has {x.shape[0]} sequences, not a multiple of the {num_images} images; "
                "pass image_index to say which image each sequence belongs to"
            )
    else:
        check_index(op, "image_index", image_index, 1, x.device)
        if image_index.shape[0] != x.shape[0]:
            raise ValueError(f"{op}: image_index has {image_index.shape[0]} entries for {x.shape[0]} sequences")


def adaln_modulate(x, shift, scale, image_index=None, backend="auto"):
    """LayerNorm (eps 1e-6, no affine) then per-image modulation: ``LN(x) * (1 + scale[b]) + shift[b]``.

    x [N, S, d]; shift, scale [B, d]; image_index [N] (optional; default N/B consecutive sequences per image).
    Returns y [N, S, d] in x's dtype (statistics in fp32 on the fused backends).
    """
    _check("adaln_modulate", x, image_index, shift=shift, scale=scale)
    backend = resolve_backend(backend, x.device, "adaln_modulate", _IMPLEMENTED)
    return adaln_modulate_ref(x, shift, scale, image_index)


def gated_residual_adaln(x, y, gate, shift=None, scale=None, image_index=None, backend="auto"):
    """Gated residual, fused with the next adaLN: ``x_out = x + gate[b] * y``; ``h = adaln_modulate(x_out)``.

    x, y [N, S, d]; gate, shift, scale [B, d]. Returns ``(x_out, h)``, or ``x_out`` alone when shift and scale are
    None (the last residual of a stack with nothing to modulate after it).
    """
    if (shift is None) != (scale is None):
        raise ValueError("gated_residual_adaln: pass both shift and scale, or neither")
    _check("gated_residual_adaln", x, image_index, gate=gate, shift=shift, scale=scale)
    check_float("gated_residual_adaln", "y", y, 3)
    check_same("gated_residual_adaln", "x", x, y=y)
    if y.shape != x.shape:
        raise ValueError(f"gated_residual_adaln: y has shape {tuple(y.shape)} but x has {tuple(x.shape)}")
    backend = resolve_backend(backend, x.device, "gated_residual_adaln", _IMPLEMENTED)
    return gated_residual_adaln_ref(x, y, gate, shift, scale, image_index)
