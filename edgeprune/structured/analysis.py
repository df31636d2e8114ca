"""The cached importance pass behind structured methods: layer-by-layer where the scores allow it
(states, weights, activations), the whole model where they need the loss or its gradients."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from edgeprune.analysis.capture import StructuredImportance
from edgeprune.analysis.layerwise import analyse_layerwise
from edgeprune.analysis.methods import LayerImportance, UnitImportance
from edgeprune.analysis.unit_scores import UnitScores
from edgeprune.analysis.whole_model import analyse_model
from edgeprune.data import TextSplits
from edgeprune.models import Reference
from edgeprune.models.streamed import as_stream
from edgeprune.models.weights import WeightStore
from edgeprune.prune.modules import materialize
from edgeprune.stages import Stage

log = logging.getLogger(__name__)

SCORES_FILE = "scores.safetensors"
UNIT_FIELDS = ("heads", "kv_groups", "channels")


class StructuredAnalysis(Stage):
    name = "structured-importance"

    def __init__(self, reference: Reference, splits: TextSplits, layer_methods: list[LayerImportance],
                 unit_methods: list[UnitImportance]) -> None:
        self.reference, self.splits = reference, splits
        self.layer_methods, self.unit_methods = layer_methods, unit_methods

    def identity(self) -> dict[str, Any]:
        return {"reference": self.reference.sha256, "calibration": self.splits.sha256,
                "layer": sorted(m.key for m in self.layer_methods), "unit": sorted(m.name for m in self.unit_methods)}

    def run(self, out_dir: Path) -> dict[str, Any]:
        result = analyse(self.reference.weights, self.splits.calib, self.layer_methods, self.unit_methods)
        save_scores(out_dir / SCORES_FILE, result)
        return {"runner": result.runner, "seconds": result.seconds, "peak_rss_bytes": result.peak_rss_bytes,
                "calibration_tokens": result.calibration_tokens}

    @staticmethod
    def load(out_dir: Path, result: dict[str, Any]) -> StructuredImportance:
        return load_scores(out_dir / SCORES_FILE, result)


def analyse(source: WeightStore | Any, windows: torch.Tensor, layer_methods: list[LayerImportance],
            unit_methods: list[UnitImportance]) -> StructuredImportance:
    """Layer by layer what can be (one layer's weights at a time), the whole model for the rest
    (the memory preflight has checked that it fits). `source`: a store, or a model in memory."""
    light_layers = [m for m in layer_methods if m.needs == "states"]
    light_units = [m for m in unit_methods if m.needs != "gradients"]
    heavy_layers = [m for m in layer_methods if m.needs != "states"]
    heavy_units = [m for m in unit_methods if m.needs == "gradients"]
    result = None
    if light_layers or light_units:
        result = analyse_layerwise(as_stream(source), windows, light_layers, light_units)
    if heavy_layers or heavy_units:
        model = materialize(source) if isinstance(source, WeightStore) else source
        whole = analyse_model(model, windows, heavy_layers, heavy_units)
        del model
        result = whole if result is None else result.merge(whole)
    return result if result is not None else StructuredImportance()


def save_scores(path: Path, scores: StructuredImportance) -> None:
    from safetensors.torch import save_file

    tensors = {f"layer/{key}": t.contiguous() for key, t in scores.layer_scores.items()}
    for name, layers in scores.unit_scores.items():
        for i, s in enumerate(layers):
            for f in UNIT_FIELDS:
                tensors[f"unit/{name}/{i}/{f}"] = getattr(s, f).contiguous()
            for k, t in s.extras.items():
                tensors[f"unit/{name}/{i}/extra/{k}"] = t.contiguous()
    save_file(tensors, path)


def load_scores(path: Path, meta: dict[str, Any]) -> StructuredImportance:
    from safetensors.torch import load_file

    tensors = load_file(path)
    layer = {k.split("/", 1)[1]: t for k, t in tensors.items() if k.startswith("layer/")}
    units: dict[str, dict[int, dict[str, Any]]] = {}
    for k, t in tensors.items():
        if not k.startswith("unit/"):
            continue
        _, name, i, *rest = k.split("/")
        entry = units.setdefault(name, {}).setdefault(int(i), {"extras": {}})
        if rest[0] == "extra":
            entry["extras"][rest[1]] = t
        else:
            entry[rest[0]] = t
    unit_scores = {name: [UnitScores(**by_layer[i]) for i in sorted(by_layer)] for name, by_layer in units.items()}
    return StructuredImportance(layer, unit_scores, meta["runner"], meta["calibration_tokens"], meta["seconds"],
                                meta["peak_rss_bytes"])


def structured_importance(reference: Reference, splits: TextSplits, layer_methods: list[LayerImportance],
                          unit_methods: list[UnitImportance], runner: Any) -> StructuredImportance:
    out = runner.run(StructuredAnalysis(reference, splits, layer_methods, unit_methods))
    return StructuredAnalysis.load(out.dir, out.result)
