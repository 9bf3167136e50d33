"""What the terminal sees: no wrapping off a terminal, one worst number, help, placeholders, whole words."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from bntool.errors import shorten
from examples import models as zoo
from tests.conftest import assert_one_line_error

ROOT = Path(__file__).resolve().parents[1]
LENET = f"{ROOT / 'examples' / 'models.py'}:lenet"
BOX = "┏┃┡│└"


@pytest.fixture
def checkpoint(lenet_checkpoint) -> Path:
    return lenet_checkpoint


def test_off_a_terminal_tables_and_lines_are_never_wrapped(cli, checkpoint, tmp_path, monkeypatch):
    """Off a terminal (captured) and with COLUMNS=80, an 80-column console would wrap the 95-column
    verification table (splitting numbers) and the long path."""
    monkeypatch.setenv("COLUMNS", "80")
    out = tmp_path / ("a-long-output-name-" * 5 + ".safetensors")
    result = cli("fold", checkpoint, "--model", LENET, "--out", out)
    assert result.code == 0, result.out + result.err
    lines = result.out.splitlines()
    assert any(len(line) > 80 for line in lines)
    header = next(line for line in lines if "max abs err" in line)
    assert "max rel err" in header and "tolerance" in header and "argmax agree" in header
    table = [line for line in lines if line[:1] in BOX]
    assert all(line[-1] in "┓┃┩│┘" for line in table), "a table row continued on another line"
    assert f"Wrote {out} (" in result.out


def _table_row(output: str, name: str) -> list[str]:
    row = next(line for line in output.splitlines() if line.startswith("│") and name in line)
    return [cell.strip() for cell in row.strip("│").split("│")]


def test_the_summary_line_names_the_tables_worst_row_in_its_own_numbers(cli, checkpoint, tmp_path):
    result = cli("fold", checkpoint, "--model", LENET, "--out", tmp_path / "f.safetensors")
    assert result.code == 0, result.err
    found = re.search(r"worst (layer `[^`]+`|\S+): max abs error (\S+), \d+% of its tolerance (\S+); "
                      r"max rel error ([^)]+)\)", result.out)
    assert found, result.out
    name, abs_error, tolerance, rel_error = found.groups()
    row = _table_row(result.out, "layers (worst" if name.startswith("layer") else name)
    if name.startswith("layer"):
        assert f"(worst {name[6:]})" in row[0]
    assert row[2:5] == [abs_error, rel_error, tolerance]


def test_bare_bntool_prints_help_and_exits_0(cli):
    result = cli()
    assert result.code == 0 and result.err == ""
    assert result.out.startswith("Usage: bntool") and "Commands:" in result.out


@pytest.mark.parametrize("command", ["fold", "recalibrate", "freeze", "export", "inspect"])
def test_help_placeholders_are_plain_names(cli, command):
    result = cli(command, "--help")
    assert result.code == 0
    assert f"Usage: bntool {command} [OPTIONS] CHECKPOINT" in result.out
    assert not re.search(r"<[a-z][a-z\[\]]*>|\{CHECKPOINT\}", result.out), result.out
    assert "CHECKPOINT  " in result.out  # the argument row is its name alone, not CHECKPOINT <path>


def test_shorten_cuts_at_a_word_boundary():
    text = "Re-running `torch.load` with `weights_only` set to `False` will likely succeed, " * 4
    cut = shorten(text, 100)
    assert len(cut) <= 104 and cut.endswith(" ...")
    assert text.startswith(cut[:-4]) and text[len(cut) - 4] == " "  # the next character starts a new word
    assert shorten("short", 100) == "short"


def test_an_unreadable_checkpoint_gets_the_reason_not_torch_loads_advice(cli, tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes(range(256)) * 16)
    result = cli("inspect", path)
    assert_one_line_error(result, "cannot read", "not a valid PyTorch file")
    assert "weights_only" not in result.err and "Re-running" not in result.err


def test_a_refused_pickle_names_the_objects_torch_would_refuse(cli, tmp_path):
    torch.save({"model": zoo.lenet(), "classes": {"cat", "dog"}}, tmp_path / "whole.pt")
    result = cli("inspect", tmp_path / "whole.pt")
    assert_one_line_error(result, "pickled Python objects", "`torch.nn.modules.container.Sequential`")
    assert "`builtins.set`" not in result.err and "`__builtin__.set`" not in result.err  # torch allows sets


def test_the_examples_outputs_are_ignored_by_git():
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "/walkthrough-out/" in ignored and "/examples/out/" in ignored


@pytest.mark.parametrize("bench", ["bench_fold.py", "bench_recalibrate.py", "bench_export.py"])
def test_the_benchmarks_show_progress_as_they_go(bench):
    source = (ROOT / "benchmarks" / bench).read_text()
    assert "from _progress import start, step" in source and source.count("step(") >= 2
