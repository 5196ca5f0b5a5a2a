"""How much each unit of a decoder-only LM matters, measured on calibration data (Minitron's
activation-based importance, ShortGPT's Block Influence), and which units a smaller shape keeps.

One forward pass over the calibration batches, with hooks that keep running sums only (memory
O(layers x width), never a per-token store over the whole set). Over real tokens t (attention mask 1):

- Block Influence of layer i:   BI_i = 1 - mean_t cos(h_in_i[t], h_out_i[t])   (ShortGPT). A layer
  whose output is its input has BI 0.
- MLP neuron j of layer i:      mean_t |x_i[t, j]|, x the input of down_proj (act(gate) * up).
- attention head h of layer i:  mean_t ||x_i[t, h*d:(h+1)*d]||_2, x the input of o_proj (the head's
  output before it is mixed back into the residual stream).
- embedding channel c:          sum over every norm output n (each layer's input_layernorm and
  post_attention_layernorm, and the final norm) of mean_t |n[t, c]|.
- with ``block`` = n: the angular distance of each run of n layers starting at s (Gromov et al.
  2024), A_s = mean_t arccos(cos(h_in_s[t], h_out_{s+n-1}[t])) / pi, for contiguous removal.

``loss_on_removal`` is Minitron's other depth rank: the calibration loss with layer i skipped minus
the loss with every layer, one pass per layer.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distill.errors import NonFiniteError
from distill.losses import IGNORE_INDEX


@dataclass
class Importance:
    """The scores of one calibration pass (float64, CPU)."""

    block_influence: torch.Tensor  # [layers]
    neurons: torch.Tensor  # [layers, intermediate_size]
    heads: torch.Tensor  # [layers, num_attention_heads]
    channels: torch.Tensor  # [hidden_size]
    block_distance: torch.Tensor | None  # [layers - block + 1], angular distance of each run of `block` layers
    tokens: int


def layers_of(model) -> torch.nn.ModuleList:
    return model.model.layers


def _hidden_in(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class _Sums:
    """Running sums, filled by the hooks; ``mask`` is the current batch's real-token weights [B*T]."""

    def __init__(self, model, block: int | None):
        config, n = model.config, len(layers_of(model))
        self.heads_n = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dev = model.device
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=dev)  # noqa: E731
        self.cos = z(n)
        self.neurons = z(n, config.intermediate_size)
        self.heads = z(n, self.heads_n)
        self.channels = z(config.hidden_size)
        self.block = block
        self.distance = z(n - block + 1) if block else None
        self.boundaries: list[torch.Tensor | None] = [None] * (n + 1)  # this batch's h_in of each layer, + last h_out
        self.mask: torch.Tensor | None = None
        self.tokens = 0

    def weighted(self, x: torch.Tensor) -> torch.Tensor:
        """sum over real tokens of x [B, T, ...] -> [...], as one matrix-vector product. In x's own
        dtype: an fp32 copy of a bf16 MLP activation would double the largest tensor of the forward
        (the product accumulates in fp32 on GPUs; each batch's sum is rounded once, to bf16)."""
        flat = x.reshape(-1, *x.shape[2:])
        return torch.tensordot(self.mask.to(flat.dtype), flat, dims=1).double()

    def cos_sum(self, a: torch.Tensor, b: torch.Tensor, angular: bool = False) -> torch.Tensor:
        cos = F.cosine_similarity(a.float(), b.float(), dim=-1)
        value = torch.arccos(cos.clamp(-1, 1)) / math.pi if angular else cos
        return self.weighted(value)

    def hooks(self, model) -> list:
        handles = []
        layers = layers_of(model)
        for i, layer in enumerate(layers):

            def on_layer(module, args, kwargs, output, i=i):
                h_in, h_out = _hidden_in(args, kwargs), _hidden_out(output)
                self.cos[i] += self.cos_sum(h_in, h_out)
                if self.block:
                    self.boundaries[i] = h_in
                    if i == len(layers) - 1:
                        self.boundaries[i + 1] = h_out

            def on_down(module, args, i=i):
                self.neurons[i] += self.weighted(args[0].abs())

            def on_o(module, args, i=i):
                x = args[0]
                per_head = torch.linalg.vector_norm(
                    x.reshape(*x.shape[:2], self.heads_n, self.head_dim), dim=-1, dtype=torch.float32
                )
                self.heads[i] += self.weighted(per_head)

            def on_norm(module, args, output):
                self.channels.add_(self.weighted(output.abs()))

            handles.append(layer.register_forward_hook(on_layer, with_kwargs=True))
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_down))
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o))
            handles.append(layer.input_layernorm.register_forward_hook(on_norm))
            handles.append(layer.post_attention_layernorm.register_forward_hook(on_norm))
        handles.append(model.model.norm.register_forward_hook(on_norm))
        return handles

    def end_batch(self) -> None:
        if self.block:
            h = self.boundaries
            for s in range(len(self.distance)):
                self.distance[s] += self.cos_sum(h[s], h[s + self.block], angular=True)
            self.boundaries = [None] * len(h)


def _batch_to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def calibrate(model, batches: list[dict], block: int | None = None, meter=None, progress: bool = True) -> Importance:
    """The scores above, from one forward pass over ``batches`` (dicts of input_ids, attention_mask).
    ``block``: also the angular distance of every run of that many layers. ``meter``: a
    `distill.flops.FlopMeter` that counts the pass as ``"importance"``."""
    sums = _Sums(model, block)
    handles = sums.hooks(model)
    try:
        for batch in tqdm(batches, desc="importance", unit="batch", disable=not progress):
            batch = _batch_to(batch, model.device)
            sums.mask = batch["attention_mask"].reshape(-1)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            with meter.measure("importance", inputs) if meter else _nothing():
                # The last position's logits only: the scores need none, and the output layer over
                # every position is a large share of a small model's forward.
                model(**inputs, use_cache=False, logits_to_keep=1)
                sums.end_batch()
            sums.tokens += int(sums.mask.sum())
    finally:
        for h in handles:
            h.remove()
    n = max(sums.tokens, 1)
    return Importance(
        block_influence=(1 - sums.cos / n).cpu(),
        neurons=(sums.neurons / n).cpu(),
        heads=(sums.heads / n).cpu(),
        channels=(sums.channels / n).cpu(),
        block_distance=None if sums.distance is None else (sums.distance / n).cpu(),
        tokens=sums.tokens,
    )


@contextmanager
def _nothing():
    yield


@contextmanager
def skipping(layer):
    """The layer passes its input through unchanged (it is not run), as if it were removed."""
    layer.forward = lambda hidden_states, *args, **kwargs: hidden_states
    try:
        yield
    finally:
        del layer.forward


@torch.no_grad()
def mean_loss(model, batches: list[dict], meter=None, role: str = "loss", key=()) -> float:
    """Mean next-token cross-entropy over the target tokens (label != -100) of ``batches``, in nats."""
    total, count = 0.0, 0
    for batch in batches:
        batch = _batch_to(batch, model.device)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with meter.measure(role, inputs, *key) if meter else _nothing():
            logits = model(**inputs, use_cache=False).logits
        labels = batch["labels"][:, 1:]
        nll = F.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += float(nll)
        count += int((labels != IGNORE_INDEX).sum())
    loss = total / max(count, 1)
    if not math.isfinite(loss):
        raise NonFiniteError(f"{role}: the model's loss on the calibration data is not finite ({loss})")
    return loss


def loss_on_removal(model, batches: list[dict], meter=None, progress: bool = True) -> torch.Tensor:
    """[layers]: the calibration loss with layer i skipped minus the loss with all layers (Minitron)."""
    base = mean_loss(model, batches, meter, "loss_on_removal", ("all",))
    out = []
    layers = layers_of(model)
    for i in tqdm(range(len(layers)), desc="loss on removal", unit="layer", disable=not progress):
        with skipping(layers[i]):
            out.append(mean_loss(model, batches, meter, "loss_on_removal", (i,)) - base)
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------
# Which units a smaller shape keeps


def top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, in their original order (ties: the lower index wins)."""
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    return sorted(order.tolist())


def keep_layers(scores: torch.Tensor, k: int) -> list[int]:
    """The k layers with the highest importance (Block Influence or loss on removal), in order."""
    return top(scores, k)


def keep_contiguous(distance: torch.Tensor, layers: int, k: int) -> list[int]:
    """All layers but the run of ``layers - k`` whose input and output are closest (least angular
    distance; the first such run on a tie)."""
    start = int(torch.argmin(distance))
    removed = set(range(start, start + layers - k))
    return [i for i in range(layers) if i not in removed]


def keep_heads(head_scores: torch.Tensor, kv_heads: int, keep_kv: int, keep_q_per_kv: int) -> tuple[list, list]:
    """(kept query heads, kept key/value heads) of one layer. Query head h reads KV head
    h // (H / kv_heads). Whole KV groups are ranked by the sum of their query heads' scores and the
    best ``keep_kv`` kept; in each, its best ``keep_q_per_kv`` query heads. The kept query heads come
    group by group, so student head j reads student KV head j // keep_q_per_kv, as grouped-query
    attention requires."""
    per = head_scores.numel() // kv_heads
    groups = head_scores.reshape(kv_heads, per)
    kept_kv = top(groups.sum(dim=1), keep_kv)
    kept_q = [g * per + j for g in kept_kv for j in top(groups[g], keep_q_per_kv)]
    return kept_q, kept_kv
