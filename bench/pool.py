"""Adapter memory utilisation under a churn of loads and evictions (ranks 4..128), three layouts.

Exact and deterministic: the same seeds give the same figures on any machine. Compared layouts:
lorafn's paged pool, max-rank-padded slots (vLLM/SGLang's layout) and contiguous first-fit extents.
"""

from __future__ import annotations

from statistics import mean
from typing import Any

from bench.report import print_table, write
from storage.backbone import default_backbone_spec
from workers.adapter_pool import simulate_churn

SEEDS = (0, 1, 2, 3, 4)


def run(*, seeds: tuple[int, ...] = SEEDS, rounds: int = 2000) -> dict[str, Any]:
    spec = default_backbone_spec()
    reports = [simulate_churn(seed, spec=spec, rounds=rounds) for seed in seeds]
    rows = [[seed, r.paged, r.padded, r.contiguous, r.paged_min, r.samples] for seed, r in zip(seeds, reports, strict=True)]
    summary = {
        "paged_mean": mean(r.paged for r in reports),
        "padded_mean": mean(r.padded for r in reports),
        "contiguous_mean": mean(r.contiguous for r in reports),
        "paged_min": min(r.paged_min for r in reports),
    }
    print_table(
        "adapter memory utilisation under churn (ranks 4..128, SmolLM2-135M shapes; higher is better)",
        ["seed", "lorafn paged", "max-rank slots", "contiguous first-fit", "paged min", "samples"],
        [*rows, ["mean", summary["paged_mean"], summary["padded_mean"], summary["contiguous_mean"],
                 summary["paged_min"], ""]],
    )
    payload = {"seeds": list(seeds), "rounds": rounds, "per_seed": [dict(zip(
        ["seed", "paged", "padded", "contiguous", "paged_min", "samples"], row, strict=True)) for row in rows],
        **summary}
    write("pool_utilisation", payload)
    return payload
