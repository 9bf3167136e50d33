"""``dynamic_batch`` / ``--dynamic-batch`` from an example of batch 1.

torch.export specializes a dimension of size 1: exporting a ConvNeXt-style
model (timm's ``LayerNorm2d``: a LayerNorm over channels through a permute)
with a dynamic batch from a batch-1 example fails with "Invalid ranges
[2:1]". bntool exports from a batch of at least 2, whatever the example's
batch, and still verifies at the batch sizes asked for, batch 1 included.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch

import bntool
from examples.models import randomize_bn_

CONVNEXT = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.nn import functional as F


    class LayerNorm2d(nn.LayerNorm):
        \"\"\"timm's LayerNorm2d: LayerNorm over the channels of an NCHW tensor, through a permute.\"\"\"

        def forward(self, x):
            x = x.permute(0, 2, 3, 1)
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            return x.permute(0, 3, 1, 2)


    class ConvNeXtish(nn.Module):
        \"\"\"A patchify stem with a BN, a ConvNeXt block (depthwise conv, LayerNorm2d, MLP), a head.\"\"\"

        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), nn.BatchNorm2d(16))
            self.dw = nn.Conv2d(16, 16, 7, padding=3, groups=16)
            self.norm = LayerNorm2d(16, eps=1e-6)
            self.mlp = nn.Sequential(nn.Conv2d(16, 32, 1), nn.GELU(), nn.Conv2d(32, 16, 1))
            self.head = nn.Sequential(LayerNorm2d(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

        def forward(self, x):
            x = self.stem(x)
            x = x + self.mlp(self.norm(self.dw(x)))
            return self.head(x)


    def net():
        return ConvNeXtish()
    """
)


@pytest.fixture(scope="module")
def convnext(tmp_path_factory):
    folder = tmp_path_factory.mktemp("convnext")
    (folder / "convnext.py").write_text(CONVNEXT)
    from bntool.io import modelspec

    spec = f"{folder / 'convnext.py'}:net"
    torch.manual_seed(0)
    return spec, randomize_bn_(modelspec.build(spec), seed=0).eval()


def _ort(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_a_dynamic_batch_exports_from_a_batch_one_example_and_is_verified_at_batch_one(convnext, tmp_path):
    # catches: the export traced at the example's batch of 1 (torch.export: "Invalid ranges [2:1]"), and a fix that
    # stops verifying at batch 1
    _, model = convnext
    path = tmp_path / "convnext.onnx"
    report = bntool.export_onnx(model, path, example_inputs=torch.randn(1, 3, 32, 32), dynamic_batch=True)
    assert report.passed and report.written and report.bn_left == 0
    assert [c.batch_size for c in report.verification.checks] == [1, 2]
    assert all(isinstance(d, str) for d in report.facts.batch_dims)
    assert any("exported from a batch of 2" in note for note in report.notes)
    for batch in (1, 6):  # an independent run at batch 1 and at a batch never seen
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(_ort(path, x), expected, rtol=1e-4, atol=1e-5)


def test_the_batch_sizes_asked_for_are_the_ones_verified(convnext, tmp_path):
    _, model = convnext
    report = bntool.export_onnx(model, tmp_path / "m.onnx", example_inputs=torch.randn(1, 3, 32, 32), dynamic_batch=True,
                                verify_batch_sizes=[1, 3])
    assert [c.batch_size for c in report.verification.checks] == [1, 3] and report.passed


def test_a_fixed_batch_of_one_is_still_exported_at_one(convnext, tmp_path):
    _, model = convnext
    report = bntool.export_onnx(model, tmp_path / "m.onnx", example_inputs=torch.randn(1, 3, 32, 32))
    assert report.passed and report.facts.batch_dims == (1,) and report.notes == ()
    assert [c.batch_size for c in report.verification.checks] == [1]


def test_cli_dynamic_batch_from_input_shape_batch_one(convnext, cli, tmp_path):
    spec, model = convnext
    ckpt = tmp_path / "convnext.pth"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "convnext.onnx"
    result = cli("export", ckpt, "--model", spec, "--input-shape", "1,3,32,32", "--dynamic-batch", "--out", out,
                 "--json", "--device", "cpu")
    assert result.code == 0, result.out + result.err
    report = json.loads(result.out)
    assert report["written"] and report["dynamic_batch"] and out.exists()
    assert [v["batch_size"] for v in report["verification"]] == [1, 2]
    assert any("exported from a batch of 2" in note for note in report["notes"])
