"""sha256 / AutoV2 / AutoV3 against the inventory and independent re-computations."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
from safetensors.numpy import save_file

from lorasearch.formats.safetensors_file import SafetensorsFile
from lorasearch.hashes import AUTOV3_FROM_START_BYTES, autov2, autov3, file_hashes, file_sha256

MiB = 1024 * 1024


def addnet_hash_safetensors(b: BinaryIO) -> str:
    """sd-scripts ``library/train_util.py`` formula, as written there (lower-case hex)."""
    hash_sha256 = hashlib.sha256()
    blksize = 1024 * 1024
    b.seek(0)
    header = b.read(8)
    n = int.from_bytes(header, "little")
    offset = n + 8
    b.seek(offset)
    for chunk in iter(lambda: b.read(blksize), b""):
        hash_sha256.update(chunk)
    return hash_sha256.hexdigest()


def tail_sha256(data: bytes) -> str:
    """AutoV3 by the definition: sha256 of bytes[8+N:], upper case."""
    n = struct.unpack("<Q", data[:8])[0]
    return hashlib.sha256(data[8 + n:]).hexdigest().upper()


def header_len(path: Path) -> int:
    with SafetensorsFile(path) as st:
        return st.header_len


def inventory(folder: Path) -> dict[str, str]:
    with open(folder / "inventory.tsv", newline="", encoding="utf-8") as fh:
        return {row["local_name"]: row["sha256"] for row in csv.DictReader(fh, delimiter="\t")}


def test_shared_files_match_inventory_and_definitions(shared_loras: Path) -> None:
    """Every real file: sha256 = inventory, AutoV3 = tail sha256 = sd-scripts addnet hash, AutoV2 = sha[:10]."""
    inv = inventory(shared_loras)
    files = sorted(shared_loras.glob("*.safetensors"))
    assert {f.name for f in files} == set(inv)
    for f in files:
        data = f.read_bytes()
        sha = file_sha256(f)
        assert sha == inv[f.name] == hashlib.sha256(data).hexdigest(), f.name
        with SafetensorsFile(f) as st:
            header_len = st.header_len
        v3 = autov3(f, header_len)
        assert v3 == tail_sha256(data) == autov3(f), f.name
        assert v3.lower() == addnet_hash_safetensors(io.BytesIO(data)), f.name
        assert file_hashes(f, header_len) == (sha, v3), f.name
        assert autov2(sha) == sha[:10].upper() and len(autov2(sha)) == 10


def test_wrong_embedded_hash_is_not_trusted(shared_loras: Path) -> None:
    """FORMATS.md: the ai-toolkit Flux file embeds sha256('') as sshs_model_hash; its real AutoV3 is E5A65EC2E1D8..."""
    f = shared_loras / "leighwoods__public-loras__lora.safetensors"
    with SafetensorsFile(f) as st:
        embedded = st.metadata["sshs_model_hash"]
        v3 = autov3(f, st.header_len)
    assert embedded == hashlib.sha256(b"").hexdigest()
    assert v3.startswith("E5A65EC2E1D8") and v3.lower() != embedded


def test_metadata_edit_keeps_autov3(tmp_path: Path) -> None:
    """Same tensors in the same order, different __metadata__: AutoV3 stays, sha256 and AutoV2 change."""
    rng = np.random.default_rng(0)
    tensors = {f"lora_unet_m{i}.lora_down.weight": rng.standard_normal((4, 8)).astype(np.float16) for i in range(5)}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(tensors, str(a), metadata={"ss_output_name": "a"})
    save_file(tensors, str(b), metadata={"ss_output_name": "a much longer name", "modelspec.title": "b"})
    ha, hb = (file_hashes(p, header_len(p)) for p in (a, b))
    assert ha[1] == hb[1]
    assert ha[0] != hb[0] and autov2(ha[0]) != autov2(hb[0])


def test_metadata_edit_of_a_real_file_keeps_autov3(shared_loras: Path, tmp_path: Path) -> None:
    """Rewrite a real file's header with new metadata, data bytes untouched."""
    src = shared_loras / "leighwoods__public-loras__lora.safetensors"
    data = src.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = {"note": "re-saved"}
    hb = json.dumps(header).encode()
    out = tmp_path / "edited.safetensors"
    out.write_bytes(struct.pack("<Q", len(hb)) + hb + data[8 + n:])
    with SafetensorsFile(out) as st:
        assert st.metadata == {"note": "re-saved"}
        new_len = st.header_len
    assert autov3(out, new_len) == autov3(src, n)
    assert file_sha256(out) != file_sha256(src)


@pytest.mark.parametrize(
    "header_len,from_byte_8",
    [(AUTOV3_FROM_START_BYTES - 8, False), (AUTOV3_FROM_START_BYTES, True)],
    ids=["just-under-16MiB", "16MiB"],
)
def test_huge_header_hashes_from_byte_8(tmp_path: Path, header_len: int, from_byte_8: bool) -> None:
    """Civitai's scanner hashes from byte 8 when the header is 16 MiB or more (sd-scripts does not)."""
    x = np.arange(6, dtype="<f4")
    header = {"__metadata__": {"big": ""}, "x": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}
    pad = header_len - len(json.dumps(header).encode())
    header["__metadata__"]["big"] = "x" * pad
    hb = json.dumps(header).encode()
    assert len(hb) == header_len
    p = tmp_path / "big.safetensors"
    p.write_bytes(struct.pack("<Q", len(hb)) + hb + x.tobytes())
    data = p.read_bytes()
    with SafetensorsFile(p) as st:
        assert st.header_len == header_len
        np.testing.assert_array_equal(st.get("x"), x)
    expected = hashlib.sha256(data[8:]).hexdigest().upper() if from_byte_8 else tail_sha256(data)
    assert autov3(p, header_len) == expected == file_hashes(p, header_len)[1]
    assert (expected.lower() == addnet_hash_safetensors(io.BytesIO(data))) is not from_byte_8
