import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaForCausalLM

from conftest import tiny_llama
from edgeprune.prune import ModelShape, Plan, PlanError, apply_plan, pruned_config

TOKENS = torch.tensor([[5, 17, 300, 42, 42, 9001, 7, 12, 100, 3]])


def _shape():
    return ModelShape(n_layers=4, n_head=4, n_head_kv=2, head_dim=16, hidden=64, ffn=128, vocab=49152)


@pytest.mark.parametrize(
    "plan, message",
    [
        (Plan(drop_layers=(0, 1, 2, 3)), "drops every layer"),
        (Plan(drop_layers=(7,)), "the model has 4"),
        (Plan(drop_layers=(1,), heads=((1, (0, 1)),)), "dropped or does not exist"),
        (Plan(heads=tuple((l, (0, 1, 2)) for l in range(4))), "uneven number of query heads"),
        (Plan(heads=((0, (0, 2)),)), "different head counts per layer"),
        (Plan(heads=tuple((l, (0, 9)) for l in range(4))), "the model has 4"),
    ],
)
def test_invalid_plans_are_rejected_with_the_reason(plan, message):
    with pytest.raises(PlanError, match=message):
        plan.validate(_shape())


def test_plan_round_trips_and_is_a_stable_key():
    plan = Plan(drop_layers=(3, 1), heads=((2, (3, 2)), (0, (2, 3))))
    assert plan.drop_layers == (1, 3) and plan.heads == ((0, (2, 3)), (2, (2, 3)))
    assert Plan.from_dict(plan.to_dict()) == plan
    assert Plan.from_dict(plan.to_dict()).key() == plan.key()
    assert Plan().is_identity and not plan.is_identity


def _skip_layers(model, skipped):
    """The original model with some decoder layers turned into identities (by hooks)."""
    hooks = []
    for i in skipped:
        hooks.append(model.model.layers[i].register_forward_hook(
            lambda mod, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True))
    return hooks


@pytest.mark.parametrize("tied", [True, False])
def test_depth_pruning_equals_skipping_the_layers(tied):
    model = tiny_llama(tied=tied)
    pruned = apply_plan(model, Plan(drop_layers=(1, 2)))
    assert pruned.config.num_hidden_layers == 2 and len(pruned.model.layers) == 2
    hooks = _skip_layers(model, (1, 2))
    try:
        expected = model(TOKENS).logits
    finally:
        for h in hooks:
            h.remove()
    assert_close(pruned(TOKENS).logits, expected)


def test_head_pruning_equals_masking_the_heads():
    """Dropping KV group 0 and one query head of group 1 == zeroing their o_proj input columns."""
    model = tiny_llama(tied=True, n_head=4, n_head_kv=2)
    keep = (2,)  # group 1 = heads 2, 3; keep head 2 only
    plan = Plan(heads=tuple((l, keep) for l in range(4)))
    pruned = apply_plan(model, plan)
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (1, 1)
    assert pruned.config.head_dim == 16

    masked = tiny_llama(tied=True, n_head=4, n_head_kv=2)
    with torch.no_grad():
        for layer in masked.model.layers:
            w = layer.self_attn.o_proj.weight
            for h in (0, 1, 3):
                w[:, h * 16 : (h + 1) * 16] = 0
    assert_close(pruned(TOKENS).logits, masked(TOKENS).logits, atol=1e-5, rtol=1e-5)


def test_pruned_config_matches_tensors_after_save_and_plain_reload(tmp_path):
    model = tiny_llama(tied=False, n_head=4, n_head_kv=2)
    plan = Plan(drop_layers=(2,), heads=tuple((l, (0, 1)) for l in (0, 1, 3)))
    pruned = apply_plan(model, plan)
    pruned.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers, no custom code
    assert reloaded.config.num_hidden_layers == 3
    assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads) == (2, 1)
    assert_close(reloaded(TOKENS).logits, pruned(TOKENS).logits)


def test_reference_is_left_untouched():
    model = tiny_llama(tied=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_plan(model, Plan(drop_layers=(0,), heads=tuple((l, (2, 3)) for l in (1, 2, 3))))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert pruned_config(model.config, Plan(drop_layers=(0,))).num_hidden_layers == 3
    assert model.config.num_hidden_layers == 4
