"""patch_unembed: the Triton canvas scatter (forward) and gather (backward) against the reference.

A pure data movement: the kernel must match the reference exactly (atol 0), in every dtype."""

import importlib

import pytest
import torch
from conftest import DEVICES, assert_close_to_reference, compile_for_gpu

from lego_kernels import patch_unembed, patch_unembed_ref

pu = importlib.import_module("lego_kernels.patch_unembed")  # the module (the package exports the function by that name)

# (B, C, H, W, brick r, field l): non-square canvases.
CASES = [
    (3, 4, 8, 12, 4, 2),  # XL's latent brick (S = 4)
    (3, 3, 12, 20, 4, 4),  # S = 1
    (2, 3, 16, 8, 8, 4),  # brick 8, field 4
    (3, 1, 16, 32, 16, 8),  # C = 1, field 8
    (2, 2, 1, 5, 1, 1),  # one-pixel bricks on a one-row canvas
]


def _random_subset(b, num_patches, fraction, dtype, device):
    """[B, P] distinct patch ids per image, a random subset in random order."""
    p = max(1, round(num_patches * fraction))
    return torch.stack([torch.randperm(num_patches)[:p] for _ in range(b)]).to(device=device, dtype=dtype)


def _check(tokens, r, l, c, h, w, patch_index, fill, atol=0.0, backend="triton"):
    """Forward and the gradients of tokens and fill against the fp64 reference (plain PyTorch in the same dtype as the
    yardstick), with a random upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (tokens, fill)]
    same = [t.detach().clone().requires_grad_() if t is not None else None for t in (tokens, fill)]
    fp64 = [t.detach().double().requires_grad_() if t is not None else None for t in (tokens, fill)]
    out = patch_unembed(leaves[0], r, l, c, h, w, patch_index, leaves[1], backend=backend)
    out_torch = patch_unembed_ref(same[0], r, l, c, h, w, patch_index, same[1])
    out_fp64 = patch_unembed_ref(fp64[0], r, l, c, h, w, patch_index, fp64[1])
    assert_close_to_reference(out, out_torch, out_fp64, atol, "canvas")
    grad = torch.randn_like(out)
    out.backward(grad)
    out_torch.backward(grad)
    out_fp64.backward(grad.double())
    for name, a, b, f in zip(["dtokens", "dfill"], leaves, same, fp64):
        if a is not None:
            assert_close_to_reference(a.grad, b.grad, f.grad, atol, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["all-patches", "patch-index", "patch-index-fill"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-C{}-{}x{}-r{}-l{}".format(*c))
@pytest.mark.parametrize("device", DEVICES)
def test_patch_unembed_matches_reference(device, case, mode, dtype):
    b, c, h, w, r, l = case
    num_patches = (h // r) * (w // r)
    patch_index, fill = None, None
    if mode != "all-patches":
        index_dtype = torch.int32 if dtype == torch.float16 else torch.int64  # both index dtypes run
        patch_index = _random_subset(b, num_patches, 2 / 3, index_dtype, device)
    if mode == "patch-index-fill":
        fill = torch.randn(b, c, h, w, dtype=dtype, device=device)
    n = patch_index.numel() if patch_index is not None else b * num_patches
    tokens = torch.randn(n, (r // l) ** 2, l * l * c, dtype=dtype, device=device)
    _check(tokens, r, l, c, h, w, patch_index, fill)


@pytest.mark.parametrize("device", DEVICES)
def test_patch_unembed_every_patch_listed(device):
    """patch_index listing every patch in a shuffled order: nothing comes from fill, and fill gets no gradient."""
    patch_index = _random_subset(2, 6, 1.0, torch.int64, device)
    tokens = torch.randn(12, 4, 16, device=device)
    _check(tokens, 4, 2, 4, 8, 12, patch_index, torch.randn(2, 4, 8, 12, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_patch_unembed_fill_without_grad(device):
    """fill that does not require grad: only dtokens is computed."""
    patch_index = _random_subset(2, 6, 0.5, torch.int64, device)
    tokens = torch.randn(6, 4, 16, device=device, requires_grad=True)
    fill = torch.randn(2, 4, 8, 12, device=device)
    out = patch_unembed(tokens, 4, 2, 4, 8, 12, patch_index, fill, backend="triton")
    torch.testing.assert_close(
        out, patch_unembed_ref(tokens.detach(), 4, 2, 4, 8, 12, patch_index, fill), rtol=0, atol=0
    )
    grad = torch.randn_like(out)
    out.backward(grad)
    ref = tokens.detach().clone().requires_grad_()
    patch_unembed_ref(ref, 4, 2, 4, 8, 12, patch_index, fill).backward(grad)
    torch.testing.assert_close(tokens.grad, ref.grad, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_patch_unembed_torch_compile(device):
    """The custom ops trace without graph breaks (fake impls, registered autograd), for both backends."""
    patch_index = _random_subset(2, 6, 0.5, torch.int64, device)
    tokens, fill = torch.randn(6, 4, 16, device=device), torch.randn(2, 4, 8, 12, device=device)
    for backend in ("triton", "torch"):
        torch._dynamo.reset()

        def step(tokens, patch_index, fill, backend=backend):
            return patch_unembed(tokens, 4, 2, 4, 8, 12, patch_index, fill, backend=backend).square().sum()

        eager = [t.clone().requires_grad_() for t in (tokens, fill)]
        compiled = [t.clone().requires_grad_() for t in (tokens, fill)]
        step(eager[0], patch_index, eager[1]).backward()
        torch.compile(step, backend="aot_eager", fullgraph=True)(compiled[0], patch_index, compiled[1]).backward()
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(b.grad, a.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_patch_unembed_opcheck(device):
    patch_index = _random_subset(2, 6, 0.5, torch.int64, device)
    tokens = torch.randn(6, 4, 16, device=device, requires_grad=True)
    fill = torch.randn(2, 4, 8, 12, device=device, requires_grad=True)
    torch.library.opcheck(pu._patch_unembed_fwd_op, (tokens, patch_index, fill, 4, 2, 4, 8, 12))
    torch.library.opcheck(pu._patch_unembed_fwd_op, (torch.randn(12, 4, 16, device=device), None, None, 4, 2, 4, 8, 12))
    dcanvas = torch.randn(2, 4, 8, 12, device=device)  # the backward op has no double backward: no grads here
    torch.library.opcheck(pu._patch_unembed_bwd_op, (dcanvas, patch_index, 4, 2, True))


def test_patch_unembed_torch_and_auto_on_cpu_are_the_reference():
    patch_index = _random_subset(2, 6, 0.5, torch.int64, "cpu")
    tokens, fill = torch.randn(6, 4, 16), torch.randn(2, 4, 8, 12)
    ref = patch_unembed_ref(tokens, 4, 2, 4, 8, 12, patch_index, fill)
    assert torch.equal(patch_unembed(tokens, 4, 2, 4, 8, 12, patch_index, fill, backend="torch"), ref)
    assert torch.equal(patch_unembed(tokens, 4, 2, 4, 8, 12, patch_index, fill, backend="auto"), ref)


def test_patch_unembed_bad_shapes_and_backends(monkeypatch):
    tokens = torch.randn(12, 4, 16)
    with pytest.raises(ValueError, match="tokens have shape"):
        patch_unembed(tokens, 4, 2, 3, 8, 12, backend="triton")  # 16 = 2*2*4 values per token, not 3 channels
    with pytest.raises(ValueError, match="not a whole number"):
        patch_unembed(tokens[:7], 4, 2, 4, 8, 12, backend="triton")
    with pytest.raises(ValueError, match="the canvas 0x12 has no pixels"):
        patch_unembed(tokens[:0], 4, 2, 4, 0, 12)
    with pytest.raises(ValueError, match="fill is only used with patch_index"):
        patch_unembed(tokens, 4, 2, 4, 8, 12, fill=torch.randn(2, 4, 8, 12), backend="triton")
    with pytest.raises(ValueError, match="backend 'cuda' is not available"):
        patch_unembed(tokens, 4, 2, 4, 8, 12, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend 'triton' is not available"):
        patch_unembed(tokens, 4, 2, 4, 8, 12, backend="triton")


def _compile_spec(kernel, dtype):
    t = f"*{dtype}"
    if kernel == "fwd":
        fn, ptrs = pu._patch_unembed_fwd_kernel, {"TOKENS": t, "INV": "*i32", "FILL": t, "OUT": t}
    else:
        fn, ptrs = pu._patch_unembed_bwd_kernel, {"DCANVAS": t, "INV": "*i32", "DTOKENS": t, "DFILL": t}
    constexprs = {"T": 2, "L": 2, "HAS_INDEX": True, "HAS_FILL": True, "BLOCK": pu._block(32, 32)}
    sig = {name: ptrs.get(name) or ("constexpr" if name in constexprs else "i32") for name in fn.arg_names}
    return fn, sig, constexprs


def test_patch_unembed_kernels_compile():
    """Forward and backward in every dtype for sm_80 and sm_90, in one child process."""
    pytest.importorskip("triton")
    specs = [_compile_spec(kernel, dtype) for kernel in ("fwd", "bwd") for dtype in ("fp32", "fp16", "bf16")]
    compile_for_gpu(*specs, capabilities=(80, 90))


# ----------------------------------------------------------------------------------------------------------------------
# GPU: XL's latent canvas at training size (B = 256, 32x32x4, brick 4, field 2).


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["all-patches", "patch-index-fill"])
def test_patch_unembed_xl_on_gpu(mode, dtype):
    b, c, h, w, r, l = 256, 4, 32, 32, 4, 2
    patch_index = _random_subset(b, 64, 0.75, torch.int64, "cuda") if mode != "all-patches" else None
    fill = torch.randn(b, c, h, w, dtype=dtype, device="cuda") if patch_index is not None else None
    n = patch_index.numel() if patch_index is not None else b * 64
    _check(torch.randn(n, 4, l * l * c, dtype=dtype, device="cuda"), r, l, c, h, w, patch_index, fill)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("indexed", [False, True], ids=["all-patches", "patch-index"])
def test_patch_unembed_empty_batch(backend, indexed):
    """No images: an empty canvas and gradient on every backend, not a reshape error."""
    tokens = torch.randn(0, 4, 16, requires_grad=True)
    patch_index = torch.zeros(0, 3, dtype=torch.long) if indexed else None
    out = patch_unembed(tokens, 4, 2, 4, 8, 12, patch_index, backend=backend)
    assert out.shape == (0, 4, 8, 12)
    out.sum().backward()
    assert tokens.grad.shape == tokens.shape


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patch_unembed_bad_patch_ids(backend):
    """Patch ids outside 0..P_all-1 or repeated within an image are refused on every backend (the Triton kernel would
    write image 0's id 6 into image 1's patch 0, and leave a repeated id's other tokens without a gradient)."""
    tokens = torch.randn(4, 4, 16)
    for ids, match in [([[0, 6], [1, 2]], "patch_index holds 6, outside 0..5"),
                       ([[0, -1], [1, 2]], "patch_index holds -1, outside 0..5"),
                       ([[3, 3], [1, 2]], "row 0 lists patch 3 twice")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            patch_unembed(tokens, 4, 2, 4, 8, 12, torch.tensor(ids), backend=backend)
