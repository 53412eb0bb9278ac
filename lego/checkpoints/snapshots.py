"""Reading the authors' released LEGO models (EDM-style snapshot pickles) into lego checkpoints (``python -m
lego.convert``).

Writes ``checkpoint.safetensors`` + ``config.json`` that ``lego.sample`` and ``lego.train --resume`` load as any
other checkpoint. The released code's snapshots (JegZheng/LEGODiffusion, MIT) pickle the network together with the
source text of its module; this reads them with a restricted unpickler that builds none of the pickled classes,
imports nothing beyond torch's tensor rebuilding and never runs the embedded source. A snapshot that asks for anything
else (``os.system`` through a ``__reduce__``, say) is refused.

What the weight mapping handles (the configuration comes from the stored constructor arguments and tensor shapes):
- bricks: field l from the embedding conv's kernel, tokens S = (r/l)^2 from the position embedding, depth from the
  blocks; any number of bricks, PG, PR or U;
- the embedding's input channels: theirs [prev, x_t, row, col], ours [x_t, prev, row, col];
- the label embedding: theirs a Linear over a one-hot label (the null label is the all-zero vector, so the bias
  alone), ours a table with the null class last: row k = column k + bias, row K = bias;
- the time embedding: theirs sees EDM's c_noise = ln(sigma) / 4 as it is, ours scales it by 250, so the converted
  config sets ``time_scale = 1``;
- augmentation conditioning (``map_augment``, from training with ``--augment``): the released network applies it only
  when given augmentation labels, which sampling never passes, so its weight and bias are dropped;
- joint training: a snapshot trained with ``--joint=False`` (``train_intermediate_stages``) has lower bricks that never
  learned to denoise on their own; the checkpoint records ``joint: false``, and brick skipping (``--t-break``,
  ``--guide-skip``) is refused on it.

Every recorded number (heads, resolution, channels, label_dim, sigma_data) and every tensor (its view inside its
storage, its shape, finite values) is checked before anything is built from it; a malformed snapshot is one error.
"""

from __future__ import annotations

import collections
import copy
import io
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from lego.checkpoints.format import save_checkpoint
from lego.diffusion.denoiser import LegoModel
from lego.errors import LegoError
from lego.networks.blocks import sincos_pos_embed_2d
from lego.networks.stack import BrickSpec, LegoConfig

# Modules whose classes a snapshot may name; each becomes an inert placeholder that only records what it is given.
PLACEHOLDER_MODULES = ("training", "torch_utils", "timm", "dnnlib", "torch.nn.modules", "numpy")


class _Refused(Exception):
    """The pickle asked for something a snapshot has no business asking for."""


class Placeholder:
    """Stands in for a class the snapshot names: keeps constructor arguments and state, runs none of its code."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<placeholder {self.qualname}>"


class _PlaceholderDict(dict):
    """dnnlib's EasyDict (a dict with attribute access) as a plain dict."""


def _persistent(meta):
    """torch_utils.persistence._reconstruct_persistent_obj, minus the part that executes ``meta['module_src']``."""
    if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
        raise _Refused("a persistent object without a state dict")
    obj = Placeholder()
    obj.qualname, obj.state = str(meta.get("class_name")), meta["state"]
    return obj


def _load_storage(data):
    """torch.storage._load_from_bytes through torch's weights-only loader (it accepts storages and nothing else)."""
    if not isinstance(data, bytes):
        raise _Refused("a storage that is not bytes")
    storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(storage, torch.storage.TypedStorage | torch.storage.UntypedStorage):
        raise _Refused(f"a storage that loads as {type(storage).__name__}")
    return storage


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    """torch._utils._rebuild_tensor_v2 on checked arguments (the pickle's hooks and metadata are not passed on)."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise _Refused("a tensor over something other than a storage")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (offset, *size, *stride)):
        raise _Refused("a tensor with non-integer sizes")
    if len(size) != len(stride) or min((offset, *size, *stride), default=0) < 0:
        raise _Refused("a tensor with a negative size, stride or offset")
    if all(size) and offset + sum((n - 1) * st for n, st in zip(size, stride)) >= storage._size():  # (size() warns)
        raise _Refused("a tensor that reaches past the end of its storage")
    hooks = collections.OrderedDict()  # fresh: the pickle's own hooks are never attached
    return torch._utils._rebuild_tensor_v2(storage, offset, tuple(size), tuple(stride), False, hooks)


def _rebuild_parameter(data, *_ignored):
    if not isinstance(data, torch.Tensor):
        raise _Refused("a parameter that is not a tensor")
    return data


SAFE_CALLABLES = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("dnnlib.util", "EasyDict"): _PlaceholderDict,
}


class SnapshotUnpickler(pickle.Unpickler):
    """Resolves only the names in SAFE_CALLABLES and placeholders for classes of PLACEHOLDER_MODULES; refuses the rest
    (and persistent ids: a snapshot has none)."""

    _placeholders: ClassVar[dict[tuple[str, str], type]] = {}

    def find_class(self, module, name):
        if (module, name) in SAFE_CALLABLES:
            return SAFE_CALLABLES[module, name]
        if any(module == m or module.startswith(m + ".") for m in PLACEHOLDER_MODULES):
            key = (module, name)
            if key not in self._placeholders:
                self._placeholders[key] = type(name, (Placeholder,), {"qualname": f"{module}.{name}"})
            return self._placeholders[key]
        raise _Refused(f"it asks for {module}.{name}")


@dataclass
class Snapshot:
    """A released snapshot's network, read without building it."""

    class_name: str  # the preconditioning wrapper, e.g. EDMPrecondLEGO
    kwargs: dict  # its constructor arguments (image resolution, channels, label_dim, model_type, ...)
    tensors: dict[str, torch.Tensor]  # its state_dict: parameters and persistent buffers by dotted name
    attrs: dict[str, dict] = field(default_factory=dict)  # plain attributes (num_heads, ...) of each submodule


def read_snapshot(path) -> Snapshot:
    """Read the ``ema`` network of a released snapshot pickle safely (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise LegoError(f"snapshot not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":  # torch.save's zip archive (pickles are not zips)
            raise LegoError(
                f"{path} is a torch.save file, not a snapshot pickle of the released code (network-snapshot-*.pkl); "
                "lego.convert reads only those"
            )
    try:
        with open(path, "rb") as f:
            data = SnapshotUnpickler(f).load()
    except _Refused as e:
        raise LegoError(f"{path}: refused to load: {e}, which a released LEGO snapshot never does") from None
    except (EOFError, pickle.UnpicklingError) as e:
        if isinstance(e, EOFError) or "truncated" in str(e):
            raise LegoError(f"{path} ends early: the snapshot is truncated; download it again") from None
        raise LegoError(f"{path} is not a readable snapshot pickle ({e})") from None
    except Exception as e:  # noqa: BLE001 -- whatever a damaged or foreign pickle raises, the answer is the same
        raise LegoError(f"{path} is not a readable snapshot pickle ({type(e).__name__}: {e})") from None
    ema = data.get("ema") if isinstance(data, dict) else None
    if not isinstance(ema, Placeholder) or not isinstance(ema.state, dict):
        raise LegoError(f"{path} is a pickle but not a released LEGO snapshot (no 'ema' network in it)")
    tensors, attrs = {}, {}
    _walk_module(ema, "", tensors, attrs, path)
    kwargs = ema.state.get("_init_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise LegoError(f"{path}: the network's constructor arguments are a {type(kwargs).__name__}, not a dict")
    kwargs = {**kwargs, **attrs[""]}
    return Snapshot(ema.qualname, kwargs, tensors, attrs)


MAX_DEPTH = 32  # modules within modules; a released network nests 6 deep
MAX_RESOLUTION = 1 << 16  # a training canvas side (the released models: 32 to 256)


def _walk_module(obj, prefix, tensors, attrs, path, seen=None):
    """Collect a pickled nn.Module's parameters and persistent buffers as ``state_dict`` would name them."""
    seen = set() if seen is None else seen
    if id(obj) in seen or prefix.count(".") > MAX_DEPTH:
        raise LegoError(f"{path}: its module tree loops back on itself or nests deeper than {MAX_DEPTH} levels; it "
                        "is not a released LEGO network")  # fmt: skip
    seen.add(id(obj))
    state = obj.state if isinstance(obj, Placeholder) else None
    if not isinstance(state, dict) or not isinstance(state.get("_modules"), dict):
        raise LegoError(f"{path}: '{prefix.rstrip('.') or 'ema'}' in the snapshot is not a torch module")
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(value, torch.Tensor):
                raise LegoError(f"{path}: {prefix}{name} in the snapshot is not a tensor")
            tensors[prefix + name] = value
    plain = (bool, int, float, str, tuple, list, type(None))
    attrs[prefix.rstrip(".")] = {k: v for k, v in state.items() if not k.startswith("_") and isinstance(v, plain)}
    for name, child in state["_modules"].items():
        if child is not None:
            _walk_module(child, f"{prefix}{name}.", tensors, attrs, path, seen)


# Linears of a brick: (theirs, ours) names under model.model.<k>. / net.bricks.<k>.; a block's under blocks.<i>.
BLOCK_LINEARS = (
    ("attn.qkv", "qkv"),
    ("attn.proj", "proj"),
    ("mlp.fc1", "fc1"),
    ("mlp.fc2", "fc2"),
    ("adaLN_modulation.1", "adaLN_modulation.1"),
)
FINAL_LINEARS = (
    ("final_layer.linear", "final_layer.linear"),
    ("final_layer.adaLN_modulation.1", "final_layer.adaLN_modulation.1"),
)


class _Source(dict):
    """The snapshot's tensors; each is taken once, so the ones left over are the ones nobody could place."""

    def take(self, name: str) -> torch.Tensor:
        if name not in self:
            raise LegoError(f"the snapshot has no {name}; it is not a LEGO network of the released code")
        return self.pop(name)

    def linear(self, theirs: str, ours: str, out: dict) -> None:
        out[f"{ours}.weight"], out[f"{ours}.bias"] = self.take(f"{theirs}.weight"), self.take(f"{theirs}.bias")


def _convert_brick(src: _Source, k: int, channels: int, attrs: dict, out: dict) -> tuple[BrickSpec, int, set, set]:
    """Map brick k's tensors into ``out``; returns its spec, hidden size, head counts and MLP widths."""
    p, q = f"model.model.{k}.", f"net.bricks.{k}."
    weight = src.take(p + "x_embedder.proj.weight")  # (d, C', l, l)
    d, c_in, l = weight.shape[:3]
    want = channels + 2 if k == 0 else 2 * channels + 2
    if weight.shape[3] != l or c_in != want:
        raise LegoError(
            f"brick {k}'s embedding takes {tuple(weight.shape)}; expected {want} input channels in l x l fields "
            f"({channels} image channels{'' if k == 0 else ', the previous output'} and 2 coordinates)"
        )
    pos = src.take(p + "pos_embed")[0]  # (S, d)
    grid = math.isqrt(pos.shape[0])  # r / l
    fixed = grid * grid == pos.shape[0] and torch.allclose(
        pos, torch.tensor(sincos_pos_embed_2d(d, grid), dtype=torch.float32), atol=1e-5
    )
    if not fixed:
        raise LegoError(f"brick {k}'s position embedding is not the fixed 2-D sin-cos one that lego uses")
    if k > 0:  # theirs [prev, x_t, row, col], ours [x_t, prev, row, col]
        weight = torch.cat([weight[:, channels : 2 * channels], weight[:, :channels], weight[:, 2 * channels :]], 1)
    out[q + "embed_weight"], out[q + "embed_bias"] = weight, src.take(p + "x_embedder.proj.bias")
    depth, heads, widths = 0, set(), set()
    while f"{p}blocks.{depth}.attn.qkv.weight" in src:
        b = f"{p}blocks.{depth}."
        for theirs, ours in BLOCK_LINEARS:
            src.linear(b + theirs, f"{q}blocks.{depth}.{ours}", out)
        widths.add(out[f"{q}blocks.{depth}.fc1.weight"].shape[0])
        heads.add(attrs.get(b + "attn", {}).get("num_heads") or attrs.get(p[:-1], {}).get("num_heads"))
        depth += 1
    for theirs, ours in FINAL_LINEARS:
        src.linear(p + theirs, q + ours, out)
    values = out[q + "final_layer.linear.weight"].shape[0]
    if values != l * l * channels:
        raise LegoError(
            f"brick {k} outputs {values} values per token, not l*l*C = {l * l * channels} "
            "(a learned-variance output is not supported)"
        )
    return BrickSpec(l * grid, l, depth), d, heads, widths


def _number(kw: dict, key: str, default, integer: bool = True, low: float = 1):
    """A constructor argument that must be a plain number >= low, an integer unless ``integer`` is False (None or
    absent: ``default``)."""
    value = kw.get(key)
    if value is None:
        return default
    kind = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value < low:
        need = "an integer" if integer else "a finite number"
        raise LegoError(f"the snapshot's {key} is {value!r}; it must be {need} >= {low:g}")
    return value


def convert_state(snapshot: Snapshot, num_heads: int | None = None) -> tuple[LegoConfig, dict[str, torch.Tensor]]:
    """Our model config and state_dict for a snapshot's network. ``num_heads`` is only needed if the snapshot does
    not record it (shapes cannot tell it)."""
    if not snapshot.class_name.startswith("EDMPrecond"):
        raise LegoError(f"the snapshot's network is a {snapshot.class_name}; only EDM-preconditioned ones convert")
    src = _Source({k: v.detach().float() for k, v in snapshot.tensors.items()})
    kw, attrs = snapshot.kwargs, snapshot.attrs
    if "model.model.0.x_embedder.proj.weight" not in src:
        raise LegoError("the snapshot has no bricks (model.model.0.x_embedder...); it is not a released LEGO network")
    channels = int(_number(kw, "img_channels", src["model.model.0.x_embedder.proj.weight"].shape[1] - 2))
    bad = sorted(k for k, v in src.items() if not torch.isfinite(v).all())
    if bad:
        raise LegoError(f"the snapshot's {bad[0]} (and {len(bad) - 1} more) hold NaN or inf; it is damaged")

    out: dict[str, torch.Tensor] = {}
    bricks, hidden, heads, widths = [], set(), set(), set()
    while f"model.model.{len(bricks)}.x_embedder.proj.weight" in src:
        spec, d, h, w = _convert_brick(src, len(bricks), channels, attrs, out)
        bricks.append(spec)
        hidden.add(d)
        heads |= h
        widths |= w
    heads.discard(None)
    for h in heads:
        _number({"num_heads": h}, "num_heads", None)
    for what, values in (("hidden sizes", hidden), ("MLP widths", widths), ("attention head counts", heads)):
        if len(values) > 1:
            raise LegoError(f"the snapshot's bricks use different {what} {sorted(values)}; lego needs one")
    if heads and num_heads is not None and num_heads not in heads:
        raise LegoError(
            f"--num-heads {num_heads}: the snapshot records {heads.pop()} attention heads, and another count would "
            "change the model; drop --num-heads"
        )
    heads = heads or ({num_heads} if num_heads is not None else set())
    if not heads:
        raise LegoError("the snapshot does not record its number of attention heads; pass --num-heads")
    (hidden,) = hidden
    if hidden % next(iter(heads)):
        raise LegoError(f"the snapshot's hidden size {hidden} does not split into {next(iter(heads))} heads")

    freq = attrs.get("model.t_embedder", {}).get("frequency_embedding_size", 256)
    pe = attrs.get("model.t_embedder.positional_embedding", {})
    if freq != 256 or pe.get("max_positions", 10000) != 10000 or pe.get("endpoint", False):
        raise LegoError(f"the snapshot's time embedding ({freq} frequencies, {pe}) is not DiT's, which lego uses")
    for i in (0, 2):
        src.linear(f"model.t_embedder.mlp.{i}", f"net.t_embedder.mlp.{i}", out)

    num_classes = 0
    if "model.y_embedder.embedding_table.weight" in src:
        w = src.take("model.y_embedder.embedding_table.weight")  # (d, K), over a one-hot label
        b = src.take("model.y_embedder.embedding_table.bias")  # (d,): the null label (all zeros) gives it alone
        num_classes = w.shape[1]
        out["net.y_embedder.embedding_table.weight"] = torch.cat([w.t() + b, b[None]])  # (K + 1, d)
    if _number(kw, "label_dim", num_classes, low=0) != num_classes:
        raise LegoError(f"the snapshot says label_dim {kw['label_dim']} but its label embedding has {num_classes}")

    src.pop("model.map_augment.weight", None)  # applied only with augmentation labels, which sampling never passes
    src.pop("model.map_augment.bias", None)
    if src:
        raise LegoError(f"the snapshot has tensors that this converter cannot place: {', '.join(sorted(src)[:8])}")

    resolution = int(_number(kw, "img_resolution", max(b.brick_size for b in bricks)))
    if resolution % max(b.brick_size for b in bricks) or resolution > MAX_RESOLUTION:
        raise LegoError(
            f"the snapshot's img_resolution {resolution} is not a multiple of its largest brick up to {MAX_RESOLUTION}"
        )
    config = LegoConfig(
        name=str(kw.get("model_type") or "converted"),
        bricks=tuple(bricks),
        hidden_size=hidden,
        num_heads=heads.pop(),
        mlp_ratio=widths.pop() / hidden if widths else 4.0,
        in_channels=channels,
        num_classes=num_classes,
        resolution=resolution,
        precond="edm",
        sigma_data=float(_number(kw, "sigma_data", 0.5, integer=False, low=1e-6)),
        time_scale=1.0,
    )
    return config, out


def convert_model(snapshot_path, num_heads: int | None = None) -> LegoModel:
    """Our LegoModel (eval mode, CPU) holding a released snapshot's EMA weights."""
    return model_from_snapshot(read_snapshot(snapshot_path), num_heads)


def model_from_snapshot(snapshot: Snapshot, num_heads: int | None = None) -> LegoModel:
    """``convert_model`` of a snapshot already read."""
    config, state = convert_state(snapshot, num_heads)
    try:
        model = LegoModel(config)
    except ValueError as e:
        raise LegoError(f"the snapshot's configuration does not build in lego ({e})") from None
    try:
        model.load_state_dict(state)  # strict: a mapping mistake fails here, not as a silently wrong model
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise LegoError(f"the snapshot's weights do not have the shapes its configuration implies ({first})") from None
    return model.eval()


def convert(snapshot_path, out, num_heads: int | None = None) -> Path:
    """Write ``out/checkpoint.safetensors`` + ``out/config.json`` for a released snapshot; returns the checkpoint.

    The snapshot holds only EMA weights: they become both the model and the EMA of the checkpoint, with a fresh
    optimizer state at step 0, so ``lego.train --resume --out OUT --data ... --steps N`` fine-tunes it."""
    snapshot = read_snapshot(snapshot_path)
    model = model_from_snapshot(snapshot, num_heads)
    ckpt = Path(out) / "checkpoint.safetensors"
    train_config = {
        "joint": snapshot.kwargs.get("train_intermediate_stages", True) is not False,
        "model": model.config.name,
        "resolution": model.config.resolution,
        "precond": "edm",
        "steps": 0,
        "out": str(out),
        "converted_from": str(snapshot_path),
    }
    ema = copy.deepcopy(model)  # the same weights, stored twice: safetensors refuses shared memory
    opt = torch.optim.AdamW(model.parameters(), weight_decay=0.0)  # lego.train's (it sets the lr every step)
    save_checkpoint(ckpt, model, ema, opt, 0, train_config)
    return ckpt
