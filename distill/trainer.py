"""`DistillTrainer`: a `transformers.Trainer` whose loss is alpha * KD + (1 - alpha) * CE.

It adds only what distillation needs: a frozen teacher placed next to the student, the loss from
`distill.losses`, optionally a hidden-state term (`distill.hidden`, + hidden_loss_weight * hidden),
and the metrics that tell whether distillation works (`kd_loss`, `ce_loss`, `hidden_loss`, and at
evaluation top-1 agreement with the teacher). Batching, optimisation, checkpoints, mixed
precision and multi-GPU stay the Trainer's. Its base, `MeteredTrainer`, measures the training
compute (distill.cost); `distill finetune` trains with that base alone.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from distill.chunked import final_hidden_states, output_weight, supports_chunked_loss, top1_rows
from distill.config import DistillConfig
from distill.cost import CostCallback
from distill.data import keyed, own_keys
from distill.errors import NonFiniteError, ServerError, UserError
from distill.hidden import HiddenStateLoss, captured_layers, layer_pairs, prune_report
from distill.losses import IGNORE_INDEX, DistillationLoss
from distill.on_policy import StudentServer, is_on_policy, on_policy_batch, prompts_of, sample, step_seed, stop_ids
from distill.placement import sharding
from distill.teacher import as_source, no_teacher
from distill.xtoken import unaligned_targets

HIDDEN_LOSS_FILE = "hidden_loss.safetensors"  # the hidden-state term's projection, in each checkpoint


class MeteredTrainer(Trainer):
    """A `transformers.Trainer` that measures its training compute when `args.measure_cost` is set
    (see distill.cost), and stops at the first step whose loss or gradients are not finite.

    The cost: the student's forward + backward of every training step, counted by the CostCallback,
    added to each training log and written to cost_report.json at the end. `distill finetune` trains
    with it as is; DistillTrainer adds the teacher."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.measure_cost:
            # A student cut out of a teacher by `distill prune` costs that pass too: its bill joins this one.
            report = prune_report(student_folder(self.model))
            prune = report["cost"] if report else None
            self.add_callback(CostCallback(self.args.peak_tflops, self.args.gpu_hour_price, prune=prune))

    @property
    def cost(self) -> CostCallback | None:
        # Looked up, not kept: restore_callback_states_from_checkpoint replaces the callback object.
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, CostCallback)), None)

    def training_step(self, model, inputs, num_items_in_batch=None):
        with self.cost.student_step(inputs) if self.cost else contextlib.nullcontext():
            loss = super().training_step(model, inputs, num_items_in_batch)
        if not bool(torch.isfinite(loss)):
            raise NonFiniteError(
                f"step {self.state.global_step + 1}: the training loss is {loss.item()}. Check the data and the "
                "model's weights, lower learning_rate, or resume from an earlier checkpoint"
            )
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # The Trainer computes the global gradient norm (clipped or not) before every optimizer step:
        # the one place to stop before a non-finite gradient reaches the weights. Under fp16 a
        # non-finite gradient is the loss scaler's business: it skips the step and lowers its scale.
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if grad_norm is not None and not self.args.fp16 and not math.isfinite(float(grad_norm)):
            raise NonFiniteError(
                f"step {self.state.global_step + 1}: the gradients are not finite (norm {float(grad_norm)}) although "
                "the loss is; lower learning_rate, keep max_grad_norm > 0, or resume from an earlier checkpoint"
            )
        return grad_norm

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.cost:
            logs.update(self.cost.log_metrics())
        super().log(logs, start_time)


class ZeroGradAfterStep(TrainerCallback):
    """Clears the gradients of a module that trains outside the student (the Trainer clears only the
    student's after each optimizer step; kept, they would add up over steps)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.module.zero_grad(set_to_none=True)


def student_folder(model) -> str:
    """The folder (or hub id) the student was loaded from."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return getattr(base.config, "_name_or_path", "") or ""


def reads_targets(args, weight: float) -> bool:
    """Whether training reads the targets of a teacher of ``weight``: not at weight 0 (evaluation still
    does, for its agreement and KL), nor at alpha 0 without a hidden-state term."""
    return weight > 0 and (args.alpha > 0 or args.hidden_loss_weight > 0)


class DistillTrainer(MeteredTrainer):
    # compute_loss divides by the step's token count (num_items_in_batch) itself, so the Trainer must
    # not divide by the accumulation steps again.
    loss_is_scaled_for_ga = True

    def __init__(self, model, teacher, args: DistillConfig, student_server: StudentServer | None = None, **kwargs):
        """``teacher``: the teacher model, or a source of its targets (distill.teacher), or None for
        the cache ``args.teacher_cache`` names; or a list of models / sources, several teachers weighted by
        ``args.teacher_weights`` (equal when unset), each reading its own batch keys (``name@i``).
        ``student_server``: with ``args.use_vllm``, the vLLM server that samples the student's completions."""
        # Trainer and accelerate set private fields on the args they get; the user's object stays theirs.
        super().__init__(model=model, args=copy.deepcopy(args), **kwargs)
        # Make the Trainer count real target tokens over the whole step (all micro-batches and, with
        # average_tokens_across_devices, all processes) and hand the count to compute_loss. Our loss
        # shifts labels like a causal LM, so count labels[:, 1:].
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._several = isinstance(teacher, (list, tuple))
        sources = (
            [as_source(t, None) for t in teacher] if self._several else [as_source(teacher, self.args.teacher_cache)]
        )
        weights = self.args.teacher_weights if self._several and self.args.teacher_weights else [1.0] * len(sources)
        if len(weights) != len(sources):
            raise ValueError(f"args.teacher_weights has {len(weights)} weights for {len(sources)} teachers")
        self._weights = [w / sum(weights) for w in weights]
        if self._several:
            names = self.args.teachers if len(self.args.teachers or ()) == len(sources) else None
            for i, source in enumerate(sources):
                source.role = f"teacher_{i}"
            if self.cost:
                self.cost.teachers = {
                    s.role: {"name": names[i] if names else s.role, "weight": w, "cache": None}
                    for i, (s, w) in enumerate(zip(sources, self._weights))
                }
        self.teachers = sources
        for source in sources:
            source.attach(self)
        self.teacher = sources[0]  # the teacher, when there is one
        # The chunked loss reads the output layers' weights whole, outside their forward; the
        # sharding engines only gather them inside it.
        self._chunked = (
            self.args.chunked_loss
            and sharding(self.accelerator) is None
            and supports_chunked_loss(self.model)
            and all(source.chunkable for source in sources)
        )
        # Inside the Trainer autocast covers only the model's forward, not compute_loss: the chunked
        # loss is told the run's mixed-precision dtype for its output-layer matmuls.
        self._compute_dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        self.hidden_loss = self._hidden_loss() if self.args.hidden_loss_weight > 0 else None
        if self.hidden_loss is not None:
            self.add_callback(ZeroGradAfterStep(self.hidden_loss))
        self._train_sums = torch.zeros(3)  # kd, ce, hidden since the last log, each already a step mean
        # per teacher: target tokens with no position of that teacher (another tokenizer), target tokens
        self._unaligned_sums = torch.zeros(len(sources), 2)
        # kd*tokens, ce*tokens, hidden*tokens, agreeing tokens, tokens agreement is over, target tokens
        self._eval_sums = torch.zeros(6)
        # several teachers, each: kd*tokens, agreeing tokens, tokens (weighted into _eval_sums as well)
        self._teacher_sums = torch.zeros(len(sources), 3)
        self._last_logged_step = None  # the global step before the first micro-batch since the last log
        # on-policy micro-batches, micro-batches, sampled sequences, sampled tokens, teacher-scored reverse
        # KL summed over the sampled tokens; since the last log
        self._policy_sums = torch.zeros(5)
        self._eval_prefix = "eval"
        if self.args.use_vllm:
            if student_server is None:
                raise ValueError("args.use_vllm needs the student_server that samples the completions")
            if sharding(self.accelerator) is not None:
                raise UserError(
                    "use_vllm writes the whole student for the server from this process, which a sharded student "
                    "(FSDP, ZeRO-3) cannot do here; sample with transformers' generate (use_vllm: false)"
                )
        self.student_server = student_server
        self._pushed_step = None  # the optimizer step whose weights the server holds

    def _hidden_loss(self) -> HiddenStateLoss:
        """The hidden-state term (distill.hidden), its layer map checked against both models."""
        if not hasattr(self.teacher, "model"):
            raise UserError(
                f"hidden_loss_weight > 0 needs the teacher's hidden states, and a {self.teacher.source} teacher gives "
                "only its targets: give the teacher model, or set hidden_loss_weight: 0"
            )
        folder = student_folder(self.model)
        student, teacher = self.model.config, self.teacher.model.config
        pairs = layer_pairs(self.args.hidden_layer_map, folder, student.num_hidden_layers, teacher.num_hidden_layers)
        report = prune_report(folder)
        kept = report["kept"]["hidden_size"] if report else None
        if student.hidden_size != teacher.hidden_size and sharding(self.accelerator) is not None:
            # The projection trains outside the sharded student, which these engines do not provide for.
            raise UserError(
                "hidden_loss_weight > 0 with a student narrower than its teacher trains a projection beside the "
                "student, which is not implemented under FSDP or ZeRO-3 yet; train with DDP or one process"
            )
        term = HiddenStateLoss(pairs, student.hidden_size, teacher.hidden_size, self.args.hidden_loss_type, kept)
        return term.to(self.args.device)

    def create_optimizer(self, model=None):
        # The projection trains with the student, in the same optimizer (so its state is checkpointed
        # with the student's), but it is not a part of the student: it is never saved with it.
        optimizer = super().create_optimizer(model)
        if self.hidden_loss is not None and self.hidden_loss.projection is not None:
            optimizer.add_param_group({"params": list(self.hidden_loss.parameters()), "weight_decay": 0.0})
        return optimizer

    def _get_grad_norm(self, model, grad_norm=None):
        # The one call between the step's last backward and the optimizer step. DDP averages the
        # student's gradients over processes; the projection is outside it, so it is averaged here.
        if self.hidden_loss is not None and self.accelerator.num_processes > 1:
            for p in self.hidden_loss.parameters():
                if p.grad is not None:  # gloo has no AVG
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.accelerator.num_processes
        return super()._get_grad_norm(model, grad_norm)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.hidden_loss is not None and self.args.should_save:
            save_file(self.hidden_loss.state_dict(), os.path.join(output_dir, HIDDEN_LOSS_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.hidden_loss is None:
            return
        path = os.path.join(checkpoint, HIDDEN_LOSS_FILE)
        if not os.path.isfile(path):
            raise UserError(
                f"checkpoint {checkpoint} holds no {HIDDEN_LOSS_FILE}: it was saved by a run without "
                "hidden_loss_weight, so the projection it trained is not there; resume with the recipe it ran"
            )
        self.hidden_loss.load_state_dict(load_file(path, device=str(self.args.device)))

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches, a fraction ``lmbda`` of them with completions the student samples
        (distill.on_policy). The Trainer counts the step's target tokens here, for the loss's
        denominator: the count is taken again over the sampled completions."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.args.lmbda == 0:
            return batches, num_items
        seed = self.args.seed if self.args.generation_seed is None else self.args.generation_seed
        step, process = self.state.global_step, self.accelerator.process_index
        for i, batch in enumerate(batches):
            self._policy_sums[1] += 1
            # Which micro-batches are on-policy is the same on every process (sharded sampling runs in
            # step); what each process samples is its own.
            if is_on_policy(self.args.lmbda, seed, step, i):
                self._policy_sums[0] += 1
                sampled = self._sample(batch, step_seed(seed, step, i, 1, process))
                batches[i] = {**sampled, "on_policy": torch.tensor(True)}
        return batches, self._get_num_items_in_batch(batches, device)

    def _sample(self, batch: dict, seed: int) -> dict:
        """``batch`` with its completions replaced by the student's samples (no gradient)."""
        prompts = prompts_of(batch)
        tokenizer = self.processing_class
        student = self.accelerator.unwrap_model(self.model)
        kw = {
            "pad_id": tokenizer.pad_token_id, "eos_ids": stop_ids(student, tokenizer), "seed": seed,
            "max_new_tokens": self.args.max_new_tokens, "temperature": self.args.generation_temperature,
            "top_p": self.args.top_p,
            # Under FSDP2 / ZeRO-3 every process must run as many forwards as the longest sampler.
            "synced_gpus": sharding(self.accelerator) is not None and self.accelerator.num_processes > 1,
        }  # fmt: skip
        if self.args.use_vllm:
            completions = self._sample_on_server(student, prompts, kw)
        else:
            with self.cost.sampling(student) if self.cost else contextlib.nullcontext():
                completions = sample(student, prompts, **kw)
        return on_policy_batch(prompts, completions, tokenizer.pad_token_id)

    def _sample_on_server(self, student, prompts: list[list[int]], kw: dict) -> list[list[int]]:
        """The samples from the student's vLLM server, after pushing it the current weights if the last
        push is vllm_sync_steps old (one process writes and pushes, the others wait for it)."""
        server, step = self.student_server, self.state.global_step
        try:
            if self._pushed_step is None or step - self._pushed_step >= self.args.vllm_sync_steps:
                if self.accelerator.is_main_process:
                    server.push(student, self._weights_dir())
                self.accelerator.wait_for_everyone()
                self._pushed_step = step
            completions, _, flops = server.sample(
                prompts, eos_ids=kw["eos_ids"], max_new_tokens=kw["max_new_tokens"], temperature=kw["temperature"],
                top_p=kw["top_p"], seed=kw["seed"] % (1 << 31),
            )  # fmt: skip
        except ServerError as err:
            raise self._server_stopped(err, evaluating=False) from err
        if self.cost:
            self.cost.student_generation_served(flops, server.url)
        return completions

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            # The pushed weights are a copy of the student for the server, not a result of the run.
            if self.args.use_vllm and not self.args.vllm_weights_dir and self.is_world_process_zero():
                shutil.rmtree(self._weights_dir(), ignore_errors=True)

    def _weights_dir(self) -> str:
        return self.args.vllm_weights_dir or os.path.join(self.args.output_dir, "vllm_weights")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training and self.accelerator.num_processes > 1:
            inputs = {**inputs, "labels": self._without_padded_rows(inputs["labels"])}
        out, kds, outputs, agreement, student, parts, hidden = self._distill(model, inputs, num_items_in_batch)
        loss = out.loss + self.args.hidden_loss_weight * hidden if self.hidden_loss is not None else out.loss
        if not bool(torch.isfinite(loss)):
            teachers = [t for _, _, targets in parts for t in targets.tensors()]
            raise self._non_finite(loss, {"teacher": teachers, "student": [student[0]]}, model.training)
        if "on_policy" in inputs:
            denom = num_items_in_batch if num_items_in_batch is not None else out.num_tokens
            reverse_kl = self._sampled_reverse_kl(student, parts, inputs["labels"], out, denom)
            self._policy_sums[2:] += torch.stack(
                [torch.tensor(float(len(inputs["labels"]))), out.num_tokens.float().cpu(), reverse_kl.float().cpu()]
            )
        hidden = hidden.detach().float()
        if model.training:
            if self._last_logged_step is None:
                self._last_logged_step = self.state.global_step
            self._train_sums += torch.stack([out.kd.float(), out.ce.float(), hidden]).cpu()
            for i in range(len(self.teachers)):
                alignment = inputs.get(keyed("alignment", i if self._several else None))
                if alignment is not None:  # a teacher with another tokenizer (distill.xtoken)
                    self._unaligned_sums[i] += torch.tensor(
                        [unaligned_targets(alignment, inputs["labels"]), int(out.num_tokens)], dtype=torch.float
                    )
        else:
            # Agreement with several teachers: each teacher's, weighted (their aligned positions may differ).
            tokens = out.num_tokens
            matches = sum(w * m for (w, _, _), (m, _) in zip(parts, agreement))
            aligned = sum(w * n for (w, _, _), (_, n) in zip(parts, agreement))
            self._eval_sums += (
                torch.stack([out.kd * tokens, out.ce * tokens, hidden * tokens, matches, aligned, tokens]).float().cpu()
            )
            if self._several:
                for i, ((m, n), kd) in enumerate(zip(agreement, kds)):
                    self._teacher_sums[i] += torch.stack([kd * tokens, m, n]).float().cpu()
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counted every process's tokens and DDP averages gradients over
            # processes, so undo that average to get the global token mean.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _distill(self, model, inputs, num_items_in_batch):
        """(DistillationLoss, each teacher's KD term, student outputs, each teacher's (matches, tokens) at
        evaluation else None, the student's side (logits,) or (hidden, weight), the teachers' targets as
        (weight, bill role, targets), the hidden-state term (0 when off)).

        One path whatever the teachers' sources: the student's side, each source's targets
        (distill.teacher) on its own view of the batch, the loss on the two (`_loss`), weighted over the
        teachers. A hidden-state term names the layers it reads on each side; their outputs are captured
        in these same forwards.
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
        term = self.hidden_loss
        unwrapped = self.accelerator.unwrap_model(model)
        with captured_layers(unwrapped, term.student_layers if term else []) as student_states:
            if self._chunked:
                with final_hidden_states(unwrapped) as captured:
                    outputs = model(**model_inputs, logits_to_keep=1)
                student = (captured["hidden"], output_weight(unwrapped))
            else:
                outputs = model(**model_inputs)
                student = (outputs.logits,)
        if not evaluating and self.args.alpha == 0.0 and term is None:
            # Plain supervised training: the teacher neither runs nor is billed in training, and the KD
            # term is exactly 0 (not logged). Evaluation still asks the teacher, for agreement and the KL.
            parts = [
                (1.0, "teacher", no_teacher(labels, None if self._chunked else outputs.logits, self._width(student)))
            ]
        else:
            parts = []
            cost = None if evaluating else self.cost
            for i, (weight, source) in enumerate(zip(self._weights, self.teachers)):
                if not evaluating and not reads_targets(self.args, weight):
                    continue  # weight 0: a term of the loss times 0, not worth its forward
                view = own_keys(inputs, i if self._several else None)
                try:
                    if term is None:
                        targets = source.targets(view, self._chunked, cost)
                    else:
                        targets = source.targets(view, self._chunked, cost, layers=term.teacher_layers)
                except ServerError as err:
                    raise self._server_stopped(err, evaluating) from err
                parts.append((weight, source.role, targets))
        out, kds = self._mixed_loss(student, parts, labels, kw, bill=not evaluating)
        hidden = term(student_states, parts[0][2].layers, labels, num_items_in_batch) if term else out.kd.new_zeros(())
        agreement = [t.agreement(*self._top1(student, t), labels) for _, _, t in parts] if evaluating else None
        return out, kds, outputs, agreement, student, parts, hidden

    def trains_on(self, source) -> bool:
        """Whether training reads ``source``'s targets (`reads_targets`)."""
        return reads_targets(self.args, self._weights[self.teachers.index(source)])

    def _mixed_loss(self, student: tuple, parts: list, labels, kw: dict, bill: bool, tag: str = ""):
        """(the loss against every teacher, weighted: sum_i w_i (alpha KD_i + (1 - alpha) CE), which with
        weights summing to 1 is alpha sum_i w_i KD_i + (1 - alpha) CE; each teacher's KD term)."""
        outs = [self._loss(student, targets, labels, kw, bill, tag, role) for _, role, targets in parts]
        if len(outs) == 1:
            return outs[0], [outs[0].kd]
        weights = [w for w, _, _ in parts]
        loss = sum(w * o.loss for w, o in zip(weights, outs))
        kd = sum(w * o.kd for w, o in zip(weights, outs))
        return DistillationLoss(loss, kd, outs[0].ce, outs[0].num_tokens), [o.kd for o in outs]

    def _loss(self, student: tuple, targets, labels, kw: dict, bill: bool, tag: str = "", role: str = "teacher"):
        """The KD loss of the student's side, (logits,) or with the chunked loss (hidden, weight), on
        the teacher's targets (distill.teacher), billing the chunked loss's output layers (the teacher's
        part to ``role``)."""
        vocab = targets.vocab(self._width(student))
        if not self._chunked:
            return targets.on_logits(student[0], labels, vocab, kw)
        hidden, weight = student
        key, teacher_per_row = targets.output_layers(hidden.shape[-1], vocab)
        rows = int(labels[:, 1:].ne(IGNORE_INDEX).sum())
        with (
            self.cost.output_layers(rows, (tag, *key), teacher_per_row, role)
            if self.cost and bill
            else contextlib.nullcontext()
        ):
            return targets.on_hidden(hidden, weight, labels, vocab, kw, self._compute_dtype)

    def _width(self, student: tuple) -> int:
        """The student's vocabulary: its logits' width."""
        return student[-1].shape[0] if self._chunked else student[0].shape[-1]

    def _top1(self, student: tuple, targets) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher) top-1 ids over the shared vocabulary, for agreement."""
        vocab = targets.vocab(self._width(student))
        mine = top1_rows(*student, vocab) if self._chunked else student[0][..., :vocab].argmax(-1)
        return mine, targets.top1(vocab)

    @torch.no_grad()
    def _sampled_reverse_kl(self, student: tuple, parts: list, labels, out, denom) -> torch.Tensor:
        """Sum over an on-policy batch's sampled tokens of KL(p_S || p_T) at T = 1: how far the student's
        own samples are from what the teacher would write. The loss's KD term when it is exactly that;
        else computed again from what the loss used, without gradient (and billed)."""
        if self.args.loss_type == "reverse_kl" and self.args.temperature == 1.0:
            return out.kd * denom
        kw = {"alpha": 1.0, "temperature": 1.0, "loss_type": "reverse_kl", "num_items_in_batch": 1}
        return self._mixed_loss(student, parts, labels, kw, bill=True, tag="reverse kl")[0].kd

    def _server_stopped(self, err: ServerError, evaluating: bool) -> ServerError:
        where = f"evaluation at step {self.state.global_step}" if evaluating else f"step {self.state.global_step + 1}"
        last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        resume = (
            f"restart the server and resume from the last checkpoint with --resume_from_checkpoint {last}"
            if last
            else "no checkpoint was saved yet: restart the server and train again"
        )
        return ServerError(f"{where}: {err}; {resume}")

    def _without_padded_rows(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` with -100 on the rows accelerate added to even out the last evaluation batches.

        So that every process runs the same number of batches, accelerate pads the last ones with
        copies of earlier rows, and its gather_for_metrics drops them again. The evaluation sums here
        are kept by hand, so they ask gather_for_metrics which of this process's rows it keeps.
        """
        rows = labels.shape[0]
        ids = torch.arange(rows, device=labels.device) + self.accelerator.process_index * (1 << 32)
        kept = self.accelerator.gather_for_metrics(ids)
        if len(kept) == rows * self.accelerator.num_processes:
            return labels
        return labels.masked_fill(~torch.isin(ids, kept)[:, None], IGNORE_INDEX)

    def _non_finite(self, loss, sides: dict, training: bool) -> NonFiniteError:
        """Which side made the loss non-finite: the first of teacher, student whose output is not."""
        where = f"step {self.state.global_step + 1}" if training else f"evaluation at step {self.state.global_step}"
        advice = {
            "teacher": "check the teacher's weights, and teacher_dtype (float16 overflows in some models: use "
            "bfloat16 or float32)",
            "student": "the student diverged or holds NaN weights: lower learning_rate, keep max_grad_norm > 0, or "
            "resume from an earlier checkpoint",
        }
        for side, tensors in sides.items():
            if not all(bool(torch.isfinite(t).all()) for t in tensors):
                return NonFiniteError(f"{where}: the {side}'s logits are not finite (NaN or inf); {advice[side]}")
        return NonFiniteError(
            f"{where}: the loss is {loss.item()} although both sides' logits are finite; check temperature, "
            "loss_type and the labels"
        )

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
        if "loss" in logs and self.args.lmbda > 0:
            on, total, sequences, tokens, reverse_kl = self._reduce(self._policy_sums).tolist()
            self._policy_sums.zero_()
            logs["on_policy_share"] = on / max(total, 1)
            if sequences:
                logs["sampled_length"] = tokens / sequences
                logs["sampled_reverse_kl"] = reverse_kl / max(tokens, 1)
        prefix = self._eval_prefix
        if f"{prefix}_runtime" in logs:
            # Every process reduces, also one whose rows were all padding copies (it holds zeros).
            kd, ce, hidden, agree, aligned, tokens = self._reduce(self._eval_sums).tolist()
            self._eval_sums.zero_()
            if self._several:
                for i, (kd_i, agree_i, aligned_i) in enumerate(self._reduce(self._teacher_sums).tolist()):
                    if tokens > 0:
                        logs[f"{prefix}_kd_loss_teacher_{i}"] = kd_i / tokens
                    if aligned_i > 0:
                        logs[f"{prefix}_agreement_teacher_{i}"] = agree_i / aligned_i
                self._teacher_sums.zero_()
            if tokens > 0:
                logs[f"{prefix}_kd_loss"] = kd / tokens
                logs[f"{prefix}_ce_loss"] = ce / tokens
                if self.hidden_loss is not None:
                    logs[f"{prefix}_hidden_loss"] = hidden / tokens
                if aligned > 0:
                    logs[f"{prefix}_agreement"] = agree / aligned
                # The Trainer's eval_loss is a mean of batch means over padded batches; this is the
                # training loss's own definition, over every held-out target token once.
                a, w = self.args.alpha, self.args.hidden_loss_weight
                logs[f"{prefix}_loss"] = (a * kd + (1.0 - a) * ce + w * hidden) / tokens
        elif "loss" in logs and self._last_logged_step is not None and self.state.global_step > self._last_logged_step:
            kd, ce, hidden = self._reduce(self._train_sums).tolist()
            # Each micro-batch term is already divided by the step's global token count; summed over
            # processes that is the global mean, unless tokens were not averaged across devices.
            per = (self.state.global_step - self._last_logged_step) * (
                1 if self.args.average_tokens_across_devices else self.accelerator.num_processes
            )
            if self.args.alpha > 0:  # at alpha 0 no teacher ran in training: there is no kd_loss
                logs["kd_loss"] = kd / per
            for i, (unaligned, tokens) in enumerate(self._reduce(self._unaligned_sums).tolist()):
                # The share of target tokens with no position of this teacher: trained on the labels (and
                # the other teachers) only, never hidden.
                if tokens:
                    logs["unaligned_share" + (f"_teacher_{i}" if self._several else "")] = unaligned / tokens
            self._unaligned_sums.zero_()
            logs["ce_loss"] = ce / per
            if self.hidden_loss is not None:
                logs["hidden_loss"] = hidden / per
            self._train_sums.zero_()
            self._last_logged_step = None
        super().log(logs, start_time)
