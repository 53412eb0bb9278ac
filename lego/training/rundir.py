"""A training run's output folder: who may write it, what a new run may replace, and stopping without loss.

- One run per folder: ``.lock`` holds an exclusive ``flock`` for the run's lifetime; the kernel drops it when its
  holder dies, so a ``kill -9`` leaves nothing to clean by hand (the next run takes the stale file over).
- A new run never replaces a checkpoint: it needs ``--resume`` or ``--overwrite``.
- On start, temporary files of crashed saves are deleted and config.json is re-synced with the checkpoint.
- SIGINT / SIGTERM ask the training loop to save at the end of the current step and stop (``Stopped``); a second
  signal stops at once.
- ``save`` writes a checkpoint only when the loss of every step since the last save and the weights are finite, and
  keeps the ``keep`` - 1 checkpoints before it as checkpoint-STEP.safetensors (hard links: no copy, no extra disk).
- A checkpoint's weights are checked by the next step's loss, computed with them. When that loss is not finite, the
  newest checkpoint holds the weights that gave it: it is dropped for the one before it (which a finite loss checked),
  so that --resume continues from good weights and lego.sample does not draw NaN.

Under torchrun rank 0 owns the folder (lock, checks, files); every rank catches the signals, and the checks that can
stop a run (a non-finite loss) are agreed over the ranks, so that all stop together.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError

from lego.checkpoints.format import load_checkpoint, sync_config_json
from lego.errors import LegoError
from lego.files import FolderLock, atomic_write, remove_orphans
from lego.training import distributed

CHECKPOINT = "checkpoint.safetensors"
OLDER = re.compile(r"checkpoint-(\d+)\.safetensors")  # the checkpoints kept before the newest


class RunDir:
    def __init__(self, out, resume: bool = False, overwrite: bool = False, ranks=None, keep: int = 2):
        self.out = Path(out)
        self.keep = keep  # checkpoints kept: the newest and keep - 1 before it
        self._older: list[int] = []  # steps of this run's checkpoint-STEP.safetensors, oldest first
        self.ranks = ranks or distributed.Dist()
        self.ckpt_path = self.out / CHECKPOINT
        self.resume, self.overwrite = resume, overwrite
        self.stop_signal: int | None = None  # set by SIGINT / SIGTERM
        self._lock = FolderLock(self.out, "lego.train")
        self._created = False
        self._old_handlers: dict = {}
        self._bad_step = None  # tensor: first step since the last save whose loss was not finite (-1: none)
        self.saved_step: int | None = None

    # -- opening and closing --------------------------------------------------------------------------------------
    def open(self) -> RunDir:
        if not self.ranks.main:  # rank 0 owns the folder; the others only stop when it does
            self._catch_signals()
            return self
        out = self.out
        if out.exists() and not out.is_dir():
            raise LegoError(f"--out {out} is a file, not a folder; give a folder name (it is created if missing)")
        self._created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
            self._lock.__enter__()
        except OSError as e:
            raise LegoError(f"--out {out}: cannot write there ({e.strerror}); pick a folder you can write") from None
        try:
            remove_orphans(out, unattributed=True)
            if self.ckpt_path.exists() and self.resume:
                self.saved_step = load_checkpoint(self.ckpt_path, parts=()).step
                sync_config_json(self.ckpt_path)
                self._older = sorted(step for step in self._older_on_disk() if step < self.saved_step)
            elif self.ckpt_path.exists() and not self.overwrite:
                try:
                    held = f"step {load_checkpoint(self.ckpt_path, parts=()).step}"
                except LegoError:
                    held = "unreadable"
                raise LegoError(
                    f"--out {out} already holds a checkpoint ({held}); continue it with --resume, pick a new --out, "
                    "or pass --overwrite to replace it"
                )
            self._trim_log()
            self._catch_signals()
        except BaseException:
            self.close()
            raise
        return self

    def release_signals(self) -> None:
        """Give SIGINT / SIGTERM back their previous handlers."""
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers = {}

    def close(self) -> None:
        self.release_signals()
        if not self.ranks.main:
            return
        self._lock.__exit__()
        if self._created:  # a run that failed before writing anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                self.out.rmdir()

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _trim_log(self) -> None:
        """A new run starts log.jsonl afresh; a resumed one drops the lines written after its checkpoint (a crashed
        run's steps, which it is about to run again)."""
        log = self.out / "log.jsonl"
        if not log.exists():
            return
        keep = []
        if self.resume and self.saved_step is not None:
            for line in log.read_text().splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    if json.loads(line)["step"] <= self.saved_step:
                        keep.append(line + "\n")
        atomic_write(log, lambda tmp: Path(tmp).write_text("".join(keep)))

    def _catch_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; elsewhere the defaults stay
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:  # asked twice: stop now, without saving
            raise KeyboardInterrupt
        self.stop_signal = signum

    # -- during training ------------------------------------------------------------------------------------------
    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Remember the first step since the last save whose loss is not finite, without a device sync."""
        bad = ~torch.isfinite(loss.detach())
        if self._bad_step is None:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        self._bad_step = torch.where(bad & (self._bad_step < 0), step, self._bad_step)

    def check_loss(self, hint: str) -> None:
        """Raise if a loss since the last save was not finite, keeping the newest checkpoint whose weights a finite
        loss checked (see the module docstring)."""
        bad = -1 if self._bad_step is None else int(distributed.first_step(self._bad_step, self.ranks))
        if bad < 0:
            return
        if not self.saved_step:
            kept = "no checkpoint was written"
        elif self.saved_step < bad - 1:  # the step after the checkpoint had a finite loss
            kept = f"the checkpoint of step {self.saved_step} in {self.out} is kept"
        elif self._older:  # the checkpoint's own weights gave the loss: back to the one before it
            dropped, self.saved_step = self.saved_step, self._older.pop()
            if self.ranks.main:
                os.replace(self._older_path(self.saved_step), self.ckpt_path)
                sync_config_json(self.ckpt_path)
            kept = (
                f"the checkpoint of step {self.saved_step} in {self.out} is kept (the one of step {dropped} held the "
                "weights that gave this loss and was dropped)"
            )
        else:
            kept = (
                f"the checkpoint of step {self.saved_step} in {self.out} holds the weights that gave this loss (no "
                "earlier one was kept: --keep-checkpoints 1); resuming it would diverge again"
            )
        raise LegoError(f"the training loss is not finite at step {bad}: the run diverged; {kept}. {hint}")

    def save(self, step: int, hint: str, write) -> None:
        """Check the losses since the last save, then ``write()`` the checkpoint of ``step`` (on every rank: with
        FSDP gathering the weights is a collective; rank 0 writes). ``write`` refuses non-finite weights."""
        self.check_loss(hint)
        kept = self.ranks.main and self.keep > 1 and bool(self.saved_step) and self.ckpt_path.exists()
        if kept:  # the newest checkpoint stays, under its step's name, once the new one replaces checkpoint.safetensors
            _link_or_copy(self.ckpt_path, self._older_path(self.saved_step))
        try:
            distributed.agree(write, self.ranks)
        except (OSError, SafetensorError) as e:  # safetensors reports its I/O errors as SafetensorError
            full = getattr(e, "errno", None) == errno.ENOSPC or f"os error {errno.ENOSPC})" in str(e)
            reason = "the disk is full" if full else (getattr(e, "strerror", None) or str(e))
            if self._holds(step):  # the checkpoint went in; its readable copy config.json did not
                raise LegoError(
                    f"the checkpoint of step {step} was written to {self.ckpt_path}, but not config.json beside it "
                    f"({reason}); free some space and continue with --resume (it rewrites config.json)"
                ) from None
            kept = f"the checkpoint of step {self.saved_step} is intact" if self.saved_step else "nothing was replaced"
            raise LegoError(
                f"could not write the checkpoint of step {step} to {self.ckpt_path}: {reason}; {kept}. "
                "Free some space and continue with --resume"
            ) from None
        if kept:
            self._older.append(self.saved_step)
        self.saved_step = step
        self._bad_step = None
        if self.ranks.main:
            self._prune()

    def _holds(self, step: int) -> bool:
        """Whether checkpoint.safetensors is the checkpoint of ``step`` (rank 0 reads it)."""
        if not self.ranks.main:
            return False
        try:
            return load_checkpoint(self.ckpt_path, parts=()).step == step
        except LegoError:
            return False

    def _older_path(self, step: int) -> Path:
        return self.out / f"checkpoint-{step}.safetensors"

    def _older_on_disk(self) -> list[int]:
        return [int(m.group(1)) for p in self.out.iterdir() if (m := OLDER.fullmatch(p.name))]

    def _prune(self) -> None:
        """Keep the keep - 1 newest older checkpoints of this run; drop the rest (an overwritten run's too)."""
        self._older = self._older[max(0, len(self._older) - (self.keep - 1)) :]
        for step in set(self._older_on_disk()) - set(self._older):
            with contextlib.suppress(FileNotFoundError):
                self._older_path(step).unlink()


def _link_or_copy(src: Path, dst: Path) -> None:
    """A second name for ``src``'s file (a copy where the file system has no hard links), replacing ``dst``."""
    with contextlib.suppress(FileNotFoundError):
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
