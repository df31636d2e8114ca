"""An ONNX Runtime bundle's program: one chat answer to a question on stdout (run.sh), or an
OpenAI-style HTTP API (serve.sh, `--serve`).

It runs on the device's own Python (device_python.py: onnxruntime, numpy and tokenizers) and imports
nothing of edgeprune but the import-free modules `install` puts into the bundle at their package
paths (_SHIPPED); `--bench` times a benchmark worker's request there (what `verify` measures the
SLO with on the device), printing the worker's record. The chat template is rendered at packaging
time around placeholders (`chat_format`): a single-turn prompt is then fixed text around the
system message and the question, so the device needs no template engine; multi-turn chats are
refused, saying so. Greedy by default, as the search measured the model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

CONFIG = "runner.json"
# Private-use placeholders no template produces by itself.
_QUESTION, _SYSTEM = "\uE000question\uE000", "\uE000system\uE000"
# This module and what it imports of edgeprune, by their paths in the package.
_SHIPPED = ("runtimes/onnx/runner.py", "runtimes/onnx/session.py", "runtimes/onnx/io_names.py", "memory.py", "cpu.py")


def chat_format(tokenizer) -> dict[str, list[str]]:
    """The fixed text around the runtime's parts of a single-turn chat prompt that asks for the
    assistant's answer: `user` [before, after] the question, `system_user` [before, between, after]
    a system message and the question. Without a chat template, the question alone."""
    if not getattr(tokenizer, "chat_template", None):
        return {"user": ["", ""], "system_user": ["", "\n\n", ""]}
    user = _around(tokenizer, [{"role": "user", "content": _QUESTION}])
    system_user = _around(tokenizer, [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _QUESTION}])
    return {"user": user, "system_user": system_user}


def _around(tokenizer, messages: list[dict[str, str]]) -> list[str]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = [text]
    for message in messages:
        head, sep, tail = parts[-1].partition(message["content"])
        if not sep or message["content"] in tail:
            raise ValueError(f"the chat template does not place the {message['role']} message once, verbatim")
        parts[-1:] = [head, tail]
    return parts


def render(fmt: dict[str, list[str]], question: str, system: str | None = None) -> str:
    """A single-turn chat prompt in the model's template (`chat_format`)."""
    if system is None:
        before, after = fmt["user"]
        return before + question + after
    before, between, after = fmt["system_user"]
    return before + system + between + question + after


def install(directory: Path, config: dict) -> None:
    """This program into `directory` (run it as `python DIRECTORY runner.json QUESTION`), with
    `config`: model, tokenizer (paths relative to the config), chat (`chat_format`), stop ids,
    answer_tokens, threads."""
    source = Path(__file__).parents[2]  # the edgeprune package
    for name in _SHIPPED:
        path = directory / "edgeprune" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, path)
    for level in (directory / "edgeprune", *(p for p in (directory / "edgeprune").rglob("*") if p.is_dir())):
        (level / "__init__.py").touch()
    main_module = "from edgeprune.runtimes.onnx.runner import main\n\nraise SystemExit(main())\n"
    (directory / "__main__.py").write_text(main_module)
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def pick_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; else sampled from the smallest set of tokens holding `top_p` of the mass."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = (logits - logits.max()) / temperature
    p = np.exp(z)
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
    return int(rng.choice(keep, p=p[keep] / p[keep].sum()))


class Answerer:
    """The bundle's model and tokenizer, answering one request at a time through one session whose
    cache holds `context` positions (`open`; a request overwrites the last one's from position 0)."""

    def __init__(self, config_path: Path, threads: int | None) -> None:
        from tokenizers import Tokenizer

        self.config = json.loads(config_path.read_text())
        self.base = config_path.parent
        self.tokenizer = Tokenizer.from_file(str(self.base / self.config["tokenizer"]))
        self.threads = threads or self.config["threads"]
        self.stop = set(self.config["stop"])
        self.lock = threading.Lock()
        self.decoder = None
        self.context = 0

    def open(self, context: int) -> Answerer:
        from edgeprune.runtimes.onnx.session import BoundDecoder, SessionSettings

        self.decoder = BoundDecoder(self.base / self.config["model"], SessionSettings(self.threads), context)
        self.context = context
        return self

    def prompt(self, question: str, system: str | None = None) -> list[int]:
        # The template's text carries the special tokens it needs (BOS included), as the host renders them.
        return self.tokenizer.encode(render(self.config["chat"], question, system), add_special_tokens=False).ids

    def answer(self, prompt: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int = 0) -> tuple[list[int], str]:
        """The answer's tokens and why it ended ("stop": an end-of-turn token; "length": max_tokens)."""
        if len(prompt) + max_tokens > self.context:
            raise ValueError(f"{len(prompt)} prompt tokens and {max_tokens} answer tokens exceed the "
                             f"{self.context}-token context")
        from edgeprune.runtimes.onnx.session import until

        rng = np.random.default_rng(seed)
        with self.lock:
            if self.decoder is None:
                raise RuntimeError("open() the answerer before asking it")
            picked = self.decoder.continuation(prompt, lambda logits: pick_token(logits, temperature, top_p, rng))
            return until(picked, self.stop, max_tokens)

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def versions() -> dict[str, str]:
    """What this program runs on: the Python and the libraries that answer."""
    import onnxruntime
    import tokenizers

    return {"python": platform.python_version(), "machine": platform.machine(), "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "tokenizers": tokenizers.__version__}


def bench(request: dict) -> dict:
    """Time a benchmark worker's request (bench_worker.py: prompt, answer_tokens, threads, warmup,
    repetitions, settings, pin; no baseline) on this Python; the worker's record."""
    from edgeprune.cpu import cpu_model
    from edgeprune.memory import peak_rss_bytes
    from edgeprune.runtimes.onnx.session import BoundDecoder, SessionSettings, system_info, version

    if request.get("baseline"):
        raise ValueError("the bundle's runner times its own model alone, not beside a baseline")
    prompt, answer, threads = request["prompt"], request["answer_tokens"], request["threads"]
    if request.get("pin"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    settings = SessionSettings(int((request.get("settings") or {}).get("threads", threads)))
    t0 = time.perf_counter()
    decoder = BoundDecoder(Path(request["model"]), settings, len(prompt) + answer + 8)
    load_s = time.perf_counter() - t0
    tokens: list[int] = []
    for i in range(request["warmup"]):
        decoder.timed_generation(prompt, answer, tokens if i == 0 else None)
    peak = peak_rss_bytes()
    runs = [decoder.timed_generation(prompt, answer, None if tokens else tokens) for _ in range(request["repetitions"])]
    return {"runs": runs, "baseline_runs": [], "load_s": load_s, "peak_rss_bytes": peak, "threads": settings.threads,
            "runtime": version(), "system_info": system_info(), "cpu": cpu_model(),
            "cpus": sorted(os.sched_getaffinity(0)) if request.get("pin") else None, "tokens": tokens}


def serve(answerer: Answerer, host: str, port: int) -> None:
    """An OpenAI-style HTTP API: POST /v1/chat/completions (single-turn: an optional system message
    and one user message), GET /health and /v1/models."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    name = Path(answerer.config["model"]).name

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": {"message": message, "type": "invalid_request_error"}})

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/health":
                self._send(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "edgeprune"}]})
            else:
                self._error(404, f"no {self.path} here: POST /v1/chat/completions, GET /health, GET /v1/models")

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/v1/chat/completions":
                self._error(404, f"no {self.path} here: POST /v1/chat/completions")
                return
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                system, question = _single_turn(request.get("messages"))
                prompt = answerer.prompt(question, system)
                max_tokens = int(request.get("max_tokens") or answerer.config["answer_tokens"])
                tokens, finish = answerer.answer(prompt, max_tokens, float(request.get("temperature", 0.0)),
                                                 float(request.get("top_p", 1.0)), int(request.get("seed", 0)))
            except (ValueError, TypeError, KeyError) as e:
                self._error(400, str(e))
                return
            self._send(200, {
                "id": f"chatcmpl-{int(time.time() * 1000)}", "object": "chat.completion", "created": int(time.time()),
                "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answerer.text(tokens)},
                             "finish_reason": finish}],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(tokens),
                          "total_tokens": len(prompt) + len(tokens)}})

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    server = ThreadingHTTPServer((host, port), Handler)
    sys.stderr.write(f"listening on http://{host}:{server.server_address[1]}\n")
    sys.stderr.flush()
    server.serve_forever()


def _single_turn(messages: object) -> tuple[str | None, str]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages must be a list of {role, content} objects")
    roles = [m.get("role") for m in messages]
    if roles not in (["user"], ["system", "user"]):
        raise ValueError("this server answers single-turn chats: an optional system message, then one user "
                         "message; put earlier turns into the user message as text")
    contents = [m.get("content") for m in messages]
    if not all(isinstance(c, str) for c in contents):
        raise ValueError("each message's content must be a string")
    return (contents[0] if len(contents) == 2 else None), contents[-1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--bench"]:  # a worker's request on stdin, its record on stdout
        json.dump(bench(json.load(sys.stdin)), sys.stdout)
        return 0
    parser = argparse.ArgumentParser(prog="run.sh", description="One chat answer on stdout, then exit; or, with "
                                     "--serve, an OpenAI-style HTTP API.")
    parser.add_argument("config", type=Path, help=f"the bundle's {CONFIG}")
    parser.add_argument("question", nargs="?")
    parser.add_argument("--system", help="a system message before the question")
    parser.add_argument("-n", "--max-tokens", type=int, help="answer tokens at most (default: the target's SLO)")
    parser.add_argument("-t", "--threads", type=int, help="default: as the search chose")
    parser.add_argument("--temp", type=float, default=0.0, help="0: greedy, as measured (default)")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens", action="store_true", help="print the prompt's and the answer's token ids, and "
                        "what ran them, as JSON")
    parser.add_argument("--serve", action="store_true", help="serve HTTP instead of answering one question")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--context", type=int, default=2048, help="--serve: prompt + answer tokens at most")
    args = parser.parse_args(argv)
    if not args.config.is_file():
        parser.error(f"{args.config} does not exist")
    if args.serve == (args.question is not None):
        parser.error("give a question, or --serve")
    if args.serve:
        serve(Answerer(args.config, args.threads).open(args.context), args.host, args.port)
        return 0
    answerer = Answerer(args.config, args.threads)
    budget = args.max_tokens or answerer.config["answer_tokens"]
    prompt = answerer.prompt(args.question, args.system)
    tokens, _ = answerer.open(len(prompt) + budget).answer(prompt, budget, args.temp, args.top_p, args.seed)
    if args.tokens:
        print(json.dumps({"prompt": prompt, "answer": tokens, "versions": versions()}))
    else:
        sys.stdout.write(answerer.text(tokens) + "\n")
    return 0
