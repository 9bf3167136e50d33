"""Writing outputs: no-replace moves, stale temporaries, write failures, kill -9 and Ctrl-C, ONNX external data."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

import bntool
from bntool.errors import InputError
from bntool.io import noreplace, outputs, temporaries
from examples import models as zoo
from tests.conftest import (
    assert_one_line_error,
    bntool_temporaries,
    folder_state,
    python_env,
    randomize_bn,
    run,
    start,
)

ROOT = Path(__file__).resolve().parents[1]
LENET = f"{ROOT / 'examples' / 'models.py'}:lenet"


@pytest.fixture
def checkpoint(lenet_checkpoint) -> Path:
    return lenet_checkpoint


# ----------------------------------------------------------------------------- no-replace moves


@pytest.mark.parametrize("mechanism", ["renameat2", "link", "check-then-rename"])
def test_the_final_move_never_replaces_a_file(tmp_path, monkeypatch, mechanism):
    """Each way bntool moves without replacing (and its fallbacks on file systems without them)."""
    if mechanism != "renameat2":
        monkeypatch.setattr(noreplace, "renameat2_noreplace", lambda *a: (_ for _ in ()).throw(NotImplementedError))
    if mechanism == "check-then-rename":
        def no_hard_links(src, dst, **kwargs):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_hard_links)
    tmp, dst = tmp_path / "new", tmp_path / "dst"
    tmp.write_bytes(b"new")
    dst.write_bytes(b"somebody else's")
    with pytest.raises(FileExistsError):
        noreplace.move_no_replace(tmp, dst)
    assert dst.read_bytes() == b"somebody else's" and tmp.read_bytes() == b"new"
    dst.unlink()
    noreplace.move_no_replace(tmp, dst)
    assert dst.read_bytes() == b"new" and not tmp.exists()


def test_save_does_not_replace_a_file_that_appears_while_it_writes(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(zoo.lenet(), seed=1)
    out = tmp_path / "out.safetensors"

    def another_writer(tmp: Path) -> None:  # runs after the checks, before the move
        out.write_bytes(b"the other result")

    with pytest.raises(InputError, match="appeared while bntool was working"):
        bntool.persist.write(model, out, recipe=[], check=another_writer)
    assert out.read_bytes() == b"the other result"
    assert bntool_temporaries(tmp_path) == []
    bntool.save(model, out, recipe=[], force=True)  # with force it is replaced, as asked
    assert bntool.load(out, zoo.lenet()) is not None


def test_outputs_get_the_usual_file_mode(cli, checkpoint, tmp_path):
    """safetensors creates its file 0600; the output gets what any new file gets here."""
    out = tmp_path / "f.safetensors"
    assert cli("fold", checkpoint, "--model", LENET, "--out", out).code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("command", ["fold", "freeze", "recalibrate", "export", "inspect"])
def test_a_long_legal_name_fits_the_temporary_names(cli, checkpoint, tmp_path, command):
    suffix = {"export": ".onnx", "inspect": ".png"}.get(command, ".safetensors")
    out = tmp_path / ("n" * (250 - len(suffix)) + suffix)
    torch.save(torch.randn(16, 1, 28, 28), tmp_path / "calib.pt")
    extra = {"recalibrate": ["--data", tmp_path / "calib.pt", "--batch-size", "8"]}.get(command, [])
    result = cli(command, checkpoint, "--model", LENET, *extra, "--plot" if command == "inspect" else "--out", out)
    assert result.code == 0, result.err
    assert out.exists() and bntool_temporaries(tmp_path) == []


# ----------------------------------------------------------------------------- stale temporaries


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporaries_of_dead_processes_are_removed_and_nothing_else(tmp_path):
    dead, tag = _dead_pid(), temporaries.HOST_TAG
    stale_file = tmp_path / f".bntool-{tag}-{dead}-0123abcd.tmp"
    stale_stage = tmp_path / f".bntool-{tag}-{dead}-89abcdef.tmpdir"
    stale_file.write_bytes(b"x")
    stale_stage.mkdir()
    (stale_stage / "model.safetensors").write_bytes(b"half written")
    (stale_stage / ".tmp7W36Kn").write_bytes(b"the writer's own temporary")
    keep = [
        f".bntool-{tag}-{os.getpid()}-0123abcd.tmp",  # this process: alive
        f".bntool-{tag}-{os.getppid()}-0123abcd.tmpdir",  # alive
        f".bntool-ffffff-{dead}-0123abcd.tmp" if tag != "ffffff" else f".bntool-000000-{dead}-0123abcd.tmp",  # another host
        f".bntool-{tag}-{dead}-0123abcd.tmp.safetensors",  # not bntool's exact pattern
        f".bntool-{tag}-{dead}.tmp", ".bntool-notes.txt", "x.tmp", ".tmp7W36Kn", "model.safetensors",
    ]
    for name in keep:
        (tmp_path / name).mkdir() if name.endswith("dir") else (tmp_path / name).write_bytes(b"keep")
    before = {k: v for k, v in folder_state(tmp_path).items() if k in keep}
    removed = temporaries.remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([stale_file.name, stale_stage.name])
    assert folder_state(tmp_path) == before


SLOW_WRITE = """
import os, time
import bntool.io.writing as writing
from examples.models import lenet

_write = writing.write_state


def _write_then_wait(path, *args, **kwargs):
    _write(path, *args, **kwargs)
    open(os.environ["BNTOOL_TEST_MARK"], "w").close()
    time.sleep(120)


writing.write_state = _write_then_wait


def net():
    return lenet()
"""


def _start_slow_fold(folder: Path, checkpoint: Path) -> tuple[subprocess.Popen, Path]:
    """``bntool fold`` in a process of its own that stops, written but not moved, until signalled."""
    (folder / "slow.py").write_text(SLOW_WRITE)
    mark = folder.parent / "written"
    process = start([sys.executable, "-m", "bntool", "fold", checkpoint, "--model", f"{folder / 'slow.py'}:net",
                     "--out", folder / "out.safetensors"], env=python_env(BNTOOL_TEST_MARK=str(mark)))
    deadline = time.monotonic() + 120
    while not mark.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the fold never reached its write"
        time.sleep(0.05)
    return process, mark


@pytest.mark.slow
def test_kill_9_mid_write_leaves_one_staging_folder_that_the_next_run_removes(cli, tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    checkpoint = folder / "ck.pt"
    torch.save(randomize_bn(zoo.lenet(), seed=2).state_dict(), checkpoint)
    process, _ = _start_slow_fold(folder, checkpoint)
    process.kill()
    process.communicate()
    left = bntool_temporaries(folder)
    assert len([n for n in left if n.startswith(".bntool-")]) == 1 and not (folder / "out.safetensors").exists()
    result = cli("fold", checkpoint, "--model", LENET, "--out", folder / "again.safetensors")
    assert result.code == 0, result.err
    assert bntool_temporaries(folder) == []
    assert sorted(p.name for p in folder.iterdir()) == ["again.safetensors", "ck.pt", "slow.py"]


@pytest.mark.slow
def test_ctrl_c_mid_write_is_one_line_exit_130_and_nothing_written(tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    checkpoint = folder / "ck.pt"
    torch.save(randomize_bn(zoo.lenet(), seed=2).state_dict(), checkpoint)
    process, _ = _start_slow_fold(folder, checkpoint)
    before = {k: v for k, v in folder_state(folder).items() if not k.startswith(".bntool-")}
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert [line for line in err.splitlines() if line.strip()] == ["Error: interrupted; nothing was written"]
    assert folder_state(folder) == before and bntool_temporaries(folder) == []


def test_ctrl_c_after_the_write_says_what_was_written(cli, checkpoint, tmp_path, monkeypatch):
    import bntool.cli.fold as fold_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "f.safetensors"
    monkeypatch.setattr(fold_cli, "_render", interrupted)
    result = cli("fold", checkpoint, "--model", LENET, "--out", out)
    assert result.code == 130 and result.err.strip() == f"Error: interrupted after writing `{out}`"


def test_ctrl_c_inside_a_write_removes_the_temporary(cli, checkpoint, tmp_path, monkeypatch):
    import bntool.io.writing as writing

    def interrupted(path, *args, **kwargs):
        path.write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(writing, "write_state", interrupted)
    before = folder_state(tmp_path)
    result = cli("fold", checkpoint, "--model", LENET, "--out", tmp_path / "f.safetensors")
    assert result.code == 130 and result.err.strip() == "Error: interrupted; nothing was written"
    assert folder_state(tmp_path) == before


# ----------------------------------------------------------------------------- real write failures


FILE_SIZE_LIMIT = """
import json, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
from bntool.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    results.append(code)
print(json.dumps(results))
"""


@pytest.mark.slow
def test_a_file_size_limit_is_one_line_per_writer_and_leaves_nothing(checkpoint, tmp_path):
    """RLIMIT_FSIZE makes the kernel fail real writes (EFBIG) in safetensors, torch.save, onnx and matplotlib."""
    runs = [
        ["fold", str(checkpoint), "--model", LENET, "--out", str(tmp_path / "a.safetensors")],
        ["fold", str(checkpoint), "--model", LENET, "--out", str(tmp_path / "a.pt")],
        ["export", str(checkpoint), "--model", LENET, "--out", str(tmp_path / "a.onnx")],
        ["inspect", str(checkpoint), "--model", LENET, "--plot", str(tmp_path / "a.png")],
    ]
    before = folder_state(tmp_path)
    result = run([sys.executable, "-c", FILE_SIZE_LIMIT, json.dumps(runs)], timeout=300)
    assert json.loads(result.stdout.splitlines()[-1]) == [2, 2, 2, 2], result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 4 and "Traceback" not in result.stderr
    assert all("EFBIG" in e and "nothing was written" in e for e in errors), errors
    assert folder_state(tmp_path) == before


def test_an_unwritable_folder_is_refused_before_the_model_is_built(cli, checkpoint, tmp_path, monkeypatch):
    (tmp_path / "net.py").write_text(
        "from pathlib import Path\nfrom examples.models import lenet\n\n\ndef net():\n"
        f"    Path({str(tmp_path / 'built')!r}).touch()\n    return lenet()\n")
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if temporaries.TEMP_PATTERN.fullmatch(os.path.basename(str(path))):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    result = cli("fold", checkpoint, "--model", f"{tmp_path / 'net.py'}:net", "--out", tmp_path / "f.safetensors")
    assert_one_line_error(result, "read-only", "EROFS")
    assert not (tmp_path / "built").exists()  # refused before any work


def test_write_errno_reads_every_writer_s_way_of_saying_it():
    from safetensors import SafetensorError

    assert outputs.write_errno(OSError(errno.ENOSPC, "No space left on device")) == errno.ENOSPC
    assert outputs.write_errno(SafetensorError("Error while serializing: I/O error: File too large (os error 27)")) \
        == errno.EFBIG
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    wrapped.__context__ = OSError(errno.ENOSPC, "No space left on device")
    assert outputs.write_errno(wrapped) == errno.ENOSPC
    assert outputs.write_errno(RuntimeError("the model is wrong")) is None


# ----------------------------------------------------------------------------- ONNX external data


@pytest.fixture(scope="module")
def exported_once(tmp_path_factory) -> Path:
    """A folder holding ``a.onnx`` with its weights in ``a.onnx.data`` (exported once; tests get copies)."""
    folder = tmp_path_factory.mktemp("exported")
    model = randomize_bn(zoo.lenet(), seed=3)
    bntool.export_onnx(model, folder / "a.onnx", example_inputs=(torch.randn(2, 1, 28, 28),), external_data=True,
                       device="cpu")
    return folder


@pytest.fixture
def exported(checkpoint, tmp_path, exported_once):
    """``a.onnx`` with its weights in ``a.onnx.data``, and ``b.onnx`` a copy that uses the same weights file."""
    for name in ("a.onnx", "a.onnx.data"):
        (tmp_path / name).write_bytes((exported_once / name).read_bytes())
    (tmp_path / "b.onnx").write_bytes((tmp_path / "a.onnx").read_bytes())
    return tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "a.onnx.data"


def _runs(path: Path) -> bool:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    session.run(None, {session.get_inputs()[0].name: torch.randn(2, 1, 28, 28).numpy()})
    return True


def test_export_force_keeps_weights_another_onnx_file_uses(cli, checkpoint, exported):
    a, b, data = exported
    before = data.read_bytes()
    result = cli("export", checkpoint, "--model", LENET, "--out", a, "--force")
    assert result.code == 0, result.err
    assert data.read_bytes() == before and _runs(b)  # b.onnx still works
    assert "`b.onnx` still use it" in result.out


def test_export_force_never_replaces_weights_another_onnx_file_uses(cli, checkpoint, exported):
    a, b, data = exported
    before = folder_state(a.parent)
    result = cli("export", checkpoint, "--model", LENET, "--out", a, "--force", "--external-data")
    assert_one_line_error(result, "also used by `b.onnx`", "--embed-weights")
    assert folder_state(a.parent) == before and _runs(b)


def test_export_force_never_deletes_a_file_the_replaced_onnx_names(cli, checkpoint, tmp_path):
    """A crafted .onnx naming the checkpoint (and any file) as its external data: nothing of it is removed."""
    model = randomize_bn(zoo.lenet(), seed=3)
    out = tmp_path / "c.onnx"
    bntool.export_onnx(model, out, example_inputs=(torch.randn(2, 1, 28, 28),), external_data=True, device="cpu")
    proto = onnx.load(str(out), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = checkpoint.name
    onnx.save(proto, str(out))
    (tmp_path / "c.onnx.data").unlink()
    before = checkpoint.read_bytes()
    result = cli("export", checkpoint, "--model", LENET, "--out", out, "--force")
    assert result.code == 0, result.err
    assert checkpoint.read_bytes() == before
    assert f"`{checkpoint.name}`" in result.out and "left as they are" in result.out


def test_export_force_removes_its_own_unreferenced_weights(cli, checkpoint, tmp_path):
    model = randomize_bn(zoo.lenet(), seed=3)
    out = tmp_path / "c.onnx"
    bntool.export_onnx(model, out, example_inputs=(torch.randn(2, 1, 28, 28),), external_data=True, device="cpu")
    result = cli("export", checkpoint, "--model", LENET, "--out", out, "--force")
    assert result.code == 0, result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.onnx", "ck.pt"] and _runs(out)


def test_an_onnx_output_that_appears_meanwhile_is_kept_with_its_weights(cli, checkpoint, tmp_path, monkeypatch):
    real = outputs.commit_all

    def other_writer_first(moves, **kwargs):
        (tmp_path / "c.onnx").write_bytes(b"other")
        return real(moves, **kwargs)

    monkeypatch.setattr(outputs, "commit_all", other_writer_first)
    result = cli("export", checkpoint, "--model", LENET, "--out", tmp_path / "c.onnx", "--external-data")
    assert_one_line_error(result, "appeared while bntool was working")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.onnx", "ck.pt"]  # its weights file was undone
    assert (tmp_path / "c.onnx").read_bytes() == b"other"


def test_stdin_like_inputs_are_refused_before_they_are_opened(tmp_path):
    from bntool.io.inputs import require_regular_file

    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(InputError, match="FIFO"):
        require_regular_file(tmp_path / "pipe", "the checkpoint")  # would block forever if it were opened
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling.pt")
    with pytest.raises(InputError, match="a link to nothing"):
        require_regular_file(tmp_path / "dangling.pt", "the checkpoint")


def test_a_name_the_file_system_refuses_while_writing_is_one_line(cli, checkpoint, tmp_path):
    """The .onnx name fits, its external-data name (NAME.onnx.data) does not: the OS's ENAMETOOLONG, mapped."""
    before = folder_state(tmp_path)
    result = cli("export", checkpoint, "--model", LENET, "--external-data", "--out", tmp_path / ("e" * 247 + ".onnx"))
    assert_one_line_error(result, "cannot write", "ENAMETOOLONG", "nothing was written")
    assert folder_state(tmp_path) == before


def test_a_module_spec_protects_the_module_file(cli, checkpoint, tmp_path, monkeypatch):
    """--model package.module:factory: the module's file is an input too, found without importing it."""
    (tmp_path / "mynets").mkdir()
    (tmp_path / "mynets" / "__init__.py").write_text("raise SystemExit('importing the package runs code')\n")
    (tmp_path / "mynets" / "lenets.py").write_text("from examples.models import lenet\n")
    monkeypatch.chdir(tmp_path)
    from bntool.cli.common import input_files

    assert (tmp_path / "mynets" / "lenets.py", "the --model file") in input_files(checkpoint, model="mynets.lenets:lenet")
    os.link(tmp_path / "mynets" / "lenets.py", tmp_path / "out.safetensors")
    result = cli("fold", checkpoint, "--model", "mynets.lenets:lenet", "--out", tmp_path / "out.safetensors", "--force")
    assert_one_line_error(result, "the --model file", "never modifies its inputs")
