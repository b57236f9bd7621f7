"""The grader's reading of replies from the (hostile) sandbox: autograder.sandbox.wire.

Hostile frames are built in-process with torch.save, pickle and zipfile; no sandbox is needed.
Where an attack relies on torch.load accepting something, the test checks that it does, so that
the rejection proves something.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import tracemalloc
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from autograder.sandbox import wire
from autograder.sandbox.wire import MessageLimits, WireError, clean_text, read_message

MiB = 2**20


# -- helpers -------------------------------------------------------------------------------------

def frame(obj) -> bytes:
    """What the sandbox sends after the length header: torch.save bytes."""
    return wire.encode(obj)[wire.HEADER.size:]


def torch_load(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def rezip(data: bytes, compression=zipfile.ZIP_STORED) -> bytes:
    """The same archive entries, written again by Python's zipfile."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    return out.getvalue()


def archive(pkl: bytes, records: dict | None = None) -> bytes:
    """A minimal archive torch.load accepts, around a hand-made pickle."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        for key, data in (records or {}).items():
            z.writestr(f"archive/data/{key}", data)
    return out.getvalue()


class FakeStorage:
    """Pickled as torch.save pickles a storage, with whatever size it claims."""

    def __init__(self, key: str, nbytes: int):
        self.key, self.nbytes = key, nbytes


class FakeTensor:
    """Pickled as torch.save pickles a tensor: any size, stride and offset over a FakeStorage."""

    def __init__(self, storage: FakeStorage, size, stride, offset=0):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", torch.ByteStorage, obj.key, "cpu", obj.nbytes)
        return None


def crafted(obj, records: dict | None = None) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return archive(buf.getvalue(), records)


def same(a, b) -> bool:
    """Exactly equal, types included (1 vs True vs 1.0, tuple vs list, -0.0 vs 0.0)."""
    if type(a) is not type(b):
        return False
    if type(a) is torch.Tensor:
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if type(a) in (list, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return len(a) == len(b) and all(same(k1, k2) and same(v1, v2)
                                        for (k1, v1), (k2, v2) in zip(a.items(), b.items()))
    if type(a) is float:
        return repr(a) == repr(b)
    return a == b


def nested_lists(depth: int):
    obj = 0
    for _ in range(depth):
        obj = [obj]
    return obj


def shared_bomb(depth: int, fan_out: int):
    """a=[0]; b=[a,a,a]; c=[b,b,b]...: a few bytes per level, fan_out**depth paths."""
    obj = [0]
    for _ in range(depth):
        obj = [obj] * fan_out
    return obj


def cheap(fn, *args, megabytes: int | None = 50):
    """Run fn, expecting a WireError; then again under tracemalloc for its peak memory, unless
    megabytes is None. Return the error's message. Time is not asserted (tests time nothing): the
    reader's work is bounded by its budgets (values visited, depth, bytes), and the message says
    which budget refused the input; bench/seam.py measures speed."""
    with pytest.raises(WireError) as info:
        fn(*args)
    if megabytes is None:
        return str(info.value)
    tracemalloc.start()
    try:
        with pytest.raises(WireError):
            fn(*args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < megabytes * MiB, f"peaked at {peak / MiB:.0f} MiB"
    return str(info.value)


# -- honest messages -----------------------------------------------------------------------------

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
          torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128]


def test_honest_replies_round_trip_exactly():
    x = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    replies = [
        {"ok": True, "out": {wire.TENSOR: 0}, "requires_grad": [False],
         "tensors": [torch.randn(2, 3)], "stdout": "hi\n", "stderr": "", "error": None},
        {"ok": True, "tensors": [x, x.t(), x[:, ::2], x[1]], "out": (({wire.TENSOR: 0},), [{wire.TENSOR: 1}],
                                                              {wire.NOT_A_TENSOR: "numpy.ndarray"})},
        {"ok": True, "handle": 1, "names": ["w", "b"], "is_param": [True, False],
         "state": [torch.ones(2, 2), torch.zeros(2, dtype=torch.int64)]},
        {"ok": True, "grads": [None, torch.tensor([True, False]), torch.zeros(0, 5), torch.tensor(3.5)]},
        {"ok": False, "error": "ValueError: nope", "mro": ["ValueError", "Exception"],
         "traceback": "Traceback ...", "stdout": "", "stderr": ""},
        {"ok": True, "out": (1, -2**63, 2**63 - 1, 1.5, float("inf"), float("nan"), -0.0, True, None, "é\u20ac")},
        {"ok": True, "keys": {1: "a", 2.5: "b", True: "c", None: "d", "e": "e"}},
        {"ok": True, "tensors": [torch.arange(6).reshape(2, 3).to(dtype) for dtype in DTYPES]},
    ]
    for reply in replies:
        back = read_message(frame(reply))
        assert same(back, reply), reply


def test_non_contiguous_tensors_keep_their_layout():
    x = torch.arange(12.0).reshape(3, 4)
    back = read_message(frame({"t": [x.t(), x[:, 1::2]]}))["t"]
    assert same(back[0], x.t()) and back[0].stride() == x.t().stride()
    assert same(back[1], x[:, 1::2])


def test_the_result_is_a_fresh_tree():
    t = torch.ones(3, requires_grad=True)
    inner = [1, 2]
    reply = read_message(frame({"a": inner, "b": inner, "t": [t, t, t[:2]]}))
    assert reply["a"] == reply["b"] and reply["a"] is not reply["b"]
    t0, t1, t2 = reply["t"]
    assert len({t0.untyped_storage().data_ptr(), t1.untyped_storage().data_ptr(),
                t2.untyped_storage().data_ptr()}) == 3
    assert not any(x.requires_grad for x in reply["t"])


def test_old_call_signatures_still_work():
    data = frame({"ok": True, "tensors": [torch.ones(10)]})
    back = wire.validate(wire.decode(data, max_bytes=MiB), max_tensor_bytes=MiB)
    assert same(back, {"ok": True, "tensors": [torch.ones(10)]})
    with pytest.raises(WireError):
        wire.validate(wire.decode(data), max_tensor_bytes=39)


# -- attack 1: shared references -----------------------------------------------------------------

def test_shared_reference_bomb_is_rejected_fast_and_small():
    data = frame({"ok": True, "out": shared_bomb(19, 3)})   # the reproduced 1.4 KB reply
    assert len(data) < 2000
    cheap(read_message, data)


def test_shared_reference_bomb_within_the_depth_limit_runs_out_of_nodes():
    data = frame({"ok": True, "out": shared_bomb(10, 10)})   # 10**10 paths, 10 levels
    assert "too many values" in cheap(read_message, data)


# -- attack 2: compression, and other ways to unpack more than was sent --------------------------

def test_deflated_archive_is_rejected():
    honest = frame({"ok": True, "tensors": [torch.zeros(MiB)]})
    deflated = rezip(honest, zipfile.ZIP_DEFLATED)
    assert len(deflated) < len(honest) // 100
    assert same(torch_load(deflated)["tensors"][0], torch.zeros(MiB))   # torch.load accepts it
    assert same(read_message(rezip(honest)), torch_load(honest))        # stored: fine
    assert "compressed" in cheap(read_message, deflated)


def test_overlapping_entries_count_every_time():
    """Central-directory entries for data/0 and data/1 share one local record: torch.load reads
    it twice, so a 1 MiB frame becomes 2 MiB of storages (or 10 000 times, with 10 000 names)."""
    n = MiB
    data = crafted([FakeTensor(FakeStorage("0", n), (n,), (1,)), FakeTensor(FakeStorage("1", n), (n,), (1,))],
                   {"0": bytes(range(256)) * (n // 256)})
    sig, disk, cd_disk, n_here, count, cd_size, cd_offset, comment = struct.unpack("<4s4H2LH", data[-22:])
    cd = data[cd_offset:cd_offset + cd_size]
    at = cd.index(b"archive/data/0") - 46
    name_len, extra_len, comment_len = struct.unpack("<3H", cd[at + 28:at + 34])
    cd += cd[at:at + 46 + name_len + extra_len + comment_len].replace(b"archive/data/0", b"archive/data/1")
    data = data[:cd_offset] + cd + struct.pack("<4s4H2LH", sig, disk, cd_disk, count + 1, count + 1,
                                               len(cd), cd_offset, 0)
    loaded = torch_load(data)
    assert sum(t.numel() for t in loaded) == 2 * n and len(data) < 1.01 * n
    limits = MessageLimits(max_bytes=3 * n // 2)
    assert "unpacked" in cheap(read_message, data, limits)
    assert len(read_message(data)) == 2


def test_storage_declared_larger_than_its_record_is_rejected():
    data = crafted([FakeTensor(FakeStorage("0", 2**36), (4,), (1,))], {"0": bytes(16)})
    cheap(read_message, data)


def test_total_logical_tensor_bytes_is_bounded():
    many_views = frame({"ok": True, "tensors": [torch.zeros(1).expand(MiB)] * 100})   # 400 MiB
    assert len(many_views) < 10_000
    assert "size limit" in cheap(read_message, many_views)
    base = torch.arange(110_000.0)
    overlapping = frame({"ok": True, "tensors": [base.as_strided((100_000, 1000), (1, 1))]})   # 400 MB
    assert "size limit" in cheap(read_message, overlapping)
    huge_view = crafted([FakeTensor(FakeStorage("0", 1), (2**30, 2**30), (0, 0))], {"0": b"\0"})
    assert torch_load(huge_view)[0].shape == (2**30, 2**30)
    assert "size limit" in cheap(read_message, huge_view)
    few_views = read_message(frame([torch.arange(3).expand(2, 3)] * 2))
    assert same(few_views, [torch.arange(3).expand(2, 3)] * 2) and few_views[0] is not few_views[1]


def test_frame_longer_than_the_limit_is_rejected():
    data = frame({"ok": True, "tensors": [torch.zeros(1000)]})
    with pytest.raises(WireError, match="too large"):
        read_message(data, MessageLimits(max_bytes=len(data) - 1))
    read_message(data, MessageLimits(max_bytes=len(data)))


def test_pickle_size_is_limited():
    data = frame({"ok": True, "out": list(range(1000))})
    with pytest.raises(WireError, match="structure is too large"):
        read_message(data, MessageLimits(max_pickle_bytes=2000))
    read_message(data, MessageLimits(max_pickle_bytes=5000))


def test_number_of_archive_entries_is_limited():
    data = frame({"ok": True, "tensors": [torch.ones(1) for _ in range(20)]})   # 20 storages + 6
    entries = len(zipfile.ZipFile(io.BytesIO(data)).infolist())
    assert entries > 20
    with pytest.raises(WireError, match="too many parts"):
        read_message(data, MessageLimits(max_entries=entries - 1))
    read_message(data, MessageLimits(max_entries=entries))


# -- what torch.load would do before any check of ours ------------------------------------------

BYTEARRAY = b"\x80\x02cbuiltins\nbytearray\nK\x10\x85R."                 # bytearray(16)


def codec_doubling(levels: int) -> bytes:
    """_codecs.encode(..., "hex") applied `levels` times: twice the bytes per level."""
    body = b"c_codecs\nencode\nX\x04\x00\x00\x00abcdX\x06\x00\x00\x00latin1\x86R"
    for _ in range(levels):
        body = b"c_codecs\nencode\n" + body + b"X\x03\x00\x00\x00hex\x86R"
    return b"\x80\x02" + body + b"."


def test_pickles_naming_other_globals_are_rejected_before_loading():
    assert torch_load(archive(BYTEARRAY)) == bytearray(16)   # bytearray(10**10) would be as short
    assert len(torch_load(archive(codec_doubling(10)))) == 4 * 2**10
    for pkl in (BYTEARRAY, codec_doubling(40)):
        assert "may not cross" in cheap(read_message, archive(pkl))
    stack_global = b"\x80\x04\x8c\x08builtins\x8c\tbytearray\x93K\x10\x85R."
    with pytest.raises(WireError, match="STACK_GLOBAL"):
        read_message(archive(stack_global))


@pytest.mark.parametrize("value", [b"bytes", bytearray(b"ba"), {1, 2}, 1 + 2j, torch.Size([2]),
                                   collections.OrderedDict(a=1), collections.Counter("ab"),
                                   torch.nn.Parameter(torch.ones(2)), torch.ones(2).to_sparse(),
                                   torch.ones(2, dtype=torch.uint16), torch.float32])
def test_values_that_may_not_cross_are_rejected(value):
    with pytest.raises(WireError):
        read_message(frame({"ok": True, "out": value}))
    with pytest.raises(WireError):
        wire.validate({"ok": True, "out": value})


def test_tensors_of_unsupported_kinds_are_rejected_by_validate():
    class Sub(torch.Tensor):
        pass
    for t in (torch.ones(2).as_subclass(Sub), torch.ones(2, dtype=torch.float8_e4m3fn)):
        with pytest.raises(WireError):
            wire.validate([t])


def test_meta_tensors_cross_and_count_by_their_logical_size():
    """A check asks for a mask on the meta device to see that `device=` is honoured."""
    back = read_message(frame({"ok": True, "tensors": [torch.ones(3, 3, dtype=torch.bool, device="meta")]}))
    (t,) = back["tensors"]
    assert t.is_meta and t.shape == (3, 3) and t.dtype == torch.bool
    with pytest.raises(WireError):
        read_message(frame({"ok": True, "tensors": [torch.empty(2**40, device="meta")]}))


def test_malformed_or_unsupported_archives_are_rejected():
    honest = frame({"ok": True, "tensors": [torch.ones(3)]})
    legacy = io.BytesIO()
    torch.save({"ok": True}, legacy, _use_new_zipfile_serialization=False)
    with_comment = io.BytesIO(honest)
    with zipfile.ZipFile(with_comment, "a") as a:
        a.comment = b"hello"
    z64 = len(honest) - 22 - 20 - 56                       # where torch.save puts its zip64 record
    moved_locator = honest[:-22 - 12] + struct.pack("<Q", z64 - 1) + honest[-22 - 4:]
    assert honest[-22 - 20:-22 - 16] == b"PK\x06\x07" and honest[z64:z64 + 4] == b"PK\x06\x06"
    case_twins = io.BytesIO(rezip(honest))                 # torch's reader finds names case-blind
    with zipfile.ZipFile(case_twins, "a") as a:
        a.writestr("archive/DATA.pkl", b"\x80\x02]." + bytes(10**6))
    bad = {"legacy format": legacy.getvalue(), "not a zip": b"PK\x03\x04" + bytes(100),
           "prepended": b"PK\x03\x04" + honest, "appended": honest + b"\0", "comment": with_comment.getvalue(),
           "moved zip64 locator": moved_locator, "truncated": honest[:-1], "empty": b"",
           "case twins": case_twins.getvalue(),
           "no data.pkl": rezip(honest).replace(b"archive/data.pkl", b"archive/data.pkx")}
    for why, data in bad.items():
        try:
            read_message(data)
        except WireError:
            continue
        pytest.fail(f"accepted: {why}")


def test_malformed_pickles_are_rejected():
    for pkl in (b"", b"\x80\x02", b"\x80\x02(K\x01", b"\xff", b"\x80\x02]q\x00h\x05."):
        with pytest.raises(WireError):
            read_message(archive(pkl))


# -- the validation budget -----------------------------------------------------------------------

def test_depth_is_limited():
    limits = MessageLimits(max_depth=5)
    assert same(read_message(frame(nested_lists(5)), limits), nested_lists(5))
    with pytest.raises(WireError, match="nested too deeply"):
        read_message(frame(nested_lists(6)), limits)
    with pytest.raises(WireError, match="nested too deeply"):
        read_message(frame({"a": ({"b": [[]]},)}), MessageLimits(max_depth=4))


def test_very_deep_nesting_does_not_reach_the_recursion_limit():
    depth = 100_000
    pkl = b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."   # built without recursion
    assert "nested too deeply" in cheap(read_message, archive(pkl), megabytes=None)
    deep = torch_load(archive(pkl))
    with pytest.raises(WireError, match="nested too deeply"):   # no RecursionError on the way
        wire.validate(deep, MessageLimits(max_depth=depth - 1, max_nodes=depth))
    copy = wire.validate(deep, MessageLimits(max_depth=depth, max_nodes=depth))
    for _ in range(depth - 1):
        assert type(copy) is list and len(copy) == 1
        copy = copy[0]
    assert copy == []
    with pytest.raises(WireError, match="nested too deeply"):    # default: 12
        wire.validate(deep)


def test_number_of_values_is_limited():
    with pytest.raises(WireError, match="too many values"):
        read_message(frame(list(range(100))), MessageLimits(max_nodes=100))
    read_message(frame(list(range(99))), MessageLimits(max_nodes=100))
    with pytest.raises(WireError, match="too many values"):   # keys count too
        read_message(frame(dict.fromkeys(range(50))), MessageLimits(max_nodes=100))


def test_many_small_objects_are_cheap_to_refuse():
    pkl = b"\x80\x02]" + b"]a" * (MiB // 2 - 2) + b"."   # half a million lists, within 1 MiB
    assert "too many values" in cheap(read_message, archive(pkl), megabytes=None)
    pkl = b"\x80\x02]" + b"]a" * MiB + b"."               # beyond the pickle limit: not even read
    assert "structure is too large" in cheap(read_message, archive(pkl))


def test_string_length_is_limited():
    limits = MessageLimits(max_str_chars=10)
    read_message(frame({"s": "x" * 10}), limits)
    for reply in ({"s": "x" * 11}, {"x" * 11: 1}):
        with pytest.raises(WireError, match="string longer"):
            read_message(frame(reply), limits)


def test_total_string_length_counts_every_visit():
    s = "x" * 1000
    data = frame({"ok": True, "out": [s] * 2000})   # 2 million characters, 1 KB of them sent
    assert len(data) < 10_000
    assert "in total" in cheap(read_message, data)
    read_message(data, MessageLimits(max_total_str_chars=2_000_010))


def test_integers_are_limited_to_64_bits():
    read_message(frame([2**63 - 1, -2**63]))
    for n in (2**63, -2**63 - 1, 1 << 2000):
        with pytest.raises(WireError, match="64-bit"):
            read_message(frame({"ok": True, "out": n}))
    with pytest.raises(WireError):      # a 375 KB integer: weights_only refuses LONG4 itself
        read_message(frame({"ok": True, "out": 1 << 3_000_000}))
    with pytest.raises(WireError, match="64-bit"):
        read_message(frame({2**64: 1}))


def test_dict_keys_must_be_primitives():
    t = torch.ones(1)
    for reply in ({t: 1}, {(1, 2): 1}, {frozenset(): 1}):
        with pytest.raises(WireError):
            read_message(frame(reply))
        with pytest.raises(WireError, match="dict key"):
            wire.validate(reply)
    assert same(read_message(frame({1: 1, 1.5: 2, False: 3, None: 4, "": 5})), {1: 1, 1.5: 2, False: 3, None: 4, "": 5})


# -- property ------------------------------------------------------------------------------------

def _tensor(dtype, shape, seed, transpose):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g) * 100).to(dtype)
    return t.transpose(0, -1) if transpose and t.dim() >= 2 else t


tensors = st.builds(_tensor, st.sampled_from(DTYPES), st.lists(st.integers(0, 3), max_size=3).map(tuple),
                    st.integers(0, 2**16), st.booleans())
keys = st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=5)
leaves = keys | st.floats() | st.text() | tensors
trees = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.lists(inner, max_size=4).map(tuple)
                     | st.dictionaries(keys, inner, max_size=4), max_leaves=25)


def depth(tree) -> int:
    if type(tree) in (list, tuple):
        return 1 + max(map(depth, tree), default=0)
    if type(tree) is dict:
        return 1 + max(map(depth, tree.values()), default=0)
    return 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees)
def test_honest_trees_round_trip(tree):
    assume(depth(tree) <= 12)
    assert same(read_message(frame(tree)), tree)


# -- display -------------------------------------------------------------------------------------

def test_clean_text():
    assert clean_text("hello", 5) == "hello"
    assert clean_text("hello world", 5) == "hello\n[... 6 more characters not shown]"
    assert clean_text("", 0) == ""
    assert clean_text("abc", 0) == "\n[... 3 more characters not shown]"
    bad = "a\ud800b\udfffc"
    assert clean_text(bad, 100) == "a\ufffdb\ufffdc"
    clean_text("\ud800" * 10, 5).encode("utf-8")      # what nbformat.write needs
    assert clean_text("\U0001f600 é", 10) == "\U0001f600 é"   # real characters are kept
    assert clean_text(None, 10) == "None" and clean_text(12345, 3).startswith("123\n[... 2 more")
    long = "x" * 10**7
    assert len(clean_text(long, 100)) < 200


def test_dtype_and_device_markers_rebuild_only_dtypes_and_devices():
    """``{"__dtype__": name}`` names a torch.dtype, never any other attribute of torch."""
    from autograder.sandbox.codec import PLAIN_MARKERS, CodecError, dtype_or_device, rebuild

    tree = [dtype_or_device(torch.float64), dtype_or_device(torch.device("meta"))]
    assert rebuild(tree, [], PLAIN_MARKERS) == [torch.float64, torch.device("meta")]
    for bad in ({"__dtype__": "Tensor"}, {"__dtype__": "__builtins__"}, {"__dtype__": 3},
                {"__device__": "gpu:x"}, {"__device__": ["cpu"]}):
        with pytest.raises(CodecError):
            rebuild(bad, [], PLAIN_MARKERS)
