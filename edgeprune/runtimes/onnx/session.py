"""Running an edgeprune ONNX decoder with onnxruntime: session settings, full-sequence logits (the
quality measure's input) and a greedy decode through the KV cache."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeprune.runtimes.onnx.io_names import ATTENTION_MASK, INPUT_IDS, LOGITS, PAST, PRESENT, past_of, present_of

OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")


@dataclass(frozen=True)
class SessionSettings:
    """What the report records of how onnxruntime ran a model."""

    threads: int
    optimization: str = "all"
    provider: str = "CPUExecutionProvider"


def version() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}"


def system_info() -> str:
    import onnxruntime

    settings = SessionSettings(threads=0)
    return (f"providers {','.join(onnxruntime.get_available_providers())}; ran {settings.provider}, "
            f"graph optimization {settings.optimization}")


def open_session(path: Path, settings: SessionSettings):
    import onnxruntime as ort

    levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = levels[settings.optimization]
    options.log_severity_level = 3  # errors only: the optimizer's notes are not the user's business
    return ort.InferenceSession(str(path), options, providers=[settings.provider])


class Decoder:
    """One session of an edgeprune decoder, and the shapes of its KV cache."""

    def __init__(self, path: Path, settings: SessionSettings) -> None:
        self.session = open_session(path, settings)
        # past_key_values.{i}.key / .value: [batch, kv_heads, past_sequence, head_dim], the head dims fixed
        self.cache = {i.name: (int(i.shape[1]), int(i.shape[3])) for i in self.session.get_inputs()
                      if i.name.startswith(PAST)}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        return {name: np.zeros((batch, heads, 0, dim), np.float32) for name, (heads, dim) in self.cache.items()}

    def step(self, tokens: np.ndarray, cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits of `tokens` [batch, sequence] after the cached ones, and the cache with them added."""
        past = next(iter(cache.values())).shape[2] if cache else 0
        mask = np.ones((tokens.shape[0], past + tokens.shape[1]), np.int64)
        results = self.session.run(self.outputs, {INPUT_IDS: tokens.astype(np.int64), ATTENTION_MASK: mask, **cache})
        named = dict(zip(self.outputs, results, strict=True))
        return named[LOGITS], {past_of(name): value for name, value in named.items() if name.startswith(PRESENT)}


def sequence_logits(model: Path, windows: np.ndarray, threads: int) -> Iterator[np.ndarray]:
    """The model's logits at every position of every window, one [len, vocab] array at a time."""
    decoder = Decoder(model, SessionSettings(threads))
    for window in windows:
        logits, _ = decoder.step(np.asarray(window)[None, :], decoder.empty_cache(1))
        yield logits[0]


def greedy(model: Path, prompt: list[int], answer_tokens: int, threads: int,
           stop: frozenset[int] = frozenset()) -> list[int]:
    """Greedy tokens after `prompt`, decoded one at a time through the cache, ending before a `stop` token."""
    if answer_tokens <= 0:
        return []
    decoder = BoundDecoder(model, SessionSettings(threads), len(prompt) + answer_tokens)
    return until(decoder.continuation(prompt, lambda logits: int(np.argmax(logits))), stop, answer_tokens)[0]


def until(tokens: Iterator[int], stop: Collection[int], limit: int) -> tuple[list[int], str]:
    """`tokens` up to a `stop` token (not included: "stop") or `limit` of them ("length")."""
    out: list[int] = []
    for token in tokens:
        if token in stop:
            return out, "stop"
        out.append(token)
        if len(out) >= limit:
            break
    return out, "length"


class BoundDecoder:
    """A decode loop with the cache on the runtime's side, as an application would run it: one
    buffer per cache tensor, `n_ctx` positions long, bound as both past and present (GroupQueryAttention
    appends in place), and the decode step's logits written into a buffer bound once. Nothing is
    copied through Python per token but the token itself and its logits."""

    def __init__(self, path: Path, settings: SessionSettings, n_ctx: int) -> None:
        import onnxruntime as ort

        self.decoder = Decoder(path, settings)
        self.n_ctx = n_ctx
        self.vocab = int(self.decoder.session.get_outputs()[0].shape[2])
        self.cache = {name: ort.OrtValue.ortvalue_from_numpy(np.zeros((1, heads, n_ctx, dim), np.float32))
                      for name, (heads, dim) in self.decoder.cache.items()}
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type([1, 1, self.vocab], np.float32)
        # One binding for the whole loop: the cache is bound once; only the outputs change, when a
        # prompt (logits shaped by its length) gives way to single-token steps, and back.
        self.io = self.decoder.session.io_binding()
        for name, buffer in self.cache.items():
            self.io.bind_ortvalue_input(name, buffer)
        self._decoding: bool | None = None

    def _bind_outputs(self, decoding: bool) -> None:
        if self._decoding == decoding:
            return
        self.io.clear_binding_outputs()
        if decoding:
            self.io.bind_ortvalue_output(LOGITS, self.logits)
        else:
            self.io.bind_output(LOGITS, "cpu")
        for name, buffer in self.cache.items():
            self.io.bind_ortvalue_output(present_of(name), buffer)
        self._decoding = decoding

    def _run(self, tokens: np.ndarray, past: int) -> np.ndarray:
        """Logits of the last of `tokens` after `past` cached positions."""
        if past + tokens.shape[1] > self.n_ctx:
            raise ValueError(f"{past + tokens.shape[1]} positions do not fit a cache of {self.n_ctx}")
        decoding = tokens.shape[1] == 1
        self._bind_outputs(decoding)
        self.io.bind_cpu_input(INPUT_IDS, tokens)
        self.io.bind_cpu_input(ATTENTION_MASK, np.ones((1, past + tokens.shape[1]), np.int64))
        self.decoder.session.run_with_iobinding(self.io)
        logits = self.logits if decoding else self.io.get_outputs()[0]
        return logits.numpy()[0, -1]

    def continuation(self, prompt: list[int], pick: Callable[[np.ndarray], int]) -> Iterator[int]:
        """Tokens after `prompt`, each chosen by `pick` from the logits before it, while the cache has room."""
        logits = self._run(np.array([prompt], np.int64), 0)
        past = len(prompt)
        while True:
            token = pick(logits)
            yield token
            if past >= self.n_ctx:
                return
            logits = self._run(np.array([[token]], np.int64), past)
            past += 1

    def timed_generation(self, prompt: list[int], answer_tokens: int, tokens: list[int] | None = None) -> dict:
        """The same SLO-shaped request as llama.cpp's `timed_generation`: prefill, then exactly
        `answer_tokens` greedy tokens (appended to `tokens`, if given), timed by wall clock."""
        out = tokens if tokens is not None else []
        t0 = time.perf_counter()
        token = int(np.argmax(self._run(np.array([prompt], np.int64), 0)))
        out.append(token)
        t_first = time.perf_counter()
        for i in range(answer_tokens - 1):
            token = int(np.argmax(self._run(np.array([[token]], np.int64), len(prompt) + i)))
            out.append(token)
        t_end = time.perf_counter()
        ttft, decode_s = t_first - t0, t_end - t_first
        return {"ttft_s": ttft, "latency_s": t_end - t0, "prefill_tok_s": len(prompt) / ttft,
                "decode_tok_s": (answer_tokens - 1) / decode_s if answer_tokens > 1 else float("nan")}
