"""short_attention: multi-head attention over N sequences of S = 4 tokens, qkv [N, S, 3d] -> o [N, S, d].

Besides the fused kernels, the reference (eager and compiled): "sdpa" is the backend="torch" path, PyTorch's
scaled_dot_product_attention on [N, H, S, d_head] views, the baseline of the short_attention / SDPA ratio.
"""

import pytest

import lego_kernels as lk
from benchmarks import cases, opbench

PRIORITY = 0


def make_inputs(s, dev):
    qkv = opbench.randn(s.num_seq, s.seq_len, 3 * s.hidden, dev=dev, dtype=s.dtype)  # (N, S, 3d)
    return [qkv, s.heads], (0,)


def sdpa(qkv, num_heads):
    return lk.short_attention(qkv, num_heads, backend="torch")


SPEC = opbench.OpSpec(
    "short_attention", lk.short_attention, lk.short_attention_ref, "short_attention", make_inputs,
    extras={"sdpa": sdpa},
)  # fmt: skip


@pytest.mark.parametrize("mode", cases.OP_MODES)
@pytest.mark.parametrize("provider", opbench.providers(SPEC))
def test_short_attention(benchmark, bench_device, provider, mode):
    opbench.run(benchmark, SPEC, provider, mode, cases.OP_SHAPE, bench_device)


@pytest.mark.bench_priority(4)
@pytest.mark.parametrize("batch", cases.OP_SWEEP_BATCHES)
@pytest.mark.parametrize("provider", ["auto", "eager", "sdpa"])
def test_short_attention_sweep(benchmark, bench_device, provider, batch):
    opbench.run(benchmark, SPEC, provider, "fwd+bwd", cases.OP_SHAPE.with_batch(batch), bench_device, sweep=True)
