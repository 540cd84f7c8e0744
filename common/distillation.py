"""Distillation losses shared by the pruning script (teacher on SQuAD) and the distillation script (LM).

All take logits or hidden states as tensors; callers read model outputs by name (`outputs.start_logits`,
`outputs.logits`, `outputs.hidden_states`), never by tuple position.
"""

from __future__ import annotations

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
    over the masked positions (all if None)."""
    s = student.float().reshape(-1, student.shape[-1])
    t = teacher.float().reshape(-1, teacher.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1).bool()
        s, t = s[keep], t[keep]
    if s.shape[0] == 0:
        return student.sum() * 0.0
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
