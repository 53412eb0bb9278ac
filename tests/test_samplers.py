"""Fewer network calls per image (issue #23): DPM-Solver++(2M) against diffusers' scheduler, the guidance algebra by
hand (classifier-free, sub-stack, guide model, interval), the evaluations counted, and the options' errors."""

import json

import pytest
import torch

from lego import LegoModel, dpmpp_2m_sampler, generate, guided
from lego.diffusion.cost import CostMeter
from lego.diffusion.samplers import SAMPLERS, guide_bricks
from lego.eval import main as eval_main
from lego.sample import main as sample_main

FIXTURE = "tests/fixtures/tiny_mnist.safetensors"


class ShiftedGaussianNet:
    """The exact denoiser of N(mu, s^2) per pixel: D = mu + (x - mu) s^2 / (s^2 + sigma^2)."""

    sigma_min, sigma_max, num_classes = 0.002, 80.0, 0

    def __init__(self, mu, s):
        self.mu, self.s = mu, s

    def __call__(self, x, sigma, labels=None, skip=()):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return self.mu + (x - self.mu) * self.s**2 / (self.s**2 + sigma**2)


def _diffusers_dpmpp(net, latents, num_steps, sde, generator=None):
    """The same solve through diffusers' EDMDPMSolverMultistepScheduler, which takes the raw network output F: ours
    is recovered from D with the scheduler's own preconditioning, F = (D - c_skip x) / c_out."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.EDMDPMSolverMultistepScheduler(
        sigma_min=0.002, sigma_max=80.0, rho=7.0, solver_order=2, final_sigmas_type="zero",
        algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++",
    )  # fmt: skip
    scheduler.set_timesteps(num_steps)
    x = latents.double() * 80.0
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i].double()
        scheduler.scale_model_input(x, t)
        d = net(x.float(), sigma.float()).double()
        c_skip_x = scheduler.precondition_outputs(x, torch.zeros_like(x), sigma)
        c_out = scheduler.precondition_outputs(torch.zeros_like(x), torch.ones_like(x), sigma)
        x = scheduler.step((d - c_skip_x) / c_out, t, x, generator=generator).prev_sample
    return x.float()


@pytest.mark.parametrize("num_steps", [1, 2, 5, 14, 25])
def test_dpmpp_2m_matches_diffusers_step_for_step(num_steps):
    net, z = ShiftedGaussianNet(0.3, 0.5), torch.randn(64, 1, 4, 4)
    ours = dpmpp_2m_sampler(net, z, num_steps=num_steps)
    torch.testing.assert_close(ours, _diffusers_dpmpp(net, z, num_steps, sde=False), atol=2e-5, rtol=1e-5)
    if num_steps > 2:  # and it is a second-order method, not the first-order one (DPM-Solver++(1) = DDIM)
        first_order = ShiftedGaussianNet(0.3, 0.5)
        assert (ours - _first_order(first_order, z, num_steps)).abs().max() > 1e-3


def _first_order(net, z, num_steps):
    from lego.diffusion.samplers import karras_sigmas

    sigmas = karras_sigmas(net, num_steps)
    x = z.double() * sigmas[0]
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = s_next / s_cur * x + (1 - s_next / s_cur) * net(x.float(), s_cur.float()).double()
    return x.float()


@pytest.mark.parametrize("num_steps", [2, 7])
def test_dpmpp_2m_sde_matches_diffusers_with_the_same_noise(num_steps):
    """The SDE variant draws its noise in the same order and dtype as diffusers' sde-dpmsolver++ (float64 here)."""
    net, z = ShiftedGaussianNet(-0.2, 0.7), torch.randn(32, 1, 4, 4)
    ours = dpmpp_2m_sampler(net, z, num_steps=num_steps, eta=1.0, generator=torch.Generator().manual_seed(5))
    theirs = _diffusers_dpmpp(net, z, num_steps, sde=True, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def test_dpmpp_2m_converges_at_second_order():
    """On a Gaussian the ODE's exact end point is known: x0 = mu + (x_T - mu) s / sqrt(s^2 + sigma_max^2). Doubling
    the steps cuts the error about 4x once the steps are small (first order would halve it)."""
    mu, s = 0.3, 0.5
    net, z = ShiftedGaussianNet(mu, s), torch.randn(16, 1, 2, 2, dtype=torch.float64)
    exact = mu + (z * 80.0 - mu) * s / (s**2 + 80.0**2) ** 0.5
    errors = [(dpmpp_2m_sampler(net, z, num_steps=n).double() - exact).abs().max().item() for n in (40, 80)]
    assert 3.0 < errors[0] / errors[1] < 5.0, errors


class KnobNet:
    """D = 5 - 2 (bricks skipped) + (10 if a class was given, not the null class): numbers to check by hand."""

    sigma_min, sigma_max, num_classes = 0.002, 80.0, 3

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, labels=None, skip=()):
        self.calls.append((x.shape[0], tuple(skip)))
        value = 5.0 - 2.0 * len(skip)
        cond = torch.zeros(x.shape[0]) if labels is None else (labels != self.num_classes).float() * 10
        return (value + cond).view(-1, 1, 1, 1).expand_as(x).clone()


def test_guidance_algebra_by_hand():
    x, y, w = torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), 3.0
    net = KnobNet()
    # classifier-free: D_u = 5, D_c = 15: 5 + 3 (15 - 5) = 35, in one batched call of both halves
    assert guided(net, x, 1.0, y, w).unique().item() == 35.0 and net.calls == [(4, ())]
    # sub-stack: D = 15, D_weak (top brick skipped) = 13: 13 + 3 * 2 = 19, two calls
    net.calls.clear()
    assert guided(net, x, 1.0, y, w, guide=(2,)).unique().item() == 19.0 and net.calls == [(2, ()), (2, (2,))]
    # a step that already skips the top brick: D_weak = D, one call
    net.calls.clear()
    assert guided(net, x, 1.0, y, w, skip=(2,), guide=(2,)).unique().item() == 13.0 and net.calls == [(2, (2,))]
    # a guide model D_weak = 11 (another KnobNet with a brick skipped would say 13; this one is fixed): 11 + 3 * 4
    guide = lambda x, sigma, labels: torch.full_like(x, 11.0)  # noqa: E731
    net.calls.clear()
    assert guided(net, x, 1.0, y, w, guide=guide).unique().item() == 23.0 and net.calls == [(2, ())]
    # the interval: guided inside [0.5, 2], one plain conditional call outside
    assert guided(net, x, 2.0, y, w, interval=(0.5, 2.0)).unique().item() == 35.0
    net.calls.clear()
    assert guided(net, x, 2.5, y, w, interval=(0.5, 2.0)).unique().item() == 15.0 and net.calls == [(2, ())]
    assert guided(net, x, torch.tensor([0.4, 0.4]), y, w, interval=(0.5, 2.0)).unique().item() == 15.0


def _tiny(num_classes=3):
    torch.manual_seed(0)
    return LegoModel.from_name("LEGO-T-PG-16", in_channels=1, num_classes=num_classes, hidden_size=32, num_heads=2)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_guidance_options_reach_every_sampler(sampler):
    """Every sampler takes the interval and both guides; the evaluations counted say so: 4 steps, w 2."""
    model, z, y = _tiny().eval(), torch.randn(2, 1, 16, 16), torch.tensor([0, 2])
    counts = {}
    for name, kwargs in {
        "plain": {"cfg_scale": 1.0},
        "cfg": {"cfg_scale": 2.0},
        "none in interval": {"cfg_scale": 2.0, "guidance_interval": (1e6, 1e7)},
        "sub-stack": {"cfg_scale": 2.0, "guide": (2,)},
        "guide model": {"cfg_scale": 2.0, "guide": _tiny().eval()},
    }.items():
        with CostMeter(model, kwargs.get("guide") if isinstance(kwargs.get("guide"), LegoModel) else None) as meter:
            out = SAMPLERS[sampler](model, z, y, num_steps=4, generator=torch.Generator().manual_seed(0), **kwargs)
        assert torch.isfinite(out).all()
        counts[name] = meter.evaluations / 2
    plain = counts["plain"]
    assert counts["cfg"] == counts["sub-stack"] == counts["guide model"] == 2 * plain
    assert counts["none in interval"] == plain


def test_sub_stack_guidance_costs_only_the_bricks_it_runs():
    model = _tiny().eval()
    with CostMeter(model) as meter:
        generate(model, 2, "dpmpp-2m", steps=3, cfg_scale=2.0, labels=[1], guide_skip=1)
    with CostMeter(model) as cfg:
        generate(model, 2, "dpmpp-2m", steps=3, cfg_scale=2.0, labels=[1])
    assert meter.evaluations == cfg.evaluations == 12
    assert meter.flops(16, 16) < cfg.flops(16, 16)
    assert meter.images == {("model", ()): 6, ("model", (2,)): 6}


def test_guidance_interval_in_sigma():
    """Heun in 5 steps: sigma 80, 17.5, 2.52, 0.17, 0.002, then 0. Guidance only where sigma is in [1, 20]."""
    model = _tiny().eval()
    with CostMeter(model) as meter:
        generate(model, 1, "heun", steps=5, cfg_scale=2.0, labels=[0], guidance_interval=(1.0, 20.0))
    # 9 calls: the Euler steps at the 5 sigmas, the corrections at the next 4; guided (2 evaluations each): the
    # calls at 17.5 and 2.52, twice each
    assert meter.calls == 9 and meter.evaluations == 13


def test_sub_stack_guidance_works_for_unconditional_models_and_cfg_is_refused():
    model = _tiny(num_classes=0).eval()
    out, _ = generate(model, 2, "dpmpp-2m", steps=3, cfg_scale=2.0, guide_skip=1)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="unconditional"):
        generate(model, 2, "dpmpp-2m", steps=3, cfg_scale=2.0)


def test_guide_model_through_the_sliding_window_and_regions():
    model, guide = _tiny().eval(), _tiny().eval()
    out, labels = generate(model, 1, "dpmpp-2m", steps=2, cfg_scale=2.0, height=16, width=32, window=16, stride=8,
                           regions=[(0, 0, 16, 16, 0), (0, 16, 16, 32, 2)], guide=guide)  # fmt: skip
    assert out.shape == (1, 1, 16, 32) and torch.isfinite(out).all() and labels.shape == (1, 16, 32)


def test_guide_bricks():
    model = _tiny()
    assert guide_bricks(model, 1) == (2,) and guide_bricks(model, 2) == (1, 2) and guide_bricks(model, (-1,)) == (2,)
    for bad in (0, 3, (0,), (), (5,)):
        with pytest.raises(ValueError, match="guide"):
            guide_bricks(model, bad)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--guidance-interval", "a,b"], "--guidance-interval must be two numbers"),
        (["--guidance-interval", "1"], "--guidance-interval must be two sigmas"),
        (["--guidance-interval=-1,2"], "--guidance-interval must be two sigmas"),
        (["--guidance-interval", "3,2"], "--guidance-interval must be two sigmas"),
        (["--guidance-interval", "nan,2"], "--guidance-interval must be two sigmas"),
        (["--guidance-interval", "inf,inf"], "--guidance-interval must be two sigmas"),
        (["--guide-skip", "0"], "--guide-skip must be an integer at least 1"),
        (["--guide-skip", "3"], "--guide-skip 3: skip 1 to 2"),
        (["--guide-skip", "1", "--guide-ckpt", FIXTURE], "not both"),
        (["--guide-ckpt", "no/such.safetensors"], "no/such.safetensors"),
    ],
)
def test_sample_guidance_errors(args, message, capsys, tmp_path):
    code = sample_main(["--ckpt", FIXTURE, "--n", "2", "--steps", "2", "--cfg-scale", "2", "--device", "cpu",
                        "--out", str(tmp_path / "s.png"), *args])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "s.png").exists()


def test_guidance_options_need_a_scale(capsys, tmp_path):
    for args in (["--guide-skip", "1"], ["--guidance-interval", "0.3,5"], ["--guide-ckpt", FIXTURE]):
        code = sample_main(["--ckpt", FIXTURE, "--n", "2", "--out", str(tmp_path / "s.png"), *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "--cfg-scale is 1" in err[0], err


def test_sample_reports_evaluations(capsys, tmp_path):
    out = tmp_path / "s.png"
    code = sample_main(["--ckpt", FIXTURE, "--n", "4", "--sampler", "dpmpp-2m", "--steps", "6", "--cfg-scale", "2",
                        "--guide-skip", "1", "--device", "cpu", "--out", str(out)])  # fmt: skip
    assert code == 0 and out.exists()
    assert "12 network evaluations per image" in capsys.readouterr().out


def test_eval_records_how_it_guided(capsys, tmp_path):
    pytest.importorskip("ccexam", reason="pip install --no-deps ccexam==1.0.0 (.ci/run does)")
    report = tmp_path / "eval.json"
    code = eval_main(["--ckpt", FIXTURE, "--n", "4", "--batch", "4", "--sampler", "dpmpp-2m", "--steps", "4",
                      "--cfg-scale", "2", "--guidance-interval", "0.5,inf", "--guide-ckpt", FIXTURE, "--device", "cpu",
                      "--no-progress", "--json", str(report)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    r = json.loads(report.read_text())
    assert r["sampler"] == "dpmpp-2m" and r["guidance_interval"] == "0.5,inf"
    json.loads(report.read_text(), parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))  # no Infinity, no NaN
    assert r["guide_ckpt"] == FIXTURE and r["guide_skip"] is None
    # 4 steps at sigma 80, 9.72, 0.47, 0.002: guided (model + guide) at the first two
    assert r["nfe_per_sample"] == 6
    assert "guidance 2 (tests/fixtures/tiny_mnist.safetensors) for sigma in [0.5,inf]" in capsys.readouterr().out


@pytest.mark.parametrize("sampler", ["dpmpp-2m-sde", "ddpm"])  # stochastic: the samplers' own noise is per seed too
def test_an_image_is_the_same_in_any_batch_for_its_seed(sampler):
    """Issue 22, part of 1: every image from its own seed (EDM's --seeds), whatever the batch it is drawn in."""
    model = _tiny().eval()
    seeds = [7, 3, 11, 0, 5]
    kwargs = {"steps": 3, "labels": torch.tensor(seeds) % 3, "seeds": seeds}
    whole, _ = generate(model, 5, sampler, batch=5, **kwargs)
    pieces, _ = generate(model, 5, sampler, batch=2, **kwargs)
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=0)
    alone, _ = generate(model, 1, sampler, steps=3, labels=[11 % 3], seeds=[11])
    torch.testing.assert_close(alone[0], whole[2], atol=1e-5, rtol=0)
    other, _ = generate(model, 1, sampler, steps=3, labels=[11 % 3], seeds=[12])
    assert (other[0] - whole[2]).abs().max() > 1e-2


def test_sample_with_seeds_writes_adms_arrays(tmp_path, capsys):
    import numpy as np

    out = tmp_path / "s.npz"
    assert sample_main(["--ckpt", FIXTURE, "--seeds", "10-12,40", "--steps", "2", "--device", "cpu",
                        "--out", str(out)]) == 0  # fmt: skip
    with np.load(out) as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (4, 16, 16, 1)  # ADM: uint8 NHWC
        assert z["arr_1"].tolist() == [0, 1, 2, 0] and np.array_equal(z["arr_0"], z["images"])  # class = seed mod 10
    for args, message in ((["--seeds", "5-a"], "cannot read"), (["--seeds", "1-3", "--n", "4"], "3 --seeds"),
                          (["--seeds", "-1"], "--seeds")):  # fmt: skip
        code = sample_main(["--ckpt", FIXTURE, "--steps", "1", "--out", str(tmp_path / "x.npz"), *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
