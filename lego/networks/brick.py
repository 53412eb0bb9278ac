"""LegoBrick: one LEGO brick, a drop-in nn.Module.

A brick of size r with receptive field l cuts the full canvas into (H/r)(W/r) patches, embeds each l x l field of
[x_t, previous brick's output, 2 coordinate channels] as one token ((r/l)^2 tokens per patch), runs adaLN-Zero DiT
blocks over every patch's tokens, and writes its prediction back onto the full canvas (Zheng et al., ICLR 2024,
Sec. 2.3). The four memory-bound steps go through lego_kernels: patch_embed, short_attention, the adaLN pair and
patch_unembed.
"""

from __future__ import annotations

import torch
from torch import nn

import lego_kernels as lk
from lego.networks.blocks import DiTBlock, FinalLayer, sincos_pos_embed_2d


class LegoBrick(nn.Module):
    """One brick.

    Args:
        brick_size: r, the side of a patch in pixels (or latent cells).
        field_size: l, the side of the field one token embeds; r must be a multiple of l.
        hidden_size, depth, num_heads, mlp_ratio: the DiT blocks inside.
        in_channels: C, channels of the canvas (the brick outputs C channels as well).
        has_prev: whether the brick takes the previous brick's output as C more input channels.
        cond_size: width of the per-image conditioning vector (default: hidden_size).
        backend: lego_kernels backend for the fused ops ("auto" | "cuda" | "triton" | "torch").
    """

    def __init__(
        self,
        brick_size: int,
        field_size: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        in_channels: int = 3,
        has_prev: bool = True,
        cond_size: int | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        if brick_size % field_size:
            raise ValueError(f"brick size {brick_size} is not a multiple of the field size {field_size}")
        if hidden_size % 4:
            raise ValueError(f"hidden size {hidden_size} must be a multiple of 4 (2-D sin-cos position embedding)")
        self.brick_size, self.field_size = brick_size, field_size
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.in_channels, self.has_prev = in_channels, has_prev
        self.backend = backend
        grid = brick_size // field_size
        self.seq_len = grid * grid
        embed_in = in_channels * (2 if has_prev else 1) + 2
        self.embed_weight = nn.Parameter(torch.empty(hidden_size, embed_in, field_size, field_size))
        self.embed_bias = nn.Parameter(torch.empty(hidden_size))
        pos = torch.tensor(sincos_pos_embed_2d(hidden_size, grid), dtype=torch.float32)
        self.register_buffer("pos_embed", pos, persistent=False)  # (S, d), fixed
        self.cond_proj = nn.Identity() if cond_size in (None, hidden_size) else nn.Linear(cond_size, hidden_size)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, backend) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, field_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's init: xavier linears and embedding, zeroed adaLN modulation and output layer (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.embed_weight.view(self.hidden_size, -1))
        nn.init.zeros_(self.embed_bias)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def num_patches(self, height: int, width: int) -> int:
        return (height // self.brick_size) * (width // self.brick_size)

    def forward(self, x, prev, cond, patch_index=None, fill=None, *, check=True, check_ids=None):
        """
        x: [B, C, H, W] canvas (already scaled by the preconditioning's c_in).
        prev: [B, C, H, W] previous brick's output, or None for a bottom brick (zeros are used if it has_prev).
        cond: [B, cond_size] per-image conditioning (time + class embedding).
        patch_index: [B, P] flat ids (row-major) of the patches to process, distinct within a row; None processes all.
        fill: [B, C, H, W] values for patches not processed (zeros when None).
        check: check the inputs: shapes, and that patch_index's ids are patches of the canvas, none twice in a row
            (lk.patch_embed does that one: a host sync on a GPU). The LEGO stack, which checked the canvas and drew the
            ids itself, passes False. ``check_ids``: the name it had before (it takes precedence when given).
        Returns the brick's output on the full canvas, [B, C, H, W].
        """
        check = check if check_ids is None else check_ids
        if check:
            self._check(x, prev, cond, patch_index, fill)
        c, h, w = x.shape[1:]
        if self.has_prev and prev is None:
            prev = torch.zeros_like(x)
        elif not self.has_prev:
            prev = None
        # Under autocast the linears emit the autocast dtype; the fused ops want one dtype: the whole brick runs in it.
        dev = x.device.type
        autocast = torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)
        dt = torch.get_autocast_dtype(dev) if autocast else x.dtype
        if not autocast and dt != self.embed_weight.dtype:
            raise ValueError(
                f"LegoBrick: x is {dt} but its weights are {self.embed_weight.dtype}; convert one to the "
                "other (brick.to(x.dtype) or x.to(...)), or run the brick under torch.autocast. A LegoModel computes "
                "in float32 whatever its input: keep its weights float32 (model.float()) and use torch.autocast "
                "for bf16"
            )
        if not autocast and cond.dtype != dt:  # (it ended in "mat1 and mat2 must have the same dtype")
            raise ValueError(f"LegoBrick: cond is {cond.dtype} but x and the weights are {dt}; pass cond.to({dt})")
        cond = self.cond_proj(cond)  # (B, d)
        mods = [[v.to(dt) for v in block.modulation(cond)] for block in self.blocks]  # per image: depth x 6 x (B, d)
        final_shift, final_scale = (v.to(dt) for v in self.final_layer.modulation(cond))  # (B, d) each
        be = self.backend
        tokens = lk.patch_embed(
            x.to(dt),
            None if prev is None else prev.to(dt),
            self.embed_weight.to(dt),
            self.embed_bias.to(dt),
            self.pos_embed.to(dt),
            self.brick_size,
            self.field_size,
            patch_index,
            backend=be,
            check_ids=check,
        )  # (N, S, d)
        if self.depth:
            h_mod = lk.adaln_modulate(tokens, mods[0][0], mods[0][1], backend=be)  # (N, S, d)
        else:
            h_mod = lk.adaln_modulate(tokens, final_shift, final_scale, backend=be)
        for i, block in enumerate(self.blocks):
            next_shift, next_scale = mods[i + 1][:2] if i + 1 < self.depth else (final_shift, final_scale)
            tokens, h_mod = block(tokens, h_mod, mods[i], next_shift, next_scale)  # (N, S, d) each
        out = self.final_layer.linear(h_mod).to(dt)  # (N, S, l*l*C)
        fill = None if fill is None else fill.to(dt)
        return lk.patch_unembed(
            out, self.brick_size, self.field_size, c, h, w, patch_index, fill, backend=be, check_ids=False
        )  # the ids were checked by patch_embed

    def _check(self, x, prev, cond, patch_index, fill) -> None:
        if x.dim() != 4:
            raise ValueError(f"LegoBrick: x must be a batch of canvases [B, C, H, W], got shape {tuple(x.shape)}")
        batch, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"LegoBrick: the canvas has {c} channels but the brick was built for {self.in_channels}")
        if h % self.brick_size or w % self.brick_size:
            raise ValueError(
                f"LegoBrick: the canvas {h}x{w} is not divisible by the brick size {self.brick_size}; "
                f"use sides that are multiples of {self.brick_size}"
            )
        want = self.hidden_size if isinstance(self.cond_proj, nn.Identity) else self.cond_proj.in_features
        if cond.dim() != 2 or cond.shape != (batch, want):
            raise ValueError(
                f"LegoBrick: cond must be [batch, cond_size] = [{batch}, {want}] (one row per image), "
                f"got {list(cond.shape)}"
            )
        for name, t in (("prev", prev), ("fill", fill)):
            if t is not None and t.shape != x.shape:
                raise ValueError(f"LegoBrick: {name} must have the canvas's shape {list(x.shape)}, got {list(t.shape)}")
        if patch_index is not None and not isinstance(patch_index, torch.Tensor):
            raise TypeError(f"LegoBrick: patch_index must be a tensor of patch ids, got {type(patch_index).__name__}")
        if patch_index is not None and (patch_index.dim() != 2 or patch_index.shape[0] != batch):
            shape = list(patch_index.shape)
            raise ValueError(f"LegoBrick: patch_index must be [{batch}, P] (one row per image), got {shape}")

    def extra_repr(self) -> str:
        return (
            f"brick_size={self.brick_size}, field_size={self.field_size}, tokens={self.seq_len}, "
            f"hidden_size={self.hidden_size}, depth={self.depth}, in_channels={self.in_channels}, "
            f"has_prev={self.has_prev}"
        )
