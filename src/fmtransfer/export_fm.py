"""Export of runs whose method builds the shipped model around a foundation model (levi, the probes,
ensemble, the fine-tuning baselines).

Export rebuilds the model the training way (the method's `build_model`, reading the run's cached features),
loads `student.safetensors` strictly and checks it reproduces the run's test metric; then it serves it on
the test split's raw rows and checks that path against it:
- text, frozen backbone (levi, linear_probe, mlp_probe, ensemble): safetensors holds the model's own
  weights; `models/fm_serve.ServedFM` runs the package's encoder live (referenced by path and file hash,
  never copied). With LEVI's `tune_backbone` / `lora` the trained backbone (LoRA merged) ships too.
- text, fine-tuned (finetune, lp_ft, wise_ft, lora): every encoder weight ships (LoRA merged);
  `ServedTextFinetune` takes the architecture and tokenizer from the package.
  On request, text models are also written as TorchScript / ONNX graphs on the views + token ids
  (`token_graph`; the loader runs the package's tokenizer before the graph).
- images (EfficientNet): one graph from the image view through the backbone (`ImageGraph`), written as
  TorchScript (always) and ONNX (on request); safetensors keeps the trained weights for the record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fmtransfer.config import to_dict
from fmtransfer.data.base import TaskData
from fmtransfer.export_manifest import ReadRecorder, run_manifest
from fmtransfer.integrity import publish_dir
from fmtransfer.locks import staged_dir
from fmtransfer.serving.manifest import ExportError, Manifest, one_line

FM_LIVE_ATOL = 0.02
"""Largest |live - cached| output difference accepted on the test split: the cached features are fp16
tables, the live path computes them in fp32 (measured differences: docs/serving.md)."""


def builds_own_model(method_name: str) -> bool:
    """True when the method ships a model of its own (its `build_model` is not the base class's)."""
    from fmtransfer.methods.base import Method
    from fmtransfer.registry import METHODS

    impl = METHODS.get(method_name).impl
    return impl.build_model.__func__ is not Method.build_model.__func__  # type: ignore[attr-defined]


def _ref(obj: Any) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def _model_config_class(cfg: Any) -> type:
    """The nearest class of `cfg` defined under fmtransfer.models (a server never imports fmtransfer.methods)."""
    for cls in type(cfg).__mro__:
        if cls.__module__.startswith("fmtransfer.models."):
            return cls
    raise ExportError(f"method {cfg.name}: its config class lives outside fmtransfer.models; it cannot be served")


def build_own_model(run: Any, task: TaskData) -> nn.Module:
    """The method's shipped model, rebuilt the training way, with the run's weights (strict)."""
    from fmtransfer.models.fm_finetune import TextFinetuneModel
    from fmtransfer.models.fm_heads import FMModel
    from fmtransfer.models.image_heads import FinetuneImageModel
    from fmtransfer.registry import METHODS
    from fmtransfer.runner import build_context

    name = run.cfg.method.name
    built = METHODS.get(name).impl.build_model(run.cfg.method, build_context(run.cfg, task, torch.device("cpu")), task)
    model = built.model if built is not None else None
    if isinstance(model, (TextFinetuneModel, FinetuneImageModel)):
        return _load(model, run, name)
    if not isinstance(model, FMModel):
        raise ExportError(f"method {name}: its model ({type(model).__name__}) has no export path (served: the "
                          "frozen-FM models and the text/image fine-tuned models); serve it from the run with "
                          "fmtransfer's Python API")
    return _load(model, run, name)


def _load(model: nn.Module, run: Any, name: str) -> nn.Module:
    try:
        model.load_state_dict(run.state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{run.path / 'student.safetensors'} does not fit the {name} model in config.yaml "
                          f"({one_line(e, 160)}); run the experiment again") from None
    return model.eval().requires_grad_(False)


def is_image(model: nn.Module) -> bool:
    """An image FM model (served as a graph: ONNX / TorchScript with the backbone inside)."""
    return getattr(model, "fm_info", {}).get("modality") == "image" or hasattr(model, "backbone")


def _unwrapped(net: nn.Module) -> nn.Module:
    """A copy of `net` with every LoRA adapter merged into its base layer and the peft wrapper removed."""
    import copy

    twin = copy.deepcopy(net)
    for name, m in list(twin.named_modules()):
        if hasattr(m, "lora_A") and hasattr(m, "merge") and hasattr(m, "base_layer"):
            m.merge()
            parent, _, leaf = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, leaf, m.base_layer)
    return twin


def shipped_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors the export's safetensors holds: the model's state; for a text FM model whose backbone
    trained (LEVI with tune_backbone / lora), the model's own layers plus the trained backbone, LoRA merged,
    under `backbone.` (the package's frozen weights are never written)."""
    from fmtransfer.models.fm_serve import BACKBONE_PREFIX

    live = getattr(getattr(model, "taps", None), "live", None)
    if live is None:
        return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("taps.live.")}
    net = _unwrapped(live.net).state_dict()
    return {k: v.detach().contiguous().clone() for k, v in
            (own | {BACKBONE_PREFIX + k: v for k, v in net.items()}).items()}


def shipped_weights(model: nn.Module) -> nn.Module:
    """What the export writes: the model itself, or for LoRA a copy with every adapter folded into its base
    weight (peft's merge; a plain backbone a server loads without peft, outputs equal to float rounding)."""
    import copy

    attr = "encoder" if hasattr(model, "encoder") else "backbone"
    net = getattr(model, attr, None)
    if net is None or not any(hasattr(m, "lora_A") for m in net.modules()):
        return model
    twin = copy.copy(model)  # shallow: the same layers, with the merged backbone in place of the adapted one
    twin._modules = dict(model._modules) | {attr: _unwrapped(net)}
    return twin.eval()


class ImageGraph(nn.Module):
    """An image FM model as one program on the task's views: the backbone runs on the batch's pixels (frozen-FM
    models: `LiveTaps` to the deepest tap, then `model.live`; fine-tuned ones: their own forward)."""

    def __init__(self, model: nn.Module, cfg: Any, task: TaskData) -> None:
        super().__init__()
        self.model = model
        if hasattr(model, "chunk"):
            model.chunk = 1 << 30  # one call per batch: the graph has no Python loop
        self.live: nn.Module | None = None
        if hasattr(model, "taps"):
            from fmtransfer.models.fm_live import LiveTaps

            self.live = model.taps.live or LiveTaps(cfg, task, model.fm_info).eval()  # type: ignore[union-attr]
            self.live.chunk = 1 << 30  # one call per batch: the graph has no Python loop

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # the un-chunked inner calls: a graph with a symbolic batch size must not branch on it
        if self.live is not None:
            raw = self.live._image(batch[self.live.feature])  # type: ignore[operator, union-attr]
            return self.model.live(batch, raw)  # type: ignore[operator]
        m = self.model
        x = batch[m.feature]  # type: ignore[index]
        rows = torch.zeros(x.shape[0], dtype=torch.long)  # the fine-tuned model's batch carries row ids
        one = {m.feature: x, "row": rows}  # type: ignore[dict-item]
        return m.head(m.trunk(m.drop(m._pool_rows(one)))) + m.offset(one)  # type: ignore[operator]


def graph_inputs(graph: nn.Module, task: TaskData) -> list[str]:
    """The views an image graph reads (run once on real rows)."""
    batch = ReadRecorder({k: v[task.splits["test"][:2]] for k, v in task.features.items()})
    with torch.no_grad():
        graph(batch)
    return [f for f in task.features if f in batch.read]


def text_step(task: TaskData, view: str) -> dict[str, Any]:
    """The preprocessing step that gives the FM its text: the raw columns the task joined into `view`."""
    from fmtransfer.models.fm_serve import TEXT_KEY

    recipe = ((task.meta.get("preprocessing") or {}).get("texts") or {}).get(view)  # type: ignore[union-attr]
    recipe = recipe or {"columns": ["text"], "join": ". "}
    return {"op": "text", "columns": list(recipe["columns"]), "join": recipe["join"], "view": TEXT_KEY}


def fm_model_record(run: Any, model: nn.Module) -> dict[str, Any]:
    """manifest.model for a served FM model: the wrapper, the trained model's class and config, the backbone."""
    from fmtransfer.models.fm_serve import ServedFM, ServedTextFinetune, backbone_record
    from fmtransfer.registry import MODELS

    cfg = run.cfg.method
    params = sum(p.numel() for p in model.parameters())
    if is_image(model):  # served by its graph files; safetensors holds the trained weights for the record
        from fmtransfer.backbones.image import weights_path
        from fmtransfer.utils import file_hash

        path = weights_path(_backbone_cfg(cfg))
        return {"name": cfg.name, "class": _ref(type(model)), "config": to_dict(cfg), "params": params,
                "fm": {"kind": "image_graph", "backbone": cfg.backbone, "path": path, "fingerprint": file_hash(path),
                       "served_by": ["torchscript", "onnx"]} | ({"taps": model.fm_info} if hasattr(model, "taps")
                                                              else {})}
    if not hasattr(model, "taps"):  # a fine-tuned encoder with its head: every weight is in the export
        merged = any(hasattr(m, "lora_A") for m in model.modules())
        return {"name": cfg.name, "class": _ref(ServedTextFinetune), "config": to_dict(cfg), "params": params,
                "out_dim": int(model.out_dim),  # type: ignore[arg-type]
                "fm": {"kind": "finetuned", "lora_merged": merged}
                | backbone_record(cfg.encoder, [], cfg.max_length, False)}
    out: dict[str, Any] = {
        "name": cfg.name, "class": _ref(ServedFM), "head_class": _ref(type(model)),
        "config_class": _ref(_model_config_class(cfg)), "config": to_dict(cfg), "params": params,
        "fm": model.fm_info | {"kind": "frozen", "backbone_in_export": model.taps.live is not None}  # type: ignore
        | backbone_record(cfg.encoder, model.taps.names, cfg.max_length, cfg.normalize)}  # type: ignore[attr-defined]
    small = getattr(model, "small", None)
    if small is not None:
        scfg = getattr(cfg, "small", None) or run.cfg.student
        entry = MODELS.get(scfg.name)
        out["small"] = {"name": scfg.name, "class": _ref(entry.impl), "config_class": _ref(entry.config_cls),
                        "config": to_dict(scfg)}
    return out


def _backbone_cfg(cfg: Any) -> Any:
    from fmtransfer.backbones.spec import BackboneSpec

    return BackboneSpec(backbone=cfg.backbone, weights=cfg.weights)


def verify_fm_export(export_dir: Any, manifest: Manifest, task: TaskData, model: nn.Module, run: Any) -> None:
    """The rebuilt (cached-feature) model must score the run's test metric; the served raw-text path must
    agree with it within FM_LIVE_ATOL (fills manifest.metrics)."""
    from fmtransfer.serving.loader import load_predictor
    from fmtransfer.serving.manifest import METRIC_DECIMALS

    m, rows, bs = task.metric, task.splits["test"], run.cfg.train.eval_batch_size
    with torch.inference_mode():
        ref = torch.cat([model(task.gather(rows[s:s + bs])).float() for s in range(0, len(rows), bs)])
    run_value, tol = run.metrics["test"][m], 0.5 * 10 ** -METRIC_DECIMALS
    rebuilt = task.score(ref, rows)[m]
    if abs(rebuilt - run_value) > tol:
        raise ExportError(f"the rebuilt {run.cfg.method.name} model scores test {m} {rebuilt:.5f}, metrics.json says "
                          f"{run_value:.5f}: the task data, cache or code changed since the run; run it again")
    raw = raw_rows(task, rows, manifest)
    cached = ref.clamp(*task.target_range) if task.task_type == "regression" and task.target_range else ref
    graph = manifest.model["fm"]["kind"] == "image_graph"
    for fmt in manifest.files:
        if graph and fmt == "safetensors":
            continue  # the trained weights, for the record: the graph files serve
        pred = load_predictor(export_dir, fmt)
        out = np.concatenate([pred.outputs({k: v[s:s + bs] for k, v in raw.items()})
                              for s in range(0, len(rows), bs)])
        diff = float(np.abs(out - cached.numpy()).max()) if len(rows) else 0.0
        if diff > FM_LIVE_ATOL:
            raise ExportError(f"the served {run.cfg.method.name} model ({fmt}, the FM live on raw rows) differs from "
                              f"the run's model by {diff:.2e} (> {FM_LIVE_ATOL}); report this as a bug")
        manifest.metrics["exported"][fmt] = {
            "test": task.score(torch.from_numpy(out), rows), "max_abs_diff": diff, "rows": len(rows),
            "raw_rows_checked": True, "cached_test": {m: rebuilt}, "tolerance_live_vs_cached": FM_LIVE_ATOL}


def token_graph(export_dir: Path, manifest: Manifest, task: TaskData,
                example: tuple[torch.Tensor, ...]) -> tuple[nn.Module, tuple[torch.Tensor, ...], dict[str, Any]]:
    """A text model as the loader rebuilds it, as a graph on token ids (+ views), with an example batch."""
    from fmtransfer.models.fm_serve import TOKEN_INPUTS, TokenGraph, tokenize
    from fmtransfer.serving.loader import load_student, load_tokenizer

    served = load_student(export_dir)
    rows = task.splits["test"][:4]
    texts = raw_rows(task, rows, manifest)
    step = next(s for s in manifest.preprocessing["encoders"]["steps"] if s["op"] == "text")
    from fmtransfer.preprocess import joined_texts

    enc = tokenize(load_tokenizer(manifest.model["fm"]), joined_texts(texts, step["columns"], step["join"]),
                   int(manifest.model["fm"]["max_length"]), "pt")
    tokens = {k: enc[k].long() for k in TOKEN_INPUTS}
    return TokenGraph(served).eval(), (*example, *tokens.values()), tokens


def raw_rows(task: TaskData, rows: torch.Tensor, manifest: Manifest) -> dict[str, Any]:
    """The raw columns of `rows` a served model reads: the task's own, plus the text column(s) of its FM."""
    out: dict[str, Any] = dict(task.raw(rows)) if task.raw is not None else \
        {k: task.features[k][rows].numpy() for k in manifest.inputs}
    for step in manifest.preprocessing["encoders"]["steps"]:
        if step["op"] == "text" and not all(c in out for c in step["columns"]):
            view = manifest.model["config"].get("view") or next(iter(task.texts))
            tv = task.texts[view]
            idx = rows if tv.index == "row" else task.features[tv.index][rows]
            out[step["columns"][0]] = [tv.texts[i] for i in idx.tolist()]
    return out


def export_fm_run(run: Any, task: TaskData, out: Path, fmts: list[str]) -> Manifest:
    """`export_run` for a method's own FM model: text models served on raw texts from safetensors; image models
    as a graph with the backbone inside (TorchScript always, ONNX on request) beside their safetensors."""

    from safetensors.torch import save_file

    from fmtransfer.preprocess import identity_spec
    from fmtransfer.serving.formats import WRITERS
    from fmtransfer.serving.manifest import FILE_NAMES, MANIFEST_NAME, file_record

    model = build_own_model(run, task)
    shipped = shipped_weights(model)  # LoRA: adapters merged into the base weights
    image = is_image(model)
    if image:
        graph = ImageGraph(shipped, run.cfg.method, task).eval()
        inputs = graph_inputs(graph, task)
        fmts = [f for f in ("safetensors", "torchscript", "onnx") if f in (*fmts, "torchscript")]
    else:
        batch = ReadRecorder(task.gather(task.splits["test"][:4]))
        with torch.no_grad():
            model(batch)
        inputs = [f for f in task.features if f in batch.read]
    manifest = run_manifest(run, task, model, inputs)
    manifest.model = fm_model_record(run, model)
    spec = task.meta.get("preprocessing") or identity_spec(
        {n: (manifest.features[n]["dtype"], manifest.features[n]["shape"]) for n in inputs},
        (task.meta.get("classes") or None))  # type: ignore[arg-type]
    steps = [s for s in spec["steps"] if set(s.get("views") or [s.get("view")]) & set(inputs)]  # type: ignore[index]
    if not image:
        view = getattr(run.cfg.method, "view", None) or next(iter(task.texts))
        steps.append(text_step(task, view))
    manifest.preprocessing["encoders"] = dict(spec) | {"steps": steps}  # type: ignore[arg-type]
    meta = {"format": "fmtransfer-student", "task": task.name, "model": run.cfg.method.name, "inputs": ",".join(inputs)}
    example = tuple(task.features[k][task.splits["test"][:4]] for k in inputs)
    extra: dict[str, Any] = {}
    with staged_dir(out) as tmp:  # temp folders of a killed export to the same --out are removed first
        for fmt in fmts:
            if fmt == "safetensors":
                save_file(shipped_state(shipped), str(tmp / FILE_NAMES[fmt]), metadata=meta)
                manifest.files[fmt] = file_record(tmp / FILE_NAMES[fmt])
                (tmp / MANIFEST_NAME).write_text(manifest.to_json())
                if not image and len(fmts) > 1:  # the graph files hold what the loader rebuilds, on token ids
                    graph, example, extra = token_graph(tmp, manifest, task, example)
                continue
            info = WRITERS[fmt](graph, inputs + list(extra), example, tmp / FILE_NAMES[fmt], meta)
            manifest.files[fmt] = file_record(tmp / FILE_NAMES[fmt]) | info | (
                {"extra_inputs": list(extra)} if extra else {})
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        verify_fm_export(tmp, manifest, task, model, run)
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        publish_dir(tmp, out, [MANIFEST_NAME, *(rec["file"] for rec in manifest.files.values())])
    return manifest
