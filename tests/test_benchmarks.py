"""The benchmarks' own logic, on the CPU: the recalibration benchmark is fair, the GPU check's plumbing works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from examples.models import randomize_bn_, resnet_small

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("allow_tf32", [False, True], ids=["tf32-off", "tf32-on"])
def test_every_contender_of_a_row_runs_at_the_rows_precision_and_the_oracle_at_tf32_off(allow_tf32, load_benchmark):
    # catches the unfair benchmark: a floor and an oracle under PyTorch's default TF32 while bntool turns it off
    from bntool.runtime.running import tf32_state

    bench = load_benchmark("bench_recalibrate")
    model = randomize_bn_(resnet_small(), seed=0)
    seen: list[dict] = []
    model.conv1.register_forward_pre_hook(lambda m, a: seen.append(tf32_state()))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 8, 8, generator=gen) * 1.5 + 0.3 for _ in range(2)]
    reference = bench.oracle(model, batches, torch.device("cpu"))
    assert seen and all(set(state.values()) == {"ieee"} for state in seen)
    seen.clear()
    row = bench.bench_row(model, batches, torch.device("cpu"), allow_tf32, 1, reference)
    expected = {"tf32" if allow_tf32 else "ieee"}
    assert len(seen) >= 2 + 3 * 3 and all(set(state.values()) == expected for state in seen)  # warm-up + 3 each
    assert row["ratio_wall"]["floor"] == 1.0 and row["unchanged_non_bn"]
    diffs = row["max_rel_diff_vs_float64_oracle"]
    assert diffs["bntool"] < 1e-5 < diffs["update_bn"]  # exact vs an average of batch variances


def test_gpu_check_runs_its_steps_and_writes_one_summary(tmp_path, load_benchmark):
    check = load_benchmark("gpu_check")
    code = check.main(["--out-dir", str(tmp_path), "--device", "cpu", "--steps", "env,bn-precision,fold"])
    assert code == 0
    summary = (tmp_path / "summary.txt").read_text()
    for fragment in ("env           passed", "bn-precision  passed", "fold          passed",
                     "fold + verification, resnet_small", "passed True on cpu"):
        assert fragment in summary, fragment
    data = json.loads((tmp_path / "summary.json").read_text())
    assert [step["status"] for step in data["steps"]] == ["passed"] * 3
    assert {row["backend"] for row in data["bn-precision"]["rows"]} == {"cpu"}
    with pytest.raises(SystemExit, match="unknown step"):
        check.main(["--out-dir", str(tmp_path), "--device", "cpu", "--steps", "env,warp"])


def test_gpu_check_summary_reads_pytest_results_and_a_cut_step(tmp_path, load_benchmark):
    check = load_benchmark("gpu_check")
    (tmp_path / "cuda-tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_cuda" name="test_a" time="2.5"/>'
        '<testcase classname="tests.test_cuda" name="test_b" time="0.5"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_cuda" name="test_c" time="0.0"><skipped/></testcase>'
        "</testsuite></testsuites>")
    log = tmp_path / "suite.log"
    log.write_text("....\n========== 40 passed, 2 skipped in 99.0s (Interrupted) ==========\n")
    results = [{"step": "cuda-tests", "status": "failed", "seconds": 3.0},
               {"step": "suite", "status": "timed out", "seconds": 120.0, "log": str(log)}]
    summary = check.summarize(results, tmp_path)
    assert "cuda-tests    failed" in summary and "1 passed, 1 failed, 0 errors, 1 skipped" in summary
    assert "not passed: tests.test_cuda::test_b" in summary and "2.5s tests.test_cuda::test_a" in summary
    assert "suite         timed out" in summary and "40 passed, 2 skipped in 99.0s" in summary
