"""A pretrained denoiser as brick 0 of a PR stack (lego.checkpoints.build): adapters, frozen vs fine-tuned training,
checkpoints."""

import copy
import json
import shutil
import types

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, save_digits
from safetensors import safe_open
from safetensors.torch import save_file

from lego import DiffusersDenoiser, LegoLoss, LegoModel, VPPrecond, model_config, stack_on_base
from lego.checkpoints.build import load_model
from lego.checkpoints.format import load_checkpoint
from lego.data.datasets import open_dataset
from lego.data.loader import prepare
from lego.diffusion.samplers import edm_sampler, skip_schedule
from lego.errors import LegoError
from lego.metrics.evaluate import heldout_loss
from lego.networks.interface import PatchDraw
from lego.sample import main as sample_main
from lego.train import main as train_main

FAST = ["--batch", "4", "--log-every", "1", "--sample-n", "0", "--no-progress"]


class OracleDDPM(torch.nn.Module):
    """A diffusers-like model that knows x0: it returns the exact epsilon, v or x0 for DDPM's x_t at step t."""

    def __init__(self, x0, prediction):
        super().__init__()
        self.x0, self.prediction = x0, prediction
        self.config = {}
        self.abar = VPPrecond().alphas_cumprod
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t, class_labels=None):
        abar = self.abar[t].view(-1, 1, 1, 1).float()
        eps = (x_t - abar.sqrt() * self.x0) / (1 - abar).sqrt()
        out = {"epsilon": eps, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * self.x0, "sample": self.x0}
        return types.SimpleNamespace(sample=out[self.prediction])


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_diffusers_adapter_turns_each_prediction_into_x0(prediction):
    x0 = torch.randn(3, 2, 8, 8)
    sigma = VPPrecond().sigmas[torch.tensor([5, 300, 990])].float()  # on DDPM's grid, so the oracle is exact
    x = x0 + sigma.view(-1, 1, 1, 1) * torch.randn_like(x0)
    d = DiffusersDenoiser(OracleDDPM(x0, prediction), prediction)(x, sigma)
    torch.testing.assert_close(d, x0, rtol=1e-4, atol=1e-3 * float(sigma.max()))


def test_a_module_base_gives_the_stacks_bottom_prediction():
    """Brick 0's raw output reproduces the base's D exactly; the bricks above see it, the top brick refines it."""
    x0 = torch.randn(2, 1, 16, 16)
    base = DiffusersDenoiser(OracleDDPM(x0, "epsilon"))
    model = stack_on_base("LEGO-T-PR-16", base, freeze=True, in_channels=1, resolution=16, backend="torch")
    sigma = VPPrecond().sigmas[torch.tensor([100, 700])].float()
    x = x0 + sigma.view(-1, 1, 1, 1) * torch.randn_like(x0)
    outs = model(x, sigma, every_brick=True)
    torch.testing.assert_close(outs[0].denoised, x0, rtol=1e-4, atol=1e-3)
    # Only brick 0 running: the model is the base; the samplers and skipping run unchanged.
    torch.testing.assert_close(model(x, sigma, skip=(1, 2)), x0, rtol=1e-4, atol=1e-3)
    z = torch.randn(2, 1, 16, 16)
    assert torch.isfinite(edm_sampler(model, z, num_steps=2, skip=skip_schedule(model, 0.5))).all()
    assert not any(p.requires_grad for p in model.net.bricks[0].parameters())
    with pytest.raises(LegoError, match="not a PR stack"):
        stack_on_base("LEGO-T-PG-16", base, in_channels=1, resolution=16)


class ConvBase(torch.nn.Module):
    """A small trainable denoiser D(x, sigma, labels) whose prediction is far from the bricks' zero start."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, sigma, class_labels=None):
        return torch.tanh(self.conv(x))


@pytest.mark.parametrize("freeze", [True, False])
def test_an_untrained_stack_on_a_base_is_the_base(freeze):
    """The bricks on a base add their output to the one below and start at zero: the stack's D is the base's D, at
    every noise level, with any bricks skipped, and on the patches a brick processes in training."""
    base = ConvBase()
    model = stack_on_base("LEGO-T-PR-16", base, freeze=freeze, in_channels=1, resolution=16, backend="torch")
    assert model.config.base["refine"]
    x = torch.randn(4, 1, 32, 16)  # a canvas larger than the training one, too
    sigma = torch.tensor([0.002, 0.3, 2.0, 80.0])
    with torch.no_grad():
        want = base(x, sigma)  # (4, 1, 32, 16)
        for skip in ((), (-1,), (1,), (1, 2)):
            torch.testing.assert_close(model(x, sigma, skip=skip), want, rtol=0, atol=1e-5)
        # Training processes half the patches of the 4 x 4 brick: those carry the base's output, the rest the fill.
        fill = torch.randn_like(x)
        outs = model.net(
            x, model.noise_level(sigma), patches=PatchDraw(0.5, torch.Generator().manual_seed(0)), fill=fill
        )
        top, below = outs[-1], outs[-2].output
        assert top.mask is not None and 0 < top.mask.mean() < 1
        torch.testing.assert_close(torch.where(top.mask.bool(), below, fill), top.output, rtol=0, atol=0)
        # A trained top brick changes the prediction; skipping it gives the base's again.
        torch.nn.init.normal_(model.net.bricks[-1].final_layer.linear.weight, std=0.1)
        assert (model(x, sigma) - want).abs().max() > 1e-2
        torch.testing.assert_close(model(x, sigma, skip=(-1,)), want, rtol=0, atol=1e-5)


def test_stacks_saved_before_refining_keep_their_plain_bricks():
    """A base record without "refine" (a checkpoint from before it) builds the old stack: bricks that replace the
    base's output, so an untrained one predicts c_skip x rather than the base's D."""
    base = ConvBase()
    record = {"kind": "module", "class": "ConvBase", "frozen": True}
    model = LegoModel(model_config("LEGO-T-PR-16", in_channels=1, resolution=16, base=record), base=base)
    assert not model.net.refine
    x, sigma = torch.randn(2, 1, 16, 16), torch.tensor([0.5, 2.0])
    c_skip = model.precond.coefficients(sigma)[0].view(-1, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x, sigma), c_skip * x)
        torch.testing.assert_close(model(x, sigma, skip=(1, 2)), base(x, sigma), rtol=0, atol=1e-5)
    assert not stack_on_base("LEGO-T-PR-16", base, refine=False, in_channels=1, resolution=16).net.refine


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A base trained for one step, then bricks trained on top of it for two steps, frozen and fine-tuned."""
    tmp = tmp_path_factory.mktemp("base")
    common = [*FAST, "--data", save_digits(tmp / "d.npz", 32)]
    assert train_main([*common, "--steps", "1", "--out", str(tmp / "base")]) == 0
    base = str(tmp / "base" / "checkpoint.safetensors")
    for name, extra in (("frozen", ["--freeze-base"]), ("tuned", [])):
        assert train_main([*common, "--steps", "2", "--base-ckpt", base, "--out", str(tmp / name), *extra]) == 0
    return tmp


def _keys(path):
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def test_frozen_base_is_bit_identical_and_stays_at_its_origin(runs):
    origin = load_model(runs / "base" / "checkpoint.safetensors").state_dict()
    ckpt_path = runs / "frozen" / "checkpoint.safetensors"
    assert not [k for k in _keys(ckpt_path) if k.startswith(("model/net.bricks.0.", "ema/net.bricks.0."))]
    record = load_checkpoint(ckpt_path, parts=()).model_config.base
    assert record["kind"] == "lego" and record["frozen"] and record["path"].endswith("base/checkpoint.safetensors")
    assert train_main(["--resume", "--out", str(runs / "frozen"), "--steps", "3", "--no-progress"]) == 0
    for use_ema in (True, False):
        model = load_model(ckpt_path, use_ema=use_ema)
        base = model.net.bricks[0].denoiser.state_dict()
        assert base.keys() == origin.keys()
        for k in origin:
            assert torch.equal(base[k], origin[k]), k
        top = model.net.bricks[-1].final_layer.linear.weight
        assert top.abs().sum() > 0  # the bricks on top did train


def test_fine_tuned_base_is_stored_and_changed(runs, tmp_path):
    origin = load_model(runs / "base" / "checkpoint.safetensors", use_ema=False).state_dict()
    ckpt_path = runs / "tuned" / "checkpoint.safetensors"
    assert [k for k in _keys(ckpt_path) if k.startswith("model/net.bricks.0.")]
    assert not load_checkpoint(ckpt_path, parts=()).model_config.base["frozen"]
    tuned = load_model(ckpt_path, use_ema=False).net.bricks[0].denoiser.state_dict()
    assert any(not torch.equal(tuned[k], origin[k]) for k in origin)
    # The checkpoint stands alone: the origin may go away.
    moved = tmp_path / "tuned.safetensors"
    moved.write_bytes(ckpt_path.read_bytes())
    (runs / "base" / "checkpoint.safetensors").rename(runs / "base" / "gone.safetensors")
    try:
        model = load_model(moved, use_ema=False)
        assert all(torch.equal(model.net.bricks[0].denoiser.state_dict()[k], tuned[k]) for k in tuned)
        with pytest.raises(LegoError, match="frozen base .* is missing"):
            load_model(runs / "frozen" / "checkpoint.safetensors")
    finally:
        (runs / "base" / "gone.safetensors").rename(runs / "base" / "checkpoint.safetensors")


def test_diffusers_dit_folder_as_base(tmp_path, capsys):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        out_channels=2,
        num_layers=1,
        sample_size=16,
        patch_size=4,
        num_embeds_ada_norm=10,
    )
    dit.save_pretrained(tmp_path / "dit")
    npz = tmp_path / "d.npz"
    np.savez(npz, images=np.random.default_rng(0).integers(0, 255, (10, 16, 16), dtype=np.uint8), labels=np.arange(10))
    out = tmp_path / "run"
    assert (
        train_main(
            [
                *FAST,
                "--data",
                str(npz),
                "--steps",
                "1",
                "--base-ckpt",
                str(tmp_path / "dit"),
                "--freeze-base",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    model = load_model(out / "checkpoint.safetensors")
    assert model.config.base["class"] == "DiTTransformer2DModel" and model.config.base["prediction"] == "epsilon"
    state = DiTTransformer2DModel.from_pretrained(tmp_path / "dit").state_dict()
    assert all(torch.equal(model.net.bricks[0].denoiser.model.state_dict()[k], v) for k, v in state.items())
    y = torch.tensor([3, 10])  # a class and DiT's null class (for classifier-free guidance)
    assert torch.isfinite(model(torch.randn(2, 1, 16, 16), torch.tensor([0.3, 5.0]), y)).all()
    # Bad bases: one error line each.
    capsys.readouterr()
    for base, needle in ((tmp_path / "nope", "not found"), (out / "checkpoint.safetensors", "not a PR stack")):
        model_args = ["--model", "LEGO-T-PG-16"] if needle == "not a PR stack" else []
        code = train_main(
            [
                *FAST,
                *model_args,
                "--data",
                str(npz),
                "--steps",
                "1",
                "--base-ckpt",
                str(base),
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_unet_base_runs_in_the_stack():
    from diffusers import UNet2DModel

    unet = UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    base = DiffusersDenoiser(unet, "v_prediction")
    model = stack_on_base("LEGO-T-PR-16", base, in_channels=1, resolution=16)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():  # the untrained bricks on top leave the UNet's prediction as it is
        torch.testing.assert_close(model(x, torch.tensor([0.5, 2.0])), base(x, torch.tensor([0.5, 2.0])))
    model(x, torch.tensor([0.5, 2.0])).square().mean().backward()
    assert unet.conv_in.weight.grad is not None  # fine-tuned along with the bricks


def _fit(model, data, steps, start, lr, opt=None, batch=16):
    """``steps`` AdamW steps of the joint loss on the embedded digits but their last 500 (held out); step k's batch,
    noise and sigmas come from seed k, so every model sees the same draws at the same step."""
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    loss_fn = LegoLoss(label_dropout=0.1)
    model.train()
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step)
        x, y = data[torch.randint(0, len(data) - 500, (batch,), generator=g)]
        loss, _ = loss_fn(model, prepare(x, 16, None), y, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval(), opt


def test_bricks_on_a_trained_base_beat_the_base_alone():
    """The issue's claim at CI scale: a small base (hidden 32) trained 100 steps, then 60 more steps of the same
    batches for the base alone (its optimizer carried on, as --resume does) and for the base fine-tuned with 8 x 8 and
    4 x 4 bricks (hidden 64) on top; the stack's final prediction has the lower denoising loss on 500 held-out digits
    with fixed noise. (Frozen, they beat the base alone in 4 of 6 seeds only, so that is not asserted; see README.)"""
    data = open_dataset("default", 16)
    held_x, held_y = data[torch.arange(len(data) - 500, len(data))]
    held_x = prepare(held_x, 16, None)
    opts = {
        "in_channels": 1,
        "num_classes": 10,
        "resolution": 16,
        "num_heads": 4,
        "depths": (1, 1, 1),
        "backend": "torch",
    }
    torch.manual_seed(0)
    base, opt = _fit(LegoModel(model_config("LEGO-T-PR-16", hidden_size=32, **opts)), data, 100, 0, 2e-3)
    torch.manual_seed(1)
    stack = stack_on_base("LEGO-T-PR-16", copy.deepcopy(base), hidden_size=64, **opts)
    _fit(stack, data, 60, 100, 2e-3)
    alone, _ = _fit(base, data, 60, 100, 2e-3, opt)
    loss_alone, loss_stack = heldout_loss(alone, held_x, held_y), heldout_loss(stack, held_x, held_y)
    # Measured stack / alone over seeds 0-5 of this set-up: 0.89 to 0.95 (seed 0, this test: 0.93).
    assert loss_stack < 0.97 * loss_alone, (loss_stack, loss_alone)


def test_a_frozen_base_that_changed_is_refused(tmp_path, capsys):
    """Issue 21, item 6: a frozen base retrained after the stack was built on it silently moved the stack's samples
    (the bricks refine the old base); the stack records the base's checksum and refuses a changed one."""
    common = [*FAST, "--data", save_digits(tmp_path / "d.npz", 32)]
    assert train_main([*common, "--steps", "1", "--out", str(tmp_path / "base")]) == 0
    base = tmp_path / "base" / "checkpoint.safetensors"
    stack = tmp_path / "stack" / "checkpoint.safetensors"
    assert train_main([*common, "--steps", "1", "--base-ckpt", str(base), "--freeze-base",
                       "--out", str(stack.parent)]) == 0  # fmt: skip
    load_model(stack)  # unchanged: loads
    assert train_main([*common, "--steps", "2", "--out", str(base.parent), "--resume"]) == 0  # the base trains on
    with pytest.raises(LegoError, match="has changed since this stack was trained on it"):
        load_model(stack)
    code = sample_main(["--ckpt", str(stack), "--n", "1", "--steps", "1", "--out", str(tmp_path / "s.png")])
    assert_one_line_error(capsys, code, str(base), "has changed")


def test_a_stack_cannot_be_its_own_base(runs, tmp_path, capsys):
    """Issue 21, item 3: --base-ckpt OUT/checkpoint.safetensors --freeze-base --overwrite --out OUT wrote a stack whose
    base was itself (every load a RecursionError, the base's weights gone). Refused; and such a file loads to one
    clear error."""
    out = tmp_path / "run"
    shutil.copytree(runs / "base", out)
    before = (out / "checkpoint.safetensors").read_bytes()
    own = str(out / "checkpoint.safetensors")
    code = train_main([*FAST, "--data", save_digits(tmp_path / "d.npz", 32), "--steps", "1", "--freeze-base",
                       "--base-ckpt", own, "--overwrite", "--out", str(out)])  # fmt: skip
    assert_one_line_error(capsys, code, "cannot be its own base")
    assert (out / "checkpoint.safetensors").read_bytes() == before
    # A file made so by an older version (no checksums then): a frozen stack whose recorded base is the file itself
    path = tmp_path / "self.safetensors"
    with safe_open(str(runs / "frozen" / "checkpoint.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- not a dict
    config = json.loads(meta.pop("model_config"))
    config["base"]["path"] = str(path)
    save_file(tensors, str(path), metadata={**meta, "model_config": json.dumps(config), "checksums": "{}"})
    with pytest.raises(LegoError, match="names itself as its frozen base"):
        load_model(path)


def test_freeze_base_needs_a_base(tmp_path, capsys):
    code = train_main([*FAST, "--data", save_digits(tmp_path / "d.npz", 32), "--steps", "1", "--freeze-base",
                       "--out", str(tmp_path / "run")])  # fmt: skip
    assert_one_line_error(capsys, code, "--freeze-base", "--base-ckpt")
    assert not (tmp_path / "run").exists()


def test_a_base_with_nan_weights_is_named(tmp_path):
    """Issue 21: training on such a base ended in "the loss is not finite ... Lower --lr"."""
    from diffusers import UNet2DModel

    blocks = {"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, **blocks)  # fmt: skip
    with torch.no_grad():
        unet.conv_in.weight[0] = float("nan")
    unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(LegoError, match="conv_in.weight"):
        stack_on_base("LEGO-T-PR-16", str(tmp_path / "unet"), in_channels=1, resolution=16)
