"""torch.library.opcheck on every lego:: custom op (issue #20): schema, fake (meta) implementation against the real
one (shapes, dtypes AND strides: Inductor asserts the fake's strides at run time), autograd registration, AOT dispatch.

The patch ops at every field size l = 1, 2, 4, 8 (S = 16, 16, 4, 1), every backward path of
patch_embed (two kernels, fused, weight-only), in fp32 and bf16. patch_embed's backward used to return a strided
dweight view for fp32 at l = 1 (K = C' not a multiple of 4) where its fake says contiguous: torch.compile's Inductor
stopped there. Shapes are tiny: the kernels run in Triton's interpreter on the CPU.
"""

import importlib

import pytest
import torch
from conftest import DEVICES

pe = importlib.import_module("lego_kernels.patch_embed")
pu = importlib.import_module("lego_kernels.patch_unembed")

DTYPES = [torch.float32, torch.bfloat16]
FIELDS = [1, 2, 4, 8]
BRICK = {1: 4, 2: 8, 4: 8, 8: 8}  # field size -> brick size: S = 16, 16, 4, 1 tokens (the interpreter is slow)


def _opcheck(op, args):
    results = torch.library.opcheck(op, args, raise_exception=False)
    failed = {test: result for test, result in results.items() if result != "SUCCESS"}
    assert not failed, failed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("field", FIELDS)
def test_patch_embed_ops(field, dtype, device, monkeypatch):
    kw = {"dtype": dtype, "device": device}
    b, c, h, w, d = 2, 2, 8, 16, 16
    r = BRICK[field]
    s = (r // field) ** 2
    x, prev = torch.randn(b, c, h, w, **kw), torch.randn(b, c, h, w, **kw)
    weight = torch.randn(d, 2 * c + 2, field, field, **kw, requires_grad=True)
    bias, pos = torch.randn(d, **kw, requires_grad=True), torch.randn(s, d, **kw, requires_grad=True)
    index = torch.tensor([[1], [0]], device=device)
    _opcheck(pe._patch_embed_fwd_op, (x, prev, weight, bias, pos, index, r, field))
    _opcheck(pe._patch_embed_fwd_op, (x, None, weight[:, 2:].detach().requires_grad_(), None, pos, None, r, field))
    weight = weight.detach()
    dtokens = torch.randn(2, s, d, **kw)
    for two_pass_tokens_per_k in (pe._TWO_PASS_TOKENS_PER_K, 0):  # whichever this shape picks, then the fused kernel
        monkeypatch.setattr(pe, "_TWO_PASS_TOKENS_PER_K", two_pass_tokens_per_k)
        _opcheck(pe._patch_embed_bwd_op, (dtokens, x, prev, weight, index, r, field, True))
    _opcheck(pe._patch_embed_bwd_op, (dtokens, x, prev, weight, index, r, field, False))  # weight only


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("field", FIELDS)
def test_patch_unembed_ops(field, dtype, device):
    kw = {"dtype": dtype, "device": device}
    c, h, w = 2, 8, 16
    r = BRICK[field]
    s = (r // field) ** 2
    tokens = torch.randn(2, s, field * field * c, **kw, requires_grad=True)
    index = torch.tensor([[1], [0]], device=device)
    fill = torch.randn(2, c, h, w, **kw, requires_grad=True)
    _opcheck(pu._patch_unembed_fwd_op, (tokens, index, fill, r, field, c, h, w))
    _opcheck(pu._patch_unembed_fwd_op, (tokens[:1], None, None, r, field, c, r, r))  # one patch
    dcanvas = torch.randn(2, c, h, w, **kw)
    _opcheck(pu._patch_unembed_bwd_op, (dcanvas, index, r, field, True))
    _opcheck(pu._patch_unembed_bwd_op, (dcanvas[:1, :, :r, :r].contiguous(), None, r, field, False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_short_attention_and_adaln_ops(dtype, device):
    kw = {"dtype": dtype, "device": device}
    sa = importlib.import_module("lego_kernels.short_attention")
    qkv = torch.randn(3, 4, 48, **kw, requires_grad=True)
    _opcheck(sa._short_attention_fwd_op, (qkv, 2, "triton"))
    o, lse = sa._short_attention_fwd_op(qkv.detach(), 2, "triton")
    _opcheck(sa._short_attention_bwd_op, (torch.randn_like(o), qkv.detach(), o, lse, 2, "triton"))

    x, y = (torch.randn(4, 3, 16, **kw, requires_grad=True) for _ in range(2))
    gate, shift, scale = (torch.randn(2, 16, **kw, requires_grad=True) for _ in range(3))
    image_index = torch.tensor([1, 0, 1, 1], device=device)
    ops = torch.ops.lego
    _opcheck(ops.adaln_modulate_fwd.default, (x, shift, scale, image_index, "triton"))
    _opcheck(ops.gated_residual_adaln_fwd.default, (x, y, gate, shift, scale, None, "triton"))
    _opcheck(ops.gated_residual_fwd.default, (x, y, gate, image_index))
    dx_out, dh = torch.randn_like(x).detach(), torch.randn_like(x).detach()
    xd, yd, gd, shd, scd = (t.detach() for t in (x, y, gate, shift, scale))
    _, mean, rstd = ops.adaln_modulate_fwd.default(xd, shd, scd, image_index, "triton")
    _opcheck(ops.adaln_modulate_bwd.default, (dh, xd, shd, scd, image_index, mean, rstd, "triton"))
    x_out, _, mean, rstd = ops.gated_residual_adaln_fwd.default(xd, yd, gd, shd, scd, None, "triton")
    _opcheck(ops.gated_residual_adaln_bwd.default, (dx_out, dh, x_out, yd, gd, scd, None, mean, rstd, "triton"))
    _opcheck(ops.gated_residual_bwd.default, (dx_out, yd, gd, image_index))
