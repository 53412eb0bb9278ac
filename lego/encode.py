"""Encode a dataset into latents with an autoencoder, for latent-space training.

Usage: python -m lego.encode --vae PATH_OR_HUB_ID --data FOLDER_OR_NPZ --out latents.npy [--resolution 256]
         [--batch 32] [--half] [--device cuda]

Writes ``latents.npy`` (float [N, c, R/f, R/f], memory-mappable: ``python -m lego.train --data latents.npy``),
``latents.labels.npy`` when the data have labels, and ``latents.json`` with the autoencoder and the scaling and shift
factors it was encoded with (``lego.sample --vae`` decodes with them). A folder of images or a uint8 ``.npy`` is
streamed, never held in memory whole; an ``.npz`` or a named dataset (default, mnist, ...) is loaded first. Folder
images are center-cropped and resized to --resolution as ADM and DiT do; grey images are repeated to RGB.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lego import vae as vae_mod
from lego.checkpoint import atomic_write
from lego.data import image_files, load_dataset
from lego.errors import LegoError, run_cli
from lego.loader import MappedData, MemoryData

FORMAT = "lego-latents-1"


def center_crop_arr(image, size: int) -> np.ndarray:
    """ADM's preprocessing (Dhariwal & Nichol, guided-diffusion; also DiT's): halve with a box filter while the short
    side is at least 2 x size, resize it to size with bicubic, cut the central size x size square."""
    from PIL import Image

    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


class _Folder:
    def __init__(self, path: Path, resolution: int):
        self.files, labels = image_files(path)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.resolution = resolution

    def __len__(self):
        return len(self.files)

    def read(self, lo: int, hi: int) -> torch.Tensor:
        from PIL import Image

        arrays = []
        for p in self.files[lo:hi]:
            try:
                with Image.open(p) as im:
                    arrays.append(center_crop_arr(im.convert("RGB"), self.resolution))
            except OSError as e:
                raise LegoError(f"could not read the image {p} ({e})") from None
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (b, 3, R, R) uint8


class _Arrays:
    """A uint8 .npy (memory-mapped) or anything lego.data loads, resized per batch."""

    def __init__(self, data, resolution: int):
        self.data, self.resolution = data, resolution
        labels = getattr(data, "labels", None)
        self.labels = None if labels is None else labels.numpy()

    def __len__(self):
        return len(self.data)

    def read(self, lo: int, hi: int) -> torch.Tensor:
        x, _ = self.data[torch.arange(lo, hi)]
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x.contiguous(), size=(self.resolution,) * 2, mode="bilinear", antialias=True)
        return x.clamp(-1, 1)


def _source(spec: str, resolution: int | None):
    path = Path(spec).expanduser()
    if path.is_dir():
        return _Folder(path, resolution or 256)
    if spec.endswith(".npy"):
        if not path.is_file():
            raise LegoError(f"dataset {spec!r} not found")
        data = MappedData(path)
        if data.latent:
            raise LegoError(f"{spec} holds float latents already; lego.encode takes uint8 images")
    else:
        data = MemoryData(load_dataset(spec))
        if data.latent:
            raise LegoError(f"{spec} holds latents already; lego.encode takes images")
    return _Arrays(data, resolution or data.size[0])


def encode_dataset(vae: str, data: str, out: str, resolution: int | None = None, batch: int = 32, fp16: bool = False,
                   device: str | None = None, progress: bool = True) -> Path:
    """Encode ``data`` with the autoencoder ``vae`` into ``out`` (a .npy) and its sidecars; see the module docstring."""
    out = Path(out)
    if out.suffix != ".npy":
        raise LegoError(f"--out {out}: the latents are written as a .npy file; end the name in .npy")
    if batch <= 0 or (resolution is not None and resolution <= 0):
        raise LegoError(f"--batch and --resolution must be positive, got {batch} and {resolution}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = vae_mod.load_vae(vae, dev)
    source = _source(data, resolution)
    f = vae_mod.downsampling(model)
    side = source.resolution
    if side % f:
        raise LegoError(f"--resolution {side} is not a multiple of the autoencoder's downsampling factor {f}")
    scale, shift = vae_mod.factors(model)
    shape = (len(source), model.config.latent_channels, side // f, side // f)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        latents = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16 if fp16 else np.float32, shape=shape)
        for lo in tqdm(range(0, len(source), batch), disable=not progress, desc="lego.encode", dynamic_ncols=True):
            images = vae_mod.as_float_images(source.read(lo, min(lo + batch, len(source))), model.config.in_channels)
            latents[lo : lo + len(images)] = vae_mod.encode(model, images, scale, shift).cpu().numpy()
        latents.flush()
        del latents
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        labels_path, meta_path = out.with_suffix(".labels.npy"), out.with_suffix(".json")
        if source.labels is not None:
            atomic_write(labels_path, lambda t: np.save(open(t, "wb"), source.labels))  # noqa: SIM115 -- np.save closes
        else:
            labels_path.unlink(missing_ok=True)  # a stale one would label these latents wrongly
        meta = {"format": FORMAT, "vae": vae, "scaling_factor": scale, "shift_factor": shift, "resolution": side,
                "source": data, "count": shape[0], "latent_shape": list(shape[1:]), "encoding": "posterior mean"}
        atomic_write(meta_path, lambda t: Path(t).write_text(json.dumps(meta, indent=2)))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"lego.encode: wrote {out} ({shape[0]} latents {shape[1:]}, scaling {scale:g}, shift {shift:g})")
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lego.encode", description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", required=True, help="AutoencoderKL: a local folder (save_pretrained) or a hub id")
    p.add_argument("--data", required=True, help="a folder of images, a uint8 .npy, an .npz, or default | mnist ...")
    p.add_argument("--out", required=True, help="the latents' .npy (sidecars .labels.npy and .json beside it)")
    p.add_argument("--resolution", type=int, help="image side before encoding (default: 256 for a folder, else the "
                   "stored size)")
    p.add_argument("--batch", type=int, default=32, help="images per autoencoder call (default 32)")
    p.add_argument("--half", action="store_true", help="store float16 latents (half the disk)")
    p.add_argument("--device", help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return run_cli("lego.encode", lambda: encode_dataset(args.vae, args.data, args.out, args.resolution, args.batch,
                                                         args.half, args.device, not args.no_progress))


if __name__ == "__main__":
    sys.exit(main())
