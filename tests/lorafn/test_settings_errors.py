"""A rejected setting never prints a password: every service's settings, built from the environment as its main
builds them, refuse bad NATS and database URLs with messages that name the setting and keep the credentials
out (pydantic would otherwise print the rejected input, password included)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from gateway.settings import GatewaySettings
from lorafn.settings import LorafnSettings
from protocol.settings import NatsSettings, redact_url
from scheduler.settings import SchedulerSettings
from storage.settings import DatabaseSettings
from workers.settings import WorkerSettings

SECRET = "s3cret-Pw"
SERVICES: list[type[BaseSettings]] = [GatewaySettings, SchedulerSettings, WorkerSettings, LorafnSettings]


BAD = [
    ("LORAFN_NATS__URL", f"nats://lorafn:{SECRET}@", "names no server"),
    ("LORAFN_NATS__URL", f"http://lorafn:{SECRET}@nats:4222", "'http://nats:4222' must start with nats://"),
    ("LORAFN_DATABASE__URL", f"mysql://lorafn:{SECRET}@db:3306/lorafn", "'mysql://db:3306/lorafn' must be a postgresql"),
    ("LORAFN_NATS__CONNECT_TIMEOUT_S", f"x{SECRET}", "valid number"),
]
CASES = [(settings, *bad) for settings in SERVICES for bad in BAD
         if bad[0].removeprefix("LORAFN_").split("__")[0].lower() in settings.model_fields]  # workers have no database


def test_every_service_is_covered() -> None:
    assert {c[0] for c in CASES} == set(SERVICES) and len(CASES) == len(SERVICES) * len(BAD) - 1


@pytest.mark.parametrize("settings, variable, value, message", CASES,
                         ids=[f"{c[0].__name__}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_a_rejected_value_is_named_but_not_printed(monkeypatch: pytest.MonkeyPatch, settings: type[BaseSettings],
                                                  variable: str, value: str, message: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as raised:
        settings()
    text = str(raised.value)
    assert message in text
    assert variable.removeprefix("LORAFN_").lower().replace("__", ".") in text  # which setting
    assert SECRET not in text


def test_models_built_directly_hide_their_input_too() -> None:
    for build in (lambda: NatsSettings(url=f"nats://u:{SECRET}@"),
                  lambda: DatabaseSettings(url=f"sqlite://u:{SECRET}@host/db")):
        with pytest.raises(ValidationError) as raised:
            build()
        assert SECRET not in str(raised.value)


def test_redact_url() -> None:
    assert redact_url(f"postgresql+psycopg://lorafn:{SECRET}@db:5432/lorafn") == "postgresql+psycopg://db:5432/lorafn"
    assert redact_url("postgresql://db/lorafn?sslmode=require") == "postgresql://db/lorafn?sslmode=require"
    assert redact_url(f"u:{SECRET}@host") == "host"
    assert redact_url(f"postgresql://u:p@ss:{SECRET}@db/x") == "postgresql://db/x"  # an @ inside the password
