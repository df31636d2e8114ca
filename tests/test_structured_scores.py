"""Structured-pruning importance: layer / sublayer scores, head / channel scores over dependency
groups, and the layer-by-layer runner, on hand-built tensors and tiny in-process models."""

import copy
import math

import pytest
import torch
from torch.testing import assert_close

from conftest import tiny_llama
from edgeprune.analysis.groups import CHANNEL, HEAD, KV_GROUP, config_groups, dependency_groups, removal_plan
from edgeprune.analysis.layer_scores import (
    angular_distance,
    block_influence,
    block_to_drop,
    layers_to_drop,
    sublayer_pair,
    token_nll,
)
from edgeprune.analysis.layerwise import analyse_layerwise
from edgeprune.analysis.methods import LAYER_IMPORTANCE, UNIT_IMPORTANCE, UnitInputs
from edgeprune.analysis.unit_scores import (
    ColumnStats,
    flap_bias,
    fluctuation_salience,
    group_scores,
    head_columns,
    magnitude_salience,
    taylor_first_order,
    taylor_second_order,
    wanda_salience,
)
from edgeprune.analysis.whole_model import analyse_model, gradients, layer_inputs, loss_scores
from edgeprune.models.reference import weight_files
from edgeprune.models.streamed import DecoderStream
from edgeprune.models.weights import SafetensorsStore
from edgeprune.prune import ModelShape, Plan, PlanError, apply_plan, layer_shapes

VOCAB = 256
HEAD_DIM = 16


def _model(dtype=torch.float32, n_layers=4, seed=0):
    return tiny_llama(tied=True, vocab=VOCAB, n_layers=n_layers, seed=seed).to(dtype)


def _windows(n=6, seq=24, seed=1):
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def _states_methods():
    return [LAYER_IMPORTANCE[name](g) for name in ("block_influence", "angular_distance")
            for g in ("layer", "attention", "mlp")] + [LAYER_IMPORTANCE["angular_distance"](n=2),
                                                        LAYER_IMPORTANCE["block_influence"](n=3)]


def _loss_methods():
    return [LAYER_IMPORTANCE["loss_increase"](g) for g in ("layer", "attention", "mlp")] + [
        LAYER_IMPORTANCE["loss_increase"](n=2)]


def _units(*needs):
    return [cls() for cls in UNIT_IMPORTANCE.values() if cls.needs in needs]


@torch.no_grad()
def _mean_nll(model, windows):
    return float(token_nll(model(input_ids=windows, use_cache=False).logits, windows).mean())


# -- pure layer scores ----------------------------------------------------------------------------

def test_angular_distance_known_angles():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[3.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [0.0, 1.0]])
    assert_close(angular_distance(a, b), torch.tensor([0.0, 0.5, 1.0, 0.25], dtype=torch.float64))
    # Rounding may give cos slightly above 1: still 0, never NaN.
    x = torch.randn(5, 7) * 1e3
    assert not angular_distance(x, x.clone()).isnan().any()


def test_identity_layer_scores_least_on_hand_built_states():
    torch.manual_seed(0)
    h = [torch.randn(10, 32)]
    for i in range(5):  # layer 2 is the identity map; the others change the stream
        h.append(h[-1] if i == 2 else h[-1] + 0.5 * torch.randn(10, 32))
    for score in (block_influence, angular_distance):
        per_layer = torch.stack([score(h[i], h[i + 1]).mean() for i in range(5)])
        assert int(per_layer.argmin()) == 2 and float(per_layer[2]) == pytest.approx(0.0, abs=1e-7)
    assert layers_to_drop([0.3, 0.1, 0.0, 0.2, 0.5], 2) == [1, 2]
    assert layers_to_drop([0.3, 0.1, 0.0, 0.2, 0.5], 2, protect=[2]) == [1, 3]
    assert block_to_drop([0.4, 0.2, 0.3], n=3) == [1, 2, 3]


def test_sublayer_pairs_pick_the_residual_stream_around_each_sublayer():
    h_in, h_mid, h_out = torch.ones(1), 2 * torch.ones(1), 3 * torch.ones(1)
    assert [float(t) for t in sublayer_pair("layer", h_in, h_mid, h_out)] == [1, 3]
    assert [float(t) for t in sublayer_pair("attention", h_in, h_mid, h_out)] == [1, 2]
    assert [float(t) for t in sublayer_pair("mlp", h_in, h_mid, h_out)] == [2, 3]
    with pytest.raises(ValueError, match="granularity"):
        sublayer_pair("head", h_in, h_mid, h_out)


def test_registries_have_one_name_each_and_declare_what_they_need():
    assert set(LAYER_IMPORTANCE) == {"block_influence", "angular_distance", "loss_increase"}
    assert set(UNIT_IMPORTANCE) == {"magnitude", "wanda_sp", "taylor1", "taylor2", "flap"}
    assert {c.needs for c in UNIT_IMPORTANCE.values()} == {"weights", "activations", "gradients"}
    assert LAYER_IMPORTANCE["angular_distance"](n=8).key == "angular_distance/layer/n8"
    with pytest.raises(ValueError):
        LAYER_IMPORTANCE["block_influence"]("attention", n=2)
    with pytest.raises(TypeError, match="two"):
        type("Dup", (UNIT_IMPORTANCE["magnitude"],), {"name": "magnitude"})


# -- layer scores on a model ----------------------------------------------------------------------

def _make_identity(model, layer):
    with torch.no_grad():
        model.model.layers[layer].self_attn.o_proj.weight.zero_()
        model.model.layers[layer].mlp.down_proj.weight.zero_()


def test_identity_layer_and_zeroed_sublayers_score_least_in_the_model():
    model = _model()
    _make_identity(model, 2)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()  # attention of layer 1 adds nothing
        model.model.layers[3].mlp.down_proj.weight.zero_()  # MLP of layer 3 adds nothing
    result = analyse_model(model, _windows(), _states_methods() + _loss_methods())
    for name in ("block_influence", "angular_distance", "loss_increase"):
        for granularity, layers in (("layer", (2,)), ("attention", (1, 2)), ("mlp", (2, 3))):
            scores = result.layer_scores[f"{name}/{granularity}/n1"]
            for layer in layers:
                assert float(scores[layer]) == pytest.approx(0.0, abs=1e-6), (name, granularity, layer)
            others = [float(s) for i, s in enumerate(scores) if i not in layers]
            if name != "loss_increase":  # skipping a real block can also lower the loss of a random model
                assert min(others) > 1e-3, (name, granularity)
        if name != "loss_increase":
            assert layers_to_drop(result.layer_scores[f"{name}/layer/n1"], 1) == [2]


def test_block_scores_compare_the_input_of_the_first_layer_with_the_output_of_the_last():
    model, windows = _model(), _windows()
    result = analyse_layerwise(model, windows, [LAYER_IMPORTANCE["angular_distance"](n=3)], batch_size=4)
    with torch.no_grad():
        states = [[h for h, _ in layer_inputs(model, windows, 4)]]
        kwargs = [kw for _, kw in layer_inputs(model, windows, 4)]
        for layer in model.model.layers:
            states.append([layer(h, **kw) for h, kw in zip(states[-1], kwargs, strict=True)])
    expected = [torch.cat([angular_distance(a, b) for a, b in zip(states[l], states[l + 3], strict=True)]).mean()
                for l in range(2)]
    assert_close(result.layer_scores["angular_distance/layer/n3"], torch.stack(expected))


def test_loss_increase_equals_the_loss_of_the_pruned_model():
    """The bookkeeping (skip a block, re-run what follows) against prune.apply_plan's real models."""
    model, windows = _model(torch.float64), _windows()
    scores = loss_scores(model, windows, _loss_methods(), batch_size=4)
    base = _mean_nll(model, windows)
    shape = ModelShape.from_config(model.config)
    for layer in range(shape.n_layers):
        plans = {"layer/n1": Plan(drop_layers=(layer,)), "mlp/n1": Plan(ffn=((layer, ()),))}
        if layer > 0:  # llama.cpp needs the first kept layer's attention; the torch model does not care
            plans["attention/n1"] = Plan(heads=((layer, ()),))
        if layer < shape.n_layers - 1:
            plans["layer/n2"] = Plan(drop_layers=(layer, layer + 1))
        for key, plan in plans.items():
            pruned = apply_plan(model, plan).to(torch.float64)  # apply_plan builds float32 modules
            assert float(scores[f"loss_increase/{key}"][layer]) == pytest.approx(
                _mean_nll(pruned, windows) - base, abs=1e-10), (key, layer)


# -- unit scores on hand-built tensors ------------------------------------------------------------

def test_magnitude_sums_the_whole_dependency_group():
    groups = config_groups(_model().config)
    weights = {n: p.detach() for n, p in _model().model.layers[0].named_parameters()}
    scores = group_scores(groups, magnitude_salience(weights))
    q, k, v, o = (weights[f"self_attn.{p}_proj.weight"].abs().double() for p in "qkvo")
    head1 = q[16:32].sum() + o[:, 16:32].sum()
    assert_close(scores.heads[1], head1)
    assert_close(scores.kv_groups[0], k[:16].sum() + v[:16].sum() + q[:32].sum() + o[:, :32].sum())
    gate, up, down = (weights[f"mlp.{p}_proj.weight"].abs().double() for p in ("gate", "up", "down"))
    assert_close(scores.channels[5], gate[5].sum() + up[5].sum() + down[:, 5].sum())


def test_salience_maps_are_computed_when_read_and_leave_float64_weights_untouched():
    torch.manual_seed(0)
    weights = {"self_attn.o_proj.weight": -torch.rand(4, 6, dtype=torch.float64),
               "mlp.down_proj.weight": -torch.rand(3, 6, dtype=torch.float64),
               "input_layernorm.weight": torch.ones(6, dtype=torch.float64)}  # not a projection: no map
    before = {n: w.clone() for n, w in weights.items()}
    stats = ColumnStats(6)
    stats.add(torch.randn(10, 6))
    for maps in (magnitude_salience(weights), wanda_salience(weights, {"o_in": stats, "down_in": stats}),
                 fluctuation_salience(weights, {"o_in": stats, "down_in": stats})):
        assert sorted(maps) == ["mlp.down_proj.weight", "self_attn.o_proj.weight"] and len(maps) == 2
        assert "input_layernorm.weight" not in maps
        first = maps["mlp.down_proj.weight"]
        assert first is not maps["mlp.down_proj.weight"]  # recomputed on each read, never held
        assert_close(first, maps["mlp.down_proj.weight"])
        assert bool((first >= 0).all())
    for name, w in weights.items():  # maps are built in place on a copy, even of float64 weights
        assert torch.equal(w, before[name]), name
    assert_close(wanda_salience(weights, {"o_in": stats, "down_in": stats})["self_attn.o_proj.weight"],
                 weights["self_attn.o_proj.weight"].abs() * stats.norm)


def test_taylor_second_order_is_llm_pruners_param_mix():
    groups = config_groups(_model().config)
    torch.manual_seed(0)
    weights = {n: p.detach().double() for n, p in _model().model.layers[0].named_parameters()}
    grads = {n: torch.randn_like(w) for n, w in weights.items() if n.startswith(("self_attn", "mlp"))}
    fisher = {n: g.square() + 0.1 for n, g in grads.items()}
    mix = taylor_second_order(weights, grads, fisher)
    w, g, f = weights["mlp.down_proj.weight"], grads["mlp.down_proj.weight"], fisher["mlp.down_proj.weight"]
    assert_close(mix["mlp.down_proj.weight"], (w * g - 0.5 * f * w * w).abs())
    first = group_scores(groups, taylor_first_order(weights, grads), absolute=True)
    wg = {n: weights[n] * grads[n] for n in grads}
    assert_close(first.channels[3], (wg["mlp.gate_proj.weight"][3].sum() + wg["mlp.up_proj.weight"][3].sum()
                                     + wg["mlp.down_proj.weight"][:, 3].sum()).abs())


def test_column_stats_and_flap_bias_compensation():
    torch.manual_seed(0)
    x = torch.randn(50, 6, dtype=torch.float64)
    x[:, 2] = 0.7  # a column that never fluctuates
    stats = ColumnStats(6)
    stats.add(x[:20])
    stats.add(x[20:])
    assert_close(stats.mean, x.mean(0))
    assert_close(stats.variance, x.var(0, unbiased=False))
    assert_close(stats.norm, x.norm(dim=0))
    weight = torch.randn(4, 6, dtype=torch.float64)
    # FLAP scores the constant column 0, and its mean-compensation bias makes removing it exact.
    fluctuation = fluctuation_salience({"mlp.down_proj.weight": weight}, {"down_in": stats})["mlp.down_proj.weight"]
    assert_close(fluctuation.sum(0), x.var(0, unbiased=False) * weight.square().sum(0))
    assert int(fluctuation.sum(0).argmin()) == 2 and float(fluctuation.sum(0)[2]) == pytest.approx(0.0, abs=1e-12)
    bias = flap_bias(weight, stats.mean, torch.tensor([2]))
    kept = [0, 1, 3, 4, 5]
    assert_close(x[:, kept] @ weight[:, kept].T + bias, x @ weight.T)
    assert_close(head_columns([1, 3], 4), torch.tensor([4, 5, 6, 7, 12, 13, 14, 15]))


# -- unit scores on a model -----------------------------------------------------------------------

def test_head_with_zero_output_projection_scores_least_for_every_head_scorer():
    model = _model(torch.float64)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[:, 2 * HEAD_DIM : 3 * HEAD_DIM] = 0
    result = analyse_model(model, _windows(), unit_methods=_units("weights", "activations", "gradients"))
    assert set(result.unit_scores) == set(UNIT_IMPORTANCE)
    for name, per_layer in result.unit_scores.items():
        heads = per_layer[1].heads
        assert int(heads.argmin()) == 2, (name, heads)
        if name in ("taylor1", "taylor2", "flap"):  # the head cannot affect the output at all
            assert float(heads[2]) == pytest.approx(0.0, abs=1e-12), name


def test_channel_with_zero_down_column_scores_least_for_every_channel_scorer():
    model = _model(torch.float64)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[:, 77] = 0
    result = analyse_model(model, _windows(), unit_methods=_units("weights", "activations", "gradients"))
    for name, per_layer in result.unit_scores.items():
        channels = per_layer[2].channels
        assert int(channels.argmin()) == 77, (name, channels.topk(3, largest=False))
        if name in ("taylor1", "taylor2", "flap"):
            assert float(channels[77]) == pytest.approx(0.0, abs=1e-12), name


@pytest.fixture
def float64_norms(monkeypatch):
    """transformers' RMSNorm computes in float32 whatever the model's dtype; its rounding would swamp
    a finite difference, so the test model normalises in float64 (the same formula)."""
    from transformers.models.llama import modeling_llama

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


@pytest.mark.parametrize("kind, index, layer", [(HEAD, 1, 0), (HEAD, 3, 2), (KV_GROUP, 1, 1), (KV_GROUP, 0, 3),
                                                (CHANNEL, 0, 0), (CHANNEL, 100, 3)])
def test_taylor_first_order_matches_finite_differences(kind, index, layer, float64_norms):
    """d/dt L(w + t*w_G) at t=0 is sum_G w*g; taylor1 is its absolute value."""
    model, windows = _model(torch.float64), _windows(n=3, seq=16)
    grads, fisher = gradients(model, windows)
    groups = dependency_groups(model, layer)
    weights = {n: p.detach() for n, p in model.model.layers[layer].named_parameters()}
    signed = groups.by_kind(kind).reduce(taylor_first_order(weights, grads[layer]))[index]
    scores = UNIT_IMPORTANCE["taylor1"]().score(UnitInputs(weights, groups, grads=grads[layer], fisher=fisher[layer]))
    eps = 1e-5

    def loss_scaled(t):
        scaled = copy.deepcopy(model)
        params = dict(scaled.model.layers[layer].named_parameters())
        with torch.no_grad():
            for name, dim, span in groups.by_kind(kind).slices(index):
                params[name].narrow(dim, span.start, span.stop - span.start).mul_(1 + t)
        return _mean_nll(scaled, windows)

    fd = (loss_scaled(eps) - loss_scaled(-eps)) / (2 * eps)
    assert abs(fd) > 1e-6  # the check means something
    assert float(signed) == pytest.approx(fd, rel=1e-6)
    assert float(getattr(scores, {HEAD: "heads", KV_GROUP: "kv_groups", CHANNEL: "channels"}[kind])[index]) == \
        pytest.approx(abs(fd), rel=1e-6)


# -- dependency groups ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind, indices", [(KV_GROUP, (0,)), (KV_GROUP, (1,)), (HEAD, (0, 3)), (HEAD, (1, 2)),
                                           (CHANNEL, (0,)), (CHANNEL, (5, 64, 127))])
@pytest.mark.parametrize("layer", [0, 2])
def test_removing_a_group_equals_zeroing_it_and_keeps_the_model_valid(kind, indices, layer):
    model = _model(torch.float64)
    shape = ModelShape.from_config(model.config)
    zeroed = copy.deepcopy(model)
    groupset = dependency_groups(zeroed, layer).by_kind(kind)
    params = dict(zeroed.model.layers[layer].named_parameters())
    for i in indices:
        groupset.zero(params, i)
    plan = removal_plan(shape, layer, kind, indices)
    pruned = apply_plan(model, plan).to(torch.float64)  # apply_plan builds float32 modules
    tokens = _windows(n=2, seq=12)
    with torch.no_grad():
        assert_close(pruned(input_ids=tokens).logits, zeroed(input_ids=tokens).logits)
    shapes = layer_shapes(pruned)
    assert shapes == plan.layer_shapes(shape)
    for s in shapes:
        assert s.n_head % s.n_head_kv == 0 and s.n_head // s.n_head_kv <= shape.group_size
    attn = pruned.model.layers[layer].self_attn
    assert attn.q_proj.out_features == shapes[layer].n_head * HEAD_DIM == attn.o_proj.in_features
    assert attn.k_proj.out_features == shapes[layer].n_head_kv * HEAD_DIM == attn.v_proj.out_features
    mlp = pruned.model.layers[layer].mlp
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == shapes[layer].ffn


def test_gqa_refuses_uneven_head_removal_and_a_uniform_removal_gives_a_consistent_config():
    model = _model()
    shape = ModelShape.from_config(model.config)
    with pytest.raises(PlanError, match="uneven"):
        removal_plan(shape, 1, HEAD, (0,))  # group 0 would keep 1 head, group 1 two
    plan = Plan(heads=tuple((l, (1, 3)) for l in range(4)), ffn=tuple((l, tuple(range(0, 128, 2))) for l in range(4)))
    pruned = apply_plan(model, plan)
    config = pruned.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (2, 2, 64)
    assert config.num_attention_heads % config.num_key_value_heads == 0
    with torch.no_grad():
        assert pruned(input_ids=_windows(n=1, seq=8)).logits.isfinite().all()
    # The pruned model's own groups describe its new shapes.
    groups = dependency_groups(pruned, 0)
    assert (groups.heads.count, groups.kv_groups.count, groups.channels.count) == (2, 2, 64)


# -- the layer-by-layer runner --------------------------------------------------------------------

def test_layer_by_layer_scores_equal_whole_model_scores(tmp_path, monkeypatch):
    model, windows = _model(), _windows(n=7)  # 7 windows: the last batch is short
    layer_methods, unit_methods = _states_methods(), _units("weights", "activations")
    whole = analyse_model(model, windows, layer_methods, unit_methods, batch_size=3)
    layerwise = analyse_layerwise(model, windows, layer_methods, unit_methods, batch_size=3)
    model.save_pretrained(tmp_path, safe_serialization=True)
    stream = DecoderStream(SafetensorsStore(weight_files(tmp_path), model.config))
    streamed = analyse_layerwise(stream, windows, layer_methods, unit_methods, batch_size=3)
    monkeypatch.setenv("EDGEPRUNE_ACTIVATION_BUDGET", "0")  # every batch's activations spilled to disk
    spilled = analyse_layerwise(stream, windows, layer_methods, unit_methods, batch_size=3)
    assert set(whole.layer_scores) == {m.key for m in layer_methods}
    for key, scores in streamed.layer_scores.items():
        assert torch.equal(spilled.layer_scores[key], scores)
    for result in (layerwise, streamed):
        assert set(result.layer_scores) == set(whole.layer_scores)
        for key, scores in whole.layer_scores.items():
            assert_close(result.layer_scores[key], scores)
        for name, per_layer in whole.unit_scores.items():
            assert len(result.unit_scores[name]) == 4
            for mine, ref in zip(result.unit_scores[name], per_layer, strict=True):
                assert_close(mine.heads, ref.heads)
                assert_close(mine.kv_groups, ref.kv_groups)
                assert_close(mine.channels, ref.channels)
        assert result.peak_rss_bytes is None or result.peak_rss_bytes > 0
    assert_close(streamed.unit_scores["flap"][1].extras["down_in_mean"],
                 whole.unit_scores["flap"][1].extras["down_in_mean"])


def test_layer_by_layer_refuses_what_needs_the_whole_model():
    with pytest.raises(ValueError, match="whole_model"):
        analyse_layerwise(_model(), _windows(), [LAYER_IMPORTANCE["loss_increase"]()])
    with pytest.raises(ValueError, match="taylor1"):
        analyse_layerwise(_model(), _windows(), unit_methods=[UNIT_IMPORTANCE["taylor1"]()])


def test_block_influence_of_the_runner_is_the_token_mean():
    model, windows = _model(), _windows(n=2)
    result = analyse_layerwise(model, windows, [LAYER_IMPORTANCE["block_influence"]()])
    (h, kw), = layer_inputs(model, windows, 4)
    with torch.no_grad():
        out = model.model.layers[0](h, **kw)
    assert math.isclose(float(result.layer_scores["block_influence/layer/n1"][0]),
                        float(block_influence(h, out).mean()), rel_tol=1e-9)
