"""POLAR's input layout and truncation.

    BOS + P + "\n" + R + "<|reward|>" + P + "\n" + O + END

P is the prompt, R the reference, O the candidate output, END the token at which the
value head is read (`[UNUSED_TOKEN_130]`, the model config's reward_token_id). The
"pretrain" wrapper drops both "\n": a trajectory is a plain continuation of its prefix.
No EOS. Truncation: reference and output are each cut to max_response_length (keeping
their start by default), and the prompt, which appears twice, gets the room
(max_length - reserved - |R| - |O|) // 2: a prompt longer than the room keeps its last
`room` tokens, one that fits is kept whole (`keep_prompt_end`, the reference client's
`if len(p_ids) > max_prompt_length: p_ids = p_ids[-max_prompt_length:]`).

Two levels live here:
- the faithful string-level encoding (`encode`, `encode_pieces`, `render`): each piece is
  encoded, truncated and decoded, the decoded pieces are joined into one string and that
  string is tokenized, exactly as the reference implementation does. Scoring and
  fine-tuning use it.
- token-level helpers (`truncate_pieces`, `layout_ids`) on already-tokenized pieces: the
  cheap path of the synthesized pre-training data (polar.data), which skips the decode /
  re-encode round trip.

Reference implementation (read, not copied):
- InternLM/xtuner xtuner/dataset/preference_dataset.py, `tokenize_ref`: the training-side
  encoding (POLAR's fine-tuning data; the released models were trained with it).
- the scoring clients: InternLM/POLAR src/polar/reward_func.py, `POLARClient._encode`
  (read in the fork RowitZou/POLAR_RFT), and InternLM/xtuner xtuner/utils/rm_utils.py,
  `RewardModelClient._encode` (`from xtuner.utils import RewardModelClient`). Both encode
  the same way; they differ only in the default response_cut_side ("right" in POLAR's,
  "left" in xtuner's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from polar.tokenizer import special_ids

WRAPPERS = ("pretrain", "sft")
N_SPECIAL = 3   # BOS, <|reward|>, END (token-level helpers)
# The reference's string-level budget: max_length - 4, "for one RM token, two separator
# tokens, and one reward token" (xtuner tokenize_ref; the client says "final reward token,
# one <|reward|> token and two '\n' tokens"). It reserves the two "\n" for both wrappers
# and does not reserve BOS. We keep that count so that lengths match the reference.
N_RESERVED_TEXT = 4
SEP_TEXT = "<|reward|>"
END_TEXT = "[UNUSED_TOKEN_130]"


@dataclass(frozen=True)
class Layout:
    max_length: int = 16384
    max_response_length: int = 4096
    truncation_side: str = "right"     # which end of R and O is cut: right keeps the start
    wrapper: str = "pretrain"          # the reference's scoring and fine-tuning default is "sft"

    def __post_init__(self) -> None:
        if self.wrapper not in WRAPPERS:
            raise ValueError(f"wrapper={self.wrapper!r} is not valid; choose one of {list(WRAPPERS)}")
        if self.truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side={self.truncation_side!r}; choose 'left' or 'right'")
        if self.max_length <= N_SPECIAL or self.max_response_length <= 0:
            raise ValueError(f"max_length={self.max_length} must exceed {N_SPECIAL} and "
                             f"max_response_length={self.max_response_length} must be > 0")


SFT = Layout(wrapper="sft")             # the reference client's and xtuner's default wrapper
PRETRAIN = Layout(wrapper="pretrain")   # synthesized pre-training data: continuations of a prefix


# ------------------------------------------------------------------ token level

def truncate_pieces(prompt: list[int], reference: list[int], output: list[int],
                    layout: Layout) -> tuple[list[int], list[int], list[int]]:
    """Token-level truncation of the three pieces, as the reference implementation does."""
    budget = layout.max_length - N_SPECIAL
    reference = _cut(reference, layout.max_response_length, layout.truncation_side)
    output = _cut(output, layout.max_response_length, layout.truncation_side)
    prompt = keep_prompt_end(prompt, (budget - len(reference) - len(output)) // 2)
    return prompt, reference, output


def keep_prompt_end(prompt: list[int], room: int) -> list[int]:
    """The reference client's prompt cut: a prompt longer than `room` keeps its last `room`
    tokens, one that fits is kept whole. Where the room is 0 or negative the reference's
    p_ids[-room:] keeps the whole prompt (room 0) or drops its first -room tokens; both
    overflow max_length, and an empty prompt is what it means: we return []."""
    if room <= 0:
        return []
    return prompt[len(prompt) - room:] if len(prompt) > room else prompt


def _cut(ids: list[int], n: int, side: str) -> list[int]:
    return ids[:n] if side == "right" else ids[len(ids) - n:] if len(ids) > n else ids


def layout_ids(prompt: list[int], reference: list[int], output: list[int], special: dict[str, int],
               newline: list[int] | None = None) -> list[int]:
    """The token sequence of one (P, R, O) triple; `newline` is the encoding of "\\n" for the
    sft wrapper and None for pretrain."""
    nl = newline or []
    return ([special["bos"]] + prompt + nl + reference + [special["sep"]]
            + prompt + nl + output + [special["reward"]])


# ------------------------------------------------------------------ string level

def as_text(value: Any, field: str = "prompt") -> str:
    """A piece as text: a string as is, a list of chat messages as their contents joined
    with "\\n", roles dropped (the reference: "\\n".join(e["content"] for e in messages))."""
    if isinstance(value, str):
        return value
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{field} must be a string or a list of chat messages "
                        f"({{'role': ..., 'content': str}}), got {type(value).__name__}")
    parts = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "content" not in message:
            raise TypeError(f"{field}[{i}] must be a chat message with a 'content' field, got {message!r:.80}")
        if not isinstance(message["content"], str):
            raise TypeError(f"{field}[{i}]['content'] must be a string, got "
                            f"{type(message['content']).__name__} (multimodal or tool content is not supported)")
        parts.append(message["content"])
    return "\n".join(parts)


def truncate_text(tokenizer, prompt: Any, reference: Any, outputs: Sequence[Any],
                  layout: Layout) -> tuple[str, str, list[str]]:
    """The pieces after the reference's truncation, as text.

    Each piece is encoded with the tokenizer's own special tokens (add_special_tokens=True,
    so an InternLM tokenizer counts its BOS in the piece, as the reference does), cut, and
    decoded with skip_special_tokens=True (special-token text inside a piece is dropped).
    R and each O keep max_response_length tokens, their start by default (xtuner
    tokenize_ref always keeps the start, as POLAR's client does by default; xtuner's
    rm_utils client defaults to keeping the end: `layout.truncation_side` chooses). The prompt keeps its end
    and gets (max_length - 4 - |R| - |O|) // 2 tokens; with several outputs it gets the
    smallest of these, so that every candidate sees the same prompt (xtuner takes the min
    over chosen and rejected).
    """
    p = _encode_piece(tokenizer, as_text(prompt, "prompt"))
    r = _cut(_encode_piece(tokenizer, as_text(reference, "reference")),
             layout.max_response_length, layout.truncation_side)
    outs = [_cut(_encode_piece(tokenizer, as_text(o, f"output[{i}]")),
                 layout.max_response_length, layout.truncation_side) for i, o in enumerate(outputs)]
    budget = layout.max_length - N_RESERVED_TEXT
    room = min((budget - len(r) - len(o)) // 2 for o in outs) if outs else (budget - len(r)) // 2
    p = keep_prompt_end(p, room)
    return _decode(tokenizer, p), _decode(tokenizer, r), [_decode(tokenizer, o) for o in outs]


def join(prompt: str, piece: str, wrapper: str) -> str:
    """P + "\\n" + piece for sft, P + piece for pretrain; no "\\n" before an empty piece.

    The empty case follows xtuner's tokenize_ref (`... or _reference == ""`), which built
    the training data. The scoring clients (POLAR's reward_func.py, xtuner's rm_utils.py)
    mean the same but write `len(r1) == ""`, which is never true, so they insert a "\\n"
    before an empty reference or output; we do not copy that bug."""
    return prompt + piece if wrapper == "pretrain" or piece == "" else prompt + "\n" + piece


def render(tokenizer, prompt: Any, reference: Any, output: Any, layout: Layout = SFT) -> str:
    """The string the reference client sends to a server for one (P, R, O) (its END is the
    text "[UNUSED_TOKEN_130]"; the server adds BOS when tokenizing)."""
    p, r, (o,) = truncate_text(tokenizer, prompt, reference, [output], layout)
    return join(p, r, layout.wrapper) + SEP_TEXT + join(p, o, layout.wrapper) + END_TEXT


def encode(tokenizer, prompt: Any, reference: Any, output: Any, layout: Layout = SFT,
           special: dict[str, int] | None = None) -> list[int]:
    """Token ids of one (P, R, O), exactly as the reference builds them: BOS +
    tokenize(P [\\n] R <|reward|> P [\\n] O) + END; no EOS. `special` (special_ids of the
    tokenizer) saves looking the ids up on every call."""
    special = special or special_ids(tokenizer)
    prompt_ids, reference_ids, (output_ids,) = encode_pieces(tokenizer, prompt, reference, [output], layout, special)
    return layout_ids(prompt_ids, reference_ids, output_ids, special)


def encode_pieces(tokenizer, prompt: Any, reference: Any, outputs: Sequence[Any], layout: Layout = SFT,
                  special: dict[str, int] | None = None) -> tuple[list[int], list[int], list[list[int]]]:
    """The faithful encoding of several candidates of one (P, R), split for sharing:
    (prompt_ids, reference_ids, [output_ids, ...]) such that, for every i,
    layout_ids(prompt_ids, reference_ids, output_ids[i], special) is the reference's token
    sequence BOS + tok(join(P, R)) + SEP + tok(join(P, O_i)) + END, with the prompt
    truncated once for all candidates. prompt_ids is the longest run of tokens that
    tok(join(P, R)) and every tok(join(P, O_i)) start with (usually P's tokens, maybe less
    the last one, which BPE can merge across the boundary); the rest goes to the pieces.
    """
    sep = (special or special_ids(tokenizer))["sep"]
    p, r, outs = truncate_text(tokenizer, prompt, reference, outputs, layout)
    first_text = join(p, r, layout.wrapper) + SEP_TEXT
    first, seconds = None, []
    for o in outs:   # the whole string, tokenized as the reference does, then split at <|reward|>
        ids = _tokenize(tokenizer, first_text + join(p, o, layout.wrapper))
        k = ids.index(sep)    # the first <|reward|>: decoding dropped special tokens from the pieces
        if first is not None and ids[:k] != first:
            raise RuntimeError("this tokenizer encodes the reference half differently depending on the "
                               "candidate after <|reward|>; encode the candidates one at a time")
        first = ids[:k]
        seconds.append(ids[k + 1:])
    if first is None:
        first = _tokenize(tokenizer, first_text)[:-1]
    n = _common_prefix_len([first, *seconds])
    return first[:n], first[n:], [s[n:] for s in seconds]


def _encode_piece(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=True))


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


def _tokenize(tokenizer, text: str) -> list[int]:
    """Ids without the tokenizer's added BOS/EOS: layout_ids places BOS and END itself, as
    xtuner does (tokenize with BOS, then append reward_token_id; no EOS)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def _common_prefix_len(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        token = seqs[0][i]
        if any(s[i] != token for s in seqs[1:]):
            return i
    return n
