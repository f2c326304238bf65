"""Hardening (issue 9): every bad input a 4xx envelope, every fault its true cause, nobody in
without a key -- every role a real process, the real SmolLM2 model, raw sockets.

Sections:
  0. the roles under test and a raw-socket client
  1. a seeded, bounded fuzz per role (worker, hive, queen) with its histogram
  2. named regressions for the issue's items 1-5
  3. the faults a user meets, with the exact code they see (items 6, 7, 8, 9, 11)
  4. authentication where the network reaches (item 13)
"""
import collections
import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import threading
import time

import pytest

from conftest import (assert_no_rbee_left, free_port, port_open, raw_call, raw_request, rbee_processes,
                      read_until_tokens, run_rbee, sse_frames, start_keeper, start_queen, tracebacks, wait_until)
from fakehub import FakeHub

WORKER_KEY = "worker-key-0123456789abcdef"
HIVE_TOKEN = "hive-token-0123456789abcdef"
QUEEN_KEY = "queen-key-0123456789abcdef"
REPO_ID = "rbee-test/SmolLM2-135M-Instruct-GGUF"
REF = "hf:" + REPO_ID
CHOSEN = "smollm2-135m-instruct.Q4_K_M.gguf"
PROMPT = "Once upon a time, in a small village by the sea, there lived"
MiB = 1 << 20
TOKEN_TIMEOUT = 8                            # seconds without a token, in the stopped-worker test
BODY_TIMEOUT = 10                            # seconds for a whole request body (PROTOCOL.md), then 400


def body_timeout_bound(answer_times):
    """When a request whose body never arrives whole must be answered: BODY_TIMEOUT plus a margin of
    2.5 s, or of 3 times the slowest answer to the other requests of the same test when the machine
    is slower than that (its load, not a fixed figure, sets the margin)."""
    return BODY_TIMEOUT + max(2.5, 3 * max(answer_times, default=0))
GONE = "file:/nonexistent/fuzz-model.gguf"   # a model reference every hive refuses before any work


# ============================================================================================
# 0. The roles under test, and a raw-socket client
# ============================================================================================

class Role:
    """A running role: its process (conftest.RoleProcess), port, key and what to ask it."""

    def __init__(self, kind, proc, port, key, home):
        self.kind, self.proc, self.port, self.key, self.home = kind, proc, port, key, home

    @property
    def health_path(self):
        return "/v1/health" if self.kind == "hive" else "/health"

    def call(self, method, path, body=None, key="own", **kw):
        return raw_call(self.port, method, path, body, key=self.key if key == "own" else key, **kw)


@pytest.fixture
def start_role(roles, env, model_path, rbee_home, start_hive):
    """start_role(kind): a worker (its key in its environment), a standalone hive on 127.0.0.1
    with RBEE_HIVE_TOKEN, or a queen on 127.0.0.1 with RBEE_API_KEY -- each requires its key."""
    def start(kind, extra_env=None):
        port = free_port()
        if kind == "worker":
            proc = roles("worker", "--model", model_path, "--backend", "cpu", "--device", "0", "--port", str(port),
                         "--host", "127.0.0.1", "--lifeline",
                         env=dict(env, RBEE_WORKER_API_KEY=WORKER_KEY, **(extra_env or {})))
            proc.wait_event("http_ready", timeout=90)
            key = WORKER_KEY
        elif kind == "hive":
            proc = start_hive(node_name="hardnode", extra_env=dict(RBEE_HIVE_TOKEN=HIVE_TOKEN, **(extra_env or {})))
            port, key = proc.port, HIVE_TOKEN
        else:
            # HF_ENDPOINT nowhere: should a request ever get as far as a download, it fails fast
            proc = roles("queen", "--port", str(port),
                         env=dict(env, RBEE_API_KEY=QUEEN_KEY, HF_ENDPOINT="http://127.0.0.1:9",
                                  **(extra_env or {})))
            proc.wait_event("http_ready", "queen-rbee", timeout=30)
            key = QUEEN_KEY
        return Role(kind, proc, port, key, rbee_home)
    return start


def exchange(port, data, timeout=30.0, hold_open=False):
    """Send raw bytes on a fresh connection and read until the server closes it. Returns (answer
    bytes, note): note is None, "reset" or "timeout". `hold_open`: never half-close our side."""
    chunks, note = [], None
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:   # the server answered (and closed) before it read all of it
            note = "send failed"
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except ConnectionResetError:
            note = "reset"
        except socket.timeout:
            note = "timeout"
    return b"".join(chunks), note


def classify(answer):
    """('empty reply' | 'no status line' | '<status>', status or None, JSON body or None)."""
    if not answer:
        return "empty reply", None, None
    if not re.match(rb"^HTTP/\d\.\d \d{3} ", answer):
        return "no status line", None, None
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        data = json.loads(body) if body and b"application/json" in head else None
    except ValueError:
        data = None
    return str(status), status, data


def is_envelope(data):
    return (isinstance(data, dict) and isinstance(data.get("error"), dict)
            and isinstance(data["error"].get("code"), str) and re.match(r"^[A-Z][A-Z_]+$", data["error"]["code"])
            and isinstance(data["error"].get("message"), str) and data["error"]["message"])


def is_error_of(kind, request, data):
    """An error answer in the shape its route speaks (PROTOCOL.md §13): on the queen, Anthropic's
    under /v1/messages, OpenAI's elsewhere under /v1/ (and its routes without the prefix), Ollama's
    under /api/ and at /; rbee's envelope everywhere else."""
    parts = request.split(b"\r\n", 1)[0].split(b" ")
    path = parts[1].decode("latin-1").split("?")[0] if len(parts) > 1 else ""
    if kind == "queen" and (path == "/" or path.startswith("/api/")):
        return isinstance(data, dict) and isinstance(data.get("error"), str) and bool(data["error"])
    if kind == "queen" and path.startswith("/v1/messages"):
        error = data.get("error") if isinstance(data, dict) else None
        return data.get("type") == "error" and isinstance(error, dict) and isinstance(
            error.get("type"), str) and isinstance(error.get("message"), str) and bool(error["message"])
    if kind == "queen" and path.startswith(("/v1/", "/chat/", "/completions", "/models")):
        error = data.get("error") if isinstance(data, dict) else None
        return isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(
            error.get("type"), str) and isinstance(error.get("code"), str)
    return is_envelope(data)


def http_bytes(method, path, body=b"", version="HTTP/1.1", headers=None, content_length="auto"):
    """One request as bytes; `content_length`: "auto" (the body's), None (no header) or a raw value."""
    lines = ["%s %s %s" % (method, path, version) if version else "%s %s" % (method, path)]
    hdrs = [("Host", "127.0.0.1")] + list(headers or [])
    if content_length == "auto":
        if body:
            hdrs.append(("Content-Length", str(len(body))))
    elif content_length is not None:
        hdrs.append(("Content-Length", content_length))
    lines += ["%s: %s" % kv for kv in hdrs]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "backslashreplace")
    return head + body


def assert_error(resp, data, status, code, field=None):
    """A JSON (not SSE) answer with this status and the envelope of this code."""
    assert resp.status == status and resp.getheader("Content-Type") == "application/json", (resp.status, data)
    assert is_envelope(data), data
    assert data["error"]["code"] == code, data
    if field is not None:
        assert data["error"]["details"].get("field") == field, data
    return data["error"]


# ============================================================================================
# 1. The fuzz: a few hundred malformed requests per role, seeded and bounded
# ============================================================================================

def surrogate_json(obj, field):
    """JSON text of `obj` whose string `field` is a lone surrogate (a valid JSON escape, no Unicode)."""
    return json.dumps(dict(obj, **{field: "\ud800"}))   # ensure_ascii: written as the escape \ud800


WRONG = [None, 0, -1, 1.5, 10 ** 23, -10 ** 23, True, False, "", " ", "x" * 5000, "\ud800", "a\udfffb",
         [], [1], ["\ud800"], {}, {"a": None}, {"a": [1, {"b": "\ud800"}]}, "\x00", "../../etc/passwd",
         float("inf"), float("nan")]

# Each role: routes (method, path template, base body or None, the fields its handler checks).
# A base body is refused on its own by design (a model no hive has, a node nobody registered),
# so that no fuzzed request starts a download, a worker or a hive. Shutdown routes are fuzzed
# without their key only (with it they would end the role).
ROLES = {
    "worker": {
        "routes": [("GET", "/health", None, ()),
                   ("POST", "/execute", {"prompt": "Hi", "max_tokens": 2, "temperature": 0, "raw": True},
                    ("prompt", "job_id", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "raw")),
                   ("POST", "/cancel", {"job_id": "job-x"}, ("job_id",))],
        "shutdown": [("POST", "/shutdown")],
    },
    "hive": {
        "routes": [("GET", "/v1/health", None, ()), ("GET", "/v1/workers/list", None, ()),
                   ("GET", "/v1/models", None, ()),
                   ("POST", "/v1/workers/spawn", {"model_ref": GONE, "backend": "cpu", "device": 0},
                    ("model_ref", "model", "backend", "device")),
                   ("POST", "/v1/workers/ready", {"worker_id": "worker-nobody", "url": "http://127.0.0.1:1",
                                                  "load_ms": 5}, ("worker_id", "url", "load_ms", "port")),
                   ("POST", "/v1/workers/worker-nobody/shutdown", {}, ()),
                   ("POST", "/v1/models/download", {"model_ref": GONE}, ("model_ref", "model")),
                   ("POST", "/v1/models/remove", {"model_ref": "hf:fuzz/nothing-here"}, ("model_ref", "model"))],
        "shutdown": [("POST", "/v1/shutdown")],
    },
    "queen": {
        "routes": [("GET", "/health", None, ()), ("GET", "/v2/workers", None, ()), ("GET", "/v2/status", None, ()),
                   ("GET", "/v2/models?node=fuzz-nowhere", None, ()),
                   ("POST", "/v2/tasks", {"node": "fuzz-nowhere", "model": "hf:fuzz/none", "backend": "cpu",
                                          "device": 0}, ("node", "model", "backend", "device")),
                   ("POST", "/v2/workers/shutdown", {"node": "fuzz-nowhere", "worker_id": "worker-x"},
                    ("node", "worker_id")),
                   ("POST", "/v2/models/download", {"node": "fuzz-nowhere", "model_ref": "hf:fuzz/none"},
                    ("node", "model_ref")),
                   ("POST", "/v2/models/remove", {"node": "fuzz-nowhere", "model_ref": "hf:fuzz/none"},
                    ("node", "model_ref"))],
        "shutdown": [("POST", "/v2/shutdown")],
    },
}
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT", "BREW", "get",
           "PROPFIND", "X" * 300, "G\x7fT", "POST\x00"]
VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/0.9", "HTTP/2.0", "HTTP/3", "HTTP/1.1.1", "HTTP/x.y", "HTTP/", "FOO/1.0",
            "http/1.1", "HTTP/1.01", "HTTP/99999999999999999999.0", None]


def deep(n=10000, kind="array"):
    return ("[" * n + "]" * n) if kind == "array" else ('{"a":' * n + "1" + "}" * n)


def fuzz_cases(kind, rng, count):
    """`count` malformed requests for role `kind`: (description, request bytes)."""
    spec, key = ROLES[kind], {"worker": WORKER_KEY, "hive": HIVE_TOKEN, "queen": QUEEN_KEY}[kind]
    routes = spec["routes"]
    body_routes = [r for r in routes if r[2] is not None]
    all_paths = [r[1] for r in routes] + [p for _, p in spec["shutdown"]]

    def auth():
        roll = rng.random()
        if roll < 0.85:
            return [("Authorization", "Bearer " + key)]
        return rng.choice([[], [("Authorization", "Bearer wrong")], [("Authorization", "Bearer")],
                           [("Authorization", "Basic " + key)], [("Authorization", "Bearer " + key + "\xff")],
                           [("Authorization", "bearer  " + "k" * 5000)]])

    def post(path, text, what, extra=()):
        body = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
        headers = auth() + [("Content-Type", "application/json")] + list(extra)
        return what, http_bytes("POST", path, body, headers=headers)

    cases = []
    for i in range(count):
        family = rng.choices(["field", "surrogate", "deep", "nonobject", "malformed", "big", "method",
                              "wrongmethod", "path", "version", "headers", "shutdown"],
                             [30, 10, 6, 6, 8, 2, 8, 8, 8, 8, 8, 3])[0]
        method, path, base, fields = rng.choice(body_routes)
        if family == "field" and fields:
            field, value = rng.choice(fields), rng.choice(WRONG)
            text = json.dumps(dict(base, **{field: value}))
            cases.append(post(path, text, "%s %s %s=%r" % (method, path, field, value)[:200]))
        elif family == "surrogate" and fields:
            field = rng.choice(fields)
            cases.append(post(path, surrogate_json(base, field), "%s %s %s=\\ud800" % (method, path, field)))
        elif family == "deep":
            where = rng.choice(["body", "field", "string"])
            if where == "body":
                text = deep(10000, rng.choice(["array", "object"]))
            elif where == "field" and fields:
                text = json.dumps(dict(base, **{rng.choice(fields): 0})).replace(": 0", ": " + deep(10000), 1)
            else:   # brackets inside a string are no nesting: the body is refused for its other field
                text = json.dumps(dict(base, **{"max_tokens": "x", "node": 5, "model_ref": 5,
                                                "worker_id": 5, "job_id": 5, "deep": "[" * 10000}))
            cases.append(post(path, text, "%s %s nested 10000 deep (%s)" % (method, path, where)))
        elif family == "nonobject":
            text = rng.choice(["[]", "1", '"str"', "null", "true", "1e999", "NaN", "[" + json.dumps(base) + "]",
                               '"\\ud800"'])
            cases.append(post(path, text, "%s %s body %s" % (method, path, text[:40])))
        elif family == "malformed":
            text = rng.choice([b"{", b'{"prompt": "x"', b'{"a": 1}}', b"\xff\xfe{}", b'{"model_ref": "\xff"}',
                               b'{"node": ' + b"1" * 5000 + b"}", b"\xef\xbb\xbf{}", b'{"a": "\\x"}',
                               b"{'single': 'quotes'}", b"\x00" * 64, b'{"device": 1e400}',
                               json.dumps(base).encode()[:-3]])
            cases.append(post(path, text, "%s %s malformed %r" % (method, path, text[:40])))
        elif family == "big":
            text = json.dumps(dict(base, pad="x" * (MiB + rng.randint(1, 4096))))
            cases.append(post(path, text, "%s %s body over 1 MiB" % (method, path)))
        elif family == "method":
            m, p = rng.choice(METHODS), rng.choice(all_paths + ["/", "/nope", "*"])
            if p in [s for _, s in spec["shutdown"]] and m == "POST":
                m = "BREW"
            cases.append(("%s %s" % (m[:20], p), http_bytes(m, p, headers=auth())))
        elif family == "wrongmethod":
            m, p = rng.choice([(m, p) for m in ("GET", "POST", "PUT", "DELETE", "PATCH", "BREW")
                               for r_m, p, _, _ in routes if m != r_m and not (m == "GET" and "?" in p)])
            body = b"{}" if m != "GET" else b""
            cases.append(("%s %s (wrong method)" % (m, p), http_bytes(m, p, body, headers=auth())))
        elif family == "path":
            p = rng.choice(["/" + "a" * 70000, "/%ff%fe", "/v1/workers/%00/shutdown", "/v1/workers/\xff/shutdown",
                            "/../../etc/passwd", "//health", "http://evil.example/health", "/health?x=%ud800",
                            "/v2/workers?node=%ed%a0%80", "/v2/workers?node=" + "n" * 3000, "/v1/workers//shutdown",
                            "/execute/", "/HEALTH", "/v2/models?node=", "/v2/models?node=%00", "/\t/x", "/;"])
            m = "GET" if rng.random() < 0.5 else "DELETE"
            cases.append(("%s path %r" % (m, p[:60]), http_bytes(m, p, headers=auth())))
        elif family == "version":
            v = rng.choice(VERSIONS)
            p = rng.choice([r[1] for r in routes if r[2] is None])
            cases.append(("GET %s %s" % (p, v), http_bytes("GET", p, version=v, headers=auth() if v else ())))
        elif family == "headers":
            variant = rng.choice(["cl-neg", "cl-text", "cl-float", "cl-two", "chunked", "long-line", "many",
                                  "no-colon", "latin1", "no-host-cl0", "cl-zero-with-body"])
            body = json.dumps(base).encode()
            if variant == "cl-neg":
                data = http_bytes(method, path, body, headers=auth(), content_length="-5")
            elif variant == "cl-text":
                data = http_bytes(method, path, body, headers=auth(), content_length="abc")
            elif variant == "cl-float":
                data = http_bytes(method, path, body, headers=auth(), content_length="1e3")
            elif variant == "cl-two":
                data = http_bytes(method, path, body, headers=auth() + [("Content-Length", "0")])
            elif variant == "chunked":
                data = http_bytes(method, path, b"2\r\n{}\r\n0\r\n\r\n", content_length=None,
                                  headers=auth() + [("Transfer-Encoding", "chunked")])
            elif variant == "long-line":
                data = http_bytes(method, path, body, headers=auth() + [("X-Long", "y" * 70000)])
            elif variant == "many":
                data = http_bytes(method, path, body, headers=auth() + [("X-H%d" % n, "v") for n in range(150)])
            elif variant == "no-colon":
                data = http_bytes(method, path, body, headers=auth() + [("NoColonHere", "")]).replace(
                    b"NoColonHere: ", b"NoColonHere")
            elif variant == "latin1":
                data = http_bytes(method, path, body, headers=auth() + [("X-Bytes", "\xff\xfe\x80")])
            elif variant == "no-host-cl0":
                data = http_bytes(method, path, b"", headers=auth(), content_length="0").replace(
                    b"Host: 127.0.0.1\r\n", b"")
            else:
                data = http_bytes(method, path, b"", headers=auth(), content_length="0")
            cases.append(("%s %s header %s" % (method, path, variant), data))
        elif family == "shutdown":
            m, p = rng.choice(spec["shutdown"])
            hdrs = rng.choice([[], [("Authorization", "Bearer wrong")], [("Authorization", "Bearer ")]])
            cases.append(("%s %s without its key" % (m, p), http_bytes(m, p, b"{}", headers=hdrs)))
        else:   # a route without checked fields drew a field family: its body as a non-object
            cases.append(post(path, "[1, 2]", "%s %s body [1, 2]" % (method, path)))
    return cases


def slow_cases(kind):
    """Requests whose body never fully arrives on a kept-open connection (bounded by BODY_TIMEOUT)."""
    path = {"worker": "/execute", "hive": "/v1/models/download", "queen": "/v2/models/download"}[kind]
    key = {"worker": WORKER_KEY, "hive": HIVE_TOKEN, "queen": QUEEN_KEY}[kind]
    auth = [("Authorization", "Bearer " + key)]
    return [("%s Content-Length 100, 10 bytes sent" % path,
             http_bytes("POST", path, b'{"prompt":', headers=auth, content_length="100")),
            ("%s Content-Length 2 MiB, 2 bytes sent" % path,
             http_bytes("POST", path, b"{}", headers=auth, content_length=str(2 * MiB))),
            ("%s Content-Length 10**20, nothing sent" % path,
             http_bytes("POST", path, b"", headers=auth, content_length=str(10 ** 20)))]


def run_fuzz(role, seed, count=300):
    rng = random.Random(seed)
    cases = fuzz_cases(role.kind, rng, count)
    histogram, problems = collections.Counter(), []
    slow_results = []

    def slow(desc, data):
        started = time.monotonic()
        answer, note = exchange(role.port, data, timeout=20, hold_open=True)
        slow_results.append((desc, answer, note, time.monotonic() - started))
    threads = [threading.Thread(target=slow, args=case) for case in slow_cases(role.kind)]
    for t in threads:
        t.start()
    started, answer_times = time.monotonic(), []
    for desc, data in cases:
        asked = time.monotonic()
        answer, note = exchange(role.port, data, timeout=30)
        answer_times.append(time.monotonic() - asked)
        outcome, status, body = classify(answer)
        histogram[outcome] += 1
        if status is None:
            problems.append("%s: %s (%s)" % (desc, outcome, note))
        elif status >= 500:
            problems.append("%s: %d %s" % (desc, status, body))
        elif status >= 300 and not is_error_of(role.kind, data, body):
            problems.append("%s: %d without the envelope: %r" % (desc, status, answer[:300]))
    for t in threads:
        t.join(30)
    bound = body_timeout_bound(answer_times)
    for desc, answer, note, took in slow_results:
        outcome, status, body = classify(answer)
        histogram[outcome] += 1
        if status is None or status >= 500 or not is_envelope(body):
            problems.append("%s: %s %r (%s)" % (desc, outcome, answer[:300], note))
        elif took > bound:
            problems.append("%s: answered after %.1f s (bound %.1f s)" % (desc, took, bound))
    took = time.monotonic() - started
    print("\nfuzz histogram, %s (seed %d, %d requests + %d held open, %.1f s): %s" % (
        role.kind, seed, len(cases), len(slow_results), took, dict(sorted(histogram.items()))))
    return histogram, problems, took


def assert_serves_afterwards(role):
    if role.kind == "worker":
        conn, resp = raw_request(role.port, "POST", "/execute", {"prompt": PROMPT, "max_tokens": 2, "raw": True,
                                                                 "temperature": 0}, key=WORKER_KEY)
        assert resp.status == 200, resp.read()
        events = [e for e, _, _ in sse_frames(resp)]
        conn.close()
        assert events[0] == "started" and events[-1] == "end" and events.count("token") == 2, events
    elif role.kind == "hive":
        resp, data = role.call("GET", "/v1/health")
        assert resp.status == 200 and data["status"] == "alive", data
        resp, data = role.call("GET", "/v1/models")
        assert resp.status == 200 and data == {"models": []}, data
    else:
        resp, data = role.call("GET", "/health", key=None)
        assert resp.status == 200 and data["status"] == "ok", data
        resp, data = role.call("GET", "/v2/workers")
        assert resp.status == 200 and data["workers"] == [], data


@pytest.mark.parametrize("kind, seed", [("worker", 9001), ("hive", 9002), ("queen", 9003)])
def test_fuzz_every_malformed_request_gets_a_4xx_envelope(start_role, kind, seed):
    role = start_role(kind)
    histogram, problems, took = run_fuzz(role, seed)
    assert problems == [], "%d bad answers:\n%s" % (len(problems), "\n".join(problems[:40]))
    assert not histogram["500"] and not histogram["501"]
    assert not histogram["no status line"] and not histogram["empty reply"]
    assert sum(histogram.values()) >= 300
    assert role.proc.proc.poll() is None, "the %s exited" % kind
    assert_serves_afterwards(role)
    assert tracebacks(role.proc.lines, role.home) == []


# ============================================================================================
# 2. Named regressions, items 1-5
# ============================================================================================

POST_ROUTES = {   # every POST endpoint that reads a body (the role shutdowns take none)
    "worker": ["/execute", "/cancel"],
    "hive": ["/v1/workers/spawn", "/v1/workers/ready", "/v1/models/download", "/v1/models/remove"],
    "queen": ["/v2/tasks", "/v2/workers/shutdown", "/v2/models/download", "/v2/models/remove"],
}


@pytest.mark.parametrize("kind, path, field", [("worker", "/execute", "prompt"),
                                               ("hive", "/v1/models/download", "model_ref"),
                                               ("queen", "/v2/workers/shutdown", "worker_id")])
def test_item1_lone_surrogate_is_invalid_request(start_role, kind, path, field):
    role = start_role(kind)
    base = {"worker": {"max_tokens": 2}, "hive": {}, "queen": {"node": "localhost"}}[kind]
    raw = surrogate_json(base, field).encode()
    assert b"\\ud800" in raw
    resp, data = role.call("POST", path, raw=raw)
    assert_error(resp, data, 400, "INVALID_REQUEST", field)
    assert_serves_afterwards(role)
    assert tracebacks(role.proc.lines, role.home) == []


@pytest.mark.parametrize("kind", ["worker", "hive", "queen"])
def test_item2_json_nested_10000_deep_is_400_on_every_post_endpoint(start_role, kind):
    role = start_role(kind)
    for path in POST_ROUTES[kind]:
        for text in (deep(10000, "array"), deep(10000, "object"), '{"model_ref": %s}' % deep(10000)):
            resp, data = role.call("POST", path, raw=text.encode())
            assert_error(resp, data, 400, "INVALID_REQUEST", "body")
    assert_serves_afterwards(role)
    assert tracebacks(role.proc.lines, role.home) == []


def test_item3_wrong_types_never_reach_sqlite_or_dicts(start_role):
    queen, hive = start_role("queen"), start_role("hive")
    for node in ([1], 10 ** 23, {"a": 1}, True, ""):
        resp, data = queen.call("POST", "/v2/models/remove", {"node": node, "model_ref": "hf:a/b"})
        assert_error(resp, data, 400, "INVALID_REQUEST", "node")
    for worker_id in ([], {}, 10 ** 23, None, ""):
        resp, data = hive.call("POST", "/v1/workers/ready", {"worker_id": worker_id, "url": "http://127.0.0.1:1"})
        assert_error(resp, data, 400, "INVALID_REQUEST", "worker_id")
    for body in ({"node": [1], "model_ref": "hf:a/b"}, {"node": 10 ** 23, "model_ref": "hf:a/b"},
                 {"model_ref": [1]}, {"model_ref": {"a": 1}}, {"model_ref": 10 ** 23}):
        resp, data = queen.call("POST", "/v2/models/download", body)
        assert 400 <= resp.status < 500 and resp.getheader("Content-Type") == "application/json", (resp.status, data)
        assert is_envelope(data) and data["error"]["code"] != "INTERNAL", data
    for role in (queen, hive):
        assert_serves_afterwards(role)
        assert tracebacks(role.proc.lines, role.home) == []


@pytest.mark.parametrize("kind", ["worker", "hive", "queen"])
def test_item4_protocol_errors_get_a_status_line_and_the_envelope(start_role, kind):
    role = start_role(kind)
    path = {"worker": "/execute", "hive": "/v1/models/download", "queen": "/v2/models/download"}[kind]
    held = {}

    def short_body():   # a Content-Length larger than the body, the connection kept open
        started = time.monotonic()
        answer, _ = exchange(role.port, http_bytes("POST", path, b'{"model_ref": "hf:a/b", "prom',
                                                   headers=[("Authorization", "Bearer " + role.key)],
                                                   content_length="200"), timeout=30, hold_open=True)
        held.update(answer=answer, took=time.monotonic() - started)
    thread = threading.Thread(target=short_body)
    thread.start()

    answer_times = []
    for line, status in (("GET %s HTTP/2.0" % role.health_path, 400), ("GET %s" % role.health_path, 400),
                         ("BREW %s HTTP/1.1" % role.health_path, 405), ("PURGE %s HTTP/1.0" % path, 405)):
        asked = time.monotonic()
        answer, note = exchange(role.port, (line + "\r\n\r\n").encode())
        answer_times.append(time.monotonic() - asked)
        outcome, got, data = classify(answer)
        assert got == status, (line, answer, note)
        assert is_envelope(data) and data["error"]["code"] == "INVALID_REQUEST", (line, answer)
        assert "bug in rbee" not in answer.decode("utf-8", "replace")
        if status == 405:
            assert data["error"]["details"]["allowed"] in (["GET"], ["POST"]), data

    thread.join(20)
    outcome, got, data = classify(held["answer"])
    assert got == 400 and is_envelope(data) and data["error"]["code"] == "INVALID_REQUEST", held
    assert held["took"] < body_timeout_bound(answer_times), (held, answer_times)
    assert_serves_afterwards(role)
    assert tracebacks(role.proc.lines, role.home) == []


@pytest.mark.parametrize("body, status, code", [
    ({"model_ref": GONE, "backend": "metal", "device": 0}, 400, "BACKEND_UNAVAILABLE"),
    ({"model_ref": GONE, "backend": "cpu", "device": 99}, 400, "DEVICE_NOT_FOUND"),
    ({"model_ref": "ollama:llama3", "backend": "cpu", "device": 0}, 400, "INVALID_MODEL_REF"),
    ({"model_ref": "file:relative/model.gguf"}, 400, "INVALID_MODEL_REF"),
    ({"model_ref": GONE, "backend": "cpu", "device": 0}, 404, "MODEL_NOT_FOUND")])
def test_item5_errors_known_before_a_spawn_stream_have_their_own_status(start_role, tmp_path, body, status, code):
    hive = start_role("hive")
    resp, data = hive.call("POST", "/v1/workers/spawn", body)
    error = assert_error(resp, data, status, code)
    assert error["message"] and error.get("suggestion"), error
    if code in ("INVALID_MODEL_REF", "MODEL_NOT_FOUND"):   # the same on the download endpoint
        resp, data = hive.call("POST", "/v1/models/download", {"model_ref": body["model_ref"]})
        assert_error(resp, data, status, code)
    assert [pid for pid, _ in rbee_processes(str(tmp_path))] == [hive.proc.proc.pid]   # no worker started
    assert tracebacks(hive.proc.lines, hive.home) == []


def test_item5_queen_refuses_unknown_nodes_and_bad_refs_before_the_stream(start_role):
    queen = start_role("queen")
    for path, body in (("/v2/tasks", {"node": "atlantis", "model": "hf:a/b"}),
                       ("/v2/models/download", {"node": "atlantis", "model_ref": "hf:a/b"}),
                       ("/v2/models/remove", {"node": "atlantis", "model_ref": "hf:a/b"}),
                       ("/v2/workers/shutdown", {"node": "atlantis", "worker_id": "worker-1"})):
        resp, data = queen.call("POST", path, body)
        error = assert_error(resp, data, 404, "NODE_NOT_FOUND")
        assert error["details"]["node"] == "atlantis" and error.get("suggestion"), error
    resp, data = queen.call("GET", "/v2/models?node=atlantis")
    assert_error(resp, data, 404, "NODE_NOT_FOUND")
    for path, body in (("/v2/tasks", {"node": "localhost", "model": "ollama:llama3"}),
                       ("/v2/models/download", {"model_ref": "file:relative.gguf"})):
        resp, data = queen.call("POST", path, body)
        assert_error(resp, data, 400, "INVALID_MODEL_REF")
    assert "hive" not in " ".join(c for _, c in rbee_processes(str(queen.home)))   # nothing started
    assert tracebacks(queen.proc.lines, queen.home) == []


# ============================================================================================
# 3. Faults a user meets, with the exact code they see (items 6, 7, 8, 9, 11)
# ============================================================================================

@pytest.fixture
def hub(model_path):
    """A local Hugging Face endpoint serving the real model (throttled by the tests that need it)."""
    with FakeHub() as hub:
        hub.add_file(REPO_ID, CHOSEN, path=model_path)
        yield hub


def keeper_error(stderr):
    """The `code:` of the error block the keeper printed."""
    match = re.search(r"^    code: ([A-Z_]+)$", stderr, re.M)
    return match.group(1) if match else None


def partial_of(rbee_home):
    return rbee_home / "models" / REPO_ID.replace("/", "--") / (CHOSEN + ".partial")


def pid_of(marker, word):
    found = [pid for pid, cmd in rbee_processes(marker) if " %s " % word in cmd]
    return found[0] if found else None


@pytest.mark.parametrize("victim", ["hive", "queen"])
def test_item6_a_hop_that_dies_mid_download_is_named(roles, env, hub, rbee_home, tmp_path, victim):
    hub.throttle(REPO_ID, CHOSEN, 8 * MiB)   # ~12 s for the whole file
    queen = start_queen(roles, dict(env, HF_ENDPOINT=hub.url))   # its local hive inherits its environment
    keeper = start_keeper(["infer", "--node", "localhost", "--model", REF, "--prompt", PROMPT, "--max-tokens", "4",
                           "--queen", queen.url], env)
    try:
        wait_until(lambda: partial_of(rbee_home).exists() and partial_of(rbee_home).stat().st_size >= 8 * MiB,
                   60, 0.05, "the download to pass 8 MiB")
        pid = queen.proc.pid if victim == "queen" else pid_of(str(tmp_path), "hive")
        os.kill(pid, signal.SIGKILL)
        out, err = keeper.communicate(timeout=60)
    finally:
        if keeper.poll() is None:
            keeper.kill()
    err = err.decode()
    assert keeper.returncode == 1, err
    assert keeper_error(err) == "WORKER_CRASHED", err
    hop = {"hive": "rbee-hive", "queen": "queen-rbee"}[victim]
    error_line = next(l for l in err.splitlines() if "❌ Error:" in l)
    assert hop in error_line, error_line
    if victim == "hive":
        assert "localhost" in error_line, error_line
        assert re.search(r"^    node: localhost$", err, re.M), err
    assert re.search(r"^    hop: %s$" % hop, err, re.M), err
    assert re.search(r"^Suggestion: \S", err, re.M), err
    assert "bug in rbee" not in err and "INTERNAL" not in err and "Traceback" not in err, err
    assert out == b""
    if victim == "hive":
        resp, data = raw_call(int(queen.url.rsplit(":", 1)[1]), "GET", "/health")
        assert resp.status == 200   # the queen lives on
        os.kill(queen.proc.pid, signal.SIGTERM)
        assert queen.proc.wait(45) == 0
    assert_no_rbee_left(str(tmp_path), within=10)
    assert partial_of(rbee_home).exists()   # kept for a resume


def with_suppressed(fn, *args):
    try:
        fn(*args)
    except OSError:
        pass


def broken_gguf(tmp_path):
    path = tmp_path / "broken.Q4_0.gguf"
    path.write_bytes(b"GGUF" + os.urandom(4096))   # the magic, then garbage: llama.cpp cannot load it
    return path


def time_wait_on(port):
    """Leave 127.0.0.1:`port` in TIME_WAIT (the server side closes first, as a worker's does);
    False when another process listens there now (another test's worker took it)."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            server.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            return False
        server.listen(1)
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()   # active close: this end goes to TIME_WAIT
        time.sleep(0.05)
        client.close()
    return True
    out = subprocess.run(["ss", "-Htan", "state", "time-wait", "( sport = :%d )" % port], capture_output=True,
                         text=True).stdout
    assert "127.0.0.1:%d" % port in out, out


def test_item7_a_worker_that_cannot_load_is_started_once_even_with_its_port_in_time_wait(start_role, tmp_path,
                                                                                         rbee_home):
    hive = start_role("hive")
    model = broken_gguf(tmp_path)

    def spawn_that_fails():
        """A spawn of the model that cannot load: one worker start, its crash; the port it had."""
        logs = len(list((rbee_home / "logs").glob("worker-*.log")))
        conn, resp = raw_request(hive.port, "POST", "/v1/workers/spawn",
                                 {"model_ref": "file:%s" % model, "backend": "cpu", "device": 0}, key=HIVE_TOKEN,
                                 timeout=120)
        assert resp.status == 200
        events = [(e, d) for e, d, _ in sse_frames(resp)]
        conn.close()
        kind, data = events[-1]
        assert kind == "error" and data["error"]["code"] == "WORKER_CRASHED", events[-1]
        starts = [d for e, d in events if e == "narration" and d["human"].startswith("Worker starting on port")]
        assert len(starts) == 1, [d["human"] for e, d in events if e == "narration"]
        assert len(list((rbee_home / "logs").glob("worker-*.log"))) == logs + 1   # one worker start per spawn
        return int(starts[0]["human"].rsplit(" ", 1)[1])
    # the port the next worker will be given, put in TIME_WAIT (again if another test's worker
    # took it between the crash and now: with two tests at a time that happens)
    for _ in range(5):
        ports = [spawn_that_fails()]
        if time_wait_on(ports[0]):
            break
    else:
        pytest.fail("another process held the crashed worker's port each of 5 times")
    ports.append(spawn_that_fails())
    # TIME_WAIT is no lost port: the same one again, or a lower one another test's worker held
    # before and let go since, never one past it (unless another test's worker took it meanwhile)
    assert ports[1] <= ports[0] or port_open("127.0.0.1", ports[0]), ports
    assert [pid for pid, _ in rbee_processes(str(tmp_path))] == [hive.proc.proc.pid]
    assert tracebacks(hive.proc.lines, hive.home) == []


def test_item8_a_stopped_worker_is_connection_timeout_printed_before_the_cleanup(env, model_path, tmp_path):
    # the keeper's and, passed down, its ephemeral queen's: short, but long enough for a first
    # token on a machine busy with other tests (pytest -n 2 on 2 cores)
    env = dict(env, RBEE_TOKEN_TIMEOUT=str(TOKEN_TIMEOUT))
    keeper = start_keeper(["infer", "--node", "localhost", "--model", "file:" + model_path, "--prompt", PROMPT,
                           "--max-tokens", "1500", "--temperature", "0.8", "--seed", "7", "--raw", "--json"], env)
    lines, worker_pid = [], None
    try:
        def read_stderr():
            for raw in iter(keeper.stderr.readline, b""):
                lines.append((time.monotonic(), raw.decode("utf-8", "replace").rstrip("\n"), keeper.poll()))
        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        read_until_tokens(keeper, 3)
        threading.Thread(target=lambda: keeper.stdout.read(), daemon=True).start()   # drain the rest
        worker_pid = pid_of(str(tmp_path), "worker")
        assert worker_pid, rbee_processes(str(tmp_path))
        os.kill(worker_pid, signal.SIGSTOP)
        stopped = time.monotonic()
        seen = wait_until(lambda: next((l for l in lines if "code: CONNECTION_TIMEOUT" in l[1]), None), 20, 0.02,
                          "the keeper's CONNECTION_TIMEOUT")
        at, _, keeper_exit_then = seen
        assert at - stopped <= TOKEN_TIMEOUT + 4, "the error came %.1f s after the stop" % (at - stopped)
        assert keeper_exit_then is None   # printed first: the keeper still cleans up
        os.kill(worker_pid, signal.SIGKILL)
        assert keeper.wait(60) == 1
        reader.join(5)
    finally:
        if worker_pid:
            with_suppressed(os.kill, worker_pid, signal.SIGCONT)
        if keeper.poll() is None:
            keeper.kill()
    text = "\n".join(l for _, l, _ in lines)
    assert re.search(r"^\[llm-worker-rbee\] ❌ Error: .*$", text, re.M), text
    assert re.search(r"^Suggestion: \S", text, re.M), text
    assert "Traceback" not in text and "bug in rbee" not in text
    assert_no_rbee_left(str(tmp_path), within=10)


def test_item9_a_full_disk_mid_download_is_insufficient_disk_at_once(start_hive, hub, rbee_home, model_path):
    models = rbee_home / "models"
    models.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(models)], check=True)
    hive = None
    try:
        hub.throttle(REPO_ID, CHOSEN, 8 * MiB)
        hive = start_hive(node_name="diskfull", extra_env=dict(RBEE_HIVE_TOKEN=HIVE_TOKEN, HF_ENDPOINT=hub.url))
        port = hive.port
        conn, resp = raw_request(port, "POST", "/v1/models/download", {"model_ref": REF}, key=HIVE_TOKEN,
                                 timeout=120)
        assert resp.status == 200
        events, done = [], threading.Event()

        def read():
            for event, data, at in sse_frames(resp):
                events.append((event, data, at))
            done.set()
        threading.Thread(target=read, daemon=True).start()
        partial = partial_of(rbee_home)
        wait_until(lambda: partial.exists() and partial.stat().st_size >= 2 * MiB, 30, 0.02,
                   "the partial download to pass 2 MiB")
        two = time.monotonic()
        wait_until(lambda: partial.exists() and partial.stat().st_size >= 4 * MiB, 30, 0.02,
                   "the partial download to pass 4 MiB")
        pace = time.monotonic() - two   # 2 MiB of this download, at this machine's pace now
        remaining = os.path.getsize(model_path) - partial.stat().st_size
        # leave 1-2 MiB, less than what the model still needs; the download goes on writing meanwhile,
        # so the free space is read before each MiB and a disk the two filled together ends it too
        chunk = b"\0" * MiB
        with open(models / "filler", "wb", buffering=0) as f:
            try:
                while shutil.disk_usage(str(models)).free > 2 * MiB:
                    f.write(chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
        filled = time.monotonic()
        assert shutil.disk_usage(str(models)).free < remaining
        assert done.wait(30), "no end of the stream"
        conn.close()
        kind, data, at = events[-1]
        assert kind == "error", events[-1]
        error = data["error"]
        assert error["code"] == "INSUFFICIENT_DISK", error
        assert error["details"]["required_bytes"] > error["details"]["free_bytes"] >= 0, error
        # 5 s, or 20 times the pace of 2 MiB measured above when the machine is slower: the ~90 MiB
        # left would take 45 of them, so an error that came only at the download's end still fails
        bound = max(5.0, 20 * pace)
        assert at - filled < bound, "the error came %.1f s after the disk filled (bound %.1f s)" % (at - filled, bound)
        assert "free" in error["message"] and error.get("suggestion"), error
        assert not [d for e, d, _ in events if e == "narration" and d.get("action") == "download_retry"]
        assert [e for e, _, _ in events].count("error") == 1
        assert partial.exists() and partial.stat().st_size >= 4 * MiB   # kept for a resume
        assert not (partial.parent / CHOSEN).exists()
        rows = sqlite3.connect(str(rbee_home / "models.db")).execute("SELECT COUNT(*) FROM models").fetchone()
        assert rows == (0,)
        assert hive.proc.poll() is None
        assert not [l for l in hive.lines if "Traceback" in l]
    finally:
        if hive is not None:
            hive.kill()
        subprocess.run(["umount", str(models)]).returncode == 0 or subprocess.run(["umount", "-l", str(models)])


def fifo_ref(tmp_path):
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    return "file:%s" % fifo


def not_gguf_ref(tmp_path):
    path = tmp_path / "not-a-model.gguf"
    path.write_bytes(b"GGML" + b"\0" * 4096)
    path.chmod(0)
    return "file:%s" % path


FILE_REFS = {"passwd": lambda t: "file:/etc/passwd", "environ": lambda t: "file:/proc/self/environ",
             "missing": lambda t: "file:/nonexistent/x.gguf", "directory": lambda t: "file:%s" % t,
             "fifo": fifo_ref, "not-gguf": not_gguf_ref}
NOT_GGUF = re.compile(r"^(file:/\S*) is not a readable GGUF model file$")


def catalog_count(rbee_home):
    if not (rbee_home / "models.db").exists():
        return 0
    db = sqlite3.connect(str(rbee_home / "models.db"))
    try:
        return db.execute("SELECT COUNT(*) FROM models").fetchone()[0]
    finally:
        db.close()


@pytest.mark.parametrize("which", list(FILE_REFS))
def test_item11_a_file_model_that_is_no_gguf_is_model_not_found_for_the_user(env, tmp_path, rbee_home, which):
    ref = FILE_REFS[which](tmp_path)
    result = run_rbee(["infer", "--node", "localhost", "--model", ref, "--prompt", "hi", "--max-tokens", "2"], env,
                      timeout=120)
    assert result.returncode == 1, result.stderr
    assert keeper_error(result.stderr) == "MODEL_NOT_FOUND", result.stderr
    error_line = next(l for l in result.stderr.splitlines() if "❌ Error:" in l)
    message = error_line.split("❌ Error: ", 1)[1]
    assert NOT_GGUF.match(message) and NOT_GGUF.match(message).group(1) == ref, message
    assert "Suggestion:" in result.stderr and "Traceback" not in result.stderr
    assert "Worker starting" not in result.stderr
    assert not list((rbee_home / "logs").glob("worker-*")) if (rbee_home / "logs").exists() else True
    assert catalog_count(rbee_home) == 0
    assert_no_rbee_left(str(tmp_path))


def test_item11_one_answer_for_every_kind_of_non_model_on_the_hive(start_role, tmp_path, rbee_home):
    """Missing, unreadable, not a file, not GGUF: the same status, code and message shape on
    spawn and download, so the answer tells nobody whether some other file exists."""
    hive = start_role("hive")
    shapes = set()
    for which, make in FILE_REFS.items():
        ref = make(tmp_path)
        for path, body in (("/v1/workers/spawn", {"model_ref": ref, "backend": "cpu", "device": 0}),
                           ("/v1/models/download", {"model_ref": ref})):
            resp, data = hive.call("POST", path, body)
            error = assert_error(resp, data, 404, "MODEL_NOT_FOUND")
            assert NOT_GGUF.match(error["message"]) and NOT_GGUF.match(error["message"]).group(1) == ref, error
            shapes.add((json.dumps(sorted(error["details"])), error["suggestion"]))
        if which == "fifo":   # (recreated for the next kind: each call made its own)
            os.remove(ref[len("file:"):])
        elif which == "not-gguf":
            os.remove(ref[len("file:"):])
    assert len(shapes) == 1, shapes
    assert not list((rbee_home / "logs").glob("worker-*"))
    assert catalog_count(rbee_home) == 0
    assert [pid for pid, _ in rbee_processes(str(tmp_path))] == [hive.proc.proc.pid]


# ============================================================================================
# 4. Authentication where the network reaches (item 13)
# ============================================================================================

def argv_and_logs_hold_none_of(secrets, marker, rbee_home):
    for pid, cmd in rbee_processes(marker):
        for secret in secrets:
            assert secret not in cmd, (pid, cmd)
    logs = rbee_home / "logs"
    for path in sorted(logs.glob("**/*")) if logs.exists() else ():
        if path.is_file():
            text = path.read_text("utf-8", "replace")
            for secret in secrets:
                assert secret not in text, path


def assert_logs_are_private(rbee_home):
    logs = sorted(p for p in (rbee_home / "logs").glob("**/*") if p.is_file())
    assert logs
    for path in logs:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, (path, oct(path.stat().st_mode))


def test_item13_a_hive_on_the_network_requires_its_token(start_hive, rbee_home, tmp_path, model_path):
    hive = start_hive(host="0.0.0.0", node_name="lan")
    port = hive.port
    created = hive.wait_event("key_created", timeout=30)
    token_file = rbee_home / "hive-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 16 and created["path"] == str(token_file) and str(token_file) in created["human"]
    assert token not in "\n".join(hive.lines)

    resp, data = raw_call(port, "GET", "/v1/health")   # health is always open
    assert resp.status == 200 and data["status"] == "alive"
    spawn_body = {"model_ref": "file:" + model_path, "backend": "cpu", "device": 0}
    for key in (None, "wrong-token"):
        code = "MISSING_API_KEY" if key is None else "INVALID_API_KEY"
        for method, path, body in (("POST", "/v1/workers/spawn", spawn_body),
                                   ("POST", "/v1/models/download", {"model_ref": "file:" + model_path}),
                                   ("POST", "/v1/workers/worker-x/shutdown", {}), ("POST", "/v1/shutdown", {}),
                                   ("GET", "/v1/workers/list", None), ("GET", "/v1/models", None)):
            resp, data = raw_call(port, method, path, body, key=key)
            assert_error(resp, data, 401, code)
    assert hive.proc.poll() is None and not [p for p, c in rbee_processes(str(tmp_path)) if " worker " in c]

    # with the token: they work
    conn, resp = raw_request(port, "POST", "/v1/models/download", {"model_ref": "file:" + model_path}, key=token,
                             timeout=60)
    assert resp.status == 200 and [e for e, _, _ in sse_frames(resp)][-1] == "end"
    conn.close()
    conn, resp = raw_request(port, "POST", "/v1/workers/spawn", spawn_body, key=token, timeout=120)
    assert resp.status == 200
    kind, worker, _ = list(sse_frames(resp))[-1]
    conn.close()
    assert kind == "worker", worker
    worker_port = int(worker["url"].rsplit(":", 1)[1])
    assert worker["url"] == "http://127.0.0.1:%d" % worker_port

    # a forged ready callback changes nothing
    forged = {"worker_id": worker["worker_id"], "url": "http://attacker.example:1", "model_ref": "file:" + model_path,
              "backend": "cpu", "device": 0, "port": 1, "load_ms": 1}
    for key in (token, None, worker["api_key"]):
        resp, data = raw_call(port, "POST", "/v1/workers/ready", forged, key=key)
        assert resp.status == 401 and is_envelope(data), (resp.status, data)
    resp, data = raw_call(port, "GET", "/v1/workers/list", key=token)
    [listed] = data["workers"]
    assert listed["url"] == "http://127.0.0.1:%d" % worker_port == worker["url"], listed
    assert listed["port"] == worker_port

    argv_and_logs_hold_none_of([token, worker["api_key"]], str(tmp_path), rbee_home)
    assert_logs_are_private(rbee_home)

    resp, data = raw_call(port, "POST", "/v1/workers/%s/shutdown" % worker["worker_id"], {}, key=token)
    assert resp.status == 202, data
    wait_until(lambda: not [p for p, c in rbee_processes(str(tmp_path)) if " worker " in c], 30,
               what="the worker to stop")
    resp, data = raw_call(port, "POST", "/v1/shutdown", {}, key=token)
    assert resp.status == 202, data
    assert hive.proc.wait(30) == 0
    assert_no_rbee_left(str(tmp_path))


def test_item13_a_queen_on_the_network_requires_its_key(roles, env, rbee_home, tmp_path, model_path):
    port = free_port("0.0.0.0")
    queen = roles("queen", "--host", "0.0.0.0", "--port", str(port), env=env)
    created = queen.wait_event("key_created", "queen-rbee", timeout=30)
    queen.wait_event("http_ready", "queen-rbee", timeout=30)
    key_file = rbee_home / "api-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    assert len(key) >= 16 and created["path"] == str(key_file)
    assert key not in "\n".join(queen.lines)

    resp, data = raw_call(port, "GET", "/health")
    assert resp.status == 200 and data["status"] == "ok"
    for bad in (None, "wrong"):
        resp, data = raw_call(port, "GET", "/v2/workers", key=bad)
        assert_error(resp, data, 401, "MISSING_API_KEY" if bad is None else "INVALID_API_KEY")
        resp, data = raw_call(port, "POST", "/v2/tasks", {"node": "localhost", "model": "hf:a/b"}, key=bad)
        assert_error(resp, data, 401, "MISSING_API_KEY" if bad is None else "INVALID_API_KEY")
        resp, data = raw_call(port, "POST", "/v2/shutdown", {}, key=bad)
        assert resp.status == 401, data
    assert queen.proc.poll() is None
    resp, data = raw_call(port, "GET", "/v2/workers", key=key)
    assert resp.status == 200 and data["workers"] == [], data

    url = "http://127.0.0.1:%d" % port
    listed = run_rbee(["workers", "list", "--queen", url], env)   # the keeper reads $RBEE_HOME/api-key
    assert listed.returncode == 0, listed.stderr
    wrong = run_rbee(["workers", "list", "--queen", url], dict(env, RBEE_API_KEY="wrong"))
    assert wrong.returncode == 1, wrong.stderr
    assert keeper_error(wrong.stderr) == "INVALID_API_KEY", wrong.stderr
    assert "Suggestion:" in wrong.stderr and "Traceback" not in wrong.stderr

    # a job through it (the keeper reads the key file): a hive and a worker run, their logs written
    job = run_rbee(["infer", "--node", "localhost", "--model", "file:" + model_path, "--prompt", "hi",
                    "--max-tokens", "2", "--queen", url], env)
    assert job.returncode == 0 and job.stdout, job.stderr
    assert [c for _, c in rbee_processes(str(tmp_path)) if " worker " in c]
    argv_and_logs_hold_none_of([key], str(tmp_path), rbee_home)
    assert_logs_are_private(rbee_home)
    resp, data = raw_call(port, "POST", "/v2/shutdown", {}, key=key)
    assert resp.status == 202, data
    assert queen.proc.wait(30) == 0
    assert_no_rbee_left(str(tmp_path))


@pytest.mark.parametrize("kind, key_file", [("hive", "hive-token"), ("queen", "api-key")])
def test_item13_an_empty_key_file_never_leaves_a_role_open(roles, env, rbee_home, tmp_path, kind, key_file):
    """A key file that exists but holds no key (truncated, touched) must not mean "no key": a
    role bound to 0.0.0.0 then either refuses to start or still requires a key."""
    (rbee_home / key_file).write_text("\n")
    port = free_port("0.0.0.0")
    role = roles(kind, "--host", "0.0.0.0", "--port", str(port), env=env)
    wait_until(lambda: role.proc.poll() is not None or port_open("127.0.0.1", port), 30, what="the %s" % kind)
    if role.proc.poll() is not None:   # refused to start: with a reason, no traceback
        assert role.proc.poll() == 1, role.lines
        assert not [l for l in role.lines if "Traceback" in l], role.lines
        return
    path, body = {"hive": ("/v1/models/download", {"model_ref": "file:/nonexistent/x.gguf"}),
                  "queen": ("/v2/models/download", {"node": "atlantis", "model_ref": "hf:a/b"})}[kind]
    for key in (None, "", "anything"):
        resp, data = raw_call(port, "POST", path, body, key=key)
        assert resp.status == 401, "%s on 0.0.0.0 with an empty %s answered %d without a key: %s" % (
            kind, key_file, resp.status, data)
    resp, data = raw_call(port, "GET", "/v1/models" if kind == "hive" else "/v2/workers")
    assert resp.status == 401, (resp.status, data)


def test_item13_a_key_no_http_header_can_carry_is_a_clear_error_not_a_bug(roles, env, rbee_home):
    queen = start_queen(roles, dict(env, RBEE_API_KEY="queen-key-0123456789"))
    result = run_rbee(["workers", "list", "--queen", queen.url], dict(env, RBEE_API_KEY="ключ-0123456789"))
    assert result.returncode == 1, result.stderr
    assert keeper_error(result.stderr) in ("INVALID_API_KEY", "INVALID_REQUEST"), result.stderr
    assert "bug in rbee" not in result.stderr and "Traceback" not in result.stderr, result.stderr
