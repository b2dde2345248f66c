"""Nothing corrupt is used silently: receipts on checkpoints, run files, teacher artifacts and exports;
a kill inside a checkpoint write; two processes racing on a cold cache; a dead torchrun peer."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fmtransfer.cli import main
from fmtransfer.config import load_config
from fmtransfer.runner import build_task, cache_teachers, run_experiment
from fmtransfer.teachers.base import prepare_teacher
from tests.conftest import REPO, TINY


def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fmtransfer", *args], cwd=REPO, env=e, capture_output=True,
                          text=True, timeout=300)


def _flip(path: Path, where: float = 0.5) -> None:
    """Flip one byte inside the file (at `where` of its length)."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    path.write_bytes(bytes(data))


def test_flipped_byte_in_a_checkpoint_is_refused_on_resume(tmp_path: Path) -> None:
    common = [str(TINY), "--set", f"cache_dir={tmp_path / 'cache'}", "--out", str(tmp_path / "run")]
    cache_teachers(load_config(TINY, [f"cache_dir={tmp_path / 'cache'}"]))  # so the kill hits the student's loop
    killed = _cli(["run", *common], {"FMTRANSFER_DEBUG_EXIT_AFTER_EPOCH": "2"})
    assert killed.returncode == 17
    _flip(tmp_path / "run" / "checkpoint.pt")  # torch's zip reader alone would load this without a word
    r = _cli(["run", *common, "--resume"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "checkpoint.pt is corrupt or altered (its CRC32 does not match its receipt" in r.stderr
    assert "delete it to restart the run from scratch" in r.stderr


def test_kill_inside_a_checkpoint_write_resumes_bitwise(tmp_path: Path) -> None:
    common = [str(TINY), "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "student.dropout=0.2"]
    ref = _cli(["run", *common, "--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    # dies in epoch 3's checkpoint write: new bytes written, receipt lists old + new, rename not done
    killed = _cli(["run", *common, "--out", str(run)], {"FMTRANSFER_DEBUG_KILL_IN_WRITE": "checkpoint.pt@3"})
    assert killed.returncode == 17
    leftovers = list(run.glob(".checkpoint.pt.*"))
    assert len(leftovers) == 1
    resumed = _cli(["run", *common, "--out", str(run), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "removed 1 temp file(s) left by an interrupted write" in resumed.stdout
    assert not list(run.glob(".checkpoint.pt.*")) and not list(run.glob(".*.tmp"))
    a, b = load_file(str(tmp_path / "ref" / "student.safetensors")), load_file(str(run / "student.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise: the resume continued from epoch 2's intact checkpoint
    mode = stat.S_IMODE((run / "metrics.json").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not 0600


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("finished")
    run_experiment(load_config(TINY, [f"cache_dir={d / 'cache'}"]), d / "run", quiet=True)
    return d / "run"


def _copy(run: Path, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, dest))


@pytest.mark.parametrize(("damage", "message"), [
    ("truncate", "metrics.json is corrupt (it holds"),
    ("list", "metrics.json is corrupt (it holds a list, not a mapping)"),
])
def test_damaged_metrics_are_refused_by_resume_and_report(damage: str, message: str, finished: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(finished, tmp_path / "run")
    m = run / "metrics.json"
    if damage == "truncate":
        m.write_bytes(m.read_bytes()[:50])
    else:  # [1, 2] with a matching receipt: caught by the shape check, not only the receipt
        from fmtransfer.integrity import record

        m.write_text("[1, 2]")
        record(run, ["metrics.json"])
        message = "metrics.json is corrupt (it holds a list, not a mapping)"
    capsys.readouterr()
    assert main(["run", str(TINY), "--out", str(run), "--resume", "--set", f"cache_dir={tmp_path / 'c'}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "delete it and run again with --resume" in err and err.count("\n") == 1, err
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    # the fix named works: without metrics.json, --resume finishes the run from its last checkpoint
    m.unlink()
    cache = f"cache_dir={finished.parent / 'cache'}"
    assert main(["run", str(TINY), "--out", str(run), "--resume", "--set", cache]) == 0
    assert json.loads(m.read_text())["test"] == json.loads((finished / "metrics.json").read_text())["test"]


def test_export_refuses_an_emptied_config_and_damaged_weights(finished: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(finished, tmp_path / "run")
    (run / "config.yaml").write_text("")
    assert main(["export", str(run), "--out", str(tmp_path / "e1")]) == 2
    assert "config.yaml is corrupt or altered (it holds 0 bytes" in capsys.readouterr().err
    (run / "receipts.json").unlink()  # a run from before receipts: the empty file is still named
    assert main(["export", str(run), "--out", str(tmp_path / "e2")]) == 2
    assert "config.yaml is empty" in capsys.readouterr().err
    run = _copy(finished, tmp_path / "run2")
    _flip(run / "student.safetensors", 0.9)
    assert main(["export", str(run), "--out", str(tmp_path / "e3")]) == 2
    err = capsys.readouterr().err
    assert "student.safetensors is corrupt or altered" in err and err.count("\n") == 1
    # a good export (a killed export's temp folder beside it is removed), then its manifest edited by hand
    (tmp_path / ".ok.tmp999").mkdir()
    assert main(["export", str(finished), "--out", str(tmp_path / "ok")]) == 0
    assert not (tmp_path / ".ok.tmp999").exists()
    from fmtransfer.serving.loader import load_predictor
    from fmtransfer.serving.manifest import ExportError

    man = tmp_path / "ok" / "manifest.json"
    man.write_text(man.read_text().replace('"clip": null', '"clip": [0, 1]'))
    with pytest.raises(ExportError, match="manifest.json is corrupt or altered"):
        load_predictor(tmp_path / "ok")


@pytest.mark.parametrize("damage", ["outputs-finite", "meta-metrics", "weights-truncated", "reps-flip"])
def test_damaged_teacher_artifact_is_noted_and_rebuilt(damage: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(TINY, [f"cache_dir={tmp_path}"])
    task = build_task(cfg)
    first = prepare_teacher("wide", cfg.teachers["wide"], task, tmp_path, seed=0)
    assert (first.path / "receipts.json").exists()
    if damage == "outputs-finite":  # altered but finite values: the old checks (shape, finite) pass them
        out = np.load(first.path / "outputs.npy")
        out[0] += 1.0
        np.save(first.path / "outputs.npy", out)
    elif damage == "meta-metrics":  # edited teacher metrics would flow into gap recovered
        meta = json.loads((first.path / "meta.json").read_text())
        meta["metrics"]["test"]["accuracy"] = 0.99
        (first.path / "meta.json").write_text(json.dumps(meta))
    elif damage == "weights-truncated":
        w = first.path / "weights.safetensors"
        w.write_bytes(w.read_bytes()[:-8])
    else:
        _flip(first.path / "reps.npy", 0.7)
    capsys.readouterr()
    again = prepare_teacher("wide", cfg.teachers["wide"], task, tmp_path, seed=0)
    note = capsys.readouterr().out
    assert not again.from_cache and "is unusable" in note and "preparing it again" in note, note
    assert note.count("\n") == 1
    torch.testing.assert_close(again.outputs, first.outputs, atol=1e-5, rtol=0)
    assert again.metrics == first.metrics
    assert prepare_teacher("wide", cfg.teachers["wide"], task, tmp_path, seed=0).from_cache  # and valid again


def test_artifact_without_receipts_is_accepted_then_receipted(tmp_path: Path) -> None:
    cfg = load_config(TINY, [f"cache_dir={tmp_path}"])
    task = build_task(cfg)
    first = prepare_teacher("wide", cfg.teachers["wide"], task, tmp_path, seed=0)
    (first.path / "receipts.json").unlink()  # prepared before receipts existed: still valid (same fingerprint)
    second = prepare_teacher("wide", cfg.teachers["wide"], task, tmp_path, seed=0)
    assert second.from_cache and second.fingerprint == first.fingerprint
    assert (first.path / "receipts.json").exists()


def test_two_processes_racing_on_a_cold_cache_build_the_teacher_once(tmp_path: Path) -> None:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "fmtransfer", "cache", str(TINY), "--set", f"cache_dir={tmp_path}",
            "--set", "teachers.wide.train.epochs=40"]  # about 2 s of preparation: the two overlap
    procs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    text = "".join(o for o, _ in outs)
    assert text.count("prepared in") == 1 and text.count("cached already") == 1, text
    assert len([p for p in (tmp_path / "teachers").iterdir() if not p.name.startswith(".")]) == 1  # one artifact


FEATURE_RACE = """
import sys, time
import numpy as np
from fmtransfer.cache.store import FeatureStore, FieldSpec
store = FeatureStore(sys.argv[1], "entry", {"x": FieldSpec((3,), "float32")}, rows=60, shard_rows=10)
def produce(s, e):
    time.sleep(0.2)
    return {"x": np.arange(s * 3, e * 3, dtype=np.float32).reshape(-1, 3)}
print("computed", store.build(produce))
assert store.is_complete() and store.load("x")[59, 2] == 179
"""


def test_two_processes_racing_on_a_feature_store_entry_compute_it_once(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", FEATURE_RACE, str(tmp_path)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    computed = sorted(int(o.split("computed ")[1].split()[0]) for o, _ in outs)
    assert computed == [0, 60], outs  # one built all 6 shards; the other waited, then found them written


@pytest.mark.multiprocess
def test_a_dead_torchrun_peer_is_one_line_not_a_gloo_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "FMTRANSFER_DEBUG_EXIT_AFTER_EPOCH": "2",
           "FMTRANSFER_DEBUG_EXIT_RANK": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--monitor-interval", "5",  # let rank 0 meet the dead peer before torchrun stops it
           "-m", "fmtransfer", "run", str(TINY), "--out", str(tmp_path / "ddp"), "--set", f"cache_dir={tmp_path / 'c'}",
           "--set", "train.epochs=6"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "fmtransfer: error: rank 0: another process of this torchrun job stopped" in r.stderr, r.stderr[-3000:]
    # torchrun's own launcher reports the failed ranks (its ChildFailedError); no frame of fmtransfer's code
    assert "fmtransfer/train" not in r.stderr and "fmtransfer/cli.py" not in r.stderr, r.stderr[-3000:]


def test_serve_bench_names_a_damaged_fm_weight_file(tiny_bert: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(TINY, [f"cache_dir={tmp_path / 'cache'}", f"teachers.fm={{recipe: hybrid, encoder: {tiny_bert}}}",
                             "teachers.fm.features={name: mlp, hidden: [8]}", "teachers.fm.proj_dim=8",
                             "teachers.fm.hidden=[16]", "teachers.fm.max_length=16",
                             "teachers.fm.train={epochs: 1, batch_size: 32, steps_per_epoch: 2}", "method.teacher=fm"])
    run_experiment(cfg, tmp_path / "run", quiet=True)
    art = next(p for p in (tmp_path / "cache" / "teachers").iterdir() if p.name.startswith("fm-"))
    w = art / "weights.safetensors"
    w.write_bytes(b"\xff" * 8 + w.read_bytes()[8:])  # a damaged header (the length prefix)
    args = ["serve-bench", str(tmp_path / "run"), "--requests", "2", "--fm-requests", "2", "--batch-size", "8",
            "--batches", "1", "--fm-batches", "1"]
    capsys.readouterr()
    assert main(args) == 0  # the student is measured; the damaged FM path is named, not benchmarked
    out = capsys.readouterr()
    assert f"FM path not measured: teacher 'fm': artifact {art} is corrupt (weights.safetensors:" in out.out
    assert "Traceback" not in out.err
    (art / "receipts.json").unlink()  # without its receipt: safetensors' own header error, still one line
    assert main(args) == 0
    out = capsys.readouterr()
    assert "FM path not measured: teacher 'fm':" in out.out and "weights.safetensors does not load" in out.out
    assert "Traceback" not in out.err


def test_a_damaged_receipts_file_is_named_not_dropped(finished: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(finished, tmp_path / "run")
    (run / "metrics.json").unlink()  # an unfinished run whose receipts.json got damaged
    (run / "receipts.json").write_text("{not json")
    cache = f"cache_dir={finished.parent / 'cache'}"
    assert main(["run", str(TINY), "--out", str(run), "--resume", "--set", cache]) == 2
    err = capsys.readouterr().err
    assert "receipts.json is unreadable; delete it to accept the files beside it" in err and err.count("\n") == 1
