"""Sample text from a GGUF with llama.cpp: several prompts at once, our own seeded sampler.

`sample` decodes up to `batch_size` sequences together in one context (one KV cache, a stream per
sequence): each step is one `llama_decode` of a batch holding the next token of every running
sequence and the whole prompt of any sequence just started in a freed slot (continuous batching),
so a batch stays full although prompts differ in length. Tokens are drawn by `next_token` (numpy:
temperature, top-p) from the logits, with one random generator per prompt seeded by (seed, prompt
index): the draws do not depend on the batch size or order. End-of-generation tokens are banned, so
every answer has exactly the requested length (transformers' min_new_tokens).

Reproducible for a seed on a machine. Each sequence has its own KV stream (kv_unified off), so
its logits need not depend on what else is in the batch: measured with the x86-64 wheel, batch
sizes 1, 4, 8 and 16 and 1 or 2 threads gave the same windows (a unified KV cache did not). Other
CPU kernels may round a batch of rows differently from one row, so callers fix the batch size.

Runs in a child process (`isolated`), so a crash in llama.cpp is one error naming the model.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeprune.errors import EdgepruneError
from edgeprune.runtimes import isolated

log = logging.getLogger(__name__)

# Measured on the embedded model, default profile, 2 threads: 8 sequences at once cost 1.5x less
# CPU per token than 1 (77 against 52 tokens per CPU-second; 4: 59), 16 no less than 8. A larger
# batch only grows the KV cache, which matters for an 8B model in 8 GiB.
DEFAULT_BATCH = 8
_MAX_BATCH_TOKENS = 512  # tokens per llama_decode call: bounds llama.cpp's compute buffers
_CANDIDATES = (64, 1024)  # top-p looks at this many most likely tokens first; a full sort is the fallback


@dataclass(frozen=True)
class Generation:
    answers: list[list[int]]  # per prompt, exactly the requested number of tokens
    tokens: int  # tokens generated (the prompts' tokens not counted)
    prompt_tokens: int
    seconds: float  # wall time of prefill + decoding + sampling, model load excluded
    load_seconds: float
    batch_size: int
    threads: int
    banned: list[int]  # the model's end-of-generation tokens, never drawn

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def sample(gguf_path: Path, prompts: Sequence[Sequence[int]], new_tokens: int | Sequence[int], temperature: float,
           top_p: float, seed: int, threads: int, batch_size: int = DEFAULT_BATCH) -> Generation:
    """Continue each prompt (token ids in the GGUF's vocabulary) with exactly `new_tokens` sampled
    tokens (one count for all, or one per prompt). `temperature` 0 is greedy."""
    counts = [new_tokens] * len(prompts) if isinstance(new_tokens, int) else list(new_tokens)
    if len(counts) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(counts)} token counts")
    if any(n < 0 for n in counts) or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be non-empty and token counts non-negative")
    if temperature < 0 or not 0 < top_p <= 1 or batch_size < 1 or threads < 1:
        raise ValueError(f"bad sampling settings: temperature {temperature}, top_p {top_p}, "
                         f"batch_size {batch_size}, threads {threads}")
    prompts = [[int(t) for t in p] for p in prompts]
    if not any(counts):  # nothing to generate: no model to load
        return Generation([[] for _ in prompts], 0, sum(map(len, prompts)), 0.0, 0.0, batch_size, threads, [])
    return isolated.call("sampling text with", gguf_path, _sample, gguf_path, prompts, counts, temperature, top_p,
                         seed, threads, batch_size)


def next_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator,
               banned: np.ndarray | None = None) -> int:
    """One token from `logits` [vocab]: greedy at temperature 0, else from the smallest set of most
    likely tokens whose probability reaches `top_p` (ties broken by lower id), renormalised.
    `banned` token ids are never drawn. Draws exactly one number from `rng` unless greedy."""
    x = logits.astype(np.float64)
    if banned is not None and len(banned):
        x[banned] = -np.inf
    if temperature == 0:
        return int(np.argmax(x))
    x = (x - x.max()) / temperature
    p = np.exp(x)
    p /= p.sum()
    kept = _nucleus(p, top_p)
    weights = p[kept]
    u = rng.random() * weights.sum()
    i = int(np.searchsorted(np.cumsum(weights), u, side="right"))
    return int(kept[min(i, len(kept) - 1)])


def _nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """Token ids of the top-p set, most likely first (equal probabilities: lower id first)."""
    for k in _CANDIDATES:
        if k >= len(p):
            break
        top = np.argpartition(-p, k - 1)[:k]
        top = top[np.lexsort((top, -p[top]))]
        cut = int(np.searchsorted(np.cumsum(p[top]), top_p))
        # Exact when the set ends before the k-th token with a strictly larger probability: then
        # every token outside the k candidates is less likely than the set's last one.
        if cut < k - 1 and p[top[cut]] > p[top[-1]]:
            return top[: cut + 1]
    order = np.argsort(-p, kind="stable")
    cut = int(np.searchsorted(np.cumsum(p[order]), top_p))
    return order[: min(cut, len(p) - 1) + 1]


def _sample(path: Path, prompts: list[list[int]], counts: list[int], temperature: float, top_p: float, seed: int,
            threads: int, batch_size: int) -> Generation:
    # ggml's OpenMP threads spin at their barriers; on a machine busy with other work a spinning
    # thread holds the core its partner needs (measured: 2 threads, 2 busy cores, 1.3 instead of
    # 39 tok/s). Sleeping waiters cost little here. Read when libgomp loads, so before llama_cpp.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import llama_cpp as ll

    from edgeprune.runtimes.llamacpp import route_logs_to_python

    route_logs_to_python()
    ll.llama_backend_init()
    t0 = time.perf_counter()
    model = ll.llama_model_load_from_file(str(path).encode(), ll.llama_model_default_params())
    if not model:
        raise EdgepruneError(f"llama.cpp cannot load {path.name}; check that it is a GGUF model file.")
    ctx = batch = None
    try:
        vocab = ll.llama_model_get_vocab(model)
        n_vocab = ll.llama_vocab_n_tokens(vocab)
        if any(not 0 <= t < n_vocab for p in prompts for t in p):
            raise EdgepruneError(f"The prompts hold token ids outside {path.name}'s vocabulary of {n_vocab}; "
                                 "the tokenizer does not match the model.")
        banned = np.array([t for t in range(n_vocab) if ll.llama_vocab_is_eog(vocab, t)], dtype=np.int64)
        work = [i for i, n in enumerate(counts) if n > 0]
        slots = max(1, min(batch_size, len(work)))
        span = max((len(prompts[i]) + counts[i] for i in work), default=1)
        n_batch = min(_MAX_BATCH_TOKENS, slots * span)

        params = ll.llama_context_default_params()
        params.n_ctx = slots * span
        params.n_seq_max = slots
        params.n_batch = params.n_ubatch = n_batch
        params.n_outputs_max = slots  # one logits row per running sequence and step
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        ctx = ll.llama_init_from_model(model, params)
        if not ctx:
            raise EdgepruneError(f"llama.cpp could not make a context of {slots} x {span} tokens for {path.name}.")
        batch = ll.llama_batch_init(n_batch, 0, 1)
        load_seconds = time.perf_counter() - t0

        rngs = {i: np.random.default_rng([seed, i]) for i in work}
        t0 = time.perf_counter()
        answers = _run(ll, ctx, batch, n_batch, n_vocab, prompts, counts, work, slots,
                       lambda i, logits: next_token(logits, temperature, top_p, rngs[i], banned))
        seconds = time.perf_counter() - t0
    finally:
        if batch is not None:
            ll.llama_batch_free(batch)
        if ctx:
            ll.llama_free(ctx)
        ll.llama_model_free(model)
    tokens = sum(counts)
    log.debug("sampled %d tokens for %d prompts in %.1f s (%.1f tok/s, batch %d, %d threads)",
              tokens, len(prompts), seconds, tokens / max(seconds, 1e-9), batch_size, threads)
    return Generation(answers, tokens, sum(len(p) for p in prompts), seconds, load_seconds, batch_size, threads,
                      banned.tolist())


def _run(ll, ctx, batch, n_batch, n_vocab, prompts, counts, work, slots, draw) -> list[list[int]]:  # noqa: ANN001
    """Continuous batching: a freed slot (sequence id) takes the next prompt in the following step."""
    memory = ll.llama_get_memory(ctx)
    answers: list[list[int]] = [[] for _ in prompts]
    queue = deque(work)
    free = list(range(slots))
    running: dict[int, int] = {}  # slot -> prompt index
    feed: dict[int, tuple[int, int]] = {}  # slot -> (token, position) to decode next
    while queue or running:
        entries: list[tuple[int, int, int, bool]] = []  # token, position, slot, wants logits
        for slot, (token, pos) in sorted(feed.items()):
            entries.append((token, pos, slot, True))
        feed.clear()
        while free and queue:
            slot, i = free.pop(0), queue.popleft()
            running[slot] = i
            last = len(prompts[i]) - 1
            entries += [(t, pos, slot, pos == last) for pos, t in enumerate(prompts[i])]
        for slot, logits in _decode(ll, ctx, batch, n_batch, n_vocab, entries):
            i = running[slot]
            answers[i].append(draw(i, logits))
            if len(answers[i]) == counts[i]:
                del running[slot]
                ll.llama_memory_seq_rm(memory, slot, -1, -1)
                free.append(slot)
                free.sort()
            else:
                feed[slot] = (answers[i][-1], len(prompts[i]) + len(answers[i]) - 1)
    return answers


def _decode(ll, ctx, batch, n_batch, n_vocab, entries):  # noqa: ANN001, ANN202
    """Decode `entries` in calls of at most n_batch tokens; yields (slot, logits copy) per output."""
    out = []
    for start in range(0, len(entries), n_batch):
        chunk = entries[start : start + n_batch]
        for j, (token, pos, slot, logits) in enumerate(chunk):
            batch.token[j] = token
            batch.pos[j] = pos
            batch.n_seq_id[j] = 1
            batch.seq_id[j][0] = slot
            batch.logits[j] = logits
        batch.n_tokens = len(chunk)
        code = ll.llama_decode(ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code} for a batch of {len(chunk)} tokens")
        for j, (_, _, slot, logits) in enumerate(chunk):
            if logits:
                row = ll.llama_get_logits_ith(ctx, j)
                out.append((slot, np.ctypeslib.as_array(row, shape=(n_vocab,)).copy()))
    return out
