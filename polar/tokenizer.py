"""Tokenizers: load a local Hugging Face tokenizer, or train a small byte-level BPE offline.

POLAR needs two special tokens besides BOS: the separator `<|reward|>` between the
reference half and the candidate half, and the token at which the score is read,
`[UNUSED_TOKEN_130]` in POLAR's tokenizer (its model config calls it reward_token_id).
A trained tokenizer is cached under a content hash of its inputs and reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from polar.atomic import atomic_path

SEP_TOKEN = "<|reward|>"
REWARD_TOKEN = "[UNUSED_TOKEN_130]"
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, SEP_TOKEN, REWARD_TOKEN]


def train_bpe(texts: list[str], vocab_size: int, out_dir: str | Path):
    """Train a byte-level BPE with POLAR's special tokens and save it as a HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN,
                                   additional_special_tokens=[SEP_TOKEN, REWARD_TOKEN])
    _save_atomic(fast, Path(out_dir))
    return fast


def cached_bpe(sources: list, vocab_size: int, cache_dir: str | Path):
    """The BPE tokenizer for these corpus sources (built-in names or polar.config.CorpusFiles),
    trained once on polar.corpus.corpus_texts and then loaded. Its cache key holds the
    sources: built-ins by name, file sources by path, format and field (not their content:
    files changed under the same glob reuse the tokenizer trained before)."""
    from dataclasses import asdict

    from polar.config import corpus_source
    from polar.corpus import corpus_texts

    entries = [corpus_source(s) for s in sources]
    names = [s if isinstance(s, str) else asdict(s) for s in entries]   # built-ins only: the same key as before files
    key = hashlib.sha256(json.dumps({"sources": names, "vocab": vocab_size, "v": 1}).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{key}"
    if (path / "tokenizer.json").exists():
        return load_tokenizer(path)
    return train_bpe(corpus_texts(entries, cache_dir=Path(cache_dir) / "hf_datasets"), vocab_size, path)


def load_tokenizer(path: str | Path):
    """A local HF tokenizer directory, checked for POLAR's special tokens."""
    from transformers import AutoTokenizer

    from polar.config import local_dir

    tok = AutoTokenizer.from_pretrained(local_dir(str(path), "data.tokenizer"), local_files_only=True)
    special_ids(tok)   # raises when a POLAR token is missing
    return tok


def backbone_tokenizer(path: str | Path):
    """A pre-trained backbone's own tokenizer with POLAR's tokens: `<|reward|>` and
    `[UNUSED_TOKEN_130]` are the tokenizer's own where it has them (InternLM2: ids 92397
    and 92527), otherwise added as special tokens (the model's embedding grows to match,
    polar.model.load_backbone); a tokenizer without padding pads with its EOS (never read:
    the score is taken at END, before any padding)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model.init_from {str(path)!r} is not a directory (a local Hugging Face model "
                                "folder with its tokenizer; hub ids are not fetched)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise ValueError(f"model.init_from {str(path)!r} holds no tokenizer transformers can load without "
                         f"remote code ({type(err).__name__}: {str(err)[:200]})") from None
    missing = [t for t in (SEP_TOKEN, REWARD_TOKEN) if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    if tok.pad_token is None:
        if tok.eos_token is None:
            tok.add_special_tokens({"pad_token": PAD_TOKEN})
        else:
            tok.pad_token = tok.eos_token
    return tok


def model_tokenizer(model_dir: str | Path):
    """The tokenizer saved beside a model, with a clear error when there is none."""
    model_dir = Path(model_dir)
    if not any((model_dir / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(f"{str(model_dir)!r} holds a model but no tokenizer (tokenizer.json or "
                         "tokenizer_config.json): save the tokenizer beside the model")
    return load_tokenizer(model_dir)


def special_ids(tok) -> dict[str, int]:
    """bos, sep (<|reward|>), reward (score token) and pad ids of a tokenizer."""
    vocab = tok.get_vocab()
    missing = [t for t in (SEP_TOKEN, REWARD_TOKEN) if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks POLAR's special token(s) {missing}: the candidate half is "
                         f"separated by {SEP_TOKEN!r} and scored at {REWARD_TOKEN!r}; add them or "
                         "use data.tokenizer=bpe")
    bos = next((i for i in (tok.bos_token_id, vocab.get(BOS_TOKEN), tok.eos_token_id) if i is not None), None)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return {"bos": bos, "sep": vocab[SEP_TOKEN], "reward": vocab[REWARD_TOKEN], "pad": pad}


def _save_atomic(tok, path: Path) -> None:
    with atomic_path(path, keep_existing=True) as tmp:   # another process may win the race: keep theirs
        tok.save_pretrained(str(tmp))
