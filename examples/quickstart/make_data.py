"""Regenerate the quickstart's dataset: a small word-manipulation task a tiny model can learn on a CPU.

Alpaca layout (instruction / input / output). The base model (random init) scores 0 exact match; a few minutes
of LoRA or full training on two CPU cores moves it well above that, so the metrics visibly improve.
Run: python examples/quickstart/make_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = [
    "red",
    "blue",
    "green",
    "black",
    "white",
    "amber",
    "cat",
    "dog",
    "fox",
    "owl",
    "bee",
    "cow",
    "sun",
    "moon",
    "star",
    "rain",
    "snow",
    "wind",
    "oak",
    "pine",
    "rose",
    "lily",
    "salt",
    "iron",
]

# Words are comma-separated: with a byte-level BPE, "red" after a space and "red" at the start of a line are
# different tokens, which would turn copying into copying plus a lookup table the tiny model learns slowly.
TASKS = {
    "Repeat the words.": lambda ws: ",".join(ws),
    "Give the first word.": lambda ws: ws[0],
    "Give the last word.": lambda ws: ws[-1],
    "Reverse the words.": lambda ws: ",".join(reversed(ws)),
}


def rows(count: int, rng: random.Random) -> list[dict[str, str]]:
    out = []
    for _ in range(count):
        instruction = rng.choice(list(TASKS))
        words = rng.sample(WORDS, rng.randint(2, 4))
        out.append({"instruction": instruction, "input": ",".join(words), "output": TASKS[instruction](words)})
    return out


def main() -> None:
    rng = random.Random(7)
    data = Path(__file__).parent / "data"
    data.mkdir(exist_ok=True)
    train, evaluation = rows(1600, rng), rows(120, rng)
    seen = {(r["instruction"], r["input"]) for r in train}
    evaluation = [r for r in evaluation if (r["instruction"], r["input"]) not in seen]
    for name, part in (("train.jsonl", train), ("eval.jsonl", evaluation)):
        with (data / name).open("w") as handle:
            for row in part:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
