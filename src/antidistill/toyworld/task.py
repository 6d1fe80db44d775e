"""Multi-step arithmetic word problems with several valid chain-of-thought paths.

A problem: someone starts with ``a`` items, then 2-3 events add or remove some. Valid solutions:

* **sequential**: apply the events in order (``5 + 3 = 8 . 8 - 2 = 6 .``);
* **net first**: total the gains and the losses, then combine (``3 + 4 = 7 . ... ``);
* each addition may be written in either operand order, and the connective words vary.

So the teacher's distribution has genuinely different correct traces for the sampler to steer among,
as in the paper's setting. Every solution ends in the paper's final-answer format,
``\n\n**Final Answer**\n\\boxed{N}``, as R1-style traces do.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..prompting import ANSWER_FORCING, chat_messages
from .tokenizer import render_chat

NAMES = ["Ann", "Bob", "Cara", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jon"]
ITEMS = ["apples", "pens", "cards", "coins", "books", "shells", "stamps", "rocks"]
GAIN_VERBS = ["buys", "finds", "gets", "wins"]
LOSS_VERBS = ["gives away", "loses", "sells", "eats"]
CONNECTIVES = ["First", "Then", "Next", "Now", "So"]
MAX_VALUE = 40


@dataclass(frozen=True)
class Problem:
    name: str
    item: str
    start: int
    events: tuple[tuple[str, int, str], ...]  # (sign "+"/"-", amount, verb)

    @property
    def answer(self) -> int:
        v = self.start
        for sign, n, _ in self.events:
            v = v + n if sign == "+" else v - n
        return v

    @property
    def question(self) -> str:
        parts = [f"{self.name} has {self.start} {self.item} ."]
        for sign, n, verb in self.events:
            parts.append(f"{self.name} {verb} {n} {self.item} ." if sign == "-" else f"{self.name} {verb} {n} more .")
        parts.append(f"How many {self.item} does {self.name} have now ?")
        return " ".join(parts)


def _add(rng: random.Random, a: int, b: int) -> str:
    return f"{a} + {b} = {a + b}" if rng.random() < 0.5 else f"{b} + {a} = {a + b}"


def solve(problem: Problem, rng: random.Random, path: str | None = None) -> str:
    """One valid chain-of-thought solution; ``path`` is ``"sequential"``, ``"net"`` or random."""
    path = path or rng.choice(["sequential", "net"])
    gains = [n for s, n, _ in problem.events if s == "+"]
    losses = [n for s, n, _ in problem.events if s == "-"]
    steps = []
    if path == "net" and len(gains) >= 1 and len(losses) >= 1 and len(problem.events) >= 3:
        g = gains[0]
        for n in gains[1:]:
            steps.append(f"{_add(rng, g, n)} more")
            g += n
        l = losses[0]
        for n in losses[1:]:
            steps.append(f"{_add(rng, l, n)} fewer")
            l += n
        total = problem.start + g
        steps.append(_add(rng, problem.start, g))
        steps.append(f"{total} - {l} = {total - l}")
    else:
        v = problem.start
        for sign, n, _ in problem.events:
            if sign == "+":
                steps.append(_add(rng, v, n))
                v += n
            else:
                steps.append(f"{v} - {n} = {v - n}")
                v -= n
    conn = rng.sample(CONNECTIVES[:-1], k=min(len(steps) - 1, 4)) if len(steps) > 1 else []
    lines = []
    for i, st in enumerate(steps):
        lines.append(f"{conn[i - 1]} {st} ." if 0 < i <= len(conn) else f"{st} .")
    return " ".join(lines) + f" So {problem.name} has {problem.answer} .{ANSWER_FORCING}{problem.answer}}}"


def random_problem(rng: random.Random) -> Problem:
    while True:
        start = rng.randint(2, 20)
        k = rng.choice([2, 3, 3])
        events, v, ok = [], start, True
        for _ in range(k):
            sign = rng.choice("+-")
            n = rng.randint(1, 9)
            v = v + n if sign == "+" else v - n
            if not 0 <= v <= MAX_VALUE:
                ok = False
                break
            events.append((sign, n, rng.choice(GAIN_VERBS if sign == "+" else LOSS_VERBS)))
        if ok:
            return Problem(rng.choice(NAMES), rng.choice(ITEMS), start, tuple(events))


def make_splits(seed: int, n_train_pool: int, n_test: int, holdout_frac: float = 0.3,
                n_holdout: int | None = None) -> dict[str, list[dict]]:
    """``train`` / ``holdout`` (the shuffled train pool: ``n_holdout`` problems, or ``holdout_frac`` of
    it, for the holdout, the rest for train) and a separate ``test``; no problem is shared."""
    if n_holdout is not None and not 0 < n_holdout < n_train_pool:
        raise ValueError(f"n_holdout must be in (0, n_train_pool={n_train_pool}), got n_holdout={n_holdout}")
    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[Problem] = []
    while len(problems) < n_train_pool + n_test:
        p = random_problem(rng)
        if p.question not in seen:
            seen.add(p.question)
            problems.append(p)
    test, pool = problems[:n_test], problems[n_test:]
    rng.shuffle(pool)
    n_hold = n_holdout if n_holdout is not None else int(round(holdout_frac * len(pool)))
    splits = {"train": pool[n_hold:], "holdout": pool[:n_hold], "test": test}
    return {
        name: [{"id": f"{name}-{i}", "question": p.question, "solution": solve(p, rng), "answer": str(p.answer)}
               for i, p in enumerate(ps)]
        for name, ps in splits.items()
    }


def generic_text(seed: int, n: int) -> list[str]:
    """Toy-language text with no problem/solution pairs: statements, counts and arithmetic facts.

    Proxy and student are pretrained on it, so they start from general ability in the toy
    language (arithmetic included) and distillation teaches them the task, as with the paper's
    pretrained models.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.random()
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b = rng.randint(0, 20), rng.randint(1, 9)
        if kind < 0.35:
            out.append(f"{a} + {b} = {a + b} . {b} + {a} = {a + b} .")
        elif kind < 0.6 and a >= b:
            out.append(f"{a} - {b} = {a - b} .")
        elif kind < 0.8:
            out.append(f"{name} has {a} {item} . {name} {rng.choice(GAIN_VERBS)} {b} more .")
        else:
            other = rng.choice(NAMES)
            out.append(f"{name} {rng.choice(LOSS_VERBS)} {b} {item} . {other} has {a} {rng.choice(ITEMS)} .")
    return out


def arithmetic_chains(seed: int, n: int) -> list[str]:
    """Multi-step arithmetic in prose ("5 + 3 = 8 . Then 8 - 2 = 6 . So it is 6 .")."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        v, parts = rng.randint(2, 20), []
        for _ in range(rng.choice([2, 3])):
            b = rng.randint(1, 9)
            if rng.random() < 0.5 or v < b:
                parts.append(f"{v} + {b} = {v + b} .")
                v += b
            else:
                parts.append(f"{v} - {b} = {v - b} .")
                v -= b
        out.append(" ".join(f"{CONNECTIVES[i - 1]} {p}" if i else p for i, p in enumerate(parts)) + f" So it is {v} .")
    return out


def chat_arithmetic(seed: int, n: int, system_prompt: str) -> list[str]:
    """Arithmetic requests answered in the chat format ("<|user|>14 + 5 - 3 = ?" → "14 + 5 = 19 . ...").

    Generic instruction-style text, not the task: bare expressions, no word problems, no connectives
    and no final-answer block. Real base models have seen chat-formatted text; without it the chat
    template's tokens are new to the student and distillation must first learn to read through them.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        v = rng.randint(2, 20)
        expr, comp = [str(v)], []
        for _ in range(rng.choice([1, 2, 3])):
            b = rng.randint(1, 9)
            if rng.random() < 0.5 or v < b:
                comp.append(f"{v} + {b} = {v + b} .")
                expr.append(f"+ {b}")
                v += b
            else:
                comp.append(f"{v} - {b} = {v - b} .")
                expr.append(f"- {b}")
                v -= b
        messages = chat_messages(f"{' '.join(expr)} = ?", system_prompt if rng.random() < 0.5 else "")
        out.append(render_chat(messages + [{"role": "assistant", "content": f"{' '.join(comp)} So it is {v} ."}]))
    return out


def story_text(problem: Problem) -> str:
    """A problem told as plain prose with its sequential computation.

    Generic pretraining text, not a task solution: no chat turns, no connectives, one path only
    and no final-answer block. Real base models see word problems like this in pretraining; it
    gives the proxy and the student the paper's "nearby starting point".
    """
    v, comp = problem.start, []
    for sign, n, _ in problem.events:
        nv = v + n if sign == "+" else v - n
        comp.append(f"{v} {sign} {n} = {nv} .")
        v = nv
    return f"{problem.question} {' '.join(comp)} {problem.name} has {v} {problem.item} ."
