"""em_policy.fastpath: compiled forests and MLPs reproduce scikit-learn's outputs exactly."""

from __future__ import annotations

import dataclasses
import io
import warnings
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.ensemble import (
    ExtraTreesClassifier,
    ExtraTreesRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor, ExtraTreeRegressor

from em_policy.fastpath import CompiledBooster, CompiledForest, CompiledMLP, sum_trees

N_FEATURES = 5
Arr = npt.NDArray[Any]


def _train_data(seed: int, n: int = 500) -> Arr:
    """Features with many exact ties (grid values) and float32-awkward continuous values."""
    rng = np.random.default_rng(seed)
    X = np.empty((n, N_FEATURES))
    X[:, 0] = rng.integers(0, 8, n) / 4.0  # grid: thresholds fall between tied values
    X[:, 1] = rng.integers(-3, 4, n) * 0.1  # 0.1 is not representable: float32 and float64 differ
    X[:, 2] = rng.normal(size=n)
    X[:, 3] = rng.uniform(0, 1, n) * 1e-3 + 1.0  # dense near 1.0, spacing close to float32 resolution
    X[:, 4] = rng.normal(scale=100.0, size=n)
    return X


def _class_labels(X: Arr, seed: int) -> Arr:
    rng = np.random.default_rng(seed)
    score = X[:, 0] + 3 * X[:, 1] + 0.5 * X[:, 2] + 1000 * (X[:, 3] - 1.0) + rng.normal(scale=0.3, size=len(X))
    labels: Arr = np.digitize(score, np.quantile(score, [0.25, 0.5, 0.75]))  # 4 classes
    return labels


def _targets(X: Arr, seed: int, n_outputs: int) -> Arr:
    rng = np.random.default_rng(seed)
    cols = [
        np.sin(X[:, 0] * 3) + X[:, 1] * X[:, 2] + 500 * (X[:, 3] - 1.0) + rng.normal(scale=0.1, size=len(X)),
        X[:, 4] / 100 - X[:, 0] + rng.normal(scale=0.1, size=len(X)),
        np.abs(X[:, 2]) + X[:, 1],
    ]
    y = np.stack(cols[:n_outputs], axis=1)
    return y[:, 0] if n_outputs == 1 else y


def _boundary_rows(model: CompiledForest, X_base: Arr, seed: int) -> Arr:
    """Rows whose features sit exactly on, or within float32 rounding of, the model's thresholds."""
    rng = np.random.default_rng(seed)
    internal = model.left != -1
    candidates: list[list[float]] = [[] for _ in range(N_FEATURES)]
    for f, t in zip(model.feature[internal], model.threshold[internal], strict=True):
        t32 = np.float32(t)
        up32 = np.nextafter(t32, np.float32(np.inf))
        down32 = np.nextafter(t32, np.float32(-np.inf))
        candidates[int(f)].extend([
            float(t),
            float(np.nextafter(t, np.inf)),  # rounds back onto t32 in float32
            float(np.nextafter(t, -np.inf)),
            float(t32),
            float(up32),
            float(down32),
            (float(t32) + float(up32)) / 2,  # float32 round-half-even ties
            (float(t32) + float(down32)) / 2,
        ])
    rows = np.array(X_base[rng.integers(0, len(X_base), 600)], dtype=np.float64)
    for f in range(N_FEATURES):
        pool = np.asarray(candidates[f]) if candidates[f] else X_base[:, f]
        rows[:, f] = rng.choice(pool, size=len(rows))
    return rows


def _assert_boundaries_exercised(model: CompiledForest, X: Arr) -> None:
    """At least one comparison differs between float64 X and float32 X: the tests can see the cast."""
    internal = np.flatnonzero(model.left != -1)
    x64 = X[:, model.feature[internal]]
    x32 = X.astype(np.float32).astype(np.float64)[:, model.feature[internal]]
    thr = model.threshold[internal]
    assert np.any((x64 <= thr) != (x32 <= thr))
    assert np.any(x64 == thr)


def _fit_quiet(est: Any, X: Arr, y: Arr) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X, y)


def _roundtrip(arrays: dict[str, Arr]) -> Any:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    buf.seek(0)
    return np.load(buf, allow_pickle=False)


# --------------------------------------------------------------------------------------------------
# forests


@pytest.mark.parametrize("max_depth", [None, 4])
def test_random_forest_classifier_matches_sklearn(max_depth: int | None) -> None:
    X = _train_data(1)
    y = _class_labels(X, 2)
    rf = RandomForestClassifier(n_estimators=30, bootstrap=True, max_depth=max_depth, random_state=3).fit(X, y)
    model = CompiledForest.from_sklearn(rf)
    assert model.kind == "classifier"
    assert model.n_trees == 30
    assert model.classes is not None and np.array_equal(model.classes, rf.classes_)
    assert len(rf.classes_) == 4
    if max_depth is not None:
        assert model.max_depth == max_depth
    else:
        assert model.max_depth == max(e.tree_.max_depth for e in rf.estimators_) > 4

    X_test = np.vstack([_boundary_rows(model, X, 4), X[:200]])
    _assert_boundaries_exercised(model, X_test)
    assert np.array_equal(model.predict_proba(X_test), rf.predict_proba(X_test))
    assert np.array_equal(model.predict(X_test), rf.predict(X_test))
    assert np.array_equal(model.apply(X_test), np.stack([e.tree_.apply(X_test.astype(np.float32))
                                                          for e in rf.estimators_], axis=1)
                          + model.roots.astype(np.intp))
    for i in range(0, 600, 97):  # the single-row path
        row = X_test[i : i + 1]
        assert np.array_equal(model.predict_proba(row), rf.predict_proba(row))
        assert np.array_equal(model.predict(row), rf.predict(row))


def test_leaf_values_are_class_fractions_and_not_renormalised() -> None:
    X = _train_data(5, 200)
    y = _class_labels(X, 6)
    rf = RandomForestClassifier(n_estimators=5, random_state=0).fit(X, y)
    model = CompiledForest.from_sklearn(rf)
    assert np.allclose(model.value.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    tree = rf.estimators_[0]
    # a single tree's predict_proba is its leaf row, taken verbatim
    leaves = tree.apply(X[:50])
    assert np.array_equal(tree.predict_proba(X[:50]), tree.tree_.value[leaves, 0, :])


def test_string_classes_and_extra_trees_classifier() -> None:
    X = _train_data(7)
    names = np.array(["idle", "readout", "zne", "pec"])
    y = names[_class_labels(X, 8)]
    et = ExtraTreesClassifier(n_estimators=20, random_state=9).fit(X, y)
    model = CompiledForest.from_sklearn(et)
    X_test = _boundary_rows(model, X, 10)
    assert np.array_equal(model.predict_proba(X_test), et.predict_proba(X_test))
    assert np.array_equal(model.predict(X_test), et.predict(X_test))
    loaded = CompiledForest.from_arrays(_roundtrip(model.to_arrays("et")), "et")
    assert np.array_equal(loaded.predict(X_test), et.predict(X_test))


def test_decision_tree_classifier_matches_sklearn() -> None:
    X = _train_data(11)
    y = _class_labels(X, 12)
    dt = DecisionTreeClassifier(random_state=0).fit(X, y)
    model = CompiledForest.from_sklearn(dt)
    X_test = _boundary_rows(model, X, 13)
    assert np.array_equal(model.predict_proba(X_test), dt.predict_proba(X_test))
    assert np.array_equal(model.predict(X_test), dt.predict(X_test))


@pytest.mark.parametrize("n_outputs", [1, 3])
@pytest.mark.parametrize("forest", [RandomForestRegressor, ExtraTreesRegressor])
def test_forest_regressor_matches_sklearn(forest: Any, n_outputs: int) -> None:
    X = _train_data(20)
    y = _targets(X, 21, n_outputs)
    est = forest(n_estimators=15, random_state=22).fit(X, y)
    model = CompiledForest.from_sklearn(est)
    assert model.kind == "regressor" and model.classes is None and model.n_outputs == n_outputs
    X_test = np.vstack([_boundary_rows(model, X, 23), X[:100]])
    _assert_boundaries_exercised(model, X_test)
    expected = est.predict(X_test)
    got = model.predict(X_test)
    assert got.shape == expected.shape == ((len(X_test),) if n_outputs == 1 else (len(X_test), n_outputs))
    assert np.array_equal(got, expected)
    for i in (0, 1, 250, 599):
        assert np.array_equal(model.predict(X_test[i : i + 1]), est.predict(X_test[i : i + 1]))


def test_forest_sum_is_sequential_not_pairwise() -> None:
    """With 100 trees np.sum over the tree axis (pairwise) would round differently from sklearn."""
    X = _train_data(24)
    y = _targets(X, 25, 1) * 1e3 + 1e-7
    rf = RandomForestRegressor(n_estimators=100, max_depth=6, random_state=26).fit(X, y)
    model = CompiledForest.from_sklearn(rf)
    X_test = X[:300]
    assert np.array_equal(model.predict(X_test), rf.predict(X_test))
    for i in range(5):
        assert np.array_equal(model.predict(X_test[i]), rf.predict(X_test[i : i + 1]))


def test_trees_are_summed_one_after_the_other_whatever_the_shape() -> None:
    """numpy sums a contiguous axis pairwise: with one value per tree the sum must not go that way."""
    rng = np.random.default_rng(7)
    for trees in (2, 9, 100, 301):
        for n in (1, 2, 7, 34):
            for columns in (1, 2, 6):
                per_tree = rng.random((trees, n, columns)) * 10.0 ** rng.integers(-3, 4, size=(trees, n, columns))
                in_order = np.zeros((n, columns))
                for t in range(trees):
                    in_order = in_order + per_tree[t]
                assert np.array_equal(sum_trees(per_tree), in_order), (trees, n, columns)


def test_single_decision_tree_regressor_matches_sklearn() -> None:
    X = _train_data(30)
    y = _targets(X, 31, 1)
    dt = DecisionTreeRegressor(min_samples_leaf=2, random_state=0).fit(X, y)
    model = CompiledForest.from_sklearn(dt)
    assert model.n_trees == 1 and model.max_depth == dt.tree_.max_depth
    X_test = _boundary_rows(model, X, 32)
    _assert_boundaries_exercised(model, X_test)
    assert np.array_equal(model.predict(X_test), dt.predict(X_test))
    assert np.array_equal(model.predict(X_test[3]), dt.predict(X_test[3:4]))


def test_nan_follows_missing_go_to_left() -> None:
    X = _train_data(40)
    y = _class_labels(X, 41)
    X_train = X.copy()
    X_train[::7, 2] = np.nan  # the trees learn where missing values go
    rf_missing = RandomForestClassifier(n_estimators=15, random_state=42).fit(X_train, y)
    rf_plain = RandomForestClassifier(n_estimators=15, random_state=42).fit(X, y)
    rng = np.random.default_rng(43)
    X_test = X[:300].copy()
    X_test[rng.random(X_test.shape) < 0.2] = np.nan
    for rf in (rf_missing, rf_plain):
        model = CompiledForest.from_sklearn(rf)
        assert model.allow_nan
        assert np.array_equal(model.predict_proba(X_test), rf.predict_proba(X_test))
        assert np.array_equal(model.predict(X_test), rf.predict(X_test))
    reg = RandomForestRegressor(n_estimators=10, random_state=44).fit(X_train, _targets(X, 45, 2))
    assert np.array_equal(CompiledForest.from_sklearn(reg).predict(X_test), reg.predict(X_test))


def test_nan_rejected_when_estimator_does_not_accept_it() -> None:
    X = _train_data(50)
    est = ExtraTreeRegressor(splitter="best", random_state=0).fit(X, _targets(X, 51, 1))
    model = CompiledForest.from_sklearn(est)
    assert not model.allow_nan
    row = X[:1].copy()
    row[0, 1] = np.nan
    with pytest.raises(ValueError):
        est.predict(row)
    with pytest.raises(ValueError, match="NaN"):
        model.predict(row)
    assert np.array_equal(model.predict(X[:20]), est.predict(X[:20]))


def test_forest_rejects_bad_input() -> None:
    X = _train_data(60, 200)
    rf = RandomForestClassifier(n_estimators=5, random_state=0).fit(X, _class_labels(X, 61))
    model = CompiledForest.from_sklearn(rf)
    for bad in (X[:3, :4], X[0, :4], np.zeros((2, N_FEATURES + 1))):
        with pytest.raises(ValueError, match="features"):
            model.predict_proba(bad)
    inf_row = X[:1].copy()
    inf_row[0, 0] = np.inf
    big_row = X[:1].copy()
    big_row[0, 4] = 1e39  # finite in float64, inf in float32: sklearn rejects it too
    for bad in (inf_row, big_row):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with pytest.raises(ValueError):
                rf.predict_proba(bad)
        with pytest.raises(ValueError, match="infinity"):
            model.predict_proba(bad)
    with pytest.raises(ValueError):
        model.predict(np.zeros((0, N_FEATURES)))
    with pytest.raises(ValueError):
        model.predict(np.zeros((2, 2, N_FEATURES)))
    with pytest.raises(ValueError):
        model.predict(np.array([["a"] * N_FEATURES]))
    reg = CompiledForest.from_sklearn(DecisionTreeRegressor(max_depth=2).fit(X, X[:, 0]))
    with pytest.raises(TypeError):
        reg.predict_proba(X)


def test_forest_accepts_1d_row_and_integer_input() -> None:
    X = _train_data(70)
    rf = RandomForestRegressor(n_estimators=10, random_state=71).fit(X, _targets(X, 72, 3))
    model = CompiledForest.from_sklearn(rf)
    row = X[17]
    assert model.predict(row).shape == (1, 3)
    assert np.array_equal(model.predict(row), rf.predict(row.reshape(1, -1)))
    X_int = np.round(X[:40]).astype(np.int64)
    assert np.array_equal(model.predict(X_int), rf.predict(X_int))
    X_f32 = X[:40].astype(np.float32)
    assert np.array_equal(model.predict(X_f32), rf.predict(X_f32))
    X_fortran = np.asfortranarray(X[:40])
    assert np.array_equal(model.predict(X_fortran), rf.predict(X[:40]))


def test_unsupported_estimators_rejected() -> None:
    X = _train_data(80, 100)
    Y = np.stack([_class_labels(X, 81), _class_labels(X, 82)], axis=1)
    with pytest.raises(ValueError, match="single-output"):
        CompiledForest.from_sklearn(RandomForestClassifier(n_estimators=2).fit(X, Y))
    with pytest.raises(ValueError, match="not fitted"):
        CompiledForest.from_sklearn(RandomForestRegressor())
    with pytest.raises(TypeError):
        CompiledForest.from_sklearn(MLPRegressor())
    with pytest.raises(TypeError):
        CompiledMLP.from_sklearn(RandomForestRegressor())


# --------------------------------------------------------------------------------------------------
# MLPs


def test_mlp_regressor_multi_output_relu_matches_sklearn() -> None:
    X = _train_data(90, 400)
    y = _targets(X, 91, 3)
    mlp = _fit_quiet(MLPRegressor(hidden_layer_sizes=(64, 32), activation="relu", max_iter=60, random_state=92), X, y)
    model = CompiledMLP.from_sklearn(mlp)
    assert model.n_features == N_FEATURES and model.n_outputs == 3
    X_test = np.vstack([X, _train_data(93, 600)])
    got, expected = model.predict(X_test), mlp.predict(X_test)
    assert got.shape == expected.shape == (1000, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    np.testing.assert_allclose(model.predict(X_test[5]), mlp.predict(X_test[5:6]), rtol=1e-12, atol=0)
    X_f32 = X_test[:50].astype(np.float32)
    np.testing.assert_allclose(model.predict(X_f32), mlp.predict(X_f32), rtol=1e-12, atol=0)


@pytest.mark.parametrize("activation", ["tanh", "logistic", "identity"])
def test_mlp_regressor_single_output_activations(activation: str) -> None:
    X = _train_data(100, 300)
    y = _targets(X, 101, 1)
    mlp = _fit_quiet(MLPRegressor(hidden_layer_sizes=(16,), activation=activation, max_iter=40, random_state=102),
                     X, y)
    model = CompiledMLP.from_sklearn(mlp)
    got = model.predict(X)
    assert got.shape == (300,)
    np.testing.assert_allclose(got, mlp.predict(X), rtol=1e-12, atol=0)


@pytest.mark.parametrize("label_kind", ["binary", "multiclass", "multilabel"])
def test_mlp_classifier_matches_sklearn(label_kind: str) -> None:
    X = _train_data(110, 300)
    labels = _class_labels(X, 111)
    if label_kind == "binary":
        y: Arr = np.where(labels >= 2, "mitigate", "skip")
    elif label_kind == "multiclass":
        y = labels
    else:
        y = np.stack([labels >= 2, labels % 2 == 0, labels == 3], axis=1).astype(int)
    mlp = _fit_quiet(MLPClassifier(hidden_layer_sizes=(12,), max_iter=50, random_state=112), X, y)
    model = CompiledMLP.from_sklearn(mlp)
    assert model.kind == "classifier"
    assert np.array_equal(model.predict(X), mlp.predict(X))
    np.testing.assert_allclose(model.predict_proba(X), mlp.predict_proba(X), rtol=1e-12, atol=0)
    loaded = CompiledMLP.from_arrays(_roundtrip(model.to_arrays("clf")), "clf")
    assert np.array_equal(loaded.predict(X), mlp.predict(X))


def test_mlp_rejects_bad_input() -> None:
    X = _train_data(120, 100)
    mlp = _fit_quiet(MLPRegressor(hidden_layer_sizes=(4,), max_iter=5, random_state=0), X, _targets(X, 121, 2))
    model = CompiledMLP.from_sklearn(mlp)
    for bad in (X[:2, :3], X[0, :3], np.zeros((1, N_FEATURES + 2))):
        with pytest.raises(ValueError, match="features"):
            model.predict(bad)
    nan_row = X[:1].copy()
    nan_row[0, 0] = np.nan
    with pytest.raises(ValueError):
        model.predict(nan_row)
    with pytest.raises(TypeError):
        model.predict_proba(X)


# --------------------------------------------------------------------------------------------------
# serialisation


def test_savez_round_trip_without_pickle() -> None:
    X = _train_data(130)
    rf_c = RandomForestClassifier(n_estimators=12, random_state=131).fit(X, _class_labels(X, 132))
    rf_r = RandomForestRegressor(n_estimators=12, random_state=133).fit(X, _targets(X, 134, 2))
    mlp = _fit_quiet(MLPRegressor(hidden_layer_sizes=(64, 32), max_iter=20, random_state=135), X, _targets(X, 136, 3))
    compiled = {"clf": CompiledForest.from_sklearn(rf_c), "reg": CompiledForest.from_sklearn(rf_r)}
    net = CompiledMLP.from_sklearn(mlp)
    arrays: dict[str, Arr] = {}
    for prefix, m in compiled.items():
        arrays.update(m.to_arrays(prefix))
    arrays.update(net.to_arrays("mlp"))
    assert all(a.dtype.kind != "O" for a in arrays.values())

    loaded = _roundtrip(arrays)
    X_test = np.vstack([_boundary_rows(compiled["clf"], X, 137), _boundary_rows(compiled["reg"], X, 138)])
    clf = CompiledForest.from_arrays(loaded, "clf")
    reg = CompiledForest.from_arrays(loaded, "reg")
    net2 = CompiledMLP.from_arrays(loaded, "mlp")
    for name in ("feature", "threshold", "left", "right", "missing_go_to_left", "value", "roots"):
        assert np.array_equal(getattr(clf, name), getattr(compiled["clf"], name))
        assert getattr(clf, name).dtype == getattr(compiled["clf"], name).dtype
    assert clf.max_depth == compiled["clf"].max_depth and clf.n_features == N_FEATURES
    assert np.array_equal(clf.predict_proba(X_test), compiled["clf"].predict_proba(X_test))
    assert np.array_equal(clf.predict_proba(X_test), rf_c.predict_proba(X_test))
    assert np.array_equal(clf.predict(X_test), rf_c.predict(X_test))
    assert np.array_equal(reg.predict(X_test), rf_r.predict(X_test))
    assert np.array_equal(net2.predict(X_test), net.predict(X_test))
    np.testing.assert_allclose(net2.predict(X_test), mlp.predict(X_test), rtol=1e-12, atol=0)


def test_from_arrays_rejects_damaged_models() -> None:
    X = _train_data(140, 200)
    model = CompiledForest.from_sklearn(RandomForestRegressor(n_estimators=3, random_state=0).fit(X, X[:, 0]))
    arrays = model.to_arrays("m")
    inner = int(np.flatnonzero(model.left != -1)[0])

    def damaged(name: str, change: Any) -> dict[str, Arr]:
        copy = dict(arrays)
        a = np.array(copy[f"m.{name}"])
        copy[f"m.{name}"] = change(a)
        return copy

    def set_at(i: int, v: Any) -> Any:
        def change(a: Arr) -> Arr:
            a[i] = v
            return a
        return change

    bad_sets = [
        damaged("left", set_at(inner, len(model.left))),  # child out of range
        damaged("right", set_at(inner, -1)),  # half a leaf
        damaged("feature", set_at(inner, N_FEATURES)),  # feature out of range
        damaged("left", set_at(inner, inner)),  # a cycle
        damaged("max_depth", lambda a: np.array(int(a) - 1)),  # deeper than declared
        damaged("value", lambda a: a[:-1]),  # wrong length
        damaged("threshold", lambda a: a.astype(str)),  # wrong dtype
        damaged("format", lambda a: np.array("something-else")),
        {k: v for k, v in arrays.items() if k != "m.roots"},  # missing array
    ]
    for bad in bad_sets:
        with pytest.raises(ValueError):
            CompiledForest.from_arrays(bad, "m")
    with pytest.raises(ValueError):
        CompiledForest.from_arrays(arrays, "other")
    # a classifier needs classes with one entry per value column
    with pytest.raises(ValueError):
        dataclasses.replace(model, kind="classifier")
    with pytest.raises(ValueError):
        CompiledMLP.from_arrays(arrays, "m")


def test_xgboost_booster_compiles_to_the_same_probabilities() -> None:
    import xgboost as xgb

    rng = np.random.default_rng(21)
    x = rng.normal(size=(600, 7)).astype(np.float64)
    x[:, 3] = np.round(x[:, 3], 1)  # repeated values: splits land exactly on data points
    y = (x[:, 0] > 0).astype(int) + (x[:, 3] > 0.2).astype(int) + (x[:, 5] > 1).astype(int)
    x[rng.uniform(size=x.shape) < 0.02] = np.nan  # XGBoost's default directions for missing values
    clf = xgb.XGBClassifier(n_estimators=60, max_depth=4, random_state=0, n_jobs=1, objective="multi:softprob")
    clf.fit(x, y)
    booster = clf.get_booster()
    compiled = CompiledBooster.from_booster(booster)
    probe = np.vstack([x, rng.normal(size=(300, 7)), np.nextafter(x[:50], np.inf)])
    expected = booster.inplace_predict(probe)
    got = compiled.predict_proba(probe)
    assert got.shape == expected.shape == (len(probe), 4)
    np.testing.assert_allclose(got, expected, rtol=0, atol=5e-6)  # XGBoost sums in float32
    assert np.array_equal(got.argmax(axis=1), expected.argmax(axis=1))
    with pytest.raises(TypeError):
        CompiledBooster.from_booster(xgb.XGBRegressor(n_estimators=2).fit(x[:, :2], y).get_booster())
