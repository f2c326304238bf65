"""Issue 22 over real ssh into the simulated hosts (conftest's Sim: network namespaces): a cluster
that keeps serving when a node goes away. Apps' requests that streamed nothing yet are placed
again on another node; those that had are told which node went; a node that does not answer ssh
is down, costs the first request one connection timeout and the next ones nothing, and listings
answer at once from what the queen knows. Nothing of rbee is mocked; the apps are the real
`openai` package."""
import json
import os
import signal
import sys
import threading
import time
import urllib.request

import anthropic
import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import (MODEL, REPO, add_node, assert_no_rbee_left, auto_infer, cap, infer_args, json_events, ps_json,
                      roles_on, run_rbee, start_keeper, start_queen, wait_until, workers_by_host)

pytestmark = pytest.mark.usefixtures("no_leftovers")

sys.path.insert(0, str(REPO))
import rbee  # noqa: E402

COUNT_PROMPT = "1, 2, 3, 4, 5,"   # greedy, raw: it counts on and never ends by itself
QUEEN_TOKEN_TIMEOUT = 120         # s: a queen's wait for a worker's answer (a batch of embeddings: and 1 s per input)


def test_a_node_that_fails_ssh_again_and_again_is_tried_less_often_until_it_answers(tmp_path):
    registry = rbee.NodeRegistry(str(tmp_path / "beehives.db"))
    registry.save({"node_name": "mac", "ssh_host": "mac", "rbee_dir": "~/rbee", "python": "python3"})
    assert not registry.is_down(registry.get("mac"))
    waits = []
    for failure in range(1, 8):
        before = time.time()
        node = registry.mark_down("mac", "host unreachable")
        assert registry.is_down(node) and node["failures"] == failure and node["last_error"] == "host unreachable"
        waits.append(round(node["retry_unix"] - before))
    assert waits == [15, 30, 60, 120, 300, 300, 300]
    first_down = registry.get("mac")["down_since_unix"]
    assert first_down <= before   # (down since its first failure, not its last)
    registry.mark_up("mac")
    node = registry.get("mac")
    assert not registry.is_down(node) and node["failures"] == 0 and node["status"] == "reachable"
    assert node["retry_unix"] is None and node["down_since_unix"] is None and node["last_error"] is None
    assert registry.mark_down("nobody", "x") is None


class AppStream(threading.Thread):
    """An app streaming a completion from the queen with the openai package: its text as it
    comes, then the exception the package raised (None: the stream ended with [DONE])."""

    def __init__(self, queen, max_tokens):
        super().__init__(daemon=True)
        self.client = openai.OpenAI(base_url=queen.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        self.max_tokens = max_tokens      #: its answer's length
        self.text = ""                    #: what it got so far
        self.error = None                 #: what the package raised, once it did
        self.streaming = threading.Event()   #: its first text came
        self.start()

    def run(self):
        try:
            for chunk in self.client.completions.create(model=MODEL, prompt=COUNT_PROMPT, max_tokens=self.max_tokens,
                                                        temperature=0, stream=True):
                self.text += "".join(choice.text for choice in chunk.choices)
                if self.text:
                    self.streaming.set()
        except Exception as exc:   # (what the app sees: the test asserts on it)
            self.error = exc


class AppCall(threading.Thread):
    """An app's call that answers at once (no stream), in the background: its answer or what it raised."""

    def __init__(self, call):
        super().__init__(daemon=True)
        self.call, self.answer, self.error = call, None, None
        self.start()

    def run(self):
        try:
            self.answer = self.call()
        except Exception as exc:   # (what the app sees: the test asserts on it)
            self.error = exc


def narrated(queen, action):
    return [e for e in queen.events if e.get("action") == action]


def models_listing(queen):
    """(GET /v1/models's answer, seconds it took)."""
    started = time.monotonic()
    with urllib.request.urlopen(queen.url + "/v1/models", timeout=30) as answer:
        return json.loads(answer.read()), time.monotonic() - started


def test_a_node_cut_off_hands_its_queued_requests_to_another_and_serves_again(sim, ssh_env, tmp_path, roles):
    """4 apps stream from mac and 4 more (and a keeper) wait in its worker's queue, and an app's
    embeddings are being computed there; mac's link goes down. The queued ones and the embeddings
    complete on workstation, the streaming ones end with an error naming mac, and once mac's link
    is back (and `nodes check` says so) it serves again; nothing is left."""
    assert sim.netns, "two nodes need network namespaces (run as root)"
    add_node(sim, ssh_env, tmp_path, "mac", "--max-ram", "2G")
    add_node(sim, ssh_env, tmp_path, "workstation", "--max-ram", "2G")
    cap(ssh_env, "localhost", "1M")
    # (a long token timeout: the embeddings must be answered well before theirs, not after it)
    queen = start_queen(roles, dict(ssh_env, RBEE_TOKEN_TIMEOUT=str(QUEEN_TOKEN_TIMEOUT)), "--max-replicas", "1")
    warm = run_rbee(infer_args("mac", "--json", "--queen", queen.url, max_tokens=2), ssh_env, timeout=300)
    assert warm.returncode == 0, warm.stderr
    streaming = [AppStream(queen, 4000) for _ in range(4)]
    for app in streaming:
        assert app.streaming.wait(180), app.error
    queued = [AppStream(queen, 12) for _ in range(4)]
    # a keeper queued there too: with no ping for 15 s it gives the worker up, and the queen places it again
    keeper = start_keeper(auto_infer(queen, "--prompt", COUNT_PROMPT, "--raw", "--temperature", "0", max_tokens=12),
                          dict(ssh_env, RBEE_TOKEN_TIMEOUT="15"))
    # a batch that takes mac's busy worker 10 s or more (a causal model embeds some 200 tokens/s here)
    passages = [("%d. The quick brown fox jumps over the lazy dog by the river bank. " % i) * 6 for i in range(16)]
    embeddings = AppCall(lambda: openai.OpenAI(base_url=queen.url + "/v1", api_key="unused", max_retries=0,
                                               timeout=600).embeddings.create(model=MODEL, input=passages))
    wait_until(lambda: [w["queue_length"] for w in ps_json(queen, ssh_env)] == [5], 60,
               what="4 apps and a keeper queued on mac's worker")
    assert not any(app.streaming.is_set() for app in queued)
    assert embeddings.is_alive(), "the embeddings were done before mac went away: %s" % embeddings.error
    with sim.partition("mac"):
        cut = time.monotonic()
        embeddings.join(300)
        embedded_in = time.monotonic() - cut
        for app in queued + streaming:
            app.join(300)
        out, err = keeper.communicate(timeout=300)
        during = roles_on(sim, tmp_path)
        sim.forget_connections("mac")   # (as after a partition longer than TCP's retransmissions)
    # the queued requests: whole answers, from workstation
    texts = {app.text for app in queued}
    assert [app.error for app in queued] == [None] * 4 and len(texts) == 1, [app.error for app in queued]
    counted = texts.pop()
    assert counted.startswith(" 6, 7, 8"), counted
    # the embeddings: from workstation, once the queen saw mac go (not after their own timeout)
    assert embeddings.error is None and len(embeddings.answer.data) == len(passages), embeddings.error
    assert embedded_in < QUEEN_TOKEN_TIMEOUT, "the embeddings waited %.0f s, for their own timeout" % embedded_in
    failovers = narrated(queen, "failover")
    assert [e["human"] for e in failovers] == ["mac went away; placing on workstation"] * 5, failovers
    assert "workstation" in during.get("worker", []), during
    assert keeper.returncode == 0, err.decode()
    events = json_events(out.decode())
    assert [e["node"] for e in events if e["event"] == "worker"] == ["mac", "workstation"]
    assert [e["human"] for e in events if e.get("action") == "failover"] == ["mac went away; placing the task again"]
    assert events[-1]["event"] == "end" and events[-1]["tokens_out"] == 12
    # the streaming ones: the text they had, then the error that names mac
    for app in streaming:
        assert app.text and (counted.startswith(app.text) or app.text.startswith(counted)), app.text
        assert isinstance(app.error, openai.APIError), app.error
        assert "mac went away while it answered: its ssh connection was lost" in app.error.message, app.error
    down = [n for n in models_listing(queen)[0]["nodes"] if n["node"] == "mac"]
    assert down[0]["state"] == "down", down
    # mac is back: `nodes check` says so at once, and a request for it is served there
    check = run_rbee(["nodes", "check", "mac"], ssh_env, timeout=60)
    assert check.returncode == 0, check.stderr
    assert [n["state"] for n in models_listing(queen)[0]["nodes"] if n["node"] == "mac"] != ["down"]
    again = run_rbee(infer_args("mac", "--json", "--queen", queen.url, max_tokens=4), ssh_env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert [e["node"] for e in json_events(again.stdout) if e["event"] == "worker"] == ["mac"]
    queen.proc.send_signal(signal.SIGTERM)
    assert queen.proc.wait(60) == 0
    assert_no_rbee_left(str(tmp_path), within=10)


def test_a_node_without_sshd_costs_the_first_task_one_timeout_and_the_next_ten_nothing(sim, ssh_env, tmp_path,
                                                                                      roles):
    """workstation falls silent (no sshd answers: a machine switched off). The first task placed
    by the queen gives it one ssh attempt (one connection timeout) and marks it down; the next ten
    leave it out without ssh; /v1/models answers within a second and says it is down. (Each task
    names a keep-alive: then it is placed from a survey of every node, not given the warm worker.)"""
    assert sim.netns, "two nodes need network namespaces (run as root)"
    add_node(sim, ssh_env, tmp_path, "mac", "--max-ram", "2G")
    add_node(sim, ssh_env, tmp_path, "workstation", "--max-ram", "2G")
    cap(ssh_env, "localhost", "1M")
    queen = start_queen(roles, ssh_env)
    surveyed = auto_infer(queen, "--prompt", COUNT_PROMPT, "--keep-alive", "5m", max_tokens=2)
    with sim.partition("workstation"):
        first = run_rbee(surveyed, ssh_env, timeout=300)
        assert first.returncode == 0, first.stderr
        skipped = [e["human"] for e in json_events(first.stdout) if e.get("action") == "node_skipped"]
        assert len(skipped) == 1 and "failed after 1 attempt: host unreachable" in skipped[0], skipped
        assert not [e for e in json_events(first.stdout) if e.get("action") == "ssh_retry"]
        for _ in range(10):
            started = time.monotonic()
            task = run_rbee(surveyed, ssh_env, timeout=300)
            took = time.monotonic() - started
            assert task.returncode == 0, task.stderr
            said = [e["human"] for e in json_events(task.stdout) if e.get("action") == "node_skipped"]
            assert len(said) == 1 and said[0].startswith("Leaving workstation out: workstation is down ("), said
            assert took < 10, "a task waited %.1f s: as long as ssh's connection timeout" % took
        listing, took = models_listing(queen)
        assert took < 1.0, took
        [state] = [n for n in listing["nodes"] if n["node"] == "workstation"]
        assert state["state"] == "down" and "host unreachable" in state["reason"], state
        assert [m["id"] for m in listing["data"]] == [MODEL]
        status = run_rbee(["status", "--queen", queen.url], ssh_env)
        assert "down for" in status.stdout and "next try in" in status.stdout, status.stdout
    check = run_rbee(["nodes", "check", "workstation"], ssh_env, timeout=60)
    assert check.returncode == 0, check.stderr
    after = run_rbee(surveyed, ssh_env, timeout=300)
    assert after.returncode == 0, after.stderr
    assert not [e for e in json_events(after.stdout) if e.get("action") == "node_skipped"]
    queen.proc.send_signal(signal.SIGTERM)
    assert queen.proc.wait(60) == 0
    assert_no_rbee_left(str(tmp_path), within=10)


def test_a_killed_worker_hands_its_queued_ollama_and_anthropic_requests_to_another_node(sim, ssh_env, tmp_path,
                                                                                         roles):
    """mac's worker has one slot, taken by an OpenAI stream; an Ollama chat and an Anthropic
    message wait in its queue. The worker is killed: the stream ends with its error, the two
    queued requests are answered from workstation."""
    assert sim.netns, "two nodes need network namespaces (run as root)"
    add_node(sim, ssh_env, tmp_path, "mac", "--max-ram", "2G")
    add_node(sim, ssh_env, tmp_path, "workstation", "--max-ram", "2G")
    cap(ssh_env, "localhost", "1M")
    queen = start_queen(roles, ssh_env, "--max-replicas", "1")
    warm = run_rbee(infer_args("mac", "--json", "--queen", queen.url, "--parallel", "1", max_tokens=2), ssh_env,
                    timeout=300)
    assert warm.returncode == 0, warm.stderr
    streaming = AppStream(queen, 4000)
    assert streaming.streaming.wait(180), streaming.error
    question = [{"role": "user", "content": "Say hello."}]
    chat = AppCall(lambda: ollama.Client(host=queen.url).chat(model=MODEL, messages=question,
                                                               options={"num_predict": 8, "temperature": 0}))
    message = AppCall(lambda: anthropic.Anthropic(base_url=queen.url, api_key="unused", max_retries=0).messages.create(
        model=MODEL, max_tokens=8, messages=question, extra_body={"temperature": 0}))
    wait_until(lambda: [w["queue_length"] for w in ps_json(queen, ssh_env)] == [2], 60,
               what="an Ollama chat and an Anthropic message queued on mac's worker")
    [(host, pid)] = workers_by_host(sim, tmp_path)
    assert host == "mac"
    os.kill(pid, signal.SIGKILL)
    for app in (streaming, chat, message):
        app.join(300)
    assert isinstance(streaming.error, openai.APIError) and " on mac stopped mid-stream" in streaming.error.message
    assert chat.error is None and chat.answer.message.content and chat.answer.done_reason == "length", chat.error
    assert message.error is None and message.answer.content[0].text and message.answer.stop_reason == "max_tokens", (
        message.error)
    failovers = narrated(queen, "failover")
    assert [e["human"] for e in failovers] == ["mac went away; placing on workstation"] * 2, failovers
    assert [host for host, _ in workers_by_host(sim, tmp_path)] == ["workstation"]
    with urllib.request.urlopen(queen.url + "/metrics", timeout=30) as answer:
        families = {f.name: f for f in text_string_to_metric_families(answer.read().decode())}
    assert [(s.labels, s.value) for s in families["rbee_failovers"].samples] == [({"node": "mac"}, 2.0)]
    queen.proc.send_signal(signal.SIGTERM)
    assert queen.proc.wait(60) == 0
    assert_no_rbee_left(str(tmp_path), within=10)
