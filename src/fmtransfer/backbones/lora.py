"""LoRA adapters (peft) on a bare backbone: a Hugging Face text encoder or an EfficientNet.

Shared by the `lora` method (through `models.fm_finetune.inject_lora`) and LEVI's `method.lora`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fmtransfer.errors import ConfigError, DataError

PEFT_INSTALL = "pip install 'peft==0.21.2' 'torch==2.13.0'"
TEXT_LORA_TARGETS = ["query", "key", "value"]
IMAGE_LORA_TARGETS = ["_expand_conv", "_project_conv", "_conv_head"]


def peft_module() -> Any:
    """The peft package; a one-line error naming the install when absent."""
    try:
        import peft
    except ImportError:
        raise DataError(f"method lora needs peft: {PEFT_INSTALL}") from None
    return peft


def _plain_pointwise(backbone: nn.Module, names: list[str]) -> None:
    """Swap each named 1x1 conv (efficientnet_lite_pytorch's static-'same'-padding subclass, which peft cannot
    clone for its adapters) for a plain nn.Conv2d with the same weights: a 1x1 conv pads nothing, so the
    outputs are identical."""
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = backbone.get_submodule(parent_name) if parent_name else backbone
        m = getattr(parent, attr)
        if type(m) is nn.Conv2d:
            continue
        plain = nn.Conv2d(m.in_channels, m.out_channels, 1, stride=m.stride, bias=m.bias is not None)
        with torch.no_grad():
            plain.weight.copy_(m.weight)
            if m.bias is not None:
                plain.bias.copy_(m.bias)
        setattr(parent, attr, plain)


def lora_backbone(backbone: nn.Module, image: bool, rank: int, alpha: float, dropout: float,
                  target_modules: list[str] | None) -> int:
    """LoRA adapters (peft) on a bare backbone in place: a Hugging Face text encoder (default targets: the
    attention projections) or an EfficientNet (the 1x1 convs); every non-LoRA weight of it is frozen.
    Returns the number of adapted modules. Shared by `lora` and LEVI's `method.lora`."""
    peft = peft_module()
    targets = target_modules or (IMAGE_LORA_TARGETS if image else TEXT_LORA_TARGETS)
    if image:
        for name, m in backbone.named_modules():
            if any(name == t or name.endswith("." + t) for t in targets) and isinstance(m, nn.Conv2d) \
                    and (m.kernel_size != (1, 1) or m.groups != 1):
                raise ConfigError(f"method.target_modules: {name} is a {m.kernel_size} conv (groups {m.groups}); "
                                  "LoRA here adapts only 1x1 convolutions (pointwise expand/project, conv_head)")
    names = [n for n, _ in backbone.named_modules() if any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ConfigError(f"method.target_modules: none of {targets} names a module of the backbone")
    if image:
        _plain_pointwise(backbone, names)
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                          target_modules=targets, bias="none")
    peft.inject_adapter_in_model(cfg, backbone)
    for n, p in backbone.named_parameters():
        p.requires_grad_("lora_" in n)
    return len(names)
