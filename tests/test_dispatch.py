"""Backend choice (lego_kernels._dispatch): the LEGO_KERNELS_BACKEND override of backend="auto"."""

import importlib

import pytest
import torch

from lego_kernels import _dispatch, patch_embed, patch_embed_ref


def test_env_override_applies_to_auto_only(monkeypatch):
    monkeypatch.setenv("LEGO_KERNELS_BACKEND", "triton")
    cpu = torch.device("cpu")
    assert _dispatch.resolve_backend("auto", cpu, "adaln_modulate", ("cuda", "triton")) == "triton"  # interpreter
    assert _dispatch.resolve_backend("torch", cpu, "adaln_modulate", ("cuda", "triton")) == "torch"


def test_env_override_falls_back_where_the_op_has_no_such_kernel(monkeypatch):
    """LEGO_KERNELS_BACKEND=cuda runs the CUDA kernels where they exist; patch_embed and patch_unembed have none, so
    they take auto's choice instead of refusing to run (which stopped a whole model, or a benchmark of one)."""
    monkeypatch.setenv("LEGO_KERNELS_BACKEND", "cuda")
    monkeypatch.setattr(_dispatch, "available_backends", lambda device: ["cuda", "triton", "torch"])
    cuda = torch.device("cuda")
    assert _dispatch.resolve_backend("auto", cuda, "short_attention", ("cuda", "triton")) == "cuda"
    assert _dispatch.resolve_backend("auto", cuda, "patch_embed", ("triton",)) == "triton"
    monkeypatch.undo()
    monkeypatch.setenv("LEGO_KERNELS_BACKEND", "cuda")
    x, weight, bias, pos = torch.randn(2, 3, 8, 8), torch.randn(16, 5, 2, 2), torch.randn(16), torch.randn(4, 16)
    assert torch.equal(patch_embed(x, None, weight, bias, pos, 4, 2), patch_embed_ref(x, None, weight, bias, pos, 4, 2))


def test_explicit_backend_falls_back_where_the_op_has_no_such_kernel(monkeypatch):
    """backend="cuda" on a brick reaches every op of it: the ops with a CUDA kernel run it, patch_embed and
    patch_unembed (none) take auto's choice, as LEGO_KERNELS_BACKEND=cuda does. It used to refuse, so
    LegoModel.from_name(..., backend="cuda") failed at its first forward on a GPU."""
    monkeypatch.setattr(_dispatch, "available_backends", lambda device: ["cuda", "triton", "torch"])
    cuda = torch.device("cuda")
    chosen = {
        op: _dispatch.resolve_backend("cuda", cuda, op, importlib.import_module(f"lego_kernels.{module}")._IMPLEMENTED)
        for op, module in [("patch_embed", "patch_embed"), ("short_attention", "short_attention"),
                           ("adaln_modulate", "adaln"), ("gated_residual_adaln", "adaln"),
                           ("patch_unembed", "patch_unembed")]
    }  # fmt: skip
    assert chosen == {"patch_embed": "triton", "short_attention": "cuda", "adaln_modulate": "cuda",
                      "gated_residual_adaln": "cuda", "patch_unembed": "triton"}  # fmt: skip
    assert _dispatch.resolve_backend("triton", cuda, "patch_embed", ("triton",)) == "triton"


def test_explicit_backend_the_device_cannot_run_is_refused(monkeypatch):
    """The fall-back is per op, not per device: a backend the tensors' device cannot run at all is still an error that
    says why, for the ops that lack it too."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu = torch.device("cpu")
    for op, implemented in [("patch_embed", ("triton",)), ("short_attention", ("cuda", "triton"))]:
        for backend in ("cuda", "triton"):
            try:
                _dispatch.resolve_backend(backend, cpu, op, implemented)
            except ValueError as e:
                assert f"{op}: backend {backend!r} is not available" in str(e)
            else:
                raise AssertionError(f"{op}: backend {backend!r} on the CPU was not refused")
    monkeypatch.setattr(_dispatch, "_CUDA_EXTENSION", None)
    with pytest.raises(ValueError, match="lego_kernels._C is not built"):
        _dispatch.resolve_backend("cuda", torch.device("cuda"), "patch_embed", ("triton",))
