"""Every kind of bad input gets a specific code and one clear line, from the library and the CLI.

One table: (case id, builder, expected ``BadInput.code``, message fragment).
Each builder writes its file(s) into a fresh folder; headers are written byte
by byte (``write_raw``) so that each defect is exactly the one named. For each
case ``load_lora`` must raise ``BadInput`` with that code and a message naming
the file, and ``lorasearch info PATH --json`` must exit 2 with nothing on
stdout and one ``error: `` line on stderr. Pickles are planted with a payload
that would create a marker file when unpickled; the marker must never appear.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from safetensors.numpy import save_file

from lorasearch.errors import BadInput
from lorasearch.formats import load_lora

MARKER = "UNPICKLED"  # created by the planted pickles' payload if anything unpickles them
KOHYA = "lora_unet_down_blocks_0_attentions_0_proj_in"


# -- writers -----------------------------------------------------------------
def write_raw(path: Path, header: dict[str, Any] | bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    """A safetensors-shaped file: u64 length, header bytes, data, nothing checked."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(hb) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + hb + data)
    return path


def bf16_bytes(a: np.ndarray) -> bytes:
    """float32 -> bfloat16 by truncation (keeps NaN and Inf)."""
    return (np.asarray(a, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()


def write_tensors(path: Path, tensors: list[tuple[str, str, tuple[int, ...], bytes]], meta: Any = None) -> Path:
    """Tensors laid out contiguously with correct offsets, in list order."""
    header: dict[str, Any] = {} if meta is None else {"__metadata__": meta}
    pos, data = 0, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + len(raw)]}
        pos += len(raw)
        data += raw
    return write_raw(path, header, data)


def kohya_file(path: Path, down: np.ndarray | None, up: np.ndarray | None, dtype: str = "F32") -> Path:
    """A kohya LoRA module with the given factors (None leaves a factor out)."""
    enc = {"F32": lambda a: a.astype("<f4").tobytes(), "F16": lambda a: a.astype("<f2").tobytes(), "BF16": bf16_bytes}[dtype]
    with np.errstate(over="ignore"):  # the f16 overflow case wants the Inf
        down_b, up_b = (None if a is None else enc(a) for a in (down, up))
    ts = [(f"{KOHYA}.alpha", "F32", (), np.float32(4).tobytes())]
    if down is not None:
        ts.append((f"{KOHYA}.lora_down.weight", dtype, down.shape, down_b))
    if up is not None:
        ts.append((f"{KOHYA}.lora_up.weight", dtype, up.shape, up_b))
    return write_tensors(path, ts)


def good_file(path: Path) -> Path:
    """A valid kohya LoRA written by the safetensors library."""
    rng = np.random.default_rng(0)
    save_file(
        {
            f"{KOHYA}.lora_down.weight": rng.standard_normal((4, 32)).astype(np.float32),
            f"{KOHYA}.lora_up.weight": rng.standard_normal((32, 4)).astype(np.float32),
            f"{KOHYA}.alpha": np.array(4.0, np.float32),
        },
        str(path),
    )
    return path


def with_value(value: float, dtype: str) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        down = np.ones((4, 32), np.float32)
        down[1, 3] = value
        return kohya_file(d / f"{dtype.lower()}.safetensors", down, np.ones((32, 4), np.float32), dtype)

    return build


class Payload:
    """Unpickling this calls ``open(marker, 'w')``: proof of code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def torch_zip(path: Path) -> Path:
    import torch

    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2), "payload": Payload(path.parent / MARKER)}, path)
    return path


def raw_pickle(path: Path) -> Path:
    path.write_bytes(pickle.dumps({"payload": Payload(path.parent / MARKER)}, protocol=4))
    return path


def peft_folder(d: Path, config: str | None) -> Path:
    folder = d / "adapter"
    folder.mkdir()
    rng = np.random.default_rng(1)
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((4, 16)).astype(np.float32),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal((16, 4)).astype(np.float32),
        },
        str(folder / "adapter_model.safetensors"),
    )
    if config is not None:
        (folder / "adapter_config.json").write_text(config)
    return folder


def cut(frac: float) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        p = good_file(d / "cut.safetensors")
        raw = p.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        p.write_bytes(raw[: 8 + n + int((len(raw) - 8 - n) * frac)])
        return p

    return build


def trailing(d: Path) -> Path:
    p = good_file(d / "trailing.safetensors")
    p.write_bytes(p.read_bytes() + b"\0\0\0\0")
    return p


def f32(n: int) -> bytes:
    return np.arange(n, dtype="<f4").tobytes()


def two_spans(first: list[int], second: list[int], data_len: int) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        header = {
            f"{KOHYA}.lora_down.weight": {"dtype": "F32", "shape": [4], "data_offsets": first},
            f"{KOHYA}.lora_up.weight": {"dtype": "F32", "shape": [4], "data_offsets": second},
        }
        return write_raw(d / "spans.safetensors", header, f32(data_len // 4))

    return build


def one_entry(entry: dict[str, Any], data: bytes) -> Callable[[Path], Path]:
    return lambda d: write_raw(d / "entry.safetensors", {f"{KOHYA}.lora_down.weight": entry}, data)


def header_bytes(hb: bytes, header_len: int | None = None, data: bytes = b"") -> Callable[[Path], Path]:
    return lambda d: write_raw(d / "hdr.safetensors", hb, data, header_len)


def plain_bytes(content: bytes, name: str = "plain.safetensors") -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        (d / name).write_bytes(content)
        return d / name

    return build


def pickled_suffix(suffix: str) -> Callable[[Path], Path]:
    return lambda d: torch_zip(d / f"model{suffix}")


def only_bin_folder(d: Path) -> Path:
    folder = d / "adapter"
    folder.mkdir()
    raw_pickle(folder / "adapter_model.bin")
    return folder


def empty_folder(d: Path) -> Path:
    folder = d / "not_an_adapter"
    folder.mkdir()
    (folder / "README.md").write_text("no weights here\n")
    return folder


# -- the table ---------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path], Path]
    code: str
    fragment: str | tuple[str, ...]  # every one must be in the message
    max_bytes: int | None = None
    # The CLI scans a folder that is not a PEFT adapter: JSON lines on stdout
    # (one per refused file), a summary, and a final ``error:`` line on stderr.
    scan: bool = False


DOWN, UP = np.ones((4, 32), np.float32), np.ones((32, 4), np.float32)
CASES = [
    Case("empty", plain_bytes(b""), "truncated", "empty"),
    Case("short", plain_bytes(b"\x05\x00\x00"), "truncated", "shorter than the 8-byte"),
    Case("garbage", plain_bytes(b"this is certainly not a tensor file\n" * 8), "bad_header", "not a safetensors file"),
    Case("header_past_end", header_bytes(b'{"a": {"dtype": "F32"', header_len=4000), "truncated", "runs past the end"),
    Case("header_not_json", header_bytes(b'{"a": nope}'), "bad_header", "not valid JSON"),
    Case("header_not_utf8", header_bytes(b'{"\xff\xfe": 1}'), "bad_header", "not valid JSON"),
    Case("header_not_object", header_bytes(b'[1, 2, 3]'), "bad_header", "not an object"),
    Case("header_duplicate_key", header_bytes(b'{"a": {}, "a": {}}'), "bad_header", "duplicate key 'a'"),
    Case("entry_not_object", one_entry([1, 2], b""), "bad_header", "is not an object"),  # type: ignore[arg-type]
    Case("data_cut_mid_tensor", cut(0.5), "truncated", "tensors need"),
    Case("data_missing", cut(0.0), "truncated", "tensors need"),
    Case("overlapping_offsets", two_spans([0, 16], [8, 24], 24), "bad_offsets", "overlaps"),
    Case("gapped_offsets", two_spans([0, 16], [20, 36], 36), "bad_offsets", "gap of 4 bytes"),
    Case("trailing_bytes", trailing, "bad_offsets", "4 trailing bytes"),
    Case("offsets_vs_shape", one_entry({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}, f32(3)), "bad_offsets", "needs 16"),
    Case("offsets_reversed", one_entry({"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}, f32(2)), "bad_offsets", "invalid data_offsets"),
    Case("unknown_dtype", one_entry({"dtype": "F7", "shape": [4], "data_offsets": [0, 16]}, f32(4)), "bad_dtype", "unknown dtype 'F7'"),
    Case("negative_shape", one_entry({"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}, f32(4)), "bad_header", "invalid shape"),
    Case("float_shape", one_entry({"dtype": "F32", "shape": [2.0, 2], "data_offsets": [0, 16]}, f32(4)), "bad_header", "invalid shape"),
    Case("nan_f32", with_value(float("nan"), "F32"), "non_finite", "NaN"),
    Case("inf_f32", with_value(float("inf"), "F32"), "non_finite", "Inf"),
    Case("nan_f16", with_value(float("nan"), "F16"), "non_finite", "NaN"),
    Case("inf_f16", with_value(float("-inf"), "F16"), "non_finite", "Inf"),
    Case("f16_overflow", with_value(1e6, "F16"), "non_finite", "Inf"),
    Case("nan_bf16", with_value(float("nan"), "BF16"), "non_finite", "NaN"),
    Case("inf_bf16", with_value(float("inf"), "BF16"), "non_finite", "Inf"),
    Case("factors_do_not_chain", lambda d: kohya_file(d / "chain.safetensors", np.ones((4, 64), np.float32), np.ones((32, 8), np.float32)), "bad_factors", "do not chain"),
    Case("up_without_down", lambda d: kohya_file(d / "up.safetensors", None, UP), "bad_factors", "no matching down"),
    Case("torch_zip_renamed", lambda d: torch_zip(d / "renamed.safetensors"), "pickle_refused", "never unpickled"),
    Case("raw_pickle_renamed", lambda d: raw_pickle(d / "renamed.safetensors"), "pickle_refused", "never unpickled"),
    Case("suffix_bin", pickled_suffix(".bin"), "pickle_refused", "pickled weights (.bin)"),
    Case("suffix_pt", pickled_suffix(".pt"), "pickle_refused", "pickled weights (.pt)"),
    Case("suffix_ckpt", pickled_suffix(".ckpt"), "pickle_refused", "pickled weights (.ckpt)"),
    Case("folder_of_pickles", only_bin_folder, "pickle_refused", "adapter_model.bin", scan=True),
    Case("over_size_cap", lambda d: good_file(d / "big.safetensors"), "too_large", "over the 100-byte cap", max_bytes=100),
    Case("unknown_layout", lambda d: write_tensors(d / "odd.safetensors", [("mystery.blocks.0.frob", "F32", (4,), f32(4))]), "unsupported_layout", ("unsupported LoRA layout", "'mystery.blocks.0.frob'")),
    Case("custom_vit_factors", lambda d: write_tensors(d / "vit.safetensors", [("w_a_000", "F32", (4, 8), f32(32)), ("w_b_000", "F32", (8, 4), f32(32))]), "unsupported_layout", ("unsupported LoRA layout", "'w_a_000'")),
    Case("zero_tensors", header_bytes(b'{"__metadata__": {"format": "pt"}}'), "unsupported_layout", "no tensors"),
    Case("metadata_not_strings", lambda d: write_tensors(d / "meta.safetensors", [(f"{KOHYA}.alpha", "F32", (), f32(1))], {"ss_network_dim": 4}), "bad_header", "__metadata__ value of 'ss_network_dim' is a JSON number"),
    Case("metadata_not_object", lambda d: write_tensors(d / "meta.safetensors", [(f"{KOHYA}.alpha", "F32", (), f32(1))], ["a"]), "bad_header", "__metadata__ is a JSON array"),
    Case("peft_config_not_json", lambda d: peft_folder(d, "{'r': 8,"), "bad_config", "not valid JSON"),
    Case("peft_config_not_object", lambda d: peft_folder(d, "[8]"), "bad_config", "not a JSON object"),
    Case("folder_without_weights", empty_folder, "not_a_lora", "no adapter_model.safetensors"),
    Case("missing_path", lambda d: d / "nowhere.safetensors", "not_found", "no such file"),
]


# -- running -----------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_input")
    out: dict[str, Path] = {}
    for case in CASES:
        (root / case.id).mkdir()
        out[case.id] = case.build(root / case.id)
    return out


def run_cli(path: Path, max_bytes: int | None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("LORASEARCH_DEBUG", None)
    if max_bytes is not None:
        env["LORASEARCH_MAX_FILE_BYTES"] = str(max_bytes)
    cmd = [sys.executable, "-m", "lorasearch.cli", "info", str(path), "--json"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=path.parent, timeout=120)


@pytest.fixture(scope="module")
def cli_results(built: dict[str, Path]) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every case through the CLI, a few processes at a time (each is mostly interpreter start-up)."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {c.id: pool.submit(run_cli, built[c.id], c.max_bytes) for c in CASES}
        return {k: f.result() for k, f in futures.items()}


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt by the library to unpickle fails the test (not a BadInput)."""

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("the library tried to unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    if "torch" in sys.modules:
        monkeypatch.setattr(sys.modules["torch"], "load", refuse)


def test_pickle_payload_is_live(tmp_path: Path) -> None:
    """The planted payload really does create the marker when unpickled (so its absence means something)."""
    p = raw_pickle(tmp_path / "control.pkl")
    pickle.loads(p.read_bytes())
    assert (tmp_path / MARKER).exists()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(
    case: Case,
    built: dict[str, Path],
    cli_results: dict[str, subprocess.CompletedProcess[str]],
    no_unpickling: None,
) -> None:
    path = built[case.id]
    kwargs = {} if case.max_bytes is None else {"max_bytes": case.max_bytes}
    with pytest.raises(BadInput) as info:
        load_lora(path, **kwargs)
    msg = str(info.value)
    assert info.value.code == case.code, msg
    fragments = (case.fragment,) if isinstance(case.fragment, str) else case.fragment
    assert all(f in msg for f in fragments), msg
    assert path.name in msg
    assert "\n" not in msg

    r = cli_results[case.id]
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    if case.scan:
        assert lines and lines[-1].startswith("error: ") and path.name in lines[-1], r.stderr
        for row in map(json.loads, r.stdout.splitlines()):
            assert row["error"]["code"] == case.code and all(f in row["error"]["message"] for f in fragments)
    else:
        assert r.stdout == ""
        assert len(lines) == 1, r.stderr
        assert lines[0].startswith("error: ") and path.name in lines[0]
        assert all(f in lines[0] for f in fragments)

    assert not (path.parent / MARKER).exists() and not (path / MARKER).exists(), "a pickle was unpickled"
