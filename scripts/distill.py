"""Distill a teacher into a student: the same job as `distill train`, for `accelerate launch`.

python scripts/distill.py recipes/tiny_cpu.yaml [--key value ...]
accelerate launch --config_file recipes/accelerate/multi_gpu.yaml scripts/distill.py RECIPE.yaml
"""

import sys
from pathlib import Path

# This file shares the package's name and Python puts its folder first on the path; take the folder
# off so `import distill` finds the package (installed, or the checkout this script lives in).
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from distill.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
