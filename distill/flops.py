"""Measured FLOPs: what the models actually multiplied, counted by ``torch.utils.flop_counter``.

Convention, the one MFU is defined with (Chowdhery et al. 2022, PaLM, app. B): *model* FLOPs.
A matmul of (m x k) by (k x n) counts 2mnk; elementwise work (norms, softmax, activations, the
optimizer) counts 0. Attention counts its two matmuls QK^T and PV over the full s x s score matrix,
causal or not, because that is what the kernels and the usual formulas count; its backward counts
twice its forward, like every other matmul. The fused flash kernels recompute QK^T in the backward;
that recomputation is work the hardware does, not work the model needs, so it is not counted.
Activation checkpointing's recomputed forward is the same kind of work: the meter counts it apart
(:meth:`FlopMeter.recomputing`), as the *hardware* FLOPs that HFU is defined on, and leaves it out
of the model FLOPs that MFU is defined on.

Three gaps of torch 2.13's registry are filled through ``FlopCounterMode(custom_mapping=...)``:

- CPU SDPA dispatches to ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``),
  which has no formula, so attention silently counted 0;
- the CUDA SDPA backward formulas count the recomputed QK^T (2.5x the forward, not 2x);
- the in-place ``addmm_`` and ``baddbmm_`` (used by :mod:`distill.chunked` to accumulate the output
  layer's gradient) are separate ops from ``addmm``/``baddbmm`` and counted 0.

With both, a model counts the same FLOPs under ``eager`` and ``sdpa`` attention, on CPU and GPU.

Counting a step under ``FlopCounterMode`` makes it slower (1.04x to 2.8x on CPU in
benchmarks/cost_meter.py: the mode's cost is per op, not per FLOP), but the count depends only on
the input shapes; so ``FlopMeter`` counts once per (role, shapes) and reuses the number afterwards.
Work whose size is a count of rows rather than a shape (the chunked loss runs the output layers on
the target positions only) is counted once per unit and multiplied by the count (``units``).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.flop_counter import FlopCounterMode, bmm_flop, mm_flop, sdpa_flop_count

from distill.errors import UserError

aten = torch.ops.aten


def _sdpa_forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    # dV = P^T dO, dP = dO V^T, then (dS = softmax backward of dP) dQ = dS K, dK = dS^T Q:
    # four matmuls of the forward's two sizes.
    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)


def _addmm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return mm_flop(a_shape, b_shape)


def _baddbmm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return bmm_flop(a_shape, b_shape)


FLOP_FORMULAS = {
    aten.addmm_: _addmm_flops,
    aten.baddbmm_: _baddbmm_flops,
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_forward_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
    aten._scaled_dot_product_flash_attention_backward: _sdpa_backward_flops,
    aten._scaled_dot_product_efficient_attention_backward: _sdpa_backward_flops,
    aten._scaled_dot_product_cudnn_attention_backward: _sdpa_backward_flops,
}
# Whatever runs attention must land on one of these (or on a plain bmm/matmul, as eager does);
# a count with none of them has most likely missed the attention (e.g. a third-party kernel).
_ATTENTION_OPS = (
    {op for op in FLOP_FORMULAS if "attention" in str(op)}
    | {aten.bmm, aten.baddbmm, aten.baddbmm_}
    | {op for op in torch.utils.flop_counter.flop_registry if "attention" in str(op)}
)


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts the ops above. Use as a context manager, then
    read ``.get_total_flops()``."""
    return FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)


def shape_key(inputs: Mapping) -> tuple:
    """What a model call's FLOPs depend on: the name and shape of each tensor input."""
    return tuple((k, tuple(v.shape)) for k, v in inputs.items() if isinstance(v, torch.Tensor))


class FlopMeter:
    """Cumulative measured FLOPs and tokens per role (``"teacher"``, ``"student"``).

    Wrap each model call, every step::

        with meter.measure("student", inputs):          # forward + backward of the student
            ...
            with meter.measure("teacher", inputs):      # may nest: counted apart, not twice
                teacher(**inputs)

    The first call with given input shapes runs under ``FlopCounterMode``; later calls with the same
    shapes add the stored count, which costs a dict lookup. Nested measures share the one counter
    that is open (nested ``FlopCounterMode``s would each count everything inside them): the inner
    role gets the difference of the counter across its block, and the outer role gets its own count
    minus that. A block that raises counts nothing. FLOPs of models whose work depends on the
    values, not the shapes (mixture-of-experts routing), are those of the first batch of each shape.

    ``flops`` are model FLOPs; ``recomputed`` holds, per role, the FLOPs of activation checkpointing's
    recomputed forwards on top of them (hardware FLOPs = both).
    """

    def __init__(self):
        self.flops: dict[str, int] = {}
        self.recomputed: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self.examples: dict[str, int] = {}
        self.measurements = 0  # how many blocks ran under FlopCounterMode: the meter's own overhead
        self._known: dict[tuple, tuple[float, float]] = {}  # (role, key) -> (model, recomputed) FLOPs per unit
        self._counter: FlopCounterMode | None = None
        # per open counted block: [counter total at entry, FLOPs of nested blocks, recomputed FLOPs]
        self._frames: list[list[int]] = []
        self._warned = False

    @property
    def total(self) -> int:
        return sum(self.flops.values())

    def reset(self) -> None:
        """Zero the totals; the per-shape counts stay valid and are kept."""
        for totals in (self.flops, self.recomputed, self.tokens, self.examples):
            totals.clear()

    def move(self, flops: int, src: str, dst: str) -> None:
        """Reattribute FLOPs counted in ``src``'s block that were done for ``dst`` (e.g. the teacher's
        output layer, when the loss computes it inside the student's step)."""
        self.flops[src] = self.flops.get(src, 0) - flops
        self.flops[dst] = self.flops.get(dst, 0) + flops

    @contextmanager
    def measure(self, role: str, inputs: Mapping, *extra, units: int = 1, attention: bool = True):
        """Count the block as ``role``'s. ``extra``: whatever else its FLOPs depend on besides the
        shapes of ``inputs``. ``units``: the block's work is ``units`` times a per-unit cost that
        depends only on the key (e.g. rows of the output layer); counted once, then scaled. Tokens
        and examples are those of ``inputs["input_ids"]``, if it is there. ``attention``: whether the
        block runs attention, so that a first count without any is warned of (an output layer alone
        has none)."""
        key = (role, shape_key(inputs), *extra)
        ids = inputs.get("input_ids")
        tokens, examples = (ids.numel(), ids.shape[0]) if isinstance(ids, torch.Tensor) else (0, 0)
        known = self._known.get(key)
        if known is not None and self._counter is None:  # the every-step path
            yield
            self._add(role, known[0] * units, known[1] * units, tokens, examples)
            return

        opened = self._counter is None
        if opened:
            self._counter = flop_counter()
            self._counter.__enter__()
            self.measurements += 1
        frame = [self._counter.get_total_flops(), 0, 0]
        self._frames.append(frame)
        try:
            yield
            spent = self._counter.get_total_flops() - frame[0]
        finally:
            self._frames.pop()
            if opened:
                counter, self._counter = self._counter, None
                counter.__exit__(None, None, None)
        if self._frames:
            self._frames[-1][1] += spent
        recomputed = frame[2]
        flops = spent - frame[1] - recomputed
        if known is None:
            self._known[key] = (flops / units, recomputed / units) if units else (0.0, 0.0)
            if opened and attention:
                self._check_attention(role, counter)
        self._add(role, flops, recomputed, tokens, examples)

    @contextmanager
    def recomputing(self):
        """Mark the block as activation checkpointing's recomputation: while a block is being
        counted, its FLOPs go to ``recomputed`` instead of ``flops``. Free when nothing is counted."""
        if self._counter is None or not self._frames:
            yield
            return
        start = self._counter.get_total_flops()
        try:
            yield
        finally:  # a recompute that torch stops early (it has what backward needs) raises through here
            self._frames[-1][2] += self._counter.get_total_flops() - start

    def _add(self, role: str, flops: float, recomputed: float, tokens: int, examples: int) -> None:
        self.flops[role] = self.flops.get(role, 0) + round(flops)
        self.recomputed[role] = self.recomputed.get(role, 0) + round(recomputed)
        self.tokens[role] = self.tokens.get(role, 0) + tokens
        self.examples[role] = self.examples.get(role, 0) + examples

    def _check_attention(self, role: str, counter: FlopCounterMode) -> None:
        ops = counter.get_flop_counts().get("Global", {})
        if ops and not self._warned and not any(op in _ATTENTION_OPS for op in ops):
            self._warned = True
            warnings.warn(
                f"no attention FLOPs were counted for the {role}: if the model has attention, its kernel has "
                "no FLOP formula (e.g. the flash-attn package) and the count is low; attn_implementation='sdpa' "
                "or 'eager' is counted",
                stacklevel=4,
            )


def mark_recomputation(model: torch.nn.Module, meter: FlopMeter) -> int:
    """Make activation checkpointing's recomputed forwards count as ``meter.recomputing()``.

    transformers checkpoints each ``GradientCheckpointingLayer`` by calling its
    ``_gradient_checkpointing_func(forward, *args)``; torch calls ``forward`` once in the forward pass
    and again, to recompute, in the backward pass (reentrant or not). The wrapper marks every call
    after the first. Returns how many layers it wrapped (0 without activation checkpointing).
    """
    wrapped = 0
    for module in model.modules():
        checkpoint = getattr(module, "_gradient_checkpointing_func", None)
        if checkpoint is None or getattr(checkpoint, "_distill_marks_recomputation", False):
            continue

        def marked(function, *args, _checkpoint=checkpoint, **kwargs):
            calls = 0

            def run(*a, **k):
                nonlocal calls
                calls += 1
                if calls == 1:
                    return function(*a, **k)
                with meter.recomputing():
                    return function(*a, **k)

            return _checkpoint(run, *args, **kwargs)

        marked._distill_marks_recomputation = True
        module._gradient_checkpointing_func = marked
        wrapped += 1
    return wrapped


# ---------------------------------------------------------------------------------------------------
# Computed FLOPs: the same convention from a model's config, where its work cannot be measured here
# (planning before launch, a teacher or a sampler on a vLLM server). For a Llama-style model they
# equal the measured count exactly (tests/test_cost.py).


class ModelSize(NamedTuple):
    name: str
    params: float  # multiplied by every token: Linear weights, output layer included
    layers: int = 0  # 0 when only a parameter count is known: no attention term
    attn_width: int = 0  # query heads x head dim
    head: float = 0  # of params, the output layer's (0 when unknown)


def forward_flops(size: ModelSize, tokens: float, context: float) -> float:
    """FLOPs of a forward pass of ``tokens`` positions that each attend to ``context`` positions:
    ``tokens x (2 N + 4 L d context)``. Every bill that computes rather than measures a model's work
    calls this one formula: a prefill of n tokens is ``forward_flops(size, n, n)`` (attention over the
    whole s x s matrix, the measured convention), one decoding step at context c is
    ``forward_flops(size, 1, c)``, training is 3 forwards."""
    return tokens * (2 * size.params + 4 * size.layers * size.attn_width * context)


def sampling_flops(size: ModelSize, prompt: int, sampled: int) -> float:
    """FLOPs of sampling ``sampled`` tokens after a ``prompt``: its prefill, whose output layer runs on
    the last position only (the one that yields the first sample), then one decoding forward for each
    further token, over its context. What ``generate`` and a vLLM server compute."""
    if sampled == 0:
        return 0.0
    prefill = forward_flops(size, prompt, prompt) - 2 * size.head * (prompt - 1)
    return prefill + sum(forward_flops(size, 1, prompt + t) for t in range(1, sampled))


_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text) -> float | None:
    """``"135M"`` -> 1.35e8, ``"174.6e9"`` -> 1.746e11, ``"2B"`` -> 2e9; None if it is not a number."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9][0-9_.,]*(?:e[+-]?[0-9]+)?)\s*([kmbgt]?)\s*", str(text), re.IGNORECASE)
    if not m:
        return None
    try:
        value = float(m.group(1).replace(",", "").replace("_", ""))
    except ValueError:
        return None
    return value * _SUFFIX.get(m.group(2).lower(), 1.0)


def model_size(spec) -> ModelSize:
    """A parameter count (``"135M"``) or a model: hub id, local directory, config.json or .gguf file.

    A model is built from its config on the meta device (no weights read, no memory used) and its
    Linear weights counted, so tied embeddings count once and embedding lookups not at all.
    """
    count = parse_count(spec)
    if count is not None:
        if count <= 0:
            raise UserError(f"parameter count must be positive, got {spec!r}")
        return ModelSize(str(spec), count)

    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from distill.models import resolve

    path = Path(str(spec)).expanduser()
    if path.is_file() and path.suffix == ".json":
        where, gguf_file = str(path), None
    else:
        where, gguf_file = resolve(str(spec))
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=gguf_file)
    except (OSError, ValueError) as err:
        raise UserError(
            f"could not read a model config from {spec!r} ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "give a local model directory, a config.json, or a parameter count like 135M"
        ) from err
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    other = sum(p.numel() for p in model.parameters() if p.dim() > 1 and id(p) not in linear and id(p) not in embedding)
    params = sum(linear.values())
    if other > 0.01 * params:
        raise UserError(
            f"{spec!r} has {other:,} weights outside Linear layers (fused mixture-of-experts weights?), so its "
            "FLOPs per token cannot be read off the config; give the active parameter count as a number"
        )
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    head = model.get_output_embeddings()
    head = linear.get(id(head.weight), 0) if head is not None else 0
    return ModelSize(str(spec), float(params), text.num_hidden_layers, heads * head_dim, float(head))
