"""The apps' APIs on the queen (PROTOCOL.md §13), driven by the real client packages: `openai`,
`ollama`, and Prometheus' own text parser for /metrics -- against a real queen, hive and worker on
the real model (node localhost, placed by the queen)."""
import concurrent.futures
import json
import os
import signal
import urllib.request

import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import (assert_no_rbee_left, raw_request, rbee_processes, run_rbee, start_queen, tracebacks,
                      wait_until, worker_threads)
from fakehub import FakeHub

SYSTEM = {"role": "system", "content": "You are a helpful assistant who answers briefly."}
TWO_TURNS = [SYSTEM, {"role": "user", "content": "What is the capital of France?"},
             {"role": "assistant", "content": "The capital of France is Paris."},
             {"role": "user", "content": "And of Italy?"}]
REPO_ID = "rbee-test/SmolLM2-135M-Instruct-GGUF"


@pytest.fixture
def model(model_path):
    return "file:" + model_path


@pytest.fixture
def hub(model_path):
    with FakeHub() as hub:
        hub.add_file(REPO_ID, "smollm2-135m-instruct.Q4_K_M.gguf", path=model_path)
        yield hub


@pytest.fixture
def queen(roles, env, hub):
    return start_queen(roles, dict(env, HF_ENDPOINT=hub.url))


def client(queen, key="unused", **kw):
    return openai.OpenAI(base_url=queen.url + "/v1", api_key=key, max_retries=0, **kw)


def worker_pids(tmp_path):
    return [pid for pid, cmd in rbee_processes(str(tmp_path)) if " worker " in cmd]


# -- OpenAI ------------------------------------------------------------------------------------

def test_a_two_turn_chat_equals_llama_cpp_pythons_own_chat_completion(queen, model, reference_llm):
    answer = client(queen).chat.completions.create(model=model, messages=TWO_TURNS, max_tokens=32, temperature=0)
    expected = reference_llm.create_chat_completion(messages=TWO_TURNS, max_tokens=32, temperature=0)
    assert answer.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == expected["choices"][0]["finish_reason"]
    assert answer.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert answer.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.model == model and answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")


def test_streaming_chat_with_usage_as_llama_cpp_server_streams_it(queen, model):
    api = client(queen)
    whole = api.chat.completions.create(model=model, messages=TWO_TURNS, max_tokens=24, temperature=0)
    chunks = list(api.chat.completions.create(model=model, messages=TWO_TURNS, max_tokens=24, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.model == model and c.created for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    last, usage = chunks[-2], chunks[-1]
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason and not last.choices[0].delta.content
    assert usage.choices == [] and usage.usage.completion_tokens == whole.usage.completion_tokens
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens


def test_the_stream_on_the_wire_ends_with_done_and_json_mode_gives_json(queen, model):
    body = {"model": model, "messages": [{"role": "system", "content": "You answer in JSON."},
                                         {"role": "user", "content": "Give me a person with name and age."}],
            "max_tokens": 200, "temperature": 0, "stream": True, "response_format": {"type": "json_object"}}
    conn, resp = raw_request(int(queen.url.rsplit(":", 1)[1]), "POST", "/chat/completions", body)   # no /v1
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    raw = resp.read().decode()
    conn.close()
    frames = [f for f in raw.split("\n\n") if f]
    assert frames[-1] == "data: [DONE]" and all(f.startswith("data: ") for f in frames)
    chunks = [json.loads(f[6:]) for f in frames[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(text), dict), text   # the grammar: one JSON object, then the end


def test_a_legacy_completion_and_the_models_list(queen, model, reference_llm):
    api = client(queen)
    done = api.completions.create(model=model, prompt="Once upon a time", max_tokens=16, temperature=0)
    expected = reference_llm.create_completion("Once upon a time", max_tokens=16, temperature=0)
    assert done.choices[0].text == expected["choices"][0]["text"]
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 16
    listed = api.models.list().data
    assert [m.id for m in listed] == [model] and listed[0].owned_by == "rbee"
    assert api.models.retrieve(model).id == model


def test_errors_raise_the_sdks_own_exceptions(queen, model, rbee_home):
    api = client(queen)
    with pytest.raises(openai.NotFoundError) as missing:
        api.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["code"] == "model_not_found"
    # a reference to a file that is no model anywhere: the same 404, streamed or not
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as nowhere:
            api.chat.completions.create(model="file:/nonexistent/model.gguf", stream=stream,
                                        messages=[{"role": "user", "content": "hi"}])
        assert nowhere.value.body["code"] == "model_not_found", nowhere.value.body
    with pytest.raises(openai.BadRequestError) as two:
        api.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], n=2)
    assert two.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as bad:
        api.chat.completions.create(model=model, messages=[{"role": "wizard", "content": "hi"}])
    assert bad.value.body["param"] == "messages[0]"
    # a prompt over the worker's whole context: 400 before any stream starts, both sizes said
    with pytest.raises(openai.BadRequestError) as long:
        api.chat.completions.create(model=model, messages=[{"role": "user", "content": "word " * 9000}], stream=True)
    assert "holds 8,192" in long.value.message and long.value.body["code"] == "context_length_exceeded"
    # none of it was a bug: no traceback in what the queen printed nor in its hive's and worker's logs
    assert tracebacks(queen.lines, rbee_home) == []


def test_an_error_after_the_stream_began_is_an_error_frame(queen, model, tmp_path):
    api = client(queen)
    stream = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count to a thousand."}],
                                         max_tokens=1500, temperature=0, stream=True)
    next(iter(stream))
    for pid in worker_pids(tmp_path):
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(openai.APIError) as died:
        for _ in stream:
            pass
    assert "stopped mid-stream" in str(died.value.message)


def test_eight_concurrent_sdk_streams_all_complete(queen, model):
    api = client(queen)

    def one(k):
        stream = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell story %d" % k}],
                                             max_tokens=32, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(8)))
    assert all(texts), texts


def test_full_queues_answer_503_with_retry_after(roles, env, model):
    queen = start_queen(roles, env, "--max-queue", "0")   # 4 slots, nobody may wait
    api = client(queen)
    client(queen).completions.create(model=model, prompt="warm up", max_tokens=1)   # the worker is up

    def one(k):
        try:
            stream = api.completions.create(model=model, prompt="1, 2, 3, 4, %d," % k, max_tokens=200, temperature=0,
                                            stream=True)
            return len(list(stream))
        except openai.APIStatusError as err:
            return err
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert refused and len(refused) <= 4, results
    assert all(r.status_code == 503 and r.response.headers["retry-after"] == "1" for r in refused)
    assert all(r.body["code"] == "all_slots_busy" for r in refused)


def test_a_key_is_asked_for_and_never_shown(roles, env, model, tmp_path):
    key = "sk-rbee-test-0123456789abcdef"
    queen = start_queen(roles, dict(env, RBEE_API_KEY=key))
    with pytest.raises(openai.AuthenticationError):
        client(queen).models.list()
    with pytest.raises(openai.AuthenticationError):
        client(queen, key="wrong").chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    answer = client(queen, key=key).chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                            max_tokens=4)
    assert answer.choices[0].message.content
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=queen.url).list()
    assert refused.value.status_code == 401
    assert [m.model for m in ollama.Client(host=queen.url, headers={"Authorization": "Bearer " + key}).list().models]
    with urllib.request.urlopen(queen.url + "/api/version") as resp:   # open, as Ollama's
        assert json.loads(resp.read())["version"]
    for pid, cmd in rbee_processes(str(tmp_path)):
        assert key not in cmd, cmd
    logs = [os.path.join(d, f) for d, _, files in os.walk(str(tmp_path)) for f in files if f.endswith(".log")]
    assert logs and not [p for p in logs if key in open(p, errors="replace").read()]


def test_cors_preflight_for_an_allowed_origin_only(roles, env):
    queen = start_queen(roles, env, "--cors-origin", "http://chat.lan")
    port = int(queen.url.rsplit(":", 1)[1])
    headers = {"Origin": "http://chat.lan", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}
    conn, resp = raw_request(port, "OPTIONS", "/v1/chat/completions", headers=headers)
    assert resp.status == 204
    assert resp.getheader("Access-Control-Allow-Origin") == "http://chat.lan"
    assert resp.getheader("Access-Control-Allow-Headers") == "authorization, content-type"
    conn.close()
    conn, resp = raw_request(port, "GET", "/api/version", headers={"Origin": "http://chat.lan"})
    assert resp.status == 200 and resp.getheader("Access-Control-Allow-Origin") == "http://chat.lan"
    conn.close()
    conn, resp = raw_request(port, "OPTIONS", "/v1/models", headers=dict(headers, Origin="http://evil.example"))
    assert resp.status == 405 and resp.getheader("Access-Control-Allow-Origin") is None
    conn.close()


# -- names people type ----------------------------------------------------------------------------

def test_an_alias_names_its_model_in_every_api_and_command(queen, model, env):
    """`rbee.py models alias NAME REF` on the queen's machine: an Ollama-style name (with `:`) and
    a client's fixed one (with `/`) work in OpenAI's and Ollama's APIs, in `infer`, and in the
    listings; an alias that is gone is a 404 again."""
    for alias in ("qwen2.5-coder:1.5b", "openai/gpt-4o-mini"):
        added = run_rbee(["models", "alias", alias, model], env)
        assert added.returncode == 0 and alias in added.stdout, added.stderr
    messages = [{"role": "user", "content": "Name a colour."}]
    api = client(queen)
    direct = api.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    for alias in ("qwen2.5-coder:1.5b", "openai/gpt-4o-mini"):
        answer = api.chat.completions.create(model=alias, messages=messages, max_tokens=8, temperature=0)
        assert answer.model == alias and answer.choices[0].message.content == direct.choices[0].message.content
    listed = {m.id: m for m in api.models.list().data}
    assert {"qwen2.5-coder:1.5b", "openai/gpt-4o-mini", model} <= set(listed)
    assert listed["qwen2.5-coder:1.5b"].model_extra["alias_of"] == model
    assert api.models.retrieve("openai/gpt-4o-mini").id == "openai/gpt-4o-mini"
    chat = ollama.Client(host=queen.url).chat(model="qwen2.5-coder:1.5b", messages=messages,
                                              options={"temperature": 0, "num_predict": 8})
    assert chat.message.content == direct.choices[0].message.content
    assert "qwen2.5-coder:1.5b" in [m.model for m in ollama.Client(host=queen.url).list().models]
    assert ollama.Client(host=queen.url).show("qwen2.5-coder:1.5b").details.format == "gguf"
    infer = run_rbee(["infer", "--model", "qwen2.5-coder:1.5b", "--prompt", "Name a colour.", "--max-tokens", "8",
                      "--temperature", "0", "--queen", queen.url], env)
    assert infer.returncode == 0 and infer.stdout == direct.choices[0].message.content, infer.stderr
    # a name that is a reference itself, or a target that is none, is refused; an alias gone is a 404
    assert run_rbee(["models", "alias", "hf:a/b", model], env).returncode == 1
    assert "INVALID_MODEL_REF" in run_rbee(["models", "alias", "mine", "nonsense"], env).stderr
    assert run_rbee(["models", "unalias", "qwen2.5-coder:1.5b"], env).returncode == 0
    assert run_rbee(["models", "aliases"], env).stdout.split() == ["openai/gpt-4o-mini", model]
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="qwen2.5-coder:1.5b", messages=messages, max_tokens=8)


# -- Ollama ------------------------------------------------------------------------------------

def test_ollama_chat_generate_list_ps(queen, model, reference_llm):
    api = ollama.Client(host=queen.url)
    options = {"temperature": 0, "num_predict": 24}
    whole = api.chat(model=model, messages=TWO_TURNS, options=options)
    expected = reference_llm.create_chat_completion(messages=TWO_TURNS, max_tokens=24, temperature=0)
    assert whole.message.content == expected["choices"][0]["message"]["content"]
    assert whole.done and whole.eval_count == expected["usage"]["completion_tokens"]
    assert whole.prompt_eval_count == expected["usage"]["prompt_tokens"]
    parts = list(api.chat(model=model, messages=TWO_TURNS, options=options, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].done and parts[-1].done_reason == whole.done_reason and not any(p.done for p in parts[:-1])
    generated = api.generate(model=model, prompt="Once upon a time", raw=True, options={"temperature": 0,
                                                                                         "num_predict": 12})
    assert generated.response == reference_llm.create_completion("Once upon a time", max_tokens=12,
                                                                 temperature=0)["choices"][0]["text"]
    assert [m.model for m in api.list().models] == [model]
    [loaded] = api.ps().models
    assert loaded.model == model and loaded.size > 90 << 20 and loaded.expires_at
    assert api.show(model).details.format == "gguf"
    with pytest.raises(ollama.ResponseError) as missing:
        api.chat(model="llama3", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404 and "llama3" in missing.value.error
    with pytest.raises(ollama.ResponseError) as nowhere:
        api.generate(model="file:/nonexistent/model.gguf", prompt="hi")
    assert nowhere.value.status_code == 404 and "/nonexistent/model.gguf" in nowhere.value.error


def test_ollama_root_version_load_and_unload(queen, model, tmp_path):
    with urllib.request.urlopen(queen.url + "/") as resp:
        assert resp.read() == b"rbee is running"
    request = urllib.request.Request(queen.url + "/", method="HEAD")
    with urllib.request.urlopen(request) as resp:
        assert resp.status == 200 and resp.read() == b""
    version = json.loads(urllib.request.urlopen(queen.url + "/api/version").read())["version"]
    assert all(part.isdigit() for part in version.split("."))
    api = ollama.Client(host=queen.url)
    assert api.generate(model=model, prompt="").done_reason == "load"
    assert len(worker_pids(tmp_path)) == 1
    assert api.generate(model=model, prompt="", keep_alive=0).done_reason == "unload"
    wait_until(lambda: not worker_pids(tmp_path), 10, what="the worker unloaded")


def test_ollama_pull_streams_the_hives_download(queen, model_path):
    api = ollama.Client(host=queen.url)
    ref = "hf:" + REPO_ID
    progress = list(api.pull(ref, stream=True))
    statuses = [p.status for p in progress]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert "verifying sha256 digest" in statuses
    sized = [p for p in progress if p.total]
    assert sized and sized[-1].completed == sized[-1].total == os.path.getsize(model_path)
    assert [p.completed for p in sized] == sorted(p.completed for p in sized)
    assert ref in [m.model for m in api.list().models]
    with pytest.raises(ollama.ResponseError):
        api.pull("llama3:8b")


# -- /metrics -----------------------------------------------------------------------------------

def samples(queen, key=None):
    request = urllib.request.Request(queen.url + "/metrics", headers={"Authorization": "Bearer " + key} if key else {})
    with urllib.request.urlopen(request) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def test_metrics_parse_and_move_with_the_requests(queen, model):
    before = samples(queen)
    assert before[("rbee_requests_total", (("outcome", "ok"),))] == 0
    api = client(queen)
    answer = api.chat.completions.create(model=model, messages=TWO_TURNS, max_tokens=8, temperature=0)
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="nope", messages=TWO_TURNS)
    after = samples(queen)
    assert after[("rbee_requests_total", (("outcome", "ok"),))] == 1
    assert after[("rbee_generated_tokens_total", (("model", model),))] == answer.usage.completion_tokens
    assert after[("rbee_prompt_tokens_total", (("model", model),))] == answer.usage.prompt_tokens
    assert after[("rbee_time_to_first_token_seconds_count", ())] == 1
    assert after[("rbee_request_duration_seconds_count", ())] == 1
    assert after[("rbee_workers", (("model", model), ("node", "localhost"), ("state", "idle")))] == 1
    assert after[("rbee_node_free_memory_bytes", (("node", "localhost"),))] > 0
    assert after[("rbee_requests_running", ())] == 0


def test_the_apis_leave_nothing_after_the_queen(queen, model, tmp_path):
    client(queen).completions.create(model=model, prompt="hi", max_tokens=2)
    queen.proc.send_signal(signal.SIGTERM)
    assert queen.proc.wait(40) == 0
    assert_no_rbee_left(str(tmp_path), within=5)


def test_logprobs_are_llama_cpp_pythons_own_in_chat_and_completions(queen, model, model_path):
    import llama_cpp
    api = client(queen)
    prompt = "The capital of France is"
    reference = llama_cpp.Llama(model_path=model_path, n_ctx=256, n_threads=worker_threads(), flash_attn=True,
                                logits_all=True, verbose=False)   # (llama-cpp-python's logprobs need every logit)
    expected = reference.create_completion(prompt, max_tokens=6, temperature=0, logprobs=3)["choices"][0]
    got = api.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, logprobs=3).choices[0]
    assert got.text == expected["text"] and got.logprobs.tokens == expected["logprobs"]["tokens"]
    assert got.logprobs.token_logprobs == pytest.approx(expected["logprobs"]["token_logprobs"], abs=2e-3)
    assert [sorted(t) for t in got.logprobs.top_logprobs] == [sorted(t) for t in expected["logprobs"]["top_logprobs"]]
    # chat: each token's logprob and its 2 likeliest rivals, the greedy token the likeliest; streamed the same
    whole = api.chat.completions.create(model=model, messages=TWO_TURNS, max_tokens=8, temperature=0, logprobs=True,
                                        top_logprobs=2)
    content = whole.choices[0].logprobs.content
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    assert len(content) == whole.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token and t.logprob <= 0 and
               t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob and bytes(t.bytes).decode() == t.token
               for t in content)
    streamed = [t for c in api.chat.completions.create(model=model, messages=TWO_TURNS, max_tokens=8, temperature=0,
                                                       logprobs=True, top_logprobs=2, stream=True)
                if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-4)
    assert api.chat.completions.create(model=model, messages=TWO_TURNS, max_tokens=4).choices[0].logprobs is None
