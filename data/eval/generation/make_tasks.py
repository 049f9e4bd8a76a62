#!/usr/bin/env python3
"""Writes the generation tasks in this folder from the data files they come from (see
data/README.md for sources and licenses):

- translation_en_nl.jsonl: 200 English-Dutch paragraph pairs of the LibreOffice help (MPL-2.0),
  every 100th pair of 30-160 English and 20-200 Dutch characters, as
  {"prompt": "English: ...\\nDutch:", "reference": "..."} (score with chrF and BLEU).
- construction_faq_heldout_en.jsonl: the questions of Zaragoza AB's customer FAQ (CC-BY-4.0)
  that `kiem demo` holds out of fine-tuning (every 20th conversation, from the 11th: i % 20 ==
  10), with their answers, as {"prompt": question, "reference": answer}: questions a demo model
  has not been trained on.

    python3 data/eval/generation/make_tasks.py --shared ../shared/data
"""
import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default=os.path.join(HERE, "..", "..", "..", "..", "shared", "data"))
    args = parser.parse_args()
    pairs = [json.loads(line) for line in open(os.path.join(args.shared, "tasks", "libreoffice_help_en_nl.jsonl"))]
    short = [p for p in pairs if 30 <= len(p["en"]) <= 160 and 20 <= len(p["nl"]) <= 200]
    with open(os.path.join(HERE, "translation_en_nl.jsonl"), "w") as f:
        for p in short[::100][:200]:
            f.write(json.dumps({"prompt": f"English: {p['en']}\nDutch:", "reference": p["nl"]},
                               ensure_ascii=False) + "\n")
    # The FAQ as `kiem demo` embeds it (the same file as the shared data's).
    demo_faq = os.path.join(HERE, "..", "..", "..", "crates", "kiem", "demo",
                            "construction_company_faq_en.sharegpt.jsonl")
    faq = [json.loads(line) for line in open(demo_faq) if line.strip()]
    with open(os.path.join(HERE, "construction_faq_heldout_en.jsonl"), "w") as f:
        for conv in faq[10::20]:
            turns = conv["conversations"]
            f.write(json.dumps({"prompt": turns[0]["value"], "reference": turns[1]["value"]},
                               ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
