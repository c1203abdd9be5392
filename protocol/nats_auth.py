"""Who may do what on the bus: one NATS user per component, per-tenant credentials, and the rules an
invocation's payload must follow on its subject. Plain data and pure functions; no connection here.

- Components. `component_permissions(component)` is the publish/subscribe allow-list of each lorafn
  process (admin, gateway, scheduler, worker, auth): what it publishes, what it reads, and the exact
  JetStream API subjects ($JS.API.*) of the streams and durable consumers it uses. The local stack writes
  them into the server's config (`server_config`); each component connects with its own inbox prefix
  (`inbox_prefix`), so no component can read another's inbox (JetStream API replies, pulled messages).
- Tenants. A tenant's NATS credential may publish only on `lora.invoke.<tenant>.>` and read only its reply
  namespace `lora.reply.<tenant>.>` (`tenant_permissions`). Its client uses `lora.reply.<tenant>` as inbox
  prefix (JetStream publish acks come back there) and a reply subject under it. Credentials are checked by
  the auth callout (scheduler.nats_callout), which answers the server with a user JWT carrying these
  permissions (`user_claims`, `authorization_response`): a new credential works at once, without touching
  the server.
- Envelope. Permissions fix who may publish on which subject, not what the payload says:
  `envelope_problem(subject, invocation)` names what is wrong with an invocation whose payload disagrees with
  its subject (another tenant, another adapter) or whose reply subject lies outside its tenant's reply
  namespace. The dispatcher refuses such an invocation before any worker sees it.

JWTs are the NATS flavour (header `{"typ": "JWT", "alg": "ed25519-nkey"}`, base64url without padding,
ed25519 signatures by nkeys); `encode_jwt`/`decode_jwt` do just that.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from protocol import subjects
from protocol.messages import BASE_ADAPTER, Invocation

# The callout's subject and the account every lorafn user lives in (config mode: the global account).
AUTH_CALLOUT_SUBJECT = "$SYS.REQ.USER.AUTH"
GLOBAL_ACCOUNT = "$G"
COMPONENTS = ("admin", "gateway", "scheduler", "worker", "auth")
# Component users are named with a dot, which no tenant name may contain (tenant names are subject tokens):
# a tenant can never present itself as a component.
USER_PREFIX = "lorafn."
JWT_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}

_STREAMS = (subjects.INVOCATIONS_STREAM, subjects.WORK_STREAM, subjects.RESULTS_STREAM)
_CALLBACKS_STREAM = f"KV_{subjects.CALLBACKS_BUCKET}"


def user_name(component: str) -> str:
    """The NATS user of a lorafn component (`lorafn.gateway`, ...)."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}: one of {', '.join(COMPONENTS)}")
    return USER_PREFIX + component


def inbox_prefix(component: str) -> str:
    """Inbox prefix of a component's connection (`_INBOX` for admin, which may read every inbox)."""
    return "_INBOX" if component == "admin" else f"_INBOX_{component}"


def tenant_replies(tenant: str) -> str:
    """Every subject a tenant's credential may read: its reply namespace."""
    return f"{subjects.REPLY_PREFIX}.{subjects.check_name('tenant', tenant)}.>"


def tenant_inbox_prefix(tenant: str) -> str:
    """Inbox prefix of a tenant's direct NATS client: JetStream's publish acks arrive in its reply namespace."""
    return f"{subjects.REPLY_PREFIX}.{subjects.check_name('tenant', tenant)}"


@dataclass(frozen=True)
class Permissions:
    """Allow-lists of one NATS user. Anything not allowed is refused by the server (a permissions violation
    is reported to the client and logged by the server). `allow_responses`: may answer the requests it
    receives (reply subjects), once each."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    allow_responses: bool = False
    unrestricted: bool = False  # the admin: no allow-list at all

    def config(self) -> str:
        """The `permissions` block of a user in the server's config file ('' when unrestricted)."""
        if self.unrestricted:
            return ""
        parts = [f"publish: {{ allow: {_conf_list(self.publish)} }}",
                 f"subscribe: {{ allow: {_conf_list(self.subscribe)} }}"]
        if self.allow_responses:
            parts.append("allow_responses: true")
        return f"permissions: {{ {', '.join(parts)} }}"

    def claims(self) -> dict[str, Any]:
        """The permission part of a user JWT's `nats` claims."""
        out: dict[str, Any] = {"pub": {"allow": list(self.publish)}, "sub": {"allow": list(self.subscribe)}}
        if self.allow_responses:
            out["resp"] = {"max": 1}
        return out


def _conf_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(json.dumps(s) for s in items) + "]"


def _stream_admin(*streams: str) -> tuple[str, ...]:
    """Create, update and read one of lorafn's streams (`ensure_streams`, run by every component at start)."""
    return tuple(f"$JS.API.STREAM.{verb}.{s}" for s in streams for verb in ("INFO", "CREATE", "UPDATE"))


def _consumer(stream: str, durable: str) -> tuple[str, ...]:
    """Bind to (or create) one durable pull consumer, fetch from it and acknowledge what it delivers. Both
    spellings of consumer creation: nats-py sends CREATE.<stream>.<name>[.<filter>] to servers that know it."""
    api = "$JS.API.CONSUMER"
    return (f"{api}.CREATE.{stream}.{durable}", f"{api}.CREATE.{stream}.{durable}.>",
            f"{api}.DURABLE.CREATE.{stream}.{durable}", f"{api}.INFO.{stream}.{durable}",
            f"{api}.MSG.NEXT.{stream}.{durable}", f"$JS.ACK.{stream}.{durable}.>")


def component_permissions(component: str, *, worker_id: str = "*",
                          results_consumer: str = "scheduler-results",
                          callbacks_consumer: str = subjects.CALLBACKS_CONSUMER) -> Permissions:
    """What `component` may publish and read (see the module docstring). `worker_id` narrows a worker's
    grants to its own work consumer, control subjects and heartbeats ("*": any worker id)."""
    s = subjects
    inbox = f"{inbox_prefix(component)}.>"
    if component == "admin":
        return Permissions(unrestricted=True)
    if component == "auth":
        return Permissions(subscribe=(AUTH_CALLOUT_SUBJECT, inbox), allow_responses=True)
    if component == "gateway":
        return Permissions(
            publish=(
                f"{s.INVOKE_PREFIX}.>", s.ADAPTER_EVENTS_ALL, s.KEY_EVENTS_ALL, s.CANCEL_ALL,
                # a cancel records the invocation's cancelled result itself
                s.RESULT_ALL, s.CALLBACK_ALL,
                f"$KV.{s.CALLBACKS_BUCKET}.>",
                *_stream_admin(*_STREAMS, _CALLBACKS_STREAM),
                f"$JS.API.STREAM.MSG.GET.{s.RESULTS_STREAM}",
                f"$JS.API.STREAM.MSG.GET.{_CALLBACKS_STREAM}", f"$JS.API.DIRECT.GET.{_CALLBACKS_STREAM}",
                f"$JS.API.DIRECT.GET.{_CALLBACKS_STREAM}.>",
                *_consumer(s.RESULTS_STREAM, callbacks_consumer),
                f"$JS.API.CONSUMER.DELETE.{s.RESULTS_STREAM}.{s.CALLBACKS_CONSUMER_OLD}",
            ),
            # its replies are lora.reply.<tenant>.<gateway id>.<invocation id> (five tokens)
            subscribe=(f"{s.REPLY_PREFIX}.*.*.*", s.RESULT_ALL, s.ADAPTER_EVENTS_ALL, s.KEY_EVENTS_ALL,
                       s.SCHEDULER_EVENTS_ALL, s.CANCEL_ALL, inbox),
        )
    if component == "scheduler":
        return Permissions(
            publish=(
                f"{s.WORK_PREFIX}.*", f"{s.INVOKE_PREFIX}.>", s.RESULT_ALL, s.CALLBACK_ALL,
                f"{s.REPLY_PREFIX}.>", f"{s.SCHEDULER_EVENT_PREFIX}.*", f"{s.CTL_PREFIX}.>",
                *_stream_admin(*_STREAMS),
                f"$JS.API.CONSUMER.LIST.{s.INVOCATIONS_STREAM}", f"$JS.API.CONSUMER.NAMES.{s.INVOCATIONS_STREAM}",
                f"$JS.API.CONSUMER.DELETE.{s.INVOCATIONS_STREAM}.*", f"$JS.API.CONSUMER.DELETE.{s.WORK_STREAM}.*",
                *_consumer(s.INVOCATIONS_STREAM, s.DISPATCH_CONSUMER),
                *_consumer(s.RESULTS_STREAM, results_consumer),
                f"$JS.API.STREAM.MSG.GET.{s.WORK_STREAM}", f"$JS.API.STREAM.MSG.DELETE.{s.WORK_STREAM}",
            ),
            subscribe=(s.WORKER_EVENTS_ALL, s.RESULT_ALL, s.ADAPTER_EVENTS_ALL, f"{s.INVOCATION_EVENT_PREFIX}.*",
                       inbox),
        )
    if component == "worker":
        w = worker_id
        # Wildcards match whole tokens only: any worker's consumer is "*", not "work-*".
        durable = "*" if w == "*" else s.work_consumer(w)
        return Permissions(
            publish=(
                f"{s.REPLY_PREFIX}.>", s.RESULT_ALL, s.CALLBACK_ALL, f"{s.WORKER_EVENT_PREFIX}.{w}",
                f"{s.INVOCATION_EVENT_PREFIX}.*",
                f"{s.INVOKE_PREFIX}.>",  # a stopping worker hands its queue back for the next dispatch
                *_stream_admin(*_STREAMS),
                *_consumer(s.WORK_STREAM, durable),
                f"$JS.API.STREAM.MSG.GET.{s.WORK_STREAM}", f"$JS.API.STREAM.MSG.DELETE.{s.WORK_STREAM}",
                f"$JS.API.STREAM.MSG.GET.{s.RESULTS_STREAM}",
            ),
            subscribe=(f"{s.CTL_PREFIX}.{w}.*", s.CANCEL_ALL, inbox),
            allow_responses=True,  # answers the scheduler's control requests
        )
    raise ValueError(f"unknown component {component!r}: one of {', '.join(COMPONENTS)}")


def tenant_permissions(tenant: str) -> Permissions:
    """A tenant's direct client: invoke its own functions, read its own replies; nothing else."""
    return Permissions(publish=(f"{subjects.INVOKE_PREFIX}.{subjects.check_name('tenant', tenant)}.>",),
                       subscribe=(tenant_replies(tenant),))


def password_variable(component: str) -> str:
    """The environment variable a config written with `env_refs` reads a component's password from."""
    return f"NATS_{component.upper()}_PASSWORD"


ISSUER_VARIABLE = "NATS_CALLOUT_ISSUER"


def server_config(*, passwords: Mapping[str, str] | None, issuer_public_key: str | None,
                  env_refs: bool = False) -> str:
    """The `authorization` block of the server's config: one user per component with its permissions and
    the auth callout that every other user (tenants) goes through (left out when no issuer is given).

    env_refs: the passwords and the issuer are references to environment variables (`password_variable`,
    `ISSUER_VARIABLE`) that the server reads at start (docker-compose's deploy/nats.conf)."""
    components = [c for c in COMPONENTS if env_refs or (passwords is not None and c in passwords)]
    users = []
    for component in components:
        perms = component_permissions(component).config()
        password = f"${password_variable(component)}" if env_refs else json.dumps((passwords or {})[component])
        users.append(f"    {{ user: {json.dumps(user_name(component))}, password: {password}"
                     f"{', ' + perms if perms else ''} }}")
    lines = ["authorization {", "  users: [", *users, "  ]"]
    if issuer_public_key is not None or env_refs:
        issuer = f"${ISSUER_VARIABLE}" if env_refs else json.dumps(issuer_public_key)
        bypass = ", ".join(json.dumps(user_name(c)) for c in components)
        lines += ["  auth_callout {", f"    issuer: {issuer}", f"    auth_users: [ {bypass} ]", "  }"]
    lines.append("}")
    return "\n".join(lines)


def compose_config() -> str:
    """docker-compose's nats.conf (deploy/nats.conf): JetStream under /data, monitoring on 8222 (compose
    publishes it on the host's loopback only), the users and callout of `server_config` read from the
    environment."""
    return "\n".join([
        "# NATS for docker-compose: JetStream, one user per lorafn component with its subject permissions, and the",
        "# auth callout through which tenants' NATS credentials are checked (docs/nats.md, \"Security\").",
        "# Generated from protocol/nats_auth.py (tests/lorafn/test_compose.py checks that it matches):",
        "#   python -c \"from protocol.nats_auth import compose_config; print(compose_config(), end='')\" "
        "> deploy/nats.conf",
        "# Passwords and the callout's issuer come from the environment (docker-compose.yml sets them).",
        'listen: "0.0.0.0:4222"',
        'http: "0.0.0.0:8222"',
        'jetstream { store_dir: "/data" }',
        server_config(passwords=None, issuer_public_key=None, env_refs=True),
        "max_payload: 8MB",
        "",
    ])


# -- invocation envelope -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvelopeProblem:
    """Why an invocation on a subject must not run; `code` is the result's error code."""

    code: str  # "forbidden" or "bad_request"
    reason: str
    reply_ok: bool  # whether its reply subject may be told (False: it lies outside the tenant's namespace)


def subject_names(subject: str) -> tuple[str, str] | None:
    """(tenant, adapter) of a `lora.invoke.<tenant>.<adapter>` subject; None for any other subject."""
    prefix = subjects.INVOKE_PREFIX + "."
    if not subject.startswith(prefix):
        return None
    parts = subject[len(prefix):].split(".")
    return (parts[0], parts[1]) if len(parts) == 2 else None


def reply_allowed(tenant: str, reply_to: str) -> bool:
    """Whether `reply_to` lies in the tenant's reply namespace `lora.reply.<tenant>.>` and is a plain subject
    (no wildcard, no empty token)."""
    prefix = f"{subjects.REPLY_PREFIX}.{tenant}."
    if not reply_to.startswith(prefix) or len(reply_to) > 512:
        return False
    rest = reply_to[len(prefix):].split(".")
    return all(tok and tok not in ("*", ">") and not any(c.isspace() for c in tok) for tok in rest)


def envelope_problem(subject: str, inv: Invocation) -> EnvelopeProblem | None:
    """What is wrong with invocation `inv` arriving on `subject` (None: nothing). A tenant's credential can
    publish only on its own subjects, so the subject is the tenant's word; the payload must agree with it.

    - tenant or adapter in the payload not the subject's: forbidden (another tenant's function named);
    - reply subject outside `lora.reply.<tenant>.>`: forbidden (results would go to someone else);
    - a version named for the bare backbone: bad_request.
    """
    names = subject_names(subject)
    if names is None:
        return EnvelopeProblem("bad_request", f"{subject!r} is not an invocation subject", reply_ok=False)
    tenant, adapter = names
    reply_ok = inv.reply_to is None or reply_allowed(tenant, inv.reply_to)
    payload_adapter = inv.adapter if inv.adapter is not None else BASE_ADAPTER
    if inv.tenant != tenant:
        return EnvelopeProblem("forbidden", f"the payload names tenant {inv.tenant!r} on tenant {tenant!r}'s "
                                            f"subject {subject}", reply_ok=False)
    if payload_adapter != adapter:
        return EnvelopeProblem("forbidden", f"the payload names adapter {payload_adapter!r} on subject {subject}",
                               reply_ok=reply_ok)
    if not reply_ok:
        return EnvelopeProblem("forbidden", f"reply subject {inv.reply_to!r} is outside tenant {tenant!r}'s reply "
                                            f"namespace {tenant_replies(tenant)}", reply_ok=False)
    if adapter == BASE_ADAPTER and inv.version is not None:
        return EnvelopeProblem("bad_request", f"version {inv.version[:16]!r} named for the bare backbone",
                               reply_ok=True)
    return None


# -- JWTs ---------------------------------------------------------------------------------------------------


class JwtInvalid(ValueError):
    """A token that is not a NATS JWT signed by the key it names."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _public_key_bytes(public_key: str) -> bytes:
    """The raw ed25519 key inside an nkey public key (prefix byte + 32 bytes + crc16, base32)."""
    try:
        raw = base64.b32decode(public_key + "=" * (-len(public_key) % 8))
    except (ValueError, TypeError) as e:
        raise JwtInvalid(f"issuer {public_key[:8]!r}... is not an nkey") from e
    if len(raw) != 35:
        raise JwtInvalid(f"issuer {public_key[:8]!r}... is not an nkey ({len(raw)} bytes, expected 35)")
    return raw[1:33]


def new_account_seed() -> str:
    """A fresh account nkey seed (`SA...`): the auth callout's issuer."""
    import nkeys

    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT)).decode()


@dataclass
class Signer:
    """An nkey that signs JWTs (the callout's account key)."""

    seed: str
    _kp: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import nkeys

        try:
            self._kp = nkeys.from_seed(self.seed.encode())
        except Exception as e:  # nkeys raises its own error types
            raise ValueError(f"not an nkey seed ({type(e).__name__})") from e
        if not self.public_key.startswith("A"):
            raise ValueError(f"the issuer must be an account nkey (A...), got {self.public_key[:1]}...")

    @property
    def public_key(self) -> str:
        return bytes(self._kp.public_key).decode()

    def sign(self, data: bytes) -> bytes:
        return bytes(self._kp.sign(data))


def encode_jwt(claims: dict[str, Any], signer: Signer) -> str:
    """Sign `claims` as a NATS JWT: `iss`, `iat` and `jti` (a hash of the claims: a unique id) filled in."""
    body = {**claims, "iss": signer.public_key, "iat": int(time.time())}
    body.pop("jti", None)
    digest = hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).digest()
    body["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    head = _b64(json.dumps(JWT_HEADER, separators=(",", ":")).encode())
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    signature = signer.sign(f"{head}.{payload}".encode())
    return f"{head}.{payload}.{_b64(signature)}"


def decode_jwt(token: str, *, now: float | None = None) -> dict[str, Any]:
    """The claims of a NATS JWT whose signature verifies under its own issuer (`iss`) and which has not
    expired. The caller decides whether it trusts that issuer."""
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    parts = token.strip().split(".")
    if len(parts) != 3:
        raise JwtInvalid(f"expected 3 dot-separated parts, got {len(parts)}")
    try:
        header = json.loads(_unb64(parts[0]))
        claims = json.loads(_unb64(parts[1]))
        signature = _unb64(parts[2])
    except ValueError as e:
        raise JwtInvalid(f"not base64url JSON ({e})") from e
    if not isinstance(header, dict) or header.get("alg") not in ("ed25519-nkey", "ed25519"):
        raise JwtInvalid(f"unsupported JWT header {header!r}")
    if not isinstance(claims, dict) or not isinstance(claims.get("iss"), str):
        raise JwtInvalid("claims without an issuer")
    try:
        VerifyKey(_public_key_bytes(claims["iss"])).verify(f"{parts[0]}.{parts[1]}".encode(), signature)
    except (BadSignatureError, ValueError) as e:
        raise JwtInvalid(f"bad signature ({type(e).__name__})") from e
    exp = claims.get("exp")
    if isinstance(exp, int | float) and exp > 0 and (now if now is not None else time.time()) > exp:
        raise JwtInvalid(f"expired at {exp}")
    return claims


def user_claims(*, user_nkey: str, name: str, permissions: Permissions, expires_at: float,
                account: str = GLOBAL_ACCOUNT) -> dict[str, Any]:
    """The claims of the user JWT the callout issues: bound to the connection's nkey, placed in `account`,
    valid until `expires_at` (the server then closes the connection, and the client's reconnection is
    checked again: a revoked credential is out within the validity)."""
    return {
        "sub": user_nkey, "aud": account, "name": name, "exp": int(expires_at),
        "nats": {**permissions.claims(), "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2},
    }


def authorization_response(*, request: Mapping[str, Any], signer: Signer, user_jwt: str | None = None,
                           error: str | None = None) -> str:
    """The callout's answer to one authorization request: a user JWT, or an error (refused)."""
    nats = request.get("nats") or {}
    body: dict[str, Any] = {"type": "authorization_response", "version": 2}
    if user_jwt is not None:
        body["jwt"] = user_jwt
    else:
        body["error"] = error or "not authorized"
    return encode_jwt({"sub": nats.get("user_nkey", ""), "aud": (nats.get("server_id") or {}).get("id", ""),
                       "nats": body}, signer)
