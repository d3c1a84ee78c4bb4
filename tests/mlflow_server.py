"""A real `mlflow server` for tests: 127.0.0.1, a free port, a sqlite store in a folder.

    with MlflowServer(tmp_path) as server:       # or server.start() / server.stop()
        client = MlflowClient(server.uri)

The server takes 15 to 40 s to answer /health on a 2-core machine, so start one per test
module (see the `server` fixture in tests/test_tracking_mlflow.py). `stop()` then
`start()` restarts it on the same port and store, to test a tracking outage.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false keeps it from starting its 7 job workers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path, port: int | None = None, workers: int = 2):
        self.root, self.port, self.workers = Path(root), port or free_port(), workers
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = START_TIMEOUT_S) -> "MlflowServer":
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", str(self.workers),
               "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self._log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)   # its own group: stop() ends its workers too
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}; "
                                   f"see {self.root / 'server.log'}:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server on port {self.port} did not answer /health in {timeout:.0f} s:\n"
                           f"{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        self.proc = None
        self._log.close()
        deadline = time.monotonic() + 10      # the port must be free before a restart
        while self.healthy() and time.monotonic() < deadline:
            time.sleep(0.2)

    def log_tail(self, chars: int = 3000) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def log_points_worker(run_id: str, uri: str, steps: int, flush_every: int, barrier) -> None:
    """A job's logging, alone in a process: `steps` train points (and a val point per
    flush) through MLflowSink, flushed every `flush_every` steps like polar.trainer.fit.
    Exits 0 only when every point was delivered (multiprocessing target; spawn-safe)."""
    from polar.sinks import MLflowSink

    sink = MLflowSink(run_id, uri)
    barrier.wait(timeout=120)            # all processes log at once
    buffer = []
    for step in range(1, steps + 1):
        buffer.append(({"train/loss": 1.0 / step, "lr": 1e-3}, step))
        if step % flush_every == 0 or step == steps:
            buffer.append(({"val/loss": 2.0 / step, "tokens_seen": 64 * step, "flops_seen": 6e5 * step}, step))
            sink.log_many(buffer)
            buffer = []
    left = sink.finish("FINISHED", timeout=240)
    if left or sink.failures:
        print(f"worker {run_id[:8]}: {left} undelivered, {sink.failures} failed deliveries, last error "
              f"{sink.last_error}", file=sys.stderr)
    sys.exit(1 if left else 0)
