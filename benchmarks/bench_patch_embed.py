"""patch_embed: patchify [x_t, prev, coordinates] + token embedding + position embedding -> [N, S, d] tokens.

Memory-bound: the embedding's K = C' l^2 = 40 at the XL shape is tiny next to d, so writing the tokens dominates.
"""

import pytest

import lego_kernels as lk
from benchmarks import cases, opbench

PRIORITY = 0


def make_inputs(s, dev):
    x = opbench.randn(s.batch, s.channels, s.height, s.width, dev=dev, dtype=s.dtype)  # (B, C, H, W)
    prev = opbench.randn(s.batch, s.channels, s.height, s.width, dev=dev, dtype=s.dtype) if s.has_prev else None
    weight = opbench.randn(s.hidden, s.embed_in, s.field, s.field, dev=dev, dtype=s.dtype, scale=0.1)  # (d, C', l, l)
    bias = opbench.randn(s.hidden, dev=dev, dtype=s.dtype, scale=0.1)  # (d,)
    pos = opbench.randn(s.seq_len, s.hidden, dev=dev, dtype=s.dtype, scale=0.1)  # (S, d), a buffer: no gradient
    grads = (1, 2, 3) if s.has_prev else (2, 3)
    return [x, prev, weight, bias, pos, s.brick, s.field], grads


SPEC = opbench.OpSpec("patch_embed", lk.patch_embed, lk.patch_embed_ref, "patch_embed", make_inputs)


@pytest.mark.parametrize("mode", cases.OP_MODES)
@pytest.mark.parametrize("provider", opbench.providers(SPEC))
def test_patch_embed(benchmark, bench_device, provider, mode):
    opbench.run(benchmark, SPEC, provider, mode, cases.OP_SHAPE, bench_device)


@pytest.mark.bench_priority(4)
@pytest.mark.parametrize("batch", cases.OP_SWEEP_BATCHES)
@pytest.mark.parametrize("provider", ["auto", "eager"])
def test_patch_embed_sweep(benchmark, bench_device, provider, batch):
    opbench.run(benchmark, SPEC, provider, "fwd+bwd", cases.OP_SHAPE.with_batch(batch), bench_device, sweep=True)
