"""adaLN modulation, and the gated residual fused with the next adaLN.

Math, per sequence n of image b (b = n // (N / B), or ``image_index[n]``), token s, channel c:

    adaln_modulate:        y[n,s] = LN(x[n,s]) * (1 + scale[b]) + shift[b]
                           LN(v) = (v - mean(v)) / sqrt(var(v) + 1e-6)   (no affine; biased variance)
    gated_residual_adaln:  x_out[n,s] = x[n,s] + gate[b] * y[n,s]
                           h[n,s]     = adaln_modulate(x_out)[n,s]

Shapes: x, y [N, S, d]; shift, scale, gate [B, d] (one vector per IMAGE, never per patch); image_index [N] int.
The conditioning vectors are per image: a brick's N sequences (its patches) share their image's vectors.

Backward, per row with xhat = LN(v), rstd = 1 / sqrt(var(v) + 1e-6) and a = dh * (1 + scale[b]):

    dv        = rstd * (a - mean_c(a) - xhat * mean_c(a * xhat))      (the LayerNorm backward)
    dshift[b] = sum over image b's rows of dh;   dscale[b] = sum of dh * xhat
    gated:      g = dx_out + dv;  dx = g;  dy = gate[b] * g;  dgate[b] = sum of g * y

The fused backends (Triton here; "cuda" in ``lego_kernels._cuda``) keep the statistics and every sum in fp32 and
store in the input dtype. The per-image sums are deterministic (no atomics): each backward program walks rows of ONE
image; where an image has one program it writes the image's sums directly, where it has C > 1 (large images) each
writes an fp32 partial sum and a second small kernel adds each image's partials in a fixed order (the launchers'
comment says how C is chosen). With ``image_index`` the sequences are first sorted by image (a stable argsort on the
device, no host sync), so the same scheme holds for any mapping, images without sequences included (their gradients
are zero). ``image_index`` values
must lie in [0, B) (checked outside torch.compile: one host sync on a GPU). float64 inputs always take the reference
(the fused kernels accumulate in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lego_kernels._checks import check_float, check_image_ids, check_index, check_same
from lego_kernels._dispatch import interpreting, new_output, on_tensor_device, resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend still works; the kernels below are never launched

    class triton:  # a stand-in so that the @triton.jit definitions below still parse
        @staticmethod
        def jit(fn):
            return fn

    tl = None

_HAS_TRITON = tl is not None

EPS = 1e-6

# Backends besides "torch" that this file implements.
_IMPLEMENTED: tuple[str, ...] = ("cuda", "triton")


def _per_sequence(v: torch.Tensor, num_seq: int, image_index: torch.Tensor | None) -> torch.Tensor:
    """[B, d] per-image vectors -> [N, 1, d] per-sequence vectors (a view when image_index is None)."""
    if image_index is not None:
        return v[image_index].unsqueeze(1)
    b = v.shape[0]
    per_image = num_seq // b if b else 0  # no images: no sequences (checked by _check)
    return v[:, None, None, :].expand(b, per_image, 1, v.shape[1]).reshape(num_seq, 1, v.shape[1])


def adaln_modulate_ref(x, shift, scale, image_index=None):
    n = x.shape[0]
    y = F.layer_norm(x, (x.shape[-1],), eps=EPS)
    return y * (1 + _per_sequence(scale, n, image_index)) + _per_sequence(shift, n, image_index)


def gated_residual_adaln_ref(x, y, gate, shift=None, scale=None, image_index=None):
    x_out = x + _per_sequence(gate, x.shape[0], image_index) * y
    if shift is None:
        return x_out
    return x_out, adaln_modulate_ref(x_out, shift, scale, image_index)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels. Rows are the N * S tokens (x viewed as [N * S, d]); a program works on [BLOCK_R, BLOCK_D] tiles,
# BLOCK_D = next_power_of_2(d) with the tail masked, so one tile row holds a whole token and LN needs no second pass.


@triton.jit
def _adaln_fwd_kernel(
    X,  # shape (N * S, d): the input rows (gated: the residual stream x)
    Y,  # shape (N * S, d): the branch output y (HAS_RESIDUAL)
    GATE,  # shape (B, d) (HAS_RESIDUAL)
    SHIFT,  # shape (B, d) (HAS_NORM)
    SCALE,  # shape (B, d) (HAS_NORM)
    IMAGE_INDEX,  # shape (N,) int32/int64: the image of each sequence (HAS_INDEX)
    X_OUT,  # shape (N * S, d): x + gate * y (HAS_RESIDUAL)
    H,  # shape (N * S, d): the modulated output (HAS_NORM)
    MEAN,  # shape (N * S,) fp32 (HAS_NORM)
    RSTD,  # shape (N * S,) fp32 (HAS_NORM)
    num_rows,
    d,
    seq_len,  # S: rows per sequence
    seqs_per_image,  # N / B (without HAS_INDEX)
    stride_row,  # row stride of X, Y, X_OUT, H
    stride_vec,  # row stride of GATE, SHIFT, SCALE
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    # Row and sequence ids in int32 (the launcher keeps num_rows below 2^31): a 64-bit division is a subroutine call
    # that Triton 3.6 schedules between the loads, a second round trip and an 8-byte stack frame. Offsets stay int64.
    rows32 = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = rows32.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows32 < num_rows
    col_ok = cols < d
    mask = row_ok[:, None] & col_ok[None, :]
    seq = rows32 // seq_len
    if HAS_INDEX:  # noqa: SIM108 (a constexpr branch: Triton compiles only the side taken)
        img = tl.load(IMAGE_INDEX + seq, mask=row_ok, other=0).to(tl.int64)
    else:
        img = (seq // seqs_per_image).to(tl.int64)
    offs = rows[:, None] * stride_row + cols[None, :]
    vec_offs = img[:, None] * stride_vec + cols[None, :]

    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(GATE + vec_offs, mask=mask, other=0.0).to(tl.float32)
        x_out = (x + gate * y).to(X_OUT.dtype.element_ty)
        tl.store(X_OUT + offs, x_out, mask=mask)
        # Normalize the stored (rounded) x_out: the backward recomputes xhat from it.
        x = x_out.to(tl.float32)
    if HAS_NORM:
        mean = tl.sum(x, axis=1) / d
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / d
        rstd = tl.rsqrt(var + eps)
        shift = tl.load(SHIFT + vec_offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + vec_offs, mask=mask, other=0.0).to(tl.float32)
        h = xc * rstd[:, None] * (1.0 + scale) + shift
        tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _adaln_bwd_kernel(
    DH,  # shape (N * S, d): upstream gradient of the modulated output (HAS_NORM)
    DX_OUT,  # shape (N * S, d): upstream gradient of x_out (HAS_RESIDUAL)
    X,  # shape (N * S, d): the normalized rows (gated: x_out) (HAS_NORM)
    Y,  # shape (N * S, d): the branch output (HAS_RESIDUAL)
    GATE,  # shape (B, d) (HAS_RESIDUAL)
    SCALE,  # shape (B, d) (HAS_NORM)
    MEAN,  # shape (N * S,) fp32 (HAS_NORM)
    RSTD,  # shape (N * S,) fp32 (HAS_NORM)
    ORDER,  # shape (N,) int64: sequences sorted by image (HAS_INDEX)
    SEQ_START,  # shape (B,) int64: each image's first position in ORDER (HAS_INDEX)
    SEQ_COUNT,  # shape (B,) int64: each image's number of sequences (HAS_INDEX)
    DX,  # shape (N * S, d): gradient of x (gated: of the residual input x)
    DY,  # shape (N * S, d): gradient of y (HAS_RESIDUAL)
    SUM0,  # shape (B * C, d): dshift (HAS_NORM) or dgate, per program: the op's output when C = 1, else fp32 partials
    SUM1,  # shape (B * C, d): dscale (HAS_NORM)
    SUM2,  # shape (B * C, d): dgate (HAS_NORM and HAS_RESIDUAL)
    d,
    seq_len,  # S: rows per sequence
    seqs_per_image,  # N / B (without HAS_INDEX)
    chunks_per_image,  # C: programs per image
    stride_row,  # row stride of every (N * S, d) tensor
    stride_vec,  # row stride of GATE, SCALE
    stride_sum,  # row stride of SUM0, SUM1, SUM2
    HAS_RESIDUAL: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < d
    # Program pid walks chunk pid % C of image pid // C: rows [row_lo, row_hi) of the image's rows in image order (with
    # HAS_INDEX, the rows of its sequences sorted by image). C equal chunks per image; a chunk may cut a sequence.
    img = pid // chunks_per_image
    chunk = pid % chunks_per_image
    if HAS_INDEX:
        first = tl.load(SEQ_START + img) * seq_len
        count = tl.load(SEQ_COUNT + img) * seq_len
    else:
        first = img * seqs_per_image * seq_len
        count = seqs_per_image * seq_len
    row_lo = first + chunk * count // chunks_per_image
    row_hi = first + (chunk + 1) * count // chunks_per_image

    # One image per program: its vectors are loaded once.
    vec = img * stride_vec + cols
    # The per-image sums stay [BLOCK_R, BLOCK_D] tiles through the loop and are reduced over rows once at the end:
    # a column sum per tile would cross warps (shared memory and a barrier) between one tile's loads and the next's.
    if HAS_NORM:
        w = 1.0 + tl.load(SCALE + vec, mask=col_ok, other=0.0).to(tl.float32)
        acc_shift = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        acc_scale = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    if HAS_RESIDUAL:
        gate = tl.load(GATE + vec, mask=col_ok, other=0.0).to(tl.float32)
        acc_gate = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)

    for start in range(row_lo, row_hi, BLOCK_R):
        pos = start + tl.arange(0, BLOCK_R)
        row_ok = pos < row_hi
        if HAS_INDEX:
            seq = tl.load(ORDER + pos // seq_len, mask=row_ok, other=0)
            rows = seq * seq_len + pos % seq_len
        else:
            rows = pos
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * stride_row + cols[None, :]
        # Every load of the tile first, then the row reductions: the loads all go out together instead of dx_out and
        # y waiting for the reductions' shuffles.
        if HAS_RESIDUAL:
            dx_out = tl.load(DX_OUT + offs, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_NORM:
            dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            a = dh * w[None, :]
            c1 = tl.sum(a * xhat, axis=1) / d
            c2 = tl.sum(a, axis=1) / d
            g = (a - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            acc_shift += dh
            acc_scale += dh * xhat
        else:
            g = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        if HAS_RESIDUAL:
            g += dx_out
            tl.store(DY + offs, (gate[None, :] * g).to(DY.dtype.element_ty), mask=mask)
            acc_gate += g * y
        tl.store(DX + offs, g.to(DX.dtype.element_ty), mask=mask)

    # Row pid of the sums: with C = 1 that is the image's own dshift/dscale/dgate, cast to their dtype (no partials, no
    # second kernel); with C > 1 an fp32 partial. Every program writes its row, zeros included (an image without rows).
    out = pid * stride_sum + cols
    if HAS_NORM:
        tl.store(SUM0 + out, tl.sum(acc_shift, axis=0).to(SUM0.dtype.element_ty), mask=col_ok)
        tl.store(SUM1 + out, tl.sum(acc_scale, axis=0).to(SUM1.dtype.element_ty), mask=col_ok)
        if HAS_RESIDUAL:
            tl.store(SUM2 + out, tl.sum(acc_gate, axis=0).to(SUM2.dtype.element_ty), mask=col_ok)
    else:
        tl.store(SUM0 + out, tl.sum(acc_gate, axis=0).to(SUM0.dtype.element_ty), mask=col_ok)


@triton.jit
def _reduce_partials_kernel(
    PARTIAL,  # shape (K, B * C, d) fp32: the backward's per-program sums, C consecutive programs per image
    OUT0,  # shape (B, d): the sum of kind 0 over each image's programs
    OUT1,  # shape (B, d): kind 1 (K > 1)
    OUT2,  # shape (B, d): kind 2 (K > 2)
    d,
    chunks_per_image,  # C
    stride_partial_kind,
    stride_partial_program,
    stride_out,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    img = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    kind = tl.program_id(2)
    col_ok = cols < d
    first = img * chunks_per_image
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    base = PARTIAL + kind.to(tl.int64) * stride_partial_kind
    # The image's partials in program order, the same order on every run: deterministic.
    for p0 in range(0, chunks_per_image, BLOCK_P):
        progs = p0 + tl.arange(0, BLOCK_P)
        mask = (progs < chunks_per_image)[:, None] & col_ok[None, :]
        tile = tl.load(base + (first + progs)[:, None] * stride_partial_program + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(tile, axis=0)
    offs = img * stride_out + cols
    if kind == 0:
        tl.store(OUT0 + offs, acc.to(OUT0.dtype.element_ty), mask=col_ok)
    elif kind == 1:
        tl.store(OUT1 + offs, acc.to(OUT1.dtype.element_ty), mask=col_ok)
    else:
        tl.store(OUT2 + offs, acc.to(OUT2.dtype.element_ty), mask=col_ok)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers. Same signatures and return conventions as lego_kernels._cuda, so the custom ops can call either.
# Launch sizes come from plain heuristics (autotuning does not run under the interpreter); the tests shrink these
# numbers to make small shapes use several tiles per program and several programs per image.

_TILE_ELEMENTS = 4096  # one [BLOCK_R, BLOCK_D] tile: 16 fp32 per thread and tensor at 8 warps

# The backward's grid. dshift/dscale/dgate are sums over the rows of ONE image, and the LayerNorm backward reduces each
# row over all of d: a program owns whole rows of one image. C programs per image (C equal chunks of its rows) each
# write an fp32 partial per sum, 2 * K * d * 4 bytes per program written and read back by _reduce_partials_kernel (K =
# 2 or 3 sums); C = 1 needs none: one program per image writes the image's sums directly. C is the most programs per
# image that keeps the partials within _PARTIAL_SHARE of the op's minimum bytes (the 1.1x bound of
# benchmarks/static.py), up to _BWD_PROGRAMS in all; where that is under 2, C = 1. An image of 16 rows at d 1152
# (LEGO-XL-U-32's 16 x 16 brick) gets one program (two programs' partials would add 31% to its bytes, 24% gated); one
# of 64 rows, 2 (modulate) or 3 (gated); one of 256 rows, 9 or 12 at B 64.
_BWD_PROGRAMS = 1056  # two waves of 4 resident 8-warp programs on 132 SMs (H100/H200)
_PARTIAL_SHARE = 0.1


# The forward's tile holds one 16-byte vector per thread and tensor (8 bf16 or 4 fp32), at 4 to 16 warps: ptxas then
# issues the gated forward's loads of x, y and gate back to back, one round trip to memory before its first store
# (benchmarks/static.py). With two vectors per thread (two rows of d 1024 at 4 warps, the tile before) Triton 3.6
# converted the first row's values before loading the second's: two round trips. One row per program at d >= 1024 also
# gives the grid a program per row (LEGO-S's 16 x 16 brick at B 64 once ran 512 programs of 8 rows, under one wave).
_FWD_VECTOR_BYTES = 16


def _tile(d: int, num_rows: int, backward: bool = False, element_size: int = 4) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_R, num_warps) for rows of width d of ``element_size``-byte values (backward: num_rows = the rows
    of one program). The backward's tiles are half of _TILE_ELEMENTS: it holds four input tiles (dh, x, dx_out, y)
    and three running sums, 8 fp32 each per thread at 8 warps."""
    block_d = triton.next_power_of_2(d)
    if backward or interpreting():  # (the interpreter: few big tiles, each program costs milliseconds)
        elements = _TILE_ELEMENTS // 2 if backward else _TILE_ELEMENTS
        block_r = max(1, min(elements // block_d, triton.next_power_of_2(max(num_rows, 1))))
        return block_d, block_r, 8 if block_r * block_d >= elements else 4
    per_thread = _FWD_VECTOR_BYTES // element_size
    num_warps = min(16, max(4, block_d // (32 * per_thread)))
    block_r = max(1, min(num_warps * 32 * per_thread // block_d, triton.next_power_of_2(max(num_rows, 1))))
    return block_d, block_r, num_warps


def _bwd_chunks(num_images: int, num_rows: int, partial_bytes: int, op_bytes: int) -> int:
    """C, the backward's programs per image (see _BWD_PROGRAMS): the most that keep num_images * C partials of
    partial_bytes within _PARTIAL_SHARE * op_bytes, at most _BWD_PROGRAMS programs and one row each; 1 under 2."""
    by_bytes = int(_PARTIAL_SHARE * op_bytes) // (num_images * partial_bytes)
    chunks = min(by_bytes, triton.cdiv(_BWD_PROGRAMS, num_images), triton.cdiv(num_rows, num_images))
    return chunks if chunks >= 2 else 1


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@on_tensor_device
def _fwd(x, y, gate, shift, scale, image_index):
    """Shared launcher: y/gate given -> the gated residual; shift/scale given -> the modulated LN."""
    n, s, d = x.shape
    num_rows = n * s
    has_residual, has_norm = y is not None, shift is not None
    num_images = (shift if has_norm else gate).shape[0]
    x_out = new_output(x.shape, x.dtype, x.device) if has_residual else None
    h = new_output(x.shape, x.dtype, x.device) if has_norm else None
    mean = new_output((num_rows,), torch.float32, x.device) if has_norm else None
    rstd = new_output((num_rows,), torch.float32, x.device) if has_norm else None
    if num_rows == 0:
        return x_out, h, mean, rstd
    block_d, block_r, num_warps = _tile(d, num_rows, element_size=x.element_size())
    if num_rows + block_r > 2**31:  # the kernel's row ids are int32, the last tile's past the end included
        raise ValueError(f"adaln: {n} x {s} = {num_rows} token rows; the Triton kernel takes at most 2^31 - {block_r}")
    _adaln_fwd_kernel[(triton.cdiv(num_rows, block_r),)](
        x,
        y if has_residual else x,
        gate if has_residual else x,
        shift if has_norm else x,
        scale if has_norm else x,
        image_index if image_index is not None else x,
        x_out if has_residual else x,
        h if has_norm else x,
        mean if has_norm else x,
        rstd if has_norm else x,
        num_rows,
        d,
        s,
        max(n // num_images, 1),
        d,
        (shift if has_norm else gate).stride(0),
        EPS,
        HAS_RESIDUAL=has_residual,
        HAS_NORM=has_norm,
        HAS_INDEX=image_index is not None,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return x_out, h, mean, rstd


@on_tensor_device
def _bwd(dh, dx_out, x, y, gate, scale, image_index, mean, rstd, vec_dtype, shift=None):
    """Shared launcher: returns (dx, dy, [dshift, dscale] (HAS_NORM) + [dgate] (HAS_RESIDUAL)). ``shift`` (an input of
    adaln_modulate_bwd that the kernels do not read) only counts toward the op's minimum bytes."""
    n, s, d = x.shape if x is not None else y.shape
    ref = x if x is not None else y
    num_rows = n * s
    has_residual, has_norm = y is not None, scale is not None
    num_images = (scale if has_norm else gate).shape[0]
    vec_stride = (scale if has_norm else gate).stride(0)
    kinds = 2 * has_norm + has_residual
    device = ref.device
    dx = new_output(ref.shape, (dh if has_norm else dx_out).dtype, device)
    dy = new_output(ref.shape, y.dtype, device) if has_residual else None
    if num_rows == 0:
        return dx, dy, [torch.zeros(num_images, d, dtype=vec_dtype, device=device) for _ in range(kinds)]
    sums = [new_output((num_images, d), vec_dtype, device) for _ in range(kinds)]

    # The op's minimum bytes (inputs read once, outputs written once) bound what the fp32 partials may add.
    op_bytes = _nbytes(dh, dx_out, x, y, gate, scale, shift, image_index, mean, rstd, dx, dy, *sums)
    chunks = _bwd_chunks(num_images, num_rows, 2 * kinds * d * 4, op_bytes)
    num_programs = num_images * chunks
    block_d, block_r, num_warps = _tile(d, triton.cdiv(num_rows, num_programs), backward=True)
    if image_index is None:
        seqs_per_image = n // num_images
        order = seq_start = seq_count = ref
    else:
        # Sequences sorted by image, on the device without a host sync (a stable sort: a fixed order, so deterministic
        # sums); each image's run of rows is cut into the same C chunks, an image without sequences into empty ones.
        seqs_per_image = 1
        sorted_image, order = torch.sort(image_index.long(), stable=True)
        images = torch.arange(num_images, device=device)
        seq_start = torch.searchsorted(sorted_image, images)
        seq_count = torch.searchsorted(sorted_image, images, right=True) - seq_start
    # C = 1: the kernel writes the sums themselves; C > 1: fp32 partials, row p for program p, added up below.
    partial = new_output((kinds, num_programs, d), torch.float32, device) if chunks > 1 else None
    out = list(partial.unbind(0)) if chunks > 1 else sums
    out = out + [out[-1]] * (3 - kinds)  # the kernel takes three sum pointers
    _adaln_bwd_kernel[(num_programs,)](
        dh if has_norm else dx_out,
        dx_out if has_residual else dh,
        x if has_norm else y,
        y if has_residual else x,
        gate if has_residual else scale,
        scale if has_norm else gate,
        mean if has_norm else ref,
        rstd if has_norm else ref,
        order,
        seq_start,
        seq_count,
        dx,
        dy if has_residual else dx,
        *out,
        d,
        s,
        seqs_per_image,
        chunks,
        d,
        vec_stride,
        out[0].stride(0),
        HAS_RESIDUAL=has_residual,
        HAS_NORM=has_norm,
        HAS_INDEX=image_index is not None,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    if chunks > 1:
        block_dc = min(block_d, 256)
        _reduce_partials_kernel[(num_images, triton.cdiv(d, block_dc), kinds)](
            partial,
            sums[0],
            sums[min(1, kinds - 1)],
            sums[min(2, kinds - 1)],
            d,
            chunks,
            partial.stride(0),
            partial.stride(1),
            d,
            BLOCK_P=min(triton.next_power_of_2(chunks), 16),
            BLOCK_D=block_dc,
            num_warps=4,
        )
    return dx, dy, sums


def adaln_modulate_fwd(x, shift, scale, image_index):
    """Triton: -> (y, mean, rstd); x [N, S, d] contiguous, shift/scale [B, d], mean/rstd fp32 [N * S]."""
    _, y, mean, rstd = _fwd(x, None, None, shift, scale, image_index)
    return y, mean, rstd


def adaln_modulate_bwd(dy, x, shift, scale, image_index, mean, rstd):
    """Triton: -> (dx, dshift, dscale); dshift/dscale in shift's dtype."""
    dx, _, (dshift, dscale) = _bwd(dy, None, x, None, None, scale, image_index, mean, rstd, shift.dtype, shift)
    return dx, dshift, dscale


def gated_residual_adaln_fwd(x, y, gate, shift, scale, image_index):
    """Triton: -> (x_out, h, mean, rstd) in one pass over x and y."""
    return _fwd(x, y, gate, shift, scale, image_index)


def gated_residual_adaln_bwd(dx_out, dh, x_out, y, gate, scale, image_index, mean, rstd):
    """Triton: -> (dx, dy, dgate, dshift, dscale)."""
    dx, dy, (dshift, dscale, dgate) = _bwd(dh, dx_out, x_out, y, gate, scale, image_index, mean, rstd, gate.dtype)
    return dx, dy, dgate, dshift, dscale


def gated_residual_fwd(x, y, gate, image_index):
    """Triton: the gated residual alone (nothing to modulate after it) -> x_out."""
    return _fwd(x, y, gate, None, None, image_index)[0]


def gated_residual_bwd(dx_out, y, gate, image_index):
    """Triton: -> (dx, dy, dgate)."""
    dx, dy, (dgate,) = _bwd(None, dx_out, None, y, gate, None, image_index, None, None, gate.dtype)
    return dx, dy, dgate


# ---------------------------------------------------------------------------------------------------------------------
# Custom ops (namespace lego): opaque to torch.compile, with fake (meta) implementations and registered autograd.


def _impl(backend: str, name: str):
    """The launcher ``name`` of ``backend``: lego_kernels._cuda for "cuda", the Triton launchers above otherwise."""
    if backend == "cuda":
        from lego_kernels import _cuda

        return getattr(_cuda, name)
    return globals()[name]


def _grad_or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad.contiguous()


@torch.library.custom_op("lego::adaln_modulate_fwd", mutates_args=())
def _adaln_modulate_fwd_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, image_index: torch.Tensor | None, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl(backend, "adaln_modulate_fwd")(x, shift, scale, image_index)


@_adaln_modulate_fwd_op.register_fake
def _(x, shift, scale, image_index, backend):
    stats = x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("lego::adaln_modulate_bwd", mutates_args=())
def _adaln_modulate_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    image_index: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl(backend, "adaln_modulate_bwd")(dy, x, shift, scale, image_index, mean, rstd)


@_adaln_modulate_bwd_op.register_fake
def _(dy, x, shift, scale, image_index, mean, rstd, backend):
    return torch.empty_like(x), torch.empty_like(shift), torch.empty_like(shift)


def _adaln_modulate_setup(ctx, inputs, output):
    x, shift, scale, image_index, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, shift, scale, image_index, mean, rstd)
    ctx.backend = backend


def _adaln_modulate_backward(ctx, dy, _dmean, _drstd):
    x, shift, scale, image_index, mean, rstd = ctx.saved_tensors
    dy = _grad_or_zeros(dy, x)
    dx, dshift, dscale = _adaln_modulate_bwd_op(dy, x, shift, scale, image_index, mean, rstd, ctx.backend)
    return dx, dshift, dscale, None, None


_adaln_modulate_fwd_op.register_autograd(_adaln_modulate_backward, setup_context=_adaln_modulate_setup)


@torch.library.custom_op("lego::gated_residual_adaln_fwd", mutates_args=())
def _gated_residual_adaln_fwd_op(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    image_index: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl(backend, "gated_residual_adaln_fwd")(x, y, gate, shift, scale, image_index)


@_gated_residual_adaln_fwd_op.register_fake
def _(x, y, gate, shift, scale, image_index, backend):
    stats = x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)
    return torch.empty_like(x), torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("lego::gated_residual_adaln_bwd", mutates_args=())
def _gated_residual_adaln_bwd_op(
    dx_out: torch.Tensor,
    dh: torch.Tensor,
    x_out: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    scale: torch.Tensor,
    image_index: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl(backend, "gated_residual_adaln_bwd")(dx_out, dh, x_out, y, gate, scale, image_index, mean, rstd)


@_gated_residual_adaln_bwd_op.register_fake
def _(dx_out, dh, x_out, y, gate, scale, image_index, mean, rstd, backend):
    return (
        torch.empty_like(x_out),
        torch.empty_like(y),
        torch.empty_like(gate),
        torch.empty_like(gate),
        torch.empty_like(gate),
    )


def _gated_residual_adaln_setup(ctx, inputs, output):
    _, y, gate, _, scale, image_index, backend = inputs
    x_out, _, mean, rstd = output
    ctx.save_for_backward(x_out, y, gate, scale, image_index, mean, rstd)
    ctx.backend = backend


def _gated_residual_adaln_backward(ctx, dx_out, dh, _dmean, _drstd):
    x_out, y, gate, scale, image_index, mean, rstd = ctx.saved_tensors
    dx_out, dh = _grad_or_zeros(dx_out, x_out), _grad_or_zeros(dh, x_out)
    dx, dy, dgate, dshift, dscale = _gated_residual_adaln_bwd_op(
        dx_out, dh, x_out, y, gate, scale, image_index, mean, rstd, ctx.backend
    )
    return dx, dy, dgate, dshift, dscale, None, None


_gated_residual_adaln_fwd_op.register_autograd(
    _gated_residual_adaln_backward, setup_context=_gated_residual_adaln_setup
)


# The gated residual without a following adaLN (the last one of a stack): Triton only, for every fused backend (the
# CUDA extension has no kernel for it; it is one elementwise pass).
@torch.library.custom_op("lego::gated_residual_fwd", mutates_args=())
def _gated_residual_fwd_op(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, image_index: torch.Tensor | None
) -> torch.Tensor:
    return gated_residual_fwd(x, y, gate, image_index)


@_gated_residual_fwd_op.register_fake
def _(x, y, gate, image_index):
    return torch.empty_like(x)


@torch.library.custom_op("lego::gated_residual_bwd", mutates_args=())
def _gated_residual_bwd_op(
    dx_out: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, image_index: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return gated_residual_bwd(dx_out, y, gate, image_index)


@_gated_residual_bwd_op.register_fake
def _(dx_out, y, gate, image_index):
    return torch.empty_like(y), torch.empty_like(y), torch.empty_like(gate)


def _gated_residual_setup(ctx, inputs, output):
    _, y, gate, image_index = inputs
    ctx.save_for_backward(y, gate, image_index)


def _gated_residual_backward(ctx, dx_out):
    y, gate, image_index = ctx.saved_tensors
    dx, dy, dgate = _gated_residual_bwd_op(_grad_or_zeros(dx_out, y), y, gate, image_index)
    return dx, dy, dgate, None


_gated_residual_fwd_op.register_autograd(_gated_residual_backward, setup_context=_gated_residual_setup)


# ---------------------------------------------------------------------------------------------------------------------
# Public functions.


def _check(op, x, image_index, **per_image):
    check_float(op, "x", x, 3)
    if x.shape[2] == 0:
        raise ValueError(f"{op}: x has hidden size 0 (shape {tuple(x.shape)}); there is nothing to normalize")
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
        if (x.shape[0] % num_images) if num_images else x.shape[0]:
            raise ValueError(
                f"{op}: x has {x.shape[0]} sequences, not a multiple of the {num_images} images; "
                "pass image_index to say which image each sequence belongs to"
            )
    else:
        check_index(op, "image_index", image_index, 1, x.device)
        if image_index.shape[0] != x.shape[0]:
            raise ValueError(f"{op}: image_index has {image_index.shape[0]} entries for {x.shape[0]} sequences")
        check_image_ids(op, image_index, batch.pop())


def adaln_modulate(x, shift, scale, image_index=None, backend="auto"):
    """LayerNorm (eps 1e-6, no affine) then per-image modulation: ``LN(x) * (1 + scale[b]) + shift[b]``.

    x [N, S, d]; shift, scale [B, d]; image_index [N] (optional; default N/B consecutive sequences per image).
    Returns y [N, S, d] in x's dtype (statistics in fp32 on the fused backends).
    """
    _check("adaln_modulate", x, image_index, shift=shift, scale=scale)
    backend = resolve_backend(backend, x.device, "adaln_modulate", _IMPLEMENTED)
    if backend == "torch" or x.dtype == torch.float64:
        return adaln_modulate_ref(x, shift, scale, image_index)
    image_index = None if image_index is None else image_index.long().contiguous()
    y, _, _ = _adaln_modulate_fwd_op(x.contiguous(), shift.contiguous(), scale.contiguous(), image_index, backend)
    return y


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
    if backend == "torch" or x.dtype == torch.float64 or (shift is None and not _HAS_TRITON):
        return gated_residual_adaln_ref(x, y, gate, shift, scale, image_index)
    x, y, gate = x.contiguous(), y.contiguous(), gate.contiguous()
    image_index = None if image_index is None else image_index.long().contiguous()
    if shift is None:
        return _gated_residual_fwd_op(x, y, gate, image_index)
    x_out, h, _, _ = _gated_residual_adaln_fwd_op(
        x, y, gate, shift.contiguous(), scale.contiguous(), image_index, backend
    )
    return x_out, h
