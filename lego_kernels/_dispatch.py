"""Backend choice for the fused ops.

Every public op takes ``backend="auto" | "cuda" | "triton" | "torch"``:

- ``torch``: the plain-PyTorch reference path; runs on any device and is the ground truth.
- ``triton``: the fused Triton kernels. Needs a CUDA tensor, or ``TRITON_INTERPRET=1`` (then CPU tensors run
  through Triton's interpreter, which is how CI checks the kernels without a GPU).
- ``cuda``: the hand-written kernels of ``lego_kernels._C`` (csrc/), for the ops that have them.
- ``auto``: ``torch`` for CPU tensors; for CUDA tensors the fastest measured backend present (see
  ``AUTO_PREFERS_CUDA``).

The environment variable ``LEGO_KERNELS_BACKEND`` overrides ``auto`` (never an explicit choice).

A backend names a preference for a whole brick or model, not only for one op: an op without a kernel of the requested
backend (patch_embed and patch_unembed have no ``cuda``) takes ``auto``'s choice for it, so ``backend="cuda"`` on a
``LegoBrick`` runs the CUDA kernels where they exist and the Triton ones elsewhere, whether it comes from the argument
or from ``LEGO_KERNELS_BACKEND``. A backend that cannot run on the tensors' device at all (``cuda`` or ``triton`` for
CPU tensors without the interpreter, ``cuda`` without the built extension) is refused with a ValueError that says why.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "cuda", "triton", "torch")

# Decision table for `auto` on a GPU: an op goes to the CUDA extension only where a side-by-side measurement on a
# GPU showed it faster than its Triton kernel. Keep the numbers beside each entry (device, shape, us per call).
# Empty until such a measurement exists: no GPU run has been made yet, so `auto` uses Triton everywhere.
AUTO_PREFERS_CUDA: dict[str, str] = {}


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _import_extension():
    try:
        from lego_kernels import _C
    except ImportError:
        return None
    return _C


# Looked up once at import, so that resolving a backend inside torch.compile traces no imports or caches.
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None
_CUDA_EXTENSION = _import_extension()


def triton_importable() -> bool:
    return _TRITON_IMPORTABLE


def cuda_extension():
    """The compiled ``lego_kernels._C`` module, or None when it was not built."""
    return _CUDA_EXTENSION


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run an op on tensors of ``device``, fastest first (``torch`` always last)."""
    device = torch.device(device)
    found = []
    if device.type == "cuda" and cuda_extension() is not None:
        found.append("cuda")
    if triton_importable() and (device.type == "cuda" or interpreting()):
        found.append("triton")
    found.append("torch")
    return found


def resolve_backend(backend: str, device: torch.device, op: str, implemented: tuple[str, ...]) -> str:
    """Turn ``backend`` into the concrete backend that runs ``op`` on ``device``.

    ``implemented`` lists the backends the op has besides ``torch``. A request for a backend the device cannot run
    raises a ValueError that says why and what to do instead; a backend the device runs but the op has no kernel of
    falls back to ``auto``'s choice for the op (see the module docstring).
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = os.environ.get("LEGO_KERNELS_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"LEGO_KERNELS_BACKEND={backend!r} is not a backend; use one of {', '.join(BACKENDS)}")
        if backend not in implemented + ("torch",):
            backend = "auto"  # the op has no kernel of that backend: auto's choice for it, not a refusal
    if backend not in ("auto", "torch"):
        _check_available(backend, device, op)
        if backend not in implemented:
            backend = "auto"  # as for the environment override: the op's best kernel instead, not a refusal
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        present = available_backends(device)
        if "cuda" in implemented and "cuda" in present and AUTO_PREFERS_CUDA.get(op) == "cuda":
            return "cuda"
        if "triton" in implemented and "triton" in present:
            return "triton"
        return "torch"
    return backend


def _check_available(backend: str, device: torch.device, op: str) -> None:
    """Raise a ValueError that says why when ``backend`` cannot run on ``device`` (whatever the op)."""
    if backend in available_backends(device):
        return
    if backend == "cuda":
        why = (
            "the CUDA extension lego_kernels._C is not built (reinstall with nvcc on PATH)"
            if cuda_extension() is None
            else f"the tensors are on {device}, not on a CUDA device"
        )
    elif not triton_importable():
        why = "triton is not installed (pip install triton)"
    else:
        why = f"the tensors are on {device}; Triton needs CUDA tensors, or TRITON_INTERPRET=1 for the CPU interpreter"
    raise ValueError(f"{op}: backend {backend!r} is not available: {why}")


def device_guard(device: torch.device):
    """The context a kernel launch on ``device`` runs in: that CUDA device made current (Triton launches on the current
    device, whatever its pointers' device; a custom op sets no device guard), nothing for other devices."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def on_tensor_device(launcher):
    """Decorator for a Triton launcher: it runs under ``device_guard`` of its first tensor argument's device, as the
    CUDA path passes its tensors' device and stream, so that tensors on cuda:1 are not launched on cuda:0."""

    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        tensor = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if tensor is None:
            return launcher(*args, **kwargs)
        with device_guard(tensor.device):
            return launcher(*args, **kwargs)

    return launch


# fp32 precision. PyTorch lets fp32 matmuls and cuDNN convolutions round their inputs to TF32 (10-bit mantissa), per
# torch.backends.cuda.matmul.fp32_precision and torch.backends.cudnn.conv.fp32_precision (what
# torch.set_float32_matmul_precision and the older allow_tf32 flags set); cuDNN's default allows it. The references are
# the ground truth, so they run exact fp32 whatever those say; the Triton kernels follow the matmul setting.
_FP32_PRECISION_KNOBS = (("cuda", "matmul"), ("cudnn", "conv"), ("mkldnn", "matmul"), ("mkldnn", "conv"))


def _fp32_knobs() -> list:
    """The torch.backends objects with an ``fp32_precision`` setting that can round fp32 matmuls and convolutions."""
    knobs = []
    for backend, op in _FP32_PRECISION_KNOBS:
        knob = getattr(getattr(torch.backends, backend, None), op, None)
        if knob is not None and hasattr(knob, "fp32_precision"):
            knobs.append(knob)
    return knobs


def exact_fp32(dtype: torch.dtype = torch.float32):
    """A context in which fp32 matmuls and convolutions run in IEEE fp32, whatever the user's TF32 settings (restored
    on exit); a no-op for other dtypes, and under torch.compile (the compiled graph runs with its caller's settings).

    Set and restored through ``fp32_precision`` (PyTorch's current API: reading the legacy ``allow_tf32`` flags after
    a user set the new API raises), or through the legacy flags on a PyTorch without it."""
    if dtype != torch.float32 or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _exact_fp32()


@contextlib.contextmanager
def _exact_fp32():
    knobs = _fp32_knobs()
    if not knobs:  # a PyTorch before the fp32_precision API: its allow_tf32 flags
        knobs = [torch.backends.cudnn, torch.backends.cuda.matmul]
        saved = [knob.allow_tf32 for knob in knobs]
        try:
            for knob in knobs:
                knob.allow_tf32 = False
            yield
        finally:
            for knob, value in zip(knobs, saved):
                knob.allow_tf32 = value
        return
    saved = [knob.fp32_precision for knob in knobs]
    try:
        for knob in knobs:
            knob.fp32_precision = "ieee"
        yield
    finally:
        for knob, value in zip(knobs, saved):
            knob.fp32_precision = value


def fp32_dot_precision() -> str:
    """``tl.dot``'s input_precision for fp32 operands: "tf32" where PyTorch's fp32 matmul setting allows TF32
    (``torch.set_float32_matmul_precision("high")`` or ``"medium"``, ``torch.backends.cuda.matmul.allow_tf32 = True``
    or ``fp32_precision = "tf32"``), "ieee" otherwise (PyTorch's default)."""
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if matmul is None:  # a PyTorch before the fp32_precision API
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    if matmul == "none":  # not set for matmuls: the global setting
        matmul = getattr(torch.backends, "fp32_precision", "none")
    return "tf32" if matmul in ("tf32", "bf16") else "ieee"


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for a kernel's output; NaN-filled when ``LEGO_KERNELS_POISON=1``.

    The tests set that variable so that an element a kernel forgets to write fails the comparison instead of passing
    on whatever the allocator left there.
    """
    if os.environ.get("LEGO_KERNELS_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
