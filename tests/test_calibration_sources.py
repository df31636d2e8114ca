"""Calibration sources: .jsonl chat records, Hugging Face datasets (a local directory: no download),
the profile overrides on the command line, and distinct self-generation prompts."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_cli import assert_clean_error, edgeprune

from edgeprune.cli_options import with_calibration
from edgeprune.config import CalibrationSettings, load_profile
from edgeprune.data import SELF_PROMPTS, HFDataset, from_file, from_hf, self_prompt
from edgeprune.errors import EdgepruneError

SMALL = CalibrationSettings(samples=2, heldout_samples=1, seq_len=16)
CHAT = [{"role": "user", "content": "Is the pump running?"},
        {"role": "assistant", "content": "Yes, at nominal pressure since this morning."}]
SENTENCES = [f"Line {i}: the compressor on bay {i % 7} was inspected and its filter replaced." for i in range(60)]


@pytest.fixture(scope="module")
def tokenizer(embedded_reference):
    return embedded_reference.tokenizer


def _expected_ids(tokenizer, docs: list[str], settings: CalibrationSettings) -> list[int]:
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids[: (settings.samples + settings.heldout_samples) * settings.seq_len]


def _windows(splits) -> list[int]:
    return splits.calib.flatten().tolist() + splits.heldout.flatten().tolist()


def test_jsonl_chat_records_render_with_the_models_template(tmp_path, tokenizer):
    calib = tmp_path / "chat.jsonl"
    calib.write_text(json.dumps({"messages": CHAT}) + "\n\n" + json.dumps({"text": " ".join(SENTENCES[:10])}) + "\n")
    settings = CalibrationSettings(samples=3, heldout_samples=2, seq_len=32)
    splits = from_file(calib, tokenizer, settings)

    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert _windows(splits) == _expected_ids(tokenizer, [rendered, " ".join(SENTENCES[:10])], settings)
    text = tokenizer.decode(splits.calib.flatten())
    assert "<|im_start|>user\nIs the pump running?<|im_end|>" in text
    assert "<|im_start|>assistant\nYes, at nominal pressure" in text
    assert splits.calib.shape == (3, 32) and splits.heldout.shape == (2, 32)
    assert splits.source.startswith("file chat.jsonl (sha256 ")


def test_chat_records_need_a_chat_template(tmp_path, tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    calib = tmp_path / "chat.jsonl"
    calib.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"messages": CHAT}) + "\n")
    with pytest.raises(EdgepruneError, match=r"chat\.jsonl line 2 holds chat \"messages\" but the model's tokenizer "
                                             r"has no chat template"):
        from_file(calib, plain, SMALL)


@pytest.mark.parametrize("line, needle", [
    ('{"messages": "hello"}', 'line 2 has a "messages" field that is not a non-empty list'),
    ('{"messages": [{"role": "user"}]}', 'line 2 has a "messages" field that is not a non-empty list'),
    ('{"messages": []}', 'line 2 has a "messages" field that is not a non-empty list'),
    ('{"body": "hello"}', 'line 2 has neither a string "text" field nor a "messages" list'),
    ('{"text": 3}', 'line 2 has neither a string "text" field nor a "messages" list'),
    ("not json", "line 2 is not valid JSON"),
])
def test_bad_jsonl_lines_name_file_and_line(tmp_path, tokenizer, line, needle):
    calib = tmp_path / "bad.jsonl"
    calib.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(EdgepruneError) as e:
        from_file(calib, tokenizer, SMALL)
    assert str(e.value).startswith(f"--calib {calib} ") and needle in str(e.value)
    assert "\n" not in str(e.value)


def _text_dataset(path, rows: list[str]):
    path.mkdir()
    (path / "train.jsonl").write_text("".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(rows)))
    return path


def test_hf_dataset_from_a_local_directory_streams_only_the_rows_it_needs(tmp_path, tokenizer):
    rows = []
    for s in SENTENCES:  # blank rows between paragraphs, as in wikitext
        rows += [s, ""]
    data = _text_dataset(tmp_path / "ds", rows)
    settings = CalibrationSettings(samples=2, heldout_samples=1, seq_len=32)
    splits = from_hf(HFDataset(name=str(data)), tokenizer, settings)

    assert _windows(splits) == _expected_ids(tokenizer, SENTENCES, settings)
    assert splits.calib.shape == (2, 32) and splits.heldout.shape == (1, 32)
    lengths = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) + 1 for s in SENTENCES]  # + EOS
    used = next(k for k in range(1, len(SENTENCES) + 1) if sum(lengths[:k]) >= 3 * 32)
    assert used < len(SENTENCES) // 2  # the rest of the dataset is never read
    assert splits.source == f"hf dataset {data} split train column text ({used} rows used)"


def test_hf_chat_messages_column_from_parquet(tmp_path, tokenizer):
    data = tmp_path / "chats"
    data.mkdir()
    conversations = [[{"role": "user", "content": f"Question {i}: how warm is bay {i}?"},
                      {"role": "assistant", "content": f"Bay {i} is at {18 + i} degrees."}] for i in range(12)]
    pq.write_table(pa.table({"messages": conversations, "topic": ["plant"] * 12}), data / "train.parquet")
    settings = CalibrationSettings(samples=2, heldout_samples=1, seq_len=64)
    splits = from_hf(HFDataset(name=str(data)), tokenizer, settings)

    rendered = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    assert _windows(splits) == _expected_ids(tokenizer, rendered, settings)
    text = tokenizer.decode(splits.calib.flatten())
    assert "<|im_start|>user\nQuestion 0: how warm is bay 0?<|im_end|>\n<|im_start|>assistant\nBay 0 is at" in text
    assert " column messages (" in splits.source


def test_hf_dataset_errors_are_one_sentence(tmp_path, tokenizer):
    data = _text_dataset(tmp_path / "ds", SENTENCES[:3])
    tokens = sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) + 1 for s in SENTENCES[:3])
    cases = [
        (HFDataset(name=str(data), split="test"), "could not be loaded (Bad split: test."),
        (HFDataset(name=str(tmp_path / "missing")), "could not be loaded"),
        (HFDataset(name=str(data), column="body"), "has no column 'body' (it has text, id)"),
        (HFDataset(name=str(data), column="id"), "row 0: column 'id' is neither text nor a list of chat messages"),
        (HFDataset(name=str(data)), f"(split train) has {tokens} tokens but the profile needs 240"),
    ]
    for source, needle in cases:
        with pytest.raises(EdgepruneError) as e:
            from_hf(source, tokenizer, CalibrationSettings(samples=10, heldout_samples=5, seq_len=16))
        assert str(e.value).startswith(f"--calib hf:{source.name}") and needle in str(e.value), str(e.value)
        assert "\n" not in str(e.value)


def test_overrides_replace_the_profiles_calibration_settings(tmp_path, tokenizer):
    quick = load_profile("quick")
    assert with_calibration(quick, {"samples": None, "heldout_samples": None, "seq_len": None, "seed": None}) is quick
    profile = with_calibration(quick, {"samples": 3, "heldout_samples": 2, "seq_len": 24, "seed": None})
    assert profile.calibration == CalibrationSettings(samples=3, heldout_samples=2, seq_len=24, seed=0)
    assert profile.search == quick.search and quick.calibration.seq_len == 96
    calib = tmp_path / "notes.txt"
    calib.write_text("\n\n".join(SENTENCES[:20]))
    splits = from_file(calib, tokenizer, profile.calibration)
    assert splits.calib.shape == (3, 24) and splits.heldout.shape == (2, 24)

    with pytest.raises(EdgepruneError, match=r"^Invalid calibration override --seq-len 8: input should be greater "
                                             r"than or equal to 16\.$"):
        with_calibration(quick, {"samples": None, "heldout_samples": None, "seq_len": 8, "seed": None})


@pytest.mark.parametrize("args, needles", [
    (["build", "--target", "demo", "--seq-len", "8"], ["Invalid calibration override --seq-len 8"]),
    (["build", "--target", "demo", "--heldout-samples", "0"], ["--heldout-samples 0", "greater than or equal to 1"]),
    (["prune", "--plan", "p.toml", "--calib-samples", "0"], ["Invalid calibration override --calib-samples 0"]),
    (["build", "--target", "demo", "--calib-split", "test"], ["--calib-split: only meaningful with a dataset"]),
    (["prune", "--plan", "p.toml", "--calib", "notes.txt", "--calib-config", "x", "--calib-column", "y"],
     ["--calib-config, --calib-column: only meaningful with a dataset; add --calib hf:NAME."]),
    (["build", "--target", "demo", "--calib", "hf:"], ["--calib hf: needs a dataset after the colon"]),
])
def test_bad_calibration_options_fail_before_any_work(tmp_path, args, needles):
    out = tmp_path / "o"
    assert_clean_error(edgeprune(*args, "-o", str(out)), *needles)
    assert not out.exists()


def test_self_generation_prompts_keep_the_first_24_and_do_not_repeat():
    assert [self_prompt(i) for i in range(24)] == list(SELF_PROMPTS)
    assert len({self_prompt(i) for i in range(384)}) == 384
    assert self_prompt(24).startswith(SELF_PROMPTS[0] + " ")


@pytest.mark.slow
def test_prune_with_a_local_hf_dataset_and_overrides(tmp_path, cache_dir):
    data = _text_dataset(tmp_path / "ds", SENTENCES)
    plan = tmp_path / "plan.toml"
    plan.write_text("drop_layers = [20]\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "edgeprune", "prune", "--plan", str(plan), "-o", str(out), "-p", "quick",
         "--cache-dir", str(cache_dir), "--quant", "Q8_0", "--calib", f"hf:{data}", "--calib-column", "text",
         "--calib-samples", "3", "--heldout-samples", "2", "--seq-len", "32", "-q"],
        capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    calibration = json.loads((out / "report.json").read_text())["calibration"]
    assert calibration["calibration_windows"] == [3, 32] and calibration["heldout_windows"] == [2, 32]
    assert calibration["source"].startswith(f"hf dataset {data} split train column text (")
