"""Scale: random-weight checkpoints of real shapes, and `prune --plan` under a memory cap below the model's size."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from edgeprune.cgroup import run_limited, unavailable_reason
from edgeprune.memory import evict_page_cache
from edgeprune.models.synthetic import PRESETS, Preset, seed_plan, tensor_chunks, write_safetensors

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def test_presets_have_the_published_sizes_and_hub_sharding():
    sizes = {name: round(p.parameters() / 1e9, 2) for name, p in PRESETS.items()}
    assert sizes == {"llama-3.2-1b": 1.24, "llama-3.2-3b": 3.21, "llama-3.1-8b": 8.03, "synthetic-0.5b": 0.43,
                     "qwen2.5-1.5b": 1.54, "qwen2.5-7b": 7.62, "qwen3-1.7b": 1.72,
                     "gemma3-1b": 1.0}
    shards = {name: [round(sum(2 * math.prod(s) for _, s in shard) / 1e9, 2) for shard in p.shards()]
              for name, p in PRESETS.items()}
    # The hub's files: 2.47 GB; 4.97 + 1.46 GB; 4.98 + 5.00 + 4.92 + 1.17 GB.
    assert shards["llama-3.2-1b"] == [2.47]
    assert shards["llama-3.2-3b"] == [4.97, 1.46]
    assert shards["llama-3.1-8b"] == [4.98, 5.0, 4.92, 1.17]
    assert PRESETS["llama-3.1-8b"].tensors()[-1][0] == "lm_head.weight"  # untied
    assert PRESETS["llama-3.2-1b"].tensors()[-1][0] == "model.norm.weight"  # tied


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_holds_exactly_the_tensors_its_familys_transformers_model_has(tmp_path, name):
    from transformers import AutoConfig

    from edgeprune.families import family_of

    (tmp_path / "config.json").write_text(json.dumps(PRESETS[name].config(1, 2)))
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == PRESETS[name].model_type
    assert family_of(config).tensor_shapes(config) == dict(PRESETS[name].tensors())


def test_safetensors_are_written_as_declared_and_each_tensor_is_its_own_seeded_stream(tmp_path):
    tiny = Preset("tiny", hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=300, tied=False)
    path = tmp_path / "model.safetensors"
    write_safetensors(path, tiny.tensors(), seed=7, std=0.02)
    assert path.stat().st_size > tiny.bf16_bytes()  # header + data
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(name for name, _ in tiny.tensors())
        for name, shape in tiny.tensors():
            t = f.get_tensor(name)
            assert t.dtype == torch.bfloat16 and tuple(t.shape) == shape
        assert torch.equal(f.get_tensor("model.norm.weight"), torch.ones(64, dtype=torch.bfloat16))
        q = f.get_tensor("model.layers.1.self_attn.q_proj.weight").float()
        assert abs(q.std().item() - 0.02) < 0.002 and abs(q.mean().item()) < 0.002
        assert not torch.equal(q, f.get_tensor("model.layers.0.self_attn.q_proj.weight").float())
    # The values depend on the seed and the tensor's name only (not on the shard it lands in).
    again = b"".join(c.tobytes() for c in tensor_chunks("model.layers.1.self_attn.q_proj.weight", (64, 64), seed=7))
    with safe_open(str(path), framework="pt") as f:
        assert again == f.get_tensor("model.layers.1.self_attn.q_proj.weight").view(torch.int16).numpy().tobytes()


def test_seed_plan_removes_the_middle_quarter_and_one_head_per_kv_group():
    assert seed_plan(30, 9, 3) == {"drop_layers": list(range(11, 19)), "all": {"heads": 6}}  # the embedded model's
    assert seed_plan(32, 32, 8) == {"drop_layers": list(range(12, 20)), "all": {"heads": 24}}  # Llama-3.1-8B
    assert seed_plan(16, 32, 8)["drop_layers"] == [6, 7, 8, 9]
    assert seed_plan(4, 4, 4) == {"drop_layers": [1]}


@pytest.mark.slow
def test_the_embedded_tokenizer_is_resized_the_way_llama_3_pads_its_vocabulary(tmp_path):
    import gguf
    from transformers import AutoTokenizer

    from edgeprune.models.synthetic import RESERVED_SPECIAL, write_tokenizer
    from edgeprune.models.tokenizer import TokenizerSpec

    vocab = 49152 + 1000
    bos, eos = write_tokenizer(tmp_path, vocab)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == vocab and (bos, eos) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    text = "The controller reads 12 sensors."
    spec = TokenizerSpec.from_hf(tokenizer, vocab)
    assert spec.pre == "smollm" and len(spec.tokens) == vocab
    fillers = range(49152, vocab - RESERVED_SPECIAL)
    assert {spec.token_types[i] for i in fillers} == {gguf.TokenType.NORMAL}
    assert {spec.token_types[i] for i in range(vocab - RESERVED_SPECIAL, vocab)} == {gguf.TokenType.CONTROL}
    # Text splits as the embedded model's tokenizer splits it; the reserved specials parse as one token.
    from edgeprune.models.synthetic import _embedded_tokenizer

    assert tokenizer(text)["input_ids"] == _embedded_tokenizer()(text)["input_ids"]
    assert tokenizer("<|reserved_special_token_3|>", add_special_tokens=False)["input_ids"] == [vocab - 256 + 3]


# --- End to end under a hard memory cap ---------------------------------------------------------------

CI_MODEL = "synthetic-0.5b"
# 1.1x the bf16 weights (898 MiB): the pipeline before streaming peaked at 4.5 GiB anonymous on this
# model (5.6x). Measured here: 715 MiB anonymous at the peak, while llama.cpp quantizes (the parent's
# Python, torch, transformers and tokenizer, ~330 MiB, plus the quantizer's child, ~380 MiB: the F32
# token embedding it reads whole). At 0.95x (775 MiB) another CI machine's run peaked at 770 MiB and
# was killed: most of the peak is a fixed cost that does not shrink with the model, so the cap leaves
# room for machines that differ. The page cache of the memory-mapped weights is reclaimed, as on a
# user's machine, so the run re-reads them from disk.
LIMIT_SHARE = 1.1


@pytest.fixture(scope="module")
def synthetic_checkpoint(tmp_path_factory) -> Path:
    from edgeprune.models.synthetic import write_checkpoint

    return write_checkpoint(CI_MODEL, tmp_path_factory.mktemp("synthetic") / CI_MODEL)


def prune_capped(model_dir: Path, work: Path, limit_bytes: int | None):
    """`edgeprune prune --plan` (seed recipe, quick profile) on `model_dir`, in a memory cgroup of
    `limit_bytes` (None: uncapped) with a fresh cache; the run and the output directory."""
    p = PRESETS[CI_MODEL]
    plan = work / "plan.json"
    plan.write_text(json.dumps(seed_plan(p.layers, p.heads, p.kv_heads)))
    out, log = work / "out", work / "prune.log"
    cmd = [sys.executable, "-m", "edgeprune", "prune", "--model", str(model_dir), "--plan", str(plan), "-o", str(out),
           "-p", "quick", "--cache-dir", str(work / "cache")]
    evict_page_cache(model_dir)  # cold, as after a download: the group is charged for the weights it maps
    # The preflight's estimate is an upper bound (it counts every buffer at once): under the cap it
    # refuses, and is told to go on, so the run itself shows what fits.
    env = os.environ | {"EDGEPRUNE_PREFLIGHT": "warn"}
    with open(log, "w") as f:
        run = run_limited(cmd, limit_bytes, stdout=f, stderr=subprocess.STDOUT, env=env)
    return run, out, log


@pytest.mark.slow
def test_prune_plan_runs_under_a_memory_cap_near_the_models_bf16_size(synthetic_checkpoint, tmp_path):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    from edgeprune.runtimes.llamacpp import greedy_answer, tokenize

    limit = int(LIMIT_SHARE * PRESETS[CI_MODEL].bf16_bytes())
    run, out, log = prune_capped(synthetic_checkpoint, tmp_path, limit)
    figures = (f"limit {limit / MIB:.0f} MiB, peak anonymous {run.peak_anon_bytes / MIB:.0f} MiB, peak RSS "
               f"{run.peak_rss_bytes / MIB:.0f} MiB, cgroup peak {run.max_usage_bytes / MIB:.0f} MiB, "
               f"{run.wall_s:.0f} s")
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
    assert not run.oom_killed, f"OOM-killed ({figures})\n{tail}"
    assert run.returncode == 0, f"exit {run.returncode} ({figures})\n{tail}"

    gguf_file = next(out.glob("*.gguf"))
    prompt = tokenize(gguf_file, "The controller reads the sensor and")
    answer = greedy_answer(gguf_file, prompt, 6, threads=2, stop_at_eog=False)
    assert len(answer) == 6 and all(0 <= t < PRESETS[CI_MODEL].vocab for t in answer)
