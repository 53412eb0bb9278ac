"""Every model this pipeline trains, by name: the LEGO stacks (lego.models) and the DiT baseline (lego.dit).

``build_model(model_config(name, ...))`` is how lego.train builds a model and ``build_model(config_from_dict(d))``
how lego.checkpoint rebuilds one, so a DiT checkpoint loads through the same path as a LEGO one.
"""

from __future__ import annotations

from lego.dit import DIT_MODELS, DiTConfig, DiTModel, dit_config
from lego.models import MODELS, LegoConfig, LegoModel
from lego.models import model_config as lego_config

MODEL_NAMES: tuple[str, ...] = (*MODELS, *DIT_MODELS)


def is_dit(name: str) -> bool:
    return name.startswith("DiT-")


def model_config(name: str, **overrides) -> LegoConfig | DiTConfig:
    """The config of any registry name (``LEGO-...`` or ``DiT-...``) with ``overrides`` applied."""
    if name not in MODELS and name not in DIT_MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    return dit_config(name, **overrides) if is_dit(name) else lego_config(name, **overrides)


def config_from_dict(d: dict) -> LegoConfig | DiTConfig:
    """A config written by ``config.to_dict()`` (a checkpoint's metadata) back into its class."""
    return DiTConfig.from_dict(d) if is_dit(str(d.get("name", ""))) else LegoConfig.from_dict(d)


def build_model(config: LegoConfig | DiTConfig) -> LegoModel | DiTModel:
    return DiTModel(config) if isinstance(config, DiTConfig) else LegoModel(config)


def bricks_of(model: LegoModel | DiTModel) -> list:
    """The modules holding a model's compute, one per brick: a LEGO stack's bricks, or a DiT's transformer (one
    brick). What --compile compiles and --fsdp shards."""
    return list(model.bricks) if isinstance(model, LegoModel) else [model.dit]
