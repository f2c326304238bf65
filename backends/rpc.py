"""ggml's RPC backend, through ctypes: a node serves one of its devices to a split worker, and the
split worker registers the remote devices before it loads the model (as llama.cpp's own
common/arg.cpp does for `--rpc`), so that the model's offloaded layers spread over them.

Not an adapter (it is in no backend's PREFERENCE): it needs llama-cpp-python built with
GGML_RPC=on (the Makefile and `nodes install` build it so). The RPC protocol has no
authentication: rbee binds a server to the one interface that faces its primary, only for the
life of the split (docs/PROTOCOL.md §14).
"""
import ctypes
import os

DEVICE_TYPE_CPU, DEVICE_TYPE_GPU = 0, 1   # enum ggml_backend_dev_type

_lib = None


def _ggml():
    """libggml (the one llama_cpp loaded), with the prototypes used here."""
    global _lib
    if _lib is None:
        import llama_cpp
        lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml.so"))
        p = ctypes.c_void_p
        for name, res, args in (("ggml_backend_reg_by_name", p, [ctypes.c_char_p]),
                                ("ggml_backend_reg_get_proc_address", p, [p, ctypes.c_char_p]),
                                ("ggml_backend_register", None, [p]),
                                ("ggml_backend_dev_count", ctypes.c_size_t, []),
                                ("ggml_backend_dev_get", p, [ctypes.c_size_t]),
                                ("ggml_backend_dev_type", ctypes.c_int, [p]),
                                ("ggml_backend_dev_memory", None, [p, ctypes.POINTER(ctypes.c_size_t),
                                                                   ctypes.POINTER(ctypes.c_size_t)])):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        base = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
        for name in ("ggml_version", "ggml_commit"):
            getattr(base, name).restype = ctypes.c_char_p
        lib.base = base
        _lib = lib
    return _lib


def supported():
    """Whether this llama-cpp-python was built with the RPC backend."""
    try:
        import llama_cpp
        return bool(llama_cpp.llama_supports_rpc()) and bool(_ggml().ggml_backend_reg_by_name(b"RPC"))
    except (ImportError, OSError, AttributeError):
        return False


def build():
    """What must be the same on every part of a split: ggml's version and commit."""
    lib = _ggml()
    return "ggml %s (%s)" % (lib.base.ggml_version().decode(), lib.base.ggml_commit().decode())


def _proc(name, restype, *argtypes):
    reg = _ggml().ggml_backend_reg_by_name(b"RPC")
    address = _ggml().ggml_backend_reg_get_proc_address(reg, name.encode()) if reg else None
    if not address:
        raise OSError("this llama-cpp-python has no RPC backend (build it with CMAKE_ARGS=-DGGML_RPC=on)")
    return ctypes.CFUNCTYPE(restype, *argtypes)(address)


def device(backend, index):
    """The ggml device of rbee's (backend, device): the CPU, or the index-th GPU."""
    lib = _ggml()
    wanted = DEVICE_TYPE_CPU if backend == "cpu" else DEVICE_TYPE_GPU
    found = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())
             if lib.ggml_backend_dev_type(lib.ggml_backend_dev_get(i)) == wanted]
    if index >= len(found):
        raise OSError("no %s device %d among ggml's devices" % (backend, index))
    return found[index]


def free_mb(dev):
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    _ggml().ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return free.value >> 20


def serve(endpoint, dev, threads):
    """Serve `dev` at "host:port" until the process ends (this call does not return)."""
    start = _proc("ggml_backend_rpc_start_server", None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                  ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p))
    devices = (ctypes.c_void_p * 1)(dev)
    start(endpoint.encode(), None, threads, 1, devices)


def add_servers(endpoints):
    """Register remote devices ("host:port" each) before a model loads: they count as GPUs."""
    add = _proc("ggml_backend_rpc_add_server", ctypes.c_void_p, ctypes.c_char_p)
    for endpoint in endpoints:
        reg = add(endpoint.encode())
        if not reg:
            raise OSError("cannot reach the RPC server at %s" % endpoint)
        _ggml().ggml_backend_register(reg)
