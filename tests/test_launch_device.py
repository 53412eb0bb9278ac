"""Every Triton launch runs under its tensors' device (issue #20).

Triton launches a kernel on the CURRENT CUDA device, and a torch.library custom op sets no device guard: tensors on
cuda:1 with cuda:0 current would run on GPU 0 with GPU 1's pointers. Each Triton launcher therefore runs under
``lego_kernels._dispatch.device_guard(tensor.device)``. The CPU test records, at each launch, the device of the guard
around it and the devices of the launch's tensors (as benchmarks/static.py records launches), for every op forward and
backward; on a GPU it also checks the current CUDA device, and with two GPUs runs the ops on the second one.
"""

import contextlib
import importlib

import pytest
import torch
from conftest import DEVICES

import lego_kernels
from lego_kernels import _dispatch


def _kernel_class():
    return type(importlib.import_module("lego_kernels.adaln")._adaln_fwd_kernel)


def _every_op(device, dtype=torch.float32):
    """Each public op, forward and backward, on tiny shapes, through the Triton backend."""
    kw = {"device": device, "dtype": dtype}
    x = torch.randn(2, 2, 8, 8, **kw, requires_grad=True)
    prev = torch.randn(2, 2, 8, 8, **kw, requires_grad=True)
    weight = torch.randn(16, 6, 2, 2, **kw, requires_grad=True)
    pos = torch.randn(4, 16, **kw, requires_grad=True)
    index = torch.tensor([[3, 0], [1, 2]], device=device)
    tok = lego_kernels.patch_embed(x, prev, weight, None, pos, 4, 2, index, backend="triton")  # (4, 4, 16)
    tok.square().sum().backward()
    lego_kernels.patch_embed(x, prev, weight, None, pos, 4, 2, backend="triton").sum().backward()

    qkv = torch.randn(5, 4, 48, **kw, requires_grad=True)
    lego_kernels.short_attention(qkv, 2, backend="triton").square().sum().backward()

    h = torch.randn(4, 4, 16, **kw, requires_grad=True)
    y = torch.randn_like(h, requires_grad=True)
    shift, scale, gate = (torch.randn(2, 16, **kw, requires_grad=True) for _ in range(3))
    lego_kernels.adaln_modulate(h, shift, scale, backend="triton").square().sum().backward()
    x_out, hn = lego_kernels.gated_residual_adaln(h, y, gate, shift, scale, backend="triton")
    (x_out.square().sum() + hn.square().sum()).backward()
    lego_kernels.gated_residual_adaln(h, y, gate, backend="triton").square().sum().backward()

    tokens = torch.randn(4, 4, 8, **kw, requires_grad=True)
    fill = torch.randn(2, 2, 8, 8, **kw, requires_grad=True)
    canvas = lego_kernels.patch_unembed(tokens, 4, 2, 2, 8, 8, index, fill, backend="triton")
    canvas.square().sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_every_triton_launch_runs_under_its_tensors_device(device, monkeypatch):
    guards, launches = [], []
    real_guard = getattr(_dispatch, "device_guard", None)

    @contextlib.contextmanager
    def recording_guard(dev):
        guards.append(torch.device(dev))
        try:
            with real_guard(dev):
                yield
        finally:
            guards.pop()

    kernel_class = _kernel_class()
    real_run = kernel_class.run

    def recording_run(self, *args, **kwargs):
        devices = {a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
        current = torch.cuda.current_device() if torch.cuda.is_available() else None
        launches.append((getattr(self, "__name__", repr(self)), devices, guards[-1] if guards else None, current))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(_dispatch, "device_guard", recording_guard, raising=False)
    monkeypatch.setattr(kernel_class, "run", recording_run)
    _every_op(device)

    names = {name for name, *_ in launches}
    assert len(names) >= 8, sorted(names)  # every op's forward and backward kernels launched
    for name, devices, guard, current in launches:
        assert len(devices) == 1, f"{name}: tensors on {devices}"
        (dev,) = devices
        assert guard == dev, f"{name}: launched under the device guard {guard} with tensors on {dev}"
        if dev.type == "cuda":
            assert current == dev.index, f"{name}: launched on cuda:{current} with tensors on {dev}"


@pytest.mark.cuda
def test_ops_on_a_device_that_is_not_current():
    """Tensors on cuda:1 while cuda:0 is current: every op runs on cuda:1 (before the guard: GPU 0 with GPU 1's
    pointers, an illegal memory access or wrong numbers)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.cuda.set_device(0)
    qkv = torch.randn(7, 4, 48, device="cuda:1")
    torch.testing.assert_close(lego_kernels.short_attention(qkv, 2, backend="triton"),
                               lego_kernels.short_attention_ref(qkv, 2), atol=1e-5, rtol=1e-5)  # fmt: skip
    _every_op("cuda:1")
    torch.cuda.synchronize(1)
