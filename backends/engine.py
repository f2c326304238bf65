"""Continuous batching over one loaded model: N slots share one llama.cpp context and its KV cache.

Each slot is a sequence id with its own sampler chain; the slots share one KV cache of n_ctx cells
(llama.cpp's unified cache, as llama-server's): one conversation may fill all of it while the
others idle, many short ones share it. One thread owns the context: at every step it lets waiting
jobs into free slots, puts into one `llama_batch` the next token of every generating slot and as
much of the new prompts as the batch holds (a long prompt is evaluated in chunks between the
others' tokens), decodes once, and samples each slot's token from its own row of logits.

The cells are counted here, not found out by a failed decode: a job's whole prompt is committed
when it takes a slot, and a job waits in the queue while the cells its prompt needs are not free
(after dropping what idle slots keep). When the generating slots need more cells than there are,
the newest job is paused: its tokens so far go back to the head of the queue, and it resumes where
it was once room frees (nothing it streamed is taken back).

A slot keeps the KV cache of its last conversation; a new job goes to the free slot that shares
the longest prefix with it (as llama.cpp's server does), so only the rest of its prompt is
evaluated. When a slot's cache is about to be dropped (another conversation takes the slot, the
cells are needed), it is copied into a PromptCache in host memory first; a later prompt that
shares a longer prefix with an entry there than with any slot gets the entry restored into its
slot instead of evaluating that prefix again.

Not an adapter (it is in no backend's PREFERENCE): every backend's worker runs on it.
"""
import codecs
import collections
import contextlib
import ctypes
import hashlib
import json
import os
import queue
import tempfile
import threading
import time

N_BATCH = 512          # tokens in one decode step, all slots together (--batch-size; --ubatch-size the same)
MIN_P = 0.05           # the min-p that llama-cpp-python's create_completion uses by default
MIN_SAVED = 64         # a slot's cache shorter than this is not worth a place in the prompt cache
PROMPT_CACHE_MB = 2048  # the prompt cache's default bound in host memory (--prompt-cache-mb)
# the KV cache's element types (--cache-type-k/--cache-type-v): ggml's type id and bytes per element
KV_TYPES = {"f16": (1, 2.0), "q8_0": (8, 34 / 32), "q4_0": (2, 18 / 32)}
# the kinds of an EngineJob's events; rbee.py's Protocol section names them ENGINE_* (a test keeps both equal)
ADMITTED, TOKEN, END, ERROR, LOGPROBS, WAITING = "admitted", "token", "end", "error", "logprobs", "waiting"


class EngineJob:
    """One generation: its prompt tokens, sampling settings, cancel flag, and the events the
    engine's thread puts for the request's thread, in order:
        ("waiting", {reason, need, free, n_ctx})  it waits for room in the KV cache (`reason` "room"),
                                           or was paused to give its cells to older jobs ("paused")
        ("admitted", {slot, reused, restored, resumed})  it has a slot; `reused` prompt tokens came
                                           from the caches (`restored` of them from the prompt cache);
                                           `resumed`: it was paused and goes on
        ("logprobs", {token, logprob, bytes, top})  (asked for) the next token's log-probability and the
                                           `logprobs` likeliest tokens with theirs, before its ("token", ...)
        ("token", text)                    text of one sampled token ("" while a UTF-8 character is split)
        ("end", stop_reason)               eos, max_tokens or cancelled; the last event
        ("error", message)                 llama.cpp failed; the last event
    """

    def __init__(self, prompt_tokens, max_tokens, temperature=0.7, top_p=0.95, top_k=40, seed=None, grammar=None,
                 logprobs=None, preserved=()):
        self.prompt_tokens = list(prompt_tokens)   #: the whole prompt, BOS and template included
        self.max_tokens = max_tokens
        self.temperature, self.top_p, self.top_k, self.seed = temperature, top_p, top_k, seed
        self.grammar = grammar                     #: a GBNF grammar (root rule `root`) the text must follow, or None
        self.logprobs = logprobs                   #: None, or how many likeliest tokens to give with each token's
        #: special tokens whose text it gets (a tool-call marker such as Mistral's [TOOL_CALLS]); the others
        #: (control tokens) come as "", as llama-cpp-python gives them
        self.preserved = frozenset(preserved)
        self.cancel = threading.Event()            #: set by anyone: the engine ends the job at its next step
        self.events = queue.Queue()                #: written by the engine's thread, read by the job's owner
        self.admitted = threading.Event()          #: it got a slot (the engine's thread)
        #: a paused job's state (its tokens so far, samplers, decoder, count, start), or None (the engine's thread)
        self.paused = None
        self.told_waiting = False                  #: its "waiting" event for room went out (the engine's thread)


class Slot:
    """One sequence of the context, owned by the engine's thread."""

    def __init__(self, seq_id):
        self.seq_id = seq_id       #: its sequence id in the context
        self.job = None            #: the job it runs, or None: free
        self.cache = []            #: the tokens whose KV it holds, from position 0
        self.pending = []          #: prompt tokens still to evaluate (their cells are committed)
        self.next_token = None     #: the token sampled last, to evaluate at the next step
        self.sampler = None        #: its sampler chain (llama_sampler pointer)
        self.grammar = None        #: its job's grammar sampler, apart from the chain (see Engine._sample), or None
        self.generated = 0         #: tokens sampled for its job
        self.decoder = None        #: its incremental UTF-8 decoder
        self.started = 0.0         #: when its job got it (older jobs' prompts go into a batch first)
        self.last_used = 0.0       #: when its last job ended (the least recently used is reused first)


def context_params(llama_cpp, llm, n_ctx, n_seq, n_batch, n_ubatch=None, flash_attn=True, unified=True):
    """The params of a context on `llm`'s model: its threads, `n_ctx` cells shared by `n_seq`
    sequences (a unified KV cache; else n_ctx / n_seq each), batches of `n_batch` tokens."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_seq_max, params.kv_unified = n_ctx, n_seq, unified
    params.n_batch, params.n_ubatch = n_batch, n_ubatch or n_batch
    params.n_threads = llm.context_params.n_threads
    params.n_threads_batch = llm.context_params.n_threads_batch
    params.offload_kqv = llm.context_params.offload_kqv
    # llama.cpp's own default (llama-server's too), where llama-cpp-python's Llama turns it off:
    # flash attention where the backend has it; about 14 % more tokens a second with four
    # clients on 2 CPU cores here, and still the same greedy text alone or beside others
    params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn
                              else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    params.no_perf = True
    return params


class Engine:
    """N slots over one model and one KV cache of `n_ctx` cells, one decode loop. `submit(job)`
    queues a job (FIFO); the caller reads `job.events`. `close()` ends every job and frees the context."""

    def __init__(self, llm, n_slots, n_ctx, n_batch=N_BATCH, n_ubatch=None, cache_type_k="f16", cache_type_v="f16",
                 prompt_cache=None, unified=True):
        import llama_cpp
        self.llama_cpp = llama_cpp
        self.llm = llm                                  #: the loaded Llama (its model; its own context is unused)
        self.n_slots, self.n_batch = n_slots, n_batch
        self.cache_types = (cache_type_k, cache_type_v)   #: the KV cache's element types (KV_TYPES' names)
        params = context_params(llama_cpp, llm, n_ctx, n_slots, n_batch, n_ubatch, unified=unified)
        params.type_k, params.type_v = KV_TYPES[cache_type_k][0], KV_TYPES[cache_type_v][0]
        self.model = llm._model.model
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)   #: the context (the loop's thread)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context of %d tokens (KV cache %s/%s)" % (
                n_ctx, cache_type_k, cache_type_v))
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)   #: the KV cache's cells, shared by every slot
        # a split cache (--kv-split) keeps each sequence's cells apart, laid out as when it runs alone,
        # so that its text at temperature 0 is the same beside others (in the unified cache, llama.cpp's
        # attention runs over every sequence's cells, in kernels chosen by their number: a text may
        # differ at a near tie); the cost is that no conversation may use the others' idle cells
        self.unified = unified                          #: one cache for all slots, else a stream each
        self.seq_cells = self.n_ctx if unified else self.n_ctx // n_slots   #: the cells one conversation may fill
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.slots = [Slot(i) for i in range(n_slots)]  #: the sequences (the loop's thread)
        self.prompt_cache = prompt_cache                #: a PromptCache, or None (the loop's thread)
        self.waiting = collections.deque()             #: jobs without a slot yet, FIFO (under `cond`)
        self.cond = threading.Condition()               #: guards `waiting` and `running`; wakes the loop
        self.running = 0                                #: jobs in slots (under `cond`)
        self.closing = False                            #: close() was called (under `cond`)
        self.dead = None                                #: why the loop ended unexpectedly, if it did (under `cond`)
        #: its KV cache at its element types
        self.kv_mb = kv_cache_mb(kv_bytes_per_token(*model_kv_shape(llama_cpp, self.model), cache_type_k, cache_type_v),
                                 self.n_ctx)
        self.evaluated = 0                              #: prompt tokens evaluated since the start (the loop's thread)
        self.cached = 0                                 #: prompt tokens that came from a cache instead (the loop's)
        self.paused = 0                                 #: jobs paused for room since the start (the loop's thread)
        self.thread = threading.Thread(target=self._loop, daemon=True, name="engine")
        self.thread.start()

    # -- what other threads call -----------------------------------------------------------------

    def submit(self, job):
        """Queue `job`; returns its place in the queue (0: a slot is free, it starts at the next step)."""
        with self.cond:
            if self.closing or self.dead:
                job.events.put((ERROR, self.dead) if self.dead else (END, "cancelled"))
                return 0
            self.waiting.append(job)
            self.cond.notify()
            return max(0, self.running + len(self.waiting) - self.n_slots)

    def cancel(self, job):
        """End `job` at the next step (a waiting one leaves the queue at once, never started)."""
        job.cancel.set()
        with self.cond:
            self.cond.notify()

    def grammar_refused(self, grammar):
        """Whether llama.cpp refuses a GBNF grammar (asked before a job may take a slot)."""
        sampler = self._grammar_sampler(grammar)
        if not sampler:
            return True
        self.llama_cpp.llama_sampler_free(sampler)
        return False

    def _grammar_sampler(self, grammar):
        """A sampler of a GBNF grammar whose root rule is `root` (NULL: llama.cpp refused it)."""
        return self.llama_cpp.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")

    def load(self):
        """(jobs in slots, jobs waiting)."""
        with self.cond:
            return self.running, len(self.waiting)

    def counters(self):
        """What the cache saved: prompt tokens evaluated and taken from a cache, jobs paused, the
        prompt cache's entries and MB (read without a lock: each a number one thread writes)."""
        cache = self.prompt_cache
        return {"prompt_tokens_evaluated": self.evaluated, "prompt_tokens_cached": self.cached,
                "jobs_paused": self.paused, "prompt_cache_entries": len(cache.entries) if cache else 0,
                "prompt_cache_mb": round(cache.size / (1 << 20), 1) if cache else 0.0}

    def close(self, timeout=15.0):
        """End every job (`cancelled`), stop the loop, free the context. False: a step did not
        end within `timeout` (llama.cpp still runs; nothing is freed under it)."""
        with self.cond:
            self.closing = True
            for job in self.waiting:
                job.cancel.set()
            self.cond.notify()
        self.thread.join(timeout)
        if self.thread.is_alive():
            return False
        for slot in self.slots:
            self._free_samplers(slot.sampler, slot.grammar)
        self.llama_cpp.llama_batch_free(self.batch)
        self.llama_cpp.llama_free(self.ctx)
        return True

    # -- the loop's thread -----------------------------------------------------------------------

    def _loop(self):
        try:
            while True:
                with self.cond:
                    self._drop_cancelled()
                    if self.closing and not self.running:
                        return
                    if not self.running and not self.waiting:
                        self.cond.wait(0.5)
                        continue
                self._admit()   # (outside `cond`: copying a cache in or out takes a while)
                if not self.running:
                    with self.cond:   # (waiting for room that only a job's end frees: none runs, so none will)
                        self.cond.wait(0.05)
                    continue
                try:
                    self._step()
                except Exception as exc:   # llama.cpp failed: the running jobs end with the error
                    self._fail_running("%s: %s" % (type(exc).__name__, exc))
        except BaseException as exc:   # no job may wait for a loop that is gone
            with self.cond:
                self.dead = "the engine stopped: %s: %s" % (type(exc).__name__, exc)
                waiting, self.waiting = list(self.waiting), collections.deque()
            for job in waiting:
                job.events.put((ERROR, self.dead))
            self._fail_running(self.dead)
            raise

    def _fail_running(self, error):
        """End every running job with `error`; forget every slot's cache (what llama.cpp holds
        for them is not known any more)."""
        for slot in self.slots:
            if slot.job:
                self._finish(slot, None, error)
            self.llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
            slot.cache = []

    def _drop_cancelled(self):
        """(under `cond`) Cancelled jobs leave the queue at once (a paused one frees its samplers)."""
        for job in [j for j in self.waiting if j.cancel.is_set() or self.closing]:
            self.waiting.remove(job)
            if job.paused:
                self._free_samplers(*job.paused["samplers"])
                job.paused = None
            job.events.put((END, "cancelled"))

    def _committed(self):
        """Cells held or promised: every slot's cache and the prompt tokens it still evaluates."""
        return sum(len(s.cache) + len(s.pending) for s in self.slots)

    def _admit(self):
        """Waiting jobs into free slots, in order, while the KV cache has room for their prompts;
        the first that does not fit waits (and the ones behind it: first come, first served)."""
        while True:
            with self.cond:
                job = self.waiting[0] if self.waiting else None
            free = [s for s in self.slots if s.job is None]
            if job is None or not free:
                return
            tokens = job.paused["tokens"] if job.paused else job.prompt_tokens
            slot = max(free, key=lambda s: (common_prefix(s.cache, tokens), -s.last_used))
            if not self._room_for(slot, tokens, job):
                return
            with self.cond:
                if not self.waiting or self.waiting[0] is not job:   # (cancelled meanwhile)
                    continue
                self.waiting.popleft()
                self.running += 1
            try:
                self._start(slot, job, tokens)
            except Exception as exc:   # (this job alone)
                if job.paused:
                    self._free_samplers(*job.paused["samplers"])
                    job.paused = None
                slot.job = job
                self._finish(slot, None, "%s: %s" % (type(exc).__name__, exc))

    def _room_for(self, slot, tokens, job):
        """Whether `tokens` fit in the KV cache in `slot` (its prefix in common is kept), after
        dropping what other idle slots keep (least recently used first, copied into the prompt
        cache); else the job is told it waits."""
        kept = min(common_prefix(slot.cache, tokens), len(tokens) - 1)
        need = len(tokens) + 1 - kept
        if not self.unified:   # (its own stream: room for whatever is shorter than it)
            return len(tokens) < self.seq_cells
        # (the generating slots' next tokens take a cell each at the next step: not for this job)
        free = self.n_ctx - self._committed() + len(slot.cache) - kept - sum(
            1 for s in self.slots if s.job and s.next_token is not None)
        for idle in sorted((s for s in self.slots if s.job is None and s is not slot and s.cache),
                           key=lambda s: s.last_used):
            if free >= need:
                break
            free += len(idle.cache)
            self._drop_cache(idle)
        if free >= need:
            return True
        if not job.told_waiting:
            job.told_waiting = True
            job.events.put((WAITING, {"reason": "room", "need": need, "free": free, "n_ctx": self.n_ctx}))
        return False

    def _drop_cache(self, slot, keep=0):
        """Cut `slot`'s cache to its first `keep` tokens; what goes, if it is worth it, is kept in
        the prompt cache first (the whole sequence: a later prompt finds its prefix there)."""
        cache = self.prompt_cache
        if cache is not None and len(slot.cache) - keep >= MIN_SAVED and tuple(slot.cache) not in cache.entries:
            state = self._state_of(slot, cache.limit)
            if state:
                cache.put(slot.cache, state)
        if not self.llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, keep, -1):   # (a cache that cannot be cut)
            self.llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
            keep = 0
        slot.cache = slot.cache[:keep]

    def _state_of(self, slot, limit):
        """The bytes of `slot`'s sequence in the KV cache (llama_state_seq_get_data); None if they
        would be more than `limit`."""
        lc = self.llama_cpp
        size = lc.llama_state_seq_get_size(self.ctx, slot.seq_id)
        if size > limit:
            return None
        data = (ctypes.c_uint8 * size)()
        written = lc.llama_state_seq_get_data(self.ctx, data, size, slot.seq_id)
        return bytes(data)[:written]

    def _restore(self, slot, tokens):
        """Put into `slot` the prompt cache's entry that shares the longest prefix with `tokens`,
        where it shares more than the slot does and fits; returns the tokens it brought."""
        if self.prompt_cache is None:
            return 0
        kept = common_prefix(slot.cache, tokens)
        entry, shared = self.prompt_cache.best(tokens)
        room = self.n_ctx - self._committed() + len(slot.cache) if self.unified else self.seq_cells
        if entry is None or shared <= kept or len(entry) > room:
            return 0
        data = self.prompt_cache.get(entry)
        if data is None:
            return 0
        self._drop_cache(slot)
        buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if not self.llama_cpp.llama_state_seq_set_data(self.ctx, buffer, len(data), slot.seq_id):
            self.llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
            self.prompt_cache.discard(entry)   # (another model's, or another cache type's)
            return 0
        slot.cache = list(entry)
        return shared

    def _start(self, slot, job, tokens):
        slot.job = job   # (first: a failure below ends this job, in its slot)
        if not tokens:
            raise ValueError("an empty prompt")
        restored = self._restore(slot, tokens)
        reused = min(common_prefix(slot.cache, tokens), len(tokens) - 1)   # the last one is evaluated again
        self._drop_cache(slot, reused)
        reused = len(slot.cache)
        slot.job, slot.next_token, slot.pending = job, None, tokens[reused:]
        self._free_samplers(slot.sampler, slot.grammar)
        if job.paused:   # it goes on as it was: its samplers, its decoder, its count, its age
            paused, job.paused = job.paused, None
            slot.sampler, slot.grammar = paused["samplers"]
            slot.decoder, slot.generated, slot.started = paused["decoder"], paused["generated"], paused["started"]
            job.events.put((ADMITTED, {"slot": slot.seq_id, "reused": reused, "restored": min(restored, reused),
                                       "resumed": True}))
            return
        slot.generated, slot.started = 0, time.monotonic()
        slot.decoder = codecs.getincrementaldecoder("utf-8")("ignore")
        slot.sampler, slot.grammar = None, None
        slot.grammar = self._grammar(job)
        slot.sampler = self._sampler(job)
        self.cached += reused
        job.admitted.set()
        job.events.put((ADMITTED, {"slot": slot.seq_id, "reused": reused, "restored": min(restored, reused),
                                   "resumed": False}))

    def _free_samplers(self, *samplers):
        for sampler in samplers:
            if sampler:
                self.llama_cpp.llama_sampler_free(sampler)

    def _pause(self, slot):
        """Give `slot`'s cells to older jobs: its job goes back to the head of the queue with what
        it has so far (its cache is kept in the prompt cache, to come back from there)."""
        job = slot.job
        tokens = slot.cache + ([slot.next_token] if slot.next_token is not None else []) + slot.pending
        job.paused = {"tokens": tokens, "samplers": (slot.sampler, slot.grammar), "decoder": slot.decoder,
                      "generated": slot.generated, "started": slot.started}
        slot.sampler = slot.grammar = slot.decoder = None
        slot.job, slot.next_token, slot.pending, slot.last_used = None, None, [], time.monotonic()
        self._drop_cache(slot)
        self.paused += 1
        job.told_waiting = True   # (this says it waits)
        job.events.put((WAITING, {"reason": "paused", "need": len(tokens) + 1, "free": self.n_ctx - self._committed(),
                                  "n_ctx": self.n_ctx}))
        with self.cond:
            self.running -= 1
            self.waiting.appendleft(job)

    def _grammar(self, job):
        if not job.grammar:
            return None
        grammar = self._grammar_sampler(job.grammar)
        if not grammar:
            raise ValueError("llama.cpp refused the grammar")
        return grammar

    def _sampler(self, job):
        lc = self.llama_cpp
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if job.temperature <= 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
            return chain
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(job.top_k))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(job.top_p, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(MIN_P, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(job.temperature))
        seed = job.seed if job.seed is not None and job.seed >= 0 else lc.LLAMA_DEFAULT_SEED
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
        return chain

    def _make_room_to_generate(self, active):
        """Cells for each generating slot's next token: idle slots' caches go first, then the
        newest jobs pause (never the oldest: it always goes on). A split cache's streams are each
        their own: a slot's check in _sample ends a job whose stream is full."""
        while self.unified:
            generating = [s for s in active if s.job and s.next_token is not None]
            short = len(generating) - (self.n_ctx - self._committed())
            if short <= 0:
                return
            idle = sorted((s for s in self.slots if s.job is None and s.cache), key=lambda s: s.last_used)
            if idle:
                self._drop_cache(idle[0])
                continue
            running = sorted((s for s in active if s.job), key=lambda s: s.started)
            if len(running) < 2:   # (one job holds every cell: its context is full, as its own check says)
                return
            self._pause(running[-1])

    def _step(self):
        """One decode: each generating slot's next token first, then prompt chunks in the rest."""
        batch, outputs = self.batch, []
        batch.n_tokens = 0
        active = [s for s in self.slots if s.job]
        for slot in active:
            if slot.job.cancel.is_set() or self.closing:
                self._finish(slot, "cancelled")
        self._make_room_to_generate(active)
        for slot in (s for s in active if s.job and s.next_token is not None):
            outputs.append((slot, self._add(slot, [slot.next_token], True)))
            slot.next_token = None
        # the shortest prompts first (the oldest among equals): a new short prompt starts at the next
        # step, a long one takes what they leave of the batch, chunk after chunk
        for slot in sorted((s for s in active if s.job and s.pending), key=lambda s: (len(s.pending), s.started)):
            room = self.n_batch - batch.n_tokens
            if room <= 0:
                break
            chunk, slot.pending = slot.pending[:room], slot.pending[room:]
            self.evaluated += len(chunk)
            index = self._add(slot, chunk, not slot.pending)
            if not slot.pending:
                outputs.append((slot, index))
        if not batch.n_tokens:
            return
        code = self.llama_cpp.llama_decode(self.ctx, batch)
        if code != 0:
            raise RuntimeError("llama_decode returned %d" % code)
        for slot, index in outputs:
            self._sample(slot, index)

    def _add(self, slot, tokens, last_logits):
        """Put `tokens` of `slot` into the batch; returns the batch index of the last one."""
        batch = self.batch
        for k, token in enumerate(tokens):
            i = batch.n_tokens
            batch.token[i] = token
            batch.pos[i] = len(slot.cache)
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot.seq_id
            batch.logits[i] = last_logits and k == len(tokens) - 1
            batch.n_tokens = i + 1
            slot.cache.append(token)
        return batch.n_tokens - 1

    def _sample(self, slot, index):
        lc = self.llama_cpp
        token = lc.llama_sampler_sample(slot.sampler, self.ctx, index)
        if slot.grammar:   # (as llama.cpp's common sampler: the grammar judges the token the chain chose)
            if not self._allowed(slot.grammar, token):
                token = self._constrained(slot, index)
            lc.llama_sampler_accept(slot.grammar, token)
        if lc.llama_vocab_is_eog(self.vocab, token):
            return self._finish(slot, "eos")
        slot.generated += 1
        if slot.job.logprobs is not None:
            slot.job.events.put((LOGPROBS, self._logprobs(index, token, slot.job.logprobs)))
        slot.job.events.put((TOKEN, slot.decoder.decode(self._piece(token, token in slot.job.preserved))))
        if slot.generated >= slot.job.max_tokens or len(slot.cache) + 1 >= self.seq_cells:
            return self._finish(slot, "max_tokens")
        slot.next_token = token
    def _allowed(self, grammar, token):
        """Whether `grammar` allows `token` next: one candidate, not the whole vocabulary (the
        grammar's cost is per candidate: applied to all of them first, it made constrained jobs
        about a quarter slower than llama-server's)."""
        lc = self.llama_cpp
        one = lc.llama_token_data(token, 0.0, 0.0)
        lc.llama_sampler_apply(grammar, ctypes.byref(lc.llama_token_data_array(ctypes.pointer(one), 1, -1, False)))
        return one.logit != float("-inf")

    def _constrained(self, slot, index):
        """The token the chain chooses among those the grammar allows (the chain's own choice was
        not): sampling from the allowed ones is what the chosen token's rejection leaves."""
        import numpy
        lc = self.llama_cpp
        n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        candidates = numpy.empty(n_vocab, dtype=[("id", numpy.int32), ("logit", numpy.float32), ("p", numpy.float32)])
        candidates["id"] = numpy.arange(n_vocab, dtype=numpy.int32)
        candidates["logit"] = self._logits(index)
        candidates["p"] = 0.0
        array = lc.llama_token_data_array(candidates.ctypes.data_as(lc.llama_token_data_p), n_vocab, -1, False)
        lc.llama_sampler_apply(slot.grammar, ctypes.byref(array))
        lc.llama_sampler_apply(slot.sampler, ctypes.byref(array))
        return array.data[array.selected].id

    def _logits(self, index):
        """Batch row `index`'s logits, one a token of the vocabulary (a view of llama.cpp's buffer)."""
        import numpy
        lc = self.llama_cpp
        return numpy.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, index), shape=(lc.llama_vocab_n_tokens(
            self.vocab),))

    def _logprobs(self, index, token, top):
        """The model's log-probability of `token` at batch row `index` (its distribution before
        sampling: no temperature, no grammar), and the `top` likeliest tokens with theirs."""
        import numpy
        logits = self._logits(index)
        shifted = logits - logits.max()
        logprobs = shifted - numpy.log(numpy.exp(shifted).sum())
        best = numpy.argpartition(-logprobs, top)[:top] if top else ()
        entry = lambda t: {"token": self._piece(t).decode("utf-8", "replace"), "logprob": float(logprobs[t]),
                           "bytes": list(self._piece(t))}
        return dict(entry(token), top=[entry(t) for t in sorted(best, key=lambda t: -logprobs[t])])

    def _piece(self, token, special=False):
        buf = ctypes.create_string_buffer(64)
        n = self.llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def _finish(self, slot, reason, error=None):
        job, slot.job, slot.next_token, slot.pending = slot.job, None, None, []
        slot.last_used = time.monotonic()
        with self.cond:
            self.running -= 1
        tail = slot.decoder.decode(b"", final=True) if slot.decoder else ""
        if tail and error is None:
            job.events.put((TOKEN, tail))
        job.events.put((ERROR, error) if error is not None else (END, reason))


def kv_bytes_per_token(n_layer, n_embd_k, n_embd_v, cache_type_k="f16", cache_type_v="f16"):
    """Bytes one cell of the KV cache takes: every layer's keys and values (`n_embd_k`/`n_embd_v`:
    one token's keys/values in a layer, KV heads x head size) at the cache's element types."""
    return n_layer * (n_embd_k * KV_TYPES[cache_type_k][1] + n_embd_v * KV_TYPES[cache_type_v][1])


def model_kv_shape(llama_cpp, model):
    """(layers, keys' width, values' width) of a loaded model's KV cache cell."""
    n_embd, n_head = llama_cpp.llama_model_n_embd(model), llama_cpp.llama_model_n_head(model)
    width = n_embd // max(1, n_head) * llama_cpp.llama_model_n_head_kv(model)
    return llama_cpp.llama_model_n_layer(model), width, width


def kv_cache_mb(bytes_per_token, n_ctx):
    """What a KV cache of `n_ctx` cells takes, in MB."""
    return int(bytes_per_token * n_ctx / (1 << 20))


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PromptCache:
    """KV cache states of conversations whose slot went to another one, in host memory (as
    llama-server's --cache-ram): keyed by the tokens they hold, least recently used out beyond
    `limit_mb`. With `directory` (--prompt-cache-dir), every entry is written there too, under the
    model's `fingerprint`, and a later worker of the same model finds them (an entry is read back
    on its first use). Used by the engine's thread alone."""

    SUFFIX = ".kv"

    def __init__(self, limit_mb=PROMPT_CACHE_MB, directory=None, fingerprint=""):
        self.limit = int(limit_mb * (1 << 20))          #: the bound of `size`, in bytes
        self.entries = collections.OrderedDict()        #: tuple of tokens -> its state bytes, None: on disk only
        self.size = 0                                   #: bytes of the states held in memory
        #: where entries also live (one file each), or None
        self.directory = os.path.join(directory, fingerprint) if directory else None
        try:
            files = self._files()
        except OSError:   # (a directory it cannot make or read: memory only)
            self.directory, files = None, []
        for entry in files:
            tokens = self._read(entry.path, header_only=True)
            if tokens:
                self.entries[tokens] = None

    def _files(self):
        """The entry files already in the directory, oldest first."""
        if not self.directory:
            return []
        os.makedirs(self.directory, exist_ok=True)
        return sorted((e for e in os.scandir(self.directory) if e.name.endswith(self.SUFFIX)),
                      key=lambda e: e.stat().st_mtime)

    def best(self, tokens):
        """(the entry sharing the longest prefix with `tokens`, how many tokens it shares); (None, 0)."""
        best, shared = None, 0
        for key in self.entries:
            n = common_prefix(key, tokens)
            if n > shared:
                best, shared = key, n
        return best, shared

    def get(self, key):
        """An entry's state (read from disk if need be), now the most recently used; None if it is gone."""
        data = self.entries.get(key)
        if data is None and key in self.entries and self.directory:
            data = self._read(self._path(key))
            if data is None:
                self.discard(key)
                return None
            self.size += len(data)
            self.entries[key] = data
        if key in self.entries:
            self.entries.move_to_end(key)
            self._trim()
        return data

    def put(self, tokens, data):
        """Keep `tokens`' state; an entry it extends goes (this one serves every prompt that one did)."""
        key = tuple(tokens)
        if not data or len(data) > self.limit:
            return
        for old in [k for k in self.entries if len(k) <= len(key) and key[:len(k)] == k]:
            self.discard(old)
        self.entries[key] = data
        self.size += len(data)
        if self.directory:
            self._write(key, data)
        self._trim()

    def _write(self, key, data):
        """An entry's file: written under a name of its own, then renamed (never half a file under
        an entry's name, whoever else writes there); a disk that refuses keeps it in memory only."""
        try:
            fd, part = tempfile.mkstemp(dir=self.directory, suffix=".part")
            with os.fdopen(fd, "wb") as f:
                header = json.dumps(list(key)).encode()
                f.write(len(header).to_bytes(8, "little") + header + data)
            os.replace(part, self._path(key))
        except OSError:
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(part)

    def discard(self, key):
        data = self.entries.pop(key, None)
        self.size -= len(data or b"")
        if self.directory:
            try:
                os.unlink(self._path(key))
            except OSError:
                pass

    def _trim(self):
        """Out of memory, least recently used first, until the states fit the bound (on disk they stay,
        as many as the same bound holds there)."""
        for key in list(self.entries):
            if self.size <= self.limit:
                break
            data = self.entries[key]
            if data is None:
                continue
            self.size -= len(data)
            if self.directory:
                self.entries[key] = None
            else:
                del self.entries[key]
        if self.directory:
            on_disk = []
            for k in self.entries:
                with contextlib.suppress(OSError):   # (another worker of the model may have taken it away)
                    on_disk.append((k, os.path.getsize(self._path(k))))
            total = sum(size for _, size in on_disk)
            for key, size in on_disk:
                if total <= self.limit:
                    break
                total -= size
                self.discard(key)

    def _path(self, key):
        return os.path.join(self.directory, hashlib.sha256(json.dumps(list(key)).encode()).hexdigest()[:32] +
                            self.SUFFIX)

    @staticmethod
    def _read(path, header_only=False):
        """An entry file's tokens (header_only) or state; None if it cannot be read."""
        try:
            with open(path, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
                return tuple(header) if header_only else f.read()
        except (OSError, ValueError):
            return None


class Embedder:
    """Embeddings of a loaded model in a context of their own (embeddings on, no logits): the
    generation slots go on undisturbed beside it. The pooling is the model's (mean, CLS, last,
    rank); a model that declares none (a chat model) is pooled by mean. Inputs go into one batch,
    a sequence each, as many as fit, and the inputs of requests that came meanwhile with them;
    vectors come L2-normalised, but a reranker's (rank pooling: its classification head's outputs,
    a score each) as they are."""

    MAX_SEQUENCES = 16     # sequences in one decode

    def __init__(self, llm, n_ctx):
        import llama_cpp
        self.llama_cpp = llama_cpp
        self.model = llm._model.model
        self.n_ctx = n_ctx                              #: the longest input, in tokens (the whole of it in one ubatch)
        # a BERT (attention not causal) attends over the whole batch, no KV cache, and with flash
        # attention (K and V in f16) a sequence's result then depends on the others in the batch (the
        # tests' tiny reranker's scores by 3e-3 of themselves); without it, batched and alone agree to 1e-5
        bidirectional = llm.metadata.get("%s.attention.causal" % llm.metadata.get("general.architecture")) == "false"
        # (the sequences share the cells: n_ctx tokens in all)
        params = context_params(llama_cpp, llm, n_ctx, self.MAX_SEQUENCES, n_ctx, flash_attn=not bidirectional)
        params.embeddings = True
        self.ctx = self._context(params)                #: its context (under `lock`)
        if llama_cpp.llama_pooling_type(self.ctx) == llama_cpp.LLAMA_POOLING_TYPE_NONE:
            llama_cpp.llama_free(self.ctx)
            params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
            self.ctx = self._context(params)
        self.pooling = llama_cpp.llama_pooling_type(self.ctx)   #: the pooling it uses (LLAMA_POOLING_TYPE_*)
        self.ranks = self.pooling == llama_cpp.LLAMA_POOLING_TYPE_RANK   #: a reranker's: scores, not vectors
        #: a vector's dimension (a reranker's: its classifier's outputs)
        self.dimensions = (llama_cpp.llama_model_n_cls_out if self.ranks else llama_cpp.llama_model_n_embd)(self.model)
        self.encoder_only = llama_cpp.llama_model_has_encoder(self.model) and not llama_cpp.llama_model_has_decoder(
            self.model)                                 #: T5-like: llama_encode, not llama_decode
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, self.MAX_SEQUENCES)
        #: sequences in one decode: an encoder's (no KV cache) gives each the vector it has alone; a
        #: causal model's sequences share the KV cache's cells, and there a 60-token text's vector moved
        #: by up to 4e-3 beside others (flash attention or not), for no speed: its output head, run on
        #: every token, is most of the work (3.7 inputs/s here either way). One at a time, then.
        self.max_sequences = self.MAX_SEQUENCES if bidirectional else 1
        self.lock = threading.Lock()                    #: the context's holder: one decode at a time
        self.waiting = []                               #: requests not embedded yet (under `waiting_lock`)
        self.waiting_lock = threading.Lock()            #: guards `waiting` (held for a moment, never a decode)

    def _context(self, params):
        ctx = self.llama_cpp.llama_init_from_model(self.model, params)
        if not ctx:
            raise RuntimeError("llama.cpp could not create an embeddings context of %d tokens" % params.n_ctx)
        return ctx

    def embed(self, inputs):
        """The vector of each token list in `inputs` (each at most n_ctx tokens): L2-normalised, or a
        reranker's scores as they are. Requests that arrive while a decode runs wait for the
        context; the first to get it embeds the inputs of all of them together (their sequences
        share decodes), and each of the others finds its vectors done."""
        request = {"inputs": list(inputs), "vectors": None}
        with self.waiting_lock:
            self.waiting.append(request)
        with self.lock:
            if request["vectors"] is None:
                with self.waiting_lock:
                    requests, self.waiting = self.waiting, []
                try:
                    vectors = self._embed_all([tokens for r in requests for tokens in r["inputs"]])
                except BaseException as exc:   # (each request raises it, none waits in vain)
                    vectors = exc
                for r in requests:
                    r["vectors"] = vectors if isinstance(vectors, BaseException) else vectors[:len(r["inputs"])]
                    vectors = vectors if isinstance(vectors, BaseException) else vectors[len(r["inputs"]):]
        if isinstance(request["vectors"], BaseException):
            raise request["vectors"]
        return request["vectors"]

    def _embed_all(self, inputs):
        """(under `lock`) The inputs in decodes of up to `max_sequences` sequences and n_ctx tokens."""
        out, group, size = [], [], 0
        for tokens in inputs:
            if group and (size + len(tokens) > self.n_ctx or len(group) == self.max_sequences):
                out += self._decode(group)
                group, size = [], 0
            group.append(tokens)
            size += len(tokens)
        return out + (self._decode(group) if group else [])

    def _decode(self, group):
        import numpy
        lc, batch = self.llama_cpp, self.batch
        lc.llama_memory_clear(self.memory, True)
        batch.n_tokens = 0
        for seq, tokens in enumerate(group):
            for pos, token in enumerate(tokens):
                i = batch.n_tokens
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, True
                batch.seq_id[i][0] = seq
                batch.n_tokens = i + 1
        code = (lc.llama_encode if self.encoder_only else lc.llama_decode)(self.ctx, batch)
        if code != 0:
            raise RuntimeError("llama.cpp's embedding decode returned %d" % code)
        vectors = []
        for seq in range(len(group)):
            vector = numpy.ctypeslib.as_array(lc.llama_get_embeddings_seq(self.ctx, seq), shape=(self.dimensions,))
            norm = 0.0 if self.ranks else float(numpy.linalg.norm(vector))
            vectors.append((vector / norm if norm > 0 else vector).astype(float).tolist())
        return vectors

    def close(self):
        with self.lock:
            self.llama_cpp.llama_batch_free(self.batch)
            self.llama_cpp.llama_free(self.ctx)
