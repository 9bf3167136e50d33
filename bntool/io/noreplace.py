"""Moving a written file into place without ever replacing what is there, and making the move durable.

``move_no_replace`` renames atomically where the file system allows
(``renameat2(RENAME_NOREPLACE)``, else a hard link), else with a last check
immediately before the rename; ``sync_folder`` fsyncs the folder so that the
rename survives a crash.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path

#: Link errors meaning "this file system has no hard links", not "the name exists".
_NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS, errno.EINVAL)


def move_no_replace(tmp: Path, dst: Path) -> None:
    """Rename ``tmp`` to ``dst``, failing with ``FileExistsError`` if ``dst`` exists: atomically where the
    file system allows (``renameat2`` with ``RENAME_NOREPLACE``, else a hard link), else by a last check."""
    try:
        renameat2_noreplace(tmp, dst)
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


def renameat2_noreplace(src: Path, dst: Path) -> None:
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


def sync_folder(folder: Path | None) -> None:
    """Make the rename durable (best effort: not every file system or platform allows it)."""
    if folder is None or not hasattr(os, "O_DIRECTORY"):
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
