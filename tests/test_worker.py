"""The worker (PROTOCOL.md §5.1, seed phases 9 and 13) as a real process on the real SmolLM2 model."""
import json
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import (WORKER_KEY as KEY, WORKER_PROMPT as PROMPT, execute, free_port, raw_call, raw_request,
                      run_job, run_together, sse_frames, wait_until)



@pytest.fixture
def worker(start_worker):
    """A worker with the defaults (4 slots, a queue of 64)."""
    return start_worker()


@pytest.fixture
def one_slot_worker(start_worker):
    """A worker of one slot and no queue: a second request gets 503."""
    return start_worker("--parallel", "1", "--max-queue", "0")


def token_pace(frames, count=5):
    """Read `count` tokens of a stream of (event, data, arrival) frames; the longest gap between two
    of them: how long a token takes at this machine's pace now (other tests share the CPU)."""
    arrivals = []
    for event, _, at in frames:
        if event == "token":
            arrivals.append(at)
            if len(arrivals) == count:
                break
    assert len(arrivals) == count, arrivals
    return max(b - a for a, b in zip(arrivals, arrivals[1:]))


def tokens_until(frames, predicate, limit=2000):
    """Read tokens of a running stream until `predicate()` holds: how many came meanwhile (a clock
    at the machine's own pace, which slows with it when other tests share the CPU)."""
    count = 0
    for event, _, _ in frames:
        if predicate():
            return count
        if event == "token":
            count += 1
            if count >= limit:
                break
    raise AssertionError("the stream ended (after %d tokens) before the condition held" % count)


def request(port, method, path, body=None, key=KEY, **kw):
    return raw_request(port, method, path, body, key=key, **kw)


def call(port, method, path, body=None, key=KEY, **kw):
    return raw_call(port, method, path, body, key=key, **kw)


sse_events = sse_frames


def test_streamed_text_equals_in_process_llama_cpp(worker, reference_llm):
    """temperature 0: the worker's stream is exactly llama-cpp-python's own completion."""
    events = run_job(worker.port, max_tokens=64, seed=1234)
    tokens = [d for e, d, _ in events if e == "token"]
    assert [t["i"] for t in tokens] == list(range(len(tokens)))
    streamed = "".join(t["t"] for t in tokens)

    llm = reference_llm
    expected = llm.create_completion(PROMPT, max_tokens=64, temperature=0, seed=1234)["choices"][0]["text"]
    assert streamed == expected
    assert len(streamed) > 20

    end = events[-1]
    assert end[0] == "end"
    assert end[1]["stop_reason"] in ("max_tokens", "eos")
    assert end[1]["tokens_out"] >= len(tokens)
    assert end[1]["tokens_per_sec"] > 0


def test_chat_template_by_default_equals_create_chat_completion(worker, reference_llm):
    """Without `raw`, the prompt is one user message in the model's own chat template: the same
    text as llama-cpp-python's create_chat_completion, as Ollama users expect."""
    events = run_job(worker.port, prompt="write a short story", max_tokens=40, raw=False)
    streamed = "".join(d["t"] for e, d, _ in events if e == "token")
    llm = reference_llm
    answer = llm.create_chat_completion(messages=[{"role": "user", "content": "write a short story"}],
                                        max_tokens=40, temperature=0)
    assert streamed == answer["choices"][0]["message"]["content"]
    raw = "".join(d["t"] for e, d, _ in run_job(worker.port, prompt="write a short story", max_tokens=40,
                                                 raw=True) if e == "token")
    assert streamed and streamed != raw
    tokenized = next(d for e, d, _ in events if e == "narration" and d["action"] == "tokenize")
    assert int(tokenized["human"].split("(")[1].split()[0]) > 10   # the template's tokens are counted
    assert call(worker.port, "POST", "/execute", {"prompt": "hi", "raw": "yes"})[1]["error"]["details"]["field"] \
        == "raw"


def test_tokens_stream_before_the_end(worker):
    """The first token arrives while the worker is still generating (streaming, not batching)."""
    events = run_job(worker.port, max_tokens=96)
    first = next(t for e, _, t in events if e == "token")
    end_event, end, end_at = events[-1]
    assert end_event == "end" and end["tokens_out"] == 96
    # the gap between the first token and the end covers most of the generation time
    assert (end_at - first) * 1000 >= 0.5 * end["decode_time_ms"]


def test_per_request_narration_follows_the_seed(worker):
    events = run_job(worker.port, max_tokens=25)
    assert events[0][0] == "started"
    narration = [d for e, d, _ in events if e == "narration"]
    actions = [(n["actor"], n["action"]) for n in narration]
    assert actions[:3] == [("llama-backend", "inference_start"), ("tokenizer", "tokenize"),
                           ("llama-backend", "cache_reset")]
    assert narration[0]["human"] == "Starting inference (prompt: %d chars, max_tokens: 25)" % len(PROMPT)
    assert narration[1]["human"].startswith("Tokenized prompt (") and "tokens)" in narration[1]["human"]
    assert [n["human"] for n in narration if n["action"] == "token_generate"] == [
        "Generated 10 tokens", "Generated 20 tokens"]
    complete = narration[-1]
    assert complete["action"] == "inference_complete"
    assert complete["human"].startswith("Inference complete! 25 tokens in ") and "tok/s)" in complete["human"]
    assert all(n.get("job_id") == "job-test" for n in narration)
    assert [e for e, _, _ in events].count("end") == 1 and events[-1][0] == "end"


def test_startup_narration_order_and_ready_callback(roles, env, model_path):
    received = []

    class Hive(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append((self.path, self.headers.get("Authorization"),
                             json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            body = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass
    hive = ThreadingHTTPServer(("127.0.0.1", 0), Hive)
    threading.Thread(target=hive.serve_forever, daemon=True).start()
    try:
        port = free_port()
        role = roles("worker", "--model", model_path, "--backend", "cpu", "--device", "0", "--port", str(port),
                     "--host", "127.0.0.1", "--worker-id", "worker-abc123", "--model-ref", "hf:Org/Repo-GGUF",
                     "--hive-url", "http://127.0.0.1:%d" % hive.server_address[1],
                     env=dict(env, RBEE_WORKER_API_KEY=KEY, RBEE_READY_TOKEN="ready-secret"))
        role.wait_event("ready_callback")
        wait_until(lambda: received, 10, what="the ready callback")
    finally:
        hive.shutdown()
    order = [(e["actor"], e["action"]) for e in role.events]
    assert order == [("llm-worker-rbee", "startup"), ("device-manager", "device_init"),
                     ("model-loader", "model_load"), ("model-loader", "model_loaded"),
                     ("http-server", "http_ready"), ("llm-worker-rbee", "ready_callback")]
    # readiness is a control line of its own, after all the start-up narration, before the callback
    assert [json.loads(line).get("control") for line in role.lines] == [None] * 6 + ["ready"]
    ready, = role.controls
    assert ready["role"] == "llm-worker-rbee" and ready["port"] == port and ready["worker_id"] == "worker-abc123"
    by_action = {e["action"]: e for e in role.events}
    assert by_action["startup"]["human"] == "Worker starting on port %d" % port
    assert by_action["model_load"]["human"] == "Loading model from %s" % model_path
    assert by_action["model_loaded"]["memory_mb"] > 50
    assert "%d MB" % by_action["model_loaded"]["memory_mb"] in by_action["model_loaded"]["human"]
    assert by_action["http_ready"]["human"] == "HTTP server ready on port %d" % port
    path, auth, body = received[0]
    assert path == "/v1/workers/ready"
    assert auth == "Bearer ready-secret"   # its own secret from its hive, not the hive's token
    assert body["worker_id"] == "worker-abc123"
    assert body["url"] == "http://127.0.0.1:%d" % port
    assert body["model_ref"] == "hf:Org/Repo-GGUF"
    assert body["backend"] == "cpu" and body["device"] == 0
    # the key never appears on the worker's command line
    with open("/proc/%d/cmdline" % role.proc.pid, "rb") as f:
        assert KEY.encode() not in f.read()


def test_second_request_gets_503_while_busy_then_succeeds(one_slot_worker):
    worker = one_slot_worker
    conn, resp = execute(worker.port, max_tokens=300, job_id="long")
    assert resp.status == 200
    stream = sse_events(resp)
    assert next(e for e, _, _ in stream if e == "token")
    busy, body = call(worker.port, "POST", "/execute", {"prompt": "hi", "max_tokens": 4})
    assert busy.status == 503
    assert body["error"]["code"] == "ALL_SLOTS_BUSY"
    assert int(busy.getheader("Retry-After")) >= 1
    health = call(worker.port, "GET", "/health", key=None)[1]
    assert health["state"] == "busy" and health["slots_available"] == 0
    rest = list(stream)
    conn.close()
    assert rest[-1][0] == "end" and rest[-1][1]["stop_reason"] in ("max_tokens", "eos")
    events = run_job(worker.port, prompt="hi", max_tokens=4)
    assert events[-1][0] == "end" and events[-1][1]["tokens_out"] >= 1


def test_client_disconnect_frees_the_worker_within_a_second(worker):
    conn, resp = execute(worker.port, max_tokens=400)
    stream = sse_events(resp)
    # a second, or 20 tokens' time measured on this stream when the machine is slower than that
    # (the 390 tokens left would take far longer: a worker that ran on to the end still fails)
    bound = max(1.0, 20 * token_pace(stream))
    assert call(worker.port, "GET", "/health", key=None)[1]["state"] == "busy"
    resp.sock.shutdown(socket.SHUT_RDWR)
    resp.sock.close()
    gone = time.monotonic()
    wait_until(lambda: call(worker.port, "GET", "/health", key=None)[1]["state"] == "idle", 30, 0.02,
               "the worker to be idle after the client left")
    took = time.monotonic() - gone
    assert took < bound, "idle %.2f s after the client left (bound %.2f s)" % (took, bound)
    assert run_job(worker.port, max_tokens=3)[-1][0] == "end"


def test_cancel_ends_the_stream_with_stop_reason_cancelled(worker):
    conn, resp = execute(worker.port, max_tokens=400, job_id="job-cancel-me")
    stream = sse_events(resp)
    assert next(e for e, _, _ in stream if e == "token")
    answer, _ = call(worker.port, "POST", "/cancel", {"job_id": "job-cancel-me"})
    assert answer.status == 204
    rest = list(stream)
    conn.close()
    assert rest[-1][0] == "end"
    assert rest[-1][1]["stop_reason"] == "cancelled"
    assert rest[-1][1]["tokens_out"] < 400
    # unknown and finished jobs are fine too
    assert call(worker.port, "POST", "/cancel", {"job_id": "job-cancel-me"})[0].status == 204
    assert call(worker.port, "POST", "/cancel", {"job_id": "nope"})[0].status == 204


def test_stop_string_ends_with_stop_reason_stop_and_is_named(worker):
    unstopped = run_job(worker.port, max_tokens=40)
    full = "".join(d["t"] for e, d, _ in unstopped if e == "token")
    assert unstopped[-1][1]["stop_sequence"] is None
    word = full.split()[3]
    events = run_job(worker.port, max_tokens=40, stop=["never said", word])
    text = "".join(d["t"] for e, d, _ in events if e == "token")
    assert events[-1][1]["stop_reason"] == "stop" and events[-1][1]["stop_sequence"] == word
    assert text == full[:full.index(word)]


def test_api_key_is_required_except_for_health(worker):
    for path, body in (("/execute", {"prompt": "hi"}), ("/cancel", {"job_id": "x"}), ("/shutdown", {})):
        resp, err = call(worker.port, "POST", path, body, key=None)
        assert resp.status == 401 and err["error"]["code"] == "MISSING_API_KEY"
        resp, err = call(worker.port, "POST", path, body, key="wrong-key")
        assert resp.status == 401 and err["error"]["code"] == "INVALID_API_KEY"
    resp, health = call(worker.port, "GET", "/health", key=None)
    assert resp.status == 200
    assert health["status"] == "ok" and health["state"] == "idle"
    for field in ("worker_id", "model_ref", "backend", "device", "memory_mb", "slots_total", "slots_available"):
        assert field in health


def malformed_requests():
    """(method, path, raw body, headers) that must each get a 4xx envelope."""
    cases = [("POST", "/execute", b"{not json", None), ("POST", "/execute", b"[1, 2]", None),
             ("POST", "/execute", b'"a string"', None), ("POST", "/execute", b"\xff\xfe", None),
             ("POST", "/execute", b"{}", None), ("POST", "/execute", b"null", None),
             ("POST", "/execute", b"x" * (2 << 20), None), ("POST", "/execute", b"{" * (2 << 20), None),
             ("GET", "/nope", None, None), ("POST", "/nope", b"{}", None), ("GET", "/execute", None, None),
             ("DELETE", "/health", None, None), ("PUT", "/execute", b"{}", None), ("GET", "/cancel", None, None),
             ("GET", "/shutdown", None, None), ("PATCH", "/health", b"{}", None), ("GET", "/../../etc/passwd", None,
                                                                                   None),
             ("POST", "/execute", b'{"prompt": "hi"', {"Content-Length": "3"}),
             ("POST", "/execute", b'{"prompt": "hi"}', {"Content-Length": "abc"})]
    bad_fields = [{"prompt": ""}, {"prompt": "   "}, {"prompt": 5}, {"prompt": None}, {"prompt": ["a"]},
                  {"prompt": {"a": 1}}, {"max_tokens": 0}, {"max_tokens": -1}, {"max_tokens": 1.5},
                  {"max_tokens": "10"}, {"max_tokens": True}, {"max_tokens": 10 ** 9}, {"temperature": -0.1},
                  {"temperature": 2.5}, {"temperature": "hot"}, {"temperature": None, "top_p": 2},
                  {"top_p": -1}, {"top_p": "x"}, {"top_k": -5}, {"top_k": 2.5}, {"seed": "x"}, {"seed": -7},
                  {"seed": 1.5}, {"stop": 5}, {"stop": [1, 2]}, {"stop": [""]}, {"stop": ["a"] * 17},
                  {"job_id": 5}, {"job_id": "j" * 500}, {"temperature": float("inf")},
                  {"prompt": "word " * 9000}, {"max_tokens": (1 << 20) + 1}, {"temperature": [1]},
                  {"top_k": "5"}, {"job_id": ["a"]}]
    for fields in bad_fields:
        body = {"prompt": "hello", "max_tokens": 5}
        body.update(fields)
        if body.get("prompt") is None:
            del body["prompt"]
        cases.append(("POST", "/execute", json.dumps(body).encode(), None))
    return cases


def test_fifty_malformed_requests_get_4xx_envelopes_then_a_valid_request_works(worker):
    cases = malformed_requests()
    assert len(cases) >= 50
    for method, path, raw, headers in cases:
        try:
            conn, resp = request(worker.port, method, path, raw=raw, headers=headers, timeout=10)
            data = resp.read()
            conn.close()
        except (BrokenPipeError, ConnectionResetError) as exc:   # a client may not finish a 2 MiB send
            pytest.fail("%s %s: connection broken instead of an answer: %s" % (method, path, exc))
        assert 400 <= resp.status < 500, (method, path, raw[:80] if raw else raw, resp.status, data[:200])
        envelope = json.loads(data)
        assert set(envelope) == {"error"}
        assert envelope["error"]["code"].isupper() and envelope["error"]["message"]
        assert b"Traceback" not in data
    resp, _ = call(worker.port, "POST", "/execute", raw=b"x" * (2 << 20))
    assert resp.status == 413
    resp, err = call(worker.port, "POST", "/execute", {"prompt": "hi", "max_tokens": 0})
    assert err["error"]["code"] == "INVALID_REQUEST" and err["error"]["details"]["field"] == "max_tokens"
    assert call(worker.port, "GET", "/nope")[0].status == 404
    assert call(worker.port, "GET", "/execute")[0].status == 405
    events = run_job(worker.port, max_tokens=5)
    assert events[-1][0] == "end" and events[-1][1]["tokens_out"] == 5
    assert worker.proc.poll() is None


def test_shutdown_endpoint_exits_zero_within_5s_with_narration(worker):
    resp, _ = call(worker.port, "POST", "/shutdown", {})
    assert resp.status == 202
    started = time.monotonic()
    assert worker.proc.wait(60) == 0
    # 5 s, or twice its own start-up (the model's load) when the machine is slower than that
    took, bound = time.monotonic() - started, max(5.0, 2 * worker.start_s)
    assert took < bound, "exited %.1f s after the shutdown (bound %.1f s)" % (took, bound)
    worker.wait_event("exit")
    actions = [e["action"] for e in worker.events]
    assert actions[-3:] == ["shutdown", "memory_free", "exit"]
    assert any(e["human"].startswith("Freeing ") for e in worker.events)


def test_sigterm_shuts_down_gracefully(worker):
    os.kill(worker.proc.pid, signal.SIGTERM)
    assert worker.proc.wait(5) == 0
    assert worker.events[-1]["human"] == "Worker exiting"


def test_lifeline_closing_stdin_ends_the_worker_within_2s(worker):
    worker.close_stdin()
    started = time.monotonic()
    assert worker.proc.wait(60) == 0
    # 2 s, or twice its own start-up (the model's load) when the machine is slower than that
    took, bound = time.monotonic() - started, max(2.0, 2 * worker.start_s)
    assert took < bound, "exited %.1f s after its stdin closed (bound %.1f s)" % (took, bound)


def test_worker_without_api_key_refuses_to_start(roles, env, model_path):
    role = roles("worker", "--model", model_path, "--backend", "cpu", "--device", "0", "--port",
                 str(free_port()), env=env)
    assert role.proc.wait(30) == 1
    assert "RBEE_WORKER_API_KEY" in "\n".join(role.lines)
    assert "Traceback" not in "\n".join(role.lines)


@pytest.mark.parametrize("backend", ["metal", "cuda"])
def test_gpu_backend_without_gpu_or_device_fails_clearly(roles, env, model_path, backend):
    """Without the GPU: BACKEND_UNAVAILABLE naming cpu. On a machine that has it, a device it
    does not have: DEVICE_NOT_FOUND. Either way the worker exits 1 before loading anything."""
    import backends
    available = backends.get(backend).available()
    device = 99 if available else 0
    role = roles("worker", "--model", model_path, "--backend", backend, "--device", str(device), "--port",
                 str(free_port()), env=dict(env, RBEE_WORKER_API_KEY=KEY))
    assert role.proc.wait(30) == 1
    error = role.wait_event("error")["error"]
    if available:
        assert error["code"] == "DEVICE_NOT_FOUND" and error["details"]["requested"] == 99
    else:
        assert error["code"] == "BACKEND_UNAVAILABLE" and "cpu" in error["details"]["available"]
    assert not any(e.get("action") == "model_load" for e in role.events)


def test_a_repeated_prompt_reuses_the_kv_cache_and_gives_the_same_text(worker):
    first = run_job(worker.port, max_tokens=24)
    second = run_job(worker.port, max_tokens=24)
    text = lambda events: "".join(d["t"] for e, d, _ in events if e == "token")
    assert text(first) == text(second) and text(first)
    actions = lambda events: [d["action"] for e, d, _ in events if e == "narration"]
    assert "cache_reset" in actions(first)
    assert "cache_reuse" in actions(second) and "cache_reset" not in actions(second)
    third = run_job(worker.port, prompt="A completely different beginning:", max_tokens=4)
    assert "cache_reset" in actions(third)


def raw_exchange(port, data):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return answer
            answer += chunk


@pytest.mark.parametrize("request_line, status", [
    (b"GARBAGE", 400), (b"GET /health", 400),                  # no HTTP version: HTTP/0.9, refused
    (b"GET /health HTTP/2.0", 400), (b"GET /health HTTP/x.y", 400),
    (b"BREW /execute HTTP/1.0", 405), (b"BREW /nowhere HTTP/1.0", 404)])   # unknown methods: no 501
def test_garbage_request_lines_get_a_status_line_and_the_envelope(worker, request_line, status):
    head, _, body = raw_exchange(worker.port, request_line + b"\r\n\r\n").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 %d " % status), head
    assert json.loads(body)["error"]["code"] == "INVALID_REQUEST"
    assert run_job(worker.port, max_tokens=2)[-1][0] == "end"


# -- rbee's own client of the worker (what the keeper runs jobs through) ----------------------------

def worker_client(worker):
    import rbee
    return rbee, rbee.WorkerClient("http://127.0.0.1:%d" % worker.port, KEY, "worker-under-test", "localhost")


def test_worker_client_yields_typed_events_in_order(worker):
    rbee, client = worker_client(worker)
    events = list(client.execute({"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "raw": True}))
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "JobStarted" and kinds[-1] == "JobEnded" and kinds.count("JobEnded") == 1
    tokens = [e for e in events if isinstance(e, rbee.Token)]
    assert [t.index for t in tokens] == list(range(len(tokens))) and "".join(t.text for t in tokens)
    assert events[-1].stats["tokens_out"] == 12 and events[-1].stats["stop_reason"] == "max_tokens"
    assert any(isinstance(e, rbee.Narration) and e.event["action"] == "inference_start" for e in events)
    wait_until(lambda: client.health()["state"] == "idle", 2, what="the worker to be idle after the job")


def test_worker_client_stops_the_job_when_the_caller_lets_go(worker):
    rbee, client = worker_client(worker)
    events = client.execute({"prompt": PROMPT, "max_tokens": 1500, "temperature": 0, "raw": True})
    arrivals = []
    for event in events:
        if isinstance(event, rbee.Token):
            arrivals.append(time.monotonic())
            if event.index >= 5:
                break
    pace = sorted(b - a for a, b in zip(arrivals, arrivals[1:]))[len(arrivals) // 2 - 1]   # the median gap
    assert client.health()["state"] == "busy"
    events.close()       # the caller let go: the job is cancelled on the worker
    # 3 s, or a quarter of the time its 1,494 tokens left would take at the pace measured above
    bound = max(3.0, 0.25 * 1494 * pace)
    wait_until(lambda: client.health()["state"] == "idle", bound, what="the worker to be idle after the close")


def test_worker_client_retries_a_busy_worker_then_runs_the_job(one_slot_worker):
    rbee, client = worker_client(one_slot_worker)
    long_job = client.execute({"job_id": "long", "prompt": PROMPT, "max_tokens": 1500, "temperature": 0, "raw": True})
    next(e for e in long_job if isinstance(e, rbee.Token))
    delays = []

    def on_busy(delay):
        delays.append(delay)
        if len(delays) == 2:
            long_job.close()   # the slot frees while the client waits
    ended = list(client.execute({"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "raw": True}, on_busy))
    assert delays == [1, 2] and isinstance(ended[-1], rbee.JobEnded), delays


def test_worker_client_raises_typed_errors(worker):
    rbee, client = worker_client(worker)
    with pytest.raises(rbee.InvalidRequest) as bad:
        list(client.execute({"prompt": "", "max_tokens": 4}))
    assert bad.value.details["field"] == "prompt" and bad.value.status == 400
    with pytest.raises(rbee.InvalidApiKey):
        list(rbee.WorkerClient(client.url, "wrong-key").execute({"prompt": PROMPT}))
    worker.kill()
    with pytest.raises(rbee.ConnectionTimeout):    # nobody listens there any more
        list(client.execute({"prompt": PROMPT}))


def test_worker_client_reports_a_worker_that_dies_mid_stream_as_crashed(worker):
    rbee, client = worker_client(worker)
    events = client.execute({"prompt": PROMPT, "max_tokens": 1500, "temperature": 0, "raw": True})
    next(e for e in events if isinstance(e, rbee.Token) and e.index == 2)
    os.kill(worker.proc.pid, signal.SIGKILL)
    with pytest.raises(rbee.WorkerCrashed) as crashed:
        for _ in events:
            pass
    details = crashed.value.details
    assert details["tokens_generated"] >= 3 and details["worker_id"] == "worker-under-test"
    assert details["node"] == "localhost" and "localhost" in crashed.value.suggestion


# -- slots, continuous batching and the queue (issue 10) --------------------------------------------

DISTINCT = ["Once upon a time, in a small village by the sea, there lived", "The three laws of robotics are",
            "def fibonacci(n):\n    ", "My grandmother's secret recipe for apple pie"]


def text_of(events):
    return "".join(d["t"] for e, d, _ in events if e == "token")


@pytest.fixture
def split_worker(start_worker):
    """A worker whose slots each have their own part of the KV cache (--kv-split): a text is the same beside
    others as alone, bit for bit (in the unified cache, llama.cpp's attention kernels depend on every slot's cells)."""
    return start_worker("--kv-split")


def test_four_slots_stream_each_text_as_alone_and_start_together(split_worker):
    worker = split_worker
    bodies = [dict(prompt=p, max_tokens=48, job_id="job-%d" % k) for k, p in enumerate(DISTINCT)]
    alone = [text_of(run_job(worker.port, **body)) for body in bodies]
    together = run_together(worker.port, bodies)
    assert [text_of(events) for events in together] == alone and all(alone)
    firsts = [next(t for e, _, t in events if e == "token") for events in together]
    ends = [events[-1][2] for events in together]
    assert max(firsts) < min(ends), "every first token before any job ends: they ran side by side"
    assert all(events[-1][0] == "end" and events[-1][1]["tokens_out"] == 48 for events in together)


def test_a_seeded_sample_is_the_same_whatever_runs_beside_it(worker):
    body = dict(prompt=DISTINCT[0], max_tokens=32, temperature=0.9, seed=1234, job_id="seeded")
    alone = text_of(run_job(worker.port, **body))
    together = run_together(worker.port, [body] + [dict(prompt=p, max_tokens=32, temperature=0.9, job_id="x%d" % k)
                                                   for k, p in enumerate(DISTINCT[1:])])
    assert text_of(together[0]) == alone and alone


def test_sixteen_requests_on_four_slots_queue_then_all_complete(worker):
    seen_queue, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen_queue.append(call(worker.port, "GET", "/health", key=None)[1]["queue_length"])
            time.sleep(0.05)
    watcher = threading.Thread(target=watch)
    watcher.start()
    bodies = [dict(prompt=DISTINCT[k % 4] + " (%d)" % k, max_tokens=64, job_id="job-%d" % k) for k in range(16)]
    results = run_together(worker.port, bodies)
    stop.set()
    watcher.join()
    assert all(events[-1][0] == "end" and events[-1][1]["tokens_out"] >= 1 for events in results)
    positions = sorted(d["position"] for events in results for e, d, _ in events if e == "queued")
    assert positions == list(range(1, 13)), positions
    queued_narration = [d["human"] for events in results for e, d, _ in events if e == "narration"
                        and d["action"] == "queued"]
    assert len(queued_narration) == 12 and all(h.startswith("Waiting for a free slot (position ") for h in queued_narration)
    assert max(seen_queue) >= 1 and call(worker.port, "GET", "/health", key=None)[1]["queue_length"] == 0
    health = call(worker.port, "GET", "/health", key=None)[1]
    assert health["slots_total"] == 4 and health["slots_available"] == 4 and health["ctx_size"] == 8192 and health["cache_type_k"] == "f16"


def test_a_full_queue_answers_503_with_retry_after_then_serves(start_worker):
    worker = start_worker("--parallel", "2", "--max-queue", "2")
    answers, lock = [], threading.Lock()

    def one(k):
        conn, resp = execute(worker.port, prompt=DISTINCT[k % 4], max_tokens=200, job_id="job-%d" % k)
        if resp.status != 200:
            with lock:
                answers.append((resp.status, resp.getheader("Retry-After"), json.loads(resp.read())))
            return
        first = next(e for e, _, _ in sse_events(resp))
        with lock:
            answers.append((200, first, None))
        while resp.readline():
            pass
    threads = [threading.Thread(target=one, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    refused = [a for a in answers if a[0] == 503]
    assert len(refused) == 4 and all(int(r[1]) >= 1 and r[2]["error"]["code"] == "ALL_SLOTS_BUSY" for r in refused)
    firsts = sorted(a[1] for a in answers if a[0] == 200)
    assert firsts == ["queued", "queued", "started", "started"], firsts
    assert run_job(worker.port, max_tokens=3)[-1][0] == "end"


def test_queued_clients_that_leave_never_start(start_worker):
    worker = start_worker("--parallel", "1")
    conn, resp = execute(worker.port, max_tokens=1500, job_id="running")
    running = sse_events(resp)
    assert next(e for e, _, _ in running if e == "token")
    first_conn, first = execute(worker.port, max_tokens=20, job_id="first-in-line")
    assert next(e for e, _, _ in sse_events(first)) == "queued"
    waiting_conn, waiting = execute(worker.port, max_tokens=20, job_id="waiting")   # behind it in the queue
    assert next(sse_events(waiting))[1]["position"] == 2
    assert call(worker.port, "GET", "/health", key=None)[1]["queue_length"] == 2
    # each leaves within a second, or (when other tests share the CPU) within 60 tokens of the running
    # job, the clock that slows with the machine: one that stayed would wait for its 1,500
    queued = lambda: call(worker.port, "GET", "/health", key=None)[1]["queue_length"]
    for sock, still in ((waiting.sock, 1), (first.sock, 0)):   # the one at the back leaves first
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        left = time.monotonic()
        spent = tokens_until(running, lambda: queued() == still)
        took = time.monotonic() - left
        assert took < 1.0 or spent <= 60, "a queued client left after %.2f s, %d tokens" % (took, spent)
    health = call(worker.port, "GET", "/health", key=None)[1]
    assert health["slots_available"] == 0 and health["state"] == "busy"   # the one slot is still the first job's
    call(worker.port, "POST", "/cancel", {"job_id": "running"})
    assert [e for e, _, _ in running][-1] == "end"
    wait_until(lambda: call(worker.port, "GET", "/health", key=None)[1]["state"] == "idle", 2,
               what="the worker idle: the job that left never started")


def test_cancelling_one_job_leaves_the_others_texts_as_alone(split_worker):
    worker = split_worker
    bodies = [dict(prompt=p, max_tokens=40, job_id="keep-%d" % k) for k, p in enumerate(DISTINCT[:3])]
    alone = [text_of(run_job(worker.port, **body)) for body in bodies]
    conn, resp = execute(worker.port, prompt=DISTINCT[3], max_tokens=1500, job_id="doomed")
    doomed = sse_events(resp)
    assert next(e for e, _, _ in doomed if e == "token")
    results = [None] * 3

    def one(k):
        results[k] = run_job(worker.port, **bodies[k])
    threads = [threading.Thread(target=one, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    assert call(worker.port, "POST", "/cancel", {"job_id": "doomed"})[0].status == 204
    for thread in threads:
        thread.join(120)
    assert [e for e, _, _ in doomed][-1] == "end"
    assert [text_of(events) for events in results] == alone
