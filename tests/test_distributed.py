"""Ranks from torchrun / SLURM, and two gloo processes (DDP and fully_shard) that train
like one process on the same global batch: a train step, and `fit` with its
checkpoints (written by two ranks, resumed by one; a WSD decay branch's own too)."""

import pytest
import torch

from polar import names
from polar.config import TrainConfig
from polar.distributed import DistEnv, dist_env, first_host, shard, wrap_model
from polar.sinks import NullSink
from polar.trainer import CHECKPOINT, Preempted, evaluate, fit, train_step
from tests.fixtures import RANDOM_IDS_MODEL, SPECIAL, ListSink, random_triplets, seeded_model
from tests.mlflow_server import free_port

STEPS, GLOBAL_BATCH = 3, 8
# mode -> packing: both parallel modes, both collation paths
RUNS = {"ddp": False, "fsdp": True}


def test_dist_env_from_torchrun_slurm_or_nothing():
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
                "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert dist_env(torchrun) == DistEnv(3, 8, 1, "n1", 1234, "torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123",
             "SLURM_JOB_NODELIST": "gpu[007-009,012],cpu1"}
    assert dist_env(slurm) == DistEnv(5, 8, 1, "gpu007", 20123, "slurm")
    assert dist_env({}) == DistEnv() and not DistEnv().distributed
    with pytest.raises(ValueError, match="RANK='x' must be an integer"):
        dist_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_first_host_of_slurm_node_lists():
    assert first_host("node1") == "node1"
    assert first_host("node1,node2") == "node1"
    assert first_host("gpu[01-04]") == "gpu01"
    assert first_host("rack[2-3]-n[05,07]") == "rack2-n05"
    assert first_host("a[3,5-6],b[1-2]") == "a3"


def test_shard_splits_the_global_batch_and_refuses_uneven_splits():
    batch = _triplets()
    halves = [shard(batch, DistEnv(rank, 2)) for rank in (0, 1)]
    assert halves[0].prompt + halves[1].prompt == batch.prompt
    with pytest.raises(ValueError, match="8 triplets does not split evenly over 3 ranks"):
        shard(batch, DistEnv(0, 3))
    with pytest.raises(ValueError, match="parallel mode 'zero3' is not valid"):
        wrap_model(torch.nn.Linear(1, 1), "zero3")


def _triplets(step: int = 0, n: int = GLOBAL_BATCH):
    return random_triplets(n, seed=step, shortest=1, longest=10)


def _train(model, packing: bool, rank_batch=lambda batch: batch) -> list[float]:
    """STEPS AdamW steps on the global batches (or this rank's share of them), with tight
    clipping so that the global gradient norm matters; returns the per-step losses."""
    cfg = TrainConfig(lr=1e-2, batch_size=GLOBAL_BATCH, grad_clip=0.05, packing=packing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, eps=1e-6)
    return [train_step(model, optimizer, rank_batch(_triplets(step)), SPECIAL, cfg, "cpu") for step in range(STEPS)]


def _fresh_model():
    return seeded_model(cfg=RANDOM_IDS_MODEL)


def _spawn_two(worker, out) -> None:
    """worker(rank, world, port, out) in two spawned processes."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(2, free_port(), str(out)), nprocs=2, join=True)


def _join_group(rank: int, world: int, port: int):
    """In a spawned worker: one thread, torchrun's variables, the gloo process group."""
    import os

    from polar.distributed import init_distributed

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return init_distributed()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from polar.distributed import full_state_dict, mean_across, shutdown

    env = _join_group(rank, world, port)
    result = {}
    for mode, packing in RUNS.items():
        model = wrap_model(_fresh_model(), mode, env)
        losses = [mean_across(loss) for loss in _train(model, packing, lambda b: shard(b, env))]
        result[mode] = {"losses": torch.tensor(losses, dtype=torch.float64), "state": full_state_dict(model)}
    torch.save(result, f"{out}/rank{rank}.pt")
    shutdown()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Both parallel modes trained by two gloo processes; their saved results per rank."""
    out = tmp_path_factory.mktemp("dist")
    _spawn_two(_worker, out)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.parametrize("mode", list(RUNS))
def test_two_processes_train_like_one(two_ranks, mode):
    single = _fresh_model()
    losses = _train(single, RUNS[mode])
    rank0, rank1 = two_ranks[0][mode], two_ranks[1][mode]
    assert rank0["state"].keys() == single.state_dict().keys()
    for name, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][name]), f"ranks disagree on {name}"
    torch.testing.assert_close(rank0["losses"], torch.tensor(losses, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(rank0["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    moved = (single.state_dict()["model.layers.1.mlp.up_proj.weight"]
             - _fresh_model().state_dict()["model.layers.1.mlp.up_proj.weight"]).abs().max()
    assert moved > 1e-3                                       # training happened


# fit on two ranks: DDP with gradient accumulation, and fully_shard cut short after its
# second evaluation (every rank's sink raises there); one process then resumes the cut run
FIT_STEPS, FIT_CFG = 8, dict(lr=1e-3, batch_size=GLOBAL_BATCH, n_evals=4, eval_spacing="linear")
FIT_RUNS = {"ddp": TrainConfig(micro_batch_size=2, **FIT_CFG), "fsdp": TrainConfig(packing=True, **FIT_CFG),
            # a WSD decay branch from step 2 to 4, preempted after its first step
            "wsd": TrainConfig(packing=True, schedule="wsd", warmup_fraction=0.0, decay_fraction=0.5, decay_at=[0.5],
                               **FIT_CFG)}


class CutAfter(NullSink):
    """Raises at the n-th flush of metrics, before that evaluation's checkpoint."""

    def __init__(self, n: int):
        self.calls, self.n = 0, n

    def log_many(self, points):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt("cut")


def _fit(model, cfg, run_dir, sink=None, env=None, stop=None):
    train, val = _triplets(100, n=4 * GLOBAL_BATCH), _triplets(999, n=12)
    return fit(model, train, val, SPECIAL, cfg, FIT_STEPS, 1.0, run_dir, sink or NullSink(), progress=False,
               env=env, stop=stop)


def _fit_worker(rank: int, world: int, port: int, out: str) -> None:
    from polar.distributed import shutdown

    env = _join_group(rank, world, port)
    ddp = wrap_model(_fresh_model(), "ddp", env)
    result = _fit(ddp, FIT_RUNS["ddp"], f"{out}/ddp", env=env)
    torch.save({"val_loss": result.val_loss}, f"{out}/ddp-rank{rank}.pt")
    try:   # rank 0's sink raises; rank 1 learns it at once (polar.distributed.on_main) and raises too
        _fit(wrap_model(_fresh_model(), "fsdp", env), FIT_RUNS["fsdp"], f"{out}/fsdp", CutAfter(2), env)
    except (KeyboardInterrupt, RuntimeError) as err:
        torch.save({"error": f"{type(err).__name__}: {err}"}, f"{out}/fsdp-rank{rank}.pt")
    calls = []
    try:   # stop() is asked after main steps 1 and 2, then after the branch's step 3: stop there
        _fit(wrap_model(_fresh_model(), "fsdp", env), FIT_RUNS["wsd"], f"{out}/wsd", env=env,
             stop=lambda: calls.append(1) or len(calls) >= 3)
    except Preempted as err:
        torch.save({"error": str(err)}, f"{out}/wsd-rank{rank}.pt")
    torch.distributed.barrier()   # tear down together: a rank leaving first aborts gloo's threads in the other
    shutdown()


@pytest.fixture(scope="module")
def two_rank_fits(tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    _spawn_two(_fit_worker, out)
    return out


def test_two_rank_fit_ends_like_one_process(two_rank_fits, tmp_path):
    single = _fit(_fresh_model(), FIT_RUNS["ddp"], tmp_path)
    ranks = [torch.load(two_rank_fits / f"ddp-rank{r}.pt", weights_only=True)["val_loss"] for r in (0, 1)]
    assert ranks[0] == ranks[1]                                  # every rank evaluated the same model
    assert ranks[0] == pytest.approx(single.val_loss, rel=1e-5)
    untrained, _ = evaluate(_fresh_model(), _triplets(999, n=12), SPECIAL)
    assert abs(single.val_loss - untrained) > 1e-3               # training happened


def test_a_checkpoint_written_by_two_sharded_ranks_resumes_in_one_process(two_rank_fits, tmp_path):
    cut = two_rank_fits / "fsdp"
    errors = [torch.load(two_rank_fits / f"fsdp-rank{r}.pt", weights_only=True)["error"] for r in (0, 1)]
    assert errors == ["KeyboardInterrupt: cut", "RuntimeError: rank 0 failed: KeyboardInterrupt: cut"]
    from polar.sharded_checkpoint import SHARDED, problem, read_state

    assert not (cut / CHECKPOINT).exists() and problem(cut / SHARDED) is None
    assert read_state(cut / SHARDED)["step"] == 2               # the first of 4 evaluations at steps 2, 4, 6, 8
    assert len(list((cut / SHARDED).glob("*.distcp"))) == 2      # each rank wrote its own shards: no gather
    resumed = _fit(_fresh_model(), FIT_RUNS["fsdp"], cut)
    whole = _fit(_fresh_model(), FIT_RUNS["fsdp"], tmp_path)
    assert resumed.steps == whole.steps == FIT_STEPS
    assert resumed.val_loss == pytest.approx(whole.val_loss, rel=1e-5)


def test_a_damaged_sharded_checkpoint_is_named_and_never_loaded(two_rank_fits, tmp_path):
    import shutil

    from polar.sharded_checkpoint import SHARDED
    from polar.trainer import CheckpointError, load_checkpoint

    cut = tmp_path / "cut"        # the sharded checkpoint alone (another test resumes the fixture's folder)
    shutil.copytree(two_rank_fits / "fsdp" / SHARDED, cut / SHARDED)
    shard_file = sorted((cut / SHARDED).glob("*.distcp"))[1]
    data = bytearray(shard_file.read_bytes())
    data[len(data) // 2] ^= 0xFF                                  # one byte of rank 1's shards
    shard_file.write_bytes(bytes(data))
    model = _fresh_model()
    with pytest.raises(CheckpointError, match=rf"{shard_file.name} is not the file written with it"):
        load_checkpoint(cut, model, torch.optim.AdamW(model.parameters()))
    (cut / SHARDED / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json cannot be read .*the checkpoint was not finished"):
        load_checkpoint(cut, model, torch.optim.AdamW(model.parameters()))


def test_a_decay_branch_preempted_on_two_sharded_ranks_goes_on_in_one_process(two_rank_fits, tmp_path, monkeypatch):
    import polar.trainer as trainer
    from polar.sharded_checkpoint import SHARDED, read_state

    cut = two_rank_fits / "wsd"
    errors = {torch.load(two_rank_fits / f"wsd-rank{r}.pt", weights_only=True)["error"] for r in (0, 1)}
    assert len(errors) == 1 and "step 3 of the decay branch 2->4" in errors.pop()   # every rank stopped there
    assert read_state(cut / "decay" / SHARDED)["branch"] == [2, 4]
    resumed_points, whole_points, taken = ListSink(), ListSink(), []
    real_step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda *a, **kw: taken.append(1) or real_step(*a, **kw))
    resumed = _fit(_fresh_model(), FIT_RUNS["wsd"], cut, resumed_points)
    assert len(taken) == 1 + 6                       # the branch's last step, then the run's steps 3..8
    whole = _fit(_fresh_model(), FIT_RUNS["wsd"], tmp_path, whole_points)
    decay = [[m for m, _ in sink.points if names.DECAY_VAL_LOSS in m] for sink in (resumed_points, whole_points)]
    assert len(decay[0]) == len(decay[1]) == 1 and decay[0][0] == pytest.approx(decay[1][0], rel=1e-5)  # + tokens
    assert resumed.val_loss == pytest.approx(whole.val_loss, rel=1e-5)
    assert not (cut / "decay").exists()


def test_at_one_step_a_file_checkpoint_that_recorded_a_branch_wins_over_the_shards_that_did_not(two_rank_fits,
                                                                                                  tmp_path):
    import shutil

    from polar.sharded_checkpoint import SHARDED, read_state
    from polar.trainer import load_checkpoint, save_checkpoint

    # one process resumed the two ranks' run and finished the branch that leaves at step 2:
    # it wrote a file checkpoint at step 2 beside the shards of step 2 (killed before step 3's)
    shutil.copytree(two_rank_fits / "wsd" / SHARDED, tmp_path / SHARDED)
    assert read_state(tmp_path / SHARDED)["step"] == 2 and not read_state(tmp_path / SHARDED).get("decays_done")
    model = _fresh_model()
    save_checkpoint(tmp_path, model, torch.optim.AdamW(model.parameters()), step=2, tokens_seen=1, decays_done=[4])
    counters = load_checkpoint(tmp_path, model, torch.optim.AdamW(model.parameters()))
    assert counters["decays_done"] == [4]            # the shards would repeat the branch
