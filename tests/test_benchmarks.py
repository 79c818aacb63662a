"""The benchmark scripts a GPU lease depends on still run (a broken script would waste the lease). Tiny model on
the CPU: these check that the scripts work and report what they should, not speed."""

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow  # a benchmark script end to end (~30 s on 2 cores): not a unit test
def test_gpu_check_reports_every_mode_with_its_agreement(tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--preset", "tiny", "--device", "cpu", "--images", "16"]
    cmd += [
        "--shards",
        "2",
        "--batch-size",
        "4",
        "--cpus",
        "1",
        "--modes",
        "exact",
        "bf16",
        "--out",
        str(out),
    ]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith(("| exact", "| bf16"))]
    assert len(rows) == 2, run.stdout
    results = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    assert results["exact"]["rows"] == results["bf16"]["rows"] == 16 - results["exact"]["errors"]
    assert "agreement_overall" not in results["exact"]  # nothing to compare the exact path with
    assert 0.0 < results["bf16"]["agreement_overall"] <= 1.0
    assert len(results["bf16"]["agreement_per_scale"]) == 4  # tiny: 4 scales
    for r in results.values():
        assert r["encoder_only_images_per_s"] > 0 and r["end_to_end_images_per_s"] > 0


@pytest.mark.slow  # starts Ray, runs Ray Data
def test_bench_runs_every_pipeline_and_they_agree(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "benchmarks/bench.py", "--quick", "--preset", "tiny", "--batch-size", "4"]
    cmd += ["--cpus", "2", "--skip", "memory", "--out", str(out)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["output_check"]) == {
        "encoder_only",
        "naive",
        "vqpipe",
        "raydata",
        "raydata_fused",
        "raydata_tokenize",
    }
    for name, check in results["output_check"].items():
        assert check["same_keys"] and check["codes_equal"] == check["var_input_equal"] == check["rows"], name
    # --allocator same (the default): the script restarted itself so every pipeline shares vqpipe's allocator
    assert results["machine"]["env"]["MALLOC_MMAP_MAX_"] == "0"
    assert "vqpipe / Ray Data (CPU tasks)" in run.stdout


@pytest.mark.slow  # a benchmark script in a subprocess (imports torch and Ray)
def test_bench_refuses_a_ray_data_run_that_could_never_schedule():
    cmd = [sys.executable, "benchmarks/bench.py", "--quick", "--cpus", "1"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2 and "needs --cpus 2 or more" in run.stderr


@pytest.mark.slow  # runs a benchmark script in a subprocess (~30 s): not part of the fast unit layer
def test_views_bench_reports_crops_beside_center(tmp_path):
    out = tmp_path / "views.json"
    cmd = [
        sys.executable,
        "benchmarks/views_bench.py",
        "--preset",
        "tiny",
        "--images",
        "8",
        "--batch-size",
        "4",
    ]
    cmd += ["--views", "center", "crops5", "--repeat", "1", "--out", str(out)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    center, crops5 = json.loads(out.read_text())["results"]
    assert center["images"] == crops5["images"] > 0 and crops5["rows"] == 5 * center["rows"]
    assert "| crops5 | 5 |" in run.stdout and f"| {center['images']}/{center['images']} |" in run.stdout
    assert "| crops5, a decode per view |" in run.stdout
