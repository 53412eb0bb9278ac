"""gated_residual_adaln: x_out = x + gate * y fused with the next adaLN (memory-bound: read x, y; write x_out, h)."""

import pytest

import lego_kernels as lk
from benchmarks import cases, opbench

PRIORITY = 0


def make_inputs(s, dev):
    x = opbench.randn(s.num_seq, s.seq_len, s.hidden, dev=dev, dtype=s.dtype)  # (N, S, d)
    y = opbench.randn(s.num_seq, s.seq_len, s.hidden, dev=dev, dtype=s.dtype)  # (N, S, d)
    gate, shift, scale = (opbench.randn(s.batch, s.hidden, dev=dev, dtype=s.dtype, scale=0.5) for _ in range(3))
    return [x, y, gate, shift, scale], (0, 1, 2, 3, 4)


SPEC = opbench.OpSpec(
    "gated_residual_adaln", lk.gated_residual_adaln, lk.gated_residual_adaln_ref, "adaln", make_inputs
)


@pytest.mark.parametrize("mode", cases.OP_MODES)
@pytest.mark.parametrize("provider", opbench.providers(SPEC))
def test_gated_residual_adaln(benchmark, bench_device, provider, mode):
    opbench.run(benchmark, SPEC, provider, mode, cases.OP_SHAPE, bench_device)


@pytest.mark.bench_priority(4)
@pytest.mark.parametrize("batch", cases.OP_SWEEP_BATCHES)
@pytest.mark.parametrize("provider", ["auto", "eager"])
def test_gated_residual_adaln_sweep(benchmark, bench_device, provider, batch):
    opbench.run(benchmark, SPEC, provider, "fwd+bwd", cases.OP_SHAPE.with_batch(batch), bench_device, sweep=True)
