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

import warnings
from collections.abc import Mapping
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode, bmm_flop, mm_flop, sdpa_flop_count

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

    def knows(self, role: str, inputs: Mapping, *extra) -> bool:
        """Whether a block with this key has been counted (a measure of it would not count again)."""
        return (role, shape_key(inputs), *extra) in self._known

    @contextmanager
    def measure(self, role: str, inputs: Mapping, *extra, units: int = 1):
        """Count the block as ``role``'s. ``extra``: whatever else its FLOPs depend on besides the
        shapes of ``inputs``. ``units``: the block's work is ``units`` times a per-unit cost that
        depends only on the key (e.g. rows of the output layer); counted once, then scaled. Tokens
        and examples are those of ``inputs["input_ids"]``, if it is there."""
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
            if opened:
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
