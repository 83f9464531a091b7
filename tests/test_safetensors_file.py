"""SafetensorsFile reads what the safetensors library wrote, dtype by dtype, bit for bit."""
from __future__ import annotations

import gc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorasearch.errors import BadInput
from lorasearch.formats.safetensors_file import SafetensorsFile


def every_code(dtype: torch.dtype, nbytes: int) -> torch.Tensor:
    """Every bit pattern of a 1- or 2-byte dtype, in code order."""
    codes = np.arange(256**nbytes, dtype=np.uint8 if nbytes == 1 else np.uint16)
    return torch.frombuffer(bytearray(codes.astype(codes.dtype.newbyteorder("<")).tobytes()), dtype=dtype)


def sample(dtype: torch.dtype) -> torch.Tensor:
    """A 3x5 tensor of the dtype with extreme and ordinary values."""
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(3, 5, generator=g) > 0.5
    if dtype.is_floating_point:
        t = torch.randn(3, 5, generator=g, dtype=torch.float64) * 3
        fi = torch.finfo(torch.float32 if dtype == torch.float64 else dtype)  # get() is float32
        t[0, :3] = torch.tensor([fi.max, fi.min, fi.tiny], dtype=torch.float64)
        return t.to(dtype)
    ii = torch.iinfo(dtype)
    lo, hi = ii.min, ii.max
    flat = [lo, hi, 0, 1, lo + 1, hi - 1] + [(i * 7919) % 100 for i in range(9)]
    np_dtype = {torch.uint16: np.uint16, torch.uint32: np.uint32, torch.uint64: np.uint64}.get(dtype)
    if np_dtype is not None:  # torch has few kernels for these: build them in numpy
        return torch.from_numpy(np.array(flat, dtype=np_dtype).reshape(3, 5))
    return torch.tensor(flat, dtype=dtype).reshape(3, 5)


DTYPES = [
    ("F64", torch.float64), ("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16),
    ("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2),
    ("I8", torch.int8), ("I16", torch.int16), ("I32", torch.int32), ("I64", torch.int64),
    ("U8", torch.uint8), ("U16", torch.uint16), ("U32", torch.uint32), ("U64", torch.uint64),
    ("BOOL", torch.bool),
]


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """Torch's view of a tensor as numpy: floats widened to float32 (bf16/f8 have no numpy dtype)."""
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        return t.to(torch.float32).numpy()
    return t.numpy()


@pytest.mark.parametrize("name,dtype", DTYPES, ids=[d[0] for d in DTYPES])
def test_dtype_matches_torch(tmp_path: Path, name: str, dtype: torch.dtype) -> None:
    p = tmp_path / f"{name}.safetensors"
    save_file({"x": sample(dtype)}, str(p))
    ref = as_numpy(load_file(str(p))["x"])
    with SafetensorsFile(p) as st:
        assert st.dtype("x") == name and st.shape("x") == (3, 5)
        got = st.raw("x")
        np.testing.assert_array_equal(got, ref)
        assert got.dtype == ref.dtype
        np.testing.assert_array_equal(st.get("x"), ref.astype(np.float32))
        assert st.get("x").dtype == np.float32


@pytest.mark.parametrize(
    "name,dtype,nbytes",
    [("BF16", torch.bfloat16, 2), ("F16", torch.float16, 2), ("F8_E4M3", torch.float8_e4m3fn, 1), ("F8_E5M2", torch.float8_e5m2, 1)],
)
def test_every_bit_pattern_matches_torch(tmp_path: Path, name: str, dtype: torch.dtype, nbytes: int) -> None:
    """All 256 / 65536 codes, NaN and Inf included, decode exactly as torch widens them."""
    p = tmp_path / f"{name}.safetensors"
    save_file({"codes": every_code(dtype, nbytes)}, str(p))
    ref = load_file(str(p))["codes"].to(torch.float32).numpy()
    with SafetensorsFile(p) as st:
        got = st.raw("codes")
        np.testing.assert_array_equal(got, ref)  # NaN == NaN here
        assert np.array_equal(np.signbit(got), np.signbit(ref))
        with pytest.raises(BadInput) as info:
            st.get("codes")
        assert info.value.code == "non_finite"


def test_zero_dim_and_zero_size(tmp_path: Path) -> None:
    """kohya's 0-d alpha, and empty tensors sharing an offset, next to a real one."""
    p = tmp_path / "edge.safetensors"
    tensors = {
        "m.alpha": torch.tensor(8.0),
        "m.alpha16": torch.tensor(8.0, dtype=torch.float16),
        "empty0": torch.zeros(0),
        "empty_rows": torch.zeros(0, 4, dtype=torch.float16),
        "empty_cols": torch.zeros(4, 0, dtype=torch.bfloat16),
        "empty_f8": torch.zeros(2, 0, dtype=torch.float8_e4m3fn),
        "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    }
    save_file(tensors, str(p))
    with SafetensorsFile(p) as st:
        assert st.shape("m.alpha") == () and st.get("m.alpha").shape == ()
        assert float(st.get("m.alpha")) == 8.0 and float(st.get("m.alpha16")) == 8.0
        for k in ("empty0", "empty_rows", "empty_cols", "empty_f8"):
            assert st.get(k).shape == tuple(tensors[k].shape) and st.get(k).size == 0
        np.testing.assert_array_equal(st.get("w"), tensors["w"].numpy())
        assert set(st.keys()) == set(tensors)
    for prefetch in (False, True):  # an empty tensor asked for before anything is read
        with SafetensorsFile(p, prefetch=prefetch) as st:
            for k in sorted(st.keys(), key=lambda k: (st.tensors[k].end, k)):
                assert st.get(k).shape == tuple(tensors[k].shape), k


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        {},
        {"format": "pt"},
        {"ss_network_dim": "16", "ss_tag_frequency": '{"set": {"a, b": 3}}', "empty": "", "unicode": "naïve ✓ 日本"},
    ],
    ids=["none", "empty", "format", "kohya-like"],
)
def test_metadata_round_trip(tmp_path: Path, metadata: dict[str, str] | None) -> None:
    p = tmp_path / "meta.safetensors"
    save_file({"x": torch.ones(2)}, str(p), metadata=metadata)
    with safe_open(str(p), "pt") as f:
        expected = f.metadata() or {}
    with SafetensorsFile(p) as st:
        assert st.metadata == expected == (metadata or {})


def test_every_shared_file_matches_the_library(shared_loras: Path) -> None:
    """Each real file: same keys, shapes, values and metadata as safetensors' own reader."""
    files = sorted(shared_loras.glob("*.safetensors"))
    assert files
    for f in files:
        ref = load_file(str(f))
        with safe_open(str(f), "pt") as h:
            meta = h.metadata() or {}
        with SafetensorsFile(f) as st:
            assert set(st.keys()) == set(ref), f.name
            assert st.metadata == meta, f.name
            for k, t in ref.items():
                assert st.shape(k) == tuple(t.shape), (f.name, k)
                np.testing.assert_array_equal(st.raw(k), as_numpy(t), err_msg=f"{f.name}: {k}")


def test_handle_lifetime(tmp_path: Path) -> None:
    """One handle per object: closed by close() / with, and by the collector without a ResourceWarning."""
    p = tmp_path / "x.safetensors"
    save_file({"x": torch.ones(3)}, str(p))
    st = SafetensorsFile(p)
    st.close()
    st.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        st.raw("x")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        SafetensorsFile(p).get("x")
        gc.collect()


def test_file_cut_after_open(tmp_path: Path) -> None:
    """A file truncated behind our back reads as 'truncated', not as short garbage."""
    p = tmp_path / "x.safetensors"
    save_file({"x": torch.ones(64)}, str(p))
    with SafetensorsFile(p) as st:
        with open(p, "r+b") as fh:
            fh.truncate(p.stat().st_size - 16)
        with pytest.raises(BadInput) as info:
            st.raw("x")
        assert info.value.code == "truncated"


def test_f64_beyond_float32_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    save_file({"x": torch.tensor([1.0, 1e300], dtype=torch.float64)}, str(p))
    with SafetensorsFile(p) as st:
        assert st.raw("x")[1] == 1e300
        with pytest.raises(BadInput, match="beyond the float32 range") as info:
            st.get("x")
        assert info.value.code == "non_finite"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("poisoned", [False, True])
def test_one_half_type_file_is_widened_at_once_or_tensor_by_tensor(tmp_path: Path, dtype: torch.dtype,
                                                                   poisoned: bool) -> None:
    """A file of one 16-bit type gives torch's values for every tensor (0-d and empty ones too);
    a NaN in one tensor is still reported for that tensor only."""
    g = torch.Generator().manual_seed(3)
    tensors = {f"m{i}.w": torch.randn(3 + i, 5, generator=g).to(dtype) for i in range(6)}
    tensors.update({"alpha": torch.tensor(4.0, dtype=dtype), "empty": torch.zeros(0, 3, dtype=dtype)})
    if poisoned:
        tensors["m2.w"][1, 1] = float("nan")
    p = tmp_path / "half.safetensors"
    save_file(tensors, str(p))
    with SafetensorsFile(p) as st:
        for k, t in tensors.items():
            if poisoned and k == "m2.w":
                with pytest.raises(BadInput, match="m2.w") as info:
                    st.get(k)
                assert info.value.code == "non_finite"
                continue
            got = st.get(k)
            assert got.dtype == np.float32 and got.shape == tuple(t.shape) and not got.flags.writeable
            np.testing.assert_array_equal(got, t.to(torch.float32).numpy())


def test_header_listed_out_of_data_order(tmp_path: Path) -> None:
    """Writers list tensors in data order (checked without a sort); any other order is valid too."""
    import json
    import struct

    a, b = np.arange(4, dtype=np.float32), np.arange(4, 10, dtype=np.float32)
    header = {"b": {"dtype": "F32", "shape": [6], "data_offsets": [16, 40]},
              "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "reversed.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + a.tobytes() + b.tobytes())
    with SafetensorsFile(path) as st:
        assert st.keys() == ["b", "a"]
        assert np.array_equal(st.get("a"), a) and np.array_equal(st.get("b"), b)
