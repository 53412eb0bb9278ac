"""A small CPU study on MNIST: fewer network calls per image (fast solvers, a guidance interval, guidance from the
model's own sub-stack or from a guide model), scored by lego.eval.

Usage: python studies/fewer_calls.py [--out studies/results/fewer_calls] [--work runs/fewer_calls] [--n 1000]
         [--jobs 2]

The model is tests/fixtures/tiny_mnist.safetensors (LEGO-T-PR-16 at width 64: bricks 0 (the image brick), 1 and 2
(patch bricks); 1600 steps of 64 on the embedded digits). The guide model for autoguidance (``--guide-ckpt``) is a
smaller, less-trained version of it, as Karras et al. (2024) pair them: the same recipe at width 32 for 400 steps,
trained here by tests/fixtures/make_tiny_mnist.py into --work when it is not there yet.

Parts (every point: lego.eval's FD on MNIST-classifier features and class accuracy over --n samples, its network
evaluations per image and FLOPs per image as counted by lego.eval, and its process CPU time):
1. solvers: heun against dpmpp-2m at 3 to 35 network evaluations (Heun's N steps cost 2N - 1), unguided and with
   classifier-free guidance 3 (which doubles every evaluation);
2. guidance at equal FLOPs: dpmpp-2m at 4, 6, 8 and 12 steps with classifier-free guidance, the same only for
   sigma in [0.28, 5.42] (a guidance interval, Kynkäänniemi et al., 2024), sub-stack guidance (the top 1 or 2 bricks
   skipped: --guide-skip) and the guide model (--guide-ckpt), each at w in 1.5, 2 and 3;
3. seeds: the headline points (part 1 at about 10 and 20 evaluations, part 2 at 8 steps) again with seeds 1 and 2.
Each point is one single-threaded process, --jobs at a time; finished points are appended to --work/points.jsonl and
not run again, so an interrupted study continues where it stopped. Writes results.json, results.md and two PNG plots
to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "tiny_mnist.safetensors"
GUIDE = {"hidden": 32, "steps": 400}
INTERVAL = "0.28,5.42"
SOLVER_STEPS = {"heun": (2, 3, 4, 5, 7, 10, 18), "dpmpp-2m": (3, 4, 6, 8, 10, 14, 20, 35)}
SOLVER_SCALES = (1.0, 3.0)
GUIDED_STEPS = (4, 6, 8, 12)
SCALES = (1.5, 2.0, 3.0)
METHODS = {  # name -> lego.eval options
    "classifier-free": {},
    "classifier-free, interval": {"guidance_interval": INTERVAL},
    "sub-stack (top 1 skipped)": {"guide_skip": 1},
    "sub-stack (top 2 skipped)": {"guide_skip": 2},
    "guide model": {"guide_ckpt": "GUIDE"},
}
HEADLINE = {"solvers": {("heun", 5), ("heun", 10), ("dpmpp-2m", 10), ("dpmpp-2m", 20)}, "guidance_steps": 8}
SEEDS = (1, 2)


def points() -> list[dict]:
    """Every point of the study, seed 0 first, then the headline points' other seeds."""
    base = []
    for sampler, steps_list in SOLVER_STEPS.items():
        for steps in steps_list:
            for w in SOLVER_SCALES:
                base.append({"part": "solvers", "method": "unguided" if w == 1 else "classifier-free",
                             "sampler": sampler, "steps": steps, "cfg_scale": w, "options": {}})  # fmt: skip
    for method, options in METHODS.items():
        for steps in GUIDED_STEPS:
            for w in SCALES:
                base.append({"part": "guidance", "method": method, "sampler": "dpmpp-2m", "steps": steps,
                             "cfg_scale": w, "options": options})  # fmt: skip
    headline = [p for p in base if _headline(p)]
    return [{**p, "seed": 0} for p in base] + [{**p, "seed": s} for p in headline for s in SEEDS]


def _headline(p: dict) -> bool:
    if p["part"] == "solvers":
        return (p["sampler"], p["steps"]) in HEADLINE["solvers"]
    return p["steps"] == HEADLINE["guidance_steps"]


def key(p: dict) -> str:
    return json.dumps({k: p[k] for k in ("part", "method", "sampler", "steps", "cfg_scale", "seed")}, sort_keys=True)


def run_point(p: dict, n: int, guide: str) -> dict:
    """One lego.eval run, single-threaded."""
    import torch

    torch.set_num_threads(1)
    from lego.metrics.evaluate import evaluate

    options = {k: (guide if v == "GUIDE" else v) for k, v in p["options"].items()}
    r = evaluate(str(MODEL), n=n, sampler=p["sampler"], steps=p["steps"], cfg_scale=p["cfg_scale"], seed=p["seed"],
                 batch=250, device="cpu", progress=False, **options)  # fmt: skip
    keep = ("fd", "class_accuracy", "nfe_per_sample", "flops_per_sample", "cpu_s", "wall_s")
    return {**p, **{k: r[k] for k in keep}, "n": n}


def train_guide(work: Path) -> Path:
    path = work / "guide.safetensors"
    if not path.exists():
        script = ROOT / "tests" / "fixtures" / "make_tiny_mnist.py"
        cmd = [sys.executable, str(script), "--out", str(path), "--hidden", str(GUIDE["hidden"]),
               "--steps", str(GUIDE["steps"]), "--run", str(work / "guide-run")]  # fmt: skip
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return path


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def summarize(done: list[dict]) -> dict:
    """Points grouped over seeds: mean and standard deviation of FD and class accuracy."""
    groups: dict[str, list[dict]] = {}
    for p in done:
        groups.setdefault(key({**p, "seed": 0}), []).append(p)
    rows = []
    for ps in groups.values():
        first = ps[0]
        rows.append({
            **{k: first[k] for k in ("part", "method", "sampler", "steps", "cfg_scale", "nfe_per_sample",
                                     "flops_per_sample")},
            "seeds": len(ps), "fd": [p["fd"] for p in ps], "class_accuracy": [p["class_accuracy"] for p in ps],
            "cpu_s": statistics.mean(p["cpu_s"] for p in ps),
        })  # fmt: skip
    return {"rows": rows}


def _row(cells: list, r: dict) -> str:
    """A table row: the point's own cells, then NFE, GFLOP per image, FD and class accuracy (spread over seeds)."""
    cells = [*cells, f"{r['nfe_per_sample']:g}", f"{r['flops_per_sample'] / 1e9:.2f}", _spread(r["fd"]),
             _spread([100 * a for a in r["class_accuracy"]]) + "%"]  # fmt: skip
    return "| " + " | ".join(map(str, cells)) + " |"


def write_markdown(res: dict, path: Path, n: int) -> None:
    rows = res["rows"]
    lines = [
        "# Fewer network calls per image: MNIST study",
        "",
        f"Made by `python studies/fewer_calls.py` (n = {n} samples per point; FD on MNIST-classifier features, lower "
        "is better; class accuracy: the share of samples the classifier assigns to the class asked for). Points "
        "with several seeds show mean ± standard deviation. NFE: network evaluations per image (a guided step's two "
        "passes count twice, whatever bricks they run); GFLOP: per image, as counted by lego.eval.",
        "",
        "## Solvers: Heun against DPM-Solver++(2M)",
        "",
        "| sampler | steps | guidance | NFE | GFLOP | FD | class accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    solvers = sorted((r for r in rows if r["part"] == "solvers"),
                     key=lambda r: (r["cfg_scale"], r["sampler"], r["nfe_per_sample"]))  # fmt: skip
    lines += [_row([r["sampler"], r["steps"], f"{r['cfg_scale']:g}"], r) for r in solvers]
    lines += [
        "",
        "## Guidance at equal FLOPs (dpmpp-2m)",
        "",
        "| method | w | steps | NFE | GFLOP | FD | class accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    guided = sorted((r for r in rows if r["part"] == "guidance"),
                    key=lambda r: (r["method"], r["cfg_scale"], r["steps"]))  # fmt: skip
    lines += [_row([r["method"], f"{r['cfg_scale']:g}", r["steps"]], r) for r in guided]
    path.write_text("\n".join(lines) + "\n")


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex="col")
    for col, w in enumerate(SOLVER_SCALES):
        for sampler in SOLVER_STEPS:
            rs = sorted((r for r in rows if r["part"] == "solvers" and r["sampler"] == sampler
                         and r["cfg_scale"] == w), key=lambda r: r["nfe_per_sample"])  # fmt: skip
            x = [r["nfe_per_sample"] for r in rs]
            for row, metric in enumerate(("fd", "class_accuracy")):
                y = [statistics.mean(r[metric]) for r in rs]
                err = [statistics.stdev(r[metric]) if len(r[metric]) > 1 else 0 for r in rs]
                axes[row][col].errorbar(x, y, yerr=err, marker="o", capsize=3, label=sampler)
        axes[0][col].set_title("unguided" if w == 1 else f"classifier-free guidance {w:g}")
        axes[1][col].set_xlabel("network evaluations per image")
        axes[0][col].set_yscale("log")
    axes[0][0].set_ylabel("FD (MNIST features)")
    axes[1][0].set_ylabel("class accuracy")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out / "solvers.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, len(SCALES), figsize=(5 * len(SCALES), 7), sharex=True, sharey="row")
    for col, w in enumerate(SCALES):
        for method in METHODS:
            rs = sorted((r for r in rows if r["part"] == "guidance" and r["method"] == method and r["cfg_scale"] == w),
                        key=lambda r: r["flops_per_sample"])  # fmt: skip
            x = [r["flops_per_sample"] / 1e9 for r in rs]
            for row, metric in enumerate(("fd", "class_accuracy")):
                y = [statistics.mean(r[metric]) for r in rs]
                err = [statistics.stdev(r[metric]) if len(r[metric]) > 1 else 0 for r in rs]
                axes[row][col].errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
        axes[0][col].set_title(f"guidance w = {w:g} (dpmpp-2m, 4-12 steps)")
        axes[1][col].set_xlabel("GFLOP per image")
    axes[0][0].set_ylabel("FD (MNIST features)")
    axes[1][0].set_ylabel("class accuracy")
    axes[0][0].set_yscale("log")
    axes[1][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "guidance.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "studies" / "results" / "fewer_calls"), help="results folder")
    p.add_argument("--work", default="runs/fewer_calls", help="the guide model and the points log")
    p.add_argument("--n", type=int, default=1000, help="samples per point (default 1000)")
    p.add_argument("--jobs", type=int, default=2, help="points evaluated at once (default 2)")
    args = p.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    guide = str(train_guide(work))
    log = work / "points.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = [d for d in done if d["n"] == args.n]
    finished = {key(d) for d in done}
    todo = [q for q in points() if key(q) not in finished]
    print(f"fewer_calls: {len(done)} points done, {len(todo)} to go", flush=True)
    with ProcessPoolExecutor(args.jobs) as pool, log.open("a") as f:
        for future in as_completed([pool.submit(run_point, q, args.n, guide) for q in todo]):
            result = future.result()
            f.write(json.dumps(result) + "\n")
            f.flush()
            done.append(result)
            print(f"fewer_calls: {key(result)} FD {result['fd']:.2f} acc {result['class_accuracy']:.3f} "
                  f"NFE {result['nfe_per_sample']:g} ({result['cpu_s']:.0f} s CPU)", flush=True)  # fmt: skip
    res = summarize(done)
    res["setup"] = {"model": str(MODEL.relative_to(ROOT)), "guide": GUIDE, "interval": INTERVAL, "n": args.n}
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(res, out / "results.md", args.n)
    plot(res, out)
    print(f"fewer_calls: wrote {out}/results.md, results.json, solvers.png, guidance.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
