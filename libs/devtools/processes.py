"""Running imagestream services as separate processes, the way a deployment runs them,
and a private redis-server: shared by the tests and the benchmarks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(redis_url: str, database_url: str, prefix: str, **extra: str) -> dict[str, str]:
    """This process's environment without any imagestream server or fetch settings, pointed
    at the given servers and key prefix; the fetcher may reach loopback (test servers)."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "DATABASE_", "FETCH_"))
    }
    env.update(
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        REDIS_PREFIX=prefix,
        IMAGESTREAM_ENV_FILE="/nonexistent",
        FETCH_ALLOWED_CIDRS="127.0.0.1/32",
    )
    env.update(extra)
    return env


@dataclass
class Service:
    stage: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, then the exit status (-9 if it had to be killed)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return -9
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the service and its live child
        processes (the fetcher's decode pool)."""
        return process_tree_cpu_seconds(self.process.pid)


def process_tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants, read from /proc (Linux);
    0 for processes that are gone."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            # Fields after the command name (which may hold spaces): utime and stime are
            # the 12th and 13th of them.
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue
    return total / ticks


@dataclass
class Fleet:
    """``imagestream serve <stage>`` processes sharing one environment, logs in ``logs``."""

    env: dict[str, str]
    logs: Path
    services: list[Service] = field(default_factory=list)

    def start(self, stage: str) -> Service:
        log = self.logs / f"{stage}-{len(self.services)}.log"
        with log.open("wb") as handle:
            process = subprocess.Popen(  # noqa: S603 - our own command, no shell
                [sys.executable, "-m", "imagestream.cli", "serve", stage],
                env=self.env,
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
        service = Service(stage, process, log)
        self.services.append(service)
        return service

    def stop_all(self) -> dict[str, int]:
        return {f"{s.stage}-{i}": s.stop() for i, s in enumerate(self.services)}

    def logs_text(self) -> str:
        return "\n".join(f"== {s.log.name}\n{s.log.read_text()[-3000:]}" for s in self.services)


class RedisServer:
    """A redis-server of our own on loopback that keeps nothing on disk: a restart empties
    it, and its memory is ours alone."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.process = subprocess.Popen(  # noqa: S603 - a fixed command, no shell
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:  # answers within milliseconds; services started after this connect
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
