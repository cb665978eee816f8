"""Shared-prefix greedy generation: the system turns once, each context once, each question alone.

Every SQuAD prompt is `system turns + context turns + question turn`, and about five questions share
one paragraph. Batched generation prefills the whole prompt for every question; here the prompts
are split as a prefix tree of depth two and each node is computed once, through GPT-2's KV cache:

1. the *system* prefix (the longest prefix common to all prompts) is prefilled once, batch 1;
2. each group's *tail* (the rest of the longest prefix common to the group's prompts: the context
   turn, the acknowledgement, `<|user|>`) is prefilled once, on top of (1);
3. each prompt's *branch* (the rest: the question turn and `<|assistant|>`) is prefilled on a copy
   of its tail's cache, and the answer is decoded greedily from there.

Callers group prompts by context. Shared parts are exact common prefixes of token ids, so a
grouping only decides how much is shared, never what a prompt is: questions whose context was cut
to different lengths (a long context, questions of different lengths) share the context's common
part and carry the rest in their branch. Rows of one batch have tails and branches of different
lengths: the cache of a row is `[system | tail, right-padded | branch, left-padded | answer]`, and
every token gets the `position_ids` it has in its own unpadded prompt (learned absolute positions
as in GPT-2 and OPT, rotary ones as in Llama, are both read from them). The attention mask is 4D,
built from those positions: a token sees the real keys at its position or before, never a hole,
and in a sliding-window layer only the keys less than the window back *in positions* (in cache
slots the holes would count too). Each token thus sees exactly the keys and positions it sees in
the plain left-padded path; only the grouping of the matrix products differs, so logits agree to
float rounding (the tests bound it, per family) and greedy answers are the same. A model that
cannot take a 4D mask (`architectures.shared_prefix_problem`) is not run here.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class PrefixPlan:
    system: list[int]  # ids every prompt starts with
    tails: list[list[int]]  # per distinct shared part: its ids after `system`
    tail_of: list[int]  # per prompt: the index of its tail
    branches: list[list[int]]  # per prompt: its ids after its shared part


def common_prefix_length(rows: list[list[int]]) -> int:
    if not rows:
        return 0
    shortest = min(rows, key=len)
    for i, token in enumerate(shortest):
        if any(row[i] != token for row in rows):
            return i
    return len(shortest)


def plan_prefixes(prompts: list[list[int]], groups: Sequence[Hashable]) -> PrefixPlan:
    """Split prompts into system, per-group tail and per-prompt branch. A branch keeps at least
    one id: the logits of a prompt's last id start its answer."""
    members: dict[Hashable, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    shared, tail_of = [], [0] * len(prompts)
    for t, rows in enumerate(members.values()):
        n = min(common_prefix_length([prompts[i] for i in rows]),
                min(len(prompts[i]) for i in rows) - 1)
        shared.append(prompts[rows[0]][: max(n, 0)])
        for i in rows:
            tail_of[i] = t
    n = common_prefix_length(shared)
    return PrefixPlan(
        system=shared[0][:n] if shared else [],
        tails=[s[n:] for s in shared],
        tail_of=tail_of,
        branches=[p[len(shared[t]) :] for p, t in zip(prompts, tail_of, strict=True)],
    )


def batches_by_tail(plan: PrefixPlan, batch_size: int) -> list[list[int]]:
    """Prompt indices in batches of at most `batch_size`, a tail's questions kept together where
    they fit; tails sorted longest first so a batch's tails have similar lengths (less padding)."""
    members: dict[int, list[int]] = {}
    for i, t in enumerate(plan.tail_of):
        members.setdefault(t, []).append(i)
    order = sorted(members, key=lambda t: -len(plan.tails[t]))
    batches: list[list[int]] = []
    current: list[int] = []
    for t in order:
        rows = members[t]
        if current and len(current) + len(rows) > batch_size:
            batches.append(current)
            current = []
        while len(rows) > batch_size:  # one context asked more than a batch of questions
            batches.append(rows[:batch_size])
            rows = rows[batch_size:]
        current = current + rows
    if current:
        batches.append(current)
    return batches


def _cache(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=layers)


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _buffer_layer_class():
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """A cache layer that writes into a preallocated buffer. `DynamicLayer` concatenates,
        copying the whole cache at every step: on this CPU that copy cost more than the step's
        matrix products."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
            super().__init__()
            self.buffers = (keys, values)
            self.keys, self.values = keys[:, :, :length], values[:, :, :length]
            self.device = keys.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            start, stop = self.keys.shape[-2], self.keys.shape[-2] + key_states.shape[-2]
            keys, values = self.buffers
            keys[:, :, start:stop] = key_states
            values[:, :, start:stop] = value_states
            self.keys, self.values = keys[:, :, :stop], values[:, :, :stop]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            length = self.keys.shape[-2]
            self.buffers = tuple(b[indices] for b in self.buffers)
            self.keys, self.values = (b[:, :, :length] for b in self.buffers)

    return BufferLayer


def buffer_cache(layers, rows: torch.Tensor, capacity: int):
    """A cache holding `rows` of `layers` (a gather: several rows may share one tail), with
    room for `capacity` positions in all."""
    from transformers.cache_utils import Cache

    if not layers:  # nothing shared (no prompt has a prefix): start empty
        return _cache([])

    layer_class = _buffer_layer_class()
    out = []
    for keys, values in layers:
        shape = (len(rows), keys.shape[1], capacity, keys.shape[3])
        buffers = keys.new_empty(shape), values.new_empty(shape)
        buffers[0][:, :, : keys.shape[2]] = keys[rows]
        buffers[1][:, :, : keys.shape[2]] = values[rows]
        out.append(layer_class(*buffers, keys.shape[2]))
    return Cache(layers=out)


def pad_rows(rows: list[list[int]], left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (padded with 0: padding is never attended) and the 0/1 mask of real tokens."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


class SharedPrefixGenerator:
    """Greedy decoding of many prompts that share prefixes; `generate` returns new ids per prompt,
    cut before the first stop id."""

    def __init__(self, model, stop_ids: list[int], max_new_tokens: int, batch_size: int):
        from squadtune.architectures import layer_windows

        self.model = model
        self.stops = torch.tensor(stop_ids)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.windows = layer_windows(model.config)
        probe = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.dtype = model.get_input_embeddings()(probe).dtype  # the hidden states' dtype

    def _forward(self, ids, mask, key_positions, cache):
        """One forward of `ids` on `cache`. `mask` (0/1) and `key_positions` cover every key,
        the new ids last; a query sees the real keys at or before its own position."""
        from squadtune.architectures import attention_masks

        queries = ids.shape[1]
        positions = key_positions[:, -queries:]
        allowed = mask.bool()[:, None, :] & (key_positions[:, None, :] <= positions[:, :, None])
        # A padding query sees itself, so no softmax row is empty (NaN would reach real rows).
        allowed[:, :, -queries:] |= torch.eye(queries, dtype=torch.bool, device=self.device)
        out = self.model(
            input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1,
            attention_mask=attention_masks(allowed, positions, key_positions, self.windows,
                                           self.dtype),
        )
        return out.logits[:, -1], out.cache

    def _prefill_system(self, system: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not system:
            return []
        ids = torch.tensor([system], device=self.device)
        positions = torch.arange(len(system), device=self.device)[None]
        return _layers(self._forward(ids, torch.ones_like(ids), positions, _cache([]))[1])

    def _prefill_tails(self, system_layers, p0: int, tails: list[list[int]]):
        """The tails' caches (system included), right-padded, their 0/1 masks and positions."""
        n = len(tails)
        width = max(len(t) for t in tails)
        key_positions = torch.arange(p0 + width, device=self.device)[None].expand(n, -1)
        if width == 0:
            expanded = [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in
                        system_layers]
            return (expanded, torch.ones(n, p0, dtype=torch.long, device=self.device),
                    key_positions)
        ids, tail_mask = pad_rows(tails, left=False, device=self.device)
        mask = torch.cat([torch.ones(n, p0, dtype=torch.long, device=self.device), tail_mask], 1)
        layers = [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in system_layers]
        cache = self._forward(ids, mask, key_positions, _cache(layers))[1]
        return _layers(cache), mask, key_positions

    def _decode(self, logits, cache, mask, key_positions):
        """Greedy steps until every row has stopped or `max_new_tokens` ids are out."""
        rows = torch.arange(logits.shape[0])
        out: list[list[int]] = [[] for _ in rows]
        for step in range(self.max_new_tokens):
            token = logits.argmax(-1)
            for row, t in zip(rows.tolist(), token.tolist(), strict=True):
                out[row].append(t)
            running = ~torch.isin(token.cpu(), self.stops)
            if step == self.max_new_tokens - 1 or not running.any():
                break
            if not running.all():  # finished rows leave the batch: later steps cost less
                keep = running.nonzero().squeeze(1)
                rows, token = rows[keep], token[keep]
                keep = keep.to(self.device)
                mask, key_positions = mask[keep], key_positions[keep]
                cache.batch_select_indices(keep)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            key_positions = torch.cat([key_positions, key_positions[:, -1:] + 1], 1)
            logits, cache = self._forward(token[:, None], mask, key_positions, cache)
        return out

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], groups: Sequence[Hashable], progress: bool = False
    ) -> list[list[int]]:
        """New ids per prompt; `groups` (one key per prompt, e.g. its context) says which
        prompts are expected to share more than the system turns."""
        from tqdm.auto import tqdm

        plan = plan_prefixes(prompts, groups)
        p0 = len(plan.system)
        system_layers = self._prefill_system(plan.system)
        answers: list[list[int]] = [[] for _ in prompts]
        batches = batches_by_tail(plan, self.batch_size)
        for batch in tqdm(batches, desc="generating", disable=not progress):
            tails = list(dict.fromkeys(plan.tail_of[i] for i in batch))
            tail_layers, tail_mask, tail_positions = self._prefill_tails(
                system_layers, p0, [plan.tails[t] for t in tails]
            )
            slot = torch.tensor([tails.index(plan.tail_of[i]) for i in batch], device=self.device)
            ids, branch_mask = pad_rows([plan.branches[i] for i in batch], left=True,
                                        device=self.device)
            start = p0 + torch.tensor([len(plan.tails[plan.tail_of[i]]) for i in batch],
                                      device=self.device)
            # Left padding: a branch's last id sits in the last column; its real ids count up
            # from the end of its own tail.
            pad = ids.shape[1] - branch_mask.sum(1)
            positions = (start - pad)[:, None] + torch.arange(ids.shape[1], device=self.device)
            positions = positions.clamp(min=0)
            mask = torch.cat([tail_mask[slot], branch_mask], 1)
            key_positions = torch.cat([tail_positions[slot], positions], 1)
            capacity = mask.shape[1] + self.max_new_tokens
            logits, cache = self._forward(
                ids, mask, key_positions, buffer_cache(tail_layers, slot, capacity)
            )
            new = self._decode(logits, cache, mask, key_positions)
            for i, ids_out in zip(batch, new, strict=True):
                cut = next((k for k, t in enumerate(ids_out) if t in self.stops), len(ids_out))
                answers[i] = ids_out[:cut]
        return answers
