"""DiT as a model of the pipeline: registry, preconditioning, loss, lego.train / lego.sample / checkpoints."""

import pytest
import torch

pytest.importorskip("diffusers")

from lego import DiTModel, LegoLoss, build_model
from lego.checkpoints.build import load_model
from lego.checkpoints.format import load_checkpoint
from lego.diffusion.samplers import edm_sampler, skip_schedule
from lego.networks.dit import DIT_MODELS, DiTConfig
from lego.networks.registry import MODEL_NAMES, config_from_dict, model_config
from lego.sample import main as sample_main
from lego.train import main as train_main

TINY = {"in_channels": 1, "num_classes": 10, "resolution": 8, "hidden_size": 32, "num_heads": 2, "num_layers": 2}


def test_registry_sizes():
    assert {"DiT-T/2", "DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2", "DiT-S/4"} <= set(DIT_MODELS) <= set(MODEL_NAMES)
    xl = model_config("DiT-XL/2")
    assert (xl.hidden_size, xl.num_heads, xl.num_layers, xl.patch_size) == (1152, 16, 28, 2)
    with pytest.raises(ValueError, match="unknown model option"):
        model_config("DiT-S/2", bricks=())
    with pytest.raises(ValueError, match="unknown model"):
        model_config("DiT-Q/2")


def test_denoiser_is_precond_around_the_backbone():
    net = build_model(model_config("DiT-T/2", **TINY)).eval()
    assert isinstance(net, DiTModel)
    x, sigma, y = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 20.0]), torch.tensor([0, 4, 9])
    f = net(x, sigma, y, every_brick=True)[0].output  # (3, 1, 8, 8)
    c_skip, c_out, _, _ = (c.view(-1, 1, 1, 1) for c in net.precond.coefficients(sigma))
    torch.testing.assert_close(net(x, sigma, y), c_skip * x + c_out * f)
    # DiT's init zeroes the output layer, so an untrained DiT outputs F = 0 and D = c_skip x
    assert f.abs().max() == 0
    with torch.no_grad():  # with the zeroed layers drawn, the output and its class conditioning come alive
        net.net.dit.proj_out_2.weight.normal_()
        net.net.dit.proj_out_1.weight.normal_()
    assert net(x, sigma, y, every_brick=True)[0].output.abs().max() > 0
    null = net(x, sigma, None)
    assert not torch.allclose(null, net(x, sigma, y)), "the null class must differ from the classes"


def test_inputs_are_checked_as_the_lego_model_does():
    # sigma = 0 gave NaN (LegoModel returns x), a negative sigma NaN silently, a label out of range an IndexError
    net = build_model(model_config("DiT-T/2", **TINY)).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(net(x, 0.0), x) and torch.equal(net(x, torch.tensor([0.0, 1.0]))[0], x[0])
        with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
            net(x, -1.0)
        with pytest.raises(ValueError, match=r"class labels must be in 0\.\.9"):
            net(x, 1.0, torch.tensor([0, 11]))


def test_loss_trains_and_labels_drop_once():
    torch.manual_seed(0)
    net = build_model(model_config("DiT-T/2", **TINY))
    dropped = [m for m in net.net.dit.modules() if hasattr(m, "token_drop")]
    assert dropped and all(m.dropout_prob == 0 for m in dropped)
    x, y = torch.randn(4, 1, 8, 8).clamp(-1, 1), torch.arange(4)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):  # one fixed noisy batch: the loss must fall
        loss, per_brick = LegoLoss(label_dropout=0.0)(net, x, y, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert per_brick.shape == (1,)
    assert losses[-1] < 0.5 * losses[0], losses


def test_no_bricks_to_skip_or_subsample():
    net = build_model(model_config("DiT-T/2", **TINY))
    assert skip_schedule(net, 0.0)(0.5) == ()
    with pytest.raises(ValueError, match="no bricks to skip"):
        skip_schedule(net, 0.5)
    with pytest.raises(ValueError, match="no patch-bricks"):
        LegoLoss(patch_fraction=0.5)(net, torch.randn(2, 1, 8, 8))
    out = edm_sampler(net, torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), num_steps=2)  # a larger canvas too
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="square"):
        net(torch.randn(1, 1, 8, 16), 1.0)


def test_train_resume_sample_through_the_cli(tmp_path, capsys):
    run = tmp_path / "dit"
    args = ["--model", "DiT-T/2", "--resolution", "8", "--batch", "4", "--steps", "2", "--sample-n", "2",
            "--sample-steps", "2", "--no-progress", "--out", str(run)]  # fmt: skip
    assert train_main(args) == 0
    assert train_main(["--resume", "--out", str(run), "--steps", "3", "--no-progress"]) == 0
    ckpt = load_checkpoint(run / "checkpoint.safetensors")
    assert ckpt.step == 3 and isinstance(ckpt.model_config, DiTConfig) and ckpt.model_config.name == "DiT-T/2"
    assert config_from_dict(ckpt.model_config.to_dict()) == ckpt.model_config
    net = load_model(run / "checkpoint.safetensors")
    assert isinstance(net, DiTModel) and not net.training
    torch.testing.assert_close(net.state_dict()["net.dit.proj_out_2.weight"], ckpt.ema["net.dit.proj_out_2.weight"])
    assert sample_main(["--ckpt", str(run / "checkpoint.safetensors"), "--n", "2", "--steps", "2",
                        "--out", str(tmp_path / "s.png")]) == 0  # fmt: skip
    assert (tmp_path / "s.png").is_file()
    capsys.readouterr()
    code = sample_main(["--ckpt", str(run / "checkpoint.safetensors"), "--n", "2", "--t-break", "0.5",
                        "--out", str(tmp_path / "t.png")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no bricks to skip" in err
    code = train_main([*args[:-1], str(tmp_path / "p"), "--patch-fraction", "0.5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no patch-bricks" in err
