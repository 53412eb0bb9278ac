"""Training loss: the joint LEGO loss, averaged over every brick's own prediction (Zheng et al., Eq. 12).

Each brick k's output F_k gives its own denoised estimate D_k = c_skip x + c_out F_k; the loss is
    mean_k  mean over processed pixels of  lambda(sigma) * (D_k - x0)^2
with lambda and the sigma distribution from the preconditioning (EDM by default, VP/DDPM as the alternative).
Callable like EDM's losses: ``loss_fn(net, images, labels, generator)``, where ``net`` is a Denoiser
(lego.diffusion.denoiser) or a DDP wrapper of one: the loss calls ``net(...)``, so data-parallel hooks see the call.
All randomness comes from ``generator``, so a resumed run draws exactly what an uninterrupted one would.
``share=(start, total)`` says that ``images`` are rows start.. of a batch of ``total`` images (one rank's share, or one
accumulation step's): every draw is made for all ``total`` images and those rows kept, so an image gets the same noise
however the batch is split.
"""

from __future__ import annotations

import torch

from lego.diffusion.denoiser import check_inputs
from lego.networks.interface import PatchDraw


class LegoLoss:
    def __init__(self, patch_fraction: float = 1.0, label_dropout: float = 0.1):
        if not 0 < patch_fraction <= 1:
            raise ValueError(f"patch fraction must be in (0, 1], got {patch_fraction}")
        if not 0 <= label_dropout < 1:
            raise ValueError(f"label dropout must be in [0, 1), got {label_dropout}")
        self.patch_fraction = patch_fraction
        self.label_dropout = label_dropout

    def __call__(self, net, images, labels=None, generator=None, share=None):
        """Returns (loss, per-brick losses [K]) for a batch of clean images [B, C, H, W]."""
        batch, device = images.shape[0], images.device
        start, total = share or (0, batch)
        rows = slice(start, start + batch)
        model = getattr(net, "module", net)  # DistributedDataParallel keeps the model at .module
        precond, num_classes = model.precond, model.num_classes
        sigma = precond.sample_sigma(total, generator, device)[rows]  # (B,)
        noise = torch.randn((total, *images.shape[1:]), generator=generator, device=device)[rows]
        x = images + sigma.view(-1, 1, 1, 1) * noise  # (B, C, H, W)
        if labels is not None:  # checked before the dropout below hides a bad id (its range only where it is free)
            check_inputs(sigma, labels, batch, num_classes, values=device.type == "cpu", null="none")
            labels = torch.as_tensor(labels, device=device).reshape(-1)  # (B,)
            drop = torch.rand(total, generator=generator, device=device)[rows] < self.label_dropout
            labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
        patches = PatchDraw(self.patch_fraction, generator, share)
        outputs = net(x, sigma, labels, patches=patches, x0=images, every_brick=True)
        weight = precond.loss_weight(sigma).view(-1, 1, 1, 1)
        per_brick = []
        for out in outputs:
            err = weight * (out.denoised - images) ** 2  # (B, C, H, W)
            if out.mask is None:
                per_brick.append(err.mean())
            else:  # only the pixels this brick processed count
                per_brick.append((err * out.mask).sum() / (out.mask.sum() * images.shape[1]))
        per_brick = torch.stack(per_brick)
        return per_brick.mean(), per_brick.detach()
