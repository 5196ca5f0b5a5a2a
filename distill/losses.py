"""Knowledge-distillation losses: small pure functions, the math in the docstrings.

Notation, for one token position with student logits ``s`` and teacher logits ``t`` over the
shared vocabulary, at temperature ``T``::

    p_S = softmax(s / T)        p_T = softmax(t / T)

    forward KL   KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v))   # mode-covering
    reverse KL   KL(p_S || p_T) = sum_v p_S(v) (log p_S(v) - log p_T(v))   # mode-seeking
    JSD(beta)    beta KL(p_T || M) + (1 - beta) KL(p_S || M),  M = beta p_T + (1 - beta) p_S

``beta`` weighs the *teacher* end of the mixture. As beta -> 0, JSD(beta) / beta -> forward KL and as
beta -> 1, JSD(beta) / (1 - beta) -> reverse KL, so the endpoints are defined as those two KLs
(the convention of the GKD paper, Agarwal et al. 2024, and of TRL).

Everything is computed in fp32 log-space whatever the model dtype: bf16 log-softmax over a large
vocabulary loses the small probabilities that the KL is made of.

Masks and normalisation follow Hugging Face's causal-LM convention: ``labels`` are the unshifted
input ids with -100 on positions that are not targets; the logits at position i are scored against
the label at i + 1. The loss is a *sum over real tokens divided by the number of real tokens in the
whole optimizer step* (``num_items_in_batch``, which ``Trainer`` counts over all gradient-accumulation
micro-batches), so that 2 x 4 accumulated micro-batches give the same gradient as one batch of 8.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim, from log-probabilities; 0 * log 0 counts as 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")


def divergence(log_s: torch.Tensor, log_t: torch.Tensor, loss_type: str = "forward_kl", beta: float = 0.5):
    """The divergence D(p_T, p_S) per row, from normalised log-probabilities over the last dim.

    The one definition every path is measured against: the full vocabulary (``log_s``, ``log_t``
    from a log-softmax), or the k + 1 buckets of top-k targets. Differentiable by autograd.
    """
    _check_loss_type(loss_type)
    if loss_type == "forward_kl" or (loss_type == "jsd" and beta == 0.0):
        return _kl(log_t, log_s)
    if loss_type == "reverse_kl" or (loss_type == "jsd" and beta == 1.0):
        return _kl(log_s, log_t)
    # log M = logsumexp(log beta + log p_T, log(1 - beta) + log p_S): stays finite where p is tiny.
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1.0 - beta)]), dim=0)
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) over rows as a batched matmul: no temporary of a's size."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1)


def divergence_and_grad_(log_s: torch.Tensor, log_t: torch.Tensor, loss_type: str, beta: float):
    """(D per row, dD/da): :func:`divergence` of 2-d ``(rows, n)`` inputs and its gradient in closed
    form, with respect to any student logits ``a`` whose log-softmax is ``log_s``.

    With ``p_S = exp(log_s)``, ``p_T = exp(log_t)``::

        forward KL   dD/da = p_S - p_T
        reverse KL   dD/da = p_S * (log p_S - log p_T - D)
        JSD(beta)    dD/da = (1 - beta) p_S * (log p_S - log M - KL(p_S || M))

    (the softmax Jacobian applied to dD/dp_S = -p_T / p_S, log p_S - log p_T + 1 and
    (1 - beta)(log p_S - log M) + const). The chunked losses use it on a chunk's full vocabulary and on
    top-k buckets; its own tests hold it to autograd of :func:`divergence` in float64.

    Consumes its inputs: both are overwritten, and the gradient is returned in ``log_s``'s storage,
    so that a chunk of vocabulary-sized rows costs one extra buffer. No "0 log 0" guard is needed
    here: the inputs are finite log-probabilities, so a p that underflows to 0 multiplies a finite
    number.
    """
    _check_loss_type(loss_type)
    if loss_type == "forward_kl" or (loss_type == "jsd" and beta == 0.0):
        p_t = log_t.exp()
        div = _rowdot(p_t, log_t.sub_(log_s))
        return div, log_s.exp_().sub_(p_t)
    if loss_type == "reverse_kl" or (loss_type == "jsd" and beta == 1.0):
        p_s = log_s.exp()
        diff = log_s.sub_(log_t)  # log p_S - log p_T
        kl = _rowdot(p_s, diff)
        return kl, diff.sub_(kl[:, None]).mul_(p_s)
    log_m = log_t + math.log(beta)
    torch.logaddexp(log_m, log_s + math.log(1.0 - beta), out=log_m)
    p_t = log_t.exp()
    div_t = _rowdot(p_t, log_t.sub_(log_m))
    del p_t, log_t
    p_s = log_s.exp()
    diff = log_s.sub_(log_m)  # log p_S - log M
    del log_m
    kl_s = _rowdot(p_s, diff)
    grad = diff.sub_(kl_s[:, None]).mul_(p_s).mul_(1.0 - beta)
    return beta * div_t + (1.0 - beta) * kl_s, grad


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-position divergence between teacher and student, shape ``logits.shape[:-1]``, in fp32.

    Both sides are divided by ``temperature`` before the softmax. The result is *not* multiplied by
    T^2; :func:`distillation_loss` does that, so that this function stays a plain divergence.
    """
    _check_loss_type(loss_type)
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return divergence(log_s, log_t, loss_type, beta)


def shared_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor):
    """Trim both logits to the ids they share.

    Within one model family the embedding matrix is often padded past the tokenizer (to a multiple
    of 64 or 128 for speed), so teacher and student can have different logit widths for the same
    tokenizer. The padded ids are never targets; the softmax is taken over the shared ids only.
    Checking that the *tokenizers* agree is the caller's job (see ``distill.models``).
    """
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :v], teacher_logits[..., :v]


class DistillationLoss(NamedTuple):
    loss: torch.Tensor  # alpha * kd + (1 - alpha) * ce, what the optimizer sees
    kd: torch.Tensor  # T^2-scaled divergence, normalised like the loss
    ce: torch.Tensor  # cross-entropy with the labels, normalised like the loss
    num_tokens: torch.Tensor  # real (non -100) target tokens in this micro-batch


def shift_for_causal_lm(logits: torch.Tensor, labels: torch.Tensor):
    """Align position i's logits with label i + 1 and flatten to (tokens, vocab), (tokens,)."""
    return logits[:, :-1, :].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    loss_type: str = "forward_kl",
    beta: float = 0.5,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> DistillationLoss:
    """``alpha * T^2 * D(teacher, student) + (1 - alpha) * CE(student, labels)``, mean over real tokens.

    Args:
        student_logits, teacher_logits: ``(batch, seq, vocab)``; vocabularies may differ in padding.
        labels: ``(batch, seq)`` unshifted, -100 where a position is not a target (padding, prompt).
        num_items_in_batch: real target tokens in the whole optimizer step (all accumulation
            micro-batches, all processes when the Trainer averages across devices). ``None`` means
            "this micro-batch is the whole step" and the denominator is its own token count.

    The T^2 factor keeps the gradient of the soft term on the same scale as the hard term when T
    changes (Hinton et al. 2015): d/ds of the tempered KL shrinks as 1/T^2.

    A micro-batch with no real token returns exact zeros that still carry a (zero) gradient, never
    NaN: the denominator is clamped to 1 and masked positions are removed by multiplication.
    """
    student_logits, teacher_logits = shared_vocab(student_logits, teacher_logits)
    s, y = shift_for_causal_lm(student_logits, labels)
    t, _ = shift_for_causal_lm(teacher_logits, labels)
    mask = y.ne(IGNORE_INDEX)
    num_tokens = mask.sum()
    denom = num_items_in_batch if num_items_in_batch is not None else num_tokens
    denom = torch.as_tensor(denom, device=s.device, dtype=torch.float32).clamp(min=1)

    zero = s.new_zeros((), dtype=torch.float32)
    div = token_divergence(s, t, loss_type, temperature, beta)
    kd = torch.where(mask, div, zero).sum() * (temperature**2) / denom
    ce_tok = F.cross_entropy(s.float(), y.clamp(min=0), reduction="none")
    ce = torch.where(mask, ce_tok, zero).sum() / denom
    loss = alpha * kd + (1.0 - alpha) * ce
    return DistillationLoss(loss, kd.detach(), ce.detach(), num_tokens)


@torch.no_grad()
def top1_agreement(student_top1: torch.Tensor, teacher_top1: torch.Tensor, labels: torch.Tensor):
    """(matches, tokens): how often the student's most likely next token is the teacher's, on target
    positions. ``*_top1``: ``(batch, seq)`` argmax ids aligned with the logits (position i predicts
    label i + 1), over the shared vocabulary: from logits (``shared_vocab`` then argmax), from hidden
    states (:func:`distill.chunked.top1_rows`) or from top-k targets (their first id)."""
    mask = labels[:, 1:].ne(IGNORE_INDEX)
    matches = (student_top1[:, :-1].eq(teacher_top1[:, :-1]) & mask).sum()
    return matches, mask.sum()


# --- Top-k teacher targets ------------------------------------------------------------------------
#
# An offline teacher cache cannot store a 128k-wide distribution per token. It stores the teacher's
# k most likely ids, their log-probabilities, and the log of the mass left over (the "tail"). The
# divergences are then taken between two distributions on k + 1 outcomes: the k ids, and "any
# other id". For the student, the tail is the mass its softmax puts outside the teacher's ids.
# Merging outcomes can only lose information, so each top-k divergence is <= the full one (data
# processing inequality); at k = vocab there is nothing to merge and it *is* the full one.
#
# Temperature: the targets are log-probabilities at the temperature they were computed with. The
# ids would be the same at every temperature (scaling logits keeps their order) but the tail mass
# would not, and it depends on the logits that were dropped. So targets made at T serve a loss at
# the same T only; the teacher cache records T and refuses a run with another one.


class TopKTargets(NamedTuple):
    logprobs: torch.Tensor  # (..., k) log p_T(v) on `ids`, at the temperature they were made with
    ids: torch.Tensor  # (..., k) integer ids, distinct, < the shared vocabulary size
    tail: torch.Tensor  # (...,) log(1 - sum(exp(logprobs))): the mass on all other ids; -inf if k = vocab


@torch.no_grad()
def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopKTargets:
    """The top-k targets of ``softmax(teacher_logits / T)``, in fp32.

    The tail is a logsumexp over the other ids, not ``log(1 - sum p)``: the subtraction cancels
    catastrophically when the top k hold nearly all the mass, the case that matters.
    """
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    logprobs, ids = log_t.topk(k, dim=-1)
    tail = log_t.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return TopKTargets(logprobs, ids, tail)


def topk_log_buckets(log_s: torch.Tensor, targets: TopKTargets):
    """(student, teacher) log-probabilities on the k + 1 outcomes: the teacher's ids, then the tail.

    ``log_s`` is the student's log-softmax over the same vocabulary. At k = vocab the tail is empty
    for both and is left out (its -inf - -inf would poison the gradients).
    """
    ids = targets.ids.long()
    log_s_k = log_s.gather(-1, ids)
    log_t_k = targets.logprobs.to(log_s.dtype)
    if ids.shape[-1] == log_s.shape[-1]:
        return log_s_k, log_t_k
    tail_s = log_s.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    tail_t = targets.tail.to(log_s.dtype).unsqueeze(-1)
    return torch.cat([log_s_k, tail_s], -1), torch.cat([log_t_k, tail_t], -1)


def topk_token_divergence(
    student_logits: torch.Tensor,
    targets: TopKTargets,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-position divergence between the top-k teacher targets and the student, over k + 1 outcomes.

    Same definitions, beta convention and fp32 log-space as :func:`token_divergence`; not T^2-scaled.
    ``student_logits`` span the vocabulary the targets were computed on.
    """
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return divergence(*topk_log_buckets(log_s, targets), loss_type, beta)


def topk_distillation_loss(
    student_logits: torch.Tensor,
    targets: TopKTargets,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    loss_type: str = "forward_kl",
    beta: float = 0.5,
    num_items_in_batch: int | torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> DistillationLoss:
    """:func:`distillation_loss` with the teacher given as :class:`TopKTargets`.

    Args:
        targets: ``(batch, seq, k)`` (``tail``: ``(batch, seq)``), aligned with ``student_logits``
            like teacher logits would be (position i predicts label i + 1). Positions that are not
            targets may hold any finite values.
        vocab_size: the vocabulary the targets were computed on (the teacher/student shared ids);
            a wider student is trimmed to it. ``None``: the student's own width.
    """
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
    s, y = shift_for_causal_lm(student_logits, labels)
    mask = y.ne(IGNORE_INDEX)
    num_tokens = mask.sum()
    denom = num_items_in_batch if num_items_in_batch is not None else num_tokens
    denom = torch.as_tensor(denom, device=s.device, dtype=torch.float32).clamp(min=1)
    # Only target rows are scored: the targets of other positions need not be meaningful.
    s, y = s[mask], y[mask]
    t = TopKTargets(*(x[:, :-1].reshape(-1, *x.shape[2:])[mask] for x in targets))
    kd = topk_token_divergence(s, t, loss_type, temperature, beta).sum() * (temperature**2) / denom
    ce = F.cross_entropy(s.float(), y, reduction="sum") / denom
    loss = alpha * kd + (1.0 - alpha) * ce
    return DistillationLoss(loss, kd.detach(), ce.detach(), num_tokens)


# --- Cross-tokenizer losses -----------------------------------------------------------------------
#
# When the teacher has another tokenizer, its top-k targets live in its own vocabulary and on its own
# positions. `distill.xtoken` aligns positions (student position i <-> teacher position alignment[i],
# both predicting what follows the same byte) and maps vocabularies (a `VocabMap`: student token s
# sends its probability to teacher ids ids[s, c] with weights weights[s, c], summing to 1; NO_TOKEN = -1
# sends it nowhere). Three ways to compare the two distributions at an aligned position:
#
#   projected   the student's distribution pushed into the teacher's space,
#                   q_T(t) = sum_s p_S(s) sum_c W[s, c] [ids[s, c] = t],
#               then D(p_T, q_T) over the teacher's k ids + the tail, exactly like the same-tokenizer
#               top-k loss (forward / reverse KL, JSD with beta = the teacher's weight). A teacher id no
#               student token maps to cannot be matched by any student; its mass joins the tail on
#               both sides (merging outcomes, as the top-k tail already does). X-Token's projection,
#               on top-k targets.
#   uld         ULD (Boizard et al. 2024): sorted L1 between the two distributions, blind to ids.
#   hybrid      GOLD-style: D on the teacher ids whose bytes are exactly one student token (+ one
#               bucket for everything else), plus the sorted L1 between the teacher's other top-k
#               probabilities and the student's highest probabilities outside the exact matches.
#
# With identical tokenizers (identity map, every position aligned) projected and hybrid are the
# same-tokenizer `topk_distillation_loss`; the tests hold them to it. Memory: the student's rows are
# what the model's logits already are; the teacher's vocabulary appears only in one (chunk_rows,
# V_teacher) index lookup, made and dropped chunk by chunk (autograd keeps it not), never
# (batch, seq, V_teacher).

XTOKEN_METHODS = ("projected", "uld", "hybrid")
_NEG_INF = float("-inf")


def projected_log_buckets(log_s: torch.Tensor, targets: TopKTargets, map_ids, map_log_w, reachable):
    """(student, teacher) log-probabilities on the teacher's k ids + the tail, the student projected.

    ``log_s``: (n, V_student) log-softmax; ``targets``: (n, k); ``map_ids``, ``map_log_w``: (V_student, m)
    teacher ids (NO_TOKEN = -1) and log-weights of the vocabulary map; ``reachable``: (V_teacher,) bool.

        log q_T(t) = logsumexp_{(s, c): ids[s, c] = t} (log p_S(s) + log W[s, c])      (t in the top k)
        log q_T(tail) = logsumexp over every (s, c) whose id is not in the top k (NO_TOKEN included)

    A bucket empty on both sides (a top-k id nothing maps to, whose teacher mass moved to the tail;
    or no tail at all) is written as log p = 0 on both sides: each divergence is a sum of per-bucket
    terms that vanish when the two probabilities are equal, and constants carry no gradient, so this
    is the divergence over the non-empty buckets, without -inf - -inf anywhere.
    """
    n, k = targets.ids.shape
    t_ids = targets.ids.long()
    # Each (s, c) entry's bucket: the slot of its teacher id among the top k, or k (the tail) for the
    # other ids and NO_TOKEN. The (n, V_teacher) lookup is the only teacher-vocabulary-sized tensor.
    slot_of = torch.full((n, reachable.numel()), k, dtype=torch.long, device=log_s.device)
    slot_of.scatter_(1, t_ids, torch.arange(k, device=log_s.device).expand(n, k))
    slot = slot_of.gather(1, map_ids.clamp(min=0).reshape(1, -1).expand(n, -1))
    del slot_of
    slot = torch.where(map_ids.ge(0).reshape(1, -1), slot, k)
    x = (log_s.unsqueeze(-1) + map_log_w).reshape(n, -1)  # log of the mass s sends to ids[s, c]
    # A logsumexp per bucket, by scatter: shift by the bucket's (detached) max, sum the exponentials.
    top = torch.full((n, k + 1), _NEG_INF, device=log_s.device).scatter_reduce(1, slot, x.detach(), "amax")
    shifted = torch.where(x.isfinite(), x - top.gather(1, slot), _NEG_INF)
    summed = torch.zeros(n, k + 1, device=log_s.device).scatter_add(1, slot, shifted.exp())
    # summed >= 1 in a bucket with mass (its max adds exp(0)); the clamp guards only the empty ones.
    log_b = top + summed.clamp(min=1).log()
    reach = reachable[t_ids]
    log_t = targets.logprobs.float()
    log_s_k, log_t_k = torch.where(reach, log_b[:, :k], 0.0), torch.where(reach, log_t, 0.0)
    tail_t = torch.cat([targets.tail.float().unsqueeze(-1), log_t.masked_fill(reach, _NEG_INF)], -1).logsumexp(-1)
    has_out = summed[:, k] > 0  # no student mass outside the top k: no tail bucket (k = vocab)
    tail_s, tail_t = torch.where(has_out, log_b[:, k], 0.0), torch.where(has_out, tail_t, 0.0)
    return torch.cat([log_s_k, tail_s.unsqueeze(-1)], -1), torch.cat([log_t_k, tail_t.unsqueeze(-1)], -1)


def sorted_l1(log_s: torch.Tensor, targets: TopKTargets) -> torch.Tensor:
    """ULD's sorted L1 per row, on top-k targets::

        sum_r |p_S^(r) - p_T^(r)|  +  |p_S(beyond its top k) - p_T(tail)|

    where ``p^(r)`` is a side's r-th largest probability (r < k). Ids do not matter, only the shapes
    of the two distributions. A lower bound of the full-vocabulary sorted L1 (the bucket merges
    mass), equal to it at k = vocab.
    """
    k, v_s = targets.ids.shape[-1], log_s.shape[-1]
    p_t = targets.logprobs.float().exp().sort(-1, descending=True).values
    top_s, top_ids = log_s.topk(min(k, v_s), -1)
    p_s = F.pad(top_s.exp(), (0, k - top_s.shape[-1]))
    l1 = (p_s - p_t).abs().sum(-1)
    if k >= v_s:
        return l1 + targets.tail.float().exp()
    rest_s = log_s.scatter(-1, top_ids, _NEG_INF).logsumexp(-1).exp()
    return l1 + (rest_s - targets.tail.float().exp()).abs()


def hybrid_divergence(log_s: torch.Tensor, targets: TopKTargets, exact_student_of, loss_type: str, beta: float):
    """Exact-match divergence + sorted L1 on the rest, per row.

    ``exact_student_of``: (V_teacher,) the student id with exactly teacher id t's bytes, or -1. With E
    the top-k ids that have one (and s(t) that student id)::

        D( [p_T(t)]_{t in E} + [1 - sum_E p_T],  [p_S(s(t))]_{t in E} + [1 - sum_E p_S(s(t))] )
        + sum_{r < k - |E|} |p_S^(r) - p_T^(r)|     over the teacher's top-k ids outside E and the
                                                    student's ids other than the s(t), each sorted
    """
    (n, k), v = targets.ids.shape, log_s.shape[-1]
    log_t = targets.logprobs.float()
    twin = exact_student_of[targets.ids.long()]
    exact = twin.ge(0)
    log_s_k = torch.where(exact, log_s.gather(-1, twin.clamp(min=0)), 0.0)
    log_t_k = torch.where(exact, log_t, 0.0)
    # Every slot writes True, an inexact one into a spare last column: where several slots write one
    # index they write the same value, so the scatter has one answer.
    matched = torch.zeros(n, v + 1, dtype=torch.bool, device=log_s.device)
    matched = matched.scatter_(-1, torch.where(exact, twin, v), True)[:, :v]
    # The lowest finite value, not -inf: a row with every id matched then has a finite logsumexp and
    # gradient (discarded below), where -inf would give NaN; elsewhere exp() of it is exactly 0.
    rest_log_s = log_s.masked_fill(matched, torch.finfo(log_s.dtype).min)
    has_rest = ~matched.all(-1)
    rest_s = rest_log_s.logsumexp(-1)
    rest_t = torch.cat([targets.tail.float().unsqueeze(-1), log_t.masked_fill(exact, _NEG_INF)], -1).logsumexp(-1)
    rest_s, rest_t = torch.where(has_rest, rest_s, 0.0), torch.where(has_rest, rest_t, 0.0)
    div = divergence(
        torch.cat([log_s_k, rest_s[:, None]], -1), torch.cat([log_t_k, rest_t[:, None]], -1), loss_type, beta
    )
    p_t_rest = log_t.exp().masked_fill(exact, 0.0).sort(-1, descending=True).values
    p_s_rest = F.pad(rest_log_s.topk(min(k, log_s.shape[-1]), -1).values.exp(), (0, max(0, k - log_s.shape[-1])))
    slots = torch.arange(k, device=log_s.device) < (~exact).sum(-1, keepdim=True)
    return div + ((p_s_rest - p_t_rest).abs() * slots).sum(-1)


def xtoken_token_divergence(
    student_logits: torch.Tensor,
    targets: TopKTargets,
    vocab_map,
    method: str = "projected",
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-row divergence (n,) between aligned rows: student logits (n, >= V_student) and the
    teacher's top-k targets (n, k), in fp32, not T^2-scaled, ``chunk_rows`` rows at a time (default:
    as many as keep a (rows, V_teacher) tensor near 2^24 elements)."""
    if method not in XTOKEN_METHODS:
        raise ValueError(f"unknown cross-tokenizer method {method!r}; choose one of {', '.join(XTOKEN_METHODS)}")
    _check_loss_type(loss_type)
    v_s, device = vocab_map.ids.shape[0], student_logits.device
    if method == "projected":
        active = vocab_map.weights.gt(0).any(0)  # columns that carry mass (the first, for first-token maps)
        map_ids = vocab_map.ids[:, active].to(device)
        map_log_w = vocab_map.weights[:, active].to(device).log()
        reachable = vocab_map.reachable().to(device)
    elif method == "hybrid":
        exact_student_of = vocab_map.exact_student_of().to(device)
    chunk = chunk_rows or max(1, 2**24 // vocab_map.teacher_vocab_size)
    out = []
    for i in range(0, student_logits.shape[0], chunk):
        log_s = F.log_softmax(student_logits[i : i + chunk, :v_s].float() / temperature, dim=-1)
        t = TopKTargets(*(x[i : i + chunk] for x in targets))
        if method == "projected":
            out.append(divergence(*projected_log_buckets(log_s, t, map_ids, map_log_w, reachable), loss_type, beta))
        elif method == "uld":
            out.append(sorted_l1(log_s, t))
        else:
            out.append(hybrid_divergence(log_s, t, exact_student_of, loss_type, beta))
    return torch.cat(out) if out else student_logits.new_zeros(0, dtype=torch.float32)


def xtoken_distillation_loss(
    student_logits: torch.Tensor,
    targets: TopKTargets,
    alignment: torch.Tensor,
    labels: torch.Tensor,
    vocab_map,
    *,
    method: str = "projected",
    alpha: float = 0.5,
    temperature: float = 1.0,
    loss_type: str = "forward_kl",
    beta: float = 0.5,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> DistillationLoss:
    """:func:`topk_distillation_loss` for a teacher with another tokenizer.

    Args:
        student_logits: ``(batch, seq, V)``, V >= the student tokenizer's length (``vocab_map`` rows);
            wider logits are trimmed to it, for the divergence and the cross-entropy alike.
        targets: the teacher's top-k targets on *its* positions, ``(batch, seq_teacher, k)``.
        alignment: ``(batch, seq)`` long, the teacher position aligned with each student position
            (which predicts label i + 1), -1 where none (`distill.xtoken.align`).
        labels: the student's, unshifted, -100 where not a target.

    ``kd = T^2 * sum over aligned target positions of D / denom``; ``ce`` over all target positions;
    ``denom`` = ``num_items_in_batch`` or the micro-batch's target count, as in
    :func:`distillation_loss`. A target position with no teacher position trains on the labels only.
    """
    student_logits = student_logits[..., : vocab_map.ids.shape[0]]
    s, y = shift_for_causal_lm(student_logits, labels)
    mask = y.ne(IGNORE_INDEX)
    num_tokens = mask.sum()
    denom = num_items_in_batch if num_items_in_batch is not None else num_tokens
    denom = torch.as_tensor(denom, device=s.device, dtype=torch.float32).clamp(min=1)
    teacher_pos = alignment[:, :-1].reshape(-1)
    rows = mask & teacher_pos.ge(0)
    batch_of = torch.arange(labels.shape[0], device=s.device)[:, None].expand_as(labels[:, 1:]).reshape(-1)
    b, j = batch_of[rows], teacher_pos[rows]
    t = TopKTargets(targets.logprobs[b, j], targets.ids[b, j], targets.tail[b, j])
    div = xtoken_token_divergence(s[rows], t, vocab_map, method, loss_type, temperature, beta, chunk_rows)
    kd = div.sum() * (temperature**2) / denom
    ce = F.cross_entropy(s[mask].float(), y[mask], reduction="sum") / denom
    loss = alpha * kd + (1.0 - alpha) * ce
    return DistillationLoss(loss, kd.detach(), ce.detach(), num_tokens)
