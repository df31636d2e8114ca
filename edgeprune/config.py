"""Schemas for what users write: targets (device + SLO) and build profiles (search presets).

Both are TOML files whose name (the file stem) is the name users type: `--target arm16g` reads
`targets/arm16g.toml`. Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from edgeprune.errors import EdgepruneError
from edgeprune.quantize.llamacpp import QUANT_FTYPES
from edgeprune.quantize.recipes import RECIPES
from edgeprune.runtimes.onnx.weights import WEIGHTS as ONNX_WEIGHTS
from edgeprune.sparse.methods import SPARSE_METHODS, SparseSettings


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Hardware(Strict):
    arch: Literal["x86_64", "aarch64", "armv7l"]
    cores: int = Field(ge=1, description="CPU cores the model may use (becomes the thread count)")
    ram_gib: float = Field(gt=0)
    memory_bandwidth_gbs: float = Field(gt=0, description="sustained memory bandwidth, GB/s")


class SLO(Strict):
    prompt_tokens: int = Field(ge=1, le=8192)
    answer_tokens: int = Field(ge=1, le=8192)
    latency_budget_s: float | None = Field(default=None, gt=0, description="end-to-end p90 latency")
    speedup: float | None = Field(
        default=None, gt=1.0, description="required speed-up over the unpruned model, same device"
    )
    ram_ceiling_gib: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _has_budget(self) -> SLO:
        if self.latency_budget_s is None and self.speedup is None:
            raise ValueError("an SLO needs latency_budget_s, speedup, or both")
        return self


class Toolchain(Strict):
    triple: str = Field(pattern=r"^[a-z0-9_]+-[a-z0-9_]+-[a-z0-9_]+$")
    cpu_flags: str = Field(description="value for -march, e.g. armv8.2-a+dotprod")


class SparsitySpec(Strict):
    """Unstructured or N:M sparsity, as `edgeprune prune --method` and a target's [sparsity] take it."""

    method: Literal[tuple(SPARSE_METHODS)]  # type: ignore[valid-type]
    sparsity: float = Field(default=0.5, gt=0, lt=1, description="share of each row's weights set to zero")
    nm: str | None = Field(default=None, pattern=r"^[0-9]+:[0-9]+$", description="N:M, e.g. 2:4: N zeros per M")
    blocksize: int = Field(default=128, ge=1, description="SparseGPT: columns pruned per OBS block")
    percdamp: float = Field(default=0.01, ge=0, description="SparseGPT: Hessian dampening, share of its mean diagonal")
    mask_group: Literal["row", "block"] = Field(
        default="row", description="SparseGPT unstructured: exact sparsity per row, or the reference's per block")

    @model_validator(mode="after")
    def _consistent(self) -> SparsitySpec:
        if self.mask_group != "row" and (self.method != "sparsegpt" or self.nm):
            raise ValueError("mask_group 'block' applies to unstructured SparseGPT only")
        if self.nm is None:
            return self
        n, m = self.pattern
        if not 0 < n < m:
            raise ValueError(f"N:M needs 0 < N < M, got {self.nm}")
        if "sparsity" in self.model_fields_set and abs(self.sparsity - n / m) > 1e-9:
            raise ValueError(f"sparsity {self.sparsity:g} contradicts {self.nm}; give one of them")
        if self.method == "sparsegpt" and self.blocksize % m:
            raise ValueError(f"blocksize {self.blocksize} is not a multiple of M = {m}")
        return self

    @property
    def pattern(self) -> tuple[int, int] | None:
        if self.nm is None:
            return None
        n, m = self.nm.split(":")
        return int(n), int(m)

    def settings(self) -> SparseSettings:
        nm = self.pattern
        sparsity = nm[0] / nm[1] if nm else self.sparsity
        return SparseSettings(sparsity, nm, self.blocksize, self.percdamp, self.mask_group)

    def describe(self) -> str:
        return f"{self.method} {self.nm}" if self.nm else f"{self.method} {self.sparsity:.0%}"


class SparsityOptIn(SparsitySpec):
    """A target's opt-in to sparse candidates; llama.cpp's CPU kernels gain no speed from zeros."""

    reason: str = Field(min_length=1, description="why this target benefits (runtime, compressed size)")

    def spec(self) -> SparsitySpec:
        """The method alone: the reason is documentation, not an input of any artifact."""
        return SparsitySpec(**self.model_dump(exclude={"reason"}, exclude_unset=True))


class DeviceConfig(Strict):
    """Where candidates are measured (a target's [device] table; `--device` and friends override it)."""

    url: str = Field(default="local", description="local, ssh://[user@]host[:port], or qemu-aarch64")
    urls: tuple[str, ...] = Field(
        default=(), description="a fleet: several devices of the same hardware (local or ssh://) that time candidates "
        "in parallel; replaces url")
    # local
    pin: bool = Field(default=True, description="pin the runner to as many cores as it has threads")
    ram_cap: bool = Field(default=False, description="kill a run that exceeds the SLO's RAM ceiling (a verdict)")
    # ssh: OpenSSH's own ~/.ssh/config, keys and known_hosts apply unless these replace them
    identity: Path | None = Field(default=None, description="private key file (ssh -i)")
    known_hosts: Path | None = Field(default=None, description="known_hosts file to verify the host key against")
    ssh_config: Path | None = Field(default=None, description="ssh_config file to use instead of ~/.ssh/config")
    accept_new_host_key: bool = Field(
        default=False, description="trust a host key seen for the first time (a changed key is still refused)")
    connect_timeout_s: float = Field(default=10, gt=0)
    retries: int = Field(default=2, ge=0, le=10, description="reconnection attempts after a failed connection")
    python: str | None = Field(
        default=None, description="the device's Python with edgeprune installed: measure with it, not llama-bench")

    @field_validator("url")
    @classmethod
    def _known_form(cls, url: str) -> str:
        if url in ("local", "qemu-aarch64") or url.startswith("ssh://"):
            return url
        raise ValueError(f"device '{url}' is none of local, ssh://[user@]host[:port], qemu-aarch64")

    @field_validator("urls")
    @classmethod
    def _a_fleet(cls, urls: tuple[str, ...]) -> tuple[str, ...]:
        for url in urls:
            if url != "local" and not url.startswith("ssh://"):
                raise ValueError(f"a fleet's devices are local or ssh://[user@]host[:port], not '{url}'")
        if len(set(urls)) != len(urls):
            raise ValueError("a device is listed twice in urls")
        return urls

    @model_validator(mode="before")
    @classmethod
    def _first_of_the_fleet(cls, data: Any) -> Any:
        """With urls, url is the first device's: it times what is timed one at a time."""
        if isinstance(data, dict) and data.get("urls"):
            first = tuple(data["urls"])[0]
            if data.get("url", first) != first:
                raise ValueError("give either url (one device) or urls (a fleet), not both")
            data = data | {"url": first}
        return data

    @model_validator(mode="after")
    def _options_fit_the_kind(self) -> DeviceConfig:
        ssh_only = ("identity", "known_hosts", "ssh_config", "accept_new_host_key", "python")
        given = sorted(k for k in ssh_only if k in self.model_fields_set and getattr(self, k))
        if given and not any(u.startswith("ssh://") for u in self.fleet):
            raise ValueError(f"{', '.join(given)} apply to ssh:// devices only, not to '{self.url}'")
        if self.ram_cap and self.fleet != ("local",):
            raise ValueError(f"ram_cap applies to the local device only, not to '{', '.join(self.fleet)}'")
        return self

    @property
    def fleet(self) -> tuple[str, ...]:
        """Every device's URL, the first one's first."""
        return self.urls or (self.url,)

    def members(self) -> list[DeviceConfig]:
        """One table per device of the fleet, each with this table's options."""
        if not self.urls:
            return [self]
        return [self.model_copy(update={"url": url, "urls": ()}) for url in self.urls]

    def overridden(self, url: str | None = None, **options: object) -> DeviceConfig:
        """This table with command-line options on top; a different URL starts from a fresh table."""
        base = self.model_dump(exclude_unset=True) if url in (None, self.url) else {}
        given = {k: v for k, v in options.items() if v not in (None, False)}
        try:
            return DeviceConfig(**(base | {"url": url or self.url} | given))
        except ValidationError as e:
            raise EdgepruneError(f"Invalid device options: {first_error(e)}.") from None


class RuntimeTable(Strict):
    """A target's [runtime] table: the runtimes its device may run. The search realises each
    structure it tries in each of them and keeps the best quality within budget across them."""

    allowed: tuple[str, ...] = Field(
        default=(), description="runtime names, the baseline's first; empty: every runtime searched unasked "
        "(llama.cpp; onnxruntime is searched when named)")

    @field_validator("allowed")
    @classmethod
    def _once_each(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        # Unknown names are refused by build.allowed_runtimes: the registry loads every runtime and
        # its devices, which must stay out of the code that stage keys hash (this module is in it).
        if len(set(names)) != len(names):
            raise ValueError("a runtime is listed twice")
        return names


class Target(Strict):
    name: str = Field(exclude=True, description="the file stem; not a key in the file")
    description: str
    hardware: Hardware
    slo: SLO
    toolchain: Toolchain
    device: DeviceConfig = DeviceConfig()
    runtime: RuntimeTable = RuntimeTable()
    sparsity: SparsityOptIn | None = None

    @model_validator(mode="after")
    def _cap_needs_a_ceiling(self) -> Target:
        if self.device.ram_cap and self.slo.ram_ceiling_gib is None:
            raise ValueError("device.ram_cap needs slo.ram_ceiling_gib: the cap is the ceiling")
        return self

    def with_device(self, device: DeviceConfig) -> Target:
        if device.ram_cap and self.slo.ram_ceiling_gib is None:
            raise EdgepruneError(f"--ram-cap needs a RAM ceiling, and target {self.name} has no slo.ram_ceiling_gib.")
        return self.model_copy(update={"device": device})

    def with_budget(self, latency_budget_s: float | None, speedup: float | None) -> Target:
        """Replace the SLO's latency criteria (both of them) with the given ones."""
        slo = self.slo.model_dump() | {"latency_budget_s": latency_budget_s, "speedup": speedup}
        try:
            return self.model_copy(update={"slo": SLO(**slo)})
        except ValidationError as e:
            raise EdgepruneError(f"Invalid budget override: {first_error(e)}.") from None


class CalibrationSettings(Strict):
    samples: int = Field(ge=1, description="calibration sequences")
    heldout_samples: int = Field(ge=1, description="held-out sequences for quality evaluation")
    seq_len: int = Field(ge=16, le=4096, description="tokens per sequence")
    seed: int = Field(default=0, ge=0, description="sampling seed of self-generated text")


class BenchmarkSettings(Strict):
    warmup: int = Field(ge=0)
    repetitions: int = Field(ge=3, description="timed runs; p90 of fewer than 3 means nothing")
    tune_settings: bool = Field(default=True, description="time the runtime's settings (threads, flash attention, "
                                "batch) on the selected candidate and ship the fastest")


class SearchSettings(Strict):
    quant: Literal[tuple(QUANT_FTYPES)] = "Q4_K_M"  # type: ignore[valid-type]  # llama.cpp candidates'
    onnx_quant: Literal[tuple(ONNX_WEIGHTS)] = "INT4"  # type: ignore[valid-type]  # ONNX Runtime candidates'
    imatrix: bool = Field(default=True, description="importance matrix (llama.cpp) or GPTQ (ONNX) from the "
                          "calibration text")
    recipes: tuple[Literal[tuple(RECIPES)], ...] = Field(  # type: ignore[valid-type]
        default=("default",), min_length=1, description="per-tensor type recipes to try, in order"
    )
    layer_step: int = Field(ge=1, description="layers removed per depth step")
    max_layer_fraction: float = Field(gt=0, lt=1)
    max_head_fraction: float = Field(ge=0, lt=1, description="share of query heads removable")
    max_ffn_fraction: float = Field(default=0.0, ge=0, lt=1, description="share of FFN channels removable")
    attention_step: int = Field(default=0, ge=0, description="attention sublayers removed per step (0: none)")
    max_attention_fraction: float = Field(default=0.5, ge=0, lt=1, description="share of attention sublayers removable")
    depth_method: str = Field(default="block-influence", description="ranks layers and attention sublayers")
    width_method: str = Field(default="wanda-sp", description="ranks query heads and FFN channels")
    max_candidates: int = Field(ge=1)
    max_timed: int = Field(default=8, ge=2, description="pareto: device benchmarks at most, the baseline's and "
                           "the pick's confirmation included (one more per pick that fails its confirmation, "
                           "as its replacement is confirmed too)")
    strategy: str = Field(default="pareto", description="pareto: predict every plan, build and time only what "
                          "can win; greedy: step by measured step")

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, name: str) -> str:
        from edgeprune.search import STRATEGIES

        if name not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {name!r}")
        return name

    @field_validator("depth_method", "width_method")
    @classmethod
    def _structured_method(cls, name: str, info: ValidationInfo) -> str:
        from edgeprune.structured.methods import STRUCTURED_METHODS, DepthMethod, WidthMethod

        kind = DepthMethod if info.field_name == "depth_method" else WidthMethod
        names = [n for n, m in STRUCTURED_METHODS.items() if isinstance(m, kind) and not getattr(m, "block", False)]
        if name not in names:
            raise ValueError(f"{info.field_name} must be one of {', '.join(names)}, not {name!r}")
        return name


class RecoverySettings(Strict):
    """Recovery fine-tuning: a pruned model distilled toward the reference (`edgeprune recover`, and in
    `build` the best candidates within budget when `enabled`)."""

    enabled: bool = Field(default=False, description="build: recover the best candidates within budget")
    method: Literal["lora", "full"] = Field(default="lora", description="LoRA adapters on every decoder linear "
                                            "layer (merged after), or every decoder weight trained")
    objective: Literal["kd", "sft"] = Field(default="kd", description="kd: KL divergence to the reference's "
                                            "next-token distribution; sft: cross-entropy on the text (the usual "
                                            "recipe, kept for comparison)")
    minutes: float = Field(default=30.0, gt=0, description="training time per candidate (wall clock)")
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many steps, if sooner")
    extra_samples: int = Field(default=128, ge=0, description="training windows self-generated beyond the "
                               "calibration ones (other prompts; never the held-out windows)")
    batch_size: int = Field(default=4, ge=1, description="windows per step")
    learning_rate: float = Field(default=0.0, ge=0, description="peak; 0: 2e-4 for LoRA, 5e-5 for full")
    lora_rank: int = Field(default=16, ge=1)
    lora_alpha: float = Field(default=32.0, gt=0)
    temperature: float = Field(default=1.0, gt=0, description="distillation temperature (teacher and student)")
    top_k: int = Field(default=64, ge=1, description="teacher probabilities stored per position (the rest as one "
                       "tail mass)")
    candidates: int = Field(default=2, ge=1, description="build: how many candidates within budget are recovered")
    checkpoint_seconds: float = Field(default=60.0, gt=0, description="a killed recovery resumes from its last "
                                      "checkpoint")
    seed: int = Field(default=0, ge=0)

    def peak_lr(self) -> float:
        return self.learning_rate or (2e-4 if self.method == "lora" else 5e-5)

    def describe(self) -> str:
        what = f"LoRA r{self.lora_rank}" if self.method == "lora" else "full fine-tuning"
        how = f"logit distillation at T={self.temperature:g}" if self.objective == "kd" else "cross-entropy (SFT)"
        return f"{what}, {how}, {self.minutes:g} min"


class Profile(Strict):
    name: str = Field(exclude=True)
    description: str
    calibration: CalibrationSettings
    benchmark: BenchmarkSettings
    search: SearchSettings
    recovery: RecoverySettings = RecoverySettings()


def shipped_dir(kind: str) -> Path:
    """Where the shipped `targets/` or `profiles/` live: the repository, or inside a wheel."""
    repo = Path(__file__).resolve().parent.parent / kind
    if repo.is_dir():
        return repo
    return Path(__file__).resolve().parent / "_shipped" / kind


def search_dirs(kind: str) -> list[Path]:
    """User directories first (EDGEPRUNE_TARGETS / EDGEPRUNE_PROFILES, ./targets), then shipped."""
    dirs = [Path(p) for p in os.environ.get(f"EDGEPRUNE_{kind.upper()}", "").split(os.pathsep) if p]
    dirs.append(Path.cwd() / kind)
    dirs.append(shipped_dir(kind))
    unique: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def available(kind: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in search_dirs(kind):
        for f in sorted(d.glob("*.toml")):
            found.setdefault(f.stem, f)
    return found


def first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown key '{where}'"
    if err["type"] == "missing":
        return f"missing key '{where}'"
    msg = err["msg"].removeprefix("Value error, ")
    return f"'{where}': {msg}" if where else msg


def find(kind: str, name_or_path: str) -> Path:
    """The file a target or profile name (or a .toml path, or any path with a directory) stands for."""
    path = Path(name_or_path)
    if not (path.suffix == ".toml" or os.sep in name_or_path):
        known = available(kind)
        if name_or_path not in known:
            names = ", ".join(sorted(known)) or "none"
            raise EdgepruneError(
                f"Unknown {kind[:-1]} '{name_or_path}': choose one of {names}, or give a .toml path."
            )
        path = known[name_or_path]
    if not path.is_file():
        raise EdgepruneError(f"{kind[:-1].capitalize()} file {path} does not exist.")
    return path


def _load(kind: str, schema: type[Strict], name_or_path: str) -> Strict:
    path = find(kind, name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise EdgepruneError(f"{path} is not valid TOML ({e}); fix the syntax.") from None
    except OSError as e:
        raise EdgepruneError(f"Cannot read {kind[:-1]} file {path} ({e.strerror}); check its permissions.") from None
    if "name" in data:
        raise EdgepruneError(f"{path}: remove the 'name' key; the file name ({path.stem}) is the name.")
    try:
        return schema(name=path.stem, **data)
    except ValidationError as e:
        raise EdgepruneError(f"{path}: {first_error(e)}; fix the file.") from None


def load_target(name_or_path: str) -> Target:
    return _load("targets", Target, name_or_path)  # type: ignore[return-value]


def load_profile(name_or_path: str) -> Profile:
    return _load("profiles", Profile, name_or_path)  # type: ignore[return-value]
