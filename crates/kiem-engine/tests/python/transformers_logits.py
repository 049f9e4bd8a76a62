"""`transformers` loads a model directory kiem wrote and computes the logits of a fixture.

    python transformers_logits.py MODEL_DIR REFERENCE.safetensors CLASS

REFERENCE.safetensors holds `tokens` [B, T] and `logits` [B, T, V] (from the fixture the model
was imported from); CLASS is the class name transformers must build (LlamaForCausalLM ...).
Run by crates/kiem-engine/tests/llama_reference.rs when KIEM_TORCH_PYTHON names a Python with
torch and transformers.
"""
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

model_dir, reference_path, expected_class = sys.argv[1:4]
reference = load_file(reference_path)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
assert type(model).__name__ == expected_class, f"built {type(model).__name__}, not {expected_class}"
with torch.no_grad():
    logits = model(reference["tokens"].long()).logits
worst = (logits - reference["logits"]).abs().max().item()
assert worst <= 1e-4, f"logits differ by up to {worst}"
print(f"transformers loads {model_dir} as {expected_class}: logits max abs diff {worst:.2e}")
