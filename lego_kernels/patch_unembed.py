"""Un-embedding: the final linear's per-token output -> r x r patches -> scattered into the full canvas.

Math. Token s = a*(r/l) + b of patch P (flat id p * W/r + q) holds an l x l x C block in DiT's (row in field, column in
field, channel) order:

    canvas[img, c, p*r + a*l + i, q*r + b*l + j] = tokens[n, s, (i*l + j)*C + c]

Shapes: tokens [N, S, l*l*C] with S = (r/l)^2; output [B, C, H, W]. Sequences run image by image, patches row-major
(N = B * H/r * W/r), or in ``patch_index`` [B, P] order (N = B * P). Patches that no sequence covers come from
``fill`` [B, C, H, W] (zeros when None). patch_index rows must not repeat an id.
"""

from __future__ import annotations

import torch

from lego_kernels._checks import check_canvas, check_float, check_index, check_same
from lego_kernels._dispatch import resolve_backend

# Backends besides "torch" that this file implements.
_IMPLEMENTED: tuple[str, ...] = ()


def patch_unembed_ref(tokens, brick_size, field_size, channels, height, width, patch_index=None, fill=None):
    r, l, c = brick_size, field_size, channels
    t, nh, nw = r // l, height // r, width // r
    batch = tokens.shape[0] // (nh * nw) if patch_index is None else patch_index.shape[0]
    blocks = tokens.view(batch, -1, t, t, l, l, c).permute(0, 1, 6, 2, 4, 3, 5)  # (B, P, C, r/l, l, r/l, l)
    blocks = blocks.reshape(batch, -1, c, r, r)  # (B, P, C, r, r)
    if patch_index is not None:
        if fill is None:
            base = tokens.new_zeros(batch, nh * nw, c, r, r)
        else:
            base = fill.view(batch, c, nh, r, nw, r).permute(0, 2, 4, 1, 3, 5).reshape(batch, nh * nw, c, r, r)
        rows = torch.arange(batch, device=tokens.device)[:, None].expand_as(patch_index)
        blocks = base.index_put((rows, patch_index), blocks)  # (B, P_all, C, r, r)
    canvas = blocks.view(batch, nh, nw, c, r, r).permute(0, 3, 1, 4, 2, 5)  # (B, C, H/r, r, W/r, r)
    return canvas.reshape(batch, c, height, width)


def patch_unembed(tokens, brick_size, field_size, channels, height, width, patch_index=None, fill=None, backend="auto"):
    """Scatter per-token l x l x C blocks back into a [B, C, H, W] canvas (see the module docstring for the layout).

    tokens [N, S, l*l*C]; patch_index [B, P] or None; fill [B, C, H, W] or None (zeros) for patches not covered.
    """
    op = "patch_unembed"
    check_float(op, "tokens", tokens, 3)
    check_canvas(op, height, width, brick_size, field_size)
    r, l, c = brick_size, field_size, channels
    s, per_token = (r // l) ** 2, l * l * c
    if tokens.shape[1:] != (s, per_token):
        raise ValueError(
            f"{op}: tokens have shape {tuple(tokens.shape)}; expected [N, {s}, {per_token}] for brick {r}, field {l}, "
            f"{c} channels"
        )
    num_patches = (height // r) * (width // r)
    if patch_index is None:
        if fill is not None:
            raise ValueError(f"{op}: fill is only used with patch_index (every patch is written without one)")
        if tokens.shape[0] % num_patches:
            raise ValueError(f"{op}: {tokens.shape[0]} sequences is not a whole number of {num_patches}-patch canvases")
    else:
        check_index(op, "patch_index", patch_index, 2, tokens.device)
        if tokens.shape[0] != patch_index.numel():
            raise ValueError(f"{op}: {tokens.shape[0]} sequences but patch_index lists {patch_index.numel()} patches")
        if fill is not None:
            check_float(op, "fill", fill, 4)
            check_same(op, "tokens", tokens, fill=fill)
            if tuple(fill.shape) != (patch_index.shape[0], c, height, width):
                raise ValueError(
                    f"{op}: fill has shape {tuple(fill.shape)}; expected {(patch_index.shape[0], c, height, width)}"
                )
    backend = resolve_backend(backend, tokens.device, op, _IMPLEMENTED)
    return patch_unembed_ref(tokens, brick_size, field_size, channels, height, width, patch_index, fill)
