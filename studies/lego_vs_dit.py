"""A small CPU study on MNIST: LEGO against DiT at equal training compute, brick skipping, and patch fraction.

Usage: python studies/lego_vs_dit.py [--out studies/results] [--steps 300] [--eval-at 75,150,300] [--n 200]

Runs (same data, batch, optimizer, learning-rate schedule, EMA, seed and sampler; only the backbone differs):
- ``pg``, ``pr``: LEGO-T-PG-16 and LEGO-T-PR-16 (1.95M parameters); ``dit``: DiT-T/2 at 16 x 16 (2.12M), through
  ``lego.train`` (AdamW lr 1e-3, 100 warm-up steps, EMA 0.995: fixed here, not lego.train's defaults), evaluated by
  ``lego.eval`` at each ``--eval-at`` step: FD on MNIST-classifier features and class accuracy, against training
  wall-clock, process CPU time and FLOPs (forward + backward of one training step counted by
  torch.utils.flop_counter, times the steps).
- brick skipping: the final ``pg`` and ``pr`` models sampled with t_break in {0, 0.25, 0.5, 0.75}.
- patch fraction: LEGO-T-PG-16 trained with 1.0, 0.75 and 0.5 of its patch-bricks' patches, each for the same
  training CPU time (--patch-budget; CPU time rather than wall time because the machine is shared).
Each run is one single-threaded process (a shared 2-core machine wastes most of a 2-thread process's CPU time in
OpenMP waits), up to --jobs at a time. Writes results.json, results.md and PNG plots to --out; checkpoints go to
--work.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

MAIN_RUNS = {  # name -> (model, patch fraction)
    "pg": ("LEGO-T-PG-16", 1.0),
    "pr": ("LEGO-T-PR-16", 1.0),
    "dit": ("DiT-T/2", 1.0),
}
# Patch fraction at an equal training CPU budget (--patch-budget), all three fractions trained for it.
PATCH_RUNS = {"pg-b100": ("LEGO-T-PG-16", 1.0), "pg-b75": ("LEGO-T-PG-16", 0.75), "pg-b50": ("LEGO-T-PG-16", 0.5)}
T_BREAKS = (0.25, 0.5, 0.75)  # 0 is the run's last evaluation


def _train_flops_per_step(cfg) -> int:
    """Forward + backward FLOPs of one training step at cfg.batch (counted on 4 images; linear in the batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lego import LegoLoss, build_model
    from lego.data.datasets import open_dataset
    from lego.data.loader import prepare
    from lego.networks.registry import model_config

    data = open_dataset(cfg.data, 16)
    images, labels = data[torch.arange(4)]
    net = build_model(model_config(cfg.model, in_channels=1, num_classes=10, resolution=16))
    with FlopCounterMode(display=False) as counter:
        loss, _ = LegoLoss(cfg.patch_fraction)(net, prepare(images, 16, None), labels, torch.Generator().manual_seed(0))
        loss.backward()
    return counter.get_total_flops() * cfg.batch // 4


def _evaluate(ckpt: Path, args: dict, t_break: float = 0.0) -> dict:
    from lego.metrics.evaluate import evaluate

    return evaluate(ckpt, n=args["n"], steps=args["sample_steps"], t_break=t_break, progress=False)


def run_job(name: str, model: str, patch_fraction: float, args: dict, cpu_budget: float | None = None) -> dict:
    """Train one run to each evaluation point (lego.train with --resume), evaluate there; returns its records."""
    torch.set_num_threads(1)
    from lego.training.config import TrainConfig
    from lego.training.loop import train

    out = Path(args["work"]) / name
    cfg = TrainConfig(model=model, resolution=16, patch_fraction=patch_fraction, steps=0, out=str(out), sample_n=0,
                      ckpt_every=10**9, log_every=10**9, **args["train"])  # fmt: skip
    flops_step = _train_flops_per_step(cfg)
    points, wall, cpu, step = [], 0.0, 0.0, 0
    # Every run trains in the same chunks (lego.train --resume), so each pays the same restart overhead.
    if cpu_budget is None:
        stops = sorted(set(range(args["chunk"], max(args["eval_at"]) + 1, args["chunk"])) | set(args["eval_at"]))
    else:
        stops = itertools.count(args["chunk"], args["chunk"])
    for stop in stops:
        w0, c0 = time.perf_counter(), time.process_time()
        train(dataclasses.replace(cfg, steps=stop), resume=step > 0, progress=False)
        wall, cpu, step = wall + time.perf_counter() - w0, cpu + time.process_time() - c0, stop
        if (cpu < cpu_budget) if cpu_budget is not None else (stop not in args["eval_at"]):
            continue
        report = _evaluate(out / "checkpoint.safetensors", args)
        points.append({"run": name, "model": model, "patch_fraction": patch_fraction, "step": step,
                       "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1),
                       "train_flops": flops_step * step, **_pick(report)})  # fmt: skip
        print(f"study: {name} step {step}: {json.dumps(points[-1])}", flush=True)
        if cpu_budget is not None:
            break
    skips = skip_job(name, model, args) if name in ("pg", "pr") else []
    return {"name": name, "points": points, "skips": skips, "train_flops_per_step": flops_step}


def _pick(report: dict) -> dict:
    keys = ("t_break", "fd", "class_accuracy", "nfe_per_sample", "flops_per_sample", "flops_saved_by_skipping",
            "wall_s", "cpu_s", "n", "steps")  # fmt: skip
    return {k: report[k] for k in keys if k in report}


# ---------------------------------------------------------------------------------------------------------------------
# Write-up


def write_markdown(res: dict, path: Path) -> None:
    setup = (
        f"Machine: {res['machine']}. Date: {res['date']}. Every run is one single-threaded process; up to "
        f"{res['jobs']} ran at once on a 2-core machine shared with other jobs, so wall-clock is contended and noisy: "
        "process CPU time is the fairer compute axis."
    )
    evaluation = (
        f"Training: {res['settings']}. Evaluation: `lego.eval`, {res['n']} EMA samples, Heun {res['sample_steps']} "
        f"steps ({2 * res['sample_steps'] - 1} network evaluations), FD on the ccexam MNIST CNN's 128-d features "
        f"against the training set at 16 x 16 (FD at n = {res['n']} is biased upwards; compare runs at the same n "
        "only). Class accuracy: share of samples the CNN assigns to the class asked for (chance: 10%)."
    )
    lines = ["# LEGO vs DiT on MNIST (CPU study)", "", f"Command: `{res['command']}`", "", setup, "", evaluation, ""]
    if res.get("note"):
        lines += [res["note"], ""]
    lines += [
        "## Training: quality against compute", "",
        "| run | model | params (M) | step | train wall (s) | train CPU (s) | train TFLOP | FD | class acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for job in res["jobs_results"]:
        for p in job["points"]:
            lines.append(
                f"| {p['run']} | {p['model']} | {res['params'][p['model']]:.2f} | {p['step']} "
                f"| {p['train_wall_s']:.0f} | "
                f"{p['train_cpu_s']:.0f} | {p['train_flops'] / 1e12:.1f} | {p['fd']:.1f} | {p['class_accuracy']:.1%} |"
            )
    lines += ["", "## Brick skipping (final models)", "",
              "| run | model | t_break | FD | class acc | GFLOP / sample | saved | sampling CPU (s) |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in res["skip_rows"]:
        lines.append(
            f"| {row['run']} | {row['model']} | {row['t_break']} | {row['fd']:.1f} | {row['class_accuracy']:.1%} | "
            f"{row['flops_per_sample'] / 1e9:.2f} | {row['flops_saved_by_skipping']:.0%} | {row['cpu_s']:.0f} |"
        )
    lines += [
        "",
        "## Patch fraction at an equal training CPU budget (LEGO-T-PG-16)",
        "",
        "| run | patch fraction | steps | train CPU (s) | train TFLOP | FD | class acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in res["patch_rows"]:
        lines.append(
            f"| {p['run']} | {p['patch_fraction']} | {p['step']} | {p['train_cpu_s']:.0f} "
            f"| {p['train_flops'] / 1e12:.1f} "
            f"| {p['fd']:.1f} | {p['class_accuracy']:.1%} |"
        )
    lines += ["", "Plots: " + ", ".join(f"[{f}]({f})" for f in res.get("files", [])), ""]
    path.write_text("\n".join(lines))


def plot(res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for job in res["jobs_results"]:
        pts = job["points"]
        if not pts or job["name"] not in MAIN_RUNS:
            continue
        label = f"{job['name']} ({pts[0]['model']})"
        for col, (key, xlabel, scale) in enumerate([("train_wall_s", "training wall-clock (s)", 1),
                                                    ("train_cpu_s", "training process CPU time (s)", 1),
                                                    ("train_flops", "training TFLOP", 1e12)]):  # fmt: skip
            xs = [p[key] / scale for p in pts]
            axes[0, col].plot(xs, [p["fd"] for p in pts], "o-", label=label)
            axes[1, col].plot(xs, [100 * p["class_accuracy"] for p in pts], "o-", label=label)
            axes[1, col].set_xlabel(xlabel)
    axes[0, 0].set_ylabel("FD (MNIST CNN features, lower is better)")
    axes[1, 0].set_ylabel("class accuracy (%)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend()
    fig.suptitle("LEGO vs DiT on MNIST 16x16: quality against training compute")
    fig.tight_layout()
    fig.savefig(out / "lego_vs_dit.png", dpi=90)
    files.append("lego_vs_dit.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in ("pg", "pr"):
        rows = sorted((r for r in res["skip_rows"] if r["run"] == run), key=lambda r: r["t_break"])
        if not rows:
            continue
        axes[0].plot([r["t_break"] for r in rows], [r["fd"] for r in rows], "o-", label=f"{run} ({rows[0]['model']})")
        axes[1].plot([r["t_break"] for r in rows], [r["flops_per_sample"] / 1e9 for r in rows], "o-", label=run)
    axes[0].set_ylabel("FD")
    axes[1].set_ylabel(f"GFLOP per sample (Heun, {2 * res['sample_steps'] - 1} evaluations)")
    for ax in axes:
        ax.set_xlabel("t_break")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Skipping the top brick at sampling time")
    fig.tight_layout()
    fig.savefig(out / "brick_skipping.png", dpi=90)
    files.append("brick_skipping.png")

    rows = res["patch_rows"]
    if rows:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        rows = sorted(rows, key=lambda r: r["patch_fraction"])
        fr = [r["patch_fraction"] for r in rows]
        axes[0].plot(fr, [r["fd"] for r in rows], "o-")
        axes[0].set_ylabel("FD")
        axes[1].plot(fr, [r["step"] for r in rows], "o-")
        axes[1].set_ylabel("training steps in the budget")
        for ax in axes:
            ax.set_xlabel("patch fraction (LEGO-T-PG-16)")
            ax.grid(alpha=0.3)
        fig.suptitle(f"Patch fraction at an equal training CPU budget ({rows[-1]['train_cpu_s']:.0f} s)")
        fig.tight_layout()
        fig.savefig(out / "patch_fraction.png", dpi=90)
        files.append("patch_fraction.png")
    plt.close("all")
    return files


def skip_job(name: str, model: str, args: dict) -> list[dict]:
    """Sample run ``name``'s checkpoint with the top brick skipped for each t_break in T_BREAKS."""
    torch.set_num_threads(1)
    ckpt = Path(args["work"]) / name / "checkpoint.safetensors"
    skips = []
    for t in T_BREAKS:
        skips.append({"run": name, "model": model, **_pick(_evaluate(ckpt, args, t))})
        print(f"study: {name} t_break {t}: {json.dumps(skips[-1])}", flush=True)
    return skips


def jobs_from_log(path: Path) -> list[dict]:
    """The records a run printed ("study: <run> step <n>: {...}" and "study: <run> t_break <t>: {...}")."""
    jobs = {name: {"name": name, "points": [], "skips": []} for name in (*MAIN_RUNS, *PATCH_RUNS)}
    for line in path.read_text().splitlines():
        if line.startswith("study: ") and ": {" in line:
            head, _, body = line.partition(": {")
            name, kind = head.split()[1:3]
            jobs[name]["points" if kind == "step" else "skips"].append(json.loads("{" + body))
    return list(jobs.values())


def _without_note(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if not skip and a != "--note" and not a.startswith("--note="):
            out.append(a)
        skip = a == "--note"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="studies/results", help="where results.json, results.md and the plots go")
    p.add_argument("--work", default="runs/study", help="checkpoints of the runs")
    p.add_argument("--steps", type=int, default=300, help="training steps of the main runs (default 300)")
    p.add_argument("--eval-at", default="75,150,300", help="steps at which the main runs are evaluated")
    p.add_argument("--patch-budget", type=float, default=60.0, help="training CPU seconds of the patch runs")
    p.add_argument("--n", type=int, default=200, help="samples per evaluation (default 200)")
    p.add_argument("--sample-steps", type=int, default=10, help="Heun steps per sample (default 10)")
    p.add_argument("--batch", type=int, default=64, help="images per training step (default 64)")
    p.add_argument("--chunk", type=int, default=15, help="steps between CPU-budget checks of the patch runs")
    p.add_argument("--jobs", type=int, default=6, help="runs at a time, one thread each (default 6)")
    p.add_argument("--skip-only", action="store_true", help="only the brick-skipping evaluations of --work's pg, pr")
    p.add_argument("--note", help="a paragraph for results.md (how the run went)")
    p.add_argument("--from-log", help="write the results from the 'study:' lines of earlier runs' logs (comma list)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    eval_at = sorted({int(s) for s in args.eval_at.split(",")} | {args.steps})
    base = argparse.Namespace(lr=1e-3, warmup=100, ema=0.995)  # the optimizer settings the results were made with
    shared = {
        "work": args.work, "n": args.n, "sample_steps": args.sample_steps, "eval_at": eval_at, "chunk": args.chunk,
        "train": {"batch": args.batch, "lr": base.lr, "warmup": base.warmup, "ema": base.ema, "seed": 0},
    }  # fmt: skip
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.from_log:
        jobs = jobs_from_log(Path(args.from_log.split(",")[0]))
        for extra in args.from_log.split(",")[1:]:
            for job, more in zip(jobs, jobs_from_log(Path(extra))):
                job["points"] += more["points"]
                job["skips"] += more["skips"]
    else:
        from lego.metrics.features import MnistFeatures
        from lego.metrics.frechet import reference_stats

        reference_stats("default", 16, MnistFeatures(), "ccexam-mnist")  # once, before the workers need it
        with ProcessPoolExecutor(args.jobs) as pool:
            if args.skip_only:
                for f in [pool.submit(skip_job, name, MAIN_RUNS[name][0], shared) for name in ("pg", "pr")]:
                    f.result()
                return 0
            futures = [pool.submit(run_job, name, m, f, shared) for name, (m, f) in MAIN_RUNS.items()]
            futures += [
                pool.submit(run_job, name, m, f, shared, args.patch_budget) for name, (m, f) in PATCH_RUNS.items()
            ]
            jobs = [j.result() for j in futures]
    from lego import build_model
    from lego.networks.registry import model_config

    params = {m: sum(q.numel() for q in build_model(model_config(m, in_channels=1, num_classes=10,
                                                                 resolution=16)).parameters()) / 1e6
              for m, _ in MAIN_RUNS.values()}  # fmt: skip
    skip_rows = []
    for job in jobs[:2]:
        last = job["points"][-1]
        skip_rows.append(
            {
                "run": job["name"],
                "model": last["model"],
                **{
                    k: v
                    for k, v in last.items()
                    if k in ("t_break", "fd", "class_accuracy", "flops_per_sample", "flops_saved_by_skipping", "cpu_s")
                },
            }
        )
        skip_rows += job["skips"]
    patch_rows = [j["points"][-1] for j in jobs[3:] if j["points"]]
    res = {
        "command": " ".join(["python studies/lego_vs_dit.py", *_without_note(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, load average at the end "
                   f"{os.getloadavg()[0]:.1f}",
        "jobs": args.jobs, "n": args.n, "sample_steps": args.sample_steps,
        "total_wall_s": round(time.perf_counter() - t0),
        "settings": f"MNIST 10k embedded digits at 16 x 16, batch {args.batch}, AdamW lr {base.lr} (warm-up "
                    f"{base.warmup} steps), EMA {base.ema}, EDM preconditioning and loss, label dropout 0.1, seed 0",
        "note": args.note, "params": params, "jobs_results": jobs, "skip_rows": skip_rows, "patch_rows": patch_rows,
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(res, indent=1))
    res["files"] = plot(res, out)
    write_markdown(res, out / "results.md")
    print(f"study: wrote {out} in {res['total_wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
