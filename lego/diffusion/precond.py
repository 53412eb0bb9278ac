"""Preconditioning: how the raw output F becomes the denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).

Everything is expressed in EDM's variance-exploding view x = x0 + sigma * n (Karras et al., 2022, Table 1), so the
samplers and the loss see one interface whichever parameterization trained the model:

- ``EDMPrecond``: the paper's choice for pixel space (Karras et al.): sigma_data 0.5, ln sigma ~ N(-1.2, 1.2^2),
  loss weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.
- ``VPPrecond``: DDPM as in DiT (Ho et al., 2020): linear betas 1e-4..0.02 over 1000 steps, epsilon prediction
  (c_skip 1, c_out -sigma), the network sees the discrete step index; sigma_t = sqrt((1 - abar_t) / abar_t).
"""

from __future__ import annotations

import torch


class EDMPrecond:
    kind = "edm"
    # c_noise = ln(sigma) / 4 spans about [-1.6, 1.1]; DiT's sinusoidal time embedding is built for steps in
    # [0, 1000), where most of its frequencies would hardly move over that span. The model multiplies c_noise by this
    # before embedding it (the README's "Models" section says why 250).
    embed_scale = 250.0

    def __init__(self, sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, p_mean=-1.2, p_std=1.2):
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max
        self.p_mean, self.p_std = p_mean, p_std

    def coefficients(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise), each shaped like sigma."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sd2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def sample_sigma(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        return (torch.randn(n, generator=generator, device=device) * self.p_std + self.p_mean).exp()

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


class VPPrecond:
    kind = "vp"
    embed_scale = 1.0  # c_noise is already the DDPM step index, DiT's convention

    def __init__(self, num_steps=1000, beta_start=1e-4, beta_end=0.02):
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # (T,), float64
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()  # increasing in t
        self.num_steps = num_steps
        self.sigma_min, self.sigma_max = self.sigmas[0].item(), self.sigmas[-1].item()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The discrete step whose sigma is nearest (in log space) to each sigma."""
        table = self.sigmas.to(sigma.device).log()
        return (sigma.double().log()[:, None] - table[None]).abs().argmin(dim=1)

    def coefficients(self, sigma: torch.Tensor):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = self.timestep(sigma).to(sigma.dtype)
        return c_skip, c_out, c_in, c_noise

    def sample_sigma(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        t = torch.randint(0, self.num_steps, (n,), generator=generator, device=device)
        return self.sigmas.to(device)[t].float()

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / sigma**2  # turns |D - x0|^2 into |eps_pred - eps|^2, DiT's plain MSE


PRECONDS = {"edm": EDMPrecond, "vp": VPPrecond}


def make_precond(kind: str, sigma_data: float = 0.5):
    if kind == "edm":
        return EDMPrecond(sigma_data=sigma_data)
    if kind == "vp":
        return VPPrecond()
    raise ValueError(f"unknown preconditioning {kind!r}; choose 'edm' or 'vp'")


def as_batch_sigma(sigma, batch: int, device) -> torch.Tensor:
    """A float, 0-d, [B] or [B, 1, 1, 1] sigma -> float32 [B]."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device).reshape(-1)
    if sigma.numel() == 1:
        return sigma.expand(batch)
    if sigma.numel() != batch:
        raise ValueError(f"sigma has {sigma.numel()} values for a batch of {batch}")
    return sigma


__all__ = ["PRECONDS", "EDMPrecond", "VPPrecond", "as_batch_sigma", "make_precond"]
