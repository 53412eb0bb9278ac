"""One way to draw samples: ``generate()`` serves lego.sample, lego.eval, the training run's sample grid and the
sliding-window panorama alike.

It draws each batch's starting noise from one generator (``seed``), runs a sampler (lego.diffusion.samplers) with
classifier-free guidance and brick skipping, on the whole canvas in one call or, with a window, by the sliding window
(lego.diffusion.window) with per-region classes.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from lego import checks
from lego.diffusion.samplers import DEFAULT_STEPS, SAMPLERS, skip_schedule
from lego.diffusion.window import SlidingWindow, region_map
from lego.errors import LegoError

CHURN = {"S_min": 0.05, "S_max": 20.0, "S_noise": 1.003}  # with --churn: EDM's ImageNet settings (Karras et al.)


def check_sample_options(
    n, sampler, steps, cfg_scale, t_break, height, width, seed, batch, churn, window=None, stride=None, max_batch=1
) -> None:
    """The numbers ``generate`` takes, checked before any work, each error naming its command-line option (a window
    or stride given as a pair, from Python, is SlidingWindow's to check)."""
    if sampler not in SAMPLERS:
        raise LegoError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    checks.integer("--n", n, 1, meaning=" (samples to draw)")
    if steps is not None:
        checks.integer("--steps", steps, 1, 1000 if sampler in ("ddpm", "ddim") else None)
    checks.real("--cfg-scale", cfg_scale, 0, meaning=" (1 = no guidance)")
    checks.real("--t-break", t_break, 0, 1)
    for option, side in (("--height", height), ("--width", width)):
        if side is not None:
            checks.integer(option, side, 1, meaning=" (a multiple of the model's largest brick)")
    checks.integer("--seed", seed, 0, checks.MAX_SEED)
    checks.integer("--batch", batch, 1, meaning=" (samples per network call)")
    checks.real("--churn", churn, 0)
    if window is not None and not isinstance(window, tuple | list):
        checks.integer("--window", window, 1, meaning=" (a multiple of the model's largest brick)")
    if stride is not None and not isinstance(stride, tuple | list):
        checks.integer("--stride", stride, 1, meaning=" (pixels between windows)")
    checks.integer("--max-batch", max_batch, 1, meaning=" (windows per network call)")
    if churn and sampler != "heun":
        raise LegoError(f"--churn applies to the heun sampler only, not {sampler}; drop it or use --sampler heun")


def parse_labels(text: str | None, n: int, num_classes: int) -> torch.Tensor | None:
    """--labels: one class id or a comma list, cycled over n samples; none given: 0, 1, 2, ... cycled (None for an
    unconditional model)."""
    if not num_classes:
        if text:
            raise LegoError("--labels given but the model is unconditional")
        return None
    if not text:
        return torch.arange(n) % num_classes
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise LegoError(f"--labels must be integers separated by commas, got {text!r}") from None
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise LegoError(f"--labels {bad} out of range: the model has classes 0..{num_classes - 1}")
    return torch.tensor(values).repeat(n // len(values) + 1)[:n]


@torch.no_grad()
def generate(
    net, n: int, sampler: str = "heun", steps: int | None = None, cfg_scale: float = 1.0, labels=None,
    t_break: float = 0.0, height: int | None = None, width: int | None = None, seed: int = 0, batch: int = 64,
    churn: float = 0.0, window=None, stride=None, max_batch: int = 64, regions=None, generator=None,
    device=None, progress: bool = False, desc: str = "sampling", **sampler_kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """n samples [n, C, H, W] (on the CPU) from the denoiser ``net``, and the labels they were drawn for.

    labels: class ids [n] (or one id for all), None for the null class (unconditional); regions: a [H, W] label map
    or rectangles ``(top, left, bottom, right, class)`` covering the canvas (sliding window only). The canvas
    (height x width, default: the training canvas) goes through the model whole, or by the sliding window when a
    window, stride or regions is given. ``generator`` (default: one seeded with ``seed``) draws every batch's noise
    in turn and the samplers' noise. ``device``: where the noise is drawn (default: the model's); ``progress``: a
    progress bar labelled ``desc``. Other keyword arguments go to the sampler (e.g. ``eta`` for DDIM)."""
    check_sample_options(n, sampler, steps, cfg_scale, t_break, height, width, seed, batch, churn, window, stride,
                         max_batch)  # fmt: skip
    if device is None:
        device = next(net.parameters()).device
    h, w = height or net.resolution, width or net.resolution
    denoiser = net
    if window or stride or regions is not None:  # sliding window: the canvas only has to hold one window
        denoiser = SlidingWindow(net, window, stride, max_batch)
        denoiser.windows(h, w)  # checks the canvas against the window before any work
    else:
        net.check_canvas(torch.empty(1, net.in_channels, h, w, device="meta"))
    if labels is not None:
        labels = torch.as_tensor(labels).long().reshape(-1)
        labels = labels.expand(n) if labels.numel() == 1 else labels  # (n,)
    if regions is not None:
        labels = region_map(h, w, regions).expand(n, -1, -1)  # (n, H, W)
    if labels is not None:
        if not net.num_classes:
            raise LegoError("class labels given to an unconditional model; pass labels=None (and no regions)")
        if not 0 <= int(labels.min()) <= int(labels.max()) < net.num_classes:
            raise LegoError(
                f"class ids must be in 0..{net.num_classes - 1}, got {int(labels.min())}..{int(labels.max())}"
            )
    kwargs = {"num_steps": steps or DEFAULT_STEPS[sampler], "cfg_scale": cfg_scale, "skip": skip_schedule(net, t_break)}
    if churn:
        kwargs.update(S_churn=churn, **CHURN)
    kwargs.update(sampler_kwargs)
    g = generator if generator is not None else torch.Generator(device).manual_seed(seed)
    chunks = []
    for start in tqdm(range(0, n, batch), desc=desc, unit="batch", disable=not progress):
        size = min(batch, n - start)
        z = torch.randn(size, net.in_channels, h, w, generator=g, device=device)
        y = labels[start : start + size].to(device) if labels is not None else None
        chunks.append(SAMPLERS[sampler](denoiser, z, y, generator=g, **kwargs).cpu())
    return torch.cat(chunks), labels


def panorama(
    net, height: int, width: int, n: int = 1, labels=None, regions=None, window=None, stride=None,
    max_batch: int = 64, sampler: str = "heun", steps: int | None = None, cfg_scale: float = 1.0,
    t_break: float = 0.0, generator: torch.Generator | None = None, **sampler_kwargs,
) -> torch.Tensor:  # fmt: skip
    """n samples [n, C, height, width] from ``net`` (a LegoModel) by the sliding window (Zheng et al., App. D.3).

    labels: a class id or [n] ids; regions: a [H, W] label map or rectangles ``(top, left, bottom, right, class)``
    (overrides labels); window: default the training canvas; generator: default one seeded from torch's global
    generator. The other options are ``generate``'s."""
    device = next(net.parameters()).device
    if generator is None:
        generator = torch.Generator(device).manual_seed(int(torch.randint(2**62, ())))
    images, _ = generate(
        net, n, sampler, steps, cfg_scale, None if regions is not None else labels, t_break, height, width,
        batch=n, window=net.resolution if window is None else window, stride=stride, max_batch=max_batch,
        regions=regions, generator=generator, device=device, **sampler_kwargs,
    )  # fmt: skip
    return images.to(device)
