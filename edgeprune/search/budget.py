"""The budget a candidate must meet, from the SLO: an absolute latency, a speed-up, or both.

An absolute budget is judged on the candidate's p90 end-to-end latency. A speed-up is judged on
runs alternated with the unpruned model in one process: the median ratio of adjacent runs. On a
shared machine whose speed drifts by 10-20% within seconds, a ratio of runs taken side by side is
what can be trusted; p90 against p90 of separate runs would mostly measure the drift.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgeprune.config import SLO
from edgeprune.measure import BenchmarkRecord

GIB = 1 << 30
MEETS = "meets"
OVER_RAM = "over RAM ceiling"
EMULATED = "not judged: timed under emulation"
OVER_LATENCY = "over latency budget"
SHORT_OF_SPEEDUP = "short of the speed-up"


@dataclass(frozen=True)
class Budget:
    latency_s: float | None
    speedup: float | None
    ram_bytes: int | None

    @classmethod
    def from_slo(cls, slo: SLO) -> Budget:
        ram = int(slo.ram_ceiling_gib * GIB) if slo.ram_ceiling_gib is not None else None
        return cls(latency_s=slo.latency_budget_s, speedup=slo.speedup, ram_bytes=ram)

    def verdict(self, record: BenchmarkRecord) -> str:
        if record.emulated:
            return EMULATED
        if record.ram_cap_exceeded:
            return OVER_RAM
        if self.latency_s is not None and record.latency_p90 > self.latency_s:
            return OVER_LATENCY
        if self.speedup is not None and record.speedup < self.speedup:
            return SHORT_OF_SPEEDUP
        if self.ram_bytes is not None and record.peak_rss_bytes > self.ram_bytes:
            return OVER_RAM
        return MEETS

    def shortfall(self, record: BenchmarkRecord) -> float:
        """How far from meeting the latency criteria (1.0 = just meets; larger = further off)."""
        gaps = [1.0]
        if self.latency_s is not None:
            gaps.append(record.latency_p90 / self.latency_s)
        if self.speedup is not None:
            gaps.append(self.speedup / record.speedup)
        return max(gaps)

    def describe(self) -> str:
        parts = [f"p90 latency <= {self.latency_s:g} s"] if self.latency_s is not None else []
        if self.speedup is not None:
            parts.append(f">= {self.speedup:g}x faster than the unpruned model (timed alongside)")
        if self.ram_bytes is not None:
            parts.append(f"peak RSS <= {self.ram_bytes / GIB:g} GiB")
        return " and ".join(parts)

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"description": self.describe()}
