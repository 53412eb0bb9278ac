"""Encoding a dataset into latents with an autoencoder, for latent-space training (``python -m lego.encode``).

Writes ``latents.npy`` (float [N, c, R/f, R/f], memory-mappable: ``python -m lego.train --data latents.npy``),
``latents.labels.npy`` when the data have labels, and ``latents.json`` with the autoencoder and the scaling and shift
factors it was encoded with (``lego.sample --vae`` decodes with them). A folder of images or a uint8 ``.npy`` is
streamed, never held in memory whole; an ``.npz`` or a named dataset (default, mnist, ...) is loaded first. Images are
read as training reads them (lego.data.datasets: a folder's cropped by ADM's center crop); grey images are repeated to
RGB. Existing files are replaced only with ``overwrite``; the .npy is written in a temporary folder and renamed into
place last (lego.files.atomic_write), so a killed encode leaves no half-written latents, and its temporary file is
removed by the next write into that folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lego import checks
from lego.data.datasets import MappedData, open_dataset
from lego.data.loader import prepare
from lego.data.vae import as_float_images, downsampling, encode, factors, load_vae
from lego.errors import LegoError
from lego.files import atomic_write, check_new_files

FORMAT = "lego-latents-1"


def _images(spec: str, resolution: int | None):
    """The images to encode as open_dataset reads them (a folder's at 256 unless told, cropped as for training), and
    the side they are encoded at. Other sources are read at their size and resized batch by batch."""
    folder = Path(spec).expanduser().is_dir()
    data = open_dataset(spec, (resolution or 256) if folder else None)
    if data.latent:
        floats, takes = ("float ", "uint8 images") if isinstance(data, MappedData) else ("", "images")
        raise LegoError(f"{spec} holds {floats}latents already; lego.encode takes {takes}")
    return data, resolution or data.size[0]


def encode_dataset(
    vae: str,
    data: str,
    out: str,
    resolution: int | None = None,
    batch: int = 32,
    fp16: bool = False,
    device: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Encode ``data`` with the autoencoder ``vae`` into ``out`` (a .npy) and its sidecars; see the module docstring."""
    out = Path(out)
    if out.suffix != ".npy":
        raise LegoError(f"--out {out}: the latents are written as a .npy file; end the name in .npy")
    labels_path, meta_path = out.with_suffix(".labels.npy"), out.with_suffix(".json")
    check_new_files([out, labels_path, meta_path], overwrite)
    if batch <= 0 or (resolution is not None and resolution <= 0):
        raise LegoError(f"--batch and --resolution must be positive, got {batch} and {resolution}")
    dev = checks.device(device)
    model = load_vae(vae, dev)
    source, side = _images(data, resolution)
    f = downsampling(model)
    if side % f:
        raise LegoError(f"--resolution {side} is not a multiple of the autoencoder's downsampling factor {f}")
    scale, shift = factors(model)
    shape = (len(source), model.config.latent_channels, side // f, side // f)
    meta = {
        "format": FORMAT,
        "vae": vae,
        "scaling_factor": scale,
        "shift_factor": shift,
        "resolution": side,
        "source": data,
        "count": shape[0],
        "latent_shape": list(shape[1:]),
        "encoding": "posterior mean",
    }

    def write(tmp):
        latents = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16 if fp16 else np.float32, shape=shape)
        for lo in tqdm(range(0, len(source), batch), disable=not progress, desc="lego.encode", dynamic_ncols=True):
            x, _ = source[torch.arange(lo, min(lo + batch, len(source)))]
            images = as_float_images(prepare(x, side, None), model.config.in_channels)
            latents[lo : lo + len(images)] = encode(model, images, scale, shift).cpu().numpy()
        latents.flush()
        del latents
        # the sidecars before the .npy is renamed into place: the latents never appear without them
        if source.labels is not None:
            atomic_write(labels_path, lambda t: np.save(open(t, "wb"), source.labels.numpy()))  # noqa: SIM115 -- np.save closes
        else:
            labels_path.unlink(missing_ok=True)  # a stale one would label these latents wrongly
        atomic_write(meta_path, lambda t: Path(t).write_text(json.dumps(meta, indent=2)))

    atomic_write(out, write)
    print(f"lego.encode: wrote {out} ({shape[0]} latents {shape[1:]}, scaling {scale:g}, shift {shift:g})")
    return out
