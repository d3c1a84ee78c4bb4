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
