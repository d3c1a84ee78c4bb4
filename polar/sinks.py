"""Metric sinks: where a training run's parameters, metrics and tags go.

One protocol, three sinks: MLflowSink (the default), JsonlSink (a file beside the
checkpoints, always written, so that nothing is lost when the tracking server is away),
NullSink (tracking=off). TeeSink fans out to several; SkipLogged drops the points a
resumed run already logged. `read_jsonl` reads a JsonlSink's file back.

MLflowSink never blocks training on the server: calls only queue work, and a background
thread delivers it in batches (log_batch, <= 1000 metrics a call), retrying with
exponential backoff while the server is unreachable or answers with errors, and replaying
the queue, in order, when it is back; an outage is logged once when it starts and once
when it ends (urllib3's per-retry warnings are filtered out). `finish` waits a bounded
time for the queue to drain and returns the number of metric points it could not
deliver (and says so loudly).

No run lifecycle here (finding, creating, resuming or failing runs: sweeps.runs), and no
names (polar.names). MLflow is imported only inside functions (its import takes seconds).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

MAX_BATCH = 1000   # MLflow's limit of metrics per log_batch call
MAX_PARAMS = 100   # ... of params per call
MAX_TAGS = 100     # ... of tags per call
DRAIN_TIMEOUT_S = float(os.environ.get("POLAR_TRACKING_DRAIN_S", "120"))
# MLflow error codes that retrying cannot fix: the task is dropped (and reported)
PERMANENT_ERRORS = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE",
                              "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS", "PERMISSION_DENIED"})

log = logging.getLogger("polar.sinks")


class MetricSink(Protocol):
    def log_params(self, params: dict) -> None: ...
    def log_many(self, points: Iterable[tuple[dict[str, float], int]]) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def finish(self, status: str = "FINISHED") -> Any: ...


class NullSink:
    def log_params(self, params): pass
    def log_many(self, points): pass
    def set_tags(self, tags): pass
    def finish(self, status="FINISHED"): pass


class JsonlSink:
    """Appends one JSON object per metric point (and params/tags/status records) to a file.

    A line torn by a kill (no final newline) is cut off when the file is reopened, so
    the next record starts on a line of its own.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _cut_torn_tail(self.path)

    def _write(self, records: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()

    def log_params(self, params):
        self._write([{"params": {k: str(v) for k, v in params.items()}}])

    def log_many(self, points):
        now = time.time()
        self._write([{"step": step, "time": now, **metrics} for metrics, step in points])

    def set_tags(self, tags):
        self._write([{"tags": {k: str(v) for k, v in tags.items()}}])

    def finish(self, status="FINISHED"):
        self._write([{"status": status, "time": time.time()}])


def _cut_torn_tail(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)


class TeeSink:
    """Fans every call out to several sinks; finish returns the last non-None result."""

    def __init__(self, *sinks: MetricSink):
        self.sinks = sinks

    def log_params(self, params):
        for s in self.sinks:
            s.log_params(params)

    def log_many(self, points):
        points = list(points)
        for s in self.sinks:
            s.log_many(points)

    def set_tags(self, tags):
        for s in self.sinks:
            s.set_tags(tags)

    def finish(self, status="FINISHED"):
        results = [s.finish(status) for s in self.sinks]
        return next((r for r in reversed(results) if r is not None), None)


class SkipLogged:
    """Drops the metric points a resumed job already logged, so a job resumed from an older
    checkpoint than its last flush never logs a step twice. `logged` maps a key to the
    steps logged for it (e.g. a JsonlRun's metrics): a point is dropped when its step is
    among them, so one damaged step in the file (55 written as 955) drops that point only,
    never every later one; the resume itself decides from the checkpoint. An int instead
    of steps means every step up to it."""

    def __init__(self, sink: MetricSink, logged: dict[str, int | Iterable[int]]):
        self.sink = sink
        self.logged = {k: v if isinstance(v, int) else frozenset(v) for k, v in logged.items()}

    def _seen(self, key: str, step: int) -> bool:
        done = self.logged.get(key)
        return done is not None and (step <= done if isinstance(done, int) else step in done)

    def log_params(self, params):
        self.sink.log_params(params)

    def log_many(self, points):
        kept = []
        for metrics, step in points:
            fresh = {k: v for k, v in metrics.items() if not self._seen(k, step)}
            if fresh:
                kept.append((fresh, step))
        if kept:
            self.sink.log_many(kept)

    def set_tags(self, tags):
        self.sink.set_tags(tags)

    def finish(self, status="FINISHED"):
        return self.sink.finish(status)


# ------------------------------------------------------------------ MLflow sink

@dataclass
class _Task:
    kind: str                 # resolve | call | metrics | params | tags | text | artifacts | status | ...
    payload: Any
    points: int = 0           # metric points carried (what "undelivered" counts)
    tries: int = 0


class MLflowSink:
    """Logs into an MLflow run from a background thread; see the module docstring.

    `run_id` may be None when the server could not be reached to find or create the
    run: `resolve` (called with an MlflowClient in the delivery thread, retried like any
    delivery) must then return the run id before anything else is delivered.
    """

    def __init__(self, run_id: str | None, tracking_uri: str | None = None, *,
                 resolve: Callable[[Any], str] | None = None, drain_timeout: float = DRAIN_TIMEOUT_S,
                 backoff: tuple[float, float] = (0.5, 30.0), client=None):
        if run_id is None and resolve is None:
            raise ValueError("MLflowSink needs a run_id or a resolve function that returns one")
        if client is None:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri)
        quiet_urllib3_retries()
        self.client, self.run_id, self.uri = client, run_id, tracking_uri
        self.drain_timeout, self.backoff = drain_timeout, backoff
        self._queue: deque[_Task] = deque()
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._inflight: _Task | None = None
        self._closing = self._abandoned = self._outage = False
        self._thread: threading.Thread | None = None
        self.failures = 0            # failed delivery attempts (each retried)
        self.dropped_points = 0      # metric points refused for good by the server
        self.last_error: str | None = None
        self.undelivered: int | None = None   # set by finish
        self.cpu_seconds = 0.0       # CPU time the delivery thread used (bench/bench_logging.py)
        if resolve is not None and run_id is None:
            self._put(_Task("resolve", resolve))

    # ---- the MetricSink interface: queue only, never wait on the server
    def log_params(self, params):
        items = [(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS):
            self._put(_Task("params", items[start:start + MAX_PARAMS]))

    def log_many(self, points):
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        metrics = [Metric(k, float(v), ts, int(step)) for values, step in points for k, v in values.items()]
        for start in range(0, len(metrics), MAX_BATCH):
            chunk = metrics[start:start + MAX_BATCH]
            self._put(_Task("metrics", chunk, points=len(chunk)))

    def set_tags(self, tags):
        items = [(k, str(v)) for k, v in tags.items()]
        for start in range(0, len(items), MAX_TAGS):
            self._put(_Task("tags", items[start:start + MAX_TAGS]))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._put(_Task("text", (text, artifact_file)))

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self._put(_Task("artifacts", (str(local_dir), artifact_path)))

    def set_status(self, status: str) -> None:
        """RUNNING again on resume (finish sets the terminal status)."""
        self._put(_Task("status", status))

    def delete_tag(self, key: str) -> None:
        self._put(_Task("delete_tag", key))

    def call(self, fn: Callable[[Any, str], None]) -> None:
        """Queue fn(client, run_id), delivered (and retried) in order with the rest."""
        self._put(_Task("call", fn))

    def finish(self, status="FINISHED", timeout: float | None = None) -> int:
        """End the run with `status` once everything queued before is delivered; wait at
        most `timeout` s (default drain_timeout). Returns the undelivered metric points."""
        self._put(_Task("terminate", status))
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._wake.set()
        self.flush(self.drain_timeout if timeout is None else timeout)
        with self._cond:
            self._abandoned = True
            left = self._pending_locked()
            self._cond.notify_all()
        self._wake.set()
        self.undelivered = left + self.dropped_points
        if self.undelivered:
            run = f"MLflow run {self.run_id}" if self.run_id else "a run never created (the server was not reached)"
            shout(f"{self.undelivered} metric points of {run} were NOT delivered to "
                  f"{self._where()} (last error: {self.last_error or 'none, the first try was cut short'}); they are in "
                  "the run's metrics.jsonl: re-run the same job (it resumes and replays them) or replay them "
                  "with `python -m sweeps.runs replay RUN_DIR`")
        return self.undelivered

    def _where(self) -> str:
        """The tracking URI this sink delivers to, as it may be printed."""
        return redact(self.uri or os.environ.get("MLFLOW_TRACKING_URI")) or "the default tracking URI"

    # ---- state
    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` s until everything queued is delivered; True if it was."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._inflight is not None:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                self._cond.wait(min(left, 1.0))
        return True

    @property
    def pending_points(self) -> int:
        with self._cond:
            return self._pending_locked()

    def _pending_locked(self) -> int:
        return sum(t.points for t in self._queue) + (self._inflight.points if self._inflight else 0)

    # ---- delivery thread
    def _put(self, task: _Task) -> None:
        with self._cond:
            if self._abandoned:
                raise RuntimeError(f"MLflowSink for run {self.run_id} is finished; nothing more can be logged")
            self._queue.append(task)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="polar-mlflow-sink", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _next_locked(self) -> _Task:
        """The head task; consecutive metric tasks are merged up to MAX_BATCH (a replay
        after an outage goes in full batches)."""
        task = self._queue.popleft()
        if task.kind == "metrics":
            merged = list(task.payload)
            while self._queue and self._queue[0].kind == "metrics" \
                    and len(merged) + len(self._queue[0].payload) <= MAX_BATCH:
                merged.extend(self._queue.popleft().payload)
            task = _Task("metrics", merged, points=len(merged), tries=task.tries)
        return task

    def _run(self) -> None:
        delay, cpu0 = self.backoff[0], time.thread_time()
        while True:
            self.cpu_seconds = time.thread_time() - cpu0
            with self._cond:
                while not self._queue and not self._abandoned:
                    self._cond.wait()
                if self._abandoned:
                    return
                task = self._inflight = self._next_locked()
            try:
                self._deliver(task)
            except Exception as err:   # noqa: BLE001 - every failure is either retried or reported
                if self._permanent(err):
                    self._drop(task, err)
                    continue
                self.failures += 1
                task.tries += 1
                self.last_error = redact(f"{type(err).__name__}: {str(err)[:300]}")
                if not self._outage:          # one line per outage, however long it lasts
                    self._outage = True
                    log.warning("MLflow at %s cannot be reached (%s); retrying with backoff, %d metric "
                                "points queued", self._where(), self.last_error, self.pending_points)
                with self._cond:
                    self._queue.appendleft(task)
                    self._inflight = None
                    self._cond.notify_all()
                cap = 5.0 if self._closing else self.backoff[1]
                self._wake.wait(min(delay, cap) * random.uniform(0.8, 1.2))
                self._wake.clear()
                delay = min(delay * 2, self.backoff[1])
                continue
            delay = self.backoff[0]
            if self._outage:
                self._outage = False
                log.warning("MLflow at %s answers again; delivering what was queued", self._where())
            with self._cond:
                self._inflight = None
                self._cond.notify_all()

    def _deliver(self, task: _Task) -> None:
        from mlflow.entities import Param, RunTag

        c, rid = self.client, self.run_id
        if task.kind == "resolve":
            self.run_id = task.payload(c)
        elif task.kind == "call":
            task.payload(c, rid)
        elif task.kind == "metrics":
            c.log_batch(rid, metrics=task.payload)
        elif task.kind == "params":
            c.log_batch(rid, params=[Param(k, v) for k, v in task.payload])
        elif task.kind == "tags":
            c.log_batch(rid, tags=[RunTag(k, v) for k, v in task.payload])
        elif task.kind == "text":
            c.log_text(rid, *task.payload)
        elif task.kind == "artifacts":
            c.log_artifacts(rid, *task.payload)
        elif task.kind == "status":
            c.update_run(rid, status=task.payload)
        elif task.kind == "delete_tag":
            if task.payload in c.get_run(rid).data.tags:
                c.delete_tag(rid, task.payload)
        elif task.kind == "terminate":
            c.set_terminated(rid, status=task.payload)
        else:
            raise ValueError(f"unknown task kind {task.kind!r}")

    @staticmethod
    def _permanent(err: BaseException) -> bool:
        return getattr(err, "error_code", None) in PERMANENT_ERRORS

    def _drop(self, task: _Task, err: BaseException) -> None:
        self.dropped_points += task.points
        self.last_error = redact(f"{type(err).__name__}: {str(err)[:300]}")
        log.error("MLflow refused a %s delivery for run %s for good (%s); dropped%s", task.kind, self.run_id,
                  self.last_error, f" {task.points} metric points" if task.points else "")
        with self._cond:
            self._inflight = None
            self._cond.notify_all()


_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*\\?://)(?P<userinfo>[^/\s@]*(?:@[^/\s@]*)*)@")


def redact(text: str | None) -> str | None:
    """`text` (a URI, or a message that holds URIs) with each URI's password replaced by
    ***: http://user:TOKEN@host -> http://user:***@host; a user part without a password
    (often a token itself) becomes ***. Everything printed or stored about a tracking
    URI goes through here."""
    if text is None:
        return None

    def hide(m: re.Match) -> str:
        user, colon, _ = m["userinfo"].partition(":")
        return f"{m['scheme']}{user + ':***' if colon else '***'}@"

    return _USERINFO.sub(hide, str(text))


def hide_run_urls(uri: str | None) -> None:
    """MLflow prints "View run NAME at: URL" with the tracking URI's credentials when it
    ends a run: keep it quiet for a URI that carries any (this process and its children)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri and redact(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


class _NoRetryNoise(logging.Filter):
    """Drops urllib3's "Retrying (Retry(total=...)) after connection broken by ..." lines:
    the sink says once per outage that the server is away (several per failed call else)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Retrying")


_RETRY_FILTER = _NoRetryNoise()


def quiet_urllib3_retries() -> None:
    """Keep urllib3's per-retry warnings out of the log (idempotent)."""
    logger = logging.getLogger("urllib3.connectionpool")
    if _RETRY_FILTER not in logger.filters:
        logger.addFilter(_RETRY_FILTER)


def shout(message: str) -> None:
    """A warning nobody can miss: the log and a framed line on stderr."""
    log.error(message)
    bar = "!" * 78
    print(f"\n{bar}\n!! {message}\n{bar}\n", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ reading JSONL

@dataclass
class JsonlRun:
    """A metrics.jsonl read back: params and tags (merged, last wins), the last status
    record (None while running or killed), metrics as {key: {step: value}} (the first
    value logged for a step wins), and the lines skipped as damaged ("FILE:LINE: what")."""

    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    status: str | None = None
    metrics: dict[str, dict[int, float]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def last_steps(self) -> dict[str, int]:
        return {k: max(v) for k, v in self.metrics.items() if v}

    def points(self) -> int:
        return sum(len(v) for v in self.metrics.values())


def read_jsonl(path: str | Path, warn: bool = True) -> JsonlRun:
    """Read a metrics.jsonl written by JsonlSink. A torn last line (a kill mid-write) is
    ignored; any other line that is not a JSON object of a known record, and the metric
    lines whose step breaks the file's rising order (the fewest such that the rest rise),
    are skipped and listed in `problems` with file and line (with a warning, when `warn`)."""
    out, path = JsonlRun(), Path(path)
    if not path.exists():
        return out
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    points = []
    for number, line in enumerate(lines, 1):
        rec, problem = _parse_record(line)
        if problem is not None:
            if number < len(lines) or line.endswith("\n"):
                out.problems.append(f"{path}:{number}: {problem}")
        elif "params" in rec:             # written at each (re)start of the job
            out.params.update(rec["params"])
            out.status = None
        elif "tags" in rec:
            out.tags.update(rec["tags"])
        elif "status" in rec:
            out.status = rec["status"]
        else:
            points.append((number, rec["step"], {k: v for k, v in rec.items() if k not in ("step", "time")}))
    for number, step, metrics in _rising(points, path, out.problems):
        for k, v in metrics.items():
            out.metrics.setdefault(k, {}).setdefault(step, float(v))
    if out.problems and warn:
        more = f" (and {len(out.problems) - 5} more)" if len(out.problems) > 5 else ""
        log.warning("%d damaged lines of %s skipped: %s%s", len(out.problems), path,
                    "; ".join(out.problems[:5]), more)
    return out


def _parse_record(line: str) -> tuple[dict | None, str | None]:
    """(record, None), or (None, what is wrong with the line)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"not JSON ({err.msg}): {line.strip()[:80]!r}"
    if not isinstance(rec, dict):
        return None, f"not a JSON object: {line.strip()[:80]!r}"
    for kind in ("params", "tags"):
        if kind in rec:
            return (rec, None) if isinstance(rec[kind], dict) else (None, f"{kind} is not an object")
    if "status" in rec:
        return rec, None
    if "step" not in rec:
        return None, "none of params, tags, status or step"
    step = rec["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None, f"step {step!r} is not a whole number >= 0"
    for k, v in rec.items():
        if k != "step" and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            return None, f"{k} = {v!r} is not a number"
    return rec, None


def _rising(points: list[tuple[int, int, dict]], path: Path, problems: list[str]) -> list[tuple[int, int, dict]]:
    """The longest run of metric lines whose steps never fall (a job logs its steps in
    order, and a resumed one skips those already logged); each other line is reported."""
    import bisect

    tails, tail_at, before = [], [], [-1] * len(points)   # patience sort with back links
    for i, (_, step, _) in enumerate(points):
        j = bisect.bisect_right(tails, step)
        before[i] = tail_at[j - 1] if j else -1
        tails[j:j + 1], tail_at[j:j + 1] = [step], [i]
    keep, i = set(), tail_at[-1] if tail_at else -1
    while i >= 0:
        keep.add(i)
        i = before[i]
    last = -1
    for i, (number, step, _) in enumerate(points):
        if i in keep:
            last = step
        else:
            problems.append(f"{path}:{number}: step {step} is out of order (the lines kept are at step {last} "
                            "just before it and rise from there)")
    return [p for i, p in enumerate(points) if i in keep]
