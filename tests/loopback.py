"""A loopback HTTP server for the remote-read tests: files of one folder, honouring Range
requests (single and multi-range), counting the bytes it serves; optionally ignoring Range (a
server without range support), answering 403 for names starting with ``forbidden`` and 503 for
``busy``, and a STAC
API stub (``/stac/`` landing page and ``/stac/search``) returning the items it is given."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import parse_qs, urlparse


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(
        self,
        status: int,
        body: bytes,
        ctype: str = "application/octet-stream",
        extra: dict | None = None,
        head: bool = False,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client stopped reading
                return
            with self.server.lock:
                self.server.bytes_served += len(body)

    def _stac(self, query: dict, head: bool) -> None:
        base = f"http://127.0.0.1:{self.server.server_port}/stac"
        path = urlparse(self.path).path
        if path.rstrip("/") == "/stac":
            doc = {
                "type": "Catalog",
                "stac_version": "1.0.0",
                "id": "stub",
                "description": "stub",
                "conformsTo": [
                    "https://api.stacspec.org/v1.0.0/core",
                    "https://api.stacspec.org/v1.0.0/item-search",
                ],
                "links": [
                    {"rel": "self", "href": base + "/"},
                    {"rel": "root", "href": base + "/"},
                    {
                        "rel": "search",
                        "href": base + "/search",
                        "type": "application/geo+json",
                        "method": "GET",
                    },
                    {
                        "rel": "search",
                        "href": base + "/search",
                        "type": "application/geo+json",
                        "method": "POST",
                    },
                ],
            }
        else:
            self.server.searches.append(query)
            items = self.server.stac_items
            collections = query.get("collections")
            if collections:
                items = [i for i in items if i.get("collection") in collections]
            limit = int(query.get("limit") or query.get("max_items") or len(items) or 1)
            doc = {"type": "FeatureCollection", "features": items[:limit], "links": []}
        self._send(200, json.dumps(doc).encode(), "application/json", head=head)

    def _serve(self, head: bool = False, body: bytes | None = None) -> None:
        with self.server.lock:
            self.server.requests.append((self.command, self.path, self.headers.get("Range")))
        url = urlparse(self.path)
        if url.path.startswith("/stac"):
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            if body:
                query = json.loads(body)
            if isinstance(query.get("collections"), str):
                query["collections"] = query["collections"].split(",")
            return self._stac(query, head)
        name = url.path.lstrip("/")
        if name.startswith("forbidden"):
            return self._send(403, b"forbidden", "text/plain", head=head)
        if name.startswith("busy"):
            return self._send(503, b"busy", "text/plain", head=head)
        file = self.server.root / name
        if not file.is_file():
            return self._send(404, b"not found", "text/plain", head=head)
        data = file.read_bytes()
        ctype = "application/json" if file.suffix == ".json" else "image/tiff"
        rng = self.headers.get("Range")
        if not rng or not self.server.ranges:
            return self._send(200, data, ctype, head=head)
        spans = []
        for part in re.sub(r"^bytes=", "", rng).split(","):
            a, _, b = part.strip().partition("-")
            start = int(a) if a else len(data) - int(b)
            end = min(int(b), len(data) - 1) if (a and b) else len(data) - 1
            spans.append((start, end))
        if len(spans) == 1:
            start, end = spans[0]
            return self._send(
                206,
                data[start : end + 1],
                ctype,
                {"Content-Range": f"bytes {start}-{end}/{len(data)}", "Accept-Ranges": "bytes"},
                head,
            )
        boundary = "RANGEBOUNDARY"
        out = b""
        for start, end in spans:
            out += (
                (
                    f"--{boundary}\r\nContent-Type: {ctype}\r\nContent-Range: bytes "
                    f"{start}-{end}/{len(data)}\r\n\r\n"
                ).encode()
                + data[start : end + 1]
                + b"\r\n"
            )
        out += f"--{boundary}--\r\n".encode()
        self._send(206, out, f"multipart/byteranges; boundary={boundary}", head=head)

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self._serve(body=self.rfile.read(length))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # no tracebacks on stderr
        pass

    root: Path
    ranges: bool
    bytes_served: int
    requests: list
    searches: list
    stac_items: list
    lock: threading.Lock


class RangeServer:
    """``with RangeServer(folder) as srv: srv.url("scene.tif")``."""

    def __init__(self, root: Path, ranges: bool = True):
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.root, self.httpd.ranges = Path(root), ranges
        self.httpd.bytes_served, self.httpd.requests, self.httpd.searches = 0, [], []
        self.httpd.stac_items, self.httpd.lock = [], threading.Lock()
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_port

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    @property
    def bytes_served(self) -> int:
        return self.httpd.bytes_served

    @property
    def requests(self) -> list:
        return self.httpd.requests

    def reset(self) -> None:
        with self.httpd.lock:
            self.httpd.bytes_served = 0
            self.httpd.requests.clear()

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
