"""The five fused ops at every brick shape of LEGO-XL-PG-32 (S = 1, 4, 256) and LEGO-S-PG-64 (S = 4, 4, 1024),
fused ("auto") beside the eager reference; the per-op suites time one (r 4, l 2) shape with every provider."""

import pytest

from benchmarks import cases, opbench
from benchmarks.bench_adaln_modulate import SPEC as ADALN_MODULATE
from benchmarks.bench_gated_residual_adaln import SPEC as GATED_RESIDUAL_ADALN
from benchmarks.bench_patch_embed import SPEC as PATCH_EMBED
from benchmarks.bench_patch_unembed import SPEC as PATCH_UNEMBED
from benchmarks.bench_short_attention import SPEC as SHORT_ATTENTION

PRIORITY = 0
SPECS = {s.name: s for s in (PATCH_EMBED, SHORT_ATTENTION, ADALN_MODULATE, GATED_RESIDUAL_ADALN, PATCH_UNEMBED)}


@pytest.mark.quick
@pytest.mark.parametrize("mode", cases.OP_MODES)
@pytest.mark.parametrize("provider", ["auto", "eager"])
@pytest.mark.parametrize("shape", list(cases.BRICK_SHAPES))
@pytest.mark.parametrize("op", list(SPECS))
def test_op_at_brick_shape(benchmark, bench_device, op, shape, provider, mode):
    opbench.run(benchmark, SPECS[op], provider, mode, cases.BRICK_SHAPES[shape], bench_device, brick_shape=shape)
