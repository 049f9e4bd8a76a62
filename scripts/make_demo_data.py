#!/usr/bin/env python3
"""Builds the data embedded in `kiem demo` from ../shared/data (run from the repository root).

books.txt.zst: Jane Austen's Emma and Pride and Prejudice, then the State of the Union addresses
from 1980 on (modern, plain English close to a company's customer answers), one speech per
blank-line-separated block (novel paragraphs unwrapped to one line each). About 3 MB of text: enough for the demo's few minutes of
pre-training on two cores. The FAQ is copied unchanged. Sources and licenses: crates/kiem/demo/README.md.
"""
import pathlib
import re
import shutil
import subprocess

shared = pathlib.Path("../shared/data")
out = pathlib.Path("crates/kiem/demo")
out.mkdir(parents=True, exist_ok=True)

austen = (shared / "corpora/austen.txt").read_text(encoding="utf-8").splitlines()
emma = austen[austen.index("EMMA") : austen.index("MANSFIELD PARK")]
pride = austen[austen.index("PRIDE AND PREJUDICE") : austen.index("SENSE AND SENSIBILITY")]
speeches = (shared / "corpora/state_of_the_union_1790_2021.txt").read_text(encoding="utf-8").splitlines()
speeches = [s.strip() for s in speeches if s.strip()]
# The file is in date order; its last 40 addresses run from about 1982 to 2021.
modern = speeches[-40:]
# Transcripts mark audience reactions; they are not prose.
modern = [re.sub(r"\s*\((Applause|Laughter)[^)]*\)", "", s) for s in modern]


def paragraphs(lines):
    """Blank-line-separated blocks with their hard line wraps joined: one paragraph a line, as
    the FAQ answers are written."""
    blocks = "\n".join(lines).split("\n\n")
    return [" ".join(b.split()) for b in blocks if b.strip()]


text = "\n\n".join(paragraphs(emma) + paragraphs(pride) + modern) + "\n"
books = out / "books.txt"
books.write_text(text, encoding="utf-8")
subprocess.run(["zstd", "-19", "-q", "-f", "--rm", str(books), "-o", str(out / "books.txt.zst")], check=True)
shutil.copyfile(shared / "chat/construction_company_faq_en.sharegpt.jsonl", out / "construction_company_faq_en.sharegpt.jsonl")
print(f"books: {len(text.encode()):,} bytes of text")
