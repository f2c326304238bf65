#!/usr/bin/env python3
"""rbee: the machines of a home network or small lab as one LLM inference service.

Architecture (one file, five roles, each a subcommand; the contract is docs/PROTOCOL.md):

    keeper  (rbee.py infer, the CLI) -- HTTP+SSE --> queen  (rbee.py queen, 127.0.0.1:8080)
    apps (OpenAI/Ollama clients, /ui) -- HTTP -----> queen  (the queen relays their tokens)
    queen   -- ssh, stdin kept open as lifeline --> hive   (rbee.py hive, one per node, :9200)
    hive    -- child process, stdin lifeline ---> worker (rbee.py worker, one model, :8001+)
    hive    -- child process, stdin lifeline ---> rpc    (rbee.py rpc: a device lent to a split)
    keeper  -- HTTP+SSE /execute, directly -----> worker  (tokens to stdout, narration to stderr)

The queen is a front (Queen: routes, keys, CORS, status, its life) over parts that each own one
thing: Hives (a hive session per node), the Scheduler (which worker serves each request: the
warm one, else a placement by free memory and caps, a replica, an eviction, a Split over
nodes), the apps' APIs (OpenAIApi, ResponsesApi with the responses it keeps, OllamaApi, LlamaCppApi,
AnthropicApi), Metrics and the EventFeed of the page.

Every process narrates: JSON lines on stdout before it serves HTTP and after it stops, SSE events
while it serves; every parent relays what its children say, so all of it reaches the user's shell.
Beside the narration a child writes control lines (`{"control": "ready", "port": ...}`) that its
parent acts on. Every parent owns its children (a Child each): closing a child's stdin (or dying)
shuts the child down, in cascade, so nothing is left behind. No start-up path asks DNS for
anything; a role rbee starts runs from rbee.py's cached bytecode (role_argv).

Threads, and what each owns:

    every role   `http`: accepts; a thread per request (its SSE stream is its own); `sse-ping`:
                 pings silent streams; `lifeline`: stdin's EOF stops the role; signals stop it too
    every parent `out-NAME` per Child: reads its stdout, relays narration, sets ready and exited
    worker       the engine's loop (backends/engine.py): the llama.cpp context, slots and KV cache;
                 request threads: admission under Worker.jobs_lock, then their job's events
    hive         request threads: spawns (one per model and device: spawn_locks), downloads;
                 `idle-reaper`: polls workers, stops expired ones; WorkerPool: every worker state
    queen        request threads: decisions one at a time under Scheduler.lock, from surveys made
                 outside it (a thread per node); `split-ID`: a split's supervisor; Hives: sessions;
                 `node-retry`: tries the down nodes again (the registry's rows say when); an
                 `out-hive-NODE` whose session ends tells the scheduler, which cuts its requests there
    keeper       the main thread writes the text; `out-queen` relays an ephemeral queen

The way of a request (an OpenAI chat): App.dispatch -> Queen.authorize -> OpenAIApi.chat ->
OpenAIApi._answer -> AppModels.named -> AppJob.open -> Scheduler.assign -> Scheduler.warm, or
Scheduler.place (survey -> Hives.get -> HiveClient.resources; views -> plan_placement; evict;
HiveClient.spawn -> Hive.spawn -> Hive.worker_for -> WorkerPool.hand_out, or Hive.launch ->
Child) -> AppJob._start -> WorkerClient.execute -> Worker.execute (Worker.render: the model's
template, its tools; Worker.grammar) -> Engine.submit -> Worker._stream (JobOutput: text, or
through a ToolCallParser, tool calls) -> AppJob.pieces -> OpenAIStream.data -> AppJob.close ->
Scheduler.release. A node that fails it before its first token: AppJob._next_event ->
AppJob._place (Hives.others: the nodes left) -> Scheduler.assign again.

Sections below follow the data: the Protocol (every route, event, control line, state and actor
name, and the readers of requests), errors, small tools, narration, HTTP/SSE plumbing, the role
clients (one per role, which every caller uses), processes, ssh, the model catalog, agents' turns
(tools in templates, each family's tool-call format, grammars), worker, rpc server, hive, queen
(nodes and hives, the scheduler, the apps' APIs, the front), keeper, CLI.
"PROTOCOL.md §N" cites docs/PROTOCOL.md; the page is ui.html beside this file. Only the standard
library is imported at top level; `backends/` (llama-cpp-python) and huggingface_hub are
imported where they are needed.
"""
import argparse
import base64
import collections
import contextlib
import errno
import hashlib
import itertools
import json
import os
import queue
import re
import select
import shlex
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.parse

# What the tests and the bench may import; the rest may change without notice.
__all__ = [
    "__version__", "main", "role_argv", "remote_command", "shell_path",
    # the Protocol: readers of requests, references, the engine's event kinds
    "duration_s", "keep_alive_of", "size_mb", "ModelRef", "choose_gguf", "split_at_stop",
    # GGUF headers (Ollama's show) and the worker's fill-in-the-middle prompts
    "gguf_metadata", "gguf_layers", "FIM_KEY", "GGUF_FILE_TYPES", "Job", "FimPrompt",
    "ENGINE_ADMITTED", "ENGINE_TOKEN", "ENGINE_END", "ENGINE_ERROR", "ENGINE_LOGPROBS", "ENGINE_WAITING",
    "Token", "Narration", "JobEnded", "ToolCallDelta",
    # agents' turns: the tool-call formats of the model families, grammars from JSON schemas
    "tool_format_of", "ToolCallParser", "schema_grammar", "tool_call_grammar", "marker_tokens",
    # errors (every class of PROTOCOL.md §7 is RbeeError.by_code's)
    "RbeeError", "InvalidRequest", "InvalidModelRef", "InvalidApiKey", "InternalError", "ConnectionTimeout",
    "SlotsBusy", "WorkerCrashed", "InsufficientRam", "VramExhausted", "BackendUnavailable", "DeviceNotFound",
    "PortInUse", "StartFailed", "WorkerNotFound", "ModelNotFound",
    # the role clients, nodes, ssh, placement, small tools
    "WorkerClient", "HiveClient", "QueenClient", "NodeRegistry", "SshTarget", "ssh_failure", "ssh_auth_failed",
    "node_view", "plan_placement", "KeyedLocks", "human_bytes", "human_duration", "masked_env", "env_pair",
    # OpenAI's Responses API on the queen: its items as chat messages, its output, the kept responses
    "response_request", "response_input_messages", "response_usage", "ResponseOutput", "ResponseStore",
    "ResponseNotFound", "NodeDown", "NodeLost",
]
__version__ = "0.4.0"
API_VERSION = "v1"
HERE = os.path.dirname(os.path.abspath(__file__))
RBEE_PY = os.path.join(HERE, "rbee.py")
QUEEN_PORT, HIVE_PORT, WORKER_PORT, RPC_PORT = 8080, 9200, 8001, 50052
RPC_CACHE_DIR = "rpc-cache"        # under $RBEE_HOME: a node's RPC server keeps the large weights splits sent it
DEFAULT_QUEEN_URL = "http://127.0.0.1:%d" % QUEEN_PORT
MAX_BODY = 1 << 20                 # request bodies over 1 MiB get 413
MAX_JSON_DEPTH = 32                # deeper request bodies get 400
BODY_TIMEOUT = 10.0                # a request's body must arrive within this (a too large Content-Length)
PING_INTERVAL = 10.0               # a silent SSE stream sends ": ping" this often
LOADING_TIMEOUT = 300.0            # a worker must report ready within 5 min
GRACEFUL_TIMEOUT = 30.0            # graceful shutdown, then SIGKILL
SSH_ATTEMPTS, SSH_BACKOFF = 3, (0.0, 0.2, 0.4)   # one attempt where no person named the node
HTTP_CONNECT_TIMEOUT, HTTP_ATTEMPTS = 5.0, 3
DOWNLOAD_ATTEMPTS = 6
BUSY_RETRIES = (1, 2, 4)           # a busy worker (503) is retried after 1, 2, 4 s
DEFAULT_N_CTX = 2048               # an answer's length where the API's caller gives none
MAX_TOKENS = 1 << 20                # the longest answer a request may ask for (cut at its worker's context)
KV_CACHE_TYPES = ("f16", "q8_0", "q4_0")   # --cache-type-k/-v (backends.engine.KV_TYPES knows their sizes)
MIN_CTX = 512                      # a worker's context when memory allows less than the model's
EMBED_CTX_CAUSAL = 2048            # the longest input a causal model embeds (its logits fill a buffer per token)
KV_RESERVE_MB = 256                # memory a worker leaves free beside its KV cache (compute buffers, the OS)
WORKER_RUNTIME_MB = 90             # a worker's memory beside its model's: Python, rbee, llama_cpp, numpy, its threads
LOADER_CELLS = 256                 # the cells of the loader's own small context (64 tokens, rounded up by llama.cpp)
DEFAULT_PARALLEL = 4               # a worker's slots
DEFAULT_MAX_QUEUE = 64             # requests that may wait for a slot
DEFAULT_KEEP_ALIVE = 300.0         # an idle worker stays loaded this long (Ollama's 5m); a hive with no worker too
DEFAULT_MAX_REPLICAS = 2           # workers of one model the queen starts when every slot is taken
PLACEMENT_WAIT = 300.0             # a task that waits for memory (busy workers) gives up after this
HANDOUT_GRACE = 3.0                # a worker handed out counts as loaded this long (its job may not show yet)
NODE_RETRY_S = (15, 30, 60, 120, 300)   # a node down (no ssh) is tried again after these, per failure in a row
LISTING_TIMEOUT = 0.5              # a model listing asks a running hive this long, then answers from what it knew
STATUS_TIMEOUT = 5.0               # /v2/status, /metrics and /api/ps ask a running hive this long
FAILOVER_DEADLINE = PLACEMENT_WAIT   # a request that lost its node is placed again within this of its arrival
AUTO_NODE = "auto"                 # a task's node when the queen chooses it
# the responses the queen keeps for OpenAI's Responses API (`store`, `previous_response_id`): the
# newest this many, this much JSON in all, none older than this
RESPONSES_KEPT, RESPONSES_KEPT_BYTES, RESPONSES_TTL = 1000, 64 << 20, 24 * 3600.0


# ============================================================================================
# Protocol (docs/PROTOCOL.md): every name the roles say to each other, and the readers of requests
# ============================================================================================

# Routes, as (method, path). Each role's server builds its route table from these; the client
# class of that role (section "Role clients") is the one caller of the roles' own routes.
WORKER_HEALTH, WORKER_EXECUTE = ("GET", "/health"), ("POST", "/execute")
WORKER_CANCEL, WORKER_SHUTDOWN = ("POST", "/cancel"), ("POST", "/shutdown")
WORKER_TOKENIZE = ("POST", "/tokenize")   # an /execute body's prompt, counted (Anthropic's count_tokens)
WORKER_EMBED = ("POST", "/embed")         # {input: [text or tokens], truncate}: a normalised vector each
MAX_EMBED_INPUTS = 2048                   # inputs in one embeddings request (OpenAI's own limit)
WORKER_RERANK = ("POST", "/rerank")       # {query, documents: [text], truncate}: a reranker's score each
MAX_RERANK_DOCUMENTS = 1000               # documents in one rerank request (Cohere's own limit)

HIVE_HEALTH, HIVE_WORKERS = ("GET", "/v1/health"), ("GET", "/v1/workers/list")
HIVE_SPAWN, HIVE_READY = ("POST", "/v1/workers/spawn"), ("POST", "/v1/workers/ready")
HIVE_WORKER_SHUTDOWN = ("POST", "/v1/workers/{worker_id}/shutdown")
HIVE_MODELS, HIVE_DOWNLOAD = ("GET", "/v1/models"), ("POST", "/v1/models/download")
HIVE_REMOVE, HIVE_SHUTDOWN = ("POST", "/v1/models/remove"), ("POST", "/v1/shutdown")
HIVE_RESOURCES = ("GET", "/v1/resources")
HIVE_MODEL_INFO = ("GET", "/v1/models/info")   # ?model=REF: a cataloged model's GGUF metadata (Ollama's show)
HIVE_RPC_START, HIVE_RPC_STOP = ("POST", "/v1/rpc/start"), ("POST", "/v1/rpc/stop")

QUEEN_HEALTH, QUEEN_TASKS = ("GET", "/health"), ("POST", "/v2/tasks")
QUEEN_WORKERS, QUEEN_WORKER_SHUTDOWN = ("GET", "/v2/workers"), ("POST", "/v2/workers/shutdown")
QUEEN_MODELS, QUEEN_DOWNLOAD = ("GET", "/v2/models"), ("POST", "/v2/models/download")
QUEEN_REMOVE, QUEEN_STATUS = ("POST", "/v2/models/remove"), ("GET", "/v2/status")
QUEEN_SHUTDOWN, QUEEN_METRICS = ("POST", "/v2/shutdown"), ("GET", "/metrics")
QUEEN_UI, QUEEN_EVENTS = ("GET", "/ui"), ("GET", "/v2/events")   # the page (PROTOCOL.md §15) and its live feed

# The apps' APIs on the queen (PROTOCOL.md §13). OpenAI's, each also without /v1, as llama.cpp's
# server answers them:
OPENAI_CHAT, OPENAI_CHAT_BARE = ("POST", "/v1/chat/completions"), ("POST", "/chat/completions")
OPENAI_COMPLETIONS, OPENAI_COMPLETIONS_BARE = ("POST", "/v1/completions"), ("POST", "/completions")
OPENAI_MODELS, OPENAI_MODELS_BARE = ("GET", "/v1/models"), ("GET", "/models")
OPENAI_MODEL, OPENAI_MODEL_BARE = ("GET", "/v1/models/{model_id...}"), ("GET", "/models/{model_id...}")
OPENAI_EMBEDDINGS, OPENAI_EMBEDDINGS_BARE = ("POST", "/v1/embeddings"), ("POST", "/embeddings")
OPENAI_RESPONSES, OPENAI_RESPONSES_BARE = ("POST", "/v1/responses"), ("POST", "/responses")
OPENAI_RESPONSE, OPENAI_RESPONSE_BARE = ("GET", "/v1/responses/{response_id}"), ("GET", "/responses/{response_id}")
OPENAI_RESPONSE_DELETE = ("DELETE", "/v1/responses/{response_id}")
OPENAI_RESPONSE_DELETE_BARE = ("DELETE", "/responses/{response_id}")
# ... Ollama's:
OLLAMA_ROOT, OLLAMA_ROOT_HEAD, OLLAMA_VERSION = ("GET", "/"), ("HEAD", "/"), ("GET", "/api/version")
OLLAMA_TAGS, OLLAMA_PS, OLLAMA_SHOW = ("GET", "/api/tags"), ("GET", "/api/ps"), ("POST", "/api/show")
OLLAMA_CHAT, OLLAMA_GENERATE, OLLAMA_PULL = ("POST", "/api/chat"), ("POST", "/api/generate"), ("POST", "/api/pull")
OLLAMA_EMBED, OLLAMA_EMBEDDINGS = ("POST", "/api/embed"), ("POST", "/api/embeddings")   # (the second: its older one)
# ... reranking, in the shape Jina's and Cohere's clients, llama.cpp's server and Open WebUI's external reranker share:
RERANK, RERANK_BARE = ("POST", "/v1/rerank"), ("POST", "/rerank")
# ... llama.cpp's server's own fill-in-the-middle (code editors' autocomplete: llama.vim, llama.vscode):
LLAMACPP_INFILL = ("POST", "/infill")
# ... Anthropic's Messages API (what the `anthropic` package and Claude Code call):
ANTHROPIC_MESSAGES, ANTHROPIC_COUNT_TOKENS = ("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens")
# ... and the paths whose errors each API shapes its own way (Queen.error_body; llama.cpp's server
# answers every error in OpenAI's shape; Anthropic's first: its paths are under OpenAI's /v1/ too)
ANTHROPIC_PATHS = ("/v1/messages",)
OPENAI_PATHS = ("/v1/", "/chat/", "/completions", "/models", "/responses", LLAMACPP_INFILL[1], RERANK_BARE[1])
OLLAMA_PATHS = ("/api/",)

# SSE events. Every stream ends with exactly one of TERMINAL_EVENTS. The keeper's `--json` lines
# carry the same names in their `event` field (narration, worker, token, end, error).
EVENT_NARRATION, EVENT_QUEUED, EVENT_STARTED, EVENT_TOKEN = "narration", "queued", "started", "token"
EVENT_END, EVENT_WORKER, EVENT_ERROR = "end", "worker", "error"
EVENT_TOOL_CALL = "tool_call"        # a worker's job: a piece of a tool call the model made (§5.1)
TERMINAL_EVENTS = (EVENT_END, EVENT_WORKER, EVENT_ERROR)
EVENT_PING = "ping"                  # how iter_sse reports a `: ping` comment (no event of its own)
SSE_CONTENT_TYPE, NDJSON_CONTENT_TYPE = "text/event-stream", "application/x-ndjson"
# ... and those of OpenAI's Responses API on the queen (its own dialect: PROTOCOL.md §13)
RESPONSE_CREATED, RESPONSE_IN_PROGRESS = "response.created", "response.in_progress"
RESPONSE_COMPLETED, RESPONSE_INCOMPLETE = "response.completed", "response.incomplete"
RESPONSE_FAILED, RESPONSE_ERROR = "response.failed", "error"
RESPONSE_ITEM_ADDED, RESPONSE_ITEM_DONE = "response.output_item.added", "response.output_item.done"
RESPONSE_PART_ADDED, RESPONSE_PART_DONE = "response.content_part.added", "response.content_part.done"
RESPONSE_TEXT_DELTA, RESPONSE_TEXT_DONE = "response.output_text.delta", "response.output_text.done"
RESPONSE_ARGUMENTS_DELTA = "response.function_call_arguments.delta"
RESPONSE_ARGUMENTS_DONE = "response.function_call_arguments.done"

# Control lines: JSON lines on a child's stdout beside its narration (which has an `actor`), read
# by the parent. {"control": "ready", "role", "port", "version"}: the child serves on `port`.
CONTROL, CONTROL_READY = "control", "ready"
# The hive handshake: the first line on the stdin of a `hive --lifeline`, then the lifeline.
HELLO_TOKEN, HELLO_ENV = "token", "env"
HELLO_KEEP_ALIVE = "keep_alive"      # seconds a hive lives with no worker (and its workers' default)

# How the queen's machine reaches a node's hive and workers: straight over the network (lan), or
# only through the node's ssh connection (ssh: they listen on the node's 127.0.0.1, forwarded).
TRANSPORT_LAN, TRANSPORT_SSH = "lan", "ssh"
NODE_REACHABLE, NODE_UNREACHABLE = "reachable", "unreachable"   # a registered node's status (down: unreachable)
TRANSPORTS = (TRANSPORT_LAN, TRANSPORT_SSH)
LOCAL_NODE = "localhost"             # the queen's own machine: its hive is a local child, no ssh

# Headers and environment variables that more than one role reads.
AUTHORIZATION, RETRY_AFTER = "Authorization", "Retry-After"
X_API_KEY = "x-api-key"                      # the queen's key as Anthropic's clients send it (or as a bearer)
ENV_WORKER_API_KEY = "RBEE_WORKER_API_KEY"   # the worker's key, set by its hive
ENV_HIVE_TOKEN = "RBEE_HIVE_TOKEN"           # a standalone hive's token (or --token-file)
ENV_READY_TOKEN = "RBEE_READY_TOKEN"         # a worker's own secret for its ready callback, from its hive
ENV_API_KEY = "RBEE_API_KEY"                 # the queen's key (or --api-key-file); the keeper sends it
ENV_QUEEN_URL = "RBEE_QUEEN_URL"             # where the keeper looks for a queen
ENV_HOME = "RBEE_HOME"                       # where every role keeps its files (default ~/.rbee)
ENV_TOKEN_TIMEOUT = "RBEE_TOKEN_TIMEOUT"     # seconds without a token that end a request
ENV_SSH_CONFIG = "RBEE_SSH_CONFIG"           # an ssh_config file for every ssh the queen runs
ENV_THREADS = "RBEE_THREADS"                 # a worker's llama.cpp threads (backends.threads; default: the cores)
ENV_SSH_CLIENT = "SSH_CLIENT"                # sshd's: where a hive's ssh session comes from (a split's peer)
ENV_HF_ENDPOINT, ENV_HF_TOKEN = "HF_ENDPOINT", "HF_TOKEN"   # Hugging Face's: its address and a token
ENV_HF_OFFLINE = "HF_HUB_OFFLINE"            # Hugging Face's: no download at all
HELLO_ENV_KEYS = (ENV_HF_TOKEN,)     # secrets a hive gets in its hello from the queen's environment, never on argv
# no token for this long ends a request (pings or not); also socket reads. RBEE_TOKEN_TIMEOUT sets
# it for every role started with that environment (a slow CPU node; the tests use a few seconds)
TOKEN_TIMEOUT = float(os.environ.get(ENV_TOKEN_TIMEOUT) or 60.0)

# A worker's state as its hive's pool keeps it and lists it (PROTOCOL.md §5.2): loading -> idle
# <-> busy -> draining -> exited. The worker's own state is loading -> ready -> draining; its
# /health says idle or busy while it is ready.
WORKER_LOADING, WORKER_READY, WORKER_IDLE, WORKER_BUSY = "loading", "ready", "idle", "busy"
WORKER_DRAINING, WORKER_EXITED = "draining", "exited"
WORKER_SERVING = (WORKER_IDLE, WORKER_BUSY)

# The engine's events to the worker (backends/engine.py, EngineJob.events): (kind, data)
ENGINE_ADMITTED, ENGINE_TOKEN, ENGINE_END, ENGINE_ERROR = "admitted", "token", "end", "error"
ENGINE_LOGPROBS = "logprobs"         # (asked for) the next token's log-probability and its likeliest rivals
ENGINE_WAITING = "waiting"           # it waits for room in the KV cache, or was paused for older jobs

# Who narrates (the `actor` of every event, and the `component` of an error)
ACTOR_KEEPER, ACTOR_QUEEN, ACTOR_HIVE, ACTOR_WORKER = "rbee-keeper", "queen-rbee", "rbee-hive", "llm-worker-rbee"
ACTOR_RPC, ACTOR_HTTP, ACTOR_DEVICES = "rpc-server", "http-server", "device-manager"
ACTOR_PROVISIONER, ACTOR_LOADER = "model-provisioner", "model-loader"
ACTOR_BACKEND, ACTOR_TOKENIZER = "llama-backend", "tokenizer"

# What a job's stream yields to a WorkerClient's caller.
Queued = collections.namedtuple("Queued", "position")          # the job waits for a slot
JobStarted = collections.namedtuple("JobStarted", "job_id worker_id")
# a piece of generated text, in order (and, when asked, its tokens' log-probabilities)
Token = collections.namedtuple("Token", "text index logprobs", defaults=(None,))
# a piece of a tool call: its first has the call's id and name (None after), each an `arguments` fragment
ToolCallDelta = collections.namedtuple("ToolCallDelta", "index id name arguments")
Narration = collections.namedtuple("Narration", "event")    # what a hop says while it works
JobEnded = collections.namedtuple("JobEnded", "stats")      # tokens_out, stop_reason, timings
# ... and a download's progress: the `download` field of a hive's download_start and
# download_progress narration (Ollama's pull reads it)
DownloadState = collections.namedtuple("DownloadState", "file done total")


def download_state(event):
    """The DownloadState a narration event carries, or None."""
    state = event.get("download") if isinstance(event, dict) else None
    if isinstance(state, dict) and isinstance(state.get("file"), str):
        return DownloadState(state["file"], int(state.get("done") or 0), int(state.get("total") or 0))
    return None


# -- reading requests: every field of a body, typed and bounded, or a 400 that names it ----------
# (they raise the errors of the next section, whose classes speak this one's names: the one cycle
# in the order of this file)

def invalid(field, message, suggestion=None):
    return InvalidRequest("%s: %s" % (field, message), {"field": field}, suggestion)


def number_field(body, name, default, low, high, integer=False):
    """The number `name` of a request body (`default` when absent or null): 400 for another type,
    NaN, or a value outside low..high."""
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise invalid(name, "must be %s" % ("an integer" if integer else "a number"))
    if value != value or not low <= value <= high:   # NaN fails the first test
        raise invalid(name, "must be between %s and %s" % (low, high),
                      "Use --%s between %s and %s" % (name.replace("_", "-"), low, high))
    return value


def text_field(body, name, default=None, limit=1024):
    """The string `name` of a request body (`default` when absent or null; required when the
    default is None): 400 for another type, an empty string or one over `limit` characters."""
    value = body.get(name)
    if value is None:
        if default is None:
            raise invalid(name, "is required")
        return default
    if not isinstance(value, str) or not value or len(value) > limit:
        raise invalid(name, "must be a non-empty string of at most %d characters" % limit)
    return value


def bool_field(body, name, default):
    """The boolean `name` of a request body (`default` when absent or null): 400 for another type."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, "must be true or false")
    return value


def parallel_of(body):
    """A request's `parallel`: the slots of a worker it starts (default DEFAULT_PARALLEL)."""
    return number_field(body, "parallel", DEFAULT_PARALLEL, 1, 256, integer=True)


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def duration_s(value):
    """A keep-alive as Ollama reads it: seconds (a number, or a string of one), or a duration
    such as "30s", "10m", "1h30m"; 0 unloads at once, a negative value never. None if it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if value == value and abs(value) < 1e12 else None
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    with contextlib.suppress(ValueError):
        return duration_s(float(text))
    sign = -1.0 if text.startswith("-") else 1.0
    match = _DURATION.match(text.lstrip("-"))
    if not match or not any(match.groups()):
        return None
    h, m, sec = (float(g or 0) for g in match.groups())
    return sign * (h * 3600 + m * 60 + sec)


WorkerContext = collections.namedtuple("WorkerContext", "ctx_size cache_type_k cache_type_v")
WorkerContext.__doc__ = """What a request asks of its worker's context: at least `ctx_size` tokens (0:
any; a worker started for it takes the model's trained context, as far as memory holds it), its KV
cache's element types (None: any; a worker started for it takes f16)."""


def context_of(body, default=WorkerContext(0, None, None)):
    """A request's WorkerContext (`ctx_size`, `cache_type_k`, `cache_type_v`), `default`'s where it has none."""
    ctx_size = number_field(body, "ctx_size", default.ctx_size, 0, 1 << 22, integer=True)
    types = []
    for name, fallback in (("cache_type_k", default.cache_type_k), ("cache_type_v", default.cache_type_v)):
        value = body.get(name, fallback)
        if value is not None and value not in KV_CACHE_TYPES:
            raise invalid(name, "must be one of %s" % ", ".join(KV_CACHE_TYPES))
        types.append(value)
    return WorkerContext(ctx_size, *types)


def context_fits(worker, context):
    """Whether a worker (its /health or listing: ctx_size, cache_type_k, cache_type_v) serves `context`:
    as large a context at least, the same KV cache types where asked (one not known yet is taken to fit)."""
    if context is None or not worker.get("ctx_size"):
        return True
    return worker["ctx_size"] >= context.ctx_size and all(
        want in (None, worker.get(name, want)) for name, want in (("cache_type_k", context.cache_type_k),
                                                                   ("cache_type_v", context.cache_type_v)))


def keep_alive_of(body, default):
    """A request's `keep_alive` in seconds (absent or null: `default`); 400 for anything else."""
    value = body.get("keep_alive")
    if value is None:
        return default
    seconds = duration_s(value)
    if seconds is None:
        raise invalid("keep_alive", "must be seconds or a duration such as 30s, 10m, 1h (0: unload at once, "
                      "negative: keep loaded)")
    return -1.0 if seconds < 0 else seconds


_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size_mb(text):
    """A memory size as users write it ("8G", "512M", "1.5G", "2GB", bytes if bare) in MB, or None."""
    match = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", str(text), re.I)
    if not match:
        return None
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()] / (1 << 20))


_ENDPOINT = re.compile(r"^[A-Za-z0-9.:-]{1,255}:\d{1,5}$")


def split_of(body):
    """A spawn's split: {rpc: ["host:port", ...], offload_layers, tensor_split "a,b"} or None."""
    rpc = body.get("rpc")
    if rpc is None:
        return None
    if not isinstance(rpc, list) or not 1 <= len(rpc) <= 16 or not all(
            isinstance(e, str) and _ENDPOINT.match(e) for e in rpc):
        raise invalid("rpc", "must be a list of 1 to 16 host:port endpoints")
    shares = body.get("tensor_split")
    if shares is not None and not (isinstance(shares, str) and re.match(r"^\d+(\.\d+)?(,\d+(\.\d+)?)*$", shares)):
        raise invalid("tensor_split", "must be shares as a,b,...")
    return {"rpc": rpc, "offload_layers": number_field(body, "offload_layers", 1, 0, 1 << 16, integer=True),
            "tensor_split": shares}


def backend_and_device(body):
    """A request's optional `backend` (None: the node's best) and its `device` (default 0)."""
    backend, device = body.get("backend"), body.get("device", 0)
    if backend is not None and not isinstance(backend, str):
        raise invalid("backend", "must be a string")
    if isinstance(device, bool) or not isinstance(device, int):
        raise invalid("device", "must be an integer")
    return backend, device


def _check_unicode(value, where):
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise invalid(where, "is not valid Unicode (a lone surrogate)")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, where)
            _check_unicode(item, key if isinstance(key, str) and where == "body" else where)
    elif isinstance(value, list):
        for item in value:
            _check_unicode(item, where)


def parse_json_body(raw):
    """A request body as a dict: 400 for what is not a JSON object, nests deeper than
    MAX_JSON_DEPTH, or holds a string that is no valid Unicode (a lone surrogate)."""
    if not raw:
        return {}
    depth = deepest = 0
    in_string = escaped = False
    brackets = raw.count(b"[") + raw.count(b"{")
    for byte in raw if brackets > MAX_JSON_DEPTH else b"":   # nesting, counted before the parser recurses
        if in_string:
            escaped, in_string = (False, True) if escaped else (byte == 0x5C, byte != 0x22)
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    if deepest > MAX_JSON_DEPTH:
        raise InvalidRequest("JSON body nested %d deep; at most %d" % (deepest, MAX_JSON_DEPTH), {"field": "body"})
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidRequest("Malformed JSON body: %s" % exc, {"field": "body"})
    if not isinstance(data, dict):
        raise invalid("body", "must be a JSON object")
    _check_unicode(data, "body")
    return data


# -- model references (PROTOCOL.md §4) ---------------------------------------------------------

MAX_REF = 4096          # characters of a model reference


_HF_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"


_HF_REF = re.compile(r"^hf:(%s)/(%s)(?::([^\s/:][^\s:]*))?$" % (_HF_NAME, _HF_NAME))


_SPLIT_PART = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.I)


class ModelRef(collections.namedtuple("ModelRef", "provider reference selector text")):
    """A parsed model reference: hf:ORG/REPO[:SELECTOR] or file:/abs/path.gguf."""

    @classmethod
    def parse(cls, text):
        if not isinstance(text, str) or not text.strip():
            raise InvalidModelRef("Empty model reference", {"model": text},
                                  "Use hf:ORG/REPO (a GGUF repo on Hugging Face) or file:/absolute/path.gguf")
        text = text.strip()
        match = _HF_REF.match(text) if len(text) <= MAX_REF else None
        if match:
            org, repo, selector = match.groups()
            if ".." in org + repo:
                match = None
            else:
                return cls("hf", "%s/%s" % (org, repo), selector, text)
        if text.startswith("file:") and len(text) <= MAX_REF:
            path = text[len("file://"):] if text.startswith("file://") else text[len("file:"):]
            if path.startswith("/") and not path.endswith("/") and "\0" not in path:
                return cls("file", os.path.normpath(path), None, "file:" + os.path.normpath(path))
        raise InvalidModelRef("Invalid model reference %r" % text[:200], {"model": text[:200]},
                              "Use hf:ORG/REPO[:FILE_OR_QUANT] (e.g. hf:TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF) "
                              "or file:/absolute/path/model.gguf")


def model_ref_of(body):
    """The model reference of a request body (`model_ref`, or `model` as in the queen's tasks)."""
    return ModelRef.parse(body.get("model_ref") or body.get("model"))


# ============================================================================================
# Errors (PROTOCOL.md §7): one envelope everywhere, a class per code, a suggestion for each
# ============================================================================================

class RbeeError(Exception):
    """An error with a code of PROTOCOL.md §7, carried across every hop in the error envelope.
    Each code has its subclass below; code that branches on an error catches the class."""

    code, status = "INTERNAL", 500
    default_suggestion = None      # for errors whose source had nothing more specific to say
    by_code = {}                   # code -> the class an envelope with that code becomes

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        RbeeError.by_code.setdefault(cls.code, cls)   # the first class of a code stands for it

    def __init__(self, message, details=None, suggestion=None, component=None, status=None):
        super().__init__(message)
        self.message = message                                      #: what went wrong, for a person
        self.details = details or {}                                #: facts a program can read
        self.suggestion = suggestion or self.default_suggestion     #: what to run or change
        self.component = component                                  #: the role that said it
        self.status = status or type(self).status                   #: its HTTP status

    def envelope(self):
        body = {"code": self.code, "message": self.message, "details": self.details}
        if self.suggestion:
            body["suggestion"] = self.suggestion
        if self.component:
            body["component"] = self.component
        return {"error": body}

    def response_headers(self):
        return {}

    @staticmethod
    def of(code, message, details=None, suggestion=None, component=None, status=None):
        """The error of class `code` (a code this version does not know keeps its name)."""
        cls = RbeeError.by_code.get(code, InternalError)
        err = cls(message, details, suggestion, component, status)
        if code != cls.code and isinstance(code, str):
            err.code = code
        return err

    @staticmethod
    def from_envelope(data, status=None, component=None):
        err = (data or {}).get("error") if isinstance(data, dict) else None
        if not isinstance(err, dict):
            return InternalError("Unexpected answer: %.200r" % (data,), status=status, component=component)
        return RbeeError.of(err.get("code", "INTERNAL"), err.get("message", ""), err.get("details"),
                            err.get("suggestion"), err.get("component") or component, status)

    @staticmethod
    def wrap(exc, component=None):
        """Any exception as an RbeeError (backends' BackendError carries its own code)."""
        if isinstance(exc, RbeeError):
            if component and not exc.component:
                exc.component = component
            return exc
        if getattr(exc, "code", None) in RbeeError.by_code:
            return RbeeError.of(exc.code, exc.message, exc.details, exc.suggestion, component)
        return InternalError("%s: %s" % (type(exc).__name__, exc), component=component)


def error_class(code, status, suggestion=None):
    """The RbeeError subclass of a code that needs nothing but its status and, where its source
    has nothing more specific to say, a suggestion (INVALID_MODEL_REF -> InvalidModelRef)."""
    name = "".join(part.title() for part in code.split("_"))
    return type(name, (RbeeError,), {"code": code, "status": status, "default_suggestion": suggestion,
                                     "__module__": __name__})


# One class per code (PROTOCOL.md §7); the ones with more to say than a status follow.
(InvalidModelRef, NodeNotFound, SshFailed, VersionMismatch, ModelNotFound, AccessDenied, DownloadFailed,
 ChecksumMismatch, InsufficientDisk, InsufficientRam, VramExhausted, BackendUnavailable, DeviceNotFound,
 WorkerCrashed, LoadingTimeout) = [error_class(code, status) for code, status in (
    ("INVALID_MODEL_REF", 400), ("NODE_NOT_FOUND", 404), ("SSH_FAILED", 502), ("VERSION_MISMATCH", 409),
    ("MODEL_NOT_FOUND", 404), ("ACCESS_DENIED", 403), ("DOWNLOAD_FAILED", 502), ("CHECKSUM_MISMATCH", 502),
    ("INSUFFICIENT_DISK", 507), ("INSUFFICIENT_RAM", 507), ("VRAM_EXHAUSTED", 507), ("BACKEND_UNAVAILABLE", 400),
    ("DEVICE_NOT_FOUND", 400), ("WORKER_CRASHED", 502), ("LOADING_TIMEOUT", 504))]   # (WORKER_CRASHED: a hop died)
# ... and the operational ones, each with what to do (never "a bug in rbee": INTERNAL is for bugs)
ConnectionTimeout, RequestCancelled, PortInUse, StartFailed, WorkerNotFound = [
    error_class(code, status, suggestion) for code, status, suggestion in (
        ("CONNECTION_TIMEOUT", 504, "Check that the node is up and reachable, then run the command again"),
        ("REQUEST_CANCELLED", 499, "Run the command again"),
        # a role cannot listen where it was told to: another program holds the port (or none is free)
        ("PORT_IN_USE", 409, "Another program uses the port: stop it or pick another --port"),
        # a child of rbee's (a queen, a hive, an RPC part) exited or never said it was ready
        ("START_FAILED", 502, "See the child's log under $RBEE_HOME/logs"),
        # no worker of that id on that node (gone meanwhile: its keep-alive, a crash, an eviction)
        ("WORKER_NOT_FOUND", 404, "See the workers: rbee.py workers list"))]
# ... and the apps' own: a response (OpenAI's Responses API) the queen does not keep, or no longer
ResponseNotFound = error_class("RESPONSE_NOT_FOUND", 404, "The queen keeps the last %d responses for %d h, never "
                               "those sent with store: false; send the whole conversation as `input` instead" % (
                                   RESPONSES_KEPT, RESPONSES_TTL // 3600))


class InvalidRequest(RbeeError):
    code, status = "INVALID_REQUEST", 400   # also an unknown path (404), a wrong method (405), a body over 1 MiB (413)
    default_suggestion = "Check the command's options: rbee.py infer --help"


class ContextExceeded(InvalidRequest):
    """A prompt longer than the whole KV cache of the worker that would run it (never cut short)."""
    code = "CONTEXT_EXCEEDED"


class MissingApiKey(RbeeError):
    code, status = "MISSING_API_KEY", 401
    default_suggestion = ("Send Authorization: Bearer KEY; for a queen set RBEE_API_KEY to the key in "
                          "$RBEE_HOME/api-key on its machine")


class InvalidApiKey(MissingApiKey):
    code, status = "INVALID_API_KEY", 401


class SlotsBusy(RbeeError):
    code, status = "ALL_SLOTS_BUSY", 503

    def response_headers(self):
        return {RETRY_AFTER: str(self.details.get("retry_after_s", 1))}


class InternalError(RbeeError):
    code, status = "INTERNAL", 500
    default_suggestion = "This is a bug in rbee: the logs under $RBEE_HOME/logs (on each machine) have the details"


class HiveFailed(StartFailed):
    """A hive that did not come up (its process exited, or never said it was ready)."""


class NodeDown(SshFailed):
    """A node that did not answer ssh and is not due for another try yet (Hives.down): a request
    for it among others leaves it out without a word over ssh."""
    code, status = "NODE_DOWN", 503


class NodeLost(WorkerCrashed):
    """The node of a request's worker went away while it ran (its hive's ssh connection was lost,
    or the hive died): the request, if it streamed nothing yet, is placed again elsewhere."""
    code = "NODE_LOST"


# ============================================================================================
# Small tools: ids, locks by key, counters of work under way, rbee's home
# ============================================================================================

def random_id(nbytes):
    """A random hex string: job and worker ids, API keys, the queen's token."""
    return os.urandom(nbytes).hex()


class Once:
    """A claim that succeeds once: the first `claim()` is True, every later one False (a role's
    shutdown runs once, whichever signal, request or lifeline asks first)."""

    def __init__(self):
        self._lock = threading.Lock()         #: guards `claimed`
        self.claimed = False    #: whether someone has claimed it (set once, under _lock)

    def claim(self):
        with self._lock:
            if self.claimed:
                return False
            self.claimed = True
            return True


class KeyedLocks:
    """One lock per key (a model, a node), held by whoever works on that key; a key's lock is
    forgotten once nobody holds or waits for it, so many distinct keys cost nothing lasting."""

    def __init__(self):
        self._lock = threading.Lock()   #: guards `_entries`
        self._entries = {}              #: key -> [Lock, how many hold or wait for it]

    @contextlib.contextmanager
    def holding(self, key, on_wait=None):
        """Hold `key`'s lock for the block; `on_wait()` first when someone else holds it."""
        with self._lock:
            entry = self._entries.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            if not entry[0].acquire(blocking=False):
                if on_wait:
                    on_wait()
                entry[0].acquire()
            try:
                yield
            finally:
                entry[0].release()
        finally:
            with self._lock:
                entry[1] -= 1
                if not entry[1]:
                    del self._entries[key]

    def busy(self, key):
        """Whether someone holds or waits for `key`'s lock now."""
        with self._lock:
            return key in self._entries

    def __len__(self):
        with self._lock:
            return len(self._entries)


class InFlight:
    """How many of something are under way: each `with` block counts one while it runs."""

    def __init__(self):
        self._lock = threading.Lock()     #: guards `count`
        self.count = 0                    #: the blocks running now (under `_lock`)

    def __enter__(self):
        with self._lock:
            self.count += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            self.count -= 1


def rbee_home(*parts):
    """A path under $RBEE_HOME (default ~/.rbee), which holds everything a role writes."""
    home = os.environ.get(ENV_HOME) or os.path.join(os.path.expanduser("~"), ".rbee")
    return os.path.join(home, *parts)


# ============================================================================================
# Narration (PROTOCOL.md §6): narrate() goes to the current SSE stream, else to stdout as a JSON line
# ============================================================================================

_stdout_lock = threading.Lock()


_narration = threading.local()


class ClientGone(Exception):
    """The peer of an SSE stream went away."""


def json_text(obj):
    """JSON for the wire and for stdout: UTF-8 where it can be, and a string that holds a lone
    surrogate (valid in a JSON string, not in UTF-8) keeps it as its `\\udXXX` escape."""
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "backslashreplace").decode("utf-8")


def emit_line(obj):
    """One JSON line on stdout, flushed (a parent process reads it); a closed stdout is ignored."""
    line = json_text(obj) + "\n"
    with _stdout_lock:
        try:
            sys.stdout.write(line)
            sys.stdout.flush()
        except (OSError, ValueError):
            pass


_taps = []   # observers of every narration event this process makes or relays (the queen's /v2/events)


def observed(event):
    """Show `event` to the taps (a narration this process made, or one it relays from a child)."""
    for tap in _taps:
        tap(event)
    return event


def narrate(actor, action, human, cute=None, **fields):
    """Tell the user what is happening. Goes wherever this thread's narration is bound."""
    event = {"actor": actor, "action": action, "human": human}
    if cute:
        event["cute"] = cute
    event.update((k, v) for k, v in fields.items() if v is not None)
    observed(event)
    sink = getattr(_narration, "sink", None)
    if sink is None:
        emit_line(event)
    else:
        try:
            sink(event)
        except ClientGone:
            pass
    return event


@contextlib.contextmanager
def narration_to(sink):
    """Bind this thread's narration to `sink` (an SSE stream, a relay) for the block."""
    previous = getattr(_narration, "sink", None)
    _narration.sink = sink
    try:
        yield
    finally:
        _narration.sink = previous


def _current_sink():
    return getattr(_narration, "sink", None) or emit_line


def human_bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            if unit == "B":
                return "%d B" % n
            return ("%.0f %s" if n >= 10 else "%.1f %s") % (n, unit)
        n /= 1024.0


def human_duration(seconds):
    """30s, 5m, 1h30m; "forever" for a negative keep-alive."""
    if seconds < 0:
        return "forever"
    h, rest = divmod(int(round(seconds)), 3600)
    m, sec = divmod(rest, 60)
    return "".join("%d%s" % (n, unit) for n, unit in ((h, "h"), (m, "m"), (sec, "s")) if n) or "0s"


def same_output(a, b):
    """Whether `a` and `b` (file descriptors or streams) write to the same terminal or file (`2>&1`)."""
    try:
        a, b = [x if isinstance(x, int) else x.fileno() for x in (a, b)]
        sa, sb = os.fstat(a), os.fstat(b)
    except (OSError, ValueError, AttributeError):   # a stream without a descriptor (StringIO)
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino) or (os.isatty(a) and os.isatty(b)
                                                               and sa.st_rdev == sb.st_rdev)


class NarrationRenderer:
    """Shows narration on stderr as `[actor] cute human`; progress as a bar, redrawn in place
    on a terminal and printed at most every 10 % otherwise.

    Where stdout and stderr reach the same terminal (or file), generated text and narration
    share lines: a narration line that arrives while the text's line is open starts on a new
    line of its own (the line break goes to stderr), and the text goes on below it. stdout's own
    bytes never change."""

    def __init__(self, stream=None, text_fd=1):
        self.stream = stream or sys.stderr          #: where narration goes
        #: narration goes to a terminal: progress bars redraw in place
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.shared = same_output(text_fd, self.stream)   #: generated text shares our terminal or file
        #: the last text written ended mid-line (the main thread writes text; narration comes from
        #: that thread and from the ephemeral queen's output thread: both under `lock`)
        self.text_open = False
        self.lock = threading.Lock()      #: guards `text_open`, the bar and what reaches `stream`
        self._bar_open = False    #: a progress bar is drawn and its line not ended yet
        self._last_decile = {}    #: (actor, action) -> the last 10 % step printed, off a terminal

    def write(self, text):
        with self.lock:
            if self.text_open and self.shared:
                text, self.text_open = "\n" + text, False
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                pass

    def text_written(self, text):
        """The caller wrote generated `text` to stdout."""
        if text:
            with self.lock:
                self.text_open = not text.endswith("\n")

    def _end_bar(self):
        if self._bar_open:
            self.write("\n")
            self._bar_open = False

    def show(self, event):
        progress = event.get("progress")
        if isinstance(progress, dict) and progress.get("total"):
            return self._progress(event, progress)
        self._end_bar()
        cute = event.get("cute")
        self.write("[%s] %s%s\n" % (event.get("actor", "?"), cute + " " if cute else "", event.get("human", "")))

    def _progress(self, event, progress):
        done, total = int(progress.get("done", 0)), int(progress["total"])
        pct = min(100, int(done * 100 / total)) if total else 100
        filled = pct * 8 // 100
        line = "[%s] %s [%s%s] %d%% (%s / %s)" % (
            event.get("actor", "?"), event.get("bar_label", "Downloading..."), "█" * filled, "-" * (8 - filled),
            pct, human_bytes(done), human_bytes(total))
        key = (event.get("actor"), event.get("action"))
        if self.tty:
            self.write("\r\033[K" + line)
            self._bar_open = True
            if pct >= 100:
                self._end_bar()
        elif pct // 10 != self._last_decile.get(key):
            self._last_decile[key] = pct // 10
            self.write(line + "\n")

    def error(self, err):
        """`[component] ❌ Error: message`, the details indented, then a suggestion."""
        self._end_bar()
        lines = ["[%s] ❌ Error: %s" % (err.component or ACTOR_KEEPER, err.message), "    code: %s" % err.code]
        lines += ["    %s: %s" % (k, json.dumps(v) if isinstance(v, (dict, list)) else v)
                  for k, v in sorted(err.details.items())]
        if err.suggestion:
            lines.append("Suggestion: %s" % err.suggestion)
        self.write("\n".join(lines) + "\n")


_renderer = None


def stderr_renderer():
    """The process's one renderer on stderr: it keeps the state of the terminal's current line."""
    global _renderer
    if _renderer is None:
        _renderer = NarrationRenderer()
    return _renderer


# ============================================================================================
# HTTP and SSE: a threaded server whose roles declare routes, and a small client
# ============================================================================================



class SSEStream:
    """The response side of one Server-Sent-Events stream. Thread-safe; ends with exactly one
    terminal event (`finish`); a global pinger keeps silent streams alive. Subclasses speak the
    apps' dialects (OpenAIStream, NdjsonStream) over the same writer."""

    content_type = SSE_CONTENT_TYPE
    ping_frame = b": ping\n\n"    # what the pinger writes into a silent stream (None: nothing)

    _open = set()                  # the streams the pinger watches (guarded by _open_lock)
    _open_lock = threading.Lock()
    _pinger = None                 # the one pinger thread, started with the first stream

    def __init__(self, handler):
        self.handler = handler               #: the request handler whose socket this stream writes
        self.wfile = handler.wfile            #: its buffered writer (under `lock`)
        self.lock = threading.Lock()         #: one frame at a time (request thread, relays, pinger)
        self.finished = False                #: no frame may follow (set under `lock`, or by close)
        self.last_write = time.monotonic()   #: when a frame last left (under `lock`), for the pinger
        with contextlib.suppress(OSError):   # tokens must leave at once, not wait for Nagle
            handler.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        handler.send_response(200)
        handler.send_header("Content-Type", self.content_type)
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Connection", "close")
        handler.end_headers()
        with SSEStream._open_lock:
            SSEStream._open.add(self)
            if SSEStream._pinger is None:
                SSEStream._pinger = threading.Thread(target=SSEStream._ping_loop, daemon=True, name="sse-ping")
                SSEStream._pinger.start()

    def _write(self, data):
        with self.lock:
            if self.finished:
                raise ClientGone("stream already finished")
            try:
                self.wfile.write(data)
            except (OSError, ValueError) as exc:
                self.finished = True
                raise ClientGone(str(exc))
            self.last_write = time.monotonic()

    def send(self, event, data):
        self._write(("event: %s\ndata: %s\n\n" % (event, json_text(data))).encode())

    def narration(self, event):
        self.send(EVENT_NARRATION, event)

    def finish(self, event, data):
        """The one terminal event (one of TERMINAL_EVENTS)."""
        try:
            self.send(event, data)
        finally:
            self.close()

    def fail(self, err):
        """An error after the stream began, as this stream's dialect says it."""
        self.finish(EVENT_ERROR, err.envelope())

    def close(self):
        with self.lock:
            self.finished = True
        with SSEStream._open_lock:
            SSEStream._open.discard(self)

    def client_gone(self):
        """True when the client has closed its side (it sends nothing after its request)."""
        try:
            sock = self.handler.connection
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    @classmethod
    def _ping_loop(cls):
        while True:
            time.sleep(1.0)
            now = time.monotonic()
            with cls._open_lock:
                silent = [s for s in cls._open if s.ping_frame and now - s.last_write >= PING_INTERVAL]
            for stream in silent:
                with contextlib.suppress(ClientGone):
                    stream._write(stream.ping_frame)


def write_body(handler, status, content_type, body, headers=None, with_body=True):
    """A whole answer: status, headers, and `body` (bytes) unless `with_body` is false (HEAD)."""
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    if with_body:
        handler.wfile.write(body)


def write_json(handler, status, obj, headers=None):
    write_body(handler, status, "application/json", json_text(obj).encode(), headers)


class Request:
    """One HTTP request as a role's handler sees it."""

    def __init__(self, handler, params, query):
        self.handler = handler              #: http.server's handler of this connection
        self.params = params                #: the {name} parts of the route's path
        self.query = query                  #: the query string as a dict
        self.headers = handler.headers        #: the request's headers
        self.stream = None                  #: the SSE stream, once the handler opened one
        self._body = handler.read_body()
        self._json = None                   #: the body, parsed once and checked (the request's thread)

    @property
    def json(self):
        """The body as a JSON object, within MAX_JSON_DEPTH, its strings valid Unicode."""
        if self._json is None:
            self._json = parse_json_body(self._body)
        return self._json

    def bearer(self):
        auth = self.headers.get(AUTHORIZATION) or ""
        return auth[7:].strip() if auth[:7].lower() == "bearer " else None

    def require_bearer(self, expected, x_api_key=False):
        """Constant-time check of `Authorization: Bearer <key>` (`expected` None: no key is right);
        with `x_api_key` the key may come as `x-api-key: <key>` instead (Anthropic's clients)."""
        given = self.bearer() or (x_api_key and (self.headers.get(X_API_KEY) or "").strip())
        if not given:
            raise MissingApiKey("Missing API key (%s: Bearer ...%s)" % (AUTHORIZATION, " or %s: ..." % X_API_KEY
                                                                          if x_api_key else ""))
        import hmac
        if expected is None or not hmac.compare_digest(given.encode(), expected.encode()):
            raise InvalidApiKey("Invalid API key")

    def send_json(self, status, obj, headers=None):
        write_json(self.handler, status, obj, headers)

    def send_empty(self, status):
        self.handler.send_response(status)
        self.handler.send_header("Content-Length", "0")
        self.handler.end_headers()

    def sse(self, kind=None):
        """Open the streamed answer: rbee's SSE, or an app's dialect (OpenAIStream, NdjsonStream)."""
        self.stream = (kind or SSEStream)(self.handler)
        return self.stream


class RoleRequestHandling:
    """What every role's request handler does beyond http.server's BaseHTTPRequestHandler."""

    server_version = "rbee/" + __version__
    timeout = TOKEN_TIMEOUT            # a stalled peer cannot hold a handler thread forever
    protocol_version = "HTTP/1.0"    # one request per connection: SSE streams end by closing
    _body = None

    def read_body(self):
        """The request body, read once; 413 over 1 MiB (drained so the client sees the answer)."""
        if self._body is None:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                raise InvalidRequest("Chunked request bodies are not supported; send Content-Length")
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise InvalidRequest("Bad Content-Length header")
            if length < 0:
                raise InvalidRequest("Bad Content-Length header")
            if length > MAX_BODY:
                self._body = b""
                with contextlib.suppress(OSError):
                    self.connection.settimeout(5)
                    remaining = min(length, 64 * MAX_BODY)
                    while remaining > 0:
                        chunk = self.rfile.read(min(remaining, 1 << 16))
                        if not chunk:
                            break
                        remaining -= len(chunk)
                raise InvalidRequest("Request body over 1 MiB (%d bytes)" % length,
                                     {"limit_bytes": MAX_BODY, "content_length": length}, status=413)
            self._body = self._read_exactly(length) if length else b""
        return self._body

    def _read_exactly(self, length):
        """`length` bytes of body within BODY_TIMEOUT (a Content-Length larger than what comes is a
        400 then, not a handler held for the connection's whole timeout)."""
        deadline, chunks, have = time.monotonic() + BODY_TIMEOUT, [], 0
        try:
            while have < length:
                self.connection.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = self.rfile.read1(length - have)
                if not chunk:
                    break
                chunks.append(chunk)
                have += len(chunk)
        except (socket.timeout, OSError):
            pass
        finally:
            with contextlib.suppress(OSError):
                self.connection.settimeout(self.timeout)
        if have < length:
            self.close_connection = True
            raise InvalidRequest("The body ended after %d of %d bytes (Content-Length) within %d s" % (
                have, length, BODY_TIMEOUT), {"field": "body", "received_bytes": have, "content_length": length})
        return b"".join(chunks)

    def handle_one_request(self):
        with contextlib.suppress(ConnectionError, socket.timeout):
            super().handle_one_request()

    def parse_request(self):
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":   # (a bare `GET /`): it would get no status line
            self.send_error(400, "HTTP/0.9 requests are not supported; send HTTP/1.0 or 1.1")
            return False
        return True

    def __getattr__(self, name):
        # every method, known or not, goes to the role's dispatch: a wrong one is a 405 (or a 404
        # for a path nobody serves) in the envelope, never http.server's 501
        if name.startswith("do_"):
            return lambda: self.server.app.dispatch(self)
        raise AttributeError(name)

    def send_error(self, code, message=None, explain=None):
        """Protocol-level errors (a bad request line, an unsupported HTTP version) leave in the
        envelope too, always with a status line, and as 400s: they are the client's."""
        if self.request_version == "HTTP/0.9" or not getattr(self, "requestline", ""):
            self.request_version = "HTTP/1.0"   # so that send_response writes the status line
        status = 400 if code >= 500 else code
        envelope = InvalidRequest(message or "HTTP %d" % code, status=status).envelope()
        self.close_connection = True
        with contextlib.suppress(OSError):
            write_json(self, status, envelope, {"Connection": "close"})

    def end_headers(self):
        for name, value in self.server.app.extra_headers(self):
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, fmt, *args):   # access logs would drown the narration
        pass


def role_server(address, app, listening=None):
    """A threaded HTTP server for `app` on `address`, or on `listening`: a socket its parent bound
    and listens on (a hive's worker). http.server is imported here, on first use: it brings
    http.client and the email package (about 15 ms), which a keeper command never needs."""
    import socketserver
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class RoleHTTPServer(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 128

        def server_bind(self):
            # not HTTPServer.server_bind: it asks DNS for our own name (socket.getfqdn), which
            # blocks for 10 s on a host whose name does not resolve and whose DNS is unreachable
            if listening is None:
                socketserver.TCPServer.server_bind(self)
            else:
                self.socket.close()
                self.socket, self.server_address = listening, listening.getsockname()
            self.server_name, self.server_port = self.server_address[:2]

    server = RoleHTTPServer(address, type("RoleRequestHandler", (RoleRequestHandling, BaseHTTPRequestHandler), {}))
    server.app = app
    return server


def announce_ready(role, port, **fields):
    """The control line that tells the parent process this role serves on `port` (PROTOCOL.md §1)."""
    emit_line(dict({CONTROL: CONTROL_READY, "role": role, "port": port, "version": __version__}, **fields))


class App:
    """A role's HTTP API: its route table maps each route of the Protocol section, (METHOD,
    "/path/{param}"), to the function that handles it; a role gives its table to __init__."""

    component = "rbee"

    def __init__(self, routes):
        #: compiled once, read by every request; `{name}` is one path segment, `{name...}` the rest
        self._routes = [(method, re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", re.sub(
            r"\{(\w+)\.\.\.\}", r"(?P<\1>.+)", path)) + "$"), handler) for (method, path), handler in routes]
        self.server = None                  #: the HTTP server, once serve() bound it
        self.port = None                    #: the port it is bound to (written once by start)
        self.stopped = threading.Event()    #: set once the role has cleaned up; run_role then exits
        self.stopping = Once()              #: claimed by the first shutdown; later ones return at once

    def authorize(self, req, handler):
        """Raise MISSING_API_KEY/INVALID_API_KEY for a request the role must refuse (`handler`: its route's)."""

    def error_body(self, path, err):
        """The body of an error answer to a request for `path` (the queen speaks four dialects)."""
        return err.envelope()

    def extra_headers(self, handler):
        """Headers every answer to this request carries (CORS), as (name, value) pairs."""
        return ()

    def dispatch(self, handler):
        parts = urllib.parse.urlsplit(handler.path)
        matched = [(m, rx.match(parts.path), name) for m, rx, name in self._routes]
        matched = [(m, mo, name) for m, mo, name in matched if mo]
        req = None
        try:
            if not matched:
                handler.read_body()
                raise InvalidRequest("No such endpoint: %s" % parts.path, {"path": parts.path},
                                     status=404)
            route = next(((mo, name) for m, mo, name in matched if m == handler.command), None)
            if route is None:
                handler.read_body()
                allowed = sorted({m for m, _, _ in matched})
                raise InvalidRequest("%s not allowed on %s (allowed: %s)" % (
                    handler.command, parts.path, ", ".join(allowed)), {"allowed": allowed}, status=405)
            req = Request(handler, route[0].groupdict(), dict(urllib.parse.parse_qsl(parts.query)))
            self.authorize(req, route[1])
            route[1](req)
        except ClientGone:
            pass
        except Exception as exc:  # every failure leaves as an envelope, never as a traceback
            if not isinstance(exc, RbeeError) and getattr(exc, "code", None) not in RbeeError.by_code:
                if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                    return
                import traceback
                traceback.print_exc(file=sys.stderr)
            err = RbeeError.wrap(exc, self.component)
            with contextlib.suppress(ClientGone, OSError):
                if req is not None and req.stream is not None:
                    if not req.stream.finished:
                        req.stream.fail(err)
                else:
                    write_json(handler, err.status, self.error_body(parts.path, err), err.response_headers())
        finally:
            if req is not None and req.stream is not None:
                req.stream.close()

    def serve(self, host, port, listening=None):
        """Bind (port 0: any free port), or take `listening` (bound by the parent), and serve in a
        background thread; returns the bound port."""
        try:
            self.server = role_server((host, port), self, listening)
        except OSError as exc:
            raise PortInUse("%s cannot listen on %s:%d: %s" % (self.component, host, port, exc.strerror),
                            {"host": host, "port": port}, component=self.component)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                         daemon=True, name="http").start()
        self.port = self.server.server_address[1]
        return self.port

    def announce_ready(self, **fields):
        announce_ready(self.component, self.port, **fields)

    def stop_serving(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def _split_url(url):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise InvalidRequest("Not an http URL: %s" % url)
    return parts.hostname, parts.port or 80, (parts.path or "/") + ("?" + parts.query if parts.query else "")


def local_address(host):
    """The address at which this machine reaches a server of its own bound to `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


class HttpResponse:
    """The answer to one request on its own connection. Our servers speak HTTP/1.0, so a body
    without Content-Length (an SSE stream) ends when the server closes the connection.

    (A few lines of our own instead of http.client: the keeper runs once per command, and
    http.client with the email package it imports costs about 12 ms of every start.)"""

    def __init__(self, sock):
        self.sock = sock                  #: the connection (one request, one answer)
        self.fp = sock.makefile("rb")     #: buffered reader of the answer
        parts = self.fp.readline(65537).decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise OSError("not an HTTP answer")
        self.status = int(parts[1])       #: the HTTP status
        self.headers = {}                 #: lower-cased header names -> values
        for _ in range(100):
            line = self.fp.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                break
            key, _, value = line.decode("latin-1").partition(":")
            self.headers[key.strip().lower()] = value.strip()
        length = self.headers.get("content-length")
        self.length = int(length) if length and length.isdigit() else None   #: None: read to the close

    def read(self):
        if self.length is None:
            return self.fp.read()
        body = self.fp.read(self.length)
        if len(body) < self.length:   # (the connection was closed or cut in the middle of it)
            raise OSError("the answer ended after %d of its %d bytes" % (len(body), self.length))
        return body

    def readline(self):
        return self.fp.readline()

    def close(self):
        with contextlib.suppress(OSError):
            self.fp.close()
            self.sock.close()


def http_call(method, url, body=None, headers=None, timeout=30.0, attempts=HTTP_ATTEMPTS, component=None,
              on_connect=None):
    """Send one request; returns the open response (connect retried per PROTOCOL.md §9).
    `on_connect(sock)`: told its socket once connected, for another thread that may have to cut it.

    An error status raises RbeeError from the envelope.
    """
    host, port, path = _split_url(url)
    data = json.dumps(body).encode() if body is not None else b""
    hdrs = {"Host": "%s:%d" % (host, port), "Connection": "close", "Content-Length": str(len(data))}
    if body is not None:
        hdrs["Content-Type"] = "application/json"
    hdrs.update(headers or {})
    head = "%s %s HTTP/1.0\r\n%s\r\n" % (method, path, "".join("%s: %s\r\n" % kv for kv in hdrs.items()))
    last = None
    for attempt in range(attempts):
        try:
            sock = socket.create_connection((host, port), timeout=min(timeout, HTTP_CONNECT_TIMEOUT))
        except OSError as exc:
            last = exc
            if attempt + 1 < attempts:
                time.sleep(0.1 * (2 ** attempt))
            continue
        sock.settimeout(timeout)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if on_connect:
            on_connect(sock)
        try:
            sock.sendall(head.encode("latin-1") + data)
            resp = HttpResponse(sock)
        except OSError as exc:
            sock.close()
            raise hop_failed(method, url, exc, component)
        if resp.status >= 400:
            try:
                payload = json.loads(resp.read())
            except (OSError, ValueError):
                payload = {"error": {"code": "INTERNAL", "message": "HTTP %d from %s" % (resp.status, url)}}
            finally:
                resp.close()
            raise RbeeError.from_envelope(payload, resp.status, component)
        return resp
    raise ConnectionTimeout("Cannot connect to %s: %s" % (url, last), {"url": url},
                            component=component)


def hop_failed(method, url, exc, component):
    """The error of a request that got no whole answer: it timed out, or the hop closed, reset or
    cut the connection (an ssh forward whose worker is gone; a node the queen saw go)."""
    host, port, _ = _split_url(url)
    kind = ConnectionTimeout if isinstance(exc, socket.timeout) else WorkerCrashed
    return kind("%s %s failed: %s" % (method, url, exc), {"url": url},
                "Run the command again; if it repeats, see the logs under $RBEE_HOME/logs on the machine "
                "that serves %s:%d" % (host, port), component=component)


def http_json(method, url, body=None, headers=None, timeout=30.0, attempts=HTTP_ATTEMPTS, component=None,
              on_connect=None):
    resp = http_call(method, url, body, headers, timeout, attempts, component, on_connect)
    try:
        raw = resp.read()
    except OSError as exc:
        raise hop_failed(method, url, exc, component)
    finally:
        resp.close()
    return json.loads(raw) if raw else {}


def iter_sse(resp):
    """Yield (event, data) from an SSE response until the server closes it; a `: ping` comes
    as ("ping", None), so that a reader can tell a live but silent stream from progress."""
    event, data = "message", []
    while True:
        raw = resp.readline()
        if not raw:
            return
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                try:
                    payload = json.loads("\n".join(data))
                except ValueError:
                    payload = {"raw": "\n".join(data)}
                yield event, payload
            event, data = "message", []
        elif line.startswith(":"):
            yield EVENT_PING, None
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)


def sse_call(method, url, body=None, headers=None, timeout=TOKEN_TIMEOUT, component=None, on_connect=None):
    """Open an SSE endpoint; returns (response, iterator of (event, data))."""
    resp = http_call(method, url, body, headers, timeout=timeout, component=component, on_connect=on_connect)
    return resp, iter_sse(resp)


def bearer(token):
    return {AUTHORIZATION: "Bearer " + token} if token else {}


# ============================================================================================
# Role clients: one per role, the one caller of that role's routes; the secrets they carry
# ============================================================================================

SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")   # a variable whose name has one holds a secret


def is_secret(name):
    return any(word in name.upper() for word in SECRET_WORDS)


def masked_env(env):
    """`env` to show a person: the values of variables that hold a secret replaced by ****."""
    return {k: "****" if is_secret(k) else v for k, v in (env or {}).items()}


def is_loopback(host):
    return host == "localhost" or host == "::1" or host.startswith("127.")


def checked_secret(secret, source):
    """A key as an HTTP header can carry it: printable ASCII, not empty (an empty key would
    switch the check off)."""
    if not secret or not all(33 <= ord(c) < 127 for c in secret):
        raise InvalidRequest("The key in %s is empty or not printable ASCII" % source, {"source": source},
                             "Use a key of letters, digits and punctuation, e.g. from `openssl rand -hex 24`")
    return secret


def read_secret(path, source):
    try:
        with open(path) as f:
            secret = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest("Cannot read the key file %s: %s" % (path, getattr(exc, "strerror", None) or exc),
                             {"file": path}, "Give a file that holds the key on its first line")
    return checked_secret(secret, source)


def role_secret(component, key_file, env_name, created_name, host):
    """The bearer secret a role requires (None: it requires none). From the file given on its
    command line, else from $ENV_NAME, else, for a role bound to an address the network reaches,
    from $RBEE_HOME/CREATED_NAME, created (0600) the first time. Never from argv, never logged."""
    if key_file:
        return read_secret(os.path.expanduser(key_file), key_file)
    if os.environ.get(env_name):
        return checked_secret(os.environ[env_name], "$" + env_name)
    path = rbee_home(created_name)
    if is_loopback(host) and not os.path.exists(path):
        return None
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_secret(path, path)
    secret = random_id(24)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    narrate(component, "key_created", "Created a key for %s in %s (readable by you alone); clients send it as "
            "%s: Bearer KEY" % (component, path, AUTHORIZATION), "🔑", path=path)
    return secret


def queen_key():
    """The key the keeper sends its queen: $RBEE_API_KEY, else the one a queen created here."""
    if os.environ.get(ENV_API_KEY):
        return checked_secret(os.environ[ENV_API_KEY], "$" + ENV_API_KEY)
    if os.path.exists(rbee_home("api-key")):
        return read_secret(rbee_home("api-key"), rbee_home("api-key"))
    return None


class RoleClient:
    """Calls one role's HTTP API: plain JSON answers, and streams relayed until their terminal event."""

    component = "rbee"

    def __init__(self, url, token=None, node=None):
        self.url = url.rstrip("/")    #: the role's base URL, as this caller reaches it
        self.token = token            #: its bearer token or key (None: it asks for none)
        self.node = node              #: the node it runs on, for messages (None: not known)
        #: the socket of its latest request, for a thread that must cut it (the calling thread)
        self.connection = None
        self.cut_off = False          #: cut() was called: its requests fail at once (the cutting thread)

    # Each side writes its own field before it reads the other's, so whichever comes second
    # shuts the socket down: a request that connects while it is cut off does not get through.
    def connected(self, sock):
        self.connection = sock
        if self.cut_off:
            self.cut()

    def cut(self):
        """End its request in flight and any later one, from another thread: their reads fail (OSError)."""
        self.cut_off = True
        with contextlib.suppress(OSError, AttributeError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def gone(self, route):
        """The role stopped in the middle of its answer: which one, where, and what to do."""
        where = " on %s" % self.node if self.node else ""
        return WorkerCrashed("%s%s stopped before it finished %s %s" % (self.component, where, route[0], route[1]),
                             {"hop": self.component, "node": self.node, "url": self.url},
                             "Run the command again; if it repeats, see %s's log under $RBEE_HOME/logs%s" % (
                                 self.component, " (the queen's machine keeps hive-%s.log)" % self.node
                                 if self.node else ""), self.component)

    def call(self, route, body=None, timeout=30.0, attempts=HTTP_ATTEMPTS, query=None, **params):
        method, path = route
        path = path.format(**{k: urllib.parse.quote(str(v), safe="") for k, v in params.items()})
        if query:
            path += "?" + urllib.parse.urlencode(query)
        return http_json(method, self.url + path, body, bearer(self.token), timeout, attempts, self.component,
                         self.connected)

    def open_stream(self, route, body, timeout=TOKEN_TIMEOUT):
        """(response, iterator of (event, data)) of a streaming endpoint."""
        return sse_call(route[0], self.url + route[1], body, bearer(self.token), timeout=timeout,
                        component=self.component, on_connect=self.connected)

    def relay(self, route, body, sink, timeout=TOKEN_TIMEOUT):
        """POST to a streaming endpoint: its narration goes to `sink`, its `error` is raised, and
        the data of its terminal event is returned."""
        resp, events = self.open_stream(route, body, timeout)
        try:
            for event, data in events:
                if event == EVENT_NARRATION:
                    sink(data)
                elif event == EVENT_ERROR:
                    raise RbeeError.from_envelope(data, component=self.component)
                elif event in TERMINAL_EVENTS:
                    return data
        except OSError:   # (a reset connection; the end of the stream is the same news, below)
            pass
        finally:
            resp.close()
        raise self.gone(route)


class WorkerClient(RoleClient):
    """A worker (PROTOCOL.md §5.1): jobs for the keeper and the tests, health and shutdown for
    its hive."""

    component = ACTOR_WORKER

    def __init__(self, url, api_key=None, worker_id=None, node=None):
        super().__init__(url, api_key, node)
        self.worker_id = worker_id or self.url   #: its id, for messages

    def health(self, timeout=2.0):
        return self.call(WORKER_HEALTH, timeout=timeout, attempts=1)

    def cancel(self, job_id, timeout=2.0):
        """Ask the worker to stop a job (it stays up for the next one); a gone worker is no error."""
        with contextlib.suppress(RbeeError, OSError):
            self.call(WORKER_CANCEL, {"job_id": job_id}, timeout=timeout, attempts=1)

    def shutdown(self, timeout=5.0, lost=None):
        self.call(WORKER_SHUTDOWN, {"lost": lost} if lost else {}, timeout=timeout, attempts=1)

    def tokenize(self, body):
        """How many tokens the prompt of an /execute body is (its template and tools included)."""
        return self.call(WORKER_TOKENIZE, body, timeout=30.0, attempts=1)["tokens"]

    def embed(self, body):
        """{embeddings, prompt_tokens, dimensions} of an /embed body."""
        return self.call(WORKER_EMBED, body, timeout=self.batch_timeout(body.get("input")), attempts=1)

    def rerank(self, body):
        """{scores, prompt_tokens} of a /rerank body."""
        return self.call(WORKER_RERANK, body, timeout=self.batch_timeout(body.get("documents")), attempts=1)

    @staticmethod
    def batch_timeout(items):
        """How long a worker may take over a batch answered at once: the token timeout, and a
        second more per input (256 inputs of 60 tokens take 60-250 s on a busy 2-core CPU node)."""
        return TOKEN_TIMEOUT + (len(items) if isinstance(items, list) else 1)

    def execute(self, body, on_busy=None, retries=BUSY_RETRIES):
        """Run a job: yields JobStarted, Narration, Token and ToolCallDelta, then JobEnded; raises the job's
        error. A busy worker (503) is retried after `retries` seconds (`on_busy(delay)` first).
        No token for TOKEN_TIMEOUT s, an interrupt, or a caller that lets go of the generator
        (close it: `contextlib.closing`) cancels the job on the worker."""
        body = dict(body, job_id=body.get("job_id") or "job-" + random_id(6))
        for delay in tuple(retries) + (None,):
            try:
                resp, events = self.open_stream(WORKER_EXECUTE, body)
                break
            except SlotsBusy:
                if delay is None:
                    raise
                if on_busy:
                    on_busy(delay)
                time.sleep(delay)
        tokens, last_token, ended, queued = 0, time.monotonic(), False, False
        try:
            for event, data in events:
                if event == EVENT_TOKEN:
                    tokens, last_token = tokens + 1, time.monotonic()
                    yield Token(data.get("t", ""), data.get("i"), data.get("lp"))
                elif event == EVENT_TOOL_CALL:
                    tokens, last_token = tokens + 1, time.monotonic()
                    yield ToolCallDelta(data.get("index", 0), data.get("id"), data.get("name"),
                                        data.get("arguments", ""))
                elif event == EVENT_NARRATION:
                    yield Narration(data)
                elif event == EVENT_STARTED:
                    queued, last_token = False, time.monotonic()
                    yield JobStarted(data.get("job_id"), data.get("worker_id"))
                elif event == EVENT_QUEUED:
                    queued = True   # (waiting for a slot is no stall: the pings say the worker lives)
                    yield Queued(data.get("position"))
                elif event == EVENT_END:
                    ended = True
                    yield JobEnded(data)
                    return
                elif event == EVENT_ERROR:
                    ended = True
                    raise RbeeError.from_envelope(data, component=self.component)
                if event != EVENT_TOKEN and not queued and time.monotonic() - last_token > TOKEN_TIMEOUT:   # stuck
                    raise socket.timeout()
        except socket.timeout:
            raise ConnectionTimeout("No token from worker %s for %d s" % (self.worker_id, TOKEN_TIMEOUT),
                                    {"tokens_generated": tokens, "worker_id": self.worker_id, "node": self.node},
                                    "The node may be overloaded; run the job again", self.component)
        except OSError:
            pass   # the connection broke: the worker is gone (below)
        finally:
            if not ended:
                self.cancel(body["job_id"])
            resp.close()
        raise WorkerCrashed("Worker %s%s stopped mid-stream after %d tokens" % (
            self.worker_id, " on %s" % self.node if self.node else "", tokens),
                            {"tokens_generated": tokens, "worker_id": self.worker_id, "node": self.node},
                            "Run the command again; if it repeats, see the worker's log on %s under "
                            "$RBEE_HOME/logs" % (self.node or "its node"), self.component)


class HiveClient(RoleClient):
    """A hive (PROTOCOL.md §5.2): the queen's calls, and the worker's ready callback."""

    component = ACTOR_HIVE

    def health(self, timeout=2.0):
        return self.call(HIVE_HEALTH, timeout=timeout, attempts=1)

    def workers(self):
        return self.call(HIVE_WORKERS, timeout=10)["workers"]

    def spawn(self, body, sink):
        """A worker for the body's model (provisioned and started if needed): its `worker` event."""
        return self.relay(HIVE_SPAWN, body, sink, timeout=LOADING_TIMEOUT + 60)

    def ready(self, body):
        return self.call(HIVE_READY, body, timeout=10)

    def shutdown_worker(self, worker_id, lost=None):
        """Stop a worker; `lost` ({node, endpoint}): a split's part died, its jobs end WORKER_CRASHED."""
        return self.call(HIVE_WORKER_SHUTDOWN, {"lost": lost} if lost else None, worker_id=worker_id)

    def models(self):
        return self.call(HIVE_MODELS, timeout=10)["models"]

    def model_info(self, model_ref):
        """{model_ref, filename, metadata}: a cataloged model's GGUF header (gguf_metadata)."""
        return self.call(HIVE_MODEL_INFO, query={"model": model_ref}, timeout=30)

    def resources(self, model_ref=None, build=False, timeout=None):
        query = dict({"model": model_ref} if model_ref else {}, **({"build": "1"} if build else {}))
        return self.call(HIVE_RESOURCES, query=query or None, timeout=timeout or (60 if build else 15), attempts=1)

    def rpc_start(self, body, sink):
        """A part lent to a split: its start-up narrated to `sink`, then its {rpc_id, endpoint, ...}
        (a part that seeds its tensor cache from its own copy of the model reads it all first)."""
        return self.relay(HIVE_RPC_START, body, sink, timeout=LOADING_TIMEOUT + 60 if body.get("model_ref") else 90)

    def rpc_stop(self, rpc_id):
        return self.call(HIVE_RPC_STOP, {"rpc_id": rpc_id}, timeout=15)

    def download(self, model_ref, sink):
        return self.relay(HIVE_DOWNLOAD, {"model_ref": model_ref}, sink, timeout=LOADING_TIMEOUT + 60)

    def remove(self, model_ref):
        return self.call(HIVE_REMOVE, {"model_ref": model_ref})

    def shutdown(self, timeout=5.0):
        self.call(HIVE_SHUTDOWN, {}, timeout=timeout, attempts=1)


class QueenClient(RoleClient):
    """A queen (PROTOCOL.md §5.3): every command of the keeper goes through it."""

    component = ACTOR_QUEEN

    def alive(self):
        try:
            self.call(QUEEN_HEALTH, timeout=1.0, attempts=1)
            return True
        except RbeeError:
            return False

    def task(self, body, sink):
        """A worker for the task (the hive started and the model loaded if needed): its `worker` event."""
        return self.relay(QUEEN_TASKS, body, sink, timeout=LOADING_TIMEOUT + 60)

    def workers(self, node=None):
        return self.call(QUEEN_WORKERS, query={"node": node} if node else None, timeout=60)["workers"]

    def shutdown_worker(self, node, worker_id):
        return self.call(QUEEN_WORKER_SHUTDOWN, {"node": node, "worker_id": worker_id}, timeout=60)

    def models(self, node):
        return self.call(QUEEN_MODELS, query={"node": node}, timeout=60)["models"]

    def download(self, node, model_ref, sink):
        return self.relay(QUEEN_DOWNLOAD, {"node": node, "model_ref": model_ref}, sink,
                          timeout=LOADING_TIMEOUT + 60)

    def remove(self, node, model_ref):
        return self.call(QUEEN_REMOVE, {"node": node, "model_ref": model_ref}, timeout=60)

    def status(self):
        return self.call(QUEEN_STATUS, timeout=60)

    def shutdown(self):
        return self.call(QUEEN_SHUTDOWN, {}, timeout=10)


# ============================================================================================
# Processes: children that narrate on stdout, lifelines on stdin, signals, graceful stops
# ============================================================================================

class ChildOutput(threading.Thread):
    """A Child's reader: every line of its stdout goes to its log; JSON narration lines go to
    `on_event`, control lines to `on_control`, other lines are kept as its tail (the last words of
    a crashed child); `on_exit(code)` runs when it ends."""

    def __init__(self, proc, name, log, on_event, on_control, on_exit):
        super().__init__(daemon=True, name="out-" + name)
        self.proc = proc                  #: the child whose stdout this thread reads
        self.on_event = on_event          #: called (in this thread) with each narration event
        self.on_control = on_control      #: called (in this thread) with each control line
        self.on_exit = on_exit            #: called (in this thread) with its exit code
        self.log = log                    #: the file that gets every line (closed at the end)
        self.tail = collections.deque(maxlen=20)   #: its last lines that were not JSON (this thread)

    def run(self):
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with contextlib.suppress(OSError, ValueError):
                self.log.write(line + "\n")
                self.log.flush()
            event = None
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
            if isinstance(event, dict) and CONTROL in event and "actor" not in event:
                with contextlib.suppress(Exception):   # a malformed line must not end this reader
                    self.on_control(event)
            elif isinstance(event, dict) and "actor" in event:
                with contextlib.suppress(Exception):
                    self.on_event(event)
            elif line.strip():
                self.tail.append(line)
        code = self.proc.wait()
        self.log.close()
        self.on_exit(code)


def open_log(name):
    """$RBEE_HOME/logs/NAME for appending, readable by its owner only: what a process printed,
    for when it fails."""
    os.makedirs(rbee_home("logs"), mode=0o700, exist_ok=True)
    path = rbee_home("logs", name)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)   # (a log from an older rbee may have been readable by all)
    return os.fdopen(fd, "a")


def spawn_child(argv, env=None, cwd=None, pass_fds=()):
    """A child with its stdin as lifeline, stdout+stderr captured, in its own process group
    (a Ctrl-C meant for the keeper must not reach it; the parent stops it on purpose); `pass_fds`:
    the descriptors besides those it inherits (a worker's listening socket)."""
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, cwd=cwd, start_new_session=True, bufsize=0, pass_fds=pass_fds)


# A role that rbee starts runs from the cached bytecode of rbee.py (its __pycache__, written by
# the first such start) instead of compiling the source again, as `python rbee.py` must: tens of
# ms of every start. Its argv still reads `rbee.py ROLE ...` (sys.argv too); where the cache
# cannot be written, Python compiles in memory and the role starts all the same. The cache is
# written even under PYTHONDONTWRITEBYTECODE (for rbee.py alone: a role's start is what it is for).
ROLE_BOOT = ("import os, sys; sys.argv = sys.argv[1:]; "
             "sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0]))); "
             "keep, sys.dont_write_bytecode = sys.dont_write_bytecode, False; import rbee; "
             "sys.dont_write_bytecode = keep; sys.exit(rbee.main(sys.argv[1:]))")


def role_argv(args, python=None, rbee_py=RBEE_PY):
    """The command line that runs `rbee.py ARGS` (a role) from rbee.py's cached bytecode."""
    return [python or sys.executable, "-u", "-c", ROLE_BOOT, rbee_py] + list(args)


def kill_group(proc, sig=signal.SIGKILL):
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(OSError):
        proc.send_signal(sig)


def stop_child(proc, graceful=None, timeout=GRACEFUL_TIMEOUT):
    """Ask nicely (`graceful()`, else SIGTERM), close its lifeline, SIGKILL after `timeout`."""
    if proc.poll() is None:
        try:
            if graceful is None:
                raise OSError
            graceful()
        except Exception:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(OSError):
        proc.stdin.close()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        proc.wait()


class Child:
    """A process of rbee's that narrates and reports ready: a hive's worker and RPC part, the
    queen's hive (a local child, or an ssh session), the keeper's queen. Once its owner has
    registered it, `listen()` starts the thread that reads its stdout (narration to `on_event`,
    its ready line kept, `on_exit` at its end); it is waited for with a deadline, and stopped
    gracefully, then killed."""

    def __init__(self, name, argv, on_event, on_exit=None, env=None, cwd=None, hello=None, on_ready=None,
                 pass_fds=()):
        self.name = name                  #: what it is, for its log's name and for messages
        self.on_exit = on_exit            #: called (in the output thread) with its exit code, once it ended
        self.on_ready = on_ready          #: called (in the output thread) with its ready line, once it came
        self.ready = threading.Event()    #: its ready control line came (output thread)
        self.exited = threading.Event()   #: its process ended (output thread, before on_exit)
        self.ready_line = {}              #: that line: port, version, ... (output thread, before `ready`)
        self.proc = spawn_child(argv, env, cwd, pass_fds)   #: its process (stdin: its lifeline)
        if hello is not None:   # the first line on its stdin (a hive's handshake), then the lifeline
            with contextlib.suppress(OSError):
                self.proc.stdin.write((json.dumps(hello) + "\n").encode())
                self.proc.stdin.flush()
        #: the thread that reads its stdout (started by listen); its `tail`: the last lines that were not JSON
        self.output = ChildOutput(self.proc, name, open_log(name + ".log"), on_event, self._control, self._exited)

    def listen(self):
        """Start reading its output: from now on its callbacks may run (its owner knows it by now)."""
        self.output.start()
        return self

    def _control(self, line):
        if line.get(CONTROL) == CONTROL_READY and isinstance(line.get("port"), int):
            self.ready_line = line
            self.ready.set()
            if self.on_ready:
                self.on_ready(line)

    def _exited(self, code):
        self.exited.set()
        if self.on_exit:
            self.on_exit(code)

    def wait(self, timeout, event=None):
        """Whether `event` (default: its ready line) came within `timeout` s; False as soon as it exits."""
        event, deadline = event or self.ready, time.monotonic() + timeout
        while not event.wait(0.02):
            if self.exited.is_set() or time.monotonic() > deadline:
                return event.is_set()
        return True

    def last_words(self, lines=8):
        """What it printed last that was no JSON (a traceback), once its output has ended."""
        self.output.join(2)
        return list(self.output.tail)[-lines:]

    def stop(self, graceful=None, timeout=GRACEFUL_TIMEOUT):
        """Ask nicely (`graceful()`, else SIGTERM), close its lifeline, SIGKILL after `timeout`."""
        stop_child(self.proc, graceful, timeout)

    def kill(self):
        if self.proc.poll() is None:
            kill_group(self.proc)
            self.proc.wait()


def in_parallel(function, items):
    """Call function(item) for every item at once and wait for all (children stop together); what
    they narrate goes where the caller's narration goes."""
    sink = _current_sink()

    def call(item):
        with narration_to(sink):
            function(item)
    threads = [threading.Thread(target=call, args=(item,), daemon=True) for item in items]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def watch_lifeline(on_eof):
    """Call `on_eof` when our stdin reaches EOF: the parent died or let go of us.

    Reads the file descriptor itself: a thread blocked in sys.stdin's buffered reader would make
    the interpreter abort at exit."""
    def watch():
        with contextlib.suppress(OSError):
            while os.read(0, 4096):
                pass
        on_eof("stdin closed (lifeline)")
    threading.Thread(target=watch, daemon=True, name="lifeline").start()


def on_stop_signals(stop, signals=(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)):
    """Run `stop(reason)` in a thread on SIGTERM/SIGINT/SIGHUP (a handler must not block)."""
    def handler(signum, _frame):
        threading.Thread(target=stop, args=("signal %s" % signal.Signals(signum).name,), daemon=True).start()
    for sig in signals:
        signal.signal(sig, handler)


def run_role(role, lifeline):
    """The life of a long-lived role: start it, stop it on SIGTERM/SIGINT/SIGHUP or (with
    --lifeline) when stdin closes, exit 0 once it has cleaned up. A failed start is narrated on
    stdout (the parent reads it) and raised (the user reads it on stderr)."""
    on_stop_signals(role.shutdown)
    if lifeline:
        watch_lifeline(role.shutdown)
    try:
        role.start()
    except Exception as exc:
        err = RbeeError.wrap(exc, role.component)
        narrate(role.component, "error", "%s failed to start: %s" % (role.component, err.message), "❌",
                level="error", error=err.envelope()["error"])
        raise err
    while not role.stopped.wait(1.0):
        pass
    sys.stdout.flush()
    os._exit(0)   # daemon threads may still hold sockets; the role has already cleaned up


def bound_socket(host, start):
    """A TCP socket bound, as our servers bind, to the first free port from `start` (0: any free port)."""
    for port in range(start, start + 1000):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return sock
        except OSError:
            sock.close()
    raise PortInUse("No free port from %d on %s" % (start, host), {"host": host, "port": start})


def free_port(host, start):
    """A port that was free a moment ago (a child that binds it itself may find it taken by then)."""
    with bound_socket(host, start) as sock:
        return sock.getsockname()[1]


# ============================================================================================
# ssh: the OpenSSH client, never a tty, options for a dependable long-lived session
# ============================================================================================

class SshTarget:
    """How to reach one node: `argv(command)` is the ssh command line that runs `command` there."""

    def __init__(self, host, port=22, user=None, key=None, connect_timeout=10):
        self.host = host                  #: a host name, address or ~/.ssh/config alias
        self.port = int(port or 22)           #: sshd's port on the node
        self.user = user                  #: None: ssh's default (config, or the local user)
        self.key = key                    #: a private key file, or None: ssh's own choice
        self.connect_timeout = connect_timeout  #: seconds for ssh to connect (ConnectTimeout)

    @classmethod
    def for_node(cls, node):
        return cls(node["ssh_host"], node.get("ssh_port") or 22, node.get("ssh_user"), node.get("ssh_key_path"))

    def argv(self, command):
        return self._options() + ["--", self.host, command]   # after --, a host can never be read as an option

    def control(self, operation, *args):
        """The ssh command line of a control operation (`forward`, `check`) on this node's master
        connection: the one of its hive's session, which ControlMaster=auto made the master."""
        return self._options() + ["-O", operation] + list(args) + ["--", self.host]

    def _options(self):
        args = ["ssh", "-T"]
        config = os.environ.get(ENV_SSH_CONFIG)
        if config:
            args += ["-F", os.path.abspath(os.path.expanduser(config))]
        control_dir = os.path.join("/tmp", "rbee-ssh-%d" % os.getuid())
        with contextlib.suppress(OSError):
            os.makedirs(control_dir, mode=0o700, exist_ok=True)
        for option in ("BatchMode=yes", "ConnectTimeout=%d" % self.connect_timeout, "ServerAliveInterval=5",
                       "ServerAliveCountMax=3", "ControlMaster=auto", "ControlPersist=no",
                       "ControlPath=%s/%%C" % control_dir, "LogLevel=ERROR"):
            args += ["-o", option]
        if self.key:
            args += ["-i", os.path.expanduser(self.key), "-o", "IdentitiesOnly=yes"]
        if self.port != 22:
            args += ["-p", str(self.port)]
        if self.user:
            args += ["-l", self.user]
        return args

    def address(self):
        """The node's network address: ssh's own resolution of the host (an alias in
        ~/.ssh/config names a HostName there), which the queen also uses for HTTP."""
        argv = self.argv("true")
        try:
            out = subprocess.run(argv[:1] + ["-G"] + argv[1:-1], capture_output=True, text=True, timeout=5)
            for line in out.stdout.splitlines():
                key, _, value = line.partition(" ")
                if key == "hostname" and value:
                    return value.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
        return self.host

    def __str__(self):
        return "%s%s:%d" % (self.user + "@" if self.user else "", self.host, self.port)


def ssh_auth_failed(stderr):
    lowered = (stderr or "").lower()
    return "permission denied" in lowered or "authentication" in lowered


def ssh_failure(target, stderr, node=None, attempts=SSH_ATTEMPTS, component=ACTOR_QUEEN):
    """SSH_FAILED with a reason a user can act on, from ssh's own words."""
    text = (stderr or "").strip()
    lowered = text.lower()
    if ssh_auth_failed(text):
        why, hint = "authentication failed", ("Check the node's --ssh-key and --ssh-user: "
                                              "`ssh %s` must log in without a password" % target)
    elif "host key verification failed" in lowered:
        why, hint = "host key verification failed", "Add the host key: ssh-keyscan -p %d %s >> ~/.ssh/known_hosts" % (
            target.port, target.host)
    elif "could not resolve" in lowered:
        why, hint = "unknown host", "Check the node's --ssh-host (%s)" % target.host
    else:
        why, hint = "host unreachable", "Check that %s is up and sshd listens on port %d" % (target.host, target.port)
    return SshFailed("SSH to %s failed after %d attempt%s: %s" % (
        target, attempts, "s" if attempts != 1 else "", why),
                     {"node": node, "ssh_host": target.host, "ssh_port": target.port, "attempts": attempts,
                      "ssh_said": text[-400:]},
                     hint + (" (then `rbee.py nodes check %s`)" % node if node else ""), component=component)


def with_ssh_retries(target, node, attempt, actor=ACTOR_QUEEN, attempts=SSH_ATTEMPTS):
    """Call `attempt()` until ssh gets through, PROTOCOL.md §9: 3 attempts, 0/200/400 ms apart, the
    backoff narrated. `attempt` returns (result, None), or (None, ssh's words) when ssh itself
    failed. A refused key is final at once: retrying cannot help."""
    for number in range(1, attempts + 1):
        if number > 1:
            narrate(actor, "ssh_retry", "SSH to %s failed (attempt %d/%d), retrying in %d ms" % (
                node or target, number - 1, attempts, SSH_BACKOFF[number - 1] * 1000), "🔁", node=node)
            time.sleep(SSH_BACKOFF[number - 1])
        result, said = attempt()
        if said is None:
            return result
        if ssh_auth_failed(said):
            break
    raise ssh_failure(target, said, node, number, actor)


def ssh_run(target, command, timeout=60, node=None, stdin_data=None, actor=ACTOR_QUEEN, attempts=SSH_ATTEMPTS):
    """Run `command` on the node; ssh's own failures (exit 255) are retried per PROTOCOL.md §9."""
    def attempt():
        try:
            out = subprocess.run(target.argv(command), input=stdin_data, capture_output=True,
                                 timeout=timeout, stdin=None if stdin_data is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ConnectionTimeout("SSH command on %s took over %d s" % (target, timeout),
                                    {"node": node}, "Check the node's load and network", actor)
        return (None, out.stderr.decode("utf-8", "replace")) if out.returncode == 255 else (out, None)
    return with_ssh_retries(target, node, attempt, actor, attempts)


def shell_path(path):
    """`path` quoted for the node's shell, with a leading ~/ left for that shell to expand."""
    return '"$HOME"/' + shlex.quote(path[2:]) if path.startswith("~/") else shlex.quote(path)


def remote_command(rbee_dir, python, args, env=None):
    """A shell command line for the node: cd to rbee's dir and exec Python on rbee.py (a role,
    from its cached bytecode: role_argv)."""
    quoted_dir = shell_path(rbee_dir or "~/.rbee/app")
    env_part = " ".join(shlex.quote("%s=%s" % kv) for kv in sorted((env or {}).items()))
    argv = role_argv(args, "python", "rbee.py")[1:]
    return "cd %s && exec %s%s %s" % (quoted_dir, "env " + env_part + " " if env_part else "",
                                      shell_path(python or "python3"), " ".join(shlex.quote(a) for a in argv))


# ============================================================================================
# Models: the SQLite catalog (PROTOCOL.md §3), provisioning from Hugging Face
# ============================================================================================

GGUF_MAGIC = b"GGUF"    # the first 4 bytes of every GGUF file


QUANT_PREFERENCE = ("Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1", "Q5_K_M", "Q5_0", "Q8_0", "F16")


# GGUF's value types (the header's metadata): scalars by struct format, then strings and arrays
GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9
GGUF_MAX_STRING = 1 << 24          # a longer string is no header this reader takes (a corrupt length)
GGUF_TOKENS = "tokenizer.ggml.tokens"
FIM_KEY = "tokenizer.ggml.fim_%s_token_id"   # % pre, suf, mid, pad, rep, sep
FIM_OLD_NAMES = {"pre": "tokenizer.ggml.prefix_token_id", "suf": "tokenizer.ggml.suffix_token_id",
                 "mid": "tokenizer.ggml.middle_token_id"}   # (older GGUFs'; llama.cpp reads both)
# The texts by which llama.cpp's vocabulary finds the FIM tokens a GGUF does not declare (llama-vocab.cpp)
FIM_TOKEN_TEXTS = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>", "\u2581<PRE>",
            "<|code_prefix|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>", "\u2581<SUF>",
            "<|code_suffix|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>", "\u2581<MID>",
            "<|code_middle|>"),
    "pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "sep": ("<|file_sep|>",),
}


# general.file_type's values (llama.cpp's LLAMA_FTYPE) by the names Ollama gives a model's quantization
GGUF_FILE_TYPES = {number: name for number, name in enumerate((
    "F32 F16 Q4_0 Q4_1 - - - Q8_0 Q5_0 Q5_1 Q2_K Q3_K_S Q3_K_M Q3_K_L Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K IQ2_XXS IQ2_XS "
    "Q2_K_S IQ3_XS IQ3_XXS IQ1_S IQ4_NL IQ3_S IQ3_M IQ2_S IQ2_M IQ4_XS IQ1_M BF16 - - - TQ1_0 TQ2_0 MXFP4").split())
    if name != "-"}


def gguf_metadata(path, find_fim=True, enough=None, lengths=None):
    """The metadata of a GGUF file's header, read with the standard library: {key: value} of every
    number, bool and string in it (arrays are read past), or None when it is no GGUF this can read.
    The FIM tokens' ids (FIM_KEY % pre|suf|mid|pad|rep|sep) are there as llama.cpp's vocabulary
    finds them: declared (or under their old names), else, with `find_fim`, the first token of the
    vocabulary whose text is one of FIM_TOKEN_TEXTS (the token list is read for nothing else).
    `enough(metadata)`: true once the caller has what it needs; the rest is not read (a vocabulary
    of 150k tokens takes a few hundred ms to read past). `lengths`: a dict that gets the number of
    items of every array read past, by its key (asked before the items are read past)."""
    wanted = {text.encode(): name for name, texts in FIM_TOKEN_TEXTS.items() for text in texts}
    by_text, n_tokens = {}, None

    def read(f, fmt):
        data = f.read(struct.calcsize(fmt))
        if len(data) != struct.calcsize(fmt):
            raise ValueError("truncated")
        return struct.unpack(fmt, data)[0]

    def raw_text(f):
        size = read(f, "<Q")
        if size > GGUF_MAX_STRING:
            raise ValueError("a string of %d bytes" % size)
        data = f.read(size)
        if len(data) != size:
            raise ValueError("truncated")
        return data

    def skip(f, kind):
        if kind == GGUF_STRING:
            f.seek(read(f, "<Q"), 1)
        elif kind == GGUF_ARRAY:
            skip_items(f, read(f, "<I"), read(f, "<Q"))
        else:
            f.seek(struct.calcsize(GGUF_SCALARS[kind]), 1)

    def skip_items(f, item, count):
        if item in GGUF_SCALARS:
            f.seek(struct.calcsize(GGUF_SCALARS[item]) * count, 1)
        else:
            for _ in range(count):
                skip(f, item)
    metadata = {}
    try:
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                return None
            read(f, "<I")   # (the version)
            read(f, "<Q")   # (the tensors' count)
            for _ in range(read(f, "<Q")):
                key, kind = raw_text(f).decode("utf-8", "replace"), read(f, "<I")
                if kind in GGUF_SCALARS:
                    metadata[key] = read(f, GGUF_SCALARS[kind])
                elif kind == GGUF_STRING:
                    metadata[key] = raw_text(f).decode("utf-8", "replace")
                elif kind == GGUF_ARRAY and key == GGUF_TOKENS and find_fim:
                    item, n_tokens = read(f, "<I"), read(f, "<Q")
                    if item != GGUF_STRING:
                        raise ValueError("a vocabulary of no strings")
                    for token_id in range(n_tokens):
                        name = wanted.get(raw_text(f))
                        if name:
                            by_text.setdefault(name, token_id)
                elif kind == GGUF_ARRAY and lengths is not None:
                    item, lengths[key] = read(f, "<I"), read(f, "<Q")
                    if enough and enough(metadata):
                        break
                    skip_items(f, item, lengths[key])
                else:
                    skip(f, kind)
                if enough and enough(metadata):
                    break
    except (OSError, ValueError, KeyError, struct.error):
        return None
    for name in FIM_TOKEN_TEXTS:
        declared = metadata.get(FIM_KEY % name, metadata.get(FIM_OLD_NAMES.get(name)))
        if not isinstance(declared, int) or isinstance(declared, bool) or n_tokens is not None and not (
                0 <= declared < n_tokens):   # (llama.cpp ignores an id beyond the vocabulary)
            declared = by_text.get(name)
        metadata.pop(FIM_KEY % name, None)
        if declared is not None:
            metadata[FIM_KEY % name] = declared
    return metadata


def gguf_layers(path):
    """The number of transformer blocks of a GGUF model (`<arch>.block_count`; the queen splits a
    model by them), or None if not found."""
    return gguf_shape(path).get("layers")


def gguf_shape(path):
    """What placement reads of a GGUF's header: its transformer blocks (`layers`), the context it
    was trained for (`context_length`), one token's keys and values in a layer (`kv_width_k`,
    `kv_width_v`: KV heads x head size), and what sizes its compute buffers (`embedding_length`,
    `feed_forward_length`, `vocab_size`: declared, else the tokens' count), each None if not found;
    and the file's `size_bytes`. The header is read up to the tokens' count, after the architecture's keys."""
    lengths = {}
    metadata = gguf_metadata(path, find_fim=False, lengths=lengths,
                             enough=lambda so_far: GGUF_TOKENS in lengths) or {}
    arch = lambda key: metadata.get("%s.%s" % (metadata.get("general.architecture"), key))
    n_embd, n_head = arch("embedding_length"), arch("attention.head_count")
    n_head_kv = arch("attention.head_count_kv") or n_head
    head = n_embd // n_head if isinstance(n_embd, int) and isinstance(n_head, int) and n_head else None

    def width(key):
        size = arch(key) or head
        return size * n_head_kv if size and isinstance(n_head_kv, int) else None
    return {"layers": arch("block_count"), "context_length": arch("context_length"),
            "kv_width_k": width("attention.key_length"), "kv_width_v": width("attention.value_length"),
            "embedding_length": n_embd, "feed_forward_length": arch("feed_forward_length"),
            "vocab_size": arch("vocab_size") or lengths.get(GGUF_TOKENS), "size_bytes": os.path.getsize(path)}


def kv_need_mb(shape, context, full=False):
    """The MB a worker's KV cache takes for `context` (WorkerContext) of a model of `shape` (gguf_shape):
    its ctx_size, else the trained context (`full`) or the smaller of it and DEFAULT_N_CTX (a default
    context fits itself into the room there is, this much at least); 0 if the shape is not known."""
    from backends.engine import kv_bytes_per_token, kv_cache_mb
    if not shape or not all(shape.get(k) for k in ("layers", "kv_width_k", "kv_width_v")):
        return 0
    trained = shape.get("context_length") or DEFAULT_N_CTX
    cells = context.ctx_size or (trained if full else min(trained, DEFAULT_N_CTX))
    return kv_cache_mb(kv_bytes_per_token(shape["layers"], shape["kv_width_k"], shape["kv_width_v"],
                                          context.cache_type_k or "f16", context.cache_type_v or "f16"), cells)


def memory_need_mb(size_bytes, shape, context=None, full=False, n_ubatch=None, slots=DEFAULT_PARALLEL):
    """The MB a worker of a model takes, estimated from its GGUF before any worker of it has run
    (`size_bytes`: the file's; `shape`: gguf_shape's, {} if unknown): the worker's own runtime
    (WORKER_RUNTIME_MB), the file (its tensors, and the vocabulary its tokenizer keeps), the KV
    cache of `context` (kv_need_mb; none without one: what a default context fits itself beside),
    the loader's own context (LOADER_CELLS cells in f16) and the compute buffers of `n_ubatch`
    tokens a step. llama.cpp reserves logits for each of those tokens (n_vocab x n_ubatch x 4
    bytes) but a worker asks one row a slot (its output buffer), so of the rest only the
    activations are ever touched: two n_ff-wide tensors (the FFN's) and four n_embd-wide ones
    (the attention's Q, K, V and output) a token, in f32. Measured against the workers' RSS: §18."""
    from backends.engine import N_BATCH, kv_bytes_per_token
    shape = shape or {}
    layers, width_k, width_v = (shape.get(k) or 0 for k in ("layers", "kv_width_k", "kv_width_v"))
    loader_kv = int(kv_bytes_per_token(layers, width_k, width_v) * LOADER_CELLS)
    outputs = (shape.get("vocab_size") or 0) * slots * 4
    activations = (n_ubatch or N_BATCH) * (2 * (shape.get("feed_forward_length") or 0)
                                           + 4 * (shape.get("embedding_length") or 0)) * 4
    cache_mb = kv_need_mb(shape, context, full) if context else 0
    return WORKER_RUNTIME_MB + cache_mb + -(-(size_bytes + loader_kv + outputs + activations) // (1 << 20))


# What a model is for, read from its GGUF: chat models generate (and embed too, pooled by mean);
# embedding models (a pooling declared, or an encoder's architecture) only embed; rerankers (rank
# pooling) only score pairs. The scheduler places them all alike; the worker refuses the others' requests.
KIND_CHAT, KIND_EMBEDDING, KIND_RERANK = "chat", "embedding", "rerank"
ENCODER_ARCHITECTURES = ("bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert",
                         "neo-bert", "eurobert", "t5encoder")
POOLING_RANK = 4                     # llama.cpp's LLAMA_POOLING_TYPE_RANK


def fitting_context(trained, bytes_per_token, room_mb):
    """A worker's default context: the one its model was trained for, or as many cells (a
    multiple of 256; MIN_CTX at least) as `room_mb` holds."""
    cells = int(max(0, room_mb) * (1 << 20) // max(1, bytes_per_token)) // 256 * 256
    return max(min(trained, cells), min(trained, MIN_CTX))


def model_kind(metadata):
    """KIND_CHAT, KIND_EMBEDDING or KIND_RERANK of a GGUF's metadata (values typed, or strings as
    llama-cpp-python's Llama.metadata has them)."""
    architecture = str(metadata.get("general.architecture") or "")
    pooling = str(metadata.get("%s.pooling_type" % architecture, ""))
    if pooling == str(POOLING_RANK):
        return KIND_RERANK
    if pooling not in ("", "0") or architecture in ENCODER_ARCHITECTURES:
        return KIND_EMBEDDING
    return KIND_CHAT


def choose_gguf(filenames, selector=None):
    """The file of a GGUF repo to download: the selector (an exact name or a quantisation tag),
    else the only .gguf, else by QUANT_PREFERENCE; never a split part other than the first."""
    ggufs = sorted(f for f in filenames if f.lower().endswith(".gguf")
                   and (not _SPLIT_PART.search(f) or _SPLIT_PART.search(f).group(1) == "00001"))
    if selector:
        exact = [f for f in filenames if f == selector or f.rsplit("/", 1)[-1] == selector]
        if exact:
            return exact[0]
        tagged = [f for f in ggufs if selector.lower() in f.rsplit("/", 1)[-1].lower()]
        if tagged:
            return tagged[0]
        return None
    if len(ggufs) == 1:
        return ggufs[0]
    for quant in QUANT_PREFERENCE:
        tagged = [f for f in ggufs if quant.lower() in f.rsplit("/", 1)[-1].lower()]
        if tagged:
            return tagged[0]
    return None


def slug(text):
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-")


class ModelCatalog:
    """$RBEE_HOME/models.db: what is on this node's disk. A row is written only for a complete,
    verified file, in one transaction."""

    SCHEMA = """CREATE TABLE IF NOT EXISTS models (
        id TEXT PRIMARY KEY, provider TEXT NOT NULL, reference TEXT NOT NULL, filename TEXT NOT NULL,
        local_path TEXT NOT NULL, size_bytes INTEGER NOT NULL, sha256 TEXT,
        downloaded_at_unix INTEGER NOT NULL, last_used_unix INTEGER,
        UNIQUE (provider, reference, filename))"""
    COLUMNS = ("id", "provider", "reference", "filename", "local_path", "size_bytes", "sha256",
               "downloaded_at_unix", "last_used_unix")

    def __init__(self, path=None):
        self.path = path or rbee_home("models.db")   #: the SQLite file (each call opens its own connection)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with self._db() as db:
            db.execute(self.SCHEMA)

    @contextlib.contextmanager
    def _db(self):
        import sqlite3   # only the roles that keep a catalog or the node registry need it
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:
                yield db
        finally:
            db.close()

    def _rows(self, where="", args=()):
        with self._db() as db:
            rows = db.execute("SELECT %s FROM models %s ORDER BY id" % (", ".join(self.COLUMNS), where), args)
            return [dict(zip(self.COLUMNS, row)) for row in rows]

    def find(self, ref):
        """The row for a reference (its selector, if any, must match the file), if the file is there."""
        rows = self._rows("WHERE provider = ? AND reference = ?", (ref.provider, ref.reference))
        if ref.selector:
            rows = [r for r in rows if choose_gguf([r["filename"]], ref.selector)]
        rows = [r for r in rows if os.path.isfile(r["local_path"])]
        return rows[0] if rows else None

    def list(self):
        return self._rows()

    def add(self, provider, reference, filename, local_path, size_bytes, sha256=None):
        import hashlib
        row = {"id": slug("%s--%s" % (reference.replace("/", "--") if provider == "hf" else
                                      "file-" + hashlib.sha1(local_path.encode()).hexdigest()[:8],
                                      os.path.splitext(filename)[0])),
               "provider": provider, "reference": reference, "filename": filename, "local_path": local_path,
               "size_bytes": int(size_bytes), "sha256": sha256, "downloaded_at_unix": int(time.time()),
               "last_used_unix": None}
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO models (%s) VALUES (%s)" % (
                ", ".join(self.COLUMNS), ", ".join("?" * len(self.COLUMNS))), [row[c] for c in self.COLUMNS])
        return row

    def touch(self, model_id):
        with self._db() as db:
            db.execute("UPDATE models SET last_used_unix = ? WHERE id = ?", (int(time.time()), model_id))

    def remove(self, ref):
        """Delete the rows (and downloaded files; a `file:` model is the user's own) of a reference."""
        rows = self._rows("WHERE provider = ? AND reference = ?", (ref.provider, ref.reference))
        if ref.selector:
            rows = [r for r in rows if choose_gguf([r["filename"]], ref.selector)]
        with self._db() as db:
            for row in rows:
                db.execute("DELETE FROM models WHERE id = ?", (row["id"],))
        for row in rows:
            if row["provider"] == "hf":
                with contextlib.suppress(OSError):
                    os.remove(row["local_path"])
        return rows


class DownloadProgress:
    """Narrates download progress at least every 5 % or every second, whichever is rarer."""

    def __init__(self, filename, total):
        self.filename = filename          #: the file, as the repo names it
        self.total = total                #: bytes of the whole file
        self.last_done = -1               #: bytes at the last narration (-1: none yet; the download's thread)
        self.last_time = 0.0              #: when the last narration went out

    def update(self, done, force=False):
        now = time.monotonic()
        step = self.total * 0.05
        if force or self.last_done < 0 or (done - self.last_done >= step and now - self.last_time >= 1.0):
            if force and done == self.last_done:
                return
            self.last_done, self.last_time = done, now
            pct = int(done * 100 / self.total) if self.total else 100
            narrate(ACTOR_PROVISIONER, "download_progress", "Downloaded %s / %s (%d%%)" % (
                human_bytes(done), human_bytes(self.total), pct), None, progress={"done": done, "total": self.total},
                download=DownloadState(self.filename, done, self.total)._asdict())


def require_hub():
    """huggingface_hub, which only downloads need, or a clear error saying how to get it."""
    import importlib.util
    if importlib.util.find_spec("huggingface_hub") is None:
        raise DownloadFailed("huggingface_hub is not installed for %s on this node" % sys.executable,
                             {"python": sys.executable}, "Install it there (pip install huggingface_hub), or let rbee "
                             "make a venv: rbee.py nodes install NODE")


class ModelProvisioner:
    """Makes a model reference a cataloged file on this node: downloads from Hugging Face with
    huggingface_hub, resumable across processes (a `.partial` file kept by byte), verified by
    sha256 before the catalog sees it. One download per model at a time; others wait for it."""

    def __init__(self, catalog, models_dir=None):
        self.catalog = catalog            #: where a finished download is recorded
        self.models_dir = models_dir or rbee_home("models")   #: where downloads go, one folder per repo
        self.locks = KeyedLocks()         #: one provisioning of a (provider, reference, selector) at a time

    def provision(self, ref):
        """The catalog row for `ref`, downloading it first if needed (narrated)."""
        if isinstance(ref, str):
            ref = ModelRef.parse(ref)
        row = self.catalog.find(ref)
        if row:
            return row

        def wait():
            narrate(ACTOR_PROVISIONER, "download_wait", "Waiting for the download of %s in progress" % ref.text,
                    "⏳")
        with self.locks.holding((ref.provider, ref.reference, ref.selector), wait):
            row = self.catalog.find(ref)
            if row:
                return row
            return self._catalog_file(ref) if ref.provider == "file" else self._download(ref)

    @staticmethod
    def check(ref):
        """What can be known of a reference before any work starts: a `file:` model must be a
        regular, readable file that starts with the GGUF magic. One answer for every way it is
        not (MODEL_NOT_FOUND, 404: no model there), so that the error tells nobody whether some
        other file exists."""
        if ref.provider != "file":
            return
        try:
            fd = os.open(ref.reference, os.O_RDONLY | os.O_NONBLOCK)   # (a FIFO must not block us)
            try:
                regular = stat.S_ISREG(os.fstat(fd).st_mode)
                magic = os.read(fd, 4) if regular else b""
            finally:
                os.close(fd)
        except OSError:
            regular, magic = False, b""
        if not regular or magic != GGUF_MAGIC:
            raise ModelNotFound("%s is not a readable GGUF model file" % ref.text, {"model": ref.text},
                                "Give the absolute path of a .gguf file on the node that runs the worker")

    def _catalog_file(self, ref):
        self.check(ref)
        path = ref.reference
        return self.catalog.add("file", path, os.path.basename(path), path, os.path.getsize(path))

    # -- Hugging Face -----------------------------------------------------------------------

    def _hub_error(self, exc, ref):
        from huggingface_hub import errors
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, errors.GatedRepoError) or status in (401, 403) and not isinstance(
                exc, errors.RepositoryNotFoundError):
            return AccessDenied("Access to %s denied by Hugging Face (HTTP %s)" % (ref.reference, status),
                                {"model": ref.text}, "Accept the model's terms on Hugging Face and set HF_TOKEN")
        if isinstance(exc, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError,
                            errors.EntryNotFoundError)) or status == 404:
            return ModelNotFound("Model %s not found on Hugging Face" % ref.reference,
                                 {"model": ref.text}, "Check the spelling of ORG/REPO; a private repo needs HF_TOKEN")
        return None

    def _listing(self, ref):
        """The repo's files as {path: (size, sha256 or None)}, with retries on network errors."""
        require_hub()
        from huggingface_hub import HfApi, errors
        if os.environ.get(ENV_HF_OFFLINE, "").lower() in ("1", "true", "yes", "on"):
            raise ModelNotFound("Model %s is not on this node and HF_HUB_OFFLINE is set" % ref.text,
                                {"model": ref.text}, "Unset HF_HUB_OFFLINE, or download the model while online")
        api = HfApi(endpoint=os.environ.get(ENV_HF_ENDPOINT) or None, token=os.environ.get(ENV_HF_TOKEN) or None)
        last = None
        for attempt in range(DOWNLOAD_ATTEMPTS):
            try:
                files = {}
                for entry in api.list_repo_tree(ref.reference, recursive=True):
                    if getattr(entry, "size", None) is not None:
                        lfs = getattr(entry, "lfs", None)
                        files[entry.path] = (entry.size, getattr(lfs, "sha256", None) if lfs else None)
                return files
            except Exception as exc:
                mapped = self._hub_error(exc, ref)
                if mapped:
                    raise mapped
                if isinstance(exc, errors.HFValidationError):
                    raise InvalidModelRef(str(exc), {"model": ref.text})
                last = exc
                if attempt + 1 < DOWNLOAD_ATTEMPTS:
                    time.sleep(0.1 * 2 ** attempt)
        raise DownloadFailed("Cannot list %s on Hugging Face: %s" % (ref.reference, last),
                             {"model": ref.text, "attempts": DOWNLOAD_ATTEMPTS},
                             "Check the node's network and HF_ENDPOINT (%s)" % (os.environ.get(ENV_HF_ENDPOINT) or
                                                                           "https://huggingface.co"))

    def _download(self, ref):
        files = self._listing(ref)
        filename = choose_gguf(list(files), ref.selector)
        if not filename:
            raise ModelNotFound("No GGUF file%s in %s" % (
                " matching %r" % ref.selector if ref.selector else "", ref.reference),
                {"model": ref.text, "files": sorted(files)[:20]},
                "Name a file or quantisation: hf:%s:Q4_K_M" % ref.reference)
        size, sha256 = files[filename]
        dest_dir = os.path.join(self.models_dir, ref.reference.replace("/", "--"))
        dest = os.path.join(dest_dir, filename.rsplit("/", 1)[-1])
        os.makedirs(dest_dir, exist_ok=True)
        with self._repo_dir_lock(dest_dir, ref):
            # another reference to the same file (hf:X and hf:X:Q4_K_M), or another process on
            # this node, may have fetched it while we waited
            row = self.catalog.find(ModelRef("hf", ref.reference, filename, ref.text))
            return row or self._download_file(ref, filename, size, sha256, dest)

    @contextlib.contextmanager
    def _repo_dir_lock(self, dest_dir, ref):
        """One download into a repo's directory at a time on this node: an flock, so that threads
        of this hive and other processes (`rbee.py models download`) never share a .partial file."""
        import fcntl
        fd = os.open(dest_dir, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                narrate(ACTOR_PROVISIONER, "download_wait", "Waiting for the download in progress in %s" % dest_dir,
                        "⏳", model_ref=ref.text)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)   # releases the lock (so does the death of the process)

    def _download_file(self, ref, filename, size, sha256, dest):
        dest_dir, partial = os.path.dirname(dest), dest + ".partial"
        have = os.path.getsize(partial) if os.path.exists(partial) else 0
        import shutil
        free = shutil.disk_usage(dest_dir).free
        if free < size - have:
            raise InsufficientDisk("Not enough disk for %s: need %s, %s free" % (
                filename, human_bytes(size - have), human_bytes(free)),
                {"required_bytes": size - have, "free_bytes": free, "path": dest_dir},
                "Free disk space on the node or remove models with `rbee.py models rm REF`")
        narrate(ACTOR_PROVISIONER, "download_start", "Downloading %s from Hugging Face" % filename, "📦",
                model_ref=ref.text, download=DownloadState(filename, have, size)._asdict())
        started = time.monotonic()
        digest = self._fetch(ref, filename, size, sha256, partial)
        os.replace(partial, dest)
        row = self.catalog.add("hf", ref.reference, filename, dest, size, digest)
        narrate(ACTOR_PROVISIONER, "download_done", "Model downloaded to %s (%s in %.1f s)" % (
            dest, human_bytes(size), time.monotonic() - started), "✅", model_ref=ref.text)
        return row

    def _disk_full(self, ref, filename, size, partial):
        """INSUFFICIENT_DISK, the bytes so far kept in `partial` for a resume."""
        import shutil
        have = os.path.getsize(partial) if os.path.exists(partial) else 0
        free = shutil.disk_usage(os.path.dirname(partial)).free
        return InsufficientDisk("The disk filled up while downloading %s: need %s more, %s free" % (
            filename, human_bytes(size - have), human_bytes(free)),
            {"required_bytes": size - have, "free_bytes": free, "bytes_kept": have, "path": os.path.dirname(partial)},
            "Free disk space on the node, then run the same command again: the download resumes where it stopped")

    def _fetch(self, ref, filename, size, sha256, partial):
        """Download into `partial`, resuming from its length; returns the verified sha256."""
        from huggingface_hub import get_session, hf_hub_url
        import hashlib
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status
        url = hf_hub_url(ref.reference, filename, endpoint=os.environ.get(ENV_HF_ENDPOINT) or None)
        progress = DownloadProgress(filename, size)
        last, corrupt = None, False   # why the last attempt failed; whether its bytes failed the sha256
        for attempt in range(DOWNLOAD_ATTEMPTS):
            if attempt:
                delay = 0.1 * 2 ** (attempt - 1)
                narrate(ACTOR_PROVISIONER, "download_retry", "Download attempt %d/%d failed (%s); retrying in %d ms"
                        % (attempt, DOWNLOAD_ATTEMPTS, last, delay * 1000), "🔁")
                time.sleep(delay)
            have = os.path.getsize(partial) if os.path.exists(partial) else 0
            if have > size:
                os.remove(partial)
                have = 0
            digest = hashlib.sha256()
            if have:
                with open(partial, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
            headers = build_hf_headers(token=os.environ.get(ENV_HF_TOKEN) or None)
            if have < size:
                if have:
                    headers["Range"] = "bytes=%d-" % have
                    narrate(ACTOR_PROVISIONER, "download_resume", "Resuming download at %s" % human_bytes(have),
                            "⏯️")
                try:
                    with get_session().stream("GET", url, headers=headers, follow_redirects=True,
                                              timeout=TOKEN_TIMEOUT) as resp:
                        hf_raise_for_status(resp)
                        if have and resp.status_code != 206:   # the server ignored Range: start over
                            have, digest = 0, hashlib.sha256()
                        with open(partial, "r+b" if have else "wb") as out:
                            out.seek(have)
                            for chunk in resp.iter_bytes(1 << 20):
                                out.write(chunk)
                                digest.update(chunk)
                                have += len(chunk)
                                progress.update(have)
                except Exception as exc:
                    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                        raise self._disk_full(ref, filename, size, partial)
                    mapped = self._hub_error(exc, ref)
                    if mapped:
                        raise mapped
                    last, corrupt = "%s: %s" % (type(exc).__name__, exc), False
                    continue
                if have < size:
                    last, corrupt = "connection closed at %s of %s" % (human_bytes(have), human_bytes(size)), False
                    continue
            progress.update(have, force=True)
            if sha256 and digest.hexdigest() != sha256:
                os.remove(partial)
                last, corrupt = "CHECKSUM_MISMATCH", True
                narrate(ACTOR_PROVISIONER, "checksum_mismatch", "Checksum mismatch for %s (CHECKSUM_MISMATCH); "
                        "deleted it" % filename, "⚠️", level="warn")
                continue
            return digest.hexdigest()
        if corrupt:   # (its bytes are deleted already)
            raise ChecksumMismatch("%s failed its sha256 check %d times" % (filename, DOWNLOAD_ATTEMPTS),
                                   {"model": ref.text, "expected_sha256": sha256},
                                   "The mirror serves corrupt data: try again later or another HF_ENDPOINT")
        raise DownloadFailed("Download of %s failed after %d attempts: %s" % (
            filename, DOWNLOAD_ATTEMPTS, last),
            {"model": ref.text, "bytes_kept": have if os.path.exists(partial) else 0},
            "Run the same command again: the download resumes where it stopped")


# ============================================================================================
# Agents' turns: chat templates with tools, tool calls in each family's words, grammars
# ============================================================================================
#
# A model calls a tool by writing it in the format its family was trained on; the worker renders
# the tools into the model's own chat template, reads the calls back out of the text as it streams
# (ToolCallParser), and where a call is required builds a grammar that makes the model write one
# valid call of that format whose arguments match the function's schema (tool_call_grammar).

ToolFormat = collections.namedtuple("ToolFormat", "name markers json_start prefix suffix args_key")
TOOL_FORMATS = {f.name: f for f in (
    # Hermes, Qwen 2.5/3, and the many fine-tunes that copy them: <tool_call>{...}</tool_call>
    ToolFormat("hermes", ("<tool_call>",), False, "<tool_call>\n", "\n</tool_call>", "arguments"),
    # Llama 3.1-3.3: a bare JSON object with "parameters" (or after <|python_tag|>)
    ToolFormat("llama3", ("<|python_tag|>",), True, "", "", "parameters"),
    # Mistral (v3 and Nemo templates): [TOOL_CALLS][{...}, ...]
    ToolFormat("mistral", ("[TOOL_CALLS]",), False, "[TOOL_CALLS]", "", "arguments"),
    # any other model (llama.cpp's generic format): {"tool_call": {...}} or {"tool_calls": [...]}
    ToolFormat("generic", (), True, "", "", "arguments"),
)}
# what a template without a word about tools gets in its system message instead (llama.cpp's
# server does the same for such templates)
GENERIC_TOOL_PREAMBLE = (
    "You can call functions. To call one, answer with only a JSON object of the form "
    '{"tool_call": {"name": "<function name>", "arguments": {<the arguments>}}}%s and nothing else. '
    "Otherwise answer in plain text.\n\nThe functions, as JSON schemas:\n%s")
GENERIC_PARALLEL = ' (or {"tool_calls": [<several such calls>]})'
# a tool's name, and how many a request may offer: the widest of the APIs' own rules (Anthropic's 128
# characters and its 512 tools; OpenAI's are 64 and 128), so that each API's limit is its own
TOOL_NAME, MAX_TOOLS = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$"), 512
# a call's name, then its arguments' key: the arguments' JSON value starts right after
_CALL_HEAD = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def tool_format_of(template):
    """The tool-call format a chat template speaks: by the markers its family writes; a template
    that names no tools gets the generic one (and GENERIC_TOOL_PREAMBLE)."""
    template = template or ""
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or ("<|start_header_id|>" in template and '"parameters"' in template):
        return "llama3"
    return "generic"


def marker_tokens(llm, markers):
    """The ids of the markers that are one special token of the model's vocabulary."""
    ids = [llm.tokenize(m.encode(), add_bos=False, special=True) for m in markers]
    return [t[0] for t in ids if len(t) == 1]


def template_knows_tools(template):
    """Whether a Jinja chat template reads the `tools` variable at all."""
    import jinja2
    import jinja2.meta
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template or ""))
    except jinja2.TemplateError:
        return False


def gbnf_literal(text):
    return json.dumps(text)   # (GBNF's string literals take JSON's escapes)


def schema_grammar(schema, field="json_schema", prefix="", suffix="", repeat=None):
    """GBNF whose root is `prefix`, a JSON value matching `schema`, then `suffix` (and, with
    `repeat` a separator, as many more such blocks as the model writes). A schema llama-cpp-python's
    converter cannot take is a 400 naming `field` and the part it could not."""
    from llama_cpp.llama_grammar import SchemaConverter
    if not isinstance(schema, dict):
        raise invalid(field, "must be a JSON schema (an object)")
    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:   # (resolve_refs rewrites the $refs it resolves: a copy, not the caller's schema)
        value = converter.visit(converter.resolve_refs(json.loads(json.dumps(schema)), "input"), "answer")
    except Exception as exc:   # (the converter's asserts, and what a schema of the wrong shapes trips over)
        raise invalid(field, "this schema cannot be made a grammar: %s" % (str(exc)[:300] or type(exc).__name__),
                      "Leave out the unsupported part (external $refs, `not`, unknown types, unanchored patterns)")
    block = " ".join(part for part in (gbnf_literal(prefix) if prefix else "", value,
                                       gbnf_literal(suffix) if suffix else "") if part)
    root = block if repeat is None else "%s (%s %s)*" % (block, gbnf_literal(repeat), block)
    return "root ::= %s\n%s" % (root, converter.format_grammar())


def call_schema(functions, args_key):
    """The JSON schema of one call of any of `functions`: {"name": N, args_key: its parameters}."""
    return {"anyOf": [{"type": "object", "properties": {"name": {"const": f["name"]}, args_key: f["parameters"]},
                       "required": ["name", args_key]} for f in functions]}


def tool_call_grammar(fmt, functions, parallel):
    """The grammar of a required call of one of `functions`, written in format `fmt`."""
    fmt = TOOL_FORMATS[fmt]
    one = call_schema(functions, fmt.args_key)
    if fmt.name == "mistral":   # one JSON array of calls
        many = dict({"type": "array", "items": one, "minItems": 1}, **({} if parallel else {"maxItems": 1}))
        return schema_grammar(many, "tools", prefix=fmt.prefix)
    if fmt.name == "generic":
        if parallel:
            return schema_grammar({"type": "object", "properties": {"tool_calls": {
                "type": "array", "items": one, "minItems": 1}}, "required": ["tool_calls"]}, "tools")
        return schema_grammar({"type": "object", "properties": {"tool_call": one}, "required": ["tool_call"]}, "tools")
    return schema_grammar(one, "tools", prefix=fmt.prefix, suffix=fmt.suffix, repeat="\n" if parallel else None)


def tools_of(body):
    """A request's `tools` as [{name, description, parameters}] (OpenAI's chat shape), or []."""
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise invalid("tools", "must be a list of at most %d {type: \"function\", function: {name, ...}} objects"
                      % MAX_TOOLS)
    out = []
    for k, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not TOOL_NAME.match(
                function["name"]):
            raise invalid("tools[%d]" % k, "must be {type: \"function\", function: {name, description, "
                          "parameters}} with a name of letters, digits, _ . : - (at most 128)")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise invalid("tools[%d].function.parameters" % k, "must be a JSON schema (an object)")
        out.append({"name": function["name"], "description": str(function.get("description") or ""),
                    "parameters": parameters})
    return out


def tool_choice_of(body, tools):
    """"auto", "none", "required", or the name of the one function the model must call."""
    choice = body.get("tool_choice", "auto" if tools else "none")
    if isinstance(choice, dict):
        function = choice.get("function") if choice.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if name not in [t["name"] for t in tools]:
            raise invalid("tool_choice", "names no function of `tools`", "Name one of: " + ", ".join(
                t["name"] for t in tools) if tools else "Give `tools`")
        return name
    if choice not in ("auto", "none", "required"):
        raise invalid("tool_choice", 'must be "auto", "none", "required" or {"type": "function", "function": '
                      '{"name": ...}}')
    if choice == "required" and not tools:
        raise invalid("tool_choice", "is \"required\" but there are no `tools`")
    return choice


class ToolCallParser:
    """Reads a model's output as it streams: content, and the tool calls it writes in its family's
    format (TOOL_FORMATS). `feed(text)` and then `finish()` return pieces, in order:
        ("content", text)                          text for the user
        ("call", index, id, name, fragment)        a call's first piece (id and name), then its
        ("call", index, None, None, fragment)      arguments' text as it comes
    A marker (or, for the JSON formats, a `{`/`[` opening the output) switches to calls; from then
    on each "name" followed by "arguments"/"parameters" is a call, its value scanned as JSON. What
    turns out to hold no call is content after all. `calls`: [{id, name, arguments}] (arguments:
    the JSON text), every call whose pieces went, as they went: a call is never taken back, and an
    index never serves twice (a model may write bad JSON, as OpenAI warns of its own: the client
    checks; a grammar-constrained call is always valid)."""

    def __init__(self, fmt, parallel=True):
        self.format = TOOL_FORMATS[fmt]     #: the format the model writes calls in
        self.parallel = parallel            #: False: only the first call counts
        self.in_calls = False               #: past a marker (or a JSON start): no more content
        self.seen_text = False              #: some non-space text came (a JSON start is only at the start)
        self.held = ""                      #: content held back: it may be the start of a marker
        self.marker = ""                    #: the marker that began the calls ("" for a JSON start)
        self.buffer = ""                    #: the text since the marker
        self.position = 0                   #: how far `buffer` is read
        self.calls = []                     #: the calls, complete or not: {id, name, arguments}
        self.value = None                   #: the arguments being scanned: [start, depth, in_string, escaped]
        self.cut_short = False              #: the output ended inside a call's arguments (no whole call)

    @property
    def done(self):
        """A call is complete and no other may follow (parallel calls off)."""
        return not self.parallel and bool(self.calls) and self.value is None

    def feed(self, text):
        if self.in_calls:
            self.buffer += text
            return self._scan()
        self.held += text
        if self.format.json_start and not self.seen_text:
            stripped = self.held.lstrip()
            if not stripped:
                return []
            self.seen_text = True
            if stripped[0] in "{[":
                return self._enter("", stripped)
        hits = [(self.held.find(m), m) for m in self.format.markers if m in self.held]
        if hits:
            at, marker = min(hits)
            before = self.held[:at]
            return ([("content", before)] if before else []) + self._enter(marker, self.held[at + len(marker):])
        out, self.held, _ = split_at_stop(self.held, self.format.markers)   # (a tail that may become a marker)
        return [("content", out)] if out else []

    def _enter(self, marker, rest):
        self.in_calls, self.marker, self.held, self.buffer = True, marker, "", rest
        return self._scan()

    def _scan(self):
        out = []
        while not self.done:
            if self.value is None:
                head = _CALL_HEAD.search(self.buffer, self.position)
                if not head:
                    break
                value = self.buffer[head.end():].lstrip()
                if not value:   # (its value has not begun)
                    break
                if value[0] not in '{"':   # arguments that are no object: no call
                    self.position = head.end()
                    continue
                try:
                    name = json.loads('"%s"' % head.group(1))
                except ValueError:
                    name = head.group(1)
                call = {"id": self._new_id(), "name": name, "arguments": ""}
                self.calls.append(call)
                out.append(("call", len(self.calls) - 1, call["id"], name, ""))
                self.position, self.value = head.end(), [None, 0, False, False]
            fragment = self._scan_value()
            if fragment:
                self.calls[-1]["arguments"] += fragment
                out.append(("call", len(self.calls) - 1, None, None, fragment))
            if self.value is not None:
                break
        return out

    def _new_id(self):
        """A call's id: Mistral's templates take exactly 9 letters or digits, OpenAI's clients any."""
        return random_id(5)[:9] if self.format.name == "mistral" else "call_" + random_id(12)

    def _scan_value(self):
        """Scan the arguments' JSON value from `position`: the text of it read now (a JSON string
        value, some models' way, is decoded: the JSON inside it is the arguments)."""
        state, text, begin = self.value, self.buffer, self.position
        k = begin
        while k < len(text):
            c = text[k]
            if state[0] is None:
                if c.isspace():
                    begin = k + 1
                else:   # `{`, or `"` (_scan saw which)
                    state[0] = k
                    state[1], state[2] = (0, True) if c == '"' else (1, False)
            elif state[2]:   # in a string
                if state[3]:
                    state[3] = False
                elif c == "\\":
                    state[3] = True
                elif c == '"':
                    state[2] = False
                    if state[1] == 0:   # the whole value was a string: the JSON is inside it
                        self.value, self.position = None, k + 1
                        return parsed_json(text[state[0]:k + 1])
            elif c == '"':
                state[2] = True
            elif c in "{[":
                state[1] += 1
            elif c in "}]":
                state[1] -= 1
                if state[1] == 0:
                    self.value, self.position = None, k + 1
                    return text[begin:k + 1]
            k += 1
        self.position = k
        return text[begin:k] if state[0] is not None and state[1] else ""

    def finish(self):
        """The pieces the end of the output gives: held content, or a call region that held no
        call, which is content after all (or whole calls that a JSON parse finds there)."""
        if not self.in_calls:
            held, self.held = self.held, ""
            return [("content", held)] if held else []
        if self.value is not None:   # a call cut short (max_tokens, a stop string): a call as it came
            self.value, self.cut_short = None, True
        if self.calls:
            return []
        out = []
        for name, arguments in self._parsed_calls():
            call = {"id": self._new_id(), "name": name, "arguments": arguments}
            self.calls.append(call)
            out.append(("call", len(self.calls) - 1, call["id"], name, arguments))
        return out or [("content", self.marker + self.buffer)]

    def _parsed_calls(self):
        """(name, arguments) of calls whose keys came in another order, by parsing the region whole."""
        text = self.buffer
        for end_marker in ("</tool_call>",):
            text = text.replace(end_marker, "")
        try:
            value = json.loads(text.strip())
        except ValueError:
            return []
        if isinstance(value, dict):
            value = value.get("tool_calls") or [value.get("tool_call", value)]
        calls = []
        for item in value if isinstance(value, list) else []:
            arguments = item.get("arguments", item.get("parameters")) if isinstance(item, dict) else None
            if isinstance(item.get("name") if isinstance(item, dict) else None, str) and isinstance(arguments, dict):
                calls.append((item["name"], json.dumps(arguments, ensure_ascii=False)))
        return calls[:None if self.parallel else 1]


def parsed_json(value):
    """What a JSON text holds (a call's arguments as an object); anything else as it is."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return json.loads(value)
    return value


def call_history(messages, knows_tools):
    """A conversation with tool calls and results as the template reads them: a call's
    arguments as an object (templates `tojson` them); for a template that knows no tools, a call
    is the assistant's generic JSON and a result a user message that says whose it is."""
    out, names = [], {}
    for m in messages:
        calls = m.get("tool_calls")
        names.update((c["id"], c["function"]["name"]) for c in calls or ())
        if calls and knows_tools:
            m = dict(m, tool_calls=[dict(c, function=dict(c["function"], arguments=parsed_json(
                c["function"]["arguments"]))) for c in calls])
        elif calls:
            written = [{"name": c["function"]["name"], "arguments": parsed_json(c["function"]["arguments"])}
                       for c in calls]
            text = json.dumps({"tool_call": written[0]} if len(written) == 1 else {"tool_calls": written})
            m = {"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + text}
        elif m["role"] == "tool" and not knows_tools:
            name = m.get("name") or names.get(m.get("tool_call_id")) or "the function"
            m = {"role": "user", "content": "The result of %s: %s" % (name, m["content"])}
        out.append(m)
    return out


def with_tool_preamble(messages, tools, parallel):
    """The conversation with the generic tool preamble in its system message."""
    schemas = "\n".join(json.dumps({"name": t["name"], "description": t["description"],
                                    "parameters": t["parameters"]}) for t in tools)
    preamble = GENERIC_TOOL_PREAMBLE % (GENERIC_PARALLEL if parallel else "", schemas)
    if messages and messages[0]["role"] == "system":
        return [dict(messages[0], content=messages[0]["content"] + "\n\n" + preamble)] + messages[1:]
    return [{"role": "system", "content": preamble}] + messages


# ============================================================================================
# Worker (rbee.py worker): one model loaded by a backend, tokens streamed over SSE
# ============================================================================================

CHAT_ROLES = ("system", "user", "assistant", "tool")


def chat_messages(messages):
    """A conversation as the chat template takes it: [{role, content}] with string content (a list
    of text parts, as OpenAI's clients send, is joined), an assistant's `tool_calls` and a tool
    result's `tool_call_id` and `name` kept; 400 for anything else."""
    if not isinstance(messages, list) or not messages or len(messages) > 1024:
        raise invalid("messages", "must be a non-empty list of at most 1024 {role, content} objects")
    out = []
    for k, message in enumerate(messages):
        where = "messages[%d]" % k
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise invalid(where, "must be an object whose role is one of %s" % ", ".join(CHAT_ROLES))
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise invalid(where + ".content", "parts must be {type: \"text\", text}: this model reads text only")
            content = "".join(p["text"] for p in content)
        if content is None and message["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            raise invalid(where + ".content", "must be a string or a list of text parts")
        out.append(dict({"role": message["role"], "content": content}, **tool_fields_of(message, where)))
    return out


def tool_fields_of(message, where):
    """A message's tool calls (assistant) or the call it answers (tool), checked."""
    fields = {}
    calls = message.get("tool_calls")
    if calls and message["role"] == "assistant":
        functions = [c.get("function") if isinstance(c, dict) else None for c in calls] if isinstance(
            calls, list) else [None]
        if not all(isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(
                f.get("arguments", ""), (str, dict)) for f in functions):
            raise invalid(where + ".tool_calls", "must be a list of {id, type: \"function\", function: {name, "
                          "arguments}}")
        fields["tool_calls"] = [{"id": str(c.get("id") or ""), "type": "function", "function": {
            "name": c["function"]["name"], "arguments": c["function"].get("arguments") or "{}"}} for c in calls]
    for name in ("tool_call_id", "name"):
        if message["role"] == "tool" and isinstance(message.get(name), str):
            fields[name] = message[name]
    return fields


class Job:
    """One /execute request: validated parameters and its cancel flag."""

    def __init__(self, body, n_ctx):
        job_id = body.get("job_id") or "job-" + random_id(6)
        if not isinstance(job_id, str) or len(job_id) > 200:
            raise invalid("job_id", "must be a string of at most 200 characters")
        suffix, extra = FimPrompt.fields(body)   # (with a suffix, an empty prompt is a cursor at the start)
        messages, prompt = body.get("messages"), body.get("prompt")
        if messages is not None:
            messages, prompt = chat_messages(messages), ""
        elif not isinstance(prompt, str) or not prompt.strip() and suffix is None:
            raise invalid("prompt", "must be a non-empty string (or give `messages`)")
        grammar = body.get("grammar")
        if grammar not in (None, "json"):
            raise invalid("grammar", "must be \"json\" (a JSON object) or absent")
        stop = body.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 16 or not all(isinstance(s, str) and s for s in stop):
            raise invalid("stop", "must be a string or a list of at most 16 non-empty strings")
        raw = body.get("raw", False)
        if not isinstance(raw, bool):
            raise invalid("raw", "must be true or false")
        tools = tools_of(body)
        parallel = body.get("parallel_tool_calls", False)
        if not isinstance(parallel, bool):
            raise invalid("parallel_tool_calls", "must be true or false")
        schema = body.get("json_schema")
        if schema is not None and not isinstance(schema, dict):
            raise invalid("json_schema", "must be a JSON schema (an object)")
        if suffix is not None and (messages is not None or tools):
            raise invalid("suffix", "fills in the middle of a `prompt`: it takes no `messages` or `tools`")
        self.job_id = job_id              #: the caller's id of the job (for /cancel)
        self.prompt = prompt              #: the user's text ("" when `messages` are given)
        self.messages = messages          #: a conversation for the chat template, or None
        self.grammar = grammar            #: "json": the answer is one JSON object; None: free text
        self.stop = stop                  #: the caller's stop strings
        self.raw = raw                    #: skip the chat template
        self.suffix = suffix              #: fill-in-the-middle: the text after the cursor (`prompt`: before), or None
        self.extra = extra                #: fill-in-the-middle: other files of the project, [{filename?, text}]
        self.tools = tools                #: the functions the model may call: [{name, description, parameters}]
        self.tool_choice = tool_choice_of(body, tools)   #: auto, none, required, or the one function's name
        self.parallel_tool_calls = parallel   #: whether the model may call several at once
        self.json_schema = schema         #: the schema the answer's JSON must match, or None
        # the generation's length and sampling, validated
        # (an app's default answer may be longer than the context: it ends where the context does)
        self.max_tokens = min(number_field(body, "max_tokens", 20, 1, MAX_TOKENS, integer=True), n_ctx)
        self.temperature = number_field(body, "temperature", 0.7, 0, 2)
        self.top_p = number_field(body, "top_p", 0.95, 0, 1)
        self.top_k = number_field(body, "top_k", 40, 0, 1 << 20, integer=True)
        self.seed = number_field(body, "seed", None, -1, (1 << 32) - 1, integer=True)
        #: None, or how many likeliest tokens to give beside each generated token's log-probability
        self.logprobs = number_field(body, "logprobs", None, 0, 20, integer=True)
        self.engine_job = None            #: its backends.engine.EngineJob (cancel: /cancel, a gone client, shutdown)
        self.interrupted_by = None        #: why the worker itself stopped mid-job (shutdown's thread)

    def offered_tools(self):
        """The tools the model is shown (none with tool_choice "none": then it cannot call any)."""
        return self.tools if self.tool_choice != "none" else []

    def forced_functions(self):
        """The functions of which the model must call one (tool_choice required or named), or []."""
        if self.tool_choice in ("auto", "none"):
            return []
        return [t for t in self.tools if self.tool_choice in ("required", t["name"])]


def split_at_stop(text, stops):
    """(text that can be sent, held back text, the stop string it stopped at or None) for the
    generated `text` so far (the earliest stop in the text; of two at one place, the first given)."""
    hits = [(text.find(s), k) for k, s in enumerate(stops) if s in text]
    if hits:
        at, k = min(hits)
        return text[:at], "", stops[k]
    hold = 0
    for s in stops:   # keep back a tail that could still become a stop string
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return (text[:len(text) - hold], text[len(text) - hold:], None) if hold else (text, "", None)


class ChatPrompt:
    """The model's own chat template (GGUF `tokenizer.chat_template`), applied to a prompt as
    one user message -- what llama-cpp-python's create_chat_completion does for this model, so
    that "write a short story" gets a story, as with Ollama. `raw: true` skips it."""

    def __init__(self, llm):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        eos, bos = llm.token_eos(), llm.token_bos()
        self.llm = llm                    #: the model whose tokenizer renders the prompt
        #: llama-cpp-python's renderer of the template (read-only after this)
        self.formatter = Jinja2ChatFormatter(
            template=llm.metadata["tokenizer.chat_template"],
            eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
            bos_token=llm._model.token_get_text(bos) if bos != -1 else "", stop_token_ids=[eos])
        template = llm.metadata["tokenizer.chat_template"]
        self.tool_format = tool_format_of(template)            #: how this model writes a tool call
        self.knows_tools = template_knows_tools(template)      #: its template renders `tools` itself
        #: the special tokens that are its format's markers (Mistral's [TOOL_CALLS], Llama's <|python_tag|>):
        #: a job with tools gets their text, which the parser looks for (llama-server's "preserved tokens")
        self.marker_tokens = marker_tokens(llm, TOOL_FORMATS[self.tool_format].markers)

    @classmethod
    def for_model(cls, llm):
        return cls(llm) if llm.metadata.get("tokenizer.chat_template") else None

    def render(self, messages, tools=(), parallel=False):
        """(prompt tokens, stop strings) for a conversation (a text: one user message) and the
        tools offered: through the template when it knows tools, else in the generic preamble."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        extra = {}
        if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            messages = call_history(messages, self.knows_tools)
        if tools and self.knows_tools:
            extra["tools"] = [{"type": "function", "function": t} for t in tools]
        elif tools:
            messages = with_tool_preamble(messages, tools, parallel)
        result = self.formatter(messages=messages, **extra)
        tokens = self.llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        return tokens, result.stop


EMBED_POOLING = {1: "mean", 2: "CLS", 3: "last", 4: "rank"}   # llama.cpp's LLAMA_POOLING_TYPE_*, named


def embed_inputs(body, llm, n_ctx):
    """An /embed body's inputs as token lists: `input` is a list of texts or of token lists (at most
    MAX_EMBED_INPUTS); one longer than the context is cut with `truncate`, else a 400 naming it."""
    items, truncate = body.get("input"), body.get("truncate", False)
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_EMBED_INPUTS:
        raise invalid("input", "must be a list of 1 to %d texts (or token lists)" % MAX_EMBED_INPUTS)
    if not isinstance(truncate, bool):
        raise invalid("truncate", "must be true or false")
    n_vocab, out = llm.n_vocab(), []
    for k, item in enumerate(items):
        if isinstance(item, str) and item:
            tokens = llm.tokenize(item.encode("utf-8"), add_bos=True, special=False)
        elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) and
                                                      0 <= t < n_vocab for t in item):
            tokens = item
        else:
            raise invalid("input[%d]" % k, "must be a non-empty text or a list of token ids (0..%d)" % (n_vocab - 1))
        if len(tokens) > n_ctx and not truncate:
            raise invalid("input[%d]" % k, "is %d tokens; the model's context holds %d" % (len(tokens), n_ctx),
                          "Shorten it, or ask for truncation (OpenAI: no; Ollama: truncate: true)")
        out.append(tokens[:n_ctx])
    return out


def rerank_request(body):
    """(query, documents, truncate) of a /rerank body: 400 naming the field that is not a non-empty
    query, a list of 1 to MAX_RERANK_DOCUMENTS texts, or true/false (the queen asks it first, so
    that no model is loaded for a bad request)."""
    query, documents, truncate = body.get("query"), body.get("documents"), body.get("truncate", False)
    if not isinstance(query, str) or not query:
        raise invalid("query", "must be a non-empty text")
    if not isinstance(documents, list) or not 1 <= len(documents) <= MAX_RERANK_DOCUMENTS:
        raise invalid("documents", "must be a list of 1 to %d texts" % MAX_RERANK_DOCUMENTS)
    for k, document in enumerate(documents):
        if not isinstance(document, str):
            raise invalid("documents[%d]" % k, "must be a text (or, to the queen, an object with a text)")
    if not isinstance(truncate, bool):
        raise invalid("truncate", "must be true or false")
    return query, documents, truncate


def rerank_inputs(body, llm, n_ctx):
    """A /rerank body's (query, document) pairs as token lists (rerank_tokens); a pair longer than
    the context has its document cut with `truncate`, else a 400 naming it."""
    query, documents, truncate = rerank_request(body)
    out = []
    for k, document in enumerate(documents):
        tokens = rerank_tokens(llm, query, document)
        if len(tokens) > n_ctx and truncate:
            tokens = rerank_tokens(llm, query, document, n_ctx)
        if len(tokens) > n_ctx:
            raise invalid("query" if truncate else "documents[%d]" % k, "with the document is %d tokens; the "
                          "model's context holds %d" % (len(tokens), n_ctx), "Shorten it" if truncate else
                          "Shorten it, or ask for truncation (truncate: true)")
        out.append(tokens)
    return out


def rerank_tokens(llm, query, document, n_ctx=None):
    """A (query, document) pair as llama.cpp's server gives it to a reranker (format_prompt_rerank):
    the GGUF's `tokenizer.chat_template.rerank` with {query} and {document} put in (special tokens
    read), else `[BOS] query [EOS] [SEP] document [EOS]`, each special only where the vocabulary
    asks for it (add_bos, add_eos, add_sep) and SEP for a missing EOS. With `n_ctx`, the document
    is cut until the pair fits (when the rest leaves room for it)."""
    import llama_cpp as lc
    vocab = llm._model.vocab
    tokenize = lambda text, special=False: llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
    eos, sep = lc.llama_vocab_eos(vocab), lc.llama_vocab_sep(vocab)
    eos = sep if eos == lc.LLAMA_TOKEN_NULL else eos
    bos, eos, sep = ([token] if asked(vocab) else [] for token, asked in (
        (lc.llama_vocab_bos(vocab), lc.llama_vocab_get_add_bos), (eos, lc.llama_vocab_get_add_eos),
        (sep, lc.llama_vocab_get_add_sep)))
    template = llm.metadata.get("tokenizer.chat_template.rerank")
    document_tokens = tokenize(document)
    while True:
        if template is not None:
            tokens = tokenize(template.replace("{query}", query).replace("{document}", document), special=True)
        else:
            tokens = bos + tokenize(query) + eos + sep + document_tokens + eos
        if n_ctx is None or len(tokens) <= n_ctx or not document_tokens:
            return tokens
        document_tokens = document_tokens[:max(0, len(document_tokens) - (len(tokens) - n_ctx))]
        document = llm.detokenize(document_tokens).decode("utf-8", "ignore")


class JobOutput:
    """Where a job's text goes: to its stream as `token` events, or, when it may call tools,
    through the parser first, its calls as `tool_call` events."""

    def __init__(self, stream, parser):
        self.stream = stream              #: the job's SSE stream
        self.parser = parser              #: the ToolCallParser of a job with tools, or None
        self.index = 0                    #: the next token event's `i`
        self.logprobs = []                #: the log-probabilities of the tokens whose text has not gone yet

    def send(self, text):
        if not text:
            return
        for piece in self.parser.feed(text) if self.parser else [("content", text)]:
            self._send(piece)

    def finish(self):
        for piece in self.parser.finish() if self.parser else ():
            self._send(piece)

    def _send(self, piece):
        logprobs, self.logprobs = self.logprobs, []   # (with the text they came with; a call's are dropped)
        if piece[0] == "content":
            self.stream.send(EVENT_TOKEN, dict({"t": piece[1], "i": self.index}, **({"lp": logprobs} if logprobs
                                                                                  else {})))
            self.index += 1
            return
        _, index, call_id, name, fragment = piece
        self.stream.send(EVENT_TOOL_CALL, dict({"index": index, "arguments": fragment},
                                               **({"id": call_id, "name": name} if call_id else {})))

    def calls_done(self):
        """A call is complete and no other may follow: the job can end here."""
        return bool(self.parser and self.parser.done)

    def calls(self):
        return list(self.parser.calls) if self.parser else []


class FimPrompt:
    """Fill-in-the-middle with the model's own FIM tokens, as llama.cpp's server builds /infill's
    prompt (format_infill): [BOS] FIM_PRE prefix FIM_SUF suffix FIM_MID, and the model writes the
    middle. `extra` files come first: FIM_REP "myproject\n" (FIM_SEP "NAME\n" TEXT)... FIM_SEP
    "filename\n" where the model has those tokens (without FIM_SEP, a "--- snippet ---" line before
    each). The texts are never read for special tokens; no chat template takes part."""

    PARTS = ("pre", "suf", "mid", "rep", "sep")
    SNIPPET = "\n\n--- snippet ---\n\n"

    def __init__(self, llm):
        import llama_cpp
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.llm = llm                    #: the model whose tokenizer renders the texts
        #: the FIM tokens its vocabulary has, by part (llama.cpp's: declared in the GGUF, or found by text)
        self.tokens = {part: token for part, token in ((part, getattr(llama_cpp, "llama_vocab_fim_" + part)(vocab))
                                                       for part in self.PARTS) if token != llama_cpp.LLAMA_TOKEN_NULL}
        self.bos = [llm.token_bos()] if llama_cpp.llama_vocab_get_add_bos(vocab) else []   #: as its vocabulary wants

    @staticmethod
    def fields(body):
        """A request's (suffix, extra): (None, []) when it asks for no fill-in-the-middle; 400 for a wrong shape."""
        suffix, extra = body.get("suffix"), body.get("extra")
        if suffix is None:
            if extra is not None:
                raise invalid("extra", "goes with `suffix` (fill-in-the-middle)")
            return None, []
        if not isinstance(suffix, str) or body.get("messages") is not None:
            raise invalid("suffix", "must be a string, beside `prompt` (not `messages`)")
        extra = [] if extra is None else extra
        if not isinstance(extra, list) or len(extra) > 1024 or not all(
                isinstance(e, dict) and isinstance(e.get("text"), str) and isinstance(e.get("filename", ""), str)
                for e in extra):
            raise invalid("extra", "must be a list of at most 1024 {filename, text} objects")
        return suffix, extra

    def render(self, job, n_ctx):
        """The job's prompt tokens. What does not fit in a slot's context, beside room for the answer
        (max_tokens, at most a quarter of it), is cut as llama.cpp cuts it: the prefix's start (it
        keeps at least 3/4 of the room), the suffix's end, the extra files' start."""
        if not all(part in self.tokens for part in ("pre", "suf", "mid")):
            raise invalid("suffix", "this model has no fill-in-the-middle (FIM) tokens in its GGUF, so it cannot "
                          "fill in between a prompt and a suffix",
                          "Use a code model with FIM tokens (Qwen2.5-Coder, StarCoder2, CodeLlama, DeepSeek-Coder, "
                          "Codestral), or send no suffix")
        tokens = self.tokens

        def text(value):
            return self.llm.tokenize(value.encode("utf-8"), add_bos=False, special=False)
        extra = [tokens["rep"]] + text("myproject\n") if job.extra and "rep" in tokens else []
        for item in job.extra:
            extra += [tokens["sep"]] + text(item.get("filename", "tmp") + "\n") if "sep" in tokens else text(
                self.SNIPPET)
            extra += text(item["text"])
        extra += [tokens["sep"]] + text("filename\n") if job.extra and "sep" in tokens else []
        prefix, suffix = text(job.prompt), text(job.suffix)
        room = max(0, n_ctx - min(job.max_tokens, n_ctx // 4) - len(self.bos) - 3)
        prefix = prefix[len(prefix) - min(len(prefix), max(room * 3 // 4, room - len(suffix))):]
        suffix = suffix[:room - len(prefix)]
        extra = extra[len(extra) - min(len(extra), room - len(prefix) - len(suffix)):]
        return extra + self.bos + [tokens["pre"]] + prefix + [tokens["suf"]] + suffix + [tokens["mid"]]


class Worker(App):
    """Loads one model, then serves /execute from --parallel slots with continuous batching
    (backends/engine.py); requests beyond the free slots wait in a FIFO queue of --max-queue."""

    component = ACTOR_WORKER

    def __init__(self, args, api_key):
        super().__init__(((WORKER_HEALTH, self.health), (WORKER_EXECUTE, self.execute), (WORKER_CANCEL, self.cancel),
                          (WORKER_SHUTDOWN, self.shutdown_request), (WORKER_TOKENIZE, self.tokenize),
                          (WORKER_EMBED, self.embed), (WORKER_RERANK, self.rerank)))
        self.args = args                  #: the command line
        self.api_key = api_key            #: the bearer key of /execute, /cancel, /shutdown
        self.worker_id = args.worker_id or "worker-" + random_id(4)  #: the id its hive gave it (or a random one)
        #: the reference it serves, as the caller named it
        self.model_ref = args.model_ref or "file:" + os.path.abspath(args.model)
        self.state = WORKER_LOADING            #: loading -> ready -> draining (start; shutdown)
        self.jobs = {}                    #: job_id -> Job, queued or running (under `jobs_lock`)
        #: jobs admitted since the start (under `jobs_lock`): the queen counts the ones it handed out
        #: that have not reached the worker yet by it
        self.jobs_total = 0
        #: guards `jobs` and `jobs_total`: admission against --parallel + --max-queue
        self.jobs_lock = threading.Lock()
        self.backend = None               #: the backend module (written once by start)
        self.llm = None                   #: the loaded llama_cpp.Llama: tokenizer, template (start)
        self.engine = None                #: the slots and their decode loop (start; shutdown closes it)
        self.chat = None                  #: the model's chat template, or None (start)
        self.fim = None                   #: the model's fill-in-the-middle prompts (start)
        self.kind = KIND_CHAT             #: what its model is for: chat, embedding or rerank (start)
        self.embedder = None              #: its embeddings context, made on first use (under `embedder_lock`)
        self.embedder_lock = threading.Lock()   #: guards making `embedder`
        #: the longest input it embeds or pair it ranks, in tokens: the slot's context, or the model's trained
        #: one where shorter (a BERT has a position embedding for so many tokens, none past them) (start)
        self.embed_ctx = EMBED_CTX_CAUSAL
        self.n_ctx = 0                    #: its KV cache's cells, the longest conversation it holds (start)
        self.context_why = "the model's trained context"   #: why `n_ctx` is what it is, for the narration (start)
        self.memory_mb = 0                #: what the model and its slots' context take (start)
        self.load_ms = None               #: how long the load took (start)
        self.url = None                   #: where the worker answers, for its hive (start)
        self.last_activity = time.time()  #: when the last job ended (request threads)
        self.lost_part = None             #: a split's part that died ({node, endpoint}; the shutdown request's)

    def authorize(self, req, handler):
        if handler != self.health:
            req.require_bearer(self.api_key)

    # -- start: narrate, init the device, load, serve, report ready (the seed's order) --------

    def start(self):
        args = self.args
        narrate(ACTOR_WORKER, "startup", "Worker starting on port %d" % args.port, "🌅",
                worker_id=self.worker_id)
        import backends
        from backends.engine import Engine
        self.backend = backends.require(args.backend, args.device)
        narrate(ACTOR_DEVICES, "device_init", "Initialized %s" % self.backend.describe(args.device), "🖥️")
        if not os.path.isfile(args.model):
            raise ModelNotFound("No model file at %s" % args.model, {"model": args.model})
        narrate(ACTOR_LOADER, "model_load", "Loading model from %s" % args.model, "📦")
        started = time.monotonic()
        # the Llama's own context is never used for generation (the engine's is): keep it small
        self.llm = self.backend.load(args.model, args.device, 64, **self.split_options())
        self.n_ctx = self.context()
        self.engine = Engine(self.llm, args.parallel, self.n_ctx, args.batch_size, args.ubatch_size,
                             args.cache_type_k, args.cache_type_v, self.prompt_cache(), not args.kv_split)
        self.n_ctx = self.engine.seq_cells
        self.load_ms = int((time.monotonic() - started) * 1000)
        self.kind = model_kind(self.llm.metadata)
        trained = self.llm._model.n_ctx_train() or self.n_ctx
        causal = self.llm.metadata.get("%s.attention.causal" % self.llm.metadata.get("general.architecture")) != "false"
        self.embed_ctx = min(self.n_ctx, trained, EMBED_CTX_CAUSAL if causal else trained)
        self.chat = ChatPrompt.for_model(self.llm)
        self.fim = FimPrompt(self.llm)
        # what exists now (llama_cpp, numpy, the model's objects) lives as long as the worker: keep
        # the garbage collector from walking it again and again in the middle of a request
        import gc
        gc.collect()
        gc.freeze()
        self.memory_mb = max(self.backend.memory_used_mb(args.device),   # (KV pages count once touched)
                             (os.path.getsize(args.model) >> 20) + self.engine.kv_mb)
        where = "RAM" if args.backend == "cpu" else "VRAM"
        narrate(ACTOR_LOADER, "model_loaded", "Model loaded! %d MB cozy in %s! (%d slots %s %s tokens of "
                "context: %s; a KV cache of %d MB in %s/%s)" % (
                    self.memory_mb, where, args.parallel, "each with" if args.kv_split else "sharing",
                    "{:,}".format(self.n_ctx), self.context_why,
                    self.engine.kv_mb, args.cache_type_k, args.cache_type_v), "🛏️", memory_mb=self.memory_mb,
                kv_cache_mb=self.engine.kv_mb, load_ms=self.load_ms, slots=args.parallel, ctx_size=self.n_ctx,
                cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v)
        # (a hive's worker: the port its hive bound for it when it chose it, held since)
        listening = None if args.listen_fd is None else socket.socket(fileno=args.listen_fd)
        port = self.serve(args.host, args.port, listening)
        self.url = "http://%s:%d" % (local_address(args.host), port)
        self.state = WORKER_READY
        narrate(ACTOR_HTTP, "http_ready", "HTTP server ready on port %d" % port, "🚀", port=port)
        if args.hive_url:
            narrate(ACTOR_WORKER, "ready_callback", "Reporting ready to rbee-hive", "👋")
        # after the narration above on the same stdout: a parent that reads this line has relayed it all
        self.announce_ready(worker_id=self.worker_id)
        if args.hive_url:
            HiveClient(args.hive_url, os.environ.get(ENV_READY_TOKEN)).ready(
                {"worker_id": self.worker_id, "url": self.url, "model_ref": self.model_ref, "backend": args.backend,
                 "device": args.device, "port": port, "load_ms": self.load_ms, "health": self.health_now()})

    def context(self):
        """The KV cache's cells: --ctx-size, else the context the model was trained for, as far as
        the memory left beside the model holds its KV cache (--memory-limit-mb: what its hive lets
        it take; else what the device has free now); `context_why` says which."""
        from backends.engine import kv_bytes_per_token, model_kv_shape
        import llama_cpp
        args = self.args
        trained = self.llm._model.n_ctx_train() or DEFAULT_N_CTX
        per_token = kv_bytes_per_token(*model_kv_shape(llama_cpp, self.llm._model.model), args.cache_type_k,
                                       args.cache_type_v)
        if args.ctx_size:
            if args.ctx_size > trained:
                self.context_why = ("--ctx-size, beyond the %s the model was trained for: its answers may degrade "
                                    "past them" % "{:,}".format(trained))
            else:
                self.context_why = "--ctx-size"
            return args.ctx_size
        if args.memory_limit_mb is not None:   # (the room placement counted: the worker's estimate, then the cache)
            shape = gguf_shape(args.model)
            room_mb = args.memory_limit_mb - memory_need_mb(shape["size_bytes"], shape,
                                                            n_ubatch=args.ubatch_size or args.batch_size,
                                                            slots=args.parallel)
        else:   # (a mapped model's pages count as free memory: take them off, and leave some for the rest)
            room_mb = self.backend.devices()[args.device]["memory_free_mb"] - KV_RESERVE_MB - (
                os.path.getsize(args.model) >> 20 if args.backend == "cpu" else 0)
        n_ctx = fitting_context(trained, per_token, room_mb)
        if n_ctx < trained:
            self.context_why = "what %d MB of free memory holds beside the model, of the %s it was trained for" % (
                max(0, room_mb), "{:,}".format(trained))
        return n_ctx

    def prompt_cache(self):
        """The engine's PromptCache (None with --prompt-cache-mb 0): on disk too with --prompt-cache-dir,
        under this model's and cache types' fingerprint."""
        from backends.engine import PromptCache
        args = self.args
        if not args.prompt_cache_mb:
            return None
        fingerprint = hashlib.sha256(("%s:%d:%s:%s:%s" % (
            os.path.basename(args.model), os.path.getsize(args.model), args.cache_type_k, args.cache_type_v,
            "split %d" % args.parallel if args.kv_split else "unified")).encode()).hexdigest()
        return PromptCache(args.prompt_cache_mb, args.prompt_cache_dir, fingerprint[:16])

    def split_options(self):
        """A split worker (--rpc): the remote devices registered, and the load's options that put
        --offload-layers of the model's layers on them (shared by --tensor-split), the rest here."""
        if not self.args.rpc:
            return {}
        from backends import rpc
        rpc.add_servers(self.args.rpc)
        narrate(ACTOR_LOADER, "rpc_devices", "Splitting: %d layers on %d remote device(s) at %s" % (
            self.args.offload_layers, len(self.args.rpc), ", ".join(self.args.rpc)), "🧩", rpc=self.args.rpc)
        # llama.cpp offloads the output layer first (it counts n_layer + 1): one more, so that the
        # parts hold their planned blocks (and the output layer, on the last of them)
        options = {"n_gpu_layers": self.args.offload_layers + 1}
        if len(self.args.rpc) > 1:
            options["tensor_split"] = [float(x) for x in self.args.tensor_split.split(",")]
        if self.args.backend != "cpu":   # this node's GPU keeps its share: every layer is offloaded somewhere
            import llama_cpp
            options.update(split_mode=llama_cpp.LLAMA_SPLIT_MODE_LAYER, n_gpu_layers=-1)
        return options

    # -- endpoints ------------------------------------------------------------------------------

    def health(self, req):
        req.send_json(200, self.health_now())

    def health_now(self):
        """/health's answer: its state, load, memory and context now."""
        running, waiting = self.engine.load() if self.engine else (0, 0)
        state = self.state if self.state != WORKER_READY else (WORKER_BUSY if running else WORKER_IDLE)
        return {"status": "ok", "state": state, "worker_id": self.worker_id, "model_ref": self.model_ref,
                "backend": self.args.backend, "device": self.args.device, "memory_mb": self.memory_mb,
                "slots_total": self.args.parallel,
                "slots_available": max(0, self.args.parallel - running) if self.state == WORKER_READY else 0,
                "queue_length": waiting, "max_queue": self.args.max_queue, "jobs_total": self.jobs_total,
                "ctx_size": self.n_ctx, "kv_split": self.args.kv_split, "cache_type_k": self.args.cache_type_k,
                "cache_type_v": self.args.cache_type_v, "kv_cache_mb": self.engine.kv_mb if self.engine else 0,
                "kind": self.kind, "cache": self.engine.counters() if self.engine else {},
                "last_activity_unix": int(self.last_activity), "version": __version__}

    def cancel(self, req):
        job_id = req.json.get("job_id")
        with self.jobs_lock:
            job = self.jobs.get(job_id) if isinstance(job_id, str) else None
        if job is not None:
            self.engine.cancel(job.engine_job)
        req.send_empty(204)

    def shutdown_request(self, req):
        lost = req.json.get("lost")
        if isinstance(lost, dict):   # a split's part died: the jobs end as a crash that names it
            self.lost_part = {k: str(lost.get(k, ""))[:300] for k in ("node", "endpoint")}
        req.send_empty(202)
        threading.Thread(target=self.shutdown, args=("POST /shutdown",), daemon=True).start()

    def render(self, job):
        """(prompt tokens, stop strings) of a job: its text as it is (raw, or a model without a
        chat template), else its conversation through the model's template, tools included; with a
        `suffix`, fill-in-the-middle (FimPrompt)."""
        if job.suffix is not None:   # the model's FIM tokens, no template
            return self.fim.render(job, self.n_ctx), []
        if (job.messages is not None or job.offered_tools()) and self.chat is None:
            raise invalid("messages" if job.messages is not None else "tools", "this model has no chat template",
                          "Send `prompt` instead, without tools")
        if job.messages is None and (job.raw or self.chat is None):
            return self.llm.tokenize(job.prompt.encode("utf-8"), add_bos=True, special=True), []
        try:
            return self.chat.render(job.messages or job.prompt, job.offered_tools(), job.parallel_tool_calls)
        except Exception as exc:   # the template's own raise_exception (roles out of order, ...)
            raise invalid("messages", "the model's chat template refused them: %s" % exc)

    def grammar(self, job):
        """The GBNF grammar a job's text must follow, or None: a call of the forced functions in
        this model's tool format, else a JSON value of its schema, else any JSON object."""
        from llama_cpp.llama_grammar import JSON_GBNF
        if job.forced_functions():
            grammar = tool_call_grammar(self.chat.tool_format, job.forced_functions(), job.parallel_tool_calls)
        elif job.json_schema is not None:
            grammar = schema_grammar(job.json_schema)
        else:
            return JSON_GBNF if job.grammar == "json" else None
        if self.engine.grammar_refused(grammar):
            raise invalid("tools" if job.forced_functions() else "json_schema",
                          "llama.cpp refused the grammar made of this schema", "Simplify the schema")
        return grammar

    def tokenize(self, req):
        """The number of tokens of a job's prompt, as /execute would render it."""
        self.generates()
        req.send_json(200, {"tokens": len(self.render(Job(req.json, self.n_ctx))[0])})

    def generates(self):
        """400 for a generation asked of an embedding model or a reranker."""
        if self.kind != KIND_CHAT:
            raise invalid("model", "is %s model: it does not generate text" % (
                "an embedding" if self.kind == KIND_EMBEDDING else "a reranking"),
                "Ask it for embeddings (/v1/embeddings, /api/embed)" if self.kind == KIND_EMBEDDING
                else "Ask it to rank documents (/v1/rerank)")

    def embed(self, req):
        """The L2-normalised embedding of each input, in its order, from a context of their own
        (backends.engine.Embedder, made on first use: a chat model embeds too, as with Ollama)."""
        if self.kind == KIND_RERANK:
            raise invalid("model", "is a reranking model: it only ranks documents, it does not embed",
                          "Ask it to rank documents (/v1/rerank), or embed with an embedding model")
        inputs = embed_inputs(req.json, self.llm, self.embed_ctx)
        started = time.perf_counter()
        vectors = self._embedder().embed(inputs)
        self.last_activity = time.time()
        req.send_json(200, {"embeddings": vectors, "prompt_tokens": sum(map(len, inputs)),
                            "dimensions": self.embedder.dimensions, "duration_ms": round(
                                (time.perf_counter() - started) * 1000, 1)})

    def rerank(self, req):
        """A reranker's score of each (query, document) pair, in the documents' order: the model's
        rank pooling (its classification head) on the pair as llama.cpp's server formats it, in the
        embeddings context; raw scores (logits), as llama.cpp's server gives them."""
        if self.kind != KIND_RERANK:
            raise invalid("model", "is not a reranking model (its GGUF declares no rank pooling): it cannot rerank",
                          "Rerank with a reranker such as bge-reranker-v2-m3 or jina-reranker-v2")
        pairs = rerank_inputs(req.json, self.llm, self.embed_ctx)
        started = time.perf_counter()
        scores = [vector[0] for vector in self._embedder().embed(pairs)]
        self.last_activity = time.time()
        req.send_json(200, {"scores": scores, "prompt_tokens": sum(map(len, pairs)),
                            "duration_ms": round((time.perf_counter() - started) * 1000, 1)})

    def _embedder(self):
        """The embeddings context, made on first use (a 503 while the worker is not ready)."""
        if self.state != WORKER_READY:
            raise self.busy()
        with self.embedder_lock:
            if self.embedder is None:
                from backends.engine import Embedder
                self.embedder = Embedder(self.llm, self.embed_ctx)
                narrate(ACTOR_LOADER, "embeddings_ready", "Embeddings context ready (%d %s, %s pooling)" % (
                    self.embedder.dimensions, "score" if self.embedder.ranks else "dimensions",
                    EMBED_POOLING.get(self.embedder.pooling, "its own")), "🧭")
        return self.embedder

    def execute(self, req):
        self.generates()
        job = Job(req.json, self.n_ctx)
        prompt_tokens, template_stop = self.render(job)
        job.stop = job.stop + [s for s in template_stop or [] if s not in job.stop]
        if len(prompt_tokens) >= self.n_ctx:   # (never cut: the caller hears how large it is)
            raise ContextExceeded("The prompt is %s tokens; the context of worker %s (%s) holds %s" % (
                "{:,}".format(len(prompt_tokens)), self.worker_id, self.model_ref, "{:,}".format(self.n_ctx)),
                {"field": "messages" if job.messages is not None else "prompt", "prompt_tokens": len(prompt_tokens),
                 "ctx_size": self.n_ctx},
                "Shorten the conversation, or ask for a larger context: num_ctx (Ollama's options), ctx_size "
                "(OpenAI's API), --ctx-size (rbee.py infer)")
        from backends.engine import EngineJob
        job.engine_job = EngineJob(prompt_tokens, job.max_tokens, job.temperature, job.top_p, job.top_k, job.seed,
                                   self.grammar(job), job.logprobs,
                                   self.chat.marker_tokens if job.offered_tools() else ())
        with self.jobs_lock:   # admission: the slots plus the queue, or 503
            if job.job_id in self.jobs:
                raise InvalidRequest("job_id: %s is already running here" % job.job_id, {"field": "job_id"},
                                     "Give each job its own id (or none: the worker makes one)", status=409)
            if self.state != WORKER_READY or len(self.jobs) >= self.args.parallel + self.args.max_queue:
                raise self.busy()
            self.jobs[job.job_id] = job
            self.jobs_total += 1
        try:
            position = self.engine.submit(job.engine_job)
            self._stream(req.sse(), job, len(prompt_tokens), position)
        finally:
            self.engine.cancel(job.engine_job)   # (a job that is still queued or running ends here too)
            with self.jobs_lock:
                self.jobs.pop(job.job_id, None)
            self.last_activity = time.time()

    def busy(self):
        why = "is shutting down" if self.state != WORKER_READY else "has %d slots busy and %d requests waiting" % (
            self.args.parallel, self.args.max_queue)
        return SlotsBusy("Worker %s %s" % (self.worker_id, why), {"retry_after_s": 1},
                         "Retry in a moment, or run another worker for this model")

    def _stream(self, stream, job, n_prompt, position):
        """The job's SSE stream: queued (if it waits), started, narration and tokens, then end."""
        with narration_to(stream.narration):
            if position:
                stream.send(EVENT_QUEUED, {"job_id": job.job_id, "position": position})
                narrate(ACTOR_WORKER, "queued", "Waiting for a free slot (position %d)" % position, "⏳",
                        job_id=job.job_id)
            events, tokens_out, held, stop_reason, stopped = job.engine_job.events, 0, "", None, None
            started = first_at = None
            cached = 0
            output = JobOutput(stream, ToolCallParser(self.chat.tool_format, job.parallel_tool_calls)
                               if job.offered_tools() else None)
            while stop_reason is None:
                try:
                    kind, data = events.get(timeout=0.2)
                except queue.Empty:
                    if stream.client_gone():   # a client that left: its job ends (or never starts)
                        self.engine.cancel(job.engine_job)
                    continue
                if kind == ENGINE_ADMITTED and data["resumed"]:
                    narrate(ACTOR_BACKEND, "resumed", "Room in the KV cache again: going on after %d tokens%s" % (
                        tokens_out, " (%s tokens restored from the prompt cache)" % "{:,}".format(data["restored"])
                        if data["restored"] else ""), "▶️", job_id=job.job_id)
                elif kind == ENGINE_WAITING:
                    narrate(ACTOR_BACKEND, "kv_wait", (
                        "The KV cache is full: paused after %d tokens while older requests go on (%s of %s cells "
                        "free); it goes on when they end" % (tokens_out, "{:,}".format(data["free"]),
                                                             "{:,}".format(data["n_ctx"]))
                        if data["reason"] == "paused" else
                        "Waiting for room in the KV cache: the prompt needs %s cells, %s of %s are free" % (
                            "{:,}".format(data["need"]), "{:,}".format(max(0, data["free"])),
                            "{:,}".format(data["n_ctx"]))), "⏳", job_id=job.job_id, **data)
                elif kind == ENGINE_ADMITTED:
                    started = time.perf_counter()
                    cached = data["reused"]
                    stream.send(EVENT_STARTED, {"job_id": job.job_id, "worker_id": self.worker_id,
                                                "slot": data["slot"]})
                    chars = len(job.prompt) or sum(len(m["content"]) for m in job.messages or ())
                    narrate(ACTOR_BACKEND, "inference_start", "Starting inference (prompt: %d chars, max_tokens: %d)"
                            % (chars, job.max_tokens), "🚀", job_id=job.job_id)
                    narrate(ACTOR_TOKENIZER, "tokenize", "Tokenized prompt (%d tokens)" % n_prompt, "🍰",
                            job_id=job.job_id)
                    if data["reused"] > 1:   # a lone BOS in common is no reuse worth the name
                        narrate(ACTOR_BACKEND, "cache_reuse", "Reusing %s cached tokens of %s%s" % (
                            "{:,}".format(data["reused"]), "{:,}".format(n_prompt),
                            " (%s restored from the prompt cache)" % "{:,}".format(data["restored"])
                            if data["restored"] else ""), "♻️", job_id=job.job_id, reused=data["reused"],
                            restored=data["restored"])
                    else:
                        narrate(ACTOR_BACKEND, "cache_reset", "Reset KV cache for fresh start", "🧹",
                                job_id=job.job_id)
                elif kind == ENGINE_TOKEN:
                    tokens_out += 1
                    first_at = first_at or time.perf_counter()
                    text, held, stopped = split_at_stop(held + data, job.stop) if job.stop else (data, "", None)
                    output.send(text)
                    if stopped or output.calls_done():
                        stop_reason = "tool_calls" if output.calls_done() else "stop"
                        self.engine.cancel(job.engine_job)
                    elif tokens_out % 10 == 0:
                        narrate(ACTOR_BACKEND, "token_generate", "Generated %d tokens" % tokens_out, "🎯",
                                job_id=job.job_id)
                elif kind == ENGINE_LOGPROBS:
                    output.logprobs.append(data)
                elif kind == ENGINE_END:
                    stop_reason = data
                else:
                    raise InternalError("llama.cpp failed during job %s: %s" % (job.job_id, data),
                                        {"job_id": job.job_id}, component=self.component)
            if stop_reason != "cancelled":
                output.send(held)
                output.finish()
                stop_reason = "tool_calls" if output.calls() and not output.parser.cut_short else stop_reason
            if stop_reason == "cancelled" and job.interrupted_by and self.lost_part:
                raise WorkerCrashed("Worker %s lost its part on %s (%s) during job %s after %d tokens" % (
                    self.worker_id, self.lost_part["node"], self.lost_part["endpoint"], job.job_id, tokens_out),
                    dict(self.lost_part, tokens_generated=tokens_out, worker_id=self.worker_id),
                    "See the RPC server's log on %s under $RBEE_HOME/logs; run the command again" %
                    self.lost_part["node"], ACTOR_WORKER)
            if stop_reason == "cancelled" and job.interrupted_by:
                raise RequestCancelled("Worker %s stopped during job %s after %d tokens (%s)" % (
                    self.worker_id, job.job_id, tokens_out, job.interrupted_by),
                    {"tokens_generated": tokens_out, "worker_id": self.worker_id},
                    "Its hive or queen stopped; run the command again", ACTOR_WORKER)
            ended = time.perf_counter()
            started = started or ended
            elapsed = max(ended - started, 1e-9)
            narrate(ACTOR_BACKEND, "inference_complete", "Inference complete! %d tokens in %d ms (%.0f tok/s)" % (
                tokens_out, elapsed * 1000, tokens_out / elapsed), "🎉", job_id=job.job_id)
        # the end event separates the prompt's evaluation from the decoding of the tokens after the first
        decode = ended - first_at if first_at else 0.0
        stream.finish(EVENT_END, {"job_id": job.job_id, "tokens_out": tokens_out, "stop_reason": stop_reason,
                                  "stop_sequence": stopped if stop_reason == "stop" else None,
                                  "prompt_tokens": n_prompt, "prompt_cached": cached, "tool_calls": output.calls(),
                                  "prompt_eval_ms": round(((first_at or ended) - started) * 1000, 1),
                                  "decode_time_ms": round(decode * 1000, 1),
                                  "tokens_per_sec": round((tokens_out - 1) / decode, 2) if decode > 0 else 0.0})

    # -- shutdown: finish nothing new, end every job, unload, exit 0 (narrated on stdout) --------

    def shutdown(self, reason="shutdown"):
        if not self.stopping.claim():
            return
        if self.state == WORKER_LOADING:   # nothing to unload yet
            narrate(ACTOR_WORKER, "exit", "Worker exiting (%s during start-up)" % reason, "💤")
            os._exit(0)
        self.state = WORKER_DRAINING
        with self.jobs_lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            job.interrupted_by = reason
            self.engine.cancel(job.engine_job)
        narrate(ACTOR_WORKER, "shutdown", "Shutting down gracefully (%s)" % reason, "👋")
        deadline = time.monotonic() + GRACEFUL_TIMEOUT / 2
        while self.jobs and time.monotonic() < deadline:   # their streams say how they ended
            time.sleep(0.02)
        if not self.engine.close(timeout=max(0.1, deadline - time.monotonic())):
            # a step did not end (a long prompt still in llama.cpp): freeing the model under it
            # would crash, so leave and let the system take the memory back
            narrate(ACTOR_WORKER, "exit", "Worker exiting (a job did not stop in time)", "💤", level="warn")
            os._exit(0)
        self.stop_serving()
        narrate(ACTOR_DEVICES, "memory_free", "Freeing %d MB %s" % (
            self.memory_mb, "RAM" if self.args.backend == "cpu" else "VRAM"), "🧹")
        if self.embedder is not None:
            self.embedder.close()
        llm, self.llm = self.llm, None
        with contextlib.suppress(Exception):
            llm.close()
        narrate(ACTOR_WORKER, "exit", "Worker exiting", "💤")
        self.stopped.set()


def run_worker(args):
    api_key = os.environ.get(ENV_WORKER_API_KEY)
    if not api_key:
        raise MissingApiKey("%s is not set" % ENV_WORKER_API_KEY, {},
                            "Set %s in the worker's environment (never on its command line)" % ENV_WORKER_API_KEY)
    run_role(Worker(args, api_key), args.lifeline)


# ============================================================================================
# RPC server (rbee.py rpc): one device of a node, lent to a split worker on another node
# ============================================================================================

def run_rpc(args):
    """Serve one device over ggml's RPC protocol (backends/rpc.py) until the hive closes our
    lifeline or kills us. ggml's server blocks in C and takes no signal of Python's: SIGTERM keeps
    its default action, and the lifeline thread ends the process."""
    import backends
    from backends import rpc
    narrate(ACTOR_RPC, "startup", "RPC server starting on %s:%d for %s device %d" % (
        args.host, args.port, args.backend, args.device), "🌅")
    backends.require(args.backend, args.device)
    if not rpc.supported():
        raise BackendUnavailable("llama-cpp-python on this node has no RPC backend", {"node": socket.gethostname()},
                                 "Rebuild it with CMAKE_ARGS=-DGGML_RPC=on: rbee.py nodes install NODE")
    device = rpc.device(args.backend, args.device)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if args.lifeline:
        watch_lifeline(lambda reason: os._exit(0))
    build, free = rpc.build(), rpc.free_mb(device)

    # the tensor cache: a split loaded again sends the hashes of its large weights, not their bytes
    cache = rbee_home(RPC_CACHE_DIR)
    os.makedirs(cache, mode=0o700, exist_ok=True)

    def accepts():
        try:
            socket.create_connection((args.host, args.port), timeout=1).close()
            return True
        except OSError:
            return False

    def announce():   # ready once it accepts connections (and its cache is seeded)
        deadline = time.monotonic() + 30
        while not accepts():
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        if args.seed:
            seed_rpc_cache(args, cache)
        narrate(ACTOR_RPC, "rpc_ready", "RPC server ready on %s:%d (%s, %d MB free)" % (
            args.host, args.port, build, free), "🚀", port=args.port)
        announce_ready(ACTOR_RPC, args.port, build=build, free_mb=free)
    threading.Thread(target=announce, daemon=True).start()
    rpc.serve("%s:%d" % (args.host, args.port), device, backends.threads(), cache)


def seed_rpc_cache(args, cache):
    """Fill this server's tensor cache from this node's own copy of the split's model (`--seed`),
    once per file (a marker under the cache names its path, size and mtime): ggml's client, in a
    child process (the server takes one connection at a time, and the child's ends with it), sets
    every large tensor once, and the server keeps each under its hash (backends/rpc.py seed)."""
    try:
        stat = os.stat(args.seed)
    except OSError as exc:
        narrate(ACTOR_RPC, "rpc_seed", "Not seeding the tensor cache: %s" % exc, "⚠️", level="warn")
        return
    marker = os.path.join(cache, "seeded", hashlib.sha256(("%s:%d:%d" % (
        os.path.realpath(args.seed), stat.st_size, stat.st_mtime_ns)).encode()).hexdigest()[:16])
    if os.path.exists(marker):
        return
    started, out = time.monotonic(), None
    probe = ("import sys; sys.path.insert(0, %r); from backends import rpc; print(*rpc.seed(%r, %r))" % (
        HERE, "%s:%d" % (args.host, args.port), args.seed))
    try:
        # (within the hive's wait for this part: a seed cut short keeps what it cached, and the next one
        # sends the hashes of those and the bytes of the rest)
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             timeout=LOADING_TIMEOUT - 60)
        tensors, sent = (int(x) for x in out.stdout.split()[-2:])
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        said = (out.stderr if out is not None else "") or str(exc)
        narrate(ACTOR_RPC, "rpc_seed", "Could not seed the tensor cache from %s: %s" % (args.seed, said.strip()[-300:]),
                "⚠️", level="warn")
        return
    os.makedirs(os.path.dirname(marker), mode=0o700, exist_ok=True)
    with open(marker, "w") as f:
        f.write(args.seed + "\n")
    narrate(ACTOR_RPC, "rpc_seed", "Seeded the tensor cache from this node's %s: %d tensors, %s in %.1f s" % (
        os.path.basename(args.seed), tensors, human_bytes(sent), time.monotonic() - started), "🌱",
        tensors=tensors, bytes=sent)


# ============================================================================================
# Hive (rbee.py hive): the pool manager of one node -- catalog, provisioning, preflight, workers
# ============================================================================================

class HiveChildProcess:
    """A process this hive started (a worker, a split's part) and the spawns waiting for it: its
    narration goes to them as it comes, on their own streams, and not after their answer as the
    hive's stdout could carry it (the queen reads that over ssh, a channel of its own)."""

    def __init__(self, label):
        self.label = label                #: {its id field: its id}, put on each event it narrates
        self.child = None                 #: its process (set once, by the starting thread, before it is listed)
        self.listeners = []               #: narration sinks of the spawns waiting for it (their threads)

    def relay(self, event):
        """Its narration goes to whoever waits for it and to the hive's stdout (its log); a line
        already delivered to a listener is marked `relayed`, so that a queen reading that stdout
        does not show it twice. A failed start's own error (run_role narrates it) is kept."""
        for key, value in self.label.items():
            event.setdefault(key, value)
        listeners = list(self.listeners)
        for listener in listeners:
            with contextlib.suppress(ClientGone):
                listener(event)
        emit_line(dict(event, relayed=True) if listeners else event)


class WorkerProcess(HiveChildProcess):
    """A worker this hive started: its process (a Child), its narration listeners, its readiness.
    Its state is written by the hive's WorkerPool alone (the fields it guards say so)."""

    def __init__(self, worker_id, model_ref, backend, device, host, port, api_key, ready_token):
        super().__init__({"worker_id": worker_id})
        self.worker_id = worker_id        #: the id the hive gave it
        self.model_ref = model_ref        #: the reference it was asked for
        self.backend, self.device = backend, device  #: where it runs the model
        self.port = port                  #: the port it was told to bind
        self.api_key = api_key            #: its bearer key, handed to whoever gets this worker
        self.ready_token = ready_token    #: the secret its ready callback must carry
        self.client = WorkerClient("http://%s:%d" % (local_address(host), port), api_key, worker_id)
        self.url = None                   #: where it answers (set with its ready callback, by the pool)
        #: loading -> idle <-> busy -> draining -> exited (WorkerPool, under its lock)
        self.state = WORKER_LOADING
        self.last_activity = time.time()  #: when it last worked or was handed out (WorkerPool, under its lock)
        self.load_ms = None               #: how long its model took to load (its ready callback, by the pool)
        #: seconds it stays loaded when idle, -1 forever: the last spawn's (WorkerPool, under its lock)
        self.keep_alive = DEFAULT_KEEP_ALIVE
        self.split = None                 #: a split's remote devices and layers (split_of), or None (set once)
        #: when a spawn last gave it out: the reaper leaves it alone a moment (WorkerPool, under its lock)
        self.handed_out = time.time()
        #: its last /health (memory_mb, slots_total, slots_available, queue_length, jobs_total) (WorkerPool)
        self.health = {}
        self.called_back = threading.Event()   #: its ready callback came (the /v1/workers/ready thread)

    def public(self):
        health = self.health
        return {"worker_id": self.worker_id, "url": self.url, "model_ref": self.model_ref, "backend": self.backend,
                "device": self.device, "state": self.state, "pid": self.child.proc.pid, "port": self.port,
                "last_activity_unix": int(self.last_activity), "memory_mb": self.memory_mb(),
                "slots_total": health.get("slots_total", 0), "slots_available": health.get("slots_available", 0),
                "queue_length": health.get("queue_length", 0), "jobs_total": health.get("jobs_total", 0),
                "ctx_size": health.get("ctx_size", 0), "cache_type_k": health.get("cache_type_k"),
                "cache_type_v": health.get("cache_type_v"), "kv_cache_mb": health.get("kv_cache_mb", 0),
                "keep_alive_s": self.keep_alive, "split": self.split,
                "expires_unix": None if self.expires() is None else int(self.expires())}

    def memory_mb(self):
        """What it takes: its /health's memory_mb; before it has one (it loads), a CPU worker's RSS so far
        (0 where that cannot be read; a VRAM worker's model goes to its device), so that the queen's
        reservation for its spawn counts only the rest (node_view)."""
        if "memory_mb" in self.health or self.backend != "cpu":
            return self.health.get("memory_mb", 0)
        import backends
        return backends.proc_rss_mb(self.child.proc.pid) or 0

    def expires(self):
        """When the reaper will stop it if it stays idle (None: never, or it is busy)."""
        if self.keep_alive < 0 or self.state != WORKER_IDLE:
            return None
        return max(self.last_activity + self.keep_alive, self.handed_out + HANDOUT_GRACE)

class RpcProcess(HiveChildProcess):
    """An RPC server this hive started for a split (rbee.py rpc): one device lent to a primary."""

    def __init__(self, rpc_id, backend, device, host, port):
        super().__init__({"rpc_id": rpc_id})
        self.rpc_id = rpc_id              #: the id the hive gave it
        self.backend, self.device = backend, device   #: the device it serves
        self.host, self.port = host, port   #: where it listens: the interface facing its primary

    def public(self):
        info = self.child.ready_line
        return {"rpc_id": self.rpc_id, "endpoint": "%s:%d" % (self.host, self.port), "backend": self.backend,
                "device": self.device, "pid": self.child.proc.pid, "build": info.get("build"),
                "free_mb": info.get("free_mb")}


def facing(peer):
    """This machine's address on the interface that routes to `peer` (no packet is sent)."""
    if not peer or is_loopback(peer):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer, 9))
        return s.getsockname()[0]


class WorkerPool:
    """The hive's workers (PROTOCOL.md §3: in memory only), and the one writer of their state:
    every change below is made under `lock`, so that a health poll's answer cannot undo a drain,
    and the reaper's "idle for too long" and its drain are one step that no handout can split."""

    def __init__(self):
        self.lock = threading.Lock()      #: guards `workers` and each worker's state fields
        self.workers = {}                 #: worker_id -> WorkerProcess (under `lock`)

    def add(self, worker):
        with self.lock:
            self.workers[worker.worker_id] = worker

    def get(self, worker_id):
        with self.lock:
            return self.workers.get(worker_id)

    def all(self):
        with self.lock:
            return list(self.workers.values())

    def ready(self):
        """The workers whose ready callback came."""
        return [w for w in self.all() if w.called_back.is_set()]

    def matching(self, model_ref, backend, device, split=None):
        return [w for w in self.ready() if (w.model_ref, w.backend, w.device) == (model_ref, backend, device)
                and w.split == split and w.state in WORKER_SERVING]

    def called_back(self, worker, url, load_ms, health):
        """Its ready callback (with its /health then: its slots and context): loading -> idle."""
        with self.lock:
            if worker.state == WORKER_LOADING:
                worker.url, worker.load_ms, worker.health = url, load_ms, health
                worker.state, worker.last_activity = WORKER_IDLE, time.time()
        worker.called_back.set()

    def observed(self, worker, health):
        """Its /health answered: idle or busy as it says, unless it is draining or gone by now."""
        with self.lock:
            if worker.state in WORKER_SERVING:
                worker.state, worker.health = health.get("state", worker.state), health
                if worker.state == WORKER_BUSY:
                    worker.last_activity = time.time()
                else:
                    worker.last_activity = max(worker.last_activity, health.get("last_activity_unix") or 0)
            return worker.state

    def hand_out(self, worker, keep_alive):
        """Give a serving worker to a spawn, whose keep-alive becomes its own; False if it is
        draining or gone by now."""
        with self.lock:
            if worker.state not in WORKER_SERVING:
                return False
            worker.handed_out, worker.keep_alive = time.time(), keep_alive
            return True

    def drain(self, worker):
        """Mark it draining (a stop was asked); False if it was draining or gone already."""
        with self.lock:
            if worker.state in (WORKER_DRAINING, WORKER_EXITED):
                return False
            worker.state = WORKER_DRAINING
            return True

    def drain_if_expired(self, worker):
        """Mark it draining if it is idle past its keep-alive: the reaper's decision, in one step."""
        with self.lock:
            expires = worker.expires()
            if expires is None or time.time() < expires:
                return False
            worker.state = WORKER_DRAINING
            return True

    def exited(self, worker):
        with self.lock:
            worker.state = WORKER_EXITED
            self.workers.pop(worker.worker_id, None)


class Hive(App):
    """The pool manager: serves PROTOCOL.md §5.2 and owns every worker it starts."""

    component = ACTOR_HIVE

    def __init__(self, args, token=None, keep_alive=None):
        super().__init__((
            (HIVE_HEALTH, self.health), (HIVE_WORKERS, self.list_workers), (HIVE_SPAWN, self.spawn),
            (HIVE_READY, self.worker_ready), (HIVE_WORKER_SHUTDOWN, self.shutdown_worker),
            (HIVE_MODELS, self.list_models), (HIVE_DOWNLOAD, self.download_model), (HIVE_REMOVE, self.remove_model),
            (HIVE_SHUTDOWN, self.shutdown_request), (HIVE_RESOURCES, self.resources), (HIVE_RPC_START, self.rpc_start),
            (HIVE_RPC_STOP, self.rpc_stop), (HIVE_MODEL_INFO, self.model_info)))
        self.args = args                  #: the command line
        self.token = token                #: the bearer token every request but health must carry (or None)
        self.node = args.node_name or socket.gethostname()   #: its node's name (no DNS: gethostname is local)
        self.catalog = ModelCatalog()     #: this node's models.db (each call opens its own connection)
        self.provisioner = ModelProvisioner(self.catalog)  #: downloads into the catalog (one per model at a time)
        self.pool = WorkerPool()          #: the workers it started, and the one writer of their state
        self.spawn_locks = KeyedLocks()   #: one spawn of a (model, backend, device) at a time
        self._ports_lock = threading.Lock()         #: choosing an RPC server's port and registering it is one step
        self._backends = None             #: backends.detect(), asked once (the first health or spawn)
        #: a worker's keep-alive when its spawn names none; a queen's hive also ends after this long
        #: without a worker (the handshake's, else --keep-alive)
        self.keep_alive = args.keep_alive if keep_alive is None else keep_alive
        self.workerless_since = time.time()   #: when it last had a worker or work (the reaper's; request threads)
        self.in_progress = InFlight()     #: spawns and downloads under way: the hive never ends during one
        self.rpcs = {}                    #: rpc_id -> RpcProcess lent to splits (under `_progress_lock`)
        self._build = None                #: this node's ggml build (asked once, in a child: ggml_build)
        self._devices = (float("-inf"), {})   #: (when, devices_now's answer): request threads, last writer wins
        self._progress_lock = threading.Lock()   #: guards `rpcs`
        os.makedirs(rbee_home("logs"), mode=0o700, exist_ok=True)

    def authorize(self, req, handler):
        # a ready callback carries its worker's own secret instead, checked by worker_ready
        if self.token is not None and handler not in (self.health, self.worker_ready):
            req.require_bearer(self.token)

    @property
    def local_url(self):
        return "http://%s:%d" % (local_address(self.args.host), self.port)

    def detected_backends(self):
        if self._backends is None:
            import backends
            self._backends = backends.detect()
        return self._backends

    # -- endpoints ------------------------------------------------------------------------------

    def health(self, req):
        found = self.detected_backends()
        req.send_json(200, {"status": "alive", "version": __version__, "api_version": API_VERSION, "node": self.node,
                            "backends": list(found), "devices": found, "workers": len(self.pool.all())})

    def list_workers(self, req):
        ready = self.pool.ready()
        for worker in ready:
            self.poll_worker(worker)
        req.send_json(200, {"workers": [w.public() for w in ready]})

    def list_models(self, req):
        req.send_json(200, {"models": self.catalog.list()})

    @contextlib.contextmanager
    def working(self):
        """Around a spawn or a download: a hive without workers does not end meanwhile."""
        with self.in_progress:
            try:
                yield
            finally:
                self.workerless_since = time.time()

    def devices_now(self):
        """{backend: devices} with their free memory, read at most once a second (nvidia-smi takes
        tens of ms, and the queen asks before every placement)."""
        import backends
        at, found = self._devices
        if time.monotonic() - at > 1.0:
            found = {name: backends.get(name).devices() for name in self.detected_backends()}
            self._devices = (time.monotonic(), found)
        return found

    def ggml_build(self):
        """This node's ggml version and commit, asked of a child interpreter once (the hive never
        loads llama.cpp itself); what every part of a split must share."""
        if self._build is None:
            probe = ("import sys; sys.path.insert(0, %r); from backends import rpc; print(rpc.build() if "
                     "rpc.supported() else 'none')" % HERE)
            try:
                out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
                self._build = out.stdout.strip() or "unknown"
            except (OSError, subprocess.TimeoutExpired):
                self._build = "unknown"
        return self._build

    def rpc_start(self, req):
        """Lend a device to a split: an RPC server on the interface facing the primary (`peer`;
        none: the queen's machine, where this hive's ssh session comes from), on a free port."""
        body = req.json
        backend, device = backend_and_device(body)
        import backends
        backends.require(backend or "cpu", device)
        peer = text_field(body, "peer", "", limit=255) or (os.environ.get(ENV_SSH_CLIENT) or "").split(" ")[0]
        try:
            host = facing(peer)
        except OSError as exc:
            raise invalid("peer", "no route to %s: %s" % (peer, exc))
        seed = self.local_copy(body.get("model_ref"))   # this node's own copy of the split's model, if any
        stream = req.sse()
        with narration_to(stream.narration):
            server = self.start_rpc(backend or "cpu", device, host, seed)
        stream.finish(EVENT_END, server.public())

    def start_rpc(self, backend, device, host, seed):
        """Start a part on the first free port from RPC_PORT on `host`, its start-up narrated to this
        thread's sink, and wait until it takes connections (after seeding its cache from `seed`)."""
        with self._ports_lock:
            port = free_port(host, RPC_PORT)
            rpc_id = "rpc-" + random_id(4)
            server = RpcProcess(rpc_id, backend, device, host, port)
            server.child = Child(rpc_id, role_argv(["rpc", "--host", host, "--port", str(port), "--backend",
                                                    backend, "--device", str(device), "--lifeline"]
                                                   + (["--seed", seed] if seed else [])),
                                 server.relay, lambda code: self.rpc_exited(server, code))
            with self._progress_lock:
                self.rpcs[rpc_id] = server
        server.listeners.append(_current_sink())
        try:
            server.child.listen()
            if not server.child.wait(LOADING_TIMEOUT if seed else 60):
                self.stop_rpc(server)
                raise StartFailed("The RPC server on %s did not start (exit %s)" % (
                    self.node, server.child.proc.poll()), {"node": self.node, "last_output": server.child.last_words()},
                    "See %s" % rbee_home("logs", rpc_id + ".log"), self.component)
        finally:
            server.listeners.clear()
        narrate(ACTOR_HIVE, "rpc_start", "Lending %s:%d to a split at %s:%d" % (backend, device, host, port),
                "🧩", node=self.node, rpc_id=rpc_id)
        return server

    def local_copy(self, model_ref):
        """The path of this node's own copy of `model_ref` (its catalog's, or a file: path here), or None."""
        if not isinstance(model_ref, str) or not model_ref:
            return None
        try:
            ref = ModelRef.parse(model_ref)
        except RbeeError:
            return None
        row = self.catalog.find(ref)
        path = row["local_path"] if row else (ref.reference if ref.provider == "file" else None)
        return path if path and os.path.isfile(path) else None

    def rpc_stop(self, req):
        with self._progress_lock:
            server = self.rpcs.get(text_field(req.json, "rpc_id", limit=200))
        if server is not None:
            self.stop_rpc(server)
        req.send_json(200, {"stopped": server is not None})

    def rpc_exited(self, server, code):
        with self._progress_lock:
            self.rpcs.pop(server.rpc_id, None)
        if not self.stopping.claimed:
            narrate(ACTOR_HIVE, "rpc_exit", "RPC server %s exited (code %s)" % (server.rpc_id, code), "🪦",
                    rpc_id=server.rpc_id, level="warn" if code not in (0, -signal.SIGTERM) else None)

    @staticmethod
    def stop_rpc(server):
        """ggml's server takes no graceful stop: SIGTERM (its default action), SIGKILL after 5 s."""
        server.child.stop(lambda: server.child.proc.send_signal(signal.SIGTERM), timeout=5)

    def resources(self, req):
        """What the queen places by (PROTOCOL.md §12): memory now, per backend's devices, every
        worker (loading ones too) with its memory and load, the catalog, and the size of `?model`."""
        import backends
        ram_total, ram_free = backends.meminfo_mb()
        found = self.devices_now()
        for worker in self.pool.ready():
            self.poll_worker(worker)
        workers = self.pool.all()
        with self._progress_lock:
            rpcs = [s.public() for s in self.rpcs.values()]
        answer = {"node": self.node, "ram_total_mb": ram_total, "ram_free_mb": ram_free, "devices": found,
                  "memory": {name: backends.get(name).MEMORY for name in found},
                  "workers": [w.public() for w in workers], "models": self.catalog.list(),
                  "keep_alive_s": self.keep_alive, "rpc": rpcs}
        if req.query.get("build"):
            answer["ggml_build"] = self.ggml_build()
        if req.query.get("model"):
            ref = ModelRef.parse(req.query["model"])
            row = self.catalog.find(ref)
            size = row["size_bytes"] if row else (
                os.path.getsize(ref.reference) if ref.provider == "file" and os.path.isfile(ref.reference) else None)
            path = row["local_path"] if row else (ref.reference if ref.provider == "file" else None)
            shape = gguf_shape(path) if path and os.path.isfile(path) else {}   # (a FIFO would block the read)
            answer["model"] = {"model_ref": ref.text, "cataloged": row is not None, "size_bytes": size,
                               "layers": shape.get("layers"), "shape": shape}
        req.send_json(200, answer)

    def model_info(self, req):
        """A cataloged model's GGUF metadata (gguf_metadata: what Ollama's show tells of a model)."""
        ref = ModelRef.parse(text_field(req.query, "model", limit=MAX_REF))
        row = self.catalog.find(ref)
        metadata = gguf_metadata(row["local_path"]) if row else None
        if metadata is None:
            raise ModelNotFound("Model %s is not in the catalog of %s%s" % (
                ref.text, self.node, "" if row is None else " as a readable GGUF file"), {"model": ref.text},
                "See what is there: rbee.py models list")
        req.send_json(200, {"model_ref": ref.text, "filename": row["filename"], "metadata": metadata})

    def download_model(self, req):
        ref = model_ref_of(req.json)
        self.provisioner.check(ref)
        stream = req.sse()
        with narration_to(stream.narration), self.working():
            row = self.provisioner.provision(ref)
        stream.finish(EVENT_END, {"model": row})

    def remove_model(self, req):
        ref = model_ref_of(req.json)
        in_use = [w.worker_id for w in self.pool.all() if ModelRef.parse(w.model_ref)[:2] == ref[:2]]
        if in_use:
            raise InvalidRequest("Model %s is loaded by %s" % (ref.text, ", ".join(in_use)),
                                 {"workers": in_use}, "Stop those workers first: rbee.py workers shutdown ID")
        removed = self.catalog.remove(ref)
        if not removed:
            raise ModelNotFound("Model %s is not in the catalog of %s" % (ref.text, self.node),
                                {"model": ref.text}, "See what is there: rbee.py models list")
        req.send_json(200, {"removed": removed})

    def worker_ready(self, req):
        """A worker this hive spawned says it serves. Only that worker knows its secret; its URL
        is where the hive told it to listen, whatever the body says."""
        body = req.json
        worker = self.pool.get(text_field(body, "worker_id", limit=200))
        req.require_bearer(worker.ready_token if worker else None)
        load_ms, health = body.get("load_ms"), body.get("health")
        self.pool.called_back(worker, worker.client.url,   # (where the hive told it to listen)
                              load_ms if isinstance(load_ms, int) and not isinstance(load_ms, bool) else None,
                              health if isinstance(health, dict) else {})
        req.send_json(200, {"ok": True})

    def shutdown_worker(self, req):
        worker = self.pool.get(req.params["worker_id"])
        if worker is None:
            raise WorkerNotFound("No worker %s on %s" % (req.params["worker_id"], self.node),
                                 {"worker_id": req.params["worker_id"], "node": self.node})
        lost = req.json.get("lost")
        lost = {k: str(lost.get(k, ""))[:300] for k in ("node", "endpoint")} if isinstance(lost, dict) else None
        threading.Thread(target=self.stop_worker, args=(worker, lost), daemon=True).start()
        req.send_json(202, {"worker_id": worker.worker_id, "state": WORKER_DRAINING})

    def shutdown_request(self, req):
        req.send_json(202, {"status": "shutting down"})
        threading.Thread(target=self.shutdown, args=("POST /v1/shutdown",), daemon=True).start()

    def spawn(self, req):
        body = req.json
        ref = model_ref_of(body)
        backend, device = backend_and_device(body)
        import backends
        backend = backend or backends.best()
        backends.require(backend, device)   # what is known before the stream: its own status
        self.provisioner.check(ref)
        parallel = parallel_of(body)
        max_queue = number_field(body, "max_queue", DEFAULT_MAX_QUEUE, 0, 1 << 16, integer=True)
        keep_alive = keep_alive_of(body, self.keep_alive)
        limit_mb = number_field(body, "memory_limit_mb", None, 0, 1 << 40, integer=True)
        split = split_of(body)
        context = context_of(body)
        kv_split = bool_field(body, "kv_split", False)
        stream = req.sse()
        with narration_to(stream.narration), self.working():
            worker, timings = self.worker_for(ref, backend, device, parallel, keep_alive, limit_mb, max_queue, split,
                                              context, kv_split)
        stream.finish(EVENT_WORKER, {"worker_id": worker.worker_id, "url": worker.url, "state": worker.state,
                                     "api_key": worker.api_key, "backend": backend, "device": device,
                                     "model_ref": ref.text, "timings": timings,
                                     "slots_total": worker.health.get("slots_total"),
                                     "ctx_size": worker.health.get("ctx_size"),
                                     "cache_type_k": worker.health.get("cache_type_k"),
                                     "cache_type_v": worker.health.get("cache_type_v")})

    # -- the pool -------------------------------------------------------------------------------

    def worker_for(self, ref, backend, device, parallel=DEFAULT_PARALLEL, keep_alive=None, limit_mb=None,
                   max_queue=DEFAULT_MAX_QUEUE, split=None, context=WorkerContext(0, None, None), kv_split=False):
        """An idle worker for (model, backend, device) whose context serves `context`: reused, or
        provisioned and spawned (an idle one of the model with too small a context stops first: it
        is replaced). Its keep-alive becomes this request's (as with Ollama); `limit_mb`: what the
        queen lets it take; `kv_split`: a new one gives each slot its own part of the KV cache."""
        keep_alive = self.keep_alive if keep_alive is None else keep_alive
        key = (ref.text, backend, device)
        with self.spawn_locks.holding(key):   # concurrent spawns of one model make one worker
            # one copy of a model per device: an idle worker first, else a busy one (its 503 is
            # retried by the keeper) rather than a second copy in the same memory
            # (a split's worker serves that split only: its remote devices were lent for it)
            live = [w for w in self.pool.matching(*key, split=split) if self.poll_worker(w) in WORKER_SERVING]
            too_small = [w for w in live if not context_fits(w.health, context)]
            live = [w for w in live if w not in too_small]
            worker = next((w for w in sorted(live, key=lambda w: w.state != WORKER_IDLE)
                           if self.pool.hand_out(w, keep_alive)), None)   # (not the reaper's for a moment)
            if worker:
                narrate(ACTOR_HIVE, "worker_reuse", "Reusing %s worker %s on port %d" % (
                    worker.state, worker.worker_id, worker.port), "♻️", worker_id=worker.worker_id)
                return worker, {"reused": True}
            for small in too_small:
                narrate(ACTOR_HIVE, "worker_context", "Worker %s holds %s tokens of context (KV cache %s/%s); this "
                        "request asks for %s%s: %s" % (
                            small.worker_id, "{:,}".format(small.health["ctx_size"]), small.health.get("cache_type_k"),
                            small.health.get("cache_type_v"), "{:,}".format(context.ctx_size),
                            "" if context.cache_type_k is None else " in %s/%s" % (context.cache_type_k,
                                                                                  context.cache_type_v or "f16"),
                            "replacing it" if small.state == WORKER_IDLE else
                            "starting another beside it (it is busy)"),
                        "📏", worker_id=small.worker_id, ctx_size=small.health["ctx_size"], asked=context.ctx_size)
                if small.state == WORKER_IDLE:
                    self.stop_worker(small)
            import backends
            module = backends.require(backend, device)   # fail before any download
            started = time.monotonic()
            row = self.provisioner.provision(ref)
            download_ms = int((time.monotonic() - started) * 1000)
            self.catalog.touch(row["id"])
            need = memory_need_mb(row["size_bytes"], gguf_shape(row["local_path"]),   # (a default context: fits)
                                  context if context.ctx_size else None, slots=parallel)
            module.preflight(need, device)
            if limit_mb is not None and need > limit_mb:
                error = VramExhausted if module.MEMORY == "vram" else InsufficientRam
                raise error("%s needs %d MB; rbee may use %d MB more on %s" % (ref.text, need, limit_mb, self.node),
                            {"required_mb": need, "available_mb": limit_mb, "node": self.node},
                            "Raise the node's limit (rbee.py nodes set %s --max-ram SIZE), unload a worker, or "
                            "choose a smaller model" % self.node)
            worker = self.launch(ref, row, backend, device, (parallel, max_queue), split, context=context,
                                 limit_mb=limit_mb, kv_split=kv_split)
            self.pool.hand_out(worker, keep_alive)
            return worker, {"reused": False, "download_ms": download_ms, "load_ms": worker.load_ms}

    def launch(self, ref, row, backend, device, slots, split=None, context=None, limit_mb=None, kv_split=False):
        """Start a worker and wait until it is ready."""
        worker = self.start_worker(ref, row, backend, device, slots, split, context, limit_mb, kv_split)
        try:
            self.await_ready(worker)
            return worker
        finally:
            worker.listeners.clear()

    def start_worker(self, ref, row, backend, device, slots, split=None, context=None, limit_mb=None,
                     kv_split=False):
        """Start a worker of `slots` (--parallel, --max-queue) on the first free port from 8001;
        `split`: the remote devices that take part of its layers (split_of); `context`: its
        WorkerContext (default: the model's trained context in f16, as far as `limit_mb` holds it).
        The hive binds the port and hands the listening socket to the worker (--listen-fd): a
        worker that bound it itself, after loading its model, found it taken now and then by
        another program that had seen it free meanwhile (another hive's worker, on this machine)."""
        # (the hive's copy of the socket closes here, once the worker has its own: the port is
        # free again as soon as the worker ends)
        with bound_socket(self.args.host, WORKER_PORT) as listening:
            listening.listen(128)   # requests wait in its backlog until the worker serves
            port = listening.getsockname()[1]
            worker = WorkerProcess("worker-" + random_id(4), ref.text, backend, device, self.args.host, port,
                                   random_id(24), random_id(24))
            worker.health = {"slots_total": slots[0], "slots_available": slots[0]}   # (until it answers /health)
            worker.split = split
            worker.listeners.append(_current_sink())
            env = {k: v for k, v in os.environ.items() if k not in (ENV_HIVE_TOKEN, ENV_API_KEY)}
            env.update({"PYTHONUNBUFFERED": "1", ENV_WORKER_API_KEY: worker.api_key,
                        ENV_READY_TOKEN: worker.ready_token})
            args = ["worker", "--model", row["local_path"], "--backend", backend, "--device", str(device), "--port",
                    str(port), "--host", self.args.host, "--worker-id", worker.worker_id, "--model-ref", ref.text,
                    "--hive-url", self.local_url, "--parallel", str(slots[0]), "--max-queue", str(slots[1]),
                    "--listen-fd", str(listening.fileno()), "--lifeline"]
            if context:   # (split: each slot holds the context asked for, so the worker holds `slots` of them)
                args += ["--ctx-size", str(context.ctx_size * (slots[0] if kv_split else 1)),
                         "--cache-type-k", context.cache_type_k or "f16",
                         "--cache-type-v", context.cache_type_v or "f16"]
            if limit_mb is not None:
                args += ["--memory-limit-mb", str(limit_mb)]
            args += ["--kv-split"] if kv_split else []
            if split:
                args += sum((["--rpc", e] for e in split["rpc"]), []) + ["--offload-layers",
                                                                         str(split["offload_layers"])]
                args += ["--tensor-split", split["tensor_split"]] if split.get("tensor_split") else []
            worker.child = Child(worker.worker_id, role_argv(args), worker.relay,
                                 lambda code: self.worker_exited(worker, code), env=env,
                                 pass_fds=(listening.fileno(),))
            self.pool.add(worker)
        worker.child.listen()
        return worker

    def await_ready(self, worker):
        if not worker.child.wait(LOADING_TIMEOUT, worker.called_back):
            if not worker.child.exited.is_set():
                self.stop_worker(worker)
                raise LoadingTimeout("Worker %s did not load its model within %d s" % (
                    worker.worker_id, LOADING_TIMEOUT), {"worker_id": worker.worker_id},
                    "Check the node's disk and memory; a smaller model loads faster")
            code = worker.child.proc.returncode
            raise WorkerCrashed("Worker %s exited with code %s before it was ready" % (worker.worker_id, code),
                                {"exit_code": code, "last_output": worker.child.last_words()},
                                "See %s for its full output" % rbee_home("logs", worker.worker_id + ".log"))
        # the worker narrated "HTTP ready" and "ready callback" on stdout before it called us; the
        # reader thread may not have relayed them yet, and they belong in this spawn's stream: they
        # have been once it read the ready control line that followed them
        worker.child.ready.wait(1.0)

    def poll_worker(self, worker):
        """The worker's own view of its state (idle/busy), kept by the pool; its state as it was
        when the worker does not answer."""
        try:
            health = worker.client.health()
        except RbeeError:
            return worker.state
        return self.pool.observed(worker, health)

    def worker_exited(self, worker, code):
        self.pool.exited(worker)
        if not self.stopping.claimed:
            narrate(ACTOR_HIVE, "worker_exit", "Worker %s exited (code %s)" % (worker.worker_id, code), "🪦",
                    worker_id=worker.worker_id, level="warn" if code else None)

    def stop_worker(self, worker, lost=None):
        """Graceful within 20 s (inside the queen's 30 s for this hive), then SIGKILL."""
        self.pool.drain(worker)
        worker.child.stop(lambda: worker.client.shutdown(lost=lost), timeout=GRACEFUL_TIMEOUT - 10)

    def idle_reaper(self):
        """Every second: refresh worker states; stop workers idle for longer than their keep-alive
        (never one handed out in the last HANDOUT_GRACE s: its job may not have reached it yet).
        A queen's hive with no worker for its keep-alive ends (its queen starts it again)."""
        while not self.stopped.wait(1.0):
            workers = self.pool.all()
            for worker in workers:
                if not worker.called_back.is_set() or worker.state == WORKER_DRAINING:
                    continue
                if self.poll_worker(worker) != WORKER_IDLE:
                    continue
                key = (worker.model_ref, worker.backend, worker.device)
                # (draining before anyone can hand it out again; a spawn of its model may be about to)
                if not self.spawn_locks.busy(key) and self.pool.drain_if_expired(worker):
                    narrate(ACTOR_HIVE, "worker_idle_stop", "Stopping worker %s, idle for %d s (keep-alive %s)" % (
                        worker.worker_id, time.time() - worker.last_activity, human_duration(worker.keep_alive)),
                        "😴", worker_id=worker.worker_id, model_ref=worker.model_ref)
                    threading.Thread(target=self.stop_worker, args=(worker,), daemon=True).start()
            if workers or self.in_progress.count or self.rpcs:
                self.workerless_since = time.time()
            elif self.args.lifeline and 0 <= self.keep_alive < time.time() - self.workerless_since:
                narrate(ACTOR_HIVE, "hive_idle_stop", "No worker for %s: the pool manager ends" % human_duration(
                    self.keep_alive), "😴", node=self.node)
                self.shutdown("no worker for %s" % human_duration(self.keep_alive))

    # -- life cycle -----------------------------------------------------------------------------

    def start(self):
        self.serve(self.args.host, self.args.port)   # first: --port 0 (a local hive) binds a free port
        narrate(ACTOR_HIVE, "startup", "Starting pool manager on port %d" % self.port, "🌅", node=self.node)
        threading.Thread(target=self.idle_reaper, daemon=True, name="idle-reaper").start()
        narrate(ACTOR_HTTP, "http_ready", "HTTP server ready on port %d" % self.port, "🚀", node=self.node,
                port=self.port, version=__version__)
        self.announce_ready(node=self.node)

    def shutdown(self, reason="shutdown"):
        """Stop every worker in parallel, then exit 0 (the catalog is closed after each use)."""
        if not self.stopping.claim():
            return
        workers = self.pool.all()
        narrate(ACTOR_HIVE, "shutdown", "Shutting down pool manager (%s), stopping %d worker(s)" % (
            reason, len(workers)), "👋", node=self.node)
        with self._progress_lock:
            rpcs = list(self.rpcs.values())
        in_parallel(self.stop_worker, workers)
        in_parallel(self.stop_rpc, rpcs)
        self.stop_serving()
        narrate(ACTOR_HIVE, "exit", "Pool manager stopped", "💤", node=self.node)
        self.stopped.set()


def run_hive(args):
    token = None
    if args.lifeline:   # the queen's handshake: one JSON line (bearer token, secrets), then the lifeline
        line = b""   # byte by byte: nothing after the line may sit in a buffer the lifeline never sees
        while not line.endswith(b"\n") and len(line) < MAX_BODY:
            byte = os.read(0, 1)
            if not byte:
                break
            line += byte
        if not line:
            sys.exit(0)
        try:
            hello = json.loads(line)
        except ValueError:
            raise InvalidRequest("The first line on a --lifeline hive's stdin must be JSON")
        token, keep_alive = hello.get(HELLO_TOKEN), duration_s(hello.get(HELLO_KEEP_ALIVE))
        os.environ.update({k: str(v) for k, v in (hello.get(HELLO_ENV) or {}).items()})
    else:   # standalone: its own token, required wherever the network reaches it
        token, keep_alive = role_secret(ACTOR_HIVE, args.token_file, ENV_HIVE_TOKEN, "hive-token", args.host), None
    run_role(Hive(args, token, keep_alive), args.lifeline)


# ============================================================================================
# Queen (rbee.py queen): the orchestrator -- node registry, a hive per node, tasks relayed
# ============================================================================================

ALIAS_EXAMPLE = "Name a model as people type it: rbee.py models alias qwen2.5-coder:1.5b hf:ORG/REPO:Q4_K_M"


class NodeRegistry:
    """$RBEE_HOME/beehives.db on the queen's machine. The CLI writes it; the queen reads it."""

    COLUMNS = ("node_name", "ssh_host", "ssh_port", "ssh_user", "ssh_key_path", "rbee_dir", "python", "env",
               "backends", "devices", "last_connected_unix", "status", "last_error", "transport",
               "down_since_unix", "retry_unix", "failures")
    JSON_COLUMNS = ("env", "backends", "devices")
    #: columns later versions added, each with its type (an older beehives.db gets them)
    ADDED_COLUMNS = (("transport", "TEXT NOT NULL DEFAULT 'lan'"), ("down_since_unix", "REAL"), ("retry_unix", "REAL"),
                     ("failures", "INTEGER NOT NULL DEFAULT 0"))

    def __init__(self, path=None):
        self.path = path or rbee_home("beehives.db")   #: the SQLite file (each call opens its own connection)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with self._db() as db:
            db.execute("""CREATE TABLE IF NOT EXISTS beehives (
                node_name TEXT PRIMARY KEY, ssh_host TEXT NOT NULL, ssh_port INTEGER NOT NULL DEFAULT 22,
                ssh_user TEXT, ssh_key_path TEXT, rbee_dir TEXT NOT NULL, python TEXT NOT NULL, env TEXT,
                backends TEXT, devices TEXT, last_connected_unix INTEGER,
                status TEXT NOT NULL DEFAULT 'unknown', last_error TEXT)""")
            present = [row[1] for row in db.execute("PRAGMA table_info(beehives)")]
            for column, kind in self.ADDED_COLUMNS:
                if column not in present:
                    db.execute("ALTER TABLE beehives ADD COLUMN %s %s" % (column, kind))
            # what rbee may use of a node's memory (nodes add/set --max-ram/--max-vram), localhost's too
            db.execute("""CREATE TABLE IF NOT EXISTS limits (
                node_name TEXT PRIMARY KEY, max_ram_mb INTEGER, max_vram_mb INTEGER)""")
            # names people type for a model (`models alias NAME REF`): qwen2.5-coder:1.5b, a client's fixed name
            db.execute("CREATE TABLE IF NOT EXISTS aliases (name TEXT PRIMARY KEY, model_ref TEXT NOT NULL)")
            # what each node's catalog held when the queen last asked its hive: listings answer from it
            db.execute("CREATE TABLE IF NOT EXISTS catalogs (node_name TEXT PRIMARY KEY, models TEXT NOT NULL, "
                       "seen_unix REAL NOT NULL)")

    _db = ModelCatalog._db

    def _decode(self, row):
        node = dict(zip(self.COLUMNS, row))
        for column in self.JSON_COLUMNS:
            node[column] = json.loads(node[column]) if node[column] else None
        return node

    def get(self, name):
        with self._db() as db:
            row = db.execute("SELECT %s FROM beehives WHERE node_name = ?" % ", ".join(self.COLUMNS),
                             (name,)).fetchone()
        return self._decode(row) if row else None

    def list(self):
        with self._db() as db:
            rows = db.execute("SELECT %s FROM beehives ORDER BY node_name" % ", ".join(self.COLUMNS)).fetchall()
        return [self._decode(r) for r in rows]

    def save(self, node):
        node = dict({"transport": TRANSPORT_LAN, "failures": 0}, **{k: v for k, v in node.items() if v is not None})
        values = [json.dumps(node.get(c)) if c in self.JSON_COLUMNS and node.get(c) is not None else node.get(c)
                  for c in self.COLUMNS]
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO beehives (%s) VALUES (%s)" % (
                ", ".join(self.COLUMNS), ", ".join("?" * len(self.COLUMNS))), values)

    def update(self, name, **fields):
        if not self.get(name):
            return
        sets = ", ".join("%s = ?" % k for k in fields)
        values = [json.dumps(v) if k in self.JSON_COLUMNS and v is not None else v for k, v in fields.items()]
        with self._db() as db:
            db.execute("UPDATE beehives SET %s WHERE node_name = ?" % sets, values + [name])

    def remove(self, name):
        with self._db() as db:
            db.execute("DELETE FROM limits WHERE node_name = ?", (name,))
            db.execute("DELETE FROM catalogs WHERE node_name = ?", (name,))
            return db.execute("DELETE FROM beehives WHERE node_name = ?", (name,)).rowcount

    def mark_down(self, name, reason, retry_s=None):
        """Node `name` did not answer ssh: down for `reason`, tried again NODE_RETRY_S later (longer
        for each failure in a row; `retry_s`: then); its row afterwards (None: not registered)."""
        node = self.get(name)
        if not node:
            return None
        failures = (node["failures"] or 0) + 1
        wait = NODE_RETRY_S[min(failures, len(NODE_RETRY_S)) - 1] if retry_s is None else retry_s
        self.update(name, status=NODE_UNREACHABLE, last_error=reason, failures=failures,
                    down_since_unix=node["down_since_unix"] or time.time(), retry_unix=time.time() + wait)
        return self.get(name)

    def mark_up(self, name, **fields):
        """Node `name` answered ssh: reachable, no failure counted (and the other `fields` written,
        a `last_error` too: what the probe found missing there)."""
        self.update(name, **dict({"status": NODE_REACHABLE, "last_connected_unix": int(time.time()), "last_error": None,
                                  "failures": 0, "down_since_unix": None, "retry_unix": None}, **fields))

    @staticmethod
    def is_down(node):
        """Whether a node's row says it is down: it did not answer ssh, and no check since said otherwise."""
        return node.get("status") == NODE_UNREACHABLE and node.get("retry_unix") is not None

    def remember_catalog(self, name, models):
        """Keep node `name`'s catalog as its hive just listed it (`models`: its rows)."""
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO catalogs (node_name, models, seen_unix) VALUES (?, ?, ?)",
                       (name, json.dumps(models), time.time()))

    def catalogs(self):
        """{node: (its catalog's rows as last seen, when: unix time)}."""
        with self._db() as db:
            rows = db.execute("SELECT node_name, models, seen_unix FROM catalogs").fetchall()
        return {name: (json.loads(models), seen) for name, models, seen in rows}

    def limits(self, name):
        """{"max_ram_mb", "max_vram_mb"} of a node (None: no cap)."""
        with self._db() as db:
            row = db.execute("SELECT max_ram_mb, max_vram_mb FROM limits WHERE node_name = ?", (name,)).fetchone()
        return {"max_ram_mb": row[0] if row else None, "max_vram_mb": row[1] if row else None}

    def set_limits(self, name, **caps):
        """Change the caps given (a value of 0 removes that cap); the others stay."""
        merged = dict(self.limits(name), **{k: v or None for k, v in caps.items() if v is not None})
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO limits (node_name, max_ram_mb, max_vram_mb) VALUES (?, ?, ?)",
                       (name, merged["max_ram_mb"], merged["max_vram_mb"]))
        return merged

    def aliases(self):
        """{alias: model reference}."""
        with self._db() as db:
            return dict(db.execute("SELECT name, model_ref FROM aliases ORDER BY name").fetchall())

    def set_alias(self, name, ref):
        """`name` stands for the reference `ref` from now on (an alias of that name is replaced)."""
        if not isinstance(name, str) or not 0 < len(name) <= 200 or any(c.isspace() for c in name):
            raise invalid("alias", "must be a name of 1 to 200 characters without spaces", ALIAS_EXAMPLE)
        with contextlib.suppress(InvalidModelRef):
            ModelRef.parse(name)
            raise invalid("alias", "%r is a model reference itself, not a name for one" % name, ALIAS_EXAMPLE)
        ref = ModelRef.parse(ref)
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO aliases (name, model_ref) VALUES (?, ?)", (name, ref.text))
        return ref

    def remove_alias(self, name):
        with self._db() as db:
            return db.execute("DELETE FROM aliases WHERE name = ?", (name,)).rowcount

    def model_ref(self, text):
        """The reference `text` is, or the one it is an alias of; else INVALID_MODEL_REF as ModelRef.parse says."""
        try:
            return ModelRef.parse(text)
        except InvalidModelRef:
            target = self.aliases().get(text) if isinstance(text, str) else None
            if target is None:
                raise
            return ModelRef.parse(target)

    def resolve(self, name):
        """The node called `name`; `localhost` needs no registration (a local child, no ssh)."""
        node = self.get(name)
        if node:
            return node
        if name == LOCAL_NODE:
            return {"node_name": LOCAL_NODE, "ssh_host": "127.0.0.1", "local": True}
        known = [n["node_name"] for n in self.list()]
        raise NodeNotFound("Node %r is not registered" % name, {"node": name, "known_nodes": known},
                           "Register it: rbee.py nodes add %s --ssh-host HOST [--ssh-user USER --ssh-key KEY]" % name,
                           component=ACTOR_QUEEN)


class HiveSession:
    """One hive the queen started: a local child for `localhost`, else an ssh session whose
    stdin stays open as the hive's lifeline and whose stdout carries its narration."""

    def __init__(self, node, token, on_exit, keep_alive=DEFAULT_KEEP_ALIVE):
        self.node = node                  #: its row in the node registry
        self.keep_alive = keep_alive      #: its workers' default keep-alive, and how long it lives without one
        self.name = node["node_name"]         #: the node's name
        self.token = token                #: the queen's bearer token, given to the hive in the handshake
        self.local = bool(node.get("local"))   #: node localhost: a local child, no ssh
        #: ssh transport: the hive and its workers listen on the node's loopback, reached by forwards
        self.tunnelled = not self.local and node.get("transport") == TRANSPORT_SSH
        #: where the hive and its workers answer: ssh's own resolution of the node's host, no DNS of
        #: ours (ssh transport: this machine's loopback, where the forwards listen)
        self.host = "127.0.0.1" if self.local or self.tunnelled else SshTarget.for_node(node).address()
        self.forwards = {}                #: the node's port -> this machine's forwarded port (ssh transport)
        self.forwards_lock = threading.Lock()   #: guards `forwards`; one forward set up at a time
        self.client = None                #: a HiveClient once the hive said where it serves (the starting thread)
        self.hive_version = None          #: the version it reported: its ready line, or an older hive's narration
        self.listeners = []               #: narration sinks of the tasks waiting on this node
        self.listeners_lock = threading.Lock()   #: guards `listeners`
        self.child = None                 #: the ssh client or the local child: a Child (the starting thread)
        #: it answered: ready, or it showed another version of rbee.py, one that may write no
        #: ready line at all (0.1.0 did not); the start waits for this (output thread)
        self.answered = threading.Event()
        self.on_exit = on_exit            #: the queen's callback when it ends (output thread)
        #: ssh connect and start-up times of the last start, reported with the next task
        #: (written by the output thread and the starting thread; the task takes them once)
        self.timings = {}
        self.heard = False                #: the hive said something in this attempt: ssh got through
        self.attempt_started = 0.0        #: when this start attempt began (the starting thread)

    @property
    def url(self):
        return self.client.url if self.client else "http://%s:%d" % (self.host, HIVE_PORT)

    def _heard(self):
        if not self.heard:   # its first word: ssh is through and the remote Python runs
            self.heard = True
            self.timings.setdefault("ssh_connect_ms", int((time.monotonic() - self.attempt_started) * 1000))

    def relay(self, event):
        """Hive narration goes to the tasks that wait on this node, else to the queen's stdout."""
        self._heard()
        if event.pop("relayed", False):   # the hive's echo of what it already streamed to a task
            return
        if event.get("version") not in (None, __version__) and not self.ready.is_set():
            self.hive_version = event["version"]   # another rbee.py: the start ends in VERSION_MISMATCH
            self.answered.set()
        event.setdefault("node", self.name)
        observed(event)
        with self.listeners_lock:
            listeners = list(self.listeners) or [emit_line]
        for listener in listeners:
            with contextlib.suppress(ClientGone):
                listener(event)

    @property
    def ready(self):
        """Its ready control line came (an Event: the child's of the last start attempt)."""
        return self.child.ready

    @property
    def exited(self):
        """Its process ended (an Event: the child's of the last start attempt)."""
        return self.child.exited

    def _ready_line(self, line):
        self._heard()
        self.hive_version = line.get("version")
        self.answered.set()

    def reach(self, port):
        """The URL at which this machine reaches the node's `port`: the node's address, or, with
        the ssh transport, a local port forwarded through the node's ssh connection."""
        if not self.tunnelled:
            return "http://%s:%d" % (self.host, port)
        with self.forwards_lock:
            if port not in self.forwards:
                local = free_port("127.0.0.1", 0)
                self.forward("forward", "-L", "127.0.0.1:%d:127.0.0.1:%d" % (local, port))
                self.forwards[port] = local
            return "http://127.0.0.1:%d" % self.forwards[port]

    def forward(self, operation, kind, spec):
        """`ssh -O forward|cancel -L|-R spec` on the node's ssh connection (that of its hive's
        session): what ssh printed (a remote forward to port 0: the port the node allocated)."""
        try:
            out = subprocess.run(SshTarget.for_node(self.node).control(operation, kind, spec),
                                 capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            out = None
        if out is None or out.returncode:
            raise SshFailed("Cannot %s %s %s through the ssh connection of %s: %s" % (
                operation, kind, spec, self.name, out.stderr.strip() if out else "ssh -O took over 10 s"),
                {"node": self.name, "forward": "%s %s" % (kind, spec)},
                "Check the node: rbee.py nodes check %s" % self.name, ACTOR_QUEEN)
        return out.stdout.strip()

    def tagged(self, sink):
        """`sink` for narration relayed from this hive's streams, each event marked with the node."""
        def tag(event):
            event.setdefault("node", self.name)
            sink(observed(event))
        return tag

    @contextlib.contextmanager
    def listening(self, sink):
        with self.listeners_lock:
            self.listeners.append(sink)
        try:
            yield
        finally:
            with self.listeners_lock:
                self.listeners.remove(sink)

    def argv(self):
        args = ["hive", "--lifeline", "--node-name", self.name]
        if self.local:   # any free port on loopback: several queens (users, tests) share a machine
            return role_argv(args + ["--host", "127.0.0.1", "--port", "0"])
        if self.tunnelled:   # the node's loopback only: nothing of rbee faces its network
            args += ["--host", "127.0.0.1", "--port", "0"]
        else:
            args += ["--port", str(HIVE_PORT)]
        plain = {k: v for k, v in (self.node.get("env") or {}).items() if not is_secret(k)}   # secrets: hello
        return SshTarget.for_node(self.node).argv(remote_command(
            self.node.get("rbee_dir"), self.node.get("python"), args, plain))

    def start(self, attempts=SSH_ATTEMPTS):
        """Start the hive and wait until it serves (ssh tried `attempts` times, PROTOCOL.md §9)."""
        try:
            self._start(attempts)
        except HiveFailed:
            # A hive of this queen whose ssh session was lost (a network partition: ssh's
            # ServerAlive gave up, but the node never saw the connection close) may still run
            # there and hold the port. It takes our token: stop it, then start a fresh one.
            if self.local or self.tunnelled or not self._stop_leftover():   # (a tunnelled hive holds no fixed port)
                raise
            self._start(attempts)

    def _stop_leftover(self):
        """Stop a hive of this node that answers on its port and accepts this queen's token."""
        leftover = HiveClient("http://%s:%d" % (self.host, HIVE_PORT), self.token, self.name)
        try:
            if leftover.health().get("node") != self.name:
                return False   # another node's hive on the same machine: not ours to stop
            leftover.shutdown()
        except RbeeError:
            return False   # nothing there, or another queen's hive: the first error stands
        narrate(ACTOR_QUEEN, "hive_leftover", "Stopping a leftover rbee-hive of this queen on %s (its ssh session "
                "was lost)" % self.name, "🧹", node=self.name)
        deadline = time.monotonic() + GRACEFUL_TIMEOUT + 5
        while time.monotonic() < deadline:
            try:
                leftover.health(timeout=1.0)
            except RbeeError:
                return True
            time.sleep(0.1)
        return False

    def _start(self, attempts):
        how = "as a local process" if self.local else "over ssh (%s)" % SshTarget.for_node(self.node)
        narrate(ACTOR_QUEEN, "hive_start", "Starting rbee-hive on %s %s" % (self.name, how), "🐝", node=self.name)
        started = time.monotonic()
        if self.local:
            self._attempt()
        else:
            with_ssh_retries(SshTarget.for_node(self.node), self.name, self._attempt, attempts=attempts)
        self.timings["hive_start_ms"] = int((time.monotonic() - started) * 1000)
        if self.hive_version != __version__:
            version = self.hive_version
            self.stop()
            raise VersionMismatch("rbee.py on %s is version %s, the queen is %s" % (
                self.name, version, __version__), {"node": self.name, "hive_version": version,
                                                   "queen_version": __version__},
                "Copy this rbee.py to the node: rbee.py nodes install %s" % self.name, component=ACTOR_QUEEN)

    def _attempt(self):
        """One start: (True, None) once the hive serves, (None, ssh's words) when ssh failed."""
        self.answered.clear()
        self.client = None
        with self.forwards_lock:
            self.forwards.clear()   # (they lived on the connection of the last attempt)
        self.heard, self.attempt_started = False, time.monotonic()
        self.timings.pop("ssh_connect_ms", None)
        hello = {HELLO_TOKEN: self.token, HELLO_ENV: self.secrets(), HELLO_KEEP_ALIVE: self.keep_alive}
        self.child = Child("hive-" + self.name, self.argv(), self.relay, lambda code: self.on_exit(self, code),
                           cwd=HERE, hello=hello, on_ready=self._ready_line)
        if self.child.listen().wait(60, self.answered):
            if self.ready.is_set():
                self.client = HiveClient(self.reach(self.child.ready_line["port"]), self.token, self.name)
            return True, None
        self.child.kill()
        said = self.child.last_words()
        # ssh exits 255 for its own failures, but also when the remote process died of a
        # signal: a hive that narrated was reached, so that is no ssh failure to retry
        if self.local or self.child.proc.returncode != 255 or self.heard:
            raise HiveFailed("rbee-hive failed to start on %s (exit %s)" % (self.name, self.child.proc.returncode),
                             {"node": self.name, "last_output": said},
                             "Check the node: rbee.py nodes check %s%s" % (self.name, "" if self.local else (
                                 " (is rbee.py installed there, is port %d free?)" % HIVE_PORT)),
                             component=ACTOR_HIVE)
        return None, "\n".join(said)

    def secrets(self):
        """What the hive gets in its handshake, never on argv: the queen's HF_TOKEN and the
        node's own variables that hold a secret (nodes add --env HF_TOKEN=...)."""
        env = {k: os.environ[k] for k in HELLO_ENV_KEYS if os.environ.get(k)}
        env.update((k, v) for k, v in (self.node.get("env") or {}).items() if is_secret(k))
        return env

    def worker_url(self, url):
        """The worker's URL as the keeper can reach it: the hive's host (or a forward), its port."""
        return self.reach(urllib.parse.urlsplit(url).port)

    def stop(self):
        """Graceful: POST /v1/shutdown, then close the lifeline; SIGKILL after 30 s."""
        if self.child is None:
            return
        self.child.stop(self.client.shutdown if self.client else None)
        self.exited.wait(5)


class Hives:
    """The queen's hive sessions, one per node: started on demand (one start of a node's hive at
    a time), listed, asked for what runs where, and stopped together when the queen stops. A node
    that does not answer ssh is down (its row in the registry says why and when it is tried again,
    in the background): no request waits on it until then, and a listing never starts a hive."""

    def __init__(self, nodes, token, keep_alive):
        self.nodes = nodes                #: the node registry (beehives.db; the CLI writes it)
        self.token = token                #: the bearer token of every hive the queen starts
        self.keep_alive = keep_alive      #: each hive's workers' default keep-alive, and its own with no worker
        self.lock = threading.Lock()      #: guards `sessions` and `answers`
        self.sessions = {}                #: node name -> its running HiveSession (under `lock`)
        #: node name -> (its hive's last /v1/resources answer, when: unix time) (under `lock`)
        self.answers = {}
        self.start_locks = KeyedLocks()   #: one start of a node's hive at a time (held across the start)
        self.closing = Once()             #: claimed when the queen stops: hives that end then are no news
        #: called with (node, reason) when a node's hive goes away unasked (the scheduler's node_lost)
        self.on_lost = []
        self.retrying = Once()            #: claimed when the thread that tries down nodes again starts

    def get(self, name, sink=None, attempts=SSH_ATTEMPTS):
        """The running hive of node `name`, started (narrated to `sink`, ssh tried `attempts` times)
        if there is none; a node whose ssh fails is marked down."""
        node = self.nodes.resolve(name)
        with self.start_locks.holding(name):
            with self.lock:
                session = self.sessions.get(name)
            if session and not session.exited.is_set():
                return session
            session = HiveSession(node, self.token, self._exited, self.keep_alive)
            with narration_to(sink or _current_sink()), session.listening(sink or emit_line):
                try:
                    session.start(attempts)
                except RbeeError as err:
                    if isinstance(err, SshFailed):
                        self.mark_down(name, err.message)
                    else:
                        self.nodes.update(name, status=NODE_REACHABLE, last_error=err.message)
                    raise
            self.nodes.mark_up(name)
            with self.lock:
                self.sessions[name] = session
            return session

    def others(self, failed):
        """The nodes a request that `failed` (node names) failed may go to now: the candidates but
        those, and none that is down (a node named by nobody gets one ssh attempt, never three)."""
        rows = {n["node_name"]: n for n in self.nodes.list()}
        return [n for n in self.candidates(rows.values()) if n not in failed and not self._is_down(rows.get(n))]

    def _is_down(self, node):
        """Whether a node (its registry row; None: localhost) is down for this queen: its row says
        so, and no hive of it runs here (one that runs answers now, whatever the row says)."""
        return bool(node) and self.nodes.is_down(node) and not self.running_on(node["node_name"])

    def down(self, name):
        """NODE_DOWN when node `name` is down and not due for another try; else None. A due node is
        tried in the background, never by the request that asks."""
        node = self.nodes.get(name)
        if not self._is_down(node):
            return None
        self._retry_in_background()   # (marked down by `nodes check`, or by a queen before this one)
        since, retry = time.time() - node["down_since_unix"], max(0.0, node["retry_unix"] - time.time())
        return NodeDown("%s is down (%s ago): %s" % (name, human_duration(since), node["last_error"]),
                        {"node": name, "down_s": int(since), "retry_in_s": int(retry), "reason": node["last_error"]},
                        "rbee tries it again in %s; check it now: rbee.py nodes check %s" % (
                            human_duration(retry), name), ACTOR_QUEEN)

    def mark_down(self, name, reason, retry_s=None):
        """Node `name` is down for `reason` (its row says until when); the background tries begin."""
        node = self.nodes.mark_down(name, reason, retry_s)
        if node:
            wait = node["retry_unix"] - time.time()
            narrate(ACTOR_QUEEN, "node_down", "%s is down: %s; trying it again %s" % (
                name, reason, "in " + human_duration(wait) if wait >= 1 else "now"), "🔌", node=name, level="warn")
        self._retry_in_background()

    def _retry_in_background(self):
        """Start the thread that tries the down nodes again (once: it runs until the queen stops)."""
        if self.retrying.claim():
            threading.Thread(target=self._retry_down_nodes, daemon=True, name="node-retry").start()

    def _retry_down_nodes(self):
        """Each down node, once its time comes: one ssh round trip (no hive started); an answer marks it up."""
        def retry(node):
            try:
                ssh_run(SshTarget.for_node(node), "true", timeout=30, node=node["node_name"], attempts=1)
            except Exception as exc:   # (an ssh binary gone is no reason to try every second)
                self.mark_down(node["node_name"], RbeeError.wrap(exc, ACTOR_QUEEN).message)
                return
            self.nodes.mark_up(node["node_name"])
            narrate(ACTOR_QUEEN, "node_up", "%s answers ssh again" % node["node_name"], "🔌", node=node["node_name"])
        while not self.closing.claimed:
            try:
                due = [n for n in self.nodes.list() if self.nodes.is_down(n) and n["retry_unix"] <= time.time()]
            except Exception:   # (the registry busy a moment: the CLI writes it too)
                due = []
            in_parallel(retry, due)
            time.sleep(1.0)

    def _exited(self, session, code):
        with self.lock:
            if self.sessions.get(session.name) is session:
                del self.sessions[session.name]
        if not session.ready.is_set() or self.closing.claimed:
            return
        narrate(ACTOR_QUEEN, "hive_exit", "rbee-hive on %s exited (code %s)" % (session.name, code), "🪦",
                node=session.name)
        if code == 0:   # (its own end: no worker left for its keep-alive)
            return
        # ssh's own exit (255): the connection was lost (ServerAlive gave up), or the hive died of a
        # signal; tried again at once, in the background: a node that answers is up again in a second
        reason = "its ssh connection was lost" if code == 255 and not session.local else "its hive exited (code %s)" % (
            code)
        if code == 255 and not session.local:
            self.mark_down(session.name, reason, retry_s=0)
        for callback in list(self.on_lost):
            callback(session.name, reason)

    def remember(self, name, answer):
        """A hive's /v1/resources answer, for the listings (its catalog kept on disk when it changed)."""
        with self.lock:
            before = self.answers.get(name)
            self.answers[name] = (answer, time.time())
        if before is None or before[0].get("models") != answer.get("models"):
            self.nodes.remember_catalog(name, answer.get("models") or [])

    def known(self):
        """{node: {models, workers, age_s, state}} from what the queen knows, asking nothing but the
        running hives (LISTING_TIMEOUT each, together): a node's catalog as its hive last listed it
        (localhost's read from its own file when its hive is not running), `state` up, down or idle
        (no hive runs there now). Nothing is started and no ssh is waited on."""
        def ask(session):
            with contextlib.suppress(RbeeError, OSError):
                self.remember(session.name, session.client.resources(timeout=LISTING_TIMEOUT))
        running = self.running()
        in_parallel(ask, running)
        with self.lock:
            answers = dict(self.answers)
        running = {s.name for s in running}
        rows = {n["node_name"]: n for n in self.nodes.list()}   # (one read of the registry)
        saved, now, known = self.nodes.catalogs(), time.time(), {}
        for name in self.candidates(rows.values()):
            answer, seen = answers.get(name) or ({"models": saved[name][0]} if name in saved else None,
                                                 saved[name][1] if name in saved else None)
            if name == LOCAL_NODE and name not in running:   # (the queen's own machine: its catalog is a file here)
                answer, seen = {"models": ModelCatalog().list()}, now
            down = self._is_down(rows.get(name))
            known[name] = {"models": (answer or {}).get("models") or [],
                           "workers": (answer or {}).get("workers") or [] if name in running else [],
                           "age_s": round(now - seen, 1) if seen else None,
                           "state": "down" if down else "up" if name in running else "idle"}
            if down:
                known[name]["reason"] = rows[name]["last_error"]
        return known

    def running(self):
        with self.lock:
            return [s for s in self.sessions.values() if s.ready.is_set() and not s.exited.is_set()]

    def running_on(self, name):
        """The running hive of node `name`, or None (nothing is started)."""
        return next((s for s in self.running() if s.name == name), None)

    def candidates(self, rows=None):
        """The nodes a task without one may go to: localhost and every registered node (`rows`: the
        registry's, when the caller has read them)."""
        rows = self.nodes.list() if rows is None else rows
        return [LOCAL_NODE] + [n["node_name"] for n in rows if n["node_name"] != LOCAL_NODE]

    @staticmethod
    def workers_of(session):
        """A hive's workers, each with its node and the URL at which this machine reaches it."""
        workers = session.client.workers()
        for w in workers:
            w.update(node=session.name, url=session.worker_url(w["url"]))
        return workers

    def cluster(self):
        """(each running hive's memory, devices, workers and models; every worker in one list).
        Nothing is started to answer."""
        hives, workers = [], []

        def ask(session):
            entry = {"node": session.name, "url": session.url, "limits": self.nodes.limits(session.name)}
            try:   # (a hive on a node cut off but not yet seen to go holds nobody up long)
                found = session.client.resources(timeout=STATUS_TIMEOUT)
                for w in found["workers"]:
                    w.update(node=session.name, url=session.worker_url(w["url"]) if w.get("url") else None)
                entry.update((k, found[k]) for k in ("ram_total_mb", "ram_free_mb", "devices", "workers", "models",
                                                     "keep_alive_s"))
            except RbeeError as err:
                entry["error"] = err.envelope()["error"]
            hives.append(entry)
        in_parallel(ask, self.running())
        hives.sort(key=lambda h: h["node"])
        for entry in hives:
            workers += entry.get("workers", [])
        return hives, workers

    def count(self):
        with self.lock:
            return len(self.sessions)

    def stop_all(self):
        """The queen's cascade: every hive stops in parallel (each stops its workers)."""
        self.closing.claim()
        with self.lock:
            sessions = list(self.sessions.values())
        in_parallel(HiveSession.stop, sessions)


# ============================================================================================
# Scheduler (PROTOCOL.md §12, §14): where a task runs -- placement, replicas, eviction, splits
# ============================================================================================

Placement = collections.namedtuple("Placement", "action node backend device evict free_mb reason worker_id")


Placement.__doc__ = """What the scheduler decided: `reuse` a worker of the model (the hive hands it out),
`spawn` one (after stopping the idle workers in `evict`), or `wait` for busy workers to end."""


def _pool(memory, backend, device):
    """The memory a worker of `backend` takes: the node's RAM, or one device's VRAM."""
    return ("vram", device) if memory.get(backend) == "vram" else ("ram",)


def node_view(resources, limits, pending=(), loads=None, leaving=()):
    """A node as placement sees it, from its hive's /v1/resources, its caps (nodes set) and the
    queen's own spawns in progress (`pending`: dicts of node, model_ref, backend, device, need_mb,
    parallel; each reserves what its worker, a fresh one of its model there once listed, has not
    taken yet): every device with the memory rbee may still take there, and every worker with its
    load. `loads(key)` adds the requests the queen handed out that a worker's health may not show
    yet; the workers in `leaving` (being evicted) are as good as gone."""
    memory = resources.get("memory") or {}
    workers = []
    for w in resources.get("workers") or []:
        if w.get("state") in (WORKER_DRAINING, WORKER_EXITED) or w.get("worker_id") in leaving:
            continue
        slots = w.get("slots_total") or 0
        load = (slots - (w.get("slots_available") or 0) if slots else 0) + (w.get("queue_length") or 0)
        workers.append(dict(w, pool=_pool(memory, w["backend"], w["device"]), load=load))
    seen = {(w["model_ref"], w["backend"], w["device"]) for w in workers}
    for p in pending:   # a spawn the hive has not registered yet (it may still download)
        if (p["model_ref"], p["backend"], p["device"]) not in seen:
            workers.append({"worker_id": None, "model_ref": p["model_ref"], "backend": p["backend"],
                            "device": p["device"], "state": WORKER_LOADING, "memory_mb": 0,
                            "slots_total": p["parallel"],
                            "load": 0, "last_activity_unix": 0, "pool": _pool(memory, p["backend"], p["device"])})
    for w in workers:
        if loads:
            w["load"] = max(w["load"], loads((resources["node"], w["model_ref"], w["backend"], w["device"])))
    reserved = collections.Counter()
    for p in pending:   # less what its worker, listed already, has taken: that is gone from ram_free_mb and in `used`
        taken = sum(w.get("memory_mb") or 0 for w in workers if w.get("worker_id") and w.get("state") in (
            WORKER_LOADING, WORKER_IDLE) and not w.get("jobs_total") and (w["model_ref"], w["backend"], w["device"])
            == (p["model_ref"], p["backend"], p["device"]))
        reserved[_pool(memory, p["backend"], p["device"])] += max(0, p["need_mb"] - taken)
    used = collections.Counter()
    for w in workers:
        used[w["pool"]] += w.get("memory_mb") or 0
    devices = []
    for backend, found in (resources.get("devices") or {}).items():
        for d in found:
            pool = _pool(memory, backend, d["index"])
            free = (resources["ram_free_mb"] if pool == ("ram",) else d.get("memory_free_mb") or 0) - reserved[pool]
            cap = limits.get("max_ram_mb" if pool == ("ram",) else "max_vram_mb")
            if cap:
                free = min(free, cap - used[pool] - reserved[pool])
            # room_mb may be below 0 (a cap lowered under what runs): stopping workers counts from there
            devices.append({"backend": backend, "device": d["index"], "pool": pool, "free_mb": max(0, int(free)),
                            "room_mb": int(free), "reserved_mb": reserved[pool]})
    model = resources.get("model") or {}
    return {"node": resources["node"], "devices": devices, "workers": workers,
            "cataloged": bool(model.get("cataloged"))}


def split_nodes(views, need_mb):
    """The fewest nodes (two at least) whose room together holds `need_mb`, most room first; None."""
    rooms = sorted(((max(d["free_mb"] for d in v["devices"]), v["node"]) for v in views if v["devices"]),
                   reverse=True)
    total, chosen = 0, []
    for room, node in rooms:
        if room <= 0:
            break
        chosen.append(node)
        total += room
        if total >= need_mb and len(chosen) >= 2:
            return chosen
    return None


def _best_device(need_mb, views, wanted, taken, evict):
    """The best device with room for `need_mb`: without `evict`, by cataloged model, GPU before
    CPU, most free memory; with it, the fewest MB of idle workers to stop (least recently used)."""
    options = []
    for v in views:
        for d in v["devices"]:
            if not wanted(d["backend"], d["device"]) or (v["node"], d["backend"], d["device"]) in taken:
                continue
            free, stop = d["room_mb"], []
            if evict:
                idle = sorted((w for w in v["workers"] if w["pool"] == d["pool"] and w["state"] == WORKER_IDLE
                               and not w["load"] and w["worker_id"]), key=lambda w: w.get("last_activity_unix") or 0)
                for w in idle:
                    if free >= max(need_mb, 1):
                        break
                    stop.append(w)
                    free += w.get("memory_mb") or 0
            if free < max(need_mb, 1) or (evict and not stop):
                continue
            gpu = d["pool"][0] == "vram"
            key = (sum(w.get("memory_mb") or 0 for w in stop), not v["cataloged"], not gpu, -free)
            why = ("model cached, " if v["cataloged"] else "") + "%s free" % human_bytes(free << 20)
            if stop:
                why += " once %d idle worker(s) unload" % len(stop)
            options.append((key, Placement("spawn", v["node"], d["backend"], d["device"],
                                           tuple((v["node"], w["worker_id"], w["model_ref"]) for w in stop), free,
                                           "%s %s:%s: %s" % (v["node"], d["backend"], d["device"], why), None)))
    return min(options, key=lambda o: o[0])[1] if options else None


def plan_placement(model_ref, need_mb, views, backend=None, device=None, max_replicas=DEFAULT_MAX_REPLICAS,
                   context=None):
    """Where a task for `model_ref` (needing `need_mb`, 0 if unknown) runs, in the order of
    PROTOCOL.md §12: a worker of the model with a free slot (else the least loaded, unless a
    replica fits elsewhere); a node that has the model cataloged and room; the device with the
    most free memory where it fits, GPUs before the CPU; the same after stopping idle workers,
    least recently used first; else wait for busy ones, or INSUFFICIENT_RAM / VRAM_EXHAUSTED. A
    worker whose context is smaller than `context` asks (WorkerContext) is no worker of the model here."""
    wanted = lambda b, d: backend in (None, b) and device in (None, d)
    if not any(wanted(d["backend"], d["device"]) for v in views for d in v["devices"]):
        nodes = ", ".join(v["node"] for v in views)
        if not any(backend in (None, d["backend"]) for v in views for d in v["devices"]):
            raise BackendUnavailable("Backend %s is not available on %s" % (backend, nodes), {"backend": backend},
                                     "Leave --backend out, or add a node that has it", component=ACTOR_QUEEN)
        raise DeviceNotFound("Device %s of %s is not on %s" % (device, backend or "any backend", nodes),
                             {"device": device}, "Leave --device out: the queen picks one", component=ACTOR_QUEEN)
    mine = [(v, w) for v in views for w in v["workers"] if w["model_ref"] == model_ref and wanted(w["backend"],
                                                                                                   w["device"])
            and context_fits(w, context)]
    if mine:
        v, w = min(mine, key=lambda vw: (vw[1]["load"] / (vw[1]["slots_total"] or DEFAULT_PARALLEL), vw[1]["load"]))
        slots = w["slots_total"] or DEFAULT_PARALLEL
        where = "%s %s:%s" % (v["node"], w["backend"], w["device"])
        # (a reused worker that is gone by the time its hive asks is started again within this room; one
        # still on its way to its hive may be started by this task first: with the room reserved for it)
        room = next((d["free_mb"] + (0 if w["worker_id"] else d.get("reserved_mb", 0)) for d in v["devices"]
                     if (d["backend"], d["device"]) == (w["backend"], w["device"])), None)
        if w["load"] < slots:
            return Placement("reuse", v["node"], w["backend"], w["device"], (), room, "%s: its worker has a free slot "
                             "(%d of %d busy)" % (where, w["load"], slots), w["worker_id"])
        if len(mine) < max_replicas:
            taken = {(v2["node"], w2["backend"], w2["device"]) for v2, w2 in mine}
            option = _best_device(need_mb, views, wanted, taken, evict=False)
            if option:
                return option._replace(reason="%s, a replica: every worker of the model is busy (%s: %d requests for "
                                       "%d slots)" % (option.reason, where, w["load"], slots))
        return Placement("reuse", v["node"], w["backend"], w["device"], (), room, "%s: its least loaded worker "
                         "(%d requests for %d slots: it queues)" % (where, w["load"], slots), w["worker_id"])
    option = _best_device(need_mb, views, wanted, (), evict=False) or _best_device(need_mb, views, wanted, (), True)
    if option:
        return option
    waitable = [(v["node"], d) for v in views for d in v["devices"] if wanted(d["backend"], d["device"])
                and d["room_mb"] + d.get("reserved_mb", 0) + sum(w.get("memory_mb") or 0 for w in v["workers"]
                                                                 if w["pool"] == d["pool"]) >= max(need_mb, 1)]
    if waitable:
        return Placement("wait", waitable[0][0], None, None, (), None, "%d MB frees when busy workers on %s end" % (
            need_mb, ", ".join(sorted({n for n, _ in waitable}))), None)
    free = {v["node"]: {"%s:%s" % (d["backend"], d["device"]): d["free_mb"] for d in v["devices"]
                        if wanted(d["backend"], d["device"])} for v in views}
    vram = all(d["pool"][0] == "vram" for v in views for d in v["devices"] if wanted(d["backend"], d["device"]))
    error = VramExhausted if vram and any(free.values()) else InsufficientRam
    raise error("No node has room for %s: it needs %d MB (%s)" % (model_ref, need_mb, "; ".join(
        "%s: %s" % (node, ", ".join("%s %d MB free" % kv for kv in sorted(f.items())) or "no such device")
        for node, f in sorted(free.items()))), {"required_mb": need_mb, "free_mb": free},
        "Raise a node's limit (rbee.py nodes set NODE --max-ram SIZE), add a node, or choose a smaller model "
        "(a lower quantisation)", component=ACTOR_QUEEN)


SchedulerSettings = collections.namedtuple("SchedulerSettings", "keep_alive max_queue max_replicas context kv_split")
SchedulerSettings.__new__.__defaults__ = (WorkerContext(0, None, None), False)
SchedulerSettings.__doc__ = """The queen's settings that placement follows (queen --keep-alive,
--max-queue, --max-replicas; --ctx-size and --cache-type-k/-v: the WorkerContext of a request
that asks for none; --kv-split: the workers it starts give each slot its own part of the cache)."""

Assignment = collections.namedtuple("Assignment", "session worker handout warm")
Assignment.__doc__ = """Which worker serves a request: the hive session that runs it, its `worker`
event (worker_id, url, api_key, backend, device, split, timings), the Handout that counts the
request as load on it (Scheduler.release), and whether it was the warm worker (no survey, no spawn)."""


class Handout:
    """A request the scheduler gave a worker: load on it until the job ends (an app's request,
    released by its AppJob), or, for a keeper's task that goes to the worker directly, until the
    worker's count of jobs shows that it arrived (HANDOUT_GRACE at most after the keeper got it)."""

    def __init__(self, key, task):
        self.key = key                    #: the worker: (node, model_ref, backend, device)
        self.task = task                  #: a keeper's task (released by the worker's count), else an app's
        self.since = time.monotonic()     #: when its caller got the worker (set again once a spawn returned)
        #: an app's request: called with (node, reason) when the queen sees the worker's node go (AppJob.lost)
        self.on_lost = None


class RpcTunnel:
    """The way a split's RPC traffic to one part goes through ssh (PROTOCOL.md §14): the part's
    server listens on its node's loopback; a local forward through the part's ssh connection
    brings it to this machine's loopback, and a remote forward through the primary's connection
    (port 0: its sshd picks a free one) to the primary's loopback, where the worker connects.
    A node that is this machine needs no forward of its own."""

    def __init__(self, part, primary, port):
        self.part = part                  #: the HiveSession of the lending node
        self.primary = primary            #: the HiveSession of the node that runs the split's worker
        self.port = port                  #: the part's RPC port on its node's loopback
        self.local = None                 #: the spec of the local forward (-L), once open
        self.remote = None                #: the spec of the remote forward (-R), once open
        self.endpoint = None              #: "127.0.0.1:PORT" where the primary's worker reaches the part

    def open(self):
        port = self.port
        if not self.part.local:
            port = free_port("127.0.0.1", 0)
            self.local = "127.0.0.1:%d:127.0.0.1:%d" % (port, self.port)
            self.part.forward("forward", "-L", self.local)
        if not self.primary.local:
            remote = "127.0.0.1:0:127.0.0.1:%d" % port
            allocated = self.primary.forward("forward", "-R", remote)
            self.remote = remote
            if not allocated.isdigit():
                raise SshFailed("ssh allocated no port on %s for a split's RPC (it said %r)" % (
                    self.primary.name, allocated), {"node": self.primary.name}, component=ACTOR_QUEEN)
            port = int(allocated)
        self.endpoint = "127.0.0.1:%d" % port
        return self.endpoint

    def close(self):
        """Cancel its forwards (a forward lives in the ssh master: no process is left either way)."""
        for session, kind, spec in ((self.primary, "-R", self.remote), (self.part, "-L", self.local)):
            if spec:
                with contextlib.suppress(RbeeError):
                    session.forward("cancel", kind, spec)
        self.remote = self.local = None


class Split:
    """One model over several nodes (PROTOCOL.md §14): the primary (the node with the most room)
    loads it, each other node lends a device through an RPC server, their shares of the layers
    follow their room; a supervisor stops every part when one of them ends. When any of its nodes
    uses the ssh transport, all of its RPC traffic goes through ssh (RpcTunnel)."""

    def __init__(self, ref, names, primary, body, parts, lent, worker_id, tunnels=()):
        self.model_ref = ref.text         #: the model it serves
        self.worker_id = worker_id        #: its worker, on the primary
        self.names = names                #: the nodes it spans, as the request named them
        self.primary = primary            #: the HiveSession of the node that runs its worker
        self.body = body                  #: the primary's spawn body (rpc endpoints, layers): a reuse asks the same
        self.parts = parts                #: [{node, layers, endpoint}], the primary first
        self.lent = lent                  #: [(HiveSession, its rpc_start answer, layers)] of the lending nodes
        self.tunnels = list(tunnels)      #: the RpcTunnel of each part when the split goes through ssh

    @classmethod
    def start(cls, hives, ref, names, views, need_mb, parallel, keep_alive, max_queue, sink):
        """Plan the split by the nodes' room, lend every part's device, start the primary's
        worker: (the Split, the worker event); every part lent is stopped again if that fails."""
        rooms = sorted(((max(v["devices"], key=lambda d: d["free_mb"]), v["node"]) for v in views),
                       key=lambda dn: -dn[0]["free_mb"])
        sessions = {n: hives.get(n, sink) for n in names}
        # one node on the ssh transport: all of the split through ssh, so nothing of it listens off loopback
        tunnelled = any(s.tunnelled for s in sessions.values())
        (primary_dev, primary), parts = rooms[0], rooms[1:]
        psession = sessions[primary]
        model = psession.client.resources(ref.text)["model"]
        if not model["cataloged"] and ref.provider == "hf":   # only the primary needs the file
            with psession.listening(sink):
                psession.client.download(ref.text, psession.tagged(sink))
            model = psession.client.resources(ref.text)["model"]
        layers = model.get("layers") or 0
        total = sum(d["free_mb"] for d, _ in rooms)
        if layers < len(rooms) or total < need_mb:
            raise InsufficientRam("%s cannot be split over %s: %d MB free together, %d needed, %d layers" % (
                ref.text, ", ".join(names), total, need_mb, layers), {"required_mb": need_mb, "free_mb": total},
                "Add a node to the split, or free memory", component=ACTOR_QUEEN)
        shares = [max(1, int(layers * d["free_mb"] / max(1, total))) for d, _ in rooms]
        shares[0] = layers - sum(shares[1:])
        narrate(ACTOR_QUEEN, "split_plan", "Splitting %d layers: %s" % (layers, ", ".join(
            "%s %s:%s %d" % (n, d["backend"], d["device"], k) for (d, n), k in zip(rooms, shares))), "🧩",
            node=primary, shares={n: k for (_, n), k in zip(rooms, shares)})
        builds = {n: sessions[n].client.resources(build=True)["ggml_build"] for n in names}
        if len(set(builds.values())) > 1:
            raise VersionMismatch("The nodes of a split run different ggml builds: %s" % ", ".join(
                "%s %s" % kv for kv in sorted(builds.items())), {"builds": builds},
                "Install the same llama-cpp-python on each: rbee.py nodes install NODE", component=ACTOR_QUEEN)
        lent, tunnels = [], []
        try:
            for (device, name), layer_count in zip(parts, shares[1:]):
                # the interface facing the primary (empty: the queen's machine, the hive's ssh peer), or loopback
                peer = "127.0.0.1" if tunnelled else "" if psession.local else psession.host
                part = {"backend": device["backend"], "device": device["device"], "peer": peer, "model_ref": ref.text}
                out = sessions[name].client.rpc_start(part, sessions[name].tagged(sink))
                lent.append((sessions[name], out, layer_count))
                via = ""
                if tunnelled:
                    tunnels.append(RpcTunnel(sessions[name], psession, int(out["endpoint"].rpartition(":")[2])))
                    via = ", through ssh at %s on %s" % (tunnels[-1].open(), primary)
                narrate(ACTOR_QUEEN, "rpc_lent", "%s lends %s:%s to the split at %s (%s)%s" % (
                    name, device["backend"], device["device"], out["endpoint"], out["build"], via), "🧩", node=name)
            endpoints = [t.endpoint for t in tunnels] if tunnelled else [out["endpoint"] for _, out, _ in lent]
            body = {"model_ref": ref.text, "backend": primary_dev["backend"], "device": primary_dev["device"],
                    "parallel": parallel, "keep_alive": keep_alive, "max_queue": max_queue,
                    "rpc": endpoints, "offload_layers": sum(shares[1:]),
                    "tensor_split": ",".join(str(k) for k in shares[1:])}
            with psession.listening(sink):
                worker = psession.client.spawn(body, psession.tagged(sink))
        except BaseException:
            for tunnel in tunnels:
                tunnel.close()
            for session, out, _ in lent:
                with contextlib.suppress(RbeeError):
                    session.client.rpc_stop(out["rpc_id"])
            raise
        worker["split"] = [{"node": primary, "layers": shares[0], "endpoint": None}] + [
            dict({"node": s.name, "layers": k, "endpoint": out["endpoint"]}, **({"tunnel": e} if tunnelled else {}))
            for (s, out, k), e in zip(lent, endpoints)]
        return cls(ref, names, psession, body, worker["split"], lent, worker["worker_id"], tunnels), worker

    def alive(self):
        """(whether the primary's worker runs, whether each lent part's RPC server runs)."""
        try:
            primary = any(w["worker_id"] == self.worker_id for w in self.primary.client.workers())
        except RbeeError:
            primary = False
        parts = []
        for session, out, _ in self.lent:
            try:
                parts.append(any(s["rpc_id"] == out["rpc_id"] for s in session.client.resources()["rpc"]))
            except RbeeError:
                parts.append(False)
        return primary, parts

    def supervise(self, closing, on_end):
        """Until the split ends: when its worker goes (keep-alive, a crash) or a part dies, stop
        every other part, so that nothing of it is left on any node; then `on_end()`. Nothing is
        done once the queen is `closing` (its cascade stops every part)."""
        def watch():
            primary, parts = self.alive()
            while primary and all(parts) and not closing.claimed:
                time.sleep(0.5)
                primary, parts = self.alive()
            on_end()
            if closing.claimed:
                return
            gone = [s.name for (s, _, _), up in zip(self.lent, parts) if not up] or [self.primary.name]
            narrate(ACTOR_QUEEN, "split_end", "The split of worker %s ended (%s gone): stopping its other parts" % (
                self.worker_id, ", ".join(gone)), "🧩", worker_id=self.worker_id)
            if primary:
                dead = next(((s, out) for (s, out, _), up in zip(self.lent, parts) if not up), None)
                with contextlib.suppress(RbeeError):
                    self.primary.client.shutdown_worker(self.worker_id, {"node": dead[0].name,
                                                                         "endpoint": dead[1]["endpoint"]}
                                                        if dead else None)
            for (session, out, _), up in zip(self.lent, parts):
                if up:
                    with contextlib.suppress(RbeeError):
                        session.client.rpc_stop(out["rpc_id"])
            for tunnel in self.tunnels:
                tunnel.close()
        threading.Thread(target=watch, daemon=True, name="split-" + self.worker_id).start()


class Scheduler:
    """Which worker serves each request (PROTOCOL.md §12), decided in one place, `assign`: the
    warm worker of the model, else a placement (a worker with a free slot, a replica, a spawn
    after stopping idle workers, a split). Decisions are made one at a time under `lock` from a
    survey made outside it; what a decision starts (a hive, an eviction, a spawn) runs outside it
    too, its memory reserved in `pending`, so a slow one holds up nobody else's request."""

    def __init__(self, hives, nodes, settings):
        self.hives = hives                #: the queen's hive sessions (started here on demand)
        self.nodes = nodes                #: the node registry: each node's caps
        self.settings = settings          #: SchedulerSettings
        self.lock = threading.Lock()      #: one decision at a time; guards everything below
        #: spawns in progress: dicts of node, model_ref, backend, device, need_mb, parallel (under `lock`)
        self.pending = []
        self.leaving = set()              #: ids of workers being evicted: no decision counts or stops them (`lock`)
        #: worker key (node, model_ref, backend, device) -> its Handouts still counted as load (under `lock`)
        self.handouts = collections.defaultdict(list)
        self.jobs_seen = {}               #: worker_id -> (node, jobs_total) as last seen (under `lock`)
        self.splits = {}                  #: worker_id -> its running Split (under `lock`)
        #: model_ref -> (session, worker event, worker key, keep-alive) of its last assignment (under `lock`)
        self.recent = {}
        hives.on_lost.append(self.node_lost)

    # -- the one answer ------------------------------------------------------------------------

    def assign(self, ref, sink, nodes=None, backend=None, device=None, parallel=DEFAULT_PARALLEL, keep_alive=None,
               split=None, task=False, warm=True, context=None, named=False):
        """The worker that serves a request for `ref`: the warm one (its health asked first for a
        keeper's `task`), else where the nodes have room (`nodes`: the candidates, default every
        node; `named`: the one node a person named), or over the `split` nodes; narrated to `sink`,
        remembered for the next request. Its context serves `context` (WorkerContext; default: the queen's)."""
        context = context or self.settings.context
        if warm and not split and keep_alive is None:
            assigned = self.warm(ref, nodes, backend, device, task, context)
            if assigned and task:   # (an app's request to a warm worker is no news in the queen's log)
                narrate(ACTOR_QUEEN, "placement", "Placing on %s %s:%s: its worker is warm" % (
                    assigned.session.name, assigned.worker.get("backend"), assigned.worker.get("device")), "📍",
                    node=assigned.session.name, backend=assigned.worker.get("backend"),
                    device=assigned.worker.get("device"), decision="reuse")
            if assigned:
                return assigned
        nodes = nodes or self.hives.candidates()
        if split:
            session, worker = self.place_split(ref, split, parallel, keep_alive, sink)
            return Assignment(session, worker, None, False)
        session, worker, handout = self.place(ref, nodes, backend, device, parallel, keep_alive, sink, task, context,
                                              named)
        if not worker.get("split"):
            with self.lock:
                self.recent[ref.text] = (session, worker, handout.key,
                                         self.settings.keep_alive if keep_alive is None else keep_alive)
        return Assignment(session, worker, handout, False)

    def warm(self, ref, nodes, backend, device, check, context=None):
        """The worker of the last assignment for `ref`, with no survey and no spawn: while the
        requests it serves leave it a free slot, its hive runs, it fits `nodes`/`backend`/`device`,
        nobody is evicting it, it was kept alive long enough not to be going, and its context serves
        `context` (with `check`, its /health says so too)."""
        with self.lock:
            known = self.recent.get(ref.text)
            if not known:
                return None
            session, worker, key, keep_alive = known
            fits = (nodes is None or session.name in nodes) and backend in (None, key[2]) and device in (
                None, key[3]) and context_fits(worker, context)
            slots = worker.get("slots_total") or DEFAULT_PARALLEL
            going = worker["worker_id"] in self.leaving or session.exited.is_set() or 0 <= keep_alive < 60
            if not fits or going or self.load(key) >= slots:
                return None
            handout = self._hand_out(key, check)
        if check:
            asked = time.monotonic()
            try:
                health = WorkerClient(session.worker_url(worker["url"]), worker["api_key"]).health(timeout=1.0)
            except RbeeError:
                health = {}
            # (its port may serve another worker by now: the id must be its own)
            full = health.get("queue_length", 0) >= health.get("max_queue", 0) + health.get("slots_available", 0)
            if health.get("worker_id") != worker["worker_id"] or health.get("state") not in WORKER_SERVING or full:
                self.release(handout)
                self.forget(ref)
                return None
            with self.lock:
                self._settle(key, health, asked, handout)
        return Assignment(session, dict(worker, timings={"reused": True}), handout, True)

    def forget(self, ref):
        with self.lock:
            self.recent.pop(ref.text, None)

    def node_lost(self, name, reason):
        """Node `name` went away unasked (Hives.on_lost): no warm reuse there, and each app request
        its workers serve is told, so that none waits on a node that will not answer."""
        with self.lock:
            for model_ref in [m for m, known in self.recent.items() if known[0].name == name]:
                del self.recent[model_ref]
            told = [h.on_lost for key, entries in self.handouts.items() if key[0] == name for h in entries
                    if h.on_lost]
        for on_lost in told:
            on_lost(name, reason)

    # -- load: what runs and waits on a worker, as far as the queen knows ---------------------

    def _hand_out(self, key, task):
        """Count a request as load on the worker `key` (the caller holds `lock`)."""
        handout = Handout(key, task)
        self.handouts[key].append(handout)
        return handout

    def release(self, handout):
        """An app's request ended (or a request never got to its worker): it is no load any more."""
        if handout is None:
            return
        with self.lock:
            entries = self.handouts.get(handout.key, [])
            if handout in entries:
                entries.remove(handout)
            if not entries:
                self.handouts.pop(handout.key, None)

    def load(self, key):
        """The requests handed to the worker `key` that have not ended (apps') or not reached it
        yet (tasks'; HANDOUT_GRACE at most after their keeper got it); the caller holds `lock`."""
        now = time.monotonic()
        spawning = any((p["node"], p["model_ref"], p["backend"], p["device"]) == key for p in self.pending)
        entries = [h for h in self.handouts.get(key, ()) if not h.task or spawning or now - h.since < HANDOUT_GRACE]
        if entries:
            self.handouts[key] = entries
        else:
            self.handouts.pop(key, None)
        return len(entries)

    def _settle(self, key, health, asked, new=None):
        """A worker's jobs_total as its health (asked for at `asked`) says: as many of the tasks
        handed to it before then as jobs arrived since it was last seen (a new worker: since it
        started), oldest first, are its own load now; `new`, just handed out, cannot have arrived
        (the caller holds `lock`). An app's job arriving may count for a task: the worker's own
        load shows both, and a task's handout ends HANDOUT_GRACE after its keeper got it anyway."""
        worker_id, total = health.get("worker_id"), health.get("jobs_total") or 0
        arrived = total - self.jobs_seen.get(worker_id, (None, 0))[1]
        self.jobs_seen[worker_id] = (key[0], total)
        tasks = [h for h in self.handouts.get(key, ()) if h.task and h is not new and h.since < asked]
        for handout in tasks[:max(0, arrived)]:
            self.handouts[key].remove(handout)

    # -- placement ------------------------------------------------------------------------------

    def place(self, ref, nodes, backend, device, parallel, keep_alive, sink, task=False, context=None, named=False):
        """(the hive session, its `worker` event, the Handout) of a request placed on one of
        `nodes`; over several nodes when it fits on no single one."""
        deadline, said_wait, reservation = time.monotonic() + PLACEMENT_WAIT, False, None
        while True:
            answers = self.survey(ref, nodes, sink, named)   # (hive starts and ssh: outside the lock)
            with self.lock:
                plan = self.full_context_plan(ref, nodes, answers, backend, device, context)
                views, need_mb, kv_mb = self.views(ref, nodes, answers, context, full=bool(plan))
                try:
                    plan = plan or plan_placement(ref.text, need_mb, views, backend, device,
                                                  self.settings.max_replicas, context)
                except (InsufficientRam, VramExhausted):
                    parts = split_nodes(views, need_mb) if len(nodes) > 1 and backend is None else None
                    if not parts:
                        raise
                    plan = None
                if plan is not None and plan.action != "wait":
                    if plan.action == "spawn":   # (a size not known yet reserves what it may take)
                        reservation = {"node": plan.node, "model_ref": ref.text, "backend": plan.backend,
                                       "device": plan.device, "need_mb": need_mb or plan.free_mb or 0,
                                       "parallel": parallel}
                        self.pending.append(reservation)
                    self.leaving.update(worker_id for _, worker_id, _ in plan.evict)
                    for model_ref in [m for m, known in self.recent.items() if known[1]["worker_id"] in self.leaving]:
                        del self.recent[model_ref]   # (no warm reuse of a worker on its way out)
                    handout = self._hand_out((plan.node, ref.text, plan.backend, plan.device), task)
                    break
            if plan is None:
                narrate(ACTOR_QUEEN, "split_auto", "%s fits on no single node; together %s can hold it" % (
                    ref.text, " and ".join(parts)), "🧩")
                session, worker = self.place_split(ref, parts, parallel, keep_alive, sink)
                return session, worker, None
            if time.monotonic() > deadline:
                raise InsufficientRam("No room for %s after waiting %d s: %s" % (ref.text, PLACEMENT_WAIT, plan.reason),
                                      {"required_mb": need_mb, "waited_s": PLACEMENT_WAIT},
                                      "Unload a worker (rbee.py workers shutdown ID) or raise a node's limit",
                                      component=ACTOR_QUEEN)
            if not said_wait:
                narrate(ACTOR_QUEEN, "placement_wait", "Waiting for memory for %s: %s" % (ref.text, plan.reason),
                        "⏳")
                said_wait = True
            time.sleep(0.5)
        try:
            narrate(ACTOR_QUEEN, "placement", "Placing on %s" % plan.reason, "📍", node=plan.node,
                    backend=plan.backend, device=plan.device, decision=plan.action, need_mb=need_mb,
                    kv_cache_mb=kv_mb, ctx_size=(context or self.settings.context).ctx_size,
                    cache_type_k=(context or self.settings.context).cache_type_k or "f16",
                    cache_type_v=(context or self.settings.context).cache_type_v or "f16")
            self.evict(plan.evict, sink)   # (outside the lock: a worker slow to stop holds up this request alone)
            session = self.hives.get(plan.node, sink)
            with session.listening(sink):
                body = {"model_ref": ref.text, "backend": plan.backend, "device": plan.device, "parallel": parallel,
                        "keep_alive": keep_alive, "max_queue": self.settings.max_queue}
                body.update(context._asdict() if context else {}, **({"kv_split": True} if self.settings.kv_split
                                                                     else {}))
                if plan.free_mb is not None:
                    body["memory_limit_mb"] = plan.free_mb
                worker = session.client.spawn(body, session.tagged(sink))
            handout.since = time.monotonic()
            return session, worker, handout
        except BaseException:
            self.release(handout)
            raise
        finally:
            with self.lock:
                if reservation:
                    self.pending.remove(reservation)
                self.leaving.difference_update(worker_id for _, worker_id, _ in plan.evict)

    def full_context_plan(self, ref, nodes, answers, backend, device, context):
        """(the caller holds `lock`) A request that asks for no context size: the Placement that gives
        its worker the context its model was trained for (idle workers stopped for it if need be),
        else None: then it is placed with the least a context takes, and fits itself into the room
        there is (a model trained for 128k tokens may never hold them all on a node); no worker is
        stopped for a context nobody asked for."""
        if (context or self.settings.context).ctx_size:
            return None
        views, need_mb, _ = self.views(ref, nodes, answers, context, full=True)
        try:
            plan = plan_placement(ref.text, need_mb, views, backend, device, self.settings.max_replicas, context)
        except (InsufficientRam, VramExhausted):
            return None
        return plan if plan.action != "wait" and not plan.evict else None

    def place_split(self, ref, names, parallel, keep_alive, sink):
        """(the primary's hive session, the split's `worker` event): the running split of `ref`
        over `names`, else a new one (Split.start)."""
        with self.lock:
            running = next((s for s in self.splits.values() if (s.model_ref, s.names) == (ref.text, names)), None)
        if running:   # the same split again: its worker (the hive hands it out for the same parts)
            session = self.hives.get(running.primary.name, sink)
            narrate(ACTOR_QUEEN, "placement", "Placing on the split %s" % ", ".join(
                "%s %d" % (p["node"], p["layers"]) for p in running.parts), "📍", node=session.name,
                decision="reuse")
            with session.listening(sink):
                worker = session.client.spawn(running.body, session.tagged(sink))
            return session, dict(worker, split=running.parts)
        answers = self.survey(ref, names, sink, named=True)
        missing = [n for n in names if n not in answers]
        if missing:
            raise SshFailed("A split needs every node it names; %s did not answer" % ", ".join(missing),
                            {"nodes": missing}, "Check them: rbee.py nodes check NODE", ACTOR_QUEEN)
        with self.lock:
            views, need_mb, _ = self.views(ref, names, answers)
        split, worker = Split.start(self.hives, ref, names, views, need_mb, parallel, keep_alive,
                                    self.settings.max_queue, sink)
        with self.lock:
            self.splits[worker["worker_id"]] = split
        split.supervise(self.hives.closing, lambda: self._split_ended(worker["worker_id"]))
        return split.primary, worker

    def _split_ended(self, worker_id):
        with self.lock:
            self.splits.pop(worker_id, None)

    def node_for(self, ref, sink):
        """The node a download of `ref` goes to: where a request for it would run now."""
        nodes = self.hives.candidates()
        answers = self.survey(ref, nodes, sink)
        with self.lock:
            views, need_mb, _ = self.views(ref, nodes, answers)
            return plan_placement(ref.text, need_mb, views, max_replicas=self.settings.max_replicas).node

    def survey(self, ref, nodes, sink, named=False):
        """{node: its hive's /v1/resources for `ref` (None: no model)} of the nodes whose hives
        answer (started if need be); the first error if none does. A node that is down is left out
        with no ssh at all, and the others get one ssh attempt each (a node that fails it is down:
        Hives.get), unless a person `named` the nodes: then they are tried as PROTOCOL.md §9 says."""
        results, errors = {}, []
        several = len(nodes) > 1

        def ask(name):
            try:
                down = None if named else self.hives.down(name)
                if down:
                    raise down
                session = self.hives.get(name, sink, attempts=SSH_ATTEMPTS if named else 1)
                asked = time.monotonic()
                answer = session.client.resources(ref.text if ref else None)
                self.hives.remember(name, answer)
                results[name] = dict(answer, asked=asked)
            except Exception as exc:   # (an ssh binary missing is no traceback either)
                err = RbeeError.wrap(exc, ACTOR_QUEEN)
                errors.append(err)
                if several:
                    narrate(ACTOR_QUEEN, "node_skipped", "Leaving %s out: %s" % (name, err.message), "⚠️",
                            node=name, level="warn")
        in_parallel(ask, nodes)
        if not results:
            raise errors[0] if errors else NodeNotFound("No node to run on", {}, component=ACTOR_QUEEN)
        return results

    def views(self, ref, nodes, results, context=None, full=False):
        """(node views, MB the model needs: 0 if no node knows its size yet, the MB of its KV cache in
        that), with the spawns, evictions and requests in progress (the caller holds `lock`). The need
        is memory_need_mb's estimate from the GGUF, with its KV cache at `context` (its size and types; `full`:
        a default context at the model's trained size), or what its workers take where that is more."""
        for name, res in results.items():   # the tasks that reached their workers are the workers' own load now
            listed = {w["worker_id"] for w in res.get("workers") or ()}
            for worker_id in [i for i, (node, _) in self.jobs_seen.items() if node == name and i not in listed]:
                del self.jobs_seen[worker_id]   # (gone: its keep-alive, a crash, an eviction)
            for w in res.get("workers") or ():
                if w.get("worker_id"):
                    self._settle((name, w["model_ref"], w["backend"], w["device"]), w, res["asked"])
        sizes = [r["model"]["size_bytes"] for r in results.values() if (r.get("model") or {}).get("size_bytes")]
        views = [node_view(results[name], self.nodes.limits(name), [p for p in self.pending if p["node"] == name],
                           self.load, self.leaving) for name in nodes if name in results]
        shapes = [r["model"].get("shape") for r in results.values() if (r.get("model") or {}).get("shape")]
        asked = context or self.settings.context
        kv_mb = kv_need_mb(shapes[0], asked, full) if shapes else 0
        seen = [w.get("memory_mb") or 0 for v in views for w in v["workers"] if w["model_ref"] == ref.text
                and context_fits(w, context)]
        estimate = memory_need_mb(max(sizes), shapes[0] if shapes else {}, asked, full) if sizes else 0
        return views, max([estimate] + seen), kv_mb

    def evict(self, evict, sink):
        """Stop these idle workers and wait until their hives no longer list them (GRACEFUL_TIMEOUT at most)."""
        for node, worker_id, model_ref in evict:
            narrate(ACTOR_QUEEN, "evict", "Unloading idle %s (worker %s) on %s to make room, least recently used "
                    "first" % (model_ref, worker_id, node), "🧹", node=node, worker_id=worker_id)
            with contextlib.suppress(WorkerNotFound):   # (gone meanwhile: its keep-alive, a crash)
                self.hives.get(node, sink).client.shutdown_worker(worker_id)
        deadline = time.monotonic() + GRACEFUL_TIMEOUT
        for node, worker_id, _ in evict:
            client = self.hives.get(node, sink).client
            while time.monotonic() < deadline and any(w["worker_id"] == worker_id for w in client.workers()):
                time.sleep(0.1)


# ============================================================================================
# The apps' APIs on the queen (PROTOCOL.md §13, §15): OpenAI's, Ollama's, llama.cpp's /infill, metrics, the feed
# ============================================================================================

def openai_error(err):
    """An RbeeError in OpenAI's shape: {"error": {message, type, code, param}}."""
    kind = {401: "authentication_error", 403: "permission_error", 503: "unavailable_error"}.get(
        err.status, "invalid_request_error" if err.status < 500 else "server_error")
    code = {"MODEL_NOT_FOUND": "model_not_found", "MISSING_API_KEY": "invalid_api_key",
            "INVALID_API_KEY": "invalid_api_key", "CONTEXT_EXCEEDED": "context_length_exceeded"}.get(
        err.code, err.code.lower())
    return {"error": {"message": err.message, "type": kind, "code": code, "param": err.details.get("field")}}


class OpenAIStream(SSEStream):
    """OpenAI's dialect of SSE (as llama.cpp's server writes it): `data: {json}` frames, bare `:`
    keep-alives, `data: [DONE]` last; an error after the start is a `data: {"error": ...}` frame."""

    ping_frame = b":\n\n"

    def data(self, obj):
        self._write(("data: %s\n\n" % json_text(obj)).encode())

    def done(self):
        try:
            self._write(b"data: [DONE]\n\n")
        finally:
            self.close()

    def fail(self, err):
        try:
            self.data(openai_error(err))
        finally:
            self.close()


class NdjsonStream(SSEStream):
    """Ollama's dialect: one JSON object per line, no keep-alives; an error is `{"error": "..."}`."""

    content_type = NDJSON_CONTENT_TYPE
    ping_frame = None

    def line(self, obj):
        self._write((json_text(obj) + "\n").encode())

    def fail(self, err):
        try:
            self.line({"error": err.message})
        finally:
            self.close()


def iso_time(unix=None):
    """RFC 3339 in UTC, as Ollama writes its times."""
    unix = time.time() if unix is None else unix
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(unix)) + ".%06dZ" % int((unix % 1) * 1e6)


def quantization_of(filename):
    match = re.search(r"(I?Q\d+_[A-Z0-9_]+|I?Q\d+|F16|BF16|F32)(?=[.-])", filename or "", re.I)
    return match.group(1).upper() if match else ""


# a worker's stop_reason, in the apps' words
FINISH_REASON = {"eos": "stop", "stop": "stop", "max_tokens": "length", "tool_calls": "tool_calls"}


class AppJob:
    """One generation an app asked the queen for: given a worker by the scheduler, run there over
    its client, its text yielded as it comes, measured for /metrics. Use it in a `with` block (or
    let `texts` end): leaving it cancels the job on the worker and ends its load there. A job whose
    node fails before it streamed anything (the worker's connection breaks, the queen sees the
    node go) is placed again on another node, once per node, within FAILOVER_DEADLINE."""

    def __init__(self, scheduler, metrics, ref, body, keep_alive):
        self.scheduler = scheduler        #: who gives it a worker (and counts it as load until it ends)
        self.metrics = metrics            #: where its outcome and times go
        self.ref = ref                    #: the model
        self.body = body                  #: the worker's /execute body
        self.keep_alive = keep_alive      #: the worker's keep-alive (seconds; the queen's default if None)
        self.accepted = time.monotonic()  #: when the request came
        self.started = None               #: when the worker began it (left the queue)
        self.first_token = None           #: when its first text came
        self.stats = {}                   #: the worker's end event (tokens_out, prompt_tokens, stop_reason, ...)
        self.events = None                #: the worker's events (WorkerClient.execute), once open
        self.first = None                 #: the first of them, read by open()
        self.node = None                  #: the node whose worker runs it (open)
        self.handout = None               #: its load on that worker, until close (Scheduler.release)
        self.outcome = None               #: how it ended, once it did (ok, error, busy, cancelled)
        self.client = None                #: the WorkerClient of its worker (open)
        self.failed = []                  #: the nodes it was placed on that failed it, oldest first
        #: (node, reason) once the queen saw the node of its worker go (written by the thread that saw it)
        self.lost_node = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def open(self):
        """Get a worker and start the job: every error the app should get as a status (a prompt
        over the context, a full queue, an unknown model) raises here, before the answer starts."""
        with self.metrics.placing:
            try:
                self._place(self._start)
            except BaseException as err:
                self.end("busy" if isinstance(err, SlotsBusy) else "error")
                raise
        return self

    def _place(self, start):
        """`start(assigned)` on the worker the scheduler gives the job. A warm worker that fails it
        (it may have ended meanwhile, its keep-alive) is forgotten and the job placed again; a node
        that fails it (may_fail_over; the queen saw it go, a warm worker's too) is left out and the
        job placed on another one, narrated."""
        context, warm = context_of(self.body, self.scheduler.settings.context), not self.failed
        while True:
            nodes = self.scheduler.hives.others(self.failed) if self.failed else None
            assigned = self.scheduler.assign(self.ref, _current_sink(), nodes=nodes, keep_alive=self.keep_alive,
                                             warm=warm, context=context)
            self.node = assigned.session.name
            if self.failed:
                narrate(ACTOR_QUEEN, "failover", "%s went away; placing on %s" % (
                    self.failed[-1], assigned.session.name), "↪", node=assigned.session.name,
                        failed_node=self.failed[-1])
                self.metrics.failed_over(self.failed[-1])
            try:
                return start(assigned)
            except RbeeError as err:
                self.scheduler.release(assigned.handout)
                err = self.node_error(err)
                if assigned.warm and not isinstance(err, NodeLost):
                    self.scheduler.forget(self.ref)
                    warm = False
                    continue
                if not self.may_fail_over(err):
                    raise err
                self.failed.append(assigned.session.name)
            except BaseException:
                self.scheduler.release(assigned.handout)
                raise

    def may_fail_over(self, err):
        """Whether `err` is its node's failure (a worker gone, a hive or its ssh lost) that another
        node may make good: before the job streamed anything, within its deadline, a node left."""
        failure = isinstance(err, (WorkerCrashed, ConnectionTimeout, SshFailed, HiveFailed, WorkerNotFound))
        return (failure and self.first_token is None and bool(self.scheduler.hives.others(self.failed + [self.node]))
                and time.monotonic() - self.accepted < FAILOVER_DEADLINE)

    def _watch(self, assigned):
        """Run it on `assigned` from now on: its client, its load there, and its node watched."""
        self.handout, self.lost_node = assigned.handout, None
        self.client = self._client(assigned)
        if self.handout:
            self.handout.on_lost = self.lost

    def _start(self, assigned):
        self._watch(assigned)
        self.events = self.client.execute(self.body, retries=())   # a full queue is the app's 503 at once
        self.first = next(self.events)

    def lost(self, node, reason):
        """The queen saw `node`, where the job runs, go (Scheduler.node_lost): its connection is cut,
        so that its reader stops waiting on a node that will not answer."""
        if node != self.node:
            return
        self.lost_node = (node, reason)
        if self.client:
            self.client.cut()

    def node_error(self, err):
        """`err` as the app gets it: NODE_LOST naming the node when the queen saw it go."""
        if self.lost_node is None or not isinstance(err, (WorkerCrashed, ConnectionTimeout)):
            return err
        node, reason = self.lost_node
        return NodeLost("%s went away while it answered: %s" % (node, reason), dict(err.details, node=node),
                        "Send the request again: rbee places it on a node that answers", ACTOR_QUEEN)

    @staticmethod
    def _client(assigned):
        worker = assigned.worker
        return WorkerClient(assigned.session.worker_url(worker["url"]), worker["api_key"], worker["worker_id"],
                            assigned.session.name)

    def count_tokens(self):
        """How many tokens the job's prompt is on a worker of its model (which it may load); no
        generation, no request of /metrics."""
        return self._on_a_worker(lambda client: client.tokenize(self.body))

    def embed(self):
        """The worker's /embed answer to the job's body ({input, truncate}) on a worker of its model."""
        return self._on_a_worker(lambda client: client.embed(self.body))

    def rerank(self):
        """The worker's /rerank answer to the job's body ({query, documents, truncate}) on a worker of its model."""
        return self._on_a_worker(lambda client: client.rerank(self.body))

    def _on_a_worker(self, call):
        """`call(client)`'s answer from a worker of the job's model; placed again (_place) as a
        generation that streamed nothing yet, its connection cut when the queen sees its node go."""
        answers = []

        def start(assigned):   # (a call that fails: _place releases its handout)
            self._watch(assigned)
            answers.append(call(self.client))
            self.scheduler.release(assigned.handout)
        with self.metrics.placing:
            self._place(start)
        return answers[0]

    def texts(self):
        """The generated text, piece by piece; then `stats` holds the worker's end event."""
        return (piece.text for piece in self.pieces() if isinstance(piece, Token))

    def pieces(self):
        """The generated text (Token) and tool calls (ToolCallDelta) as they come; then `stats`
        holds the worker's end event."""
        event = self.first
        try:
            while True:
                if isinstance(event, JobStarted):
                    self.started = time.monotonic()
                elif isinstance(event, ToolCallDelta) or (isinstance(event, Token) and event.text):
                    self.first_token = self.first_token or time.monotonic()
                    yield event
                elif isinstance(event, Narration):   # (the page's live feed shows the apps' jobs too)
                    observed(dict(event.event, node=self.node))
                elif isinstance(event, JobEnded):
                    self.stats = event.stats
                    self.end("ok")
                    return
                event = self._next_event()
        except RbeeError:
            self.end("error")
            raise
        finally:
            self.close()

    def _next_event(self):
        """The worker's next event; when its node failed before the job streamed anything, the
        first event of the job placed again elsewhere."""
        try:
            return next(self.events)
        except RbeeError as err:
            err = self.node_error(err)
            if not self.may_fail_over(err):
                raise err
        self.events.close()
        self.scheduler.release(self.handout)
        self.failed.append(self.node)
        self._place(self._start)
        return self.first

    def end(self, outcome):
        """Record how it ended, once."""
        if self.outcome is None:
            self.outcome = outcome
            self.metrics.ended(self, outcome)

    def close(self):
        """Cancel the job on the worker if it still runs; it is no load there any more."""
        self.end("cancelled")
        self.scheduler.release(self.handout)
        self.handout = None
        if self.events is not None:
            self.events.close()

    def finish_reason(self):
        return FINISH_REASON.get(self.stats.get("stop_reason"), "stop")

    def tool_calls(self):
        """The calls the model made, whole: [{id, name, arguments (JSON text)}]."""
        return list(self.stats.get("tool_calls") or ())

    def usage(self):
        """OpenAI's usage: the prompt's tokens (`cached_tokens` of them came from the worker's KV or
        prompt cache, not evaluated again) and the answer's."""
        prompt, completion = self.stats.get("prompt_tokens", 0), self.stats.get("tokens_out", 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": self.stats.get("prompt_cached", 0)}}


class Metrics:
    """The queen's Prometheus metrics (text format 0.0.4): its apps' requests, counted here, and
    the cluster's state, read from the hives at each scrape. Labels: node, model, state, outcome."""

    BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
    OUTCOMES = ("ok", "error", "busy", "cancelled")
    HISTOGRAMS = {"rbee_time_to_first_token_seconds": "From an app request to its first token",
                  "rbee_request_duration_seconds": "Whole app requests",
                  "rbee_queue_wait_seconds": "From an app request to its job leaving the queue"}

    def __init__(self):
        self.lock = threading.Lock()      #: guards everything below (request threads)
        self.placing = InFlight()         #: app requests being placed (a model loading, memory freeing)
        self.outcomes = collections.Counter()         #: outcome -> requests that ended so
        self.tokens = collections.Counter()           #: ("prompt"|"generated", model) -> tokens
        self.failovers = collections.Counter()        #: node -> app requests placed again after it failed them
        #: histogram -> its bucket counts, then the +Inf count, then the sum
        self.histograms = {name: [0] * (len(self.BUCKETS) + 1) + [0.0] for name in self.HISTOGRAMS}

    def ended(self, job, outcome):
        now = time.monotonic()
        with self.lock:
            self.outcomes[outcome] += 1
            if job.stats:
                self.tokens[("prompt", job.ref.text)] += job.stats.get("prompt_tokens", 0)
                self.tokens[("generated", job.ref.text)] += job.stats.get("tokens_out", 0)
            self._observe("rbee_request_duration_seconds", now - job.accepted)
            if job.started:
                self._observe("rbee_queue_wait_seconds", job.started - job.accepted)
            if job.first_token:
                self._observe("rbee_time_to_first_token_seconds", job.first_token - job.accepted)

    def failed_over(self, node):
        """An app request that `node` failed before it streamed was placed again elsewhere."""
        with self.lock:
            self.failovers[node] += 1

    def _observe(self, name, value):
        counts = self.histograms[name]
        for k, bound in enumerate(self.BUCKETS):
            if value <= bound:
                counts[k] += 1
        counts[len(self.BUCKETS)] += 1
        counts[-1] += value

    def render(self, workers, hives):
        """The exposition text: these counters, and `workers`/`hives` as /v2/status gives them."""
        out = []

        def metric(name, kind, help_text, samples):
            out.append("# HELP %s %s\n# TYPE %s %s" % (name, help_text, name, kind))
            for labels, value in samples:
                label_text = ",".join('%s="%s"' % (k, str(v).replace("\\", "\\\\").replace('"', '\\"')
                                                   .replace("\n", "\\n")) for k, v in labels)
                out.append("%s%s %s" % (name, "{%s}" % label_text if label_text else "", repr(float(value))))
        busy = sum(w["slots_total"] - w["slots_available"] for w in workers)
        queued = sum(w["queue_length"] for w in workers)
        with self.lock:
            metric("rbee_requests_running", "gauge", "Jobs in a slot of a worker, from every client", [((), busy)])
            metric("rbee_requests_waiting", "gauge", "Jobs in a worker's queue, and app requests being placed",
                   [((), queued + self.placing.count)])
            metric("rbee_requests_total", "counter", "App requests by outcome",
                   [((("outcome", o),), self.outcomes[o]) for o in self.OUTCOMES])
            metric("rbee_failovers_total", "counter", "App requests placed again after their node failed them",
                   [((("node", n),), c) for n, c in sorted(self.failovers.items())])
            for kind in ("prompt", "generated"):
                metric("rbee_%s_tokens_total" % kind, "counter", "%s tokens of app requests" % kind.title(),
                    [((("model", m),), n) for (k, m), n in sorted(self.tokens.items()) if k == kind])
            for name, help_text in self.HISTOGRAMS.items():
                counts, total = self.histograms[name], float(self.histograms[name][len(self.BUCKETS)])
                out.append("# HELP %s %s\n# TYPE %s histogram" % (name, help_text, name))
                for bound, count in zip(self.BUCKETS, counts):
                    out.append('%s_bucket{le="%s"} %s' % (name, repr(bound), float(count)))
                out.append('%s_bucket{le="+Inf"} %s\n%s_sum %s\n%s_count %s' % (name, total, name, repr(counts[-1]),
                                                                               name, total))
        states = collections.Counter((w["node"], w["model_ref"], w["state"]) for w in workers)
        metric("rbee_workers", "gauge", "Workers by node, model and state",
               [((("node", n), ("model", m), ("state", s)), c) for (n, m, s), c in sorted(states.items())])
        metric("rbee_node_free_memory_bytes", "gauge", "Free RAM of each node with a running hive",
               [((("node", h["node"]),), h["ram_free_mb"] << 20) for h in hives if "ram_free_mb" in h])
        return "\n".join(out) + "\n"


def sampling_of(body, temperature=0.8):
    """/execute's sampling fields from an app's request (OpenAI's names, or Ollama's `options`)."""
    job = {"temperature": body.get("temperature", temperature)}
    for name in ("top_p", "top_k", "seed", "stop"):
        if body.get(name) is not None:
            job[name] = body[name]
    return job


class EventFeed:
    """Every narration event the queen sees (its own, its hives', their workers'), for /v2/events:
    the last HISTORY for a page that opens, then each one live. A slow reader loses events, never
    slows anyone down."""

    HISTORY = 200

    def __init__(self):
        self.lock = threading.Lock()      #: guards both below
        self.history = collections.deque(maxlen=self.HISTORY)   #: the last events (under `lock`)
        self.inboxes = []                 #: one bounded queue per open feed (under `lock`)

    def publish(self, event):
        event = dict(event, at=round(time.time(), 3))
        with self.lock:
            self.history.append(event)
            inboxes = list(self.inboxes)
        for inbox in inboxes:
            with contextlib.suppress(queue.Full):
                inbox.put_nowait(event)

    def subscribe(self):
        inbox = queue.Queue(maxsize=1000)
        with self.lock:
            self.inboxes.append(inbox)
            return inbox, list(self.history)

    def unsubscribe(self, inbox):
        with self.lock:
            self.inboxes.remove(inbox)


class AppModels:
    """The models the apps name: every model cataloged on a node as the queen last saw it, every
    loaded one, by id, and every alias (`models alias`); a name an app sends resolved to a
    reference. Listing starts no hive and waits on no ssh (Hives.known)."""

    def __init__(self, scheduler, hives):
        self.scheduler = scheduler        #: surveys the nodes (starting their hives) for a name not known yet
        self.hives = hives                #: what the queen knows of each node

    def named(self, name):
        """The model an app's `model` names: a reference rbee accepts, an alias, or an id (or catalog
        id) from listing(); else 404 MODEL_NOT_FOUND (400 when it is no string at all)."""
        if not isinstance(name, str) or not name.strip():
            raise invalid("model", "is required: a model reference (hf:ORG/REPO, file:/path.gguf) or an id from "
                          "GET /v1/models")
        with contextlib.suppress(InvalidModelRef):
            return self.hives.nodes.model_ref(name)
        found = self.find(name)
        if found is None:   # (a node whose catalog the queen has not seen yet may have it: ask them all)
            with contextlib.suppress(RbeeError):
                self.scheduler.survey(None, self.hives.candidates(), _current_sink())
            found = self.find(name)
        if found:
            return ModelRef.parse(found["id"])
        raise ModelNotFound("The model %r does not exist on any reachable node" % name, {"model": name},
                            "See GET /v1/models, or name a reference: hf:ORG/REPO[:QUANT] or file:/path.gguf")

    def find(self, name):
        """The listing's entry whose id (or catalog id) is `name`, or None."""
        return next((m for m in self.listing() if name in (m["id"], m["slug"])), None)

    def listing(self, known=None):
        """{id, slug, filename, size_bytes, sha256, created, nodes, loaded_on} of every model, from
        `known` (Hives.known: asked if not given). An hf model's id is hf:ORG/REPO (with :FILE when
        a node holds several files of the repo); a file's, file:PATH; an alias's, its name, with
        `alias_of` and what its model has."""
        found = {}
        for name, res in (known or self.hives.known()).items():
            files = collections.Counter(row["reference"] for row in res["models"] if row["provider"] == "hf")
            for row in res["models"]:
                if row["provider"] == "hf":
                    model_id = "hf:" + row["reference"] + (":" + row["filename"] if files[row["reference"]] > 1 else "")
                else:
                    model_id = "file:" + row["local_path"]
                entry = found.setdefault(model_id, {
                    "id": model_id, "slug": row["id"], "filename": row["filename"], "size_bytes": row["size_bytes"],
                    "sha256": row["sha256"], "created": row["downloaded_at_unix"], "nodes": [], "loaded_on": []})
                entry["nodes"].append(name)
            for w in res["workers"]:
                entry = found.setdefault(w["model_ref"], {
                    "id": w["model_ref"], "slug": w["model_ref"], "filename": w["model_ref"], "size_bytes": 0,
                    "sha256": None, "created": int(time.time()), "nodes": [], "loaded_on": []})
                entry["loaded_on"].append(name)
        for alias, ref in self.hives.nodes.aliases().items():   # (its model may be on no node yet)
            model = found.get(ref) or {"filename": ref, "size_bytes": 0, "sha256": None, "created": int(time.time()),
                                       "nodes": [], "loaded_on": []}
            found[alias] = dict(model, id=alias, slug=alias, alias_of=ref)
        return [found[k] for k in sorted(found)]


def response_format_of(response_format):
    """/execute's fields for OpenAI's `response_format`: any JSON object, or a schema's JSON."""
    if response_format is None or response_format == {"type": "text"}:
        return {}
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_object":
        return {"grammar": "json"}
    if kind == "json_schema":
        json_schema = response_format.get("json_schema")
        schema = json_schema.get("schema") if isinstance(json_schema, dict) else None
        if not isinstance(schema, dict):
            raise invalid("response_format.json_schema.schema", "is required: the JSON schema of the answer")
        return {"json_schema": schema}
    raise invalid("response_format", 'must be {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                  '"json_schema": {"name", "schema", "strict"}}')


def logprobs_of(body, chat):
    """/execute's `logprobs` (how many likeliest tokens beside each) from OpenAI's fields: chat's
    `logprobs: true` and `top_logprobs`, the legacy completions' `logprobs: N`."""
    if chat:
        if body.get("logprobs") is not True:
            return {}
        return {"logprobs": number_field(body, "top_logprobs", 0, 0, 20, integer=True)}
    if body.get("logprobs") is None:
        return {}
    return {"logprobs": number_field(body, "logprobs", 0, 0, 5, integer=True)}


def openai_logprobs(pieces, chat):
    """The `logprobs` of a choice for these Tokens, in the shape of chat or of legacy completions."""
    entries = [e for piece in pieces for e in piece.logprobs or ()]
    if chat:
        return {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"], "top_logprobs": [
            {"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"]} for t in e["top"]]} for e in entries],
            "refusal": None}
    offsets = list(itertools.accumulate([0] + [len(e["token"]) for e in entries]))[:-1]
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top"]} for e in entries], "text_offset": offsets}


def shortened(answer, dimensions):
    """A worker's /embed vectors cut to their first `dimensions` and normalised again (what a
    Matryoshka-trained model allows; OpenAI's and Ollama's `dimensions`), or as they are (None)."""
    if dimensions is None:
        return answer["embeddings"]
    if dimensions > answer["dimensions"]:
        raise invalid("dimensions", "is more than the model's %d" % answer["dimensions"])
    cut = [v[:dimensions] for v in answer["embeddings"]]
    return [[x / norm for x in v] if norm else v for v, norm in ((v, sum(x * x for x in v) ** 0.5) for v in cut)]


class OpenAIApi:
    """OpenAI's API on the queen: chat and legacy completions, streamed as llama.cpp's server
    streams them, and the models every reachable node has."""

    def __init__(self, scheduler, models, metrics):
        self.scheduler = scheduler        #: gives each request its worker
        self.models = models              #: the models the apps name
        self.metrics = metrics            #: counts the requests

    def routes(self):
        return ((OPENAI_CHAT, self.chat), (OPENAI_CHAT_BARE, self.chat),
                (OPENAI_COMPLETIONS, self.completions), (OPENAI_COMPLETIONS_BARE, self.completions),
                (OPENAI_MODELS, self.list_models), (OPENAI_MODELS_BARE, self.list_models),
                (OPENAI_MODEL, self.model), (OPENAI_MODEL_BARE, self.model),
                (OPENAI_EMBEDDINGS, self.embeddings), (OPENAI_EMBEDDINGS_BARE, self.embeddings))

    def chat(self, req):
        body = req.json
        job = dict(sampling_of(body), messages=body.get("messages"))
        if job["messages"] is None:
            raise invalid("messages", "is required")
        job.update({k: body[k] for k in ("tools", "tool_choice", "parallel_tool_calls") if body.get(k) is not None})
        job.update(response_format_of(body.get("response_format")))
        self._answer(req, body, job, "chat.completion", "chatcmpl-")

    def completions(self, req):
        body = req.json
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        job = dict(sampling_of(body), prompt=prompt, raw=True)
        if body.get("suffix") is not None:   # fill-in-the-middle, with the model's FIM tokens
            job["suffix"] = body["suffix"]
        self._answer(req, body, job, "text_completion", "cmpl-")

    def _answer(self, req, body, job, kind, id_prefix):
        if body.get("n", 1) != 1:
            raise invalid("n", "only 1 is supported")
        chat = kind == "chat.completion"
        stream_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        job["max_tokens"] = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_N_CTX
        job.update(logprobs_of(body, chat))
        # (rbee's extensions: the context its worker must hold at least, its KV cache's types)
        job.update({k: body[k] for k in ("ctx_size", "cache_type_k", "cache_type_v") if body.get(k) is not None})
        with AppJob(self.scheduler, self.metrics, self.models.named(body.get("model")), job, None).open() as app:
            answer = {"id": id_prefix + random_id(12), "object": kind, "created": int(time.time()),
                      "model": body["model"], "system_fingerprint": "rbee-" + __version__}
            if not body.get("stream"):
                pieces = [p for p in app.pieces() if isinstance(p, Token)]
                text = "".join(p.text for p in pieces)
                calls = [{"id": c["id"], "type": "function", "function": {
                    "name": c["name"], "arguments": c["arguments"]}} for c in app.tool_calls()]
                message = dict({"role": "assistant", "content": text if text or not calls else None},
                               **({"tool_calls": calls} if calls else {}))
                result = dict({"message": message} if chat else {"text": text}, index=0,
                              logprobs=openai_logprobs(pieces, chat) if "logprobs" in job else None,
                              finish_reason=app.finish_reason())
                req.send_json(200, dict(answer, choices=[result], usage=app.usage()))
                return
            stream = req.sse(OpenAIStream)
            chunk = dict(answer, object=kind + ".chunk" if chat else kind)

            def send(delta, finish=None, pieces=()):
                logprobs = openai_logprobs(pieces, chat) if pieces and "logprobs" in job else None
                stream.data(dict(chunk, choices=[dict({"delta": delta} if chat else {"text": delta}, index=0,
                                                      logprobs=logprobs, finish_reason=finish)]))
            if chat:
                send({"role": "assistant", "content": ""})
            for piece in app.pieces():
                if isinstance(piece, ToolCallDelta):
                    send({"tool_calls": [dict({"index": piece.index, "id": piece.id, "type": "function", "function": {
                        "name": piece.name, "arguments": piece.arguments}} if piece.id else {
                        "index": piece.index, "function": {"arguments": piece.arguments}})]})
                else:
                    send({"content": piece.text} if chat else piece.text, pieces=[piece])
            send({} if chat else "", app.finish_reason())
            if stream_usage:
                stream.data(dict(chunk, choices=[], usage=app.usage()))
            stream.done()

    def embeddings(self, req):
        """OpenAI's embeddings: `input` a text, a list of texts, a token list or a list of them;
        `encoding_format` float or base64 (little-endian float32, what the `openai` package asks
        for); `dimensions` keeps the first ones, normalised again. An input over the context is a 400."""
        body = req.json
        items = body.get("input")
        if isinstance(items, str) or isinstance(items, list) and items and all(
                isinstance(t, int) and not isinstance(t, bool) for t in items):
            items = [items]
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise invalid("encoding_format", 'must be "float" or "base64"')
        app = AppJob(self.scheduler, self.metrics, self.models.named(body.get("model")), {"input": items}, None)
        answer = app.embed()
        vectors = shortened(answer, number_field(body, "dimensions", None, 1, 1 << 20, integer=True))
        data = [{"object": "embedding", "index": k, "embedding": v if encoding == "float" else base64.b64encode(
            struct.pack("<%df" % len(v), *v)).decode()} for k, v in enumerate(vectors)]
        tokens = answer["prompt_tokens"]
        req.send_json(200, {"object": "list", "data": data, "model": body["model"],
                            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def list_models(self, req):
        """The models, and (rbee's own field) each node as the queen knows it: up, idle (no hive now)
        or down (with why), and how old what it says of the node's catalog is."""
        known = self.models.hives.known()
        nodes = [dict({"node": name, "state": k["state"], "age_s": k["age_s"]},
                      **({"reason": k["reason"]} if k.get("reason") else {})) for name, k in known.items()]
        req.send_json(200, {"object": "list", "data": [self._model(m) for m in self.models.listing(known)],
                            "nodes": nodes})

    def model(self, req):
        name = urllib.parse.unquote(req.params["model_id"])
        found = self.models.find(name)
        if not found:
            raise ModelNotFound("The model %r does not exist on any reachable node" % name, {"model": name},
                                "See GET /v1/models")
        req.send_json(200, self._model(found))

    @staticmethod
    def _model(m):
        return dict({"id": m["id"], "object": "model", "created": m["created"], "owned_by": "rbee",
                     "nodes": m["nodes"], "loaded_on": m["loaded_on"], "size_bytes": m["size_bytes"]},
                    **({"alias_of": m["alias_of"]} if m.get("alias_of") else {}))


# -- OpenAI's Responses API: its items as the chat messages a worker takes, its output as items ---

RESPONSE_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
RESPONSE_TEXT_PARTS = ("input_text", "output_text")


def _item_text(item, name, where, empty=False):
    """The string field `name` of an input item (`where` names the item in a 400)."""
    value = item.get(name)
    if not isinstance(value, str) or not (value or empty):
        raise invalid("%s.%s" % (where, name), "must be a %sstring" % ("" if empty else "non-empty "))
    return value


def response_text(content, where):
    """The text of a Responses message's `content`: a string, or its input_text/output_text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(where, "must be a string or a list of input_text/output_text parts")
    for k, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in RESPONSE_TEXT_PARTS or not isinstance(
                part.get("text"), str):
            raise invalid("%s[%d]" % (where, k), "must be an input_text or output_text part: the models read text only")
    return "".join(part["text"] for part in content)


def objects_in(items, field):
    """(where, item) for each item of the list `field` of a request: a 400 naming the first that is no object."""
    for k, item in enumerate(items):
        where = "%s[%d]" % (field, k)
        if not isinstance(item, dict):
            raise invalid(where, "must be an object")
        yield where, item


def response_input_messages(value, earlier=()):
    """The chat messages (the worker's shape) of a Responses `input`. A string is one user message;
    a list holds items: messages (user, assistant, system, and developer, a system message), the
    model's `function_call`s (joined to the assistant message just before them: a chat template
    wants one assistant turn with its calls), `function_call_output`s (tool messages, named after
    their call here or in `earlier`, the conversation before this input), `reasoning` (left out)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise invalid("input", "must be a string or a non-empty list of items")
    out = []
    for where, item in objects_in(value, "input"):
        kind = item.get("type", "message")
        if kind == "message":
            role = RESPONSE_ROLES.get(item.get("role"))
            if role is None:
                raise invalid(where + ".role", "must be one of %s" % ", ".join(RESPONSE_ROLES))
            out.append({"role": role, "content": response_text(item.get("content"), where + ".content")})
        elif kind == "function_call":
            call = {"id": _item_text(item, "call_id", where), "type": "function",
                    "function": {"name": _item_text(item, "name", where),
                                 "arguments": _item_text(item, "arguments", where, empty=True)}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = _item_text(item, "call_id", where)
            name = next((call["function"]["name"] for message in reversed(list(earlier) + out)
                         for call in message.get("tool_calls") or () if call["id"] == call_id), None)
            if name is None:
                raise invalid(where + ".call_id", "no function_call with call_id %r comes before it" % call_id)
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": call_id, "name": name,
                        "content": output if isinstance(output, str) else response_text(output, where + ".output")})
        elif kind != "reasoning":   # (a model's reasoning: none of rbee's models reads it back)
            raise invalid(where + ".type", "must be message, function_call or function_call_output (the models "
                          "read text only; rbee runs no hosted tool)")
    return out


def response_tools(tools):
    """The function tools of a Responses request ({type: "function", name, description, parameters,
    strict}) in the chat shape a worker takes. The hosted tools (web_search, file_search, ...), which
    rbee does not run, are left out, so that a client that offers them still gets an answer."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise invalid("tools", "must be a list of tools")
    out = []
    for where, tool in objects_in(tools, "tools"):
        if tool.get("type") != "function":
            continue
        function = {"name": _item_text(tool, "name", where)}
        if not TOOL_NAME.match(function["name"]):   # (here, where the index is the request's own)
            raise invalid(where + ".name", "must be letters, digits, _ . : - (at most 128)")
        if tool.get("description") is not None:
            function["description"] = _item_text(tool, "description", where, empty=True)
        if tool.get("parameters") is not None:
            if not isinstance(tool["parameters"], dict):
                raise invalid(where + ".parameters", "must be a JSON schema (an object)")
            function["parameters"] = tool["parameters"]
        out.append({"type": "function", "function": function})
    return out


def response_tool_choice(choice):
    """A Responses `tool_choice` as a worker takes it (None: the worker's default, auto)."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise invalid("tool_choice", "must be auto, none, required or {type: \"function\", name}")


def response_format(text):
    """The worker's fields for a Responses `text.format`: json_schema -> its schema (the answer is
    one JSON value that matches it), json_object -> the JSON grammar, text (the default) -> none."""
    if text is None:
        return {}
    if not isinstance(text, dict):
        raise invalid("text", "must be an object: {format: {type, ...}}")
    fmt = text.get("format")
    kind = fmt.get("type") if isinstance(fmt, dict) else fmt
    if kind in (None, "text"):
        return {}
    if kind == "json_object":
        return {"grammar": "json"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise invalid("text.format.schema", "must be a JSON schema (an object)")
        return {"json_schema": fmt["schema"]}
    raise invalid("text.format", "must be {type: \"text\"}, {type: \"json_object\"} or {type: \"json_schema\", "
                  "name, schema}")


def response_request(body, earlier=()):
    """A Responses request read: (the worker's /execute body, the messages its `input` adds to the
    conversation). `instructions` become a system message first, never kept for a later turn (which
    gives its own, as OpenAI has it); `earlier` is the conversation of `previous_response_id`. The
    400s name their field, OpenAI's `param`."""
    messages = response_input_messages(body.get("input"), earlier)
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise invalid("instructions", "must be a string")
    system = [{"role": "system", "content": instructions}] if instructions else []
    job = dict(sampling_of(body), messages=system + list(earlier) + messages,
               max_tokens=number_field(body, "max_output_tokens", DEFAULT_N_CTX, 1, 1 << 20, integer=True),
               parallel_tool_calls=bool_field(body, "parallel_tool_calls", False))
    tools, choice = response_tools(body.get("tools")), response_tool_choice(body.get("tool_choice"))
    if tools:
        job["tools"] = tools
    if choice is not None:
        job["tool_choice"] = choice
    job.update(response_format(body.get("text")))
    return job, messages


def response_object(body, job, store):
    """The response object of a request read by response_request, before its output: OpenAI's
    fields, the request's settings echoed (the ones rbee applies: temperature 0.8 unless given,
    parallel_tool_calls false unless given, as the worker's)."""
    fmt = (body.get("text") or {}).get("format") or {"type": "text"}
    return {"id": "resp_" + random_id(24), "object": "response", "created_at": int(time.time()),
            "status": "in_progress", "background": False, "error": None, "incomplete_details": None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": None, "model": body.get("model"), "output": [],
            "parallel_tool_calls": job["parallel_tool_calls"], "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None}, "store": store, "temperature": job["temperature"],
            "text": {"format": fmt}, "tool_choice": body.get("tool_choice") or "auto",
            "tools": [tool for tool in body.get("tools") or () if tool.get("type") == "function"],
            "top_p": body.get("top_p"), "truncation": "disabled", "usage": None, "user": None,
            "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {}}


def response_usage(usage):
    """AppJob.usage() (chat's names) in the Responses API's."""
    return {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "input_tokens_details": {"cached_tokens": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0),
                                     "cache_write_tokens": 0}}


class ResponsesStream(SSEStream):
    """The Responses API's dialect of SSE, as OpenAI writes it: `event: response.*` frames whose
    data repeats the event's `type` and numbers it (`sequence_number`, from 0); an error after the
    start is an `error` event, then `response.failed` with the response so far. No [DONE]."""

    def __init__(self, handler):
        super().__init__(handler)
        self.sequence = 0                 #: the next event's sequence_number (the request's thread alone)
        self.so_far = None                #: () -> the response so far, for response.failed (its ResponseOutput's)

    def event(self, kind, fields):
        data = dict({"type": kind, "sequence_number": self.sequence}, **fields)
        self.sequence += 1
        self.send(kind, data)

    def fail(self, err):
        error = openai_error(err)["error"]
        try:
            self.event(RESPONSE_ERROR, {"code": error["code"], "message": error["message"], "param": error["param"]})
            if self.so_far is not None:
                self.event(RESPONSE_FAILED, {"response": dict(self.so_far(), status="failed", error={
                    "code": "server_error", "message": err.message})})
        finally:
            self.close()


class ResponseOutput:
    """One response's output as the worker's pieces come (Token, ToolCallDelta): its items -- a
    message with one output_text part, a function_call per call -- and, streamed, the events that
    say so (`emit(kind, fields)`, ResponsesStream.event). An item is done when the next begins."""

    def __init__(self, response, emit=None):
        self.response = response          #: the response object (response_object), its output aside
        self.emit = emit or (lambda kind, fields: None)   #: where its events go (nowhere: not streamed)
        self.output = []                  #: the items so far, in order
        self.open = None                  #: the index in `output` of the item still growing, or None
        self.calls = {}                   #: a worker's call index -> the index of its item in `output`

    def snapshot(self, status, **fields):
        return dict(self.response, status=status, output=list(self.output), **fields)

    def start(self):
        self.emit(RESPONSE_CREATED, {"response": self.snapshot("in_progress")})
        self.emit(RESPONSE_IN_PROGRESS, {"response": self.snapshot("in_progress")})

    def feed(self, piece):
        if isinstance(piece, Token) and piece.text:
            k = self.open if self.open is not None and self.output[self.open]["type"] == "message" else self._message()
            item = self.output[k]
            item["content"][0]["text"] += piece.text
            self.emit(RESPONSE_TEXT_DELTA, {"item_id": item["id"], "output_index": k, "content_index": 0,
                                            "delta": piece.text, "logprobs": []})
        elif isinstance(piece, ToolCallDelta):
            k = self.calls.get(piece.index)
            if k is None:
                k = self.calls[piece.index] = self._add({
                    "type": "function_call", "id": "fc_" + random_id(24), "call_id": piece.id, "name": piece.name,
                    "arguments": "", "status": "in_progress"})
            elif k != self.open:   # (the worker's parser ends a call before the next begins)
                raise InternalError("A piece of tool call %d came after the next item began" % piece.index)
            item = self.output[k]
            if piece.arguments:
                item["arguments"] += piece.arguments
                self.emit(RESPONSE_ARGUMENTS_DELTA, {"item_id": item["id"], "output_index": k,
                                                     "delta": piece.arguments})

    def _message(self):
        k = self._add({"type": "message", "id": "msg_" + random_id(24), "status": "in_progress", "role": "assistant",
                       "content": []})
        part = {"type": "output_text", "text": "", "annotations": []}
        self.output[k]["content"].append(part)
        self.emit(RESPONSE_PART_ADDED, {"item_id": self.output[k]["id"], "output_index": k, "content_index": 0,
                                        "part": part})
        return k

    def _add(self, item):
        self._close("completed")
        self.output.append(item)
        self.open = len(self.output) - 1
        self.emit(RESPONSE_ITEM_ADDED, {"output_index": self.open, "item": item})
        return self.open

    def _close(self, status):
        k, self.open = self.open, None
        if k is None:
            return
        item = self.output[k]
        item["status"] = status
        if item["type"] == "message":
            part = item["content"][0]
            self.emit(RESPONSE_TEXT_DONE, {"item_id": item["id"], "output_index": k, "content_index": 0,
                                           "text": part["text"], "logprobs": []})
            self.emit(RESPONSE_PART_DONE, {"item_id": item["id"], "output_index": k, "content_index": 0, "part": part})
        else:
            self.emit(RESPONSE_ARGUMENTS_DONE, {"item_id": item["id"], "output_index": k,
                                                "arguments": item["arguments"]})
        self.emit(RESPONSE_ITEM_DONE, {"output_index": k, "item": item})

    def result(self, finish_reason, usage):
        """The whole response once the worker ended (`finish_reason` of AppJob): its last item done
        (incomplete when the answer reached max_output_tokens), an empty message if there was none."""
        incomplete = finish_reason == "length"
        if not self.output:
            self._message()
        self._close("incomplete" if incomplete else "completed")
        return self.snapshot("incomplete" if incomplete else "completed", usage=usage, completed_at=int(time.time()),
                             incomplete_details={"reason": "max_output_tokens"} if incomplete else None)

    def finish(self, response):
        """The stream's last event: the whole response (result())."""
        self.emit(RESPONSE_INCOMPLETE if response["status"] == "incomplete" else RESPONSE_COMPLETED,
                  {"response": response})

    def message(self):
        """The output as one chat message (the worker's shape), for the conversation a later turn continues."""
        text = "".join(item["content"][0]["text"] for item in self.output if item["type"] == "message")
        calls = [{"id": item["call_id"], "type": "function", "function": {"name": item["name"],
                                                                          "arguments": item["arguments"]}}
                 for item in self.output if item["type"] == "function_call"]
        return dict({"role": "assistant", "content": text if text or not calls else None},
                    **({"tool_calls": calls} if calls else {}))


KeptResponse = collections.namedtuple("KeptResponse", "at response conversation size")


class ResponseStore:
    """The responses the queen keeps (a request's `store`, true unless false): each with the whole
    conversation it ended -- the one before it, its input, its output, as chat messages (its
    `instructions` aside) -- for GET /v1/responses/{id} and a later `previous_response_id`.
    Bounded: the newest `limit`, `max_bytes` of JSON in all (each counts its whole conversation:
    the earlier messages it shares with the response before live as long as either is kept, so
    the bound holds whichever goes first), none older than `ttl` seconds; the oldest go first."""

    def __init__(self, limit=RESPONSES_KEPT, max_bytes=RESPONSES_KEPT_BYTES, ttl=RESPONSES_TTL):
        self.limit, self.max_bytes, self.ttl = limit, max_bytes, ttl   #: the bounds: count, bytes, seconds
        self.lock = threading.Lock()      #: guards both below (request threads)
        self.kept = collections.OrderedDict()   #: response id -> KeptResponse, oldest first
        self.size = 0                     #: the sizes of `kept`, summed

    def put(self, response, conversation, size):
        with self.lock:
            self.kept[response["id"]] = KeptResponse(time.monotonic(), response, conversation, size)
            self.size += size
            while self.kept and (len(self.kept) > self.limit or self.size > self.max_bytes or self._expired()):
                self.size -= self.kept.popitem(last=False)[1].size

    def get(self, response_id):
        """The KeptResponse of that id, or None (never kept, expired, deleted, or pushed out)."""
        with self.lock:
            while self._expired():
                self.size -= self.kept.popitem(last=False)[1].size
            return self.kept.get(response_id)

    def delete(self, response_id):
        """Forget one; False when it was not kept."""
        with self.lock:
            kept = self.kept.pop(response_id, None)
            if kept is not None:
                self.size -= kept.size
            return kept is not None

    def _expired(self):   # (under `lock`) is the oldest past its ttl?
        return bool(self.kept) and time.monotonic() - next(iter(self.kept.values())).at > self.ttl


class ResponsesApi:
    """OpenAI's Responses API on the queen (what Codex and the `openai` package's `responses`
    speak): its input as the chat messages a worker takes, the worker's text and tool calls as
    output items (streamed as OpenAI's `response.*` events), and the responses it keeps for
    `previous_response_id` and GET (ResponseStore)."""

    def __init__(self, scheduler, models, metrics):
        self.scheduler = scheduler        #: gives each request its worker
        self.models = models              #: the models the apps name
        self.metrics = metrics            #: counts the requests
        self.store = ResponseStore()      #: the responses kept (its own lock)

    def routes(self):
        return ((OPENAI_RESPONSES, self.create), (OPENAI_RESPONSES_BARE, self.create),
                (OPENAI_RESPONSE, self.retrieve), (OPENAI_RESPONSE_BARE, self.retrieve),
                (OPENAI_RESPONSE_DELETE, self.delete), (OPENAI_RESPONSE_DELETE_BARE, self.delete))

    def create(self, req):
        body = req.json
        if bool_field(body, "background", False):
            raise invalid("background", "is not supported: the answer comes on the request's connection (or stream)")
        keep, streamed = bool_field(body, "store", True), bool_field(body, "stream", False)
        earlier = []
        if body.get("previous_response_id") is not None:
            previous = text_field(body, "previous_response_id", limit=200)
            kept = self.store.get(previous)
            if kept is None:
                raise ResponseNotFound("Previous response with id %r not found." % previous,
                                       {"field": "previous_response_id", "response_id": previous})
            earlier = kept.conversation
        job, messages = response_request(body, earlier)
        response = response_object(body, job, keep)
        with AppJob(self.scheduler, self.metrics, self.models.named(body.get("model")), job, None).open() as app:
            stream = req.sse(ResponsesStream) if streamed else None
            output = ResponseOutput(response, stream and stream.event)
            if stream:
                stream.so_far = lambda: output.snapshot("in_progress")
            output.start()
            for piece in app.pieces():
                output.feed(piece)
            final = output.result(app.finish_reason(), response_usage(app.usage()))
        if keep:   # (before the answer leaves: a client may continue it at once)
            added = messages + [output.message()]
            # (each counts its whole conversation: its messages live as long as it does, whoever else holds them)
            self.store.put(final, earlier + added, len(json_text(final)) + len(json_text(earlier + added)))
        if stream:
            output.finish(final)
            stream.close()
        else:
            req.send_json(200, final)

    def _kept(self, response_id):
        kept = self.store.get(response_id)
        if kept is None:
            raise ResponseNotFound("Response with id %r not found." % response_id, {"response_id": response_id})
        return kept

    def retrieve(self, req):
        req.send_json(200, self._kept(req.params["response_id"]).response)

    def delete(self, req):
        response_id = self._kept(req.params["response_id"]).response["id"]
        self.store.delete(response_id)
        req.send_json(200, {"id": response_id, "object": "response", "deleted": True})


# The `template` /api/show gives a model with FIM tokens: Ollama's way of saying that a `suffix`
# is filled in (a Go template's `.Suffix`; rbee builds the prompt from the GGUF's FIM tokens),
# around the model's own chat template
OLLAMA_FIM_TEMPLATE = "{{- if .Suffix }}{{ .Prompt }}{{ .Suffix }}{{- else }}%s{{- end }}"


class OllamaApi:
    """Ollama's API on the queen, for Open WebUI and the `ollama` package."""

    def __init__(self, scheduler, hives, models, metrics):
        self.scheduler = scheduler        #: gives each request its worker
        self.hives = hives                #: the nodes' hives: what is loaded, pulls, unloads
        self.models = models              #: the models the apps name
        self.metrics = metrics            #: counts the requests

    def routes(self):
        return ((OLLAMA_ROOT, self.root), (OLLAMA_ROOT_HEAD, self.root), (OLLAMA_VERSION, self.version),
                (OLLAMA_TAGS, self.tags), (OLLAMA_PS, self.ps), (OLLAMA_SHOW, self.show), (OLLAMA_CHAT, self.chat),
                (OLLAMA_GENERATE, self.generate), (OLLAMA_PULL, self.pull), (OLLAMA_EMBED, self.embed),
                (OLLAMA_EMBEDDINGS, self.embeddings))

    def root(self, req):
        write_body(req.handler, 200, "text/plain; charset=utf-8", b"rbee is running",
                   with_body=req.handler.command != "HEAD")

    def version(self, req):
        req.send_json(200, {"version": __version__})

    def tags(self, req):
        req.send_json(200, {"models": [{
            "name": m["id"], "model": m["id"], "modified_at": iso_time(m["created"]), "size": m["size_bytes"],
            "digest": m["sha256"] or "", "details": self._details(m)} for m in self.models.listing()]})

    def ps(self, req):
        workers = self.hives.cluster()[1]
        req.send_json(200, {"models": [{
            "name": w["model_ref"], "model": w["model_ref"], "size": w["memory_mb"] << 20, "digest": "",
            "details": {"format": "gguf", "family": "", "families": None, "parameter_size": "",
                        "quantization_level": quantization_of(w["model_ref"])},
            "expires_at": iso_time(w["expires_unix"]) if w.get("expires_unix") else iso_time(
                time.time() + (10 * 365 * 86400 if w["keep_alive_s"] < 0 else max(0, w["keep_alive_s"]))),
            "size_vram": (w["memory_mb"] << 20) if w["backend"] != "cpu" else 0, "context_length": w.get("ctx_size", 0),
            "kv_cache_mb": w.get("kv_cache_mb", 0), "cache_type_k": w.get("cache_type_k"),
            "cache_type_v": w.get("cache_type_v"),
            "node": w["node"], "device": "%s:%s" % (w["backend"], w["device"])} for w in workers]})

    def show(self, req):
        """The model's GGUF metadata, read by the first node that holds it: its chat template, its
        capabilities (completion and tools, insert with FIM tokens; an embedding model: embedding),
        every number and string of its header (model_info) and the details Ollama derives from them."""
        name = req.json.get("model") or req.json.get("name")
        m = self.models.find(name)
        if not m:
            raise ModelNotFound("model %r not found" % name, {"model": name}, "See GET /api/tags")
        metadata, failed = {}, None
        for node in m["nodes"]:
            try:
                metadata = self.hives.get(node).client.model_info(m.get("alias_of") or m["id"])["metadata"]
                break
            except RbeeError as err:   # (that node went away meanwhile: the next one)
                failed = err
        else:
            if failed:
                raise failed
        template = metadata.get("tokenizer.chat_template") or ""
        if model_kind(metadata) != KIND_CHAT:
            capabilities = ["embedding"]
        else:   # (rbee gives tool calls to every model with a chat template)
            capabilities = ["completion"] + (["tools"] if template else []) + (
                ["insert"] if all(FIM_KEY % part in metadata for part in ("pre", "suf", "mid")) else [])
        if "insert" in capabilities:   # (Continue's autocomplete waits for `.Suffix` in Ollama's template)
            template = OLLAMA_FIM_TEMPLATE % template
        model_info = {k: v for k, v in metadata.items() if not k.startswith("tokenizer.chat_template")}
        model_info["rbee.nodes"] = m["nodes"]
        # the context in use: its largest running worker's, else the one it was trained for (a worker's default)
        running = [w.get("ctx_size") or 0 for w in self.hives.cluster()[1] if w["model_ref"] in (m["id"], m.get(
            "alias_of"))]
        num_ctx = max(running) if any(running) else metadata.get("%s.context_length" % metadata.get(
            "general.architecture"))
        req.send_json(200, {"modelfile": "# rbee model %s\nFROM %s\n" % (m["id"], m["id"]),
                            "parameters": "num_ctx %d" % num_ctx if num_ctx else "",
                            "template": template, "details": self._details(m, metadata),
                            "modified_at": iso_time(m["created"]), "model_info": model_info,
                            "capabilities": capabilities})

    @staticmethod
    def _details(m, metadata=None):
        """Ollama's details of a model: from its GGUF metadata where it was read, else from its file's name."""
        metadata = metadata or {}
        architecture = metadata.get("general.architecture") or ""
        return {"parent_model": "", "format": "gguf", "family": architecture,
                "families": [architecture] if architecture else None,
                "parameter_size": metadata.get("general.size_label") or "",
                "quantization_level": GGUF_FILE_TYPES.get(metadata.get("general.file_type")) or quantization_of(
                    m["filename"])}

    def chat(self, req):
        body = req.json
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise invalid("messages", "is required: a list of {role, content}")
        # (Ollama names a tool result's function `tool_name`, and gives a call's arguments as an object)
        job = {"messages": [dict(m, name=m["tool_name"]) if isinstance(m, dict) and m.get("tool_name") else m
                            for m in messages]}
        if body.get("tools"):
            job["tools"] = body["tools"]
        self._answer(req, body, job, "message")

    def generate(self, req):
        body = req.json
        prompt, suffix = body.get("prompt") or "", body.get("suffix") or ""
        for field, value in (("prompt", prompt), ("suffix", suffix)):
            if not isinstance(value, str):
                raise invalid(field, "must be a string")
        if not prompt.strip() and not suffix:   # Ollama's load (and, with keep_alive 0, unload) of a model
            return self._load(req, body)
        if suffix:   # fill-in-the-middle (Ollama's insert): the model's FIM tokens, no template (raw or not)
            job = {"prompt": prompt, "suffix": suffix}
        elif body.get("raw"):
            job = {"prompt": prompt, "raw": True}
        else:
            system = [{"role": "system", "content": body["system"]}] if body.get("system") else []
            job = {"messages": system + [{"role": "user", "content": prompt}]}
        self._answer(req, body, job, "response")

    def _answer(self, req, body, job, field):
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise invalid("options", "must be an object")
        job.update(sampling_of(options))
        predict = options.get("num_predict")
        job["max_tokens"] = predict if isinstance(predict, int) and predict > 0 else DEFAULT_N_CTX
        if options.get("num_ctx") is not None:   # (a worker of at least this context; never a cut prompt)
            job["ctx_size"] = options["num_ctx"]
        if isinstance(body.get("format"), dict):
            job["json_schema"] = body["format"]
        elif body.get("format") == "json":
            job["grammar"] = "json"
        elif body.get("format") not in (None, ""):
            raise invalid("format", 'must be "json" or a JSON schema (an object)')
        keep_alive = keep_alive_of(body, None)
        name = body.get("model")
        with AppJob(self.scheduler, self.metrics, self.models.named(name), job, keep_alive).open() as app:
            def piece(text, done=False, calls=()):
                out = {"model": name, "created_at": iso_time(), "done": done}
                out[field] = {"role": "assistant", "content": text} if field == "message" else text
                if calls:   # (as Ollama gives them: whole, the arguments an object)
                    out[field]["tool_calls"] = [{"function": {"name": c["name"], "arguments": parsed_json(
                        c["arguments"])}} for c in calls]
                if done:
                    ns = lambda a, b: int(max(0.0, (b or a) - a) * 1e9)
                    out.update(done_reason=app.finish_reason().replace("tool_calls", "stop"),   # (Ollama's word)
                               total_duration=ns(app.accepted, time.monotonic()),
                               load_duration=ns(app.accepted, app.started),
                               prompt_eval_count=app.usage()["prompt_tokens"],
                               prompt_eval_duration=ns(app.started or app.accepted, app.first_token),
                               eval_count=app.usage()["completion_tokens"],
                               eval_duration=ns(app.first_token or time.monotonic(), time.monotonic()))
                return out
            if body.get("stream") is False:
                text = "".join(app.texts())
                req.send_json(200, piece(text, True, app.tool_calls()))
                return
            stream = req.sse(NdjsonStream)
            for text in app.texts():
                stream.line(piece(text))
            if app.tool_calls():
                stream.line(piece("", calls=app.tool_calls()))
            stream.line(piece("", True))
            stream.close()

    def embed(self, req):
        """Ollama's embed: `input` a text or a list of them, `truncate` (true: an input over the
        context is cut, as Ollama does), `dimensions`, `keep_alive`."""
        body = req.json
        items = body.get("input")
        truncate = body.get("truncate", True)
        job = {"input": [items] if isinstance(items, str) else items, "truncate": truncate}
        app = AppJob(self.scheduler, self.metrics, self.models.named(body.get("model")), job, keep_alive_of(body, None))
        answer = app.embed()
        ns = int((time.monotonic() - app.accepted) * 1e9)
        req.send_json(200, {"model": body["model"], "embeddings": shortened(answer, number_field(
            body, "dimensions", None, 1, 1 << 20, integer=True)), "total_duration": ns,
            "load_duration": max(0, ns - int(answer.get("duration_ms", 0) * 1e6)),
            "prompt_eval_count": answer["prompt_tokens"]})

    def embeddings(self, req):
        """Ollama's older embeddings: `prompt` -> `embedding` (normalised, as /api/embed's)."""
        body = req.json
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise invalid("prompt", "must be a string")
        app = AppJob(self.scheduler, self.metrics, self.models.named(body.get("model")),
                     {"input": [prompt], "truncate": True}, keep_alive_of(body, None))
        req.send_json(200, {"embedding": app.embed()["embeddings"][0]})

    def _load(self, req, body):
        ref, keep_alive = self.models.named(body.get("model")), keep_alive_of(body, None)
        if keep_alive == 0:
            for w in self.hives.cluster()[1]:
                if w["model_ref"] == ref.text:
                    with contextlib.suppress(WorkerNotFound):   # (gone meanwhile)
                        self.hives.get(w["node"]).client.shutdown_worker(w["worker_id"])
            reason = "unload"
        else:
            self.scheduler.release(self.scheduler.assign(ref, _current_sink(), keep_alive=keep_alive).handout)
            reason = "load"   # (a load is no request: it leaves no load on the worker)
        req.send_json(200, {"model": body["model"], "created_at": iso_time(), "response": "", "done": True,
                            "done_reason": reason})

    def pull(self, req):
        body = req.json
        ref = model_ref_of(dict(body, model=body.get("model") or body.get("name")))
        node = text_field(body, "node", AUTO_NODE, limit=200)   # (rbee's own field: the node to pull to)
        node = self.scheduler.node_for(ref, _current_sink()) if node == AUTO_NODE else self.hives.nodes.resolve(
            node)["node_name"]
        stream = req.sse(NdjsonStream) if body.get("stream", True) is not False else None

        def progress(event):   # the hive's download events, as Ollama's pull statuses
            state = download_state(event)
            if stream is None:
                return
            if state and event.get("action") == "download_start":
                stream.line({"status": "pulling %s" % state.file})
            elif state:
                stream.line({"status": "pulling %s" % state.file, "digest": "", "total": state.total,
                             "completed": state.done})
            elif event.get("action") == "download_done":
                stream.line({"status": "verifying sha256 digest"})
        if stream:
            stream.line({"status": "pulling manifest"})
        session = self.hives.get(node)
        with session.listening(progress):
            session.client.download(ref.text, progress)
        if stream:
            stream.line({"status": "success"})
            stream.close()
        else:
            req.send_json(200, {"status": "success"})


LLAMACPP_STOP_TYPE = {"eos": "eos", "max_tokens": "limit", "stop": "word"}   # a worker's stop_reason, in its words


class RerankApi:
    """Reranking on the queen, /v1/rerank and /rerank, in the shape Jina's and Cohere's clients send
    and llama.cpp's server answers (Open WebUI's external reranker is one of them): `documents` texts
    or objects with a `text`, `top_n`, `return_documents`; `results` with each document's `index` and
    `relevance_score` (the reranker's raw score, as llama.cpp's), best first."""

    def __init__(self, scheduler, models, metrics):
        self.scheduler = scheduler        #: gives each request its worker
        self.models = models              #: the models the apps name
        self.metrics = metrics            #: counts the requests

    def routes(self):
        return ((RERANK, self.rerank), (RERANK_BARE, self.rerank))

    def rerank(self, req):
        """Every document scored on a worker of the model, then sorted (equal scores in the documents'
        order) and cut to `top_n`; each result carries its document unless `return_documents` is false
        (Jina's default: true; llama.cpp's server never does). A document too long for the model's
        context is cut, as Jina and Cohere do."""
        body = req.json
        documents = body.get("documents")
        if isinstance(documents, list):
            documents = [d["text"] if isinstance(d, dict) and isinstance(d.get("text"), str) else d for d in documents]
        query, documents, _ = rerank_request({"query": body.get("query"), "documents": documents})
        top_n = number_field(body, "top_n", None, 1, 1 << 31, integer=True)
        return_documents = body.get("return_documents", True)
        if not isinstance(return_documents, bool):
            raise invalid("return_documents", "must be true or false")
        app = AppJob(self.scheduler, self.metrics, self.models.named(body.get("model")),
                     {"query": query, "documents": documents, "truncate": True}, None)
        answer = app.rerank()
        scores = answer["scores"]
        ranked = sorted(range(len(documents)), key=lambda k: -scores[k])[:top_n]
        results = [dict({"index": k, "relevance_score": scores[k]},
                        **({"document": {"text": documents[k]}} if return_documents else {})) for k in ranked]
        tokens = answer["prompt_tokens"]
        req.send_json(200, {"id": "rerank-" + random_id(12), "object": "list", "model": body["model"],
                            "results": results, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


class LlamaCppApi:
    """llama.cpp's server's own fill-in-the-middle route, /infill (what llama.vim and llama.vscode
    call), on the queen: answered in the shape of llama.cpp's /completion, streamed or not."""

    def __init__(self, scheduler, models, metrics):
        self.scheduler = scheduler        #: gives each request its worker
        self.models = models              #: the models the apps name
        self.metrics = metrics            #: counts the requests

    def routes(self):
        return ((LLAMACPP_INFILL, self.infill),)

    def infill(self, req):
        """input_prefix and prompt (the text before the cursor: llama.cpp's server puts `prompt` right
        after the prefix), input_suffix, input_extra ([{filename, text}]: other files) as the worker's
        prompt, suffix and extra; n_predict (absent or negative: the slot's context), stop and sampling."""
        body = req.json
        texts = {name: body.get(name) or "" for name in ("input_prefix", "prompt", "input_suffix")}
        for name, value in texts.items():
            if not isinstance(value, str):
                raise invalid(name, "must be a string")
        predict = body.get("n_predict")
        job = dict(sampling_of(body), prompt=texts["input_prefix"] + texts["prompt"], suffix=texts["input_suffix"],
                   extra=body.get("input_extra") or [], max_tokens=predict if isinstance(predict, int) and not
                   isinstance(predict, bool) and predict > 0 else DEFAULT_N_CTX)
        name = body.get("model")
        with AppJob(self.scheduler, self.metrics, self.models.named(name), job, None).open() as app:
            if not body.get("stream"):
                req.send_json(200, self._completion(app, name, "".join(app.texts())))
                return
            stream = req.sse(OpenAIStream)   # (`data: {json}` frames, without OpenAI's [DONE])
            for text in app.texts():
                stream.data({"index": 0, "content": text, "tokens": [], "stop": False})
            stream.data(self._completion(app, name, ""))
            stream.close()

    @staticmethod
    def _completion(app, model, content):
        """The last (or only) answer of llama.cpp's /completion: the text and how the job went."""
        stats, usage = app.stats, app.usage()
        return {"index": 0, "content": content, "tokens": [], "id_slot": -1, "stop": True, "model": model,
                "tokens_predicted": usage["completion_tokens"], "tokens_evaluated": usage["prompt_tokens"],
                "has_new_line": "\n" in content, "truncated": False, "stopping_word": "",
                "stop_type": LLAMACPP_STOP_TYPE.get(stats.get("stop_reason"), "none"),
                "timings": {"prompt_n": usage["prompt_tokens"], "prompt_ms": stats.get("prompt_eval_ms", 0.0),
                            "predicted_n": usage["completion_tokens"], "predicted_ms": stats.get("decode_time_ms", 0.0),
                            "predicted_per_second": stats.get("tokens_per_sec", 0.0)}}


# -- Anthropic's Messages API -------------------------------------------------------------------

ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
                         503: "overloaded_error", 504: "timeout_error"}
ANTHROPIC_DEFAULT_TEMPERATURE = 1.0     # Anthropic's default (OpenAI's path takes llama.cpp's 0.8)
ANTHROPIC_TOOL_ID = "toolu_"           # Anthropic's tool-call ids begin so (a worker's id follows)
ANTHROPIC_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")   # Anthropic's rule for a tool's name
ANTHROPIC_MAX_STOPS = 16                # stop_sequences the worker takes (its `stop`)


def anthropic_error(err):
    """An RbeeError in Anthropic's shape: {"type": "error", "error": {type, message}}."""
    kind = ANTHROPIC_ERROR_TYPES.get(err.status, "invalid_request_error" if err.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


class AnthropicStream(SSEStream):
    """Anthropic's dialect of SSE: `event: NAME` frames whose data is `{"type": NAME, ...}`,
    `ping` events as keep-alives; an error after the start is an `error` event with its error body."""

    ping_frame = b'event: ping\ndata: {"type": "ping"}\n\n'

    def event(self, name, data=None):
        self.send(name, dict({"type": name}, **(data or {})))

    def fail(self, err):
        self.finish("error", anthropic_error(err))


def anthropic_tool_id(worker_id):
    """A worker's tool-call id as Anthropic's clients know one: toolu_ and the worker's id as it is
    (call_..., or a Mistral call's 9 letters and digits, which its template wants back exactly)."""
    return ANTHROPIC_TOOL_ID + worker_id


def worker_tool_id(anthropic_id):
    """The worker's id of a tool_use (or of a tool_result's tool_use_id) a client sends back: a
    toolu_ID is ID, the inverse of anthropic_tool_id; any other id stays as it is (within one
    request an assistant's call and its result agree either way)."""
    return anthropic_id[len(ANTHROPIC_TOOL_ID):] if anthropic_id.startswith(ANTHROPIC_TOOL_ID) else anthropic_id


def anthropic_text(content, where):
    """The text of a `system`, or of a tool_result's `content`: a string, or text blocks joined by
    blank lines (their cache_control and citations mean nothing here)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text"
                                         and isinstance(b.get("text"), str) for b in content):
        return "\n\n".join(b["text"] for b in content)
    raise invalid(where, 'must be a string or a list of {type: "text", text} blocks: this model reads text only')


def anthropic_messages(body):
    """Anthropic's `system` and `messages` as the worker's conversation (OpenAI's chat shape, the
    contract): a user's text blocks are one user message, each tool_result a `tool` message (its
    tool_call_id, its tool's name), an assistant's tool_use blocks its `tool_calls` (the input object
    as the arguments). Thinking blocks of earlier turns are left out; images and documents are a 400."""
    out = []
    if body.get("system") is not None:
        system = anthropic_text(body["system"], "system")
        if system:
            out.append({"role": "system", "content": system})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) > 1024:
        raise invalid("messages", "must be a non-empty list of at most 1024 {role, content} objects")
    names = {}   # a tool_use's id -> its tool's name (a tool message names its function)
    for k, message in enumerate(messages):
        where = "messages[%d]" % k
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise invalid(where, 'must be an object whose role is "user" or "assistant"')
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise invalid(where + ".content", "must be a string or a list of content blocks")
        texts, calls = [], []
        for j, block in enumerate(content):
            at = "%s.content[%d]" % (where, j)
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                continue   # another model's reasoning in an earlier turn: nothing this one can read
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str) or not isinstance(
                        block.get("input"), dict):
                    raise invalid(at, "a tool_use block needs an id, a name and an input object")
                names[block["id"]] = block["name"]
                calls.append({"id": worker_tool_id(block["id"]), "type": "function",
                              "function": {"name": block["name"], "arguments": block["input"]}})
            elif kind == "tool_result" and role == "user":
                if not isinstance(block.get("tool_use_id"), str):
                    raise invalid(at + ".tool_use_id", "is required: the id of the tool_use it answers")
                if texts:   # (text before a result stays before it)
                    out.append({"role": "user", "content": "\n\n".join(texts)})
                    texts = []
                result = anthropic_text(block.get("content", ""), at + ".content")
                result = "Error: " + result if block.get("is_error") is True else result
                out.append(dict({"role": "tool", "tool_call_id": worker_tool_id(block["tool_use_id"]),
                                 "content": result}, **({"name": names[block["tool_use_id"]]}
                                                        if block["tool_use_id"] in names else {})))
            else:
                raise invalid(at, "must be a text block%s: this model reads text only" % (
                    " or a tool_use block" if role == "assistant" else " or a tool_result block"))
        if role == "assistant":
            out.append(dict({"role": "assistant", "content": "\n\n".join(texts) if texts or not calls else None},
                            **({"tool_calls": calls} if calls else {})))
        elif texts or not content:
            out.append({"role": "user", "content": "\n\n".join(texts)})
    return out


def anthropic_tools(body):
    """Anthropic's `tools` and `tool_choice` as the worker's tools, tool_choice and
    parallel_tool_calls (the contract): any is "required", tool the named function, none "none";
    parallel calls unless disable_parallel_tool_use. Only client tools (no server tools)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if choice is not None and (not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool",
                                                                                           "none")):
        raise invalid("tool_choice", 'must be {"type": "auto" | "any" | "tool" | "none"}')
    if not tools:
        if tools is not None and not isinstance(tools, list):
            raise invalid("tools", "must be a list of {name, description, input_schema}")
        if choice is not None and choice["type"] in ("any", "tool"):
            raise invalid("tool_choice", "needs tools to choose from")
        return {}
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise invalid("tools", "must be a list of at most %d {name, description, input_schema}" % MAX_TOOLS)
    functions = []
    for k, tool in enumerate(tools):
        at = "tools[%d]" % k
        if not isinstance(tool, dict) or tool.get("type", "custom") not in ("custom", None):
            raise invalid(at, "must be a tool of your own {name, description, input_schema}: rbee has no server "
                          "tools (%s)" % (tool.get("type") if isinstance(tool, dict) else "no object"))
        if not isinstance(tool.get("name"), str) or not ANTHROPIC_TOOL_NAME.match(tool["name"]):
            raise invalid(at + ".name", "must be 1 to 128 letters, digits, _ or -")
        if not isinstance(tool.get("input_schema"), dict):
            raise invalid(at + ".input_schema", "is required: the JSON schema of the tool's input (an object)")
        if not isinstance(tool.get("description", ""), str):
            raise invalid(at + ".description", "must be a string")
        function = {"name": tool["name"], "parameters": tool["input_schema"]}
        if tool.get("description"):
            function["description"] = tool["description"]
        functions.append({"type": "function", "function": function})
    choice = choice or {"type": "auto"}
    if not isinstance(choice.get("disable_parallel_tool_use", False), bool):
        raise invalid("tool_choice.disable_parallel_tool_use", "must be true or false")
    if choice["type"] == "tool":
        if choice.get("name") not in [t["name"] for t in tools]:
            raise invalid("tool_choice.name", "must name one of the tools")
        tool_choice = {"type": "function", "function": {"name": choice["name"]}}
    else:
        tool_choice = {"auto": "auto", "any": "required", "none": "none"}[choice["type"]]
    return {"tools": functions, "tool_choice": tool_choice,
            "parallel_tool_calls": not choice.get("disable_parallel_tool_use", False)}


def anthropic_job(body, count_only=False):
    """The worker's /execute body (the contract) for an Anthropic Messages request; `count_only`:
    for count_tokens, the conversation and the tools alone. max_tokens is required, as Anthropic's;
    beyond a slot's context it is the context (Claude Code asks for 32000). `output_config.format`
    (a JSON schema) is the worker's json_schema; `output_config.effort` means nothing here."""
    job = dict({"messages": anthropic_messages(body)}, **anthropic_tools(body))
    if count_only:
        return job
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise invalid("max_tokens", "is required: the most tokens to generate (a positive integer)")
    job.update(max_tokens=min(max_tokens, DEFAULT_N_CTX), temperature=body.get("temperature",
                                                                              ANTHROPIC_DEFAULT_TEMPERATURE))
    for name in ("top_p", "top_k"):
        if body.get(name) is not None:
            job[name] = body[name]
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or len(stops) > ANTHROPIC_MAX_STOPS or not all(
                isinstance(s, str) and s for s in stops):
            raise invalid("stop_sequences", "must be a list of at most %d non-empty strings" % ANTHROPIC_MAX_STOPS)
        if stops:
            job["stop"] = stops
    if not isinstance(body.get("stream", False), bool):
        raise invalid("stream", "must be true or false")
    output = body.get("output_config") or {}
    if not isinstance(output, dict):
        raise invalid("output_config", "must be an object")
    if output.get("format") is not None:   # structured outputs: the answer is JSON that matches the schema
        if not isinstance(output["format"], dict) or output["format"].get("type") != "json_schema" or not isinstance(
                output["format"].get("schema"), dict):
            raise invalid("output_config.format", 'must be {"type": "json_schema", "schema": {...}}')
        job["json_schema"] = output["format"]["schema"]
    return job


def anthropic_stop(stats, stop_sequences):
    """(stop_reason, stop_sequence) of Anthropic for a worker's end event: tool_use when it called
    tools, max_tokens, stop_sequence when one of the request's `stop_sequences` ended it (the
    worker's `stop_sequence`), else end_turn (its end of turn, or a stop of its chat template)."""
    reason = stats.get("stop_reason")
    if reason == "tool_calls":
        return "tool_use", None
    if reason == "max_tokens":
        return "max_tokens", None
    if reason == "stop" and stats.get("stop_sequence") in (stop_sequences or ()):
        return "stop_sequence", stats["stop_sequence"]
    return "end_turn", None


class AnthropicContent:
    """An answer's content blocks, built from the worker's pieces as they come (text, then a
    tool_use block per call; text again after a call starts a new block), and each step as the
    events of Anthropic's stream. The whole answer and the stream are made by the same steps."""

    def __init__(self):
        self.blocks = []                  #: the content blocks so far (a tool_use's input as its JSON text)
        self.block_of_call = {}           #: a worker's call index -> the index of its block
        self.open = None                  #: the index of the block being written (None: none)

    def add(self, piece):
        """A Token or a ToolCallDelta of AppJob.pieces(): the stream's events it makes."""
        if isinstance(piece, Token):
            return self.text(piece.text)
        return self.tool_call(piece.index, piece.id, piece.name, piece.arguments)

    def text(self, text):
        if not text:
            return []
        events = [] if self.open is not None and self.blocks[self.open]["type"] == "text" else self._start(
            {"type": "text", "text": ""})
        self.blocks[self.open]["text"] += text
        return events + [("content_block_delta", {"index": self.open, "delta": {"type": "text_delta", "text": text}})]

    def tool_call(self, index, call_id, name, arguments):
        """A call's first delta (with its id and name) starts its block; every fragment of its
        arguments is an input_json_delta of that block."""
        events = []
        if call_id is not None:
            events = self._start({"type": "tool_use", "id": anthropic_tool_id(call_id), "name": name, "input": {}})
            self.block_of_call[index] = self.open
            self.blocks[self.open]["input"] = ""
        block = self.block_of_call.get(index)
        if block is None:
            raise InternalError("The worker sent arguments of tool call %r before its name" % index)
        if arguments:
            self.blocks[block]["input"] += arguments
            events.append(("content_block_delta", {"index": block, "delta": {"type": "input_json_delta",
                                                                             "partial_json": arguments}}))
        return events

    def _start(self, block):
        events = self.finish()
        self.blocks.append(block)
        self.open = len(self.blocks) - 1
        return events + [("content_block_start", {"index": self.open, "content_block": dict(block)})]

    def finish(self):
        """The events that close the open block (the answer's end, or another block's start)."""
        if self.open is None:
            return []
        events, self.open = [("content_block_stop", {"index": self.open})], None
        return events

    def content(self):
        """The content of the whole answer: the blocks, each tool_use's input an object."""
        out = []
        for block in self.blocks:
            if block["type"] == "tool_use":
                arguments = parsed_json(block["input"] or "{}")
                # a call the model wrote badly (unconstrained, or cut by max_tokens) is no tool_use:
                # what it wrote stays, as text
                block = dict(block, input=arguments) if isinstance(arguments, dict) else {
                    "type": "text", "text": "%s(%s)" % (block["name"], block["input"])}
            out.append(block)
        return out


class AnthropicApi:
    """Anthropic's Messages API on the queen (what the `anthropic` package and Claude Code call):
    a message, whole or streamed as Anthropic streams it, with tools; and the count of its tokens."""

    def __init__(self, scheduler, models, metrics):
        self.scheduler = scheduler        #: gives each request its worker
        self.models = models              #: the models the apps name (aliases: a Claude model's name)
        self.metrics = metrics            #: counts the requests

    def routes(self):
        return ((ANTHROPIC_MESSAGES, self.messages), (ANTHROPIC_COUNT_TOKENS, self.count_tokens))

    def messages(self, req):
        body = req.json
        job = anthropic_job(body)
        with AppJob(self.scheduler, self.metrics, self.models.named(body.get("model")), job, None).open() as app:
            message = {"id": "msg_" + random_id(12), "type": "message", "role": "assistant", "model": body["model"]}
            content = AnthropicContent()
            if not body.get("stream"):
                for piece in app.pieces():
                    content.add(piece)
                req.send_json(200, dict(message, content=content.content(), **self._ending(app, job)))
                return
            stream = req.sse(AnthropicStream)
            # (the prompt's tokens are known at the end: message_delta's usage has them, as the SDKs read it)
            stream.event("message_start", {"message": dict(message, content=[], stop_reason=None, stop_sequence=None,
                                                           usage={"input_tokens": 0, "output_tokens": 0})})
            stream.event("ping")
            for piece in app.pieces():
                for name, data in content.add(piece):
                    stream.event(name, data)
            for name, data in content.finish():
                stream.event(name, data)
            ending = self._ending(app, job)
            stream.event("message_delta", {"delta": {"stop_reason": ending["stop_reason"],
                                                     "stop_sequence": ending["stop_sequence"]},
                                           "usage": ending["usage"]})
            stream.event("message_stop")
            stream.close()

    @staticmethod
    def _ending(app, job):
        """How the ended job's answer ends: stop_reason, stop_sequence, usage."""
        stop_reason, stop_sequence = anthropic_stop(app.stats, job.get("stop"))
        usage = app.usage()
        cached = usage["prompt_tokens_details"]["cached_tokens"]   # (Anthropic counts them apart from input_tokens)
        return {"stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": {"input_tokens": usage["prompt_tokens"] - cached, "cache_read_input_tokens": cached,
                          "cache_creation_input_tokens": 0, "output_tokens": usage["completion_tokens"]}}

    def count_tokens(self, req):
        body = req.json
        app = AppJob(self.scheduler, self.metrics, self.models.named(body.get("model")),
                     anthropic_job(body, count_only=True), None)
        req.send_json(200, {"input_tokens": app.count_tokens()})


# ============================================================================================
# The queen itself: the front -- its routes, keys, CORS, status, the keeper's /v2 API, its life
# ============================================================================================

class Queen(App):
    """The orchestrator (PROTOCOL.md §5.3): the keeper's /v2 API, and on the same port the apps'
    APIs (§13), the page and /metrics. It holds the parts that do the work: the hives, the
    scheduler, the apps' APIs, the metrics and the live feed."""

    component = ACTOR_QUEEN

    def __init__(self, args):
        self.args = args                  #: the command line
        #: the key every caller but /health must send (None: a loopback queen without one)
        self.api_key = role_secret(self.component, args.api_key_file, ENV_API_KEY, "api-key", args.host)
        self.nodes = NodeRegistry()       #: beehives.db (read on every task: the CLI writes it)
        self.hives = Hives(self.nodes, random_id(24), args.keep_alive)   #: a hive per node, started on demand
        #: which worker serves each request: placement, replicas, eviction, splits
        self.scheduler = Scheduler(self.hives, self.nodes,
                                   SchedulerSettings(args.keep_alive, args.max_queue, args.max_replicas, WorkerContext(
                                       args.ctx_size, args.cache_type_k, args.cache_type_v), args.kv_split))
        self.metrics = Metrics()          #: /metrics: the apps' requests (its own lock)
        self.feed = EventFeed()           #: /v2/events: every narration the queen sees (its own lock)
        _taps.append(self.feed.publish)
        models = AppModels(self.scheduler, self.hives)
        self.openai = OpenAIApi(self.scheduler, models, self.metrics)              #: OpenAI's API
        self.responses = ResponsesApi(self.scheduler, models, self.metrics)       #: OpenAI's Responses API
        self.ollama = OllamaApi(self.scheduler, self.hives, models, self.metrics)   #: Ollama's API
        self.llamacpp = LlamaCppApi(self.scheduler, models, self.metrics)          #: llama.cpp's /infill
        self.anthropic = AnthropicApi(self.scheduler, models, self.metrics)        #: Anthropic's Messages API
        self.reranking = RerankApi(self.scheduler, models, self.metrics)           #: reranking (Jina's, Cohere's shape)
        #: what answers without the key
        self.open_routes = (self.health, self.ollama.root, self.ollama.version, self.serve_ui)
        super().__init__((
            (QUEEN_HEALTH, self.health), (QUEEN_TASKS, self.task), (QUEEN_WORKERS, self.list_workers),
            (QUEEN_WORKER_SHUTDOWN, self.shutdown_worker), (QUEEN_MODELS, self.list_models),
            (QUEEN_DOWNLOAD, self.download_model), (QUEEN_REMOVE, self.remove_model), (QUEEN_STATUS, self.status),
            (QUEEN_SHUTDOWN, self.shutdown_request), (QUEEN_METRICS, self.serve_metrics),
            (QUEEN_UI, self.serve_ui), (QUEEN_EVENTS, self.events)) + self.openai.routes() + self.responses.routes()
            + self.ollama.routes() + self.llamacpp.routes() + self.anthropic.routes() + self.reranking.routes())

    def authorize(self, req, handler):
        if self.api_key is not None and handler not in self.open_routes:
            req.require_bearer(self.api_key, x_api_key=True)   # (Anthropic's clients send x-api-key)

    def error_body(self, path, err):
        """Each API's errors in its own shape: Anthropic's, OpenAI's, Ollama's `{"error": "..."}`, rbee's envelope."""
        if path.startswith(ANTHROPIC_PATHS):
            return anthropic_error(err)
        if path.startswith(OPENAI_PATHS):
            return openai_error(err)
        if path == OLLAMA_ROOT[1] or path.startswith(OLLAMA_PATHS):
            return {"error": err.message}
        return err.envelope()

    def cors_origin(self, handler):
        """The request's Origin when `--cors-origin` allows it (else None)."""
        origin = handler.headers.get("Origin") if getattr(handler, "headers", None) else None
        allowed = self.args.cors_origin or ()
        return origin if origin and (origin in allowed or "*" in allowed) else None

    def extra_headers(self, handler):
        origin = self.cors_origin(handler)
        return (("Access-Control-Allow-Origin", origin), ("Vary", "Origin")) if origin else ()

    def dispatch(self, handler):
        if handler.command == "OPTIONS" and self.cors_origin(handler):   # a browser's preflight
            handler.send_response(204)
            handler.send_header("Access-Control-Allow-Methods", "GET, POST, DELETE, HEAD, OPTIONS")
            handler.send_header("Access-Control-Allow-Headers", handler.headers.get(
                "Access-Control-Request-Headers") or "Authorization, Content-Type")
            handler.send_header("Access-Control-Max-Age", "600")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        super().dispatch(handler)

    # -- the keeper's API (/v2) -------------------------------------------------------------------

    def health(self, req):
        req.send_json(200, {"status": "ok", "version": __version__, "key_required": self.api_key is not None})

    def node_of(self, body_or_query):
        """The registered node a request names (`node`, default localhost): 400 for a wrong type,
        404 NODE_NOT_FOUND for one nobody registered, both before any stream starts."""
        node = text_field(body_or_query, "node", LOCAL_NODE, limit=200)
        self.nodes.resolve(node)
        return node

    def task(self, req):
        """A worker for the task: on its `node`, or (none, or "auto") wherever the scheduler places it."""
        body = req.json
        node = text_field(body, "node", AUTO_NODE, limit=200)
        ref = self.nodes.model_ref(body.get("model"))
        backend, device = backend_and_device(body)
        if backend is not None:
            import backends
            backends.get(backend)   # an unknown name: BACKEND_UNAVAILABLE before the stream starts
        if "device" not in body:
            device = None   # (any device of the chosen backend)
        parallel = parallel_of(body)
        context = context_of(body, self.scheduler.settings.context)
        keep_alive = keep_alive_of(body, None)   # (None: the hive's, which is this queen's --keep-alive)
        nodes = self.hives.candidates() if node == AUTO_NODE else [self.nodes.resolve(node)["node_name"]]
        failed = body.get("exclude") or []   # (a keeper's failover: the nodes that failed its task)
        if not isinstance(failed, list) or not all(isinstance(n, str) for n in failed):
            raise invalid("exclude", "must be a list of node names")
        if failed:
            nodes = [n for n in nodes if n in self.hives.others(failed)]
        if not nodes:
            raise NodeLost("No node is left for the task: %s failed it" % ", ".join(failed), {"nodes": failed},
                           "Run it again once a node answers: rbee.py status")
        split = body.get("split")
        if split is not None:
            if not isinstance(split, list) or not 2 <= len(split) <= 16 or len(set(map(str, split))) != len(split):
                raise invalid("split", "must name 2 to 16 different nodes")
            split = [self.nodes.resolve(text_field({"node": n}, "node", limit=200))["node_name"] for n in split]
        stream = req.sse()   # (NODE_NOT_FOUND and every 400 before the stream starts)
        with narration_to(stream.narration):
            session, worker, _, _ = self.scheduler.assign(ref, stream.narration, nodes, backend, device, parallel,
                                                          keep_alive, split, task=True, context=context,
                                                          named=node != AUTO_NODE)
        timings = dict(session.timings, **(worker.get("timings") or {}))
        session.timings = {}   # the hive start is paid once
        stream.finish(EVENT_WORKER, {"worker_id": worker["worker_id"], "worker_url": session.worker_url(worker["url"]),
                                     "api_key": worker["api_key"], "node": session.name,
                                     "backend": worker.get("backend"), "device": worker.get("device"),
                                     "model_ref": ref.text, "timings": timings, "split": worker.get("split")})

    def list_workers(self, req):
        """Workers of the running hives (a node without a hive has none: nothing is started)."""
        name, workers, errors = req.query.get("node"), [], []
        for session in self.hives.running():
            if name in (None, session.name):
                try:
                    workers += self.hives.workers_of(session)
                except RbeeError as err:   # one unreachable hive does not hide the others
                    errors.append(dict(err.envelope()["error"], node=session.name))
        req.send_json(200, {"workers": workers, "errors": errors})

    def shutdown_worker(self, req):
        body = req.json
        node, worker_id = self.node_of(body), text_field(body, "worker_id", limit=200)
        session = self.hives.running_on(node)
        if session is None:
            raise WorkerNotFound("No worker %s: no hive runs on %s" % (worker_id, node),
                                 {"node": node, "worker_id": worker_id})
        req.send_json(202, session.client.shutdown_worker(worker_id))

    def list_models(self, req):
        req.send_json(200, {"models": self.hives.get(self.node_of(req.query)).client.models()})

    def download_model(self, req):
        body = req.json
        ref, node = model_ref_of(body), self.node_of(body)
        stream = req.sse()
        with narration_to(stream.narration):
            session = self.hives.get(node, stream.narration)
            with session.listening(stream.narration):
                result = session.client.download(ref.text, session.tagged(stream.narration))
            self.hives.remember(node, session.client.resources())   # (what the listings say of its catalog)
        stream.finish(EVENT_END, result)

    def remove_model(self, req):
        body = req.json
        ref, node = model_ref_of(body), self.node_of(body)
        session = self.hives.get(node)
        removed = session.client.remove(ref.text)
        self.hives.remember(node, session.client.resources())   # (what the listings say of its catalog)
        req.send_json(200, removed)

    def status(self, req):
        """Nodes (with their caps), each running hive's memory, devices, workers and models, and
        every worker in one list (`rbee.py ps`). Nothing is started to answer."""
        hives, workers = self.hives.cluster()
        nodes = [dict(n, env=masked_env(n["env"]), limits=self.nodes.limits(n["node_name"])) for n in self.nodes.list()]
        running = {h["node"] for h in hives}
        for node in nodes:
            node["hive"] = node["node_name"] in running
            down = self.hives.down(node["node_name"])
            node["down"] = down.details if down else None   # (down_s, retry_in_s, reason)
        local = {"node_name": LOCAL_NODE, "ssh_host": "127.0.0.1", "status": "local", "hive": LOCAL_NODE in running,
                 "limits": self.nodes.limits(LOCAL_NODE)}
        req.send_json(200, {"version": __version__, "queen": {"pid": os.getpid(), "port": self.port,
                                                              "keep_alive_s": self.args.keep_alive,
                                                              "max_replicas": self.args.max_replicas},
                            "nodes": [local] + [n for n in nodes if n["node_name"] != LOCAL_NODE],
                            "hives": hives, "workers": workers})

    def serve_ui(self, req):
        """The page (ui.html beside rbee.py): static, no key; everything it shows needs the key."""
        with open(os.path.join(HERE, "ui.html"), "rb") as f:
            data = f.read()
        write_body(req.handler, 200, "text/html; charset=utf-8", data, {
            "Cache-Control": "no-cache", "Content-Security-Policy": "default-src 'self'; style-src 'self' "
            "'unsafe-inline'; script-src 'self' 'unsafe-inline'; img-src 'self' data:"})

    def events(self, req):
        """The live feed: the last narration events, then each one as it happens, until the client goes."""
        stream = req.sse()
        inbox, history = self.feed.subscribe()
        try:
            for event in history:
                stream.narration(event)
            while not self.stopping.claimed:
                try:
                    stream.narration(inbox.get(timeout=1.0))
                except queue.Empty:
                    if stream.client_gone():
                        break
        finally:
            self.feed.unsubscribe(inbox)
            stream.close()

    def serve_metrics(self, req):
        hives, workers = self.hives.cluster()
        write_body(req.handler, 200, "text/plain; version=0.0.4; charset=utf-8",
                   self.metrics.render(workers, hives).encode())

    def shutdown_request(self, req):
        req.send_json(202, {"status": "shutting down"})
        threading.Thread(target=self.shutdown, args=("POST /v2/shutdown",), daemon=True).start()

    # -- life cycle -------------------------------------------------------------------------------

    def start(self):
        self.serve(self.args.host, self.args.port)
        narrate(ACTOR_QUEEN, "http_ready", "Queen ready on %s:%d" % (self.args.host, self.port), "👑",
                port=self.port, version=__version__)
        self.announce_ready()

    def shutdown(self, reason="shutdown"):
        """Cascade to every hive in parallel, then exit 0."""
        if not self.stopping.claim():
            return
        narrate(ACTOR_QUEEN, "shutdown", "Shutting down (%s): stopping %d hive(s)" % (reason, self.hives.count()),
                "👋")
        self.hives.stop_all()
        self.stop_serving()
        narrate(ACTOR_QUEEN, "exit", "Queen stopped", "💤")
        self.stopped.set()


def run_queen(args):
    run_role(Queen(args), args.lifeline)


# ============================================================================================
# Keeper (rbee.py infer and every user command): finds or starts a queen, shows the job
# ============================================================================================

NODE_PROBE = r'''
import json, os, platform, re, sys
info = {"python": platform.python_version(), "platform": sys.platform, "machine": platform.machine(),
        "hostname": platform.node(), "rbee_dir": os.getcwd(), "rbee_version": None, "backends": {}}
try:
    with open("rbee.py") as f:
        info["rbee_version"] = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
    sys.path.insert(0, os.getcwd())
    import backends
    info["backends"] = backends.detect()
except Exception as exc:
    info["error"] = "%s: %s" % (type(exc).__name__, exc)
print(json.dumps(info))
'''


def report_error(err, as_json=False):
    """Show an error once: `[component] ❌ Error: ...` on stderr (and, with --json, its event)."""
    if getattr(err, "reported", False):
        return
    err.reported = True
    if as_json:
        emit_line(dict(event=EVENT_ERROR, **err.envelope()))
    stderr_renderer().error(err)


@contextlib.contextmanager
def split_crash(worker):
    """A split's worker that died: name the part that went first (its RPC port no longer takes
    connections), for a WORKER_CRASHED that says which node to look at."""
    try:
        yield
    except WorkerCrashed as err:
        for part in (worker.get("split") or [])[1:]:
            if part.get("tunnel"):   # (through ssh: a forward's port takes connections whether the part lives or not)
                continue
            host, _, port = part["endpoint"].rpartition(":")
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
            except OSError:
                raise WorkerCrashed("%s: its part on %s (%s, %d layers) is gone" % (
                    err.message.rstrip("."), part["node"], part["endpoint"], part["layers"]),
                    dict(err.details, node=part["node"], endpoint=part["endpoint"]),
                    "See the RPC server's log on %s under $RBEE_HOME/logs; run the command again" % part["node"],
                    err.component)
        raise


class StdoutClosed(Exception):
    """Whoever reads the keeper's stdout has gone (`rbee.py infer ... | head`)."""


class Keeper:
    """The user's side of every command: talks to a queen (starting an ephemeral one if none
    answers, and stopping only that one), narration to stderr, results to stdout."""

    def __init__(self, args):
        self.args = args                  #: the command line
        #: the queen it talks to: --queen, else $RBEE_QUEEN_URL, else the local default
        self.queen = QueenClient(getattr(args, "queen", None) or os.environ.get(ENV_QUEEN_URL) or DEFAULT_QUEEN_URL,
                                 queen_key())
        self.json = getattr(args, "json", False)     #: --json: events on stdout, not text
        self.quiet = getattr(args, "quiet", False)   #: --quiet: no narration (errors stay)
        self.renderer = stderr_renderer()            #: narration and errors on stderr
        self.queen_child = None           #: the queen this keeper started (ephemeral mode): a Child, else None
        self.relay_queen = True           #: show what the ephemeral queen prints (off once it is stopping)
        self.timings = collections.OrderedDict()   #: --timings: label -> ms (the main thread)
        self.streamed = False             #: text went to stdout: a failed node can no longer be left behind

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if isinstance(exc, RbeeError):   # what went wrong first; the cleanup (a stuck worker) may take long
            report_error(exc, self.json)
        self.stop_queen()

    def show(self, event):
        if self.quiet:
            return
        if self.json:
            emit_line(dict(event=EVENT_NARRATION, **event))
        else:
            self.renderer.show(event)

    def say(self, action, human, cute=None):
        self.show({"actor": ACTOR_KEEPER, "action": action, "human": human, "cute": cute})

    # -- the queen --------------------------------------------------------------------------------

    def ensure_queen(self):
        """Use the queen that answers; else start an ephemeral one on the queen URL's port."""
        if self.queen.alive():
            return
        host, port, _ = _split_url(self.queen.url)
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ConnectionTimeout("No queen answers at %s" % self.queen.url, {"queen": self.queen.url},
                                    "Start it there (rbee.py queen) or drop --queen to use a local one", ACTOR_KEEPER)

        def from_queen(event):
            if self.relay_queen:
                self.show(event)
        self.queen_child = Child("queen", role_argv(["queen", "--host", host, "--port", str(port), "--lifeline"]),
                                 from_queen).listen()
        if not self.queen_child.wait(30):
            said = self.queen_child.last_words() if self.queen_child.exited.is_set() else []
            self.stop_queen()
            if self.queen.alive():   # another keeper started one meanwhile: use it, never stop it
                return
            raise StartFailed("The queen did not start", {"last_output": said},
                              "Is port %d free? Try rbee.py queen --port %d in another terminal" % (port, port),
                              ACTOR_QUEEN)

    def stop_queen(self):
        """SIGTERM to the queen this keeper started (never to a persistent one); it cascades."""
        child, self.queen_child = self.queen_child, None
        if child is not None:
            self.relay_queen = False
            child.stop(lambda: child.proc.send_signal(signal.SIGTERM), timeout=GRACEFUL_TIMEOUT + 10)

    # -- infer ------------------------------------------------------------------------------------

    def model_ref(self):
        """--model as a reference: one already, else an alias of this machine's (models alias; the
        registry is opened only then), else the same INVALID_MODEL_REF."""
        try:
            return ModelRef.parse(self.args.model)
        except InvalidModelRef:
            return NodeRegistry().model_ref(self.args.model)

    def infer(self):
        args = self.args
        ref = self.model_ref()   # (before any process or connection starts)
        started = time.monotonic()
        self.ensure_queen()
        task = {"model": ref.text, "prompt": args.prompt, "max_tokens": args.max_tokens,
                "temperature": args.temperature, "parallel": args.parallel}
        task.update((k, getattr(args, k)) for k in ("node", "backend", "device", "keep_alive", "cache_type_k",
                                                    "cache_type_v") if getattr(args, k) is not None)
        task.update({"ctx_size": args.ctx_size} if args.ctx_size else {})
        if args.split:
            task["split"] = [n for n in args.split.split(",") if n]
        placed_by_queen, failed = args.node in (None, AUTO_NODE) and not args.split, []
        while True:
            worker = self.queen.task(dict(task, exclude=failed) if failed else task, self.show)
            self.timings["worker ready (queen + hive)"] = (time.monotonic() - started) * 1000
            local = worker.get("node") == LOCAL_NODE
            connect = "hive process start" if local else "ssh connect (to the hive's first word)"
            for key, label in (("ssh_connect_ms", connect), ("hive_start_ms", "hive ready (HTTP up)"),
                               ("download_ms", "model download"),
                               ("load_ms", "model load")):
                if key in (worker.get("timings") or {}):
                    self.timings[label] = worker["timings"][key]
            if self.json:
                emit_line(dict(event=EVENT_WORKER, **{k: v for k, v in worker.items() if k != "api_key"}))
            try:
                end = self.execute(worker)
                break
            except (WorkerCrashed, ConnectionTimeout):   # its node failed it: another one, if nothing streamed yet
                if self.streamed or not placed_by_queen:
                    raise
                failed.append(worker["node"])
                self.say("failover", "%s went away; placing the task again" % worker["node"], "↪")
        self.timings["total"] = (time.monotonic() - started) * 1000
        if args.timings:
            self.show_timings(end)
        return 0

    def embed(self):
        """`rbee.py embed`: a worker of the model (placed by the queen, as infer's), then the
        vector of each text, one JSON array a line on stdout (--json: {index, embedding, ...})."""
        args = self.args
        ref = self.model_ref()
        self.ensure_queen()
        task = dict({"model": ref.text}, **{k: getattr(args, k) for k in ("node", "keep_alive")
                                            if getattr(args, k) is not None})
        worker = self.queen.task(task, self.show)
        client = WorkerClient(worker["worker_url"], worker["api_key"], worker["worker_id"], worker.get("node"))
        answer = client.embed({"input": args.texts, "truncate": args.truncate})
        for k, vector in enumerate(answer["embeddings"]):
            self.write_out(json.dumps(vector) + "\n", {"event": "embedding", "index": k, "embedding": vector,
                                                       "dimensions": answer["dimensions"]})
        self.say("embedded", "%d vectors of %d dimensions (%d tokens)" % (
            len(answer["embeddings"]), answer["dimensions"], answer["prompt_tokens"]), "🧭")
        return 0

    def execute(self, worker):
        """Run the job on the worker; text (or --json events) to stdout as it streams. Ctrl-C, a
        reader that goes away and errors cancel the job there (WorkerClient.execute)."""
        args = self.args
        body = {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
                "raw": args.raw}
        body.update((k, getattr(args, k)) for k in ("top_p", "top_k", "seed", "stop") if getattr(args, k) is not None)
        client = WorkerClient(worker["worker_url"], worker["api_key"], worker["worker_id"], worker.get("node"))

        def busy(delay):
            self.say("busy_retry", "Worker %s is busy; retrying in %d s" % (worker["worker_id"], delay), "⏳")
        tty, posted = not self.json and sys.stdout.isatty(), time.monotonic()
        with contextlib.closing(client.execute(body, busy)) as events, split_crash(worker):
            try:
                for event in events:
                    if isinstance(event, JobStarted):   # (after any busy retries)
                        posted = time.monotonic()
                    elif isinstance(event, Token):
                        self.timings.setdefault("first token (from /execute)", (time.monotonic() - posted) * 1000)
                        self.write_out(event.text, {"event": "token", "t": event.text, "i": event.index})
                    elif isinstance(event, Narration):
                        self.show(event.event)
                    elif isinstance(event, JobEnded):
                        self.end_text_line(tty)
                        self.write_out("", dict(event=EVENT_END, **event.stats))
                        return event.stats
            except RbeeError:
                self.end_text_line(tty)
                raise

    def end_text_line(self, tty):
        """On a terminal, end the text's line: the shell's prompt (or the error) starts a line of its own."""
        if tty and self.renderer.text_open:
            self.write_out("\n", None)

    def write_out(self, text, event):
        """Generated text (or, with --json, its event) on stdout, flushed at once."""
        try:
            if self.json:
                if event is not None:
                    sys.stdout.write(json.dumps(event, ensure_ascii=False) + "\n")
            elif text:
                sys.stdout.write(text)
                self.renderer.text_written(text)
            self.streamed = self.streamed or bool(text) or event is not None and event.get("event") == "token"
            sys.stdout.flush()
        except BrokenPipeError:   # the reader went away (`| head`): not the worker's fault
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise StdoutClosed()

    def show_timings(self, end):
        rows = list(self.timings.items())
        if end:
            rows.append(("tokens/s (worker)", end.get("tokens_per_sec")))
        width = max(len(label) for label, _ in rows)
        lines = ["[rbee-keeper] ⏱️ Timings"] + [("    %-*s %10.1f %s" % (
            width, label, value or 0.0, "" if label.startswith("tokens") else "ms")).rstrip() for label, value in rows]
        self.renderer.write("\n".join(lines) + "\n")


def probe_node(target, node, rbee_dir, python):
    """ssh round trip with latency; the node's Python, rbee.py version and backends."""
    started = time.monotonic()
    out = ssh_run(target, "cd %s 2>/dev/null; exec %s -" % (shell_path(rbee_dir), shell_path(python)), timeout=60,
                  node=node, stdin_data=NODE_PROBE.encode(), actor=ACTOR_KEEPER)
    latency_ms = (time.monotonic() - started) * 1000
    try:
        info = json.loads(out.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        info = {"python": None, "error": "%s did not run on the node (exit %d): %s" % (
            python, out.returncode, out.stderr.decode("utf-8", "replace").strip()[-300:])}
    info["latency_ms"] = round(latency_ms, 1)
    return info


# ggml is built for the node's CPU (-march=native), and on a CPU with AMX that brings in ggml's AMX
# kernels, which crash now and then (a general protection fault at ldtilecfg: llama.cpp #20824,
# #26954): the node's build leaves them out where its compiler knows the flags (x86, GCC 11+);
# the Makefile builds this machine's the same way
NO_AMX_SH = ("no_amx='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'; "
             "if echo 'int x;' | ${CC:-cc} $no_amx -x c -c -o /dev/null - 2>/dev/null; then "
             "export CFLAGS=\"$no_amx\" CXXFLAGS=\"$no_amx\"; fi; ")


def install_node(node, target, args):
    """Copy rbee.py + backends/ to the node; with a venv, install llama-cpp-python built for it."""
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(RBEE_PY, "rbee.py")
        for name in sorted(os.listdir(os.path.join(HERE, "backends"))):
            if name.endswith(".py"):
                tar.add(os.path.join(HERE, "backends", name), "backends/" + name)
    rbee_dir = node["rbee_dir"]
    quoted = shell_path(rbee_dir)
    out = ssh_run(target, "mkdir -p %s && tar -xzf - -C %s" % (quoted, quoted), node=node["node_name"],
                  stdin_data=buf.getvalue(), actor=ACTOR_KEEPER)
    if out.returncode:
        raise SshFailed("Copying rbee.py to %s failed" % node["node_name"],
                        {"said": out.stderr.decode("utf-8", "replace")[-400:]}, "Check write access to %s" % rbee_dir)
    print("Copied rbee.py and backends/ to %s:%s" % (node["node_name"], rbee_dir))
    if args.no_venv:
        return 0
    script = ("set -e; cd %s; %s -m venv .venv; " % (quoted, shell_path(node["python"])) +
              "export CMAKE_ARGS=-DGGML_RPC=on; "   # (a split's parts: issue 13)
              "if command -v nvidia-smi >/dev/null; then export CMAKE_ARGS=\"$CMAKE_ARGS -DGGML_CUDA=on\"; "
              "elif [ \"$(uname -s)-$(uname -m)\" = Darwin-arm64 ]; then "
              "export CMAKE_ARGS=\"$CMAKE_ARGS -DGGML_METAL=on\"; fi; " + NO_AMX_SH +
              ".venv/bin/pip install -q llama-cpp-python==0.3.36 huggingface_hub==2.4.0 gguf==0.19.0")
    print("Installing llama-cpp-python on %s (a first build takes minutes)..." % node["node_name"])
    code = subprocess.call(target.argv(script), stdin=subprocess.DEVNULL)
    if code:
        raise InternalError("Installing the dependencies on %s failed (exit %d)" % (node["node_name"], code),
                            {}, "Run the install by hand on the node to see why")
    venv_python = (rbee_dir.rstrip("/") + "/.venv/bin/python")
    NodeRegistry().update(node["node_name"], python=venv_python)
    print("Node %s now uses %s" % (node["node_name"], venv_python))
    return 0


def describe_limits(caps):
    """"at most 8 GB of RAM and 6 GB of VRAM per GPU", or "all its memory"."""
    parts = ["%s of %s" % (human_bytes(caps[key] << 20), what) for key, what in (("max_ram_mb", "RAM"),
                                                                                ("max_vram_mb", "VRAM per GPU"))
             if caps.get(key)]
    return "at most " + " and ".join(parts) if parts else "all its memory"


def cmd_nodes(args):
    registry = NodeRegistry()
    renderer = stderr_renderer()
    if args.nodes_cmd == "list":
        for node in registry.list():
            print("%-14s %-28s %-11s %s" % (node["node_name"], "%s:%s" % (node["ssh_host"], node["ssh_port"]),
                                            node["status"], ",".join(node["backends"] or []) or "-"))
            if node["transport"] != TRANSPORT_LAN:
                print("    transport: %s" % node["transport"])
            if node["env"]:
                print("    env: %s" % " ".join("%s=%s" % kv for kv in sorted(masked_env(node["env"]).items())))
        return 0
    if args.nodes_cmd == "remove":
        if not registry.remove(args.name):
            raise NodeNotFound("Node %r is not registered" % args.name, {"node": args.name},
                               "See the registered nodes: rbee.py nodes list")
        print("Removed node %s" % args.name)
        return 0
    if args.nodes_cmd == "add":
        key = os.path.abspath(os.path.expanduser(args.ssh_key)) if args.ssh_key else None   # the queen runs elsewhere
        node = {"node_name": args.name, "ssh_host": args.ssh_host, "ssh_port": args.ssh_port,
                "ssh_user": args.ssh_user, "ssh_key_path": key, "rbee_dir": args.rbee_dir,
                "python": args.python, "env": dict(pair for pairs in args.env or [] for pair in pairs),
                "transport": args.transport}
        with narration_to(renderer.show):
            info = probe_node(SshTarget.for_node(node), args.name, args.rbee_dir, args.python)
        node.update(backends=list(info.get("backends") or {}), devices=info.get("backends") or {},
                    last_connected_unix=int(time.time()), status=NODE_REACHABLE, last_error=info.get("error"))
        registry.save(node)
        if args.max_ram or args.max_vram:
            registry.set_limits(args.name, max_ram_mb=args.max_ram, max_vram_mb=args.max_vram)
        print("Added node %s (%s), ssh %.0f ms, Python %s, rbee %s, backends: %s" % (
            args.name, SshTarget.for_node(node), info["latency_ms"], info.get("python") or "missing",
            info.get("rbee_version") or "not installed (run: rbee.py nodes install %s)" % args.name,
            ", ".join(node["backends"]) or "-"))
        return 0
    node = registry.resolve(args.name)
    if args.nodes_cmd == "set":
        if args.max_ram is None and args.max_vram is None:
            raise InvalidRequest("Nothing to set", suggestion="rbee.py nodes set %s --max-ram SIZE --max-vram SIZE"
                                 % args.name)
        caps = registry.set_limits(node["node_name"], max_ram_mb=args.max_ram, max_vram_mb=args.max_vram)
        print("Node %s: rbee may use %s" % (node["node_name"], describe_limits(caps)))
        return 0
    if node.get("local"):
        raise InvalidRequest("localhost runs rbee from this directory; nothing to %s" % args.nodes_cmd)
    target = SshTarget.for_node(node)
    if args.nodes_cmd == "check":
        with narration_to(renderer.show):
            try:
                info = probe_node(target, node["node_name"], node["rbee_dir"], node["python"])
            except RbeeError as err:
                registry.mark_down(node["node_name"], err.message)   # (a queen leaves it out until its next try)
                raise
        same = info.get("rbee_version") == __version__
        # (a queen that had it down places on it again from its next request on)
        found = info.get("backends") or {}
        registry.mark_up(node["node_name"], backends=list(found), devices=found, last_error=info.get("error"))
        print("node:     %s (%s)\nssh:      ok, %.0f ms\npython:   %s\nrbee.py:  %s\nbackends: %s" % (
            node["node_name"], target, info["latency_ms"], info.get("python") or "missing (%s)" % info.get("error"),
            "%s (%s)" % (info["rbee_version"], "same version" if same else "queen is %s" % __version__)
            if info.get("rbee_version") else "not installed in %s" % node["rbee_dir"],
            "; ".join("%s: %s" % (name, ", ".join("%d %s (%d MB free)" % (d["index"], d["name"], d["memory_free_mb"])
                                                 for d in devs)) for name, devs in (info.get("backends") or {}).items())
            or "-"))
        if not same:
            raise VersionMismatch("rbee.py on %s is %s; this one is %s" % (
                node["node_name"], info.get("rbee_version") or "missing", __version__),
                {"node": node["node_name"], "rbee_dir": node["rbee_dir"]},
                "Copy this rbee.py there: rbee.py nodes install %s" % node["node_name"], ACTOR_KEEPER)
        return 0
    return install_node(node, target, args)


def print_models(rows):
    for row in rows:
        print("%-40s %-44s %10s  %s" % (row["id"], "%s:%s" % (row["provider"], row["reference"])[:44],
                                        human_bytes(row["size_bytes"]), row["local_path"]))


def cmd_models(args):
    if args.models_cmd in ("alias", "unalias", "aliases"):   # names people type, in this machine's registry
        return cmd_aliases(args)
    if args.node:   # through the queen, on that node
        with Keeper(args) as keeper:
            keeper.ensure_queen()
            if args.models_cmd == "list":
                print_models(keeper.queen.models(args.node))
            elif args.models_cmd == "download":
                row = keeper.queen.download(args.node, args.ref, keeper.show)
                print_models([row["model"]])
            else:
                removed = keeper.queen.remove(args.node, args.ref)
                print("Removed %d model(s) from %s" % (len(removed["removed"]), args.node))
        return 0
    catalog = ModelCatalog()
    if args.models_cmd == "list":
        print_models(catalog.list())
    elif args.models_cmd == "download":
        ref = ModelRef.parse(args.ref)
        with narration_to(stderr_renderer().show):
            print_models([ModelProvisioner(catalog).provision(ref)])
    else:
        removed = catalog.remove(ModelRef.parse(args.ref))
        if not removed:
            raise ModelNotFound("Model %s is not in this machine's catalog" % args.ref,
                                {"model": args.ref}, "See what is there: rbee.py models list")
        print("Removed %s" % ", ".join(r["id"] for r in removed))
    return 0


def cmd_aliases(args):
    registry = NodeRegistry()
    if args.models_cmd == "alias":
        ref = registry.set_alias(args.name, args.ref)
        print("%s now names %s" % (args.name, ref.text))
    elif args.models_cmd == "unalias":
        if not registry.remove_alias(args.name):
            raise ModelNotFound("No alias %r" % args.name, {"model": args.name}, "See them: rbee.py models aliases")
        print("Removed the alias %s" % args.name)
    else:
        for name, ref in registry.aliases().items():
            print("%-40s %s" % (name, ref))
    return 0


def cmd_workers(args):
    with Keeper(args) as keeper:
        keeper.ensure_queen()
        if args.workers_cmd == "list":
            for w in keeper.queen.workers(args.node):
                print("%-16s %-12s %-8s %-30s %-6s %s" % (w["worker_id"], w["node"], w["state"], w["url"],
                                                         "%s:%s" % (w["backend"], w["device"]), w["model_ref"]))
        else:
            keeper.queen.shutdown_worker(args.node or LOCAL_NODE, args.id)
            print("Worker %s is shutting down" % args.id)
    return 0


def queen_status(args):
    """The running queen's /v2/status, or None (nothing is started to answer)."""
    keeper = Keeper(args)
    return keeper.queen.status() if keeper.queen.alive() else None


def cmd_status(args):
    status = queen_status(args)
    if args.json:
        nodes = [dict(n, env=masked_env(n["env"])) for n in NodeRegistry().list()]
        print(json.dumps(status or {"queen": None, "nodes": nodes, "hives": [], "workers": []}))
        return 0
    if status is None:
        print("queen:  not running at %s" % Keeper(args).queen.url)
        for node in NodeRegistry().list():
            print("node:   %-14s %-24s %s" % (node["node_name"], node["ssh_host"], node["status"]))
        return 0
    queen = status["queen"]
    print("queen:  %s (version %s, pid %s, keep-alive %s, max replicas %s)" % (
        Keeper(args).queen.url, status["version"], queen["pid"], human_duration(queen["keep_alive_s"]),
        queen["max_replicas"]))
    for node in status["nodes"]:
        print("node:   %-14s %-24s %-11s %-8s rbee may use %s" % (
            node["node_name"], node["ssh_host"], node["status"], "hive up" if node["hive"] else "no hive",
            describe_limits(node["limits"])))
        if node.get("down"):
            print("        down for %s: %s; next try in %s" % (human_duration(node["down"]["down_s"]),
                                                             node["down"]["reason"],
                                                             human_duration(node["down"]["retry_in_s"])))
    for hive in status["hives"]:
        if "error" in hive:
            print("hive:   %-14s %s  error: %s" % (hive["node"], hive["url"], hive["error"]["message"]))
            continue
        devices = ", ".join("%s:%s %s free" % (b, d["index"], human_bytes((d.get("memory_free_mb") or 0) << 20))
                            for b, found in hive["devices"].items() for d in found if b != "cpu")
        ram = "RAM %s free of %s" % (human_bytes(hive["ram_free_mb"] << 20), human_bytes(hive["ram_total_mb"] << 20))
        print("hive:   %-14s %s  %s%s" % (hive["node"], hive["url"], ram, "; " + devices if devices else ""))
        for w in hive.get("workers", []):
            print("  worker %-16s %-8s %-30s %s  slots %d/%d busy, %d queued" % (
                w["worker_id"], w["state"], w["url"], w["model_ref"], w["slots_total"] - w["slots_available"],
                w["slots_total"], w["queue_length"]))
        for m in hive.get("models", []):
            print("  model  %-40s %s" % (m["id"], human_bytes(m["size_bytes"])))
    return 0


def cmd_ps(args):
    """Like `ollama ps`: what is loaded where, how busy, and until when."""
    status = queen_status(args)
    workers = status["workers"] if status else []
    if args.json:
        print(json.dumps({"workers": workers}))
        return 0
    if status is None:
        print("No queen runs at %s: nothing is loaded" % Keeper(args).queen.url, file=sys.stderr)
    print("%-44s %-14s %-8s %-7s %-5s %-9s %-14s %s" % ("MODEL", "NODE", "DEVICE", "SLOTS", "QUEUE", "MEMORY",
                                                        "CONTEXT", "UNTIL"))
    for w in workers:
        until = ("forever" if w["keep_alive_s"] < 0 else WORKER_BUSY if w["state"] == WORKER_BUSY else
                 w["state"] if w.get("expires_unix") is None else
                 "in %s" % human_duration(max(0, w["expires_unix"] - time.time())))
        context = "%d %s" % (w.get("ctx_size") or 0, w.get("cache_type_k") or "") if w.get("ctx_size") else "-"
        print("%-44s %-14s %-8s %-7s %-5d %-9s %-14s %s" % (
            w["model_ref"], w["node"], "%s:%s" % (w["backend"], w["device"]),
            "%d/%d" % (w["slots_total"] - w["slots_available"], w["slots_total"]), w["queue_length"],
            human_bytes((w["memory_mb"] or 0) << 20), context, until))
    return 0


# ============================================================================================
# CLI
# ============================================================================================

def _with_keeper(args, action):
    with Keeper(args) as keeper:
        return action(keeper)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):   # usage errors: exit 2 with the envelope's words, no traceback
        self.print_usage(sys.stderr)
        sys.stderr.write("[rbee-keeper] ❌ Error: %s\nSuggestion: rbee.py %s--help\n" % (
            message, self.prog.split(" ", 1)[1] + " " if " " in self.prog else ""))
        sys.exit(2)


def ssh_host(text):
    """A host name, address or ssh alias: never something ssh could take for an option."""
    if not text or text.startswith("-") or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError("%r is not a host name" % text)
    return text


def env_pair(text):
    """`KEY=VALUE` from the command line (the value may hold `=` or be empty)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError("%r is not KEY=VALUE" % text)
    return key, value


def keep_alive_arg(text):
    seconds = duration_s(text)
    if seconds is None:
        raise argparse.ArgumentTypeError("%r is no duration (30s, 10m, 1h, seconds; 0: unload at once, negative: "
                                         "keep loaded)" % text)
    return -1.0 if seconds < 0 else seconds


def size_arg(text):
    """A cap in MB; 0 (written as such) removes the cap."""
    mb = size_mb(text)
    if mb is None or (mb <= 0 and not re.match(r"^\s*0+(\.0*)?\s*[KMGT]?(I?B)?\s*$", text, re.I)):
        raise argparse.ArgumentTypeError("%r is no memory size (8G, 512M; 0 removes the cap)" % text)
    return mb


def _bounded(kind, low, high):
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a valid %s" % (text, kind.__name__))
        if not low <= value <= high:
            raise argparse.ArgumentTypeError("%s is out of range %s..%s" % (text, low, high))
        return value
    return convert


def add_context_options(parser, whose, cache_type=None):
    """--ctx-size and the KV cache's types, of a worker (`whose`: "its", types f16 by default) or of
    the workers a command starts (a running worker serves it if its context is as large)."""
    parser.add_argument("--ctx-size", type=_bounded(int, 0, 1 << 22), default=0, help="tokens of context of %s "
                        "worker, shared by its slots (default 0: the model's trained context, as far as memory "
                        "holds its KV cache)" % whose)
    for part in ("k", "v"):
        parser.add_argument("--cache-type-" + part, choices=KV_CACHE_TYPES, default=cache_type,
                            help="the KV cache's %s: q8_0 holds twice the context, q4_0 four times (default %s)" % (
                                "keys" if part == "k" else "values", cache_type or "f16, or any running worker's"))


def build_parser():
    import backends   # the registry of adapters names the --backend choices (stdlib only: no llama_cpp)
    p = ArgumentParser(prog="rbee.py", description="rbee: your machines as one LLM inference service")
    p.add_argument("--version", action="version", version="rbee " + __version__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    s = sub.add_parser("infer", help="run a prompt (on --node, else where the queen places it; starts what it needs)")
    s.add_argument("--node", help="the node to run on (default: the queen chooses among localhost and every "
                   "registered node)")
    s.add_argument("--model", required=True, help="hf:ORG/REPO[:FILE_OR_QUANT] or file:/abs/path.gguf")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-tokens", type=_bounded(int, 1, 1 << 20), default=20)
    s.add_argument("--temperature", type=_bounded(float, 0.0, 2.0), default=0.7)
    s.add_argument("--top-p", type=_bounded(float, 0.0, 1.0))
    s.add_argument("--top-k", type=_bounded(int, 0, 1 << 20))
    s.add_argument("--seed", type=_bounded(int, -1, (1 << 32) - 1))
    s.add_argument("--stop", nargs="+")
    s.add_argument("--raw", action="store_true", help="send the prompt as is, without the model's chat template")
    s.add_argument("--backend", choices=backends.PREFERENCE, help="default: the node's best of %s" % ", ".join(
        backends.PREFERENCE))
    s.add_argument("--device", type=_bounded(int, 0, 1024), help="default: the backend's device with most room")
    s.add_argument("--parallel", type=_bounded(int, 1, 256), default=DEFAULT_PARALLEL,
                   help="slots of a worker this command starts (a running one keeps its own)")
    add_context_options(s, "the")
    s.add_argument("--split", metavar="NODE,NODE", help="one model over several nodes: the one with most room loads "
                   "it, the others lend their device over llama.cpp's RPC backend (LAN transport)")
    s.add_argument("--keep-alive", type=keep_alive_arg, help="how long the worker stays loaded when idle: 30s, 10m, "
                   "1h (0: unload after this request, negative: until the queen stops; default: the queen's)")
    s.add_argument("--queen", help="queen URL (default %s, or $RBEE_QUEEN_URL)" % DEFAULT_QUEEN_URL)
    s.add_argument("--quiet", action="store_true", help="no narration (errors stay)")
    s.add_argument("--json", action="store_true", help="one JSON event per line on stdout")
    s.add_argument("--timings", action="store_true", help="per-hop latency table on stderr")
    s.set_defaults(func=lambda a: _with_keeper(a, Keeper.infer))

    s = sub.add_parser("queen", help="run the orchestrator")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_bounded(int, 0, 65535), default=QUEEN_PORT)
    s.add_argument("--lifeline", action="store_true", help="exit when stdin closes (set by the keeper)")
    s.add_argument("--api-key-file", help="the key callers must send (else $RBEE_API_KEY; off loopback, "
                   "else $RBEE_HOME/api-key, created)")
    s.add_argument("--keep-alive", type=keep_alive_arg, default=DEFAULT_KEEP_ALIVE, help="how long an idle worker "
                   "stays loaded, and a hive without workers lives (default 5m; negative: until the queen stops)")
    s.add_argument("--max-queue", type=_bounded(int, 0, 1 << 16), default=DEFAULT_MAX_QUEUE,
                   help="requests a worker it starts lets wait for a slot; beyond them, 503 with Retry-After")
    s.add_argument("--cors-origin", action="append", metavar="ORIGIN", help="a browser origin allowed to call the "
                   "APIs (https://chat.lan; repeat it; * for any): preflight OPTIONS and Access-Control headers")
    s.add_argument("--max-replicas", type=_bounded(int, 1, 64), default=DEFAULT_MAX_REPLICAS,
                   help="workers of one model started when every slot of its workers is taken (default 2)")
    add_context_options(s, "each")
    s.add_argument("--kv-split", action="store_true", help="the workers it starts give each slot its own part of "
                   "the KV cache: a text at temperature 0 is the same beside others as alone (worker --kv-split)")
    s.set_defaults(func=run_queen)

    s = sub.add_parser("hive", help="run a node's pool manager")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=_bounded(int, 0, 65535), default=HIVE_PORT)
    s.add_argument("--lifeline", action="store_true", help="read the queen's handshake, exit when stdin closes")
    s.add_argument("--node-name")
    s.add_argument("--keep-alive", "--idle-timeout", dest="keep_alive", type=keep_alive_arg,
                   default=DEFAULT_KEEP_ALIVE, help="how long an idle worker stays loaded (30s, 10m, 1h; "
                   "negative: forever); a queen's hive with no worker ends after its queen's")
    s.add_argument("--token-file", help="the token callers must send (else $RBEE_HIVE_TOKEN; off loopback, "
                   "else $RBEE_HOME/hive-token, created)")
    s.set_defaults(func=run_hive)

    s = sub.add_parser("worker", help="serve one model (started by a hive)")
    s.add_argument("--model", required=True, help="path of a GGUF file")
    s.add_argument("--backend", required=True, choices=backends.PREFERENCE)
    s.add_argument("--device", type=_bounded(int, 0, 1024), required=True)
    s.add_argument("--port", type=_bounded(int, 0, 65535), required=True)
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--worker-id")
    s.add_argument("--model-ref")
    s.add_argument("--hive-url")
    add_context_options(s, "its", "f16")
    s.add_argument("--parallel", type=_bounded(int, 1, 256), default=DEFAULT_PARALLEL,
                   help="slots: requests served at once, batched together, sharing the context's KV cache")
    s.add_argument("--kv-split", action="store_true", help="give each slot its own 1/--parallel of the context "
                   "(llama.cpp's non-unified cache): a text at temperature 0 is the same beside others as alone, but "
                   "no conversation may use the others' idle cells")
    s.add_argument("--batch-size", type=_bounded(int, 32, 1 << 16), default=512, help="tokens decoded in one step, "
                   "all slots together: a long prompt is evaluated in chunks of it between the others' tokens")
    s.add_argument("--ubatch-size", type=_bounded(int, 32, 1 << 16), help="tokens llama.cpp computes at once "
                   "(default: --batch-size)")
    s.add_argument("--prompt-cache-mb", type=_bounded(int, 0, 1 << 24), default=2048, help="host memory for the KV "
                   "cache of conversations whose slot went to another one (0: none)")
    s.add_argument("--prompt-cache-dir", default=os.environ.get("RBEE_PROMPT_CACHE_DIR"), help="keep that prompt "
                   "cache on disk too, for the next worker of the model (default $RBEE_PROMPT_CACHE_DIR, else none)")
    s.add_argument("--memory-limit-mb", type=_bounded(int, 0, 1 << 40), help="memory it may take (its hive's "
                   "room for it): a default context fits its KV cache in what the model leaves of it")
    s.add_argument("--max-queue", type=_bounded(int, 0, 1 << 16), default=DEFAULT_MAX_QUEUE,
                   help="requests that may wait for a slot; beyond them, 503")
    s.add_argument("--rpc", action="append", metavar="HOST:PORT", help="a split: a remote device (rbee.py rpc) that "
                   "takes part of the layers; repeat it")
    s.add_argument("--offload-layers", type=_bounded(int, 0, 1 << 16), default=0, help="a split: layers on the "
                   "remote devices")
    s.add_argument("--tensor-split", help="a split over several remote devices: their shares, as a,b,...")
    s.add_argument("--listen-fd", type=int, help="serve on this inherited listening socket, bound to --port "
                   "(set by its hive, which holds the port from the moment it chose it)")
    s.add_argument("--lifeline", action="store_true", help="exit when stdin closes")
    s.set_defaults(func=run_worker)

    s = sub.add_parser("rpc", help="serve a device of this node to a split worker (started by a hive)")
    s.add_argument("--host", required=True, help="the address facing the split's primary (never 0.0.0.0)")
    s.add_argument("--port", type=_bounded(int, 1, 65535), required=True)
    s.add_argument("--backend", required=True, choices=backends.PREFERENCE)
    s.add_argument("--device", type=_bounded(int, 0, 1024), default=0)
    s.add_argument("--seed", metavar="GGUF", help="this node's copy of the split's model: fill the tensor cache "
                   "from it before serving, so that the primary sends hashes instead of those weights")
    s.add_argument("--lifeline", action="store_true", help="exit when stdin closes")
    s.set_defaults(func=run_rpc)

    s = sub.add_parser("nodes", help="the machines rbee may use")
    nodes = s.add_subparsers(dest="nodes_cmd", required=True, parser_class=ArgumentParser)
    a = nodes.add_parser("add")
    a.add_argument("name")
    a.add_argument("--ssh-host", required=True, type=ssh_host)
    a.add_argument("--ssh-port", type=_bounded(int, 1, 65535), default=22)
    a.add_argument("--ssh-user")
    a.add_argument("--ssh-key")
    a.add_argument("--rbee-dir", default="~/.rbee/app")
    a.add_argument("--python", default="python3")
    a.add_argument("--transport", choices=TRANSPORTS, default=TRANSPORT_LAN,
                   help="lan: the queen reaches the node's hive and workers over the network; ssh: only through "
                        "the node's ssh connection (they listen on its 127.0.0.1; the node opens nothing but sshd)")
    a.add_argument("--env", nargs="+", action="append", metavar="KEY=VALUE", type=env_pair,
                   help="environment of the node's hive; repeat it or give several pairs")
    n = nodes.add_parser("set", help="change what rbee may use of a node (localhost too)")
    n.add_argument("name")
    for parser in (a, n):
        parser.add_argument("--max-ram", type=size_arg, metavar="SIZE", help="RAM rbee's workers may take (8G, 512M)")
        parser.add_argument("--max-vram", type=size_arg, metavar="SIZE", help="VRAM they may take on each GPU")
    nodes.add_parser("list")
    for verb in ("remove", "check", "install"):
        n = nodes.add_parser(verb)
        n.add_argument("name")
        if verb == "install":
            n.add_argument("--no-venv", action="store_true", help="copy the files only")
    s.set_defaults(func=cmd_nodes)

    s = sub.add_parser("embed", help="the embedding of each text (a worker of the model, placed as infer's)")
    s.add_argument("texts", nargs="+", metavar="TEXT")
    s.add_argument("--model", required=True, help="hf:ORG/REPO[:FILE_OR_QUANT], file:/abs/path.gguf or an alias")
    s.add_argument("--node", help="the node to run on (default: the queen chooses)")
    s.add_argument("--truncate", action="store_true", help="cut a text longer than the context (default: an error)")
    s.add_argument("--keep-alive", type=keep_alive_arg, help="how long the worker stays loaded when idle")
    s.add_argument("--queen", help="queen URL (default %s, or $RBEE_QUEEN_URL)" % DEFAULT_QUEEN_URL)
    s.add_argument("--quiet", action="store_true", help="no narration (errors stay)")
    s.add_argument("--json", action="store_true", help="one JSON object a vector on stdout")
    s.set_defaults(func=lambda a: _with_keeper(a, Keeper.embed))

    s = sub.add_parser("models", help="the model catalog of this machine or of --node")
    models = s.add_subparsers(dest="models_cmd", required=True, parser_class=ArgumentParser)
    models.add_parser("list")
    for verb in ("download", "rm"):
        models.add_parser(verb).add_argument("ref")
    for m in models.choices.values():
        m.add_argument("--node")
        m.add_argument("--queen")
    a = models.add_parser("alias", help="a name that stands for a model in every API and command (a queen on "
                          "this machine reads it at once): rbee.py models alias qwen2.5-coder:1.5b hf:ORG/REPO:Q4_K_M")
    a.add_argument("name")
    a.add_argument("ref")
    models.add_parser("unalias", help="forget an alias").add_argument("name")
    models.add_parser("aliases", help="the aliases and the models they name")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("workers", help="the workers of the running hives")
    workers = s.add_subparsers(dest="workers_cmd", required=True, parser_class=ArgumentParser)
    workers.add_parser("list")
    workers.add_parser("shutdown").add_argument("id")
    for w in workers.choices.values():
        w.add_argument("--node")
        w.add_argument("--queen")
    s.set_defaults(func=cmd_workers)

    s = sub.add_parser("status", help="nodes (reachable, free memory), hives, workers, queues and models")
    s.add_argument("--queen")
    s.add_argument("--json", action="store_true", help="the queen's /v2/status as it is")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("ps", help="the loaded models: node, device, slots, queue, memory, until when")
    s.add_argument("--queen")
    s.add_argument("--json", action="store_true", help="one JSON object: {\"workers\": [...]}")
    s.set_defaults(func=cmd_ps)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except RbeeError as err:
        report_error(err, getattr(args, "json", False))
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\n[rbee-keeper] ✋ Interrupted\n")
        return 130
    except StdoutClosed:   # the reader took what it wanted; the job was cancelled
        return 0
    except Exception as exc:   # a bug: still the envelope's shape, with the traceback in a log
        err = RbeeError.wrap(exc, ACTOR_KEEPER)
        with open_log("keeper-crash.log") as log:
            import traceback
            traceback.print_exc(file=log)
        stderr_renderer().error(err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
