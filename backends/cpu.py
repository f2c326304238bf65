"""cpu: always available; every layer on the CPU, one thread per physical core."""
import platform

from . import llama, meminfo_mb, preflight_unified, process_rss_mb, threads as worker_threads

MEMORY = "ram"   # the memory a model takes on its devices: the system RAM


def available():
    return True


def unavailable_reason():
    return None


def devices():
    total, free = meminfo_mb()
    return [{"index": 0, "name": platform.processor() or platform.machine() or "cpu",
             "memory_total_mb": total, "memory_free_mb": free}]


def preflight(need_mb, device):
    preflight_unified("cpu", need_mb, device)


def load(model_path, device, n_ctx, **opts):
    threads = opts.pop("n_threads", None) or worker_threads()
    return llama(model_path, n_ctx, **dict({"n_gpu_layers": 0, "n_threads": threads, "n_threads_batch": threads},
                                           **opts))


def memory_used_mb(device):
    return process_rss_mb()


def describe(device):
    return "CPU device %d (%d threads)" % (device, worker_threads())
