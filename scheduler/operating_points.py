"""Operating points: how much decode work one worker sustains per LoRA rank class while its TTFT stays within
the SLO. Plain data, read by the scheduler core's rank-aware placement (`scheduler.placement`) live and in
the simulator, so both size rank classes with the same numbers.

A point is measured (`python -m bench operating-points`) by driving one worker with calls of adapters of one
rank class (or a mix of classes) at rising concurrency and keeping the highest decode throughput whose p95
TTFT is within `slo_ttft_s`. `OperatingPoints.load(rank, tokens_per_s)` turns a demand into the fraction of
one worker it needs; a rank between two classes takes the next class up, a rank above the largest class
takes the largest (its throughput scaled down by the rank ratio: the LoRA work grows with the rank).

File format (JSON): {"slo_ttft_s": float, "source": str, "points": [{"rank": int, "tokens_per_s": float,
"concurrency": int, "ttft_p95_s": float}, ...], "mixes": [{"shares": {"8": 0.9, "128": 0.1},
"tokens_per_s": float, "concurrency": int, "ttft_p95_s": float}, ...]} (mixes optional).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path(__file__).with_name("operating_points.json")


@dataclass(frozen=True)
class OperatingPoint:
    """One rank class on one worker: decode tokens/s at the SLO, at `concurrency` calls in flight."""

    rank: int
    tokens_per_s: float
    concurrency: int = 0
    ttft_p95_s: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"an operating point's rank must be >= 1 (got {self.rank})")
        if not self.tokens_per_s > 0:
            raise ValueError(f"rank {self.rank}: tokens_per_s must be > 0 (got {self.tokens_per_s})")


@dataclass(frozen=True)
class MixPoint:
    """A mix of rank classes on one worker (share of calls per class) and the throughput it sustains."""

    shares: Mapping[int, float]
    tokens_per_s: float
    concurrency: int = 0
    ttft_p95_s: float = 0.0


@dataclass(frozen=True)
class OperatingPoints:
    """The points of every rank class, sorted by rank (module docstring)."""

    slo_ttft_s: float
    points: tuple[OperatingPoint, ...]
    mixes: tuple[MixPoint, ...] = ()
    source: str = ""
    classes: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("operating points need at least one rank class")
        if not self.slo_ttft_s > 0:
            raise ValueError(f"slo_ttft_s must be > 0 (got {self.slo_ttft_s})")
        ordered = tuple(sorted(self.points, key=lambda p: p.rank))
        if len({p.rank for p in ordered}) != len(ordered):
            raise ValueError(f"rank classes repeat: {[p.rank for p in ordered]}")
        object.__setattr__(self, "points", ordered)
        object.__setattr__(self, "classes", tuple(p.rank for p in ordered))

    def rank_class(self, rank: int) -> int:
        """The class an adapter of `rank` belongs to: the smallest class >= rank (the largest above them all;
        rank 0, unknown, counts as the smallest)."""
        i = bisect.bisect_left(self.classes, max(rank, 1))
        return self.classes[min(i, len(self.classes) - 1)]

    def tokens_per_s(self, rank: int) -> float:
        """Decode tokens/s one worker sustains at the SLO serving only adapters of `rank`'s class."""
        cls = self.rank_class(rank)
        point = self.points[self.classes.index(cls)]
        return point.tokens_per_s * (cls / rank if rank > cls else 1.0)

    def load(self, rank: int, tokens_per_s: float) -> float:
        """The fraction of one worker that a demand of `tokens_per_s` decode tokens/s of `rank` needs."""
        return max(0.0, tokens_per_s) / self.tokens_per_s(rank)

    def mixed_tokens_per_s(self, shares: Mapping[int, float]) -> float:
        """Throughput of a worker serving classes in these shares of its tokens: a measured mix of the same
        classes when there is one (nearest shares), else each token at its own class's cost (harmonic)."""
        total = sum(s for s in shares.values() if s > 0)
        if total <= 0:
            raise ValueError(f"a mix needs a positive share (got {dict(shares)})")
        by_class: dict[int, float] = {}
        for rank, share in shares.items():
            if share > 0:
                c = self.rank_class(rank)
                by_class[c] = by_class.get(c, 0.0) + share / total
        same = [m for m in self.mixes if {self.rank_class(r) for r, s in m.shares.items() if s > 0} == set(by_class)]
        if same and len(by_class) > 1:
            def distance(m: MixPoint) -> float:
                t = sum(m.shares.values())
                return sum(abs(m.shares.get(c, 0.0) / t - by_class[c]) for c in by_class)

            return min(same, key=distance).tokens_per_s
        return 1.0 / sum(share / self.tokens_per_s(c) for c, share in by_class.items())

    # -- files ------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "slo_ttft_s": self.slo_ttft_s,
            "source": self.source,
            "points": [{"rank": p.rank, "tokens_per_s": p.tokens_per_s, "concurrency": p.concurrency,
                        "ttft_p95_s": p.ttft_p95_s} for p in self.points],
            "mixes": [{"shares": {str(r): s for r, s in m.shares.items()}, "tokens_per_s": m.tokens_per_s,
                       "concurrency": m.concurrency, "ttft_p95_s": m.ttft_p95_s} for m in self.mixes],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OperatingPoints:
        try:
            points = tuple(OperatingPoint(int(p["rank"]), float(p["tokens_per_s"]), int(p.get("concurrency", 0)),
                                          float(p.get("ttft_p95_s", 0.0))) for p in data["points"])
            mixes = tuple(MixPoint({int(r): float(s) for r, s in m["shares"].items()}, float(m["tokens_per_s"]),
                                   int(m.get("concurrency", 0)), float(m.get("ttft_p95_s", 0.0)))
                          for m in data.get("mixes", ()))
            return cls(float(data["slo_ttft_s"]), points, mixes, str(data.get("source", "")))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not an operating points object ({type(e).__name__}: {e})") from e

    @classmethod
    def read(cls, path: Path | str = DEFAULT_PATH) -> OperatingPoints:
        """Operating points from a JSON file (module docstring); a clear error when it is not one."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable JSON file ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: operating points are a JSON object (got {type(data).__name__})")
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def write(self, path: Path | str) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def from_lists(slo_ttft_s: float, ranks: Sequence[int], tokens_per_s: Sequence[float], source: str = "") -> OperatingPoints:
    """Points from parallel lists (for tests and for points derived from a cost model)."""
    return OperatingPoints(slo_ttft_s, tuple(OperatingPoint(r, t) for r, t in zip(ranks, tokens_per_s, strict=True)),
                           source=source)
