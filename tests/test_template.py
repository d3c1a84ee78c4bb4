"""POLAR's input layout and truncation."""

from dataclasses import replace

import pytest

from polar.template import (
    PRETRAIN,
    SFT,
    Layout,
    as_text,
    encode,
    encode_pieces,
    keep_prompt_end,
    layout_ids,
    render,
    truncate_pieces,
    truncate_text,
)

SPECIAL = {"bos": 1, "sep": 3, "reward": 4, "pad": 0}


def test_pretrain_layout():
    assert layout_ids([10, 11], [20], [30, 31], SPECIAL) == [1, 10, 11, 20, 3, 10, 11, 30, 31, 4]


def test_sft_layout_inserts_newlines():
    assert layout_ids([10], [20], [30], SPECIAL, newline=[9]) == [1, 10, 9, 20, 3, 10, 9, 30, 4]


def test_truncation_keeps_prompt_end_and_response_start():
    layout = Layout(max_length=3 + 2 * 2 + 3 + 3, max_response_length=3)
    p, r, o = truncate_pieces(list(range(10)), [20, 21, 22, 23], [30, 31, 32, 33], layout)
    assert r == [20, 21, 22] and o == [30, 31, 32]
    assert p == [8, 9]            # (13 - 3 - 3 - 3) // 2 = 2 tokens from the end
    assert len(layout_ids(p, r, o, SPECIAL)) <= layout.max_length


def test_left_truncation_side_and_empty_pieces():
    layout = Layout(max_length=100, max_response_length=2, truncation_side="left")
    p, r, o = truncate_pieces([1, 2], [5, 6, 7], [], layout)
    assert r == [6, 7] and o == [] and p == [1, 2]


def test_bad_wrapper_is_rejected():
    with pytest.raises(ValueError, match="wrapper='chat'"):
        Layout(wrapper="chat")


# ---------------------------------------------------------------- string level (the reference's encoding)


class CharTokenizer:
    """One token per character; with bos=True, add_special_tokens=True prepends a BOS that
    decode(skip_special_tokens=True) drops, as InternLM's tokenizer does."""

    def __init__(self, bos: bool = False):
        self.bos = bos

    def encode(self, text, add_special_tokens=True):
        return ([1] if self.bos and add_special_tokens else []) + [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 1))


def test_messages_are_joined_and_roles_dropped():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    assert as_text(messages) == "be brief\n2+2?"
    assert as_text("plain") == "plain"
    with pytest.raises(TypeError, match=r"prompt\[1\]\['content'\] must be a string, got list"):
        as_text([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "image"}]}])
    with pytest.raises(TypeError, match="reference must be a string or a list of chat messages"):
        as_text(42, "reference")
    with pytest.raises(TypeError, match=r"output\[0\] must be a chat message"):
        as_text(["not a message"], "output")


def test_sft_and_pretrain_layouts_as_text(tokenizer):
    ids = encode(tokenizer, [{"role": "user", "content": "def f(x):"}], "return x", "return 1")
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    assert ids[0] == special["bos"] and special["eos"] not in ids
    assert tokenizer.decode(ids) == "<s>def f(x):\nreturn x<|reward|>def f(x):\nreturn 1[UNUSED_TOKEN_130]"
    ids = encode(tokenizer, "def f(x):", " return x", " return 1", PRETRAIN)
    assert tokenizer.decode(ids) == "<s>def f(x): return x<|reward|>def f(x): return 1[UNUSED_TOKEN_130]"


def test_encode_tokenizes_the_clients_string(tokenizer):
    """The ids are BOS + the tokenization of the string the reference client sends."""
    args = ("import os\nimport sys", "def main():\n    pass", "class A:\n    x = 1")
    for layout in (SFT, PRETRAIN):
        text = render(tokenizer, *args, layout)
        assert text.endswith("<|reward|>" + args[0] + ("\n" if layout is SFT else "") + args[2] + "[UNUSED_TOKEN_130]")
        assert encode(tokenizer, *args, layout) == [tokenizer.bos_token_id] + tokenizer.encode(
            text, add_special_tokens=False)


def test_empty_reference_or_output_follow_xtuner(tokenizer):
    # xtuner leaves out the "\n" before an empty piece; the POLAR client's `len(r1) == ""`
    # never holds, so it would write "P\n<|reward|>": we follow xtuner.
    assert tokenizer.decode(encode(tokenizer, "Q?", "", "A.")) == "<s>Q?<|reward|>Q?\nA.[UNUSED_TOKEN_130]"
    assert tokenizer.decode(encode(tokenizer, "Q?", "R.", "")) == "<s>Q?\nR.<|reward|>Q?[UNUSED_TOKEN_130]"
    assert tokenizer.decode(encode(tokenizer, "", "", "")) == "<s><|reward|>[UNUSED_TOKEN_130]"


def test_special_token_text_inside_a_piece_is_dropped(tokenizer):
    ids = encode(tokenizer, "Q", "R<|reward|>", "O[UNUSED_TOKEN_130]x")
    assert ids.count(tokenizer.convert_tokens_to_ids("<|reward|>")) == 1
    assert ids.count(tokenizer.convert_tokens_to_ids("[UNUSED_TOKEN_130]")) == 1


def test_string_truncation_budgets():
    tok = CharTokenizer()
    layout = Layout(max_length=4 + 2 * 2 + 3 + 3, max_response_length=3, wrapper="sft")
    p, r, (o,) = truncate_text(tok, "0123456789", "abcd", ["wxyz"], layout)
    assert (p, r, o) == ("89", "abc", "wxy")        # (14 - 4 - 3 - 3) // 2 = 2, from the end
    p, r, (o,) = truncate_text(tok, "0123456789", "abcd", ["wxyz"], replace(layout, truncation_side="left"))
    assert (p, r, o) == ("89", "bcd", "xyz")
    # several candidates share one prompt cut: the smallest budget (xtuner's min)
    p, r, outs = truncate_text(tok, "0123456789", "a", ["w", "wxyz"], layout)
    assert p == "789" and outs == ["w", "wxy"]      # min((10-1-1)//2, (10-1-3)//2) = 3
    # a prompt with no room is dropped entirely (the reference's p[-0:] would keep it whole)
    p, _, _ = truncate_text(tok, "0123", "abc", ["xyz"], Layout(max_length=10, max_response_length=3))
    assert p == ""


def test_piece_lengths_count_the_tokenizers_bos_as_the_reference_does():
    tok = CharTokenizer(bos=True)     # each piece encodes as [BOS] + chars
    p, r, (o,) = truncate_text(tok, "0123456789", "abcd", ["wxyz"],
                               Layout(max_length=4 + 2 * 2 + 3 + 3, max_response_length=3))
    assert (r, o) == ("ab", "wx")     # BOS + 2 characters
    assert p == "89"


def test_encode_pieces_share_the_prompt_and_rebuild_each_sequence(tokenizer):
    from polar.tokenizer import special_ids

    special = special_ids(tokenizer)
    prompt, reference = [{"role": "user", "content": "import os\nimport sys"}], "def main():\n    pass"
    outputs = ["class A:\n    x = 1", "", "print(1)"]
    for layout in (SFT, PRETRAIN):
        p, r, outs = encode_pieces(tokenizer, prompt, reference, outputs, layout)
        assert len(p) >= 3 and len(outs) == 3
        for o, ids in zip(outputs, outs):
            assert layout_ids(p, r, ids, special) == encode(tokenizer, prompt, reference, o, layout)


# ---------------------------------------------------------------- the prompt's room, at every boundary
# An independent copy of the reference client's truncation (InternLM/POLAR src/polar/reward_func.py,
# POLARClient._encode; xtuner's RewardModelClient._encode is the same), on token ids: `reserved`
# is what it takes off max_length first (4 in the client; the token-level helper reserves 3).


def reference_client_cut(p_ids, r1_ids, r2_ids, max_length, max_response_length, side="right", reserved=4):
    max_length = max_length - reserved
    if len(r1_ids) > max_response_length:
        r1_ids = r1_ids[:max_response_length] if side == "right" else r1_ids[-max_response_length:]
    if len(r2_ids) > max_response_length:
        r2_ids = r2_ids[:max_response_length] if side == "right" else r2_ids[-max_response_length:]
    max_prompt_length = (max_length - len(r1_ids) - len(r2_ids)) // 2
    if len(p_ids) > max_prompt_length:
        p_ids = p_ids[-max_prompt_length:]
    return p_ids, r1_ids, r2_ids


def rooms(n_prompt: int) -> list[int]:
    """room = |P|-1, |P|, |P|+1, 1.5|P|, 2|P|-1, 2|P|"""
    return [n_prompt - 1, n_prompt, n_prompt + 1, (3 * n_prompt) // 2, 2 * n_prompt - 1, 2 * n_prompt]


BOUNDARIES = [(n, room, odd) for n in (7, 10) for room in rooms(n) for odd in (0, 1)]


@pytest.mark.parametrize("n_prompt, room, odd", BOUNDARIES)
def test_token_level_prompt_room_matches_the_reference_client(n_prompt, room, odd):
    prompt, reference, output = list(range(100, 100 + n_prompt)), [20, 21, 22, 23], [30, 31, 32, 33, 34]
    # max_response_length 3: R and O are cut first; an odd spare token does not change the room
    layout = Layout(max_length=3 + 3 + 3 + 2 * room + odd, max_response_length=3)
    got = truncate_pieces(prompt, reference, output, layout)
    assert got == reference_client_cut(prompt, reference, output, layout.max_length, 3, reserved=3)
    p = got[0]
    assert p == (prompt if room >= n_prompt else prompt[n_prompt - room:])   # whole, or its last `room`
    assert len(layout_ids(*got, SPECIAL)) <= layout.max_length


@pytest.mark.parametrize("n_prompt, room, odd", BOUNDARIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_string_level_prompt_room_matches_the_reference_client(n_prompt, room, odd, side):
    tok = CharTokenizer()
    prompt = "".join(chr(ord("A") + i) for i in range(n_prompt))
    layout = Layout(max_length=4 + 2 + 3 + 2 * room + odd, max_response_length=3, truncation_side=side)
    p, r, (o,) = truncate_text(tok, prompt, "ab", ["wxyz"], layout)
    ids = reference_client_cut(tok.encode(prompt), tok.encode("ab"), tok.encode("wxyz"), layout.max_length, 3, side)
    assert (p, r, o) == tuple(tok.decode(i) for i in ids)
    assert p == (prompt if room >= n_prompt else prompt[n_prompt - room:])


def reference_client_text(tokenizer, prompt, reference, output, max_length, max_response_length):
    """The string the reference client sends for wrapper "sft" (non-empty pieces)."""
    p, r1, r2 = reference_client_cut(*(tokenizer.encode(t, add_special_tokens=True) for t in (prompt, reference, output)),
                                     max_length, max_response_length)
    p, r1, r2 = (tokenizer.decode(i, skip_special_tokens=True) for i in (p, r1, r2))
    return p + "\n" + r1 + "<|reward|>" + p + "\n" + r2 + "[UNUSED_TOKEN_130]"


def test_rendered_string_matches_the_reference_client_at_every_room(tokenizer):
    """With the real BPE tokenizer, at each boundary of the prompt's room, render() is the
    client's string and encode() its tokenization; a prompt that fits is never cut."""
    prompt = "def parse(text):\n    return [line.split() for line in text.splitlines()]"
    reference, output = "return list(map(str.split, text.splitlines()))", "import re\nreturn re.split(r'\\s+', text)"
    n_p, n_r, n_o = (len(tokenizer.encode(t, add_special_tokens=True)) for t in (prompt, reference, output))
    assert n_p >= 10
    cut = 0
    for room in rooms(n_p):
        layout = Layout(max_length=4 + n_r + n_o + 2 * room, max_response_length=64, wrapper="sft")
        text = render(tokenizer, prompt, reference, output, layout)
        assert text == reference_client_text(tokenizer, prompt, reference, output, layout.max_length, 64)
        assert (text.startswith(prompt + "\n")) == (room >= n_p), room      # the whole prompt iff it fits
        cut += not text.startswith(prompt)
        assert encode(tokenizer, prompt, reference, output, layout) == [tokenizer.bos_token_id] + tokenizer.encode(
            text, add_special_tokens=False)
    assert cut == 1     # only room = |P| - 1 cuts


def test_keep_prompt_end_without_room_drops_the_prompt():
    # the reference's p_ids[-0:] would keep the whole prompt (and a negative room would drop
    # its start): both overflow max_length; an empty prompt is what no room means
    assert keep_prompt_end([1, 2, 3], 0) == [] and keep_prompt_end([1, 2, 3], -2) == []
    assert keep_prompt_end([1, 2, 3], 2) == [2, 3] and keep_prompt_end([1, 2, 3], 5) == [1, 2, 3]
