"""Paths every test shares. The models are the repo's own tiny CPU pair (scripts/build_tiny_models.py)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tiny_models"
TEACHER = str(TINY / "teacher")
STUDENT = str(TINY / "student")
DATA = TINY / "data"

sys.path.insert(0, str(Path(__file__).parent))  # lets tests import these names: `from conftest import ...`

import torch  # noqa: E402

# The tests run tiny models, where thread hand-offs cost more than they save, and CI's 2 cores are
# shared with the odd subprocess test: one thread is faster and keeps results reproducible.
torch.set_num_threads(1)
