"""FSDP2 without a whole model on every rank (polar.distributed.shard_from_rank0): two
gloo ranks build the architecture on the meta device, materialise only their shards and
receive rank 0's weights; the result equals the model built eagerly and sharded, weights
and buffers (rotary frequencies) and rewards alike, and rank 1 never held a whole one."""

import pytest

from tests.fixtures import join_gloo, spawn_two_ranks


def _rank(rank: int, port: int, queue) -> None:
    import torch

    from polar.distributed import full_state_dict, shard_from_rank0, wrap_model
    from polar.trainer import collate, scores
    from tests.fixtures import RANDOM_IDS_MODEL, SPECIAL, random_triplets, seeded_model

    env = join_gloo(rank, port)
    eager = wrap_model(seeded_model(SPECIAL, RANDOM_IDS_MODEL, seed=3), "fsdp", env)
    built = shard_from_rank0(seeded_model(SPECIAL, RANDOM_IDS_MODEL, seed=3) if rank == 0 else None, env,
                             torch.device("cpu"))
    local = {name: (p.to_local().numel(), p.numel()) for name, p in built.named_parameters()}
    a, b = full_state_dict(eager), full_state_dict(built)
    batch = collate(random_triplets(4, seed=1, shortest=1, longest=9), SPECIAL, packing=False)
    with torch.no_grad():
        rewards = [torch.cat(scores(m, batch, "cpu")) for m in (eager, built)]
    queue.put((rank, sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a),
               all(torch.equal(x, y) for (_, x), (_, y) in zip(eager.named_buffers(), built.named_buffers())),
               torch.allclose(rewards[0], rewards[1], atol=1e-6), local))


@pytest.mark.timeout(180)
def test_shards_built_on_meta_equal_the_eager_model():
    for rank, same_weights, same_buffers, same_rewards, local in spawn_two_ranks(_rank):
        assert same_weights and same_buffers and same_rewards, rank
        big = {name: shape for name, shape in local.items() if shape[1] >= 64}
        assert big and all(mine < whole for mine, whole in big.values())      # only shards were allocated
