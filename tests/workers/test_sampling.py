"""Sampling (greedy, temperature, top-k, top-p, per-request generators) and stop strings."""

from __future__ import annotations

import pytest
import torch

from workers.sampling import SamplerRow, SamplingParams, SamplingParamsInvalid, StopStrings, sample

VOCAB = 50


def _logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3  # [n, vocab]


def _row(seed: int | None = None, **params: object) -> SamplerRow:
    p = SamplingParams(**params)  # type: ignore[arg-type]
    return SamplerRow(p, None if p.greedy else torch.Generator().manual_seed(seed or 0))


def test_greedy_rows_take_the_argmax_of_the_whole_batch() -> None:
    logits = _logits(6)
    assert sample(logits, [_row(temperature=0.0) for _ in range(6)]) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("params", [dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-4)])
def test_filters_that_leave_one_token_equal_greedy(params: dict[str, float]) -> None:
    logits = _logits(8, seed=3)
    rows = [_row(seed=i, **params) for i in range(8)]
    assert sample(logits, rows) == logits.argmax(-1).tolist()


def test_top_k_and_top_p_never_choose_a_filtered_token() -> None:
    logits = _logits(1, seed=5)
    top2 = set(logits[0].topk(2).indices.tolist())
    probs = logits[0].softmax(-1)
    ordered = probs.argsort(descending=True)
    nucleus = int((probs[ordered].cumsum(0) < 0.5).sum()) + 1  # smallest prefix reaching 0.5
    allowed_p = set(ordered[:nucleus].tolist())
    g_k, g_p = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    for _ in range(200):
        assert sample(logits, [SamplerRow(SamplingParams(top_k=2), g_k)])[0] in top2
        assert sample(logits, [SamplerRow(SamplingParams(top_p=0.5), g_p)])[0] in allowed_p


def test_temperature_one_follows_the_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-30.0] * (VOCAB - 4)])
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample(logits, [SamplerRow(SamplingParams(), g)])[0] for _ in range(4000)])
    freq = torch.bincount(draws, minlength=VOCAB)[:4].float() / len(draws)
    assert torch.allclose(freq, logits[0, :4].softmax(-1), atol=0.03)


def test_a_rows_tokens_depend_only_on_its_logits_and_generator() -> None:
    logits = _logits(5, seed=7)
    alone = [sample(logits[2:3], [_row(seed=42, temperature=1.0)])[0] for _ in range(1)]
    others = [_row(temperature=0.0), _row(seed=1, temperature=0.7, top_k=5), _row(seed=42, temperature=1.0),
              _row(seed=9, top_p=0.9), _row(temperature=0.0)]
    assert sample(logits, others)[2] == alone[0]


def test_same_seed_same_tokens_different_seeds_differ() -> None:
    logits = torch.zeros(1, VOCAB)  # uniform: every draw is a fresh token

    def run(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [sample(logits, [SamplerRow(SamplingParams(), g)])[0] for _ in range(20)]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_a_sampling_row_needs_a_generator() -> None:
    with pytest.raises(ValueError, match="needs a generator"):
        sample(_logits(1), [SamplerRow(SamplingParams(temperature=1.0), None)])


@pytest.mark.parametrize(
    ("params", "name"),
    [(dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
     (dict(top_k=-1), "top_k"), (dict(max_tokens=0), "max_tokens"), (dict(stop=("",)), "stop")],
)
def test_invalid_params_are_refused_with_their_value(params: dict[str, object], name: str) -> None:
    with pytest.raises(SamplingParamsInvalid) as e:
        SamplingParams(**params)  # type: ignore[arg-type]
    assert e.value.name == name


def test_a_lone_stop_string_is_one_stop_string() -> None:
    assert SamplingParams(stop="END").stop == ("END",)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ stop strings


def _stream(stops: tuple[str, ...], deltas: list[str]) -> tuple[str, bool]:
    s = StopStrings(stops)
    out = ""
    for d in deltas:
        text, hit = s.push(d)
        out += text
        if hit:
            return out, True
    return out + s.flush(), False


@pytest.mark.parametrize(
    ("stops", "deltas", "expected"),
    [
        (("END",), ["Hello", " wor", "ld"], ("Hello world", False)),
        (("END",), ["Hello E", "N", "D and more"], ("Hello ", True)),  # spans three deltas
        (("END",), ["abcEND"], ("abc", True)),
        (("\n\n", "###"), ["line\n", "\nnext"], ("line", True)),
        (("###",), ["a#", "#b"], ("a##b", False)),  # a partial match held back, then released
        (("stop",), ["st"], ("st", False)),  # generation ends inside a partial match: flushed
        (("ab", "b"), ["xab"], ("x", True)),  # the earliest match wins
    ],
)
def test_stop_strings_cut_the_text_before_the_first_match(
    stops: tuple[str, ...], deltas: list[str], expected: tuple[str, bool]
) -> None:
    assert _stream(stops, deltas) == expected


def test_text_that_may_begin_a_stop_string_is_held_back() -> None:
    s = StopStrings(("<end>",))
    assert s.push("x <e") == ("x ", False)
    assert s.push("nd") == ("", False)
    assert s.push("!") == ("<end!", False)


@pytest.mark.parametrize(
    ("params", "ties"),
    [({"temperature": 0.8}, True), ({"temperature": 1.0}, False), ({"temperature": 1.0, "top_p": 0.9}, False),
     ({"top_k": 50}, False)],
)
def test_last_bit_logit_differences_do_not_change_a_seeded_draw(params: dict[str, float], ties: bool) -> None:
    """Other batch shapes change logits in their last bits; a seed must still give the same tokens."""
    g = torch.Generator().manual_seed(0)
    if ties:
        # Groups of near-ties (a few distinct levels): a draw that walked tokens sorted by probability
        # would see the nudge reorder each group and pick another token.
        base = torch.randint(0, 4, (1, 4096), generator=g).float() + 1e-6 * torch.randn(1, 4096, generator=g)
    else:
        # Distinct logits (ties at a top-k / top-p boundary would make the kept set itself ambiguous).
        base = torch.randn(1, 4096, generator=g) * 3
    logits = base.repeat(200, 1)  # [200, vocab]
    nudged = logits + 1e-6 * torch.randn(logits.shape, generator=g)
    p = SamplingParams(max_tokens=1, **params)

    def draw(x: torch.Tensor) -> list[int]:
        gen = torch.Generator().manual_seed(123)
        return [sample(x[i : i + 1], [SamplerRow(p, gen)])[0] for i in range(x.shape[0])]

    assert draw(logits) == draw(nudged)
