import pytest
import torch

import model
from losses import token_logprobs
from model import Transformer
from conftest import tiny_config


def build(seed=0, **kw):
    torch.manual_seed(seed)
    return model.Transformer(tiny_config(**kw))


@pytest.mark.parametrize("kw", [{}, {"attention": "mha"}, {"q_lora_rank": 12},
                                {"n_dense_layers": 0}])
def test_causality(kw):
    m = build(**kw).eval()
    idx = torch.randint(0, 15, (2, 12))
    logits, _ = m(idx)
    for j in (0, 5, 11):
        idx2 = idx.clone()
        idx2[:, j] = (idx2[:, j] + 1) % 15
        logits2, _ = m(idx2)
        # before j: untouched (up to float rounding: MoE batch sizes differ, so do matmul kernels)
        torch.testing.assert_close(logits2[:, :j], logits[:, :j], atol=1e-6, rtol=0)
        assert not torch.allclose(logits2[:, j], logits[:, j])  # at j: the change is seen


def test_rope_eager_and_compiled_equals_the_complex_rotation():
    """RoPE, eager (a complex product) and compiled (real arithmetic, traced here by dynamo's eager
    backend), equals DeepSeek's complex form: each consecutive pair read as a complex number times
    e^{i m theta_j}, computed here from the formula in float64. The input is the rope part of
    wider heads with an odd width (qk_nope_head_dim 3), as a query's is: odd strides."""
    cfg = tiny_config(qk_rope_head_dim=8, max_seq_len=40)
    m = model.Transformer(cfg)
    theta = cfg.rope_theta ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)  # (R/2,)
    positions = torch.randint(0, 40, (3, 7))  # (B, T) ragged positions, as left-padded rows use
    cis = torch.polar(torch.ones(3, 7, 4, dtype=torch.float64), positions[..., None] * theta)
    x = torch.randn(3, 7, 2, 3 + 8)[..., 3:]  # (B, T, H, R), the rope part of (B, T, H, P+R)
    want = torch.view_as_real(torch.view_as_complex(x.double().unflatten(-1, (4, 2)))
                              * cis[:, :, None]).flatten(3)
    for rope in (model.apply_rotary_emb, torch.compile(model.apply_rotary_emb, backend="eager")):
        got = rope(x, m.freqs_cis[positions])
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)


def test_forward_returns_loss_only_with_targets():
    m = build()
    idx = torch.randint(0, 15, (2, 8))
    logits, loss = m(idx)
    assert logits.shape == (2, 8, 18) and loss is None
    logits, loss, hidden = m(idx, idx.roll(-1, 1), return_hidden=True)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert hidden.shape == (2, 8, 32)
    torch.testing.assert_close(m.head(hidden), logits)  # the hidden states are what the head reads


def test_loss_is_masked_ce_plus_mtp_plus_balance():
    m = build(mtp_lambda=0.5, balance_loss_alpha=0.0)
    idx = torch.randint(0, 15, (3, 9))
    targets = torch.randint(0, 15, (3, 9))
    mask = torch.zeros(3, 9)
    mask[:, 4:] = 1
    logits, loss = m(idx, targets, mask)
    # independent CE over the masked positions only
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    ce = -(logp * mask).sum() / mask.sum()
    torch.testing.assert_close(m.loss_parts["ce"], ce)
    torch.testing.assert_close(loss, ce + 0.5 * m.loss_parts["mtp"])
    # targets outside the mask do not matter
    t2 = targets.clone()
    t2[:, :4] = 0
    _, loss2 = m(idx, t2, mask)
    torch.testing.assert_close(loss2, loss)


def test_mtp_target_alignment_on_hand_sequence():
    full = list(range(10, 18))  # t_0..t_7
    idx, targets = full[:-1], full[1:]
    T = len(idx)
    for k in (1, 2, 3):
        hs, es, ts = model.mtp_slices(T, k)
        for pos, (e, t) in enumerate(zip(idx[es], targets[ts])):
            i = range(T)[hs][pos]
            assert e == full[i + k]  # depth k at position i embeds t_{i+k}
            assert t == full[i + k + 1]  # ... and predicts t_{i+k+1}


def test_mtp_prediction_never_sees_its_target():
    """Depth k at position i predicts t_{i+k+1}: changing that token (or later ones) must leave the
    prediction unchanged, while changing t_{i+k} (its input) must change it."""
    m = build(mtp_depth=2).eval()
    idx = torch.randint(0, 15, (2, 10))

    def mtp_logits(x):
        h = m.embed(x)
        freqs = m.freqs_cis[: x.size(1)].unsqueeze(0)
        for layer in m.layers:
            h, _ = layer(h, freqs, None)
        return {k: lg for k, lg, _ in m.mtp_forward(x, h, freqs)}

    base = mtp_logits(idx)
    assert base[1].shape == (2, 9, 18) and base[2].shape == (2, 8, 18)
    i = 3
    for k in (1, 2):
        x = idx.clone()
        x[:, i + k + 1] = (x[:, i + k + 1] + 1) % 15  # the target of position i at depth k
        torch.testing.assert_close(mtp_logits(x)[k][:, i], base[k][:, i], atol=0, rtol=0)
        x = idx.clone()
        x[:, i + k] = (x[:, i + k] + 1) % 15  # its input token
        assert not torch.allclose(mtp_logits(x)[k][:, i], base[k][:, i])


def test_every_parameter_gets_a_gradient():
    """One loss.backward() reaches every parameter. The router bias is a buffer, not a parameter;
    a routed expert that no token chose would get none, so the batch is large enough to use all."""
    m = build(q_lora_rank=12, mtp_depth=2).train()
    idx = torch.randint(0, 18, (8, 16))
    _, loss = m(idx, idx.roll(-1, 1))
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert "layers.1.ffn.gate.bias" not in dict(m.named_parameters())
    assert "layers.1.ffn.gate.bias" in m.state_dict()


def test_seeded_determinism():
    a, b = build(seed=3), build(seed=3)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    idx = torch.randint(0, 18, (4, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for m in (a, b):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        for _ in range(3):
            _, loss = m(idx, idx.roll(-1, 1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            m.update_router_biases()
        losses.append(loss.item())
    assert losses[0] == losses[1]
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(pa, pb) for pa, pb in zip(sa.values(), sb.values()))
    assert not torch.equal(build(seed=4).head.weight, a.head.weight)


@pytest.mark.parametrize("kw,msg", [
    ({"n_activated_experts": 9, "n_routed_experts": 8}, "n_activated_experts"),
    ({"qk_rope_head_dim": 5}, "qk_rope_head_dim must be even"),
    ({"kv_lora_rank": 0}, "kv_lora_rank must be positive"),
    ({"q_lora_rank": -1}, "q_lora_rank must be >= 0"),
    ({"n_dense_layers": 5}, "n_dense_layers"),
    ({"n_routed_experts": 6, "n_expert_groups": 4}, "n_expert_groups"),
    ({"attention": "gqa"}, "attention must be mla or mha"),
    ({"score_func": "relu"}, "score_func"),
    ({"dim": 32.5}, "dim must be an integer"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_config(**kw)


def test_sequence_longer_than_max_seq_len():
    m = build()
    with pytest.raises(ValueError, match="exceeds max_seq_len=32"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_left_padding_with_positions_matches_unpadded():
    """A left-padded row with explicit positions and a pad mask gives the same logits as alone."""
    m = build().eval()
    row = torch.randint(0, 15, (1, 6))
    alone, _ = m(row)
    padded = torch.cat([torch.full((1, 3), 17), row], 1)
    pad_mask = torch.tensor([[False] * 3 + [True] * 6])
    positions = (pad_mask.long().cumsum(1) - 1).clamp_min(0)
    logits, _ = m(padded, positions=positions, pad_mask=pad_mask)
    torch.testing.assert_close(logits[:, 3:], alone, atol=1e-5, rtol=1e-5)


def test_parameter_counts_and_kv_cache_size():
    m = build(mtp_depth=1)
    c = model.param_counts(m)
    assert c["total"] == sum(p.numel() for p in m.parameters())
    per_expert = 3 * 32 * 16
    # one MoE layer, 2 of its 4 experts unused
    assert c["main"] - c["active_per_token"] == (2 - 1) * (4 - 2) * per_expert
    cfg = m.cfg
    assert cfg.kv_cache_elements_per_token() == 16 + 4
    mha = tiny_config(attention="mha")
    assert mha.kv_cache_elements_per_token() == 2 * (8 + 4) + 2 * 8


GROUPS = {"ragged": [0, 0, 0, 1, 2, 2, 2, 2], "equal": [0, 0, 0, 1, 1, 1, 2, 2, 2],
          "shuffled": [2, 0, 1, 2, 0, 2, 2, 0]}


def shared_prefix_case(seed=0, groups="ragged"):
    """Three left-padded prompts of different lengths with continuations of different lengths,
    right-padded: 3, 1 and 4 of them (groups of different sizes), 3 each (GRPO's layout, where the
    rows' group layout is a view), or groups in no order."""
    g = torch.Generator().manual_seed(seed)
    prompts = [[15] + torch.randint(0, 15, (n,), generator=g).tolist() for n in (4, 1, 6)]
    group = torch.tensor(GROUPS[groups])
    conts = [torch.randint(0, 17, (n,), generator=g).tolist()
             for n in (5, 2, 4, 5, 1, 3, 5, 4, 2)[:len(group)]]
    P, L = max(map(len, prompts)), max(map(len, conts))
    prefix = torch.full((3, P), 17)
    prefix_mask = torch.zeros(3, P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        prefix[i, P - len(p):], prefix_mask[i, P - len(p):] = torch.tensor(p), True
    cont = torch.full((len(group), L), 17)
    cont_mask = torch.zeros(len(group), L, dtype=torch.bool)
    for i, c in enumerate(conts):
        cont[i, :len(c)], cont_mask[i, :len(c)] = torch.tensor(c), True
    return prefix, prefix_mask, group, cont, cont_mask


def plain_logprobs(m, prefix, prefix_mask, group, cont, cont_mask):
    """The reference: one ordinary forward over each full `prompt + continuation` row."""
    ids = torch.cat([prefix[group], cont], 1)
    mask = torch.cat([prefix_mask[group], cont_mask], 1)
    logits, _ = m(ids, positions=(mask.long().cumsum(1) - 1).clamp_min(0), pad_mask=mask)
    P = prefix.size(1)
    return token_logprobs(logits[:, P - 1:-1], cont) * cont_mask


@pytest.mark.parametrize("kw", [{}, {"attention": "mha"}, {"n_dense_layers": 2},
                                {"attention": "mha", "n_dense_layers": 2}, {"q_lora_rank": 12}])
@pytest.mark.parametrize("groups", GROUPS)
def test_shared_prefix_forward_equals_the_plain_forward(tiny, kw, groups):
    """Each prompt run once for its continuations, their queries attending to its keys batched per
    group and to their own keys apart (merged by log-sum-exp): the same log-probs as a plain forward
    of every `prompt + continuation` (1e-5), and the same gradients (1e-4 relative)."""
    torch.manual_seed(0)
    m = Transformer(tiny(**kw))
    case = shared_prefix_case(groups=groups)
    want = plain_logprobs(m, *case)
    want.sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    prefix, prefix_mask, group, cont, cont_mask = case
    logits, _ = m.forward_shared_prefix(prefix, prefix_mask, group, cont, cont_mask)
    got = token_logprobs(logits, cont) * cont_mask
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert set(grads) == {n for n, p in m.named_parameters() if p.grad is not None}
    for n, p in m.named_parameters():
        if n in grads:
            atol = 1e-4 * grads[n].abs().max().item() + 1e-7
            torch.testing.assert_close(p.grad, grads[n], atol=atol, rtol=1e-4, msg=n)
