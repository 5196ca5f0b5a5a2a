"""The teacher: one concept, three sources, three kinds of targets.

A *source* turns a batch into the *targets* the loss reads, and bills what it did:

=================  =============================  ===============================================
source             recipe                          targets
=================  =============================  ===============================================
``ModelTeacher``   ``teacher_model_name_or_path``  ``Logits`` (reference loss), or ``Hidden``: final
                                                   hidden states + output weight (chunked loss:
                                                   the logits are never made)
``CachedTeacher``  ``teacher_cache``               ``TopK`` read from disk, carried by the batch
                                                   (``teacher_cache.TargetsCollator``)
``ServedTeacher``  ``teacher_server``              ``TopK`` from a vLLM server, requested when the
                                                   batch is collated, one batch ahead
                                                   (``teacher_server.ServedTargetsCollator``), or
                                                   when asked, for the student's own samples
=================  =============================  ===============================================

The trainer knows sources and targets only through these methods, never through their types:

- source: ``attach(trainer)`` (placement, what the bill must know), ``chunkable``, and
  ``targets(inputs, chunked, cost)``, for training, evaluation and on-policy samples alike. ``cost``
  (the run's :class:`distill.cost.CostCallback`, None at evaluation) is billed what the source did
  there: the teacher forward, measured; nothing for a cache (the callback bills its share of the
  build); the positions a server scored, computed from the teacher's config, and its wall time.
- ``ModelTeacher.targets(..., layers)`` also hands over the outputs of the decoder layers a loss
  term names (``targets.layers``; distill.hidden), captured with hooks in the same forward. The other
  sources have no hidden states: a recipe asking for them is refused (DistillConfig).
- targets: ``vocab(student_width)`` (the ids both sides cover), ``on_logits`` / ``on_hidden`` (the KD
  loss against the student's logits or final hidden states: :mod:`distill.losses` /
  :mod:`distill.chunked`), ``output_layers`` (what the chunked loss computes per target row, for the
  bill), ``top1`` (for agreement) and ``tensors`` (to name the side that went non-finite).
"""

from __future__ import annotations

import contextlib
import time
from typing import NamedTuple

import torch

from distill.chunked import (
    chunked_distillation_loss,
    chunked_topk_distillation_loss,
    final_hidden_states,
    output_weight,
    supports_chunked_loss,
    top1_rows,
)
from distill.flops import ModelSize
from distill.hidden import captured_layers
from distill.losses import TopKTargets, distillation_loss, topk_distillation_loss
from distill.placement import describe, parameter_bytes, place_teacher
from distill.teacher_cache import TeacherCache
from distill.teacher_server import TeacherServer

# --- targets ---------------------------------------------------------------------------------------


class Logits(NamedTuple):
    """The teacher's whole distribution at every position."""

    logits: torch.Tensor  # (batch, seq, teacher vocab)
    layers: list | tuple = ()  # the outputs of the decoder layers the trainer asked for (distill.hidden)

    def vocab(self, student_width: int) -> int:
        # A teacher head padded wider than the student's (common within a family) is compared on the shared ids.
        return min(student_width, self.logits.shape[-1])

    def on_logits(self, logits, labels, vocab: int, kw: dict):
        return distillation_loss(logits, self.logits, labels, **kw)

    def top1(self, vocab: int) -> torch.Tensor:
        return self.logits[..., :vocab].argmax(-1)

    def tensors(self) -> list[torch.Tensor]:
        return [self.logits]


class Hidden(NamedTuple):
    """The teacher's distribution before its output layer: the chunked loss makes its logits a chunk
    of target rows at a time."""

    hidden: torch.Tensor  # (batch, seq, teacher hidden): the output layer's input
    weight: torch.Tensor  # (teacher vocab, teacher hidden): the output layer
    layers: list | tuple = ()  # the outputs of the decoder layers the trainer asked for (distill.hidden)

    def vocab(self, student_width: int) -> int:
        return min(student_width, self.weight.shape[0])

    def on_hidden(self, hidden, weight, labels, vocab: int, kw: dict, compute_dtype):
        return chunked_distillation_loss(
            hidden, weight, self.hidden, self.weight, labels, compute_dtype=compute_dtype, **kw
        )

    def output_layers(self, student_hidden: int, vocab: int) -> tuple[tuple, int]:
        """(what the output layers' FLOPs per row depend on, the teacher's FLOPs per row): its output
        layer runs inside the loss, one (rows x hidden_T) @ (hidden_T x vocab)."""
        return ("logits", student_hidden, self.weight.shape[1], vocab), 2 * self.weight.shape[1] * vocab

    def top1(self, vocab: int) -> torch.Tensor:
        return top1_rows(self.hidden, self.weight, vocab)

    def tensors(self) -> list[torch.Tensor]:
        return [self.hidden, self.weight]


class TopK(NamedTuple):
    """The teacher's k most likely ids per position and the mass of the rest (from a cache or a server)."""

    targets: TopKTargets  # (batch, seq, k) log-probs and ids, (batch, seq) tail; zeros off target
    shared_vocab: int  # the shared vocabulary the ids index

    def vocab(self, student_width: int) -> int:
        return self.shared_vocab

    def on_logits(self, logits, labels, vocab: int, kw: dict):
        return topk_distillation_loss(logits, self.targets, labels, vocab_size=vocab, **kw)

    def on_hidden(self, hidden, weight, labels, vocab: int, kw: dict, compute_dtype):
        return chunked_topk_distillation_loss(
            hidden, weight, self.targets, labels, vocab_size=vocab, compute_dtype=compute_dtype, **kw
        )

    def output_layers(self, student_hidden: int, vocab: int) -> tuple[tuple, int]:
        return ("top-k", student_hidden, vocab, self.targets.ids.shape[-1]), 0

    def top1(self, vocab: int) -> torch.Tensor:
        return self.targets.ids[..., 0]

    def tensors(self) -> list[torch.Tensor]:
        # A tail may be -inf (k = vocabulary), never NaN; positions without a target hold zeros.
        return [self.targets.logprobs, self.targets.tail.nan_to_num(neginf=0.0)]


def no_teacher(labels: torch.Tensor, student_logits: torch.Tensor | None, vocab: int) -> Logits | TopK:
    """Targets on which the KD term is exactly 0, for training at alpha 0 (no teacher runs): the
    student's own distribution, or with the chunked loss top-k targets with k = 0 (the whole
    vocabulary one bucket, on which no two distributions differ)."""
    if student_logits is not None:
        return Logits(student_logits.detach())
    none = labels.new_zeros(*labels.shape, 0)
    return TopK(TopKTargets(none.float(), none, torch.zeros(labels.shape, device=labels.device)), vocab)


# --- sources ---------------------------------------------------------------------------------------


class ModelTeacher:
    """The teacher model in this process: frozen, placed next to the student (distill.placement)."""

    source = "model"

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def attach(self, trainer) -> None:
        """Freeze and place the teacher as the student is placed (replicated or sharded), and say
        what each process holds."""
        self.model = place_teacher(self.model, trainer.model, trainer.accelerator)
        held, full = parameter_bytes(self.model)
        # Shards can differ by a little; the process holding the most is the one that may not fit.
        held = int(trainer.accelerator.gather(torch.tensor([held], device=trainer.args.device)).max())
        if trainer.is_world_process_zero():
            print(describe(self.model, trainer.accelerator, held, full), flush=True)

    @property
    def chunkable(self) -> bool:
        return supports_chunked_loss(self.model)

    @torch.no_grad()
    def targets(self, inputs: dict, chunked: bool, cost=None, layers: list[int] = ()) -> Logits | Hidden:
        """The targets, carrying the outputs of the decoder ``layers`` (captured in the same forward)."""
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask")}
        with (
            cost.teacher_forward(inputs) if cost else contextlib.nullcontext(),
            captured_layers(self.model, list(layers)) as states,
        ):
            if not chunked:
                return Logits(self.model(**model_inputs).logits, states)
            with final_hidden_states(self.model) as captured:
                self.model(**model_inputs, logits_to_keep=1)
        return Hidden(captured["hidden"], output_weight(self.model), states)


class CachedTeacher:
    """Top-k targets that `distill cache-teacher` wrote; the batch carries them."""

    source = "cache"
    chunkable = True

    def __init__(self, cache: TeacherCache):
        self.cache = cache

    def attach(self, trainer) -> None:
        # At alpha 0 training reads no targets (only evaluation does): the build is not this run's bill.
        if trainer.cost and trainer.args.alpha > 0:
            trainer.cost.teacher_cache = self.cache.manifest["teacher_cost"]["train"]

    def targets(self, inputs: dict, chunked: bool, cost=None) -> TopK:
        targets = TopKTargets(inputs["teacher_logprobs"], inputs["teacher_ids"], inputs["teacher_tail"])
        return TopK(targets, self.cache.vocab_size)


class ServedTeacher:
    """Top-k targets from a vLLM server (distill.teacher_server), checked before training."""

    source = "server"
    chunkable = True

    def __init__(self, server: TeacherServer, size: ModelSize):
        self.server, self.size = server, size

    def attach(self, trainer) -> None:
        if trainer.cost:
            trainer.cost.teacher_server = self.server.url

    def targets(self, inputs: dict, chunked: bool, cost=None) -> TopK:
        request = inputs.get("teacher_request")
        waited = time.perf_counter()
        scored = request.result() if request is not None else self.server.score(inputs)
        waited = time.perf_counter() - waited
        if cost:
            cost.teacher_served(scored.flops(self.size), sum(scored.lengths), scored.seconds, waited)
        device = inputs["labels"].device
        return TopK(TopKTargets(*(t.to(device) for t in scored.targets)), self.server.vocab)


def as_source(teacher, cache_path: str | None):
    """The trainer's ``teacher`` argument as a source: a model runs here; None reads the cache at
    ``cache_path``; a source stays as it is."""
    if teacher is None:
        if not cache_path:
            raise ValueError("DistillTrainer needs a teacher model, a source of its targets, or args.teacher_cache")
        return CachedTeacher(TeacherCache(cache_path))
    return ModelTeacher(teacher) if isinstance(teacher, torch.nn.Module) else teacher
