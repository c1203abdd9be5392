"""`lorafn up --auto-ports` picks free ports only for what no option names: an explicit --gateway-port (or
server port) wins."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import httpx

from lorafn.stack import free_ports, free_stack_ports
from tests.lorafn.test_stack import LORAFN, wait_for, wait_for_pids

HOST = "127.0.0.1"


def test_free_stack_ports_keeps_the_ports_given() -> None:
    nats, postgres, gateway = free_ports(HOST, 3)
    ports = free_stack_ports(HOST, nats=nats, postgres=postgres, avoid=(gateway,))
    assert (ports.nats, ports.postgres) == (nats, postgres)
    picked = {ports.nats_monitor, ports.s3, *ports.s3_internal()}
    assert not picked & {nats, postgres, gateway}
    s3 = free_stack_ports(HOST).s3
    again = free_stack_ports(HOST, s3=s3)
    assert again.s3 == s3 and not {again.nats, again.nats_monitor, again.postgres} & set(range(s3, s3 + 8))


def test_port_runs_are_picked_outside_the_ephemeral_range() -> None:
    """A port found free in the kernel's range for outgoing connections can be taken by any client before its
    server listens (SeaweedFS's S3 gRPC port was, once, in a full test run): the runs of consecutive ports the
    stack picks itself (the S3 server's 8, a NATS cluster's) lie outside it."""
    low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(20):
        ports = free_stack_ports(HOST, nats_servers=3)
        runs = [ports.s3, *ports.s3_internal(), *(p for s in ports.nats_servers(3)
                                                  for p in (s.client, s.cluster, s.monitor))]
        assert all(p < low or p > high for p in runs), (low, high, runs)
        assert all(0 < p <= 65535 for p in runs)


def test_up_with_auto_ports_honours_explicit_ports(tmp_path: Path) -> None:
    gateway, postgres = free_ports(HOST, 2)
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [*LORAFN, "up", "--state-dir", str(state), "--auto-ports", "--workers", "0",
         "--gateway-port", str(gateway), "--postgres-port", str(postgres)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for(state / "dev-api-key", proc)
        endpoints = wait_for_pids(state, {"postgres", "gateway"}, proc)
        assert endpoints.database_url.split("@")[1].startswith(f"{HOST}:{postgres}/")
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://{HOST}:{gateway}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the gateway never answered on its port"
            time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert f"http://{HOST}:{gateway}" in out, out
