"""Recovery in a build: which candidates to recover, and the pick afterwards.

Recovery changes quality, not speed: a recovered candidate has its twin's shapes and tensor types,
so its twin's benchmark stands. The candidates worth recovering are those within budget; which of
them wins after recovery is measured, not assumed, so the best few by KLD are recovered (a deeper
cut that met the budget with a worse KLD competes when it is among them), and the pick is the best
KLD within budget among all, recovered or not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from edgeprune.chat_health import chat_answers, summary
from edgeprune.events import STAGE, event
from edgeprune.recover import RecoveryJob
from edgeprune.runtimes.artifacts import ModelFormat
from edgeprune.search import Candidate, SearchOutcome

log = logging.getLogger(__name__)

POLICY = ("the {n} best pruned candidates within budget by KLD are recovered (same structure, so timed as their "
          "twins); the pick is the best KLD within budget, recovered or not")


class Recovers(Protocol):
    def build_recovered(self, twins: list[Candidate], recovery: RecoveryJob) -> list[Candidate]: ...


def recovered_share(before: float, after: float) -> float:
    """The share of the KLD recovery removed (negative: it made it worse)."""
    return (before - after) / before if before > 0 else 0.0


def recover_best(outcome: SearchOutcome, evaluator: Recovers, job: RecoveryJob) -> dict[str, Any]:
    """Recover the best candidates within budget, add the copies to `outcome` and re-pick; what it did."""
    n = job.settings.candidates
    record: dict[str, Any] = {"policy": POLICY.format(n=n), "settings": job.settings.model_dump(exclude={"enabled"})}
    # Only pruned ones: recovery trains back what the plan removed (an unpruned file's error is quantization).
    within = [c for c in outcome.candidates if c.meets and c.state.sparse is None and c.recovered_from is None
              and not c.plan.is_identity]
    chosen = sorted(within, key=lambda c: c.quality.mean_kld)[:n]
    if not chosen:
        return record | {"candidates": [], "not_recovered": "no pruned, dense candidate met the budget"}
    event(log, STAGE, "recovering %s (%s)", ", ".join(c.id for c in chosen), job.settings.describe(),
          name="recovery", candidates=[c.id for c in chosen])
    t0 = time.perf_counter()
    copies = evaluator.build_recovered(chosen, job)
    outcome.candidates.extend(copies)
    before = outcome.selected
    outcome.selected = min((c for c in outcome.candidates if c.meets), key=lambda c: c.quality.mean_kld)
    rows = [{"id": copy.id, "from": twin.id, "before_kld": twin.quality.mean_kld, "after_kld": copy.quality.mean_kld,
             "recovered_share": recovered_share(twin.quality.mean_kld, copy.quality.mean_kld),
             "minutes": copy.recovery["seconds"] / 60 if copy.recovery else None,
             "steps": copy.recovery["steps"] if copy.recovery else None}
            for twin, copy in zip(chosen, copies, strict=True)]
    for row in rows:
        log.info("%s: KLD %.3f -> %.3f after recovery (%.0f%% of it recovered)", row["from"], row["before_kld"],
                 row["after_kld"], row["recovered_share"] * 100)
    return record | {"candidates": rows, "seconds": time.perf_counter() - t0,
                     "selected_before": before.id if before else None, "selected": outcome.selected.id}


def chat_of_pick(outcome: SearchOutcome, format_of: Callable[[str], ModelFormat], tokenizer: Any,
                 threads: int) -> dict[str, Any]:
    """A recovered pick's chat answers and its twin's: recovery must not buy its KLD with the chat."""
    pick = outcome.selected
    twin = next(c for c in outcome.candidates if c.id == pick.recovered_from)
    answers = {when: chat_answers(format_of(c.state.runtime), c.model, tokenizer, threads)
               for when, c in (("before", twin), ("after", pick))}
    log.info("%s's chat answers: %s (before recovery: %s)", pick.id, summary(answers["after"]),
             summary(answers["before"]))
    return {"candidate": pick.id, **answers}
