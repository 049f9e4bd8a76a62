"""The other direction of Hugging Face interop: `transformers` loads a kiem-written model
directory unchanged (AutoModelForCausalLM, AutoTokenizer, GenerationConfig) and computes the same
logits and the same chat-template token ids as kiem.

    python transformers_loads_kiem.py MODEL_DIR EXPECTED.json

EXPECTED.json (written by crates/kiem/tests/hf_interop.rs) holds kiem's `text`, `tokens`,
`logits` [len(tokens)][vocab], and `chats`: [{messages, add_generation_prompt, ids}].
Needs torch and transformers; run by that test when KIEM_TORCH_PYTHON names such a Python.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

model_dir, expected_path = sys.argv[1], sys.argv[2]
expected = json.load(open(expected_path, encoding="utf-8"))

tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
generation = GenerationConfig.from_pretrained(model_dir)

tokens = tokenizer(expected["text"])["input_ids"]
assert tokens == expected["tokens"], f"token ids differ: {tokens} vs {expected['tokens']}"
with torch.no_grad():
    logits = model(torch.tensor([tokens])).logits[0]
reference = torch.tensor(expected["logits"])
assert logits.shape == reference.shape, f"logits shape {tuple(logits.shape)} vs {tuple(reference.shape)}"
worst = (logits - reference).abs().max().item()
assert worst <= 1e-4, f"logits differ by up to {worst}"

for case in expected["chats"]:
    ids = tokenizer.apply_chat_template(case["messages"], add_generation_prompt=case["add_generation_prompt"],
                                        tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    assert list(ids) == case["ids"], f"chat template: {list(ids)} vs kiem {case['ids']}"

eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
assert tokenizer.convert_tokens_to_ids("<|assistant_end|>") in eos, f"eos_token_id {eos} lacks <|assistant_end|>"
print(f"transformers loads {model_dir}: logits max abs diff {worst:.2e}, "
      f"{len(expected['chats'])} chat renderings identical, eos {eos}")
