"""The search space: depth (least important layers first) x attention sublayers removed (least
important first) x GQA-consistent head structures x FFN width (the most important channels of
every layer, in K-quant-friendly steps) x quantization recipe x the target's sparse method x the
runtime that runs the candidate (each with its own model format and quantization)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from edgeprune.analysis import Importance
from edgeprune.analysis.scores import select_channels, select_heads
from edgeprune.config import SearchSettings, SparsitySpec
from edgeprune.gguf_file import K_BLOCK
from edgeprune.prune import ModelShape, Plan


@dataclass(frozen=True, order=True)
class HeadStructure:
    """Uniform per layer: `groups` KV groups kept, each with `per_group` query heads."""

    groups: int
    per_group: int

    @property
    def heads(self) -> int:
        return self.groups * self.per_group

    def __str__(self) -> str:
        return f"{self.groups}x{self.per_group} heads"


@dataclass(frozen=True)
class SearchRuntime:
    """A runtime as the search sees it: its name, and whether llama.cpp's per-tensor recipes apply."""

    name: str
    recipes: bool = False


LLAMA_CPP = SearchRuntime("llama.cpp", recipes=True)


@dataclass(frozen=True)
class State:
    layers_dropped: int
    heads: HeadStructure | None = None  # None: all heads
    ffn: int | None = None  # FFN channels kept per layer; None: all
    recipe: str = "default"  # per-tensor quantization recipe (quantize/recipes.py)
    sparse: str | None = None  # the target's opted-in sparse method, described; None: dense
    attention_removed: int = 0  # attention sublayers removed from kept layers, least important first
    runtime: str = LLAMA_CPP.name  # what runs (and so what format and quantization) the candidate

    def describe(self) -> str:
        parts = [f"-{self.layers_dropped} layers"] if self.layers_dropped else []
        parts += [f"-{self.attention_removed} attention"] if self.attention_removed else []
        parts += [str(self.heads)] if self.heads else []
        parts += [f"FFN {self.ffn}"] if self.ffn else []
        parts += [f"recipe {self.recipe}"] if self.recipe != "default" else []
        parts += [f"{self.sparse} sparse"] if self.sparse else []
        text = ", ".join(parts) or "unpruned"
        return text if self.runtime == LLAMA_CPP.name else f"{text} on {self.runtime}"


class SearchSpace:
    def __init__(self, shape: ModelShape, importance: Importance, settings: SearchSettings,
                 sparsity: SparsitySpec | None = None, runtimes: tuple[SearchRuntime, ...] = (LLAMA_CPP,)) -> None:
        self.shape, self.importance, self.settings, self.sparsity = shape, importance, settings, sparsity
        self.runtimes = {r.name: r for r in runtimes}  # the first runs the baseline
        # The first and last layers are never candidates: they read the embeddings and write the
        # logits, and their Block Influence is always among the highest.
        self.layer_order = importance.layers_by_importance(protect=(0, shape.n_layers - 1))
        self.max_layers = min(int(settings.max_layer_fraction * shape.n_layers), len(self.layer_order))
        self.attention_order = importance.attention_by_importance(protect=(0, shape.n_layers - 1))
        self.max_attention = min(int(settings.max_attention_fraction * shape.n_layers), len(self.attention_order))
        min_heads = (1 - settings.max_head_fraction) * shape.n_head
        full = HeadStructure(shape.n_head_kv, shape.group_size)
        self.head_structures = sorted(
            (
                HeadStructure(g, q)
                for g in range(1, shape.n_head_kv + 1)
                for q in range(1, shape.group_size + 1)
                if g * q >= min_heads and HeadStructure(g, q) != full
            ),
            key=lambda s: (-s.heads, -s.groups),
        )
        # Multiples of 256 only: K-quants pack ffn_down's input in blocks of 256 columns, and any
        # other width falls back to a bigger type for that tensor.
        min_ffn = (1 - settings.max_ffn_fraction) * shape.ffn
        top = (shape.ffn - 1) // K_BLOCK * K_BLOCK
        self.ffn_widths = [w for w in range(top, 0, -K_BLOCK) if w >= min_ffn]
        self._selected: dict[tuple, tuple[int, ...]] = {}  # (kind, layer, amount) -> indices kept

    def plan(self, state: State) -> Plan:
        drop = tuple(self.layer_order[: state.layers_dropped])
        no_attention = [l for l in self.attention_order if l not in drop][: state.attention_removed]
        heads: tuple = tuple((l, ()) for l in no_attention)
        if state.heads is not None:
            heads += tuple((layer, self._heads(layer, state.heads)) for layer in range(self.shape.n_layers)
                           if layer not in drop and layer not in no_attention)
        ffn: tuple = ()
        if state.ffn is not None:
            ffn = tuple((layer, self._channels(layer, state.ffn)) for layer in range(self.shape.n_layers)
                        if layer not in drop)
        return Plan(drop_layers=drop, heads=heads, ffn=ffn)

    # A layer's selection depends only on its scores and the amount kept: computed once per search,
    # not once per plan (an 8B's grid has ~2700 plans of 32 layers x 14k channels).
    def _heads(self, layer: int, structure: HeadStructure) -> tuple[int, ...]:
        key = ("heads", layer, structure)
        if key not in self._selected:
            scores = torch.tensor(self.importance.head_scores[layer])
            self._selected[key] = select_heads(scores, self.shape.n_head_kv, structure.groups, structure.per_group)
        return self._selected[key]

    def _channels(self, layer: int, keep: int) -> tuple[int, ...]:
        key = ("ffn", layer, keep)
        if key not in self._selected:
            self._selected[key] = select_channels(torch.tensor(self.importance.channel_scores[layer]), keep)
        return self._selected[key]

    def deeper(self, state: State, step: int | None = None) -> State | None:
        n = state.layers_dropped + (step or self.settings.layer_step)
        n = min(n, self.max_layers)
        return replace(state, layers_dropped=n) if n > state.layers_dropped else None

    def without_attention(self, state: State) -> State | None:
        """More attention sublayers removed (attention_step more), if the profile allows any."""
        step = self.settings.attention_step if self.shape.per_layer else 0  # removal makes layers differ
        kept_layers = self.shape.n_layers - state.layers_dropped
        n = min(state.attention_removed + step, self.max_attention, max(kept_layers - 2, 0))
        return replace(state, attention_removed=n) if step and n > state.attention_removed else None

    def baseline(self) -> State:
        """The unpruned model in the first runtime: what every candidate is timed beside."""
        return State(0, runtime=next(iter(self.runtimes)))

    def features(self, state: State) -> dict[str, float]:
        """What `state` changes from the unpruned model, one name per kind of step (the latency
        model errs differently for each, a recipe's quantization types above all), with how much:
        the share of the model's layers, attention sublayers, query heads or FFN channels removed,
        or 1 for a recipe, sparsity or another runtime."""
        shape = self.shape
        amounts = {
            "layers": state.layers_dropped / shape.n_layers,
            "attention sublayers": state.attention_removed / shape.n_layers,
            "heads": 1 - state.heads.heads / shape.n_head if state.heads else 0.0,
            "FFN width": 1 - state.ffn / shape.ffn if state.ffn else 0.0,
            f"recipe {state.recipe}": float(state.recipe != "default"),
            "sparsity": float(state.sparse is not None),
            f"runtime {state.runtime}": float(state.runtime != self.baseline().runtime),
        }
        return {kind: amount for kind, amount in amounts.items() if amount}

    def kinds(self, state: State) -> frozenset[str]:
        return frozenset(self.features(state))

    def _attention_levels(self, layers_dropped: int) -> list[int]:
        step = self.settings.attention_step if self.shape.per_layer else 0
        top = min(self.max_attention, max(self.shape.n_layers - layers_dropped - 2, 0)) if step else 0
        return sorted(set(range(0, top + 1, step or 1)) | {top})

    def _recipes(self, runtime: SearchRuntime) -> tuple[str, ...]:
        return tuple(dict.fromkeys(("default", *self.settings.recipes))) if runtime.recipes else ("default",)

    def grid(self) -> list[State]:
        """Every dense state within the limits, in every runtime: each depth (a layer at a time),
        attention sublayers in the profile's steps (and its limit), each head structure, each FFN
        width, each recipe of the profile where the runtime takes recipes."""
        heads = [None, *self.head_structures] if self.shape.head_pruning else [None]
        return [State(d, h, f, recipe, None, a, runtime.name)
                for runtime in self.runtimes.values()
                for recipe in self._recipes(runtime)
                for d in range(self.max_layers + 1)
                for a in self._attention_levels(d)
                for h in heads
                for f in [None, *self.ffn_widths]]

    def corners(self) -> list[State]:
        """The most-pruned state of each runtime and recipe: every limit reached."""
        heads = self.head_structures[-1] if self.head_structures and self.shape.head_pruning else None
        ffn = self.ffn_widths[-1] if self.ffn_widths else None
        return [State(self.max_layers, heads, ffn, recipe, None, self._attention_levels(self.max_layers)[-1],
                      runtime.name)
                for runtime in self.runtimes.values() for recipe in self._recipes(runtime)]

    def in_other_runtimes(self, state: State) -> list[State]:
        """The same structure realised in each other allowed runtime (its default recipe where
        llama.cpp's recipes do not apply)."""
        return [replace(state, runtime=r.name, recipe=state.recipe if r.recipes else "default")
                for r in self.runtimes.values() if r.name != state.runtime]

    def requantized(self, state: State) -> State | None:
        """The next per-tensor recipe of the profile's list, if any (for runtimes that take recipes)."""
        if not self.runtimes[state.runtime].recipes:
            return None
        recipes = self.settings.recipes
        i = recipes.index(state.recipe) if state.recipe in recipes else -1
        return replace(state, recipe=recipes[i + 1]) if i + 1 < len(recipes) else None

    def sparsified(self, state: State) -> State | None:
        """The state with the target's sparse method applied, if the target opts in to sparsity."""
        if self.sparsity is None or state.sparse is not None:
            return None
        return replace(state, sparse=self.sparsity.describe())

    def thinner(self, state: State) -> State | None:
        """The next narrower FFN width, if the limits allow one."""
        current = state.ffn or self.shape.ffn
        smaller = [w for w in self.ffn_widths if w < current]
        return replace(state, ffn=smaller[0]) if smaller else None

    def narrower(self, state: State) -> list[State]:
        """The next-smaller head structures (all of those with the next lower head count)."""
        current = state.heads.heads if state.heads else self.shape.n_head
        smaller = [s for s in self.head_structures if s.heads < current and self.shape.head_pruning]
        if not smaller:
            return []
        top = smaller[0].heads
        return [replace(state, heads=s) for s in smaller if s.heads == top]
