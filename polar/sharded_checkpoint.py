"""Checkpoints of FSDP-sharded training: each rank writes its own shards with
torch.distributed.checkpoint (no gather of the model and AdamW state on rank 0), and any
number of ranks (one process too) reads them back, resharding as it loads.

A checkpoint is a folder, `checkpoint.dcp/`: DCP's files from every rank, `state.pt`
(step, counters, RNG, model shape: rank 0's) and `manifest.json` (size and sha256 of every
other file, written last). It is written as `.checkpoint.dcp.tmp/` and renamed into place
once whole; the one it replaces is kept as `checkpoint.prev.dcp/` (older ones are pruned:
the last two stay), to fall back to should the newer be damaged. A folder whose files are
not its manifest's is never loaded. polar.trainer decides which format a run writes
(sharded models write these) and loads the newest whole checkpoint of either format.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from polar.integrity import file_digest

SHARDED = "checkpoint.dcp"
PREVIOUS_SHARDED = "checkpoint.prev.dcp"
STATE, MANIFEST = "state.pt", "manifest.json"


def is_sharded(model) -> bool:
    """Whether the model's parameters are FSDP2 shards (DTensors)."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def save_sharded(run_dir: Path, model, optimizer, env, state: dict) -> None:
    """Every rank writes its shards into the temporary folder; rank 0 adds the counters and
    the manifest, then renames it into place (keeping the previous one). A collective."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    run_dir = Path(run_dir)
    tmp = run_dir / f".{SHARDED}.tmp"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    if env.is_main:
        torch.save(state, tmp / STATE)
        manifest = {p.name: file_digest(p) for p in sorted(tmp.iterdir()) if p.name != MANIFEST}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        _rotate(run_dir, tmp)
    dist.barrier()


def _rotate(run_dir: Path, tmp: Path) -> None:
    """tmp becomes the checkpoint; the current one the previous; the previous is removed."""
    current, previous = run_dir / SHARDED, run_dir / PREVIOUS_SHARDED
    if current.exists():
        shutil.rmtree(previous, ignore_errors=True)
        current.rename(previous)
    tmp.rename(current)


def problem(folder: Path) -> str | None:
    """What is wrong with a sharded checkpoint folder, or None when every file is the one
    its manifest lists."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"its {MANIFEST} cannot be read ({type(err).__name__}): the checkpoint was not finished"
    files = {p.name for p in folder.iterdir() if p.name != MANIFEST}
    if files != set(manifest):
        return f"its files {sorted(files ^ set(manifest))} are not those of its manifest"
    for name, want in manifest.items():
        if file_digest(folder / name) != want:
            return f"{name} is not the file written with it (size or sha256 differ)"
    return None


def candidates(run_dir: Path) -> list[tuple[Path, str | None]]:
    """(folder, what is wrong or None) of the sharded checkpoints in run_dir, newest first."""
    return [(run_dir / name, problem(run_dir / name)) for name in (SHARDED, PREVIOUS_SHARDED)
            if (run_dir / name).is_dir()]


def read_state(folder: Path) -> dict:
    return torch.load(folder / STATE, weights_only=True, map_location="cpu")


def load_sharded(folder: Path, model, optimizer) -> None:
    """Load a sharded checkpoint into model and optimizer, whatever their sharding (one
    process, or any number of ranks). A collective when there are several ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)     # also initialises AdamW's state
    target = {"model": model_state, "optim": optim_state}
    dcp.load(target, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
