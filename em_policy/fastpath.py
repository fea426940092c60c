"""Fast serving of fitted scikit-learn models from compiled numpy arrays.

A single-row ``RandomForestClassifier.predict_proba`` call costs tens of milliseconds in scikit-learn,
almost all of it input validation and joblib dispatch. The EM policy service instead serves from the
classes below, which hold a fitted model as plain numpy arrays and reproduce scikit-learn's outputs
exactly (trees: bit for bit; MLPs: the same BLAS calls in the same order):

* :class:`CompiledForest` -- ``RandomForestClassifier`` / ``RandomForestRegressor`` /
  ``ExtraTreesClassifier`` / ``ExtraTreesRegressor`` and a single ``DecisionTree*`` / ``ExtraTree*``;
* :class:`CompiledMLP` -- ``MLPRegressor`` and ``MLPClassifier``.

Both serialise to a flat ``dict[str, ndarray]`` (``to_arrays``) that ``np.savez`` can store and
``np.load(..., allow_pickle=False)`` can read back (``from_arrays``); nothing is pickled, and
``from_arrays`` re-validates every array, so a damaged file raises ``ValueError`` instead of
indexing out of bounds.

scikit-learn is imported only by ``from_sklearn``; serving needs numpy (and scipy for the logistic
activation, exactly the function scikit-learn uses).

What scikit-learn does, and these classes replicate (checked against scikit-learn 1.9):

* Trees cast ``X`` to float32 first, then compare the float32 value, widened to float64, against the
  float64 threshold: ``x <= threshold`` goes left. A float64 input slightly above a threshold can
  therefore go left, because it rounds down onto the threshold in float32.
* ``X`` that overflows float32 becomes ``inf`` and is rejected (``ValueError``), as is any ``inf``.
* NaN: the forests, ``DecisionTree*`` and ``ExtraTree*`` with the default ``splitter="random"`` accept
  NaN at predict time (tag ``allow_nan``), even when they saw no NaN during fit; a NaN feature goes to
  the child given by the node's ``missing_go_to_left`` (for splits fitted without missing values, the
  child that received more training samples). When the estimator does not accept NaN (e.g.
  ``ExtraTreeRegressor(splitter="best")``), NaN input raises ``ValueError``, as in scikit-learn.
* Classifier leaves (scikit-learn >= 1.4) already store class fractions (weighted by sample weight,
  i.e. by bootstrap counts); a tree's ``predict_proba`` is that row, not re-normalised.
* A forest sums the per-tree outputs into a zero-initialised float64 buffer in estimator order, then
  divides by the number of trees. Floating-point addition is not associative, so the sum here is a
  strictly sequential ``np.add.accumulate`` over the tree axis, never ``np.sum`` (pairwise). With
  ``n_jobs`` > 1 scikit-learn's own summation order is thread-dependent; there it is only
  reproducible up to rounding.
* Regressors: a single output gives shape ``(n,)``, ``k`` outputs ``(n, k)``; classifiers predict
  ``classes[argmax(proba)]`` (first maximum on ties).
* MLPs: ``X @ W + b`` per layer, the hidden activation in place, then the output activation
  (``identity`` for regression, ``logistic`` for binary / multilabel, ``softmax`` for multiclass,
  computed with scikit-learn's formula). Float32 input stays float32 (numpy promotes against float64
  weights as scikit-learn does); any other numeric input is float64. ``MLPRegressor`` ravels a single
  output; ``MLPClassifier.predict`` inverts the label binarizer (threshold 0.5 for binary and
  multilabel, argmax for multiclass).

Input ``X`` is a 2-D array ``(n_samples, n_features)``; a 1-D array is one row. Empty input, a wrong
feature count, non-numeric dtypes and non-finite values raise ``ValueError``, like scikit-learn.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.special import expit

__all__ = ["CompiledForest", "CompiledMLP", "sum_trees"]

FOREST_FORMAT = "qai.em_policy.fastpath.forest/1"
MLP_FORMAT = "qai.em_policy.fastpath.mlp/1"

_INT32_MAX = int(np.iinfo(np.int32).max)
_HIDDEN_ACTIVATIONS = frozenset({"identity", "relu", "tanh", "logistic"})
_OUT_ACTIVATIONS = frozenset({"identity", "logistic", "softmax"})
_LABEL_TYPES = frozenset({"binary", "multiclass", "multilabel-indicator"})
# retire (tree, sample) pairs that reached a leaf every this many depth levels
_COMPACT_EVERY = 2

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int32]
BoolArray = npt.NDArray[np.bool_]
AnyArray = npt.NDArray[Any]


# --------------------------------------------------------------------------------------------------
# helpers


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _frozen(a: AnyArray) -> AnyArray:
    a = np.array(a, copy=True, order="C")
    a.setflags(write=False)
    return a


def _int32_array(name: str, a: AnyArray, ndim: int = 1) -> IntArray:
    a = np.asarray(a)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array, got dtype {a.dtype}")
    if a.size and (int(a.min()) < -2 or int(a.max()) > _INT32_MAX):
        raise ValueError(f"{name} has values outside the int32 node/feature range")
    out: IntArray = _frozen(a.astype(np.int32))
    return out


def _float_array(name: str, a: AnyArray, ndim: int) -> FloatArray:
    a = np.asarray(a)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be a numeric array, got dtype {a.dtype}")
    out: FloatArray = _frozen(a.astype(np.float64))
    return out


def _classes_for_storage(classes: AnyArray) -> AnyArray:
    """``classes`` as an array ``np.save`` writes without pickle (object dtype of str -> unicode)."""
    if classes.dtype.kind != "O":
        return classes
    if all(isinstance(c, str) for c in classes.tolist()):
        return np.asarray(classes.tolist(), dtype=np.str_)
    raise ValueError("classes of object dtype can only be stored without pickle when they are all str")


def _check_classes(classes: AnyArray | None) -> AnyArray | None:
    if classes is None:
        return None
    c = np.asarray(classes)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"classes must be a non-empty 1-D array, got shape {c.shape}")
    return _frozen(c)


def _get(arrays: Mapping[str, AnyArray], prefix: str, name: str) -> AnyArray:
    key = _key(prefix, name)
    try:
        return np.asarray(arrays[key])
    except KeyError:
        raise ValueError(f"missing array {key!r}") from None


def _get_str(arrays: Mapping[str, AnyArray], prefix: str, name: str) -> str:
    a = _get(arrays, prefix, name)
    if a.shape != () or a.dtype.kind != "U":
        raise ValueError(f"{_key(prefix, name)!r} must be a 0-d unicode array")
    return str(a[()])


def _get_int(arrays: Mapping[str, AnyArray], prefix: str, name: str) -> int:
    a = _get(arrays, prefix, name)
    if a.shape != () or a.dtype.kind not in "iub":
        raise ValueError(f"{_key(prefix, name)!r} must be a 0-d integer array")
    return int(a[()])


def _check_format(arrays: Mapping[str, AnyArray], prefix: str, expected: str) -> None:
    found = _get_str(arrays, prefix, "format")
    if found != expected:
        raise ValueError(f"{_key(prefix, 'format')!r} is {found!r}, expected {expected!r}")


def _as_2d(X: Any, n_features: int) -> AnyArray:
    """Shape and dtype checks shared by both model types; a 1-D input is one row."""
    a = np.asarray(X)
    if a.dtype.kind not in "biuf":
        raise ValueError(f"X must be numeric, got dtype {a.dtype}")
    if a.ndim == 1:
        a = a.reshape(1, -1)
    if a.ndim != 2:
        raise ValueError(f"X must be 1-D (one row) or 2-D (n_samples, n_features), got shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError("X has 0 samples; at least 1 is required")
    if a.shape[1] != n_features:
        raise ValueError(f"X has {a.shape[1]} features, but the model expects {n_features}")
    return a


# --------------------------------------------------------------------------------------------------
# trees


def sum_trees(per_tree: FloatArray) -> FloatArray:
    """The sum over axis 0 (trees) of ``(trees, n, columns)``, tree after tree into zeros, as
    scikit-learn adds them. Floating-point addition is not associative, so the order matters.

    numpy reduces an outer axis of a C-contiguous array whole rows at a time, in order: as
    sequential, and a tenth of ``np.add.accumulate``, which also writes every partial sum. With
    one value per tree, though, the tree axis is the contiguous one, and numpy sums that pairwise:
    there the accumulation runs. tests/test_policy_fastpath.py checks both against a loop."""
    contiguous = np.ascontiguousarray(per_tree)
    if contiguous.shape[1] * contiguous.shape[2] > 1:
        reduced: FloatArray = np.add.reduce(contiguous, axis=0)
        return reduced
    accumulated: FloatArray = np.add.accumulate(contiguous, axis=0)[-1]
    return accumulated


@dataclass(frozen=True, eq=False)
class CompiledForest:
    """All trees of a fitted scikit-learn forest (or one tree) as flat arrays.

    Node ``i`` of the concatenation is a leaf when ``left[i] == right[i] == -1``; otherwise samples
    with ``float32(x[feature[i]]) <= threshold[i]`` go to ``left[i]`` (absolute index), others to
    ``right[i]``, and NaN to ``left[i]`` if ``missing_go_to_left[i]`` else ``right[i]``. ``feature``
    and ``threshold`` of leaves are scikit-learn's placeholders (-2) and are ignored. ``value`` holds
    per node the class fractions (classifier, ``[nodes, n_classes]``) or the outputs (regressor,
    ``[nodes, n_outputs]``). ``roots`` is the root node of each tree, ``max_depth`` the depth of the
    deepest tree (edges from root to leaf).
    """

    kind: str  # "classifier" | "regressor"
    classes: AnyArray | None  # classifier: estimator.classes_; regressor: None
    n_features: int
    feature: IntArray
    threshold: FloatArray
    left: IntArray
    right: IntArray
    missing_go_to_left: BoolArray
    value: FloatArray
    roots: IntArray
    max_depth: int
    allow_nan: bool = True  # whether the estimator accepts NaN input (scikit-learn's allow_nan tag)

    # Traversal table derived in __post_init__: row i holds node i's threshold (its float64 bits),
    # feature, left and right child, so a step reads one 32-byte row where three arrays cost three
    # cache misses (the forest, 1.6 MB here, is cold by the time a decision reaches it). Leaves point
    # to themselves and carry a safe placeholder feature 0, so every path can take the same number
    # of steps.
    _nodes: npt.NDArray[np.int64] = field(init=False, repr=False)
    _internal: BoolArray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ("classifier", "regressor"):
            raise ValueError(f"kind must be 'classifier' or 'regressor', got {self.kind!r}")
        feature = _int32_array("feature", self.feature)
        left = _int32_array("left", self.left)
        right = _int32_array("right", self.right)
        roots = _int32_array("roots", self.roots)
        threshold = _float_array("threshold", self.threshold, 1)
        value = _float_array("value", self.value, 2)
        mgl = np.asarray(self.missing_go_to_left)
        if mgl.ndim != 1 or mgl.dtype.kind not in "biu":
            raise ValueError("missing_go_to_left must be a 1-D boolean array")
        mgl = _frozen(mgl.astype(np.bool_))
        classes = _check_classes(self.classes)
        n_nodes = feature.shape[0]
        if n_nodes == 0 or any(a.shape[0] != n_nodes for a in (left, right, threshold, value, mgl)):
            raise ValueError("feature, threshold, left, right, missing_go_to_left and value need the same, "
                             "non-zero number of nodes")
        if value.shape[1] == 0:
            raise ValueError("value has no columns")
        if int(self.n_features) < 1:
            raise ValueError(f"n_features must be >= 1, got {self.n_features}")
        if int(self.max_depth) < 0:
            raise ValueError(f"max_depth must be >= 0, got {self.max_depth}")
        if self.kind == "classifier":
            if classes is None or classes.shape[0] != value.shape[1]:
                raise ValueError("a classifier needs classes with one entry per value column")
        elif classes is not None:
            raise ValueError("a regressor has no classes")
        if roots.shape[0] == 0 or int(roots.min()) < 0 or int(roots.max()) >= n_nodes:
            raise ValueError("roots must be a non-empty array of node indices")
        leaf = left == -1
        if not np.array_equal(leaf, right == -1):
            raise ValueError("a node must have either two children or none")
        internal = ~leaf
        for name, child in (("left", left), ("right", right)):
            c = child[internal]
            if c.size and (int(c.min()) < 0 or int(c.max()) >= n_nodes):
                raise ValueError(f"{name} child index out of range")
        f = feature[internal]
        if f.size and (int(f.min()) < 0 or int(f.max()) >= int(self.n_features)):
            raise ValueError("feature index out of range")
        if not np.isfinite(value).all():
            raise ValueError("value contains non-finite numbers")

        # every root-to-leaf path must end within max_depth levels (also rules out cycles)
        frontier = np.unique(roots)
        for _ in range(int(self.max_depth)):
            inner = frontier[internal[frontier]]
            if inner.size == 0:
                break
            frontier = np.unique(np.concatenate((left[inner], right[inner])))
        if internal[frontier].any():
            raise ValueError(f"a tree is deeper than max_depth={self.max_depth} (or has a cycle)")

        idx = np.arange(n_nodes, dtype=np.int64)
        nodes = np.empty((n_nodes, 4), dtype=np.int64)
        nodes[:, 0] = np.where(leaf, 0.0, threshold).view(np.int64)
        nodes[:, 1] = np.where(leaf, 0, feature)
        nodes[:, 2] = np.where(leaf, idx, left)
        nodes[:, 3] = np.where(leaf, idx, right)
        derived = {"_nodes": nodes, "_internal": internal}
        public: dict[str, AnyArray | None] = {
            "feature": feature, "left": left, "right": right, "roots": roots, "threshold": threshold,
            "value": value, "missing_go_to_left": mgl, "classes": classes,
        }
        for name, arr in {**public, **derived}.items():
            if arr is not None:
                arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "n_features", int(self.n_features))
        object.__setattr__(self, "max_depth", int(self.max_depth))
        object.__setattr__(self, "allow_nan", bool(self.allow_nan))

    # ---------------------------------------------------------------------------------------------

    @property
    def n_trees(self) -> int:
        return int(self.roots.shape[0])

    @property
    def n_outputs(self) -> int:
        """Number of regression outputs (1 for a classifier)."""
        return 1 if self.kind == "classifier" else int(self.value.shape[1])

    @classmethod
    def from_sklearn(cls, estimator: Any) -> CompiledForest:
        """Compile a fitted forest or decision tree (single-output for classifiers)."""
        from sklearn.base import is_classifier, is_regressor
        from sklearn.ensemble import (
            ExtraTreesClassifier,
            ExtraTreesRegressor,
            RandomForestClassifier,
            RandomForestRegressor,
        )
        from sklearn.tree import BaseDecisionTree
        from sklearn.utils import get_tags

        forests = (RandomForestClassifier, RandomForestRegressor, ExtraTreesClassifier, ExtraTreesRegressor)
        if isinstance(estimator, forests):
            if not hasattr(estimator, "estimators_"):
                raise ValueError(f"{type(estimator).__name__} is not fitted")
            trees = list(estimator.estimators_)
        elif isinstance(estimator, BaseDecisionTree):
            if not hasattr(estimator, "tree_"):
                raise ValueError(f"{type(estimator).__name__} is not fitted")
            trees = [estimator]
        else:
            raise TypeError(f"unsupported estimator {type(estimator).__name__}; expected a scikit-learn "
                            "RandomForest*, ExtraTrees*, DecisionTree* or ExtraTree*")
        if is_classifier(estimator):
            kind = "classifier"
        elif is_regressor(estimator):
            kind = "regressor"
        else:  # pragma: no cover - every accepted class is one of the two
            raise TypeError(f"{type(estimator).__name__} is neither a classifier nor a regressor")
        n_outputs = int(estimator.n_outputs_)
        classes: AnyArray | None = None
        if kind == "classifier":
            if n_outputs != 1:
                raise ValueError("only single-output classifiers are supported")
            classes = np.asarray(estimator.classes_)
        n_classes = 0 if classes is None else int(classes.shape[0])

        features, thresholds, lefts, rights, mgls, values, roots = [], [], [], [], [], [], []
        offset = 0
        max_depth = 0
        for tree in trees:
            t = tree.tree_
            n = int(t.node_count)
            v = np.asarray(t.value)
            if v.shape[0] != n or v.shape[1] != n_outputs:
                raise ValueError(f"unexpected tree value shape {v.shape}")
            if kind == "classifier":
                if v.shape[2] < n_classes:
                    raise ValueError(f"tree has {v.shape[2]} class columns, the forest {n_classes} classes")
                values.append(v[:, 0, :n_classes])
            else:
                values.append(v[:, :, 0])
            cl = np.asarray(t.children_left, dtype=np.int64)
            cr = np.asarray(t.children_right, dtype=np.int64)
            lefts.append(np.where(cl == -1, -1, cl + offset))
            rights.append(np.where(cr == -1, -1, cr + offset))
            features.append(np.asarray(t.feature, dtype=np.int64))
            thresholds.append(np.asarray(t.threshold, dtype=np.float64))
            mgl = getattr(t, "missing_go_to_left", None)  # scikit-learn >= 1.3
            mgls.append(np.zeros(n, dtype=np.bool_) if mgl is None else np.asarray(mgl).astype(np.bool_))
            roots.append(offset)
            max_depth = max(max_depth, int(t.max_depth))
            offset += n
        if offset > _INT32_MAX:
            raise ValueError("too many nodes for int32 indices")
        allow_nan = bool(get_tags(estimator).input_tags.allow_nan) and hasattr(trees[0].tree_, "missing_go_to_left")
        return cls(
            kind=kind,
            classes=classes,
            n_features=int(estimator.n_features_in_),
            feature=np.concatenate(features).astype(np.int32),
            threshold=np.concatenate(thresholds),
            left=np.concatenate(lefts).astype(np.int32),
            right=np.concatenate(rights).astype(np.int32),
            missing_go_to_left=np.concatenate(mgls),
            value=np.concatenate(values, axis=0).astype(np.float64),
            roots=np.asarray(roots, dtype=np.int32),
            max_depth=max_depth,
            allow_nan=allow_nan,
        )

    # ---------------------------------------------------------------------------------------------

    def _check_X(self, X: Any) -> tuple[FloatArray, bool]:
        a = _as_2d(X, self.n_features)
        with np.errstate(over="ignore", invalid="ignore"):
            x32 = a.astype(np.float32)  # what scikit-learn's validate_data(dtype=np.float32) does
        x = np.ascontiguousarray(x32, dtype=np.float64)  # exact widening, as in the C comparison
        has_nan = False
        if not np.isfinite(x).all():
            if np.isinf(x).any():
                raise ValueError("X contains infinity or a value too large for float32")
            if not self.allow_nan:
                raise ValueError("X contains NaN, which this model does not accept")
            has_nan = True
        return x, has_nan

    def apply(self, X: Any) -> npt.NDArray[np.intp]:
        """Absolute leaf index reached in every tree, shape ``(n_samples, n_trees)``."""
        x, has_nan = self._check_X(X)
        return self._apply(x, has_nan)

    def _apply(self, x: FloatArray, has_nan: bool) -> npt.NDArray[np.intp]:
        """Leaf per (sample, tree): all trees and samples advance together, one depth level per step.

        The (tree, sample) pairs are laid out tree-major (neighbouring pairs read the same tree's
        nodes); every ``_COMPACT_EVERY`` levels the pairs that reached a leaf are retired, so deep
        outlier paths do not keep the whole batch stepping, and the loop ends when none is left.
        """
        n, n_trees = x.shape[0], self.n_trees
        flat = x.ravel()
        # node of every (tree, sample) pair, and the offset of the sample's row in `flat`
        s: npt.NDArray[np.intp] = np.repeat(self.roots.astype(np.intp), n)
        base: npt.NDArray[np.intp] = np.tile(np.arange(n, dtype=np.intp) * self.n_features, n_trees)
        pos: npt.NDArray[np.intp] | None = None  # slot in `out` of every still-active pair
        out: npt.NDArray[np.intp] = np.empty(n * n_trees, dtype=np.intp)
        table, internal, mgl = self._nodes, self._internal, self.missing_go_to_left
        for level in range(1, self.max_depth + 1):
            node = table.take(s, axis=0)  # threshold bits, feature, left, right of each pair's node
            xv = flat.take(base + node[:, 1])
            thr = node[:, 0].view(np.float64)
            if has_nan:
                go_right = ~(xv <= thr)  # float32 value (exactly widened) vs float64 threshold; NaN -> right
                go_right &= ~(np.isnan(xv) & mgl.take(s))
            else:
                go_right = xv > thr  # the same without NaN, one array operation fewer per level
            s = np.where(go_right, node[:, 3], node[:, 2])
            if level % _COMPACT_EVERY == 0 and level < self.max_depth:
                active = internal.take(s)
                if not active.all():
                    if pos is None:
                        pos = np.arange(n * n_trees, dtype=np.intp)
                    done = ~active
                    out[pos[done]] = s[done]
                    keep = np.flatnonzero(active)
                    s, base, pos = s[keep], base[keep], pos[keep]
                    if keep.size == 0:
                        break
        if pos is None:
            out = s
        else:
            out[pos] = s
        leaves: npt.NDArray[np.intp] = out.reshape(n_trees, n).T
        return leaves

    def _mean_value(self, X: Any) -> FloatArray:
        x, has_nan = self._check_X(X)
        leaves = self._apply(x, has_nan)
        per_tree = self.value[leaves.T]  # (trees, n, columns)
        out: FloatArray = sum_trees(per_tree) / float(self.n_trees)
        return out

    def predict_proba(self, X: Any) -> FloatArray:
        """Class probabilities ``(n_samples, n_classes)``, equal to the estimator's ``predict_proba``."""
        if self.kind != "classifier":
            raise TypeError("predict_proba is only available for classifiers")
        return self._mean_value(X)

    def predict(self, X: Any) -> AnyArray:
        """Regressor: mean of the trees, ``(n,)`` or ``(n, n_outputs)``; classifier: ``classes[argmax]``."""
        mean = self._mean_value(X)
        if self.kind == "classifier":
            assert self.classes is not None
            out: AnyArray = self.classes.take(np.argmax(mean, axis=1), axis=0)
            return out
        return mean[:, 0] if mean.shape[1] == 1 else mean

    # ---------------------------------------------------------------------------------------------

    def to_arrays(self, prefix: str) -> dict[str, AnyArray]:
        """Flat arrays for ``np.savez`` (keys ``"{prefix}.{name}"``); no object arrays."""
        out: dict[str, AnyArray] = {
            "format": np.array(FOREST_FORMAT),
            "kind": np.array(self.kind),
            "n_features": np.array(self.n_features, dtype=np.int64),
            "max_depth": np.array(self.max_depth, dtype=np.int64),
            "allow_nan": np.array(self.allow_nan, dtype=np.bool_),
            "feature": self.feature,
            "threshold": self.threshold,
            "left": self.left,
            "right": self.right,
            "missing_go_to_left": self.missing_go_to_left,
            "value": self.value,
            "roots": self.roots,
        }
        if self.classes is not None:
            out["classes"] = _classes_for_storage(self.classes)
        return {_key(prefix, k): v for k, v in out.items()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, AnyArray], prefix: str) -> CompiledForest:
        """Inverse of :meth:`to_arrays`; accepts the mapping ``np.load`` returns."""
        _check_format(arrays, prefix, FOREST_FORMAT)
        classes_key = _key(prefix, "classes")
        return cls(
            kind=_get_str(arrays, prefix, "kind"),
            classes=np.asarray(arrays[classes_key]) if classes_key in arrays else None,
            n_features=_get_int(arrays, prefix, "n_features"),
            feature=_get(arrays, prefix, "feature"),
            threshold=_get(arrays, prefix, "threshold"),
            left=_get(arrays, prefix, "left"),
            right=_get(arrays, prefix, "right"),
            missing_go_to_left=_get(arrays, prefix, "missing_go_to_left"),
            value=_get(arrays, prefix, "value"),
            roots=_get(arrays, prefix, "roots"),
            max_depth=_get_int(arrays, prefix, "max_depth"),
            allow_nan=bool(_get_int(arrays, prefix, "allow_nan")),
        )


# --------------------------------------------------------------------------------------------------
# multi-layer perceptrons


def _activate(name: str, a: AnyArray) -> None:
    """scikit-learn's in-place activation functions (sklearn.neural_network._base)."""
    if name == "identity":
        return
    if name == "relu":
        np.maximum(a, 0, out=a)
    elif name == "tanh":
        np.tanh(a, out=a)
    elif name == "logistic":
        expit(a, out=a)
    elif name == "softmax":
        tmp = a - a.max(axis=1)[:, np.newaxis]
        np.exp(tmp, out=a)
        a /= a.sum(axis=1)[:, np.newaxis]
    else:  # pragma: no cover - validated in __post_init__
        raise ValueError(f"unknown activation {name!r}")


@dataclass(frozen=True, eq=False)
class CompiledMLP:
    """Weights of a fitted ``MLPRegressor`` / ``MLPClassifier``.

    ``coefs[i]`` has shape ``(n_in, n_out)`` and ``intercepts[i]`` ``(n_out,)``; the hidden layers use
    ``activation``, the last layer ``out_activation``. A classifier also keeps ``classes`` and the
    label binarizer's ``label_type`` (``"binary"``, ``"multiclass"`` or ``"multilabel-indicator"``).
    """

    kind: str  # "classifier" | "regressor"
    coefs: tuple[AnyArray, ...]
    intercepts: tuple[AnyArray, ...]
    activation: str
    out_activation: str
    classes: AnyArray | None = None
    label_type: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("classifier", "regressor"):
            raise ValueError(f"kind must be 'classifier' or 'regressor', got {self.kind!r}")
        if self.activation not in _HIDDEN_ACTIVATIONS:
            raise ValueError(f"unsupported hidden activation {self.activation!r}")
        if self.out_activation not in _OUT_ACTIVATIONS:
            raise ValueError(f"unsupported output activation {self.out_activation!r}")
        if len(self.coefs) == 0 or len(self.coefs) != len(self.intercepts):
            raise ValueError("coefs and intercepts need the same, non-zero number of layers")
        coefs: list[AnyArray] = []
        intercepts: list[AnyArray] = []
        n_in = -1
        for i, (w, b) in enumerate(zip(self.coefs, self.intercepts, strict=True)):
            w_a, b_a = np.asarray(w), np.asarray(b)
            if w_a.ndim != 2 or b_a.ndim != 1 or b_a.shape[0] != w_a.shape[1] or 0 in w_a.shape:
                raise ValueError(f"layer {i}: coef {w_a.shape} and intercept {b_a.shape} do not fit")
            if w_a.dtype not in (np.float32, np.float64) or b_a.dtype != w_a.dtype:
                raise ValueError(f"layer {i}: weights must be float32 or float64 of one dtype")
            if i and w_a.shape[0] != n_in:
                raise ValueError(f"layer {i} expects {w_a.shape[0]} inputs, the previous layer gives {n_in}")
            if not (np.isfinite(w_a).all() and np.isfinite(b_a).all()):
                raise ValueError(f"layer {i}: non-finite weights")
            n_in = int(w_a.shape[1])
            coefs.append(_frozen(w_a))
            intercepts.append(_frozen(b_a))
        classes = _check_classes(self.classes)
        if self.kind == "regressor":
            if classes is not None or self.label_type is not None:
                raise ValueError("a regressor has no classes or label_type")
            if self.out_activation != "identity":
                raise ValueError("a regressor's output activation is identity")
        else:
            if classes is None or self.label_type not in _LABEL_TYPES:
                raise ValueError("a classifier needs classes and a label_type in " + ", ".join(sorted(_LABEL_TYPES)))
            expected = {"binary": ("logistic", 1), "multiclass": ("softmax", classes.shape[0]),
                        "multilabel-indicator": ("logistic", classes.shape[0])}[self.label_type]
            if (self.out_activation, n_in) != expected:
                raise ValueError(f"{self.label_type} classifier with {classes.shape[0]} classes needs "
                                 f"output activation {expected[0]!r} and {expected[1]} outputs, "
                                 f"got {self.out_activation!r} and {n_in}")
            if self.label_type == "binary" and classes.shape[0] > 2:
                raise ValueError("a binary classifier has at most 2 classes")
        object.__setattr__(self, "coefs", tuple(coefs))
        object.__setattr__(self, "intercepts", tuple(intercepts))
        object.__setattr__(self, "classes", classes)

    @property
    def n_features(self) -> int:
        return int(self.coefs[0].shape[0])

    @property
    def n_outputs(self) -> int:
        return int(self.coefs[-1].shape[1])

    @classmethod
    def from_sklearn(cls, estimator: Any) -> CompiledMLP:
        """Compile a fitted ``MLPRegressor`` or ``MLPClassifier``."""
        from sklearn.neural_network import MLPClassifier, MLPRegressor

        if not isinstance(estimator, MLPRegressor | MLPClassifier):
            raise TypeError(f"unsupported estimator {type(estimator).__name__}; expected MLPRegressor or MLPClassifier")
        if not hasattr(estimator, "coefs_"):
            raise ValueError(f"{type(estimator).__name__} is not fitted")
        common: dict[str, Any] = {
            "coefs": tuple(np.asarray(w) for w in estimator.coefs_),
            "intercepts": tuple(np.asarray(b) for b in estimator.intercepts_),
            "activation": str(estimator.activation),
            "out_activation": str(estimator.out_activation_),
        }
        if isinstance(estimator, MLPClassifier):
            binarizer = estimator._label_binarizer
            if (binarizer.pos_label, binarizer.neg_label) != (1, 0):
                raise ValueError("unexpected label binarizer labels")
            return cls(kind="classifier", classes=np.asarray(estimator.classes_),
                       label_type=str(binarizer.y_type_), **common)
        return cls(kind="regressor", **common)

    def _forward(self, X: Any) -> AnyArray:
        a = _as_2d(X, self.n_features)
        if a.dtype != np.float32:
            a = a.astype(np.float64)  # scikit-learn keeps float32, and numpy promotes other inputs
        if not np.isfinite(a).all():
            raise ValueError("X contains NaN or infinity")
        activation = a
        last = len(self.coefs) - 1
        for i, (w, b) in enumerate(zip(self.coefs, self.intercepts, strict=True)):
            activation = activation @ w
            activation += b
            if i != last:
                _activate(self.activation, activation)
        _activate(self.out_activation, activation)
        return activation

    def predict(self, X: Any) -> AnyArray:
        """Same as the estimator's ``predict``: regressor values (1 output raveled) or class labels."""
        y = self._forward(X)
        if self.kind == "regressor":
            return y.ravel() if y.shape[1] == 1 else y
        assert self.classes is not None
        if self.label_type == "multiclass":
            out: AnyArray = self.classes[np.argmax(y, axis=1)]
            return out
        above = (y > 0.5).astype(np.intp)
        if self.label_type == "multilabel-indicator":
            return above
        if self.classes.shape[0] == 1:
            return np.repeat(self.classes[0], y.shape[0])
        out = self.classes[above.ravel()]
        return out

    def predict_proba(self, X: Any) -> AnyArray:
        """Classifier only: the estimator's ``predict_proba`` (binary: ``[1 - p, p]``)."""
        if self.kind != "classifier":
            raise TypeError("predict_proba is only available for classifiers")
        y = self._forward(X)
        if y.shape[1] == 1:
            p = y.ravel()
            out: AnyArray = np.vstack([1 - p, p]).T
            return out
        return y

    def to_arrays(self, prefix: str) -> dict[str, AnyArray]:
        """Flat arrays for ``np.savez`` (keys ``"{prefix}.{name}"``); no object arrays."""
        out: dict[str, AnyArray] = {
            "format": np.array(MLP_FORMAT),
            "kind": np.array(self.kind),
            "activation": np.array(self.activation),
            "out_activation": np.array(self.out_activation),
            "n_layers": np.array(len(self.coefs), dtype=np.int64),
        }
        for i, (w, b) in enumerate(zip(self.coefs, self.intercepts, strict=True)):
            out[f"coef{i}"] = w
            out[f"intercept{i}"] = b
        if self.classes is not None:
            out["classes"] = _classes_for_storage(self.classes)
        if self.label_type is not None:
            out["label_type"] = np.array(self.label_type)
        return {_key(prefix, k): v for k, v in out.items()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, AnyArray], prefix: str) -> CompiledMLP:
        """Inverse of :meth:`to_arrays`; accepts the mapping ``np.load`` returns."""
        _check_format(arrays, prefix, MLP_FORMAT)
        n_layers = _get_int(arrays, prefix, "n_layers")
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        classes_key = _key(prefix, "classes")
        return cls(
            kind=_get_str(arrays, prefix, "kind"),
            coefs=tuple(_get(arrays, prefix, f"coef{i}") for i in range(n_layers)),
            intercepts=tuple(_get(arrays, prefix, f"intercept{i}") for i in range(n_layers)),
            activation=_get_str(arrays, prefix, "activation"),
            out_activation=_get_str(arrays, prefix, "out_activation"),
            classes=np.asarray(arrays[classes_key]) if classes_key in arrays else None,
            label_type=_get_str(arrays, prefix, "label_type") if _key(prefix, "label_type") in arrays else None,
        )


# ------------------------------------------------------------------------------------------------ XGBoost


@dataclass(frozen=True, eq=False)
class CompiledBooster:
    """An XGBoost ``multi:softprob`` booster as one forest of K-column leaves: a tree adds its leaf
    weight to its own class's column; probabilities are the softmax of the base margins plus the sum.

    XGBoost sends ``x < split`` (in float32) left; the forest sends ``float32(x) <= threshold`` left,
    so each split becomes the next float32 below it: the same test. Sums are in float64 where XGBoost
    accumulates in float32, so probabilities agree to about 1e-6 (tests check it, and the argmax).
    """

    forest: CompiledForest
    base_margin: FloatArray
    tree_class: IntArray  # the class each tree's leaves add to (XGBoost's tree_info)
    _tree_class: FloatArray = field(init=False, repr=False)
    _walk: tuple[AnyArray, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        f = self.forest
        table = np.zeros((f.n_trees, f.value.shape[1]))
        table[np.arange(f.n_trees), np.asarray(self.tree_class)] = 1.0
        object.__setattr__(self, "_tree_class", table)
        # Boosted trees are shallow and all of similar depth: walking every tree one level per step,
        # leaves pointing to themselves, is cheaper here than the forest's general traversal.
        leaf = f.left == -1
        idx = np.arange(leaf.shape[0])
        walk = (np.where(leaf, 0, f.feature).astype(np.intp), np.where(leaf, np.inf, f.threshold),
                np.where(leaf, idx, f.left).astype(np.intp), np.where(leaf, idx, f.right).astype(np.intp),
                f.missing_go_to_left, f.value.sum(axis=1))
        object.__setattr__(self, "_walk", walk)

    @classmethod
    def from_booster(cls, booster: Any) -> CompiledBooster:
        import json

        model = json.loads(bytes(booster.save_raw("json")))["learner"]
        if model["objective"]["name"] != "multi:softprob":
            raise TypeError(f"only multi:softprob boosters compile, got {model['objective']['name']}")
        params = model["learner_model_param"]
        k, n_features = int(params["num_class"]), int(params["num_feature"])
        scores = np.asarray(json.loads(params["base_score"]), dtype=np.float64).reshape(-1)
        base: FloatArray = np.repeat(scores, k) if scores.shape[0] == 1 else scores
        gbm = model["gradient_booster"]["model"]
        feature, threshold, left, right, mgl, values, roots = [], [], [], [], [], [], []
        offset, depth = 0, 0
        for tree, cls_ in zip(gbm["trees"], gbm["tree_info"], strict=True):
            lc = np.asarray(tree["left_children"], dtype=np.int64)
            rc = np.asarray(tree["right_children"], dtype=np.int64)
            leaf = lc == -1
            split = np.asarray(tree["split_conditions"], dtype=np.float32)
            below = np.nextafter(split, np.float32(-np.inf)).astype(np.float64)
            value = np.zeros((lc.shape[0], k))
            value[leaf, int(cls_)] = split[leaf].astype(np.float64)  # a leaf's weight sits in split_conditions
            roots.append(offset)
            feature.append(np.where(leaf, -2, np.asarray(tree["split_indices"], dtype=np.int64)))
            threshold.append(np.where(leaf, -2.0, below))
            left.append(np.where(leaf, -1, lc + offset))
            right.append(np.where(leaf, -1, rc + offset))
            mgl.append(np.asarray(tree["default_left"], dtype=bool))
            values.append(value)
            depth = max(depth, _tree_depth(lc, rc))
            offset += lc.shape[0]
        forest = CompiledForest(kind="regressor", classes=None, n_features=n_features,
                                feature=np.concatenate(feature).astype(np.int32),
                                threshold=np.concatenate(threshold), left=np.concatenate(left).astype(np.int32),
                                right=np.concatenate(right).astype(np.int32), missing_go_to_left=np.concatenate(mgl),
                                value=np.vstack(values), roots=np.asarray(roots, dtype=np.int32), max_depth=depth)
        return cls(forest, base, np.asarray(gbm["tree_info"], dtype=np.int32))

    def predict_proba(self, X: Any) -> FloatArray:
        x, has_nan = self.forest._check_X(X)  # float32 values, as the forest compares them
        feature, threshold, left, right, default_left, leaf_value = self._walk
        rows = np.arange(x.shape[0])[:, None]
        node = np.broadcast_to(self.forest.roots.astype(np.intp), (x.shape[0], self.forest.n_trees))
        for _ in range(self.forest.max_depth):
            value = x[rows, feature[node]]
            go_right = value > threshold[node]
            if has_nan:
                go_right = np.where(np.isnan(value), ~default_left[node], go_right)
            node = np.where(go_right, right[node], left[node])
        # each tree adds its leaf's weight to its own class: one product with the trees' class one-hot
        margin = leaf_value[node] @ self._tree_class + self.base_margin
        margin -= margin.max(axis=1, keepdims=True)
        e = np.exp(margin)
        out: FloatArray = e / e.sum(axis=1, keepdims=True)
        return out


def _tree_depth(left: npt.NDArray[np.int64], right: npt.NDArray[np.int64]) -> int:
    depth, frontier = 0, np.array([0])
    while True:
        inner = frontier[left[frontier] != -1]
        if inner.size == 0:
            return depth
        frontier = np.concatenate((left[inner], right[inner]))
        depth += 1
