"""Two torchrun "nodes" on this machine (two launcher processes, one worker each, c10d rendezvous on
127.0.0.1): the README's multi-node command, exercised. The student must equal, bit for bit, the one
a one-node 2-process run of the same config trains: the same two ranks, the same all-reduce."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, TINY

pytestmark = pytest.mark.multiprocess

TRAIN = ["--set", "train.batch_size=32", "--set", "train.epochs=3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(dump: Path) -> dict[str, str]:
    return {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "FMTRANSFER_DEBUG_DUMP_STATE": str(dump)}


def test_two_nodes_equal_one_node_with_two_processes(tmp_path: Path) -> None:
    run = ["-m", "fmtransfer", "run", str(TINY), "--set", f"cache_dir={tmp_path / 'c'}", *TRAIN]
    # the README's multi-node command, with HOST=127.0.0.1 and one process per node
    port = _free_port()
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "fmt-test",
            *run, "--out", str(tmp_path / "two-nodes")]
    nodes = [subprocess.Popen(node, cwd=REPO, env=_env(tmp_path / "nodes"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=300) for p in nodes]
    assert (tmp_path / "two-nodes" / "metrics.json").exists(), "\n".join(e[-2000:] for _, e in logs)

    one = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *run, "--out", str(tmp_path / "one-node")]
    r = subprocess.run(one, cwd=REPO, env=_env(tmp_path / "procs"), capture_output=True, text=True, timeout=300)
    assert (tmp_path / "one-node" / "metrics.json").exists(), r.stderr[-3000:]

    for rank in (0, 1):
        a = load_file(str(tmp_path / "nodes" / f"rank{rank}.safetensors"))
        b = load_file(str(tmp_path / "procs" / f"rank{rank}.safetensors"))
        assert a.keys() == b.keys() and len(a) > 0
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    m2 = json.loads((tmp_path / "two-nodes" / "metrics.json").read_text())
    m1 = json.loads((tmp_path / "one-node" / "metrics.json").read_text())
    assert m2["world_size"] == m1["world_size"] == 2
    assert m2["steps"] == m1["steps"] and m2["test"] == m1["test"]
