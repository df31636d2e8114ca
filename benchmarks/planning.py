"""The pareto strategy's planning, at real model sizes: every state of the search grid turned into a plan.

Before the first prediction, `--strategy pareto` plans every state within the profile's limits (which
layers, which heads, which FFN channels) to cost it on paper. That work grows with the grid and
with the model's width: a Llama-3.1-8B's quick-profile grid is 2720 plans of up to 32 layers x 14336
channels. This times it per model shape and profile with random importance scores (the scores'
values do not change the work), and prints a table and writes JSON.

    .venv/bin/python benchmarks/planning.py [--models llama-3.2-1b,llama-3.2-3b,llama-3.1-8b]
        [--profiles quick,default] [--out benchmarks/results/planning.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from transformers import AutoConfig

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edgeprune.analysis.importance import Importance  # noqa: E402
from edgeprune.config import load_profile  # noqa: E402
from edgeprune.models.synthetic import PRESETS  # noqa: E402
from edgeprune.prune import ModelShape  # noqa: E402
from edgeprune.search.space import SearchSpace  # noqa: E402


def random_importance(shape: ModelShape, seed: int = 0) -> Importance:
    rng = random.Random(seed)
    return Importance(
        layer_scores=[rng.random() for _ in range(shape.n_layers)],
        head_scores=[[rng.random() for _ in range(shape.n_head)] for _ in range(shape.n_layers)],
        channel_scores=[[rng.random() for _ in range(shape.ffn)] for _ in range(shape.n_layers)],
        attention_scores=[rng.random() for _ in range(shape.n_layers)],
    )


def measure(model: str, profile: str, repetitions: int) -> dict:
    shape = ModelShape.from_config(AutoConfig.for_model(**PRESETS[model].config(None, None)))  # family included
    importance, settings = random_importance(shape), load_profile(profile).search
    plan_s = []
    for _ in range(repetitions):  # a fresh space each time: its per-layer selections start empty
        space = SearchSpace(shape, importance, settings)
        grid = space.grid()
        t = time.perf_counter()
        for state in grid:  # one at a time, as the search costs them (an 8B's plans together are GBs)
            space.plan(state)
        plan_s.append(time.perf_counter() - t)
    return {"model": model, "profile": profile, "plans": len(grid), "plan_s": statistics.median(plan_s),
            "repetitions": repetitions, "ms_per_plan": statistics.median(plan_s) / len(grid) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="llama-3.2-1b,llama-3.2-3b,llama-3.1-8b")
    parser.add_argument("--profiles", default="quick,default")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "planning.json")
    args = parser.parse_args()
    rows = [measure(m, p, args.repetitions) for m in args.models.split(",") for p in args.profiles.split(",")]
    print(f"{'model':<16}{'profile':<9}{'plans':>7}{'planning s':>12}{'ms/plan':>9}")
    for r in rows:
        print(f"{r['model']:<16}{r['profile']:<9}{r['plans']:>7}{r['plan_s']:>12.1f}{r['ms_per_plan']:>9.2f}")
    print(f"medians of {args.repetitions} runs; random importance scores (the work does not depend on them)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
