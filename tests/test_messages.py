"""The library names what to pass in Python terms; the command line, at its one error boundary, in flags."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bntool
from bntool.cli.flags import for_cli
from bntool.errors import InputError, named, naming
from tests.conftest import assert_one_line_error, randomize_bn


def test_a_library_error_names_python_parameters_not_flags():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(InputError) as info:
        bntool.fold(model)  # no example_inputs and no declared input shape
    assert "`example_inputs`" in str(info.value) and "--input-shape" not in str(info.value)
    with pytest.raises(InputError) as info:
        bntool.recalibrate(model, [torch.randn(2, 3, 8, 8)], include=["nothing*"])
    assert "include pattern `nothing*`" in str(info.value) and "--" not in str(info.value)


def test_the_cli_says_the_same_with_its_flags(cli, tmp_path):
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    (tmp_path / "net.py").write_text("from torch import nn\n\ndef net():\n"
                                     "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))\n")
    from safetensors.torch import save_file

    save_file(model.state_dict(), tmp_path / "w.safetensors")
    result = cli("fold", tmp_path / "w.safetensors", "--model", f"{tmp_path / 'net.py'}:net")
    assert_one_line_error(result, "pass --input-shape")
    assert "`example_inputs`" not in result.err


@pytest.mark.parametrize("message,expected", [
    ("pass `example_inputs` of that shape", "pass --input-shape of that shape"),
    ('pass `device="cpu"` or auto', "pass --device cpu or auto"),
    ('pass `key="..."` to choose one', "pass --key to choose one"),
    ("pass `allow_pickle=True` if you trust it", "pass --allow-pickle if you trust it"),
    ("layer `include` and layer `blocks.include`", "layer --include and layer `blocks.include`"),
    ("`example_inputs_2` is not a parameter", "`example_inputs_2` is not a parameter"),
])
def test_for_cli_maps_only_whole_parameter_names(message, expected):
    assert for_cli(message) == expected


def test_named_is_the_python_name_unless_the_caller_names_it():
    # catches: a name the CLI set that outlives its block (a Python caller after a CLI run would read flags),
    # or a nested block that replaces the outer names instead of adding to them
    assert named("`out`") == "`out`"
    with naming({"`out`": "--out", "`model`": "--model"}):
        assert (named("`out`"), named("`path`")) == ("--out", "`path`")
        with naming({"`out`": "--plot"}):
            assert (named("`out`"), named("`model`")) == ("--plot", "--model")
        assert named("`out`") == "--out"
    with pytest.raises(InputError), naming({"`out`": "--out"}):
        raise InputError("boom")
    assert named("`out`") == "`out`"


def _weights_only(tmp_path):
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with torch.no_grad():
        model[1].running_var[2] = 0.0  # a dead channel: its finding says the eps is assumed
    torch.save(model.state_dict(), tmp_path / "w.pt")
    return model


def test_inspect_names_the_model_in_python_and_the_cli_by_its_flag(cli, tmp_path):
    model = _weights_only(tmp_path)
    report = bntool.inspect(model.state_dict())
    dead = next(f.message for f in report.findings if f.kind == "dead_channels")
    assert report.note.endswith("whether it folds need `model`") and report.rows[0].fold_reason == "needs `model`"
    assert "the file does not store it; pass `model`)" in dead
    result = cli("inspect", tmp_path / "w.pt", "--json")
    assert result.code == 0, result.err
    shown = json.loads(result.out)
    assert shown["note"] == report.note.replace("`model`", "--model")
    assert [row["fold_reason"] for row in shown["layers"]] == ["needs --model"]
    assert [f["message"] for f in shown["findings"] if f["kind"] == "dead_channels"] \
        == [dead.replace("pass `model`)", "pass --model)")]


def test_an_output_named_like_its_parameter_keeps_its_name(cli, tmp_path, monkeypatch):
    # `out` is named through errors.named, never replaced in the text: a file called `out` stays `out`
    from bntool.io.writing import output_format

    with pytest.raises(InputError, match=r"^`out` `out` has extension ``; use .safetensors"):
        output_format(Path("out"))
    _weights_only(tmp_path)
    (tmp_path / "net.py").write_text("from torch import nn\n\ndef net():\n"
                                     "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))\n")
    monkeypatch.chdir(tmp_path)
    result = cli("fold", "w.pt", "--model", "net.py:net", "--input-shape", "1,3,8,8", "--out", "out")
    assert_one_line_error(result, "Error: --out `out` has extension ``; use .safetensors")
    assert not (tmp_path / "out").exists()


def test_plot_without_matplotlib_names_the_function_or_the_flag(cli, tmp_path, monkeypatch):
    model = _weights_only(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # importing it raises ImportError
    with pytest.raises(InputError, match=r"^`bntool.plot` needs matplotlib; install it with `pip install"):
        bntool.plot(bntool.inspect(model.state_dict()), tmp_path / "a.png")
    result = cli("inspect", tmp_path / "w.pt", "--plot", tmp_path / "b.png")
    assert_one_line_error(result, "Error: --plot needs matplotlib; install it with `pip install bntool[plot]`")
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()


def test_a_model_spec_is_named_by_its_parameter_in_python(tmp_path):
    from bntool.io import modelspec

    (tmp_path / "nets.py").write_text("def number():\n    return 3\n")
    with pytest.raises(InputError, match=r"^`model` `.*nets.py:number` returned a int, not a torch.nn.Module$"):
        modelspec.build(f"{tmp_path / 'nets.py'}:number")
    with pytest.raises(InputError, match=r"^`model_args` is not valid JSON"):
        modelspec.parse_kwargs("{n: 1}")
