"""Patchify + concat [x_t, previous brick's output, pixel coordinates] + token embedding + position embedding.

Math. The brick input is the C'-channel canvas  u = [x, prev (if given), m_row, m_col]  with
m_row[i, j] = linspace(-1, 1, H)[i] and m_col[i, j] = linspace(-1, 1, W)[j] (coordinates over the WHOLE canvas, so a
larger canvas renormalizes them). The canvas is cut into r x r patches, each patch into (r/l)^2 fields of l x l; the
token of field (a, b) of patch (p, q) is

    tok[(p, q), a*(r/l) + b, :] = weight . u[:, p*r + a*l : p*r + (a+1)*l, q*r + b*l : q*r + (b+1)*l] + bias + pos[a*(r/l)+b]

Shapes: x, prev [B, C, H, W]; weight [d, C', l, l] with C' = C (+ C) + 2; bias [d]; pos_embed [S, d], S = (r/l)^2.
Output [N, S, d]: sequences image by image and patches row-major (N = B * H/r * W/r), or, with patch_index [B, P]
(flat patch ids p * W/r + q), in that order with N = B * P. The fused kernels compute the coordinates from the pixel
index and read x and prev in place: no unfold, cat or coordinate tensor goes through memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lego_kernels._checks import check_canvas, check_float, check_index, check_same
from lego_kernels._dispatch import resolve_backend

# Backends besides "torch" that this file implements.
_IMPLEMENTED: tuple[str, ...] = ()


def coordinate_channels(batch, height, width, dtype, device):
    """The two coordinate channels [B, 2, H, W]: row and column position in [-1, 1] over the canvas."""
    rows = torch.linspace(-1, 1, height, dtype=dtype, device=device)
    cols = torch.linspace(-1, 1, width, dtype=dtype, device=device)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))  # (2, H, W)
    return grid.unsqueeze(0).expand(batch, 2, height, width)


def patch_embed_ref(x, prev, weight, bias, pos_embed, brick_size, field_size, patch_index=None):
    b, _, h, w = x.shape
    r, l = brick_size, field_size
    parts = [x] + ([prev] if prev is not None else []) + [coordinate_channels(b, h, w, x.dtype, x.device)]
    emb = F.conv2d(torch.cat(parts, dim=1), weight, bias, stride=l)  # (B, d, H/l, W/l): one token per field
    d, t = emb.shape[1], r // l
    emb = emb.view(b, d, h // r, t, w // r, t).permute(0, 2, 4, 3, 5, 1)  # (B, H/r, W/r, r/l, r/l, d)
    tokens = emb.reshape(b, (h // r) * (w // r), t * t, d) + pos_embed  # (B, P_all, S, d)
    if patch_index is not None:
        tokens = tokens[torch.arange(b, device=x.device)[:, None], patch_index]  # (B, P, S, d)
    return tokens.reshape(-1, t * t, d)  # (N, S, d)


def patch_embed(x, prev, weight, bias, pos_embed, brick_size, field_size, patch_index=None, backend="auto"):
    """Embed every l x l field of every r x r patch of [x, prev, coordinates] as one token.

    x [B, C, H, W]; prev [B, C, H, W] or None; weight [d, C', l, l] over channels (x, prev, row, col);
    bias [d]; pos_embed [S, d] with S = (r/l)^2; patch_index [B, P] flat patch ids or None.
    Returns tokens [N, S, d], N = B * P (P = all patches, row-major, when patch_index is None).
    """
    op = "patch_embed"
    check_float(op, "x", x, 4)
    b, c, h, w = x.shape
    check_canvas(op, h, w, brick_size, field_size)
    if prev is not None:
        check_float(op, "prev", prev, 4)
        if prev.shape != x.shape:
            raise ValueError(f"{op}: prev has shape {tuple(prev.shape)} but x has {tuple(x.shape)}")
    check_float(op, "weight", weight, 4)
    c_in = c * (2 if prev is not None else 1) + 2
    if tuple(weight.shape[1:]) != (c_in, field_size, field_size):
        raise ValueError(
            f"{op}: weight has shape {tuple(weight.shape)}; expected [d, {c_in}, {field_size}, {field_size}] for "
            f"{c} image channels{' + ' + str(c) + ' previous-brick channels' if prev is not None else ''} + 2 coordinates"
        )
    d, s = weight.shape[0], (brick_size // field_size) ** 2
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}; expected [{d}]")
    if tuple(pos_embed.shape) != (s, d):
        raise ValueError(f"{op}: pos_embed has shape {tuple(pos_embed.shape)}; expected [{s}, {d}]")
    check_same(op, "x", x, prev=prev, weight=weight, bias=bias, pos_embed=pos_embed)
    if patch_index is not None:
        check_index(op, "patch_index", patch_index, 2, x.device)
        if patch_index.shape[0] != b:
            raise ValueError(f"{op}: patch_index has {patch_index.shape[0]} rows for {b} images")
    backend = resolve_backend(backend, x.device, op, _IMPLEMENTED)
    return patch_embed_ref(x, prev, weight, bias, pos_embed, brick_size, field_size, patch_index)
