"""The bus's rules as plain data: the invocation envelope, the reply namespace, the JWTs the callout signs and
the server config the stack writes. (tests/e2e/test_bus_security.py runs them against a real server.)"""

from __future__ import annotations

import base64
import json

import pytest

from protocol import nats_auth, subjects
from protocol.messages import Invocation

SHA = "a" * 64


def inv(**fields: object) -> Invocation:
    return Invocation.model_validate({"id": "inv_1", "tenant": "acme", "adapter": "bot", **fields})


@pytest.mark.parametrize(
    ("subject", "fields", "code", "reply_ok", "why"),
    [
        ("lora.invoke.acme.bot", {}, None, True, "payload agrees with its subject"),
        ("lora.invoke.acme.bot", {"version": SHA, "reply_to": "lora.reply.acme.inv_1"}, None, True,
         "a reply subject in the tenant's namespace; versions are checked against the registry later"),
        ("lora.invoke.acme.bot", {"reply_to": "lora.reply.acme.gw-1.inv_1"}, None, True, "a gateway's reply subject"),
        ("lora.invoke.acme._base", {"adapter": None}, None, True, "the bare backbone"),
        ("lora.invoke.acme._base", {"adapter": "_base"}, None, True, "the bare backbone, spelled out"),
        ("lora.invoke.acme.bot", {"tenant": "dev"}, "forbidden", False, "another tenant named in the payload"),
        ("lora.invoke.acme.bot", {"adapter": "other"}, "forbidden", True, "another adapter named in the payload"),
        ("lora.invoke.acme._base", {"adapter": "bot"}, "forbidden", True, "an adapter named on the base subject"),
        ("lora.invoke.acme.bot", {"reply_to": "lora.reply.dev.inv_1"}, "forbidden", False,
         "a reply subject in another tenant's namespace"),
        ("lora.invoke.acme.bot", {"reply_to": "lora.reply.inv_1"}, "forbidden", False,
         "a reply subject outside every tenant's namespace"),
        ("lora.invoke.acme.bot", {"reply_to": "lora.reply.acme.*"}, "forbidden", False, "a wildcard reply subject"),
        ("lora.invoke.acme.bot", {"reply_to": "lora.reply.acme..x"}, "forbidden", False, "an empty token"),
        ("lora.invoke.acme.bot", {"reply_to": "lora.work.w1"}, "forbidden", False, "a worker's work subject"),
        ("lora.invoke.acme._base", {"adapter": None, "version": SHA}, "bad_request", True,
         "a version for the bare backbone"),
        ("lora.work.w1", {}, "bad_request", False, "not an invocation subject"),
    ],
)
def test_envelope(subject: str, fields: dict[str, object], code: str | None, reply_ok: bool, why: str) -> None:
    problem = nats_auth.envelope_problem(subject, inv(**fields))
    assert (problem.code if problem else None) == code, why
    if problem is not None:
        assert problem.reply_ok is reply_ok, why


def test_gateway_replies_live_in_the_tenant_namespace() -> None:
    reply = subjects.gateway_reply("gw-1", "inv_1", tenant="acme")
    assert reply == "lora.reply.acme.gw-1.inv_1"
    assert nats_auth.reply_allowed("acme", reply) and not nats_auth.reply_allowed("dev", reply)
    assert subjects.gateway_replies("gw-1") == "lora.reply.*.gw-1.*"
    assert subjects.tenant_reply("acme", "inv_1") == "lora.reply.acme.inv_1"
    assert nats_auth.tenant_inbox_prefix("acme") + ".x" == "lora.reply.acme.x"


def test_tenant_permissions_are_its_own_subjects_only() -> None:
    perms = nats_auth.tenant_permissions("acme")
    assert perms.publish == ("lora.invoke.acme.>",) and perms.subscribe == ("lora.reply.acme.>",)
    assert not perms.allow_responses
    with pytest.raises(subjects.InvalidName):
        nats_auth.tenant_permissions("acme.>")


def test_only_the_scheduler_may_publish_work() -> None:
    for component in ("gateway", "worker", "auth"):
        assert not any(p.startswith("lora.work") for p in nats_auth.component_permissions(component).publish)
    assert "lora.work.*" in nats_auth.component_permissions("scheduler").publish
    worker = nats_auth.component_permissions("worker", worker_id="w1")
    assert "$JS.API.CONSUMER.MSG.NEXT.LORAFN_WORK.work-w1" in worker.publish
    assert "lora.ctl.w1.*" in worker.subscribe and "lora.evt.worker.w1" in worker.publish


def test_server_config_names_every_component_and_the_callout() -> None:
    signer = nats_auth.Signer(nats_auth.new_account_seed())
    passwords = {c: f"pw-{c}" for c in nats_auth.COMPONENTS}
    conf = nats_auth.server_config(passwords=passwords, issuer_public_key=signer.public_key)
    for component in nats_auth.COMPONENTS:
        assert f'user: "lorafn.{component}", password: "pw-{component}"' in conf
    assert f'issuer: "{signer.public_key}"' in conf and 'auth_users: [ "lorafn.admin"' in conf
    # the admin has no allow-list; every other component has one
    admin_line = next(line for line in conf.splitlines() if '"lorafn.admin"' in line and "password" in line)
    assert "permissions" not in admin_line
    assert conf.count("permissions:") == len(nats_auth.COMPONENTS) - 1


def test_jwt_round_trip_and_tampering() -> None:
    signer = nats_auth.Signer(nats_auth.new_account_seed())
    token = nats_auth.encode_jwt({"sub": "U" + "A" * 55, "nats": {"type": "user", "version": 2}}, signer)
    claims = nats_auth.decode_jwt(token)
    assert claims["iss"] == signer.public_key and claims["nats"]["type"] == "user" and claims["jti"]
    head, payload, sig = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["nats"]["type"] = "admin"
    forged = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    with pytest.raises(nats_auth.JwtInvalid, match="bad signature"):
        nats_auth.decode_jwt(f"{head}.{forged}.{sig}")
    expired = nats_auth.encode_jwt({"sub": "x", "exp": 1000}, signer)
    with pytest.raises(nats_auth.JwtInvalid, match="expired"):
        nats_auth.decode_jwt(expired)


def test_signer_refuses_what_is_not_an_account_seed() -> None:
    with pytest.raises(ValueError, match="not an nkey seed"):
        nats_auth.Signer("SAnot-a-seed")


def test_authorization_response_is_bound_to_the_request() -> None:
    signer = nats_auth.Signer(nats_auth.new_account_seed())
    request = {"nats": {"user_nkey": "UNKEY", "server_id": {"id": "NSERVER"}}}
    user = nats_auth.encode_jwt(nats_auth.user_claims(user_nkey="UNKEY", name="tenant:acme",
                                                      permissions=nats_auth.tenant_permissions("acme"),
                                                      expires_at=2e9), signer)
    response = nats_auth.decode_jwt(nats_auth.authorization_response(request=request, signer=signer, user_jwt=user))
    assert response["sub"] == "UNKEY" and response["aud"] == "NSERVER"
    assert response["nats"]["type"] == "authorization_response" and "error" not in response["nats"]
    granted = nats_auth.decode_jwt(response["nats"]["jwt"])
    assert granted["aud"] == "$G" and granted["nats"]["pub"]["allow"] == ["lora.invoke.acme.>"]
    refused = nats_auth.decode_jwt(nats_auth.authorization_response(request=request, signer=signer, error="no"))
    assert refused["nats"]["error"] == "no" and "jwt" not in refused["nats"]
