"""Every loss and estimator as a pure function of tensors and masks.

- `token_logprobs`: the one log-prob helper every algorithm uses.
- `grpo_advantages`: group-relative outcome advantages (DeepSeekMath, arXiv 2402.03300, 4.1.2),
  with Dr. GRPO's unscaled variant (arXiv 2503.20783) and batch-level scaling.
- `process_advantages`: process supervision (DeepSeekMath section 4.1.3).
- `kl_k1`, `kl_k3`: per-token KL estimators (Schulman, "Approximating KL divergence", 2020).
- `grpo_loss`: the clipped surrogate with a k3 KL penalty (DeepSeekMath eq. 3), with the
  `loss_type` aggregations grpo / dapo (arXiv 2503.14476) / dr_grpo and DAPO's clip-higher.
- `sequence_logprobs`: a sequence's summed (or length-averaged) completion log-prob.
- `dpo_loss` (DPO, arXiv 2305.18290, eq. 7; label smoothing = cDPO / robust DPO), `ipo_loss`
  (IPO, arXiv 2310.12036, eq. 17), `simpo_loss` (SimPO, arXiv 2405.14734, eq. 6),
  `bradley_terry_loss` (the reward model's pairwise loss, InstructGPT arXiv 2203.02155 eq. 1).
- `distill_loss`: soft-target distillation (Hinton et al., arXiv 1503.02531), forward or reverse
  KL (the mode-seeking direction, arXiv 2306.08543).
- PPO for language models (InstructGPT; Ziegler et al. arXiv 1909.08593): `token_rewards` (a k1 KL
  penalty on every token, the score on the last one), `gae` (arXiv 1506.02438 eq. 16),
  `ppo_policy_loss` (the clipped surrogate, arXiv 1707.06347 eq. 7), `value_loss` (clipped),
  `AdaptiveKLController` / `FixedKLController` (Ziegler et al. section 2.2).

Shape legend: B batch (sequences or preference pairs), N = B*G sequences in groups of G,
T completion time, V vocabulary.
"""
import torch
import torch.nn.functional as F


def token_logprobs(logits, targets):
    """log pi(target_t | context_<=t) for every position.

    logits: (B, T, V) where logits[:, t] predicts targets[:, t]; targets: (B, T) -> (B, T) float32.
    (The caller aligns them: for a sequence x, logits[:, :-1] predict x[:, 1:].)"""
    B, T, V = logits.shape
    flat = logits.float().reshape(B * T, V)  # (B*T, V)
    return -F.cross_entropy(flat, targets.reshape(B * T), reduction="none").view(B, T)


def grpo_advantages(rewards, num_generations, scale_rewards="group", eps=1e-4, unbiased_std=False):
    """Outcome-supervised group-relative advantages (DeepSeekMath section 4.1.2):

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)        scale_rewards="group"
        A_i = (r_i - mean(r_group)) / (std(r_all) + eps)          scale_rewards="batch"
        A_i =  r_i - mean(r_group)                                scale_rewards="none" (Dr. GRPO)

    rewards: (N,) ordered as N/G contiguous groups of G = num_generations -> (N,) float32.
    std is the population std (1/G, as DeepSeekMath writes it) unless unbiased_std (1/(G-1), as
    TRL).
    A group whose rewards are all equal gets advantages of exactly 0 (never noise / eps)."""
    G = num_generations
    assert rewards.ndim == 1 and rewards.numel() % G == 0, (
        f"{rewards.numel()} rewards do not split into groups of {G}")
    r = rewards.float().view(-1, G)  # (N/G, G)
    centred = r - r.mean(dim=1, keepdim=True)  # (N/G, G)
    flat = (r.amax(1, keepdim=True) == r.amin(1, keepdim=True))  # (N/G, 1) zero-variance groups
    centred = centred.masked_fill(flat, 0.0)  # the mean of equal floats can differ from them
    if scale_rewards == "group":
        std = (r.std(dim=1, keepdim=True, unbiased=unbiased_std) if G > 1
               else torch.zeros_like(r[:, :1]))
        adv = centred / (std + eps)
    elif scale_rewards == "batch":
        std = r.flatten().std(unbiased=unbiased_std) if r.numel() > 1 else r.new_zeros(())
        adv = centred / (std + eps)
    elif scale_rewards == "none":
        adv = centred
    else:
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale_rewards!r}")
    return adv.flatten()


def process_advantages(step_rewards, step_ends, num_generations, length, eps=1e-4,
                       unbiased_std=False):
    """Process-supervised advantages (DeepSeekMath section 4.1.3). For output i with steps j ending
    at token index(j) and step rewards r_i^index(j):

        r~ = (r - mean(R)) / (std(R) + eps),    R = every step reward of every output in the group
        A_{i,t} = sum over steps j of o_i with index(j) >= t of r~_i^index(j)

    step_rewards, step_ends: lists (one per output, N = B*G of them, groups contiguous) of lists of
    floats / token indices into the completion. Returns (N, length) float32. Tokens after the last
    step's end (the end token) get 0, as the formula gives. A group whose step rewards are all equal
    gets 0 everywhere."""
    G, N = num_generations, len(step_rewards)
    assert N % G == 0 and len(step_ends) == N, f"{N} outputs do not split into groups of {G}"
    adv = torch.zeros(N, length)
    for g in range(0, N, G):
        flat = torch.tensor([r for rs in step_rewards[g:g + G] for r in rs], dtype=torch.float32)
        if flat.numel() == 0 or flat.max() == flat.min():
            continue
        std = flat.std(unbiased=unbiased_std) if flat.numel() > 1 else flat.new_zeros(())
        mean = flat.mean()
        for i in range(g, g + G):
            for r, end in zip(step_rewards[i], step_ends[i]):
                # reaches every t <= index(j)
                adv[i, :min(end, length - 1) + 1] += (r - mean) / (std + eps)
    return adv


def kl_k1(logp, ref_logp):
    """k1 = log pi - log pi_ref per token: unbiased for KL(pi || pi_ref) when tokens come from pi,
    can be negative. Used as a per-token reward penalty (PPO / InstructGPT), not differentiated."""
    return logp - ref_logp


def kl_k3(logp, ref_logp):
    """k3 = pi_ref/pi - log(pi_ref/pi) - 1 per token (DeepSeekMath eq. 4): >= 0, unbiased for
    KL(pi || pi_ref) under samples from pi, lower variance than k1 (Schulman 2020). Differentiated
    in the loss, as GRPO does, its expected gradient under samples from pi is that of
    KL(pi_ref || pi), not of KL(pi || pi_ref) (tests/test_losses.py measures both), and samples from
    pi_old add more bias. It still pulls pi toward pi_ref; for the exact reverse-KL gradient use k1
    as a reward penalty (PPO)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_aggregation(mask, loss_type, max_completion_len=None):
    """How GRPO sums its per-token losses l_{i,t}, and what it divides the sum by:
        grpo    : sum_i 1/|o_i| sum_t l_{i,t}  /  N                (DeepSeekMath eq. 3)
        dapo    : sum_{i,t} l_{i,t}            /  sum_i |o_i|      (arXiv 2503.14476)
        dr_grpo : sum_{i,t} l_{i,t}            /  N * max length   (arXiv 2503.20783)
    mask: (N, T); N counts the rows left in. Returns (|o_i| (N,) or None, the denominator)."""
    kept = mask.any(1).sum().float()
    if loss_type == "grpo":
        return mask.sum(1).clamp_min(1.0), kept
    if loss_type == "dapo":
        return None, mask.sum()
    if loss_type == "dr_grpo":
        return None, kept * (max_completion_len or mask.size(1))
    raise ValueError(f"loss_type must be grpo, dapo or dr_grpo, got {loss_type!r}")


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, epsilon=0.2, epsilon_high=None,
              beta=0.04, loss_type="grpo", denominator=None, logits=None):
    """GRPO's clipped surrogate with a k3 KL penalty (DeepSeekMath eq. 3), to be minimised:
        rho_t = exp(logp_t - old_logp_t)
        l_t   = -[ min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps_high) A_t) - beta k3_t ]
    aggregated by loss_type over a denominator: the whole step's for a split batch, else this
    batch's. logp, old_logp, ref_logp, mask: (N, T); advantages: (N,) or (N, T)."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.float()
    adv = advantages.unsqueeze(1) if advantages.ndim == 1 else advantages  # (N, 1) or (N, T)
    ratio = torch.exp(logp - old_logp)  # (N, T)
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + eps_high) * adv)
    kl = kl_k3(logp, ref_logp)  # (N, T)
    per_token = -(surrogate - beta * kl) * mask  # (N, T)
    lengths, own = grpo_aggregation(mask, loss_type)  # own: this batch's denominator
    if lengths is not None:  # grpo: each sequence's mean first
        per_token = per_token.sum(1) / lengths  # (N,)
    loss = per_token.sum() / (own if denominator is None else denominator)
    return loss, grpo_stats(ratio, adv, kl, mask, epsilon, eps_high, logits)


@torch.no_grad()
def grpo_stats(ratio, adv, kl, mask, epsilon, eps_high, logits=None):
    """GRPO's diagnostics over the masked tokens: how often each clip bound binds (the low one for
    A < 0, the high one for A > 0), the mean k3 KL and ratio, and given the logits (N, T, V) the
    mean entropy. With one update per rollout (num_iterations = num_minibatches = 1) rho = 1 and
    clipping never binds (only its gradient matters); later minibatches or passes see rho != 1."""
    n_tok, adv = mask.sum().clamp_min(1.0), adv.expand_as(ratio)
    low = ((ratio < 1 - epsilon) & (adv < 0)).float()
    high = ((ratio > 1 + eps_high) & (adv > 0)).float()
    stats = {"clip_low": (low * mask).sum() / n_tok, "clip_high": (high * mask).sum() / n_tok,
             "kl": (kl * mask).sum() / n_tok, "ratio": (ratio * mask).sum() / n_tok}
    if logits is not None:
        stats["entropy"] = (entropy(logits) * mask).sum() / n_tok
    return {k: v.item() for k, v in stats.items()}


def entropy(logits):
    """The entropy of each position's distribution, H = -sum_v p_v log p_v: (N, T, V) -> (N, T)."""
    logp = F.log_softmax(logits.float(), -1)  # (N, T, V)
    return -(logp.exp() * logp).sum(-1)


# ----------------------------------------------------------------------------------------------
# Preference losses: DPO and its variants, and the reward model's Bradley-Terry loss


def sequence_logprobs(token_logps, mask, average=False):
    """log pi(y | x) = sum_t log pi(y_t | x, y_<t) over the completion tokens (mask 1), or the mean
    over them with average=True (length-normalised: 1/|y| log pi(y | x)).
    token_logps, mask: (B, T) -> (B,)."""
    mask = mask.float()
    total = (token_logps * mask).sum(-1)  # (B,)
    return total / mask.sum(-1).clamp_min(1.0) if average else total


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta=0.1, label_smoothing=0.0):
    """DPO (Rafailov et al., arXiv 2305.18290, eq. 7), with conservative label smoothing (cDPO,
    Mitchell 2023; robust DPO, arXiv 2403.00409) when label_smoothing = e > 0:

        h    = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
        loss = -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)

    Implicit rewards (detached): beta (log pi(y_w) - log ref(y_w)) and
    beta (log pi(y_l) - log ref(y_l)).
    At pi = ref, h = 0 and the loss is exactly ln 2 for any e. e = 0.5 makes the loss symmetric in h
    (smallest at h = 0): no preference is learned.
    Inputs are sequence log-probs (B,) (summed; average them for length-normalised DPO).
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,))."""
    chosen = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen - rejected
    losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h)
              - label_smoothing * F.logsigmoid(-beta * h))
    return losses, beta * chosen.detach(), beta * rejected.detach()


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta=0.1):
    """IPO (Azar et al., arXiv 2310.12036, eq. 17): regress the log-ratio margin onto a fixed target
    instead of pushing it to infinity:

        h    = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
        loss = (h - 1 / (2 beta))^2

    Feed it length-AVERAGED log-probs (sequence_logprobs(..., average=True)): with sums, the target
    1/(2 beta) means a different per-token margin for every length. Here beta is the
    paper's tau (the regularisation strength). Returns (losses (B,), chosen_rewards (B,),
    rejected_rewards (B,)), the rewards beta (log pi - log ref), detached, as for DPO."""
    chosen = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected = policy_rejected_logps - ref_rejected_logps  # (B,)
    losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    return losses, beta * chosen.detach(), beta * rejected.detach()


def simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
               beta=2.0, gamma=0.5):
    """SimPO (Meng et al., arXiv 2405.14734, eq. 6): no reference model; the implicit reward is the
    length-averaged log-prob, with a target margin gamma:

        loss = -log sigmoid(beta / |y_w| log pi(y_w) - beta / |y_l| log pi(y_l) - gamma)

    policy_*_logps: SUMMED sequence log-probs (B,); *_lengths: completion token counts (B,).
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), the rewards
    beta / |y| log pi(y), detached."""
    chosen = beta * policy_chosen_logps / chosen_lengths  # (B,)
    rejected = beta * policy_rejected_logps / rejected_lengths  # (B,)
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return losses, chosen.detach(), rejected.detach()


def bradley_terry_loss(r_chosen, r_rejected, margin=0.0):
    """Pairwise reward-model loss from the Bradley-Terry model P(y_w > y_l) = sigmoid(r_w - r_l)
    (InstructGPT, arXiv 2203.02155, eq. 1; a margin as in Llama 2, arXiv 2307.09288, eq. 2):

        loss = mean over pairs of -log sigmoid(r(x, y_w) - r(x, y_l) - margin)

    r_chosen, r_rejected: (B,) scalar rewards -> scalar loss."""
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


# ----------------------------------------------------------------------------------------------
# PPO: per-token rewards, GAE, the clipped policy and value losses, the KL controllers


def distill_loss(student_logits, teacher_logits, targets, mask, alpha=0.5, tau=1.0,
                 kl="forward", num_tokens=None):
    """Soft-target distillation (Hinton et al. 2015, arXiv 1503.02531), per token t of the
    completion, p = softmax(z_teacher / tau), q = softmax(z_student / tau):

        l_t = alpha * CE(softmax(z_student), y_t) + (1 - alpha) * tau^2 * KL_t
        KL_t = KL(p || q) = sum_v p_v (log p_v - log q_v)       kl="forward" (Hinton's)
             = KL(q || p) = sum_v q_v (log q_v - log p_v)       kl="reverse" (mode-seeking,
                                                                  MiniLLM, arXiv 2306.08543)
        L = sum_t mask_t l_t / sum_t mask_t                     (the token mean, over the batch)

    tau^2 keeps the soft term's gradient the size of the hard one's as tau changes. logits (B, T,
    V), the teacher's detached here; targets (B, T) the hard next tokens; mask (B, T). num_tokens:
    the divisor in place of sum_t mask_t (a micro-batch's share of a whole step's mean). Returns
    (L, {"ce", "kl"}: their token means)."""
    teacher_logits = teacher_logits.detach()
    ce = -token_logprobs(student_logits, targets)  # (B, T), at tau = 1
    log_q = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    if kl == "forward":
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, T)
    elif kl == "reverse":
        per_token = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        raise ValueError(f"kl must be forward or reverse, not {kl!r}")
    n = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    ce_mean, kl_mean = (ce * mask).sum() / n, (per_token * mask).sum() / n
    loss = alpha * ce_mean + (1 - alpha) * tau ** 2 * kl_mean
    return loss, {"ce": ce_mean.item(), "kl": kl_mean.item()}


def masked_mean(x, mask, normalizer=None):
    """sum(x * mask) / sum(mask), or / normalizer: the whole step's token count when a batch is
    split into micro-batches or over ranks, so that the summed gradients equal the whole batch's."""
    mask = mask.float()
    return (x * mask).sum() / (mask.sum().clamp_min(1.0) if normalizer is None else normalizer)


def token_rewards(scores, logp, ref_logp, mask, kl_coef):
    """The per-token reward of PPO for language models (Ziegler et al. 2019, eq. 2; InstructGPT
    eq. 2):

        r_t = -kl_coef * (log pi(o_t) - log pi_ref(o_t))             on every completion token
            + score(q, o) on the last completion token (the end token)

    The KL term is the k1 estimator (Schulman 2020): in the reward it is not differentiated, and
    its expectation under samples from pi is KL(pi || pi_ref). scores: (N,); logp, ref_logp, mask:
    (N, T) with mask 1 on a prefix of each row. Padding gets 0 and never the score."""
    mask = mask.float()
    rewards = -kl_coef * kl_k1(logp, ref_logp) * mask  # (N, T)
    last = (mask.sum(1).long() - 1).clamp_min(0)  # (N,) index of each row's last real token
    return rewards.scatter_add(1, last[:, None], (scores.float() * (mask.sum(1) > 0))[:, None])


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016, arXiv 1506.02438, eq. 16):

        delta_t = r_t + gamma V_{t+1} - V_t,     V after a row's last real token = 0
        A_t     = delta_t + gamma lam A_{t+1}
        returns = A + V                          (the value targets)

    rewards, values, mask: (N, T) over completion tokens, mask 1 on a prefix of each row. Returns
    (advantages, returns), both 0 on padding. gamma = lam = 1 gives the Monte-Carlo return minus
    V."""
    mask = mask.float()
    N, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value, next_adv = rewards.new_zeros(N), rewards.new_zeros(N)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (N,)
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]  # padding: 0, and nothing back
        advantages[:, t] = next_adv
        next_value = values[:, t] * mask[:, t]
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logp, old_logp, advantages, mask, epsilon=0.2, normalizer=None):
    """PPO's clipped surrogate (Schulman et al. 2017, arXiv 1707.06347, eq. 7), to be minimised:

        rho_t = exp(log pi(o_t) - log pi_old(o_t))
        loss  = -masked mean of min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)

    logp, old_logp, advantages, mask: (N, T). Returns (loss, ppo_stats)."""
    ratio = torch.exp(logp - old_logp)  # (N, T)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    loss = -masked_mean(torch.min(ratio * advantages, clipped * advantages), mask, normalizer)
    return loss, ppo_stats(logp, old_logp, ratio, mask, epsilon)


def value_loss(values, old_values, returns, mask, clip_range=0.2, normalizer=None):
    """The critic's clipped value loss (OpenAI baselines' PPO2, as InstructGPT-style trainers use
    it):

        V_clip = V_old + clip(V - V_old, -c, c)
        loss   = masked mean of 0.5 * max((V - R)^2, (V_clip - R)^2)

    values, old_values, returns, mask: (N, T). Returns (loss, metrics): value_clip_frac (tokens
    where the clipped term is the larger one)."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_sq, clipped_sq = (values - returns) ** 2, (clipped - returns) ** 2
    loss = masked_mean(0.5 * torch.max(unclipped_sq, clipped_sq), mask, normalizer)
    return loss, {"value_clip_frac": masked_mean((clipped_sq > unclipped_sq).float(), mask).item()}


@torch.no_grad()
def ppo_stats(logp, old_logp, ratio, mask, epsilon):
    """PPO's diagnostics over the masked tokens: clip_frac (the ratio left the clip range),
    approx_kl (the k3 estimate of KL(pi_old || pi)) and the mean ratio."""
    log_ratio = logp - old_logp
    return {"clip_frac": masked_mean(((ratio - 1).abs() > epsilon).float(), mask).item(),
            "approx_kl": masked_mean(torch.exp(log_ratio) - 1 - log_ratio, mask).item(),
            "ratio": masked_mean(ratio, mask).item()}


class FixedKLController:
    """A constant KL coefficient, with the adaptive controller's interface."""

    def __init__(self, kl_coef):
        self.value = kl_coef

    def update(self, current_kl, n_steps):
        pass

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019 (arXiv 1909.08593, section 2.2): steer the KL to pi_ref toward a target,

        e = clip(KL / target - 1, -0.2, 0.2),     kl_coef <- kl_coef * (1 + e * n_steps / horizon)

    current_kl: the measured KL per sequence; n_steps: samples since the last update."""

    def __init__(self, init_kl_coef, target, horizon):
        super().__init__(init_kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, current_kl, n_steps):
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
