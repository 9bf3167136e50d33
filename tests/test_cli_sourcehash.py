"""The source's sha256 is computed on a thread while the command works, and the file records the right one."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import torch

import bntool
from bntool.cli import sourcehash
from bntool.io import checkpoint
from examples import models as zoo
from tests.conftest import randomize_bn

LENET = f"{Path(__file__).resolve().parents[1] / 'examples' / 'models.py'}:lenet"


def _checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "lenet.safetensors"
    bntool.save(randomize_bn(zoo.lenet(), seed=5), path)
    return path


def test_the_hash_runs_on_a_thread_and_is_the_files(cli, tmp_path, monkeypatch):
    path = _checkpoint(tmp_path)
    threads, real = [], checkpoint.sha256

    def recorded(p):
        threads.append(threading.current_thread())
        return real(p)

    monkeypatch.setattr(checkpoint, "sha256", recorded)
    out = tmp_path / "folded.safetensors"
    result = cli("fold", path, "--model", LENET, "--out", out, "--device", "cpu")
    assert result.code == 0, result.err
    assert [t.name for t in threads] == ["bntool-source-sha256"]  # hashed once, and not on the main thread
    assert checkpoint.read(out).metadata["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_dry_run_hashes_nothing(cli, tmp_path, monkeypatch):
    path = _checkpoint(tmp_path)
    monkeypatch.setattr(checkpoint, "sha256", lambda p: (_ for _ in ()).throw(AssertionError("hashed")))
    result = cli("freeze", path, "--model", LENET, "--dry-run", "--device", "cpu")
    assert result.code == 0, result.err


def test_a_failed_hash_on_the_thread_is_asked_again_at_the_write(tmp_path):
    class Loaded:
        calls = 0

        @property
        def sha256(self):
            Loaded.calls += 1
            raise FileNotFoundError("gone")

    class Source:
        loaded = Loaded()

    sourcehash.hash_meanwhile(Source()).join()  # the thread swallows it: the write asks again and reports it
    assert Loaded.calls == 1
