"""A small DeepSeek-V3-style transformer.

- RMSNorm, pre-norm blocks, untied embedding and output head.
- Decoupled RoPE on the rope part of queries and keys only; consecutive pairs rotate together, as in
  DeepSeek's complex view (DeepSeek-V2, arXiv 2405.04434, section 2.1.3).
- Multi-head Latent Attention (V2 2.1.2): low-rank KV compression `wkv_a -> kv_norm -> wkv_b`,
  optional low-rank query `wq_a -> q_norm -> wq_b`, one rope key shared across heads.
  Inference caches only the latent `c_kv` and the rope key `k_pe`; the `absorbed` decode folds
  `wkv_b` into the query and the output and attends in the latent space (V2 section 2.1.2, end).
- Plain multi-head attention (`attention="mha"`), only to compare KV-cache size and quality.
- Dense SwiGLU FFN in the first `n_dense_layers` blocks, DeepSeekMoE (moe.py) in the rest.
- Multi-Token Prediction (DeepSeek-V3, arXiv 2412.19437, section 2.2): `mtp_depth` sequential
  modules sharing the embedding and the output head; loss weighted by `mtp_lambda`.

Shape legend: B batch, T query time, S key time (cache length), D dim, H heads, V vocabulary,
C kv_lora_rank, R qk_rope_head_dim, P qk_nope_head_dim, E v_head_dim.
"""
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import token_logprobs
from moe import MLP, MoE, max_violation


@dataclass
class ModelConfig:
    vocab_size: int = 18  # tasks.Tokenizer().vocab_size
    dim: int = 128  # model width
    inter_dim: int = 384  # hidden width of the dense SwiGLU FFN
    moe_inter_dim: int = 64  # a routed expert's hidden width (shared: n_shared_experts x this)
    n_layers: int = 4  # transformer blocks in the main model
    n_dense_layers: int = 2  # the first blocks use a dense FFN, the rest MoE
    n_heads: int = 4  # attention heads
    q_lora_rank: int = 0  # rank of the query compression (0 = plain wq)
    kv_lora_rank: int = 32  # C: width of the cached KV latent c_kv
    qk_nope_head_dim: int = 32  # P: per-head query/key width without RoPE
    qk_rope_head_dim: int = 16  # R: per-head query / shared key width with RoPE (even)
    v_head_dim: int = 32  # per-head value width
    n_routed_experts: int = 8  # routed experts per MoE layer
    n_shared_experts: int = 1  # always-on shared experts per MoE layer
    n_activated_experts: int = 2  # routed experts each token uses (top-k)
    n_expert_groups: int = 1  # expert groups for group-limited routing (1 = off)
    n_limited_groups: int = 1  # groups each token may route to
    score_func: str = "sigmoid"  # router scores: sigmoid (V3) or softmax (V2)
    route_scale: float = 1.0  # scale of the routed experts' gate weights
    rope_theta: float = 100.0  # RoPE base (DeepSeek: 10000; 100 resolves a 64-token window better)
    max_seq_len: int = 64  # longest sequence (prompt + completion + special tokens)
    mtp_depth: int = 1  # multi-token prediction modules (0 = off)
    mtp_lambda: float = 0.3  # weight of the MTP loss
    bias_update_speed: float = 0.001  # gamma of the aux-loss-free bias update
    balance_loss_alpha: float = 1e-4  # alpha of the sequence-wise balance loss (0 = off)
    attention: str = "mla"  # mla, or mha (plain multi-head attention, for comparison only)
    norm_eps: float = 1e-6  # RMSNorm epsilon

    def __post_init__(self):
        errors = []
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in (int, "int") and (not isinstance(v, int) or isinstance(v, bool)):
                errors.append(f"{f.name} must be an integer, got {v!r}")
        if errors:
            raise ValueError("; ".join(errors))
        positive = ["vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads",
                    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                    "n_routed_experts", "n_activated_experts", "n_expert_groups",
                    "n_limited_groups", "max_seq_len"]
        errors += [f"{n} must be positive, got {getattr(self, n)}"
                   for n in positive if getattr(self, n) <= 0]
        nonneg = ["q_lora_rank", "n_shared_experts", "mtp_depth", "mtp_lambda", "bias_update_speed",
                  "balance_loss_alpha"]
        errors += [f"{n} must be >= 0, got {getattr(self, n)}"
                   for n in nonneg if getattr(self, n) < 0]
        if self.qk_rope_head_dim % 2:
            errors.append("qk_rope_head_dim must be even (RoPE rotates pairs), "
                          f"got {self.qk_rope_head_dim}")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            errors.append(f"n_dense_layers must be in [0, n_layers={self.n_layers}], "
                          f"got {self.n_dense_layers}")
        if self.n_activated_experts > self.n_routed_experts:
            errors.append(f"n_activated_experts ({self.n_activated_experts}) > "
                          f"n_routed_experts ({self.n_routed_experts})")
        if self.n_expert_groups > 0 and self.n_routed_experts % self.n_expert_groups:
            errors.append(f"n_routed_experts ({self.n_routed_experts}) must divide into "
                          f"n_expert_groups ({self.n_expert_groups})")
        elif self.n_expert_groups > 1:
            if self.n_limited_groups > self.n_expert_groups:
                errors.append(f"n_limited_groups ({self.n_limited_groups}) > "
                              f"n_expert_groups ({self.n_expert_groups})")
            per_group = self.n_routed_experts // self.n_expert_groups
            if self.score_func == "sigmoid" and per_group < 2:
                errors.append("group-limited sigmoid routing scores a group by its top-2 experts: "
                              "need >= 2 experts per group")
            if self.n_activated_experts > self.n_limited_groups * per_group:
                errors.append(f"n_activated_experts ({self.n_activated_experts}) > experts in the "
                              f"{self.n_limited_groups} allowed groups")
        if self.score_func not in ("sigmoid", "softmax"):
            errors.append(f"score_func must be sigmoid or softmax, got {self.score_func!r}")
        if self.attention not in ("mla", "mha"):
            errors.append(f"attention must be mla or mha, got {self.attention!r}")
        if errors:
            raise ValueError("invalid ModelConfig: " + "; ".join(errors))

    def kv_cache_elements_per_token(self):
        """Cached elements per token per layer: MLA keeps c_kv and k_pe, MHA each head's K and V."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return self.n_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim)


# ----------------------------------------------------------------------------------------------
# Norm and RoPE

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return ((xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
                * self.weight)


def precompute_freqs_cis(cfg):
    """cis(m theta_j) = (cos, sin) of m theta_j for positions m < max_seq_len, theta_j =
    rope_theta^(-2j/R): (max_seq_len, R/2, 2) real, the complex e^{i m theta_j} as two numbers."""
    d = cfg.qk_rope_head_dim
    freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)  # (R/2,)
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), freqs)
    return torch.stack([angles.cos(), angles.sin()], -1)  # (max_seq_len, R/2, 2)


def apply_rotary_emb(x, freqs_cis):
    """Rotate consecutive pairs (x0,x1),(x2,x3),... by their angles: the complex product
    (x0 + i x1) e^{i m theta}. Eager multiplies complex numbers (one kernel, 3-5x faster than the
    real form here); under torch.compile, which generates no code for complex numbers, the same
    product in real arithmetic, which it fuses. x: (B, T, H, R); freqs_cis: (B or 1, T, R/2, 2)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, R/2, 2)
    if torch.compiler.is_compiling():
        cos, sin = freqs_cis.unsqueeze(2).unbind(-1)  # (B, T, 1, R/2) each
        x0, x1 = pairs.unbind(-1)  # (B, T, H, R/2) each
        rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1)
    else:
        pairs = pairs.contiguous()  # view_as_complex needs even strides: odd-width heads' aren't
        rotated = torch.view_as_real(torch.view_as_complex(pairs)
                                     * torch.view_as_complex(freqs_cis).unsqueeze(2))
    return rotated.flatten(3).type_as(x)


# ----------------------------------------------------------------------------------------------
# Attention

@dataclass
class LayerCache:
    """One layer's inference cache, preallocated to (B, S, ...). MLA fills `c_kv` (B, S, C)
    and `k_pe` (B, S, R); MHA fills `k` (B, S, H, P+R) and `v` (B, S, H, E). `impl` picks the MLA
    decode: "naive" decompresses K and V with wkv_b, "absorbed" folds wkv_b into the query and the
    output. Attention reads all S slots, the mask hiding those not written yet: the shapes stay the
    same at every decode step (torch.compile compiles the step once)."""
    impl: str = "absorbed"
    c_kv: torch.Tensor = None
    k_pe: torch.Tensor = None
    k: torch.Tensor = None
    v: torch.Tensor = None

    def write(self, start_pos, **new):
        """Write each new (B, T, ...) tensor at slots [start_pos, start_pos + T) (start_pos an int
        or a 0-dim tensor); returns the whole buffers (B, S, ...), in the order given."""
        T = next(iter(new.values())).size(1)
        slots = start_pos + torch.arange(T, device=self.buffers()[0].device)
        return [getattr(self, k).index_copy_(1, slots, t) for k, t in new.items()]

    def buffers(self):
        return [t for t in (self.c_kv, self.k_pe, self.k, self.v) if t is not None]


def attention_mask(valid, start_pos, T):
    """(B, 1, T, S) bool, True where query start_pos + t may attend key s: causally, to the real
    keys (valid (B, S), S >= start_pos + T; start_pos an int or a 0-dim tensor). A padding query
    may see nothing real; letting every query see itself avoids NaN rows."""
    S = valid.size(1)
    q_pos = start_pos + torch.arange(T, device=valid.device)
    k_pos = torch.arange(S, device=valid.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # (T, S)
    return (causal[None]
            & (valid.bool()[:, None, :] | (k_pos[None, :] == q_pos[:, None])[None])).unsqueeze(1)


@dataclass
class PrefixKV:
    """One layer's keys of B shared prefixes, as continuation rows see them in
    Transformer.forward_shared_prefix: `cache` (B, P, ...) from the prefix pass, `valid` (B, P) its
    real tokens, row n continuing prefix group[n] as the slot[n]-th of its group's `size` slots.
    Continuation queries attend to their prefix batched per group (Hydragen, arXiv 2402.05099: no
    copy of the prefix keys to every row) and to their own keys apart; the two softmaxes are
    combined by their log-sum-exps (merge_attention)."""
    cache: LayerCache
    valid: torch.Tensor
    group: torch.Tensor
    slot: torch.Tensor
    size: int
    contiguous: bool  # group == [0]*size + [1]*size + ...: the group layout is a view of the rows

    def to_groups(self, x):
        """(N, ...) rows -> (B, size, ...), zeros in the slots no row fills."""
        if self.contiguous:
            return x.view(len(self.valid), self.size, *x.shape[1:])
        out = x.new_zeros(len(self.valid), self.size, *x.shape[1:])
        return out.index_put((self.group, self.slot), x)

    def to_rows(self, x):
        """(B, size, ...) -> (N, ...)."""
        return x.flatten(0, 1) if self.contiguous else x[self.group, self.slot]


def attend(q, k, v, mask, scale):
    """softmax(q k^T * scale) v over the keys where mask (B, 1, T, S) is True (None: causal), per
    head: q (B, T, H, d), k (B, S, H, d), v (B, S, H, E) -> (B, T, H, E). Eager runs SDPA's
    kernel; under torch.compile with a mask, the formula itself, which Inductor fuses into fewer
    and faster kernels than it makes of SDPA's (a decode step 0.5 against 1.3 ms a layer)."""
    if mask is not None and torch.compiler.is_compiling():
        scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
        p = scores.float().masked_fill(~mask, float("-inf")).softmax(-1).type_as(v)
        return torch.einsum("bhts,bshe->bthe", p, v)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask, is_causal=mask is None,
                                          scale=scale).transpose(1, 2)


def partial_attention(scores, mask, v):
    """Softmax attention over the keys where mask is True, and the scores' log-sum-exp:
    (softmax(scores) @ v, lse (..., T, 1)). scores (..., T, S), v (..., S, E)."""
    scores = scores.float().masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(-1, keepdim=True)
    return (scores - lse).exp().type_as(v) @ v, lse


def merge_attention(o1, lse1, o2, lse2):
    """Attention over two disjoint key sets from each one's output and log-sum-exp: the softmax
    over their union (each part reweighted by its share of the total exp-sum)."""
    lse = torch.logaddexp(lse1, lse2)
    return o1 * (lse1 - lse).exp().type_as(o1) + o2 * (lse2 - lse).exp().type_as(o2)


def expand_cache(caches, group, extra):
    """Per-layer caches of B prefixes (B, P, ...) gathered to N rows, row n holding prefix group[n],
    with `extra` empty positions after them: (N, P + extra, ...). For MLA only the latent c_kv and
    k_pe are gathered (kv_lora_rank + qk_rope_head_dim numbers per token), not per-head keys."""
    def extend(t):
        rows = t[group]  # (N, P, ...)
        return torch.cat([rows, rows.new_zeros(rows.size(0), extra, *rows.shape[2:])], 1)
    return [LayerCache(c.impl, **{k: extend(getattr(c, k)) for k in ("c_kv", "k_pe", "k", "v")
                                  if getattr(c, k) is not None})
            for c in caches]


class MLA(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2 eq. 9-19)."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.q_lora_rank, self.kv_lora_rank = (cfg.n_heads, cfg.q_lora_rank,
                                                             cfg.kv_lora_rank)
        self.nope, self.rope, self.v_dim = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                            cfg.v_head_dim)
        qk_head_dim = self.nope + self.rope
        if self.q_lora_rank == 0:
            self.wq = nn.Linear(cfg.dim, cfg.n_heads * qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.n_heads * qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.v_dim, cfg.dim, bias=False)
        self.softmax_scale = qk_head_dim ** -0.5

    def forward(self, x, freqs_cis, mask, cache=None, start_pos=0):
        """x: (B, T, D); mask: (B, 1, T, S) bool (True = may attend) or None for plain causal."""
        B, T, _ = x.shape
        H = self.n_heads
        if self.q_lora_rank == 0:
            q = self.wq(x)  # (B, T, H*(P+R))
        else:
            q = self.wq_b(self.q_norm(self.wq_a(x)))  # (B, T, H*(P+R))
        q_nope, q_pe = q.view(B, T, H, -1).split(
            [self.nope, self.rope], dim=-1)  # (B, T, H, P), (B, T, H, R)
        q_pe = apply_rotary_emb(q_pe, freqs_cis)
        kv, k_pe = self.wkv_a(x).split(
            [self.kv_lora_rank, self.rope], dim=-1)  # (B, T, C), (B, T, R)
        k_pe = apply_rotary_emb(
            k_pe.unsqueeze(2), freqs_cis).squeeze(2)  # (B, T, R) one key for all heads
        c_kv = self.kv_norm(kv)  # (B, T, C) the latent that inference caches
        wkv_b = self.wkv_b.weight.view(H, self.nope + self.v_dim, self.kv_lora_rank)  # (H, P+E, C)
        if isinstance(cache, PrefixKV):
            return self.wo(self.prefix_attention(q_nope, q_pe, c_kv, k_pe, mask, cache, wkv_b))
        if cache is not None:
            c_kv, k_pe = cache.write(start_pos, c_kv=c_kv, k_pe=k_pe)  # (B, S, C), (B, S, R)
        S = c_kv.size(1)
        if cache is not None and cache.impl == "absorbed":
            q_lat = torch.einsum(
                "bthp,hpc->bthc", q_nope, wkv_b[:, :self.nope])  # (B, T, H, C) W_UK absorbed
            scores = ((torch.einsum("bthc,bsc->bhts", q_lat, c_kv)
                       + torch.einsum("bthr,bsr->bhts", q_pe, k_pe))
                      * self.softmax_scale)  # (B, H, T, S)
            scores = scores.float().masked_fill(~mask, float("-inf")).softmax(dim=-1).type_as(x)
            o = torch.einsum("bhts,bsc->bthc", scores, c_kv)  # (B, T, H, C) attend in latent space
            o = torch.einsum(
                "bthc,hec->bthe", o, wkv_b[:, self.nope:])  # (B, T, H, E) W_UV absorbed
        else:
            k_nope, v = self.wkv_b(c_kv).view(B, S, H, -1).split(
                [self.nope, self.v_dim], dim=-1)  # (B, S, H, P), (B, S, H, E)
            k = torch.cat(
                [k_nope, k_pe.unsqueeze(2).expand(B, S, H, self.rope)], dim=-1)  # (B, S, H, P+R)
            q = torch.cat([q_nope, q_pe], dim=-1)  # (B, T, H, P+R)
            o = attend(q, k, v, mask, self.softmax_scale)  # (B, T, H, E)
        return self.wo(o.flatten(2))  # (B, T, D)

    def prefix_attention(self, q_nope, q_pe, c_kv, k_pe, mask, prefix, wkv_b):
        """Continuation rows (N, T) attending to their shared prefix (prefix: a PrefixKV) and to
        their own latents c_kv (N, T, C), k_pe (N, T, R) under mask (N, 1, T, T), in the latent
        space (W_UK, W_UV absorbed): one key for every head, so each part is one batched matrix
        product over (token, head) query rows. Returns (N, T, H*E)."""
        N, T, H, _ = q_nope.shape
        q_lat = torch.einsum("nthp,hpc->nthc", q_nope, wkv_b[:, :self.nope])  # (N, T, H, C)
        q = torch.cat([q_lat, q_pe], -1) * self.softmax_scale  # (N, T, H, C+R)
        pre = prefix.cache  # c_kv (B, P, C), k_pe (B, P, R), from the prefix pass
        g = prefix.to_groups(q)  # (B, G, T, H, C+R)
        B, G = g.shape[:2]
        scores = g.view(B, G * T * H, -1) @ torch.cat([pre.c_kv, pre.k_pe], -1).transpose(1, 2)
        o1, lse1 = partial_attention(scores, prefix.valid[:, None, :], pre.c_kv)  # (B, GTH, .)
        o1, lse1 = (prefix.to_rows(t.view(B, G, T, H, -1)) for t in (o1, lse1))  # (N, T, H, .)
        scores = (q.view(N, T * H, -1) @ torch.cat([c_kv, k_pe], -1).transpose(1, 2)
                  ).view(N, T, H, T)  # (N, T, H, T): query token, head, key token
        o2, lse2 = partial_attention(scores, mask.transpose(1, 2), c_kv[:, None])  # (N, T, H, .)
        o = merge_attention(o1, lse1, o2, lse2)  # (N, T, H, C)
        return torch.einsum("nthc,hec->nthe", o, wkv_b[:, self.nope:]).flatten(2)  # W_UV absorbed


class MHA(nn.Module):
    """Plain multi-head attention with MLA's head count and head dims (RoPE on the rope part of each
    head's key). Exists to compare KV-cache size and quality with MLA; caches full K and V."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.nope, self.rope, self.v_dim = (cfg.n_heads, cfg.qk_nope_head_dim,
                                                          cfg.qk_rope_head_dim, cfg.v_head_dim)
        qk_head_dim = self.nope + self.rope
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * qk_head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_heads * qk_head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_heads * self.v_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.v_dim, cfg.dim, bias=False)
        self.softmax_scale = qk_head_dim ** -0.5

    def forward(self, x, freqs_cis, mask, cache=None, start_pos=0):
        B, T, _ = x.shape
        H = self.n_heads

        def with_rope(t):  # (B, T, H, P+R): rotate the rope part only
            nope, pe = t.split([self.nope, self.rope], dim=-1)
            return torch.cat([nope, apply_rotary_emb(pe, freqs_cis)], dim=-1)

        q = with_rope(self.wq(x).view(B, T, H, -1))  # (B, T, H, P+R)
        k = with_rope(self.wk(x).view(B, T, H, -1))  # (B, T, H, P+R)
        v = self.wv(x).view(B, T, H, self.v_dim)  # (B, T, H, E)
        if isinstance(cache, PrefixKV):  # continuation rows: their prefix's keys, then their own
            pre, (q, k, v) = cache, (t.transpose(1, 2) for t in (q, k, v))  # (N, H, T, .)
            scores = (cache.to_groups(q) @ pre.cache.k.permute(0, 2, 3, 1)[:, None]
                      * self.softmax_scale)  # (B, G, H, T, P)
            o1, lse1 = partial_attention(scores, pre.valid[:, None, None, None, :],
                                         pre.cache.v.transpose(1, 2)[:, None])  # (B, G, H, T, E)
            o2, lse2 = partial_attention(q @ k.transpose(-1, -2) * self.softmax_scale, mask, v)
            o = merge_attention(pre.to_rows(o1), pre.to_rows(lse1), o2, lse2)  # (N, H, T, E)
            return self.wo(o.transpose(1, 2).flatten(2))
        if cache is not None:
            k, v = cache.write(start_pos, k=k, v=v)  # (B, S, H, P+R), (B, S, H, E)
        o = attend(q, k, v, mask, self.softmax_scale)  # (B, T, H, E)
        return self.wo(o.flatten(2))


# ----------------------------------------------------------------------------------------------
# Blocks, MTP and the model

def torch_compile(fn, **kw):
    """torch.compile(fn, **kw), with dynamo's limit of compiled variants a function raised from 8 to
    64 for the process (from the first call on; a program that compiles nothing keeps the default).
    A model with MoE layers is compiled block by block (the experts' loop stays eager, moe.py), and
    Block.forward gets a variant per FFN (dense or MoE), per pass (decode step, prompts,
    continuations) and per network (trained or frozen): past 8, dynamo would run the rest eager."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(fn, **kw)


class Block(nn.Module):
    """Pre-norm block: x = x + attn(attn_norm(x)); x = x + ffn(ffn_norm(x)).
    Returns (x, balance loss)."""

    def __init__(self, cfg, moe):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg) if cfg.attention == "mla" else MHA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg) if moe else MLP(cfg.dim, cfg.inter_dim)

    def forward(self, x, freqs_cis, mask, cache=None, start_pos=0, token_mask=None):
        x = x + self.attn(self.attn_norm(x), freqs_cis, mask, cache, start_pos)
        if isinstance(self.ffn, MoE):
            h, aux = self.ffn(self.ffn_norm(x), token_mask)  # padding counts in no router load
        else:
            h, aux = self.ffn(self.ffn_norm(x)), x.new_zeros((), dtype=torch.float32)
        return x + h, aux


class MTPModule(nn.Module):
    """One MTP depth k (DeepSeek-V3 eq. 21-23):
        h'_i^k = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h_i^{k-1})]  (embedding first, as released)
        h^k    = TRM_k(h'^k)                                       (one causal block)
        P^k_{i+k+1} = OutHead(RMSNorm_k(h_i^k))                    (head shared with the main model)
    The released V3 weights also give each MTP module its own final norm before the shared head."""

    def __init__(self, cfg):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)  # M_k
        self.block = Block(cfg, moe=cfg.n_layers > cfg.n_dense_layers)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, h_prev, emb_next, freqs_cis, mask, token_mask=None, cache=None, start_pos=0):
        """cache / start_pos: its own layer cache, when it drafts tokens (rollout's speculative
        decoding)."""
        x = self.proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))  # (B, T-k, D)
        return self.block(x, freqs_cis, mask, cache, start_pos, token_mask)


def mtp_slices(T, k):
    """Which positions depth k (1-based) uses, for a sequence of length T where targets[:, i] is the
    token after idx[:, i]: position i (i < T-k) reads h_i^{k-1} and Emb(idx[i+k]) = Emb(t_{i+k}) and
    predicts targets[i+k] = t_{i+k+1}. Returns (hidden positions, embedded-token positions,
    target positions)."""
    return slice(0, T - k), slice(k, T), slice(k, T)


def masked_sum(values, mask):
    return values.sum() if mask is None else (values * mask.float()).sum()


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, moe=i >= cfg.n_dense_layers)
                                    for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)  # untied from embed
        self.mtp = nn.ModuleList(MTPModule(cfg) for _ in range(cfg.mtp_depth))
        self.register_buffer("freqs_cis", precompute_freqs_cis(cfg), persistent=False)
        self.apply(self._init_weights)
        self.loss_parts = {}  # detached pieces of the last loss (ce, mtp, balance), for logging

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def moe_layers(self):
        """Every MoE layer, the MTP modules' included."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def routed_experts(self):
        """The experts each MoE layer of the main model chose in its last forward: a list of
        (B, T, K) index tensors."""
        return [layer.ffn.last_indices for layer in self.layers if isinstance(layer.ffn, MoE)]

    def new_cache(self, batch_size, max_len, impl="absorbed", n_layers=None):
        """Preallocated per-layer caches for incremental decoding (rollout.py): one per layer of the
        main model, or n_layers of them (an MTP module's block needs one)."""
        if impl not in ("naive", "absorbed"):
            raise ValueError(f"MLA decode impl must be naive or absorbed, got {impl!r}")
        c, p = self.cfg, self.freqs_cis
        kw = dict(device=p.device, dtype=self.embed.weight.dtype)
        n = len(self.layers) if n_layers is None else n_layers
        if c.attention == "mla":
            return [LayerCache(impl, c_kv=torch.zeros(batch_size, max_len, c.kv_lora_rank, **kw),
                               k_pe=torch.zeros(batch_size, max_len, c.qk_rope_head_dim, **kw))
                    for _ in range(n)]
        dk = c.qk_nope_head_dim + c.qk_rope_head_dim
        return [LayerCache(impl, k=torch.zeros(batch_size, max_len, c.n_heads, dk, **kw),
                           v=torch.zeros(batch_size, max_len, c.n_heads, c.v_head_dim, **kw))
                for _ in range(n)]

    def forward(self, idx, targets=None, loss_mask=None, *, positions=None, pad_mask=None,
                cache=None, start_pos=0, return_hidden=False, num_tokens=None, num_seqs=None):
        """idx: (B, T) token ids.
        targets: (B, T), targets[:, t] is the token after idx[:, t]; loss_mask: (B, T), 1 where it
        counts. positions: (B, T) RoPE positions (default start_pos + arange(T)); left-padded
        batches pass their own so that each row's first real token sits at position 0.
        pad_mask: (B, start_pos + T) bool, False for padding tokens (default: none): they are never
        attended to, and the MoE routers count only real tokens in their loads and balance loss.
        cache: from new_cache(); the new tokens are written at [start_pos, start_pos + T).
        Returns (logits (B, T, V), loss or None), plus the final normed hidden states (B, T, D) if
        return_hidden. The loss is token-mean CE + mtp_lambda * mean_k CE_k + the balance losses.
        num_tokens / num_seqs: the counts that the CE sums and the per-sequence balance losses are
        divided by (default: this batch's). A batch split into micro-batches or over ranks passes
        the whole batch's counts, so that the summed gradients equal the whole batch's gradient."""
        B, T = idx.shape
        h, balance, freqs_cis, mask, real = self.trunk(idx, positions, pad_mask, cache, start_pos)
        hidden = self.norm(h)
        logits = self.head(hidden)  # (B, T, V)
        loss = None
        if targets is not None:
            if num_tokens is None:
                num_tokens = B * T if loss_mask is None else loss_mask.sum().clamp_min(1)
            ce = masked_sum(-token_logprobs(logits, targets), loss_mask) / num_tokens
            mtp, mtp_balance = self._mtp_loss(idx, h, targets, loss_mask, freqs_cis, mask,
                                              num_tokens, real)
            balance = (balance + mtp_balance) * (1.0 if num_seqs is None else B / num_seqs)
            loss = ce + self.cfg.mtp_lambda * mtp + balance
            # the parts for logging, detached as one stacked tensor: under torch.compile (Inductor,
            # torch 2.13) a detached ce of its own came back as the loss itself when the other
            # parts were 0, and the loss had no gradient
            parts = torch.stack([ce, mtp, balance]).detach()
            self.loss_parts = dict(zip(("ce", "mtp", "balance"), parts))
        return (logits, loss, hidden) if return_hidden else (logits, loss)

    def trunk(self, idx, positions=None, pad_mask=None, cache=None, start_pos=0):
        """Embed idx (B, T) and run the blocks. Returns (h (B, T, D) before the final norm, the
        blocks' balance loss, the RoPE factors, the attention mask and the real-token mask)."""
        B, T = idx.shape
        if not torch.compiler.is_compiling():  # a check the compiled decode step leaves out
            last = start_pos + T if positions is None else int(positions.max()) + 1
            if last > self.cfg.max_seq_len:
                raise ValueError(f"sequence length {last} exceeds "
                                 f"max_seq_len={self.cfg.max_seq_len}")
        if positions is None:
            freqs_cis = self.freqs_cis[start_pos:start_pos + T].unsqueeze(0)  # (1, T, R/2, 2)
        else:
            freqs_cis = self.freqs_cis[positions]  # (B, T, R/2, 2)
        mask = None  # None = plain causal (SDPA's fast path)
        if cache is not None or pad_mask is not None:
            S = (cache[0].buffers()[0].size(1) if cache is not None
                 and isinstance(cache[0], LayerCache) else start_pos + T)  # keys attended to
            valid = (torch.ones(B, S, dtype=torch.bool, device=idx.device) if pad_mask is None
                     else F.pad(pad_mask.bool(), (0, S - pad_mask.size(1))))  # unwritten: False
            mask = attention_mask(valid, start_pos, T)
        real = (None if pad_mask is None else pad_mask.bool().index_select(
            1, start_pos + torch.arange(T, device=idx.device)))  # (B, T) the new tokens' realness
        h = self.embed(idx)  # (B, T, D)
        balance = h.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            h, aux = layer(h, freqs_cis, mask, None if cache is None else cache[i], start_pos, real)
            balance = balance + aux
        return h, balance, freqs_cis, mask, real

    def forward_shared_prefix(self, prefix_ids, prefix_mask, group, cont_ids, cont_mask):
        """One forward over B prefixes and N continuations, continuation n following prefix group[n]
        (the G completions of a GRPO group, DPO's chosen and rejected, ...). In a causal model the
        prefix positions do not depend on what follows, so each prefix runs once and keeps its
        per-layer keys (for MLA the latent c_kv and k_pe: DeepSeek-V2's cache). The continuation
        positions run on top: their queries attend to their prefix's keys batched per group, with
        no copy of those keys to every row (Hydragen, arXiv 2402.05099), and to their own keys
        apart, the two parts combined by their log-sum-exps (PrefixKV). The result equals the plain
        forward of `prefix + continuation` at those positions; the gradient reaches the prefix
        computation once, summed over its continuations.
        prefix_ids, prefix_mask: (B, P) left-padded prompts and their real tokens (at least one
        each); group: (N,) long; cont_ids, cont_mask: (N, L) continuations and their real tokens.
        Returns (logits (N, L, V), hidden (N, L, D)): position t predicts cont_ids[:, t], the
        first from the prefix's last token. The continuations' last token is not run (nothing
        reads it)."""
        B, P = prefix_ids.shape
        N, L = cont_ids.shape
        prefix_mask = prefix_mask.bool()
        caches = self.new_cache(B, P)  # filled by the prefix pass, with the autograd graph
        h, _, _, _, _ = self.trunk(prefix_ids, (prefix_mask.long().cumsum(1) - 1).clamp_min(0),
                                   prefix_mask, caches)
        h = h[group, -1:]  # (N, 1, D) the last token of each continuation's prefix (left padding)
        if L > 1:
            counts = torch.bincount(group, minlength=B)  # (B,) rows per prefix
            size = int(counts.max())
            first = counts.cumsum(0) - counts  # (B,) where each group's rows start, once sorted
            order = torch.sort(group, stable=True).indices  # rows sorted by group
            slot = torch.empty_like(group).index_copy_(
                0, order, torch.arange(N, device=group.device) - first[group[order]])  # (N,)
            contiguous = N == B * size and torch.equal(  # GRPO's layout: a view of the rows
                group, torch.arange(B, device=group.device).repeat_interleave(size))
            prefixes = [PrefixKV(c, prefix_mask, group, slot, size, contiguous) for c in caches]
            positions = (prefix_mask.sum(1)[group][:, None]
                         + torch.arange(L - 1, device=cont_ids.device))  # (N, L-1)
            h_cont, _, _, _, _ = self.trunk(cont_ids[:, :-1], positions,
                                            cont_mask[:, :-1].bool(), prefixes)
            h = torch.cat([h, h_cont], 1)  # (N, L, D)
        hidden = self.norm(h)
        return self.head(hidden), hidden

    def mtp_forward(self, idx, h, freqs_cis, mask=None, real=None):
        """Run the MTP depths on the main model's last hidden state h = h^0 (B, T, D, before the
        final norm); real: (B, T) bool real-token mask or None. Yields (k, logits (B, T-k, V)
        predicting t_{i+k+1} at position i, balance loss)."""
        T = idx.size(1)
        for k, module in enumerate(self.mtp, start=1):
            if T <= k:
                return
            hs, es, _ = mtp_slices(T, k)
            m = None if mask is None else mask[:, :, hs, hs]
            r = None if real is None else real[:, hs] & real[:, es]  # (B, T-k) both inputs real
            h, aux = module(h[:, hs], self.embed(idx[:, es]), freqs_cis[:, hs], m, r)  # (B, T-k, D)
            yield k, self.head(module.norm(h)), aux

    def _mtp_loss(self, idx, h, targets, loss_mask, freqs_cis, mask, num_tokens, real=None):
        """mean_k CE_k over the MTP depths (V3 eq. 24-25, without lambda), and their balance losses.
        As in V3 eq. 24, every depth divides by the main loss's token count, though depth k scores
        the targets from position k on only."""
        total = balance = h.new_zeros((), dtype=torch.float32)
        for k, logits, aux in self.mtp_forward(idx, h, freqs_cis, mask, real):
            ts = mtp_slices(idx.size(1), k)[2]
            total = total + masked_sum(-token_logprobs(logits, targets[:, ts]),
                                       None if loss_mask is None else loss_mask[:, ts]) / num_tokens
            balance = balance + aux
        return total / max(len(self.mtp), 1), balance

    @torch.no_grad()
    def update_router_biases(self):
        """Aux-loss-free bias update for every MoE layer (after an optimiser step); returns the mean
        and the largest MaxVio of the step's loads over the layers that routed tokens in the step
        (the MTP module's layer routes none in a forward without targets, as in RL: not a 0)."""
        loads = [m.update_bias(self.cfg.bias_update_speed) for m in self.moe_layers()]
        vios = [max_violation(load) for load in loads if load.sum() > 0]
        if not vios:
            return {"maxvio_mean": 0.0, "maxvio_max": 0.0}
        return {"maxvio_mean": sum(vios) / len(vios), "maxvio_max": max(vios)}


class ScalarModel(nn.Module):
    """The Transformer with a scalar head on its final hidden states: the reward model (read at the
    last real token of prompt + completion, InstructGPT section 3.5) and PPO's critic (read at every
    position). The body is a plain Transformer (initialised from an SFT checkpoint); the head starts
    at zero, so every first score is exactly 0 and the first Bradley-Terry loss exactly ln 2."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.body = Transformer(cfg)
        self.value_head = nn.Linear(cfg.dim, 1, bias=False)
        nn.init.zeros_(self.value_head.weight)

    def forward(self, idx, positions=None, pad_mask=None):
        """idx, positions, pad_mask as Transformer.forward -> a scalar per position (B, T)."""
        _, _, hidden = self.body(idx, positions=positions, pad_mask=pad_mask, return_hidden=True)
        return self.value_head(hidden).squeeze(-1).float()  # (B, T)

    def forward_shared_prefix(self, prefix_ids, prefix_mask, group, cont_ids, cont_mask):
        """As Transformer.forward_shared_prefix -> a scalar per continuation position (N, L): the
        one at t has read the prefix and cont_ids[:, :t]."""
        _, hidden = self.body.forward_shared_prefix(prefix_ids, prefix_mask, group, cont_ids,
                                                    cont_mask)
        return self.value_head(hidden).squeeze(-1).float()  # (N, L)


def param_counts(model):
    """Total parameters, the main model's (no MTP), and the main model's active per token (the
    routed experts a token does not use are left out)."""
    cfg = model.cfg
    total = sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for p in model.mtp.parameters())
    main = total - mtp
    per_expert = (sum(p.numel() for p in model.moe_layers()[0].experts[0].parameters())
                  if model.moe_layers() else 0)
    n_moe_main = cfg.n_layers - cfg.n_dense_layers
    inactive = n_moe_main * (cfg.n_routed_experts - cfg.n_activated_experts) * per_expert
    return {"total": total, "main": main, "mtp": mtp, "active_per_token": main - inactive}


if __name__ == "__main__":
    # python model.py: the default model's sizes, as the README's table reports them.
    torch.manual_seed(0)
    for name, cfg in (("MLA + MoE (default)", ModelConfig()),
                      ("MHA option", ModelConfig(attention="mha"))):
        c = param_counts(Transformer(cfg))
        print(f"{name}: total {c['total']:,} | main model {c['main']:,} | MTP {c['mtp']:,} | "
              f"active per token {c['active_per_token']:,} | "
              f"KV cache {cfg.kv_cache_elements_per_token()} elements per token per layer")
