"""What is benchmarked: the op shape, the brick, the models and the sampler settings, full size or smoke size.

Full size (a GPU): the XL op shape is B = 256 latents of 32 x 32 x 4 cut into 4 x 4 bricks with l = 2 fields (S = 4
tokens per patch, N = 256 * 64 = 16384 sequences), d = 1152, 16 heads of 72, bf16; the brick above the bottom one
(it reads [x_t, prev, coordinates], C' = 10). Models: LEGO-XL-PG/PR/U-32 against DiT-XL/2 and DiT-S/2 on 32 x 32 x 4
latents, LEGO-S/L-PG-64 against DiT-S/2 and DiT-L/2 on 64 x 64 x 3 pixels, 1000 classes.

Smoke size (LEGO_BENCH_SMOKE=1): the same cases under the same names, built tiny (LEGO-T bricks with d = 32, a
two-layer DiT, 16 x 16 canvases, batch 2, fp32 ops) so the whole harness runs on a CPU in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks.counts import OpShape, dit_flops, lego_flops
from benchmarks.harness import SMOKE

# ---------------------------------------------------------------------------------------------------------------------
# Ops and the brick

if SMOKE:
    OP_SHAPE = OpShape(
        batch=2, channels=4, height=8, width=8, brick=4, field=2, hidden=32, heads=2, dtype=torch.float32
    )
    OP_SWEEP_BATCHES = (1, 2)
    BRICK_DEPTH = 1
else:
    OP_SHAPE = OpShape(batch=256, channels=4, height=32, width=32, brick=4, field=2, hidden=1152, heads=16,
                       dtype=torch.bfloat16)  # fmt: skip
    OP_SWEEP_BATCHES = (32, 64, 128, 256)  # the speed-up against batch size plot
    BRICK_DEPTH = 2  # the brick benchmark's blocks (compile time grows with depth; per-block cost does not)

OP_MODES = ("fwd", "fwd+bwd")

# The ops at every brick shape of LEGO-XL-PG-32 (S = 1, 4, 256) and LEGO-S-PG-64 (S = 4, 4, 1024), batch 256. The
# bottom bricks read [x_t, coordinates] only. (S > 16 attention runs on SDPA whatever the backend.)
if SMOKE:
    BRICK_SHAPES = {
        "smoke r4 l4 (S=1)": OpShape(2, 4, 8, 8, 4, 4, 32, 2, torch.float32, has_prev=False),
        "smoke r8 l2 (S=16)": OpShape(2, 4, 8, 8, 8, 2, 32, 2, torch.float32),
    }
else:
    _XL = {"batch": 256, "channels": 4, "height": 32, "width": 32, "hidden": 1152, "heads": 16, "dtype": torch.bfloat16}
    _S = {"batch": 256, "channels": 3, "height": 64, "width": 64, "hidden": 384, "heads": 6, "dtype": torch.bfloat16}
    BRICK_SHAPES = {
        "LEGO-XL-PG-32 r4 l4 (S=1)": OpShape(brick=4, field=4, has_prev=False, **_XL),
        "LEGO-XL-PG-32 r8 l4 (S=4)": OpShape(brick=8, field=4, **_XL),
        "LEGO-XL-PG-32 r32 l2 (S=256)": OpShape(brick=32, field=2, **_XL),
        "LEGO-S-PG-64 r4 l2 (S=4)": OpShape(brick=4, field=2, has_prev=False, **_S),
        "LEGO-S-PG-64 r16 l8 (S=4)": OpShape(brick=16, field=8, **_S),
        "LEGO-S-PG-64 r64 l2 (S=1024)": OpShape(brick=64, field=2, **_S),
    }

# The patch_embed backward alone, path by path (bench_patch_embed_bwd.py), at batch 64 and 256: the brick shapes of the
# static profile's patch_embed backward cases (tests/test_static_profile.py KNOWN_VIOLATIONS), and the two bottom bricks
# (no prev), whose backward needs no input gradient (x_t and the coordinates need none) and runs the weight kernel
# alone.
if SMOKE:
    PATCH_EMBED_BWD_BATCHES = (1, 2)
    PATCH_EMBED_BWD_SHAPES = {
        "smoke r4 l2 (S=4)": OpShape(2, 4, 16, 16, 4, 2, 32, 2, torch.float32),  # 32 patches at B 2: 3 tiles
        "smoke r4 l4 (S=1)": OpShape(2, 4, 8, 8, 4, 4, 32, 2, torch.float32, has_prev=False),
    }
else:
    PATCH_EMBED_BWD_BATCHES = (64, 256)
    PATCH_EMBED_BWD_SHAPES = {
        "LEGO-XL-U-32 r16 l8 (S=4)": OpShape(brick=16, field=8, **_XL),
        "LEGO-S-PG-64 r16 l8 (S=4)": OpShape(brick=16, field=8, **_S),
        "LEGO-XL-PG-32 r8 l4 (S=4)": OpShape(brick=8, field=4, **_XL),
        "LEGO-XL-U-32 r4 l2 (S=4)": OpShape(brick=4, field=2, **_XL),
        "LEGO-XL-PG-32 r4 l4 (S=1)": OpShape(brick=4, field=4, has_prev=False, **_XL),
        "LEGO-XL-PG-32 r32 l2 (S=256)": OpShape(brick=32, field=2, **_XL),
        "LEGO-S-PG-64 r64 l2 (S=1024)": OpShape(brick=64, field=2, **_S),
        "LEGO-S-PG-64 r4 l2 (S=4)": OpShape(brick=4, field=2, has_prev=False, **_S),
    }

# The L2 atomic probe (benchmarks/l2_atomics.py): fp32 adds of 16-byte vectors into a buffer that stays in L2 (50 MB on
# an H100/H200; the backward's dweight accumulators are 30 KB to 2.9 MB), many programs adding many times: 1024
# programs, each adding 1024 tiles of 4 KB (the whole 4 MB buffer once, as a fused program adds its whole share of
# dweight): 4.3 GB of atomic traffic per call.
if SMOKE:
    L2_PROBE = {"buffer_bytes": 2 * 64 * 4, "block": 64, "programs": 4, "iters": 3}
else:
    L2_PROBE = {"buffer_bytes": 4 << 20, "block": 1024, "programs": 1024, "iters": 1024}

# ---------------------------------------------------------------------------------------------------------------------
# Models

NUM_CLASSES = 10 if SMOKE else 1000


@dataclass(frozen=True)
class Group:
    """One canvas that models are compared on, side by side at the same batch."""

    name: str
    channels: int
    resolution: int
    train_batch: int
    sample_batch: int


if SMOKE:
    LATENT = Group("latent-32x32x4", 4, 16, 2, 2)
    PIXEL = Group("pixel-64x64x3", 3, 16, 2, 2)
else:
    # DiT-XL/2 at batch 64 takes ~25 GB for a bf16-autocast step; DiT-L/2 on 1024 tokens at batch 32 about as much.
    LATENT = Group("latent-32x32x4", 4, 32, 64, 128)
    PIXEL = Group("pixel-64x64x3", 3, 64, 32, 64)

DIT_CONFIGS = {  # diffusers DiTTransformer2DModel arguments
    "DiT-XL/2": {"num_attention_heads": 16, "attention_head_dim": 72, "num_layers": 28, "patch_size": 2},
    "DiT-L/2": {"num_attention_heads": 16, "attention_head_dim": 64, "num_layers": 24, "patch_size": 2},
    "DiT-S/2": {"num_attention_heads": 6, "attention_head_dim": 64, "num_layers": 12, "patch_size": 2},
}
SMOKE_DIT = {"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2, "patch_size": 2}


@dataclass(frozen=True)
class ModelCase:
    name: str  # the name reported: "LEGO-XL-PG-32", "DiT-XL/2"
    group: Group
    patch_fraction: float = 1.0  # LEGO training: share of a patch-brick's patches processed
    backend: str = "auto"  # LEGO's lego_kernels backend

    @property
    def is_dit(self) -> bool:
        return self.name.startswith("DiT")

    @property
    def label(self) -> str:
        out = self.name
        if self.patch_fraction < 1:
            out += f" (patches {self.patch_fraction:.0%})"
        if self.backend != "auto":
            out += f" [{self.backend} backend]"
        return out

    @property
    def id(self) -> str:
        return self.label.replace("/", "_").replace(" ", "_").replace("%", "pct").replace("(", "").replace(")", "")

    def config(self) -> dict:
        """What is built: LegoModel.from_name's arguments, or DiTTransformer2DModel's."""
        g = self.group
        if self.is_dit:
            cfg = dict(SMOKE_DIT if SMOKE else DIT_CONFIGS[self.name])
            return cfg | {"in_channels": g.channels, "sample_size": g.resolution}
        if SMOKE:
            stack = self.name.split("-")[2]
            depths = (1,) * (5 if stack == "U" else 3)
            tiny = {"name": f"LEGO-T-{stack}-16", "hidden_size": 32, "num_heads": 2, "depths": depths}
        else:
            tiny = {"name": self.name}
        return tiny | {"in_channels": g.channels, "num_classes": NUM_CLASSES, "backend": self.backend}

    def build(self, device: torch.device):
        """The network (EDM-preconditioned, called as net(x, sigma, labels)); DiT needs diffusers (else a skip)."""
        if self.is_dit:
            import pytest

            from benchmarks.dit import build_dit, diffusers_missing

            why = diffusers_missing()
            if why:
                pytest.skip(why)
            return build_dit(self.config(), NUM_CLASSES, device, self.name)
        from lego import LegoModel

        cfg = self.config()
        name = cfg.pop("name")
        with torch.device(device):
            model = LegoModel.from_name(name, **cfg)
        return model.to(device)

    def forward_flops(self, net, batch: int, skip=(), patch_fraction: float = 1.0) -> int:
        r = self.group.resolution
        if self.is_dit:
            return sum(dit_flops(net.net.dit.config, batch, r, r).values())
        return sum(lego_flops(net.config, batch, r, r, patch_fraction, skip).values())


def _case(name, group, **kw):
    return ModelCase(name, group, **kw)


TRAIN_CASES = [
    _case("LEGO-XL-PG-32", LATENT),
    _case("LEGO-XL-PR-32", LATENT),
    _case("LEGO-XL-U-32", LATENT),
    _case("DiT-XL/2", LATENT),
    _case("DiT-S/2", LATENT),
    _case("LEGO-S-PG-64", PIXEL),
    _case("LEGO-L-PG-64", PIXEL),
    _case("DiT-S/2", PIXEL),
    _case("DiT-L/2", PIXEL),
]
# Extra rows, later in the run: the paper's ImageNet setting (75% of the patch-bricks' patches) and the same model on
# the plain-PyTorch reference ops (what the fused kernels buy at model level).
TRAIN_EXTRA_CASES = [
    _case("LEGO-XL-PG-32", LATENT, patch_fraction=0.75),
    _case("LEGO-XL-PG-32", LATENT, backend="torch"),
]
# Which LEGO model is compared with which DiT (same group, same batch) in the report's ratios.
PAIRS = {
    "LEGO-XL-PG-32": "DiT-XL/2", "LEGO-XL-PR-32": "DiT-XL/2", "LEGO-XL-U-32": "DiT-XL/2",
    "LEGO-S-PG-64": "DiT-S/2", "LEGO-L-PG-64": "DiT-L/2",
}  # fmt: skip
TRAIN_SWEEP_CASES = [_case("LEGO-XL-PG-32", LATENT), _case("DiT-XL/2", LATENT)]
TRAIN_SWEEP_BATCHES = (1,) if SMOKE else (16, 32, 128)  # with LATENT.train_batch
TRAIN_LARGE_BATCH = 4 if SMOKE else 256  # the paper's batch: LEGO-XL-PG-32 and DiT-XL/2 (which may not fit: a skip)

# `python -m benchmarks.report --quick`: the rows a 5-minute GPU session can afford. The fused ops (no torch.compile),
# the ops at each brick shape, and LEGO-XL-PG-32 against DiT-XL/2: training at the group's batch and at 256, and
# the headline sampling rows (Heun, no guidance, t_break 0 and 0.5).
QUICK_MODELS = ("LEGO-XL-PG-32", "DiT-XL/2")


def quick_train(case: ModelCase) -> bool:
    return case.name in QUICK_MODELS and case.group is LATENT and case.patch_fraction == 1 and case.backend == "auto"


# ---------------------------------------------------------------------------------------------------------------------
# Sampling: equal NFE for every sampler (Heun with n steps makes 2n - 1 network calls; DDPM then runs 2n - 1 steps)

HEUN_STEPS = 2 if SMOKE else 5
NFE = 2 * HEUN_STEPS - 1
CFG_SCALE = 1.5
T_BREAK = 0.5


@dataclass(frozen=True)
class SampleCase:
    model: ModelCase
    sampler: str  # "heun" | "ddpm"
    cfg: float = 1.0
    t_break: float = 0.0
    priority: int = 2

    @property
    def id(self) -> str:
        return f"{self.model.id}-{self.sampler}-cfg{self.cfg:g}-tbreak{self.t_break:g}"

    @property
    def steps(self) -> int:
        return HEUN_STEPS if self.sampler == "heun" else NFE


def quick_sample(case: SampleCase) -> bool:
    return quick_train(case.model) and case.sampler == "heun" and case.cfg == 1.0


def _sample_cases() -> list[SampleCase]:
    out = []
    lego, dit = _case("LEGO-XL-PG-32", LATENT), _case("DiT-XL/2", LATENT)
    for sampler in ("heun", "ddpm"):  # the headline pair: every combination
        for cfg in (1.0, CFG_SCALE):
            out += [SampleCase(lego, sampler, cfg, t) for t in (0.0, T_BREAK)]
            out.append(SampleCase(dit, sampler, cfg))
    for name, group in (("LEGO-XL-PR-32", LATENT), ("LEGO-XL-U-32", LATENT), ("LEGO-S-PG-64", PIXEL)):
        out += [SampleCase(_case(name, group), "heun", 1.0, t, priority=5) for t in (0.0, T_BREAK)]
    out.append(SampleCase(_case("DiT-S/2", PIXEL), "heun", priority=5))
    out += [SampleCase(_case("LEGO-L-PG-64", PIXEL), "heun", 1.0, t, priority=6) for t in (0.0, T_BREAK)]
    out.append(SampleCase(_case("DiT-L/2", PIXEL), "heun", priority=6))
    return out


SAMPLE_CASES = _sample_cases()


def describe() -> dict:
    """What this run benchmarks, for the report."""
    return {
        "op_shape": OP_SHAPE.as_dict(),
        "brick_shapes": {name: shape.as_dict() for name, shape in BRICK_SHAPES.items()},
        "patch_embed_bwd_shapes": {name: shape.as_dict() for name, shape in PATCH_EMBED_BWD_SHAPES.items()},
        "patch_embed_bwd_batches": list(PATCH_EMBED_BWD_BATCHES),
        "l2_probe": dict(L2_PROBE),
        "train_large_batch": TRAIN_LARGE_BATCH,
        "op_sweep_batches": list(OP_SWEEP_BATCHES),
        "brick_depth": BRICK_DEPTH,
        "groups": {
            g.name: {
                "channels": g.channels,
                "resolution": g.resolution,
                "train_batch": g.train_batch,
                "sample_batch": g.sample_batch,
            }
            for g in (LATENT, PIXEL)
        },
        "train_sweep_batches": sorted({*TRAIN_SWEEP_BATCHES, LATENT.train_batch}),
        "sampling": {"heun_steps": HEUN_STEPS, "nfe": NFE, "cfg_scale": CFG_SCALE, "t_break": T_BREAK},
        "pairs": dict(PAIRS),
        "num_classes": NUM_CLASSES,
        "dit_configs": {} if SMOKE else DIT_CONFIGS,
    }
