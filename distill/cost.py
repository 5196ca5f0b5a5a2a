"""What a training run costs, in the field's units: FLOPs, PFlop/s-days, MFU, GPU-hours and dollars.

1 PFlop/s-day = 1e15 FLOP/s for 86,400 s = 8.64e19 FLOPs. GPT-3 175B's pre-training,
6 x 174.6e9 parameters x 300e9 tokens = 3.14e23 FLOPs, is about 3,640 PFlop/s-days.

:class:`CostCallback` is the meter: it reads a :class:`distill.flops.FlopMeter` that the trainer wraps
around the teacher forward and the student forward + backward (*measured* model FLOPs, see
:mod:`distill.flops`), adds what was computed elsewhere (a cache build, a server) and writes the bill.
Planning before launch is :mod:`distill.planner` (``distill cost``).

MFU (model FLOPs utilisation) = achieved model FLOP/s / peak FLOP/s. Peaks are dense (no 2:4
sparsity) bf16/fp16 tensor-core numbers from the vendors' datasheets, per device.
"""

from __future__ import annotations

import json
import re
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from distill.errors import UserError
from distill.flops import FlopMeter, mark_recomputation

PFLOPS_DAY = 1e15 * 86_400  # FLOPs in one PFlop/s-day: 8.64e19

# Dense bf16/fp16 TFLOP/s per device. Datasheets quote "with sparsity" figures first; those are
# twice the dense numbers below.
PEAK_TFLOPS = {
    "A100": 312.0,  # A100 SXM and PCIe datasheet: BF16 312 (624 sparse)
    "A800": 312.0,  # A100 silicon with a slower interconnect
    "H100": 989.0,  # H100 SXM datasheet: BF16 1,979 sparse
    "H100 PCIe": 756.0,  # 1,513 sparse
    "H100 NVL": 835.0,  # 1,671 sparse
    "H800": 989.0,  # H100 SXM compute with a slower interconnect
    "H200": 989.0,  # H200 SXM datasheet: BF16 1,979 sparse, the H100's tensor cores
    "B200": 2250.0,  # HGX B200: BF16 4.5 PFLOP/s sparse
    "L40S": 362.0,  # L40S datasheet: BF16 362 (733 sparse)
    "L4": 121.0,  # 242 sparse
    "A10": 125.0,  # 250 sparse
    "V100": 125.0,  # FP16 tensor cores; no bf16
    "T4": 65.0,  # FP16; no bf16
    "RTX 4090": 165.0,  # Ada whitepaper: FP16/BF16 with FP32 accumulate, 165.2 (330 with FP16 accumulate)
    "MI300X": 1307.0,  # AMD: FP16/BF16 1,307.4 dense
}


def pflops_days(flops: float) -> float:
    return flops / PFLOPS_DAY


def find_peak(name: str) -> tuple[str, float] | None:
    """(table name, peak TFLOP/s) for an accelerator or CUDA device name, or None if unknown.

    Matches whole words, the most specific entry first: "NVIDIA H100 PCIe" -> H100 PCIe,
    "NVIDIA H100 80GB HBM3" -> H100, "NVIDIA A100-SXM4-80GB" -> A100, "NVIDIA A10G" -> None.
    """
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    hits = [(len(k.split()), k) for k in PEAK_TFLOPS if all(w in words for w in k.lower().split())]
    if not hits:
        return None
    key = max(hits)[1]
    return key, PEAK_TFLOPS[key]


def peak_for(accelerator: str) -> tuple[str, float]:
    found = find_peak(accelerator)
    if found is None:
        raise UserError(
            f"unknown accelerator {accelerator!r}; known: {', '.join(PEAK_TFLOPS)}. "
            "Give its dense bf16 peak instead (--peak_tflops / peak_tflops)."
        )
    return found


def detect_accelerator() -> tuple[str, float | None] | None:
    """(device name, peak TFLOP/s or None) of the current CUDA device; None without one."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    found = find_peak(name)
    return name, found[1] if found else None


def mfu(flops: float, seconds: float, peak_tflops: float, devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of all devices."""
    return flops / (seconds * devices * peak_tflops * 1e12)


def gpu_hours(flops: float, peak_tflops: float, mfu: float) -> float:
    """Device-hours to do ``flops`` at utilisation ``mfu`` of ``peak_tflops``."""
    return flops / (peak_tflops * 1e12 * mfu) / 3600


def _num(x: float | None) -> str:
    """3.1428e+23 -> '3.143e23'; numbers below a million written out."""
    if x is None:
        return "-"
    if abs(x) < 1e6:
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.4g}"
    mantissa, exp = f"{x:.3e}".split("e")
    return f"{mantissa}e{int(exp)}"


def _usd(x: float | None) -> str:
    return "-" if x is None else f"${x:,.2f}" if x >= 0.01 else f"${x:.2e}"


class CostCallback(TrainerCallback, ExportableState):
    """The bill of a training run: what each side computed, logged, checkpointed and reported.

    The one place where a run's compute is accounted. The trainer wraps its work in
    :meth:`student_step`, :meth:`teacher_forward` and :meth:`output_layers`; a :class:`FlopMeter`
    counts each once per shape. At each logging step the trainer adds :meth:`log_metrics` to its
    logs. The totals are saved in every checkpoint (``TrainerState.stateful_callbacks``) and read back
    when training resumes, so a resumed run continues the count. At the end of training,
    ``cost_report.json`` goes to ``output_dir``.

    Model FLOPs (``flops``, MFU) leave out activation checkpointing's recomputation; hardware FLOPs
    (``hardware_flops``, HFU) include it (PaLM, app. B). A teacher served from a cache
    (``teacher_cache``: the build's measured FLOPs, from its manifest) is billed its share of the
    build, the part of the cached examples this run read; that work was done before the run, so it
    is in the bill but not in the run's FLOP/s, MFU or HFU. A teacher on a server (``teacher_server``)
    is billed the positions it scored for training, at FLOPs computed from its config (the server's
    kernels cannot be counted from here), with the requests' wall time; its devices are not this
    run's, so that too stays out of FLOP/s, MFU and HFU.

    Wall time runs from ``on_train_begin`` and includes evaluation and checkpointing; so does the MFU
    computed from it. A resumed run adds the time up to the checkpoint, not the lost work after it.
    """

    KEYS = ("teacher_flops", "student_flops", "generation_flops", "recomputed_flops", "tokens", "examples",
            "served_flops", "served_positions", "served_ms", "waited_ms", "served_generation_flops")  # fmt: skip

    def __init__(
        self,
        peak_tflops: float | None = None,
        gpu_hour_price: float | None = None,
        teacher_cache: dict | None = None,
        teacher_server: str | None = None,
        generation_server: str | None = None,
        prune: dict | None = None,
        teachers: dict | None = None,
    ):
        self.meter = FlopMeter()
        self.peak_tflops = peak_tflops  # as given; None: detected at train begin, again after a resume
        self.gpu_hour_price = gpu_hour_price
        self.teacher_cache = teacher_cache  # {"flops", "examples", "seconds"} of the cache's train split
        self.teacher_server = teacher_server  # the URL, when the teacher is served
        self.generation_server = generation_server  # the URL, when the student samples on vLLM (use_vllm)
        self.prune = prune  # the "cost" of the student folder's prune_report.json (`distill prune`)
        # Several teachers: {meter role: {"name", "weight", "cache": its build or None, "url": its server or None}},
        # each billed on its own line (a model: its measured forwards; a cache: its share of the build; a
        # server: the FLOPs computed for the positions it scored).
        self.teachers = teachers
        self._served_by = {}  # several teachers: role -> [computed FLOPs, positions] a server scored, this session
        # this session's served teacher FLOPs, positions, request and waiting ms; served sampling FLOPs
        self._served = [0, 0, 0, 0, 0]
        self.accelerator: str | None = None
        self.peak: float | None = peak_tflops  # in use
        # All processes, as of the last sync; what checkpoints hold.
        self.totals = {**dict.fromkeys(self.keys, 0), "seconds": 0.0}
        self._base = dict(self.totals)
        self._start = self._last_time = time.perf_counter()
        self._last_flops = 0
        self._devices = 1

    def state(self) -> dict:
        return {
            # A resume builds the callback again from these (Trainer._load_callback_state): the teacher's
            # source is part of them, or a resumed run would bill its teacher as if none had run.
            "args": {
                "peak_tflops": self.peak_tflops,
                "gpu_hour_price": self.gpu_hour_price,
                "teacher_cache": self.teacher_cache,
                "teacher_server": self.teacher_server,
                "generation_server": self.generation_server,
                "prune": self.prune,
                "teachers": self.teachers,
            },
            "attributes": {"totals": dict(self.totals)},
        }

    # -- what the trainer wraps

    def student_step(self, inputs: dict):
        """The student's forward + backward (a teacher forward inside is counted apart)."""
        return self.meter.measure("student", inputs)

    @property
    def keys(self) -> tuple[str, ...]:
        """The totals summed over processes and checkpointed: one more per teacher when there are several."""
        return self.KEYS + tuple(
            f"{role}_{key}" for role in self.teachers or () for key in ("flops", "served_flops", "served_positions")
        )

    def teacher_forward(self, inputs: dict, role: str = "teacher"):
        """A teacher's forward; ``role``: which teacher, when there are several."""
        return self.meter.measure(role, inputs)

    @contextmanager
    def teacher_rows(self, rows: int, key: tuple, role: str = "teacher"):
        """A teacher's output layer on ``rows`` positions of a batch (its top-k across tokenizers, at the
        positions some target is aligned with): linear in ``rows``, counted once per ``key`` (its
        weight's shape) and scaled."""
        if rows == 0:  # nothing runs; and a first count over 0 rows would price every later row at 0
            yield
            return
        with self.meter.measure(role, {}, "output rows", *key, units=rows, attention=False):
            yield

    def teacher_server_used(self, url: str, role: str = "teacher") -> None:
        """The teacher ``role`` is on the vLLM server at ``url``."""
        if self.teachers is None:
            self.teacher_server = url
        else:
            self.teachers[role]["url"] = url

    def teacher_cache_read(self, build: dict, role: str = "teacher") -> None:
        """The teacher ``role`` is a cache: billed its share of ``build`` (the manifest's train split cost)."""
        if self.teachers is None:
            self.teacher_cache = build
        else:
            self.teachers[role]["cache"] = build

    @contextmanager
    def sampling(self, model: torch.nn.Module):
        """The student's on-policy sampling (``generate`` on ``model``), measured forward by forward:
        each forward's shapes (rows, new positions, context) are counted the first time they are seen
        and reused after, like every other block. Nothing runs twice, and under FSDP2 / ZeRO-3 each
        process counts its own forwards (the ones ``synced_gpus`` keeps a finished process running
        too), so no process waits on a collective that another does not make."""
        # generate calls the causal LM itself; behind a PEFT wrapper that is the base model.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        open_blocks = []

        def before(module, args, kwargs):
            shapes = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
            # A decoding step's attention spans the cached positions, which no input's shape shows (the
            # cache's keyword is `cache` or `past_key_values`, depending on the transformers release).
            caches = [v for v in kwargs.values() if hasattr(v, "get_seq_length")]
            cached = caches[0].get_seq_length() if caches else None
            block = self.meter.measure("generation", shapes, "sampling", cached)
            block.__enter__()
            open_blocks.append(block)

        def after(module, args, output):
            open_blocks.pop().__exit__(None, None, None)

        handles = [base.register_forward_pre_hook(before, with_kwargs=True), base.register_forward_hook(after)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            while open_blocks:  # a forward that raised: its block counts nothing
                open_blocks.pop().__exit__(RuntimeError, RuntimeError("forward failed"), None)

    def teacher_served(self, flops: int, positions: int, seconds: float, waited: float, role: str = "teacher") -> None:
        """A server scored ``positions`` for a training batch: ``flops`` computed from the teacher's
        config, ``seconds`` of requests, of which the trainer ``waited`` (the rest overlapped its work);
        ``role``: which teacher, when there are several."""
        for i, value in enumerate((flops, positions, round(seconds * 1000), round(waited * 1000))):
            self._served[i] += value
        if self.teachers is not None:
            mine = self._served_by.setdefault(role, [0, 0])
            mine[0], mine[1] = mine[0] + flops, mine[1] + positions

    def student_generation_served(self, flops: int, url: str) -> None:
        """The student's samples, made on a vLLM server (use_vllm): ``flops`` computed from its size."""
        self.generation_server = url
        self._served[4] += flops

    @contextmanager
    def output_layers(self, rows: int, key: tuple, teacher_flops_per_row: int = 0, role: str = "teacher"):
        """The chunked loss: both output layers on ``rows`` target positions, and the student's
        head gradients. Its FLOPs are linear in ``rows``, so they are counted once per ``key``
        (hidden sizes, vocabulary) and scaled, not measured again for every count of targets. The
        teacher's output matmul runs inside the student's step; ``teacher_flops_per_row`` of it
        are the teacher's."""
        with self.meter.measure("student", {}, "output layers", *key, units=rows, attention=False):
            yield
        if teacher_flops_per_row:
            self.meter.move(teacher_flops_per_row * rows, "student", role)

    # -- events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__) if state.global_step > 0 else None
        self._base = {**self.totals, **dict.fromkeys(self.keys, 0), "seconds": 0.0}
        if saved:
            self._base.update(saved["attributes"]["totals"])
        self.totals = dict(self._base)
        self.meter.reset()
        self._served = [0, 0, 0, 0, 0]
        self._served_by = {}
        if model is not None:  # the Trainer has turned activation checkpointing on by now
            mark_recomputation(model, self.meter)
        self._devices = max(args.world_size, 1)
        self._start = self._last_time = time.perf_counter()
        self._last_flops = self.flops_done
        if self.peak_tflops is None and (found := detect_accelerator()):
            self.accelerator, self.peak = found

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_save or control.should_training_stop:
            self._sync(args)

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_save:
            self._sync(args)

    def on_train_end(self, args, state, control, **kwargs):
        self._sync(args)
        if state.is_world_process_zero:
            report = self.report(state)
            out = Path(args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "cost_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            print(render_report(report))

    # -- numbers

    @property
    def teacher_flops(self) -> int:
        """The teacher's bill: its forwards in this run, its share of the cache build, or the positions
        a server scored (computed)."""
        if self.teachers is not None:
            return sum(self._teacher_bill(role) for role in self.teachers)
        if self.teacher_server is not None:
            return self.totals["served_flops"]
        if self.teacher_cache is None:
            return self.totals["teacher_flops"]
        return round(self.teacher_cache["flops"] * self.cache_share)

    def _teacher_bill(self, role: str) -> int:
        cache, url = self.teachers[role]["cache"], self.teachers[role].get("url")
        if cache is not None:
            return round(cache["flops"] * self._share(cache))
        return self.totals.get(f"{role}_served_flops" if url else f"{role}_flops", 0)

    @property
    def cache_share(self) -> float:
        """The part of the cache's examples this run has read (each at least once)."""
        return self._share(self.teacher_cache)

    def _share(self, cache: dict) -> float:
        return min(1.0, self.totals["examples"] / max(cache["examples"], 1))

    @property
    def flops_done(self) -> int:
        """Model FLOPs computed by this run's devices (no cache build, no server)."""
        return self.totals["teacher_flops"] + self.totals["student_flops"] + self.totals["generation_flops"]

    @property
    def generation_flops(self) -> int:
        """The student's on-policy sampling: measured here, or computed for a vLLM server's."""
        return self.totals["generation_flops"] + self.totals["served_generation_flops"]

    @property
    def prune_flops(self) -> int:
        """The calibration pass that cut the student out of its teacher (`distill prune`), done before
        this run: in the student's bill, not in this run's FLOP/s, MFU or HFU."""
        return int(self.prune["flops"]["total"]) if self.prune else 0

    @property
    def total_flops(self) -> int:
        return self.teacher_flops + self.totals["student_flops"] + self.generation_flops + self.prune_flops

    def _sync(self, args) -> None:
        """totals = checkpointed base + this session's counts summed over processes. Every process
        calls this at the same steps (the Trainer's log/save decisions are the same everywhere)."""
        m = self.meter
        roles = list(self.teachers or ("teacher",))
        local = [sum(m.flops.get(r, 0) for r in roles), m.flops.get("student", 0), m.flops.get("generation", 0),
                 sum(m.recomputed.values()), m.tokens.get("student", 0), m.examples.get("student", 0),
                 *self._served,
                 *(v for r in self.teachers or () for v in (m.flops.get(r, 0), *self._served_by.get(r, (0, 0))))]  # fmt: skip
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor(local, dtype=torch.float64, device=args.device)
            torch.distributed.all_reduce(t)
            local = [int(v) for v in t.tolist()]
        for key, value in zip(self.keys, local, strict=True):
            self.totals[key] = self._base[key] + value
        self.totals["seconds"] = self._base["seconds"] + time.perf_counter() - self._start

    def log_metrics(self) -> dict:
        """Cumulative FLOPs and, since the last call, FLOP/s per device and MFU; for trainer.log."""
        now, done = time.perf_counter(), self.flops_done
        rate = (done - self._last_flops) / max(now - self._last_time, 1e-9) / self._devices
        self._last_time, self._last_flops = now, done
        logs = {
            "flops_teacher": float(self.teacher_flops),
            "flops_student": float(self.totals["student_flops"]),
            **({"flops_student_generation": float(g)} if (g := self.generation_flops) else {}),
            **({"flops_prune": float(p)} if (p := self.prune_flops) else {}),
            "flops_total": float(self.total_flops),
            "pflops_days": pflops_days(self.total_flops),
            "flops_per_second": rate,
        }
        if self.peak:
            logs["mfu"] = rate / (self.peak * 1e12)
        return logs

    def report(self, state=None) -> dict:
        t = self.totals
        teacher, student, total = self.teacher_flops, t["student_flops"], self.total_flops
        generation = self.generation_flops
        done, seconds, tokens = self.flops_done, t["seconds"], t["tokens"]
        hardware = done + t["recomputed_flops"]
        device_hours = seconds * self._devices / 3600
        pruned = {"prune": self.prune_flops} if self.prune else {}
        report = {
            # student: its training steps; student_generation: its on-policy sampling (0 off-policy);
            # prune: the `distill prune` pass the student was cut out with, when it was
            "flops": {
                "teacher": teacher,
                "student": student,
                "student_generation": generation,
                **pruned,
                "total": total,
            },
            "pflops_days": {
                "teacher": pflops_days(teacher),
                "student": pflops_days(student),
                "student_generation": pflops_days(generation),
                **{k: pflops_days(v) for k, v in pruned.items()},
                "total": pflops_days(total),
            },
            "hardware_flops": {
                "recomputed": t["recomputed_flops"],
                "total": hardware,
                "note": "FLOPs this run's devices executed: model FLOPs plus activation checkpointing's recomputed "
                "forwards; HFU is computed on them, MFU on model FLOPs",
            },
            # none: no teacher forward ran in training (alpha 0)
            "teacher_source": "several"
            if self.teachers is not None
            else "server"
            if self.teacher_server is not None
            else "cache"
            if self.teacher_cache is not None
            else "model"
            if teacher
            else "none",
            "tokens": tokens,
            "examples": t["examples"],
            "flops_per_token": {
                "teacher": teacher / tokens if tokens else None,
                "student": student / tokens if tokens else None,
                "student_generation": generation / tokens if tokens else None,
                "total": total / tokens if tokens else None,
            },
            "wall_seconds": seconds,
            "devices": self._devices,
            "device_hours": device_hours,
            "flops_per_second_per_device": done / seconds / self._devices if seconds else None,
            "accelerator": self.accelerator,
            "peak_tflops": self.peak,
            "mfu": mfu(done, seconds, self.peak, self._devices) if self.peak and seconds else None,
            "hfu": mfu(hardware, seconds, self.peak, self._devices) if self.peak and seconds else None,
            "gpu_hour_price": self.gpu_hour_price,
            "cost_usd": device_hours * self.gpu_hour_price if self.gpu_hour_price is not None else None,
            # The Trainer's own estimate (6 x non-embedding parameters x tokens, student only), for comparison.
            "trainer_total_flos": getattr(state, "total_flos", None),
            "convention": "model FLOPs measured with torch.utils.flop_counter, once per input shape: 2mnk per "
            "matmul, attention QK^T and PV over the full sequence, backward 2x forward, activation checkpointing's "
            "recompute left out (it is in hardware_flops); tokens are positions processed, padding included",
        }
        if self.teachers is not None:
            report["teachers"] = [
                {
                    "name": t["name"],
                    "source": "cache" if t["cache"] is not None else "server" if t.get("url") else "model",
                    **(
                        {"url": t["url"], "positions": self.totals.get(f"{role}_served_positions", 0)}
                        if t.get("url")
                        else {}
                    ),
                    "weight": t["weight"],
                    "flops": (flops := self._teacher_bill(role)),
                    "pflops_days": pflops_days(flops),
                    **({"cache_share": self._share(t["cache"])} if t["cache"] is not None else {}),
                }
                for role, t in self.teachers.items()
            ]
        if self.teacher_cache is not None:
            c = self.teacher_cache
            report["teacher_cache"] = {
                "build_flops": c["flops"],
                "build_examples": c["examples"],
                "build_seconds": c["seconds"],
                "share": self.cache_share,
                "measured": c.get("measured", True),
                "note": "the teacher ran when the cache was built, not in this run: it is billed the build's FLOPs "
                "(measured; computed from the teacher's config where a server built it) for the share of the cached "
                "examples this run read (amortised), and left out of this run's FLOP/s, MFU and HFU",
            }
        if self.prune:
            seconds = self.prune.get("wall_seconds")
            report["prune"] = {
                "flops": self.prune_flops,
                "pflops_days": pflops_days(self.prune_flops),
                "wall_seconds": seconds.get("total") if isinstance(seconds, dict) else seconds,
                "measured": self.prune.get("measured"),
                "note": "the calibration pass of `distill prune` that cut this student out of its teacher (from the "
                "student folder's prune_report.json), measured when it ran: in flops.total, so that the total is "
                "what the student cost, and left out of this run's FLOP/s, MFU and HFU",
            }
        if self.generation_server is not None:
            report["generation_server"] = {
                "url": self.generation_server,
                "computed_flops": t["served_generation_flops"],
                "note": "the student's samples were made on a vLLM server (use_vllm): their FLOPs are computed from the "
                "student's size (the prompt's forward, then one forward per sampled token over its context), not "
                "measured, and left out of this run's FLOP/s, MFU and HFU",
            }
        if self.teacher_server is not None:
            report["teacher_server"] = {
                "url": self.teacher_server,
                "computed_flops": t["served_flops"],
                "positions": t["served_positions"],
                "request_seconds": t["served_ms"] / 1000,
                "waited_seconds": t["waited_ms"] / 1000,
                "note": "the teacher ran on the server, not on this run's devices: its FLOPs are computed from its "
                "config (2 x Linear parameters + attention over the whole prompt, per position sent), not measured, "
                "and left out of this run's FLOP/s, MFU and HFU; waited_seconds is the part of request_seconds the "
                "trainer spent blocked on the server",
            }
        return report


def render_report(r: dict) -> str:
    per_token = r["flops_per_token"]
    lines = ["", "distill: cost (measured)"]
    for role in ("teacher", "student", "student_generation", "prune", "total"):
        if role in ("student_generation", "prune") and not r["flops"].get(role):
            continue
        ft = per_token.get(role)
        name = "sampling" if role == "student_generation" else role
        lines.append(
            f"  {name:<8} {_num(r['flops'][role]):>10} FLOPs  {r['pflops_days'][role]:.4g} PFlop/s-day"
            + (f"  {_num(ft)} FLOPs/token" if ft else "")
        )
    for t in r.get("teachers", ()):
        how = {
            "cache": f"amortised from its cache, {t.get('cache_share', 0):.0%} of the build",
            "server": f"on the server {t.get('url')}, computed for {_num(t.get('positions', 0))} positions",
        }.get(t["source"], "measured")
        lines.append(f"    {t['name']} (weight {t['weight']:.3g}): {_num(t['flops'])} FLOPs, {how}")
    if r.get("teacher_cache"):
        c = r["teacher_cache"]
        lines.append(
            f"  (teacher: amortised from the cache build, {c['share']:.0%} of its {_num(c['build_flops'])} FLOPs; "
            "not run here)"
        )
    if r.get("prune"):
        c = r["prune"]
        lines.append(
            f"  (prune: the measured calibration pass of `distill prune` that made the student, "
            f"{c['wall_seconds'] or 0:.1f} s; not run here)"
        )
    if r.get("teacher_server"):
        c = r["teacher_server"]
        lines.append(
            f"  (teacher: on the server {c['url']}, computed from its config for {_num(c['positions'])} positions, "
            f"not measured; requests {c['request_seconds']:.1f} s, of which training waited {c['waited_seconds']:.1f} s)"
        )
    if r["hardware_flops"]["recomputed"]:
        lines.append(
            f"  activation checkpointing recomputed {_num(r['hardware_flops']['recomputed'])} FLOPs more: "
            f"{_num(r['hardware_flops']['total'])} hardware FLOPs"
        )
    mfu_text = f"{100 * r['mfu']:.3g}%" if r["mfu"] is not None else "n/a (set peak_tflops)"
    if r["mfu"] is not None and r["hfu"] != r["mfu"]:
        mfu_text += f" (HFU {100 * r['hfu']:.3g}%)"
    lines.append(
        f"  {_num(r['tokens'])} tokens in {r['wall_seconds']:,.1f} s on {r['devices']} device(s): "
        f"{_num(r['flops_per_second_per_device'] or 0)} FLOP/s per device, MFU {mfu_text}"
    )
    if r["cost_usd"] is not None:
        lines.append(f"  {r['device_hours']:.4g} device-hours x ${r['gpu_hour_price']:g} = {_usd(r['cost_usd'])}")
    return "\n".join(lines)
