"""The GPU measurements that settle the patch_embed backward's trade-offs, checked on the CPU.

- the L2 atomic probe (benchmarks/l2_atomics.py): its sums on Triton's interpreter, and 16-byte vector atomics in the
  PTX Triton compiles for sm_90;
- the backward's paths (benchmarks/patch_embed_paths.py): forcing the fused kernel's tile changes its grid and only
  inside the block; every path computes the same gradients (interpreter); duplicates are left out of the rows;
- the analysis report.py prints: "not measured" without GPU rows; from GPU-like rows (made-up times, real launch
  plans), the fastest path, the constants whose choices are fastest and the static rule's programs;
- the rows themselves, tiny on the CPU through the interpreter, end to end through `benchmarks.report --smoke`.
"""

import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import counts, l2_atomics  # noqa: E402 (after the sys.path line above)
from benchmarks import patch_embed_paths as paths  # noqa: E402
from lego_kernels._dispatch import interpreting, triton_importable  # noqa: E402

needs_triton = pytest.mark.skipif(not triton_importable(), reason="needs triton")
needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or not interpreting(), reason="CPU interpreter check (TRITON_INTERPRET=1, no GPU)"
)
XL = {"channels": 4, "height": 32, "width": 32, "hidden": 1152, "heads": 16, "dtype": torch.bfloat16}
IMAGE_BRICK = counts.OpShape(batch=64, brick=32, field=2, **XL)  # 64 patches of 256 tokens, K 40
FEW_TOKENS = counts.OpShape(batch=64, brick=16, field=8, **XL)  # 256 patches of 4 tokens, K 640
SMALL = counts.OpShape(2, 3, 16, 16, 4, 2, 16, 2, torch.float32)  # 32 patches of 4 tokens, K 32


@needs_interpreter
@pytest.mark.parametrize("pattern", l2_atomics.PATTERNS)
def test_l2_probe_sums(pattern):
    tiles, block, programs, iters = 3, 64, 7, 5  # 35 adds over 3 tiles: uneven counts per tile
    buf = l2_atomics.new_buffer(tiles * block * 4, block, "cpu")
    l2_atomics.launch(buf, programs, iters, pattern, atomic=True)
    want = l2_atomics.expected_sums(tiles, block, programs, iters, pattern)
    assert torch.equal(buf.double(), want)
    adds_per_tile = (want[:, 1] - want[:, 0]) / 0.25  # lane 1 gets 0.25 more than lane 0 from every add
    assert adds_per_tile.sum() == programs * iters and adds_per_tile.min() < adds_per_tile.max()
    l2_atomics.launch(buf, programs, iters, pattern, atomic=False)  # stores: the last value written, whichever it was
    lane = (torch.arange(block) % 4) * 0.25
    assert (
        ((buf - lane) >= 1).all() and ((buf - lane) <= 8).all() and torch.equal(buf - buf.floor(), lane.expand_as(buf))
    )


def test_l2_probe_expected_sums_by_hand():
    # 2 programs x 3 adds over 3 tiles of 4, program p adding p % 8 + 1 (+ lane % 4 / 4) each time
    same = l2_atomics.expected_sums(3, 4, 2, 3, "same-order")  # both programs: tiles 0, 1, 2
    assert same[:, 0].tolist() == [1 + 2] * 3 and same[0].tolist() == [3, 3.5, 4, 4.5]
    spread = l2_atomics.expected_sums(2, 4, 2, 3, "spread")  # p 0: tiles 0, 1, 0; p 1: tiles 1, 0, 1
    assert spread[:, 0].tolist() == [2 * 1 + 2, 1 + 2 * 2] and spread[1].tolist() == [5, 5.75, 6.5, 7.25]
    with pytest.raises(ValueError, match="pattern"):
        l2_atomics.stride("random", 3)


_PTX = """
import json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from benchmarks.l2_atomics import NUM_WARPS, _l2_probe_kernel
sig = {"BUF": "*fp32", "TILES": "i32", "ITERS": "i32", "STRIDE": "i32", "ATOMIC": "constexpr", "BLOCK": "constexpr"}
for atomic in (True, False):
    src = ASTSource(fn=_l2_probe_kernel, signature=sig, constexprs={"ATOMIC": atomic, "BLOCK": 1024},
                    attrs={(0,): [["tt.divisibility", 16]]})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": NUM_WARPS}).asm["ptx"]
    ops = [line.split() for line in ptx.splitlines()]
    ops = [t[1] if t[0].startswith("@") else t[0] for t in ops if len(t) > 1]  # opcode after any predicate
    print(json.dumps([op for op in ops if op.startswith(("red.", "atom.", "st.global"))]))
"""


@needs_triton
def test_l2_probe_compiles_to_16_byte_atomics():
    """Every atomic of the probe is a 16-byte fp32 vector add (add.v4.f32: `red` on Triton 3.9, `atom` with an unused
    result on 3.6, the device machine's), and the store is 16 bytes wide too; compiled for sm_90 without a GPU, in a
    child process without the interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", _PTX], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    atomic, store = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert atomic and all(op in ("red.global.gpu.relaxed.add.v4.f32", "atom.global.gpu.relaxed.add.v4.f32")
                          for op in atomic), atomic  # fmt: skip
    assert store and all(op == "st.global.v4.b32" for op in store), store


@needs_triton
def test_forced_rows_change_the_grid_only_inside():
    pe = importlib.import_module("lego_kernels.patch_embed")
    saved = pe._BWD_ROWS
    inputs = paths.make_inputs(IMAGE_BRICK, torch.device("meta"))
    tiles = {rows: paths.tile(paths.plan(f"fused-rows{rows}", inputs)) for rows in (32, 64, 128)}
    assert saved == pe._BWD_ROWS
    assert [tiles[r]["rows"] for r in (32, 64, 128)] == [32, 64, 128]
    assert tiles[32]["programs"] == 4 * tiles[128]["programs"]  # 4x the programs, 4x the L2 atomic traffic
    assert tiles[32]["atomic_bytes"] > 3 * tiles[128]["atomic_bytes"]
    with paths.forced_rows(32):
        assert pe._BWD_ROWS == (32,)
    assert saved == pe._BWD_ROWS
    # every path that makes different launches is a row; the two kernels launch no atomics
    distinct = paths.distinct_paths(IMAGE_BRICK)
    assert distinct[0] == "fused" and {"two-pass", "two-pass-1"} <= set(distinct)
    assert paths.row_fields(IMAGE_BRICK, "x", "two-pass")["tile"] is None
    assert paths.row_fields(FEW_TOKENS, "x", "fused")["library_picks"] == "two-pass-1"  # 1024 tokens < 4 x 640


@needs_interpreter
def test_every_path_computes_the_same_gradients():
    """Every path at a brick with prev (input gradients: the fused ones and the two-kernel ones), and without (the
    two-kernel ones and weight-only, whose empty dcanvas matches theirs without input_grad)."""
    assert set(paths.distinct_paths(SMALL)) >= {"fused", "fused-rows32", "two-pass", "two-pass-1"}
    assert "weight-only" not in paths.paths_for(SMALL)
    bottom = dataclasses.replace(SMALL, has_prev=False)
    assert paths.paths_for(bottom) == ("two-pass", "two-pass-1", "weight-only")
    for shape in (SMALL, bottom):
        inputs = paths.make_inputs(shape, torch.device("cpu"))
        first, *others = paths.paths_for(shape)
        ref = paths.call(first, inputs)
        for path in others:
            with paths.forced_rows(paths.FORCED_ROWS.get(path)):
                got = paths.call(path, inputs)
            for name, a, b in zip(("dcanvas", "dweight", "dbias", "dpos"), got, ref):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{path}: {name}")


def _rows(times, shapes=(("image brick", IMAGE_BRICK), ("few tokens", FEW_TOKENS))) -> list[dict]:
    """GPU-like records: real fields of each row at full shapes (two by default) and two batches, made-up times."""
    out = []
    for name, shape in shapes:
        for batch in (64, 256):
            s = shape.with_batch(batch)
            for path in paths.distinct_paths(s):
                r = paths.row_fields(s, name, path)
                r["timing"] = {"median_ms": times(r) * 1e-3}
                r["hbm_share"] = 0.5
                out.append(r)
    return out


def _probes(share: float) -> list[dict]:
    return [{"kind": paths.PROBE_KIND, "op": op, "pattern": pat, "buffer_bytes": 4 << 20, "gbps": 1.0,
             "hbm_share": share if op == "atomic" else 1.0, "timing": {"median_ms": 1.0}}
            for pat in l2_atomics.PATTERNS for op in ("atomic", "store")]  # fmt: skip


def _made_up(r) -> float:
    """us: the smaller the fused tile the faster; two-pass-1 fastest below 8 tokens per K, slowest above."""
    if r["tile"]:
        return 10.0 * r["tile"]["rows"] / 32
    if r["path"] == "two-pass-1":
        return 5.0 if r["tokens"] < 8 * r["K"] else 500.0
    return 50.0


@needs_triton
def test_analysis_without_gpu_rows_says_not_measured():
    res = paths.analyze(_rows(_made_up) + _probes(0.5), {"hbm_gbps": 1.0}, measured=False)
    assert not res["measured"]
    assert all(e["fastest"] is None and all(p["median_us"] is None for p in e["paths"]) for e in res["shapes"])
    assert res["probe"]["atomic_to_dram"] is None and res["atomic_share"]["best"] is None
    assert res["two_pass_tokens_per_k"]["best"] is None
    assert all(x["allowed_additive"] is None and x["allowed_overlap"] is None for x in res["static_rule"]["shapes"])
    text = "\n".join(paths.markdown(res) + paths.summary(res))
    assert "not measured" in text and "**fastest**" not in text
    assert paths.summary(res) and all("not measured" in line and "set " not in line for line in paths.summary(res))


@needs_triton
def test_analysis_of_gpu_rows():
    rows = _rows(_made_up)
    res = paths.analyze(rows + _probes(0.25), {"hbm_gbps": 1.0}, measured=True)
    assert res["measured"] and len(res["shapes"]) == 4
    for e in res["shapes"]:
        few = e["tokens"] < 8 * e["K"]
        assert e["fastest"] == ("two-pass-1" if few else "fused-rows32"), e
    # the L2 atomic probe: a quarter of the DRAM bandwidth, so one atomic byte costs 4 DRAM bytes
    assert res["probe"]["atomic_to_dram"] == 0.25 and res["probe"]["atomic_cost"] == 4
    # _ATOMIC_SHARE: the library's own tile choice with the suggested value picks the fastest (32-row) tile everywhere
    best = res["atomic_share"]["best"]
    assert best is not None and best in res["atomic_share"]["tied"]
    for s in (IMAGE_BRICK, FEW_TOKENS):
        for batch in (64, 256):
            with paths.atomic_share(best):
                assert paths.tile(paths.plan("fused", paths.make_inputs(s.with_batch(batch), "meta")))["rows"] == 32
    # _TWO_PASS_TOKENS_PER_K: the few-token shape goes two-pass at both batches (1.6 and 6.4 tokens per K), the image
    # brick (409.6 and 1638.4) stays fused: c in (6.4, 409.6]
    tpk = res["two_pass_tokens_per_k"]
    current = tpk["current"]  # kept where it already lies in the interval, else the smallest whole number there
    want_c = current if 6.4 < current <= 409.6 else 7
    assert tpk["interval"] == [pytest.approx(6.4), pytest.approx(409.6)] and tpk["best"] == want_c
    # the static rule: programs whose atomic bytes, at 4 DRAM bytes each, stay within 0.1x the op's minimum bytes
    # (additive), or whose atomic time stays within the DRAM time (overlap: a quarter of the minimum bytes)
    for x in res["static_rule"]["shapes"]:
        e = next(e for e in res["shapes"] if (e["shape"], e["batch"]) == (x["shape"], x["batch"]))
        assert x["allowed_additive"] == int(0.1 * e["min_bytes"] * 0.25 / x["atomic_bytes_per_program"])
        assert x["allowed_overlap"] == int(0.25 * e["min_bytes"] / x["atomic_bytes_per_program"])
        assert (
            0
            < x["atomic_bytes_per_program"] * x["programs"]
            == next(p["atomic_bytes"] for p in e["paths"] if p["path"] == "fused")
        )
    md = "\n".join(paths.markdown(res))
    assert md.count("**fastest**") == 4 and "_ATOMIC_SHARE" in md and "4 DRAM bytes" in md and "is closer" in md
    want = f"_TWO_PASS_TOKENS_PER_K (now {current}): set {want_c} (any c with 6.4 < c <= 409.6)"
    assert any(want in line for line in paths.summary(res)), paths.summary(res)
    assert math.isfinite(res["atomic_share"]["total_us"][str(best)])


@needs_triton
def test_analysis_leaves_out_the_bricks_without_input_gradients():
    """A bottom brick (no prev: the library runs the weight kernel alone there, and it has no fused rows) decides
    neither _TWO_PASS_TOKENS_PER_K nor _ATOMIC_SHARE nor the static rule, however its two-kernel rows compare: here
    two-pass-1 is fastest at 42.7 and 170.7 tokens per K, which would move the threshold's interval to (170.7, 409.6]
    if it counted."""
    bottom = dataclasses.replace(IMAGE_BRICK, brick=4, field=4, has_prev=False)  # XL-PG-32's 4 x 4 brick, K 96

    def times(r):
        return (1.0 if r["path"] == "two-pass-1" else 100.0) if r["shape_name"] == "bottom" else _made_up(r)

    rows = _rows(times, (("image brick", IMAGE_BRICK), ("few tokens", FEW_TOKENS), ("bottom", bottom)))
    assert {r["library_picks"] for r in rows if r["shape_name"] == "bottom"} == {"weight-only"}
    res = paths.analyze(rows + _probes(0.25), {"hbm_gbps": 1.0}, measured=True)
    assert res["two_pass_tokens_per_k"]["interval"] == [pytest.approx(6.4), pytest.approx(409.6)]
    assert {x["shape"] for x in res["static_rule"]["shapes"]} == {"image brick", "few tokens"}
    assert res["atomic_share"]["best"] is not None


@pytest.mark.slow
@needs_triton
def test_rows_run_tiny_through_the_report(tmp_path):
    """`benchmarks.report --smoke --interpret` runs every path row and the probe tiny on the CPU and writes the
    analysis: "not measured", since CPU timings are not results."""
    pytest.importorskip("pytest_benchmark")
    env = {k: v for k, v in os.environ.items() if k != "LEGO_KERNELS_POISON"}
    cmd = [sys.executable, "-m", "benchmarks.report", "--smoke", "--interpret", "--out", str(tmp_path),
           "-k", "patch_embed_bwd_path or l2_atomic_probe"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (json_path,) = [p for p in tmp_path.glob("*.json") if p.name.count(".") == 1]
    report = json.loads(json_path.read_text())
    assert not report["results"]["outcomes"]["failed"] and not report["results"]["outcomes"]["skipped"]
    res = report["results"]["patch_embed_bwd"]
    shapes = report["cases"]["patch_embed_bwd_shapes"].values()
    want = sum(
        len(paths.distinct_paths(_shape(s, b))) for s in shapes for b in report["cases"]["patch_embed_bwd_batches"]
    )
    assert res["rows"] == want and res["probe_rows"] == 4 and not res["measured"]
    assert {p["path"] for e in res["shapes"] for p in e["paths"]} >= {"fused", "fused-rows32", "two-pass"}
    md = Path(report["files"]["md"]).read_text()
    assert "## patch_embed backward: paths, tiles and L2 atomics" in md and "**Not measured**" in md
    assert "not measured (no GPU rows)" in done.stdout


def _shape(d: dict, batch: int) -> counts.OpShape:
    keys = ("channels", "height", "width", "brick", "field", "hidden", "heads", "has_prev")
    return counts.OpShape(batch=batch, dtype=getattr(torch, d["dtype"]), **{k: d[k] for k in keys})


@needs_triton
def test_analysis_when_the_largest_tile_and_one_kernel_win():
    """The other way round: the 128-row tile fastest and two kernels slower everywhere: the suggested _ATOMIC_SHARE
    makes the library pick 128 rows at every shape, and _TWO_PASS_TOKENS_PER_K sends no measured shape to two
    kernels."""
    rows = _rows(lambda r: 10.0 * 128 / r["tile"]["rows"] if r["tile"] else 500.0)
    res = paths.analyze(rows, {"hbm_gbps": 1.0}, measured=True)
    assert res["probe"]["atomic_to_dram"] is None  # no probe rows: the ratio and the static rule stay open
    assert all(x["allowed_additive"] is None and x["allowed_overlap"] is None for x in res["static_rule"]["shapes"])
    for e in res["shapes"]:
        assert next(p for p in e["paths"] if p["path"] == e["fastest"])["tile"]["rows"] == 128, e
    for s in (IMAGE_BRICK, FEW_TOKENS):
        for batch in (64, 256):
            with paths.atomic_share(res["atomic_share"]["best"]):
                assert paths.tile(paths.plan("fused", paths.make_inputs(s.with_batch(batch), "meta")))["rows"] == 128
    tpk = res["two_pass_tokens_per_k"]
    assert tpk["interval"] == [0.0, pytest.approx(1.6)]  # c <= the fewest tokens per K measured (1024 / 640)
    assert tpk["best"] == (tpk["current"] if tpk["current"] <= 1.6 else 0)


@needs_triton
@pytest.mark.parametrize("model", ["additive", "overlap"])
def test_static_rule_fit_names_the_model_the_times_follow(model):
    """Fused times made from one cost model (DRAM time of the minimum bytes plus the fp32 accumulator, and L2 atomic
    time at a quarter of the DRAM bandwidth, summed or overlapped): the analysis finds that model, exactly."""
    dram, ratio = 4000.0, 0.25  # GB/s

    def times(r):
        if not r["tile"]:
            return 500.0
        t_dram = (r["bytes"] + 8 * r["shape"]["hidden"] * r["K"]) / (dram * 1e3)  # us
        t_atomic = sum(x["atomic_bytes"] for x in r["launches"]) / (ratio * dram * 1e3)
        return t_dram + t_atomic if model == "additive" else max(t_dram, t_atomic)

    rule = paths.analyze(_rows(times) + _probes(ratio), {"hbm_gbps": dram}, measured=True)["static_rule"]
    other = {"additive": "overlap", "overlap": "additive"}[model]
    assert rule["closer"] == model and rule["fit"][model] == pytest.approx(0, abs=1e-9) and rule["fit"][other] > 0.01
