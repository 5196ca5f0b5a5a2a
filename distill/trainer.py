"""`DistillTrainer`: a `transformers.Trainer` whose loss is alpha * KD + (1 - alpha) * CE.

It adds only what distillation needs: a frozen teacher placed next to the student, the loss from
`distill.losses`, and the metrics that tell whether distillation works (`kd_loss`, `ce_loss`, and
at evaluation top-1 agreement with the teacher). Batching, optimisation, checkpoints, mixed
precision and multi-GPU stay the Trainer's.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from transformers import Trainer

from distill.config import DistillConfig
from distill.cost import CostCallback
from distill.losses import distillation_loss, top1_agreement


class DistillTrainer(Trainer):
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
        self.teacher = self._prepare_teacher(teacher)
        self._train_sums = torch.zeros(2)  # kd, ce since the last log, each already a step mean
        self._eval_sums = torch.zeros(4)  # kd*tokens, ce*tokens, agreeing tokens, tokens
        self._last_logged_step = 0
        self._eval_prefix = "eval"
        if self.args.measure_cost:
            self.add_callback(CostCallback(self.args.peak_tflops, self.args.gpu_hour_price))

    def _prepare_teacher(self, teacher: torch.nn.Module) -> torch.nn.Module:
        teacher.eval()
        teacher.requires_grad_(False)
        return teacher.to(self.args.device)

    @torch.no_grad()
    def teacher_logits(self, inputs: dict) -> torch.Tensor:
        # Evaluation's teacher calls are not training compute.
        with self._measure("teacher", inputs) if self.model.training else contextlib.nullcontext():
            return self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits

    @property
    def cost(self) -> CostCallback | None:
        # Looked up, not kept: restore_callback_states_from_checkpoint replaces the callback object.
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, CostCallback)), None)

    def _measure(self, role: str, inputs: dict):
        cost = self.cost
        return cost.meter.measure(role, inputs) if cost else contextlib.nullcontext()

    def training_step(self, model, inputs, num_items_in_batch=None):
        with self._measure("student", inputs):  # forward + backward; the teacher inside counts apart
            return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        # Without labels the model computes no loss of its own: we would throw it away.
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        teacher_logits = self.teacher_logits(inputs)
        out = distillation_loss(
            outputs.logits,
            teacher_logits,
            labels,
            alpha=self.args.alpha,
            temperature=self.args.temperature,
            loss_type=self.args.loss_type,
            beta=self.args.beta,
            num_items_in_batch=num_items_in_batch,
        )
        loss = out.loss
        if model.training:
            self._train_sums += torch.stack([out.kd, out.ce]).cpu()
        else:
            matches, tokens = top1_agreement(outputs.logits, teacher_logits, labels)
            self._eval_sums += torch.stack([out.kd * tokens, out.ce * tokens, matches, tokens]).float().cpu()
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counted every process's tokens and DDP averages gradients over
            # processes, so undo that average to get the global token mean.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

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
            if self.cost:
                logs.update(self.cost.log_metrics())
            self._train_sums.zero_()
            self._last_logged_step = self.state.global_step
        super().log(logs, start_time)
