"""Top-k teacher targets: the teacher kept on its k most likely ids plus one tail bucket.

At k = vocab they are the full distribution and the loss is the full loss; for smaller k the
divergence is that of the (k + 1)-outcome coarse-graining, which grows towards the full one as k
grows. The chunked top-k loss equals the top-k reference loss.
"""

import pytest
import torch
import torch.nn.functional as F

from distill.chunked import chunked_topk_distillation_loss
from distill.losses import (
    TopKTargets,
    distillation_loss,
    teacher_topk,
    token_divergence,
    topk_distillation_loss,
    topk_token_divergence,
)

LOSSES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]
VOCAB = 61


def logits_case(rows=12, vocab=VOCAB, seed=0, scale=3.0):
    """Peaked, LM-like distributions: most of the teacher's mass on a few ids."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, vocab, generator=g) * scale
    t = torch.randn(rows, vocab, generator=g) * scale
    return s, t


def bucket_divergence64(s, t, k, temperature, loss_type, beta):
    """The definition, in float64 probabilities: merge every id outside the teacher's top k."""
    p_s = torch.softmax(s.double() / temperature, -1)
    p_t = torch.softmax(t.double() / temperature, -1)
    ids = p_t.topk(k, -1).indices
    P = torch.cat([p_s.gather(-1, ids), 1 - p_s.gather(-1, ids).sum(-1, keepdim=True)], -1)
    Q = torch.cat([p_t.gather(-1, ids), 1 - p_t.gather(-1, ids).sum(-1, keepdim=True)], -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if loss_type == "forward_kl":
        return kl(Q, P)
    if loss_type == "reverse_kl":
        return kl(P, Q)
    m = beta * Q + (1 - beta) * P
    return beta * kl(Q, m) + (1 - beta) * kl(P, m)


def test_teacher_topk_keeps_the_k_largest_and_the_exact_tail():
    _, t = logits_case()
    targets = teacher_topk(t, k=7, temperature=2.0)
    p = torch.softmax(t.double() / 2.0, -1)
    expected_tail = (1 - p.topk(7, -1).values.sum(-1)).log()
    torch.testing.assert_close(targets.ids, p.topk(7, -1).indices)
    torch.testing.assert_close(targets.logprobs.double(), p.topk(7, -1).values.log(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(targets.tail.double(), expected_tail, rtol=1e-5, atol=1e-6)


def test_tail_keeps_precision_when_the_top_k_hold_almost_all_the_mass():
    """log(1 - sum p) would round to log(0) = -inf in fp32 here; the logsumexp tail does not."""
    t = torch.full((1, 100), -40.0)
    t[0, 0] = 0.0
    targets = teacher_topk(t, k=1)
    expected = torch.logsumexp(torch.full((99,), -40.0, dtype=torch.float64), 0)  # ~ -35.4
    assert torch.isfinite(targets.tail).all()
    assert abs(targets.tail.item() - expected.item()) < 1e-4


def test_teacher_topk_at_full_vocab_has_an_empty_tail():
    _, t = logits_case()
    assert torch.all(teacher_topk(t, k=VOCAB).tail == float("-inf"))


@pytest.mark.parametrize("loss_type,beta", LOSSES)
@pytest.mark.parametrize("k", [1, 5, 30])
def test_topk_divergence_matches_its_float64_definition(loss_type, beta, k):
    s, t = logits_case()
    ours = topk_token_divergence(s, teacher_topk(t, k, 1.5), loss_type, 1.5, beta)
    ref = bucket_divergence64(s, t, k, 1.5, loss_type, beta)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type,beta", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_k_equal_vocab_reproduces_the_full_loss(loss_type, beta, temperature):
    """Values and gradients of the whole loss, with masks, against distillation_loss."""
    s, t, labels = sequence_case()
    kw = {"alpha": 0.4, "temperature": temperature, "loss_type": loss_type, "beta": beta}
    full = distillation_loss(s, t, labels, **kw)
    topk = topk_distillation_loss(s, teacher_topk(t, VOCAB, temperature), labels, **kw)
    (g_full,) = torch.autograd.grad(full.loss, s)
    (g_topk,) = torch.autograd.grad(topk.loss, s)
    for name in ("loss", "kd", "ce", "num_tokens"):
        torch.testing.assert_close(getattr(topk, name), getattr(full, name), rtol=1e-5, atol=0)
    torch.testing.assert_close(g_topk, g_full, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type,beta", LOSSES)
def test_divergence_grows_monotonically_to_the_full_one_as_k_grows(loss_type, beta):
    """Merging outcomes never increases a divergence (data processing), and top-k buckets are
    nested as k grows, so D_k is non-decreasing in k, per token, and reaches D_full at k = vocab."""
    s, t = logits_case(rows=32)
    full = token_divergence(s, t, loss_type, 1.0, beta)
    ks = [1, 2, 4, 8, 16, 32, VOCAB]
    ds = torch.stack([topk_token_divergence(s, teacher_topk(t, k), loss_type, 1.0, beta) for k in ks])
    assert torch.all(ds[1:] >= ds[:-1] - 1e-5), "a larger k gave a smaller divergence"
    assert torch.all(ds <= full + 1e-5)
    torch.testing.assert_close(ds[-1], full, rtol=1e-5, atol=1e-6)
    errors = (full - ds).sum(-1)
    assert 0 < errors[-2] < errors[0] / 2, "the error should shrink well before k = vocab"


def test_targets_at_masked_positions_are_never_read():
    """A cache need not hold meaningful targets where labels are -100: fill them with NaN."""
    s, t, labels = sequence_case()
    targets = teacher_topk(t, 5)
    masked = labels[:, 1:] == -100
    poisoned = TopKTargets(*(x.clone() for x in targets))
    poisoned.logprobs[:, :-1][masked] = float("nan")
    poisoned.tail[:, :-1][masked] = float("nan")
    poisoned.logprobs[:, -1] = float("nan")  # the last position never has a target
    clean = topk_distillation_loss(s, targets, labels, loss_type="jsd")
    dirty = topk_distillation_loss(s, poisoned, labels, loss_type="jsd")
    assert torch.isfinite(dirty.loss) and dirty.loss == clean.loss
    chunked = chunked_topk_distillation_loss(*as_hidden(s), poisoned, labels, loss_type="jsd", chunk_size=3)
    assert torch.isfinite(chunked.loss)


def test_wider_student_is_trimmed_to_the_targets_vocabulary():
    """A padded student (more output rows than the shared vocabulary) is compared on shared ids."""
    s, t, labels = sequence_case()
    padded = torch.cat([s.detach(), torch.randn(*s.shape[:2], 3) * 5], -1)
    ref = topk_distillation_loss(s, teacher_topk(t, 4), labels)
    got = topk_distillation_loss(padded, teacher_topk(t, 4), labels, vocab_size=VOCAB)
    torch.testing.assert_close(got.loss, ref.loss)


# --- the chunked top-k loss --------------------------------------------------------------------


def sequence_case(dtype=torch.float32, seed=0):
    """(batch, seq, vocab) logits with a masked prompt and uneven lengths (right padding)."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(2, 9, VOCAB, generator=g, dtype=dtype) * 3).requires_grad_()
    t = torch.randn(2, 9, VOCAB, generator=g, dtype=dtype) * 3
    labels = torch.randint(0, VOCAB, (2, 9), generator=g)
    labels[0, :2] = -100
    labels[1, 6:] = -100
    return s, t, labels


def as_hidden(s):
    """Logits written as hidden @ W^T with an exactly invertible W (identity), for the chunked path."""
    return s.detach().clone().requires_grad_(), torch.eye(s.shape[-1], dtype=s.dtype, requires_grad=True)


@pytest.mark.parametrize("loss_type,beta", LOSSES + [("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("k", [3, VOCAB])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_chunked_topk_equals_reference_topk(loss_type, beta, k, temperature):
    s, t, labels = sequence_case()
    targets = teacher_topk(t, k, temperature)
    kw = {"alpha": 0.3, "temperature": temperature, "loss_type": loss_type, "beta": beta}
    ref = topk_distillation_loss(s, targets, labels, **kw)
    (g_ref,) = torch.autograd.grad(ref.loss, s)
    h, w = as_hidden(s)
    got = chunked_topk_distillation_loss(h, w, targets, labels, chunk_size=4, **kw)
    g_h, g_w = torch.autograd.grad(got.loss, (h, w))
    for name in ("loss", "kd", "ce"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-5, atol=0)
    torch.testing.assert_close(g_h, g_ref, rtol=1e-5, atol=1e-7)  # W = I: dL/dh = dL/ds
    (h_w_grad,) = torch.autograd.grad(
        topk_distillation_loss(h.detach() @ w.T, targets, labels, **kw).loss, w
    )  # the reference's weight gradient through a real matmul
    torch.testing.assert_close(g_w, h_w_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type,beta", LOSSES)
def test_chunked_topk_float64_matches_the_definition(loss_type, beta):
    """In float64 the closed-form top-k gradients agree with autograd on the float64 definition."""
    s, t, labels = sequence_case(torch.float64)
    targets = teacher_topk(t, 6, 1.5)
    h, w = as_hidden(s)
    got = chunked_topk_distillation_loss(h, w, targets, labels, alpha=1.0, temperature=1.5, loss_type=loss_type,
                                         beta=beta, chunk_size=5)  # fmt: skip
    (g_h,) = torch.autograd.grad(got.loss, h)
    keep = labels[:, 1:] != -100
    s64 = s.detach()[:, :-1][keep].requires_grad_()
    ref = bucket_divergence64(s64, t[:, :-1][keep], 6, 1.5, loss_type, beta).sum() * 1.5**2 / keep.sum()
    (g_ref,) = torch.autograd.grad(ref, s64)
    # The ids and tails come from fp32 targets, so agreement is to fp32 precision of the targets.
    torch.testing.assert_close(got.loss, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_h[:, :-1][keep], g_ref, rtol=1e-6, atol=1e-9)


def test_chunked_topk_padded_student_and_frozen_head():
    """vocab_size trims a padded student; a frozen head gets no weight gradient."""
    s, t, labels = sequence_case()
    targets = teacher_topk(t, 4)
    ref = topk_distillation_loss(s, targets, labels, loss_type="reverse_kl")
    (g_ref,) = torch.autograd.grad(ref.loss, s)
    h = s.detach().clone().requires_grad_()
    w = torch.cat([torch.eye(VOCAB), torch.randn(3, VOCAB)])  # 3 padded rows, frozen
    got = chunked_topk_distillation_loss(h, w, targets, labels, loss_type="reverse_kl", vocab_size=VOCAB)
    got.loss.backward()
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(h.grad, g_ref, rtol=1e-5, atol=1e-7)
    assert w.grad is None
    with pytest.raises(ValueError, match="span"):
        chunked_topk_distillation_loss(h, w, targets, labels, vocab_size=VOCAB + 10)


def test_chunked_topk_gradient_matches_finite_differences():
    """An independent check of the closed forms: central differences of the float64 loss."""
    s, t, labels = sequence_case(torch.float64)
    targets = teacher_topk(t, 3, 2.0)
    h, w = as_hidden(s)
    kw = {"alpha": 0.5, "temperature": 2.0, "loss_type": "jsd", "beta": 0.3}
    (g,) = torch.autograd.grad(chunked_topk_distillation_loss(h, w, targets, labels, **kw).loss, h)
    eps = 1e-6
    for idx in [(0, 3, 0), (0, 3, int(targets.ids[0, 3, 0])), (1, 2, 17), (1, 0, 40)]:
        plus, minus = h.detach().clone(), h.detach().clone()
        plus[idx] += eps
        minus[idx] -= eps
        lp = chunked_topk_distillation_loss(plus, w, targets, labels, **kw).loss
        lm = chunked_topk_distillation_loss(minus, w, targets, labels, **kw).loss
        assert abs(((lp - lm) / (2 * eps)).item() - g[idx].item()) < 1e-7


def test_chunked_topk_no_grad_matches_cross_entropy_part():
    """alpha = 0 is plain cross-entropy whatever the targets are."""
    s, t, labels = sequence_case()
    h, w = as_hidden(s)
    with torch.no_grad():
        got = chunked_topk_distillation_loss(h, w, teacher_topk(t, 2), labels, alpha=0.0)
    keep = labels[:, 1:] != -100
    ce = F.cross_entropy(s.detach()[:, :-1][keep], labels[:, 1:][keep])
    torch.testing.assert_close(got.loss, ce)
