"""fp32 precision (issue #20): the references stay exact fp32 whatever the user's TF32 settings, and the Triton fp32
dots follow PyTorch's fp32 matmul setting (TF32 where the user allowed it, IEEE otherwise).

On Hopper cuDNN runs fp32 convolutions in TF32 by default (torch.backends.cudnn.conv.fp32_precision is "tf32"), so
patch_embed_ref's conv2d was not an fp32 ground truth there. Without a GPU the tests record the settings in force at
each matmul and convolution of the references (a TorchFunctionMode) and the DOT_PRECISION of each Triton launch.
"""

import importlib

import pytest
import torch
from conftest import DEVICES
from torch.overrides import TorchFunctionMode

import lego_kernels

_KNOBS = [("cuda", "matmul"), ("cudnn", "conv"), ("mkldnn", "matmul"), ("mkldnn", "conv")]


def _knob(backend, op):
    return getattr(getattr(torch.backends, backend), op)


def _settings():
    return {f"{b}.{o}": _knob(b, o).fp32_precision for b, o in _KNOBS}


@pytest.fixture
def restore_precision():
    """Put every fp32 setting back after the test: through the current API, then the legacy one (a legacy setting
    left beside a restored current one reads as a mix, which PyTorch refuses)."""
    saved, matmul, cudnn = _settings(), torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    for (backend, op), value in zip(_KNOBS, saved.values()):
        _knob(backend, op).fp32_precision = value
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn


def _allow_tf32(api):
    if api == "fp32_precision":
        for backend, op in _KNOBS:
            _knob(backend, op).fp32_precision = "tf32"
    else:  # what most code does: the legacy flags
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")


class _RecordSettings(TorchFunctionMode):
    """Records the fp32 settings in force at each matmul and convolution."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if any(op in name for op in ("conv", "matmul", "bmm", "mm", "linear")):
            self.seen.append((name, _settings()))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("api", ["fp32_precision", "legacy"])
def test_fp32_references_stay_fp32_with_tf32_allowed(api, restore_precision):
    _allow_tf32(api)
    before = _settings()
    assert before["cudnn.conv"] == "tf32" and before["cuda.matmul"] == "tf32"
    x, prev = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    weight, bias, pos = torch.randn(16, 8, 2, 2), torch.randn(16), torch.randn(4, 16)
    qkv = torch.randn(3, 4, 48)
    with _RecordSettings() as record:
        lego_kernels.patch_embed_ref(x, prev, weight, bias, pos, 4, 2)
        lego_kernels.short_attention_ref(qkv, 2)
        lego_kernels.patch_embed(x, prev, weight, bias, pos, 4, 2, backend="torch")
    names = [name for name, _ in record.seen]
    assert any("conv2d" in n for n in names) and any("matmul" in n for n in names), names
    for name, settings in record.seen:
        assert set(settings.values()) == {"ieee"}, f"{name} ran with {settings}"
    assert _settings() == before  # the user's settings are back, readable through either API
    if api == "legacy":
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32


def test_16_bit_references_leave_the_settings_alone(restore_precision):
    _allow_tf32("fp32_precision")
    x = torch.randn(2, 2, 8, 8, dtype=torch.bfloat16)
    weight, pos = torch.randn(16, 4, 2, 2, dtype=torch.bfloat16), torch.randn(4, 16, dtype=torch.bfloat16)
    with _RecordSettings() as record:
        lego_kernels.patch_embed_ref(x, None, weight, None, pos, 4, 2)
    assert [settings["cudnn.conv"] for _, settings in record.seen] == ["tf32"]


def _dot_precisions(device, monkeypatch, dtype=torch.float32):
    """DOT_PRECISION of every patch_embed kernel launch, forward and backward (fused and two-pass)."""
    module = importlib.import_module("lego_kernels.patch_embed")
    kernel_class = type(module._patch_embed_fwd_kernel)
    real_run, seen = kernel_class.run, []

    def run(self, *args, **kwargs):
        if "DOT_PRECISION" in kwargs:
            seen.append((self.__name__, kwargs["DOT_PRECISION"]))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(kernel_class, "run", run)
    kw = {"device": device, "dtype": dtype}
    x = torch.randn(2, 2, 8, 8, **kw, requires_grad=True)
    weight = torch.randn(16, 4, 2, 2, **kw, requires_grad=True)
    pos = torch.randn(4, 16, **kw, requires_grad=True)
    for deterministic in (False, True):  # the fused backward, then the two-pass one
        torch.use_deterministic_algorithms(deterministic)
        try:
            lego_kernels.patch_embed(x, None, weight, None, pos, 4, 2, backend="triton").square().sum().backward()
        finally:
            torch.use_deterministic_algorithms(False)
    lego_kernels.patch_embed(x.detach(), None, weight, None, pos, 4, 2, backend="triton").sum().backward()
    monkeypatch.undo()
    names = {name for name, _ in seen}
    assert len(names) >= 3, names
    return {precision for _, precision in seen}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("setting", ["default", "high", "fp32_precision", "highest"])
def test_triton_fp32_dots_follow_the_torch_matmul_setting(device, setting, monkeypatch, restore_precision):
    if setting == "high":
        torch.set_float32_matmul_precision("high")
    elif setting == "fp32_precision":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    elif setting == "highest":
        torch.backends.cudnn.conv.fp32_precision = "tf32"  # a convolution setting: not the matmuls'
        torch.set_float32_matmul_precision("highest")
    expected = "tf32" if setting in ("high", "fp32_precision") else "ieee"
    assert _dot_precisions(device, monkeypatch) == {expected}
