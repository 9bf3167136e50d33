"""The ``bntool`` command line: one Typer app, one subcommand module each.

Subcommands parse options, call the Python API and render its report.
``main()`` is the one error boundary: a ``BntoolError`` becomes one line on
stderr and its exit code (2 for bad input, 1 for failed verification); a
usage error becomes one line and exit 2; ``--debug`` shows tracebacks.
torch is imported inside the commands, so ``bntool --help`` stays instant.
"""

from __future__ import annotations

import sys

import typer
from typer import TyperException
from typer.core import TyperArgument, TyperGroup

from .._version import __version__


class _Argument(TyperArgument):
    """An argument shown by its metavar alone: ``CHECKPOINT``, not ``{CHECKPOINT}`` / ``CHECKPOINT <path>``."""

    def display_type_rich(self, ctx):
        return None if self.metavar else super().display_type_rich(ctx)

    def _usage_display_name(self) -> str:
        name = self.display_name_raw
        return (name if self.required else f"[{name}]") + ("..." if self.nargs != 1 else "")


class _Group(TyperGroup):
    """The bntool command group: every subcommand's arguments shown as ``_Argument``."""

    def __init__(self, **attrs):
        super().__init__(**attrs)
        for command in self.commands.values():
            for param in command.params:
                if type(param) is TyperArgument:
                    param.__class__ = _Argument


app = typer.Typer(
    name="bntool",
    cls=_Group,
    help="BatchNorm surgery for PyTorch checkpoints: fold, recalibrate, freeze, unfreeze, export, inspect. "
    "Every command verifies its result numerically before writing anything.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bntool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    _state["debug"] = debug


# Subcommands register themselves on `app`.
from . import fold as _fold  # noqa: E402,F401
from . import inspect as _inspect  # noqa: E402,F401
from . import freeze as _freeze  # noqa: E402,F401
from . import unfreeze as _unfreeze  # noqa: E402,F401
from . import recalibrate as _recalibrate  # noqa: E402,F401
from . import export as _export  # noqa: E402,F401


#: blocks at least this large come straight from the operating system and go back to it when freed
MMAP_THRESHOLD = 1 << 20


def _give_freed_memory_back() -> None:
    """Ask glibc to hand large blocks back to the system when they are freed.

    By default glibc raises its mmap threshold to the size of the largest
    block freed so far (up to 32 MB), after which model-sized tensors come from
    its heap and their memory is kept when they are freed: a command that
    loads, folds and writes a model would keep the high-water mark of each
    step. A fixed threshold keeps the process at what it really holds.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``bntool`` console script."""
    from .. import outputs
    from ..errors import BntoolError, out_of_memory, out_of_memory_message, user_exit

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["--help"]  # bare `bntool`: the help, on stdout, exit 0
    _give_freed_memory_back()
    _state["debug"] = "--debug" in argv
    outputs.committed.clear()
    try:
        code = app(args=argv, prog_name="bntool", standalone_mode=False)
        if code == 130:  # Typer turns Ctrl-C (KeyboardInterrupt) into a returned 130; no command returns one
            _interrupted(outputs.committed)
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:
        _interrupted(outputs.committed)
        code = 130
    except TyperException as exc:  # usage errors: unknown option, missing argument, bad value
        ctx = getattr(exc, "ctx", None)
        hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
        _error(f"{exc.format_message()}{hint}")
        code = getattr(exc, "exit_code", 2)
    except BntoolError as exc:
        if _state["debug"]:
            raise
        _error(str(exc))
        code = exc.exit_code
    except KeyboardInterrupt:
        _interrupted(outputs.committed)
        code = 130
    except Exception as exc:
        if _state["debug"] or not out_of_memory(exc):
            raise
        _error(out_of_memory_message(exc) + "; nothing was written")
        code = 2
    except BaseException as exc:  # user code (--model, --data) called sys.exit() or raised a BaseException
        if _state["debug"] or isinstance(exc, GeneratorExit):
            raise
        _error(f"the --model or --data code {user_exit(exc)} while bntool ran it; nothing was written; "
               "make it return or raise an ordinary exception")
        code = 2
    sys.exit(code if isinstance(code, int) else 0)


def _interrupted(written: list) -> None:
    if written:
        _error(f"interrupted after writing {', '.join(f'`{p}`' for p in written)}")
    else:
        _error("interrupted; nothing was written")


def _error(message: str) -> None:
    from ..errors import for_cli

    message = for_cli(message)
    from .. import console

    console.error(message)
