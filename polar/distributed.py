"""Processes and ranks: who am I, the process group, and data-parallel model wrapping.

Owns: reading rank / world size / local rank from the environment that torchrun
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or SLURM (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST) sets up (`dist_env`, pure); starting
and ending the process group (`init_distributed`, `shutdown`: nccl on CUDA, gloo on the
CPU); wrapping a model for data parallelism (`wrap_model`: DDP, or FSDP2's fully_shard
per decoder layer and at the root, for models whose weights and AdamW state do not fit
one GPU); and the small collectives a data-parallel trainer needs (`shard`,
`mean_across`, `sum_across`, `any_rank`, `broadcast_object`, `on_main`, `no_grad_sync`, `full_state_dict`, and
`training_state` / `load_training_state` for checkpoints that any world size resumes);
`shard_from_rank0`, which builds an FSDP model on the meta device and materialises
only each rank's shards; and `failures_end_the_job`, which ends every rank soon after
one raises. A single
process (no launcher) is world size 1 and
every helper is then a no-op, so the same code runs on a laptop.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist

PARALLEL_MODES = ("none", "ddp", "fsdp")
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    launcher: str = "single"          # torchrun | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Rank and world from torchrun's variables, else SLURM's, else a single process.
    torchrun wins when both are set (`srun torchrun ...` starts one torchrun per node)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(_int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK", "0"),
                       env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", str(DEFAULT_PORT)),
                       "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return DistEnv(_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID", "0"),
                       env.get("MASTER_ADDR") or first_host(nodes), int(port), "slurm")
    return DistEnv()


def _int(env: Mapping[str, str], name: str, default: str | None = None) -> int:
    value = env.get(name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def _grouped() -> bool:
    """Whether this process is in a process group (several ranks)."""
    return dist.is_available() and dist.is_initialized()


def _for_backend(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor where the group's backend can reduce it (nccl: on the GPU)."""
    return tensor.cuda() if dist.get_backend() == "nccl" else tensor


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[007-009,012],cpu1" -> "gpu007"."""
    head = _split_top_level(nodelist.strip())[0]
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    ranges, suffix = rest.split("]", 1)
    return prefix + ranges.split(",")[0].split("-")[0] + (first_host(suffix) if suffix else "")


def _split_top_level(text: str) -> list[str]:
    """Split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def device_for(env: DistEnv, device: str = "auto") -> torch.device:
    """Where this rank trains (train.device): auto: cuda:LOCAL_RANK where there is a GPU,
    else the CPU; cpu: the CPU; cuda: cuda:LOCAL_RANK, or an error without a GPU."""
    if device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank)
    if device == "cuda":
        raise RuntimeError("train.device=cuda, but this process sees no CUDA GPU; use train.device=auto "
                           "(the CPU where there is no GPU) or cpu, or run where a GPU is visible")
    return torch.device("cpu")


def init_distributed(env: DistEnv | None = None, backend: str | None = None,
                     timeout_s: float = 1800) -> DistEnv:
    """Join the process group (nccl on CUDA, gloo on the CPU); nothing for one process."""
    env = env or dist_env()
    if not env.distributed or dist.is_initialized():
        return env
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=timeout_s))
    return env


FAILED_KEY = "polar/failed"


@contextmanager
def failures_end_the_job(env: DistEnv, on_failure: Callable[[str], None] | None = None, poll_s: float = 2.0):
    """Several ranks: a rank that raises inside the block writes its rank and error to the
    process group's store before raising; a watchdog thread on every other rank reads it
    within poll_s, calls on_failure(reason) (rank 0 ends its run FAILED with it), says so
    and ends its process, so no rank waits in a collective for the group's timeout. A
    store that no longer answers means rank 0 (which serves it) has ended: the same. A
    stop for a requeue (SystemExit, polar.trainer.Preempted) is not a failure."""
    if not env.distributed or not _grouped():
        yield
        return
    store = dist.distributed_c10d._get_default_store()
    stop = threading.Event()
    watch = threading.Thread(target=_watch_failures, args=(store, env, stop, on_failure, poll_s), daemon=True)
    watch.start()
    try:
        yield
    except BaseException as err:
        stop.set()
        if isinstance(err, SystemExit) or type(err).__name__ == "Preempted":
            raise
        first = _failure_of_another_rank(store)
        if first is not None:      # this rank fails because another did (a collective broke): say which
            raise RuntimeError(f"{first} (here, on rank {env.rank}: {type(err).__name__})") from err
        store.set(FAILED_KEY, f"rank {env.rank} raised {type(err).__name__}: {str(err)[:1500]}")
        raise
    finally:
        stop.set()


def _failure_of_another_rank(store) -> str | None:
    try:
        return store.get(FAILED_KEY).decode() if store.check([FAILED_KEY]) else None
    except Exception:   # noqa: BLE001 - the store is gone with rank 0
        return None


def _watch_failures(store, env: DistEnv, stop: threading.Event, on_failure, poll_s: float) -> None:
    while not stop.wait(poll_s):
        try:
            if not store.check([FAILED_KEY]):
                continue
            reason = store.get(FAILED_KEY).decode()
        except Exception as err:   # noqa: BLE001 - rank 0's store is gone: rank 0 has ended
            if stop.is_set():
                return
            reason = f"rank 0 ended (its store no longer answers: {type(err).__name__})"
        if stop.is_set():
            return
        print(f"[rank {env.rank}] ending this rank: {reason}", flush=True)
        if on_failure is not None:
            try:
                on_failure(reason)
            except Exception as err:   # noqa: BLE001 - ending matters more than the record
                print(f"[rank {env.rank}] could not record the failure: {err}", flush=True)
        os._exit(1)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, mode: str, env: DistEnv | None = None,
               param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Wrap for data parallelism: "none", "ddp" (replicas, gradients all-reduced) or
    "fsdp" (FSDP2: each decoder layer, then the root, fully_shard-ed over all ranks;
    parameters become DTensor shards, so build the optimizer after wrapping).
    param_dtype (fsdp): gather parameters and reduce gradients in that dtype (bf16 on
    GPUs); the sharded master weights and the optimizer state stay float32."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel mode {mode!r} is not valid; choose one of {list(PARALLEL_MODES)}")
    env = env or dist_env()
    if mode == "none" or not env.distributed:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        cuda = next(model.parameters()).is_cuda
        return DistributedDataParallel(model, device_ids=[env.local_rank] if cuda else None)
    return _fully_shard(model, param_dtype)


def shard_from_rank0(model: torch.nn.Module | None, env: DistEnv, device: torch.device,
                     param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2 without a whole copy of the model on any rank but 0. Rank 0 passes the model
    it built on the CPU (random or from a checkpoint); the others pass None. Every rank
    builds the architecture from rank 0's config on the meta device, shards it
    (fully_shard), allocates only its own shards on `device`, and receives its shards of
    rank 0's weights (set_model_state_dict, broadcast from rank 0); the buffers (rotary
    frequencies: small, and not in the state dict) are broadcast whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from polar.model import reward_model_class

    spec = broadcast_object((model.config.model_type, model.config.to_dict(), model.config._attn_implementation)
                            if env.is_main else None)
    skeleton = _skeleton(reward_model_class(spec[0]), spec[1], spec[2])
    sharded = _fully_shard(skeleton, param_dtype)
    sharded.to_empty(device=device)
    full = model.state_dict() if env.is_main else {}
    set_model_state_dict(sharded, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    buffers = broadcast_object({k: v.cpu() for k, v in model.named_buffers()} if env.is_main else None)
    for name, buffer in sharded.named_buffers():
        buffer.copy_(buffers[name].to(buffer.device))
    return sharded


def _skeleton(cls, config: dict, attn_implementation: str) -> torch.nn.Module:
    """The architecture of `cls` with this config, on the meta device (no memory)."""
    import transformers

    from polar.packing import register_attention

    register_attention()      # polar_sdpa, where rank 0's model uses it
    hf = transformers.AutoConfig.for_model(**config)
    hf._attn_implementation = attn_implementation
    with torch.device("meta"):
        return cls(hf)


def _fully_shard(model: torch.nn.Module, param_dtype: torch.dtype | None) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device_type = "cuda" if next(model.parameters()).is_cuda else "cpu"
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    # POLAR's recipe: parameters gathered and gradients reduced in param_dtype (bf16), fp32 master weights
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=param_dtype)
    for layer in unwrap(model).base_model.layers:      # Llama, Qwen2 and GPT-NeoX name them alike
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The reward model inside a DDP wrapper (fully_shard keeps the module itself)."""
    return getattr(model, "module", model)


def shard(batch, env: DistEnv | None = None):
    """This rank's contiguous share of a global batch: of triplets (TokenTriplets), or of
    their indices (a numpy array: what fit reads, so a rank reads only its own rows)."""
    env = env or dist_env()
    if len(batch) % env.world_size:
        raise ValueError(f"global batch of {len(batch)} triplets does not split evenly over "
                         f"{env.world_size} ranks; choose a batch size (recipe.batch_size) that is a multiple of "
                         "the world size")
    per = len(batch) // env.world_size
    rows = range(env.rank * per, (env.rank + 1) * per)
    return batch[rows.start:rows.stop] if isinstance(batch, np.ndarray) else batch.subset(rows)


def mean_across(value: float) -> float:
    """The mean of a number over all ranks (the global loss from per-rank losses)."""
    if not _grouped():
        return float(value)
    tensor = _for_backend(torch.tensor([float(value)], dtype=torch.float64))
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def sum_across(values: np.ndarray) -> np.ndarray:
    """Element-wise sums of a small array over all ranks (float64)."""
    if not _grouped():
        return np.asarray(values, dtype=np.float64)
    tensor = _for_backend(torch.tensor(np.asarray(values), dtype=torch.float64))
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()


def full_state_dict(model: torch.nn.Module, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """Unsharded parameters and buffers on the CPU, on every rank (for comparisons) or,
    with rank0_only, on rank 0 alone (for saving; the others get an empty dict); works
    for plain, DDP-wrapped and fully_shard-ed models. A collective with several ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not _grouped():
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    state = get_model_state_dict(unwrap(model), options=options)
    return {k: v.detach().cpu() for k, v in state.items()}


def any_rank(flag: bool) -> bool:
    """Whether the flag is set on any rank (so that all ranks act on it at the same step)."""
    if not _grouped():
        return bool(flag)
    tensor = _for_backend(torch.tensor([int(bool(flag))]))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def broadcast_object(value):
    """Rank 0's value on every rank (a decision only rank 0 can make, such as whether the
    run already finished); the value itself for one process."""
    if not _grouped():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(make, env: DistEnv | None = None):
    """make() on rank 0 only (None on the others), for work only rank 0 does (files,
    tracking). Should it raise, every rank raises, instead of the others waiting in
    their next collective until the process group times out."""
    env = env or dist_env()
    if not env.distributed:
        return make()
    value, error = None, None
    if env.is_main:
        try:
            value = make()
        except BaseException as err:   # noqa: BLE001 - re-raised below, after telling the others
            error = err
    failed = broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if failed is not None:
        raise RuntimeError(f"rank 0 failed: {failed}")
    return value


@contextmanager
def no_grad_sync(model: torch.nn.Module):
    """Backward passes inside accumulate gradients without reducing them across ranks
    (all micro-batches but the last of a step); a no-op for an unwrapped model."""
    if hasattr(model, "no_sync"):                       # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2 (fully_shard)
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts, unsharded and on the CPU, keyed by parameter names,
    for a plain, DDP or fully_shard-ed model alike: a checkpoint written by any number of
    ranks resumes on any other number. A collective: every rank calls it; with several
    ranks only rank 0 gets the tensors (the others get empty dicts)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    distributed = _grouped()
    options = StateDictOptions(full_state_dict=True, cpu_offload=distributed)
    model_state, optim_state = get_state_dict(unwrap(model), optimizer, options=options)
    if not distributed:
        model_state = {k: v.detach().cpu() for k, v in model_state.items()}
    return model_state, optim_state


def load_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        model_state: dict, optim_state: dict) -> None:
    """Put the states of `training_state` back. With several ranks, rank 0's states are
    broadcast (the others may pass empty dicts), so only rank 0 needs to read the file."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    distributed = _grouped()
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed)
    set_state_dict(unwrap(model), optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=options)
