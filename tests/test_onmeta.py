"""Loading at 1x the checkpoint: the model built on the meta device takes the file's tensors themselves."""

from __future__ import annotations

import hashlib
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bntool.io import checkpoint
from bntool.io.onmeta import build_loaded
from bntool.persist import REPLAYERS
from examples.models import randomize_bn_


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


class WithComputedBuffer(Net):  # a relative-position index: computed, not saved
    def __init__(self):
        super().__init__()
        self.register_buffer("index", torch.arange(6).reshape(2, 3), persistent=False)


class ReadsValues(Net):
    def __init__(self):
        super().__init__()
        self.scale = float(torch.ones(1).sum().item())  # a constructor that reads a value


class Tied(Net):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.head.weight = self.fc.weight


def _file(tmp_path, model: nn.Module, dtype=None):
    state = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).clone()
             for k, v in model.state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    return path


def _source(cls):
    torch.manual_seed(0)
    return randomize_bn_(cls(), 0).eval()


def test_a_meta_build_holds_the_files_tensors_themselves(tmp_path):
    # catches: a model that copies the file's tensors (2x), or built with random weights first
    source = _source(Net)
    path = _file(tmp_path, source)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = checkpoint.read(path)
    file_tensors = {k: v.data_ptr() for k, v in loaded.candidates[0].state_dict.items()}
    built = []
    model, resolved, why = build_loaded(lambda: built.append(torch.empty(1).is_meta) or Net(), loaded,
                                        replayers=REPLAYERS)
    assert why is None and built == [True]
    state = model.state_dict()
    assert {k: v.data_ptr() for k, v in state.items()} == file_tensors
    for key, value in source.state_dict().items():
        assert torch.equal(state[key], value), key
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        model.bn.running_mean.add_(1)  # changed in place (what recalibrate does): the file is not
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("cls, says", [(WithComputedBuffer, "`index` is not in the file"),
                                       (ReadsValues, "building it on the meta device failed"),
                                       (Tied, "are one tensor")])
def test_factories_that_do_not_allow_it_are_built_normally_with_the_reason(tmp_path, cls, says):
    # catches: a computed buffer left on the meta device, a tie broken by assigning
    source = _source(cls)
    loaded = checkpoint.read(_file(tmp_path, source))
    model, _, why = build_loaded(cls, loaded, replayers=REPLAYERS)
    assert why is not None and says in why
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    if cls is Tied:
        assert model.head.weight is model.fc.weight
    if cls is WithComputedBuffer:
        assert torch.equal(model.index, torch.arange(6).reshape(2, 3))


def test_a_file_in_another_dtype_is_cast_to_the_models(tmp_path):
    source = _source(Net)
    loaded = checkpoint.read(_file(tmp_path, source, torch.float16))
    model, _, why = build_loaded(Net, loaded, replayers=REPLAYERS)
    assert why is None and model.conv.weight.dtype == torch.float32
    assert torch.equal(model.conv.weight, source.conv.weight.half().float())


MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        input_shape = (2, 3, 8, 8)

        def __init__(self, computed=False):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            if computed:
                self.register_buffer("index", torch.arange(4), persistent=False)

        def forward(self, x):
            return self.bn(self.conv(x))

    def plain():
        return Net()

    def computed():
        return Net(True)
    """
)


def test_verbose_says_when_the_model_was_built_normally(cli, tmp_path):
    models = tmp_path / "models.py"
    models.write_text(MODELS)
    source = randomize_bn_(Net(), 0)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    save_file(state, tmp_path / "ckpt.safetensors")
    for factory, says in (("plain", False), ("computed", True)):
        result = cli("fold", tmp_path / "ckpt.safetensors", "--model", f"{models}:{factory}", "--dry-run",
                     "--verbose")
        assert result.code == 0, result.err
        assert ("with its own weights before loading" in result.out + result.err) == says
        assert ("`index` is not in the file" in result.out + result.err) == says
