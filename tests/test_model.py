"""LegoBrick / LegoModel: shapes, locality of patch-bricks, skipping, canvases, patch sampling, registry."""

import pytest
import torch

from lego import MODELS, LegoBrick, LegoModel, model_config
from lego.networks.interface import PatchDraw


def tiny(name="LEGO-T-PG-16", **kw):
    kw.setdefault("hidden_size", 32)
    kw.setdefault("num_heads", 2)
    return LegoModel.from_name(name, in_channels=kw.pop("in_channels", 2), num_classes=kw.pop("num_classes", 5), **kw)


def randomize(module):
    """Replace adaLN-Zero's zero init by random weights so that every path carries signal."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)
    return module


def test_brick_shapes_and_dtype():
    brick = randomize(LegoBrick(8, 4, hidden_size=32, depth=2, num_heads=2, in_channels=3, has_prev=True))
    x, prev, cond = torch.randn(2, 3, 16, 24), torch.randn(2, 3, 16, 24), torch.randn(2, 32)
    out = brick(x, prev, cond)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert brick.seq_len == 4
    out64 = brick.double()(x.double(), prev.double(), cond.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out, atol=1e-4, rtol=1e-4)


def test_patch_brick_output_depends_only_on_its_patch():
    brick = randomize(LegoBrick(4, 2, hidden_size=32, depth=2, num_heads=2, in_channels=1, has_prev=True))
    x, prev, cond = torch.randn(2, 1, 12, 16), torch.randn(2, 1, 12, 16), torch.randn(2, 32)
    base = brick(x, prev, cond)
    x2, prev2 = x.clone(), prev.clone()
    x2[:, :, 4:8, 8:12] += torch.randn(2, 1, 4, 4)  # patch (1, 2)
    prev2[:, :, 4:8, 8:12] -= 1
    out = brick(x2, prev2, cond)
    changed = (out - base).abs().amax(dim=(0, 1)) > 0  # (H, W)
    expected = torch.zeros(12, 16, dtype=torch.bool)
    expected[4:8, 8:12] = True
    assert torch.equal(changed, expected)


def test_patch_index_processes_only_the_chosen_patches():
    brick = randomize(LegoBrick(4, 2, hidden_size=32, depth=1, num_heads=2, in_channels=2, has_prev=False))
    x, cond = torch.randn(3, 2, 8, 12), torch.randn(3, 32)
    full = brick(x, None, cond)
    idx = torch.tensor([[5, 0], [2, 3], [1, 4]])
    fill = torch.randn_like(x)
    part = brick(x, None, cond, patch_index=idx, fill=fill)
    for b in range(3):
        for p in range(6):
            i, j = divmod(p, 3)
            sl = (b, slice(None), slice(4 * i, 4 * i + 4), slice(4 * j, 4 * j + 4))
            want = full[sl] if p in idx[b].tolist() else fill[sl]
            torch.testing.assert_close(part[sl], want)


def test_adaln_vectors_are_per_image_not_per_patch():
    """Two images with different conditioning: each patch gets its own image's modulation."""
    brick = randomize(LegoBrick(4, 2, hidden_size=32, depth=1, num_heads=2, in_channels=1, has_prev=False))
    x = torch.randn(1, 1, 8, 8).expand(2, 1, 8, 8)
    cond = torch.randn(2, 32)
    out = brick(x, None, cond)
    solo = brick(x[1:], None, cond[1:])
    torch.testing.assert_close(out[1:], solo)
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("name", ["LEGO-T-PG-16", "LEGO-T-PR-16", "LEGO-T-U-16"])
def test_model_forward_shapes(name):
    model = randomize(tiny(name))
    x = torch.randn(3, 2, 16, 16)
    d = model(x, torch.tensor([0.1, 1.0, 10.0]), torch.tensor([0, 4, 2]))
    assert d.shape == x.shape and d.dtype == torch.float32 and torch.isfinite(d).all()
    assert model(x, 1.0).shape == x.shape  # unconditional call: the null class


def test_bf16_autocast_runs():
    model = randomize(tiny())
    x = torch.randn(2, 2, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = model(x, 1.0, torch.tensor([1, 2]))
    assert d.dtype == torch.float32 and torch.isfinite(d).all()
    torch.testing.assert_close(d, model(x, 1.0, torch.tensor([1, 2])), atol=0.15, rtol=0.05)


def test_non_square_and_larger_canvases():
    model = randomize(tiny())
    for h, w in [(16, 48), (32, 16), (48, 64)]:
        assert model(torch.randn(1, 2, h, w), 0.5).shape == (1, 2, h, w)


def test_canvas_not_divisible_by_largest_brick():
    model = tiny()
    with pytest.raises(ValueError, match="not divisible by the largest brick size 16"):
        model(torch.randn(1, 2, 16, 24), 1.0)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 3, 16, 16), 1.0)


def test_skip_passes_the_predecessor_output_on():
    model = randomize(tiny())
    x, sigma, y = torch.randn(2, 2, 16, 16), torch.tensor([0.3, 2.0]), torch.tensor([1, 3])
    outs = model(x, sigma, y, every_brick=True)
    assert [o.index for o in outs] == [0, 1, 2]
    c_skip, c_out, _, _ = (c.view(-1, 1, 1, 1) for c in model.precond.coefficients(sigma))
    torch.testing.assert_close(outs[2].denoised, c_skip * x + c_out * outs[2].output)
    torch.testing.assert_close(model(x, sigma, y), outs[2].denoised)
    torch.testing.assert_close(model(x, sigma, y, skip=(2,)), c_skip * x + c_out * outs[1].output)
    # skipping the middle brick: the top brick sees brick 0's output as its previous input
    top_only = model(x, sigma, y, skip=(1,), every_brick=True)
    assert [o.index for o in top_only] == [0, 2]
    assert not torch.allclose(top_only[-1].output, outs[2].output)
    with pytest.raises(ValueError, match="every brick is skipped"):
        model(x, sigma, y, skip=(0, 1, 2))


def test_patch_fraction_processes_a_share_and_fills_the_rest():
    model = randomize(tiny())
    x = torch.randn(2, 2, 16, 16)
    fill = torch.randn_like(x)
    noise = model.noise_level(torch.ones(2))
    outs = model.net(x, noise, None, patches=PatchDraw(0.5, torch.Generator().manual_seed(3)), fill=fill)
    bottom = outs[0]  # 4x4 bricks: 16 patches, 8 processed
    assert bottom.patch_index.shape == (2, 8)
    assert bottom.mask.mean().item() == 0.5
    unprocessed = bottom.mask.expand_as(x) == 0
    torch.testing.assert_close(bottom.output[unprocessed], fill[unprocessed])
    assert outs[2].patch_index is None  # the image-brick always sees the whole image


def test_registry_names_and_parameter_counts():
    assert {"LEGO-S-PG-64", "LEGO-L-PR-64", "LEGO-XL-PG-32", "LEGO-XL-U-32"} <= set(MODELS)
    u = model_config("LEGO-XL-U-32")
    assert [(b.brick_size, b.field_size, b.depth) for b in u.bricks] == [
        (32, 2, 14),
        (16, 8, 10),
        (4, 2, 4),
        (16, 8, 10),
        (32, 2, 14),
    ]
    pr = model_config("LEGO-S-PR-64")
    assert [b.brick_size for b in pr.bricks] == [64, 16, 4]
    with torch.device("meta"):
        counts = {
            n: sum(p.numel() for p in LegoModel.from_name(n, in_channels=3, num_classes=1000).parameters())
            for n in ("LEGO-S-PG-64", "LEGO-L-PG-64")
        }
    assert abs(counts["LEGO-S-PG-64"] / 1e6 - 35) < 2.5  # paper, Table 5
    assert abs(counts["LEGO-L-PG-64"] / 1e6 - 464) < 5
    with pytest.raises(ValueError, match="unknown model"):
        LegoModel.from_name("LEGO-M-PG-64")
    with pytest.raises(ValueError, match="depths"):
        model_config("LEGO-S-PG-64", depths=(1, 2))


def test_one_token_bricks_compute_only_v():
    """S = 1 (XL's 4 x 4 brick, l = 4): o = v, so the block runs only the v rows of its qkv linear. Output and every
    gradient equal the full path's (qkv linear + attention); q and k get zero gradients and no FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from lego.networks.blocks import DiTBlock
    from lego_kernels import short_attention_ref

    n, d = 6, 32
    block = randomize(DiTBlock(d, 2, backend="torch")).double()
    h = torch.randn(n, 1, d, dtype=torch.float64, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        out = block.attention(h)
    assert fc.get_total_flops() == 2 * n * d * d  # the v rows only
    full = short_attention_ref(block.qkv(h), 2)  # (N, 1, d)
    torch.testing.assert_close(out, full, atol=1e-12, rtol=0)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (h, block.qkv.weight, block.qkv.bias), grad)
    want = torch.autograd.grad(full, (h, block.qkv.weight, block.qkv.bias), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)
    assert got[1][: 2 * d].abs().max() == 0  # nothing flows into q and k: softmax over one key is constant


def test_one_token_brick_checkpoint_round_trip(tmp_path):
    """A model with an S = 1 brick keeps the full [3d, d] qkv weight in its checkpoint, and loads back to the same
    outputs."""
    import copy

    from lego import BrickSpec
    from lego.checkpoints.build import load_model
    from lego.checkpoints.format import save_checkpoint

    model = randomize(tiny(bricks=(BrickSpec(4, 4, 1), BrickSpec(8, 4, 1), BrickSpec(16, 2, 1))))
    assert model.net.bricks[0].seq_len == 1
    assert model.state_dict()["net.bricks.0.blocks.0.qkv.weight"].shape == (3 * 32, 32)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path / "checkpoint.safetensors", model, copy.deepcopy(model), optimizer, 1, {})
    loaded = load_model(tmp_path / "checkpoint.safetensors")
    x, sigma, labels = torch.randn(2, 2, 16, 16), torch.tensor([0.5, 3.0]), torch.tensor([1, 4])
    torch.testing.assert_close(loaded(x, sigma, labels), model.eval()(x, sigma, labels), atol=0, rtol=0)
