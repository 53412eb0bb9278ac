"""LEGO diffusion bricks: the PyTorch layer (bricks, models, diffusion, samplers) over the lego_kernels fused ops."""

from lego.base import DiffusersDenoiser, stack_on_base
from lego.brick import LegoBrick
from lego.errors import LegoError
from lego.loss import LegoLoss
from lego.models import MODELS, BrickSpec, LegoConfig, LegoModel, model_config
from lego.panorama import SlidingWindow, panorama
from lego.precond import EDMPrecond, VPPrecond
from lego.sampling import ddim_sampler, ddpm_sampler, edm_sampler, guided, skip_schedule

__all__ = [
    "MODELS",
    "BrickSpec",
    "DiffusersDenoiser",
    "EDMPrecond",
    "LegoBrick",
    "LegoConfig",
    "LegoError",
    "LegoLoss",
    "LegoModel",
    "SlidingWindow",
    "VPPrecond",
    "ddim_sampler",
    "ddpm_sampler",
    "edm_sampler",
    "guided",
    "model_config",
    "panorama",
    "skip_schedule",
    "stack_on_base",
]
