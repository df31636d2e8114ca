"""A pruned model as a transformers checkpoint (safetensors + config.json), written shard by shard.

Only what plain transformers can hold (a uniform plan: see `prune.apply.pruned_config`). Tensors
keep the source's stored dtype. A shard is a run of whole layers (the embedding, final norm and
head each count as one), packed up to `max_shard_bytes`: memory holds one shard at a time.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Mapping
from pathlib import Path

from edgeprune.atomic import make_tmp
from edgeprune.errors import EdgepruneError
from edgeprune.models.weights import WeightStore
from edgeprune.prune import Plan, pruned_config
from edgeprune.prune.apply import Loader, PrunedTensor, pruned_tensors

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 2 * 1024**3
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _nbytes(t: PrunedTensor) -> int:
    return math.prod(t.shape) * t.source_dtype.itemsize


def shard_plan(tensors: list[PrunedTensor], max_shard_bytes: int) -> list[list[PrunedTensor]]:
    """Consecutive groups (a layer, or one global tensor) packed into shards of at most
    `max_shard_bytes`; a group larger than that gets a shard of its own."""
    groups: list[list[PrunedTensor]] = []
    for t in tensors:
        if groups and t.layer is not None and groups[-1][0].layer == t.layer:
            groups[-1].append(t)
        else:
            groups.append([t])
    shards: list[list[PrunedTensor]] = []
    size = 0
    for group in groups:
        group_bytes = sum(_nbytes(t) for t in group)
        if not shards or size + group_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += group_bytes
    return shards


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_hf_checkpoint(store: WeightStore, plan: Plan, overrides: Mapping[str, Loader] | None, directory: Path,
                        max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write `store`'s model with `plan` applied as a transformers checkpoint in `directory` (which must
    not exist yet; it appears complete or not at all). `overrides` as in `export.write_gguf`."""
    from safetensors.torch import save_file

    if directory.exists():
        raise EdgepruneError(f"{directory} exists already; the checkpoint is written into a new directory.")
    config = pruned_config(store.config, plan)
    tensors = pruned_tensors(store, plan, overrides)
    shards = shard_plan(tensors, max_shard_bytes)
    names = _shard_names(len(shards))
    config.tie_word_embeddings = store.tied  # what the weights are, whatever the source's config said
    config.dtype = tensors[0].source_dtype
    if getattr(config, "quantization_config", None) is not None:  # a GGUF source's: the weights are plain now
        del config.quantization_config
    tmp = make_tmp(directory)
    try:
        weight_map: dict[str, str] = {}
        for file, shard in zip(names, shards, strict=True):
            data = {}
            for t in shard:
                data[t.name] = t.read().to(t.source_dtype).contiguous()
                weight_map[t.name] = file
            save_file(data, tmp / file, metadata={"format": "pt"})
            log.debug("wrote %s (%d tensors)", file, len(data))
            del data
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors)}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config.save_pretrained(tmp)
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

