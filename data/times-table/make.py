"""The times-table task: single-digit products (2..9 x 2..9) asked in words, split by unordered pair so that the
held-out facts are never trained on in either order. Written by `python data/times-table/make.py` (deterministic)."""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
PHRASINGS = ("What is {a} × {b}?", "Compute {a} × {b}.", "What is {a} times {b}?", "How much is {a} multiplied by {b}?")


def main() -> None:
    pairs = [(a, b) for a in range(2, 10) for b in range(a, 10)]  # 36 unordered pairs
    random.Random(20261207).shuffle(pairs)
    held_out = set(pairs[:8])  # 8 pairs in both orders (a square in one), each fact in every phrasing
    rows = {"train": [], "test": []}
    for a in range(2, 10):
        for b in range(2, 10):
            split = "test" if (min(a, b), max(a, b)) in held_out else "train"
            for k, phrasing in enumerate(PHRASINGS):
                rows[split].append({"id": f"{a}x{b}-{k}", "problem": phrasing.format(a=a, b=b), "answer": str(a * b)})
    for split, items in rows.items():
        random.Random(split).shuffle(items)
        with open(HERE / f"{split}.jsonl", "w") as f:
            for r in items:
                f.write(json.dumps(r) + "\n")
        print(split, len(items))


if __name__ == "__main__":
    main()
