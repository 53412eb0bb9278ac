"""Samplers as plain functions that only call ``net(x, sigma, class_labels, skip=...)`` (EDM style) and read
``net.sigma_min``, ``net.sigma_max`` and ``net.num_classes`` (the null class, for guidance): a Denoiser
(lego.diffusion.denoiser), or anything called like one (lego.diffusion.window.SlidingWindow).

- ``edm_sampler``: EDM's 2nd-order Heun sampler, deterministic or stochastic (S_churn, S_min, S_max, S_noise)
  (Karras et al., 2022, Algorithm 2).
- ``ddpm_sampler``: ancestral DDPM with a uniform stride over the 1000 training steps (Nichol & Dhariwal, 2021).
- ``ddim_sampler``: DDIM (Song et al., 2021) on the same respaced steps; eta = 0 is deterministic.
All three support classifier-free guidance (``cfg_scale`` > 1 with class labels) and brick skipping: ``skip`` is a
function of the normalized time t/T in (0, 1] (1 = the noisiest step) returning the brick indices not to run, e.g.
``skip_schedule(model, t_break=0.5)``, or fixed indices skipped at every step, e.g. ``(2,)``.
Latents are standard normal noise [B, C, H, W] of any size the model accepts.
"""

from __future__ import annotations

import itertools
import math

import torch

from lego.diffusion.precond import VPPrecond


def skip_schedule(model, t_break: float):
    """The paper's skip rule (Sec. 3.2) as a function of t/T: a stack whose top brick is an image-brick (the
    largest brick: PG, U) skips it once t/T <= t_break; one whose top brick is a patch-brick (PR) skips it while
    t/T > 1 - t_break. t_break = 0 never skips."""
    if not 0 <= t_break <= 1:
        raise ValueError(f"t_break must be in [0, 1], got {t_break}")
    if t_break == 0:
        return _no_skip
    if model.net.num_bricks < 2:  # a DiT: one network, nothing to skip
        raise ValueError(f"{model.config.name} has no bricks to skip; t_break > 0 is for LEGO models")
    top = model.net.num_bricks - 1
    top_is_image = model.net.top_is_image

    def skip(t: float) -> tuple[int, ...]:
        hit = t <= t_break if top_is_image else t > 1 - t_break
        return (top,) if hit else ()

    return skip


def guided(net, x, sigma, class_labels=None, cfg_scale=1.0, skip=()):
    """D(x; sigma) with classifier-free guidance: D_u + s (D_c - D_u), both halves in one batched call."""
    if class_labels is None or cfg_scale == 1.0:
        return net(x, sigma, class_labels, skip=skip)
    null = torch.full_like(class_labels, net.num_classes)
    sigma = torch.as_tensor(sigma, device=x.device).reshape(-1)
    sigma = sigma.repeat(2) if sigma.numel() > 1 else sigma
    d_cond, d_uncond = net(torch.cat([x, x]), sigma, torch.cat([class_labels, null]), skip=skip).chunk(2)
    return d_uncond + cfg_scale * (d_cond - d_uncond)


def _no_skip(t):
    return ()


def _skip_function(skip):
    """A sampler's ``skip``: None (run every brick), a function of t/T, or fixed brick indices as the model takes."""
    if skip is None:
        return _no_skip
    if callable(skip):
        return skip
    if isinstance(skip, (tuple, list, range)):
        fixed = tuple(skip)
        return lambda t: fixed
    raise TypeError(
        f"skip must be None, brick indices such as (2,), or a function of t/T such as "
        f"skip_schedule(model, 0.5); got {type(skip).__name__}"
    )


@torch.no_grad()
def edm_sampler(
    net,
    latents,
    class_labels=None,
    num_steps=18,
    sigma_min=0.002,
    sigma_max=80.0,
    rho=7.0,
    S_churn=0.0,
    S_min=0.0,
    S_max=float("inf"),
    S_noise=1.0,
    cfg_scale=1.0,
    skip=None,
    generator=None,
):
    """EDM Heun sampler (2 * num_steps - 1 network evaluations). Returns x0 samples [B, C, H, W] (fp32)."""
    if not num_steps >= 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    skip = _skip_function(skip)
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    i = torch.arange(num_steps, dtype=torch.float64, device=latents.device)
    t_steps = (
        sigma_max ** (1 / rho) + i / max(num_steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])  # t_N = 0

    def denoise(x, t, step):
        return guided(net, x.float(), t.float(), class_labels, cfg_scale, skip(1 - step / num_steps)).double()

    x_next = latents.double() * t_steps[0]
    for step, (t_cur, t_next) in enumerate(itertools.pairwise(t_steps)):
        x_cur = x_next
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        noise = torch.randn(x_cur.shape, generator=generator, device=x_cur.device, dtype=x_cur.dtype)
        x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * noise
        d_cur = (x_hat - denoise(x_hat, t_hat, step)) / t_hat  # Euler step
        x_next = x_hat + (t_next - t_hat) * d_cur
        if step < num_steps - 1:  # 2nd-order correction
            d_prime = (x_next - denoise(x_next, t_next, step)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.float()


def respaced_alphas(num_steps: int, train_steps: int = 1000) -> torch.Tensor:
    """abar at num_steps uniformly strided training steps (iDDPM's respacing), float64, increasing noise."""
    if not 1 <= num_steps <= train_steps:
        raise ValueError(f"num_steps must be in [1, {train_steps}], got {num_steps}")
    abar = VPPrecond(train_steps).alphas_cumprod
    idx = torch.linspace(0, train_steps - 1, num_steps, dtype=torch.float64).round().long()
    return abar[idx]


def _vp_denoise(net, x, abar, class_labels, cfg_scale, skip_now):
    """x0 estimate from VP-space x_t via the VE-view denoiser: x_ve = x / sqrt(abar), sigma = sqrt((1-abar)/abar)."""
    sigma = ((1 - abar) / abar).sqrt()
    x_ve = x / abar.sqrt()
    sigma_b = torch.full((x.shape[0],), float(sigma), device=x.device)
    return guided(net, x_ve.float(), sigma_b, class_labels, cfg_scale, skip_now).double()


@torch.no_grad()
def ddpm_sampler(net, latents, class_labels=None, num_steps=250, cfg_scale=1.0, skip=None, generator=None):
    """Ancestral DDPM on num_steps uniformly strided steps, fixed small posterior variance. Returns x0 [B, C, H, W]."""
    skip = _skip_function(skip)
    abar = respaced_alphas(num_steps).to(latents.device)
    x = latents.double()
    for i in reversed(range(num_steps)):
        a_t, a_prev = abar[i], (abar[i - 1] if i > 0 else torch.ones_like(abar[i]))
        beta = 1 - a_t / a_prev
        x0 = _vp_denoise(net, x, a_t, class_labels, cfg_scale, skip((i + 1) / num_steps))
        mean = (beta * a_prev.sqrt() / (1 - a_t)) * x0 + ((1 - a_prev) * (1 - beta).sqrt() / (1 - a_t)) * x
        if i > 0:
            var = beta * (1 - a_prev) / (1 - a_t)
            x = mean + var.sqrt() * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        else:
            x = mean
    return x.float()


@torch.no_grad()
def ddim_sampler(net, latents, class_labels=None, num_steps=50, eta=0.0, cfg_scale=1.0, skip=None, generator=None):
    """DDIM on num_steps uniformly strided steps (eta 0: deterministic). Returns x0 [B, C, H, W]."""
    skip = _skip_function(skip)
    abar = respaced_alphas(num_steps).to(latents.device)
    x = latents.double()
    for i in reversed(range(num_steps)):
        a_t, a_prev = abar[i], (abar[i - 1] if i > 0 else torch.ones_like(abar[i]))
        x0 = _vp_denoise(net, x, a_t, class_labels, cfg_scale, skip((i + 1) / num_steps))
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        s = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - s**2).clamp(min=0).sqrt() * eps
        if i > 0 and eta > 0:
            x = x + s * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x.float()


SAMPLERS = {"heun": edm_sampler, "ddpm": ddpm_sampler, "ddim": ddim_sampler}
DEFAULT_STEPS = {"heun": 18, "ddpm": 250, "ddim": 50}
