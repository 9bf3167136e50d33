"""The files a command reads: only regular files, never one of them overwritten.

``require_regular_file`` ``stat``s an input (following links) before anything
opens it and refuses a FIFO, a device, a socket or an empty file: a pipe or
``/dev/zero`` would block or never end. ``refuse_inputs`` says whether an
output path is one of the inputs (by name, link or hard link; a folder
protects every file in it). ``mentions`` looks for a name in a file through a
memory map (which ``.onnx`` files refer to an external-data file), and
``reason`` words an OS error for a message.
"""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from ..errors import InputError, first_line, named


def require_regular_file(path: str | os.PathLike, what: str, *, allow_empty: bool = False) -> os.stat_result:
    """``stat`` ``path`` (following links) and refuse anything but a non-empty regular file, before opening it."""
    what = named(what)
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        dangling = " (a link to nothing)" if os.path.islink(path) else ""
        raise InputError(f"{what} `{path}` does not exist{dangling}; pass an existing file") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} `{path}`: {reason(exc)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{what} `{path}` is a folder; pass a file")
    if not stat.S_ISREG(st.st_mode):
        kind = _kind(st.st_mode)
        raise InputError(f"{what} `{path}` is {kind}, not a regular file; bntool reads only regular files "
                         "(a pipe or a device may block or never end); pass a file")
    if st.st_size == 0 and not allow_empty:
        raise InputError(f"{what} `{path}` is empty (0 bytes); it was probably cut short while being written "
                         "or copied; pass the complete file")
    return st


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def reason(exc: BaseException) -> str:
    """An OS error as words (``strerror``), never an empty string."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return first_line(exc)


def refuse_inputs(out: Path, inputs: Iterable, what: str = "`out`") -> None:
    """Refuse ``out`` if it is (the same file as, by link or hard link) one of ``inputs``."""
    what = named(what)
    if not os.path.exists(out):
        return
    for item in inputs:
        source, label = item if isinstance(item, tuple) else (item, "the input file")
        source = Path(source)
        if source.is_dir():
            found = _same_file_in(out, source)
            if found is not None:
                raise InputError(f"{what} `{out}` is `{found}`, a file of {label}; bntool never modifies its "
                                 "inputs, pass another path")
        elif _same(out, source):
            raise InputError(f"{what} `{out}` is {label} `{source}`; bntool never modifies its inputs, "
                             "pass another path")


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _same_file_in(out: Path, folder: Path) -> Path | None:
    try:
        target = os.stat(out)
    except OSError:
        return None
    for root, dirs, names in os.walk(folder, followlinks=True):
        for name in names:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                return Path(root, name)
    return None


def mentions(path: Path, name: str) -> bool:
    """Whether the bytes of ``name`` occur in the file ``path`` (memory-mapped: no size limit, no copy)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode) or os.path.getsize(path) == 0:
            return False
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return data.find(name.encode()) != -1
    except (OSError, ValueError):
        return True  # cannot tell: assume it might refer to it
