"""The throughput benchmark's FLOP count (bench/flops.py) on the real MiniLM-L6: what its
TFLOP/s and MFU figures rest on. (Timing itself is never tested: bench/ measures it.)"""

from __future__ import annotations

import sys

import pytest
from torch import nn

from peftlab.config import REPO_ROOT, load_experiment
from peftlab.methods import build_method
from peftlab.models import load_model

sys.path.insert(0, str(REPO_ROOT / "bench"))

from flops import spec_peak_tflops, training_flops_per_token  # noqa: E402


def test_full_fine_tuning_flops_are_six_per_weight_plus_attention(minilm_spec):
    """Full fine-tuning: 2 FLOPs per weight per token forward and 4 backward (the activations'
    and the weights' gradients) for every encoder matrix, plus attention's two products
    (scores and weighted values: 4 x length x hidden per token and layer, x3 with backward);
    pooler and classifier run once per sequence."""
    model = load_model(minilm_spec, 2, "single_label_classification", seed=0)
    linears = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    encoder = sum(v for n, v in linears.items() if ".encoder." in f".{n}")
    per_sequence = sum(linears.values()) - encoder
    batch, length, hidden, layers = 4, 32, model.config.hidden_size, model.config.num_hidden_layers
    counted = training_flops_per_token(model, batch, length, model.config.vocab_size, 2, True)
    assert counted == pytest.approx(6 * encoder + 12 * length * hidden * layers + 6 * per_sequence / length, rel=1e-9)
    assert all(p.grad is None for p in model.parameters())  # the count leaves no gradients behind


def test_frozen_weights_cost_no_weight_gradients(minilm_spec):
    """LoRA: the frozen matrices get no weight gradient (and the first layer's inputs need no
    gradient at all), so a step costs about two thirds of full fine-tuning's."""
    model = load_model(minilm_spec, 2, "single_label_classification", seed=0)
    full = training_flops_per_token(model, 4, 32, model.config.vocab_size, 2, True)
    exp = load_experiment(REPO_ROOT / "config" / "experiments", "lora", "default")
    lora = build_method("lora", exp.method_params, minilm_spec.targets).apply(
        load_model(minilm_spec, 2, "single_label_classification", seed=0))
    ratio = training_flops_per_token(lora, 4, 32, model.config.vocab_size, 2, True) / full
    assert 0.6 < ratio < 0.7


def test_datasheet_peaks_by_device_name():
    assert spec_peak_tflops("NVIDIA H200") == 989.0
    assert spec_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert spec_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert spec_peak_tflops("NVIDIA GeForce RTX 4090") is None
