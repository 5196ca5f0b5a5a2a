"""`DistillTrainer`: a `transformers.Trainer` whose loss is alpha * KD + (1 - alpha) * CE.

It adds only what distillation needs: a frozen teacher placed next to the student, the loss from
`distill.losses`, and the metrics that tell whether distillation works (`kd_loss`, `ce_loss`, and
at evaluation top-1 agreement with the teacher). Batching, optimisation, checkpoints, mixed
precision and multi-GPU stay the Trainer's. Its base, `MeteredTrainer`, measures the training
compute (distill.cost); `distill finetune` trains with that base alone.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from transformers import Trainer

from distill.chunked import (
    chunked_distillation_loss,
    chunked_top1_agreement,
    chunked_topk_distillation_loss,
    final_hidden_states,
    output_weight,
    supports_chunked_loss,
)
from distill.config import DistillConfig
from distill.cost import CostCallback
from distill.losses import (
    IGNORE_INDEX,
    TopKTargets,
    distillation_loss,
    top1_agreement,
    topk_distillation_loss,
    topk_top1_agreement,
)
from distill.placement import describe, parameter_bytes, place_teacher, sharding


class MeteredTrainer(Trainer):
    """A `transformers.Trainer` that measures its training compute when `args.measure_cost` is set
    (see distill.cost): the student's forward + backward of every training step, counted by the
    CostCallback's FlopMeter, added to each training log and written to cost_report.json at the end.
    `distill finetune` trains with it as is; DistillTrainer adds the teacher."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.measure_cost:
            self.add_callback(CostCallback(self.args.peak_tflops, self.args.gpu_hour_price))

    @property
    def cost(self) -> CostCallback | None:
        # Looked up, not kept: restore_callback_states_from_checkpoint replaces the callback object.
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, CostCallback)), None)

    def _measure(self, role: str, inputs: dict, *extra):
        cost = self.cost
        return cost.meter.measure(role, inputs, *extra) if cost else contextlib.nullcontext()

    def _flops_key(self, inputs: dict) -> tuple:
        """What the student's FLOPs depend on besides the input shapes (FlopMeter.measure's extra)."""
        return ()

    def training_step(self, model, inputs, num_items_in_batch=None):
        extra = self._flops_key(inputs) if self.cost else ()
        with self._measure("student", inputs, *extra):  # forward + backward; a teacher inside counts apart
            return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.cost:
            logs.update(self.cost.log_metrics())
        super().log(logs, start_time)


class DistillTrainer(MeteredTrainer):
    # compute_loss divides by the step's token count (num_items_in_batch) itself, so the Trainer must
    # not divide by the accumulation steps again.
    loss_is_scaled_for_ga = True

    def __init__(self, model, teacher, args: DistillConfig, **kwargs):
        # Trainer and accelerate set private fields on the args they get; the user's object stays theirs.
        super().__init__(model=model, args=copy.deepcopy(args), **kwargs)
        # Make the Trainer count real target tokens over the whole step (all micro-batches and, with
        # average_tokens_across_devices, all processes) and hand the count to compute_loss. Our loss
        # shifts labels like a causal LM, so count labels[:, 1:].
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        # teacher=None: the teacher's top-k targets come with each batch, from args.teacher_cache.
        self.teacher = self._prepare_teacher(teacher) if teacher is not None else None
        self._targets_vocab = None
        if self.teacher is None:
            if not self.args.teacher_cache:
                raise ValueError("DistillTrainer needs a teacher model, or args.teacher_cache with its top-k targets")
            from distill.teacher_cache import TeacherCache

            self._targets_vocab = TeacherCache(self.args.teacher_cache).vocab_size
        # The chunked loss reads the output layers' weights whole, outside their forward; the
        # sharding engines only gather them inside it.
        self._chunked = (
            self.args.chunked_loss
            and sharding(self.accelerator) is None
            and supports_chunked_loss(self.model)
            and (self.teacher is None or supports_chunked_loss(self.teacher))
        )
        self._train_sums = torch.zeros(2)  # kd, ce since the last log, each already a step mean
        self._eval_sums = torch.zeros(4)  # kd*tokens, ce*tokens, agreeing tokens, tokens
        self._last_logged_step = 0
        self._eval_prefix = "eval"

    def _prepare_teacher(self, teacher: torch.nn.Module) -> torch.nn.Module:
        teacher = place_teacher(teacher, self.model, self.accelerator)
        held, full = parameter_bytes(teacher)
        # Shards can differ by a little; the process holding the most is the one that may not fit.
        held = int(self.accelerator.gather(torch.tensor([held], device=self.args.device)).max())
        if self.is_world_process_zero():
            print(describe(teacher, self.accelerator, held, full), flush=True)
        return teacher

    @torch.no_grad()
    def teacher_logits(self, inputs: dict) -> torch.Tensor:
        # Evaluation's teacher calls are not training compute.
        with self._measure("teacher", inputs) if self.model.training else contextlib.nullcontext():
            return self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits

    @torch.no_grad()
    def teacher_hidden(self, inputs: dict) -> torch.Tensor:
        """The teacher's final hidden states, for the chunked loss (its logits are never made)."""
        with self._measure("teacher", inputs) if self.model.training else contextlib.nullcontext():
            with final_hidden_states(self.teacher) as captured:
                self.teacher(
                    input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), logits_to_keep=1
                )
            return captured["hidden"]

    def _flops_key(self, inputs: dict) -> tuple:
        # The chunked loss computes the output layers on target rows only: their number sets its FLOPs.
        return (int(inputs["labels"][:, 1:].ne(IGNORE_INDEX).sum()),) if self._chunked else ()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out, outputs, agreement = self._distill(model, inputs, num_items_in_batch)
        loss = out.loss
        if model.training:
            self._train_sums += torch.stack([out.kd, out.ce]).cpu()
        else:
            matches, tokens = agreement
            self._eval_sums += torch.stack([out.kd * tokens, out.ce * tokens, matches, tokens]).float().cpu()
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counted every process's tokens and DDP averages gradients over
            # processes, so undo that average to get the global token mean.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _distill(self, model, inputs, num_items_in_batch):
        """(DistillationLoss, student outputs, (matches, tokens) at evaluation else None).

        Four paths, one loss: teacher model or cached top-k targets, each through the reference
        losses (full logits) or the chunked ones (hidden states; the outputs then hold the logits of
        the last position only).
        """
        labels = inputs["labels"]
        kw = {
            "alpha": self.args.alpha,
            "temperature": self.args.temperature,
            "loss_type": self.args.loss_type,
            "beta": self.args.beta,
            "num_items_in_batch": num_items_in_batch,
        }
        # Without labels the model computes no loss of its own: we would throw it away.
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask")}
        evaluating = not model.training
        targets = None
        if self.teacher is None:
            targets = TopKTargets(inputs["teacher_logprobs"], inputs["teacher_ids"], inputs["teacher_tail"])
        if self._chunked:
            unwrapped = self.accelerator.unwrap_model(model)
            with final_hidden_states(unwrapped) as student:
                outputs = model(**model_inputs, logits_to_keep=1)
            hidden, weight = student["hidden"], output_weight(unwrapped)
            if targets is not None:
                teacher = targets
                out = chunked_topk_distillation_loss(
                    hidden, weight, targets, labels, vocab_size=self._targets_vocab, **kw
                )
            else:
                teacher = (self.teacher_hidden(inputs), output_weight(self.teacher))
                out = chunked_distillation_loss(hidden, weight, *teacher, labels, **kw)
                if not evaluating and self.cost:
                    # The teacher's output layer ran inside the loss, in the student's block: one
                    # (targets x hidden) @ (hidden x shared vocab) matmul that is the teacher's work.
                    vocab = min(weight.shape[0], teacher[1].shape[0])
                    self.cost.meter.move(2 * int(out.num_tokens) * teacher[1].shape[1] * vocab, "student", "teacher")
            if evaluating:
                return out, outputs, chunked_top1_agreement(hidden, weight, teacher, labels, self._targets_vocab)
            return out, outputs, None
        outputs = model(**model_inputs)
        if targets is not None:
            out = topk_distillation_loss(outputs.logits, targets, labels, vocab_size=self._targets_vocab, **kw)
            agreement = (
                topk_top1_agreement(outputs.logits, targets, labels, self._targets_vocab) if evaluating else None
            )
            return out, outputs, agreement
        teacher_logits = self.teacher_logits(inputs)
        out = distillation_loss(outputs.logits, teacher_logits, labels, **kw)
        return out, outputs, top1_agreement(outputs.logits, teacher_logits, labels) if evaluating else None

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        self._eval_prefix = metric_key_prefix
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def _reduce(self, sums: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(sums.to(self.args.device), reduction="sum").cpu()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Called on every process, so the cross-process reductions below line up.
        prefix = self._eval_prefix
        if any(k.startswith(f"{prefix}_") for k in logs) and self._eval_sums[3] > 0:
            kd, ce, agree, tokens = self._reduce(self._eval_sums).tolist()
            logs[f"{prefix}_kd_loss"] = kd / tokens
            logs[f"{prefix}_ce_loss"] = ce / tokens
            logs[f"{prefix}_agreement"] = agree / tokens
            self._eval_sums.zero_()
        elif "loss" in logs and self.state.global_step > self._last_logged_step:
            kd, ce = self._reduce(self._train_sums).tolist()
            # Each micro-batch term is already divided by the step's global token count; summed over
            # processes that is the global mean, unless tokens were not averaged across devices.
            per = (self.state.global_step - self._last_logged_step) * (
                1 if self.args.average_tokens_across_devices else self.accelerator.num_processes
            )
            logs["kd_loss"] = kd / per
            logs["ce_loss"] = ce / per
            self._train_sums.zero_()
            self._last_logged_step = self.state.global_step
        super().log(logs, start_time)
