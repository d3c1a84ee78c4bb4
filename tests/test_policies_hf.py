"""LLM policies on tiny random causal LMs of three architectures (Llama, Qwen2, GPT-NeoX)
saved here with the tiny BPE tokenizer (no downloads): a trajectory ends at the policy's
EOS or at max_new_tokens (so lengths vary), sampling is seeded and leaves the caller's RNG
alone, results come back in input order whatever the batching, chat prompts go through
the policy's chat template, a folder that is not a causal LM is refused by name, and
policy_size counts parameters without loading weights. The vLLM engine is checked where
vLLM and a GPU are; the slow test samples the real SmolLM2-135M-Instruct."""

import importlib.util

import numpy as np
import pytest
import torch

from polar.config import PolicySpec
from polar.corpus import Prompt
from polar.policies import VLLM_MISSING, HFPolicy, NGramPolicy, load_policy, policy_size, render
from tests.fixtures import eos_prone_lm, smollm2_dir, tiny_causal_lm

ARCHS = ["llama", "qwen2", "gpt_neox"]
PREFIXES = ["import os\nimport", "def f(x):\n    return", "x", "class A:\n    def __init__(self):\n        self"]
MAX = 24
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def lm_dirs(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-policies")
    return {arch: eos_prone_lm(arch, root / arch, tokenizer) for arch in ARCHS}


@pytest.fixture(scope="module")
def plain_dir(tokenizer, tmp_path_factory):
    """A random Llama without the EOS bias: greedy decoding does not stop at once."""
    return eos_prone_lm("llama", tmp_path_factory.mktemp("hf-plain") / "lm", tokenizer, eos_weight=0.0)


def policy(path, batch_size=4, **sampling) -> HFPolicy:
    return HFPolicy(PolicySpec(kind="hf", path=str(path), **sampling), batch_size=batch_size, device="cpu")


def spy_inputs(p: HFPolicy) -> list:
    """Records the input_ids of every generate call of p's model."""
    calls, original = [], p.model.generate

    def spy(**kwargs):
        calls.append(kwargs["input_ids"])
        return original(**kwargs)

    p.model.generate = spy
    return calls


@pytest.mark.parametrize("arch", ARCHS)
def test_trajectories_end_at_eos_or_max_new_tokens_with_varying_lengths(arch, lm_dirs, tokenizer):
    p = policy(lm_dirs[arch])
    prompts = [Prompt(text) for text in PREFIXES * 4]
    tokens = p.sample_tokens(prompts, MAX, seed=0)
    lengths = [len(t) for t in tokens]
    eos = tokenizer.eos_token_id
    assert len(tokens) == 16 and max(lengths) <= MAX
    assert len(set(lengths)) >= 4 and min(lengths) < MAX          # stopped at EOS: lengths vary
    for t in tokens:
        assert eos not in t[:-1]                                   # nothing sampled after the EOS
        assert len(t) == MAX or t[-1] == eos                       # shorter means it ended at EOS
    texts = p.generate(prompts, MAX, seed=0)
    assert texts == [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    assert not any(tokenizer.eos_token in text for text in texts)


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_is_seeded(arch, lm_dirs):
    p = policy(lm_dirs[arch], batch_size=3)
    a, b = p.generate(PREFIXES * 2, MAX, seed=1), p.generate(PREFIXES * 2, MAX, seed=1)
    assert a == b and a != p.generate(PREFIXES * 2, MAX, seed=2)
    assert p.name.startswith("hf-")


def test_results_come_back_in_input_order(lm_dirs):
    """Batches are formed from prompts sorted by length: the same prompts in another order
    get the same trajectories (distinct lengths, one per batch), returned in their own order."""
    p = policy(lm_dirs["qwen2"], batch_size=1)
    forward = p.sample_tokens(PREFIXES, MAX, seed=3)
    backward = p.sample_tokens(PREFIXES[::-1], MAX, seed=3)
    assert backward == forward[::-1] and len(set(map(tuple, forward))) == len(PREFIXES)
    batched = policy(lm_dirs["qwen2"], batch_size=3).sample_tokens(PREFIXES[::-1], MAX, seed=3)
    assert len(batched) == len(PREFIXES) and all(len(t) <= MAX for t in batched)


def test_left_padding_does_not_change_a_prompts_continuation(plain_dir):
    """With top_k=1 sampling is greedy, so a prompt gets the same text alone or padded in a batch."""
    batched = policy(plain_dir, batch_size=4, top_k=1).generate(PREFIXES, 5, seed=0)
    alone = [policy(plain_dir, batch_size=1, top_k=1).generate([x], 5, seed=0)[0] for x in PREFIXES]
    assert batched == alone and all(batched)


def test_a_chat_policy_renders_messages_with_its_template(lm_dirs, tokenizer, tmp_path):
    import shutil

    chat_dir = tmp_path / "chat"
    shutil.copytree(lm_dirs["llama"], chat_dir)
    tokenizer.save_pretrained(chat_dir)
    (chat_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    chat = policy(chat_dir)
    assert chat.tokenizer.chat_template == CHAT_TEMPLATE
    messages = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(x):"})
    prompts = [Prompt("def f(x):", messages), Prompt("import os")]
    expected = "<|system|>Be brief.\n<|user|>def f(x):\n<|assistant|>"
    assert render(chat.tokenizer, prompts[0]) == expected and render(chat.tokenizer, prompts[1]) == "import os"
    calls = spy_inputs(chat)
    chat.generate(prompts, 4, seed=0)
    fed = [chat.tokenizer.decode([t for t in row.tolist() if t != chat.pad_id]) for row in calls[0]]
    assert sorted(fed) == sorted([expected, "import os"])          # no BOS added, template once
    base = policy(lm_dirs["llama"])                                 # no chat template: continue the text
    calls = spy_inputs(base)
    base.generate(prompts[:1], 4, seed=0)
    assert base.tokenizer.decode(calls[0][0].tolist()) == "def f(x):"


def test_generation_leaves_the_global_rng_alone(lm_dirs):
    p = HFPolicy(PolicySpec(kind="hf", path=str(lm_dirs["llama"]), name="tiny"), device="cpu")
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    p.generate(["the cat"], max_new_tokens=4, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_a_relative_path_is_read_from_the_working_directory_offline(lm_dirs, monkeypatch):
    """`path: llama` is the folder llama under the working directory, loaded with no hub access."""
    monkeypatch.chdir(lm_dirs["llama"].parent)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = load_policy(PolicySpec(kind="hf", path="llama", name="rel"), device="cpu")
    assert isinstance(p, HFPolicy) and len(p.generate([Prompt("x")], max_new_tokens=3, seed=0)) == 1


def test_close_frees_the_model(lm_dirs):
    with load_policy(PolicySpec(kind="hf", path=str(lm_dirs["gpt_neox"])), batch_size=2, device="cpu") as p:
        assert p.generate(["x"], 2, seed=0)
    assert p.model is None


@pytest.mark.parametrize("arch", ARCHS)
def test_policy_size_counts_parameters_without_loading_weights(arch, lm_dirs, monkeypatch):
    spec = PolicySpec(kind="hf", path=str(lm_dirs[arch]))
    loaded = sum(t.numel() for t in policy(lm_dirs[arch]).model.parameters())
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("policy_size read the weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    assert policy_size(spec) == loaded
    assert policy_size(PolicySpec(order=2)) is None


def _seq_classifier(path, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2, num_labels=1)
                                   ).save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.mark.parametrize("make, message", [
    (lambda d, tok: d.mkdir(), r"holds no config\.json"),
    (_seq_classifier, r"is not a causal LM \(architectures \['LlamaForSequenceClassification'\]\)"),
    (lambda d, tok: __import__("transformers").T5Config(d_model=16).save_pretrained(d),
     r"is not a causal LM \(architectures \['T5ForConditionalGeneration'\]\)|is not a causal LM \(model_type 't5'\)"),
    (lambda d, tok: tiny_causal_lm("llama", d), r"has no tokenizer that loads"),
])
def test_a_folder_that_is_not_a_causal_lm_is_refused_by_name(tmp_path, tokenizer, make, message):
    make(tmp_path / "bad", tokenizer)
    spec = PolicySpec(kind="hf", path=str(tmp_path / "bad"), name="judge")
    with pytest.raises(ValueError, match=message) as error:
        load_policy(spec, device="cpu")
    assert f"policy 'judge': path={tmp_path / 'bad'}" in str(error.value)
    if "tokenizer" not in message:
        assert "AutoModelForCausalLM" in str(error.value) and "LlamaForCausalLM" in str(error.value)
        with pytest.raises(ValueError, match=message):
            policy_size(spec)


def test_ngram_policies_share_tables_and_take_prompts(tokenizer):
    ids = np.array(tokenizer("the cat sat on the mat. " * 50, add_special_tokens=False)["input_ids"])
    corpus = {"pydoc": ids}
    cold, hot = (load_policy(PolicySpec(order=3, source="pydoc", temperature=t), tokenizer=tokenizer,
                             corpus_ids=corpus) for t in (0.7, 1.3))
    assert isinstance(cold, NGramPolicy) and cold.tables is hot.tables
    other = load_policy(PolicySpec(order=2, source="pydoc"), tokenizer=tokenizer, corpus_ids=corpus)
    assert other.tables is not cold.tables
    again = load_policy(PolicySpec(order=3, source="pydoc"), tokenizer=tokenizer, corpus_ids={"pydoc": ids.copy()})
    assert again.tables is cold.tables                             # the same tokens loaded again: shared
    fresh = load_policy(PolicySpec(order=3, source="pydoc"), tokenizer=tokenizer, corpus_ids={"pydoc": ids[1:]})
    assert fresh.tables is not cold.tables                         # other tokens: their own tables
    assert cold.generate([Prompt("the cat")], 12, seed=1) == cold.generate(["the cat"], 12, seed=1)
    with pytest.raises(ValueError, match="corpus source 'kjv'"):
        load_policy(PolicySpec(order=1, source="kjv"), tokenizer=tokenizer, corpus_ids=corpus)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_the_vllm_engine_without_vllm_is_a_clear_error(lm_dirs):
    with pytest.raises(ImportError, match=r"data\.engine=vllm needs vLLM: pip install \.\[vllm\]") as error:
        load_policy(PolicySpec(kind="hf", path=str(lm_dirs["llama"])), engine="vllm")
    assert str(error.value) == VLLM_MISSING
    with pytest.raises(ValueError, match=r"data.engine='tgi' is not valid"):
        load_policy(PolicySpec(kind="hf", path=str(lm_dirs["llama"])), engine="tgi")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
                    reason=VLLM_MISSING)
def test_vllm_policy_stops_at_eos_and_is_seeded(lm_dirs):
    p = load_policy(PolicySpec(kind="hf", path=str(lm_dirs["qwen2"])), engine="vllm",
                    gpu_memory_utilization=0.3, enforce_eager=True)
    try:
        prompts = [Prompt(text) for text in PREFIXES * 4]
        a = p.generate(prompts, MAX, seed=0)
        assert a == p.generate(prompts, MAX, seed=0) and a != p.generate(prompts, MAX, seed=1)
        lengths = [len(p.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in a]
        assert len(set(lengths)) >= 3 and max(lengths) <= MAX + 2   # re-encoding may merge or split a token
        assert len(set(a[:4])) > 1 or len(set(a)) > 4              # repeated prompts get their own samples
    finally:
        p.close()

# ------------------------------------------------------------------ a real chat policy


@pytest.mark.slow
def test_smollm2_writes_chat_trajectories_that_end_at_im_end(tmp_path):
    path = smollm2_dir(tmp_path / "smollm2")
    p = load_policy(PolicySpec(kind="hf", path=str(path), name="smollm2", temperature=0.7), batch_size=4,
                    device="cpu")
    im_end = p.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in p.eos_ids and p.tokenizer.chat_template
    questions = ["What is the capital of France?", "Say hello.", "Name a colour.", "What is 2 plus 2?"]
    prompts = [Prompt(q, ({"role": "user", "content": q},)) for q in questions]
    assert "<|im_start|>assistant" in render(p.tokenizer, prompts[0])
    tokens = p.sample_tokens(prompts, 32, seed=0)
    texts = p.generate(prompts, 32, seed=0)
    for t, text in zip(tokens, texts):
        assert len(t) <= 32 and (t[-1] == im_end or len(t) == 32) and im_end not in t[:-1]
        assert text.strip() and sum(c.isascii() and (c.isalpha() or c == " ") for c in text) > 0.7 * len(text)
    assert any(t[-1] == im_end for t in tokens)                    # a short answer ends at <|im_end|>
    p.close()
