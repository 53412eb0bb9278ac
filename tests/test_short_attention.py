"""short_attention: the fused Triton kernels (forward, backward) against the fp64 reference, the S > 16 path, backend
choice and argument errors, torch.compile, a GPU compile of each kernel, and the XL shape on a GPU."""

import inspect
import math

import numpy as np
import pytest
import torch
from conftest import DEVICES, assert_close_to_reference, compile_for_gpu

from lego_kernels import short_attention, short_attention_ref
from lego_kernels._dispatch import available_backends
from lego_kernels.short_attention import (
    MAX_SHORT_SPAN,
    _launch_config,
    _short_attention_bwd_kernel,
    _short_attention_bwd_op,
    _short_attention_fwd_kernel,
    _short_attention_fwd_op,
)

# (N, S, H, d_head): odd N, every S of the brief, head sizes 32, 40 and XL's 72 (BLOCK_DH 128, 56 lanes masked).
CASES = [
    (7, 1, 2, 32),
    (13, 2, 1, 40),
    (7, 3, 2, 72),
    (13, 4, 3, 40),
    (7, 4, 2, 72),
    (7, 5, 1, 40),
    (7, 16, 2, 32),
    (13, 16, 1, 72),
]
# atol for (o, dqkv): covers what rounding the output to the dtype adds beyond twice plain PyTorch's error.
ATOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 2e-3), torch.bfloat16: (8e-3, 2e-2)}


def _kernel_backends(device):
    """The fused backends this op can run here ("cuda" only where the extension is built)."""
    return [b for b in ("triton", "cuda") if b in available_backends(device)]


def _forward_backward(fn, qkv, grad):
    x = qkv.detach().clone().requires_grad_()
    o = fn(x)
    (dx,) = torch.autograd.grad(o, x, grad)
    return o.detach(), dx


def _check_against_reference(qkv, num_heads, backend, atol_o, atol_g):
    """Forward and d(qkv) of short_attention(backend) vs short_attention_ref in fp64 and in qkv's dtype."""
    n, s, three_d = qkv.shape
    d = three_d // 3
    grad = torch.randn(n, s, d, dtype=qkv.dtype, device=qkv.device)
    out, dx = _forward_backward(lambda x: short_attention(x, num_heads, backend=backend), qkv, grad)
    out_t, dx_t = _forward_backward(lambda x: short_attention_ref(x, num_heads), qkv, grad)
    out_64, dx_64 = _forward_backward(lambda x: short_attention_ref(x, num_heads), qkv.double(), grad.double())
    assert out.dtype == qkv.dtype and dx.dtype == qkv.dtype
    assert_close_to_reference(out, out_t, out_64, atol_o, "o")
    for i, name in enumerate(("dq", "dk", "dv")):
        part = slice(i * d, (i + 1) * d)
        assert_close_to_reference(dx[..., part], dx_t[..., part], dx_64[..., part], atol_g, name)


def _random_qkv(n, s, num_heads, d_head, dtype, device):
    # 1.5x randn: scores of a few units, so that the softmax is neither uniform nor one-hot.
    return (1.5 * torch.randn(n, s, 3 * num_heads * d_head, device=device)).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n, s, num_heads, d_head", CASES)
def test_triton_matches_reference(device, dtype, n, s, num_heads, d_head):
    qkv = _random_qkv(n, s, num_heads, d_head, dtype, device)
    _check_against_reference(qkv, num_heads, "triton", *ATOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_lse_is_the_logsumexp_of_the_scaled_scores(device):
    n, s, num_heads, d_head = 7, 5, 2, 40
    qkv = _random_qkv(n, s, num_heads, d_head, torch.float32, device)
    _, lse = _short_attention_fwd_op(qkv, num_heads, "triton")
    q, k, _ = qkv.double().view(n, s, 3, num_heads, d_head).permute(2, 0, 3, 1, 4).unbind(0)  # (N, H, S, d_head)
    expected = (q @ k.transpose(-1, -2) / math.sqrt(d_head)).logsumexp(dim=-1)  # (N, H, S)
    assert lse.dtype == torch.float32 and lse.shape == (n, num_heads, s)
    torch.testing.assert_close(lse.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(device):
    n, s, num_heads, d_head = 7, 4, 2, 40
    qkv = 1.5 * torch.randn(s, n, 3 * num_heads * d_head, device=device).transpose(0, 1)  # (N, S, 3d), strided
    assert not qkv.is_contiguous()
    _check_against_reference(qkv, num_heads, "triton", *ATOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("s", [4, MAX_SHORT_SPAN + 1])
def test_empty_batch(device, backend, s):
    """No sequences (or, on the torch path, no tokens): empty outputs and gradients, not a reshape error."""
    for n, length in ((0, s), (3, 0)):
        qkv = torch.randn(n, length, 3 * 2 * 32, device=device, requires_grad=True)
        out = short_attention(qkv, 2, backend=backend)
        assert out.shape == (n, length, 2 * 32)
        out.sum().backward()
        assert qkv.grad.shape == qkv.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("s", [MAX_SHORT_SPAN + 1, 64])
def test_long_sequences_match_reference(device, s):
    """S > 16 runs on SDPA (or flash-attn) whatever the backend, also when the fused kernels are asked for."""
    qkv = _random_qkv(3, s, 2, 32, torch.float32, device)
    for backend in ["torch", "auto", *_kernel_backends(device)]:
        _check_against_reference(qkv, 2, backend, *ATOL[torch.float32])


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_torch_backends_on_cpu_give_the_reference(backend):
    qkv = _random_qkv(5, 4, 3, 16, torch.float32, "cpu")
    _check_against_reference(qkv, 3, backend, *ATOL[torch.float32])


def test_bad_arguments_raise_clear_errors():
    qkv = torch.randn(3, 4, 3 * 2 * 8)
    with pytest.raises(ValueError, match="not 3 \\* num_heads"):
        short_attention(qkv, 5)
    with pytest.raises(ValueError, match="not 3 \\* num_heads"):
        short_attention(qkv, 0)
    with pytest.raises(ValueError, match="3 dimensions"):
        short_attention(qkv[0], 2)
    with pytest.raises(TypeError, match="floating-point"):
        short_attention(qkv.long(), 2)
    for backend in ("torch", "triton"):  # a float head count, and heads of size 0, fail here, not deep in a reshape
        with pytest.raises(ValueError, match="num_heads must be a positive int, got 2.0"):
            short_attention(qkv, 2.0, backend=backend)
        with pytest.raises(ValueError, match="d_head would be 0"):
            short_attention(qkv[..., :0], 2, backend=backend)
        assert torch.equal(short_attention(qkv, np.int64(2), backend=backend), short_attention(qkv, 2, backend=backend))
        with pytest.raises(ValueError, match="num_heads must be a positive int, got True"):  # (issue 21: ran as 1 head)
            short_attention(torch.randn(3, 4, 3 * 8), True, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("where", [0, 1, 2])  # q, k or v
def test_a_nan_input_gives_nan_like_the_reference(backend, where):
    """Issue 21, item 9: on the torch backend a NaN in a query gave a finite output (PyTorch's CPU SDPA kernel returns
    zeros for that row), where the formula and Triton give NaN."""
    qkv = torch.randn(3, 4, 3 * 2 * 8)
    qkv[1, 2, where * 16 + 3] = float("nan")  # sequence 1, token 2, head 0 of q, k or v
    want = short_attention_ref(qkv, 2).isnan()
    assert want.any() and torch.equal(short_attention(qkv, 2, backend=backend).isnan(), want)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for CPU tensors")
def test_missing_backend_raises():
    qkv = torch.randn(3, 4, 3 * 2 * 8)
    with pytest.raises(ValueError, match="'cuda' is not available"):
        short_attention(qkv, 2, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        short_attention(qkv, 2, backend="cudnn")


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ops_pass_opcheck(device):
    """Schema, fake (meta) implementations and autograd registration of both custom ops."""
    qkv = _random_qkv(5, 3, 2, 40, torch.float32, device).requires_grad_()
    torch.library.opcheck(_short_attention_fwd_op, (qkv, 2, "triton"))
    o, lse = _short_attention_fwd_op(qkv.detach(), 2, "triton")
    torch.library.opcheck(_short_attention_bwd_op, (torch.randn_like(o), qkv.detach(), o, lse, 2, "triton"))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    """The fused path traces into one graph (aot_eager: the kernels still run as they are, under the interpreter on
    the CPU), and so does the torch path through inductor."""
    qkv = _random_qkv(5, 4, 2, 40, torch.float32, device)
    fused = torch.compile(short_attention, backend="aot_eager", fullgraph=True)
    grad = torch.randn(5, 4, 80, device=device)
    out, dx = _forward_backward(lambda x: fused(x, 2, backend="triton"), qkv, grad)
    out_ref, dx_ref = _forward_backward(lambda x: short_attention_ref(x, 2), qkv, grad)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)
    plain = torch.compile(short_attention, fullgraph=True)
    torch.testing.assert_close(plain(qkv, 2, backend="torch"), out_ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Compile-only: a real compile for sm_80 / sm_90 catches what the interpreter lets through (a tl.dot on tiles under 16,
# say), at the launch's num_warps (register pressure depends on it), through conftest.compile_for_gpu.

# (S, pointer dtype, compute capability): every pointer dtype at XL's S = 4, and the longest short sequence; A100 and
# H100 each at least once (this kernel uses nothing that differs between them, so not every pair of the two).
COMPILE_JOBS = [(4, "fp16", 90), (4, "bf16", 80), (4, "fp32", 90), (16, "bf16", 90)]


def _signature(kernel, dtype):
    types = {"LSE": "*fp32", "num_pairs": "i32", "sm_scale": "fp32"}
    signature = {}
    for name, param in inspect.signature(kernel.fn).parameters.items():
        if "constexpr" in str(param.annotation):
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        else:
            signature[name] = "i32" if name.startswith("stride") else f"*{dtype}"
    return signature


def test_kernels_compile_for_gpu(monkeypatch):
    """Forward and backward at XL's head size 72 (BLOCK_DH 128) and 16 heads, at the block sizes and warps the
    launcher picks on a GPU; one child process per compute capability."""
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the launch configuration of a GPU, not the interpreter's
    specs = {}
    for kernel in (_short_attention_fwd_kernel, _short_attention_bwd_kernel):
        for s, dtype, cc in COMPILE_JOBS:
            block_p, block_s, block_dh, num_warps = _launch_config(
                256 * 64 * 16, s, 72, kernel is _short_attention_bwd_kernel, 4 if dtype == "fp32" else 2
            )
            assert block_dh == 128
            constexprs = {"NUM_HEADS": 16, "HEAD_DIM": 72, "SEQ": s}
            constexprs.update(BLOCK_P=block_p, BLOCK_S=block_s, BLOCK_DH=block_dh)
            if kernel is _short_attention_fwd_kernel:
                constexprs["PRELOAD_KV"] = s <= 8
            specs.setdefault(cc, []).append((kernel, _signature(kernel, dtype), constexprs, {"num_warps": num_warps}))
    monkeypatch.undo()
    for cc, cc_specs in sorted(specs.items()):
        compile_for_gpu(*cc_specs, capabilities=(cc,))


@pytest.mark.parametrize("d_head", [32, 64, 72, 128])
@pytest.mark.parametrize("s", [2, 4, 8])
def test_preloading_forward_tiles_span_warps(monkeypatch, s, d_head):
    """On a GPU the S <= 8 forward gives a program fewer (sequence, head) pairs than warps. With whole pairs per warp
    (d_head 64: 4 pairs on 4 warps) every reduction is a shuffle, no barrier fences the loads, and ptxas sinks v's
    load below key 0's scores: a second DRAM round trip (tests/test_static_profile.py reads it from the SASS)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    block_p, _, _, num_warps = _launch_config(256 * 64 * 6, s, d_head, backward=False)
    assert block_p < num_warps


# ---------------------------------------------------------------------------------------------------------------
# On a GPU: the XL patch-brick shape (B = 256 images of 64 patches, S = 4, d = 1152, 16 heads of 72).


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_xl_shape_on_gpu(dtype):
    qkv = _random_qkv(256 * 64, 4, 16, 72, dtype, "cuda")
    for backend in _kernel_backends("cuda"):
        _check_against_reference(qkv, 16, backend, *ATOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, s", [(7, 1), (13, 16), (3, 5)])
def test_short_shapes_on_gpu_half(dtype, n, s):
    qkv = _random_qkv(n, s, 16, 72, dtype, "cuda")
    for backend in _kernel_backends("cuda"):
        _check_against_reference(qkv, 16, backend, *ATOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_image_brick_on_gpu(dtype):
    """S = 256 (the image-brick): SDPA, or flash-attn where installed (this is the test that would exercise it)."""
    qkv = _random_qkv(4, 256, 16, 72, dtype, "cuda")
    _check_against_reference(qkv, 16, "auto", *ATOL[dtype])


def test_long_span_backward_copies_the_gradient_once():
    """The image-brick path (S > 16): autograd writes d(qkv) [N, S, 3d] once, stacked straight into qkv's layout,
    with no second full-size copy (the permute(...).unbind(0) split stacked and then cloned it), and the gradient is
    the one the permuted split gives."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class FullSizeWrites(TorchDispatchMode):
        def __init__(self, numel):
            super().__init__()
            self.numel, self.ops = numel, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            view = getattr(func, "is_view", False) or func.overloadpacket.__name__ in ("view", "_unsafe_view")
            if isinstance(out, torch.Tensor) and out.numel() == self.numel and not view and out._base is None:
                self.ops.append(func.overloadpacket.__name__)
            return out

    n, s, num_heads, d_head = 3, MAX_SHORT_SPAN + 3, 2, 8
    qkv = _random_qkv(n, s, num_heads, d_head, torch.float32, "cpu").requires_grad_()
    out = short_attention(qkv, num_heads, backend="torch")
    grad = torch.randn_like(out)
    with FullSizeWrites(qkv.numel()) as trace:
        (dqkv,) = torch.autograd.grad(out, qkv, grad)
    writes = [op for op in trace.ops if not op.startswith("_scaled_dot_product")]
    assert writes == ["stack"], f"full-size tensors written in the backward: {trace.ops}"

    x = qkv.detach().clone().requires_grad_()
    q, k, v = x.view(n, s, 3, num_heads, d_head).permute(2, 0, 3, 1, 4).unbind(0)  # the old split
    old = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, s, -1)
    (dqkv_old,) = torch.autograd.grad(old, x, grad)
    torch.testing.assert_close(out, old, atol=0, rtol=0)
    torch.testing.assert_close(dqkv, dqkv_old, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_takes_the_reference(device):
    """float64 qkv runs PyTorch's attention in float64 on every backend, as adaln does (the kernels compute in fp32:
    errors of 1e-7 where float64 promises 1e-15)."""
    qkv = _random_qkv(5, 4, 2, 8, torch.float64, device)
    grad = torch.randn(5, 4, 16, dtype=torch.float64, device=device)
    for backend in _kernel_backends(device):
        out, dx = _forward_backward(lambda x, backend=backend: short_attention(x, 2, backend=backend), qkv, grad)
        out_ref, dx_ref = _forward_backward(lambda x: short_attention(x, 2, backend="torch"), qkv, grad)
        torch.testing.assert_close(out, out_ref, atol=1e-13, rtol=0)
        torch.testing.assert_close(dx, dx_ref, atol=1e-13, rtol=0)
