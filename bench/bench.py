"""make bench: rbee against raw llama-cpp-python and llama-cpp-python's own server, in ONE run.

Same model (SmolLM2-135M Q4_1), prompt, n_ctx, threads, flash attention (on, llama.cpp's own
default, which rbee's worker keeps), temperature 0, seed and 128 tokens for every scenario; 7
runs each; median, min and max. These machines are noisy, so every run of a scenario is paired
with a raw run made just before it, and each ratio compares the two. Writes a table to stdout
and bench/results.json.

Scenarios: raw (in-process), worker (/execute over HTTP), warm (`rbee.py infer` against a
persistent queen whose worker is up: the whole command), cold_local (nothing running, node
localhost), cold_ssh (the same over real ssh to a simulated air-gapped host: a network namespace
whose own hostname does not resolve and whose nameserver never answers, where any DNS lookup on
a start-up path would cost 10 s; a private sshd on loopback where namespaces are unavailable),
peer (`python -m llama_cpp.server`, streamed /v1/completions), footprint (resident memory of the
queen, the hive, and the worker minus a process holding just the raw model). Beside them, each with
its own runs: api, concurrency, tools, embeddings and agent (multi-turn sessions on a shared system
prompt against llama-server's prompt caches, BENCH_AGENT_RUNS runs of about 10 minutes each here).
"""
import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "scripts")]

import backends  # noqa: E402
import fetch_model  # noqa: E402

PY, RBEE = sys.executable, str(REPO / "rbee.py")
PROMPT = "Once upon a time, in a small village by the sea, there lived"
N_CTX, TOKENS, SEED, RUNS = 2048, 128, 42, int(os.environ.get("BENCH_RUNS", "7"))
# BENCH_ONLY=cold_local,warm: those scenarios alone (with the raw runs paired with them), for a quick
# before/after of one figure; the default is every scenario
ONLY = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))


def wanted(scenario):
    return not ONLY or scenario in ONLY
THREADS = backends.physical_cores()


def stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def rss_mb(pid, field="VmRSS"):
    """A process's resident memory now (VmHWM: at its peak) in MB."""
    with open("/proc/%d/status" % pid) as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("nothing listens on %d" % port)


def rate(times):
    """Decode tokens/s from token arrival times (first token excluded: it pays the prompt)."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None


# -- raw: llama-cpp-python in-process, in a child so its memory can be read -----------------------

def raw_child(model):
    """The raw baseline's process: loads the model, then does one run per line on stdin."""
    started = time.perf_counter()
    llm = backends.get("cpu").load(model, 0, N_CTX, flash_attn=True)   # (as the worker's context has it)
    print(json.dumps({"load_s": time.perf_counter() - started}), flush=True)
    for _ in sys.stdin:
        llm.reset()
        t0 = time.perf_counter()
        times = []
        for chunk in llm.create_completion(PROMPT, max_tokens=TOKENS, temperature=0, seed=SEED, stream=True):
            if chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
        print(json.dumps({"ttft_ms": (times[0] - t0) * 1000, "tok_s": rate(times), "wall_s": times[-1] - t0,
                          "tokens": len(times), "rss_mb": rss_mb(os.getpid())}), flush=True)


class RawBaseline:
    """llama-cpp-python in-process, in a child that stays loaded: one raw run right before each
    run of every other scenario, so that each ratio compares runs made moments apart."""

    def __init__(self, model, env):
        self.proc = subprocess.Popen([PY, __file__, "--raw-child", model], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.load_s = json.loads(self.proc.stdout.readline())["load_s"]
        self.runs = []
        self.run()   # warm-up

    def run(self):
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        result = json.loads(self.proc.stdout.readline())
        self.runs.append(result)
        return result

    def paired(self, *scenarios, warmup=1):
        """Run raw, then each scenario in turn, RUNS times (after `warmup` unrecorded rounds);
        returns the raw runs and each scenario's runs."""
        raws, runs = [], [[] for _ in scenarios]
        for i in range(warmup + RUNS):
            raw = self.run()
            order = list(range(len(scenarios)))
            order = order[i % len(order):] + order[:i % len(order)]   # none always goes first
            results = [None] * len(scenarios)
            for k in order:
                results[k] = scenarios[k]()
            if i >= warmup:
                raws.append(raw)
                for kept, result in zip(runs, results):
                    kept.append(result)
        return raws, runs

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


# -- clients --------------------------------------------------------------------------------------

RBEE_TOKEN = re.compile(rb"event: token\n")
PEER_TOKEN = re.compile(rb'"text": ?"[^"]')   # a non-empty text in an OpenAI completion chunk


def sse_tokens(port, path, body, headers=None, marker=RBEE_TOKEN):
    """POST and read the streamed answer straight off the socket (the same thin client for rbee
    and the peer: no HTTP library's parsing in the figures); returns ttft, tok/s, wall, tokens
    from the arrival time of each token's bytes."""
    data = json.dumps(body).encode()
    head = "POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\n" \
           "Content-Length: %d\r\n%s\r\n" % (path, len(data),
                                              "".join("%s: %s\r\n" % h for h in (headers or {}).items()))
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(head.encode() + data)
        buf, pos, times = b"", 0, []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            now = time.perf_counter()
            buf += chunk
            for match in marker.finditer(buf, pos):   # from the last token on: a split one is found later
                times.append(now)
                pos = match.end()
    return {"ttft_ms": (times[0] - t0) * 1000, "tok_s": rate(times), "wall_s": times[-1] - t0, "tokens": len(times)}


def whole_command(args, env):
    """A CLI run (with --json: one line per event): time from the process start to the first
    token on its stdout, and the token rate from the token lines' arrival."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([PY, RBEE] + args + ["--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env, bufsize=0)
    times, pending = [], b""
    while True:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        now = time.perf_counter()
        pending += chunk
        *lines, pending = pending.split(b"\n")
        times += [now for line in lines if line.startswith(b'{"event": "token"')]
    code = proc.wait()
    wall = time.perf_counter() - t0
    if code != 0 or not times:
        raise RuntimeError("rbee.py %s exited %s" % (" ".join(args[:3]), code))
    return {"ttft_ms": (times[0] - t0) * 1000, "tok_s": rate(times), "wall_s": wall, "tokens": len(times)}


def summarize(runs, raw_runs=None):
    """Median, min and max of each figure; with the raw runs paired with these, the ratios of the
    medians and the time to first token over raw."""
    out = {k: stats([r.get(k) for r in runs]) for k in ("ttft_ms", "tok_s", "wall_s")}
    out["tokens"] = stats([r.get("tokens") for r in runs])
    if raw_runs:
        raw = {k: stats([r.get(k) for r in raw_runs]) for k in ("ttft_ms", "tok_s", "wall_s")}
        out["paired_raw"] = raw
        out["ratio_to_raw"] = {k: round(out[k]["median"] / raw[k]["median"], 3)
                               for k in ("ttft_ms", "tok_s", "wall_s") if out.get(k) and raw.get(k)}
        out["ttft_over_raw_ms"] = round(out["ttft_ms"]["median"] - raw["ttft_ms"]["median"], 1)
    return out


def role(args, env):
    """`rbee.py ROLE ...` once it serves: its ready control line (PROTOCOL.md §1) came."""
    proc = subprocess.Popen([PY, "-u", RBEE] + args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    for line in iter(proc.stdout.readline, b""):
        if line.startswith(b"{") and json.loads(line).get("control") == "ready":
            return proc
    raise RuntimeError("rbee.py %s did not start" % args[0])


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main():
    model = fetch_model.fetch()
    tmp = Path(tempfile.mkdtemp(prefix="rbee-bench-"))
    env = dict(os.environ, RBEE_HOME=str(tmp / "home"), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.pop("RBEE_QUEEN_URL", None)
    results = {"config": {"model": os.path.basename(model), "prompt": PROMPT, "n_ctx": N_CTX, "threads": THREADS,
                          "max_tokens": TOKENS, "temperature": 0, "seed": SEED, "runs": RUNS}}
    infer = ["infer", "--model", "file:" + model, "--prompt", PROMPT, "--max-tokens", str(TOKENS),
             "--temperature", "0", "--seed", str(SEED), "--quiet", "--raw"]
    try:
        results["python_startup_ms"] = stats([timed([PY, "-c", "pass"]) for _ in range(10)])
        print("raw ...", file=sys.stderr)
        baseline = RawBaseline(model, env)

        results["footprint"] = {}
        if wanted("worker"):
            worker_and_peer(model, env, baseline, results)
        if wanted("warm"):
            warm_scenario(env, infer, baseline, results)
        if wanted("cold_local"):
            print("cold_local ...", file=sys.stderr)
            raws, (cold_runs,) = baseline.paired(lambda: whole_command(infer + ["--node", "localhost"], env),
                                                 warmup=0)
            results["cold_local"] = summarize(cold_runs, raws)
        if wanted("cold_ssh"):
            print("cold_ssh, and the lan and ssh transports ...", file=sys.stderr)
            results.update(over_ssh(tmp, env, infer, baseline))
        if wanted("split"):
            print("split ...", file=sys.stderr)
            results["split"] = split_scenario(tmp, env, model, baseline)
        if wanted("api"):
            print("api ...", file=sys.stderr)
            results["api"] = api_scenario(model, env, baseline)
        if wanted("concurrency"):
            results["concurrency"] = concurrency(model, env)
        if wanted("tools"):
            print("tools ...", file=sys.stderr)
            results["tools"] = tools_scenario(model, env)
        if wanted("embeddings"):
            print("embeddings ...", file=sys.stderr)
            results["embeddings"] = embeddings_scenario(model, env)
        if wanted("agent"):
            results["agent"] = agent_scenario(model, env)
        results["raw"] = summarize(baseline.runs[1:])
        results["raw"]["load_s"] = round(baseline.load_s, 3)
        baseline.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = REPO / "bench" / "results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print("\nwritten: %s" % out)


def worker_and_peer(model, env, baseline, results):
    """The worker's /execute over HTTP and llama_cpp.server, paired with raw runs."""
    print("worker and peer ...", file=sys.stderr)
    port = free_port()
    worker = role(["worker", "--model", model, "--backend", "cpu", "--device", "0", "--port", str(port),
                   "--host", "127.0.0.1"], dict(env, RBEE_WORKER_API_KEY="bench"))
    body = {"prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "seed": SEED, "raw": True}
    with peer_server(model, env) as (peer_port, _):
        peer_body = {"prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "seed": SEED, "stream": True}
        raws, (worker_runs, peer_runs) = baseline.paired(
            lambda: sse_tokens(port, "/execute", body, {"Authorization": "Bearer bench"}),
            lambda: sse_tokens(peer_port, "/v1/completions", peer_body, marker=PEER_TOKEN))
    results["worker"], results["peer"] = summarize(worker_runs, raws), summarize(peer_runs, raws)
    results["footprint"]["worker_overhead_mb"] = round(rss_mb(worker.pid) - baseline.runs[-1]["rss_mb"], 1)
    stop(worker)


def warm_scenario(env, infer, baseline, results):
    """`rbee.py infer` against a persistent queen whose worker is up: the whole command."""
    print("warm ...", file=sys.stderr)
    qport = free_port()
    queen = role(["queen", "--port", str(qport)], env)
    warm_args = infer + ["--node", "localhost", "--queen", "http://127.0.0.1:%d" % qport]
    raws, (warm_runs,) = baseline.paired(lambda: whole_command(warm_args, env))
    results["warm"] = summarize(warm_runs, raws)
    hive_pid = next(int(p) for p in os.listdir("/proc") if p.isdigit() and _cmd(p).find("rbee.py hive") >= 0)
    results["footprint"].update(queen_rss_mb=round(rss_mb(queen.pid), 1), hive_rss_mb=round(rss_mb(hive_pid), 1))
    stop(queen)


def _cmd(pid):
    try:
        with open("/proc/%s/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def timed(argv):
    t0 = time.perf_counter()
    subprocess.run(argv, check=True)
    return (time.perf_counter() - t0) * 1000


def over_ssh(tmp, env, infer, baseline):
    """The cold command over real ssh, to an air-gapped simulated host where one can be made; then
    the same host as two nodes, `airgap` (--transport lan) and `airgap-ssh` (--transport ssh:
    every byte through the ssh connection), cold and warm, paired, for the per-token cost of ssh."""
    from hosts import LoopbackSshd, NetnsHosts, SshKeys, netns_available, write_ssh_config
    if not shutil.which("ssh") or not os.path.exists("/usr/sbin/sshd"):
        return {"cold_ssh": {"skipped": "no OpenSSH here (make sysdeps installs it)"}}
    keys = SshKeys(tmp / "keys")
    if netns_available():
        host = NetnsHosts(tmp / "net", keys, names=("airgap",), subnet="10.210.0", bridge="rbeebrbench",
                          ns_prefix="bench-", unresolvable=("airgap",)).start()
        entry, where = (host.hosts["airgap"].name, host.hosts["airgap"].address, 22, "root"), "airgap"
    else:
        host = LoopbackSshd(tmp / "sshd", keys).start()
        entry, where = ("airgap", host.host, host.port, host.user), "loopback sshd"
    results = {}
    try:
        config = write_ssh_config(tmp / "ssh_config", [entry], keys)
        ssh_env = dict(env, RBEE_SSH_CONFIG=config)
        for node, transport in (("airgap", "lan"), ("airgap-ssh", "ssh")):
            add = subprocess.run([PY, RBEE, "nodes", "add", node, "--ssh-host", "airgap", "--rbee-dir", str(REPO),
                                  "--python", PY, "--transport", transport, "--env",
                                  "RBEE_HOME=%s" % (tmp / "remote-home")], env=ssh_env, capture_output=True, text=True)
            if add.returncode:
                raise RuntimeError("nodes add failed: %s" % add.stderr)
        raws, (lan, ssh) = baseline.paired(lambda: whole_command(infer + ["--node", "airgap"], ssh_env),
                                           lambda: whole_command(infer + ["--node", "airgap-ssh"], ssh_env), warmup=0)
        results["cold_ssh"] = dict(summarize(lan, raws), host=where)
        results["cold_ssh_transport"] = dict(summarize(ssh, raws), host=where)
        qport = free_port()
        queen = role(["queen", "--port", str(qport)], ssh_env)
        try:
            warm = infer + ["--queen", "http://127.0.0.1:%d" % qport, "--node"]
            raws, (lan, ssh) = baseline.paired(lambda: whole_command(warm + ["airgap"], ssh_env),
                                               lambda: whole_command(warm + ["airgap-ssh"], ssh_env))
            results["warm_lan"] = dict(summarize(lan, raws), host=where)
            results["warm_ssh_transport"] = dict(summarize(ssh, raws), host=where)
            results["warm_ssh_transport"]["tok_s_vs_lan"] = round(
                results["warm_ssh_transport"]["tok_s"]["median"] / results["warm_lan"]["tok_s"]["median"], 3)
        finally:
            stop(queen)
        return results
    finally:
        host.stop()


def split_scenario(tmp, env, model, baseline):
    """One model over two simulated hosts (llama.cpp's RPC backend) against the same model on one
    of them: the loads first (one node alone, then the split's first load and, after it ended, its
    second, which the part's tensor cache serves: the time, and the bytes the part's host took in,
    from its veth's counter), for the test model and tests/widemodel.py's (weights over ggml's
    10 MiB hash threshold, which SmolLM2's are not); then warm `infer` commands through one
    persistent queen, paired: mac alone, the split over the LAN transport and the same split over
    the ssh transport (nodes mac-ssh, workstation-ssh on the same hosts: the RPC traffic through
    the nodes' ssh connections); and the network's own round trip between the two hosts."""
    from fakehub import FakeHub
    from hosts import NetnsHosts, SshKeys, netns_available, write_ssh_config
    import widemodel
    if not netns_available() or not shutil.which("ssh"):
        return {"skipped": "needs network namespaces (root) and OpenSSH"}
    keys = SshKeys(tmp / "split-keys")
    net = NetnsHosts(tmp / "split-net", keys, names=("mac", "workstation"), subnet="10.211.0", bridge="rbeebrsplit",
                     ns_prefix="bench2-").start()
    hub = FakeHub(host=net.gateway, port=0).start()   # hf: copies, which only the primary downloads
    try:
        config = write_ssh_config(tmp / "split_ssh_config", [(h.name, h.address, 22, "root")
                                                             for h in net.hosts.values()], keys)
        ssh_env = dict(env, RBEE_SSH_CONFIG=config)
        for name, host, cap, transport in (("mac", "mac", "2G", "lan"), ("workstation", "workstation", "1G", "lan"),
                                           ("mac-ssh", "mac", "2G", "ssh"),
                                           ("workstation-ssh", "workstation", "1G", "ssh")):
            add = subprocess.run([PY, RBEE, "nodes", "add", name, "--ssh-host", host, "--rbee-dir", str(REPO),
                                  "--python", PY, "--max-ram", cap, "--transport", transport, "--env",
                                  "RBEE_HOME=%s" % (tmp / (name + "-home")), "HF_HOME=%s" % (tmp / (name + "-hf")),
                                  "HF_ENDPOINT=" + hub.url, "HF_HUB_OFFLINE=0"], env=ssh_env, capture_output=True,
                                 text=True)
            if add.returncode:
                raise RuntimeError("nodes add failed: %s" % add.stderr)
        probe = ("import socket, statistics, time\nt = []\nfor _ in range(20):\n    s = time.perf_counter()\n"
                 "    socket.create_connection((%r, 22), timeout=2).close()\n    t.append(time.perf_counter() - s)\n"
                 "print(statistics.median(t) * 1000)" % net.hosts["workstation"].address)
        rtt = subprocess.run(["ip", "netns", "exec", net.hosts["mac"].netns, PY, "-c", probe], capture_output=True,
                             text=True)   # a TCP connect: one round trip from mac to workstation
        wide = widemodel.cached(model)
        hub.add_file("rbee-bench/smollm2-GGUF", os.path.basename(model), path=model)
        hub.add_file("rbee-bench/wide-GGUF", "rbee-wide.gguf", path=wide)
        qport = free_port()
        queen = role(["queen", "--port", str(qport)], ssh_env)
        try:
            queen_url = "http://127.0.0.1:%d" % qport
            loads = {name: split_loads(net, ssh_env, queen_url, "hf:rbee-bench/%s-GGUF" % name)
                     for name in ("smollm2", "wide")}
            warm = ["infer", "--model", "file:" + model, "--prompt", PROMPT, "--max-tokens", str(TOKENS),
                    "--temperature", "0", "--seed", str(SEED), "--quiet", "--raw", "--queen", queen_url]
            raws, (one, split, tunnelled) = baseline.paired(
                lambda: whole_command(warm + ["--node", "mac"], ssh_env),
                lambda: whole_command(warm + ["--split", "mac,workstation"], ssh_env),
                lambda: whole_command(warm + ["--split", "mac-ssh,workstation-ssh"], ssh_env))
        finally:
            stop(queen)
        one, split, tunnelled = summarize(one, raws), summarize(split, raws), summarize(tunnelled, raws)
        return {"one_node": one, "split_two_nodes": split, "split_ssh_transport": tunnelled, "loads": loads,
                "rtt_ms": round(float(rtt.stdout), 3) if rtt.returncode == 0 else None,
                "tok_s_ratio": round(split["tok_s"]["median"] / one["tok_s"]["median"], 3),
                "ttft_diff_ms": round(split["ttft_ms"]["median"] - one["ttft_ms"]["median"], 1),
                "ssh_tok_s_vs_lan": round(tunnelled["tok_s"]["median"] / split["tok_s"]["median"], 3),
                "ssh_ttft_diff_ms": round(tunnelled["ttft_ms"]["median"] - split["ttft_ms"]["median"], 1)}
    finally:
        hub.stop()
        net.stop()


def split_loads(net, env, queen_url, model, runs=3):
    """`model` (hf:, downloaded by mac alone before anything is measured) loaded on mac alone
    (`runs` times), then split over mac and workstation: its first load (once: it fills
    workstation's empty cache) and its second (`runs` times). Each: the worker's load time, and
    the bytes workstation's host took in from the start of the command until nothing of it runs
    (keep-alive 0)."""
    def load(*where):
        before = net.bytes_into("workstation")
        out = subprocess.run([PY, RBEE, "infer", "--model", model, "--prompt", PROMPT, "--max-tokens",
                              "8", "--temperature", "0", "--keep-alive", "0", "--json", "--queen", queen_url]
                             + list(where), env=env, capture_output=True, text=True, timeout=600)
        events = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        worker = next((e for e in events if e.get("event") == "worker"), None)
        if out.returncode or worker is None:
            raise RuntimeError("infer %s failed: %s" % (" ".join(where), out.stderr[-400:]))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(
                role_running(pid) for host in ("mac", "workstation") for pid in net.pids(host)):
            time.sleep(0.2)
        return {"load_ms": worker.get("timings", {}).get("load_ms"), "bytes_to_part": net.bytes_into("workstation")
                - before,
                "text": "".join(e["t"] for e in events if e.get("event") == "token")}

    load("--node", "mac")   # (the download)
    alone = [load("--node", "mac") for _ in range(runs)]
    first = load("--split", "mac,workstation")
    second = [load("--split", "mac,workstation") for _ in range(runs)]
    return {"alone_load_ms": stats([r["load_ms"] for r in alone]),
            "first_load_ms": first["load_ms"], "first_bytes_to_part": first["bytes_to_part"],
            "second_load_ms": stats([r["load_ms"] for r in second]),
            "second_bytes_to_part": stats([r["bytes_to_part"] for r in second]),
            "same_text": all(r["text"] == first["text"] for r in second) and first["text"] == alone[0]["text"]}


def role_running(pid):
    """Whether `pid` is an rbee worker or RPC server."""
    argv = _cmd(pid).split()
    return any(a.endswith("rbee.py") for a in argv) and ("worker" in argv or "rpc" in argv)


# -- many clients at once: rbee's slots against llama.cpp's own server and llama-cpp-python's -----

CLIENTS = (1, 4, 8)
CONC_RUNS = int(os.environ.get("BENCH_CONC_RUNS", "5"))
DISTINCT = ["Once upon a time, in a small village by the sea, there lived", "The three laws of robotics are",
            "In the year 2300, the first colony on Mars", "My grandmother's secret recipe for apple pie",
            "The history of the printing press begins", "Dear diary, today something strange happened",
            "The best way to learn a new language is", "Deep in the forest, an old wizard kept"]


def openai_stream(base_url, model):
    """The `openai` package streaming one chat completion (the same client and settings for rbee's
    queen and the peer): time to the first content, token rate from the chunks' arrival."""
    import openai
    client = openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0)
    t0, times = time.perf_counter(), []
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=TOKENS, temperature=0, seed=SEED, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
    return {"ttft_ms": (times[0] - t0) * 1000, "tok_s": rate(times), "wall_s": times[-1] - t0, "tokens": len(times)}


def api_scenario(model, env, baseline):
    """The queen in the token path: the `openai` package against rbee's queen (its worker warm)
    and against llama_cpp.server's OpenAI endpoint, runs alternated and paired with raw runs."""
    qport = free_port()
    queen = role(["queen", "--port", str(qport)], env)
    try:
        with peer_server(model, env) as (peer_port, _):
            raws, (rbee_runs, peer_runs) = baseline.paired(
                lambda: openai_stream("http://127.0.0.1:%d/v1" % qport, "file:" + model),
                lambda: openai_stream("http://127.0.0.1:%d/v1" % peer_port, model))
    finally:
        stop(queen)
    rbee, peer = summarize(rbee_runs, raws), summarize(peer_runs, raws)
    return {"rbee_queen": rbee, "llama_cpp_server": peer,
            "tok_s_ratio": round(rbee["tok_s"]["median"] / peer["tok_s"]["median"], 3),
            "ttft_diff_ms": round(rbee["ttft_ms"]["median"] - peer["ttft_ms"]["median"], 1)}


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather forecast of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Rome"]},
                                                    "days": {"type": "integer"}}, "required": ["city", "days"]}}}
TOOL_ASK = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]


def tool_round_trip(base_url, model, as_schema=False):
    """The `openai` package asking for get_weather's arguments, streamed: as a required tool call
    (tool_choice "required": a grammar, where the server makes one), or (`as_schema`) as a
    json_schema answer of the same schema, which every grammar-capable server constrains. Time to
    the first piece, to the whole parsed object, the rate of the pieces after the first, and
    whether a valid object came at all."""
    import openai
    client = openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0)
    schema = WEATHER_TOOL["function"]["parameters"]
    ask = dict(response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}}
               ) if as_schema else dict(tools=[WEATHER_TOOL], tool_choice="required")
    t0, times, text = time.perf_counter(), [], ""
    for chunk in client.chat.completions.create(model=model, messages=TOOL_ASK, temperature=0, max_tokens=TOKENS,
                                                stream=True, **ask):
        delta = chunk.choices[0].delta if chunk.choices else None
        pieces = [delta.content] if as_schema and delta and delta.content else [
            c.function.arguments or "" for c in (delta.tool_calls or ())] if delta else []
        for piece in pieces:
            times.append(time.perf_counter())
            text += piece
    try:
        value = json.loads(text)
        valid = value.get("city") in ("Paris", "London", "Rome") and isinstance(value.get("days"), int)
    except (ValueError, AttributeError):
        valid = False
    return {"valid": valid, "ttft_ms": (times[0] - t0) * 1000 if valid else None,
            "call_ms": (times[-1] - t0) * 1000 if valid else None, "tok_s": rate(times) if valid else None}


def tools_scenario(model, env):
    """A tool call's round trip, request to parsed arguments: rbee's queen (its worker warm)
    against llama.cpp's `llama-server --jinja` on the same model, threads and slots, runs
    alternated; as a required tool call, and as a json_schema answer of the same schema."""
    qport = free_port()
    queen = role(["queen", "--port", str(qport)], env)
    out = {}
    try:
        with llama_server(model, env, ["--jinja", "-np", "4", "-c", str(4 * N_CTX)]) as (port, skipped):
            if port is None:
                return {"skipped": skipped}
            for kind, as_schema in (("tool_call", False), ("json_schema", True)):
                servers = [("rbee_queen", lambda s=as_schema: tool_round_trip(
                                "http://127.0.0.1:%d/v1" % qport, "file:" + model, s)),
                           ("llama_server_jinja", lambda s=as_schema: tool_round_trip(
                               "http://127.0.0.1:%d/v1" % port, model, s))]
                for _, one in servers:   # warm-up: the queen places the model
                    one()
                runs = {name: [] for name, _ in servers}
                for i in range(RUNS):   # one first, then the other first: a drifting machine favours neither
                    for name, one in servers if i % 2 == 0 else servers[::-1]:
                        runs[name].append(one())
                table = {name: dict({k: stats([r[k] for r in done]) for k in ("ttft_ms", "call_ms", "tok_s")},
                                    valid="%d/%d" % (sum(r["valid"] for r in done), len(done)))
                         for name, done in runs.items()}
                rbee, peer = table["rbee_queen"], table["llama_server_jinja"]
                if rbee["call_ms"] and peer["call_ms"]:
                    table["call_ms_ratio"] = round(rbee["call_ms"]["median"] / peer["call_ms"]["median"], 3)
                    table["tok_s_ratio"] = round(rbee["tok_s"]["median"] / peer["tok_s"]["median"], 3)
                out[kind] = table
    finally:
        stop(queen)
    return out


WORDS = ("river stone garden window music paper light winter market silver forest engine harbor planet "
         "letter mountain kitchen thunder bridge candle ocean meadow castle pocket").split()


def embedding_inputs(n=256, words=55):
    """`n` distinct texts of about 60 tokens each, the same in every run."""
    return [" ".join(WORDS[(k * 7 + j * (k % 5 + 1)) % len(WORDS)] for j in range(words)) + " %d." % k
            for k in range(n)]


def embed_over_http(port, model, texts, headers):
    import urllib.request
    body = json.dumps({"model": model, "input": texts, "encoding_format": "float"}).encode()
    request = urllib.request.Request("http://127.0.0.1:%d/v1/embeddings" % port, body,
                                     dict({"Content-Type": "application/json"}, **headers))
    with urllib.request.urlopen(request, timeout=600) as resp:
        data = json.loads(resp.read())["data"]
    assert len(data) == len(texts), len(data)
    return data


def embeddings_scenario(model, env):
    """Embeddings throughput, inputs a second: 256 inputs of about 60 tokens in one request, and
    the same as 8 concurrent requests of 32; rbee's queen (its worker warm) against llama.cpp's
    `llama-server --embeddings --pooling mean` (rbee's pooling of a chat model), the same model
    and threads, runs alternated."""
    texts = embedding_inputs()
    qport = free_port()
    queen = role(["queen", "--port", str(qport)], env)
    try:
        with llama_server(model, env, ["--embeddings", "--pooling", "mean", "-np", "8", "-c", str(8 * N_CTX),
                                       "-b", str(N_CTX), "-ub", str(N_CTX)]) as (port, skipped):
            if port is None:
                return {"skipped": skipped}
            servers = [("rbee_queen", qport, "file:" + model), ("llama_server", port, model)]

            def one_request(port, name):
                t0 = time.perf_counter()
                embed_over_http(port, name, texts, {})
                return len(texts) / (time.perf_counter() - t0)

            def eight_requests(port, name):
                t0 = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(8) as pool:
                    list(pool.map(lambda k: embed_over_http(port, name, texts[k::8], {}), range(8)))
                return len(texts) / (time.perf_counter() - t0)
            for _, port_, name in servers:   # warm-up: the queen places the model
                embed_over_http(port_, name, texts[:8], {})
            runs = {(server, how): [] for server, _, _ in servers for how in ("one_request", "eight_requests")}
            for i in range(RUNS):   # one first, then the other first: a drifting machine favours neither
                for server, port_, name in servers if i % 2 == 0 else servers[::-1]:
                    runs[(server, "one_request")].append(one_request(port_, name))
                    runs[(server, "eight_requests")].append(eight_requests(port_, name))
    finally:
        stop(queen)
    out = {how: {server: stats(runs[(server, how)]) for server, _, _ in servers}
           for how in ("one_request", "eight_requests")}
    for how, table in out.items():
        table["ratio"] = round(table["rbee_queen"]["median"] / table["llama_server"]["median"], 3)
    return out


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def clients_at_once(n, one):
    """`one(k)` for k in 0..n-1 at once (a thread each): aggregate tok/s over the whole wall
    time, p50/p95 of time to first token and of each client's end-to-end latency."""
    results, t0 = [None] * n, time.perf_counter()

    def run(k):
        try:
            results[k] = dict(one(k), end=time.perf_counter())
        except Exception as exc:   # a refused or cut client counts as zero tokens
            results[k] = {"tokens": 0, "error": str(exc), "end": time.perf_counter()}
    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ok = [r for r in results if r.get("tokens")]
    wall = max(r["end"] for r in results) - t0
    ttft = [r["ttft_ms"] for r in ok] or [0]
    e2e = [(r["end"] - t0) * 1000 for r in ok] or [0]
    return {"agg_tok_s": sum(r["tokens"] for r in results) / wall, "tokens": sum(r["tokens"] for r in results),
            "expected_tokens": n * TOKENS, "ttft_p50_ms": percentile(ttft, 0.5), "ttft_p95_ms": percentile(ttft, 0.95),
            "e2e_p50_ms": percentile(e2e, 0.5), "e2e_p95_ms": percentile(e2e, 0.95)}


def concurrency(model, env):
    """The concurrency table: 1, 4 and 8 streaming clients with distinct prompts, 128 tokens each,
    the same model, threads and context per slot, CONC_RUNS runs each (median). Every server is up
    at once (an idle one takes no CPU) and each round runs them one after the other, in a rotated
    order: these machines slow down and speed up for tens of seconds at a time, and runs of one
    server after the other would measure that instead of the servers."""
    servers = [("rbee worker (4 slots, its defaults)", rbee_worker_server, RBEE_TOKEN, "/execute"),
               ("llama-server -np 4", lambda m, e: llama_server(m, e, ["-np", "4", "-c", str(4 * N_CTX)]),
                PEER_TOKEN, "/v1/completions"),
               ("llama-server (its defaults)", lambda m, e: llama_server(m, e, []), PEER_TOKEN, "/v1/completions"),
               ("llama_cpp.server", peer_server, PEER_TOKEN, "/v1/completions")]
    table, clients = {}, {}
    with contextlib.ExitStack() as up:
        for name, server, marker, path in servers:
            print("concurrency: starting %s ..." % name, file=sys.stderr)
            port, headers = up.enter_context(server(model, env))
            if port is None:
                table[name] = {"skipped": headers}
                continue

            def one(k, port=port, headers=headers, marker=marker, path=path):
                body = {"prompt": DISTINCT[k % len(DISTINCT)], "max_tokens": TOKENS, "temperature": 0}
                body.update({"raw": True} if path == "/execute" else {"stream": True})
                return sse_tokens(port, path, body, headers, marker)
            one(0)   # warm-up
            clients[name] = one
        for n in CLIENTS:
            print("concurrency: %d clients ..." % n, file=sys.stderr)
            runs = {name: [] for name in clients}
            order = list(clients)
            for i in range(CONC_RUNS):
                for name in order[i % len(order):] + order[:i % len(order)]:
                    runs[name].append(clients_at_once(n, clients[name]))
            for name, done in runs.items():
                table.setdefault(name, {})[str(n)] = {k: round(statistics.median(r[k] for r in done), 1)
                                                      for k in done[0]}
    base = table.get("llama-server -np 4", {})
    for name, rows in table.items():
        for n, row in rows.items():
            if isinstance(row, dict) and base.get(n):
                row["vs_llama_server_np4"] = {k: round(row[k] / base[n][k], 3) if base[n][k] else None
                                              for k in ("agg_tok_s", "ttft_p95_ms", "e2e_p95_ms")}
    return table


# -- an agent's sessions: multi-turn chats on one long system prompt, rbee against llama-server --------

AGENT_SESSIONS = (4, 8)
AGENT_TURNS, AGENT_ANSWER = 6, 64
AGENT_CTX_A_SESSION = 3072   # a session's whole history (2,804 prompt tokens at its 6th turn, + 64): S x holds all
AGENT_RUNS = int(os.environ.get("BENCH_AGENT_RUNS", "3"))
LONG_PROMPTS = (2000, 4000, 6000, 8000, 12000, 16000)
TOOL_VERBS = "read write list search open close move copy rename delete create update fetch check".split()


class Refused(Exception):
    """A server's answer that is no whole stream: its status or error event and the start of its text."""


def agent_system_prompt(n_tools=23):
    """About 1,500 tokens, the same in every run: an agent's instructions and a catalogue of tools."""
    def tool(k):
        verb, noun, what = TOOL_VERBS[k % len(TOOL_VERBS)], WORDS[k * 5 % len(WORDS)], WORDS[(k * 3 + 1) % len(WORDS)]
        return {"name": "%s_%s" % (verb, noun),
                "description": "%s a %s by its path; the %s comes back as text" % (verb.capitalize(), noun, what),
                "parameters": {"type": "object", "required": ["path"], "properties": {
                    "path": {"type": "string"}, WORDS[(k * 7 + 2) % len(WORDS)]: {"type": "integer"}}}}
    return "You are a coding agent. These are your tools:\n" + "\n".join(json.dumps(tool(k)) for k in range(n_tools))


def agent_user_message(session, turn, words=140):
    """About 150 tokens, distinct for each session and turn, the same in every run."""
    return "Task %d, step %d: " % (session, turn) + " ".join(
        WORDS[(session * 7 + turn * 3 + j * (session % 5 + 1) + j * j * turn) % len(WORDS)] for j in range(words))


def long_text(words):
    return " ".join(WORDS[(j * 7 + j // len(WORDS)) % len(WORDS)] + ("." if j % 12 == 11 else "")
                    for j in range(words))


def post_json(port, path, body, headers):
    import urllib.request
    request = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), json.dumps(body).encode(),
                                     dict({"Content-Type": "application/json"}, **headers))
    with urllib.request.urlopen(request, timeout=120) as resp:
        return json.loads(resp.read())


def sse_events(port, path, body, headers):
    """POST and yield each server-sent event as (arrival time, event name, data); Refused for a
    status other than 200, with the start of the body."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", path, json.dumps(body), dict({"Content-Type": "application/json"}, **headers))
        resp = conn.getresponse()
        if resp.status != 200:
            raise Refused("%d %s" % (resp.status, resp.read().decode(errors="replace")[:200]))
        event, data = "message", []
        for line in resp:   # (http.client undoes a chunked encoding)
            line = line.decode().rstrip("\r\n")
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif not line and data:
                yield time.perf_counter(), event, "\n".join(data)
                event, data = "message", []
    finally:
        conn.close()


def turn_result(t0, first, text, tokens, prompt_tokens, prompt_cached):
    return {"ttft_ms": (first - t0) * 1000 if first else None, "text": text, "tokens": tokens,
            "prompt_tokens": prompt_tokens, "prompt_cached": prompt_cached}


def rbee_turn(port, headers, messages, max_tokens):
    """A chat turn on rbee's worker: POST /execute, its token events, and its end event's counts
    (prompt_cached: the prompt tokens its caches spared it; None from a worker without the field)."""
    t0, first, text, end = time.perf_counter(), None, [], None
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
    for now, event, data in sse_events(port, "/execute", body, headers):
        if event == "token":
            first = first or now
            text.append(json.loads(data)["t"])
        elif event == "end":
            end = json.loads(data)
        elif event == "error":
            raise Refused("event: error %s" % data[:200])
    if end is None:
        raise Refused("the stream ended with no end event")
    return turn_result(t0, first, "".join(text), end["tokens_out"], end["prompt_tokens"], end.get("prompt_cached"))


def llama_turn(port, headers, messages, max_tokens):
    """A chat turn on llama-server: streamed /v1/chat/completions with its prompt cache, and the
    last chunk's timings (prompt_n: the prompt tokens it evaluated, cache_n: those it reused)."""
    t0, first, text, timings = time.perf_counter(), None, [], None
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True, "cache_prompt": True}
    for now, _, data in sse_events(port, "/v1/chat/completions", body, headers or {}):
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise Refused("error %s" % json.dumps(chunk["error"])[:200])
        for choice in chunk.get("choices") or ():
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                first = first or now
                text.append(piece)
        timings = chunk.get("timings") or timings
    if timings is None:
        raise Refused("the stream ended with no timings")
    return turn_result(t0, first, "".join(text), timings["predicted_n"], timings["prompt_n"] + timings["cache_n"],
                       timings["cache_n"])


def agent_sessions(turn, n, system):
    """`n` agents at once (a thread each), each one's turns in sequence, its history growing by its
    answer and the next user message: time to first token over every turn and by turn, aggregate
    tokens a second over the wall time, and the prompt tokens evaluated against those each turn added."""
    sessions, t0 = [None] * n, time.perf_counter()

    def run(k):
        messages, done = [{"role": "system", "content": system}], []
        try:
            for t in range(1, AGENT_TURNS + 1):
                messages.append({"role": "user", "content": agent_user_message(k, t)})
                answer = turn(messages, AGENT_ANSWER)
                messages.append({"role": "assistant", "content": answer.pop("text")})
                done.append(answer)
        except Exception as exc:   # the session stops at its first refused or broken turn
            done.append({"error": str(exc)[:200]})
        sessions[k] = done
    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    errors = [r["error"] for done in sessions for r in done if "error" in r]
    sessions = [[r for r in done if "error" not in r] for done in sessions]
    turns = [r for done in sessions for r in done]
    by_turn = [[done[t]["ttft_ms"] for done in sessions if len(done) > t and done[t]["ttft_ms"] is not None]
               for t in range(AGENT_TURNS)]
    ttft = [ms for at_turn in by_turn for ms in at_turn]
    later = [r for done in sessions for r in done[1:]]
    cached = [r["prompt_tokens"] - r["prompt_cached"] for r in later if r["prompt_cached"] is not None]
    added = [now["prompt_tokens"] - before["prompt_tokens"] for done in sessions for before, now in zip(done, done[1:])]
    mean = lambda values: statistics.mean(values) if values else None
    return {"ttft_p50_ms": percentile(ttft, 0.5) if ttft else None,
            "ttft_p95_ms": percentile(ttft, 0.95) if ttft else None,
            "ttft_p50_ms_by_turn": [percentile(ms, 0.5) if ms else None for ms in by_turn],
            "agg_tok_s": sum(r["tokens"] for r in turns) / wall, "tokens": sum(r["tokens"] for r in turns),
            "turns": len(turns), "first_prompt_tokens": mean([done[0]["prompt_tokens"] for done in sessions if done]),
            "last_prompt_tokens": max([r["prompt_tokens"] for r in turns], default=None),
            "evaluated_a_later_turn": mean(cached), "added_a_later_turn": mean(added),
            "errors": len(errors), "first_error": errors[0] if errors else None}


def agent_scenario(model, env):
    """An agent's workload: S sessions at once (4, then 8), 6 turns each on one shared system prompt
    of about 1,500 tokens, each turn adding a user message of about 150 tokens (and the last answer)
    and asking for 64 tokens; rbee's worker against llama.cpp's llama-server with its prompt caches
    (unified KV, --cache-reuse, the host-memory prompt cache), the same model, threads, S slots and
    S x 3072 tokens of context in all. A fresh server for every run (what a cache kept from the
    last run would give is not the workload's), the servers alternated. Then the longest prompt
    each answers with its defaults."""
    if not os.path.exists(llama_server_binary()):
        return {"skipped": "no llama-server at %s (make bench builds it)" % llama_server_binary()}
    help_text = subprocess.run([llama_server_binary(), "--help"], capture_output=True, text=True).stdout
    host_cache = ["--cache-ram", "8192"] if "--cache-ram" in help_text else []   # (this build's default too)
    system = agent_system_prompt()
    servers = [("rbee_worker", rbee_turn, lambda n: rbee_worker_process(
                    model, env, ["--parallel", str(n), "--ctx-size", str(n * AGENT_CTX_A_SESSION)])),
               ("llama_server", llama_turn, lambda n: llama_server_process(
                   model, env, ["--jinja", "-np", str(n), "-c", str(n * AGENT_CTX_A_SESSION), "--kv-unified",
                                "--cache-reuse", "256"] + host_cache))]
    runs = {(name, n): [] for name, _, _ in servers for n in AGENT_SESSIONS}
    for i in range(AGENT_RUNS):
        for n in AGENT_SESSIONS:
            for name, turn, start in servers if i % 2 == 0 else servers[::-1]:   # neither always goes first
                print("agent: %s, %d sessions, run %d ..." % (name, n, i + 1), file=sys.stderr)
                with start(n) as (port, headers, proc):
                    turn(port, headers, [{"role": "user", "content": "Hello"}], 1)   # warm-up, sharing nothing
                    result = agent_sessions(lambda messages, tokens: turn(port, headers, messages, tokens), n, system)
                    result["peak_rss_mb"] = rss_mb(proc.pid, "VmHWM")
                runs[(name, n)].append(result)
    out = {"config": {"sessions": list(AGENT_SESSIONS), "turns": AGENT_TURNS, "max_tokens": AGENT_ANSWER,
                      "ctx_a_session": AGENT_CTX_A_SESSION, "runs": AGENT_RUNS, "threads": THREADS,
                      "llama_server_options": "--jinja -np S -c S*%d --kv-unified --cache-reuse 256 %s" % (
                          AGENT_CTX_A_SESSION, " ".join(host_cache))}}
    for (name, n), done in runs.items():
        row = {k: stats([r[k] for r in done]) for k in done[0] if k not in ("first_error", "ttft_p50_ms_by_turn")}
        row["ttft_p50_ms_by_turn"] = [stats([r["ttft_p50_ms_by_turn"][t] for r in done]) for t in range(AGENT_TURNS)]
        row["first_error"] = next((r["first_error"] for r in done if r["first_error"]), None)
        out.setdefault(name, {})[str(n)] = row
    out["longest_prompt"] = longest_prompts(model, env)
    return out


def sized_prompts(port, headers):
    """LONG_PROMPTS as one user message each, sized with rbee's /tokenize (chat template included):
    (target, messages, its tokens)."""
    def measured(words):
        messages = [{"role": "user", "content": long_text(words)}]
        return messages, post_json(port, "/tokenize", {"messages": messages}, headers)["tokens"]
    _, sample = measured(1000)
    prompts = []
    for target in LONG_PROMPTS:
        words = target * 1000 // sample
        words = words * target // measured(words)[1]   # one correction
        prompts.append((target, *measured(words)))
    return prompts


def longest_prompts(model, env):
    """Each server with no context flags, only 4 slots: which of LONG_PROMPTS it answers (a single
    request for 8 tokens each), and how it refuses the others."""
    servers = [("rbee_worker", rbee_turn, lambda: rbee_worker_process(model, env, ["--parallel", "4"])),
               ("llama_server", llama_turn, lambda: llama_server_process(model, env, ["-np", "4"]))]
    prompts, out = None, {}
    for name, turn, start in servers:
        print("agent: the longest prompt %s answers with its defaults ..." % name, file=sys.stderr)
        tried = []
        with start() as (port, headers, _):
            prompts = prompts or sized_prompts(port, headers)   # (rbee's worker first)
            for target, messages, tokens in prompts:
                try:
                    answer = turn(port, headers, messages, 8)
                    tried.append({"target": target, "prompt_tokens": answer["prompt_tokens"],
                                  "answered": answer["tokens"] > 0})
                except Exception as exc:   # (a refusal, or a stream cut short)
                    tried.append({"target": target, "prompt_tokens": tokens, "answered": False,
                                  "error": str(exc)[:200]})
        answered = [t["prompt_tokens"] for t in tried if t["answered"]]
        out[name] = {"longest_answered": max(answered, default=None), "tried": tried,
                     "first_failure": next((t for t in tried if not t["answered"]), None)}
    return out


@contextlib.contextmanager
def rbee_worker_server(model, env):
    with rbee_worker_process(model, env, ["--ctx-size", str(4 * N_CTX)]) as (port, headers, _):   # (-np 4 -c 4N)
        yield port, headers


@contextlib.contextmanager
def rbee_worker_process(model, env, options):
    """`rbee.py worker` on the model with `options`: its port, the headers its /execute wants, its process."""
    port = free_port()
    worker = role(["worker", "--model", model, "--backend", "cpu", "--device", "0", "--port", str(port),
                   "--host", "127.0.0.1"] + options, dict(env, RBEE_WORKER_API_KEY="bench"))
    try:
        yield port, {"Authorization": "Bearer bench"}, worker
    finally:
        stop(worker)


def llama_server_binary():
    return os.environ.get("LLAMA_SERVER") or str(REPO / ".cache" / "llama.cpp-build" / "bin" / "llama-server")


@contextlib.contextmanager
def llama_server(model, env, options):
    with llama_server_process(model, env, options) as (port, skipped, _):
        yield port, skipped


@contextlib.contextmanager
def llama_server_process(model, env, options):
    """llama.cpp's own server (make bench builds it from the sdist's llama.cpp), on the model: its
    port (None, then why, when there is no such binary), and its process."""
    binary = llama_server_binary()
    if not os.path.exists(binary):
        yield None, "no llama-server at %s (make bench builds it)" % binary, None
        return
    port = free_port()
    with served([binary, "-m", model, "-t", str(THREADS), "-tb", str(THREADS), "-ngl", "0", "--host", "127.0.0.1",
                 "--port", str(port)] + options, env, lambda: wait_until_serving(port)) as proc:
        yield port, None, proc


@contextlib.contextmanager
def served(argv, env, wait):
    """A server process for the block (killed with its group after it); `wait()` until it serves."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    try:
        wait()
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_until_serving(port, timeout=120):
    """llama-server answers 503 while it loads: wait for its /health to say ok."""
    import urllib.request
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("llama-server on %d did not come up" % port)


@contextlib.contextmanager
def peer_server(model, env):
    """llama-cpp-python's own OpenAI server on the same model, context and threads; yields its port."""
    port = free_port()
    with served([PY, "-m", "llama_cpp.server", "--model", model, "--n_ctx", str(N_CTX), "--n_threads", str(THREADS),
                 "--n_threads_batch", str(THREADS), "--n_gpu_layers", "0", "--flash_attn", "true",
                 "--port", str(port), "--host", "127.0.0.1"],
                env, lambda: wait_port(port)):
        yield port, None


def span(s, fmt):
    """A stats() figure as "median [min-max]"."""
    return "%s [%s-%s]" % (fmt % s["median"], fmt % s["min"], fmt % s["max"]) if s else "-"


def print_pair(scenario, names):
    for name in names:
        s = scenario[name]
        print("%-18s ttft %.1f ms [%.1f-%.1f]  tok/s %.1f [%.1f-%.1f]" % (
            name, s["ttft_ms"]["median"], s["ttft_ms"]["min"], s["ttft_ms"]["max"], s["tok_s"]["median"],
            s["tok_s"]["min"], s["tok_s"]["max"]))


def print_agent(agent):
    if "skipped" in agent:
        print("\nagent: %s" % agent["skipped"])
        return
    c = agent["config"]
    first = stats([agent[name][str(n)]["first_prompt_tokens"]["median"] for name in ("rbee_worker", "llama_server")
                   for n in c["sessions"] if agent[name][str(n)]["first_prompt_tokens"]])
    print("\nagent: S sessions at once x %d turns, a shared system prompt (turn 1's prompt: %s tokens), each turn "
          "adding ~150 user tokens and the last answer, %d tokens an answer; S slots, S x %d tokens of context in all "
          "(every session's whole history at once); %d runs, median [min-max]" % (
              c["turns"], first and "%d" % first["median"], c["max_tokens"], c["ctx_a_session"], c["runs"]))
    print("llama-server %s; rbee worker --parallel S --ctx-size S*%d" % (c["llama_server_options"], c["ctx_a_session"]))
    print("%-13s %-2s %-20s %-20s %-26s %-26s %-18s %s" % (
        "server", "S", "first token p50 ms", "first token p95 ms", "aggregate tok/s (tokens)",
        "turns 2-6: evaluated/added", "peak RSS MB", "errors"))
    for n in c["sessions"]:
        for name in ("rbee_worker", "llama_server"):
            row = agent[name][str(n)]
            evaluated, added = row["evaluated_a_later_turn"], row["added_a_later_turn"]
            print("%-13s %-2d %-20s %-20s %-26s %-26s %-18s %s" % (
                name, n, span(row["ttft_p50_ms"], "%.0f"), span(row["ttft_p95_ms"], "%.0f"),
                "%s (%d)" % (span(row["agg_tok_s"], "%.1f"), row["tokens"]["median"]),
                "%s / %s" % tuple("%.0f" % s["median"] if s else "?" for s in (evaluated, added)),
                span(row["peak_rss_mb"], "%.0f"), "%d %s" % (row["errors"]["max"], row["first_error"] or "")))
    for n in c["sessions"]:
        for name in ("rbee_worker", "llama_server"):
            print("first token p50 ms by turn, %s, S=%d: %s" % (name, n, "  ".join(
                "%d: %s" % (t + 1, "%.0f" % s["median"] if s else "-")
                for t, s in enumerate(agent[name][str(n)]["ttft_p50_ms_by_turn"]))))
    print("the longest prompt answered with each server's defaults (4 slots, no context flags; 8 tokens):")
    for name, longest in agent["longest_prompt"].items():
        failure = longest["first_failure"]
        print("%-13s %s tokens; %s" % (name, longest["longest_answered"], "refused %d tokens: %s" % (
            failure["prompt_tokens"], failure.get("error") or "no tokens") if failure else "answered them all"))


def print_table(r):
    print("\nrbee bench: %s, %d tokens, n_ctx %d, %d threads, temperature 0, %d runs (median [min-max])" % (
        r["config"]["model"], TOKENS, N_CTX, THREADS, RUNS))
    print("%-18s %-26s %-26s %-22s %s" % ("scenario", "time to first token ms", "tokens/s", "wall s",
                                          "vs the raw runs paired with it"))
    for name in ("raw", "worker", "warm", "cold_local", "cold_ssh", "cold_ssh_transport", "warm_lan",
                 "warm_ssh_transport", "peer"):
        s = r.get(name) or {}
        if "ttft_ms" not in s:
            print("%-18s %s" % (name, s.get("skipped", "-")))
            continue
        ratio = s.get("ratio_to_raw", {})
        print("%-18s %-26s %-26s %-22s %s" % (
            name, span(s.get("ttft_ms"), "%.1f"), span(s.get("tok_s"), "%.1f"), span(s.get("wall_s"), "%.2f"),
            "ttft %+.1f ms, tok/s x%.3f" % (s["ttft_over_raw_ms"], ratio.get("tok_s", 1))
            if ratio else "(all raw runs; load %.2f s)" % s.get("load_s", 0)))
    if r.get("warm_ssh_transport", {}).get("tok_s_vs_lan"):
        print("ssh transport: warm tok/s x%.3f of the lan transport to the same host" % (
            r["warm_ssh_transport"]["tok_s_vs_lan"]))
    print("\nconcurrency: %d tokens a client, distinct prompts, %d runs (median); ratios to llama-server -np 4"
          % (TOKENS, CONC_RUNS))
    print("%-38s %-8s %-16s %-22s %-22s %s" % ("server", "clients", "aggregate tok/s", "first token p50/p95 ms",
                                               "end-to-end p50/p95 ms", "tok/s, p95 first token vs np4"))
    for name, rows in r.get("concurrency", {}).items():
        if "skipped" in rows:
            print("%-38s %s" % (name, rows["skipped"]))
            continue
        for n, row in rows.items():
            vs = row.get("vs_llama_server_np4") or {}
            print("%-38s %-8s %-16s %-22s %-22s %s" % (
                name, n, "%.1f (%d/%d tok)" % (row["agg_tok_s"], row["tokens"], row["expected_tokens"]),
                "%.0f / %.0f" % (row["ttft_p50_ms"], row["ttft_p95_ms"]), "%.0f / %.0f" % (row["e2e_p50_ms"],
                                                                                         row["e2e_p95_ms"]),
                "x%s, x%s" % (vs.get("agg_tok_s"), vs.get("ttft_p95_ms")) if vs else ""))
    api = r.get("api")
    if api:
        print("\napi: the openai package streaming a chat completion, %d runs (median [min-max])" % RUNS)
        print_pair(api, ("rbee_queen", "llama_cpp_server"))
        print("rbee vs llama_cpp.server: tok/s x%.3f, ttft %+.1f ms" % (api["tok_s_ratio"], api["ttft_diff_ms"]))
    embeddings = r.get("embeddings") or {}
    if "one_request" in embeddings:
        print("\nembeddings: 256 inputs of about 60 tokens, inputs a second, %d runs (median [min-max])" % RUNS)
        for how in ("one_request", "eight_requests"):
            table = embeddings[how]
            print("%-16s rbee %.1f [%.1f-%.1f]  llama-server %.1f [%.1f-%.1f]  rbee x%.3f" % (
                how, *(table[s][m] for s in ("rbee_queen", "llama_server") for m in ("median", "min", "max")),
                table["ratio"]))
    elif embeddings:
        print("\nembeddings: %s" % embeddings.get("skipped"))
    tools = r.get("tools") or {}
    for kind, table in ((k, tools[k]) for k in ("tool_call", "json_schema") if k in tools):
        print("\ntools, %s: get_weather's arguments streamed by the openai package, request to parsed object, "
              "%d runs" % (kind, RUNS))
        for name in ("rbee_queen", "llama_server_jinja"):
            s = table[name]
            print("%-20s valid %s  first piece ms %-18s whole object ms %-18s pieces/s %s" % (
                name, s["valid"], span(s.get("ttft_ms"), "%.0f"), span(s.get("call_ms"), "%.0f"),
                span(s.get("tok_s"), "%.1f")))
        if "call_ms_ratio" in table:
            print("rbee vs llama-server --jinja: whole object x%.3f (lower is faster), pieces/s x%.3f" % (
                table["call_ms_ratio"], table["tok_s_ratio"]))
    if tools.get("skipped"):
        print("\ntools: %s" % tools["skipped"])
    if r.get("agent"):
        print_agent(r["agent"])
    split = r.get("split") or {}
    if "one_node" in split:
        print("\nsplit: warm infer, the model on mac alone vs split mac (20 layers) + workstation (10), over the LAN "
              "and the ssh transport, %d runs" % RUNS)
        print_pair(split, ("one_node", "split_two_nodes", "split_ssh_transport"))
        print("split vs one node: tok/s x%.3f, ttft %+.1f ms; network round trip between the hosts %s ms" % (
            split["tok_s_ratio"], split["ttft_diff_ms"], split["rtt_ms"]))
        print("ssh transport split vs LAN split: tok/s x%.3f, ttft %+.1f ms" % (
            split["ssh_tok_s_vs_lan"], split["ssh_ttft_diff_ms"]))
        for name, loads in split["loads"].items():
            print("loads, %s: alone %s ms; split first %s ms, %.1f MB to the part; second %s ms, %s MB to the part; "
                  "same text %s" % (name, span(loads["alone_load_ms"], "%.0f"), loads["first_load_ms"],
                                    loads["first_bytes_to_part"] / 1e6, span(loads["second_load_ms"], "%.0f"),
                                    "%.2f" % (loads["second_bytes_to_part"]["median"] / 1e6), loads["same_text"]))
    elif split:
        print("\nsplit: %s" % split.get("skipped"))
    f = r.get("footprint", {})
    print("footprint: queen %.1f MB, hive %.1f MB, worker overhead %.1f MB over the raw model process; "
          "python -c pass %.1f ms" % (f.get("queen_rss_mb", 0), f.get("hive_rss_mb", 0), f.get("worker_overhead_mb", 0),
                                      r["python_startup_ms"]["median"]))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--raw-child":
        raw_child(sys.argv[2])
    else:
        main()
