"""Batched sampling with a KV cache, log-probs, and evaluation.

- Batching: token lists to padded tensors, and scoring completions with each prompt run once
  (`completion_logprobs`, `completion_values`, `score_completions`).
- `generate`: B prompts of different lengths (left-padded, with per-row RoPE positions), each
  sampled `num_generations` times (the copies of one prompt are contiguous: a GRPO group);
  temperature, top-k, top-p or greedy with an explicit seeded torch.Generator; per-row stop at the
  end token and a max-new-tokens limit. The MLA cache holds only the latent c_kv and the shared
  rope key per token and layer (DeepSeek-V2 section 2.1.2); decoding is `naive` (decompress K, V
  with wkv_b) or `absorbed` (wkv_b folded into the query and the output). `speculative=True`
  drafts with the first MTP module and verifies with the main model (its own section).
- `evaluate`: greedy exact-match accuracy, pass@k with the unbiased estimator of Chen et al. 2021
  (arXiv 2107.03374, eq. 1) and maj@k (majority vote over k sampled answers, DeepSeekMath 5.2.2).
- `make_pairs`: preference pairs (prompt, chosen, rejected) for DPO and the reward model, from the
  policy's own samples or from near misses of the reference; `save_pairs` / `load_pairs` keep them
  as JSONL with the settings that made them.

Shape legend: B prompts, G generations per prompt, N = B*G rows, P prompt length (padded),
L new tokens, V vocabulary.
"""
import math
import random
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import losses
import tasks
from model import attention_mask, expand_cache, torch_compile


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (N, P) left-padded prompts
    prompt_mask: torch.Tensor  # (N, P) bool, False on padding
    completion_ids: torch.Tensor  # (N, L) sampled tokens, pad after the first end token
    completion_mask: torch.Tensor  # (N, L) float, 1 up to and including the first end token
    ended: torch.Tensor  # (N,) bool: True if the row wrote an end token, False if truncated
    logprobs: torch.Tensor  # (N, L) float32 log-probs of the tokens under the sampling distribution
    group: torch.Tensor = None  # (N,) long: the prompt each row continues; None = its own
    stats: dict = None  # decoding statistics (speculative: draft acceptance, tokens per forward)

    def sequences(self):
        """(ids (N, P+L), real-token mask (N, P+L) bool, positions (N, P+L)) of prompt +
        completion, ready for a full forward pass whose logits[:, P-1:-1] score the completion. The
        mask is False on left padding and after the end token: those tokens are not attended to and
        not counted by the MoE routers; no scored position depends on them (causal attention)."""
        ids = torch.cat([self.prompt_ids, self.completion_ids], dim=1)
        mask = torch.cat([self.prompt_mask, self.completion_mask.bool()], dim=1)
        return ids, mask, (mask.long().cumsum(1) - 1).clamp_min(0)


@dataclass
class Experience:
    """One RL step's rollout batch and what the update derives from it (GRPO-Zero's Episode,
    OpenRLHF's Experience): the same object feeds GRPO's and PPO's updates. Rows are N = B*G."""
    rollout: Rollout  # prompts, completions, the sampler's log-probs
    rewards: torch.Tensor  # (N,) the task's (or a reward model's) score of each completion
    advantages: torch.Tensor  # (N,) outcome or (N, L) per-token advantages
    mask: torch.Tensor  # (N, L) completion tokens that count in the loss (filtered rows: 0)
    old_logp: torch.Tensor = None  # (N, L) log pi_old, the policy that sampled
    ref_logp: torch.Tensor = None  # (N, L) log pi_ref, the frozen reference
    values: torch.Tensor = None  # (N, L) PPO: the critic's V_old
    returns: torch.Tensor = None  # (N, L) PPO: GAE returns
    batches: list = None  # GRPO: the update's minibatches, each a list of micro-batches of rows
    routes: object = None  # GRPO: the experts pi_old chose (a moe.RouteRecorder)
    texts: list = None  # GRPO: the completions as text
    parts: dict = None  # GRPO: each reward (N,) by name: tasks.REWARDS, model, teacher


# ----------------------------------------------------------------------------------------------
# Batching: token lists to padded tensors, and scoring completions with each prompt run once


def left_pad(prompts, pad_id, device):
    """prompts: list of token-id lists -> (ids (B, P), mask (B, P) bool)."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = True
    return ids.to(device), mask.to(device)


def right_pad(seqs, pad_id, device):
    """Token-id lists -> (idx (B, T) right-padded with pad_id, pad_mask (B, T) bool, True on real
    tokens)."""
    lengths = torch.tensor([len(x) for x in seqs])
    idx = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, x in enumerate(seqs):
        idx[i, :len(x)] = torch.tensor(x)
    return idx.to(device), (torch.arange(idx.size(1))[None, :] < lengths[:, None]).to(device)


def last_real(values, pad_mask):
    """values (B, T) read at each row's last real token (pad_mask True): (B,). Works for left and
    right padding alike."""
    last = pad_mask.long().cumsum(1).argmax(1)  # (B,) the first index where the count peaks
    return values.gather(1, last[:, None]).squeeze(1)


def shared_prefix_args(prompts, group, completions, pad_id, device):
    """Token-id lists -> the arguments of a network's forward_shared_prefix: (prefixes (U, P)
    left-padded, their mask (U, P), group (N,), completions (N, L) right-padded with at least one
    pad, their mask (N, L) bool). prompts: U lists; group: N ints, the prompt each completion
    follows; completions: N lists. The forward never runs a continuation's last column; the extra
    pad column makes it run every real token, whatever the longest completion in the batch: each
    real token's output exists (a reward model's score sits at column len(completion)) and counts
    in the router loads, so that micro-batches count what their whole batch counts."""
    prefixes, prefix_mask = left_pad(prompts, pad_id, device)
    ids, _ = right_pad([list(c) + [pad_id] for c in completions], pad_id, device)  # (N, L)
    lengths = torch.tensor([len(c) for c in completions], device=device)  # (N,)
    mask = torch.arange(ids.size(1), device=device)[None, :] < lengths[:, None]  # (N, L) real
    return prefixes, prefix_mask, torch.as_tensor(group, device=device), ids, mask


def shared_prefix_batch(r, rows):
    """The forward_shared_prefix arguments that score rollout r's `rows` with each prompt run once:
    (prompts (U, P), their masks, group (n,), completions (n, L), completion masks (n, L))."""
    rows = torch.as_tensor(rows, device=r.completion_ids.device)
    group = rows if r.group is None else r.group[rows]
    uniq, inv = torch.unique(group, return_inverse=True)  # (U,), (n,): the prompts of these rows
    first = torch.full((len(uniq),), len(rows), device=rows.device).scatter_reduce(
        0, inv, torch.arange(len(rows), device=rows.device), "amin")  # (U,) a row of each
    return (r.prompt_ids[rows[first]], r.prompt_mask[rows[first]], inv, r.completion_ids[rows],
            r.completion_mask[rows].bool())


def completion_logprobs(forward, r, rows, temperature=1.0):
    """log pi(o_t | q, o_<t) of the completion tokens of rollout r's `rows`: (n, L), and the logits
    (n, L, V), from one forward in which each prompt runs once for its whole group. forward: a
    network's forward_shared_prefix, or what Run.wrap(net, shared_prefix=True) made of it. The
    logits are divided by the sampling temperature, so that pi is the distribution the tokens were
    sampled from. The one log-prob helper of GRPO and PPO (pi_old, pi_ref and the update)."""
    args = shared_prefix_batch(r, rows)
    logits, _ = forward(*args)  # (n, L, V): logits[:, t] predict token t
    logits = logits / temperature
    return losses.token_logprobs(logits, args[3]), logits


@torch.no_grad()
def batched_logprobs(forward, exp, temperature=1.0):
    """completion_logprobs of every row of exp.rollout (N, L), forward by forward over exp.batches
    (lists of row sets: the micro-batches the update runs, so that its numbers are the same)."""
    out = torch.zeros_like(exp.rollout.logprobs)
    for rows in (rows for minibatch in exp.batches for rows in minibatch):
        out[rows] = completion_logprobs(forward, exp.rollout, rows, temperature)[0]
    return out


def completion_values(forward, r, rows):
    """A critic's value of every completion position of rollout r's `rows`: (n, L), V_t read where
    the policy's logits for token t are, so that it sees q and o_<t. forward: the critic's
    forward_shared_prefix (model.ScalarModel), or what Run.wrap made of it."""
    return forward(*shared_prefix_batch(r, rows))  # (n, L)


def score_completions(rm, prompts, completions, pad_id):
    """A reward model's (model.ScalarModel) score of each (prompt, completion) pair of token-id
    lists: its scalar at the completion's last token (B,), from one forward in which each distinct
    prompt runs once. Column t of that forward has read the prompt and completion[:t]: the score
    sits at column len(completion)."""
    index = {}
    group = [index.setdefault(tuple(p), len(index)) for p in prompts]  # (B,) first appearance order
    args = shared_prefix_args([list(p) for p in index], group, completions, pad_id,
                              rm.value_head.weight.device)
    values = rm.forward_shared_prefix(*args)  # (B, L)
    return values.gather(1, args[4].sum(1)[:, None]).squeeze(1)


def score_rollout(rm, prompts, r, pad_id):
    """score_completions of rollout r's completions (their real tokens, the end token included),
    completion i following prompts[i // G], G = N / len(prompts): (N,)."""
    G, lengths = r.completion_ids.size(0) // len(prompts), r.completion_mask.sum(1).long().tolist()
    completions = [row[:n] for row, n in zip(r.completion_ids.tolist(), lengths)]
    return score_completions(rm, [prompts[i // G] for i in range(len(completions))], completions,
                             pad_id)


# ----------------------------------------------------------------------------------------------
# Sampling


class NonFiniteLogits(common.NonFinite):
    """The model produced NaN or infinite logits: its weights have diverged."""


def sampling_logprobs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The log-probabilities of the distribution sampled from: softmax(logits / temperature)
    restricted to the top-k / top-p set (-inf outside it); with temperature 0 (greedy) the model's
    own distribution at temperature 1. logits: (N, V) -> (N, V) float32. top-p keeps the smallest
    set of most likely tokens whose mass reaches top_p."""
    logits = logits.float()
    if not torch.isfinite(logits).all():
        raise NonFiniteLogits("the model produced non-finite logits while sampling: its weights "
                              "have diverged")
    if temperature == 0:
        return F.log_softmax(logits, -1)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1)[0][..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (N, V)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the tokens before this one already reach top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return F.log_softmax(logits, -1)  # (N, V)


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Draw one token per row. logits: (N, V) -> (tokens (N,), their log-probs (N,) under the
    distribution sampled from, sampling_logprobs). Greedy (argmax) when temperature == 0."""
    logp = sampling_logprobs(logits, temperature, top_k, top_p)  # (N, V)
    if temperature == 0:
        tok = logp.argmax(-1)  # (N,)
    else:
        tok = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]  # (N,)
    return tok, logp.gather(1, tok[:, None])[:, 0]


@torch.no_grad()
def generate(model, prompts, *, eos_id, pad_id, num_generations=1, max_new_tokens=16,
             temperature=1.0, top_k=0, top_p=1.0, generator=None, mla_impl="absorbed",
             speculative=False, compile=False):
    """Sample `num_generations` completions for each prompt (lists of token ids, BOS included).
    Rows are ordered prompt-major: rows [i*G, (i+1)*G) are the copies of prompt i; each prompt is
    prefilled once and its cache gathered to its G rows. speculative=True drafts with the MTP
    module and verifies with the main model (_decode_speculative): the same distribution (the same
    tokens when greedy), fewer main-model forwards; its statistics are in Rollout.stats.
    compile=True (or a torch.compile backend's name) runs each decode step compiled, on shapes
    that stay fixed (gpt-fast's recipe): the cache's length is rounded up to a multiple of 16
    (whatever the prompts' length, a few shapes per run), the step writes its slot given as a
    tensor, and the completions are padded to max_new_tokens (the mask carries the truth). The
    tokens are those of eager decoding."""
    if num_generations < 1 or max_new_tokens < 1:
        raise ValueError("num_generations and max_new_tokens must be >= 1")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got "
                         f"{temperature}, {top_k}, {top_p}")
    if speculative and model.cfg.mtp_depth < 1:
        raise ValueError("speculative decoding drafts with the MTP module, and this model has "
                         "mtp_depth = 0 (train one with --mtp_depth 1 or more)")
    device = model.freqs_cis.device
    ids, mask = left_pad(prompts, pad_id, device)  # (B, P) each prompt once
    B, P = ids.shape
    N = B * num_generations
    if P + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt length {P} + max_new_tokens {max_new_tokens} exceeds "
                         f"max_seq_len={model.cfg.max_seq_len}")
    was_training = model.training
    model.eval()  # no router load counting while sampling
    prefill = model.new_cache(B, P, impl=mla_impl)
    positions = (mask.long().cumsum(1) - 1).clamp_min(0)  # (B, P)
    h, _, _, _, _ = model.trunk(ids, positions, mask, prefill)  # (B, P, D)
    group = torch.arange(N, device=device) // num_generations  # (N,) the prompt row n continues
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    decode = _decode_speculative if speculative else _decode
    out_tok, out_logp, ended, stats = decode(model, ids, mask, h, prefill, group, max_new_tokens,
                                             eos_id, pad_id, mla_impl, compile, **sampling)
    model.train(was_training)
    ids, mask = ids[group], mask[group]  # (N, P)
    # mask: 1 up to and including the first end token; everything after it (pads) is 0
    is_eos = (out_tok == eos_id).long()
    comp_mask = ((is_eos.cumsum(1) - is_eos) == 0).float()  # (N, L)
    return Rollout(ids, mask, out_tok, comp_mask, ended, out_logp * comp_mask, group, stats)


def decode_step(model, tokens, positions, slot, valid, cache):
    """One decode step of the main model for tokens (N, T) at RoPE positions (N, T), written to the
    cache at slots slot + [0, T) (slot: a 0-dim tensor), attending over the cache's real keys valid
    (N, S): (logits (N, T, V), hidden states before the final norm (N, T, D)). Every shape is the
    same at every step of a run."""
    h = model.trunk(tokens, positions, valid, cache, slot)[0]
    return model.head(model.norm(h)), h


def draft_step(model, hidden, nxt, positions, slot, valid, cache):
    """The first MTP module's block on the main model's hidden states (N, T, D) beside the
    embeddings of the tokens after them nxt (N, T), at RoPE positions (N, T), written to its cache
    at slots slot + [0, T) (valid (N, S): the slots whose entries are real): (N, T, D)."""
    T = hidden.size(1)
    real = valid.index_select(1, slot + torch.arange(T, device=valid.device))  # (N, T)
    return model.mtp[0](hidden, model.embed(nxt), model.freqs_cis[positions],
                        attention_mask(valid, slot, T), real, cache, slot)[0]


_COMPILED = {}


def static_slots(n):
    """n cache slots rounded up to a multiple of 16: the compiled decode step's few shapes."""
    return -(-n // 16) * 16


def compiled(fn, backend):
    """fn compiled once per process (True: Inductor; False: fn itself), for fixed shapes; the
    compiled code is reused by every later call with the same shapes (and by later runs, through
    Inductor's cache on disk)."""
    if not backend:
        return fn
    if (fn, backend) not in _COMPILED:
        kw = {} if backend is True else {"backend": backend}
        _COMPILED[fn, backend] = torch_compile(fn, dynamic=False, **kw)
    return _COMPILED[fn, backend]


def _decode(model, ids, mask, h, prefill, group, max_new_tokens, eos_id, pad_id, impl,
            compile=False, **sampling):
    """Ordinary decoding: one main-model forward per new token. Returns (tokens (N, L), their
    log-probs (N, L), ended (N,), stats); L = max_new_tokens when compiled, else the longest."""
    N, P = len(group), ids.size(1)
    S = P + max_new_tokens  # the cache's slots; compiled: a few shapes a run
    S = min(static_slots(S), model.cfg.max_seq_len) if compile else S
    step = compiled(decode_step, compile)
    cache = expand_cache(prefill, group, S - P)  # each prompt's cache at its G rows
    logits = model.head(model.norm(h[group, -1:]))  # (N, 1, V) the last prompt token's prediction
    valid = torch.cat([mask[group], mask.new_ones(N, max_new_tokens),
                       mask.new_zeros(N, S - P - max_new_tokens)], dim=1)  # (N, S) real slots
    next_pos = mask[group].long().sum(1, keepdim=True)  # (N, 1) position of the first new token
    out_tok = ids.new_full((N, max_new_tokens), pad_id)
    out_logp = torch.zeros(N, max_new_tokens, device=ids.device)
    ended = torch.zeros(N, dtype=torch.bool, device=ids.device)
    for t in range(max_new_tokens):
        tok, logp = sample_next(logits[:, -1], **sampling)  # (N,), (N,)
        out_tok[:, t] = torch.where(ended, pad_id, tok)
        out_logp[:, t] = torch.where(ended, 0.0, logp)
        ended |= tok == eos_id
        if ended.all() or t == max_new_tokens - 1:
            break
        logits = step(model, out_tok[:, t:t + 1], next_pos + t,
                      torch.tensor(P + t, device=ids.device), valid, cache)[0]
    L = max_new_tokens if compile else t + 1
    return out_tok[:, :L], out_logp[:, :L], ended, {"main_forwards": t + 1}


# ----------------------------------------------------------------------------------------------
# Speculative decoding with the MTP module as the draft (DeepSeek-V3 section 5.4.3)


def verify_draft(p, q, d, greedy, generator=None):
    """Speculative sampling's verification of a drafted token d (N,) drawn from q, against the
    target p (both (N, V) log-probs of the sampling distributions). Greedy: accept iff d is p's
    argmax, else take the argmax. Sampling: accept with probability min(1, p(d) / q(d)), else draw
    from normalise(max(0, p - q)); the kept token is then distributed exactly as p. Returns
    (accepted (N,) bool, the replacement token (N,), used where not accepted)."""
    if greedy:
        return p.argmax(-1) == d, p.argmax(-1)
    u = torch.rand(len(d), generator=generator, device=d.device)
    ok = u < (p.gather(1, d[:, None]) - q.gather(1, d[:, None]))[:, 0].exp()
    residual = (p.exp() - q.exp()).clamp_min(0)  # (N, V)
    # p = q: d is always kept, and the residual is 0 everywhere
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p.exp())
    return ok, torch.multinomial(residual, 1, generator=generator)[:, 0]


def _decode_speculative(model, ids, mask, h, prefill, group, max_new_tokens, eos_id, pad_id, impl,
                        compile=False, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Speculative decoding with the first MTP module as the draft (DeepSeek-V3 section 5.4.3;
    Leviathan et al. arXiv 2211.17192). Each iteration the main model runs one forward over two
    positions: the last committed token t and the MTP's draft d of the token after it. Its logits
    at t verify d; its logits at d give one more token for free when d is accepted. Then the MTP
    module reads the main model's hidden state at each committed position beside the embedding of
    the token that follows it (its training input) and drafts the token after the newest one.
    - Greedy: d is accepted iff it is the main model's argmax: the output equals ordinary greedy
      decoding. Sampling: d ~ q (the MTP's sampling distribution) is accepted with probability
      min(1, p(d) / q(d)), else the token is drawn from normalise(max(0, p - q)); every emitted
      token is then distributed exactly as p, the main model's sampling distribution, and its
      returned log-prob is log p.
    - Caches: every iteration appends two slots to the main cache and to the MTP block's own cache
      for every row; the slot of a rejected draft is marked not real (rolled back) and never
      attended to again; RoPE positions follow each row's own count of tokens. Rows accept
      different numbers of tokens, end, and stop at max_new_tokens independently.
    Returns (tokens (N, L), log-probs (N, L), ended (N,), stats: the acceptance rate of the draft
    and the mean tokens per main-model forward)."""
    N, P, device = len(group), ids.size(1), ids.device
    mtp, greedy = model.mtp[0], temperature == 0
    sample = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    cap = P + 2 * max_new_tokens  # slots: the prompt, then two per iteration at most
    cap = static_slots(cap) if compile else cap  # compiled: a few shapes a run, as _decode's
    verify, draft_block = compiled(decode_step, compile), compiled(draft_step, compile)
    cache = expand_cache(prefill, group, cap - P)
    mtp_cache = model.new_cache(len(ids), P, impl, n_layers=1)
    valid = ids.new_zeros(N, cap, dtype=torch.bool)  # main cache: the real slots
    valid[:, :P] = mask[group]
    mtp_valid = valid.clone()  # MTP cache: slot j is real when its token and the next one are
    pos = mask.long().cumsum(1) - 1  # (B, P) prompt positions
    if P > 1:  # the MTP's entries for the prompt: (h_j, Emb(t_{j+1})), j < P - 1, once per prompt
        real = mask[:, :-1] & mask[:, 1:]
        mtp(h[:, :-1], model.embed(ids[:, 1:]), model.freqs_cis[pos[:, :-1].clamp_min(0)],
            attention_mask(F.pad(real, (0, 1)), 0, P - 1), real, mtp_cache[0], 0)
        mtp_valid[:, :P - 1] = real[group]
    mtp_cache = expand_cache(mtp_cache, group, cap - P)
    out_tok = ids.new_full((N, max_new_tokens), pad_id)
    out_logp = torch.zeros(N, max_new_tokens, device=device)
    n_out = ids.new_zeros(N)  # tokens emitted by each row
    ended = torch.zeros(N, dtype=torch.bool, device=device)  # wrote an end token
    done = torch.zeros_like(ended)  # ended, or max_new_tokens written
    rows = torch.arange(N, device=device)

    def emit(tok, logp, ok):
        """Append tok (N,) with its log-prob where ok, to rows that still run; returns who wrote."""
        ok = ok & ~done
        at = n_out.clamp_max(max_new_tokens - 1)
        out_tok[rows[ok], at[ok]], out_logp[rows[ok], at[ok]] = tok[ok], logp[ok]
        n_out.add_(ok.long())
        ended.logical_or_(ok & (tok == eos_id))
        done.logical_or_(ended | (n_out >= max_new_tokens))
        return ok

    def draft(hidden, nxt, slot, slot_pos, where):
        """MTP entries at `slot` ((N, T) main hidden states beside the embeddings of the tokens
        after them) and the draft read at column `where` (N,): (draft (N,), its sampling log-probs
        (N, V))."""
        x = draft_block(model, hidden, nxt, slot_pos, torch.tensor(slot, device=device),
                        mtp_valid, mtp_cache[0])  # (N, T, D)
        q = sampling_logprobs(model.head(mtp.norm(x[rows, where])), **sample)  # (N, V)
        d = q.argmax(-1) if greedy else torch.multinomial(q.exp(), 1, generator=generator)[:, 0]
        return d, q

    # the first token from the prefill, and the first draft from the last prompt slot
    p = sampling_logprobs(model.head(model.norm(h[group, -1])), **sample)  # (N, V)
    t = p.argmax(-1) if greedy else torch.multinomial(p.exp(), 1, generator=generator)[:, 0]
    emit(t, p.gather(1, t[:, None])[:, 0], torch.ones_like(ended))
    t_pos = mask[group].long().sum(1)  # (N,) the position of t
    mtp_valid[:, P - 1] = True
    d, q = draft(h[group, -1:], t[:, None], P - 1, (t_pos - 1)[:, None], torch.zeros_like(t))
    slot, forwards = P, ids.new_ones(N)
    proposed = accepted = 0
    while not done.all():
        live = ~done
        # ---- verify: the main model over [t, d] at two new slots
        valid[:, slot:slot + 2] = live[:, None]
        two_pos = t_pos[:, None] + torch.arange(2, device=device)  # (N, 2)
        logits, h2 = verify(model, torch.stack([t, d], 1), two_pos,
                            torch.tensor(slot, device=device), valid, cache)
        p0, p1 = sampling_logprobs(logits, **sample).unbind(1)  # (N, V) each
        ok, fix = verify_draft(p0, q, d, greedy, generator)
        bonus = (p1.argmax(-1) if greedy
                 else torch.multinomial(p1.exp(), 1, generator=generator)[:, 0])
        proposed += int(live.sum())
        accepted += int((ok & live).sum())
        forwards += live.long()
        # ---- emit: d and the bonus token if d was accepted, else the correction
        first = torch.where(ok, d, fix)
        wrote = emit(first, p0.gather(1, first[:, None])[:, 0], live)
        emit(bonus, p1.gather(1, bonus[:, None])[:, 0], wrote & ok)
        valid[:, slot + 1] &= ok  # a rejected draft's slot is rolled back
        # ---- the MTP's entries at both slots (each beside its next token) and the next draft
        mtp_valid[:, slot], mtp_valid[:, slot + 1] = live, live & ok
        nxt = torch.stack([first, bonus], 1)  # the token after t, and after d when d was kept
        t = torch.where(ok, bonus, fix)
        d, q = draft(h2, nxt, slot, two_pos, ok.long())
        t_pos = torch.where(live, t_pos + 1 + ok.long(), t_pos)  # ended rows stay put
        t_pos = t_pos.clamp_max(model.cfg.max_seq_len - 2)
        slot += 2
    L = int(n_out.max())
    stats = {"proposed": proposed, "accepted": accepted, "acceptance": accepted / max(proposed, 1),
             "tokens_per_forward": (n_out.float() / forwards.float()).mean().item(),
             "main_forwards": int(forwards.max())}
    return out_tok[:, :L], out_logp[:, :L], ended, stats


# ----------------------------------------------------------------------------------------------
# Evaluation

def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@k needs n >= k samples, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(answers, truth):
    """maj@k for one prompt: is the most frequent parsed answer (malformed ones do not vote) the
    true one? Ties go to the answer seen first."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    best = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == best)
    return winner == truth


def decode_completions(tok, rollout):
    """Completion texts up to the first end token; a stray special token reads as '?'
    (malformed)."""
    return [tok.decode(row, strict=True) for row in rollout.completion_ids.tolist()]


@torch.no_grad()
def evaluate(model, tok, task, problems, *, k=0, n_samples=0, mean_of=0, temperature=1.0,
             batch_size=256, max_new_tokens=None, generator=None, mla_impl="absorbed"):
    """Greedy exact-match accuracy over `problems`; with k > 0 also pass@k (unbiased, from
    n_samples >= k samples per prompt) and maj@k (vote over the first k samples). k may be a list:
    pass@k and maj@k for each k, from the same samples. mean_of > 0 draws at least that many
    samples (even with k = 0). Whenever it samples: mean@n, the mean accuracy of the n samples
    (DeepSeek-R1's metric). A task whose completions may think (`task.thinks`) adds their mean
    length, how often they think, and the accuracy of those that do and do not."""
    if max_new_tokens is None:  # room for the end token, and one more
        max_new_tokens = max(len(tok.encode(p.completion)) for p in problems) + 2
    prompts = [tasks.encode_problem(tok, p, with_completion=False)[0] for p in problems]
    kw = dict(eos_id=tok.eos_id, pad_id=tok.pad_id, max_new_tokens=max_new_tokens,
              mla_impl=mla_impl)
    thinks = hasattr(task, "thinks")
    figures = lambda *a: completion_figures(task, *a) if thinks else {}  # noqa: E731
    texts, lengths = [], []
    for i in range(0, len(prompts), batch_size):
        r = generate(model, prompts[i:i + batch_size], temperature=0.0, **kw)
        texts += decode_completions(tok, r)
        lengths += r.completion_mask.sum(1).tolist() if thinks else []
    right = list(map(task.reward, texts, problems))
    metrics = {"greedy_acc": sum(right) / len(problems),
               **figures(texts, right, lengths, "greedy_")}
    ks = [kk for kk in ([k] if isinstance(k, int) else list(k)) if kk > 0]
    n = max([n_samples] * bool(ks) + [mean_of] + ks)
    if n > 0:
        per_batch = max(1, batch_size // n)
        pass_k, maj_k, sampled, right, lengths = dict.fromkeys(ks, 0.0), dict.fromkeys(ks, 0.0), \
            [], [], []
        for i in range(0, len(prompts), per_batch):
            r = generate(model, prompts[i:i + per_batch], num_generations=n,
                         temperature=temperature, generator=generator, **kw)
            comps = decode_completions(tok, r)
            sampled += comps
            lengths += r.completion_mask.sum(1).tolist() if thinks else []
            for j, p in enumerate(problems[i:i + per_batch]):
                group = comps[j * n:(j + 1) * n]
                right += [task.reward(x, p) for x in group]
                answers = [task.parse_answer(x) for x in group]
                for kk in ks:
                    pass_k[kk] += pass_at_k(n, int(sum(right[-n:])), kk)
                    maj_k[kk] += majority_correct(answers[:kk], p.answer)
        for kk in ks:
            metrics[f"pass@{kk}"] = pass_k[kk] / len(problems)
            metrics[f"maj@{kk}"] = maj_k[kk] / len(problems)
        metrics[f"mean@{n}"] = sum(right) / len(right)
        metrics.update(figures(sampled, right, lengths, ""))
    return metrics


def completion_figures(task, completions, correct, lengths, prefix=""):
    """Of a batch of completions (their texts, whether each is right, their lengths in tokens, the
    end token included): the mean length of all, of the correct and of the wrong ones; for a task
    whose completions may think, the share that do (think_rate) and the accuracy of those that do
    and do not. None where there is nothing to average."""
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    pick = lambda xs, keep: [x for x, k in zip(xs, keep) if k]  # noqa: E731
    wrong = [not c for c in correct]
    out = {f"{prefix}len": mean(lengths), f"{prefix}len_correct": mean(pick(lengths, correct)),
           f"{prefix}len_wrong": mean(pick(lengths, wrong))}
    if hasattr(task, "thinks"):
        thinks = [task.thinks(c) for c in completions]
        out.update({f"{prefix}think_rate": mean(thinks),
                    f"{prefix}acc_thinking": mean(pick(correct, thinks)),
                    f"{prefix}acc_direct": mean(pick(correct, [not t for t in thinks]))})
    return out


@torch.no_grad()
def correct_samples(model, tok, task, problems, num_generations, generator, temperature=1.0):
    """Rejection sampling: num_generations completions of each problem from `model`, the correct
    ones (an end token, the right answer) kept as `<bos> prompt completion <eos>` token lists with
    the index where the completion starts. Returns (those sequences, the number of problems solved
    at least once)."""
    G, seqs, solved, per = num_generations, [], 0, max(1, 256 // num_generations)
    for i in range(0, len(problems), per):
        batch = problems[i:i + per]
        prompts = [tasks.encode_problem(tok, p, with_completion=False)[0] for p in batch]
        with common.autocast():
            r = generate(model, prompts, eos_id=tok.eos_id, pad_id=tok.pad_id, num_generations=G,
                         max_new_tokens=task.max_new_tokens(), temperature=temperature,
                         generator=generator)
        texts, lengths = decode_completions(tok, r), r.completion_mask.sum(1).long().tolist()
        for j, p in enumerate(batch):
            right = [k for k in range(j * G, (j + 1) * G)
                     if r.ended[k] and task.reward(texts[k], p) == 1.0]
            seqs += [(prompts[j] + r.completion_ids[k, :lengths[k]].tolist(), len(prompts[j]))
                     for k in right]
            solved += bool(right)
    return seqs, solved


def print_samples(model, tok, task, problems, generator, label):
    """A completion the model samples for each problem, printed with whether it is right."""
    prompts = [tasks.encode_problem(tok, p, with_completion=False)[0] for p in problems]
    r = generate(model, prompts, eos_id=tok.eos_id, pad_id=tok.pad_id,
                 max_new_tokens=task.max_new_tokens(), generator=generator)
    for p, c in zip(problems, decode_completions(tok, r)):
        right = "correct" if task.reward(c, p) else "wrong"
        tqdm.write(f"  {label} sample: {p.prompt}{c}  ({right})")


# ----------------------------------------------------------------------------------------------
# Preference pairs (DPO, the reward model)


@torch.no_grad()
def make_pairs(model, tok, task, problems, source="policy", num_generations=8, temperature=1.0,
               max_new_tokens=None, generator=None, rng=None, batch_size=256):
    """Preference pairs for `problems`, each a dict of the prompt's and both completions' token ids
    (the end token included) and text:
    - source "policy": sample num_generations completions per problem from `model`; chosen is a
      correct sample (the reference solution when none is), rejected an incorrect one; a problem
      whose samples are all correct gives no pair.
    - source "synthetic": chosen is the reference, rejected `task.near_miss` (one digit changed, off
      by one, a dropped carry): one pair per problem.
    Ties are broken by rng (a random.Random) so that the pairs are reproducible."""
    rng = rng or random.Random(0)
    prompt_ids = [tasks.encode_problem(tok, p, with_completion=False)[0] for p in problems]
    reference = [tok.encode(p.completion) + [tok.eos_id] for p in problems]
    if source == "synthetic":
        wrong = [tok.encode(task.near_miss(p, rng)) + [tok.eos_id] for p in problems]
        return [_pair(tok, p, ids, c, r)
                for p, ids, c, r in zip(problems, prompt_ids, reference, wrong)]
    if source != "policy":
        raise ValueError(f"pair source must be policy or synthetic, got {source!r}")
    G, pairs = num_generations, []
    max_new_tokens = max_new_tokens or max(len(c) for c in reference) + 1
    per = max(1, batch_size // G)
    for i in range(0, len(problems), per):
        r = generate(model, prompt_ids[i:i + per], eos_id=tok.eos_id, pad_id=tok.pad_id,
                     num_generations=G, max_new_tokens=max_new_tokens, temperature=temperature,
                     generator=generator)
        texts = decode_completions(tok, r)
        lengths = r.completion_mask.sum(1).long().tolist()  # up to and including the end token
        for j, p in enumerate(problems[i:i + per]):
            rows = range(j * G, (j + 1) * G)
            good = [k for k in rows if task.reward(texts[k], p) == 1.0]
            bad = [k for k in rows if task.reward(texts[k], p) == 0.0]
            if not bad:
                continue  # every sample right: nothing to prefer
            ids = lambda k: r.completion_ids[k, :lengths[k]].tolist()  # noqa: E731
            chosen = ids(rng.choice(good)) if good else reference[i + j]
            pairs.append(_pair(tok, p, prompt_ids[i + j], chosen, ids(rng.choice(bad))))
    return pairs


def _pair(tok, problem, prompt_ids, chosen_ids, rejected_ids):
    return {"prompt": problem.prompt, "answer": problem.answer, "prompt_ids": prompt_ids,
            "chosen_ids": chosen_ids, "rejected_ids": rejected_ids,
            "chosen": tok.decode(chosen_ids, strict=True),
            "rejected": tok.decode(rejected_ids, strict=True)}


def save_pairs(path, pairs, settings):
    """JSONL: a first line {"settings": ...} (what made the pairs, and how many of each split: a
    file cut short is then found), then one pair per line; written atomically."""
    counts = {split: sum(p["split"] == split for p in pairs) for split in ("train", "heldout")}
    common.write_jsonl(path, [{"settings": {**settings, "pairs": counts}}] + list(pairs))


def load_pairs(path, task=None, max_new_tokens=None):
    """(pairs, settings) from a file written by save_pairs; a one-line common.ConfigError if it is
    not one (or is cut short, or holds token ids that are not the tokenizer's), or, given a task,
    if its pairs are of another task or digit count or have prompts longer than the task's, or
    completions longer than max_new_tokens."""
    def bad(why):
        return common.ConfigError(f"{path} is not a pairs file written by save_pairs ({why})")
    try:
        lines = common.read_jsonl(path)
    except (OSError, ValueError) as e:
        raise bad(type(e).__name__) from None
    settings = lines[0].get("settings") if lines and isinstance(lines[0], dict) else None
    if not isinstance(settings, dict):
        raise bad("no settings line")
    vocab = (task.tokenizer() if task else tasks.Tokenizer(think=True)).vocab_size  # or the most
    pairs = lines[1:]
    counts = {split: sum(isinstance(p, dict) and p.get("split") == split for p in pairs)
              for split in ("train", "heldout")}
    # (a file written before the counts were recorded has none: its pairs are still checked)
    if len(pairs) != sum(counts.values()) or counts != settings.get("pairs", counts):
        raise bad(f"it holds {counts} pairs, its settings line {settings.get('pairs')}: cut short?")
    made = (settings.get("task"), settings.get("n_digits"))
    if task is not None and made != (task.name, task.n_digits):
        raise common.ConfigError(f"{path} holds pairs of task {made[0]} with {made[1]} digits, not "
                                 f"{task.name} with {task.n_digits}")
    longest = (1 + task.max_lengths()[0], max_new_tokens or math.inf) if task else (math.inf,) * 2
    for n, p in enumerate(pairs, 2):
        for key, limit in (("prompt_ids", longest[0]), ("chosen_ids", longest[1]),
                           ("rejected_ids", longest[1])):
            ids = p.get(key)
            if not (isinstance(ids, list) and ids and all(
                    type(t) is int and 0 <= t < vocab for t in ids)):
                raise bad(f"line {n}: {key} must be a non-empty list of token ids < {vocab}")
            if len(ids) > limit:
                raise common.ConfigError(f"{path} line {n}: {key} has {len(ids)} tokens, more "
                                         f"than this run's {limit}")
        refs = [p.get(k, "absent") for k in ("ref_chosen_logp", "ref_rejected_logp")]
        if refs != ["absent"] * 2 and not all(type(v) in (int, float) and math.isfinite(v)
                                              for v in refs):
            raise bad(f"line {n}: reference log-probs must be two finite numbers, or none")
    return pairs, settings
