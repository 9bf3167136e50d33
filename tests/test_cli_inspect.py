"""``bntool inspect`` end to end: weights-only files, --model, --json, --plot, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from examples.models import lenet, randomize_bn_

MODEL = f"{Path(__file__).resolve().parent.parent / 'examples' / 'models.py'}:lenet"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def lenet_state(defects: bool = True) -> dict[str, torch.Tensor]:
    """LeNet with randomized BN state; with ``defects``: BN `5` never updated, BN `10` has dead channels 3 and 7."""
    model = randomize_bn_(lenet(), seed=3)
    if defects:
        model[5].reset_running_stats()
        with torch.no_grad():
            model[10].running_var[[3, 7]] = 0.0
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    state = lenet_state()
    save_file(state, str(tmp_path / "lenet.safetensors"))
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    save_file(lenet_state(defects=False), str(tmp_path / "clean.safetensors"))
    return {p.stem: p for p in tmp_path.iterdir()}


@pytest.fixture
def inspect(cli):
    """``bntool inspect ARGS`` through the ``cli`` runner, expected to exit 0."""
    def run(*args: str):
        result = cli("inspect", *args)
        assert result.code == 0, result.out + result.err
        return result

    return run


@pytest.fixture
def inspect_json(inspect):
    return lambda *args: json.loads(inspect(*args, "--json").out)


def test_weights_only_safetensors(files, inspect_json):
    report = inspect_json(files["lenet"])
    assert [r["name"] for r in report["layers"]] == ["1", "5", "10", "13"]
    assert {r["type"] for r in report["layers"]} == {"BatchNorm (from keys)"}
    found = {f["kind"]: f["layers"] for f in report["findings"]}
    assert found == {"statistics_never_updated": ["5"], "dead_channels": ["10"]}
    assert report["layers"][2]["dead_channels"] == [3, 7]
    assert report["dataflow"] == "none" and "--model" in report["note"] and report["weights_only"] is True


def test_weights_only_ddp_checkpoint(files, inspect_json):
    report = inspect_json(files["ddp"])
    assert report["key"] == "state_dict" and report["stripped_prefix"] == "module."
    assert [r["name"] for r in report["layers"]] == ["1", "5", "10", "13"]
    assert {f["kind"] for f in report["findings"]} == {"statistics_never_updated", "dead_channels"}


def test_clean_file_has_no_findings(files, inspect_json, inspect):
    report = inspect_json(files["clean"])
    assert report["findings"] == []
    assert "No problems found" in inspect(files["clean"]).out


def test_with_model_shows_dataflow_and_fold(files, inspect_json):
    report = inspect_json(files["ddp"], "--model", MODEL)
    rows = {r["name"]: r for r in report["layers"]}
    assert report["dataflow"] == "fx"
    assert rows["1"]["fed_by"] == "0" and rows["1"]["feeds"] == ["2"]
    assert rows["1"]["foldable"] is True and rows["1"]["fold_into"] == "0"
    assert rows["10"]["eps"] == 1e-5 and rows["10"]["momentum"] == 0.1
    dead = next(f for f in report["findings"] if f["kind"] == "dead_channels")
    assert "its eps" in dead["message"] and "assumed" not in dead["message"]


def test_no_batchnorm(tmp_path, inspect):
    torch.save({"fc.weight": torch.ones(2, 2)}, tmp_path / "plain.pth")
    assert "No BatchNorm layers (no keys ending in running_mean / running_var)." in inspect(tmp_path / "plain.pth").out


def test_human_output(files, inspect):
    out = inspect(files["ddp"], "--model", MODEL).out
    assert "4 BatchNorm layer(s)" in out
    assert "WARNING [statistics_never_updated]" in out and "what to do:" in out
    assert "yes, into 0" in out


def test_json_owns_stdout(files, inspect):
    # stdout is one JSON document and it is the report: what the Python API says of the same weights, every
    # statistic and finding; the human lines (the table, notes) are not on stdout
    from safetensors.torch import load_file

    import bntool
    from bntool.cli.flags import NAMED
    from bntool.errors import naming

    result = inspect(files["lenet"], "--json")
    shown = json.loads(result.out)  # nothing else on stdout: one document
    with naming(NAMED):  # (the report's notes name --model, as the command line does)
        expected = json.loads(json.dumps(bntool.inspect(load_file(str(files["lenet"]))).to_dict()))
    assert shown["command"] == "inspect" and shown["input"] == str(files["lenet"]) and shown["weights_only"] is True
    assert {key: shown[key] for key in expected} == expected
    assert [r["name"] for r in shown["layers"]] == ["1", "5", "10", "13"]
    assert {f["kind"] for f in shown["findings"]} == {"statistics_never_updated", "dead_channels"}
    assert "BatchNorm layer(s)" not in result.out and "Note:" not in result.out


def test_plot_writes_png_and_nothing_else(files, tmp_path, inspect_json, inspect, cli):
    before = set(tmp_path.iterdir())
    out = tmp_path / "stats.png"
    report = inspect_json(files["lenet"], "--plot", out)
    assert report["plot"] == str(out)
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert set(tmp_path.iterdir()) == before | {out}
    first = out.read_bytes()
    result = cli("inspect", files["ddp"], "--model", MODEL, "--plot", out)  # an existing plot is kept...
    code, err = result.code, result.err
    assert code == 2 and "already exists" in err and "--force" in err and out.read_bytes() == first
    inspect(files["ddp"], "--model", MODEL, "--plot", out, "--force")  # ...and replaced only with --force
    assert out.read_bytes()[:8] == PNG_MAGIC and out.read_bytes() != first
    assert set(tmp_path.iterdir()) == before | {out}


@pytest.mark.parametrize(
    "args, expected",
    [
        (["missing.pth"], "does not exist"),
        (["{lenet}", "--plot", "out.jpg"], "pass a .png"),
        (["{lenet}", "--plot", "nowhere/out.png"], "does not exist; create"),
        (["{lenet}", "--model", "nosuchmodule_xyz:net"], "--model"),
        (["{lenet}", "--model", MODEL, "--input-shape", "1,-3"], "is not a shape"),
        (["{lenet}", "--model", MODEL, "--input-shape", "1,3"], "inputs of shape 1x3"),
    ],
    ids=["missing-file", "plot-suffix", "plot-folder", "bad-model", "bad-shape", "wrong-shape"],
)
def test_bad_input_exits_2_with_one_line(files, tmp_path, monkeypatch, args, expected, cli):
    monkeypatch.chdir(tmp_path)
    result = cli("inspect", *(a.format(lenet=files["lenet"]) for a in args))
    code, err = result.code, result.err
    assert code == 2
    assert err.startswith("Error: ") and expected in err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.tmp*"))


def test_plot_without_matplotlib(files, tmp_path, monkeypatch, cli):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    result = cli("inspect", files["lenet"], "--plot", tmp_path / "x.png")
    code, err = result.code, result.err
    assert code == 2 and "bntool[plot]" in err
    assert not (tmp_path / "x.png").exists()
