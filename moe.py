"""DeepSeekMoE: fine-grained routed + always-on shared experts, with aux-loss-free balancing.

- Fine-grained routed experts and shared experts (DeepSeekMoE, arXiv 2401.06066, section 3).
- Sigmoid gating with top-k selection, gate weights normalised over the selected experts and scaled
  by `route_scale`; softmax gating as an option (DeepSeek-V2) (DeepSeek-V3, arXiv 2412.19437,
  eq. 12-15).
- Group-limited routing: keep the `n_limited_groups` best of `n_expert_groups` groups
  (V2 2.1.3, V3).
- Auxiliary-loss-free load balancing: a per-expert bias, outside the gradient, added to the scores
  for the top-k selection only; after each optimiser step `b_i += gamma * sign(mean(load) - load_i)`
  (V3 2.1.2, eq. 16; Wang et al. arXiv 2408.15664).
- Complementary sequence-wise balance loss `alpha * sum_i f_i P_i` (V3 eq. 17-20).
- Per-expert load counts for logging, with MaxVio (arXiv 2408.15664, eq. 4).

Shape legend: B batch, T time, D dim, N = B*T tokens, E routed experts, K activated experts,
G expert groups, F expert hidden width.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """SwiGLU FFN `w2(silu(w1 x) * w3 x)`: the dense FFN, each expert, and the shared experts."""

    def __init__(self, dim, inter_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """Router: scores `s = sigmoid(x W^T)`, selection `topk(s + b)`, weights from the unbiased s."""

    def __init__(self, cfg):
        super().__init__()
        self.topk, self.n_groups, self.topk_groups = (cfg.n_activated_experts, cfg.n_expert_groups,
                                                      cfg.n_limited_groups)
        self.score_func, self.route_scale = cfg.score_func, cfg.route_scale
        self.weight = nn.Parameter(torch.randn(cfg.n_routed_experts, cfg.dim) * 0.02)
        # The balancing bias is state, not a parameter: the optimiser never sees it. Persistent, so
        # it is saved in checkpoints with the weights.
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x):  # x: (N, D)
        scores = F.linear(x, self.weight).float()  # (N, E)
        scores = scores.sigmoid() if self.score_func == "sigmoid" else scores.softmax(dim=-1)
        biased = scores + self.bias  # (N, E) used only to choose experts
        if self.n_groups > 1:
            grouped = biased.view(x.size(0), self.n_groups, -1)  # (N, G, E/G)
            # V3 scores a group by the sum of its two best biased scores; V2 (softmax) by its best.
            group_scores = (grouped.topk(2, dim=-1)[0].sum(-1) if self.score_func == "sigmoid"
                            else grouped.amax(-1))  # (N, G)
            keep = group_scores.topk(self.topk_groups, dim=-1)[1]  # (N, G')
            group_mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(
                1, keep, False)  # (N, G) True = dropped
            biased = grouped.masked_fill(
                group_mask.unsqueeze(-1), float("-inf")).flatten(1)  # (N, E)
        indices = biased.topk(self.topk, dim=-1)[1]  # (N, K)
        weights = scores.gather(1, indices)  # (N, K) unbiased: the bias never reaches the output
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights * self.route_scale).type_as(x), indices, scores


class MoE(nn.Module):
    """Routed experts (top-k of E, weighted) + shared experts (always on). No token dropping."""

    def __init__(self, cfg):
        super().__init__()
        self.n_routed_experts, self.n_activated_experts = (cfg.n_routed_experts,
                                                           cfg.n_activated_experts)
        self.alpha = cfg.balance_loss_alpha
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(MLP(cfg.dim, cfg.moe_inter_dim)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = (MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim)
                               if cfg.n_shared_experts > 0 else None)
        # Tokens routed to each expert since the last bias update (training forwards only). A plain
        # attribute, not a buffer: DDP would overwrite buffers with rank 0's before every forward.
        self.load = None
        self.last_indices = None

    def forward(self, x, token_mask=None):
        """x: (B, T, D); token_mask: (B, T) bool, False for padding (None: every token is real).
        -> (y (B, T, D), sequence-wise balance loss (scalar)). Padding is routed like any token (its
        output is never read) but counts neither in the loads nor in the balance loss.
        Dispatch: sort the N*K (token, expert) choices by expert once, gather the tokens in that
        order, run each expert on its contiguous chunk, weight, and add every output back to its
        token."""
        B, T, D = x.shape
        x_flat = x.reshape(-1, D)  # (N, D)
        weights, indices, scores = self.gate(x_flat)  # (N, K), (N, K), (N, E)
        flat = indices.flatten()  # (N*K,) the expert of each choice
        order = flat.argsort(stable=True)  # (N*K,) choices grouped by expert
        token = order // indices.size(1)  # (N*K,) the token of each sorted choice
        # Counts by index_add, not bincount: a static shape, so a compiled forward does not break
        counts = flat.new_zeros(self.n_routed_experts).index_add_(
            0, flat, torch.ones_like(flat))  # (E,) choices per expert
        out = self.run_experts(x_flat.index_select(0, token), counts)  # (N*K, D)
        y = x_flat.new_zeros(x_flat.shape).index_add_(
            0, token, out * weights.flatten()[order, None])  # (N, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_flat)
        self.last_indices = indices.view(B, T, -1)  # to log routing flips between forwards (RL)
        aux = x.new_zeros((), dtype=torch.float32)
        if self.training:
            if token_mask is None:
                load = counts  # (E,) every token is real
            else:  # (E,) real tokens only: each choice counts 1 if its token is real, else 0
                real = token_mask.reshape(-1, 1).long().expand_as(indices).flatten()  # (N*K,)
                load = flat.new_zeros(self.n_routed_experts).index_add_(0, flat, real)
            self.load = load if self.load is None else self.load + load
            if self.alpha > 0:
                aux = self.balance_loss(scores.view(B, T, -1), indices.view(B, T, -1), token_mask)
        return y.view(B, T, D), aux

    @torch.compiler.disable  # chunks of data-dependent sizes: eager, never recompiled per size
    def run_experts(self, x_sorted, counts):
        """Each expert on its contiguous chunk of the choices sorted by expert, x_sorted (N*K, D),
        counts (E,) their sizes: (N*K, D)."""
        chunks = x_sorted.split(counts.tolist())  # E chunks of (n_e, D)
        return torch.cat([self.experts[e](c) for e, c in enumerate(chunks) if len(c)])

    def balance_loss(self, scores, indices, token_mask=None):
        """Complementary sequence-wise balance loss (V3 eq. 17-20), averaged over sequences:
            L = alpha * sum_i f_i * P_i,
            f_i = E / (K T) * sum_t 1[expert i in top-k of token t]   (no gradient),
            P_i = 1/T * sum_t s'_{i,t},   s'_{i,t} = s_{i,t} / sum_j s_{j,t}.
        scores: (B, T, E) unbiased router scores; indices: (B, T, K); token_mask: (B, T), False for
        padding: t runs over a sequence's real tokens only and T is their count."""
        B, T, E = scores.shape
        real = (scores.new_ones(B, T, 1) if token_mask is None
                else token_mask.float().view(B, T, 1))  # (B, T, 1)
        n_real = real.sum(1).clamp_min(1.0)  # (B, 1)
        chosen = torch.zeros_like(scores).scatter_(2, indices, 1.0) * real  # (B, T, E)
        f = chosen.sum(1) * E / (self.n_activated_experts * n_real)  # (B, E)
        P = (scores / scores.sum(-1, keepdim=True) * real).sum(1) / n_real  # (B, E)
        return self.alpha * (f * P).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, speed):
        """Aux-loss-free balancing, after an optimiser step:
        b_i += speed * sign(mean(load) - load_i). In DDP the loads are summed over ranks first, so
        every rank applies the same update.
        Returns the step's load (E,) as float, for logging (all zeros if the layer routed no token,
        as the MTP module's in a forward without targets)."""
        load = torch.zeros_like(self.gate.bias) if self.load is None else self.load.float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        self.gate.bias += speed * torch.sign(load.mean() - load)
        self.load = None
        return load


def max_violation(load):
    """MaxVio = (max_i load_i - mean load) / mean load (0 = perfectly balanced)."""
    mean = load.float().mean()
    return ((load.float().max() - mean) / mean.clamp_min(1e-9)).item()


class RouteRecorder:
    """While active, records the experts every MoE layer of a model's main blocks chose for each
    token of each forward (with which tokens were real), through forward hooks. Two recordings of
    the same forwards, pi_old's scoring and the update's, give the fraction of routing decisions
    that flipped between them: the importance ratio of an RL update then compares two differently
    routed networks (a known instability of RL on MoE models)."""

    def __init__(self, model):
        self.layers = [layer.ffn for layer in model.layers if isinstance(layer.ffn, MoE)]
        self.routes = []  # (indices (B, T, K), real tokens (B, T) bool) per MoE call, in order

    def __enter__(self):
        self.hooks = [m.register_forward_hook(self._record) for m in self.layers]
        return self

    def _record(self, module, args, output):
        indices = module.last_indices  # (B, T, K)
        real = (args[1] if len(args) > 1 and args[1] is not None
                else indices.new_ones(indices.shape[:2]))
        self.routes.append((indices, real.bool()))

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()

    def flipped_fraction(self, before):
        """The fraction of real tokens' routing decisions (token x layer) whose expert set differs
        from `before`'s recording of the same forwards (this one may repeat them: several passes
        over one rollout). 0 when either recorded nothing."""
        if not before.routes or not self.routes:
            return 0.0
        flips = total = 0
        for i, (after, real) in enumerate(self.routes):
            old = before.routes[i % len(before.routes)][0]
            flips += int(((old.sort(-1)[0] != after.sort(-1)[0]).any(-1) & real).sum())
            total += int(real.sum())
        return flips / max(total, 1)
