"""Kill cases: each of keeper, queen, hive and worker killed (SIGKILL) while a model downloads,
while it loads and while it generates, in the seed's ephemeral mode on node localhost. Whatever
dies, the user reads the true cause (never INTERNAL, never a traceback), nothing of rbee is
left behind, and the catalog is intact (a row only for a whole, verified file)."""
import json
import os
import signal
import sqlite3

import pytest

from conftest import assert_no_rbee_left, json_events, rbee_processes, start_keeper
from fakehub import FakeHub

REPO_ID = "rbee-test/SmolLM2-135M-Instruct-GGUF"
GGUF = "smollm2-135m-instruct.Q4_K_M.gguf"
PHASES = {"download": "download_progress", "load": "model_load", "generation": None}
# what the keeper says when a hop dies; a killed keeper says nothing
EXPECTED = {"queen": {"WORKER_CRASHED", "REQUEST_CANCELLED"},
            "hive": {"WORKER_CRASHED", "REQUEST_CANCELLED"},
            "worker": {"WORKER_CRASHED"}}


@pytest.fixture(scope="module")
def hub(model_path):
    with FakeHub() as hub:
        hub.add_file(REPO_ID, GGUF, path=model_path)
        hub.throttle(REPO_ID, GGUF, 24 << 20)   # about 4 s for the model: time to kill during it
        yield hub


def role_pid(marker, role):
    found = [pid for pid, cmd in rbee_processes(marker) if " %s " % role in cmd and "rbee.py" in cmd]
    assert len(found) == 1, (role, rbee_processes(marker))
    return found[0]


def read_until(keeper, phase):
    """The keeper's --json events until the phase is under way (its narration, or 3 tokens)."""
    events = []
    while True:
        line = keeper.stdout.readline()
        assert line, "the keeper ended before %s: %s" % (phase, keeper.stderr.read().decode())
        event = json.loads(line)
        events.append(event)
        if PHASES[phase] and event.get("action") == PHASES[phase]:
            return events
        if not PHASES[phase] and sum(e["event"] == "token" for e in events) >= 3:
            return events


# 11 cases: a worker exists only once the download is done
KILLS = [(victim, phase) for victim in ("keeper", "queen", "hive", "worker") for phase in PHASES
         if (victim, phase) != ("worker", "download")]


@pytest.mark.parametrize("victim, phase", KILLS)
def test_a_kill_leaves_nothing_and_says_what_died(env, hub, tmp_path, rbee_home, victim, phase):
    env = dict(env, HF_ENDPOINT=hub.url)
    keeper = start_keeper(["infer", "--node", "localhost", "--model", "hf:" + REPO_ID, "--prompt",
                           "write a long story", "--max-tokens", "1500", "--temperature", "0", "--json"], env)
    seen = read_until(keeper, phase)
    marker = str(tmp_path)
    pid = keeper.pid if victim == "keeper" else role_pid(marker, victim)
    os.kill(pid, signal.SIGKILL)
    out, err = keeper.communicate(timeout=90)
    err = err.decode()
    if victim != "keeper":
        events = seen + json_events(out.decode())
        errors = [e["error"] for e in events if e["event"] == "error"]
        assert keeper.returncode == 1 and len(errors) == 1, (keeper.returncode, err)
        assert errors[0]["code"] in EXPECTED[victim], errors[0]
        if victim in ("queen", "hive") and phase != "generation":   # the hop that died, by name
            hop = {"queen": "queen-rbee", "hive": "rbee-hive"}[victim]
            assert errors[0]["code"] == "WORKER_CRASHED" and errors[0]["details"]["hop"] == hop, errors[0]
            assert errors[0]["message"].startswith(hop) and "localhost" * (victim == "hive") in errors[0]["message"]
        assert "INTERNAL" not in err and "bug in rbee" not in err and "Traceback" not in err, err
        assert "code: %s" % errors[0]["code"] in err and "Suggestion: " in err, err
    assert_no_rbee_left(marker, within=10)
    # the catalog: intact, and a row only for the whole verified file
    db_path = rbee_home / "models.db"
    if db_path.exists():
        db = sqlite3.connect(str(db_path))
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = db.execute("SELECT local_path, size_bytes, sha256 FROM models").fetchall()
        db.close()
        for local_path, size, sha in rows:
            assert os.path.getsize(local_path) == size and sha == hub.sha256(REPO_ID, GGUF)
        if phase == "download":
            assert rows == [], rows

