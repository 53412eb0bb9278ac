"""patch_unembed: per-token l x l x C blocks -> r x r patches -> the [B, C, H, W] canvas (one canvas in, one out).

At the XL shape this moves only two 1M-element canvases, so launch latency, not bandwidth, bounds it.
"""

import pytest

import lego_kernels as lk
from benchmarks import cases, opbench

PRIORITY = 0


def make_inputs(s, dev):
    per_token = s.field * s.field * s.channels
    tokens = opbench.randn(s.num_seq, s.seq_len, per_token, dev=dev, dtype=s.dtype)  # (N, S, l*l*C)
    return [tokens, s.brick, s.field, s.channels, s.height, s.width], (0,)


SPEC = opbench.OpSpec("patch_unembed", lk.patch_unembed, lk.patch_unembed_ref, "patch_unembed", make_inputs)


@pytest.mark.parametrize("mode", cases.OP_MODES)
@pytest.mark.parametrize("provider", opbench.providers(SPEC))
def test_patch_unembed(benchmark, bench_device, provider, mode):
    opbench.run(benchmark, SPEC, provider, mode, cases.OP_SHAPE, bench_device)


@pytest.mark.bench_priority(4)
@pytest.mark.parametrize("batch", cases.OP_SWEEP_BATCHES)
@pytest.mark.parametrize("provider", ["auto", "eager"])
def test_patch_unembed_sweep(benchmark, bench_device, provider, batch):
    opbench.run(benchmark, SPEC, provider, "fwd+bwd", cases.OP_SHAPE.with_batch(batch), bench_device, sweep=True)
