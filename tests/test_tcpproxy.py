"""The fault-injecting TCP proxy itself, against a local echo server (no database needed)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.tcpproxy import TcpProxy


class EchoServer:
    """Echoes every chunk back, prefixed with b"re:" so a reply is told from the request."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := conn.recv(65536):
                self.received += data
                conn.sendall(b"re:" + data)
        conn.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.close()
        self._thread.join(2)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[TcpProxy]:
    p = TcpProxy("127.0.0.1", echo.port)
    yield p
    p.close()


def connect(proxy: TcpProxy, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection(proxy.address, timeout=timeout)


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return sock.recv(65536)


def test_pass_forwards_both_ways(proxy: TcpProxy) -> None:
    with connect(proxy) as s:
        assert roundtrip(s, b"hello") == b"re:hello"
        assert roundtrip(s, b"again") == b"re:again"
    assert proxy.accepted == 1


def test_refuse_closes_the_port_and_pass_reopens_it(proxy: TcpProxy) -> None:
    proxy.mode = "refuse"
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        connect(proxy)
    assert time.monotonic() - started < 1
    proxy.mode = "pass"
    with connect(proxy) as s:
        assert roundtrip(s, b"back") == b"re:back"


def test_blackhole_holds_data_and_pass_releases_it(proxy: TcpProxy, echo: EchoServer) -> None:
    proxy.mode = "blackhole"
    with connect(proxy, timeout=0.3) as s:
        s.sendall(b"stuck")
        with pytest.raises(TimeoutError):
            s.recv(100)
        assert echo.received == b""
        proxy.mode = "pass"
        s.settimeout(2)
        assert s.recv(100) == b"re:stuck"


def test_delay_holds_each_chunk(proxy: TcpProxy) -> None:
    proxy.mode = "delay"
    proxy.delay = 0.2
    with connect(proxy) as s:
        started = time.monotonic()
        assert roundtrip(s, b"slow") == b"re:slow"
        assert time.monotonic() - started >= 0.4  # held once each way


def test_cut_closes_open_connections(proxy: TcpProxy) -> None:
    with connect(proxy) as s:
        assert roundtrip(s, b"x") == b"re:x"
        proxy.cut()
        assert s.recv(100) == b""  # EOF, not a hang
    with connect(proxy) as s:  # new connections still work
        assert roundtrip(s, b"y") == b"re:y"


def test_cut_on_client_data_drops_the_chunk(proxy: TcpProxy, echo: EchoServer) -> None:
    fired = proxy.cut_on_client_data(b"BOOM")
    with connect(proxy) as s:
        assert roundtrip(s, b"fine") == b"re:fine"
        s.sendall(b"xxBOOMxx")
        assert s.recv(100) == b""
    assert fired.is_set()
    assert b"BOOM" not in echo.received


def test_pattern_split_across_chunks_is_seen(proxy: TcpProxy) -> None:
    fired = proxy.cut_on_client_data(b"COMMIT")
    with connect(proxy) as s:
        assert roundtrip(s, b"...COM") == b"re:...COM"
        s.sendall(b"MIT")
        assert s.recv(100) == b""
    assert fired.is_set()


def test_cut_on_server_reply_after_forwards_then_loses_the_reply(
    proxy: TcpProxy, echo: EchoServer
) -> None:
    fired = proxy.cut_on_server_reply_after(b"COMMIT")
    with connect(proxy) as s:
        s.sendall(b"COMMIT")
        assert s.recv(100) == b""  # the reply never arrives
    assert fired.wait(2)
    assert echo.received == b"COMMIT"  # but the server got the request


def test_triggers_fire_once(proxy: TcpProxy) -> None:
    proxy.cut_on_client_data(b"X")
    with connect(proxy) as s:
        s.sendall(b"X")
        assert s.recv(10) == b""
    with connect(proxy) as s:
        assert roundtrip(s, b"X") == b"re:X"


def test_close_stops_every_thread(echo: EchoServer) -> None:
    p = TcpProxy("127.0.0.1", echo.port)
    socks = [connect(p) for _ in range(3)]
    for s in socks:
        assert roundtrip(s, b"a") == b"re:a"
    p.mode = "blackhole"
    stuck = connect(p)
    started = time.monotonic()
    p.close()
    assert time.monotonic() - started < 2
    assert p.threads_alive == 0
    for s in [*socks, stuck]:
        s.close()
    with pytest.raises(ConnectionRefusedError):
        connect(p)


def test_unknown_mode_is_refused(proxy: TcpProxy) -> None:
    with pytest.raises(ValueError):
        proxy.mode = "sideways"
