"""llama.cpp (llama-cpp-python) as the benchmark worker's engine for GGUF files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeprune.runtimes import llamacpp
from edgeprune.runtimes.llamacpp.settings import LlamaSettings


class LlamaCppEngine:
    def __init__(self, path: Path, n_ctx: int, threads: int, settings: dict[str, Any]) -> None:
        self.llm: Any = llamacpp.load(path, n_ctx=n_ctx, threads=threads, settings=LlamaSettings.of(settings, threads))

    def timed_generation(self, prompt: list[int], answer_tokens: int,
                         tokens: list[int] | None = None) -> dict[str, float]:
        return llamacpp.timed_generation(self.llm, prompt, answer_tokens, tokens)

    def close(self) -> None:
        self.llm.close()


load = LlamaCppEngine


def version() -> str:
    return llamacpp.version()


def system_info() -> str:
    return llamacpp.system_info()
