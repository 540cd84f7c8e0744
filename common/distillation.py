"""Distillation losses on whole tensors, and the masking of the language-modelling objectives.

The pruning script's teacher distillation uses these directly (its logits are start/end positions, not a
vocabulary); the distillation script uses the cosine loss on hidden states and the masking here, and computes
its vocabulary-sized terms through the output projection in chunks (common/fused_loss.py), tested equal to
these functions on whole logits. All take tensors; callers read model outputs by name (`outputs.start_logits`,
`outputs.logits`, `outputs.hidden_states`), never by tuple position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) between the temperature-softened distributions over the last dimension,
    scaled by T^2 (Hinton et al.) so its gradients keep their size as T changes; averaged over the rows
    (the positions where `mask` is true, if given). Same gradient as the soft cross-entropy: they differ
    by the teacher's entropy, a constant."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    s = student_logits.float()
    t = teacher_logits.float()
    if mask is not None:
        s, t = s[mask], t[mask]
    s = s.reshape(-1, s.shape[-1])
    t = t.reshape(-1, t.shape[-1])
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    kl = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.softmax(t / temperature, dim=-1), reduction="batchmean")
    return kl * temperature**2


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between two tensors of the same shape, over the masked positions (all if None)."""
    diff = (student.float() - teacher.float()) ** 2
    if mask is None:
        return diff.mean()
    m = mask.unsqueeze(-1).expand_as(diff).to(diff.dtype)
    return (diff * m).sum() / m.sum().clamp_min(1.0)


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 - cosine similarity of hidden vectors (DistilBERT's cosine embedding loss with target 1), averaged
    over the masked positions (all if None; 0 if none). Masking by weights, not selection: no host sync."""
    s = student.float().reshape(-1, student.shape[-1])
    t = teacher.float().reshape(-1, teacher.shape[-1])
    distance = 1.0 - F.cosine_similarity(s, t, dim=-1)
    if mask is None:
        return distance.mean()
    keep = mask.reshape(-1).to(distance.dtype)
    return (distance * keep).sum() / keep.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------------------------------------
# masking for the language-modelling objectives (DistilBERT's MLM step follows XLM's)


def masking_probabilities(counts, smoothing: float, special_ids) -> torch.Tensor:
    """How likely each token id is to be chosen for prediction: counts ** -smoothing (XLM / word2vec's
    smoothing, which favours rare tokens; a count of 0 counts as 1), and never a special token."""
    counts_t = torch.as_tensor(counts, dtype=torch.float64).clamp_min(1.0)
    probs = counts_t ** -float(smoothing)
    for idx in special_ids:
        probs[int(idx)] = 0.0
    return probs.float()


def mlm_mask(token_ids: torch.Tensor, attention_mask: torch.Tensor, token_probs: torch.Tensor, mask_prop: float,
             pred_probs: torch.Tensor, mask_id: int, vocab_size: int,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DistilBERT's masking of one batch: ceil(mask_prop * real tokens) positions are drawn without
    replacement, each with probability proportional to `token_probs[token]` (so special tokens and padding
    are never drawn); each drawn token becomes [MASK], stays, or becomes a random id with the probabilities
    `pred_probs` = (word_mask, word_keep, word_rand). Returns (input ids, labels: the original id at drawn
    positions and -100 elsewhere). Uses the global RNG unless a generator is given."""
    real = attention_mask.bool()
    flat_ids = token_ids.reshape(-1)
    weights = token_probs.to(token_ids.device)[flat_ids] * real.reshape(-1)
    n_target = min(math.ceil(mask_prop * int(real.sum())), int((weights > 0).sum()))
    labels = torch.full_like(flat_ids, -100)
    inputs = flat_ids.clone()
    if n_target > 0:
        chosen = torch.multinomial(weights / weights.sum(), n_target, replacement=False, generator=generator)
        originals = flat_ids[chosen]
        action = torch.multinomial(pred_probs.to(weights), n_target, replacement=True, generator=generator)
        random_ids = torch.randint(vocab_size, (n_target,), device=flat_ids.device, generator=generator)
        replaced = torch.where(action == 0, torch.full_like(originals, mask_id),
                               torch.where(action == 1, originals, random_ids))
        inputs[chosen] = replaced
        labels[chosen] = originals
    return inputs.view_as(token_ids), labels.view_as(token_ids)


def clm_labels(token_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Causal-LM labels: the ids themselves, -100 at padding (the shift happens in the loss)."""
    return token_ids.masked_fill(~attention_mask.bool(), -100)


def lm_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> torch.Tensor:
    """Mean cross-entropy over the positions with a label (-100: none); for a causal LM position t predicts the
    label at t + 1. Zero (with a gradient path) when no position has a label."""
    if causal:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    labels = labels.reshape(-1)
    if not bool((labels != -100).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels, ignore_index=-100)


def fixed_mlm_mask(token_ids: torch.Tensor, attention_mask: torch.Tensor, example_ids, special_ids,
                   mask_prop: float, mask_id: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masking for evaluation that depends only on each example (its id and `seed`), never on the batch, the
    rank or the global RNG, so two models, or one and several processes, are scored on the same positions:
    ceil(mask_prop * its non-special tokens) positions (at least one) become [MASK]. CPU tensors in and out;
    returns (input ids, labels with -100 where nothing is predicted)."""
    special = torch.zeros_like(token_ids, dtype=torch.bool)
    for idx in special_ids:
        special |= token_ids == int(idx)
    candidates = attention_mask.bool() & ~special
    inputs = token_ids.clone()
    labels = torch.full_like(token_ids, -100)
    for row, example in enumerate(example_ids):
        positions = torch.nonzero(candidates[row]).reshape(-1)
        if len(positions) == 0:
            continue
        gen = torch.Generator().manual_seed(int(seed) * 1000003 + int(example))
        k = max(1, math.ceil(mask_prop * len(positions)))
        chosen = positions[torch.randperm(len(positions), generator=gen)[:k]]
        labels[row, chosen] = token_ids[row, chosen]
        inputs[row, chosen] = mask_id
    return inputs, labels
