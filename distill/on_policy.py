"""On-policy distillation: the student writes the completions, the teacher grades every token of them.

Off-policy KD trains the student on text it would never have written; at generation time its own
mistakes compound. On-policy KD (GKD, Agarwal et al. 2024; MiniLLM) samples completions from the
student and trains it on the teacher's per-token distribution over exactly those tokens. With
``lmbda`` (GKD's lambda) a fraction of the training micro-batches is made this way, the rest are the
dataset's own completions::

    batch from the data   -> prompts (every token before the first target) -> student.generate
    prompt + sampled completion (up to and with its EOS)  -> labels: -100 on the prompt, the sample
    -> the usual loss: teacher forward on the whole sequence, any loss_type, prompt and padding masked

Sampling runs without gradient: the samples are data, as in GKD and TRL's GKDTrainer. Which
micro-batches are on-policy, and every sample, are drawn from generators seeded with
(generation_seed, optimizer step, micro-batch): a resumed run draws what the uninterrupted run drew
(the step is in the checkpoint), and the global RNG that dropout and data shuffling use is untouched.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from distill.data import Collator
from distill.errors import UserError
from distill.losses import IGNORE_INDEX, distillation_loss, shift_for_causal_lm


def step_seed(seed: int, step: int, micro_batch: int, purpose: int) -> int:
    """A 63-bit seed that depends on all four numbers (numpy's SeedSequence mixes them)."""
    return int(np.random.SeedSequence([seed, step, micro_batch, purpose]).generate_state(1, np.uint64)[0] >> 1)


def is_on_policy(lmbda: float, seed: int, step: int, micro_batch: int) -> bool:
    """Whether this micro-batch's completions are the student's: true for a fraction ``lmbda``."""
    if lmbda <= 0.0:
        return False
    if lmbda >= 1.0:
        return True
    return bool(torch.rand((), generator=torch.Generator().manual_seed(step_seed(seed, step, micro_batch, 0))) < lmbda)


def prompts_of(batch: dict) -> list[list[int]]:
    """Each row's prompt: its tokens before the first target (label != -100)."""
    prompts = []
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        targets = labels.ne(IGNORE_INDEX).nonzero()
        first = int(targets[0]) if len(targets) else len(labels)
        if first == 0:
            raise UserError(
                "lmbda > 0 (on-policy distillation) needs prompts to sample from, but a training row is a target "
                "from its first token (`text` data). Use `prompt` + `completion` or chat `messages` data."
            )
        prompts.append(ids[:first].tolist())
    return prompts


@torch.no_grad()
def sample(model, prompts: list[list[int]], *, pad_id: int, eos_id: int | None, max_new_tokens: int,
           temperature: float, top_p: float, seed: int, synced_gpus: bool = False):  # fmt: skip
    """(the student's completions of ``prompts``, decoding steps run): sampled with ``transformers``'
    generate from left-padded prompts, each completion cut after its first EOS. The global RNG is
    left as it was; the same seed gives the same samples."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    training = model.training
    model.eval()  # the student's samples, not its dropout's
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True, temperature=temperature,
                top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
                use_cache=True, synced_gpus=synced_gpus,
            )  # fmt: skip
    finally:
        model.train(training)
    completions = []
    for row in out[:, width:].tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        completions.append(row)
    return completions, out.shape[1] - width


def on_policy_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """A training batch of prompt + completion rows: targets on the completions only."""
    rows = [
        {"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c} for p, c in zip(prompts, completions, strict=True)
    ]
    return Collator(pad_id)(rows)


@torch.no_grad()
def sample_quality(student, teacher, prompts: list[list[int]], *, pad_id: int, eos_id: int | None,
                   max_new_tokens: int, seed: int, temperature: float = 1.0) -> dict:  # fmt: skip
    """How good the student's own completions of ``prompts`` are in the teacher's eyes, per sampled
    token: the reverse KL KL(p_S || p_T) at T = 1 (what on-policy distillation minimises) and the
    teacher's negative log-likelihood of the sampled tokens."""
    completions, _ = sample(student, prompts, pad_id=pad_id, eos_id=eos_id, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=1.0, seed=seed)  # fmt: skip
    device = next(student.parameters()).device
    batch = {k: v.to(device) for k, v in on_policy_batch(prompts, completions, pad_id).items()}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s_logits, t_logits = student(**inputs).logits, teacher(**inputs).logits
    out = distillation_loss(s_logits, t_logits, batch["labels"], alpha=1.0, loss_type="reverse_kl",
                            num_items_in_batch=1)  # fmt: skip
    t_flat, y = shift_for_causal_lm(t_logits.float(), batch["labels"])
    nll = F.cross_entropy(t_flat, y, ignore_index=IGNORE_INDEX, reduction="sum")
    tokens = int(out.num_tokens)
    return {"reverse_kl": out.kd.item() / tokens, "teacher_nll": nll.item() / tokens, "tokens": tokens,
            "mean_length": tokens / len(prompts)}  # fmt: skip
