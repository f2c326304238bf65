"""cuda: NVIDIA GPUs read from nvidia-smi; every layer offloaded to main_gpu=device."""
import os
import shutil
import subprocess

from . import BackendError, gpu_offload_supported, llama

MEMORY = "vram"   # the memory a model takes on its devices: each GPU's own

_QUERY = ["nvidia-smi", "--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"]


def _smi(args):
    out = subprocess.run(args, capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        raise OSError(out.stderr.strip() or "nvidia-smi failed")
    return [[cell.strip() for cell in line.split(",")] for line in out.stdout.splitlines() if line.strip()]


def unavailable_reason():
    if not shutil.which("nvidia-smi"):
        return "nvidia-smi not found (no NVIDIA driver)"
    try:
        if not _smi(_QUERY):
            return "nvidia-smi lists no GPU"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return "nvidia-smi failed: %s" % exc
    if not gpu_offload_supported():
        return ("llama-cpp-python was built without GPU offload; reinstall it with "
                "CMAKE_ARGS=-DGGML_CUDA=on")
    return None


def available():
    return unavailable_reason() is None


def devices():
    try:
        rows = _smi(_QUERY)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [{"index": int(i), "name": name, "memory_total_mb": int(total), "memory_free_mb": int(free)}
            for i, name, total, free in rows]


def preflight(need_mb, device):
    gpus = devices()
    if not 0 <= device < len(gpus):
        raise BackendError("DEVICE_NOT_FOUND", "CUDA device %s not found" % device,
                           {"requested": device, "devices": len(gpus), "backend": "cuda"},
                           "Use --device 0..%d" % (len(gpus) - 1) if gpus else "This node has no CUDA device")
    free = gpus[device]["memory_free_mb"]
    if free < need_mb:
        raise BackendError("VRAM_EXHAUSTED", "Not enough VRAM on CUDA device %d: need %d MB, %d MB free"
                           % (device, need_mb, free), {"required_mb": need_mb, "available_mb": free, "device": device},
                           "Stop other GPU programs, use another --device, or a smaller model")
    # (no RAM check: `need_mb` is the card's -- weights, KV cache, compute buffers --, and the file
    # reaches it through the page cache, which the kernel gives back)


def load(model_path, device, n_ctx, **opts):
    import llama_cpp
    return llama(model_path, n_ctx, **dict({"n_gpu_layers": -1, "main_gpu": device,
                                           "split_mode": llama_cpp.LLAMA_SPLIT_MODE_NONE}, **opts))


def memory_used_mb(device):
    """This process's memory on the GPU (falls back to the device's used memory)."""
    try:
        for pid, used in _smi(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                               "--format=csv,noheader,nounits", "-i", str(device)]):
            if int(pid) == os.getpid():
                return int(used)
        gpu = devices()[device]
        return gpu["memory_total_mb"] - gpu["memory_free_mb"]
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return 0


def describe(device):
    gpus = devices()
    return "CUDA device %d (%s)" % (device, gpus[device]["name"] if device < len(gpus) else "?")
