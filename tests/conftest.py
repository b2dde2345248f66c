"""Shared fixtures: tiny configs on the synthetic task, and a 2-layer BERT saved to a temp folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
TINY = Path(__file__).parent / "configs" / "tiny.yaml"


def tiny_raw(**sections: Any) -> dict[str, Any]:
    """The tiny run config as a dict, with sections replaced by keyword."""
    import yaml

    raw = yaml.safe_load(TINY.read_text())
    raw.update(sections)
    return raw


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer BERT with a WordPiece vocabulary of the synthetic task's words, saved like a hub folder."""
    transformers = pytest.importorskip("transformers")
    from fmtransfer.data.synthetic import WORDS_NEG, WORDS_POS

    d = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "item", *WORDS_POS, *WORDS_NEG, *map(str, range(10))]
    # transformers 5 ignores vocab_file here; a vocab dict works on 4.x and 5.x
    tok = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    tok.save_pretrained(str(d))
    import torch

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(cfg).save_pretrained(str(d))
    return str(d)
