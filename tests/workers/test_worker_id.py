"""A worker's identity: LORAFN_WORKER_ID, else its host name as a subject token, the same after a restart (so
it resumes its Postgres row and its durable consumer; tests/e2e/test_schedulers.py restarts one)."""

from __future__ import annotations

import socket

import pytest
from pydantic import ValidationError

from protocol import subjects
from workers.service import default_worker_id
from workers.settings import WorkerSettings

ROWS = [
    ("lorafn-worker-7d9f8b6c5-x2k4q", "lorafn-worker-7d9f8b6c5-x2k4q", "a Kubernetes pod name, as it is"),
    ("3f2a9c1b7e4d", "3f2a9c1b7e4d", "a compose container's host name, as it is"),
    ("gpu-01.example.com", "gpu-01-example-com", "dots are not subject-token characters"),
    ("höst_1", "h-st_1", "nor are letters beyond ASCII"),
    ("x" * 80, "x" * 64, "at most 64 characters"),
    ("", "worker", "no host name at all"),
]


@pytest.mark.parametrize(("host", "expected", "why"), ROWS, ids=[r[2] for r in ROWS])
def test_the_default_id_is_the_host_name_as_a_subject_token(host: str, expected: str, why: str) -> None:
    worker_id = default_worker_id(host)
    assert worker_id == expected, why
    assert subjects.check_name("worker", worker_id) == worker_id  # usable in lora.work.<id>, work-<id>


def test_the_default_id_is_this_hosts_and_stable() -> None:
    assert default_worker_id() == default_worker_id(socket.gethostname()) == default_worker_id()


def test_the_configured_id_wins_and_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFN_WORKER_ID", "worker-3")
    assert WorkerSettings().worker_id == "worker-3"
    monkeypatch.setenv("LORAFN_WORKER_ID", "worker.3")
    with pytest.raises(ValidationError, match=r"worker_id 'worker\.3' must be 1 to 64 characters"):
        WorkerSettings()
