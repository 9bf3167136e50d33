"""The library names what to pass in Python terms; the command line, at its one error boundary, in flags."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bntool
from bntool.errors import InputError, for_cli
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
