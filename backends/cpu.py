"""cpu: always available; every layer on the CPU, one thread per physical core."""
import platform

from . import BackendError, check_ram, llama, meminfo_mb, physical_cores, process_rss_mb


def available():
    return True


def unavailable_reason():
    return None


def devices():
    total, free = meminfo_mb()
    return [{"index": 0, "name": platform.processor() or platform.machine() or "cpu",
             "memory_total_mb": total, "memory_free_mb": free}]


def preflight(model_size_bytes, device):
    if device != 0:
        raise BackendError("DEVICE_NOT_FOUND", "Device %s not found for backend cpu" % device,
                           {"requested": device, "devices": 1, "backend": "cpu"}, "Use --device 0")
    check_ram(model_size_bytes)


def load(model_path, device, n_ctx, **opts):
    threads = opts.pop("n_threads", None) or physical_cores()
    return llama(model_path, n_ctx, n_gpu_layers=0, n_threads=threads, n_threads_batch=threads, **opts)


def memory_used_mb(device):
    return process_rss_mb()


def describe(device):
    return "CPU device %d (%d threads)" % (device, physical_cores())
