"""`edgeprune prune`: apply one plan and/or one sparse method to a model and write the pruned GGUF
(and, when plain transformers can hold it, an HF safetensors checkpoint), with its quality against
the reference."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import model_validator

from edgeprune import __version__
from edgeprune.bundle import MANIFEST, check_output_dir, file_hashes, model_filename, staged_output, tool_versions
from edgeprune.config import Profile, SparsitySpec, Strict
from edgeprune.errors import EdgepruneError
from edgeprune.evaluate import Quality, reference_log_probs, reference_perplexity
from edgeprune.export.gguf_llama import architecture
from edgeprune.gguf_file import decoder_zero_share, read_gguf
from edgeprune.models import load_reference, resolve_source
from edgeprune.pipeline import (
    MODEL_FILE,
    CandidateModel,
    CandidateQuality,
    SparseWeights,
    calibration_splits,
    importance_of,
    pruned_model,
)
from edgeprune.prune import LayerShape, ModelShape, Plan
from edgeprune.prune.spec import PlanSpec, check, load_plan_spec, resolve
from edgeprune.quantize import QUANT_FTYPES, RECIPES, QuantSpec
from edgeprune.stages import StageRunner

log = logging.getLogger(__name__)

HF_DIR = "hf"
PLAN_FILE = "plan.json"
SPARSITY_FILE = "sparsity.json"


class PruneConfig(Strict):
    """Everything `edgeprune prune` depends on; the CLI builds exactly this object."""

    plan: Path | None = None  # None: keep the structure (a sparse method alone)
    sparse: SparsitySpec | None = None
    output_dir: Path
    profile: Profile  # calibration settings (importance, quality)
    cache_dir: Path
    model: str | None = None  # None: the embedded default
    quant: Literal[tuple(QUANT_FTYPES)] = "Q4_K_M"  # type: ignore[valid-type]
    recipe: Literal[tuple(RECIPES)] = "default"  # type: ignore[valid-type]
    imatrix: bool = True
    calib: Path | None = None
    threads: int = max(1, os.cpu_count() or 1)
    trust_remote_code: bool = False
    force: bool = False

    @model_validator(mode="after")
    def _something_to_do(self) -> PruneConfig:
        if self.plan is None and self.sparse is None:
            raise ValueError("give a plan (--plan FILE), a sparse method (--method), or both")
        return self


@dataclass
class PruneResult:
    output_dir: Path
    artifact: str
    plan: Plan
    description: str
    architecture: str
    size_bytes: int
    parameters: int
    quality: Quality
    reference_perplexity: float
    hf_dir: Path | None
    sparsity: dict[str, Any] | None  # the sparse stage's report, + zeros kept in the GGUF


def prune(config: PruneConfig) -> PruneResult:
    check_output_dir(config.output_dir, config.force)
    spec = load_plan_spec(config.plan) if config.plan else PlanSpec()  # a bad plan fails before the model loads
    runner = StageRunner(config.cache_dir / "stages")
    reference = load_reference(resolve_source(config.model), config.cache_dir, config.trust_remote_code)
    shape = ModelShape.from_config(reference.config)
    check(spec, shape)
    if config.sparse is not None:  # the model's own widths, before any work; the plan's are checked below
        _check_groups(config.sparse, [LayerShape(shape.n_head, shape.n_head_kv, shape.ffn)], shape)
    splits = calibration_splits(reference, config.profile.calibration, config.calib, runner)
    importance = importance_of(reference, splits, runner) if spec.needs_importance() else None
    plan = resolve(spec, shape, importance)
    description = plan.describe(shape)
    log.info("plan: %s", description)
    sparse = None
    if config.sparse is not None:
        _check_groups(config.sparse, plan.layer_shapes(shape), shape)
        log.info("sparsity: %s, sequential calibration", config.sparse.describe())
        sparse = runner.run(SparseWeights(reference, plan, config.sparse, splits))
        description = f"{description}; {config.sparse.describe()} sparse"

    quant = QuantSpec(config.quant, config.recipe, config.imatrix)
    model = runner.run(CandidateModel(reference, plan, quant, splits, config.threads, sparse))
    ref_logps = reference_log_probs(reference.model, splits.heldout)
    gguf_path = model.dir / MODEL_FILE
    quality = Quality(**runner.run(CandidateQuality(gguf_path, model.key, splits, ref_logps, config.threads)).result)
    arch = architecture(plan.layer_shapes(shape))
    uniform = plan.uniform_shape(shape) is not None
    artifact = model_filename(reference.source.model_id, config.quant)
    sparsity = None
    if sparse is not None:
        sparsity = sparse.result | {"gguf": {"quant": quant.describe(),
                                             "decoder_zero_share": decoder_zero_share(read_gguf(gguf_path))}}
    result = PruneResult(
        output_dir=config.output_dir, artifact=artifact, plan=plan, description=description, architecture=arch,
        size_bytes=model.result["size_bytes"], parameters=model.result["parameters"], quality=quality,
        reference_perplexity=reference_perplexity(ref_logps, splits.heldout),
        hf_dir=config.output_dir / HF_DIR if uniform else None, sparsity=sparsity,
    )
    with staged_output(config.output_dir, config.force) as tmp:
        shutil.copyfile(gguf_path, tmp / artifact)
        if uniform:
            pruned_model(reference, plan, sparse).save_pretrained(tmp / HF_DIR, safe_serialization=True)
            reference.tokenizer.save_pretrained(tmp / HF_DIR)
        else:
            log.info("per-layer shapes: no HF checkpoint (plain transformers needs one shape for all layers)")
        (tmp / PLAN_FILE).write_text(json.dumps(_plan_record(plan, shape, arch), indent=1))
        if sparsity is not None:
            (tmp / SPARSITY_FILE).write_text(json.dumps(sparsity, indent=1))
        report = _report(result, config, reference, splits.to_dict())
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        manifest = {"edgeprune_version": __version__, "model": report["model"], "tools": tool_versions(),
                    "files": file_hashes(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return result


def _check_groups(spec: SparsitySpec, layers: list[LayerShape], shape: ModelShape) -> None:
    """N:M groups run along each weight's input columns: every input width must divide by M."""
    if spec.pattern is None:
        return
    m = spec.pattern[1]
    widths = {shape.hidden} | {l.n_head * shape.head_dim for l in layers if l.n_head} | {l.ffn for l in layers if l.ffn}
    bad = sorted(w for w in widths if w % m)
    if bad:
        raise EdgepruneError(f"{spec.nm} sparsity needs input widths divisible by {m}, but this model (after the "
                             f"plan) has width {bad[0]}; choose an M that divides it or change the plan.")


def quant_description(config: PruneConfig) -> str:
    return QuantSpec(config.quant, config.recipe, config.imatrix).describe()


def _plan_record(plan: Plan, shape: ModelShape, arch: str) -> dict[str, Any]:
    return {
        "plan": plan.to_dict(),
        "description": plan.describe(shape),
        "architecture": arch,
        "layers": [s.__dict__ for s in plan.layer_shapes(shape)],
    }


def _report(result: PruneResult, config: PruneConfig, reference: Any, calibration: dict[str, Any]) -> dict[str, Any]:
    return {
        "edgeprune_version": __version__,
        "model": {"id": reference.source.model_id, "sha256": reference.sha256,
                  "parameters": reference.model.num_parameters()},
        "artifact": result.artifact,
        "quant": quant_description(config),
        "plan": result.description,
        "architecture": result.architecture,
        "size_bytes": result.size_bytes,
        "parameters": result.parameters,
        "hf_checkpoint": HF_DIR if result.hf_dir else None,
        "sparsity": _sparsity_summary(result.sparsity),
        "quality": result.quality.to_dict() | {"reference_perplexity": result.reference_perplexity},
        "calibration": calibration,
    }


def _sparsity_summary(sparsity: dict[str, Any] | None) -> dict[str, Any] | None:
    if sparsity is None:
        return None
    keys = ("spec", "overall_sparsity", "seconds", "peak_rss_bytes", "rss_before_bytes", "calibration_tokens", "gguf")
    return {k: sparsity[k] for k in keys} | {"details": SPARSITY_FILE}
