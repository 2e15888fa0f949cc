"""A small Hub on 127.0.0.1 for tests: the endpoints huggingface_hub (2.4) uses to push and download.

There is no Hub here, and no PyPI package provides a usable mock, so this speaks the protocol
itself (see ../shared/DESIGN.md, "Ecosystem facts"): the real huggingface_hub client, transformers
and PEFT run unchanged against it once ``HF_ENDPOINT`` points here (set before they are imported,
with ``HF_HUB_DISABLE_XET=1``). Files are kept in memory; every request is logged, and one the
server does not know is answered 404 and recorded in ``unhandled`` so a test can fail on it.

    hub = LocalHub().start()
    ... HF_ENDPOINT=hub.url ...
    hub.files["org/name"]["README.md"]  # bytes
    hub.stop()

From a shell (docs/hub.md): ``python tests/hub_server.py --port 8765`` serves until stopped.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

REPO = r"(?P<repo>[\w.\-]+/[\w.\-]+)"
ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/models/{REPO}(/revision/(?P<rev>[^/]+))?$"), "model_info"),
    ("HEAD", re.compile(rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("GET", re.compile(rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


class LocalHub:
    """An in-memory model Hub with one branch (main) per repo."""

    def __init__(self, namespace: str = "test-user"):
        self.namespace = namespace
        self.files: dict[str, dict[str, bytes]] = {}  # repo -> path -> content
        self.heads: dict[str, str] = {}  # repo -> commit sha of main
        self.commits: list[dict] = []  # {"repo", "summary", "paths", "oid"}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.yaml_checks: list[dict] = []
        self._lock = threading.Lock()
        self._server = None
        self._thread = None

    # ------------------------------------------------------------------------------------------
    # lifecycle

    def start(self, port: int = 0) -> "LocalHub":
        """Serve on 127.0.0.1:``port`` (0: a free port) in a daemon thread."""
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub._dispatch(self, "GET")

            def do_HEAD(self):
                hub._dispatch(self, "HEAD")

            def do_POST(self):
                hub._dispatch(self, "POST")

            def do_PUT(self):
                hub._dispatch(self, "PUT")

            def log_message(self, *args):  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # ------------------------------------------------------------------------------------------
    # plumbing

    def _dispatch(self, request: BaseHTTPRequestHandler, method: str) -> None:
        path = urlsplit(request.path).path
        with self._lock:
            self.requests.append((method, path))
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        for route_method, pattern, handler in ROUTES:
            match = pattern.match(path)
            if route_method == method and match:
                groups = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                try:
                    getattr(self, handler)(request, method, body, **groups)
                except Exception as error:  # a bug in the test server: say so to the client
                    self._reply(request, 500, {"error": f"test hub: {error!r}"})
                return
        with self._lock:
            self.unhandled.append((method, path))
        self._reply(request, 404, {"error": f"test hub has no route {method} {path}"}, error_code="RepoNotFound")

    @staticmethod
    def _reply(request, status: int, payload=None, headers: dict | None = None, error_code: str | None = None,
               raw: bytes | None = None, head: bool = False) -> None:
        body = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        request.send_header("Content-Length", str(len(body)))
        if error_code:
            request.send_header("X-Error-Code", error_code)
            request.send_header("X-Error-Message", str((payload or {}).get("error", error_code)))
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.end_headers()
        if not head:
            request.wfile.write(body)

    def put_folder(self, repo: str, folder) -> str:
        """Store every file of a local folder in ``repo`` as one commit, as a push would; return its oid."""
        from pathlib import Path

        files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        with self._lock:
            self.files.setdefault(repo, {}).update(files)
            return self._new_commit(repo, f"upload {len(files)} files", sorted(files))

    def _new_commit(self, repo: str, summary: str, paths: list[str]) -> str:
        oid = hashlib.sha1(f"{repo}:{len(self.commits)}:{summary}".encode()).hexdigest()
        self.heads[repo] = oid
        self.commits.append({"repo": repo, "summary": summary, "paths": paths, "oid": oid})
        return oid

    # ------------------------------------------------------------------------------------------
    # endpoints

    def create_repo(self, request, method, body):
        payload = json.loads(body or b"{}")
        name = payload["name"]
        repo = name if "/" in name else f"{payload.get('organization') or self.namespace}/{name}"
        with self._lock:
            if repo not in self.files:
                self.files[repo] = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
                self._new_commit(repo, "initial commit", [".gitattributes"])
        self._reply(request, 200, {"url": f"{self.url}/{repo}", "name": repo})

    def validate_yaml(self, request, method, body):
        payload = json.loads(body or b"{}")
        content = payload.get("content", "")  # the whole README: check its front matter
        front = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        try:
            data = yaml.safe_load(front.group(1) if front else "") or {}
        except yaml.YAMLError as error:
            self._reply(request, 400, {"error": f"invalid YAML: {error}"})
            return
        self.yaml_checks.append(data)
        self._reply(request, 200, {"errors": [], "warnings": []})

    def preupload(self, request, method, body, repo, rev):
        if repo not in self.files:
            self._reply(request, 404, {"error": f"no repo {repo}"}, error_code="RepoNotFound")
            return
        files = json.loads(body or b"{}").get("files", [])
        # "regular" for every file: no LFS, no Xet, the content travels inside the commit
        answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
        self._reply(request, 200, {"files": answer, "commitOid": self.heads[repo]})

    def commit(self, request, method, body, repo, rev):
        if repo not in self.files:
            self._reply(request, 404, {"error": f"no repo {repo}"}, error_code="RepoNotFound")
            return
        summary, paths = "", []
        with self._lock:
            for line in body.decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    summary = value.get("summary", "")
                elif key == "file":
                    if value.get("encoding") != "base64":
                        raise ValueError(f"unexpected encoding {value.get('encoding')!r}")
                    self.files[repo][value["path"]] = base64.b64decode(value["content"])
                    paths.append(value["path"])
                elif key == "deletedFile":
                    self.files[repo].pop(value["path"], None)
                else:  # lfsFile etc.: never asked for, since preupload answers "regular"
                    raise ValueError(f"unexpected commit operation {key!r}")
            oid = self._new_commit(repo, summary, paths)
        self._reply(request, 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "success": True})

    def model_info(self, request, method, body, repo, rev="main"):
        if repo not in self.files:
            self._reply(request, 404, {"error": f"no repo {repo}"}, error_code="RepoNotFound")
            return
        siblings = [{"rfilename": path} for path in sorted(self.files[repo])]
        self._reply(request, 200, {"id": repo, "modelId": repo, "sha": self.heads[repo], "siblings": siblings,
                                   "private": False, "tags": []})

    def resolve(self, request, method, body, repo, rev, path):
        head = method == "HEAD"
        if repo not in self.files:
            self._reply(request, 404, {"error": f"no repo {repo}"}, error_code="RepoNotFound", head=head)
            return
        content = self.files[repo].get(path)
        commit = {"X-Repo-Commit": self.heads[repo]}
        if content is None:
            self._reply(request, 404, {"error": f"{path} not in {repo}"}, headers=commit,
                        error_code="EntryNotFound", head=head)
            return
        etag = '"' + hashlib.sha256(content).hexdigest() + '"'
        self._reply(request, 200, raw=content, headers={**commit, "ETag": etag}, head=head)


def main(argv=None) -> None:
    """Serve the local Hub in the foreground, for the client command in docs/hub.md; Ctrl-C (or kill) stops it."""
    import argparse
    import signal
    import time

    parser = argparse.ArgumentParser(description="A local, in-memory model Hub on 127.0.0.1 (for tests).")
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: a free one)")
    args = parser.parse_args(argv)

    def stop_on_sigterm(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_sigterm)  # `kill` stops it as Ctrl-C does
    hub = LocalHub().start(args.port)
    print(f"local Hub at {hub.url} (HF_ENDPOINT={hub.url}); Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()
        print(f"served {len(hub.requests)} requests, {len(hub.unhandled)} unknown: {hub.unhandled}", flush=True)


if __name__ == "__main__":
    main()
