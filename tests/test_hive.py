"""The hive (PROTOCOL.md §3, §4, §5.2; issue 3) as a real process: its SQLite catalog, downloads through
the real huggingface_hub from a local Hugging Face endpoint (tests/fakehub.py) serving the real
SmolLM2 GGUF, preflight, and its pool of real workers on the real model."""
import errno
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import sqlite3
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from conftest import (assert_no_rbee_left, raw_call, raw_request, rbee_processes, run_rbee, sse_frames,
                      wait_until)
from fakehub import FakeHub

REPO_ID = "rbee-test/SmolLM2-135M-Instruct-GGUF"
REF = "hf:" + REPO_ID
# the real model, under a name the preference order (Q4_K_M first) picks
CHOSEN = "smollm2-135m-instruct.Q4_K_M.gguf"
# decoys: other quantisations, and a split part (not the first) that would sort before CHOSEN
DECOYS = {name: ("decoy %s " % name).encode() * 300 for name in (
    "smollm2-135m-instruct.Q8_0.gguf", "smollm2-135m-instruct.Q5_K_M.gguf", "smollm2-135m-instruct.F16.gguf",
    "smollm2-135m-instruct.Q4_K_M-00002-of-00003.gguf")}
Q8_0 = "smollm2-135m-instruct.Q8_0.gguf"
F16 = "smollm2-135m-instruct.F16.gguf"
TOKEN = "hive-token-0123456789"
MiB = 1 << 20


# -- the endpoint, the hive ---------------------------------------------------------------------

@pytest.fixture
def hub():
    with FakeHub() as hub:
        yield hub


@pytest.fixture
def repo(hub, model_path):
    """The repo of a GGUF publisher: the real model, decoy quantisations, a README."""
    hub.add_file(REPO_ID, CHOSEN, path=model_path)
    for name, data in DECOYS.items():
        hub.add_file(REPO_ID, name, data=data)
    hub.add_file(REPO_ID, "README.md", data=b"# SmolLM2-135M-Instruct GGUF\n", lfs=False)
    return hub


@pytest.fixture
def start_hive(start_hive, hub):
    """conftest's start_hive (node `testnode`) pointed at the fake hub; with lifeline=True the
    queen's hello carries TOKEN unless the test gives its own."""
    def start(*options, lifeline=False, hello=None):
        return start_hive(*options, extra_env={"HF_ENDPOINT": hub.url}, lifeline=lifeline,
                          hello=hello or {"token": TOKEN})
    return start


# -- a small raw HTTP + SSE client (rbee.py's own client is not what is under test) -------------

def request(port, method, path, body=None, token=None, raw=None, timeout=120):
    return raw_request(port, method, path, body, key=token, raw=raw, timeout=timeout)


def call(port, method, path, body=None, token=None, raw=None):
    return raw_call(port, method, path, body, key=token, raw=raw)


def sse_events(resp):
    """(event, data) as frames arrive."""
    return ((event, data) for event, data, _ in sse_frames(resp))


def stream(hive, path, body):
    """POST an SSE endpoint of the hive; all its events, checked to end with one terminal event."""
    conn, resp = request(hive.port, "POST", path, body, hive.token)
    assert resp.status == 200, resp.read()
    assert resp.getheader("Content-Type") == "text/event-stream"
    events = list(sse_events(resp))
    conn.close()
    assert events, "empty stream from %s" % path
    terminal = [e for e, _ in events if e in ("worker", "end", "error")]
    assert terminal == [events[-1][0]], [e for e, _ in events]
    assert all(e == "narration" for e, _ in events[:-1])
    return events


def spawn(hive, model_ref, backend="cpu", device=0):
    return stream(hive, "/v1/workers/spawn", {"model_ref": model_ref, "backend": backend, "device": device})


def download(hive, model_ref):
    return stream(hive, "/v1/models/download", {"model_ref": model_ref})


def spawned(events):
    """The `worker` event's data (fails with the error or the stream otherwise)."""
    kind, data = events[-1]
    assert kind == "worker", json.dumps(data, indent=1)
    return data


def refused(hive, path, body):
    """What the hive knows is wrong before any stream starts: the error's own status and the
    envelope (PROTOCOL.md §5), no SSE. Returns (status, error)."""
    resp, data = call(hive.port, "POST", path, body, hive.token)
    assert resp.status != 200 and resp.getheader("Content-Type") == "application/json", (resp.status, data)
    return resp.status, data["error"]


def error_of(events):
    kind, data = events[-1]
    assert kind == "error", data
    return data["error"]


def narration(events):
    return [d for e, d in events if e == "narration"]


def workers(hive):
    resp, body = call(hive.port, "GET", "/v1/workers/list", token=hive.token)
    assert resp.status == 200, body
    return body["workers"]


def execute(worker, max_tokens=8):
    """Run a prompt on a spawned worker, as the keeper would: the tokens' text."""
    url = urllib.parse.urlsplit(worker["url"])
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/execute", body=json.dumps({"job_id": "job-hive-test", "prompt": "The sea is",
                                                      "max_tokens": max_tokens, "temperature": 0}),
                 headers={"Authorization": "Bearer " + worker["api_key"], "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    events = list(sse_events(resp))
    conn.close()
    assert events[-1][0] == "end", events[-1]
    tokens = [d["t"] for e, d in events if e == "token"]
    assert tokens and events[-1][1]["tokens_out"] >= 1
    return "".join(tokens)


# -- what a user checks on disk and in the process table ------------------------------------------

def catalog_rows(rbee_home):
    db = sqlite3.connect(str(rbee_home / "models.db"))
    try:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM models ORDER BY filename")]
    finally:
        db.close()


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def model_dir(rbee_home):
    return rbee_home / "models" / REPO_ID.replace("/", "--")


def pid_alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def assert_nothing_spawned(hive, tmp_path, rbee_home):
    """No worker process (by the process table), none listed, none ever started (no worker log)."""
    assert [pid for pid, _ in rbee_processes(str(tmp_path))] == [hive.proc.pid]
    assert workers(hive) == []
    assert not list((rbee_home / "logs").glob("worker-*"))
    assert not [e for e in hive.events if e.get("actor") == "llm-worker-rbee"]


def assert_subsequence(expected, actual):
    it = iter(actual)
    missing = [x for x in expected if x not in it]
    assert not missing, "missing %s (in order) from %s" % (missing, actual)


# -- tests ---------------------------------------------------------------------------------------

def test_startup_narration_on_stdout(start_hive):
    hive = start_hive()
    start, ready = hive.events[:2]
    assert "[%s] %s %s" % (start["actor"], start["cute"], start["human"]) == \
        "[rbee-hive] 🌅 Starting pool manager on port %d" % hive.port
    assert "[%s] %s %s" % (ready["actor"], ready["cute"], ready["human"]) == \
        "[http-server] 🚀 HTTP server ready on port %d" % hive.port


def test_hf_repo_picks_the_preferred_file_verifies_catalogs_and_spawns_a_working_worker(
        repo, start_hive, rbee_home, model_path):
    hive = start_hive()
    before = int(time.time())   # the catalog's timestamp is a whole second
    events = spawn(hive, REF)
    worker = spawned(events)
    size = os.path.getsize(model_path)

    # the preference order picked the real model; no decoy and no split part was fetched
    assert len(repo.file_gets(REPO_ID, CHOSEN)) == 1
    for name in DECOYS:
        assert repo.file_gets(REPO_ID, name) == [], name
    [row] = catalog_rows(rbee_home)
    assert (row["provider"], row["reference"], row["filename"]) == ("hf", REPO_ID, CHOSEN)
    local = Path(row["local_path"])
    assert local == model_dir(rbee_home) / CHOSEN
    assert local.stat().st_size == row["size_bytes"] == size
    assert row["sha256"] == sha256_of(local) == repo.sha256(REPO_ID, CHOSEN) == sha256_of(model_path)
    assert before <= row["downloaded_at_unix"] <= time.time()   # this download's, not a fixed age
    assert sorted(os.listdir(model_dir(rbee_home))) == [CHOSEN]   # no .partial left

    # narration: download start, progress with {done, total}, done, then the worker's own start
    notes = narration(events)
    actions = [(n["actor"], n["action"]) for n in notes]
    assert_subsequence([("model-provisioner", "download_start"), ("model-provisioner", "download_progress"),
                        ("model-provisioner", "download_done"), ("llm-worker-rbee", "startup"),
                        ("device-manager", "device_init"), ("model-loader", "model_load"),
                        ("model-loader", "model_loaded"), ("http-server", "http_ready"),
                        ("llm-worker-rbee", "ready_callback")], actions)
    assert all(n["human"] for n in notes)
    assert CHOSEN in next(n["human"] for n in notes if n["action"] == "download_start")
    progress = [n["progress"] for n in notes if n["action"] == "download_progress"]
    assert all(p["total"] == size for p in progress)
    assert [p["done"] for p in progress] == sorted(p["done"] for p in progress)
    assert progress[-1] == {"done": size, "total": size}
    loaded = next(n for n in notes if n["action"] == "model_loaded")
    assert loaded["memory_mb"] > 50 and "%d MB" % loaded["memory_mb"] in loaded["human"]
    assert next(n for n in notes if n["action"] == "model_load")["human"] == "Loading model from %s" % local

    # the worker's narration also reaches the hive's own stdout (its log), marked as already relayed
    echoed = [e for e in hive.events if e.get("worker_id") == worker["worker_id"]]
    assert [e["action"] for e in echoed][:2] == ["startup", "device_init"]
    assert all(e.get("relayed") for e in echoed)

    # the worker answers for real
    assert worker["state"] == "idle" and worker["api_key"]
    assert execute(worker).strip()
    [listed] = workers(hive)
    assert (listed["worker_id"], listed["model_ref"], listed["url"]) == (worker["worker_id"], REF, worker["url"])

    # a new hive on the same node: the catalog has it, so nothing is downloaded again
    assert call(hive.port, "POST", "/v1/shutdown", {})[0].status == 202
    assert hive.proc.wait(15) == 0
    hive = start_hive()
    events = spawn(hive, REF)
    again = spawned(events)
    assert again["worker_id"] != worker["worker_id"]
    assert len(repo.file_gets(REPO_ID, CHOSEN)) == 1
    assert not [n for n in narration(events) if n["actor"] == "model-provisioner" and "download" in n["action"]]
    assert [n["action"] for n in narration(events) if n["actor"] == "model-loader"] == ["model_load", "model_loaded"]
    assert execute(again).strip()
    assert len(catalog_rows(rbee_home)) == 1


def test_models_cli_selects_by_quant_tag_and_file_name_lists_and_removes(repo, env, rbee_home):
    env = dict(env, HF_ENDPOINT=repo.url)
    done = run_rbee(["models", "download", "%s:Q8_0" % REF], env)
    assert done.returncode == 0, done.stderr
    assert Q8_0 in done.stdout
    assert "[model-provisioner]" in done.stderr and "Traceback" not in done.stderr
    [row] = catalog_rows(rbee_home)
    assert (row["provider"], row["reference"], row["filename"]) == ("hf", REPO_ID, Q8_0)
    assert Path(row["local_path"]).read_bytes() == DECOYS[Q8_0]
    assert row["sha256"] == hashlib.sha256(DECOYS[Q8_0]).hexdigest()
    assert repo.file_gets(REPO_ID, CHOSEN) == []   # the tag chose, not the preference order

    done = run_rbee(["models", "download", "%s:%s" % (REF, F16)], env)
    assert done.returncode == 0, done.stderr
    assert [r["filename"] for r in catalog_rows(rbee_home)] == [F16, Q8_0]
    # the same reference again: already there, nothing fetched
    done = run_rbee(["models", "download", "%s:Q8_0" % REF], env)
    assert done.returncode == 0, done.stderr
    assert len(repo.file_gets(REPO_ID, Q8_0)) == 1

    listed = run_rbee(["models", "list"], env)
    assert listed.returncode == 0, listed.stderr
    assert str(model_dir(rbee_home) / Q8_0) in listed.stdout and str(model_dir(rbee_home) / F16) in listed.stdout

    removed = run_rbee(["models", "rm", "%s:Q8_0" % REF], env)
    assert removed.returncode == 0, removed.stderr
    assert [r["filename"] for r in catalog_rows(rbee_home)] == [F16]
    assert sorted(os.listdir(model_dir(rbee_home))) == [F16]
    assert Q8_0 not in run_rbee(["models", "list"], env).stdout

    missing = run_rbee(["models", "download", "%s:Q3_K_S" % REF], env)
    assert missing.returncode == 1
    assert "Error" in missing.stderr and "Suggestion:" in missing.stderr and "Traceback" not in missing.stderr
    bad = run_rbee(["models", "download", "ollama:llama3"], env)
    assert bad.returncode == 1
    assert "Invalid model reference" in bad.stderr and "Traceback" not in bad.stderr
    assert [r["filename"] for r in catalog_rows(rbee_home)] == [F16]


def test_hive_killed_mid_download_resumes_with_range_in_the_next_hive(repo, start_hive, rbee_home, model_path):
    size = os.path.getsize(model_path)
    repo.throttle(REPO_ID, CHOSEN, 16 * MiB)    # ~6 s for the whole file
    partial = model_dir(rbee_home) / (CHOSEN + ".partial")
    hive = start_hive()
    conn, resp = request(hive.port, "POST", "/v1/workers/spawn", {"model_ref": REF, "backend": "cpu", "device": 0})
    assert resp.status == 200
    wait_until(lambda: partial.exists() and partial.stat().st_size >= 24 * MiB, 30, 0.02,
               "the partial download to pass 24 MB")
    reached = partial.stat().st_size
    os.kill(hive.proc.pid, signal.SIGKILL)
    hive.proc.wait(10)
    conn.close()
    kept = partial.stat().st_size
    assert reached <= kept < size
    assert catalog_rows(rbee_home) == []
    assert not (model_dir(rbee_home) / CHOSEN).exists()

    repo.throttle(REPO_ID, CHOSEN, None)
    hive = start_hive()
    events = download(hive, REF)
    assert events[-1][0] == "end", events[-1]
    first, second = repo.file_gets(REPO_ID, CHOSEN)
    assert first["range"] is None
    assert second["range"] == "bytes=%d-" % kept and kept >= reached
    assert second["status"] == 206 and second["body_sent"] == size - kept
    assert any(n["action"] == "download_resume" for n in narration(events))

    [row] = catalog_rows(rbee_home)
    assert events[-1][1]["model"]["local_path"] == row["local_path"]
    assert row["sha256"] == sha256_of(row["local_path"]) == repo.sha256(REPO_ID, CHOSEN)
    assert os.path.getsize(row["local_path"]) == size
    assert sorted(os.listdir(model_dir(rbee_home))) == [CHOSEN]


def test_connection_dropped_mid_file_is_resumed(repo, start_hive, rbee_home, model_path):
    repo.drop_after(REPO_ID, CHOSEN, 40 * MiB, times=1)
    hive = start_hive()
    events = download(hive, REF)
    assert events[-1][0] == "end", events[-1]
    first, second = repo.file_gets(REPO_ID, CHOSEN)
    assert first.get("dropped") and first["body_sent"] == 40 * MiB
    start = int(second["range"][len("bytes="):-1])
    assert second["range"] == "bytes=%d-" % start and 0 < start <= 40 * MiB
    assert start == 40 * MiB, "resumed at %d, not at the byte reached" % start
    [row] = catalog_rows(rbee_home)
    assert row["sha256"] == sha256_of(row["local_path"]) == repo.sha256(REPO_ID, CHOSEN)
    assert sorted(os.listdir(model_dir(rbee_home))) == [CHOSEN]


def test_bytes_corrupted_once_are_detected_and_downloaded_again(repo, start_hive, rbee_home):
    repo.corrupt(REPO_ID, CHOSEN, times=1)
    hive = start_hive()
    events = download(hive, REF)
    assert events[-1][0] == "end", events[-1]
    notes = narration(events)
    mismatch = [i for i, n in enumerate(notes) if "CHECKSUM_MISMATCH" in json.dumps(n)]
    assert mismatch, notes
    assert any(n["action"] == "download_done" for n in notes[mismatch[0]:])
    assert len(repo.file_gets(REPO_ID, CHOSEN)) == 2
    [row] = catalog_rows(rbee_home)
    assert row["sha256"] == sha256_of(row["local_path"]) == repo.sha256(REPO_ID, CHOSEN)
    assert sorted(os.listdir(model_dir(rbee_home))) == [CHOSEN]


def test_bytes_always_corrupted_end_in_checksum_mismatch_and_leave_nothing(repo, start_hive, rbee_home, tmp_path):
    repo.corrupt(REPO_ID, CHOSEN, times=None)
    hive = start_hive()
    error = error_of(spawn(hive, REF))
    assert error["code"] == "CHECKSUM_MISMATCH"
    assert error["message"] and error.get("suggestion")
    assert len(repo.file_gets(REPO_ID, CHOSEN)) == 6     # PROTOCOL.md §9: 6 attempts
    assert catalog_rows(rbee_home) == []
    assert not model_dir(rbee_home).exists() or os.listdir(model_dir(rbee_home)) == []
    assert_nothing_spawned(hive, tmp_path, rbee_home)


@pytest.mark.parametrize("status,ref,code", [
    (404, REF, "MODEL_NOT_FOUND"),
    (None, "hf:rbee-test/no-such-repo-GGUF", "MODEL_NOT_FOUND"),
    (None, REF + ":Q3_K_S", "MODEL_NOT_FOUND"),
    (403, REF, "ACCESS_DENIED"),
    (401, REF, "ACCESS_DENIED"),
])
def test_missing_and_forbidden_repos(repo, start_hive, rbee_home, tmp_path, status, ref, code):
    if status:
        repo.set_repo_status(REPO_ID, status)
    hive = start_hive()
    error = error_of(spawn(hive, ref))
    assert error["code"] == code, error
    assert error["message"] and error.get("suggestion")
    assert error["details"]["model"] == ref
    assert repo.file_gets(REPO_ID, CHOSEN) == []
    assert catalog_rows(rbee_home) == []
    assert_nothing_spawned(hive, tmp_path, rbee_home)


def test_concurrent_requests_for_one_uncached_model_share_one_download(repo, start_hive, rbee_home, env):
    repo.throttle(REPO_ID, CHOSEN, 32 * MiB)    # ~3 s: every request arrives while it downloads
    hive = start_hive()
    results = {}

    def run(name, fn, *args):
        try:
            results[name] = fn(*args)
        except BaseException as exc:   # reported by the main thread
            results[name] = exc
    threads = [threading.Thread(target=run, args=("spawn-1", spawn, hive, REF)),
               threading.Thread(target=run, args=("spawn-2", spawn, hive, REF)),
               # the same file named by its tag, through the hive and by another process on the node
               threading.Thread(target=run, args=("download", download, hive, REF + ":Q4_K_M")),
               threading.Thread(target=run, args=("cli", run_rbee, ["models", "download", REF + ":Q4_K_M"],
                                                  dict(env, HF_ENDPOINT=repo.url)))]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join(120)
    for name, result in results.items():
        assert not isinstance(result, BaseException), (name, result)
    assert len(results) == 4
    one, two = spawned(results["spawn-1"]), spawned(results["spawn-2"])
    assert one["worker_id"] == two["worker_id"]
    assert results["download"][-1][0] == "end", results["download"][-1]
    cli = results["cli"]
    assert cli.returncode == 0, cli.stderr
    assert "Waiting for the download" in cli.stderr and CHOSEN in cli.stdout
    assert len(repo.file_gets(REPO_ID, CHOSEN)) == 1
    [row] = catalog_rows(rbee_home)
    assert row["sha256"] == sha256_of(row["local_path"]) == repo.sha256(REPO_ID, CHOSEN)
    assert sorted(os.listdir(model_dir(rbee_home))) == [CHOSEN]
    assert [w["worker_id"] for w in workers(hive)] == [one["worker_id"]]

    # one stream narrates the download; the request that came by another name narrates its wait
    streams = [results[name] for name in ("spawn-1", "spawn-2", "download")]
    [downloading] = [s for s in streams if any(n["action"] == "download_start" for n in narration(s))]
    assert any(n["action"] == "download_wait" for s in streams if s is not downloading for n in narration(s))
    # progress over ~3 s: at least every 5 % or every second, whichever is rarer
    progress = [n["progress"] for n in narration(downloading) if n["action"] == "download_progress"]
    assert len(progress) >= 3 and progress[-1] == {"done": row["size_bytes"], "total": row["size_bytes"]}
    steps = [b["done"] - a["done"] for a, b in zip(progress, progress[1:-1])]
    assert steps and min(steps) >= 0.05 * row["size_bytes"], steps


def test_model_larger_than_ram_is_refused_with_insufficient_ram(start_hive, rbee_home, tmp_path):
    with open("/proc/meminfo") as f:
        mem_total = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    big = tmp_path / "huge-model.Q8_0.gguf"
    with open(big, "wb") as f:
        f.write(b"GGUF")              # the magic of a GGUF file, then nothing: sparse, it takes no disk
        f.truncate(mem_total * 10)
    hive = start_hive()
    error = error_of(spawn(hive, "file:%s" % big))
    assert error["code"] == "INSUFFICIENT_RAM", error
    details = error["details"]
    assert details["required_mb"] >= mem_total * 10 / MiB   # (no shape read: the file and the runtime)
    assert 0 < details["available_mb"] <= mem_total / MiB < details["required_mb"]
    assert "%d MB" % details["required_mb"] in error["message"] and error.get("suggestion")
    assert_nothing_spawned(hive, tmp_path, rbee_home)


@pytest.mark.parametrize("backend,device,code", [
    ("metal", 0, "BACKEND_UNAVAILABLE"), ("cuda", 0, "BACKEND_UNAVAILABLE"), ("cpu", 5, "DEVICE_NOT_FOUND")])
def test_unusable_backend_or_device_is_refused_before_any_download(repo, start_hive, rbee_home, tmp_path,
                                                                  backend, device, code):
    import backends
    if code == "BACKEND_UNAVAILABLE" and backends.get(backend).available():   # a real GPU node
        device, code = 99, "DEVICE_NOT_FOUND"
    hive = start_hive()
    status, error = refused(hive, "/v1/workers/spawn", {"model_ref": REF, "backend": backend, "device": device})
    assert error["code"] == code and status == 400, (status, error)
    assert error["message"] and error.get("suggestion")
    if code == "BACKEND_UNAVAILABLE":
        assert "cpu" in error["details"]["available"]
        assert backend not in error["details"]["available"]
    else:
        assert error["details"]["requested"] == device
    assert repo.file_gets(REPO_ID, CHOSEN) == []      # refused before the download
    assert catalog_rows(rbee_home) == []
    assert_nothing_spawned(hive, tmp_path, rbee_home)


def test_idle_worker_is_reused_and_a_killed_worker_is_noticed_and_replaced(start_hive, model_path):
    hive = start_hive()
    ref = "file:" + model_path
    first = spawned(spawn(hive, ref))
    events = spawn(hive, ref)
    again = spawned(events)
    assert (again["worker_id"], again["url"], again["api_key"]) == (first["worker_id"], first["url"], first["api_key"])
    assert not [n for n in narration(events) if n["actor"] in ("model-loader", "llm-worker-rbee")]
    [listed] = workers(hive)
    assert listed["worker_id"] == first["worker_id"] and listed["state"] == "idle"

    # the bound: 2 s, or 20 times a list round trip measured here when the machine is slower than that
    asked = time.monotonic()
    workers(hive)
    bound = max(2.0, 20 * (time.monotonic() - asked))
    killed_pid = listed["pid"]
    os.kill(killed_pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: workers(hive) == [], 30, 0.02, "the killed worker to leave the list")
    took = time.monotonic() - killed
    assert took < bound, "the killed worker left the list after %.1f s (bound %.1f s)" % (took, bound)

    replacement = spawned(spawn(hive, ref))
    assert replacement["worker_id"] != first["worker_id"]
    [listed] = workers(hive)
    assert listed["worker_id"] == replacement["worker_id"] and listed["pid"] != killed_pid
    assert execute(replacement).strip()
    assert hive.proc.poll() is None


def test_a_workers_port_is_held_from_the_moment_its_hive_chose_it(start_hive, model_path, tmp_path):
    """The hive binds the worker's port and hands the listening socket to the worker, which serves
    on it once its model is loaded: another program (say, another hive's worker) that sees the
    port free meanwhile cannot take it, a request that comes meanwhile waits for the worker, and
    the spawn is one start on the port chosen."""
    hive = start_hive()
    squat, early = {}, socket.socket()

    def worker_port():
        for _, cmd in rbee_processes(str(tmp_path)):
            if " worker " in cmd:
                return int(cmd.split(" --port ")[1].split()[0])

    def take_the_port():
        port = wait_until(worker_port, 30, 0.005, "a worker process")
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # the port may be in TIME_WAIT
            try:
                squatter.bind(("127.0.0.1", port))
                squat["bound"] = port
            except OSError as exc:
                squat["refused"] = (port, exc.errno)
        early.connect(("127.0.0.1", port))
        early.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        early.settimeout(0.2)
        try:
            squat["answered at once"] = early.recv(100)
        except socket.timeout:
            squat["waiting"] = True
    thread = threading.Thread(target=take_the_port)
    thread.start()
    try:
        events = spawn(hive, "file:" + model_path)
        thread.join(30)
        port, why = squat.get("refused", (None, None))
        assert why == errno.EADDRINUSE and squat.get("waiting"), squat
        worker = spawned(events)
        assert urllib.parse.urlsplit(worker["url"]).port == port
        early.settimeout(30)
        assert early.recv(100).split(b" ")[1] == b"200"   # the worker served it once loaded
        assert len([n for n in narration(events) if n["action"] == "startup"]) == 1
        assert execute(worker).strip()
        [listed] = workers(hive)
        assert listed["worker_id"] == worker["worker_id"]
    finally:
        early.close()


@pytest.mark.parametrize("how", ["POST /v1/shutdown", "stdin closed", "SIGKILL"])
def test_hive_going_away_leaves_no_process_and_an_intact_catalog(start_hive, rbee_home, tmp_path, model_path, how):
    copy = tmp_path / "models" / "SmolLM2-copy.Q4_1.gguf"
    copy.parent.mkdir()
    try:
        os.link(model_path, copy)
    except OSError:   # another file system
        shutil.copyfile(model_path, copy)
    hive = start_hive(lifeline=True)
    one = spawned(spawn(hive, "file:" + model_path))
    two = spawned(spawn(hive, "file:%s" % copy))
    assert one["worker_id"] != two["worker_id"]
    listed = workers(hive)
    assert len(listed) == 2
    assert sorted(pid for pid, _ in rbee_processes(str(tmp_path))) == sorted(
        [hive.proc.pid] + [w["pid"] for w in listed])
    assert len(catalog_rows(rbee_home)) == 2

    if how == "POST /v1/shutdown":
        resp, _ = call(hive.port, "POST", "/v1/shutdown", {}, token=hive.token)
        assert resp.status == 202
    elif how == "stdin closed":
        hive.close_stdin()
    else:
        os.kill(hive.proc.pid, signal.SIGKILL)
    assert_no_rbee_left(str(tmp_path), within=5.0)
    code = hive.proc.wait(5)
    assert code == (-signal.SIGKILL if how == "SIGKILL" else 0)

    db = sqlite3.connect(str(rbee_home / "models.db"))
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        paths = sorted(r[0] for r in db.execute("SELECT local_path FROM models"))
    finally:
        db.close()
    assert paths == sorted([model_path, str(copy)])


def test_idle_timeout_stops_an_idle_worker_and_the_hive_lives_on(start_hive, model_path):
    hive = start_hive("--idle-timeout", "2")
    worker = spawned(spawn(hive, "file:" + model_path))
    ready = time.monotonic()
    [listed] = workers(hive)
    wait_until(lambda: workers(hive) == [], 10, 0.05, "the idle worker to be stopped")
    assert time.monotonic() - ready >= 1.8     # not before its idle time was up
    wait_until(lambda: not pid_alive(listed["pid"]), 5, 0.05, "the idle worker's process to end")
    stopped = hive.wait_event("worker_idle_stop", timeout=5)
    assert stopped["worker_id"] == worker["worker_id"]
    assert hive.proc.poll() is None
    resp, health = call(hive.port, "GET", "/v1/health")
    assert resp.status == 200 and health["status"] == "alive"


def test_health_auth_and_error_envelopes(start_hive, repo, rbee_home, tmp_path):
    hive = start_hive(lifeline=True)
    resp, health = call(hive.port, "GET", "/v1/health")     # free, no token
    assert resp.status == 200 and resp.getheader("Content-Type") == "application/json"
    version = run_rbee(["--version"], {"PATH": os.environ["PATH"]}).stdout.split()[-1]
    assert (health["status"], health["version"], health["api_version"], health["node"]) == (
        "alive", version, "v1", "testnode")
    assert "cpu" in health["backends"]
    assert health["devices"]["cpu"][0]["index"] == 0 and health["devices"]["cpu"][0]["memory_total_mb"] > 0

    protected = [("GET", "/v1/workers/list", None), ("GET", "/v1/models", None),
                 ("POST", "/v1/workers/spawn", {"model_ref": REF, "backend": "cpu", "device": 0}),
                 ("POST", "/v1/models/download", {"model_ref": REF}),
                 ("POST", "/v1/workers/ready", {"worker_id": "worker-x", "url": "http://127.0.0.1:1"}),
                 ("POST", "/v1/workers/worker-x/shutdown", {}), ("POST", "/v1/shutdown", {})]
    for method, path, body in protected:
        resp, err = call(hive.port, method, path, body)
        assert resp.status == 401 and err["error"]["code"] == "MISSING_API_KEY", (path, err)
        resp, err = call(hive.port, method, path, body, token="wrong-token")
        assert resp.status == 401 and err["error"]["code"] == "INVALID_API_KEY", (path, err)
    assert hive.proc.poll() is None    # the refused /v1/shutdown did nothing
    assert repo.requests == []         # nor did the refused spawn and download
    resp, body = call(hive.port, "GET", "/v1/workers/list", token=TOKEN)
    assert resp.status == 200 and body == {"workers": []}
    resp, body = call(hive.port, "GET", "/v1/models", token=TOKEN)
    assert resp.status == 200 and body == {"models": []}

    for method, path, status in [("GET", "/v1/nope", 404), ("POST", "/v2/tasks", 404), ("GET", "/", 404),
                                 ("GET", "/v1/workers/spawn", 405), ("DELETE", "/v1/health", 405),
                                 ("POST", "/v1/health", 405), ("GET", "/v1/shutdown", 405)]:
        resp, err = call(hive.port, method, path, token=TOKEN)
        assert resp.status == status, (method, path, resp.status)
        assert set(err) == {"error"} and err["error"]["code"].isupper() and err["error"]["message"]

    for ref in ["ollama:llama3", "hf:just-an-org", "hf:org/repo/extra", "file:relative/model.gguf",
                "/abs/model.gguf", "hf:../etc/passwd", "", 5, None]:
        for path in ("/v1/workers/spawn", "/v1/models/download"):
            resp, err = call(hive.port, "POST", path, {"model_ref": ref, "backend": "cpu", "device": 0}, token=TOKEN)
            assert resp.status == 400 and err["error"]["code"] == "INVALID_MODEL_REF", (ref, path, err)
            assert err["error"]["message"] and err["error"].get("suggestion")
    resp, err = call(hive.port, "POST", "/v1/workers/spawn", raw=b"{not json", token=TOKEN)
    assert resp.status == 400 and err["error"]["code"] == "INVALID_REQUEST"
    resp, err = call(hive.port, "POST", "/v1/workers/spawn", {"model_ref": REF, "device": "zero"}, token=TOKEN)
    assert resp.status == 400 and err["error"]["code"] == "INVALID_REQUEST"
    assert repo.requests == []
    assert_nothing_spawned(hive, tmp_path, rbee_home)


def test_handshake_secrets_reach_the_hub_but_never_argv(repo, start_hive, rbee_home):
    secret = "hf_secret_0123456789abcdef"
    hive = start_hive(lifeline=True, hello={"token": TOKEN, "env": {"HF_TOKEN": secret}})
    events = download(hive, REF + ":Q8_0")
    assert events[-1][0] == "end", events[-1]
    assert events[-1][1]["model"]["filename"] == Q8_0
    assert len(repo.file_gets(REPO_ID, Q8_0)) == 1
    for seen in repo.requests:    # the listing and the file: every call to the Hub carries it
        auth = {k.lower(): v for k, v in seen["headers"].items()}.get("authorization")
        assert auth == "Bearer " + secret, (seen["method"], seen["path"], auth)
    with open("/proc/%d/cmdline" % hive.proc.pid, "rb") as f:
        cmdline = f.read()
    assert secret.encode() not in cmdline and TOKEN.encode() not in cmdline


# SmolLM2-135M's GGUF: 3 KV heads of 64, 576 wide, 49,152 tokens
SHAPE = {"layers": 30, "context_length": 8192, "kv_width_k": 192, "kv_width_v": 192, "embedding_length": 576,
         "feed_forward_length": 1536, "vocab_size": 49152, "size_bytes": 98362432}


def test_resources_say_memory_devices_workers_and_the_models_size(start_hive, repo, model_path):
    """GET /v1/resources: what the queen places by, read now (PROTOCOL.md §12)."""
    hive = start_hive(lifeline=True)
    resp, empty = call(hive.port, "GET", "/v1/resources?model=" + urllib.parse.quote(REF), token=hive.token)
    assert resp.status == 200, empty
    assert empty["node"] == "testnode" and 0 < empty["ram_free_mb"] <= empty["ram_total_mb"]
    assert empty["memory"]["cpu"] == "ram" and empty["devices"]["cpu"][0]["index"] == 0
    assert empty["workers"] == [] and empty["models"] == []
    # not known before a download
    assert empty["model"] == {"model_ref": REF, "cataloged": False, "size_bytes": None, "layers": None, "shape": {}}
    local = "file:" + model_path
    _, sized = call(hive.port, "GET", "/v1/resources?model=" + urllib.parse.quote(local), token=hive.token)
    assert sized["model"] == {"model_ref": local, "cataloged": False, "size_bytes": os.path.getsize(model_path),
                              "layers": 30, "shape": SHAPE}
    worker = spawned(stream(hive, "/v1/workers/spawn", {"model_ref": REF, "backend": "cpu", "keep_alive": "-1"}))
    _, loaded = call(hive.port, "GET", "/v1/resources?model=" + urllib.parse.quote(REF), token=hive.token)
    assert loaded["model"] == {"model_ref": REF, "cataloged": True, "size_bytes": os.path.getsize(model_path),
                               "layers": 30, "shape": SHAPE}
    [row] = loaded["workers"]
    assert row["worker_id"] == worker["worker_id"] and row["state"] == "idle"
    assert (row["slots_total"], row["slots_available"], row["queue_length"]) == (4, 4, 0)
    assert row["memory_mb"] > 94 and row["keep_alive_s"] == -1 and row["expires_unix"] is None
    assert [m["reference"] for m in loaded["models"]] == [REPO_ID]
    _, bad = call(hive.port, "GET", "/v1/resources?model=nonsense", token=hive.token)
    assert bad["error"]["code"] == "INVALID_MODEL_REF"


def test_a_spawn_over_the_queens_memory_limit_loads_nothing(start_hive, repo, model_path, tmp_path, rbee_home):
    hive = start_hive(lifeline=True)
    events = stream(hive, "/v1/workers/spawn", {"model_ref": REF, "backend": "cpu", "memory_limit_mb": 100})
    kind, data = events[-1]
    assert kind == "error" and data["error"]["code"] == "INSUFFICIENT_RAM", data
    # the GGUF's estimate of a worker beside its KV cache (a default context fits itself into the rest)
    assert data["error"]["details"] == {"required_mb": 201, "available_mb": 100, "node": "testnode"}
    assert "nodes set testnode --max-ram" in data["error"]["suggestion"]
    assert workers(hive) == [] and not [p for p, cmd in rbee_processes(str(tmp_path)) if " worker " in cmd]
    resp, bad = call(hive.port, "POST", "/v1/workers/spawn", {"model_ref": REF, "keep_alive": "later"},
                     token=hive.token)
    assert resp.status == 400 and bad["error"]["details"] == {"field": "keep_alive"}


def test_a_queens_hive_ends_when_it_has_had_no_worker_for_its_keep_alive(start_hive, model_path):
    hive = start_hive(lifeline=True, hello={"token": TOKEN, "keep_alive": 1})
    worker = spawned(stream(hive, "/v1/workers/spawn", {"model_ref": "file:" + model_path, "keep_alive": 0}))
    stopped = hive.wait_event("worker_idle_stop", timeout=15)   # 0 s: at its first idle check after the grace
    assert stopped["worker_id"] == worker["worker_id"]
    hive.wait_event("hive_idle_stop", timeout=10)
    assert hive.proc.wait(15) == 0
