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

from .. import __version__

app = typer.Typer(
    name="bntool",
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


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``bntool`` console script."""
    from ..errors import BntoolError

    argv = list(sys.argv[1:] if argv is None else argv)
    _state["debug"] = "--debug" in argv
    try:
        code = app(args=argv, prog_name="bntool", standalone_mode=False)
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:
        _error("aborted")
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
        _error("interrupted; nothing was written")
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


def _error(message: str) -> None:
    from .. import console

    console.error(message)
