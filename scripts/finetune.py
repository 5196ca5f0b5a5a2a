"""Fine-tune a (distilled) model on domain data, with LoRA or in full: the same job as `distill finetune`,
for `accelerate launch`.

    python scripts/finetune.py recipes/tiny_cpu_finetune.yaml [--key value ...]
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml scripts/finetune.py RECIPE.yaml
"""

import sys
from pathlib import Path

# Python puts scripts/ first on the path, where distill.py would shadow the package; the repo root instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from distill.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
