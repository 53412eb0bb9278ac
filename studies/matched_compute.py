"""Issue 24: does LEGO pay off? LEGO (PG and PR) against DiT on MNIST 16 x 16 at matched training compute, trained
until the ranking settles, and where LEGO should win (patch fraction, brick skipping, a larger canvas).

Usage: python studies/matched_compute.py [--work runs/matched] [--out studies/results/matched_compute] [--jobs 2]
                                         [--phases match,lr,long,patch,skip,canvas,demo] [--report-only]

Resumable: every run trains with lego.train --resume in its own folder under --work, one chunk per evaluation point,
and every finished evaluation is a JSON file there. Run the command again and it goes on where it stopped, reusing
what is done (a chunk cut short is trained again from the checkpoint before it, which gives the same weights).

Phases (each uses what the ones before it left):
- match: training FLOPs per image (forward + backward of the LEGO loss, torch.utils.flop_counter) of DiT-T/2 at 16 x 16
  and of LEGO-T-PG-16 / LEGO-T-PR-16 with every depth triple in 1..4 blocks per brick; each LEGO gets, among the
  triples within 5% of DiT-T/2's FLOPs, the most even one (as the registry's (2, 2, 2), which is 25% cheaper), then
  the closest.
- lr: each model at learning rates 5e-4, 1e-3 and 2e-3 (seed 0), 1,000 steps, the grid extended by factors of 2 past
  an end that was best (within 1.25e-4 .. 8e-3); the lowest FD picks the model's lr.
- long: each model at its lr, seeds 0 and 1, to 4,000 steps (evaluated at 500, 1000, 2000, 3000, 4000).
- patch: the matched PG at patch fraction 0.75 and 0.5, trained for the training FLOPs of 4,000 steps at 1.0.
- skip: every long run's 4,000-step checkpoint scored again on other images (seeds 1000..1999: the evaluation's own
  noise), and sampled more cheaply: PG and PR with t_break 0.25, 0.5, 0.75 and 1 (0 is the long run's), every model
  with 7 and 5 Heun steps instead of 10 and with DPM-Solver++(2M) at 10 evaluations (the ways to cheaper sampling DiT
  has too), and PG and PR with both (DPM-Solver++ at t_break 1).
- canvas: the same checkpoints sampling 32 x 32 canvases of one class each (DiT-T/2 too: diffusers recomputes its
  sin-cos position embedding for the larger grid; a model that refuses is recorded as such), scored two ways against
  as many 16 x 16 samples (the first from the canvases' seeds): their four 16 x 16 quarters as digits (FD, class
  accuracy of the class asked for), and the whole canvas shrunk to 16 x 16 as one digit.
- demo: the first README command's budget (lego.train's defaults: LEGO-T-PR-16 with the registry's depths, 800 steps;
  its lr was 2e-3 until this phase chose 4e-3): the registry's depths against the matched ones at equal training
  FLOPs, each at lr 2e-3 and 4e-3.
Everything else is the demo's recipe: batch 64, AdamW with 100 warm-up steps, EMA 0.995, label dropout 0.1, the
embedded 10k MNIST digits at 16 x 16; evaluation `lego.eval --n 1000 --steps 10` (Heun, 19 network evaluations).
Each run is one single-threaded process, --jobs at a time; compute is counted as FLOPs and as process CPU time (not
wall-clock, which a shared machine makes noisy).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

MODELS = {"dit": "DiT-T/2", "pg": "LEGO-T-PG-16", "pr": "LEGO-T-PR-16"}
LRS = (5e-4, 1e-3, 2e-3)
LR_LIMITS = (1.25e-4, 8e-3)  # the grid grows past its best end, by factors of 2, up to these
LR_STEPS = 1000
EVAL_AT = (500, 1000, 2000, 3000, 4000)
SEEDS = (0, 1)
FRACTIONS = (0.75, 0.5)
T_BREAKS = (0.25, 0.5, 0.75, 1.0)
FEWER_STEPS = (5, 7)  # Heun steps (9 and 13 network evaluations): the way to cheaper sampling any model has
SOLVER = ("dpmpp-2m", 10)  # and a better solver: DPM-Solver++(2M), 10 network evaluations (see studies/fewer_calls.py)
N, SAMPLE_STEPS = 1000, 10
MATCH_TOLERANCE = 0.05
RECIPE = {"batch": 64, "warmup": 100, "ema": 0.995, "label_dropout": 0.1}
DEMO_STEPS, DEMO_LRS = 800, (2e-3, 4e-3)  # lego.train's default steps; its old and new default lr
DEMO_KEYS = ("pr-registry", "pr-matched")  # the registry's depths, the matched ones


def _write(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------------------------------------------------
# Compute


def train_flops(model: str, depths=None, patch_fraction: float = 1.0) -> int:
    """Forward + backward FLOPs of the LEGO loss per training image (counted on 4 images at 16 x 16)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lego import LegoLoss, build_model
    from lego.data.datasets import open_dataset
    from lego.data.loader import prepare
    from lego.networks.registry import model_config
    from lego.training.config import TrainConfig, architecture

    data = open_dataset("default", 16)
    images, labels = data[torch.arange(4)]
    arch = architecture(TrainConfig(model=model, depths=None if depths is None else tuple(depths)))  # as lego.train
    net = build_model(model_config(model, in_channels=1, num_classes=10, resolution=16, **arch))
    with FlopCounterMode(display=False) as counter:
        loss, _ = LegoLoss(patch_fraction)(net, prepare(images, 16, None), labels, torch.Generator().manual_seed(0))
        loss.backward()
    return counter.get_total_flops() // 4


def match(work: Path) -> dict:
    """The depths of each LEGO stack whose training FLOPs per image are closest to DiT-T/2's (phase match)."""
    found = _read(work / "match.json")
    if found:
        return found
    torch.set_num_threads(1)
    target = train_flops(MODELS["dit"])
    out = {"dit": {"model": MODELS["dit"], "depths": None, "flops_per_image": target}}
    for key in ("pg", "pr"):
        registry = train_flops(MODELS[key])
        scored = []
        for depths in itertools.product(range(1, 5), repeat=3):
            flops = train_flops(MODELS[key], depths)
            gap = (flops - target) / target
            # within 5% of DiT's FLOPs, the most even depths (the registry's are even), then the closest FLOPs
            scored.append((abs(gap) > MATCH_TOLERANCE, max(depths) - min(depths), abs(gap), depths, flops))
        *_, depths, flops = min(scored)
        gap = (flops - target) / target
        out[key] = {"model": MODELS[key], "depths": list(depths), "flops_per_image": flops, "gap": gap,
                    "registry_depths": [2, 2, 2], "registry_flops_per_image": registry}  # fmt: skip
        print(f"study: match {key}: depths {depths}, {flops / 1e9:.3f} GFLOP per training image against DiT-T/2's "
              f"{target / 1e9:.3f} ({gap:+.1%}); the registry's (2, 2, 2): {registry / 1e9:.3f}",
              flush=True)  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    _write(work / "match.json", out)
    return out


def demo_specs(matched: dict) -> dict:
    """``matched`` with the demo phase's two PR stacks: the registry's depths and the matched ones."""
    pr = matched["pr"]
    registry = {"model": pr["model"], "depths": None, "flops_per_image": pr["registry_flops_per_image"]}
    return {**matched, "pr-registry": registry, "pr-matched": pr}


# ---------------------------------------------------------------------------------------------------------------------
# Runs


@dataclasses.dataclass(frozen=True)
class Run:
    key: str  # dit, pg, pr (the demo phase: pr-registry, pr-matched)
    lr: float
    seed: int = 0
    patch_fraction: float = 1.0

    @property
    def name(self) -> str:
        frac = "" if self.patch_fraction == 1 else f"-f{self.patch_fraction:g}"
        return f"{self.key}-lr{self.lr:g}-s{self.seed}{frac}"


def _evaluate(
    ckpt: Path, t_break: float = 0.0, steps: int = SAMPLE_STEPS, seed: int = 0, sampler: str = "heun"
) -> dict:
    from lego.metrics.evaluate import evaluate

    r = evaluate(str(ckpt), n=N, sampler=sampler, steps=steps, t_break=t_break, seed=seed, progress=False)
    keys = ("fd", "class_accuracy", "nfe_per_sample", "flops_per_sample", "flops_saved_by_skipping", "cpu_s", "n")
    return {k: r[k] for k in keys}


def train_run(run: Run, stops: list[int], work: str, matched: dict) -> list[dict]:
    """Train ``run`` to each step of ``stops`` (lego.train --resume between them), evaluate there; returns the
    evaluation records (those already on disk are reused)."""
    torch.set_num_threads(1)
    from lego.training.config import TrainConfig
    from lego.training.loop import train

    folder = Path(work) / run.name
    folder.mkdir(parents=True, exist_ok=True)
    spec = matched[run.key]
    cfg = TrainConfig(model=spec["model"], resolution=16, depths=None if spec["depths"] is None else
                      tuple(spec["depths"]), patch_fraction=run.patch_fraction, lr=run.lr, seed=run.seed,
                      steps=0, out=str(folder / "run"), sample_n=0, log_every=10**9, ckpt_every=10**9,
                      keep_checkpoints=len(EVAL_AT) + 2, **RECIPE)  # fmt: skip
    flops = spec["flops_per_image"] if run.patch_fraction == 1 else train_flops(spec["model"], spec["depths"],
                                                                                 run.patch_fraction)  # fmt: skip
    progress = _read(folder / "progress.json") or {"step": 0, "train_cpu_s": 0.0, "train_wall_s": 0.0}
    ckpt = folder / "run" / "checkpoint.safetensors"
    if progress["step"] and _checkpoint_at(folder, progress["step"]) != ckpt:  # a chunk cut short: train it again
        shutil.copyfile(folder / "run" / f"checkpoint-{progress['step']}.safetensors", ckpt)
    records = []
    for stop in stops:
        if stop > progress["step"]:
            w0, c0 = time.perf_counter(), time.process_time()
            train(dataclasses.replace(cfg, steps=stop), resume=progress["step"] > 0, progress=False,
                  overwrite=progress["step"] == 0)  # fmt: skip
            progress = {"step": stop, "train_cpu_s": progress["train_cpu_s"] + time.process_time() - c0,
                        "train_wall_s": progress["train_wall_s"] + time.perf_counter() - w0}  # fmt: skip
            _write(folder / "progress.json", progress)
        done = folder / f"eval-{stop}.json"
        at = _checkpoint_at(folder, stop)
        if not done.is_file() and at is None:
            continue  # (a step this run passed before it was asked to stop there)
        if not done.is_file():
            record = {"run": run.name, **dataclasses.asdict(run), "model": spec["model"], "depths": spec["depths"],
                      "step": stop, "train_cpu_s": round(progress["train_cpu_s"], 1),
                      "train_wall_s": round(progress["train_wall_s"], 1), "train_flops": flops * stop * RECIPE["batch"],
                      **_evaluate(at)}  # fmt: skip
            _write(done, record)
            print(f"study: {json.dumps(record)}", flush=True)
        records.append(_read(done))
    return records


def _checkpoint_at(folder: Path, step: int) -> Path | None:
    """The run's checkpoint of ``step`` (the newest, or one lego.train kept as checkpoint-STEP), if there is one."""
    from lego.checkpoints.format import load_checkpoint

    kept, newest = folder / "run" / f"checkpoint-{step}.safetensors", folder / "run" / "checkpoint.safetensors"
    if kept.is_file():
        return kept
    return newest if newest.is_file() and load_checkpoint(newest, parts=()).step == step else None


def skip_run(run: Run, step: int, work: str) -> list[dict]:
    """Evaluate the run's checkpoint of ``step`` again: on another N images (seeds N..2N-1: the evaluation's own
    noise), and sampled more cheaply: with t_break in T_BREAKS (LEGO), and with FEWER_STEPS Heun steps and with
    SOLVER (every model; LEGO also with SOLVER and t_break 1)."""
    torch.set_num_threads(1)
    folder = Path(work) / run.name
    ckpt = _checkpoint_at(folder, step)
    points = [(f"resample-{step}", 0.0, SAMPLE_STEPS, N, "heun")]
    points += [(f"skip-{step}-{t:g}", t, SAMPLE_STEPS, 0, "heun") for t in T_BREAKS if run.key != "dit"]
    points += [(f"steps-{step}-{k}", 0.0, k, 0, "heun") for k in FEWER_STEPS]
    solver = f"steps-{step}-{SOLVER[0]}-{SOLVER[1]}"
    points.append((solver, 0.0, SOLVER[1], 0, SOLVER[0]))
    if run.key != "dit":
        points.append((f"{solver}-skip-1", 1.0, SOLVER[1], 0, SOLVER[0]))
    rows = []
    for name, t, k, seed, sampler in points:
        done = folder / f"{name}.json"
        if not done.is_file():
            record = {"run": run.name, "key": run.key, "step": step, "sampler": sampler, "t_break": t,
                      "sample_steps": k, "seed": seed}  # fmt: skip
            _write(done, {**record, **_evaluate(ckpt, t, k, seed, sampler)})
            print(f"study: {json.dumps(_read(done))}", flush=True)
        rows.append(_read(done))
    return rows


def canvas_run(run: Run, step: int, work: str, side: int = 32, n: int = 250) -> dict:
    """Sample ``side`` x ``side`` canvases of one class each from the run's checkpoint and score them two ways: their
    16 x 16 quarters as digits (beside as many 16 x 16 samples), and the whole canvas shrunk to 16 x 16 as one digit
    (beside the first ``n`` of those samples). The first 10 canvases are kept as an image array for the report."""
    torch.set_num_threads(1)
    folder = Path(work) / run.name
    done = folder / f"canvas-{step}-{side}.json"
    if done.is_file():
        return _read(done)
    import numpy as np

    from lego.checkpoints.build import load_model
    from lego.diffusion.generate import generate
    from lego.errors import LegoError
    from lego.metrics.features import MnistFeatures
    from lego.metrics.frechet import feature_stats, frechet_distance, reference_stats

    model = load_model(_checkpoint_at(folder, step))
    labels = torch.arange(n) % 10
    record = {"run": run.name, "key": run.key, "step": step, "canvas": side, "n": n}
    try:
        images, _ = generate(model, n, "heun", SAMPLE_STEPS, 1.0, labels, 0.0, side, side, seeds=list(range(n)))
    except LegoError as e:
        record["refused"] = str(e)
        _write(done, record)
        return record
    mnist = MnistFeatures()
    ref = reference_stats("default", 16, mnist, "ccexam-mnist")

    def score(batch: torch.Tensor, classes: torch.Tensor) -> tuple[float, float]:
        feats, logits = mnist(batch)
        return frechet_distance(*feature_stats(feats), *ref), float((logits.argmax(1) == classes).float().mean())

    quarters = images.unfold(2, 16, 16).unfold(3, 16, 16).permute(0, 2, 3, 1, 4, 5).reshape(-1, 1, 16, 16)
    record["fd_quarters"], record["class_accuracy_quarters"] = score(quarters, labels.repeat_interleave(4))
    shrunk = torch.nn.functional.avg_pool2d(images, side // 16)
    record["fd_whole"], record["class_accuracy_whole"] = score(shrunk, labels)
    # 16 x 16 samples as many as the quarters (FD depends on n), the first n from the canvases' seeds
    labels16 = torch.arange(4 * n) % 10
    whole, _ = generate(model, 4 * n, "heun", SAMPLE_STEPS, 1.0, labels16, seeds=list(range(4 * n)))
    record["fd_16"], record["class_accuracy_16"] = score(whole, labels16)
    record["fd_16_first_n"], record["class_accuracy_16_first_n"] = score(whole[:n], labels16[:n])
    pixels = ((images[:10, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    np.save(folder / f"canvas-{step}-{side}.npy", pixels)
    _write(done, record)
    print(f"study: {json.dumps(record)}", flush=True)
    return record


# ---------------------------------------------------------------------------------------------------------------------
# Report


def collect(work: Path) -> dict:
    """Every record on disk, by kind."""
    found = {"match": _read(work / "match.json"), "evals": [], "skips": [], "resamples": [], "canvas": []}
    for f in sorted(work.glob("*/eval-*.json")):
        found["evals"].append(_read(f))
    for f in sorted(work.glob("*/skip-*.json")) + sorted(work.glob("*/steps-*.json")):
        found["skips"].append({"sampler": "heun", "sample_steps": SAMPLE_STEPS, **_read(f)})
    for f in sorted(work.glob("*/resample-*.json")):
        found["resamples"].append(_read(f))
    for f in sorted(work.glob("*/canvas-*.json")):
        found["canvas"].append(_read(f))
    return found


def lr_results(evals: list[dict], key: str) -> dict[float, float]:
    """{lr: FD at LR_STEPS} of model ``key``'s learning-rate runs (seed 0, patch fraction 1) finished so far."""
    return {e["lr"]: e["fd"] for e in evals if e["key"] == key and e["step"] == LR_STEPS and e["seed"] == 0
            and e["patch_fraction"] == 1}  # fmt: skip


def best_lrs(evals: list[dict]) -> dict:
    """Each model's lr with the lowest FD at LR_STEPS, once its grid is done: LRS, extended by a factor of 2 past
    whichever end was best (until the best is inside the grid, within LR_LIMITS)."""
    best = {}
    for key in MODELS:
        fds = lr_results(evals, key)
        if set(LRS) <= set(fds) and not _next_lr(fds):
            best[key] = min(fds, key=fds.get)
    return best


def _next_lr(fds: dict[float, float]) -> float | None:
    """The learning rate to try next: past the best if the best is at an end of those tried, within LR_LIMITS."""
    tried, lr = sorted(fds), min(fds, key=fds.get)
    if lr == tried[-1] and lr * 2 <= LR_LIMITS[1]:
        return lr * 2
    if lr == tried[0] and lr / 2 >= LR_LIMITS[0]:
        return lr / 2
    return None


def long_curves(evals: list[dict], best: dict) -> dict:
    """{model key: [(step, train TFLOP, train CPU s, FD mean, FD half-range, accuracy mean, accuracy half-range,
    seeds)]} of the long runs (each model at its lr, patch fraction 1), over the seeds finished at each step."""
    curves = {}
    for key, lr in best.items():
        rows = [e for e in evals if e["key"] == key and e["lr"] == lr and e["patch_fraction"] == 1]
        points = []
        for step in sorted({e["step"] for e in rows}):
            at = [e for e in rows if e["step"] == step]
            fd, acc = [e["fd"] for e in at], [e["class_accuracy"] for e in at]
            points.append((step, sum(e["train_flops"] for e in at) / len(at) / 1e12,
                           sum(e["train_cpu_s"] for e in at) / len(at), sum(fd) / len(fd), (max(fd) - min(fd)) / 2,
                           sum(acc) / len(acc), (max(acc) - min(acc)) / 2, len(at)))  # fmt: skip
        curves[key] = points
    return curves


def patch_runs(found: dict) -> dict[float, list[dict]]:
    """{patch fraction: the evaluations of LEGO-PG's seed-0 run at its lr with that fraction, by step}."""
    lr = found["best_lr"].get("pg")
    runs = {}
    for e in sorted(found["evals"], key=lambda e: e["step"]):
        if e["key"] == "pg" and e["lr"] == lr and e["seed"] == 0:
            runs.setdefault(e["patch_fraction"], []).append(e)
    return runs if len(runs) > 1 else {}


def plot(found: dict, work: Path, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    curves = long_curves(found["evals"], found["best_lr"])
    if curves:
        fig, axes = plt.subplots(2, 2, figsize=(11, 8))
        for key, pts in curves.items():
            label = f"{key} ({MODELS[key]}, lr {found['best_lr'][key]:g})"
            for col, x in ((0, 1), (1, 2)):
                xs = [p[x] for p in pts]
                axes[0, col].errorbar(xs, [p[3] for p in pts], [p[4] for p in pts], fmt="o-", capsize=3, label=label)
                axes[1, col].errorbar(xs, [100 * p[5] for p in pts], [100 * p[6] for p in pts], fmt="o-", capsize=3)
        axes[1, 0].set_xlabel("training TFLOP (counted)")
        axes[1, 1].set_xlabel("training process CPU time (s)")
        axes[0, 0].set_ylabel("FD, n 1000 (lower is better)")
        axes[1, 0].set_ylabel("class accuracy (%)")
        for ax in axes.flat:
            ax.grid(alpha=0.3)
        axes[0, 0].legend()
        fig.suptitle("LEGO vs DiT-T/2 at matched training FLOPs per image (mean and half-range over seeds)")
        fig.tight_layout()
        fig.savefig(out / "quality_vs_compute.png", dpi=90)
        files.append("quality_vs_compute.png")
    if found["skips"]:
        fig, ax = plt.subplots(figsize=(10.5, 5))
        colors = dict(zip(MODELS, ("k", "tab:blue", "tab:orange")))
        for run in sorted({r["run"] for r in found["skips"]}):
            rows = [r for r in found["skips"] if r["run"] == run]
            full = [{"sampler": "heun", "t_break": 0.0, "sample_steps": SAMPLE_STEPS, **e} for e in found["evals"]
                    if e["run"] == run and e["step"] == rows[0]["step"]]  # fmt: skip
            look = {"color": colors[full[0]["key"]], "alpha": 1 if full[0]["seed"] == 0 else 0.5}
            heun = [r for r in full + rows if r["sampler"] == "heun"]
            for style, same in (("o-", "sample_steps"), ("s--", "t_break")):  # t_break varies; steps vary
                line = sorted((r for r in heun if r[same] == full[0][same]), key=lambda r: r["flops_per_sample"])
                if len(line) > 1:
                    xs, ys = [r["flops_per_sample"] / 1e9 for r in line], [r["fd"] for r in line]
                    ax.plot(
                        xs, ys, style, **look, label=f"{run}, {'t_break' if same == 'sample_steps' else 'fewer steps'}"
                    )
            for r in (r for r in rows if r["sampler"] != "heun"):
                marker, label = ("v", f", t_break {r['t_break']:g}") if r["t_break"] else ("^", "")
                x = r["flops_per_sample"] / 1e9
                ax.plot(x, r["fd"], marker, **look, markersize=9, label=f"{run}, {r['sampler']}{label}")
        ax.set_xlabel(
            f"sampling GFLOP per image (t_break: 10 Heun steps; fewer steps: 10, 7, 5; {SOLVER[0]}: {SOLVER[1]})"
        )
        ax.set_yscale("log")
        ax.set_ylabel("FD")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(out / "cheaper_sampling.png", dpi=90)
        files.append("cheaper_sampling.png")
    if patch := patch_runs(found):
        fig, ax = plt.subplots(figsize=(6, 4))
        for frac, rows in sorted(patch.items(), reverse=True):
            ax.plot(
                [e["train_flops"] / 1e12 for e in rows], [e["fd"] for e in rows], "o-", label=f"patch fraction {frac:g}"
            )
        ax.set_xlabel("training TFLOP (counted)")
        ax.set_ylabel("FD, n 1000")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "patch_fraction.png", dpi=90)
        files.append("patch_fraction.png")
    canvases = [(c["run"], work / c["run"] / f"canvas-{c['step']}-{c['canvas']}.npy") for c in found["canvas"]]
    canvases = [(run, f) for run, f in canvases if f.is_file()]
    if canvases:
        import numpy as np

        fig, axes = plt.subplots(len(canvases), 1, figsize=(10, 1.3 * len(canvases)), squeeze=False)
        for ax, (run, f) in zip(axes[:, 0], canvases):
            row = np.concatenate([np.pad(c, ((0, 0), (0, 2)), constant_values=96) for c in np.load(f)], axis=1)
            ax.imshow(row[:, :-2], cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{run}: classes 0 to 9", fontsize=9)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / "canvas_32.png", dpi=90)
        files.append("canvas_32.png")
    plt.close("all")
    return files


def write_report(work: Path, out: Path, command: str) -> None:
    found = collect(work)
    out.mkdir(parents=True, exist_ok=True)
    found["best_lr"] = best_lrs(found["evals"])
    found["command"] = command
    found["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    found["machine"] = f"{os.cpu_count()} CPU cores, torch {torch.__version__}"
    _write(out / "results.json", found)
    lines = ["# LEGO vs DiT at matched training compute (MNIST 16 x 16, CPU)", "", f"Command: `{command}`", "",
             f"Machine: {found['machine']}; date {found['date']}. Every number below comes from the study's runs in "
             f"{work} (their raw log: log.txt); a phase not yet finished has no rows.", ""]  # fmt: skip
    m = found["match"]
    if m:
        lines += ["## Matched compute", "", "| run | model | depths | GFLOP per training image |", "|---|---|---|---|"]
        for key, spec in m.items():
            lines.append(f"| {key} | {spec['model']} | {spec['depths'] or 'registry'} | "
                         f"{spec['flops_per_image'] / 1e9:.3f} |")  # fmt: skip
        lines.append("")
    lines += ["## Learning rate (seed 0, 1,000 steps) and training to 4,000 steps", "",
              "| run | step | train CPU (s) | train TFLOP | FD (n 1000) | class accuracy |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for e in sorted(found["evals"], key=lambda e: (e["run"], e["step"])):
        lines.append(f"| {e['run']} | {e['step']} | {e['train_cpu_s']:.0f} | {e['train_flops'] / 1e12:.2f} | "
                     f"{e['fd']:.1f} | {e['class_accuracy']:.1%} |")  # fmt: skip
    lines += ["", f"Best learning rates (lowest FD at {LR_STEPS} steps, the grid extended past a best end): "
              f"{found['best_lr'] or 'not yet'}", ""]  # fmt: skip
    curves = long_curves(found["evals"], found["best_lr"])
    if curves:
        lines += ["## Each model at its learning rate: mean and half-range over seeds", "",
                  "| model | step | seeds | train TFLOP | train CPU (s) | FD | class accuracy |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for key, pts in curves.items():
            for step, tflop, cpu, fd, dfd, acc, dacc, k in pts:
                lines.append(f"| {key} | {step} | {k} | {tflop:.2f} | {cpu:.0f} | {fd:.1f} ± {dfd:.1f} | "
                             f"{acc:.1%} ± {dacc:.1%} |")  # fmt: skip
        lines.append("")
    if found["resamples"]:
        lines += ["## The evaluation's own noise: the final checkpoints scored on two sets of images", "",
                  f"| run | step | FD, seeds 0..{N - 1} | FD, seeds {N}..{2 * N - 1} | class accuracy, both |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in found["resamples"]:
            first = [e for e in found["evals"] if e["run"] == r["run"] and e["step"] == r["step"]]
            for e in first:
                lines.append(f"| {r['run']} | {r['step']} | {e['fd']:.1f} | {r['fd']:.1f} | "
                             f"{e['class_accuracy']:.1%}, {r['class_accuracy']:.1%} |")  # fmt: skip
        lines.append("")
    if patch := patch_runs(found):
        lines += ["## Patch fraction (LEGO-PG, seed 0): equal training FLOPs", "",
                  "| patch fraction | step | train TFLOP | train CPU (s) | FD (n 1000) | class accuracy |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for frac, rows in sorted(patch.items(), reverse=True):
            for e in rows:
                lines.append(f"| {frac:g} | {e['step']} | {e['train_flops'] / 1e12:.2f} | {e['train_cpu_s']:.0f} | "
                             f"{e['fd']:.1f} | {e['class_accuracy']:.1%} |")  # fmt: skip
        lines.append("")
    if found["skips"]:
        lines += ["## Cheaper sampling: brick skipping (t_break), fewer steps, another solver", "",
                  "| run | step | sampler, steps | t_break | network evaluations | GFLOP / sample | saved by skipping "
                  "| FD (n 1000) | class accuracy |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for s in sorted(found["skips"], key=lambda s: (s["run"], -s["flops_per_sample"])):
            lines.append(f"| {s['run']} | {s['step']} | {s['sampler']}, {s['sample_steps']} | {s['t_break']:g} | "
                         f"{s['nfe_per_sample']:g} | {s['flops_per_sample'] / 1e9:.2f} | "
                         f"{s['flops_saved_by_skipping']:.0%} | {s['fd']:.1f} | "
                         f"{s['class_accuracy']:.1%} |")  # fmt: skip
        lines.append("")
    if found["canvas"]:
        lines += ["## A 32 x 32 canvas from 16 x 16 training (one class per canvas)", "",
                  "| run | canvases | quarters: FD / class accuracy | 16 x 16 samples, as many | whole canvas "
                  "shrunk to 16 x 16: FD / class accuracy | 16 x 16 samples, as many |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for c in found["canvas"]:
            if "refused" in c:
                lines.append(f"| {c['run']} | refused: {c['refused']} | | | | |")
            else:
                lines.append(f"| {c['run']} | {c['n']} | {c['fd_quarters']:.1f} / {c['class_accuracy_quarters']:.1%} "
                             f"| {c['fd_16']:.1f} / {c['class_accuracy_16']:.1%} | {c['fd_whole']:.1f} / "
                             f"{c['class_accuracy_whole']:.1%} | {c['fd_16_first_n']:.1f} / "
                             f"{c['class_accuracy_16_first_n']:.1%} |")  # fmt: skip
        lines.append("")
    demo = sorted((e for e in found["evals"] if e["key"] in DEMO_KEYS), key=lambda e: e["run"])
    if demo:
        lines += [f"## The demo's budget: the training FLOPs of {DEMO_STEPS} steps of the registry's LEGO-T-PR-16", "",
                  "| depths | lr | steps | train TFLOP | train CPU (s) | FD (n 1000) | class accuracy |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for e in demo:
            lines.append(f"| {e['depths'] or 'registry (2, 2, 2)'} | {e['lr']:g} | {e['step']} | "
                         f"{e['train_flops'] / 1e12:.2f} | {e['train_cpu_s']:.0f} | {e['fd']:.1f} | "
                         f"{e['class_accuracy']:.1%} |")  # fmt: skip
        lines.append("")
    files = plot(found, work, out)
    if files:
        lines += ["Plots: " + ", ".join(f"[{f}]({f})" for f in files), ""]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"study: wrote {out / 'results.md'}", flush=True)


# ---------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/matched", help="the runs' folders (checkpoints, records)")
    p.add_argument("--out", default="studies/results/matched_compute", help="results.json, results.md")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (default 2)")
    p.add_argument("--phases", default="match,lr,long,patch,skip,canvas,demo", help="which phases to run (comma list)")
    p.add_argument("--report-only", action="store_true", help="write the results of what is on disk, train nothing")
    args = p.parse_args(argv)
    work, phases = Path(args.work), set(args.phases.split(","))
    command = " ".join(["python studies/matched_compute.py", *(sys.argv[1:] if argv is None else argv)])
    if args.report_only:
        write_report(work, Path(args.out), command)
        return 0
    torch.set_num_threads(1)
    matched = demo_specs(match(work))
    from lego.metrics.features import MnistFeatures
    from lego.metrics.frechet import reference_stats

    reference_stats("default", 16, MnistFeatures(), "ccexam-mnist")  # once, before the workers need it
    with ProcessPoolExecutor(args.jobs) as pool:
        if "lr" in phases:
            runs = [Run(key, lr) for key in MODELS for lr in LRS]
            while runs:
                for f in [pool.submit(train_run, r, [EVAL_AT[0], LR_STEPS], str(work), matched) for r in runs]:
                    f.result()
                evals = collect(work)["evals"]
                runs = [Run(key, lr) for key in MODELS if (lr := _next_lr(lr_results(evals, key)))]
        best = best_lrs(collect(work)["evals"])
        if "long" in phases and len(best) == len(MODELS):
            runs = [Run(key, best[key], seed) for seed in SEEDS for key in MODELS]
            for f in [pool.submit(train_run, r, list(EVAL_AT), str(work), matched) for r in runs]:
                f.result()
        final = EVAL_AT[-1]
        later = []
        if "patch" in phases and "pg" in best:
            full = matched["pg"]["flops_per_image"] * final
            for frac in FRACTIONS:
                steps = round(full / train_flops(matched["pg"]["model"], matched["pg"]["depths"], frac))
                stops = sorted({round(steps * s / final) for s in EVAL_AT})
                later.append(pool.submit(train_run, Run("pg", best["pg"], 0, frac), stops, str(work), matched))
        trained = [r for seed in SEEDS for key, lr in best.items()
                   if (work / (r := Run(key, lr, seed)).name / f"eval-{final}.json").is_file()]  # fmt: skip
        if "skip" in phases:
            later += [pool.submit(skip_run, run, final, str(work)) for run in trained]
        if "canvas" in phases:
            later += [pool.submit(canvas_run, run, final, str(work)) for run in trained]
        if "demo" in phases:
            for key, lr in itertools.product(DEMO_KEYS, DEMO_LRS):
                steps = round(matched["pr-registry"]["flops_per_image"] * DEMO_STEPS / matched[key]["flops_per_image"])
                later.append(pool.submit(train_run, Run(key, lr), [steps], str(work), matched))
        for f in later:
            f.result()
    write_report(work, Path(args.out), command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
