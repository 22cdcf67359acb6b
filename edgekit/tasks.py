"""The synthetic task suite the reference checkpoints are trained and measured on.

Five tasks, each at three difficulty levels, as short text problems for the byte tokenizer:

    copy      "copy hbqe="        -> "hbqe"         letters; length by level
    reverse   "rev hbqe="         -> "eqbh"
    sort      "sort 3141="        -> "1134"         digits
    add       "add 123+045="      -> "0168"         operands zero-padded to the level's width, the answer
                                                    to one digit more; most significant digit first
    brackets  "bal ([)]="         -> "no"           "()[]", balanced or not (half each); length by level

The model sees [BOS] prompt answer [EOS]; training puts the loss on the answer and EOS only.
Problems come from a seeded `random.Random`, so every split is the same on every machine. The test
split is a fixed sample (`test_split`) and training never draws a problem whose prompt is in it
(`training_problems`), so held-out accuracy is measured on prompts the models never saw.

`exact_match_accuracy` measures any engine through `edgekit.generation.generate`: give it a factory
of fresh steppers (one KV cache per problem), e.g. `lambda: runner.stepper(threshold)`, and the same
function scores PyTorch, torch-int8, ONNX Runtime or TensorRT.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from edgekit.generation import Step, generate
from edgekit.tokenizer import BOS, EOS

TASKS = ("copy", "reverse", "sort", "add", "brackets")
LEVELS = ("easy", "medium", "hard")
TEST_SEED = 20240808  # the held-out split; never change it, recorded floors depend on it
TEST_PER_CELL = 64  # held-out problems per (task, level): 960 in all

# per task and level: (min, max) length of the string, or digits per operand for "add". Zero-padding
# the sums to a fixed width puts each digit at a fixed distance from the digits it depends on, which a
# relative-position model can learn; unpadded, a 2,500-step v3-ref got 25% of 2-digit sums and 0% of longer ones.
LENGTHS: dict[str, dict[str, tuple[int, int]]] = {
    "copy": {"easy": (2, 4), "medium": (5, 8), "hard": (9, 14)},
    "reverse": {"easy": (2, 4), "medium": (5, 8), "hard": (9, 14)},
    "sort": {"easy": (2, 4), "medium": (5, 7), "hard": (8, 11)},
    "add": {"easy": (2, 2), "medium": (3, 3), "hard": (4, 5)},
    "brackets": {"easy": (4, 8), "medium": (10, 12), "hard": (14, 18)},  # even lengths only
}
PREFIX = {"copy": "copy ", "reverse": "rev ", "sort": "sort ", "add": "add ", "brackets": "bal "}
PAIRS = {"(": ")", "[": "]"}


@dataclass(frozen=True)
class Problem:
    task: str
    level: str
    prompt: str  # ends with "="
    answer: str

    def prompt_ids(self) -> list[int]:
        return [BOS, *self.prompt.encode()]

    def answer_ids(self) -> list[int]:
        """What a correct model generates: the answer bytes, then EOS."""
        return [*self.answer.encode(), EOS]


def _letters(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def balanced(s: str) -> bool:
    stack = []
    for c in s:
        if c in PAIRS:
            stack.append(PAIRS[c])
        elif not stack or stack.pop() != c:
            return False
    return not stack


def _dyck(rng: random.Random, n: int) -> str:
    """A uniformly shaped-enough random balanced string of even length n over "()[]"."""
    out, stack = [], []
    while len(out) < n:
        remaining = n - len(out)
        if stack and (remaining == len(stack) or rng.random() < 0.5):
            out.append(stack.pop())
        else:
            opener = rng.choice("([")
            out.append(opener)
            stack.append(PAIRS[opener])
    return "".join(out)


def _unbalanced(rng: random.Random, n: int) -> str:
    """A balanced string broken by one edit: swap two brackets, or change one bracket's type or side."""
    while True:
        s = list(_dyck(rng, n))
        i, j = rng.sample(range(n), 2)
        edit = rng.choice(("swap", "type", "side"))
        if edit == "swap":
            s[i], s[j] = s[j], s[i]
        elif edit == "type":
            s[i] = {"(": "[", "[": "(", ")": "]", "]": ")"}[s[i]]
        else:
            s[i] = {"(": ")", ")": "(", "[": "]", "]": "["}[s[i]]
        t = "".join(s)
        if not balanced(t):
            return t


def make_problem(rng: random.Random, task: str, level: str) -> Problem:
    lo, hi = LENGTHS[task][level]
    n = rng.randint(lo, hi)
    if task == "copy":
        s = _letters(rng, n)
        body, answer = s, s
    elif task == "reverse":
        s = _letters(rng, n)
        body, answer = s, s[::-1]
    elif task == "sort":
        s = _digits(rng, n)
        body, answer = s, "".join(sorted(s))
    elif task == "add":
        a, b = rng.randrange(10**n), rng.randrange(10**n)
        body, answer = f"{a:0{n}d}+{b:0{n}d}", f"{a + b:0{n + 1}d}"
    elif task == "brackets":
        n += n % 2
        ok = rng.random() < 0.5
        body = _dyck(rng, n) if ok else _unbalanced(rng, n)
        answer = "yes" if ok else "no"
    else:
        raise ValueError(f"unknown task {task!r}")
    return Problem(task, level, f"{PREFIX[task]}{body}=", answer)


def cells() -> list[tuple[str, str]]:
    return [(t, lv) for t in TASKS for lv in LEVELS]


def test_split(per_cell: int = TEST_PER_CELL, seed: int = TEST_SEED) -> list[Problem]:
    """The fixed held-out split: `per_cell` distinct prompts per (task, level), in a stable order.

    A smaller per_cell gives the first problems of each cell of the full split (a fixed sample of it)."""
    if not 0 < per_cell <= TEST_PER_CELL:
        raise ValueError(f"per_cell must be 1..{TEST_PER_CELL}: training only excludes that many")
    out = []
    for ci, (task, level) in enumerate(cells()):
        rng = random.Random(seed * 100 + ci)
        seen: set[str] = set()
        while len(seen) < per_cell:
            p = make_problem(rng, task, level)
            if p.prompt not in seen:
                seen.add(p.prompt)
                out.append(p)
    return out


def held_out_prompts() -> frozenset[str]:
    return frozenset(p.prompt for p in test_split())


def training_problems(seed: int, levels: Iterable[str] = LEVELS) -> Iterator[Problem]:
    """An endless seeded stream, uniform over the tasks and `levels`, never yielding a held-out prompt."""
    rng = random.Random(seed)
    held = held_out_prompts()
    levels = list(levels)
    while True:
        task, level = rng.choice(TASKS), rng.choice(levels)
        p = make_problem(rng, task, level)
        if p.prompt not in held:
            yield p


def sample(problems: Iterable[Problem], per_cell: int) -> list[Problem]:
    """The first `per_cell` problems of every (task, level), in order (stops once every cell is full,
    so an endless stream is fine)."""
    count: dict[tuple[str, str], int] = {}
    out = []
    for p in problems:
        k = (p.task, p.level)
        if count.get(k, 0) < per_cell:
            count[k] = count.get(k, 0) + 1
            out.append(p)
            if len(out) == per_cell * len(TASKS) * len(LEVELS):
                break
    return out


def text_ids(problems: Iterable[Problem]) -> list[int]:
    """The problems as one token stream (prompt, answer, EOS, ...): what the reference models read."""
    return [t for p in problems for t in (*p.prompt_ids(), *p.answer_ids())]


# ---------------------------------------------------------------------------------------------
# exact-match accuracy through any engine


@dataclass
class Cell:
    """Results for one (task, level). Layer counts are per model call (prefill = 1 call) and, weighted
    by the tokens in each call, per token; both empty for engines without gates (V3)."""

    correct: int = 0
    total: int = 0
    calls: int = 0
    tokens: int = 0
    runs: list[int] = field(default_factory=list)  # per layer: calls in which it ran
    token_runs: list[int] = field(default_factory=list)  # per layer: tokens of the calls in which it ran

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass
class Score:
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)

    def _select(self, task: str | None, level: str | None) -> list[Cell]:
        return [c for (t, lv), c in self.cells.items() if task in (None, t) and level in (None, lv)]

    def accuracy(self, task: str | None = None, level: str | None = None) -> float:
        cs = self._select(task, level)
        total = sum(c.total for c in cs)
        return sum(c.correct for c in cs) / total if total else 0.0

    def skipped(self, layers: Iterable[int], task: str | None = None, level: str | None = None,
                per: str = "call") -> float:
        """Share of the executions of `layers` (R1: the gated ones) that were skipped."""
        layers = list(layers)
        cs = [c for c in self._select(task, level) if c.runs]
        if per == "call":
            slots = sum(c.calls for c in cs) * len(layers)
            ran = sum(c.runs[i] for c in cs for i in layers)
        else:
            slots = sum(c.tokens for c in cs) * len(layers)
            ran = sum(c.token_runs[i] for c in cs for i in layers)
        return 1.0 - ran / slots if slots else 0.0

    def to_dict(self, gated: Iterable[int] = ()) -> dict:
        """Plain data: overall and per (task, level) accuracy, plus skip shares when `gated` is given."""
        gated = list(gated)

        def row(task=None, level=None):
            cs = self._select(task, level)
            r = {"accuracy": round(self.accuracy(task, level), 4), "n": sum(c.total for c in cs)}
            if gated and any(c.runs for c in cs):
                r["skipped_per_call"] = round(self.skipped(gated, task, level, "call"), 4)
                r["skipped_per_token"] = round(self.skipped(gated, task, level, "token"), 4)
            return r

        return {"overall": row(),
                "by_level": {lv: row(level=lv) for lv in LEVELS},
                "by_task": {t: {lv: row(t, lv) for lv in LEVELS} for t in TASKS}}


def exact_match_accuracy(step_factory: Callable[[], Step], problems: Iterable[Problem]) -> Score:
    """Greedy-decode every problem with a fresh step from `step_factory` and compare exactly.

    A problem is correct when the engine generates the answer bytes followed by EOS. Generation stops
    at EOS or after len(answer) + 1 tokens, which decides exact match just as unbounded decoding would.
    """
    score = Score()
    for p in problems:
        cell = score.cells.setdefault((p.task, p.level), Cell())
        prompt, want = p.prompt_ids(), p.answer_ids()
        g = generate(step_factory(), prompt, max_new_tokens=len(want), stop=EOS)
        cell.total += 1
        cell.correct += g.tokens == want
        for i, executed in enumerate(g.executed):
            n_tok = len(prompt) if i == 0 else 1
            if not cell.runs:
                cell.runs, cell.token_runs = [0] * len(executed), [0] * len(executed)
            for layer, ran in enumerate(executed):
                cell.runs[layer] += ran
                cell.token_runs[layer] += ran * n_tok
            cell.calls += 1
            cell.tokens += n_tok
    return score
