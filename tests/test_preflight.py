"""The memory preflight: estimates from shapes alone (no weights), machine limits, refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from edgeprune.config import CalibrationSettings, load_profile
from edgeprune.errors import EdgepruneError
from edgeprune.footprint import (
    CANDIDATES,
    EMBEDDING_READ,
    LAYER,
    LAYER_FP32,
    QUICK_COPY,
    QUICK_WEIGHTS,
    RECOVERY_MODEL,
    RECOVERY_OPTIMIZER,
    RUNTIME_WEIGHTS,
    WHOLE_MODEL,
    Work,
    estimate,
)
from edgeprune.limits import (
    MEMORY_LIMIT_ENV,
    Disk,
    GiB,
    Limits,
    MiB,
    cgroup_headroom,
    cgroup_memory_dir,
    machine_limits,
    meminfo_available,
    parse_size,
)
from edgeprune.models.weights import WeightStore
from edgeprune.preflight import check, fitting_estimate, summary


class ShapeStore(WeightStore):
    """A Llama checkpoint's table of contents without its weights: shapes and dtypes only."""

    def __init__(self, config: LlamaConfig, dtype: torch.dtype = torch.bfloat16) -> None:
        self.config, self.dtype = config, dtype
        h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
        d = config.head_dim
        q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
        self._shapes = {"model.embed_tokens.weight": (v, h)}
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            self._shapes |= {p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (q, h),
                             p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                             p + "self_attn.o_proj.weight": (h, q), p + "post_attention_layernorm.weight": (h,),
                             p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                             p + "mlp.down_proj.weight": (h, f)}
        self._shapes["model.norm.weight"] = (h,)
        if not config.tie_word_embeddings:
            self._shapes["lm_head.weight"] = (v, h)

    def names(self):
        return list(self._shapes)

    def shape(self, name):
        return self._shapes[name]

    def stored_dtype(self, name):
        return self.dtype

    def read(self, name):
        raise AssertionError("the preflight must not read weights")


def llama_31_8b(**overrides) -> LlamaConfig:
    """Llama-3.1-8B's published shape."""
    return LlamaConfig(**({"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                           "head_dim": 128, "tie_word_embeddings": False} | overrides))


QUICK = load_profile("quick")


def build_estimate(config: LlamaConfig, profile=QUICK, machine="x86_64", **work):
    work = Work.for_build(profile.search, self_generated=True, **work)
    return estimate(ShapeStore(config), profile.calibration, work, machine=machine)


def limits(memory: int, free: int = 1 << 50, source: str = "test", path: Path = Path("/cache")) -> Limits:
    return Limits(memory, source, Disk(path, free, 1))


def test_parameters_of_the_8b_shape():
    assert ShapeStore(llama_31_8b()).parameters == 8_030_261_248  # as published: 8.03B


def test_peak_grows_with_one_layer_not_with_the_number_of_layers():
    shallow, deep = build_estimate(llama_31_8b(num_hidden_layers=16)), build_estimate(llama_31_8b())
    for phase_shallow, phase_deep in zip(shallow.phases, deep.phases, strict=True):
        # Twice the layers: the torch side differs only by small per-layer terms (KV cache, importance
        # matrix); only what llama.cpp holds of a whole quantized model grows with it.
        deep_total = phase_deep.total - phase_deep.ram.get(RUNTIME_WEIGHTS, 0) - phase_deep.ram.get(QUICK_WEIGHTS, 0)
        shallow_total = (phase_shallow.total - phase_shallow.ram.get(RUNTIME_WEIGHTS, 0)
                         - phase_shallow.ram.get(QUICK_WEIGHTS, 0))
        assert abs(deep_total - shallow_total) < 128 * MiB, phase_deep.name  # KV caches grow most
    # Disk grows with the model: candidates and the intermediate GGUF are whole models.
    assert deep.disk > 1.6 * shallow.disk
    # A layer twice as wide weighs in every layer-by-layer phase.
    wide = build_estimate(llama_31_8b(num_hidden_layers=16, intermediate_size=2 * 14336))
    narrow = {p.name: p.total for p in shallow.phases}
    layerwise = [p for p in wide.phases if LAYER in p.ram]
    assert len(layerwise) == 3 and all(p.total > narrow[p.name] + 400 * MiB for p in layerwise)


def test_8b_quick_profile_fits_in_8_gib():
    e = build_estimate(llama_31_8b())
    assert 1 * GiB < e.peak_ram < 8 * GiB, e.to_dict()
    check(e, limits(8 * GiB))  # does not raise
    # What llama.cpp holds is the peak: a whole Q4_K_M candidate, or the quantizer's buffers of the
    # largest tensor (the 128256 x 4096 embedding).
    assert e.peak.name in ("candidate quality in llama.cpp", "quantization in llama.cpp")
    # 10 Q4_K_M candidates of 8B are ~4.9 GB each on disk.
    assert 40e9 < e.cache_disk[CANDIDATES] < 55e9


def test_a_build_short_of_disk_removes_judged_candidates_instead_of_refusing():
    store, work = ShapeStore(llama_31_8b()), Work.for_build(QUICK.search, self_generated=True)
    roomy = fitting_estimate(store, QUICK.calibration, work, limits(8 * GiB, free=100 * GiB))
    assert not roomy.evicts and roomy.cache_disk[CANDIDATES] > 40e9 and QUICK_COPY in roomy.cache_disk
    # This machine's case: about 39 GiB free.
    tight = fitting_estimate(store, QUICK.calibration, work, limits(8 * GiB, free=39 * GiB))
    assert tight.evicts and tight.to_dict()["evicts_candidates"]
    assert tight.cache_disk[CANDIDATES] == 3 * roomy.cache_disk[CANDIDATES] // 10
    assert QUICK_COPY not in tight.cache_disk  # removed once the calibration text is sampled
    check(tight, limits(8 * GiB, free=39 * GiB))
    assert tight.phases == roomy.phases  # memory is the same either way
    # Short even then: refused, naming the disk, and not pointing at max_candidates (it would not help).
    with pytest.raises(EdgepruneError, match="of disk") as e:
        check(fitting_estimate(store, QUICK.calibration, work, limits(8 * GiB, free=20 * GiB)),
              limits(8 * GiB, free=20 * GiB))
    assert "max_candidates" not in str(e.value) and "--cache-dir" in str(e.value)
    # A prune keeps one candidate: nothing to remove.
    prune = Work.for_prune(quant="Q4_K_M", imatrix=True, self_generated=True)
    assert not fitting_estimate(store, QUICK.calibration, prune, limits(8 * GiB, free=GiB)).evicts


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_a_model_llama_cpp_decodes_is_resident_whole(machine):
    """Repacked into anonymous memory or read through the mapping, a decoded model's weights stay
    resident (a memory cgroup charges page cache too): an 8B Q8_0 quick copy does not fit 8 GiB."""
    e = build_estimate(llama_31_8b(), machine=machine)
    quality = next(p for p in e.phases if p.name == "candidate quality in llama.cpp")
    assert 4.4e9 < quality.ram[RUNTIME_WEIGHTS] < 5.2e9
    work = dataclasses.replace(Work.for_build(QUICK.search, self_generated=True), quick_quant="Q8_0")
    q8 = estimate(ShapeStore(llama_31_8b()), QUICK.calibration, work, machine=machine)
    assert q8.peak.name == "self-generated calibration text in llama.cpp" and q8.peak_ram > 8 * GiB
    with pytest.raises(EdgepruneError, match=r"give calibration text \(--calib FILE or hf:NAME\)"):
        check(q8, limits(8 * GiB))
    generation = next(p for p in e.phases if p.name == "self-generated calibration text in llama.cpp")
    assert generation.total < 8 * GiB  # the default Q4_0 copy fits


def test_whole_model_gradient_method_is_refused_naming_the_knob():
    profile = QUICK.model_copy(update={"search": QUICK.search.model_copy(update={"width_method": "taylor1"})})
    e = build_estimate(llama_31_8b(), profile)
    assert e.peak.name == "importance on the whole model, with gradients"
    assert e.peak.ram[WHOLE_MODEL] == 8_030_261_248 * 4
    with pytest.raises(EdgepruneError) as err:
        check(e, limits(8 * GiB, source=f"{MEMORY_LIMIT_ENV}=8GiB"))
    message = str(err.value)
    assert message.count(". ") == 0 and message.endswith(".")
    assert "8.0 GiB is available" in message and "importance on the whole model, with gradients" in message
    assert "depth_method and width_method run layer by layer" in message and "wanda-sp" in message

    prune = estimate(ShapeStore(llama_31_8b()), QUICK.calibration,
                     Work.for_prune(quant="Q4_K_M", imatrix=True, self_generated=True, structured="taylor2"))
    with pytest.raises(EdgepruneError, match=r"--method .*wanda-sp"):
        check(prune, limits(8 * GiB))


def test_activations_are_refused_naming_calibration_flags():
    calib = CalibrationSettings(samples=4096, heldout_samples=4, seq_len=4096)
    e = estimate(ShapeStore(llama_31_8b()), calib, Work.for_prune(quant="Q4_K_M", imatrix=True, self_generated=False))
    # Beyond the activation budget, activations spill to disk rather than grow in RAM.
    assert e.cache_disk["spilled activations"] > 200 * GiB
    with pytest.raises(EdgepruneError, match=r"of disk in /cache .*--cache-dir .*--calib-samples, --seq-len"):
        check(e, limits(64 * GiB, free=100 * GiB))


def test_long_windows_are_refused_naming_seq_len():
    calib = CalibrationSettings(samples=8, heldout_samples=4, seq_len=4096)
    e = estimate(ShapeStore(llama_31_8b()), calib, Work.for_prune(quant="Q4_K_M", imatrix=True, self_generated=False))
    # Logits of a 4096-token window over a 128256-token vocabulary are 2 GiB each.
    assert e.peak.name == "candidate quality in llama.cpp"
    with pytest.raises(EdgepruneError, match=r"--seq-len"):
        check(e, limits(8 * GiB))


def test_a_model_too_big_for_any_setting_says_so():
    with pytest.raises(EdgepruneError, match=r"no setting lowers it, so it takes a machine with more memory or a"):
        check(build_estimate(llama_31_8b()), limits(2 * GiB, source=f"{MEMORY_LIMIT_ENV}=2GiB"))


def test_disk_refusal_names_the_cache_dir(tmp_path):
    e = build_estimate(llama_31_8b())
    with pytest.raises(EdgepruneError) as err:
        check(e, limits(64 * GiB, free=10 * GiB, path=tmp_path / "cache"))
    message = str(err.value)
    assert f"of disk in {tmp_path / 'cache'}" in message and "--cache-dir" in message
    assert "max_candidates" in message  # the candidates are the largest part
    assert "already holds" not in message
    # A resumed build: the cache holds finished stages, perhaps part of what the estimate counts.
    entry = tmp_path / "cache" / "stages" / "candidate-model" / "0123"
    entry.mkdir(parents=True)
    (entry / "model.gguf").write_bytes(b"\0" * (3 << 20))
    with pytest.raises(EdgepruneError) as err:
        check(e, limits(64 * GiB, free=10 * GiB, path=tmp_path / "cache"))
    assert str(err.value).endswith("; the cache already holds 3 MiB of finished stages, and if they are this "
                                   "job's (a resumed run), EDGEPRUNE_PREFLIGHT=warn goes on.")


def test_output_on_another_disk_is_checked_there(tmp_path):
    e = estimate(ShapeStore(llama_31_8b()), QUICK.calibration,
                 Work.for_prune(quant="Q4_K_M", imatrix=True, self_generated=True, hf_checkpoint=True))
    cache, out = Disk(tmp_path / "c", 1 << 50, 1), Disk(tmp_path / "o", 5 * GiB, 2)
    with pytest.raises(EdgepruneError, match=rf"of disk in {tmp_path / 'o'} .*--output-dir"):
        check(e, Limits(64 * GiB, "test", cache, out))
    check(e, Limits(64 * GiB, "test", cache, Disk(tmp_path / "o", 40 * GiB, 2)))


def test_summary_is_one_line():
    e = build_estimate(llama_31_8b())
    line = summary(e, limits(22 * GiB, free=80 * GiB, path=Path.home() / ".cache" / "edgeprune"))
    assert line.startswith("memory preflight: peak RAM ≈ ") and "of 22.0 GiB available" in line
    assert "of 80.0 GiB free in ~/.cache/edgeprune" in line and "\n" not in line


def test_a_store_without_row_reads_reads_the_whole_embedding():
    """A store stored as fp32 (as a quantized GGUF dequantizes) has no fp32 copy of a layer, and one
    without a row reader reads the whole embedding for the first layer's inputs (GGUFStore and
    SafetensorsStore read rows)."""
    from edgeprune.models.weights import GGUFStore, SafetensorsStore

    assert ShapeStore.rows is WeightStore.rows
    assert GGUFStore.rows is not WeightStore.rows and SafetensorsStore.rows is not WeightStore.rows
    smollm = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    work = Work.for_build(QUICK.search, self_generated=True)
    e = estimate(ShapeStore(smollm, torch.float32), QUICK.calibration, work)
    first = next(p for p in e.phases if p.name == "first layer's inputs")
    assert first.ram[EMBEDDING_READ] == 49152 * 576 * 4
    layerwise = next(p for p in e.phases if p.name == "importance, layer by layer")
    assert layerwise.ram[LAYER_FP32] == 0
    assert layerwise.ram[LAYER] == 3_540_096 * 4  # one layer's parameters


def test_a_safetensors_store_reads_embedding_rows(tmp_path):
    from conftest import tiny_llama
    from edgeprune.models.reference import weight_files
    from edgeprune.models.weights import SafetensorsStore

    directory = tmp_path / "hf"
    tiny_llama(tied=False, vocab=512).save_pretrained(directory)
    config = LlamaConfig.from_pretrained(directory)
    store = SafetensorsStore(weight_files(directory), config)
    e = estimate(store, QUICK.calibration, Work.for_build(QUICK.search, self_generated=True))
    first = next(p for p in e.phases if p.name == "first layer's inputs")
    tokens = QUICK.calibration.samples * QUICK.calibration.seq_len
    assert first.ram[EMBEDDING_READ] == tokens * config.hidden_size * 4 * 2
    assert e.parameters == sum(p.numel() for p in tiny_params(directory))


def tiny_params(directory: Path):
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors").values()


# --- limits ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("8GiB", 8 * GiB), ("8G", 8 * GiB), ("8g", 8 * GiB), ("8GB", 8 * 10**9), ("7.5GiB", int(7.5 * GiB)),
    ("512MiB", 512 * MiB), ("512 MiB", 512 * MiB), ("1073741824", GiB), ("2T", 2 << 40),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "eight", "8 GiBs", "-1G", "0", "8XB"])
def test_parse_size_refuses_in_one_sentence(text):
    with pytest.raises(EdgepruneError, match=rf"^{MEMORY_LIMIT_ENV}=.* is not a size: write it as 8GiB"):
        parse_size(text)


def test_meminfo():
    assert meminfo_available("MemTotal: 100 kB\nMemFree: 10 kB\nMemAvailable:   24138300 kB\n") == 24138300 * 1024
    assert meminfo_available("MemTotal: 100 kB\n") is None


def _cgroup_v1(root: Path, path: str, limit: int, usage: int, inactive: int) -> Path:
    d = root / path.lstrip("/")
    d.mkdir(parents=True, exist_ok=True)
    (d / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (d / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (d / "memory.stat").write_text(f"cache 100\nrss 200\ninactive_file 1\ntotal_inactive_file {inactive}\n")
    return d


V1_MOUNTS = """31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / {mem} rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_cgroup_v1_limit_minus_usage_tightest_level(tmp_path):
    mem = tmp_path / "memory"
    unlimited = 9223372036854771712
    _cgroup_v1(mem, "/", unlimited, 20 * GiB, 0)
    _cgroup_v1(mem, "/jobs", 12 * GiB, 5 * GiB, 1 * GiB)  # headroom 8 GiB: inactive cache is reclaimable
    _cgroup_v1(mem, "/jobs/build", unlimited, 3 * GiB, 0)
    cgroup = "9:name=systemd:/\n4:memory:/jobs/build\n3:cpuset:/\n0::/\n"
    found = cgroup_memory_dir(cgroup, V1_MOUNTS.format(mem=mem))
    assert found == (mem / "jobs" / "build", mem, 1)
    assert cgroup_headroom(*found) == (8 * GiB, 12 * GiB)
    # The process's own group set tighter: its limit wins.
    _cgroup_v1(mem, "/jobs/build", 4 * GiB, 3 * GiB, 0)
    assert cgroup_headroom(*found) == (1 * GiB, 4 * GiB)


def test_cgroup_v1_without_limits(tmp_path):
    mem = tmp_path / "memory"
    _cgroup_v1(mem, "/", 9223372036854771712, GiB, 0)
    _cgroup_v1(mem, "/a", 9223372036854771712, GiB, 0)
    found = cgroup_memory_dir("4:memory:/a\n", V1_MOUNTS.format(mem=mem))
    assert cgroup_headroom(*found) is None


def test_cgroup_v1_container_mount_of_its_own_group(tmp_path):
    """In a container the mount's root is the container's own group: /proc/self/cgroup names the
    full path, the directory is the mount point itself."""
    mem = tmp_path / "memory"
    _cgroup_v1(mem, "/", 6 * GiB, 2 * GiB, 0)
    mounts = f"35 31 0:32 /docker/abc {mem} rw,relatime - cgroup cgroup rw,memory\n"
    found = cgroup_memory_dir("4:memory:/docker/abc\n", mounts)
    assert found == (mem, mem, 1)
    assert cgroup_headroom(*found) == (4 * GiB, 6 * GiB)


def test_cgroup_v2(tmp_path):
    root = tmp_path / "unified"
    group = root / "user.slice" / "job"
    group.mkdir(parents=True)
    (root / "memory.stat").write_text("anon 1\n")
    (group / "memory.max").write_text("8589934592\n")
    (group / "memory.current").write_text(f"{3 * GiB}\n")
    (group / "memory.stat").write_text(f"anon 100\ninactive_file {GiB}\n")
    (root / "user.slice" / "memory.max").write_text("max\n")
    mounts = f"30 23 0:27 / {root} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    found = cgroup_memory_dir("0::/user.slice/job\n", mounts)
    assert found == (group, root, 2)
    assert cgroup_headroom(*found) == (6 * GiB, 8 * GiB)


def test_machine_limits_reads_this_machine_and_the_override(tmp_path):
    real = machine_limits(tmp_path / "not" / "yet")
    assert real.memory > 0 and real.cache.free > 0 and real.cache.path == tmp_path / "not" / "yet"
    capped = machine_limits(tmp_path, tmp_path, env={MEMORY_LIMIT_ENV: "1GiB"})
    assert capped.memory == GiB and capped.memory_source == f"{MEMORY_LIMIT_ENV}=1GiB"
    assert capped.output is not None and capped.output.device == capped.cache.device
    with pytest.raises(EdgepruneError, match=MEMORY_LIMIT_ENV):
        machine_limits(tmp_path, env={MEMORY_LIMIT_ENV: "lots"})


def test_machine_limits_from_a_fake_proc(tmp_path):
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemAvailable:   20971520 kB\n")  # 20 GiB
    mem = tmp_path / "memory"
    _cgroup_v1(mem, "/", 9223372036854771712, GiB, 0)
    _cgroup_v1(mem, "/job", 8 * GiB, 2 * GiB, 0)
    (proc / "self" / "cgroup").write_text("4:memory:/job\n")
    (proc / "self" / "mountinfo").write_text(V1_MOUNTS.format(mem=mem))
    found = machine_limits(tmp_path, proc=proc, env={})
    # 6 GiB of headroom, plus what this process already holds (counted in the estimate's baseline).
    assert 6 * GiB <= found.memory < 6 * GiB + 2 * GiB
    assert found.memory_source == "memory cgroup /job, limit 8.0 GiB"


def test_recovery_holds_the_whole_model_and_full_fine_tuning_its_optimizer_and_an_8b_is_refused():
    store = ShapeStore(llama_31_8b())
    plain = Work.for_prune(quant="Q4_K_M", imatrix=True, self_generated=False)
    lora = estimate(store, QUICK.calibration, dataclasses.replace(plain, recovery="lora"))
    full = estimate(store, QUICK.calibration, dataclasses.replace(plain, recovery="full"))
    assert lora.peak.name == "recovery fine-tuning (lora) of the whole pruned model"
    assert lora.peak.ram[RECOVERY_MODEL] == 8_030_261_248 * 2  # the bf16 base, frozen as stored
    assert full.peak.ram[RECOVERY_MODEL] == 8_030_261_248 * 4
    assert full.peak.ram[RECOVERY_OPTIMIZER] > 3 * 6e9 * 4 and lora.peak.ram[RECOVERY_OPTIMIZER] == 0
    assert full.peak.total - lora.peak.total == full.peak.ram[RECOVERY_OPTIMIZER] + 8_030_261_248 * 2
    assert estimate(store, QUICK.calibration, plain).peak.total < lora.peak.total
    with pytest.raises(EdgepruneError) as err:
        check(full, limits(24 * GiB))
    message = str(err.value)
    assert "recovery fine-tuning (full)" in message and "--recover-method lora" in message
    assert message.count(". ") == 0 and message.endswith(".")


def test_recovery_pace_refuses_an_8b_on_a_cpu_naming_the_estimate_and_what_to_do(tmp_path):
    from edgeprune.config import RecoverySettings
    from edgeprune.recover.pace import MIN_TOKENS, Pace, check_pace, flops_per_token, recovery_pace

    store = ShapeStore(llama_31_8b())
    lora, full = flops_per_token(store, "lora"), flops_per_token(store, "full")
    decoder = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096)
    assert lora == 4 * decoder + 4 * 128256 * 4096 and full - lora == 2 * decoder
    settings = RecoverySettings(minutes=30)
    slow = Pace("cpu", lora, tokens_per_s=3.0)  # about what two cores reach on an 8B
    with pytest.raises(EdgepruneError) as err:
        check_pace(slow, settings, store.parameters, "--no-recover")
    message = str(err.value)
    assert message.startswith("Recovery of this 8.0B-parameter model would train on about 5k tokens in 30 minutes")
    assert f"--recover-minutes {MIN_TOKENS / 3 / 60:.0f} or more" in message and message.endswith("or --no-recover.")
    check_pace(slow, RecoverySettings(minutes=30, max_steps=10), store.parameters, "--no-recover")  # steps chosen
    check_pace(Pace("cuda", lora, None), settings, store.parameters, "--no-recover")
    check_pace(Pace("cpu", lora, MIN_TOKENS / 1800), settings, store.parameters, "--no-recover")
    # This CPU's estimate, from its measured matmul rate: an 8B trains a few tokens a second on one thread.
    here = recovery_pace(store, settings, 1, tmp_path)
    assert here.device == "cpu" and 0.05 < here.tokens_per_s < 100
