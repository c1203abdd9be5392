"""`choose_victims`: the one place where an eviction policy's answer is asked for and checked."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from scheduler.policy import LruEviction, ResidentView
from workers.adapters import BadEvictionChoice, choose_victims


@dataclass(frozen=True)
class Fixed:
    """A policy that always gives the same answer."""

    answer: list[str] | None

    def choose_victims(self, needed_pages: int, free_pages: int, resident: Sequence[ResidentView]) -> list[str] | None:
        return self.answer


RESIDENT = [
    ResidentView("a", pages=10, last_used=1.0),
    ResidentView("b", pages=20, last_used=2.0, in_use=1),
    ResidentView("c", pages=30, last_used=3.0),
]


@pytest.mark.parametrize(
    ("answer", "needed", "free", "expected"),
    [
        (["a", "c"], 5, 5, []),  # fits already: the policy is not asked
        (["a"], 15, 5, ["a"]),  # a frees enough
        (["c", "a"], 40, 5, ["c", "a"]),  # the policy's order is kept
        (None, 40, 5, None),  # no room: the caller says so
    ],
)
def test_a_sound_answer_is_returned(answer: list[str] | None, needed: int, free: int, expected: list[str] | None) -> None:
    assert choose_victims(Fixed(answer), needed, free, RESIDENT) == expected


@pytest.mark.parametrize(
    ("answer", "needed", "free", "reason"),
    [
        (["x"], 15, 5, "'x' is not resident"),
        (["a", "a"], 25, 5, "'a' is not resident (or named twice)"),
        (["b"], 15, 5, "'b' is used by 1 calls"),
        (["a"], 30, 5, "they free 10 pages, 25 are missing"),
        ([], 30, 5, "they free 0 pages, 25 are missing"),
    ],
)
def test_a_wrong_answer_is_refused_with_its_numbers(answer: list[str], needed: int, free: int, reason: str) -> None:
    with pytest.raises(BadEvictionChoice, match=re.escape(reason)) as e:
        choose_victims(Fixed(answer), needed, free, RESIDENT)
    assert (e.value.needed_pages, e.value.free_pages, e.value.victims) == (needed, free, answer)


def test_lru_answers_pass_the_check() -> None:
    assert choose_victims(LruEviction(), 35, 5, RESIDENT) == ["a", "c"]  # b is in use
    assert choose_victims(LruEviction(), 70, 5, RESIDENT) is None
