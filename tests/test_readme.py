"""The README's runnable blocks work as written, run as a new user would (a shell, the installed `bntool`)."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import run

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_block(heading: str) -> list[str]:
    """The lines of the first ```bash block after ``heading``."""
    section = README[README.index(heading):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"no bash block after {heading!r}"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture
def workdir(tmp_path):
    """A folder laid out like the repository for the examples (the README's paths are relative to it)."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("out", "__pycache__"))
    return tmp_path


def _run(lines: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)
    output = []
    for line in lines:
        result = run(["bash", "-c", line], cwd=cwd, env=env, timeout=600)
        assert result.returncode == 0, f"`{line}` exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        output.append(result.stdout)
    return "\n".join(output)


@pytest.mark.slow
def test_quick_start_runs_as_written(workdir):
    if shutil.which("bntool", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the bntool console script is not installed in this environment")
    out = _run(_bash_block("## Quick start"), workdir)
    assert "Folded 4 BatchNorm layer(s)" in out
    assert "(1): Identity()" in out  # the user's own code got the folded model back
    assert (workdir / "examples" / "out" / "lenet.folded.safetensors").exists()


@pytest.mark.slow
def test_freeze_recalibrate_fold_example_runs_as_written(workdir):
    if shutil.which("bntool", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the bntool console script is not installed in this environment")
    _run(_bash_block("## Quick start")[:1], workdir)  # the example checkpoints
    out = _run(_bash_block("### When to freeze, recalibrate, or fold"), workdir)
    assert "Froze 4 BatchNorm" in out and "Recalibrated 4 BatchNorm" in out and "Folded 4 BatchNorm" in out
    assert (workdir / "examples" / "out" / "lenet.deploy.safetensors").exists()


def test_set_up_is_two_commands_and_ci_runs_them():
    setup = _bash_block("## Set-up")
    assert setup == ['pip install "torch==2.13.0" -e ".[test]"', "python -m pytest"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'python -m pip install "torch==2.13.0" -e ".[test]"' in ci and "\npython -m pytest" in ci
