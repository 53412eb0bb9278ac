"""Issue 22: ADM's evaluation protocol (lego.metrics.adm) against independent references, and lego.eval --ref end to
end with a randomly initialised Inception-v3 of the real architecture saved to a file (no download), for a pixel model
and for a latent model decoded by a small random AutoencoderKL."""

import hashlib
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error
from scipy import linalg

from lego.eval import main as eval_main
from lego.metrics.adm import inception_score, knn_radii, precision_recall
from lego.metrics.frechet import feature_stats, frechet_distance

TINY = str(Path(__file__).parent / "fixtures" / "tiny_mnist.safetensors")  # 1 x 16 x 16, 10 classes


def _scipy_fd(mu1, s1, mu2, s2) -> float:
    """ADM's evaluator's formula (scipy's sqrtm of the product)."""
    covmean = linalg.sqrtm(s1 @ s2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("dim", [16, 2023])  # an FID-sized and sFID's own feature size (smaller for speed: 16)
def test_frechet_distance_against_scipy_sqrtm(dim):
    rng = np.random.default_rng(dim)
    dim = min(dim, 96)  # scipy's sqrtm on 2023 x 2023 takes minutes; the algebra does not depend on the size
    a, b = rng.normal(size=(3 * dim, dim)), rng.normal(size=(4 * dim, dim)) @ rng.normal(size=(dim, dim)) * 0.3 + 1
    (mu1, s1), (mu2, s2) = feature_stats(torch.from_numpy(a)), feature_stats(torch.from_numpy(b))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_fd(mu1, s1, mu2, s2), rel=1e-8)


def test_frechet_distance_of_known_gaussians():
    # Features drawn from N(m1, c1^2 I) and N(m2, c2^2 I): FD -> |m1 - m2|^2 + d (c1 - c2)^2 as n grows.
    g = torch.Generator().manual_seed(0)
    d, n = 8, 200_000
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 2.0 + 1.0
    y = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.5 - 1.0
    expected = d * (1.0 - -1.0) ** 2 + d * (2.0 - 0.5) ** 2
    assert frechet_distance(*feature_stats(x), *feature_stats(y)) == pytest.approx(expected, rel=0.01)


def test_inception_score_closed_form():
    # Each row a permutation of one distribution q over K classes, the rows cycling so that the marginal is uniform:
    # KL(p(y|x) || p(y)) = log K - H(q) for every x, so IS = K exp(-H(q)); with splits, the same in each.
    k = 10
    q = torch.softmax(torch.randn(k, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 0)
    rows = torch.stack([q.roll(i) for i in range(k)] * 30)  # 300 rows, every 10 a full cycle
    expected = k * torch.exp((q * q.log()).sum())
    assert inception_score(rows, split=100) == pytest.approx(float(expected), rel=1e-12)
    assert inception_score(q.expand(300, -1)) == pytest.approx(1.0)  # every image alike: IS 1
    # one-hot rows (probabilities that underflowed to 0): 0 log 0 counts 0, and K equally used classes give IS K
    assert inception_score(torch.eye(k).repeat(20, 1)) == pytest.approx(float(k))


def test_precision_recall_on_known_point_sets():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(40, 5, generator=g)
    far = torch.randn(40, 5, generator=g) + 100.0
    # Half the samples are the reference points themselves, half far away: precision 1/2, and every reference point is
    # a sample (distance 0), so recall 1.
    assert precision_recall(ref, torch.cat([ref, far])) == (0.5, 1.0)
    # The samples cover half the reference manifold: the other half of the points sits far away.
    assert precision_recall(torch.cat([ref, far]), ref) == (1.0, 0.5)
    assert precision_recall(ref, far) == (0.0, 0.0)


def test_precision_recall_and_radii_against_brute_force():
    """ADM's ManifoldEstimator (k = 3, squared distances, <=) written out with numpy, on random sets, with blocks
    smaller than the sets (the block loops are where an index would slip)."""
    rng = np.random.default_rng(0)
    ref, smp = rng.normal(size=(37, 6)), rng.normal(size=(29, 6)) * 1.3 + 0.2
    d_rr = ((ref[:, None] - ref[None]) ** 2).sum(-1)
    d_ss = ((smp[:, None] - smp[None]) ** 2).sum(-1)
    d_rs = ((ref[:, None] - smp[None]) ** 2).sum(-1)
    r_ref, r_smp = np.sort(d_rr, 1)[:, 3], np.sort(d_ss, 1)[:, 3]  # index 0: the point itself
    precision = (d_rs <= r_ref[:, None]).any(0).mean()
    recall = (d_rs <= r_smp[None, :]).any(1).mean()
    t_ref, t_smp = torch.from_numpy(ref).float(), torch.from_numpy(smp).float()
    np.testing.assert_allclose(knn_radii(t_ref, block=8).numpy(), r_ref, rtol=1e-5)
    p, r = precision_recall(t_ref, t_smp, block=8)
    assert (p, r) == pytest.approx((precision, recall))
    assert 0 < precision < 1 and 0 < recall < 1  # a case that tells the two apart from trivial answers


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A randomly initialised Inception-v3 of torch-fidelity's architecture, saved as its weights file would be."""
    from lego.errors import LegoError
    from lego.metrics.adm import inception_class

    try:
        cls = inception_class()
    except LegoError:
        pytest.skip("pip install --no-deps torch-fidelity==0.4.0 (.ci/run does)")
    root = tmp_path_factory.mktemp("inception")
    torch.save({}, root / "empty.pth")
    torch.manual_seed(0)
    with mock.patch.object(cls, "load_state_dict"):  # keep the random initialisation
        net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(root / "empty.pth"))
    for m in net.modules():  # BatchNorm statistics that are not the identity, as trained ones are not
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
    torch.save(net.state_dict(), root / "inception.pth")
    return str(root / "inception.pth")


def test_features_are_adms_layout(inception_weights):
    from lego.metrics.adm import InceptionFeatures

    features = InceptionFeatures(inception_weights)
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    f = features(images)
    assert f["pool"].shape == (3, 2048) and f["spatial"].shape == (3, 7 * 17 * 17) and f["probs"].shape == (3, 1008)
    torch.testing.assert_close(f["probs"].sum(1), torch.ones(3))
    # the spatial features are Mixed_6d's 1x1 branch, first 7 channels, in TF's (h, w, c) order
    kept = {}
    hook = features.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: kept.setdefault("x", o))
    features(images[:1])
    hook.remove()
    assert torch.equal(f["spatial"][0].view(17, 17, 7), kept["x"][0, :7].permute(1, 2, 0))
    # grey images are scored as RGB with three equal channels
    grey = images[:, :1]
    torch.testing.assert_close(features(grey)["pool"], features(grey.expand(-1, 3, -1, -1))["pool"])


def _adm_reference(path: Path, n: int, side: int, stats: bool = True, images: bool = True, channels: int = 3):
    rng = np.random.default_rng(1)
    arrays = {}
    if images:
        arrays["arr_0"] = rng.integers(0, 256, (n, side, side, channels), dtype=np.uint8)
    if stats:
        arrays.update(mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    np.savez(path, **arrays)
    return str(path)


def test_eval_ref_end_to_end_for_a_pixel_model(inception_weights, tmp_path, capsys):
    ref = _adm_reference(tmp_path / "VIRTUAL_tiny16.npz", 12, 16, stats=False, channels=1)
    args = ["--ckpt", TINY, "--n", "6", "--steps", "2", "--batch", "4", "--ref", ref, "--inception-weights",
            inception_weights, "--no-progress"]  # fmt: skip
    assert eval_main([*args, "--json", str(tmp_path / "eval.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    report = json.loads((tmp_path / "eval.json").read_text())
    assert json.loads(out[0]) == report
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert report[key] is not None and np.isfinite(report[key]), key
    assert report["fid"] > 0 and report["inception_score"] >= 1 and 0 <= report["precision"] <= 1
    # how it was made
    assert report["reference"]["name"] == "VIRTUAL_tiny16.npz" and report["reference"]["n"] == 12
    assert report["reference"]["sha256"] == hashlib.sha256(Path(ref).read_bytes()).hexdigest()
    assert report["ckpt_sha256"] == hashlib.sha256(Path(TINY).read_bytes()).hexdigest()
    assert report["seeds"] == "0-5" and report["weights"] == "ema" and report["dtype"] == "float32"
    assert report["nfe_per_sample"] == 3 and report["ranks"] == 1 and "torch" in report["versions"]
    assert "FID" in out[1] and "sFID" in out[1] and "VIRTUAL_tiny16.npz" in out[1]
    # The reference's features were cached beside it; a second run reads them and gives the same numbers.
    assert len(list(tmp_path.glob(".VIRTUAL_tiny16.npz.adm-16px-*.npz"))) == 1
    with mock.patch("lego.metrics.adm._adm_arrays", side_effect=AssertionError("read again")):
        assert eval_main(args) == 0
    again = json.loads(capsys.readouterr().out.splitlines()[0])
    assert again["fid"] == report["fid"] and again["recall"] == report["recall"]


def test_inception_alone_scores_against_the_training_set(inception_weights, tmp_path, capsys):
    from conftest import save_digits

    data = save_digits(tmp_path / "digits.npz", 8)
    assert eval_main(["--ckpt", TINY, "--n", "5", "--steps", "1", "--sampler", "ddim", "--inception", "--data", data,
                      "--inception-weights", inception_weights, "--no-progress"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out.splitlines()[0])
    assert report["reference"]["name"] == "digits.npz" and report["reference"]["n"] == 8
    assert report["reference"]["statistics"] == "images" and np.isfinite(report["fid"]) and report["recall"] is not None


def test_stored_statistics_are_used_as_adms_evaluator_does(inception_weights, tmp_path, capsys):
    """A reference batch with mu / sigma / mu_s / sigma_s: FID and sFID come from them; without images, precision and
    recall cannot be computed and are reported as null."""
    ref = _adm_reference(tmp_path / "stats.npz", 0, 16, stats=True, images=False)
    assert eval_main(["--ckpt", TINY, "--n", "4", "--steps", "1", "--ref", ref, "--inception-weights",
                      inception_weights, "--no-progress", "--sampler", "ddim"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out.splitlines()[0])
    assert report["reference"]["statistics"] == "stored statistics"
    assert report["precision"] is None and report["recall"] is None
    # the same FID by hand: the samples' features against N(0, I)
    from lego.generation import draw, load_job
    from lego.metrics.adm import InceptionFeatures, to_uint8_nchw

    job = load_job(TINY, 4, None, 0, None, None, 64, "cpu", sampler="ddim", steps=1)
    feats = InceptionFeatures(inception_weights)(to_uint8_nchw(draw(job).images))
    expected = frechet_distance(*feature_stats(feats["pool"]), np.zeros(2048), np.eye(2048))
    assert report["fid"] == pytest.approx(expected, rel=1e-6)


def test_eval_ref_for_a_latent_model_decodes_its_samples(inception_weights, tmp_path, capsys):
    from diffusers import AutoencoderKL

    from lego import LegoModel, model_config
    from lego.checkpoints.format import save_checkpoint

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=0.7)  # fmt: skip
    vae.save_pretrained(tmp_path / "vae")
    config = model_config("LEGO-T-PG-16", in_channels=4)
    model = LegoModel(config)
    ckpt = tmp_path / "checkpoint.safetensors"
    train_config = {"model": config.name, "data": str(tmp_path / "latents.npy"),
                    "latents": {"vae": str(tmp_path / "vae"), "scaling_factor": 0.7}}  # fmt: skip
    save_checkpoint(ckpt, model, LegoModel(config), torch.optim.AdamW(model.parameters()), 1, train_config)
    ref = _adm_reference(tmp_path / "ref32.npz", 8, 32, stats=False)  # the decoded images are 2 x 16 = 32 pixels
    args = ["--ckpt", str(ckpt), "--n", "4", "--steps", "1", "--sampler", "ddim", "--ref", ref,
            "--inception-weights", inception_weights, "--no-progress"]  # fmt: skip
    # without the autoencoder there are no images to score: one line
    assert_one_line_error(capsys, eval_main(args), "latents", "--vae")
    assert eval_main([*args, "--vae", str(tmp_path / "vae")]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[0])
    assert report["resolution"] == 32 and report["vae"] == str(tmp_path / "vae") and np.isfinite(report["fid"])


@pytest.mark.parametrize(
    ("make", "needles"),
    [
        (lambda p: _adm_reference(p / "empty.npz", 0, 16, stats=False, images=False), ("neither images", "arr_0")),
        (lambda p: _adm_reference(p / "r64.npz", 3, 64, stats=False), ("64x64", "16x16")),
        (lambda p: str(p / "nowhere.npz"), ("does not exist",)),
        (lambda p: np.savez(p / "other.npz", mu=np.zeros(5), sigma=np.eye(5), mu_s=np.zeros(5), sigma_s=np.eye(5))
         or str(p / "other.npz"), ("2048",)),
    ],
)  # fmt: skip
def test_bad_references_get_one_line(inception_weights, tmp_path, capsys, make, needles):
    ref = make(tmp_path)
    code = eval_main(["--ckpt", TINY, "--n", "2", "--steps", "1", "--ref", ref, "--inception-weights",
                      inception_weights, "--no-progress"])  # fmt: skip
    assert_one_line_error(capsys, code, *needles)


def test_missing_or_wrong_inception_weights_get_one_line(tmp_path, capsys):
    args = ["--ckpt", TINY, "--n", "2", "--steps", "1", "--inception", "--no-progress", "--inception-weights"]
    assert_one_line_error(capsys, eval_main([*args, str(tmp_path / "missing.pth")]), "missing.pth", "does not exist",
                          "--inception-weights")  # fmt: skip
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    assert_one_line_error(capsys, eval_main([*args, str(tmp_path / "junk.pth")]), "junk.pth", "Inception-v3 weights")


def test_sweep_reuses_the_reference_and_reports_flops(inception_weights, tmp_path, capsys):
    ref = _adm_reference(tmp_path / "ref.npz", 6, 16, stats=False, channels=1)
    calls = []
    import lego.metrics.evaluate as evaluate

    real = evaluate.load_reference
    with mock.patch.object(evaluate, "load_reference", side_effect=lambda *a: calls.append(a) or real(*a)):
        assert eval_main(["--ckpt", TINY, "--n", "4", "--steps", "2", "--sampler", "dpmpp-2m", "--ref", ref,
                          "--inception-weights", inception_weights, "--no-progress", "--sweep", "cfg-scale=1,2",
                          "t-break=0,0.5"]) == 0  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    points = json.loads(out[0])["sweep"]
    assert len(calls) == 1 and len(points) == 4 and len(out) == 5
    assert [(p["cfg_scale"], p["t_break"]) for p in points] == [(1, 0), (1, 0.5), (2, 0), (2, 0.5)]
    by = {(p["cfg_scale"], p["t_break"]): p for p in points}
    assert by[1, 0.5]["flops_per_sample"] < by[1, 0]["flops_per_sample"] < by[2, 0]["flops_per_sample"]
    assert all(np.isfinite(p["fid"]) for p in points)
    assert_one_line_error(capsys, eval_main(["--ckpt", TINY, "--sweep", "steps=1,2"]), "--sweep", "cfg-scale=")
