"""Shared-prefix packing: layout, attention rule, and equality with the naive path."""

from dataclasses import replace

import pytest
import torch

from polar.config import TrainConfig
from polar.data import TokenTriplets, naive_batch
from polar.loss import pretrain_loss
from polar.packing import (
    NEGATIVE,
    PAD_DOC,
    POSITIVE,
    PREFIX,
    allowed,
    balanced_rows,
    block_mask,
    dense_mask,
    pack_triplets,
)
from polar.trainer import evaluate, scores, train_step
from tests.fixtures import DEBUG_MODEL, RANDOM_IDS_MODEL, SPECIAL, random_triplets, seeded_model, tiny_causal_lm


def _model():
    """The debug shape (GQA: 4 query heads on 2 KV heads; two layers: the mask and the
    positions reach every path) over the random ids' vocabulary."""
    return seeded_model(cfg=RANDOM_IDS_MODEL)


def _rewards_loss_grads(model, batch):
    model.zero_grad(set_to_none=True)
    pos, neg = scores(model, batch, "cpu")
    loss = pretrain_loss(pos, neg)
    loss.backward()
    return pos.detach(), neg.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_layout_positions_and_score_points():
    batch = TokenTriplets(prompt=[[10, 11]], reference=[[20]], positive=[[30, 31, 32]], negative=[[40]])
    packed = pack_triplets(batch, SPECIAL)
    prefix = [1, 10, 11, 20, 2, 10, 11]
    assert packed.input_ids.tolist() == [prefix + [30, 31, 32, 3] + [40, 3]]
    assert packed.position_ids.tolist() == [list(range(7)) + [7, 8, 9, 10] + [7, 8]]
    assert packed.part.tolist() == [[PREFIX] * 7 + [POSITIVE] * 4 + [NEGATIVE] * 2]
    assert packed.score_rows.tolist() == [0, 0] and packed.score_cols.tolist() == [10, 12]
    assert packed.n_tokens == int(batch.packed_tokens()[0]) == 13
    assert int(batch.naive_tokens()[0]) == 11 + 9


def test_balanced_rows_fill_evenly_within_capacity():
    lengths = [5, 4, 3, 2, 1, 9, 6, 6]
    rows = balanced_rows(lengths, capacity=12)
    assert sorted(i for row in rows for i in row) == list(range(8))
    fills = sorted(sum(lengths[i] for i in row) for row in rows)
    assert fills == [12, 12, 12]                            # 36 tokens in the fewest rows, no padding
    assert balanced_rows([5, 20, 5], capacity=8) == [[1], [0, 2]]     # capacity raised to the longest item
    assert balanced_rows([3, 3, 3], capacity=0) == [[0], [1], [2]]    # capacity 0: the longest item


def test_rows_hold_several_triplets_with_little_padding(tiny_data):
    _, _, train, _, special = tiny_data
    batch = train.subset(range(64))
    longest = int(batch.packed_tokens().max())
    narrow, wide = pack_triplets(batch, special), pack_triplets(batch, special, max_len=4 * longest)
    assert narrow.n_tokens == wide.n_tokens == int(batch.packed_tokens().sum())
    assert narrow.input_ids.shape[1] == longest
    assert wide.input_ids.shape[0] <= 64 // 3 and wide.input_ids.shape[1] <= 4 * longest
    assert wide.n_slots <= 1.03 * wide.n_tokens               # padding < 3 %
    assert wide.n_slots < 0.7 * naive_batch(batch, special)["input_ids"].numel()
    mixed = random_triplets(32, seed=5, longest=30)            # short triplets pair up by default
    assert pack_triplets(mixed, SPECIAL).input_ids.shape[0] < 32


def test_mask_is_the_rule_and_isolates_candidates():
    packed = pack_triplets(random_triplets(6, seed=1), SPECIAL, max_len=60)
    mask = dense_mask(packed)[:, 0]
    rows, width = packed.doc.shape
    grid = allowed(packed.doc, packed.part, torch.arange(rows)[:, None, None],
                   torch.arange(width)[None, :, None], torch.arange(width)[None, None, :])
    assert torch.equal(mask, grid)
    doc, part = packed.doc.tolist(), packed.part.tolist()
    for r in range(rows):
        for q in range(width):
            for k in range(width):
                same = doc[r][q] == doc[r][k]
                expected = same and k <= q and (part[r][k] == PREFIX or part[r][k] == part[r][q])
                assert mask[r, q, k].item() == expected, (r, q, k)
    assert mask.any(-1).all()                                 # no empty attention row, padding included
    assert (packed.doc == PAD_DOC).any()                      # ...and there is padding to test that on


@pytest.mark.parametrize("max_len", [None, 80])
def test_packed_equals_naive_rewards_loss_and_gradients(max_len):
    batch = random_triplets(7, seed=2)
    model = _model()
    naive = _rewards_loss_grads(model, naive_batch(batch, SPECIAL))
    packed_batch = pack_triplets(batch, SPECIAL, max_len=max_len)
    if max_len:
        assert packed_batch.input_ids.shape[0] < 7
    packed = _rewards_loss_grads(model, packed_batch)
    for a, b in zip(naive[:3], packed[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert naive[3].keys() == packed[3].keys()
    for name, grad in naive[3].items():
        torch.testing.assert_close(grad, packed[3][name], rtol=1e-4, atol=1e-6, msg=name)
    assert naive[0].std() > 0                                 # random weights give distinct rewards


def test_packed_training_and_evaluation_match_naive(tiny_data):
    _, _, train, val, special = tiny_data
    shape = replace(DEBUG_MODEL, num_layers=1, num_heads=2, num_kv_heads=2)
    runs = {}
    for packing in (False, True):
        model = seeded_model(special, shape)
        cfg = TrainConfig(lr=1e-2, batch_size=16, micro_batch_size=8, packing=packing)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)   # AdamW would magnify float noise
        losses = [train_step(model, opt, train.subset(range(s, s + 16)), special, cfg, "cpu") for s in (0, 16)]
        runs[packing] = losses, evaluate(model, val, special, packing=packing), model.state_dict()
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-5)
    for name, value in runs[False][2].items():
        torch.testing.assert_close(runs[True][2][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_packed_training_uses_flex_attention_on_cuda_and_polar_sdpa_elsewhere():
    from polar.packing import attention_for

    assert attention_for("cuda", True) == attention_for(torch.device("cuda", 1), True) == "flex_attention"
    assert attention_for("cuda", False) == attention_for("cpu", True) == "polar_sdpa"


def test_polar_sdpa_skips_the_leading_causal_block_and_gives_the_dense_masks_attention():
    """The CPU attention: each row's leading causal block without a mask, the rest with
    the dense mask; grouped-query heads (4 query heads over 2 key/value heads)."""
    from polar.packing import causal_prefix, split_sdpa_attention

    packed = pack_triplets(random_triplets(9, seed=4, longest=20), SPECIAL, max_len=120)
    p = causal_prefix(packed)
    first_candidate = [(row != 0).nonzero()[0].item() for row in packed.part]
    assert p == min(first_candidate) > 0
    rows, width = packed.input_ids.shape
    torch.manual_seed(0)
    q, k, v = torch.randn(rows, 4, width, 8), torch.randn(rows, 2, width, 8), torch.randn(rows, 2, width, 8)
    mask = dense_mask(packed)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), attn_mask=mask).transpose(1, 2)
    got, _ = split_sdpa_attention(None, q, k, v, mask, causal_prefix=p)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_block_mask_gives_the_dense_masks_attention():
    """The FlexAttention rendering of the rule (CUDA path) against SDPA with the dense
    mask, run by flex_attention's eager reference kernel on the CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    packed = pack_triplets(random_triplets(9, seed=3, longest=20), SPECIAL, max_len=150).padded_to(128, 0)
    assert packed.input_ids.shape[1] % 128 == 0
    rows, width = packed.input_ids.shape
    torch.manual_seed(0)
    q, k, v = (torch.randn(rows, 2, width, 8) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(packed))
    with torch.no_grad():
        got = flex_attention(q, k, v, block_mask=block_mask(packed))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flex_attention_packed_equals_naive_on_cuda():
    from polar.model import set_attention

    batch = random_triplets(7, seed=4)
    model = _model().cuda()
    naive = scores(model, naive_batch(batch, SPECIAL), "cuda")
    set_attention(model, "flex_attention")
    packed = scores(model, pack_triplets(batch, SPECIAL, max_len=200), "cuda")
    for a, b in zip(naive, packed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_pretraining_triplets_refuse_the_sft_wrapper(tokenizer):
    from polar.data import tokenize_triplets
    from polar.template import Layout

    rows = [{"prompt": "a", "reference": "b", "positive": "c", "negative": "d"}]
    assert len(tokenize_triplets(rows, tokenizer).prompt) == 1
    with pytest.raises(ValueError, match="wrapper='sft'"):
        tokenize_triplets(rows, tokenizer, Layout(wrapper="sft"))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_packed_equals_naive_for_every_supported_backbone(arch, tmp_path):
    """A pre-trained backbone of each architecture (polar.model.load_backbone): the packed
    path's rewards, loss and gradients are the naive path's."""
    from polar.model import load_backbone

    model = load_backbone(tiny_causal_lm(arch, tmp_path / arch), SPECIAL, vocab_size=64)
    batch = random_triplets(5, seed=3)
    naive = _rewards_loss_grads(model, naive_batch(batch, SPECIAL))
    packed = _rewards_loss_grads(model, pack_triplets(batch, SPECIAL, max_len=80))
    for a, b in zip(naive[:3], packed[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name, grad in naive[3].items():
        torch.testing.assert_close(grad, packed[3][name], rtol=1e-4, atol=1e-6, msg=name)
    assert naive[0].std() > 0 and type(model).__name__.endswith("ForSequenceClassification")


def test_packing_changes_speed_only_never_the_axes(tiny_data, tmp_path):
    """The same job with packing on and off: the same plan (steps, batch, LR, tokens,
    compute), the same tokens_seen and flops_seen at every evaluation, the same losses (fp32
    CPU, within 1e-4); only the FLOPs executed differ (fewer, packed)."""
    from polar.trainer import fit
    from sweeps.jobs import plan_of
    from tests.fixtures import TINY_SWEEP, ListSink, job_config

    plans = [plan_of(job_config(*TINY_SWEEP, "budget.tokens=1e5", f"train.packing={p}")) for p in (False, True)]
    assert plans[0] == plans[1]
    _, _, train, val, special = tiny_data
    runs = {}
    for packing in (False, True):
        sink = ListSink()
        cfg = TrainConfig(lr=1e-3, batch_size=16, n_evals=3, eval_spacing="linear", packing=packing, dtype="float32")
        fit(seeded_model(special), train, val, special, cfg, 6, 1000.0, tmp_path / str(packing), sink, progress=False)
        runs[packing] = [(step, m) for m, step in sink.points]
    (off, on) = runs[False], runs[True]
    assert [s for s, _ in off] == [s for s, _ in on]
    for (_, a), (_, b) in zip(off, on):
        for key in ("tokens_seen", "flops_seen"):
            assert a.get(key) == b.get(key)
        for key in ("train/loss", "val/loss"):
            assert a.get(key, 0.0) == pytest.approx(b.get(key, 0.0), abs=1e-4)
    executed = [(a["flops_executed"], b["flops_executed"]) for (_, a), (_, b) in zip(off, on) if "flops_executed" in a]
    assert len(executed) == 3 and all(packed < naive for naive, packed in executed)
    assert all(naive == a["flops_seen"] for (naive, _), (_, a) in zip(executed, [x for x in off if "flops_seen" in x[1]]))
