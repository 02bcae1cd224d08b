"""Starting imagestream services as separate processes, the way a deployment runs them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(redis_url: str, database_url: str, prefix: str, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "DATABASE_", "FETCH_"))
    }
    env.update(
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        REDIS_PREFIX=prefix,
        IMAGESTREAM_ENV_FILE="/nonexistent",
        LOG_FORMAT="json",
        LOG_LEVEL="INFO",
        METRICS_PORT="0",
        FETCH_ALLOWED_CIDRS="127.0.0.1/32",
        READ_BLOCK_MS="300",
        CLAIM_IDLE_MS="5000",
        CLAIM_INTERVAL_S="1",
        DISPATCH_INTERVAL_S="0.05",
        RECONCILE_INTERVAL_S="0.5",
        FETCH_ATTEMPTS="2",
        FETCH_BACKOFF_S="0.05",
        SHUTDOWN_GRACE_S="5",
    )
    env.update(extra)
    return env


@dataclass
class Service:
    stage: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 20) -> int:
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


@dataclass
class Fleet:
    env: dict[str, str]
    logs: Path
    services: list[Service] = field(default_factory=list)

    def start(self, stage: str) -> Service:
        log = self.logs / f"{stage}-{len(self.services)}.log"
        handle = log.open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "imagestream.cli", "serve", stage],
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        handle.close()
        service = Service(stage, process, log)
        self.services.append(service)
        return service

    def stop_all(self) -> dict[str, int]:
        return {f"{s.stage}-{i}": s.stop() for i, s in enumerate(self.services)}

    def logs_text(self) -> str:
        return "\n".join(f"== {s.log.name}\n{s.log.read_text()[-3000:]}" for s in self.services)
