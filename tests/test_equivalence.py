"""The lego/ redesign changed no result: fixed-seed CPU fp32 runs of the commands, and checkpoints written before it,
give what they gave on main before it (tests/fixtures/equivalence.safetensors, made by make_equivalence.py on that
commit), bit for bit (lego.sample's samples: drawn as that commit seeded them, see _generate)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_digits
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lego.checkpoints.build import load_model
from lego.diffusion.generate import generate
from lego.diffusion.window import parse_regions
from lego.sample import main as sample_main
from lego.sample import parser as sample_parser
from lego.train import main as train_main

FIXTURES = Path(__file__).parent / "fixtures"
REF = load_file(FIXTURES / "equivalence.safetensors")
# --lr: lego.train's default when the references were made
TRAIN = ["--steps", "20", "--batch", "8", "--lr", "2e-3", "--device", "cpu", "--sample-n", "4", "--sample-steps", "2",
         "--log-every", "10", "--no-progress"]  # fmt: skip
MODELS = {"LEGO-T-PG-16": [], "LEGO-T-PR-16": [], "LEGO-T-U-16": [], "DiT-T/2": ["--resolution", "16"]}
SAMPLES = {
    "plain": ["--n", "4", "--steps", "3"],
    "cfg": ["--n", "4", "--steps", "3", "--cfg-scale", "2.5"],
    "t-break": ["--n", "4", "--steps", "3", "--t-break", "0.5"],
    "ddim": ["--n", "4", "--steps", "3", "--sampler", "ddim", "--cfg-scale", "2"],
    "window": ["--n", "2", "--steps", "3", "--width", "32", "--window", "16", "--stride", "8",
               "--regions", "0:16=3,16:32=7"],
}  # fmt: skip


@pytest.fixture
def one_thread():
    """The references were made single-threaded: a reduction split over threads may round differently."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def probe():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 16, 16, generator=g) * 2
    return x, torch.tensor([0.05, 1.3, 20.0]), torch.tensor([3, 10, 7])


@pytest.mark.parametrize("name", MODELS)
def test_train_and_sample_as_before(name, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert train_main(["--model", name, "--out", str(run), *TRAIN, *MODELS[name]]) == 0
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert losses == REF[f"{name}/train/loss"].tolist()
    grid = np.frombuffer((run / "samples.png").read_bytes(), np.uint8)
    assert np.array_equal(grid, REF[f"{name}/train/grid"].numpy()), "the training run's sample grid changed"
    kinds = [k.rsplit("/", 1)[1] for k in REF if k.startswith(f"{name}/sample/")]
    assert kinds, "no sampling reference"
    for kind in kinds:
        out = tmp_path / f"{kind}.npz"
        ckpt = run / "checkpoint.safetensors"
        assert sample_main(["--ckpt", str(ckpt), "--out", str(out), *SAMPLES[kind]]) == 0
        # Since issue 22, lego.sample draws image i from its own seed i; before, one generator seeded with --seed drew
        # the whole batch. The reference holds the latter: the same model and sampler through generate() with the old
        # seeding; and the command is that call with per-image seeds.
        with np.load(out) as z:
            assert torch.equal(torch.from_numpy(z["samples"]), _generate(ckpt, kind, per_image=True)), kind
        assert torch.equal(_generate(ckpt, kind, per_image=False), REF[f"{name}/sample/{kind}"]), f"lego.sample {kind}"


def _generate(ckpt, kind: str, per_image: bool) -> torch.Tensor:
    """SAMPLES[kind] through lego.diffusion.generate: with seeds 0..n-1 (lego.sample now) or with one generator
    seeded with 0 for the batch (lego.sample before issue 22)."""
    args = sample_parser().parse_args(["--ckpt", str(ckpt), "--out", "unused.npz", *SAMPLES[kind]])
    model = load_model(ckpt)
    h = args.height or model.resolution
    rects = parse_regions(args.regions, h) if args.regions else None
    labels = None if rects else torch.arange(args.n) % model.num_classes if model.num_classes else None
    images, _ = generate(model, args.n, args.sampler, args.steps, args.cfg_scale, labels, args.t_break, args.height,
                         args.width, 0, 64, 0.0, args.window, args.stride, 64, rects, device="cpu",
                         seeds=list(range(args.n)) if per_image else None)  # fmt: skip
    return images


def test_old_checkpoint_gives_the_same_denoiser(one_thread):
    model = load_model(FIXTURES / "tiny_mnist.safetensors")
    x, sigma, labels = probe()
    with torch.no_grad():
        assert torch.equal(model(x, sigma, labels), REF["tiny/D"])
        assert torch.equal(model(x, sigma, labels, skip=(2,)), REF["tiny/D-skip"])


@pytest.mark.parametrize("tag", ["frozen", "tuned"])
def test_old_stack_on_a_base_gives_the_same_denoiser(tag, tmp_path, one_thread):
    """Checkpoints of a stack on a base, written before the redesign: the frozen one reads its base from its origin
    (re-pointed at this checkout's fixture), the fine-tuned one holds the base's weights."""
    prefix = f"stack-{tag}/file/"
    tensors = {k[len(prefix) :]: v.float() for k, v in REF.items() if k.startswith(prefix)}
    meta = json.loads(bytes(REF[f"stack-{tag}/metadata"].tolist()).decode())
    config = json.loads(meta["model_config"])
    assert not any(k.startswith("ema/net.") for k in tensors), "the reference should hold the old keys"
    config["base"]["path"] = str(FIXTURES / "tiny_mnist.safetensors")
    meta["model_config"] = json.dumps(config)
    path = tmp_path / "checkpoint.safetensors"
    save_file(tensors, path, metadata=meta)
    model = load_model(path)
    x, sigma, labels = probe()
    with torch.no_grad():
        d = model(x, sigma, labels)
    assert torch.equal(d, REF[f"stack-{tag}/D"])


def test_a_run_saved_with_the_old_keys_resumes_as_before(tmp_path):
    """A run checkpointed before the backbone moved to ``.net`` (keys without the prefix) resumes exactly as the
    same run saved now: same weights, EMA and optimizer state after the resumed steps."""
    digits = save_digits(tmp_path / "digits.npz", 16)
    fast = ["--model", "LEGO-T-PG-16", "--data", digits, "--batch", "4", "--sample-n", "0", "--device", "cpu",
            "--no-progress", "--log-every", "1"]  # fmt: skip
    runs = {tag: tmp_path / tag for tag in ("now", "old")}
    for run in runs.values():
        assert train_main([*fast, "--steps", "2", "--out", str(run)]) == 0
    path = runs["old"] / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- not a dict
    old = {k.replace("/net.", "/", 1): v for k, v in tensors.items()}
    assert any(k.startswith("model/bricks.") for k in old)
    del meta["checksums"]  # (a run of that time had none)
    save_file(old, path, metadata=meta)
    for run in runs.values():
        assert train_main([*fast, "--steps", "4", "--out", str(run), "--resume"]) == 0
    now, resumed = (load_file(run / "checkpoint.safetensors") for run in (runs["now"], runs["old"]))
    assert now.keys() == resumed.keys() and all(torch.equal(now[k], resumed[k]) for k in now)
