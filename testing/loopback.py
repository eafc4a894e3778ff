"""What every loopback test server here shares: binding only to loopback, serving from a daemon thread, and
stopping at once even while handlers hang or drip bytes on purpose.

:class:`LoopbackService` is the base of :class:`~visinstruct.testing.server.ImageServer` and
:class:`~visinstruct.testing.openai_server.OpenAIServer`; a subclass sets ``handler`` (its
``BaseHTTPRequestHandler``) and reads ``self._stopping`` in handlers that wait, so ``stop()`` wakes them.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CLIENT_GONE = (ConnectionError, TimeoutError)  # a client that gives up mid-response is normal here


class LoopbackHTTPServer(ThreadingHTTPServer):
    """Keeps every open connection so that ``stop()`` can cut them, and keeps quiet about vanished clients."""

    daemon_threads = True
    block_on_close = False  # stop() must not wait for handlers that hang on purpose
    # socketserver's backlog of 5 drops SYNs under 64 clients opening a connection each: 1 s retransmits would
    # time the server, not the client (measured by the ingest benchmark).
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], app: LoopbackService):
        self.app = app
        self._sockets: set[socket.socket] = set()
        self._sockets_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self._sockets_lock:
            self._sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._sockets_lock:
            self._sockets.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        """Shuts every open connection down, so handler threads blocked on a read or a write return at once."""
        with self._sockets_lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its handler

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], CLIENT_GONE) or self.app._stopping.is_set():
            return
        super().handle_error(request, client_address)


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive, no access log on stderr (tests read the servers' request logs), and a client that
    hangs up mid-response just ends the connection."""

    protocol_version = "HTTP/1.1"
    server: LoopbackHTTPServer

    def log_message(self, format: str, *args) -> None:  # the base class names it `format`
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except CLIENT_GONE:
            self.close_connection = True


class LoopbackService:
    """A server on an IPv4 loopback address and an ephemeral port, started and stopped from tests."""

    handler: type[BaseHTTPRequestHandler]

    def __init__(self, host: str = "127.0.0.1"):
        try:
            loopback = ipaddress.IPv4Address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(
                f"{type(self).__name__} binds only IPv4 loopback addresses such as 127.0.0.1, not {host!r}"
            )
        self.host, self.port = host, None
        self._stopping = threading.Event()
        self._httpd: LoopbackHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self):
        """Binds an ephemeral port and serves in a daemon thread; returns self."""
        if self._httpd is not None:
            raise RuntimeError(f"{type(self).__name__} is already running")
        self._stopping.clear()
        self._httpd = LoopbackHTTPServer((self.host, 0), self.handler, self)
        self.port = self._httpd.server_address[1]
        # A short poll interval keeps shutdown() quick.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops serving and cuts open connections; returns promptly even with hanging or slow responses open."""
        if self._httpd is None:
            return
        self._stopping.set()  # wakes handlers that wait: hangs, slow bodies, latency
        self._httpd.shutdown()
        self._httpd.cut_connections()
        self._httpd.server_close()
        self._thread.join(timeout=2.0)
        self._httpd = self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
