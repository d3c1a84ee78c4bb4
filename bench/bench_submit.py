"""Benchmark of the slurm launcher on the local dev cluster (not a test).

1. Submission: wall time of `python -m sweeps.run -m ... hydra/launcher=slurm
   hydra.launcher.wait=false` for N tiny jobs (model=100k, seed=range(N)), from process
   start to exit once every job is submitted, MLflow experiment and parent run included;
   plus the launcher's own split (planning, SLURM checks, sbatch). The jobs are then
   cancelled.
2. Per-job overhead: the cpu_ladder experiment (five sizes, 100k ... 3m) through
   hydra/launcher=slurm. A probe (sitecustomize.py on PYTHONPATH, exported to the jobs by
   sbatch) records the wall-clock time of each job's first training step; the overhead is
   SLURM's job start (sacct Start, 1 s resolution) to that step (interpreter start,
   submitit, Hydra, imports, data loading, MLflow run setup), as a share of the job's
   elapsed time (sacct ElapsedRaw).

Usage: SLURM_CONF=... .venv/bin/python bench/bench_submit.py [--jobs 20] [--skip-ladder]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.corpus=[pydoc,stdlib]", "data.vocab_size=512", "data.n_train=128", "data.n_val=32",
        "data.prefix_min=4", "data.prefix_max=8", "data.max_response_tokens=8",
        "data.policies=[{order:1,source:pydoc},{order:2,source:stdlib},{order:2,source:pydoc}]",
        "recipe.batch_size=8", "train.threads=1", "budget.tokens=2e4", "data.max_epochs=1000"]
CPU_CLUSTER = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1"]
PROBE = '''
import os, time
if os.environ.get("POLAR_BENCH_PROBE"):
    import polar.trainer as _t
    _orig = _t.train_step
    def train_step(*a, **k):
        if not getattr(train_step, "seen", False):
            train_step.seen = True
            e = os.environ
            key = (f"{e['SLURM_ARRAY_JOB_ID']}_{e['SLURM_ARRAY_TASK_ID']}" if "SLURM_ARRAY_JOB_ID" in e
                   else e.get("SLURM_JOB_ID", str(os.getpid())))
            path = os.path.join(e["POLAR_BENCH_PROBE"], key)
            with open(path + ".json", "w") as f:
                f.write('{"first_step": %r}' % time.time())
        return _orig(*a, **k)
    _t.train_step = train_step
'''


def run_sweep(tmp: Path, experiment: str, args: list[str], env: dict | None = None) -> tuple[float, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", **(env or {})}
    start = time.time()
    out = subprocess.run([sys.executable, "-m", "sweeps.run", "-m", *args, f"experiment_name={experiment}",
                          f"paths.cache_dir={tmp}/cache", f"paths.runs_dir={tmp}/runs",
                          f"hydra.sweep.dir={tmp}/multirun-{experiment}"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"sweep {experiment} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return time.time() - start, out.stdout


def job_ids(stdout: str) -> list[str]:
    return re.findall(r"#\d+ \S+ -> (\S+)", stdout)


def sacct(job_id: str) -> dict:
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "Start,ElapsedRaw,State"],
                         capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[-1]
    start, elapsed, state = out.split("|")
    return {"start": time.mktime(time.strptime(start, "%Y-%m-%dT%H:%M:%S")), "elapsed": int(elapsed), "state": state}


def bench_submission(tmp: Path, n: int) -> None:
    experiment = f"bench-submit-{os.getpid()}"
    wall, stdout = run_sweep(tmp, experiment, ["model=100k", f"seed=range({n})", *TINY, *CPU_CLUSTER,
                                               "hydra.launcher.wait=false"])
    ids = job_ids(stdout)
    subprocess.run(["scancel", "-n", f"polar-{experiment}"], check=False, timeout=30)
    split = re.search(r"planned in ([\d.]+) s", stdout).group(1), \
        re.search(r"SLURM checks ([\d.]+) s, submission ([\d.]+) s", stdout).groups()
    print(f"| {n} tiny jobs submitted (1 array) | {wall:.1f} s process start to exit; planning {split[0]} s, "
          f"SLURM checks {split[1][0]} s, sbatch {split[1][1]} s; {len(ids)} job ids |")


def bench_ladder(tmp: Path) -> None:
    from hydra import compose, initialize_config_dir

    from sweeps.data_sets import needed, synthesize_missing
    from sweeps.schema import register, to_job_config

    register()   # build the shared data once, as a sweep's first job would
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        job = to_job_config(compose("config", ["+experiment=cpu_ladder", f"paths.cache_dir={tmp}/cache"]))
    synthesize_missing(needed([job]))
    probe_dir = tmp / "probe"
    probe_dir.mkdir()
    site = tmp / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(PROBE)
    env = {"PYTHONPATH": f"{site}:{os.environ.get('PYTHONPATH', '')}".rstrip(":")}
    experiment = f"bench-ladder-{os.getpid()}"
    # the jobs inherit the submitting process's environment through sbatch (--export=ALL)
    wall, stdout = run_sweep(tmp, experiment, ["+experiment=cpu_ladder", *CPU_CLUSTER, "hydra.launcher.poll_s=1"],
                             env={**env, "POLAR_BENCH_PROBE": str(probe_dir)})
    models = dict(re.findall(r"#\d+ (\S+) -> (\S+)", stdout))
    shares = []
    for model, job_id in models.items():
        acct = sacct(job_id)
        first = json.loads((probe_dir / f"{job_id}.json").read_text())["first_step"]
        overhead = first - acct["start"]
        shares.append(overhead / acct["elapsed"])
        print(f"| cpu_ladder {model} (job {job_id}) | start to first step {overhead:.1f} s of "
              f"{acct['elapsed']} s elapsed = {100 * shares[-1]:.0f}% |")
    print(f"| cpu_ladder, all five | sweep wall {wall:.0f} s; overhead share median "
          f"{100 * sorted(shares)[len(shares) // 2]:.0f}% |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--skip-ladder", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-submit-"))
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    bench_submission(tmp, args.jobs)
    if not args.skip_ladder:
        bench_ladder(tmp)


if __name__ == "__main__":
    main()
