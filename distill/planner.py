"""`distill cost`: what a distillation will cost, planned before launch from parameter counts or configs.

Per token and forward pass a model computes ``2 N + 4 L s d`` FLOPs (:func:`distill.flops.forward_flops`),
where N is the parameters a token is multiplied by (the Linear weights, the output layer included;
embedding lookups are free), L the layers, s the sequence length and d the attention width (query
heads x head dim): QK^T and PV each cost 2 s d per token and layer. Training the student costs 3
forwards (backward = 2 x forward), the teacher one forward: per token ``6 N_s + 12 L_s s d_s`` and
``2 N_t + 4 L_t s d_t``. For a Llama-style model this equals what the training meter measures
(tests/test_cost.py).

GPU-hours assume an MFU of the accelerator's dense peak (:data:`distill.cost.PEAK_TFLOPS`).
"""

from __future__ import annotations

import json
import math

from distill.cost import _num, _usd, gpu_hours, peak_for, pflops_days
from distill.errors import UserError
from distill.flops import ModelSize, forward_flops, model_size, parse_count


def training_flops(
    student: ModelSize, tokens: float, seq_len: int, teacher: ModelSize | None = None, teacher_ratio: float = 1.0
) -> dict:
    """Analytic FLOPs of distilling on ``tokens`` tokens: 3 student forwards + 1 teacher forward per token.
    ``teacher_ratio``: the teacher's tokens per student token (a teacher with another tokenizer reads the
    same text in more or fewer tokens: its forward runs on ratio x tokens, in sequences ratio x as long)."""

    def attention(size: ModelSize, n: float, s: float) -> float:  # the 4 L s d part of each forward
        return forward_flops(size._replace(params=0), n, s)

    t_tokens, t_seq = teacher_ratio * tokens, teacher_ratio * seq_len
    out = {
        "student": 3 * forward_flops(student, tokens, seq_len),
        "student_attention": 3 * attention(student, tokens, seq_len),
        "teacher": forward_flops(teacher, t_tokens, t_seq) if teacher else 0.0,
        "teacher_attention": attention(teacher, t_tokens, t_seq) if teacher else 0.0,
    }
    out["total"] = out["student"] + out["teacher"]
    return out


def plan(
    student: ModelSize,
    tokens: float,
    teacher: ModelSize | None = None,
    seq_len: int = 2048,
    accelerator: str = "H100",
    peak_tflops: float | None = None,
    mfu: float = 0.4,
    price: float | None = None,
    server_pflops: float = 5.0,
    days: tuple[float, ...] = (3, 5, 10),
    teacher_ratio: float = 1.0,
) -> dict:
    """Everything ``distill cost`` prints, as a JSON-ready dict.

    GPU-hours assume ``mfu`` of the accelerator's dense peak. Servers are counted at the PFlop/s they
    *sustain* (utilisation already included), rounded up: 3,640 PFlop/s-days on 5 PFlop/s servers
    take 243 servers for 3 days. Inference assumes the same accelerator, MFU and price, with each
    generated token attending to ``seq_len`` positions; so the break-even token count,
    training FLOPs / (teacher - student FLOPs per token), does not depend on MFU or price.
    """
    if tokens <= 0:
        raise UserError(f"tokens must be positive, got {tokens}")
    if seq_len < 1:
        raise UserError(f"seq_len must be at least 1, got {seq_len}")
    if not 0 < mfu <= 1:
        raise UserError(f"mfu is a fraction of the peak in (0, 1], got {mfu}")
    if not teacher_ratio > 0:
        raise UserError(f"teacher_tokens_per_token must be > 0, got {teacher_ratio}")
    if server_pflops <= 0 or any(d <= 0 for d in days):
        raise UserError("server PFlop/s and days must be positive")
    if peak_tflops is None:
        accelerator, peak_tflops = peak_for(accelerator)
    elif peak_tflops <= 0:
        raise UserError(f"peak_tflops must be positive, got {peak_tflops}")

    flops = training_flops(student, tokens, seq_len, teacher, teacher_ratio)
    hours = gpu_hours(flops["total"], peak_tflops, mfu)
    pfd = pflops_days(flops["total"])

    def dollars(h):
        return None if price is None else h * price

    def per_1k(model: ModelSize) -> dict:
        f = forward_flops(model, 1000, seq_len)
        return {"flops": f, "usd": dollars(gpu_hours(f, peak_tflops, mfu))}

    inference = {"student": per_1k(student)}
    breakeven = None
    if teacher is not None:
        inference["teacher"] = per_1k(teacher)
        saved = inference["teacher"]["flops"] - inference["student"]["flops"]
        breakeven = 1000 * flops["total"] / saved if saved > 0 else None
    inference["breakeven_tokens"] = breakeven

    return {
        "student": student._asdict(),
        "teacher": teacher._asdict() if teacher else None,
        "tokens": tokens,
        "seq_len": seq_len,
        "teacher_tokens_per_token": teacher_ratio,
        "flops": flops,
        "pflops_days": {k: pflops_days(flops[k]) for k in ("student", "teacher", "total")},
        "accelerator": accelerator,
        "peak_tflops": peak_tflops,
        "mfu": mfu,
        "gpu_hours": hours,
        "gpu_days": hours / 24,
        "price_per_gpu_hour": price,
        "cost_usd": dollars(hours),
        "servers": [
            {"pflops": server_pflops, "days": d, "servers": math.ceil(pfd / (server_pflops * d))} for d in days
        ],
        "inference": inference,
    }


def render_plan(p: dict) -> str:
    def model_line(role: str, m: dict) -> str:
        if not m["layers"]:
            return f"  {role:<8} {_num(m['params'])} parameters (a bare count: no attention term)"
        return (
            f"  {role:<8} {m['name']}: {_num(m['params'])} parameters per token, "
            f"{m['layers']} layers x attention width {m['attn_width']}"
        )

    f, pfd = p["flops"], p["pflops_days"]
    lines = ["distill cost: plan", model_line("student", p["student"])]
    if p["teacher"]:
        lines.append(model_line("teacher", p["teacher"]))
    lines += [
        f"  tokens   {_num(p['tokens'])} at sequence length {p['seq_len']}",
        "",
        f"  {'training compute':<44}{'FLOPs':>12}{'PFlop/s-day':>14}",
        f"  {'student  3 x (2N + 4Lsd) per token':<44}{_num(f['student']):>12}{pfd['student']:>14.4g}",
    ]
    if p["teacher"]:
        r = p["teacher_tokens_per_token"]
        what = "per token" if r == 1 else f"x {r:g} per token"
        lines.append(f"  {'teacher  1 x (2N + 4Lsd) ' + what:<44}{_num(f['teacher']):>12}{pfd['teacher']:>14.4g}")
    attention = f["student_attention"] + f["teacher_attention"]
    lines += [
        f"  {'total':<44}{_num(f['total']):>12}{pfd['total']:>14.4g}",
        f"  {'  of which attention (the 4Lsd terms)':<44}{_num(attention):>12}{pflops_days(attention):>14.4g}",
        "",
        f"  on {p['accelerator']} ({p['peak_tflops']:g} TFLOP/s dense bf16) at {p['mfu']:.0%} MFU: "
        f"{_num(p['gpu_hours'])} GPU-hours = {_num(p['gpu_days'])} GPU-days"
        + (f", {_usd(p['cost_usd'])} at ${p['price_per_gpu_hour']:g}/GPU-hour" if p["cost_usd"] is not None else ""),
        "  servers sustaining {:g} PFlop/s: ".format(p["servers"][0]["pflops"])
        + ", ".join(f"{s['servers']:,} for {s['days']:g} days" for s in p["servers"]),
        "",
        f"  {'inference, per 1K generated tokens':<44}{'FLOPs':>12}{'$':>14}",
    ]
    inf = p["inference"]
    for role in ("teacher", "student"):
        if role in inf:
            lines.append(f"  {role:<44}{_num(inf[role]['flops']):>12}{_usd(inf[role]['usd']):>14}")
    if p["teacher"]:
        be = inf["breakeven_tokens"]
        lines.append(
            f"  distillation pays for itself after {_num(be)} tokens served by the student instead of the teacher"
            if be
            else "  the student is not cheaper per token than the teacher: distillation never pays for itself"
        )
    if p["cost_usd"] is None:
        lines.append("  (give --gpu_hour_price $/GPU-hour for dollar figures)")
    return "\n".join(lines)


def command(args) -> str:
    """`distill cost`: the plan for the parsed command line, as a table or JSON."""
    tokens = parse_count(args.tokens)
    if tokens is None:
        raise UserError(f"--tokens {args.tokens!r} is not a number; write e.g. 2B or 300e9")
    student = model_size(args.student)
    teacher = model_size(args.teacher) if args.teacher else None
    p = plan(
        student,
        tokens,
        teacher,
        seq_len=args.seq_len,
        accelerator=args.accelerator,
        peak_tflops=args.peak_tflops,
        mfu=args.mfu,
        price=args.price,
        server_pflops=args.server_pflops,
        days=tuple(args.days),
        teacher_ratio=args.teacher_tokens_per_token,
    )
    return json.dumps(p) if args.json else render_plan(p)
