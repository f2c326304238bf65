"""The queen's scheduler (PROTOCOL.md §12) against a real queen, hive and workers on the real model
(node localhost, capped with `nodes set`): what one decision costs the others, and what counts as
a worker's load."""
import concurrent.futures
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import openai
import pytest

from conftest import assert_no_rbee_left, rbee_processes, run_rbee, start_queen

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rbee  # noqa: E402
from backends import engine  # noqa: E402


def client(queen):
    return openai.OpenAI(base_url=queen.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def complete(queen, model, max_tokens=8):
    """One short completion; (seconds it took, its text)."""
    started = time.monotonic()
    answer = client(queen).completions.create(model=model, prompt="1, 2, 3,", max_tokens=max_tokens, temperature=0)
    return time.monotonic() - started, answer.choices[0].text


def workers(queen, env):
    result = run_rbee(["ps", "--json", "--queen", queen.url], env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["workers"]


@pytest.fixture
def three_models(model_path, tmp_path):
    """Three models that are the same file under three paths: three workers of about 343 MB."""
    copies = []
    for name in ("second", "third"):
        path = tmp_path / ("%s.gguf" % name)
        shutil.copyfile(model_path, path)
        copies.append("file:%s" % path)
    return ["file:" + model_path] + copies


def test_an_eviction_that_hangs_holds_up_no_request_for_a_warm_model(roles, env, tmp_path, three_models):
    """localhost may give rbee room for two workers. Two models are warm; a third one is asked for
    while the least recently used worker does not answer its shutdown (SIGSTOP): its hive takes
    20 s and more to stop it. Meanwhile the other warm model answers as fast as it did before."""
    first, second, third = three_models
    assert run_rbee(["nodes", "set", "localhost", "--max-ram", "760M"], env).returncode == 0
    queen = start_queen(roles, env)
    complete(queen, first)
    complete(queen, second)
    by_model = {w["model_ref"]: w for w in workers(queen, env)}
    assert sorted(by_model) == sorted([first, second])
    usual = [complete(queen, second)[0] for _ in range(3)]   # the warm model's usual speed, on this machine
    text = complete(queen, second)[1]
    os.kill(by_model[first]["pid"], signal.SIGSTOP)   # the least recently used: it will not answer its shutdown
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        evicting = pool.submit(complete, queen, third)
        queen.wait_event("evict", "queen-rbee", timeout=60)
        during = [complete(queen, second) for _ in range(3)]
        assert not evicting.done(), "the eviction ended before the warm requests: nothing was measured"
        # the bound, measured: three times the slowest of the usual requests, and half a second for a busy machine
        bound = 3 * max(usual) + 0.5
        assert max(seconds for seconds, _ in during) <= bound, (usual, during)
        assert all(answer == text for _, answer in during)
        seconds, _ = evicting.result(timeout=120)
    assert seconds > 15, "the stopped worker was stopped at once: the eviction did not hang"
    assert sorted(w["model_ref"] for w in workers(queen, env)) == sorted([second, third])
    assert by_model[first]["pid"] not in [pid for pid, _ in rbee_processes(str(tmp_path))]
    queen.proc.send_signal(signal.SIGTERM)
    assert queen.proc.wait(40) == 0
    assert_no_rbee_left(str(tmp_path), within=5)


def test_one_client_asking_one_question_after_another_gets_one_worker(roles, env, tmp_path, model_path):
    """A request that ended is no load: twelve short questions in a row, each after the last
    answer, never look like a busy worker: each goes to the warm worker, none is placed again as
    if its slots were taken ("it queues", or a replica where there is room for one)."""
    queen = start_queen(roles, env, "--max-replicas", "4")
    model = "file:" + model_path
    answers = {complete(queen, model, max_tokens=1)[1] for _ in range(12)}
    assert len(answers) == 1
    listed = workers(queen, env)
    assert len(listed) == 1 and listed[0]["model_ref"] == model, listed
    assert len([pid for pid, cmd in rbee_processes(str(tmp_path)) if " worker " in cmd]) == 1
    # one placement, the first: every later question went to the warm worker without a survey
    placements = [e for e in queen.events if e.get("action") == "placement"]
    assert [e["decision"] for e in placements] == ["spawn"], placements
    queen.proc.send_signal(signal.SIGTERM)
    assert queen.proc.wait(40) == 0
    assert_no_rbee_left(str(tmp_path), within=5)


def test_the_engines_event_kinds_are_the_protocols():
    assert (engine.ADMITTED, engine.TOKEN, engine.END, engine.ERROR, engine.LOGPROBS) == (
        rbee.ENGINE_ADMITTED, rbee.ENGINE_TOKEN, rbee.ENGINE_END, rbee.ENGINE_ERROR, rbee.ENGINE_LOGPROBS)
