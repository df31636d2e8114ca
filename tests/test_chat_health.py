"""The chat check's judgement of an answer: loops and repetition are degenerate, ordinary answers are not."""

from __future__ import annotations

import pytest

from edgeprune.chat_health import degenerate, distinct_share, summary

# Answers measured in benchmarks/recovery.py: the reference's, and deep cuts' loops.
USABLE = [
    "Before starting a pump, it's essential to ensure that the pump is properly installed and maintained. "
    "Here are some key points to check: 1. Pump type: Check the type of pump",
    "The sky is blue because of the way the human eye sees the world. When light from the sun hits the "
    "Earth's atmosphere, it scatters in all directions.",
    "Subject: Request for Delivery Date\n\nDear [Recipient],\n\nI hope this email finds you well.",
    "Der Himmel ist blau, weil Licht gestreut wird. Небо голубое. "
    "天空是蓝色的因为阳光在大气中被散射而蓝光散射得最多所以我们看到蓝天。",
]
DEGENERATE = {
    "Before starting a pump, it's essential to check the pump itself, the pump itself, the pump itself, "
    "the pump itself, the pump itself, the pump itself": "repeats itself",
    "Dear HUGS!\n\nDear HUGS!\n\nDear HUGS!\n\nDear HUGS!\n\nDear HUGS!": "repeats itself",
    "Check that the valve is open. Operators confirm that the valve is open, record pressure and flow, "
    "then make sure that the valve is open before starting the pump motor.": "loops on 'that the valve is'",
    "  \n": "empty answer",
    "assistant": "too short (1 word)",
    "The sky's the perfect example of how even the subtleststrethardestrethawakefulstate blue": "run-on word",
    "The sky is blue, predomсoscal, bright": "a word of mixed scripts",
}


@pytest.mark.parametrize("answer", USABLE)
def test_ordinary_answers_are_usable(answer):
    assert degenerate(answer) == ""


@pytest.mark.parametrize(("answer", "why"), DEGENERATE.items())
def test_loops_and_repetition_are_degenerate(answer, why):
    assert degenerate(answer).startswith(why)


def test_distinct_share_and_summary():
    assert distinct_share("a b a b") == 0.5 and distinct_share("") == 0.0
    answers = [{"degenerate": ""}, {"degenerate": "empty answer"}, {"degenerate": ""}]
    assert summary(answers) == "2/3 usable (empty answer)"
    assert summary(answers[:1]) == "1/1 usable"
