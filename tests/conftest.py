"""Shared fixtures: tiny Llama models built in-process, the embedded default model, llama.cpp's source."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeprune.gguf_file import read_gguf
from edgeprune.models.tokenizer import TokenizerSpec

REPO = Path(__file__).resolve().parent.parent


def flip_byte(path: Path) -> None:
    """Change one bit of the byte in the middle of `path`, in place."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def session_cache_path() -> Path:
    return Path(os.environ.get("EDGEPRUNE_TEST_CACHE", REPO / ".cache" / "tests"))


def pytest_configure(config: pytest.Config) -> None:
    from transformers.utils import logging as hf_logging

    # A command run without --cache-dir uses the tests' cache, never the user's ~/.cache/edgeprune
    # (whose state, e.g. an interrupted build's leftovers, is not the tests' business).
    os.environ["EDGEPRUNE_CACHE"] = str(session_cache_path())

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """One artifact cache for the whole session (the embedded reference takes ~30 s to build once)."""
    path = session_cache_path()
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def embedded_reference(cache_dir: Path):
    from edgeprune.models import load_reference, resolve_source

    return load_reference(resolve_source(None), cache_dir)


@pytest.fixture(scope="session")
def embedded_tokenizer_spec() -> TokenizerSpec:
    from edgeprune.models.embedded import embedded_gguf

    return TokenizerSpec.from_gguf(read_gguf(embedded_gguf()))


def tiny_llama(*, tied: bool, n_head: int = 4, n_head_kv: int = 2, n_layers: int = 4, seed: int = 0,
               vocab: int = 49152, hidden: int = 64, head_dim: int = 16, ffn: int = 128):
    """A small random Llama whose logits are spread enough for top-1 comparisons to mean something."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=n_layers,
        num_attention_heads=n_head,
        num_key_value_heads=n_head_kv,
        head_dim=head_dim,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # RMSNorm gains around 1, not all equal
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                # Default init (std 0.02) gives near-uniform logits where top-1 is a coin toss;
                # std 0.15 spreads logits over several units.
                p.normal_(0.0, 0.15)
    return model.eval()


def calibration_text(n: int = 400) -> str:
    """Plain sentences, paragraph per line pair: a --calib file (and a tokenizer corpus) for tiny models."""
    return "\n\n".join(f"Pump {i} reported a pressure of {i * 7 % 90} bar at {i % 24}:00, within limits."
                       for i in range(n))


def tiny_tokenizer(vocab: int):
    """A byte-level BPE tokenizer (GPT-2 splits) of `vocab` ids, trained in-process: tiny models with a
    small vocabulary need a tokenizer that fits it. <unk>, <s>, </s> are ids 0, 1, 2, as in tiny_llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(calibration_text().split("\n\n"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny_hf(directory: Path, vocab: int = 512, **llama: object) -> Path:
    """A tiny_llama (keyword arguments as tiny_llama's) and a tokenizer that fits it, as an HF directory."""
    tiny_llama(tied=False, vocab=vocab, **llama).save_pretrained(directory)
    tiny_tokenizer(vocab).save_pretrained(directory)
    return directory


def tiny_build_context(tmp_path: Path):
    """A build's context (executors.BuildContext) for a tiny HF Llama: its reference, a stage cache
    under tmp_path/cache, short calibration and held-out windows, the reference's log-probs."""
    from edgeprune.config import CalibrationSettings
    from edgeprune.data import from_file
    from edgeprune.executors import BuildContext
    from edgeprune.models import load_reference, resolve_source
    from edgeprune.pipeline import reference_logprobs
    from edgeprune.stages import StageRunner

    reference = load_reference(resolve_source(str(save_tiny_hf(tmp_path / "tiny", vocab=512))), tmp_path / "cache")
    runner = StageRunner(tmp_path / "cache" / "stages")
    calib = tmp_path / "calib.txt"
    calib.write_text(calibration_text())
    splits = from_file(calib, reference.tokenizer, CalibrationSettings(samples=4, heldout_samples=2, seq_len=32))
    ref_logps, _ = reference_logprobs(reference, splits, runner)
    return BuildContext.here(reference, runner, splits, ref_logps, tmp_path / "cache")


@contextlib.contextmanager
def tiny_evaluator(tmp_path: Path, **kwargs):
    """A CandidateEvaluator over `tiny_build_context`, timing on this machine with llama.cpp (quick
    profile's search settings; keyword arguments as CandidateEvaluator's)."""
    from edgeprune.config import load_profile
    from edgeprune.devices import get_device
    from edgeprune.evaluator import CandidateEvaluator
    from edgeprune.fleet import Fleet
    from edgeprune.measure import Workload
    from edgeprune.runtimes.registry import get_runtime

    context = tiny_build_context(tmp_path)
    with get_device("local") as device:
        fleet = Fleet([{"llama.cpp": get_runtime().runner(device)}])
        yield CandidateEvaluator(context, fleet, Workload((1, 2), 2, 1, 0, 3), load_profile("quick").search,
                                 threads=2, **kwargs)


@pytest.fixture(scope="session")
def llama_cpp_src() -> Path:
    """llama.cpp's source tree from the llama-cpp-python sdist (unpacked by `make test`)."""
    path = Path(os.environ.get("EDGEPRUNE_LLAMA_CPP_SRC", REPO / ".deps" / "llama.cpp"))
    if not (path / "convert_hf_to_gguf.py").is_file():
        pytest.fail(f"llama.cpp source not found at {path}: run `make install` (it unpacks the sdist).")
    return path


def run_converter(src: Path, hf_dir: Path, out: Path, outtype: str = "f32", pre: str | None = None) -> None:
    """llama.cpp's convert_hf_to_gguf.py on `hf_dir`. `pre` names the pre-tokenizer for a vocabulary the
    converter's table of known tokenizer hashes cannot name (a test's own vocabulary split the way a
    family's tokenizer class splits it); everything else is the converter's own."""
    args = [str(hf_dir), "--outtype", outtype, "--outfile", str(out)]
    script = [str(src / "convert_hf_to_gguf.py")]
    if pre is not None:
        script = ["-c", "import runpy, sys; sys.path[0:0] = [sys.argv[1], sys.argv[1] + '/gguf-py']; "
                        "import conversion.base as b; "
                        f"b.TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre!r}; "
                        "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')",
                  str(src), str(src / "convert_hf_to_gguf.py")]
    proc = subprocess.run([sys.executable, *script, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real sshd on 127.0.0.1 with throw-away keys (see sshd.py), shared by the ssh:// tests."""
    from sshd import start_sshd

    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.proc.terminate()
    server.proc.wait(10)


def build_verified_bundle(out: Path, model: Path, calib: Path, cache_dir: Path):
    """`build` with a budget the unpruned model meets, then `verify` PASS on the bundle: the build's
    report and a reader of the bundled GGUF."""
    from test_cli import edgeprune

    proc = edgeprune("build", "--target", "demo", "--model", str(model), "--calib", str(calib), "--profile", "quick",
                     "--latency-budget", "60", "-o", str(out), "--cache-dir", str(cache_dir), "-q")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["search"]["selected"] == "c00"
    proc = edgeprune("verify", str(out))
    assert proc.returncode == 0 and "PASS" in proc.stdout, proc.stderr
    return report, read_gguf(out / report["artifact"])


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    """A transformers model's logits for one batch of token ids, as float32."""
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits[0].float().numpy()


def llama_cpp_logits(path: Path, tokens: np.ndarray) -> np.ndarray:
    """llama.cpp's logits for the same ids, with an F32 KV cache (the parity tests' bound assumes it)."""
    from edgeprune.runtimes import llamacpp

    return next(llamacpp.sequence_logits(path, tokens, threads=2, f32_kv_cache=True))


def gguf_contents(path: Path, prefixes: tuple[str, ...]) -> tuple[dict, dict]:
    """A GGUF's metadata under `prefixes`, and every tensor as (shape, type, data)."""
    reader = read_gguf(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith(prefixes)}
    tensors = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name, np.array(t.data)) for t in reader.tensors}
    return fields, tensors
