"""Metric sinks: where a training run's parameters, metrics and tags go.

One protocol, three sinks: MLflowSink (the default; batched log_batch calls), JsonlSink
(a file beside the checkpoints, always written, so that nothing is lost when the tracking
server is away), NullSink (tracking=off). TeeSink fans out to several. MLflow is imported
only inside MLflowSink and the helpers below.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable, Protocol

MAX_BATCH = 1000   # MLflow's limit of metrics per log_batch call


class MetricSink(Protocol):
    def log_params(self, params: dict) -> None: ...
    def log_many(self, points: Iterable[tuple[dict[str, float], int]]) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullSink:
    def log_params(self, params): pass
    def log_many(self, points): pass
    def set_tags(self, tags): pass
    def finish(self, status="FINISHED"): pass


class JsonlSink:
    """Appends one JSON object per metric point (and params/tags records) to a file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, records: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    def log_params(self, params):
        self._write([{"params": {k: str(v) for k, v in params.items()}}])

    def log_many(self, points):
        now = time.time()
        self._write([{"step": step, "time": now, **metrics} for metrics, step in points])

    def set_tags(self, tags):
        self._write([{"tags": {k: str(v) for k, v in tags.items()}}])

    def finish(self, status="FINISHED"):
        self._write([{"status": status, "time": time.time()}])


class MLflowSink:
    """Logs into an existing MLflow run, batching metrics with log_batch."""

    def __init__(self, run_id: str, tracking_uri: str | None = None):
        from mlflow import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def log_params(self, params):
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_many(self, points):
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        metrics = [Metric(k, float(v), ts, step) for values, step in points for k, v in values.items()]
        for start in range(0, len(metrics), MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + MAX_BATCH])

    def set_tags(self, tags):
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, status="FINISHED"):
        self.client.set_terminated(self.run_id, status=status)


class TeeSink:
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
        for s in self.sinks:
            s.finish(status)


# ------------------------------------------------------------ runs and experiments

def ensure_experiment(name: str, tracking_uri: str | None = None) -> str:
    """The id of experiment `name`, created when missing. Call it once, in the submitting
    process, before jobs start (parallel creation can race in MLflow)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:         # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


def find_run(experiment_id: str, run_key: str, tracking_uri: str | None = None):
    """The newest run of this run key in the experiment, or None."""
    from mlflow import MlflowClient

    runs = MlflowClient(tracking_uri).search_runs(
        [experiment_id], filter_string=f"tags.run_key = '{run_key}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def create_run(experiment_id: str, run_name: str, tags: dict, tracking_uri: str | None = None) -> str:
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri).create_run(experiment_id, run_name=run_name,
                                                tags={k: str(v) for k, v in tags.items()})
    return run.info.run_id
