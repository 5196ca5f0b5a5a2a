"""The teacher: one concept, three sources, three kinds of targets.

A *source* turns a batch into the *targets* the loss reads, and bills what it did:

=================  =============================  ===============================================
source             recipe                          targets
=================  =============================  ===============================================
``ModelTeacher``   ``teacher_model_name_or_path``  ``Logits`` (reference loss), or ``Hidden``: final
                                                   hidden states + output weight (chunked loss:
                                                   the logits are never made); ``CrossTopK`` for a
                                                   teacher with another tokenizer (distill.xtoken)
``CachedTeacher``  ``teacher_cache``               ``TopK`` read from disk, carried by the batch
                                                   (``teacher_cache.TargetsCollator``); ``CrossTopK``
                                                   from a cache in the teacher's token space
``ServedTeacher``  ``teacher_server``              ``TopK`` from a vLLM server, requested when the
                                                   batch is collated, one batch ahead
                                                   (``teacher_server.ServedTargetsCollator``), or
                                                   when asked, for the student's own samples;
                                                   ``CrossTopK`` for a teacher with another tokenizer
=================  =============================  ===============================================

The trainer knows sources and targets only through these methods, never through their types:

- source: ``attach(trainer)`` (placement, what the bill must know), ``chunkable``, and
  ``targets(inputs, chunked, cost)``, for training, evaluation and on-policy samples alike. ``cost``
  (the run's :class:`distill.cost.CostCallback`, None at evaluation) is billed what the source did
  there: the teacher forward, measured; nothing for a cache (the callback bills its share of the
  build); the positions a server scored, computed from the teacher's config, and its wall time.
- several teachers (``teachers:``): a list of sources with weights, each the same as alone, reading
  its own batch keys (``name@i``, distill.data.own_keys) and billed under its own ``role``.
- ``ModelTeacher.targets(..., layers)`` also hands over the outputs of the decoder layers a loss
  term names (``targets.layers``; distill.hidden), captured with hooks in the same forward. The other
  sources have no hidden states: a recipe asking for them is refused (DistillConfig).
- targets: ``vocab(student_width)`` (the ids both sides cover), ``on_logits`` / ``on_hidden`` (the KD
  loss against the student's logits or final hidden states: :mod:`distill.losses` /
  :mod:`distill.chunked`), ``output_layers`` (what the chunked loss computes per target row, for the
  bill), ``top1`` and ``agreement`` (top-1 agreement with the student) and ``tensors`` (to name the
  side that went non-finite).
"""

from __future__ import annotations

import contextlib
import time
from typing import NamedTuple

import torch

from distill.chunked import (
    chunked_distillation_loss,
    chunked_topk_distillation_loss,
    chunked_xtoken_distillation_loss,
    final_hidden_states,
    output_weight,
    supports_chunked_loss,
    top1_rows,
)
from distill.flops import ModelSize
from distill.hidden import captured_layers
from distill.losses import (
    TopKTargets,
    distillation_loss,
    teacher_topk,
    top1_agreement,
    topk_distillation_loss,
    xtoken_distillation_loss,
)
from distill.placement import describe, parameter_bytes, place_teacher
from distill.teacher_cache import TeacherCache
from distill.teacher_server import TeacherServer
from distill.xtoken import VocabMap, aligned_teacher_positions, mapped_agreement

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

    def agreement(self, student_top1, teacher_top1, labels):
        return top1_agreement(student_top1, teacher_top1, labels)

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

    def agreement(self, student_top1, teacher_top1, labels):
        return top1_agreement(student_top1, teacher_top1, labels)

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

    def agreement(self, student_top1, teacher_top1, labels):
        return top1_agreement(student_top1, teacher_top1, labels)

    def tensors(self) -> list[torch.Tensor]:
        # A tail may be -inf (k = vocabulary), never NaN; positions without a target hold zeros.
        return [self.targets.logprobs, self.targets.tail.nan_to_num(neginf=0.0)]


class CrossTopK(NamedTuple):
    """A teacher with another tokenizer: its top-k over its own tokenizer's ids at its own positions,
    compared with the student at aligned positions through the vocabulary map (distill.xtoken, the
    cross-tokenizer losses at the end of distill.losses; the chunked one in distill.chunked). The
    teacher's vocabulary is only ever taken a chunk of rows at a time: no (batch, seq, teacher vocab)
    tensor is made, on either path."""

    targets: TopKTargets  # (batch, teacher seq, k) over the teacher tokenizer's ids; (batch, teacher seq) tail
    alignment: torch.Tensor  # (batch, student seq): the teacher position aligned with each, -1 where none
    vocab_map: VocabMap
    method: str  # projected | uld | hybrid

    def vocab(self, student_width: int) -> int:
        return self.vocab_map.ids.shape[0]  # the student tokenizer's ids: padded logits are no token

    def on_logits(self, logits, labels, vocab: int, kw: dict):
        return xtoken_distillation_loss(
            logits, self.targets, self.alignment, labels, self.vocab_map, method=self.method, **kw
        )

    def on_hidden(self, hidden, weight, labels, vocab: int, kw: dict, compute_dtype):
        return chunked_xtoken_distillation_loss(
            hidden, weight, self.targets, self.alignment, labels, self.vocab_map, method=self.method,
            compute_dtype=compute_dtype, **kw,
        )  # fmt: skip

    def output_layers(self, student_hidden: int, vocab: int) -> tuple[tuple, int]:
        # The teacher's output layer ran in its forward (its top-k): nothing of it is in the loss.
        return ("cross-tokenizer", self.method, student_hidden, vocab, self.targets.ids.shape[-1]), 0

    def top1(self, vocab: int) -> torch.Tensor:
        return self.targets.ids[..., 0]  # the teacher's, on its own positions

    def agreement(self, student_top1, teacher_top1, labels):
        # Per aligned target position, through the map: `distill eval` counts the same (one definition).
        return mapped_agreement(student_top1, teacher_top1, labels, self.alignment, self.vocab_map)

    def tensors(self) -> list[torch.Tensor]:
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
    """The teacher model in this process: frozen, placed next to the student (distill.placement).

    With ``vocab_map`` (a teacher with another tokenizer, distill.xtoken) it runs on the batch's
    ``teacher_input_ids`` and gives ``CrossTopK`` targets: its ``top_k`` most likely ids over its
    tokenizer's ids at every position, at the run's temperature, made a chunk of rows at a time from
    its final hidden states where the model allows it."""

    source = "model"
    role = "teacher"  # its name in the bill; "teacher_i" for the i-th of several

    def __init__(
        self, model: torch.nn.Module, vocab_map: VocabMap | None = None, method: str = "projected", top_k: int = 64
    ):
        self.model = model
        self.vocab_map, self.method, self.top_k = vocab_map, method, top_k
        self.temperature = 1.0  # the run's, set by attach

    def attach(self, trainer) -> None:
        """Freeze and place the teacher as the student is placed (replicated or sharded), and say
        what each process holds."""
        self.model = place_teacher(self.model, trainer.model, trainer.accelerator)
        self.temperature = trainer.args.temperature
        held, full = parameter_bytes(self.model)
        # Shards can differ by a little; the process holding the most is the one that may not fit.
        held = int(trainer.accelerator.gather(torch.tensor([held], device=trainer.args.device)).max())
        if trainer.is_world_process_zero():
            print(describe(self.model, trainer.accelerator, held, full), flush=True)

    @property
    def chunkable(self) -> bool:
        # Cross-tokenizer: the teacher's top-k is made here, from its logits if its head is not plain.
        return self.vocab_map is not None or supports_chunked_loss(self.model)

    @torch.no_grad()
    def targets(self, inputs: dict, chunked: bool, cost=None, layers: list[int] = ()) -> Logits | Hidden | CrossTopK:
        """The targets, carrying the outputs of the decoder ``layers`` (captured in the same forward;
        none across tokenizers, where the teacher's positions are not the student's)."""
        if self.vocab_map is not None:
            return self._cross_targets(inputs, cost)
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask")}
        with (
            cost.teacher_forward(inputs, self.role) if cost else contextlib.nullcontext(),
            captured_layers(self.model, list(layers)) as states,
        ):
            if not chunked:
                return Logits(self.model(**model_inputs).logits, states)
            with final_hidden_states(self.model) as captured:
                self.model(**model_inputs, logits_to_keep=1)
        return Hidden(captured["hidden"], output_weight(self.model), states)

    def _cross_targets(self, inputs: dict, cost) -> CrossTopK:
        """The teacher's top-k at the teacher positions that some student target position is aligned
        with (zeros elsewhere, as a cache's off-target rows): the loss and agreement read no others."""
        ids, alignment, labels = inputs["teacher_input_ids"], inputs["alignment"], inputs["labels"]
        model_inputs = {"input_ids": ids, "attention_mask": inputs.get("teacher_attention_mask")}
        vocab = self.vocab_map.teacher_vocab_size  # the tokenizer's ids: a padded head's rows are no token
        needed = aligned_teacher_positions(alignment, labels, ids.shape[1])
        chunked = supports_chunked_loss(self.model)
        with cost.teacher_forward({**inputs, "input_ids": ids}, self.role) if cost else contextlib.nullcontext():
            if chunked:
                with final_hidden_states(self.model) as captured:
                    self.model(**model_inputs, logits_to_keep=1)
            else:
                rows = teacher_topk(self.model(**model_inputs).logits[needed][:, :vocab], self.top_k, self.temperature)
        if chunked:
            # The output layer runs on the needed rows only, a count the batch's shapes do not tell: billed
            # per row (the forward above is billed per shape), so that the same batches bill the same.
            hidden, weight = captured["hidden"][needed], output_weight(self.model)[:vocab]
            with cost.teacher_rows(len(hidden), weight.shape, self.role) if cost else contextlib.nullcontext():
                rows = topk_rows(hidden, weight, self.top_k, self.temperature)
        k = rows.ids.shape[-1]
        targets = TopKTargets(
            ids.new_zeros(*ids.shape, k, dtype=torch.float32),
            ids.new_zeros(*ids.shape, k),
            ids.new_zeros(ids.shape, dtype=torch.float32),
        )
        for full, part in zip(targets, rows):
            full[needed] = part
        return CrossTopK(targets, alignment, self.vocab_map, self.method)


@torch.no_grad()
def topk_rows(hidden: torch.Tensor, weight: torch.Tensor, k: int, temperature: float, rows: int = 4096) -> TopKTargets:
    """`teacher_topk` of ``hidden @ weight.T`` for (n, hidden) rows, ``rows`` at a time: the (n, vocab)
    logits are never made whole."""
    w = weight.to(hidden.dtype)
    parts = [
        teacher_topk(hidden[i : i + rows] @ w.T, min(k, w.shape[0]), temperature) for i in range(0, len(hidden), rows)
    ]
    if not parts:
        return teacher_topk(hidden.new_zeros(0, w.shape[0]), min(k, w.shape[0]), temperature)
    return TopKTargets(*(torch.cat(p) for p in zip(*parts)))


class CachedTeacher:
    """Top-k targets that `distill cache-teacher` wrote; the batch carries them. With ``vocab_map``
    (a cache in the teacher's token space, for a student with another tokenizer) they are the
    teacher's top-k at its own positions, and the targets are `CrossTopK`, as a live teacher's."""

    source = "cache"
    role = "teacher"
    chunkable = True

    def __init__(self, cache: TeacherCache, vocab_map: VocabMap | None = None, method: str = "projected"):
        self.cache, self.vocab_map, self.method = cache, vocab_map, method

    def attach(self, trainer) -> None:
        # At alpha 0, or at weight 0 among several, training reads no targets (only evaluation does):
        # the build is not this run's bill.
        if trainer.cost and trainer.trains_on(self):
            trainer.cost.teacher_cache_read(self.cache.manifest["teacher_cost"]["train"], self.role)

    def targets(self, inputs: dict, chunked: bool, cost=None) -> TopK | CrossTopK:
        targets = TopKTargets(inputs["teacher_logprobs"], inputs["teacher_ids"], inputs["teacher_tail"])
        if self.vocab_map is not None:
            targets = targets._replace(ids=targets.ids.long())  # stored as int32; as a live teacher's
            return CrossTopK(targets, inputs["alignment"], self.vocab_map, self.method)
        return TopK(targets, self.cache.vocab_size)


class ServedTeacher:
    """Top-k targets from a vLLM server (distill.teacher_server), checked before training. With
    ``vocab_map`` (a teacher with another tokenizer, distill.xtoken) the server scores the batch's
    ``teacher_input_ids`` and the targets are ``CrossTopK``, as a live teacher's."""

    source = "server"
    role = "teacher"
    chunkable = True

    def __init__(self, server: TeacherServer, size: ModelSize, vocab_map: VocabMap | None = None, method="projected"):
        self.server, self.size = server, size
        self.vocab_map, self.method = vocab_map, method

    def attach(self, trainer) -> None:
        if trainer.cost:
            trainer.cost.teacher_server_used(self.server.url, self.role)

    def targets(self, inputs: dict, chunked: bool, cost=None) -> TopK | CrossTopK:
        request = inputs.get("teacher_request")
        waited = time.perf_counter()
        scored = request.result() if request is not None else self.server.score(inputs)
        waited = time.perf_counter() - waited
        if cost:  # the positions the server ran: the teacher's tokens
            cost.teacher_served(scored.flops(self.size), sum(scored.lengths), scored.seconds, waited, self.role)
        device = inputs["labels"].device
        targets = TopKTargets(*(t.to(device) for t in scored.targets))
        if self.vocab_map is not None:
            return CrossTopK(targets, inputs["alignment"], self.vocab_map, self.method)
        return TopK(targets, self.server.vocab)


def as_source(teacher, cache_path: str | None):
    """The trainer's ``teacher`` argument as a source: a model runs here; None reads the cache at
    ``cache_path``; a source stays as it is."""
    if teacher is None:
        if not cache_path:
            raise ValueError("DistillTrainer needs a teacher model, a source of its targets, or args.teacher_cache")
        return CachedTeacher(TeacherCache(cache_path))
    return ModelTeacher(teacher) if isinstance(teacher, torch.nn.Module) else teacher
