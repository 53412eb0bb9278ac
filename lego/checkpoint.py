"""Checkpoints: one safetensors file (model, EMA and optimizer tensors; configs and step in its metadata) plus a
config.json beside it, both written atomically (temporary file in the same folder, fsync, rename), so a crash never
leaves a half-written checkpoint where the last good one was."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lego.errors import LegoError
from lego.models import LegoConfig, LegoModel

FORMAT = "lego-checkpoint-1"


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then move the file into place; the old file stays intact until the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Checkpoint:
    model_config: LegoConfig
    train_config: dict
    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict | None


def save_checkpoint(path, model, ema, optimizer, step: int, train_config: dict) -> None:
    from lego.base import stored_state  # a frozen base's weights stay at their origin

    tensors = {f"model/{k}": v.detach().contiguous().cpu() for k, v in stored_state(model).items()}
    tensors.update({f"ema/{k}": v.detach().contiguous().cpu() for k, v in stored_state(ema).items()})
    opt_state = optimizer.state_dict()
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"optim/{idx}/{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    metadata = {
        "format": FORMAT,
        "step": str(step),
        "model_config": json.dumps(model.config.to_dict()),
        "train_config": json.dumps(train_config),
        "param_groups": json.dumps(opt_state["param_groups"]),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    config = {"step": step, "model": model.config.to_dict(), "train": train_config}
    atomic_write(Path(path).with_name("config.json"), lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


def load_checkpoint(path, parts: tuple[str, ...] = ("model", "ema", "optim")) -> Checkpoint:
    """Read a checkpoint's configs and step, and of its tensors only the groups in ``parts`` ("model", "ema",
    "optim"; the others come back empty), so that sampling or reading the options does not load everything."""
    path = Path(path)
    if not path.is_file():
        raise LegoError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            wanted = [k for k in f.keys() if k.partition("/")[0] in parts]  # noqa: SIM118 -- not a dict
            tensors = {k: f.get_tensor(k) for k in wanted}
    except (SafetensorError, OSError, ValueError) as e:
        raise LegoError(f"{path} is not a readable safetensors checkpoint ({e}); it may be corrupt or truncated") from None
    if metadata.get("format") != FORMAT:
        raise LegoError(f"{path} is a safetensors file but not a lego checkpoint (no '{FORMAT}' metadata)")
    try:
        model_config = LegoConfig.from_dict(json.loads(metadata["model_config"]))
        train_config = json.loads(metadata["train_config"])
        step = int(metadata["step"])
    except (KeyError, TypeError, ValueError) as e:
        raise LegoError(f"{path}: the checkpoint's metadata is damaged ({e})") from None
    groups: dict[str, dict] = {"model": {}, "ema": {}, "optim": {}}
    for key, value in tensors.items():
        head, _, rest = key.partition("/")
        groups[head][rest] = value
    optimizer = None
    if "optim" in parts and "param_groups" in metadata:
        state: dict[int, dict] = {}
        for key, value in groups["optim"].items():
            idx, _, name = key.partition("/")
            state.setdefault(int(idx), {})[name] = value
        optimizer = {"state": state, "param_groups": json.loads(metadata["param_groups"])}
    return Checkpoint(model_config, train_config, step, groups["model"], groups["ema"], optimizer)


def load_model(path, use_ema: bool = True, device="cpu") -> LegoModel:
    """The model stored in a checkpoint (its EMA weights by default), in eval mode on ``device``."""
    ckpt = load_checkpoint(path, parts=("ema",) if use_ema else ("model",))
    from lego.base import with_base_weights

    model = LegoModel(ckpt.model_config)
    try:
        model.load_state_dict(with_base_weights(model, ckpt.ema if use_ema else ckpt.model))
    except RuntimeError as e:
        raise LegoError(f"{path}: the weights do not fit the model in its config ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()
