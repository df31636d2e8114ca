"""onnxruntime as the benchmark worker's engine for edgeprune's ONNX files: the decode loop with the
KV cache bound on the runtime's side (session.BoundDecoder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeprune.runtimes.onnx.session import BoundDecoder, SessionSettings, system_info, version

__all__ = ["load", "system_info", "version"]


class OnnxEngine:
    def __init__(self, path: Path, n_ctx: int, threads: int, settings: dict[str, Any]) -> None:
        unknown = set(settings) - {"threads"}
        if unknown:
            raise ValueError(f"onnxruntime takes no setting {', '.join(sorted(unknown))}")
        self.settings = SessionSettings(int(settings.get("threads", threads)))
        self.decoder = BoundDecoder(path, self.settings, n_ctx)

    def timed_generation(self, prompt: list[int], answer_tokens: int,
                         tokens: list[int] | None = None) -> dict[str, float]:
        return self.decoder.timed_generation(prompt, answer_tokens, tokens)

    def close(self) -> None:
        del self.decoder


load = OnnxEngine

