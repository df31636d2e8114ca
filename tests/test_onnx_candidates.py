"""ONNX candidates through the build's own stages: written from the reference with a plan, their
quality measured on the ONNX file itself with the held-out KLD / perplexity / top-1 of GGUF
candidates, against the same reference log-probs."""

from __future__ import annotations

import pytest

from conftest import calibration_text, save_tiny_hf
from edgeprune.config import CalibrationSettings
from edgeprune.data import from_file
from edgeprune.errors import EdgepruneError
from edgeprune.models import load_reference, resolve_source
from edgeprune.pipeline import CandidateModel, CandidateQuality, reference_logprobs
from edgeprune.prune import Plan
from edgeprune.quantize import QuantSpec
from edgeprune.runtimes.llamacpp.gguf_format import GGUF
from edgeprune.runtimes.onnx.onnx_format import ONNX
from edgeprune.stages import StageRunner


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx-candidates")
    reference = load_reference(resolve_source(str(save_tiny_hf(tmp / "tiny", vocab=512))), tmp / "cache")
    runner = StageRunner(tmp / "cache" / "stages")
    calib = tmp / "calib.txt"
    calib.write_text(calibration_text())
    splits = from_file(calib, reference.tokenizer, CalibrationSettings(samples=16, heldout_samples=4, seq_len=64))
    ref_logps, _ = reference_logprobs(reference, splits, runner)
    return reference, runner, splits, ref_logps


def measure(setup, plan: Plan, quant: QuantSpec, fmt=ONNX):
    reference, runner, splits, ref_logps = setup
    stage = CandidateModel(reference, plan, quant, splits, threads=2, fmt=fmt)
    model = runner.run(stage)
    quality = runner.run(CandidateQuality(stage.file(model), model.key, splits, ref_logps, threads=2, fmt=fmt))
    return stage.file(model), model.result, quality.result


def test_an_unpruned_fp32_file_has_the_references_distribution(setup):
    path, model, quality = measure(setup, Plan(), QuantSpec("F32", imatrix=False))
    assert path.name == "model.onnx" and (path.parent / "model.onnx.data").is_file()
    assert model["size_bytes"] == path.stat().st_size + (path.parent / "model.onnx.data").stat().st_size
    assert quality["mean_kld"] < 1e-6 and quality["top1_agreement"] == 1.0


def test_a_calibrated_int4_file_is_closer_to_the_reference_than_a_rounded_one(setup):
    plan = Plan(drop_layers=(2,))
    _, _, pruned = measure(setup, plan, QuantSpec("F32", imatrix=False))
    _, rounded_model, rounded = measure(setup, plan, QuantSpec("INT4", imatrix=False))
    _, _, calibrated = measure(setup, plan, QuantSpec("INT4", imatrix=True))
    assert pruned["mean_kld"] < calibrated["mean_kld"] < rounded["mean_kld"], (pruned, calibrated, rounded)
    _, gguf_model, _ = measure(setup, plan, QuantSpec("Q4_0", imatrix=False), fmt=GGUF)
    # A 512-token vocabulary: the fp16 embedding and int8 head weigh more than the decoder here.
    assert rounded_model["size_bytes"] < 2 * gguf_model["size_bytes"]


def test_llama_cpp_types_and_recipes_are_refused_for_onnx(setup):
    with pytest.raises(EdgepruneError, match="ONNX Runtime candidates are quantized as one of F32, INT8, INT4"):
        measure(setup, Plan(), QuantSpec("Q4_K_M", imatrix=False))
    with pytest.raises(EdgepruneError, match="names llama.cpp's tensor types"):
        measure(setup, Plan(), QuantSpec("INT4", recipe="q4_0-narrow", imatrix=False))
