"""Typed errors. Every user-controlled problem is raised as one of these.

A message says what failed, where (file, key, qualified layer name), expected
versus got where that helps, and what to do. ``bntool.cli.main`` turns a
``BntoolError`` into ``Error: <message>`` on stderr and its ``exit_code``.
"""

from __future__ import annotations


class BntoolError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class InputError(BntoolError):
    """Bad input or usage: a file, flag, model spec or data set that cannot be used."""

    exit_code = 2


class UnsafeFileError(InputError):
    """Loading the file would run code from it (arbitrary unpickling)."""


class CheckpointMismatchError(InputError):
    """The weights do not fit the model built from ``--model``."""


class VerificationError(BntoolError):
    """The result does not compute what the original computed; nothing was written."""

    exit_code = 1

    def __init__(self, message: str, report: object | None = None):
        super().__init__(message)
        self.report = report
