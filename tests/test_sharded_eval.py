"""Evaluation shared by the ranks: two gloo ranks (FSDP, so every rank must join every
forward) each evaluate their share of an unevenly split validation set, and the reduced
loss and accuracy equal one process evaluating all of it."""

import pytest

from tests.fixtures import join_gloo, spawn_two_ranks

N_VAL, BATCH = 13, 3        # shares of 7 and 6 rows: 3 and 2 chunks, so rank 1 runs one that counts for nothing


def _rank(rank: int, port: int, queue) -> None:

    from polar.distributed import wrap_model
    from polar.trainer import evaluate
    from tests.fixtures import RANDOM_IDS_MODEL, SPECIAL, random_triplets, seeded_model

    env = join_gloo(rank, port)
    model = wrap_model(seeded_model(SPECIAL, RANDOM_IDS_MODEL), "fsdp", env)
    queue.put(evaluate(model, random_triplets(N_VAL, seed=5, shortest=1, longest=10), SPECIAL, batch_size=BATCH,
                       env=env))


@pytest.mark.timeout(180)
def test_sharded_evaluation_equals_one_process():
    from polar.trainer import evaluate
    from tests.fixtures import RANDOM_IDS_MODEL, SPECIAL, random_triplets, seeded_model

    whole = evaluate(seeded_model(SPECIAL, RANDOM_IDS_MODEL), random_triplets(N_VAL, seed=5, shortest=1, longest=10),
                     SPECIAL, batch_size=64)
    for loss, acc in spawn_two_ranks(_rank):
        assert loss == pytest.approx(whole[0], abs=1e-6) and acc == pytest.approx(whole[1], abs=1e-6)
