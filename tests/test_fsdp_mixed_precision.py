"""FSDP2 with POLAR's bf16 mixed precision on two gloo ranks: the sharded master weights
and AdamW's state stay float32, the step computes in bf16 (its loss differs from fp32's
by bf16 rounding only)."""

import pytest

from tests.fixtures import join_gloo, spawn_two_ranks


def _rank(rank: int, port: int, queue) -> None:
    import torch

    from polar.config import TrainConfig
    from polar.distributed import shard, wrap_model
    from polar.trainer import train_step
    from tests.fixtures import RANDOM_IDS_MODEL, SPECIAL, random_triplets, seeded_model

    env = join_gloo(rank, port)
    cfg = TrainConfig(lr=1e-2, batch_size=8, dtype="float32")
    batch = shard(random_triplets(8, seed=0, shortest=1, longest=10), env)
    out = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model = wrap_model(seeded_model(SPECIAL, RANDOM_IDS_MODEL), "fsdp", env, param_dtype=dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        out[name] = train_step(model, opt, batch, SPECIAL, cfg, "cpu")
        out[name + "_masters"] = sorted({str(p.to_local().dtype) for p in model.parameters()})
        out[name + "_adam"] = sorted({str(v.to_local().dtype) for s in opt.state.values() for v in s.values()
                                      if hasattr(v, "to_local")})
    queue.put((rank, out))


@pytest.mark.timeout(180)
def test_bf16_compute_keeps_float32_masters():
    for _, out in spawn_two_ranks(_rank):
        assert out["bf16_masters"] == out["bf16_adam"] == ["torch.float32"]
        assert out["bf16"] != out["fp32"] and out["bf16"] == pytest.approx(out["fp32"], abs=2e-2)
