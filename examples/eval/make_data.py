"""Writes the shipped tasks' data (deterministic): python examples/eval/make_data.py."""
import json
import random
from pathlib import Path

HERE = Path(__file__).parent


def write(name: str, rows: list[dict]) -> None:
    with open(HERE / f"{name}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def comparisons(rng: random.Random, n: int) -> list[dict]:
    """Which of three numbers is the largest: a 3-way multiple choice."""
    rows = []
    for _ in range(n):
        nums = rng.sample(range(10, 1000), 3)
        rows.append({"question": f"Which is the largest of {nums[0]}, {nums[1]} and {nums[2]}?",
                     "choices": [str(x) for x in nums], "label": nums.index(max(nums))})
    return rows


def sums(rng: random.Random, n: int) -> list[dict]:
    """Two-number additions, answered by exact match."""
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        rows.append({"question": f"What is {a} + {b}?", "answer": str(a + b)})
    return rows


TEXT = [
    "The river rose after three days of rain, and the village moved its boats to higher ground.",
    "A mixture of experts routes each token to a few small networks instead of one large one.",
    "She counted the coins twice, wrote the total in the ledger, and locked the drawer.",
    "Frozen weights need no optimizer state, so only the adapters and the router are trained.",
    "At noon the market was loud with traders calling out the prices of apples and bread.",
    "The bridge was built in stone, with five arches, and it still carries the old road.",
    "Sort the list from the smallest number to the largest, then report the middle one.",
    "Rain fell on the roof all night; by morning the garden paths were streams of mud.",
]


if __name__ == "__main__":
    rng = random.Random(2026)
    write("pesc_mc", comparisons(rng, 40))
    write("pesc_mc_train", comparisons(rng, 8))
    write("pesc_gen", sums(rng, 24))
    write("pesc_gen_train", sums(rng, 8))
    write("pesc_text", [{"text": t} for t in TEXT])
