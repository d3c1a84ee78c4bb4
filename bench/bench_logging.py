"""Benchmark of tracking overhead in training (not a test).

Trains cpu_ladder jobs (`+experiment=cpu_ladder model=M`: its data, batch, LR and
eval cadence) with the job's real sink: SkipLogged(TeeSink(JsonlSink, MLflowSink)) into
a fresh sqlite MLflow store (the embedded default; `--uri` for a server). Measured:

- main-thread time inside sink calls (what training waits for: queueing the points,
  writing metrics.jsonl), timed around every call;
- CPU time of the MLflow sink's delivery thread (its own thread CPU clock; on a
  2-core machine it competes with training), and
- the training wall time (fit: steps, evaluations, checkpoints).

Overhead per step = (sink-call time + delivery CPU) / steps, as a share of the step
time (fit wall time / steps). Reported apart: the run's end (final metrics, the drain
of the queue, the `model` artifact upload), paid once per run. With `--ab`, also the
plain difference in fit wall time against a NullSink run (noisy on a shared machine).

With --max-steps the run is cut short but keeps its n_evals flushes, so the share is
an upper bound of the full run's.

Usage: .venv/bin/python bench/bench_logging.py [--models 20k,200k,800k] [--max-steps N] [--ab]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class TimedSink:
    """Times every call the training thread makes into the wrapped sink."""

    def __init__(self, sink):
        self.sink, self.seconds, self.calls = sink, 0.0, 0

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1

    def log_params(self, params):
        return self._timed(self.sink.log_params, params)

    def log_many(self, points):
        return self._timed(self.sink.log_many, points)

    def set_tags(self, tags):
        return self._timed(self.sink.set_tags, tags)

    def finish(self, status="FINISHED"):
        return self.sink.finish(status)


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def compose_job(model: str):
    from hydra import compose, initialize_config_dir

    from sweeps.schema import register, to_job_config

    register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=cpu_ladder", f"model={model}"])
    return to_job_config(cfg)


def train(job, data, plan, steps, run_dir, sink):
    """Train a copy of the inputs' model (the same initial weights for every call)."""
    import copy

    from polar.trainer import fit

    model = copy.deepcopy(data.model)
    cfg = job.train.for_trainer(plan.lr, plan.batch_size)
    t0 = time.perf_counter()
    result = fit(model, data.train, data.val, data.special, cfg, steps, plan.flops_per_token, run_dir, sink,
                 progress=False)
    return model, result, time.perf_counter() - t0


def bench_model(name: str, uri: str, max_steps: int | None, ab: bool, tmp: Path) -> dict:
    import torch

    from polar import names
    from polar.inputs import pretrain_inputs
    from polar.sinks import JsonlSink, MLflowSink, NullSink, SkipLogged, TeeSink
    from sweeps.jobs import plan_of, run_key, run_params
    from sweeps.runs import create_run, ensure_experiment

    job = compose_job(name)
    if job.train.threads > 0:
        torch.set_num_threads(job.train.threads)
    plan = plan_of(job)
    steps = min(plan.steps, max_steps or plan.steps)
    data = pretrain_inputs(job.model, job.data, job.paths.cache_dir, job.seed)
    exp = ensure_experiment("bench-logging", uri) if not uri.startswith("sqlite:") else \
        _client(uri).create_experiment(f"bench-logging-{name}", artifact_location=str(tmp / "artifacts"))
    run_id = create_run(exp, f"bench-{name}", {names.KIND_TAG: "bench"}, uri)
    remote = MLflowSink(run_id, uri)
    run_dir = tmp / f"run-{name}"
    sink = TimedSink(SkipLogged(TeeSink(JsonlSink(run_dir / names.METRICS_FILE), remote), {}))
    sink.log_params(run_params(job, plan, run_key(job), data.data_id).as_dict())
    model, result, wall = train(job, data, plan, steps, run_dir, sink)
    delivery_cpu = remote.cpu_seconds

    t0 = time.perf_counter()                          # the run's end, as JobRun.complete does it
    sink.log_many([({names.VAL_LOSS_FINAL: result.val_loss}, result.steps)])
    model.save_pretrained(run_dir / "model")
    remote.log_artifacts(str(run_dir / "model"), "model")
    undelivered = sink.finish("FINISHED")
    end_s = time.perf_counter() - t0

    out = {"model": name, "n_params": plan.n_params, "steps": steps, "plan_steps": plan.steps,
           "wall_s": wall, "step_ms": 1e3 * wall / steps, "sink_calls": sink.calls,
           "sink_ms": 1e3 * sink.seconds, "delivery_cpu_ms": 1e3 * delivery_cpu, "end_s": end_s,
           "undelivered": undelivered}
    out["overhead_us_per_step"] = 1e6 * (sink.seconds + delivery_cpu) / steps
    out["share"] = (sink.seconds + delivery_cpu) / wall
    if ab:
        _, _, base_wall = train(job, data, plan, steps, tmp / f"base-{name}", NullSink())
        out["ab_share"] = (wall - base_wall) / base_wall
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="20k,200k,800k")
    ap.add_argument("--max-steps", type=int, default=None, help="cap on steps per run (default: the full plan)")
    ap.add_argument("--uri", default=None, help="tracking URI (default: a fresh sqlite file)")
    ap.add_argument("--ab", action="store_true", help="also time a NullSink run of each model")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        uri = args.uri or f"sqlite:///{tmp}/mlflow.db"
        import torch

        print(f"{platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch "
              f"{torch.__version__} ({torch.get_num_threads()} threads), "
              f"load average {os.getloadavg()[0]:.1f}, tracking {'sqlite (fresh file)' if not args.uri else uri}")
        rows = []
        for name in args.models.split(","):
            row = bench_model(name, uri, args.max_steps, args.ab, Path(tmp))
            rows.append(row)
            ab = f", A/B {100 * row['ab_share']:+.1f}%" if "ab_share" in row else ""
            print(f"{name:>5}: {row['steps']}/{row['plan_steps']} steps, step {row['step_ms']:.1f} ms; sink calls "
                  f"{row['sink_calls']} took {row['sink_ms']:.1f} ms, delivery thread {row['delivery_cpu_ms']:.1f} ms "
                  f"CPU -> {row['overhead_us_per_step']:.1f} us/step = {100 * row['share']:.3f}% of step time{ab}; "
                  f"run end {row['end_s']:.2f} s; undelivered {row['undelivered']}", flush=True)
        print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
