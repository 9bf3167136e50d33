"""The ``bntool`` command line: one Typer app, one subcommand module each.

Subcommands parse options, call the Python API and render its report.
``main()`` is the one error boundary: a ``BntoolError`` becomes one line on
stderr, each Python parameter it names replaced by its flag (``flags``), and its exit code (2 for bad input, 1 for failed verification); a
usage error becomes one line and exit 2; ``--debug`` shows tracebacks.
torch is imported inside the commands, so ``bntool --help`` stays instant.
"""

from __future__ import annotations

import gc
import sys

import typer
from typer import TyperException

from ..errors import BntoolError, naming, out_of_memory, out_of_memory_message, user_exit
from ..io import outputs
from .app import app, state
from .flags import NAMED, for_cli

# Each subcommand module registers its command on `app`, in this order (the order `bntool --help` lists them).
from . import fold  # noqa: E402,F401,I001
from . import inspect  # noqa: E402,F401
from . import freeze  # noqa: E402,F401
from . import unfreeze  # noqa: E402,F401
from . import convert  # noqa: E402,F401
from . import recalibrate  # noqa: E402,F401
from . import export  # noqa: E402,F401

#: blocks at least this large come straight from the operating system and go back to it when freed
MMAP_THRESHOLD = 4 << 20


def _give_freed_memory_back() -> None:
    """Ask glibc to hand large blocks back to the system when they are freed.

    By default glibc raises its mmap threshold to the size of the largest
    block freed so far (up to 32 MB), after which model-sized tensors come from
    its heap and their memory is kept when they are freed: a command that
    loads, folds and writes a model would keep the high-water mark of each
    step. A fixed threshold keeps the process at what it really holds. (128 MB
    was measured against 1 MB, ``benchmarks/bench_fold.py --mmap-thresholds``:
    less system time, 4-8% less CPU on ResNet-50, but a higher peak, freeze
    0.25x the checkpoint more. 4 MB against 1 MB: the activations and
    temporaries of verification at batch 1 come from the heap and are reused
    instead of being mapped and faulted in afresh; fold and freeze of
    ResNet-50 took 0.5-0.7 s less CPU (system time 1.05 -> 0.75 s on fold),
    with peaks 3-5 MB higher, under 0.05x the checkpoint.)
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


#: the third garbage-collection threshold while a command imports: full collections wait (``main``)
IMPORTS_THRESHOLD = 1 << 30


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``bntool`` console script.

    While the command imports (torch and what it uses), the garbage collector's full collections wait: each
    walks every object the imports have built so far (~0.2 s of CPU in all on a fold). ``run_operation`` puts
    the thresholds back once the imports are set aside (``gc.freeze``); they are back when ``main`` returns.
    """
    threshold = gc.get_threshold()
    gc.set_threshold(threshold[0], threshold[1], IMPORTS_THRESHOLD)
    state["gc_threshold"] = threshold
    try:
        _main(argv)
    finally:
        gc.set_threshold(*threshold)


def _main(argv: list[str] | None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["--help"]  # bare `bntool`: the help, on stdout, exit 0
    _give_freed_memory_back()
    if "--verbose" in argv[1:] and "--" not in argv:  # a root option, accepted after the command name too
        argv = ["--verbose", *(a for a in argv if a != "--verbose")]
    state["debug"] = "--debug" in argv
    outputs.committed.clear()
    try:
        with naming(NAMED):  # library messages name parameters by their flags
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
        if state["debug"]:
            raise
        _error(str(exc))
        code = exc.exit_code
    except KeyboardInterrupt:
        _interrupted(outputs.committed)
        code = 130
    except Exception as exc:
        if state["debug"] or not out_of_memory(exc):
            raise
        _error(out_of_memory_message(exc) + "; nothing was written")
        code = 2
    except BaseException as exc:  # user code (--model, --data) called sys.exit() or raised a BaseException
        if state["debug"] or isinstance(exc, GeneratorExit):
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
    from . import console  # rich, imported only to say something: ``bntool --help`` stays fast

    console.error(for_cli(message))
