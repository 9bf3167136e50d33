"""bntool.data.sources: every --data source kind, every batch form, sharding, and the data mistakes as InputErrors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from bntool.data.batches import batch_size_of, model_input, plan_batches, shard
from bntool.data.sources import ImageFolderBatches, TensorBatches, load_batches
from bntool.errors import InputError
from bntool.recalibration.recalibrate import recalibrate


@pytest.fixture
def stacked() -> torch.Tensor:
    return torch.arange(10 * 2 * 3, dtype=torch.float32).reshape(10, 2, 3)


def check_cut(batches, stacked: torch.Tensor, batch_size: int = 4) -> None:
    """Consecutive slices, last one short, nothing lost or repeated."""
    got = list(batches)
    assert [len(b) for b in got] == [4, 4, 2] and len(batches) == 3
    assert torch.equal(torch.cat(got), stacked)


# ----------------------------------------------------------------------------- sources


def test_pt_file_tensor_and_dict(tmp_path, stacked):
    torch.save(stacked, tmp_path / "x.pt")
    check_cut(load_batches(tmp_path / "x.pt", batch_size=4), stacked)
    torch.save({"inputs": stacked, "labels": torch.zeros(10)}, tmp_path / "d.pt")
    check_cut(load_batches(tmp_path / "d.pt", batch_size=4), stacked)  # the obvious key
    check_cut(load_batches(tmp_path / "d.pt", batch_size=4, input_key="inputs"), stacked)


class NotATensor:
    """Pickled by reference: loading it would import and run code."""


def test_pt_file_with_code_is_refused(tmp_path):
    torch.save({"x": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match=r"holds objects other than tensors \(`[\w.]*NotATensor`\); loading them could run code.*safetensors"):
        load_batches(tmp_path / "evil.pt")


def test_safetensors_file(tmp_path, stacked):
    save_file({"x": stacked}, tmp_path / "x.safetensors")
    check_cut(load_batches(str(tmp_path / "x.safetensors"), batch_size=4), stacked)


def test_npy_and_npz_files(tmp_path, stacked):
    np.save(tmp_path / "x.npy", stacked.numpy())
    check_cut(load_batches(tmp_path / "x.npy", batch_size=4), stacked)
    np.savez(tmp_path / "x.npz", images=stacked.numpy(), labels=np.zeros(10))
    check_cut(load_batches(tmp_path / "x.npz", batch_size=4), stacked)  # `images` is the obvious key
    np.savez(tmp_path / "two.npz", a=stacked.numpy(), b=stacked.numpy() + 1)
    with pytest.raises(InputError, match="pass `input_key`"):
        load_batches(tmp_path / "two.npz")
    got = torch.cat(list(load_batches(tmp_path / "two.npz", batch_size=4, input_key="b")))
    assert torch.equal(got, stacked + 1)


def test_image_folder_resized_and_normalised(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = []
    for i, (h, w) in enumerate([(8, 10), (12, 6), (8, 10)]):
        array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / ("sub" if i == 1 else "") / f"img{i}.png")
        arrays.append(array)
    (folder / "notes.txt").write_text("not an image")
    batches = load_batches(folder, batch_size=2, image_size=8, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.5])
    assert isinstance(batches, ImageFolderBatches) and len(batches) == 2
    first, second = list(batches)
    assert first.shape == (2, 3, 8, 8) and second.shape == (1, 3, 8, 8) and first.dtype == torch.float32
    # sorted paths: img0.png, img2.png, sub/img1.png; check normalisation of one resized image exactly
    resized = np.asarray(Image.fromarray(arrays[0]).resize((8, 8), Image.BILINEAR), dtype=np.float32) / 255
    expected = (torch.from_numpy(resized).permute(2, 0, 1) - torch.tensor([0.5, 0.4, 0.3])[:, None, None]) / \
        torch.tensor([0.2, 0.25, 0.5])[:, None, None]
    torch.testing.assert_close(first[0], expected)
    grey = load_batches(folder, batch_size=3, image_size=(4, 6), mean=[0.5], std=[0.5])
    assert next(iter(grey)).shape == (3, 1, 4, 6)
    with pytest.raises(InputError, match="different sizes.*`image_size`"):
        list(load_batches(folder, batch_size=3))


def test_python_factory_module_and_file_with_data_args(tmp_path, monkeypatch):
    code = (
        "import torch\n"
        "def loader(n=3, size=2):\n"
        "    return [(torch.full((size, 4), float(i)), torch.zeros(size)) for i in range(n)]\n"
        "def stacked(rows=5):\n"
        "    return torch.ones(rows, 4)\n"
    )
    (tmp_path / "mydata.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    batches = load_batches("mydata:loader", data_args='{"n": 4, "size": 3}')
    assert len(batches) == 4 and batches[2][0].shape == (3, 4)
    file_batches = load_batches(f"{tmp_path / 'mydata.py'}:loader", data_args={"n": 2})
    assert [float(model_input(b)[0, 0]) for b in file_batches] == [0.0, 1.0]
    assert [len(b) for b in load_batches("mydata:stacked", batch_size=2, data_args='{"rows": 5}')] == [2, 2, 1]
    with pytest.raises(InputError, match="rejected its arguments.*`data_args`"):
        load_batches("mydata:loader", data_args='{"bogus": 1}')
    with pytest.raises(InputError, match="`data_args` is not valid JSON"):
        load_batches("mydata:loader", data_args="{n: 1}")
    with pytest.raises(InputError, match="no such file or folder"):
        load_batches(tmp_path / "missing.pt")
    with pytest.raises(InputError, match="unknown file type `.csv`"):
        (tmp_path / "x.csv").write_text("1,2")
        load_batches(tmp_path / "x.csv")


# ----------------------------------------------------------------------------- batch forms


def test_batch_forms():
    x = torch.randn(3, 4)
    assert model_input(x) is x
    assert model_input((x, torch.zeros(3))) is x
    assert model_input([x]) is x
    assert model_input({"pixel_values": x, "labels": torch.zeros(3), "ids": [1, 2, 3]}) is x  # obvious key
    assert model_input({"only": x, "meta": "text"}) is x  # the one tensor
    assert model_input({"a": x, "b": torch.zeros(3)}, input_key="a") is x
    with pytest.raises(InputError, match=r"keys `a`, `b`.*pass `input_key`"):
        model_input({"a": x, "b": torch.zeros(3)})
    with pytest.raises(InputError, match=r"no key `c` \(keys: a, b\)"):
        model_input({"a": x, "b": x}, input_key="c")
    with pytest.raises(InputError, match="forward=callable"):
        model_input("text")
    assert batch_size_of({"a": [torch.zeros(5, 2)]}) == 5 and batch_size_of("x") == 0


def test_recalibrate_takes_every_batch_form():
    torch.manual_seed(0)
    x = [torch.randn(4, 3) + 1, torch.randn(6, 3) - 1]
    reference = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    forms = {
        "tensor": x,
        "tuple": [(b, torch.zeros(len(b))) for b in x],
        "dict": [{"input": b, "label": torch.zeros(len(b))} for b in x],
        "key": [{"a": b, "b": torch.zeros(len(b))} for b in x],
    }
    results = []
    for form, batches in forms.items():
        model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
        model.load_state_dict(reference.state_dict())
        report = recalibrate(model, batches, input_key="a" if form == "key" else None)
        assert report.num_samples == 10
        results.append(model[1].running_var.clone())
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model.load_state_dict(reference.state_dict())
    recalibrate(model, [{"features": [b]} for b in x], forward=lambda m, batch: m(batch["features"][0]))
    results.append(model[1].running_var.clone())
    assert all(torch.equal(r, results[0]) for r in results)


# ----------------------------------------------------------------------------- mistakes


def test_batch_of_one_for_bn1d_names_the_layer(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
                          nn.BatchNorm1d(5))
    torch.save(torch.randn(9, 3, 8, 8), tmp_path / "x.pt")
    batches = load_batches(tmp_path / "x.pt", batch_size=4)  # 4, 4, 1
    with pytest.raises(InputError, match=r"batch 2: `4` got 1 value per channel \(input shape \(1, 5\)\).*`batch_size`"):
        recalibrate(model, batches)
    # a conv BN gets H*W values per channel from a single image: that is fine
    recalibrate(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), [torch.randn(1, 3, 8, 8)])


def test_empty_data_is_an_input_error(tmp_path):
    torch.save(torch.zeros(0, 3), tmp_path / "empty.pt")
    with pytest.raises(InputError, match="holds no samples"):
        load_batches(tmp_path / "empty.pt")
    (tmp_path / "no_images").mkdir()
    with pytest.raises(InputError, match="holds no images"):
        load_batches(tmp_path / "no_images")
    with pytest.raises(InputError, match="gave no batches"):
        recalibrate(nn.Sequential(nn.BatchNorm1d(3)), iter([]))
    with pytest.raises(InputError, match="empty"):
        plan_batches([])


def test_shape_that_does_not_fit_says_given_and_expected(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(InputError, match=r"input shape \(2, 5, 8, 8\).*`0` \(Conv2d\) expects \(N, 3, H, W\)"):
        recalibrate(model, [torch.randn(2, 5, 8, 8)])
    mlp = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    with pytest.raises(InputError, match=r"input shape \(2, 7\).*`0` \(Linear\) expects \(N, \.\.\., 6\)"):
        recalibrate(mlp, [torch.randn(2, 7)])


# ----------------------------------------------------------------------------- sharding and held-out batches


def test_plan_batches_shards_and_holds_out():
    batches = TensorBatches(torch.arange(10.0)[:, None], 1)  # batch i holds the value i
    values = lambda it: [int(b[0, 0]) for b in it]  # noqa: E731
    plan = plan_batches(batches, num_batches=6, verify_batches=2, rank=1, world_size=2)
    assert values(plan.calibration) == [1, 3, 5] and values(plan.verification) == [7] and plan.total == 3
    plan = plan_batches(batches, verify_batches=3)  # no --num-batches: all but the last 3
    assert values(plan.calibration) == list(range(7)) and values(plan.verification) == [7, 8, 9]
    assert values(shard(batches, 2, 3)) == [2, 5, 8]
    # an iterable without a length: one iterator, calibration first, then verification
    stream = (torch.tensor([[float(i)]]) for i in range(10))
    plan = plan_batches(stream, num_batches=4, verify_batches=3, rank=0, world_size=2)
    assert plan.total == 2 and values(plan.calibration) == [0, 2] and values(plan.verification) == [4, 6]
    with pytest.raises(InputError, match="needs `num_batches`"):
        plan_batches(iter([]), verify_batches=1)
    with pytest.raises(InputError, match="not enough for `verify_batches` 10"):
        plan_batches(batches, verify_batches=10)
