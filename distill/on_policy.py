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

With ``use_vllm`` the samples come from a vLLM server serving the student (:class:`StudentServer`):
the student's current weights are pushed to it every ``vllm_sync_steps`` optimizer steps (written
as one safetensors file in a folder the server reads, and loaded in place by every vLLM worker with
its ``reload_weights``, through the ``/collective_rpc`` endpoint of a server started with
VLLM_SERVER_DEV_MODE=1), and each prompt is one request with its own seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distill.data import Collator
from distill.errors import ServerError, UserError
from distill.flops import ModelSize, sampling_flops
from distill.losses import IGNORE_INDEX, distillation_loss, shift_for_causal_lm
from distill.teacher_server import VLLMServer


def step_seed(seed: int, step: int, micro_batch: int, purpose: int, process: int = 0) -> int:
    """A 63-bit seed that depends on all five numbers (numpy's SeedSequence mixes them). ``process``:
    each data-parallel process samples its own rows with its own seed, never its neighbour's."""
    return int(np.random.SeedSequence([seed, step, micro_batch, purpose, process]).generate_state(1, np.uint64)[0] >> 1)


def stop_ids(model, tokenizer) -> list[int]:
    """The ids that end a sample: the tokenizer's EOS and every stop id of the model's generation
    config (instruct models end a turn with another token: ``<|im_end|>``, ``<|eot_id|>``)."""
    config = getattr(model, "generation_config", None)
    found = getattr(config, "eos_token_id", None) if config is not None else None
    found = [found] if isinstance(found, int) else list(found or [])
    if tokenizer.eos_token_id is not None:
        found.insert(0, tokenizer.eos_token_id)
    return list(dict.fromkeys(found))


def cut_at_stop(ids: list[int], stops: list[int]) -> list[int]:
    """``ids`` up to and with the first stop id."""
    for i, token in enumerate(ids):
        if token in stops:
            return ids[: i + 1]
    return ids


def is_on_policy(lmbda: float, seed: int, step: int, micro_batch: int) -> bool:
    """Whether this micro-batch's completions are the student's: true for a fraction ``lmbda``."""
    if lmbda <= 0.0:
        return False
    if lmbda >= 1.0:
        return True
    return bool(torch.rand((), generator=torch.Generator().manual_seed(step_seed(seed, step, micro_batch, 0))) < lmbda)


def prompts_of(batch: dict) -> list[list[int]]:
    """Each row's prompt: its tokens before the first target (label != -100); all its tokens when it
    has no target (`prompt`-only data)."""
    prompts = []
    lengths = (
        batch["attention_mask"].sum(1).tolist()
        if "attention_mask" in batch
        else [len(batch["labels"][0])] * len(batch["labels"])
    )
    for ids, labels, length in zip(batch["input_ids"], batch["labels"], lengths, strict=True):
        targets = labels.ne(IGNORE_INDEX).nonzero()
        first = int(targets[0]) if len(targets) else int(length)
        if first == 0:
            raise UserError(
                "lmbda > 0 (on-policy distillation) needs prompts to sample from, but a training row is a target "
                "from its first token (`text` data). Use `prompt` + `completion` or chat `messages` data."
            )
        prompts.append(ids[:first].tolist())
    return prompts


@torch.no_grad()
def sample(model, prompts: list[list[int]], *, pad_id: int, eos_ids: list[int], max_new_tokens: int,
           temperature: float, top_p: float, seed: int, synced_gpus: bool = False):  # fmt: skip
    """The student's completions of ``prompts``: sampled with ``transformers``'
    generate from left-padded prompts, each completion cut after its first stop id (``eos_ids``).
    The global RNG is left as it was; the same seed gives the same samples."""
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
                top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_ids or None,
                use_cache=True, synced_gpus=synced_gpus,
            )  # fmt: skip
    finally:
        model.train(training)
    return [cut_at_stop(row, eos_ids) for row in out[:, width:].tolist()]


class StudentServer(VLLMServer):
    """The student on a vLLM server: ``push`` its weights, then ``sample`` completions there."""

    KEY = "vllm_server"
    ROLE = "the student's vLLM server"
    START = (
        "start the student there with `VLLM_SERVER_DEV_MODE=1 vllm serve STUDENT` (see README, On-policy distillation)"
    )

    def __init__(self, url: str, size: ModelSize, **kw):
        super().__init__(url, **kw)
        self.size = size  # for the FLOPs of the samples, computed: the server's kernels are not counted here

    def check(self, student: str) -> None:
        self.serving(student, f"the recipe's student; {self.START}")

    def push(self, model, folder) -> None:
        """The student's current weights into the server: written to ``folder`` (which the server must
        be able to read), reloaded in place by every worker, the prefix cache of the old weights dropped."""
        from safetensors.torch import save_file

        state, seen = {}, set()
        for name, tensor in model.state_dict().items():
            # Tied weights share storage, which safetensors refuses; each name gets its own copy, as the
            # in-place reload needs every weight under its own name (a tied output layer included).
            tensor = tensor.detach().cpu()
            state[name] = tensor.clone() if tensor.data_ptr() in seen else tensor.contiguous()
            seen.add(tensor.data_ptr())
        head = model.get_output_embeddings()
        if "lm_head.weight" not in state and head is not None:
            state["lm_head.weight"] = head.weight.detach().cpu().clone()
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file(state, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
        self._call(
            "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(Path(folder).resolve())}}
        )
        self._call("/reset_prefix_cache", {})

    def sample(self, prompts: list[list[int]], *, eos_ids: list[int], max_new_tokens: int, temperature: float,
               top_p: float, seed: int) -> tuple[list[list[int]], int, int]:  # fmt: skip
        """(completions, decoding steps, FLOPs): each prompt sampled on the server with seed ``seed + i``,
        each completion cut after its first stop id. FLOPs are computed from the student's size
        (distill.flops.sampling_flops)."""

        def one(i: int) -> list[int]:
            body = {"model": self.model, "prompt": [prompts[i]], "max_tokens": max_new_tokens,
                    "temperature": temperature, "top_p": top_p, "seed": seed + i, "return_token_ids": True,
                    "skip_special_tokens": False}  # fmt: skip
            if eos_ids:
                body["stop_token_ids"] = list(eos_ids)
            choices = self._call("/v1/completions", body).get("choices")
            ids = choices[0].get("token_ids") if isinstance(choices, list) and len(choices) == 1 else None
            if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids) or len(ids) > max_new_tokens:
                raise ServerError(
                    f"{self.ROLE} at {self.url} answered a completion without its token ids: {choices!r}"[:500]
                )
            return cut_at_stop(ids, eos_ids)

        completions = list(self._pool(0).map(one, range(len(prompts))))
        flops = sum(sampling_flops(self.size, len(p), len(c)) for p, c in zip(prompts, completions, strict=True))
        return completions, max(map(len, completions), default=0), round(flops)


def on_policy_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """A training batch of prompt + completion rows: targets on the completions only."""
    rows = [
        {"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c} for p, c in zip(prompts, completions, strict=True)
    ]
    return Collator(pad_id)(rows)


@torch.no_grad()
def sample_quality(student, teacher, prompts: list[list[int]], *, pad_id: int, eos_ids: list[int],
                   max_new_tokens: int, seed: int, temperature: float = 1.0) -> dict:  # fmt: skip
    """How good the student's own completions of ``prompts`` are in the teacher's eyes, per sampled
    token: the reverse KL KL(p_S || p_T) at T = 1 (what on-policy distillation minimises) and the
    teacher's negative log-likelihood of the sampled tokens."""
    completions = sample(student, prompts, pad_id=pad_id, eos_ids=eos_ids, max_new_tokens=max_new_tokens,
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
