"""Backbones pre-trained here: a preset's causal LM trained on the data set's corpus before
the reward-model stage, as POLAR starts from pre-trained language models (its law has Dp
for a reason: a reward model from a pre-trained backbone starts from representations,
not from the ln 2 plateau whose exit time is seed noise).

`model.lm_pretrain_tokens=D` asks for it. `ensure_backbone` trains the backbone once per
(shape, tokenizer, corpus, D, learning rate) under a lock and caches it as a Hugging Face
causal-LM folder with its tokenizer (`cache_dir/backbones/KEY`), shared by every seed and
budget of that size; the reward model then starts from it as from any `model.init_from`
checkpoint (polar.model.load_backbone). The training is plain next-token prediction on
fixed-length blocks of the corpus's documents, each ending with EOS, with AdamW and a
cosine schedule, always from seed 0 (the reward model's seed varies only its own run).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from polar.atomic import atomic_path
from polar.config import DataConfig, ModelConfig, TrainConfig

BLOCK = 128                 # tokens per training sequence
BATCH = 32                  # sequences per optimizer step
WARMUP_FRACTION = 0.05


def backbone_key(model: ModelConfig, data: DataConfig, tokenizer_id: str) -> str:
    """What makes a backbone: its shape, tokenizer, corpus, tokens and learning rate."""
    shape = {k: v for k, v in asdict(model).items() if k not in ("name", "init_from", "backbone_tokens",
                                                                  "paper_tokens", "shape_from_checkpoint")}
    blob = {"shape": shape, "tokenizer": tokenizer_id, "corpus": [str(c) for c in data.corpus],
            "block": BLOCK, "batch": BATCH}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def lm_blocks(texts: list[str], tokenizer, block: int = BLOCK) -> np.ndarray:
    """The corpus as (n, block) token ids: documents tokenized, each ended with EOS,
    concatenated and cut into blocks (the remainder dropped)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    ids = [t for text in texts for t in [*tokenizer(text, add_special_tokens=False)["input_ids"], eos]]
    n = len(ids) // block
    if n < 1:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than one block of {block}")
    return np.asarray(ids[:n * block], dtype=np.int64).reshape(n, block)


def train_lm(model: ModelConfig, tokenizer, blocks: np.ndarray, tokens: float, lr: float,
             progress: bool = True) -> tuple[object, list[float]]:
    """A randomly initialised causal LM of the preset's shape (vocabulary: the tokenizer's)
    trained on `tokens` tokens of the blocks; returns it and its training losses."""
    import torch
    from tqdm import tqdm
    from transformers import LlamaForCausalLM

    from polar.model import hf_config
    from polar.trainer import lr_at

    steps = max(1, int(tokens // (BATCH * BLOCK)))
    torch.manual_seed(0)
    config = hf_config(model, bos_token_id=tokenizer.bos_token_id or 0, pad_token_id=tokenizer.pad_token_id or 0)
    config.vocab_size = max(model.vocab_size, len(tokenizer))
    net = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    order = np.random.default_rng(0).permutation(np.resize(np.arange(len(blocks)), steps * BATCH))
    schedule, losses = TrainConfig(lr=lr, warmup_fraction=WARMUP_FRACTION, schedule="cosine", min_lr_ratio=0.0), []
    for step in tqdm(range(steps), desc=f"lm-pretrain {model.name}", unit="step", disable=not progress, mininterval=2):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, schedule)
        batch = torch.from_numpy(blocks[order[step * BATCH:(step + 1) * BATCH]])
        loss = net(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return net, losses


def ensure_backbone(model: ModelConfig, data: DataConfig, tokenizer, tokenizer_id: str, cache_dir: str | Path,
                    progress: bool = True) -> Path:
    """The folder of this preset's backbone pre-trained on the data's corpus for
    model.lm_pretrain_tokens tokens: trained once (under a lock) and reused."""
    from polar.corpus import corpus_texts
    from polar.synthesis import locked

    folder = Path(cache_dir) / "backbones" / backbone_key(model, data, tokenizer_id)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with locked(folder.parent / ".locks" / folder.name):
        if (folder / "lm_pretrain.json").exists():
            return folder
        blocks = lm_blocks(corpus_texts(data.corpus, cache_dir=cache_dir), tokenizer)
        net, losses = train_lm(model, tokenizer, blocks, model.lm_pretrain_tokens, model.lm_pretrain_lr, progress)
        with atomic_path(folder) as tmp:
            net.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "lm_pretrain.json").write_text(json.dumps(
                {"preset": model.name, "tokens": model.lm_pretrain_tokens, "lr": model.lm_pretrain_lr,
                 "steps": len(losses), "blocks": int(len(blocks)), "first_loss": losses[0], "final_loss": losses[-1]},
                indent=2) + "\n")
    return folder
