"""Nothing a user made is lost, and no wrong answer exits 0 (issue 13; issue 9's option checks).

Each test names the case of the issue it covers. Training runs are tiny (LEGO-T-PG-16, 8 images a step, a few
steps); the kill and signal tests run ``python -m lego.train`` in a subprocess, bounded in time.
"""

import errno
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, save_digits
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import lego.checkpoints.format as ckpt_mod
from lego import LegoBrick, LegoLoss, LegoModel
from lego.checkpoints.build import load_model
from lego.checkpoints.format import load_checkpoint, save_checkpoint
from lego.data.datasets import open_dataset
from lego.data.loader import prepare
from lego.files import atomic_write
from lego.networks.interface import PatchDraw
from lego.sample import main as sample_main
from lego.train import main as train_main
from lego.training.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--model", "LEGO-T-PG-16", "--batch", "8", "--log-every", "1", "--sample-n", "0", "--no-progress"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return save_digits(tmp_path_factory.mktemp("data") / "digits.npz", 32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    """A run folder with a 2-step checkpoint; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert train_main([*FAST, "--data", digits, "--steps", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture
def run(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def all_finite(path) -> bool:
    c = load_checkpoint(path)
    return all(torch.isfinite(v).all() for part in (c.model, c.ema) for v in part.values())


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def child_env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


# -- 1. a diverged run never replaces a good checkpoint ----------------------------------------------------------------
def nan_from(step_no):
    """A LegoLoss whose loss turns NaN from its ``step_no``-th call on (between log steps: --log-every is large)."""
    calls = {"n": 0}
    real = LegoLoss.__call__

    def call(self, *args, **kwargs):
        calls["n"] += 1
        loss, per_brick = real(self, *args, **kwargs)
        return (loss * float("nan"), per_brick) if calls["n"] >= step_no else (loss, per_brick)

    return call


def test_divergence_between_log_steps_keeps_the_last_good_checkpoint(run, capsys, monkeypatch):
    before = (run / "checkpoint.safetensors").read_bytes()
    monkeypatch.setattr(LegoLoss, "__call__", nan_from(2))  # resumed at step 2: step 3 fine, step 4 on NaN
    code = train_main(
        ["--resume", "--out", str(run), "--steps", "8", "--ckpt-every", "4", "--log-every", "100", "--no-progress"]
    )
    assert_one_line_error(capsys, code, "not finite at step 4", "step 2", "kept")
    assert (run / "checkpoint.safetensors").read_bytes() == before and all_finite(run / "checkpoint.safetensors")


def test_divergence_right_after_a_checkpoint_goes_back_to_the_one_before(run, capsys, monkeypatch):
    """Issue 21, item 1: with a checkpoint every step, the newest one holds the weights that gave the NaN loss; it
    was called "kept" and sampled NaN, and the good one before it was gone. Now the one before it is back."""
    before = (run / "checkpoint.safetensors").read_bytes()  # step 2
    monkeypatch.setattr(LegoLoss, "__call__", nan_from(2))  # resumed at step 2: step 3 fine, step 4 on NaN
    code = train_main(["--resume", "--out", str(run), "--steps", "8", "--ckpt-every", "1", "--log-every", "100",
                       "--no-progress"])  # fmt: skip
    assert_one_line_error(capsys, code, "not finite at step 4", "step 2", "kept", "step 3", "dropped")
    assert (run / "checkpoint.safetensors").read_bytes() == before
    assert json.loads((run / "config.json").read_text())["step"] == 2
    assert not list(run.glob("checkpoint-*.safetensors"))


def test_a_large_finite_lr_leaves_a_checkpoint_that_samples(run, capsys, tmp_path):
    """Issue 21, item 1, as reported: --lr 100 diverges a step after the checkpoint it wrote."""
    code = train_main(["--resume", "--out", str(run), "--steps", "12", "--lr", "100", "--warmup", "0",
                       "--ckpt-every", "1", "--log-every", "100", "--no-progress"])  # fmt: skip
    assert_one_line_error(capsys, code, "not finite", "kept")
    step = load_checkpoint(run / "checkpoint.safetensors", parts=()).step
    assert sample_main(["--ckpt", str(run / "checkpoint.safetensors"), "--n", "2", "--steps", "2",
                        "--out", str(tmp_path / "s.png")]) == 0, step  # fmt: skip


def test_the_newest_checkpoints_are_kept(run, digits):
    assert train_main([*FAST, "--data", digits, "--resume", "--out", str(run), "--steps", "6", "--ckpt-every", "1",
                       "--keep-checkpoints", "3"]) == 0  # fmt: skip
    assert sorted(p.name for p in run.glob("checkpoint*.safetensors")) == [
        "checkpoint-4.safetensors", "checkpoint-5.safetensors", "checkpoint.safetensors"
    ]  # fmt: skip
    assert [load_checkpoint(run / f"checkpoint-{s}.safetensors", parts=()).step for s in (4, 5)] == [4, 5]
    assert load_checkpoint(run / "checkpoint.safetensors", parts=()).step == 6
    # a resumed run counts the ones on disk; --keep-checkpoints 1 keeps only the newest
    assert train_main([*FAST, "--data", digits, "--resume", "--out", str(run), "--steps", "7",
                       "--keep-checkpoints", "1"]) == 0  # fmt: skip
    assert sorted(p.name for p in run.glob("checkpoint*.safetensors")) == ["checkpoint.safetensors"]


def test_overwrite_drops_the_old_runs_kept_checkpoints(run, digits):
    assert train_main([*FAST, "--data", digits, "--resume", "--out", str(run), "--steps", "4", "--ckpt-every", "1",
                       "--keep-checkpoints", "3"]) == 0  # fmt: skip
    assert len(list(run.glob("checkpoint-*.safetensors"))) == 2
    assert train_main([*FAST, "--data", digits, "--overwrite", "--out", str(run), "--steps", "2"]) == 0
    assert sorted(p.name for p in run.glob("checkpoint*.safetensors")) == ["checkpoint.safetensors"]


def test_keep_checkpoints_must_be_positive(run, digits, capsys):
    code = train_main([*FAST, "--data", digits, "--resume", "--out", str(run), "--steps", "4",
                       "--keep-checkpoints", "0"])  # fmt: skip
    assert_one_line_error(capsys, code, "--keep-checkpoints must be an integer at least 1")


def test_a_fresh_run_that_diverges_writes_no_checkpoint(tmp_path, digits, capsys, monkeypatch):
    monkeypatch.setattr(LegoLoss, "__call__", nan_from(1))
    code = train_main([*FAST, "--data", digits, "--steps", "3", "--log-every", "100", "--out", str(tmp_path / "r")])
    assert_one_line_error(capsys, code, "not finite at step 1", "no checkpoint was written")
    assert not (tmp_path / "r" / "checkpoint.safetensors").exists()


def test_save_checkpoint_refuses_non_finite_weights(run):
    model = load_model(run / "checkpoint.safetensors", use_ema=False)
    before = (run / "checkpoint.safetensors").read_bytes()
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        save_checkpoint(run / "checkpoint.safetensors", model, model, torch.optim.AdamW(model.parameters()), 3, {})
    assert (run / "checkpoint.safetensors").read_bytes() == before


def test_sampling_a_checkpoint_with_nan_weights_fails(run, capsys, tmp_path):
    path = run / "checkpoint.safetensors"
    with ckpt_mod.safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- not a dict
    for k, v in tensors.items():
        if k.startswith("ema/") and v.is_floating_point():
            tensors[k] = torch.full_like(v, float("nan"))
    del meta["checksums"]  # a checkpoint from before checksums (with them, the damage is caught first: see below)
    save_file(tensors, str(path), metadata=meta)
    assert_one_line_error(
        capsys, sample_main(["--ckpt", str(path), "--out", str(tmp_path / "a.png"), "--steps", "2"]), "NaN or inf"
    )
    assert not (tmp_path / "a.png").exists()


def _rewrite(path, edit):
    """Rewrite a checkpoint with edit(metadata, tensors) applied, its recorded checksums left as they were."""
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- not a dict
    edit(meta, tensors)
    save_file(tensors, str(path), metadata=meta)


def _flip_exponent_bit(part):
    def edit(meta, tensors):
        name = next(k for k, v in tensors.items() if k.startswith(part + "/") and v.dtype == torch.float32)
        bits = tensors[name].clone().view(torch.int32)
        bits.view(-1)[0] ^= 1 << 29  # an exponent bit: the weight grows or shrinks by 2^64, and stays finite
        tensors[name] = bits.view(torch.float32)

    return edit


def test_a_flipped_bit_is_caught_by_the_checksum(run, digits, capsys, tmp_path):
    """Issue 21, item 7: a flipped exponent bit resumed and trained on; now both uses refuse the file, naming it."""
    path = run / "checkpoint.safetensors"
    _rewrite(path, _flip_exponent_bit("model"))
    code = train_main([*FAST, "--data", digits, "--steps", "4", "--out", str(run), "--resume"])
    assert_one_line_error(capsys, code, str(path), "model tensors", "checksum")
    _rewrite(path, _flip_exponent_bit("ema"))
    code = sample_main(["--ckpt", str(path), "--out", str(tmp_path / "a.png"), "--n", "1", "--steps", "1"])
    assert_one_line_error(capsys, code, str(path), "ema tensors", "checksum")
    assert not (tmp_path / "a.png").exists()


def test_an_edited_config_is_caught_by_the_checksum(run, capsys, tmp_path):
    """Issue 21, item 7: a config with two bricks swapped (the same shapes) loaded and sampled."""
    path = run / "checkpoint.safetensors"

    def swap(meta, tensors):
        config = json.loads(meta["model_config"])
        config["bricks"] = config["bricks"][::-1]
        meta["model_config"] = json.dumps(config)

    _rewrite(path, swap)
    code = sample_main(["--ckpt", str(path), "--out", str(tmp_path / "a.png"), "--n", "1", "--steps", "1"])
    assert_one_line_error(capsys, code, str(path), "its metadata", "checksum")


def test_resuming_a_checkpoint_with_a_nan_optimizer_state_names_it(run, digits, capsys):
    # (a damaged file; or an exp_avg_sq that overflowed while the weights stayed finite) --resume used to train on and
    # stop at the next log line with "the run diverged ... Lower --lr", which sends the user after the wrong cause
    path = run / "checkpoint.safetensors"
    with ckpt_mod.safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- not a dict
    name = next(k for k in tensors if k.startswith("optim/") and k.endswith("/exp_avg_sq"))
    tensors[name] = torch.full_like(tensors[name], float("inf"))
    del meta["checksums"]  # a checkpoint from before checksums
    save_file(tensors, str(path), metadata=meta)
    before = path.read_bytes()
    code = train_main([*FAST, "--data", digits, "--steps", "4", "--out", str(run), "--resume"])
    assert_one_line_error(capsys, code, str(path), name, "NaN or inf")
    assert path.read_bytes() == before
    model = load_model(path, use_ema=False)  # and save_checkpoint never writes such a state
    opt = torch.optim.AdamW(model.parameters())
    opt.load_state_dict(load_checkpoint(path).optimizer)
    with pytest.raises(ValueError, match="NaN or inf"):
        save_checkpoint(path, model, model, opt, 3, {})
    assert path.read_bytes() == before


# -- 2. a new run never overwrites a checkpoint; one run per folder ----------------------------------------------------
def test_a_new_run_refuses_a_folder_with_a_checkpoint(run, digits, capsys):
    before = snapshot(run)
    assert_one_line_error(
        capsys,
        train_main([*FAST, "--data", digits, "--steps", "1", "--out", str(run)]),
        "already holds a checkpoint (step 2)",
        "--resume",
        "--overwrite",
    )
    assert snapshot(run) == before
    assert train_main([*FAST, "--data", digits, "--steps", "1", "--out", str(run), "--overwrite"]) == 0
    assert load_checkpoint(run / "checkpoint.safetensors").step == 1
    assert len((run / "log.jsonl").read_text().splitlines()) == 1  # a new log, not the old run's lines


def test_resume_and_overwrite_together_are_refused(run, capsys):
    with pytest.raises(SystemExit) as e:
        train_main(["--resume", "--overwrite", "--out", str(run)])
    assert e.value.code == 2 and "contradict each other" in capsys.readouterr().err


def test_a_second_run_is_kept_out_of_a_folder_in_use(run, digits, capsys):
    before = (run / "checkpoint.safetensors").read_bytes()
    with RunDir(run, resume=True):  # another run holds the folder
        code = train_main(["--resume", "--out", str(run), "--steps", "3", "--no-progress"])
        assert_one_line_error(capsys, code, "in use by another lego.train", f"pid {os.getpid()}")
    assert (run / "checkpoint.safetensors").read_bytes() == before
    assert not (run / ".lock").exists()  # its holder left cleanly


# -- 3. --resume refuses options that contradict the checkpoint --------------------------------------------------------
@pytest.mark.parametrize(
    ("option", "needle"),
    [
        (["--model", "LEGO-T-PR-16"], "--model LEGO-T-PR-16 (the checkpoint holds LEGO-T-PG-16)"),
        (["--resolution", "32"], "--resolution 32 (the checkpoint was trained at 16)"),
        (["--precond", "vp"], "--precond vp"),
    ],
)
def test_resume_refuses_contradicting_options(run, capsys, option, needle):
    before = snapshot(run)
    code = train_main(["--resume", "--out", str(run), "--steps", "3", "--no-progress", *option])
    assert_one_line_error(capsys, code, needle)
    assert snapshot(run) == before


def test_resume_refuses_data_with_other_classes(run, capsys, tmp_path):
    more = tmp_path / "more.npz"
    np.savez(more, images=np.zeros((8, 16, 16), np.uint8), labels=np.arange(8) + 5)  # 13 classes, checkpoint 10
    code = train_main(["--resume", "--out", str(run), "--steps", "3", "--no-progress", "--data", str(more)])
    assert_one_line_error(capsys, code, "13 classes", "has 10")


# -- 4. no orphans; config.json follows the checkpoint -----------------------------------------------------------------
def test_kill_9_during_saves_loses_nothing_and_the_next_start_cleans_up(tmp_path, digits):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "lego.train",
        *FAST,
        "--data",
        digits,
        "--steps",
        "100000",
        "--ckpt-every",
        "1",
        "--out",
        str(out),
    ]
    child = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (out / "log.jsonl").exists() or len((out / "log.jsonl").read_text().splitlines()) < 3:
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the training child made no progress"
            time.sleep(0.05)
        time.sleep(0.013)  # a save happens every step: the kill lands in or near one
    finally:
        child.kill()
        child.wait(timeout=60)
        child.stderr.close()
    ckpt = load_checkpoint(out / "checkpoint.safetensors")  # the file in place is always a whole checkpoint
    assert ckpt.step >= 2 and all_finite(out / "checkpoint.safetensors")
    # Leftovers a kill can leave: this one's temporary folder (if it landed in a save), safetensors' own temporary
    # file, an older version's mkstemp file, and a config.json left a step behind (a kill between the two renames).
    orphan = out / f".checkpoint.safetensors.{dead_pid()}.0123abcd.tmp"
    orphan.mkdir(exist_ok=True)
    (orphan / "checkpoint.safetensors").write_bytes(b"x" * 100)
    (out / ".tmpAbC123").write_bytes(b"x")
    (out / ".config.json.k2j4h5g6.tmp").write_bytes(b"x")
    (out / "config.json").write_text(json.dumps({"step": ckpt.step - 1}))
    assert (out / ".lock").read_text().split()[0] == str(child.pid)  # the killed run's lock file is still there
    with RunDir(out, resume=True):  # the stale lock of the killed run is taken over
        assert json.loads((out / "config.json").read_text())["step"] == ckpt.step
        assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".lock"]
    assert train_main(["--resume", "--out", str(out), "--steps", str(ckpt.step + 1), "--no-progress"]) == 0
    assert load_checkpoint(out / "checkpoint.safetensors").step == ckpt.step + 1
    kept = f"checkpoint-{ckpt.step}.safetensors"  # the one before the newest (--keep-checkpoints 2)
    assert sorted(p.name for p in out.iterdir()) == [kept, "checkpoint.safetensors", "config.json", "log.jsonl"]
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, ckpt.step + 2))  # the killed run's unsaved steps are not logged twice


# -- 5. a full disk, Ctrl-C and SIGTERM --------------------------------------------------------------------------------
def test_a_full_disk_is_one_line_and_keeps_the_checkpoint(run, capsys, monkeypatch):
    before = (run / "checkpoint.safetensors").read_bytes()

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # what a full disk leaves: a partial file
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt_mod, "save_file", full)
    assert_one_line_error(
        capsys,
        train_main(["--resume", "--out", str(run), "--steps", "3", "--no-progress"]),
        "the disk is full",
        "step 2 is intact",
    )
    assert (run / "checkpoint.safetensors").read_bytes() == before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []

    def full_os(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_file", full_os)
    assert_one_line_error(
        capsys, train_main(["--resume", "--out", str(run), "--steps", "3", "--no-progress"]), "the disk is full"
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_once_and_exits_cleanly(tmp_path, digits, signum):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lego.train", *FAST, "--data", digits, "--steps", "100000", "--out", str(out)]
    child = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "log.jsonl").exists() or not (out / "log.jsonl").read_text():
            assert child.poll() is None, child.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the training child made no progress"
            time.sleep(0.05)
        child.send_signal(signum)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 128 + signum, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"stopped by {signal.Signals(signum).name}" in err and "--resume" in err, err
    step = load_checkpoint(out / "checkpoint.safetensors").step
    assert step >= 1 and f"after step {step};" in err  # the step it stopped at is saved (--ckpt-every is 400)
    assert not (out / ".lock").exists()


# -- 6. files honour the umask -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "c.safetensors", lambda tmp: save_file({"a": torch.zeros(2)}, tmp))
        atomic_write(tmp_path / "s.png", lambda tmp: Image.new("L", (4, 4)).save(tmp, format="PNG"))
    finally:
        os.umask(old)
    for name in ("c.safetensors", "s.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "s.png"]


# -- 7. image folders and labels ---------------------------------------------------------------------------------------
def test_mixed_image_sizes_are_scaled_not_cropped(tmp_path):
    wide = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (40, 1))  # 64 wide, 40 high: dark left, bright right
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(np.full((10, 10), 128, np.uint8)).save(tmp_path / "small.png")
    data = open_dataset(str(tmp_path), 16)
    images, _ = data[torch.arange(2)]
    images = prepare(images, 16, None)
    assert images.shape == (2, 3, 16, 16) and "scaled and center-cropped" in data.name
    img = images[1, 0]  # wide.png: its central 40 x 40 square, scaled to 16 x 16, spans most of the ramp
    assert img[:, 0].mean() < -0.5 and img[:, -1].mean() > 0.5 and (img[:, 1:] >= img[:, :-1] - 1e-2).all()
    with pytest.raises(ValueError, match="2 sizes .*10x10, 64x40"):
        open_dataset(str(tmp_path))


def test_a_folder_mixing_classes_and_loose_images_is_refused(tmp_path, capsys):
    data = tmp_path / "data"
    for name in ("cats/a.png", "dogs/b.png", "stray.png"):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(data / name)
    assert_one_line_error(
        capsys,
        train_main([*FAST, "--data", str(data), "--steps", "1", "--out", str(tmp_path / "o")]),
        "cats, dogs",
        "stray.png",
    )


def test_a_huge_label_id_is_refused(tmp_path, capsys):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((3, 16, 16), np.uint8), labels=np.array([0, 1, 1_000_000]))
    assert_one_line_error(
        capsys,
        train_main([*FAST, "--data", str(path), "--steps", "1", "--out", str(tmp_path / "o")]),
        "label id 1000000",
        "renumber",
    )
    assert not (tmp_path / "o").exists()


# -- 10. a NaN in the data is named where it is ------------------------------------------------------------------------
def test_non_finite_latents_name_the_file_and_index(tmp_path, capsys):
    latents = np.random.randn(4, 1, 16, 16).astype(np.float32)
    latents[2, 0, 3, 5] = np.nan
    path = tmp_path / "lat.npz"
    np.savez(path, latents=latents)
    err = assert_one_line_error(
        capsys,
        train_main([*FAST, "--data", str(path), "--steps", "1", "--out", str(tmp_path / "o")]),
        "lat.npz",
        "(2, 0, 3, 5)",
    )
    assert "--lr" not in err


# -- 8. and issue 9: every number checked before any work --------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        ["--steps", "0"],
        ["--steps", "-5"],
        ["--batch", "0"],
        ["--batch", "-4"],
        ["--ckpt-every", "0"],
        ["--log-every", "0"],
        ["--ema", "2"],
        ["--ema", "-1"],
        ["--lr", "inf"],
        ["--lr", "nan"],
        ["--lr", "0"],
        ["--resolution", "-16"],
        ["--resolution", "24"],
        ["--device", "tpu9"],
        ["--warmup", "-1"],
        ["--sample-steps", "0"],
        ["--seed", "-1"],
        ["--label-dropout", "1"],
        ["--patch-fraction", "1.5"],
        ["--sample-n", "-1"],
    ],
)
def test_train_options_are_range_checked(run, capsys, bad):
    before = snapshot(run)
    err = assert_one_line_error(capsys, train_main([*FAST, "--steps", "1", "--out", str(run), *bad]), bad[0])
    assert bad[1] in err
    assert snapshot(run) == before  # nothing in --out harmed


def test_out_must_be_a_writable_folder(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert_one_line_error(capsys, train_main([*FAST, "--steps", "1", "--out", str(afile)]), "is a file")
    assert_one_line_error(
        capsys, train_main([*FAST, "--steps", "1", "--out", str(afile / "sub")]), "cannot write there"
    )
    assert afile.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_out_without_write_permission(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert_one_line_error(
        capsys, train_main([*FAST, "--steps", "1", "--out", str(locked / "run")]), "cannot write there"
    )


@pytest.mark.parametrize(
    "bad",
    [
        ["--batch", "0"],
        ["--batch", "-1"],
        ["--steps", "0"],
        ["--steps", "-2"],
        ["--height", "-16"],
        ["--width", "0"],
        ["--cfg-scale", "nan"],
        ["--churn", "-5"],
        ["--device", "tpu9"],
        ["--n", "0"],
        ["--sampler", "ddpm", "--steps", "2000"],
        ["--sampler", "ddim", "--churn", "10"],
        ["--t-break", "2"],
        ["--seed", "-1"],
        ["--window", "0"],
        ["--window", "-16"],
        ["--stride", "0"],
        ["--max-batch", "0"],
        ["--npz", "also.png"],
    ],
)
def test_sample_options_are_range_checked(trained, tmp_path, capsys, monkeypatch, bad):
    monkeypatch.chdir(tmp_path)  # a relative name (also.png) a regression would write lands here, not in the repo
    out = tmp_path / "a.png"
    code = sample_main(["--ckpt", str(trained / "checkpoint.safetensors"), "--out", str(out), *bad])
    assert_one_line_error(capsys, code, bad[-2])
    assert not out.exists()


def test_a_window_the_bricks_do_not_divide_is_named(trained, tmp_path, capsys):
    code = sample_main(
        [
            "--ckpt",
            str(trained / "checkpoint.safetensors"),
            "--out",
            str(tmp_path / "a.png"),
            "--window",
            "20",
            "--width",
            "48",
        ]
    )
    assert_one_line_error(capsys, code, "--window 20", "multiples of 16")


def test_weights_that_do_not_fit_the_config_are_one_line(run, digits, tmp_path, capsys):
    # A checkpoint whose config no longer describes its tensors (damaged, or written by another version): --resume
    # ended in a 100-line RuntimeError traceback, lego.sample in "(Error(s) in loading state_dict for LegoModel:)"
    path = run / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- not a dict
    config = json.loads(metadata["model_config"])
    metadata["model_config"] = json.dumps({**config, "hidden_size": 2 * config["hidden_size"]})
    del metadata["checksums"]  # a checkpoint from before checksums
    save_file(tensors, str(path), metadata=metadata)
    code = train_main([*FAST, "--data", digits, "--steps", "4", "--out", str(run), "--resume"])
    assert_one_line_error(capsys, code, str(path), "size mismatch for ", "do not fit the model in its config")
    code = sample_main(["--ckpt", str(path), "--out", str(tmp_path / "a.png"), "--n", "1", "--steps", "1"])
    assert_one_line_error(capsys, code, str(path), "size mismatch for ", "do not fit the model in its config")


def test_guidance_of_an_unconditional_model_is_refused(digits, tmp_path, capsys):
    # there is no class to guide towards: --cfg-scale 3 used to be ignored silently (and lego.eval's report said 3)
    from lego.eval import main as eval_main

    with np.load(digits) as z:
        np.savez(tmp_path / "unlabelled.npz", images=z["images"])
    out = tmp_path / "run"
    assert train_main([*FAST, "--data", str(tmp_path / "unlabelled.npz"), "--steps", "1", "--out", str(out)]) == 0
    ckpt = str(out / "checkpoint.safetensors")
    code = sample_main(["--ckpt", ckpt, "--out", str(tmp_path / "a.png"), "--n", "1", "--cfg-scale", "3"])
    assert_one_line_error(capsys, code, "--cfg-scale 3", "unconditional")
    code = eval_main(["--ckpt", ckpt, "--n", "2", "--cfg-scale", "3", "--no-progress"])
    assert_one_line_error(capsys, code, "--cfg-scale 3", "unconditional")
    assert sample_main(["--ckpt", ckpt, "--out", str(tmp_path / "a.png"), "--n", "1", "--steps", "2"]) == 0


def test_guidance_without_a_trained_null_class_is_refused(digits, tmp_path, capsys):
    # --label-dropout 0 never trains the null class, the unconditional half of guidance: --cfg-scale drew from an
    # untrained embedding silently
    out = tmp_path / "run"
    assert train_main([*FAST, "--data", digits, "--steps", "1", "--label-dropout", "0", "--out", str(out)]) == 0
    code = sample_main(
        [
            "--ckpt",
            str(out / "checkpoint.safetensors"),
            "--out",
            str(tmp_path / "a.png"),
            "--n",
            "1",
            "--cfg-scale",
            "2",
        ]
    )
    assert_one_line_error(capsys, code, "--cfg-scale 2", "--label-dropout 0")


def test_non_finite_samples_are_not_written(trained, tmp_path, capsys, monkeypatch):
    from lego.diffusion import samplers

    monkeypatch.setitem(samplers.SAMPLERS, "heun", lambda net, z, *a, **k: torch.full_like(z, float("nan")))
    out = tmp_path / "a.png"
    assert_one_line_error(
        capsys,
        sample_main(["--ckpt", str(trained / "checkpoint.safetensors"), "--out", str(out)]),
        "NaN or inf values, so there is nothing to write",
    )
    assert not out.exists() and not out.with_name("a.png.parts").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu(trained, tmp_path, capsys):
    code = sample_main(
        ["--ckpt", str(trained / "checkpoint.safetensors"), "--out", str(tmp_path / "a.png"), "--device", "cuda"]
    )
    assert_one_line_error(capsys, code, "torch sees none")
    assert_one_line_error(
        capsys, train_main([*FAST, "--steps", "1", "--out", str(tmp_path / "o"), "--device", "cuda"]), "torch sees none"
    )


# -- 9. the Python API -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = LegoModel.from_name("LEGO-T-PG-16", in_channels=1, num_classes=3, depths=(1, 1, 1)).eval()
    with torch.no_grad():  # adaLN-Zero starts at zero: give the outputs something to show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize("precond", ["edm", "vp"])
def test_sigma_zero_returns_x_and_negative_sigma_is_refused(precond):
    model = LegoModel.from_name("LEGO-T-PG-16", in_channels=1, depths=(1, 1, 1), precond=precond).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x, 0.0), x)
        mixed = model(x, torch.tensor([0.0, 1.5]))
        assert torch.equal(mixed[0], x[0]) and torch.allclose(mixed[1], model(x[1:], 1.5)[0], atol=1e-5)
        for bad in (-1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
                model(x, bad)


def test_skip_indices_must_be_in_range(tiny):
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        for bad in ((7,), (3,), (-4,)):
            with pytest.raises(ValueError, match=r"bricks are 0..2 \(or -3..-1 from the top\)"):
                tiny(x, 1.0, skip=bad)
        assert torch.equal(tiny(x, 1.0, skip=(-1,)), tiny(x, 1.0, skip=(2,)))
        assert not torch.equal(tiny(x, 1.0, skip=(-1,)), tiny(x, 1.0, skip=(1,)))


def test_class_labels_are_checked(tiny):
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match="class labels must be in 0..2"):
        tiny(x, 1.0, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="3 class labels for a batch of 2"):
        tiny(x, 1.0, torch.tensor([0, 1, 2]))


def test_brick_conditioning_must_match_the_batch_and_width():
    brick = LegoBrick(8, 4, hidden_size=32, depth=1, num_heads=2, in_channels=1, has_prev=True)
    x = torch.randn(2, 1, 16, 16)
    assert brick(x, None, torch.randn(2, 32)).shape == x.shape
    with pytest.raises(ValueError, match=r"\[2, 32\] \(one row per image\), got \[3, 32\]"):
        brick(x, None, torch.randn(3, 32))
    with pytest.raises(ValueError, match=r"got \[2, 16\]"):
        brick(x, None, torch.randn(2, 16))
    with pytest.raises(ValueError, match="prev must have the canvas's shape"):
        brick(x, torch.randn(1, 1, 16, 16), torch.randn(2, 32))


def test_brick_patch_index_must_name_distinct_patches_of_the_canvas():
    # A 16 x 24 canvas holds 2 x 3 = 6 patches of 8: ids 0..5, each at most once per row. A negative or too large id
    # used to be taken silently (a fused kernel would read and write another image's patch), a repeated one too.
    torch.manual_seed(0)
    brick = LegoBrick(8, 4, hidden_size=32, depth=1, num_heads=2, in_channels=1, has_prev=True)
    x, cond = torch.randn(2, 1, 16, 24), torch.randn(2, 32)
    assert brick(x, None, cond, patch_index=torch.tensor([[0, 5], [3, 1]])).shape == x.shape
    for bad, needle in (
        ([[0, -1], [1, 2]], r"patch_index holds -1, outside 0\.\.5"),
        ([[0, 6], [1, 2]], r"holds 6, outside 0\.\.5"),
        ([[1, 1], [1, 2]], "row 0 lists patch 1 twice"),
    ):
        with pytest.raises(ValueError, match=needle):
            brick(x, None, cond, patch_index=torch.tensor(bad))


def test_patch_ids_are_checked_once_per_brick_and_never_for_the_models_own(tiny, monkeypatch):
    # The check costs a host sync on a GPU: a LegoBrick makes it once (patch_embed; patch_unembed takes the same ids),
    # LegoModel, which draws its ids itself, never (a training step at patch fraction 0.5 draws them for every brick).
    calls = []
    for name in ("patch_embed", "patch_unembed"):  # the modules (the package's attributes are the functions)
        module = importlib.import_module(f"lego_kernels.{name}")
        monkeypatch.setattr(module, "check_patch_ids", lambda op, *args: calls.append(op))
    brick = LegoBrick(8, 4, hidden_size=32, depth=1, num_heads=2, in_channels=1, has_prev=True)
    brick(torch.randn(2, 1, 16, 16), None, torch.randn(2, 32), patch_index=torch.tensor([[0, 3], [2, 1]]))
    assert calls == ["patch_embed"]
    calls.clear()
    outputs = tiny(torch.randn(2, 1, 16, 16), torch.ones(2), torch.tensor([0, 1]), every_brick=True,
                   patches=PatchDraw(0.5, torch.Generator().manual_seed(0)))  # fmt: skip
    assert any(o.patch_index is not None for o in outputs) and calls == []


def test_brick_refuses_a_canvas_without_a_batch_dimension():
    brick = LegoBrick(8, 4, hidden_size=32, depth=1, num_heads=2, in_channels=1, has_prev=True)
    # (was "not enough values to unpack")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\], got shape \(1, 16, 16\)"):
        brick(torch.randn(1, 16, 16), None, torch.randn(1, 32))


def test_class_labels_are_integer_ids_one_per_image(tiny):
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():  # a list works as the tensor does (was "'list' object has no attribute 'to'")
        assert torch.equal(tiny(x, 1.0, [0, 2]), tiny(x, 1.0, torch.tensor([0, 2])))
    with pytest.raises(ValueError, match="integer class ids, got torch.float32"):  # was truncated silently
        tiny(x, 1.0, torch.tensor([0.5, 1.7]))
    # the loss checks them as the model does: one label used to broadcast over the batch silently, a float to be
    # truncated, an id out of range to end in "IndexError: index out of range in self"
    loss = LegoLoss()
    for bad, needle in (
        ([2], "1 class labels for a batch of 2"),
        ([0.5, 1.0], "integer class ids"),
        ([0, 4], r"in 0\.\.2 \(3: none\), got 0\.\.4"),
        ([-1, 0], r"got -1\.\.0"),
    ):
        with pytest.raises(ValueError, match=needle):
            loss(tiny, x, torch.tensor(bad), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss(tiny, x, torch.tensor([0, 3]), torch.Generator().manual_seed(0))[0])


def test_class_labels_for_an_unconditional_model_are_refused():
    # LegoModel.from_name's num_classes defaults to 0: labels given to such a model were ignored silently, by the model
    # and by the loss, so a run meant to be class-conditional trained an unconditional model
    model = LegoModel.from_name("LEGO-T-PG-16", in_channels=1, depths=(1, 1, 1))
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match="unconditional .*num_classes"):
        model(x, 1.0, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unconditional .*num_classes"):
        LegoLoss()(model, x, torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    assert torch.isfinite(LegoLoss()(model, x, None, torch.Generator().manual_seed(0))[0])


def test_brick_names_a_dtype_that_differs_from_its_weights():
    brick = LegoBrick(8, 4, hidden_size=32, depth=1, num_heads=2, in_channels=1, has_prev=True)
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)  # was "mat1 and mat2 must have the same dtype", from a linear
    with pytest.raises(ValueError, match=r"x is torch.float64 but its weights are torch.float32.*autocast"):
        brick(x, None, torch.randn(2, 32, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the way to run a brick in another precision: unchanged
        assert brick(x.float(), None, torch.randn(2, 32)).dtype == torch.bfloat16


def test_latents_far_from_unit_scale_are_warned_about(tmp_path, capsys):
    """Issue 21, item 9: latents with std 1e6 trained without a word."""
    rng = np.random.default_rng(0)
    for scale, warned in ((1e6, True), (1.0, False)):
        data = tmp_path / f"latents-{scale:g}.npz"
        np.savez(data, latents=(scale * rng.standard_normal((8, 4, 16, 16))).astype(np.float32))
        code = train_main([*FAST, "--data", str(data), "--steps", "1", "--out", str(tmp_path / f"run-{scale:g}")])
        err = capsys.readouterr().err
        assert code == 0 and ("warning" in err and "standard deviation 1e+06" in err) == warned, err


# -- issue 21: tracebacks and unclear errors ---------------------------------------------------------------------------
def test_a_negative_size_in_an_older_checkpoints_config_is_one_line(run, digits, capsys, tmp_path):
    """(sample, eval, resume and base ended in "Trying to create tensor with negative dimension")"""
    path = run / "checkpoint.safetensors"

    def negative(meta, tensors):
        meta["model_config"] = json.dumps({**json.loads(meta["model_config"]), "hidden_size": -64})
        del meta["checksums"]  # an older checkpoint: with checksums the edit is caught first

    _rewrite(path, negative)
    code = sample_main(["--ckpt", str(path), "--n", "1", "--steps", "1", "--out", str(tmp_path / "a.png")])
    assert_one_line_error(capsys, code, str(path), "hidden_size must be an integer at least 1, got -64")
    code = train_main([*FAST, "--data", digits, "--steps", "4", "--out", str(run), "--resume"])
    assert_one_line_error(capsys, code, "hidden_size")


def test_running_out_of_memory_is_one_line(capsys):
    from lego.errors import run_cli

    def work():
        torch.empty(1 << 50, dtype=torch.uint8)  # what a canvas or --n too large for the machine ends in

    assert_one_line_error(capsys, run_cli("lego.sample", work), "out of memory", "lower --batch")
    with pytest.raises(RuntimeError, match="not about memory"):  # other RuntimeErrors are bugs: their traceback stays
        run_cli("lego.sample", lambda: (_ for _ in ()).throw(RuntimeError("not about memory")))


def test_eval_of_a_model_that_samples_nan_is_one_line(trained, capsys, monkeypatch):
    pytest.importorskip("ccexam", reason="pip install --no-deps ccexam==1.0.0 (.ci/run does)")
    from lego.diffusion import samplers
    from lego.eval import main as eval_main

    monkeypatch.setitem(samplers.SAMPLERS, "heun", lambda net, z, *a, **k: torch.full_like(z, float("nan")))
    code = eval_main(["--ckpt", str(trained / "checkpoint.safetensors"), "--n", "4", "--no-progress"])
    assert_one_line_error(capsys, code, "NaN or inf", "nothing to write or score")  # (it was a LinAlgError)


def test_a_stride_longer_than_the_window_is_refused(capsys, tmp_path):
    args = ["--ckpt", str(ROOT / "tests/fixtures/tiny_mnist.safetensors"), "--n", "1", "--steps", "1", "--height",
            "16", "--width", "48", "--window", "16", "--stride", "24", "--out", str(tmp_path / "a.png")]  # fmt: skip
    assert_one_line_error(capsys, sample_main(args), "--stride 24", "at most the window")  # (was "NaN ... guidance")


def test_a_conditioning_of_another_dtype_is_named():
    brick = LegoBrick(brick_size=4, field_size=2, hidden_size=32, depth=1, num_heads=2, in_channels=1)
    with pytest.raises(ValueError, match="cond is torch.float64"):  # (was "mat1 and mat2 must have the same dtype")
        brick(torch.randn(2, 1, 8, 8), None, torch.randn(2, 32, dtype=torch.float64))
    # a float64 LegoModel: the advice was x.to(...), which the model undoes (it computes in float32)
    model = LegoModel.from_name("LEGO-T-PG-16", in_channels=1, hidden_size=32, num_heads=2).double()
    with pytest.raises(ValueError, match=r"model\.float\(\)"):
        model(torch.randn(1, 1, 16, 16, dtype=torch.float64), 1.0)


def test_a_negative_region_class_is_named(capsys, tmp_path):
    args = ["--ckpt", str(ROOT / "tests/fixtures/tiny_mnist.safetensors"), "--n", "1", "--steps", "1", "--height",
            "16", "--width", "32", "--regions", "0:16=-1,16:32=2", "--out", str(tmp_path / "a.png")]  # fmt: skip
    assert_one_line_error(capsys, sample_main(args), "--regions: classes must be in 0..9")  # (was "without a class")


def test_encode_on_a_missing_gpu_and_a_unet_as_vae_are_one_line(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from lego.encode import main as encode_main

    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    out = str(tmp_path / "z.npy")
    assert_one_line_error(capsys, encode_main(["--vae", str(unet), "--data", "default", "--out", out]), "UNet2DModel")
    if not torch.cuda.is_available():
        code = encode_main(["--vae", str(unet), "--data", "default", "--out", out, "--device", "cuda"])
        assert_one_line_error(capsys, code, "cuda")


def test_a_full_disk_after_the_checkpoint_or_at_the_log_says_what_happened(run, digits, capsys, monkeypatch):
    """Issue 21: "nothing was replaced" after the checkpoint was written (config.json failed), and a bare Errno 28 when
    the log could not be appended to."""
    real_write = ckpt_mod.write_config_json

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "write_config_json", full)
    code = train_main([*FAST, "--data", digits, "--steps", "3", "--out", str(run), "--resume", "--log-every", "100"])
    assert_one_line_error(capsys, code, "checkpoint of step 3 was written", "not config.json", "disk is full")
    assert load_checkpoint(run / "checkpoint.safetensors", parts=()).step == 3
    monkeypatch.setattr(ckpt_mod, "write_config_json", real_write)

    real_open = open

    def no_log(path, *args, **kwargs):
        if str(path).endswith("log.jsonl") and args[:1] == ("a",):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("lego.training.loop.open", no_log, raising=False)
    code = train_main([*FAST, "--data", digits, "--steps", "5", "--out", str(run), "--resume"])
    assert_one_line_error(capsys, code, "could not write the training log", "No space left", "step 3 is intact")


def test_sample_and_eval_replace_their_files_only_with_overwrite(trained, tmp_path, capsys):
    """Issue 21: every tool that writes follows one rule: what is there is replaced only with --overwrite."""
    ckpt = str(trained / "checkpoint.safetensors")
    out = tmp_path / "s.png"
    args = ["--ckpt", ckpt, "--n", "1", "--steps", "1", "--out", str(out)]
    assert sample_main(args) == 0
    before = out.read_bytes()
    assert_one_line_error(capsys, sample_main([*args, "--seed", "1"]), "already there", "--overwrite")
    assert out.read_bytes() == before
    assert sample_main([*args, "--seed", "1", "--overwrite"]) == 0 and out.read_bytes() != before
    from lego.eval import main as eval_main

    report = tmp_path / "eval.json"
    report.write_text("{}")
    code = eval_main(["--ckpt", ckpt, "--n", "2", "--steps", "1", "--json", str(report), "--no-progress"])
    assert_one_line_error(capsys, code, "--json", "already there")
    assert report.read_text() == "{}"


def test_io_errors_name_the_file_asked_for_not_a_temporary_one(tmp_path):
    """Issue 21: I/O errors named our temporary paths (.NAME.PID.RANDOM.tmp)."""
    (tmp_path / "a-file").write_text("x")
    target = tmp_path / "a-file" / "out.json"

    def fail(tmp):
        raise OSError(28, "No space left on device", str(tmp))

    for path, write in ((target, lambda tmp: None), (tmp_path / "ok.json", fail)):
        with pytest.raises(OSError) as e:
            atomic_write(path, write)
        assert e.value.filename == str(path) and ".tmp" not in str(e.value)
    assert e.value.errno == 28
