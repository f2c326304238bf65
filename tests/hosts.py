"""Real ssh hosts for tests: a private sshd on loopback, and simulated hosts in
network namespaces (each with its own sshd, hostname and home directory).

Standard library only; importable without pytest. Needs /usr/sbin/sshd,
ssh-keygen and, for NetnsHosts, root plus iproute2 and util-linux (unshare,
mount). See shared/TESTING.md for the facts these helpers rely on.

Typical use::

    keys = SshKeys(tmp / "keys")
    with LoopbackSshd(tmp / "loop", keys) as sshd:
        cfg = write_ssh_config(tmp / "ssh_config",
                               [("loop", sshd.host, sshd.port, sshd.user)], keys)
        subprocess.run(["ssh", "-F", cfg, "loop", "echo hi"])

    with NetnsHosts(tmp / "net", keys) as net:       # needs netns_available()
        cfg = write_ssh_config(tmp / "cfg", net.hosts.values(), keys)
        subprocess.run(["ssh", "-F", cfg, "mac", "hostname"])   # -> mac

Several NetnsHosts at once (e.g. one per pytest-xdist worker) need their own
NS_PREFIX, BRIDGE and SUBNET: the host names stay the same, the namespace
and interface names do not.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
IP = "ip"

__all__ = [
    "SshKeys",
    "LoopbackSshd",
    "SimHost",
    "NetnsHosts",
    "netns_available",
    "write_ssh_config",
    "listening_ports_local",
    "processes_matching",
]


# --------------------------------------------------------------------------
# small helpers


def _die_with_parent():
    """preexec_fn: SIGKILL the child when the process that started it dies,
    so that a crashed test run leaves no sshd behind (PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except Exception:
        pass


def _free_port(host="127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _read_log(path, limit=4000) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        return f"<no log: {e}>"
    return text[-limit:]


def _wait_ssh_banner(host, port, proc, log, timeout, what):
    """Wait until HOST:PORT answers with an SSH banner; fail early if the
    process exits. Raises RuntimeError with the sshd log on failure."""
    deadline = time.monotonic() + timeout
    last_err = None
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{what}: sshd exited with status {proc.returncode} before "
                f"accepting connections on {host}:{port}\n--- sshd log {log} ---\n"
                f"{_read_log(log)}"
            )
        try:
            with socket.create_connection((host, port), timeout=1.0) as s:
                s.settimeout(2.0)
                banner = s.recv(64)
                if banner.startswith(b"SSH-"):
                    return
                last_err = f"unexpected banner {banner!r}"
        except OSError as e:
            last_err = e
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{what}: sshd did not accept connections on {host}:{port} within "
                f"{timeout} s (last error: {last_err})\n--- sshd log {log} ---\n"
                f"{_read_log(log)}"
            )
        time.sleep(0.02)


def _stop_proc(proc, timeout=5.0):
    if proc is None:
        return
    if proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
        except ProcessLookupError:
            pass
    else:
        proc.wait()


def _sshd_config(path, *, port, listen, host_key, authorized_keys, pid_file) -> None:
    lines = [
        f"Port {port}",
        f"ListenAddress {listen}",
        f'HostKey "{host_key}"',
        f'AuthorizedKeysFile "{authorized_keys}"',
        f'PidFile "{pid_file}"',
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        "PrintMotd no",
        "PrintLastLog no",
        "UseDNS no",
        # tests open many connections at once (and multiplex over ControlMaster)
        "MaxStartups 200",
        "MaxSessions 200",
        "LogLevel VERBOSE",
        "Subsystem sftp internal-sftp",
    ]
    Path(path).write_text("\n".join(lines) + "\n")


def _make_host_key(path: Path) -> None:
    if not path.exists():
        subprocess.run(
            [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "rbee-test-host", "-f", str(path)],
            check=True, stdin=subprocess.DEVNULL, capture_output=True,
        )


# --------------------------------------------------------------------------
# keys


class SshKeys:
    """A client ed25519 key pair made with ssh-keygen in WORKDIR (reused if
    already there)."""

    def __init__(self, workdir):
        self.workdir = Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.private = self.workdir / "id_ed25519"
        self.public = self.workdir / "id_ed25519.pub"
        if not (self.private.exists() and self.public.exists()):
            for p in (self.private, self.public):
                if p.exists():
                    p.unlink()
            subprocess.run(
                [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "rbee-test", "-f", str(self.private)],
                check=True, stdin=subprocess.DEVNULL, capture_output=True,
            )
        os.chmod(self.private, 0o600)
        self.public_text = self.public.read_text().strip()

    def __repr__(self):
        return f"SshKeys({str(self.workdir)!r})"


# --------------------------------------------------------------------------
# a private sshd on loopback


class LoopbackSshd:
    """A private sshd on 127.0.0.1:PORT, run as a child process
    (`/usr/sbin/sshd -D -f CONFIG -E LOG`). Logs in as root with KEYS."""

    host = "127.0.0.1"
    user = "root"

    def __init__(self, workdir, keys: SshKeys, port=None, start_timeout=10.0):
        self.workdir = Path(workdir).absolute()
        self.keys = keys
        self._fixed_port = port
        self.port = port if port is not None else _free_port(self.host)
        self.start_timeout = start_timeout
        self.config = self.workdir / "sshd_config"
        self.log = self.workdir / "sshd.log"
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.authorized_keys = self.workdir / "authorized_keys"
        self.pid_file = self.workdir / "sshd.pid"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "LoopbackSshd":
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.makedirs("/run/sshd", exist_ok=True)
        _make_host_key(self.host_key)
        self.authorized_keys.write_text(self.keys.public_text + "\n")
        attempts = 1 if self._fixed_port is not None else 3
        for attempt in range(attempts):
            _sshd_config(self.config, port=self.port, listen=self.host,
                         host_key=self.host_key, authorized_keys=self.authorized_keys,
                         pid_file=self.pid_file)
            self.log.write_text("")
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-f", str(self.config), "-E", str(self.log)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
            try:
                _wait_ssh_banner(self.host, self.port, self.proc, self.log,
                                 self.start_timeout, "LoopbackSshd")
                return self
            except RuntimeError:
                lost_port = "Address already in use" in _read_log(self.log)
                _stop_proc(self.proc)
                self.proc = None
                if lost_port and attempt + 1 < attempts:
                    self.port = _free_port(self.host)  # raced for the port: retry
                    continue
                raise
        raise AssertionError("unreachable")

    def stop(self):
        proc, self.proc = self.proc, None
        _stop_proc(proc)

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return f"LoopbackSshd({self.host}:{self.port})"


# --------------------------------------------------------------------------
# simulated hosts in network namespaces


@dataclass
class SimHost:
    name: str
    address: str
    port: int = 22
    user: str = "root"
    home: Path | None = None  # host-side path of the directory seen as /root there
    netns: str = ""  # namespace name (NS_PREFIX + name)
    resolvable: bool = True  # False: its own name does not resolve there, DNS times out


def _ip(*args, check=True, input=None) -> subprocess.CompletedProcess:
    r = subprocess.run([IP, *args], capture_output=True, text=True, input=input)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _link_exists(name) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def _netns_exists(name) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def _netns_pids(name) -> list[int]:
    r = _ip("netns", "pids", name, check=False)
    if r.returncode != 0:
        return []
    return [int(x) for x in r.stdout.split() if x.strip().isdigit()]


def _veth_name(prefix, name) -> str:
    n = f"{prefix}{name}"
    if len(n) <= 15 and all(c.isalnum() or c in "-_." for c in n):
        return n
    return f"{prefix}{zlib.crc32(name.encode()):08x}"[:15]


def netns_available() -> bool:
    """True when we are root and `ip netns add` works (tried on a throwaway
    namespace that is deleted again)."""
    if os.geteuid() != 0:
        return False
    name = f"rbeeprobe{os.getpid()}"
    try:
        r = subprocess.run([IP, "netns", "add", name], capture_output=True)
    except OSError:
        return False
    if r.returncode != 0:
        return False
    subprocess.run([IP, "netns", "del", name], capture_output=True)
    return all(shutil.which(t) for t in ("unshare", "mount", SSH_KEYGEN)) and os.path.exists(SSHD)


class NetnsHosts:
    """Simulated hosts: one network namespace per name, joined by a bridge.

    Root namespace: bridge BRIDGE with SUBNET.1/24 (`gateway`). Host i (in
    the order of NAMES): namespace NS_PREFIX+NAME, eth0 = SUBNET.(i+2)/24,
    lo up, default route via the gateway, and an sshd on 0.0.0.0:22 started
    under `unshare --mount --uts --propagation private` with hostname NAME
    and WORKDIR/NAME-home bind-mounted over /root.

    So that a venv made from pyenv's Python (under /root/.pyenv) keeps
    working inside the hosts, the real /root/<p> for each p in
    SHARE_FROM_ROOT that exists is bind-mounted into the host's home
    (default: .pyenv). Those directories are shared by all hosts.

    Inside each host's ssh sessions /etc/hosts names every host, plus
    "gateway" (and this machine's real hostname) for SUBNET.1, and
    /etc/resolv.conf has no nameserver, so lookups fail fast instead of
    timing out against a DNS server the hosts cannot reach. Everything else
    of the file system (/tmp, /work/main, /usr) is the real one, shared.

    Hosts named in UNRESOLVABLE are air-gapped lab machines whose own name
    does not resolve: their /etc/hosts lacks their own name (localhost and
    the other hosts are there), and their /etc/resolv.conf names a
    nameserver at DEAD_NAMESERVER (default SUBNET.250, an address in the
    subnet that nobody owns) with the resolver's default timeouts, so a
    lookup of their own hostname (socket.getfqdn(), which http.server calls
    on bind) blocks for about 10 s (2 attempts x 5 s) and then fails. A
    permanent neighbour entry with an unused MAC makes the queries vanish
    on the bridge (no ARP failure, no ICMP error to cut the wait short).

    Processes started with `run_in` / `popen_in` get only the network
    namespace: hostname, /root and /etc are this machine's.

    The namespace, veth and bridge names are fixed by NS_PREFIX, NAMES and
    BRIDGE, so two instances with the same of those cannot run at once
    (start() of the second tears the first down); give each its own
    NS_PREFIX, BRIDGE and SUBNET.
    """

    def __init__(self, workdir, keys: SshKeys, names=("mac", "workstation"),
                 subnet="10.200.0", bridge="rbeebr0", share_from_root=(".pyenv",),
                 start_timeout=10.0, ns_prefix="", unresolvable=(), dead_nameserver=None):
        self.workdir = Path(workdir).absolute()
        if self.workdir == Path("/root") or Path("/root") in self.workdir.parents:
            raise ValueError(f"NetnsHosts workdir must not be under /root (it is hidden "
                             f"inside the hosts): {self.workdir}")
        names = tuple(names)
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"host names must be unique and non-empty: {names}")
        if len(names) > 250:
            raise ValueError("too many hosts")
        unresolvable = tuple(unresolvable or ())
        if not set(unresolvable) <= set(names):
            raise ValueError(f"unresolvable hosts {unresolvable} not among {names}")
        if ns_prefix and not all(c.isalnum() or c in "-_." for c in ns_prefix):
            raise ValueError(f"bad namespace prefix: {ns_prefix!r}")
        self.keys = keys
        self.names = names
        self.subnet = subnet
        self.gateway = f"{subnet}.1"
        self.dead_nameserver = dead_nameserver or f"{subnet}.250"
        self.bridge = bridge
        self.ns_prefix = ns_prefix
        # interface names in the root namespace: unique per prefix (the crc
        # keeps them unique and within 15 characters)
        self._if_tag = "".join(c for c in ns_prefix if c.isalnum())
        if len(bridge) > 15:
            raise ValueError(f"bridge name too long (max 15): {bridge}")
        self.share_from_root = tuple(share_from_root or ())
        self.start_timeout = start_timeout
        self.hosts: dict[str, SimHost] = {}
        for i, name in enumerate(names):
            self.hosts[name] = SimHost(
                name=name, address=f"{subnet}.{i + 2}", port=22, user="root",
                home=self.workdir / f"{name}-home", netns=f"{ns_prefix}{name}",
                resolvable=name not in unresolvable,
            )
        if self.dead_nameserver in {h.address for h in self.hosts.values()} | {self.gateway}:
            raise ValueError(f"dead nameserver {self.dead_nameserver} is a host's address")
        self.authorized_keys = self.workdir / "authorized_keys"
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self._procs: dict[str, subprocess.Popen] = {}

    # -- paths / names
    def netns(self, name) -> str:
        """The network namespace of host NAME (`ip netns exec <netns> ...`)."""
        return self.hosts[name].netns

    def veth(self, name) -> str:
        """Name of the host-side (root namespace) end of NAME's veth pair;
        `ip link set <veth> down` cuts that host off silently."""
        return _veth_name(f"rbv{self._if_tag}-", name)

    def bytes_into(self, name) -> int:
        """Bytes the bridge sent into NAME's host so far (its veth's counter)."""
        return int(Path(f"/sys/class/net/{self.veth(name)}/statistics/tx_bytes").read_text())

    def pids(self, name) -> list[int]:
        """The processes in NAME's namespace."""
        return _netns_pids(self.netns(name))

    def _veth_peer(self, name) -> str:
        return _veth_name(f"rbp{self._if_tag}-", name)

    def sshd_log(self, name) -> Path:
        return self.workdir / f"{name}-sshd.log"

    def sshd_config(self, name) -> Path:
        return self.workdir / f"{name}-sshd_config"

    # -- lifecycle
    def start(self) -> "NetnsHosts":
        if os.geteuid() != 0:
            raise RuntimeError("NetnsHosts needs root")
        self.stop()  # also removes leftovers of a crashed run with the same names
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.makedirs("/run/sshd", exist_ok=True)
        _make_host_key(self.host_key)
        self.authorized_keys.write_text(self.keys.public_text + "\n")
        try:
            self._setup_network()
            for name in self.names:
                self._start_sshd(name)
            for name in self.names:
                h = self.hosts[name]
                _wait_ssh_banner(h.address, h.port, self._procs[name], self.sshd_log(name),
                                 self.start_timeout, f"NetnsHosts[{name}]")
        except BaseException:
            self.stop()
            raise
        return self

    def _setup_network(self):
        cmds = [
            f"link add {self.bridge} type bridge",
            f"addr add {self.gateway}/24 dev {self.bridge}",
            f"link set {self.bridge} up",
        ]
        for name in self.names:
            cmds.append(f"netns add {self.netns(name)}")
        _ip("-batch", "-", input="\n".join(cmds) + "\n")
        cmds = []
        for name in self.names:
            vh, vp = self.veth(name), self._veth_peer(name)
            cmds += [
                f"link add {vh} type veth peer name {vp}",
                f"link set {vp} netns {self.netns(name)}",
                f"link set {vh} master {self.bridge}",
                f"link set {vh} up",
            ]
        _ip("-batch", "-", input="\n".join(cmds) + "\n")
        for i, name in enumerate(self.names):  # inside each namespace (batch lines take no -n)
            h, vp = self.hosts[name], self._veth_peer(name)
            cmds = [
                f"link set {vp} name eth0",
                f"addr add {h.address}/24 dev eth0",
                "link set eth0 up",
                "link set lo up",
                f"route add default via {self.gateway}",
            ]
            if not h.resolvable:
                # the DNS queries leave the host and vanish (a locally
                # administered MAC that no interface has): a real timeout
                cmds.append(f"neigh replace {self.dead_nameserver} lladdr 02:00:de:ad:{i // 256:02x}:{i % 256:02x} "
                            f"dev eth0 nud permanent")
            _ip("-n", h.netns, "-batch", "-", input="\n".join(cmds) + "\n")

    def _start_sshd(self, name):
        h = self.hosts[name]
        h.home.mkdir(parents=True, exist_ok=True)
        cfg, log = self.sshd_config(name), self.sshd_log(name)
        _sshd_config(cfg, port=22, listen="0.0.0.0", host_key=self.host_key,
                     authorized_keys=self.authorized_keys,
                     pid_file=self.workdir / f"{name}-sshd.pid")
        log.write_text("")
        q = shlex.quote
        script = ["set -e", f"echo {q(name)} > /proc/sys/kernel/hostname"]
        for rel in self.share_from_root:
            src = Path("/root") / rel
            if src.is_dir():
                dst = h.home / rel
                dst.mkdir(parents=True, exist_ok=True)
                script.append(f"mount --bind {q(str(src))} {q(str(dst))}")
        script.append(f"mount --rbind {q(str(h.home))} /root")
        # Name resolution: the hosts cannot reach the real DNS server, and a
        # lookup of their own hostname (e.g. socket.getfqdn(), which
        # http.server calls on bind) would hang ~10 s in resolver timeouts.
        etc_hosts, resolv = self.workdir / f"{name}-etc-hosts", self.workdir / f"{name}-resolv.conf"
        etc_hosts.write_text(self._etc_hosts(name))
        if h.resolvable:
            resolv.write_text("# no nameserver: lookups fail fast (127.0.0.1:53 is closed)\n"
                              "options timeout:1 attempts:1\n")
        else:
            # air-gapped: a nameserver nobody answers for, resolver defaults
            # (timeout 5 s, 2 attempts)
            resolv.write_text(f"nameserver {self.dead_nameserver}\n")
        script.append(f"mount --bind {q(str(etc_hosts))} /etc/hosts")
        script.append(f"mount --bind {q(str(resolv))} /etc/resolv.conf")
        script.append(f"exec {SSHD} -D -f {q(str(cfg))} -E {q(str(log))}")
        argv = [IP, "netns", "exec", h.netns, "unshare", "--mount", "--uts",
                "--propagation", "private", "/bin/sh", "-c", "\n".join(script)]
        with open(log, "ab") as errf:
            self._procs[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf,
                preexec_fn=_die_with_parent,
            )

    def _etc_hosts(self, name) -> str:
        """/etc/hosts as host NAME sees it: localhost, the gateway, every
        host -- except NAME itself when its name must not resolve."""
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        gw_names = ["gateway"]
        real = socket.gethostname()
        if real and real not in self.hosts and real != "gateway":
            gw_names.append(real)
        lines.append(f"{self.gateway}\t{' '.join(gw_names)}")
        for h in self.hosts.values():
            if h.name == name and not h.resolvable:
                continue
            lines.append(f"{h.address}\t{h.name}")
        return "\n".join(lines) + "\n"

    def stop(self):
        """Kill every process in each namespace, delete the namespaces, the
        veths and the bridge. Idempotent; also cleans up a crashed run."""
        names = list(self.names)
        # 1. kill everything inside the namespaces
        for name in names:
            if _netns_exists(self.netns(name)):
                for pid in _netns_pids(self.netns(name)):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        for proc in self._procs.values():
            try:
                proc.kill()
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        deadline = time.monotonic() + 5
        for name in names:
            ns = self.netns(name)
            while _netns_exists(ns) and _netns_pids(ns) and time.monotonic() < deadline:
                time.sleep(0.01)
        # 2. veths (deleting one end removes both; a peer not yet moved into
        # its namespace by a crashed start too), namespaces, bridge
        for name in names:
            for link in (self.veth(name), self._veth_peer(name)):
                if _link_exists(link):
                    _ip("link", "del", link, check=False)
            if _netns_exists(self.netns(name)):
                _ip("netns", "del", self.netns(name), check=False)
        if _link_exists(self.bridge):
            _ip("link", "del", self.bridge, check=False)
        leftovers = [self.netns(n) for n in names if _netns_exists(self.netns(n))]
        leftovers += [self.veth(n) for n in names if _link_exists(self.veth(n))]
        if _link_exists(self.bridge):
            leftovers.append(self.bridge)
        if leftovers:
            raise RuntimeError(f"NetnsHosts.stop: could not remove {leftovers}")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- inspection
    def run_in(self, name, argv, **kw) -> subprocess.CompletedProcess:
        """`ip netns exec <netns of NAME> argv...` (network namespace only:
        the hostname, /root and /etc there are the root namespace's, unlike
        over ssh)."""
        if isinstance(argv, (str, bytes)):
            argv = [argv]
        return subprocess.run([IP, "netns", "exec", self.netns(name), *argv], **kw)

    def popen_in(self, name, argv, **kw) -> subprocess.Popen:
        return subprocess.Popen([IP, "netns", "exec", self.netns(name), *argv], **kw)

    def host_of_netns_inode(self, ino) -> str | None:
        """The host whose network namespace has inode INO (as in the link
        /proc/PID/ns/net -> net:[INO]); None for none of them."""
        for name, h in self.hosts.items():
            try:
                if os.stat(f"/run/netns/{h.netns}").st_ino == ino:
                    return name
            except OSError:
                pass
        return None

    def listening_ports(self, name) -> set[int]:
        r = self.run_in(name, ["cat", "/proc/net/tcp", "/proc/net/tcp6"],
                        capture_output=True, text=True)
        return _parse_listen(r.stdout)

    def __repr__(self):
        return f"NetnsHosts({', '.join(f'{h.name}={h.address}' for h in self.hosts.values())}; {self.bridge})"


# --------------------------------------------------------------------------
# ssh client config


def _entry(e):
    if isinstance(e, dict):
        return (e.get("alias") or e["name"], e.get("hostname") or e["address"],
                int(e.get("port", 22)), e.get("user", "root"))
    if isinstance(e, (tuple, list)):
        alias, hostname, port, user = (tuple(e) + (22, "root")[len(e) - 2:])[:4]
        return alias, hostname, int(port), user
    # SimHost-like
    return e.name, e.address, int(e.port), e.user


def write_ssh_config(path, entries, keys: SshKeys, extra=None) -> str:
    """Write an ssh client config usable with `ssh -F PATH`.

    ENTRIES: (alias, hostname, port, user) tuples, dicts with those keys, or
    SimHost objects (alias = name). EXTRA: optional dict of further options
    put in every block (e.g. {"ControlMaster": "auto", ...}).
    Returns PATH as a string."""
    generic = [
        f'IdentityFile "{keys.private}"',
        "IdentitiesOnly yes",
        "BatchMode yes",
        "StrictHostKeyChecking no",
        "UserKnownHostsFile /dev/null",
        "LogLevel ERROR",
        "ConnectTimeout 5",
        "ServerAliveInterval 5",
        "ServerAliveCountMax 3",
    ]
    for k, v in (extra or {}).items():
        generic.append(f"{k} {v}")
    out = []
    for e in entries:
        alias, hostname, port, user = _entry(e)
        out.append(f"Host {alias}")
        out += [f"    HostName {hostname}", f"    Port {port}", f"    User {user}"]
        out += [f"    {g}" for g in generic]
        out.append("")
    out.append("Host *")
    out += [f"    {g}" for g in generic]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(out) + "\n")
    return str(path)


# --------------------------------------------------------------------------
# process / port inspection


def _listen_entries(text) -> list[tuple[int, str]]:
    """(port, socket inode) of each TCP socket in LISTEN state in /proc/net/tcp{,6} text."""
    entries = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 10 or ":" not in parts[1] or parts[0] == "sl":
            continue
        if parts[3] == "0A":  # TCP_LISTEN
            try:
                entries.append((int(parts[1].rsplit(":", 1)[1], 16), parts[9]))
            except ValueError:
                pass
    return entries


def _parse_listen(text) -> set[int]:
    return {port for port, _ in _listen_entries(text)}


def _tcp_tables_local() -> str:
    text = ""
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            text += Path(f).read_text()
        except OSError:
            pass
    return text


def listening_ports_local() -> set[int]:
    """TCP ports in LISTEN state in this (the root) network namespace."""
    return _parse_listen(_tcp_tables_local())


def listeners_local(port) -> set[int] | None:
    """The pids of the processes holding a listening TCP socket on `port` in this network namespace;
    None when nothing listens there. The set may be empty for a moment: the socket's last owner is
    exiting, or a parent closed its copy after handing it to a child this scan did not list."""
    sockets = {"socket:[%s]" % inode for p, inode in _listen_entries(_tcp_tables_local()) if p == port}
    if not sockets:
        return None
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") in sockets for fd in os.listdir(f"/proc/{entry}/fd")):
                pids.add(int(entry))
        except OSError:
            pass
    return pids


def processes_matching(*needles) -> list[tuple[int, str]]:
    """(pid, cmdline) of every live process whose command line (arguments
    joined by spaces) contains every needle. Skips zombies and the caller."""
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            state = stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3]
            if state in (b"Z", b"X"):
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                raw = f.read()
        except (OSError, ValueError):
            continue
        if not raw:
            continue
        cmd = raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
        if all(n in cmd for n in needles):
            out.append((pid, cmd))
    return out
