#!/usr/bin/env python3
"""Checks that the Python `tokenizers` package loads kiem's tokenizer.json files and gives the
ids kiem gave. Input: a JSON file {"tokenizers": {name: path}, "cases": {name: [[text, ids]]}}.

Texts are compared twice: with the package's defaults (only texts that spell no special token,
since by default the package turns such spellings into special ids), and with
`encode_special_tokens = True`, which is how kiem treats document text (always). Exit code 0
when every case agrees; otherwise the first mismatches are printed.
"""

import json
import sys

from tokenizers import Tokenizer


def main() -> int:
    spec = json.load(open(sys.argv[1], encoding="utf-8"))
    failures = 0
    checked = 0
    for name, path in spec["tokenizers"].items():
        tok = Tokenizer.from_file(path)
        specials = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
        for text, ids in spec["cases"][name]:
            variants = [True]
            if not any(s in text for s in specials):
                variants.append(False)
            for literal_specials in variants:
                tok.encode_special_tokens = literal_specials
                got = tok.encode(text, add_special_tokens=False).ids
                checked += 1
                if got != ids:
                    failures += 1
                    if failures <= 5:
                        print(f"{name}: {text!r} (encode_special_tokens={literal_specials}):\n"
                              f"  kiem   {ids}\n  python {got}")
            if tok.decode(ids, skip_special_tokens=False) != text:
                failures += 1
                if failures <= 5:
                    print(f"{name}: decode mismatch for {text!r}")
    print(f"{checked} encodings checked, {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
