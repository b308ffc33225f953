"""Nonce listeners: bundle echo services, sentinels and stand-ins.

A nonce listener accepts TCP connections (or UDP datagrams), reads one line,
logs it with the peer address, and sends the same line back.  A bundle echo
service is one the agent must reach; a sentinel is one it must never reach.
Either way the log is the far side's evidence: a verdict never rests on the
prober's word alone.

Every listener of a process is served by one :class:`ListenerHub`, an asyncio
loop on a daemon thread, so a hundred listeners cost one thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

log = logging.getLogger(__name__)

_CLONE_NEWNET = 0x40000000
_MAX_LINE = 256
_PRINTABLE = re.compile(r"[^A-Za-z0-9_.:-]")


@dataclasses.dataclass(frozen=True)
class Touch:
    """One connection or datagram a listener saw."""

    peer: str
    nonce: str
    at: float


class Listener:
    """One bound socket and the log of every touch it saw."""

    def __init__(
        self,
        sock: socket.socket,
        proto: str,
        label: str,
        log_path: Path | None = None,
    ) -> None:
        self.socket = sock
        self.log_path = log_path
        self.proto = proto
        self.label = label
        address = sock.getsockname()
        self.host: str = address[0]
        self.port: int = address[1]
        self._touches: list[Touch] = []
        self._guard = threading.Lock()
        self._server: asyncio.AbstractServer | None = None
        self._transport: asyncio.BaseTransport | None = None

    def record(self, peer: str, payload: str) -> None:
        # Payloads are nonce lines, or DNS queries that carry the nonce in
        # a name: keep what is printable so the nonce can be found in both.
        nonce = _PRINTABLE.sub(".", payload)
        with self._guard:
            self._touches.append(Touch(peer, nonce, time.time()))
            if self.log_path is not None:
                with self.log_path.open("a", encoding="utf-8") as stream:
                    stream.write(f"{nonce or '-'} {peer} {self.label}\n")
        log.debug("%s %s:%s touched by %s", self.label, self.host, self.port, peer)

    @property
    def touches(self) -> list[Touch]:
        with self._guard:
            return list(self._touches)

    def saw_nonce(self, nonce: str) -> bool:
        return any(nonce in touch.nonce for touch in self.touches)

    def refresh(self) -> None:
        """Nothing to do: touches are recorded as they happen."""

    def __repr__(self) -> str:
        return f"<Listener {self.label} {self.proto} {self.host}:{self.port}>"


class _EchoDatagram(asyncio.DatagramProtocol):
    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # create_datagram_endpoint always hands over a datagram transport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        line = data.split(b"\n", 1)[0][:_MAX_LINE]
        self.listener.record(f"{addr[0]}:{addr[1]}", line.decode("latin-1"))
        if self.transport is not None:
            self.transport.sendto(line + b"\n", addr)


class ListenerHub:
    """Serves every listener of this process from one event-loop thread."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="bottle-listeners", daemon=True
        )
        self._thread.start()
        self._listeners: list[Listener] = []

    def listen(
        self,
        host: str,
        port: int = 0,
        *,
        proto: str = "tcp",
        label: str = "listener",
        netns: str | None = None,
        log_path: Path | None = None,
    ) -> Listener:
        """Bind ``host:port`` (in network namespace ``netns`` if given).

        With ``log_path``, every touch is also appended to that file as
        ``NONCE PEER LABEL`` so that other processes can read the evidence.
        """
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
        with _in_network_namespace(netns):
            sock = socket.socket(family, kind)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            if kind == socket.SOCK_STREAM:
                sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        listener = Listener(sock, proto, label, log_path)
        future = asyncio.run_coroutine_threadsafe(self._serve(listener), self._loop)
        future.result(timeout=10)
        self._listeners.append(listener)
        return listener

    def close(self, listener: Listener) -> None:
        """Stop serving ``listener`` and close its socket."""
        future = asyncio.run_coroutine_threadsafe(self._stop(listener), self._loop)
        future.result(timeout=10)
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def shutdown(self) -> None:
        """Close every listener and stop the loop thread."""
        for listener in list(self._listeners):
            self.close(listener)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _serve(self, listener: Listener) -> None:
        if listener.proto == "udp":
            transport, _ = await self._loop.create_datagram_endpoint(
                lambda: _EchoDatagram(listener), sock=listener.socket
            )
            listener._transport = transport
            return

        async def echo(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            peer = writer.get_extra_info("peername")
            peer_text = f"{peer[0]}:{peer[1]}" if peer else "?"
            try:
                line = await asyncio.wait_for(reader.readline(), timeout=10)
                nonce = line[:_MAX_LINE].rstrip(b"\n").decode(errors="replace")
                listener.record(peer_text, nonce)
                writer.write(nonce.encode() + b"\n")
                await writer.drain()
            except (OSError, TimeoutError):
                listener.record(peer_text, "")
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

        listener._server = await asyncio.start_server(echo, sock=listener.socket)

    async def _stop(self, listener: Listener) -> None:
        if listener._server is not None:
            listener._server.close()
            await listener._server.wait_closed()
        if listener._transport is not None:
            listener._transport.close()
        listener.socket.close()


@contextlib.contextmanager
def _in_network_namespace(name: str | None) -> Iterator[None]:
    """Run the body with this thread in network namespace ``name``.

    Sockets keep the namespace they were created in, so a listener made here
    serves inside the namespace from the hub's thread.  ``setns`` moves only
    the calling thread, which is moved back afterwards.
    """
    if name is None:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns into {name}: {os.strerror(code)}")
        try:
            yield
        finally:
            if libc.setns(original, _CLONE_NEWNET) != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"setns back from {name}: {os.strerror(code)}")
    finally:
        os.close(target)
        os.close(original)
