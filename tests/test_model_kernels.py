"""The model on the fused kernels: same numbers as the reference path, no unfused PyTorch ops left on a brick's path,
and torch.compile(fullgraph=True) without graph breaks. On the CPU the Triton kernels run in Triton's interpreter."""

import copy

import pytest
import torch
from conftest import DEVICES

from lego import LegoModel
from lego.networks.interface import PatchDraw

FUSED = "cuda" if torch.cuda.is_available() else "triton"
# Ops the fused kernels replace: patchify/concat (unfold, im2col, cat), LayerNorm, and the un-patchify copy.
UNFUSED = (
    "aten::unfold",
    "aten::im2col",
    "aten::cat",
    "aten::layer_norm",
    "aten::native_layer_norm",
    "aten::convolution",
    "aten::index_put",
    "aten::index_put_",
)


def _models(device, backend="triton", **kw):
    torch.manual_seed(0)
    ref = LegoModel.from_name(
        "LEGO-T-PG-16", in_channels=2, num_classes=3, hidden_size=32, num_heads=2, backend="torch", **kw
    ).to(device)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)  # no zero-initialized paths
    fused = copy.deepcopy(ref)
    for m in fused.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return ref, fused


def _loss(model, x, sigma, y):
    d = model(x, sigma, y)
    return (d * torch.linspace(-1, 1, d.numel(), device=d.device).view_as(d)).sum()


@pytest.mark.parametrize("device", DEVICES)
def test_triton_model_matches_the_reference(device):
    ref, fused = _models(device)
    x = torch.randn(3, 2, 16, 32, device=device)
    sigma, y = torch.tensor([0.2, 1.0, 5.0], device=device), torch.tensor([0, 2, 1], device=device)
    torch.testing.assert_close(fused(x, sigma, y), ref(x, sigma, y), atol=2e-4, rtol=2e-4)
    _loss(ref, x, sigma, y).backward()
    _loss(fused, x, sigma, y).backward()
    for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=5e-4, rtol=5e-3, msg=f"gradient of {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_patch_sampling_on_the_fused_path(device):
    """Training's partial patches and fill go through the kernels too."""
    ref, fused = _models(device)
    x = torch.randn(2, 2, 16, 16, device=device)
    fill = torch.randn_like(x)
    outs = [
        m.net(
            x,
            m.noise_level(torch.ones(2, device=device)),
            None,
            fill=fill,
            patches=PatchDraw(0.5, torch.Generator(device).manual_seed(1)),
        )
        for m in (ref, fused)
    ]
    for a, b in zip(*outs):
        assert torch.equal(a.patch_index, b.patch_index) if a.patch_index is not None else b.patch_index is None
        torch.testing.assert_close(b.output, a.output, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_no_unfused_ops_on_a_brick_path(device):
    _, fused = _models(device, backend=FUSED if device == "cuda" else "triton")
    brick = fused.net.bricks[1]
    x = torch.randn(2, 2, 16, 16, device=device, requires_grad=True)
    prev = torch.randn_like(x, requires_grad=True)
    cond = torch.randn(2, 32, device=device)
    with torch.profiler.profile() as prof:
        out = brick(x, prev, cond)
        out.square().sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert any(n.startswith("lego::") for n in names), sorted(names)
    leftover = sorted(n for n in names if n in UNFUSED)
    assert not leftover, f"unfused ops on the brick's path: {leftover}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) traces the whole model, forward and backward, with no graph break."""
    device = DEVICES[0]
    ref, model = _models(device, backend=backend if device == "cpu" else FUSED)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    x = torch.randn(2, 2, 16, 16, device=device)
    sigma, y = torch.tensor([0.5, 2.0], device=device), torch.tensor([1, 2], device=device)
    torch.testing.assert_close(compiled(x, sigma, y), ref(x, sigma, y), atol=2e-4, rtol=2e-4)
    _loss(compiled, x, sigma, y).backward()
    _loss(ref, x, sigma, y).backward()
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=5e-4, rtol=5e-3)


def test_compile_with_inductor_on_cpu():
    """The default compiler too (it generates C++ on the CPU), on the reference path."""
    ref, model = _models("cpu", backend="torch")
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 2, 16, 16)
    torch.testing.assert_close(
        compiled(x, 1.0, torch.tensor([0, 1])), ref(x, 1.0, torch.tensor([0, 1])), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch_through_a_brick(backend):
    """A brick on an empty batch gives an empty canvas and gradients (every fused op takes zero images)."""
    from lego import LegoBrick

    brick = LegoBrick(4, 2, 32, 1, 2, in_channels=3, backend=backend)
    x = torch.randn(0, 3, 8, 12, requires_grad=True)
    out = brick(x, torch.zeros_like(x), torch.randn(0, 32))
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
