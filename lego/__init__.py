"""LEGO diffusion bricks: the PyTorch layer (bricks, models, diffusion, samplers) over the lego_kernels fused ops.

The layers, each importing only those below it: lego.networks -> lego.diffusion -> lego.data, lego.checkpoints ->
lego.generation -> lego.training, lego.metrics -> the commands (lego.train, lego.sample, lego.eval, lego.encode,
lego.convert, lego.heldout); lego.errors, lego.checks, lego.files and lego.ranks under all of them (see the README's
"How the code is laid out"). This module gathers the public names.
"""

from lego.checkpoints.build import build_model, stack_on_base
from lego.checkpoints.build import load_model as load
from lego.diffusion.denoiser import Denoiser, DiTModel, LegoModel
from lego.diffusion.diffusers import DiffusersDenoiser
from lego.diffusion.generate import generate, panorama
from lego.diffusion.loss import LegoLoss
from lego.diffusion.precond import EDMPrecond, VPPrecond
from lego.diffusion.samplers import ddim_sampler, ddpm_sampler, dpmpp_2m_sampler, edm_sampler, guided, skip_schedule
from lego.diffusion.window import SlidingWindow
from lego.errors import LegoError
from lego.networks.brick import LegoBrick
from lego.networks.stack import MODELS, BrickSpec, LegoConfig, model_config

__all__ = [
    "MODELS",
    "BrickSpec",
    "Denoiser",
    "DiTModel",
    "DiffusersDenoiser",
    "EDMPrecond",
    "LegoBrick",
    "LegoConfig",
    "LegoError",
    "LegoLoss",
    "LegoModel",
    "SlidingWindow",
    "VPPrecond",
    "build_model",
    "ddim_sampler",
    "dpmpp_2m_sampler",
    "ddpm_sampler",
    "edm_sampler",
    "generate",
    "guided",
    "load",
    "model_config",
    "panorama",
    "skip_schedule",
    "stack_on_base",
]
