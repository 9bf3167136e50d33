"""Memory-mapped tensors hand their pages back once read (``runtime.pages``), never losing a value.

Mechanism tests: the loaded model's tensors are views of the mapped file; a
scan, a forward pass, a write and its read-back leave none of their pages
resident; a tensor changed in place keeps its change.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bntool import persist
from bntool.io import checkpoint, onmeta, tensorfile
from bntool.runtime import pages
from bntool.runtime.running import run_model, run_on
from bntool.verify.validity import problems

pytestmark = pytest.mark.skipif(not pages._libc_madvise(), reason="needs Linux's madvise and /proc/self/pagemap")


def _file(tmp_path) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.Flatten(), nn.Linear(64 * 16, 10))
    for bn in (model[1], model[4]):  # never the default state
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    path = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval(), path


def _mapped_weights(model: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*model.parameters(), *model.buffers()) if pages.is_mapped(t)]


def _loaded(tmp_path) -> tuple[nn.Module, nn.Module]:
    original, path = _file(tmp_path)

    def build() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                             nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.Flatten(), nn.Linear(64 * 16, 10))

    model, _, normally = onmeta.build_loaded(build, checkpoint.read(path), replayers=persist.REPLAYERS)
    assert normally is None
    return original, model.eval()


def test_a_loaded_models_large_tensors_are_views_of_the_mapped_file(tmp_path):
    _, model = _loaded(tmp_path)
    mapped = _mapped_weights(model)
    # both convs' weights and the linear weight (each over 16 KB), the tensors themselves, not copies
    assert {id(t) for t in mapped} >= {id(model[3].weight), id(model[6].weight)}
    start, length = pages._MAPPED[model[3].weight.untyped_storage().data_ptr()]
    assert start <= model[3].weight.data_ptr() < start + length


def test_release_drops_the_pages_and_keeps_the_values(tmp_path):
    original, model = _loaded(tmp_path)
    weight = model[3].weight
    assert pages.resident(weight) == 0  # mapped, never read
    expected = weight.detach().clone()  # reads it
    assert pages.resident(weight) > 0
    assert pages.release([weight]) > 0
    assert pages.resident(weight) == 0
    assert torch.equal(weight.detach(), expected) and torch.equal(weight.detach(), original[3].weight.detach())


def test_a_tensor_changed_in_place_is_never_released(tmp_path):
    _, model = _loaded(tmp_path)
    weight = model[3].weight
    with torch.no_grad():
        weight.view(-1)[7] += 1.0  # one page is now the process's own (copy-on-write)
    changed = weight.detach().clone()
    assert pages.release([weight]) == 0
    assert pages.resident(weight) > 0
    assert torch.equal(weight.detach(), changed)  # a release would have brought the file's value back


def test_a_forward_pass_and_the_finiteness_scan_leave_no_mapped_page_resident(tmp_path):
    original, model = _loaded(tmp_path)
    x = torch.randn(2, 3, 4, 4)
    assert not problems(model)
    assert all(pages.resident(t) == 0 for t in _mapped_weights(model))
    (_, out), = run_model(model, [x])
    assert all(pages.resident(t) == 0 for t in _mapped_weights(model))
    (_, high), = run_on(model, [x], torch.device("cpu"), torch.float64)  # lent in float64, layer by layer
    assert all(pages.resident(t) == 0 for t in _mapped_weights(model))
    torch.testing.assert_close(out, original(x), rtol=0, atol=0)
    torch.testing.assert_close(high, original.double()(x.double()), rtol=1e-12, atol=1e-12)


def test_writing_and_checking_a_file_from_mapped_tensors_leaves_no_page_resident(tmp_path):
    _, model = _loaded(tmp_path)
    state = model.state_dict()
    out = tmp_path / "out.safetensors"
    tensorfile.write(out, state)
    assert all(pages.resident(t) == 0 for t in _mapped_weights(model))
    assert tensorfile.differences(out, state) == []
    assert all(pages.resident(t) == 0 for t in _mapped_weights(model))
    assert tensorfile.differences(out, {**state, "3.weight": state["3.weight"] + 1}) == ["3.weight"]


def test_a_released_mapping_record_goes_with_its_mapping(tmp_path):
    _, path = _file(tmp_path)
    before = len(pages._MAPPED)
    tensors = tensorfile.read_mapped(path)
    assert len(pages._MAPPED) > before
    del tensors
    assert len(pages._MAPPED) == before  # no stale address left to release


def test_a_snapshot_of_a_mapped_model_leaves_no_page_resident_and_still_sees_a_change(tmp_path):
    from bntool.verify.bits import Snapshot

    _, model = _loaded(tmp_path)
    snapshot = Snapshot(model)
    assert all(pages.resident(t) == 0 for t in _mapped_weights(model))
    assert snapshot.changed(model) == []
    with torch.no_grad():
        model[3].weight.view(-1)[3] += 1.0
    assert snapshot.changed(model) == ["3.weight"]


def test_a_forked_child_reads_its_own_page_map(tmp_path):
    import os

    _, model = _loaded(tmp_path)
    weight = model[3].weight
    weight.detach().sum()  # read in the parent: its pages are clean file pages here
    assert pages.resident(weight) > 0  # (the parent's page map is open)
    pid = os.fork()
    if pid == 0:  # the child writes a page (its own copy now) and must not drop it
        code = 1
        try:
            with torch.no_grad():
                weight.view(-1)[0] = 12345.0
            code = 0 if pages.release([weight]) == 0 and float(weight.detach().view(-1)[0]) == 12345.0 else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert float(weight.detach().view(-1)[0]) != 12345.0
