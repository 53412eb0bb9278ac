"""One LegoBrick, forward and forward + backward, under bf16 autocast: the op shape's brick (4 x 4 patches, l = 2,
S = 4, d = 1152, 16 heads, with a previous brick's output) with BRICK_DEPTH DiT blocks.

Providers: "auto" (the fused kernels lego_kernels picks), "torch" (every op on its PyTorch reference), and
torch.compile of each ("auto+compile": inductor fuses what is left around the fused ops, such as the GELU and the
biases). FLOPs from benchmarks.counts.brick_flops; training = 3 x forward.
"""

import pytest
import torch

from benchmarks import cases, counts, harness
from benchmarks.opbench import op_module
from lego import LegoBrick
from lego_kernels._dispatch import resolve_backend

PRIORITY = 3

OP_FILES = {
    "patch_embed": "patch_embed",
    "short_attention": "short_attention",
    "adaln_modulate": "adaln",
    "gated_residual_adaln": "adaln",
    "patch_unembed": "patch_unembed",
}
PROVIDERS = [
    pytest.param("auto", id="auto"),
    pytest.param("torch", id="torch"),
    pytest.param("auto+compile", id="auto+compile", marks=pytest.mark.bench_priority(6)),
    pytest.param("torch+compile", id="torch+compile", marks=pytest.mark.bench_priority(6)),
]


@pytest.mark.parametrize("mode", cases.OP_MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_brick(benchmark, bench_device, provider, mode):
    s, dev, depth = cases.OP_SHAPE, bench_device, cases.BRICK_DEPTH
    backend = provider.removesuffix("+compile")
    with torch.device(dev):
        brick = LegoBrick(s.brick, s.field, s.hidden, depth, s.heads, in_channels=s.channels, has_prev=s.has_prev,
                          backend=backend)  # fmt: skip
        for p in brick.parameters():  # adaLN-Zero starts at zero; random weights so every path does real work
            torch.nn.init.normal_(p, std=0.02)
    brick.to(dev)
    x = torch.randn(s.batch, s.channels, s.height, s.width, device=dev)  # (B, C, H, W)
    prev = torch.randn(s.batch, s.channels, s.height, s.width, device=dev, requires_grad=mode != "fwd")
    cond = torch.randn(s.batch, s.hidden, device=dev, requires_grad=mode != "fwd")  # (B, d)
    run = harness.compiled(brick, fullgraph=False) if provider.endswith("+compile") else brick
    grads: list = []

    def call():
        with harness.autocast(dev):
            if mode == "fwd":
                with torch.no_grad():
                    run(x, prev, cond)
                return
            out = run(x, prev, cond)  # (B, C, H, W)
        if not grads:
            grads.append(torch.randn_like(out))
        out.backward(grads[0])
        brick.zero_grad(set_to_none=True)
        prev.grad = cond.grad = None

    timing = harness.measure(benchmark, call, harness.BRICK, dev)
    fwd = sum(
        counts.brick_flops(
            s.brick, s.field, s.hidden, depth, s.channels, s.has_prev, s.batch, s.height, s.width
        ).values()
    )
    resolved = {op: resolve_backend(backend, dev, op, op_module(f)._IMPLEMENTED) for op, f in OP_FILES.items()}
    harness.record(
        benchmark, kind="brick", provider=provider, mode=mode, batch=s.batch, depth=depth, shape=s.as_dict(),
        flops=fwd * (1 if mode == "fwd" else 3), images=s.batch, timing=timing, backends=resolved,
        amp_dtype=harness.amp_dtype(dev),
    )  # fmt: skip
