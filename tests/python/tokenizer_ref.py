"""Independent references for lockstep's tokenizers (tests/tests/tokenizers.rs).

  tokenizer_ref.py spm TOKENIZER.bin VOCAB_SIZE TEXTS.json
      The llama2.c tokenizer file as a SentencePiece BPE model (ModelProto
      written here by hand: pieces with `▁`, scores, types; byte fallback,
      identity normalizer, dummy prefix), then `sentencepiece` itself encodes
      each text (no BOS). Prints a JSON list of id lists.

  tokenizer_ref.py jinja CASES.json
      Each case {"template", "messages", "bos_token", "eos_token"} rendered
      as transformers' apply_chat_template renders it (Jinja2's immutable
      sandbox, trim_blocks, lstrip_blocks, loop controls, raise_exception,
      add_generation_prompt=True). Prints a JSON list of strings (or
      {"error": message}).
"""

import json
import struct
import sys


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(num, wire, payload):
    key = varint((num << 3) | wire)
    if wire == 0:
        return key + varint(payload)
    if wire == 2:
        return key + varint(len(payload)) + payload
    if wire == 5:
        return key + payload
    raise ValueError(wire)


def spm_model(path, vocab_size):
    data = open(path, "rb").read()
    (max_len,) = struct.unpack_from("<i", data, 0)
    at = 4
    pieces = []
    for i in range(vocab_size):
        score, n = struct.unpack_from("<fi", data, at)
        at += 8
        text = data[at : at + n].decode("utf-8")
        at += n
        if i == 0:
            kind, text = 2, "<unk>"
        elif i == 1:
            kind, text = 3, "<s>"
        elif i == 2:
            kind, text = 3, "</s>"
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            kind = 6
        else:
            kind, text = 1, text.replace(" ", "\u2581")
        pieces.append((text, score, kind))
    assert at == len(data), "trailing bytes"
    proto = b""
    for text, score, kind in pieces:
        sp = field(1, 2, text.encode()) + field(2, 5, struct.pack("<f", score)) + field(3, 0, kind)
        proto += field(1, 2, sp)
    trainer = field(3, 0, 2) + field(4, 0, vocab_size) + field(35, 0, 1)
    trainer += field(40, 0, 0) + field(41, 0, 1) + field(42, 0, 2)
    # pad_id = -1 (int32 as a 64-bit varint).
    trainer += field(43, 0, (1 << 64) - 1)
    proto += field(2, 2, trainer)
    normalizer = field(1, 2, b"identity") + field(3, 0, 1) + field(4, 0, 0) + field(5, 0, 1)
    proto += field(3, 2, normalizer)
    return proto


def cmd_spm(path, vocab_size, texts_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(spm_model(path, int(vocab_size)))
    texts = json.load(open(texts_path))
    print(json.dumps([sp.encode(t) for t in texts]))


def cmd_jinja(cases_path):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    out = []
    for case in json.load(open(cases_path)):
        try:
            t = env.from_string(case["template"])
            out.append(
                t.render(
                    messages=case["messages"],
                    add_generation_prompt=True,
                    bos_token=case.get("bos_token", ""),
                    eos_token=case.get("eos_token", ""),
                    tools=None,
                    documents=None,
                )
            )
        except TemplateError as e:
            out.append({"error": str(e)})
    print(json.dumps(out))


if __name__ == "__main__":
    {"spm": cmd_spm, "jinja": cmd_jinja}[sys.argv[1]](*sys.argv[2:])
