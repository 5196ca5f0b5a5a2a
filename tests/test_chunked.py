"""The chunked loss is the reference loss, computed without holding the logits.

Every check builds the same inputs twice: logits materialised and fed to
``distill.losses.distillation_loss`` (the specification), and hidden states + output weights fed to
``distill.chunked.chunked_distillation_loss``. Values and gradients must agree.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.chunked import chunked_distillation_loss, supports_chunked_loss
from distill.losses import DistillationLoss as distill_loss_tuple
from distill.losses import distillation_loss

LOSSES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.0), ("jsd", 1.0)]


def make_case(dtype=torch.float32, vocab_s=97, vocab_t=97, hidden_s=16, hidden_t=24, seed=0):
    """Two sequences of uneven length: a prompt masked with -100, right padding masked with -100."""
    g = torch.Generator().manual_seed(seed)
    batch, seq = 2, 11
    h_s = torch.randn(batch, seq, hidden_s, generator=g, dtype=dtype, requires_grad=True)
    w_s = (torch.randn(vocab_s, hidden_s, generator=g, dtype=dtype) * 0.5).requires_grad_()
    h_t = torch.randn(batch, seq, hidden_t, generator=g, dtype=dtype)
    w_t = torch.randn(vocab_t, hidden_t, generator=g, dtype=dtype) * 0.5
    labels = torch.randint(0, min(vocab_s, vocab_t), (batch, seq), generator=g)
    labels[0, :3] = -100  # prompt
    labels[1, 7:] = -100  # padding: the second sequence is shorter
    return h_s, w_s, h_t, w_t, labels


def reference(h_s, w_s, h_t, w_t, labels, **kw):
    """The reference path: materialised logits into distill.losses (which computes in fp32)."""
    return distillation_loss(h_s @ w_s.T, (h_t @ w_t.T).detach(), labels, **kw)


def textbook(h_s, w_s, h_t, w_t, labels, alpha=0.5, temperature=1.0, loss_type="forward_kl", beta=0.5,
             num_items_in_batch=None):  # fmt: skip
    """The formulas of distill.losses written plainly, in the inputs' dtype (float64 here)."""
    v = min(w_s.shape[0], w_t.shape[0])
    s, t = (h_s @ w_s[:v].T)[:, :-1], (h_t @ w_t[:v].T).detach()[:, :-1]
    y = labels[:, 1:]
    keep = y != -100
    s, t, y = s[keep], t[keep], y[keep]
    p_s, p_t = torch.softmax(s / temperature, -1), torch.softmax(t / temperature, -1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if loss_type == "forward_kl" or (loss_type == "jsd" and beta == 0.0):
        div = kl(p_t, p_s)
    elif loss_type == "reverse_kl" or (loss_type == "jsd" and beta == 1.0):
        div = kl(p_s, p_t)
    else:
        m = beta * p_t + (1 - beta) * p_s
        div = beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    denom = max(int(keep.sum()), 1) if num_items_in_batch is None else num_items_in_batch
    kd = div.sum() * temperature**2 / denom
    ce = F.cross_entropy(s, y, reduction="sum") / denom
    return distill_loss_tuple(alpha * kd + (1 - alpha) * ce, kd.detach(), ce.detach(), keep.sum())


def run(fn, case, **kw):
    """Loss tuple and the gradients of (h_S, W_S) for one path, on fresh leaves."""
    h_s, w_s, h_t, w_t, labels = (x.detach().clone().requires_grad_(x.requires_grad) for x in case)
    out = fn(h_s, w_s, h_t, w_t, labels, **kw)
    out.loss.backward()
    return out, h_s.grad, w_s.grad


def assert_close(actual, expected, rtol):
    """Relative error against the largest magnitude of the expected tensor."""
    scale = expected.abs().max().clamp(min=torch.finfo(expected.dtype).tiny)
    err = ((actual - expected).abs().max() / scale).item()
    assert err < rtol, f"relative error {err:.3g} >= {rtol}"


def assert_same(case, rtol, **kw):
    """Chunked == reference in fp32; chunked == the float64 textbook formulas in float64."""
    ref, ref_gh, ref_gw = run(reference if case[0].dtype == torch.float32 else textbook, case, **kw)
    got, gh, gw = run(chunked_distillation_loss, case, chunk_size=3, **kw)
    for name in ("loss", "kd", "ce"):
        assert_close(getattr(got, name), getattr(ref, name), rtol)
    assert got.num_tokens == ref.num_tokens
    assert_close(gh, ref_gh, rtol)
    assert_close(gw, ref_gw, rtol)


@pytest.mark.parametrize("loss_type,beta", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_values_and_gradients_equal_reference_fp32(loss_type, beta, temperature):
    """fp32: masked prompt and padding, uneven lengths, chunks that do not divide the tokens."""
    assert_same(make_case(), 1e-5, loss_type=loss_type, beta=beta, temperature=temperature, alpha=0.3)


@pytest.mark.parametrize("loss_type,beta", LOSSES)
def test_values_and_gradients_equal_reference_float64(loss_type, beta):
    assert_same(make_case(torch.float64), 1e-12, loss_type=loss_type, beta=beta, temperature=1.7, alpha=0.6)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "jsd"])
def test_pure_kd_and_pure_ce_endpoints(alpha, loss_type):
    assert_same(make_case(torch.float64), 1e-12, loss_type=loss_type, alpha=alpha, temperature=1.5)


@pytest.mark.parametrize("vocab_s,vocab_t", [(97, 128), (128, 97)])
def test_padded_vocabularies_compare_on_shared_ids(vocab_s, vocab_t):
    """Either side's output layer may be padded wider; ids past the shared ones get no gradient."""
    case = make_case(torch.float64, vocab_s=vocab_s, vocab_t=vocab_t)
    assert_same(case, 1e-12, loss_type="jsd", temperature=2.0)
    _, _, gw = run(chunked_distillation_loss, case, chunk_size=4)
    assert gw.shape == (vocab_s, 16) and not gw[97:].any()


def test_normalised_by_num_items_in_batch():
    """The step-level token count (gradient accumulation) divides loss and gradients alike."""
    assert_same(make_case(torch.float64), 1e-12, num_items_in_batch=40, loss_type="reverse_kl")


def test_frozen_output_layer_gets_no_weight_gradient():
    """LoRA / frozen lm_head: W_S.grad stays None, the hidden-state gradient is unchanged."""
    case = make_case(torch.float64)
    case[1].requires_grad_(False)
    ref, ref_gh, _ = run(textbook, case, loss_type="forward_kl")
    got, gh, gw = run(chunked_distillation_loss, case, loss_type="forward_kl", chunk_size=5)
    assert gw is None
    assert_close(gh, ref_gh, 1e-12)
    assert_close(got.loss, ref.loss, 1e-12)


def test_all_masked_batch_gives_zero_and_zero_gradients():
    case = make_case()
    case[4].fill_(-100)
    out, gh, gw = run(chunked_distillation_loss, case, loss_type="jsd")
    assert out.loss.item() == 0.0 and out.num_tokens.item() == 0
    assert torch.all(gh == 0) and torch.all(gw == 0)


def test_no_grad_mode_returns_the_same_values():
    """Evaluation under torch.no_grad computes no gradients but the same loss."""
    case = make_case()
    with torch.no_grad():
        got = chunked_distillation_loss(*case, loss_type="reverse_kl", chunk_size=4)
        ref = reference(*case, loss_type="reverse_kl")
    assert not got.loss.requires_grad
    assert_close(got.loss, ref.loss, 1e-5)


def test_default_chunking_equals_one_chunk():
    """The default chunk size (many small chunks here) and one chunk for all rows agree."""
    case = make_case(torch.float64)
    one, gh1, gw1 = run(chunked_distillation_loss, case, chunk_size=10_000)
    default, gh, gw = run(chunked_distillation_loss, case)
    assert_close(default.loss, one.loss, 1e-12)
    assert_close(gh, gh1, 1e-12)
    assert_close(gw, gw1, 1e-12)


def test_autocast_runs_the_output_layer_in_the_autocast_dtype():
    """Under bf16 autocast (Trainer's bf16=True) the chunked path matches an autocast reference
    whose logits come from a bf16 matmul, and returns fp32-accumulated gradients in W's dtype."""
    h_s, w_s, h_t, w_t, labels = make_case(hidden_s=64, hidden_t=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = distillation_loss(F.linear(h_s, w_s), F.linear(h_t, w_t).detach(), labels, temperature=2.0)
        got = chunked_distillation_loss(h_s, w_s, h_t, w_t, labels, temperature=2.0, chunk_size=4)
    (ref_gh, ref_gw) = torch.autograd.grad(ref.loss, (h_s, w_s))
    (gh, gw) = torch.autograd.grad(got.loss, (h_s, w_s))
    assert gw.dtype == torch.float32
    # bf16 matmuls with different reduction orders: agreement to bf16 precision, not fp32.
    assert_close(got.loss, ref.loss, 1e-2)
    assert_close(gh, ref_gh, 3e-2)
    assert_close(gw, ref_gw, 3e-2)
    # ...and it really ran in bf16: the fp32 result differs by more than fp32 rounding.
    fp32 = chunked_distillation_loss(h_s, w_s, h_t, w_t, labels, temperature=2.0)
    assert (fp32.loss - got.loss).abs() > 1e-5


def test_a_bf16_teacher_runs_its_output_layer_in_bf16():
    """A teacher loaded in bf16 next to an fp32 student (no autocast): its logits are a bf16 matmul,
    as its own forward would make them, not an fp32 copy of its weight."""
    h_s, w_s, h_t, w_t, labels = make_case(hidden_s=64, hidden_t=64)
    h_t, w_t = h_t.bfloat16(), w_t.bfloat16()
    ref = distillation_loss(h_s @ w_s.T, (h_t @ w_t.T).float(), labels, temperature=2.0)
    got = chunked_distillation_loss(h_s, w_s, h_t, w_t, labels, temperature=2.0, chunk_size=4)
    assert_close(got.loss, ref.loss, 1e-5)
    fp32_teacher = distillation_loss(h_s @ w_s.T, h_t.float() @ w_t.float().T, labels, temperature=2.0)
    assert (fp32_teacher.loss - got.loss).abs() > 1e-5  # the check above can tell bf16 from fp32


def tiny_llama(**config):
    from transformers import LlamaConfig, LlamaForCausalLM

    base = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    return LlamaForCausalLM(LlamaConfig(**base | {"num_attention_heads": 2, "num_key_value_heads": 2} | config))


def test_supports_chunked_loss_plain_llama_and_lora_elsewhere():
    from peft import LoraConfig, get_peft_model

    assert supports_chunked_loss(tiny_llama())
    lora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert supports_chunked_loss(lora)


def test_supports_chunked_loss_refuses_transformed_logits():
    """Softcapped or scaled logits, a biased head, or an adapter on the head: fall back."""
    from peft import LoraConfig, get_peft_model

    assert not supports_chunked_loss(tiny_llama(final_logit_softcapping=30.0))
    assert not supports_chunked_loss(tiny_llama(logits_scaling=4.0))
    biased = tiny_llama()
    biased.lm_head = nn.Linear(16, 64, bias=True)
    assert not supports_chunked_loss(biased)
    lora_head = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert not supports_chunked_loss(lora_head)


def test_llama_logits_are_hidden_states_times_head():
    """The premise of supports_chunked_loss on a real transformers model: logits == h @ W^T."""
    model = tiny_llama().eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        logits = model(ids).logits
        hidden = model.get_decoder()(ids).last_hidden_state
    torch.testing.assert_close(hidden @ model.get_output_embeddings().weight.T, logits)


# --- the chunked path inside DistillTrainer -------------------------------------------------------


def trainer_pair(tmp_path, student, teacher, chunked, **config):
    """A DistillTrainer on copies of the given models, asked for (and checked to be on) the chunked
    or the reference path; ``config`` may ask for one and expect the other."""
    import copy

    from distill.config import DistillConfig
    from distill.data import Collator
    from distill.trainer import DistillTrainer

    args = DistillConfig(
        output_dir=str(tmp_path / f"chunked_{chunked}"), teacher_model_name_or_path="in-memory", use_cpu=True,
        report_to="none", measure_cost=False, **({"chunked_loss": chunked} | config),
    )  # fmt: skip
    model = copy.deepcopy(student)
    trainer = DistillTrainer(model=model, teacher=copy.deepcopy(teacher), args=args, data_collator=Collator(0))
    assert trainer._chunked is chunked
    return trainer, model


def trainer_batch():
    """Uneven lengths (right padding) and a masked prompt, through distill's own collator."""
    from distill.data import Collator

    g = torch.Generator().manual_seed(1)
    rows = []
    for n, prompt in ((13, 4), (9, 0), (16, 6)):
        ids = torch.randint(1, 64, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return Collator(0)(rows)


def step_results(trainer, model, batch):
    """Training loss and every trainable parameter's gradient, then the evaluation sums."""
    inputs = trainer._prepare_inputs(batch)
    model.train()
    loss = trainer.compute_loss(model, inputs, num_items_in_batch=torch.tensor(40))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    model.eval()
    with torch.no_grad():
        trainer.compute_loss(model, inputs)
    return loss.detach(), grads, trainer._eval_sums.clone()


@pytest.mark.parametrize("loss_type", ["forward_kl", "jsd"])
def test_chunked_trainer_equals_reference_trainer(tmp_path, loss_type):
    """Same loss, logged parts, gradients of every student parameter, and evaluation metrics
    (KD, CE, top-1 agreement), for a tied-embedding student and a teacher with a padded vocabulary."""
    torch.manual_seed(0)
    student = tiny_llama(tie_word_embeddings=True)
    teacher = tiny_llama(vocab_size=72, hidden_size=24, num_attention_heads=3, num_key_value_heads=3)
    batch = trainer_batch()
    cfg = {"alpha": 0.4, "temperature": 2.0, "loss_type": loss_type}
    ref = step_results(*trainer_pair(tmp_path, student, teacher, False, **cfg), batch)
    got = step_results(*trainer_pair(tmp_path, student, teacher, True, **cfg), batch)
    assert_close(got[0], ref[0], 1e-5)
    assert ref[1].keys() == got[1].keys()
    for name in ref[1]:
        assert_close(got[1][name], ref[1][name], 1e-5)
    assert_close(got[2], ref[2], 1e-5)  # kd*tokens, ce*tokens, agreeing tokens, tokens


def test_chunked_trainer_with_lora_student_computes_no_head_gradient(tmp_path):
    """A LoRA student keeps the chunked path; its frozen lm_head gets no gradient, the adapters get
    the reference path's."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    student = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    teacher = tiny_llama(hidden_size=24, num_attention_heads=3, num_key_value_heads=3)
    batch = trainer_batch()
    ref = step_results(*trainer_pair(tmp_path, student, teacher, False), batch)
    trainer, model = trainer_pair(tmp_path, student, teacher, True)
    got = step_results(trainer, model, batch)
    assert model.get_base_model().lm_head.weight.grad is None
    assert_close(got[0], ref[0], 1e-5)
    for name in ref[1]:
        assert_close(got[1][name], ref[1][name], 1e-5)


def test_trainer_falls_back_where_the_model_does_not_allow_chunking(tmp_path):
    """chunked_loss=True is a default, not a demand: a softcapped teacher takes the reference path."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    teacher = Gemma2ForCausalLM(
        Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0)
    )  # fmt: skip
    trainer_pair(tmp_path, tiny_llama(), teacher, False, chunked_loss=True)


def scaled_fp16_gradients(fn, case, loss_scale, **kw):
    """Gradients of (h_S, W_S) as fp16 training makes them: fp16 tensors, the loss multiplied by the
    loss scale before backward (GradScaler, DeepSpeed), the gradients divided by it afterwards."""
    h_s, w_s, h_t, w_t = (x.detach().half().requires_grad_(x.requires_grad) for x in case[:4])
    labels = case[4]
    out = fn(h_s, w_s, h_t, w_t, labels, **kw)
    (out.loss * loss_scale).backward()
    return h_s.grad.double() / loss_scale, w_s.grad.double() / loss_scale


@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "jsd"])
def test_fp16_with_loss_scaling_is_as_accurate_as_the_reference_path(loss_type):
    """Under fp16 weights and a 2^16 loss scale, with the loss normalised by a large step (131,072
    target tokens, gradient accumulation over many micro-batches), the chunked gradients are as close
    to the float64 ones as the reference path's, and the weight gradient is not flushed to zero."""
    case = make_case(torch.float64, vocab_s=512, vocab_t=512, hidden_s=64, hidden_t=64)
    kw = {"alpha": 0.5, "temperature": 2.0, "loss_type": loss_type, "num_items_in_batch": 131_072}
    _, want_h, want_w = run(textbook, case, **kw)
    errors = {}
    for name, fn in (("reference", reference), ("chunked", chunked_distillation_loss)):
        got_h, got_w = scaled_fp16_gradients(fn, case, 2.0**16, **kw)
        errors[name] = [((got - want).abs().max() / want.abs().max()).item() for got, want in
                        ((got_h, want_h), (got_w, want_w))]  # fmt: skip
        errors[name].append((got_w == 0).double().mean().item())
    ref_h, ref_w, ref_zeros = errors["reference"]
    got_h, got_w, got_zeros = errors["chunked"]
    assert ref_h < 1e-2 and ref_w < 1e-2, errors  # the reference is accurate: the check can tell
    assert got_h <= 2 * ref_h and got_w <= 2 * ref_w, errors
    assert got_zeros <= ref_zeros + 0.01, errors


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), (None, torch.float32)])
def test_the_trainer_runs_the_output_layers_in_the_runs_mixed_precision(tmp_path, monkeypatch, precision, dtype):
    """Inside the Trainer autocast covers the model's forward only, not compute_loss: with `bf16: true`
    the chunked loss must still run the student's and the teacher's output matmuls in bf16 (the
    largest matmuls of a small student), and in fp32 without mixed precision."""
    import distill.chunked

    seen = []

    def spy(h, w, compute_dtype, math_dtype):
        seen.append(compute_dtype)
        return logits(h, w, compute_dtype, math_dtype)

    logits = distill.chunked._logits
    monkeypatch.setattr(distill.chunked, "_logits", spy)
    torch.manual_seed(0)
    student, teacher = tiny_llama(), tiny_llama(hidden_size=24, num_attention_heads=3, num_key_value_heads=3)
    trainer, model = trainer_pair(tmp_path, student, teacher, True, **({precision: True} if precision else {}))
    inputs = trainer._prepare_inputs(trainer_batch())
    model.train()
    with trainer.compute_loss_context_manager():
        trainer.compute_loss(model, inputs, num_items_in_batch=torch.tensor(40)).backward()
    assert seen and set(seen) == {dtype}
    assert model.lm_head.weight.grad.dtype == torch.float32  # fp32 master weights get fp32 gradients
