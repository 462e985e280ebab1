"""Procedurally generated multi-step arithmetic word problems with step-by-step demonstrations."""

from __future__ import annotations

import dataclasses
import hashlib
import re

import numpy as np

OPS = "+-*"
NUM_BUCKETS = 10  # chains hash into buckets; bucket 0 is held out from training specs
_MAX_ATTEMPTS = 10_000
_OP_SENTENCE = {"+": "Add {b}.", "-": "Subtract {b}.", "*": "Multiply by {b}."}
_DISTRACTORS = (
    "The box weighs {n} kg.",
    "Ann is {n} years old.",
    "The bus has {n} seats.",
    "A rope is {n} m long.",
    "The shop has {n} cats.",
    "The room is {n} m wide.",
)
_QUESTION_END = "What is the result?"


@dataclasses.dataclass(frozen=True)
class ArithSpec:
    """Distribution of arithmetic chains: lengths, magnitudes, distractors, ops and seed."""

    min_steps: int = 2  # fewest operations in a chain
    max_steps: int = 4  # most operations in a chain
    max_operand: int = 9  # start value and operands are drawn from [1, max_operand]
    max_value: int = 99  # every intermediate result stays in [0, max_value]
    num_distractors: int = 1  # most irrelevant facts per question
    min_distractors: int = 0  # fewest irrelevant facts per question
    ops: str = OPS  # allowed operations, a subset of "+-*"
    seed: int = 0
    holdout: bool = False  # True: only chains in the held-out bucket; False: never those

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(
                f"ArithSpec: need 1 <= min_steps <= max_steps, got min_steps={self.min_steps}, "
                f"max_steps={self.max_steps}"
            )
        if self.max_operand < 1:
            raise ValueError(f"ArithSpec: max_operand must be >= 1, got {self.max_operand}")
        if self.max_value < self.max_operand:
            raise ValueError(
                f"ArithSpec: max_value ({self.max_value}) must be >= max_operand "
                f"({self.max_operand})"
            )
        if not 0 <= self.min_distractors <= self.num_distractors:
            raise ValueError(
                "ArithSpec: need 0 <= min_distractors <= num_distractors, got "
                f"min_distractors={self.min_distractors}, num_distractors={self.num_distractors}"
            )
        if not self.ops or set(self.ops) - set(OPS) or len(set(self.ops)) != len(self.ops):
            raise ValueError(
                f"ArithSpec: ops must be a non-empty subset of {OPS!r} without repeats, "
                f"got {self.ops!r}"
            )


_PRESETS = {
    "train": ArithSpec(min_steps=2, max_steps=4, max_operand=9, max_value=99,
                       num_distractors=1, min_distractors=0, seed=0, holdout=False),
    "test": ArithSpec(min_steps=2, max_steps=4, max_operand=9, max_value=99,
                      num_distractors=1, min_distractors=0, seed=1, holdout=True),
    "ood": ArithSpec(min_steps=5, max_steps=6, max_operand=9, max_value=999,
                     num_distractors=2, min_distractors=2, seed=2, holdout=True),
}
VARIANTS = tuple(_PRESETS)


def arith_spec(variant: str) -> ArithSpec:
    """The preset spec for `variant` in ("train", "test", "ood")."""
    if variant not in _PRESETS:
        raise ValueError(f"arith_spec: unknown variant {variant!r}; expected one of {VARIANTS}")
    return _PRESETS[variant]


@dataclasses.dataclass(frozen=True)
class ArithItem:
    """One problem: question text, reference answer, demonstration steps and full solution."""

    id: str
    question: str
    answer: str
    steps: tuple[str, ...]  # "Step n: a op b = c" lines
    solution: str  # "<think>\n<steps>\n</think>\n<answer>...</answer>"
    distractors: tuple[int, ...] = ()  # the numbers of the irrelevant facts, in question order


def apply_op(a: int, op: str, b: int) -> int:
    """The result of `a op b` for op in "+-*"."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"apply_op: unknown op {op!r}; expected one of {OPS!r}")


def chain_bucket(start: int, ops: tuple[str, ...], operands: tuple[int, ...]) -> int:
    """A stable hash bucket in [0, NUM_BUCKETS) of a chain, used to hold chains out of training."""
    key = f"{start}|" + "|".join(f"{o}{b}" for o, b in zip(ops, operands, strict=True))
    digest = hashlib.blake2b(key.encode("ascii"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % NUM_BUCKETS


def _feasible(v: int, op: str, max_operand: int, max_value: int) -> tuple[int, int]:
    """Inclusive operand range [lo, hi] keeping `v op b` in [0, max_value] (empty when lo > hi)."""
    if op == "+":
        return 1, min(max_operand, max_value - v)
    if op == "-":
        return 1, min(max_operand, v)
    if v == 0:  # multiplying zero is a no-op step
        return 1, 0
    return 2, min(max_operand, max_value // v)


def _pick(u: float, k: int) -> int:
    """An integer in [0, k) from a uniform draw u in [0, 1)."""
    return min(int(u * k), k - 1)


def _sample_chain(rng: np.random.Generator, spec: ArithSpec):
    """One chain (start, ops, operands) or None when a step had no feasible operation."""
    u = rng.random(2 + 2 * spec.max_steps).tolist()  # one draw per attempt: cheap
    n_steps = spec.min_steps + _pick(u[0], spec.max_steps - spec.min_steps + 1)
    start = 1 + _pick(u[1], spec.max_operand)
    v, ops, operands = start, [], []
    for j in range(n_steps):
        choices = []
        for op in spec.ops:
            lo, hi = _feasible(v, op, spec.max_operand, spec.max_value)
            if lo <= hi:
                choices.append((op, lo, hi))
        if not choices:
            return None
        op, lo, hi = choices[_pick(u[2 + 2 * j], len(choices))]
        b = lo + _pick(u[3 + 2 * j], hi - lo + 1)
        v = apply_op(v, op, b)
        ops.append(op)
        operands.append(b)
    return start, tuple(ops), tuple(operands)


def _distractors(rng: np.random.Generator, spec: ArithSpec, used: set[int]):
    """Irrelevant facts (template index, number) whose numbers differ from every number the chain
    uses."""
    count = int(rng.integers(spec.min_distractors, spec.num_distractors + 1))
    pool = [n for n in range(1, 2 * spec.max_operand + 11) if n not in used]
    templates = rng.permutation(len(_DISTRACTORS))[:count]
    return [(int(t), pool[int(rng.integers(len(pool)))]) for t in templates]


def make_item(spec: ArithSpec, index: int) -> ArithItem:
    """The item at `index` for `spec`; a pure function of (spec, index)."""
    rng = np.random.default_rng([spec.seed, index])
    for _ in range(_MAX_ATTEMPTS):
        chain = _sample_chain(rng, spec)
        if chain is not None and (chain_bucket(*chain) == 0) == spec.holdout:
            break
    else:
        raise RuntimeError(f"make_item: no valid chain for index {index} after "
                           f"{_MAX_ATTEMPTS} attempts; spec={spec}")
    start, ops, operands = chain
    parts = [(f"Start with {start}.", None)]  # (sentence, distractor number or None)
    parts += [(_OP_SENTENCE[o].format(b=b), None) for o, b in zip(ops, operands, strict=True)]
    for t, n in _distractors(rng, spec, {start, *operands}):
        parts.insert(int(rng.integers(len(parts) + 1)), (_DISTRACTORS[t].format(n=n), n))
    sentences = [text for text, _ in parts]
    question = " ".join([*sentences, _QUESTION_END])

    steps, v = [], start
    for k, (o, b) in enumerate(zip(ops, operands, strict=True), start=1):
        steps.append(_step_line(k, v, o, b))
        v = apply_op(v, o, b)
    answer = str(v)
    solution = _solution(steps, answer)
    return ArithItem(id=f"arith/{spec.seed}/{index}", question=question, answer=answer,
                     steps=tuple(steps), solution=solution,
                     distractors=tuple(n for _, n in parts if n is not None))


def distracted_solution(item: ArithItem) -> str:
    """The demonstration of a careless teacher that, after the chain, also adds the question's
    first irrelevant number: one extra step, and an answer that is wrong. The item's own solution
    when its question has no distractor. A systematic habit for supervised imitation to copy and
    outcome rewards (or step credit) to remove; see `warmstart.distracted_prob`."""
    if not item.distractors:
        return item.solution
    v = int(item.answer)
    d = item.distractors[0]
    steps = [*item.steps, _step_line(len(item.steps) + 1, v, "+", d)]
    return _solution(steps, str(v + d))


def _step_line(k: int, a: int, op: str, b: int) -> str:
    """Step k of a chain, "Step k: a op b = c", the line `chain_is_valid` checks."""
    return f"Step {k}: {a} {op} {b} = {apply_op(a, op, b)}"


def _solution(steps, answer: str) -> str:
    """A demonstration: the step lines inside <think>, then the answer."""
    return "<think>\n" + "\n".join(steps) + f"\n</think>\n<answer>{answer}</answer>"


class ArithTask:
    """A deterministic, indexable collection of `size` arithmetic items drawn from `spec`."""

    def __init__(self, spec: ArithSpec, size: int = 10_000_000):
        if size < 0:
            raise ValueError(f"ArithTask: size must be >= 0, got {size}")
        self.spec = spec
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> ArithItem:
        index = int(index)
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"ArithTask: index {index} out of range for size {self.size}")
        return make_item(self.spec, index)


def check_answer(pred: str | None, answer: str) -> bool:
    """Whether `pred` and `answer` are the same integer (surrounding whitespace ignored)."""
    if pred is None:
        return False
    try:
        return int(pred.strip()) == int(answer.strip())
    except ValueError:
        return False


def format_prompt(question: str) -> str:
    """The raw prompt text the model sees; the completion begins with "<think>"."""
    return f"Question: {question}\nAnswer: "


def corpus(spec: ArithSpec, n: int, start: int = 0) -> list[str]:
    """Prompt + solution texts of items start..start+n-1, for tokenizer training."""
    return [format_prompt(it.question) + it.solution
            for it in (make_item(spec, i) for i in range(start, start + n))]


_STEP_RE = re.compile(r"(?m)^Step \d+: (-?\d+) ([-+*]) (-?\d+) = (-?\d+)\s*$")


def chain_is_valid(text: str) -> bool:
    """Whether a completion's "Step n: a op b = c" lines are all arithmetically right and chained
    (each step starts from the previous result). It does not check that the operands are the
    question's: a valid chain can still answer another question. A completion with no step line
    is not valid."""
    steps = [(int(a), o, int(b), int(c)) for a, o, b, c in _STEP_RE.findall(text)]
    if not steps:
        return False
    if any(apply_op(a, o, b) != c for a, o, b, c in steps):
        return False
    return all(nxt[0] == prev[3] for prev, nxt in zip(steps, steps[1:], strict=False))
