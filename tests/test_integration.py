"""Features that were built apart, used together: converted checkpoints, DiT models and a base brick through
lego.train (--resume, --compile, torchrun's wrapping), lego.sample and lego.eval. CI-sized: 16 x 16, a few steps."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lego import LegoModel, model_config
from lego.checkpoints.format import load_checkpoint, save_checkpoint
from lego.train import main as train_main


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Two 16 x 16 grey images with labels 0 and 9 (10 classes): loads at once, unlike the embedded MNIST."""
    path = tmp_path_factory.mktemp("data") / "two.npz"
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, (2, 16, 16), dtype=np.uint8), labels=np.array([0, 9]))
    return str(path)


def test_a_converted_checkpoint_resumes_as_lego_train_would(tmp_path, digits, monkeypatch):
    """lego.convert names a model after the snapshot (e.g. lego_T_PG_32) and records its resolution: --resume must
    take the model from the checkpoint, not look that name up in the registry; and fine-tuning must run lego.train's
    optimizer (AdamW without weight decay), not the defaults of the one the converter stored."""
    import lego.checkpoints.snapshots

    config = dataclasses.replace(
        model_config("LEGO-T-PG-16", in_channels=1, num_classes=10), name="lego_T_PG_16", time_scale=1.0
    )
    snapshots = lego.checkpoints.snapshots
    monkeypatch.setattr(snapshots, "read_snapshot", lambda path: snapshots.Snapshot("EDMPrecondLEGO", {}, {}))
    monkeypatch.setattr(snapshots, "model_from_snapshot", lambda *args, **kwargs: LegoModel(config).eval())
    run = tmp_path / "conv"
    snapshots.convert("lego_T_PG_16.pkl", run)  # (no snapshot is read: the two stand-ins above)
    argv = [
        "--resume",
        "--out",
        str(run),
        "--data",
        digits,
        "--steps",
        "1",
        "--batch",
        "2",
        "--sample-n",
        "0",
        "--no-progress",
    ]
    assert train_main(argv) == 0
    after = load_checkpoint(run / "checkpoint.safetensors")
    assert after.step == 1 and after.model_config == config
    assert [g["weight_decay"] for g in after.optimizer["param_groups"]] == [0.0]


def test_fsdp_shards_a_dit_and_matches_one_process(tmp_path):
    """--fsdp shards each brick; a DiT's one brick is its transformer (it has no .bricks), and the sample grid's
    gathered EMA is rebuilt as a DiT."""
    args = [
        "--model",
        "DiT-T/2",
        "--resolution",
        "16",
        "--batch",
        "4",
        "--steps",
        "2",
        "--sample-n",
        "2",
        "--sample-steps",
        "1",
        "--no-progress",
        "--device",
        "cpu",
        "--warmup",
        "1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "lego.train",
            *args,
            "--fsdp",
            "--out",
            str(tmp_path / "fsdp"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "fsdp" / "samples.png").is_file()
    assert train_main([*args, "--sample-n", "0", "--out", str(tmp_path / "one")]) == 0
    sharded, one = (load_checkpoint(tmp_path / name / "checkpoint.safetensors") for name in ("fsdp", "one"))
    assert sharded.step == one.step == 2 and sharded.model.keys() == one.model.keys()
    for key in one.model:
        torch.testing.assert_close(sharded.model[key], one.model[key], atol=1e-5, rtol=0, msg=key)


def test_eval_refuses_to_score_latents_as_images(tmp_path, capsys):
    """A model trained on lego.encode's latents samples latents: lego.eval must not feed them to Inception undecoded
    (tests/test_adm.py scores them decoded, with --vae)."""
    from lego.eval import main as eval_main

    config = model_config("LEGO-T-PG-16", in_channels=4)
    model = LegoModel(config)
    ckpt = tmp_path / "checkpoint.safetensors"
    train_config = {"model": config.name, "data": str(tmp_path / "latents.npy"), "latents": {"scaling_factor": 0.18}}
    save_checkpoint(ckpt, model, LegoModel(config), torch.optim.AdamW(model.parameters()), 1, train_config)
    code = eval_main(["--ckpt", str(ckpt), "--n", "1", "--steps", "1", "--inception", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "latents" in err and "--vae" in err, err


def test_resume_refuses_another_base_or_freezing(tmp_path, capsys, digits):
    """The checkpoint fixes brick 0: --resume with --freeze-base on a trained base, or with another --base-ckpt,
    would be ignored while the saved options claimed it; it is refused in one line."""
    config = model_config("LEGO-T-PG-16", in_channels=1, num_classes=10)
    base = LegoModel(config)
    for name in ("a", "b"):
        save_checkpoint(
            tmp_path / name / "checkpoint.safetensors",
            base,
            LegoModel(config),
            torch.optim.AdamW(base.parameters()),
            1,
            {"model": config.name},
        )
    run = tmp_path / "run"
    fast = ["--data", digits, "--batch", "2", "--sample-n", "0", "--no-progress"]
    assert (
        train_main(
            [
                "--model",
                "LEGO-T-PR-16",
                "--base-ckpt",
                str(tmp_path / "a" / "checkpoint.safetensors"),
                "--steps",
                "1",
                "--out",
                str(run),
                *fast,
            ]
        )
        == 0
    )
    capsys.readouterr()
    for option, needle in (
        (["--freeze-base"], "base is trained"),
        (["--base-ckpt", str(tmp_path / "b" / "checkpoint.safetensors")], "the checkpoint's base"),
    ):
        code = train_main(["--resume", "--out", str(run), "--steps", "2", *option, *fast])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert train_main(["--resume", "--out", str(run), "--steps", "2", *fast]) == 0
    assert load_checkpoint(run / "checkpoint.safetensors", parts=()).step == 2


def test_eval_and_heldout_read_a_mapped_npy_as_train_does(tmp_path, capsys):
    """lego.train reads a memory-mapped .npy (lego.data.datasets); lego.eval's reference set (the checkpoint's --data)
    and lego.heldout's --data read it too, and score it exactly as the same images in an .npz."""
    pytest.importorskip("ccexam", reason="pip install --no-deps ccexam==1.0.0 (.ci/run does)")
    import json

    from lego.eval import main as eval_main
    from lego.heldout import main as heldout_main

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (40, 20, 20), dtype=np.uint8), np.arange(40) % 10
    np.save(tmp_path / "d.npy", images)
    np.save(tmp_path / "d.labels.npy", labels)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    config = model_config("LEGO-T-PG-16", in_channels=1, num_classes=10)
    model = LegoModel(config)
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    save_checkpoint(
        ckpt,
        model,
        LegoModel(config),
        torch.optim.AdamW(model.parameters()),
        1,
        {"model": config.name, "data": str(tmp_path / "d.npy")},
    )
    fd = {}
    for data in ("npy", "npz"):
        argv = ["--ckpt", str(ckpt), "--n", "4", "--steps", "1", "--no-progress", "--data", str(tmp_path / f"d.{data}")]
        assert eval_main(argv[:-2] if data == "npy" else argv) == 0  # npy: the checkpoint's own --data
        fd[data] = json.loads(capsys.readouterr().out.splitlines()[0])["fd"]
    assert fd["npy"] == pytest.approx(fd["npz"], rel=1e-6)
    losses = []
    for data in ("npy", "npz"):
        assert heldout_main(["--ckpt", str(ckpt), "--data", str(tmp_path / f"d.{data}"), "--n", "8"]) == 0
        losses.append(float(capsys.readouterr().out.split("held-out loss ")[1].split()[0]))
    assert losses[0] == losses[1]
