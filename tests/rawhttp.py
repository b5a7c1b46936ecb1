"""Raw HTTP for tests: send any bytes, read answers strictly, fake an upstream.

Nothing here trusts the server under test: a response is read by its own
framing (Content-Length, chunked or until close) and a malformed or
truncated one raises ValueError instead of being guessed.
"""

import contextlib
import socket
import threading
import time


class Response:
    """One HTTP response as read off the wire."""

    def __init__(self, version, status, headers, body):
        self.version, self.status = version, status
        self.headers, self.body = headers, body  # headers: [(lower name, value)]

    def header(self, name):
        """The value of the one header called name, or None."""
        values = [v for n, v in self.headers if n == name.lower()]
        assert len(values) <= 1, (name, values)
        return values[0] if values else None

    def __repr__(self):
        return f"Response({self.status}, {self.headers}, {self.body[:200]!r})"


def read_head(rfile):
    """Read a status line and headers; None if the peer closed before a byte."""
    line = rfile.readline(65537)
    if not line:
        return None
    if not line.endswith(b"\r\n"):
        raise ValueError(f"truncated status line {line[:80]!r}")
    version, status, *_ = line.decode("latin-1").split(" ", 2)
    if not version.startswith("HTTP/1.") or not status.isdigit():
        raise ValueError(f"bad status line {line[:80]!r}")
    headers = []
    while True:
        line = rfile.readline(65537)
        if line == b"\r\n":
            return version, int(status), headers
        if not line.endswith(b"\r\n") or b":" not in line:
            raise ValueError(f"bad header line {line[:80]!r}")
        name, _, value = line[:-2].decode("latin-1").partition(":")
        headers.append((name.lower(), value.strip()))


def read_chunked(rfile):
    """Read a chunked body to its last chunk; ValueError if it is cut short."""
    body = b""
    while True:
        line = rfile.readline(1024)
        if not line.endswith(b"\r\n"):
            raise ValueError(f"truncated chunk size {line!r}")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            while (line := rfile.readline(65537)) != b"\r\n":
                if not line:
                    raise ValueError("truncated trailers")
            return body
        data = rfile.read(size)
        if len(data) < size or rfile.read(2) != b"\r\n":
            raise ValueError("truncated chunk")
        body += data


def read_response(rfile, method="GET", interim=False):
    """Read one response; None if the connection closed first.

    1xx answers are skipped unless interim is true (then one is returned).
    """
    while True:
        head = read_head(rfile)
        if head is None:
            return None
        version, status, headers = head
        if status >= 200 or interim:
            break
    if status < 200 or status in (204, 304) or method == "HEAD":
        return Response(version, status, headers, b"")
    values = dict(headers)
    lengths = [v for n, v in headers if n == "content-length"]
    if "transfer-encoding" in values:
        if values["transfer-encoding"].lower() != "chunked" or lengths:
            raise ValueError(f"bad framing {headers}")
        body = read_chunked(rfile)
    elif lengths:
        assert len(lengths) == 1 and lengths[0].isdigit(), headers
        body = rfile.read(int(lengths[0]))
        if len(body) < int(lengths[0]):
            raise ValueError(f"body cut short: {len(body)} of {lengths[0]}")
    else:
        body = rfile.read()  # delimited by the close
    return Response(version, status, headers, body)


class Client:
    """One connection that sends raw bytes and reads strictly framed answers."""

    def __init__(self, port, timeout=20):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.rfile = self.sock.makefile("rb")

    def send(self, data):
        """Send data; a server that has already answered may refuse the rest."""
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def response(self, method="GET", interim=False):
        """The next answer (None when the server closed without one)."""
        try:
            return read_response(self.rfile, method, interim)
        except ConnectionResetError:
            return None

    def closed(self):
        """Whether the server has closed the connection (nothing more to read)."""
        try:
            return self.rfile.read(1) == b""
        except ConnectionResetError:
            return True

    def close(self):
        self.rfile.close()
        self.sock.close()


def exchange(port, data, method="GET"):
    """Send data on a new connection; return the first answer (or None)."""
    client = Client(port)
    try:
        client.send(data)
        return client.response(method)
    finally:
        client.close()


class Recorded:
    """One request as a fake upstream received it."""

    def __init__(self, method, target, version, headers, body):
        self.method, self.target, self.version = method, target, version
        self.headers, self.body = headers, body  # headers: [(lower name, value)]

    def values(self, name):
        return [v for n, v in self.headers if n == name]

    def __repr__(self):
        return f"Recorded({self.method} {self.target} {self.headers} {self.body!r})"


class FakeUpstream:
    """A raw socket server that records the exact requests it gets.

    It reads each request strictly (one Content-Length, no Transfer-Encoding;
    anything else is recorded as a framing problem) and answers with
    answer(recorded): bytes, keeping the connection open, or (bytes, True)
    to close it after them.
    """

    def __init__(self, answer):
        self.answer = answer
        self.requests = []
        self.problems = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._open = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._open.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock):
        rfile = sock.makefile("rb")
        try:
            while True:
                request = self._read(rfile)
                if request is None:
                    return
                self.requests.append(request)
                answer = self.answer(request)
                if isinstance(answer, tuple):  # (bytes, close): delimited by the close
                    sock.sendall(answer[0])
                    return
                sock.sendall(answer)
        except (OSError, ValueError) as exc:
            self.problems.append(repr(exc))
        finally:
            rfile.close()
            sock.close()

    def _read(self, rfile):
        line = rfile.readline(65537)
        if not line:
            return None
        if not line.endswith(b"\r\n") or line.count(b" ") != 2:
            raise ValueError(f"bad request line {line!r}")
        method, target, version = line[:-2].decode("latin-1").split(" ")
        headers = []
        while (line := rfile.readline(65537)) != b"\r\n":
            name, colon, value = line[:-2].decode("latin-1").partition(":")
            if not line.endswith(b"\r\n") or not colon or name != name.strip():
                raise ValueError(f"bad header line {line!r}")
            headers.append((name.lower(), value.strip()))
        lengths = [v for n, v in headers if n == "content-length"]
        if any(n in ("transfer-encoding", "expect") for n, _ in headers):
            raise ValueError(f"forwarded framing it should not: {headers}")
        if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
            raise ValueError(f"ambiguous Content-Length: {headers}")
        length = int(lengths[0]) if lengths else 0
        body = rfile.read(length)
        if len(body) < length:
            raise ValueError("request body cut short")
        return Recorded(method, target, version, headers, body)

    def close(self):
        self.listener.close()
        for sock in self._open:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def json_answer(body=b"{}", status=b"200 OK", extra=b""):
    """A complete JSON response with a Content-Length."""
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body
    )


def wait_closed(port, timeout):
    """Seconds until connecting to port is refused (fails after timeout)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
        except OSError:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"port {port} still accepts after {timeout}s")
