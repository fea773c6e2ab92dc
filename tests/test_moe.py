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
    """Every expert on every token, masked by the router's choice, weighted by its gate weight."""
    x_flat = x.reshape(-1, x.size(-1))
    weights, indices, _ = moe.gate(x_flat)
    y = moe.shared_experts(x_flat) if moe.shared_experts is not None else torch.zeros_like(x_flat)
    for i, expert in enumerate(moe.experts):
        w = (weights * (indices == i)).sum(-1, keepdim=True)  # (N, 1), 0 where i is not chosen
        y = y + w * expert(x_flat)
    return y.view_as(x)


@pytest.mark.parametrize("kw", [
    {}, {"score_func": "softmax"}, {"n_shared_experts": 0},
    {"n_routed_experts": 8, "n_expert_groups": 4, "n_limited_groups": 2}, {"route_scale": 2.5}])
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
    cfg, moe = make_moe(tiny, n_routed_experts=8, n_activated_experts=2, n_expert_groups=4,
                        n_limited_groups=1)
    _, idx, _ = moe.gate(torch.randn(200, cfg.dim))
    groups = idx // 2  # 2 experts per group
    assert torch.equal(groups[:, 0], groups[:, 1])  # one allowed group: both experts from it


def test_bias_updates_lower_max_violation(tiny):
    cfg, moe = make_moe(tiny, n_routed_experts=8, n_activated_experts=2)
    x = torch.randn(256, 1, cfg.dim) + 2.0  # a shared offset in the inputs ...
    with torch.no_grad():
        moe.gate.weight[0] = 1.0  # ... that expert 0 (and less so all) reacts to: imbalanced
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
    e = expected.float()
    torch.testing.assert_close(moe.gate.bias, 0.1 * torch.sign(e.mean() - e))
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
    idx = torch.tensor([[[0, 1]], [[2, 3]], [[0, 1]], [[2, 3]]]).view(1, 4, 2)
    assert abs(moe.balance_loss(u, idx).item() - 0.01) < 1e-7


def test_max_violation():
    assert max_violation(torch.tensor([4.0, 4.0, 4.0, 4.0])) == 0.0
    assert abs(max_violation(torch.tensor([10.0, 2.0, 2.0, 2.0])) - 1.5) < 1e-6


def test_padding_counts_in_no_load_and_no_balance_loss(tiny):
    """Loads and the balance loss of a padded batch equal those of its real tokens alone."""
    cfg, moe = make_moe(tiny, balance_loss_alpha=0.01)
    moe.train()
    x = torch.randn(3, 7, cfg.dim)
    lengths = [7, 4, 2]
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]  # (3, 7) right padding
    mask[2] = mask[2].flip(0)  # and one left-padded row
    y, aux = moe(x, mask)
    padded_load = moe.update_bias(speed=0.0)
    expected_aux, expected_load = 0.0, torch.zeros(cfg.n_routed_experts)
    for b in range(3):
        real = x[b][mask[b]].unsqueeze(0)  # (1, n_b, D) the sequence alone, unpadded
        y_b, aux_b = moe(real)
        torch.testing.assert_close(y[b][mask[b]], y_b[0], atol=1e-6, rtol=1e-5)
        expected_aux += aux_b.item() / 3
        expected_load += moe.update_bias(speed=0.0)
    assert torch.equal(padded_load, expected_load)
    assert abs(aux.item() - expected_aux) < 1e-7


def test_padded_model_batch_routes_like_unpadded_sequences(tiny):
    """Through the whole model (MTP module included): a left-padded batch gives the router loads of
    its sequences run alone."""
    import model
    torch.manual_seed(0)
    m = model.Transformer(tiny()).train()
    seqs = [torch.randint(0, 15, (n,)) for n in (6, 3, 5)]
    ids = torch.full((3, 6), 17)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, 6 - len(s):], pad[i, 6 - len(s):] = s, True
    pos = (pad.long().cumsum(1) - 1).clamp_min(0)
    m(ids, ids, pad.float(), positions=pos, pad_mask=pad)  # with targets: the MTP module runs too
    batch = [moe.update_bias(0.0) for moe in m.moe_layers()]
    alone = [torch.zeros_like(b) for b in batch]
    for s in seqs:
        m(s[None], s[None])
        alone = [a + moe.update_bias(0.0) for a, moe in zip(alone, m.moe_layers())]
    for a, b in zip(alone, batch):
        assert torch.equal(a, b)


def test_maxvio_averages_only_layers_that_routed_tokens(tiny):
    """In RL the MTP module does not run (no targets): its MoE layer routes nothing, and must not
    pull the mean MaxVio toward 0."""
    import model
    torch.manual_seed(0)
    # 2 MoE layers + the MTP module's
    m = model.Transformer(tiny(n_layers=3, n_dense_layers=1)).train()
    m(torch.randint(0, 15, (4, 9)))  # no targets: the MTP module does not run
    loads = [moe.load.float().clone() for moe in m.moe_layers() if moe.load is not None]
    assert len(loads) == 2 and len(m.moe_layers()) == 3
    vios = [max_violation(x) for x in loads]
    got = m.update_router_biases()
    assert (abs(got["maxvio_mean"] - sum(vios) / 2) < 1e-6
            and abs(got["maxvio_max"] - max(vios)) < 1e-6)
