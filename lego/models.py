"""LegoModel: a stack of LEGO bricks (PG, PR or U) with a shared time/class embedding and EDM-style calling.

``model(x, sigma, class_labels=None, skip=())`` returns the denoised D(x; sigma) = c_skip x + c_out F, where F is the
output of the top brick that ran; bricks listed in ``skip`` (0 = bottom; negative indices count from the top, -1 being
the top brick) are not run and pass their predecessor's output on. sigma must be >= 0; sigma = 0 returns x.

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

from lego.blocks import LabelEmbedder, TimestepEmbedder
from lego.brick import LegoBrick
from lego.precond import as_batch_sigma, make_precond


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
    base: dict | None = None  # a pretrained denoiser as brick 0 (lego.base): where it came from, frozen or not

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


@dataclass
class BrickOutput:
    index: int  # which brick (0 = bottom)
    output: torch.Tensor  # F_k on the full canvas, [B, C, H, W]
    patch_index: torch.Tensor | None  # [B, P] patches it processed, None for all
    mask: torch.Tensor | None = None  # [B, 1, H, W] 1 where processed (None for all)


class LegoModel(nn.Module):
    def __init__(self, config: LegoConfig, base: nn.Module | None = None):
        """``base``: the denoiser D(x, sigma, class_labels) that config.base records, when it cannot be rebuilt from
        the record (a Python module) or is already loaded (lego.base.stack_on_base)."""
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.precond = make_precond(config.precond, config.sigma_data)
        self.sigma_min, self.sigma_max = self.precond.sigma_min, self.precond.sigma_max
        self.num_classes = config.num_classes
        self.in_channels = config.in_channels
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(config.num_classes, d) if config.num_classes else None
        self.bricks = nn.ModuleList(
            LegoBrick(
                b.brick_size, b.field_size, d, b.depth, config.num_heads, config.mlp_ratio, config.in_channels,
                has_prev=k > 0, backend=config.backend,
            )
            if not (k == 0 and config.base) else None
            for k, b in enumerate(config.bricks)
        )
        if config.base:  # a pretrained denoiser replaces the bottom image-brick (lego.base)
            from lego.base import BaseBrick, build_base  # (lego.base loads checkpoints, which import this module)

            self.bricks[0] = BaseBrick(base if base is not None else build_base(config.base))
            self.bricks[0].requires_grad_(not config.base.get("frozen"))
        # Bricks on a base add their output to the one below, so the untrained stack is the base (see lego.base).
        # Recorded in the config: bases stacked before it ("refine" absent) keep their plain bricks.
        self.refine = bool(config.base and config.base.get("refine"))
        self.max_brick = max(b.brick_size for b in config.bricks)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

    @classmethod
    def from_name(cls, name: str, in_channels: int = 3, num_classes: int = 0, **overrides) -> LegoModel:
        return cls(model_config(name, in_channels=in_channels, num_classes=num_classes, **overrides))

    def check_canvas(self, x: torch.Tensor) -> None:
        h, w = check_batch_of_canvases(x, self.in_channels)
        if h % self.max_brick or w % self.max_brick:
            raise ValueError(
                f"the canvas {h}x{w} is not divisible by the largest brick size {self.max_brick}; "
                f"use a height and width that are multiples of {self.max_brick}"
            )

    def condition(self, c_noise: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """Per-image conditioning [B, d]: time embedding + class embedding (the null class when labels are None)."""
        scale = self.precond.embed_scale if self.config.time_scale is None else self.config.time_scale
        c = self.t_embedder(c_noise * scale)  # (B, d)
        if self.y_embedder is not None:
            if class_labels is None:
                class_labels = torch.full((c.shape[0],), self.num_classes, dtype=torch.long, device=c.device)
            c = c + self.y_embedder(torch.as_tensor(class_labels, device=c.device).reshape(-1).long())  # (B, d)
        return c

    def run_bricks(self, x, sigma, class_labels=None, skip=(), patch_fraction=1.0, fill=None, generator=None,
                   share=None):
        """Run the active bricks bottom to top on x (not yet scaled by c_in); returns one BrickOutput per brick run.

        patch_fraction < 1 (training): each patch-brick (one with more than one patch on this canvas) processes that
        fraction of its patches per image, drawn with ``generator``; its other patches are taken from ``fill`` (the
        training target expressed as a brick output, i.e. x0), so the brick above sees a complete canvas.
        ``share=(start, total)``: x holds rows start.. of a batch of ``total``; patches are drawn for all of them and
        these rows kept (see lego.loss), so a data-parallel run draws what a one-process run draws.
        """
        self.check_canvas(x)
        batch, _, h, w = x.shape
        sigma = as_batch_sigma(sigma, batch, x.device)
        n = len(self.bricks)
        out_of_range = [int(k) for k in skip if not -n <= int(k) < n]
        if out_of_range:
            raise ValueError(f"skip {out_of_range}: this model's bricks are 0..{n - 1} (or -{n}..-1 from the top)")
        skip = {int(k) % n for k in skip}  # negative indices count from the top, as in Python
        if len(skip) == len(self.bricks):
            raise ValueError("every brick is skipped; keep at least one")
        _, _, c_in, c_noise = self.precond.coefficients(sigma)
        cond = self.condition(c_noise, class_labels)  # (B, d)
        x_in = x * c_in.view(-1, 1, 1, 1)  # (B, C, H, W)
        prev, outputs = None, []
        for k, brick in enumerate(self.bricks):
            if k in skip:
                continue  # the predecessor's output passes on unchanged
            patch_index = mask = None
            total = brick.num_patches(h, w)
            if patch_fraction < 1 and total > 1:
                keep = max(1, round(patch_fraction * total))
                start, rows = share or (0, batch)
                scores = torch.rand(rows, total, generator=generator, device=x.device)[start : start + batch]
                patch_index = scores.argsort(dim=1)[:, :keep].sort(dim=1).values  # (B, P)
                mask = _patch_mask(patch_index, total, brick.brick_size, h, w)
            if getattr(brick, "is_base", False):
                prev = brick(x, sigma, class_labels, self.precond)  # F_0 that reproduces the base's D
            else:
                below = prev
                prev = brick(x_in, prev, cond, patch_index, fill if patch_index is not None else None,
                             check_ids=False).float()  # drawn above: valid ids, no device sync
                if self.refine and below is not None:  # F_k = F_{k-1} + f_k on the patches it processed
                    prev = below + prev if mask is None else torch.where(mask.bool(), below + prev, prev)
            outputs.append(BrickOutput(k, prev, patch_index, mask))
        return outputs

    def forward(self, x, sigma, class_labels=None, skip=()):
        """The denoiser D(x; sigma) [B, C, H, W] (fp32), from the top brick that runs."""
        return denoise(self, x, sigma, class_labels, skip)


def denoise(net, x, sigma, class_labels=None, skip=()) -> torch.Tensor:
    """D(x; sigma) [B, C, H, W] (fp32) of a denoiser whose ``run_bricks`` gives its outputs bottom to top (LegoModel,
    DiTModel): the top output under the preconditioning, and x itself where sigma = 0."""
    x = x.float()
    sigma_b = as_batch_sigma(sigma, x.shape[0], x.device)
    if not torch.compiler.is_compiling() and x.device.type != "meta":  # data-dependent: eager calls on data only
        check_inputs(sigma_b, class_labels, x.shape[0], net.num_classes)
    zero = sigma_b == 0  # D(x; 0) = x: there is no noise to remove (and c_noise = log 0 would poison the batch)
    sigma_b = torch.where(zero, torch.ones_like(sigma_b), sigma_b)
    top = net.run_bricks(x, sigma_b, class_labels, skip)[-1].output  # (B, C, H, W)
    c_skip, c_out, _, _ = net.precond.coefficients(sigma_b)
    d = c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * top  # (B, C, H, W)
    return torch.where(zero.view(-1, 1, 1, 1), x, d)


def check_inputs(sigma: torch.Tensor, class_labels, batch: int, num_classes: int) -> None:
    """A denoiser's call (LegoModel, DiTModel): sigma [B] finite and >= 0, class labels one id per image in
    0..num_classes (num_classes: the null class), none for an unconditional model."""
    labels = None if class_labels is None else check_label_ids(class_labels, batch, num_classes)
    # One host sync for all the value checks (a sampler calls this every step); the messages below only on failure.
    ok = (torch.isfinite(sigma) & (sigma >= 0)).all()
    if labels is not None:
        ok = ok & ((labels >= 0) & (labels <= num_classes)).all().to(ok.device)
    if bool(ok):
        return
    if not (torch.isfinite(sigma) & (sigma >= 0)).all():
        raise ValueError(f"sigma must be finite and >= 0 (0 returns x), got {sigma.tolist()[:8]}")
    raise ValueError(
        f"class labels must be in 0..{num_classes - 1} ({num_classes}: none, for guidance), "
        f"got {labels.min().item()}..{labels.max().item()}"
    )


def check_label_ids(class_labels, batch: int, num_classes: int) -> torch.Tensor:
    """``class_labels`` (a tensor or a list) holds one integer class id per image, for a model of ``num_classes``
    classes (0: unconditional, which takes none: the labels would be ignored); returns them as a tensor [batch]."""
    if not num_classes:
        raise ValueError("class labels given to an unconditional model (num_classes=0); pass class_labels=None, or "
                         "build the model with num_classes=K to condition it on K classes")
    labels = torch.as_tensor(class_labels).reshape(-1)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"class labels must be integer class ids, got {labels.dtype}")
    if labels.numel() != batch:
        raise ValueError(f"{labels.numel()} class labels for a batch of {batch}")
    return labels


def check_batch_of_canvases(x: torch.Tensor, in_channels: int) -> tuple[int, int]:
    """``x`` is [B, in_channels, H, W]; returns (H, W). Each model adds its own rule for H and W."""
    if x.dim() != 4:
        raise ValueError(f"expected a batch of canvases [B, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"the input has {x.shape[1]} channels but the model was built for {in_channels}")
    return x.shape[2], x.shape[3]


def _patch_mask(patch_index, total, brick_size, height, width):
    """[B, P] processed patch ids -> [B, 1, H, W] mask of the processed pixels."""
    batch = patch_index.shape[0]
    flags = torch.zeros(batch, total, device=patch_index.device).scatter_(1, patch_index, 1.0)
    flags = flags.view(batch, 1, height // brick_size, 1, width // brick_size, 1)
    return flags.expand(-1, -1, -1, brick_size, -1, brick_size).reshape(batch, 1, height, width)
