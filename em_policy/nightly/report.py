"""The nightly dashboard snapshot: one run's data rendered as a static HTML page, its PNG plots and data.json.

``render`` is pure (no I/O, no clock, no randomness): the pipeline decides where the files go (object store,
``./.qai/reports/``), and the same data gives byte-identical files, so a report can be digested and ledgered.

The page is self-contained: no external JS, CSS or fonts, and a Content-Security-Policy that allows only the
page's own inline style and script (by hash) and images from its own directory. A report opened from the
object store, from disk or from ``GET /v1/reports/latest`` therefore looks the same and never calls out.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import matplotlib
import matplotlib.style
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["DRIFT_METRICS", "render"]

DRIFT_METRICS = ("mae", "bias", "feature_shift")

# Fixed sizes and dpi: the PNG bytes depend on them, and the page lays out the same every night.
_DPI = 100
_WIDE = (10.0, 4.5)
_FIDELITY_COLUMNS = 3  # panels per row of the fidelity plot
_SQUARE = (7.0, 6.0)
_DRIFT = (10.0, 8.0)
_BARS = (8.0, 4.0)

# Reset to matplotlib's defaults first (after_reset) so a user's matplotlibrc or another module's rcParams
# cannot change our bytes; DejaVu Sans ships with matplotlib, so no system font is involved. The hash salt
# only matters should a plot ever be saved as SVG, where it seeds the element ids.
_RC: dict[str, Any] = {"svg.hashsalt": "qai-nightly-report", "figure.dpi": _DPI, "savefig.dpi": _DPI,
                       "font.family": "DejaVu Sans", "axes.grid": True, "grid.alpha": 0.3}

_MAX_TICKS = 12  # more day labels than this overlap at the fixed width
_LINESTYLES = ("-", "--", ":", "-.")
_STATUSES = frozenset({"ok", "partial", "failed", "skipped"})  # the only values that become CSS classes

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;
padding:1.5rem;color:#1d2329;background:#fff}
header{border-bottom:2px solid #d0d7de;margin-bottom:1rem}
h1{font-size:1.5rem;margin:0 0 .5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #d0d7de}
dl.meta{display:grid;grid-template-columns:max-content auto;gap:.2rem 1rem;margin:0 0 1rem}
dl.meta dt{font-weight:600}dl.meta dd{margin:0}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
th,td{border:1px solid #d0d7de;padding:.25rem .6rem;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;display:block;margin:.5rem 0}
.status-ok{color:#1a7f37;font-weight:600}.status-partial{color:#9a6700;font-weight:600}
.status-failed{color:#cf222e;font-weight:600}.status-skipped{color:#57606a;font-weight:600}
.status-unknown{color:#57606a;font-weight:600}
tr.over td{background:#ffebe9}.none{color:#57606a;font-style:italic}
"""

# Runs on load, when every <img> has either decoded or failed; the browser test reads the result from <body>.
_CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var broken = [];
  for (var i = 0; i < document.images.length; i++) {
    var img = document.images[i];
    if (!(img.complete && img.naturalWidth > 0)) { broken.push(img.getAttribute("src")); }
  }
  document.body.dataset.imagesChecked = String(document.images.length);
  document.body.dataset.brokenImages = JSON.stringify(broken);
  document.body.dataset.imagesOk = broken.length === 0 ? "true" : "false";
});
"""


def render(data: Mapping[str, Any]) -> dict[str, bytes]:
    """Files of the report by relative name: ``index.html``, the PNG plots and ``data.json`` (the input)."""
    history = _list(data.get("history"))
    thresholds = _mapping(data.get("thresholds"))
    decisions = {str(k): int(v) for k, v in _mapping(data.get("scheduler_decisions")).items()}
    colors = _backend_colors(data)
    files: dict[str, bytes] = {}
    with _plot_style():
        files["fidelity.png"] = _fidelity_plot(history, colors)
        files["overhead.png"] = _overhead_plot(history)
        files["predicted_vs_observed.png"] = _pvo_plot(_list(data.get("predicted_vs_observed")), colors)
        files["drift.png"] = _drift_plot(history, thresholds, colors)
        if decisions:  # no image at all for an empty period: the page says so in words instead
            files["decisions.png"] = _decisions_plot(decisions, colors)
    files["index.html"] = _page(data, history, thresholds, decisions).encode("utf-8")
    files["data.json"] = _data_json(data)
    return files


# ------------------------------------------------------------------------------------------------ data


def _list(value: Any) -> list[Any]:
    # A crashed run may hand over partial data; its report must still render, so absent means empty.
    return list(value) if value else []


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _num(value: Any) -> float:
    """A plottable float: None (metric not computed) and non-numbers become NaN, which matplotlib leaves as a gap."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _fmt(value: Any, digits: int = 4) -> str:
    number = _num(value)
    return "—" if math.isnan(number) else f"{number:.{digits}f}"


def _text(value: Any) -> str:
    return "—" if value is None else str(value)


def _over(metric: str, value: Any, threshold: Any) -> bool | None:
    """Whether a drift metric is over its threshold; None when either is unknown.

    Bias is signed (mean predicted − observed), and drift in either direction counts, as in ``drift.judge``.
    """
    v, t = _num(value), _num(threshold)
    if math.isnan(v) or math.isnan(t):
        return None
    return (abs(v) if metric == "bias" else v) > t


def _days(history: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(run.get("day", "")) for run in history]


def _backends(data: Mapping[str, Any]) -> list[str]:
    found: set[str] = set()
    for run in _list(data.get("history")):
        for key in ("fidelity", "drift", "missing"):
            found.update(str(b) for b in _mapping(run.get(key)))
    found.update(str(p.get("backend_id")) for p in _list(data.get("predicted_vs_observed")))
    found.update(str(b) for b in _mapping(data.get("scheduler_decisions")))
    return sorted(found)


def _backend_colors(data: Mapping[str, Any]) -> dict[str, Any]:
    # One colour per backend across every plot, assigned in sorted order so it is stable from night to night.
    cmap = matplotlib.colormaps["tab10"]
    return {backend: cmap(i % cmap.N) for i, backend in enumerate(_backends(data))}


def _data_json(data: Mapping[str, Any]) -> bytes:
    # Sorted keys and a fixed indent make the file canonical; strict JSON has no NaN, so non-finite floats
    # are stored as null (the same "not computed" the data uses for None).
    text = json.dumps(_finite(data), indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode("utf-8")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------ plots


@contextmanager
def _plot_style() -> Iterator[None]:
    with matplotlib.style.context(_RC, after_reset=True):
        yield


def _figure(size: tuple[float, float], rows: int = 1) -> tuple[Figure, list[Axes]]:
    # Figure with an explicit Agg canvas, not pyplot: no global backend switch, no figure registry to leak
    # into, and safe to call from the scheduler's worker thread.
    fig = Figure(figsize=size, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _png(fig: Figure) -> bytes:
    """PNG without the software-version stamp, so equal figures give equal bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    return buffer.getvalue()


def _no_data(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", fontsize=12, color="#57606a")
    ax.set_xticks([])
    ax.set_yticks([])


def _day_axis(ax: Axes, days: Sequence[str]) -> None:
    # Runs are categorical positions: a one-run history still plots, and a skipped night does not stretch the axis.
    step = max(1, math.ceil(len(days) / _MAX_TICKS))
    positions = list(range(0, len(days), step))
    ax.set_xticks(positions, [days[i] for i in positions], rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.5, max(len(days) - 0.5, 0.5))
    ax.set_xlabel("run day")


def _has_values(series: Iterable[float]) -> bool:
    return any(not math.isnan(v) for v in series)


def _fidelity_series(history: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[float]]:
    keys = sorted({(str(b), str(m)) for run in history
                   for b, methods in _mapping(run.get("fidelity")).items() for m in _mapping(methods)})
    return {(b, m): [_num(_mapping(_mapping(run.get("fidelity")).get(b)).get(m)) for run in history]
            for b, m in keys}


def _fidelity_plot(history: Sequence[Mapping[str, Any]], colors: Mapping[str, Any]) -> bytes:
    """Small multiples, one panel per method with a line per backend: 9 backends × 7 methods in one
    panel would be 63 lines no one can read, and a step change shows as one line dropping in every panel."""
    series = {k: v for k, v in _fidelity_series(history).items() if _has_values(v)}
    methods = sorted({m for _, m in series})
    if not methods:
        fig, (ax,) = _figure(_WIDE)
        _no_data(ax, "no fidelity data yet")
        ax.set_title("Fidelity by backend and method")
        return _png(fig)
    columns = min(_FIDELITY_COLUMNS, len(methods))
    rows = math.ceil(len(methods) / columns)
    fig = Figure(figsize=(_WIDE[0], 2.6 * rows + 0.8), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(rows, columns, squeeze=False, sharex=True)
    axes = [ax for row in grid for ax in row]
    days = _days(history)
    for ax, method in zip(axes, methods, strict=False):
        for (backend, m), values in sorted(series.items()):
            if m == method:
                ax.plot(range(len(values)), values, marker="o", markersize=3, color=colors.get(backend), label=backend)
        ax.set_title(method, fontsize=9)
        _day_axis(ax, days)
        ax.set_xlabel("")
    for ax in axes[len(methods):]:
        ax.set_axis_off()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    fig.supylabel("mean observed fidelity (mitigated)", fontsize=9)
    fig.suptitle("Fidelity by backend and method", fontsize=11)
    return _png(fig)


def _overhead_plot(history: Sequence[Mapping[str, Any]]) -> bytes:
    fig, (ax,) = _figure(_WIDE)
    methods = sorted({str(m) for run in history for m in _mapping(run.get("shot_multiplier"))})
    plotted = False
    for method in methods:
        values = [_num(_mapping(run.get("shot_multiplier")).get(method)) for run in history]
        if _has_values(values):
            ax.plot(range(len(values)), values, marker="o", markersize=4, label=method)
            plotted = True
    if plotted:
        _day_axis(ax, _days(history))
        ax.set_ylabel("shot multiplier (× unmitigated shots)")
        fig.legend(loc="outside right upper", fontsize=8)
    else:
        _no_data(ax, "no EM overhead data yet")
    ax.set_title("EM overhead by method")
    return _png(fig)


def _pvo_plot(points: Sequence[Mapping[str, Any]], colors: Mapping[str, Any]) -> bytes:
    fig, (ax,) = _figure(_SQUARE)
    pairs = [(str(p.get("backend_id")), _num(p.get("predicted")), _num(p.get("observed"))) for p in points]
    pairs = [(b, x, y) for b, x, y in pairs if not (math.isnan(x) or math.isnan(y))]
    lo, hi = _pvo_limits([v for _, x, y in pairs for v in (x, y)])
    ax.plot([lo, hi], [lo, hi], "--", color="grey", linewidth=1, label="predicted = observed")
    for backend in sorted({b for b, _, _ in pairs}):
        xs = [x for b, x, _ in pairs if b == backend]
        ys = [y for b, _, y in pairs if b == backend]
        ax.scatter(xs, ys, s=28, color=colors.get(backend), label=backend, zorder=3)
    if not pairs:
        ax.text(0.5, 0.6, "no predictions in this run", transform=ax.transAxes, ha="center", color="#57606a")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel("predicted fidelity")
    ax.set_ylabel("observed fidelity")
    ax.set_title("Predicted vs observed fidelity (this run)")
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def _pvo_limits(values: Sequence[float]) -> tuple[float, float]:
    # Zoom to the data (fidelities often sit in a narrow band) with a margin, and fall back to [0, 1].
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    margin = max(0.02, 0.05 * (hi - lo))
    return lo - margin, hi + margin


def _drift_plot(history: Sequence[Mapping[str, Any]], thresholds: Mapping[str, Any],
                colors: Mapping[str, Any]) -> bytes:
    fig, axes = _figure(_DRIFT, rows=len(DRIFT_METRICS))
    backends = sorted({str(b) for run in history for b in _mapping(run.get("drift"))})
    for ax, metric in zip(axes, DRIFT_METRICS, strict=True):
        _drift_axis(ax, metric, history, backends, _num(thresholds.get(metric)), colors)
    fig.suptitle("Drift metrics with their thresholds")
    return _png(fig)


def _drift_axis(ax: Axes, metric: str, history: Sequence[Mapping[str, Any]], backends: Sequence[str],
                threshold: float, colors: Mapping[str, Any]) -> None:
    plotted = False
    for backend in backends:
        values = [_num(_mapping(_mapping(run.get("drift")).get(backend)).get(metric)) for run in history]
        if _has_values(values):
            ax.plot(range(len(values)), values, marker="o", markersize=4, color=colors.get(backend), label=backend)
            plotted = True
    if not plotted:
        _no_data(ax, f"no {metric} values yet")
        ax.set_title(metric, fontsize=10)
        return
    if not math.isnan(threshold):
        ax.axhline(threshold, color="#cf222e", linestyle="--", linewidth=1.2, label=f"threshold {threshold:g}")
        if metric == "bias":  # bias drifts in both directions
            ax.axhline(-threshold, color="#cf222e", linestyle="--", linewidth=1.2)
    _day_axis(ax, _days(history))
    ax.set_title(metric, fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)


def _decisions_plot(decisions: Mapping[str, int], colors: Mapping[str, Any]) -> bytes:
    fig, (ax,) = _figure(_BARS)
    backends = sorted(decisions)
    bars = ax.bar(backends, [decisions[b] for b in backends], color=[colors.get(b) for b in backends])
    ax.bar_label(bars, fontsize=8)
    ax.set_ylabel("decisions")
    ax.set_axisbelow(True)  # grid lines behind the bars, not across them
    ax.grid(axis="x", visible=False)
    ax.set_title("Scheduler decisions by backend")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    return _png(fig)


# ------------------------------------------------------------------------------------------------ HTML


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Iterable[int] = (),
           row_classes: Sequence[str] | None = None) -> str:
    """An HTML table; every header and cell is escaped here, so callers pass plain text."""
    num = set(numeric)
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = row_classes[i] if row_classes else ""
        cells = "".join(f'<td class="num">{_e(c)}</td>' if j in num else f"<td>{_e(c)}</td>"
                        for j, c in enumerate(row))
        body.append(f'<tr class="{_e(cls)}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _none(sentence: str) -> str:
    return f'<p class="none">{_e(sentence)}</p>'


def _img(src: str, alt: str) -> str:
    return f'<img src="{_e(src)}" alt="{_e(alt)}">'


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>\n{body}\n</section>'


def _status(value: Any) -> str:
    status = str(value)
    css = status if status in _STATUSES else "unknown"
    return f'<span class="status-{css}">{_e(status)}</span>'


def _header(data: Mapping[str, Any]) -> str:
    items = [("Run", _e(data.get("run_id", ""))), ("Started", _e(data.get("started_at", ""))),
             ("Status", _status(data.get("status", ""))),
             ("Model version", _e(data.get("model_version") or "none"))]
    meta = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in items)
    return (f"<header><h1>Nightly EM report — {_e(data.get('run_id', ''))}</h1>"
            f'<dl class="meta">{meta}</dl><p>Data: <a href="data.json">data.json</a></p></header>')


def _alerts(alerts: Sequence[Mapping[str, Any]]) -> str:
    if not alerts:
        return _none("none")
    rows = [[_text(a.get("kind")), _text(a.get("backend_id")), _text(a.get("metric")), _fmt(a.get("value")),
             _fmt(a.get("threshold")), _text(a.get("message"))] for a in alerts]
    return _table(["kind", "backend", "metric", "value", "threshold", "message"], rows, numeric=(3, 4))


def _steps(steps: Sequence[Mapping[str, Any]]) -> str:
    if not steps:
        return _none("no steps recorded")
    rows = [[_text(s.get("name")), _text(s.get("status")), _fmt(s.get("seconds"), 2), _text(s.get("error") or "")]
            for s in steps]
    classes = ["over" if s.get("status") == "failed" else "" for s in steps]
    return _table(["step", "status", "seconds", "error"], rows, numeric=(2,), row_classes=classes)


def _pvo_table(points: Sequence[Mapping[str, Any]]) -> str:
    if not points:
        return _none("no predictions in this run")
    ordered = sorted(points, key=lambda p: (str(p.get("backend_id")), str(p.get("method"))))
    rows = [[_text(p.get("backend_id")), _text(p.get("method")), _fmt(p.get("predicted")), _fmt(p.get("observed")),
             _fmt(_num(p.get("predicted")) - _num(p.get("observed")))] for p in ordered]
    return _table(["backend", "method", "predicted", "observed", "predicted − observed"], rows, numeric=(2, 3, 4))


def _drift_table(history: Sequence[Mapping[str, Any]], thresholds: Mapping[str, Any]) -> str:
    drift = _mapping(history[-1].get("drift")) if history else {}
    if not drift:
        return _none("no drift metrics in this run")
    rows, classes = [], []
    for backend in sorted(drift):
        for metric in DRIFT_METRICS:
            value, threshold = _mapping(drift[backend]).get(metric), thresholds.get(metric)
            over = _over(metric, value, threshold)
            verdict = "no data" if over is None else ("over threshold" if over else "ok")
            rows.append([str(backend), metric, _fmt(value), _fmt(threshold), verdict])
            classes.append("over" if over else "")
    return _table(["backend", "metric", "value", "threshold", "verdict"], rows, numeric=(2, 3), row_classes=classes)


def _models(models: Sequence[Mapping[str, Any]]) -> str:
    if not models:
        return _none("no model versions registered")
    rows = [[_text(m.get("version")), _text(m.get("created_at")), "yes" if m.get("promoted") else "no",
             _fmt(m.get("holdout_mae")), "★ champion" if m.get("champion") else ""] for m in models]
    return _table(["version", "created", "promoted", "holdout MAE", "champion"], rows, numeric=(3,))


def _decisions(decisions: Mapping[str, int]) -> str:
    if not decisions:
        return _none("no scheduler decisions in this period")
    rows = [[b, str(decisions[b])] for b in sorted(decisions)]
    return _img("decisions.png", "Bar chart of scheduler decisions per backend") + _table(
        ["backend", "decisions"], rows, numeric=(1,))


def _consecutive_missing(history: Sequence[Mapping[str, Any]], backend: str) -> int:
    count = 0
    for run in reversed(history):
        if backend not in _mapping(run.get("missing")):
            break
        count += 1
    return count


def _missing(history: Sequence[Mapping[str, Any]]) -> str:
    missing = _mapping(history[-1].get("missing")) if history else {}
    if not missing:
        return _none("none")
    # The run count is what the "missing for more than N runs" alert is about, so show it beside the reason.
    rows = [[str(b), _text(missing[b]), str(_consecutive_missing(history, str(b)))] for b in sorted(missing)]
    return _table(["backend", "reason", "consecutive runs missing"], rows, numeric=(2,))


def _sections(data: Mapping[str, Any], history: Sequence[Mapping[str, Any]], thresholds: Mapping[str, Any],
              decisions: Mapping[str, int]) -> list[str]:
    points = _list(data.get("predicted_vs_observed"))
    return [
        _section("alerts", "Alerts", _alerts(_list(data.get("alerts")))),
        _section("steps", "Steps", _steps(_list(data.get("steps")))),
        _section("fidelity", "Fidelity by backend and method over time",
                 _img("fidelity.png", "Line plot of mean observed fidelity per backend and EM method, by run day")),
        _section("overhead", "EM overhead",
                 _img("overhead.png", "Line plot of the shot multiplier of each EM method, by run day")),
        _section("predicted-vs-observed", "Predicted vs observed fidelity",
                 _img("predicted_vs_observed.png", "Scatter of predicted against observed fidelity, this run")
                 + _pvo_table(points)),
        _section("drift", "Drift metrics with their thresholds",
                 _img("drift.png", "Drift metrics per backend by run day, with threshold lines")
                 + _drift_table(history, thresholds)),
        _section("models", "Model versions", _models(_list(data.get("models")))),
        _section("decisions", "Scheduler decisions by backend", _decisions(decisions)),
        _section("missing", "Missing backends", _missing(history)),
    ]


def _page(data: Mapping[str, Any], history: Sequence[Mapping[str, Any]], thresholds: Mapping[str, Any],
          decisions: Mapping[str, int]) -> str:
    csp = (f"default-src 'none'; img-src 'self'; style-src {_csp_hash(_STYLE)}; script-src {_csp_hash(_CHECK_SCRIPT)}; "
           "base-uri 'none'; form-action 'none'")
    body = "\n".join([_header(data), *_sections(data, history, thresholds, decisions)])
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        # Not _e: the policy is ours, not data, has no double quote, and its quotes must stay readable in source.
        f'<meta http-equiv="Content-Security-Policy" content="{html.escape(csp, quote=False)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>Nightly EM report {_e(data.get('run_id', ''))}</title>\n"
        f"<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n<script>{_CHECK_SCRIPT}</script>\n</body>\n</html>\n"
    )
