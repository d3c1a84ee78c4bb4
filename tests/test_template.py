"""POLAR's input layout and truncation."""

import pytest

from polar.template import Layout, layout_ids, truncate_pieces

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
