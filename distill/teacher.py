"""The teacher: one concept, three sources. Each turns a batch into the targets the loss reads.

=================  =============================  ===============================================
source             recipe                          targets
=================  =============================  ===============================================
``ModelTeacher``   ``teacher_model_name_or_path``  the whole distribution: logits (reference loss),
                                                   or final hidden states + output weight (chunked
                                                   loss: the logits are never made)
``CachedTeacher``  ``teacher_cache``               top-k targets read from disk, carried by the
                                                   batch (``teacher_cache.TargetsCollator``)
``ServedTeacher``  ``teacher_server``              top-k targets from a vLLM server, requested when
                                                   the batch is collated, one batch ahead
                                                   (``teacher_server.ServedTargetsCollator``), or
                                                   when asked, for the student's own samples
=================  =============================  ===============================================

``targets(inputs, chunked, cost)`` is all the trainer calls, for training, evaluation and the
student's on-policy samples alike. ``cost`` (the run's :class:`distill.cost.CostCallback`, None at
evaluation) is billed what the source did there: the teacher forward, measured; nothing for a cache
(its share of the build is billed by the callback); the positions a server scored, computed from the
teacher's config, and the server's wall time.
"""

from __future__ import annotations

import contextlib
import time
from typing import NamedTuple

import torch

from distill.chunked import final_hidden_states, output_weight, supports_chunked_loss
from distill.cost import ModelSize
from distill.losses import TopKTargets
from distill.teacher_cache import TeacherCache
from distill.teacher_server import TeacherServer


class TeacherLogits(NamedTuple):
    logits: torch.Tensor  # (batch, seq, teacher vocab)


class TeacherHidden(NamedTuple):
    hidden: torch.Tensor  # (batch, seq, teacher hidden): the output layer's input
    weight: torch.Tensor  # (teacher vocab, teacher hidden): the output layer


class ModelTeacher:
    """The teacher model in this process: frozen, placed next to the student (distill.placement)."""

    source = "model"

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @property
    def chunkable(self) -> bool:
        return supports_chunked_loss(self.model)

    @torch.no_grad()
    def targets(self, inputs: dict, chunked: bool, cost=None) -> TeacherLogits | TeacherHidden:
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask")}
        with cost.teacher_forward(inputs) if cost else contextlib.nullcontext():
            if not chunked:
                return TeacherLogits(self.model(**model_inputs).logits)
            with final_hidden_states(self.model) as captured:
                self.model(**model_inputs, logits_to_keep=1)
        return TeacherHidden(captured["hidden"], output_weight(self.model))


class CachedTeacher:
    """Top-k targets that `distill cache-teacher` wrote; the batch carries them."""

    source = "cache"
    chunkable = True

    def __init__(self, cache: TeacherCache):
        self.cache = cache
        self.vocab = cache.vocab_size  # the shared vocabulary the ids index

    def targets(self, inputs: dict, chunked: bool, cost=None) -> TopKTargets:
        return TopKTargets(inputs["teacher_logprobs"], inputs["teacher_ids"], inputs["teacher_tail"])


class ServedTeacher:
    """Top-k targets from a vLLM server (distill.teacher_server), checked before training."""

    source = "server"
    chunkable = True

    def __init__(self, server: TeacherServer, size: ModelSize):
        self.server, self.size = server, size
        self.vocab = server.vocab

    def targets(self, inputs: dict, chunked: bool, cost=None) -> TopKTargets:
        request = inputs.get("teacher_request")
        waited = time.perf_counter()
        scored = request.result() if request is not None else self.server.score(inputs)
        waited = time.perf_counter() - waited
        if cost:
            cost.teacher_served(scored.flops(self.size), sum(scored.lengths), scored.seconds, waited)
        device = inputs["labels"].device
        return TopKTargets(*(t.to(device) for t in scored.targets))
