"""Run the benchmark suites and write the report.

Usage (a GPU machine, from the repository root):
    python -m benchmarks.report                      # everything; writes benchmarks/results/<device>-<date>.*
    python -m benchmarks.report --quick              # a fresh GPU machine in < 5 minutes (see --quick below)
    python -m benchmarks.report --smoke              # tiny shapes on the CPU, into a temporary folder
    python -m benchmarks.report -k "short_attention or train"   # a subset (pytest -k)
    python -m benchmarks.report --rebuild benchmarks/results/<stem>.pytest-benchmark.json   # report only

Writes <stem>.json (device, driver, versions, shapes, every figure and ratio), <stem>.md (the tables, the ratios and
the targets, each met or missed), <stem>.png (speed-up against batch size; share of the roofline), and keeps the raw
pytest-benchmark JSON and the session facts beside them (<stem>.pytest-benchmark.json, <stem>.session.json).
--quick builds the CUDA extension in place when it is missing (lego_kernels/_C*.so is not in git), runs the GPU tests
(pytest -m cuda) and the static kernel gate under the installed Triton (tests/test_static_profile.py), then only the
rows marked quick: the fused ops and the eager reference at the op shape and at each
brick shape, and LEGO-XL-PG-32 against DiT-XL/2 (training at the group's batch and at 256, Heun sampling at t_break 0
and 0.5), within a 5-minute budget whose real use it prints at the end.
Every ratio is between two measurements of the same run on the same device. A missed target is a finding, not a
failure: the command exits non-zero only when a benchmark itself failed (a crash, not a skip).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import patch_embed_paths

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
RESULTS = BENCH_DIR / "results"
DEFAULT_BUDGET_S = 400  # the suite skips what is left after this; start-up and the report add ~30 s
QUICK_BUDGET_S = 300  # --quick: build + GPU tests + the quick rows + the report

FUSED = ("cuda", "triton")
# Records whose bytes are counted: GB/s and the share of the measured bandwidth (the op rows, the patch_embed backward's
# path rows and the L2 atomic probe, benchmarks/patch_embed_paths.py).
BANDWIDTH_KINDS = ("op", "patch_embed_bwd", "l2_probe")
TARGETS = {
    "hbm_share": 0.80,  # memory-bound fused ops: share of the measured copy bandwidth
    "short_attention_vs_sdpa": 5.0,
    "train_vs_dit": 2.0,  # LEGO-XL-PG-32 against DiT-XL/2, images/s
    "sampling_vs_dit": 3.0,  # LEGO-XL-PG-32 with t_break 0.5 against DiT-XL/2, images/s at equal NFE
}


# ---------------------------------------------------------------------------------------------------------------------
# Running the suite


def run_suite(
    stem_dir: Path, smoke: bool, keyword: str | None, budget_s: float, interpret: bool, quick: bool = False
) -> tuple[Path, Path, int]:
    raw = stem_dir / "pytest-benchmark.json"
    sidecar = stem_dir / "session.json"
    env = dict(os.environ)
    env.update(LEGO_BENCH_SMOKE="1" if smoke else "0", LEGO_BENCH_SIDECAR=str(sidecar), PYTHONUNBUFFERED="1",
               LEGO_BENCH_QUICK="1" if quick else "0")  # fmt: skip
    if budget_s > 0:
        env["LEGO_BENCH_BUDGET_S"] = str(budget_s)
    else:
        env.pop("LEGO_BENCH_BUDGET_S", None)
    if env.pop("LEGO_KERNELS_POISON", None) == "1":
        print("report: LEGO_KERNELS_POISON=1 was set (NaN-filled outputs cost time); unset for the benchmarks")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    elif env.pop("TRITON_INTERPRET", "0") not in ("", "0"):
        print("report: TRITON_INTERPRET was set; unset for the benchmarks (pass --interpret to keep it)")
    cmd = [
        sys.executable, "-m", "pytest", str(BENCH_DIR), "-p", "no:cacheprovider", "-q", "-rfE",
        "-o", "addopts=", f"--benchmark-json={raw}", "--benchmark-sort=fullname",
        "--benchmark-columns=median,iqr,rounds,iterations",
    ]  # fmt: skip
    if keyword:
        cmd += ["-k", keyword]
    print("report: running", " ".join(cmd), flush=True)
    status = subprocess.run(cmd, cwd=REPO, env=env, check=False).returncode
    return raw, sidecar, status


def quick_setup(smoke: bool) -> None:
    """--quick's first steps: the CUDA extension (built in place when missing and nvcc is there), then the GPU tests
    and the static kernel gate under the installed Triton (tests/test_static_profile.py: spills, waves, bytes, load
    round trips of every launch, compiled for sm_90 and sm_80 in bf16 and fp32). None stops the run: what failed is
    printed, and the benchmarks skip what cannot run."""
    built = sorted((REPO / "lego_kernels").glob("_C*.so"))
    if built:
        print(f"report: CUDA extension present ({built[0].name})", flush=True)
    elif smoke:
        print("report: --smoke: the CUDA extension is not built here (no GPU)", flush=True)
    else:
        print("report: building the CUDA extension in place (python setup.py build_ext --inplace)", flush=True)
        done = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=REPO, check=False)
        print(f"report: extension build exit status {done.returncode}", flush=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", str(REPO / "tests")]
    print("report: running", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=REPO, env=env, check=False)
    # exit status 5: nothing selected ran (no GPU: every cuda test skips)
    print(f"report: pytest -m cuda exit status {done.returncode}", flush=True)
    if smoke:
        print(
            "report: --smoke: the static kernel gate (tests/test_static_profile.py) is left to the test suite",
            flush=True,
        )
        return
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(REPO / "tests" / "test_static_profile.py"),
    ]
    print("report: running", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=REPO, env=env, check=False)
    print(f"report: static kernel gate exit status {done.returncode}", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Figures


def _seconds(r: dict) -> float:
    return r["timing"]["median_ms"] * 1e-3


def derive(r: dict, peaks: dict | None) -> dict:
    """Throughput figures of one record, against the run's measured ceilings."""
    t = _seconds(r)
    bw = peaks["hbm_gbps"] if peaks else None
    mm = peaks["bf16_tflops"] if peaks else None
    if r.get("flops"):
        r["tflops"] = r["flops"] / t / 1e12
        if mm and r["kind"] not in BANDWIDTH_KINDS:
            r["mfu"] = r["tflops"] / mm
    if r.get("images"):
        r["images_per_s"] = r["images"] / t
    if r["kind"] in BANDWIDTH_KINDS:
        r["gbps"] = r["bytes"] / t / 1e9
        r["intensity"] = r["flops"] / r["bytes"]  # FLOP per byte
        if bw and mm:
            r["hbm_share"] = r["gbps"] / bw
            floor_s = max(r["bytes"] / (bw * 1e9), r["flops"] / (mm * 1e12))
            r["roofline_us"] = floor_s * 1e6
            r["roofline_share"] = floor_s / t
            r["memory_bound"] = r["intensity"] < mm * 1e12 / (bw * 1e9)
    return r


def _ratio(a: dict | None, b: dict | None) -> float | None:
    """How many times faster a is than b (median times)."""
    if a is None or b is None:
        return None
    return b["timing"]["median_ms"] / a["timing"]["median_ms"]


def _best(rows: list[dict]) -> dict | None:
    return min(rows, key=lambda r: r["timing"]["median_ms"]) if rows else None


def analyze(raw: dict | None, side: dict) -> dict:
    peaks = side.get("peaks")
    records = []
    for b in (raw or {}).get("benchmarks", []):
        r = dict(b["extra_info"])
        if "kind" not in r:
            continue
        r["test"] = b["fullname"]
        s, per_round = b["stats"], r["timing"]["iterations"]  # a pytest-benchmark round makes `iterations` calls
        r["pytest_benchmark_wall_ms"] = {
            "median": s["median"] * 1e3 / per_round, "iqr": s["iqr"] * 1e3 / per_round, "rounds": s["rounds"]
        }  # fmt: skip
        records.append(derive(r, peaks))
    ops = [r for r in records if r["kind"] == "op"]
    main_ops = [r for r in ops if not r["sweep"] and not r.get("brick_shape")]
    bricks = [r for r in records if r["kind"] == "brick"]
    train = [r for r in records if r["kind"] == "train"]
    samples = [r for r in records if r["kind"] == "sample"]
    pairs = side.get("cases", {}).get("pairs", {})

    # --- fused ops against eager, compile (and SDPA)
    op_ratios = []
    for op in dict.fromkeys(r["op"] for r in main_ops):
        for mode in ("fwd", "fwd+bwd"):
            rows = {r["provider"]: r for r in main_ops if r["op"] == op and r["mode"] == mode}
            fused = [rows[p] for p in FUSED if p in rows]
            best = _best(fused)
            for f in fused:
                op_ratios.append({
                    "op": op, "mode": mode, "provider": f["provider"], "best": f is best,
                    "median_us": f["timing"]["median_ms"] * 1e3,
                    "vs_eager": _ratio(f, rows.get("eager")), "vs_compile": _ratio(f, rows.get("compile")),
                    "vs_sdpa": _ratio(f, rows.get("sdpa")), "hbm_share": f.get("hbm_share"),
                    "roofline_share": f.get("roofline_share"), "memory_bound": f.get("memory_bound"),
                })  # fmt: skip

    # --- brick
    brick_ratios = []
    for mode in ("fwd", "fwd+bwd"):
        rows = {r["provider"]: r for r in bricks if r["mode"] == mode}
        for p, r in rows.items():
            if p != "torch":
                brick_ratios.append({"mode": mode, "provider": p, "vs_torch": _ratio(r, rows.get("torch")),
                                     "vs_torch_compile": _ratio(r, rows.get("torch+compile"))})  # fmt: skip

    # --- training: every LEGO row against every DiT row of its group at the same batch
    train_ratios = []
    for r in train:
        if r["model"].startswith("DiT"):
            continue
        for d in train:
            if d["model"].startswith("DiT") and d["group"] == r["group"] and d["batch"] == r["batch"]:
                train_ratios.append({
                    "lego": r["label"], "dit": d["model"], "group": r["group"], "batch": r["batch"],
                    "images_per_s_ratio": _ratio(r, d), "paired": pairs.get(r["model"]) == d["model"],
                })  # fmt: skip

    # --- sampling: LEGO against DiT with the same sampler, NFE, guidance, group and batch
    sample_ratios = []
    for r in samples:
        if r["model"].startswith("DiT"):
            continue
        for d in samples:
            same = all(d[k] == r[k] for k in ("group", "sampler", "nfe", "cfg", "batch"))
            if d["model"].startswith("DiT") and same:
                sample_ratios.append({
                    "lego": r["label"], "dit": d["model"], "group": r["group"], "sampler": r["sampler"],
                    "nfe": r["nfe"], "cfg": r["cfg"], "t_break": r["t_break"], "batch": r["batch"],
                    "images_per_s_ratio": _ratio(r, d), "paired": pairs.get(r["model"]) == d["model"],
                })  # fmt: skip

    sweeps = _sweeps(ops, train)
    outcomes = _outcomes(side)
    # --- the ops at each brick shape: fused ("auto") against eager
    shape_ratios = []
    for r in ops:
        if r.get("brick_shape") and r["provider"] == "auto":
            eager = next((e for e in ops if e.get("brick_shape") == r["brick_shape"] and e["op"] == r["op"]
                          and e["mode"] == r["mode"] and e["provider"] == "eager"), None)  # fmt: skip
            shape_ratios.append({"brick_shape": r["brick_shape"], "op": r["op"], "mode": r["mode"],
                                 "backend": r["backend"], "vs_eager": _ratio(r, eager)})  # fmt: skip

    result = {
        "peaks": peaks,
        "ops": ops, "bricks": bricks, "train": train, "sampling": samples, "brick_shape_ratios": shape_ratios,
        "ratios": {"ops": op_ratios, "brick": brick_ratios, "train": train_ratios, "sampling": sample_ratios},
        "sweeps": sweeps, "outcomes": outcomes,
    }  # fmt: skip
    result["targets"] = _targets(result, side.get("cases", {}))
    measured = side.get("device", {}).get("device_type") == "cuda"
    result["patch_embed_bwd"] = patch_embed_paths.analyze(records, peaks, measured)
    return result


def _sweeps(ops: list[dict], train: list[dict]) -> dict:
    """Speed-ups against batch size: fused ('auto') over eager per op (fwd+bwd); LEGO-XL-PG-32 over DiT-XL/2."""
    op_curves = {}
    swept = [r for r in ops if r["sweep"]]
    for op in dict.fromkeys(r["op"] for r in swept):
        points = []
        for batch in sorted({r["batch"] for r in swept if r["op"] == op}):
            rows = {r["provider"]: r for r in swept if r["op"] == op and r["batch"] == batch}
            point = {"batch": batch, "backend": rows.get("auto", {}).get("backend"),
                     "vs_eager": _ratio(rows.get("auto"), rows.get("eager"))}  # fmt: skip
            if "sdpa" in rows:
                point["vs_sdpa"] = _ratio(rows.get("auto"), rows.get("sdpa"))
            if point["vs_eager"] is not None:
                points.append(point)
        if points:
            op_curves[op] = points
    lego = {r["batch"]: r for r in train if r["label"] == "LEGO-XL-PG-32" and r["group"].startswith("latent")}
    dit = {r["batch"]: r for r in train if r["label"] == "DiT-XL/2" and r["group"].startswith("latent")}
    train_curve = [
        {"batch": b, "lego_images_per_s": lego[b]["images_per_s"], "dit_images_per_s": dit[b]["images_per_s"],
         "ratio": _ratio(lego[b], dit[b])}
        for b in sorted(set(lego) & set(dit))
    ]  # fmt: skip
    return {"ops": op_curves, "train": train_curve}


def _outcomes(side: dict) -> dict:
    entries = side.get("outcomes", [])
    return {
        "skipped": [e for e in entries if e["outcome"] == "skipped"],
        "failed": [e for e in entries if e["outcome"] == "failed"],
        "pytest_exitstatus": side.get("exitstatus"),
        "elapsed_s": side.get("elapsed_s"),
    }


def _status(value: float | None, goal: float) -> str:
    if value is None:
        return "not measured"
    return "met" if value >= goal else "missed"


def _targets(result: dict, cases: dict) -> list[dict]:
    targets = []
    main_ops = [r for r in result["ops"] if not r["sweep"] and not r.get("brick_shape")]
    for mode in ("fwd", "fwd+bwd"):
        for op in dict.fromkeys(r["op"] for r in main_ops):
            # memory-bound by arithmetic intensity below the ridge point (the same for every provider of an op)
            if not any(r["op"] == op and r["mode"] == mode and r.get("memory_bound") for r in main_ops):
                continue
            best = next((r for r in result["ratios"]["ops"] if r["op"] == op and r["mode"] == mode and r["best"]), None)
            value, goal = (best["hbm_share"] if best else None), TARGETS["hbm_share"]
            provider = f" ({best['provider']})" if best else " (no fused backend ran)"
            targets.append({"target": f"{op} {mode}{provider}: share of measured HBM bandwidth", "value": value,
                            "goal": goal, "unit": "share", "status": _status(value, goal)})  # fmt: skip
    for mode in ("fwd", "fwd+bwd"):
        best = [r for r in result["ratios"]["ops"] if r["op"] == "short_attention" and r["mode"] == mode and r["best"]]
        value = best[0]["vs_sdpa"] if best else None
        goal = TARGETS["short_attention_vs_sdpa"]
        name = f"short_attention {mode} (S = 4) vs SDPA" + (f" ({best[0]['provider']})" if best else "")
        targets.append({"target": name, "value": value, "goal": goal, "unit": "x", "status": _status(value, goal)})
    groups = cases.get("groups", {})
    for label in ("LEGO-XL-PG-32", "LEGO-XL-PG-32 (patches 75%)"):
        row = next((r for r in result["ratios"]["train"] if r["lego"] == label and r["dit"] == "DiT-XL/2"
                    and r["batch"] == groups.get(r["group"], {}).get("train_batch")), None)  # fmt: skip
        value = row["images_per_s_ratio"] if row else None
        goal = TARGETS["train_vs_dit"]
        targets.append({"target": f"{label} training vs DiT-XL/2, images/s", "value": value, "goal": goal,
                        "unit": "x", "status": _status(value, goal)})  # fmt: skip
    for r in result["ratios"]["sampling"]:
        if r["lego"] == "LEGO-XL-PG-32" and r["dit"] == "DiT-XL/2" and r["t_break"] > 0:
            goal = TARGETS["sampling_vs_dit"]
            name = (f"LEGO-XL-PG-32 sampling, t_break {r['t_break']:g}, {r['sampler']} NFE {r['nfe']}, "
                    f"CFG {r['cfg']:g}, vs DiT-XL/2, images/s")  # fmt: skip
            targets.append({"target": name, "value": r["images_per_s_ratio"], "goal": goal, "unit": "x",
                            "status": _status(r["images_per_s_ratio"], goal)})  # fmt: skip
    if not any("sampling" in t["target"] for t in targets):
        targets.append({"target": "LEGO-XL-PG-32 sampling, t_break 0.5, vs DiT-XL/2, images/s", "value": None,
                        "goal": TARGETS["sampling_vs_dit"], "unit": "x", "status": "not measured"})  # fmt: skip
    return targets


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def _f(v, digits=2, unit=""):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def _pct(v):
    return "–" if v is None else f"{100 * v:.0f}%"


def _x(v):
    return "–" if v is None else f"{v:.2f}x"


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def markdown(report: dict) -> str:
    dev, peaks, res = report["device"], report["peaks"], report["results"]
    v = dev.get("versions", {})
    lines = [f"# LEGO benchmarks: {dev.get('name')}, {report['date']}", ""]
    if report["smoke"]:
        lines += ["**Smoke run (tiny shapes, CPU): checks the harness end to end. These numbers are not results.**", ""]
    git = dev.get("git") or {}
    lines += [
        (
            f"- Device: {dev.get('name')} (compute capability {dev.get('capability')}, "
            f"{dev.get('multiprocessors')} SMs, {_f(dev.get('memory_gb'), 0)} GB, "
            f"L2 {_f(dev.get('l2_cache_mb'), 0)} MB), driver {dev.get('driver')}"
            if dev.get("device_type") == "cuda"
            else f"- Device: CPU ({dev.get('name')}, {dev.get('cpu_count')} cores)"
        ),
        (
            f"- Software: torch {v.get('torch')} (CUDA {v.get('torch_cuda')}), triton {v.get('triton')}, "
            f"diffusers {v.get('diffusers') or 'not installed'}, flash-attn {v.get('flash_attn') or 'not installed'}, "
            f"Python {v.get('python')}"
        ),
        (
            f"- lego_kernels backends here: {', '.join(dev.get('lego_kernels', {}).get('available_backends', []))}; "
            f"CUDA extension built: {dev.get('lego_kernels', {}).get('cuda_extension_built')}"
        ),
        f"- Code: {git.get('commit') or 'unknown commit'}{' (uncommitted changes)' if git.get('dirty') else ''}",
        (
            f"- Measured ceilings (this run): HBM copy {_f(peaks and peaks['hbm_gbps'], 0)} GB/s, bf16 matmul "
            f"{_f(peaks and peaks['bf16_tflops'], 1)} TFLOP/s ({peaks and peaks['method']})"
        ),
        f"- torch.compile backend: {report.get('compile_backend')}; suite time {_f(report.get('elapsed_s'), 0)} s",
    ]
    no_dit = next((e["reason"] for e in res["outcomes"]["skipped"] if "diffusers" in e.get("reason", "")), None)
    if no_dit:
        lines.append(f"- **DiT baseline not run**: {no_dit}. Every LEGO-vs-DiT ratio below is missing.")
    lines.append("")
    shape = report["cases"].get("op_shape", {})
    lines += ["## Targets", "", "A missed target is a finding, not a failure.", ""]
    lines += _table(
        ["target", "measured", "goal", "status"],
        [[t["target"], _pct(t["value"]) if t["unit"] == "share" else _x(t["value"]),
          _pct(t["goal"]) if t["unit"] == "share" else f">= {t['goal']:g}x", t["status"]] for t in res["targets"]],
    )  # fmt: skip
    lines += [
        "## Fused ops",
        "",
        (
            f"Shape: B = {shape.get('batch')}, canvas {shape.get('channels')} x {shape.get('height')} x "
            f"{shape.get('width')}, brick {shape.get('brick')} with l = {shape.get('field')} "
            f"(S = {shape.get('seq_len')}, N = {shape.get('num_seq')} sequences), d = {shape.get('hidden')}, "
            f"{shape.get('heads')} heads, {shape.get('dtype')}. Median of the timed rounds (p20-p80 beside it). "
            "GB/s = the op's minimum bytes / time; HBM = that as a share of the measured copy bandwidth; "
            "roofline = the floor max(bytes / bandwidth, FLOPs / matmul peak) as a share of the time."
        ),
        "",
    ]
    rows = []
    for r in sorted(res["ops"], key=lambda r: (r["op"], r["mode"])):
        if r["sweep"] or r.get("brick_shape"):
            continue
        t = r["timing"]
        rows.append([r["op"], r["mode"], r["provider"], _f(t["median_ms"] * 1e3, 1),
                     f"{t['p20_ms'] * 1e3:.1f}-{t['p80_ms'] * 1e3:.1f}", _f(r["bytes"] / 1e6, 1), _f(r["gbps"], 0),
                     _pct(r.get("hbm_share")), _f(r.get("tflops"), 1), _pct(r.get("roofline_share"))])  # fmt: skip
    lines += _table(["op", "mode", "provider", "median us", "p20-p80 us", "MB", "GB/s", "HBM", "TFLOP/s", "roofline"],
                    rows)  # fmt: skip
    lines += ["Fused against the references, side by side (x = times faster):", ""]
    if not res["ratios"]["ops"]:
        lines += ["(no fused backend ran on this device)", ""]
    lines += _table(
        ["op", "mode", "fused", "us", "vs eager", "vs torch.compile", "vs SDPA", "HBM"],
        [[r["op"], r["mode"], r["provider"] + (" (best)" if r["best"] else ""), _f(r["median_us"], 1),
          _x(r["vs_eager"]), _x(r["vs_compile"]), _x(r["vs_sdpa"]), _pct(r["hbm_share"])]
         for r in res["ratios"]["ops"]],
    )  # fmt: skip
    shape_rows = sorted((r for r in res["ops"] if r.get("brick_shape")),
                        key=lambda r: (r["brick_shape"], r["op"], r["mode"], r["provider"]))  # fmt: skip
    if shape_rows:
        lines += [
            "## Fused ops at each brick shape",
            "",
            "Batch 256 (see the JSON's cases.brick_shapes); auto = the fused backend auto picks.",
            "",
        ]
        lines += _table(
            ["brick", "op", "mode", "provider", "median us", "GB/s", "HBM", "vs eager"],
            [[r["brick_shape"], r["op"], r["mode"], f"{r['provider']} ({r['backend']})",
              _f(r["timing"]["median_ms"] * 1e3, 1), _f(r["gbps"], 0), _pct(r.get("hbm_share")),
              _x(next((x["vs_eager"] for x in res.get("brick_shape_ratios", []) if x["brick_shape"] == r["brick_shape"]
                       and x["op"] == r["op"] and x["mode"] == r["mode"]), None)) if r["provider"] == "auto" else ""]
             for r in shape_rows],
        )  # fmt: skip
    lines += patch_embed_paths.markdown(res.get("patch_embed_bwd"))
    lines += ["## Brick", "", f"One brick of the op shape with {report['cases'].get('brick_depth')} blocks.", ""]
    lines += _table(
        ["provider", "mode", "median ms", "TFLOP/s", "MFU", "vs torch eager", "vs torch.compile"],
        [[r["provider"], r["mode"], _f(r["timing"]["median_ms"], 3), _f(r.get("tflops"), 1), _pct(r.get("mfu")),
          _x(next((x["vs_torch"] for x in res["ratios"]["brick"]
                   if x["provider"] == r["provider"] and x["mode"] == r["mode"]), None)),
          _x(next((x["vs_torch_compile"] for x in res["ratios"]["brick"]
                   if x["provider"] == r["provider"] and x["mode"] == r["mode"]), None))]
         for r in res["bricks"]],
    )  # fmt: skip
    lines += [
        "## Training step",
        "",
        (
            "Forward + backward + AdamW (fused), bf16 autocast, fp32 weights. GFLOP/img = forward FLOPs per image; "
            "MFU = 3 x forward FLOPs per second / measured bf16 matmul peak. Ratios: images/s against the DiT of "
            "the same group at the same batch."
        ),
        "",
    ]
    rows = []
    for r in sorted((r for r in res["train"] if not r["sweep"]), key=lambda r: (r["group"], r["batch"], r["label"])):
        ratios = [x for x in res["ratios"]["train"] if x["lego"] == r["label"] and x["group"] == r["group"]
                  and x["batch"] == r["batch"]]  # fmt: skip
        vs = ", ".join(f"{_x(x['images_per_s_ratio'])} {x['dit']}" for x in ratios) or "–"
        rows.append([r["group"], r["label"], r["batch"], _f(r.get("params", 0) / 1e6, 0),
                     _f(r["fwd_flops_per_image"] / 1e9, 1), _f(r["timing"]["median_ms"], 1),
                     _f(r["images_per_s"], 1), _pct(r.get("mfu")),
                     _f(r["timing"].get("peak_memory_gb"), 1), vs])  # fmt: skip
    lines += _table(["group", "model", "batch", "M params", "GFLOP/img", "step ms", "images/s", "MFU", "peak GB",
                     "vs DiT"], rows)  # fmt: skip
    sampling = report["cases"].get("sampling", {})
    lines += [
        "## Sampling",
        "",
        (
            f"One whole sampler run per round, bf16 autocast; Heun with {sampling.get('heun_steps')} steps and "
            f"DDPM with {sampling.get('nfe')} steps make {sampling.get('nfe')} network calls each (CFG: both halves "
            "in one call of twice the batch). t_break 0.5: the top brick is skipped where the schedule says so. "
            "Ratios against DiT with the same sampler, NFE, guidance and batch."
        ),
        "",
    ]
    rows = []
    for r in sorted(res["sampling"], key=lambda r: (r["group"], r["sampler"], r["cfg"], r["label"], r["t_break"])):
        same = ("group", "sampler", "cfg", "t_break")
        ratios = [x for x in res["ratios"]["sampling"] if x["lego"] == r["label"] and all(x[k] == r[k] for k in same)]
        vs = ", ".join(f"{_x(x['images_per_s_ratio'])} {x['dit']}" for x in ratios) or "–"
        rows.append([r["group"], r["label"], r["sampler"], r["nfe"], _f(r["cfg"], 1), _f(r["t_break"], 1),
                     r["batch"], _f(r["timing"]["median_ms"] / 1e3, 3), _f(r["images_per_s"], 1),
                     _pct(r.get("skipped_flops_share")), _pct(r.get("mfu")), vs])  # fmt: skip
    lines += _table(["group", "model", "sampler", "NFE", "CFG", "t_break", "batch", "s/run", "images/s",
                     "FLOPs skipped", "MFU", "vs DiT"], rows)  # fmt: skip
    sw = res["sweeps"]
    if sw["ops"] or sw["train"]:
        lines += ["## Against batch size", "", f"Plotted in {report['files'].get('png', '(no plot)')}.", ""]
        for op, points in sw["ops"].items():
            lines.append(f"- {op} fwd+bwd, fused over eager: " + ", ".join(
                f"B {p['batch']}: {_x(p['vs_eager'])}" + (f" ({_x(p['vs_sdpa'])} SDPA)" if "vs_sdpa" in p else "")
                for p in points))  # fmt: skip
        if sw["train"]:
            lines.append("- LEGO-XL-PG-32 / DiT-XL/2 training images/s: " + ", ".join(
                f"B {p['batch']}: {_x(p['ratio'])}" for p in sw["train"]))  # fmt: skip
        lines.append("")
    out = res["outcomes"]
    if out["failed"] or out["skipped"]:
        lines += ["## Not measured", ""]
        for e in out["failed"]:
            lines.append(f"- FAILED {e['test']}: {e.get('reason', '')}")
        reasons: dict[str, list[str]] = {}
        for e in out["skipped"]:
            reasons.setdefault(e.get("reason", "skipped"), []).append(e["test"].split("::")[-1])
        for reason, tests in reasons.items():
            shown = ", ".join(tests[:6]) + (f" and {len(tests) - 6} more" if len(tests) > 6 else "")
            lines.append(f"- skipped ({reason}): {shown}")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib is not installed; no plot")
        return False
    res = report["results"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    ax = axes[0]
    for op, points in res["sweeps"]["ops"].items():
        ax.plot([p["batch"] for p in points], [p["vs_eager"] for p in points], marker="o", label=f"{op} vs eager")
        if any("vs_sdpa" in p for p in points):
            ax.plot([p["batch"] for p in points], [p.get("vs_sdpa") for p in points], marker="s", linestyle="--",
                    label=f"{op} vs SDPA")  # fmt: skip
    _finish(ax, "fused op speed-up, fwd+bwd", "batch (images)", "speed-up (x)", bool(res["sweeps"]["ops"]))
    ax = axes[1]
    curve = res["sweeps"]["train"]
    if curve:
        ax.plot([p["batch"] for p in curve], [p["ratio"] for p in curve], marker="o", label="LEGO-XL-PG-32 / DiT-XL/2")
        ax.axhline(TARGETS["train_vs_dit"], color="gray", linestyle=":", label="target")
    _finish(ax, "training images/s ratio", "batch (images)", "speed-up (x)", bool(curve))
    ax = axes[2]
    rows = [r for r in res["ops"] if not r["sweep"] and not r.get("brick_shape") and r["mode"] == "fwd+bwd"
            and r.get("roofline_share")]  # fmt: skip
    rows.sort(key=lambda r: (r["op"], r["provider"]), reverse=True)  # barh draws bottom-up: read top to bottom
    if rows:
        labels = [f"{r['op']}\n{r['provider']}" for r in rows]
        ax.barh(range(len(rows)), [100 * r["roofline_share"] for r in rows])
        ax.set_yticks(range(len(rows)), labels, fontsize=6)
        ax.axvline(100 * TARGETS["hbm_share"], color="gray", linestyle=":")
    _finish(ax, "ops fwd+bwd: share of the roofline floor", "% of roofline", None, bool(rows), legend=False)
    title = f"{report['device'].get('name')} {report['date']}" + (" (SMOKE: not results)" if report["smoke"] else "")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _finish(ax, title, xlabel, ylabel, has_data, legend=True):
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if not has_data:
        ax.text(0.5, 0.5, "no data in this run", ha="center", va="center", transform=ax.transAxes)
    elif legend:
        if ax.get_xlabel().startswith("batch"):
            markers = [line for line in ax.get_lines() if line.get_marker() not in (None, "", "None")]
            batches = sorted({int(x) for line in markers for x in line.get_xdata()})
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, [str(b) for b in batches])
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def write_report(raw_path: Path | None, sidecar_path: Path, out_dir: Path, stem: str | None, command: str) -> dict:
    side = json.loads(sidecar_path.read_text())
    raw = json.loads(raw_path.read_text()) if raw_path and raw_path.exists() else None
    device = side["device"]
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    if stem is None:
        name = "cpu" if device.get("device_type") == "cpu" else device.get("name", "device")
        stem = f"{_slug(name)}{'-smoke' if side.get('smoke') else ''}-{date}"
        n = 2
        base = stem
        while (out_dir / f"{stem}.json").exists():
            stem, n = f"{base}-{n}", n + 1
    files = {k: str(out_dir / f"{stem}{ext}") for k, ext in
             (("json", ".json"), ("md", ".md"), ("png", ".png"), ("raw", ".pytest-benchmark.json"),
              ("session", ".session.json"))}  # fmt: skip
    report = {
        "schema": 1,
        "date": date,
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "smoke": side.get("smoke"),
        "device": device,
        "peaks": side.get("peaks"),
        "compile_backend": side.get("compile_backend"),
        "settings": side.get("settings"),
        "cases": side.get("cases", {}),
        "elapsed_s": side.get("elapsed_s"),
        "targets_goals": TARGETS,
        "files": files,
        "results": analyze(raw, side),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if raw is not None and Path(files["raw"]) != raw_path:
        Path(files["raw"]).write_text(json.dumps(raw))
    if Path(files["session"]) != sidecar_path:
        Path(files["session"]).write_text(json.dumps(side, indent=1))
    if not plot(report, Path(files["png"])):
        files.pop("png")
    Path(files["json"]).write_text(json.dumps(report, indent=1, default=str))
    Path(files["md"]).write_text(markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the harness; no results)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: benchmarks/results; "
                             "a new temporary folder with --smoke)")  # fmt: skip
    parser.add_argument("-k", dest="keyword", default=None, help="run only the benchmarks pytest -k selects")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"skip what is left after this many seconds "
                             f"(default {DEFAULT_BUDGET_S}; 0: no limit)")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help=f"build the CUDA extension if missing, run pytest -m cuda, then the quick rows only; "
                             f"{QUICK_BUDGET_S} s budget in all")  # fmt: skip
    parser.add_argument("--interpret", action="store_true",
                        help="keep TRITON_INTERPRET=1 (Triton kernels on the CPU interpreter; slow)")  # fmt: skip
    parser.add_argument("--rebuild", type=Path, default=None,
                        help="write the report from a saved <stem>.pytest-benchmark.json (and its .session.json) "
                             "without running anything")  # fmt: skip
    args = parser.parse_args(argv)
    command = " ".join(["python -m benchmarks.report", *(argv if argv is not None else sys.argv[1:])])

    if args.rebuild is not None:
        raw = args.rebuild
        stem = raw.name.removesuffix(".pytest-benchmark.json")
        report = write_report(raw, raw.with_name(f"{stem}.session.json"), args.out or raw.parent, stem, command)
        print("\n".join(f"report: wrote {p}" for p in report["files"].values()))
        return 0

    out = args.out
    if args.smoke:
        if out is None:
            out = Path(tempfile.mkdtemp(prefix="lego-bench-smoke-"))
        elif out.resolve() == RESULTS.resolve() or RESULTS.resolve() in out.resolve().parents:
            parser.error("smoke numbers are not results: --smoke does not write into benchmarks/results")
    out = out or RESULTS
    start = time.monotonic()
    budget = args.budget_s if args.budget_s is not None else (0 if args.smoke else DEFAULT_BUDGET_S)
    if args.quick:
        quick_setup(args.smoke)
        if args.budget_s is None and not args.smoke:  # what is left, less ~20 s for start-up and the report
            budget = max(30.0, QUICK_BUDGET_S - (time.monotonic() - start) - 20)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lego-bench-") as tmp:
        raw, sidecar, status = run_suite(Path(tmp), args.smoke, args.keyword, budget, args.interpret, args.quick)
        if not sidecar.exists():
            print(f"report: the suite did not run (pytest exit status {status}); nothing written", file=sys.stderr)
            return status or 1
        report = write_report(raw, sidecar, out, None, command)
    print("\n".join(f"report: wrote {p}" for p in report["files"].values()))
    for line in patch_embed_paths.summary(report["results"].get("patch_embed_bwd")):
        print("report:", line)
    if args.quick:
        elapsed = time.monotonic() - start
        print(f"report: --quick took {elapsed:.0f} s of its {QUICK_BUDGET_S} s budget"
              + ("" if elapsed <= QUICK_BUDGET_S else " (OVER BUDGET)"))  # fmt: skip
    failed = report["results"]["outcomes"]["failed"]
    if failed:
        print(f"report: {len(failed)} benchmark(s) failed; see the report's 'Not measured' section", file=sys.stderr)
        return 1
    return 0 if status in (0, 5) else status


if __name__ == "__main__":
    sys.exit(main())
