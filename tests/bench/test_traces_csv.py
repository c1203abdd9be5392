"""The canonical trace CSV (`timestamp,adapter,prompt_tokens,output_tokens`): round trip, the checks that name the
file, line and column of a bad field, the converter from Azure and Alibaba traces, and the train/judge split."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import traces
from bench.traces import TraceError, TraceRequest

ROOT = Path(__file__).resolve().parents[2]
HEADER = "timestamp,adapter,prompt_tokens,output_tokens\n"

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:49.2224670,879,0
2023-11-16 18:16:51.3910170,91,700
"""
ALIBABA = """gmt_create,predict_type,predict_status,exec_time_seconds,groupId,prompt_length,negative_prompt_length,\
num_images_per_prompt,num_inference_steps,checkpoint_model_version_id,num_lora
2024-11-15 16:57:50,TXT_2_IMG,SUCCEED,32.0,G0000,63.0,26.0,1.0,30.0,M0000,0
2024-11-15 18:16:14,TXT_2_IMG,SUCCEED,43.0,G0001,93.0,,1.0,40.0,M0001,0
2024-11-15 18:16:20,TXT_2_IMG,PENDING,0.0,G0003,,,,,,0
2024-11-15 18:17:16,IMG_2_IMG,FAILED,53.0,G0002,20000.0,,8.0,40.0,M0000,0
"""


def rows() -> list[TraceRequest]:
    return [
        TraceRequest(0.0, "acme", "support-bot", 12, 7),
        TraceRequest(0.1 + 0.2, "", "a003", 1, 1),  # a float that only repr writes back exactly
        TraceRequest(0.3 + 1e-12, "t-2", "m_1", 2047, 512),
        TraceRequest(1234.000001, "", "a003", 5, 9),
    ]


def test_round_trip_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    assert traces.write_trace(path, rows()) == 4
    assert path.read_text().splitlines()[0] == HEADER.strip()
    assert path.read_text().splitlines()[1] == "0.0,acme/support-bot,12,7"
    assert traces.load_canonical(path) == rows()
    assert traces.load_trace(path) == rows()  # detected as the canonical format
    assert traces.detect_format(path) == "lorafn"
    assert traces.load_canonical(path, limit=2) == rows()[:2]
    assert [r.key for r in rows()] == ["acme/support-bot", "a003", "t-2/m_1", "a003"]


def test_a_later_part_keeps_its_times_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "later.csv"
    path.write_text(HEADER + "100.5,a,3,4\n\n100.5,b,1,1\n")
    assert traces.load_canonical(path) == [TraceRequest(100.5, "", "a", 3, 4), TraceRequest(100.5, "", "b", 1, 1)]


@pytest.mark.parametrize(("body", "line", "column", "message"), [
    ("0,a,1,1\nsoon,a,1,1\n", 3, 1, "timestamp must be a number"),
    ("0,a,1,1\n-1,a,1,1\n", 3, 1, "finite number of seconds >= 0"),
    ("0,a,1,1\nnan,a,1,1\n", 3, 1, "finite number"),
    ("5,a,1,1\n4.5,a,1,1\n", 3, 1, "before the previous row's 5.0"),
    ("0,,1,1\n", 2, 2, "adapter must be a name"),
    ("0,acme/,1,1\n", 2, 2, "adapter must be a name"),
    ("0, a,1,1\n", 2, 2, "adapter must be a name"),
    ("0,a,1.5,1\n", 2, 3, "prompt_tokens must be an integer"),
    ("0,a,0,1\n", 2, 3, "prompt_tokens must be an integer >= 1"),
    ("0,a,1,-2\n", 2, 4, "output_tokens must be an integer >= 1"),
    ("0,a,1,x\n", 2, 4, "output_tokens must be an integer"),
])
def test_bad_fields_are_named_by_file_line_and_column(tmp_path: Path, body: str, line: int, column: int,
                                                       message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(HEADER + body)
    with pytest.raises(TraceError, match=message) as caught:
        traces.load_canonical(path)
    assert (caught.value.path, caught.value.line, caught.value.column) == (path, line, column)
    assert str(caught.value).startswith(f"{path}:{line}:{column}: ")


def test_bad_rows_and_headers(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(HEADER + "0,a,1,1\n1,a,1\n")
    with pytest.raises(TraceError, match=r"bad\.csv:3: 3 columns, expected 4") as caught:
        traces.load_canonical(path)
    assert caught.value.column is None
    path.write_text("timestamp,model,prompt,output\n0,a,1,1\n")
    with pytest.raises(TraceError, match=r"bad\.csv:1: the header must be timestamp,adapter"):
        traces.load_canonical(path)
    with pytest.raises(TraceError, match="neither a canonical trace"):
        traces.detect_format(path)


def test_write_refuses_what_load_would(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"out\.csv:3:1: timestamp 1\.0 is before"):
        traces.write_trace(tmp_path / "out.csv", [TraceRequest(2.0, "", "a", 1, 1), TraceRequest(1.0, "", "a", 1, 1)])
    with pytest.raises(TraceError, match=r"out\.csv:2:4: output_tokens"):
        traces.write_trace(tmp_path / "out.csv", [TraceRequest(0.0, "t", "a", 1, 0)])


def test_convert_azure_assigns_zipf_names_by_seed(tmp_path: Path) -> None:
    src, dst = tmp_path / "azure.csv", tmp_path / "out.csv"
    src.write_text(AZURE)
    written = traces.convert(src, dst, adapters=5, zipf_s=1.0, seed=3)
    loaded = traces.load_canonical(dst)
    assert loaded == written
    expected = traces.load_azure(src, adapters=5, zipf_s=1.0, seed=3)
    assert [(r.at_s, r.adapter, r.prompt_tokens, r.output_tokens) for r in loaded] == [
        (r.at_s, r.adapter, r.prompt_tokens, r.output_tokens) for r in expected]
    assert all(r.tenant == "" and r.key == r.adapter and r.adapter.startswith("a00") for r in loaded)
    assert loaded[-1].output_tokens == traces.MAX_OUTPUT_TOKENS  # 700 generated tokens, capped
    assert traces.convert(src, tmp_path / "again.csv", adapters=5, zipf_s=1.0, seed=3) == written


def test_convert_alibaba_per_model_or_per_group_and_model(tmp_path: Path) -> None:
    src = tmp_path / "alibaba.csv"
    src.write_text(ALIBABA)
    dropped: list[TraceRequest] = []
    by_model = traces.convert(src, tmp_path / "model.csv", output_tokens=32, dropped=dropped)
    assert [r.key for r in traces.load_canonical(tmp_path / "model.csv")] == ["M0000", "M0001", "M0000"]
    assert [r.at_s for r in by_model] == [0.0, 4704.0, 4766.0]
    assert [r.tenant for r in dropped] == ["G0003"]  # the pending row names no model: left out, and said so
    traces.convert(src, tmp_path / "pair.csv", alibaba_key="group-model", output_tokens=32)
    pairs = traces.load_canonical(tmp_path / "pair.csv")
    assert [r.key for r in pairs] == ["G0000/M0000", "G0001/M0001", "G0002/M0000"]
    assert (pairs[0].tenant, pairs[0].adapter) == ("G0000", "M0000")
    with pytest.raises(TraceError, match="canonical trace already"):
        traces.convert(tmp_path / "pair.csv", tmp_path / "x.csv")


def test_convert_command(tmp_path: Path) -> None:
    src, dst = tmp_path / "alibaba.csv", tmp_path / "out.csv"
    src.write_text(ALIBABA)
    done = subprocess.run([sys.executable, "-m", "bench.traces", "convert", str(src), str(dst), "--alibaba-key",
                           "group-model", "--output-tokens", "16"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "3 requests over 4,766.0 s, 3 adapters (1 rows naming no model left out)" in done.stdout
    assert [r.output_tokens for r in traces.load_canonical(dst)] == [16, 16, 16]
    bad = subprocess.run([sys.executable, "-m", "bench.traces", "convert", str(dst), str(tmp_path / "x.csv")],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and "canonical trace already" in bad.stderr


def test_split_by_time_and_by_count() -> None:
    trace = [TraceRequest(t, "", f"a{i % 3}", 1, 1) for i, t in enumerate([0.0, 1.0, 2.0, 2.0, 3.0, 10.0])]
    earlier, later = traces.split(trace, 0.3)  # the cut is at 3.0 s of a 10 s span
    assert [r.at_s for r in earlier] == [0.0, 1.0, 2.0, 2.0]
    assert [r.at_s for r in later] == [3.0, 10.0]  # times kept: the later part follows on
    assert earlier + later == trace
    assert traces.split(trace, 0.5, by="count") == (trace[:3], trace[3:])
    assert traces.split([], 0.5) == ([], [])
    for fraction in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            traces.split(trace, fraction)
