"""Where output may go, and how it gets there: atomically, never replacing what bntool did not mean to.

``check_output_path`` refuses, before any work, an output that exists (without
``force``), is one of the command's inputs, or cannot be written (tried with a
real temporary file). Writing goes through one helper, ``atomic_write``
(``staging_folder`` plus ``commit_all`` for several files written together, as
an ONNX file and its external data). The output is written to a temporary
file beside it, checked by the caller, then moved into place:

- without ``force`` by a move that cannot replace anything
  (``renameat2(RENAME_NOREPLACE)``, else a hard link, else a last check
  immediately before the rename on file systems with neither): a file that
  appeared at ``out`` while bntool worked is never replaced;
- with ``force`` by ``os.replace``, never onto one of the command's inputs.

The files of an output are written into a staging folder beside it,
``.bntool-<host>-<pid>-<random>.tmpdir`` (short whatever the output's name;
a writer's own temporaries land in it too), and the writability probe is a
file ``.bntool-<host>-<pid>-<random>.tmp``. A run that is killed leaves one
behind; the next run that writes into that folder removes those whose process
is gone on this host (names of exactly that pattern, nothing else). An output that cannot be
written (full disk, read-only file system, no permission, a name too long, a
parent that is a file) is one ``InputError`` saying so, with nothing left.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from .errors import BntoolError, InputError
from .inputs import refuse_inputs

#: Host part of temporary names: a process id means something only on the host that made it.
HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
TEMP_PATTERN = re.compile(r"\.bntool-([0-9a-f]{6})-(\d+)-[0-9a-f]{8}\.tmp(?:dir)?")
#: Outputs moved into place by this process (so an interruption can say what was written).
committed: list[Path] = []

#: What an OS error means for an output being written.
REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is larger than this file system (or a file-size limit) allows",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted there",
    errno.ENAMETOOLONG: "the name is too long for this file system",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EISDIR: "it is a folder",
    errno.ENOENT: "the folder does not accept new files",
    errno.EIO: "an input/output error (a failing disk or a lost network mount)",
    errno.EXDEV: "the temporary file and the output are on different file systems",
    errno.ETXTBSY: "the file is busy",
    errno.EMLINK: "too many links",
}
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
#: Link errors meaning "this file system has no hard links", not "the name exists".
_NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS, errno.EINVAL)


# ----------------------------------------------------------------------------- checking an output path


def check_output_path(out: str | os.PathLike, *, force: bool, inputs: Iterable = (), what: str = "--out") -> Path:
    """Refuse, before any work, an output that exists (without ``force``), is an input, or cannot be written.

    ``inputs`` are paths (or ``(path, label)`` pairs) the command reads; a
    folder protects every file in it. The folder is tried with a real
    temporary file (created and removed), so a read-only file system, a
    missing permission or a path under ``/proc`` is refused now, not after
    the work.
    """
    out = Path(out)
    parent = out.parent
    limit = _name_max(parent)
    if len(os.fsencode(out.name)) > limit:
        raise InputError(f"{what} `{out.name[:40]}...` is {len(os.fsencode(out.name))} bytes long; this file "
                         f"system allows names of up to {limit}; choose a shorter {what}")
    with _mapped(out, what):
        if out.is_dir():
            raise InputError(f"{what} `{out}` is a folder; pass a file path")
        if not parent.exists():
            raise InputError(f"the folder of {what} `{out}` does not exist; create `{parent}` first")
        if not parent.is_dir():
            raise InputError(f"{what} `{out}`: `{parent}` is a file, not a folder; choose another {what}")
    refuse_inputs(out, inputs, what)
    if os.path.lexists(out) and not force:
        raise InputError(f"`{out}` already exists; pass --force to replace it or choose another {what}")
    remove_stale_temporaries(parent)
    with _mapped(out, what):
        tmp = _create_temp(parent)
        os.unlink(tmp)
    return out


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


# ----------------------------------------------------------------------------- temporaries


def _temp_name() -> str:
    """``.bntool-<host>-<pid>-<random>.tmp``: short whatever the output's name, and recognisable."""
    return f".bntool-{HOST_TAG}-{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _create_temp(folder: Path) -> Path:
    """A new empty file with a bntool temporary name in ``folder`` (mode 0666 less the umask)."""
    while True:
        path = folder / _temp_name()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or we cannot tell: keep its file
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Remove bntool temporaries in ``folder`` left by processes of this host that no longer run.

    Only names of exactly bntool's pattern are touched: a file (or a link),
    or a staging folder (``.tmpdir``). Returns the names removed.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = TEMP_PATTERN.fullmatch(entry.name)
        if not match or match.group(1) != HOST_TAG or _alive(int(match.group(2))):
            continue
        try:
            if entry.name.endswith(".tmpdir") and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            elif not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)
            else:
                continue
        except OSError:
            continue
        removed.append(entry.name)
    return removed


# ----------------------------------------------------------------------------- writing


def write_errno(exc: BaseException, folder: Path | None = None) -> int | None:
    """The OS error behind a failed write, if any: an ``OSError`` in the chain, an errno in the text
    (safetensors: ``os error 28``), or, for a writer that reports none, a full disk seen in ``folder``."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno:
            return current.errno
        found = re.search(r"os error (\d+)|\[Errno (\d+)\]|Os \{ code: (\d+)", str(current))
        if found:
            return int(next(g for g in found.groups() if g))
        if "No space left on device" in str(current):
            return errno.ENOSPC
        current = current.__cause__ or current.__context__
    if folder is not None and isinstance(exc, (RuntimeError, ValueError)):
        try:
            vfs = os.statvfs(folder)
            if vfs.f_bavail * vfs.f_frsize < (1 << 20):
                return errno.ENOSPC
        except OSError:
            pass
    return None


def unwritable(out: Path, code: int, what: str = "--out") -> InputError:
    text = REASONS.get(code) or os.strerror(code)
    todo = f"free some space or choose another {what}" if code in _FULL else f"choose another {what}"
    return InputError(f"cannot write {what} `{out}`: {text} ({errno.errorcode.get(code, code)}); "
                      f"nothing was written; {todo}")


@contextlib.contextmanager
def _mapped(out: Path, what: str) -> Iterator[None]:
    """Turn a failed write inside the block into one ``InputError`` about ``out``."""
    try:
        yield
    except BntoolError:
        raise
    except Exception as exc:
        code = write_errno(exc, out.parent)
        if code is None:
            raise
        raise unwritable(out, code, what) from exc


@contextlib.contextmanager
def atomic_write(out: str | os.PathLike, *, force: bool = False, inputs: Iterable = (),
                 what: str = "--out") -> Iterator[Path]:
    """Yield a temporary path for ``out``; move it to ``out`` if the block succeeds, else remove it.

    The path lies in a bntool staging folder beside ``out`` and has ``out``'s
    name, so a writer that makes temporaries of its own beside its target
    (safetensors does) makes them in that folder too: a run that is killed
    leaves one folder that the next run removes. Without ``force`` a file that
    appeared at ``out`` meanwhile is not replaced (``InputError``). Write
    failures become one ``InputError``.
    """
    out = Path(out)
    with staging_folder(out, what) as stage:
        tmp = stage / out.name
        yield tmp
        commit_all([(tmp, out)], force=force, inputs=inputs, what=what)


@contextlib.contextmanager
def staging_folder(out: str | os.PathLike, what: str = "--out") -> Iterator[Path]:
    """A temporary folder beside ``out`` for the files of one output; removed afterwards."""
    out = Path(out)
    remove_stale_temporaries(out.parent)
    with _mapped(out, what):
        while True:
            stage = out.parent / (_temp_name() + "dir")
            try:
                os.mkdir(stage)
                break
            except FileExistsError:
                continue
    try:
        with _mapped(out, what):
            yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _usual_mode(path: Path) -> None:
    """Give a written file the mode a new file gets here (0666 less the umask); writers may create it 0600."""
    umask = os.umask(0)
    os.umask(umask)
    if os.path.isfile(path) and not os.path.islink(path):
        os.chmod(path, 0o666 & ~umask)


def commit_all(moves: Sequence[tuple[Path, Path]], *, force: bool, inputs: Iterable = (), what: str = "--out") -> None:
    """Move each written temporary to its destination, in order; undo the new ones if one fails.

    Without ``force`` nothing existing is replaced; with it, never an input.
    """
    inputs = list(inputs)
    done: list[Path] = []
    try:
        for tmp, dst in moves:
            with _mapped(dst, what):
                _usual_mode(tmp)
                if force:
                    refuse_inputs(dst, inputs, what)
                    os.replace(tmp, dst)
                else:
                    try:
                        _move_no_replace(tmp, dst)
                    except FileExistsError:
                        raise InputError(
                            f"`{dst}` appeared while bntool was working (another process wrote it); it was not "
                            f"replaced and nothing was written; pass --force to replace it or choose another {what}"
                        ) from None
            done.append(dst)
    except BaseException:
        if not force:
            for dst in done:
                with contextlib.suppress(OSError):
                    os.unlink(dst)
        raise
    _sync_folder(moves[-1][1].parent if moves else None)
    committed.extend(dst for _, dst in moves)


def _move_no_replace(tmp: Path, dst: Path) -> None:
    """Rename ``tmp`` to ``dst``, failing with ``FileExistsError`` if ``dst`` exists: atomically where the
    file system allows (``renameat2`` with ``RENAME_NOREPLACE``, else a hard link), else by a last check."""
    try:
        _renameat2_noreplace(tmp, dst)
        return
    except NotImplementedError:
        pass
    try:
        os.link(tmp, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
    else:
        os.unlink(tmp)
        return
    if os.path.lexists(dst):  # no atomic way on this file system: the window is this line to the next
        raise FileExistsError(errno.EEXIST, "File exists", str(dst))
    os.rename(tmp, dst)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_libc_renameat2 = None


def _renameat2_noreplace(src: Path, dst: Path) -> None:
    """Linux ``renameat2(..., RENAME_NOREPLACE)``; ``NotImplementedError`` where it is not available."""
    global _libc_renameat2
    if not sys.platform.startswith("linux"):
        raise NotImplementedError
    if _libc_renameat2 is None:
        import ctypes

        try:
            function = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):
            _libc_renameat2 = False
            raise NotImplementedError from None
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        function.restype = ctypes.c_int
        _libc_renameat2 = function
    if _libc_renameat2 is False:
        raise NotImplementedError
    import ctypes

    if _libc_renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        raise NotImplementedError  # the file system does not support the flag
    raise OSError(code, os.strerror(code), str(dst))


def _sync_folder(folder: Path | None) -> None:
    """Make the rename durable (best effort: not every file system or platform allows it)."""
    if folder is None or not hasattr(os, "O_DIRECTORY"):
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
