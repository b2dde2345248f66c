"""The foundation-model backbones: one text encoder path and one EfficientNet path for every FM reader.

`spec.BackboneSpec` names each knob once; `text.TextBackbone` and `image.ImageBackbone` are the only code
that runs a backbone forward; `capture` hooks named layers; `lora` adds peft adapters. Nothing here imports
models, teachers, methods, cache or serving: they all import this.
"""
