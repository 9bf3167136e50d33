"""Where output may go, and how it gets there: atomically, never replacing what bntool did not mean to.

``check_output_path`` refuses, before any work, an output that exists (without
``force``), is one of the command's inputs, or cannot be written (tried with a
real temporary file). Writing goes through one helper, ``atomic_write``
(``staging_folder`` plus ``commit_all`` for several files written together, as
an ONNX file and its external data). The output is written to a temporary
file beside it, checked by the caller, then moved into place:

- without ``force`` by a move that cannot replace anything
  (``renameat2(RENAME_NOREPLACE)``, else a hard link, else a last check
  immediately before the rename on file systems with neither; ``noreplace``):
  a file that appeared at ``out`` while bntool worked is never replaced;
- with ``force`` by ``os.replace``, never onto one of the command's inputs.

The files of an output are written into a staging folder beside it,
``.bntool-<host>-<pid>-<random>.tmpdir`` (short whatever the output's name;
a writer's own temporaries land in it too), and the writability probe is a
file ``.bntool-<host>-<pid>-<random>.tmp``. A run that is killed leaves one
behind; the next run that writes into that folder removes those whose process
is gone on this host (names of exactly that pattern, nothing else;
``temporaries``). An output that cannot be written (full disk, read-only file system, no permission, a name too long, a
parent that is a file) is one ``InputError`` saying so, with nothing left.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from ..errors import BntoolError, InputError, named
from .inputs import refuse_inputs
from .noreplace import move_no_replace, sync_folder
from .temporaries import create_temp, remove_stale_temporaries, temp_name

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


# ----------------------------------------------------------------------------- checking an output path


def check_output_path(out: str | os.PathLike, *, force: bool, inputs: Iterable = (), what: str = "`out`") -> Path:
    """Refuse, before any work, an output that exists (without ``force``), is an input, or cannot be written.

    ``inputs`` are paths (or ``(path, label)`` pairs) the command reads; a
    folder protects every file in it. The folder is tried with a real
    temporary file (created and removed), so a read-only file system, a
    missing permission or a path under ``/proc`` is refused now, not after
    the work.
    """
    what = named(what)
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
        raise InputError(f"`{out}` already exists; pass `force=True` to replace it or choose another {what}")
    remove_stale_temporaries(parent)
    with _mapped(out, what):
        tmp = create_temp(parent)
        os.unlink(tmp)
    return out


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255



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


def unwritable(out: Path, code: int, what: str = "`out`") -> InputError:
    what = named(what)
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
                 what: str = "`out`") -> Iterator[Path]:
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
def staging_folder(out: str | os.PathLike, what: str = "`out`") -> Iterator[Path]:
    """A temporary folder beside ``out`` for the files of one output; removed afterwards."""
    out = Path(out)
    remove_stale_temporaries(out.parent)
    with _mapped(out, what):
        while True:
            stage = out.parent / (temp_name() + "dir")
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


def commit_all(moves: Sequence[tuple[Path, Path]], *, force: bool, inputs: Iterable = (), what: str = "`out`") -> None:
    """Move each written temporary to its destination, in order; undo the new ones if one fails.

    Without ``force`` nothing existing is replaced; with it, never an input.
    """
    what = named(what)
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
                        move_no_replace(tmp, dst)
                    except FileExistsError:
                        raise InputError(
                            f"`{dst}` appeared while bntool was working (another process wrote it); it was not "
                            f"replaced and nothing was written; pass `force=True` to replace it or choose another {what}"
                        ) from None
            done.append(dst)
    except BaseException:
        if not force:
            for dst in done:
                with contextlib.suppress(OSError):
                    os.unlink(dst)
        raise
    sync_folder(moves[-1][1].parent if moves else None)
    committed.extend(dst for _, dst in moves)
