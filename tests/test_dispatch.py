"""Backend choice (lego_kernels._dispatch): the LEGO_KERNELS_BACKEND override of backend="auto"."""

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
