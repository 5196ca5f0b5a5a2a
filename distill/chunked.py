"""The distillation loss from final hidden states, a chunk of tokens at a time.

:func:`distill.losses.distillation_loss` needs the student's and the teacher's logits: with
8192 tokens and a 128,256-token vocabulary one fp32 logits tensor is 4.2 GB, and the log-softmaxes,
probabilities and gradients built from it hold several more. This module computes the same loss from
what comes *before* the output layer::

    s = h_S W_S^T        t = h_T W_T^T        (rows: target positions, cols: shared vocabulary)

over chunks of rows, so that at most one chunk of logits (and a few temporaries of its size) lives
at a time: the extra peak is O(chunk x vocab) instead of O(tokens x vocab).

The gradient of each chunk's loss with respect to its logits has a closed form
(:func:`distill.losses.divergence_and_grad_` for the divergence, ``softmax(s) - onehot(y)`` for the
cross-entropy, ``dD/ds = dD/da / T`` with ``a = s / T``), so it is computed in the forward pass,
right after the chunk's loss, and turned at once into the gradients of ``h_S`` (tokens x hidden) and
``W_S`` (vocab x hidden). Backward only scales them by the incoming gradient. Nothing of size tokens
x vocab is ever stored, and, unlike recomputing each chunk in backward, the teacher's and student's
output matmuls run once, as in the reference path.

Precision: the two gradients are kept in fp32 (or float64) and *unnormalised* until backward. A
gradient divided by the step's token count (1e5 and more) and cast to fp16 in the forward would
underflow before the loss scale of fp16 training (GradScaler, DeepSpeed: 2^16) arrives in backward;
kept this way, backward multiplies by the scale first and casts to the parameters' dtype last, as
the reference path's autograd does.

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

from distill.losses import (
    IGNORE_INDEX,
    DistillationLoss,
    TopKTargets,
    _check_loss_type,
    divergence_and_grad_,
    xtoken_token_divergence,
)

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
    compute_dtype: torch.dtype | None = None,
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
        compute_dtype: dtype of the output-layer matmuls: the run's mixed-precision dtype (bf16,
            fp16). ``None``: the autocast dtype if autocast is on, else ``student_hidden``'s dtype.
            The softmaxes and divergences always run in fp32 (float64 for float64 inputs).

    The vocabularies may differ in padding: the loss uses the first ``min(vocab_S, vocab_T)`` ids,
    as :func:`distill.losses.shared_vocab` does.
    """
    vocab = min(student_weight.shape[0], teacher_weight.shape[0])
    target = labels[:, 1:].ne(IGNORE_INDEX)
    with torch.no_grad():
        teacher = (teacher_hidden[:, :-1][target], teacher_weight.detach())
    return _run(student_hidden, student_weight, teacher, labels, target, vocab, alpha=alpha, temperature=temperature,
                loss_type=loss_type, beta=beta, num_items_in_batch=num_items_in_batch, chunk_size=chunk_size,
                compute_dtype=compute_dtype)  # fmt: skip


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
    compute_dtype: torch.dtype | None = None,
) -> DistillationLoss:
    """:func:`distill.losses.topk_distillation_loss` of ``student_hidden @ student_weight.T``,
    without materialising the student's logits. Arguments as there and in
    :func:`chunked_distillation_loss`.

    The divergence and its gradient are those of the k + 1 buckets (the teacher's ids, then the
    tail), spread back over the vocabulary: writing ``b(v)`` for the bucket of id ``v`` and ``P_S(b)``
    for the student's bucket masses, ``dD/da_v = p_S(v) / P_S(b(v)) * dD/dA_b(v)``, where ``dD/dA`` is
    :func:`distill.losses.divergence_and_grad_`'s gradient on the buckets (``A_b = log P_S(b)``).
    On a teacher id the ratio is 1; on the tail it is ``exp(log p_S(v) - log P_S(tail))``.
    """
    vocab = vocab_size or student_weight.shape[0]
    if vocab > student_weight.shape[0]:
        raise ValueError(f"the top-k targets span {vocab} ids but the student has only {student_weight.shape[0]}")
    target = labels[:, 1:].ne(IGNORE_INDEX)
    teacher = TopKTargets(*(x[:, :-1][target] for x in targets))
    return _run(student_hidden, student_weight, teacher, labels, target, vocab, alpha=alpha, temperature=temperature,
                loss_type=loss_type, beta=beta, num_items_in_batch=num_items_in_batch, chunk_size=chunk_size,
                compute_dtype=compute_dtype)  # fmt: skip


def _run(
    student_hidden, student_weight, teacher, labels, target, vocab, *,
    alpha, temperature, loss_type, beta, num_items_in_batch, chunk_size, compute_dtype,
) -> DistillationLoss:  # fmt: skip
    """Shared front of both losses: gather target rows, normalise, pick dtypes, call the Function."""
    _check_loss_type(loss_type)
    # Gather the target rows before anything vocabulary-sized: padding and prompt positions cost
    # nothing. Indexing keeps the autograd link to student_hidden (its backward scatters).
    h_s = student_hidden[:, :-1][target]
    y = labels[:, 1:][target]
    num_tokens = target.sum()
    chunk_size = chunk_size or min(MAX_CHUNK_ROWS, max(1, math.ceil(len(y) / 8)))
    denom = num_items_in_batch if num_items_in_batch is not None else num_tokens
    denom = torch.as_tensor(denom, device=h_s.device, dtype=torch.promote_types(h_s.dtype, torch.float32))
    denom = denom.clamp(min=1)

    # The output layer runs in the run's mixed-precision dtype. Under autocast it would anyway; the
    # custom Function's forward would otherwise mix dtypes, so the choice is explicit.
    device_type = h_s.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if compute_dtype is None:
        compute_dtype = torch.get_autocast_dtype(device_type) if autocast else h_s.dtype
    mixed = autocast or compute_dtype != h_s.dtype
    # The teacher's output layer runs in its own dtype (or the mixed-precision one), as its forward
    # would: no full-precision copy of its weight.
    teacher_dtype = compute_dtype if mixed or isinstance(teacher, TopKTargets) else teacher[1].dtype
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
        need_h = grad_enabled and h_s.requires_grad
        need_w = grad_enabled and w_s.requires_grad
        with torch.autocast(device_type=h_s.device.type, enabled=False):
            kd_sum, ce_sum, grad_h, grad_w = _chunks(h_s, w_s, teacher, y, vocab, chunk_size, dtypes, need_h, need_w,
                                                     *loss_args)  # fmt: skip
            if dtypes[0] == torch.float16 and not all(g is None or bool(g.isfinite().all()) for g in (grad_h, grad_w)):
                # An fp16 matmul output overflowed (a frequent token's weight gradient summed over a
                # chunk of rows can pass 65504): redo this step's head in fp32 rather than hand the
                # loss scaler an inf it cannot cure by lowering its scale.
                fp32 = (torch.float32, torch.float32)
                kd_sum, ce_sum, grad_h, grad_w = _chunks(h_s, w_s, teacher, y, vocab, chunk_size, fp32, need_h, need_w,
                                                         *loss_args)  # fmt: skip
        alpha, temperature = loss_args[:2]
        kd = kd_sum * temperature**2 / denom
        ce = ce_sum / denom
        loss = alpha * kd + (1.0 - alpha) * ce
        # Kept on ctx, not saved tensors: backward scales them in place instead of allocating a
        # second weight-sized gradient. Unnormalised and in fp32 until then (see the module doc).
        ctx.grads = (grad_h, grad_w)
        ctx.denom, ctx.dtypes = denom, (h_s.dtype, w_s.dtype)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        if ctx.grads is None:
            raise RuntimeError("the chunked distillation loss supports a single backward pass")
        grads, ctx.grads = ctx.grads, None
        # The incoming gradient (with a loss scale, 2^16 under fp16) multiplies first, in fp32; the
        # cast to the parameter's dtype comes last.
        scale = grad_loss.to(ctx.denom.dtype) / ctx.denom
        grad_h, grad_w = (
            g.mul_(scale).to(dtype) if g is not None else None for g, dtype in zip(grads, ctx.dtypes, strict=True)
        )
        return (grad_h, grad_w) + (None,) * 11


def _chunks(h_s, w_s, teacher, y, vocab, chunk_size, dtypes, need_h, need_w, alpha, temperature, loss_type, beta):
    """(sum of divergence, sum of CE, d(sum)/dh_S, d(sum)/dW_S) over all rows, a chunk at a time.

    The gradients are of the *sums* (the caller divides by the step's token count) and in at least
    fp32: summing many low-precision partial products would lose what a single matmul keeps.
    """
    compute_dtype, teacher_dtype = dtypes
    acc_dtype = torch.promote_types(compute_dtype, torch.float32)
    # The loss math runs in fp32 (float64 for float64 inputs, which the tests use).
    math_dtype = acc_dtype
    ws = w_s[:vocab].to(compute_dtype)
    if not isinstance(teacher, TopKTargets):
        h_t, wt = teacher[0], teacher[1][:vocab].to(teacher_dtype)
    grad_h = h_s.new_empty(h_s.shape, dtype=acc_dtype) if need_h else None
    grad_w = w_s.new_zeros(w_s.shape, dtype=acc_dtype) if need_w else None
    kd_sum = h_s.new_zeros((), dtype=math_dtype)
    ce_sum = h_s.new_zeros((), dtype=math_dtype)
    for start in range(0, h_s.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        hs = h_s[rows].to(compute_dtype)
        if isinstance(teacher, TopKTargets):
            t = TopKTargets(*(x[rows] for x in teacher))
        else:  # made inside _chunk once the student's logits are consumed: one buffer less
            t = partial(_logits, h_t[rows], wt, teacher_dtype, math_dtype)
        # The logits are passed, not named here (nor packed in a *args tuple), so that _chunk can
        # free them as soon as it is done with them.
        kd_c, ce_c, g, scale = _chunk(_logits(hs, ws, compute_dtype, math_dtype), t, y[rows],
                                      need_h or need_w, alpha, temperature, loss_type, beta)  # fmt: skip
        kd_sum += kd_c
        ce_sum += ce_c
        if g is None:
            continue
        # Entries of g are O(1) (differences of probabilities): in range for every dtype, and small
        # ones survive the cast as well as they do in the reference path.
        g = g.mul_(scale).to(compute_dtype)
        if need_h:
            grad_h[rows] = g @ ws
        if need_w and acc_dtype == compute_dtype:
            grad_w[:vocab].addmm_(g.T, hs)
        elif need_w:
            grad_w[:vocab] += g.T @ hs
        del g  # before the next chunk allocates its own
    return kd_sum, ce_sum, grad_h, grad_w


def _logits(h, w, compute_dtype, math_dtype):
    return (h.to(compute_dtype) @ w.T).to(math_dtype)


def _chunk(s, t, y, need_grad, alpha, temperature, loss_type, beta):
    """(sum of divergence, sum of CE, gradient, its scale) over one chunk's target rows.

    ``s``: student logits (fp32); ``t``: a callable making the teacher's logits for the same rows,
    or their top-k targets. ``scale * gradient`` is d(alpha T^2 div + (1 - alpha) CE)/ds; the scale is
    applied by the caller, to spare a pass over the chunk. Logits-sized buffers are reused in place
    and dropped as soon as possible: a chunk holds about four.
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
    kd_scale = alpha * T / scale if g is not None and alpha > 0.0 else 0.0
    if isinstance(t, TopKTargets):
        div = _topk_divergence_(log_s, t, g, kd_scale, loss_type, beta)
    else:
        t = t()
        log_t = torch.log_softmax(t.div_(T) if T != 1.0 else t, -1)
        del t
        div, grad = divergence_and_grad_(log_s, log_t, loss_type, beta)
        del log_t
        if kd_scale:
            g.add_(grad, alpha=kd_scale)
        div = div.sum()
    return div, ce, g, scale


def _topk_divergence_(log_s, targets, g, scale, loss_type, beta):
    """Sum over rows of the top-k bucket divergence; adds ``scale * dD/da`` to ``g`` if scale != 0.

    The bucket vectors are only (rows, k + 1); the one vocabulary-sized step is the student's tail.
    Overwrites ``log_s``.
    """
    ids = targets.ids.long()
    k = ids.shape[1]
    log_s_k = log_s.gather(1, ids)
    has_tail = k < log_s.shape[1]
    if has_tail:
        tail_only = log_s.scatter_(1, ids, float("-inf"))  # log p_S on the ids outside the top k
        log_tail = tail_only.logsumexp(1, keepdim=True)
        log_p = torch.cat([log_s_k, log_tail], 1)
        log_q = torch.cat([targets.logprobs, targets.tail[:, None]], 1).to(log_p.dtype)
    else:
        log_p, log_q = log_s_k, targets.logprobs.to(log_s_k.dtype)
    div, grad = divergence_and_grad_(log_p, log_q, loss_type, beta)
    if scale:
        g.scatter_add_(1, ids, grad[:, :k].mul_(scale))
        if has_tail:  # p_S(v) / P_S(tail), in log space: finite even where P_S(tail) underflows
            g.add_(tail_only.sub_(log_tail).exp_().mul_(grad[:, k:]), alpha=scale)
    return div.sum()


@torch.no_grad()
def top1_rows(hidden: torch.Tensor, weight: torch.Tensor, vocab: int | None = None, chunk_size: int = MAX_CHUNK_ROWS):
    """``(hidden @ weight[:vocab].T).argmax(-1)``, a chunk of rows at a time: the model's most likely
    next token at every position, without its full logits."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    w = weight[:vocab].to(rows.dtype)
    top1 = torch.cat([(rows[i : i + chunk_size] @ w.T).argmax(-1) for i in range(0, len(rows), chunk_size)])
    return top1.view(hidden.shape[:-1])


# --- A teacher with another tokenizer ----------------------------------------------------------------


def chunked_xtoken_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
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
    chunk_size: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> DistillationLoss:
    """:func:`distill.losses.xtoken_distillation_loss` of ``student_hidden @ student_weight.T``,
    without materialising the student's logits: a chunk of target rows at a time, their logits
    (rows x the student tokenizer's ids), the loss, and at once its gradients for ``h_S`` and
    ``W_S`` (by autograd on the chunk: the projected, ULD and hybrid divergences have no closed-form
    gradient written here), kept unnormalised in fp32 until backward as in `_ChunkedKD`. The
    teacher's vocabulary appears only inside the divergence, a chunk of rows at a time."""
    _check_loss_type(loss_type)
    vocab = vocab_map.ids.shape[0]
    target = labels[:, 1:].ne(IGNORE_INDEX)
    h_s = student_hidden[:, :-1][target]
    y = labels[:, 1:][target]
    where = alignment[:, :-1][target]
    batch = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(target)[target]
    teacher = TopKTargets(*(x[batch, where.clamp(min=0)] for x in targets))  # rows with where < 0: unused
    num_tokens = target.sum()
    denom = num_items_in_batch if num_items_in_batch is not None else num_tokens
    denom = torch.as_tensor(denom, device=h_s.device, dtype=torch.float32).clamp(min=1)
    chunk_size = chunk_size or min(MAX_CHUNK_ROWS, max(1, math.ceil(len(y) / 8)))
    if compute_dtype is None:
        autocast = torch.is_autocast_enabled(h_s.device.type)
        compute_dtype = torch.get_autocast_dtype(h_s.device.type) if autocast else h_s.dtype
    loss, kd, ce = _ChunkedXToken.apply(
        h_s, student_weight, teacher, where.ge(0), y, denom, vocab, vocab_map, chunk_size, compute_dtype,
        torch.is_grad_enabled(), (method, alpha, temperature, loss_type, beta),
    )  # fmt: skip
    return DistillationLoss(loss, kd, ce, num_tokens)


class _ChunkedXToken(torch.autograd.Function):
    """(loss, kd, ce) from gathered target rows against cross-tokenizer targets; gradients for h_S
    and W_S computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, h_s, w_s, teacher, aligned, y, denom, vocab, vocab_map, chunk_size, dtype, grad_enabled, loss):
        method, alpha, temperature, loss_type, beta = loss
        need_h, need_w = grad_enabled and h_s.requires_grad, grad_enabled and w_s.requires_grad
        w = w_s.detach()[:vocab].requires_grad_(need_w)
        grad_h = torch.zeros(h_s.shape, dtype=torch.float32, device=h_s.device) if need_h else None
        grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device) if need_w else None
        kd_sum = ce_sum = torch.zeros((), dtype=torch.float32, device=h_s.device)
        with torch.autocast(device_type=h_s.device.type, enabled=False), torch.enable_grad():
            for i in range(0, len(y), chunk_size):
                h = h_s.detach()[i : i + chunk_size].requires_grad_(need_h)
                logits = (h.to(dtype) @ w.to(dtype).T).float()
                rows = aligned[i : i + chunk_size]
                t = TopKTargets(*(x[i : i + chunk_size][rows] for x in teacher))
                kd = xtoken_token_divergence(logits[rows], t, vocab_map, method, loss_type, temperature, beta).sum()
                ce = torch.nn.functional.cross_entropy(logits, y[i : i + chunk_size], reduction="sum")
                if need_h or need_w:
                    total = alpha * temperature**2 * kd + (1.0 - alpha) * ce
                    inputs = [x for x, need in ((h, need_h), (w, need_w)) if need]
                    grads = list(torch.autograd.grad(total, inputs))
                    if need_h:
                        grad_h[i : i + chunk_size] = grads.pop(0)
                    if need_w:
                        grad_w[:vocab] += grads.pop(0)
                kd_sum, ce_sum = kd_sum + kd.detach(), ce_sum + ce.detach()
        kd, ce = kd_sum * temperature**2 / denom, ce_sum / denom
        ctx.grads, ctx.denom, ctx.dtypes = (grad_h, grad_w), denom, (h_s.dtype, w_s.dtype)
        ctx.mark_non_differentiable(kd, ce)
        return alpha * kd + (1.0 - alpha) * ce, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        if ctx.grads is None:
            raise RuntimeError("the chunked distillation loss supports a single backward pass")
        grads, ctx.grads = ctx.grads, None
        scale = grad_loss.to(ctx.denom.dtype) / ctx.denom
        grad_h, grad_w = (g.mul_(scale).to(d) if g is not None else None for g, d in zip(grads, ctx.dtypes))
        return (grad_h, grad_w) + (None,) * 10
