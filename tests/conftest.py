"""Paths every test shares. The models are the repo's own tiny CPU pair (scripts/build_tiny_models.py)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tiny_models"
TEACHER = str(TINY / "teacher")
STUDENT = str(TINY / "student")
DATA = TINY / "data"

sys.path.insert(0, str(Path(__file__).parent))  # lets tests import these names: `from conftest import ...`
