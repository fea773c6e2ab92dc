import math
import statistics

import pytest
import torch

import losses
from losses import (grpo_advantages, grpo_aggregation, grpo_loss, kl_k1, kl_k3,
                    process_advantages, token_logprobs)

# Worked examples of group-relative advantages, as course notes on GRPO print them. Some printed
# figures are loose or wrong: for [0.9, 0.7, 0.4, 0.2] dividing by sigma ~ 0.33 is neither the
# population std (0.269) nor the sample std (0.311), so A = +1.30/+0.56/-0.56/-1.30 with the
# population std, not +1.06/+0.45/...; for [1, 1, 0, 1, 0, 0], +0.8 / -1.2 do not even sum to zero
# (the population-std answer is +1 / -1). We test the formula, computed here with the statistics
# module, not printed numbers.
EXAMPLES = [[0.9, 0.7, 0.4, 0.2], [0.9, 0.7, 0.4, 0.8], [0.95, 0.88, 0.45, 0.42, 0.15],
            [1, 1, 0, 1, 0, 0]]


def reference(rs, std):
    mu = statistics.fmean(rs)
    return [(r - mu) / (std + 1e-4) for r in rs]


@pytest.mark.parametrize("rs", EXAMPLES)
@pytest.mark.parametrize("unbiased", [False, True])
def test_group_advantages_on_worked_examples(rs, unbiased):
    std = statistics.stdev(rs) if unbiased else statistics.pstdev(rs)
    got = grpo_advantages(torch.tensor(rs), len(rs), unbiased_std=unbiased)
    want = torch.tensor(reference(rs, std), dtype=torch.float32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert abs(got.sum().item()) < 1e-5


def test_worked_numbers_are_what_the_formula_gives():
    a = grpo_advantages(torch.tensor([0.9, 0.7, 0.4, 0.2]), 4)
    assert abs(statistics.pstdev([0.9, 0.7, 0.4, 0.2]) - 0.2693) < 1e-4
    assert abs(a[0].item() - 0.35 / 0.26926) < 1e-3  # 1.30, not 1.06
    b = grpo_advantages(torch.tensor([1.0, 1, 0, 1, 0, 0]), 6)
    torch.testing.assert_close(b, torch.tensor([1.0, 1, -1, 1, -1, -1]) * 0.5 / (0.5 + 1e-4))


@pytest.mark.parametrize("unbiased", [False, True])
def test_batch_and_none_scaling(unbiased):
    rs = EXAMPLES[0] + EXAMPLES[1]  # two groups of 4
    got = grpo_advantages(torch.tensor(rs), 4, scale_rewards="batch", unbiased_std=unbiased)
    std = statistics.stdev(rs) if unbiased else statistics.pstdev(rs)
    want = [(r - statistics.fmean(g)) / (std + 1e-4) for g in (rs[:4], rs[4:]) for r in g]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), atol=1e-5, rtol=1e-5)
    none = grpo_advantages(torch.tensor(rs), 4, scale_rewards="none")
    want = [r - statistics.fmean(g) for g in (rs[:4], rs[4:]) for r in g]
    torch.testing.assert_close(none, torch.tensor(want, dtype=torch.float32), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo_advantages(torch.tensor(rs), 4, scale_rewards="token")


@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 0.7, 1e-3])
@pytest.mark.parametrize("mode", ["group", "batch", "none"])
def test_identical_rewards_give_exact_zero_and_finite_loss(value, mode):
    r = torch.tensor([value] * 6 + [0.0, 1.0, 1.0])
    adv = grpo_advantages(r, 3, scale_rewards=mode)
    assert torch.equal(adv[:6], torch.zeros(6))  # exactly 0, never rounding noise / eps
    logp = torch.randn(9, 5, requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach(), logp.detach() - 0.1, adv, torch.ones(9, 5))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()


def test_group_indexing_sums_and_shuffles():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(5 * 4, generator=g)
    adv = grpo_advantages(r, 4)
    assert torch.allclose(adv.view(5, 4).sum(1), torch.zeros(5), atol=1e-5)  # each group sums to 0
    perm = torch.tensor([3, 0, 4, 1, 2])  # shuffle whole groups
    shuffled = grpo_advantages(r.view(5, 4)[perm].flatten(), 4)
    torch.testing.assert_close(shuffled, adv.view(5, 4)[perm].flatten())
    assert not torch.allclose(adv, grpo_advantages(r, 4, scale_rewards="batch"))


def test_process_advantages_by_hand():
    # one group of two outputs: output 0 has steps ending at tokens 2 and 5 with rewards 1, 0;
    # output 1 one step ending at token 3 with reward 1. R = [1, 0, 1]: mean 2/3, pop std sqrt(2)/3.
    adv = process_advantages([[1.0, 0.0], [1.0]], [[2, 5], [3]], num_generations=2, length=7,
                             eps=0.0)
    mu, sd = 2 / 3, math.sqrt(2) / 3
    hi, lo = (1 - mu) / sd, (0 - mu) / sd
    want = torch.tensor([[hi + lo] * 3 + [lo] * 3 + [0.0],  # t <= 2: both steps; 3..5: the second
                         [hi] * 4 + [0.0] * 3])
    torch.testing.assert_close(adv, want)
    # equal step rewards -> 0; two groups are normalised separately
    two = process_advantages([[1.0], [1.0], [1.0, 0.0], [1.0]], [[1], [2], [2, 5], [3]], 2, 7,
                             eps=0.0)
    assert torch.equal(two[:2], torch.zeros(2, 7))
    torch.testing.assert_close(two[2:], want)


def test_kl_k3_properties_and_monte_carlo():
    a, b = torch.randn(1000), torch.randn(1000)
    assert (kl_k3(a, b) >= 0).all()
    assert torch.equal(kl_k3(a, a), torch.zeros(1000))
    g = torch.Generator().manual_seed(0)
    pi = torch.softmax(torch.tensor([1.0, 0.2, -0.5, 0.3]), 0)
    ref = torch.softmax(torch.tensor([0.1, 0.4, 0.2, -0.2]), 0)
    exact = (pi * (pi / ref).log()).sum()
    x = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    lp, lr = pi.log()[x], ref.log()[x]
    assert abs(kl_k3(lp, lr).mean() - exact) < 3e-3
    assert abs(kl_k1(lp, lr).mean() - exact) < 3e-3
    assert kl_k3(lp, lr).var() < kl_k1(lp, lr).var()  # the reason GRPO uses k3


def test_kl_estimator_gradients():
    """k3 differentiated in the loss (as GRPO does) with samples from pi has expected gradient
    grad KL(ref || pi), not grad KL(pi || ref); k1 in the loss has expected gradient 0. Exact
    gradients vs Monte-Carlo averages on a 4-way categorical."""
    theta = torch.tensor([1.0, 0.2, -0.5, 0.3], requires_grad=True)
    ref = torch.softmax(torch.tensor([0.1, 0.4, 0.2, -0.2]), 0)
    pi = torch.softmax(theta, 0)
    reverse = (pi * (pi / ref).log()).sum()  # KL(pi || ref)
    forward = (ref * (ref / pi).log()).sum()  # KL(ref || pi)
    g_reverse = torch.autograd.grad(reverse, theta, retain_graph=True)[0]
    g_forward = torch.autograd.grad(forward, theta)[0]
    g = torch.Generator().manual_seed(1)
    x = torch.multinomial(pi.detach(), 400_000, replacement=True, generator=g)
    lp = torch.log_softmax(theta, 0)[x]
    g_k3 = torch.autograd.grad(kl_k3(lp, ref.log()[x]).mean(), theta)[0]
    g_k1 = torch.autograd.grad(kl_k1(torch.log_softmax(theta, 0)[x], ref.log()[x]).mean(), theta)[0]
    torch.testing.assert_close(g_k3, g_forward, atol=5e-3, rtol=0)
    assert (g_k3 - g_reverse).abs().max() > 0.02  # it is NOT the gradient of the reverse KL
    torch.testing.assert_close(g_k1, torch.zeros(4), atol=5e-3, rtol=0)


def test_clipping_zeroes_the_gradient_where_it_binds():
    old = torch.zeros(1, 4)
    # ratios 0.5, 0.9, 1.1, 1.5 with eps 0.2 and eps_high 0.3
    logp = torch.log(torch.tensor([[0.5, 0.9, 1.1, 1.5]])).requires_grad_()
    for adv, dead in ((1.0, [False, False, False, True]), (-1.0, [True, False, False, False])):
        logp.grad = None
        loss, m = grpo_loss(logp, old, logp.detach(), torch.tensor([adv]), torch.ones(1, 4),
                            epsilon=0.2, epsilon_high=0.3, beta=0.0)
        loss.backward()
        assert [g == 0 for g in logp.grad[0].tolist()] == dead
        assert m["clip_high" if adv > 0 else "clip_low"] == 0.25
    # at the first inner iteration logp == old_logp exactly: ratio 1, nothing clipped
    lp = torch.randn(3, 5)
    _, m = grpo_loss(lp, lp.clone(), lp, torch.tensor([1.0, -1.0, 0.5]), torch.ones(3, 5))
    assert m["ratio"] == 1.0 and m["clip_low"] == 0.0 and m["clip_high"] == 0.0 and m["kl"] == 0.0


def ragged():
    mask = torch.tensor([[1.0, 1, 0, 0, 0], [1, 1, 1, 1, 0]])  # lengths 2 and 4
    logp = torch.tensor([[-0.5, -1.0, 0, 0, 0], [-0.2, -0.3, -0.4, -0.1, 0]], requires_grad=True)
    return logp, mask


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_loss_type_normalisations_by_hand(loss_type):
    logp, mask = ragged()
    adv = torch.tensor([1.0, 1.0])
    lp = logp.detach()
    loss, _ = grpo_loss(logp, lp, lp, adv, mask, beta=0.0, loss_type=loss_type)
    # at rho = 1 the per-token loss is -A = -1 on each valid token
    want = {"grpo": -(2 / 2 + 4 / 4) / 2, "dapo": -6 / 6, "dr_grpo": -6 / (2 * 5)}[loss_type]
    assert abs(loss.item() - want) < 1e-6
    loss.backward()
    g = logp.grad
    short, long_ = g[0, 0].item(), g[1, 0].item()
    if loss_type == "grpo":  # 1/|o_i| weights a short sequence's tokens more: the length bias
        assert abs(short - (-1 / 2 / 2)) < 1e-6 and abs(long_ - (-1 / 4 / 2)) < 1e-6
    else:
        assert short == long_
    assert (g * (1 - mask) == 0).all()  # padding gets no gradient


def test_aggregation_by_hand_and_a_split_batch_sums_to_the_whole():
    """grpo_aggregation's per-row divisors and denominators by hand (a filtered row, all-zero
    mask, counts in no N); micro-batches that divide by the whole batch's denominator sum to the
    whole batch's loss, for every loss_type."""
    logp, mask = ragged()
    lengths, d = grpo_aggregation(torch.cat([mask, torch.zeros(1, 5)]), "grpo")
    assert lengths.tolist() == [2, 4, 1] and d.item() == 2  # N = 2 rows left in
    assert grpo_aggregation(mask, "dapo")[0] is None and grpo_aggregation(mask, "dapo")[1] == 6
    assert grpo_aggregation(mask, "dr_grpo", 8)[1] == 2 * 8  # N * max_completion_len
    assert grpo_aggregation(mask, "dr_grpo")[1] == 2 * 5  # the batch's width by default
    with pytest.raises(ValueError, match="loss_type"):
        grpo_aggregation(mask, "ppo")
    adv = torch.tensor([0.7, -0.3])
    ref = logp.detach() - 0.05
    for lt in ("grpo", "dapo", "dr_grpo"):
        d = grpo_aggregation(mask, lt, 8)[1]
        whole, _ = grpo_loss(logp, logp.detach(), ref, adv, mask, loss_type=lt, denominator=d)
        parts = sum(grpo_loss(logp[i:i + 1], logp[i:i + 1].detach(), ref[i:i + 1], adv[i:i + 1],
                              mask[i:i + 1], loss_type=lt, denominator=d)[0] for i in range(2))
        assert abs(whole.item() - parts.item()) < 1e-6, lt


def test_process_advantages_in_loss_and_entropy():
    logp = torch.randn(2, 3)
    adv = torch.tensor([[1.0, 0.5, 0.0], [-1.0, -1.0, 0.0]])
    loss, m = grpo_loss(logp, logp, logp, adv, torch.ones(2, 3), beta=0.0,
                        logits=torch.zeros(2, 3, 4))
    assert abs(loss.item() - (-(1.5 / 3) - (-2 / 3)) / 2) < 1e-6
    assert abs(m["entropy"] - math.log(4)) < 1e-6


def test_token_logprobs_equals_slow_loop():
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    got = token_logprobs(logits, targets)
    for b in range(2):
        for t in range(5):
            want = logits[b, t, targets[b, t]] - torch.logsumexp(logits[b, t], 0)
            assert abs(got[b, t].item() - want.item()) < 1e-5


# ----------------------------------------------------------------------------------------------
# Preference losses: each against its formula written out in plain Python floats

def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


PREFS = [(-1.0, -2.0, -1.2, -1.5), (-3.0, -0.5, -2.0, -1.0), (-0.2, -0.2, -0.7, -0.1),
         (-5.0, -9.0, -5.5, -4.0)]


def as_tensors(rows):
    return [torch.tensor(col) for col in zip(*rows)]


@pytest.mark.parametrize("beta,e", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2), (1.0, 0.4)])
def test_dpo_loss_against_the_formula(beta, e):
    pc, pr, rc, rr = as_tensors(PREFS)
    got, chosen_r, rejected_r = losses.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=e)
    for i, (a, b, c, d) in enumerate(PREFS):
        h = (a - c) - (b - d)
        want = -(1 - e) * log_sigmoid(beta * h) - e * log_sigmoid(-beta * h)
        assert math.isclose(got[i].item(), want, rel_tol=1e-6)
        assert math.isclose(chosen_r[i].item(), beta * (a - c), rel_tol=1e-6, abs_tol=1e-7)
        assert math.isclose(rejected_r[i].item(), beta * (b - d), rel_tol=1e-6, abs_tol=1e-7)


def test_dpo_worked_example():
    """log pi_ref(yw) = -1.2, log pi(yw) = -1.0, log pi_ref(yl) = -1.5, log pi(yl) = -2.0, beta
    0.1: beta h = 0.07, loss = -log sigmoid(0.07) = 0.6583 (0.66 rounded)."""
    t = torch.tensor
    loss, c, r = losses.dpo_loss(t([-1.0]), t([-2.0]), t([-1.2]), t([-1.5]), 0.1)
    assert (abs(loss.item() - 0.659) < 1e-3 and abs(c.item() - 0.02) < 1e-6
            and abs(r.item() + 0.05) < 1e-6)


def test_dpo_rewards_are_detached_and_the_loss_differentiable():
    pc = torch.tensor([-1.0, -2.0], requires_grad=True)
    t = torch.tensor
    loss, c, r = losses.dpo_loss(pc, t([-2.0, -1.0]), t([-1.0, -1.0]), t([-1.0, -1.0]))
    assert not c.requires_grad and not r.requires_grad
    loss.sum().backward()
    assert (pc.grad < 0).all()  # raising the chosen log-prob lowers the loss


def test_label_smoothing_one_half_treats_preferences_as_coin_flips():
    """With e = 0.5 (half the labels assumed flipped), chosen and rejected are interchangeable: the
    loss is symmetric in h and is smallest, ln 2, at h = 0, so it pulls every margin back to 0. It
    is not constant in h, as is sometimes said: 0.5 softplus(-x) + 0.5 softplus(x) grows with
    |x|."""
    h = torch.tensor([-4.0, -1.0, 0.0, 1.0, 4.0], requires_grad=True)
    z = torch.zeros(5)
    loss, _, _ = losses.dpo_loss(h, z, z, z, beta=1.0, label_smoothing=0.5)
    swapped, _, _ = losses.dpo_loss(z, h, z, z, beta=1.0, label_smoothing=0.5)
    torch.testing.assert_close(loss, swapped)
    torch.testing.assert_close(loss, loss.flip(0))
    assert loss.argmin().item() == 2 and abs(loss[2].item() - math.log(2)) < 1e-7
    loss.sum().backward()
    assert h.grad[2] == 0 and (h.grad[3:] > 0).all() and (h.grad[:2] < 0).all()


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_loss_against_the_formula(beta):
    pc, pr, rc, rr = as_tensors(PREFS)
    got, chosen_r, _ = losses.ipo_loss(pc, pr, rc, rr, beta=beta)
    for i, (a, b, c, d) in enumerate(PREFS):
        assert math.isclose(got[i].item(), ((a - c) - (b - d) - 1 / (2 * beta)) ** 2, rel_tol=1e-6)
        assert math.isclose(chosen_r[i].item(), beta * (a - c), rel_tol=1e-6, abs_tol=1e-7)


def test_simpo_loss_against_the_formula_and_needs_no_reference():
    pc, pr = torch.tensor([-4.0, -6.0, -1.0]), torch.tensor([-9.0, -3.0, -1.0])
    lc, lr = torch.tensor([4.0, 5.0, 2.0]), torch.tensor([6.0, 2.0, 2.0])
    got, c, r = losses.simpo_loss(pc, pr, lc, lr, beta=2.0, gamma=0.5)
    for i in range(3):
        x = 2.0 * pc[i].item() / lc[i].item() - 2.0 * pr[i].item() / lr[i].item() - 0.5
        assert math.isclose(got[i].item(), -log_sigmoid(x), rel_tol=1e-6)
        assert math.isclose(c[i].item(), 2.0 * pc[i].item() / lc[i].item(), rel_tol=1e-6)
    import inspect
    assert not [p for p in inspect.signature(losses.simpo_loss).parameters if "ref" in p]


def test_bradley_terry_loss_against_the_formula():
    rc, rr = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])
    for margin in (0.0, 0.3):
        want = sum(-log_sigmoid(a - b - margin) for a, b in zip(rc.tolist(), rr.tolist())) / 3
        assert math.isclose(losses.bradley_terry_loss(rc, rr, margin).item(), want, rel_tol=1e-6)
    z = torch.zeros(4)
    assert math.isclose(losses.bradley_terry_loss(z, z).item(), math.log(2), rel_tol=1e-7)


def test_sequence_logprobs_sum_and_average():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    torch.testing.assert_close(losses.sequence_logprobs(lp, mask), torch.tensor([-6.0, -1.0]))
    torch.testing.assert_close(losses.sequence_logprobs(lp, mask, average=True),
                               torch.tensor([-2.0, -0.5]))


# ----------------------------------------------------------------------------------------------
# PPO: GAE, per-token rewards, the clipped losses, the KL controllers

def gae_by_hand(rewards, values, gamma, lam):
    """GAE for one unpadded row written out with the infinite sum:
    A_t = sum_l (gamma lam)^l delta_{t+l}."""
    T = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < T else 0.0) - values[t]
              for t in range(T)]
    adv = [sum((gamma * lam) ** (l - t) * deltas[l] for l in range(t, T)) for t in range(T)]
    return adv, deltas


def test_gae_on_a_worked_example():
    """Rewards 0.5, 1.2, 2.1, values 0.8, 1.5, 1.9, gamma 0.99, lam 0.95: deltas 1.185, 1.581,
    0.2 and advantages 2.849, 1.769, 0.2 (1.185 + 0.99 * 0.95 * 1.769 is 2.849, not the 2.836 a
    worked example of it prints: an arithmetic slip)."""
    r, v = torch.tensor([[0.5, 1.2, 2.1]]), torch.tensor([[0.8, 1.5, 1.9]])
    adv, ret = losses.gae(r, v, torch.ones(1, 3), gamma=0.99, lam=0.95)
    want, deltas = gae_by_hand([0.5, 1.2, 2.1], [0.8, 1.5, 1.9], 0.99, 0.95)
    assert [round(d, 3) for d in deltas] == [1.185, 1.581, 0.2]
    torch.testing.assert_close(adv[0], torch.tensor([2.849, 1.769, 0.2]), atol=1e-3, rtol=0)
    torch.testing.assert_close(adv[0], torch.tensor(want), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ret, adv + v)


def test_gae_masked_ragged_batch_equals_each_row_alone():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 2, 4, 1]
    r, v = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    mask = (torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]).float()
    adv, ret = losses.gae(r, v, mask, gamma=0.97, lam=0.9)
    for i, n in enumerate(lengths):
        alone, alone_ret = losses.gae(r[i:i + 1, :n], v[i:i + 1, :n], torch.ones(1, n),
                                      gamma=0.97, lam=0.9)
        torch.testing.assert_close(adv[i, :n], alone[0])
        torch.testing.assert_close(ret[i, :n], alone_ret[0])
        assert (adv[i, n:] == 0).all() and (ret[i, n:] == 0).all()  # padding gets 0
        want, _ = gae_by_hand(r[i, :n].tolist(), v[i, :n].tolist(), 0.97, 0.9)
        torch.testing.assert_close(adv[i, :n], torch.tensor(want), atol=1e-5, rtol=1e-5)


def test_gae_with_gamma_and_lambda_one_is_the_monte_carlo_return_minus_the_value():
    r, v = torch.tensor([[0.1, -0.2, 0.0, 1.0]]), torch.tensor([[0.3, 0.4, 0.5, 0.6]])
    adv, ret = losses.gae(r, v, torch.ones(1, 4), gamma=1.0, lam=1.0)
    mc = torch.tensor([[0.9, 0.8, 1.0, 1.0]])  # the sum of the rewards from t on
    torch.testing.assert_close(adv, mc - v)
    torch.testing.assert_close(ret, mc)


def test_score_lands_on_the_last_real_token_and_never_on_padding():
    logp = torch.tensor([[-1.0, -0.5, -2.0, -0.1], [-0.3, -0.2, -7.0, -7.0]])
    ref = torch.tensor([[-1.5, -0.5, -1.0, -0.1], [-0.1, -0.2, -3.0, -3.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    got = losses.token_rewards(torch.tensor([1.0, 0.5]), logp, ref, mask, kl_coef=0.1)
    # k1 = logp - ref on every token, the score on the last; padding gets nothing, not even its
    # huge log-ratio
    want = torch.tensor([[-0.1 * 0.5, 0.0, -0.1 * -1.0, 1.0],
                         [-0.1 * -0.2, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(got, want)
    same = losses.token_rewards(torch.zeros(2), logp, logp, mask, 0.1)
    assert torch.equal(same, torch.zeros(2, 4))  # pi = ref: no KL


def test_ppo_policy_loss_by_hand():
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 0.0]])
    old, mask = torch.zeros(1, 3), torch.tensor([[1.0, 1.0, 0.0]])
    adv = torch.tensor([[2.0, 1.0, 5.0]])
    loss, m = losses.ppo_policy_loss(logp, old, adv, mask, epsilon=0.2)
    # ratio 1.5, A = 2: clipped to 1.2 (min(3.0, 2.4)); ratio 0.5, A = 1: min(0.5, 0.8) = 0.5
    assert abs(loss.item() + (2.4 + 0.5) / 2) < 1e-6
    assert m["clip_frac"] == 1.0 and abs(m["ratio"] - 1.0) < 1e-6


def test_value_loss_clipping_by_hand():
    v = torch.tensor([[1.0, 0.0, 2.0]])
    old = torch.tensor([[0.5, 0.1, 2.0]])
    ret = torch.tensor([[2.0, -1.0, 0.0]])
    loss, m = losses.value_loss(v, old, ret, torch.ones(1, 3), clip_range=0.2)
    # V_clip = 0.7, 0.0, 2.0; squared errors (unclipped, clipped): (1, 1.69), (1, 1), (4, 4)
    assert abs(loss.item() - 0.5 * (1.69 + 1 + 4) / 3) < 1e-6
    assert abs(m["value_clip_frac"] - 1 / 3) < 1e-6


def test_adaptive_kl_controller():
    ctl = losses.AdaptiveKLController(0.1, target=1.0, horizon=100)
    ctl.update(current_kl=1.5, n_steps=10)  # above target: e = 0.5 clipped to 0.2
    assert abs(ctl.value - 0.1 * (1 + 0.2 * 10 / 100)) < 1e-12
    ctl.update(current_kl=0.9, n_steps=10)  # below target: e = -0.1
    assert abs(ctl.value - 0.1 * 1.02 * (1 - 0.1 * 10 / 100)) < 1e-12
    before = ctl.value
    ctl.update(current_kl=0.0, n_steps=100)  # far below: clipped to -0.2, one horizon
    assert abs(ctl.value - before * 0.8) < 1e-12
    fixed = losses.FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05


def distill_by_hand(zs, zt, y, mask, alpha, tau, kl):
    """The distillation loss token by token with math on Python floats: an independent formula."""
    total, n = 0.0, 0
    for b in range(zs.size(0)):
        for t in range(zs.size(1)):
            if not mask[b, t]:
                continue
            s, u = zs[b, t].tolist(), zt[b, t].tolist()
            lse = math.log(sum(math.exp(v) for v in s))
            ce = lse - s[int(y[b, t])]
            q = [math.exp(v / tau) for v in s]
            p = [math.exp(v / tau) for v in u]
            q, p = [v / sum(q) for v in q], [v / sum(p) for v in p]
            a, c = (p, q) if kl == "forward" else (q, p)
            div = sum(ai * math.log(ai / ci) for ai, ci in zip(a, c))
            total, n = total + alpha * ce + (1 - alpha) * tau ** 2 * div, n + 1
    return total / n


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("alpha,tau", [(0.5, 1.0), (0.3, 2.0), (0.0, 0.5), (1.0, 3.0)])
def test_distill_loss_against_the_formula_on_a_masked_ragged_batch(kl, alpha, tau):
    torch.manual_seed(0)
    zs, zt = torch.randn(3, 5, 7, dtype=torch.float64), torch.randn(3, 5, 7, dtype=torch.float64)
    y = torch.randint(0, 7, (3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.float64)
    loss, parts = losses.distill_loss(zs, zt, y, mask, alpha, tau, kl)
    assert loss.item() == pytest.approx(distill_by_hand(zs, zt, y, mask, alpha, tau, kl), abs=1e-5)
    assert loss.item() == pytest.approx(alpha * parts["ce"] + (1 - alpha) * tau ** 2 * parts["kl"])
    changed = zs.clone()
    changed[1, 3] += 5.0  # a masked position changes nothing
    assert losses.distill_loss(changed, zt, y, mask, alpha, tau, kl)[0] == loss


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_distill_loss_of_a_student_equal_to_its_teacher_has_no_kl_and_no_kl_gradient(kl):
    torch.manual_seed(1)
    z = torch.randn(2, 4, 9)
    student = z.clone().requires_grad_(True)
    teacher = z.clone().requires_grad_(True)
    loss, parts = losses.distill_loss(student, teacher, torch.zeros(2, 4, dtype=torch.long),
                                      torch.ones(2, 4), alpha=0.0, tau=2.0, kl=kl)
    assert parts["kl"] == 0.0 and loss.item() == 0.0
    loss.backward()
    assert student.grad.abs().max() < 1e-7  # p - q = 0 up to the rounding of a softmax's sum
    assert teacher.grad is None  # the teacher gets no gradient
    with pytest.raises(ValueError, match="forward or reverse"):
        losses.distill_loss(z, z, torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4), kl="js")
