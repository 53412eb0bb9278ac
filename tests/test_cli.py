"""python -m lego.train / lego.sample: resume, checkpoints, outputs, and a clean one-line error for bad input."""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, save_digits

from lego.checkpoints import format as ckpt_mod
from lego.checkpoints.build import load_model
from lego.checkpoints.format import load_checkpoint
from lego.sample import main as sample_main
from lego.train import main as train_main

FAST = ["--model", "LEGO-T-PG-16", "--batch", "8", "--log-every", "1", "--sample-n", "0", "--no-progress"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A small .npz of real digits (from the embedded default set) so the CLI tests stay fast."""
    return save_digits(tmp_path_factory.mktemp("data") / "digits.npz", 48)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("run")
    assert (
        train_main(
            [*FAST, "--data", digits, "--steps", "4", "--out", str(out), "--sample-n", "10", "--sample-steps", "2"]
        )
        == 0
    )
    return out


def test_train_writes_checkpoint_log_and_samples(trained):
    assert (trained / "checkpoint.safetensors").is_file() and (trained / "config.json").is_file()
    assert (trained / "samples.png").is_file()
    log = (trained / "log.jsonl").read_text().splitlines()
    assert len(log) == 4 and '"img_per_s"' in log[0]
    ckpt = load_checkpoint(trained / "checkpoint.safetensors")
    assert ckpt.step == 4 and ckpt.model_config.in_channels == 1 and ckpt.model_config.num_classes == 10


def test_resume_equals_an_uninterrupted_run(tmp_path, digits):
    full, split = tmp_path / "full", tmp_path / "split"
    assert train_main([*FAST, "--data", digits, "--steps", "6", "--out", str(full)]) == 0
    assert train_main([*FAST, "--data", digits, "--steps", "3", "--out", str(split)]) == 0
    assert train_main(["--resume", "--out", str(split), "--steps", "6", "--no-progress"]) == 0
    a, b = load_checkpoint(full / "checkpoint.safetensors"), load_checkpoint(split / "checkpoint.safetensors")
    assert a.step == b.step == 6
    for part in ("model", "ema"):
        for key in getattr(a, part):
            assert torch.equal(getattr(a, part)[key], getattr(b, part)[key]), f"{part}/{key} differs after resume"
    assert a.optimizer["state"].keys() == b.optimizer["state"].keys()


def test_sample_png_npz_and_large_non_square_canvas(trained, tmp_path):
    png, npz = tmp_path / "s.png", tmp_path / "s.npz"
    code = sample_main(
        [
            "--ckpt",
            str(trained / "checkpoint.safetensors"),
            "--n",
            "3",
            "--out",
            str(png),
            "--npz",
            str(npz),
            "--steps",
            "2",
            "--height",
            "32",
            "--width",
            "48",
            "--t-break",
            "0.5",
            "--cfg-scale",
            "2",
            "--labels",
            "7",
        ]
    )
    assert code == 0 and png.is_file()
    with np.load(npz) as z:
        assert z["samples"].shape == (3, 1, 32, 48) and z["images"].dtype == np.uint8
        assert z["labels"].tolist() == [7, 7, 7]
    for sampler in ("ddpm", "ddim"):
        assert (
            sample_main(
                [
                    "--ckpt",
                    str(trained / "checkpoint.safetensors"),
                    "--n",
                    "2",
                    "--out",
                    str(png),
                    "--overwrite",  # (the grid above is there)
                    "--sampler",
                    sampler,
                    "--steps",
                    "3",
                ]
            )
            == 0
        )


def test_checkpoint_write_is_atomic(trained, monkeypatch, tmp_path):
    model = load_model(trained / "checkpoint.safetensors", use_ema=False)
    opt = torch.optim.AdamW(model.parameters())
    path = tmp_path / "checkpoint.safetensors"
    ema = copy.deepcopy(model)
    ckpt_mod.save_checkpoint(path, model, ema, opt, 1, {"note": "first"})
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_file", broken)
    with pytest.raises(OSError):
        ckpt_mod.save_checkpoint(path, model, ema, opt, 2, {"note": "second"})
    assert path.read_bytes() == before and load_checkpoint(path).step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors", "config.json"]


def test_missing_dataset(capsys, tmp_path):
    assert_one_line_error(
        capsys, train_main([*FAST, "--data", str(tmp_path / "nope"), "--out", str(tmp_path)]), "not found"
    )


def test_corrupt_dataset(capsys, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file at all")
    assert_one_line_error(capsys, train_main([*FAST, "--data", str(bad), "--out", str(tmp_path)]), "corrupt")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(capsys, train_main([*FAST, "--data", str(empty), "--out", str(tmp_path)]), "no images")


def test_missing_and_corrupt_checkpoint(capsys, tmp_path, trained):
    assert_one_line_error(
        capsys, sample_main(["--ckpt", str(tmp_path / "x.safetensors"), "--out", str(tmp_path / "a.png")]), "not found"
    )
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((trained / "checkpoint.safetensors").read_bytes()[:1000])
    assert_one_line_error(capsys, sample_main(["--ckpt", str(bad), "--out", str(tmp_path / "a.png")]), "corrupt")
    assert_one_line_error(capsys, train_main(["--resume", "--out", str(tmp_path), "--no-progress"]), "not found")


def test_unknown_model(capsys):
    with pytest.raises(SystemExit) as e:
        train_main(["--model", "LEGO-M-PG-64"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_canvas_not_divisible(capsys, trained, tmp_path):
    assert_one_line_error(
        capsys,
        sample_main(
            ["--ckpt", str(trained / "checkpoint.safetensors"), "--out", str(tmp_path / "a.png"), "--height", "24"]
        ),
        "not divisible",
        "16",
    )
    assert_one_line_error(capsys, train_main([*FAST, "--resolution", "20", "--out", str(tmp_path)]), "not divisible")


def test_channels_do_not_match_the_checkpoint(capsys, trained, tmp_path):
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, images=np.random.randint(0, 255, (8, 16, 16, 3), dtype=np.uint8))
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.safetensors").write_bytes((trained / "checkpoint.safetensors").read_bytes())
    assert_one_line_error(
        capsys,
        train_main(["--resume", "--out", str(run), "--data", str(rgb), "--no-progress"]),
        "3 channels",
        "takes 1",
    )


def test_bad_options(capsys, trained, tmp_path):
    ckpt = str(trained / "checkpoint.safetensors")
    assert_one_line_error(capsys, sample_main(["--ckpt", ckpt, "--out", str(tmp_path / "a.jpg")]), ".png")
    assert_one_line_error(
        capsys, sample_main(["--ckpt", ckpt, "--out", str(tmp_path / "a.png"), "--labels", "12"]), "out of range"
    )
    assert_one_line_error(
        capsys, train_main([*FAST, "--patch-fraction", "0", "--out", str(tmp_path)]), "--patch-fraction"
    )


def test_cli_error_has_no_traceback_in_a_real_process(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "lego.sample", "--ckpt", str(tmp_path / "none"), "--out", str(tmp_path / "a.png")],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("lego.sample: error:") and "Traceback" not in done.stderr


def test_depths_set_the_blocks_per_brick_and_a_dits_blocks(digits, tmp_path, capsys):
    """lego.train --depths: the architecture a matched-compute comparison needs (issue 24), recorded in the
    checkpoint, kept on --resume and checked against it."""
    run = tmp_path / "lego"
    assert train_main([*FAST, "--data", digits, "--steps", "1", "--out", str(run), "--depths", "1,3,2"]) == 0
    ckpt = load_checkpoint(run / "checkpoint.safetensors", parts=())
    assert [b.depth for b in ckpt.model_config.bricks] == [1, 3, 2] and ckpt.train_config["depths"] == [1, 3, 2]
    assert train_main([*FAST, "--data", digits, "--steps", "2", "--out", str(run), "--resume"]) == 0  # kept
    code = train_main([*FAST, "--data", digits, "--steps", "3", "--out", str(run), "--resume", "--depths", "2,2,2"])
    assert_one_line_error(capsys, code, "--depths 2,2,2", "1,3,2")
    dit = ["--model", "DiT-T/2", "--resolution", "16", "--batch", "8", "--sample-n", "0", "--no-progress", "--data",
           digits, "--steps", "1"]  # fmt: skip
    assert train_main([*dit, "--out", str(tmp_path / "dit"), "--depths", "3"]) == 0
    assert load_checkpoint(tmp_path / "dit" / "checkpoint.safetensors", parts=()).model_config.num_layers == 3
    assert_one_line_error(capsys, train_main([*dit, "--out", str(tmp_path / "d2"), "--depths", "3,3"]), "one number")
    assert_one_line_error(capsys, train_main([*FAST, "--data", digits, "--out", str(tmp_path / "x"), "--depths",
                                              "2,2"]), "3 numbers")  # fmt: skip
    assert_one_line_error(capsys, train_main([*FAST, "--data", digits, "--out", str(tmp_path / "y"), "--depths",
                                              "2,0,2"]), "--depths")  # fmt: skip
