"""Reads a GGUF file that `kiem export` wrote with llama.cpp's own Python package (gguf-py) and
prints what it sees as JSON: each metadata key with its value type and value (arrays: type,
length and first items), and each tensor's name, ggml type, shape and dequantized values.

    python gguf_reads_kiem.py FILE.gguf
"""
import json
import sys

import gguf


def main():
    reader = gguf.GGUFReader(sys.argv[1])
    keys = {}
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue
        kind = field.types[0].name
        if kind == "ARRAY":
            items = [field.contents(i) for i in range(min(len(field.data), 5))]
            keys[field.name] = {"type": f"ARRAY[{field.types[-1].name}]", "len": len(field.data),
                                "first": items}
        else:
            keys[field.name] = {"type": kind, "value": field.contents()}
    tensors = []
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)
        tensors.append({"name": t.name, "type": t.tensor_type.name,
                        "shape": [int(d) for d in t.shape], "values": [float(v) for v in values]})
    json.dump({"keys": keys, "tensors": tensors}, sys.stdout)


if __name__ == "__main__":
    main()
