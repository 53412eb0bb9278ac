"""lego.convert: the authors' released snapshots become lego checkpoints that compute the same D(x; sigma, labels), and
unsafe, truncated or foreign pickles are refused with one clear error.

The snapshots in ../shared/fixtures/official-lego/ (beside the repository; LEGO_OFFICIAL_FIXTURES overrides the path)
were written by the released code for tiny random-weight models, with that code's outputs on fixed inputs."""

import dataclasses
import json
import os
import pickle
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEVICES, assert_one_line_error
from safetensors.torch import load_file

from lego import LegoModel
from lego.checkpoints.build import load_model
from lego.checkpoints.format import load_checkpoint
from lego.checkpoints.snapshots import convert, convert_state, model_from_snapshot, read_snapshot
from lego.convert import main
from lego.errors import LegoError
from lego_kernels._dispatch import available_backends

FIXTURES = Path(
    os.environ.get("LEGO_OFFICIAL_FIXTURES", Path(__file__).parents[1].parent / "shared" / "fixtures" / "official-lego")
)
NAMES = ("lego_T_PG_32", "lego_T_U_32")
needs_fixtures = pytest.mark.skipif(
    not (FIXTURES / "cases.json").is_file(),
    reason=f"the released-format snapshots are not at {FIXTURES} (set LEGO_OFFICIAL_FIXTURES to their folder)",
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each fixture snapshot converted once: name -> checkpoint path."""
    out = tmp_path_factory.mktemp("converted")
    return {name: convert(FIXTURES / f"{name}.pkl", out / name) for name in NAMES}


def _io(name):
    return load_file(str(FIXTURES / f"{name}-io.safetensors"))  # x, sigma, labels, D


def _set_backend(model, backend):
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return model


def _cases():
    for device in DEVICES:
        for backend in [b for b in ("torch", "triton") if b in available_backends(device)] + (
            ["auto"] if device == "cuda" else []
        ):
            for name in NAMES:
                marks = []
                if device == "cpu" and backend == "triton":  # measured: 17-34 s, 90% of it in patch_embed (l = 8)
                    marks = [
                        pytest.mark.slow,
                        pytest.mark.skipif(
                            not os.environ.get("LEGO_TEST_INTERPRETER"),
                            reason="Triton's interpreter takes 20 s and more per fixture; LEGO_TEST_INTERPRETER=1 runs "
                            "it (test_model_kernels checks the triton model path against torch's on the CPU)",
                        ),
                    ]
                yield pytest.param(name, device, backend, marks=marks, id=f"{name}-{device}-{backend}")


@needs_fixtures
@pytest.mark.parametrize(("name", "device", "backend"), _cases())
def test_converted_model_reproduces_the_released_outputs(converted, name, device, backend):
    """D(x; sigma, labels) of the checkpoint as lego.sample loads it equals the released code's, to fp32 rounding."""
    model = _set_backend(load_model(converted[name], device=device), backend)
    io = {k: v.to(device) for k, v in _io(name).items()}
    n = 1 if device == "cpu" and backend == "triton" else len(io["x"])  # the interpreter is slow: one image
    with torch.no_grad():
        d = model(io["x"][:n], io["sigma"][:n], io["labels"][:n])
    torch.testing.assert_close(d, io["D"][:n], rtol=1e-5, atol=2e-5)


@needs_fixtures
def test_the_configuration_comes_from_the_snapshot(converted):
    cases = json.loads((FIXTURES / "cases.json").read_text())
    for name in NAMES:
        config = load_checkpoint(converted[name], parts=()).model_config
        case = cases[name]
        assert [(b.brick_size, b.field_size, b.depth) for b in config.bricks] == [
            tuple(b) for b in case["bricks_bottom_to_top (r, l, depth)"]
        ]
        assert (config.hidden_size, config.num_heads, config.in_channels, config.num_classes, config.resolution) == (
            case["hidden"],
            case["heads"],
            case["channels"],
            case["classes"],
            case["resolution"],
        )
        assert config.time_scale == 1.0 and config.precond == "edm"


@needs_fixtures
def test_channel_order_and_time_scale_matter(converted):
    """The two deliberate differences from the released code: undoing either mapping changes D (so the test above
    would notice a converter that forgot them)."""
    io = _io("lego_T_PG_32")
    model = load_model(converted["lego_T_PG_32"])
    state = model.state_dict()
    scaled = LegoModel(dataclasses.replace(model.config, time_scale=None))  # our default 250 x c_noise
    scaled.load_state_dict(state)
    swapped = LegoModel(model.config)
    w = state["net.bricks.1.embed_weight"]  # (d, [x_t, prev, row, col], l, l)
    swapped.load_state_dict({**state, "net.bricks.1.embed_weight": torch.cat([w[:, 3:6], w[:, :3], w[:, 6:]], dim=1)})
    with torch.no_grad():
        for wrong in (scaled.eval(), swapped.eval()):
            err = (wrong(io["x"], io["sigma"], io["labels"]) - io["D"]).abs().max().item()
            assert err > 1e-2


@needs_fixtures
def test_cli_converts_and_samples_a_non_square_canvas(tmp_path, capsys):
    from lego.sample import main as sample_main

    out = tmp_path / "lego-t-u-32"
    assert main([str(FIXTURES / "lego_T_U_32.pkl"), "--out", str(out)]) == 0
    assert "bricks (r/l/depth, bottom to top) 32/2/1, 16/8/1, 4/2/1, 16/8/1, 32/2/1" in capsys.readouterr().out
    assert (out / "config.json").is_file()
    npz = tmp_path / "wide.npz"
    args = [
        "--ckpt",
        str(out / "checkpoint.safetensors"),
        "--n",
        "1",
        "--out",
        str(npz),
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "64",
        "--labels",
        "3",
        "--cfg-scale",
        "1.5",
        "--t-break",
        "0.5",
    ]
    assert sample_main(args) == 0
    with np.load(npz) as z:
        assert z["samples"].shape == (1, 3, 32, 64) and np.isfinite(z["samples"]).all()
        assert (z["labels"] == 3).all()


@needs_fixtures
def test_converted_checkpoint_fine_tunes_with_resume(converted, tmp_path):
    """The converted checkpoint is a step-0 run: lego.train --resume continues it on new data."""
    import shutil

    from lego.train import main as train_main

    run = tmp_path / "run"
    shutil.copytree(converted["lego_T_PG_32"].parent, run)
    rng = np.random.default_rng(0)
    data = tmp_path / "rgb.npz"
    # labels up to 9: the data's classes (the largest id + 1) must be the checkpoint's 10
    # (lego.training.config.check_resume)
    np.savez(data, images=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), labels=np.array([0, 3, 6, 9]))
    argv = [
        "--resume",
        "--out",
        str(run),
        "--data",
        str(data),
        "--steps",
        "1",
        "--batch",
        "2",
        "--sample-n",
        "0",
        "--no-progress",
    ]
    assert train_main(argv) == 0
    before, after = load_checkpoint(converted["lego_T_PG_32"]), load_checkpoint(run / "checkpoint.safetensors")
    assert after.step == 1 and after.model_config == before.model_config
    assert not torch.equal(
        after.model["net.bricks.2.blocks.0.qkv.weight"], before.model["net.bricks.2.blocks.0.qkv.weight"]
    )


@needs_fixtures
def test_shapes_reveal_the_rest():
    """Unconditional snapshots, augmentation conditioning, and tensors the converter cannot place."""
    snap = read_snapshot(FIXTURES / "lego_T_PG_32.pkl")
    _, state = convert_state(snap)
    # map_augment (training with --augment) is applied only with augmentation labels, which sampling never passes: its
    # weight and bias are dropped (issue 21, item 5: a snapshot with the bias could not be converted at all).
    aug = {**snap.tensors, "model.map_augment.weight": torch.randn(64, 9), "model.map_augment.bias": torch.randn(64)}
    assert convert_state(dataclasses.replace(snap, tensors=aug))[1].keys() == state.keys()
    # Without a label embedding the model is unconditional.
    uncond = {k: v for k, v in snap.tensors.items() if not k.startswith("model.y_embedder")}
    config_u, _ = convert_state(dataclasses.replace(snap, tensors=uncond, kwargs={**snap.kwargs, "label_dim": 0}))
    assert config_u.num_classes == 0
    # An affine LayerNorm (say) has nowhere to go in our blocks: refused, by name.
    extra = {**snap.tensors, "model.model.0.blocks.0.norm1.weight": torch.ones(64)}
    with pytest.raises(LegoError, match=re.escape("cannot place: model.model.0.blocks.0.norm1.weight")):
        convert_state(dataclasses.replace(snap, tensors=extra))
    # Constructor arguments that are not plain numbers (a numpy scalar reads as an inert placeholder) are refused.
    with pytest.raises(LegoError, match="sigma_data is .* must be a finite number"):
        convert_state(dataclasses.replace(snap, kwargs={**snap.kwargs, "sigma_data": object()}))
    # The label embedding: class k = column k + bias, the null class = the bias.
    w, b = (snap.tensors[f"model.y_embedder.embedding_table.{k}"] for k in ("weight", "bias"))
    table = state["net.y_embedder.embedding_table.weight"]
    torch.testing.assert_close(table[4], w[:, 4] + b)
    torch.testing.assert_close(table[10], b)


# ---------------------------------------------------------------------------------------------------------------------
# Refusals: made here, so they need no fixture.


class _System:
    """Unpickles as os.system(command)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _persistent_snapshot(monkeypatch, module_src):
    """A pickle in the released format's shape: a persistent object whose module source is ``module_src``."""
    fake = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("never called while pickling")

    fake._reconstruct_persistent_obj = _reconstruct_persistent_obj
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", fake)

    class Persistent:
        def __reduce__(self):
            state = {"_parameters": {"w": torch.randn(4, 3)}, "_buffers": {}, "_modules": {}}
            meta = {
                "type": "class",
                "version": 6,
                "module_src": module_src,
                "class_name": "EDMPrecondLEGO",
                "state": state,
            }
            return (_reconstruct_persistent_obj, (meta,))

    return pickle.dumps({"ema": Persistent(), "loss_fn": None, "augment_pipe": None, "dataset_kwargs": {}})


def test_a_pickle_that_runs_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "ran"
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"ema": _System(f"touch {marker}")}))
    with pytest.raises(LegoError, match=r"refused to load: it asks for (posix|os|nt)\.system"):
        read_snapshot(bad)
    assert main([str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lego.convert: error:") and "refused" in err and len(err.splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["builtins.eval", "subprocess.Popen", "copyreg._reconstructor", "torch.load"])
def test_any_other_global_is_refused(tmp_path, target):
    module, name = target.rsplit(".", 1)
    bad = tmp_path / "bad.pkl"
    # protocol 2: GLOBAL 'module name', then call it with one argument
    bad.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x01\x00\x00\x00x\x85R.")
    with pytest.raises(LegoError, match=re.escape(f"refused to load: it asks for {target}")):
        read_snapshot(bad)


def test_embedded_source_is_never_run(tmp_path, monkeypatch):
    """The snapshot's module source stays text: reading it builds a placeholder and runs nothing."""
    marker = tmp_path / "ran"
    path = tmp_path / "snap.pkl"
    path.write_bytes(_persistent_snapshot(monkeypatch, f"open({str(marker)!r}, 'w').close()\n"))
    monkeypatch.delitem(sys.modules, "torch_utils.persistence")  # reading must not need it
    snap = read_snapshot(path)
    assert snap.class_name == "EDMPrecondLEGO" and snap.tensors["w"].shape == (4, 3)
    assert not marker.exists()
    with pytest.raises(LegoError, match="no bricks"):
        convert_state(snap)


def test_a_truncated_snapshot_is_refused(tmp_path, monkeypatch):
    data = _persistent_snapshot(monkeypatch, "")
    for cut in (1, len(data) // 3, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut{cut}.pkl"
        path.write_bytes(data[:cut])
        with pytest.raises(LegoError, match="truncated"):
            read_snapshot(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a pickle at all\n", "not a readable snapshot pickle"),
        (pickle.dumps({"weights": [1, 2, 3]}), "not a released LEGO snapshot"),
        (pickle.dumps({"ema": torch.zeros(3)}), "not a released LEGO snapshot"),
    ],
    ids=["text", "a-dict", "a-tensor"],
)
def test_a_file_that_is_not_a_snapshot_is_refused(tmp_path, content, message):
    path = tmp_path / "x.pkl"
    path.write_bytes(content)
    with pytest.raises(LegoError, match=message):
        read_snapshot(path)
    with pytest.raises(LegoError, match="snapshot not found"):
        read_snapshot(tmp_path / "missing.pkl")


def test_registry_depths_and_time_scale():
    """The registry's U stacks follow the released configurations; time_scale None is the preconditioning's own."""
    from lego import model_config

    assert [b.depth for b in model_config("LEGO-XL-U-64").bricks] == [14, 12, 4, 12, 14]
    assert [b.depth for b in model_config("LEGO-XL-U-32").bricks] == [14, 10, 4, 10, 14]
    x, sigma = torch.randn(2, 1, 16, 16), torch.tensor([0.3, 4.0])
    for precond, scale in (("edm", 250.0), ("vp", 1.0)):
        default = LegoModel.from_name("LEGO-T-PG-16", in_channels=1, precond=precond).eval()
        with torch.no_grad():
            for p in default.parameters():
                p.normal_(0, 0.2)  # no zero-initialized paths: the time embedding reaches D
            d = default(x, sigma)
            for time_scale, same in ((scale, True), (scale / 2, False)):
                other = LegoModel(dataclasses.replace(default.config, time_scale=time_scale)).eval()
                other.load_state_dict(default.state_dict())
                assert torch.allclose(other(x, sigma), d) == same, (precond, time_scale)


@needs_fixtures
def test_convert_replaces_a_checkpoint_only_with_overwrite_and_not_under_a_run(tmp_path, capsys):
    """Issue 21, item 2: lego.convert --out replaced any checkpoint there (a trained run's, a running lego.train's)."""
    from lego.training.rundir import RunDir

    snapshot, out = str(FIXTURES / "lego_T_PG_32.pkl"), tmp_path / "run"
    assert main([snapshot, "--out", str(out)]) == 0
    before = (out / "checkpoint.safetensors").read_bytes()
    assert_one_line_error(capsys, main([snapshot, "--out", str(out)]), "already holds a checkpoint", "--overwrite")
    with RunDir(out, resume=True):  # a lego.train holds the folder
        code = main([snapshot, "--out", str(out), "--overwrite"])
        assert_one_line_error(capsys, code, "in use by another lego.train")
    assert (out / "checkpoint.safetensors").read_bytes() == before
    assert main([snapshot, "--out", str(out), "--overwrite"]) == 0
    assert not (out / ".lock").exists()
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a pickle")
    assert main([str(bad), "--out", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()  # a failed conversion leaves no empty folder


@needs_fixtures
@pytest.mark.parametrize(
    "key,value",
    [("num_heads", 4.0), ("num_heads", -4), ("num_heads", "4"), ("num_heads", 0), ("num_heads", True),
     ("img_resolution", 0), ("img_resolution", True), ("img_resolution", 20), ("img_resolution", -32),
     ("img_resolution", 10**9), ("sigma_data", float("nan")),
     ("sigma_data", float("inf")), ("sigma_data", 0), ("sigma_data", -1), ("img_channels", 0), ("label_dim", -1)],
)  # fmt: skip
def test_every_recorded_number_is_checked(key, value):
    """Issue 21, item 5: heads 4.0 or -4, resolution 0 or True, sigma_data NaN / inf / 0 / -1 were accepted (sigma_data
    0 sampled all zeros), or ended in tracebacks."""
    snap = read_snapshot(FIXTURES / "lego_T_PG_32.pkl")
    if key == "num_heads":  # recorded on each attention module
        attrs = {k: ({**v, "num_heads": value} if "num_heads" in v else v) for k, v in snap.attrs.items()}
        snap = dataclasses.replace(snap, attrs=attrs)
    else:
        snap = dataclasses.replace(snap, kwargs={**snap.kwargs, key: value})
    brick_rule = key == "img_resolution" and value in (20, 10**9)  # a number, but not a multiple of 32 up to 2^16
    with pytest.raises(LegoError, match="largest brick" if brick_rule else key):
        convert_state(snap)


@needs_fixtures
def test_recorded_heads_win_and_tensors_are_checked():
    snap = read_snapshot(FIXTURES / "lego_T_PG_32.pkl")
    heads = convert_state(snap)[0].num_heads
    assert convert_state(snap, num_heads=heads)[0].num_heads == heads  # the same count: fine
    with pytest.raises(LegoError, match=f"records {heads} attention heads"):  # (it moved D by 0.21)
        convert_state(snap, num_heads=2 * heads)
    name = "model.model.0.blocks.0.attn.qkv.weight"
    nan = {**snap.tensors, name: torch.full_like(snap.tensors[name], float("nan"))}
    with pytest.raises(LegoError, match="NaN or inf"):
        convert_state(dataclasses.replace(snap, tensors=nan))
    wrong = {**snap.tensors, name: snap.tensors[name][:, :-1]}  # a wrongly shaped weight: one error, no traceback
    with pytest.raises(LegoError, match="shapes"):
        model_from_snapshot(dataclasses.replace(snap, tensors=wrong))


@needs_fixtures
def test_a_snapshot_trained_without_joint_training_refuses_brick_skipping(tmp_path, monkeypatch, capsys):
    """Issue 21, item 5: --joint=False was lost, and --t-break then sampled from bricks never trained to denoise."""
    import lego.checkpoints.snapshots as snapshots
    from lego.sample import main as sample_main

    snap = read_snapshot(FIXTURES / "lego_T_PG_32.pkl")
    separate = dataclasses.replace(snap, kwargs={**snap.kwargs, "train_intermediate_stages": False})
    monkeypatch.setattr(snapshots, "read_snapshot", lambda path: separate)
    ckpt = convert("separate.pkl", tmp_path / "run")
    assert load_checkpoint(ckpt, parts=()).train_config["joint"] is False
    args = ["--ckpt", str(ckpt), "--n", "1", "--steps", "2", "--out", str(tmp_path / "s.png")]
    assert_one_line_error(capsys, sample_main([*args, "--t-break", "0.5"]), "--t-break", "--joint=False")
    assert_one_line_error(capsys, sample_main([*args, "--cfg-scale", "2", "--guide-skip", "1"]), "--joint=False")
    assert sample_main(args) == 0


def test_malformed_trees_and_views_are_refused(tmp_path):
    """Issue 21: cyclic or very deep module trees ended in RecursionError; a weight stored as a view past the end of its
    storage converted as zeros (or asked for 16 GiB)."""
    from lego.checkpoints.snapshots import Placeholder, _rebuild_tensor, _Refused, _walk_module

    def module(children):
        m = Placeholder()
        m.state = {"_modules": children, "_parameters": {}, "_buffers": {}}
        return m

    loop = module({})
    loop.state["_modules"]["self"] = loop
    deep = module({})
    for _ in range(100):
        deep = module({"child": deep})
    for tree in (loop, deep):
        with pytest.raises(LegoError, match="loops back on itself or nests deeper"):
            _walk_module(tree, "", {}, {}, "x.pkl")
    # constructor arguments that are not a dict (a list, say): one error, not a traceback
    import lego.checkpoints.snapshots as snapshots

    ema = module({})
    ema.qualname, ema.state["_init_kwargs"] = "EDMPrecondLEGO", ["img_resolution", 32]
    path = tmp_path / "list-kwargs.pkl"
    path.write_bytes(pickle.dumps({"ema": None}))
    original = snapshots.SnapshotUnpickler.load
    try:
        snapshots.SnapshotUnpickler.load = lambda self: {"ema": ema}
        with pytest.raises(LegoError, match="constructor arguments are a list, not a dict"):
            read_snapshot(path)
    finally:
        snapshots.SnapshotUnpickler.load = original
    storage = torch.zeros(4).untyped_storage()
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
    assert _rebuild_tensor(typed, 0, (2, 2), (2, 1)).shape == (2, 2)
    for offset, size, stride in ((0, (10,), (1,)), (3, (2,), (1,)), (0, (2, 2), (4, 1)), (0, (1 << 32,), (1,)),
                                 (-1, (2,), (1,))):  # fmt: skip
        with pytest.raises(_Refused):
            _rebuild_tensor(typed, offset, size, stride)


def test_a_torch_save_file_is_named(tmp_path, capsys):
    """Issue 21: PyTorch's 7-line weights_only text, or a 2-line message."""
    path = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    assert_one_line_error(capsys, main([str(path), "--out", str(tmp_path / "run")]), "torch.save file")
