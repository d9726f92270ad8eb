"""Fuzzing the safetensors header reader and the index reader with hypothesis.

Valid files are built, then mutated (JSON values, numbers, keys, bytes, the length prefix,
the data). Whatever comes out: reading raises nothing but InputError; memory follows the
bytes present, never the sizes a header claims; and every file we accept, the safetensors
package reads the same (we are never more lenient than the format).

Memory, measured: tracemalloc's peak while opening must stay under `ALLOC_PER_BYTE` times
the file's size plus `ALLOC_FIXED`. Seen: ~4x for large headers, ~5 KB for tiny ones, and
once in several hundred opens ~20-50 KB (interpreter tables growing; a rerun is back to
5 KB). A 100-byte file claiming 2^64 header bytes or dims [2^32]^3 must stay that small.
Tensor data is not traced by tracemalloc (torch allocates it), so it is checked by
construction: an accepted file's tensors add up to at most its size, and each read
allocates one tensor.
"""
import gc
import json
import os
import re
import struct
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors import deserialize

from tsvmerge.io import InputError, open_checkpoint, save_file
from tsvmerge.io.safetensors import DTYPES, OTHER_DTYPES

ALLOC_PER_BYTE = 8
ALLOC_FIXED = 64 * 1024


def fuzz(examples: int):
    """Reproducible in CI: derandomized, no example database, no per-example deadline."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --- valid files ---

names = st.text(st.sampled_from("ab.0_é✓\"\\\n"), min_size=1, max_size=6)
shapes = st.lists(st.integers(0, 4), max_size=3)
tensors = st.dictionaries(names.filter(lambda n: n != "__metadata__"),
                          st.tuples(st.sampled_from(sorted(DTYPES)), shapes), min_size=1, max_size=5)
metadata = st.none() | st.dictionaries(names, st.text(max_size=6), max_size=3)


@st.composite
def valid_header(draw):
    """(header dict in file order, data bytes): offsets tile the data in a drawn order."""
    entries = draw(tensors)
    order = draw(st.permutations(sorted(entries)))
    header, pos = {}, 0
    for name in order:
        dtype, shape = entries[name]
        n = DTYPES[dtype].itemsize
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    meta = draw(metadata)
    if meta is not None:
        header = {"__metadata__": meta, **header}
    if draw(st.booleans()):
        header = dict(reversed(header.items()))          # file order need not be data order
    seed = draw(st.integers(0, 255))
    return header, bytes((seed + 7 * i) % 256 for i in range(pos))


# --- mutations ---

nasty_numbers = (st.sampled_from(["-1", "0", "1", "16.9", "2.0", "1e400", "-1e400", "1e2", "NaN", "Infinity",
                                 "-Infinity", "18446744073709551615", "18446744073709551616", "4294967296",
                                 "9" * 30, "true", "false", "null", "-0", "0.0"]) | st.integers(-2**70, 2**70).map(str)
                 | st.integers(0, 64).map(str))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8) | st.sampled_from(sorted(DTYPES) + list(OTHER_DTYPES) + ["F128", "f32", "../x", "/etc"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8)


def _paths(obj, prefix=()):
    """Every path to a value inside nested dicts and lists."""
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


@st.composite
def replace_value(draw, obj):
    paths = [p for p in _paths(obj) if p]
    if not paths:
        return json.dumps(obj)
    path = draw(st.sampled_from(paths))
    obj = json.loads(json.dumps(obj))
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = draw(json_values)
    return json.dumps(obj, ensure_ascii=draw(st.booleans()))


@st.composite
def edit_keys(draw, obj):
    """Drop, add, rename or duplicate a key of some object (duplicates only exist as text)."""
    dicts = [p for p in _paths(obj) if isinstance(_at(obj, p), dict) and _at(obj, p)]
    if not dicts:
        return json.dumps(obj)
    path = draw(st.sampled_from(dicts))
    obj = json.loads(json.dumps(obj))
    target = _at(obj, path)
    key = draw(st.sampled_from(sorted(target)))
    how = draw(st.sampled_from(["drop", "add", "rename", "duplicate"]))
    if how == "drop":
        del target[key]
    elif how == "add":
        target[draw(st.text(max_size=6))] = draw(json_values)
    elif how == "rename":
        target[draw(st.text(max_size=6))] = target.pop(key)
    else:
        marker = "\0DUP\0"
        target[marker] = target[key]
        text = json.dumps(obj)
        return text.replace(json.dumps(marker), json.dumps(key), 1)
    return json.dumps(obj)


def _at(obj, path):
    for k in path:
        obj = obj[k]
    return obj


@st.composite
def edit_number(draw, text):
    numbers = list(re.finditer(r"-?\d+(\.\d+)?([eE][-+]?\d+)?", text))
    if not numbers:
        return text
    m = draw(st.sampled_from(numbers))
    n = m.group()
    respelled = [f"{n}.0", f"{n}e0", f"{n}E+0", f"0{n}", "-0" if n == "0" else f"-{n}"]  # same value, other spelling
    return text[: m.start()] + draw(st.sampled_from(respelled) | nasty_numbers) + text[m.end():]


@st.composite
def edit_bytes(draw, raw: bytes):
    raw = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(raw)))
        how = draw(st.sampled_from(["flip", "insert", "delete"]))
        if how == "insert" or not raw:
            raw[at:at] = draw(st.binary(min_size=1, max_size=3) | st.sampled_from([b"[", b"{", b'"', b"\\", b","]))
        elif how == "flip":
            raw[min(at, len(raw) - 1)] ^= 1 << draw(st.integers(0, 7))
        else:
            del raw[min(at, len(raw) - 1)]
    return bytes(raw)


@st.composite
def mutated_text(draw, obj) -> bytes:
    """The JSON text of `obj`, with one structural edit, then maybe number and byte edits."""
    text = draw(st.one_of(replace_value(obj), edit_keys(obj), st.just(json.dumps(obj))))
    if draw(st.booleans()):
        text = draw(edit_number(text))
    if draw(st.integers(0, 7)) == 0:
        nest = draw(st.sampled_from([2, 8, 17, 40, 3000]))
        text = text.replace("[", "[" * nest, 1).replace("]", "]" * nest, 1)
    raw = text.encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        raw = draw(edit_bytes(raw))
    return raw + b" " * draw(st.integers(0, 7))


@st.composite
def mutated_file(draw) -> bytes:
    header, data = draw(valid_header())
    if draw(st.integers(0, 9)) == 0:                     # some valid files, to compare with the package
        return struct.pack("<Q", len(json.dumps(header))) + json.dumps(header).encode() + data
    raw = draw(mutated_text(header))
    length = len(raw)
    how = draw(st.sampled_from(["keep", "keep", "keep", "length", "data"]))
    if how == "length":
        length = draw(st.sampled_from([0, 1, 2**64 - 1, 100_000_001, 2**63]) | st.integers(0, len(raw) + 64)
                      | st.integers(0, 2**64 - 1))
    elif how == "data":
        data = data[: draw(st.integers(0, len(data)))] + draw(st.binary(max_size=16))
    return struct.pack("<Q", length) + raw + data


# --- the properties ---

def write_and_open(path: str, content: bytes, source: str):
    """Write `content` to `path` and open `source`: the checkpoint, or None when refused.

    Refused means one InputError line naming `source`; either way tracemalloc's peak while
    opening stays within the bound. Traced only around the open: tracing hypothesis itself
    would slow the run tenfold."""
    with open(path, "wb") as f:
        f.write(content)
    gc.disable()                      # a collection here would run other objects' finalizers
    tracemalloc.start()
    try:
        result = open_checkpoint(source)
    except InputError as e:
        result = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        gc.enable()
    assert peak <= ALLOC_PER_BYTE * len(content) + ALLOC_FIXED, (peak, len(content))
    if isinstance(result, InputError):
        assert str(source) in str(result) and "\n" not in str(result)
        return None
    return result


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A scratch folder, after one good and one bad open: first calls fill caches, which the
    memory bound is not about."""
    folder = tmp_path_factory.mktemp("fuzz")
    save_file({"w": torch.ones(2)}, str(folder / "warm.safetensors"))
    open_checkpoint(str(folder / "warm.safetensors"))
    (folder / "bad.safetensors").write_bytes(b"\x02\0\0\0\0\0\0\0[]")
    with pytest.raises(InputError):
        open_checkpoint(str(folder / "bad.safetensors"))
    return folder


@fuzz(2000)
@given(content=mutated_file())
def test_safetensors_header_fuzz(folder, content):
    path = os.path.join(folder, "x.safetensors")
    ckpt = write_and_open(path, content, path)
    if ckpt is None:
        return
    infos = ckpt.infos()
    assert sum(i.nbytes for i in infos.values()) <= len(content)
    theirs = dict(deserialize(content))               # the format's own reader accepts it too
    assert set(theirs) == set(infos)
    for name, info in infos.items():
        t = ckpt.read(name)
        assert list(t.shape) == theirs[name]["shape"] and info.dtype == DTYPES[theirs[name]["dtype"]]
        assert t.reshape(-1).view(torch.uint8).numpy().tobytes() == bytes(theirs[name]["data"])


SHARDS = {"a.safetensors": {"w": torch.arange(6.0).reshape(2, 3)}, "b-1.safetensors": {"b": torch.arange(3.0)},
          "c.safetensors": {"x": torch.ones(2, dtype=torch.bfloat16), "y": torch.arange(4, dtype=torch.int64)}}
INDEX = {"metadata": {"total_size": 80}, "weight_map": {"w": "a.safetensors", "b": "b-1.safetensors",
                                                        "x": "c.safetensors", "y": "c.safetensors"}}


@pytest.fixture(scope="module")
def model(folder):
    (folder / "model").mkdir()
    (folder / "model" / "sub").mkdir()
    for shard, tensors in SHARDS.items():
        save_file(tensors, str(folder / "model" / shard))
        save_file(tensors, str(folder / "model" / "sub" / shard))   # a path to a valid file must still fail
        save_file(tensors, str(folder / shard))
    return folder / "model"


index_names = st.sampled_from(["../a.safetensors", "/etc/passwd", "sub/a.safetensors", "", ".", "..",
                               "a.safetensors/", "./a.safetensors", "c.safetensors\0", "..\\a.safetensors",
                               "model.safetensors.index.json", "missing.safetensors"]) | st.text(max_size=6)


@st.composite
def mutated_index(draw, index=INDEX):
    index = json.loads(json.dumps(index))
    if draw(st.booleans()):
        name = draw(st.sampled_from(sorted(index["weight_map"])))
        index["weight_map"][name] = draw(index_names)
    return draw(mutated_text(index))


@fuzz(1000)
@given(raw=mutated_index())
def test_index_fuzz(model, raw):
    ckpt = write_and_open(os.path.join(model, "model.safetensors.index.json"), raw, str(model))
    if ckpt is None:
        return
    wm = json.loads(raw)["weight_map"]                 # accepted: exactly the listed tensors, each from its shard
    assert set(ckpt.infos()) == set(wm) and all(os.path.basename(f) == f for f in wm.values())
    for name, shard in wm.items():
        assert torch.equal(ckpt.read(name), SHARDS[shard][name])
