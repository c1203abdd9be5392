"""The `lorafn` command: run the local stack and manage adapters, keys and the schema."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from lorafn.replay import replay_command
from lorafn.settings import LorafnSettings
from lorafn.stack import (
    LocalStack,
    PortInUse,
    StackConfig,
    StackError,
    free_ports,
    free_stack_ports,
    port_is_free,
)
from protocol.subjects import InvalidName, split_qualified_name
from storage import repo
from storage.errors import AdapterInvalid, StorageError, StorageUnavailable

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from storage.registry import Registry

T = TypeVar("T")

app = typer.Typer(help="lorafn: serverless LoRA functions on one shared backbone.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
adapters_app = typer.Typer(help="Push, list and remove adapters.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")
app.add_typer(keys_app, name="keys")
tenants_app = typer.Typer(help="Tenants and their quotas.", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")
app.command("replay")(replay_command)  # lorafn/replay.py

console = Console()


def _print_listing(table: Table) -> None:
    """A listing, whole: piped into a script or a file, its rows are not cut to a terminal's 80 columns (an id
    shortened to `661f5d2c-…` cannot be given back to `keys revoke`)."""
    (console if console.is_terminal else Console(width=400)).print(table)
err = Console(stderr=True)

StateDir = Annotated[Path | None, typer.Option("--state-dir", help="state directory of the local stack")]


def _settings(state_dir: Path | None) -> LorafnSettings:
    settings = LorafnSettings()
    if state_dir is not None:
        settings = settings.model_copy(update={"state_dir": state_dir})
    return settings


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


@app.callback()
def main_callback(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log more")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@app.command()
def up(
    state_dir: StateDir = None,
    workers: Annotated[int, typer.Option(min=0, max=64, help="worker processes to start")] = 1,
    host: Annotated[str | None, typer.Option(help="address the servers bind to")] = None,
    nats_port: Annotated[int | None, typer.Option(help="NATS client port")] = None,
    nats_monitor_port: Annotated[int | None, typer.Option(help="NATS monitoring port")] = None,
    nats_monitor: Annotated[bool, typer.Option(
        "--nats-monitor", help="serve NATS monitoring (no authentication: on 127.0.0.1 only)")] = False,
    nats_cluster: Annotated[int, typer.Option(
        min=1, max=5, help="NATS servers: a cluster of N on this machine (ports: the first's + 1, + 2, ...), the "
        "streams with N replicas")] = 1,
    nats_cluster_port: Annotated[int | None, typer.Option(
        help="route port of the first NATS server of a cluster (default 6222)")] = None,
    nats_sync: Annotated[str | None, typer.Option(
        metavar="always|DURATION", help="JetStream's sync_interval: 'always' (fsync every write before its ack) "
        "or how often to fsync, e.g. 10s (default: the server's, 2m)")] = None,
    postgres_port: Annotated[int | None, typer.Option(help="Postgres port")] = None,
    s3_port: Annotated[int | None, typer.Option(help="S3 API port (SeaweedFS also takes the next 7)")] = None,
    auto_ports: Annotated[bool, typer.Option(
        "--auto-ports", help="pick free ports for every server and the gateway, except those given by an option")
    ] = False,
    gateway_port: Annotated[int | None, typer.Option(
        min=1, max=65535, help="HTTP port of the gateway (default 8000, or a free one with --auto-ports)")] = None,
    backbone: Annotated[Path | None, typer.Option(
        help=".gguf file or checkpoint dir the workers serve and the gateway checks adapters against "
             "(default: SmolLM2-135M); `lorafn adapters push` reads LORAFN_REGISTRY__BACKBONE_*", exists=True,
        resolve_path=True)] = None,
    restart_delay: Annotated[float, typer.Option(
        min=0.0, help="seconds before a crashed process is started again; doubles per crash in a row")] = 0.5,
    restart_delay_max: Annotated[float, typer.Option(min=0.0, help="longest wait before a restart, seconds")] = 30.0,
    env: Annotated[list[str] | None, typer.Option(
        "--env", metavar="NAME=VALUE", help="a setting for every service, e.g. LORAFN_STAGING__PREDICTOR=none "
        "(repeatable; the services see no LORAFN_* variable of this shell)")] = None,
) -> None:
    """Start NATS, Postgres and S3 and the services on this machine, restart any that crashes (with
    backoff); Ctrl-C stops everything."""
    from lorafn.bootstrap import bootstrap
    from lorafn.services import RestartPolicy

    for item in env or ():
        if "=" not in item or not item.startswith("LORAFN_"):
            raise _fail(f"--env takes LORAFN_NAME=VALUE (got {item!r})")
    service_settings = dict(item.partition("=")[::2] for item in env or ())

    try:
        policy = RestartPolicy(first_delay_s=restart_delay, max_delay_s=restart_delay_max)
    except ValueError as e:
        raise _fail(f"{e} (--restart-delay {restart_delay}, --restart-delay-max {restart_delay_max})") from None
    settings = _settings(state_dir)
    stack_settings = settings.stack.model_copy(
        update={k: v for k, v in {"host": host, "nats_port": nats_port, "nats_monitor_port": nats_monitor_port,
                                  "postgres_port": postgres_port, "s3_port": s3_port}.items() if v is not None}
    )
    if auto_ports:  # free ports for what no option names: an explicit port always wins
        explicit = {"nats": nats_port, "nats_monitor": nats_monitor_port, "postgres": postgres_port, "s3": s3_port,
                    "nats_cluster": nats_cluster_port}
        ports = free_stack_ports(stack_settings.host, **{k: v for k, v in explicit.items() if v is not None},
                                 avoid=() if gateway_port is None else (gateway_port,), nats_servers=nats_cluster)
    else:
        ports = stack_settings.ports()
        if nats_cluster_port is not None:
            ports.nats_cluster = nats_cluster_port
    if gateway_port is None and auto_ports:
        used = {*ports.all().values(), *ports.s3_internal(),
                *(p for server in ports.nats_servers(nats_cluster) for p in (server.client, server.cluster,
                                                                           server.monitor))}
        gateway_port = free_ports(stack_settings.host, 1)[0]
        while gateway_port in used:
            gateway_port = free_ports(stack_settings.host, 1)[0]
    else:
        gateway_port = 8000 if gateway_port is None else gateway_port
        if not port_is_free(stack_settings.host, gateway_port):
            raise _fail(str(PortInUse("the gateway", stack_settings.host, gateway_port, "--gateway-port")))
    try:
        stack = LocalStack(StackConfig(state_dir=settings.state_dir, host=stack_settings.host, ports=ports,
                                       bucket=settings.object_store.bucket, nats_monitor=nats_monitor,
                                       nats_cluster=nats_cluster, nats_sync=nats_sync))
    except StackError as e:
        raise _fail(str(e)) from None
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    try:
        with console.status("starting NATS, Postgres and S3 ..."):
            endpoints = stack.start()
            result = asyncio.run(bootstrap(endpoints, state_dir=stack.state_dir))
    except StackError as e:
        raise _fail(str(e)) from None
    except BaseException as e:
        stack.stop()
        if isinstance(e, KeyboardInterrupt):
            raise _fail("interrupted; everything that was started has been stopped", 130) from None
        raise _fail(f"bootstrap failed: {e}; everything that was started has been stopped") from e

    table = Table(title=f"lorafn stack up in {time.monotonic() - started:.1f} s", show_header=False)
    nats_servers = ",".join(f"nats://{stack.config.host}:{server.client}" for server in ports.nats_servers(nats_cluster))
    cluster_note = f"a cluster of {nats_cluster}, streams at R{nats_cluster}: " if nats_cluster > 1 else "streams "
    table.add_row("NATS", f"{nats_servers} (JetStream; {cluster_note}{', '.join(result.streams)})")
    table.add_row("Postgres", f"{stack.config.host}:{ports.postgres} database lorafn")
    table.add_row("S3", f"http://{endpoints.s3_endpoint} bucket {endpoints.bucket}")
    table.add_row("state", str(stack.state_dir))
    table.add_row("tenant", result.dev_tenant)
    table.add_row("API key", result.dev_api_key)
    # The services run as child processes with the stack's endpoints in their environment; they are
    # stopped before the servers they use (SIGTERM, wait, SIGKILL).
    from lorafn.services import Supervised, Supervisor, running_services

    with contextlib.ExitStack() as children:
        try:
            services = children.enter_context(running_services(endpoints, stack.state_dir, workers=workers,
                                                               gateway_port=gateway_port, backbone=backbone,
                                                               settings=service_settings))
        except OSError as e:
            children.close()
            stack.stop()
            raise _fail(f"could not start the services: {e}") from None

        def record_pids() -> None:
            stack.write_endpoints({p.name: p.pid for p in services if p.pid is not None})

        # Every process, servers and services alike, is restarted when it exits on its own (lorafn.services
        # says why); a server's restart waits until it answers, abandoned at once when stopping begins.
        now = time.monotonic()
        supervisor = Supervisor(
            [*(Supervised(p, functools.partial(stack.restart, p.name, cancel=stop), started_at=now)
               for p in list(stack.processes)),
             *(Supervised(p, p.restart, started_at=now) for p in services)],
            policy, stopping=stop.is_set, on_restart=record_pids,
        )
        record_pids()
        table.add_row("gateway", f"http://{stack.config.host}:{gateway_port}  (OpenAI base URL: /v1)")
        table.add_row("services", ", ".join(p.name for p in services) + f" (logs in {stack.state_dir / 'logs'})")
        console.print(table)
        console.print("push an adapter: [bold]lorafn adapters push DIR --name dev/NAME[/]   stop: Ctrl-C")
        while not stop.wait(0.5):
            supervisor.check(time.monotonic())
        console.print("stopping ...")
    with console.status("stopping the servers ..."):
        stack.stop()
    console.print("stopped: every process this stack started has exited")


@app.command()
def init(state_dir: StateDir = None) -> None:
    """Prepare configured services: schema migrations, the adapter bucket, the JetStream streams."""
    from lorafn.bootstrap import prepare_services

    settings = _settings(state_dir).with_running_stack()
    try:
        streams = asyncio.run(prepare_services(nats_url=settings.nats.url, database_url=settings.database.url,
                                               object_store=settings.object_store,
                                               stream_replicas=settings.nats.stream_replicas,
                                               stream_storage=settings.nats.stream_storage))
    except Exception as e:
        raise _fail(f"init failed: {e}") from e
    console.print(f"schema at head; bucket {settings.object_store.bucket}; streams {', '.join(streams)}")


@app.command()
def migrate(
    state_dir: StateDir = None,
    revision: Annotated[str, typer.Argument(help="target revision")] = "head",
    down: Annotated[bool, typer.Option("--down", help="downgrade to the revision instead")] = False,
) -> None:
    """Apply (or revert) database migrations."""
    from storage.migrate import downgrade, upgrade

    settings = _settings(state_dir).with_running_stack()
    (downgrade if down else upgrade)(settings.database.url, revision)
    console.print(f"database at revision {revision}")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the prompt (a user message for chat models)")],
    adapter: Annotated[list[Path] | None, typer.Option("--adapter", "-a", help="PEFT adapter dir; repeatable",
                                                       exists=True)] = None,
    base: Annotated[bool, typer.Option("--base/--no-base", help="also run the bare backbone in the batch")] = True,
    backbone: Annotated[Path | None, typer.Option(help=".gguf file or checkpoint dir (default: SmolLM2-135M)",
                                                  exists=True)] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="tokens to generate per request")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int | None, typer.Option(help="sampling seed (same seed, same tokens)")] = None,
    chat: Annotated[bool, typer.Option("--chat/--raw", help="apply the chat template")] = True,
) -> None:
    """Run the engine locally, no services: one request per adapter, all in ONE batch."""
    from storage.errors import AdapterInvalid
    from workers.engine import PromptTooLong, SamplingParams
    from workers.generate import generate_local

    adapters: list[Path | None] = [*([None] if base or not adapter else []), *(adapter or [])]
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed, max_tokens=max_tokens)
    started = time.monotonic()
    try:
        with console.status(f"generating for {len(adapters)} request(s) in one batch ..."):
            outputs = generate_local(backbone, adapters, prompt, params, chat=chat)
    except AdapterInvalid as e:
        raise _fail(f"adapter refused ({e.code}): {e}") from None
    except PromptTooLong as e:
        raise _fail(str(e)) from None
    for out in outputs:
        title = "base model" if out.adapter is None else str(out.adapter)
        console.rule(f"[bold]{title}[/] ({len(out.token_ids)} tokens, {out.finish_reason.value})")
        console.print(out.text, highlight=False, markup=False)
    console.print(f"[dim]{time.monotonic() - started:.1f} s including loading[/]")


@contextlib.asynccontextmanager
async def _transaction(settings: LorafnSettings) -> AsyncIterator[AsyncSession]:
    """One session in one transaction on the configured database; its engine is disposed on exit."""
    engine = repo.create_engine(settings.database)
    try:
        async with repo.session_factory(engine)() as session, session.begin():
            yield session
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def _registry(settings: LorafnSettings) -> AsyncIterator[Registry]:
    """A registry over the configured services; its database engine is disposed on exit."""
    from storage.backbone import resolve_backbone_spec
    from storage.objectstore import ObjectStore
    from storage.registry import Registry

    engine = repo.create_engine(settings.database)
    try:
        yield Registry(
            sessions=repo.session_factory(engine),
            store=ObjectStore(settings.object_store),
            spec=resolve_backbone_spec(gguf=settings.registry.backbone_gguf,
                                       hf_dir=settings.registry.backbone_hf_dir),
            settings=settings.registry,
        )
    finally:
        await engine.dispose()


async def _announce(settings: LorafnSettings, event: str, tenant: str, adapter: str, version: str | None = None) -> None:
    """Tell gateways and schedulers that an adapter changed (they drop their cached lookup of it at once);
    when NATS cannot be reached their caches expire by themselves (`adapter_ttl_s`, `adapter_cache_s`)."""
    from protocol import subjects
    from protocol.messages import AdapterEvent

    message = AdapterEvent(event=event, tenant=tenant, adapter=adapter, version=version)  # type: ignore[arg-type]
    await _publish_event(settings, subjects.adapter_event(event), message.encode())


async def _publish_event(settings: LorafnSettings, subject: str, payload: bytes) -> None:
    """Publish one event for the services' caches, best effort (they also expire by themselves)."""
    import nats
    import nats.errors

    try:
        nc = await nats.connect(settings.nats.servers, connect_timeout=2, max_reconnect_attempts=0,
                                allow_reconnect=False)
    except (nats.errors.Error, OSError) as e:
        console.print(f"[yellow]could not announce the change over NATS ({e}); gateways see it within their "
                      "cache lifetime[/]")
        return
    try:
        await nc.publish(subject, payload)
        await nc.flush(timeout=2)
    finally:
        await nc.close()


def _qualified(name: str) -> tuple[str, str]:
    """TENANT/NAME split and checked, or a clean exit naming the problem."""
    try:
        return split_qualified_name(name)
    except InvalidName as e:
        raise _fail(f"{e} (expected TENANT/NAME)") from None


def _run_client(coro: Coroutine[Any, Any, T]) -> T:
    """Run a registry command; storage errors become one clean line and exit code 1."""
    try:
        return asyncio.run(coro)
    except AdapterInvalid as e:
        raise _fail(f"adapter refused ({e.code}): {e}") from None
    except StorageUnavailable as e:
        raise _fail(f"{e}; is `lorafn up` running?") from None
    except StorageError as e:
        raise _fail(str(e)) from None


@adapters_app.command("push")
def adapters_push(
    source: Annotated[Path, typer.Argument(help="adapter directory, .tar.gz or .zip", exists=True)],
    name: Annotated[str, typer.Option("--name", help="TENANT/NAME")],
    state_dir: StateDir = None,
) -> None:
    """Validate an adapter, store it in S3 and make it the current version of TENANT/NAME."""
    tenant, adapter_name = _qualified(name)
    settings = _settings(state_dir).with_running_stack()

    async def run() -> None:
        async with _registry(settings) as registry:
            with console.status("validating ..."):
                prepared = await asyncio.to_thread(registry.prepare, source)
            with Progress(TextColumn("uploading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                          console=console, transient=True) as bar:
                task = bar.add_task("upload", total=len(prepared.blob))
                result = await registry.push(tenant=tenant, name=adapter_name, source=prepared,
                                             progress=lambda n: bar.advance(task, n))
        await _announce(settings, "pushed", tenant, adapter_name, result.sha256)
        state = "new version" if result.created else "unchanged (same content)"
        console.print(
            f"[bold]{tenant}/{adapter_name}[/] {state}: version {result.version_id}\n"
            f"  sha256 {result.sha256}\n  {result.bytes} bytes, max rank {result.max_rank}, "
            f"modules {', '.join(result.target_modules)}, {prepared.adapter.num_layers} layers",
            highlight=False,
        )

    _run_client(run())


@adapters_app.command("ls")
def adapters_ls(
    tenant: Annotated[str | None, typer.Option(help="only this tenant's adapters")] = None,
    state_dir: StateDir = None,
) -> None:
    """List adapters and their current versions."""
    settings = _settings(state_dir).with_running_stack()

    async def run() -> None:
        async with _registry(settings) as registry:
            rows = await registry.list_adapters(tenant=tenant)
        table = Table("adapter", "version", "sha256", "max rank", "modules", "bytes", "updated")
        for a in rows:
            v = a.current_version
            table.add_row(
                f"{a.tenant.name}/{a.name}",
                str(v.id) if v else "-",
                v.sha256[:16] if v else "-",
                str(v.max_rank) if v else "-",
                ",".join(v.target_modules) if v else "-",
                str(v.bytes) if v else "-",
                a.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
            )
        _print_listing(table)

    _run_client(run())


@adapters_app.command("rm")
def adapters_rm(
    name: Annotated[str, typer.Argument(help="TENANT/NAME")],
    state_dir: StateDir = None,
) -> None:
    """Remove an adapter and every version of it."""
    tenant, adapter_name = _qualified(name)
    settings = _settings(state_dir).with_running_stack()

    async def run() -> list[str]:
        async with _registry(settings) as registry:
            removed = await registry.remove(tenant=tenant, name=adapter_name)
        await _announce(settings, "deleted", tenant, adapter_name)
        return removed

    removed = _run_client(run())
    console.print(f"removed {name} ({len(removed)} blob(s) deleted from the object store)")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Argument(help="tenant name (created if new)")],
    label: Annotated[str | None, typer.Option(help="a note to tell keys apart")] = None,
    nats: Annotated[bool, typer.Option("--nats", help="a credential for direct NATS clients instead (docs/nats.md)")]
    = False,
    state_dir: StateDir = None,
) -> None:
    """Create an API key for a tenant and print it (it is shown only once); --nats: a NATS credential instead,
    printed with how a direct client connects with it."""
    from protocol.nats_auth import tenant_inbox_prefix, tenant_replies
    from protocol.settings import NatsSettings
    from protocol.subjects import INVOKE_PREFIX, check_name

    try:
        check_name("tenant", tenant)
    except InvalidName as e:
        raise _fail(str(e)) from None
    settings = _settings(state_dir).with_running_stack()

    async def run() -> str:
        async with _transaction(settings) as session:
            t = await repo.get_or_create_tenant(session, name=tenant)
            if nats:
                return (await repo.new_nats_credential(session, tenant=t, label=label))[1]
            return await repo.create_api_key(session, tenant=t, label=label)

    secret = _run_client(run())
    if not nats:
        console.print(secret, highlight=False)
        return
    servers = [u.partition("://")[2] for u in NatsSettings(url=settings.nats.url).redacted_url.split(",")]
    url = ",".join(f"nats://{tenant}:{secret}@{server}" for server in servers)  # every server of a cluster
    # soft_wrap: the URL stays on one line whatever the terminal's width (scripts read it)
    console.print(f"user {tenant}\npassword {secret}\nurl {url}\n"
                  f"publish {INVOKE_PREFIX}.{tenant}.<adapter>   read {tenant_replies(tenant)}   "
                  f"inbox prefix {tenant_inbox_prefix(tenant)}", highlight=False, soft_wrap=True)


KeyRef = Annotated[str, typer.Argument(help="the key's id, or its prefix as `keys ls` shows it (lfn_<hex>)")]


def _when(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S") if t is not None else "-"


@keys_app.command("ls")
def keys_ls(
    tenant: Annotated[str | None, typer.Argument(help="only this tenant's keys")] = None,
    nats: Annotated[bool, typer.Option("--nats", help="the NATS credentials of direct clients instead")] = False,
    state_dir: StateDir = None,
) -> None:
    """List API keys, or NATS credentials with --nats (never the secrets: id, prefix, name, dates)."""
    settings = _settings(state_dir).with_running_stack()

    async def run() -> list[Any]:
        async with _transaction(settings) as session:
            owner = await repo.get_tenant(session, name=tenant) if tenant else None
            if nats:
                return list(await repo.list_nats_credentials(session, tenant=owner))
            return list(await repo.list_api_keys(session, tenant=owner))

    shown_prefix = repo.NATS_CREDENTIAL_PREFIX if nats else repo.API_KEY_PREFIX
    table = Table("id", "tenant", "prefix", "name", "created", "last used", "revoked")
    for k in _run_client(run()):
        table.add_row(str(k.id), k.tenant.name, f"{shown_prefix}{k.prefix}", k.label or "-",
                      _when(k.created_at), _when(k.last_used_at), _when(k.revoked_at))
    _print_listing(table)


async def _revoked(settings: LorafnSettings, key: Any) -> None:
    """Tell every gateway to drop a revoked key from its auth cache at once."""
    from protocol import subjects
    from protocol.messages import KeyEvent

    event = KeyEvent(event="revoked", tenant=key.tenant.name, key_id=str(key.id))
    await _publish_event(settings, subjects.key_event(event.event), event.encode())


@keys_app.command("revoke")
def keys_revoke(
    ref: KeyRef,
    nats: Annotated[bool, typer.Option("--nats", help="REF is a NATS credential's prefix (lfnats_<hex>)")] = False,
    state_dir: StateDir = None,
) -> None:
    """Revoke an API key (every gateway refuses it within a second), or a NATS credential with --nats (no new
    connection is let in at once; open ones keep their grant until it expires)."""
    settings = _settings(state_dir).with_running_stack()
    if nats:
        _nats_credential_revoke(settings, ref)
        return

    async def run() -> tuple[Any, bool]:
        async with _transaction(settings) as session:
            key = await repo.get_api_key(session, ref=ref.removeprefix(repo.API_KEY_PREFIX))
            revoked = await repo.revoke_api_key_row(session, key=key)
        await _revoked(settings, key)
        return key, revoked

    key, revoked = _run_client(run())
    state = "revoked" if revoked else "was already revoked"
    console.print(f"key {key.id} ({repo.API_KEY_PREFIX}{key.prefix}) of {key.tenant.name} {state}", highlight=False)


def _nats_credential_revoke(settings: LorafnSettings, ref: str) -> None:
    async def run() -> bool:
        async with _transaction(settings) as session:
            return await repo.revoke_nats_credential(session, secret_or_prefix=ref)

    if not _run_client(run()):
        raise _fail(f"no active NATS credential {ref}: `lorafn keys ls --nats` lists them")
    console.print(f"NATS credential {ref} revoked", highlight=False)


@keys_app.command("rotate")
def keys_rotate(ref: KeyRef, state_dir: StateDir = None) -> None:
    """Replace an active API key: print a new key with the same name (shown only once), revoke the old one."""
    settings = _settings(state_dir).with_running_stack()

    async def run() -> tuple[Any, str | None]:
        async with _transaction(settings) as session:
            old = await repo.get_api_key(session, ref=ref.removeprefix(repo.API_KEY_PREFIX))
            if not await repo.revoke_api_key_row(session, key=old):
                return old, None
            _, secret = await repo.new_api_key(session, tenant=old.tenant, label=old.label)
        await _revoked(settings, old)
        return old, secret

    old, secret = _run_client(run())
    if secret is None:
        raise _fail(f"key {old.id} is revoked already: `lorafn keys create {old.tenant.name}` makes a new one")
    console.print(secret, highlight=False)


QuotaOption = Annotated[int | None, typer.Option(min=0, help="0: back to the gateway's default")]


@tenants_app.command("quota")
def tenants_quota(
    tenant: Annotated[str, typer.Argument(help="tenant name")],
    requests_per_s: Annotated[float | None, typer.Option(min=0.0, help="API requests per second; 0: default")] = None,
    burst: QuotaOption = None,
    tokens_per_min: QuotaOption = None,
    concurrent: QuotaOption = None,
    adapters: QuotaOption = None,
    stored_bytes: QuotaOption = None,
    state_dir: StateDir = None,
) -> None:
    """Show a tenant's quota overrides, or set them (gateways apply them at once; unset: the gateway's
    LORAFN_GATEWAY__QUOTAS__* defaults)."""
    from protocol import subjects
    from protocol.messages import KeyEvent
    from storage.models import QUOTA_FIELDS

    given = {"quota_requests_per_s": requests_per_s, "quota_burst": burst, "quota_tokens_per_min": tokens_per_min,
             "quota_concurrent": concurrent, "quota_adapters": adapters, "quota_stored_bytes": stored_bytes}
    values = {k: (v or None) for k, v in given.items() if v is not None}
    settings = _settings(state_dir).with_running_stack()

    async def run() -> dict[str, Any]:
        async with _transaction(settings) as session:
            t = await repo.get_tenant(session, name=tenant)
            assert t is not None
            await repo.set_tenant_quotas(session, tenant=t, values=values)
            current = {name: getattr(t, name) for name in QUOTA_FIELDS}
        if values:
            event = KeyEvent(event="tenant_changed", tenant=tenant)
            await _publish_event(settings, subjects.key_event(event.event), event.encode())
        return current

    table = Table("quota", "override", title=f"tenant {tenant}")
    for name, value in _run_client(run()).items():
        table.add_row(name.removeprefix("quota_"), "default" if value is None else f"{value:g}")
    console.print(table)


def main() -> None:
    app()
