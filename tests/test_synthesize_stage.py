"""`python -m sweeps.run stage=synthesize` on a user's own data set, as a new user would
define it: a YAML file in their own config folder (hydra.searchpath) naming a JSONL
corpus and three tiny LLM policies of different architectures, made here. Trajectories
end at each policy's EOS, so their lengths vary; a training sweep on the data set then
runs without synthesizing it again; a bad corpus field is refused before anything starts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fixtures import ROOT, eos_prone_lm

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory, tokenizer):
    """A corpus, three policies and conf/data/mine.yaml, all outside the repository."""
    from polar.corpus import load_text

    root = tmp_path_factory.mktemp("user")
    docs = [d for d in load_text("pydoc").split("\n\n") if len(d) > 300][:60]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    policies = [eos_prone_lm(arch, root / "policies" / arch, tokenizer) for arch in ("llama", "qwen2", "gpt_neox")]
    (root / "conf" / "data").mkdir(parents=True)
    (root / "conf" / "data" / "mine.yaml").write_text(f"""\
corpus:
  - {{path: {root}/corpus.jsonl, format: jsonl, field: body}}
tokenizer: bpe
vocab_size: 512
policies:
{"".join(f"  - {{kind: hf, name: {p.name}, path: {p}}}{chr(10)}" for p in policies)}\
n_train: 48
n_val: 16
prefix_min: 4
prefix_max: 24
max_response_tokens: {MAX_TOKENS}
shard_size: 32
max_epochs: 100
""")
    return root


def run(root, *args: str, cache) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeps.run", *args, "data=mine", f"hydra.searchpath=[file://{root}/conf]",
                           f"paths.cache_dir={cache}", "tracking=off", "train.threads=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.timeout(400)
def test_a_users_data_set_is_synthesized_then_trained_on_without_synthesizing_again(user_folder, tmp_path):
    from transformers import AutoTokenizer

    cache = tmp_path / "cache"
    out = run(user_folder, "stage=synthesize", cache=cache)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    (data_dir,) = (cache / "data").iterdir()
    manifest = json.loads((data_dir / "manifest.json").read_text())
    rows = [json.loads(line) for s in manifest["shards"] for line in (data_dir / s["file"]).open()]
    assert len(rows) == 64 and {r["policy_a"] for r in rows} == {"llama", "qwen2", "gpt_neox"}
    tok = AutoTokenizer.from_pretrained(user_folder / "policies" / "llama")
    lengths = [len(tok(r[f], add_special_tokens=False)["input_ids"]) for r in rows
               for f in ("reference", "positive", "negative")]
    assert min(lengths) < MAX_TOKENS // 2 and len(set(lengths)) > 5       # ended at EOS: lengths vary

    stamp = (data_dir / "manifest.json").stat().st_mtime_ns
    trained = run(user_folder, "-m", "model=10k", "budget.tokens=3000", "recipe.batch_size=8", "train.n_evals=2",
                  f"paths.runs_dir={tmp_path}/runs", f"hydra.sweep.dir={tmp_path}/multirun", cache=cache)
    log = trained.stdout + trained.stderr
    assert trained.returncode == 0, log[-3000:]
    assert "synthesizing data set" not in log and "synthesize " not in log, log[-3000:]
    assert (data_dir / "manifest.json").stat().st_mtime_ns == stamp
    assert len(list((tmp_path / "runs").glob("*/model/config.json"))) == 1


def test_a_missing_corpus_field_is_refused_before_anything_starts(user_folder, tmp_path):
    out = run(user_folder, "stage=synthesize", "data.corpus=[{path:" + f"{user_folder}/corpus.jsonl" + ",field:text}]",
              cache=tmp_path / "cache")
    assert out.returncode == 1
    assert "field" in out.stderr and "'text'" in out.stderr and "body" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "cache" / "data").exists()


def test_prefixes_longer_than_every_document_refuse_the_sweep_in_one_paragraph(user_folder, tmp_path):
    out = run(user_folder, "-m", "model=10k", "budget.tokens=2e6", "recipe.batch_size=8", "data.prefix_min=5000",
              "data.prefix_max=6000",
              f"paths.runs_dir={tmp_path}/runs", f"hydra.sweep.dir={tmp_path}/multirun", cache=tmp_path / "cache")
    assert out.returncode == 1
    assert "could not be made, so no job was started" in out.stderr and "data.prefix_min" in out.stderr, \
        out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not (tmp_path / "runs").exists()
