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


def _declare(lib, prototypes):
    """Give each (name, result type, argument types) of `prototypes` to that function of `lib`."""
    for name, res, args in prototypes:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


def _ggml():
    """libggml (the one llama_cpp loaded), with the prototypes used here."""
    global _lib
    if _lib is None:
        import llama_cpp
        lib = ctypes.CDLL(_library(llama_cpp, "libggml"))
        p = ctypes.c_void_p
        _declare(lib, (("ggml_backend_reg_by_name", p, [ctypes.c_char_p]),
                       ("ggml_backend_reg_get_proc_address", p, [p, ctypes.c_char_p]),
                       ("ggml_backend_register", None, [p]),
                       ("ggml_backend_dev_count", ctypes.c_size_t, []),
                       ("ggml_backend_dev_get", p, [ctypes.c_size_t]),
                       ("ggml_backend_dev_type", ctypes.c_int, [p]),
                       ("ggml_backend_dev_memory", None, [p, ctypes.POINTER(ctypes.c_size_t),
                                                          ctypes.POINTER(ctypes.c_size_t)])))
        base = ctypes.CDLL(_library(llama_cpp, "libggml-base"))
        for name in ("ggml_version", "ggml_commit"):
            getattr(base, name).restype = ctypes.c_char_p
        lib.base = base
        _lib = lib
    return _lib


def _library(llama_cpp, name):
    """The file of ggml's library `name` that libllama itself loaded, by its soname first: a wheel
    holds copies, not links (libggml.so beside libggml.so.0), and a copy opened by another name
    is another ggml, whose registry llama.cpp never sees (its devices would be registered in vain)."""
    folder = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    for candidate in (name + ".so.0", name + ".0.dylib", name + ".so", name + ".dylib"):
        if os.path.exists(os.path.join(folder, candidate)):
            return os.path.join(folder, candidate)
    return os.path.join(folder, name + ".so")


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


def serve(endpoint, dev, threads, cache_dir=None):
    """Serve `dev` at "host:port" until the process ends (this call does not return). With
    `cache_dir`, ggml keeps every large weight tensor (over 10 MiB) a client sends there, named by
    its FNV-1a hash, and a client that offers that hash later sends no data for it."""
    start = _proc("ggml_backend_rpc_start_server", None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                  ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p))
    devices = (ctypes.c_void_p * 1)(dev)
    start(endpoint.encode(), cache_dir.encode() if cache_dir else None, threads, 1, devices)


def add_servers(endpoints):
    """Register remote devices ("host:port" each) before a model loads: they count as GPUs."""
    add = _proc("ggml_backend_rpc_add_server", ctypes.c_void_p, ctypes.c_char_p)
    for endpoint in endpoints:
        reg = add(endpoint.encode())
        if not reg:
            raise OSError("cannot reach the RPC server at %s" % endpoint)
        _ggml().ggml_backend_register(reg)


HASH_THRESHOLD = 10 << 20   # ggml-rpc.cpp: a weight over this goes by its hash first, its bytes if the server lacks it
GGML_TYPE_I8, BUFFER_USAGE_WEIGHTS = 24, 1


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def seed(endpoint, gguf_path):
    """Fill the tensor cache of the RPC server at `endpoint` from a GGUF on its own node: every
    tensor over HASH_THRESHOLD is set once, through ggml's own client, in a weights buffer on that
    server; the client hashes it (FNV-1a, in C), the server lacks it and keeps it under that hash.
    A split's primary then sends those tensors' hashes only. One tensor at a time: the server
    holds a buffer of the largest, never the model. Returns (tensors, bytes)."""
    import gguf
    import numpy
    import llama_cpp
    big = [t for t in gguf.GGUFReader(gguf_path).tensors if int(t.n_bytes) > HASH_THRESHOLD]
    if not big:
        return 0, 0
    p, size = ctypes.c_void_p, ctypes.c_size_t
    base, rpclib = _ggml().base, ctypes.CDLL(_library(llama_cpp, "libggml-rpc"))
    _declare(rpclib, (("ggml_backend_rpc_init", p, [ctypes.c_char_p, ctypes.c_uint32]),))
    _declare(base, (("ggml_backend_alloc_buffer", p, [p, size]),
                    ("ggml_backend_buffer_set_usage", None, [p, ctypes.c_int]),
                    ("ggml_backend_buffer_get_base", p, [p]),
                    ("ggml_backend_buffer_free", None, [p]),
                    ("ggml_backend_free", None, [p]),
                    ("ggml_tensor_overhead", size, []),
                    ("ggml_init", p, [_InitParams]),
                    ("ggml_free", None, [p]),
                    ("ggml_new_tensor_1d", p, [p, ctypes.c_int, ctypes.c_int64]),
                    ("ggml_backend_tensor_alloc", ctypes.c_int, [p, p, p]),
                    ("ggml_backend_tensor_set", None, [p, p, size, size])))
    backend = rpclib.ggml_backend_rpc_init(endpoint.encode(), 0)
    if not backend:
        raise OSError("cannot reach the RPC server at %s" % endpoint)
    largest = max(int(t.n_bytes) for t in big)
    buffer = base.ggml_backend_alloc_buffer(backend, largest + 4096)
    if not buffer:
        base.ggml_backend_free(backend)
        raise OSError("the RPC server at %s has no room for a %d-byte tensor" % (endpoint, largest))
    base.ggml_backend_buffer_set_usage(buffer, BUFFER_USAGE_WEIGHTS)
    sent = 0
    try:
        for tensor in big:
            ctx = base.ggml_init(_InitParams(base.ggml_tensor_overhead(), None, True))
            try:
                t = base.ggml_new_tensor_1d(ctx, GGML_TYPE_I8, int(tensor.n_bytes))
                if base.ggml_backend_tensor_alloc(buffer, t, base.ggml_backend_buffer_get_base(buffer)) != 0:
                    raise OSError("cannot place tensor %s in the RPC server's buffer" % tensor.name)
                data = numpy.ascontiguousarray(tensor.data).view(numpy.uint8)
                base.ggml_backend_tensor_set(t, data.ctypes.data, 0, int(tensor.n_bytes))
                sent += int(tensor.n_bytes)
            finally:
                base.ggml_free(ctx)
    finally:
        base.ggml_backend_buffer_free(buffer)
        base.ggml_backend_free(backend)
    return len(big), sent
