"""How the operations keep their memory near one model: mechanism tests, not measurements.

The merge planner lets go of each layer's float64 form once no op reads it;
the finiteness scan sums a chunk at a time (``sum(dtype=float64)`` copies what
it sums); folding in place keeps a memory-mapped original itself, not a copy.
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

import bntool
from bntool import persist
from bntool.folding import merge
from bntool.folding.apply import Journal
from bntool.graph.dataflow import dataflow
from bntool.io import checkpoint, onmeta
from bntool.runtime import pages
from bntool.verify import validity
from tests.conftest import randomize_bn


class Block(nn.Module):
    """conv -> BN -> ReLU, plus a 1x1 conv -> BN shortcut added (ResNet's: the add is not linear in one input)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.short, self.sbn = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) + self.sbn(self.short(x))


class Repvgg(nn.Module):
    """A 3x3 and a 1x1 branch of one input, summed: a region the planner merges."""

    def __init__(self, c: int):
        super().__init__()
        self.a, self.abn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.b, self.bbn = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.abn(self.a(x)) + self.bbn(self.b(x)))


def _deep(depth: int = 12) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*(Block(8) for _ in range(depth)), Repvgg(8)).eval()
    randomize_bn(model)
    return model


def test_the_merge_planner_holds_the_forms_of_a_few_layers_not_of_the_model(monkeypatch):
    model = _deep()
    flow = dataflow(model, (torch.randn(1, 8, 6, 6),))
    most = [0]
    linear = merge._linear

    def counting(op, flow_, modules, forms, *rest):
        most[0] = max(most[0], sum(1 for entry in forms.values() if entry[1] is not None))
        return linear(op, flow_, modules, forms, *rest)

    monkeypatch.setattr(merge, "_linear", counting)
    plan = merge.plan_merges(model, flow)
    assert [r.modules for r in plan.regions] == [("12.a", "12.abn", "12.b", "12.bbn")]  # the merge is still found
    assert most[0] <= 6  # 12 blocks of 4 linear layers: without letting go, 48 forms (the model twice, in float64)


class _Sums(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.float64_sums: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.sum, torch.Tensor.sum) and kwargs.get("dtype") == torch.float64:
            self.float64_sums.append(args[0].numel())
        return func(*args, **kwargs)


def test_the_finiteness_scan_makes_no_float64_copy_and_settles_an_overflow_element_by_element():
    values = torch.randn(10_500)
    with _Sums() as sums:
        assert validity.all_finite(values)
    assert sums.float64_sums == []  # (a float64 sum of a float32 tensor copies it whole)
    values[-1] = float("nan")
    assert not validity.all_finite(values)
    values[-1] = float("inf")
    assert not validity.all_finite(values)
    big = torch.full((64,), 6e4, dtype=torch.float16)  # finite, but its float16 sum overflows to inf
    assert validity.all_finite(big)
    big[3] = float("inf")
    assert not validity.all_finite(big)


def _mapped_model(tmp_path) -> nn.Module:
    torch.manual_seed(1)
    original = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                             nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64)).eval()
    randomize_bn(original)
    path = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(path))

    def build():
        return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                             nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64))

    model, _, _ = onmeta.build_loaded(build, checkpoint.read(path), replayers=persist.REPLAYERS)
    return model.eval()


def test_folding_in_place_keeps_a_mapped_original_itself_and_undoes_to_it(tmp_path):
    model = _mapped_model(tmp_path)
    conv = model[3]
    weight = conv.weight
    assert pages.is_mapped(weight)
    expected = weight.detach().clone()
    journal = Journal()
    journal.tensor(conv, "weight")
    assert next(iter(journal.mapped.values())).data_ptr() == weight.data_ptr()  # the mapped tensor, not a copy
    assert not journal.store.memory and not journal.store.on_disk
    conv.weight = nn.Parameter(torch.zeros_like(expected))
    journal.undo()
    assert torch.equal(conv.weight.detach(), expected) and conv.weight.data_ptr() == weight.data_ptr()


def test_a_folded_mapped_model_is_verified_and_lets_the_weights_it_replaced_go(tmp_path):
    model = _mapped_model(tmp_path)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    old = model[3].weight
    folded, report = bntool.fold(model, example_inputs=x, device="cpu")
    assert report.passed and len(report.done) == 2
    assert pages.resident(old) == 0  # read for the fold and its checks, then handed back
    assert model[3].weight is old and pages.is_mapped(old)  # the original is unchanged
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
