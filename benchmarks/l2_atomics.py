"""L2 atomic throughput probe: how fast fp32 atomic adds of 16-byte vectors go into a buffer that stays in L2.

The fused patch_embed backward (lego_kernels/patch_embed.py, _patch_embed_bwd_kernel) sums dweight across its token
tiles with ``tl.atomic_add(..., sem="relaxed")`` into an fp32 [d, K] accumulator of 30 KB to 2.9 MB: every program
adds the whole accumulator (its K tiles), so more programs cost more L2 atomic traffic. What one atomic byte costs
against one DRAM byte decides how many programs that kernel should run; this measures it.

The kernel: program p adds, ITERS times, a BLOCK-wide fp32 vector into tile (p * STRIDE + i) % TILES of the buffer
[TILES, BLOCK]. Each thread's 4 consecutive fp32 form one 16-byte ``red.global.add.v4.f32`` (Triton emits that width
from the tile's contiguity; tests/test_patch_embed_bwd_bench.py checks the PTX). Two patterns:

    "same-order"  STRIDE 0: every program walks the same tiles in the same order, as every program of the patch_embed
                  backward adds its [BLOCK_N, BLOCK_K] chunks of dweight from column 0 up (contended addresses)
    "spread"      STRIDE 1: program p starts one tile after program p - 1, so programs that keep pace never add to the
                  same tile at the same moment

Beside it, ATOMIC=False stores the same vectors to the same buffer (plain L2 writes of the same bytes). The value a
program adds is (p % 8 + 1) + (lane % 4) / 4: small multiples of 1/4, so every sum is exact in fp32 whatever the order
of the adds, and ``expected_sums`` gives it exactly.
"""

from __future__ import annotations

import torch

from lego_kernels._dispatch import interpreting, triton_importable

if triton_importable():
    import triton
    import triton.language as tl
else:  # the module imports without triton; the probe then cannot run (its benchmark skips)
    import types

    triton = types.SimpleNamespace(jit=lambda fn: fn)

PATTERNS = ("same-order", "spread")
NUM_WARPS = 4


@triton.jit
def _l2_probe_kernel(
    BUF,  # shape (TILES, BLOCK) fp32
    TILES,
    ITERS,  # adds (or stores) per program
    STRIDE,  # tile offset between consecutive programs: 0 (same order) or 1 (spread)
    ATOMIC: tl.constexpr,  # atomic adds, else plain stores of the same vectors
    BLOCK: tl.constexpr,  # fp32 per tile: a multiple of 4 * 32 * num_warps, so each thread owns whole 16-byte vectors
):
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    val = (pid % 8 + 1).to(tl.float32) + (lane % 4).to(tl.float32) * 0.25
    start = pid * STRIDE
    for i in range(ITERS):
        tile = ((start + i) % TILES).to(tl.int64)
        if ATOMIC:
            tl.atomic_add(BUF + tile * BLOCK + lane, val, sem="relaxed")
        else:
            tl.store(BUF + tile * BLOCK + lane, val)


def stride(pattern: str, iters: int) -> int:
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")
    return 0 if pattern == "same-order" else 1


def traffic_bytes(programs: int, iters: int, block: int) -> int:
    """Bytes one launch adds (or stores): programs x iters x one BLOCK-wide fp32 vector."""
    return programs * iters * block * 4


def new_buffer(buffer_bytes: int, block: int, device) -> torch.Tensor:
    """The zeroed fp32 buffer [TILES, BLOCK] of buffer_bytes (a whole number of tiles)."""
    if buffer_bytes % (4 * block):
        raise ValueError(f"buffer of {buffer_bytes} bytes is not a whole number of {block}-float tiles")
    return torch.zeros((buffer_bytes // (4 * block), block), dtype=torch.float32, device=device)


def launch(buf: torch.Tensor, programs: int, iters: int, pattern: str, atomic: bool) -> None:
    """One probe launch over ``buf`` [TILES, BLOCK]: programs x iters adds (atomic) or stores of BLOCK fp32 each."""
    tiles, block = buf.shape
    if block % (4 * 32 * NUM_WARPS) and not interpreting():
        raise ValueError(
            f"block {block} is not a multiple of {4 * 32 * NUM_WARPS}: threads would split 16-byte vectors"
        )
    _l2_probe_kernel[(programs,)](buf, tiles, iters, stride(pattern, iters), ATOMIC=atomic, BLOCK=block,
                                  num_warps=NUM_WARPS)  # fmt: skip


def expected_sums(tiles: int, block: int, programs: int, iters: int, pattern: str) -> torch.Tensor:
    """[TILES, BLOCK] fp64: the buffer after one atomic launch on zeros (each tile: the sum of its programs' values)."""
    pid = torch.arange(programs, dtype=torch.int64)
    tile = (pid[:, None] * stride(pattern, iters) + torch.arange(iters)[None, :]) % tiles  # (programs, iters)
    weight = (pid % 8 + 1).to(torch.float64)[:, None].expand(programs, iters)
    per_tile = torch.bincount(tile.reshape(-1), weight.reshape(-1), minlength=tiles)  # sum of (p % 8 + 1)
    adds = torch.bincount(tile.reshape(-1), minlength=tiles).to(torch.float64)  # adds per tile
    lane = (torch.arange(block) % 4).to(torch.float64) * 0.25
    return per_tile[:, None] + adds[:, None] * lane[None, :]
