"""Continuous batching with shared prefixes for the hf backend (``inference.scheduler: continuous``).

Why not the library's: transformers 5.23 ships ``generate_batch`` (continuous batching over a
paged cache with prefix sharing). It gave token-identical greedy output with a PEFT adapter
loaded on CPU, but it failed the per-item sampling test: the same prompt sampled alone and
within a batch of four gave different tokens ([365, 2772, ...] vs [36281, 365, ...]), because
its sampler is one ``torch.multinomial`` over the whole batch from the global RNG, and its
requests take no seed or per-row logits processor. It was also 4x slower than ``generate()``
on that CPU probe (12.4 s vs 3.0 s for four prompts, warm-up off). Hence this scheduler.

How it works:

- Rows (prompt i, sample k) wait in longest-prompt-first order and occupy ``batch_size``
  slots of one preallocated KV buffer per layer. Every slot writes its next token at the same
  column, so a decode step is one forward of [slots, 1]; each row's own columns are marked in
  a [slots, columns] mask and its RoPE positions are its own count of real tokens, so left
  padding and the holes between shared-prefix segments change nothing a row attends to.
- A finished row frees its slot at once and the next waiting prompt's rows are prefilled and
  written into free slots, so no slot decodes padding while others wait. Slots are only
  compacted once nothing waits and a quarter of them are free.
- Prefixes: a prompt is prefilled once for its n samples; the longest token prefix common to
  every prompt of the call (system prompt and chat header) is prefilled once; prompts sharing
  a longer prefix among themselves (the same question's verifier or refiner prompts) get that
  group prefix prefilled once, and each prompt then encodes only its remainder on top.
- Sampling per row exactly as the static path's ``RowSampler`` (``sampler.sample_rows``): one
  ``torch.Generator`` per row seeded ``seeds[i] + k``, one uniform draw per generated token.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, TemperatureLogitsWarper, TopPLogitsWarper
from transformers.cache_utils import Cache, DynamicLayer

from malt_ops.backends.sampler import sample_rows

MIN_SHARED = 8
"""Shortest prefix worth a forward of its own: below it the extra call costs more than it saves."""


@dataclass
class Prefix:
    """An encoded token prefix: per-layer keys/values [heads, width, dim] and which of the
    width columns hold real tokens (the rest are padding or holes)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    length: int
    """Real tokens (the position of the next token)."""

    @property
    def width(self) -> int:
        return int(self.mask.shape[0])


class _BufferLayer(DynamicLayer):
    """One layer's KV over columns [lo, end) of a preallocated buffer; appends write in place.

    DynamicLayer concatenates the whole cache on every token (a copy of every row's keys and
    values per decode step); here a step writes one column.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, lo: int, end: int) -> None:
        super().__init__()
        self.buf_k, self.buf_v, self.lo, self.end = keys, values, lo, end
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.keys, self.values = keys[:, :, lo:end], values[:, :, lo:end]

    def update(self, key_states, value_states, *args, **kwargs):
        count = key_states.shape[-2]
        self.buf_k[:, :, self.end : self.end + count] = key_states
        self.buf_v[:, :, self.end : self.end + count] = value_states
        self.end += count
        self.keys = self.buf_k[:, :, self.lo : self.end]
        self.values = self.buf_v[:, :, self.lo : self.end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.end - self.lo


def _buffer_cache(keys: list, values: list, lo: int, end: int) -> DynamicCache:
    cache = DynamicCache.__new__(DynamicCache)
    Cache.__init__(
        cache, layers=[_BufferLayer(k, v, lo, end) for k, v in zip(keys, values, strict=True)]
    )
    return cache


def common_prefix(first: list[int], second: list[int]) -> int:
    size = min(len(first), len(second))
    for index in range(size):
        if first[index] != second[index]:
            return index
    return size


@dataclass
class Stats:
    encoded_tokens: int = 0
    """Prompt tokens run through the model (each shared prefix once, no padding)."""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    slot_steps: int = 0
    """Rows computed over all decode steps (free slots included)."""


@dataclass
class _Row:
    prompt: int
    sample: int
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)


class ContinuousScheduler:
    """One generate call: ``run()`` returns the new tokens of every (prompt, sample) row."""

    def __init__(
        self,
        model,
        prompts: list[list[int]],
        n: int,
        seeds: list[int],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop_ids: set[int],
        pad_id: int,
        slots: int,
        on_row_done=None,
    ) -> None:
        self.model, self.prompts, self.n = model, prompts, n
        self.seeds, self.max_new = seeds, max_new_tokens
        self.stop_ids, self.pad_id = stop_ids, pad_id
        self.warpers = []
        if temperature > 0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
            if top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p))
        self.sampling = temperature > 0
        self.slots = max(n, min(slots, len(prompts) * n))
        self.on_row_done = on_row_done or (lambda: None)
        self.stats = Stats()
        self.param = next(model.parameters())

    # ------------------------------------------------------------------ prefixes

    def _plan_prefixes(self) -> None:
        """Global and per-group prefix lengths; each stays below its prompts' own lengths,
        since every prompt must run at least its last token to get its next-token logits."""
        distinct = self.prompts
        shortest = min(len(p) for p in distinct)
        shared = shortest - 1
        for prompt in distinct[1:]:
            shared = min(shared, common_prefix(distinct[0], prompt))
        self.global_len = shared if len(distinct) > 1 and shared >= MIN_SHARED else 0
        # Groups: runs of prompts, in token order, that share MIN_SHARED tokens more.
        order = sorted(range(len(distinct)), key=lambda i: distinct[i])
        self.group_of: dict[int, int] = {}
        self.group_len: list[int] = []
        self.group_left: list[int] = []
        run: list[int] = []

        def close(members: list[int]) -> None:
            if not members:
                return
            length = min(len(distinct[i]) for i in members) - 1
            for other in members[1:]:
                length = min(length, common_prefix(distinct[members[0]], distinct[other]))
            if len(members) < 2 or length < self.global_len + MIN_SHARED:
                length = self.global_len
            for i in members:
                self.group_of[i] = len(self.group_len)
            self.group_len.append(length)
            self.group_left.append(len(members))

        for index in order:
            if run and (
                common_prefix(distinct[run[0]], distinct[index]) < self.global_len + MIN_SHARED
            ):
                close(run)
                run = []
            run.append(index)
        close(run)
        self.group_prefix: dict[int, Prefix] = {}

    def _extend(
        self, contexts: list[Prefix | None], segments: list[list[int]]
    ) -> tuple[list[Prefix], torch.Tensor]:
        """Encode each segment after its context (None: from scratch), all in one forward.

        Returns each item's new prefix and its last token's logits [items, vocab]."""
        started = time.perf_counter()
        device, dtype = self.param.device, self.param.dtype
        items = len(segments)
        width = max((c.width for c in contexts if c is not None), default=0)
        seg = max(len(s) for s in segments)
        ref = next((c for c in contexts if c is not None), None)
        layers = len(ref.keys) if ref else self.model.config.get_text_config().num_hidden_layers
        if ref is not None:
            heads, dim = ref.keys[0].shape[0], ref.keys[0].shape[-1]
        else:
            config = self.model.config.get_text_config()
            heads = config.num_key_value_heads
            dim = (
                getattr(config, "head_dim", None)
                or config.hidden_size // config.num_attention_heads
            )
        keys = [
            torch.zeros(items, heads, width + seg, dim, dtype=dtype, device=device)
            for _ in range(layers)
        ]
        values = [torch.zeros_like(k) for k in keys]
        mask = torch.zeros(items, width + seg, dtype=torch.bool, device=device)
        ids = torch.full((items, seg), self.pad_id, dtype=torch.long, device=device)
        positions = torch.zeros(items, seg, dtype=torch.long, device=device)
        for row, (context, tokens) in enumerate(zip(contexts, segments, strict=True)):
            if context is not None:
                offset = width - context.width
                for layer in range(layers):
                    keys[layer][row, :, offset:width] = context.keys[layer]
                    values[layer][row, :, offset:width] = context.values[layer]
                mask[row, offset:width] = context.mask
            start = context.length if context is not None else 0
            ids[row, seg - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
            mask[row, width + seg - len(tokens) :] = True
            positions[row, seg - len(tokens) :] = torch.arange(start, start + len(tokens))
        cache = _buffer_cache(keys, values, 0, width)
        output = self.model(
            input_ids=ids,
            attention_mask=mask.long(),
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        prefixes = [
            Prefix(
                [k[row] for k in keys],
                [v[row] for v in values],
                mask[row],
                (context.length if context is not None else 0) + len(tokens),
            )
            for row, (context, tokens) in enumerate(zip(contexts, segments, strict=True))
        ]
        self.stats.encoded_tokens += sum(len(s) for s in segments)
        self.stats.prefill_seconds += time.perf_counter() - started
        return prefixes, output.logits[:, -1, :].float()

    def _prefill(self, prompt_ids: list[int]) -> tuple[list[Prefix], torch.Tensor]:
        """Prompts' full prefixes and last-token logits, reusing global and group prefixes."""
        if self.global_len and self.global_prefix is None:
            (self.global_prefix,), _ = self._extend([None], [self.prompts[0][: self.global_len]])
        fresh = sorted(
            {self.group_of[i] for i in prompt_ids}
            - set(self.group_prefix)
            - {g for g, length in enumerate(self.group_len) if length == self.global_len}
        )
        if fresh:
            first = {}
            for i in prompt_ids:
                first.setdefault(self.group_of[i], i)
            made, _ = self._extend(
                [self.global_prefix] * len(fresh),
                [self.prompts[first[g]][self.global_len : self.group_len[g]] for g in fresh],
            )
            self.group_prefix.update(zip(fresh, made, strict=True))
        contexts, segments = [], []
        for i in prompt_ids:
            group = self.group_of[i]
            contexts.append(self.group_prefix.get(group, self.global_prefix))
            segments.append(self.prompts[i][self.group_len[group] :])
        prefixes, logits = self._extend(contexts, segments)
        for i in prompt_ids:  # a group prefix is kept only while prompts of it still wait
            group = self.group_of[i]
            self.group_left[group] -= 1
            if self.group_left[group] == 0:
                self.group_prefix.pop(group, None)
        return prefixes, logits

    # ------------------------------------------------------------------ sampling

    def _pick(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        if not self.sampling:
            return logits.argmax(-1).tolist()
        scores = logits
        for warper in self.warpers:
            scores = warper(None, scores)
        return sample_rows(scores, [r.generator for r in rows]).tolist()

    # ------------------------------------------------------------------ the slot buffer

    def _realloc(self, keep: list[int], left: int, right: int) -> None:
        """Rebuild the buffer with only slots ``keep``, ``left`` free columns before the ones
        its live rows use and ``right`` after them (one copy; only on compaction or growth)."""
        live = [self.start[i] for i in keep if self.rows[i] is not None]
        source = min(live, default=self.end)
        used = self.end - source
        capacity = left + used + right
        keys, values = [], []
        index = torch.tensor(keep, dtype=torch.long)
        for k, v in zip(self.k, self.v, strict=True):
            nk = k.new_zeros(len(keep), k.shape[1], capacity, k.shape[3])
            nv = torch.zeros_like(nk)
            nk[:, :, left : left + used] = k[index, :, source : self.end]
            nv[:, :, left : left + used] = v[index, :, source : self.end]
            keys.append(nk)
            values.append(nv)
        mask = self.mask.new_zeros(len(keep), capacity)
        mask[:, left : left + used] = self.mask[index, source : self.end]
        self.k, self.v, self.mask = keys, values, mask
        self.rows = [self.rows[i] for i in keep]
        self.positions = self.positions[index]
        self.last = self.last[index]
        self.start = [max(left, self.start[i] - source + left) for i in keep]
        self.lo, self.end = left, left + used

    def _update_lo(self) -> None:
        """Columns left of every live row's first one are skipped by the next forward."""
        live = [self.start[s] for s, r in enumerate(self.rows) if r is not None]
        self.lo = min(live, default=self.end)

    def _place(self, slot: int, prefix: Prefix) -> None:
        """Write a prefilled row into ``slot`` so that its columns end at ``end``."""
        if prefix.width > self.end:
            live = [self.start[s] for s, r in enumerate(self.rows) if r is not None and s != slot]
            used = self.end - min(live, default=self.end)
            self._realloc(
                list(range(len(self.rows))), max(0, prefix.width - used), self.max_new + 64
            )
        begin = self.end - prefix.width
        for layer, (k, v) in enumerate(zip(self.k, self.v, strict=True)):
            k[slot, :, begin : self.end] = prefix.keys[layer]
            v[slot, :, begin : self.end] = prefix.values[layer]
        self.mask[slot] = False
        self.mask[slot, begin : self.end] = prefix.mask
        self.start[slot] = begin
        self._update_lo()

    # ------------------------------------------------------------------ the loop

    def run(self) -> list[list[list[int]]]:
        self._plan_prefixes()
        self.global_prefix: Prefix | None = None
        results: list[list[list[int]]] = [[[] for _ in range(self.n)] for _ in self.prompts]
        waiting = deque(sorted(range(len(self.prompts)), key=lambda i: -len(self.prompts[i])))
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.rows: list[_Row | None] = [None] * self.slots
        self.start = [0] * self.slots
        self.lo = self.end = 0
        self.positions = torch.zeros(self.slots, dtype=torch.long)
        self.last = torch.full((self.slots,), self.pad_id, dtype=torch.long)

        def finish(slot: int) -> None:
            row = self.rows[slot]
            results[row.prompt][row.sample] = row.tokens
            self.rows[slot] = None
            self._update_lo()
            self.on_row_done()

        def admit() -> None:
            free = [s for s, r in enumerate(self.rows) if r is None]
            chosen = []
            while waiting and len(free) - len(chosen) * self.n >= self.n:
                chosen.append(waiting.popleft())
            if not chosen:
                return
            prefixes, logits = self._prefill(chosen)
            if not self.k:  # the first admission sizes the buffer
                first_width = max(p.width for p in prefixes)
                capacity = first_width + self.max_new + 64
                ref = prefixes[0]
                self.k = [
                    ref.keys[0].new_zeros(self.slots, k.shape[0], capacity, k.shape[-1])
                    for k in ref.keys
                ]
                self.v = [torch.zeros_like(k) for k in self.k]
                self.mask = torch.zeros(self.slots, capacity, dtype=torch.bool)
                self.lo = self.end = first_width
            for prompt, prefix, row_logits in zip(chosen, prefixes, logits, strict=True):
                rows = [
                    _Row(prompt, k, torch.Generator().manual_seed(self.seeds[prompt] + k))
                    for k in range(self.n)
                ]
                picks = self._pick(row_logits.expand(self.n, -1), rows)
                for row, token in zip(rows, picks, strict=True):
                    slot = next(s for s, r in enumerate(self.rows) if r is None)
                    self.rows[slot] = row
                    self._place(slot, prefix)
                    row.tokens.append(token)
                    self.positions[slot] = prefix.length
                    self.last[slot] = token
                    if token in self.stop_ids or len(row.tokens) >= self.max_new:
                        finish(slot)

        admit()
        while any(r is not None for r in self.rows) or waiting:
            if not any(r is not None for r in self.rows):
                admit()
                continue
            active = [s for s, r in enumerate(self.rows) if r is not None]
            if not waiting and len(self.rows) - len(active) >= max(1, len(self.rows) // 4):
                # Nothing left to refill with: drop the free slots rather than decode them.
                self._realloc(active, 0, self.max_new + 1)
            if self.end >= self.k[0].shape[2]:
                self._realloc(list(range(len(self.rows))), 0, self.max_new + 64)
            started = time.perf_counter()
            self.mask[:, self.end] = True
            cache = _buffer_cache(self.k, self.v, self.lo, self.end)
            output = self.model(
                input_ids=self.last[:, None],
                attention_mask=self.mask[:, self.lo : self.end + 1].long(),
                position_ids=self.positions[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            self.end += 1
            logits = output.logits[:, -1, :].float()
            live = [s for s in range(len(self.rows)) if self.rows[s] is not None]
            picks = self._pick(logits[live], [self.rows[s] for s in live])
            self.stats.decode_steps += 1
            self.stats.slot_steps += len(self.rows)
            for slot, token in zip(live, picks, strict=True):
                row = self.rows[slot]
                row.tokens.append(token)
                self.positions[slot] += 1
                self.last[slot] = token
                if token in self.stop_ids or len(row.tokens) >= self.max_new:
                    finish(slot)
            self.stats.decode_seconds += time.perf_counter() - started
            if waiting and any(r is None for r in self.rows):
                admit()
        return results
