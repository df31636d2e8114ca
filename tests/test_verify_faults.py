"""`verify` unit checks on the embedded GGUF and small hand-made bundles (nothing compiled): the
agreement tolerance, manifest validation, signatures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from handmade_bundle import make_bundle, ssh_keypair

from edgeprune.bundle import sign_manifest
from edgeprune.errors import EdgepruneError, VerificationFailed
from edgeprune.models.embedded import embedded_gguf
from edgeprune.runtimes import llamacpp
from edgeprune.runtimes.llamacpp.answers import MAX_LOGIT_GAP, TOP_K, agreement, token_text
from edgeprune.verify import PROMPT, check_signature, manifest_path, read_manifest, verify

N = 16


@pytest.fixture(scope="module")
def model() -> Path:
    return embedded_gguf()


@pytest.fixture(scope="module")
def host_tokens(model) -> list[int]:
    return llamacpp.greedy_answer(model, llamacpp.tokenize(model, PROMPT), N, threads=2)


def damaged_copy(src: Path, dst: Path) -> Path:
    """`src` with the rows of every third layer's FFN output projection shuffled: a model file whose
    tensors were corrupted, still loadable."""
    import gguf

    shutil.copyfile(src, dst)
    reader = gguf.GGUFReader(str(dst), "r+")
    rng = np.random.default_rng(0)
    for t in reader.tensors:
        if t.name.endswith("ffn_down.weight") and int(t.name.split(".")[1]) % 3 == 0:
            t.data[:] = t.data[rng.permutation(t.data.shape[0])]
    del reader
    return dst


# -- agreement ---------------------------------------------------------------------------------------


def test_the_hosts_own_answer_agrees_exactly(model, host_tokens):
    a = agreement(model, PROMPT, token_text(model, host_tokens), N, threads=2)
    assert a.passed and a.failure == ""
    judged = N if len(host_tokens) == N else len(host_tokens) + 1  # an early stop is judged too
    assert a.top1 == a.positions == judged
    assert a.max_gap == 0.0


def test_a_swap_of_near_tied_tokens_is_within_tolerance(model, host_tokens):
    # Where the host's two best tokens are closest, the device takes the second, then goes on greedily.
    prompt = llamacpp.tokenize(model, PROMPT)
    logits = next(llamacpp.sequence_logits(model, np.array([prompt + host_tokens]), threads=2))
    swaps = []
    for k, row in enumerate(logits[len(prompt) - 1: len(prompt) - 1 + len(host_tokens)]):
        first, second = (int(t) for t in np.argsort(-row)[:2])
        a, b = token_text(model, [first]), token_text(model, [second])
        # (a batched pass may rank a near-tie the other way than the greedy pass did; and one token's
        # text starting another's would read as that one)
        if first == host_tokens[k] and not (a.startswith(b) or b.startswith(a)):
            swaps.append((float(row[first] - row[second]), k, second))
    gap, k, second = min(swaps)
    assert gap < MAX_LOGIT_GAP  # the embedded model has such a position in its answer
    rest = llamacpp.greedy_answer(model, prompt + host_tokens[:k] + [second], N - k - 1, threads=2)
    device = token_text(model, host_tokens[:k] + [second] + rest)
    a = agreement(model, PROMPT, device, N, threads=2)
    assert a.passed, a.failure
    assert a.top1 == a.positions - 1 and a.worst["token"] == k and a.worst["rank"] > 1
    assert a.max_gap == pytest.approx(gap, abs=0.1)  # batched and one-by-one passes round differently


def test_a_token_outside_the_hosts_top_k_fails(model, host_tokens):
    prompt = llamacpp.tokenize(model, PROMPT)
    logits = next(llamacpp.sequence_logits(model, np.array([prompt + host_tokens]), threads=2))
    far = int(np.argsort(-logits[len(prompt) - 1])[50])  # the host's 51st choice for the first token
    device = token_text(model, [far] + host_tokens[1:])
    a = agreement(model, PROMPT, device, N, threads=2)
    assert not a.passed and f"top {TOP_K} tokens" in a.failure and a.worst["token"] == 0


def test_the_answer_of_a_damaged_model_fails(model, tmp_path):
    damaged = damaged_copy(model, tmp_path / "damaged.gguf")
    prompt = llamacpp.tokenize(model, PROMPT)
    device = token_text(model, llamacpp.greedy_answer(damaged, prompt, N, threads=2))
    a = agreement(model, PROMPT, device, N, threads=2)
    assert not a.passed, a
    assert "at token" in a.failure


def test_the_answer_to_another_prompt_fails(model):
    other = llamacpp.greedy_answer(model, llamacpp.tokenize(model, "The capital of France is"), N, threads=2)
    device = token_text(model, other)
    a = agreement(model, PROMPT, device, N, threads=2)
    assert device.strip() and not a.passed and "at token" in a.failure


def test_an_answer_that_stops_where_the_host_would_not_fails(model, host_tokens):
    a = agreement(model, PROMPT, token_text(model, host_tokens[:3]), N, threads=2)
    assert not a.passed and a.positions == 3 and "its end of text" in a.failure


# -- manifest ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "reason"), [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ('{"run": {}}', "field files: Field required"),
    ('{"files": {"a": 3}}', "field files.a: Input should be a valid string"),
    ('{"files": {"a": "beef"}}', "field files.a: String should match pattern"),
    ('{"files": {}, "toolchain": {"arch": 7, "llama_cpp": "x"}}', "field toolchain.arch"),
    ('{"files": {"../x": "' + "0" * 64 + '"}}', "'../x' is not a plain relative path"),
    ('{"files": {"/etc/passwd": "' + "0" * 64 + '"}}', "'/etc/passwd' is not a plain relative path"),
    ('{"files": {}, "run": {"files": {"a/./b": "' + "0" * 64 + '"}}}', "not a plain relative path"),
])
def test_a_damaged_manifest_is_a_failure_in_one_sentence(tmp_path, text, reason):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(VerificationFailed) as e:
        read_manifest(manifest_path(tmp_path))
    assert reason in str(e.value) and "\n" not in str(e.value)


def test_a_manifest_keeps_its_free_form_fields(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    raw, manifest = read_manifest(manifest_path(bundle))
    assert raw["plan"] == {"free": "form"} and manifest.toolchain is None and len(manifest.files) == 2
    assert manifest.runtime == "llama.cpp"  # bundles from before the field ran llama.cpp


def test_a_bundle_for_a_runtime_this_edgeprune_lacks_is_refused_in_one_sentence(tmp_path):
    bundle = make_bundle(tmp_path / "b", runtime="tensorrt")
    with pytest.raises(EdgepruneError) as e:
        verify(bundle)
    assert str(e.value) == (f"Bundle {bundle} runs its model with 'tensorrt', which this edgeprune cannot run (it "
                            "has llama.cpp, onnxruntime): verify it with the edgeprune that built it.")


# -- signatures --------------------------------------------------------------------------------------


@pytest.fixture
def signed(tmp_path) -> tuple[Path, Path, Path]:
    key, pub = ssh_keypair(tmp_path)
    bundle = make_bundle(tmp_path / "bundle")
    sign_manifest(bundle, key)
    return bundle, key, pub


def test_a_signature_verifies_with_the_public_key_or_an_allowed_signers_file(signed, tmp_path):
    bundle, _, pub = signed
    assert check_signature(bundle, pub) == "signed by edgeprune, verified"
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f'release-team@example.org namespaces="edgeprune-bundle" {pub.read_text()}')
    assert check_signature(bundle, allowed) == "signed by release-team@example.org, verified"
    assert check_signature(bundle, None) == "signed, not checked"
    assert check_signature(make_bundle(tmp_path / "plain"), None) == "unsigned"
    assert not [p.name for p in bundle.iterdir() if p.name.startswith(".")]  # nothing left of the staging


def test_a_changed_manifest_fails_its_signature(signed):
    bundle, _, pub = signed
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["README.md"] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VerificationFailed, match="changed after it was signed"):
        check_signature(bundle, pub)


def test_a_foreign_missing_or_garbled_signature_fails(signed, tmp_path):
    bundle, _, _ = signed
    _, other = ssh_keypair(tmp_path, "other")
    with pytest.raises(VerificationFailed, match="signed by a key that .* does not trust"):
        check_signature(bundle, other)
    (bundle / "manifest.json.sig").write_text("not a signature\n")
    with pytest.raises(VerificationFailed, match="not a valid SSH signature"):
        check_signature(bundle, other)
    (bundle / "manifest.json.sig").unlink()
    with pytest.raises(VerificationFailed, match="is not signed"):
        check_signature(bundle, other)


def test_a_signed_bundle_passes_its_checks_then_verify_runs(signed):
    bundle, _, pub = signed
    # A hand-made bundle has no binaries: reaching that sentence means signature and checksums held.
    with pytest.raises(EdgepruneError, match="holds no binaries") as e:
        verify(bundle, trusted_key=pub)
    assert not isinstance(e.value, VerificationFailed)


def test_unusable_signing_keys_are_bad_input(tmp_path, monkeypatch):
    bundle = make_bundle(tmp_path / "bundle")
    locked, _ = ssh_keypair(tmp_path, "locked", passphrase="secret")
    for key, reason in ((locked, "cannot be used without a prompt"), (tmp_path / "absent", "is not a file")):
        with pytest.raises(EdgepruneError, match=reason) as e:
            sign_manifest(bundle, key)
        assert not isinstance(e.value, VerificationFailed)
    assert not (bundle / "manifest.json.sig").exists()
    key, _ = ssh_keypair(tmp_path, "good")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # a machine without openssh-client
    with pytest.raises(EdgepruneError, match="ssh-keygen is not installed"):
        sign_manifest(bundle, key)
