"""The local stack's NATS cluster as configured (no server started): ports, each server's config file, the
endpoints given to clients, and the settings' checks. tests/e2e/test_nats_cluster.py runs one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafn.stack import (
    Credentials,
    LocalStack,
    StackConfig,
    StackEndpoints,
    StackError,
    StackPorts,
    check_nats_sync,
    free_stack_ports,
    port_is_free,
)

HOST = "127.0.0.1"


def stack_with_credentials(tmp_path: Path, **config: object) -> LocalStack:
    stack = LocalStack(StackConfig(state_dir=tmp_path, **config))  # type: ignore[arg-type]
    stack.credentials = Credentials()
    return stack


def test_sync_interval_is_always_or_a_duration() -> None:
    for ok in ("always", "2m", "10s", "500ms", "1m30s", "1.5s"):
        assert check_nats_sync(ok) == ok
    for bad in ("", "fast", "2", "-1s", "10 s", "Always", "2m;"):
        with pytest.raises(StackError, match="use 'always' or a duration"):
            check_nats_sync(bad)
    with pytest.raises(StackError, match="sync interval"):
        StackConfig(state_dir=Path("x"), nats_sync="sometimes")


def test_a_cluster_has_one_to_five_servers_named_after_their_index() -> None:
    assert StackConfig(state_dir=Path("x")).nats_names == ["nats"]
    three = StackConfig(state_dir=Path("x"), nats_cluster=3)
    assert three.nats_names == ["nats-0", "nats-1", "nats-2"] and three.stream_replicas == 3
    for bad in (0, 6):
        with pytest.raises(StackError, match="--nats-cluster"):
            StackConfig(state_dir=Path("x"), nats_cluster=bad)


def test_servers_of_a_cluster_take_the_ports_after_the_first() -> None:
    ports = StackPorts(nats=4222, nats_monitor=8222, nats_cluster=6222)
    assert [(s.client, s.cluster, s.monitor) for s in ports.nats_servers(3)] == [
        (4222, 6222, 8222), (4223, 6223, 8223), (4224, 6224, 8224)]


def test_free_ports_for_a_cluster_are_three_free_runs_apart_from_everything() -> None:
    ports = free_stack_ports(HOST, nats_servers=3)
    servers = ports.nats_servers(3)
    every = [p for s in servers for p in (s.client, s.cluster, s.monitor)]
    every += [ports.postgres, ports.s3, *ports.s3_internal()]
    assert len(set(every)) == len(every)
    assert all(port_is_free(HOST, p) for p in every)
    # A port given is kept, with the run after it, and nothing picked falls in that run.
    given = free_stack_ports(HOST, nats_servers=3, nats=ports.nats, avoid=(ports.postgres,))
    assert given.nats == ports.nats
    taken = set(range(ports.nats, ports.nats + 3)) | {ports.postgres}
    picked = [p for s in given.nats_servers(3) for p in (s.cluster, s.monitor)] + [given.postgres]
    assert not taken & set(picked)
    with pytest.raises(ValueError, match="nats_servers"):
        free_stack_ports(HOST, nats_servers=0)


def test_each_cluster_server_routes_to_the_others_with_the_route_password(tmp_path: Path) -> None:
    ports = StackPorts(nats=14222, nats_monitor=18222, nats_cluster=16222)
    stack = stack_with_credentials(tmp_path, ports=ports, nats_cluster=3, nats_sync="always", nats_monitor=True)
    assert stack.credentials is not None
    password = stack.credentials.nats_route_password
    servers = ports.nats_servers(3)
    conf = stack._nats_config("nats-1", servers[1], servers)
    assert 'listen: "127.0.0.1:14223"' in conf and 'http: "127.0.0.1:18223"' in conf
    assert f'store_dir: "{tmp_path / "nats-1"}", sync_interval: "always"' in conf
    assert 'server_name: "nats-1"' in conf and 'listen: "127.0.0.1:16223"' in conf
    routes = next(line for line in conf.splitlines() if "routes:" in line)
    assert "@127.0.0.1:16222" in routes and "@127.0.0.1:16224" in routes and "16223" not in routes
    assert routes.count(password) == 2 and f"password: {json.dumps(password)}" in conf
    assert "no_advertise: true" in conf  # clients have every URL with credentials; an advertised one has none
    assert "auth_callout" in conf and "lorafn.admin" in conf  # the same users and callout as one server


def test_one_server_has_no_cluster_block_and_the_default_sync(tmp_path: Path) -> None:
    ports = StackPorts(nats=14222)
    stack = stack_with_credentials(tmp_path, ports=ports)
    conf = stack._nats_config("nats", ports.nats_servers(1)[0], ports.nats_servers(1))
    assert "cluster {" not in conf and "server_name" not in conf and "sync_interval" not in conf
    assert f'jetstream {{ store_dir: "{tmp_path / "nats"}" }}' in conf


def test_clients_get_every_server_and_the_first_stays_nats_url(tmp_path: Path) -> None:
    ports = StackPorts(nats=14222, nats_cluster=16222)
    stack = stack_with_credentials(tmp_path, ports=ports, nats_cluster=3)
    endpoints = stack._endpoints()
    admin = endpoints.nats_admin.split(",")
    assert [u.rpartition("@")[2] for u in admin] == ["127.0.0.1:14222", "127.0.0.1:14223", "127.0.0.1:14224"]
    assert endpoints.nats_url == admin[0] and endpoints.nats_stream_replicas == 3
    worker = endpoints.nats_url_of("worker").split(",")
    assert len(worker) == 3 and all(u.startswith("nats://lorafn.worker:") for u in worker)


def test_an_older_stack_json_reads_as_one_server(tmp_path: Path) -> None:
    old = {"nats_url": "nats://lorafn.admin:pw@127.0.0.1:4222", "database_url": "postgresql://x", "s3_endpoint": "h:1",
           "s3_access_key": "a", "s3_secret_key": "s", "bucket": "b", "launcher_pid": 1, "pids": {}}
    (tmp_path / "stack.json").write_text(json.dumps(old))
    endpoints = StackEndpoints.read(tmp_path / "stack.json")
    assert endpoints.nats_admin == old["nats_url"] and endpoints.nats_stream_replicas == 1
    assert endpoints.nats_url_of("worker") == old["nats_url"]


def test_older_credentials_get_a_route_password(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    stored = json.loads(json.dumps(Credentials().__dict__))
    del stored["nats_route_password"]
    path.write_text(json.dumps(stored))
    creds = Credentials.load_or_create(path)
    assert len(creds.nats_route_password) > 16
    assert json.loads(path.read_text())["nats_route_password"] == creds.nats_route_password
    assert Credentials.load_or_create(path).nats_route_password == creds.nats_route_password
