"""The streaming reader: ``load_and_embed`` gives what ``embed(load_lora(...))`` gives, bit for bit."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from lorasearch import read_embed, sketch, sketch_helper
from lorasearch.embed import embed
from lorasearch.errors import BadInput
from lorasearch.formats import buffer_pool, load_lora, safetensors_file
from lorasearch.read_embed import load_and_embed

REAL = [  # the real kohya-named file (float32: nothing to defer) and other readers' files (never deferred)
    "timohavdk__sd-lora__new.safetensors",
    "cloneofsimo__lora__example_loras__analog_svd_rank4.safetensors",
    "Haseebae__Synthetic_dataset_generator_with_stable_diffusion__pytorch_lora_weights.safetensors",
]


def _kohya_file(folder: Path, dtype: str, rank: int = 8, nan: bool = False) -> Path:
    """A kohya LoCon file: linear and 3×3 conv modules, 16-bit factors, float32 alphas (not one dtype)."""
    rng = np.random.default_rng(0)
    np_dtype = np.float16 if dtype == "F16" else np.float32
    shapes = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj": (2560, 320),
        "lora_unet_down_blocks_0_resnets_0_conv1": (320, 320, 3, 3),
        "lora_te_text_model_encoder_layers_0_mlp_fc1": (3072, 768),
    }
    t: dict[str, np.ndarray] = {}
    for name, (o, i, *kern) in shapes.items():
        t[f"{name}.lora_down.weight"] = rng.standard_normal((rank, i, *kern)).astype(np.float32)
        t[f"{name}.lora_up.weight"] = rng.standard_normal((o, rank, *([1] * len(kern)))).astype(np.float32) * 0.01
        t[f"{name}.alpha"] = np.array(rank / 2, np.float32)
    if nan:
        t["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"][1, 2, 0, 0] = np.nan
    path = folder / f"kohya_{dtype}{'_nan' if nan else ''}.safetensors"
    if dtype == "BF16":  # safetensors.numpy has no bfloat16: write the upper halves of float32 by hand
        import torch
        from safetensors.torch import save_file as save_torch

        save_torch({k: (torch.from_numpy(v).bfloat16() if v.ndim else torch.from_numpy(v)) for k, v in t.items()}, str(path))
    else:
        save_file({k: (v.astype(np_dtype) if v.ndim else v) for k, v in t.items()}, str(path))
    return path


def _flux_kohya_file(folder: Path, shared_keys: Path) -> Path:
    """Random BF16 values in a real Flux kohya layout (fused single-block linears are split by rows)."""
    import torch
    from safetensors.torch import save_file as save_torch

    d = json.loads((shared_keys / "li_flux1_kohya_dracofelis.json").read_text())
    g = torch.Generator().manual_seed(0)
    t = {k: torch.randn(v["shape"], generator=g).bfloat16() for k, v in d["tensors"].items()}
    path = folder / "flux_kohya.safetensors"
    save_torch(t, str(path), metadata={k: str(v) for k, v in (d.get("metadata") or {}).items()})
    return path


@pytest.fixture
def defer_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defer tensors of any size, also in small one-dtype files, and read every data section in the
    background (normally only large files are)."""
    monkeypatch.setattr(safetensors_file, "_FAST_CAST_MIN", 16)
    monkeypatch.setattr(safetensors_file, "_ONE_PASS_MAX", 0)
    monkeypatch.setattr(safetensors_file, "_PREFETCH_MIN", 0)


def _files(tmp_path: Path, shared_loras: Path, shared_keys: Path) -> list[Path]:
    return [_kohya_file(tmp_path, "F16"), _kohya_file(tmp_path, "BF16"), _flux_kohya_file(tmp_path, shared_keys),
            *(shared_loras / n for n in REAL)]


@pytest.mark.parametrize("stacked", [True, False], ids=["small-modules-stacked", "nothing-stacked"])
def test_same_bits_as_two_step(tmp_path: Path, shared_loras: Path, shared_keys: Path, defer_everything: None,
                               monkeypatch: pytest.MonkeyPatch, stacked: bool) -> None:
    if not stacked:  # every module through the scratch buffers
        monkeypatch.setattr(sketch, "_BATCH_MAX", 0)
    for path in _files(tmp_path, shared_loras, shared_keys):
        ld0 = load_lora(path)
        e0 = embed(ld0)
        for keep in (True, False):
            ld, e = load_and_embed(path, keep_factors=keep)
            assert ld.family == ld0.family and ld.source == ld0.source and ld.modules.keys() == ld0.modules.keys()
            assert e.sketches.keys() == e0.sketches.keys() and e.vectors.keys() == e0.vectors.keys()
            for n, z in e0.sketches.items():
                assert np.array_equal(e.sketches[n], z), (path.name, n)
            for v, x in e0.vectors.items():
                assert np.array_equal(e.vectors[v], x), (path.name, v)
            if keep:  # every factor written, as load_lora writes it
                for n, d in ld0.modules.items():
                    assert np.array_equal(ld.modules[n].up, d.up) and np.array_equal(ld.modules[n].down, d.down), n
            else:
                assert all(d.up.size == 0 for d in ld.modules.values() if hasattr(d, "up"))


def test_deferral_happens(tmp_path: Path) -> None:
    path = _kohya_file(tmp_path, "F16", rank=64)  # factors of 20k+ elements, float32 alphas: per-tensor path
    from lorasearch.formats.load import opened_lora

    with opened_lora(path, defer=True) as (ld, st):
        assert st.unfilled == 8  # every up and down factor
        st.fill_all()
        assert st.unfilled == 0
    with opened_lora(path) as (ld, st):
        assert st.unfilled == 0


@pytest.mark.parametrize("keep", [True, False])
def test_nan_in_a_deferred_factor_is_reported(tmp_path: Path, defer_everything: None, keep: bool) -> None:
    path = _kohya_file(tmp_path, "F16", nan=True)
    with pytest.raises(BadInput) as e:
        load_lora(path)
    assert e.value.code == "non_finite"
    with pytest.raises(BadInput) as e2:
        load_and_embed(path, keep_factors=keep)
    assert e2.value.code == "non_finite" and str(e2.value) == str(e.value)


def test_pool_lends_a_block_only_when_nothing_holds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buffer_pool, "POOL_MIN_BYTES", 1 << 10)
    buffer_pool.clear()
    a = buffer_pool.empty(1 << 12)
    view = a[10:20].view(np.uint8)
    del a
    b = buffer_pool.empty(1 << 12)  # the first block is still held through ``view``
    assert buffer_pool.pooled_bytes() == 2 << 12
    a_ptr, b_ptr = view.__array_interface__["data"][0] - 10, b.__array_interface__["data"][0]
    assert a_ptr != b_ptr
    del view
    c = buffer_pool.empty(1 << 11)  # now the first block is idle again and is lent out
    assert c.__array_interface__["data"][0] == a_ptr and buffer_pool.pooled_bytes() == 2 << 12
    del b, c
    buffer_pool.clear()


def test_widen_into_rebases_sliced_and_transposed_views(tmp_path: Path, defer_everything: None) -> None:
    path = _kohya_file(tmp_path, "F16")
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_up.weight"
    with safetensors_file.SafetensorsFile(path) as st:
        want = st.get(key).copy()
    views = {
        "whole": lambda a: a.reshape(a.shape[0], -1),
        "rows": lambda a: a.reshape(a.shape[0], -1)[640:1280],
        "transposed": lambda a: a.reshape(a.shape[0], -1).T,
        "reversed": lambda a: a.reshape(a.shape[0], -1)[::-1],
    }
    for name, make in views.items():
        with safetensors_file.SafetensorsFile(path) as st:
            st.defer = True
            view = make(st.get_deferred(key))
            assert st.unfilled == 1
            got = st.widen_into(view, np.empty(want.size, np.float32))
            assert got is not None and st.unfilled == 0, name
            assert np.array_equal(got, make(want)), name
            assert st.widen_into(view, np.empty(want.size, np.float32)) is None  # consumed: no longer deferred


def test_prefetch_reports_a_file_cut_after_opening(tmp_path: Path, defer_everything: None) -> None:
    path = _kohya_file(tmp_path, "F16")
    st = safetensors_file.SafetensorsFile(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)
    st.prefetch()
    with pytest.raises(BadInput) as e:
        st.hashes()
    st.close()
    assert e.value.code == "truncated"


def test_fill_writes_a_tensor_another_view_consumed(tmp_path: Path, defer_everything: None) -> None:
    """Two modules sharing one fused tensor: the first widens it elsewhere, the second still gets its values."""
    path = _kohya_file(tmp_path, "F16")
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_up.weight"
    with safetensors_file.SafetensorsFile(path) as st:
        want = st.get(key).copy()
    with safetensors_file.SafetensorsFile(path) as st:
        st.defer = True
        whole = st.get_deferred(key)
        first, second = whole[:1280], whole[1280:]
        assert st.widen_into(first, np.empty(want.size, np.float32)) is not None
        st.fill(second)
        assert np.array_equal(second, want[1280:])


def _assert_same_embedding(e: Any, e0: Any, what: str) -> None:
    assert list(e.sketches) == list(e0.sketches) and e.vectors.keys() == e0.vectors.keys(), what
    for n, z in e0.sketches.items():
        assert np.array_equal(e.sketches[n], z), (what, n)
    for v, x in e0.vectors.items():
        assert np.array_equal(e.vectors[v], x), (what, v)


@pytest.fixture
def helper() -> sketch_helper.SketchHelper:
    """This process's sketch helper, started and ready (a real child process)."""
    if not sketch_helper.enabled():
        pytest.skip("the sketch helper needs two cores")
    assert sketch_helper.wait_ready(120), "the sketch helper did not start"
    h = sketch_helper.get()
    assert h is not None
    h.release()
    return h


@pytest.mark.parametrize("stacked", [True, False], ids=["small-modules-stacked", "nothing-stacked"])
@pytest.mark.parametrize("hashes", [True, False], ids=["hashed-whole-file-read", "tail-left-to-the-helper"])
def test_helper_gives_the_same_bits(tmp_path: Path, shared_loras: Path, shared_keys: Path, defer_everything: None,
                                    monkeypatch: pytest.MonkeyPatch, helper: sketch_helper.SketchHelper,
                                    stacked: bool, hashes: bool) -> None:
    if not stacked:
        monkeypatch.setattr(sketch, "_BATCH_MAX", 0)
    calls: list[int] = []
    tails: list[bool] = []
    real_items = read_embed._helper_items

    def counted(ld: Any, st: Any) -> list[Any]:
        items = real_items(ld, st)
        calls.append(len(items))
        ahead = st.prefetched
        tails.append(ahead < st.size - st.data_start)
        if tails[-1]:  # the helper's modules are those this process did not read ahead
            assert all(min(it[4][1], it[5][1]) >= ahead for it in items)
        return items

    monkeypatch.setattr(read_embed, "_helper_items", counted)
    for path in _files(tmp_path, shared_loras, shared_keys):
        e0 = embed(load_lora(path))
        ld, e = load_and_embed(path, keep_factors=False, helper=True, hashes=hashes)
        _assert_same_embedding(e, e0, path.name)
        if hashes:
            assert ld.source["file_sha256"] == load_lora(path).source["file_sha256"]
    assert sum(calls) > 0 and not helper.broken  # the helper did sketch modules
    assert any(tails) is not hashes  # without hashes the helper's part of the file is not read here


def test_partial_prefetch_only_for_a_reader_that_defers(tmp_path: Path, shared_loras: Path,
                                                       defer_everything: None) -> None:
    """A reader that reads every tensor while it decodes has the whole data section read ahead."""
    from lorasearch.formats.load import opened_lora

    for path, partial in ((_kohya_file(tmp_path, "F16", rank=64), True), (shared_loras / REAL[2], False)):
        with opened_lora(path, hashes=False, defer=True, prefetch_upto=0.5) as (ld, st):
            assert (st.prefetched < st.size - st.data_start) is partial, path.name
            st.fill_all()
        assert np.array_equal(embed(ld).vectors["delta"], embed(load_lora(path)).vectors["delta"])


def test_partial_prefetch_reads_the_rest_when_asked(tmp_path: Path) -> None:
    """A prefetch of the first part of the data section: tensors past it are read on their own,
    the whole section (hashes) once asked for, and a file cut in that part is reported."""
    from lorasearch.hashes import file_hashes

    rng = np.random.default_rng(1)
    t = {f"t{i:02d}": rng.standard_normal(300_000).astype(np.float16) for i in range(64)}  # 38 MB
    t["alpha"] = np.ones(1, np.float32)  # two dtypes: read tensor by tensor, not widened in one pass
    path = tmp_path / "big.safetensors"
    save_file(t, str(path))
    want = {k: v.astype(np.float32) for k, v in t.items()}
    with safetensors_file.SafetensorsFile(path, prefetch=True, prefetch_upto=0.5) as st:
        n = st.size - st.data_start
        assert 0 < st.prefetched <= n // 2 and st.prefetched % 4096 == 0
        tail = [k for k in st.keys() if st.tensors[k].start >= st.prefetched]
        assert tail and np.array_equal(st.get(tail[-1]), want[tail[-1]])
        assert st._data is None  # the rest of the section is not read for one tensor
        for k in st.keys():
            assert np.array_equal(st.get(k), want[k]), k
        assert st.hashes() == file_hashes(path, st.header_len)
        assert st._data is not None
    with safetensors_file.SafetensorsFile(path, prefetch=True, prefetch_upto=0.5) as st:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 1000)
        head = min(st.keys(), key=lambda k: st.tensors[k].start)
        assert np.array_equal(st.get(head), want[head])  # the part read ahead is whole
        with pytest.raises(BadInput) as e:
            st.hashes()
        assert e.value.code == "truncated"


def test_helper_that_dies_is_replaced_by_local_work(tmp_path: Path, defer_everything: None,
                                                     helper: sketch_helper.SketchHelper) -> None:
    path = _kohya_file(tmp_path, "F16", rank=64)
    e0 = embed(load_lora(path))
    helper._proc.kill()
    helper._proc.wait()
    _, e = load_and_embed(path, keep_factors=False, helper=True)
    assert helper.broken
    _assert_same_embedding(e, e0, path.name)
    assert sketch_helper.wait_ready(120)  # a new one is started


@pytest.mark.parametrize("keep", [True, False])
def test_helper_nan_is_reported_like_load_lora(tmp_path: Path, defer_everything: None,
                                               monkeypatch: pytest.MonkeyPatch,
                                               helper: sketch_helper.SketchHelper, keep: bool) -> None:
    monkeypatch.setattr(read_embed, "HELPER_SHARE", 1.0)  # every module it can take, the NaN one included
    path = _kohya_file(tmp_path, "F16", nan=True)
    with pytest.raises(BadInput) as e:
        load_lora(path)
    with pytest.raises(BadInput) as e2:
        load_and_embed(path, keep_factors=keep, helper=True)
    assert e2.value.code == "non_finite" and str(e2.value) == str(e.value)


def test_helper_refuses_a_changed_file(tmp_path: Path) -> None:
    path = _kohya_file(tmp_path, "F16")
    st = path.stat()
    with pytest.raises(OSError, match="changed"):
        sketch_helper._sketch_job(str(path), (st.st_dev, st.st_ino, st.st_size + 1, st.st_mtime_ns), 8, "sd15", 8, [],
                                  [np.empty(0, np.uint16), np.empty(0, np.float32)] * 2)


def test_helper_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASEARCH_SKETCH_HELPER", "0")
    assert not sketch_helper.enabled() and sketch_helper.get() is None


def test_helper_with_kept_factors(tmp_path: Path, shared_keys: Path, defer_everything: None,
                                  helper: sketch_helper.SketchHelper) -> None:
    """keep_factors=True: the helper sketches, this process writes every factor; both as load_lora + embed."""
    for path in (_kohya_file(tmp_path, "F16"), _kohya_file(tmp_path, "BF16"), _flux_kohya_file(tmp_path, shared_keys)):
        ld0 = load_lora(path)
        e0 = embed(ld0)
        ld, e = load_and_embed(path, keep_factors=True, hashes=False, helper=True)
        assert not helper.broken
        _assert_same_embedding(e, e0, path.name)
        for n, d in ld0.modules.items():
            assert np.array_equal(ld.modules[n].up, d.up) and np.array_equal(ld.modules[n].down, d.down), n


@pytest.mark.parametrize(("workers", "cores", "off"), [(1, 2, False), (2, 2, True), (2, 4, False), (3, 4, True)])
def test_pool_workers_leave_the_helper_off_when_they_fill_the_cores(monkeypatch: pytest.MonkeyPatch, workers: int,
                                                                   cores: int, off: bool) -> None:
    from indexer import pipeline

    monkeypatch.setenv(sketch_helper.ENV, "1")  # recorded, so the value _worker_init writes is undone too
    monkeypatch.setattr(sketch_helper, "cores", lambda: cores)
    pipeline._worker_init(workers)
    assert sketch_helper.enabled() is not off
    with sketch_helper.disabled():  # a Ray task's scope
        assert not sketch_helper.enabled()
    assert sketch_helper.enabled() is not off


def test_helper_that_hangs_is_stopped(tmp_path: Path, defer_everything: None, monkeypatch: pytest.MonkeyPatch,
                                      helper: sketch_helper.SketchHelper) -> None:
    import signal

    path = _kohya_file(tmp_path, "F16", rank=64)
    e0 = embed(load_lora(path))
    monkeypatch.setattr(sketch_helper, "RESULT_TIMEOUT", 0.5)
    helper._proc.send_signal(signal.SIGSTOP)  # alive, never answers
    try:
        _, e = load_and_embed(path, keep_factors=False, helper=True)
    finally:
        if helper._proc.poll() is None:
            helper._proc.send_signal(signal.SIGCONT)
    assert helper.broken and helper._proc.poll() is not None
    _assert_same_embedding(e, e0, path.name)
    assert sketch_helper.wait_ready(120)


def test_prefetch_started_at_open_stops_with_a_bad_header(tmp_path: Path, defer_everything: None) -> None:
    """The data section is read while the header is parsed; a header that fails leaves no reading thread."""
    import struct
    import threading

    path = tmp_path / "bad_header.safetensors"
    head = b'{"w": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}'  # no closing brace
    path.write_bytes(struct.pack("<Q", len(head)) + head + bytes(8))
    with pytest.raises(BadInput) as e:
        safetensors_file.SafetensorsFile(path, prefetch=True)
    assert e.value.code == "bad_header"
    assert not [t for t in threading.enumerate() if t.name == "safetensors-prefetch"]
    good = _kohya_file(tmp_path, "F16")
    with safetensors_file.SafetensorsFile(good, prefetch=True) as st:
        assert st._prefetch is not None or st._data is not None  # started before the parse finished
        key = st.keys()[0]
        want = st.get(key).copy()
    with safetensors_file.SafetensorsFile(good) as st:
        assert np.array_equal(st.get(key), want)


def test_summary_made_in_place_equals_a_new_one(tmp_path: Path) -> None:
    from lorasearch.delta import without_values

    path = _kohya_file(tmp_path, "F16")
    fresh = without_values(load_lora(path))
    reused = without_values(load_lora(path), reuse=True)
    assert fresh.modules.keys() == reused.modules.keys()
    for n, d in fresh.modules.items():
        r = reused.modules[n]
        assert (type(r), r.rank, r.scale, r.shape, r.matrix_shape) == (type(d), d.rank, d.scale, d.shape, d.matrix_shape)
        assert r.up.size == 0 and r.down.size == 0


def test_keep_freed_memory_leaves_a_users_malloc_tuning(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes

    def no_libc(*_: Any) -> None:
        raise AssertionError("mallopt must not be called")

    monkeypatch.setattr(buffer_pool, "_malloc_tuned", False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    buffer_pool.keep_freed_memory()
    assert buffer_pool._malloc_tuned
    buffer_pool.keep_freed_memory()  # once per process
