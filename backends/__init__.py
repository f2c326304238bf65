"""Backend adapters: one module per accelerator, one interface (PROTOCOL.md §8).

Each module (cpu.py, cuda.py, metal.py) exposes
    available() -> bool
    devices() -> [{index, name, memory_total_mb, memory_free_mb}]
    preflight(need_mb, device)               raises BackendError with a PROTOCOL.md §7 code
    load(model_path, device, n_ctx, **opts)  -> llama_cpp.Llama (opts override its own: a split's layers)
    memory_used_mb(device) -> int
    describe(device) -> str                   for narration ("CPU device 0 (2 threads)")
    unavailable_reason() -> str or None      why available() is False
    MEMORY = "ram" or "vram"                  where its models live: the system RAM, or each device's own
Adding ROCm or Vulkan means adding one file and its name to PREFERENCE.
Nothing here imports llama_cpp at module level: the hive reports backends without loading it.
"""
import importlib
import os
import subprocess
import sys

PREFERENCE = ("cuda", "metal", "cpu")   # best first: the default backend of a node


class BackendError(Exception):
    """An error with a PROTOCOL.md §7 code; rbee.py renders it in the error envelope."""

    def __init__(self, code, message, details=None, suggestion=None):
        super().__init__(message)
        self.code, self.message = code, message
        self.details, self.suggestion = details or {}, suggestion


def get(name):
    """The backend module called `name`, or BackendError listing the ones there are."""
    if name not in PREFERENCE:
        raise BackendError("BACKEND_UNAVAILABLE", "Unknown backend %r" % name,
                           {"requested": name, "known": list(PREFERENCE)},
                           "Use one of: " + ", ".join(PREFERENCE))
    return importlib.import_module(__name__ + "." + name)


def detect():
    """{name: devices} for every backend available on this machine, best first."""
    found = {}
    for name in PREFERENCE:
        module = get(name)
        if module.available():
            found[name] = module.devices()
    return found


def best():
    return next(name for name in PREFERENCE if get(name).available())


def require(name, device):
    """The module for `name` after checking it is available and has `device`."""
    module = get(name)
    if not module.available():
        usable = [n for n in PREFERENCE if get(n).available()]
        raise BackendError("BACKEND_UNAVAILABLE", "Backend %s is not available on this node" % name,
                           {"requested": name, "available": usable, "reason": module.unavailable_reason()},
                           "Use --backend %s, or install a llama-cpp-python build with %s support"
                           % (usable[0], name))
    count = len(module.devices())
    if not isinstance(device, int) or isinstance(device, bool) or not 0 <= device < count:
        raise BackendError("DEVICE_NOT_FOUND", "Device %s not found for backend %s" % (device, name),
                           {"requested": device, "devices": count, "backend": name},
                           "Use --device 0%s" % ("..%d" % (count - 1) if count > 1 else ""))
    return module


# ---- helpers shared by the adapters -------------------------------------------------------

def meminfo_mb():
    """(total, available) system RAM in MB."""
    if sys.platform.startswith("linux"):
        values = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) // 1024
        return values["MemTotal"], values.get("MemAvailable", values["MemFree"])
    if sys.platform == "darwin":
        total = int(subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True,
                                   text=True, timeout=5).stdout) // (1 << 20)
        pages = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5).stdout
        free = sum(int(line.split()[-1].rstrip(".")) for line in pages.splitlines()
                   if line.startswith(("Pages free", "Pages inactive", "Pages speculative")))
        return total, free * 16384 // (1 << 20) if os.uname().machine == "arm64" else free * 4096 // (1 << 20)
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1 << 20)
    return pages, pages


def check_ram(need):
    """INSUFFICIENT_RAM when free RAM < `need` MB, a worker's estimate (every backend loads through RAM)."""
    _, free = meminfo_mb()
    if free < need:
        raise BackendError("INSUFFICIENT_RAM", "Insufficient RAM: need %d MB, %d MB available" % (need, free),
                           {"required_mb": need, "available_mb": free},
                           "Free some memory on the node or choose a smaller model (a lower quantisation)")


def preflight_unified(name, need_mb, device):
    """Preflight of a backend with one device whose memory is the system RAM (cpu, metal)."""
    if device != 0:
        raise BackendError("DEVICE_NOT_FOUND", "Device %s not found for backend %s" % (device, name),
                           {"requested": device, "devices": 1, "backend": name}, "Use --device 0")
    check_ram(need_mb)


def process_rss_mb(pid=None):
    rss = proc_rss_mb(pid or os.getpid())
    if rss is not None:
        return rss
    import resource   # macOS: peak RSS of this process, in bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1 << 20)


def proc_rss_mb(pid):
    """A process's resident memory in MB, from /proc (Linux); None where that cannot be read."""
    try:
        with open("/proc/%d/status" % pid) as f:
            return next((int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS:")), None)
    except (OSError, ValueError):
        return None


def threads():
    """The threads a worker's (or an RPC part's) llama.cpp computes with: $RBEE_THREADS, else the
    physical cores. ggml's threads wait for each other spinning: two workers that each take every
    core of a node slow each other down by orders of magnitude, not by half (the tests, two at a
    time on 2 cores, give each worker one)."""
    value = os.environ.get("RBEE_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else physical_cores()


def physical_cores():
    """Physical cores (llama.cpp is slower on hyper-threads), falling back to logical CPUs."""
    try:
        if sys.platform == "darwin":
            return int(subprocess.run(["sysctl", "-n", "hw.perflevel0.physicalcpu"], capture_output=True,
                                      text=True, timeout=5).stdout or os.cpu_count())
        cores, current = set(), {}
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("physical id", "core id"):
                    current[key] = value.strip()
                elif not line.strip() and current:
                    cores.add((current.get("physical id"), current.get("core id")))
                    current = {}
        usable = len(os.sched_getaffinity(0))
        return max(1, min(len(cores) or usable, usable))
    except (OSError, ValueError):
        return os.cpu_count() or 1


_offload = None


def gpu_offload_supported():
    """Whether the installed llama-cpp-python was built with GPU offload.

    Asked in a child interpreter so that the hive never loads llama.cpp itself (memory, start-up).
    """
    global _offload
    if _offload is None:
        probe = "import llama_cpp; print(int(llama_cpp.llama_supports_gpu_offload()))"
        try:
            out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
            _offload = out.stdout.strip() == "1"
        except (OSError, subprocess.TimeoutExpired):
            _offload = False
    return _offload


def llama(model_path, n_ctx, **opts):
    """Construct llama_cpp.Llama quietly (its own logs would clutter the user's stderr)."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise BackendError("BACKEND_UNAVAILABLE", "llama-cpp-python is not installed: %s" % exc, {},
                           "Run `make setup`, or `rbee.py nodes install NODE` for a remote node")
    return llama_cpp.Llama(model_path=model_path, n_ctx=n_ctx, verbose=False, **opts)
