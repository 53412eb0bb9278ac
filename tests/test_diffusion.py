"""Preconditioning identities, the loss, and every sampler (on analytic denoisers and on a tiny LegoModel)."""

import math

import pytest
import torch

from lego import (
    EDMPrecond,
    LegoLoss,
    LegoModel,
    VPPrecond,
    ddim_sampler,
    ddpm_sampler,
    dpmpp_2m_sampler,
    edm_sampler,
    skip_schedule,
)
from lego.diffusion.samplers import respaced_alphas
from lego.networks.interface import PatchDraw

SIGMAS = torch.tensor([0.002, 0.05, 0.5, 1.0, 7.0, 80.0], dtype=torch.float64)


def test_edm_preconditioning_identities():
    p = EDMPrecond(sigma_data=0.5)
    c_skip, c_out, c_in, c_noise = p.coefficients(SIGMAS)
    sd = 0.5
    # the network input c_in * x has unit variance, x = x0 + sigma n with Var(x0) = sd^2
    torch.testing.assert_close(c_in**2 * (sd**2 + SIGMAS**2), torch.ones_like(SIGMAS))
    # the training target F* = (x0 - c_skip x) / c_out has unit variance
    var_target = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * SIGMAS**2) / c_out**2
    torch.testing.assert_close(var_target, torch.ones_like(SIGMAS))
    # the loss weight makes the effective weight on F unity (Karras et al., Eq. 8)
    torch.testing.assert_close(p.loss_weight(SIGMAS) * c_out**2, torch.ones_like(SIGMAS))
    torch.testing.assert_close(c_noise, SIGMAS.log() / 4)
    # sigma -> 0: D -> x; sigma -> inf: D -> the network alone
    assert c_skip[0] > 0.9999 and c_out[0] < 0.0021 and c_skip[-1] < 1e-4


def test_edm_sigma_distribution():
    s = EDMPrecond().sample_sigma(20000, torch.Generator().manual_seed(0), "cpu")
    assert abs(s.log().mean().item() + 1.2) < 0.05 and abs(s.log().std().item() - 1.2) < 0.05


def test_vp_preconditioning_is_ddpm():
    p = VPPrecond()
    abar = p.alphas_cumprod
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(abar, torch.cumprod(1 - betas, 0))
    t = torch.tensor([0, 10, 500, 999])
    sigma = p.sigmas[t]
    c_skip, c_out, c_in, c_noise = p.coefficients(sigma)
    assert torch.equal(c_noise.long(), t)  # the network sees the DDPM step index
    x0, eps = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    x = x0 + sigma[:, None] * eps
    # the network input is DDPM's x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
    torch.testing.assert_close(c_in[:, None] * x, abar[t].sqrt()[:, None] * x0 + (1 - abar[t]).sqrt()[:, None] * eps)
    # a perfect epsilon prediction gives D = x0, and the weighted loss is |eps_pred - eps|^2
    torch.testing.assert_close(c_skip[:, None] * x + c_out[:, None] * eps, x0)
    torch.testing.assert_close(p.loss_weight(sigma) * c_out**2, torch.ones(4, dtype=torch.float64))


class PointNet:
    """The exact denoiser of a one-point data distribution at x_star: D(x; sigma) = x_star."""

    sigma_min, sigma_max, num_classes = 0.002, 80.0, 0

    def __init__(self, x_star):
        self.x_star = x_star
        self.calls = []

    def __call__(self, x, sigma, labels=None, skip=()):
        self.calls.append(tuple(skip))
        return self.x_star.expand_as(x)


class GaussianNet(PointNet):
    """The exact denoiser of N(0, s^2): D = x s^2 / (s^2 + sigma^2)."""

    def __init__(self, s):
        self.s = s
        self.calls = []

    def __call__(self, x, sigma, labels=None, skip=()):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return x * self.s**2 / (self.s**2 + sigma**2)


# (name, sampler call); `fine` asks for enough steps that discretization error is far below the test tolerance.
SAMPLER_CASES = [
    ("heun", lambda net, z, g, fine: edm_sampler(net, z, num_steps=200 if fine else 18, generator=g)),
    (
        "heun-churn",
        lambda net, z, g, fine: edm_sampler(
            net, z, num_steps=200 if fine else 18, S_churn=10, S_min=0.05, S_max=20, S_noise=1.0, generator=g
        ),
    ),
    ("ddpm", lambda net, z, g, fine: ddpm_sampler(net, z, num_steps=1000 if fine else 100, generator=g)),
    ("ddim", lambda net, z, g, fine: ddim_sampler(net, z, num_steps=1000 if fine else 50, generator=g)),
    ("ddim-eta", lambda net, z, g, fine: ddim_sampler(net, z, num_steps=1000 if fine else 50, eta=1.0, generator=g)),
    ("dpmpp-2m", lambda net, z, g, fine: dpmpp_2m_sampler(net, z, num_steps=200 if fine else 10, generator=g)),
    (
        "dpmpp-2m-sde",
        lambda net, z, g, fine: dpmpp_2m_sampler(net, z, num_steps=500 if fine else 20, eta=1.0, generator=g),
    ),
]


@pytest.mark.parametrize("name,run", SAMPLER_CASES, ids=[c[0] for c in SAMPLER_CASES])
def test_sampler_reaches_a_point_distribution(name, run):
    x_star = torch.randn(1, 2, 4, 4)
    out = run(PointNet(x_star), torch.randn(8, 2, 4, 4), torch.Generator().manual_seed(0), False)
    torch.testing.assert_close(out, x_star.expand(8, 2, 4, 4), atol=2e-3, rtol=0)


@pytest.mark.parametrize("name,run", SAMPLER_CASES, ids=[c[0] for c in SAMPLER_CASES])
def test_sampler_reproduces_a_gaussian(name, run):
    """Data N(0, 0.5^2) with its exact denoiser: the samples' spread is right (0.5 within 0.015; measured errors at
    these step counts are <= 0.004, while a wrong posterior variance or ODE step is off by 0.05 or more)."""
    s = 0.5
    out = run(GaussianNet(s), torch.randn(4000, 1, 2, 2), torch.Generator().manual_seed(1), True)
    assert abs(out.mean().item()) < 0.02
    assert abs(out.std().item() - s) < 0.015, f"{name}: std {out.std().item():.3f}, want {s}"


def test_respacing_is_a_uniform_stride():
    abar = VPPrecond().alphas_cumprod
    r = respaced_alphas(250)
    assert r.shape == (250,) and r[0] == abar[0] and r[-1] == abar[-1]
    with pytest.raises(ValueError):
        respaced_alphas(0)


def test_skip_schedules():
    pg = LegoModel.from_name("LEGO-T-PG-16", hidden_size=32, num_heads=2)
    pr = LegoModel.from_name("LEGO-T-PR-16", hidden_size=32, num_heads=2)
    pg_skip, pr_skip = skip_schedule(pg, 0.5), skip_schedule(pr, 0.5)
    assert pg_skip(1.0) == () and pg_skip(0.5) == (2,) and pg_skip(0.1) == (2,)  # image-brick at low noise
    assert pr_skip(1.0) == (2,) and pr_skip(0.6) == (2,) and pr_skip(0.5) == ()  # patch-brick at high noise
    assert skip_schedule(pg, 0.0)(0.01) == ()
    net = PointNet(torch.zeros(1, 1, 2, 2))
    edm_sampler(net, torch.randn(1, 1, 2, 2), num_steps=10, skip=pg_skip)
    skipped = sum(1 for c in net.calls if c == (2,))
    assert 0.4 < skipped / len(net.calls) < 0.65


@pytest.mark.parametrize("sampler", [edm_sampler, ddpm_sampler, ddim_sampler, dpmpp_2m_sampler])
def test_samplers_take_fixed_skip_indices_as_the_model_does(sampler):
    # model(x, sigma, skip=(2,)) takes indices; the samplers take those too (was "'tuple' object is not callable")
    net = PointNet(torch.zeros(1, 1, 2, 2))
    sampler(net, torch.randn(1, 1, 2, 2), num_steps=3, skip=(2,))
    assert net.calls and all(c == (2,) for c in net.calls)
    with pytest.raises(TypeError, match="skip must be"):
        sampler(net, torch.randn(1, 1, 2, 2), num_steps=3, skip=0.5)


def test_edm_sampler_needs_a_step():
    # (ddpm/ddim already said "num_steps must be in [1, 1000]"; heun ended in "IndexError: index 0 is out of bounds")
    with pytest.raises(ValueError, match="num_steps must be at least 1, got 0"):
        edm_sampler(PointNet(torch.zeros(1, 1, 2, 2)), torch.randn(1, 1, 2, 2), num_steps=0)


def test_classifier_free_guidance_extrapolates():
    class LabelNet(PointNet):
        num_classes = 3

        def __call__(self, x, sigma, labels=None, skip=()):
            return (labels != self.num_classes).float().view(-1, 1, 1, 1).expand_as(x)  # cond 1, uncond 0

    from lego.diffusion.samplers import guided

    d = guided(LabelNet(None), torch.zeros(2, 1, 2, 2), 1.0, torch.tensor([0, 2]), cfg_scale=3.0)
    torch.testing.assert_close(d, torch.full((2, 1, 2, 2), 3.0))


@pytest.mark.parametrize("sampler", [edm_sampler, ddpm_sampler, ddim_sampler, dpmpp_2m_sampler])
def test_samplers_on_a_tiny_lego_model(sampler):
    model = LegoModel.from_name("LEGO-T-U-16", in_channels=1, num_classes=3, hidden_size=32, num_heads=2)
    model.eval()
    z = torch.randn(2, 1, 16, 32)
    out = sampler(model, z, torch.tensor([0, 2]), num_steps=3, cfg_scale=1.5, skip=skip_schedule(model, 0.5))
    assert out.shape == z.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("precond", ["edm", "vp"])
def test_loss_falls_when_overfitting_a_few_images(precond):
    torch.manual_seed(0)
    model = LegoModel.from_name(
        "LEGO-T-PG-16", in_channels=1, num_classes=2, hidden_size=48, num_heads=2, precond=precond
    )
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    labels = torch.tensor([0, 1, 0, 1])
    loss_fn = LegoLoss(patch_fraction=0.5, label_dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def mean_loss(seed0):  # the loss over a fixed set of noise draws
        with torch.no_grad():
            return (
                sum(
                    loss_fn(model, images, labels, torch.Generator().manual_seed(seed0 + i))[0].item() for i in range(8)
                )
                / 8
            )

    before = mean_loss(10_000)
    for step in range(80):
        loss, per_brick = loss_fn(model, images, labels, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mean_loss(10_000)
    assert per_brick.shape == (3,)
    assert after < 0.6 * before, f"{precond}: loss {before:.3f} -> {after:.3f}"


def test_loss_counts_processed_pixels_only():
    """With a fill equal to the target, unprocessed pixels would contribute exactly zero error; the masked mean must
    still equal the mean over processed pixels, not the diluted mean over all pixels."""
    model = LegoModel.from_name("LEGO-T-PG-16", in_channels=1, hidden_size=32, num_heads=2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    loss, per_brick = LegoLoss(patch_fraction=0.25, label_dropout=0.0)(
        model, images, None, torch.Generator().manual_seed(0)
    )
    g = torch.Generator().manual_seed(0)
    p = model.precond
    sigma = p.sample_sigma(2, g, "cpu")
    noise = torch.randn(images.shape, generator=g)
    x = images + sigma.view(-1, 1, 1, 1) * noise
    c_skip, c_out, _, _ = (c.view(-1, 1, 1, 1) for c in p.coefficients(sigma))
    outs = model(x, sigma, None, patches=PatchDraw(0.25, g), x0=images, every_brick=True)
    err = p.loss_weight(sigma).view(-1, 1, 1, 1) * (c_skip * x + c_out * outs[0].output - images) ** 2
    want = err[outs[0].mask.bool()].mean()
    torch.testing.assert_close(per_brick[0], want.detach())
    assert per_brick[0] > 1.5 * err.mean()  # the diluted mean would be 4x smaller
    assert math.isclose(loss.item(), per_brick.mean().item(), rel_tol=1e-6)
