"""Invoke a lorafn function over NATS, without the gateway: a standalone client (nats-py + msgpack messages).

    lorafn keys create dev --nats        # prints the tenant's NATS URL (user: the tenant, password: a secret)
    python examples/nats_invoke.py --nats nats://dev:lfnats_...@127.0.0.1:4222 --tenant dev \
        --adapter support-bot "Write a haiku about queues"
    python examples/nats_invoke.py --tenant dev --chat "Hi!"          # the bare backbone, chat template

What it does (docs/nats.md has the full format, for clients in any language):
0. connects with the tenant's NATS credential, inbox prefix `lora.reply.<tenant>`: the credential may read only
   the tenant's reply namespace `lora.reply.<tenant>.>` (JetStream's publish acks come back there too);
1. subscribes to its reply subject `lora.reply.<tenant>.<invocation id>` (core NATS);
2. publishes an `Invocation` (a msgpack map) to the JetStream subject `lora.invoke.<tenant>.<adapter>`
   (`_base` for the bare backbone) with header `Nats-Msg-Id: <invocation id>` and waits for the ack;
3. prints the text of each `TokenChunk` (header `Lorafn-Kind: chunk`) as it arrives, dropping chunks whose
   index it has already seen (a redelivered invocation generates again from index 0);
4. prints the `InvocationResult` (header `Lorafn-Kind: result`) and exits 0 if it succeeded, 1 if not.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys

import nats
from nats.aio.msg import Msg

from protocol.messages import BASE_ADAPTER, ChatMessage, Invocation, InvocationResult, Sampling, TokenChunk


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("prompt", help="the prompt (a user message with --chat)")
    p.add_argument("--nats", default=os.environ.get("LORAFN_NATS__URL", "nats://127.0.0.1:4222"),
                   help="NATS URL, credentials included (default: $LORAFN_NATS__URL)")
    p.add_argument("--tenant", default="dev")
    p.add_argument("--adapter", default=None, help="adapter name (default: the bare backbone)")
    p.add_argument("--version", default=None, help="sha256 of the adapter version (default: the current one)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a chat message")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the result")
    return p.parse_args(argv)


async def invoke(args: argparse.Namespace) -> InvocationResult | None:
    invocation_id = f"inv-{secrets.token_hex(12)}"
    reply_subject = f"lora.reply.{args.tenant}.{invocation_id}"  # in the tenant's reply namespace
    adapter = args.adapter or BASE_ADAPTER
    invocation = Invocation(
        id=invocation_id,
        tenant=args.tenant,
        adapter=args.adapter,
        version=args.version,
        prompt=None if args.chat else args.prompt,
        messages=[ChatMessage(role="user", content=args.prompt)] if args.chat else None,
        sampling=Sampling(temperature=args.temperature, seed=args.seed, max_tokens=args.max_tokens),
        reply_to=reply_subject,
    )
    nc = await nats.connect(args.nats, inbox_prefix=f"lora.reply.{args.tenant}")
    done: asyncio.Future[InvocationResult] = asyncio.get_running_loop().create_future()
    seen: set[int] = set()

    async def on_reply(msg: Msg) -> None:
        kind = (msg.headers or {}).get("Lorafn-Kind")
        if kind == "chunk":
            chunk = TokenChunk.decode(msg.data)
            if chunk.index not in seen:
                seen.add(chunk.index)
                print(chunk.text, end="", flush=True)
        elif kind == "result" and not done.done():
            done.set_result(InvocationResult.decode(msg.data))

    try:
        await nc.subscribe(reply_subject, cb=on_reply)  # before publishing, so no chunk is missed
        ack = await nc.jetstream().publish(
            f"lora.invoke.{args.tenant}.{adapter}", invocation.encode(), headers={"Nats-Msg-Id": invocation_id}
        )
        print(f"[invocation {invocation_id} queued: stream {ack.stream}, seq {ack.seq}]", file=sys.stderr)
        try:
            return await asyncio.wait_for(done, args.timeout)
        except TimeoutError:
            print(f"\n[no result in {args.timeout} s]", file=sys.stderr)
            return None
    finally:
        await nc.drain()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(invoke(args))
    if result is None:
        return 2
    print()
    if result.status == "succeeded":
        t = result.timings
        print(f"[succeeded on {result.worker_id}: {result.usage.prompt_tokens} prompt + "
              f"{result.usage.completion_tokens} completion tokens, finish {result.finish_reason}, "
              f"adapter tier {result.adapter_tier}, first token {t.first_token_ms or 0:.0f} ms, "
              f"total {t.total_ms or 0:.0f} ms]")
        print(f"result: {result.text!r}")
        return 0
    error = result.error
    print(f"[failed: {error.code if error else '?'}: {error.message if error else ''}]")
    return 1


if __name__ == "__main__":
    sys.exit(main())
