"""The nightly dashboard snapshot (issue 8): the renderer's output, then the page in a real headless Chromium.

The browser half serves the rendered files from a real local HTTP server and runs Debian's ``chromium``; a missing
browser fails the test run loudly (``make setup`` installs it), it is never skipped.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping
from datetime import date, timedelta
from functools import partial
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import numpy.typing as npt
import pytest
from cycler import cycler
from PIL import Image

from em_policy.nightly.report import render

CHROMIUM = "/usr/bin/chromium"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HOSTILE = "<script>alert('x')</script>"  # data text that must come out escaped, never as markup

SECTIONS = [
    "Alerts",
    "Steps",
    "Fidelity by backend and method over time",
    "EM overhead",
    "Predicted vs observed fidelity",
    "Drift metrics with their thresholds",
    "Model versions",
    "Scheduler decisions by backend",
    "Missing backends",
]

BACKENDS = ("fake_brisbane", "fake_kyiv", "fake_sherbrooke")
METHODS = ("none", "readout", "zne")
DRIFTED = "fake_kyiv"  # its calibration drifts at day 4
STEP_DAY = 3  # zero-based index of day 4
THRESHOLDS = {"mae": 0.05, "bias": 0.04, "feature_shift": 0.405}


# ------------------------------------------------------------------------------------------------ data


def _run(day_index: int, start: date) -> dict[str, Any]:
    day = start + timedelta(days=day_index)
    drifted = day_index >= STEP_DAY
    fidelity: dict[str, dict[str, float]] = {}
    drift: dict[str, dict[str, float | None]] = {}
    missing: dict[str, str] = {}
    for b, backend in enumerate(BACKENDS):
        if backend == "fake_sherbrooke" and day_index >= 5:  # offline for the last two nights
            missing[backend] = f"calibration refresh failed: {HOSTILE}"
            continue
        drop = 0.15 if backend == DRIFTED and drifted else 0.0
        fidelity[backend] = {m: round(0.62 + 0.08 * k + 0.03 * b - drop + 0.004 * (day_index % 2), 4)
                             for k, m in enumerate(METHODS)}
        drift[backend] = {
            "mae": 0.09 if backend == DRIFTED and drifted else round(0.018 + 0.002 * b, 4),
            "bias": -0.07 if backend == DRIFTED and drifted else 0.004,
            # no feature shift on the first night: there is no training snapshot to compare with yet
            "feature_shift": None if day_index == 0 else (0.61 if backend == DRIFTED and drifted else 0.05),
        }
    return {
        "run_id": f"nr-{day:%Y%m%d}T020000Z-{day_index:08x}",
        "day": day.isoformat(),
        "model_version": "em-policy/3" if day_index > STEP_DAY else "em-policy/2",
        "fidelity": fidelity,
        "shot_multiplier": {"none": 1.0, "readout": 1.05 + 0.01 * day_index, "zne": 3.0 + 0.05 * (day_index % 3)},
        "drift": drift,
        "missing": missing,
    }


def week(days: int = 7) -> dict[str, Any]:
    """A realistic report input: ``days`` nightly runs, a step change on one backend from day 4, this run last."""
    history = [_run(i, date(2026, 12, 1)) for i in range(days)]
    last: dict[str, Any] = history[-1] if history else {"run_id": "nr-20261201T020000Z-00000000", "fidelity": {}}
    points = [{"backend_id": b, "method": m, "predicted": round(v + (0.09 if b == DRIFTED else 0.01), 4),
               "observed": v} for b, methods in last["fidelity"].items() for m, v in methods.items()]
    return {
        "run_id": last["run_id"],
        "started_at": "2026-12-07T02:00:00+00:00",
        "status": "partial",
        "model_version": "em-policy/3",
        "thresholds": dict(THRESHOLDS),
        "history": history,
        "predicted_vs_observed": points,
        "models": [
            {"version": "em-policy/1", "created_at": "2026-11-20T02:10:00+00:00", "promoted": True,
             "holdout_mae": 0.031, "champion": False},
            {"version": "em-policy/2", "created_at": "2026-11-27T02:12:00+00:00", "promoted": True,
             "holdout_mae": 0.024, "champion": False},
            {"version": "em-policy/3", "created_at": "2026-12-04T02:14:00+00:00", "promoted": True,
             "holdout_mae": 0.019, "champion": True},
            {"version": "em-policy/4", "created_at": "2026-12-07T02:15:00+00:00", "promoted": False,
             "holdout_mae": None, "champion": False},
        ],
        "scheduler_decisions": {"fake_brisbane": 41, "fake_kyiv": 7, "fake_sherbrooke": 0},
        "steps": [
            {"name": "refresh_calibration", "status": "ok", "seconds": 4.2, "error": None},
            {"name": "run_workload", "status": "failed", "seconds": 301.5,
             "error": f"fake_sherbrooke: {HOSTILE}"},
            {"name": "write_results", "status": "ok", "seconds": 2.1, "error": None},
            {"name": "compute_drift", "status": "ok", "seconds": 1.4, "error": None},
            {"name": "retrain", "status": "skipped", "seconds": 0.0, "error": None},
            {"name": "publish", "status": "ok", "seconds": 0.7, "error": None},
        ],
        "alerts": [
            {"kind": "drift", "backend_id": DRIFTED, "metric": "mae", "value": 0.09, "threshold": 0.05,
             "message": "fake_kyiv MAE 0.090 > 0.050"},
            {"kind": "backend_missing", "backend_id": "fake_sherbrooke", "metric": None, "value": None,
             "threshold": None, "message": f"missing for 2 runs: {HOSTILE}"},
        ],
    }


def empty() -> dict[str, Any]:
    return {"run_id": "nr-20261201T020000Z-00000000", "started_at": "2026-12-01T02:00:00+00:00",
            "status": "failed", "model_version": None, "thresholds": dict(THRESHOLDS), "history": [],
            "predicted_vs_observed": [], "models": [], "scheduler_decisions": {}, "steps": [], "alerts": []}


class _Page(HTMLParser):
    """What the tests read from a page: <img> srcs, <h2> texts, <body> attributes, table rows, script count."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[str] = []
        self.headings: list[str] = []
        self.body: dict[str, str | None] = {}
        self.scripts = 0
        self.rows: list[tuple[str, list[str]]] = []  # (class of the <tr>, cell texts)
        self._in: str | None = None
        self._text = ""
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src") or "")
        elif tag == "body":
            self.body = a
        elif tag == "script":
            self.scripts += 1
        elif tag == "tr":
            self.rows.append((a.get("class") or "", []))
        elif tag in ("h2", "td"):
            self._in, self._text = tag, ""

    def handle_data(self, data: str) -> None:
        if self._in:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == self._in == "h2":
            self.headings.append(self._text.strip())
        elif tag == self._in == "td" and self.rows:
            self.rows[-1][1].append(self._text.strip())
        if tag == self._in:
            self._in = None


def _pixels(png: bytes) -> npt.NDArray[np.int32]:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int32)


def _colours(pixels: npt.NDArray[np.int32]) -> int:
    """Distinct RGB colours, packed into one int each (np.unique over rows is slow on a full screenshot)."""
    return len(np.unique((pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]))


# ------------------------------------------------------------------------------------------------ unit


@pytest.fixture(scope="module")
def report() -> dict[str, bytes]:
    return render(week())


def test_sections_in_order_with_header(report: dict[str, bytes]) -> None:
    text = report["index.html"].decode()
    page = _Page(text)
    assert page.headings == SECTIONS
    for fact in ("nr-20261207T020000Z-00000006", "2026-12-07T02:00:00+00:00", "partial", "em-policy/3"):
        assert fact in text.split("<section", 1)[0], f"header lacks {fact}"


def test_every_image_is_a_returned_png(report: dict[str, bytes]) -> None:
    page = _Page(report["index.html"].decode())
    assert sorted(page.images) == sorted(name for name in report if name.endswith(".png"))
    assert set(page.images) == {"fidelity.png", "overhead.png", "predicted_vs_observed.png", "drift.png",
                                "decisions.png"}
    for name in page.images:
        png = report[name]
        assert png.startswith(PNG_SIGNATURE), name
        assert len(png) > 10_000, f"{name} is only {len(png)} bytes"
        pixels = _pixels(png)
        assert pixels.shape[0] >= 300 and pixels.shape[1] >= 500, name
        assert _colours(pixels) > 50, f"{name} is nearly blank"


def test_page_is_self_contained(report: dict[str, bytes]) -> None:
    text = report["index.html"].decode()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text), "page references a remote resource"
    assert "default-src 'none'" in text  # the CSP that keeps it so in the browser
    assert _Page(text).scripts == 1  # only the image check; nothing from the data became a script


def test_text_from_data_is_escaped(report: dict[str, bytes]) -> None:
    text = report["index.html"].decode()
    assert "<script>alert" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    page = _Page(text)
    missing = [cells for _, cells in page.rows if cells and cells[0] == "fake_sherbrooke" and len(cells) == 3]
    assert missing == [["fake_sherbrooke", f"calibration refresh failed: {HOSTILE}", "2"]]  # escaped, not dropped


def test_step_change_is_marked_for_the_drifted_backend_only(report: dict[str, bytes]) -> None:
    rows = _Page(report["index.html"].decode()).rows
    drift_rows = [cells for _, cells in rows if len(cells) == 5 and cells[1] in ("mae", "bias", "feature_shift")]
    over = {(cells[0], cells[1]) for cells in drift_rows if cells[4] == "over threshold"}
    assert over == {(DRIFTED, "mae"), (DRIFTED, "bias"), (DRIFTED, "feature_shift")}
    assert {cls for cls, cells in rows if cells and cells[0] == DRIFTED and len(cells) == 5
            and cells[1] in ("mae", "bias", "feature_shift")} == {"over"}
    # The step is in the plots too: the week with the drift draws a different fidelity and drift plot than a
    # week without it, while the overhead plot (not affected by calibration) is the same.
    calm = week()
    before = calm["history"][STEP_DAY - 1]
    for run in calm["history"][STEP_DAY:]:
        run["fidelity"][DRIFTED] = dict(before["fidelity"][DRIFTED])
        run["drift"][DRIFTED] = dict(before["drift"][DRIFTED])
    calm_files = render(calm)
    assert calm_files["fidelity.png"] != report["fidelity.png"]
    assert calm_files["drift.png"] != report["drift.png"]
    assert calm_files["overhead.png"] == report["overhead.png"]


def test_same_data_gives_identical_bytes(report: dict[str, bytes]) -> None:
    # Twice, and once with someone else's rcParams in force: the renderer resets the style it draws with.
    assert render(week()) == report
    with matplotlib.rc_context({"lines.linewidth": 4.0, "font.size": 16, "axes.prop_cycle":
                                cycler(color=["k"])}):
        assert render(week()) == report


def test_data_json_is_the_input_canonically(report: dict[str, bytes]) -> None:
    assert json.loads(report["data.json"]) == week()
    text = report["data.json"].decode()
    assert text == json.dumps(week(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


@pytest.mark.parametrize("days", [0, 1])
def test_empty_and_one_run_history(days: int) -> None:
    data = empty() if days == 0 else {**week(1), "scheduler_decisions": {}, "alerts": []}
    files = render(data)
    page = _Page(files["index.html"].decode())
    assert page.headings == SECTIONS
    assert "decisions.png" not in files and "decisions.png" not in page.images
    assert "no scheduler decisions in this period" in files["index.html"].decode()
    assert "<h2>Alerts</h2>\n<p class=\"none\">none</p>" in files["index.html"].decode()
    assert set(page.images) == {n for n in files if n.endswith(".png")}
    for name in page.images:
        assert files[name].startswith(PNG_SIGNATURE)
        assert _pixels(files[name]).size > 0
    assert json.loads(files["data.json"]) == data
    assert render(data) == files


# ------------------------------------------------------------------------------------------------ browser

# Chromium writes every console message of a page to stderr with --enable-logging=stderr, as
#   [pid:tid:MMDD/HHMMSS.micros:INFO:CONSOLE:12] "message", source: http://127.0.0.1:port/index.html (12)
# (older builds: "INFO:CONSOLE(12)"). The level is INFO whatever the console method, so the log cannot tell
# console.error from console.log: the report must log nothing at all, and any console line is a failure.
# Uncaught exceptions ("Uncaught ...") and CSP violations (a remote resource the page tried to load) arrive
# the same way. test_console_detection_catches_errors proves the mechanism on a page that does each.
CONSOLE_LINE = re.compile(r':CONSOLE(?::\d+\]|\(\d+\)\]) "(?P<message>.*)", source: (?P<source>.*)$', re.MULTILINE)


@pytest.fixture(scope="module")
def chromium() -> str:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"headless Chromium is required at {CHROMIUM} and is missing: install Debian's 'chromium' "
                    "(make setup does: apt-get install chromium)", pytrace=False)
    return CHROMIUM


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # keep pytest's output to the test's own
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving a directory; yields its base URL and the directory."""
    root = tmp_path_factory.mktemp("site")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, name="report-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _publish(files: Mapping[str, bytes], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (directory / name).write_bytes(content)


def _browse(chromium: str, url: str, profile: Path, *mode: str) -> tuple[str, str]:
    """One headless Chromium run on ``url`` in a fresh profile; returns (stdout, stderr)."""
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
            "--no-first-run", "--disable-extensions", "--disable-background-networking",
            "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", *mode, url]
    # Its own process group, so a hung browser is killed with its zygote and GPU children.
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"chromium did not finish within 120 s on {url}; stderr tail:\n{err[-3000:]}")
    assert proc.returncode == 0, f"chromium exited {proc.returncode} on {url}; stderr tail:\n{err[-3000:]}"
    return out, err


def _console(stderr: str) -> list[str]:
    return [f"{m['message']} ({m['source']})" for m in CONSOLE_LINE.finditer(stderr)]


@pytest.fixture(scope="module")
def published(site: tuple[str, Path]) -> str:
    base, root = site
    _publish(render(week()), root / "report")
    return f"{base}/report/index.html"


def test_screenshot_is_not_blank(chromium: str, published: str, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    _, err = _browse(chromium, published, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2400",
                     "--hide-scrollbars")
    assert shot.is_file(), f"no screenshot written; stderr tail:\n{err[-3000:]}"
    pixels = _pixels(shot.read_bytes())
    assert pixels.shape[:2] == (2400, 1280)
    colours = _colours(pixels)
    non_white = float((pixels.min(axis=2) < 240).mean())
    assert colours > 200, f"screenshot has only {colours} distinct colours"
    assert float(pixels.std()) > 20.0, f"screenshot pixel std {pixels.std():.1f}"
    assert non_white > 0.02, f"only {non_white:.1%} of the screenshot is not white"
    # The plots were painted, not just the page's text: matplotlib's first three tab10 colours (one per backend)
    # appear nowhere in the page's CSS, so their pixels can only come from the plot images.
    for rgb in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)):
        painted = int((pixels == rgb).all(axis=2).sum())
        assert painted > 500, f"only {painted} pixels of plot colour {rgb} in the screenshot"
    assert _console(err) == []


def test_every_plot_loads_and_console_is_clean(chromium: str, published: str, tmp_path: Path) -> None:
    dom, err = _browse(chromium, published, tmp_path / "profile", "--dump-dom")
    body = _Page(dom).body
    assert body.get("data-images-ok") == "true", f"broken images: {body.get('data-broken-images')}"
    assert body.get("data-broken-images") == "[]"
    assert body.get("data-images-checked") == "5"
    assert _console(err) == [], "console output on the report page"


def test_image_check_reports_a_missing_plot(chromium: str, site: tuple[str, Path], tmp_path: Path) -> None:
    # The negative control of data-images-ok: the same report with one plot missing on the server.
    base, root = site
    _publish({k: v for k, v in render(week()).items() if k != "drift.png"}, root / "broken")
    dom, _ = _browse(chromium, f"{base}/broken/index.html", tmp_path / "profile", "--dump-dom")
    body = _Page(dom).body
    assert body.get("data-images-ok") == "false"
    assert json.loads(body.get("data-broken-images") or "") == ["drift.png"]


def test_console_detection_catches_errors(chromium: str, site: tuple[str, Path], tmp_path: Path) -> None:
    # The negative control of the console check: each kind of error it must see, on a tiny page of its own,
    # under the same CSP style as the report (so the blocked remote image is reported as the report's would be).
    base, root = site
    (root / "control").mkdir()
    (root / "control" / "index.html").write_text(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"img-src 'self'\"><title>control</title></head>"
        "<body><img src=\"https://example.invalid/remote.png\" alt=\"remote\">"
        "<script>console.error('CONTROL-console-error');</script>"
        "<script>throw new Error('CONTROL-uncaught');</script></body></html>")
    _, err = _browse(chromium, f"{base}/control/index.html", tmp_path / "profile", "--dump-dom")
    lines = "\n".join(_console(err))
    assert "CONTROL-console-error" in lines
    assert "Uncaught Error: CONTROL-uncaught" in lines
    assert "example.invalid/remote.png" in lines and "Content Security Policy" in lines

