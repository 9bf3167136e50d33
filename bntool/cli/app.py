"""The Typer app of the ``bntool`` command line: its options, the root callback, how arguments are shown.

Each subcommand module registers its command on ``app``; ``bntool.cli.main``
runs it.
"""

from __future__ import annotations

import typer
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
    help="BatchNorm surgery for PyTorch checkpoints: fold, recalibrate, freeze, unfreeze, convert, export, inspect. "
    "Every command verifies its result numerically before writing anything.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

#: what the root options set (``--debug``), read by ``bntool.cli.main``
state = {"debug": False, "verbose": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bntool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
    verbose: bool = typer.Option(False, "--verbose", help="Say more about how the command ran (how the model was "
                                                           "built). Accepted after the command name too."),
) -> None:
    state["debug"] = debug
    state["verbose"] = verbose
