"""Paths every test shares. The models are the repo's own tiny CPU pair (scripts/build_tiny_models.py)."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tiny_models"
TEACHER = str(TINY / "teacher")
STUDENT = str(TINY / "student")
DATA = TINY / "data"

sys.path.insert(0, str(Path(__file__).parent))  # lets tests import these names: `from conftest import ...`
# The suite runs on two workers (pyproject's addopts) on CI's two cores: each worker, and every process
# a test starts (the README's commands, torchrun, vLLM), gets one thread. Two threads each would put
# four on two cores, and torch's spinning threads then slow the whole suite down by half.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

# The tests run tiny models, where thread hand-offs cost more than they save, and CI's 2 cores are
# shared with the odd subprocess test: one thread is faster and keeps results reproducible.
torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    # The README test alone takes about half of the suite's time: it goes first, so that with the two
    # workers of pyproject's `-n 2` the other one runs every other file meanwhile.
    items.sort(key=lambda item: item.path.name != "test_readme.py")


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny student's (= the teacher's) tokenizer, through distill's own loader."""
    from distill.models import load_tokenizer

    return load_tokenizer(STUDENT)


class StopAt(TrainerCallback):
    """Ends training after `step`, as a killed job would (after its last checkpoint)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class SlowTokenizer:
    """A tokenizer that gives no character offsets, as a slow (Python) one looks to distill: what the
    cross-tokenizer paths must refuse."""

    is_fast = False

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)
