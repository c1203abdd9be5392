"""The services' environment and the supervision of `lorafn up`: the backoff as table rows, the supervisor
with real (tiny) processes and a clock passed in."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from lorafn.services import RestartPolicy, Supervised, Supervisor, backbone_env, child_env, describe_exit
from lorafn.stack import ManagedProcess, StackError
from storage.settings import ObjectStoreSettings

# -- RestartPolicy ----------------------------------------------------------------------------------------

POLICY = RestartPolicy(first_delay_s=0.5, factor=2.0, max_delay_s=30.0, reset_after_s=60.0)


@pytest.mark.parametrize(
    ("now", "started_at", "restarts", "delay", "streak", "reason"),
    [
        (1.0, 0.0, 0, 0.5, 1, "first crash: the first delay"),
        (1.0, 0.0, 1, 1.0, 2, "second crash in a row: doubled"),
        (1.0, 0.0, 2, 2.0, 3, "third in a row"),
        (1.0, 0.0, 5, 16.0, 6, "sixth in a row"),
        (1.0, 0.0, 6, 30.0, 7, "32 s capped at max_delay_s"),
        (1.0, 0.0, 10_000, 30.0, 10_001, "a long crash loop stays at the cap (no float overflow)"),
        (59.9, 0.0, 6, 30.0, 7, "up just under reset_after_s: still the same streak"),
        (60.0, 0.0, 6, 0.5, 1, "up reset_after_s: a new streak, the first delay again"),
        (3600.0, 0.0, 3, 0.5, 1, "one crash an hour is not a crash loop"),
        (100.5, 100.0, 0, 0.5, 1, "the clock's origin does not matter"),
    ],
)
def test_backoff_doubles_per_crash_in_a_row_up_to_the_cap_and_resets_after_uptime(
    now: float, started_at: float, restarts: int, delay: float, streak: int, reason: str
) -> None:
    assert POLICY.next_delay(now=now, started_at=started_at, restarts=restarts) == delay, reason
    assert POLICY.streak(now=now, started_at=started_at, restarts=restarts) == streak, reason


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"first_delay_s": 40.0, "max_delay_s": 30.0}, r"first_delay_s \(40.0\) must be between 0 and max_delay_s \(30.0\)"),
        ({"first_delay_s": -1.0}, r"first_delay_s \(-1.0\)"),
        ({"factor": 0.5}, r"factor \(0.5\) must be at least 1"),
    ],
)
def test_policy_refuses_settings_that_make_no_backoff(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RestartPolicy(**kwargs)


@pytest.mark.parametrize(("code", "text"), [(0, "code 0"), (3, "code 3"), (-9, "code -9 (SIGKILL)"),
                                            (-15, "code -15 (SIGTERM)"), (None, "code None")])
def test_exit_codes_name_the_signal(code: int | None, text: str) -> None:
    assert describe_exit(code) == text


# -- child_env --------------------------------------------------------------------------------------------

STORE = ObjectStoreSettings(endpoint="127.0.0.1:9100", access_key="ak", secret_key=SecretStr("sk"), bucket="b1")
PARENT = {"PATH": "/usr/bin", "HOME": "/root", "LORAFN_NATS__URL": "nats://elsewhere:4222",
          "LORAFN_ENGINE__ADAPTER_DTYPE": "float16", "LORAFN_WORKER_ID": "from-the-shell"}


def test_child_env_drops_every_lorafn_variable_of_the_parent_and_sets_the_endpoints() -> None:
    env = child_env(nats_url="nats://u:p@127.0.0.1:4300", database_url="postgresql+psycopg://d", object_store=STORE,
                    parent=PARENT)
    assert env == {
        "PATH": "/usr/bin",
        "HOME": "/root",
        "LORAFN_NATS__URL": "nats://u:p@127.0.0.1:4300",
        "LORAFN_DATABASE__URL": "postgresql+psycopg://d",
        "LORAFN_OBJECT_STORE__ENDPOINT": "127.0.0.1:9100",
        "LORAFN_OBJECT_STORE__ACCESS_KEY": "ak",
        "LORAFN_OBJECT_STORE__SECRET_KEY": "sk",
        "LORAFN_OBJECT_STORE__BUCKET": "b1",
        "LORAFN_OBJECT_STORE__SECURE": "false",
    }


def test_child_env_leaves_out_what_is_not_given_and_extra_wins() -> None:
    env = child_env(nats_url="nats://n", extra={"LORAFN_WORKER_ID": "w7", "LORAFN_NATS__URL": "nats://x", "A": "1"},
                    parent=PARENT)
    assert env == {"PATH": "/usr/bin", "HOME": "/root", "LORAFN_NATS__URL": "nats://x", "LORAFN_WORKER_ID": "w7",
                   "A": "1"}


def test_child_env_carries_a_secure_store_with_its_region_and_reads_our_environment_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LORAFN_DATABASE__URL", "postgresql+psycopg://leaked")
    monkeypatch.setenv("LORAFN_TEST_MARKER", "x")
    monkeypatch.setenv("PLAIN_MARKER", "y")
    store = STORE.model_copy(update={"secure": True, "region": "eu-west-1"})
    env = child_env(nats_url="nats://n", object_store=store)
    assert env["LORAFN_OBJECT_STORE__SECURE"] == "true" and env["LORAFN_OBJECT_STORE__REGION"] == "eu-west-1"
    assert "LORAFN_DATABASE__URL" not in env and "LORAFN_TEST_MARKER" not in env
    assert env["PLAIN_MARKER"] == "y"


def test_child_env_is_what_the_services_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """The names are the settings' own: a worker's settings built from the environment see the endpoints."""
    from workers.settings import WorkerSettings

    for key, value in child_env(nats_url="nats://n:1", object_store=STORE, extra={"LORAFN_WORKER_ID": "w1"}).items():
        monkeypatch.setenv(key, value)
    settings = WorkerSettings()
    assert settings.nats.url == "nats://n:1" and settings.worker_id == "w1"
    assert settings.object_store == STORE


def test_backbone_env_points_workers_and_gateway_at_one_backbone(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert backbone_env(None) == ({}, {})
    assert backbone_env(gguf) == ({"LORAFN_BACKBONE__PATH": str(gguf)}, {"LORAFN_REGISTRY__BACKBONE_GGUF": str(gguf)})
    assert backbone_env(tmp_path) == ({"LORAFN_BACKBONE__PATH": str(tmp_path)},
                                      {"LORAFN_REGISTRY__BACKBONE_HF_DIR": str(tmp_path)})


# -- Supervisor -------------------------------------------------------------------------------------------


def _process(tmp_path: Path, name: str, code: str) -> ManagedProcess:
    return ManagedProcess(name, [sys.executable, "-c", code], tmp_path / f"{name}.log", stop_timeout_s=5.0)


def _wait_exit(proc: ManagedProcess) -> None:
    assert proc.proc is not None
    proc.proc.wait(30)


def test_supervisor_restarts_a_crashed_process_after_its_backoff_and_leaves_a_running_one_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    crasher = _process(tmp_path, "crasher", "import sys; sys.exit(3)")
    sleeper = _process(tmp_path, "sleeper", "import time; time.sleep(60)")
    procs = [crasher, sleeper]
    try:
        for p in procs:
            p.start()
        sleeper_pid = sleeper.pid
        restarted: list[int | None] = []
        supervisor = Supervisor([Supervised(p, p.restart, started_at=0.0) for p in procs], POLICY,
                                on_restart=lambda: restarted.append(crasher.pid))
        _wait_exit(crasher)
        first_pid = crasher.pid
        with caplog.at_level(logging.WARNING, logger="lorafn.services"):
            supervisor.check(1.0)  # found dead: restart due at 1.5
            assert supervisor.pending() == ["crasher"]
            assert "crasher exited with code 3; restarting in 0.5 s (restart 1" in caplog.text
            supervisor.check(1.4)  # not yet
            assert crasher.pid == first_pid and restarted == []
            supervisor.check(1.5)
            assert supervisor.pending() == [] and crasher.pid != first_pid and restarted == [crasher.pid]
            _wait_exit(crasher)  # it crashes again at once: the next delay doubles
            supervisor.check(2.0)
            assert "restarting in 1.0 s (restart 2" in caplog.text
            supervisor.check(3.0)
            assert len(restarted) == 2
            _wait_exit(crasher)
            supervisor.check(64.0)  # this time it had been up 61 s: a new streak
            assert "restarting in 0.5 s (restart 1" in caplog.text.rsplit("restarted crasher", 1)[1]
        assert sleeper.pid == sleeper_pid and sleeper.alive()
    finally:
        for p in procs:
            p.stop()


def test_supervisor_restarts_nothing_once_stopping_has_begun(tmp_path: Path) -> None:
    crasher = _process(tmp_path, "crasher", "import sys; sys.exit(1)")
    stopping = False
    try:
        crasher.start()
        supervisor = Supervisor([Supervised(crasher, crasher.restart, started_at=0.0)], POLICY,
                                stopping=lambda: stopping)
        _wait_exit(crasher)
        pid = crasher.pid
        supervisor.check(1.0)
        assert supervisor.pending() == ["crasher"]
        stopping = True  # e.g. Ctrl-C during the backoff
        supervisor.check(10.0)
        assert crasher.pid == pid and not crasher.alive()
    finally:
        crasher.stop()


def test_a_failed_restart_is_logged_and_backs_off_further(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    crasher = _process(tmp_path, "server", "import sys; sys.exit(1)")
    attempts: list[float] = []

    def restart() -> None:
        attempts.append(1.0)
        raise StackError("server failed to start: exited with code 1")

    try:
        crasher.start()
        _wait_exit(crasher)
        supervisor = Supervisor([Supervised(crasher, restart, started_at=0.0)], POLICY)
        with caplog.at_level(logging.WARNING, logger="lorafn.services"):
            supervisor.check(1.0)
            supervisor.check(1.5)
            assert "restarting server failed: server failed to start: exited with code 1" in caplog.text
            supervisor.check(1.6)  # still dead: the second restart waits twice as long
            assert "restarting in 1.0 s (restart 2" in caplog.text
            supervisor.check(2.6)
        assert len(attempts) == 2
    finally:
        crasher.stop()


def test_lorafn_up_refuses_a_first_delay_above_the_cap_before_starting_anything(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lorafn.cli import app

    result = CliRunner().invoke(app, ["up", "--state-dir", str(tmp_path), "--restart-delay", "40"])
    assert result.exit_code == 1
    message = " ".join(result.output.split())  # the console wraps long lines
    assert "first_delay_s (40.0) must be between 0 and max_delay_s (30.0) (--restart-delay 40.0" in message
    assert list(tmp_path.iterdir()) == []  # no server was started, no state written


@pytest.mark.parametrize("item", ["FOO=1", "LORAFN_STAGING__PREDICTOR", "lorafn_x=1"])
def test_lorafn_up_refuses_an_env_item_that_is_not_a_lorafn_setting_before_starting_anything(
        tmp_path: Path, item: str) -> None:
    from typer.testing import CliRunner

    from lorafn.cli import app

    result = CliRunner().invoke(app, ["up", "--state-dir", str(tmp_path), "--env", item])
    assert result.exit_code == 1
    assert "--env takes LORAFN_NAME=VALUE" in " ".join(result.output.split())
    assert list(tmp_path.iterdir()) == []
