"""Structured methods: allocation of widths over layers (pure), each registered method's plan on a
tiny in-process model (runnable, GQA-consistent), and `edgeprune prune --method`."""

import json

import pytest
import torch
from pydantic import ValidationError

from conftest import tiny_llama
from edgeprune.prune import ModelShape, apply_plan
from edgeprune.structured import STRUCTURED_METHODS, StructuredSettings
from edgeprune.structured.allocation import allocate, best_heads, head_counts, nearest_head_count, shared_heads
from edgeprune.structured.analysis import analyse, load_scores, save_scores
from edgeprune.structured.methods import DepthMethod, WidthMethod

VOCAB = 256


def _model(n_layers=6):
    # 8 query heads over 4 KV groups (2 per group), FFN 128: every width choice has room.
    return tiny_llama(tied=True, vocab=VOCAB, n_layers=n_layers, n_head=8, n_head_kv=4)


def _windows(n=4, seq=24):
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(3))


# -- allocation (pure) ----------------------------------------------------------------------------

def test_uniform_allocation_keeps_the_same_multiple_everywhere():
    scores = [torch.rand(1024) for _ in range(3)]
    assert allocate(scores, 0.75, "uniform", multiple=256) == [768, 768, 768]
    assert allocate(scores, 0.75, "uniform", multiple=32) == [768, 768, 768]
    assert allocate(scores, 0.01, "uniform", multiple=256, minimum=256) == [256, 256, 256]


def test_global_allocation_keeps_more_where_units_stand_apart():
    # Layer 0: a few units far above the rest (heavy tail); layer 1: all alike. Standardised and
    # ranked together, the heavy tail's units pass the global threshold more often.
    flat = torch.linspace(0.0, 1.0, 100)
    tail = torch.cat([torch.zeros(70), torch.linspace(5.0, 10.0, 30)])
    counts = allocate([tail, flat], 0.4, "global")
    assert sum(counts) == pytest.approx(80, abs=2)
    assert counts[0] != counts[1]
    # Rounded to the multiple, never below the minimum nor above the layer.
    counts = allocate([tail, flat], 0.4, "global", multiple=32, minimum=32)
    assert all(c % 32 == 0 and 32 <= c <= 100 for c in counts)
    with pytest.raises(ValueError):
        allocate([flat], 0.0, "global")


def test_head_counts_are_gqa_structures():
    assert head_counts(3, 3) == [1, 2, 3, 4, 6, 9]
    assert nearest_head_count(5, 3, 3) == 6 and nearest_head_count(7, 3, 3) == 6 and nearest_head_count(8, 3, 3) == 9
    scores = torch.tensor([9.0, 1.0, 1.0, 5.0, 5.0, 4.0, 0.1, 0.1, 0.2])
    kept = best_heads(scores, 3, 6)  # 2 groups x 3 (sum 26) beats 3 groups x 2 (sum 24.2)
    assert kept == (0, 1, 2, 3, 4, 5)
    assert best_heads(scores, 3, 3) == (0, 3, 8)  # 3 groups x 1 (9+5+0.2) beats 1 group x 3 (5+5+4)
    assert best_heads(torch.tensor([1.0, 1.0, 1.0, 5.0, 5.0, 4.0, 0.1, 0.1, 0.2]), 3, 3) == (3, 4, 5)


def test_shared_heads_give_every_layer_one_gqa_split():
    """Alone, layer 0 keeps 3 groups x 1 (9 + 5 + 0.2) and layer 1 one group x 3; shared, the split
    with the most score over both layers goes to both: 1 x 3 (11 + 14) beats 3 x 1 (14.2 + 6.2)."""
    first = torch.tensor([9.0, 1.0, 1.0, 5.0, 0.0, 0.0, 0.2, 0.1, 0.1])
    second = torch.tensor([1.0, 1.0, 1.0, 5.0, 5.0, 4.0, 0.1, 0.1, 0.2])
    assert best_heads(first, 3, 3) == (0, 3, 6) and best_heads(second, 3, 3) == (3, 4, 5)
    assert shared_heads([first, second], 3, 3) == [(0, 1, 2), (3, 4, 5)]
    assert shared_heads([first, first], 3, 3) == [(0, 3, 6), (0, 3, 6)]


@pytest.mark.parametrize(("method", "settings", "needle"), [
    ("block-influence", {"granularity": "attention"}, "--granularity attention removes sublayers"),
    ("flap", {"head_ratio": 0.5, "allocation": "global"}, "--allocation global gives layers different widths"),
])
def test_a_family_of_one_shape_refuses_what_makes_layers_differ(method, settings, needle):
    from dataclasses import replace

    from edgeprune.errors import EdgepruneError

    shape = ModelShape(n_layers=8, n_head=6, n_head_kv=2, head_dim=8, hidden=48, ffn=96, vocab=100)
    config = StructuredSettings(method=method, **settings)
    STRUCTURED_METHODS[method].check(config, shape)  # Llama: per-layer shapes are fine
    with pytest.raises(EdgepruneError, match=needle + ".*qwen3 models with one shape for every layer"):
        STRUCTURED_METHODS[method].check(config, replace(shape, family="qwen3", per_layer=False))


# -- every method on a tiny model ----------------------------------------------------------------

def _settings(name: str, allocation: str) -> StructuredSettings:
    if isinstance(STRUCTURED_METHODS[name], WidthMethod):
        return StructuredSettings(method=name, head_ratio=0.3, ffn_ratio=0.25, ffn_multiple=32, allocation=allocation)
    return StructuredSettings(method=name, layer_ratio=0.34)


@pytest.mark.parametrize("name, allocation", [(n, "uniform") for n in STRUCTURED_METHODS] + [
    (n, "global") for n, m in STRUCTURED_METHODS.items() if isinstance(m, WidthMethod)])
def test_every_method_gives_a_runnable_consistent_plan(name, allocation, tmp_path):
    model, windows = _model(), _windows()
    shape = ModelShape.from_config(model.config)
    settings = _settings(name, allocation)
    method = STRUCTURED_METHODS[name]
    layer_methods, unit_methods = method.analyses(settings, shape)
    scores = analyse(model, windows, layer_methods, unit_methods)
    save_scores(tmp_path / "s.safetensors", scores)  # what the cache stores reads back the same
    meta = {"runner": scores.runner, "calibration_tokens": scores.calibration_tokens, "seconds": scores.seconds,
            "peak_rss_bytes": scores.peak_rss_bytes}
    again = load_scores(tmp_path / "s.safetensors", meta)
    plan = method.plan(settings, shape, again)
    assert plan == method.plan(settings, shape, scores)
    plan.validate(shape)
    pruned = apply_plan(model, plan)
    with torch.no_grad():
        logits = pruned(windows[:1]).logits
    assert torch.isfinite(logits).all()
    if isinstance(method, DepthMethod):
        assert len(plan.drop_layers) == 2 and 0 not in plan.drop_layers and 5 not in plan.drop_layers
    else:
        layers = plan.layer_shapes(shape)
        assert sum(l.n_head for l in layers) < 8 * 6 and sum(l.ffn for l in layers) < 128 * 6
        for l in layers:
            assert l.n_head % l.n_head_kv == 0 and l.n_head // l.n_head_kv <= 2  # GQA structure kept
            assert l.ffn % 32 == 0


def test_depth_methods_remove_an_identity_layer_first():
    model, windows = _model(), _windows()
    with torch.no_grad():  # layer 3 adds nothing to the residual stream
        model.model.layers[3].self_attn.o_proj.weight.zero_()
        model.model.layers[3].mlp.down_proj.weight.zero_()
    shape = ModelShape.from_config(model.config)
    for name in ("block-influence", "loss-increase"):
        settings = StructuredSettings(method=name, layer_ratio=0.17)  # one layer of six
        method = STRUCTURED_METHODS[name]
        scores = analyse(model, windows, *method.analyses(settings, shape))
        values = scores.layer_scores[method.configured(settings, shape).key]
        assert float(values[3]) == pytest.approx(0.0, abs=1e-6)
        drop = method.plan(settings, shape, scores).drop_layers
        # Block Influence is never below 0: the identity goes. Skipping a random layer may lower the
        # loss of a random model, so loss-increase removes whichever layer is cheapest to skip.
        assert drop == ((3,) if name == "block-influence" else (int(torch.argmin(values[1:5])) + 1,))


def test_sublayer_granularity_removes_attention_only():
    model, windows = _model(), _windows()
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
    shape = ModelShape.from_config(model.config)
    settings = StructuredSettings(method="block-influence", layer_ratio=0.17, granularity="attention")
    method = STRUCTURED_METHODS["block-influence"]
    plan = method.plan(settings, shape, analyse(model, windows, *method.analyses(settings, shape)))
    assert plan.drop_layers == () and plan.heads == ((2, ()),) and plan.ffn == ()


def test_angular_distance_removes_one_inner_block():
    model, windows = _model(n_layers=8), _windows()
    shape = ModelShape.from_config(model.config)
    settings = StructuredSettings(method="angular-distance", layer_ratio=0.375)  # 3 of 8
    method = STRUCTURED_METHODS["angular-distance"]
    drop = method.plan(settings, shape, analyse(model, windows, *method.analyses(settings, shape))).drop_layers
    assert len(drop) == 3 and drop == tuple(range(drop[0], drop[0] + 3)) and 0 < drop[0] and drop[-1] < 7


def test_flap_says_its_bias_compensation_is_unavailable():
    note, = STRUCTURED_METHODS["flap"].notes()
    assert "bias compensation is unavailable" in note and "attn_output.bias" in note
    assert all(not m.notes() for n, m in STRUCTURED_METHODS.items() if n != "flap")


def test_settings_refuse_what_cannot_be_done():
    with pytest.raises(ValidationError, match="unknown structured method"):
        StructuredSettings(method="shortgpt")
    with pytest.raises(ValidationError, match="head-ratio"):
        StructuredSettings(method="flap")
    with pytest.raises(ValidationError):
        StructuredSettings(method="flap", head_ratio=0.2, extra=1)


# -- the command ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--method", "shortgpt"], "Unknown --method 'shortgpt': structured methods are block-influence"),
    (["--layer-ratio", "0.2"], "--layer-ratio: only meaningful with a structured method"),
    (["--method", "wanda", "--head-ratio", "0.2"], "--head-ratio: only meaningful with a structured method"),
    (["--method", "flap", "--sparsity", "0.5"], "--sparsity: only meaningful with a sparse method"),
    (["--method", "flap"], "give --head-ratio and/or --ffn-ratio"),
    (["--method", "block-influence", "--layer-ratio", "1.5"], "layer_ratio"),
])
def test_prune_method_bad_input_is_one_sentence(tmp_path, args, message):
    from test_cli import edgeprune

    proc = edgeprune("prune", *args, "-o", str(tmp_path / "out"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_prune_with_a_width_method_writes_a_per_layer_gguf(tmp_path, cache_dir, embedded_reference):
    from test_cli import edgeprune

    out = tmp_path / "out"
    proc = edgeprune("prune", "--method", "wanda-sp", "--head-ratio", "0.34", "--ffn-ratio", "0.2", "-o", str(out),
                     "-p", "quick", "--cache-dir", str(cache_dir))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["structured"]["settings"]["method"] == "wanda-sp"
    assert report["structured"]["analysis"]["runner"] == "layerwise"
    record = json.loads((out / "plan.json").read_text())
    shapes = record["layers"]
    assert all(s["n_head"] % s["n_head_kv"] == 0 and s["ffn"] % 256 == 0 for s in shapes)
    heads = sum(s["n_head"] for s in shapes)
    assert heads < 9 * 30 and sum(s["ffn"] for s in shapes) < 1536 * 30
    assert 0 < report["quality"]["mean_kld"] < 5 and "Method:     wanda-sp" in proc.stdout
