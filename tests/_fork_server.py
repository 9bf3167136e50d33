"""Runs commands of the docs each in a process of its own, forked from this one, which has imported bntool, torch
and the exporters once (a fresh interpreter spends most of a short command importing them).

Started as ``python -c <this file's text>`` (so ``sys.path[0]`` is the working folder, as for ``python -c``) with
the environment the commands get. It computes nothing itself (a process that has run a parallel region of OpenMP
cannot fork safely), it only imports: after each command, the library modules (the standard library's, installed
packages', bntool's; never a file of the command's folder) that the command imported, so that the next command
finds them imported. Each line on stdin is a JSON request; each answer is one JSON line on stdout:

- ``{"kind": "bntool", "argv": [...], "cwd": ..., "script": ..., "stdout": ..., "stderr": ...}``: the console
  script ``script`` (``bntool``) with ``argv``, as its own code runs it: ``sys.exit(bntool.cli.main())``, with
  ``sys.argv[0]`` the script and its folder first on ``sys.path``.
- ``{"kind": "python", "argv": [...], ...}``: ``python ARGV``: ``-c CODE ARGS``, ``-m MODULE ARGS`` or
  ``SCRIPT ARGS`` (``runpy``, with ``sys.path[0]`` as the interpreter sets it).

The child's stdout and stderr go to the files named, its stdin is ``/dev/null``; the answer is
``{"code": exit status}`` once the child has exited.
"""

import atexit
import contextlib
import gc
import json
import os
import runpy
import sys
import sysconfig
import tempfile
import traceback

import onnx  # noqa: F401
import onnxruntime  # noqa: F401
import safetensors.torch  # noqa: F401
import torch.export
import torch.onnx  # noqa: F401

import bntool
import bntool.cli


def _exit_status(code) -> int:
    """What the interpreter does with ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


LIBRARIES = tuple(os.path.realpath(path) + os.sep for path in {
    *(sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")),
    os.path.dirname(bntool.__file__)})


def _libraries_imported(since: set[str]) -> list[str]:
    """Modules imported since ``since`` from the standard library, installed packages or bntool, in order."""
    found = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if name not in since and name != "__main__" and file and os.path.realpath(file).startswith(LIBRARIES):
            found.append(name)
    return found


def _warm(names: list[str]) -> None:
    for name in names:
        if name not in sys.modules:
            # only a head start: a module that cannot be imported here is the command's own to import (or fail on)
            with contextlib.suppress(Exception):
                __import__(name)


def _child(request: dict) -> int:
    os.chdir(request["cwd"])
    for fd, name in ((1, "stdout"), (2, "stderr")):
        target = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        if request["kind"] == "bntool":
            sys.argv = [request["script"], *request["argv"]]
            sys.path[0] = os.path.dirname(request["script"])
            sys.exit(bntool.cli.main())
        first, *rest = request["argv"]
        if first == "-c":
            sys.argv, sys.path[0] = ["-c", *rest[1:]], ""
            code = compile(rest[0], "<string>", "exec")
            exec(code, {"__name__": "__main__", "__builtins__": __builtins__})  # noqa: S102 (python -c CODE)
        elif first == "-m":
            sys.argv, sys.path[0] = ["-m", *rest[1:]], os.getcwd()
            runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
        else:
            sys.argv, sys.path[0] = [first, *rest], os.path.dirname(os.path.abspath(first))
            runpy.run_path(first, run_name="__main__")
        return 0
    except SystemExit as done:
        return _exit_status(done.code)
    except BaseException:  # noqa: BLE001 (as the interpreter: a traceback, status 1)
        traceback.print_exc()
        return 1


def serve() -> None:
    channel = sys.stdout
    modules = tempfile.mkstemp(suffix=".modules", dir=os.getcwd())[1]
    for line in sys.stdin:
        request = json.loads(line)
        open(modules, "w").close()
        channel.flush()
        sys.stderr.flush()
        before = set(sys.modules)
        gc.freeze()  # what is imported lives as long as the process: no child's gc.collect() walks it again
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                status = _child(request)
                atexit._run_exitfuncs()
                with open(modules, "w") as f:
                    json.dump(_libraries_imported(before), f)
            finally:
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(Exception):  # (a stream the command closed: nothing left to write)
                        stream.flush()
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        channel.write(json.dumps({"code": code}) + "\n")
        channel.flush()
        try:
            with open(modules) as f:
                _warm(json.load(f))
        except ValueError:  # the child died before listing them
            pass


serve()
