"""The Fréchet distance (Heusel et al., 2017) between feature statistics, and the reference statistics of a dataset,
computed once and cached (next to a dataset file or folder; for the named datasets under ~/.cache/lego)."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import torch

from lego.data.datasets import NAMED, open_dataset
from lego.data.loader import prepare
from lego.files import atomic_write


def feature_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (float64) of features [N, D]."""
    f = features.double()
    return f.mean(0).numpy(), torch.cov(f.T).numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)); tr (S1 S2)^(1/2) is the sum of the square roots of the eigenvalues
    of S1^(1/2) S2 S1^(1/2), a symmetric PSD matrix, so two symmetric eigendecompositions replace scipy's sqrtm."""
    mu1, mu2, s1, s2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, mu2, sigma1, sigma2))
    w, v = torch.linalg.eigh(s1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T  # S1^(1/2)
    middle = root1 @ s2 @ root1
    tr_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_root)


def cache_root() -> Path:
    """Where the statistics of the named datasets are cached: $LEGO_CACHE, default ~/.cache/lego."""
    return Path(os.environ.get("LEGO_CACHE", Path.home() / ".cache" / "lego"))


def cache_path(data: str, tag: str) -> Path:
    """Where statistics tagged ``tag`` of the dataset ``data`` are cached: beside a dataset file or folder (named for
    its path, size and modification time, so that a changed file is read again), under cache_root() for the named
    datasets."""
    if data in NAMED:
        return cache_root() / f"{tag}-{data}.npz"
    path = Path(data).expanduser().resolve()
    stat = path.stat()
    key = hashlib.sha1(f"{path}:{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()[:10]
    return path.parent / f".{path.name}.{tag}-{key}.npz"


def dataset_images(dataset, resolution: int, batch: int = 10000):
    """A dataset's images at ``resolution``, float [-1, 1] batches of ``batch`` (a mapped dataset is read a slice at a
    time), as lego.train reads them."""
    for start in range(0, len(dataset), batch):
        images, _ = dataset[torch.arange(start, min(start + batch, len(dataset)))]
        yield prepare(images, resolution, None)


def save_cache(path: Path, **arrays) -> None:
    """Write reference statistics to ``path``; a folder that cannot be written (a read-only dataset folder) only
    means they are computed again next time."""
    try:
        atomic_write(path, lambda tmp: np.savez(tmp, **arrays))
    except OSError as e:
        print(f"lego.eval: could not cache the reference statistics at {path} ({e})", file=sys.stderr)


def reference_stats(data: str, resolution: int, extractor, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """The training set's feature statistics at the model's resolution, computed once and cached."""
    path = cache_path(data, f"fd-ref-{tag}-{resolution}px")
    if path.is_file():
        with np.load(path) as z:
            return z["mu"], z["sigma"]
    dataset = open_dataset(data, resolution)  # what lego.train reads
    feats = [extractor(images)[0] for images in dataset_images(dataset, resolution)]
    mu, sigma = feature_stats(torch.cat(feats))
    save_cache(path, mu=mu, sigma=sigma)
    return mu, sigma
