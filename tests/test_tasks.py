import random

import pytest

import tasks


@pytest.fixture(scope="module")
def tok():
    return tasks.Tokenizer()


ALL_TASKS = [tasks.Addition(3), tasks.Subtraction(3), tasks.Multiplication(2, 2), tasks.MultiStep(3, 2)]


def test_tokenizer_is_tiktoken_and_offline(tok):
    import tiktoken
    assert isinstance(tok.enc, tiktoken.Encoding)
    assert tok.vocab_size == len(tasks.ALPHABET) + 3
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    assert tok.enc.decode_single_token_bytes(tok.eos_id) == b"<|eos|>"


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.name)
def test_round_trip_every_task_string(tok, task):
    rng = random.Random(0)
    for _ in range(200):
        p = task.sample(rng)
        for s in (p.prompt, p.completion, p.prompt + p.completion):
            ids = tok.encode(s)
            assert len(ids) == len(s)  # one token per character
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


@pytest.mark.parametrize("junk", ["1+1", "__import__('os')", "", "9" * 100, "0x10", "1e3", " 5", "5 ",
                                  "--5", "05", "+5", "5\n", None, "١٢"])
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
    ids = tok.encode("09") + [tok.pad_id, tok.bos_id] + tok.encode("59") + [tok.eos_id] + tok.encode("1")
    assert tok.decode(ids) == "0959"
    strict = tok.decode(ids, strict=True)
    assert strict == "09??59" and len(strict) == 6  # one character per token, so step indices hold
    assert tasks.Addition(3).reward(strict, tasks.Problem("500+459=", "0959", 959)) == 0.0
