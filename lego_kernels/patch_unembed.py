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

from lego_kernels._checks import check_canvas, check_float, check_index, check_patch_ids, check_same
from lego_kernels._dispatch import new_output, on_tensor_device, resolve_backend, triton_importable

if triton_importable():
    import triton
    import triton.language as tl
else:  # the torch backend needs no triton: the kernels below stay plain, never-called functions
    import types

    triton = types.SimpleNamespace(jit=lambda fn: fn)

# Backends besides "torch" that this file implements.
_IMPLEMENTED: tuple[str, ...] = ("triton",)


def patch_unembed_ref(tokens, brick_size, field_size, channels, height, width, patch_index=None, fill=None):
    r, l, c = brick_size, field_size, channels
    t, nh, nw = r // l, height // r, width // r
    batch, p = (tokens.shape[0] // (nh * nw), nh * nw) if patch_index is None else patch_index.shape
    blocks = tokens.view(batch, p, t, t, l, l, c).permute(0, 1, 6, 2, 4, 3, 5)  # (B, P, C, r/l, l, r/l, l)
    blocks = blocks.reshape(batch, p, c, r, r)  # (B, P, C, r, r)
    if patch_index is not None:
        if fill is None:
            base = tokens.new_zeros(batch, nh * nw, c, r, r)
        else:
            base = fill.view(batch, c, nh, r, nw, r).permute(0, 2, 4, 1, 3, 5).reshape(batch, nh * nw, c, r, r)
        rows = torch.arange(batch, device=tokens.device)[:, None].expand_as(patch_index)
        blocks = base.index_put((rows, patch_index), blocks)  # (B, P_all, C, r, r)
    canvas = blocks.view(batch, nh, nw, c, r, r).permute(0, 3, 1, 4, 2, 5)  # (B, C, H/r, r, W/r, r)
    return canvas.reshape(batch, c, height, width)


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels. Both walk the canvas, one (image, channel) plane and BLOCK pixels per program, so every canvas element
# is visited exactly once. A pixel's token element comes from the layout above; its sequence from the inverse patch map
# (patch -> sequence, -1 where none covers it) when there is a patch_index.


@triton.jit
def _token_offsets(
    INV,  # shape (B * P_all,) int32; not read without HAS_INDEX
    img,  # scalar: image of this plane
    pix,  # shape (BLOCK,): pixel y * W + x
    pix_ok,  # shape (BLOCK,)
    c,  # scalar: channel of this plane
    C,
    W,
    NW,
    P_ALL,
    T: tl.constexpr,
    L: tl.constexpr,
    HAS_INDEX: tl.constexpr,
):
    """Offset in tokens (N, S, l*l*C) of each pixel's value, and whether a sequence covers the pixel."""
    y = pix // W
    x = pix % W
    patch = (y // (T * L)) * NW + x // (T * L)
    s = ((y % (T * L)) // L) * T + (x % (T * L)) // L
    e = ((y % L) * L + x % L) * C + c
    if HAS_INDEX:  # noqa: SIM108 (a constexpr branch: Triton compiles only the side taken)
        seq = tl.load(INV + img * P_ALL + patch, mask=pix_ok, other=-1)
    else:
        seq = img * P_ALL + patch
    covered = pix_ok & (seq >= 0)
    return (seq.to(tl.int64) * (T * T) + s) * (L * L * C) + e, covered


@triton.jit
def _patch_unembed_fwd_kernel(
    TOKENS,  # shape (N, S, l*l*C)
    INV,  # shape (B * P_all,) int32; not read without HAS_INDEX
    FILL,  # shape (B, C, H, W); not read without HAS_FILL
    OUT,  # shape (B, C, H, W)
    C,
    H,
    W,
    NW,  # patches per canvas row, W / r
    P_ALL,  # patches per canvas
    T: tl.constexpr,  # fields per patch side, r / l
    L: tl.constexpr,  # field size l
    HAS_INDEX: tl.constexpr,
    HAS_FILL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """canvas[img, c, y, x] = the token element of pixel (y, x), or fill (zero) where no sequence covers it."""
    plane = tl.program_id(0)  # img * C + c
    pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    pix_ok = pix < H * W
    src, covered = _token_offsets(INV, plane // C, pix, pix_ok, plane % C, C, W, NW, P_ALL, T, L, HAS_INDEX)
    val = tl.load(TOKENS + src, mask=covered, other=0.0)
    dst = plane.to(tl.int64) * H * W + pix
    if HAS_FILL:
        val = tl.where(covered, val, tl.load(FILL + dst, mask=pix_ok & ~covered, other=0.0))
    tl.store(OUT + dst, val, mask=pix_ok)


@triton.jit
def _patch_unembed_bwd_kernel(
    DCANVAS,  # shape (B, C, H, W)
    INV,  # shape (B * P_all,) int32; not read without HAS_INDEX
    DTOKENS,  # shape (N, S, l*l*C)
    DFILL,  # shape (B, C, H, W); not written without HAS_FILL
    C,
    H,
    W,
    NW,
    P_ALL,
    T: tl.constexpr,
    L: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    HAS_FILL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """dtokens at each covered pixel's token element = dcanvas there; dfill = dcanvas where no sequence covers it.
    With distinct patch ids per image every token element is one covered pixel, so dtokens is written exactly once."""
    plane = tl.program_id(0)
    pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    pix_ok = pix < H * W
    dst, covered = _token_offsets(INV, plane // C, pix, pix_ok, plane % C, C, W, NW, P_ALL, T, L, HAS_INDEX)
    src = plane.to(tl.int64) * H * W + pix
    g = tl.load(DCANVAS + src, mask=pix_ok, other=0.0)
    tl.store(DTOKENS + dst, g, mask=covered)
    if HAS_FILL:
        tl.store(DFILL + src, tl.where(covered, 0.0, g).to(g.dtype), mask=pix_ok)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers.

_BLOCK = 1024  # pixels per program: a pure copy, so a large block keeps the interpreter and the GPU launch count low


def _inverse_patch_index(patch_index, num_patches):
    """(B * P_all,) int32: the sequence b * P + j of patch patch_index[b, j] of image b, -1 for patches not listed."""
    b, p = patch_index.shape
    flat = (torch.arange(b, device=patch_index.device)[:, None] * num_patches + patch_index).reshape(-1)
    inv = torch.full((b * num_patches,), -1, dtype=torch.int32, device=patch_index.device)
    return inv.scatter_(0, flat, torch.arange(b * p, dtype=torch.int32, device=patch_index.device))


def _block(height, width):
    return min(_BLOCK, 1 << max(0, height * width - 1).bit_length())


@on_tensor_device
def _patch_unembed_fwd_triton(tokens, patch_index, fill, brick_size, field_size, channels, height, width):
    nh, nw = height // brick_size, width // brick_size
    batch = patch_index.shape[0] if patch_index is not None else tokens.shape[0] // (nh * nw)
    out = new_output((batch, channels, height, width), tokens.dtype, tokens.device)
    if out.numel() == 0:
        return out
    inv = _inverse_patch_index(patch_index, nh * nw) if patch_index is not None else tokens
    block = _block(height, width)
    _patch_unembed_fwd_kernel[(batch * channels, triton.cdiv(height * width, block))](
        tokens, inv, fill if fill is not None else tokens, out,
        channels, height, width, nw, nh * nw,
        T=brick_size // field_size, L=field_size, HAS_INDEX=patch_index is not None, HAS_FILL=fill is not None,
        BLOCK=block,
    )  # fmt: skip
    return out


@on_tensor_device
def _patch_unembed_bwd_triton(dcanvas, patch_index, brick_size, field_size, has_fill):
    """(dtokens [N, S, l*l*C], dfill [B, C, H, W] or an empty tensor when not has_fill)."""
    batch, channels, height, width = dcanvas.shape
    nh, nw = height // brick_size, width // brick_size
    t = brick_size // field_size
    n = patch_index.numel() if patch_index is not None else batch * nh * nw
    dtokens = new_output((n, t * t, field_size * field_size * channels), dcanvas.dtype, dcanvas.device)
    dfill = new_output(dcanvas.shape, dcanvas.dtype, dcanvas.device) if has_fill else dcanvas.new_empty((0,))
    if dcanvas.numel() == 0:
        return dtokens, dfill
    inv = _inverse_patch_index(patch_index, nh * nw) if patch_index is not None else dcanvas
    block = _block(height, width)
    _patch_unembed_bwd_kernel[(batch * channels, triton.cdiv(height * width, block))](
        dcanvas, inv, dtokens, dfill if has_fill else dcanvas,
        channels, height, width, nw, nh * nw,
        T=t, L=field_size, HAS_INDEX=patch_index is not None, HAS_FILL=has_fill, BLOCK=block,
    )  # fmt: skip
    return dtokens, dfill


# ----------------------------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, with fake (meta) implementations for tracing, autograd through the backward op.


@torch.library.custom_op("lego::patch_unembed_fwd", mutates_args=())
def _patch_unembed_fwd_op(
    tokens: torch.Tensor,
    patch_index: torch.Tensor | None,
    fill: torch.Tensor | None,
    brick_size: int,
    field_size: int,
    channels: int,
    height: int,
    width: int,
) -> torch.Tensor:
    return _patch_unembed_fwd_triton(tokens, patch_index, fill, brick_size, field_size, channels, height, width)


@_patch_unembed_fwd_op.register_fake
def _(tokens, patch_index, fill, brick_size, field_size, channels, height, width):
    num_patches = (height // brick_size) * (width // brick_size)
    batch = patch_index.shape[0] if patch_index is not None else tokens.shape[0] // num_patches
    return tokens.new_empty((batch, channels, height, width))


@torch.library.custom_op("lego::patch_unembed_bwd", mutates_args=())
def _patch_unembed_bwd_op(
    dcanvas: torch.Tensor,
    patch_index: torch.Tensor | None,
    brick_size: int,
    field_size: int,
    has_fill: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _patch_unembed_bwd_triton(dcanvas, patch_index, brick_size, field_size, has_fill)


@_patch_unembed_bwd_op.register_fake
def _(dcanvas, patch_index, brick_size, field_size, has_fill):
    batch, channels, height, width = dcanvas.shape
    n = patch_index.numel() if patch_index is not None else batch * (height // brick_size) * (width // brick_size)
    dtokens = dcanvas.new_empty((n, (brick_size // field_size) ** 2, field_size * field_size * channels))
    return dtokens, dcanvas.new_empty(dcanvas.shape) if has_fill else dcanvas.new_empty((0,))


def _patch_unembed_setup_context(ctx, inputs, output):
    _, patch_index, fill, brick_size, field_size, *_ = inputs
    ctx.save_for_backward(patch_index)
    ctx.has_fill, ctx.brick_size, ctx.field_size = fill is not None, brick_size, field_size


def _patch_unembed_backward(ctx, dcanvas):
    (patch_index,) = ctx.saved_tensors
    has_fill = ctx.has_fill and ctx.needs_input_grad[2]
    dtokens, dfill = _patch_unembed_bwd_op(dcanvas.contiguous(), patch_index, ctx.brick_size, ctx.field_size, has_fill)
    return dtokens, None, dfill if has_fill else None, None, None, None, None, None


_patch_unembed_fwd_op.register_autograd(_patch_unembed_backward, setup_context=_patch_unembed_setup_context)


def patch_unembed(
    tokens,
    brick_size,
    field_size,
    channels,
    height,
    width,
    patch_index=None,
    fill=None,
    backend="auto",
    *,
    check_ids=True,
):
    """Scatter per-token l x l x C blocks back into a [B, C, H, W] canvas (see the module docstring for the layout).

    tokens [N, S, l*l*C]; patch_index [B, P] or None; fill [B, C, H, W] or None (zeros) for patches not covered.
    ``check_ids``: check that patch_index's ids are in range and distinct within a row (one host sync on a GPU; not
    under torch.compile or CUDA graph capture); pass False for ids known to be valid.
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
        if check_ids:
            check_patch_ids(op, patch_index, num_patches)
        if fill is not None:
            check_float(op, "fill", fill, 4)
            check_same(op, "tokens", tokens, fill=fill)
            if tuple(fill.shape) != (patch_index.shape[0], c, height, width):
                raise ValueError(
                    f"{op}: fill has shape {tuple(fill.shape)}; expected {(patch_index.shape[0], c, height, width)}"
                )
    backend = resolve_backend(backend, tokens.device, op, _IMPLEMENTED)
    if backend == "triton":
        return _patch_unembed_fwd_op(
            tokens.contiguous(),
            patch_index.contiguous() if patch_index is not None else None,
            fill.contiguous() if fill is not None else None,
            brick_size,
            field_size,
            channels,
            height,
            width,
        )
    return patch_unembed_ref(tokens, brick_size, field_size, channels, height, width, patch_index, fill)
