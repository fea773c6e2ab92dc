"""Tokenizer, arithmetic tasks and exact-answer rewards.

- Tokenizer: a real `tiktoken.Encoding` built in code (no download): one token per character of the
  task alphabet `0-9 + - * = ,` plus the special tokens <|bos|>, <|eos|>, <|pad|> (and, for the
  thinking task only, <think> and </think>). `get(name)` gives (its tokenizer, the task).
- Tasks with exact answers: n-digit addition (the default), subtraction, multiplication of small
  numbers, a multi-step sum that writes every intermediate result (`12+34+56=` ->
  `12+34=46,46+56=102`) so each step can be checked (process supervision, DeepSeekMath 4.1.3), and
  a sum that may be answered directly or after thinking (`<think>...</think>102`, DeepSeek-R1).
- Each task: a seeded sampler, a fixed held-out evaluation set that never overlaps the training
  stream (a problem is held out iff a hash of its canonical form falls in a fixed bucket: `a+b` and
  `b+a` are one problem, so a held-out problem's commuted twin is never trained on), a strict answer
  parser (a regex, never `eval`), an exact-answer reward (1.0 / 0.0) that is 1 exactly when the
  parsed answer is right (so pass@k and maj@k agree with the reward on what is an answer) and, for
  the multi-step task, a per-step correctness list.
"""
import math
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
THINK, END_THINK = "<think>", "</think>"  # tokens of the thinking task's tokenizer only
_MARKER = re.compile(f"({re.escape(THINK)}|{re.escape(END_THINK)})")


def build_tokenizer(think=False):
    """A tiktoken Encoding over ALPHABET: each character is one token (ranks 0..14), no merges;
    then the special tokens, and with think the two markers <think> and </think> (ids 18, 19), so
    that every other task's tokenizer, and its models, stay as they were."""
    mergeable_ranks = {ch.encode(): i for i, ch in enumerate(ALPHABET)}
    specials = SPECIALS + ((THINK, END_THINK) if think else ())
    special_tokens = {s: len(ALPHABET) + i for i, s in enumerate(specials)}
    return tiktoken.Encoding(name="arith_think" if think else "arith", pat_str=r".",
                             mergeable_ranks=mergeable_ranks, special_tokens=special_tokens)


class Tokenizer:
    """Thin wrapper over the tiktoken Encoding that validates input and exposes special ids.
    think: the thinking task's tokenizer, with <think> and </think> as one token each."""

    def __init__(self, think=False):
        self.think = think
        self.enc = build_tokenizer(think)
        self.vocab_size = self.enc.n_vocab
        self.bos_id, self.eos_id, self.pad_id = (self.enc.encode_single_token(s) for s in SPECIALS)
        self.markers = {m: self.enc.encode_single_token(m) for m in (THINK, END_THINK)} \
            if think else {}

    def encode(self, text):
        ids = []
        for part in _MARKER.split(text) if self.think else [text]:
            if part in self.markers:
                ids.append(self.markers[part])
                continue
            for ch in part:  # tiktoken would map an unknown character to bytes it has no rank for
                if ch not in ALPHABET:
                    raise ValueError(f"character {ch!r} is not in the task alphabet {ALPHABET!r}")
            ids += self.enc.encode_ordinary(part)
        return ids

    def decode(self, ids, strict=False):
        """Decode ids up to the first end token (a marker as its text). Begin/pad tokens are
        skipped, or, with strict (how completions are read for rewards), written as '?': a
        completion holding one is malformed."""
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
        specials = list(SPECIALS) + ([THINK, END_THINK] if self.think else [])
        return {"alphabet": ALPHABET, "specials": specials, "n_vocab": self.vocab_size}


# ----------------------------------------------------------------------------------------------
# Strict parsing

_INT = re.compile(r"0|-?[1-9][0-9]*")  # "-0" and "007" are malformed: one spelling per integer
MAX_DIGITS = 12  # longer numbers are malformed, never converted (no huge-int work on junk)
MAX_N_DIGITS = 6  # most digits per operand: the largest answer (6x6-digit product) fits MAX_DIGITS


def parse_int(text):
    """Parse a whole string as one integer (optional '-', no leading zeros, no '-0'); None when
    malformed."""
    if not isinstance(text, str) or len(text) > MAX_DIGITS + 1 or not _INT.fullmatch(text):
        return None
    return int(text)


# ----------------------------------------------------------------------------------------------
# Rule rewards (DeepSeek-R1 2.2.2), weighed by --reward

REWARDS = ("accuracy", "format")  # Task.rule_rewards: the exact answer; a well-formed completion


def parse_reward(spec):
    """--reward's weighted sum of rule rewards (REWARDS) and "model" (a reward model's score), e.g.
    "accuracy,format:0.1" -> {"accuracy": 1.0, "format": 0.1} (a weight defaults to 1);
    ValueError, one line, for anything else."""
    weights, names = {}, REWARDS + ("model",)
    for part in spec.split(","):
        name, colon, weight = part.strip().partition(":")
        if name not in names or name in weights:
            what = "twice" if name in weights else f"not one of {', '.join(names)}"
            raise ValueError(f"--reward {spec!r}: component {name!r} is {what}")
        try:
            weights[name] = float(weight) if colon else 1.0
        except ValueError:
            weights[name] = float("nan")
        if not math.isfinite(weights[name]):
            raise ValueError(f"--reward {spec!r}: the weight of {name} must be a finite number, "
                             f"not {weight!r}")
    return weights


# ----------------------------------------------------------------------------------------------
# Tasks

@dataclass
class Problem:
    prompt: str       # e.g. "123+456="
    completion: str   # the reference solution the model should write, e.g. "579"
    answer: int       # the exact final answer


class Task:
    """Base class: subclasses define `_make(rng) -> Problem` and `max_lengths()`. Rewards parse
    strictly and never raise."""
    name = "task"
    holdout_mod = 10  # one problem in holdout_mod is held out of the training stream

    def __init__(self, n_digits):
        if (isinstance(n_digits, bool) or not isinstance(n_digits, int)
                or not 1 <= n_digits <= MAX_N_DIGITS):
            raise ValueError(f"n_digits must be between 1 and {MAX_N_DIGITS} for task {self.name}, "
                             f"got {n_digits}")
        self.n_digits = n_digits

    def _make(self, rng):
        raise NotImplementedError

    def max_lengths(self):
        """(tokens of the longest prompt, tokens of the longest reference completion): one per
        character, but the thinking task's markers."""
        raise NotImplementedError

    def tokenizer(self):
        """The tokenizer of this task's models (the thinking task's adds its two markers)."""
        return Tokenizer()

    def max_new_tokens(self):
        """What sampling an answer needs: the longest reference completion, its end token, one more
        (a completion that runs past its end is seen as wrong, not cut to look right)."""
        return self.max_lengths()[1] + 2

    def canonical(self, prompt):
        """The form of a prompt that decides the held-out split. Prompts with one canonical form are
        one problem (`a+b=` and `b+a=`): they fall on the same side of the split."""
        return prompt

    def is_held_out(self, prompt):
        return zlib.crc32(self.canonical(prompt).encode()) % self.holdout_mod == 0

    def sample(self, rng):
        """One training problem from rng (a random.Random); never a held-out one."""
        for _ in range(10_000):
            p = self._make(rng)
            if not self.is_held_out(p.prompt):
                return p
        raise RuntimeError(f"task {self.name} with n_digits={self.n_digits} has no training "
                           "problem left")

    def eval_set(self, n=256, seed=1234):
        """A fixed list of up to n distinct held-out problems (deterministic for a given n and seed;
        fewer when the task has fewer, as 1-digit tasks do)."""
        rng, seen, out = random.Random(seed), set(), []
        for _ in range(200 * n):
            p = self._make(rng)
            key = self.canonical(p.prompt)
            if self.is_held_out(p.prompt) and key not in seen:
                seen.add(key)
                out.append(p)
                if len(out) == n:
                    break
        return out

    def parse_answer(self, completion):
        """The final answer written in a well-formed completion, or None if it is malformed."""
        return parse_int(completion)

    def reward(self, completion, problem):
        """Exact-answer reward: 1.0 iff the parsed answer equals the true one; malformed -> 0.0."""
        try:
            return 1.0 if self.parse_answer(completion) == problem.answer else 0.0
        except Exception:  # a reward must never crash a training run on junk text
            return 0.0

    def format_reward(self, completion):
        """R1's format reward: 1.0 iff the completion is well formed (for the thinking task: an
        opened <think> is closed and an answer follows, or a bare answer), whether or not it
        thinks and whether or not the answer is right."""
        return 0.0 if self.parse_answer(completion) is None else 1.0

    def rule_rewards(self, completion, problem):
        """Every rule reward of a completion, by name (REWARDS): --reward weighs them."""
        return {"accuracy": self.reward(completion, problem),
                "format": self.format_reward(completion)}

    def near_miss(self, problem, rng):
        """A wrong but well-formed completion close to the reference: the answer off by one, with
        one digit changed or (addition) with a carry dropped. The rejected side of synthetic
        preference pairs."""
        a = problem.answer
        digits = self.render(problem, abs(a)).rsplit("=", 1)[-1].lstrip("-")  # as written, padded
        i = rng.randrange(len(digits))
        changed = (digits[:i] + rng.choice([d for d in "0123456789" if d != digits[i]])
                   + digits[i + 1:])
        candidates = ({a - 1, a + 1, (-1 if a < 0 else 1) * int(changed)}
                      | self._carry_slips(problem))
        wrong = sorted(x for x in candidates
                       if x != a and self.parse_answer(self.render(problem, x)) == x)
        return self.render(problem, rng.choice(wrong))

    def render(self, problem, answer):
        """The reference completion of `problem` with its final answer replaced by `answer`."""
        return str(answer)

    def _carry_slips(self, problem):
        return set()


def sorted_operands(prompt, op):
    """`b+a=` -> `a+b`, operands in numeric order: the canonical form of a commutative problem."""
    return op.join(sorted(prompt.rstrip("=").split(op), key=int))


class Addition(Task):
    """a + b with a, b < 10^n_digits. fixed_width (the default) zero-pads the operands to n digits
    and the answer to n+1 (`042+917=0959`): every answer digit then sits at a fixed offset from
    the operand digits it depends on, which a small model learns far faster than the unpadded
    format (whose answer shifts by one position when there is a final carry)."""
    name = "add"

    def __init__(self, n_digits=3, fixed_width=True):
        super().__init__(n_digits)
        self.fixed_width = fixed_width
        self._answer = re.compile(f"[0-9]{{{n_digits + 1}}}")

    def max_lengths(self):
        return 2 * self.n_digits + 2, self.n_digits + 1

    def canonical(self, prompt):
        return sorted_operands(prompt, "+")

    def render(self, problem, answer):
        return (f"{answer:0{self.n_digits + 1}d}" if self.fixed_width and answer >= 0
                else str(answer))

    def _carry_slips(self, problem):
        """The sum written digit by digit with every carry dropped (a classic slip)."""
        a, b = (int(x) for x in problem.prompt[:-1].split("+"))
        return {int("".join(str((int(x) + int(y)) % 10) for x, y in zip(f"{a:020d}", f"{b:020d}")))}

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
        return (int(completion)
                if isinstance(completion, str) and self._answer.fullmatch(completion) else None)


class Subtraction(Task):
    """a - b with a, b < 10^n_digits; the answer may be negative. Not commutative: a-b and b-a are
    different problems (answers of opposite sign)."""
    name = "sub"

    def __init__(self, n_digits=3):
        super().__init__(n_digits)

    def max_lengths(self):
        return 2 * self.n_digits + 2, self.n_digits + 1  # "-999"

    def _make(self, rng):
        a, b = rng.randrange(10 ** self.n_digits), rng.randrange(10 ** self.n_digits)
        return Problem(f"{a}-{b}=", str(a - b), a - b)  # may be negative


class Multiplication(Task):
    """a * b with a, b < 10^n_digits."""
    name = "mul"

    def __init__(self, n_digits=2):
        super().__init__(n_digits)

    def _make(self, rng):
        a, b = rng.randrange(10 ** self.n_digits), rng.randrange(10 ** self.n_digits)
        return Problem(f"{a}*{b}=", str(a * b), a * b)

    def max_lengths(self):
        return 2 * self.n_digits + 2, 2 * self.n_digits

    def canonical(self, prompt):
        return sorted_operands(prompt, "*")


class MultiStep(Task):
    """Sum of n_terms numbers, solved left to right with every partial sum written out."""
    name = "multistep"

    def __init__(self, n_terms=3, n_digits=2):
        super().__init__(n_digits)
        if n_terms < 2:
            raise ValueError(f"a multi-step sum needs at least two terms, got {n_terms}")
        self.n_terms = n_terms

    def max_lengths(self):
        top = [10 ** self.n_digits - 1] * self.n_terms  # largest terms write the longest numbers
        return len("+".join(map(str, top))) + 1, len(",".join(self.reference_steps(top)))

    def canonical(self, prompt):
        return sorted_operands(prompt, "+")  # the multiset of terms: the same sum in another order

    def render(self, problem, answer):
        """The reference steps, the last step's result replaced (every step stays well formed)."""
        head, _ = problem.completion.rsplit("=", 1)
        return f"{head}={answer}"

    def _make(self, rng):
        terms = [rng.randrange(10 ** self.n_digits) for _ in range(self.n_terms)]
        return Problem("+".join(map(str, terms)) + "=", ",".join(self.reference_steps(terms)),
                       sum(terms))

    @staticmethod
    def reference_steps(terms):
        steps, acc = [], terms[0]
        for t in terms[1:]:
            steps.append(f"{acc}+{t}={acc + t}")
            acc += t
        return steps

    def parse_answer(self, completion):
        """The last step's result, if every step is well formed (`a+b=c`, comma-separated);
        else None. The outcome reward is 1 iff this is the sum."""
        if not isinstance(completion, str) or not completion:
            return None
        steps = completion.split(",")
        if any(_STEP.fullmatch(s) is None for s in steps):
            return None
        return parse_int(steps[-1].rsplit("=", 1)[1])

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

    def step_rewards(self, completion, problem, last):
        """Process supervision's rewards (DeepSeekMath 4.1.3): one per step (1 right, 0 wrong) and
        the token index where each ends. last: the index of the completion's end token (or of its
        last token, if cut). A step never written is wrong and ends there: stopping early dodges
        no negative reward."""
        ok = [float(x) for x in self.step_correctness(completion, problem)]
        missing = max(0, problem.prompt.count("+") - len(ok))
        return ok + [0.0] * missing, self.step_ends(completion)[:len(ok)] + [last] * missing


_STEP = re.compile(r"-?[0-9]+\+-?[0-9]+=-?[0-9]+")


class ThinkSum(Task):
    """A sum of min_terms..max_terms numbers that a model may answer directly (`180`) or after
    thinking (`<think>12+34=46,46+56=102,102+78=180</think>180`): DeepSeek-R1's format. The
    reference completion thinks; `direct` is the bare answer. The answer is read strictly from
    what follows </think> (the whole completion when it does not think); the steps inside can be
    checked one by one. Its tokenizer has <think> and </think> as one token each."""
    name = "think"

    def __init__(self, n_digits=2, min_terms=2, max_terms=4):
        super().__init__(n_digits)
        if not 2 <= min_terms <= max_terms:
            raise ValueError(f"a sum needs 2 <= min_terms <= max_terms, got {min_terms}, "
                             f"{max_terms}")
        self.min_terms, self.max_terms = min_terms, max_terms

    def tokenizer(self):
        return Tokenizer(think=True)

    def _make(self, rng):
        terms = [rng.randrange(10 ** self.n_digits)
                 for _ in range(rng.randint(self.min_terms, self.max_terms))]
        steps = ",".join(MultiStep.reference_steps(terms))
        return Problem("+".join(map(str, terms)) + "=", f"{THINK}{steps}{END_THINK}{sum(terms)}",
                       sum(terms))

    def direct(self, problem):
        """The completion that answers without thinking."""
        return str(problem.answer)

    def render(self, problem, answer):
        """The reference thinking, its last partial sum and the answer replaced by `answer`."""
        head = problem.completion[len(THINK):].partition(END_THINK)[0].rsplit("=", 1)[0]
        return f"{THINK}{head}={answer}{END_THINK}{answer}"

    def near_miss(self, problem, rng):
        """A well-formed wrong worked solution: the sum off by one, or by ten (a slipped carry)."""
        a = problem.answer
        return self.render(problem, rng.choice([x for x in (a - 10, a - 1, a + 1, a + 10)
                                                if x >= 0]))

    def max_lengths(self):  # in tokens: each marker is one
        top = [10 ** self.n_digits - 1] * self.max_terms
        steps = ",".join(MultiStep.reference_steps(top))
        return self.max_terms * (self.n_digits + 1), 1 + len(steps) + 1 + len(str(sum(top)))

    def canonical(self, prompt):
        return sorted_operands(prompt, "+")  # the multiset of terms

    @staticmethod
    def thinks(completion):
        return completion.startswith(THINK)

    def parse_answer(self, completion):
        """The integer after </think> of a completion that opens <think> first and closes it once,
        or the whole completion as an integer when it does not think; None otherwise (an unclosed
        <think>, a marker elsewhere, two answers, junk after the answer)."""
        if not isinstance(completion, str):
            return None
        if self.thinks(completion):
            body, closed, answer = completion[len(THINK):].partition(END_THINK)
            return parse_int(answer) if closed and not _MARKER.search(body + answer) else None
        return None if _MARKER.search(completion) else parse_int(completion)

    def step_correctness(self, completion, problem):
        """One bool per step written inside <think>: step j is right iff it is the j-th reference
        step (right operands, right partial sum). No steps when it does not think."""
        if not self.thinks(completion):
            return []
        body = completion[len(THINK):].partition(END_THINK)[0]
        ref = MultiStep.reference_steps([int(t) for t in problem.prompt[:-1].split("+")])
        return [j < len(ref) and s == ref[j] for j, s in enumerate(body.split(",") if body else [])]

    def step_ends(self, completion):
        """Token index of the last character of each step inside <think> (<think> is one token)."""
        body = completion[len(THINK):].partition(END_THINK)[0] if self.thinks(completion) else ""
        return [1 + e for e in MultiStep.step_ends(body)]

    def step_rewards(self, completion, problem, last):
        """Process supervision: the steps inside <think> as MultiStep's (none written: all wrong),
        then the answer, a last step that ends at `last`."""
        steps, ends = MultiStep.step_rewards(self, completion, problem, last)
        return steps + [self.reward(completion, problem)], ends + [last]


TASKS = {"add": Addition, "sub": Subtraction, "mul": Multiplication, "multistep": MultiStep,
         "think": ThinkSum}
DEFAULT_DIGITS = {"add": 3, "sub": 3, "mul": 2, "multistep": 2, "think": 2}  # --n_digits 0


def get(name, n_digits=0):
    """(the task's tokenizer, the task): what a train script starts from."""
    task = get_task(name, n_digits)
    return task.tokenizer(), task


def get_task(name, n_digits=0, **kwargs):
    """A task by name with n_digits digits per operand (0 or None: the task's default)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](n_digits=n_digits or DEFAULT_DIGITS[name], **kwargs)


def encode_problem(tok, problem, with_completion=True):
    """Token ids of `<bos> prompt [completion <eos>]` and the index where the completion starts."""
    ids = [tok.bos_id] + tok.encode(problem.prompt)
    start = len(ids)
    if with_completion:
        ids += tok.encode(problem.completion) + [tok.eos_id]
    return ids, start
