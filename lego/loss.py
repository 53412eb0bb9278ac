"""Training loss: the joint LEGO loss, averaged over every brick's own prediction (Zheng et al., Eq. 12).

Each brick k's output F_k gives its own denoised estimate D_k = c_skip x + c_out F_k; the loss is
    mean_k  mean over processed pixels of  lambda(sigma) * (D_k - x0)^2
with lambda and the sigma distribution from the preconditioning (EDM by default, VP/DDPM as the alternative).
Callable like EDM's losses: ``loss_fn(net, images, labels, generator)``; all randomness comes from ``generator``,
so a resumed run draws exactly what an uninterrupted one would. ``share=(start, total)`` says that ``images`` are
rows start.. of a batch of ``total`` images (one rank's share, or one accumulation step's): every draw is made for all
``total`` images and those rows kept, so an image gets the same noise however the batch is split.
"""

from __future__ import annotations

import torch

from lego.models import check_label_ids


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
        precond = net.precond
        sigma = precond.sample_sigma(total, generator, device)[rows]  # (B,)
        noise = torch.randn((total, *images.shape[1:]), generator=generator, device=device)[rows]
        x = images + sigma.view(-1, 1, 1, 1) * noise  # (B, C, H, W)
        if labels is not None:  # (an unconditional model refuses them: it would train ignoring them)
            labels = check_label_ids(labels, batch, net.num_classes).to(device)  # (B,); a [1] would broadcast
            # The ids' range costs a device sync to check, so it is checked where it is free; on a GPU the embedding
            # lookup stops a bad id with a device-side assertion.
            if device.type == "cpu" and not bool(((labels >= 0) & (labels <= net.num_classes)).all()):
                raise ValueError(f"class labels must be in 0..{net.num_classes - 1} ({net.num_classes}: none), got "
                                 f"{labels.min().item()}..{labels.max().item()}")
            drop = torch.rand(total, generator=generator, device=device)[rows] < self.label_dropout
            labels = torch.where(drop, torch.full_like(labels, net.num_classes), labels)
        c_skip, c_out, _, _ = (c.view(-1, 1, 1, 1) for c in precond.coefficients(sigma))
        target = (images - c_skip * x) / c_out  # the brick output that reproduces x0 exactly
        outputs = net.run_bricks(x, sigma, labels, patch_fraction=self.patch_fraction, fill=target, generator=generator,
                                 share=share)
        weight = precond.loss_weight(sigma).view(-1, 1, 1, 1)
        per_brick = []
        for out in outputs:
            err = weight * (c_skip * x + c_out * out.output - images) ** 2  # (B, C, H, W)
            if out.mask is None:
                per_brick.append(err.mean())
            else:  # only the pixels this brick processed count
                per_brick.append((err * out.mask).sum() / (out.mask.sum() * images.shape[1]))
        per_brick = torch.stack(per_brick)
        return per_brick.mean(), per_brick.detach()
