import pytest
import torch

from moe import MoE, max_violation


def make_moe(tiny, **kw):
    torch.manual_seed(0)
    cfg = tiny(**kw)
    moe = MoE(cfg)
    for p in moe.parameters():  # larger weights than the default init, for varied routing
        torch.nn.init.normal_(p, std=0.2)
    return cfg, moe


def dense_reference(moe, x):
    """Every expert on every token, masked by the router's choice and weighted by its gate weight."""
    x_flat = x.reshape(-1, x.size(-1))
    weights, indices, _ = moe.gate(x_flat)
    y = moe.shared_experts(x_flat) if moe.shared_experts is not None else torch.zeros_like(x_flat)
    for i, expert in enumerate(moe.experts):
        w = (weights * (indices == i)).sum(-1, keepdim=True)  # (N, 1), 0 where expert i is not chosen
        y = y + w * expert(x_flat)
    return y.view_as(x)


@pytest.mark.parametrize("kw", [{}, {"score_func": "softmax"}, {"n_shared_experts": 0},
                                {"n_routed_experts": 8, "n_expert_groups": 4, "n_limited_groups": 2},
                                {"route_scale": 2.5}])
def test_dispatch_equals_dense_loop(tiny, kw):
    cfg, moe = make_moe(tiny, **kw)
    x = torch.randn(3, 7, cfg.dim)
    y, _ = moe(x)
    torch.testing.assert_close(y, dense_reference(moe, x), atol=1e-6, rtol=1e-5)


def test_bias_changes_selection_not_weights(tiny):
    cfg, moe = make_moe(tiny, n_routed_experts=8, n_activated_experts=2)
    x = torch.randn(64, cfg.dim)
    w0, i0, s0 = moe.gate(x)
    # A bias equal on every expert never changes the selection, so the weights must be identical.
    moe.gate.bias.fill_(0.3)
    w1, i1, _ = moe.gate(x)
    assert torch.equal(i0, i1)
    torch.testing.assert_close(w0, w1, atol=0, rtol=0)
    # A large bias on experts 6 and 7 forces them to be selected ...
    moe.gate.bias.zero_()
    moe.gate.bias[6:] = 10.0
    w2, i2, s2 = moe.gate(x)
    assert not torch.equal(i0, i2)
    assert set(i2.flatten().tolist()) == {6, 7}
    # ... but their weights are the unbiased scores, normalised over the selection (computed here).
    sel = s0[:, 6:]
    torch.testing.assert_close(w2.gather(1, i2.argsort(1)), sel / sel.sum(-1, keepdim=True))


def test_softmax_weights_not_renormalised(tiny):
    cfg, moe = make_moe(tiny, score_func="softmax")
    x = torch.randn(16, cfg.dim)
    w, i, s = moe.gate(x)
    torch.testing.assert_close(w, s.gather(1, i))
    assert torch.allclose(s.sum(-1), torch.ones(16))


def test_group_limited_routing_stays_in_groups(tiny):
    cfg, moe = make_moe(tiny, n_routed_experts=8, n_activated_experts=2, n_expert_groups=4, n_limited_groups=1)
    _, idx, _ = moe.gate(torch.randn(200, cfg.dim))
    groups = idx // 2  # 2 experts per group
    assert torch.equal(groups[:, 0], groups[:, 1])  # one allowed group: both experts from it


def test_bias_updates_lower_max_violation(tiny):
    cfg, moe = make_moe(tiny, n_routed_experts=8, n_activated_experts=2)
    x = torch.randn(256, 1, cfg.dim) + 2.0  # a shared offset in the inputs ...
    with torch.no_grad():
        moe.gate.weight[0] = 1.0  # ... that expert 0 (and to a lesser degree all) reacts to: imbalanced
    moe.train()
    vios = []
    for _ in range(60):
        moe(x)
        vios.append(max_violation(moe.update_bias(speed=0.02)))
    assert vios[0] > 1.0  # deliberately imbalanced at the start
    assert vios[-1] < 0.5 * vios[0]
    assert moe.load is None  # the counts reset after each update


def test_load_counts_and_sign_update(tiny):
    cfg, moe = make_moe(tiny)
    moe.train()
    x = torch.randn(2, 5, cfg.dim)
    moe(x)
    moe(x)
    _, idx, _ = moe.gate(x.view(-1, cfg.dim))
    expected = 2 * torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts)
    assert torch.equal(moe.load, expected)
    load = moe.update_bias(speed=0.1)
    torch.testing.assert_close(moe.gate.bias, 0.1 * torch.sign(expected.float().mean() - expected.float()))
    assert torch.equal(load, expected.float())
    # no loads are counted in eval mode (sampling must not move the biases)
    moe.eval()
    moe(x)
    assert moe.load is None


def test_balance_loss_matches_formula(tiny):
    cfg, moe = make_moe(tiny, balance_loss_alpha=0.01)
    B, T, E, K = 2, 6, cfg.n_routed_experts, cfg.n_activated_experts
    scores = torch.rand(B, T, E)
    indices = scores.topk(K, dim=-1)[1]
    expected = 0.0
    for b in range(B):  # plain loops over the V3 eq. 17-20
        for i in range(E):
            f = E / (K * T) * sum(int(i in indices[b, t].tolist()) for t in range(T))
            P = sum((scores[b, t, i] / scores[b, t].sum()).item() for t in range(T)) / T
            expected += 0.01 * f * P / B
    assert abs(moe.balance_loss(scores, indices).item() - expected) < 1e-6
    # perfectly uniform scores and loads give alpha * 1
    u = torch.full((1, 4, 4), 0.5)
    assert abs(moe.balance_loss(u, torch.tensor([[[0, 1]], [[2, 3]], [[0, 1]], [[2, 3]]]).view(1, 4, 2)).item() - 0.01) < 1e-7


def test_max_violation():
    assert max_violation(torch.tensor([4.0, 4.0, 4.0, 4.0])) == 0.0
    assert abs(max_violation(torch.tensor([10.0, 2.0, 2.0, 2.0])) - 1.5) < 1e-6
