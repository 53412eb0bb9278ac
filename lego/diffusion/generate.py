"""One way to draw samples: ``generate()`` serves lego.sample, lego.eval, the training run's sample grid and the
sliding-window panorama alike.

It draws each batch's starting noise from one generator (``seed``), runs a sampler (lego.diffusion.samplers) with
guidance (classifier-free, from the model's sub-stack or from a guide model, optionally in a sigma interval) and
brick skipping, on the whole canvas in one call or, with a window, by the sliding window
(lego.diffusion.window) with per-region classes.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from lego import checks
from lego.diffusion.samplers import DEFAULT_STEPS, SAMPLERS, SeedGenerators, guide_bricks, skip_schedule
from lego.diffusion.window import SlidingWindow, region_map
from lego.errors import LegoError

CHURN = {"S_min": 0.05, "S_max": 20.0, "S_noise": 1.003}  # with --churn: EDM's ImageNet settings (Karras et al.)


def add_sampler_options(p) -> None:
    """The sampler's and guidance's command-line options, shared by lego.sample and lego.eval."""
    steps = ", ".join(f"{name} {n}" for name, n in DEFAULT_STEPS.items())
    p.add_argument("--sampler", default="heun", choices=list(SAMPLERS), help="heun (EDM, the default), dpmpp-2m "
                   "(DPM-Solver++(2M): one network evaluation per step), dpmpp-2m-sde, ddpm or ddim")  # fmt: skip
    p.add_argument("--steps", type=int, help=f"sampling steps (default: {steps})")
    p.add_argument("--cfg-scale", type=float, default=1.0,
                   help="guidance scale w: D_weak + w (D - D_weak); D_weak is the null class unless --guide-skip or "
                   "--guide-ckpt says otherwise (1 = no guidance)")  # fmt: skip
    p.add_argument("--guidance-interval", metavar="LO,HI",
                   help="guide only while sigma is in [LO, HI] (e.g. 0.28,5.42; HI may be inf); one network call "
                   "per step outside it")  # fmt: skip
    p.add_argument("--guide-skip", type=int, metavar="K",
                   help="guide by the same model with its top K bricks skipped (on the same class)")  # fmt: skip
    p.add_argument("--guide-ckpt", help="guide by this checkpoint instead (autoguidance: an earlier or smaller model)")
    p.add_argument("--seeds", help="one seed per image, EDM's way (e.g. 0-49999 or 0,5,10-19): each image is the same "
                   "in any batch; replaces --n (and --seed)")  # fmt: skip


def check_sample_options(
    n, sampler, steps, cfg_scale, t_break, height, width, seed, batch, churn, window=None, stride=None, max_batch=1,
    guidance_interval=None, guide_skip=None, guide_model=False,
) -> None:  # fmt: skip
    """The numbers ``generate`` takes, checked before any work, each error naming its command-line option (a window
    or stride given as a pair, from Python, is SlidingWindow's to check; brick indices of guide_skip, the model's).
    ``guide_model``: a guide model (--guide-ckpt) is given."""
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
    if guide_skip is not None and not isinstance(guide_skip, tuple | list):
        checks.integer("--guide-skip", guide_skip, 1, meaning=" (top bricks the guide skips)")
    if guide_skip is not None and guide_model:
        raise LegoError("give a sub-stack guide (--guide-skip) or a guide model (--guide-ckpt), not both")
    if guidance_interval is not None:
        _check_interval(guidance_interval)
    given = (
        ("--guide-skip", guide_skip is not None),
        ("--guide-ckpt", guide_model),
        ("--guidance-interval", guidance_interval is not None),
    )
    guiding = [option for option, present in given if present]
    if guiding and cfg_scale == 1:
        raise LegoError(f"{guiding[0]} shapes guidance, and --cfg-scale is 1 (none): give a scale above 1, e.g. 2")


def _check_interval(interval) -> None:
    ok = isinstance(interval, tuple | list) and len(interval) == 2
    ok = ok and all(checks.is_number(v) and not math.isnan(v) for v in interval)
    if not (ok and 0 <= interval[0] <= interval[1] and math.isfinite(interval[0])):
        raise LegoError(
            f"--guidance-interval must be two sigmas lo,hi with 0 <= lo <= hi (hi may be inf), e.g. 0.28,5.42; "
            f"got {interval!r}"
        )


def parse_interval(text: str | None) -> tuple[float, float] | None:
    """--guidance-interval: "lo,hi" (sigmas; "inf" allowed for hi) -> (lo, hi), checked; None when not given."""
    if text is None:
        return None
    try:
        interval = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise LegoError(f"--guidance-interval must be two numbers lo,hi such as 0.28,5.42, got {text!r}") from None
    _check_interval(interval)
    return interval


def parse_seeds(text: str) -> list[int]:
    """--seeds: EDM's notation, comma-separated seeds and inclusive ranges ("0-49999", "0,5,10-19")."""
    seeds = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        try:
            seeds += list(range(int(low), int(high) + 1)) if dash else [int(low)]
        except ValueError:
            raise LegoError(f"--seeds: cannot read {part!r}; write seeds and ranges (0-49999, 0,5,10-19)") from None
    check_seeds(seeds)
    return seeds


def check_seeds(seeds, n: int | None = None) -> None:
    if not len(seeds):
        raise LegoError("--seeds names no seed; give e.g. 0-999")
    for s in seeds:
        checks.integer("--seeds", s, 0, checks.MAX_SEED, meaning=" (each seed)")
    if n is not None and len(seeds) != n:
        raise LegoError(f"{len(seeds)} seeds for {n} samples; give one seed per sample")


def sample_count(n: int | None, seeds: str | None, default: int) -> tuple[int, list[int] | None]:
    """(number of samples, seeds) from --n and --seeds (EDM's notation, parsed): --seeds sets the number, and an --n
    beside it must agree; neither: ``default`` samples."""
    if seeds is None:
        return (default if n is None else n), None
    seeds = parse_seeds(seeds)
    if n is not None and n != len(seeds):
        raise LegoError(f"--n {n} with {len(seeds)} --seeds: give one of them (--seeds sets the number of samples)")
    return len(seeds), seeds


def parse_labels(text: str | None, n: int, num_classes: int, seeds=None) -> torch.Tensor | None:
    """--labels: one class id or a comma list, cycled over n samples; none given: 0, 1, 2, ... cycled, or with
    ``seeds`` class s mod K for the image of seed s, whatever its batch (None for an unconditional model)."""
    if not num_classes:
        if text:
            raise LegoError("--labels given but the model is unconditional")
        return None
    if not text:
        return (torch.arange(n) if seeds is None else torch.tensor(seeds)) % num_classes
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
    device=None, progress: bool = False, desc: str = "sampling", guidance_interval=None, guide_skip=None, guide=None,
    seeds=None, **sampler_kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """n samples [n, C, H, W] (on the CPU) from the denoiser ``net``, and the labels they were drawn for.

    labels: class ids [n] (or one id for all), None for the null class (unconditional); regions: a [H, W] label map
    or rectangles ``(top, left, bottom, right, class)`` covering the canvas (sliding window only). The canvas
    (height x width, default: the training canvas) goes through the model whole, or by the sliding window when a
    window, stride or regions is given. ``generator`` (default: one seeded with ``seed``) draws every batch's noise
    in turn and the samplers' noise. ``device``: where the noise is drawn (default: the model's); ``progress``: a
    progress bar labelled ``desc``. Other keyword arguments go to the sampler (e.g. ``eta`` for DDIM).

    Guidance (``cfg_scale`` w > 1) is D_weak + w (D - D_weak), the weak denoiser being the null class
    (classifier-free), or with ``guide_skip`` the same model with its top K bricks skipped (an int K, or brick
    indices), or ``guide``, another denoiser on the same classes (autoguidance, e.g. an earlier or smaller
    checkpoint); ``guidance_interval`` (lo, hi) guides only for sigma in [lo, hi].

    ``seeds`` (n of them): image i is drawn from its own generator seeded with seeds[i] (EDM's convention,
    ``generate.py --seeds=0-49999``), its starting noise and its sampler's noise alike, so it is the same in any batch
    and on any number of ranks; ``seed`` and ``generator`` are then not used."""
    check_sample_options(n, sampler, steps, cfg_scale, t_break, height, width, seed, batch, churn, window, stride,
                         max_batch, guidance_interval, guide_skip, guide is not None)  # fmt: skip
    if seeds is not None:
        check_seeds(seeds, n)
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
    if guidance_interval is not None:
        kwargs["guidance_interval"] = tuple(guidance_interval)
    if guide_skip is not None:
        kwargs["guide"] = guide_bricks(net, guide_skip)
    elif guide is not None:
        check_guide(net, guide, *((h, w) if denoiser is net else denoiser.window))
        windowed = denoiser is not net
        kwargs["guide"] = SlidingWindow(guide, denoiser.window, denoiser.stride, max_batch) if windowed else guide
    elif cfg_scale != 1 and not net.num_classes:
        raise LegoError(
            f"cfg_scale {cfg_scale:g}: the model is unconditional, so classifier-free guidance has no class to guide "
            "towards; guide it by its sub-stack (guide_skip) or a guide model instead, or drop the scale"
        )
    if churn:
        kwargs.update(S_churn=churn, **CHURN)
    kwargs.update(sampler_kwargs)
    g = generator if generator is not None else torch.Generator(device).manual_seed(seed)
    chunks = []
    for start in tqdm(range(0, n, batch), desc=desc, unit="batch", disable=not progress):
        size = min(batch, n - start)
        if seeds is not None:
            g = SeedGenerators(seeds[start : start + size], device)
            z = g.randn((size, net.in_channels, h, w), device)
        else:
            z = torch.randn(size, net.in_channels, h, w, generator=g, device=device)
        y = labels[start : start + size].to(device) if labels is not None else None
        chunks.append(SAMPLERS[sampler](denoiser, z, y, generator=g, **kwargs).cpu())
    return torch.cat(chunks), labels


def check_guide(net, guide, height: int, width: int) -> None:
    """A guide model (autoguidance) is called like ``net`` on the same noisy canvas and class labels."""
    if guide.in_channels != net.in_channels:
        raise LegoError(
            f"the guide model draws {guide.in_channels} channels and the model {net.in_channels}; a guide must work in "
            "the same space (the same data, images or the same autoencoder's latents)"
        )
    if guide.num_classes and guide.num_classes != net.num_classes:
        raise LegoError(
            f"the guide model has {guide.num_classes} classes and the model {net.num_classes or 'none'}; a guide must "
            "know the model's classes (or be unconditional)"
        )
    guide.check_canvas(torch.empty(1, guide.in_channels, height, width, device="meta"))


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
