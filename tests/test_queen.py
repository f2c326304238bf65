"""The queen and the keeper on node `localhost` (a local hive, no ssh): the seed flow, persistent
and ephemeral modes, interruptions and errors -- every role a real process, the real model."""
import json
import os
import re
import signal
import time
import urllib.request

import pytest

from conftest import (assert_no_rbee_left, free_port, json_events, kill_queen_and_await_lifelines, port_open,
                      ports_held, rbee_processes, read_until_tokens, run_rbee, start_keeper, start_queen, wait_until)

PROMPT = "Once upon a time, in a small village by the sea, there lived"
SEED_ACTORS = ("queen-rbee", "rbee-hive", "http-server", "llm-worker-rbee", "device-manager", "model-loader",
               "tokenizer", "llama-backend")


def infer_args(model_ref, *extra, max_tokens=20, temperature="0"):
    return ["infer", "--node", "localhost", "--model", model_ref, "--prompt", PROMPT,
            "--max-tokens", str(max_tokens), "--temperature", temperature] + list(extra)


def test_seed_flow_on_localhost_ephemeral(env, model_path, reference_llm, model_ref, tmp_path):
    """The seed command: tokens alone on stdout, every hop's narration on stderr, nothing left."""
    result = run_rbee(["infer", "--node", "localhost", "--model", model_ref, "--prompt", "write a short story",
                       "--max-tokens", "20", "--temperature", "0"], env)
    assert result.returncode == 0, result.stderr
    llm = reference_llm
    expected = llm.create_chat_completion(messages=[{"role": "user", "content": "write a short story"}],
                                          max_tokens=20, temperature=0)["choices"][0]["message"]["content"]
    assert result.stdout == expected and expected
    raw = run_rbee(infer_args(model_ref, "--raw", "--quiet"), env)
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == llm.create_completion(PROMPT, max_tokens=20, temperature=0)["choices"][0]["text"]
    lines = result.stderr.splitlines()
    for actor in SEED_ACTORS:
        assert any(line.startswith("[%s] " % actor) for line in lines), (actor, result.stderr)
    hive_port = int(re.search(r"^\[rbee-hive\] 🌅 Starting pool manager on port (\d+)$", result.stderr, re.M).group(1))
    for needle in ("[http-server] 🚀 HTTP server ready on port %d" % hive_port,
                   "[llm-worker-rbee] 🌅 Worker starting on port 80", "[llm-worker-rbee] 👋 Reporting ready to rbee-hive",
                   "[tokenizer] 🍰 Tokenized prompt (", "[llama-backend] 🧹 Reset KV cache for fresh start",
                   "[llama-backend] 🎯 Generated 10 tokens", "[llama-backend] 🎉 Inference complete! 20 tokens in "):
        assert needle in result.stderr, needle
    assert "MB cozy in RAM" in result.stderr and "tok/s)" in result.stderr
    # the cascade: the keeper waited for it, so nothing is left and the ports are free at once
    assert_no_rbee_left(str(tmp_path), within=5)
    worker_port = int(re.search(r"Worker starting on port (\d+)", result.stderr).group(1))
    queen_port = int(env["RBEE_QUEEN_URL"].rsplit(":", 1)[1])   # this test's own (conftest)
    # (the worker's is 8001 unless another program held it)
    assert ports_held(str(tmp_path), queen_port, hive_port, worker_port) == []
    # the file: model is cataloged on the node
    import sqlite3
    rows = sqlite3.connect(str(tmp_path / "rbee-home" / "models.db")).execute(
        "SELECT provider, reference, local_path, size_bytes FROM models").fetchall()
    assert rows == [("file", model_path, model_path, os.path.getsize(model_path))]


def test_json_quiet_and_timings(env, model_ref):
    result = run_rbee(infer_args(model_ref, "--json", "--quiet", max_tokens=12), env)
    assert result.returncode == 0, result.stderr
    events = json_events(result.stdout)
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "end" and kinds.count("end") == 1
    assert "worker" in kinds and "narration" not in kinds    # --quiet drops narration
    tokens = [e for e in events if e["event"] == "token"]
    assert [t["i"] for t in tokens] == list(range(len(tokens))) and len(tokens) >= 1
    assert events[-1]["tokens_out"] == 12 and events[-1]["stop_reason"] == "max_tokens"
    assert "api_key" not in next(e for e in events if e["event"] == "worker")
    assert result.stderr == ""

    result = run_rbee(infer_args(model_ref, "--timings", "--quiet", max_tokens=5), env)
    assert result.returncode == 0, result.stderr
    for label in ("Timings", "hive process start", "hive ready (HTTP up)", "model load", "first token", "tokens/s"):
        assert label in result.stderr, result.stderr
    assert result.stdout and "[" not in result.stdout


def test_persistent_queen_reuses_the_worker_and_survives_the_keeper(queen, env, model_ref, tmp_path):
    first = run_rbee(infer_args(model_ref, "--json", "--queen", queen.url), env)
    second = run_rbee(infer_args(model_ref, "--json", "--queen", queen.url), env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    worker = lambda r: next(e for e in json_events(r.stdout) if e["event"] == "worker")
    assert worker(first)["worker_id"] == worker(second)["worker_id"]
    assert worker(first)["node"] == "localhost" and worker(first)["backend"] == "cpu"
    # queen, hive and worker are still up after the keeper exits
    cmds = [cmd for _, cmd in rbee_processes(str(tmp_path))]
    assert any(" queen " in c for c in cmds) and any(" hive " in c for c in cmds) and any(" worker " in c for c in cmds)
    listed = run_rbee(["workers", "list", "--queen", queen.url], env)
    assert worker(first)["worker_id"] in listed.stdout and "localhost" in listed.stdout
    status = run_rbee(["status", "--queen", queen.url], env)
    assert status.returncode == 0 and "hive:   localhost" in status.stdout
    assert worker(first)["worker_id"] in status.stdout
    models = run_rbee(["models", "list", "--node", "localhost", "--queen", queen.url], env)
    assert models.returncode == 0 and model_ref[5:] in models.stdout
    # SIGTERM to the queen cascades: nothing left
    queen.proc.send_signal(signal.SIGTERM)
    assert queen.proc.wait(30) == 0
    assert_no_rbee_left(str(tmp_path), within=5)


def test_sigkill_of_the_queen_mid_generation_leaves_nothing(queen, env, model_ref, tmp_path):
    keeper = start_keeper(infer_args(model_ref, "--json", "--queen", queen.url, max_tokens=1500), env)
    seen = read_until_tokens(keeper, 3)
    kill_queen_and_await_lifelines(queen, str(tmp_path))
    out, err = keeper.communicate(timeout=30)
    assert keeper.returncode == 1
    err = err.decode()
    assert "[llm-worker-rbee] ❌ Error: Worker " in err and "code: REQUEST_CANCELLED" in err
    assert "tokens_generated: " in err and "Suggestion:" in err
    kinds = [e["event"] for e in seen + json_events(out.decode()) if e["event"] != "narration"]
    assert kinds[-2:] == ["token", "error"]   # the text so far was kept, then the error
    assert_no_rbee_left(str(tmp_path), within=5)


def test_ctrl_c_cancels_and_the_persistent_worker_is_idle_again(queen, env, model_ref, tmp_path):
    keeper = start_keeper(infer_args(model_ref, "--json", "--queen", queen.url, max_tokens=1500), env)
    events = read_until_tokens(keeper, 3)
    worker_url = next(e for e in events if e["event"] == "worker")["worker_url"]
    keeper.send_signal(signal.SIGINT)
    keeper.communicate(timeout=30)
    assert keeper.returncode == 130
    import urllib.request
    health = lambda: json.load(urllib.request.urlopen(worker_url + "/health", timeout=5))
    wait_until(lambda: health()["state"] == "idle", 5, what="the worker to be idle after Ctrl-C")
    assert any(" worker " in c for _, c in rbee_processes(str(tmp_path)))


def test_ctrl_c_in_ephemeral_mode_exits_130_and_leaves_nothing(env, model_ref, tmp_path):
    keeper = start_keeper(infer_args(model_ref, "--json", max_tokens=1500), env)
    read_until_tokens(keeper, 3)
    keeper.send_signal(signal.SIGINT)
    _, err = keeper.communicate(timeout=60)
    assert keeper.returncode == 130, err
    assert_no_rbee_left(str(tmp_path), within=5)


def test_sigkill_of_the_keeper_leaves_nothing(env, model_ref, tmp_path):
    keeper = start_keeper(infer_args(model_ref, "--json", max_tokens=1500), env)
    read_until_tokens(keeper, 3)
    keeper.kill()
    keeper.wait()
    assert_no_rbee_left(str(tmp_path), within=10)


def test_unregistered_node_is_node_not_found_with_a_suggestion(env, model_ref, tmp_path):
    result = run_rbee(["infer", "--node", "nowhere", "--model", model_ref, "--prompt", "hi"], env)
    assert result.returncode == 1
    assert "❌ Error: Node 'nowhere' is not registered" in result.stderr and "code: NODE_NOT_FOUND" in result.stderr
    assert "Suggestion: Register it: rbee.py nodes add nowhere" in result.stderr
    assert result.stdout == ""
    assert_no_rbee_left(str(tmp_path), within=5)


@pytest.mark.parametrize("ref", ["TheBloke/TinyLlama", "hf:", "hf:onlyorg", "hf:a/b/c", "file:relative/x.gguf",
                                 "http://example.com/x.gguf", "hf:org/repo:", "  "])
def test_invalid_model_ref_fails_before_any_process_starts(env, ref, tmp_path):
    result = run_rbee(["infer", "--node", "localhost", "--model", ref, "--prompt", "hi"], env)
    assert result.returncode == 1
    assert "Invalid model reference" in result.stderr or "Empty model reference" in result.stderr
    assert "Suggestion: Use hf:ORG/REPO" in result.stderr and "code: INVALID_MODEL_REF" in result.stderr
    assert "Traceback" not in result.stderr
    assert not port_open("127.0.0.1", int(env["RBEE_QUEEN_URL"].rsplit(":", 1)[1]))
    assert not rbee_processes(str(tmp_path))
    assert not os.path.exists(tmp_path / "rbee-home" / "models.db")


@pytest.mark.parametrize("args", [["infer"], ["infer", "--model", "hf:a/b", "--prompt", "x", "--max-tokens", "0"],
                                  ["infer", "--model", "hf:a/b", "--prompt", "x", "--temperature", "9"],
                                  ["infer", "--model", "hf:a/b", "--prompt", "x", "--backend", "tpu"],
                                  ["frobnicate"], ["nodes", "add", "x"],
                                  ["nodes", "add", "x", "--ssh-host", "h", "--env", "NOT_A_PAIR"]])
def test_usage_errors_exit_2(env, args):
    result = run_rbee(args, env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "usage:" in result.stderr


def test_queen_http_errors_use_the_envelope(queen):
    import urllib.error
    import urllib.request
    for method, path, body, status, code in (
            ("GET", "/nope", None, 404, "INVALID_REQUEST"), ("GET", "/v2/tasks", None, 405, "INVALID_REQUEST"),
            ("POST", "/v2/tasks", b"{bad", 400, "INVALID_REQUEST"),
            ("POST", "/v2/tasks", b'{"node": "localhost", "model": "nope", "prompt": "x"}', 400, "INVALID_MODEL_REF"),
            ("POST", "/v2/tasks", b'{"node": "ghost", "model": "hf:a/b", "prompt": "x"}', 404, "NODE_NOT_FOUND"),
            ("POST", "/v2/tasks", b"x" * (2 << 20), 413, "INVALID_REQUEST")):
        req = urllib.request.Request(queen.url + path, data=body, method=method)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        assert info.value.code == status
        assert json.loads(info.value.read())["error"]["code"] == code
    assert json.load(urllib.request.urlopen(queen.url + "/health"))["status"] == "ok"


def test_local_models_commands(env, model_ref, model_path):
    assert run_rbee(["models", "list"], env).stdout == ""
    downloaded = run_rbee(["models", "download", model_ref], env)
    assert downloaded.returncode == 0 and model_path in downloaded.stdout
    assert model_path in run_rbee(["models", "list"], env).stdout
    removed = run_rbee(["models", "rm", model_ref], env)
    assert removed.returncode == 0
    assert os.path.exists(model_path)   # a file: model is the user's own file: never deleted
    assert run_rbee(["models", "list"], env).stdout == ""
    missing = run_rbee(["models", "rm", model_ref], env)
    assert missing.returncode == 1 and "❌ Error" in missing.stderr and "code: MODEL_NOT_FOUND" in missing.stderr


def test_workers_shutdown_and_node_models_through_the_queen(queen, env, model_ref, model_path, tmp_path):
    down = run_rbee(["models", "download", model_ref, "--node", "localhost", "--queen", queen.url], env)
    assert down.returncode == 0 and model_path in down.stdout, down.stderr
    first = run_rbee(infer_args(model_ref, "--json", "--quiet", "--queen", queen.url, max_tokens=3), env)
    worker_id = next(e for e in json_events(first.stdout) if e["event"] == "worker")["worker_id"]
    stopped = run_rbee(["workers", "shutdown", worker_id, "--node", "localhost", "--queen", queen.url], env)
    assert stopped.returncode == 0 and worker_id in stopped.stdout
    wait_until(lambda: not any(" worker " in c for _, c in rbee_processes(str(tmp_path))), 10,
               what="the worker to exit")
    assert worker_id not in run_rbee(["workers", "list", "--queen", queen.url], env).stdout
    unknown = run_rbee(["workers", "shutdown", "worker-nope", "--queen", queen.url], env)
    assert unknown.returncode == 1 and "No worker worker-nope" in unknown.stderr
    removed = run_rbee(["models", "rm", model_ref, "--node", "localhost", "--queen", queen.url], env)
    assert removed.returncode == 0 and "Removed 1 model(s) from localhost" in removed.stdout
    assert model_path not in run_rbee(["models", "list", "--node", "localhost", "--queen", queen.url], env).stdout
    assert os.path.exists(model_path)


def test_status_without_a_queen_lists_the_nodes_and_starts_nothing(env, tmp_path):
    status = run_rbee(["status", "--queen", "http://127.0.0.1:%d" % free_port()], env)
    assert status.returncode == 0 and "queen:  not running at" in status.stdout
    assert not rbee_processes(str(tmp_path))


def test_a_reader_that_goes_away_cancels_the_job_quietly(env, model_ref, tmp_path):
    """`rbee.py infer ... | head -c 20`: the keeper stops the job and leaves, with no error."""
    keeper = start_keeper(infer_args(model_ref, max_tokens=1500), env)
    assert keeper.stdout.read(20)
    keeper.stdout.close()
    err = keeper.stderr.read().decode()
    assert keeper.wait(60) == 0, err
    assert "❌" not in err and "Traceback" not in err
    assert_no_rbee_left(str(tmp_path), within=5)


def test_eight_keepers_at_once_on_one_persistent_queen_all_finish(queen, env, model_ref):
    """Eight users at once on one model: the worker's four slots serve four, the others wait in
    its queue (told their position), and every command exits 0 with its text."""
    keepers = [start_keeper(["infer", "--node", "localhost", "--model", model_ref, "--prompt", "%s (%d)" % (PROMPT, k),
                             "--max-tokens", "48", "--temperature", "0", "--raw", "--queen", queen.url], env)
               for k in range(8)]
    results = [(k.communicate(timeout=300), k.returncode) for k in keepers]
    assert all(code == 0 and out.strip() for (out, _), code in results), [
        (code, err.decode()[-500:]) for (_, err), code in results if code]
    assert not any("❌" in err.decode() for (_, err), _ in results)
    listed = run_rbee(["workers", "list", "--queen", queen.url], env)
    assert len(listed.stdout.strip().splitlines()) == 1, listed.stdout   # one worker served all eight


def worker_pids(tmp_path):
    return [pid for pid, cmd in rbee_processes(str(tmp_path)) if " worker " in cmd]


def ps_workers(queen, env):
    result = run_rbee(["ps", "--json", "--queen", queen.url], env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["workers"]


def test_keep_alive_zero_unloads_after_the_request_and_negative_keeps_the_worker(roles, env, model_ref, tmp_path):
    """Ollama's keep_alive: 0 unloads the model once the request is done, a negative value keeps it
    loaded past the queen's default (here 2 s), until the queen stops."""
    queen = start_queen(roles, env, "--keep-alive", "2s")
    once = run_rbee(infer_args(model_ref, "--keep-alive", "0", "--queen", queen.url), env)
    assert once.returncode == 0 and once.stdout, once.stderr
    wait_until(lambda: not worker_pids(tmp_path) and not ps_workers(queen, env), 10, what="the worker unloaded")
    kept = run_rbee(infer_args(model_ref, "--keep-alive", "-1", "--queen", queen.url), env)
    assert kept.returncode == 0, kept.stderr
    time.sleep(5)   # past the queen's keep-alive and HANDOUT_GRACE
    [worker] = ps_workers(queen, env)
    assert worker["keep_alive_s"] == -1 and worker["expires_unix"] is None and worker["state"] == "idle"
    assert [worker["pid"]] == worker_pids(tmp_path)
    table = run_rbee(["ps", "--queen", queen.url], env).stdout
    row = r"^%s\s+localhost\s+cpu:0\s+0/4\s+0\s+\d+ MB\s+8192 f16\s+forever$" % re.escape(model_ref)
    assert re.search(row, table, re.M), table
    # a later request with its own keep-alive changes it, as with Ollama
    later = run_rbee(infer_args(model_ref, "--keep-alive", "1s", "--queen", queen.url), env)
    assert later.returncode == 0, later.stderr
    wait_until(lambda: not worker_pids(tmp_path), 10, what="the worker gone after its new keep-alive")
    # with no worker for the queen's keep-alive, the local hive ends too; the queen stays
    wait_until(lambda: not [p for p, cmd in rbee_processes(str(tmp_path)) if " hive " in cmd], 10,
               what="the hive ended")
    assert queen.proc.poll() is None
    status = run_rbee(["status", "--json", "--queen", queen.url], env)
    assert json.loads(status.stdout)["hives"] == []


def test_a_bad_keep_alive_is_a_usage_error_and_a_400(queen, env, model_ref, tmp_path):
    usage = run_rbee(infer_args(model_ref, "--keep-alive", "soon", "--queen", queen.url), env)
    assert usage.returncode == 2 and "is no duration" in usage.stderr
    body = json.dumps({"model": model_ref, "node": "localhost", "keep_alive": "soon"}).encode()
    request = urllib.request.Request(queen.url + "/v2/tasks", body, {"Content-Type": "application/json"})
    with pytest.raises(urllib.request.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 400
    assert json.loads(caught.value.read())["error"]["details"] == {"field": "keep_alive"}
    assert not worker_pids(tmp_path)


def test_no_node_fits_is_insufficient_ram_before_anything_loads(env, model_ref, tmp_path):
    """localhost capped at 50 MB, the model needs 246 (its GGUF's estimate, 201, and the KV cache of 2,048 tokens):
    exit 1 with the node's free memory."""
    capped = run_rbee(["nodes", "set", "localhost", "--max-ram", "50M"], env)
    assert capped.returncode == 0, capped.stderr
    assert capped.stdout == "Node localhost: rbee may use at most 50 MB of RAM\n"
    result = run_rbee(["infer", "--model", model_ref, "--prompt", PROMPT, "--json"], env)
    assert result.returncode == 1
    error = next(e for e in json_events(result.stdout) if e["event"] == "error")["error"]
    assert error["code"] == "INSUFFICIENT_RAM" and error["component"] == "queen-rbee"
    assert error["details"] == {"required_mb": 246, "free_mb": {"localhost": {"cpu:0": 50}}}
    message = "No node has room for %s: it needs 246 MB (localhost: cpu:0 50 MB free)" % model_ref
    assert "[queen-rbee] ❌ Error: " + message in result.stderr
    assert not any(e.get("action") == "model_load" for e in json_events(result.stdout))
    assert_no_rbee_left(str(tmp_path), within=5)
