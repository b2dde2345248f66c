"""Train every registered method (and every method-as-teacher recipe) for a few steps on the tests' tiny task
and print a hash of what came out, as JSON.

Why: a refactor of the methods, the loop or the recipes must leave training bit-for-bit unchanged. Run it
before and after a change and compare (about 15 s on one thread; the tests' 2-layer BERT is saved once under --bert):

    OMP_NUM_THREADS=1 python scripts/method_hashes.py > /tmp/before.json   # ... change ...
    OMP_NUM_THREADS=1 python scripts/method_hashes.py --compare /tmp/before.json

Each method runs `run_experiment` on tests/configs/tiny.yaml for 3 epochs x 10 steps (FM methods on the tiny
BERT), and is hashed by its final trainable state (every key and byte), val/test metrics and the timing-free
part of its diagnostics; each recipe prepares a teacher and is hashed by its fingerprint, outputs and reps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
SECOND = ("teachers.deep={recipe: supervised, model: {name: mlp, hidden: [32, 32]}, "
          "train: {epochs: 2, batch_size: 32, steps_per_epoch: 5}}")
TEACHER_TRAIN = {"epochs": 2, "batch_size": 16, "steps_per_epoch": 3, "lr": 0.001}
RECIPES = ["levi", "linear_probe", "mlp_probe", "ensemble", "finetune_full", "lp_ft", "wise_ft", "lora"]
VARIANTS = [("talking-lr", "talking", ["method.teacher_lr_scale=0.1", "method.codec_lr_scale=2.0"]),
            ("wise_ft-fresh", "wise_ft", ["method.start=fresh"]), ("lora-probe", "lora", ["method.probe_init=true"]),
            ("levi-lr", "levi", ["method.small_lr_scale=0.5"]),
            *[(f"dd-{t}", "diverse_distill", [f"method.gate_target={t}"])
              for t in ("benefit", "correctness", "reliability", "confidence")],
            ("dd-hint", "diverse_distill", ["method.l_hint=1.0"])]
TIMING = ("s_per", "seconds", "_ms", "inference", "train_s_epochs")


def tiny_bert(path: Path) -> str:
    """The tests' 2-layer BERT (tests/conftest.py), saved once under `path`."""
    if not path.exists():
        import transformers

        from fmtransfer.data.synthetic import WORDS_NEG, WORDS_POS

        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "item", *WORDS_POS, *WORDS_NEG, *map(str, range(10))]
        transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(str(path))
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
        transformers.BertModel(cfg).save_pretrained(str(path))
    return str(path)


def _hash(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


def state_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _runner() -> Any:
    """The run module (`runner`; `run` in trees before issue 17), so an older source tree can be hashed too."""
    import importlib

    try:
        return importlib.import_module("fmtransfer.runner")
    except ModuleNotFoundError:
        return importlib.import_module("fmtransfer.run")


def method_hashes(work: Path, bert: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    from fmtransfer.config import load_config
    from fmtransfer.registry import METHODS
    runner = _runner()
    DEBUG_DUMP_ENV, run_experiment = runner.DEBUG_DUMP_ENV, runner.run_experiment

    out: dict[str, Any] = {}
    for label, name, more in [(n, n, []) for n in METHODS.names()] + VARIANTS:
        fields = METHODS.get(name).config_cls.__dataclass_fields__
        extra = (["method.teacher=wide"] if "teacher" in fields else []) + \
            ([f"method.encoder={bert}", "method.max_length=16"] if "encoder" in fields else []) + \
            (["method.probe_steps=20"] if "probe_steps" in fields else []) + \
            (["method.curve_rows=20"] if "curve_rows" in fields else [])
        cfg = load_config(TINY, [f"cache_dir={work / 'cache'}", f"method={{name: {name}}}", SECOND, *extra,
                                 "train.epochs=3", "train.steps_per_epoch=10", "train.batch_size=16", *more])
        os.environ[DEBUG_DUMP_ENV] = str(work / f"dump-{label}")
        try:
            m = run_experiment(cfg, work / label, quiet=True)
        finally:
            os.environ.pop(DEBUG_DUMP_ENV, None)
        diag = {k: v for k, v in (m.get("method_diagnostics") or {}).items() if not any(t in k for t in TIMING)}
        out[label] = {"state": state_hash(load_file(str(work / f"dump-{label}" / "rank0.safetensors"))),
                      "val": m["val"], "test": m["test"], "best_epoch": m["best_epoch"],
                      "diagnostics": _hash(json.dumps(diag, sort_keys=True, default=str))}
    return out


def recipe_hashes(work: Path, bert: str) -> dict[str, Any]:
    from fmtransfer.config import load_config
    from fmtransfer.teachers.base import prepare_teacher

    build_task = _runner().build_task

    out: dict[str, Any] = {}
    for recipe in RECIPES:
        method: dict[str, Any] = {"encoder": bert}
        teacher: dict[str, Any] = {"recipe": recipe, "method": method, "train": TEACHER_TRAIN}
        if recipe in ("ensemble", "levi"):
            teacher["small"] = {"name": "mlp", "hidden": [16]}
        if recipe in ("lp_ft", "wise_ft", "lora", "finetune_full"):
            method["max_length"] = 16
        if recipe in ("lp_ft", "wise_ft", "lora"):
            method["probe_steps"] = 20
        if recipe == "wise_ft":
            method["curve_rows"] = 20
        cfg = load_config(TINY, [f"cache_dir={work / 'tcache'}", f"teachers.fm={json.dumps(teacher)}",
                                 "method.teacher=fm"])
        t = prepare_teacher("fm", cfg.teachers["fm"], build_task(cfg), work / "tcache", seed=0)
        out[f"recipe:{recipe}"] = {"fingerprint": t.fingerprint, "outputs": _hash(t.outputs.numpy().tobytes()),
                                   "reps": _hash(np.asarray(t.reps).tobytes()), "params": t.params}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare", type=Path, help="a JSON file printed by an earlier run: report the differences")
    p.add_argument("--bert", type=Path, default=Path(tempfile.gettempdir()) / "fmtransfer-tiny-bert",
                   help="where the tiny BERT is saved (its path is part of the FM configs: keep it fixed)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="method-hashes-"))
    bert = tiny_bert(args.bert)
    now = {**method_hashes(work / "methods", bert), **recipe_hashes(work / "recipes", bert)}
    if args.compare is None:
        print(json.dumps(now, indent=1, sort_keys=True))
        return 0
    before = json.loads(args.compare.read_text())
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    for k in changed:
        print(f"changed {k}: {before.get(k)} -> {now.get(k)}")
    print(f"{len(now) - len(changed)} of {len(now)} method/recipe hashes unchanged")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
