"""The distillation loss from final hidden states, a chunk of tokens at a time.

:func:`distill.losses.distillation_loss` needs the student's and the teacher's logits: with
8192 tokens and a 128,256-token vocabulary one fp32 logits tensor is 4.2 GB, and the log-softmaxes,
probabilities and gradients built from it hold several more. This module computes the same loss from
what comes *before* the output layer::

    s = h_S W_S^T        t = h_T W_T^T        (rows: target positions, cols: shared vocabulary)

over chunks of rows, so that at most one chunk of logits (and a few temporaries of its size) lives
at a time: the extra peak is O(chunk x vocab) instead of O(tokens x vocab).

The gradient of each chunk's loss with respect to its logits has a closed form (below), so it is
computed in the forward pass, right after the chunk's loss, and turned at once into the gradients
of ``h_S`` (tokens x hidden) and ``W_S`` (vocab x hidden). Backward only scales them by the incoming
gradient. Nothing of size tokens x vocab is ever stored, and, unlike recomputing each chunk in
backward, the teacher's and student's output matmuls run once, as in the reference path.

Gradients with respect to the student logits ``s`` (with ``a = s / T``, ``p_S = softmax(a)``,
``p_T = softmax(t / T)``, ``D`` the per-token divergence; the loss uses ``T^2 D``)::

    forward KL   dD/da = p_S - p_T
    reverse KL   dD/da = p_S * (log p_S - log p_T - D)
    JSD(beta)    dD/da = (1 - beta) p_S * (log p_S - log M - KL(p_S || M))
    CE           dCE/ds = softmax(s) - onehot(y)

(the reverse-KL and JSD lines are the softmax Jacobian applied to dD/dp_S = log p_S - log p_T + 1 and
(1 - beta)(log p_S - log M)), and ``dD/ds = dD/da / T``.

Only target positions (label != -100 after the causal shift) are gathered and computed; the others
contribute nothing to the reference loss either. Conventions (shift, masks, fp32 log-space, T^2,
``num_items_in_batch``, shared vocabulary, the JSD beta) are those of :mod:`distill.losses`; float64
inputs are computed in float64, which lets the tests check the closed forms to 1e-12.
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from distill.losses import IGNORE_INDEX, LOSS_TYPES, DistillationLoss, TopKTargets

# Default rows per chunk: an eighth of the target tokens, so that the chunk's ~4 logits-sized
# buffers stay under one full logits tensor, and at most 1024, enough rows that the output-layer
# matmuls stay compute-bound on a GPU rather than re-reading the (vocab x hidden) weight per chunk.
MAX_CHUNK_ROWS = 1024

# Config attributes through which transformers models rescale or cap the logits after the output
# layer (Gemma 2/3 softcapping, Cohere, Granite, ...). With any of these set, logits are not
# h @ W^T and the chunked path would compute a different loss.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
    "lm_head_multiplier",
    "mup_width_multiplier",
    "dim_model_base",
)


def _base(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``peft.PeftModel`` (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def supports_chunked_loss(model: nn.Module) -> bool:
    """Whether ``model``'s logits are exactly ``last_hidden_state @ lm_head.weight.T``.

    True for a plain ``nn.Linear`` output layer without bias and no logit softcapping or scaling in
    the config, in a model whose forward takes ``logits_to_keep`` (so that the trainer can skip the
    full logits); the trainer falls back to the reference loss otherwise. A PEFT adapter *on* the
    output layer replaces the ``nn.Linear`` and so also falls back.
    """
    model = _base(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None:
        return False
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return False
    configs = [getattr(model, "config", None)]
    configs.append(getattr(configs[0], "text_config", None))
    for config in filter(None, configs):
        for name in _LOGIT_TRANSFORMS:
            if getattr(config, name, None) not in (None, 1, 1.0):
                return False
    return True


def output_weight(model: nn.Module) -> torch.Tensor:
    """``lm_head.weight`` of a model that :func:`supports_chunked_loss`."""
    return _base(model).get_output_embeddings().weight


@contextmanager
def final_hidden_states(model: nn.Module):
    """Within the block, a forward of ``model`` leaves its final hidden states (the output layer's
    input) in the yielded dict under ``"hidden"``.

    The caller still calls the model itself, not its decoder, so that wrappers that act in the
    forward (DDP's gradient synchronisation, PEFT) stay in the loop; with ``logits_to_keep=1`` the
    output layer then runs on one position per sequence instead of all of them.
    """
    captured = {}

    def hook(module, args, output):
        captured["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = _base(model).get_decoder().register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def chunked_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    loss_type: str = "forward_kl",
    beta: float = 0.5,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> DistillationLoss:
    """:func:`distill.losses.distillation_loss` of ``student_hidden @ student_weight.T`` and
    ``teacher_hidden @ teacher_weight.T``, without materialising either.

    Args:
        student_hidden: ``(batch, seq, hidden_S)``, the student's final hidden states (after the
            final norm: the input of ``lm_head``).
        student_weight: ``(vocab_S, hidden_S)``, ``lm_head.weight``. Its gradient is computed only
            if it requires grad (not for a frozen or LoRA-adapted output layer).
        teacher_hidden, teacher_weight: the same for the teacher; never differentiated.
        labels: ``(batch, seq)``, unshifted, -100 where a position is not a target.
        chunk_size: target tokens per chunk; default ``min(1024, ceil(targets / 8))``.

    The vocabularies may differ in padding: the loss uses the first ``min(vocab_S, vocab_T)`` ids,
    as :func:`distill.losses.shared_vocab` does.
    """
    vocab = min(student_weight.shape[0], teacher_weight.shape[0])
    target = labels[:, 1:].ne(IGNORE_INDEX)
    with torch.no_grad():
        teacher = (teacher_hidden[:, :-1][target], teacher_weight.detach())
    return _run(student_hidden, student_weight, teacher, labels, target, vocab, alpha=alpha, temperature=temperature,
                loss_type=loss_type, beta=beta, num_items_in_batch=num_items_in_batch, chunk_size=chunk_size)  # fmt: skip


def chunked_topk_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    targets: TopKTargets,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    loss_type: str = "forward_kl",
    beta: float = 0.5,
    num_items_in_batch: int | torch.Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> DistillationLoss:
    """:func:`distill.losses.topk_distillation_loss` of ``student_hidden @ student_weight.T``,
    without materialising the student's logits. Arguments as there and in
    :func:`chunked_distillation_loss`.

    For the top-k gradient, write ``b(v)`` for the outcome id ``v`` falls in (itself if it is one
    of the teacher's ids, else the tail) and ``P_S(b)``, ``P_T(b)`` for the bucket masses. Then
    ``dD/da_v = p_S(v) * c(b(v))`` with, per bucket, ``c = 1 - P_T / P_S`` (forward KL),
    ``log P_S - log P_T - D`` (reverse KL), ``(1 - beta)(log P_S - log M - KL(P_S || M))`` (JSD):
    the full-vocabulary formulas above, in which every id is its own bucket.
    """
    vocab = vocab_size or student_weight.shape[0]
    if vocab > student_weight.shape[0]:
        raise ValueError(f"the top-k targets span {vocab} ids but the student has only {student_weight.shape[0]}")
    target = labels[:, 1:].ne(IGNORE_INDEX)
    teacher = TopKTargets(*(x[:, :-1][target] for x in targets))
    return _run(student_hidden, student_weight, teacher, labels, target, vocab, alpha=alpha, temperature=temperature,
                loss_type=loss_type, beta=beta, num_items_in_batch=num_items_in_batch, chunk_size=chunk_size)  # fmt: skip


def _run(
    student_hidden, student_weight, teacher, labels, target, vocab, *,
    alpha, temperature, loss_type, beta, num_items_in_batch, chunk_size,
) -> DistillationLoss:  # fmt: skip
    """Shared front of both losses: gather target rows, normalise, pick dtypes, call the Function."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    # Gather the target rows before anything vocabulary-sized: padding and prompt positions cost
    # nothing. Indexing keeps the autograd link to student_hidden (its backward scatters).
    h_s = student_hidden[:, :-1][target]
    y = labels[:, 1:][target]
    num_tokens = target.sum()
    chunk_size = chunk_size or min(MAX_CHUNK_ROWS, max(1, math.ceil(len(y) / 8)))
    denom = num_items_in_batch if num_items_in_batch is not None else num_tokens
    denom = torch.as_tensor(denom, device=h_s.device, dtype=torch.promote_types(h_s.dtype, torch.float32))
    denom = denom.clamp(min=1)

    # Under autocast (Trainer's bf16/fp16) the output layer would run in the autocast dtype; do the
    # same, explicitly, because the custom function's forward would otherwise mix dtypes.
    device_type = h_s.device.type
    autocast = torch.is_autocast_enabled(device_type)
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast else h_s.dtype
    # The teacher's output layer runs in its own dtype (or the autocast one), as its forward would:
    # no full-precision copy of its weight.
    teacher_dtype = compute_dtype if autocast or isinstance(teacher, TopKTargets) else teacher[1].dtype
    loss, kd, ce = _ChunkedKD.apply(
        h_s, student_weight, teacher, y, denom, vocab, chunk_size, (compute_dtype, teacher_dtype),
        torch.is_grad_enabled(), alpha, temperature, loss_type, beta,
    )  # fmt: skip
    return DistillationLoss(loss, kd, ce, num_tokens)


class _ChunkedKD(torch.autograd.Function):
    """(loss, kd, ce) from gathered target rows; gradients for h_S and W_S computed in forward.

    ``teacher`` is ``(h_T rows, W_T)`` or the rows' :class:`TopKTargets`.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, teacher, y, denom, vocab, chunk_size, dtypes, grad_enabled, *loss_args):
        compute_dtype, teacher_dtype = dtypes
        need_h = grad_enabled and h_s.requires_grad
        need_w = grad_enabled and w_s.requires_grad
        alpha, temperature, loss_type, beta = loss_args
        with torch.autocast(device_type=h_s.device.type, enabled=False):
            ws = w_s[:vocab].to(compute_dtype)
            if not isinstance(teacher, TopKTargets):
                h_t, wt = teacher[0], teacher[1][:vocab].to(teacher_dtype)
            grad_h = torch.empty_like(h_s) if need_h else None
            # Accumulate the weight gradient over chunks in at least fp32: summing many
            # bf16-rounded partial products would lose what a single matmul keeps.
            acc_dtype = torch.promote_types(w_s.dtype, torch.float32)
            grad_w = w_s.new_zeros(w_s.shape, dtype=acc_dtype) if need_w else None
            # The loss math runs in fp32 (float64 for float64 inputs, which the tests use).
            math_dtype = torch.promote_types(compute_dtype, torch.float32)
            kd_sum = h_s.new_zeros((), dtype=math_dtype)
            ce_sum = h_s.new_zeros((), dtype=math_dtype)
            for start in range(0, h_s.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                hs = h_s[rows].to(compute_dtype)
                if isinstance(teacher, TopKTargets):
                    t = TopKTargets(*(x[rows] for x in teacher))
                else:  # made inside _chunk once the student's logits are consumed: one buffer less
                    t = partial(_logits, h_t[rows], wt, teacher_dtype, math_dtype)
                # The logits are passed, not named here (nor packed in a *args tuple), so that _chunk
                # can free them as soon as it is done with them.
                kd_c, ce_c, g, scale = _chunk(_logits(hs, ws, compute_dtype, math_dtype), t, y[rows],
                                              need_h or need_w, alpha, temperature, loss_type, beta)  # fmt: skip
                kd_sum += kd_c
                ce_sum += ce_c
                if g is None:
                    continue
                g = g.mul_(scale / denom).to(compute_dtype)
                if need_h:
                    grad_h[rows] = g @ ws
                if need_w and acc_dtype == compute_dtype:
                    grad_w[:vocab].addmm_(g.T, hs)
                elif need_w:
                    grad_w[:vocab] += g.T @ hs
                del g  # before the next chunk allocates its own
        kd = kd_sum * temperature**2 / denom
        ce = ce_sum / denom
        loss = alpha * kd + (1.0 - alpha) * ce
        # Kept on ctx, not saved tensors: backward scales them in place instead of allocating a
        # second weight-sized gradient.
        ctx.grads = (grad_h, grad_w.to(w_s.dtype) if need_w else None)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        if ctx.grads is None:
            raise RuntimeError("the chunked distillation loss supports a single backward pass")
        grads, ctx.grads = ctx.grads, None
        grad_h, grad_w = (g.mul_(grad_loss) if g is not None else None for g in grads)
        return (grad_h, grad_w) + (None,) * 11


def _logits(h, w, compute_dtype, math_dtype):
    return (h.to(compute_dtype) @ w.T).to(math_dtype)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) as a batched matmul: no temporary of a's size."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1)


def _chunk(s, t, y, need_grad, alpha, temperature, loss_type, beta):
    """(sum of divergence, sum of CE, gradient, its scale) over one chunk's target rows.

    ``s``: student logits (fp32); ``t``: a callable making the teacher's logits for the same rows,
    or their top-k targets. ``scale * gradient`` is d(alpha T^2 div + (1 - alpha) CE)/ds; the scale is applied by
    the caller together with the 1/denominator, to spare a pass over the chunk. Logits-sized
    buffers are reused in place and dropped as soon as possible: a chunk holds about four.
    """
    T = temperature
    log_s1 = torch.log_softmax(s, -1)  # CE is at T = 1 whatever T is
    ce = -log_s1.gather(1, y[:, None]).sum()
    log_s = log_s1 if T == 1.0 else torch.log_softmax(s.div_(T), -1)
    del s
    g, scale = None, 1.0
    if need_grad and alpha < 1.0:
        # dCE/ds = softmax(s) - onehot(y). The KD gradient is added to it divided by (1 - alpha),
        # and the caller multiplies the sum by (1 - alpha).
        g = log_s1.exp() if T == 1.0 else log_s1.exp_()
        g.scatter_add_(1, y[:, None], g.new_full((len(y), 1), -1.0))
        scale = 1.0 - alpha
    elif need_grad:
        g = torch.zeros_like(log_s)
    del log_s1
    # the KD term is alpha T^2 D and da/ds = 1/T, so it adds alpha T dD/da
    kd_g, kd_scale = (g, alpha * T / scale) if alpha > 0.0 else (None, 0.0)
    if isinstance(t, TopKTargets):
        div = _topk_divergence_(log_s, t, kd_g, kd_scale, loss_type, beta)
    else:
        t = t()
        log_t = torch.log_softmax(t.div_(T) if T != 1.0 else t, -1)
        del t
        div = _divergence_(log_s, log_t, kd_g, kd_scale, loss_type, beta)
    return div, ce, g, scale


def _divergence_(log_s, log_t, g, scale, loss_type, beta):
    """Sum over rows of D(p_T, p_S); adds ``scale * dD/da`` to ``g`` unless it is None.

    Overwrites ``log_s`` and ``log_t``. ``p * (log p - log q)`` needs no "0 log 0" guard here:
    logits from a matmul are finite, so a probability that underflows to 0 multiplies a finite
    difference.
    """
    if loss_type == "forward_kl" or (loss_type == "jsd" and beta == 0.0):
        p_t = log_t.exp()
        div = _rowdot(p_t, log_t.sub_(log_s)).sum()
        if g is not None:
            g.add_(log_s.exp_().sub_(p_t), alpha=scale)  # p_S - p_T
        return div
    if loss_type == "reverse_kl" or (loss_type == "jsd" and beta == 1.0):
        p_s = log_s.exp()
        diff = log_s.sub_(log_t)  # log p_S - log p_T
        kl = _rowdot(p_s, diff)
        if g is not None:
            g.add_(diff.sub_(kl[:, None]).mul_(p_s), alpha=scale)
        return kl.sum()
    # log M = logaddexp(log beta + log p_T, log(1 - beta) + log p_S): finite where p is tiny.
    log_m = log_t + math.log(beta)
    torch.logaddexp(log_m, log_s + math.log(1.0 - beta), out=log_m)
    p_t = log_t.exp()
    div_t = _rowdot(p_t, log_t.sub_(log_m)).sum()
    del p_t, log_t
    p_s = log_s.exp()
    diff = log_s.sub_(log_m)  # log p_S - log M
    del log_m
    kl_s = _rowdot(p_s, diff)
    if g is not None:
        g.add_(diff.sub_(kl_s[:, None]).mul_(p_s), alpha=scale * (1.0 - beta))
    return beta * div_t + (1.0 - beta) * kl_s.sum()


def _topk_divergence_(log_s, targets, g, scale, loss_type, beta):
    """Sum over rows of the top-k bucket divergence; adds ``scale * dD/da`` to ``g`` unless None.

    The bucket vectors are only (rows, k + 1); the one vocabulary-sized step is the student's tail.
    Overwrites ``log_s``.
    """
    ids = targets.ids.long()
    k = ids.shape[1]
    log_s_k = log_s.gather(1, ids)
    has_tail = k < log_s.shape[1]
    if has_tail:
        tail_only = log_s.scatter_(1, ids, float("-inf"))  # log p_S on the ids outside the top k
        log_p = torch.cat([log_s_k, tail_only.logsumexp(1, keepdim=True)], 1)
        log_q = torch.cat([targets.logprobs, targets.tail[:, None]], 1).to(log_p.dtype)
    else:
        log_p, log_q = log_s_k, targets.logprobs.to(log_s_k.dtype)
    p, q = log_p.exp(), log_q.exp()
    if loss_type == "forward_kl" or (loss_type == "jsd" and beta == 0.0):
        per_row = (q * (log_q - log_p)).sum(1)
        c = 1.0 - (log_q - log_p).exp()
    elif loss_type == "reverse_kl" or (loss_type == "jsd" and beta == 1.0):
        per_row = (p * (log_p - log_q)).sum(1)
        c = log_p - log_q - per_row[:, None]
    else:
        log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log(1.0 - beta))
        kl_s = (p * (log_p - log_m)).sum(1)
        per_row = beta * (q * (log_q - log_m)).sum(1) + (1.0 - beta) * kl_s
        c = (1.0 - beta) * (log_p - log_m - kl_s[:, None])
    if g is not None:
        # dD/da_v = p_S(v) c(b(v)): on the top-k ids p_S(v) is the bucket mass itself.
        g.scatter_add_(1, ids, (p[:, :k] * c[:, :k]).mul_(scale))
        if has_tail:
            g.add_(tail_only.exp_().mul_(c[:, k:]), alpha=scale)
    return per_row.sum()


@torch.no_grad()
def chunked_top1_agreement(student_hidden, student_weight, teacher, labels, vocab_size=None, chunk_size=None):
    """(matches, tokens): how often the student's argmax equals the teacher's on target positions,
    as :func:`distill.losses.top1_agreement`, a chunk of rows at a time.

    ``teacher`` is ``(teacher_hidden, teacher_weight)`` or :class:`TopKTargets` (whose first id is
    the teacher's argmax). ``vocab_size`` as in :func:`chunked_topk_distillation_loss`.
    """
    target = labels[:, 1:].ne(IGNORE_INDEX)
    h_s = student_hidden[:, :-1][target]
    if isinstance(teacher, TopKTargets):
        vocab = vocab_size or student_weight.shape[0]
        teacher_top1 = teacher.ids[:, :-1][target][:, 0].long()
    else:
        vocab = min(student_weight.shape[0], teacher[1].shape[0])
        h_t = teacher[0][:, :-1][target]
        w_t = teacher[1][:vocab].to(h_t.dtype)
    w_s = student_weight[:vocab].to(h_s.dtype)
    chunk_size = chunk_size or MAX_CHUNK_ROWS
    matches = torch.zeros((), dtype=torch.long, device=h_s.device)
    for start in range(0, h_s.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        s_top1 = (h_s[rows] @ w_s.T).argmax(-1)
        t_top1 = teacher_top1[rows] if isinstance(teacher, TopKTargets) else (h_t[rows] @ w_t.T).argmax(-1)
        matches += s_top1.eq(t_top1).sum()
    return matches, target.sum()
