"""The streaming writers: a store plus a plan, written one tensor at a time, give what exporting the
pruned torch model gives; the HF checkpoint reloads as the pruned model; the "auto" intermediate
dtype keeps bf16 sources bit-exact and never writes an F16 infinity."""

from __future__ import annotations

import copy
import json

import gguf
import numpy as np
import pytest
import torch

from conftest import tiny_llama
from edgeprune.errors import EdgepruneError
from edgeprune.export import Provenance, export_gguf, write_gguf, write_hf_checkpoint
from edgeprune.export.hf_checkpoint import INDEX_FILE, SINGLE_FILE
from edgeprune.gguf_file import read_gguf
from edgeprune.models.weights import ModuleStore
from edgeprune.prune import ModelShape, Plan, PlanError, apply_plan, pruned_state_dict
from edgeprune.prune.apply import pruned_name, slice_tensor, sliced_shape
from edgeprune.quantize import collect_imatrix, quantize
from edgeprune.runtimes import llamacpp
from edgeprune.sparse.sequential import decoder_linear_weights, load_weights

C = tuple(range(128))
TOKENS = np.array([[1, 504, 2432, 28, 3300, 17, 33, 34, 35, 216, 4389, 29, 44, 9000, 12, 77, 6345, 2]])
PLANS = {
    "unpruned": Plan(),
    "depth+heads": Plan(drop_layers=(0,), heads=tuple((l, (1, 3)) for l in (1, 2, 3))),
    "ffn": Plan(ffn=tuple((l, C[::2]) for l in range(4))),
    "per-layer heads and KV": Plan(heads=((0, (0, 2)), (1, (2, 3)), (3, (1,)))),
    "attention removed": Plan(heads=((2, ()),)),
    "mlp removed": Plan(ffn=((1, ()),)),
    "combined": Plan(drop_layers=(1,), heads=((0, (1, 3)), (2, ())), ffn=((0, C[:100]), (3, ()))),
}
PROVENANCE = Provenance("tiny", "0" * 64, {})


def gguf_contents(path) -> tuple[dict, list[tuple[str, str, tuple[int, ...], bytes]]]:
    """Every metadata field, and every tensor (name, type, shape, bytes) in file order."""
    reader = read_gguf(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = [(t.name, t.tensor_type.name, tuple(int(x) for x in t.shape), np.array(t.data).tobytes())
               for t in reader.tensors]
    return fields, tensors


def assert_same_gguf(a, b) -> None:
    """Byte-identical files; where they differ, the first field or tensor that does (parsing takes seconds)."""
    if a.read_bytes() == b.read_bytes():
        return
    fields_a, tensors_a = gguf_contents(a)
    fields_b, tensors_b = gguf_contents(b)
    assert fields_a == fields_b
    assert [t[:3] for t in tensors_a] == [t[:3] for t in tensors_b]
    for x, y in zip(tensors_a, tensors_b, strict=True):
        assert x[3] == y[3], x[0]
    pytest.fail("the files differ outside their fields and tensors (padding or offsets)")


@pytest.fixture(scope="module")
def tiny():
    """tiny_llama(tied=...) built once per module (nothing here modifies it)."""
    models: dict[bool, object] = {}
    return lambda tied: models.setdefault(tied, tiny_llama(tied=tied))


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_slicing_one_tensor_is_slicing_the_state_dict(plan_name):
    model = tiny_llama(tied=False)
    plan, shape = PLANS[plan_name], ModelShape.from_config(model.config)
    state = model.state_dict()
    whole = pruned_state_dict(state, model.config, plan)
    one_by_one = {}
    for name, tensor in state.items():
        target = pruned_name(name, plan, shape)
        if target is None:
            continue
        new, layer, relative = target
        if layer is None:
            one_by_one[new] = tensor
            continue
        sliced = slice_tensor(relative, tensor, layer, plan, shape)
        assert (sliced is None) == (sliced_shape(relative, tuple(tensor.shape), layer, plan, shape) is None)
        if sliced is not None:
            assert tuple(sliced.shape) == sliced_shape(relative, tuple(tensor.shape), layer, plan, shape)
            one_by_one[new] = sliced
    assert list(one_by_one) == list(whole)
    for name, tensor in whole.items():
        assert torch.equal(tensor, one_by_one[name]), name


@pytest.mark.parametrize(("plan_name", "dtype"), [(p, "F32") for p in PLANS] + [("combined", "auto")])
@pytest.mark.parametrize("tied", [True, False])
def test_store_plus_plan_writes_the_gguf_of_the_pruned_model(tmp_path, embedded_tokenizer_spec, tiny, plan_name,
                                                             tied, dtype):
    model, plan = tiny(tied), PLANS[plan_name]
    provenance = Provenance("tiny", "0" * 64, plan.to_dict())
    streamed, exported = tmp_path / "streamed.gguf", tmp_path / "exported.gguf"
    write_gguf(ModuleStore(model), plan, embedded_tokenizer_spec, streamed, dtype, provenance, "tiny")
    export_gguf(apply_plan(model, plan), embedded_tokenizer_spec, exported, dtype, provenance, "tiny")
    assert_same_gguf(streamed, exported)
    assert not list(tmp_path.glob("*.tmp"))


def test_overrides_replace_the_sliced_tensors(tmp_path, embedded_tokenizer_spec, tiny):
    """What the sparse path does: the pruned model's linears replaced by weights computed elsewhere."""
    model, plan = tiny(True), PLANS["combined"]
    pruned = apply_plan(model, plan)
    torch.manual_seed(1)
    replaced = {n: w * (torch.rand_like(w) > 0.5) for n, w in decoder_linear_weights(pruned).items()}
    load_weights(pruned, replaced)
    streamed, exported = tmp_path / "streamed.gguf", tmp_path / "exported.gguf"
    overrides = {n: (lambda w=w: w) for n, w in replaced.items()}
    write_gguf(ModuleStore(model), plan, embedded_tokenizer_spec, streamed, "F32", PROVENANCE, "t", overrides)
    export_gguf(pruned, embedded_tokenizer_spec, exported, "F32", PROVENANCE, "t")
    assert_same_gguf(streamed, exported)

    wrong = {"model.layers.0.self_attn.q_proj.weight": lambda: torch.zeros(3, 3)}
    with pytest.raises(EdgepruneError, match="computed for another plan"):
        write_gguf(ModuleStore(model), plan, embedded_tokenizer_spec, streamed, "F32", PROVENANCE, "t", wrong)
    with pytest.raises(EdgepruneError, match="does not have"):
        write_gguf(ModuleStore(model), plan, embedded_tokenizer_spec, streamed, "F32", PROVENANCE, "t",
                   {"model.layers.3.mlp.up_proj.weight": lambda: torch.zeros(1)})  # 3 layers after the plan
    assert_same_gguf(streamed, exported)  # a failed write leaves the old file


def _types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in read_gguf(path).tensors}


def test_auto_keeps_bf16_bits_and_writes_f16_otherwise(tmp_path, embedded_tokenizer_spec, tiny):
    model = tiny(False)
    bf16 = tiny_llama(tied=False).to(torch.bfloat16)
    paths = {"fp32": tmp_path / "fp32.gguf", "bf16": tmp_path / "bf16.gguf"}
    write_gguf(ModuleStore(model), Plan(), embedded_tokenizer_spec, paths["fp32"], "auto", PROVENANCE, "t")
    write_gguf(ModuleStore(bf16), Plan(), embedded_tokenizer_spec, paths["bf16"], "auto", PROVENANCE, "t")
    for source, path in paths.items():
        reader = read_gguf(path)
        matrices = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
        vectors = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 1}
        assert matrices == {"F16" if source == "fp32" else "BF16"} and vectors == {"F32"}
        file_type = reader.get_field("general.file_type").contents()
        assert file_type == (gguf.LlamaFileType.MOSTLY_F16 if source == "fp32" else gguf.LlamaFileType.MOSTLY_BF16)
    written = {t.name: np.array(t.data) for t in read_gguf(paths["bf16"]).tensors}
    source = bf16.model.embed_tokens.weight.detach().view(torch.int16).numpy()
    assert np.array_equal(written["token_embd.weight"].view(np.int16), source)  # not rounded twice


def test_auto_writes_bf16_where_f16_would_overflow(tmp_path, embedded_tokenizer_spec):
    model = tiny_llama(tied=False)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = 1.0e5  # past F16's 65504
    path = tmp_path / "auto.gguf"
    write_gguf(ModuleStore(model), Plan(), embedded_tokenizer_spec, path, "auto", PROVENANCE, "t")
    reader = read_gguf(path)  # parses: the patched type keeps every offset where it was
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_down.weight"] == "BF16"
    assert {types[n] for n in types if n != "blk.1.ffn_down.weight" and "norm" not in n} == {"F16"}
    tensors = {t.name: t for t in reader.tensors}
    down = gguf.quants.dequantize(tensors["blk.1.ffn_down.weight"].data, gguf.GGMLQuantizationType.BF16)
    expected = model.model.layers[1].mlp.down_proj.weight.detach().to(torch.bfloat16).float().numpy()
    assert np.array_equal(down.reshape(expected.shape), expected)
    after = np.array(tensors["blk.1.ffn_up.weight"].data)  # the next tensor still reads right
    assert np.array_equal(after, model.model.layers[1].mlp.up_proj.weight.detach().half().numpy())
    logits = next(llamacpp.sequence_logits(path, TOKENS, threads=2))
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("kind", ["F16", "BF16"])
def test_quantizer_takes_16_bit_intermediates_with_an_imatrix(tmp_path, embedded_tokenizer_spec, kind):
    """llama.cpp widens a 16-bit matrix to F32 exactly before quantizing: for weights a 16-bit type
    holds, the F16/BF16 intermediate gives the F32 intermediate's Q4_K_M, byte for byte. Widths of
    256 so Q4_K applies."""
    from test_quantize import _model

    dtype = torch.float16 if kind == "F16" else torch.bfloat16
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    imatrix = collect_imatrix(model, torch.from_numpy(TOKENS).repeat(2, 1))
    sources = {"F32": (model, "F32"), kind: (copy.deepcopy(model).to(dtype), "auto")}
    outputs = []
    for name, (source, dtype_arg) in sources.items():
        src, dst = tmp_path / f"{name}.gguf", tmp_path / f"{name}-q4.gguf"
        write_gguf(ModuleStore(source), Plan(), embedded_tokenizer_spec, src, dtype_arg, PROVENANCE, "t")
        quantize(src, dst, "Q4_K_M", threads=2, imatrix=imatrix)
        outputs.append(dst)
    intermediate = tmp_path / f"{kind}.gguf"
    types = _types(intermediate)
    assert types["blk.0.attn_q.weight"] == kind and types["token_embd.weight"] == kind
    assert outputs[1].stat().st_size < 0.5 * intermediate.stat().st_size  # 4-6 bits a weight, not 16
    assert_same_gguf(*outputs)


def _logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits


@pytest.mark.parametrize("plan_name", ["unpruned", "depth+heads", "ffn"])
@pytest.mark.parametrize("tied", [True, False])
def test_streamed_hf_checkpoint_loads_as_the_pruned_model(tmp_path, tiny, plan_name, tied):
    from transformers import LlamaForCausalLM

    model, plan = tiny(tied), PLANS[plan_name]
    directory = tmp_path / "hf"
    write_hf_checkpoint(ModuleStore(model), plan, None, directory)
    assert (directory / SINGLE_FILE).is_file() and not (directory / INDEX_FILE).exists()
    loaded, info = LlamaForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert loaded.config.tie_word_embeddings == tied
    torch.testing.assert_close(_logits(loaded.eval()), _logits(apply_plan(model, plan)), rtol=0, atol=0)


def test_hf_checkpoint_shards_keep_the_stored_dtype_and_take_overrides(tmp_path):
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    model = tiny_llama(tied=False).to(torch.bfloat16)
    plan = PLANS["depth+heads"]
    pruned = apply_plan(model, plan)
    replaced = {"model.layers.1.mlp.up_proj.weight": torch.zeros_like(pruned.model.layers[1].mlp.up_proj.weight)}
    load_weights(pruned, replaced)
    directory = tmp_path / "hf"
    # An embedding is 49152 x 64 bf16 = 6 MiB: 4 MiB shards put it, the head and the layers apart.
    write_hf_checkpoint(ModuleStore(model), plan, {k: (lambda v=v: v) for k, v in replaced.items()}, directory,
                        max_shard_bytes=4 * 1024**2)
    index = json.loads((directory / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 3 and not (directory / SINGLE_FILE).exists()
    for file in files:
        with safe_open(str(directory / file), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    loaded = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)  # as apply_plan holds bf16 values
    assert loaded.model.layers[1].mlp.up_proj.weight.count_nonzero() == 0
    # Weights, not logits: the bf16 reference's RoPE buffer is bf16 too, a reloaded model's is not.
    expected, got = pruned.state_dict(), loaded.state_dict()
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_hf_checkpoint_refuses_per_layer_shapes_and_an_existing_directory(tmp_path, tiny):
    model = tiny(True)
    with pytest.raises(PlanError, match="only the GGUF"):
        write_hf_checkpoint(ModuleStore(model), PLANS["combined"], None, tmp_path / "hf")
    assert not list(tmp_path.iterdir())
    (tmp_path / "hf").mkdir()
    with pytest.raises(EdgepruneError, match="exists already"):
        write_hf_checkpoint(ModuleStore(model), Plan(), None, tmp_path / "hf")


EMBEDDED_PLAN = Plan(drop_layers=(5, 20), heads=((1, (0, 1, 2, 6, 7, 8)), (3, ()), (10, (3, 4, 5))),
                     ffn=((2, tuple(range(0, 1536, 3))), (12, ()), (25, tuple(range(1000)))))


def test_embedded_gguf_store_plus_plan_is_todays_f32_export_bit_for_bit(tmp_path, embedded_reference):
    """Today's path dequantizes the embedded GGUF with transformers into an fp32 model, applies the
    plan and exports; the streamed one reads the GGUF a tensor at a time. Same bytes, tensor by tensor."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = embedded_reference
    path, store = ref.source.path, ref.weights
    assert store.tied
    old = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    provenance = Provenance("embedded", ref.sha256, EMBEDDED_PLAN.to_dict())
    streamed, today = tmp_path / "streamed.gguf", tmp_path / "today.gguf"
    write_gguf(store, EMBEDDED_PLAN, ref.tokenizer_spec, streamed, "F32", provenance, "e")
    export_gguf(apply_plan(old, EMBEDDED_PLAN), ref.tokenizer_spec, today, "F32", provenance, "e")
    assert read_gguf(streamed).get_field("general.architecture").contents() == "deci"
    assert_same_gguf(streamed, today)
