"""The LEGO stack: bricks (PG, PR or U) over a shared time/class embedding, as a backbone (lego.networks.interface).

The stack runs its bricks bottom to top, each on the canvas and the output of the brick below; bricks in ``skip``
do not run and pass their predecessor's output on. ``lego.LegoModel`` wraps it in the preconditioning
(lego.diffusion.denoiser), which turns the top output F into D(x; sigma) = c_skip x + c_out F.

Configurations follow the paper's Tables 5 (64 x 64) and 6 (32 x 32) and the U variants of the released code:
    PG: bricks grow bottom to top (4 -> 16 -> 64, or 4 -> 8 -> 32); PR: the same bricks reversed;
    U:  large -> medium -> 4 -> medium -> large (e.g. XL-U-32: bricks 32, 16, 4, 16, 32, fields 2, 8, 2, 8, 2).
Names: ``LEGO-<size>-<stack>-<canvas>``, e.g. ``LEGO-S-PG-64``, ``LEGO-XL-U-32``; size T is a tiny model for tests
and the CPU demo.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from lego import checks
from lego.errors import LegoError
from lego.networks.blocks import LabelEmbedder, TimestepEmbedder
from lego.networks.brick import LegoBrick
from lego.networks.interface import BrickOutput, NoiseLevel, PatchDraw, check_batch_of_canvases, check_sizes


@dataclass(frozen=True)
class BrickSpec:
    brick_size: int  # r
    field_size: int  # l
    depth: int


@dataclass(frozen=True)
class LegoConfig:
    name: str
    bricks: tuple[BrickSpec, ...]  # bottom (index 0) to top
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    in_channels: int = 3
    num_classes: int = 0  # 0: unconditional
    resolution: int = 64  # the training canvas (any multiple of the largest brick works at sampling)
    precond: str = "edm"  # "edm" or "vp"
    sigma_data: float = 0.5
    backend: str = "auto"  # lego_kernels backend
    # Multiplies c_noise before the time embedding; None: the preconditioning's own (EDM 250, VP 1). The authors'
    # released models feed EDM's c_noise unscaled, so lego.convert sets 1.0.
    time_scale: float | None = None
    base: dict | None = None  # a pretrained denoiser as brick 0 (lego.checkpoints.build): its origin, frozen or not

    def __post_init__(self):
        check_sizes(self)
        if not self.bricks:
            raise ValueError(f"{self.name}: a LEGO stack needs at least one brick")
        for b in self.bricks:
            for field in ("brick_size", "field_size", "depth"):
                checks.integer(f"a brick's {field}", getattr(b, field), 1)
        checks.real("mlp_ratio", self.mlp_ratio, 0, low_open=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LegoConfig:
        d = dict(d)
        d["bricks"] = tuple(BrickSpec(**b) for b in d["bricks"])
        return cls(**d)


# Hidden size and heads per model size (paper, Table 5); T is ours, for tests and the CPU demo.
SIZES = {"T": (128, 4), "S": (384, 6), "L": (1024, 16), "XL": (1152, 16)}
# Depths of the (small patch, large patch, image) bricks for PG/PR (paper, Table 5; the released code's lego_L_PG_64
# gives L's 4 x 4 brick 6 blocks, not 4: pass depths=(6, 8, 12) for it), and of the five U bricks.
DEPTHS = {"T": (2, 2, 2), "S": (2, 4, 6), "L": (4, 8, 12), "XL": (4, 12, 14)}
U_DEPTHS = {"T": (2, 1, 2, 1, 2), "S": (6, 4, 2, 4, 6), "L": (12, 8, 6, 8, 12), "XL": (14, 10, 4, 10, 14)}
# The released code's lego_XL_U_64 gives its 16 x 16 bricks 12 blocks where lego_XL_U_32 gives them 10.
U_DEPTHS_AT = {("XL", 64): (14, 12, 4, 12, 14)}
# (brick, field) of the (small patch, large patch, image) bricks per canvas, from Tables 5 and 6. XL's 4 x 4 brick
# uses l = 4 (one token per patch) in both tables. The U variants use the released code's 16 x 16 (l = 8) middle brick.
CANVAS_BRICKS = {16: ((4, 2), (8, 4), (16, 2)), 32: ((4, 2), (8, 4), (32, 2)), 64: ((4, 2), (16, 8), (64, 2))}
U_MIDDLE = {16: (8, 4), 32: (16, 8), 64: (16, 8)}


def _registry() -> dict[str, LegoConfig]:
    configs = {}
    for size, (hidden, heads) in SIZES.items():
        for canvas, (small, large, image) in CANVAS_BRICKS.items():
            if canvas == 16 and size != "T":
                continue
            if size == "XL":
                small = (4, 4)
            pg = tuple(BrickSpec(r, l, d) for (r, l), d in zip((small, large, image), DEPTHS[size]))
            u_layout = (image, U_MIDDLE[canvas], (4, 2), U_MIDDLE[canvas], image)
            u_depths = U_DEPTHS_AT.get((size, canvas), U_DEPTHS[size])
            u = tuple(BrickSpec(r, l, d) for (r, l), d in zip(u_layout, u_depths))
            for stack, bricks in (("PG", pg), ("PR", pg[::-1]), ("U", u)):
                name = f"LEGO-{size}-{stack}-{canvas}"
                configs[name] = LegoConfig(name, bricks, hidden, heads, resolution=canvas)
    return configs


MODELS: dict[str, LegoConfig] = _registry()


def model_config(name: str, **overrides) -> LegoConfig:
    """The registry's config ``name`` with ``overrides`` applied (any LegoConfig field, or ``depths`` per brick)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    config = MODELS[name]
    depths = overrides.pop("depths", None)
    if depths is not None:
        if len(depths) != len(config.bricks):
            raise ValueError(f"{name} has {len(config.bricks)} bricks but {len(depths)} depths were given")
        overrides["bricks"] = tuple(dataclasses.replace(b, depth=d) for b, d in zip(config.bricks, depths))
    unknown = set(overrides) - {f.name for f in dataclasses.fields(LegoConfig)}
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(sorted(unknown))}")
    return dataclasses.replace(config, **overrides)


class BaseBrick(nn.Module):
    """Brick 0 of a stack on a pretrained base (Zheng et al., Sec. 3.3): runs ``denoiser`` (any D(x; sigma, labels)
    in EDM's view) and returns the raw output F_0 = (D - c_skip x) / c_out that reproduces its prediction, so the
    bricks above refine it as they refine an image-brick. lego.checkpoints.build loads bases, records their origin."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser
        self.brick_size = None  # the whole canvas, like an image-brick

    def num_patches(self, height: int, width: int) -> int:
        return 1

    def forward(self, x: torch.Tensor, noise: NoiseLevel, class_labels=None) -> torch.Tensor:
        """x [B, C, H, W] (not scaled by c_in) -> F_0 [B, C, H, W] with c_skip x + c_out F_0 = D_base."""
        frozen = not any(p.requires_grad for p in self.denoiser.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):  # a frozen base costs no backward
            d = self.denoiser(x, noise.sigma, class_labels).float()  # (B, C, H, W)
        c_skip, c_out = noise.c_skip.view(-1, 1, 1, 1), noise.c_out.view(-1, 1, 1, 1)
        return (d - c_skip * x) / c_out


class LegoStack(nn.Module):
    def __init__(self, config: LegoConfig, base: nn.Module | None = None):
        """``base``: the denoiser that ``config.base`` records as brick 0. The stack never reads a file: a config
        with a base is built by lego.checkpoints.build_model, which loads the base and passes it here."""
        super().__init__()
        if config.base and base is None:
            raise LegoError(
                f"{config.name} stacks on a pretrained base ({config.base.get('path') or config.base.get('class')}); "
                "build it with lego.checkpoints.build_model(config), which loads the base, or pass base=the module"
            )
        self.config = config
        d = config.hidden_size
        self.num_classes = config.num_classes
        self.in_channels = config.in_channels
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(config.num_classes, d) if config.num_classes else None
        self.bricks = nn.ModuleList(
            LegoBrick(
                b.brick_size, b.field_size, d, b.depth, config.num_heads, config.mlp_ratio, config.in_channels,
                has_prev=k > 0, backend=config.backend,
            )
            if not (k == 0 and config.base) else BaseBrick(base)
            for k, b in enumerate(config.bricks)
        )  # fmt: skip
        if config.base:
            self.bricks[0].requires_grad_(not config.base.get("frozen"))
        # Bricks on a base add their output to the one below, so the untrained stack is the base (see
        # lego.checkpoints.build). Recorded in the config: bases stacked before it ("refine" absent) keep plain bricks.
        self.refine = bool(config.base and config.base.get("refine"))
        self.num_bricks = len(config.bricks)
        self.max_brick = max(b.brick_size for b in config.bricks)
        self.top_is_image = config.bricks[-1].brick_size == self.max_brick
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

    def check_canvas(self, x: torch.Tensor) -> None:
        h, w = check_batch_of_canvases(x, self.in_channels)
        if h % self.max_brick or w % self.max_brick:
            raise ValueError(
                f"the canvas {h}x{w} is not divisible by the largest brick size {self.max_brick}; "
                f"use a height and width that are multiples of {self.max_brick}"
            )

    def brick_modules(self) -> list[nn.Module]:
        return list(self.bricks)

    def condition(self, c_noise: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """Per-image conditioning [B, d]: time embedding + class embedding (the null class when labels are None)."""
        c = self.t_embedder(c_noise)  # (B, d)
        if self.y_embedder is not None:
            if class_labels is None:
                class_labels = torch.full((c.shape[0],), self.num_classes, dtype=torch.long, device=c.device)
            c = c + self.y_embedder(torch.as_tensor(class_labels, device=c.device).reshape(-1).long())  # (B, d)
        return c

    def forward(
        self, x, noise: NoiseLevel, class_labels=None, skip=frozenset(), patches: PatchDraw | None = None, fill=None
    ) -> list[BrickOutput]:
        """The raw outputs of the bricks that run, bottom to top (see lego.networks.interface).

        With ``patches`` (training), each patch-brick (one with more than one patch on this canvas) processes
        ``patches.fraction`` of its patches per image; its other patches are taken from ``fill`` (the training target
        expressed as a brick output, i.e. x0), so the brick above sees a complete canvas."""
        batch, _, h, w = x.shape
        cond = self.condition(noise.c_noise, class_labels)  # (B, d)
        x_in = x * noise.c_in.view(-1, 1, 1, 1)  # (B, C, H, W)
        prev, outputs = None, []
        for k, brick in enumerate(self.bricks):
            if k in skip:
                continue  # the predecessor's output passes on unchanged
            patch_index = mask = None
            total = brick.num_patches(h, w)
            if patches is not None and patches.fraction < 1 and total > 1:
                keep = max(1, round(patches.fraction * total))
                start, rows = patches.share or (0, batch)
                scores = torch.rand(rows, total, generator=patches.generator, device=x.device)[start : start + batch]
                patch_index = scores.argsort(dim=1)[:, :keep].sort(dim=1).values  # (B, P)
                mask = _patch_mask(patch_index, total, brick.brick_size, h, w)
            if isinstance(brick, BaseBrick):
                prev = brick(x, noise, class_labels)  # F_0 that reproduces the base's D
            else:
                below = prev
                # The ids were drawn above, so the brick's input checks (and their device sync) are skipped.
                prev = brick(x_in, prev, cond, patch_index, fill if patch_index is not None else None, check=False)
                prev = prev.float()
                if self.refine and below is not None:  # F_k = F_{k-1} + f_k on the patches it processed
                    prev = below + prev if mask is None else torch.where(mask.bool(), below + prev, prev)
            outputs.append(BrickOutput(k, prev, patch_index, mask))
        return outputs


def _patch_mask(patch_index, total, brick_size, height, width):
    """[B, P] processed patch ids -> [B, 1, H, W] mask of the processed pixels."""
    batch = patch_index.shape[0]
    flags = torch.zeros(batch, total, device=patch_index.device).scatter_(1, patch_index, 1.0)
    flags = flags.view(batch, 1, height // brick_size, 1, width // brick_size, 1)
    return flags.expand(-1, -1, -1, brick_size, -1, brick_size).reshape(batch, 1, height, width)
