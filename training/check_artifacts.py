#!/usr/bin/env python3
"""Check every churn version's artifacts the way serving will use them.

Needs only numpy and onnxruntime (runs in the services' `.tools/venv` as well as in the
training venv), so it checks the files against the ONNX Runtime the mesh actually uses:

  models/churn/<v>/                 must load, golden.json must reproduce within its tolerance,
                                    reference.json must be well formed
  tests/fixtures/models/churn/<v>/  must break exactly the way training/make_test_models.py says

Run from anywhere:  python training/check_artifacts.py     (non-zero exit on any failure)
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models" / "churn"
BROKEN = ROOT / "tests" / "fixtures" / "models" / "churn"
# What each broken version must do.
EXPECT_BROKEN = {"90": "golden_fails", "91": "nan_above_1000", "92": "slow", "93": "load_fails"}


def load_json(p: Path):
    return json.loads(p.read_text(encoding="utf-8"))


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def feeds(manifest: dict, rows: list[dict]) -> dict:
    out = {}
    for f in manifest["features"]:
        vals = [r[f["name"]] for r in rows]
        if f["type"] == "number":
            out[f["name"]] = np.array(vals, dtype=np.float32).reshape(-1, 1)
        else:
            out[f["name"]] = np.array(vals, dtype=object).reshape(-1, 1)
    return out


def run(sess, manifest: dict, rows: list[dict]) -> np.ndarray:
    o = manifest["output"]
    (v,) = sess.run([o["name"]], feeds(manifest, rows))
    return np.asarray(v)[:, o["index"]].astype(np.float64)


def check_golden_shape(manifest: dict, golden: dict) -> None:
    assert isinstance(golden["tolerance"], float) and golden["tolerance"] > 0
    assert 20 <= len(golden["rows"]) <= 50, len(golden["rows"])
    names = [f["name"] for f in manifest["features"]]
    for r in golden["rows"]:
        assert sorted(r["features"]) == sorted(names), r["features"].keys()
        assert isinstance(r["score"], float) and math.isfinite(r["score"])
        for f in manifest["features"]:
            v = r["features"][f["name"]]
            if f["type"] == "number":
                assert isinstance(v, (int, float)) and not isinstance(v, bool)
            else:
                assert v in f["categories"], (f["name"], v)
    for f in manifest["features"]:
        if f["type"] == "category":
            seen = {r["features"][f["name"]] for r in golden["rows"]}
            assert seen == set(f["categories"]), (f["name"], seen)


def golden_diff(sess, manifest: dict, golden: dict) -> float:
    got = run(sess, manifest, [r["features"] for r in golden["rows"]])
    want = np.array([r["score"] for r in golden["rows"]])
    return float(np.max(np.abs(got - want)))


def check_summary(s: dict, n_bins: int | None) -> None:
    e, f = s["edges"], s["fractions"]
    assert len(e) == len(f) + 1 and len(f) >= 1, s
    if n_bins is not None:
        assert len(f) == n_bins, s
    assert all(a < b for a, b in zip(e, e[1:])), e
    assert all(x >= 0 for x in f) and abs(sum(f) - 1.0) < 1e-5, f


def check_reference(manifest: dict, ref: dict) -> None:
    assert isinstance(ref["rows"], int) and ref["rows"] > 0
    check_summary(ref["score"], 10)
    assert sorted(ref["features"]) == sorted(f["name"] for f in manifest["features"])
    for f in manifest["features"]:
        r = ref["features"][f["name"]]
        if f["type"] == "number":
            check_summary(r, None)
            assert len(r["fractions"]) <= 10
        else:
            assert list(r["categories"]) == f["categories"], r
            assert abs(sum(r["categories"].values()) - 1.0) < 1e-5


def main() -> int:
    print(f"onnxruntime {ort.__version__} ({ort.__file__})")
    failures = 0
    for d in sorted((p for p in MODELS.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        try:
            m, g, r = (load_json(d / n) for n in ("manifest.json", "golden.json", "reference.json"))
            assert m["version"] == d.name
            check_golden_shape(m, g)
            check_reference(m, r)
            sess = session(d / "model.onnx")
            diff = golden_diff(sess, m, g)
            assert diff <= g["tolerance"], f"golden max abs diff {diff} > {g['tolerance']}"
            print(f"ok   models/churn/{d.name}: loads, {len(g['rows'])} golden rows within {diff:.1e} "
                  f"(tolerance {g['tolerance']:g}), reference of {r['rows']} rows well formed")
        except Exception as e:  # noqa: BLE001
            failures += 1
            print(f"FAIL models/churn/{d.name}: {e!r}")

    for v, expect in EXPECT_BROKEN.items():
        d = BROKEN / v
        try:
            m, g = load_json(d / "manifest.json"), load_json(d / "golden.json")
            assert m["version"] == v
            check_golden_shape(m, g)
            if expect == "load_fails":
                try:
                    session(d / "model.onnx")
                except Exception as e:  # noqa: BLE001
                    what = f"fails to load ({str(e).splitlines()[0][:90]})"
                else:
                    raise AssertionError("loaded")
            else:
                sess = session(d / "model.onnx")
                diff = golden_diff(sess, m, g)
                if expect == "golden_fails":
                    assert diff > g["tolerance"], diff
                    what = f"golden fails by {diff:.4f}"
                else:
                    assert diff <= g["tolerance"], diff
                    row = g["rows"][0]["features"]
                    if expect == "nan_above_1000":
                        s = run(sess, m, [row, dict(row, tenure_months=1000.0), dict(row, tenure_months=1001.0)])
                        assert math.isfinite(s[0]) and math.isfinite(s[1]) and math.isnan(s[2]), s
                        what = f"golden passes; tenure 1000 -> {s[1]:.3g}, 1001 -> {s[2]}"
                    else:
                        run(sess, m, [row])
                        ts = []
                        for _ in range(7):
                            t0 = time.perf_counter()
                            run(sess, m, [row])
                            ts.append((time.perf_counter() - t0) * 1000)
                        med = sorted(ts)[len(ts) // 2]
                        assert med >= 20.0, f"only {med:.1f} ms"
                        what = f"golden passes; one-row call median {med:.0f} ms"
            print(f"ok   tests/fixtures/models/churn/{v} ({expect}): {what}")
        except Exception as e:  # noqa: BLE001
            failures += 1
            print(f"FAIL tests/fixtures/models/churn/{v} ({expect}): {e!r}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
