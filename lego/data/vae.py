"""Latent diffusion's autoencoder: diffusers' ``AutoencoderKL`` (SD-VAE and its kin), as DiT and the paper use it.

Training data are latents ``z = (mean of the encoder's posterior - shift_factor) * scaling_factor``, the scaling
chosen so that z has about unit variance (SD-VAE: 0.18215, no shift). ``lego.encode`` stores the two factors with the
latents, ``lego.train`` copies them into its checkpoint, and ``lego.sample --vae`` undoes them before decoding.
diffusers is an optional dependency (the ``latent`` extra): it is imported where an autoencoder is loaded.
"""

from __future__ import annotations

import json
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from lego.errors import LegoError


def load_vae(spec: str, device) -> torch.nn.Module:
    """An AutoencoderKL from a local folder (written by ``save_pretrained``, or a pipeline folder with a ``vae``
    sub-folder) or a hub id (``stabilityai/sd-vae-ft-ema``) where the machine can reach the hub."""
    try:  # optional: only latent models need it
        from diffusers import AutoencoderKL
    except ImportError:
        raise LegoError("--vae needs diffusers: pip install diffusers (or this package's [latent] extra)") from None
    path = Path(spec).expanduser()
    local = path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if local and not path.is_dir():
        raise LegoError(f"--vae {spec}: no such folder; give a folder written by AutoencoderKL.save_pretrained")
    if local and not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"  # a whole pipeline's folder
    if local and (path / "config.json").is_file():
        try:
            kind = json.loads((path / "config.json").read_text()).get("_class_name")
        except (ValueError, AttributeError):
            kind = "unreadable"
        if kind not in (None, "AutoencoderKL"):
            raise LegoError(f"--vae {spec} holds a {kind}, not an AutoencoderKL; give the autoencoder's folder")
    offline = (
        not local and not hub_reachable()
    )  # then only the local hub cache can serve it, without a minute of retries
    try:
        with warnings.catch_warnings():  # diffusers passes huggingface_hub an argument it deprecated: not the user's
            warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")
            vae = AutoencoderKL.from_pretrained(str(path) if local else spec, local_files_only=offline)
    except Exception as e:  # noqa: BLE001 -- missing files, no network, a wrong format: all mean "cannot load it"
        if offline:
            raise LegoError(
                f"--vae {spec}: the hub is not reachable from this machine and {spec} is not in its local "
                "cache; give a folder written by AutoencoderKL.save_pretrained"
            ) from None
        raise LegoError(f"could not load the autoencoder {spec!r}: {str(e).splitlines()[0]}") from None
    return vae.to(device).eval().requires_grad_(False)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub's endpoint opens within ``timeout`` seconds."""
    from huggingface_hub import constants  # (comes with diffusers)

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def factors(vae, meta: dict | None = None) -> tuple[float, float]:
    """(scaling_factor, shift_factor): those stored with the latents if given, else the autoencoder's own."""
    if meta and "scaling_factor" in meta:
        return float(meta["scaling_factor"]), float(meta.get("shift_factor") or 0.0)
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


def downsampling(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode(vae, images: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> latents [B, c, H/f, W/f] (the posterior's mean, shifted and scaled)."""
    images = images.to(vae.device, vae.dtype)
    return (vae.encode(images).latent_dist.mean.float() - shift) * scale


@torch.no_grad()
def decode(vae, latents: torch.Tensor, scale: float, shift: float, batch: int = 16) -> torch.Tensor:
    """Latents [B, c, h, w] -> images [B, 3, h f, w f] in [-1, 1] (on the CPU)."""
    if latents.shape[1] != vae.config.latent_channels:
        raise LegoError(
            f"the samples have {latents.shape[1]} channels but the autoencoder's latents have "
            f"{vae.config.latent_channels}; give the --vae the latents were made with"
        )
    out = []
    for chunk in latents.split(batch):
        z = chunk.to(vae.device, vae.dtype) / scale + shift
        out.append(vae.decode(z).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def as_float_images(x: np.ndarray | torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 [B, C, H, W] (C = 1, 3 or 4) -> float [B, channels, H, W] in [-1, 1]: grey repeated, alpha dropped."""
    x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 4 and channels == 3:
        x = x[:, :3]
    if x.shape[1] != channels:
        raise LegoError(f"the images have {x.shape[1]} channels but the autoencoder takes {channels}")
    return x.contiguous()
