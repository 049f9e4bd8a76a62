"""The other direction of PEFT interop: `peft` loads adapters kiem wrote and computes kiem's
logits.

    python peft_loads_kiem.py BASE_DIR ADAPTER_DIR EXPECTED.json

EXPECTED.json (written by crates/kiem-engine/tests/lora.rs) holds `tokens` [T] and kiem's
`logits` [T][vocab] of the base with the adapters. Needs torch, transformers and peft; run by
that test when KIEM_TORCH_PYTHON names such a Python.
"""
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base_dir, adapter_dir, expected_path = sys.argv[1:4]
expected = json.load(open(expected_path, encoding="utf-8"))
base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").float()
model = PeftModel.from_pretrained(base, adapter_dir).eval()
tokens = torch.tensor([expected["tokens"]])
reference = torch.tensor(expected["logits"])
with torch.no_grad():
    logits = model(tokens).logits[0]
    worst = (logits - reference).abs().max().item()
    assert worst < 1e-4, f"adapted logits differ from kiem's by {worst}"
    merged = model.merge_and_unload()(tokens).logits[0]
    worst_merged = (merged - reference).abs().max().item()
    assert worst_merged < 1e-4, f"merged logits differ from kiem's by {worst_merged}"
print(f"peft reproduces kiem's logits: max diff {worst:.2e} (merged {worst_merged:.2e})")
