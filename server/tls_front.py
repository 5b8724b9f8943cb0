"""HTTPS in front of tritonserver's HTTP endpoint.

tritonserver 2.51 speaks TLS on gRPC (``--grpc-use-ssl``) but its HTTP endpoint has no TLS
option, so HTTPS is terminated here: a TLS listener on the public port that relays each
connection's bytes, unchanged, to Triton's HTTP endpoint bound to loopback only. Headers pass
through untouched: Triton checks the launch key of its administrative APIs, and hands the access
token to the models, as they were sent.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024


def server_tls_context(certificate: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, key)
    return context


class TlsFront:
    """A TLS-terminating TCP relay on its own thread and event loop. ``start()`` returns once it listens."""

    def __init__(self, listen_host: str, listen_port: int, backend_port: int, context: ssl.SSLContext):
        self.listen_host, self.listen_port, self.backend_port = listen_host, listen_port, backend_port
        self._context = context
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._listening = threading.Event()
        self._start_error: BaseException | None = None
        self._relays: set[asyncio.Task] = set()  # asyncio keeps only weak references to tasks

    @property
    def open_connections(self) -> int:
        """Client connections being relayed now."""
        return len(self._relays)

    def start(self) -> "TlsFront":
        self._thread = threading.Thread(target=self._run, name="tls-front", daemon=True)
        self._thread.start()
        self._listening.wait(30)
        if self._start_error is not None:
            raise self._start_error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._close_connections(), self._loop).result(10)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._relay, self.listen_host, self.listen_port, ssl=self._context)
            )
        except BaseException as exc:  # the port is taken, the key does not match the certificate, ...
            self._start_error = exc
            self._listening.set()
            return
        self._listening.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            self._loop.close()

    async def _close_connections(self) -> None:
        self._server.close()
        relays = list(self._relays)
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        relay = asyncio.current_task()
        self._relays.add(relay)
        relay.add_done_callback(self._relays.discard)
        writers = [client_writer]
        try:
            backend_reader, backend_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
            writers.append(backend_writer)
            await asyncio.gather(_pipe(client_reader, backend_writer), _pipe(backend_reader, client_writer))
        except OSError as exc:
            log.warning("tls front: Triton's HTTP endpoint refused the connection: %s", exc)
        except asyncio.CancelledError:
            pass  # the front is stopping (asyncio's streams log a connection handler that ends cancelled as an error)
        finally:
            for writer in writers:
                _close(writer)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        pass  # the peer went away
    # The end of either direction ends the connection: the client side is TLS, which has no
    # half-close, so a client that left cannot read an answer. A half-close to Triton would keep
    # the relay and Triton's connection waiting for that answer, for good if it never comes (a
    # request held by a dead stub).
    _close(writer)


def _close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
    except (ConnectionError, OSError, RuntimeError):
        pass
