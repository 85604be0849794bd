"""The inference engine: continuous batching of many requests over one model, on a background
thread.

Each step spends a token budget (`step_tokens`): first one token for every running sequence
(more with a speculative draft), then prefill chunks of waiting requests in arrival order, so a
long prompt is cut into chunks and never stalls the others (vLLM V1's scheduler: a request just
has tokens computed and tokens to compute). Requests join and leave between steps. Every
sequence owns one slot of a preallocated KV cache (model/slots.py); a finished sequence's slot
keeps its keys and values, and a new prompt starting with tokens some slot holds starts from
there (the prefix cache: a shared system prompt, a regenerated answer). `generation.generate_ids`
is the single-sequence reference this is tested against.

Does not parse HTTP, render chats or count time; the server (serve/server.py) does.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import torch

from candorlm.errors import CandorError
from candorlm.model.slots import Segment, SlotCache, SlotModel
from candorlm.serve.handle import RequestHandle, TokenEvent
from candorlm.serve.sampling import SamplingParams, SequenceSampler
from candorlm.serve.speculative import propose
from candorlm.serve.text import TextStream

__all__ = ["Engine", "RequestHandle", "TokenEvent", "SamplingParams"]


@dataclass(eq=False)
class _Seq:
    index: int
    tokens: list[int]  # prompt and generated
    sampler: SequenceSampler
    text: TextStream
    slot: int = -1
    computed: int = 0  # positions [0, computed) of `tokens` are in the slot's cache
    generated: int = 0
    done: bool = False


@dataclass(eq=False)
class _Request:
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    stop_ids: set[int]
    seqs: list[_Seq] = field(default_factory=list)
    started: bool = False  # prefill finished, sequences decoding


def _rows(seg: Segment) -> int:
    """Logits rows the forward pass returns for seg."""
    return {"none": 0, "last": 1, "all": seg.length}[seg.logits]


class Engine:
    """model: a LoadedModel (candorlm.api). max_slots: sequences run at once (a request with
    n > 1 takes n). max_seq_len: positions per slot (default: the model's context).
    step_tokens: tokens computed per step at most (decodes first, then prefill chunks).
    prefix_cache: reuse cached prompt prefixes. speculative: prompt-lookup draft length for
    greedy requests (0: off); the output is the same, fewer steps when the text repeats.
    dtype: "float32" or "bfloat16" weights and KV cache (default: the model's); bfloat16 reads
    half the bytes per token (fast where the CPU has AVX512-BF16 or AMX; see bench/decode.py).
    compile: a lone decode runs as one torch.compile'd graph (~30-40 s to build on the first
    decode; per-step overhead 0.9 -> 0.3 ms on a 4-layer model, 2 Zen4 cores)."""

    def __init__(self, model, *, max_slots: int = 16, max_seq_len: int | None = None, step_tokens: int = 512,
                 prefix_cache: bool = True, speculative: int = 0, dtype: str | None = None,
                 compile: bool = False):
        cfg = model.model.cfg
        limit = cfg.max_seq_len
        max_seq_len = limit if max_seq_len is None else max_seq_len
        if not 1 <= max_slots <= 1024:
            raise CandorError(f"max_slots={max_slots}: accepted: an integer in [1, 1024]")
        if not 2 <= max_seq_len <= limit:
            raise CandorError(f"max_seq_len={max_seq_len}: accepted: an integer in [2, {limit}] (the model's context)")
        if step_tokens < max_slots:
            raise CandorError(f"step_tokens={step_tokens}: accepted: an integer >= max_slots ({max_slots})")
        if not 0 <= speculative <= 16:
            raise CandorError(f"speculative={speculative}: accepted: an integer in [0, 16] (0: off)")
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        if dtype is not None and dtype not in dtypes:
            raise CandorError(f"dtype={dtype!r}: accepted: {', '.join(dtypes)} (default: the model's)")
        self.lm = model
        self.model = model.model.eval()
        self.tokenizer = model.tokenizer
        self.vocab_size = cfg.vocab_size
        self.device = self.model.embed.weight.device
        self.max_slots, self.max_seq_len, self.step_tokens = max_slots, max_seq_len, step_tokens
        self.prefix_cache, self.speculative = prefix_cache, speculative
        self.forward = SlotModel(self.model, dtypes.get(dtype), compile=compile)
        self.cache = SlotCache(cfg, max_slots, max_seq_len, device=self.device, dtype=self.forward.dtype)
        self.eos_ids = set(model.stop_ids)
        self._owner: list[_Seq | None] = [None] * max_slots  # the last sequence in each slot
        self._free: list[int] = list(range(max_slots))  # least recently used first
        self._waiting: list[_Request] = []
        self._running: list[_Request] = []
        self._inbox: list[_Request] = []
        self._cancels: list[RequestHandle] = []
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None  # start()'s thread
        self._loop_thread: threading.Thread | None = None  # the thread stepping now (start()'s or run()'s caller)
        self._done = threading.Event()
        self._stopping = False
        self._ids = itertools.count()
        self._lltok = None
        self._warm = False
        self.counters = dict(prefix_queries=0, prefix_hits=0, prompt_tokens_total=0, generation_tokens_total=0,
                             steps=0, draft_tokens=0, draft_accepted=0)

    # --- public

    def warm(self) -> None:
        """With compile=True, build the compiled step now (so a server is ready when its first
        request comes, instead of stalling it ~30-40 s)."""
        if self.forward._one is not None and not self._warm and not self._running:
            with self._lock:  # a scratch decode in slot 0, whose cached prefix it overwrites
                self.forward([0], [Segment(0, 0, 1)], self.cache)
                self._owner[0] = None
            self._warm = True

    def start(self) -> None:
        """Warm up, then step in a thread of the engine's own. On a CPU the step runs fastest in
        the thread that did the process's other PyTorch work (see `run`)."""
        self.warm()
        if self._thread is None:
            self._stopping = False
            self._done.clear()
            self._thread = threading.Thread(target=self._loop, name="candor-engine", daemon=True)
            self._thread.start()

    def run(self) -> None:
        """Warm up, then step in the calling thread until `stop()` (from any thread).

        On a CPU, PyTorch's intra-op threads are OpenMP's, and each thread that runs parallel
        work has its own team of them. With more of those threads than cores (two teams of 2 on
        2 cores: the one that loaded the model and the engine's), libgomp spins only ~100 times
        before a waiting thread sleeps, so each of a step's ~50 parallel regions pays a wake-up:
        the compiled batch-1 step took 0.9-1.0 ms in the thread that loaded the model and 2.7-3.3
        ms in another (2 Zen4 cores). A server loads the model and steps the engine in one thread
        (serve/server.py); the HTTP side runs no PyTorch work."""
        self.warm()
        self._done.clear()
        self._loop()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        elif self._running_elsewhere():
            self._done.wait(timeout=10)
        for r in self._inbox + self._waiting + self._running:
            r.handle._finish(CandorError("the engine was stopped"))
        self._inbox, self._waiting, self._running = [], [], []

    def _running_elsewhere(self) -> bool:
        return self._loop_thread not in (None, threading.current_thread())

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestHandle:
        params.check()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise CandorError("prompt is empty: give at least one token")
        if len(prompt) >= self.max_seq_len:
            raise CandorError(f"This model's maximum context length is {self.max_seq_len} tokens. However, your "
                              f"prompt has {len(prompt)} tokens, which leaves no room for the completion. "
                              "Please reduce the length of the prompt.")
        bad = [t for t in itertools.chain(prompt, params.logit_bias, params.stop_token_ids)
               if not 0 <= t < self.vocab_size]
        if bad:
            raise CandorError(f"token id {bad[0]} is outside the vocabulary (accepted: 0 .. {self.vocab_size - 1})")
        if params.n > self.max_slots:
            raise CandorError(f"n={params.n}: accepted: at most {self.max_slots} (the engine's slots)")
        handle = RequestHandle(f"req-{next(self._ids)}", len(prompt), params.n, self._cancel)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        req = _Request(handle, prompt, params, stop_ids)
        req.seqs = [_Seq(i, list(prompt), self._sampler(params, prompt, i), TextStream(self.tokenizer, params.stop))
                     for i in range(params.n)]
        with self._lock:
            if self._stopping:
                raise CandorError("the engine is stopped: start() it again to submit requests")
            self._inbox.append(req)
            self._lock.notify_all()
        return handle

    def stats(self) -> dict:
        """running and waiting requests, kv_usage: the share of cache positions held by running
        sequences; prefix_queries / prefix_hits: prompt tokens looked up / found in the cache (vLLM
        counts tokens too); token totals; steps and speculative draft tokens proposed / accepted."""
        running = [r for r in list(self._running) if not r.handle.finished]
        held = sum(s.computed for r in running for s in r.seqs if not s.done)
        return dict(running=len(running), waiting=len(self._waiting) + len(self._inbox),
                    kv_usage=held / (self.max_slots * self.max_seq_len), **self.counters)

    # --- internals

    def _sampler(self, params: SamplingParams, prompt: list[int], index: int) -> SequenceSampler:
        matcher = None
        if params.response_format is not None:
            from candorlm.serve import structured

            grammar = structured.grammar_for(params.response_format)
            if grammar is not None:
                if self._lltok is None:
                    end = self.tokenizer.special_ids["end"]
                    self._lltok = structured.build_tokenizer(self.tokenizer, self.vocab_size, end)
                matcher = structured.GrammarMatcher(self._lltok, grammar, self.vocab_size)
        return SequenceSampler(params, prompt, index, self.vocab_size, self.device, matcher)

    def _cancel(self, handle: RequestHandle) -> None:
        with self._lock:
            self._cancels.append(handle)
            self._lock.notify_all()

    def _loop(self) -> None:
        self._loop_thread = threading.current_thread()
        try:
            self._steps()
        finally:
            self._loop_thread = None
            self._done.set()

    def _steps(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._inbox or self._cancels or self._waiting or self._running):
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - every reader must hear of it, the thread must live
                for r in self._waiting + self._running:
                    self._release(r)
                    r.handle._finish(e)
                self._waiting, self._running = [], []

    def _drop(self, handles: list[RequestHandle]) -> None:
        gone = {id(h) for h in handles}
        for r in [r for r in self._waiting + self._running if id(r.handle) in gone]:
            self._release(r)
            r.handle._finish()
        self._waiting = [r for r in self._waiting if id(r.handle) not in gone]
        self._running = [r for r in self._running if id(r.handle) not in gone]

    def _release(self, r: _Request) -> None:
        for s in r.seqs:
            if s.slot >= 0 and not s.done:
                s.done = True
                self._free.append(s.slot)

    def _match(self, prompt: list[int]) -> tuple[int, int]:
        """(slot, length): the slot holding the longest prefix of `prompt`, at most all but its
        last token (whose logits are needed)."""
        best, best_len = -1, 0
        if not self.prefix_cache:
            return best, best_len
        for slot, seq in enumerate(self._owner):
            if seq is None:
                continue
            n = min(seq.computed, len(prompt) - 1)
            m = 0
            while m < n and seq.tokens[m] == prompt[m]:
                m += 1
            if m > best_len or (m == best_len and m and slot in self._free):
                best, best_len = slot, m
        return best, best_len

    def _admit(self, r: _Request) -> bool:
        """Give r's first sequence a slot, starting after the longest cached prefix."""
        if len(self._free) < r.params.n:
            return False
        src, m = self._match(r.prompt)
        if src in self._free:
            slot = src
        else:
            slot = self._free[0]
            if m:
                self.cache.copy_prefix(src, slot, m)
        self._free.remove(slot)
        seq = r.seqs[0]
        seq.slot, seq.computed = slot, m
        self._owner[slot] = seq
        for s in r.seqs[1:]:  # reserved now, filled with the prompt's keys when its prefill ends
            s.slot = self._free.pop(0)
            self._owner[s.slot] = s
        self.counters["prefix_queries"] += len(r.prompt)
        self.counters["prefix_hits"] += m
        self.counters["prompt_tokens_total"] += len(r.prompt)
        return True

    def step(self) -> None:
        """Take in new requests and cancellations, then run one forward pass: decodes of running
        sequences, then prefill chunks. The engine's thread calls this; a caller that never
        starts the thread may call it itself."""
        with self._lock:
            self._waiting.extend(self._inbox)
            self._inbox = []
            cancels, self._cancels = self._cancels, []
        self._drop(cancels)
        budget = self.step_tokens
        singles, multis = [], []  # (segment, its tokens, request, sequence or None for a prefill)
        for r in self._running:
            for s in r.seqs:
                if s.done:
                    continue
                pos = s.computed
                draft = []
                if self.speculative and r.params.plain:
                    room = min(self.speculative, r.params.max_tokens - s.generated - 1,
                               self.max_seq_len - len(s.tokens), budget - 1)
                    draft = propose(s.tokens, room) if room > 0 else []
                    self.counters["draft_tokens"] += len(draft)
                seg = Segment(s.slot, pos, 1 + len(draft), "all" if draft else "last")
                (multis if draft else singles).append((seg, [s.tokens[-1]] + draft, r, s))
                budget -= seg.length
        admitted = []
        for r in self._waiting:
            if budget <= 0:
                break
            if r.seqs[0].slot < 0 and not self._admit(r):
                break  # arrival order: a later request does not overtake one waiting for slots
            s = r.seqs[0]
            take = min(len(r.prompt) - s.computed, budget)
            last = s.computed + take == len(r.prompt)
            seg = Segment(s.slot, s.computed, take, "last" if last else "none")
            (singles if take == 1 else multis).append((seg, r.prompt[s.computed:s.computed + take], r, None))
            budget -= take
            if last:
                admitted.append(r)
        if not singles and not multis:
            return
        plan = singles + multis
        self.counters["steps"] += 1
        # The forward pass sees single tokens in slot order (consecutive slots attend through a
        # view of the cache, no gather); results are taken in plan order, so events keep theirs.
        packed = sorted(singles, key=lambda p: p[0].slot) + multis
        tokens = [t for p in packed for t in p[1]]
        logits = self.forward(tokens, [p[0] for p in packed], self.cache)
        at, row = {}, 0
        for p in packed:
            at[id(p)] = row
            row += _rows(p[0])
        # One argmax over the batch for the rows a greedy sequence with no logits processing
        # takes as they are (16 argmax calls a step cost ~0.3 ms); ties go to the first index,
        # as in a row's own argmax, so the token is the same.
        picks = [None] * row
        if any((s or r.seqs[0]).sampler.plain_greedy for _, _, r, s in plan):
            picks = logits.argmax(dim=-1).tolist()
        for p in plan:
            seg, toks, r, s = p
            if r.handle.finished:  # failed earlier in this step
                continue
            lo, hi = at[id(p)], at[id(p)] + _rows(seg)
            rows, fast = logits[lo:hi], picks[lo:hi]
            try:
                if s is None:  # a prefill chunk
                    r.seqs[0].computed += seg.length
                    if seg.logits == "last":
                        self._start(r, rows, fast)
                else:
                    self._decode(r, s, toks, rows, fast)
            except Exception as e:  # noqa: BLE001 - one request's sampling (its grammar, its processors) fails it alone
                self._release(r)
                r.handle._finish(e)
        for r in admitted:
            self._waiting.remove(r)
            self._running.append(r)
        self._waiting = [r for r in self._waiting if not r.handle.finished]
        self._running = [r for r in self._running if not r.handle.finished]

    def _start(self, r: _Request, rows: torch.Tensor, fast: list) -> None:
        """The prompt is in the first sequence's slot: give the others theirs, sample each one's first token."""
        first = r.seqs[0]
        for s in r.seqs[1:]:
            self.cache.copy_prefix(first.slot, s.slot, first.computed)
            s.computed = first.computed
        r.started = True
        for s in r.seqs:
            self._emit(r, s, self._choose(s, rows[:1], fast[0]), rows[:1])

    def _decode(self, r: _Request, s: _Seq, toks: list[int], rows: torch.Tensor, fast: list) -> None:
        s.computed += 1  # the fed token is in the cache now
        for j in range(rows.shape[0]):
            t = self._choose(s, rows[j:j + 1], fast[j])
            self._emit(r, s, t, rows[j:j + 1])
            if s.done or j + 1 >= len(toks) or t != toks[j + 1]:
                return
            s.computed += 1  # the draft token that matched is in the cache too
            self.counters["draft_accepted"] += 1

    def _choose(self, s: _Seq, row: torch.Tensor, pick: int | None = None) -> int:
        """The sequence's next token from its raw row; `pick`: the row's argmax, if computed."""
        if pick is not None and s.sampler.plain_greedy:
            return pick
        if s.sampler.needs_processing:
            row = s.sampler.process(row)
        return s.sampler.draw(row)

    def _emit(self, r: _Request, s: _Seq, t: int, raw: torch.Tensor) -> None:
        s.tokens.append(t)
        s.generated += 1
        s.sampler.observe(t)
        self.counters["generation_tokens_total"] += 1
        r.handle.completion_tokens += 1
        finish = None
        if t in r.stop_ids:
            text, finish = s.text.flush(), "stop"
        else:
            text, stopped = s.text.push(t)
            if stopped:
                finish = "stop"
            elif s.sampler.matcher is not None and s.sampler.matcher.done:
                finish, text = "stop", text + s.text.flush()
            elif s.generated >= r.params.max_tokens or len(s.tokens) > self.max_seq_len:
                finish, text = "length", text + s.text.flush()
        lp = top = None
        if r.params.logprobs or r.params.top_logprobs:
            ls = torch.log_softmax(raw[0], dim=-1)
            lp = float(ls[t])
            if r.params.top_logprobs:
                v, i = torch.topk(ls, r.params.top_logprobs)
                top = [(self._piece(int(a)), float(b)) for a, b in zip(i, v, strict=True)]
        r.handle._push(TokenEvent(s.index, t, text, lp, top, finish))
        if finish is not None:
            s.done = True
            self._free.append(s.slot)
            if all(x.done for x in r.seqs):
                r.handle._finish()

    def _piece(self, t: int) -> str:
        return self.tokenizer.id_to_bytes(t).decode("utf-8", errors="replace")
