"""Samplers as plain functions that only call ``net(x, sigma, class_labels, skip=...)`` (EDM style) and read
``net.sigma_min``, ``net.sigma_max`` and ``net.num_classes`` (the null class, for guidance): a Denoiser
(lego.diffusion.denoiser), or anything called like one (lego.diffusion.window.SlidingWindow).

- ``edm_sampler``: EDM's 2nd-order Heun sampler, deterministic or stochastic (S_churn, S_min, S_max, S_noise)
  (Karras et al., 2022, Algorithm 2).
- ``ddpm_sampler``: ancestral DDPM with a uniform stride over the 1000 training steps (Nichol & Dhariwal, 2021).
- ``ddim_sampler``: DDIM (Song et al., 2021) on the same respaced steps; eta = 0 is deterministic.
- ``dpmpp_2m_sampler``: DPM-Solver++(2M) (Lu et al., 2022), a second-order multistep solver on EDM's Karras sigmas:
  one network evaluation per step. eta > 0 is its SDE variant (k-diffusion's ``sample_dpmpp_2m_sde``, midpoint).

Every sampler supports guidance, D_weak + w (D - D_weak) with w = ``cfg_scale`` (see ``guided``): classifier-free
(the weak D is the null class), from the model's own sub-stack (the same model with its top bricks skipped) or from
another denoiser (autoguidance, Karras et al., 2024), optionally only for sigma in ``guidance_interval`` (Kynkäänniemi
et al., 2024). And brick skipping: ``skip`` is a function of the normalized time t/T in (0, 1] (1 = the noisiest
step) returning the brick indices not to run, e.g. ``skip_schedule(model, t_break=0.5)``, or fixed indices skipped at
every step, e.g. ``(2,)``.
Latents are standard normal noise [B, C, H, W] of any size the model accepts.

DPM-Solver++(2M) is written here, not taken from diffusers' ``EDMDPMSolverMultistepScheduler``: that scheduler wants
the raw network output F (it applies its own preconditioning), so each step would invert ours, and diffusers is an
optional dependency of lego. The update is the same: tests/test_samplers.py checks it step for step against the
diffusers scheduler, and against a Gaussian data set whose exact denoiser is known in closed form.
"""

from __future__ import annotations

import functools
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


def guide_bricks(model, guide_skip) -> tuple[int, ...]:
    """The bricks a sub-stack guide skips: ``guide_skip`` K (an int) is the top K bricks, or brick indices (0 = the
    bottom, negative from the top). The bottom brick always runs."""
    n = model.net.num_bricks
    if n < 2:
        raise ValueError(
            f"{model.config.name} has no bricks to skip; sub-stack guidance (--guide-skip) is for LEGO models"
        )
    if isinstance(guide_skip, int) and not isinstance(guide_skip, bool):
        if not 1 <= guide_skip < n:
            raise ValueError(f"--guide-skip {guide_skip}: skip 1 to {n - 1} of this model's {n} bricks from the top")
        return tuple(range(n - guide_skip, n))
    bricks = tuple(sorted({int(k) % n for k in guide_skip})) if guide_skip else ()
    if not bricks or any(not -n <= int(k) < n for k in guide_skip) or 0 in bricks:
        raise ValueError(f"guide_skip {guide_skip!r}: give brick indices in 1..{n - 1} (the bottom brick always runs)")
    return bricks


def guided(net, x, sigma, class_labels=None, cfg_scale=1.0, skip=(), guide=None, interval=None):
    """D(x; sigma) guided: D_weak + w (D - D_weak), w = ``cfg_scale``, where the weak denoiser D_weak is

    - ``guide`` None: ``net`` on the null class (classifier-free guidance; both halves in one batched call);
    - ``guide`` a tuple of brick indices: ``net`` on the same class with those bricks skipped as well (the model's own
      sub-stack, a weaker model for the cost of the bricks it runs; none extra when ``skip`` already skips them);
    - ``guide`` a denoiser: that network on the same class, all its bricks (autoguidance).

    ``interval`` (lo, hi): guidance only while lo <= sigma <= hi; outside it one unguided call, as for w = 1."""
    if cfg_scale == 1.0 or (guide is None and class_labels is None) or not _in_interval(sigma, interval):
        return net(x, sigma, class_labels, skip=skip)
    if guide is None:
        null = torch.full_like(class_labels, net.num_classes)
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1)
        sigma = sigma.repeat(2) if sigma.numel() > 1 else sigma
        d, d_weak = net(torch.cat([x, x]), sigma, torch.cat([class_labels, null]), skip=skip).chunk(2)
    elif isinstance(guide, tuple):
        d, weak_skip = net(x, sigma, class_labels, skip=skip), tuple(sorted({*skip, *guide}))
        if set(weak_skip) == set(skip):
            return d  # the step already runs the sub-stack: D_weak = D
        d_weak = net(x, sigma, class_labels, skip=weak_skip)
    else:
        d, d_weak = net(x, sigma, class_labels, skip=skip), guide(x, sigma, class_labels)
    return d_weak + cfg_scale * (d - d_weak)


def _in_interval(sigma, interval) -> bool:
    if interval is None:
        return True
    s = float(torch.as_tensor(sigma).reshape(-1)[0])
    return interval[0] <= s <= interval[1]


class SeedGenerators:
    """One generator per image, each seeded with its image's seed, so that an image's noise (the starting noise and
    every stochastic sampler's) is the same whatever batch, rank or run draws it (EDM's StackedRandomGenerator). The
    samplers take it where they take a torch.Generator."""

    def __init__(self, seeds, device):
        self.generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]

    def randn(self, shape, device=None, dtype=None) -> torch.Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"{len(self.generators)} seeds for a batch of {shape[0]}")
        return torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=dtype) for g in self.generators])


def randn_like(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Standard normal noise shaped like x from ``generator``: a torch.Generator (or None), or SeedGenerators."""
    if isinstance(generator, SeedGenerators):
        return generator.randn(x.shape, x.device, x.dtype)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


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
    guide=None,
    guidance_interval=None,
):
    """EDM Heun sampler (2 * num_steps - 1 network evaluations). Returns x0 samples [B, C, H, W] (fp32)."""
    skip = _skip_function(skip)
    t_steps = karras_sigmas(net, num_steps, sigma_min, sigma_max, rho, latents.device)

    def denoise(x, t, step):
        d = guided(net, x.float(), t.float(), class_labels, cfg_scale, skip(1 - step / num_steps), guide,
                   guidance_interval)  # fmt: skip
        return d.double()

    x_next = latents.double() * t_steps[0]
    for step, (t_cur, t_next) in enumerate(itertools.pairwise(t_steps)):
        x_cur = x_next
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        noise = randn_like(x_cur, generator)
        x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * noise
        d_cur = (x_hat - denoise(x_hat, t_hat, step)) / t_hat  # Euler step
        x_next = x_hat + (t_next - t_hat) * d_cur
        if step < num_steps - 1:  # 2nd-order correction
            d_prime = (x_next - denoise(x_next, t_next, step)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.float()


def karras_sigmas(net, num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0, device=None) -> torch.Tensor:
    """EDM's time steps (Karras et al., 2022, eq. 5), float64: num_steps sigmas from sigma_max down to sigma_min
    (clipped to the model's range), then 0."""
    if not num_steps >= 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    t_steps = (
        sigma_max ** (1 / rho) + i / max(num_steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])  # t_N = 0


@torch.no_grad()
def dpmpp_2m_sampler(
    net,
    latents,
    class_labels=None,
    num_steps=20,
    sigma_min=0.002,
    sigma_max=80.0,
    rho=7.0,
    eta=0.0,
    S_noise=1.0,
    cfg_scale=1.0,
    skip=None,
    generator=None,
    guide=None,
    guidance_interval=None,
):
    """DPM-Solver++(2M) on EDM's Karras sigmas (num_steps network evaluations): in log-sigma time
    lambda = -log sigma, each step extrapolates the denoised image linearly from the last two evaluations (first
    order on the first step and on the last, to sigma = 0, which returns the denoised image). eta > 0: the SDE
    variant (DPM-Solver++(2M) SDE, midpoint), which adds fresh noise on every step (eta = 1: the standard amount,
    times S_noise). Returns x0 samples [B, C, H, W] (fp32)."""
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    skip = _skip_function(skip)
    sigmas = karras_sigmas(net, num_steps, sigma_min, sigma_max, rho, latents.device)
    x = latents.double() * sigmas[0]
    old_denoised = h_last = None
    for step, (s_cur, s_next) in enumerate(itertools.pairwise(sigmas)):
        denoised = guided(net, x.float(), s_cur.float(), class_labels, cfg_scale, skip(1 - step / num_steps), guide,
                          guidance_interval).double()  # fmt: skip
        if s_next == 0:
            x = denoised
            break
        h = s_cur.log() - s_next.log()  # lambda_next - lambda_cur > 0
        eta_h = eta * h
        x = s_next / s_cur * (-eta_h).exp() * x - (-h - eta_h).expm1() * denoised
        if old_denoised is not None:  # the second-order correction (midpoint)
            x = x - 0.5 * (-h - eta_h).expm1() * (h / h_last) * (denoised - old_denoised)
        if eta > 0:
            noise = randn_like(x, generator)
            x = x + noise * s_next * (-(-2 * eta_h).expm1()).sqrt() * S_noise
        old_denoised, h_last = denoised, h
    return x.float()


def respaced_alphas(num_steps: int, train_steps: int = 1000) -> torch.Tensor:
    """abar at num_steps uniformly strided training steps (iDDPM's respacing), float64, increasing noise."""
    if not 1 <= num_steps <= train_steps:
        raise ValueError(f"num_steps must be in [1, {train_steps}], got {num_steps}")
    abar = VPPrecond(train_steps).alphas_cumprod
    idx = torch.linspace(0, train_steps - 1, num_steps, dtype=torch.float64).round().long()
    return abar[idx]


def _vp_denoise(net, x, abar, class_labels, skip_now, guidance):
    """x0 estimate from VP-space x_t via the VE-view denoiser: x_ve = x / sqrt(abar), sigma = sqrt((1-abar)/abar).
    guidance: guided()'s (cfg_scale, guide, interval)."""
    sigma = ((1 - abar) / abar).sqrt()
    x_ve = x / abar.sqrt()
    sigma_b = torch.full((x.shape[0],), float(sigma), device=x.device)
    cfg_scale, guide, interval = guidance
    return guided(net, x_ve.float(), sigma_b, class_labels, cfg_scale, skip_now, guide, interval).double()


@torch.no_grad()
def ddpm_sampler(
    net, latents, class_labels=None, num_steps=250, cfg_scale=1.0, skip=None, generator=None, guide=None,
    guidance_interval=None,
):  # fmt: skip
    """Ancestral DDPM on num_steps uniformly strided steps, fixed small posterior variance. Returns x0 [B, C, H, W]."""
    skip, guidance = _skip_function(skip), (cfg_scale, guide, guidance_interval)
    abar = respaced_alphas(num_steps).to(latents.device)
    x = latents.double()
    for i in reversed(range(num_steps)):
        a_t, a_prev = abar[i], (abar[i - 1] if i > 0 else torch.ones_like(abar[i]))
        beta = 1 - a_t / a_prev
        x0 = _vp_denoise(net, x, a_t, class_labels, skip((i + 1) / num_steps), guidance)
        mean = (beta * a_prev.sqrt() / (1 - a_t)) * x0 + ((1 - a_prev) * (1 - beta).sqrt() / (1 - a_t)) * x
        if i > 0:
            var = beta * (1 - a_prev) / (1 - a_t)
            x = mean + var.sqrt() * randn_like(x, generator)
        else:
            x = mean
    return x.float()


@torch.no_grad()
def ddim_sampler(
    net, latents, class_labels=None, num_steps=50, eta=0.0, cfg_scale=1.0, skip=None, generator=None, guide=None,
    guidance_interval=None,
):  # fmt: skip
    """DDIM on num_steps uniformly strided steps (eta 0: deterministic). Returns x0 [B, C, H, W]."""
    skip, guidance = _skip_function(skip), (cfg_scale, guide, guidance_interval)
    abar = respaced_alphas(num_steps).to(latents.device)
    x = latents.double()
    for i in reversed(range(num_steps)):
        a_t, a_prev = abar[i], (abar[i - 1] if i > 0 else torch.ones_like(abar[i]))
        x0 = _vp_denoise(net, x, a_t, class_labels, skip((i + 1) / num_steps), guidance)
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        s = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - s**2).clamp(min=0).sqrt() * eps
        if i > 0 and eta > 0:
            x = x + s * randn_like(x, generator)
    return x.float()


SAMPLERS = {
    "heun": edm_sampler,
    "dpmpp-2m": dpmpp_2m_sampler,
    "dpmpp-2m-sde": functools.partial(dpmpp_2m_sampler, eta=1.0),
    "ddpm": ddpm_sampler,
    "ddim": ddim_sampler,
}
DEFAULT_STEPS = {"heun": 18, "dpmpp-2m": 20, "dpmpp-2m-sde": 20, "ddpm": 250, "ddim": 50}
