#!/usr/bin/env python3
"""Small safetensors helpers for benches/gpu/run.sh (standard library only).

  st.py info FILE            tensors, dtypes, shapes; value classes of F32 tensors
  st.py compare C1 C2 [NAME] bitwise comparison of one F32 tensor (default `c`):
                             how many elements differ and the first few

A safetensors file is an 8-byte little-endian header length, a JSON header
({name: {dtype, shape, data_offsets}}, optional "__metadata__"), then the data.
"""

import array
import json
import struct
import sys


def header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def tensor_u32(path, name):
    """Raw 32-bit patterns of an F32 tensor, as array('I') (little-endian)."""
    h, base = header(path)
    if name not in h:
        raise SystemExit(f"{path}: no tensor `{name}` (has {sorted(k for k in h if k != '__metadata__')})")
    t = h[name]
    if t["dtype"] != "F32":
        raise SystemExit(f"{path}: `{name}` is {t['dtype']}, not F32")
    lo, hi = t["data_offsets"]
    a = array.array("I")
    with open(path, "rb") as f:
        f.seek(base + lo)
        a.frombytes(f.read(hi - lo))
    if sys.byteorder != "little":
        a.byteswap()
    return t["shape"], a


def classes(bits):
    """Counts of value classes in a sequence of f32 bit patterns."""
    c = {"zero": 0, "subnormal": 0, "normal": 0, "inf": 0, "nan": 0, "negative": 0}
    emin, emax = 255, 0
    for b in bits:
        e = (b >> 23) & 0xFF
        m = b & 0x7FFFFF
        if b >> 31:
            c["negative"] += 1
        if e == 0:
            c["zero" if m == 0 else "subnormal"] += 1
        elif e == 255:
            c["inf" if m == 0 else "nan"] += 1
        else:
            c["normal"] += 1
            emin, emax = min(emin, e), max(emax, e)
    if c["normal"]:
        c["exponents"] = f"2^{emin - 127}..2^{emax - 127}"
    return c


def info(path):
    h, base = header(path)
    print(f"{path}: header {base - 8} bytes, metadata {h.get('__metadata__')}")
    for name in sorted(k for k in h if k != "__metadata__"):
        t = h[name]
        line = f"  {name}: {t['dtype']} {t['shape']} bytes {t['data_offsets']}"
        if t["dtype"] == "F32":
            _, bits = tensor_u32(path, name)
            # Classify a sample at most: large tensors are slow in pure Python.
            step = max(1, len(bits) // 1_000_000)
            line += f" {classes(bits[::step])}" + (f" (every {step}th)" if step > 1 else "")
        print(line)


def compare(p1, p2, name="c"):
    s1, a = tensor_u32(p1, name)
    s2, b = tensor_u32(p2, name)
    if s1 != s2:
        print(f"shapes differ: {s1} vs {s2}")
        return 1
    if a == b:
        print(f"`{name}` {s1}: identical bit for bit")
        return 0
    cols = s1[-1] if s1 else 1
    try:  # numpy, where there is one, for 8192x8192 outputs
        import numpy as np

        diff = np.flatnonzero(np.frombuffer(a, np.uint32) != np.frombuffer(b, np.uint32)).tolist()
    except ImportError:
        diff = [i for i in range(len(a)) if a[i] != b[i]]
    print(f"`{name}` {s1}: {len(diff)} of {len(a)} elements differ")
    for i in diff[:8]:
        x = struct.unpack("<f", struct.pack("<I", a[i]))[0]
        y = struct.unpack("<f", struct.pack("<I", b[i]))[0]
        print(f"  [{i // cols}, {i % cols}]: {x!r} ({a[i]:#010x}) vs {y!r} ({b[i]:#010x})")
    return 1


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "info":
        for p in sys.argv[2:]:
            info(p)
    elif len(sys.argv) in (4, 5) and sys.argv[1] == "compare":
        sys.exit(compare(*sys.argv[2:]))
    else:
        print(__doc__)
        sys.exit(2)
