"""Shipped FM models (`linear_probe`, `mlp_probe`, `levi`; `finetune`, `lp_ft`, `wise_ft`) on raw texts.

While training, these models read the FM's pooled features at the tapped layers from a cache indexed by
row; a server has new texts and no cache. `ServedFM` holds the trained model (`FMModel`) and `TextTaps`:
the frozen encoder, loaded from its package or folder (referenced by path and weight hash in the manifest,
never copied into the export), run only to the deepest tap, mean-pooled (and L2-normalised as when cached).
`forward(batch)` reads the texts from `batch[TEXT_KEY]` (a list of str) and the model's other views (the
small model's n-grams, say) from the batch, and returns `model.live(batch, features)`.
Its state dict is the trained model's alone (`model.*`): the backbone's weights come from the package.
`ServedTextFinetune` is the fine-tuned encoder with its head (its weights are all in the export).
Imports nothing of the training code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fmtransfer.backbones.spec import BackboneSpec
from fmtransfer.backbones.text import TextBackbone, encoder_fingerprint, load_encoder, resolve_encoder_path
from fmtransfer.models.fm_heads import FMModel
from fmtransfer.preprocess import TEXT_VIEW as TEXT_KEY


class TextTaps(nn.Module):
    """Texts -> the encoder, cut at the deepest tap (later layers and the pooler never run) -> mean-pooled
    states at the tapped layers, through `backbones.text.TextBackbone`. The weights are the package's
    (frozen) unless a state dict replaces them (LEVI with `tune_backbone` / `lora`: the trained, merged
    backbone ships in the export)."""

    def __init__(self, encoder: str, paths: list[str], max_length: int, normalize: bool, chunk: int = 64) -> None:
        super().__init__()
        self._spec = BackboneSpec(modality="text", encoder=encoder, max_length=max_length, l2_normalize=normalize,
                                  batch_size=chunk)
        fm = TextBackbone(self._spec)
        layers = fm.layer_paths
        fm.cut(max(layers.index(p) for p in paths) + 1)
        self.tok, self.net = fm.tok, fm.net.eval().requires_grad_(False)
        self.paths, self.max_length, self.normalize, self.chunk = list(paths), max_length, normalize, chunk

    @property
    def fm(self) -> TextBackbone:
        return TextBackbone(self._spec, self.tok, self.net)

    def forward(self, texts: list[str]) -> list[torch.Tensor]:
        # similar lengths per call: little padding
        return self.fm.encode(texts, self.paths, chunk=self.chunk, order="shortest")

    def tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Token ids -> pooled states at the tapped layers (the part of the path a graph file holds)."""
        return self.fm.pooled({"input_ids": input_ids, "attention_mask": attention_mask}, self.paths)


def tokenize(tok: Any, texts: list[str], max_length: int, tensors: str) -> Any:
    """How every served text model tokenizes: padded to the longest text, cut at `max_length`."""
    return tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors=tensors)


TOKEN_INPUTS = ["input_ids", "attention_mask"]
"""What the graph files (ONNX, TorchScript) of a text model take beside the feature views."""


class ServedFM(nn.Module):
    """The trained frozen-FM model plus the live encoder that feeds it raw texts."""

    def __init__(self, model: FMModel, taps: TextTaps) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "taps", taps)  # not a submodule: the frozen backbone is never saved

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        if TEXT_KEY not in batch:  # a graph file's call: token ids already in the batch
            return self.model.live(batch, self.taps.tokens(batch["input_ids"], batch["attention_mask"]))
        return self.model.live(batch, self.taps(list(batch[TEXT_KEY])))


class TokenGraph(nn.Module):
    """A served text model as a graph on token ids (+ views): what ONNX and TorchScript files hold; the
    tokenizer runs outside (the loader's, from the package)."""

    def __init__(self, served: nn.Module) -> None:
        super().__init__()
        self.served = served
        taps = getattr(served, "taps", None)
        if taps is not None:
            self.taps = taps  # registered here, so the graph holds the backbone's weights

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.served(batch)


class ServedTextFinetune(nn.Module):
    """A fine-tuned text encoder with its linear head (finetune, lp_ft, wise_ft) on raw texts: tokenize, encode,
    mean-pool the last layer, standardise, head. The same state-dict keys as `TextFinetuneModel`, whose
    training-time version tokenizes the task's texts once and reads them by row."""

    def __init__(self, encoder: str, max_length: int, task_type: str, out_dim: int, chunk: int = 64) -> None:
        super().__init__()
        self._spec = BackboneSpec(modality="text", encoder=encoder, max_length=max_length, l2_normalize=False,
                                  batch_size=chunk)
        self.tok, self.encoder = load_encoder(encoder)  # the architecture; the fine-tuned weights load after
        dim = int(self.encoder.config.hidden_size)
        self.register_buffer("mu", torch.zeros(dim))
        self.register_buffer("sd", torch.ones(dim))
        self.drop = nn.Dropout(0.0)
        self.out = nn.Linear(dim, out_dim)
        self.max_length, self.task_type, self.chunk = max_length, task_type, chunk

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        fm = TextBackbone(self._spec, self.tok, self.encoder)
        if TEXT_KEY not in batch:  # a graph file's call: token ids already in the batch
            z = fm.pooled({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})[0]
        else:  # chunks in the request's order
            z = fm.encode(list(batch[TEXT_KEY]), chunk=self.chunk, order="given")[0]
        out = self.out(self.drop((z - self.mu) / self.sd))
        return out.squeeze(-1) if self.task_type == "regression" else out


BACKBONE_PREFIX = "backbone."
"""Keys of a trained backbone in an export's safetensors (LEVI with tune_backbone / lora, LoRA merged)."""


def rebuild(head_cls: Any, cfg: Any, task: Any, fm_info: dict[str, Any], small: nn.Module | None) -> FMModel:
    """The trained model's class around empty feature tables of the recorded widths (weights loaded after)."""
    from fmtransfer.models.fm_layers import FMFeatures, TappedFeatures

    fm = FMFeatures([torch.empty(0, d) for d in fm_info["feature_dims"]], list(fm_info["taps"]), fm_info["modality"],
                    list(fm_info["depths"]), int(fm_info["backbone_layers"]), int(fm_info["backbone_params_used"]),
                    int(fm_info["backbone_params"]), 0)
    taps = TappedFeatures(fm, cfg.standardize, torch.zeros(0, dtype=torch.long))
    return head_cls(cfg, task, taps, fm, small) if small is not None else head_cls(cfg, task, taps, fm)


def backbone_record(encoder: str, paths: list[str], max_length: int, normalize: bool) -> dict[str, Any]:
    """What the manifest says of the frozen encoder: where it is, what its files hash to, how it is read."""
    return {"encoder": encoder, "path": resolve_encoder_path(encoder), "fingerprint": encoder_fingerprint(encoder),
            "paths": list(paths), "max_length": max_length, "normalize": normalize}
