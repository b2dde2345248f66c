"""Command line: `fmtransfer run | bench | report | validate`.

User errors (bad config, missing data package, corrupt checkpoint) print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fmtransfer.errors import FmtError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fmtransfer", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run one experiment (works under torchrun too)")
    r.add_argument("config", help="YAML run config, e.g. configs/movielens/kd.yaml")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    r.add_argument("--out", required=True, help="run directory")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")

    b = sub.add_parser("bench", help="run a suite of configs over seeds; write results.json and results.md")
    b.add_argument("suite", help="suite YAML, e.g. configs/movielens/suite.yaml")
    b.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    b.add_argument("--out", required=True)
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every run of the suite")

    rep = sub.add_parser("report", help="tabulate finished runs (mean ± std over seeds)")
    rep.add_argument("dirs", nargs="+", help="run or bench directories")
    rep.add_argument("--out", default=None, help="also write results.json and results.md here")

    v = sub.add_parser("validate", help="load and validate configs without running anything")
    v.add_argument("configs", nargs="+")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except FmtError as e:
        print(f"fmtransfer: error: {e}", file=sys.stderr, flush=True)
        _exit_worker(2)
        return 2
    except KeyboardInterrupt:
        print("fmtransfer: interrupted; continue with --resume", file=sys.stderr)
        return 130


def _exit_worker(code: int) -> None:
    """Under torchrun, leave at once after the process group is gone (gloo exit-abort workaround)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _dispatch(args: argparse.Namespace) -> int:
    from fmtransfer.config import load_config

    if args.cmd == "run":
        from fmtransfer.run import run_experiment

        cfg = load_config(args.config, args.overrides)
        run_experiment(cfg, args.out, resume=args.resume)
        _exit_worker(0)
        return 0
    if args.cmd == "bench":
        from fmtransfer.bench import run_bench

        print(run_bench(args.suite, args.seeds, args.out, args.overrides))
        print(f"wrote {Path(args.out) / 'results.md'} and results.json")
        return 0
    if args.cmd == "report":
        from fmtransfer.bench import write_report

        print(write_report([Path(d) for d in args.dirs], Path(args.out) if args.out else None))
        return 0
    if args.cmd == "validate":
        from fmtransfer.bench import suite_configs
        from fmtransfer.config import read_yaml

        for path in args.configs:
            if "runs" in read_yaml(path):
                n = len(suite_configs(path, [0], args.overrides))
                print(f"ok  {path} (suite, {n} runs)")
            else:
                load_config(path, args.overrides)
                print(f"ok  {path}")
        return 0
    raise AssertionError(args.cmd)


if __name__ == "__main__":
    sys.exit(main())
