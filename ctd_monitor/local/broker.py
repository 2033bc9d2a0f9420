"""A real single-node Apache Kafka broker (KRaft, combined broker + controller) for development and tests.

The broker runs from the jars Maven Central publishes (``org.apache.kafka:kafka_2.13``), fetched once with
``mvn dependency:copy-dependencies`` on ``ctd_monitor/local/kafka/pom.xml`` into
``<cache_dir>/kafka/<version>/libs`` (``cache_dir`` is the ctd-monitor cache root, ``CTD_CACHE_DIR`` or
``~/.cache/ctd-monitor``), then started as ``java -cp 'libs/*' kafka.Kafka server.properties``.

Kafka 4.1 with aiokafka 0.14 was checked for produce/consume with ``acks="all"``, idempotent and
transactional producers, consumer groups and the admin client; none hit the protocol versions Kafka 4.0
removed (KIP-896), so no 3.9.x fallback is needed.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Self, TypeVar

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from probes.config import default_cache_dir
from probes.errors import CtdError
from probes.logs import get_logger

KAFKA_VERSION = "4.1.1"
POM_PATH = Path(__file__).resolve().parent / "kafka" / "pom.xml"

# The machine running tests has 2 cores and torch beside the broker: a small heap, one GC thread and few
# broker threads keep the JVM from competing with the model for CPU and memory.
JVM_OPTS: tuple[str, ...] = (
    "-Xms64m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    # C1 only: the JVM is up in ~half the time and a dev broker never needs C2's peak throughput.
    "-XX:TieredStopAtLevel=1",
    "-Djava.awt.headless=true",
)

_COMPLETE = ".complete"
_NODE_ID = 1
_LOG_TAIL_BYTES = 6000
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

log = get_logger("ctd_monitor.local.broker")
T = TypeVar("T")


class BrokerError(CtdError):
    """The local Kafka broker could not be fetched, started, reached or stopped."""


def resolve_cache_dir() -> Path:
    """The ctd-monitor cache root: ``CTD_CACHE_DIR`` when set (as ``Settings`` reads it), else the default."""
    env = os.environ.get("CTD_CACHE_DIR")
    return Path(env).expanduser() if env else default_cache_dir()


def kafka_home(cache_dir: Path, version: str = KAFKA_VERSION) -> Path:
    return cache_dir / "kafka" / version


def _tail(text: str, limit: int = _LOG_TAIL_BYTES) -> str:
    # Some Maven builds colour output even in batch mode; escape codes make the error unreadable.
    text = _ANSI.sub("", text)
    return text if len(text) <= limit else "…" + text[-limit:]


def _file_tail(path: Path, limit: int = _LOG_TAIL_BYTES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            data = fh.read()
    except OSError:
        return f"(no log at {path})"
    prefix = "…" if size > limit else ""
    return prefix + data.decode("utf-8", errors="replace")


def _require_tool(name: str, purpose: str) -> str:
    # JAVA_HOME wins over PATH for java because that is what Kafka's own scripts do.
    if name == "java":
        java_home = os.environ.get("JAVA_HOME")
        if java_home:
            candidate = Path(java_home) / "bin" / "java"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which(name)
    if found is None:
        hint = "install a JDK (17 or newer)" if name == "java" else "install Apache Maven (3.6 or newer)"
        raise BrokerError(f"`{name}` was not found on PATH; it is needed to {purpose}: {hint}")
    return found


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Two test sessions (or a test session and `ctd-monitor broker`) may fetch at once; an flock keeps the
    # second one from running a redundant mvn and lets it reuse the first one's result.
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def fetch_jars(
    cache_dir: Path,
    version: str = KAFKA_VERSION,
    *,
    maven_repo: Path | None = None,
    timeout_s: float = 900.0,
) -> Path:
    """Return ``<cache_dir>/kafka/<version>/libs``, first fetching the jars from Maven Central if needed.

    Idempotent and safe to call concurrently: a libs dir counts only once it holds the ``.complete`` marker,
    and it appears by an atomic rename of a fully populated temp dir. ``maven_repo`` overrides Maven's local
    repository (default ``~/.m2/repository``).
    """
    home = kafka_home(cache_dir.expanduser(), version)
    libs = home / "libs"
    if (libs / _COMPLETE).is_file():
        return libs
    with _file_lock(home / ".fetch.lock"):
        if (libs / _COMPLETE).is_file():  # another process finished while we waited for the lock
            return libs
        mvn = _require_tool("mvn", "fetch the Kafka jars from Maven Central")
        if not POM_PATH.is_file():
            raise BrokerError(
                f"the Kafka pom is missing at {POM_PATH} (is the package installed completely?)"
            )
        tmp = Path(tempfile.mkdtemp(prefix="libs.tmp-", dir=home))
        cmd = [
            mvn,
            "-q",
            "-B",
            "-Dstyle.color=never",  # plain text in the error tails we raise
            "-f",
            str(POM_PATH),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={tmp}",
            "-DincludeScope=runtime",
            f"-Dkafka.version={version}",
        ]
        if maven_repo is not None:
            cmd.append(f"-Dmaven.repo.local={maven_repo.expanduser()}")
        log.info("kafka_jars_fetch_start", version=version, target=str(libs))
        started = time.monotonic()
        try:
            try:
                proc = subprocess.run(
                    cmd,
                    capture_output=True,
                    text=True,
                    timeout=timeout_s,
                    stdin=subprocess.DEVNULL,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise BrokerError(f"mvn did not finish fetching Kafka {version} in {timeout_s:.0f}s") from exc
            if proc.returncode != 0:
                # -q leaves errors on stdout for some failures and on stderr for others: show both tails.
                detail = _tail((proc.stderr or "") + (proc.stdout or ""))
                coords = f"org.apache.kafka:kafka_2.13:{version}"
                raise BrokerError(f"mvn failed (exit {proc.returncode}) fetching {coords}:\n{detail}")
            if not (tmp / f"kafka_2.13-{version}.jar").is_file():
                raise BrokerError(f"mvn succeeded but kafka_2.13-{version}.jar is not in {tmp}")
            (tmp / _COMPLETE).write_text(f"{version}\n")
            if libs.exists():  # an interrupted older layout without the marker: never trust it
                shutil.rmtree(libs)
            os.rename(tmp, libs)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        jars = sum(1 for _ in libs.glob("*.jar"))
        log.info(
            "kafka_jars_fetched", version=version, jars=jars, seconds=round(time.monotonic() - started, 1)
        )
    return libs


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _new_cluster_id() -> str:
    # Kafka cluster ids are a UUID in unpadded URL-safe base64; Kafka itself avoids a leading '-' because the
    # id is passed on command lines, so do the same.
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _run_in_thread(factory: Callable[[], Awaitable[T]]) -> T:
    # The sync API is called from plain code and from inside running event loops (async tests call
    # create_topics directly); a private loop on a helper thread works in both without nesting loops.
    async def main() -> T:
        return await factory()

    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctd-broker") as pool:
        return pool.submit(asyncio.run, main()).result()


def _wait_all_threads_stopped(pid: int, *, timeout_s: float) -> bool:
    """True once every thread of ``pid`` is in state T (stopped); False where /proc cannot tell (not Linux)
    or the deadline passes."""
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states: list[str] = []
        for stat in tasks.glob("*/stat"):
            with contextlib.suppress(OSError):
                # The state follows the command name, which is in parentheses and may contain spaces.
                states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
        if states and all(state in ("T", "t") for state in states):
            return True
        time.sleep(0.01)
    return False


def die_with_parent_prefix() -> list[str]:
    # A test session killed with SIGKILL would otherwise leave a 300 MB JVM behind on a 2-core machine.
    # util-linux's setpriv sets PR_SET_PDEATHSIG and then execs java (same pid, so signals and wait() still
    # target the JVM); a preexec_fn would do the same but runs Python in a forked child of a threaded
    # process. The signal fires when the *thread* that started the JVM exits, so start() belongs on a
    # long-lived thread. Without setpriv (macOS) the JVM is simply not tied to us.
    if sys.platform.startswith("linux"):
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            return [setpriv, "--pdeathsig", "TERM"]
    return []


_LOG4J2 = """\
# Written by ctd_monitor/local/broker.py. The JVM's stdout goes to kafka.log in the data dir.
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = out
# The per-request and state-change chatter buries the lines that explain a failure.
logger.change.name = state.change.logger
logger.change.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = WARN
"""


class LocalBroker:
    """One Kafka JVM acting as broker and controller on 127.0.0.1, with its data in ``data_dir``.

    ``data_dir`` defaults to a fresh temp dir that ``stop()`` removes; a given one is kept, and reusing it
    keeps the topics (storage is formatted only once).
    """

    def __init__(
        self,
        *,
        cache_dir: Path,
        data_dir: Path | None = None,
        port: int | None = None,
        version: str = KAFKA_VERSION,
    ) -> None:
        self.cache_dir = cache_dir.expanduser().resolve()
        self.version = version
        self._requested_port = port
        self._own_data_dir = data_dir is None
        self._data_dir = data_dir.expanduser().resolve() if data_dir is not None else None
        self._port: int | None = None
        self._controller_port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None
        self._paused = False
        self._log_offset = 0

    # -- properties ------------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            self._data_dir = Path(tempfile.mkdtemp(prefix="ctd-kafka-"))
        return self._data_dir

    @property
    def log_path(self) -> Path:
        return self.data_dir / "kafka.log"

    @property
    def port(self) -> int:
        if self._port is None:
            raise BrokerError("the broker has not been started")
        return self._port

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, limit: int = _LOG_TAIL_BYTES) -> str:
        return _file_tail(self.log_path, limit)

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self, timeout_s: float = 60) -> None:
        """Fetch the jars if needed, format storage once, start the JVM and wait until it serves metadata.

        ``timeout_s`` bounds formatting plus start-up, not the one-time jar download.
        """
        if self.is_running():
            raise BrokerError(f"the broker is already running at {self.bootstrap}")
        # The first fetch downloads ~40 MB and is bounded by its own timeout; timeout_s covers the JVM only.
        libs = fetch_jars(self.cache_dir, self.version)
        java = _require_tool("java", "run the Kafka broker")
        deadline = time.monotonic() + timeout_s
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # A port picked here may be taken by someone else before the JVM binds it; with no port requested,
        # pick new ones and try again rather than fail the whole test session.
        attempts = 1 if self._requested_port is not None else 3
        for attempt in range(1, attempts + 1):
            self._port = self._requested_port or _free_port()
            self._controller_port = _free_port()
            while self._controller_port == self._port:
                self._controller_port = _free_port()
            props = self._write_config()
            self._format_storage(java, libs, props)
            started = time.monotonic()
            self._launch(java, libs, props)
            try:
                self._wait_ready(deadline)
            except BrokerError:
                bind_clash = "Address already in use" in self._log_since_launch()
                self._kill()
                if bind_clash and attempt < attempts:
                    log.warning("kafka_port_clash_retry", port=self._port, attempt=attempt)
                    continue
                raise
            log.info(
                "kafka_broker_started",
                version=self.version,
                bootstrap=self.bootstrap,
                pid=self.pid,
                seconds=round(time.monotonic() - started, 2),
                data_dir=str(self.data_dir),
            )
            return

    def _write_config(self) -> Path:
        assert self._port is not None and self._controller_port is not None
        logs = self.data_dir / "logs"
        props = {
            "process.roles": "broker,controller",
            "node.id": str(_NODE_ID),
            # A static voter set lives in the config, not in the formatted storage (as --standalone's dynamic
            # quorum does), so a restart on other ports reuses the same data dir.
            "controller.quorum.voters": f"{_NODE_ID}@127.0.0.1:{self._controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self._port},CONTROLLER://127.0.0.1:{self._controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self._port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(logs),
            # One node: every internal topic must accept a replication factor and ISR of 1.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # Fewer internal partitions: the first consumer group or transaction creates them all, and 50 each
            # (the defaults) cost seconds on a small machine for no benefit on a single node.
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.num.partitions": "10",
            # Tests join groups constantly; the 3 s default delay would only slow every first rebalance.
            "group.initial.rebalance.delay.ms": "0",
            "num.partitions": "1",
            # Topics must be created on purpose, so a typo in a topic name fails instead of silently working.
            "auto.create.topics.enable": "false",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
            "background.threads": "2",
        }
        path = self.data_dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.data_dir / "log4j2.properties").write_text(_LOG4J2)
        return path

    def _java_cmd(self, java: str, libs: Path) -> list[str]:
        return [
            java,
            *JVM_OPTS,
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            "-cp",
            f"{libs}/*",  # expanded by java, not by a shell
        ]

    def _format_storage(self, java: str, libs: Path, props: Path) -> None:
        if (self.data_dir / "logs" / "meta.properties").is_file():
            return
        cmd = [
            *self._java_cmd(java, libs),
            "kafka.tools.StorageTool",
            "format",
            "-t",
            _new_cluster_id(),
            "-c",
            str(props),
        ]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise BrokerError("kafka.tools.StorageTool format did not finish in 120s") from exc
        if proc.returncode != 0:
            raise BrokerError(
                f"formatting Kafka storage in {self.data_dir / 'logs'} failed (exit {proc.returncode}):\n"
                + _tail(proc.stdout + proc.stderr)
            )

    def _launch(self, java: str, libs: Path, props: Path) -> None:
        self._log_fh = self.log_path.open("ab")
        self._log_fh.write(
            f"\n==== ctd-monitor: starting Kafka {self.version} on {self.bootstrap} ====\n".encode()
        )
        self._log_fh.flush()
        self._log_offset = self._log_fh.tell()
        self._proc = subprocess.Popen(
            [*die_with_parent_prefix(), *self._java_cmd(java, libs), "kafka.Kafka", str(props)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
            # Own session and process group: a Ctrl-C in the terminal reaches us, not the JVM, so shutdown
            # stays ordered; and pause()/resume() can signal the group.
            start_new_session=True,
        )
        self._paused = False

    def _log_since_launch(self) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(self._log_offset)
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        last_error = "the port never opened"
        while True:
            if self._proc.poll() is not None:
                raise BrokerError(
                    f"the Kafka JVM exited with code {self._proc.returncode} during start-up; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"Kafka did not become ready on {self.bootstrap} in time ({last_error}); "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            # A cheap TCP probe first: the JVM needs seconds, and each aiokafka attempt costs more.
            if _port_open(self.port):
                try:
                    if _run_in_thread(self._metadata_ready):
                        return
                    last_error = "the broker is not registered yet"
                except Exception as exc:  # noqa: BLE001 - any client failure just means "not yet"
                    last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)

    async def _metadata_ready(self) -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()  # inside the try: a failed bootstrap still leaves connections to close
            # A metadata response lists only unfenced brokers: seeing ours means it accepts topics and writes.
            cluster = await admin.describe_cluster()
            if not any(b.get("node_id") == _NODE_ID for b in cluster.get("brokers", [])):
                return False
            # The first FindCoordinator creates __consumer_offsets / __transaction_state. Doing it here keeps
            # that (and the COORDINATOR_NOT_AVAILABLE retries it causes) out of the first test's timing.
            await admin.find_coordinator("ctd-monitor-warm-up", 0)
            await admin.find_coordinator("ctd-monitor-warm-up", 1)
            return True
        finally:
            await admin.close()

    def stop(self, timeout_s: float = 20) -> None:
        """Stop the JVM (SIGTERM for a controlled shutdown, SIGKILL after ``timeout_s``); idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            if self._paused:
                # A stopped process only acts on SIGTERM once continued.
                self.resume()
            started = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
                log.info("kafka_broker_stopped", seconds=round(time.monotonic() - started, 2))
            except subprocess.TimeoutExpired:
                log.warning("kafka_broker_kill", reason="no exit after SIGTERM", timeout_s=timeout_s)
                self._kill()
        self._close_log()
        self._proc = None
        self._paused = False
        if self._own_data_dir and self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        self._close_log()
        self._paused = False

    def _close_log(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def pause(self) -> None:
        """Freeze the JVM (SIGSTOP): connections stay open but nothing is answered, as with a hung broker."""
        proc = self._require_running()
        os.killpg(proc.pid, signal.SIGSTOP)
        # kill() returns once the signal is queued; a JVM thread busy on a CPU of a loaded machine stops only
        # when it next enters the kernel, and could still answer a request sent right after. A test that
        # freezes the broker must see it frozen, so wait until every thread reports itself stopped.
        stopped = _wait_all_threads_stopped(proc.pid, timeout_s=10.0)
        self._paused = True
        log.info("kafka_broker_paused", pid=proc.pid, confirmed=stopped)

    def resume(self) -> None:
        """Continue a paused JVM (SIGCONT)."""
        proc = self._require_running()
        os.killpg(proc.pid, signal.SIGCONT)
        self._paused = False
        log.info("kafka_broker_resumed", pid=proc.pid)

    @property
    def paused(self) -> bool:
        return self._paused

    def _require_running(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            raise BrokerError("the broker is not running")
        return self._proc

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- topics ----------------------------------------------------------------------------------------

    def create_topics(
        self, spec: dict[str, int], *, config: dict[str, str] | None = None, timeout_s: float = 30
    ) -> None:
        """Create topics (name -> partitions, replication factor 1); existing ones are left as they are.

        Blocks until every partition has a leader, so a producer started right after never sees
        UNKNOWN_TOPIC_OR_PARTITION. Callable from inside a running event loop (it blocks that loop briefly).
        """
        _run_in_thread(lambda: self.create_topics_async(spec, config=config, timeout_s=timeout_s))

    async def create_topics_async(
        self, spec: dict[str, int], *, config: dict[str, str] | None = None, timeout_s: float = 30
    ) -> None:
        if not spec:
            return
        self._require_running()
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap, request_timeout_ms=int(timeout_s * 1000)
        )
        try:
            await admin.start()
            topics = [NewTopic(name, n, 1, topic_configs=dict(config or {})) for name, n in spec.items()]
            response = await admin.create_topics(topics, timeout_ms=int(timeout_s * 1000))
            errors = []
            # aiokafka reports per-topic failures in the response instead of raising; 36 is
            # TOPIC_ALREADY_EXISTS, which is what makes this idempotent.
            for item in response.topic_errors:
                name, code, message = item[0], item[1], item[2] if len(item) > 2 else None
                if code not in (0, 36):
                    errors.append(f"{name}: error {code} {message or ''}".strip())
            if errors:
                raise BrokerError("creating topics failed: " + "; ".join(errors))
            await self._wait_leaders(admin, spec, time.monotonic() + timeout_s)
        finally:
            await admin.close()
        log.info("kafka_topics_ready", topics=sorted(spec))

    @staticmethod
    async def _wait_leaders(admin: AIOKafkaAdminClient, spec: dict[str, int], deadline: float) -> None:
        while True:
            described = await admin.describe_topics(list(spec))
            missing = []
            for t in described:
                partitions = t.get("partitions") or []
                ok = (
                    t.get("error_code", 0) == 0
                    and partitions
                    and all(p.get("leader", -1) >= 0 for p in partitions)
                )
                if not ok:
                    missing.append(str(t.get("topic")))
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise BrokerError(f"topics without leaders after creation: {', '.join(sorted(missing))}")
            await asyncio.sleep(0.1)


def run_broker_forever(cache_dir: Path, port: int | None, fetch_only: bool) -> int:
    """Entry point of ``ctd-monitor broker``: serve until SIGINT/SIGTERM, then stop cleanly.

    With ``fetch_only`` it only fetches the jars and prints their directory. Otherwise it prints one JSON line
    ``{"bootstrap": "127.0.0.1:PORT", ...}`` on stdout once the broker is ready, so scripts can read it.
    """
    if fetch_only:
        libs = fetch_jars(cache_dir)
        sys.stdout.write(f"{libs}\n")
        sys.stdout.flush()
        return 0

    stop_requested = threading.Event()
    serving = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Before the broker is up (a first fetch takes ~20 s) a signal must interrupt start() itself;
        # afterwards the main loop notices the event and stops the JVM in order.
        if not serving:
            raise KeyboardInterrupt
        stop_requested.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    broker = LocalBroker(cache_dir=cache_dir, port=port)
    try:
        broker.start()
        serving = True
        line = {"bootstrap": broker.bootstrap, "version": broker.version, "log": str(broker.log_path)}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        while not stop_requested.wait(1.0):
            if not broker.is_running():
                log.error("kafka_broker_died", log_tail=broker.log_tail(2000))
                return 1
        return 0
    except KeyboardInterrupt:
        log.warning("kafka_broker_start_interrupted")
        return 130
    finally:
        broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
