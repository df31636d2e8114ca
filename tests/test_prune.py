"""Plans and their torch application: every structure equals masking the original model."""

import random

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from conftest import tiny_llama
from edgeprune.prune import LayerShape, ModelShape, Plan, PlanError, apply_plan, layer_shapes, pruned_config

TOKENS = torch.tensor([[5, 17, 300, 42, 42, 9001, 7, 12, 100, 3]])
HEAD_DIM = 16


def _shape():
    return ModelShape(n_layers=4, n_head=4, n_head_kv=2, head_dim=16, hidden=64, ffn=128, vocab=49152)


@pytest.mark.parametrize(
    "plan, message",
    [
        (Plan(drop_layers=(0, 1, 2, 3)), "drops every layer"),
        (Plan(drop_layers=(7,)), "the model has 4"),
        (Plan(drop_layers=(1,), heads=((1, (0, 1)),)), "dropped or does not exist"),
        (Plan(drop_layers=(1,), ffn=((1, (0, 1)),)), "dropped or does not exist"),
        (Plan(heads=tuple((l, (0, 1, 2)) for l in range(4))), "uneven number of query heads"),
        (Plan(heads=tuple((l, (0, 9)) for l in range(4))), "the model has 4"),
        (Plan(heads=((2, (1, 1)),)), "the model has 4"),
        (Plan(ffn=((1, (0, 128)),)), "exceed 127"),
        (Plan(heads=((0, ()),)), "first kept layer"),
        (Plan(drop_layers=(0,), heads=((1, ()),)), "layer 1, the first kept layer"),
    ],
)
def test_invalid_plans_are_rejected_with_the_reason(plan, message):
    with pytest.raises(PlanError, match=message):
        plan.validate(_shape())


def test_plan_round_trips_and_is_a_stable_key():
    plan = Plan(drop_layers=(3, 1), heads=((2, (3, 2)), (0, (2, 3))), ffn=((2, (127, 0, 64)), (0, ())))
    assert plan.drop_layers == (1, 3) and plan.heads == ((0, (2, 3)), (2, (2, 3)))
    assert plan.ffn == ((0, ()), (2, (0, 64, 127)))
    assert Plan.from_dict(plan.to_dict()) == plan
    assert Plan.from_dict(plan.to_dict()).key() == plan.key()
    assert Plan().is_identity and not plan.is_identity
    assert "ffn" not in Plan(drop_layers=(1,)).to_dict()  # keys of plans without FFN pruning are unchanged


def test_ffn_channels_are_a_hex_bitmask_lowest_channel_first():
    # The mask is in cache keys and GGUF metadata: its spelling must not change.
    assert Plan(ffn=((0, (8, 0, 3)),)).to_dict()["ffn"] == {"0": "109"}  # bits 0, 3, 8
    wide = tuple(sorted(random.Random(0).sample(range(14336), 12000)))  # an 8B layer's channels
    assert Plan.from_dict(Plan(ffn=((5, wide), (6, (14335,)))).to_dict()).ffn == ((5, wide), (6, (14335,)))


def test_a_layer_without_attention_and_mlp_is_dropped():
    plan = Plan(heads=((2, ()),), ffn=((2, ()), (3, (1, 2))))
    assert plan.drop_layers == (2,) and plan.heads == () and plan.ffn == ((3, (1, 2)),)


def test_layer_shapes_and_uniformity():
    shape = _shape()
    uniform = Plan(drop_layers=(1,), heads=tuple((l, (0, 2)) for l in (0, 2, 3)),
                   ffn=tuple((l, tuple(range(64))) for l in (0, 2, 3)))
    assert uniform.uniform_shape(shape) == LayerShape(2, 2, 64)
    mixed = Plan(heads=((1, (0,)), (2, ())), ffn=((3, ()),))
    assert mixed.uniform_shape(shape) is None
    assert mixed.layer_shapes(shape) == [LayerShape(4, 2, 128), LayerShape(1, 1, 128), LayerShape(0, 0, 128),
                                         LayerShape(4, 2, 0)]
    assert "attention removed in 1 layer" in mixed.describe(shape) and "MLP removed in 1 layer" in mixed.describe(shape)


def _masked(model, plan: Plan):
    """The original model with the plan's removed parts zeroed, and dropped layers skipped by hooks."""
    shape = ModelShape.from_config(model.config)
    hooks = []
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            if i in plan.drop_layers:
                hooks.append(layer.register_forward_hook(
                    lambda mod, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True))
                continue
            o = layer.self_attn.o_proj.weight
            for h in set(range(shape.n_head)) - set(plan.kept_heads(i, shape)):
                o[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0
            down = layer.mlp.down_proj.weight
            for c in set(range(shape.ffn)) - set(plan.kept_channels(i, shape)):
                down[:, c] = 0
    return hooks


PLANS = {
    "depth": Plan(drop_layers=(1, 2)),
    "heads": Plan(heads=tuple((l, (2,)) for l in range(4))),
    "ffn": Plan(ffn=tuple((l, tuple(range(0, 128, 2))) for l in range(4))),
    "per-layer heads and KV": Plan(heads=((0, (0, 2)), (1, (2, 3)), (3, (1,)))),
    "per-layer ffn": Plan(ffn=((0, tuple(range(32))), (2, tuple(range(5, 128))))),
    "attention removed": Plan(heads=((2, ()),)),
    "mlp removed": Plan(ffn=((1, ()),)),
    "combined": Plan(drop_layers=(1,), heads=((0, (1, 3)), (2, ())), ffn=((0, tuple(range(100))), (3, ()))),
}


@pytest.mark.parametrize("name", list(PLANS))
@pytest.mark.parametrize("tied", [True, False])
def test_pruned_model_equals_masking_the_original(name, tied):
    plan = PLANS[name]
    pruned = apply_plan(tiny_llama(tied=tied), plan)
    assert layer_shapes(pruned) == plan.layer_shapes(_shape())
    masked = tiny_llama(tied=tied)
    hooks = _masked(masked, plan)
    try:
        expected = masked(TOKENS).logits
    finally:
        for h in hooks:
            h.remove()
    assert_close(pruned(TOKENS).logits, expected, atol=1e-5, rtol=1e-5)
    if tied:
        assert pruned.lm_head.weight is pruned.model.embed_tokens.weight
    assert pruned.num_parameters() < masked.num_parameters()


def test_uniform_plan_saves_a_checkpoint_plain_transformers_reloads(tmp_path):
    model = tiny_llama(tied=False, n_head=4, n_head_kv=2)
    plan = Plan(drop_layers=(2,), heads=tuple((l, (0, 1)) for l in (0, 1, 3)),
                ffn=tuple((l, tuple(range(0, 128, 4))) for l in (0, 1, 3)))
    pruned = apply_plan(model, plan)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers, no custom code
    c = reloaded.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (3, 2, 1, 32)
    assert_close(reloaded(TOKENS).logits, pruned(TOKENS).logits)


def test_non_uniform_plans_have_no_plain_transformers_config():
    with pytest.raises(PlanError, match="different shapes"):
        pruned_config(tiny_llama(tied=True).config, PLANS["per-layer heads and KV"])


def test_reference_is_left_untouched():
    model = tiny_llama(tied=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_plan(model, PLANS["combined"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert pruned_config(model.config, Plan(drop_layers=(0,))).num_hidden_layers == 3
    assert model.config.num_hidden_layers == 4
