"""Writes a llama2.c checkpoint as a Hugging Face folder (config.json and
model.safetensors, F32, or F16/BF16 with --dtype), standard library only:
the tensors are byte slices of the checkpoint (q/k rows left in llama2.c's
order: this is for measuring load memory, not for exact outputs).

  python3 llama2c_to_hf.py MODEL.bin OUT_DIR [--dtype f32|f16|bf16]
"""

import json
import os
import struct
import sys
from array import array


def convert(values, dtype):
    if dtype == "f32":
        return values
    if dtype == "bf16":
        # The upper half of each little-endian f32 (truncation; fine here).
        out = bytearray(len(values) // 2)
        out[0::2] = values[2::4]
        out[1::2] = values[3::4]
        return bytes(out)
    f = array("f")
    f.frombytes(values)
    return b"".join(struct.pack("<e", x) for x in f)  # slow: 1-2 µs a value


def main():
    src, out = sys.argv[1], sys.argv[2]
    dtype = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--dtype" else "f32"
    data = open(src, "rb").read()
    dim, hidden, layers, heads, kv_heads, vocab, seq = struct.unpack_from("<7i", data, 0)
    shared = vocab > 0
    vocab = abs(vocab)
    kv_dim = kv_heads * dim // heads
    at = 28
    tensors = []

    def take(name, shape):
        nonlocal at
        n = 4
        for d in shape:
            n *= d
        tensors.append((name, shape, data[at : at + n]))
        at += n

    take("model.embed_tokens.weight", [vocab, dim])
    per_layer = {}
    for key, shape in [
        ("input_layernorm", [dim]),
        ("self_attn.q_proj", [dim, dim]),
        ("self_attn.k_proj", [kv_dim, dim]),
        ("self_attn.v_proj", [kv_dim, dim]),
        ("self_attn.o_proj", [dim, dim]),
        ("post_attention_layernorm", [dim]),
        ("mlp.gate_proj", [hidden, dim]),
        ("mlp.down_proj", [dim, hidden]),
        ("mlp.up_proj", [hidden, dim]),
    ]:
        for l in range(layers):
            take(f"model.layers.{l}.{key}.weight", shape)
    take("model.norm.weight", [dim])
    head = dim // heads
    at += 2 * seq * head // 2 * 4
    if not shared:
        take("lm_head.weight", [vocab, dim])
    os.makedirs(out, exist_ok=True)
    size = {"f32": 4, "f16": 2, "bf16": 2}[dtype]
    header, offset = {}, 0
    for name, shape, raw in tensors:
        n = len(raw) // 4 * size
        header[name] = {"dtype": dtype.upper(), "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for _, _, raw in tensors:
            f.write(convert(raw, dtype))
    config = {
        "model_type": "llama", "hidden_size": dim, "intermediate_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "max_position_embeddings": seq, "tie_word_embeddings": shared, "rms_norm_eps": 1e-5,
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)


main()
