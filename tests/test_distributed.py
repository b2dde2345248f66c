"""Two ranks under torchrun (gloo on CPU): the ranks end with identical weights, and the run matches
a single-process run of the same config within noise. Success is judged from result files, since
torch 2.13 + gloo can abort at interpreter exit after the work is done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, TINY

pytestmark = pytest.mark.multiprocess


def test_two_ranks_end_identical(tmp_path: Path) -> None:
    dump = tmp_path / "states"
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "FMTRANSFER_DEBUG_DUMP_STATE": str(dump)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fmtransfer", "run", str(TINY), "--out", str(tmp_path / "ddp"), "--set", f"cache_dir={tmp_path / 'c'}",
           "--set", "train.batch_size=32", "--set", "train.epochs=3"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert (tmp_path / "ddp" / "metrics.json").exists(), r.stderr[-3000:]
    a, b = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["world_size"] == 2
    # every step saw a global batch split across the two ranks: the same number of steps as one process
    single = subprocess.run([sys.executable, "-m", "fmtransfer", "run", str(TINY), "--out", str(tmp_path / "one"),
                             "--set", f"cache_dir={tmp_path / 'c'}", "--set", "train.batch_size=32",
                             "--set", "train.epochs=3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert one["steps"] == m["steps"]
    assert abs(one["test"]["accuracy"] - m["test"]["accuracy"]) < 0.1


def test_cache_command_shards_encoding_across_ranks(tmp_path: Path, tiny_bert: str) -> None:
    from fmtransfer.cache.text import TextEncoderCache
    from fmtransfer.config import load_config
    from fmtransfer.runner import build_task

    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    sets = ["--set", f"cache_dir={tmp_path / 'c'}", "--set",
            f"teachers.fm={{recipe: probe, encoder: {tiny_bert}, max_length: 16, cache_shard_rows: 100, "
            "proj_dim: 8, hidden: [8], train: {epochs: 1, batch_size: 32, steps_per_epoch: 2}}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fmtransfer", "cache", str(TINY), "--teacher", "fm", *sets]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "fm: probe" in r.stdout, r.stderr[-3000:]
    cfg = load_config(TINY, [s for s in sets if s != "--set"])
    task = build_task(cfg)
    cache = TextEncoderCache(task.texts["row"].texts, tiny_bert, tmp_path / "c", max_length=16, shard_rows=100)
    assert cache.store.is_complete() and cache.store.num_shards == 6
    ranks = {json.loads(p.read_text())["rank"] for p in (cache.store.dir / "shards").glob("*.json")}
    assert ranks == {0, 1}
    # the two ranks' shards equal a fresh single-process encoding within the fp16 tolerance
    from fmtransfer.models.hf_text import embed_texts, load_encoder

    tok, model = load_encoder(tiny_bert)
    fresh = embed_texts(task.texts["row"].texts, tok, model, max_length=16)
    torch.testing.assert_close(cache.get(), fresh, atol=2e-3, rtol=0)
