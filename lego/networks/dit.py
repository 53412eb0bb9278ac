"""DiT as a backbone of this pipeline: diffusers' DiTTransformer2DModel behind the backbone interface
(lego.networks.interface), with its one output as a single brick.

``lego.DiTModel(config)`` wraps it in the same preconditioning as a LEGO stack (lego.diffusion.denoiser), so the loss,
the samplers, lego.train, the checkpoints and lego.eval treat both models alike: a comparison differs only in the
backbone.

Sizes follow DiT's table (Peebles & Xie, 2023): S 384 / 6 heads / 12 layers, B 768 / 12 / 12, L 1024 / 16 / 24,
XL 1152 / 16 / 28, patch 2, 4 or 8; T (128 / 4 / 6, ours) matches LEGO-T's six blocks for the CPU studies. Names:
``DiT-<size>/<patch>``. Differences from the original DiT: the output has C channels (no learned variance, as LEGO),
and diffusers gives every block its own timestep/class embedder. Weights are initialised as DiT's
``initialize_weights`` (xavier linears, N(0, 0.02) embeddings, adaLN and output layers zeroed). Label dropout for
guidance is LegoLoss's (diffusers' own dropout is switched off so labels are not dropped twice).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from lego import checks
from lego.errors import LegoError
from lego.networks.interface import BrickOutput, NoiseLevel, PatchDraw, check_batch_of_canvases, check_sizes


@dataclass(frozen=True)
class DiTConfig:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    patch_size: int
    in_channels: int = 3
    num_classes: int = 0  # 0: unconditional
    resolution: int = 32  # the training canvas; sampling takes any square canvas whose side is a multiple of patch_size
    precond: str = "edm"
    sigma_data: float = 0.5

    def __post_init__(self):
        check_sizes(self)
        checks.integer("num_layers", self.num_layers, 1)
        checks.integer("patch_size", self.patch_size, 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DiTConfig:
        return cls(**d)


# (hidden size, heads, layers) per size: DiT's Table 1; T is ours (LEGO-T's width and block count).
DIT_SIZES = {"T": (128, 4, 6), "S": (384, 6, 12), "B": (768, 12, 12), "L": (1024, 16, 24), "XL": (1152, 16, 28)}
DIT_MODELS: dict[str, DiTConfig] = {
    f"DiT-{size}/{p}": DiTConfig(f"DiT-{size}/{p}", layers, hidden, heads, p)
    for size, (hidden, heads, layers) in DIT_SIZES.items()
    for p in (2, 4, 8)
}


def dit_config(name: str, **overrides) -> DiTConfig:
    """The registry's DiT config ``name`` with ``overrides`` (any DiTConfig field) applied."""
    if name not in DIT_MODELS:
        raise ValueError(f"unknown model {name!r}; the DiT sizes are: {', '.join(DIT_MODELS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(DiTConfig)}
    if unknown:
        raise ValueError(f"{name}: unknown model option(s) {', '.join(sorted(unknown))} for a DiT")
    return dataclasses.replace(DIT_MODELS[name], **overrides)


def _diffusers_dit():
    try:  # an optional dependency: only DiT models need it
        from diffusers import DiTTransformer2DModel
    except ImportError as e:
        raise LegoError(f"DiT models need diffusers ({e}); pip install diffusers") from None
    return DiTTransformer2DModel


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        if config.hidden_size % config.num_heads:
            raise ValueError(
                f"{config.name}: hidden size {config.hidden_size} is not a multiple of {config.num_heads} heads"
            )
        self.config = config
        self.num_classes = config.num_classes
        self.in_channels = config.in_channels
        self.num_bricks = 1
        self.max_brick = config.patch_size  # canvases must be multiples of it
        self.top_is_image = True
        # An unconditional DiT still needs a class table: one class, always given.
        self.dit = _diffusers_dit()(
            num_attention_heads=config.num_heads, attention_head_dim=config.hidden_size // config.num_heads,
            in_channels=config.in_channels, out_channels=config.in_channels, num_layers=config.num_layers,
            sample_size=config.resolution, patch_size=config.patch_size, num_embeds_ada_norm=max(config.num_classes, 1),
        )  # fmt: skip
        for m in self.dit.modules():
            if hasattr(m, "token_drop"):  # diffusers' LabelEmbedding: LegoLoss drops labels, not it
                m.dropout_prob = 0.0
        self._init_weights()

    def _init_weights(self):
        """DiT's initialize_weights (facebookresearch/DiT models.py), on diffusers' module names."""
        for m in self.dit.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        proj = self.dit.pos_embed.proj  # the patch embedding: a linear over p x p x C patches
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        for block in self.dit.transformer_blocks:
            emb = block.norm1.emb
            nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
            nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
            nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
            nn.init.zeros_(block.norm1.linear.weight)  # adaLN-Zero: each block starts as the identity
            nn.init.zeros_(block.norm1.linear.bias)
        for layer in (self.dit.proj_out_1, self.dit.proj_out_2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def check_canvas(self, x: torch.Tensor) -> None:
        h, w = check_batch_of_canvases(x, self.in_channels)
        p = self.config.patch_size
        if h != w or h % p:  # diffusers' DiT un-patchifies square token grids only
            raise ValueError(
                f"the canvas {h}x{w} does not fit {self.config.name}: use a square whose side is a multiple "
                f"of the patch size {p}"
            )

    def brick_modules(self) -> list[nn.Module]:
        return [self.dit]

    def forward(
        self, x, noise: NoiseLevel, class_labels=None, skip=frozenset(), patches: PatchDraw | None = None, fill=None
    ) -> list[BrickOutput]:
        """The raw output F [B, C, H, W] as one BrickOutput (see lego.networks.interface). A DiT has no patch-bricks
        and makes no random draws."""
        if patches is not None and patches.fraction < 1:
            raise ValueError(f"{self.config.name} has no patch-bricks; --patch-fraction < 1 is for LEGO models")
        batch = x.shape[0]
        if class_labels is None or not self.num_classes:  # the null class (guidance), or the one class
            class_labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=x.device)
        x_in = x * noise.c_in.view(-1, 1, 1, 1)
        f = self.dit(x_in, noise.c_noise, class_labels.to(x.device).long(), return_dict=False)[0]
        return [BrickOutput(0, f.float(), None)]  # f: (B, C, H, W)
