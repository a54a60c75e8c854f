"""Plain data between the trusted harness and the candidate process: tagged JSON of builtin values only.

Only exact builtin types cross (``type(x) is int``, not a subclass), so no object the candidate made ever
reaches the harness's ``==``: the harness rebuilds fresh builtins from text. Stdlib only: the candidate's
copy of this file runs under ``python -I -S``.
"""

import json

MAX_LINE = 8 << 20
_TAGS = {"l": list, "t": tuple, "s": set, "z": frozenset}


def encode(x, depth=0):
    if depth > 100:
        raise ValueError("value nested too deeply")
    t = type(x)
    if x is None or t is bool or t is int or t is str:
        return x
    if t is float:
        return {"f": repr(x)}
    if t is complex:
        return {"c": [repr(x.real), repr(x.imag)]}
    if t is bytes:
        return {"b": x.hex()}
    if t is dict:
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in x.items()]}
    for tag, kind in _TAGS.items():
        if t is kind:
            return {tag: [encode(v, depth + 1) for v in x]}
    raise TypeError("cannot send a value of type " + t.__name__)


def decode(o, depth=0):
    if depth > 100:
        raise ValueError("value nested too deeply")
    t = type(o)
    if o is None or t is bool or t is int or t is str:
        return o
    if t is not dict or len(o) != 1:
        raise ValueError("not plain data")
    (tag, v), = o.items()
    if tag == "f" and type(v) is str:
        return float(v)
    if tag == "c" and type(v) is list and len(v) == 2 and all(type(p) is str for p in v):
        return complex(float(v[0]), float(v[1]))
    if tag == "b" and type(v) is str:
        return bytes.fromhex(v)
    if type(v) is not list:
        raise ValueError("not plain data")
    if tag == "d":
        out = {}
        for pair in v:
            if type(pair) is not list or len(pair) != 2:
                raise ValueError("not plain data")
            out[decode(pair[0], depth + 1)] = decode(pair[1], depth + 1)
        return out
    if tag in _TAGS:
        return _TAGS[tag](decode(x, depth + 1) for x in v)
    raise ValueError("not plain data")


def send(stream, message) -> None:
    stream.write(json.dumps(message).encode() + b"\n")
    stream.flush()


def receive(stream):
    """One message, or ``None`` at end of stream; raises ``ValueError`` on an oversized or malformed line."""
    line = stream.readline(MAX_LINE + 1)
    if not line:
        return None
    if len(line) > MAX_LINE or not line.endswith(b"\n"):
        raise ValueError("message too long")
    return json.loads(line)
