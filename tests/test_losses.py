"""Specifications of the KD losses, each checked against a plain float64 reference."""

import pytest
import torch

from distill.losses import LOSS_TYPES, distillation_loss, token_divergence, top1_agreement


def reference_divergence(s, t, loss_type, temperature, beta):
    """The textbook formulas, in float64, with no log-space tricks."""
    p_s = torch.softmax(s.double() / temperature, -1)
    p_t = torch.softmax(t.double() / temperature, -1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if loss_type == "forward_kl":
        return kl(p_t, p_s)
    if loss_type == "reverse_kl":
        return kl(p_s, p_t)
    m = beta * p_t + (1 - beta) * p_s
    return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)


def reference_loss(s, t, labels, alpha, temperature, loss_type, beta, denom=None):
    v = min(s.shape[-1], t.shape[-1])
    s, t = s[..., :v].double(), t[..., :v].double()
    s, t, y = s[:, :-1].reshape(-1, v), t[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1)
    keep = y != -100
    denom = keep.sum() if denom is None else denom
    kd = reference_divergence(s[keep], t[keep], loss_type, temperature, beta).sum() * temperature**2 / denom
    ce = torch.nn.functional.cross_entropy(s[keep], y[keep], reduction="sum") / denom
    return alpha * kd + (1 - alpha) * ce


def batch(vocab_s=50, vocab_t=50, b=3, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(b, n, vocab_s, generator=g) * 3).requires_grad_()
    t = torch.randn(b, n, vocab_t, generator=g) * 3
    labels = torch.randint(0, min(vocab_s, vocab_t), (b, n), generator=g)
    labels[0, 4:] = -100  # uneven lengths, as right padding leaves them
    labels[2, :2] = -100  # a masked prompt
    return s, t, labels


CASES = [
    (lt, temp, beta)
    for lt in LOSS_TYPES
    for temp in (1.0, 2.5)
    for beta in ((0.1, 0.5, 0.9) if lt == "jsd" else (0.5,))
]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_divergence_of_identical_distributions_is_zero(loss_type, temperature):
    logits = torch.randn(10, 40) * 5
    d = token_divergence(logits, logits.clone(), loss_type, temperature, beta=0.3)
    torch.testing.assert_close(d, torch.zeros(10), atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss_type,temperature,beta", CASES)
def test_loss_values_and_gradients_match_float64_reference(loss_type, temperature, beta):
    s, t, labels = batch()
    ours = distillation_loss(s, t, labels, alpha=0.7, temperature=temperature, loss_type=loss_type, beta=beta)
    (grad,) = torch.autograd.grad(ours.loss, s)
    s64 = s.detach().double().requires_grad_()
    ref = reference_loss(s64, t, labels, 0.7, temperature, loss_type, beta)
    (grad64,) = torch.autograd.grad(ref, s64)
    assert abs(ours.loss.item() - ref.item()) < 1e-6 * max(1.0, abs(ref.item()))
    torch.testing.assert_close(grad.double(), grad64, atol=1e-6, rtol=1e-5)


def test_kd_and_ce_parts_are_reported_separately_and_combine_with_alpha():
    s, t, labels = batch()
    out = distillation_loss(s, t, labels, alpha=0.3, temperature=2.0)
    torch.testing.assert_close(out.loss.detach(), 0.3 * out.kd + 0.7 * out.ce)
    only_kd = reference_loss(s.detach(), t, labels, 1.0, 2.0, "forward_kl", 0.5)
    only_ce = reference_loss(s.detach(), t, labels, 0.0, 2.0, "forward_kl", 0.5)
    assert abs(out.kd.item() - only_kd.item()) < 1e-5
    assert abs(out.ce.item() - only_ce.item()) < 1e-5
    assert out.num_tokens.item() == (labels[:, 1:] != -100).sum().item()


def test_jsd_endpoints_are_the_two_kls():
    s, t = torch.randn(6, 30), torch.randn(6, 30)
    fwd = token_divergence(s, t, "forward_kl")
    rev = token_divergence(s, t, "reverse_kl")
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=0.0), fwd)
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=1.0), rev)
    # ...and they are the limits of the normalised mixture, so beta near 0 (1) behaves like forward (reverse) KL.
    eps = 1e-3
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=eps) / eps, fwd, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=1 - eps) / eps, rev, rtol=2e-2, atol=1e-3)
    assert not torch.allclose(fwd, rev)  # the two ends really differ, so the checks above can fail


def test_kd_term_is_scaled_by_temperature_squared():
    s, t, labels = batch()
    for temperature in (1.0, 2.0, 5.0):
        out = distillation_loss(s, t, labels, alpha=1.0, temperature=temperature)
        keep = labels[:, 1:] != -100
        raw = token_divergence(s[:, :-1], t[:, :-1], "forward_kl", temperature)[keep].mean()
        torch.testing.assert_close(out.kd, raw.detach() * temperature**2)


def test_positions_labelled_minus_100_are_ignored():
    s, t, labels = batch()
    out = distillation_loss(s, t, labels, alpha=0.5, loss_type="jsd")
    (grad,) = torch.autograd.grad(out.loss, s)
    # Position i is scored against label i+1: row 0 has labels[0, 4:] = -100, so logits 3.. carry nothing.
    assert grad[0, 3:].abs().max() == 0
    assert grad[2, :1].abs().max() == 0
    garbage_s = s.detach().clone()
    garbage_t = t.clone()
    garbage_s[0, 3:] = 1e3 * torch.randn_like(garbage_s[0, 3:])
    garbage_t[0, 3:] = -1e3
    again = distillation_loss(garbage_s, garbage_t, labels, alpha=0.5, loss_type="jsd")
    assert abs(again.loss.item() - out.loss.item()) < 1e-6


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_a_batch_with_no_real_token_gives_zero_and_finite_gradients(loss_type):
    s, t, labels = batch()
    labels[:] = -100
    out = distillation_loss(s, t, labels, alpha=0.5, loss_type=loss_type)
    (grad,) = torch.autograd.grad(out.loss, s)
    assert out.loss.item() == 0.0 and out.kd.item() == 0.0 and out.ce.item() == 0.0
    assert torch.isfinite(grad).all() and grad.abs().max() == 0


def test_a_wider_padded_teacher_is_compared_on_the_shared_ids():
    s, t, labels = batch(vocab_s=40, vocab_t=64)
    wide = distillation_loss(s, t, labels, alpha=0.5)
    trimmed = distillation_loss(s, t[..., :40], labels, alpha=0.5)
    torch.testing.assert_close(wide.loss, trimmed.loss)
    ref = reference_loss(s.detach(), t, labels, 0.5, 1.0, "forward_kl", 0.5)
    assert abs(wide.loss.item() - ref.item()) < 1e-6


def test_gradient_accumulation_1x8_equals_2x4_with_uneven_padding():
    """With the step's token count as denominator, two micro-batches of 4 sum to one batch of 8,
    although they hold different numbers of real tokens."""
    torch.manual_seed(0)
    hidden, vocab, n = 16, 30, 9
    head = torch.nn.Linear(hidden, vocab, bias=False)
    x = torch.randn(8, n, hidden)
    teacher = torch.randn(8, n, vocab)
    labels = torch.randint(0, vocab, (8, n))
    for row, length in enumerate([9, 3, 5, 9, 2, 7, 4, 6]):
        labels[row, length:] = -100
    total = (labels[:, 1:] != -100).sum()

    head.zero_grad()
    distillation_loss(head(x), teacher, labels, alpha=0.5, num_items_in_batch=total).loss.backward()
    full = head.weight.grad.clone()

    head.zero_grad()
    for part in (slice(0, 4), slice(4, 8)):
        distillation_loss(
            head(x[part]), teacher[part], labels[part], alpha=0.5, num_items_in_batch=total
        ).loss.backward()
    torch.testing.assert_close(head.weight.grad, full, atol=1e-7, rtol=1e-6)

    # The naive per-micro-batch mean is what this guards against: it differs here.
    head.zero_grad()
    for part in (slice(0, 4), slice(4, 8)):
        (distillation_loss(head(x[part]), teacher[part], labels[part], alpha=0.5).loss / 2).backward()
    assert not torch.allclose(head.weight.grad, full, atol=1e-6)


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="unknown loss_type"):
        token_divergence(torch.zeros(2, 3), torch.zeros(2, 3), "kl")


def test_top1_agreement_counts_matching_argmax_on_target_positions_only():
    t = torch.tensor([[[0.0, 5.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0]]])
    s = torch.tensor([[[0.0, 9.0, 0.0], [0.0, 9.0, 0.0], [9.0, 0.0, 0.0]]])
    labels = torch.tensor([[0, 1, 2]])
    matches, tokens = top1_agreement(s.argmax(-1), t.argmax(-1), labels)
    assert (matches.item(), tokens.item()) == (1, 2)
    labels[0, 1] = -100
    matches, tokens = top1_agreement(s.argmax(-1), t.argmax(-1), labels)
    assert (matches.item(), tokens.item()) == (0, 1)


@pytest.mark.parametrize("loss_type,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0),
                                            ("jsd", 1.0)])  # fmt: skip
def test_the_closed_form_gradient_is_autograd_of_the_divergence_in_float64(loss_type, beta):
    """divergence_and_grad_ (what the chunked paths use) returns the divergence itself and its
    gradient with respect to the student's logits, as autograd of `divergence` computes them."""
    from distill.losses import divergence, divergence_and_grad_

    g = torch.Generator().manual_seed(3)
    a = (torch.randn(6, 40, generator=g, dtype=torch.float64) * 3).requires_grad_()
    t = torch.randn(6, 40, generator=g, dtype=torch.float64) * 3
    log_s, log_t = torch.log_softmax(a, -1), torch.log_softmax(t, -1)
    want = divergence(log_s, log_t, loss_type, beta)
    (want_grad,) = torch.autograd.grad(want.sum(), a)
    got, got_grad = divergence_and_grad_(log_s.detach().clone(), log_t.clone(), loss_type, beta)
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-14)
