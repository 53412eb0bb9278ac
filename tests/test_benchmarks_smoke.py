"""The benchmark harness (benchmarks/), checked on the CPU.

- The analytic FLOP counts (benchmarks/counts.py) against torch.utils.flop_counter.FlopCounterMode, for the ops, a
  brick, LegoModel (PG, PR, U; skipping; training's patch sampling; a training step) and diffusers' DiT.
- The byte counts against the roofline floors in shared/DESIGN.md.
- ``python -m benchmarks.report --smoke`` end to end: it runs every suite on tiny shapes and writes the JSON, Markdown
  and PNG report into a temporary folder (never into benchmarks/results) with the expected keys.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

import lego_kernels as lk  # noqa: E402 -- after the path set-up above
from benchmarks import counts  # noqa: E402 -- after the path set-up above
from lego import LegoBrick, LegoModel  # noqa: E402 -- after the path set-up above
from lego.networks.interface import PatchDraw  # noqa: E402 -- after the path set-up above

SMALL = counts.OpShape(batch=3, channels=3, height=12, width=8, brick=4, field=2, hidden=24, heads=2,
                       dtype=torch.float32)  # fmt: skip


def counted(fn) -> int:
    """FLOPs FlopCounterMode sees in fn(); SDPA forced onto its math path so that attention is counted too."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def _patch_embed_inputs(s, grad):
    x = torch.randn(s.batch, s.channels, s.height, s.width)
    prev = torch.randn(s.batch, s.channels, s.height, s.width, requires_grad=grad)
    weight = torch.randn(s.hidden, s.embed_in, s.field, s.field, requires_grad=grad)
    bias = torch.randn(s.hidden, requires_grad=grad)
    pos = torch.randn(s.seq_len, s.hidden)
    return (x, prev, weight, bias, pos, s.brick, s.field), [prev, weight, bias]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_patch_embed_flops(mode):
    args, leaves = _patch_embed_inputs(SMALL, grad=mode != "fwd")

    def run():
        out = lk.patch_embed_ref(*args)
        if mode != "fwd":
            torch.autograd.grad(out, leaves, torch.randn_like(out))

    fwd = counts.op_cost("patch_embed", SMALL, "fwd").flops
    if mode == "fwd":
        assert counted(run) == fwd
    else:  # autograd's conv backward takes the gradient of every input channel; the count takes prev's only
        dprev = 2 * SMALL.tokens * SMALL.hidden * SMALL.channels * SMALL.field**2
        assert counted(run) == 3 * fwd
        assert counts.op_cost("patch_embed", SMALL, mode).flops == 2 * fwd + dprev


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_short_attention_flops(mode):
    s = SMALL
    qkv = torch.randn(s.num_seq, s.seq_len, 3 * s.hidden, requires_grad=mode != "fwd")

    def run():
        out = lk.short_attention_ref(qkv, s.heads)
        if mode != "fwd":
            torch.autograd.grad(out, qkv, torch.randn_like(out))

    expected = counts.op_cost("short_attention", s, mode).flops
    if mode == "fwd":
        assert counted(run) == expected
    else:  # autograd does not recompute q k^T (it keeps P): one S x S x d product fewer than the fused backward
        assert counted(run) == expected - 2 * s.num_seq * s.seq_len**2 * s.hidden


def test_memory_bound_ops_count_no_flops():
    s = SMALL
    x, y = torch.randn(s.num_seq, s.seq_len, s.hidden), torch.randn(s.num_seq, s.seq_len, s.hidden)
    vec = [torch.randn(s.batch, s.hidden) for _ in range(3)]
    tokens = torch.randn(s.num_seq, s.seq_len, s.field**2 * s.channels)
    assert counted(lambda: lk.adaln_modulate_ref(x, vec[0], vec[1])) == 0
    assert counted(lambda: lk.gated_residual_adaln_ref(x, y, *vec)) == 0
    assert counted(lambda: lk.patch_unembed_ref(tokens, s.brick, s.field, s.channels, s.height, s.width)) == 0
    for op in counts.OP_COSTS:
        if op not in ("patch_embed", "short_attention"):
            assert counts.op_cost(op, s, "fwd+bwd").flops == 0


def test_bytes_match_the_design_floors():
    """shared/DESIGN.md: at B = 256, S = 4, d = 1152 on ~3.0 TB/s, short attention 201 us, LayerNorm+modulate 101 us.
    Those floors leave out the small fp32 side outputs (lse, mean/rstd) that the counts include."""
    xl = counts.OpShape(256, 4, 32, 32, 4, 2, 1152, 16, torch.bfloat16)
    attention = counts.op_cost("short_attention", xl, "fwd").bytes - 4 * xl.num_seq * xl.heads * xl.seq_len
    adaln = counts.op_cost("adaln_modulate", xl, "fwd").bytes - 8 * xl.tokens
    assert attention / 3.0e12 * 1e6 == pytest.approx(201, rel=0.01)
    assert adaln / 3.0e12 * 1e6 == pytest.approx(101, rel=0.01)


@pytest.mark.parametrize("has_prev, field", [(False, None), (True, None), (True, "one token")])
def test_brick_flops(has_prev, field):
    s = SMALL if field is None else replace(SMALL, field=SMALL.brick)  # one token per patch: o = v, no q or k
    brick = LegoBrick(s.brick, s.field, s.hidden, 2, s.heads, in_channels=s.channels, has_prev=has_prev,
                      backend="torch")  # fmt: skip
    x = torch.randn(s.batch, s.channels, s.height, s.width)
    prev = torch.randn_like(x) if has_prev else None
    got = counted(lambda: brick(x, prev, torch.randn(s.batch, s.hidden)))
    parts = counts.brick_flops(s.brick, s.field, s.hidden, 2, s.channels, has_prev, s.batch, s.height, s.width)
    assert got == sum(parts.values())


def _tiny(stack):
    depths = (1, 2, 1, 2, 1) if stack == "U" else (1, 2, 1)
    return LegoModel.from_name(f"LEGO-T-{stack}-16", in_channels=3, num_classes=5, hidden_size=32, num_heads=2,
                               depths=depths, backend="torch")  # fmt: skip


@pytest.mark.parametrize("stack", ["PG", "PR", "U"])
def test_lego_model_flops(stack):
    model = _tiny(stack)
    x, sigma, labels = torch.randn(2, 3, 16, 32), torch.tensor([0.5, 3.0]), torch.tensor([1, 4])
    assert counted(lambda: model(x, sigma, labels)) == sum(counts.lego_flops(model.config, 2, 16, 32).values())
    top = len(model.net.bricks) - 1
    got = counted(lambda: model(x, sigma, labels, skip=(top,)))
    assert got == sum(counts.lego_flops(model.config, 2, 16, 32, skip=(top,)).values())


def test_lego_flops_with_patch_sampling_and_training_step():
    model = _tiny("PG")
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 3.0]), torch.tensor([1, 4])
    fill = torch.randn_like(x)
    gen = torch.Generator().manual_seed(0)
    noise = model.noise_level(sigma)
    got = counted(lambda: model.net(x, noise, labels, patches=PatchDraw(0.5, gen), fill=fill))
    # every path (the reference too) embeds the picked patches only: unprocessed patches cost nothing
    assert got == sum(counts.lego_flops(model.config, 2, 16, 16, patch_fraction=0.5).values())

    import lego

    loss_fn = lego.LegoLoss()
    step = counted(lambda: loss_fn(model, x, labels, torch.Generator().manual_seed(0))[0].backward())
    fwd = sum(counts.lego_flops(model.config, 2, 16, 16).values())
    # 3 x forward, less the input gradients nobody needs: the bottom brick's embedding (its input [x, coordinates]
    # has no gradient) and the timestep MLP's first layer (its input is the fixed sinusoids)
    b0, d = model.config.bricks[0], model.config.hidden_size
    bottom = counts.brick_flops(b0.brick_size, b0.field_size, d, b0.depth, 3, False, 2, 16, 16)["embed"]
    assert step == 3 * fwd - bottom - 2 * 2 * counts.FREQUENCY_SIZE * d


def test_dit_flops():
    pytest.importorskip("diffusers")
    from benchmarks.dit import build_dit, dit_loss

    config = {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2, "patch_size": 2, "in_channels": 4,
              "sample_size": 8}  # fmt: skip
    net = build_dit(config, num_classes=5, device=torch.device("cpu"))
    x, labels = torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 4])
    parts = counts.dit_flops(net.net.dit.config, 3, 8, 8)
    fwd = sum(parts.values())
    assert counted(lambda: net(x, torch.tensor(1.5), labels)) == fwd
    step = counted(lambda: dit_loss(net, x, labels, torch.Generator().manual_seed(0))[0].backward())
    # 3 x forward, less the input gradients nobody needs: the patch embedding's and each timestep MLP's first layer
    embedders = config["num_layers"] + 1
    assert step == 3 * fwd - parts["embed"] - embedders * 2 * 3 * counts.FREQUENCY_SIZE * 16


def test_smoke_refuses_to_write_into_results():
    from benchmarks import report

    with pytest.raises(SystemExit):
        report.main(["--smoke", "--out", str(REPO / "benchmarks" / "results")])


@pytest.mark.slow
def test_smoke_report(tmp_path):
    pytest.importorskip("pytest_benchmark")
    results = REPO / "benchmarks" / "results"
    before = sorted(results.iterdir()) if results.exists() else []
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", "--smoke", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (sorted(results.iterdir()) if results.exists() else []) == before, "the smoke run wrote into results/"

    (json_path,) = [p for p in tmp_path.glob("*.json") if p.name.count(".") == 1]
    assert json_path.name.startswith("cpu-smoke-")
    report = json.loads(json_path.read_text())
    for key in ("date", "device", "peaks", "cases", "settings", "results", "files", "smoke"):
        assert key in report, key
    assert report["smoke"] is True
    assert {"torch", "triton", "diffusers"} <= set(report["device"]["versions"])
    assert report["peaks"]["hbm_gbps"] > 0 and report["peaks"]["bf16_tflops"] > 0
    res = report["results"]
    for key in ("ops", "bricks", "train", "sampling", "ratios", "sweeps", "targets", "outcomes"):
        assert key in res, key
    assert not res["outcomes"]["failed"], res["outcomes"]["failed"]

    measured = {(r["op"], r["provider"], r["mode"]) for r in res["ops"] if not r["sweep"]}
    for op in counts.OP_COSTS:
        for mode in ("fwd", "fwd+bwd"):
            assert {(op, "eager", mode), (op, "compile", mode)} <= measured, (op, mode)
    for r in res["ops"]:
        assert r["bytes"] > 0 and r["gbps"] > 0 and r["timing"]["median_ms"] > 0
    assert {(r["provider"], r["mode"]) for r in res["bricks"]} >= {("auto", "fwd+bwd"), ("torch", "fwd+bwd")}
    for r in res["train"] + res["sampling"]:
        assert r["images_per_s"] > 0 and r["flops"] > 0 and r["mfu"] > 0
    lego_rows = {r["label"] for r in res["train"]}
    assert {"LEGO-XL-PG-32", "LEGO-XL-PR-32", "LEGO-XL-U-32", "LEGO-S-PG-64", "LEGO-L-PG-64"} <= lego_rows
    skipped = {(r["model"], r["t_break"] > 0, r["cfg"] > 1, r["sampler"]) for r in res["sampling"]}
    assert {("LEGO-XL-PG-32", s, c, sampler) for s in (0, 1) for c in (0, 1) for sampler in ("heun", "ddpm")} <= {
        (m, int(s), int(c), sampler) for m, s, c, sampler in skipped
    }
    assert any(r["skipped_flops_share"] > 0 for r in res["sampling"] if r["t_break"] > 0)
    try:
        import diffusers  # noqa: F401

        assert {"DiT-XL/2", "DiT-S/2", "DiT-L/2"} <= lego_rows
        assert any(r["lego"] == "LEGO-XL-PG-32" and r["dit"] == "DiT-XL/2" for r in res["ratios"]["train"])
        assert any(r["t_break"] > 0 and r["dit"] == "DiT-XL/2" for r in res["ratios"]["sampling"])
        assert res["sweeps"]["train"], "no training sweep"
    except ImportError:  # the DiT baseline is skipped, and says why
        assert any("diffusers" in e["reason"] for e in res["outcomes"]["skipped"])
    goals = " ".join(t["target"] for t in res["targets"])
    for phrase in ("share of measured HBM bandwidth", "vs SDPA", "training vs DiT-XL/2", "sampling, t_break 0.5"):
        assert phrase in goals, phrase
    assert all(t["status"] in ("met", "missed", "not measured") for t in res["targets"])

    md = Path(report["files"]["md"]).read_text()
    for heading in ("## Targets", "## Fused ops", "## Brick", "## Training step", "## Sampling", "not results"):
        assert heading in md, heading
    raw = json.loads(Path(report["files"]["raw"]).read_text())
    assert raw["benchmarks"] and all("timing" in b["extra_info"] for b in raw["benchmarks"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert Path(report["files"]["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_selects_the_quick_rows():
    """`benchmarks.report --quick` runs only rows marked quick: the fused ops and eager (no torch.compile), every op at
    every brick shape, the patch_embed backward's paths and the L2 atomic probe, and LEGO-XL-PG-32 against DiT-XL/2
    (training at the group's batch and the large batch, Heun sampling without guidance); nothing else."""
    pytest.importorskip("pytest_benchmark")
    env = dict(os.environ, LEGO_BENCH_SMOKE="1", LEGO_BENCH_QUICK="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-o", "addopts="],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    shapes = {i for i in ids if "test_op_at_brick_shape" in i}
    assert len(shapes) == len(counts.OP_COSTS) * 2 * 2 * 2, sorted(shapes)  # ops x smoke shapes x providers x modes
    train = {i.split("::")[1] for i in ids if "bench_train" in i}
    assert train == {f"{t}[{m}-latent-32x32x4]" for t in ("test_train_step", "test_train_step_large_batch")
                     for m in ("LEGO-XL-PG-32", "DiT-XL_2")}, train  # fmt: skip
    sampling = [i for i in ids if "bench_sampling" in i]
    assert sampling and all("heun-cfg1-" in i and ("LEGO-XL-PG-32" in i or "DiT-XL_2" in i) for i in sampling)
    assert not [i for i in ids if "compile" in i or "sweep" in i or "bench_brick.py" in i]
    # the patch_embed backward's paths at every shape and batch, and the L2 atomic probe (bench_patch_embed_bwd.py)
    bwd = [i.split("::")[1] for i in ids if "bench_patch_embed_bwd" in i]
    probes = {i for i in bwd if i.startswith("test_l2_atomic_probe")}
    assert probes == {f"test_l2_atomic_probe[{p}-{op}]" for p in ("same-order", "spread") for op in ("atomic", "store")}
    for path in ("fused", "fused-rows32", "two-pass", "two-pass-1"):
        assert any(i.endswith(f"-{path}]") for i in bwd), path


def test_auto_prefers_cuda_only_where_a_gpu_measurement_says_so(monkeypatch):
    """backend="auto" takes the CUDA kernel over Triton only for ops in AUTO_PREFERS_CUDA, and every entry there must
    be backed by a committed GPU report (benchmarks/results/*.json) in which CUDA was the fastest fused backend."""
    from lego_kernels import _dispatch

    reports = [p for p in (REPO / "benchmarks" / "results").glob("*.json") if p.name.count(".") == 1]
    for op, choice in _dispatch.AUTO_PREFERS_CUDA.items():
        best = [r for p in reports for r in json.loads(p.read_text())["results"]["ratios"]["ops"]
                if r["op"] == op and r["best"]]  # fmt: skip
        assert choice == "cuda" and best and all(r["provider"] == "cuda" for r in best), op

    monkeypatch.setattr(_dispatch, "available_backends", lambda device: ["cuda", "triton", "torch"])
    cuda = torch.device("cuda")
    monkeypatch.setattr(_dispatch, "AUTO_PREFERS_CUDA", {})
    assert _dispatch.resolve_backend("auto", cuda, "short_attention", ("cuda", "triton")) == "triton"
    monkeypatch.setattr(_dispatch, "AUTO_PREFERS_CUDA", {"short_attention": "cuda"})
    assert _dispatch.resolve_backend("auto", cuda, "short_attention", ("cuda", "triton")) == "cuda"
    assert _dispatch.resolve_backend("auto", cuda, "adaln_modulate", ("cuda", "triton")) == "triton"
