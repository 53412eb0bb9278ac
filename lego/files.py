"""Writing files so that nothing a user made is lost: one atomic write for every file the library writes.

Temporary files live in ``.<name>.<pid>.<random>.tmp`` folders beside their target; ``remove_orphans`` deletes the ones
whose writer has died (a ``kill -9`` during a save). Files get mode 0666 less the umask, like any file ``open`` creates.
``FolderLock`` is the one-writer-per-folder lock of a run folder, taken by every tool that writes checkpoints there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import shutil
from pathlib import Path

from lego.errors import LegoError

_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
# Temporary files without a pid: tempfile.mkstemp's (older versions of this module) and safetensors' own.
_UNATTRIBUTED = re.compile(r"^\.(.+\.[A-Za-z0-9_]{8}\.tmp|tmp[A-Za-z0-9]{6})$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _umask() -> int:
    try:  # Linux >= 4.7 shows it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_orphans(folder, unattributed: bool = False) -> list[Path]:
    """Delete the temporary files in ``folder`` left by atomic writers that died; returns them. ``unattributed``
    also deletes temporary files without a pid (older versions', safetensors'): only safe holding the folder's lock."""
    removed = []
    for p in Path(folder).glob(".*"):
        m = _TMP.match(p.name)
        dead = (m and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"]))) or (
            not m and unattributed and _UNATTRIBUTED.match(p.name)
        )
        if dead:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def check_new_files(paths, overwrite: bool = False, option: str = "--out") -> None:
    """The rule of every tool that writes: what is there is replaced only with ``overwrite`` (checked before any
    work, so that nothing is computed for a file that will not be written)."""
    there = [str(p) for p in paths if Path(p).exists()]
    if there and not overwrite:
        raise LegoError(f"{option}: {' and '.join(there)} already there; pick another name, or pass --overwrite")
    for p in paths:
        if Path(p).is_dir():
            raise LegoError(f"{option} {p} is a folder; give a file name")


def sha256(path: Path) -> str:
    """SHA-256 of a file; of a folder, of its files' relative names and sizes (reading every image would take long)."""
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path)}:{f.stat().st_size}\n".encode())
    else:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then move the file into place; the old file stays intact until the rename.

    ``tmp_path`` lies in a private folder ``.<name>.<pid>.<random>.tmp`` beside ``path``, so that whatever the writer
    makes there (safetensors writes its own temporary file first) is cleaned up with it, and is found by
    ``remove_orphans`` if this process is killed. The file gets mode 0666 less the umask, as ``open`` would give it
    (safetensors' temporary files are 0600)."""
    path = Path(path)
    tmp_dir = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp = tmp_dir / path.name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(path.parent)
        tmp_dir.mkdir()
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # named by the file the user asked for, not by our temporary one
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every file system)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class FolderLock:
    """An exclusive ``flock`` on ``folder/.lock`` while in its ``with`` block; the file holds the holder's pid and
    ``program`` (what another process is told holds the folder). The kernel drops the lock when its holder dies, so a
    ``kill -9`` leaves nothing to clean by hand (the next holder takes the stale file over)."""

    NAME = ".lock"

    def __init__(self, folder, program: str):
        self.path = Path(folder) / self.NAME
        self.program = program
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, _, program = os.read(fd, 256).decode(errors="replace").strip().partition(" ")
                os.close(fd)
                raise LegoError(
                    f"--out {self.path.parent} is in use by another {program or 'process'} (pid {pid or '?'}); wait "
                    "for it to finish or pick another --out"
                ) from None
            try:  # the holder we waited on may have unlinked the file we opened: lock the file that is there now
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.program}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self._fd)  # releases the flock
            self._fd = None
