"""bntool's temporary files: recognisable names, made without clobbering, and the stale ones cleaned up.

Staging folders ``.bntool-<host>-<pid>-<random>.tmpdir`` and probe files
``.bntool-<host>-<pid>-<random>.tmp`` (short whatever the output's name). A
run that is killed leaves one behind; the next run that writes into that
folder removes those whose process is gone on this host (names of exactly
that pattern, nothing else).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

#: Host part of temporary names: a process id means something only on the host that made it.
HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
TEMP_PATTERN = re.compile(r"\.bntool-([0-9a-f]{6})-(\d+)-[0-9a-f]{8}\.tmp(?:dir)?")


def temp_name() -> str:
    """``.bntool-<host>-<pid>-<random>.tmp``: short whatever the output's name, and recognisable."""
    return f".bntool-{HOST_TAG}-{os.getpid()}-{secrets.token_hex(4)}.tmp"


def create_temp(folder: Path) -> Path:
    """A new empty file with a bntool temporary name in ``folder`` (mode 0666 less the umask)."""
    while True:
        path = folder / temp_name()
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
