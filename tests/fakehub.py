"""A small local Hugging Face Hub endpoint for the tests (standard library only).

Point the real ``huggingface_hub`` client at it with ``HF_ENDPOINT=hub.url`` (and ``HF_HOME`` set to
a temporary directory).  It serves, for the repos and files registered with :meth:`FakeHub.add_file`:

- ``HEAD``/``GET /{repo}/resolve/{revision}/{path}``: 200 (or 206 for ``Range: bytes=N-``/``N-M``/``-K``,
  416 past the end) with ``X-Repo-Commit``, ``ETag`` (the sha256 for LFS files, the git blob sha1
  otherwise), ``Content-Length`` and ``Accept-Ranges``.  Never any ``X-Xet-*`` header.
- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: ``id``, ``sha``, ``siblings``
  (with ``size``/``blobId``/``lfs`` when the client asks ``?blobs=true``, as ``files_metadata=True`` does).
- ``GET /api/models/{repo}/tree/{rev}[/{dir}]?recursive=..``: ``list_repo_tree``'s JSON, one page, no
  ``Link`` header.
- ``POST /api/models/{repo}/paths-info/{rev}``: ``get_paths_info``'s JSON.
- Unknown repo / revision / file: 404 with ``X-Error-Code: RepoNotFound | RevisionNotFound |
  EntryNotFound``.  :meth:`FakeHub.set_repo_status` makes a repo answer 401/403 (``GatedRepo``), 404
  (``RepoNotFound``) or any other status to every request.

Revisions accepted: ``"main"`` and the repo's fixed fake commit sha (``FakeHub.commit(repo_id)``).

Failure injection applies to successful GETs of one file's resolve URL (never to HEAD):
:meth:`drop_after`, :meth:`throttle`, :meth:`corrupt`.

Usage::

    with FakeHub().start() as hub:
        hub.add_file("org/repo", "model.gguf", path="/some/file.gguf")
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        ...
        assert hub.file_gets("org/repo", "model.gguf")[-1]["range"] == "bytes=1000-"
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from urllib.parse import parse_qs, unquote

__all__ = ["FakeHub"]

_READ_CHUNK = 64 * 1024
_CORRUPT_EVERY = 1024 * 1024  # corrupt() flips the first byte sent, and every byte at an offset multiple of this
_FAKE_DATE = "2024-01-01T00:00:00.000Z"
_LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {size}\n"


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Entry:
    """One file of a repo: its bytes (in memory or on disk) and its hashes."""

    def __init__(self, filename, path=None, data=None, lfs=True):
        if (path is None) == (data is None):
            raise ValueError("add_file needs exactly one of path= or data=")
        self.filename = filename
        self.path = os.fspath(path) if path is not None else None
        self.data = bytes(data) if data is not None else None
        self.lfs = lfs
        if self.data is not None:
            self.size = len(self.data)
            self.sha256 = hashlib.sha256(self.data).hexdigest()
            git_sha1 = _git_blob_sha1(self.data) if not lfs else None
        else:
            self.size = os.stat(self.path).st_size
            sha256 = hashlib.sha256()
            sha1 = hashlib.sha1(b"blob %d\0" % self.size) if not lfs else None
            with open(self.path, "rb") as f:
                while True:
                    block = f.read(1024 * 1024)
                    if not block:
                        break
                    sha256.update(block)
                    if sha1 is not None:
                        sha1.update(block)
            self.sha256 = sha256.hexdigest()
            git_sha1 = sha1.hexdigest() if sha1 is not None else None
        if lfs:
            pointer = _LFS_POINTER.format(sha=self.sha256, size=self.size).encode()
            self.pointer_size = len(pointer)
            self.blob_id = _git_blob_sha1(pointer)  # what the Hub calls "oid" for an LFS file
            self.etag = self.sha256
        else:
            self.pointer_size = None
            self.blob_id = git_sha1
            self.etag = git_sha1

    def tree_entry(self):
        entry = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.filename}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry

    def sibling(self, blobs):
        sib = {"rfilename": self.filename}
        if blobs:
            sib["size"] = self.size
            sib["blobId"] = self.blob_id
            if self.lfs:
                sib["lfs"] = {"sha256": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return sib


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def server_bind(self):
        # HTTPServer.server_bind calls socket.getfqdn(), which can stall on a sandbox's DNS.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = host
        self.server_port = port

    def handle_error(self, request, client_address):
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
            return  # clients that go away are part of the tests
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"

    def version_string(self):
        return self.server_version
    disable_nagle_algorithm = True

    # -- plumbing ---------------------------------------------------------------------------------

    @property
    def hub(self) -> "FakeHub":
        return self.server.hub  # type: ignore[attr-defined]

    def setup(self):
        super().setup()
        self.hub._track(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.hub._track(self.connection, False)

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr logging
        pass

    def _record(self, **extra):
        rec = {
            "method": self.command,
            "path": self.path,
            "range": self.headers.get("Range"),
            "time": time.time(),
            "monotonic": time.monotonic(),
            "headers": dict(self.headers.items()),
            "repo_id": None,
            "filename": None,
            "status": None,
        }
        rec.update(extra)
        self.hub._append_request(rec)
        return rec

    def _read_request_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length:
            try:
                return self.rfile.read(int(length))
            except ValueError:
                pass
        return b""

    def _send(self, status, body=b"", headers=None, content_type="application/json"):
        self._rec["status"] = status
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, obj, status=200, headers=None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _send_error(self, status, error_code=None, message=None):
        headers = {}
        if error_code:
            headers["X-Error-Code"] = error_code
        if message:
            headers["X-Error-Message"] = message
        self._send_json({"error": message or error_code or f"HTTP {status}"}, status, headers)

    # -- dispatch ---------------------------------------------------------------------------------

    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def _dispatch_other(self):
        self._rec = self._record()
        self._read_request_body()
        self._send_error(405, message="Method not allowed")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch_other

    def _dispatch(self):
        self._rec = self._record()
        try:
            body = self._read_request_body()
            raw_path, _, query = self.path.partition("?")
            segments = raw_path.split("/")[1:]
            if segments and segments[0] == "api":
                self._api(segments[1:], parse_qs(query), body)
            elif "resolve" in segments:
                self._resolve(segments)
            else:
                self._send_error(404, message="Not found")
        except (ConnectionError, TimeoutError, OSError):
            self.close_connection = True

    # -- repo lookup ------------------------------------------------------------------------------

    def _split_repo(self, segments):
        """(repo_id, rest) from raw path segments, preferring registered repo ids."""
        known = self.hub._known_repos()
        if len(segments) >= 2 and unquote(segments[0]) + "/" + unquote(segments[1]) in known:
            return unquote(segments[0]) + "/" + unquote(segments[1]), segments[2:]
        if segments and unquote(segments[0]) in known:
            return unquote(segments[0]), segments[1:]
        if len(segments) >= 2:
            return unquote(segments[0]) + "/" + unquote(segments[1]), segments[2:]
        return (unquote(segments[0]) if segments else ""), []

    def _repo_or_error(self, repo_id):
        """The repo's files dict, or None after sending the error response."""
        self._rec["repo_id"] = repo_id
        state = self.hub._repo_state(repo_id)
        if state is None:
            self._send_error(404, "RepoNotFound", "Repository not found")
            return None
        status = state["status"]
        if status is not None and status != 200:
            if status in (401, 403):
                self._send_error(status, "GatedRepo", "Access to this repo is restricted")
            elif status == 404:
                self._send_error(404, "RepoNotFound", "Repository not found")
            else:
                self._send_error(status, message=f"Injected status {status}")
            return None
        return state["files"]

    def _check_revision(self, repo_id, revision):
        if revision in ("main", self.hub.commit(repo_id)):
            return True
        self._send_error(404, "RevisionNotFound", "Invalid rev id: " + revision)
        return False

    # -- /api -------------------------------------------------------------------------------------

    def _api(self, segments, query, body):
        if not segments or segments[0] != "models":
            if segments and segments[0] in ("datasets", "spaces", "kernels"):
                self._send_error(404, "RepoNotFound", "Repository not found")
            else:
                self._send_error(404, message="Not found")
            return
        repo_id, rest = self._split_repo(segments[1:])
        files = self._repo_or_error(repo_id)
        if files is None:
            return
        commit = self.hub.commit(repo_id)
        if not rest or rest == [""]:
            return self._model_info(repo_id, files, query)
        kind = rest[0]
        if kind == "revision" and len(rest) >= 2:
            if self._check_revision(repo_id, unquote("/".join(rest[1:]))):
                self._model_info(repo_id, files, query)
            return
        if kind == "tree" and len(rest) >= 2:
            if not self._check_revision(repo_id, unquote(rest[1])):
                return
            folder = unquote("/".join(rest[2:])).strip("/")
            recursive = query.get("recursive", ["false"])[-1].lower() in ("1", "true", "yes")
            listing = self._tree(files, folder, recursive, commit)
            if listing is None:
                self._send_error(404, "EntryNotFound", f"{folder} does not exist on \"{rest[1]}\"")
            else:
                self._send_json(listing)
            return
        if kind == "paths-info" and len(rest) >= 2 and self.command == "POST":
            if not self._check_revision(repo_id, unquote(rest[1])):
                return
            paths = self._paths_from_body(body)
            out = []
            for p in paths:
                p = p.strip("/")
                if p in files:
                    out.append(files[p].tree_entry())
                elif any(name.startswith(p + "/") for name in files):
                    out.append({"type": "directory", "oid": _folder_oid(commit, p), "size": 0, "path": p})
            self._send_json(out)
            return
        self._send_error(404, message="Not found")

    def _paths_from_body(self, body):
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            try:
                paths = json.loads(body or b"{}").get("paths", [])
            except (ValueError, AttributeError):
                paths = []
        else:
            paths = parse_qs(body.decode("utf-8", "replace")).get("paths", [])
        return [paths] if isinstance(paths, str) else list(paths)

    def _model_info(self, repo_id, files, query):
        blobs = query.get("blobs", ["false"])[-1].lower() in ("1", "true", "yes")
        entries = [files[name] for name in sorted(files)]
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None,
            "sha": self.hub.commit(repo_id),
            "lastModified": _FAKE_DATE,
            "createdAt": _FAKE_DATE,
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": ["gguf"] if any(n.endswith(".gguf") for n in files) else [],
            "library_name": None,
            "siblings": [e.sibling(blobs) for e in entries],
        }
        if blobs:
            info["usedStorage"] = sum(e.size for e in entries)
        self._send_json(info)

    def _tree(self, files, folder, recursive, commit):
        prefix = folder + "/" if folder else ""
        if folder and folder in files:
            return None  # a file, not a folder
        names = sorted(n for n in files if n.startswith(prefix))
        if folder and not names:
            return None
        out, seen_dirs = [], set()
        for name in names:
            rel = name[len(prefix):]
            parts = rel.split("/")
            # every intermediate directory is listed (recursive), or only the first level (not)
            dir_levels = range(1, len(parts)) if recursive else range(1, min(2, len(parts)))
            for i in dir_levels:
                d = prefix + "/".join(parts[:i])
                if d not in seen_dirs:
                    seen_dirs.add(d)
                    out.append({"type": "directory", "oid": _folder_oid(commit, d), "size": 0, "path": d})
            if recursive or len(parts) == 1:
                out.append(files[name].tree_entry())
        return out

    # -- /resolve ---------------------------------------------------------------------------------

    def _resolve(self, segments):
        i = segments.index("resolve")
        repo_segments = segments[:i]
        if not 1 <= len(repo_segments) <= 2 or len(segments) < i + 3:
            self._rec["repo_id"] = "/".join(unquote(s) for s in repo_segments)
            self._send_error(404, "RepoNotFound", "Repository not found")
            return
        repo_id = "/".join(unquote(s) for s in repo_segments)
        revision = unquote(segments[i + 1])
        filename = unquote("/".join(segments[i + 2:]))
        self._rec["filename"] = filename
        files = self._repo_or_error(repo_id)
        if files is None:
            return
        if not self._check_revision(repo_id, revision):
            return
        entry = files.get(filename)
        if entry is None:
            self._send_error(404, "EntryNotFound", "Entry not found")
            return

        size = entry.size
        start, end = 0, size - 1
        status = 200
        rng = self.headers.get("Range") if self.command == "GET" else None
        if rng is not None:
            parsed = _parse_range(rng, size)
            if parsed == "unsatisfiable":
                self._send_json({"error": "Range Not Satisfiable"}, 416, {"Content-Range": f"bytes */{size}"})
                return
            if parsed is not None:
                start, end = parsed
                status = 206
        length = max(end - start + 1, 0)

        headers = {
            "X-Repo-Commit": self.hub.commit(repo_id),
            "ETag": f'"{entry.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{os.path.basename(filename)}"',
        }
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._rec["status"] = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            return
        drop_at, corrupt, bps = self.hub._take_faults(repo_id, filename)
        self._rec["faults"] = {"drop_after": drop_at, "corrupt": corrupt, "bytes_per_sec": bps}
        self._send_body(entry, repo_id, start, length, drop_at, corrupt, bps)

    def _send_body(self, entry, repo_id, start, length, drop_at, corrupt, bps):
        key = (repo_id, entry.filename)
        chunk_size = _READ_CHUNK
        if bps:
            chunk_size = max(1, min(_READ_CHUNK, int(bps) // 20 or 1))
        f = open(entry.path, "rb") if entry.path is not None else None
        sent = 0
        t0 = time.monotonic()
        complete = True
        try:
            if f is not None:
                f.seek(start)
            while sent < length:
                if self.hub._stopping.is_set():
                    complete = False
                    break
                n = min(chunk_size, length - sent)
                if drop_at is not None:
                    n = min(n, drop_at - sent)
                    if n <= 0:
                        complete = False
                        break
                if f is not None:
                    buf = f.read(n)
                    if len(buf) != n:  # file shrank on disk: cannot keep the promise, cut
                        complete = False
                        if buf:
                            self.wfile.write(buf)
                            self.hub._add_sent(key, len(buf))
                        break
                else:
                    buf = entry.data[start + sent:start + sent + n]
                if corrupt:
                    buf = _flip(buf, start + sent, first=(sent == 0))
                self.wfile.write(buf)
                sent += n
                self.hub._add_sent(key, n)
                self._rec["body_sent"] = sent
                if bps:
                    delay = t0 + sent / float(bps) - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
        finally:
            if f is not None:
                f.close()
        if not complete:
            self._rec["dropped"] = True
            self.close_connection = True
            try:
                self.wfile.flush()
            except OSError:
                pass
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _folder_oid(commit, path):
    return hashlib.sha1(f"tree:{commit}:{path}".encode()).hexdigest()


def _flip(buf, abs_offset, first):
    b = bytearray(buf)
    if first and b:
        b[0] ^= 0xFF
    # every absolute offset that is a multiple of _CORRUPT_EVERY inside this chunk
    k = (-abs_offset) % _CORRUPT_EVERY
    while k < len(b):
        if not (first and k == 0):
            b[k] ^= 0xFF
        k += _CORRUPT_EVERY
    return bytes(b)


def _parse_range(value, size):
    """(start, end) inclusive, None to ignore the header (answer 200), or "unsatisfiable"."""
    value = value.strip()
    if not value.startswith("bytes=") or "," in value:
        return None
    spec = value[len("bytes="):].strip()
    first, sep, last = spec.partition("-")
    if not sep:
        return None
    try:
        if first == "":
            if last == "":
                return None
            n = int(last)
            if n <= 0 or size == 0:
                return "unsatisfiable"
            return max(size - n, 0), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start < 0 or (last and end < start):
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


class FakeHub:
    """A local Hub endpoint; see the module docstring."""

    def __init__(self, host="127.0.0.1", port=0):
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._repos = {}  # repo_id -> {"files": {filename: _Entry}, "status": int | None}
        self._faults = {}  # (repo_id, filename) -> {"drop": [nbytes, times], "bps": int, "corrupt": times}
        self._sent = {}  # (repo_id, filename) -> body bytes sent
        self._conns = set()
        self._stopping = threading.Event()
        self._server = None
        self._thread = None
        self.requests = []

    # -- content ----------------------------------------------------------------------------------

    def add_file(self, repo_id, filename, path=None, data=None, lfs=True):
        """Serve ``data`` (bytes) or the file at ``path`` (streamed from disk) as ``repo_id/filename``.

        ``lfs=False`` serves it as a plain git file (ETag is the git blob sha1, no ``lfs`` in the
        tree), like a small README on the real Hub.  Adding a filename again replaces it.
        """
        filename = filename.strip("/")
        entry = _Entry(filename, path=path, data=data, lfs=lfs)
        with self._lock:
            repo = self._repos.setdefault(repo_id, {"files": {}, "status": None})
            repo["files"][filename] = entry
        return entry

    def remove_file(self, repo_id, filename):
        with self._lock:
            self._repos.get(repo_id, {"files": {}})["files"].pop(filename, None)

    def set_repo_status(self, repo_id, status):
        """401/403 -> that status with ``X-Error-Code: GatedRepo``; 404 -> ``RepoNotFound``; any other
        non-200 status is answered as is; None/200 -> normal again.  Applies to every URL of the repo."""
        with self._lock:
            repo = self._repos.setdefault(repo_id, {"files": {}, "status": None})
            repo["status"] = status

    @staticmethod
    def commit(repo_id) -> str:
        """The repo's fixed fake commit sha (40 hex)."""
        return hashlib.sha1(f"fakehub-commit:{repo_id}".encode()).hexdigest()

    def sha256(self, repo_id, filename) -> str:
        with self._lock:
            return self._repos[repo_id]["files"][filename].sha256

    # -- failure injection ------------------------------------------------------------------------

    def _fault(self, repo_id, filename):
        return self._faults.setdefault((repo_id, filename), {"drop": None, "bps": None, "corrupt": 0})

    def drop_after(self, repo_id, filename, nbytes, times=1):
        """The next ``times`` GETs (None: all) send ``nbytes`` of the body, then close the connection.

        ``nbytes`` counts from the start of that response's body (so from the Range start)."""
        with self._lock:
            self._fault(repo_id, filename)["drop"] = [int(nbytes), times]

    def throttle(self, repo_id, filename, bytes_per_sec):
        """Write the body of every GET at about ``bytes_per_sec``; 0/None turns it off."""
        with self._lock:
            self._fault(repo_id, filename)["bps"] = bytes_per_sec or None

    def corrupt(self, repo_id, filename, times=1):
        """The next ``times`` GETs (None: all) send the same length with some bytes flipped."""
        with self._lock:
            self._fault(repo_id, filename)["corrupt"] = times

    def reset_faults(self):
        """Clear drop_after/throttle/corrupt (repo statuses are kept)."""
        with self._lock:
            self._faults.clear()

    def _take_faults(self, repo_id, filename):
        with self._lock:
            fault = self._faults.get((repo_id, filename))
            if not fault:
                return None, False, None
            drop_at = None
            if fault["drop"] is not None:
                nbytes, times = fault["drop"]
                if times is None or times > 0:
                    drop_at = nbytes
                    if times is not None:
                        fault["drop"][1] = times - 1
            corrupt = False
            times = fault["corrupt"]
            if times is None or times > 0:
                corrupt = True
                if times is not None:
                    fault["corrupt"] = times - 1
            return drop_at, corrupt, fault["bps"]

    # -- observation ------------------------------------------------------------------------------

    def _append_request(self, rec):
        with self._lock:
            self.requests.append(rec)

    def _add_sent(self, key, n):
        with self._lock:
            self._sent[key] = self._sent.get(key, 0) + n

    def file_gets(self, repo_id, filename) -> list:
        """The GET (not HEAD) requests of that file's resolve URL, in order."""
        filename = filename.strip("/")
        with self._lock:
            return [
                r for r in self.requests
                if r["method"] == "GET" and r["repo_id"] == repo_id and r["filename"] == filename
            ]

    def bytes_sent(self, repo_id, filename) -> int:
        """Body bytes written for that file so far, over all GETs."""
        with self._lock:
            return self._sent.get((repo_id, filename.strip("/")), 0)

    # -- internals for the handler -----------------------------------------------------------------

    def _known_repos(self):
        with self._lock:
            return set(self._repos)

    def _repo_state(self, repo_id):
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                return None
            return {"files": dict(repo["files"]), "status": repo["status"]}

    def _track(self, conn, add):
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub not started")
        host, port = self._server.server_address[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"

    def start(self):
        if self._server is not None:
            return self
        server_cls = _Server
        if ":" in self._host:
            server_cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        self._stopping.clear()
        self._server = server_cls((self._host, self._port), _Handler)
        self._server.hub = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fakehub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self):
        server = self._server
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # keep-alive connections would otherwise keep being served
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False
