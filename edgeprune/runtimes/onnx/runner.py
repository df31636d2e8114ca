"""An ONNX Runtime bundle's program: one chat answer to a question, on stdout.

It runs on the device's own Python (device_python.py: onnxruntime, numpy and tokenizers) and imports
nothing of edgeprune but this module, session.py and io_names.py, which `install` puts into the
bundle at their package paths. The chat template is rendered at packaging time around a placeholder
(`prompt_format`): a single-turn prompt is then the text before it, the question, the text after it,
so the device needs no template engine. Greedy by default, as the search measured the model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

CONFIG = "runner.json"
_QUESTION = "\uE000question\uE000"  # a private-use placeholder no template produces by itself
_SHIPPED = ("runner.py", "session.py", "io_names.py")  # this module and what it imports of edgeprune


def prompt_format(tokenizer, system: str | None = None) -> tuple[str, str]:
    """The text before and after the user's question in a single-turn chat prompt that asks for the
    assistant's answer; without a chat template, the question alone."""
    if not getattr(tokenizer, "chat_template", None):
        return "", ""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": _QUESTION}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.count(_QUESTION) != 1:
        raise ValueError("the chat template does not place the user's message once, verbatim")
    before, after = text.split(_QUESTION)
    return before, after


def install(directory: Path, config: dict) -> None:
    """This program into `directory` (run it as `python DIRECTORY runner.json QUESTION`), with
    `config`: model, tokenizer (paths relative to the config), prefix, suffix, stop ids, answer_tokens, threads."""
    package = directory / "edgeprune" / "runtimes" / "onnx"
    package.mkdir(parents=True, exist_ok=True)
    for level in (directory / "edgeprune", directory / "edgeprune" / "runtimes", package):
        (level / "__init__.py").write_text("")
    here = Path(__file__).parent
    for name in _SHIPPED:
        shutil.copyfile(here / name, package / name)
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


def main(argv: list[str] | None = None) -> int:
    from edgeprune.runtimes.onnx.session import BoundDecoder, SessionSettings

    parser = argparse.ArgumentParser(prog="run.sh", description="One chat answer on stdout, then exit.")
    parser.add_argument("config", type=Path, help=f"the bundle's {CONFIG}")
    parser.add_argument("question")
    parser.add_argument("-n", "--max-tokens", type=int, help="answer tokens at most (default: the target's SLO)")
    parser.add_argument("-t", "--threads", type=int, help="default: as the search chose")
    parser.add_argument("--temp", type=float, default=0.0, help="0: greedy, as measured (default)")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens", action="store_true", help="print the prompt's and the answer's token ids as JSON")
    args = parser.parse_args(argv)
    if not args.config.is_file():
        parser.error(f"{args.config} does not exist")
    config = json.loads(args.config.read_text())
    base = args.config.parent

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(base / config["tokenizer"]))
    # The template's text carries the special tokens it needs (BOS included), as the host's renders them.
    prompt = tokenizer.encode(config["prefix"] + args.question + config["suffix"], add_special_tokens=False).ids
    budget = args.max_tokens or config["answer_tokens"]
    decoder = BoundDecoder(base / config["model"], SessionSettings(args.threads or config["threads"]),
                           len(prompt) + budget)
    rng = np.random.default_rng(args.seed)
    stop = set(config["stop"])
    answer: list[int] = []
    for token in decoder.continuation(prompt, lambda logits: pick_token(logits, args.temp, args.top_p, rng)):
        if token in stop:
            break
        answer.append(token)
        if len(answer) == budget:
            break
    if args.tokens:
        print(json.dumps({"prompt": prompt, "answer": answer}))
    else:
        sys.stdout.write(tokenizer.decode(answer, skip_special_tokens=True) + "\n")
    return 0
