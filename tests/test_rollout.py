import itertools
import math
import random
import zlib

import pytest
import torch

import model
import rollout
import tasks
from conftest import tiny_config

EOS, PAD = 16, 17


def build(seed=0, **kw):
    torch.manual_seed(seed)
    m = model.Transformer(tiny_config(**kw)).eval()
    return m


def random_prompts(seed, lengths):
    g = random.Random(seed)
    return [[15] + [g.randrange(15) for _ in range(n - 1)] for n in lengths]


def gen(seed):
    return torch.Generator().manual_seed(seed)


CASES = [("mla", "naive"), ("mla", "absorbed"), ("mha", "naive")]


@pytest.mark.parametrize("attention,impl", CASES)
def test_incremental_decoding_matches_full_forward(attention, impl):
    """Prefill a mixed-length, left-padded batch, then feed one token at a time: at every position
    the cached logits equal a full forward over the whole sequence (float32, atol 1e-5)."""
    m = build(attention=attention, q_lora_rank=12)
    prompts = random_prompts(0, [5, 2, 7])
    ids, mask = rollout.left_pad(prompts, PAD, "cpu")
    N, P = ids.shape
    new = torch.randint(0, 15, (N, 6))
    full_ids = torch.cat([ids, new], 1)
    full_mask = torch.cat([mask, torch.ones_like(new, dtype=torch.bool)], 1)
    positions = (full_mask.long().cumsum(1) - 1).clamp_min(0)
    ref, _ = m(full_ids, positions=positions, pad_mask=full_mask)
    cache = m.new_cache(N, full_ids.size(1), impl=impl)
    got = [m(ids, positions=positions[:, :P], pad_mask=full_mask[:, :P], cache=cache,
             start_pos=0)[0]]
    for t in range(new.size(1)):
        s = P + t
        got.append(m(full_ids[:, s:s + 1], positions=positions[:, s:s + 1],
                     pad_mask=full_mask[:, :s + 1], cache=cache, start_pos=s)[0])
    got = torch.cat(got, 1)
    torch.testing.assert_close(got[full_mask], ref[full_mask], atol=1e-5, rtol=1e-5)
    # the real positions also equal each row decoded alone, without padding
    for i, p in enumerate(prompts):
        alone, _ = m(torch.cat([torch.tensor([p]), new[i:i + 1]], 1))
        torch.testing.assert_close(got[i, P - len(p):], alone[0], atol=1e-5, rtol=1e-5)


def test_mla_cache_stores_only_latent_and_rope_key():
    m = build()
    cache = m.new_cache(3, 10)
    c = m.cfg
    assert (cache[0].c_kv.shape == (3, 10, c.kv_lora_rank)
            and cache[0].k_pe.shape == (3, 10, c.qk_rope_head_dim))
    assert cache[0].k is None and cache[0].v is None
    mha = build(attention="mha").new_cache(3, 10)
    assert mha[0].k.shape == (3, 10, c.n_heads, c.qk_nope_head_dim + c.qk_rope_head_dim)


def test_absorbed_equals_naive_generation():
    m = build()
    prompts = random_prompts(1, [4, 6, 3])
    kw = dict(eos_id=EOS, pad_id=PAD, max_new_tokens=8, num_generations=2)
    a = rollout.generate(m, prompts, mla_impl="naive", generator=gen(0), **kw)
    b = rollout.generate(m, prompts, mla_impl="absorbed", generator=gen(0), **kw)
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_greedy_padded_batch_equals_each_prompt_alone(attention):
    m = build(seed=1, attention=attention)
    prompts = random_prompts(2, [3, 8, 5, 1])
    kw = dict(eos_id=EOS, pad_id=PAD, max_new_tokens=10, temperature=0.0)
    batch = rollout.generate(m, prompts, **kw)
    for i, p in enumerate(prompts):
        alone = rollout.generate(m, [p], **kw)
        L = alone.completion_ids.size(1)
        assert torch.equal(batch.completion_ids[i, :L], alone.completion_ids[0])
        assert (batch.completion_ids[i, L:] == PAD).all()


def test_logprobs_equal_full_forward():
    """Sampled tokens' log-probs from generate == those of one full forward of prompt+completion."""
    m = build(seed=2)
    prompts = random_prompts(3, [4, 7, 2])
    r = rollout.generate(m, prompts, eos_id=EOS, pad_id=PAD, max_new_tokens=12, num_generations=3,
                         generator=torch.Generator().manual_seed(1))
    ids, mask, pos = r.sequences()
    logits, _ = m(ids, positions=pos, pad_mask=mask)
    P = r.prompt_ids.size(1)
    logp = torch.log_softmax(logits[:, P - 1:-1].float(), -1)
    logp = logp.gather(-1, r.completion_ids[..., None])[..., 0]
    torch.testing.assert_close(r.logprobs, logp * r.completion_mask, atol=1e-5, rtol=1e-5)
    assert r.completion_mask.sum() > 0


def test_groups_are_contiguous_copies():
    m = build()
    prompts = random_prompts(4, [3, 6])
    r = rollout.generate(m, prompts, eos_id=EOS, pad_id=PAD, max_new_tokens=4, num_generations=3,
                         generator=torch.Generator().manual_seed(0))
    for i, p in enumerate(prompts):
        for j in range(3):
            row = r.prompt_ids[3 * i + j][r.prompt_mask[3 * i + j]].tolist()
            assert row == p


def test_mask_stops_after_first_eos_and_flags_truncation():
    m = build(seed=5)
    with torch.no_grad():  # make the end token likely so that some rows end early and some do not
        m.head.weight[EOS] += 0.6 * m.head.weight.std() * 50 / m.cfg.dim ** 0.5
    r = rollout.generate(m, random_prompts(5, [3] * 16), eos_id=EOS, pad_id=PAD, max_new_tokens=6,
                         generator=torch.Generator().manual_seed(3))
    ids, mask = r.completion_ids, r.completion_mask
    assert r.ended.any() and (~r.ended).any(), "the test needs both ended and truncated rows"
    for row, mrow, ended in zip(ids.tolist(), mask.tolist(), r.ended.tolist()):
        if EOS in row:
            e = row.index(EOS)
            assert mrow[:e + 1] == [1.0] * (e + 1)  # the end token itself counts
            assert all(v == 0.0 for v in mrow[e + 1:])  # nothing after it
            assert all(t == PAD for t in row[e + 1:])
            assert ended
        else:
            assert not ended and all(v == 1.0 for v in mrow)
    assert (r.logprobs[mask == 0] == 0).all()


def test_sampling_is_seeded_and_filters_work():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).repeat(2000, 1)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, _ = rollout.sample_next(logits, 1.0, generator=g1)
    b, _ = rollout.sample_next(logits, 1.0, generator=g2)
    assert torch.equal(a, b)
    k, lp = rollout.sample_next(logits, 1.0, top_k=2, generator=g1)
    assert set(k.tolist()) == {0, 1}
    torch.testing.assert_close(lp, torch.log_softmax(logits[:, :2], -1).gather(1, k[:, None])[:, 0])
    p = torch.softmax(logits[0], -1)  # top_p just above p0 keeps the two most likely tokens
    t, _ = rollout.sample_next(logits, 1.0, top_p=float(p[0]) + 1e-3, generator=g1)
    assert set(t.tolist()) == {0, 1}
    g, lg = rollout.sample_next(logits[:3], 0.0)
    assert g.tolist() == [0, 0, 0]
    # frequencies follow softmax(logits / T)
    s, _ = rollout.sample_next(logits, 0.5, generator=g1)
    freq = torch.bincount(s, minlength=5).float() / len(s)
    assert (freq - torch.softmax(logits[0] / 0.5, -1)).abs().max() < 0.04


def test_pass_at_k_equals_brute_force():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert math.isclose(rollout.pass_at_k(n, c, k), brute, abs_tol=1e-12)
    with pytest.raises(ValueError, match="n >= k"):
        rollout.pass_at_k(2, 1, 3)


def test_majority_vote_by_hand():
    assert rollout.majority_correct([5, 7, 5, None, None, None], 5)  # malformed answers do not vote
    assert not rollout.majority_correct([7, 7, 5], 5)
    assert rollout.majority_correct([5, 7], 5)  # tie: the first seen wins
    assert not rollout.majority_correct([7, 5], 5)
    assert not rollout.majority_correct([None, None], 5)


def test_evaluate_on_a_perfect_and_a_random_model(monkeypatch):
    tok, task = tasks.Tokenizer(), tasks.Addition(2)
    problems = task.eval_set(12)
    m = build()
    metrics = rollout.evaluate(m, tok, task, problems, k=2, n_samples=4, generator=gen(0))
    assert set(metrics) == {"greedy_acc", "pass@2", "maj@2", "mean@4"}
    assert 0.0 <= metrics["greedy_acc"] <= metrics["pass@2"] + 1.0
    # an oracle that writes each true answer: everything is 1
    answers = {tuple(tasks.encode_problem(tok, p, False)[0]):
               tok.encode(p.completion) + [tok.eos_id] for p in problems}

    def oracle(model, prompts, *, num_generations=1, max_new_tokens=8, pad_id=PAD, **_):
        rows = [answers[tuple(p)] for p in prompts for _ in range(num_generations)]
        L = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad_id] * (L - len(r)) for r in rows])
        return rollout.Rollout(None, None, ids, None, None, None)

    monkeypatch.setattr(rollout, "generate", oracle)
    perfect = {"greedy_acc": 1.0, "pass@2": 1.0, "maj@2": 1.0, "mean@3": 1.0}
    assert rollout.evaluate(m, tok, task, problems, k=2, n_samples=3) == perfect


def test_evaluate_at_several_k_equals_one_k_at_a_time(monkeypatch):
    """A list of k reads pass@k and maj@k off one set of samples: the same numbers as one call per
    k with the same samples (same n_samples, same generator seed)."""
    monkeypatch.setattr(tasks.Addition, "reward",
                        lambda self, c, p: float(zlib.crc32(c.encode()) % 2))
    tok, task = tasks.Tokenizer(), tasks.Addition(2)
    problems, m = task.eval_set(12), build()
    together = rollout.evaluate(m, tok, task, problems, k=[1, 2, 4], n_samples=4, generator=gen(0))
    assert 0 < together["pass@1"] < together["pass@2"]  # reward ~ one sample in two: k matters
    assert together["mean@4"] == pytest.approx(together["pass@1"])  # pass@1 is the mean accuracy
    for k in (1, 2, 4):
        alone = rollout.evaluate(m, tok, task, problems, k=k, n_samples=4, generator=gen(0))
        assert alone == {key: together[key]
                         for key in ("greedy_acc", f"pass@{k}", f"maj@{k}", "mean@4")}


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    """Four equally likely tokens (each exactly 0.25): top_p = 0.5 keeps two of them, not three (the
    mass before the third token equals p exactly)."""
    logits = torch.zeros(4000, 4)
    tok, lp = rollout.sample_next(logits, 1.0, top_p=0.5, generator=gen(0))
    assert len(set(tok.tolist())) == 2
    torch.testing.assert_close(lp, torch.full_like(lp, math.log(0.5)))
    tok, _ = rollout.sample_next(logits, 1.0, top_p=0.51, generator=gen(0))
    assert len(set(tok.tolist())) == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_are_a_clear_error(bad):
    m = build()
    with torch.no_grad():
        m.head.weight[3, 0] = bad
    with pytest.raises(rollout.NonFiniteLogits, match="non-finite logits"):
        rollout.generate(m, random_prompts(0, [3, 4]), eos_id=EOS, pad_id=PAD, max_new_tokens=3,
                         generator=torch.Generator().manual_seed(0))


def test_maj_at_k_votes_only_with_well_formed_answers(monkeypatch):
    """On the multi-step task, a completion '??=<sum>' has reward 0: it must not vote either, so
    that maj@k never counts an answer the reward rejects."""
    tok, task = tasks.Tokenizer(), tasks.MultiStep(3, 1)
    problems = task.eval_set(4)

    def fake(model, prompts, *, num_generations=1, pad_id=PAD, **_):
        rows = []
        for p in prompts:
            prob = next(q for q in problems if tasks.encode_problem(tok, q, False)[0] == p)
            # decodes strictly as '??=<sum>'
            junk = [tok.pad_id, tok.pad_id] + tok.encode(f"={prob.answer}")
            c = prob.completion
            wrong = tok.encode(c[:-1] + str((int(c[-1]) + 1) % 10))  # well formed, wrong
            rows += [junk + [tok.eos_id]] * (num_generations - 1) + [wrong + [tok.eos_id]]
        L = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad_id] * (L - len(r)) for r in rows])
        return rollout.Rollout(None, None, ids, None, None, None)

    monkeypatch.setattr(rollout, "generate", fake)
    m = rollout.evaluate(None, tok, task, problems, k=3, n_samples=3)
    assert m["pass@3"] == 0.0 and m["maj@3"] == 0.0


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_prefix_prefill_samples_the_same_tokens(attention):
    """Each prompt prefilled once and its cache gathered to its G rows gives, for the same seed,
    the tokens and log-probs of prefilling every row (the prompt repeated G times,
    num_generations=1)."""
    m = build(seed=3, attention=attention)
    prompts = random_prompts(6, [4, 7, 2])
    kw = dict(eos_id=EOS, pad_id=PAD, max_new_tokens=8)
    shared = rollout.generate(m, prompts, num_generations=4, generator=gen(5), **kw)
    repeated = rollout.generate(m, [p for p in prompts for _ in range(4)], generator=gen(5), **kw)
    assert torch.equal(shared.completion_ids, repeated.completion_ids)
    torch.testing.assert_close(shared.logprobs, repeated.logprobs, atol=1e-6, rtol=1e-6)
    assert torch.equal(shared.group, torch.arange(12) // 4)


# ----------------------------------------------------------------------------------------------
# Speculative decoding with the MTP module as the draft (DeepSeek-V3 5.4.3)


def trained_looking(seed=0, steps=200):
    """A tiny model trained briefly on 2-digit addition, so that its MTP drafts are often right."""
    import train_sft
    torch.manual_seed(seed)
    m = model.Transformer(tiny_config())
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    task, rng = tasks.Addition(2), random.Random(seed)
    for _ in range(steps):
        batch = train_sft.make_batch(task, tasks.Tokenizer(), rng, 32, torch.device("cpu"))
        train_sft.train_step(m, m, opt, [batch], 1.0)
    return m.eval(), task


@pytest.mark.parametrize("which", ["random", "trained"])
def test_speculative_greedy_equals_ordinary_greedy(which):
    tok = tasks.Tokenizer()
    if which == "random":
        m, prompts, eos = build(seed=4), random_prompts(7, [3, 8, 5, 1, 6]), EOS
        with torch.no_grad():  # some rows end early
            m.head.weight[EOS] += 0.4 * m.head.weight.std() * 50 / m.cfg.dim ** 0.5
    else:
        m, task = trained_looking()
        prompts = [tasks.encode_problem(tok, p, False)[0] for p in task.eval_set(24)]
        prompts += [[tok.bos_id, 1, 2]]
        eos = tok.eos_id
    kw = dict(eos_id=eos, pad_id=PAD, max_new_tokens=10, temperature=0.0)
    plain = rollout.generate(m, prompts, **kw)
    spec = rollout.generate(m, prompts, speculative=True, **kw)
    assert torch.equal(spec.completion_ids, plain.completion_ids)
    assert torch.equal(spec.ended, plain.ended) and (plain.ended.any() or which == "trained")
    torch.testing.assert_close(spec.logprobs, plain.logprobs, atol=1e-5, rtol=1e-5)
    rate = spec.stats["acceptance"]
    # drafts mostly right / mostly rejected
    assert (rate > 0.5) if which == "trained" else (rate < 0.5), rate
    assert spec.stats["tokens_per_forward"] > 1.0 or which == "random"


def test_speculative_logprobs_equal_a_full_forward():
    m = build(seed=2)
    prompts = random_prompts(3, [4, 7, 2])
    r = rollout.generate(m, prompts, eos_id=EOS, pad_id=PAD, max_new_tokens=12, num_generations=3,
                         speculative=True, generator=gen(1), top_k=10, top_p=0.95)
    ids, mask, pos = r.sequences()
    logits, _ = m(ids, positions=pos, pad_mask=mask)
    P = r.prompt_ids.size(1)
    flat = logits[:, P - 1:-1].reshape(-1, logits.size(-1))
    logp = rollout.sampling_logprobs(flat, 1.0, 10, 0.95)
    logp = logp.view(*r.completion_ids.shape, -1).gather(-1, r.completion_ids[..., None])[..., 0]
    torch.testing.assert_close(r.logprobs, logp * r.completion_mask, atol=1e-5, rtol=1e-5)


def exact_joint(m, prompt, V, n, temperature):
    """p(x_1 .. x_n | prompt) for every sequence over a V-token vocabulary, by enumeration."""
    probs = {(): 1.0}
    for _ in range(n):
        seqs = list(probs)
        ids = torch.tensor([prompt + list(s) for s in seqs])
        with torch.no_grad():
            p = rollout.sampling_logprobs(m(ids)[0][:, -1], temperature).exp()
        probs = {s + (x,): probs[s] * p[i, x].item() for i, s in enumerate(seqs) for x in range(V)}
    return probs


def speculative_tv(m, prompt, V, n=3, rows=40000, seed=0):
    """Total variation between the empirical distribution of speculative samples and the exact
    one."""
    r = rollout.generate(m, [prompt], eos_id=-1, pad_id=0, num_generations=rows, max_new_tokens=n,
                         speculative=True, temperature=1.0, generator=gen(seed))
    counts = {}
    for row in r.completion_ids.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    exact = exact_joint(m, prompt, V, n, 1.0)
    tv = 0.5 * sum(abs(counts.get(s, 0) / rows - p) for s, p in exact.items())
    return tv, r.stats["acceptance"]


def tiny_vocab_model():
    torch.manual_seed(3)
    m = model.Transformer(tiny_config(vocab_size=5)).eval()
    with torch.no_grad():  # sharper, different main and draft distributions: a biased rule shows
        m.head.weight.mul_(40.0)
    return m


def test_speculative_sampling_is_distributed_as_the_main_model(monkeypatch):
    """On a 5-token vocabulary, 3 tokens of 40,000 samples: the empirical joint distribution is
    within 0.015 total variation of the main model's exact one (measured: 0.003-0.004 over seeds),
    and the same check fails for two wrong rules: keeping every draft (0.91), or resampling a
    rejected one from p instead of the residual (0.047)."""
    m, prompt = tiny_vocab_model(), [1, 2, 3]
    tv, acceptance = speculative_tv(m, prompt, 5)
    assert tv < 0.015, tv
    assert 0.05 < acceptance < 0.95  # drafts both accepted and rejected: the rule is exercised
    real = rollout.verify_draft
    monkeypatch.setattr(rollout, "verify_draft", lambda p, q, d, greedy, g=None: (
        torch.ones_like(d, dtype=torch.bool), p.argmax(-1)))
    assert speculative_tv(m, prompt, 5)[0] > 0.03  # keeping every draft samples q, not p

    # the right acceptance test, but a rejected draft resampled from p
    def from_p(p, q, d, greedy, g=None):
        ok, _ = real(p, q, d, greedy, g)
        return ok, torch.multinomial(p.exp(), 1, generator=g)[:, 0]

    monkeypatch.setattr(rollout, "verify_draft", from_p)
    assert speculative_tv(m, prompt, 5)[0] > 0.03


def test_speculation_needs_an_mtp_module():
    m = build(mtp_depth=0)
    with pytest.raises(ValueError, match="mtp_depth = 0"):
        rollout.generate(m, random_prompts(0, [3]), eos_id=EOS, pad_id=PAD, speculative=True)


def test_completion_figures_split_lengths_and_accuracy_by_correctness_and_thinking():
    task, p = tasks.ThinkSum(), tasks.Problem("12+34+56=", "", 102)
    comps = ["<think>12+34=46,46+56=102</think>102", "<think>1</think>7", "102", "101"]
    right = [task.reward(c, p) for c in comps]
    lengths = [len(tasks.Tokenizer(think=True).encode(c)) + 1 for c in comps]  # + the end token
    assert lengths == [24, 5, 4, 4] and right == [1.0, 0.0, 1.0, 0.0]
    assert rollout.completion_figures(task, comps, right, lengths, "x_") == {
        "x_len": 9.25, "x_len_correct": 14.0, "x_len_wrong": 4.5,
        "x_think_rate": 0.5, "x_acc_thinking": 0.5, "x_acc_direct": 0.5}
    one = rollout.completion_figures(task, ["102"], [1.0], [4])
    assert one["acc_thinking"] is None and one["len_wrong"] is None  # none thought, none wrong
    assert set(rollout.completion_figures(tasks.Addition(2), comps, right, lengths)) == {
        "len", "len_correct", "len_wrong"}  # a task that never thinks


def test_mean_at_n_is_the_mean_accuracy_of_the_samples_drawn():
    tok, task = tasks.get("think")
    problems = task.eval_set(6)
    m = build(vocab_size=tok.vocab_size, max_seq_len=64)
    got = rollout.evaluate(m, tok, task, problems, mean_of=3, generator=gen(0),
                           max_new_tokens=task.max_new_tokens())
    prompts = [tasks.encode_problem(tok, p, with_completion=False)[0] for p in problems]
    r = rollout.generate(m, prompts, eos_id=tok.eos_id, pad_id=tok.pad_id, num_generations=3,
                         max_new_tokens=task.max_new_tokens(), generator=gen(0))
    texts = rollout.decode_completions(tok, r)
    right = [task.reward(c, problems[i // 3]) for i, c in enumerate(texts)]
    assert got["mean@3"] == sum(right) / 18 and "pass@3" not in got
    assert got["len"] == r.completion_mask.sum().item() / 18
    assert "mean@3" not in rollout.evaluate(m, tok, task, problems)  # greedy only
