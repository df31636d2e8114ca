"""Does a model still chat? Greedy answers to a few fixed questions in the model's chat template,
each judged for degenerate text. A lower KLD on held-out prose does not promise it: cut deep, a small
model loops on a phrase ("check the pump itself, the pump itself, ..."), and recovery that trained
on the wrong text could lose the chat format while its KLD falls."""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgeprune.runtimes.artifacts import ModelFormat

log = logging.getLogger(__name__)

QUESTIONS = ("What should an operator check before starting a pump?",
             "Explain in two sentences why the sky is blue.",
             "Write a short email asking for a delivery date.")
ANSWER_TOKENS = 48
# The reference's answers measure 0.66-0.90 distinct words over words; a looping one 0.13-0.39.
MIN_DISTINCT_SHARE = 0.5
# Each question asks for sentences: a broken model stops at once ("assistant" and end of turn).
MIN_WORDS = 5
LOOP_NGRAM = 4  # words
MAX_NGRAM_REPEATS = 3  # the same LOOP_NGRAM words this often is a loop, not a turn of phrase
RUN_ON_LETTERS = 22  # English words stop short of it; a broken model glues pieces ("strethardestreth...")
_LETTER_RUN = re.compile(r"[^\W\d_]+")


@dataclass(frozen=True)
class ChatAnswer:
    question: str
    answer: str
    distinct_share: float  # distinct words over words
    degenerate: str  # why the answer is degenerate; empty if it is not

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def distinct_share(text: str) -> float:
    words = text.lower().split()
    return len(set(words)) / len(words) if words else 0.0


def degenerate(text: str) -> str:
    """Why `text` is not a usable answer, in a few words; "" when it is."""
    words = text.lower().split()
    if not words:
        return "empty answer"
    if len(words) < MIN_WORDS:
        return f"too short ({len(words)} word{'s' if len(words) > 1 else ''})"
    share = distinct_share(text)
    if share < MIN_DISTINCT_SHARE:
        return f"repeats itself ({share:.0%} distinct words)"
    grams = Counter(tuple(words[i:i + LOOP_NGRAM]) for i in range(len(words) - LOOP_NGRAM + 1))
    if grams:
        gram, count = grams.most_common(1)[0]
        if count >= MAX_NGRAM_REPEATS:
            return f"loops on {' '.join(gram)!r} ({count} times)"
    for run in _LETTER_RUN.findall(text):
        scripts = {_script(c) for c in run}
        if len(scripts) > 1:
            return f"a word of mixed scripts {run!r}"
        if len(run) >= RUN_ON_LETTERS and scripts <= {"LATIN", "CYRILLIC", "GREEK"}:  # scripts that space words
            return f"run-on word {run[:RUN_ON_LETTERS]!r}..."
    return ""


def _script(letter: str) -> str:
    """LATIN, CYRILLIC, CJK, ...: the first word of the letter's Unicode name."""
    return unicodedata.name(letter, "UNKNOWN").split()[0]


def chat_answers(fmt: ModelFormat, model: Path, tokenizer: Any, threads: int,
                 questions: tuple[str, ...] = QUESTIONS) -> list[dict[str, Any]]:
    """`model`'s greedy answers to `questions`, asked in its chat template (plain text without one),
    judged, as the report records them (`ChatAnswer.to_dict`)."""
    stop = frozenset(t for t in (tokenizer.eos_token_id,) if t is not None)
    answers = []
    for question in questions:
        if tokenizer.chat_template:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                   add_generation_prompt=True)
        else:
            prompt = question + "\n"
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        text = tokenizer.decode(fmt.greedy(model, ids, ANSWER_TOKENS, threads, stop), skip_special_tokens=True).strip()
        answers.append(ChatAnswer(question, text, round(distinct_share(text), 3), degenerate(text)).to_dict())
    return answers


def summary(answers: list[dict[str, Any]]) -> str:
    """Reported answers (`ChatAnswer.to_dict`) in a line: "3/3 usable" or "1/3 usable (loops on ...)"."""
    bad = [a["degenerate"] for a in answers if a["degenerate"]]
    text = f"{len(answers) - len(bad)}/{len(answers)} usable"
    return f"{text} ({'; '.join(bad)})" if bad else text
