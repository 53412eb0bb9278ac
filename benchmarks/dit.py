"""The DiT baseline of the benchmarks: lego.DiTModel, diffusers' DiTTransformer2DModel under the same preconditioning.

It is the library's DiT (``python -m lego.train --model DiT-S/2`` trains the same module), so the benchmarks time the
same preconditioning, loss and samplers around either backbone. Attention runs through PyTorch's SDPA (flash-attention
kernels on a GPU). diffusers is optional: without it every DiT benchmark is skipped with that reason.
"""

from __future__ import annotations

import torch

from lego import DiTModel, LegoLoss
from lego.networks.dit import DiTConfig


def diffusers_missing() -> str | None:
    """Why the DiT baseline cannot run here, or None when it can."""
    try:
        from diffusers import DiTTransformer2DModel  # noqa: F401
    except ImportError as e:
        return f"diffusers is not installed ({e}); the DiT baseline is skipped (pip install diffusers)"
    return None


def build_dit(config: dict, num_classes: int, device: torch.device, name: str = "DiT-custom") -> DiTModel:
    """``config``: DiTTransformer2DModel arguments (num_attention_heads, attention_head_dim, num_layers, in_channels,
    sample_size, patch_size)."""
    heads = config["num_attention_heads"]
    cfg = DiTConfig(
        name, config["num_layers"], heads * config["attention_head_dim"], heads, config["patch_size"],
        in_channels=config["in_channels"], num_classes=num_classes, resolution=config["sample_size"],
    )  # fmt: skip
    with torch.device(device):
        return DiTModel(cfg).to(device)


# EDM's loss on DiT's one output, drawn as for LEGO (sigma, noise, label dropout 0.1): returns (loss, per-"brick").
dit_loss = LegoLoss(patch_fraction=1.0, label_dropout=0.1)
