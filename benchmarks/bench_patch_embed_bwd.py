"""The patch_embed backward alone, path by path and tile by tile, and the L2 atomic probe: the GPU measurements that
settle the backward's last trade-offs (benchmarks/patch_embed_paths.py says what each row decides; report.py prints
the verdict). All quick rows: `python -m benchmarks.report --quick` runs them.

Rows: every brick shape of cases.PATCH_EMBED_BWD_SHAPES (the static profile's backward cases, the bottom bricks) at
batch 64 and 256, on each path of patch_embed_paths.PATHS; the forward is not timed (fixed dtok, x, prev, weight). Then
the probe:
fp32 16-byte atomic adds into an L2-resident buffer and plain stores of the same bytes, in two address patterns.
"""

import pytest
import torch

from benchmarks import cases, harness, l2_atomics
from benchmarks import patch_embed_paths as paths
from lego_kernels._dispatch import resolve_backend

# After the training (1) and sampling (2) rows, the report's headline: where --quick's budget runs out, these go.
PRIORITY = 3
# Short measurements: 84 rows (full size) in well under a minute of a GPU session. Their cost there is mostly Triton's
# JIT: they launch 52 distinct specializations, which took 31 s to compile for sm_90 on a 2-core CPU (not on the GPU
# machine; some are shared with the op rows before them); the timing itself is ~0.1 s a row.
SETTINGS = harness.Settings(warmup=2, target_s=0.08, min_rounds=5, max_rounds=100, min_round_s=1e-3)
if harness.SMOKE:
    SETTINGS = harness.OPS
CALLS_PER_GRAPH = 10


def _triton_or_skip(dev: torch.device) -> None:
    try:
        resolve_backend("triton", dev, "patch_embed", ("triton",))
    except ValueError as e:
        pytest.skip(str(e))


def _device_timed(fn, dev: torch.device):
    """(what to time, backward calls per timed call, how). On a GPU the backward is captured CALLS_PER_GRAPH times in
    one CUDA graph: at batch 64 its kernels take microseconds behind tens of microseconds of Python (allocations, the
    accumulators' zeroing, the casts), so timing eager calls would time the host, not the paths' kernels. Where capture
    fails, the eager call, with the reason recorded."""
    if dev.type != "cuda":
        return fn, 1, "no (CPU)"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):  # compiles and warms the allocator off the capture (PyTorch's recipe)
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(CALLS_PER_GRAPH):
                fn()
    except Exception as e:  # noqa: BLE001 - any capture failure: time the eager call instead, and say why
        torch.cuda.synchronize()
        return fn, 1, f"no: capture failed ({type(e).__name__}: {str(e)[:200]})"
    return graph.replay, CALLS_PER_GRAPH, f"yes, {CALLS_PER_GRAPH} calls per replay"


def _per_call(timing: dict, calls: int) -> dict:
    """Per backward call; ``iterations`` counts backward calls per round (report.py divides the wall clock by it)."""
    out = {k: v / calls if k.endswith("_ms") else v for k, v in timing.items()}
    return out | {"iterations": timing["iterations"] * calls, "calls_per_timed_call": calls}


def _rows() -> list:
    """(shape, batch, path) of every row; a path whose launches equal an earlier path's at that shape is left out."""
    return [pytest.param(name, batch, path, id=f"{name}-{batch}-{path}")
            for name, shape in cases.PATCH_EMBED_BWD_SHAPES.items() for batch in cases.PATCH_EMBED_BWD_BATCHES
            for path in paths.distinct_paths(shape.with_batch(batch))]  # fmt: skip


@pytest.mark.quick
@pytest.mark.parametrize(("shape_name", "batch", "path"), _rows())
def test_patch_embed_bwd_path(benchmark, bench_device, shape_name, batch, path):
    _triton_or_skip(bench_device)
    s = cases.PATCH_EMBED_BWD_SHAPES[shape_name].with_batch(batch)
    fields = paths.row_fields(s, shape_name, path)
    inputs = paths.make_inputs(s, bench_device)
    with paths.forced_rows(paths.FORCED_ROWS.get(path)):
        fn, calls, graph = _device_timed(lambda: paths.call(path, inputs), bench_device)
        timing = _per_call(harness.measure(benchmark, fn, SETTINGS, bench_device), calls)
    harness.record(benchmark, **fields, timing=timing, cuda_graph=graph)


@pytest.mark.quick
@pytest.mark.parametrize("op", ["atomic", "store"])
@pytest.mark.parametrize("pattern", l2_atomics.PATTERNS)
def test_l2_atomic_probe(benchmark, bench_device, pattern, op):
    _triton_or_skip(bench_device)
    p = cases.L2_PROBE
    buf = l2_atomics.new_buffer(p["buffer_bytes"], p["block"], bench_device)
    atomic = op == "atomic"
    if atomic:  # the sums first: a probe that adds wrongly measures nothing
        l2_atomics.launch(buf, p["programs"], p["iters"], pattern, atomic=True)
        want = l2_atomics.expected_sums(*buf.shape, p["programs"], p["iters"], pattern)
        assert torch.equal(buf.double().cpu(), want), f"L2 probe ({pattern}): wrong sums"

    timing = harness.measure(
        benchmark, lambda: l2_atomics.launch(buf, p["programs"], p["iters"], pattern, atomic), SETTINGS, bench_device
    )
    harness.record(
        benchmark, kind=paths.PROBE_KIND, op=op, pattern=pattern, buffer_bytes=p["buffer_bytes"], block=p["block"],
        programs=p["programs"], iters=p["iters"], flops=0,
        bytes=l2_atomics.traffic_bytes(p["programs"], p["iters"], p["block"]), sweep=False, timing=timing,
    )  # fmt: skip
