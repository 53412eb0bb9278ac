"""Training at scale on the CPU: torchrun with 2 gloo ranks (DDP and FSDP2) gives the weights of one process, runs
resume across rank counts, gradient accumulation keeps the global batch, and torch.compile takes the bricks whole."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lego.checkpoints.format import load_checkpoint
from lego.train import main as train_main

# Every random draw of training is on: patch selection, label dropout, flips; the data are a memory-mapped uint8 .npy
# of 28 x 28 digits, resized on the fly to the model's 16 x 16 canvas.
FAST = [
    "--model",
    "LEGO-T-PG-16",
    "--batch",
    "8",
    "--log-every",
    "1",
    "--sample-n",
    "0",
    "--no-progress",
    "--patch-fraction",
    "0.5",
    "--flip",
    "--workers",
    "1",
    "--lr",
    "3e-3",
    "--warmup",
    "1",
]


@pytest.fixture(scope="module")
def digits_npy(tmp_path_factory):
    from lego.data.datasets import open_dataset

    data = open_dataset("default")
    path = tmp_path_factory.mktemp("data") / "digits.npy"
    np.save(path, ((data.images[:40, 0] + 1) * 127.5).round().to(torch.uint8).numpy())  # [40, 28, 28]
    np.save(path.with_suffix(".labels.npy"), data.labels[:40].numpy())
    return str(path)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, digits_npy):
    """A one-process run to step 3, and the same run resumed to step 5."""
    root = tmp_path_factory.mktemp("one")
    at3, at5 = root / "at3", root / "at5"
    assert train_main([*FAST, "--data", digits_npy, "--steps", "3", "--out", str(at3)]) == 0
    shutil.copytree(at3, at5)
    assert train_main(["--resume", "--out", str(at5), "--steps", "5", "--no-progress", "--workers", "0"]) == 0
    return at3, at5


def _torchrun(*args):
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
            "--device",
            "cpu",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _assert_same_run(a: Path, b: Path, atol=1e-5):
    ca, cb = load_checkpoint(a / "checkpoint.safetensors"), load_checkpoint(b / "checkpoint.safetensors")
    assert ca.step == cb.step
    for part in ("model", "ema"):
        ta, tb = getattr(ca, part), getattr(cb, part)
        assert ta.keys() == tb.keys()
        for key in ta:
            torch.testing.assert_close(ta[key], tb[key], atol=atol, rtol=0, msg=f"{part}/{key}")
    assert ca.optimizer["state"].keys() == cb.optimizer["state"].keys()
    for idx, state in ca.optimizer["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(value, cb.optimizer["state"][idx][name], atol=atol, rtol=1e-4)


def _log(path: Path):
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


def test_two_ranks_equal_one_process_and_resume_into_one(tmp_path, digits_npy, one_process):
    at3, at5 = one_process
    ddp = tmp_path / "ddp"
    done = _torchrun(*FAST, "--data", digits_npy, "--steps", "3", "--out", str(ddp))
    assert "2 ranks" in done.stdout
    _assert_same_run(ddp, at3)
    # rank 0 alone logs, and logs the global batch's loss
    one, two = _log(at3), _log(ddp)
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    # the 2-rank checkpoint resumed by one process continues the same run
    assert train_main(["--resume", "--out", str(ddp), "--steps", "5", "--no-progress", "--workers", "0"]) == 0
    _assert_same_run(ddp, at5)


def test_fsdp_with_grad_accum_resumes_a_one_process_run(tmp_path, one_process):
    at3, at5 = one_process
    run = tmp_path / "fsdp"
    shutil.copytree(at3, run)
    done = _torchrun(
        "--resume", "--out", str(run), "--steps", "5", "--no-progress", "--fsdp", "--grad-accum", "2", "--workers", "0"
    )
    assert "steps 3..5" in done.stdout
    _assert_same_run(run, at5)


def test_grad_accum_keeps_the_global_batch(tmp_path, digits_npy, one_process):
    at3, _ = one_process
    run = tmp_path / "accum"
    assert (
        train_main(
            [*FAST, "--data", digits_npy, "--steps", "3", "--out", str(run), "--grad-accum", "4", "--workers", "0"]
        )
        == 0
    )
    _assert_same_run(run, at3)


def test_batch_must_split_over_ranks_and_micro_steps(capsys, tmp_path, digits_npy):
    code = train_main([*FAST, "--data", digits_npy, "--steps", "1", "--out", str(tmp_path), "--grad-accum", "3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--batch 8" in err and "multiple of 3" in err
    code = train_main([*FAST, "--data", digits_npy, "--steps", "1", "--out", str(tmp_path), "--compile", "nope"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--compile nope" in err


def test_fsdp_needs_torchrun(capsys, tmp_path, digits_npy):
    code = train_main([*FAST, "--data", digits_npy, "--steps", "1", "--out", str(tmp_path), "--fsdp"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "torchrun" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_compiled_bricks_are_one_graph_with_the_fused_ops_as_single_nodes():
    """--compile's fullgraph compile of a brick: no graph break, each fused op one node of the graph, and the same
    loss and gradients as eager. The fused ops are the Triton ones here (run by the interpreter on the CPU)."""
    from lego import BrickSpec, LegoLoss, LegoModel
    from lego.training.loop import compile_bricks

    graphs = []

    def capture(gm, example_inputs):  # a torch.compile backend that records the graph and runs it as it is
        graphs.append(gm)
        return gm.forward

    model = LegoModel.from_name(
        "LEGO-T-PG-16",
        in_channels=1,
        num_classes=3,
        hidden_size=32,
        num_heads=2,
        bricks=(BrickSpec(8, 4, 1), BrickSpec(16, 8, 1)),
        backend="triton",
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    eager = LegoModel(model.config)
    eager.load_state_dict(model.state_dict())
    compile_bricks(model, capture)
    images, labels = torch.rand(2, 1, 16, 16) * 2 - 1, torch.tensor([0, 2])
    loss_fn = LegoLoss(patch_fraction=0.5)
    losses = []
    for net in (model, eager):
        loss, _ = loss_fn(net, images, labels, torch.Generator().manual_seed(0))
        loss.backward()
        losses.append(loss)
    assert len(graphs) == 2  # one graph per brick: fullgraph=True would have raised on any break
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert {"lego.patch_embed_fwd.default", "lego.patch_unembed_fwd.default"} <= targets, sorted(targets)
    assert any("short_attention" in t for t in targets) and any("adaln" in t for t in targets)
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_two_ranks_sample_the_same_file_as_one_process(tmp_path):
    """Issue 22: torchrun -m lego.sample --seeds ...: each rank samples its batches, rank 0 writes one file, identical
    to one process's (the stochastic sampler's noise included)."""
    ckpt = str(Path(__file__).parent / "fixtures" / "tiny_mnist.safetensors")
    args = ["--ckpt", ckpt, "--seeds", "0-6", "--batch", "2", "--steps", "3", "--sampler", "dpmpp-2m-sde",
            "--device", "cpu"]  # fmt: skip
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for prefix, out in (([sys.executable], one), (launch, two)):
        done = subprocess.run([*prefix, "-m", "lego.sample", *args, "--out", str(out)], capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("lego.sample: wrote") == 1  # rank 0 alone writes
    with np.load(one) as a, np.load(two) as b:
        assert a["arr_0"].shape == (7, 16, 16, 1)
        for key in ("arr_0", "arr_1", "samples"):
            assert np.array_equal(a[key], b[key]), key


def test_ranks_share_whole_batches_whatever_their_number():
    from lego.generation import share

    for n, batch in ((7, 2), (10, 3), (1, 4)):
        for world in (1, 2, 3, 5):
            shares = [share(n, batch, r, world) for r in range(world)]
            assert sorted(k for s in shares for k in s) == list(range(-(-n // batch)))  # every batch once
            assert shares[0][:1] == [0]  # rank 0 draws the first batch (lego.eval's cost per image comes from it)


TINY = str(Path(__file__).parent / "fixtures" / "tiny_mnist.safetensors")


def test_an_interrupted_sampling_run_goes_on_and_gives_the_same_file(tmp_path, monkeypatch, capsys):
    """Issue 22: lego.sample keeps its finished batches in OUT.parts/; the same command, run again after an
    interruption, draws only the batches that are missing and writes the file an uninterrupted run writes."""
    from lego import generation
    from lego.sample import main as sample_main

    args = ["--ckpt", TINY, "--seeds", "3-9", "--batch", "2", "--steps", "3", "--sampler", "dpmpp-2m-sde",
            "--device", "cpu"]  # fmt: skip
    whole, out = tmp_path / "whole.npz", tmp_path / "resumed.npz"
    assert sample_main([*args, "--out", str(whole)]) == 0
    real, calls = generation.generate, []

    def interrupted_at_the_third_batch(*a, **k):
        calls.append(k["seeds"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(generation, "generate", interrupted_at_the_third_batch)
    assert sample_main([*args, "--out", str(out)]) == 130
    parts = tmp_path / "resumed.npz.parts"
    assert not out.exists() and sorted(p.name for p in parts.glob("batch-*")) == ["batch-000000.pt", "batch-000001.pt"]
    # other options do not mix with these batches: one line, until --overwrite starts over
    capsys.readouterr()
    code = sample_main([*args, "--steps", "4", "--out", str(out)])
    assert code == 2 and "interrupted run" in capsys.readouterr().err
    assert sorted(p.name for p in parts.glob("batch-*")) == ["batch-000000.pt", "batch-000001.pt"]  # kept
    calls.clear()
    monkeypatch.setattr(generation, "generate", lambda *a, **k: calls.append(k["seeds"]) or real(*a, **k))
    assert sample_main([*args, "--out", str(out)]) == 0
    assert calls == [[7, 8], [9]]  # the two missing batches alone
    assert not parts.exists()
    with np.load(whole) as a, np.load(out) as b:
        assert a["arr_0"].shape == (7, 16, 16, 1) and a["arr_0"].dtype == np.uint8  # ADM's layout: uint8 NHWC
        assert a["arr_1"].tolist() == [s % 10 for s in range(3, 10)]  # the class of seed s: s mod 10
        for key in ("arr_0", "arr_1", "samples"):
            assert np.array_equal(a[key], b[key]), key
    # --overwrite starts over where another run's batches wait
    interrupted = tmp_path / "other.npz"
    calls.clear()
    monkeypatch.setattr(generation, "generate", interrupted_at_the_third_batch)
    assert sample_main([*args, "--steps", "2", "--out", str(interrupted)]) == 130
    monkeypatch.setattr(generation, "generate", real)
    assert sample_main([*args, "--out", str(interrupted), "--overwrite"]) == 0
    assert not (tmp_path / "other.npz.parts").exists()
    with np.load(whole) as a, np.load(interrupted) as b:
        assert np.array_equal(a["samples"], b["samples"])
    # --images-only: the uint8 images and labels alone (a fifth of the size), the same images
    small = tmp_path / "small.npz"
    assert sample_main([*args, "--out", str(small), "--images-only"]) == 0
    with np.load(whole) as a, np.load(small) as b:
        assert "samples" not in b.files and np.array_equal(a["arr_0"], b["arr_0"])
        assert np.array_equal(a["arr_1"], b["arr_1"])


def test_two_ranks_evaluate_as_one_process(tmp_path):
    """torchrun -m lego.eval: every rank samples and extracts features of its batches, rank 0 scores them; the
    report is one process's (the seeds decide the images)."""
    pytest.importorskip("ccexam", reason="pip install --no-deps ccexam==1.0.0 (.ci/run does)")
    # (--seeds, not --n: torchrun's own parser takes --n for an abbreviation of its options and stops)
    args = ["--ckpt", TINY, "--seeds", "0-6", "--batch", "2", "--steps", "2", "--device", "cpu", "--no-progress"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    reports = []
    for prefix, name in (([sys.executable], "one.json"), (launch, "two.json")):
        done = subprocess.run([*prefix, "-m", "lego.eval", *args, "--json", str(tmp_path / name)], capture_output=True,
                              text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        reports.append(json.loads((tmp_path / name).read_text()))
    one, two = reports
    assert done.stdout.count("lego.eval: LEGO") == 1  # rank 0 alone reports
    assert (one["ranks"], two["ranks"]) == (1, 2) and one["seeds"] == two["seeds"] == "0-6"
    for key in ("fd", "class_accuracy", "network_calls", "nfe_per_sample", "flops_per_sample"):
        assert one[key] == pytest.approx(two[key], rel=1e-9), key
