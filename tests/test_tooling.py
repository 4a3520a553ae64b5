"""The scripts and entry points around the library: the GPU check, CTest, the kernels' public names."""

import inspect
import os
import shutil
import subprocess

import pytest
import torch

import nearl_kernels as nk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine gpu_check.sh runs the real check")
def test_gpu_check_refuses_to_run_without_a_gpu(tmp_path):
    out = tmp_path / "gpu"
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OUT=str(out)), timeout=120)
    assert done.returncode == 2 and "no CUDA GPU here" in done.stderr, done.stderr
    assert not out.exists()


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None, reason="cmake is not installed")
def test_ctest_has_one_test_per_test_file(tmp_path):
    subprocess.run(["cmake", "-S", ROOT, "-B", str(tmp_path)], check=True, capture_output=True)
    listing = subprocess.run(["ctest", "--test-dir", str(tmp_path), "-N"], check=True, capture_output=True,
                             text=True).stdout
    files = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "tests")) if f.startswith("test_") and f.endswith(".py"))
    for name in files:
        assert f": {name}\n" in listing, name
    # Plus the benchmarks' smoke pass, and the classifier's own refusal where CMake could build it.
    extra = 1 + (": nearl_classify_refuses_missing_package\n" in listing)
    assert f"Total Tests: {len(files) + extra}" in listing


def test_each_public_op_is_its_own_reference_with_fused_false():
    assert sorted(nk.__all__) == ["KernelBuildError", "SYNERGY_PARAM_NAMES", "TRITON_RANGE", "oca", "synergy_block"]
    for op in (nk.oca, nk.synergy_block):
        assert inspect.signature(op).parameters["fused"].default is True


def test_gpu_check_python_parts_run_at_smoke_shapes(tmp_path, monkeypatch):
    """What gpu_check.sh runs after the op benchmarks: the model rows, then the goals table (fed the
    committed CPU op benchmarks here; NEARL_GPU_CHECK_SMOKE=1 runs the whole script on a CPU)."""

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import bench_model
    import goals

    rows, table, goals_md = tmp_path / "model_rows.json", tmp_path / "model_rows.md", tmp_path / "goals.md"
    assert bench_model.main(["--size", "smoke", "--json", str(rows), "--md", str(table)]) == 0
    assert "its frozen floor" in table.read_text() and "plain CLIP zero-shot" in table.read_text()
    ops = os.path.join(ROOT, "benchmarks", "results", "cpu-2core.json")
    assert goals.main([ops, str(rows), "--md", str(goals_md)]) == 0
    text = goals_md.read_text()
    for goal in ("OCA image, full: eager / fused", "USEformer, full: torch.compile / fused",
                 "NEARL shared step / its frozen floor", "NEARL paired step / full fine-tune",
                 "NEARL shared inference / plain CLIP"):
        line = next(l for l in text.splitlines() if l.startswith(f"| {goal} |"))
        assert "not measured" not in line, line
    assert bench_model.main(["--size", "smoke", "--modes", "both"]) == 2
