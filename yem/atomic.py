"""Crash-safe file writes: write beside the target, fsync, then rename into place.

A reader (or a resumed run) sees either the old file or the complete new one, never a half-written file,
even if the process is killed or the disk fills up mid-write. Temporaries are hidden and carry the writer's
process id: those a killed writer left behind are removed by the next write to the same target. A full disk
or a read-only folder becomes a WriteError that names the target and says what to do. What is published gets the
permissions the user's umask gives, as any file they create would (0644 and 0755 by default).
"""

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from yem.errors import WriteError, YemError

# errno -> (what is wrong, what to do)
DISK_PROBLEMS = {
    errno.ENOSPC: ("no space left on the disk", "Free some disk space, then rerun"),
    errno.EDQUOT: ("disk quota exceeded", "Free some space within your quota, then rerun"),
    errno.EROFS: ("the disk is read-only", "Write somewhere writable, or remount it read-write, then rerun"),
    errno.EACCES: ("permission denied", "Make the folder writable (chmod u+w), then rerun"),
    errno.EPERM: ("operation not permitted", "Make the folder writable, then rerun"),
}
# Errors only writing causes: they are the target's even when the caller's own code inside the block raised them
# (a library writing the staged file). Permission errors there may come from reading an input instead.
WRITE_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) reports an I/O error


@contextmanager
def staged_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success rename it onto `target`, on failure delete it."""
    with _explained(target, set(DISK_PROBLEMS)):
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(target)
        fd, tmp_name = tempfile.mkstemp(prefix=_prefix(target), suffix=".tmp", dir=target.parent)
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _explained(target, WRITE_ONLY):
            yield tmp
        with _explained(target, set(DISK_PROBLEMS)):
            _as_umask_gives(tmp)
            _fsync(tmp)
            os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def write_bytes(target: Path, data: bytes) -> None:
    with staged_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: Path, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: Path, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_with(target: Path, write: Callable[[Path], None]) -> None:
    """Let a library function (safetensors, PIL, torch.save) write to a staged path, then publish it."""
    with staged_path(target) as tmp:
        write(tmp)


@contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` whole (old one removed)."""
    with _explained(target, set(DISK_PROBLEMS)):
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(target)
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        with _explained(target, WRITE_ONLY):
            yield tmp
        with _explained(target, set(DISK_PROBLEMS)):
            for path in [tmp, *tmp.rglob("*")]:
                _as_umask_gives(path)
                if path.is_file():
                    _fsync(path)
            _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename `tmp` onto `target`. An old `target` is renamed aside first and deleted after: renames are
    instant where deleting a large folder is not, so `target` is missing only between two renames."""
    old = target.parent / f"{_prefix(target)}old"
    if target.exists() or target.is_symlink():
        os.replace(target, old)
    os.replace(tmp, target)
    _remove(old)


@contextmanager
def _explained(target: Path, errnos: set[int]) -> Iterator[None]:
    """Turn a full disk or a read-only folder (errno in `errnos`) into a WriteError naming `target`."""
    try:
        yield
    except YemError as e:
        if not isinstance(e, WriteError):
            raise  # already says what is wrong (a bad image met while building a cache, say)
        _raise_for(target, errnos, e.__cause__)  # a file inside a staged folder failed: name the folder
        raise
    except Exception as e:
        _raise_for(target, errnos, e)
        raise


def _raise_for(target: Path, errnos: set[int], error: BaseException | None) -> None:
    """Raise the WriteError for `target` when `error` is a disk problem listed in `errnos`."""
    code = _disk_errno(error) or (errno.ENOSPC if _nearly_full(target.parent) else None)
    if code in errnos:
        what, todo = DISK_PROBLEMS[code]
        raise WriteError(f"{target}: cannot write it ({what}); any previous version is unchanged. {todo}.") from error


def _disk_errno(error: BaseException | None) -> int | None:
    """The errno behind `error`: an OSError's own, or the one a Rust library put in its message."""
    if error is None:
        return None
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno
    found = RUST_IO_ERROR.search(str(error))
    return int(found.group(1)) if found else None


def _nearly_full(folder: Path) -> bool:
    """Whether the disk holding `folder` has under 1 MiB left. Some writers lose the errno of a full disk
    (torch.save: "unexpected pos 576 vs 534"); their half-written temporary still fills it when this runs."""
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def _as_umask_gives(path: Path) -> None:
    """Give `path` the permissions a plain open() or mkdir() would (0644 and 0755 under the usual umask 022):
    mkstemp and mkdtemp make their files private, and so do some writers (safetensors)."""
    if path.is_symlink():
        return
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def _remove_stale(target: Path) -> None:
    """Delete temporaries a killed writer left beside `target`: those whose process no longer runs."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.(?:[a-z0-9_]+\.tmp|old)")
    for leftover in target.parent.iterdir():
        found = pattern.fullmatch(leftover.name)
        if found and not _running(int(found.group(1))):
            _remove(leftover)


def _running(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there: never clean up
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, run by another user
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Durability of the rename itself; not supported on every platform (e.g. Windows), where it is a no-op.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
