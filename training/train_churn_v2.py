#!/usr/bin/env python3
"""Train churn version 2 (gradient boosted trees) and write its artifacts.

Same synthetic data, seed (4), 80/20 split and feature contract as version 1
(training/train_churn.py), so the feature store serves both versions; a different algorithm:
scikit-learn `GradientBoostingClassifier` (150 trees of depth 3) over the raw numeric features
and one-hot categories, preprocessing included in the ONNX graph. Writes, relative to the
repository root:

  models/churn/2/model.onnx          ONNX graph (one input per feature, like version 1)
  models/churn/2/manifest.json       feature contract (identical features to version 1)
  models/churn/2/golden.json         golden fixture (see training/write_goldens.py)
  models/churn/2/reference.json      drift reference distribution (idem)
  training/fixtures/churn_v2.json    training/serving skew fixture (50 rows, like churn_v1.json)

It never writes version 1's files, the aliases or the demo entities.
Fails (non-zero exit) if ONNX Runtime and scikit-learn disagree by more than SKEW_TOLERANCE.

Run from anywhere:  python training/train_churn_v2.py
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import sklearn
import skl2onnx
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType, StringTensorType
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder

import train_churn as tc
import write_goldens as wg

VERSION = "2"
MODEL_DIR = tc.ROOT / "models" / "churn" / VERSION
FIXTURE_PATH = tc.ROOT / "training" / "fixtures" / "churn_v2.json"
# ONNX Runtime vs scikit-learn, max abs difference of the churn probability on the fixture rows
# and the whole holdout set. Same bound as version 1: the tree ensemble sums 150 float32 leaf
# values in ONNX Runtime against float64 in scikit-learn (measured about 2e-7); a threshold
# rounded to float32 that sent a row down another branch would move its score by 1e-3 or more.
SKEW_TOLERANCE = 1e-5
N_TREES = 150
MAX_DEPTH = 3
MAX_MODEL_BYTES = 2 * 1024 * 1024


def build_pipeline() -> Pipeline:
    pre = ColumnTransformer(
        transformers=[
            ("num", "passthrough", tc.NUMERIC),
            (
                "cat",
                OneHotEncoder(
                    categories=[next(f["categories"] for f in tc.FEATURES if f["name"] == c) for c in tc.CATEGORICAL],
                    handle_unknown="ignore",
                    sparse_output=False,
                ),
                tc.CATEGORICAL,
            ),
        ]
    )
    clf = GradientBoostingClassifier(
        n_estimators=N_TREES,
        learning_rate=0.1,
        max_depth=MAX_DEPTH,
        min_samples_leaf=40,
        subsample=1.0,
        random_state=tc.SEED,
    )
    return Pipeline([("pre", pre), ("clf", clf)])


def export_onnx(pipe: Pipeline) -> onnx.ModelProto:
    initial_types = []
    for f in tc.FEATURES:
        if f["type"] == "number":
            initial_types.append((f["name"], FloatTensorType([None, 1])))
        else:
            initial_types.append((f["name"], StringTensorType([None, 1])))
    model = convert_sklearn(
        pipe,
        name="churn",
        initial_types=initial_types,
        options={GradientBoostingClassifier: {"zipmap": False}},
        target_opset=tc.TARGET_OPSET,
    )
    # skl2onnx lists the opsets in set order (varies with PYTHONHASHSEED): fix it, version 1's
    # order (ai.onnx.ml first), so a rerun writes identical bytes.
    opsets = sorted(((o.domain, o.version) for o in model.opset_import), reverse=True)
    del model.opset_import[:]
    for domain, version in opsets:
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))
    model.doc_string = "Demo churn model v2 (gradient boosted trees); churn probability = probabilities[:, 1]."
    onnx.checker.check_model(model)
    return model


def main() -> int:
    data = wg.ChurnData()

    # 1. Fit on the same training split as version 1.
    pipe = build_pipeline()
    pipe.fit(tc.as_model_input(data.X_tr), data.y_tr)
    sk_hold = pipe.predict_proba(tc.as_model_input(data.X_te))[:, 1]
    auc = float(roc_auc_score(data.y_te, sk_hold))

    # 2. Export ONNX.
    model = export_onnx(pipe)
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    model_path = MODEL_DIR / "model.onnx"
    model_bytes = model.SerializeToString()
    assert len(model_bytes) < MAX_MODEL_BYTES, f"model.onnx is {len(model_bytes)} bytes"
    model_path.write_bytes(model_bytes)

    # 3. Manifest: the same format and feature contract as version 1.
    manifest = {
        "name": "churn",
        "version": VERSION,
        "description": (
            f"Demo customer churn model, version 2: gradient boosted trees ({N_TREES} trees of depth "
            f"{MAX_DEPTH}) over raw numeric and one-hot categorical features, trained on the same "
            "synthetic data as version 1. Churn probability is probabilities[:, 1]. ONNX Runtime "
            f"agrees with scikit-learn within {SKEW_TOLERANCE:g} (max abs difference, fixture and "
            "holdout); golden.json tolerance "
            f"{wg.GOLDEN_TOLERANCE:g}."
        ),
        "framework": f"sklearn {sklearn.__version__} via skl2onnx {skl2onnx.__version__}",
        "features": tc.FEATURES,
        "output": {"name": "probabilities", "index": 1},
        "metrics": {"auc": round(auc, 4), "rows": tc.N_ROWS},
        "trained_with_seed": tc.SEED,
    }
    manifest_path = MODEL_DIR / "manifest.json"
    tc.write_json(manifest_path, manifest)

    # 4. Skew fixture: the same 50 rows as churn_v1.json, scored by scikit-learn.
    feature_rows = wg.golden_feature_rows(data)
    fx_df = pd.DataFrame(feature_rows)[tc.FEATURE_NAMES]
    fx_in = tc.as_model_input(fx_df)
    sk_fx = pipe.predict_proba(fx_in)[:, 1]
    fx_rows = [
        {"entity_id": f"cust-{i:05d}", "features": feats, "probability": float(p)}
        for i, (feats, p) in enumerate(zip(feature_rows, sk_fx), start=1)
    ]
    tc.write_json(FIXTURE_PATH, {"model": "churn", "version": VERSION, "rows": fx_rows})

    # 5. ONNX Runtime must agree with scikit-learn (training/serving skew check).
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    label, proba = sess.run(["label", "probabilities"], tc.onnx_feeds(fx_df))
    fx_diff = float(np.max(np.abs(proba[:, 1].astype(np.float64) - sk_fx)))
    assert fx_diff <= SKEW_TOLERANCE, f"fixture: onnxruntime vs sklearn max abs diff {fx_diff} > {SKEW_TOLERANCE}"
    assert np.array_equal(label, pipe.predict(fx_in)), "label mismatch between onnxruntime and sklearn"
    _, hold_proba = sess.run(["label", "probabilities"], tc.onnx_feeds(data.X_te))
    hold_diff = float(np.max(np.abs(hold_proba[:, 1].astype(np.float64) - sk_hold)))
    assert hold_diff <= SKEW_TOLERANCE, f"holdout: onnxruntime vs sklearn max abs diff {hold_diff} > {SKEW_TOLERANCE}"

    # 6. Golden fixture and drift reference (ONNX Runtime scores).
    figs = wg.write_for_version(MODEL_DIR, data)

    # 7. Summary.
    rel = lambda p: p.relative_to(tc.ROOT).as_posix()  # noqa: E731
    print(f"rows:                {tc.N_ROWS} (train {len(data.X_tr)}, holdout {len(data.X_te)})")
    print(f"model:               GradientBoostingClassifier, {N_TREES} trees, depth {MAX_DEPTH}")
    print(f"holdout AUC:         {auc:.4f}")
    print(f"max abs diff (fixture, {len(fx_rows)} rows): {fx_diff:.3e}  (tolerance {SKEW_TOLERANCE:g})")
    print(f"max abs diff (holdout, {len(data.X_te)} rows):   {hold_diff:.3e}")
    print(f"golden:              {figs['golden_rows']} rows, reproduce within {figs['golden_diff']:.1e} "
          f"(tolerance {wg.GOLDEN_TOLERANCE:g})")
    print(f"versions:            sklearn {sklearn.__version__}, skl2onnx {skl2onnx.__version__}, "
          f"onnx {onnx.__version__}, onnxruntime {ort.__version__}")
    opsets = ", ".join(f"{o.domain or 'ai.onnx'}={o.version}" for o in model.opset_import)
    print(f"opsets:              {opsets}")
    print("wrote:")
    for p in (model_path, manifest_path, MODEL_DIR / "golden.json", MODEL_DIR / "reference.json", FIXTURE_PATH):
        print(f"  {rel(p)} ({p.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
