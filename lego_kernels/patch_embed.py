"""Patchify + concat [x_t, previous brick's output, pixel coordinates] + token embedding + position embedding.

Math. The brick input is the C'-channel canvas  u = [x, prev (if given), m_row, m_col]  with
m_row[i, j] = linspace(-1, 1, H)[i] and m_col[i, j] = linspace(-1, 1, W)[j] (coordinates over the WHOLE canvas, so a
larger canvas renormalizes them). The canvas is cut into r x r patches, each patch into (r/l)^2 fields of l x l; the
token of field (a, b) of patch (p, q) is

    tok[(p, q), a*(r/l) + b, :] = weight . u[:, p*r + a*l : p*r + (a+1)*l, q*r + b*l : q*r + (b+1)*l]
                                  + bias + pos[a*(r/l) + b]

Shapes: x, prev [B, C, H, W]; weight [d, C', l, l] with C' = C (+ C) + 2; bias [d]; pos_embed [S, d], S = (r/l)^2.
Output [N, S, d]: sequences image by image and patches row-major (N = B * H/r * W/r), or, with patch_index [B, P]
(flat patch ids p * W/r + q), in that order with N = B * P. The fused kernels compute the coordinates from the pixel
index and read x and prev in place: no unfold, cat or coordinate tensor goes through memory.

Backward, with dtok [N, S, d] and field(n, s) [K] (K = C' * l * l): dfield = dtok . weight goes back to the canvas
pixels of its field (x's and prev's channels; the coordinates have no gradient), dweight = sum over tokens of
dtok^T field, dpos_embed[s] = sum over sequences of dtok[:, s], dbias = sum of dpos_embed. One Triton kernel
(_patch_embed_bwd_kernel) reads each dtok tile once for all of them, over a grid of token tiles, and sums dweight,
dpos_embed and dbias across tiles with fp32 atomics in L2 (tile size: _bwd_config). Atomics add in a different order
from run to run, so under torch.use_deterministic_algorithms(True) the backward instead runs two kernels that read dtok
twice (dweight and dpos_embed from fixed-order fp32 partials, then dfield); so it does, dweight in one piece, where the
fused kernel's fp32 accumulator would cost more bytes than the second read (few tokens against K). Without input
gradients (the bottom brick: x_t needs none) the first of those two kernels runs alone, its shares summed with fp32
atomics outside deterministic mode: each token split adds d x K once over all its d tiles, where a fused token tile
spans d in one program.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lego_kernels._checks import check_canvas, check_float, check_index, check_patch_ids, check_same
from lego_kernels._dispatch import (
    exact_fp32,
    fp32_dot_precision,
    interpreting,
    new_output,
    on_tensor_device,
    resolve_backend,
    triton_importable,
)

if triton_importable():
    import triton
    import triton.language as tl
else:  # the torch backend needs no triton: the kernels below stay plain, never-called functions
    import types

    triton = types.SimpleNamespace(jit=lambda fn: fn)

# Backends besides "torch" that this file implements.
_IMPLEMENTED: tuple[str, ...] = ("triton",)


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
    u = torch.cat(parts, dim=1)  # (B, C', H, W)
    c_in = u.shape[1]
    patches = u.view(b, c_in, h // r, r, w // r, r).permute(0, 2, 4, 1, 3, 5)  # (B, H/r, W/r, C', r, r)
    patches = patches.reshape(b, (h // r) * (w // r), c_in, r, r)  # (B, P_all, C', r, r)
    if patch_index is not None:  # select first, so unprocessed patches cost no embedding compute
        patches = patches[torch.arange(b, device=x.device)[:, None], patch_index]  # (B, P, C', r, r)
    with exact_fp32(x.dtype):  # cuDNN's default would round fp32 to TF32: the reference stays fp32
        emb = F.conv2d(patches.reshape(-1, c_in, r, r), weight, bias, stride=l)  # (N, d, r/l, r/l): a token per field
    return emb.flatten(2).transpose(1, 2) + pos_embed  # (N, S, d), tokens row-major within the patch


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels. Every token row is one (sequence, token position s) pair; a program takes BLOCK_M sequences at one s,
# so a row's field origin is a per-row scalar and the K = C' * l * l field values are a gather from x and prev plus two
# coordinates computed from the pixel index. K runs in the conv weight's (channel, row in field, column in field) order.


@triton.jit
def _field_origin(patch, s, NW, T: tl.constexpr, L: tl.constexpr):
    """Top-left pixel (row, column) of field s of each flat patch id in ``patch``."""
    y0 = (patch // NW) * (T * L) + (s // T) * L
    x0 = (patch % NW) * (T * L) + (s % T) * L
    return y0, x0


@triton.jit
def _gather_fields(
    X,  # shape (B, C, H, W)
    PREV,  # shape (B, C, H, W); not read without HAS_PREV
    img,  # shape (BLOCK_M,) int64: image of each row
    y0,  # shape (BLOCK_M,): top row of each row's field
    x0,  # shape (BLOCK_M,): left column of each row's field
    row_ok,  # shape (BLOCK_M,)
    k,  # shape (BLOCK_K,): field element (channel * l*l + row in field * l + column in field)
    K,  # C' * l * l
    C,
    H,
    W,
    stride_b,
    stride_c,
    stride_h,
    row_step,  # 2 / (H - 1), 0 when H == 1
    col_step,  # 2 / (W - 1), 0 when W == 1
    L: tl.constexpr,
    HAS_PREV: tl.constexpr,
):
    """The (BLOCK_M, BLOCK_K) tile of fields, fp32, zero outside the rows and K."""
    ch = k // (L * L)
    yy = y0[:, None] + ((k // L) % L)[None, :]
    xx = x0[:, None] + (k % L)[None, :]
    ok = row_ok[:, None] & (k < K)[None, :]
    base = img[:, None] * stride_b + yy * stride_h + xx
    val = tl.load(X + base + ch[None, :] * stride_c, mask=ok & (ch < C)[None, :], other=0.0).to(tl.float32)
    if HAS_PREV:
        in_prev = ok & ((ch >= C) & (ch < 2 * C))[None, :]
        val += tl.load(PREV + base + (ch - C)[None, :] * stride_c, mask=in_prev, other=0.0).to(tl.float32)
    # As torch.linspace(-1, 1, n): start + i * step in the first half, end - (n - 1 - i) * step in the second (the
    # middle of an odd n comes from the start here, equal up to rounding); n = 1 gives [-1].
    row = tl.where(yy * 2 < H, -1.0 + yy * row_step, 1.0 - (H - 1 - yy) * row_step)
    col = tl.where(xx * 2 < W, -1.0 + xx * col_step, 1.0 - (W - 1 - xx) * col_step)
    coord = K // (L * L) - 2  # channel of the row coordinate; the column coordinate follows it
    val = tl.where(ok & (ch == coord)[None, :], row, val)
    val = tl.where(ok & (ch == coord + 1)[None, :], col, val)
    return val


@triton.jit
def _patch_embed_fwd_kernel(
    X,  # shape (B, C, H, W)
    PREV,  # shape (B, C, H, W); not read without HAS_PREV
    WEIGHT,  # shape (d, C', l, l), read as (d, K)
    BIAS,  # shape (d,); not read without HAS_BIAS
    POS,  # shape (S, d)
    INDEX,  # shape (B, P): flat patch ids; not read without HAS_INDEX
    OUT,  # shape (N, S, d)
    N,  # sequences, B * P
    P,  # patches per image (sequences per image)
    NH,  # patches per canvas column, H / r
    NW,  # patches per canvas row, W / r
    d,
    K,  # C' * l * l
    C,
    H,
    W,
    stride_b,  # x and prev share their (contiguous) strides
    stride_c,
    stride_h,
    row_step,
    col_step,
    T: tl.constexpr,  # fields per patch side, r / l
    L: tl.constexpr,  # field size l
    HAS_PREV: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # fp32: "tf32" where PyTorch's matmul setting allows it, else "ieee"; 16-bit: unused
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """tokens[n, s, :] = field(n, s) . weight^T + bias + pos[s] for BLOCK_M sequences n at one token position s."""
    pid_m = tl.program_id(0)
    s = tl.program_id(1)
    pid_n = tl.program_id(2)
    seq = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    seq_ok = seq < N
    img = (seq // P).to(tl.int64)
    if HAS_INDEX:
        patch = tl.load(INDEX + seq, mask=seq_ok, other=0).to(tl.int32)
        seq_ok = seq_ok & (patch >= 0) & (patch < NH * NW)  # an out-of-range id reads nothing
    else:
        patch = seq % P
    y0, x0 = _field_origin(patch, s, NW, T, L)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < d

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(WEIGHT + cols[None, :] * K + k[:, None], mask=(k < K)[:, None] & col_ok[None, :], other=0.0)
        a = _gather_fields(
            X, PREV, img, y0, x0, seq_ok, k, K, C, H, W, stride_b, stride_c, stride_h, row_step, col_step, L, HAS_PREV
        )  # fmt: skip
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)

    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc += tl.load(POS + s * d + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    rows = (seq.to(tl.int64) * (T * T) + s) * d
    out_ok = (seq < N)[:, None] & col_ok[None, :]
    tl.store(OUT + rows[:, None] + cols[None, :], acc.to(OUT.dtype.element_ty), mask=out_ok)


@triton.jit
def _patch_embed_bwd_weight_kernel(
    DTOK,  # shape (N, S, d)
    X,  # shape (B, C, H, W)
    PREV,  # shape (B, C, H, W); not read without HAS_PREV
    INDEX,  # shape (B, P); not read without HAS_INDEX
    DW_PART,  # shape (SEQ_SPLITS * TOKEN_SPLITS, d, K) fp32: each program's share of dweight; dweight itself when 1.
    # With ATOMIC: (d, ACC_STRIDE) fp32, zeroed, every share added to it with atomics
    DPOS_PART,  # shape (SEQ_SPLITS, S, d) fp32: each sequence split's share of dpos_embed; with ATOMIC: (S, d), summed
    DB_ACC,  # shape (d,) fp32, zeroed: dbias, summed with ATOMIC; not written without
    N,
    P,
    NH,
    NW,
    d,
    K,
    C,
    H,
    W,
    stride_b,
    stride_c,
    stride_h,
    row_step,
    col_step,
    seq_per_split,  # a multiple of BLOCK_M
    seq_splits,  # sequence splits; program_id(2) = token split * seq_splits + sequence split
    tokens_per_split,  # token positions per token split
    T: tl.constexpr,
    L: tl.constexpr,
    HAS_PREV: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    ATOMIC: tl.constexpr,  # add the shares into fp32 accumulators (any order) instead of writing them apart
    ACC_STRIDE: tl.constexpr,  # row stride of DW_PART: K, or K rounded up to 4 for the accumulator (16-byte atomics)
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dweight[:, k] = sum over rows of dtok[row, :] * field[row, k], over the rows of one (sequence split, token
    split); the programs of K-tile 0 also sum dtok per token position (dpos_embed; dbias is its sum over s). Splitting
    the token positions too keeps the image-brick (few sequences of many tokens) spread over the GPU. The programs of
    one split (every d and K tile) are neighbours in the grid, so their re-reads of dtok and the field come from L2."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    part_id = tl.program_id(2)
    split = part_id % seq_splits
    s_begin = (part_id // seq_splits) * tokens_per_split
    s_end = tl.minimum(s_begin + tokens_per_split, T * T)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < d
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    seq_begin = split * seq_per_split
    seq_end = tl.minimum(seq_begin + seq_per_split, N)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s in range(s_begin, s_end):
        dpos = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for n0 in range(seq_begin, seq_end, BLOCK_M):
            seq = n0 + tl.arange(0, BLOCK_M)
            seq_ok = seq < seq_end
            img = (seq // P).to(tl.int64)
            if HAS_INDEX:
                patch = tl.load(INDEX + seq, mask=seq_ok, other=0).to(tl.int32)
                field_ok = seq_ok & (patch >= 0) & (patch < NH * NW)
            else:
                patch = seq % P
                field_ok = seq_ok
            y0, x0 = _field_origin(patch, s, NW, T, L)
            rows = (seq.to(tl.int64) * (T * T) + s) * d
            g = tl.load(DTOK + rows[:, None] + cols[None, :], mask=seq_ok[:, None] & col_ok[None, :], other=0.0)
            a = _gather_fields(
                X, PREV, img, y0, x0, field_ok, k, K, C, H, W, stride_b, stride_c, stride_h, row_step, col_step, L,
                HAS_PREV,
            )  # fmt: skip
            acc = tl.dot(tl.trans(g), a.to(g.dtype), acc, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_K)
            dpos += tl.sum(g.to(tl.float32), axis=0)
        if pid_k == 0:
            if ATOMIC:
                tl.atomic_add(DPOS_PART + s * d + cols, dpos, mask=col_ok, sem="relaxed")
                db += dpos
            else:
                tl.store(DPOS_PART + (split * (T * T) + s) * d + cols, dpos, mask=col_ok)
    if ATOMIC:
        if pid_k == 0:
            tl.atomic_add(DB_ACC + cols, db, mask=col_ok, sem="relaxed")
        # acc is 0 in the padding columns K..ACC_STRIDE (the field tile is), so they take part: whole 16-byte atomics.
        acc_ok = col_ok[:, None] & (k < ACC_STRIDE)[None, :]
        tl.atomic_add(DW_PART + cols[:, None] * ACC_STRIDE + k[None, :], acc, mask=acc_ok, sem="relaxed")
    else:
        part = DW_PART + part_id.to(tl.int64) * d * ACC_STRIDE
        w_ok = col_ok[:, None] & (k < K)[None, :]
        tl.store(part + cols[:, None] * ACC_STRIDE + k[None, :], acc.to(DW_PART.dtype.element_ty), mask=w_ok)


@triton.jit
def _canvas_rows(INV, gp, s, ok, P_ALL, d, T: tl.constexpr, HAS_INDEX: tl.constexpr):
    """For canvas patches gp (flat over images) at token positions s: (image, patch id in the image, whether a
    sequence covers it, offset of its dtok row). Without HAS_INDEX sequence gp is canvas patch gp; with it INV maps
    each canvas patch to its sequence, -1 for none."""
    img = (gp // P_ALL).to(tl.int64)
    patch = gp % P_ALL
    if HAS_INDEX:  # noqa: SIM108 (a constexpr branch: Triton compiles only the side taken)
        seq = tl.load(INV + gp, mask=ok, other=-1)
    else:
        seq = gp
    covered = ok & (seq >= 0)
    rows = (seq.to(tl.int64) * (T * T) + s) * d
    return img, patch, covered, rows


@triton.jit
def _store_dfield(DCANVAS, dfield, img, y0, x0, k, row_ok, K_IMG, C, H, W, canvas_numel, L: tl.constexpr):
    """Write dfield [rows, BLOCK_K] (field element k of each row's field, origin y0, x0 in image img) to the canvas
    pixels it came from: elements k < K_IMG only (the coordinates have no gradient)."""
    ch = k // (L * L)
    yy = y0[:, None] + ((k // L) % L)[None, :]
    xx = x0[:, None] + (k % L)[None, :]
    # channel ch < C is x's channel ch, C <= ch < 2C is prev's channel ch - C, one canvas further on.
    chan = (ch // C).to(tl.int64) * canvas_numel + (ch % C) * H * W
    offs = img[:, None] * C * H * W + chan[None, :] + yy * W + xx
    tl.store(DCANVAS + offs, dfield.to(DCANVAS.dtype.element_ty), mask=row_ok[:, None] & (k < K_IMG)[None, :])


@triton.jit
def _patch_embed_bwd_input_kernel(
    DTOK,  # shape (N, S, d)
    WEIGHT,  # shape (d, C', l, l), read as (d, K)
    INV,  # shape (B * P_all,) int32: sequence of each (image, patch), -1 when none; not read without HAS_INDEX
    DCANVAS,  # shape (1 or 2, B, C, H, W): dx, then dprev when there is prev
    G,  # canvas patches, B * P_all
    P_ALL,
    NW,
    d,
    K,
    K_IMG,  # field elements with a gradient: (1 or 2) * C * l * l (the coordinates have none)
    C,
    H,
    W,
    canvas_numel,  # B * C * H * W: offset of dprev in DCANVAS
    T: tl.constexpr,
    L: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dfield = dtok . weight, written to the canvas pixels of each field. A program walks BLOCK_M canvas patches (not
    sequences) at one token position, so every pixel is written exactly once: zero where no sequence covers it."""
    pid_m = tl.program_id(0)
    s = tl.program_id(1)
    pid_k = tl.program_id(2)
    gp = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    gp_ok = gp < G
    img, patch, covered, rows = _canvas_rows(INV, gp, s, gp_ok, P_ALL, d, T, HAS_INDEX)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, d, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < d
        g = tl.load(DTOK + rows[:, None] + cols[None, :], mask=covered[:, None] & col_ok[None, :], other=0.0)
        w = tl.load(WEIGHT + cols[:, None] * K + k[None, :], mask=col_ok[:, None] & (k < K)[None, :], other=0.0)
        acc = tl.dot(g, w, acc, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_K)

    y0, x0 = _field_origin(patch, s, NW, T, L)
    _store_dfield(DCANVAS, acc, img, y0, x0, k, gp_ok, K_IMG, C, H, W, canvas_numel, L)


@triton.jit
def _patch_embed_bwd_kernel(
    DTOK,  # shape (N, S, d)
    X,  # shape (B, C, H, W)
    PREV,  # shape (B, C, H, W); not read without HAS_PREV
    WEIGHT,  # shape (d, C', l, l), read as (d, K)
    INV,  # shape (B * P_all,) int32: sequence of each (image, patch), -1 when none; not read without HAS_INDEX
    DCANVAS,  # shape (1 or 2, B, C, H, W): dx, then dprev when there is prev
    DW_ACC,  # shape (d, ACC_STRIDE) fp32, zeroed: dweight in its first K columns, summed here with atomics
    DPOS_ACC,  # shape (S, d) fp32, zeroed: dpos_embed, summed here with atomics
    DB_ACC,  # shape (d,) fp32, zeroed: dbias, summed here with atomics
    G,  # canvas patches, B * P_all
    P_ALL,
    NW,
    d,
    K,
    K_IMG,  # field elements with a gradient: (1 or 2) * C * l * l (the coordinates have none)
    C,
    H,
    W,
    stride_b,
    stride_c,
    stride_h,
    row_step,
    col_step,
    canvas_numel,  # B * C * H * W: offset of dprev in DCANVAS
    T: tl.constexpr,
    L: tl.constexpr,
    HAS_PREV: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    ACC_STRIDE: tl.constexpr,  # K rounded up to 4 (K itself where l > 1): known here, so its atomics go 16 bytes wide
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,  # canvas patches per program
    BLOCK_S: tl.constexpr,  # token positions per program: a tile of BLOCK_P * BLOCK_S token rows
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One read of each dtok tile gives all the gradients of its rows: dfield = dtok . weight (written to the canvas
    pixels of each field, zero where no sequence covers the patch), and the tile's share of dweight = dtok^T . field,
    of dpos_embed = sum of dtok per token position and of dbias (its sum), added to fp32 accumulators with atomics.
    The d columns are walked in BLOCK_N chunks, so the field tile is gathered once and dfield stays in registers.
    Grid: (patch blocks x K tiles, token blocks), K tiles first, so that the programs re-reading a dtok tile for the
    other K tiles run next to each other and find it in L2."""
    k_tiles = tl.cdiv(K, BLOCK_K)
    pid_p = tl.program_id(0) // k_tiles
    pid_k = tl.program_id(0) % k_tiles
    pid_s = tl.program_id(1)
    r = tl.arange(0, BLOCK_P * BLOCK_S)  # row r is (patch r // BLOCK_S, token position r % BLOCK_S) of the tile
    gp = pid_p * BLOCK_P + r // BLOCK_S
    s_tile = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    s = pid_s * BLOCK_S + r % BLOCK_S
    row_ok = (gp < G) & (s < T * T)
    img, patch, covered, rows = _canvas_rows(INV, gp, s, row_ok, P_ALL, d, T, HAS_INDEX)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    y0, x0 = _field_origin(patch, s, NW, T, L)
    a = _gather_fields(
        X, PREV, img, y0, x0, covered, k, K, C, H, W, stride_b, stride_c, stride_h, row_step, col_step, L, HAS_PREV
    )  # fmt: skip
    a = a.to(DTOK.dtype.element_ty)  # (BLOCK_P * BLOCK_S, BLOCK_K)

    dfield = tl.zeros((BLOCK_P * BLOCK_S, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, d, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < d
        g = tl.load(DTOK + rows[:, None] + cols[None, :], mask=covered[:, None] & col_ok[None, :], other=0.0)
        w = tl.load(WEIGHT + cols[:, None] * K + k[None, :], mask=col_ok[:, None] & (k < K)[None, :], other=0.0)
        dfield = tl.dot(g, w, dfield, input_precision=DOT_PRECISION)  # (BLOCK_P * BLOCK_S, BLOCK_K)
        dw = tl.dot(tl.trans(g), a, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_K)
        # dw is 0 in the padding columns K..ACC_STRIDE (the field tile is), so they take part: whole 16-byte atomics.
        acc_ok = col_ok[:, None] & (k < ACC_STRIDE)[None, :]
        tl.atomic_add(DW_ACC + cols[:, None] * ACC_STRIDE + k[None, :], dw, mask=acc_ok, sem="relaxed")
        if pid_k == 0:
            g3 = tl.reshape(g.to(tl.float32), (BLOCK_P, BLOCK_S, BLOCK_N))
            dpos = tl.sum(g3, axis=0)  # (BLOCK_S, BLOCK_N)
            pos_ok = (s_tile < T * T)[:, None] & col_ok[None, :]
            tl.atomic_add(DPOS_ACC + s_tile[:, None] * d + cols[None, :], dpos, mask=pos_ok, sem="relaxed")
            tl.atomic_add(DB_ACC + cols, tl.sum(dpos, axis=0), mask=col_ok, sem="relaxed")

    _store_dfield(DCANVAS, dfield, img, y0, x0, k, row_ok, K_IMG, C, H, W, canvas_numel, L)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers. Block sizes come from plain heuristics (no autotune: it fails under the interpreter); the tests compile
# the kernels with these same configurations.


def _pow2(n: int, lo: int, hi: int) -> int:
    """The power of two >= n, clamped to [lo, hi]."""
    return min(hi, max(lo, 1 << max(0, n - 1).bit_length()))


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: for fp32 what PyTorch's fp32 matmul setting allows (TF32 where the user allowed it, as
    torch.matmul would; IEEE by default), read at each launch (a CUDA graph keeps the one of its capture); 16-bit
    inputs ignore it."""
    return fp32_dot_precision() if dtype == torch.float32 else "tf32"


# fp32 runs its tl.dot as FMAs (no TF32 rounding): a smaller N tile keeps its registers and compile time in check.
# K tiles of 32: each gathered field element costs its own address arithmetic (int64), and at 64 the [64, 64] gather
# plus the [64, 128] accumulator spilled (XL-U's 4 x 4 brick of 2 x 2 fields, K 40: 255 registers, 24 bytes, sm_90 bf16;
# at 32: 170 registers, and half the shared memory at every shape).
def _fwd_config(d: int, k: int, dtype: torch.dtype) -> dict:
    wide = dtype != torch.float32
    return {"BLOCK_M": 64, "BLOCK_N": _pow2(d, 16, 128 if wide else 64), "BLOCK_K": _pow2(k, 16, 32)}


# fp32 (the default training precision) at 64 tokens x 64 x 32 and 4 warps used all 255 registers and spilled 360 to
# 700 bytes per thread (Triton 3.6 and 3.9, sm_90 and sm_80: the fp32 field gather and its int64 addresses beside the
# fp32 dtok tile); 32 tokens x 32 x 32 per step on 8 warps: 130 to 190 registers, no spill. bf16 at 64 tokens per step
# and 4 warps spilled 16 bytes on sm_80 (Triton 3.9's ptxas, l = 2), at 32 tokens and 4 warps 16 bytes at l = 8; 32
# tokens on 8 warps: 96 to 121 registers on sm_80, 77 to 111 on sm_90, no spill.
def _bwd_weight_config(d: int, k: int, dtype: torch.dtype) -> dict:
    wide = dtype != torch.float32
    return {"BLOCK_M": 32, "BLOCK_N": _pow2(d, 16, 64 if wide else 32), "BLOCK_K": _pow2(k, 16, 64 if wide else 32),
            "num_warps": 8}  # fmt: skip


def _bwd_input_config(d: int, k_img: int, dtype: torch.dtype) -> dict:
    return {
        "BLOCK_M": 64,
        "BLOCK_N": _pow2(d, 16, 64 if dtype != torch.float32 else 32),
        "BLOCK_K": _pow2(k_img, 16, 64),
    }


# The fused backward (_patch_embed_bwd_kernel) reads dtok once; its price is the dweight reduction across programs.
# Each tile of M = BLOCK_P x BLOCK_S token rows adds a [d, K] fp32 share of dweight (over its K tiles), BLOCK_S rows of
# dpos and one of dbias: d * (K + BLOCK_S + 1) * 4 bytes of L2 atomic traffic against the M * d * 2 bytes of dtok it
# reads. A tile takes the fewest rows (the most programs) that keep this within _ATOMIC_SHARE of dtok's bytes, at most
# 128 rows (the [128, 64] fp32 dfield accumulator, the field tile and a dtok chunk in registers). That is a rule, not a
# measurement: where K is large against 128 rows (fields of 4 x 4 and 8 x 8 pixels, K 96 to 640) it is exceeded at
# 128 rows, and where few rows exist (the image brick at B 64: 64 patches x 256 tokens) the grid is small.
_ATOMIC_SHARE = 1.0
_BWD_ROWS = (32, 64, 128)
# fp32 tiles of 128 rows take them from at most 64 patches (2 token positions each): 128 patches x 1 position compiled
# to 128 registers and 24 to 32 bytes of spills on sm_80 (Triton 3.9's ptxas: l = 2 at S 256 and 1024, B 256), 64 x 2
# to 156 to 180 registers without (sm_90: 114 to 146; XL's 4 x 4 brick 116-125 before, 2 programs per SM, now 1).
_BWD_FP32_PATCHES = 64
# Below this many tokens per field element K, the backward reads dtok twice instead (_patch_embed_bwd_triton).
_TWO_PASS_TOKENS_PER_K = 4


def _bwd_config(g: int, s: int, d: int, k: int, dtype: torch.dtype) -> dict:
    """Tile of the fused backward for g canvas patches of s tokens: BLOCK_P patches x BLOCK_S token positions (patches
    first, so that dpos's share stays small), d in BLOCK_N chunks, K in BLOCK_K tiles."""
    wide = dtype != torch.float32
    for rows in _BWD_ROWS:
        block_p = min(rows, _pow2(g, 1, rows), rows if wide else _BWD_FP32_PATCHES)
        block_s = min(rows // block_p, _pow2(s, 1, rows))
        block_p = max(block_p, 16 // block_s)  # tl.dot needs 16 rows: pad with masked ones
        if 2 * (triton.cdiv(k, 4) * 4 + block_s + 1) <= _ATOMIC_SHARE * block_p * block_s:
            break
    # fp32: a [rows, 64] fp32 field tile and [rows, 32] dtok chunks spilled 16 to 730 bytes at 255 registers
    # (l = 2, 4, 8; Triton 3.6, sm_90 and sm_80); K tiles of 32 and d chunks of 16 keep it at 100 to 145 registers.
    # bf16 K tiles of 64 with d chunks of 64 (or 32) spilled 8 to 152 bytes at 255 registers on sm_80 (l = 2, K 40;
    # Triton 3.9's ptxas); chunks of 16 spill nowhere: 153 to 226 registers on sm_80, 126 to 190 on sm_90 (l = 8: 126
    # to 131, from 153; l = 2 and 4: 141 to 190, from 124 to 154, mostly one resident program of 8 warps per H100 SM
    # where there were two; not timed).
    block_k = _pow2(k, 16, 64 if wide else 32)
    return {
        "BLOCK_P": block_p,
        "BLOCK_S": block_s,
        "BLOCK_N": 64 if wide and block_k < 64 else 16,
        "BLOCK_K": block_k,
        "num_warps": 8 if block_p * block_s >= 128 else 4,
    }


# dweight reduces over all N * S rows: split the sequences, then the token positions, so that about this many programs
# run at once (the image-brick at B = 64 has 64 sequences of 256 tokens: 18 programs from sequences alone at d 1152).
_BWD_WEIGHT_PROGRAMS = 512
# Without input gradients the splits' shares go to fp32 atomics, which cost L2 traffic, not DRAM bytes: enough programs
# for two waves on 132 SMs at up to 6 resident programs each (its registers leave 3 to 5 on sm_90 at the model shapes).
_BWD_ATOMIC_PROGRAMS = 2 * 132 * 6
# The forward at 8 warps: at 4 its [64, 128] accumulator plus the gathered [64, 64] field tile (64-bit addresses)
# spilled 576 bytes at the image-brick's shape (sm_90, bf16, K tiles of 64 then); at 8, 254 registers and no spill.
_FWD_WARPS = 8


# Below this many forward programs, a program takes fewer sequences (down to tl.dot's 16 rows): XL's 16 x 16 brick at
# B 64 is 256 sequences of 4 tokens, 144 programs of 64 sequences, under one wave on 132 SMs.
_FWD_PROGRAMS = 512


def _fwd_block_m(n: int, programs_per_row_block: int, block_m: int) -> int:
    """Sequences per forward program: halve block_m while the grid is under _FWD_PROGRAMS (not under the interpreter,
    where each program costs milliseconds)."""
    while block_m > 16 and not interpreting() and triton.cdiv(n, block_m) * programs_per_row_block < _FWD_PROGRAMS:
        block_m //= 2
    return block_m


def _geometry(x, weight, brick_size, field_size, patch_index):
    b, c, h, w = x.shape
    nh, nw = h // brick_size, w // brick_size
    p = patch_index.shape[1] if patch_index is not None else nh * nw
    steps = (2.0 / (h - 1) if h > 1 else 0.0, 2.0 / (w - 1) if w > 1 else 0.0)  # linspace(-1, 1, 1) is [-1]
    return b, c, h, w, nh, nw, p, weight.shape[0], weight[0].numel(), brick_size // field_size, steps


def _inverse_patch_index(patch_index, num_patches):
    """(B * P_all,) int32: the sequence b * P + j of patch patch_index[b, j] of image b, -1 for patches not listed."""
    b, p = patch_index.shape
    flat = (torch.arange(b, device=patch_index.device)[:, None] * num_patches + patch_index).reshape(-1)
    inv = torch.full((b * num_patches,), -1, dtype=torch.int32, device=patch_index.device)
    return inv.scatter_(0, flat, torch.arange(b * p, dtype=torch.int32, device=patch_index.device))


@on_tensor_device
def _patch_embed_fwd_triton(x, prev, weight, bias, pos_embed, patch_index, brick_size, field_size):
    b, c, h, w, nh, nw, p, d, k, t, (row_step, col_step) = _geometry(x, weight, brick_size, field_size, patch_index)
    n = b * p
    out = new_output((n, t * t, d), x.dtype, x.device)
    if out.numel() == 0:
        return out
    cfg = _fwd_config(d, k, x.dtype)
    cfg["BLOCK_M"] = _fwd_block_m(n, t * t * triton.cdiv(d, cfg["BLOCK_N"]), cfg["BLOCK_M"])
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), t * t, triton.cdiv(d, cfg["BLOCK_N"]))
    _patch_embed_fwd_kernel[grid](
        x, prev if prev is not None else x, weight, bias if bias is not None else pos_embed, pos_embed,
        patch_index if patch_index is not None else x, out,
        n, p, nh, nw, d, k, c, h, w, x.stride(0), x.stride(1), x.stride(2), row_step, col_step,
        T=t, L=field_size, HAS_PREV=prev is not None, HAS_BIAS=bias is not None, HAS_INDEX=patch_index is not None,
        DOT_PRECISION=_dot_precision(x.dtype), **cfg, num_warps=_FWD_WARPS,
    )  # fmt: skip
    return out


@on_tensor_device
def _patch_embed_bwd_triton(dtokens, x, prev, weight, patch_index, brick_size, field_size, input_grad):
    """(dcanvas [1 or 2, B, C, H, W] or an empty tensor when not input_grad, dweight, dbias, dpos_embed).

    One fused kernel that reads dtok once and sums dweight with fp32 atomics, whose order varies from run to run.
    Under torch.use_deterministic_algorithms(True), the two kernels below instead, in a fixed order (as PyTorch does
    for index_add_ and scatter_add_). With few tokens against K (T < _TWO_PASS_TOKENS_PER_K * K: XL-U's 16 x 16 brick
    of 8 x 8 fields at B 64, T 1024, K 640), the fp32 accumulator's zeroing and final read (8 d K bytes) cost more than
    reading dtok twice (2 T d): the two kernels then, dweight in one piece, written in its own dtype. Without input
    gradients (the bottom brick: x_t needs none) only dweight, dbias and dpos: _patch_embed_bwd_weight_only."""
    args = (dtokens, x, prev, weight, patch_index, brick_size, field_size, input_grad)
    if torch.are_deterministic_algorithms_enabled():
        return _patch_embed_bwd_two_pass(*args)
    if not input_grad:
        return _patch_embed_bwd_weight_only(*args[:-1])
    if dtokens.shape[0] * dtokens.shape[1] < _TWO_PASS_TOKENS_PER_K * weight[0].numel():
        return _patch_embed_bwd_two_pass(*args, weight_programs=1)
    return _patch_embed_bwd_fused(*args[:-1])


def _patch_embed_bwd_fused(dtokens, x, prev, weight, patch_index, brick_size, field_size):
    """Every gradient, dx and dprev included (the fused kernel); without input gradients the weight kernel runs."""
    b, c, h, w, nh, nw, _, d, k, t, (row_step, col_step) = _geometry(x, weight, brick_size, field_size, patch_index)
    s, g, parts = t * t, b * nh * nw, 2 if prev is not None else 1
    dtype, device = weight.dtype, x.device
    dw_acc, dpos_acc, db_acc = _accumulators(d, k, s, device)
    dcanvas = new_output((parts, b, c, h, w), x.dtype, device)
    if g:
        cfg = _bwd_config(g, s, d, k, dtype)
        inv = _inverse_patch_index(patch_index, nh * nw) if patch_index is not None else x
        grid = (triton.cdiv(g, cfg["BLOCK_P"]) * triton.cdiv(k, cfg["BLOCK_K"]), triton.cdiv(s, cfg["BLOCK_S"]))
        _patch_embed_bwd_kernel[grid](
            dtokens, x, prev if prev is not None else x, weight, inv, dcanvas, dw_acc, dpos_acc, db_acc,
            g, nh * nw, nw, d, k, parts * c * field_size**2, c, h, w, x.stride(0), x.stride(1), x.stride(2),
            row_step, col_step, b * c * h * w,
            T=t, L=field_size, HAS_PREV=prev is not None, HAS_INDEX=patch_index is not None,
            ACC_STRIDE=dw_acc.shape[1], DOT_PRECISION=_dot_precision(dtype), **cfg,
        )  # fmt: skip
    return dcanvas, *_from_accumulators(dw_acc, dpos_acc, db_acc, weight)


def _accumulators(d: int, k: int, s: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The zeroed fp32 accumulators that atomics sum into: dweight [d, K rounded up to 4] (whole 16-byte atomics),
    dpos_embed [S, d], dbias [d]."""
    zeros = functools.partial(torch.zeros, dtype=torch.float32, device=device)
    return zeros((d, triton.cdiv(k, 4) * 4)), zeros((s, d)), zeros((d,))


def _from_accumulators(dw_acc, dpos_acc, db_acc, weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dweight, dbias, dpos_embed) in weight's dtype from the accumulators of _accumulators."""
    k, dtype = weight[0].numel(), weight.dtype
    # Contiguous, as the fake says: for fp32 with K not a multiple of 4 (l = 1) the slice would be a strided view, and
    # Inductor asserts the fake's strides (torch.compile + fp32 + l = 1 failed in the backward).
    dweight = dw_acc[:, :k].to(dtype).contiguous().reshape(weight.shape)
    return dweight, db_acc.to(dtype), dpos_acc.to(dtype)


def _bwd_atomic_bytes(grid, args) -> dict[str, int]:
    """L2 atomic traffic of one _patch_embed_bwd_kernel launch per accumulator (read by benchmarks/static.py): each of
    the grid's (patch block, token block) tiles adds a [d, K] fp32 share of dweight over its K tiles (K padded to
    ACC_STRIDE), BLOCK_S rows of dpos_embed and one of dbias."""
    tiles, d = grid[0] // triton.cdiv(args["K"], args["BLOCK_K"]) * grid[1], args["d"]
    dw = tiles * d * args["ACC_STRIDE"] * 4
    return {"DW_ACC": dw, "DPOS_ACC": tiles * args["BLOCK_S"] * d * 4, "DB_ACC": tiles * d * 4}


_patch_embed_bwd_kernel.atomic_bytes = _bwd_atomic_bytes


def _bwd_weight(dtokens, x, prev, weight, patch_index, brick_size, field_size, programs, atomic):
    """(dweight, dbias, dpos_embed) from _patch_embed_bwd_weight_kernel over about `programs` programs: the
    sequences split first, then the token positions. The splits' shares are fp32 partials summed in a fixed order, or
    with `atomic` added into fp32 accumulators in L2; a single split writes dweight itself, in its dtype."""
    b, c, h, w, nh, nw, p, d, k, t, (row_step, col_step) = _geometry(x, weight, brick_size, field_size, patch_index)
    n, s = b * p, t * t
    dtype, device = weight.dtype, x.device

    cfg = _bwd_weight_config(d, k, dtype)
    tiles = triton.cdiv(d, cfg["BLOCK_N"]) * triton.cdiv(k, cfg["BLOCK_K"])
    seq_blocks = max(1, triton.cdiv(n, cfg["BLOCK_M"]))
    split = max(1, min(seq_blocks, triton.cdiv(programs, tiles)))
    seq_per_split = triton.cdiv(seq_blocks, split) * cfg["BLOCK_M"]
    split = max(1, triton.cdiv(n, seq_per_split))
    token_splits = max(1, min(s, programs // (tiles * split)))  # rounded down: the sequence splits rounded up
    tokens_per_split = triton.cdiv(s, token_splits)
    token_splits = triton.cdiv(s, tokens_per_split)
    pieces = split * token_splits
    atomic = atomic and pieces > 1  # one piece is dweight itself, in its dtype: no fp32 buffer to write and read back
    if atomic:
        dw_part, dpos_part, db_acc = _accumulators(d, k, s, device)
    else:
        dw_part = new_output((pieces, d, k), torch.float32 if pieces > 1 else dtype, device)
        dpos_part = new_output((split, s, d), torch.float32, device)
        db_acc = None
    grid = (triton.cdiv(d, cfg["BLOCK_N"]), triton.cdiv(k, cfg["BLOCK_K"]), pieces)
    _patch_embed_bwd_weight_kernel[grid](
        dtokens, x, prev if prev is not None else x, patch_index if patch_index is not None else x, dw_part, dpos_part,
        db_acc if atomic else dpos_part,
        n, p, nh, nw, d, k, c, h, w, x.stride(0), x.stride(1), x.stride(2), row_step, col_step, seq_per_split,
        split, tokens_per_split,
        T=t, L=field_size, HAS_PREV=prev is not None, HAS_INDEX=patch_index is not None, ATOMIC=atomic,
        ACC_STRIDE=dw_part.shape[-1], DOT_PRECISION=_dot_precision(dtype), **cfg,
    )  # fmt: skip
    if atomic:
        return _from_accumulators(dw_part, dpos_part, db_acc, weight)
    dpos = dpos_part.sum(0) if split > 1 else dpos_part[0]  # (S, d) fp32
    dweight = (dw_part.sum(0).to(dtype) if pieces > 1 else dw_part[0]).view(weight.shape)
    return dweight, dpos.sum(0).to(dtype), dpos.to(dtype)


def _bwd_weight_atomic_bytes(grid, args) -> dict[str, int]:
    """L2 atomic traffic of one _patch_embed_bwd_weight_kernel launch (read by benchmarks/static.py): with ATOMIC,
    each of the grid's pieces adds a [d, K] fp32 share of dweight (K padded to ACC_STRIDE) and of dbias [d], and each
    sequence split its dpos_embed rows [S, d]; without, none."""
    if not args["ATOMIC"]:
        return {}
    d, pieces = args["d"], grid[2]
    return {"DW_PART": pieces * d * args["ACC_STRIDE"] * 4, "DPOS_PART": args["seq_splits"] * args["T"] ** 2 * d * 4,
            "DB_ACC": pieces * d * 4}  # fmt: skip


_patch_embed_bwd_weight_kernel.atomic_bytes = _bwd_weight_atomic_bytes


def _patch_embed_bwd_weight_only(dtokens, x, prev, weight, patch_index, brick_size, field_size):
    """dweight, dbias and dpos_embed alone (no input gradient): the weight kernel over every d and K tile, the tokens
    split for about _BWD_ATOMIC_PROGRAMS programs, the shares summed with fp32 atomics. Each split adds d x K once,
    whatever the d tiles, where the fused kernel's token tiles each add it: fewer atomics for more programs."""
    grads = _bwd_weight(
        dtokens, x, prev, weight, patch_index, brick_size, field_size, _BWD_ATOMIC_PROGRAMS, atomic=True
    )
    return dtokens.new_empty((0,)), *grads


def _patch_embed_bwd_two_pass(
    dtokens, x, prev, weight, patch_index, brick_size, field_size, input_grad, weight_programs=None
):
    """The deterministic backward: dweight/dpos over sequence and token splits (for about weight_programs programs,
    default _BWD_WEIGHT_PROGRAMS) into fp32 partials summed in order, then dx/dprev; dtok is read twice."""
    programs = weight_programs or _BWD_WEIGHT_PROGRAMS
    grads = _bwd_weight(dtokens, x, prev, weight, patch_index, brick_size, field_size, programs, atomic=False)
    if not input_grad:
        return dtokens.new_empty((0,)), *grads
    dtype = weight.dtype
    b, c, h, w, nh, nw, _, d, k, t, _ = _geometry(x, weight, brick_size, field_size, patch_index)
    parts = 2 if prev is not None else 1
    dcanvas = new_output((parts, b, c, h, w), x.dtype, x.device)
    g, k_img = b * nh * nw, parts * c * field_size**2
    cfg = _bwd_input_config(d, k_img, dtype)
    inv = _inverse_patch_index(patch_index, nh * nw) if patch_index is not None else x
    _patch_embed_bwd_input_kernel[(triton.cdiv(g, cfg["BLOCK_M"]), t * t, triton.cdiv(k_img, cfg["BLOCK_K"]))](
        dtokens, weight, inv, dcanvas,
        g, nh * nw, nw, d, k, k_img, c, h, w, b * c * h * w,
        T=t, L=field_size, HAS_INDEX=patch_index is not None, DOT_PRECISION=_dot_precision(dtype), **cfg,
    )  # fmt: skip
    return dcanvas, *grads


# ----------------------------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, with fake (meta) implementations for tracing, autograd through the backward op.


@torch.library.custom_op("lego::patch_embed_fwd", mutates_args=())
def _patch_embed_fwd_op(
    x: torch.Tensor,
    prev: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor,
    patch_index: torch.Tensor | None,
    brick_size: int,
    field_size: int,
) -> torch.Tensor:
    return _patch_embed_fwd_triton(x, prev, weight, bias, pos_embed, patch_index, brick_size, field_size)


@_patch_embed_fwd_op.register_fake
def _(x, prev, weight, bias, pos_embed, patch_index, brick_size, field_size):
    b, _, h, w = x.shape
    p = patch_index.shape[1] if patch_index is not None else (h // brick_size) * (w // brick_size)
    return x.new_empty((b * p, (brick_size // field_size) ** 2, weight.shape[0]))


@torch.library.custom_op("lego::patch_embed_bwd", mutates_args=())
def _patch_embed_bwd_op(
    dtokens: torch.Tensor,
    x: torch.Tensor,
    prev: torch.Tensor | None,
    weight: torch.Tensor,
    patch_index: torch.Tensor | None,
    brick_size: int,
    field_size: int,
    input_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _patch_embed_bwd_triton(dtokens, x, prev, weight, patch_index, brick_size, field_size, input_grad)


@_patch_embed_bwd_op.register_fake
def _(dtokens, x, prev, weight, patch_index, brick_size, field_size, input_grad):
    parts = 2 if prev is not None else 1
    dcanvas = x.new_empty((parts, *x.shape)) if input_grad else dtokens.new_empty((0,))
    s, d = dtokens.shape[1], weight.shape[0]
    return dcanvas, weight.new_empty(weight.shape), weight.new_empty((d,)), weight.new_empty((s, d))


def _patch_embed_setup_context(ctx, inputs, output):
    x, prev, weight, bias, _, patch_index, brick_size, field_size = inputs
    ctx.save_for_backward(x, prev, weight, patch_index)
    ctx.has_bias, ctx.brick_size, ctx.field_size = bias is not None, brick_size, field_size


def _patch_embed_backward(ctx, dtokens):
    x, prev, weight, patch_index = ctx.saved_tensors
    need_x, need_prev = ctx.needs_input_grad[0], prev is not None and ctx.needs_input_grad[1]
    dcanvas, dweight, dbias, dpos = _patch_embed_bwd_op(
        dtokens.contiguous(), x, prev, weight, patch_index, ctx.brick_size, ctx.field_size, need_x or need_prev
    )
    dx = dcanvas[0] if need_x else None
    dprev = dcanvas[1] if need_prev else None
    return dx, dprev, dweight, dbias if ctx.has_bias else None, dpos, None, None, None


_patch_embed_fwd_op.register_autograd(_patch_embed_backward, setup_context=_patch_embed_setup_context)


def patch_embed(
    x, prev, weight, bias, pos_embed, brick_size, field_size, patch_index=None, backend="auto", *, check_ids=True
):
    """Embed every l x l field of every r x r patch of [x, prev, coordinates] as one token.

    x [B, C, H, W]; prev [B, C, H, W] or None; weight [d, C', l, l] over channels (x, prev, row, col);
    bias [d]; pos_embed [S, d] with S = (r/l)^2; patch_index [B, P] flat patch ids or None.
    Returns tokens [N, S, d], N = B * P (P = all patches, row-major, when patch_index is None). float64 inputs run the
    reference on every backend (the kernels compute in fp32).
    The gradients of x and prev take each patch's field from its one sequence: a patch_index row must not repeat an id.
    With ``check_ids`` that and the ids' range are checked (one host sync on a GPU; not under torch.compile or CUDA
    graph capture): pass False for ids known to be valid (LegoModel draws its own).
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
            f"{c} image channels{' + ' + str(c) + ' previous-brick channels' if prev is not None else ''} "
            "+ 2 coordinates"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: weight has shape {tuple(weight.shape)}, no output channels; give it d >= 1 rows")
    d, s = weight.shape[0], (brick_size // field_size) ** 2
    if bias is not None:
        check_float(op, "bias", bias, 1)
    check_float(op, "pos_embed", pos_embed, 2)
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}; expected [{d}]")
    if tuple(pos_embed.shape) != (s, d):
        raise ValueError(f"{op}: pos_embed has shape {tuple(pos_embed.shape)}; expected [{s}, {d}]")
    check_same(op, "x", x, prev=prev, weight=weight, bias=bias, pos_embed=pos_embed)
    if patch_index is not None:
        check_index(op, "patch_index", patch_index, 2, x.device)
        if patch_index.shape[0] != b:
            raise ValueError(f"{op}: patch_index has {patch_index.shape[0]} rows for {b} images")
        if check_ids:
            check_patch_ids(op, patch_index, (h // brick_size) * (w // brick_size))
    backend = resolve_backend(backend, x.device, op, _IMPLEMENTED)
    if backend == "triton" and x.dtype != torch.float64:  # the kernels compute in fp32: float64 takes the reference
        return _patch_embed_fwd_op(
            x.contiguous(),
            prev.contiguous() if prev is not None else None,
            weight.contiguous(),
            bias.contiguous() if bias is not None else None,
            pos_embed.contiguous(),
            patch_index.contiguous() if patch_index is not None else None,
            brick_size,
            field_size,
        )
    return patch_embed_ref(x, prev, weight, bias, pos_embed, brick_size, field_size, patch_index)
