"""Every command against bad input and faults: one line, exit 2, nothing lost, nothing left behind.

The sweep runs all five commands against every bad input that applies to
them, in a folder of its own, and checks the same things each time: exit 2,
exactly one ``Error:`` line, no traceback, every file that was in the folder
byte-identical (FIFOs and links by kind and target), and no temporary file
left. Full disks, read-only file systems and refused moves are real where
the kernel can give them without mounting anything (``/dev/full``, ``/proc``,
a parent that is a file) and monkeypatched where it cannot.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from examples import models as zoo
from tests.conftest import assert_one_line_error, bntool_temporaries, folder_state, randomize_bn

COMMANDS = ("fold", "freeze", "recalibrate", "export", "inspect")
WRITERS = ("fold", "freeze", "recalibrate", "export")
OUT_NAME = {"fold": "out.safetensors", "freeze": "out.safetensors", "recalibrate": "out.safetensors",
            "export": "out.onnx", "inspect": "out.png"}


@dataclass
class Run:
    """One command line, built from parts a case may change."""

    command: str
    folder: Path
    checkpoint: Path
    model: str
    out: Path
    data: Path | None = None
    extra: list = field(default_factory=list)

    def argv(self) -> list:
        argv = [self.command, self.checkpoint, "--model", self.model]
        if self.command == "recalibrate" or (self.command == "export" and self.data is not None):
            argv += ["--data", self.data if self.data is not None else self.folder / "calib.pt"]
        if self.command == "recalibrate":
            argv += ["--batch-size", "8"]
        argv += ["--plot" if self.command == "inspect" else "--out", self.out]
        return argv + self.extra


def _lenet_state(**changes) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = randomize_bn(zoo.lenet(), seed=5)
    with torch.no_grad():
        for key, (index, value) in changes.items():
            model.state_dict()[key].view(-1)[index] = value
    return model.state_dict()


@pytest.fixture
def run_in(tmp_path) -> Callable[[str], Run]:
    """A folder with a checkpoint, calibration data and a --model file, and the command line for ``command``."""

    def make(command: str) -> Run:
        folder = tmp_path / command
        folder.mkdir()
        torch.save(_lenet_state(), folder / "ck.pt")
        torch.save(torch.randn(16, 1, 28, 28), folder / "calib.pt")
        (folder / "net.py").write_text("from examples.models import lenet\n\n\ndef net():\n    return lenet()\n")
        return Run(command, folder, folder / "ck.pt", f"{folder / 'net.py'}:net", folder / OUT_NAME[command])

    return make


# ----------------------------------------------------------------------------- the cases


def _fifo_checkpoint(run, mp):
    os.mkfifo(run.folder / "pipe.pt")
    run.checkpoint = run.folder / "pipe.pt"
    return ["FIFO", "not a regular file"]


def _device_checkpoint(run, mp):
    os.symlink("/dev/zero", run.folder / "zero.pt")
    run.checkpoint = run.folder / "zero.pt"
    return ["character device"]


def _empty_checkpoint(run, mp):
    (run.folder / "empty.pt").write_bytes(b"")
    run.checkpoint = run.folder / "empty.pt"
    return ["empty (0 bytes)"]


def _random_checkpoint(run, mp):
    (run.folder / "noise.pt").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    run.checkpoint = run.folder / "noise.pt"
    return ["cannot read", "not a valid PyTorch file"]


def _pickled_module(run, mp):
    torch.save(zoo.lenet(), run.folder / "module.pt")
    run.checkpoint = run.folder / "module.pt"
    return ["pickled Python objects", "torch.nn.modules.", "--allow-pickle"]


def _bad_tensor(key: str, index: int, value: float, *fragments: str):
    """A case: the checkpoint with one value of ``key`` set to ``value``."""

    def prepare(run, mp):
        run.checkpoint = run.folder / "bad.pt"
        torch.save(_lenet_state(**{key: (index, value)}), run.checkpoint)
        return [f"`{key}`", *fragments]

    return prepare


def _out_under_proc(run, mp):
    run.out = Path("/proc") / run.out.name
    return ["cannot write", str(run.out)]


def _out_parent_is_a_file(run, mp):
    run.out = run.checkpoint / run.out.name
    return ["is a file, not a folder"]


def _out_name_too_long(run, mp):
    run.out = run.folder / ("n" * 300 + run.out.suffix)
    return ["bytes long", "shorter"]


def _out_exists(run, mp):
    run.out.write_bytes(b"somebody's file")
    return ["already exists", "--force"]


def _out_hard_link_to_checkpoint(run, mp):
    os.link(run.checkpoint, run.out)
    run.extra.append("--force")
    return ["the input checkpoint", "never modifies its inputs"]


def _out_symlink_to_checkpoint(run, mp):
    os.symlink(run.checkpoint, run.out)
    run.extra.append("--force")
    return ["the input checkpoint", "never modifies its inputs"]


def _out_hard_link_to_model_file(run, mp):
    os.link(run.folder / "net.py", run.out)
    run.extra.append("--force")
    return ["the --model file", "never modifies its inputs"]


def _out_is_the_data_file(run, mp):
    run.data = run.folder / f"calib{run.out.suffix}"
    if run.out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"x": torch.randn(16, 1, 28, 28)}, run.data)
    else:
        shutil.copy(run.folder / "calib.pt", run.data)
    run.out = run.data
    run.extra.append("--force")
    return ["the --data file", "never modifies its inputs"]


def _out_in_the_data_folder(run, mp):
    images = run.folder / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"not really an image")
    os.link(images / "a.png", run.out)
    run.data = images
    run.extra.append("--force")
    return ["a file of the --data folder", "never modifies its inputs"]


def _data_fifo(run, mp):
    os.mkfifo(run.folder / "pipe.pt")
    run.data = run.folder / "pipe.pt"
    return ["--data", "FIFO"]


def _data_empty(run, mp):
    (run.folder / "empty.pt").write_bytes(b"")
    run.data = run.folder / "empty.pt"
    return ["--data", "empty (0 bytes)"]


def _model_code(source: str, *fragments: str):
    """A case: ``--model`` is a file holding ``source``, with a ``net`` factory (or not)."""

    def prepare(run, mp):
        (run.folder / "user.py").write_text(source)
        run.model = f"{run.folder / 'user.py'}:net"
        return list(fragments)

    return prepare


def _model_file_is_a_fifo(run, mp):
    os.mkfifo(run.folder / "pipe.py")
    run.model = f"{run.folder / 'pipe.py'}:net"
    return ["--model", "FIFO"]


def _input_shape_too_large(run, mp):
    run.extra += ["--input-shape", "100000000,1,28,28"]
    return ["--input-shape", "memory"]


def _full_disk(run, mp):
    """A full disk. Writers that write their target in place (torch.save, onnx, matplotlib) get a real ENOSPC:
    the target in bntool's staging folder is a link to /dev/full. safetensors writes a temporary of its own
    and renames it, so it raises here the error it raises on a full disk."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    import contextlib

    import safetensors.torch
    from safetensors import SafetensorError

    import bntool.io.outputs as outputs

    real_stage = outputs.staging_folder

    @contextlib.contextmanager
    def stage_on_full_disk(out, what="--out"):
        with real_stage(out, what) as stage:
            os.symlink("/dev/full", stage / Path(out).name)
            yield stage

    def save_file(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    mp.setattr(outputs, "staging_folder", stage_on_full_disk)
    mp.setattr(safetensors.torch, "save_file", save_file)
    return ["cannot write", "no space left", "ENOSPC", "nothing was written"]


def _full_disk_pt(run, mp):
    run.out = run.out.with_suffix(".pt")
    return _full_disk(run, mp)


def _read_only_folder(run, mp):
    import bntool.io.temporaries as temporaries

    real_open, real_mkdir = os.open, os.mkdir

    def read_only(name: str) -> None:
        if temporaries.TEMP_PATTERN.fullmatch(os.path.basename(name)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), name)

    mp.setattr(os, "open", lambda path, *a, **k: read_only(str(path)) or real_open(path, *a, **k))
    mp.setattr(os, "mkdir", lambda path, *a, **k: read_only(str(path)) or real_mkdir(path, *a, **k))
    return ["cannot write", "read-only", "EROFS"]


def _move_not_permitted(run, mp):
    import bntool.io.outputs as outputs

    def refuse(tmp, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))

    mp.setattr(outputs, "move_no_replace", refuse)
    return ["cannot write", "permission denied", "EACCES"]


def _appears_meanwhile(run, mp):
    """Another writer creates the output between bntool's checks and its final move."""
    import bntool.io.outputs as outputs

    real = outputs.commit_all

    def other_writer_first(moves, **kwargs):
        for _, dst in moves:
            Path(dst).write_bytes(b"the other writer's result")
        return real(moves, **kwargs)

    mp.setattr(outputs, "commit_all", other_writer_first)
    return ["appeared while bntool was working", "not replaced"]


#: case -> (prepare, commands it applies to)
CASES = {
    "fifo-checkpoint": (_fifo_checkpoint, COMMANDS),
    "dev-zero-checkpoint": (_device_checkpoint, COMMANDS),
    "empty-checkpoint": (_empty_checkpoint, COMMANDS),
    "random-bytes-checkpoint": (_random_checkpoint, COMMANDS),
    "pickled-module": (_pickled_module, COMMANDS),
    # inspect reports these as findings; recalibrate replaces broken statistics (but not broken weights)
    "nan-statistics": (_bad_tensor("5.running_var", 3, float("nan"), "NaN", "bntool recalibrate"),
                       ("fold", "freeze", "export")),
    "negative-variance": (_bad_tensor("1.running_var", 2, -0.5, "negative", "bntool recalibrate"),
                          ("fold", "freeze", "export")),
    "inf-weight": (_bad_tensor("0.weight", 7, float("inf"), "inf", "earlier checkpoint"), WRITERS),
    "nan-weight": (_bad_tensor("12.weight", 0, float("nan"), "NaN", "earlier checkpoint"), WRITERS),
    "out-under-proc": (_out_under_proc, COMMANDS),
    "out-parent-is-a-file": (_out_parent_is_a_file, COMMANDS),
    "out-name-too-long": (_out_name_too_long, COMMANDS),
    "out-exists": (_out_exists, COMMANDS),
    "out-hard-link-to-checkpoint": (_out_hard_link_to_checkpoint, COMMANDS),
    "out-symlink-to-checkpoint": (_out_symlink_to_checkpoint, COMMANDS),
    "out-hard-link-to-model-file": (_out_hard_link_to_model_file, COMMANDS),
    "out-is-the-data-file": (_out_is_the_data_file, ("recalibrate", "export")),
    "out-in-the-data-folder": (_out_in_the_data_folder, ("recalibrate", "export")),
    "data-fifo": (_data_fifo, ("recalibrate", "export")),
    "data-empty": (_data_empty, ("recalibrate", "export")),
    "model-file-exits": (_model_code("import sys\nsys.exit(3)\n", "sys.exit(3)"), COMMANDS),
    "model-factory-exits": (_model_code("def net():\n    raise SystemExit(3)\n", "sys.exit(3)",
                                        "instead of returning a model"), COMMANDS),
    "model-factory-raises-base-exception": (_model_code(
        "class Boom(BaseException):\n    pass\n\n\ndef net():\n    raise Boom('no')\n", "raised Boom"), COMMANDS),
    "model-file-is-a-fifo": (_model_file_is_a_fifo, COMMANDS),
    "input-shape-too-large": (_input_shape_too_large, ("fold", "freeze", "export", "inspect")),
    "full-disk": (_full_disk, COMMANDS),
    "full-disk-pt": (_full_disk_pt, ("fold", "freeze", "recalibrate")),
    "read-only-folder": (_read_only_folder, COMMANDS),
    "move-not-permitted": (_move_not_permitted, COMMANDS),
    "appears-meanwhile": (_appears_meanwhile, COMMANDS),
}
SWEEP = [pytest.param(command, case, id=f"{command}-{case}")
         for case, (_, commands) in CASES.items() for command in commands]


@pytest.mark.parametrize("command, case", SWEEP)
def test_sweep_one_line_exit_2_nothing_lost_nothing_left(cli, run_in, monkeypatch, command, case):
    run = run_in(command)
    prepare, _ = CASES[case]
    fragments = prepare(run, monkeypatch)
    before = folder_state(run.folder)
    result = cli(*run.argv())
    monkeypatch.undo()
    assert_one_line_error(result, *fragments)
    after = folder_state(run.folder)
    if case == "appears-meanwhile":  # the other writer's file is there, untouched; nothing of bntool's
        appeared = {k: v for k, v in after.items() if k not in before}
        assert list(appeared) == [run.out.name]
        assert run.out.read_bytes() == b"the other writer's result"
        after = {k: v for k, v in after.items() if k in before}
    assert after == before  # every file byte-identical, nothing new
    assert bntool_temporaries(run.folder) == []


# ----------------------------------------------------------------------------- the library, given no model


def _library_calls(tmp_path):
    import bntool

    x = torch.randn(2, 3, 8, 8)
    return {
        "load": lambda m: bntool.load(tmp_path / "missing.safetensors", m),
        "save": lambda m: bntool.save(m, tmp_path / "out.safetensors"),
        "fold": lambda m: bntool.fold(m, example_inputs=x),
        "plan_fold": lambda m: bntool.plan_fold(m, x),
        "compare": lambda m: bntool.compare(m, torch.nn.Identity(), (x,)),
        "recalibrate": lambda m: bntool.recalibrate(m, [x]),
        "freeze": lambda m: bntool.freeze(m),
        "unfreeze": lambda m: bntool.unfreeze(m),
        "convert": lambda m: bntool.convert(m, "batchnorm"),
        "export_onnx": lambda m: bntool.export_onnx(m, x, tmp_path / "out.onnx"),
    }


NOT_MODELS = {  # what gets passed instead of a built model, and what the message must say
    "the class": (zoo.MobileNetV2, "is the class `MobileNetV2`, not a model; pass a built model, such as `MobileNetV2()`"),
    "the factory": (zoo.lenet, "is the function `lenet`, not a model; pass a built model, such as `lenet()`"),
    "a path": ("model.pth", "is the path `model.pth`, not a model"),
    "a state dict": ({"w": torch.ones(1)}, "must be a torch.nn.Module, not a dict"),
}


@pytest.mark.parametrize("what", list(NOT_MODELS))
@pytest.mark.parametrize("call", ["load", "save", "fold", "plan_fold", "compare", "recalibrate", "freeze", "unfreeze",
                                  "convert", "export_onnx"])
def test_library_calls_given_something_other_than_a_model_say_so(call, what, tmp_path):
    from bntool.errors import InputError

    value, message = NOT_MODELS[what]
    with pytest.raises(InputError) as caught:
        _library_calls(tmp_path)[call](value)
    parameter = "original" if call == "compare" else "model"
    assert str(caught.value).startswith(f"`{parameter}` ") and message in str(caught.value), str(caught.value)
    assert list(tmp_path.iterdir()) == []  # nothing written
