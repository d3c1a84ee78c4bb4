"""POLAR's input layout and truncation.

    BOS + P + "\n" + R + "<|reward|>" + P + "\n" + O + END

P is the prompt, R the reference, O the candidate output, END the token at which the
value head is read (`[UNUSED_TOKEN_130]`, the model config's reward_token_id). The
"pretrain" wrapper drops both "\n": a trajectory is a plain continuation of its prefix.
No EOS. Truncation: reference and output are each cut to max_response_length (keeping
their start by default), and the prompt keeps its end with
(max_length - |R| - |O|) // 2 tokens, since it appears twice.
"""

from __future__ import annotations

from dataclasses import dataclass

WRAPPERS = ("pretrain", "sft")
N_SPECIAL = 3   # BOS, <|reward|>, END


@dataclass(frozen=True)
class Layout:
    max_length: int = 16384
    max_response_length: int = 4096
    truncation_side: str = "right"     # which end of R and O is cut: right keeps the start
    wrapper: str = "pretrain"

    def __post_init__(self) -> None:
        if self.wrapper not in WRAPPERS:
            raise ValueError(f"wrapper={self.wrapper!r} is not valid; choose one of {list(WRAPPERS)}")
        if self.truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side={self.truncation_side!r}; choose 'left' or 'right'")
        if self.max_length <= N_SPECIAL or self.max_response_length <= 0:
            raise ValueError(f"max_length={self.max_length} must exceed {N_SPECIAL} and "
                             f"max_response_length={self.max_response_length} must be > 0")


def truncate_pieces(prompt: list[int], reference: list[int], output: list[int],
                    layout: Layout) -> tuple[list[int], list[int], list[int]]:
    """Token-level truncation of the three pieces, as the reference implementation does."""
    budget = layout.max_length - N_SPECIAL
    reference = _cut(reference, layout.max_response_length, layout.truncation_side)
    output = _cut(output, layout.max_response_length, layout.truncation_side)
    prompt_room = max(0, (budget - len(reference) - len(output)) // 2)
    prompt = prompt[len(prompt) - prompt_room:] if prompt_room else []
    return prompt, reference, output


def _cut(ids: list[int], n: int, side: str) -> list[int]:
    return ids[:n] if side == "right" else ids[len(ids) - n:] if len(ids) > n else ids


def layout_ids(prompt: list[int], reference: list[int], output: list[int], special: dict[str, int],
               newline: list[int] | None = None) -> list[int]:
    """The token sequence of one (P, R, O) triple; `newline` is the encoding of "\\n" for the
    sft wrapper and None for pretrain."""
    nl = newline or []
    return ([special["bos"]] + prompt + nl + reference + [special["sep"]]
            + prompt + nl + output + [special["reward"]])
