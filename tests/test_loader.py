"""Feeding training: memory-mapped .npy datasets never loaded whole, each rank's share of a step, draws that do not
depend on the split, per-image flips."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from lego import LegoLoss, LegoModel
from lego.data import datasets, loader
from lego.errors import LegoError


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (4, 2), (1, 8)])
def test_step_sampler_cuts_each_global_batch_into_rank_chunks(world, accum):
    n, batch, seed = 37, 16, 5
    chunks = {r: list(loader.StepSampler(n, batch, seed, 3, 7, r, world, accum)) for r in range(world)}
    for r in range(world):
        assert len(chunks[r]) == 4 * accum and all(len(c) == batch // (world * accum) for c in chunks[r])
    for s, step in enumerate(range(3, 7)):
        got = torch.cat([chunks[r][s * accum + k] for k in range(accum) for r in range(world)])
        assert torch.equal(got, loader.batch_indices(step, n, batch, seed))


def test_loss_of_a_split_batch_equals_the_whole():
    """Every draw (sigma, noise, label dropout, patches) is made for the global batch and sliced: two halves with
    their shares give the whole batch's loss and gradients."""
    model = LegoModel.from_name("LEGO-T-PG-16", in_channels=1, num_classes=3, hidden_size=32, num_heads=2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    images, labels = torch.rand(6, 1, 16, 16) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2])
    loss_fn = LegoLoss(patch_fraction=0.5, label_dropout=0.5)
    whole, per_whole = loss_fn(model, images, labels, torch.Generator().manual_seed(3))
    whole.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    halves = [
        loss_fn(model, images[i : i + 3], labels[i : i + 3], torch.Generator().manual_seed(3), share=(i, 6))
        for i in (0, 3)
    ]
    ((halves[0][0] + halves[1][0]) / 2).backward()
    torch.testing.assert_close((halves[0][0] + halves[1][0]) / 2, whole)
    torch.testing.assert_close((halves[0][1] + halves[1][1]) / 2, per_whole)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)
    # and a different share is really other draws (the test above could not pass by ignoring share)
    other, _ = loss_fn(model, images[:3], labels[:3], torch.Generator().manual_seed(3), share=(3, 6))
    assert not torch.isclose(other, halves[0][0])


def test_flips_are_per_image_and_deterministic():
    a, b = loader.flip_draws(4, 1, 64), loader.flip_draws(4, 1, 64)
    assert torch.equal(a, b) and 10 < int(a.sum()) < 54 and not torch.equal(a, loader.flip_draws(5, 1, 64))
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    flips = torch.tensor([True, False, False, True])
    y = loader.prepare(x, 8, flips)
    base = x.float() / 127.5 - 1
    assert y.dtype == torch.float32
    torch.testing.assert_close(y[flips], base[flips].flip(-1), rtol=0, atol=0)
    torch.testing.assert_close(y[~flips], base[~flips], rtol=0, atol=0)


def test_npy_images_give_what_the_npz_gives(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 20, 20, 3), dtype=np.uint8)  # NHWC
    labels = rng.integers(0, 4, 10)
    np.savez(tmp_path / "a.npz", images=images, labels=labels)
    np.save(tmp_path / "a.npy", images)
    np.save(tmp_path / "a.labels.npy", labels)
    mem = datasets.open_dataset(str(tmp_path / "a.npz"), 16)  # resized when loaded
    mapped = datasets.open_dataset(str(tmp_path / "a.npy"), 16)  # resized per batch, on the device
    assert isinstance(mapped, datasets.MappedData) and mapped.size == (20, 20) and mapped.channels == 3
    assert mapped.num_classes == mem.num_classes and len(mapped) == 10
    idx = torch.tensor([7, 2, 2, 9])
    x, y = mapped[idx]
    assert x.dtype == torch.uint8 and torch.equal(y, mem[idx][1])  # uint8 until the device
    torch.testing.assert_close(loader.prepare(x, 16, None), mem[idx][0])


def test_npy_bad_inputs(tmp_path):
    np.save(tmp_path / "int.npy", np.zeros((4, 2, 8, 8), dtype=np.int32))
    with pytest.raises(LegoError, match="uint8 images or float latents"):
        datasets.open_dataset(str(tmp_path / "int.npy"), 8)
    np.save(tmp_path / "lat.npy", np.zeros((4, 2, 8, 8), dtype=np.float16))
    with pytest.raises(LegoError, match="latents are not resized"):
        datasets.open_dataset(str(tmp_path / "lat.npy"), 16)
    np.save(tmp_path / "lat.labels.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(LegoError, match="expected 4 non-negative integer labels"):
        datasets.open_dataset(str(tmp_path / "lat.npy"), 8)
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(LegoError, match="corrupt"):
        datasets.open_dataset(str(tmp_path / "bad.npy"), 8)
    with pytest.raises(LegoError, match="not found"):
        datasets.open_dataset(str(tmp_path / "none.npy"), 8)


_MEASURE = """
import json, resource, sys
from lego.train import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "workers_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


@pytest.mark.slow
def test_a_memory_mapped_dataset_is_never_loaded_whole(tmp_path):
    """Train 3 steps from 256 MB of latents and from 1 MB of the same shape: the peak RSS of the trainer and of its
    loader worker grow by far less than the file (a loader that read it whole would add 256 MB)."""
    rows = 65_536  # x 4 x 16 x 16 float32 = 4 KiB each: 256 MiB
    big = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(rows, 4, 16, 16))
    big[::97] = np.random.default_rng(0).standard_normal((len(range(0, rows, 97)), 4, 16, 16))  # sparse elsewhere
    big.flush()
    del big
    np.save(tmp_path / "small.npy", np.random.default_rng(0).standard_normal((256, 4, 16, 16)).astype(np.float32))
    size_kb = (tmp_path / "big.npy").stat().st_size // 1024
    runs = {}
    for name in ("big", "small"):
        args = [
            "--data",
            str(tmp_path / f"{name}.npy"),
            "--model",
            "LEGO-T-PG-16",
            "--batch",
            "16",
            "--steps",
            "3",
            "--sample-n",
            "0",
            "--no-progress",
            "--workers",
            "1",
            "--out",
            str(tmp_path / f"run_{name}"),
        ]
        runs[name] = subprocess.Popen([sys.executable, "-c", _MEASURE, *args], stdout=subprocess.PIPE, text=True)
    peaks = {}
    for name, proc in runs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
        peaks[name] = json.loads(out.strip().splitlines()[-1])
        assert peaks[name]["code"] == 0
    for key in ("self_kb", "workers_kb"):
        grew = peaks["big"][key] - peaks["small"][key]
        print(key, grew, size_kb)
        assert grew < size_kb / 8, f"{key}: {grew} KiB more for a {size_kb} KiB file"
    (tmp_path / "big.npy").unlink()


def test_training_and_encoding_crop_a_folder_alike(tmp_path):
    """One crop: a folder's images reach training and lego.encode through the same dataset, cropped by ADM's
    center_crop_arr wherever they are not resolution x resolution (a same-size non-square set is cropped, not
    squashed)."""
    from PIL import Image

    from lego.data.datasets import center_crop_arr
    from lego.data.encode import _images

    rng = np.random.default_rng(1)
    for i, (w, h) in enumerate([(40, 24), (40, 24), (16, 16)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    train = datasets.open_dataset(str(tmp_path), 16)
    encode, side = _images(str(tmp_path), 16)
    assert side == 16 and type(encode) is type(train) is datasets.FolderData
    x, _ = train[torch.arange(3)]
    assert torch.equal(x, encode[torch.arange(3)][0]) and x.shape == (3, 3, 16, 16)
    for i in range(3):
        with Image.open(tmp_path / f"{i}.png") as im:
            want = center_crop_arr(im.convert("RGB"), 16)
        assert np.array_equal(x[i].permute(1, 2, 0).numpy(), want)
