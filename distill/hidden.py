"""Hidden-state distillation: the student's layer outputs pulled towards the teacher's.

For a layer map P = {(i, j)} (student layer i is aligned with teacher layer j), the student's
hidden state h^S_i (the output of its decoder layer i, before the final norm) and the teacher's
h^T_j, both (batch, seq, width), are compared at the target positions t in T, the same positions as
the KD loss (the state at t predicts label t + 1; padding and -100 labels are left out):

    hidden = 1/|P| * sum_{(i, j) in P} 1/N * sum_{t in T} l(W h^S_{i,t}, h^T_{j,t})

    l_mse(a, b)    = mean_d (a_d - b_d)^2
    l_cosine(a, b) = 1 - a.b / (|a| |b|)

N is the step's count of target tokens (``num_items_in_batch``), as in the KD loss, so summing the
micro-batches of a step gives the step's token mean whatever the accumulation. W (teacher width x
student width, no bias) is one learned projection shared by all pairs, there only when the widths
differ. A student cut out of the teacher (`distill prune`) keeps teacher channel ``kept[c]`` as its
channel c in every layer, so W starts as that selection: W[kept[c], c] = 1, and the projected state
is the student's channels put back where the teacher has them. Otherwise W starts orthogonal
(orthonormal columns), which keeps the state's norm.

The trainer captures exactly the layers :attr:`HiddenStateLoss.student_layers` and
:attr:`teacher_layers` name, with forward hooks during the forwards it runs anyway
(:func:`captured_layers`); nothing stores every layer's states.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from distill.errors import UserError
from distill.losses import IGNORE_INDEX

LOSS_TYPES = ("mse", "cosine")


def parse_layer_map(text: str) -> list[tuple[int, int]]:
    """ "0:0,1:5,2:11" -> [(0, 0), (1, 5), (2, 11)]: student layer : teacher layer pairs."""
    pairs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise UserError(
                f"hidden_layer_map {text!r}: {item.strip()!r} is not student_layer:teacher_layer; write it like "
                '"0:0,1:5,2:11" (layer indices from 0)'
            )
        pairs.append((int(parts[0]), int(parts[1])))
    return pairs


def prune_report(folder: str | Path) -> dict | None:
    """The ``prune_report.json`` `distill prune` left in a student folder, or None."""
    path = Path(folder) / "prune_report.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def layer_pairs(layer_map: str | None, student_folder: str | Path, student_layers: int, teacher_layers: int):
    """The checked (student layer, teacher layer) pairs: ``layer_map`` as given, or when None the
    ``layer_map`` of the student folder's prune_report.json (every student layer)."""
    if layer_map is not None:
        pairs, origin = parse_layer_map(layer_map), "hidden_layer_map"
    else:
        report = prune_report(student_folder)
        if report is None:
            raise UserError(
                f"hidden_loss_weight > 0 needs a layer map: {student_folder} holds no prune_report.json (written by "
                '`distill prune`); give hidden_layer_map: "student_layer:teacher_layer,..." in the recipe'
            )
        pairs, origin = list(enumerate(report["layer_map"])), f"{student_folder}/prune_report.json"
    if not pairs:
        raise UserError(f"{origin}: the layer map is empty")
    students = [i for i, _ in pairs]
    if len(set(students)) != len(students):
        raise UserError(f"{origin}: a student layer appears twice in the layer map {pairs}")
    for i, j in pairs:
        if not (0 <= i < student_layers and 0 <= j < teacher_layers):
            raise UserError(
                f"{origin}: the pair {i}:{j} names a layer that does not exist (the student has layers 0.."
                f"{student_layers - 1}, the teacher 0..{teacher_layers - 1})"
            )
    return pairs


def hidden_state_loss(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    labels: torch.Tensor,
    loss_type: str = "mse",
    projection: nn.Module | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """The module docstring's ``hidden`` for states paired by position in ``student`` / ``teacher``,
    each (batch, seq, width); ``labels`` (batch, seq) unshifted, -100 off target."""
    mask = labels[:, 1:].ne(IGNORE_INDEX)
    denom = num_items_in_batch if num_items_in_batch is not None else mask.sum()
    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        # Only target rows are projected and compared; padding never enters the sums.
        s, t = s[:, :-1][mask], t[:, :-1][mask].to(s.dtype)
        if projection is not None:
            s = projection(s)
        if loss_type == "mse":
            per_token = (s.float() - t.float()).pow(2).mean(-1)
        else:
            per_token = 1.0 - nn.functional.cosine_similarity(s.float(), t.float(), dim=-1)
        total = total + per_token.sum()
    # A micro-batch without target tokens still gives a tensor the graph can hold (0, not NaN).
    return total / (len(student) * torch.clamp(torch.as_tensor(denom, device=labels.device), min=1))


class HiddenStateLoss(nn.Module):
    """The hidden-state term of the loss: the layer pairs, the loss type, and the projection W when the
    widths differ (its only parameters; they train with the student but are not part of it)."""

    def __init__(self, pairs, student_width: int, teacher_width: int, loss_type: str = "mse", kept=None):
        super().__init__()
        self.pairs, self.loss_type = list(pairs), loss_type
        self.projection = None
        if student_width != teacher_width:
            self.projection = nn.Linear(student_width, teacher_width, bias=False)
            with torch.no_grad():
                if kept is not None and len(kept) == student_width:
                    self.projection.weight.zero_()
                    self.projection.weight[torch.as_tensor(kept), torch.arange(student_width)] = 1.0
                else:
                    nn.init.orthogonal_(self.projection.weight)

    @property
    def student_layers(self) -> list[int]:
        return [i for i, _ in self.pairs]

    @property
    def teacher_layers(self) -> list[int]:
        return [j for _, j in self.pairs]

    def forward(self, student: list, teacher: list, labels, num_items_in_batch=None) -> torch.Tensor:
        return hidden_state_loss(student, teacher, labels, self.loss_type, self.projection, num_items_in_batch)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (inside a PEFT wrapper too)."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return base.get_decoder().layers


@contextlib.contextmanager
def captured_layers(model: nn.Module, layers: list[int]):
    """Within the block, a forward of ``model`` leaves the outputs of its decoder layers ``layers``, in
    that order, in the yielded list (empty: no hooks at all)."""
    captured: list = [None] * len(layers)
    blocks = decoder_layers(model) if layers else []

    def hook(k):
        def keep(module, args, output):
            captured[k] = output[0] if isinstance(output, tuple) else output

        return keep

    handles = [blocks[i].register_forward_hook(hook(k)) for k, i in enumerate(layers)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
