"""metal: Apple silicon GPUs on macOS; every layer offloaded. Memory is unified with RAM."""
import platform
import sys

from . import gpu_offload_supported, llama, meminfo_mb, preflight_unified, process_rss_mb

MEMORY = "ram"   # the memory a model takes on its devices: the system RAM


def unavailable_reason():
    if sys.platform != "darwin" or platform.machine() != "arm64":
        return "Metal needs macOS on Apple silicon (this is %s/%s)" % (sys.platform, platform.machine())
    if not gpu_offload_supported():
        return "llama-cpp-python was built without Metal; reinstall it with CMAKE_ARGS=-DGGML_METAL=on"
    return None


def available():
    return unavailable_reason() is None


def devices():
    if not available():
        return []
    total, free = meminfo_mb()
    return [{"index": 0, "name": "Apple silicon GPU", "memory_total_mb": total, "memory_free_mb": free}]


def preflight(need_mb, device):
    preflight_unified("metal", need_mb, device)


def load(model_path, device, n_ctx, **opts):
    return llama(model_path, n_ctx, **dict({"n_gpu_layers": -1, "main_gpu": device}, **opts))


def memory_used_mb(device):
    return process_rss_mb()


def describe(device):
    return "Metal device %d" % device
