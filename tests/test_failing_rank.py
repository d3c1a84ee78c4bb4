"""A rank that raises ends a two-rank job within seconds (polar.distributed.
failures_end_the_job), naming the rank and the error, instead of leaving the other rank
in a collective until the process group's 30-minute timeout; rank 0 records the reason."""

import multiprocessing as mp
import time

import pytest

from tests.mlflow_server import free_port


def _rank(rank: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from polar.distributed import DistEnv, failures_end_the_job, init_distributed

    torch.set_num_threads(1)
    env = DistEnv(rank, 2, rank, "127.0.0.1", port, "test")
    init_distributed(env, backend="gloo")

    def record(reason: str) -> None:
        with open(out, "w") as f:
            f.write(reason)

    try:
        with failures_end_the_job(env, on_failure=record if rank == 0 else None, poll_s=0.5):
            dist.barrier()
            if rank == 1:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated) on rank 1")
            dist.all_reduce(torch.ones(1))      # rank 1 never joins: without the watchdog, 30 minutes
    except torch.OutOfMemoryError:
        time.sleep(20)     # a rank stuck after its error (as NCCL ranks are): its peer's collective never ends
        raise


@pytest.mark.timeout(90)
def test_a_rank_that_raises_ends_the_job_within_a_minute(tmp_path):
    ctx, port, out = mp.get_context("spawn"), free_port(), str(tmp_path / "reason.txt")
    procs = [ctx.Process(target=_rank, args=(rank, port, out)) for rank in (0, 1)]
    start = time.monotonic()
    for p in procs:
        p.start()
    procs[0].join(timeout=15)
    took = time.monotonic() - start
    alive = procs[0].is_alive()
    procs[1].join(timeout=60)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not alive and took < 15, "rank 0 still waits in its collective"
    assert procs[0].exitcode == 1 and procs[1].exitcode == 1
    reason = open(out).read()
    assert reason.startswith("rank 1 raised OutOfMemoryError: CUDA out of memory (simulated) on rank 1")
