"""Evaluation shared by the ranks: two gloo ranks (FSDP, so every rank must join every
forward) each evaluate their share of an unevenly split validation set, and the reduced
loss and accuracy equal one process evaluating all of it."""

import multiprocessing as mp

import pytest

from tests.mlflow_server import free_port

N_VAL, BATCH = 13, 3        # shares of 7 and 6 rows: 3 and 2 chunks, so rank 1 runs one that counts for nothing


def _rank(rank: int, port: int, queue) -> None:
    import torch

    from polar.distributed import DistEnv, init_distributed, wrap_model
    from polar.trainer import evaluate
    from tests.fixtures import RANDOM_IDS_MODEL, SPECIAL, random_triplets, seeded_model

    torch.set_num_threads(1)
    env = DistEnv(rank, 2, rank, "127.0.0.1", port, "test")
    init_distributed(env, backend="gloo")
    model = wrap_model(seeded_model(SPECIAL, RANDOM_IDS_MODEL), "fsdp", env)
    queue.put(evaluate(model, random_triplets(N_VAL, seed=5, shortest=1, longest=10), SPECIAL, batch_size=BATCH,
                       env=env))


@pytest.mark.timeout(180)
def test_sharded_evaluation_equals_one_process():
    from polar.trainer import evaluate
    from tests.fixtures import RANDOM_IDS_MODEL, SPECIAL, random_triplets, seeded_model

    whole = evaluate(seeded_model(SPECIAL, RANDOM_IDS_MODEL), random_triplets(N_VAL, seed=5, shortest=1, longest=10),
                     SPECIAL, batch_size=64)
    ctx, port = mp.get_context("spawn"), free_port()
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(rank, port, queue)) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(150)
    assert [p.exitcode for p in procs] == [0, 0]
    for loss, acc in (queue.get(timeout=5) for _ in procs):
        assert loss == pytest.approx(whole[0], abs=1e-6) and acc == pytest.approx(whole[1], abs=1e-6)
