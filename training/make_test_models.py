#!/usr/bin/env python3
"""Write the deliberately broken churn versions the lifecycle tests use.

Deterministic; built from version 1's committed model.onnx and golden.json (run
training/write_goldens.py first if those change). Writes, relative to the repository root,
complete version directories (manifest.json with version 1's features, model.onnx, golden.json)
under tests/fixtures/models/churn/ -- never under models/, which production loads:

  90/  valid graph (version 1's bytes); golden.json scores off by exactly 0.1 -> fixture fails
  91/  version 1's graph, but both probabilities are NaN when tenure_months > 1000;
       golden rows (tenure <= 72) pass
  92/  version 1's graph plus a chain of MatMuls on an input-dependent 256x256 matrix whose
       sum is multiplied by 0 and added to the probabilities: same scores, slow
       (tens of ms per one-row call on one thread); golden passes
  93/  model.onnx is a few garbage bytes: fails to load

Every claim above is checked with ONNX Runtime before the script exits (non-zero on failure);
the slow model's timing is printed (and warned about if outside 30..300 ms), not asserted,
since it depends on the machine.

Run from anywhere:  python training/make_test_models.py
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
from onnx import TensorProto, helper, numpy_helper

import train_churn as tc

ROOT = tc.ROOT
V1_DIR = ROOT / "models" / "churn" / "1"
OUT_ROOT = ROOT / "tests" / "fixtures" / "models" / "churn"

WRONG_BY = 0.1
NAN_ABOVE_TENURE = 1000.0
SLOW_MATRIX = 512  # side of the square matrix multiplied in the slow graph
SLOW_CHAIN = 50  # MatMuls per call
GARBAGE = b"\x00\xffnot an onnx model\xde\xad\xbe\xef\n"

DESCRIPTIONS = {
    "90": "TEST ONLY, broken on purpose: valid graph (version 1's), golden.json scores are off by 0.1, so its golden fixture fails.",
    "91": "TEST ONLY, broken on purpose: version 1's graph, but probabilities are NaN when tenure_months > 1000; golden rows (tenure <= 72) pass.",
    "92": (
        f"TEST ONLY, broken on purpose: version 1's graph plus {SLOW_CHAIN} MatMuls of a "
        f"{SLOW_MATRIX}x{SLOW_MATRIX} matrix per call (result multiplied by 0): same scores, slow. Golden passes."
    ),
    "93": "TEST ONLY, broken on purpose: model.onnx is not an ONNX file and fails to load.",
}


# --------------------------------------------------------------------------- graphs


def v1_model() -> onnx.ModelProto:
    return onnx.load_from_string((V1_DIR / "model.onnx").read_bytes())


def opset_of(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def rewire_probabilities(model: onnx.ModelProto, raw: str) -> None:
    """Make the node producing `probabilities` produce `raw` instead."""
    producers = [n for n in model.graph.node if "probabilities" in n.output]
    assert len(producers) == 1
    out = list(producers[0].output)
    out[out.index("probabilities")] = raw
    del producers[0].output[:]
    producers[0].output.extend(out)


def const(name: str, value, dtype=np.float32) -> TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


def nan_model() -> onnx.ModelProto:
    """probabilities = raw * Where(tenure_months > 1000, NaN, 1)."""
    m = copy.deepcopy(v1_model())
    g = m.graph
    assert opset_of(m) >= 9  # Greater, Where
    rewire_probabilities(m, "probabilities_raw")
    g.initializer.extend(
        [
            const("nan_threshold", [NAN_ABOVE_TENURE]),
            const("nan_value", [np.nan]),
            const("one_value", [1.0]),
        ]
    )
    g.node.extend(
        [
            helper.make_node("Greater", ["tenure_months", "nan_threshold"], ["nan_mask"], name="broken_nan_mask"),
            helper.make_node("Where", ["nan_mask", "nan_value", "one_value"], ["nan_factor"], name="broken_nan_factor"),
            helper.make_node("Mul", ["probabilities_raw", "nan_factor"], ["probabilities"], name="broken_nan_mul"),
        ]
    )
    m.doc_string = DESCRIPTIONS["91"]
    onnx.checker.check_model(m)
    return m


def slow_model() -> onnx.ModelProto:
    """probabilities = raw + 0 * sum(X_k), X_0 = J + 0 * sum(tenure), X_{i+1} = X_i @ J,
    J = ones(n, n) / n (idempotent, so every entry stays 1/n: no overflow, no subnormals).
    X_0 depends on the input, so ONNX Runtime cannot constant-fold the chain away."""
    m = copy.deepcopy(v1_model())
    g = m.graph
    assert opset_of(m) <= 12  # ReduceSum takes `axes` as an attribute (none = all) before 13
    rewire_probabilities(m, "probabilities_raw")
    n = SLOW_MATRIX
    g.initializer.extend(
        [
            const("slow_shape", [n, n], np.int64),
            const("slow_zero", 0.0),
        ]
    )
    nodes = [
        helper.make_node(
            "ConstantOfShape",
            ["slow_shape"],
            ["slow_j"],
            name="broken_slow_j",
            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0 / n]),
        ),
        helper.make_node("ReduceSum", ["tenure_months"], ["slow_in_sum"], name="broken_slow_in_sum", keepdims=0),
        helper.make_node("Mul", ["slow_in_sum", "slow_zero"], ["slow_in_zero"], name="broken_slow_in_zero"),
        helper.make_node("Add", ["slow_j", "slow_in_zero"], ["slow_x0"], name="broken_slow_x0"),
    ]
    prev = "slow_x0"
    for i in range(1, SLOW_CHAIN + 1):
        nodes.append(helper.make_node("MatMul", [prev, "slow_j"], [f"slow_x{i}"], name=f"broken_slow_matmul{i}"))
        prev = f"slow_x{i}"
    nodes += [
        helper.make_node("ReduceSum", [prev], ["slow_out_sum"], name="broken_slow_out_sum", keepdims=0),
        helper.make_node("Mul", ["slow_out_sum", "slow_zero"], ["slow_out_zero"], name="broken_slow_out_zero"),
        helper.make_node("Add", ["probabilities_raw", "slow_out_zero"], ["probabilities"], name="broken_slow_add"),
    ]
    g.node.extend(nodes)
    m.doc_string = DESCRIPTIONS["92"]
    onnx.checker.check_model(m)
    return m


# --------------------------------------------------------------------------- scoring


def session_from_bytes(model_bytes: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # as the inference service runs it
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def scores(sess: ort.InferenceSession, rows: list[dict]) -> np.ndarray:
    df = pd.DataFrame(rows)[tc.FEATURE_NAMES]
    (proba,) = sess.run(["probabilities"], tc.onnx_feeds(df))
    return proba[:, 1].astype(np.float64)


def max_golden_diff(sess: ort.InferenceSession, golden: dict) -> float:
    got = scores(sess, [r["features"] for r in golden["rows"]])
    want = np.array([r["score"] for r in golden["rows"]])
    return float(np.max(np.abs(got - want)))


# --------------------------------------------------------------------------- main


def write_version(version: str, model_bytes: bytes, golden: dict) -> Path:
    d = OUT_ROOT / version
    d.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((V1_DIR / "manifest.json").read_text(encoding="utf-8"))
    manifest["version"] = version
    manifest["description"] = DESCRIPTIONS[version]
    tc.write_json(d / "manifest.json", manifest)
    (d / "model.onnx").write_bytes(model_bytes)
    tc.write_json(d / "golden.json", golden)
    return d


def main() -> int:
    v1_bytes = (V1_DIR / "model.onnx").read_bytes()
    v1_golden = json.loads((V1_DIR / "golden.json").read_text(encoding="utf-8"))
    tol = v1_golden["tolerance"]
    golden_rows = [r["features"] for r in v1_golden["rows"]]
    assert max(r["tenure_months"] for r in golden_rows) <= 72

    def golden_from(sess: ort.InferenceSession) -> dict:
        s = scores(sess, golden_rows)
        return {"tolerance": tol, "rows": [{"features": f, "score": round(float(x), 6)} for f, x in zip(golden_rows, s)]}

    # 90: v1's graph, golden scores moved by exactly 0.1 (down above 0.5, up below, so they
    # stay in [0, 1] and look plausible).
    wrong = {
        "tolerance": tol,
        "rows": [
            {"features": r["features"], "score": round(r["score"] - WRONG_BY if r["score"] > 0.5 else r["score"] + WRONG_BY, 6)}
            for r in v1_golden["rows"]
        ],
    }
    d90 = write_version("90", v1_bytes, wrong)
    diff90 = max_golden_diff(session_from_bytes((d90 / "model.onnx").read_bytes()), wrong)
    assert diff90 > tol and abs(diff90 - WRONG_BY) < 1e-5, f"90: golden diff {diff90}"

    # 91: NaN above tenure 1000.
    nan_bytes = nan_model().SerializeToString()
    s91 = session_from_bytes(nan_bytes)
    d91 = write_version("91", nan_bytes, golden_from(s91))
    s91 = session_from_bytes((d91 / "model.onnx").read_bytes())
    diff91 = max_golden_diff(s91, json.loads((d91 / "golden.json").read_text()))
    assert diff91 <= tol, f"91: golden diff {diff91}"
    v1_diff91 = max_golden_diff(s91, v1_golden)  # same scores as version 1
    assert v1_diff91 <= tol, f"91 vs v1 golden {v1_diff91}"
    probe = []
    for tenure in (72.0, 1000.0, 1001.0, 5000.0):
        row = dict(golden_rows[0], tenure_months=tenure)
        probe.append(scores(s91, [row])[0])
    assert np.all(np.isfinite(probe[:2])) and np.all(np.isnan(probe[2:])), f"91: probe {probe}"
    # A batch mixing both: only the rows above 1000 are NaN.
    mixed = scores(s91, [golden_rows[0], dict(golden_rows[1], tenure_months=1500.0)])
    assert np.isfinite(mixed[0]) and np.isnan(mixed[1]), f"91: mixed {mixed}"

    # 92: slow.
    slow_bytes = slow_model().SerializeToString()
    s92 = session_from_bytes(slow_bytes)
    d92 = write_version("92", slow_bytes, golden_from(s92))
    s92 = session_from_bytes((d92 / "model.onnx").read_bytes())
    diff92 = max_golden_diff(s92, json.loads((d92 / "golden.json").read_text()))
    assert diff92 <= tol, f"92: golden diff {diff92}"
    v1_diff92 = max_golden_diff(s92, v1_golden)
    assert v1_diff92 <= tol, f"92 vs v1 golden {v1_diff92}"
    one = [golden_rows[0]]
    scores(s92, one)  # warm up
    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        scores(s92, one)
        times.append((time.perf_counter() - t0) * 1000.0)
    slow_ms = statistics.median(times)
    fast = session_from_bytes(v1_bytes)
    scores(fast, one)
    t0 = time.perf_counter()
    for _ in range(100):
        scores(fast, one)
    fast_ms = (time.perf_counter() - t0) * 1000.0 / 100

    # 93: not ONNX.
    d93 = write_version("93", GARBAGE, v1_golden)
    try:
        session_from_bytes((d93 / "model.onnx").read_bytes())
    except Exception as e:  # noqa: BLE001 -- any load failure is what we want
        load_error = str(e).splitlines()[0][:160]
    else:
        raise AssertionError("93: garbage model.onnx loaded")

    rel = lambda p: p.relative_to(ROOT).as_posix()  # noqa: E731
    print(f"onnxruntime {ort.__version__}, one intra-op thread, ORT_ENABLE_ALL")
    print(f"90 {rel(d90)}: golden fails, max abs diff {diff90:.6f} > tolerance {tol:g}")
    print(f"91 {rel(d91)}: golden passes ({diff91:.1e}); score at tenure 72, 1000, 1001, 5000: "
          + ", ".join(f"{p:.6f}" for p in probe))
    print(f"92 {rel(d92)}: golden passes ({diff92:.1e}); one-row call median {slow_ms:.1f} ms "
          f"(min {min(times):.1f}, max {max(times):.1f}; version 1: {fast_ms:.3f} ms)")
    if not 30.0 <= slow_ms <= 300.0:
        print(f"   WARNING: slow model takes {slow_ms:.1f} ms here, outside 30..300 ms", file=sys.stderr)
    print(f"93 {rel(d93)}: fails to load: {load_error}")
    for d in (d90, d91, d92, d93):
        for name in ("manifest.json", "model.onnx", "golden.json"):
            p = d / name
            print(f"  {rel(p)} ({p.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
