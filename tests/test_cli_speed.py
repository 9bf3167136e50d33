"""What keeps `bntool fold` / `freeze` quick, checked as mechanisms, not timings: a command imports what it uses
(no ONNX exporter, onnxruntime or torch._dynamo for a fold or a freeze), the original runs once in its own dtype
and once in float64 and the candidate once, and the garbage collector leaves what the imports built alone while
the operation runs; a probed layer is judged from one float64 tensor with the figures of the full path."""

from __future__ import annotations

import gc
import json
import sys
from collections import Counter

import pytest
import torch

import bntool
from examples import models as zoo
from tests.conftest import ROOT, randomize_bn, run_python

LENET = f"{ROOT / 'examples' / 'models.py'}:lenet"
#: what only `bntool export` (or an .onnx file) needs: about 2 s of imports together
EXPORT_ONLY = ("onnx", "onnxruntime", "onnxscript", "onnx_ir", "torch._dynamo", "torch.onnx._internal.exporter",
               "sympy")


def test_fold_and_freeze_commands_import_no_onnx_and_no_dynamo(lenet_checkpoint, tmp_path):
    # catches: a module-level `import onnx` (or of bntool.export / bntool.onnxio) reached from cli.common, persist,
    # folding or freezing, or a torch.export / torch.compile call on the way of a fold
    code = (
        "import json, sys\n"
        "import bntool.cli as c\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        c.main(args)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (args[0], exc.code)\n"
        f"print(json.dumps([m for m in {EXPORT_ONLY!r} if m in sys.modules]))\n"
    )
    commands = [[name, str(lenet_checkpoint), "--model", LENET, "--out", str(tmp_path / f"{name}.safetensors"),
                 "--device", "cpu"] for name in ("fold", "freeze")]
    out = run_python(code, json.dumps(commands))
    assert json.loads(out.splitlines()[-1]) == []
    assert (tmp_path / "fold.safetensors").exists() and (tmp_path / "freeze.safetensors").exists()


def _forwards(model: torch.nn.Module) -> Counter:
    """Forward calls of ``model`` and of the copies that carry its hook, by (the model itself?, input dtype)."""
    calls: Counter = Counter()
    model.register_forward_pre_hook(lambda module, args: calls.update([(module is model, args[0].dtype)]))
    return calls


def test_fold_runs_the_original_once_per_dtype_and_the_folded_model_once():
    # catches: a second full forward of the original (outputs computed apart from the layer-by-layer run), or a
    # verification that runs the folded model twice; in place, as the CLI folds: the folded model is the model
    model = randomize_bn(zoo.resnet_small(), seed=1)
    x = torch.randn(*model.input_shape)
    calls = _forwards(model)
    folded, report = bntool.fold(model, example_inputs=(x,), inplace=True)
    assert report.passed and report.done and folded is model
    assert calls == {(True, torch.float32): 2, (True, torch.float64): 1}


def test_freeze_runs_the_original_once_per_dtype_and_the_frozen_model_once():
    # catches: freeze's check running the original again beside the reference it computed first, or the frozen
    # model twice
    model = randomize_bn(zoo.resnet_small(), seed=2)
    x = torch.randn(*model.input_shape)
    calls = _forwards(model)
    frozen, report = bntool.freeze(model, example_inputs=(x,))
    assert report.passed and frozen is not model
    assert calls == {(True, torch.float32): 1, (True, torch.float64): 1, (False, torch.float32): 1}


def test_the_imports_run_without_full_collections_and_the_operation_with_the_imports_frozen(cli, lenet_checkpoint, tmp_path,
                                                                                monkeypatch):
    # catches: run_operation without gc.freeze (each gc.collect() of a command walks torch's ~170k objects again),
    # or one that leaves them frozen (a process that goes on, tests included, would never collect them); full
    # collections not held off while the command imports, or held off during the operation or after it
    from bntool.cli import common
    from bntool.folding import fold as folding

    seen, importing = [], []
    real, real_resolve = folding.fold, common.resolve_device

    def fold(*args, **kwargs):
        seen.append((gc.get_freeze_count(), gc.get_threshold()))
        return real(*args, **kwargs)

    def resolve_device(*args, **kwargs):  # (called before the operation, once the output is checked)
        importing.append(gc.get_threshold())
        return real_resolve(*args, **kwargs)

    monkeypatch.setattr(folding, "fold", fold)
    monkeypatch.setattr(common, "resolve_device", resolve_device)
    before = gc.get_threshold()
    gc.unfreeze()  # (the suite's conftest freezes what lives long; the CLI freezes only a process that has not)
    assert gc.get_freeze_count() == 0
    try:
        result = cli("fold", lenet_checkpoint, "--model", LENET, "--out", tmp_path / "f.safetensors", "--device",
                     "cpu")
        after = gc.get_freeze_count()
    finally:
        gc.freeze()
    assert result.code == 0, result.err
    assert len(seen) == 1 and seen[0][0] > 10_000 and seen[0][1] == before
    assert importing and importing[0][:2] == before[:2] and importing[0][2] > 1000 * before[2]
    assert after == 0 and gc.get_threshold() == before
    assert "torch" in sys.modules


def test_a_probed_layer_judged_from_one_float64_tensor_gives_the_reference_figures():
    # catches: the fast path of compare_one (finite layer outputs against orig + delta) losing the delta, its sign
    # or a maximum of magnitudes (min/max taken for max |x|), or passing a corrupted channel
    from bntool.verify.tolerance import compare_one

    torch.manual_seed(0)
    orig = torch.randn(1, 8, 5, 5) * 3
    delta = (torch.randn_like(orig) * 1e-6).to(torch.bfloat16)
    ref = orig.double() + delta.double()
    for cand in (orig + torch.randn_like(orig) * 1e-6, -orig.abs() - 1e-5):
        fast = compare_one("layer `x`", orig, cand, None, None, None, delta=delta, widen=1.5)
        full = compare_one("layer `x`", orig, cand, ref, None, None, widen=1.5)
        for name in ("max_abs_error", "max_rel_error", "tolerance", "original_error", "candidate_error"):
            assert getattr(fast, name) == pytest.approx(getattr(full, name), rel=1e-6), name
        assert fast.passed == full.passed and fast.max_abs_error == (cand.double() - orig).abs().max().item()
    broken = orig.clone()
    broken[0, 3] *= 1.001
    assert not compare_one("layer `x`", orig, broken, None, None, None, delta=delta).passed
