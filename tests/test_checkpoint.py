"""Loading real checkpoints safely, saving atomically, and the recipe round trip."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import bntool
from bntool.errors import CheckpointMismatchError, InputError, UnsafeFileError
from bntool.io import checkpoint, writing
from examples import models as zoo
from tests.conftest import randomize_bn


@pytest.fixture
def lenet():
    torch.manual_seed(0)
    return randomize_bn(zoo.lenet(), seed=1)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "layout",
    ["plain.pt", "plain.safetensors", "ddp.pth", "compile.ckpt", "lightning.ckpt", "nested.bin", "ddp+compile.pt"],
)
def test_reads_the_layouts_training_scripts_write(tmp_path, lenet, layout):
    state = lenet.state_dict()
    path = tmp_path / layout
    if layout == "plain.safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        payload = {
            "plain.pt": state,
            "ddp.pth": {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}},
            "compile.ckpt": {"model": {f"_orig_mod.{k}": v for k, v in state.items()}, "epoch": 5},
            "lightning.ckpt": {"state_dict": {f"model.{k}": v for k, v in state.items()}, "global_step": 10},
            "nested.bin": {"checkpoint": {"model_state_dict": state}, "step": 7},
            "ddp+compile.pt": {"state_dict": {f"module._orig_mod.{k}": v for k, v in state.items()}},
        }[layout]
        torch.save(payload, path)
    fresh = bntool.load(path, zoo.lenet())
    assert _same_state(fresh, lenet)


def test_two_fitting_state_dicts_need_key(tmp_path, lenet):
    ema = randomize_bn(zoo.lenet(), seed=2)
    path = tmp_path / "ema.pth"
    torch.save({"state_dict": lenet.state_dict(), "state_dict_ema": ema.state_dict()}, path)
    with pytest.raises(InputError, match="key="):
        bntool.load(path, zoo.lenet())
    assert _same_state(bntool.load(path, zoo.lenet(), key="state_dict_ema"), ema)
    with pytest.raises(InputError, match="no state dict under `key=\"nope\"`.*`state_dict`, `state_dict_ema`"):
        bntool.load(path, zoo.lenet(), key="nope")


def test_mismatch_is_a_short_list_of_keys(tmp_path, lenet):
    path = tmp_path / "w.pt"
    torch.save(lenet.state_dict(), path)
    with pytest.raises(CheckpointMismatchError) as info:
        bntool.load(path, zoo.resnet_small())
    message = str(info.value)
    assert "keys missing" in message and "unexpected" in message and "model_args" in message
    assert len(message) < 400 and "\n" not in message


def test_shape_mismatch_names_the_tensor_and_model_args(tmp_path, lenet):
    path = tmp_path / "w.pt"
    torch.save(lenet.state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match=r"`15.weight` is \(10, 84\) in the file but \(7, 84\).*`model_args`"):
        bntool.load(path, zoo.lenet(num_classes=7))


class _Evil:
    """Unpickling this runs code: it creates a file."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil(marker)}, f)
    with pytest.raises(UnsafeFileError, match="allow_pickle=True"):
        checkpoint.read(path)
    assert not marker.exists()


def test_a_pickled_module_needs_allow_pickle_and_then_serves_as_the_model(tmp_path, lenet):
    path = tmp_path / "whole.pt"
    torch.save(lenet, path)
    with pytest.raises(UnsafeFileError):
        checkpoint.read(path)
    loaded = checkpoint.read(path, allow_pickle=True)
    assert isinstance(loaded.module, nn.Sequential)
    assert _same_state(loaded.module, lenet)


@pytest.mark.parametrize("content,fragment", [(b"not a checkpoint", "cannot read"), (b"", "is empty")])
def test_corrupt_files_are_input_errors(tmp_path, content, fragment):
    for suffix in (".pt", ".safetensors"):
        path = tmp_path / f"bad{suffix}"
        path.write_bytes(content)
        with pytest.raises(InputError, match=fragment):
            checkpoint.read(path)


def test_fold_save_load_round_trip_into_a_fresh_model(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(zoo.resnet_small(), seed=4)
    folded, report = bntool.fold(model)
    for name in ("folded.safetensors", "folded.pt"):
        out = writing.save(folded, tmp_path / name, recipe=[report.plan.recipe_step()])
        fresh = bntool.load(out, zoo.resnet_small()).eval()
        assert _same_state(fresh, folded)
        assert isinstance(fresh.bn1, nn.Identity) and fresh.conv1.bias is not None
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(fresh(x), folded(x))
        meta = checkpoint.read(out).metadata
        assert meta["recipe"][0]["op"] == "fold" and meta["bntool_version"] == bntool.__version__


def test_save_is_atomic_and_leaves_nothing_when_the_check_fails(tmp_path, lenet):
    out = tmp_path / "out.safetensors"

    def failing_check(tmp):
        assert tmp.exists() and tmp.parent.parent == tmp_path and tmp.name == out.name  # in a staging folder beside out
        raise InputError("check failed")

    with pytest.raises(InputError, match="check failed"):
        writing.save(lenet, out, recipe=[], check=failing_check)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_existing_output_and_the_input_itself(tmp_path, lenet):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(InputError, match="pass `force=True` to replace it"):
        writing.save(lenet, out, recipe=[])
    assert out.read_bytes() == b"keep me"
    source = checkpoint.Loaded(path=out, candidates=())
    with pytest.raises(InputError, match="never modifies its input"):
        writing.save(lenet, out, recipe=[], source=source, force=True)
    assert out.read_bytes() == b"keep me"
    writing.save(lenet, out, recipe=[], force=True)
    assert _same_state(bntool.load(out, zoo.lenet()), lenet)


def test_unknown_recipe_op_asks_for_a_newer_bntool(tmp_path, lenet):
    out = writing.save(lenet, tmp_path / "x.safetensors", recipe=[{"op": "teleport"}])
    with pytest.raises(InputError, match="newer bntool"):
        bntool.load(out, zoo.lenet())
