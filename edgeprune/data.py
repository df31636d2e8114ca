"""Calibration and held-out text: a user's file, a Hugging Face dataset, or text the reference model
writes itself.

All become token windows of the profile's sequence length. The first `samples` windows calibrate
(importance, imatrix); the next `heldout_samples`, disjoint from them, measure quality.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from edgeprune.config import CalibrationSettings, Strict
from edgeprune.errors import EdgepruneError
from edgeprune.hashing import sha256_file, sha256_json
from edgeprune.runtimes import generate

log = logging.getLogger(__name__)

# Topics for self-generated text: varied registers, so importance is not tuned to one domain.
SELF_PROMPTS = (
    "Explain how a heat pump works to a new maintenance technician.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Summarise the causes of the French Revolution in a few paragraphs.",
    "Describe how to troubleshoot a conveyor belt that keeps stopping.",
    "What are the health benefits of regular walking? Give practical advice.",
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "Explain the difference between weather and climate to a ten-year-old.",
    "Draft a polite email asking a supplier to confirm a delivery date.",
    "How does a PID controller keep a motor at constant speed?",
    "Describe the water cycle and why it matters for agriculture.",
    "Give a recipe for a simple vegetable soup with step-by-step instructions.",
    "What should an operator check before starting an industrial compressor?",
    "Explain what a neural network is without using mathematics.",
    "Write a poem about the first snow of winter.",
    "Compare trains and airplanes for travelling 500 kilometres.",
    "How do vaccines train the immune system?",
    "Explain why the sky is blue and sunsets are red.",
    "Describe a safe procedure for replacing a fuse in a control cabinet.",
    "What is inflation and how does it affect savings?",
    "Write a dialogue between a customer and a technician about a broken sensor.",
    "Explain how solar panels turn sunlight into electricity.",
    "List good habits for writing maintainable software and explain each.",
    "Tell the history of the printing press and its influence on Europe.",
    "How should a factory plan preventive maintenance for its pumps?",
)
# Once every topic has been asked plainly, it is asked again in each of these styles, so up to
# 24 x 16 = 384 windows get distinct prompts (beyond that the prompts cycle, the samples still differ).
SELF_STYLES = (
    "Answer in one short paragraph.",
    "Answer as a numbered list.",
    "Go into technical detail for an expert reader.",
    "Keep it simple, for a complete beginner, with an everyday example.",
    "Use a formal, report-like tone.",
    "Answer casually, as if talking to a friend.",
    "End with a one-sentence summary.",
    "Use no more than five sentences.",
    "Start with a question the reader might ask, then answer it.",
    "Structure the answer with short headings.",
    "Include a common misconception and correct it.",
    "Write it as a set of questions and answers.",
    "Give a concrete worked example first, then the general idea.",
    "Write at length, covering every aspect you can.",
    "Mention one practical consequence for everyday life.",
)


# Sampling of self-generated text: varied but on-distribution answers.
SELF_TEMPERATURE = 0.8
SELF_TOP_P = 0.95


def self_prompt(i: int) -> str:
    """The user prompt of self-generated window i: the plain topics first, then topic x style."""
    topic = SELF_PROMPTS[i % len(SELF_PROMPTS)]
    style = (i // len(SELF_PROMPTS)) % (len(SELF_STYLES) + 1)
    return topic if style == 0 else f"{topic} {SELF_STYLES[style - 1]}"


class HFDataset(Strict):
    """`--calib hf:NAME`: a Hugging Face dataset, by hub id or local directory, read as a stream."""

    name: str = Field(min_length=1)
    config: str | None = None  # the dataset's configuration (subset), e.g. wikitext-2-raw-v1
    split: str = "train"
    column: str | None = None  # None: "text" if the dataset has it, else "messages"

    def describe(self) -> str:
        return self.name + (f"/{self.config}" if self.config else "")


@dataclass
class TextSplits:
    calib: torch.Tensor  # [samples, seq_len] token ids
    heldout: torch.Tensor  # [heldout_samples, seq_len]
    source: str  # human description
    sha256: str  # identity of the token windows
    generation: dict[str, Any] | None = None  # self-generated text: model, seconds, tokens, tokens_per_s, ...

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "sha256": self.sha256,
            "calibration_windows": list(self.calib.shape),
            "heldout_windows": list(self.heldout.shape),
        } | ({"generation": self.generation} if self.generation is not None else {})


def _splits(ids: torch.Tensor, settings: CalibrationSettings, source: str) -> TextSplits:
    n, m = settings.samples, settings.heldout_samples
    windows = ids.reshape(-1, settings.seq_len)
    return TextSplits(
        calib=windows[:n].clone(),
        heldout=windows[n : n + m].clone(),
        source=source,
        sha256=sha256_json(windows[: n + m].tolist()),
    )


def _is_chat(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def _render_chat(messages: list[dict[str, Any]], tokenizer: Any, where: str) -> str:
    """A conversation as the model sees it in chat use: its own template, special tokens as text."""
    if not tokenizer.chat_template:
        raise EdgepruneError(
            f'{where} holds chat "messages" but the model\'s tokenizer has no chat template; give "text" instead.'
        )
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _token_stream(docs: Iterable[str], tokenizer: Any, need: int) -> tuple[list[int], int]:
    """Documents joined by EOS, up to `need` tokens; stops reading once it has them.
    Returns the tokens and how many documents were read."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    read = 0
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + eos
        read += 1
        if len(ids) >= need:
            break
    return ids[:need], read


def _tokens(docs: Iterable[str], tokenizer: Any, settings: CalibrationSettings, what: str) -> tuple[torch.Tensor, int]:
    """The tokens of the windows the settings need, and how many documents were read."""
    need = (settings.samples + settings.heldout_samples) * settings.seq_len
    ids, read = _token_stream(docs, tokenizer, need)
    if len(ids) < need:
        raise EdgepruneError(
            f"{what} has {len(ids)} tokens but the profile needs {need} "
            f"({settings.samples}+{settings.heldout_samples} windows of {settings.seq_len}); "
            "give more text, use a smaller profile, or lower --calib-samples, --heldout-samples or --seq-len."
        )
    return torch.tensor(ids), read


def _read_documents(path: Path, tokenizer: Any, flag: str = "--calib") -> list[str]:
    if not path.is_file():
        raise EdgepruneError(f"{flag} {path} does not exist; pass a .txt or .jsonl file, or hf:NAME for a dataset.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EdgepruneError(f"{flag} {path} is not UTF-8 text; pass a .txt or .jsonl file.") from None
    except OSError as e:
        raise EdgepruneError(f"Cannot read {flag} {path} ({e.strerror}); check its permissions.") from None
    if path.suffix != ".jsonl":
        docs = [d.strip() for d in text.split("\n\n")]
        return [d for d in docs if d]
    docs = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise EdgepruneError(f"{flag} {path} line {n} is not valid JSON; each line must be an object.") from None
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            docs.append(record["text"])
        elif isinstance(record, dict) and "messages" in record:
            if not _is_chat(record["messages"]):
                raise EdgepruneError(
                    f'{flag} {path} line {n} has a "messages" field that is not a non-empty list of '
                    '{"role": ..., "content": ...} objects with string values; fix or remove the line.'
                )
            docs.append(_render_chat(record["messages"], tokenizer, f"{flag} {path} line {n}"))
        else:
            raise EdgepruneError(
                f'{flag} {path} line {n} has neither a string "text" field nor a "messages" list; give one of them.'
            )
    return docs


def from_file(path: Path, tokenizer: Any, settings: CalibrationSettings) -> TextSplits:
    ids, _ = _tokens(_read_documents(path, tokenizer), tokenizer, settings, f"--calib {path}")
    return _splits(ids, settings, f"file {path.name} (sha256 {sha256_file(path)[:12]})")


def _hf_documents(dataset: HFDataset, tokenizer: Any, flag: str, found: dict[str, str] | None = None) -> Iterator[str]:
    """The documents of a Hugging Face dataset's rows, streamed: only the rows read are fetched.
    `found["column"]`: the column read (when the dataset names none, "text" or "messages")."""
    where = f"{flag} hf:{dataset.name}"
    try:
        import datasets
    except ImportError:
        raise EdgepruneError(
            f"{where} needs the datasets package; install it with `pip install datasets`."
        ) from None
    try:
        rows = datasets.load_dataset(dataset.name, dataset.config, split=dataset.split, streaming=True)
    except (OSError, ValueError) as e:  # not found, offline, bad config or split: datasets says which
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgepruneError(
            f"{where} could not be loaded ({reason}); check the name, {flag}-config and {flag}-split."
        ) from None
    column = dataset.column
    try:
        for i, row in enumerate(rows):
            if column is None:
                column = "text" if "text" in row else "messages" if "messages" in row else None
            if column not in row:
                wanted = f"column {column!r}" if column else "'text' or 'messages' column"
                raise EdgepruneError(
                    f"{where} has no {wanted} (it has {', '.join(row)}); name a text or messages column with "
                    f"{flag}-column."
                )
            if found is not None:
                found["column"] = column
            value = row[column]
            if isinstance(value, str):
                if value.strip():  # datasets such as wikitext hold blank rows between paragraphs
                    yield value
            elif _is_chat(value):
                yield _render_chat(value, tokenizer, f"{where} row {i}")
            elif value is not None:
                raise EdgepruneError(
                    f"{where} row {i}: column {column!r} is neither text nor a list of chat messages; "
                    f"name a text or messages column with {flag}-column."
                )
    except OSError as e:  # a stream that breaks off part-way
        raise EdgepruneError(f"{where} could not be read ({e}); check the network or the files.") from None


def from_hf(dataset: HFDataset, tokenizer: Any, settings: CalibrationSettings) -> TextSplits:
    """Rows of a Hugging Face dataset, streamed: only the rows the windows need are read, so a large
    hub dataset is neither downloaded nor tokenized whole."""
    what = f"--calib hf:{dataset.name} (split {dataset.split})"
    found: dict[str, str] = {}
    ids, read = _tokens(_hf_documents(dataset, tokenizer, "--calib", found), tokenizer, settings, what)
    source = f"hf dataset {dataset.describe()} split {dataset.split} column {found.get('column')} ({read} rows used)"
    return _splits(ids, settings, source)


def user_windows(source: Path | HFDataset, tokenizer: Any, seq_len: int, max_windows: int) -> tuple[torch.Tensor, str]:
    """`--train` text as whole windows of `seq_len` (at most `max_windows`), and its description."""
    if isinstance(source, HFDataset):
        docs: Iterable[str] = _hf_documents(source, tokenizer, "--train")
        described = f"hf dataset {source.describe()} split {source.split}"
    else:
        docs = _read_documents(source, tokenizer, "--train")
        described = f"file {source.name} (sha256 {sha256_file(source)[:12]})"
    ids, _ = _token_stream(docs, tokenizer, max_windows * seq_len)
    n = len(ids) // seq_len
    if n == 0:
        raise EdgepruneError(f"--train {described} has {len(ids)} tokens, less than one window of {seq_len}; "
                             "give more text or lower --seq-len.")
    return torch.tensor(ids[: n * seq_len]).reshape(n, seq_len), described


def chat_windows(gguf_path: Path, tokenizer: Any, indices: range, seq_len: int, seed: int,
                 threads: int) -> tuple[torch.Tensor, generate.Generation]:
    """Windows of prompt `i` (chat template, `self_prompt(i)`) and its sampled answer, cut to
    `seq_len`, for each i in `indices`; only the tokens a window keeps are generated."""
    prompts = []
    for i in indices:
        text = self_prompt(i)
        if tokenizer.chat_template:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        else:
            prompt = text + "\n"
        prompts.append(tokenizer(prompt, add_special_tokens=True)["input_ids"][:seq_len])
    log.info("self-generating %d chat answers with llama.cpp from %s (%d at once, %d threads)",
             len(prompts), gguf_path.name, generate.DEFAULT_BATCH, threads)
    counts = [seq_len - len(p) for p in prompts]
    gen = generate.sample(gguf_path, prompts, counts, SELF_TEMPERATURE, SELF_TOP_P, seed, threads,
                          generate.DEFAULT_BATCH)
    return torch.tensor([p + a for p, a in zip(prompts, gen.answers, strict=True)]), gen


def generation_record(gguf_path: Path, gen: generate.Generation) -> dict[str, Any]:
    """What self-generation cost, for reports."""
    return {"model": gguf_path.name, "seconds": round(gen.seconds, 2), "tokens": gen.tokens,
            "tokens_per_s": round(gen.tokens_per_s, 1), "batch_size": gen.batch_size,
            "threads": gen.threads, "load_seconds": round(gen.load_seconds, 2)}


def self_generated(gguf_path: Path, tokenizer: Any, settings: CalibrationSettings, threads: int) -> TextSplits:
    """Chat answers sampled with a fixed seed from a GGUF of the reference, through llama.cpp: no
    download, and no torch model in memory. Window i is prompt i and its answer (`chat_windows`)."""
    total = settings.samples + settings.heldout_samples
    rows, gen = chat_windows(gguf_path, tokenizer, range(total), settings.seq_len, settings.seed, threads)
    source = f"self-generated through llama.cpp by {gguf_path.name} (seed {settings.seed}, {total} chat answers)"
    splits = _splits(rows, settings, source)
    calib = {tuple(w) for w in splits.calib.tolist()}
    if any(tuple(w) in calib for w in splits.heldout.tolist()):
        raise EdgepruneError(
            f"A self-generated held-out window equals a calibration window: --seq-len {settings.seq_len} keeps too "
            "little beyond the chat prompt; raise --seq-len or pass --calib."
        )
    splits.generation = generation_record(gguf_path, gen)
    return splits
