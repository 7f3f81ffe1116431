"""The LLM engine: requests join and leave a running batch between steps (in-flight batching).

One `step()` = the scheduler picks work (one token for every decoding sequence, then prompt chunks
of newly admitted sequences within a token budget), the model runs it as one batch, and each
sequence that reached the end of its input samples a token. `add_request` and `abort` are safe to
call from other threads while a loop thread calls `step()` (engine/llm/runner.py runs that loop).

A failure that belongs to one sequence — its prompt table, its KV-cache allocation, its sampling —
finishes that sequence with an "error" event; the others in the step go on. When a batched forward
fails, each sequence of it runs alone (rewriting the same cache positions) to find the failing one.

Prefix reuse (engine/llm/prefix_cache.py): at admission the longest cached block prefix of the prompt
is copied into the new sequence's cache and its prefill starts after it (at least one prompt token is
always computed, for the logits); once a prompt is fully prefilled its full blocks are stored. An
aborted or failed sequence stores nothing it had not completed.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.llm.model import DecoderLM, KVCache, SequenceInput
from engine.llm.prefix_cache import DEFAULT_PREFIX_CACHE_BYTES, PrefixCache, block_hashes
from engine.llm.sampling import Sampler
from engine.sampling_params import SamplingParams, check_context

if TYPE_CHECKING:
    from engine.llm.guided import GuideCompiler, GuideMatcher


@dataclass(frozen=True, slots=True)
class TokenEvent:
    request_id: str
    token_id: int | None  # None when the step produced no visible token (stop token, abort)
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    error: str | None = None  # what went wrong, when finish_reason == "error"
    logprob: float | None = None  # the token's log probability, when the request asked (logprobs)
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (id, log probability), most likely first


@dataclass(slots=True, eq=False)
class _Sequence:
    request_id: str
    token_ids: torch.Tensor  # int64 [L]: the prompt
    prompt_table: torch.Tensor | None  # [P, H]
    params: SamplingParams
    sampler: Sampler
    stop_ids: frozenset[int]
    max_new_tokens: int  # params.max_new_tokens clamped to the context length
    block_hashes: list[bytes]  # chained hashes of the prompt's full blocks (engine/llm/prefix_cache.py)
    cache: KVCache | None = None
    num_cached: int = 0  # prompt tokens already run through the model
    generated: list[int] = field(default_factory=list)
    aborted: bool = False
    guide: GuideMatcher | None = None  # structured output (engine/llm/guided.py)


class LLMEngine:
    def __init__(
        self,
        model: DecoderLM,
        stop_token_id: int,
        max_batch_size: int = 8,
        max_num_tokens: int = 2048,
        max_seq_len: int | None = None,  # prompt + reply; default and upper bound: the model's positions
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,  # K/V kept for prefix reuse; 0: off
        guides: GuideCompiler | None = None,  # for requests with a guide_type; None: such requests are refused
    ):
        self.model = model
        self.vocab_size = model.config.vocab_size
        positions = model.config.max_position_embeddings
        self.max_seq_len = positions if max_seq_len is None else min(max_seq_len, positions)
        self.stop_token_id = stop_token_id
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens  # tokens per step: bounds how long a prefill stalls decodes
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._lock = threading.Lock()
        self.last_batch_size = 0  # sequences in the most recent step (observability)
        self.last_step_prefilled = False  # whether it computed prompt tokens (else all decoded one token)
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.prefix_hit_tokens = 0  # prompt tokens taken from the prefix cache instead of computed, since start
        self.guides = guides

    def add_request(
        self,
        request_id: str,
        input_ids: np.ndarray,  # int32 [L]; ids ≥ vocab_size index prompt_table rows
        prompt_table: np.ndarray | None,  # float32 [P, H]
        params: SamplingParams,
        table_keys: Sequence[tuple[str, int]] | None = None,  # (content key, rows) per image over the table's rows
    ) -> None:
        """table_keys None: no reuse across a prompt-table id (prefix_cache.py)."""
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.int64)
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError("input_ids must be a non-empty 1-D sequence")
        max_new_tokens = check_context(len(ids), params.max_new_tokens, self.max_seq_len, "max_new_tokens")
        if int(ids.min()) < 0:
            raise ValueError("input_ids must be ≥ 0")
        table = None
        if prompt_table is not None and len(prompt_table):
            table = torch.as_tensor(np.asarray(prompt_table))
            if table.ndim != 2 or table.shape[1] != self.model.config.hidden_size:
                raise ValueError(
                    f"prompt_table must be [P, {self.model.config.hidden_size}], got {list(table.shape)}"
                )
        for name, token_ids in (("stop token id", params.stop_token_ids), ("stop sequence id", _flat(params.stop_sequences))):
            outside = [t for t in token_ids if not 0 <= t < self.vocab_size]
            if outside:
                raise ValueError(f"{name} {outside[0]} is not in the vocabulary [0, {self.vocab_size})")
        fake_rows = ids[ids >= self.vocab_size] - self.vocab_size
        if len(fake_rows) and (table is None or int(fake_rows.max()) >= len(table)):
            rows = 0 if table is None else len(table)
            raise ValueError(
                f"input_ids reference prompt-table row {int(fake_rows.max())} but the prompt table has {rows} rows"
            )
        hashes = block_hashes(ids, self.vocab_size, table_keys, 0 if table is None else len(table))
        stop_ids = frozenset((self.stop_token_id, *params.stop_token_ids))
        guide = None
        if params.guide_type is not None:  # compiled here, on the caller's thread: the batch does not wait
            if self.guides is None:
                raise ValueError("guided decoding needs the tokenizer's vocabulary; this engine was made without it")
            guide = self.guides.matcher(params.guide_type, params.guide, sorted(stop_ids))
        seq = _Sequence(
            request_id=request_id,
            token_ids=ids,
            prompt_table=table,
            params=params,
            sampler=Sampler(params, ids, self.vocab_size),
            stop_ids=stop_ids,
            max_new_tokens=max_new_tokens,
            block_hashes=hashes,
            guide=guide,
        )
        with self._lock:
            if any(s.request_id == request_id for s in self._live()):
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        """Marks the live request with this id; it finishes with "abort" at the next step. An id that
        is not in flight (finished, or never added) is ignored: -> False."""
        with self._lock:
            for seq in self._live():
                if seq.request_id == request_id:
                    seq.aborted = True
                    return True
        return False

    def fail_running(self, error: str) -> list[TokenEvent]:
        """Finishes every running sequence with an error, without scheduling anything: the recovery
        when a step failed as a whole. Waiting requests (e.g. added meanwhile) are left to run."""
        with self._lock:
            failed, self._running = self._running, []
        for seq in failed:
            seq.cache = None
        return [TokenEvent(s.request_id, None, "error", error) for s in failed]

    def live_ids(self) -> list[str]:
        """Requests waiting or running."""
        with self._lock:
            return [s.request_id for s in self._live()]

    def _live(self):
        return (*self._waiting, *self._running)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running)

    def step(self) -> list[TokenEvent]:
        events = self._retire_aborted()
        batch = self._schedule(events)
        self.last_batch_size = len(batch)
        self.last_step_prefilled = any(seq.num_cached < len(seq.token_ids) for seq, _ in batch)
        if not batch:
            return events
        inputs = []
        for seq, n in batch:
            if seq.num_cached < len(seq.token_ids):  # prefill chunk
                tokens = seq.token_ids[seq.num_cached : seq.num_cached + n]
                inputs.append(SequenceInput(tokens, seq.num_cached, seq.cache, seq.prompt_table))
            else:  # decode: feed the last sampled token
                tokens = torch.tensor([seq.generated[-1]])
                inputs.append(SequenceInput(tokens, len(seq.token_ids) + len(seq.generated) - 1, seq.cache, None))
        for (seq, n), row in zip(batch, self._forward(inputs)):
            if isinstance(row, Exception):
                events.append(self._fail(seq, row))
                continue
            if seq.num_cached < len(seq.token_ids):
                seq.num_cached += n
                if seq.num_cached < len(seq.token_ids):
                    continue  # more prompt chunks to go
                try:
                    self.prefix_cache.store(seq.block_hashes, seq.cache)
                except Exception as error:  # noqa: BLE001 — e.g. the pool's allocation; loud, for this request alone
                    events.append(self._fail(seq, error))
                    continue
            events.append(self._sample(seq, row))
        return events

    def _forward(self, inputs: list[SequenceInput]) -> list[torch.Tensor | Exception]:
        """-> logits [V] per sequence, or the error that sequence raised when run alone."""
        try:
            return list(self.model.forward(inputs))
        except Exception as error:  # noqa: BLE001 — find which sequence it belongs to
            if len(inputs) == 1:
                return [error]
        rows = []
        for one in inputs:
            try:
                rows.append(self.model.forward([one])[0])
            except Exception as error:  # noqa: BLE001
                rows.append(error)
        return rows

    def _sample(self, seq: _Sequence, logits: torch.Tensor) -> TokenEvent:
        try:
            return self._next_token(seq, logits)
        except Exception as error:  # noqa: BLE001 — this sequence fails alone
            return self._fail(seq, error)

    def _next_token(self, seq: _Sequence, logits: torch.Tensor) -> TokenEvent:
        # logprobs are the model's own distribution: taken before min_new_tokens, the guide and sampling
        logprobs = torch.log_softmax(logits.float(), -1) if seq.params.logprobs else None
        if len(seq.generated) < seq.params.min_new_tokens:
            # as transformers' MinNewTokensLengthLogitsProcessor: stop ids cannot win
            logits = logits.index_fill(0, torch.tensor(sorted(seq.stop_ids)), float("-inf"))
        if seq.guide is not None:
            logits = seq.guide.mask_(logits.clone())
        token = seq.sampler(logits)
        if seq.guide is not None:
            seq.guide.accept(token)
        if token in seq.stop_ids:
            self._finish(seq)
            return TokenEvent(seq.request_id, None, "stop")
        seq.generated.append(token)
        scores = {} if logprobs is None else _scores(logprobs, token, seq.params.top_logprobs)
        # checked after appending: a stop sequence completed by token number min_new_tokens ends it
        if len(seq.generated) >= seq.params.min_new_tokens and any(
            seq.generated[-len(stop) :] == list(stop) for stop in seq.params.stop_sequences
        ):
            self._finish(seq)
            return TokenEvent(seq.request_id, token, "stop", **scores)
        if len(seq.generated) >= seq.max_new_tokens:
            self._finish(seq)
            return TokenEvent(seq.request_id, token, "length", **scores)
        return TokenEvent(seq.request_id, token, None, **scores)

    def _fail(self, seq: _Sequence, error: Exception) -> TokenEvent:
        self._finish(seq)
        return TokenEvent(seq.request_id, None, "error", describe(error))

    def _finish(self, seq: _Sequence) -> None:
        with self._lock:
            if seq in self._running:
                self._running.remove(seq)
        seq.cache = None

    def _retire_aborted(self) -> list[TokenEvent]:
        with self._lock:
            gone = [s for s in self._live() if s.aborted]
            if not gone:
                return []
            self._waiting = deque(s for s in self._waiting if not s.aborted)
            self._running = [s for s in self._running if not s.aborted]
        for seq in gone:
            seq.cache = None
        return [TokenEvent(s.request_id, None, "abort") for s in gone]

    def _schedule(self, events: list[TokenEvent]) -> list[tuple[_Sequence, int]]:
        """Decodes first (one token each), then prompt chunks, oldest first, within the token budget.
        A sequence whose KV cache cannot be allocated fails with an event added to `events`."""
        admitted = []
        with self._lock:
            while self._waiting and len(self._running) < self.max_batch_size:
                seq = self._waiting.popleft()
                try:
                    seq.cache = self.model.new_cache(len(seq.token_ids) + seq.max_new_tokens)
                except Exception as error:  # noqa: BLE001 — e.g. MemoryError, for this request alone
                    events.append(TokenEvent(seq.request_id, None, "error", describe(error)))
                    continue
                self._running.append(seq)
                admitted.append(seq)
        for seq in admitted:  # outside the lock: add_request is not held up by the copies
            try:
                seq.num_cached = self.prefix_cache.load(seq.block_hashes, seq.cache, len(seq.token_ids) - 1)
            except Exception as error:  # noqa: BLE001 — for this request alone
                events.append(self._fail(seq, error))
                continue
            self.prefix_hit_tokens += seq.num_cached
        with self._lock:
            running = list(self._running)
        batch = [(s, 1) for s in running if s.num_cached == len(s.token_ids)]
        budget = max(self.max_num_tokens - len(batch), 1)
        for seq in running:
            remaining = len(seq.token_ids) - seq.num_cached
            if remaining and budget > 0:
                n = min(remaining, budget)
                batch.append((seq, n))
                budget -= n
        return batch


def describe(error: Exception) -> str:
    """An error as one line for the request it ended: its type and message."""
    return f"{type(error).__name__}: {error}"


def _scores(logprobs: torch.Tensor, token: int, top: int) -> dict:
    # logprobs: [V] log_softmax of the step's logits -> TokenEvent's logprob / top_logprobs fields
    best = torch.topk(logprobs, top) if top else None
    pairs = () if best is None else tuple(zip(best.indices.tolist(), best.values.tolist()))
    return {"logprob": float(logprobs[token]), "top_logprobs": pairs}


def _flat(sequences: tuple[tuple[int, ...], ...]) -> list[int]:
    return [t for seq in sequences for t in seq]
