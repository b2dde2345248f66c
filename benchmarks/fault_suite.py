"""Fault injection and fuzzing at scale (issue 16): every case must end detected (a one-line note and a
rebuild), refused (one line, exit 2) or as a sensible run; never silent, never a traceback.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fault_suite.py --out runs/fault-suite   # ~10 min, 2 cores

1. issue rows: each case listed in issue 16's "Why", re-run through the real CLI (subprocesses);
2. config fuzz: seeded odd values in 1-3 options of every shipped config, through `validate`, and
   on the tiny config also through `run` (in-process `fmtransfer.cli.main`, stderr captured);
3. corruptions: random byte flips, truncations, appended and zeroed bytes in each artifact kind,
   each read back by the code that trusts it;
4. bad tables: generated CSVs with one defect each, built as a `table` task;
5. kill points: a real process death after an epoch or inside a write, then `--resume`: bitwise the
   uninterrupted run's student.
Writes OUT/fault-suite.md and OUT/fault-suite.json (every case, its outcome and its message).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tests.fuzz_configs import fuzz_cases  # noqa: E402

from fmtransfer.cli import main  # noqa: E402
from fmtransfer.errors import FmtError  # noqa: E402

TINY = REPO / "tests" / "configs" / "tiny.yaml"
ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fmtransfer", *args], cwd=REPO, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=600)


PROGRESS = re.compile(r"^\S.* epoch \d+/\d+: ")
"""The loop's one line per epoch on stderr (progress, not an error)."""


def judge(rc: int, out: str, err: str) -> str:
    """ok (exit 0, no traceback), refused (exit 2, <= 2 stderr lines besides the per-epoch progress lines),
    else FAIL."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not PROGRESS.match(ln)]
    if "Traceback" in err:
        return "FAIL: traceback"
    if rc == 0:
        return "ok"
    if rc == 2 and len(lines) <= 2:
        return "refused"
    return f"FAIL: exit {rc}, {len(lines)} stderr lines"


def in_process(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(args)
        except SystemExit as e:  # argparse
            rc = int(e.code or 0)
    return rc, out.getvalue(), err.getvalue()


def flip(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    k = rng.randrange(len(data))
    data[k] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return f"flip byte {k}"


def damage(path: Path, rng: random.Random) -> str:
    """One random damage that really changes the bytes (zeroing bytes that are zero already is no damage)."""
    before = path.read_bytes()
    how = _damage(path, rng)
    return how if path.read_bytes() != before else f"{how} (no change), then {flip(path, rng)}"


def _damage(path: Path, rng: random.Random) -> str:
    kind = rng.choice(["flip", "flip", "truncate", "append", "zero", "empty"])
    data = path.read_bytes()
    if kind == "flip":
        return flip(path, rng)
    if kind == "truncate":
        n = rng.randrange(len(data))
        path.write_bytes(data[:n])
        return f"truncate to {n}"
    if kind == "append":
        path.write_bytes(data + b"\0" * rng.randint(1, 64))
        return "append"
    if kind == "zero":
        s = rng.randrange(len(data))
        e = min(len(data), s + rng.randint(1, 256))
        path.write_bytes(data[:s] + b"\0" * (e - s) + data[e:])
        return f"zero {s}:{e}"
    path.write_bytes(b"")
    return "empty"


# ------------------------------------------------------------------------------------------ 1. issue


def issue_rows(work: Path) -> list[dict[str, Any]]:
    rows = []
    cache = f"cache_dir={work / 'cache'}"

    def case(name: str, fn: Callable[[], tuple[str, str]]) -> None:
        t0 = time.perf_counter()
        outcome, msg = fn()
        rows.append({"case": name, "outcome": outcome, "message": msg.strip().splitlines()[-1][:220] if msg.strip()
                     else "", "seconds": round(time.perf_counter() - t0, 1)})
        print(f"  {name}: {outcome}", flush=True)

    def run(*sets: str, out: str, resume: bool = False, env: dict[str, str] | None = None) -> tuple[str, str]:
        args = ["run", str(TINY), "--out", str(work / out), "--set", cache, *[a for s in sets for a in ("--set", s)]]
        r = cli(*args, *(["--resume"] if resume else []), env=env)
        return judge(r.returncode, r.stdout, r.stderr), r.stderr or r.stdout

    assert cli("run", str(TINY), "--out", str(work / "good"), "--set", cache).returncode == 0
    good = work / "good"
    for s in ["train.lr=1e9", "train.lr=.nan", "train.lr=.inf", "train.weight_decay=-1", "train.weight_decay=.nan",
              "train.grad_clip=.nan", "train.eval_batch_size=0", "train.device=cuda", "train.device=tpu",
              "task.labels=.nan", "method.kd_weight=.nan", "teachers.wide.train_splits=[]",
              "student.hidden=[-4]", "student.dropout=1.5", "train.grad_clip=-1", "teachers.wide=null",
              "method.temperature=1e-300"]:
        case(f"run --set {s}", lambda s=s: run(s, out=f"o-{abs(hash(s))}"))

    def ckpt_flip() -> tuple[str, str]:
        d = work / "flip"
        cli("run", str(TINY), "--out", str(d), "--set", cache, env={"FMTRANSFER_DEBUG_EXIT_AFTER_EPOCH": "2"})
        flip(d / "checkpoint.pt", random.Random(0))
        return run(out="flip", resume=True)

    case("byte flipped inside checkpoint.pt, --resume", ckpt_flip)

    def metrics(content: bytes | None, cmd: str) -> tuple[str, str]:
        d = work / f"m-{cmd}-{len(content or b'')}"
        shutil.copytree(good, d)
        p = d / "metrics.json"
        p.write_bytes(p.read_bytes()[:40] if content is None else content)
        r = cli("report", str(d)) if cmd == "report" else cli("run", str(TINY), "--out", str(d), "--set", cache,
                                                               "--resume")
        return judge(r.returncode, r.stdout, r.stderr), r.stderr or r.stdout

    case("truncated metrics.json, run --resume", lambda: metrics(None, "resume"))
    case("truncated metrics.json, report", lambda: metrics(None, "report"))
    case("metrics.json holding [1,2], run --resume", lambda: metrics(b"[1, 2]", "resume"))

    def empty_config() -> tuple[str, str]:
        d = work / "empty-config"
        shutil.copytree(good, d)
        (d / "config.yaml").write_text("")
        r = cli("export", str(d), "--out", str(work / "never"))
        return judge(r.returncode, r.stdout, r.stderr), r.stderr

    case("empty config.yaml, export", empty_config)

    def teacher(kind: str) -> tuple[str, str]:
        from fmtransfer.config import load_config
        from fmtransfer.runner import build_task
        from fmtransfer.teachers.base import prepare_teacher

        cdir = work / f"t-{kind}"
        cfg = load_config(TINY, [f"cache_dir={cdir}"])
        task = build_task(cfg)
        t = prepare_teacher("wide", cfg.teachers["wide"], task, cdir, seed=0)
        if kind == "outputs":
            o = np.load(t.path / "outputs.npy")
            o[0] += 1
            np.save(t.path / "outputs.npy", o)
        elif kind == "meta":
            m = json.loads((t.path / "meta.json").read_text())
            m["metrics"]["test"]["accuracy"] = 0.99
            (t.path / "meta.json").write_text(json.dumps(m))
        elif kind == "truncated":
            w = t.path / "weights.safetensors"
            w.write_bytes(w.read_bytes()[:-16])
        else:
            flip(t.path / "weights.safetensors", random.Random(1))
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            again = prepare_teacher("wide", cfg.teachers["wide"], task, cdir, seed=0)
        same = torch.allclose(again.outputs, t.outputs, atol=1e-5) and again.metrics == t.metrics
        ok = not again.from_cache and "preparing it again" in buf.getvalue() and same
        return ("rebuilt with a note" if ok else "FAIL: silent"), buf.getvalue()

    case("teacher outputs.npy altered (finite)", lambda: teacher("outputs"))
    case("teacher meta.json metrics edited", lambda: teacher("meta"))
    case("teacher weights.safetensors truncated", lambda: teacher("truncated"))
    case("teacher weights.safetensors byte-flipped", lambda: teacher("flipped"))

    def table(kind: str) -> tuple[str, str]:
        p = work / f"table-{kind}.csv"
        lines = ["y,num,txt"] + [f"{'inf' if kind == 'label' and i == 3 else i % 2},"
                                 f"{'inf' if kind == 'numeric' and i == 3 else i},w{i % 3}" for i in range(40)]
        if kind == "single":
            lines = ["y,num,txt"] + [f"a,{i},w" for i in range(40)]
        if kind == "empty-text":
            lines = ["y,num,txt"] + [f"{i % 2},{i}," for i in range(40)]
        p.write_text("\n".join(lines) + "\n")
        kind_ = "regression" if kind == "label" else "classification"
        r = cli("run", str(TINY), "--out", str(work / f"tab-{kind}"), "--set", cache, "--set",
                f"task={{name: table, path: {p}, label: y, kind: {kind_}, numeric: [num], text: [txt]}}",
                "--set", "student={name: mlp, hidden: [8]}", "--set", "teachers.wide.model={name: mlp, hidden: [8]}")
        outcome = judge(r.returncode, r.stdout, r.stderr)
        if outcome == "ok" and "warning" in r.stderr:
            outcome = "ok + warning"
        return outcome, r.stderr or r.stdout

    for kind in ("numeric", "label", "single", "empty-text"):
        case(f"table: {kind}", lambda kind=kind: table(kind))
    dup = work / "dup.yaml"
    dup.write_text(TINY.read_text() + "seed: 5\n")
    case("duplicate YAML key", lambda: (lambda r: (judge(r.returncode, r.stdout, r.stderr), r.stderr))(
        cli("validate", str(dup))))

    def kill_in_write() -> tuple[str, str]:
        d = work / "kill-write"
        env = {"FMTRANSFER_DEBUG_KILL_IN_WRITE": "checkpoint.pt@2"}
        cli("run", str(TINY), "--out", str(d), "--set", cache, env=env)
        left = len(list(d.glob(".checkpoint.pt.*")))
        outcome, msg = run(out="kill-write", resume=True)
        gone = not list(d.glob(".checkpoint.pt.*"))
        return (outcome if left == 1 and gone else f"FAIL: temp files {left} -> {int(not gone)}"), msg

    case("kill during a checkpoint write, then --resume", kill_in_write)
    return rows


# ------------------------------------------------------------------------------------------- 2. fuzz


def fuzz(work: Path, n_validate: int, n_run: int, seed: int) -> dict[str, Any]:
    tally: dict[str, int] = {}
    fails = []
    for path, sets in fuzz_cases(n_validate, seed):
        rc, out, err = in_process(["validate", str(path), *[a for s in sets for a in ("--set", s)]])
        v = judge(rc, out, err)
        tally[f"validate {v}"] = tally.get(f"validate {v}", 0) + 1
        if v.startswith("FAIL"):
            fails.append({"config": path.name, "set": sets, "outcome": v, "stderr": err[-300:]})
    runs = fuzz_cases(n_run, seed + 1, configs=[TINY], plausible=0.6)  # cheap enough to train; half plausible
    for i, (path, sets) in enumerate(runs):
        args = ["run", str(path), "--out", str(work / f"fz{i}"), "--set", f"cache_dir={work / 'fz-cache'}",
                "--set", "train.num_threads=1", *[a for s in sets for a in ("--set", s)]]
        rc, out, err = in_process(args)
        v = judge(rc, out, err)
        tally[f"run {v}"] = tally.get(f"run {v}", 0) + 1
        if v.startswith("FAIL"):
            fails.append({"config": path.name, "set": sets, "outcome": v, "stderr": err[-300:]})
    return {"tally": tally, "fails": fails, "validate_cases": n_validate, "run_cases": len(runs)}


# ------------------------------------------------------------------------------------- 3. corruptions


def corruptions(work: Path, per_kind: int, seed: int) -> dict[str, Any]:
    from fmtransfer.cache.store import FeatureStore, FieldSpec
    from fmtransfer.config import load_config
    from fmtransfer.export import export_run, open_finished_run
    from fmtransfer.runfiles import read_metrics
    from fmtransfer.runner import build_task, run_experiment
    from fmtransfer.serving.loader import load_predictor
    from fmtransfer.teachers.base import _load_artifact, prepare_teacher
    from fmtransfer.train.checkpoint import load_checkpoint

    rng = random.Random(seed)
    cdir = work / "c-cache"
    cfg = load_config(TINY, [f"cache_dir={cdir}"])
    good = work / "c-run"
    run_experiment(cfg, good, quiet=True)
    task = build_task(cfg)
    teacher = prepare_teacher("wide", cfg.teachers["wide"], task, cdir, seed=0)
    export = work / "c-export"
    export_run(good, export)
    store = FeatureStore(work / "c-store", "e", {"x": FieldSpec((4,))}, rows=50, shard_rows=20)
    store.build(lambda s, e: {"x": np.ones((e - s, 4), np.float32) * s})
    config_hash = torch.load(good / "checkpoint.pt", weights_only=True)["config_hash"]

    def refused(fn: Callable[[], Any]) -> str:
        try:
            fn()
        except FmtError as e:
            return "refused" if "\n" not in str(e) else "FAIL: multi-line"
        except Exception as e:
            return f"FAIL: {type(e).__name__}"
        return "FAIL: silent"

    def copy(src: Path, name: str) -> Path:
        d = work / "c" / name
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(src, d)
        return d

    kinds: dict[str, Callable[[int], tuple[str, str]]] = {}

    def run_file(fname: str, reader: Callable[[Path], Any]) -> Callable[[int], tuple[str, str]]:
        def one(k: int) -> tuple[str, str]:
            d = copy(good, f"run-{fname}-{k}")
            how = damage(d / fname, rng)
            return refused(lambda: reader(d)), how
        return one

    kinds["checkpoint.pt (--resume)"] = run_file("checkpoint.pt", lambda d: load_checkpoint(d / "checkpoint.pt",
                                                                                           config_hash))
    kinds["metrics.json (--resume, report)"] = run_file("metrics.json", lambda d: read_metrics(d / "metrics.json", ""))
    kinds["config.yaml (export)"] = run_file("config.yaml", open_finished_run)
    kinds["student.safetensors (export)"] = run_file("student.safetensors", open_finished_run)

    def teacher_file(fname: str) -> Callable[[int], tuple[str, str]]:
        def one(k: int) -> tuple[str, str]:
            d = copy(teacher.path, f"t-{fname}-{k}")
            how = damage(d / fname, rng)
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                art = _load_artifact(d, teacher.fingerprint, task)
            ok = art is None and "preparing it again" in buf.getvalue()
            return ("rebuilt with a note" if ok else "FAIL: silent"), how
        return one

    for f in ("outputs.npy", "reps.npy", "weights.safetensors", "meta.json"):
        kinds[f"teacher {f}"] = teacher_file(f)

    def export_file(fname: str) -> Callable[[int], tuple[str, str]]:
        def one(k: int) -> tuple[str, str]:
            d = copy(export, f"e-{fname}-{k}")
            how = damage(d / fname, rng)
            return refused(lambda: load_predictor(d)), how
        return one

    kinds["export manifest.json"] = export_file("manifest.json")
    kinds["export student.safetensors"] = export_file("student.safetensors")

    def shard(k: int) -> tuple[str, str]:
        d = copy(work / "c-store", f"s-{k}")
        how = damage(d / "e" / f"x.{rng.randrange(3):05d}.npy", rng)
        s = FeatureStore(d, "e", {"x": FieldSpec((4,))}, rows=50, shard_rows=20)
        return ("rebuilt with a note" if not s.is_complete() and s.missing_shards() else "FAIL: silent"), how

    kinds["feature-store shard"] = shard
    out = {}
    for name, fn in kinds.items():
        results = [fn(k) for k in range(per_kind)]
        out[name] = {"tried": len(results), "passed": sum(not r.startswith("FAIL") for r, _ in results),
                     "fails": [h for r, h in results if r.startswith("FAIL")]}
        print(f"  {name}: {out[name]['passed']}/{out[name]['tried']}", flush=True)
    return out


# ------------------------------------------------------------------------------------------ 4. tables


def tables(work: Path, n: int, seed: int) -> dict[str, Any]:
    from fmtransfer.data.table import TableConfig, build_table

    rng = random.Random(seed)
    defects = ["inf-numeric", "nan-numeric", "inf-label", "nan-label", "single-class", "empty-text", "dup-column",
               "non-utf8", "text-numbers", "all-missing-numeric", "strings-in-numeric", "few-rows", "ok"]
    tally: dict[str, dict[str, int]] = {}
    fails = []
    for i in range(n):
        d = defects[i % len(defects)]
        rows = rng.randint(12, 60)
        header = "y,num,txt,num" if d == "dup-column" else "y,num,txt"
        lines = [header]
        bad = rng.randrange(rows)
        for r in range(rows):
            y: Any = r % rng.randint(2, 4)
            x: Any = round(rng.gauss(0, 1), 3)
            t: Any = f"w{r % 5}"
            if r == bad:
                y = {"inf-label": "inf", "nan-label": ""}.get(d, y)
                x = {"inf-numeric": "-inf", "nan-numeric": "", "strings-in-numeric": "abc"}.get(d, x)
            if d == "single-class":
                y = "a"
            if d == "empty-text":
                t = ""
            if d == "text-numbers":
                t = r
            if d == "all-missing-numeric":
                x = ""
            lines.append(f"{y},{x},{t}" + (f",{x}" if d == "dup-column" else ""))
        if d == "few-rows":
            lines = lines[:6]
        data = ("\n".join(lines) + "\n").encode()
        if d == "non-utf8":
            data = data.replace(b"w1", b"w\xe9", 1)
        p = work / f"tb{i}.csv"
        p.write_bytes(data)
        kind = "regression" if d == "inf-label" else "classification"
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                build_table(TableConfig(path=str(p), label="y", kind=kind, numeric=["num"], text=["txt"]))
                v = "ok + warning" if "warning" in err.getvalue() else "ok"
            except FmtError as e:
                v = "refused" if "\n" not in str(e) else "FAIL: multi-line"
            except Exception as e:
                v = f"FAIL: {type(e).__name__}: {str(e)[:80]}"
        tally.setdefault(d, {})
        tally[d][v] = tally[d].get(v, 0) + 1
        if v.startswith("FAIL"):
            fails.append({"defect": d, "outcome": v})
    return {"tally": tally, "fails": fails, "cases": n}


# -------------------------------------------------------------------------------------------- 5. kills


def kills(work: Path) -> list[dict[str, Any]]:
    cache = f"cache_dir={work / 'k-cache'}"
    common = [str(TINY), "--set", cache, "--set", "student.dropout=0.2", "--set", "train.epochs=4"]
    assert cli("run", *common, "--out", str(work / "k-ref")).returncode == 0
    ref = load_file(str(work / "k-ref" / "student.safetensors"))
    points = [("exit after epoch", {"FMTRANSFER_DEBUG_EXIT_AFTER_EPOCH": str(k)}) for k in (1, 2, 3)]
    points += [("kill inside write", {"FMTRANSFER_DEBUG_KILL_IN_WRITE": f"checkpoint.pt@{k}"}) for k in (1, 2, 3, 4)]
    points += [("kill inside write", {"FMTRANSFER_DEBUG_KILL_IN_WRITE": f"{f}@1"})
               for f in ("config.yaml", "student.safetensors", "metrics.json")]
    rows = []
    for i, (what, env) in enumerate(points):
        d = work / f"k{i}"
        killed = cli("run", *common, "--out", str(d), env=env)
        resumed = cli("run", *common, "--out", str(d), "--resume")
        same = (d / "student.safetensors").exists() and all(
            torch.equal(v, load_file(str(d / "student.safetensors"))[k]) for k, v in ref.items())
        temps = [p.name for p in d.glob(".*") if p.name != ".receipts.json"]
        outcome = "bitwise equal" if resumed.returncode == 0 and same and not temps else \
            f"FAIL: rc {resumed.returncode}, same {same}, temps {temps}"
        rows.append({"point": f"{what} {next(iter(env.values()))}", "killed_rc": killed.returncode, "outcome": outcome,
                     "stderr": resumed.stderr[-200:]})
        print(f"  {rows[-1]['point']}: {outcome}", flush=True)
    return rows


def markdown(res: dict[str, Any]) -> str:
    lines = ["## Issue 16 cases, re-run", "", "| case | outcome | what the user sees |", "|---|---|---|"]
    lines += [f"| {r['case']} | {r['outcome']} | {r['message'].replace('|', '/')} |" for r in res["issue"]]
    f = res["fuzz"]
    title = f"## Config fuzz ({f['validate_cases']} validate + {f['run_cases']} run cases, seed {res['seed']})"
    lines += ["", title, "", "| outcome | cases |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(f["tally"].items())]
    lines += ["", "## Corruptions", "", "| artifact | tried | passed |", "|---|---|---|"]
    lines += [f"| {k} | {v['tried']} | {v['passed']} |" for k, v in res["corruptions"].items()]
    t = res["tables"]
    lines += ["", f"## Bad tables ({t['cases']} cases)", "", "| defect | outcomes |", "|---|---|"]
    lines += [f"| {d} | {', '.join(f'{k} {n}' for k, n in v.items())} |" for d, v in t["tally"].items()]
    lines += ["", "## Kill points (then --resume)", "", "| kill point | outcome |", "|---|---|"]
    lines += [f"| {r['point']} | {r['outcome']} |" for r in res["kills"]]
    return "\n".join(lines) + "\n"


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--fuzz", type=int, default=400, help="validate cases (default 400)")
    ap.add_argument("--fuzz-runs", type=int, default=40, help="run cases on the tiny config (default 40)")
    ap.add_argument("--corruptions", type=int, default=12, help="cases per artifact kind (default 12)")
    ap.add_argument("--tables", type=int, default=52, help="bad-table cases (default 52)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fault-suite-") as tmp:
        work = Path(tmp)
        res: dict[str, Any] = {"seed": a.seed}
        print("issue rows", flush=True)
        res["issue"] = issue_rows(work / "issue")
        print("fuzz", flush=True)
        res["fuzz"] = fuzz(work / "fuzz", a.fuzz, a.fuzz_runs, a.seed)
        print("corruptions", flush=True)
        res["corruptions"] = corruptions(work / "corrupt", a.corruptions, a.seed)
        print("tables", flush=True)
        (work / "tables").mkdir()
        res["tables"] = tables(work / "tables", a.tables, a.seed)
        print("kills", flush=True)
        res["kills"] = kills(work / "kills")
    res["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "fault-suite.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    md = markdown(res) + f"\n{res['seconds']} s; command: `{' '.join(sys.argv)}`\n"
    (out / "fault-suite.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main_()
