"""Distill a teacher into a student: the same job as `distill train`, for `accelerate launch`.

    python scripts/distill.py recipes/tiny_cpu.yaml [--key value ...]
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml scripts/distill.py RECIPE.yaml
"""

import sys

from distill.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
