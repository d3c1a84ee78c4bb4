"""Scoring with a saved POLAR model: r(prompt, reference, output) in the reference's format.

`RewardScorer(model_dir).score(prompt, reference, outputs)` encodes every (P, R, O) with
polar.template.encode (the reference client's encoding: each candidate on its own,
wrapper "sft" by default), runs the model in batches and returns the value head's output
at each sequence's END token.

Batches hold sequences of similar length (sorted, longest first) within a token budget:
rows x longest row <= max_batch_tokens (and at most batch_size rows); a sequence longer
than the budget runs alone, so one long line never pads short ones to its length. Rows
are right-padded and run with no attention mask at all (SDPA's is_causal, nothing
materialised): the model is causal, so the padding after a row's END cannot reach its
score, which is read at END (tests compare with one-by-one scoring).

CLI (`python -m polar.score`):

    python -m polar.score --model DIR --input FILE.jsonl [--output FILE] [--wrapper sft|pretrain]
                          [--batch-size 16] [--max-batch-tokens 16384]

Each input line is a JSON object with "prompt", "reference" and "output" (strings or chat
message lists, as the reference client accepts; an optional "wrapper" overrides
--wrapper for that line); it is written back with "score" added, to --output or stdout.
--output (not a directory) and --device (one this machine has) are checked first, then
the input in full before anything is scored, so a bad line (not UTF-8, not a JSON object,
a missing field, a message with non-string content) stops the run with its file and line
number before any output. --output is written to a temporary file beside it and renamed at the
end: an existing file is replaced only by a complete result, never lost to a failed run.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from polar.atomic import atomic_path
from polar.template import SFT, WRAPPERS, Layout, as_text, encode
from polar.tokenizer import model_tokenizer, special_ids

FIELDS = ("prompt", "reference", "output")
MAX_BATCH_TOKENS = 16384     # rows x longest row per forward pass: one default-length sequence


class BadInput(ValueError):
    """An input line that cannot be scored; the message names the line and the problem."""


class RewardScorer:
    """A saved POLAR model directory (config.json + *.safetensors + tokenizer files)."""

    def __init__(self, model_dir: str | Path, device: str | None = None, batch_size: int = 16,
                 layout: Layout = SFT, dtype: str | None = None, max_batch_tokens: int = MAX_BATCH_TOKENS):
        import torch

        from polar.model import load_model

        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if max_batch_tokens <= 0:
            raise ValueError(f"max_batch_tokens must be > 0, got {max_batch_tokens}")
        self.model_dir, self.batch_size, self.layout = Path(model_dir), batch_size, layout
        self.max_batch_tokens = max_batch_tokens
        self.device = check_device(device) if device else ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(self.model_dir)       # clear errors: missing dir, no model, not POLAR
        self.tokenizer = model_tokenizer(self.model_dir)
        self.special = special_ids(self.tokenizer)
        if self.special["reward"] != model.config.reward_token_id:
            raise ValueError(f"{str(self.model_dir)!r}: the tokenizer's END token id {self.special['reward']} "
                             f"differs from the model's reward_token_id {model.config.reward_token_id}; "
                             "the tokenizer beside the model is not the one it was trained with")
        if dtype is not None:
            model = model.to(getattr(torch, dtype))
        self.model = model.to(self.device).eval()

    def encode(self, prompt: Any, reference: Any, output: Any, wrapper: str | None = None) -> list[int]:
        layout = self.layout if wrapper is None else replace(self.layout, wrapper=wrapper)
        return encode(self.tokenizer, prompt, reference, output, layout, self.special)

    def score(self, prompt: Any, reference: Any, outputs: Sequence[Any]) -> list[float]:
        """Scores of the candidates `outputs` against one reference, in their order."""
        if isinstance(outputs, str):
            raise TypeError("outputs must be a list of candidates, got one string; wrap it in a list")
        return self.score_ids([self.encode(prompt, reference, o) for o in outputs])

    def score_many(self, items: Iterable[dict]) -> list[float]:
        """Scores of dicts with "prompt", "reference", "output" (and optionally "wrapper")."""
        return self.score_ids([self.encode(it["prompt"], it["reference"], it["output"], it.get("wrapper"))
                               for it in items])

    def score_ids(self, seqs: Sequence[Sequence[int]]) -> list[float]:
        """Scores of encoded sequences (each ending with END), in their order; batched by
        token budget (token_batches), right-padded, with no attention mask."""
        import torch

        out = [0.0] * len(seqs)
        for rows in token_batches([len(s) for s in seqs], self.max_batch_tokens, self.batch_size):
            width = len(seqs[rows[0]])                   # longest first
            ids = torch.full((len(rows), width), self.special["pad"], dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, : len(seqs[i])] = torch.as_tensor(seqs[i])
            end = torch.tensor([len(seqs[i]) - 1 for i in rows])
            with torch.no_grad():      # no attention_mask: causal SDPA; padding sits after each END
                values = self.model(input_ids=ids.to(self.device), score_index=end.to(self.device))
            for r, i in enumerate(rows):
                out[i] = float(values[r])
        return out


def check_device(device: str) -> str:
    """A device this machine has (cpu, cuda, cuda:N, mps), or ValueError saying what it has."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a device name ({err}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r}: CUDA is not available on this machine; use cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to "
                             f"cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine; use cpu")
    return device


def token_batches(lengths: Sequence[int], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Indices of `lengths` in batches, longest first, such that each batch's rows x its
    longest row <= max_tokens and it has at most max_rows rows; a length over max_tokens
    is a batch of its own. Sorting keeps padding small: a batch's rows are neighbours."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        current = batches[-1] if batches else None
        if current and len(current) < max_rows and (len(current) + 1) * lengths[current[0]] <= max_tokens:
            current.append(i)
        else:
            batches.append([i])
    return batches


# ---------------------------------------------------------------- JSONL input

def require_fields(obj: Any, fields: Sequence[str], where: str, error: type[Exception]) -> None:
    """A parsed JSONL line must be an object holding every field; raises `error` naming
    the line and what is missing."""
    if not isinstance(obj, dict):
        raise error(f"{where}: expected a JSON object with {list(fields)}, got {type(obj).__name__}")
    missing = [f for f in fields if f not in obj]
    if missing:
        raise error(f"{where}: missing field(s) {missing}; each line needs {list(fields)} (has {sorted(obj)})")


def check_record(obj: Any, where: str) -> dict:
    """A parsed line, checked: a JSON object with the three fields, strings or message lists."""
    require_fields(obj, FIELDS, where, BadInput)
    for field in FIELDS:
        try:
            as_text(obj[field], field)
        except TypeError as err:
            raise BadInput(f"{where}: {err}") from None
    if "wrapper" in obj and obj["wrapper"] not in WRAPPERS:
        raise BadInput(f"{where}: wrapper={obj['wrapper']!r} is not valid; choose one of {list(WRAPPERS)}")
    return obj


def jsonl_objects(path: str | Path, what: str, error: type[Exception]) -> Iterator[tuple[int, str, Any]]:
    """(line number, "FILE: line N", parsed JSON) for each non-blank line of a JSONL file;
    a missing file or a line that is not JSON raises with the file (called `what`) and line."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {str(path)!r} is a directory; give a JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}: line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise error(f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of "
                            "the line); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            yield lineno, where, obj


def read_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, checked record) for each non-blank line of a JSONL file."""
    for lineno, where, obj in jsonl_objects(path, "input file", BadInput):
        yield lineno, check_record(obj, where)


def score_file(scorer: RewardScorer, input_path: str | Path, output_path: str | Path | None = None,
               chunk: int = 256, progress: bool = True) -> int:
    """Score every line of input_path; returns the number of lines written. An output file
    appears whole or not at all (an existing one is kept when scoring fails)."""
    total = sum(1 for _ in read_records(input_path))      # the whole input is checked first
    if output_path is None:
        return _score_into(scorer, input_path, sys.stdout, total, chunk, progress)
    with atomic_path(output_path) as tmp, open(tmp, "w", encoding="utf-8") as sink:
        return _score_into(scorer, input_path, sink, total, chunk, progress)


def _score_into(scorer: RewardScorer, input_path, sink, total: int, chunk: int, progress: bool) -> int:
    from tqdm import tqdm

    written = 0
    with tqdm(total=total, desc="score", unit="line", file=sys.stderr, disable=not progress) as bar:
        batch: list[dict] = []
        for _, record in read_records(input_path):
            batch.append(record)
            if len(batch) == chunk:
                written += _write_scored(scorer, batch, sink)
                bar.update(len(batch))
                batch = []
        if batch:
            written += _write_scored(scorer, batch, sink)
            bar.update(len(batch))
    return written


def _write_scored(scorer: RewardScorer, records: list[dict], sink) -> int:
    for record, value in zip(records, scorer.score_many(records)):
        sink.write(json.dumps({**record, "score": value}, ensure_ascii=False) + "\n")
    sink.flush()
    return len(records)


# ---------------------------------------------------------------- CLI

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m polar.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="saved POLAR model directory (config, safetensors, tokenizer)")
    parser.add_argument("--input", required=True, help="JSONL with prompt, reference, output per line")
    parser.add_argument("--output", default=None, help="where to write the scored JSONL (default: stdout)")
    parser.add_argument("--wrapper", default="sft", choices=WRAPPERS,
                        help="layout: sft (P\\nR, the reference's default) or pretrain (continuations)")
    parser.add_argument("--max-length", type=int, default=SFT.max_length)
    parser.add_argument("--max-response-length", type=int, default=SFT.max_response_length)
    parser.add_argument("--truncation-side", default="right", choices=("right", "left"),
                        help="which end of a long reference/output is cut (right keeps the start)")
    parser.add_argument("--batch-size", type=int, default=16, help="most sequences in one forward pass")
    parser.add_argument("--max-batch-tokens", type=int, default=MAX_BATCH_TOKENS,
                        help="most tokens (rows x longest row) in one forward pass; a longer sequence runs alone")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def check_output(path: str | Path) -> None:
    """--output must name a file that can be written (checked before any scoring): not a
    directory, and under a directory (or a folder still to be made), not under a file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--output {str(path)!r} is a directory; give a file path, e.g. {str(path / 'scored.jsonl')!r}")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"--output {str(path)!r}: {str(parent)!r} is a file, not a directory")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.output is not None:
            check_output(args.output)
        layout = Layout(max_length=args.max_length, max_response_length=args.max_response_length,
                        truncation_side=args.truncation_side, wrapper=args.wrapper)
        for _ in read_records(args.input):   # fail on bad input before loading the model
            pass
        scorer = RewardScorer(args.model, device=args.device, batch_size=args.batch_size, layout=layout,
                              max_batch_tokens=args.max_batch_tokens)
        n = score_file(scorer, args.input, args.output, chunk=max(64, 8 * args.batch_size),
                       progress=not args.quiet)
    except (BadInput, FileNotFoundError, ValueError) as err:
        print(f"polar.score: error: {err}", file=sys.stderr)
        return 2
    print(f"polar.score: scored {n} line(s)" + (f" into {args.output}" if args.output else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
