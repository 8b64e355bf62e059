#!/usr/bin/env python3
"""Write the golden fixture and the drift reference distribution of every churn version.

For each `models/churn/<version>/` holding a `model.onnx` and a `manifest.json`, writes:

  golden.json      input rows with the score ONNX Runtime computes for them (load-time smoke
                   and skew check)
  reference.json   the score's and every feature's distribution over the holdout set
                   (reference for drift / PSI)

Both are computed from the model's committed `model.onnx` with ONNX Runtime (float32 numeric
inputs, as serving feeds them) and from the trainer's synthetic data (same generator, seed 4,
same 80/20 split), so a rerun rewrites byte-identical files. The model files themselves are only
read, never written.

Run from anywhere:  python training/write_goldens.py [version ...]   (default: every version)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
from sklearn.model_selection import train_test_split

import train_churn as tc

MODEL_ROOT = tc.ROOT / "models" / "churn"

# Max abs difference allowed between a golden score and what serving computes. The scores are
# float32 (ONNX Runtime's output); a float32 near 1 has a spacing of 6e-8, and a different ONNX
# Runtime build (other CPU kernels, other thread count, other summation order in a tree ensemble
# or a MatMul) moves a score by a few of those. 1e-4 leaves three orders of magnitude of room for
# that while still catching any real change of model or preprocessing (a swapped category, a
# missing scaling, a wrong output column all move scores by 1e-2 or more).
GOLDEN_TOLERANCE = 1e-4
# Golden scores are written rounded to this many decimals (an error of at most 5e-7, 0.5 % of
# the tolerance) so the file does not change with the last bits of a float32 on another CPU.
SCORE_DECIMALS = 6
N_GOLDEN_ROWS = 50
N_BINS = 10


# --------------------------------------------------------------------------- data


class ChurnData:
    """The trainer's data, regenerated exactly as `train_churn.main` draws it."""

    def __init__(self) -> None:
        rng = np.random.default_rng(tc.SEED)
        self.X, self.y = tc.gen_training_data(rng, tc.N_ROWS)
        self.X_tr, self.X_te, self.y_tr, self.y_te = train_test_split(
            self.X, self.y, test_size=0.2, random_state=tc.SEED, stratify=self.y
        )
        # The demo entities are drawn next from the same generator (see train_churn.main).
        self.entities = tc.gen_entity_features(rng, tc.N_DEMO_ENTITIES)


def golden_feature_rows(data: ChurnData) -> list[dict]:
    """The first 50 demo entities with varied request-time features: the same rows as
    training/fixtures/churn_v1.json. Numbers as in data/demo_entities.jsonl (2 decimals)."""
    rows = []
    for i, ent in enumerate(data.entities.head(N_GOLDEN_ROWS).itertuples(index=False)):
        feats = {}
        for c in tc.ENTITY_FEATURES:
            v = getattr(ent, c)
            feats[c] = round(float(v), 2) if c in tc.NUMERIC else str(v)
        feats["support_calls_30d"] = float(i % 11)  # covers 0..10
        feats["channel"] = tc.CHANNELS[(i * 7 + i // 3) % len(tc.CHANNELS)]
        rows.append({k: feats[k] for k in tc.FEATURE_NAMES})
    # Every category value of every category feature appears at least once.
    for f in tc.FEATURES:
        if f["type"] == "category":
            seen = {r[f["name"]] for r in rows}
            missing = set(f["categories"]) - seen
            assert not missing, f"golden rows miss {f['name']} values {sorted(missing)}"
    return rows


# --------------------------------------------------------------------------- scoring


def load_manifest(version_dir: Path) -> dict:
    return json.loads((version_dir / "manifest.json").read_text(encoding="utf-8"))


def session(version_dir: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # as the inference service runs it
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(version_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])


def score(sess: ort.InferenceSession, manifest: dict, df: pd.DataFrame) -> np.ndarray:
    """The manifest's output column, as ONNX Runtime computes it on float32 numeric inputs."""
    names = [f["name"] for f in manifest["features"]]
    assert names == tc.FEATURE_NAMES, f"unexpected features {names}"
    out = manifest["output"]
    (values,) = sess.run([out["name"]], tc.onnx_feeds(df))
    return np.asarray(values)[:, out["index"]].astype(np.float32)


def round_score(x) -> float:
    return round(float(x), SCORE_DECIMALS)


# --------------------------------------------------------------------------- golden


def golden(version_dir: Path, rows: list[dict]) -> dict:
    manifest = load_manifest(version_dir)
    df = pd.DataFrame(rows)[tc.FEATURE_NAMES]
    scores = score(session(version_dir), manifest, df)
    assert np.all(np.isfinite(scores)), "non-finite golden score"
    return {
        "tolerance": GOLDEN_TOLERANCE,
        "rows": [{"features": r, "score": round_score(s)} for r, s in zip(rows, scores)],
    }


def check_golden(version_dir: Path, golden_obj: dict) -> float:
    """Re-score the golden rows from scratch; return the max abs difference."""
    manifest = load_manifest(version_dir)
    df = pd.DataFrame([r["features"] for r in golden_obj["rows"]])[tc.FEATURE_NAMES]
    got = score(session(version_dir), manifest, df).astype(np.float64)
    want = np.array([r["score"] for r in golden_obj["rows"]], dtype=np.float64)
    return float(np.max(np.abs(got - want)))


# --------------------------------------------------------------------------- reference


def bin_index(edges: list[float], values: np.ndarray) -> np.ndarray:
    """The binning rule consumers must use: bin i holds edges[i] <= v < edges[i+1]; the last
    bin also holds v == edges[-1]; values below edges[0] fall into the first bin and values
    above edges[-1] into the last (edges[0]/edges[-1] are the observed min/max)."""
    inner = np.asarray(edges[1:-1], dtype=np.float64)
    return np.searchsorted(inner, np.asarray(values, dtype=np.float64), side="right")


def number_summary(values: np.ndarray, round_to: int | None) -> dict:
    """Deciles (observed values, `inverted_cdf`) with ties merged: 10 bins, fewer when a
    discrete feature has fewer distinct deciles. Fractions are counted with `bin_index`."""
    v = np.asarray(values, dtype=np.float64)
    qs = np.quantile(v, np.linspace(0.0, 1.0, N_BINS + 1), method="inverted_cdf")
    if round_to is not None:
        qs = np.round(qs, round_to)
    edges = sorted({float(q) for q in qs})
    if len(edges) < 2:  # constant column: one bin
        edges = [edges[0], edges[0]]
    counts = np.bincount(bin_index(edges, v), minlength=len(edges) - 1)
    fractions = [round(float(c) / len(v), 6) for c in counts]
    assert abs(sum(fractions) - 1.0) < 1e-5
    return {"edges": edges, "fractions": fractions}


def reference(version_dir: Path, holdout: pd.DataFrame) -> dict:
    manifest = load_manifest(version_dir)
    scores = score(session(version_dir), manifest, holdout)
    assert np.all(np.isfinite(scores)), "non-finite holdout score"
    score_summary = number_summary(scores, SCORE_DECIMALS)
    assert len(score_summary["edges"]) == N_BINS + 1, "score deciles tie: fewer than 10 bins"
    features = {}
    for f in manifest["features"]:
        col = holdout[f["name"]]
        if f["type"] == "number":
            features[f["name"]] = number_summary(col.to_numpy(dtype=np.float64), None)
        else:
            counts = col.value_counts()
            cats = {c: round(float(counts.get(c, 0)) / len(col), 6) for c in f["categories"]}
            assert abs(sum(cats.values()) - 1.0) < 1e-5, f"{f['name']}: values outside categories"
            features[f["name"]] = {"categories": cats}
    return {"rows": int(len(holdout)), "score": score_summary, "features": features}


def psi(ref: dict, values: np.ndarray, eps: float = 1e-4) -> float:
    """PSI of `values` against a number summary (used to sanity-check the reference)."""
    counts = np.bincount(bin_index(ref["edges"], values), minlength=len(ref["fractions"]))
    actual = counts / max(len(values), 1)
    total = 0.0
    for e, a in zip(ref["fractions"], actual):
        e, a = max(e, eps), max(float(a), eps)
        total += (a - e) * math.log(a / e)
    return total


# --------------------------------------------------------------------------- main


def write_for_version(version_dir: Path, data: ChurnData) -> dict:
    """Write golden.json and reference.json of one version; return figures for the summary."""
    g = golden(version_dir, golden_feature_rows(data))
    tc.write_json(version_dir / "golden.json", g)
    diff = check_golden(version_dir, json.loads((version_dir / "golden.json").read_text()))
    assert diff <= GOLDEN_TOLERANCE, f"{version_dir}: golden does not reproduce ({diff})"

    r = reference(version_dir, data.X_te)
    tc.write_json(version_dir / "reference.json", r)
    # PSI of the holdout against its own reference is ~0; of a shifted score it is large.
    manifest = load_manifest(version_dir)
    s = score(session(version_dir), manifest, data.X_te)
    self_psi = psi(r["score"], s)
    assert self_psi < 1e-3, f"{version_dir}: self PSI {self_psi}"
    return {"golden_rows": len(g["rows"]), "golden_diff": diff, "self_psi": self_psi}


def versions() -> list[str]:
    return sorted(
        (p.name for p in MODEL_ROOT.iterdir() if (p / "model.onnx").exists() and (p / "manifest.json").exists()),
        key=lambda v: (len(v), v),
    )


def main(argv: list[str]) -> int:
    data = ChurnData()
    for v in argv or versions():
        vdir = MODEL_ROOT / v
        figs = write_for_version(vdir, data)
        print(
            f"churn/{v}: golden {figs['golden_rows']} rows (reproduces within {figs['golden_diff']:.1e}, "
            f"tolerance {GOLDEN_TOLERANCE:g}), reference {len(data.X_te)} holdout rows "
            f"(self PSI {figs['self_psi']:.1e})"
        )
        for name in ("golden.json", "reference.json"):
            p = vdir / name
            print(f"  {p.relative_to(tc.ROOT).as_posix()} ({p.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
