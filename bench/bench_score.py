"""Benchmark of scoring a file of mixed lengths with `python -m polar.score`'s path (not a test).

The file: one long line (prompt, reference and output of a few thousand tokens each, cut by
the default layout, 16384 / 4096, to a sequence of about 16.4k tokens) and 15 short lines
(tens of tokens). The model: a random reward model of the debug preset's shape
(conf/model/debug.yaml: 2 layers, hidden 32, GQA 4/2, vocabulary 1024) saved with a
1,024-token byte-level BPE trained on the built-in pydoc corpus (cached in .cache/bench),
loaded by RewardScorer as a user's model would be. Timed: polar.score.score_file on the
file, end to end (reading, the reference's string-level encoding, batching, forward
passes, writing the scored JSONL), after the model is loaded. Reported: that wall time,
the process's peak resident memory (getrusage ru_maxrss: a high-water mark of the whole
process, model loading included) and the resident memory before scoring.

With --compare, every line is also scored alone (batch of one) and the largest score
difference is printed (the batched scores must equal them).

Usage: .venv/bin/python bench/bench_score.py [--long-tokens 16384] [--short 15]
       [--batch-size 16] [--max-batch-tokens N] [--threads 1] [--compare]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def rss_mb() -> float:
    """Current resident memory of this process (VmRSS), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def text_of_tokens(tokenizer, corpus: str, n: int, start: int) -> str:
    """A slice of the corpus, from character `start`, that encodes to about n tokens."""
    text = corpus[start:start + 8 * n]
    ids = tokenizer.encode(text, add_special_tokens=False)[:n]
    return tokenizer.decode(ids)


def write_input(path: Path, tokenizer, corpus: str, long_tokens: int, n_short: int) -> None:
    """One long line (P, R and O each long enough that the layout cuts them to fill
    about long_tokens) and n_short short lines."""
    piece = long_tokens // 4 + 64       # each of P, R, O over its share of the budget
    long = {"prompt": text_of_tokens(tokenizer, corpus, piece, 0),
            "reference": text_of_tokens(tokenizer, corpus, piece, 40_000),
            "output": text_of_tokens(tokenizer, corpus, piece, 80_000)}
    lines = [long] + [{"prompt": text_of_tokens(tokenizer, corpus, 10 + 3 * i, 120_000 + 997 * i),
                       "reference": text_of_tokens(tokenizer, corpus, 20 + i, 150_000 + 991 * i),
                       "output": text_of_tokens(tokenizer, corpus, 15 + 2 * i, 180_000 + 983 * i)}
                      for i in range(n_short)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def build_model_dir(out: Path, cache: Path) -> Path:
    import torch
    import yaml

    from polar.config import ModelConfig
    from polar.model import build_model
    from polar.tokenizer import cached_bpe, special_ids

    shape = ModelConfig(**yaml.safe_load((ROOT / "conf" / "model" / "debug.yaml").read_text()))
    tokenizer = cached_bpe(["pydoc"], shape.vocab_size, cache)
    special = special_ids(tokenizer)
    torch.manual_seed(0)
    model = build_model(shape, bos_token_id=special["bos"], pad_token_id=special["pad"],
                        reward_token_id=special["reward"], sep_token_id=special["sep"])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--long-tokens", type=int, default=16384, help="about how long the long line is (its pieces are cut by the default layout, 16384/4096)")
    parser.add_argument("--short", type=int, default=15, help="number of short lines")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="RewardScorer's token budget (default: its own)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compare", action="store_true", help="also score each line alone and compare")
    args = parser.parse_args()

    import torch

    from polar.corpus import load_text
    from polar.score import RewardScorer, score_file
    from polar.template import SFT

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_model_dir(tmp / "model", ROOT / ".cache" / "bench")
        options = {} if args.max_batch_tokens is None else {"max_batch_tokens": args.max_batch_tokens}
        scorer = RewardScorer(model_dir, device="cpu", batch_size=args.batch_size, **options)
        write_input(tmp / "in.jsonl", scorer.tokenizer, load_text("pydoc"), args.long_tokens, args.short)
        records = [json.loads(line) for line in (tmp / "in.jsonl").read_text().splitlines()]
        lengths = [len(scorer.encode(r["prompt"], r["reference"], r["output"])) for r in records]
        before = rss_mb()
        start = time.perf_counter()
        n = score_file(scorer, tmp / "in.jsonl", tmp / "out.jsonl", progress=False)
        wall = time.perf_counter() - start
        peak = peak_rss_mb()
        scores = [json.loads(line)["score"] for line in (tmp / "out.jsonl").read_text().splitlines()]

        print(f"bench_score {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}; {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}, "
              f"{args.threads} thread(s)")
        print(f"lines: {n}; sequence lengths: longest {max(lengths)}, the others {min(lengths[1:], default=0)}"
              f"-{max(lengths[1:], default=0)} tokens; layout {SFT.max_length}/{SFT.max_response_length}; "
              f"batch_size {args.batch_size}, max_batch_tokens {getattr(scorer, 'max_batch_tokens', 'n/a')}")
        print(f"score_file wall time: {wall:.2f} s")
        print(f"peak RSS (ru_maxrss, whole process): {peak:.0f} MB; RSS before scoring {before:.0f} MB")
        if args.compare:
            alone = [scorer.score_ids([scorer.encode(r["prompt"], r["reference"], r["output"])])[0] for r in records]
            print(f"max |batched - alone| over {n} lines: {max(abs(a - b) for a, b in zip(scores, alone)):.2e}")


if __name__ == "__main__":
    main()
