"""Shared test helpers: BN state that is never the default, an in-process CLI runner, torchrun, and the
``cuda`` marker (skipped with a reason where torch sees no CUDA GPU)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from torch import nn

from bntool.norms import is_batchnorm, num_features

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


def pytest_collection_modifyitems(config, items):
    # BNTOOL_TEST_DEVICE=cpu runs the cuda tests' plumbing on the CPU (tests/test_cuda.py says what stays skipped)
    if torch.cuda.is_available() or os.environ.get("BNTOOL_TEST_DEVICE", "").startswith("cpu"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def randomize_bn(model: nn.Module, seed: int = 0, signed: bool = True) -> nn.Module:
    """Random running statistics (positive variance), gamma (either sign) and beta on every BN."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not is_batchnorm(m):
                continue
            n = num_features(m)
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.randn(n, generator=g) * 2)
                m.running_var.copy_(torch.rand(n, generator=g) * 2.9 + 0.1)
                if getattr(m, "num_batches_tracked", None) is not None:
                    m.num_batches_tracked.fill_(100)
            if getattr(m, "weight", None) is not None:
                gamma = torch.rand(n, generator=g) + 0.5
                if signed:
                    gamma = gamma * torch.where(torch.rand(n, generator=g) < 0.3, -1.0, 1.0)
                m.weight.copy_(gamma)
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(torch.randn(n, generator=g))
    return model.eval()


@dataclasses.dataclass
class CliResult:
    code: int
    out: str
    err: str


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


def invoke_main(*args, env: dict[str, str] | None = None):
    """Run ``bntool ARGS`` through ``bntool.cli.main`` under Typer's ``CliRunner`` (stdout and stderr apart)."""
    from typer.testing import CliRunner

    from bntool.cli import main

    app = typer.Typer(add_completion=False)

    @app.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
    def run(ctx: typer.Context) -> None:
        main(list(ctx.args))

    return CliRunner(env=env).invoke(app, [str(a) for a in args])


def torchrun(*args: str, nproc: int, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N -m bntool ARGS`` (a free port; the whole process group is
    killed if it outlives ``timeout``, so no rank is ever left waiting for its peers)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "bntool", *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s:\n{stdout}\n{stderr}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


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
