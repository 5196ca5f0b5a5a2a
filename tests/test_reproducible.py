"""A recipe's seed fixes what is random in a run, so that running a recipe twice gives one result."""

import torch

from distill import adapters
from distill.config import FinetuneConfig, ModelArguments

from conftest import STUDENT


def test_lora_adapters_start_from_the_same_weights_for_the_same_seed(tmp_path):
    def initial_adapters(seed, state_before):
        torch.manual_seed(state_before)  # whatever the process drew before
        model = adapters.load_student(
            ModelArguments(model_name_or_path=STUDENT, use_peft=True),
            FinetuneConfig(output_dir=str(tmp_path), use_cpu=True, seed=seed),
        )
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    first, again, other = initial_adapters(0, 1000), initial_adapters(0, 2000), initial_adapters(1, 1000)
    assert first.keys() == again.keys() and first
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first if "lora_A" in n)
