"""`python -m polar.score --model DIR --input FILE.jsonl [--output FILE]`: see polar.scoring."""

from polar.scoring import main

if __name__ == "__main__":
    raise SystemExit(main())
