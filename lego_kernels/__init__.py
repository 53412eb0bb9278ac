"""Fused kernels for LEGO diffusion bricks.

Five public ops, each with a plain-PyTorch reference (``<op>_ref``) and a ``backend`` argument
("auto" | "cuda" | "triton" | "torch"); see ``lego_kernels._dispatch`` for how "auto" chooses.
"""

from lego_kernels._dispatch import AUTO_PREFERS_CUDA, BACKENDS, available_backends
from lego_kernels.adaln import adaln_modulate, adaln_modulate_ref, gated_residual_adaln, gated_residual_adaln_ref
from lego_kernels.patch_embed import patch_embed, patch_embed_ref
from lego_kernels.patch_unembed import patch_unembed, patch_unembed_ref
from lego_kernels.short_attention import short_attention, short_attention_ref

__all__ = [
    "AUTO_PREFERS_CUDA",
    "BACKENDS",
    "adaln_modulate",
    "adaln_modulate_ref",
    "available_backends",
    "gated_residual_adaln",
    "gated_residual_adaln_ref",
    "patch_embed",
    "patch_embed_ref",
    "patch_unembed",
    "patch_unembed_ref",
    "short_attention",
    "short_attention_ref",
]
