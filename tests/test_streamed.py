"""The bounded-memory model access: weights read where they are stored, passes one layer at a time.

Every pass of a build (importance, reference log-probs, imatrix, sparse methods) runs through
`models/streamed.py`; these tests hold it to the whole model in memory, bit for bit where the
arithmetic is the same, and check the stores against what transformers loads.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_llama
from edgeprune.evaluate import log_probs, reference_log_probs
from edgeprune.families import family_for
from edgeprune.models.reference import weight_files
from edgeprune.models.streamed import Activations, DecoderStream, SequentialPass
from edgeprune.models.weights import ModuleStore, SafetensorsStore
from edgeprune.prune import Plan, apply_plan
from edgeprune.quantize.imatrix import TOKEN_EMBD, add_squares, collect_imatrix

VOCAB = 512
# Non-uniform: a dropped layer, fewer heads (one KV group), removed attention, removed MLP, narrower FFN.
PLAN = Plan(drop_layers=(2,), heads=((0, (0, 1)), (3, ())), ffn=((1, tuple(range(0, 128, 3))), (4, ())))


def _windows(n: int = 5, seq: int = 12, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def _model(tied: bool = True):
    return tiny_llama(tied=tied, vocab=VOCAB, n_layers=5)


@pytest.mark.parametrize("tied", [True, False])
def test_streamed_logprobs_equal_the_whole_pruned_model(tied):
    model, windows = _model(tied), _windows()
    pruned = apply_plan(model, PLAN)
    with torch.no_grad():
        whole = np.stack([log_probs(pruned(input_ids=w.unsqueeze(0)).logits[0]).numpy() for w in windows])
    streamed = reference_log_probs(DecoderStream(ModuleStore(model), PLAN), windows)
    np.testing.assert_array_equal(streamed, whole)


def test_activations_spilled_to_disk_give_the_same_pass(monkeypatch):
    model, windows = _model(), _windows(n=7)
    in_ram = reference_log_probs(ModuleStore(model), windows)
    monkeypatch.setenv("EDGEPRUNE_ACTIVATION_BUDGET", "0")
    passes = SequentialPass(DecoderStream(ModuleStore(model)), windows, batch_size=2)
    for _ in passes:
        pass
    assert passes.spilled == 4  # ceil(7 / 2) batches, every one on disk
    spilled_dir = passes.hidden._dir
    assert spilled_dir is not None and len(list(spilled_dir.glob("*.npy"))) == 4
    passes.close()
    assert not spilled_dir.exists()  # spill files go with the pass
    np.testing.assert_array_equal(reference_log_probs(ModuleStore(model), windows), in_ram)

    # Nobody closes it, or the caller stops mid-pass: the files still go.
    passes = SequentialPass(DecoderStream(ModuleStore(model)), windows, batch_size=2)
    spilled_dir = passes.run()._dir
    del passes
    gc.collect()
    assert not spilled_dir.exists()
    passes = SequentialPass(DecoderStream(ModuleStore(model)), windows, batch_size=2)
    steps = iter(passes)
    first = next(steps)
    spilled_dir = first.inputs._dir
    assert spilled_dir.exists()
    steps.close()  # GeneratorExit inside the pass
    assert not spilled_dir.exists()


def test_activations_budget_splits_ram_and_disk():
    acts = Activations(budget=2 * 4 * 3 * 4)  # room for two [1, 4, 3] fp32 tensors
    tensors = [torch.full((1, 4, 3), float(i)) for i in range(4)]
    for t in tensors:
        acts.append(t)
    assert (len(acts), acts.spilled) == (4, 2)
    for i, t in enumerate(tensors):
        assert torch.equal(acts[i], t)
    acts.close()


def _whole_model_imatrix(model, windows):
    """The oracle: hooks on every nn.Linear of the whole (pruned) model, as before streaming."""
    sums, rows = {}, {}

    def hook(name):
        def fn(module, args):
            total, n = add_squares(sums.get(name, torch.zeros(module.in_features, dtype=torch.float64)), args[0])
            sums[name], rows[name] = total, rows.get(name, 0) + n
        return fn

    tied = model.config.tie_word_embeddings
    names = {n: TOKEN_EMBD if n == "lm_head" and tied else family_for("llama", "tiny").gguf_name(n + ".weight")
             for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    handles = [model.get_submodule(n).register_forward_pre_hook(hook(g)) for n, g in names.items()]
    with torch.no_grad():
        for start in range(0, len(windows), 4):
            model(input_ids=windows[start : start + 4], use_cache=False)
    for h in handles:
        h.remove()
    return {k: (v / rows[k]).float().numpy() for k, v in sums.items()}


@pytest.mark.parametrize("tied", [True, False])
def test_streamed_imatrix_equals_hooks_on_the_whole_pruned_model(tied):
    model, windows = _model(tied), _windows(n=6)
    expected = _whole_model_imatrix(apply_plan(model, PLAN), windows)
    got = collect_imatrix(DecoderStream(ModuleStore(model), PLAN), windows)
    assert set(got) == set(expected)
    assert ("output.weight" in got) != tied and (TOKEN_EMBD in got) == tied
    for name, values in expected.items():
        np.testing.assert_allclose(got[name], values, rtol=1e-6, atol=0)


def test_safetensors_store_reads_stored_dtype_and_rows(tmp_path):
    model = _model().to(torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()  # sharded
    store = SafetensorsStore(weight_files(tmp_path), model.config)
    state = model.state_dict()
    assert store.tied and "lm_head.weight" not in store.names()
    assert store.parameters == model.num_parameters()
    for name in store.names():
        assert store.stored_dtype(name) == torch.bfloat16
        assert torch.equal(store.read(name), state[name])
    index = torch.tensor([5, 1, 5, 300, 0])
    assert torch.equal(store.rows("model.embed_tokens.weight", index), state["model.embed_tokens.weight"][index])
    assert torch.equal(store.row_block("model.embed_tokens.weight", 7, 300), state["model.embed_tokens.weight"][7:300])


def test_the_head_in_blocks_gives_the_same_log_probs(monkeypatch):
    """The output head is read a block of rows at a time for every window: the log-probabilities are
    those of the whole head (to fp32 rounding: a block's matmul may sum in another order)."""
    import edgeprune.models.streamed as streamed

    model, windows = _model(), torch.randint(0, VOCAB, (3, 12))
    whole = reference_log_probs(ModuleStore(model), windows)
    monkeypatch.setattr(streamed, "HEAD_CHUNK_BYTES", 37 * 64 * 4)  # 37 rows: blocks of uneven size
    stream = DecoderStream(ModuleStore(model))
    assert [start for start, _ in stream.head_blocks()] == list(range(0, VOCAB, 37))
    np.testing.assert_allclose(reference_log_probs(stream, windows), whole, rtol=0, atol=1e-5)


def test_module_store_reads_are_copies():
    model = _model()
    store = ModuleStore(model)
    t = store.read("model.layers.0.mlp.down_proj.weight")
    t.zero_()
    assert model.model.layers[0].mlp.down_proj.weight.abs().sum() > 0


@pytest.mark.slow
def test_gguf_store_reads_exactly_what_transformers_dequantizes(embedded_reference):
    """The embedded reference read in place equals the fp32 model transformers builds from the GGUF
    (the pre-streaming reference): same tensors, bit for bit, so the same importance and log-probs."""
    from transformers import AutoModelForCausalLM

    path = embedded_reference.source.path
    old = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    state = old.state_dict()
    store = embedded_reference.weights
    assert store.tied and store.parameters == old.num_parameters()
    for name in store.names():
        assert torch.equal(store.read(name), state[name]), name
    embedding = state["model.embed_tokens.weight"]
    index = torch.tensor([5, 1, 5, 49151, 0])
    assert torch.equal(store.rows("model.embed_tokens.weight", index), embedding[index])
    assert torch.equal(store.row_block("model.embed_tokens.weight", 100, 4000), embedding[100:4000])
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "rms_norm_eps", "vocab_size", "tie_word_embeddings"):
        assert getattr(store.config, key) == getattr(old.config, key), key
    windows = embedded_reference.tokenizer(["The pump stopped because the pressure sensor failed."],
                                           return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = log_probs(old(input_ids=windows).logits[0]).numpy()
    np.testing.assert_array_equal(reference_log_probs(store, windows)[0], expected)
