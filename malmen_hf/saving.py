"""
Saving a folder all at once: a save that fails or is killed half-way leaves the previous folder as it was, and a
folder is never seen half-written.
"""

import contextlib
import ctypes
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, stale: Callable[[str], bool] = lambda name: False) -> Iterator[Path]:
    """
    Yields an empty temporary folder beside `path`; when the block ends without an error, that folder takes the
    place of `path` in one step. Entries of an existing `path` that the block did not write (and that `stale` does not
    name) are carried over as hard links, so a save replaces only what it writes. After an error or a kill, `path` is
    as it was (a killed save may leave a hidden `.<name>.*.tmp` folder beside it, removed by the next save).

    Saves into one parent folder take turns (an exclusive `flock` on that folder, where the system has it): two
    processes saving to the same `path` each succeed in turn, and the folder is always one of their complete saves.

    Args:
        path (`str` or `os.PathLike`): The folder to write.
        stale (`Callable[[str], bool]`, *optional*): Names of entries of the old folder to leave out (files an older
            save wrote that this one replaces under another name, e.g. weight shards).

    Raises:
        `NotADirectoryError` if `path` is an existing file: it is left as it was.
    """
    path = Path(os.path.realpath(path))  # a link to a folder stays a link: its target is replaced
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"{path} is a file, not a folder: saving there would replace it. Give a folder's name (it is created if "
            "missing), or move the file away. Nothing was written."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with _saves_take_turns(path.parent):
        # No other save into this folder runs now: what is left of earlier saves is left over from killed ones.
        for leftover in path.parent.glob(f".{path.name}.*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            yield temporary
            if path.is_dir():
                _carry_over(path, temporary, stale)
            _replace(temporary, path)
        finally:
            # After an exchange the temporary name holds the previous folder.
            shutil.rmtree(temporary, ignore_errors=True)


# Per thread, folder -> how many of its saves hold that folder's lock (a save may run within another). Each thread
# opens its own descriptor, and flock makes two descriptors wait for each other even within one process.
_HELD_LOCKS = threading.local()


@contextlib.contextmanager
def _saves_take_turns(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` for the block, shared by every process's saves into it (none on Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    held = _HELD_LOCKS.__dict__.setdefault("counts", {})
    key = str(folder)
    if held.get(key):  # a save within a save of this process: the lock is already held
        held[key] += 1
        try:
            yield
        finally:
            held[key] -= 1
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        held[key] = 1
        try:
            yield
        finally:
            del held[key]
    finally:
        os.close(descriptor)  # releases the lock


def _carry_over(old: Path, new: Path, stale: Callable[[str], bool]) -> None:
    for entry in old.iterdir():
        target = new / entry.name
        if target.exists() or stale(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:  # a file system without hard links
        shutil.copy2(source, target, follow_symlinks=False)


def _replace(new: Path, old: Path) -> None:
    """Puts `new` at `old`'s name; afterwards `new`'s name holds the previous folder, if there was one."""
    if not old.exists():
        os.rename(new, old)
        return
    if _exchange(new, old):
        return
    # Without an atomic exchange, `old` is missing between the two renames; its content is then at `aside`.
    aside = Path(tempfile.mkdtemp(prefix=f".{old.name}.", suffix=".tmp", dir=old.parent))
    os.rename(old, aside / "previous")
    os.rename(new, old)
    os.rename(aside / "previous", new)
    aside.rmdir()


def _exchange(first: Path, second: Path) -> bool:
    """Swaps two folders in one step (Linux `renameat2(RENAME_EXCHANGE)`); `False` where the system cannot."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    return result == 0


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # Windows: no C library to open this way
        return None


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
