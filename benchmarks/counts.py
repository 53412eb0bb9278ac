"""Counted before timed: the FLOPs each benchmark performs and the fewest bytes each fused op must move.

FLOPs are 2 x multiply-adds and count matmul-class work only: linears, the patch-embedding convolution, attention's
q k^T and P v. That is the convention of DiT's "GFLOPs" (which are MACs) and of ``torch.utils.flop_counter``;
LayerNorm, softmax, GELU, the residual adds and the optimizer are not counted. A training step counts 3 x the forward
(every matmul's backward is two matmuls of the same size), the usual rule for model FLOPs utilization (MFU).
``tests/test_benchmarks_smoke.py`` checks these formulas against ``FlopCounterMode`` on small configs.

Bytes are the algorithmic minimum for one call: every tensor the op must read, read once, and every tensor it must
write, written once, at the element size of its dtype (the per-sequence statistics mean/rstd and log-sum-exp in fp32,
as the fused kernels store them). Intermediates a fused kernel keeps in registers cost nothing. Achieved bandwidth is
this count over the measured time, so an unfused implementation that moves more is charged the same floor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

FREQUENCY_SIZE = 256  # sinusoid width of the timestep embedders (DiT, lego.networks.blocks.TimestepEmbedder, diffusers)


# ---------------------------------------------------------------------------------------------------------------------
# Fused ops


@dataclass(frozen=True)
class OpShape:
    """The tensors one brick's ops see: B images of C x H x W cut into r x r patches of l x l fields, width d."""

    batch: int
    channels: int
    height: int
    width: int
    brick: int  # r
    field: int  # l
    hidden: int  # d
    heads: int
    dtype: torch.dtype
    has_prev: bool = True  # a brick above the bottom one: the canvas input is [x, prev, coordinates]

    @property
    def seq_len(self) -> int:  # S, tokens per patch
        return (self.brick // self.field) ** 2

    @property
    def patches(self) -> int:  # per image
        return (self.height // self.brick) * (self.width // self.brick)

    @property
    def num_seq(self) -> int:  # N
        return self.batch * self.patches

    @property
    def tokens(self) -> int:  # N * S
        return self.num_seq * self.seq_len

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def embed_in(self) -> int:  # C' = C (+ C) + 2 coordinate channels
        return self.channels * (2 if self.has_prev else 1) + 2

    @property
    def canvas(self) -> int:  # elements of one [B, C, H, W] canvas
        return self.batch * self.channels * self.height * self.width

    def with_batch(self, batch: int) -> OpShape:
        return replace(self, batch=batch)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        d.update(seq_len=self.seq_len, num_seq=self.num_seq, tokens=self.tokens)
        return d


@dataclass(frozen=True)
class Cost:
    flops: int
    bytes: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


def _stats_bytes(s: OpShape) -> int:
    return 2 * 4 * s.tokens  # mean and rstd, fp32, one per token


def patch_embed_cost(s: OpShape, backward: bool) -> Cost:
    e, d = s.itemsize, s.hidden
    k = s.embed_in * s.field**2  # one token's field values (coordinates computed, never read)
    inputs = (2 if s.has_prev else 1) * s.canvas
    params = d * k + d + s.seq_len * d  # weight, bias, pos_embed
    if not backward:
        return Cost(2 * s.tokens * d * k, e * (inputs + params + s.tokens * d))
    # dweight = dtokens^T . fields (all K); dprev = dtokens . weight[:, prev channels]; dbias, dpos: sums of dtokens
    dprev_flops = 2 * s.tokens * d * s.channels * s.field**2 if s.has_prev else 0
    written = params + (s.canvas if s.has_prev else 0)
    return Cost(2 * s.tokens * d * k + dprev_flops, e * (s.tokens * d + inputs + d * k + written))


def short_attention_cost(s: OpShape, backward: bool) -> Cost:
    e, n, t, d = s.itemsize, s.num_seq, s.seq_len, s.hidden
    lse = 4 * n * s.heads * t
    if not backward:  # q k^T and P v: 2 S^2 d MACs per sequence; read qkv, write o and lse
        return Cost(4 * n * t * t * d, e * (n * t * 3 * d + n * t * d) + lse)
    # recompute q k^T, then dv = P^T do, dP = do v^T, dq = dS k, dk = dS^T q: five S x S x d products
    return Cost(10 * n * t * t * d, e * (n * t * d + n * t * 3 * d + n * t * d + n * t * 3 * d) + lse)


def adaln_modulate_cost(s: OpShape, backward: bool) -> Cost:
    e, t, bd = s.itemsize, s.tokens * s.hidden, s.batch * s.hidden
    if not backward:  # read x, shift, scale; write y and the statistics
        return Cost(0, e * (2 * t + 2 * bd) + _stats_bytes(s))
    # read dy, x, scale and the statistics; write dx, dshift, dscale
    return Cost(0, e * (3 * t + 3 * bd) + _stats_bytes(s))


def gated_residual_adaln_cost(s: OpShape, backward: bool) -> Cost:
    e, t, bd = s.itemsize, s.tokens * s.hidden, s.batch * s.hidden
    if not backward:  # read x, y, gate, shift, scale; write x_out, h and the statistics
        return Cost(0, e * (4 * t + 3 * bd) + _stats_bytes(s))
    # read dx_out, dh, x_out, y, gate, scale and the statistics; write dx, dy, dgate, dshift, dscale
    return Cost(0, e * (6 * t + 5 * bd) + _stats_bytes(s))


def patch_unembed_cost(s: OpShape, backward: bool) -> Cost:
    # every patch written: the tokens hold exactly one canvas worth of values; read one, write the other
    return Cost(0, s.itemsize * 2 * s.canvas)


OP_COSTS = {
    "patch_embed": patch_embed_cost,
    "short_attention": short_attention_cost,
    "adaln_modulate": adaln_modulate_cost,
    "gated_residual_adaln": gated_residual_adaln_cost,
    "patch_unembed": patch_unembed_cost,
}


def op_cost(op: str, shape: OpShape, mode: str) -> Cost:
    """mode "fwd" or "fwd+bwd" (the forward, then the backward of every input that needs a gradient)."""
    fwd = OP_COSTS[op](shape, backward=False)
    if mode == "fwd":
        return fwd
    if mode == "fwd+bwd":
        return fwd + OP_COSTS[op](shape, backward=True)
    raise ValueError(f"unknown mode {mode!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Bricks and models (forward FLOPs; training = 3 x forward)


def brick_flops(
    brick_size: int, field_size: int, hidden: int, depth: int, channels: int, has_prev: bool,
    batch: int, height: int, width: int, mlp_ratio: float = 4.0, patches: int | None = None,
) -> dict[str, int]:  # fmt: skip
    """Forward FLOPs of one LegoBrick on a batch, by part; ``patches`` per image processed (default: all)."""
    r, l, d = brick_size, field_size, hidden
    s = (r // l) ** 2
    p = (height // r) * (width // r) if patches is None else patches
    t = batch * p * s  # tokens
    c_in = channels * (2 if has_prev else 1) + 2
    mlp = int(d * mlp_ratio)
    qkv = 3 if s > 1 else 1  # one token attends to itself only (o = v): S = 1 bricks compute v alone
    macs = {
        "embed": t * d * c_in * l * l,
        "linears": depth * t * (qkv * d * d + d * d + 2 * d * mlp),  # qkv (or v), proj, fc1, fc2
        "attention": depth * t * 2 * s * d if s > 1 else 0,  # q k^T and P v
        "final": t * d * l * l * channels,
        "adaln": batch * (depth * d * 6 * d + d * 2 * d),  # once per IMAGE: blocks' 6d and the final layer's 2d
    }
    return {k: 2 * v for k, v in macs.items()}


def processed_patches(total: int, patch_fraction: float) -> int:
    """Patches per image a brick processes in training (lego.networks.stack.LegoStack's rule)."""
    if patch_fraction < 1 and total > 1:
        return max(1, round(patch_fraction * total))
    return total


def lego_flops(config, batch: int, height: int, width: int, patch_fraction: float = 1.0, skip=()) -> dict[str, int]:
    """Forward FLOPs of a LegoModel (``lego.LegoConfig``) by part; bricks in ``skip`` do not run."""
    d, n = config.hidden_size, len(config.bricks)
    skip = {int(k) % n for k in skip}
    parts = {"embed": 0, "linears": 0, "attention": 0, "final": 0, "adaln": 0}
    parts["cond"] = 2 * batch * (FREQUENCY_SIZE * d + d * d)  # timestep MLP, once per image
    for k, b in enumerate(config.bricks):
        if k in skip:
            continue
        total = (height // b.brick_size) * (width // b.brick_size)
        one = brick_flops(
            b.brick_size, b.field_size, d, b.depth, config.in_channels, k > 0, batch, height, width,
            config.mlp_ratio, processed_patches(total, patch_fraction),
        )  # fmt: skip
        for key, v in one.items():
            parts[key] += v
    return parts


def dit_flops(config, batch: int, height: int, width: int) -> dict[str, int]:
    """Forward FLOPs of diffusers' DiTTransformer2DModel (``config``: its ``.config``, or a dict) by part.

    Follows that implementation: every block has its own timestep/class embedder and adaLN linear (the original DiT
    shares one embedder), and the output layer embeds the timestep once more.
    """
    get = config.get if isinstance(config, dict) else lambda k, default=None: getattr(config, k, default)
    d = get("num_attention_heads") * get("attention_head_dim")
    layers, p, c = get("num_layers"), get("patch_size"), get("in_channels")
    c_out = get("out_channels") or c
    t = batch * (height // p) * (width // p)
    tokens_per_image = (height // p) * (width // p)
    embedder = FREQUENCY_SIZE * d + d * d
    macs = {
        "embed": t * d * c * p * p,
        "linears": layers * t * (4 * d * d + 2 * d * 4 * d),  # q, k, v, out; the 4d MLP
        "attention": layers * t * 2 * tokens_per_image * d,
        "final": t * d * p * p * c_out,
        "adaln": batch * (layers * 6 * d * d + 2 * d * d),
        "cond": batch * (layers + 1) * embedder,
    }
    return {k: 2 * v for k, v in macs.items()}
