"""Latent diffusion end to end on the CPU with a small randomly initialized AutoencoderKL (no download):
lego.encode -> lego.train on the latents -> lego.sample --vae."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error
from PIL import Image

from lego.checkpoints.format import load_checkpoint
from lego.data.datasets import center_crop_arr
from lego.encode import main as encode_main
from lego.sample import main as sample_main
from lego.train import main as train_main

SCALE = 0.7


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=SCALE,
    )
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """12 non-square colour images in two class folders."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(12):
        (root / f"class{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(root / f"class{i % 2}" / f"{i}.png")
    return root


def test_encode_train_sample_with_a_real_autoencoder(tmp_path, vae_dir, image_folder):
    from diffusers import AutoencoderKL

    latents_path = tmp_path / "latents.npy"
    assert (
        encode_main(
            [
                "--vae",
                str(vae_dir),
                "--data",
                str(image_folder),
                "--out",
                str(latents_path),
                "--resolution",
                "32",
                "--batch",
                "5",
                "--no-progress",
            ]
        )
        == 0
    )
    latents = np.load(latents_path, mmap_mode="r")
    assert latents.shape == (12, 4, 16, 16) and latents.dtype == np.float32
    labels = np.load(tmp_path / "latents.labels.npy")
    meta = json.loads((tmp_path / "latents.json").read_text())
    assert meta["scaling_factor"] == pytest.approx(SCALE) and meta["resolution"] == 32 and meta["count"] == 12
    # each latent is the posterior mean of its (ADM-cropped) image, scaled; files sort as 0, 10, 2, 4, 6, 8 per class
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    first = image_folder / "class0" / "0.png"
    with Image.open(first) as im:
        x = torch.from_numpy(center_crop_arr(im.convert("RGB"), 32)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        want = vae.encode(x).latent_dist.mean * SCALE
    torch.testing.assert_close(torch.from_numpy(np.array(latents[0])), want[0], atol=1e-5, rtol=1e-4)
    assert labels.tolist() == [0] * 6 + [1] * 6

    run = tmp_path / "run"
    assert (
        train_main(
            [
                "--data",
                str(latents_path),
                "--model",
                "LEGO-T-PG-16",
                "--batch",
                "4",
                "--steps",
                "2",
                "--sample-n",
                "0",
                "--no-progress",
                "--workers",
                "0",
                "--flip",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    ckpt = load_checkpoint(run / "checkpoint.safetensors", parts=())
    assert ckpt.model_config.in_channels == 4 and ckpt.model_config.num_classes == 2
    assert ckpt.train_config["latents"]["scaling_factor"] == pytest.approx(SCALE)

    png, npz = tmp_path / "s.png", tmp_path / "s.npz"
    assert (
        sample_main(
            [
                "--ckpt",
                str(run / "checkpoint.safetensors"),
                "--vae",
                str(vae_dir),
                "--n",
                "2",
                "--steps",
                "2",
                "--out",
                str(png),
                "--npz",
                str(npz),
            ]
        )
        == 0
    )
    with np.load(npz) as z:
        assert z["samples"].shape == (2, 3, 32, 32) and z["images"].shape == (2, 32, 32, 3)
        assert np.abs(z["samples"]).max() <= 1
    with Image.open(png) as im:
        assert im.mode == "RGB" and im.size[1] == 32 + 4  # one row of decoded 32 x 32 images, 2 px padding


def test_encode_a_grey_npy_to_fp16(tmp_path, vae_dir):
    np.save(tmp_path / "grey.npy", np.random.default_rng(1).integers(0, 256, (3, 16, 16), dtype=np.uint8))
    out = tmp_path / "z.npy"
    (tmp_path / "z.labels.npy").write_bytes(b"stale")  # from an earlier labelled encoding: must go
    assert (
        encode_main(
            [
                "--vae",
                str(vae_dir),
                "--data",
                str(tmp_path / "grey.npy"),
                "--out",
                str(out),
                "--half",
                "--no-progress",
                "--overwrite",
            ]  # (the stale sidecar is refused without it)
        )
        == 0
    )
    z = np.load(out)
    assert z.shape == (3, 4, 8, 8) and z.dtype == np.float16 and not (tmp_path / "z.labels.npy").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey.npy", "z.json", "z.npy"]  # no temporary left


def test_encode_and_sample_bad_input(capsys, monkeypatch, tmp_path, vae_dir, image_folder):
    out = str(tmp_path / "z.npy")
    monkeypatch.setattr("lego.data.vae.hub_reachable", lambda: False)  # as on this project's machines, without waiting
    assert_one_line_error(
        capsys,
        encode_main(["--vae", "nobody/no-such-vae", "--data", str(image_folder), "--out", out]),
        "hub is not reachable",
        "save_pretrained",
    )
    assert_one_line_error(
        capsys,
        encode_main(["--vae", str(tmp_path / "no-vae"), "--data", str(image_folder), "--out", out]),
        "no such folder",
    )
    assert_one_line_error(
        capsys,
        encode_main(["--vae", str(vae_dir), "--data", str(image_folder), "--out", str(tmp_path / "z.npz")]),
        ".npy",
    )
    assert_one_line_error(
        capsys,
        encode_main(["--vae", str(vae_dir), "--data", str(image_folder), "--out", out, "--resolution", "33"]),
        "downsampling factor 2",
    )
    np.save(tmp_path / "lat.npy", np.zeros((2, 4, 8, 8), np.float32))
    assert_one_line_error(
        capsys,
        encode_main(["--vae", str(vae_dir), "--data", str(tmp_path / "lat.npy"), "--out", out]),
        "latents already",
    )
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    assert_one_line_error(
        capsys,
        encode_main(["--vae", str(tmp_path / "broken"), "--data", str(image_folder), "--out", out]),
        "could not load the autoencoder",
    )
    assert not (tmp_path / "z.npy").exists()


def test_encode_replaces_only_with_overwrite_and_cleans_up_after_a_kill(tmp_path, vae_dir, image_folder, capsys):
    """Issue 21, items 2 and 4: lego.encode silently replaced an existing .npy / .json, and a kill -9 left a full-size
    temporary file that nothing removed."""
    import subprocess
    import sys

    out = tmp_path / "z.npy"
    args = ["--vae", str(vae_dir), "--data", str(image_folder), "--out", str(out), "--resolution", "16",
            "--no-progress"]  # fmt: skip
    assert encode_main(args) == 0
    before = {p.name: p.read_bytes() for p in (out, out.with_suffix(".json"), out.with_suffix(".labels.npy"))}
    assert_one_line_error(capsys, encode_main(args), "already there", "--overwrite")
    assert {p.name: p.read_bytes() for p in (out, out.with_suffix(".json"), out.with_suffix(".labels.npy"))} == before
    # what a killed encode leaves: its temporary folder (a dead pid), with a full-size file in it
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f".z.npy.{dead.pid}.0123abcd.tmp"
    orphan.mkdir()
    (orphan / "z.npy").write_bytes(b"x" * 4096)
    assert encode_main([*args, "--overwrite"]) == 0
    assert not orphan.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z.json", "z.labels.npy", "z.npy"]


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory, vae_dir, image_folder):
    """A LEGO-T-PG-16 trained 1 step on lego.encode's latents of image_folder (32 x 32 images, 16 x 16 latents)."""
    root = tmp_path_factory.mktemp("latent-run")
    assert encode_main(["--vae", str(vae_dir), "--data", str(image_folder), "--out", str(root / "z.npy"),
                        "--resolution", "32", "--no-progress"]) == 0  # fmt: skip
    assert train_main(["--data", str(root / "z.npy"), "--model", "LEGO-T-PG-16", "--batch", "4", "--steps", "1",
                       "--sample-n", "0", "--no-progress", "--workers", "0",
                       "--out", str(root / "run")]) == 0  # fmt: skip
    return root / "run" / "checkpoint.safetensors"


def test_latent_samples_are_decoded_right_or_refused(latent_run, vae_dir, tmp_path, capsys, monkeypatch):
    """Issue 21, item 8: a latent model sampled without --vae wrote a PNG of raw latents; a decoder that outputs NaN
    wrote an all-black grid; another autoencoder than the recorded one was used without a word."""
    args = ["--ckpt", str(latent_run), "--n", "2", "--steps", "1"]
    png = tmp_path / "s.png"
    assert_one_line_error(capsys, sample_main([*args, "--out", str(png)]), "draws autoencoder latents", "--vae")
    assert not png.exists()
    assert sample_main([*args, "--out", str(tmp_path / "raw.npz")]) == 0  # the raw latents, kept as asked
    with np.load(tmp_path / "raw.npz") as z:
        assert z["samples"].shape == (2, 4, 16, 16)
    # another copy of the autoencoder: used, with a warning
    copy = tmp_path / "other-vae"
    shutil.copytree(vae_dir, copy)
    capsys.readouterr()
    assert sample_main([*args, "--vae", str(copy), "--out", str(png)]) == 0 and png.exists()
    assert "warning" in capsys.readouterr().err
    # a decoder that gives NaN: one error, nothing written
    from diffusers import AutoencoderKL

    real = AutoencoderKL.decode

    def nan_decoder(self, z, **kwargs):
        out = real(self, z, **kwargs)
        out.sample = torch.full_like(out.sample, float("nan"))
        return out

    monkeypatch.setattr(AutoencoderKL, "decode", nan_decoder)
    out = tmp_path / "nan.png"
    assert_one_line_error(capsys, sample_main([*args, "--vae", str(vae_dir), "--out", str(out)]), "NaN or inf")
    assert not out.exists()
