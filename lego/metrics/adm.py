"""The ADM evaluation protocol (Dhariwal & Nichol, 2021: guided-diffusion's ``evaluations/evaluator.py``, the one
DiT, SiT, EDM's ImageNet numbers and the LEGO paper report) in PyTorch: FID, sFID, Inception Score, precision and
recall, on the features of the TF Inception-v3 graph of 2015-12-05 as torch-fidelity ports it.

- ``fid``: the Fréchet distance of the 2048-d pool_3 features.
- ``sfid``: the Fréchet distance of the spatial features ``mixed_6/conv`` (Mixed_6d's 1x1 branch, after its ReLU),
  first 7 of 192 channels at 17 x 17, flattened in TF's (h, w, c) order: 2023-d, so that an ADM reference batch's
  stored ``mu_s`` / ``sigma_s`` apply.
- ``inception_score``: exp E KL(p(y|x) || p(y)) on softmax(pool_3 W) without the bias (ADM's softmax graph), the mean
  over splits of 5000 samples.
- ``precision`` / ``recall`` (Kynkäänniemi et al., 2019): the share of samples inside some reference image's
  3-nearest-neighbour ball, and of reference images inside some sample's; squared Euclidean distances on pool_3.

Why torch-fidelity: it is the maintained PyTorch port whose Inception-v3 reproduces the TF graph (its weights are
converted from the same graph, its resize is TF1's bilinear resize), and torchmetrics' FID builds on it; pytorch-fid
and clean-fid build theirs on torchvision's model. Its module needs torch alone: where torchvision is missing (a
CPU-only torch has no matching torchvision build to install), it is loaded without the package's ``__init__``, which
imports the other feature extractors through torchvision.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lego.data.datasets import NAMED, open_dataset
from lego.errors import LegoError
from lego.files import sha256
from lego.metrics.frechet import cache_path, dataset_images, feature_stats, frechet_distance, save_cache

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's converted TF Inception-v3
INCEPTION_HINT = (
    f"copy {INCEPTION_FILE} (torch-fidelity's v0.2.0 release on GitHub: github.com/toshas/torch-fidelity/releases/"
    "download/v0.2.0/) to this machine and pass --inception-weights PATH, or put it in torch hub's checkpoints folder"
)
SPATIAL_CHANNELS = 7  # ADM: mixed_6/conv[..., :7]
IS_SPLIT = 5000
NEIGHBOURS = 3


def inception_class():
    """torch-fidelity's FeatureExtractorInceptionV3 (see the module docstring for the torchvision-free path)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ModuleNotFoundError as e:
        if e.name != "torchvision":
            raise LegoError(f"the Inception metrics need torch-fidelity ({e}): pip install torch-fidelity") from None
        for name in [m for m in sys.modules if m == "torch_fidelity" or m.startswith("torch_fidelity.")]:
            del sys.modules[name]  # the half-imported package
        spec = importlib.util.find_spec("torch_fidelity")
        sys.modules["torch_fidelity"] = importlib.util.module_from_spec(spec)  # its __init__ is not run
        module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
        FeatureExtractorInceptionV3 = module.FeatureExtractorInceptionV3
    return FeatureExtractorInceptionV3


def weights_path(weights: str | None) -> Path | None:
    """The Inception-v3 weights file: ``weights``, else torch hub's copy; None when that is not there yet (it is
    downloaded then)."""
    if weights is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        return cached if cached.is_file() else None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise LegoError(
            f"the Inception metrics need the Inception-v3 weights, and {path} does not exist: {INCEPTION_HINT}"
        )
    return path


class InceptionFeatures:
    """ADM's features of uint8 RGB images: ``self(images [N, 3, H, W] uint8) -> {"pool": [N, 2048], "spatial":
    [N, 2023], "probs": [N, 1008]}`` (float32, CPU); images are resized to 299 x 299 inside, as TF's graph does."""

    def __init__(self, weights: str | None, device="cpu"):
        cls = inception_class()  # (the package first: without it, the weights are no use)
        path = weights_path(weights)
        try:
            net = cls("inception-v3-compat", ["2048", "logits_unbiased"],
                      feature_extractor_weights_path=None if path is None else str(path))  # fmt: skip
        except Exception as e:  # noqa: BLE001 -- network, unpickling and key errors: no usable weights either way
            what = "could not download the Inception-v3 weights" if path is None else (
                f"{path} is not torch-fidelity's Inception-v3 weights")  # fmt: skip
            raise LegoError(f"{what} ({str(e)[:200]}): {INCEPTION_HINT}") from None
        self.net = net.to(device)
        self.device = device
        self._spatial = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self._spatial = output  # (B, 192, 17, 17), after the ReLU

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch: int = 100) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise LegoError(
                f"Inception features take uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        out = {"pool": [], "spatial": [], "probs": []}
        for chunk in images.split(batch):
            x = chunk.to(self.device).expand(-1, 3, -1, -1)  # grey images as RGB
            pool, logits = self.net(x)
            spatial = self._spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # TF's (h, w, c) order
            out["pool"].append(pool.float().cpu())
            out["spatial"].append(spatial.float().cpu())
            out["probs"].append(torch.softmax(logits.double(), 1).float().cpu())
        return {k: torch.cat(v) for k, v in out.items()}


def to_uint8_nchw(images: torch.Tensor) -> torch.Tensor:
    """Samples [N, C, H, W] in [-1, 1] -> uint8, rounded as the saved .npz's arr_0 is (lego.data.images.to_uint8)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def inception_score(probs: torch.Tensor, split: int = IS_SPLIT) -> float:
    """ADM's Inception Score: the mean over splits of ``split`` rows of exp(mean_x KL(p(y|x) || mean_x p(y|x)))."""
    p = probs.double()
    scores = []
    for part in p.split(split):
        kl = torch.xlogy(part, part) - torch.xlogy(part, part.mean(0, keepdim=True))  # 0 log 0 = 0: no NaN
        scores.append(kl.sum(1).mean().exp())
    return float(torch.stack(scores).mean())


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [len(a), len(b)] (float32, as ADM's evaluator; clamped at 0)."""
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)).clamp(min=0)


def knn_radii(features: torch.Tensor, k: int = NEIGHBOURS, block: int = 10000) -> torch.Tensor:
    """Each point's squared distance to its k-th nearest neighbour among the others [N]."""
    radii = []
    for rows in features.split(block):
        radii.append(_sq_distances(rows, features).kthvalue(k + 1, dim=1).values)  # the first is the point itself
    return torch.cat(radii)


def precision_recall(ref: torch.Tensor, samples: torch.Tensor, k: int = NEIGHBOURS, device="cpu", block: int = 10000):
    """(precision, recall) of ``samples`` [N, D] against ``ref`` [M, D] (Kynkäänniemi et al., ADM's k = 3): the share of
    samples inside some reference point's k-NN ball, and of reference points inside some sample's."""
    ref, samples = ref.float().to(device), samples.float().to(device)
    r_ref, r_smp = knn_radii(ref, k, block), knn_radii(samples, k, block)
    smp_in = torch.zeros(len(samples), dtype=torch.bool, device=device)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    for i, rows in enumerate(ref.split(block)):
        lo = i * block
        for j, cols in enumerate(samples.split(block)):
            d = _sq_distances(rows, cols)  # (ref block, sample block)
            smp_in[j * block : j * block + len(cols)] |= (d <= r_ref[lo : lo + len(rows), None]).any(0)
            ref_in[lo : lo + len(rows)] |= (d <= r_smp[None, j * block : j * block + len(cols)]).any(1)
    return float(smp_in.float().mean()), float(ref_in.float().mean())


@dataclass
class Reference:
    """A reference set's Inception statistics (and its pool features, which precision and recall need)."""

    name: str
    sha256: str
    n: int
    stats: dict  # mu, sigma, mu_s, sigma_s (float64)
    pool: torch.Tensor | None  # [n, 2048], None for a file with statistics alone
    source: str  # "images" or "stored statistics" (FID and sFID from the file's own mu / sigma, as ADM's evaluator)


def _adm_arrays(path: Path) -> dict | None:
    """An .npz's arr_0 (uint8 NHWC images) and stored statistics, if it holds either (ADM's reference batches)."""
    try:
        with np.load(path) as z:
            keys = set(z.files)
            if not keys & {"arr_0", "mu", "images"}:
                raise LegoError(
                    f"{path} holds neither images (arr_0, or images) nor Inception statistics (mu, sigma, mu_s, "
                    f"sigma_s), only {sorted(keys)}; give an ADM reference batch or an .npz of real images"
                )
            if not keys & {"arr_0", "mu"}:
                return None  # lego's own .npz of images
            got = {k: z[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys}
            if "arr_0" in keys:
                got["arr_0"] = z["arr_0"]
    except LegoError:
        raise
    except Exception as e:  # noqa: BLE001 -- zip, pickle and format errors all mean "unreadable" to a user
        raise LegoError(f"could not read the reference {path} as an .npz file ({e}); is it corrupt?") from None
    return got


def _check_stats(path: Path, got: dict) -> dict | None:
    if not {"mu", "sigma"} <= got.keys():
        return None
    if not {"mu_s", "sigma_s"} <= got.keys():
        raise LegoError(
            f"{path} stores mu and sigma but not mu_s / sigma_s (sFID's); an ADM reference batch has all four"
        )
    stats = {k: np.asarray(got[k], dtype=np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s")}
    if stats["mu"].shape != (2048,) or stats["mu_s"].shape != (2023,):
        raise LegoError(
            f"{path}: its statistics are {stats['mu'].shape[0]}-d and {stats['mu_s'].shape[0]}-d, not Inception's "
            "pool_3 (2048) and mixed_6/conv (2023); it was made with another network"
        )
    return stats


def _uint8_nchw(path: Path, arr: np.ndarray, resolution: int) -> torch.Tensor:
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise LegoError(f"{path}: arr_0 must be uint8 images [N, H, W, 3] (ADM's layout), got {arr.dtype} {arr.shape}")
    if arr.shape[1:3] != (resolution, resolution):
        raise LegoError(
            f"{path} holds {arr.shape[1]}x{arr.shape[2]} images and the samples are {resolution}x{resolution}; use the "
            f"reference batch made for {resolution}x{resolution} (e.g. VIRTUAL_imagenet{resolution}_labeled.npz)"
        )
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def load_reference(spec: str, resolution: int, extractor: InceptionFeatures, batch: int = 10000) -> Reference:
    """The reference ``spec``: an ADM reference batch (.npz with ``arr_0`` uint8 NHWC images and/or stored ``mu``,
    ``sigma``, ``mu_s``, ``sigma_s``), any .npz, folder or named dataset lego.train reads (its images at
    ``resolution``). Its features are computed once and cached beside it (named datasets: under ~/.cache/lego)."""
    path = Path(spec).expanduser()
    if spec not in NAMED and not path.exists():
        raise LegoError(
            f"the reference {spec} does not exist; give an ADM reference batch (.npz), an image folder or .npz"
        )
    cache = cache_path(spec, f"adm-{resolution}px")
    if cache.is_file():
        with np.load(cache) as z:
            pool = torch.from_numpy(z["pool"]) if "pool" in z.files else None
            stats = {k: z[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
            return Reference(path.name, str(z["sha256"]), int(z["n"]), stats, pool, str(z["source"]))
    got = _adm_arrays(path) if path.suffix == ".npz" and path.is_file() else None
    stats, pool = None, None
    if got is not None:
        stats = _check_stats(path, got)
        if "arr_0" in got:
            images = _uint8_nchw(path, got["arr_0"], resolution)
            feats = [extractor(part) for part in images.split(batch)]
            pool = torch.cat([f["pool"] for f in feats])
            spatial = torch.cat([f["spatial"] for f in feats])
        elif stats is None:
            raise LegoError(f"{path} holds neither images (arr_0) nor Inception statistics (mu, sigma, mu_s, sigma_s)")
    else:
        dataset = open_dataset(spec, resolution)
        if dataset.latent:
            raise LegoError(
                f"the reference {spec} holds latents; give real images (an ADM reference batch or a folder)"
            )
        feats = [extractor(to_uint8_nchw(images)) for images in dataset_images(dataset, resolution, batch)]
        pool, spatial = torch.cat([f["pool"] for f in feats]), torch.cat([f["spatial"] for f in feats])
    source = "stored statistics" if stats is not None else "images"
    if stats is None:
        if len(pool) < 2:
            raise LegoError(f"the reference {spec} has {len(pool)} image; statistics need 2 or more (thousands)")
        (mu, sigma), (mu_s, sigma_s) = feature_stats(pool), feature_stats(spatial)
        stats = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    n = len(pool) if pool is not None else 0
    digest = sha256(path) if spec not in NAMED else spec
    arrays = {**stats, "sha256": digest, "n": n, "source": source}
    if pool is not None:
        arrays["pool"] = pool.numpy()
    save_cache(cache, **arrays)
    return Reference(path.name, digest, n, stats, pool, source)


def adm_metrics(features: dict[str, torch.Tensor], ref: Reference, device="cpu") -> dict:
    """FID, sFID, Inception Score, precision and recall of samples' features (InceptionFeatures) against ``ref``
    (precision and recall None when the reference holds statistics alone, or either side has no more than k = 3
    points)."""
    s = ref.stats
    out = {
        "fid": frechet_distance(*feature_stats(features["pool"]), s["mu"], s["sigma"]),
        "sfid": frechet_distance(*feature_stats(features["spatial"]), s["mu_s"], s["sigma_s"]),
        "inception_score": inception_score(features["probs"]),
        "precision": None,
        "recall": None,
    }
    if ref.pool is not None and min(len(ref.pool), len(features["pool"])) > NEIGHBOURS:  # else no k-NN ball
        out["precision"], out["recall"] = precision_recall(ref.pool, features["pool"], device=device)
    return out
