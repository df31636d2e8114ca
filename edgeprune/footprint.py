"""What a build (or a prune) holds at its peak, RAM and disk, estimated from the model's shapes and
the settings before any work: the memory model the preflight (`preflight.py`) checks against the
machine.

The memory model is the bounded-memory pipeline's. Weights stay memory-mapped where they are
stored (page cache: reclaimable, not counted); every torch pass holds one decoder layer (stored
dtype + fp32 copy, + a sliced copy when a plan cuts widths) and the calibration activations
entering and leaving it (capped by the activation budget, the rest spilled to disk); the output
head is read and converted to fp32 a block of rows at a time; llama.cpp works in child processes.
The peak is the largest phase (each phase summing what its processes hold at once), not the sum of
everything. What is only an order of magnitude is said where its constant is defined; `estimate` is
pure arithmetic over shapes, so the lead's measured peak RSS can correct the constants without
touching callers.
"""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, Any, Literal

from edgeprune.model_bytes import StoreShapes, forward_bytes, kv_bytes, quantized_bytes, runtime_bytes, store_shapes
from edgeprune.models.streamed import DEFAULT_ACTIVATION_BUDGET, HEAD_CHUNK_BYTES

if TYPE_CHECKING:
    from edgeprune.config import CalibrationSettings, SearchSettings
    from edgeprune.models.weights import WeightStore

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# Calibration activations kept in RAM (beyond: spilled to disk); the head's fp32 conversion chunk.
ACTIVATION_BUDGET, HEAD_CHUNK = DEFAULT_ACTIVATION_BUDGET, HEAD_CHUNK_BYTES
BATCH_WINDOWS = 4  # windows per torch forward (analysis, imatrix, sparse: sequential.py's batch_size)
LOGIT_COPIES = 3  # logits, log-softmax and one temporary of a window, fp32

# Measured on this project's machines (Python 3.11, torch 2.x CPU, transformers), RSS after import
# and a first forward: edgeprune.build + pipeline imported, 431 MiB (264 anonymous).
PARENT_BASELINE = 450 * MiB
# A fast tokenizer in memory: 29 MiB for SmolLM2's 49152 tokens (~600 B/token), rounded up.
TOKENIZER_BYTES_PER_TOKEN = 1 * KiB
# llama.cpp children (runtimes/isolated.py: a fresh interpreter): the quantizer's imports pull in
# torch (292 MiB RSS measured), the logits/generation worker's do not (49 MiB).
QUANTIZE_CHILD_BASELINE = 300 * MiB
RUNTIME_CHILD_BASELINE = 64 * MiB
# llama_model_quantize reads tensors through mmap and keeps two grow-only buffers sized by the
# largest tensor: its fp32 conversion (4 B/element, unless the input is F32) and the output (4 B).
QUANTIZE_WORK_BYTES = 4
# Self-generated calibration through llama.cpp: sequences decoded at once, tokens of a chat prompt.
GENERATION_BATCH = 8
PROMPT_TOKENS = 64
# The quick quantized copy of an HF reference that generates calibration text: Q4_0 quantizes
# fastest after Q8_0 and is half its size, so an 8B copy (4.3 GB) stays resident in 8 GiB.
QUICK_QUANT = "Q4_0"
# A model llama.cpp decodes is read into anonymous memory, never mapped (llamacpp/settings.py
# LOAD_MODE), and must stay resident anyway: mapped, an 8B Q8_0 copy (8.5 GB) decoded inside an
# 8 GiB cgroup re-read ~500 MB/s from disk at every token. So every llama.cpp phase counts the
# whole quantized file.
# llama.cpp's logical batch: prompt tokens evaluated per graph when logits of every token are not needed.
RUNTIME_BATCH = 512
BINARIES = 64 * MiB  # the bundle's cross-compiled llama.cpp binaries


Command = Literal["build", "prune"]

# Components (keys of a phase's `ram` and of the disk dicts), and what lowers each one.
BASELINE = "python + torch + transformers"
TOKENIZER = "tokenizer"
LAYER = "one decoder layer as stored"
LAYER_FP32 = "one decoder layer in fp32"
LAYER_SLICED = "one sliced decoder layer"
ACTIVATIONS = "calibration activations"
HELDOUT_ACTIVATIONS = "held-out activations"
FORWARD = "one batch through a layer"
STATISTICS = "column statistics"
EMBEDDING_READ = "embedding read for the first layer's inputs"
HEAD = "output head block as stored"
HEAD_FP32 = "output head fp32 chunk"
WINDOW_LOGITS = "one window's logits"
WHOLE_MODEL = "whole model in fp32"
GRADIENTS = "gradients and their accumulators"
BACKWARD = "activations kept for the backward pass"
HESSIANS = "SparseGPT Hessians of one layer"
RECOVERY_MODEL = "the pruned model for recovery (LoRA: in its stored dtype; full: fp32)"
RECOVERY_OPTIMIZER = "recovery's gradients and Adam moments"
RECOVERY_ACTIVATIONS = "recovery's activations of a batch"
OBS_WORK = "SparseGPT work on the widest linear"
IMATRIX = "importance matrix"
TENSOR = "largest tensor as stored"
TENSOR_F16 = "largest tensor in F16"
TENSOR_FP32 = "largest tensor fp32 chunk"
QUANTIZE_CHILD = "llama.cpp quantizer process"
QUANTIZE_BUFFERS = "quantizer buffers of the largest tensor"
RUNTIME_CHILD = "llama.cpp process"
RUNTIME_WEIGHTS = "model weights resident in llama.cpp"
QUICK_WEIGHTS = "quick copy's weights resident in llama.cpp"
KV_CACHE = "KV cache"
RUNTIME_LOGITS = "llama.cpp logits and compute buffers"
RECEIVED_LOGITS = "logits received from llama.cpp"
# disk
CANDIDATES = "quantized candidates"
# A build short of disk keeps three candidates' files: the baseline, the best, the one being measured.
KEPT_WHEN_EVICTING = 3
INTERMEDIATE = "intermediate F16/BF16 GGUF"
QUICK_COPY = "quick quantized copy for calibration text"
REFERENCE_LOGPROBS = "reference log-probs of held-out windows"
SPILL = "spilled activations"
SPARSE_WEIGHTS = "sparse decoder weights"
OUTPUT_MODEL = "output GGUF"
HF_CHECKPOINT = "HF checkpoint"
BUNDLE_BINARIES = "llama.cpp binaries"

KnobKind = Literal["calibration", "heldout", "seq_len", "method", "sparse", "self_generated", "candidates", "recovery"]
KNOBS: dict[str, KnobKind] = {
    ACTIVATIONS: "calibration", FORWARD: "seq_len", STATISTICS: "seq_len", HELDOUT_ACTIVATIONS: "heldout",
    WINDOW_LOGITS: "seq_len", WHOLE_MODEL: "method", GRADIENTS: "method", BACKWARD: "method",
    HESSIANS: "sparse", OBS_WORK: "sparse", KV_CACHE: "seq_len", RUNTIME_LOGITS: "seq_len",
    RECEIVED_LOGITS: "seq_len", QUICK_WEIGHTS: "self_generated",
    CANDIDATES: "candidates", QUICK_COPY: "self_generated", REFERENCE_LOGPROBS: "heldout", SPILL: "calibration",
    RECOVERY_MODEL: "recovery", RECOVERY_OPTIMIZER: "recovery", RECOVERY_ACTIVATIONS: "recovery",
}


@dataclass(frozen=True)
class Work:
    """What a command will do, in the terms the memory model needs; `for_build` / `for_prune` fill it.

    Method names: `layer_methods` from LAYER_IMPORTANCE, `unit_methods` from UNIT_IMPORTANCE,
    `sparse` from SPARSE_METHODS. `candidates`: quantized candidates kept in the stage cache at once;
    `evict`: a build removes each judged candidate's file (`bounded`).
    `slices`: candidates cut widths (a sliced copy of each layer in the candidate passes).
    `bench_tokens`: prompt + answer tokens of a benchmark run on this machine (0: none, or on an
    ssh device). `quick_quant`: the type of the reference's copy that generates calibration text.
    """

    command: Command = "build"
    layer_methods: tuple[str, ...] = ()
    unit_methods: tuple[str, ...] = ()
    quant: str = "Q4_K_M"
    imatrix: bool = True
    candidates: int = 1
    sparse: str | None = None
    slices: bool = True
    self_generated: bool = True
    bench_tokens: int = 0
    hf_checkpoint: bool = False
    quick_quant: str = QUICK_QUANT
    evict: bool = False
    recovery: str | None = None  # recovery fine-tuning's method (lora | full), None: no recovery
    recovery_batch: int = 4  # windows per training step

    @classmethod
    def for_build(cls, search: SearchSettings, *, self_generated: bool, sparse: str | None = None,
                  bench_tokens: int = 0) -> Work:
        """A build: the profile's search (its depth and width methods, quant, max_candidates)."""
        layer, unit = search_methods(search)
        return cls("build", (layer,), (unit,), search.quant, search.imatrix, search.max_candidates, sparse,
                   slices=search.max_head_fraction > 0 or search.max_ffn_fraction > 0,
                   self_generated=self_generated, bench_tokens=bench_tokens)

    @classmethod
    def for_prune(cls, *, quant: str, imatrix: bool, self_generated: bool, structured: str | None = None,
                  plan_search: SearchSettings | None = None, slices: bool = True, sparse: str | None = None,
                  hf_checkpoint: bool = False) -> Work:
        """A prune: a structured method's name (it chooses the plan; width methods slice, depth methods
        do not), or the profile's search settings when a plan file needs importance (counts of heads or
        channels); `slices`: the plan file cuts widths."""
        from edgeprune.structured.methods import STRUCTURED_METHODS, DepthMethod

        layers: tuple[str, ...] = ()
        units: tuple[str, ...] = ()
        if structured is not None:
            method = STRUCTURED_METHODS[structured]
            if isinstance(method, DepthMethod):
                layers, slices = (method.importance,), False
            else:
                units, slices = (method.importance,), True
        elif plan_search is not None:
            layer, unit = search_methods(plan_search)
            layers, units = (layer,), (unit,)
        return cls("prune", layers, units, quant, imatrix, 1, sparse, slices, self_generated, 0, hf_checkpoint)

    def bounded(self) -> Work:
        """The same build keeping only the files it still needs: the baseline, the best candidate
        and the one being measured (search/greedy.py), and no quick copy once calibration is sampled."""
        return dataclasses.replace(self, candidates=min(self.candidates, KEPT_WHEN_EVICTING), evict=True)

    def needs(self) -> set[str]:
        """What the importance analysis captures: states, loss, weights, activations, gradients."""
        from edgeprune.analysis.methods import LAYER_IMPORTANCE, UNIT_IMPORTANCE

        return ({LAYER_IMPORTANCE[m].needs for m in self.layer_methods}
                | {UNIT_IMPORTANCE[m].needs for m in self.unit_methods})


def search_methods(search: SearchSettings) -> tuple[str, str]:
    """The importance methods (layer, unit) behind a profile's depth and width methods."""
    from edgeprune.structured.methods import STRUCTURED_METHODS

    return STRUCTURED_METHODS[search.depth_method].importance, STRUCTURED_METHODS[search.width_method].importance


@dataclass(frozen=True)
class Phase:
    """What the process tree holds at once during one part of the work (bytes by component)."""

    name: str
    ram: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.ram.values())


@dataclass(frozen=True)
class Estimate:
    command: Command
    phases: tuple[Phase, ...]
    cache_disk: dict[str, int]  # in the cache directory, the most it holds at once
    output_disk: dict[str, int]  # in the output directory
    parameters: int = 0
    evicts: bool = False  # the build removes judged candidates' files (Work.bounded)

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    @property
    def peak_ram(self) -> int:
        return self.peak.total

    @property
    def components(self) -> dict[str, int]:
        """The peak phase's breakdown."""
        return dict(self.peak.ram)

    @property
    def disk(self) -> int:
        return sum(self.cache_disk.values()) + sum(self.output_disk.values())

    def to_dict(self) -> dict[str, Any]:
        """For report.json (the report adds the measured peak next to it: `compared`)."""
        return {
            "peak_ram_bytes": self.peak_ram,
            "peak_phase": self.peak.name,
            "components": self.components,
            "phases": {p.name: p.total for p in self.phases},
            "cache_disk_bytes": sum(self.cache_disk.values()),
            "output_disk_bytes": sum(self.output_disk.values()),
            "cache_disk": dict(self.cache_disk),
            "output_disk": dict(self.output_disk),
            "evicts_candidates": self.evicts,
        }


def compared(estimate: Estimate, measured_peak_rss: int | None,
             measured_peak_anon: int | None = None) -> dict[str, Any]:
    """Estimated vs measured peak, for the report."""
    out: dict[str, Any] = {"estimated_peak_bytes": estimate.peak_ram, "estimated_peak_phase": estimate.peak.name,
                           "measured_peak_rss_bytes": measured_peak_rss}
    if measured_peak_anon is not None:
        out["measured_peak_anon_bytes"] = measured_peak_anon
    # Judged by the anonymous peak where known: the plain RSS also counts reclaimable page cache.
    measured = measured_peak_anon or measured_peak_rss
    if measured:
        out["measured_over_estimated"] = round(measured / estimate.peak_ram, 3)
    return out


def estimate(store: WeightStore, calibration: CalibrationSettings, work: Work,
             activation_budget: int = ACTIVATION_BUDGET, machine: str | None = None) -> Estimate:
    """Peak RAM (by phase, with a breakdown by component) and disk of `work` on the model of `store`,
    from shapes and settings alone: no weight is read. `machine`: where llama.cpp runs (platform.machine())."""
    s = store_shapes(store)
    machine = {"arm64": "aarch64", "AMD64": "x86_64"}.get(machine or platform.machine(), machine or platform.machine())
    seq = calibration.seq_len
    needs = work.needs()
    whole = needs & {"loss", "gradients"}
    layerwise = needs - {"loss", "gradients"}
    base = {BASELINE: PARENT_BASELINE, TOKENIZER: s.vocab * TOKENIZER_BYTES_PER_TOKEN}

    def acts(windows: int) -> int:  # inputs and outputs of the current layer, fp32
        return windows * seq * s.hidden * 4 * 2

    calib_acts, heldout_acts = acts(calibration.samples), acts(calibration.heldout_samples)
    layer = {LAYER: s.layer_stored, LAYER_FP32: 0 if s.layer_all_fp32 else s.layer_fp32}
    batch_tokens = min(BATCH_WINDOWS, calibration.samples) * seq
    forward = forward_bytes(s, batch_tokens, min(BATCH_WINDOWS, calibration.samples), seq)
    heldout_forward = forward_bytes(s, min(BATCH_WINDOWS, calibration.heldout_samples) * seq,
                                     min(BATCH_WINDOWS, calibration.heldout_samples), seq)
    # float64 copies ColumnStats makes of a batch's inputs, plus the running sums.
    statistics = batch_tokens * max(s.linear_inputs, default=s.hidden) * 8 + sum(s.linear_inputs) * 8 * 2
    sliced = {LAYER_SLICED: s.layer_fp32} if work.slices else {}

    def resident(quant: str) -> int:
        return quantized_bytes(s.tensors, quant)

    phases: list[Phase] = []
    if work.self_generated:
        n_ctx = GENERATION_BATCH * (PROMPT_TOKENS + seq)
        phases.append(Phase("self-generated calibration text in llama.cpp", base | {
            RUNTIME_CHILD: RUNTIME_CHILD_BASELINE, QUICK_WEIGHTS: resident(work.quick_quant),
            KV_CACHE: kv_bytes(s, n_ctx),
            RUNTIME_LOGITS: runtime_bytes(s, min(n_ctx, RUNTIME_BATCH), n_ctx, GENERATION_BATCH)}))
    embedding = (calibration.samples * seq * s.hidden * s.embedding[1] * 2 if s.reads_rows
                 else s.embedding[0] * s.embedding[1])
    phases.append(Phase("first layer's inputs", base | {EMBEDDING_READ: embedding,
                                                       ACTIVATIONS: min(calib_acts, activation_budget)}))
    if layerwise - {"weights"}:
        phases.append(Phase("importance, layer by layer", base | layer | {
            ACTIVATIONS: min(calib_acts, activation_budget), FORWARD: forward,
            STATISTICS: statistics if "activations" in layerwise else 0}))
    elif layerwise:  # magnitude: weights only
        phases.append(Phase("importance, layer by layer", base | layer))
    if whole:
        phases.append(_whole_model_phase(s, base, calibration, "gradients" in whole))
    phases.append(Phase("reference log-probs, layer by layer", base | layer | {
        HELDOUT_ACTIVATIONS: min(heldout_acts, activation_budget), FORWARD: heldout_forward}))
    head_elements, head_itemsize = s.head
    # The head is read a block of rows at a time (HEAD_CHUNK bytes once in fp32), against the final
    # hidden states of every held-out window.
    phases.append(Phase("reference log-probs, output head", base | {
        HELDOUT_ACTIVATIONS: heldout_acts, HEAD: min(head_elements * head_itemsize, HEAD_CHUNK // 4 * head_itemsize),
        HEAD_FP32: 0 if head_itemsize == 4 else min(head_elements * 4, HEAD_CHUNK),
        WINDOW_LOGITS: seq * s.vocab * 4 * LOGIT_COPIES}))
    if work.sparse is not None:
        phases.append(_sparse_phase(s, base, layer, sliced, min(calib_acts, activation_budget), forward, work.sparse))
    if work.imatrix:
        phases.append(Phase("importance matrix of a candidate", base | layer | sliced | {
            ACTIVATIONS: min(calib_acts, activation_budget), FORWARD: forward,
            IMATRIX: statistics + s.n_layers * sum(s.linear_inputs) * 8}))
    if work.recovery is not None:
        phases.append(_recovery_phase(s, base, seq, work.recovery, work.recovery_batch))
    phases.append(Phase("GGUF export, tensor by tensor", base | {
        TENSOR: s.largest_tensor * s.largest_itemsize, TENSOR_F16: s.largest_tensor * 2,
        TENSOR_FP32: 0 if s.largest_itemsize == 4 else min(s.largest_tensor * 4, HEAD_CHUNK)}))
    phases.append(Phase("quantization in llama.cpp", base | {
        QUANTIZE_CHILD: QUANTIZE_CHILD_BASELINE, QUANTIZE_BUFFERS: s.largest_tensor * QUANTIZE_WORK_BYTES * 2}))
    window = seq * s.vocab * 4
    phases.append(Phase("candidate quality in llama.cpp", base | {
        RECEIVED_LOGITS: window * (2 + LOGIT_COPIES), RUNTIME_CHILD: RUNTIME_CHILD_BASELINE,
        RUNTIME_WEIGHTS: resident(work.quant),
        # llama-cpp-python's `scores` copy and the pickled copy streamed to the parent
        KV_CACHE: kv_bytes(s, seq), RUNTIME_LOGITS: window * 2 + runtime_bytes(s, seq, seq, seq)}))
    if work.bench_tokens:
        phases.append(Phase("benchmark in llama.cpp", base | {
            RUNTIME_CHILD: RUNTIME_CHILD_BASELINE, RUNTIME_WEIGHTS: resident(work.quant),
            KV_CACHE: kv_bytes(s, work.bench_tokens),
            RUNTIME_LOGITS: runtime_bytes(s, min(work.bench_tokens, RUNTIME_BATCH), work.bench_tokens, 1)}))

    cache = {
        CANDIDATES: work.candidates * quantized_bytes(s.tensors, work.quant),
        INTERMEDIATE: sum(prod(shape) * (2 if len(shape) >= 2 else 4) for shape, _ in s.tensors),
        # Evicted after sampling, before any candidate: never beside the candidates and their intermediate.
        QUICK_COPY: quantized_bytes(s.tensors, work.quick_quant) if work.self_generated and not work.evict else 0,
        REFERENCE_LOGPROBS: calibration.heldout_samples * seq * s.vocab * 4,
        SPILL: max(0, max(calib_acts, heldout_acts) - activation_budget),
        SPARSE_WEIGHTS: s.decoder_linear_params * 4 if work.sparse is not None else 0,
    }
    output = {OUTPUT_MODEL: quantized_bytes(s.tensors, work.quant)}
    if work.hf_checkpoint:
        output[HF_CHECKPOINT] = sum(prod(shape) * itemsize for shape, itemsize in s.tensors)
    if work.command == "build":
        output[BUNDLE_BINARIES] = BINARIES
    return Estimate(work.command, tuple(phases), {k: v for k, v in cache.items() if v}, output, s.parameters,
                    work.evict)


def _whole_model_phase(s: StoreShapes, base: dict[str, int], calibration: CalibrationSettings,
                       gradients: bool) -> Phase:
    """Loss and gradient methods run the whole model in torch (whole_model.py)."""
    seq = calibration.seq_len
    ram = base | {WHOLE_MODEL: s.parameters * 4}
    if gradients:
        # dL/dw returned by autograd, and the mean and mean-square accumulators: 3 fp32 copies of the
        # decoder's linears; one window's activations for the backward pass, and its logits.
        ram[GRADIENTS] = 3 * s.decoder_linear_params * 4
        ram[BACKWARD] = (s.n_layers * seq * (10 * s.hidden + 4 * s.ffn) * 4 + s.n_layers * s.n_head * seq * seq * 4 * 2
                         + seq * s.vocab * 4 * LOGIT_COPIES)
    else:
        # Every layer's input and mid-layer residual of a batch, and the batch's logits.
        windows = min(BATCH_WINDOWS, calibration.samples)
        ram[BACKWARD] = (s.n_layers * 2 * windows * seq * s.hidden * 4 + windows * seq * s.vocab * 4 * LOGIT_COPIES)
    return Phase("importance on the whole model, " + ("with gradients" if gradients else "with the loss"), ram)


def _recovery_phase(s: StoreShapes, base: dict[str, int], seq: int, method: str, batch: int) -> Phase:
    """Recovery holds the whole pruned model (recover/student.py), bounded here by the unpruned one:
    LoRA's frozen base in the stored dtype when every tensor shares one 16-bit dtype (its adapters
    are a few MiB), full fine-tuning in fp32 with a gradient and two Adam moments per decoder weight;
    every layer's activations of a batch are kept for the backward pass."""
    narrow = method == "lora" and {itemsize for _, itemsize in s.tensors} == {2}
    ram = base | {RECOVERY_MODEL: s.parameters * (2 if narrow else 4),
                  RECOVERY_OPTIMIZER: 3 * s.decoder_linear_params * 4 if method == "full" else 0}
    ram[RECOVERY_ACTIVATIONS] = batch * (s.n_layers * seq * (10 * s.hidden + 4 * s.ffn) * 4
                                         + s.n_layers * s.n_head * seq * seq * 4 * 2 + seq * s.vocab * 4 * LOGIT_COPIES)
    return Phase(f"recovery fine-tuning ({method}) of the whole pruned model", ram)


def _sparse_phase(s: StoreShapes, base: dict[str, int], layer: dict[str, int], sliced: dict[str, int], activations: int,
                  forward: int, method: str) -> Phase:
    from edgeprune.sparse.methods import needs_calibration

    if not needs_calibration(method):
        return Phase(f"{method}, layer by layer", base | layer | sliced)
    ram = base | layer | sliced | {ACTIVATIONS: activations, FORWARD: forward}
    if method == "sparsegpt":
        # One fp32 Hessian per linear of the layer, gathered in one pass (sparse/sequential.py); pruning
        # the widest clones its Hessian and factors it (~3 in x in fp32 at once) and its weight.
        ram[HESSIANS] = sum(i * i * 4 for i in s.linear_inputs)
        out, inp = max(s.linear_out_in, key=lambda oi: oi[1], default=(s.hidden, s.hidden))
        ram[OBS_WORK] = 3 * inp * inp * 4 + out * inp * 5
    else:
        ram[STATISTICS] = sum(s.linear_inputs) * 8
    return Phase(f"{method}, layer by layer", ram)
