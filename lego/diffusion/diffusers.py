"""A diffusers DDPM model (DiT, UNet) as a denoiser D(x; sigma, labels) in EDM's view, e.g. as the pretrained base of a
LEGO-PR stack (lego.checkpoints.build)."""

from __future__ import annotations

import torch
from torch import nn

from lego.diffusion.precond import VPPrecond
from lego.errors import LegoError

DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "UNet2DModel")
PREDICTIONS = ("epsilon", "v_prediction", "sample")  # diffusers' names for epsilon, v and x0 prediction


class DiffusersDenoiser(nn.Module):
    """D(x; sigma, labels) from a diffusers DDPM model (epsilon, v or x0 prediction).

    EDM's x = x0 + sigma n is DDPM's x_t / sqrt(abar) with abar = 1 / (1 + sigma^2); the model sees x_t = x sqrt(abar)
    and the training step whose sigma is nearest (as VPPrecond does), and its prediction is turned into x0.
    """

    def __init__(self, model: nn.Module, prediction: str = "epsilon", num_train_timesteps: int = 1000):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise LegoError(f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        self.model, self.prediction = model, prediction
        self.schedule = VPPrecond(num_train_timesteps)
        cfg = getattr(model, "config", {})
        # DiT's label table has a last row for the null class, at index num_classes as ours; UNet2DModel's has none.
        self.num_classes = int(cfg.get("num_embeds_ada_norm") or cfg.get("num_class_embeds") or 0)
        self.has_null = bool(cfg.get("num_embeds_ada_norm"))

    def forward(self, x, sigma, class_labels=None):
        """x [B, C, H, W], sigma [B] -> x0 estimate [B, C, H, W] (fp32)."""
        sigma = sigma.float().reshape(-1)
        abar = 1 / (1 + sigma.double() ** 2)  # (B,)
        a = abar.sqrt().float().view(-1, 1, 1, 1)
        s = (1 - abar).sqrt().float().view(-1, 1, 1, 1)
        x_t = x * a  # DDPM's x_t
        labels = None
        if self.num_classes:
            labels = class_labels if class_labels is not None else torch.full(sigma.shape, self.num_classes)
            labels = labels.to(x.device).long()
            if not self.has_null and (labels >= self.num_classes).any():
                raise LegoError(
                    "this UNet2DModel has no null class, so it cannot run without labels: "
                    "train with --label-dropout 0 and sample without --cfg-scale"
                )
        out = self.model(x_t, self.schedule.timestep(sigma), class_labels=labels).sample.float()
        out = out[:, : x.shape[1]]  # DiT with a learned variance outputs 2C channels: the first C are the mean's
        if self.prediction == "epsilon":
            return x - sigma.view(-1, 1, 1, 1) * out
        if self.prediction == "v_prediction":
            return a * x_t - s * out  # x0 = sqrt(abar) x_t - sqrt(1 - abar) v
        return out
