"""One `revkernel gateway` subprocess on its own port (workers=1), logs to a file, stopped by a real
signal. For tests of what survives a process: shutdown drains, counters flushed at exit, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

from aiohttp import ClientSession

from tests.conftest import free_port


class GatewayProcess:
    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.env = {**env, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(self.port)}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, *, require_broker: bool = True, timeout_s: float = 30) -> GatewayProcess:
        """Start and wait until /readyz is 200 (and the broker connected, unless told otherwise)."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "gateway", "--workers", "1"],
                env=self.env, stdout=log, stderr=log,
            )
        deadline = time.monotonic() + timeout_s
        async with ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(OSError):
                    async with session.get(f"{self.url}/readyz") as response:
                        body = await response.json()
                        if response.status == 200 and (body["checks"]["rabbitmq"] or not require_broker):
                            return self
                await asyncio.sleep(0.05)
        raise RuntimeError(f"gateway on {self.port} did not become ready:\n{self.log_tail()}")

    def terminate(self) -> None:
        """SIGTERM: stop accepting, drain in-flight requests, flush, close."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    async def wait(self, timeout_s: float = 60) -> int:
        assert self.process is not None
        process = self.process
        code = await asyncio.to_thread(process.wait, timeout_s)
        self.process = None
        return code

    async def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            code = self.process.returncode if self.process is not None else 0
            self.process = None
            return code
        self.terminate()
        return await self.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
