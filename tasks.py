"""Tokenizer, arithmetic tasks and exact-answer rewards.

- Tokenizer: a real `tiktoken.Encoding` built in code (no download): one token per character of the
  task alphabet `0-9 + - * = ,` plus the special tokens <|bos|>, <|eos|>, <|pad|>.
- Tasks with exact answers: n-digit addition (the default), subtraction, multiplication of small
  numbers, and a multi-step sum that writes every intermediate result (`12+34+56=` ->
  `12+34=46,46+56=102`) so each step can be checked (process supervision, DeepSeekMath 4.1.3).
- Each task: a seeded sampler, a fixed held-out evaluation set that never overlaps the training
  stream (a problem is held out iff a hash of its prompt falls in a fixed bucket), a strict answer
  parser (a regex, never `eval`), an exact-answer reward (1.0 / 0.0) and, for the multi-step task,
  a per-step correctness list.
"""
import random
import re
import zlib
from dataclasses import dataclass

import tiktoken

# ----------------------------------------------------------------------------------------------
# Tokenizer

ALPHABET = "0123456789+-*=,"
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIALS = (BOS, EOS, PAD)


def build_tokenizer():
    """A tiktoken Encoding over ALPHABET: each character is one token (ranks 0..14), no merges."""
    mergeable_ranks = {ch.encode(): i for i, ch in enumerate(ALPHABET)}
    special_tokens = {s: len(ALPHABET) + i for i, s in enumerate(SPECIALS)}
    return tiktoken.Encoding(name="arith", pat_str=r".", mergeable_ranks=mergeable_ranks,
                             special_tokens=special_tokens)


class Tokenizer:
    """Thin wrapper over the tiktoken Encoding that validates input and exposes special ids."""

    def __init__(self):
        self.enc = build_tokenizer()
        self.vocab_size = self.enc.n_vocab
        self.bos_id, self.eos_id, self.pad_id = (self.enc.encode_single_token(s) for s in SPECIALS)

    def encode(self, text):
        for ch in text:  # tiktoken would map an unknown character to bytes it has no rank for
            if ch not in ALPHABET:
                raise ValueError(f"character {ch!r} is not in the task alphabet {ALPHABET!r}")
        return self.enc.encode_ordinary(text)

    def decode(self, ids, strict=False):
        """Decode ids up to the first end token. Begin/pad tokens are skipped, or, with strict (how
        completions are read for rewards), written as '?': a completion holding one is malformed,
        and each character still sits at its token's index."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.bos_id, self.pad_id):
                if strict:
                    out.append("?")
                continue
            out.append(self.enc.decode([i]))
        return "".join(out)

    def definition(self):
        """What a checkpoint stores so that a loader can check it has the same tokenizer."""
        return {"alphabet": ALPHABET, "specials": list(SPECIALS), "n_vocab": self.vocab_size}


# ----------------------------------------------------------------------------------------------
# Strict parsing

_INT = re.compile(r"-?(0|[1-9][0-9]*)")
MAX_DIGITS = 12  # longer numbers are malformed, never converted (no huge-int work on junk)


def parse_int(text):
    """Parse a whole string as one integer (optional '-', no leading zeros); None when malformed."""
    if not isinstance(text, str) or len(text) > MAX_DIGITS + 1 or not _INT.fullmatch(text):
        return None
    return int(text)


# ----------------------------------------------------------------------------------------------
# Tasks

@dataclass
class Problem:
    prompt: str       # e.g. "123+456="
    completion: str   # the reference solution the model should write, e.g. "579"
    answer: int       # the exact final answer


class Task:
    """Base class: subclasses define `_make(rng) -> Problem`. Rewards parse strictly and never raise."""
    name = "task"
    holdout_mod = 10  # one prompt in holdout_mod is held out of the training stream

    def _make(self, rng):
        raise NotImplementedError

    def is_held_out(self, prompt):
        return zlib.crc32(prompt.encode()) % self.holdout_mod == 0

    def sample(self, rng):
        """One training problem from rng (a random.Random); never a held-out one."""
        while True:
            p = self._make(rng)
            if not self.is_held_out(p.prompt):
                return p

    def eval_set(self, n=256, seed=1234):
        """A fixed, deduplicated list of held-out problems (deterministic for a given n and seed)."""
        rng, seen, out = random.Random(seed), set(), []
        for _ in range(200 * n):
            p = self._make(rng)
            if self.is_held_out(p.prompt) and p.prompt not in seen:
                seen.add(p.prompt)
                out.append(p)
                if len(out) == n:
                    break
        return out

    def parse_answer(self, completion):
        """The final answer written in a completion, or None if the completion is malformed."""
        return parse_int(completion)

    def reward(self, completion, problem):
        """Exact-answer reward: 1.0 iff the parsed answer equals the true one; malformed -> 0.0."""
        try:
            return 1.0 if self.parse_answer(completion) == problem.answer else 0.0
        except Exception:  # a reward must never crash a training run on junk text
            return 0.0


class Addition(Task):
    """a + b with a, b < 10^n_digits. fixed_width (the default) zero-pads the operands to n digits and
    the answer to n+1 (`042+917=0959`): every answer digit then sits at a fixed offset from the
    operand digits it depends on, which a small model learns far faster than the unpadded format
    (whose answer shifts by one position when there is a final carry)."""
    name = "add"

    def __init__(self, n_digits=3, fixed_width=True):
        self.n_digits, self.fixed_width = n_digits, fixed_width
        self._answer = re.compile(f"[0-9]{{{n_digits + 1}}}")

    def _make(self, rng):
        a, b = rng.randrange(10 ** self.n_digits), rng.randrange(10 ** self.n_digits)
        if not self.fixed_width:
            return Problem(f"{a}+{b}=", str(a + b), a + b)
        n = self.n_digits
        return Problem(f"{a:0{n}d}+{b:0{n}d}=", f"{a + b:0{n + 1}d}", a + b)

    def parse_answer(self, completion):
        if not self.fixed_width:
            return parse_int(completion)
        # exactly n+1 digits, leading zeros included
        return int(completion) if isinstance(completion, str) and self._answer.fullmatch(completion) else None


class Subtraction(Task):
    name = "sub"

    def __init__(self, n_digits=3):
        self.n_digits = n_digits

    def _make(self, rng):
        a, b = rng.randrange(10 ** self.n_digits), rng.randrange(10 ** self.n_digits)
        return Problem(f"{a}-{b}=", str(a - b), a - b)  # may be negative


class Multiplication(Task):
    name = "mul"

    def __init__(self, n_digits=2, m_digits=2):
        self.n_digits, self.m_digits = n_digits, m_digits

    def _make(self, rng):
        a, b = rng.randrange(10 ** self.n_digits), rng.randrange(10 ** self.m_digits)
        return Problem(f"{a}*{b}=", str(a * b), a * b)


class MultiStep(Task):
    """Sum of n_terms numbers, solved left to right with every partial sum written out."""
    name = "multistep"

    def __init__(self, n_terms=3, n_digits=2):
        assert n_terms >= 2, "a multi-step sum needs at least two terms"
        self.n_terms, self.n_digits = n_terms, n_digits

    def _make(self, rng):
        terms = [rng.randrange(10 ** self.n_digits) for _ in range(self.n_terms)]
        return Problem("+".join(map(str, terms)) + "=", ",".join(self.reference_steps(terms)), sum(terms))

    @staticmethod
    def reference_steps(terms):
        steps, acc = [], terms[0]
        for t in terms[1:]:
            steps.append(f"{acc}+{t}={acc + t}")
            acc += t
        return steps

    def parse_answer(self, completion):
        if not isinstance(completion, str) or "=" not in completion:
            return None
        return parse_int(completion.rsplit("=", 1)[1])

    def reward(self, completion, problem):
        """Outcome reward: the last step's result must be the sum and every step well formed."""
        if not isinstance(completion, str) or not completion:
            return 0.0
        steps = completion.split(",")
        if any(_STEP.fullmatch(s) is None for s in steps):
            return 0.0
        return super().reward(completion, problem)

    def step_correctness(self, completion, problem):
        """One bool per step the completion writes: step j is correct iff it equals the j-th
        reference step exactly (right operands, right partial sum). Extra steps are wrong."""
        terms = [int(t) for t in problem.prompt[:-1].split("+")]
        ref = self.reference_steps(terms)
        steps = completion.split(",") if completion else []
        return [j < len(ref) and s == ref[j] for j, s in enumerate(steps)]

    @staticmethod
    def step_ends(completion):
        """Index (in characters = tokens) of the last character of each step of the completion."""
        ends, pos = [], 0
        for s in completion.split(",") if completion else []:
            pos += len(s)
            ends.append(pos - 1)
            pos += 1  # the ',' separator belongs to the next step
        return ends


_STEP = re.compile(r"-?[0-9]+\+-?[0-9]+=-?[0-9]+")

TASKS = {"add": Addition, "sub": Subtraction, "mul": Multiplication, "multistep": MultiStep}


def takes_n_digits(name):
    """Whether a task's size is its n_digits (multiplication keeps its own 2-by-2 digits)."""
    return name != "mul"


def get_task(name, n_digits=None, **kwargs):
    """A task by name; n_digits goes to the tasks that take it (see takes_n_digits)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    if n_digits is not None and takes_n_digits(name):
        kwargs["n_digits"] = n_digits
    return TASKS[name](**kwargs)


def encode_problem(tok, problem, with_completion=True):
    """Token ids of `<bos> prompt [completion <eos>]` and the index where the completion starts."""
    ids = [tok.bos_id] + tok.encode(problem.prompt)
    start = len(ids)
    if with_completion:
        ids += tok.encode(problem.completion) + [tok.eos_id]
    return ids, start
