"""The names of an edgeprune ONNX decoder's inputs and outputs: what the exporter writes and what
every runner binds. Plain strings, no imports: a bundle's runner can carry this file as it is."""

INPUT_IDS, ATTENTION_MASK, LOGITS = "input_ids", "attention_mask", "logits"
PAST, PRESENT = "past_key_values.", "present."  # a layer's cache in, and out with the new positions


def past_names(layer: int) -> tuple[str, str]:
    return f"{PAST}{layer}.key", f"{PAST}{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"{PRESENT}{layer}.key", f"{PRESENT}{layer}.value"


def present_of(past: str) -> str:
    """The output that returns the input cache `past` extended."""
    return PRESENT + past.removeprefix(PAST)


def past_of(present: str) -> str:
    return PAST + present.removeprefix(PRESENT)
