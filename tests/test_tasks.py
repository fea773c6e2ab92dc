import itertools
import random

import pytest

import tasks


@pytest.fixture(scope="module")
def tok():
    return tasks.Tokenizer()


ALL_TASKS = [tasks.Addition(3), tasks.Subtraction(3), tasks.Multiplication(2),
             tasks.MultiStep(3, 2), tasks.ThinkSum(2)]


def test_tokenizer_is_tiktoken_and_offline(tok):
    import tiktoken
    assert isinstance(tok.enc, tiktoken.Encoding)
    assert tok.vocab_size == len(tasks.ALPHABET) + 3
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    assert tok.enc.decode_single_token_bytes(tok.eos_id) == b"<|eos|>"


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.name)
def test_round_trip_every_task_string(task):
    rng, tok = random.Random(0), task.tokenizer()
    for _ in range(200):
        p = task.sample(rng)
        forms = [p.prompt, p.completion, p.prompt + p.completion]
        forms += [task.direct(p), p.prompt + task.direct(p)] if task.name == "think" else []
        for s in forms:
            ids = tok.encode(s)  # one token per character, one per marker
            assert len(ids) == len(s) - 6 * s.count(tasks.THINK) - 7 * s.count(tasks.END_THINK)
            assert tok.decode(ids) == s
        ids, start = tasks.encode_problem(tok, p)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids[start:]) == p.completion


@pytest.mark.parametrize("bad", ["1 2", "a", "1/2", "é"])
def test_unknown_character_names_it(tok, bad):
    odd = next(ch for ch in bad if ch not in tasks.ALPHABET)
    with pytest.raises(ValueError, match=repr(odd)):
        tok.encode(bad)


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.name)
def test_held_out_set_disjoint_from_training_stream(task):
    held = {p.prompt for p in task.eval_set(100)}
    assert len(held) == 100  # deduplicated and full
    assert task.eval_set(100)[0] == task.eval_set(100)[0]  # fixed
    rng = random.Random(1)
    train = {task.sample(rng).prompt for _ in range(5000)}
    assert not held & train


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.name)
def test_reference_solutions_get_reward_one(task):
    rng = random.Random(2)
    for _ in range(100):
        p = task.sample(rng)
        assert task.reward(p.completion, p) == 1.0
        assert task.parse_answer(p.completion) == p.answer == eval_free_answer(p.prompt)


def eval_free_answer(prompt):
    """An independent computation of the true answer (by splitting, not the task's own code)."""
    expr = prompt[:-1]
    for op, f in (("*", lambda a, b: a * b), ("-", lambda a, b: a - b)):
        if op in expr:
            a, b = expr.split(op)
            return f(int(a), int(b))
    return sum(int(t) for t in expr.split("+"))


def test_sampler_is_seeded():
    t = tasks.Addition(3)
    a = [t.sample(random.Random(7)).prompt for _ in range(3)]
    r1, r2 = random.Random(7), random.Random(7)
    assert [t.sample(r1) for _ in range(50)] == [t.sample(r2) for _ in range(50)]
    assert len(set(a)) == 1


@pytest.mark.parametrize("junk", ["1+1", "__import__('os')", "", "9" * 100, "0x10", "1e3", " 5",
                                  "5 ", "--5", "05", "+5", "5\n", None, "١٢"])
def test_parser_rejects_junk_without_raising(junk):
    assert tasks.parse_int(junk) is None
    p = tasks.Problem("1+1=", "2", 2)
    for task in ALL_TASKS:
        assert task.reward(junk, p) == 0.0


def test_parser_accepts_plain_integers():
    assert tasks.parse_int("0") == 0
    assert tasks.parse_int("-42") == -42
    assert tasks.parse_int("1000") == 1000


def test_wrong_answer_gets_zero():
    t = tasks.Addition(3, fixed_width=False)
    p = tasks.Problem("12+30=", "42", 42)
    assert t.reward("42", p) == 1.0
    assert t.reward("43", p) == 0.0
    assert t.reward("42,", p) == 0.0
    assert t.reward("042", p) == 0.0  # leading zeros are malformed in the plain format


def test_fixed_width_addition_format():
    t = tasks.Addition(3)
    p = t.sample(random.Random(5))
    assert len(p.prompt) == 8 and len(p.completion) == 4
    q = tasks.Problem("012+030=", "0042", 42)
    assert t.reward("0042", q) == 1.0
    for bad in ("42", "042", "00042", "-042", "0043"):
        assert t.reward(bad, q) == 0.0


def test_multistep_step_correctness():
    t = tasks.MultiStep(3, 2)
    p = tasks.Problem("12+34+56=", "12+34=46,46+56=102", 102)
    assert t.step_correctness("12+34=46,46+56=102", p) == [True, True]
    assert t.step_correctness("12+34=47,47+56=103", p) == [False, False]
    assert t.step_correctness("12+34=46,46+56=101", p) == [True, False]
    assert t.step_correctness("12+34=46,46+56=102,1+1=2", p) == [True, True, False]
    assert t.step_correctness("", p) == []
    assert t.step_ends("12+34=46,46+56=102") == [7, 17]
    assert "12+34=46,46+56=102"[7] == "6" and "12+34=46,46+56=102"[17] == "2"
    # outcome reward needs well-formed steps and the right final sum
    assert t.reward("12+34=46,46+56=102", p) == 1.0
    assert t.reward("102", p) == 0.0
    assert t.reward("12+34=46,,46+56=102", p) == 0.0


def test_unknown_task_is_clear():
    with pytest.raises(ValueError, match="unknown task 'div'"):
        tasks.get_task("div")


def test_strict_decode_keeps_specials_visible(tok):
    ids = tok.encode("09") + [tok.pad_id, tok.bos_id] + tok.encode("59") + [tok.eos_id]
    ids += tok.encode("1")
    assert tok.decode(ids) == "0959"
    strict = tok.decode(ids, strict=True)
    assert strict == "09??59" and len(strict) == 6  # one character per token, so step indices hold
    assert tasks.Addition(3).reward(strict, tasks.Problem("500+459=", "0959", 959)) == 0.0


@pytest.mark.parametrize("task", [tasks.Addition(3), tasks.Addition(2, fixed_width=False),
                                  tasks.Multiplication(2), tasks.MultiStep(3, 2), tasks.ThinkSum()],
                         ids=lambda t: t.name)
def test_commuted_twins_fall_on_the_same_side_of_the_split(task):
    """Held out means unseen: a + b is held out iff b + a is (for multistep, any order of the
    terms), and no training problem is a reordering of a held-out one."""
    op = "*" if task.name == "mul" else "+"
    held = task.eval_set(200)
    for p in held:
        terms = p.prompt[:-1].split(op)
        for perm in itertools.permutations(terms):
            assert task.is_held_out(op.join(perm) + "="), (p.prompt, perm)
    keys = {task.canonical(p.prompt) for p in held}
    rng = random.Random(3)
    assert not keys & {task.canonical(task.sample(rng).prompt) for _ in range(5000)}


def test_subtraction_is_not_commutative():
    t = tasks.Subtraction(3)
    assert t.canonical("12-34=") != t.canonical("34-12=")


def test_parse_int_rejects_minus_zero():
    assert tasks.parse_int("-0") is None and tasks.parse_int("0") == 0
    p = tasks.Problem("5-5=", "0", 0)
    sub = tasks.Subtraction(1)
    assert sub.reward("0", p) == 1.0 and sub.reward("-0", p) == 0.0


def completions_to_try(task, p, rng):
    """The reference, near misses, and junk containing answers (digits after '=', stray marks)."""
    out = [p.completion, p.completion + ",", "??=" + str(p.answer), "=" + str(p.answer),
           str(p.answer), f"{p.answer}={p.answer}", "-" + p.completion, p.completion[:-1], "",
           "?" + p.completion]
    chars = tasks.ALPHABET + "?"
    out += ["".join(rng.choice(chars) for _ in range(rng.randrange(1, 12))) for _ in range(50)]
    return out


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.name)
def test_reward_is_one_exactly_when_the_parsed_answer_is_right(task):
    """pass@k (from rewards) and maj@k (from parsed answers) must agree on what is an answer: the
    parser gives an answer only for a well-formed completion, and the reward is 1 iff it is
    right."""
    rng = random.Random(4)
    for _ in range(50):
        p = task.sample(rng)
        for c in completions_to_try(task, p, rng):
            assert task.reward(c, p) == float(task.parse_answer(c) == p.answer), (p, c)
    p = tasks.Problem("12+34+56=", "12+34=46,46+56=102", 102)
    assert tasks.MultiStep(3, 2).parse_answer("??=102") is None  # '??=102' votes for nothing


def test_n_digits_is_checked_and_honoured():
    assert tasks.get_task("add", 0).n_digits == 3 and tasks.get_task("mul").n_digits == 2
    for bad in (-3, 30, tasks.MAX_N_DIGITS + 1):
        with pytest.raises(ValueError, match="n_digits must be between 1 and"):
            tasks.get_task("add", bad)
    t = tasks.get_task("mul", 3)  # multiplication takes n_digits like every task
    assert max(len(x) for x in t.sample(random.Random(0)).prompt[:-1].split("*")) <= 3
    assert any(len(t.sample(random.Random(s)).prompt) > 6 for s in range(20))


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
@pytest.mark.parametrize("n", [1, 2, 3])
def test_max_lengths_bound_every_problem(name, n):
    tok, task = tasks.get(name, n)
    prompt, completion = task.max_lengths()  # in tokens
    rng = random.Random(n)
    problems = [task.sample(rng) for _ in range(3000)] + task.eval_set(50)
    assert max(len(tok.encode(p.prompt)) for p in problems) <= prompt
    longest = max(len(tok.encode(p.completion)) for p in problems)
    assert completion - 1 <= longest <= completion  # and the bound is tight


def test_one_digit_tasks_do_not_hang():
    for name in tasks.TASKS:
        t = tasks.get_task(name, 1)
        held = t.eval_set(256)
        # fewer distinct held-out problems than asked: returned, not looped on
        assert 0 < len(held) < 256
        t.sample(random.Random(0))


# ----------------------------------------------------------------------------------------------
# The thinking task


def test_the_markers_are_tokens_of_the_thinking_tokenizer_only(tok):
    think = tasks.ThinkSum().tokenizer()
    assert think.vocab_size == tok.vocab_size + 2 == 20
    assert [think.decode([i]) for i in think.encode("<think></think>")] == ["<think>", "</think>"]
    assert think.encode("12") == tok.encode("12") and think.eos_id == tok.eos_id
    assert tok.definition()["specials"] == ["<|bos|>", "<|eos|>", "<|pad|>"]  # as checkpoints hold
    with pytest.raises(ValueError, match="'<'"):
        tok.encode("<think>1</think>1")


THINK_ANSWERS = [  # completion of 12+34+56=, its parsed answer (None: malformed)
    ("<think>12+34=46,46+56=102</think>102", 102), ("102", 102), ("<think></think>102", 102),
    ("<think>12+34=46,46+56=101</think>101", 101), ("<think>nonsense+=</think>7", 7),
    ("<think>12+34=46,46+56=102", None), ("<think>12+34=46</think>", None),
    ("<think>1</think>102,102", None), ("<think>1</think>102+0", None), ("102<think>", None),
    ("</think>102", None), ("<think><think>1</think>102", None),
    ("<think>1</think></think>102", None), ("<think>1</think>102<think>", None), (" 102", None),
    ("", None), ("0102", None)]


@pytest.mark.parametrize("completion,answer", THINK_ANSWERS)
def test_the_answer_is_read_only_after_the_thinking(completion, answer):
    task, p = tasks.ThinkSum(), tasks.Problem("12+34+56=", "", 102)
    assert task.parse_answer(completion) == answer
    assert task.reward(completion, p) == (1.0 if answer == 102 else 0.0)
    assert task.format_reward(completion) == (0.0 if answer is None else 1.0)  # form, not thought


def test_thinking_steps_are_checked_one_by_one():
    task, p = tasks.ThinkSum(), tasks.Problem("12+34+56=", "", 102)
    assert task.step_correctness("<think>12+34=46,46+56=101</think>101", p) == [True, False]
    assert task.step_correctness("<think>12+34=46,46+56=102,1+1=2</think>102", p) == [
        True, True, False]
    assert task.step_correctness("102", p) == [] and task.thinks("<think>1</think>1")


REWARD_TABLE = [  # completion of 12+34+56=: (accuracy, format), built by hand
    ("<think>12+34=46,46+56=102</think>102", 1.0, 1.0), ("102", 1.0, 1.0),
    ("<think>12+34=46,46+56=101</think>101", 0.0, 1.0), ("101", 0.0, 1.0),
    ("<think>12+34=46,46+56=102", 0.0, 0.0), ("<think>1</think>102,102", 0.0, 0.0),
    ("102 ", 0.0, 0.0), ("", 0.0, 0.0), ("<think></think>7", 0.0, 1.0)]


@pytest.mark.parametrize("completion,accuracy,form", REWARD_TABLE)
def test_rule_rewards_against_a_table_built_by_hand(completion, accuracy, form):
    task, p = tasks.ThinkSum(), tasks.Problem("12+34+56=", "", 102)
    assert task.rule_rewards(completion, p) == {"accuracy": accuracy, "format": form}


def test_the_format_reward_checks_form_not_thinking():
    """A well-formed direct answer and a well-formed worked one get the same format reward: a
    longer completion must earn its reward through accuracy."""
    task = tasks.ThinkSum()
    p = task.sample(random.Random(0))
    assert task.format_reward(task.direct(p)) == task.format_reward(p.completion) == 1.0
    assert tasks.Addition(2).rule_rewards("057", tasks.Problem("12+45=", "057", 57)) == {
        "accuracy": 1.0, "format": 1.0}  # every task has both


@pytest.mark.parametrize("spec,weights", [
    ("accuracy", {"accuracy": 1.0}), ("accuracy,format:0.1", {"accuracy": 1.0, "format": 0.1}),
    ("format:0.5, accuracy:2", {"format": 0.5, "accuracy": 2.0}), ("format:-1", {"format": -1.0})])
def test_reward_specs_parse_into_weights(spec, weights):
    assert tasks.parse_reward(spec) == weights


@pytest.mark.parametrize("spec,msg", [
    ("length", "not one of accuracy, format"), ("accuracy,accuracy:2", "is twice"),
    ("accuracy:x", "must be a finite number"), ("accuracy:nan", "must be a finite number"),
    ("", "not one of"), ("accuracy,", "not one of")])
def test_bad_reward_specs_are_refused(spec, msg):
    with pytest.raises(ValueError, match=msg):
        tasks.parse_reward(spec)
