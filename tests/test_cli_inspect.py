"""``bntool inspect`` end to end: weights-only files, --model, --json, --plot, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from bntool.cli import app, main
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


def run(*args: str):
    result = CliRunner().invoke(app, ["inspect", *map(str, args)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def run_json(*args: str) -> dict:
    return json.loads(run(*args, "--json").stdout)


def error_of(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(["inspect", *map(str, args)])
    return exc.value.code, capsys.readouterr().err


def test_weights_only_safetensors(files):
    report = run_json(files["lenet"])
    assert [r["name"] for r in report["layers"]] == ["1", "5", "10", "13"]
    assert {r["type"] for r in report["layers"]} == {"BatchNorm (from keys)"}
    found = {f["kind"]: f["layers"] for f in report["findings"]}
    assert found == {"statistics_never_updated": ["5"], "dead_channels": ["10"]}
    assert report["layers"][2]["dead_channels"] == [3, 7]
    assert report["dataflow"] == "none" and "--model" in report["note"] and report["weights_only"] is True


def test_weights_only_ddp_checkpoint(files):
    report = run_json(files["ddp"])
    assert report["key"] == "state_dict" and report["stripped_prefix"] == "module."
    assert [r["name"] for r in report["layers"]] == ["1", "5", "10", "13"]
    assert {f["kind"] for f in report["findings"]} == {"statistics_never_updated", "dead_channels"}


def test_clean_file_has_no_findings(files):
    report = run_json(files["clean"])
    assert report["findings"] == []
    assert "No problems found" in run(files["clean"]).stdout


def test_with_model_shows_dataflow_and_fold(files):
    report = run_json(files["ddp"], "--model", MODEL)
    rows = {r["name"]: r for r in report["layers"]}
    assert report["dataflow"] == "fx"
    assert rows["1"]["fed_by"] == "0" and rows["1"]["feeds"] == ["2"]
    assert rows["1"]["foldable"] is True and rows["1"]["fold_into"] == "0"
    assert rows["10"]["eps"] == 1e-5 and rows["10"]["momentum"] == 0.1
    dead = next(f for f in report["findings"] if f["kind"] == "dead_channels")
    assert "its eps" in dead["message"] and "assumed" not in dead["message"]


def test_no_batchnorm(tmp_path):
    torch.save({"fc.weight": torch.ones(2, 2)}, tmp_path / "plain.pth")
    assert "No BatchNorm layers (no keys ending in running_mean / running_var)." in run(tmp_path / "plain.pth").stdout


def test_human_output(files):
    out = run(files["ddp"], "--model", MODEL).stdout
    assert "4 BatchNorm layer(s)" in out
    assert "WARNING [statistics_never_updated]" in out and "what to do:" in out
    assert "yes, into 0" in out


def test_json_owns_stdout(files):
    result = run(files["lenet"], "--json")
    json.loads(result.stdout)  # nothing else on stdout


def test_plot_writes_png_and_nothing_else(files, tmp_path, capsys):
    before = set(tmp_path.iterdir())
    out = tmp_path / "stats.png"
    report = run_json(files["lenet"], "--plot", out)
    assert report["plot"] == str(out)
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert set(tmp_path.iterdir()) == before | {out}
    first = out.read_bytes()
    code, err = error_of(capsys, files["ddp"], "--model", MODEL, "--plot", out)  # an existing plot is kept...
    assert code == 2 and "already exists" in err and "--force" in err and out.read_bytes() == first
    run(files["ddp"], "--model", MODEL, "--plot", out, "--force")  # ...and replaced only with --force
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
def test_bad_input_exits_2_with_one_line(files, tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    code, err = error_of(capsys, *(a.format(lenet=files["lenet"]) for a in args))
    assert code == 2
    assert err.startswith("Error: ") and expected in err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.tmp*"))


def test_plot_without_matplotlib(files, tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code, err = error_of(capsys, files["lenet"], "--plot", tmp_path / "x.png")
    assert code == 2 and "bntool[plot]" in err
    assert not (tmp_path / "x.png").exists()
