"""Cross-tokenizer losses (the end of distill/losses.py): each against a float64 reference written out
by hand on dense tensors, and the projected and hybrid losses against the same-tokenizer top-k loss
when the two tokenizers are one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.losses import (
    TopKTargets,
    divergence,
    hybrid_divergence,
    sorted_l1,
    teacher_topk,
    topk_distillation_loss,
    xtoken_distillation_loss,
    xtoken_token_divergence,
)
from distill.xtoken import NO_TOKEN, VocabMap

CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)]


def identity_map(v: int, k: int = 4) -> VocabMap:
    ids = torch.full((v, k), NO_TOKEN)
    ids[:, 0] = torch.arange(v)
    weights = torch.zeros(v, k)
    weights[:, 0] = 1.0
    return VocabMap(ids, weights, torch.ones(v, dtype=torch.bool), v, "h", "h", {})


def cross_map(v_s: int, v_t: int, seed: int = 0) -> VocabMap:
    """A first-token map with every case in it: exact matches, many student ids onto one teacher id,
    a student id sent nowhere (NO_TOKEN), and teacher ids nothing maps to (the last three)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((v_s, 2), NO_TOKEN)
    ids[:, 0] = torch.randint(0, v_t - 3, (v_s,), generator=g)
    ids[:, 1] = torch.randint(0, v_t, (v_s,), generator=g)  # later tokens of the re-tokenisation: weight 0
    ids[3, 0] = NO_TOKEN
    weights = torch.zeros(v_s, 2)
    weights[:, 0] = 1.0
    exact = torch.zeros(v_s, dtype=torch.bool)
    exact[:4] = True
    exact[3] = False
    ids[:3, 0] = torch.tensor([0, 1, 2])  # student 0, 1, 2 are teacher 0, 1, 2 exactly
    ids[3:, 0] = torch.where(ids[3:, 0].lt(3) & ids[3:, 0].ge(0), ids[3:, 0] + 3, ids[3:, 0])
    return VocabMap(ids, weights, exact, v_t, "s", "t", {})


def batch(v_s=13, v_t=17, k=5, b=2, t=9, t_teacher=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, t, v_s, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(b, t_teacher, v_t, generator=g, dtype=torch.float64) * 2
    teacher[..., v_t - 1] += 4  # a likely teacher id that no student token maps to
    labels = torch.randint(0, v_s, (b, t), generator=g)
    labels[0, :3] = -100
    labels[1, -2:] = -100
    alignment = torch.randint(0, t_teacher, (b, t), generator=g)
    alignment[0, 4] = alignment[1, 2] = -1
    return student, teacher, labels, alignment, k


# --- float64 references, dense -------------------------------------------------------------------


def dense_w(vmap: VocabMap) -> torch.Tensor:
    """W[s, t]: the mass student id s sends to teacher id t (NO_TOKEN's mass is in no column)."""
    w = torch.zeros(vmap.ids.shape[0], vmap.teacher_vocab_size, dtype=torch.float64)
    for s in range(vmap.ids.shape[0]):
        for c in range(vmap.ids.shape[1]):
            if vmap.ids[s, c] >= 0:
                w[s, vmap.ids[s, c]] += vmap.weights[s, c].double()
    return w


def projected_reference(log_s, targets, vmap, loss_type, beta):
    """q_T = p_S W on the full teacher vocabulary; buckets: the top-k ids some student id reaches, then
    everything else (the tail, and the top-k ids nothing reaches) on each side."""
    w = dense_w(vmap)
    reach = w.sum(0) > 0
    out = []
    for r in range(log_s.shape[0]):
        q = log_s[r].exp() @ w
        ids = targets.ids[r]
        p_t = targets.logprobs[r].double().exp()
        keep = reach[ids]
        q_k, p_k = q[ids][keep], p_t[keep]
        p_rest = targets.tail[r].double().exp() + p_t[~keep].sum()
        buckets_s = torch.cat([q_k, (1 - q_k.sum()).reshape(1)])
        buckets_t = torch.cat([p_k, p_rest.reshape(1)])
        out.append(divergence(buckets_s.log()[None], buckets_t.log()[None], loss_type, beta)[0])
    return torch.stack(out)


def rows(student, teacher, k, temperature=1.0):
    """Aligned (student log-softmax rows, teacher top-k rows): every student row with teacher row 0."""
    s = student.reshape(-1, student.shape[-1])
    t = teacher_topk(teacher.reshape(-1, teacher.shape[-1])[: len(s)], k, temperature)
    return s, t


# --- the key property: one tokenizer, the same loss ------------------------------------------------


@pytest.mark.parametrize("method", ["projected", "hybrid"])
@pytest.mark.parametrize("loss_type,beta", CASES)
@pytest.mark.parametrize("k", [4, 13])
def test_identical_tokenizers_give_the_same_tokenizer_topk_loss(method, loss_type, beta, k):
    """Identity map, every position aligned with itself: the cross-tokenizer loss and its gradient are
    the same-tokenizer top-k loss's (k < vocab with a tail; k = vocab without one)."""
    student, teacher_logits, labels, _, _ = batch(v_s=13, v_t=13, t_teacher=9)
    student = student.float()
    targets = teacher_topk(teacher_logits.float(), k, temperature=2.0)
    alignment = torch.arange(student.shape[1]).expand(student.shape[0], -1)
    kw = dict(alpha=0.3, temperature=2.0, loss_type=loss_type, beta=beta, num_items_in_batch=20)
    a = student.clone().requires_grad_()
    same = topk_distillation_loss(a, targets, labels, **kw)
    same.loss.backward()
    b = student.clone().requires_grad_()
    cross = xtoken_distillation_loss(b, targets, alignment, labels, identity_map(13), method=method, **kw)
    cross.loss.backward()
    for x, y in zip(cross, same):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-6)


# --- each loss against its float64 reference ------------------------------------------------------


@pytest.mark.parametrize("loss_type,beta", CASES)
def test_projected_divergence_matches_the_dense_float64_projection(loss_type, beta):
    student, teacher, _, _, k = batch()
    vmap = cross_map(13, 17)
    s, t = rows(student, teacher, k)
    got = xtoken_token_divergence(s, t, vmap, "projected", loss_type, beta=beta)
    want = projected_reference(F.log_softmax(s, -1), t, vmap, loss_type, beta)
    assert want.isfinite().all() and want.gt(0).all()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_projected_gradient_matches_autograd_of_the_float64_reference():
    student, teacher, _, _, k = batch()
    vmap = cross_map(13, 17)
    s, t = rows(student, teacher, k)
    a = s.float().clone().requires_grad_()
    xtoken_token_divergence(a, t, vmap, "projected", "jsd", beta=0.3).sum().backward()
    b = s.clone().requires_grad_()
    projected_reference(F.log_softmax(b, -1), t, vmap, "jsd", 0.3).sum().backward()
    assert a.grad.isfinite().all()
    torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=1e-5)


def test_sorted_l1_at_full_vocabulary_is_ulds_sorted_l1_and_a_lower_bound_below():
    """k = teacher vocab: sum |sorted p_S - sorted p_T| with the shorter side padded by zeros. k below:
    merging the tails can only lower it."""
    student, teacher, _, _, _ = batch()
    s = student.reshape(-1, 13)
    full = teacher.reshape(-1, 17)[: len(s)]
    p_s = F.softmax(s, -1).sort(-1, descending=True).values
    p_t = F.softmax(full, -1).sort(-1, descending=True).values
    want = (F.pad(p_s, (0, 4)) - p_t).abs().sum(-1)
    got = sorted_l1(F.log_softmax(s.float(), -1), teacher_topk(full.float(), 17))
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    for k in (1, 5, 12):
        assert (sorted_l1(F.log_softmax(s.float(), -1), teacher_topk(full.float(), k)).double() <= want + 1e-6).all()


def test_hybrid_is_exact_match_divergence_plus_sorted_l1_of_the_rest():
    student, teacher, _, _, k = batch()
    vmap = cross_map(13, 17)
    s, t = rows(student, teacher, k)
    twin_of = {int(vmap.ids[i, 0]): i for i in range(13) if vmap.exact[i]}
    want = []
    for r in range(len(s)):
        p_s, p_t = F.softmax(s[r], -1), t.logprobs[r].double().exp()
        exact = [(j, twin_of[int(i)]) for j, i in enumerate(t.ids[r]) if int(i) in twin_of]
        zero = torch.zeros((), dtype=torch.float64)
        pt_e = torch.stack([p_t[j] for j, _ in exact] + [1 - sum((p_t[j] for j, _ in exact), zero)])
        ps_e = torch.stack([p_s[i] for _, i in exact] + [1 - sum((p_s[i] for _, i in exact), zero)])
        d = divergence(ps_e.log()[None], pt_e.log()[None], "forward_kl")[0]
        rest_t = sorted((float(p_t[j]) for j in range(k) if j not in {j for j, _ in exact}), reverse=True)
        rest_s = sorted((float(p_s[i]) for i in range(13) if i not in {i for _, i in exact}), reverse=True)
        want.append(d + sum(abs(a - b) for a, b in zip(rest_s, rest_t)))
    assert any(len([1 for i in t.ids[r] if int(i) in twin_of]) for r in range(len(s)))  # the exact part is used
    got = hybrid_divergence(F.log_softmax(s.float(), -1), t, vmap.exact_student_of(), "forward_kl", 0.5)
    torch.testing.assert_close(got.double(), torch.stack(want), atol=1e-5, rtol=1e-5)


# --- masks, alignment, normalisation, memory chunks -----------------------------------------------


@pytest.mark.parametrize("method", ["projected", "uld", "hybrid"])
def test_loss_sums_aligned_target_rows_over_the_step_token_count(method):
    """kd = T^2 * sum of the divergence over target positions with a teacher position, each read at
    the teacher position the alignment names, / num_items_in_batch; ce over every target position."""
    student, teacher, labels, alignment, k = batch()
    student = student.float()
    vmap = cross_map(13, 17)
    targets = teacher_topk(teacher.float(), k, temperature=1.5)
    out = xtoken_distillation_loss(
        student, targets, alignment, labels, vmap, method=method, alpha=0.25, temperature=1.5, num_items_in_batch=40
    )
    kd, ce, n = 0.0, 0.0, 0
    for b in range(student.shape[0]):
        for i in range(student.shape[1] - 1):
            if labels[b, i + 1] < 0:
                continue
            n += 1
            ce += F.cross_entropy(student[b, i], labels[b, i + 1]).item()
            j = int(alignment[b, i])
            if j >= 0:
                t = TopKTargets(*(x[b, j][None] for x in targets))
                kd += xtoken_token_divergence(student[b, i][None], t, vmap, method, temperature=1.5).item()
    assert out.num_tokens == n
    torch.testing.assert_close(out.kd, torch.tensor(kd * 1.5**2 / 40), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.ce, torch.tensor(ce / 40), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, 0.25 * out.kd + 0.75 * out.ce)


def test_no_aligned_position_gives_zero_kd_with_a_gradient_and_the_full_ce():
    student, teacher, labels, alignment, k = batch()
    student = student.float().requires_grad_()
    targets = teacher_topk(teacher.float(), k)
    out = xtoken_distillation_loss(student, targets, torch.full_like(alignment, -1), labels, cross_map(13, 17))
    assert out.kd == 0
    out.loss.backward()
    assert student.grad.isfinite().all() and student.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["projected", "uld", "hybrid"])
def test_chunks_of_one_row_give_the_same_divergence(method):
    student, teacher, _, _, k = batch()
    s, t = rows(student.float(), teacher, k)
    vmap = cross_map(13, 17)
    one = xtoken_token_divergence(s, t, vmap, method, "reverse_kl", chunk_rows=1)
    torch.testing.assert_close(one, xtoken_token_divergence(s, t, vmap, method, "reverse_kl"))


def test_student_logits_wider_than_its_tokenizer_are_trimmed():
    """Padded logit rows (never targets) are outside the map: as if the student were exactly V wide."""
    student, teacher, labels, alignment, k = batch()
    student = student.float()
    wide = torch.cat([student, torch.randn(*student.shape[:2], 3)], -1)
    targets = teacher_topk(teacher.float(), k)
    vmap = cross_map(13, 17)
    a = xtoken_distillation_loss(wide, targets, alignment, labels, vmap)
    b = xtoken_distillation_loss(student, targets, alignment, labels, vmap)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_unknown_method_is_refused():
    student, teacher, _, _, k = batch()
    s, t = rows(student.float(), teacher, k)
    with pytest.raises(ValueError, match="cross-tokenizer method"):
        xtoken_token_divergence(s, t, cross_map(13, 17), "gold")
