"""Data-parallel training on torch.distributed, launched by torchrun.

    torchrun --nproc_per_node 8 -m lego.train ...                                   # one machine, 8 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m lego.train ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them training is one plain process. Each rank drives
``cuda:LOCAL_RANK`` over NCCL, or the CPU over gloo. Gradients are averaged by DistributedDataParallel, or, with
``--fsdp``, parameters, gradients and optimizer state are sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``),
one unit per brick plus the embedders at the root. What a rank computes is chosen by ``lego.data.loader`` and
``lego.diffusion.loss`` so that a run's result does not depend on the number of ranks (up to the order of float
reductions).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

import lego.ranks
from lego.checkpoints.build import build_model
from lego.checkpoints.format import save_checkpoint, write_checkpoint
from lego.errors import LegoError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True inside a process started by torchrun (or anything else that sets its variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device_name: str | None, resolve) -> tuple[Dist, torch.device, bool]:
    """Join the process group torchrun set up; returns (ranks, this rank's device, whether we created the group).
    ``resolve(name) -> torch.device`` checks a --device name for one process."""
    if not launched():
        return Dist(), resolve(device_name), False
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name is None or device_name == "cuda":
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = resolve(device_name)
        if device.type == "cuda" and world > 1:
            raise LegoError(
                f"--device {device_name} under torchrun: give --device cuda (each rank takes the GPU "
                "of its LOCAL_RANK) or leave --device out"
            )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank), device, created


def teardown(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, ranks: Dist, device: torch.device, fsdp: bool) -> nn.Module:
    """The module the loss calls each micro-step: ``model`` itself in one process, else DDP or FSDP2 around it.
    FSDP2 shards ``model``'s parameters in place (they become DTensors); build the optimizer after this."""
    if fsdp:
        if not ranks.enabled:
            raise LegoError("--fsdp shards over several processes: launch with torchrun --nproc_per_node N")
        # FSDP2 warns that a brick returns a view (patch_unembed's canvas); only an in-place op on it would be wrong,
        # and the stack and the loss use brick outputs out of place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for brick in model.net.brick_modules():
            fully_shard(brick)
        fully_shard(model)  # the embedders; gathered when the step starts
        return model
    if not ranks.enabled:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def grad_sync(wrapped: nn.Module, sync: bool):
    """A context for one micro-step: skip the gradient all-reduce on every micro-step but the last."""
    if isinstance(wrapped, nn.parallel.DistributedDataParallel) and not sync:
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def mean(t: torch.Tensor, ranks: Dist) -> torch.Tensor:
    """The mean of ``t`` over ranks (``t`` itself in one process)."""
    if ranks.world == 1 or not ranks.enabled:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / ranks.world


def barrier(ranks: Dist) -> None:
    if ranks.enabled:
        dist.barrier()


# Agreement (lego.ranks): a rank that stops alone leaves the others waiting forever in their next collective.


def agree(fn, ranks: Dist) -> None:
    """Call ``fn()`` on every rank; when it raises on any rank it raises on all (lego.ranks.agree)."""
    lego.ranks.agree(fn, ranks.world)


def stop_signal(signum: int | None, ranks: Dist) -> int | None:
    """The signal any rank has received (all ranks get the same answer), or None."""
    if lego.ranks.multi(ranks.world):
        signum = lego.ranks.reduce(signum or 0, dist.ReduceOp.MAX)
    return signum or None


def first_step(bad: torch.Tensor, ranks: Dist) -> int:
    """The first step (over all ranks) whose loss was not finite, from each rank's first such step or -1."""
    bad = int(bad)
    if lego.ranks.multi(ranks.world):
        bad = lego.ranks.reduce(bad if bad >= 0 else 2**62, dist.ReduceOp.MIN)
        bad = -1 if bad == 2**62 else bad
    return bad


# Checkpoints. With DDP every rank holds the whole model, and rank 0 writes it. With FSDP the full state is gathered
# (a collective: every rank calls these) onto rank 0's CPU. The file is the same either way, with the optimizer's
# state keyed by parameter index, so any number of ranks, sharded or not, resumes from it.


def _full_state_options():
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_like(ema: nn.Module, model: nn.Module) -> None:
    """Shard the EMA copy as ``wrap`` sharded the model, so that its update stays local to each rank."""
    for brick in ema.net.brick_modules():
        fully_shard(brick)
    fully_shard(ema)


def _names(root: nn.Module) -> list[str]:
    """Parameter names, in the optimizer's order."""
    return [name for name, _ in root.named_parameters()]


def save(path, model, ema, opt, step: int, train_config: dict, ranks: Dist, root: nn.Module, fsdp: bool) -> None:
    """Write a checkpoint from rank 0. ``root`` is what ``wrap`` returned (FSDP's state is gathered through it)."""
    if not fsdp:
        if ranks.main:
            save_checkpoint(path, model, ema, opt, step, train_config)
        return
    options = _full_state_options()
    model_state = get_model_state_dict(root, options=options)  # full tensors on rank 0's CPU, empty elsewhere
    ema_state = get_model_state_dict(ema, options=options)
    opt_state = get_optimizer_state_dict(root, opt, options=options)  # keyed by parameter name
    if ranks.main:
        index = {name: i for i, name in enumerate(_names(root))}
        opt_state = {
            "state": {index[name]: s for name, s in opt_state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in opt_state["param_groups"]],
        }
        write_checkpoint(path, model.config, model_state, ema_state, opt_state, step, train_config)


def load_optimizer(opt, root: nn.Module, state: dict, fsdp: bool) -> None:
    """Load a checkpoint's optimizer state (keyed by parameter index) into ``opt``, sharded or not."""
    if not fsdp:
        opt.load_state_dict(state)
        return
    names = _names(root)
    by_name = {
        "state": {names[int(i)]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(root, opt, by_name, options=StateDictOptions(full_state_dict=True))


def gathered(model: nn.Module, ranks: Dist) -> nn.Module | None:
    """A sharded model (its own FSDP root) as one plain model on rank 0, None on the others; a collective."""
    device = next(model.parameters()).device
    state = get_model_state_dict(model, options=_full_state_options())
    if not ranks.main:
        return None
    plain = build_model(model.config)  # a LEGO stack or a DiT
    plain.load_state_dict(state)
    return plain.to(device).eval()
