"""adaLN-Zero DiT pieces that a LEGO brick is built from, on top of lego_kernels.

Follows facebookresearch/DiT `models.py` (embedders, block, final layer, 2-D sincos position embedding), with one
change the paper's public code lacks: the adaLN vectors are computed once per IMAGE ([B, 6d] per block) and indexed
by each sequence's image inside the kernels, never repeated per patch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import lego_kernels as lk


class TimestepEmbedder(nn.Module):
    """Scalar noise level (EDM's c_noise, or a DDPM step index) -> [B, d] via sinusoids and a 2-layer MLP (DiT)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def sinusoids(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoids(t, self.frequency_size).to(self.mlp[0].weight.dtype))  # (B, d)


class LabelEmbedder(nn.Module):
    """Class label -> [B, d]. Index ``num_classes`` is the null class used for classifier-free guidance; the caller
    (the loss) decides which labels to drop, so the module itself draws no random numbers."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)  # (B, d)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block over many short sequences.

    The residual additions are fused with the adaLN that follows them: the block receives ``h``, the modulated input
    of its attention, and returns the modulated input of whatever comes next (the next block or the final layer).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, backend: str = "auto"):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-image (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each [B, d]."""
        return _split(self.adaLN_modulation(c), 6)

    def forward(self, x, h, mod, next_shift, next_scale, image_index=None):
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        a = self.proj(self.attention(h))  # (N, S, d)
        x, h = lk.gated_residual_adaln(x, a, gate_msa, shift_mlp, scale_mlp, image_index, backend=self.backend)
        m = self.fc2(F.gelu(self.fc1(h), approximate="tanh"))  # (N, S, d)
        return lk.gated_residual_adaln(x, m, gate_mlp, next_shift, next_scale, image_index, backend=self.backend)

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention of each sequence of h [N, S, d] -> [N, S, d], before the output projection.

        A one-token sequence (XL's 4 x 4 brick, l = 4) attends to itself only: softmax over one key is 1, so o = v
        and only the v rows of the qkv linear run. q and k keep their rows in the weight (checkpoints keep one
        layout for every brick); they get zero gradients there.
        """
        if h.shape[1] == 1:
            d = h.shape[-1]
            return F.linear(h, self.qkv.weight[2 * d :], self.qkv.bias[2 * d :])  # (N, 1, d): v
        return lk.short_attention(self.qkv(h), self.num_heads, backend=self.backend)  # (N, S, d)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}"


class FinalLayer(nn.Module):
    """adaLN + linear to l*l*C values per token (the modulation itself is fused into the last block)."""

    def __init__(self, hidden_size: int, field_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, field_size * field_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _split(self.adaLN_modulation(c), 2)  # shift, scale: (B, d) each


def _split(v: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
    """[B, parts * d] -> parts x [B, d] by slicing: chunk's backward would concatenate the gradients (aten::cat)."""
    d = v.shape[1] // parts
    return tuple(v[:, i * d : (i + 1) * d] for i in range(parts))


def sincos_pos_embed_2d(hidden_size: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding over a grid_size x grid_size token grid -> [grid_size^2, d] (MAE, DiT)."""
    grid_h, grid_w = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64))
    grid = np.stack([grid_h, grid_w]).reshape(2, 1, grid_size, grid_size)  # w goes first, as in MAE/DiT
    emb_h = _sincos_1d(hidden_size // 2, grid[0])
    emb_w = _sincos_1d(hidden_size // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, dim)
