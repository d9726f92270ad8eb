"""Strict readers: each bad input below, hand-written, is one InputError naming the file (and
the tensor), from `open_checkpoint` and from a full merge with it as the base or as a task;
no output or debris is left and no input byte changes. Good files from other writers load."""
import hashlib
import json
import os
import signal
import socket
import stat
import struct
import tempfile

import pytest
import torch
from safetensors.torch import save_file as st_save

import tsvmerge
from tsvmerge.io import InputError, open_checkpoint, save_file

W = '"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}'
B = '"b":{"dtype":"F32","shape":[3],"data_offsets":[24,36]}'
DATA = bytes(range(1, 37))                       # the 36 data bytes W and B describe


def st_bytes(*entries, data=DATA, length=None) -> bytes:
    """A safetensors file from raw header text pieces (joined into one JSON object)."""
    raw = ("{" + ",".join(entries) + "}").encode() if entries and isinstance(entries[0], str) else entries[0]
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def raw_st(raw: bytes, data=DATA, length=None) -> bytes:
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def good_sd(seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(2, 3, generator=g), "b": torch.randn(3, generator=g)}


# --- makers: each writes a bad input under `d` and returns (path to pass, file the error names) ---

def file_of(content: bytes, name="bad.safetensors"):
    def make(d):
        (d / name).write_bytes(content)
        return d / name, d / name
    return make


def fifo(name):
    def make(d):
        os.mkfifo(d / name)
        return d / name, d / name
    return make


def link_to(target, name):
    def make(d):
        os.symlink(target, d / name)
        return d / name, d / name
    return make


def unix_socket(name):
    def make(d):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(d / name))
        s.close()
        return d / name, d / name
    return make


def folder_with(name, make_inner):
    """A model folder whose `name` entry is made by `make_inner(folder)`."""
    def make(d):
        (d / "model").mkdir()
        make_inner(d / "model" / name)
        return d / "model", d / "model" / name
    return make


def torch_file(obj, name="bad.pt", **kw):
    def make(d):
        torch.save(obj, d / name, **kw)
        return d / name, d / name
    return make


def sharded(weight_map=None, *, index_text=None, shards=None, named="index", extra=None):
    """A folder with shards a.safetensors {w} and b.safetensors {b} and an index json.

    `shards` replaces shard contents (name -> bytes or a maker of the path); `extra(d)` adds files
    outside the folder; `named` picks the file the error must name: "index" or a shard name.
    """
    def make(d):
        folder = d / "model"
        folder.mkdir()
        sd = good_sd()
        contents = {"a.safetensors": {"w": sd["w"]}, "b.safetensors": {"b": sd["b"]}}
        for shard, tensors in contents.items():
            save_file(tensors, str(folder / shard))
        for shard, content in (shards or {}).items():
            if (folder / shard).exists():
                os.unlink(folder / shard)
            content(folder / shard) if callable(content) else (folder / shard).write_bytes(content)
        if extra:
            extra(d)
        index = folder / "model.safetensors.index.json"
        wm = {"w": "a.safetensors", "b": "b.safetensors"} if weight_map is None else weight_map
        index.write_text(index_text if index_text is not None else json.dumps({"metadata": {}, "weight_map": wm}))
        return folder, (index if named == "index" else folder / named)
    return make


def _outside(d):
    save_file({"b": good_sd()["b"]}, str(d / "outside.safetensors"))


class Module(torch.nn.Module):
    pass


DEEP = "[" * 100_000 + "]" * 100_000
TSVC_META = ('"__metadata__":{"format":"tsvmerge.tsvc","tsvmerge_version":"0.1.0","rank":"0.5","spectral":"{}",'
             '"base_fingerprint":"0123456789abcdef"}')

# id -> (maker, tensor the message names or None, words it contains)
CASES = {
    # the 8-byte length and the header's bytes
    "empty file": (file_of(b""), None, "too short"),
    "7 bytes": (file_of(b"\x10\0\0\0\0\0\0"), None, "too short"),
    "length past the file": (file_of(st_bytes(W, B, length=10_000)), None, "exceeds the file"),
    "length 2^64-1": (file_of(st_bytes(W, B, length=2**64 - 1)), None, "limit"),
    "length over 100 MB": (file_of(st_bytes(W, B, length=100_000_001)), None, "limit"),
    "length zero": (file_of(st_bytes(W, B, length=0)), None, "not valid JSON"),
    "length cuts the JSON": (file_of(st_bytes(W, B, length=30)), None, "not valid JSON"),
    "header not UTF-8": (file_of(raw_st(b'{"\xff\xfe":1}')), None, "UTF-8"),
    "header garbage": (file_of(raw_st(b"garbage!")), None, "not valid JSON"),
    "header trailing junk": (file_of(raw_st(("{" + W + "," + B + "}x").encode())), None, "not valid JSON"),
    "header trailing NUL": (file_of(raw_st(("{" + W + "," + B + "}\0").encode())), None, "not valid JSON"),
    "header an array": (file_of(raw_st(b"[1,2]")), None, "not a JSON object"),
    "header a string": (file_of(raw_st(b'"hello"')), None, "not a JSON object"),
    "header null": (file_of(raw_st(b"null")), None, "not a JSON object"),
    "header deeply nested": (file_of(raw_st(('{"x":' + DEEP + "}").encode(), data=b"")), None, "nests deeper"),
    "shape deeply nested": (file_of(st_bytes(W.replace("[2,3]", "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[2]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]"), B)),
                            None, "nests deeper"),
    "brackets unbalanced": (file_of(raw_st(b'{"a":[[[}')), None, "nests deeper"),
    # duplicate keys, at any level
    "duplicate tensor": (file_of(st_bytes(W, W.replace("[0,24]", "[24,48]"), data=DATA + DATA[:12])), None, "repeats the key 'w'"),
    "duplicate tensor escaped": (file_of(st_bytes(W, B, B.replace('"b"', '"\\u0062"'))), None, "repeats the key 'b'"),
    "duplicate field": (file_of(st_bytes(W.replace('"dtype":"F32"', '"dtype":"F32","dtype":"F16"'), B)), None, "repeats the key 'dtype'"),
    "duplicate metadata key": (file_of(st_bytes('"__metadata__":{"x":"1","x":"2"}', W, B)), None, "repeats the key 'x'"),
    "duplicate __metadata__": (file_of(st_bytes('"__metadata__":{}', '"__metadata__":{}', W, B)), None, "repeats"),
    # __metadata__
    "metadata a list": (file_of(st_bytes('"__metadata__":["a"]', W, B)), None, "__metadata__"),
    "metadata null": (file_of(st_bytes('"__metadata__":null', W, B)), None, "__metadata__"),
    "metadata a string": (file_of(st_bytes('"__metadata__":"x"', W, B)), None, "__metadata__"),
    "metadata int value": (file_of(st_bytes('"__metadata__":{"x":1}', W, B)), None, "__metadata__"),
    "metadata dict value": (file_of(st_bytes('"__metadata__":{"x":{"y":"z"}}', W, B)), None, "__metadata__"),
    "metadata null value": (file_of(st_bytes('"__metadata__":{"x":null}', W, B)), None, "__metadata__"),
    "lone surrogate in a name": (file_of(st_bytes(W.replace('"w"', '"\\ud800"'), B)), None, "not valid Unicode"),
    "lone surrogate in metadata": (file_of(st_bytes('"__metadata__":{"x":"\\udfff"}', W, B)), None, "not valid Unicode"),
    # shapes
    "NaN dim": (file_of(st_bytes(W.replace("[2,3]", "[NaN,3]"), B)), "w", "shape"),
    "Infinity dim": (file_of(st_bytes(W.replace("[2,3]", "[2,Infinity]"), B)), "w", "shape"),
    "-Infinity dim": (file_of(st_bytes(W.replace("[2,3]", "[-Infinity,3]"), B)), "w", "shape"),
    "1e400 dim": (file_of(st_bytes(W.replace("[2,3]", "[1e400]"), B)), "w", "shape"),
    "16.9 dim": (file_of(st_bytes(B.replace("[3]", "[16.9]"), W)), "b", "shape"),
    "2.0 dim": (file_of(st_bytes(W.replace("[2,3]", "[2.0,3]"), B)), "w", "shape"),
    "1e0 dim": (file_of(st_bytes(W.replace("[2,3]", "[2,3e0]"), B)), "w", "shape"),
    "true dim": (file_of(st_bytes(W.replace("[2,3]", "[true,2,3]"), B)), "w", "shape"),
    "-0 dim": (file_of(st_bytes(W.replace("[2,3]", "[2,3,-0]"), B)), "w", "shape"),
    "negative dim": (file_of(st_bytes(W.replace("[2,3]", "[-2,-3]"), B)), "w", "shape"),
    "string dim": (file_of(st_bytes(W.replace("[2,3]", '["2",3]'), B)), "w", "shape"),
    "null dim": (file_of(st_bytes(W.replace("[2,3]", "[null]"), B)), "w", "shape"),
    "shape an object": (file_of(st_bytes(W.replace("[2,3]", '{"a":2}'), B)), "w", "shape"),
    "shape a number": (file_of(st_bytes(W.replace("[2,3]", "6"), B)), "w", "shape"),
    "shape a string": (file_of(st_bytes(W.replace("[2,3]", '"2x3"'), B)), "w", "shape"),
    "dims overflow u64": (file_of(st_bytes(W.replace("[2,3]", "[4294967296,4294967296,4294967296]"), B)), "w", "needs more bytes"),
    "dim 2^64": (file_of(st_bytes(W.replace("[2,3]", "[18446744073709551616]"), B)), "w", "shape"),
    "dim 5000 digits": (file_of(st_bytes(W.replace("[2,3]", "[" + "9" * 5000 + "]"), B)), None, "not valid JSON"),
    "dims past the file": (file_of(st_bytes(W.replace("[2,3]", "[1000000]").replace("[0,24]", "[0,4000000]"), B)), "w", "needs more bytes"),
    "many huge dims": (file_of(st_bytes(W.replace("[2,3]", "[" + ",".join(["4294967295"] * 5000) + "]"), B)), "w", "needs more bytes"),
    # dtypes
    "dtype unknown": (file_of(st_bytes(W.replace("F32", "F128"), B)), "w", "unknown dtype"),
    "dtype lower case": (file_of(st_bytes(W.replace("F32", "f32"), B)), "w", "unknown dtype"),
    "dtype a number": (file_of(st_bytes(W.replace('"F32"', "32"), B)), "w", "unknown dtype"),
    "dtype null": (file_of(st_bytes(W.replace('"F32"', "null"), B)), "w", "unknown dtype"),
    "dtype a list": (file_of(st_bytes(W.replace('"F32"', '["F32"]'), B)), "w", "unknown dtype"),
    "dtype an object": (file_of(st_bytes(W.replace('"F32"', '{"F32":1}'), B)), "w", "unknown dtype"),
    "dtype F8_E4M3": (file_of(st_bytes(W.replace("F32", "F8_E4M3").replace("24]", "6]"),
                                       B.replace("[24,36]", "[6,18]"), data=DATA[:18])), "w", "fp8"),
    "dtype F8_E5M2": (file_of(st_bytes(W.replace("F32", "F8_E5M2").replace("24]", "6]"),
                                       B.replace("[24,36]", "[6,18]"), data=DATA[:18])), "w", "fp8"),
    "dtype U16": (file_of(st_bytes(W.replace("F32", "U16").replace("24]", "12]"),
                                   B.replace("[24,36]", "[12,24]"), data=DATA[:24])), "w", "does not merge"),
    "dtype U64": (file_of(st_bytes(W.replace("F32", "U64").replace("24]", "48]"),
                                   B.replace("[24,36]", "[48,60]"), data=DATA + DATA[:24])), "w", "does not merge"),
    "dtype C64": (file_of(st_bytes(W.replace("F32", "C64").replace("24]", "48]"),
                                   B.replace("[24,36]", "[48,60]"), data=DATA + DATA[:24])), "w", "does not merge"),
    # entries
    "entry extra field": (file_of(st_bytes(W.replace("}", ',"extra":1}'), B)), "w", "exactly the fields"),
    "entry no dtype": (file_of(st_bytes(W.replace('"dtype":"F32",', ""), B)), "w", "exactly the fields"),
    "entry no shape": (file_of(st_bytes(W.replace('"shape":[2,3],', ""), B)), "w", "exactly the fields"),
    "entry no offsets": (file_of(st_bytes(W.replace(',"data_offsets":[0,24]', ""), B)), "w", "exactly the fields"),
    "entry empty": (file_of(st_bytes('"w":{}', B)), "w", "exactly the fields"),
    "entry a list": (file_of(st_bytes('"w":[0,24]', B)), "w", "exactly the fields"),
    "entry a string": (file_of(st_bytes('"w":"F32"', B)), "w", "exactly the fields"),
    "entry null": (file_of(st_bytes('"w":null', B)), "w", "exactly the fields"),
    # data offsets
    "offsets three": (file_of(st_bytes(W.replace("[0,24]", "[0,24,24]"), B)), "w", "data_offsets"),
    "offsets one": (file_of(st_bytes(W.replace("[0,24]", "[24]"), B)), "w", "data_offsets"),
    "offsets floats": (file_of(st_bytes(W.replace("[0,24]", "[0.0,24.0]"), B)), "w", "data_offsets"),
    "offsets negative": (file_of(st_bytes(W.replace("[0,24]", "[-24,0]"), B)), "w", "data_offsets"),
    "offsets bools": (file_of(st_bytes(W.replace("[0,24]", "[false,true]"), B)), "w", "data_offsets"),
    "offsets reversed": (file_of(st_bytes(W.replace("[0,24]", "[24,0]"), B)), "w", "byte range"),
    "offsets an object": (file_of(st_bytes(W.replace("[0,24]", '{"0":24}'), B)), "w", "data_offsets"),
    "offsets strings": (file_of(st_bytes(W.replace("[0,24]", '["0","24"]'), B)), "w", "data_offsets"),
    "offsets 2^64-1": (file_of(st_bytes(W.replace("[0,24]", "[18446744073709551591,18446744073709551615]"), B)), "b", "gap"),
    "range too small": (file_of(st_bytes(W.replace("[0,24]", "[0,20]"), B)), "w", "byte range"),
    "range too large": (file_of(st_bytes(W.replace("[0,24]", "[0,28]"), B.replace("[24,36]", "[28,40]"), data=DATA + b"1234")), "w", "byte range"),
    "tensors overlap fully": (file_of(st_bytes(W, W.replace('"w"', '"v"'), data=DATA[:24])), None, "overlap"),
    "tensors overlap partly": (file_of(st_bytes(W, B.replace("[24,36]", "[20,32]"), data=DATA[:32])), "b", "overlap"),
    "gap between tensors": (file_of(st_bytes(W, B.replace("[24,36]", "[28,40]"), data=DATA + b"1234")), "b", "gap"),
    "gap at the start": (file_of(st_bytes(W.replace("[0,24]", "[4,28]"), B.replace("[24,36]", "[28,40]"), data=DATA + b"1234")), "w", "gap"),
    "bytes after the last tensor": (file_of(st_bytes(W, B, data=DATA + b"extra")), None, "not described"),
    "truncated data": (file_of(st_bytes(W, B, data=DATA[:30])), "b", "truncated"),
    "no tensors, stray data": (file_of(st_bytes('"__metadata__":{}', data=b"12345678")), None, "not described"),
    # files that are not regular files
    "FIFO .safetensors": (fifo("bad.safetensors"), None, "FIFO"),
    "FIFO .pt": (fifo("bad.pt"), None, "FIFO"),
    "FIFO .bin": (fifo("bad.bin"), None, "FIFO"),
    "socket .safetensors": (unix_socket("bad.safetensors"), None, "socket"),
    "link to /dev/zero": (link_to("/dev/zero", "bad.safetensors"), None, "character device"),
    "link to /dev/null .pt": (link_to("/dev/null", "bad.pt"), None, "character device"),
    "dangling link": (link_to("/nonexistent/x.safetensors", "bad.safetensors"), None, "no such file"),
    "folder model.safetensors FIFO": (folder_with("model.safetensors", os.mkfifo), None, "FIFO"),
    "folder model.safetensors a folder": (folder_with("model.safetensors", os.mkdir), None, "folder"),
    "folder pytorch_model.bin FIFO": (folder_with("pytorch_model.bin", os.mkfifo), None, "FIFO"),
    "folder index a FIFO": (folder_with("model.safetensors.index.json", os.mkfifo), None, "FIFO"),
    "folder index a folder": (folder_with("model.safetensors.index.json", os.mkdir), None, "folder"),
    # Hugging Face index
    "index parent path": (sharded({"w": "a.safetensors", "b": "../outside.safetensors"}, extra=_outside), "b", "plain file name"),
    "index absolute path": (sharded({"w": "a.safetensors", "b": "/etc/passwd"}), "b", "plain file name"),
    "index sub-folder": (sharded({"w": "a.safetensors", "b": "sub/b.safetensors"}), "b", "plain file name"),
    "index backslash": (sharded({"w": "a.safetensors", "b": "..\\b.safetensors"}), "b", "plain file name"),
    "index dot": (sharded({"w": "a.safetensors", "b": "."}), "b", "plain file name"),
    "index dot-dot": (sharded({"w": "a.safetensors", "b": ".."}), "b", "plain file name"),
    "index empty name": (sharded({"w": "a.safetensors", "b": ""}), "b", "plain file name"),
    "index NUL in name": (sharded({"w": "a.safetensors", "b": "b.safetensors\0x"}), "b", "plain file name"),
    "index value a number": (sharded({"w": "a.safetensors", "b": 1}), "b", "not a file name"),
    "index value null": (sharded({"w": "a.safetensors", "b": None}), "b", "not a file name"),
    "index value a list": (sharded({"w": "a.safetensors", "b": ["b.safetensors"]}), "b", "not a file name"),
    "weight_map a list": (sharded(index_text='{"weight_map":["a.safetensors"]}'), None, "weight_map"),
    "weight_map a string": (sharded(index_text='{"weight_map":"a.safetensors"}'), None, "weight_map"),
    "weight_map missing": (sharded(index_text='{"metadata":{}}'), None, "weight_map"),
    "weight_map empty": (sharded(index_text='{"weight_map":{}}'), None, "weight_map"),
    "index an array": (sharded(index_text="[]"), None, "weight_map"),
    "index not JSON": (sharded(index_text="weight_map: a"), None, "not valid JSON"),
    "index empty": (sharded(index_text=""), None, "not valid JSON"),
    "index deeply nested": (sharded(index_text='{"metadata":' + DEEP + "}"), None, "nests deeper"),
    "index duplicate tensor": (sharded(index_text='{"weight_map":{"w":"a.safetensors","b":"b.safetensors",'
                                                  '"w":"b.safetensors"}}'), None, "repeats the key 'w'"),
    "index duplicate weight_map": (sharded(index_text='{"weight_map":{"w":"a.safetensors"},"weight_map":'
                                                      '{"w":"a.safetensors","b":"b.safetensors"}}'), None, "repeats"),
    "shard missing": (sharded({"w": "a.safetensors", "b": "c.safetensors"}), "b", "missing"),
    "shard a FIFO": (sharded(shards={"b.safetensors": os.mkfifo}, named="b.safetensors"), None, "FIFO"),
    "shard a folder": (sharded(shards={"b.safetensors": os.mkdir}, named="b.safetensors"), None, "folder"),
    "shard links to /dev/zero": (sharded(shards={"b.safetensors": lambda p: os.symlink("/dev/zero", p)},
                                         named="b.safetensors"), None, "character device"),
    "shard unknown type": (sharded({"w": "a.safetensors", "b": "model.safetensors.index.json"}),
                           None, "unknown file type"),
    "tensor not in its shard": (sharded({"w": "a.safetensors", "b": "a.safetensors"}, named="a.safetensors"),
                                "b", "not in this shard"),
    "shard tensor unlisted": (sharded(shards={"b.safetensors": st_bytes(B.replace("[24,36]", "[0,12]"), W.replace(
        '"w"', '"x"').replace("[0,24]", "[12,36]"))}, named="b.safetensors"), "x", "does not list it"),
    "shard holds another's tensor": (sharded(shards={"b.safetensors": st_bytes(B.replace("[24,36]", "[0,12]"), W.replace(
        "[0,24]", "[12,36]"))}, named="b.safetensors"), "w", "does not list it"),
    "shard with a bad header": (sharded(shards={"b.safetensors": st_bytes(B.replace("[3]", "[16.9]"), data=DATA[24:])},
                                        named="b.safetensors"), "b", "shape"),
    "shard a TSV-C file": (sharded(shards={"b.safetensors": st_bytes(TSVC_META, B.replace("[24,36]", "[0,12]"), data=DATA[24:])},
                                   named="b.safetensors"), None, "TSV-C"),
    # PyTorch files
    "pt garbage": (file_of(b"not a checkpoint at all", "bad.pt"), None, "cannot load"),
    "pt empty": (file_of(b"", "bad.pt"), None, "cannot load"),
    "pt safetensors inside": (file_of(st_bytes(W, B), "bad.pt"), None, "cannot load"),
    "pt truncated zip": (lambda d: _truncated_pt(d), None, "cannot load"),
    "pt whole module": (torch_file(torch.nn.Linear(2, 3)), None, "torch.nn.modules.linear.Linear"),
    "pt custom class": (torch_file({"w": torch.ones(2), "m": Module()}), None, "Module"),
    "pt legacy whole module": (torch_file(torch.nn.Linear(2, 3), _use_new_zipfile_serialization=False), None, "Linear"),
    "pt a list": (torch_file([torch.ones(2)]), None, "state dict"),
    "pt a string": (torch_file("hello"), None, "state dict"),
    "pt empty dict": (torch_file({}), None, "state dict"),
    "pt int value": (torch_file({"w": torch.ones(2), "step": 3}), "step", "not a tensor"),
    "pt None value": (torch_file({"w": torch.ones(2), "x": None}), "x", "not a tensor"),
    "pt nested dict": (torch_file({"enc": {"w": torch.ones(2)}}), "enc", "nested dict"),
    "pt non-string key": (torch_file({0: torch.ones(2)}), "0", "strings"),
    "pt sparse COO": (torch_file({"w": torch.ones(2), "s": torch.eye(3).to_sparse()}), "s", "sparse_coo"),
    "pt sparse CSR": (torch_file({"s": torch.eye(3).to_sparse_csr()}), "s", "sparse_csr"),
    "pt fp8 e4m3": (torch_file({"w": torch.ones(2, dtype=torch.float8_e4m3fn)}), "w", "fp8"),
    "pt fp8 e5m2": (torch_file({"w": torch.ones(2, dtype=torch.float8_e5m2)}), "w", "fp8"),
    "pt complex": (torch_file({"w": torch.ones(2, dtype=torch.complex64)}), "w", "does not merge"),
    "pt uint16": (torch_file({"w": torch.ones(2, dtype=torch.uint16)}), "w", "does not merge"),
    "pt meta tensor": (torch_file({"w": torch.empty(2, 3, device="meta")}), "w", "meta"),
    "pt wrapped sparse": (torch_file({"state_dict": {"s": torch.eye(2).to_sparse()}}), "s", "sparse"),
}


def _truncated_pt(d):
    torch.save(good_sd(), d / "bad.pt")
    content = (d / "bad.pt").read_bytes()
    (d / "bad.pt").write_bytes(content[: len(content) // 2])
    return d / "bad.pt", d / "bad.pt"


def snapshot(root):
    """Every entry under `root` (not following links) with its kind, and the hash of each regular file."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            mode = os.lstat(p).st_mode
            if stat.S_ISREG(mode):
                with open(p, "rb") as f:
                    out[p] = hashlib.sha256(f.read()).hexdigest()
            else:
                out[p] = stat.S_IFMT(mode)
    return out


@pytest.fixture
def alarm():
    """A reader that blocks (on a FIFO) fails the test instead of hanging it."""
    def timeout(*_):
        pytest.fail("the reader blocked")          # not an OSError, which a reader may catch
    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def expect_named(call, named, tensor, words):
    with pytest.raises(InputError) as err:
        call()
    msg = str(err.value)
    assert str(named) in msg, msg
    if tensor is not None:
        assert f"tensor '{tensor}'" in msg, msg
    assert words in msg, msg
    assert "\n" not in msg and "\x1b" not in msg, msg
    return msg


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_named_error_and_leaves_nothing(tmp_path, case, alarm):
    make, tensor, words = CASES[case]
    (tmp_path / "in").mkdir()
    (tmp_path / "good").mkdir()
    good = str(tmp_path / "good" / "good.safetensors")
    save_file(good_sd(1), good)
    bad, named = make(tmp_path / "in")
    before = snapshot(tmp_path)

    expect_named(lambda: open_checkpoint(str(bad)), named, tensor, words)
    out = str(tmp_path / "out")
    expect_named(lambda: tsvmerge.merge(str(bad), [good], backend="reference", out=out), named, tensor, words)
    expect_named(lambda: tsvmerge.merge(good, [str(bad)], backend="reference", out=out), named, tensor, words)
    assert snapshot(tmp_path) == before          # no output, no debris, every input byte the same


def test_there_are_enough_cases():
    assert len(CASES) >= 80


def test_unreadable_file_is_a_named_error(tmp_path):
    """Permissions: as root (which reads anything) the check runs in a child that drops to nobody."""
    path = tmp_path / "locked.safetensors"
    save_file(good_sd(), str(path))
    path.chmod(0)
    if os.geteuid() != 0:
        expect_named(lambda: open_checkpoint(str(path)), path, None, "Permission denied")
        return
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:   # pytest's tmp_path is private to root
        os.chmod(folder, 0o755)
        path = os.path.join(folder, "locked.safetensors")
        save_file(good_sd(), path)
        os.chmod(path, 0)
        assert _open_as_nobody(path) == f"{path}: cannot read: Permission denied"


def _open_as_nobody(path: str) -> str:
    """open_checkpoint(path) in a forked child running as user nobody: its error message."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child never returns into pytest
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            try:
                open_checkpoint(path)
                msg = "opened"
            except InputError as e:
                msg = str(e)
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                msg = f"{type(e).__name__}: {e}"
            os.write(write, msg.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        msg = f.read().decode()
    os.waitpid(pid, 0)
    return msg


# --- good files: what other writers produce must still load, value for value ---

def _all_dtypes(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, generator=g)
    return {"f64": x.double(), "f32": x, "f16": x.half(), "bf16": x.bfloat16(),
            "i64": (x * 100).long(), "i32": (x * 100).int(), "i16": (x * 100).short(), "i8": (x * 10).to(torch.int8),
            "u8": (x * 10).abs().to(torch.uint8), "bool": x > 0, "scalar": torch.tensor(3.5),
            "empty": torch.empty(0, 4), "odd": torch.randn(7, 1, 3, generator=g)}


def assert_same(ckpt, expected):
    assert set(ckpt.infos()) == set(expected)
    for name, t in expected.items():
        got = ckpt.read(name)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name


def test_files_from_the_safetensors_package_load(seed, tmp_path):
    sd = _all_dtypes(seed)
    st_save(sd, str(tmp_path / "x.safetensors"), metadata={"format": "pt", "note": "é"})
    ck = open_checkpoint(str(tmp_path / "x.safetensors"))
    assert ck.metadata == {"format": "pt", "note": "é"}
    assert_same(ck, sd)


def test_lenient_but_valid_headers_load(tmp_path):
    """Keys in any order, data in another order, whitespace around the JSON, zero-size tensors
    sharing an offset, an empty __metadata__, non-ASCII names: all valid safetensors."""
    v = '"v":{"dtype":"F32","shape":[0],"data_offsets":[24,24]}'
    z = '"é✓":{"dtype":"U8","shape":[0,5],"data_offsets":[24,24]}'
    text = " \n{" + ",".join([B, '"__metadata__":{}', v, W, z]) + "}   \t"
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw_st(text.encode()))
    ck = open_checkpoint(str(path))
    assert ck.infos()["é✓"].shape == (0, 5)
    assert torch.equal(ck.read("w").view(torch.uint8).reshape(-1), torch.tensor(list(DATA[:24]), dtype=torch.uint8))
    assert torch.equal(ck.read("b").view(torch.uint8), torch.tensor(list(DATA[24:]), dtype=torch.uint8))


def test_torch_saves_load(seed, tmp_path):
    sd = _all_dtypes(seed)
    torch.save(sd, tmp_path / "zip.pt")
    torch.save(sd, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    torch.save({"state_dict": {k: torch.nn.Parameter(v) if v.is_floating_point() else v for k, v in sd.items()},
                "epoch": 3}, tmp_path / "wrapped.ckpt")
    for name in ("zip.pt", "legacy.bin", "wrapped.ckpt"):
        assert_same(open_checkpoint(str(tmp_path / name)), sd)


def test_hf_sharded_folder_with_linked_shards_loads(seed, tmp_path):
    """As in a Hugging Face cache: the folder's shards are links to blobs elsewhere."""
    sd = _all_dtypes(seed)
    names = sorted(sd)
    (tmp_path / "blobs").mkdir()
    (tmp_path / "snap").mkdir()
    weight_map = {}
    for i, part in enumerate((names[:5], names[5:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        st_save({k: sd[k] for k in part}, str(tmp_path / "blobs" / f"blob{i}"))
        os.symlink(f"../blobs/blob{i}", tmp_path / "snap" / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": 123}, "weight_map": weight_map}
    (tmp_path / "snap" / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_same(open_checkpoint(str(tmp_path / "snap")), sd)
    # and a linked single file, passed directly
    os.symlink(tmp_path / "blobs" / "blob0", tmp_path / "one.safetensors")
    assert_same(open_checkpoint(str(tmp_path / "one.safetensors")), {k: sd[k] for k in names[:5]})


def test_hostile_names_print_on_one_line(tmp_path):
    name = "evil\n\x1b[31mred" + "x" * 5000
    text = json.dumps({name: {"dtype": "F32", "shape": [16.9], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "x.safetensors").write_bytes(raw_st(text, data=b"1234"))
    msg = expect_named(lambda: open_checkpoint(str(tmp_path / "x.safetensors")), tmp_path / "x.safetensors",
                       None, "shape")
    assert "evil\\n\\x1b[31mred" in msg and len(msg) < 1000
