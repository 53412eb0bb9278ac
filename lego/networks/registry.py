"""Every backbone this pipeline trains, by name: the LEGO stacks (lego.networks.stack) and the DiT baseline
(lego.networks.dit). ``model_config(name, ...)`` is how lego.train picks a configuration and ``config_from_dict(d)``
how a checkpoint's metadata is read back, so a DiT goes through the same paths as a LEGO stack.
"""

from __future__ import annotations

from lego.networks.dit import DIT_MODELS, DiTConfig, dit_config
from lego.networks.stack import MODELS, LegoConfig
from lego.networks.stack import model_config as lego_config

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
