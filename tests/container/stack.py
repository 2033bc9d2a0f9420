"""Podman helpers for the container tests: build the images with scripts/images.sh and run a service container the
way deploy/ runs it (numeric non-root user, read-only root filesystem, writable /tmp only, no capabilities,
read-only model mounts), on the host's network so it reaches the embedded broker on 127.0.0.1."""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
ENV_FILE = DOCKER / "ctd.env"
IMAGES = {"cpu": "localhost/ctd-monitor:cpu", "guard": "localhost/ctd-monitor:guard"}
CONFIG_PATH = "/etc/ctd-monitor/config.yaml"


def podman() -> str | None:
    return shutil.which("podman")


def _env_file() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in ENV_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


#: Where a container finds its signing keys (docker/ctd.env); run_service mounts ``keys_dir()`` there.
KEYS_MOUNT = _env_file()["CTD_SIGNING__KEYS_DIR"]


@functools.cache
def keys_dir() -> Path:
    """Real per-role keys and an audit secret for the test session (what compose's `keys` service writes),
    readable by the containers' user 10001."""
    from worker.signing import generate_audit_secret, generate_keys

    directory = Path(tempfile.mkdtemp(prefix="ctd-container-keys-"))
    generate_keys(directory)
    generate_audit_secret(directory)
    readable(directory)
    return directory


def stack_env() -> dict[str, str]:
    """docker/ctd.env as a dict for a process on the host: the keys and flags every service of the local stack is
    started with, its keys directory the session's (``keys_dir``)."""
    return {**_env_file(), "CTD_SIGNING__KEYS_DIR": str(keys_dir())}


def build_images(*targets: str, log: Path) -> None:
    """scripts/images.sh for ``targets``; the whole build log goes to ``log`` (quoted on failure)."""
    with log.open("wb") as handle:
        proc = subprocess.run([str(REPO / "scripts" / "images.sh"), *targets], stdout=handle, stderr=handle,
                              timeout=3600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/images.sh {' '.join(targets)} failed ({proc.returncode}):\n"
                           + log.read_text(errors="replace")[-6000:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), ""
    except OSError:
        return 0, ""


def _podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = podman()
    assert exe is not None, "podman not found"
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return proc


@dataclass
class Container:
    name: str
    port: int
    started_at: float

    def logs(self) -> str:
        proc = _podman("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def running(self) -> bool:
        proc = _podman("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return proc.stdout.strip() == "true"

    def wait_ready(self, timeout: float) -> float:
        """Seconds from `podman run` to /healthz/ready answering 200 (model load and partition assignment)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if http_get(f"http://127.0.0.1:{self.port}/healthz/ready")[0] == 200:
                return time.monotonic() - self.started_at
            if not self.running():
                raise RuntimeError(f"container {self.name} exited:\n{self.logs()[-4000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"container {self.name} not ready in {timeout} s:\n{self.logs()[-4000:]}")

    def metrics(self) -> str:
        return http_get(f"http://127.0.0.1:{self.port}/metrics")[1]

    def exec(self, *command: str) -> subprocess.CompletedProcess[str]:
        return _podman("exec", self.name, *command, check=False)

    def inspect(self, template: str) -> str:
        return _podman("inspect", "--format", template, self.name).stdout.strip()

    def signal(self, sig: str) -> None:
        _podman("kill", "--signal", sig, self.name)

    def wait(self, timeout: float) -> int:
        """The container's exit code (raises TimeoutError if it is still running after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                raise TimeoutError(f"container {self.name} still running after {timeout} s")
            time.sleep(0.1)
        return int(self.inspect("{{.State.ExitCode}}"))

    def remove(self) -> None:
        _podman("rm", "--force", "--time", "0", self.name, check=False)


def run_service(image: str, name: str, args: list[str], *, port: int, config: Path,
                mounts: dict[Path, str], env: dict[str, str] | None = None) -> Container:
    """A service container as deploy/ declares it: user 10001, read-only root, /tmp the only writable path."""
    cmd = ["run", "--detach", "--name", name, "--network", "host", "--read-only", "--read-only-tmpfs=false",
           "--tmpfs", "/tmp:rw,size=1g,mode=1777", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
           "--env-file", str(ENV_FILE), "-v", f"{config}:{CONFIG_PATH}:ro", "-v", f"{keys_dir()}:{KEYS_MOUNT}:ro"]
    for host, target in mounts.items():
        cmd += ["-v", f"{host}:{target}:ro"]
    for key, value in (env or {}).items():
        cmd += ["-e", f"{key}={value}"]
    started = time.monotonic()
    _podman(*cmd, image, "--config", CONFIG_PATH, *args, timeout=120)
    return Container(name=name, port=port, started_at=started)


def readable(path: Path) -> None:
    """Let the container's user 10001 read a mounted tree (pytest's tmp dirs are private to their owner; the
    host path above a bind mount is not checked inside the container)."""
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o755)
        for d in dirs:
            os.chmod(Path(root) / d, 0o755)
        for f in files:
            os.chmod(Path(root) / f, 0o644)
