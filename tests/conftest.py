"""Shared test helpers: BN state that is never the default, the in-process CLI runner (``cli``), the one way
to run a real process (``run``: a fresh interpreter, the console script, torchrun), and the ``cuda`` marker
(skipped with a reason where torch sees no CUDA GPU)."""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from examples.models import randomize_bn_

ROOT = Path(__file__).resolve().parents[1]
#: where ``--device auto`` verifies on this machine
AUTO_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_configure(config):
    # Under pytest-xdist, N workers each running torch with every core oversubscribe the CPU many times over
    # (14 workers x 16 OpenMP threads on a 16-core GPU machine): share the cores out, for subprocesses too.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(threads))


#: ``len(sys.modules)`` when the long-lived objects were last frozen (``_freeze_what_lives_long``)
_frozen_at = [0]


def _freeze_what_lives_long() -> None:
    """Collect, then move every object left into the collector's permanent generation (``gc.freeze``).

    bntool calls ``gc.collect()`` after an in-place fold and before onnxruntime loads an export; a full collection
    walks every object of torch, onnx, the exporters and every test module imported so far (0.3-0.5 s a call on
    2 busy cores, hundreds of calls in the suite). Those objects live as long as the process: frozen, they are not
    walked again; whatever a test creates afterwards is collected as before. (A cycle alive at a freeze, in a
    module's fixture, and dropped later stays in memory until the run ends.)"""
    gc.collect()
    gc.freeze()
    _frozen_at[0] = len(sys.modules)


def pytest_collection_finish(session):
    _freeze_what_lives_long()


def pytest_runtest_logfinish(nodeid, location):
    if len(sys.modules) > _frozen_at[0] + 100:  # a test imported a library (the exporters, onnxscript, ...)
        _freeze_what_lives_long()


def pytest_collection_modifyitems(config, items):
    # BNTOOL_TEST_DEVICE=cpu runs the cuda tests' plumbing on the CPU (tests/test_cuda.py says what stays skipped)
    if torch.cuda.is_available() or os.environ.get("BNTOOL_TEST_DEVICE", "").startswith("cpu"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def randomize_bn(model: nn.Module, seed: int = 0, signed: bool = True) -> nn.Module:
    """``examples.models.randomize_bn_`` (the one BN randomizer), then eval mode."""
    return randomize_bn_(model, seed, signed=signed).eval()


@dataclasses.dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def load_benchmark(monkeypatch):
    """``load_benchmark("bench_fold")``: ``benchmarks/bench_fold.py`` as a module, its helper ``_progress``
    importable by that name as when the benchmark runs as a script (for this test only)."""

    def load(name: str):
        for file, module in (("_progress", "_progress"), (name, f"bntool_bench_{name}")):
            spec = importlib.util.spec_from_file_location(module, ROOT / "benchmarks" / f"{file}.py")
            loaded = importlib.util.module_from_spec(spec)
            monkeypatch.setitem(sys.modules, module, loaded)  # (dataclasses look their module up)
            spec.loader.exec_module(loaded)
        return loaded

    return load


@pytest.fixture
def cli(capsys):
    """Run ``bntool ARGS`` in-process through ``bntool.cli.main`` (the real error boundary)."""
    from bntool.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def assert_one_line_error(result: CliResult, *fragments: str) -> None:
    """Exit 2, exactly one non-empty stderr line starting with ``Error:``, containing each fragment."""
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.code == 2, (result.code, result.err)
    assert len(lines) == 1, result.err
    assert lines[0].startswith("Error: "), lines[0]
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def python_env(**extra: str) -> dict[str, str]:
    """The environment of a test's subprocess: this one's, with the checkout importable, plus ``extra``."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def start(cmd, *, env: dict[str, str] | None = None, cwd: Path | None = None,
          merge_output: bool = False) -> subprocess.Popen:
    """Start ``cmd`` (text output piped; default environment ``python_env()``) in a process group of its own."""
    return subprocess.Popen([str(c) for c in cmd], env=python_env() if env is None else env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
                            text=True, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """Kill ``proc``'s whole process group if it still runs (no child is ever left waiting)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def finish(proc: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
    """Wait for ``proc``; if it outlives ``timeout``, kill its process group and fail the test."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        stdout, stderr = proc.communicate()
        pytest.fail(f"`{' '.join(map(str, proc.args))}` did not finish within {timeout} s:\n{stdout}\n{stderr}")
    finally:
        stop(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run(cmd, *, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 240) -> subprocess.CompletedProcess:
    """The one way tests run a real process (a fresh interpreter, the console script, torchrun): ``start`` and
    ``finish`` it. Everything else runs the CLI in-process through the ``cli`` fixture."""
    return finish(start(cmd, env=env, cwd=cwd), timeout)


def run_python(code: str, *args: str) -> str:
    """``python -c CODE ARGS`` in a fresh interpreter (what this process has imported does not count); its stdout."""
    result = run([sys.executable, "-c", code, *args])
    assert result.returncode == 0, result.stderr
    return result.stdout


def torchrun(*args: str, nproc: int, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N -m bntool ARGS`` (a free port; the whole process group is
    killed if it outlives ``timeout``, so no rank is ever left waiting for its peers)."""
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                "-m", "bntool", *map(str, args)], env=python_env(OMP_NUM_THREADS="1"), cwd=cwd, timeout=timeout)


#: what ``import bntool`` and the use of its public names pull in (a fresh interpreter: nothing else imported)
IMPORT_BNTOOL = ("import json, sys, bntool; bntool.fold; bntool.load; bntool.export_onnx; "
                 "import bntool.freezing.freeze; print(json.dumps(sorted(sys.modules)))")


@pytest.fixture(scope="session")
def imported_by_bntool() -> set[str]:
    """The modules a fresh interpreter holds after ``IMPORT_BNTOOL`` (one interpreter for every test that asks)."""
    import json

    return set(json.loads(run_python(IMPORT_BNTOOL).strip().splitlines()[-1]))


@pytest.fixture
def lenet_checkpoint(tmp_path):
    """``ck.pt``: the example LeNet's state dict with randomized BN state, in ``tmp_path``."""
    from examples import models as zoo

    torch.manual_seed(0)
    path = tmp_path / "ck.pt"
    torch.save(randomize_bn(zoo.lenet(), seed=3).state_dict(), path)
    return path


def folder_state(folder) -> dict[str, object]:
    """Every entry under ``folder``: a regular file by its sha256, a link by its target, a FIFO, device or
    socket by its kind (never opened: a FIFO would block), a folder by name. Compare before/after a run."""
    import hashlib
    import os
    import stat

    state: dict[str, object] = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = os.path.join(root, name)
            st = os.lstat(path)
            key = os.path.relpath(path, folder)
            if stat.S_ISLNK(st.st_mode):
                state[key] = ("link", os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    state[key] = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISDIR(st.st_mode):
                state[key] = "folder"
            else:
                state[key] = ("special", stat.S_IFMT(st.st_mode))
    return state


def bntool_temporaries(folder) -> list[str]:
    """Names under ``folder`` that look like bntool's temporaries (or any temporary at all)."""
    import os

    return [name for _, dirs, names in os.walk(folder) for name in dirs + names
            if name.startswith(".bntool-") or ".tmp" in name]
