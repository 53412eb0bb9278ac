"""The exact denoiser of a small labelled image set: a reference for samplers and sliding windows."""

from __future__ import annotations

import torch
from torch import nn


class ExactDenoiser(nn.Module):
    """D(x; sigma, y) = E[x0 | x, class y], a softmax over the set's images of class y (all of them for the null class
    y = num_classes): what a perfectly trained model computes on that set, with nothing of a training run in it. Called
    as a Denoiser is (lego.diffusion.denoiser), on any canvas of the images' size."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int):
        super().__init__()
        self.images, self.labels = images, labels  # (N, C, h, w), (N,)
        self.num_classes, self.in_channels = num_classes, images.shape[1]
        self.resolution, self.max_brick = images.shape[-1], 1
        self.sigma_min, self.sigma_max = 0.002, 80.0

    def check_canvas(self, x: torch.Tensor) -> None:
        if x.shape[1:] != self.images.shape[1:]:
            raise ValueError(f"the exact denoiser takes canvases {tuple(self.images.shape[1:])}, got {tuple(x.shape)}")

    def forward(self, x, sigma, class_labels=None, skip=()):
        dist = torch.cdist(x.flatten(1).double(), self.images.flatten(1).double()) ** 2  # (B, N)
        logits = -dist / (2 * sigma.double().view(-1, 1) ** 2)
        if class_labels is not None:
            own = (self.labels[None] == class_labels[:, None]) | (class_labels[:, None] == self.num_classes)
            logits = logits.masked_fill(~own, float("-inf"))
        weights = logits.softmax(dim=1).float()  # (B, N)
        return (weights @ self.images.flatten(1)).view_as(x)
