"""A small MJPEG server: watch a live overlay in a browser (``resunetpp stream --serve PORT``).

Standard library only (``http.server.ThreadingHTTPServer`` in a daemon thread) plus Pillow for
the JPEG encoding. Pages:

* ``/`` -- an HTML page showing ``<img src="/stream.mjpg">`` and the live stats;
* ``/stream.mjpg`` -- ``multipart/x-mixed-replace`` JPEG frames of the newest overlay;
* ``/frame.jpg`` -- the newest overlay as one JPEG (a snapshot);
* ``/stats.json`` -- the pipeline's current stats.

It binds ``127.0.0.1`` by default: only this machine can watch. The pipeline only *publishes*
the newest frame (:meth:`MjpegServer.publish`: a reference swap under a lock, no encoding);
each client's own thread encodes it to JPEG (once per frame, shared by all clients) and sends
it, then waits for a newer one. A slow client therefore skips frames and never slows the
pipeline, and with nobody watching nothing is encoded.
"""

from __future__ import annotations

import html
import io
import json
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from resunetpp.errors import ResUNetError

__all__ = ["BOUNDARY", "DEFAULT_HOST", "MjpegServer", "encode_jpeg"]

DEFAULT_HOST = "127.0.0.1"
BOUNDARY = "resunetppframe"
JPEG_QUALITY = 85

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>resunetpp stream</title>
<style>
 html, body {{ margin: 0; background: #111; color: #ddd; font: 13px monospace; }}
 #live {{ display: block; max-width: 100vw; max-height: calc(100vh - 22px); }}
 #stats {{ height: 20px; padding: 1px 4px; white-space: nowrap; overflow: hidden; }}
</style></head>
<body>
<img id="live" src="/stream.mjpg" alt="live overlay">
<div id="stats" data-title="{title}">{title}</div>
<script>
async function tick() {{
  try {{
    const s = await (await fetch('/stats.json', {{cache: 'no-store'}})).json();
    const el = document.getElementById('stats');
    el.textContent = `${{el.dataset.title}} | ${{(s.fps || 0).toFixed(1)}} fps | latency p50 ${{(s.latency_p50_ms || 0).toFixed(0)}} ms` +
      ` | dropped ${{s.frames_dropped || 0}} | frames ${{s.frames_inferred || 0}}`;
  }} catch (e) {{}}
}}
setInterval(tick, 500); tick();
</script>
</body></html>
"""


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """``(H, W, 3)`` uint8 RGB as JPEG bytes (Pillow; it releases the GIL while encoding)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, "JPEG", quality=quality, subsampling=0)  # 4:4:4: crisp outlines
    return buffer.getvalue()


class _Latest:
    """The newest frame: its number, its pixels, and its JPEG encoded at most once (lazily)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.seq = 0
        self.image: np.ndarray | None = None
        self.jpeg: bytes | None = None
        self.jpeg_seq = -1
        self.closed = False

    def publish(self, image: np.ndarray) -> None:
        with self.cond:
            self.image = image
            self.seq += 1
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait_newer(self, seen: int, timeout: float) -> tuple[int, bytes | None]:
        """``(seq, jpeg)`` of a frame newer than ``seen``; ``(seen, None)`` on timeout or close."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.seq > seen or self.closed, timeout):
                return seen, None
            if self.seq <= seen:
                return seen, None
            seq, image = self.seq, self.image
        return seq, self.jpeg_of(seq, image)

    def jpeg_of(self, seq: int, image: np.ndarray | None) -> bytes | None:
        if image is None:
            return None
        with self.cond:
            if self.jpeg_seq == seq:
                return self.jpeg
        data = encode_jpeg(image)  # outside the lock: the pipeline's publish never waits for it
        with self.cond:
            if seq > self.jpeg_seq:
                self.jpeg, self.jpeg_seq = data, seq
        return data

    def current(self) -> bytes | None:
        with self.cond:
            seq, image = self.seq, self.image
        return self.jpeg_of(seq, image)


class MjpegServer:
    """Serve the newest published frame as MJPEG on ``http://HOST:PORT/``; see the module docstring.

    ``port=0`` picks a free port (read :attr:`port` after :meth:`start`). ``stats`` is called for
    ``/stats.json`` and must return a JSON-able dict. Use as a context manager or ``start()`` /
    ``close()``.
    """

    def __init__(self, port: int, host: str = DEFAULT_HOST, *, title: str = "resunetpp stream",
                 stats: Callable[[], dict[str, Any]] | None = None) -> None:
        if not 0 <= port <= 65535:
            raise ResUNetError(f"--serve {port}: a port is 0..65535")
        self.host = host
        self.requested_port = port
        self.title = title
        self.stats = stats or (lambda: {})
        self.latest = _Latest()
        self.clients = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- the pipeline's side ----------------------------------------------------------------
    def publish(self, image: np.ndarray) -> None:
        """Make ``image`` ((H, W, 3) uint8 RGB, not modified afterwards) the frame clients get next."""
        self.latest.publish(image)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1] if self._httpd is not None else self.requested_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> "MjpegServer":
        try:
            httpd = ThreadingHTTPServer((self.host, self.requested_port), self._handler())
        except OSError as e:
            raise ResUNetError(f"--serve {self.requested_port}: cannot listen on {self.host}:{self.requested_port} "
                               f"({e.strerror or e})") from None
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="mjpeg-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving: open streams end, the socket is closed."""
        self.latest.close()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "MjpegServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the HTTP side ------------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self
        page = PAGE.format(title=html.escape(self.title)).encode("utf-8")

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "resunetpp-mjpeg"

            def log_message(self, format: str, *args: Any) -> None:  # quiet: the live line owns stderr
                pass

            def _send(self, body: bytes, content_type: str, status: HTTPStatus = HTTPStatus.OK) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path in ("/", "/index.html"):
                    self._send(page, "text/html; charset=utf-8")
                elif path == "/stats.json":
                    self._send(json.dumps(server.stats(), default=str).encode("utf-8"), "application/json")
                elif path == "/frame.jpg":
                    data = server.latest.current()
                    if data is None:
                        self._send(b"no frame yet\n", "text/plain", HTTPStatus.SERVICE_UNAVAILABLE)
                    else:
                        self._send(data, "image/jpeg")
                elif path == "/stream.mjpg":
                    self._stream()
                else:
                    self._send(b"not found\n", "text/plain", HTTPStatus.NOT_FOUND)

            def _stream(self) -> None:
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                if self.command == "HEAD":
                    return
                with server._lock:
                    server.clients += 1
                seen = 0
                try:
                    while not server.latest.closed:
                        seq, data = server.latest.wait_newer(seen, timeout=1.0)
                        if data is None:
                            continue
                        seen = seq
                        self.wfile.write(f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                                         f"Content-Length: {len(data)}\r\n\r\n".encode("ascii") + data + b"\r\n")
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError, TimeoutError):
                    pass  # the client went away
                finally:
                    with server._lock:
                        server.clients -= 1

        return Handler
