"""A non-uniform plan on the embedded default model: llama.cpp generates what torch generates."""

from __future__ import annotations

import pytest
import torch

from edgeprune.export import Provenance, export_gguf
from edgeprune.prune import Plan
from edgeprune.prune.modules import materialize
from edgeprune.runtimes import llamacpp

pytestmark = pytest.mark.slow

# SmolLM2-135M: 30 layers, 9 heads in 3 KV groups, FFN 1536.
PLAN = Plan(
    drop_layers=(14, 20),
    heads=((3, (0, 1, 3, 4, 6, 7)), (5, (3, 4, 5)), (7, ()), (11, (0, 3, 6))),
    ffn=((4, tuple(range(0, 1536, 2))), (9, ()), (12, tuple(range(256, 1280)))),
)


@torch.no_grad()
def _torch_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_non_uniform_plan_generates_the_same_32_tokens(tmp_path, embedded_reference):
    ref = embedded_reference
    pruned = materialize(ref.weights, PLAN)
    path = tmp_path / "deci.gguf"
    export_gguf(pruned, ref.tokenizer_spec, path, "F32", Provenance("embedded", "0" * 64, PLAN.to_dict()), "x")
    messages = [{"role": "user", "content": "Name three things a lighthouse keeper does every day."}]
    prompt = ref.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    # Past an end-of-turn token both keep generating: 32 tokens compared whatever they say.
    expected = _torch_greedy(pruned, list(prompt), 32)
    got = llamacpp.greedy_answer(path, list(prompt), 32, threads=2, f32_kv_cache=True, stop_at_eog=False)
    assert len(got) == 32
    assert got == expected, (ref.tokenizer.decode(got), ref.tokenizer.decode(expected))
