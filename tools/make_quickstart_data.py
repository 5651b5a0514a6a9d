#!/usr/bin/env python3
"""Writes the quickstart instruction data: examples/data/quickstart_{train,valid}.jsonl.

    python tools/make_quickstart_data.py [--out-dir examples/data] [--seed 1234]
                                         [--train 400] [--valid 60]

Every record is a small task whose answer is computed here (integer arithmetic, reversing or
spelling a word, upper-casing a sentence, sorting or summing a few numbers, counting letters,
unit conversions, weekday/month steps, comparisons, a small dict as JSON, parity), answered in
one fixed style, `Answer: <value>.`, so a small model learns the style within a few minutes of
tuning and the eval loss on the held-out file drops clearly. Nothing is copied from a public
dataset; no world facts are stated.

The four record formats that `pesc_megatron.data.formats` detects per record are mixed in each
file (about 50% chat, 25% Camelidae, 20% Alpaca, 5% plain text), some chat and Camelidae
records with 2-3 turns. A task (its question, or its instruction with the same input) occurs at
most once over both files, so the validation records are disjoint from the training ones and
drawn from the same distribution.

Deterministic: one seeded `random.Random`, no set or dict iteration order that depends on
hashing, fixed JSON serialisation; the same arguments give byte-identical files. Stdlib only.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "examples" / "data"

# Format shares; the rounding remainder goes to chat.
SHARES = (("camelidae", 0.25), ("alpaca", 0.20), ("text", 0.05))
MULTI_TURN_SHARE = 0.3  # of chat and Camelidae records

WORDS = (
    "apple", "river", "garden", "pencil", "window", "silver", "candle", "forest", "rocket",
    "planet", "bridge", "yellow", "market", "button", "summer", "winter", "orange", "guitar",
    "kitten", "marble", "pepper", "ladder", "mirror", "basket", "cotton", "dragon", "island",
    "jacket", "lemon", "magnet", "needle", "pillow", "puzzle", "rabbit", "saddle", "tomato",
    "tunnel", "violet", "wallet", "zipper", "anchor", "barrel", "castle", "desert", "engine",
    "falcon", "harbor", "insect", "jungle", "kettle", "lantern", "meadow", "napkin", "oyster",
    "parrot", "quartz", "ribbon", "salmon", "teapot", "velvet", "walnut", "blanket", "cabbage",
    "dolphin", "feather", "giraffe", "hammer", "lobster", "monkey", "noodle", "pumpkin",
    "spider", "thunder", "glass", "stone", "cloud", "bread", "chair", "train", "music",
    "bottle", "carpet", "doctor", "flower", "helmet", "kitchen", "letter", "mountain", "number",
    "ocean", "paper", "rainbow", "shadow", "ticket", "valley", "water", "yogurt", "biscuit",
    "circle", "garlic", "honey", "jelly", "koala", "lizard", "melon", "nickel", "olive", "piano",
    "robin", "sugar", "tiger", "umbrella", "vessel", "whistle", "apron", "beetle", "cherry",
    "dinner", "fabric", "goose", "hollow", "iron", "jigsaw", "kernel", "lemonade", "mitten",
)
ADJECTIVES = ("red", "small", "quiet", "happy", "old", "bright", "tall", "slow", "green", "cold")
NOUNS = ("cat", "dog", "bird", "child", "farmer", "robot", "teacher", "horse", "baker", "sailor")
VERBS = ("sees", "likes", "follows", "paints", "finds", "helps", "calls", "watches")
PLACES = ("near the door", "in the park", "on the hill", "by the lake", "at noon",
          "after lunch", "in the rain", "every morning")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
KEYS = ("id", "name", "color", "size", "count", "price", "level", "score")
NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jana")
COLORS = ("red", "blue", "green", "black", "white", "gray")
UNITS = (  # (from, to, factor, max value)
    ("kilometers", "meters", 1000, 20), ("meters", "centimeters", 100, 50),
    ("hours", "minutes", 60, 24), ("minutes", "seconds", 60, 30), ("days", "hours", 24, 14),
    ("kilograms", "grams", 1000, 20), ("liters", "milliliters", 1000, 12),
    ("weeks", "days", 7, 20),
)

SYSTEM_PROMPTS = (
    "You are a precise assistant. Reply with one line: Answer: <value>.",
    "Solve the task and give only the final line in the form Answer: <value>.",
    "You are a careful helper for small exercises. Always answer as Answer: <value>.",
)


def answer(value) -> str:
    return f"Answer: {value}."


class Task:
    """One exercise: `question` stands alone; `instruction` + `payload` is the same task split
    into a generic instruction and its input (Alpaca records with an input use that form)."""

    def __init__(self, kind: str, question: str, instruction: str, payload: str, value,
                 state=None):
        self.kind, self.question = kind, question
        self.instruction, self.payload = instruction, payload
        self.answer = answer(value)
        self.state = state  # a number a follow-up question can continue from


def pick(rng: random.Random, seq):
    return seq[rng.randrange(len(seq))]


def t_arith(rng):
    op = pick(rng, ("+", "-", "*"))
    if op == "*":
        a, b = rng.randint(2, 19), rng.randint(2, 12)
    else:
        a, b = rng.randint(10, 99), rng.randint(2, 99)
    if op == "-" and b > a:
        a, b = b, a
    r = a + b if op == "+" else a - b if op == "-" else a * b
    q = pick(rng, ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}."))
    return Task("arith", q.format(a=a, op=op, b=b), "Compute the expression.",
                f"{a} {op} {b}", r, state=r)


def t_reverse(rng):
    w = pick(rng, WORDS)
    q = pick(rng, ("Reverse the word \"{w}\".", "Write \"{w}\" backwards.",
                   "What is \"{w}\" spelled backwards?"))
    return Task("reverse", q.format(w=w), "Reverse the given word.", w, w[::-1])


def sentence(rng) -> str:
    subject, obj = rng.sample(NOUNS, 2)
    return (f"the {pick(rng, ADJECTIVES)} {subject} {pick(rng, VERBS)} "
            f"the {obj} {pick(rng, PLACES)}")


def t_upper(rng):
    s = sentence(rng)
    q = pick(rng, ("Convert to upper case: {s}", "Write this sentence in capital letters: {s}",
                   "Upper-case the sentence: {s}"))
    return Task("upper", q.format(s=s), "Convert the sentence to upper case.", s, s.upper())


def numbers(rng, n_lo=3, n_hi=6, hi=99) -> list[int]:
    return [rng.randint(1, hi) for _ in range(rng.randint(n_lo, n_hi))]


def fmt_list(xs) -> str:
    return ", ".join(str(x) for x in xs)


def t_sort(rng):
    xs = numbers(rng)
    desc = rng.random() < 0.3
    order = "descending" if desc else "ascending"
    q = pick(rng, ("Sort these numbers in {o} order: {l}.", "Put {l} in {o} order."))
    return Task("sort", q.format(o=order, l=fmt_list(xs)), f"Sort the numbers in {order} order.",
                fmt_list(xs), fmt_list(sorted(xs, reverse=desc)))


def t_aggregate(rng):
    xs = numbers(rng, 3, 5)
    what = pick(rng, ("sum", "largest", "smallest"))
    if what == "sum":
        q, ins, v = f"What is the sum of {fmt_list(xs)}?", "Add up the numbers.", sum(xs)
    elif what == "largest":
        q, ins, v = (f"Which is the largest of {fmt_list(xs)}?", "Find the largest number.",
                     max(xs))
    else:
        q, ins, v = (f"Which is the smallest of {fmt_list(xs)}?", "Find the smallest number.",
                     min(xs))
    return Task("aggregate", q, ins, fmt_list(xs), v, state=v)


def t_count(rng):
    w = pick(rng, WORDS)
    if rng.random() < 0.5:
        return Task("count", f"How many letters are in the word \"{w}\"?",
                    "Count the letters in the word.", w, len(w))
    # Half the time a letter the word has, otherwise any letter (the answer may be 0).
    letter = pick(rng, w) if rng.random() < 0.75 else pick(rng, "abcdefghijklmnopqrstuvwxyz")
    return Task("count", f"How many times does the letter \"{letter}\" occur in \"{w}\"?",
                f"Count how many times the letter \"{letter}\" occurs in the word.", w,
                w.count(letter))


def t_units(rng):
    src, dst, factor, hi = pick(rng, UNITS)
    x = rng.randint(2, hi)
    q = pick(rng, ("How many {d} are in {x} {s}?", "Convert {x} {s} to {d}."))
    return Task("units", q.format(d=dst, x=x, s=src), f"Convert the amount from {src} to {dst}.",
                f"{x} {src}", f"{x * factor} {dst}")


def t_calendar(rng):
    if rng.random() < 0.5:
        names, unit = WEEKDAYS, "day"
    else:
        names, unit = MONTHS, "month"
    i = rng.randrange(len(names))
    mode = pick(rng, ("next", "previous", "after"))
    if mode == "next":
        q = f"Which {unit} comes after {names[i]}?"
        ins, v = f"Name the {unit} that comes next.", names[(i + 1) % len(names)]
    elif mode == "previous":
        q = f"Which {unit} comes before {names[i]}?"
        ins, v = f"Name the {unit} that comes before.", names[(i - 1) % len(names)]
    else:
        k = rng.randint(2, 10)
        q = f"What {unit} is it {k} {unit}s after {names[i]}?"
        ins, v = f"Name the {unit} {k} {unit}s later.", names[(i + k) % len(names)]
    return Task("calendar", q, ins, names[i], v)


def t_compare(rng):
    a, b = rng.randint(1, 999), rng.randint(1, 999)
    if a == b:
        b += 1
    if rng.random() < 0.5:
        return Task("compare", f"Which is larger, {a} or {b}?", "Give the larger number.",
                    f"{a}, {b}", max(a, b))
    return Task("compare", f"Is {a} greater than {b}? Reply yes or no.",
                "Say yes if the first number is greater than the second, otherwise no.",
                f"{a}, {b}", "yes" if a > b else "no")


def t_json(rng):
    n = rng.randint(2, 3)
    keys = rng.sample(KEYS, n)
    d = {}
    for k in keys:
        if k == "name":
            d[k] = pick(rng, NAMES)
        elif k == "color":
            d[k] = pick(rng, COLORS)
        else:
            d[k] = rng.randint(1, 99)
    desc = ", ".join(f"{k} = {v}" for k, v in d.items())
    return Task("json", f"Write {desc} as a JSON object.", "Write the fields as a JSON object.",
                desc, json.dumps(d))


def t_spell(rng):
    w = pick(rng, WORDS)
    q = pick(rng, ("Spell \"{w}\" with hyphens between the letters.",
                   "Spell out the word \"{w}\" letter by letter, joined by hyphens."))
    return Task("spell", q.format(w=w), "Spell the word with hyphens between the letters.", w,
                "-".join(w))


def t_parity(rng):
    x = rng.randint(1, 999)
    return Task("parity", f"Is {x} even or odd?", "Say whether the number is even or odd.",
                str(x), "even" if x % 2 == 0 else "odd")


TASKS = (t_arith, t_reverse, t_upper, t_sort, t_aggregate, t_count, t_units, t_calendar,
         t_compare, t_json, t_spell, t_parity)


def follow_up(rng, prev: Task):
    """A question continuing from the previous answer's plain number (arithmetic, sum, largest,
    smallest), or None."""
    if prev.state is None:
        return None
    x = prev.state
    mode = pick(rng, ("add", "double", "sub"))
    if mode == "add":
        k = rng.randint(2, 50)
        return Task("follow", f"Now add {k} to that.", "", "", x + k, state=x + k)
    if mode == "double":
        return Task("follow", "Now double that number.", "", "", 2 * x, state=2 * x)
    k = rng.randint(1, 9)
    return Task("follow", f"Now subtract {k} from that.", "", "", x - k, state=x - k)


class Generator:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.seen: set[str] = set()  # membership only, never iterated

    def task(self) -> Task:
        """A new task whose question (and split form) was not used before."""
        while True:
            t = pick(self.rng, TASKS)(self.rng)
            keys = (t.question, f"{t.instruction}\x00{t.payload}")
            if not any(k in self.seen for k in keys):
                self.seen.update(keys)
                return t

    def dialogue(self, n_turns: int) -> list[Task]:
        turns = [self.task()]
        while len(turns) < n_turns:
            f = follow_up(self.rng, turns[-1]) if self.rng.random() < 0.5 else None
            turns.append(f or self.task())
        return turns

    def n_turns(self) -> int:
        return self.rng.choice((2, 2, 3)) if self.rng.random() < MULTI_TURN_SHARE else 1

    def system(self, p: float) -> str:
        return pick(self.rng, SYSTEM_PROMPTS) if self.rng.random() < p else ""

    def chat(self) -> dict:
        msgs = []
        system = self.system(0.4)
        if system:
            msgs.append({"role": "system", "content": system})
        for t in self.dialogue(self.n_turns()):
            msgs += [{"role": "user", "content": t.question},
                     {"role": "assistant", "content": t.answer}]
        return {"messages": msgs}

    def camelidae(self) -> dict:
        return {"instruction": self.system(0.5),
                "conversation": [{"input": t.question, "output": t.answer}
                                 for t in self.dialogue(self.n_turns())],
                "corpus": ""}

    def alpaca(self) -> dict:
        t = self.task()
        if self.rng.random() < 0.6:
            return {"instruction": t.instruction, "input": t.payload, "output": t.answer}
        return {"instruction": t.question, "input": "", "output": t.answer}

    def text(self) -> dict:
        lines = []
        for _ in range(self.rng.randint(2, 3)):
            t = self.task()
            lines.append(f"Question: {t.question}\n{t.answer}")
        return {"text": "\n\n".join(lines)}

    def split(self, n: int) -> list[dict]:
        counts = {fmt: round(n * share) for fmt, share in SHARES}
        counts["chat"] = n - sum(counts.values())
        kinds = [fmt for fmt in ("chat", "camelidae", "alpaca", "text") for _ in range(counts[fmt])]
        self.rng.shuffle(kinds)
        return [getattr(self, fmt)() for fmt in kinds]


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--train", type=int, default=400, help="training records")
    ap.add_argument("--valid", type=int, default=60, help="held-out records")
    args = ap.parse_args(argv)
    gen = Generator(args.seed)
    train = gen.split(args.train)
    valid = gen.split(args.valid)  # same generator: no question repeats across the two
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, recs in (("quickstart_train.jsonl", train), ("quickstart_valid.jsonl", valid)):
        write_jsonl(args.out_dir / name, recs)
        print(f"{args.out_dir / name}: {len(recs)} records")


if __name__ == "__main__":
    main()
