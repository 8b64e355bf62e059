#!/usr/bin/env python3
"""Train the demo churn model and write its committed artifacts and fixtures.

Deterministic (seed 4). Writes, relative to the repository root:

  models/churn/1/model.onnx          ONNX graph (one input per feature)
  models/churn/1/manifest.json       feature contract read by the serving mesh
  models/churn/aliases.json          {"production": "1"}
  data/demo_entities.jsonl           1,000 entities that seed the feature store
  training/fixtures/churn_v1.json    training/serving skew fixture (50 rows)

Run from anywhere:  python training/train_churn.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import sklearn
import skl2onnx
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType, StringTensorType
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

SEED = 4
N_ROWS = 20_000
N_DEMO_ENTITIES = 1_000
N_FIXTURE_ROWS = 50
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
MAX_ABS_DIFF = 1e-5

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "churn" / "1"
ALIASES_PATH = ROOT / "models" / "churn" / "aliases.json"
ENTITIES_PATH = ROOT / "data" / "demo_entities.jsonl"
FIXTURE_PATH = ROOT / "training" / "fixtures" / "churn_v1.json"

CONTRACTS = ["month_to_month", "one_year", "two_year"]
PAYMENT_METHODS = ["card", "bank_transfer", "electronic_check", "mailed_check"]
INTERNET_SERVICES = ["dsl", "fiber", "none"]
CHANNELS = ["web", "mobile", "store"]

# Feature contract, in manifest order.
FEATURES = [
    {"name": "tenure_months", "type": "number", "source": "entity"},
    {"name": "monthly_charges", "type": "number", "source": "entity"},
    {"name": "total_charges", "type": "number", "source": "entity"},
    {"name": "contract", "type": "category", "source": "entity", "categories": CONTRACTS},
    {"name": "payment_method", "type": "category", "source": "entity", "categories": PAYMENT_METHODS},
    {"name": "internet_service", "type": "category", "source": "entity", "categories": INTERNET_SERVICES},
    {"name": "support_calls_30d", "type": "number", "source": "request"},
    {"name": "channel", "type": "category", "source": "request", "categories": CHANNELS},
]
FEATURE_NAMES = [f["name"] for f in FEATURES]
NUMERIC = [f["name"] for f in FEATURES if f["type"] == "number"]
CATEGORICAL = [f["name"] for f in FEATURES if f["type"] == "category"]
ENTITY_FEATURES = [f["name"] for f in FEATURES if f["source"] == "entity"]
REQUEST_FEATURES = [f["name"] for f in FEATURES if f["source"] == "request"]


# --------------------------------------------------------------------------- data


def gen_entity_features(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """Entity (feature-store) features; numbers rounded to 2 decimals."""
    contract = rng.choice(CONTRACTS, size=n, p=[0.55, 0.25, 0.20])
    # Longer contracts skew towards longer tenure.
    base_tenure = rng.uniform(0, 72, size=n)
    bump = np.where(contract == "two_year", 18.0, np.where(contract == "one_year", 8.0, 0.0))
    tenure = np.clip(np.round(base_tenure * 0.8 + bump + rng.normal(0, 6, size=n)), 0, 72)

    internet = rng.choice(INTERNET_SERVICES, size=n, p=[0.35, 0.45, 0.20])
    base_charge = np.where(internet == "fiber", 85.0, np.where(internet == "dsl", 55.0, 25.0))
    monthly = np.clip(base_charge + rng.normal(0, 14, size=n), 18.0, 120.0)
    monthly = np.round(monthly, 2)

    total = tenure * monthly * rng.normal(1.0, 0.05, size=n) + rng.normal(0, 20, size=n)
    total = np.round(np.clip(total, 0.0, None), 2)

    payment = rng.choice(PAYMENT_METHODS, size=n, p=[0.25, 0.25, 0.30, 0.20])

    return pd.DataFrame(
        {
            "tenure_months": tenure.astype(np.float64),
            "monthly_charges": monthly.astype(np.float64),
            "total_charges": total.astype(np.float64),
            "contract": contract.astype(object),
            "payment_method": payment.astype(object),
            "internet_service": internet.astype(object),
        }
    )


def gen_request_features(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """Request-time features (supplied by the caller)."""
    calls = np.clip(rng.poisson(1.6, size=n), 0, 10).astype(np.float64)
    channel = rng.choice(CHANNELS, size=n, p=[0.5, 0.35, 0.15])
    return pd.DataFrame({"support_calls_30d": calls, "channel": channel.astype(object)})


def churn_logit(df: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
    logit = (
        -1.3
        + 1.1 * (df["contract"] == "month_to_month")
        - 0.9 * (df["contract"] == "two_year")
        - 0.035 * df["tenure_months"]
        + 0.018 * (df["monthly_charges"] - 70.0)
        + 0.55 * (df["internet_service"] == "fiber")
        - 0.40 * (df["internet_service"] == "none")
        + 0.50 * (df["payment_method"] == "electronic_check")
        - 0.15 * (df["payment_method"] == "card")
        + 0.38 * df["support_calls_30d"]
        + 0.15 * (df["channel"] == "mobile")
        - 0.25 * (df["channel"] == "store")
    ).to_numpy(dtype=np.float64)
    return logit + rng.normal(0, 0.5, size=len(df))


def gen_training_data(rng: np.random.Generator, n: int) -> tuple[pd.DataFrame, np.ndarray]:
    df = pd.concat([gen_entity_features(rng, n), gen_request_features(rng, n)], axis=1)
    df = df[FEATURE_NAMES]
    p = 1.0 / (1.0 + np.exp(-churn_logit(df, rng)))
    y = (rng.uniform(size=n) < p).astype(np.int64)
    return df, y


def as_model_input(df: pd.DataFrame) -> pd.DataFrame:
    """Cast the way the ONNX path sees values: numerics float32, categories str."""
    out = df[FEATURE_NAMES].copy()
    for c in NUMERIC:
        out[c] = out[c].astype(np.float32)
    for c in CATEGORICAL:
        out[c] = out[c].astype(object)
    return out


def onnx_feeds(df: pd.DataFrame) -> dict[str, np.ndarray]:
    feeds = {}
    for c in NUMERIC:
        feeds[c] = df[c].to_numpy(dtype=np.float32).reshape(-1, 1)
    for c in CATEGORICAL:
        feeds[c] = np.array(df[c].tolist(), dtype=object).reshape(-1, 1)
    return feeds


# --------------------------------------------------------------------------- model


def build_pipeline() -> Pipeline:
    pre = ColumnTransformer(
        transformers=[
            ("num", StandardScaler(), NUMERIC),
            (
                "cat",
                OneHotEncoder(
                    categories=[next(f["categories"] for f in FEATURES if f["name"] == c) for c in CATEGORICAL],
                    handle_unknown="ignore",
                ),
                CATEGORICAL,
            ),
        ]
    )
    clf = LogisticRegression(C=1.0, max_iter=1000, random_state=SEED)
    return Pipeline([("pre", pre), ("clf", clf)])


def export_onnx(pipe: Pipeline) -> onnx.ModelProto:
    initial_types = []
    for f in FEATURES:
        if f["type"] == "number":
            initial_types.append((f["name"], FloatTensorType([None, 1])))
        else:
            initial_types.append((f["name"], StringTensorType([None, 1])))
    model = convert_sklearn(
        pipe,
        name="churn",
        initial_types=initial_types,
        options={LogisticRegression: {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    model.doc_string = "Demo churn model; churn probability = probabilities[:, 1]."
    onnx.checker.check_model(model)
    return model


# --------------------------------------------------------------------------- main


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def main() -> int:
    rng = np.random.default_rng(SEED)

    # 1. Training data.
    X, y = gen_training_data(rng, N_ROWS)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.2, random_state=SEED, stratify=y)

    # 2. Fit.
    pipe = build_pipeline()
    pipe.fit(as_model_input(X_tr), y_tr)
    auc = float(roc_auc_score(y_te, pipe.predict_proba(as_model_input(X_te))[:, 1]))

    # 3. Export ONNX.
    model = export_onnx(pipe)
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    model_path = MODEL_DIR / "model.onnx"
    model_path.write_bytes(model.SerializeToString())

    # 4. Manifest + aliases.
    manifest = {
        "name": "churn",
        "version": "1",
        "description": (
            "Demo customer churn model: logistic regression over standardized numeric and "
            "one-hot categorical features, trained on synthetic data. Churn probability is "
            "probabilities[:, 1]."
        ),
        "framework": f"sklearn {sklearn.__version__} via skl2onnx {skl2onnx.__version__}",
        "features": FEATURES,
        "output": {"name": "probabilities", "index": 1},
        "metrics": {"auc": round(auc, 4), "rows": N_ROWS},
        "trained_with_seed": SEED,
    }
    manifest_path = MODEL_DIR / "manifest.json"
    write_json(manifest_path, manifest)
    write_json(ALIASES_PATH, {"production": "1"})

    # 5. Demo entities (entity features only).
    ent = gen_entity_features(rng, N_DEMO_ENTITIES)
    ent.insert(0, "entity_id", [f"cust-{i:05d}" for i in range(1, N_DEMO_ENTITIES + 1)])
    ENTITIES_PATH.parent.mkdir(parents=True, exist_ok=True)
    entity_records = []
    with ENTITIES_PATH.open("w", encoding="utf-8") as fh:
        for row in ent.itertuples(index=False):
            feats = {}
            for c in ENTITY_FEATURES:
                v = getattr(row, c)
                feats[c] = round(float(v), 2) if c in NUMERIC else str(v)
            rec = {"entity_id": row.entity_id, "features": feats}
            entity_records.append(rec)
            fh.write(json.dumps(rec) + "\n")

    # 6. Skew fixture: first 50 entities + varied request-time features.
    fx_rows = []
    for i, rec in enumerate(entity_records[:N_FIXTURE_ROWS]):
        feats = dict(rec["features"])
        feats["support_calls_30d"] = float(i % 11)  # covers 0..10
        feats["channel"] = CHANNELS[(i * 7 + i // 3) % len(CHANNELS)]
        fx_rows.append({"entity_id": rec["entity_id"], "features": {k: feats[k] for k in FEATURE_NAMES}})
    fx_df = pd.DataFrame([r["features"] for r in fx_rows])[FEATURE_NAMES]
    fx_in = as_model_input(fx_df)
    sk_proba = pipe.predict_proba(fx_in)[:, 1]
    for r, p in zip(fx_rows, sk_proba):
        r["probability"] = float(p)
    write_json(FIXTURE_PATH, {"model": "churn", "version": "1", "rows": fx_rows})

    # Round-trip check: entity values parse back identically.
    with ENTITIES_PATH.open(encoding="utf-8") as fh:
        for line, rec in zip(fh, entity_records):
            assert json.loads(line) == rec

    # ONNX Runtime must agree with the sklearn pipeline.
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    label, proba = sess.run(["label", "probabilities"], onnx_feeds(fx_df))
    ort_p1 = proba[:, 1].astype(np.float64)
    max_diff = float(np.max(np.abs(ort_p1 - sk_proba)))
    assert max_diff <= MAX_ABS_DIFF, f"onnxruntime vs sklearn max abs diff {max_diff} > {MAX_ABS_DIFF}"
    assert np.array_equal(label, pipe.predict(fx_in)), "label mismatch between onnxruntime and sklearn"

    # Also check agreement across the whole holdout set.
    _, hold_proba = sess.run(["label", "probabilities"], onnx_feeds(X_te))
    hold_diff = float(np.max(np.abs(hold_proba[:, 1] - pipe.predict_proba(as_model_input(X_te))[:, 1])))
    assert hold_diff <= MAX_ABS_DIFF, f"holdout max abs diff {hold_diff} > {MAX_ABS_DIFF}"

    # 7. Summary.
    rel = lambda p: p.relative_to(ROOT).as_posix()  # noqa: E731
    print(f"rows:                {N_ROWS} (train {len(X_tr)}, holdout {len(X_te)})")
    print(f"churn rate:          {y.mean():.4f}")
    print(f"holdout AUC:         {auc:.4f}")
    print(f"max abs diff (fixture, {N_FIXTURE_ROWS} rows): {max_diff:.3e}")
    print(f"max abs diff (holdout, {len(X_te)} rows):   {hold_diff:.3e}")
    print(f"versions:            sklearn {sklearn.__version__}, skl2onnx {skl2onnx.__version__}, "
          f"onnx {onnx.__version__}, onnxruntime {ort.__version__}")
    opsets = ", ".join(f"{o.domain or 'ai.onnx'}={o.version}" for o in model.opset_import)
    print(f"opsets:              {opsets}")
    print("wrote:")
    for p in (model_path, manifest_path, ALIASES_PATH, ENTITIES_PATH, FIXTURE_PATH):
        print(f"  {rel(p)} ({p.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
