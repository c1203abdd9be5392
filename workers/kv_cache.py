"""Paged KV cache: fixed-size blocks, per-sequence block tables, and attention over them.

Memory is one preallocated tensor per K and V, `[num_layers, kv_heads, num_blocks * block_size, head_dim]`.
A sequence owns a list of blocks (its block table); token `p` of a sequence lives in slot
`table[p // block_size] * block_size + p % block_size` of every layer. Blocks need not be contiguous,
so freeing never needs compaction.

One engine step runs a flattened batch of tokens of many sequences (prefill chunks and decode tokens
mixed). `AttentionMetadata` describes that batch once per step (shared by all layers); `attend` writes
the new K/V into their slots and computes causal attention of the new queries over each sequence's
whole context:
- decode sequences (one new token) are batched: on CPU in fp32 the native kernel (kernels/native.py)
  reads each sequence's blocks in place through its block table, one (sequence, KV head) per work item;
  otherwise their blocks are gathered into one padded tensor `[num_decode, max_blocks * block_size, ...]`
  and attended with a padding mask in a few batched matmuls (the gather copies the whole context of the
  batch every layer: about a fifth of a SmolLM2 decode step at 32 requests of 160 tokens);
- prefill chunks run one SDPA call per sequence (causal among the new tokens, full over earlier context).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kernels import native
from storage.backbone import BackboneSpec

DEFAULT_BLOCK_SIZE = 16


class KVCacheError(RuntimeError):
    """Base of the paged KV cache's errors."""


class OutOfBlocks(KVCacheError):
    """Not enough free blocks; nothing was allocated (the cache is unchanged)."""

    def __init__(self, *, needed: int, free: int) -> None:
        super().__init__(f"KV cache needs {needed} more blocks but only {free} are free")
        self.needed = needed
        self.free = free


class UnknownSequence(KVCacheError, KeyError):
    def __init__(self, seq_id: Hashable) -> None:
        super().__init__(f"sequence {seq_id!r} has no blocks in the KV cache")
        self.seq_id = seq_id


class SequenceExists(KVCacheError):
    def __init__(self, seq_id: Hashable, *, tokens: int) -> None:
        super().__init__(f"sequence {seq_id!r} already holds {tokens} tokens in the KV cache")
        self.seq_id = seq_id
        self.tokens = tokens


class KVBudgetTooSmall(KVCacheError, ValueError):
    def __init__(self, *, budget_bytes: int, block_bytes: int) -> None:
        super().__init__(f"KV cache budget of {budget_bytes} bytes is below one block ({block_bytes} bytes)")
        self.budget_bytes = budget_bytes
        self.block_bytes = block_bytes


def block_bytes(
    spec: BackboneSpec, *, block_size: int = DEFAULT_BLOCK_SIZE, dtype: torch.dtype = torch.float32
) -> int:
    """Bytes one block occupies: K and V of `block_size` tokens in every layer."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * itemsize


def blocks_for_budget(
    budget_bytes: int,
    spec: BackboneSpec,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dtype: torch.dtype = torch.float32,
) -> int:
    """How many blocks fit in `budget_bytes`; raises `KVBudgetTooSmall` if not even one."""
    per_block = block_bytes(spec, block_size=block_size, dtype=dtype)
    if budget_bytes < per_block:
        raise KVBudgetTooSmall(budget_bytes=budget_bytes, block_bytes=per_block)
    return budget_bytes // per_block


@dataclass(frozen=True)
class PrefillSegment:
    """One sequence with more than one new token in the flattened batch."""

    start: int  # first token of the segment in the flattened batch
    end: int  # one past its last token
    context_len: int  # tokens in the sequence's context after this step (earlier ones + these)
    slots: (
        torch.Tensor | None
    )  # LongTensor [context_len] slot of each context token; None: no earlier context
    mask: torch.Tensor | None  # bool [end - start, context_len]: query i sees key j; None when slots is None


@dataclass(frozen=True)
class AttentionMetadata:
    """Layout of one step's flattened batch; built once per step, read by every layer.

    Sequences occupy consecutive token ranges in the order given: sequence i has tokens
    `[query_starts[i], query_starts[i] + query_lens[i])`, which are the LAST `query_lens[i]` of its
    `context_lens[i]` context tokens (positions `context_lens[i] - query_lens[i] ...`).
    Build with `AttentionMetadata.build` (or `PagedKVCache.metadata`).
    """

    query_starts: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    block_size: int
    slot_mapping: torch.Tensor  # LongTensor [num_tokens]: cache slot of every new token
    prefills: list[PrefillSegment]
    decode_tokens: torch.Tensor  # LongTensor [num_decode]: flattened-batch index of each decode token
    decode_blocks: torch.Tensor  # LongTensor [num_decode, max_blocks]: block tables padded with block 0
    decode_bias: torch.Tensor  # float [num_decode, 1, max_blocks * block_size]: 0 = context, -inf = padding
    decode_lens: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [num_decode]
    num_tokens: int = field(default=0)

    @classmethod
    def build(
        cls,
        *,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> AttentionMetadata:
        """Derive slots, prefill segments and padded decode tables from the per-sequence layout."""
        if not (len(query_lens) == len(context_lens) == len(block_tables)):
            raise ValueError(
                f"per-sequence lists differ in length: {len(query_lens)} query_lens, "
                f"{len(context_lens)} context_lens, {len(block_tables)} block_tables"
            )
        starts: list[int] = []
        slot_parts: list[torch.Tensor] = []
        prefills: list[PrefillSegment] = []
        decode_index: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        offset = 0
        for q_len, ctx_len, table in zip(query_lens, context_lens, block_tables, strict=True):
            if not 1 <= q_len <= ctx_len:
                raise ValueError(f"query length {q_len} must be in [1, context length {ctx_len}]")
            if len(table) * block_size < ctx_len:
                raise ValueError(f"{len(table)} blocks of {block_size} cannot hold {ctx_len} tokens")
            blocks = torch.as_tensor(table, dtype=torch.long)
            positions = torch.arange(ctx_len, dtype=torch.long)
            slots = blocks[positions // block_size] * block_size + positions % block_size  # [ctx_len]
            slot_parts.append(slots[ctx_len - q_len :])
            starts.append(offset)
            if q_len == 1:
                decode_index.append(offset)
                decode_tables.append(list(table[: math.ceil(ctx_len / block_size)]))
                decode_lens.append(ctx_len)
            elif ctx_len == q_len:
                prefills.append(PrefillSegment(offset, offset + q_len, ctx_len, None, None))
            else:
                query_pos = torch.arange(ctx_len - q_len, ctx_len)
                mask = positions[None, :] <= query_pos[:, None]  # [q_len, ctx_len]
                prefills.append(
                    PrefillSegment(offset, offset + q_len, ctx_len, slots.to(device), mask.to(device))
                )
            offset += q_len

        max_blocks = max((len(t) for t in decode_tables), default=0)
        decode_blocks = torch.zeros(len(decode_tables), max_blocks, dtype=torch.long)
        decode_bias = torch.full((len(decode_tables), 1, max_blocks * block_size), -math.inf, dtype=dtype)
        for i, (table, ctx_len) in enumerate(zip(decode_tables, decode_lens, strict=True)):
            decode_blocks[i, : len(table)] = torch.as_tensor(table, dtype=torch.long)
            decode_bias[i, ..., :ctx_len] = 0.0
        slot_mapping = torch.cat(slot_parts) if slot_parts else torch.zeros(0, dtype=torch.long)
        return cls(
            query_starts=starts,
            query_lens=list(query_lens),
            context_lens=list(context_lens),
            block_tables=[list(t) for t in block_tables],
            block_size=block_size,
            slot_mapping=slot_mapping.to(device),
            prefills=prefills,
            decode_tokens=torch.as_tensor(decode_index, dtype=torch.long, device=device),
            decode_blocks=decode_blocks.to(device),
            decode_bias=decode_bias.to(device),
            decode_lens=torch.as_tensor(decode_lens, dtype=torch.long, device=device),
            num_tokens=offset,
        )

    @property
    def last_token_indices(self) -> torch.Tensor:
        """LongTensor [num_seqs]: flattened-batch index of each sequence's last new token (for logits)."""
        return torch.as_tensor(
            [s + n - 1 for s, n in zip(self.query_starts, self.query_lens, strict=True)],
            dtype=torch.long,
            device=self.slot_mapping.device,
        )


class PagedKVCache:
    """K/V blocks for every layer plus the block tables of the sequences that hold them.

    Block bookkeeping (`allocate`, `append`, `free`) is all-or-nothing: `OutOfBlocks` leaves every
    table and the free list exactly as they were, so the engine can preempt a sequence and retry.
    """

    def __init__(
        self,
        spec: BackboneSpec,
        num_blocks: int,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need at least one block of at least one token, got {num_blocks} x {block_size}"
            )
        self.spec = spec
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        # Head-major: [num_layers, kv_heads, num_blocks * block_size, head_dim]; slot s of block b is row
        # b * block_size + s, so one block of one head is a contiguous [block_size, head_dim] tile.
        shape = (spec.num_layers, spec.num_kv_heads, num_blocks * block_size, spec.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        # Decode attention reads the paged cache in place with the native CPU kernel when it can
        # (kernels/native.py; fp32 on CPU), else gathers the context for torch matmuls.
        self.native_attention = self.device.type == "cpu" and dtype == torch.float32
        # A stack: blocks are handed out from the end, so block 0 goes first.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[Hashable, list[int]] = {}
        self._lengths: dict[Hashable, int] = {}

    @classmethod
    def from_budget(
        cls,
        spec: BackboneSpec,
        budget_bytes: int,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> PagedKVCache:
        """A cache with as many blocks as fit in `budget_bytes`."""
        num_blocks = blocks_for_budget(budget_bytes, spec, block_size=block_size, dtype=dtype)
        return cls(spec, num_blocks, block_size=block_size, dtype=dtype, device=device)

    # -- block bookkeeping ------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int, seq_id: Hashable | None = None) -> int:
        """Extra blocks that holding `num_tokens` more tokens of `seq_id` (or of a new sequence) takes."""
        length = self._lengths.get(seq_id, 0) if seq_id is not None else 0
        held = len(self._tables.get(seq_id, ())) if seq_id is not None else 0
        return max(0, math.ceil((length + num_tokens) / self.block_size) - held)

    def can_append(self, num_tokens: int, seq_id: Hashable | None = None) -> bool:
        return self.blocks_needed(num_tokens, seq_id) <= len(self._free)

    def allocate(self, seq_id: Hashable, num_tokens: int) -> list[int]:
        """Register a new sequence holding `num_tokens` tokens; returns its block table."""
        if seq_id in self._tables:
            raise SequenceExists(seq_id, tokens=self._lengths[seq_id])
        needed = self.blocks_needed(num_tokens)
        if needed > len(self._free):
            raise OutOfBlocks(needed=needed, free=len(self._free))
        self._tables[seq_id] = [self._free.pop() for _ in range(needed)]
        self._lengths[seq_id] = num_tokens
        return self._tables[seq_id]

    def append(self, seq_id: Hashable, num_tokens: int = 1) -> list[int]:
        """Grow `seq_id` by `num_tokens` tokens, taking blocks as needed; returns its block table."""
        if seq_id not in self._tables:
            raise UnknownSequence(seq_id)
        needed = self.blocks_needed(num_tokens, seq_id)
        if needed > len(self._free):
            raise OutOfBlocks(needed=needed, free=len(self._free))
        self._tables[seq_id].extend(self._free.pop() for _ in range(needed))
        self._lengths[seq_id] += num_tokens
        return self._tables[seq_id]

    def free(self, seq_id: Hashable) -> int:
        """Return the blocks of `seq_id` to the free list; idempotent. Returns how many were freed."""
        table = self._tables.pop(seq_id, None)
        self._lengths.pop(seq_id, None)
        if table is None:
            return 0
        self._free.extend(reversed(table))
        return len(table)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def length(self, seq_id: Hashable) -> int:
        """Tokens `seq_id` holds (including those reserved for the step being run)."""
        if seq_id not in self._lengths:
            raise UnknownSequence(seq_id)
        return self._lengths[seq_id]

    def block_table(self, seq_id: Hashable) -> list[int]:
        if seq_id not in self._tables:
            raise UnknownSequence(seq_id)
        return list(self._tables[seq_id])

    def metadata(self, seq_ids: Sequence[Hashable], query_lens: Sequence[int]) -> AttentionMetadata:
        """Metadata for a step running the last `query_lens[i]` tokens of each `seq_ids[i]`, in that order.

        Call after `allocate`/`append` reserved those tokens.
        """
        return AttentionMetadata.build(
            query_lens=query_lens,
            context_lens=[self.length(s) for s in seq_ids],
            block_tables=[self._tables[s] for s in seq_ids],
            block_size=self.block_size,
            device=self.device,
            dtype=self.dtype,
        )

    # -- attention --------------------------------------------------------------------------------------

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor:
        """Store the new K/V of `layer` and attend every new query over its sequence's context.

        q: [num_tokens, num_heads, head_dim]      (rotary already applied)
        k: [num_tokens, num_kv_heads, head_dim]   (rotary already applied)
        v: [num_tokens, num_kv_heads, head_dim]
        returns [num_tokens, num_heads * head_dim]
        """
        num_tokens, num_heads, head_dim = q.shape
        kv_heads = k.shape[1]
        k_layer, v_layer = self.k[layer], self.v[layer]  # [kv_heads, num_slots, head_dim]
        k_layer.index_copy_(1, attn.slot_mapping, k.transpose(0, 1).to(self.dtype))
        v_layer.index_copy_(1, attn.slot_mapping, v.transpose(0, 1).to(self.dtype))
        out = q.new_empty(num_tokens, num_heads, head_dim)
        scale = head_dim**-0.5

        for seg in attn.prefills:
            q_seg = q[seg.start : seg.end].transpose(0, 1).unsqueeze(0)  # [1, heads, q_len, head_dim]
            if seg.slots is None:
                k_ctx = k[seg.start : seg.end].transpose(0, 1)  # [kv_heads, q_len, head_dim]
                v_ctx = v[seg.start : seg.end].transpose(0, 1)
            else:
                k_ctx = k_layer.index_select(1, seg.slots).to(q.dtype)  # [kv_heads, context_len, head_dim]
                v_ctx = v_layer.index_select(1, seg.slots).to(q.dtype)
            o = F.scaled_dot_product_attention(
                q_seg,
                k_ctx.unsqueeze(0),
                v_ctx.unsqueeze(0),
                attn_mask=seg.mask,
                is_causal=seg.slots is None,
                scale=scale,
                enable_gqa=True,
            )  # [1, heads, q_len, head_dim]
            out[seg.start : seg.end] = o[0].transpose(0, 1)

        num_decode = attn.decode_tokens.numel()
        # The native kernel reads the paged cache in place (kernels/native.py); False: it cannot, gather instead.
        if num_decode and not (self.native_attention and native.decode_attention(
            k_layer, v_layer, self.block_size, q.contiguous(), attn.decode_tokens, attn.decode_blocks,
            attn.decode_lens, scale, out,
        )):
            # Head-major cache: gathering whole blocks gives [kv_heads, num_decode, span, head_dim] directly,
            # so the batched matmuls below read it without another copy.
            group = num_heads // kv_heads
            blocks = attn.decode_blocks.view(-1)
            span = attn.decode_blocks.shape[1] * self.block_size
            paged = (kv_heads, self.num_blocks, self.block_size, head_dim)
            k_ctx = k_layer.view(paged).index_select(1, blocks).view(kv_heads, num_decode, span, head_dim)
            v_ctx = v_layer.view(paged).index_select(1, blocks).view(kv_heads, num_decode, span, head_dim)
            q_dec = q.index_select(0, attn.decode_tokens).view(num_decode, kv_heads, group, head_dim)
            q_dec = q_dec.transpose(0, 1)  # [kv_heads, num_decode, group, head_dim]
            scores = torch.matmul(
                q_dec, k_ctx.transpose(-1, -2).to(q.dtype)
            )  # [kv_heads, num_decode, group, span]
            scores = scores.mul_(scale).add_(attn.decode_bias)
            probs = torch.softmax(scores, dim=-1)
            o = torch.matmul(probs, v_ctx.to(q.dtype))  # [kv_heads, num_decode, group, head_dim]
            out.index_copy_(0, attn.decode_tokens, o.transpose(0, 1).reshape(num_decode, num_heads, head_dim))
        return out.view(num_tokens, num_heads * head_dim)
