#!/usr/bin/env python3
"""Fails when a dependency needs a newer Rust than the workspace's `rust-version` (clippy's
incompatible_msrv lint checks kiem's own code against it). Run from the repository root."""
import json
import subprocess
import sys

meta = json.loads(
    subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
)


def version(v):
    return tuple(int(x) for x in (v or "0").split("."))


ours = max(version(p["rust_version"]) for p in meta["packages"] if p["name"] == "kiem")
newer = [
    "%s %s needs Rust %s" % (p["name"], p["version"], p["rust_version"])
    for p in meta["packages"]
    if version(p["rust_version"]) > ours
]
if newer:
    sys.exit("rust-version %s is too old: %s" % (".".join(map(str, ours)), "; ".join(newer)))
print("rust-version %s covers every dependency" % ".".join(map(str, ours)))
