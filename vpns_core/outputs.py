"""What a finished trial leaves (:func:`finish`): its masks and per-layer statistics, the export of
the validation-selected model (``model_export.pt`` and the torch.export programs a plain torch
loads), and the final row of metrics. In a data-parallel trial only rank 0 writes and measures the
cost record (the other ranks' summaries, without it, are not reported: sweeps/data_parallel.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .assembly import Assembly
from .checkpoint import atomic_save
from .config import Config
from .costs import cost_record
from .evaluation import Evaluation
from .export import save_programs
from .loop import Loop
from .models import plain_model


@dataclass
class TrialResult:
    config: Config
    final: dict[str, Any]
    history: list[dict[str, Any]]
    layer_stats: list[dict[str, Any]] = field(default_factory=list)
    workdir: Path | None = None


def export_dict(assembly: Assembly, best: dict[str, Any], masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``model_export.pt``: the selected network's state, masks, prompt and label mapping, and
    what it takes to rebuild and feed it."""
    cfg, source = assembly.cfg, assembly.source
    return {"state_dict": best["model"], "masks": {k: v.cpu() for k, v in masks.items()},
            "model": cfg.model, "num_source_classes": source.num_source_classes,
            "head": cfg.head, "label_mapping": best["mapping"], "num_classes": assembly.num_classes,
            "prompt": best["prompt"], "prompt_type": cfg.prompt, "input_size": cfg.input_size,
            "dataset": cfg.dataset, "output_size": cfg.output_size, "mean": list(source.mean),
            "std": list(source.std)}


def costs(assembly: Assembly, export: dict[str, Any]) -> dict[str, Any]:
    """The cost record of the model the trial exports (:func:`vpns_core.costs.cost_record`),
    rebuilt from ``export`` as a user loads it (:func:`vpns_core.models.plain_model`), on the
    trial's device, with its input layout and autocast: parameters (nonzeros for weight masks),
    FLOPs, and latency at ``cfg.latency_batch`` (``cfg.measure_repeats`` timed passes; 0 skips
    the timing)."""
    cfg = assembly.cfg
    return cost_record(plain_model(export), cfg.output_size, masks=export["masks"], device=assembly.device,
                       batch=cfg.latency_batch, repeats=cfg.measure_repeats,
                       channels_last=assembly.channels_last, amp_dtype=assembly.amp_dtype)


def semi_structured(assembly: Assembly, export: dict[str, Any], test) -> dict[str, Any]:
    """A 2:4 trial's export with its eligible linear layers in torch's semi-structured sparse
    format (:mod:`vpns_core.semi_structured`), checked against the dense-with-zeros model on
    real test images and timed against it, where the device has the kernels; elsewhere the
    reason (the export keeps dense weights with zeros)."""
    import copy

    from . import semi_structured as s24
    device = assembly.device
    reason = s24.unavailable(device)
    if reason is not None:
        return {"semi_structured_note": reason}
    dense = plain_model(export).to(device).half().eval()
    sparse = copy.deepcopy(dense)
    layers = s24.convert(sparse)
    if not layers:
        return {"semi_structured_note": "no linear layer is 2:4 with both sizes multiples of 64"}
    images = torch.stack([test[i][0] for i in range(min(64, len(test)))])
    x = assembly.prompt(images.to(device).float().div(255), enabled=False).half()
    out = s24.compare(dense, sparse, x)
    return {"semi_structured_layers": len(layers), "semi_structured_max_abs_diff": out["max_abs_diff"],
            "semi_structured_dense_ms": out["dense_ms"], "semi_structured_sparse_ms": out["sparse_ms"],
            "semi_structured_speedup": out["dense_ms"] / out["sparse_ms"]}


def finish(workdir: Path, assembly: Assembly, loop: Loop, evaluation: Evaluation, method: Any,
           context: Any, dataset: dict[str, Any], test, writes: bool) -> TrialResult:
    """Write masks, per-layer stats, the exported model and its programs (where ``writes``);
    return the trial's result with its final row."""
    cfg, net = assembly.cfg, assembly.net
    stats = [dict(name=s.name, numel=s.numel, kept=s.kept, density=s.density, pruned=s.pruned)
             for s in net.layer_stats()] if net.mode != "dense" else []
    masks = assembly.masks()
    if writes:
        atomic_save({"masks": {k: v.cpu() for k, v in masks.items()}, "model": cfg.model,
                     "sparsity": cfg.sparsity}, workdir / "masks.pt")
        (workdir / "layer_stats.json").write_text(json.dumps(stats, indent=1))
    if evaluation.best_state is None:  # no tuning epoch selected one: the model as it ends
        evaluation.best_state = assembly.snapshot()
    best = evaluation.best_state
    export = export_dict(assembly, best, masks)
    export.update(method.export_entries(context))
    if writes:
        atomic_save(export, workdir / "model_export.pt")
        # the state dict needs the architecture's code (vpns' own for the tiny ResNet); the
        # torch.export programs carry it: plain torch loads them (vpns_core.export)
        save_programs(assembly.predictor(export, best), export, workdir)
    history = loop.history
    final = dict(history[-1]) if history else {}
    final["dataset"] = dict(dataset)
    final.update(evaluation.selected())
    mask_stage = [h for h in history if h["stage"] == "mask"]
    if mask_stage:
        final["mask_stage_test_acc_prompt"] = mask_stage[-1]["test_acc_prompt"]
        final["mask_stage_test_acc_noprompt"] = mask_stage[-1]["test_acc_noprompt"]
    final.update(method.final_metrics(context))
    if writes:  # one rank times the model; the others would only queue on the timing lock
        final.update(costs(assembly, export))
        if cfg.nm == (2, 4):
            final.update(semi_structured(assembly, export, test))
    final["trial_time_s"] = loop.wall_time + evaluation.eval_time  # training and evaluation
    final["prompt_tunable"] = assembly.prompt.tunable_count if assembly.uses_prompt else 0
    if cfg.nm is not None:  # the layers an N:M pattern leaves dense, by name
        final["nm_dense_layers"] = ", ".join(n for n, _ in net.excluded)
    pad = assembly.uses_prompt and cfg.prompt == "pad"
    final["prompt_input_fraction"] = cfg.prompt_input_fraction if pad else 0.0
    final["prompt_image_fraction"] = cfg.prompt_image_fraction if pad else 0.0
    return TrialResult(cfg, final, list(history), stats, workdir)
