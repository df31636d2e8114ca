"""Load the reference model: an fp32 torch `LlamaForCausalLM` plus its tokenizer.

A GGUF source is dequantized by transformers once (about 30 s for the embedded model) and cached
as a safetensors directory keyed by the GGUF's sha256, so later builds load it in a second or two.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeprune.errors import EdgepruneError
from edgeprune.models.source import ModelSource
from edgeprune.models.tokenizer import TokenizerSpec, set_pre_tokenizer

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama",)
# Bump when the cached reference layout changes, so stale caches are not reused.
CACHE_VERSION = 1


@dataclass
class Reference:
    model: Any  # transformers.LlamaForCausalLM, fp32, eval mode
    tokenizer: Any  # transformers tokenizer whose splits match the GGUF runtime
    tokenizer_spec: TokenizerSpec
    source: ModelSource
    sha256: str

    @property
    def config(self) -> Any:
        return self.model.config


def _check_arch(model_type: str | None, where: str) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise EdgepruneError(
            f"{where} is a '{model_type}' model; edgeprune supports {', '.join(SUPPORTED_MODEL_TYPES)} so far."
        )


def _load_hf(location: str, trust_remote_code: bool) -> tuple[Any, Any]:
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise EdgepruneError(f"Cannot read the model config of {location}: {e}".rstrip(".") + ".") from None
    _check_arch(getattr(config, "model_type", None), location)
    model = LlamaForCausalLM.from_pretrained(location, dtype=torch.float32, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


def _gguf_to_hf_dir(gguf_path: Path, target: Path) -> None:
    """Dequantize a llama GGUF into an fp32 safetensors HF directory at `target` (atomically)."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    reader = gguf.GGUFReader(str(gguf_path))
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    _check_arch(arch_field.contents() if arch_field else None, str(gguf_path))
    spec = TokenizerSpec.from_gguf(reader)
    del reader

    log.info("dequantizing %s into a torch reference (once; cached)", gguf_path.name)
    directory, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    tokenizer = set_pre_tokenizer(AutoTokenizer.from_pretrained(directory, gguf_file=name), spec.pre)
    # The weights are plain fp32 now, but save_pretrained refuses a model loaded through the GGUF
    # quantizer: move them into a fresh model whose config has no quantization_config.
    config = model.config
    del config.quantization_config
    config.name_or_path = ""
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    model = plain

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_reference(source: ModelSource, cache_dir: Path, trust_remote_code: bool = False) -> Reference:
    sha = source.sha256()
    if source.kind in ("embedded", "gguf"):
        import gguf

        hf_dir = cache_dir / "reference" / f"{sha[:20]}-v{CACHE_VERSION}"
        if not (hf_dir / "config.json").is_file():
            _gguf_to_hf_dir(source.path, hf_dir)
        model, tokenizer = _load_hf(str(hf_dir), trust_remote_code=False)
        spec = TokenizerSpec.from_gguf(gguf.GGUFReader(str(source.path)))
    else:
        model, tokenizer = _load_hf(source.location, trust_remote_code)
        spec = TokenizerSpec.from_hf(tokenizer, model.config.vocab_size)
    return Reference(model=model, tokenizer=tokenizer, tokenizer_spec=spec, source=source, sha256=sha)
