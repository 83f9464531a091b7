"""Check a LoRA's safetensors header against its weights, and pull out its training notes.

Trainers write claims into ``__metadata__`` that the weights can prove or
disprove; ``lorasearch info`` reports each one as a check
``{"field", "header", "computed", "ok", "message"}`` (``ok`` is None when the
claim cannot be verified from the file alone):

- ``sshs_model_hash`` (sd-scripts ``precalculate_safetensors_hashes``): sha256
  of the bytes after the JSON header of the file saved with only the ``ss_*``
  metadata. The tensor bytes do not depend on the metadata, so it must equal
  the sha256 of this file's data section (= AutoV3 for headers under 16 MiB).
- ``sshs_legacy_hash``: the first 8 hex of sha256 of the 64 KiB at offset
  1 MiB of that same ``ss_*``-only file; its header length is rebuilt here.
- ``modelspec.hash_sha256`` (sd-scripts ``sai_model_spec``): ``"0x"`` + sha256 of
  the tensors' bytes concatenated in the writer's state-dict order. That
  order is not stored, so file order and name order are tried; no match is
  reported as unverifiable, never as proof of a change.
- The hash of the empty string (``e3b0c442...``) is a known trainer bug
  (ai-toolkit stamps it on every file): always a mismatch.
- ``ss_base_model_version``, ``ss_v2``, ``modelspec.architecture``,
  ``ss_sd_model_name``, PEFT ``base_model_name_or_path`` against the family
  detected from the shapes.
- ``ss_network_dim`` / ``ss_network_alpha`` (and ``conv_dim`` / ``conv_alpha`` in
  ``ss_network_args``) against the ranks and ``.alpha`` tensors; PEFT ``r``
  against the ``lora_A`` ranks.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from lorasearch.delta import LoraDelta
from lorasearch.families import hinted_family
from lorasearch.formats.safetensors_file import SafetensorsFile, TensorInfo
from lorasearch.hashes import AUTOV3_FROM_START_BYTES

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()  # e3b0c442...
LEGACY_OFFSET = 0x100000
LEGACY_BYTES = 0x10000
ALPHA_RTOL = 1e-2  # alphas are often stored in fp16/bf16
TOP_TAGS = 20

# Down-projection roles whose first dimension is the module's rank (kohya / LyCORIS names).
_RANK_ROLES = (".lora_down.weight", ".hada_w1_b", ".lora_A.weight")


@dataclass
class Check:
    """One header claim and what the weights say.

    Attributes:
        field: the metadata key (or config key) checked.
        header: the value the header claims.
        computed: what the file's weights give.
        ok: True agrees, False disagrees, None cannot be verified.
        message: one line for people.
    """

    field: str
    header: Any
    computed: Any
    ok: bool | None
    message: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------
# Hashes
# ---------------------------------------------------------------------------


def _norm_hex(v: str) -> str:
    return v.strip().lower().removeprefix("0x")


def _read_at(fh: Any, offset: int, n: int) -> bytes:
    fh.seek(offset)
    return fh.read(n)


def data_sha256(path: Path, data_start: int) -> str:
    """sha256 (lower-case hex) of every byte after the JSON header."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(data_start)
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def header_json_len(metadata: dict[str, str] | None, tensors: dict[str, TensorInfo], pad: bool = True) -> int:
    """Length of the JSON header ``safetensors`` writes for these tensors and metadata.

    serde_json writes compact JSON with raw UTF-8; key order does not change the
    length. Since safetensors 0.3 the header is padded with spaces to 8 bytes.

    Args:
        metadata: ``__metadata__`` (None: no metadata entry).
        tensors: name -> TensorInfo (offsets as in the data section).
        pad: pad to a multiple of 8.

    Returns:
        the header length in bytes (without the 8-byte length prefix).
    """
    head: dict[str, Any] = {}
    if metadata is not None:
        head["__metadata__"] = metadata
    for name, info in tensors.items():
        head[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [info.start, info.end]}
    n = len(json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    return n + (-n % 8 if pad else 0)


def legacy_hashes(path: Path, st: SafetensorsFile) -> list[str] | None:
    """``sshs_legacy_hash`` candidates of the ``ss_*``-only file sd-scripts hashed (padded and unpadded header).

    Returns:
        8-hex candidates, or None when the 1 MiB window would fall inside the
        rebuilt header (its key order is not recoverable).
    """
    ss = {k: v for k, v in st.metadata.items() if k.startswith("ss_")}
    out: list[str] = []
    with open(path, "rb") as fh:
        for pad in (True, False):
            start = LEGACY_OFFSET - 8 - header_json_len(ss, st.tensors, pad)
            if start < 0:
                return None
            block = _read_at(fh, st.data_start + start, LEGACY_BYTES) if st.data_start + start < st.size else b""
            out.append(hashlib.sha256(block).hexdigest()[:8])
    return list(dict.fromkeys(out))


def _tensor_orders(tensors: dict[str, TensorInfo]) -> dict[str, list[str]]:
    by_offset = sorted(tensors, key=lambda k: tensors[k].start)
    orders = {"file order": by_offset, "name order": sorted(tensors)}
    if list(tensors) not in orders.values():
        orders["header order"] = list(tensors)
    return orders


def modelspec_hashes(path: Path, st: SafetensorsFile) -> dict[str, str]:
    """sd-scripts' ``modelspec.hash_sha256`` for the tensor orders that can be guessed.

    Returns:
        order name -> ``"0x"`` + sha256 of the tensors' bytes concatenated in that order.
    """
    out: dict[str, str] = {}
    with open(path, "rb") as fh:
        for name, keys in _tensor_orders(st.tensors).items():
            h = hashlib.sha256()
            for k in keys:
                info = st.tensors[k]
                pos, end = st.data_start + info.start, st.data_start + info.end
                while pos < end:
                    block = _read_at(fh, pos, min(1 << 20, end - pos))
                    if not block:
                        break
                    h.update(block)
                    pos += len(block)
            out[name] = "0x" + h.hexdigest()
    return out


def _empty_hash_check(field: str, value: str) -> Check | None:
    if _norm_hex(value) in (EMPTY_SHA256, EMPTY_SHA256[:8]) and field != "sshs_legacy_hash":
        return Check(field, value, None, False,
                     "hash of the empty string (sha256(b'') = e3b0c442...): a trainer bug (ai-toolkit writes it on "
                     "every file), not the hash of these weights")
    return None


def hash_checks(ld: LoraDelta, st: SafetensorsFile, path: Path) -> list[Check]:
    """Embedded ``sshs_model_hash`` / ``sshs_legacy_hash`` / ``modelspec.hash_sha256`` vs the weights."""
    meta = st.metadata
    out: list[Check] = []
    v = meta.get("sshs_model_hash")
    if v:
        out.append(_model_hash_check(ld, st, path, v))
    v = meta.get("sshs_legacy_hash")
    if v:
        out.append(_legacy_check(st, path, v))
    v = meta.get("modelspec.hash_sha256")
    if v:
        out.append(_modelspec_check(st, path, v))
    return out


def _model_hash_check(ld: LoraDelta, st: SafetensorsFile, path: Path, value: str) -> Check:
    v3 = ld.source.get("autov3")
    computed = str(v3).lower() if v3 and st.header_len < AUTOV3_FROM_START_BYTES else data_sha256(path, st.data_start)
    empty = _empty_hash_check("sshs_model_hash", value)
    if empty is not None:
        empty.computed = computed
        return empty
    if _norm_hex(value) == computed:
        return Check("sshs_model_hash", value, computed, True, "matches the sha256 of the tensor data (AutoV3)")
    return Check("sshs_model_hash", value, computed, False,
                 "differs from the sha256 of the tensor data (AutoV3): the tensors were changed after the hash was "
                 "written (prune, cast, conversion, merge) or the header was copied from another file")


def _legacy_check(st: SafetensorsFile, path: Path, value: str) -> Check:
    cands = legacy_hashes(path, st)
    if cands is None:
        return Check("sshs_legacy_hash", value, None, None,
                     "header over 1 MiB: the hashed window falls inside the rebuilt header, cannot verify")
    ok = _norm_hex(value)[:8] in cands
    if ok:
        return Check("sshs_legacy_hash", value, cands[0], True, "matches the 64 KiB at 1 MiB of the ss_-only file")
    msg = "differs from sha256 of the 64 KiB at 1 MiB of the file saved with the ss_* metadata only"
    if _norm_hex(value)[:8] == EMPTY_SHA256[:8]:
        msg += "; it is the hash of nothing (the empty-string bug, or a file under 1 MiB when hashed)"
    return Check("sshs_legacy_hash", value, cands[0], False, msg)


def _modelspec_check(st: SafetensorsFile, path: Path, value: str) -> Check:
    cands = modelspec_hashes(path, st)
    empty = _empty_hash_check("modelspec.hash_sha256", value)
    if empty is not None:
        empty.computed = cands.get("file order")
        return empty
    want = "0x" + _norm_hex(value)
    hit = next((name for name, h in cands.items() if h == want), None)
    if hit:
        return Check("modelspec.hash_sha256", value, want, True, f"matches the tensor bytes in {hit}")
    return Check("modelspec.hash_sha256", value, cands.get("file order"), None,
                 "does not match the tensor bytes in file or name order; it depends on the writer's state-dict "
                 "order, which the file does not record, so this alone does not prove the weights changed")


# ---------------------------------------------------------------------------
# Base model
# ---------------------------------------------------------------------------


def agrees(family: str, hint: str) -> bool:
    """Whether a detected family matches a hinted family or family prefix (``wan`` fits ``wan-14b``)."""
    return family == hint or family.startswith(hint + "-") or family.startswith(hint + ":")


# Architectures ``families.llm_family`` recognises by name; other ``llm:<x>:<h>`` are named
# after a module prefix (e.g. a LoRA on a classifier head only) and prove nothing.
_NAMED_LLM_ARCHS = frozenset({"gptneo", "bloom", "gpt2", "distilbert", "roberta", "bert", "vit", "llama"})


def _generic_llm(family: str) -> bool:
    parts = family.split(":")
    return len(parts) == 3 and parts[0] == "llm" and parts[1] not in _NAMED_LLM_ARCHS


def _family_values(meta: dict[str, str], peft_config: dict[str, Any] | None) -> list[tuple[str, str]]:
    vals = [(k, meta[k]) for k in ("ss_base_model_version", "modelspec.architecture", "ss_sd_model_name")
            if isinstance(meta.get(k), str) and meta[k].strip()]
    if str(meta.get("ss_v2", "")).lower() == "true":
        vals.append(("ss_v2", "True"))
    base = (peft_config or {}).get("base_model_name_or_path")
    if isinstance(base, str) and base.strip():
        vals.append(("base_model_name_or_path", base))
    return vals


def family_checks(family: str, meta: dict[str, str], peft_config: dict[str, Any] | None) -> list[Check]:
    """Base-model claims of the header / PEFT config vs the family detected from shapes."""
    out: list[Check] = []
    for field, value in _family_values(meta, peft_config):
        hint = "sd2" if field == "ss_v2" else hinted_family(value)
        if hint is None:
            if field != "ss_sd_model_name":  # a checkpoint file name often names no architecture
                out.append(Check(field, value, family, None, f"names no known architecture; shapes say {family}"))
            continue
        if family.startswith("unknown:") or _generic_llm(family):
            out.append(Check(field, value, family, None, f"says {hint}; the shapes alone name no known architecture"
                             f" ({family}), cannot confirm"))
        elif agrees(family, hint):
            out.append(Check(field, value, family, True, f"agrees with the shapes ({family})"))
        else:
            out.append(Check(field, value, family, False, f"says {hint} but the module names and shapes are {family}"))
    return out


# ---------------------------------------------------------------------------
# Rank and alpha
# ---------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _module_ranks(st: SafetensorsFile) -> dict[str, tuple[int, bool]]:
    """kohya/LyCORIS module prefix -> (rank, is a k×k conv with k > 1)."""
    out: dict[str, tuple[int, bool]] = {}
    for key, info in st.tensors.items():
        role = next((r for r in _RANK_ROLES if key.endswith(r)), None)
        if role is None or not info.shape:
            continue
        conv = len(info.shape) == 4 and math.prod(info.shape[2:]) > 1
        prefix = key[: -len(role)]
        if f"{prefix}.hada_t1" in st.tensors or f"{prefix}.lora_mid.weight" in st.tensors:
            conv = True  # Tucker LoHa / LoCon: the kernel lives in the core tensor
        out[key[: -len(role)]] = (int(info.shape[0]), conv)
    return out


_SCALAR_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4"}


def _scalar(raw: bytes, dtype: str) -> float | None:
    """One stored number (``.alpha`` tensors), decoded without reading the rest of the file."""
    if dtype == "BF16" and len(raw) == 2:
        widened = np.frombuffer(raw, dtype="<u2").astype("<u4") << 16  # bf16 is the top half of a float32
        return float(widened.view("<f4")[0])
    if dtype in _SCALAR_DTYPES and len(raw) == np.dtype(_SCALAR_DTYPES[dtype]).itemsize:
        return float(np.frombuffer(raw, dtype=_SCALAR_DTYPES[dtype])[0])
    return None


def _alphas(st: SafetensorsFile, modules: Iterable[str]) -> dict[str, float]:
    """Module -> its ``.alpha`` value, read tensor by tensor (a whole-file read would double the I/O)."""
    out: dict[str, float] = {}
    with open(st.path, "rb") as fh:
        for m in modules:
            info = st.tensors.get(f"{m}.alpha")
            if info is None or math.prod(info.shape) != 1:
                continue
            v = _scalar(_read_at(fh, st.data_start + info.start, info.nbytes), info.dtype)
            if v is not None and math.isfinite(v):
                out[m] = v
    return out


def _fmt_set(values: Iterable[float]) -> str:
    c = Counter(round(v, 4) for v in values)
    return ", ".join(f"{(int(v) if float(v).is_integer() else v)} ({n})" for v, n in sorted(c.items()))


def _dim_check(field: str, claimed: Any, ranks: list[int]) -> Check | None:
    if claimed is None:
        return None
    want = _num(claimed)
    if not ranks:
        return Check(field, claimed, None, None, "no modules of this kind in the file")
    got = sorted(set(ranks))
    computed = got[0] if len(got) == 1 else got
    if want is None:
        return Check(field, claimed, computed, None, f"not a number; tensor ranks: {_fmt_set(ranks)}")
    if got == [int(want)]:
        return Check(field, claimed, computed, True, f"every module has rank {int(want)}")
    return Check(field, claimed, computed, False, f"tensor ranks are {_fmt_set(ranks)}, not {claimed}"
                 + (" (resized or dynamic-rank file?)" if len(got) > 1 else ""))


def _alpha_check(field: str, claimed: Any, mods: list[str], ranks: dict[str, tuple[int, bool]],
                 alphas: dict[str, float]) -> Check | None:
    if claimed is None or not mods:
        return None
    want = _num(claimed)
    have = [alphas[m] for m in mods if m in alphas]
    if not have:
        implied = sorted({ranks[m][0] for m in mods})
        ok = None if want is None else implied == [want]
        msg = f"no .alpha tensors: readers use alpha = rank ({_fmt_set(ranks[m][0] for m in mods)})"
        return Check(field, claimed, implied[0] if len(implied) == 1 else implied, ok, msg)
    vals = sorted(set(round(a, 4) for a in have))
    computed = vals[0] if len(vals) == 1 else vals
    if want is None:
        return Check(field, claimed, computed, None, f"not a number; alpha tensors: {_fmt_set(have)}")
    bad = [a for a in have if abs(a - want) > ALPHA_RTOL * max(abs(want), 1e-6)]
    missing = len(mods) - len(have)
    if not bad and not missing:
        return Check(field, claimed, computed, True, f"every .alpha tensor is {claimed}")
    msg = f"alpha tensors are {_fmt_set(have)}, not {claimed}" if bad else f"alpha {claimed} on {len(have)} modules"
    if missing:
        msg += f"; {missing} modules have no .alpha (alpha = rank)"
    return Check(field, claimed, computed, False if bad else None, msg)


def network_checks(st: SafetensorsFile) -> list[Check]:
    """``ss_network_dim`` / ``ss_network_alpha`` (+ conv_dim / conv_alpha) vs the tensors."""
    meta = st.metadata
    if "ss_network_dim" not in meta and "ss_network_alpha" not in meta:
        return []
    try:
        args = json.loads(meta.get("ss_network_args") or "{}")
    except json.JSONDecodeError:
        args = {}
    args = args if isinstance(args, dict) else {}
    algo = str(args.get("algo", "")).lower()
    if algo in ("lokr", "full", "diag-oft", "oft", "boft", "ia3", "glora") or "oft" in meta.get("ss_network_module", ""):
        return [Check("ss_network_dim", meta.get("ss_network_dim"), None, None,
                      f"{algo or meta.get('ss_network_module')}: dim is not a plain factor rank, not checked")]
    ranks = _module_ranks(st)
    alphas = _alphas(st, ranks)
    has_conv_args = "conv_dim" in args
    lin = [m for m, (_, conv) in ranks.items() if not conv or not has_conv_args]
    conv = [m for m, (_, c) in ranks.items() if c and has_conv_args]
    out = [
        _dim_check("ss_network_dim", meta.get("ss_network_dim"), [ranks[m][0] for m in lin]),
        _alpha_check("ss_network_alpha", meta.get("ss_network_alpha"), lin, ranks, alphas),
        _dim_check("ss_network_args.conv_dim", args.get("conv_dim"), [ranks[m][0] for m in conv]) if conv else None,
        _alpha_check("ss_network_args.conv_alpha", args.get("conv_alpha"), conv, ranks, alphas),
    ]
    if "dylora" in meta.get("ss_network_module", ""):
        out = [c for c in out if c is None or c.field != "ss_network_dim"]  # DyLoRA stores the largest rank
    return [c for c in out if c is not None]


def peft_checks(ld: LoraDelta, st: SafetensorsFile, cfg: dict[str, Any] | None) -> list[Check]:
    """PEFT ``r`` (with ``rank_pattern``) vs the ``lora_A`` ranks."""
    if not cfg or cfg.get("peft_type", "LORA") != "LORA" or "r" not in cfg:
        return []
    pattern = cfg.get("rank_pattern") or {}
    ranks = []
    for key, info in st.tensors.items():
        if not key.endswith(".lora_A.weight") or not info.shape:
            continue
        module = key[: -len(".lora_A.weight")]
        if any(re.search(rf"(^|\.){re.escape(p)}$", module) or re.fullmatch(p, module) for p in pattern):
            continue
        ranks.append(int(info.shape[0]))
    c = _dim_check("r", cfg.get("r"), ranks)
    return [c] if c is not None else []


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------


def _peft_config(ld: LoraDelta) -> dict[str, Any] | None:
    p = ld.source.get("config")
    if not p:
        return None
    try:
        cfg = json.loads(Path(p).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def check_header(ld: LoraDelta) -> list[dict[str, Any]]:
    """Every header claim of a loaded LoRA checked against its weights.

    Args:
        ld: from ``load_lora`` (its ``source`` names the weights file).

    Returns:
        ``[{"field", "header", "computed", "ok", "message"}]``, hashes first.
    """
    weights = ld.source.get("weights") or ld.source.get("path")
    if not weights or not Path(weights).is_file():
        return []
    cfg = _peft_config(ld)
    path = Path(weights)
    with SafetensorsFile(path) as st:
        parts: list[Callable[[], list[Check]]] = [
            lambda: hash_checks(ld, st, path),
            lambda: family_checks(ld.family, st.metadata, cfg),
            lambda: network_checks(st),
            lambda: peft_checks(ld, st, cfg),
        ]
        checks = [c for part in parts for c in part()]
    return [c.as_dict() for c in checks]


def _json_obj(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return None


def top_tags(tag_frequency: str | None, n: int = TOP_TAGS) -> list[list[Any]]:
    """The most frequent training tags of ``ss_tag_frequency`` (dataset -> tag -> count), summed over datasets."""
    data = _json_obj(tag_frequency)
    counts: Counter[str] = Counter()
    if isinstance(data, dict):
        for tags in data.values():
            if isinstance(tags, dict):
                for tag, c in tags.items():
                    if isinstance(c, (int, float)):
                        counts[str(tag).strip()] += int(c)
    return [[t, c] for t, c in counts.most_common(n) if t]


def _dataset_triggers(meta: dict[str, str]) -> list[str]:
    """kohya dataset folders are named ``<repeats>_<instance prompt>``; the prompt is the usual trigger."""
    data = _json_obj(meta.get("ss_tag_frequency"))
    names = list(data) if isinstance(data, dict) else []
    out = []
    for name in names:
        m = re.fullmatch(r"\d+_(.+)", str(name).strip())
        if m:
            out.append(m.group(1).strip())
    return out


def training_info(ld: LoraDelta) -> dict[str, Any]:
    """Trigger words, training tags and names from the header.

    Returns:
        ``{"trigger_words", "trigger_sources", "top_tags", "output_name", "title", "datasets"}``;
        trigger words come from ``modelspec.trigger_phrase``, kohya dataset folder
        names (``10_sks dog`` -> ``sks dog``) and textual-inversion tokens (``<s1>``).
    """
    meta = ld.header_metadata
    sources: dict[str, list[str]] = {}
    phrase = meta.get("modelspec.trigger_phrase")
    if phrase and phrase.strip():
        sources["modelspec.trigger_phrase"] = [p.strip() for p in phrase.split(",") if p.strip()]
    folders = _dataset_triggers(meta)
    if folders:
        sources["ss_tag_frequency datasets"] = folders
    tokens = [k for k, v in meta.items() if re.fullmatch(r"<[^<>\s]+>", k) and v == "<embed>"]
    if tokens:
        sources["embedding tokens"] = tokens
    words = list(dict.fromkeys(w for ws in sources.values() for w in ws))
    tf = _json_obj(meta.get("ss_tag_frequency"))
    return {
        "trigger_words": words,
        "trigger_sources": sources,
        "top_tags": top_tags(meta.get("ss_tag_frequency")),
        "output_name": meta.get("ss_output_name") or meta.get("name") or None,
        "title": meta.get("modelspec.title") or None,
        "datasets": list(tf) if isinstance(tf, dict) else [],
    }


def info_extras(ld: LoraDelta, store: Any = None, k: int = 10) -> dict[str, Any]:
    """What ``lorasearch info`` adds to ``report.info_dict``.

    Args:
        ld: the loaded LoRA.
        store: an open store (``info --db``): adds a base-model suggestion from its neighbours.
        k: neighbours that vote.

    Returns:
        ``{"checks", "training", "family_candidates"}`` and, with a store, ``"base_suggestion"``.
    """
    from lorasearch.base_inference import family_candidates, suggest_base

    out: dict[str, Any] = {"checks": check_header(ld), "training": training_info(ld),
                           "family_candidates": family_candidates(ld)}
    if store is not None:
        out["base_suggestion"] = suggest_base(store, ld, k=k)
    return out


def mismatches(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The checks that failed (``ok`` is False)."""
    return [c for c in checks if c.get("ok") is False]
