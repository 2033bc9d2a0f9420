"""The worker as a child process (``ctd-monitor run``), the way production runs it.

Benchmarks use it so the process being measured is the worker alone, not the worker plus the replay
producer and the verdict collector; the reliability tests use it because SIGKILL needs a process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import orjson
import psutil
import yaml

from ctd_monitor.local.broker import die_with_parent_prefix
from worker.config import GuardSettings, WorkerSettings

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_worker_config(path: Path, settings: WorkerSettings | GuardSettings) -> Path:
    """The settings as the YAML file ``ctd-monitor --config`` reads (secrets are never written)."""
    data = orjson.loads(settings.model_dump_json())
    data["kafka"].pop("sasl_password", None)
    path.write_text(yaml.safe_dump(data))
    return path


def child_env() -> dict[str, str]:
    # The child must import this checkout (not another install of the package) so tests exercise the code
    # under test; unbuffered so its log reaches the file before a SIGKILL.
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)


class WorkerProcess:
    """One ``ctd-monitor run`` (or ``command``, e.g. ``expert``) child in its own session; stderr (the structured
    log) goes to a file. The child gets SIGTERM when its parent dies, so a killed test run leaves no orphan.

    ``argv`` replaces the command line after the interpreter (``bench machinery`` runs its null-forward worker
    through it), with the same session, log, signal and CPU-time handling.
    """

    def __init__(self, config: Path, log_path: Path, command: str = "run", *,
                 argv: Sequence[str] | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self.command = command
        self.argv = list(argv) if argv is not None else [
            "-m", "ctd_monitor.cli", "--config", str(config), "--no-progress", command]
        self._log: IO[bytes] | None = None
        self._log_from = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        self._log = self.log_path.open("ab")
        self._log_from = self._log.tell()  # a restart appends: read only this run's lines
        self.proc = subprocess.Popen(
            [*die_with_parent_prefix(), sys.executable, *self.argv],
            env=child_env(), stdout=subprocess.DEVNULL, stderr=self._log, start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.running():
            os.killpg(self.pid, sig)

    def kill(self) -> int:
        """SIGKILL the whole process group: no drain, no commit, no goodbye to the group."""
        self.signal(signal.SIGKILL)
        return self.wait(10)

    def terminate(self, timeout: float) -> int:
        """SIGTERM (graceful drain) and wait at most ``timeout`` seconds for the exit code."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        finally:
            if self._log is not None and self.proc.poll() is not None:
                self._log.close()
                self._log = None

    def rss_bytes(self) -> int:
        """Resident memory of the worker and its children (the worker has none, but a launcher might)."""
        process = psutil.Process(self.pid)
        return int(process.memory_info().rss + sum(c.memory_info().rss for c in process.children(recursive=True)))

    def cpu_seconds(self) -> float:
        """User + system CPU time the worker has used so far (all its threads)."""
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    def log_tail(self, limit: int = 4000) -> str:
        """The end of this run's log."""
        try:
            return self.log_path.read_bytes()[self._log_from:][-limit:].decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def logged(self, needle: str) -> bool:
        """Whether the worker has logged ``needle`` (e.g. ``partitions.assigned``); raises if it died."""
        if needle in self.log_tail(1 << 22):
            return True
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}: {self.log_tail()}")
        return False

    def http_port(self) -> int | None:
        """The port of the health/metrics server, from the worker's ``health.listening`` log line."""
        for line in self.log_tail(1 << 22).splitlines():
            if '"health.listening"' in line:
                try:
                    return int(orjson.loads(line)["port"])
                except (orjson.JSONDecodeError, KeyError, ValueError):
                    continue
        return None

    def __enter__(self) -> Self:
        return self if self.proc is not None else self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.running():
            self.kill()
