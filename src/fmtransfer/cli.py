"""Command line: `fmtransfer run | cache | suite | report | validate | list | export | predict | serve-bench`.

`bench` is the old name of `suite` and still works.

User errors (bad config, missing data package, corrupt checkpoint, a dead torchrun peer) print one line
and exit with 2; a bug prints one line and the path of a log holding its traceback, exit 1
(FMTRANSFER_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fmtransfer.failures import debug, report

ALIASES = {"bench": "suite"}
"""Old command names that still work: old name -> command."""


def _parser() -> argparse.ArgumentParser:
    from fmtransfer import __version__

    p = argparse.ArgumentParser(prog="fmtransfer", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"fmtransfer {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run one experiment (works under torchrun too)")
    r.add_argument("config", help="YAML run config, e.g. configs/movielens/kd.yaml")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    r.add_argument("--out", required=True, help="run directory")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")

    b = sub.add_parser("suite", aliases=list(ALIASES),
                       help="run a suite of configs over seeds; write results.json, results.md, id_vs_ood.png")
    b.add_argument("suite", help="suite YAML, e.g. configs/movielens/suite.yaml")
    b.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    b.add_argument("--out", required=True)
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every run of the suite")

    c = sub.add_parser("cache", help="prepare the config's teachers and cache their outputs (torchrun: sharded)")
    c.add_argument("config")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--teacher", action="append", default=None, help="only this teacher (repeatable)")

    rep = sub.add_parser("report", help="tabulate finished runs (mean ± std over seeds)")
    rep.add_argument("dirs", nargs="+", help="run or suite directories")
    rep.add_argument("--out", default=None,
                     help="also write results.json, results.md and the ID-vs-OOD scatter id_vs_ood.png here")
    rep.add_argument("--no-scatter", action="store_true", help="do not write id_vs_ood.png")

    v = sub.add_parser("validate", help="check configs (and a table's data file) without training anything")
    v.add_argument("configs", nargs="+")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    ls = sub.add_parser("list", help="registered methods, teacher recipes, tasks and models, with their config keys")
    ls.add_argument("kind", nargs="?", choices=["methods", "recipes", "tasks", "models"], default=None)

    e = sub.add_parser("export", help="write a finished run's student alone (+ manifest.json) for serving")
    e.add_argument("run_dir", help="the --out folder of a finished `fmtransfer run`")
    e.add_argument("--format", default="safetensors", metavar="FORMATS",
                   help="safetensors, onnx, torchscript, or several comma-separated (safetensors is always written)")
    e.add_argument("--out", required=True, help="export folder to create (must be new or empty)")

    pr = sub.add_parser("predict", help="predict a file of raw rows with an export (CSV, Parquet or JSONL)")
    pr.add_argument("export_dir", help="a folder written by `fmtransfer export`")
    pr.add_argument("--input", required=True, help="rows.csv, rows.parquet or rows.jsonl with the task's raw columns")
    pr.add_argument("--out", required=True, help="preds.csv, .parquet or .jsonl: [id], prediction, prob_<class>...")
    pr.add_argument("--format", default="safetensors", help="which exported file runs: safetensors, onnx, torchscript")
    pr.add_argument("--id", dest="id_column", default=None, help="id column to copy (default: 'id' if any)")
    pr.add_argument("--batch-size", type=int, default=1024, help="rows per model call (1024)")

    s = sub.add_parser("serve-bench", help="latency, throughput, size of the exported student vs the FM teacher path")
    s.add_argument("run_dir", help="the --out folder of a finished `fmtransfer run`")
    s.add_argument("--export", dest="export_dir", default=None,
                   help="an export folder to measure (default: export every available format to a temp folder)")
    s.add_argument("--cache-dir", default=None, help="cache folder holding the FM teacher (default: the run's)")
    s.add_argument("--requests", type=int, default=500, help="batch-1 requests timed per student format (500)")
    s.add_argument("--fm-requests", type=int, default=30, help="batch-1 requests timed for the FM path (30)")
    s.add_argument("--batch-size", type=int, default=256, help="throughput batch size (256)")
    s.add_argument("--batches", type=int, default=20, help="throughput batches per student format (20)")
    s.add_argument("--fm-batches", type=int, default=2, help="throughput batches for the FM path (2)")
    s.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads, same for every path (1)")
    s.add_argument("--json", default=None, help="also write the measurements here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.cmd = ALIASES.get(args.cmd, args.cmd)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print(f"fmtransfer: interrupted{INTERRUPTED.get(args.cmd, '')}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our stdout left (`fmtransfer list | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except Exception as e:  # one line, never a traceback: 2 for bad input (failures.py), 1 for a bug
        if debug():
            raise
        code = report(e)
        _exit_worker(code)
        return code


INTERRUPTED = {
    "run": "; continue with the same command and --resume",
    "suite": "; run the same command again to continue (finished runs are kept, the interrupted one resumes)",
    "cache": "; run the same command again (finished cache shards are kept)",
}
"""What Ctrl-C says, per command: how to continue where that is possible."""


def _exit_worker(code: int) -> None:
    """Under torchrun, leave at once after the process group is gone (gloo exit-abort workaround)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _dispatch(args: argparse.Namespace) -> int:
    from fmtransfer.config import load_config

    if args.cmd == "run":
        from fmtransfer.runner import run_experiment

        cfg = load_config(args.config, args.overrides)
        run_experiment(cfg, args.out, resume=args.resume)
        _exit_worker(0)
        return 0
    if args.cmd == "suite":
        from fmtransfer.benchmarking.suite import run_suite

        print(run_suite(args.suite, args.seeds, args.out, args.overrides))
        plot = " and id_vs_ood.png" if (Path(args.out) / "id_vs_ood.png").exists() else ""
        print(f"wrote {Path(args.out) / 'results.md'}, results.json{plot}")
        return 0
    if args.cmd == "cache":
        from fmtransfer.runner import cache_teachers

        cache_teachers(load_config(args.config, args.overrides), args.teacher)
        _exit_worker(0)
        return 0
    if args.cmd == "report":
        from fmtransfer.benchmarking.suite import write_report

        print(write_report([Path(d) for d in args.dirs], Path(args.out) if args.out else None,
                           scatter=not args.no_scatter))
        return 0
    if args.cmd == "validate":
        from fmtransfer.benchmarking.suite import suite_configs
        from fmtransfer.config import read_yaml
        from fmtransfer.validate import check_run

        for path in args.configs:
            if "runs" in read_yaml(path):
                items = suite_configs(path, [0], args.overrides)
                notes = [n for _, _, cfg in items for n in check_run(cfg)]
                print(f"ok  {path} (suite, {len(items)} runs)")
            else:
                notes = check_run(load_config(path, args.overrides))
                print(f"ok  {path}")
            for note in dict.fromkeys(notes):
                print(f"    note: {note}")
        return 0
    if args.cmd == "list":
        from fmtransfer.catalog import format_list

        print(format_list(args.kind))
        return 0
    if args.cmd == "export":
        from fmtransfer.export import export_run, format_export

        print(format_export(export_run(args.run_dir, args.out, args.format), args.out))
        return 0
    if args.cmd == "predict":
        from fmtransfer.serving.predict_file import predict_file

        done = predict_file(args.export_dir, args.input, args.out, args.format, args.id_column, args.batch_size)
        print(f"wrote {done['rows']} predictions to {done['out']} ({', '.join(done['columns'][:6])}"
              f"{', ...' if len(done['columns']) > 6 else ''})")
        return 0
    if args.cmd == "serve-bench":
        import json

        from fmtransfer.benchmarking.serve import format_bench, serve_bench

        result = serve_bench(args.run_dir, export_dir=args.export_dir, cache_dir=args.cache_dir,
                             requests=args.requests, fm_requests=args.fm_requests, batch_size=args.batch_size,
                             batches=args.batches, fm_batches=args.fm_batches, threads=args.threads)
        print(format_bench(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    raise AssertionError(args.cmd)


if __name__ == "__main__":
    sys.exit(main())
