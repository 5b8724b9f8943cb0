"""Replace a model's folder in a Triton repository in one step, only once its export is proven.

An export builds the whole model folder (``config.pbtxt``, ``1/model.py``, ``1/model/``) in a
staging folder, proves it there, and only then swaps it with the served folder: one
``renameat2(RENAME_EXCHANGE)`` (Linux), which exchanges the two directories atomically, after
which the previous folder, now in staging, is deleted. Triton, whenever it (re)loads the model,
reads either the previous folder whole or the new one whole. A failed proof, an error or a
killed export leaves the served folder untouched.

The staging folder is a hidden sibling of the repository, ``.<repository>.staging``, not a
folder inside it: Triton takes every subfolder of the repository for a model, hidden ones
included (core's model repository manager lists subdirectories and skips only ``.`` and ``..``),
so a temporary folder there would be loaded, or fail the server's start. It must be on the
repository's filesystem, for the rename.

One export at a time per repository holds ``.lock`` in the staging folder (an ``flock``, released
by the kernel when a process dies). An export that finds leftovers of a killed one deletes
them, saying so; where a killed export on a filesystem without ``RENAME_EXCHANGE`` had moved the
previous folder aside but not yet the new one in, it puts the previous folder back.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import shutil
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_PREVIOUS = ".previous"


class StagingError(RuntimeError):
    pass


def _exchange(first: Path, second: Path) -> bool:
    """Swap two directories atomically; False where the system or filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, f"cannot exchange {first} and {second}: {os.strerror(code)}")


class RepositoryStaging:
    """``with RepositoryStaging(repository) as staging:`` then, per model, ``folder =
    staging.new_repository()`` (a scratch repository to write ``<folder>/<name>/`` into),
    ``staging.publish(folder, name)`` once proven, or ``staging.discard(folder)``."""

    def __init__(self, repository: Path):
        self.repository = Path(repository)
        self.root = self.repository.parent / f".{self.repository.name}.staging"
        self._lock = None

    def __enter__(self) -> "RepositoryStaging":
        self.repository.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        if os.stat(self.root).st_dev != os.stat(self.repository).st_dev:
            raise StagingError(
                f"{self.root} is not on the filesystem of {self.repository} (is the repository a mount point?): "
                "the export needs both on one filesystem to replace a model folder in one rename"
            )
        self._lock = open(self.root / ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise StagingError(f"another export into {self.repository} is running (it holds {self.root / '.lock'})") from None
        self._recover_leftovers()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.close()  # releases the flock

    def _recover_leftovers(self) -> None:
        for leftover in sorted(self.root.iterdir()):
            if leftover.name == ".lock":
                continue
            for previous in leftover.glob(f"*{_PREVIOUS}"):
                served = self.repository / previous.name.removesuffix(_PREVIOUS)
                if not served.exists():
                    os.rename(previous, served)
                    log.warning("put %s back: an export was killed between moving it aside and moving its successor in", served)
            shutil.rmtree(leftover)
            log.warning(
                "removed %s, left by an export that did not finish; the models it was exporting were never replaced", leftover
            )

    def new_repository(self) -> Path:
        folder = self.root / uuid.uuid4().hex[:12]
        folder.mkdir()
        return folder

    def publish(self, staged_repository: Path, name: str) -> None:
        """Make ``staged_repository/name`` the served ``repository/name``, in one rename."""
        new, served = staged_repository / name, self.repository / name
        if not served.exists():
            os.rename(new, served)
        elif not _exchange(new, served):
            # No atomic exchange here: two renames, with _recover_leftovers to undo the first.
            os.rename(served, staged_repository / f"{name}{_PREVIOUS}")
            os.rename(new, served)
        self.discard(staged_repository)

    def discard(self, staged_repository: Path) -> None:
        shutil.rmtree(staged_repository, ignore_errors=True)

    def remove(self, name: str) -> None:
        """Take ``repository/name`` out of the repository in one rename, then delete it."""
        scratch = self.new_repository()
        os.rename(self.repository / name, scratch / name)
        self.discard(scratch)
