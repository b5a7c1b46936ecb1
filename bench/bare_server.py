"""The bare floor of bench/run.py: a stdlib ThreadingHTTPServer that only answers.

    python bench/bare_server.py PORT SMALL_BYTES BIG_BYTES

Every GET or POST gets 200 with SMALL_BYTES of body (BIG_BYTES under /big),
HTTP/1.1 keep-alive and TCP_NODELAY, as the services set them up.
"""

import sys
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    """Read the request body, answer a fixed one."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def answer(self):
        """GET and POST alike."""
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = BIG if self.path.startswith("/big") else SMALL
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = answer

    def log_message(self, format, *args):
        """No access lines."""


class Server(ThreadingHTTPServer):
    """No traceback when wrk drops its connections at the end of a run."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


if __name__ == "__main__":
    SMALL, BIG = (b"x" * int(n) for n in sys.argv[2:4])
    Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
