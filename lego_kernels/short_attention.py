"""Attention over many short sequences: a patch-brick's patches are 1 to 16 tokens each.

Math, per sequence n and head h (d = H * d_head):

    q, k, v = qkv[n, :, 0:d], qkv[n, :, d:2d], qkv[n, :, 2d:3d]   each split into H heads of d_head, heads contiguous
    o[n, :, h] = softmax(q_h k_h^T / sqrt(d_head)) v_h
    lse[n, h, i] = log(sum_j exp(q_h[i] . k_h[j] / sqrt(d_head)))   (saved by the forward for the backward)

qkv [N, S, 3d] exactly as the QKV linear produces it; o [N, S, d] ready for the output projection.
Short sequences (S <= MAX_SHORT_SPAN) go to the fused kernels; longer ones (the image-brick) go to PyTorch's
scaled_dot_product_attention, or flash-attn where it is installed and the tensors qualify.

Backward, flash-attention style (Dao et al. 2022), recomputing P from q, k and lse instead of saving it:

    P = exp(q k^T / sqrt(d_head) - lse);  dv = P^T do;  dP = do v^T;  D_i = rowsum(do * o)_i
    dS = P * (dP - D);  dq = dS k / sqrt(d_head);  dk = dS^T q / sqrt(d_head)

and dqkv [N, S, 3d] comes back in qkv's packed layout, so the QKV linear's backward takes it as it is.

The kernels: a sequence is too short for tensor cores (a tl.dot needs tiles of 16), so scores and outputs are
broadcast products reduced with tl.sum in registers. A program takes BLOCK_P (sequence, head) pairs, head fastest, so
that a program reads BLOCK_P * d_head contiguous columns of each token's row and neighbouring programs the next ones.
It loads q, k and v of its pairs as whole [BLOCK_P, BLOCK_S, BLOCK_DH] tiles, all before the first is used (the
backward also do and o), and walks over the S keys with an online softmax (tl.static_range), picking key j out of the
k and v tiles with a masked sum over the token axis: that keeps every tile in one register layout, where loading
key j's row inside the loop needed a layout conversion (shared memory and a barrier) before key j + 1's loads could
issue: 4 dependent DRAM round trips per program at S = 4 on Triton 3.9. The forward at S > 8 still loads key rows in
the loop (PRELOAD_KV): there the tiles span warps along S and the pick would cost a shared-memory reduction per key.
BLOCK_DH is d_head rounded up to a power of two, so XL's 72 leaves 56 of 128 lanes masked: registers and issue
slots, not memory traffic. Compiled for sm_90 (Triton 3.9, bf16, d_head 72, the launch configuration below, JIT
specialization; read with cuobjdump): S = 4 forward 72 registers, backward 74, no spills, every global load before
the first barrier; S = 16 forward 79, backward 78. LEGO-S's d_head 64, S = 4 forward: 48 registers, one round trip
(2 pairs per program; at 4 pairs on 4 warps it had two, see _launch_config). Not yet timed on a GPU.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

from lego_kernels._checks import check_float
from lego_kernels._dispatch import exact_fp32, interpreting, new_output, on_tensor_device, resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: without it only the torch backend exists and these kernels never run.
    triton = tl = None

try:
    from flash_attn import flash_attn_qkvpacked_func
except ImportError:  # optional (an sdist that needs a CUDA torch and long compiling); SDPA runs in its place
    flash_attn_qkvpacked_func = None

MAX_SHORT_SPAN = 16

# Backends besides "torch" that this file implements.
_IMPLEMENTED: tuple[str, ...] = ("cuda", "triton")


def _split_heads(qkv: torch.Tensor, num_heads: int):
    """qkv [N, S, 3d] -> q, k, v, each a (N, H, S, d_head) view.

    Unbinding dim 2 of the [N, S, 3, H, d_head] view, not dim 0 of a permuted one: autograd then stacks dq, dk, dv
    straight into qkv's layout, where the permuted split stacked them as [3, N, H, S, d_head] and cloned the whole
    [N, S, 3d] gradient once more to give it qkv's layout (tests/test_short_attention.py traces this).
    """
    n, s, three_d = qkv.shape
    d_head = three_d // (3 * num_heads)
    q, k, v = qkv.view(n, s, 3, num_heads, d_head).unbind(2)  # each (N, S, H, d_head)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # each (N, H, S, d_head)


def short_attention_ref(qkv, num_heads):
    """The textbook formula in qkv's dtype (use fp64 inputs for a ground truth)."""
    q, k, v = _split_heads(qkv, num_heads)
    with exact_fp32(qkv.dtype):  # fp32 stays fp32 whatever the user's TF32 setting: the reference
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (N, H, S, S)
        o = scores.softmax(dim=-1) @ v  # (N, H, S, d_head)
    return o.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)  # (N, S, d)


def _sdpa(qkv, num_heads):
    q, k, v = _split_heads(qkv, num_heads)
    o = F.scaled_dot_product_attention(q, k, v)  # (N, H, S, d_head)
    if not q.is_cuda:  # PyTorch's CPU kernel returns zeros for a query row holding a NaN; the formula gives NaN
        o = o + 0 * q.sum(-1, keepdim=True)  # (exactly o where q is finite)
    return o.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)  # (N, S, d)


def _long_attention(qkv, num_heads):
    """S > MAX_SHORT_SPAN: flash-attn when installed and the tensors qualify, else SDPA.

    flash-attn's packed entry point reads qkv viewed as [N, S, 3, H, d_head], our layout exactly, and its backward
    writes dqkv packed the same way: no copies either way. Untested here (no flash-attn on the machines this was
    written on); SDPA is what the tests cover.
    """
    n, s, three_d = qkv.shape
    d_head = three_d // (3 * num_heads)
    if (
        flash_attn_qkvpacked_func is not None
        and qkv.is_cuda
        and qkv.dtype in (torch.float16, torch.bfloat16)
        and d_head % 8 == 0
        and d_head <= 256
    ):
        o = flash_attn_qkvpacked_func(qkv.contiguous().view(n, s, 3, num_heads, d_head))  # (N, S, H, d_head)
        return o.reshape(n, s, three_d // 3)  # (N, S, d)
    return _sdpa(qkv, num_heads)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels


def _jit(fn):
    return fn if triton is None else triton.jit(fn)


@_jit
def _short_attention_fwd_kernel(
    QKV,  # shape (N, S, 3 * NUM_HEADS * HEAD_DIM)
    O,  # shape (N, S, NUM_HEADS * HEAD_DIM)
    LSE,  # shape (N, NUM_HEADS, S), fp32, contiguous
    num_pairs,  # N * NUM_HEADS
    stride_qkv_n,
    stride_qkv_s,
    stride_o_n,
    stride_o_s,
    sm_scale,  # 1 / sqrt(HEAD_DIM)
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SEQ: tl.constexpr,  # S, at most 16: the key loop is unrolled
    BLOCK_P: tl.constexpr,  # (sequence, head) pairs per program
    BLOCK_S: tl.constexpr,  # next power of two >= SEQ
    BLOCK_DH: tl.constexpr,  # next power of two >= HEAD_DIM
    PRELOAD_KV: tl.constexpr = True,  # load k and v as whole tiles up front (see below)
):
    D: tl.constexpr = NUM_HEADS * HEAD_DIM
    pairs = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # head fastest
    seq_idx = pairs // NUM_HEADS
    head = pairs % NUM_HEADS
    rows = tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_DH)
    pair_ok = pairs < num_pairs
    row_ok = rows < SEQ
    col_ok = cols < HEAD_DIM

    qkv_base = seq_idx * stride_qkv_n + head * HEAD_DIM  # (BLOCK_P,) start of the pair's q in token 0
    tile = qkv_base[:, None, None] + rows[None, :, None] * stride_qkv_s + cols[None, None, :]
    tile_mask = pair_ok[:, None, None] & row_ok[None, :, None] & col_ok[None, None, :]
    # PRELOAD_KV (S <= 8): q, k and v of every pair, each (BLOCK_P, BLOCK_S, BLOCK_DH) in one layout, so all of the
    # program's loads go out before any is used. Longer sequences load key j's row in the loop instead: their tiles
    # span several warps along S, where picking a key out of a tile costs a shared-memory reduction per key.
    q = tl.load(QKV + tile, mask=tile_mask, other=0.0).to(tl.float32) * sm_scale
    if PRELOAD_KV:
        k = tl.load(QKV + D + tile, mask=tile_mask, other=0.0).to(tl.float32)
        v = tl.load(QKV + 2 * D + tile, mask=tile_mask, other=0.0).to(tl.float32)
        # A barrier right after the loads: no global load moves across it, and it does not wait for them, so all three
        # are in flight before the first use. Without it Triton 3.6's schedule issued q's load after k's first use
        # (k's registers reused): two dependent round trips.
        tl.debug_barrier()

    m = tl.full((BLOCK_P, BLOCK_S), float("-inf"), tl.float32)  # running max of the scores
    l_sum = tl.zeros((BLOCK_P, BLOCK_S), tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros((BLOCK_P, BLOCK_S, BLOCK_DH), tl.float32)
    for j in tl.static_range(SEQ):
        # Key j picked out of the tiles by a masked sum over the token axis: its result's layout is the tiles' own
        # (sliced), so broadcasting it back needs no layout conversion (no shared memory, no barrier).
        if PRELOAD_KV:
            pick = rows[None, :, None] == j
            k_j = tl.sum(tl.where(pick, k, 0.0), axis=1)  # (BLOCK_P, BLOCK_DH)
            v_j = tl.sum(tl.where(pick, v, 0.0), axis=1)
        else:
            k_ptrs = QKV + qkv_base[:, None] + j * stride_qkv_s + D + cols[None, :]
            k_j = tl.load(k_ptrs, mask=pair_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            v_j = tl.load(k_ptrs + D, mask=pair_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        s_j = tl.sum(q * k_j[:, None, :], axis=2)  # (BLOCK_P, BLOCK_S) scores of every query against key j
        m_new = tl.maximum(m, s_j)
        alpha = tl.exp(m - m_new)
        p_j = tl.exp(s_j - m_new)
        l_sum = l_sum * alpha + p_j
        acc = acc * alpha[:, :, None] + p_j[:, :, None] * v_j[:, None, :]
        m = m_new

    o = acc / l_sum[:, :, None]
    o_ptrs = O + (seq_idx * stride_o_n + head * HEAD_DIM)[:, None, None] + rows[None, :, None] * stride_o_s
    tl.store(o_ptrs + cols[None, None, :], o.to(O.dtype.element_ty), mask=tile_mask)
    lse_ptrs = LSE + pairs[:, None] * SEQ + rows[None, :]
    tl.store(lse_ptrs, m + tl.log(l_sum), mask=pair_ok[:, None] & row_ok[None, :])


@_jit
def _short_attention_bwd_kernel(
    DO,  # shape (N, S, NUM_HEADS * HEAD_DIM), strides as O
    QKV,  # shape (N, S, 3 * NUM_HEADS * HEAD_DIM)
    O,  # shape (N, S, NUM_HEADS * HEAD_DIM)
    LSE,  # shape (N, NUM_HEADS, S), fp32, contiguous
    DQKV,  # shape (N, S, 3 * NUM_HEADS * HEAD_DIM), strides as QKV
    num_pairs,  # N * NUM_HEADS
    stride_qkv_n,
    stride_qkv_s,
    stride_o_n,
    stride_o_s,
    sm_scale,  # 1 / sqrt(HEAD_DIM)
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SEQ: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_DH: tl.constexpr,
):
    D: tl.constexpr = NUM_HEADS * HEAD_DIM
    pairs = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # head fastest
    seq_idx = pairs // NUM_HEADS
    head = pairs % NUM_HEADS
    rows = tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_DH)
    pair_ok = pairs < num_pairs
    row_ok = rows < SEQ
    col_ok = cols < HEAD_DIM

    qkv_base = seq_idx * stride_qkv_n + head * HEAD_DIM  # (BLOCK_P,)
    q_tile = qkv_base[:, None, None] + rows[None, :, None] * stride_qkv_s + cols[None, None, :]
    o_tile = (seq_idx * stride_o_n + head * HEAD_DIM)[:, None, None] + rows[None, :, None] * stride_o_s
    o_tile = o_tile + cols[None, None, :]
    tile_mask = pair_ok[:, None, None] & row_ok[None, :, None] & col_ok[None, None, :]
    row_mask = pair_ok[:, None] & row_ok[None, :]
    # Every load of the program first, all (BLOCK_P, BLOCK_S, BLOCK_DH) tiles in one layout (see the forward).
    q = tl.load(QKV + q_tile, mask=tile_mask, other=0.0).to(tl.float32) * sm_scale
    k = tl.load(QKV + D + q_tile, mask=tile_mask, other=0.0).to(tl.float32)
    v = tl.load(QKV + 2 * D + q_tile, mask=tile_mask, other=0.0).to(tl.float32)
    do = tl.load(DO + o_tile, mask=tile_mask, other=0.0).to(tl.float32)
    o = tl.load(O + o_tile, mask=tile_mask, other=0.0).to(tl.float32)
    lse = tl.load(LSE + pairs[:, None] * SEQ + rows[None, :], mask=row_mask, other=0.0)
    tl.debug_barrier()  # every load in flight before the first use (see the forward): one round trip on Triton 3.6 too
    delta = tl.sum(do * o, axis=2)  # (BLOCK_P, BLOCK_S) D_i = rowsum(do * o)

    dq = tl.zeros((BLOCK_P, BLOCK_S, BLOCK_DH), tl.float32)
    dk = tl.zeros((BLOCK_P, BLOCK_S, BLOCK_DH), tl.float32)
    dv = tl.zeros((BLOCK_P, BLOCK_S, BLOCK_DH), tl.float32)
    for j in tl.static_range(SEQ):
        pick = rows[None, :, None] == j
        k_j = tl.sum(tl.where(pick, k, 0.0), axis=1)  # (BLOCK_P, BLOCK_DH)
        v_j = tl.sum(tl.where(pick, v, 0.0), axis=1)
        s_j = tl.sum(q * k_j[:, None, :], axis=2)  # (BLOCK_P, BLOCK_S), already scaled through q
        p_j = tl.where(row_mask, tl.exp(s_j - lse), 0.0)  # column j of P
        dv_j = tl.sum(p_j[:, :, None] * do, axis=1)  # (BLOCK_P, BLOCK_DH) row j of P^T do
        dp_j = tl.sum(do * v_j[:, None, :], axis=2)  # (BLOCK_P, BLOCK_S) column j of do v^T
        ds_j = p_j * (dp_j - delta)
        dq += ds_j[:, :, None] * k_j[:, None, :]
        dk_j = tl.sum(ds_j[:, :, None] * q, axis=1)  # q carries the scale: dS^T q / sqrt(d_head)
        dk = tl.where(pick, dk_j[:, None, :], dk)
        dv = tl.where(pick, dv_j[:, None, :], dv)
    tl.store(DQKV + q_tile, (dq * sm_scale).to(DQKV.dtype.element_ty), mask=tile_mask)
    tl.store(DQKV + D + q_tile, dk.to(DQKV.dtype.element_ty), mask=tile_mask)
    tl.store(DQKV + 2 * D + q_tile, dv.to(DQKV.dtype.element_ty), mask=tile_mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers (same signatures and return conventions as lego_kernels._cuda's)


def _launch_config(num_pairs: int, seq: int, d_head: int, backward: bool, elem_bytes: int = 2):
    """(BLOCK_P, BLOCK_S, BLOCK_DH, num_warps) for a launch; elem_bytes is qkv's element size.

    On a GPU: about 1024 elements per [BLOCK_P, BLOCK_S, BLOCK_DH] register tile for 4 warps (8 per thread); for the
    fp32 forward 512 (2 KB, one 16-byte load per thread and tensor: at two, Triton 3.6's ptxas reused the first loads'
    registers for the last one, a second round trip before the first store), twice
    the warps where one pair alone is bigger, and twice the warps for the backward, which holds eight such tiles
    (q, k, v, do, o, dq, dk, dv) to the forward's four (q, k, v, acc). Every load of a program is issued before the
    first is used, so more tiles per program would only trade occupancy for the same bytes in flight. Under the
    interpreter, where each program costs milliseconds, as many pairs per program as fit 32768 elements.
    """
    block_s = triton.next_power_of_2(seq)
    block_dh = triton.next_power_of_2(d_head)
    budget = 32768 if interpreting() else 1024 if backward else 2048 // elem_bytes
    block_p = max(1, min(budget // (block_s * block_dh), triton.next_power_of_2(num_pairs)))
    num_warps = 4 if block_p * block_s * block_dh <= 1024 else 8
    if not backward and seq <= 8 and block_p >= num_warps and not interpreting():
        # Fewer pairs than warps, so the tile spans warps: the key picks then reduce through shared memory behind a
        # barrier, and ptxas keeps every load above it. With whole pairs per warp (d_head 64: 4 pairs on 4 warps)
        # all reductions are shuffles and ptxas sinks v's load below key 0's scores: a second DRAM round trip.
        block_p = max(1, num_warps // 2)
    return block_p, block_s, block_dh, num_warps * 2 if backward else num_warps


@on_tensor_device
def _short_attention_fwd_triton(qkv: torch.Tensor, num_heads: int):
    """qkv [N, S, 3d] contiguous, S <= MAX_SHORT_SPAN -> (o [N, S, d], lse fp32 [N, H, S])."""
    n, s, three_d = qkv.shape
    d = three_d // 3
    d_head = d // num_heads
    o = new_output((n, s, d), qkv.dtype, qkv.device)
    lse = new_output((n, num_heads, s), torch.float32, qkv.device)
    num_pairs = n * num_heads
    if num_pairs * s == 0:
        return o, lse
    block_p, block_s, block_dh, num_warps = _launch_config(num_pairs, s, d_head, False, qkv.element_size())
    _short_attention_fwd_kernel[(triton.cdiv(num_pairs, block_p),)](
        qkv, o, lse, num_pairs,
        qkv.stride(0), qkv.stride(1), o.stride(0), o.stride(1),
        1.0 / math.sqrt(d_head),
        NUM_HEADS=num_heads, HEAD_DIM=d_head, SEQ=s,
        BLOCK_P=block_p, BLOCK_S=block_s, BLOCK_DH=block_dh, PRELOAD_KV=s <= 8,
        num_warps=num_warps,
    )  # fmt: skip
    return o, lse


@on_tensor_device
def _short_attention_bwd_triton(do, qkv, o, lse, num_heads: int):
    """do, o [N, S, d] and qkv [N, S, 3d] contiguous, lse fp32 [N, H, S] -> dqkv [N, S, 3d] in qkv's dtype."""
    n, s, three_d = qkv.shape
    d_head = three_d // (3 * num_heads)
    dqkv = new_output((n, s, three_d), qkv.dtype, qkv.device)
    num_pairs = n * num_heads
    if num_pairs * s == 0:
        return dqkv
    block_p, block_s, block_dh, num_warps = _launch_config(num_pairs, s, d_head, backward=True)
    _short_attention_bwd_kernel[(triton.cdiv(num_pairs, block_p),)](
        do, qkv, o, lse, dqkv, num_pairs,
        qkv.stride(0), qkv.stride(1), o.stride(0), o.stride(1),
        1.0 / math.sqrt(d_head),
        NUM_HEADS=num_heads, HEAD_DIM=d_head, SEQ=s,
        BLOCK_P=block_p, BLOCK_S=block_s, BLOCK_DH=block_dh,
        num_warps=num_warps,
    )  # fmt: skip
    return dqkv


# ----------------------------------------------------------------------------------------------------------------
# Custom ops: torch.compile sees them through their fake implementations; autograd through register_autograd.


@torch.library.custom_op("lego::short_attention_fwd", mutates_args=())
def _short_attention_fwd_op(qkv: torch.Tensor, num_heads: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "cuda":
        from lego_kernels import _cuda

        return _cuda.short_attention_fwd(qkv, num_heads)
    return _short_attention_fwd_triton(qkv, num_heads)


@_short_attention_fwd_op.register_fake
def _(qkv, num_heads, backend):
    n, s, three_d = qkv.shape
    return qkv.new_empty(n, s, three_d // 3), qkv.new_empty(n, num_heads, s, dtype=torch.float32)


@torch.library.custom_op("lego::short_attention_bwd", mutates_args=())
def _short_attention_bwd_op(
    do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, num_heads: int, backend: str
) -> torch.Tensor:
    if backend == "cuda":
        from lego_kernels import _cuda

        return _cuda.short_attention_bwd(do, qkv, o, lse, num_heads)
    return _short_attention_bwd_triton(do, qkv, o, lse, num_heads)


@_short_attention_bwd_op.register_fake
def _(do, qkv, o, lse, num_heads, backend):
    return torch.empty_like(qkv)


def _fwd_setup_context(ctx, inputs, output):
    qkv, num_heads, backend = inputs
    o, lse = output
    ctx.save_for_backward(qkv, o, lse)
    ctx.num_heads, ctx.backend = num_heads, backend
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, do, dlse):
    qkv, o, lse = ctx.saved_tensors
    dqkv = _short_attention_bwd_op(do.contiguous(), qkv, o, lse, ctx.num_heads, ctx.backend)
    return dqkv, None, None


_short_attention_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def short_attention(qkv, num_heads, backend="auto"):
    """Multi-head self-attention of every sequence in ``qkv`` [N, S, 3d] -> [N, S, d] (no mask, no dropout).

    S from 1 to 16 runs on the fused kernels; any longer S runs on SDPA (flash-attn if installed) whatever the
    backend, since a long sequence is what those libraries are built for. float64 runs on SDPA too (the kernels
    compute in fp32).
    """
    op = "short_attention"
    check_float(op, "qkv", qkv, 3)
    try:
        if isinstance(num_heads, bool):  # an int to operator.index, and True would run as one head
            raise TypeError
        num_heads = operator.index(num_heads)  # an int, or a NumPy / 0-d tensor integer; not 6.0
    except TypeError:
        raise ValueError(f"{op}: num_heads must be a positive int, got {num_heads!r}") from None
    if num_heads <= 0 or qkv.shape[2] % (3 * num_heads):
        raise ValueError(f"{op}: qkv's last dimension {qkv.shape[2]} is not 3 * num_heads ({num_heads}) * d_head")
    if qkv.shape[2] == 0:
        raise ValueError(f"{op}: qkv has shape {tuple(qkv.shape)}, so d_head would be 0; its last dimension is 3 * d")
    backend = resolve_backend(backend, qkv.device, op, _IMPLEMENTED)
    if qkv.shape[1] > MAX_SHORT_SPAN:
        return _long_attention(qkv, num_heads)
    if backend == "torch" or qkv.dtype == torch.float64:  # the kernels compute in fp32: float64 takes PyTorch's
        return _sdpa(qkv, num_heads)
    o, _ = _short_attention_fwd_op(qkv.contiguous(), num_heads, backend)
    return o  # (N, S, d)
