"""What a run shows on the console: one progress bar per phase, and logged values as numbers.

Left to themselves the libraries draw a bar for every model loaded and every file saved
(transformers), one per pass over a dataset (datasets), and the Trainer's `ProgressCallback` draws an
evaluation bar nested inside the training bar and prints each log as a dict of strings
(`'eval_agreement': '0.001764'`). Here a training run draws the training bar only, `distill eval` and
`distill generate` their one bar, and logs are printed with their numbers as numbers.

Every bar is made with tqdm's `disable=None`: drawn on a terminal, left out when the stream is a file
or a pipe, so that logs never hold carriage returns or escape codes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from transformers.utils import logging as hf_logging

# Below this much local data, tokenising takes about a second: a bar would only flash.
BIG_DATA_BYTES = 64 * 2**20


def quiet_libraries(*data: str | None) -> None:
    """Turn off the library bars a run does not need: transformers' per model loaded and per file
    saved, always; datasets' per pass, unless on a terminal over ``data`` (paths or hub names) that
    is large or not local (its size unknown)."""
    import datasets

    hf_logging.disable_progress_bar()
    sizes = [_local_bytes(d) for d in data if d]
    if sys.stderr.isatty() and any(size is None or size >= BIG_DATA_BYTES for size in sizes):
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()


def _local_bytes(name: str) -> int | None:
    """Bytes of a local data file or folder; None for a hub dataset."""
    path = Path(name)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return None


def bar(**kwargs) -> tqdm:
    """A tqdm bar drawn only on a terminal."""
    return tqdm(disable=None, dynamic_ncols=True, **kwargs)


def log_line(logs: dict) -> str:
    """``{'loss': 4.586, 'eval_agreement': 0.001764}``: floats at 4 significant digits, written as
    numbers, not strings; `total_flos` (transformers' estimate, which cost_report.json replaces) left
    out."""
    shown = [
        f"{k!r}: {v:.4g}" if isinstance(v, float) else f"{k!r}: {v!r}" for k, v in logs.items() if k != "total_flos"
    ]
    return "{" + ", ".join(shown) + "}"


class ConsoleCallback(TrainerCallback):
    """The Trainer's console: a bar over the optimizer steps (none with `disable_tqdm: true`, none
    off a terminal), no bar for evaluations, and each log of the training printed by `log_line` on
    the main process (the evaluation after it is the job's summary's to show)."""

    def __init__(self):
        self.bar = None
        self.step = 0
        self.training = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.step = state.global_step  # a resumed run starts its bar where it left off
        self.training = True
        if state.is_world_process_zero and not args.disable_tqdm:
            self.bar = bar(total=state.max_steps, initial=self.step, unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.step)
        self.step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training and state.is_world_process_zero and logs:
            tqdm.write(log_line(logs), file=sys.stdout)  # above the bar, which stays whole

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def use_console(trainer) -> None:
    """Replace the Trainer's `ProgressCallback` (or `PrinterCallback`) by `ConsoleCallback`."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(ConsoleCallback())
