"""Calibration and held-out text: a user's file, or text the reference model writes itself.

Both become token windows of the profile's sequence length. The first `samples` windows calibrate
(importance); the next `heldout_samples`, disjoint from them, measure quality.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgeprune.config import CalibrationSettings
from edgeprune.errors import EdgepruneError
from edgeprune.hashing import sha256_file, sha256_json
from edgeprune.progress import progress

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
SELF_GENERATION_VERSION = 1


@dataclass
class TextSplits:
    calib: torch.Tensor  # [samples, seq_len] token ids
    heldout: torch.Tensor  # [heldout_samples, seq_len]
    source: str  # human description
    sha256: str  # identity of the token windows

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "sha256": self.sha256,
            "calibration_windows": list(self.calib.shape),
            "heldout_windows": list(self.heldout.shape),
        }


def _splits(ids: torch.Tensor, settings: CalibrationSettings, source: str) -> TextSplits:
    n, m = settings.samples, settings.heldout_samples
    windows = ids.reshape(-1, settings.seq_len)
    return TextSplits(
        calib=windows[:n].clone(),
        heldout=windows[n : n + m].clone(),
        source=source,
        sha256=sha256_json(windows[: n + m].tolist()),
    )


def _read_documents(path: Path) -> list[str]:
    if not path.is_file():
        raise EdgepruneError(f"--calib {path} does not exist; pass a .txt or .jsonl file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EdgepruneError(f"--calib {path} is not UTF-8 text; pass a .txt or .jsonl file.") from None
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
            raise EdgepruneError(f"--calib {path} line {n} is not valid JSON; each line must be an object.") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise EdgepruneError(f'--calib {path} line {n} has no string "text" field.')
        docs.append(record["text"])
    return docs


def from_file(path: Path, tokenizer: Any, settings: CalibrationSettings) -> TextSplits:
    docs = _read_documents(path)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + eos
    need = (settings.samples + settings.heldout_samples) * settings.seq_len
    if len(ids) < need:
        raise EdgepruneError(
            f"--calib {path} has {len(ids)} tokens but the profile needs {need} "
            f"({settings.samples}+{settings.heldout_samples} windows of {settings.seq_len}); "
            "give more text or use a smaller profile."
        )
    source = f"file {path.name} (sha256 {sha256_file(path)[:12]})"
    return _splits(torch.tensor(ids[:need]), settings, source)


@torch.no_grad()
def self_generated(model: Any, tokenizer: Any, settings: CalibrationSettings, batch_size: int = 8) -> TextSplits:
    """Chat answers sampled from the reference itself with a fixed seed: no download needed."""
    total = settings.samples + settings.heldout_samples
    prompts = []
    for i in range(total):
        text = SELF_PROMPTS[i % len(SELF_PROMPTS)]
        if tokenizer.chat_template:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        else:
            prompt = text + "\n"
        prompts.append(tokenizer(prompt, add_special_tokens=True)["input_ids"])

    rows: list[list[int]] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in progress(range(0, total, batch_size), "self-generating calibration text"):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        torch.manual_seed(settings.seed + start)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=0.8,
            top_p=0.95,
            max_new_tokens=settings.seq_len,
            min_new_tokens=settings.seq_len,
            pad_token_id=pad,
        )
        for p, row in zip(batch, out.tolist(), strict=True):
            rows.append((p + row[width:])[: settings.seq_len])
    source = f"self-generated by the reference (seed {settings.seed}, {total} chat answers)"
    return _splits(torch.tensor(rows), settings, source)


def generation_key(reference_sha: str, settings: CalibrationSettings) -> dict[str, Any]:
    return {"reference": reference_sha, "settings": settings.model_dump(), "version": SELF_GENERATION_VERSION}
