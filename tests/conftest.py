"""Fixtures shared by every test package: real NATS, Postgres and S3 servers, started once per session.

By default the services are started by the same launcher as `lorafn up` (lorafn.stack.LocalStack) on free
ports under a temporary state directory. With LORAFN_TEST_SERVICES=containers and a Docker engine that
answers, testcontainers starts NATS, Postgres and MinIO instead. When LORAFN_TEST_NATS_URL,
LORAFN_TEST_DATABASE_URL and LORAFN_TEST_S3_ENDPOINT (+ _ACCESS_KEY, _SECRET_KEY) are set, those are used.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
import torch
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from lorafn.stack import LocalStack, StackConfig, free_stack_ports
from protocol.nats_auth import inbox_prefix
from protocol.settings import NatsCalloutSettings, NatsSettings
from storage import repo
from storage.migrate import upgrade
from storage.objectstore import ObjectStore
from storage.settings import DatabaseSettings, ObjectStoreSettings

# Without a GPU, Triton runs only through its interpreter, and the flag must be set before triton is first
# imported: some test modules import it indirectly (transformers, peft) before tests/kernels is collected.
# (Nothing imported above loads triton.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@dataclass(frozen=True)
class Services:
    """Where the test session's servers are."""

    nats_url: str
    database_url: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    stack: LocalStack | None = None  # set when the servers are ours (fault tests can restart them)
    # Each component's own NATS user (gateway, scheduler, worker, auth) and the callout's signing key, when the
    # servers are ours; `nats_url` is the unrestricted admin user.
    nats_urls: dict[str, str] = field(default_factory=dict)
    nats_callout_seed: str = ""

    def nats_url_of(self, component: str) -> str:
        """The NATS URL `component` connects with (the admin's when the servers are not ours)."""
        return self.nats_urls.get(component, self.nats_url)

    def nats_of(self, component: str) -> NatsSettings:
        """`component`'s NATS settings: its own user and inbox prefix (protocol.nats_auth)."""
        return NatsSettings(url=self.nats_url_of(component), connect_timeout_s=1, inbox_prefix=inbox_prefix(component))

    def nats_env_of(self, component: str) -> dict[str, str]:
        """The same as environment variables of a child process (over `child_env`'s LORAFN_NATS__URL)."""
        return {"LORAFN_NATS__URL": self.nats_url_of(component), "LORAFN_NATS__INBOX_PREFIX": inbox_prefix(component)}

    def callout(self) -> NatsCalloutSettings:
        """Settings of the NATS auth callout (unset when the servers are not ours: no callout there)."""
        if "auth" not in self.nats_urls or not self.nats_callout_seed:
            return NatsCalloutSettings()
        return NatsCalloutSettings(url=self.nats_urls["auth"], issuer_seed=self.nats_callout_seed)  # type: ignore[arg-type]


def _services_from_env() -> Services | None:
    names = ("LORAFN_TEST_NATS_URL", "LORAFN_TEST_DATABASE_URL", "LORAFN_TEST_S3_ENDPOINT")
    if not all(os.environ.get(n) for n in names):
        return None
    return Services(
        nats_url=os.environ["LORAFN_TEST_NATS_URL"],
        database_url=os.environ["LORAFN_TEST_DATABASE_URL"],
        s3_endpoint=os.environ["LORAFN_TEST_S3_ENDPOINT"],
        s3_access_key=os.environ.get("LORAFN_TEST_S3_ACCESS_KEY", "minioadmin"),
        s3_secret_key=os.environ.get("LORAFN_TEST_S3_SECRET_KEY", "minioadmin"),
    )


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env().ping()
    except Exception:
        return False
    return True


def _container_services() -> Iterator[Services]:
    from testcontainers.core.container import DockerContainer
    from testcontainers.minio import MinioContainer
    from testcontainers.postgres import PostgresContainer

    with (
        DockerContainer("nats:2.10-alpine").with_command("-js").with_exposed_ports(4222) as nats,
        PostgresContainer("postgres:16-alpine", driver="psycopg") as pg,
        MinioContainer("minio/minio:RELEASE.2024-10-13T13-34-11Z") as minio,
    ):
        cfg = minio.get_config()
        yield Services(
            nats_url=f"nats://{nats.get_container_host_ip()}:{nats.get_exposed_port(4222)}",
            database_url=pg.get_connection_url(),
            s3_endpoint=cfg["endpoint"],
            s3_access_key=cfg["access_key"],
            s3_secret_key=cfg["secret_key"],
        )


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    """The test session's NATS, Postgres and S3 servers, with the schema migrated to head."""
    from_env = _services_from_env()
    if from_env is not None:
        upgrade(from_env.database_url)
        yield from_env
        return
    if os.environ.get("LORAFN_TEST_SERVICES") == "containers" and _docker_answers():
        for svc in _container_services():
            upgrade(svc.database_url)
            yield svc
        return
    state = Path(tempfile.mkdtemp(prefix="lorafn-test-"))
    # Monitoring on (loopback): tests read the server's connections and subscriptions.
    stack = LocalStack(StackConfig(state_dir=state, ports=free_stack_ports(), nats_monitor=True))
    endpoints = stack.start()
    try:
        upgrade(endpoints.database_url)
        yield Services(
            nats_url=endpoints.nats_url,
            database_url=endpoints.database_url,
            s3_endpoint=endpoints.s3_endpoint,
            s3_access_key=endpoints.s3_access_key,
            s3_secret_key=endpoints.s3_secret_key,
            stack=stack,
            nats_urls=endpoints.nats_urls,
            nats_callout_seed=endpoints.nats_callout_seed,
        )
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def database_settings(services: Services) -> DatabaseSettings:
    return DatabaseSettings(url=services.database_url)


@pytest_asyncio.fixture
async def sessions(database_settings: DatabaseSettings) -> AsyncIterator[repo.async_sessionmaker[repo.AsyncSession]]:
    """A session factory over an emptied database (every table truncated before the test)."""
    engine = repo.create_engine(database_settings)
    tables = ", ".join(t.name for t in reversed(repo.Tenant.metadata.sorted_tables))
    for attempt in range(5):
        try:
            async with engine.begin() as conn:
                await conn.execute(text(f"TRUNCATE {tables} CASCADE"))
            break
        except DBAPIError as e:  # a scheduler of a module-scoped stack flushed its warm state meanwhile
            if "deadlock" not in str(e) or attempt == 4:
                raise
            await asyncio.sleep(0.1 * (attempt + 1))
    try:
        yield repo.session_factory(engine)
    finally:
        await engine.dispose()


@pytest.fixture
def object_store_settings(services: Services) -> ObjectStoreSettings:
    """Settings for a bucket of the test's own (created empty)."""
    return ObjectStoreSettings(
        endpoint=services.s3_endpoint,
        access_key=services.s3_access_key,
        secret_key=services.s3_secret_key,
        bucket=f"test-{secrets.token_hex(6)}",
    )


@pytest.fixture
def store(object_store_settings: ObjectStoreSettings) -> ObjectStore:
    s = ObjectStore(object_store_settings)
    s.ensure_bucket()
    return s


@pytest.fixture(scope="session")
def make_peft_adapter(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory of real PEFT LoRA adapters for the default backbone's shapes, saved with save_pretrained.

    `num_layers` below 30 builds a shallower model of the same widths (an adapter of a layer subset is
    valid for the full backbone). lora_B is randomised: PEFT initialises it to zero.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from storage.backbone import default_backbone_spec

    spec = default_backbone_spec()
    models: dict[int, LlamaForCausalLM] = {}

    def make(
        *,
        r: int = 8,
        lora_alpha: float = 16,
        target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
        num_layers: int = 2,
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        use_rslora: bool = False,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> Path:
        if num_layers not in models:
            torch.manual_seed(1234)
            config = LlamaConfig(
                hidden_size=spec.hidden_size,
                intermediate_size=spec.intermediate_size,
                num_hidden_layers=num_layers,
                num_attention_heads=spec.num_heads,
                num_key_value_heads=spec.num_kv_heads,
                head_dim=spec.head_dim,
                vocab_size=256,
                tie_word_embeddings=True,
            )
            models[num_layers] = LlamaForCausalLM(config)
        base = models[num_layers]
        lora_config = LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            target_modules=list(target_modules),
            rank_pattern=rank_pattern or {},
            alpha_pattern=alpha_pattern or {},
            use_rslora=use_rslora,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, lora_config)
        torch.manual_seed(seed)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
        out = tmp_path_factory.mktemp("peft-adapter")
        model.save_pretrained(out)
        if dtype != torch.float32:
            from safetensors.torch import load_file, save_file

            weights = out / "adapter_model.safetensors"
            save_file({k: v.to(dtype) for k, v in load_file(weights).items()}, weights)
        # Unwrap so the next call starts from the bare base model again.
        model.unload()
        return out

    return make


def _processes_mentioning(text: str) -> list[int]:
    """Live processes (not this one, no zombies) whose command line or environment contains `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if (proc / "stat").read_text().split(") ", 1)[1][0] == "Z":
                continue
            if any(text.encode() in (proc / part).read_bytes() for part in ("cmdline", "environ")):
                found.append(int(proc.name))
        except (OSError, IndexError):
            continue  # the process exited while we looked
    return found


@pytest.fixture(scope="session")
def processes_mentioning() -> Callable[[str], list[int]]:
    """Finds processes that carry a path (a state dir) in their command line or environment: what a
    launcher must not leave behind."""
    return _processes_mentioning
