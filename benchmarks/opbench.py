"""One runner for the five fused-op suites (bench_<op>.py): providers, inputs, timing and the record.

Providers of an op:
    "cuda", "triton"  the fused kernels through the public op (backend=...), each one the op implements; one that is
                      not available on this device (no GPU, extension not built, triton missing) is skipped with the
                      reason lego_kernels gives, never replaced by something else
    "eager"           the plain-PyTorch reference ``<op>_ref``
    "compile"         torch.compile of that reference (inductor on a GPU)
    "auto"            (sweeps) what backend="auto" picks; skipped where that is the reference itself
plus op-specific extras (short_attention: "sdpa", the backend="torch" path, PyTorch's scaled_dot_product_attention).

Modes: "fwd" (no autograd: sampling) and "fwd+bwd" (the forward, then torch.autograd.grad of every input a training
step needs, against a fixed random upstream gradient).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from benchmarks import counts, harness
from lego_kernels._dispatch import resolve_backend

FUSED = ("cuda", "triton")


@dataclass
class OpSpec:
    name: str
    fused: Callable  # the public op, called with backend=...
    reference: Callable  # <op>_ref
    module: str  # the file in lego_kernels that defines it ("adaln" for both adaLN ops)
    make_inputs: Callable  # (OpShape, device) -> (args, indices of the args that get gradients)
    extras: dict[str, Callable] = field(default_factory=dict)  # more providers, each called like the reference

    @property
    def implemented(self) -> tuple[str, ...]:
        """Backends besides torch that the op's file implements (its _IMPLEMENTED)."""
        return op_module(self.module)._IMPLEMENTED


def providers(spec: OpSpec) -> list:
    quick = pytest.mark.quick
    fused = [pytest.param(b, id=b, marks=quick) for b in FUSED if b in spec.implemented]
    extras = [pytest.param(name, id=name, marks=quick) for name in spec.extras]
    compiled = pytest.param("compile", id="compile", marks=pytest.mark.bench_priority(3))
    return [*fused, pytest.param("eager", id="eager", marks=quick), *extras, compiled]


def _callable(spec: OpSpec, provider: str, dev: torch.device) -> tuple[Callable, str]:
    """(function, concrete backend) for a provider; skips a fused backend this device cannot run."""
    if provider in (*FUSED, "auto"):
        try:
            backend = resolve_backend(provider, dev, spec.name, spec.implemented)
        except ValueError as e:
            pytest.skip(str(e))
        if provider == "auto" and backend == "torch":
            pytest.skip(f"{spec.name}: backend='auto' runs the PyTorch reference on {dev}; no fused backend to sweep")

        def fused(*args):
            return spec.fused(*args, backend=provider)

        return fused, backend
    if provider == "eager":
        return spec.reference, "torch"
    if provider == "compile":
        return harness.compiled(spec.reference), f"torch.compile[{harness.compile_backend()}]"
    if provider in spec.extras:
        return spec.extras[provider], provider
    raise ValueError(f"unknown provider {provider!r}")


def run(
    benchmark,
    spec: OpSpec,
    provider: str,
    mode: str,
    shape: counts.OpShape,
    dev: torch.device,
    sweep=False,
    brick_shape: str | None = None,
):
    """Time one op row; ``brick_shape`` names a row of cases.BRICK_SHAPES (reported in a table of its own)."""
    fn, backend = _callable(spec, provider, dev)
    args, grad_index = spec.make_inputs(shape, dev)

    if mode == "fwd":

        def call():
            with torch.no_grad():
                fn(*args)

    elif mode == "fwd+bwd":
        args = [a.requires_grad_() if i in grad_index else a for i, a in enumerate(args)]
        inputs = [args[i] for i in grad_index]
        grads_out: list = []

        def call():
            outs = fn(*args)
            outs = outs if isinstance(outs, tuple) else (outs,)
            if not grads_out:
                grads_out.extend(torch.randn_like(o) for o in outs)
            torch.autograd.grad(outs, inputs, grads_out)

    else:
        raise ValueError(f"unknown mode {mode!r}")

    try:
        call()  # the first call: a fused backend that is present but cannot run here is skipped, with its reason
    except (ImportError, NotImplementedError) as e:
        if provider not in (*FUSED, "auto"):
            raise
        pytest.skip(f"{spec.name}: backend {backend!r} is not usable here: {type(e).__name__}: {e}")
    timing = harness.measure(benchmark, call, harness.OPS, dev)
    cost = counts.op_cost(spec.name, shape, mode)
    return harness.record(
        benchmark, kind="op", op=spec.name, provider=provider, backend=backend, mode=mode, sweep=sweep,
        brick_shape=brick_shape,
        batch=shape.batch, shape=shape.as_dict(), flops=cost.flops, bytes=cost.bytes, timing=timing,
    )  # fmt: skip


def op_module(name: str):
    """The module lego_kernels.<name> (the package's attribute of that name is the public function, not the file)."""
    return importlib.import_module(f"lego_kernels.{name}")


def randn(*shape, dev, dtype, scale=1.0):
    return torch.randn(*shape, device=dev, dtype=torch.float32).mul_(scale).to(dtype)
