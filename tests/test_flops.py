"""Measured FLOPs (distill.flops): the counting convention, the attention kernels, and the meter's
count-once-per-shape bookkeeping."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode
from transformers import LlamaConfig, LlamaForCausalLM

import distill.flops
from distill.flops import FlopMeter, flop_counter

aten = torch.ops.aten


def count(fn) -> tuple[int, dict]:
    with flop_counter() as fc:
        fn()
    return fc.get_total_flops(), fc.get_flop_counts()["Global"]


def llama(attn="sdpa", **kw):
    cfg = {
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 112,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
        **kw,
    }
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation=attn))


def llama_forward_flops(c: LlamaConfig, batch: int, seq: int) -> tuple[int, int]:
    """(all, attention) FLOPs of one forward, counted by hand: every matmul 2mnk.

    Per token and layer: q and o projections d x (h hd) each, k and v d x (kv hd) each (GQA),
    gate, up, down d x ff each; QK^T and PV 2 s (h hd) each. Once per token: the output layer d x V.
    """
    d, L, V, ff = c.hidden_size, c.num_hidden_layers, c.vocab_size, c.intermediate_size
    h, kv = c.num_attention_heads, c.num_key_value_heads
    hd = d // h
    per_token = L * (2 * d * h * hd + 2 * d * kv * hd + 3 * d * ff) + d * V
    tokens = batch * seq
    attention = L * 2 * (2 * seq * h * hd) * tokens
    return 2 * per_token * tokens + attention, attention


def test_one_matmul_counts_2mnk():
    m, k, n = 7, 11, 13
    a, b = torch.randn(m, k), torch.randn(k, n)
    assert count(lambda: a @ b)[0] == 2 * m * n * k


def test_in_place_matmuls_count_like_their_out_of_place_forms():
    """addmm_ (how distill.chunked accumulates the output layer's gradient) is its own op in torch."""
    acc, a, b = torch.zeros(5, 7), torch.randn(5, 3), torch.randn(3, 7)
    assert count(lambda: acc.addmm_(a, b))[0] == count(lambda: torch.addmm(acc, a, b))[0] == 2 * 5 * 7 * 3
    acc, a, b = torch.zeros(2, 5, 7), torch.randn(2, 5, 3), torch.randn(2, 3, 7)
    assert count(lambda: acc.baddbmm_(a, b))[0] == count(lambda: torch.baddbmm(acc, a, b))[0] == 2 * 2 * 5 * 7 * 3


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_fused_cpu_attention_counts_like_its_two_matmuls(kv_heads):
    """SDPA on CPU runs a fused kernel with no FLOP formula in torch; ours counts QK^T and PV,
    forward and backward, exactly like the same attention written with matmuls."""
    b, h, s, d = 2, 4, 24, 8
    q = torch.randn(b, h, s, d, requires_grad=True)
    k = torch.randn(b, kv_heads, s, d, requires_grad=True)
    v = torch.randn(b, kv_heads, s, d, requires_grad=True)

    def fused():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != h).sum().backward()

    def matmuls():
        kk, vv = (x.repeat_interleave(h // kv_heads, dim=1) for x in (k, v))
        scores = (q @ kk.transpose(-1, -2) / d**0.5).masked_fill(torch.ones(s, s).triu(1).bool(), float("-inf"))
        (scores.softmax(-1) @ vv).sum().backward()

    fused_flops, ops = count(fused)
    assert aten._scaled_dot_product_flash_attention_for_cpu in ops  # the fused kernel really ran
    forward = 2 * (2 * b * h * s * s * d)
    assert fused_flops == count(matmuls)[0] == 3 * forward


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_training_step_equals_analytic_count(attn):
    """Forward + backward of a Llama step = 3 x the hand count of its forward (backward = 2 x forward),
    within 2%; attention is more than 2% of it, so an uncounted attention would fail this."""
    batch, seq = 2, 32
    model = llama(attn)
    ids = torch.randint(0, 96, (batch, seq))
    measured = count(lambda: model(input_ids=ids, labels=ids).loss.backward())[0]
    forward, attention = llama_forward_flops(model.config, batch, seq)
    assert attention / forward > 0.02
    assert measured == pytest.approx(3 * forward, rel=0.02)


def test_eager_and_sdpa_count_the_same():
    ids = torch.randint(0, 96, (2, 16))
    sdpa, eager = llama("sdpa"), llama("eager")
    assert (
        count(lambda: sdpa(input_ids=ids, labels=ids).loss.backward())[0]
        == count(lambda: eager(input_ids=ids, labels=ids).loss.backward())[0]
    )


@pytest.fixture
def counters(monkeypatch):
    """How many times the meter really ran FlopCounterMode."""
    opened = []

    def counting():
        opened.append(1)
        return flop_counter()

    monkeypatch.setattr(distill.flops, "flop_counter", counting)
    return opened


def test_meter_counts_once_per_shape_and_reuses_the_count(counters):
    model = llama()
    meter = FlopMeter()
    short, long = ({"input_ids": torch.randint(0, 96, (2, s))} for s in (8, 16))
    per_call = {s: count(lambda x=x: model(**x))[0] for s, x in ((8, short), (16, long))}

    for x in (short, short, long, short, long):
        with meter.measure("student", x):
            model(**x)
    assert len(counters) == 2
    assert meter.flops["student"] == 3 * per_call[8] + 2 * per_call[16]
    assert meter.tokens["student"] == 3 * 16 + 2 * 32


def test_nested_measures_count_each_role_once():
    """The teacher forward runs inside the student's step; each role gets its own FLOPs, whichever of
    the two shapes is new (both, neither, only the outer, only the inner)."""
    student, teacher = llama(), llama(hidden_size=96, num_hidden_layers=3)
    a, b = ({"input_ids": torch.randint(0, 96, (2, s))} for s in (8, 12))

    def teacher_call(x):
        with torch.no_grad():
            teacher(**x)

    def student_call(x):
        student(**x, labels=x["input_ids"]).loss.backward()

    t = {id(x): count(lambda x=x: teacher_call(x))[0] for x in (a, b)}
    s = {id(x): count(lambda x=x: student_call(x))[0] for x in (a, b)}

    meter = FlopMeter()
    # (student shape, teacher shape): new/new, known/known, new/known, known/new
    plan = [(a, a), (a, a), (b, a), (a, b)]
    for xs, xt in plan:
        with meter.measure("student", xs):
            with meter.measure("teacher", xt):
                teacher_call(xt)
            student_call(xs)
    assert meter.flops["teacher"] == sum(t[id(xt)] for _, xt in plan)
    assert meter.flops["student"] == sum(s[id(xs)] for xs, _ in plan)


@pytest.mark.filterwarnings("ignore:no attention FLOPs")
def test_a_failed_block_counts_nothing_and_leaves_no_counter_open():
    meter = FlopMeter()
    x = torch.randn(4, 4)
    with pytest.raises(RuntimeError), meter.measure("student", {"input_ids": x}):
        x @ x
        raise RuntimeError("out of memory")
    assert meter.total == 0
    assert _get_current_dispatch_mode() is None
    with meter.measure("student", {"input_ids": x}):  # the failed shape is counted afresh
        x @ x
    assert meter.total == 2 * 4**3


def test_a_count_without_attention_warns_once():
    """A kernel without a FLOP formula (e.g. the flash-attn package) would leave attention out silently."""
    mlp = torch.nn.Linear(8, 8)
    meter = FlopMeter()
    with (
        pytest.warns(UserWarning, match="no attention FLOPs"),
        meter.measure("student", {"input_ids": torch.randn(2, 8)}),
    ):
        mlp(torch.randn(2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with meter.measure("student", {"input_ids": torch.randn(3, 8)}):
            mlp(torch.randn(3, 8))
