"""Drawing samples from a checkpoint for lego.sample and lego.eval.

``load_job`` checks the options and loads the model (and guide); ``draw`` draws one rank's share of the images in
batches, every image from its own seed (EDM's convention: ``--n N --seed S`` is ``--seeds S..S+N-1``), decoded by an
autoencoder where the model draws latents, and can keep each finished batch in a folder so that an interrupted run
picks up where it stopped; ``gather`` brings every rank's images (or their features) to rank 0 in image order;
``write_samples`` is lego.sample. Whatever the number of ranks, and however often a run was interrupted, the images
are the same.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lego import checks
from lego.checkpoints.build import check_guidance, check_skipping, load_for_sampling
from lego.checkpoints.format import load_checkpoint
from lego.data.images import save_grid, save_npz, to_uint8
from lego.data.vae import decode, factors, load_vae
from lego.diffusion.cost import CostMeter
from lego.diffusion.generate import check_sample_options, generate, parse_interval, parse_labels, sample_count
from lego.diffusion.window import parse_regions
from lego.errors import LegoError
from lego.files import atomic_write, check_new_files
from lego.ranks import agree


@dataclass
class Job:
    """A sampling run, checked and loaded: the model (and guide), one seed and label per image, generate()'s options
    and the batch size (the unit a rank draws and a resumed run keeps)."""

    ckpt: str
    model: nn.Module
    guide: nn.Module | None
    train_config: dict
    seeds: list[int]
    labels: torch.Tensor | None  # [n] class ids, or None (unconditional, or --regions)
    batch: int
    options: dict = field(default_factory=dict)  # generate()'s keyword arguments
    weights: dict = field(default_factory=dict)  # which weights: EMA or raw, the guide model's checkpoint

    @property
    def n(self) -> int:
        return len(self.seeds)

    def signature(self) -> dict:
        """What decides the images: a resumed run must agree on it."""
        path = Path(self.ckpt).expanduser().resolve()
        stat = path.stat()
        options = {k: v for k, v in self.options.items() if k != "device"}
        return {
            "ckpt": str(path), "ckpt_size": stat.st_size, "ckpt_mtime_ns": stat.st_mtime_ns, "seeds": self.seeds,
            "labels": None if self.labels is None else self.labels.tolist(), "batch": self.batch,
            "options": json.loads(json.dumps(options, default=str)), **self.weights,
        }  # fmt: skip


def load_job(
    ckpt, n=None, seeds=None, seed=0, labels=None, regions=None, batch=64, device=None, use_ema=True, guide_ckpt=None,
    sampler="heun", steps=None, cfg_scale=1.0, t_break=0.0, height=None, width=None, churn=0.0, window=None,
    stride=None, max_batch=64, guidance_interval=None, guide_skip=None, default_n=64,
) -> Job:  # fmt: skip
    """Check a sampling run's options (texts as lego.sample's: ``seeds`` "0-49999", ``labels`` "3" or "0,1,2",
    ``regions`` "0:64=3,64:128=7", ``guidance_interval`` "0.28,5.42"), then load ``ckpt`` (and ``guide_ckpt``). Image
    i comes from seed ``seed + i`` unless ``seeds`` are given; a conditional model's image of seed s asks for class
    s mod K unless ``labels`` or ``regions`` say otherwise."""
    interval = parse_interval(guidance_interval)
    n, seed_list = sample_count(n, seeds, default_n)
    # generate() checks these too; here they are checked before a checkpoint is loaded (seconds for a large one)
    check_sample_options(n, sampler, steps, cfg_scale, t_break, height, width, seed, batch, churn, window, stride,
                         max_batch, interval, guide_skip, guide_ckpt is not None)  # fmt: skip
    if seed_list is None:
        if seed + n - 1 > checks.MAX_SEED:
            raise LegoError(f"--seed {seed} with --n {n} runs past the largest seed {checks.MAX_SEED}")
        seed_list = list(range(seed, seed + n))
    device = checks.device(device)
    model, guide, train_config = load_for_sampling(ckpt, guide_ckpt, use_ema, device, cfg_scale, t_break, guide_skip)
    rects = None
    if regions:
        if labels:
            raise LegoError("give --labels or --regions, not both")
        if not model.num_classes:
            raise LegoError("--regions given but the model is unconditional")
        rects = parse_regions(regions, height or model.resolution)
        if any(not 0 <= cls < model.num_classes for *_, cls in rects):
            raise LegoError(f"--regions: classes must be in 0..{model.num_classes - 1}")
    ids = None if rects else parse_labels(labels, n, model.num_classes, seed_list)
    options = {
        "sampler": sampler, "steps": steps, "cfg_scale": cfg_scale, "t_break": t_break, "height": height,
        "width": width, "batch": batch, "churn": churn, "window": window, "stride": stride, "max_batch": max_batch,
        "regions": rects, "guidance_interval": interval, "guide_skip": guide_skip, "device": device,
    }  # fmt: skip
    weights = {"ema": use_ema, "guide_ckpt": None if guide_ckpt is None else str(Path(guide_ckpt).resolve())}
    return Job(str(ckpt), model, guide, train_config, seed_list, ids, batch, options, weights)


def vary(job: Job, cfg_scale: float | None = None, t_break: float | None = None) -> Job:
    """``job`` with another guidance scale or t_break (a point of lego.eval --sweep), checked as load_job checks
    them; the model is shared, not loaded again."""
    o = {**job.options}
    o["cfg_scale"] = o["cfg_scale"] if cfg_scale is None else cfg_scale
    o["t_break"] = o["t_break"] if t_break is None else t_break
    check_sample_options(job.n, o["sampler"], o["steps"], o["cfg_scale"], o["t_break"], o["height"], o["width"], 0,
                         job.batch, o["churn"], o["window"], o["stride"], o["max_batch"], o["guidance_interval"],
                         o["guide_skip"], job.guide is not None)  # fmt: skip
    classifier_free = job.guide is None and o["guide_skip"] is None
    check_guidance(o["cfg_scale"], job.model.num_classes, job.train_config, classifier_free=classifier_free)
    check_skipping(job.train_config, o["t_break"], o["guide_skip"])
    return replace(job, options=o)


def share(n: int, batch: int, rank: int, world: int) -> list[int]:
    """The batches (indices of ``batch`` images) rank ``rank`` of ``world`` draws: rank, rank + world, ..."""
    return list(range(rank, math.ceil(n / batch), world))


@dataclass
class Drawn:
    """One rank's images: their indices in the run [m], the images [m, C, H, W] (decoded ones in [-1, 1]) and their
    labels ([m], [m, H, W] with regions, or None); the cost of what was drawn in this process."""

    indices: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor | None
    meter: CostMeter
    drawn: int  # images drawn in this process (the others were read back from an interrupted run's batches)


class Parts:
    """The finished batches of a run, one file each in a folder beside its output, so that a run that stops (a
    signal, a lost node) is restarted with the same command and goes on; ``run.json`` says what run they belong to."""

    def __init__(self, folder: Path, job: Job, uint8: bool, vae: str | None = None, overwrite: bool = False):
        self.folder, self.uint8 = folder, uint8
        signature = json.loads(json.dumps({**job.signature(), "uint8": uint8, "vae": vae}))
        record = folder / "run.json"
        if record.exists() and json.loads(record.read_text()) != signature:
            if not overwrite:
                raise LegoError(
                    f"{folder} holds the batches of an interrupted run with other options or another checkpoint; run "
                    "the same command again to finish it, or pass --overwrite (or delete the folder) to start over"
                )
            self.remove()
        folder.mkdir(parents=True, exist_ok=True)
        if not record.exists():  # (every rank writes the same record)
            atomic_write(record, lambda tmp: Path(tmp).write_text(json.dumps(signature)))

    def empty(self) -> bool:
        return not any(self.folder.glob("batch-*.pt"))

    def path(self, k: int) -> Path:
        return self.folder / f"batch-{k:06d}.pt"

    def read(self, k: int):
        try:
            part = torch.load(self.path(k), weights_only=True)
            return part["images"], part["labels"]
        except Exception as e:  # noqa: BLE001 -- unpickling and zip errors alike: the file is damaged
            raise LegoError(
                f"{self.path(k)} is damaged ({e}); delete it and run again (it will be drawn again)"
            ) from None

    def write(self, k: int, images, labels) -> None:
        atomic_write(self.path(k), lambda tmp: torch.save({"images": images, "labels": labels}, tmp))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def draw(
    job: Job, rank=0, world=1, vae=None, latents=None, parts: Parts | None = None, progress=False, desc="sampling"
):
    """This rank's share of ``job``'s images (see ``share``), batch by batch: drawn, decoded by the autoencoder
    ``vae`` if given (``latents``: what lego.encode recorded of its scaling), and, with ``parts``, kept (as uint8
    [b, H, W, C] if ``parts.uint8``) or read back when an interrupted run already drew them. Returns a Drawn."""
    meter = CostMeter(job.model, job.guide)
    indices, images, labels, drawn = [], [], [], 0
    for k in tqdm(share(job.n, job.batch, rank, world), desc=desc, unit="batch", disable=not progress):
        ids = list(range(k * job.batch, min((k + 1) * job.batch, job.n)))
        if parts is not None and parts.path(k).is_file():
            x, y = parts.read(k)
        else:
            with meter:
                x, y = generate(job.model, len(ids), labels=None if job.labels is None else job.labels[ids],
                                guide=job.guide, seeds=[job.seeds[i] for i in ids], **job.options)  # fmt: skip
            if not torch.isfinite(x).all():
                raise LegoError(
                    f"sampling {job.ckpt} gave NaN or inf values, so there is nothing to write or score. Try less "
                    "guidance (--cfg-scale) or another checkpoint"
                )
            if vae is not None:
                x = decode(vae, x, *factors(vae, latents))
                if not torch.isfinite(x).all():
                    raise LegoError(
                        "the autoencoder decoded the (finite) samples into NaN or inf values, so there is nothing to "
                        "write or score. Check it is the autoencoder the latents were made with, and that it loads in "
                        "float32"
                    )
            drawn += len(ids)
            if parts is not None:
                x = torch.from_numpy(to_uint8(x)) if parts.uint8 else x
                parts.write(k, x, y)
        indices += ids
        images.append(x)
        labels.append(y)
    c = job.model.in_channels
    images = torch.cat(images) if images else torch.empty(0, c, 0, 0)
    labels = torch.cat(labels) if labels and labels[0] is not None else None
    return Drawn(torch.tensor(indices, dtype=torch.long), images, labels, meter, drawn)


def gather(indices: torch.Tensor, tensors: dict, rank: int, world: int) -> dict | None:
    """Every rank's ``tensors`` (rows indexed by ``indices``) on rank 0, in index order; None on the other ranks.
    In one process (``world`` 1), ``tensors`` ordered."""
    if world > 1:
        parts = [None] * world if rank == 0 else None
        cpu = {k: None if v is None else v.cpu() for k, v in tensors.items()}
        torch.distributed.gather_object((indices, cpu), parts, dst=0)
        if rank:
            return None
        parts = [p for p in parts if len(p[0])]
        indices = torch.cat([p[0] for p in parts])
        tensors = {k: None if parts[0][1][k] is None else torch.cat([p[1][k] for p in parts]) for k in tensors}
    order = indices.argsort()
    return {k: None if v is None else v[order] for k, v in tensors.items()}


def check_outputs(out, npz, overwrite: bool) -> list[Path]:
    outs = [Path(p) for p in (out, npz) if p]
    for path in outs:
        if path.suffix not in (".png", ".npz"):
            raise LegoError(f"{path}: the output must end in .png (a grid) or .npz")
    check_new_files(outs, overwrite)
    if npz and Path(npz).suffix != ".npz":  # it wrote a second grid there
        raise LegoError(f"--npz {npz}: --npz writes an .npz; give a name ending in .npz")
    return outs


def open_vae(vae: str | None, ckpt, latents: dict | None, device, program: str = "lego.sample"):
    """The autoencoder ``vae`` names (None: none), loaded on ``device``; warns when lego.encode recorded another."""
    if not vae:
        return None
    if latents and latents.get("vae") and not _same_source(vae, latents["vae"]):
        print(f"{program}: warning: {ckpt} was trained on latents of the autoencoder {latents['vae']}; decoding "
              f"with {vae} gives wrong images unless it is the same model", file=sys.stderr)  # fmt: skip
    return load_vae(vae, device)


def write_samples(
    ckpt, out, npz=None, vae=None, overwrite=False, images_only=False, rank=0, world=1, progress=False, **options
) -> list[Path]:  # fmt: skip
    """lego.sample: draw the images (``load_job``'s ``options``; on every rank under torchrun), decode latents with
    the autoencoder ``vae`` (loaded first: a bad one fails fast), write ``out`` (a .png grid or an .npz) and ``npz``
    (replacing files only with ``overwrite``; ``images_only``: the .npz without the float32 samples) from rank 0.
    Finished batches wait in ``<out>.parts/`` until the files are written, so that the same command, run again
    after an interruption, finishes the run. Returns the files written."""
    outs = check_outputs(out, npz, overwrite)
    latents = load_checkpoint(ckpt, parts=()).train_config.get("latents")  # what lego.encode recorded, if any
    if latents and not vae and any(path.suffix == ".png" for path in outs):
        raise LegoError(
            f"{ckpt} draws autoencoder latents (encoded with {latents.get('vae', 'an autoencoder')}), not images: give "
            "--vae to decode them, or write an .npz to keep the raw latents"
        )
    if images_only and latents and not vae:
        raise LegoError(f"--images-only: {ckpt} draws latents, which are not images; give --vae to decode them")
    job = load_job(ckpt, **options)
    autoencoder = open_vae(vae, ckpt, latents, job.options["device"])
    folder = outs[0].with_name(outs[0].name + ".parts")

    def my_share() -> tuple[Parts, int, int]:
        parts = Parts(folder, job, images_only, vae, overwrite)
        try:
            mine = draw(job, rank, world, autoencoder, latents, parts, progress and rank == 0, "lego.sample")
        except Exception:
            if parts.empty():  # nothing to resume (e.g. options generate() refused): leave no folder behind
                parts.remove()
            raise
        return parts, mine.meter.evaluations, mine.drawn  # (its images are on disk: rank 0 reads every batch back)

    parts, evaluations, drawn = agree(my_share, world)  # (a collective: after it, every rank's batches are on disk)
    if drawn and rank == 0:
        print(f"lego.sample: {evaluations / drawn:g} network evaluations per image")
    if rank:
        return []
    every = [parts.read(k) for k in range(math.ceil(job.n / job.batch))]
    images = torch.cat([x for x, _ in every])
    labels = None if every[0][1] is None else torch.cat([y for _, y in every])
    if images_only:  # uint8 [n, H, W, C]
        images = images.permute(0, 3, 1, 2).float() / 127.5 - 1  # exactly the floats that round to them
    for path in outs:
        if path.suffix == ".png":
            save_grid(images, path)
        else:
            save_npz(images, path, labels, samples=not images_only)
        print(f"lego.sample: wrote {path} ({len(images)} samples, {images.shape[2]}x{images.shape[3]})")
    parts.remove()
    return outs


def _same_source(given: str, recorded: str) -> bool:
    """The autoencoder --vae names is the one lego.encode recorded: the same folder, or the same hub id."""
    a, b = Path(given).expanduser(), Path(recorded).expanduser()
    if a.exists() and b.exists():
        return a.resolve() == b.resolve()
    return given == recorded
