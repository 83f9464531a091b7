"""Attribution maths (Gram matrices, partial cosines, greedy selection, projection) and calibration."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lorasearch.attribution import calibration as cal
from lorasearch.attribution import derivatives as dv
from lorasearch.attribution.mixture import (
    explained_share,
    greedy_select,
    least_squares,
    module_gram,
    partial_scores,
    project,
    prune,
    target_basis,
)
from lorasearch.delta import Dense, Factored, Kronecker
from lorasearch.embed import embed
from lorasearch.formats import load_lora
from lorasearch.frobenius import inner
from lorasearch.store import Store


def _fac(rng: np.random.Generator, p: int = 12, q: int = 10, r: int = 3, scale: float = 1.0) -> Factored:
    return Factored(rng.standard_normal((p, r)), rng.standard_normal((r, q)), scale)


def test_module_gram_matches_pairwise_inner_products() -> None:
    rng = np.random.default_rng(0)
    ds = [_fac(rng, scale=0.5), None, Dense(rng.standard_normal((12, 10))), _fac(rng, r=1, scale=2.0),
          Kronecker(rng.standard_normal((3, 2)), rng.standard_normal((4, 5)), 0.7)]
    g = module_gram(ds)
    for i, a in enumerate(ds):
        for j, b in enumerate(ds):
            want = 0.0 if a is None or b is None else inner(a, b)
            assert g[i, j] == pytest.approx(want, rel=1e-9, abs=1e-9)


def _vectors(rng: np.random.Generator, n: int = 20, d: int = 400) -> np.ndarray:
    return rng.standard_normal((d, n))


def test_partial_scores_are_residual_cosines() -> None:
    rng = np.random.default_rng(1)
    x = _vectors(rng)
    y = x[:, 0] * 2 + rng.standard_normal(x.shape[0])
    g, b, t2 = x.T @ x, x.T @ y, float(y @ y)
    plain = partial_scores(g, b, t2, [])
    assert plain == pytest.approx(b / np.sqrt(t2 * np.diag(g)))
    chosen = [0, 3]
    got = partial_scores(g, b, t2, chosen)
    xs = x[:, chosen]
    proj = xs @ np.linalg.lstsq(xs, np.eye(x.shape[0]), rcond=None)[0]
    r = y - proj @ y
    for i in range(x.shape[1]):
        if i in chosen:
            assert np.isnan(got[i])
            continue
        xp = x[:, i] - proj @ x[:, i]
        assert got[i] == pytest.approx(r @ xp / np.linalg.norm(r) / np.linalg.norm(xp), rel=1e-8)
    dup = np.column_stack([x, x[:, 0]])  # a duplicate of a chosen vector has no part of its own
    assert np.isnan(partial_scores(dup.T @ dup, dup.T @ y, t2, [0])[-1])


def test_greedy_selection_recovers_a_planted_mixture() -> None:
    rng = np.random.default_rng(2)
    x = _vectors(rng)
    truth = {4: 0.8, 11: -0.5, 17: 0.3}
    y = sum(c * x[:, i] for i, c in truth.items()) + 0.01 * rng.standard_normal(x.shape[0])
    g, b, t2 = x.T @ x, x.T @ y, float(y @ y)
    chosen = greedy_select(g, b, t2, lambda i, s, pos: s > 0.3, max_terms=6)
    assert sorted(chosen) == sorted(truth)
    coef = least_squares(g, b, chosen)
    assert dict(zip(chosen, coef)) == pytest.approx(truth, abs=0.01)
    assert explained_share(g, b, t2, chosen, coef) > 0.99
    # a weak extra term is pruned when it fails the test given the others
    kept = prune(g, b, t2, chosen + [0], lambda i, s, n: s > 0.3)
    assert sorted(kept) == sorted(truth)


def test_projection_fits_an_svd_compressed_merge_without_bias() -> None:
    rng = np.random.default_rng(3)
    comps = [_fac(rng, 40, 30, 4) for _ in range(3)]
    coefs = np.array([0.9, -0.6, 0.4])
    up = np.concatenate([c * f.up for c, f in zip(coefs, comps)], axis=1)
    down = np.concatenate([f.down for f in comps])
    u, v = dv.truncate(up, down, 6)  # rank 12 -> 6
    target = Factored(u, v)
    basis = target_basis(target)
    assert basis is not None and basis.singular.size == 6
    proj = np.stack([project(f, basis).ravel() for f in comps])
    tproj = np.diag(basis.singular).ravel()
    c_proj = np.linalg.solve(proj @ proj.T, proj @ tproj)
    assert c_proj == pytest.approx(coefs, abs=1e-8)
    g = module_gram(comps)
    b = np.array([inner(target, f) for f in comps])
    assert np.max(np.abs(np.linalg.solve(g, b) - coefs)) > 0.05  # plain least squares is biased by the truncation
    assert target_basis(Dense(rng.standard_normal((5, 4)))) is None


# --------------------------------------------------------------------------- calibration


NULL = np.sort(np.abs(np.random.default_rng(4).normal(0, 0.01, 1000)))


@pytest.mark.parametrize("score, low, high", [
    (0.0, 0.99, 1.0),
    (0.01, 0.25, 0.4),  # ~32 % of a half-normal beyond 1 sigma: empirical
    (0.04, 1e-7, 1e-3),  # beyond the sample: exponential tail, below 1/n
    (0.5, 0.0, 1e-30),
])
def test_tail_fpr(score: float, low: float, high: float) -> None:
    assert low <= cal.tail_fpr(NULL, score) <= high


def test_tail_fpr_is_monotone_and_floored() -> None:
    s = np.linspace(0, 0.1, 200)
    f = [cal.tail_fpr(NULL, x) for x in s]
    assert all(a >= b for a, b in zip(f, f[1:]))
    for k in (1, 5, 50):  # k null scores at or above: the fpr is never below k/n
        assert cal.tail_fpr(NULL, NULL[-k]) >= k / NULL.size


def test_small_null_uses_the_prior() -> None:
    small = np.sort(np.abs(np.random.default_rng(5).normal(0, 0.01, 20)))
    assert cal.tail_fpr(small, 0.24) == pytest.approx(cal.prior_fpr(0.24)) and cal.prior_fpr(0.24) < 1e-4 < cal.prior_fpr(0.2)
    assert cal.tail_fpr(small, 0.0) == 1.0


@pytest.mark.parametrize("sources, want", [
    ([{"repo": "Owner/Repo", "source": "hf:Owner/Repo", "path": "a.safetensors"}], {"repo:owner/repo"}),
    ([{"source": "/data/runs", "path": "/data/runs/run1/checkpoint-500/adapter_model.safetensors"}], {"dir:/data/runs/run1"}),
    ([{"source": "/data/runs", "path": "/data/runs/run1/step_200/lora.safetensors"}], {"dir:/data/runs/run1"}),
    ([{"source": "/downloads", "path": "/downloads/x.safetensors"}], set()),  # a collection folder is no lineage
    ([{"source": "/x/a.safetensors", "path": "/x/a.safetensors"}], {"dir:/x"}),
    ([{"repo": "a/b", "path": "x"}, {"source": "/d", "path": "/d/e/f.safetensors"}], {"repo:a/b", "dir:/d/e"}),
])
def test_lineage_keys(sources: list[dict[str, str]], want: set[str]) -> None:
    assert cal.lineage_keys(sources) == want


def test_calibration_refreshes_on_index_updates(shared_loras: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = sorted(shared_loras.glob("*pytorch_lora_weights.safetensors"))
    lds = [ld for ld in (load_lora(p) for p in files[:12]) if ld.family == "sd15"][:6]
    assert len(lds) == 6
    store = Store(tmp_path / "db")
    store.add_many([(ld, embed(ld), {"source": "x", "repo": f"r/{i}", "path": "w.safetensors"}) for i, ld in enumerate(lds[:5])])
    cal.clear_memo()
    calls: list[str] = []
    real = cal.compute_calibration
    monkeypatch.setattr(cal, "compute_calibration", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    first = cal.get_calibration(store, "sd15")
    assert calls == ["sd15"] and first.n_loras == 5 and first.cosine.size == 10 and first.method == "prior"
    saved = json.loads(cal.calibration_path(store, "sd15").read_text())
    assert saved["generation"] == first.generation and len(saved["cosine"]) == 10
    cal.clear_memo()
    assert cal.get_calibration(store, "sd15").generation == first.generation and calls == ["sd15"]  # read from the file
    store.add(lds[5], embed(lds[5]), {"source": "x", "repo": "r/5", "path": "w.safetensors"})
    second = cal.get_calibration(store, "sd15")
    assert calls == ["sd15", "sd15"] and second.generation > first.generation and second.n_loras == 6
    store.close()


def test_tail_fpr_keeps_a_cluster_of_look_alike_unrelated_pairs() -> None:
    # most unrelated pairs near 0, some alike (one style, one seed) up to 0.85: those stay
    # insignificant, while a score above the whole null (a further-trained copy) is not
    rng = np.random.default_rng(6)
    null = np.sort(np.concatenate([np.abs(rng.normal(0, 0.05, 9000)), rng.uniform(0.3, 0.85, 700)]))
    assert cal.tail_fpr(null, 0.68) > 1e-3
    assert cal.tail_fpr(null, 0.85) > 1e-4
    assert cal.tail_fpr(null, 0.95) < 1e-4
