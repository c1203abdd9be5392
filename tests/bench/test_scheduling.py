"""The pre-staging report: every policy on a trace, tables, figures and plots, deterministic."""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path

import pytest

from bench import scheduling
from bench.scheduling import POLICIES, Policy, Setup, report
from bench.simulate import adapter_bytes
from bench.traces import TraceRequest

PNG = b"\x89PNG\r\n\x1a\n"


def bursty(n: int = 240, *, adapters: int = 12, seed: int = 0) -> list[TraceRequest]:
    """Bursts of calls to a few adapters every ~5 minutes, quiet in between: what a predictor can learn."""
    rng = random.Random(seed)
    rows, at = [], 0.0
    while len(rows) < n:
        at += rng.uniform(200, 400)
        hot = rng.sample(range(adapters), 3)
        for _ in range(rng.randint(5, 12)):
            rows.append(TraceRequest(at + rng.uniform(0, 30), "", f"a{rng.choice(hot):02d}", rng.randint(8, 64),
                                     rng.randint(1, 8)))
    return sorted(rows[:n], key=lambda r: r.at_s)


def setup(rows: list[TraceRequest]) -> Setup:
    return Setup("tiny", "a synthetic bursty trace", rows, workers=2, device_bytes=adapter_bytes(64),
                 host_bytes=2 * adapter_bytes(64), interval_s=30.0, warmup=0.5)


SOME = [p for p in POLICIES if p.name in ("reactive LRU", "reactive GreedyDual", "ewma", "histogram", "oracle")]


def test_report_writes_the_tables_and_the_plots(tmp_path: Path) -> None:
    rows = bursty()
    results = report([setup(rows)], SOME, out_dir=tmp_path)
    text = (tmp_path / "scheduling.md").read_text()
    assert "## a synthetic bursty trace" in text and "| policy | cold starts | cold fraction |" in text
    for policy in SOME:
        assert f"| {policy.name} |" in text
    assert "| reactive LRU |" in text and "| 1.00x |" in text  # the baseline against itself
    pngs = sorted(tmp_path.glob("*.png"))
    assert {p.name for p in pngs} == {"scheduling_cold_fraction.png", "scheduling_ttft_cdf.png",
                                      "scheduling_device_memory.png", "scheduling_precision_recall.png",
                                      "scheduling_fallback.png"}
    assert all(p.read_bytes().startswith(PNG) for p in pngs)
    assert all(f"![{p.name}]({p.name})" in text for p in pngs)
    assert (tmp_path / "scheduling.json").exists()

    by_name = {r.policy: r for r in results["tiny"]}
    half = rows[0].at_s + 0.5 * (rows[-1].at_s - rows[0].at_s)
    scored = sum(1 for r in rows if r.at_s >= half)
    for r in by_name.values():
        assert r.scored == scored and r.cold_starts + r.host_loads + r.device_hits == scored
        assert r.unfinished == 0 and r.device_gb_h > 0
    assert by_name["reactive LRU"].precision is None and by_name["ewma"].precision is not None
    assert by_name["oracle"].precision == pytest.approx(1.0) and by_name["oracle"].recall > 0.9
    assert by_name["oracle"].staged_loads > 0
    # What staging can remove from the mean TTFT at all: the calls' wait for their adapter, a part of it.
    base = by_name["reactive LRU"]
    assert 0 < base.load_wait_s["mean"] < base.ttft_s["mean"]
    assert f"a mean TTFT of about {base.ttft_s['mean'] - base.load_wait_s['mean']:.3f} s" in text


def test_same_seed_same_figures(tmp_path: Path) -> None:
    rows = bursty(160, seed=3)
    policies = [Policy("ewma", "ewma"), Policy("fallback", "fallback")]
    runs = [report([setup(rows)], policies, out_dir=tmp_path / str(i), seed=3)["tiny"] for i in range(2)]
    for a, b in zip(runs[0], runs[1], strict=True):
        assert {**asdict(a), "wall_s": 0} == {**asdict(b), "wall_s": 0}


AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
ALIBABA_HEADER = ("gmt_create,predict_type,predict_status,exec_time_seconds,groupId,prompt_length,"
                  "negative_prompt_length,num_images_per_prompt,num_inference_steps,checkpoint_model_version_id,"
                  "num_lora\n")


def test_command_line_on_small_trace_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m bench scheduling --quick` reads the two trace files from --traces-dir."""
    rng = random.Random(4)
    azure = [f"2023-11-16 18:{i // 60:02d}:{i % 60:02d}.{rng.randrange(10**7):07d},{rng.randint(50, 900)},"
             f"{rng.randint(1, 40)}" for i in range(300)]
    (tmp_path / scheduling.AZURE_CONV).write_text(AZURE_HEADER + "\n".join(azure) + "\n")
    alibaba = [f"2024-11-15 {h:02d}:{m:02d}:00,TXT_2_IMG,SUCCEED,30.0,G{rng.randrange(20):04d},80.0,,1.0,30.0,"
               f"M{rng.randrange(8):04d},0" for h in range(24) for m in range(0, 60, 7)]
    (tmp_path / scheduling.ALIBABA).write_text(ALIBABA_HEADER + "\n".join(alibaba) + "\n")
    out = tmp_path / "out"
    results = scheduling.main(["--quick", "--traces-dir", str(tmp_path), "--results-dir", str(out),
                               "--policies", "reactive LRU,ewma", "--adapters", "50"])
    assert set(results) == {"alibaba", "azure_conv"}
    assert [r.policy for r in results["alibaba"]] == ["reactive LRU", "ewma"]
    assert (out / "scheduling.md").exists() and list(out.glob("*.png"))
    assert "azure_conv / ewma" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown policies"):
        scheduling.main(["--policies", "lru", "--traces-dir", str(tmp_path)])
