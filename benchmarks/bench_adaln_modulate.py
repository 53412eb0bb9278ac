"""adaln_modulate: LayerNorm + per-image modulation of [N, S, d] tokens (memory-bound: read x, write y)."""

import pytest

import lego_kernels as lk
from benchmarks import cases, opbench

PRIORITY = 0


def make_inputs(s, dev):
    x = opbench.randn(s.num_seq, s.seq_len, s.hidden, dev=dev, dtype=s.dtype)  # (N, S, d)
    shift = opbench.randn(s.batch, s.hidden, dev=dev, dtype=s.dtype, scale=0.5)  # (B, d)
    scale = opbench.randn(s.batch, s.hidden, dev=dev, dtype=s.dtype, scale=0.5)  # (B, d)
    return [x, shift, scale], (0, 1, 2)


SPEC = opbench.OpSpec("adaln_modulate", lk.adaln_modulate, lk.adaln_modulate_ref, "adaln", make_inputs)


@pytest.mark.parametrize("mode", cases.OP_MODES)
@pytest.mark.parametrize("provider", opbench.providers(SPEC))
def test_adaln_modulate(benchmark, bench_device, provider, mode):
    opbench.run(benchmark, SPEC, provider, mode, cases.OP_SHAPE, bench_device)


@pytest.mark.bench_priority(4)
@pytest.mark.parametrize("batch", cases.OP_SWEEP_BATCHES)
@pytest.mark.parametrize("provider", ["auto", "eager"])
def test_adaln_modulate_sweep(benchmark, bench_device, provider, batch):
    opbench.run(benchmark, SPEC, provider, "fwd+bwd", cases.OP_SHAPE.with_batch(batch), bench_device, sweep=True)
