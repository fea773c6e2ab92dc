"""Every loss and estimator as a pure function of tensors and masks.

- `token_logprobs`: the one log-prob helper every algorithm uses.

Shape legend: B batch (sequences), T time, V vocabulary.
"""
import torch.nn.functional as F


def token_logprobs(logits, targets):
    """log pi(target_t | context_<=t) for every position.

    logits: (B, T, V) where logits[:, t] predicts targets[:, t]; targets: (B, T) -> (B, T) float32.
    (The caller aligns them: for a sequence x, logits[:, :-1] predict x[:, 1:].)"""
    B, T, V = logits.shape
    return -F.cross_entropy(logits.float().reshape(B * T, V), targets.reshape(B * T), reduction="none").view(B, T)
