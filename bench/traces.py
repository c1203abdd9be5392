"""Trace loaders: real request traces as plain rows for the simulator and for replay.

Every loader returns `TraceRequest`s sorted by arrival, time in seconds from the trace's first row, with
token lengths already fitted to the serving model (SmolLM2-135M: a 2,048-token context). Any path to a
file of the format is accepted; the shared traces and their provenance are described beside them
(`traces/README.md` of the shared folder).

- Azure LLM inference trace 2023 (`TIMESTAMP,ContextTokens,GeneratedTokens`): one service's arrivals and
  lengths, no adapter ids. Adapters are assigned by a Zipf popularity over `adapters` names with exponent
  `zipf_s` (adapter a000 the most popular), deterministically for a seed. Lengths were measured on 7B-70B
  models with long contexts, so the output is capped at `max_output_tokens` and the prompt clipped to the
  rest of the context window.
- Alibaba GenAI serving trace (`gmt_create, ..., groupId, prompt_length, ...,
  checkpoint_model_version_id`): each checkpoint model version is one adapter, called by many tenants
  (the groupId is the row's tenant; the simulator keys adapter versions on tenant/adapter, so `load_trace`'s `alibaba_key` decides), prompt tokens are prompt characters / `chars_per_token`, and the
  output length is fixed or drawn (seeded) from given lengths, since the trace serves images, not text.

The canonical trace ("lorafn" format) is what `lorafn replay` and the simulator read whatever a trace came
from: a CSV with the header `timestamp,adapter,prompt_tokens,output_tokens`, one request per row in time
order. `timestamp` is seconds from the first row of the original trace (a float; a later part of a trace keeps
its times, so its first row need not be 0), `adapter` an adapter key: `tenant/adapter`, or a bare name for
traces without tenants (its `TraceRequest.tenant` is ""); both token counts are integers >= 1. `write_trace`
and `load_canonical` write and read it, `load_trace` reads any of the three formats, and

    python -m bench.traces convert SRC DST [--format azure|alibaba] [--adapters N --zipf S --seed K]
        [--alibaba-key model|group-model]

converts an Azure or Alibaba file (Azure: a bare `a000`.. name per request, Zipf-assigned and seeded; Alibaba:
one adapter per checkpoint model version, a bare name, or per (groupId, model) pair, `group/model`).
`split(rows, fraction)` cuts a trace into an earlier and a later part (fit on one, judge on the other).
"""

from __future__ import annotations

import argparse
import bisect
import csv
import itertools
import math
import random
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

TraceFormat = Literal["azure", "alibaba", "lorafn"]
FORMATS: tuple[TraceFormat, ...] = ("azure", "alibaba")  # the source formats; "lorafn" is the canonical CSV
AlibabaKey = Literal["model", "group-model"]
ALIBABA_KEYS: tuple[AlibabaKey, ...] = ("model", "group-model")
CANONICAL_HEADER = ("timestamp", "adapter", "prompt_tokens", "output_tokens")

CONTEXT_TOKENS = 2048  # the serving model's context window (SmolLM2-135M)
MAX_OUTPUT_TOKENS = 512  # cap on generated tokens: Azure conv's p50 is 129, its tail runs to thousands
AZURE_TENANT = "azure"
AZURE_TIMESTAMP_CHARS = 26  # "%Y-%m-%d %H:%M:%S.%f" (the file has 100 ns resolution: 7 fraction digits)


class TraceError(ValueError):
    """A trace file that is not of the expected format (the message names the file, line and column).

    `path`, `line` (1-based, the header is line 1) and `column` (1-based) are set when known."""

    def __init__(self, message: str, *, path: Path | str | None = None, line: int | None = None,
                 column: int | None = None) -> None:
        self.path, self.line, self.column = path, line, column
        where = ":".join(str(part) for part in (path, line, column) if part is not None)
        super().__init__(f"{where}: {message}" if where else message)


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace. `at_s`: seconds after the trace's first request."""

    at_s: float
    tenant: str
    adapter: str
    prompt_tokens: int
    output_tokens: int

    @property
    def key(self) -> str:
        """The adapter's key in a canonical trace: `tenant/adapter`, or the bare name when there is no tenant."""
        return f"{self.tenant}/{self.adapter}" if self.tenant else self.adapter


def fit_lengths(prompt_tokens: int, output_tokens: int, *, context_tokens: int = CONTEXT_TOKENS,
                max_output_tokens: int = MAX_OUTPUT_TOKENS) -> tuple[int, int]:
    """(prompt, output) fitted to the context window: output capped first, the prompt takes the rest; each
    at least one token (a trace row with 0 generated tokens still costs a prefill and one step)."""
    output = max(1, min(output_tokens, max_output_tokens, context_tokens - 1))
    prompt = max(1, min(prompt_tokens, context_tokens - output))
    return prompt, output


def zipf_cum_weights(n: int, s: float) -> list[float]:
    """Cumulative weights of a Zipf popularity over n items: item i (0-based) has weight 1 / (i + 1) ** s."""
    if n < 1:
        raise ValueError(f"a popularity needs at least one adapter (got {n})")
    if s < 0:
        raise ValueError(f"the Zipf exponent must be >= 0 (got {s})")
    return list(itertools.accumulate(1.0 / (i + 1) ** s for i in range(n)))


def adapter_name(i: int, n: int) -> str:
    """The name of adapter i of n, zero-padded so that names sort by popularity rank."""
    return f"a{i:0{max(3, len(str(n - 1)))}d}"


def load_azure(path: Path | str, *, adapters: int = 100, zipf_s: float = 1.0, seed: int = 0,
               context_tokens: int = CONTEXT_TOKENS, max_output_tokens: int = MAX_OUTPUT_TOKENS,
               limit: int | None = None) -> list[TraceRequest]:
    """An Azure LLM inference trace, adapters assigned by Zipf popularity (module docstring)."""
    cum = zipf_cum_weights(adapters, zipf_s)
    total = cum[-1]
    names = [adapter_name(i, adapters) for i in range(adapters)]
    rng = random.Random(seed)
    rows: list[tuple[datetime, int, int]] = []
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        _require(path, reader.fieldnames, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"))
        for line, row in enumerate(itertools.islice(reader, limit), start=2):
            try:
                at = datetime.fromisoformat(row["TIMESTAMP"][:AZURE_TIMESTAMP_CHARS])
                rows.append((at, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
            except (TypeError, ValueError) as e:
                raise TraceError(f"{path}:{line}: not an Azure trace row ({e}): {row}") from e
    rows.sort(key=lambda r: r[0])
    out = []
    for at, context, generated in rows:
        prompt, output = fit_lengths(context, generated, context_tokens=context_tokens,
                                     max_output_tokens=max_output_tokens)
        # bisect over the cumulative weights: what random.choices does, without a list per call
        adapter = names[min(bisect.bisect(cum, rng.random() * total), adapters - 1)]
        out.append(TraceRequest((at - rows[0][0]).total_seconds(), AZURE_TENANT, adapter, prompt, output))
    return out


def load_alibaba(path: Path | str, *, output_tokens: int | Sequence[int] = 128, chars_per_token: float = 4.0,
                 seed: int = 0, context_tokens: int = CONTEXT_TOKENS, max_output_tokens: int = MAX_OUTPUT_TOKENS,
                 limit: int | None = None) -> list[TraceRequest]:
    """The Alibaba GenAI serving trace: one adapter per checkpoint model version (module docstring).
    `output_tokens`: a fixed length, or lengths to draw from uniformly (seeded)."""
    lengths = [output_tokens] if isinstance(output_tokens, int) else list(output_tokens)
    if not lengths or min(lengths) < 1:
        raise ValueError(f"output lengths must be >= 1 (got {output_tokens})")
    if chars_per_token <= 0:
        raise ValueError(f"chars_per_token must be > 0 (got {chars_per_token})")
    rng = random.Random(seed)
    rows: list[tuple[datetime, str, str, int]] = []
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        _require(path, reader.fieldnames, ("gmt_create", "groupId", "prompt_length", "checkpoint_model_version_id"))
        for line, row in enumerate(itertools.islice(reader, limit), start=2):
            try:
                at = datetime.fromisoformat(row["gmt_create"])
                chars = float(row["prompt_length"] or 0)  # empty: no prompt text
            except (TypeError, ValueError) as e:
                raise TraceError(f"{path}:{line}: not an Alibaba trace row ({e}): {row}") from e
            rows.append((at, row["groupId"], row["checkpoint_model_version_id"], math.ceil(chars / chars_per_token)))
    rows.sort(key=lambda r: r[0])  # stable: rows of the same second keep the file's order
    out = []
    for at, tenant, model, prompt in rows:
        fitted = fit_lengths(prompt, rng.choice(lengths), context_tokens=context_tokens,
                             max_output_tokens=max_output_tokens)
        out.append(TraceRequest((at - rows[0][0]).total_seconds(), tenant, model, *fitted))
    return out


def detect_format(path: Path | str) -> TraceFormat:
    """The format of a trace file, from its header."""
    with Path(path).open(newline="") as f:
        header = next(csv.reader(f), [])
    if tuple(h.strip() for h in header) == CANONICAL_HEADER:
        return "lorafn"
    if "TIMESTAMP" in header and "GeneratedTokens" in header:
        return "azure"
    if "gmt_create" in header and "checkpoint_model_version_id" in header:
        return "alibaba"
    raise TraceError(f"{path}: header {header} is neither a canonical trace ({','.join(CANONICAL_HEADER)}), "
                     "an Azure LLM trace nor the Alibaba GenAI trace")


def _require(path: Path, fieldnames: Sequence[str] | None, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in (fieldnames or ())]
    if missing:
        raise TraceError(f"{path}: missing column(s) {', '.join(missing)} (header: {list(fieldnames or ())})")


# -- the canonical trace -------------------------------------------------------------------------------------------


def write_trace(path: Path | str, rows: Iterable[TraceRequest]) -> int:
    """Write `rows` as a canonical trace (module docstring); the number of rows written. Rows must be in time
    order with valid fields: what `load_canonical` would refuse is refused here (TraceError naming the row)."""
    path = Path(path)
    count = 0
    previous = 0.0
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CANONICAL_HEADER)
        for count, r in enumerate(rows, start=1):
            line = count + 1
            _check_row(r.at_s, r.key, r.prompt_tokens, r.output_tokens, previous, path=path, line=line)
            previous = r.at_s
            writer.writerow((repr(float(r.at_s)), r.key, r.prompt_tokens, r.output_tokens))
    return count


def load_canonical(path: Path | str, *, limit: int | None = None) -> list[TraceRequest]:
    """A canonical trace (module docstring), every row checked: a TraceError names the file, line and column
    of the first bad field."""
    path = Path(path)
    out: list[TraceRequest] = []
    previous = 0.0
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != CANONICAL_HEADER:
            raise TraceError(f"the header must be {','.join(CANONICAL_HEADER)} (got {','.join(header or [])!r})",
                             path=path, line=1)
        for row in reader:
            if limit is not None and len(out) >= limit:
                break
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line
            line = reader.line_num
            if len(row) != len(CANONICAL_HEADER):
                raise TraceError(f"{len(row)} columns, expected {len(CANONICAL_HEADER)} "
                                 f"({','.join(CANONICAL_HEADER)})", path=path, line=line)
            at_s = _float(row, 0, path, line)
            key = row[1]
            prompt = _int(row, 2, path, line)
            output = _int(row, 3, path, line)
            _check_row(at_s, key, prompt, output, previous, path=path, line=line)
            previous = at_s
            tenant, sep, adapter = key.partition("/")
            out.append(TraceRequest(at_s, tenant if sep else "", adapter if sep else key, prompt, output))
    return out


def _float(row: Sequence[str], column: int, path: Path, line: int) -> float:
    try:
        return float(row[column].strip())
    except ValueError:
        raise TraceError(f"{CANONICAL_HEADER[column]} must be a number (got {row[column]!r})", path=path,
                         line=line, column=column + 1) from None


def _int(row: Sequence[str], column: int, path: Path, line: int) -> int:
    try:
        return int(row[column].strip())
    except ValueError:
        raise TraceError(f"{CANONICAL_HEADER[column]} must be an integer (got {row[column]!r})", path=path,
                         line=line, column=column + 1) from None


def _check_row(at_s: float, key: str, prompt_tokens: int, output_tokens: int, previous: float, *, path: Path,
               line: int) -> None:
    """The checks every canonical row passes (columns 1-based, as TraceError reports them)."""
    if not math.isfinite(at_s) or at_s < 0:
        raise TraceError(f"timestamp must be a finite number of seconds >= 0 (got {at_s})", path=path, line=line,
                         column=1)
    if at_s < previous:
        raise TraceError(f"timestamp {at_s} is before the previous row's {previous}: rows must be in time order",
                         path=path, line=line, column=1)
    tenant, sep, adapter = key.partition("/")
    if not key or key != key.strip() or (sep and not (tenant and adapter)):
        raise TraceError(f"adapter must be a name or tenant/name (got {key!r})", path=path, line=line, column=2)
    for column, value in ((3, prompt_tokens), (4, output_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TraceError(f"{CANONICAL_HEADER[column - 1]} must be an integer >= 1 (got {value!r})", path=path,
                             line=line, column=column)


def load_trace(path: Path | str, *, fmt: TraceFormat | None = None, adapters: int = 100, zipf_s: float = 1.0,
               seed: int = 0, alibaba_key: AlibabaKey = "model", output_tokens: int | Sequence[int] = 128,
               max_output_tokens: int = MAX_OUTPUT_TOKENS, limit: int | None = None,
               dropped: list[TraceRequest] | None = None) -> list[TraceRequest]:
    """A trace of any format (from its header unless `fmt`), as canonical rows: Azure requests get bare
    Zipf-assigned names (`adapters`, `zipf_s`, `seed`), Alibaba ones a bare model name (`alibaba_key="model"`)
    or `group/model` (`"group-model"`). Options of another format than the file's are ignored. Alibaba rows that
    name no model (requests still pending when the trace was cut, every field empty) are left out, and appended
    to `dropped` if given."""
    fmt = fmt or detect_format(path)
    if fmt == "lorafn":
        return load_canonical(path, limit=limit)
    if fmt == "azure":
        rows = load_azure(path, adapters=adapters, zipf_s=zipf_s, seed=seed, max_output_tokens=max_output_tokens,
                          limit=limit)
        return [TraceRequest(r.at_s, "", r.adapter, r.prompt_tokens, r.output_tokens) for r in rows]
    if fmt == "alibaba":
        if alibaba_key not in ALIBABA_KEYS:
            raise ValueError(f"alibaba_key must be one of {', '.join(ALIBABA_KEYS)} (got {alibaba_key!r})")
        rows = load_alibaba(path, output_tokens=output_tokens, seed=seed, max_output_tokens=max_output_tokens,
                            limit=limit)
        out = []
        for r in rows:
            if not r.adapter:
                if dropped is not None:
                    dropped.append(r)
                continue
            if not r.tenant or "/" in r.tenant or "/" in r.adapter:
                raise TraceError(f"groupId {r.tenant!r} and checkpoint_model_version_id {r.adapter!r} make no "
                                 "adapter key (an empty groupId, or a '/' in either)", path=path)
            tenant = r.tenant if alibaba_key == "group-model" else ""
            out.append(TraceRequest(r.at_s, tenant, r.adapter, r.prompt_tokens, r.output_tokens))
        return out
    raise ValueError(f"unknown trace format {fmt!r} (formats: {', '.join((*FORMATS, 'lorafn'))})")


def split(rows: Sequence[TraceRequest], fraction: float, *, by: Literal["time", "count"] = "time",
          ) -> tuple[list[TraceRequest], list[TraceRequest]]:
    """(earlier, later): the rows before and from the point `fraction` of the way through the trace, in time
    (`by="time"`: of the span from the first to the last row) or in rows (`by="count"`). Times are kept, so the
    later part follows on from the earlier one; a request is in exactly one part."""
    if not 0 < fraction < 1:
        raise ValueError(f"the split fraction must be between 0 and 1, exclusive (got {fraction})")
    if by == "count":
        cut = round(len(rows) * fraction)
    elif by == "time":
        if not rows:
            return [], []
        at = rows[0].at_s + fraction * (rows[-1].at_s - rows[0].at_s)
        cut = bisect.bisect_left([r.at_s for r in rows], at)
    else:
        raise ValueError(f"split by 'time' or 'count' (got {by!r})")
    return list(rows[:cut]), list(rows[cut:])


def convert(src: Path | str, dst: Path | str, *, fmt: TraceFormat | None = None, adapters: int = 100,
            zipf_s: float = 1.0, seed: int = 0, alibaba_key: AlibabaKey = "model",
            output_tokens: int | Sequence[int] = 128, max_output_tokens: int = MAX_OUTPUT_TOKENS,
            limit: int | None = None, dropped: list[TraceRequest] | None = None) -> list[TraceRequest]:
    """Read an Azure or Alibaba trace (`load_trace`) and write it as a canonical trace; the rows written."""
    fmt = fmt or detect_format(src)
    if fmt == "lorafn":
        raise TraceError(f"{src} is a canonical trace already")
    rows = load_trace(src, fmt=fmt, adapters=adapters, zipf_s=zipf_s, seed=seed, alibaba_key=alibaba_key,
                      output_tokens=output_tokens, max_output_tokens=max_output_tokens, limit=limit,
                      dropped=dropped)
    write_trace(dst, rows)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.traces", description="Trace files: convert to the "
                                     "canonical CSV (timestamp,adapter,prompt_tokens,output_tokens).")
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("convert", help="an Azure LLM or Alibaba GenAI trace -> a canonical trace")
    c.add_argument("src", type=Path, help="the trace to read")
    c.add_argument("dst", type=Path, help="the canonical CSV to write")
    c.add_argument("--format", choices=FORMATS, help="the source's format (default: from its header)")
    c.add_argument("--adapters", type=int, default=100, help="Azure: adapters of the Zipf popularity (default 100)")
    c.add_argument("--zipf", type=float, default=1.0, help="Azure: Zipf exponent of the popularity (default 1.0)")
    c.add_argument("--seed", type=int, default=0, help="seed of the Azure assignment and Alibaba output lengths")
    c.add_argument("--alibaba-key", choices=ALIBABA_KEYS, default="model",
                   help="Alibaba: one adapter per checkpoint model version (model, the default) or per "
                        "(groupId, model) pair (group-model)")
    c.add_argument("--output-tokens", type=int, default=128, help="Alibaba: output tokens per request (default 128)")
    c.add_argument("--max-output-tokens", type=int, default=MAX_OUTPUT_TOKENS,
                   help=f"cap on a request's output tokens (default {MAX_OUTPUT_TOKENS})")
    c.add_argument("--limit", type=int, help="read only the first N rows of the source")
    args = parser.parse_args(argv)
    dropped: list[TraceRequest] = []
    try:
        rows = convert(args.src, args.dst, fmt=args.format, adapters=args.adapters, zipf_s=args.zipf,
                       seed=args.seed, alibaba_key=args.alibaba_key, output_tokens=args.output_tokens,
                       max_output_tokens=args.max_output_tokens, limit=args.limit, dropped=dropped)
    except (TraceError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    span = rows[-1].at_s - rows[0].at_s if rows else 0.0
    print(f"{args.dst}: {len(rows):,} requests over {span:,.1f} s, {len({r.key for r in rows}):,} adapters"
          + (f" ({len(dropped)} rows naming no model left out)" if dropped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
