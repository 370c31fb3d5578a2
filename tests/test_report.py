"""The audit report from synthetic state tables (no Ray, no model): numbers, plots, HTML, a real browser."""

from __future__ import annotations

import io
import json
import subprocess
import tempfile
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from ray_jobs.audit import STATE_SCHEMA
from ray_jobs.report import RANDOM_NOTE, ReportInput, check_alerts, render_html, write_report
from ray_jobs.storage import S3Options
from tests.corpus import astronaut_jpeg_bytes

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
ALBUMS = ["2023/summer", "2023/winter", "2024/trip", ""]
MODEL = {"model_id": "random-tiny-seed0", "sha256": "ab" * 32, "preset": "tiny", "crop_mode": "five",
         "random_init": True}


def state_table(rows: list[dict]) -> pa.Table:
    base = {"status": "ok", "face_found": True, "deleted": False, "scored_at": T0, "model_sha256": MODEL["sha256"]}
    return pa.table({n: [{**base, **r}.get(n) for r in rows] for n in STATE_SCHEMA.names}, schema=STATE_SCHEMA)


def uri(root: Path, i: int) -> str:
    album = ALBUMS[i % len(ALBUMS)]
    return str(root / album / f"p{i:03d}.jpg") if album else str(root / f"p{i:03d}.jpg")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """120 photos last night; tonight 20 rescored lower, 10 new, 10 deleted; 3 real files are the worst."""
    root = tmp_path_factory.mktemp("lib")
    rng = np.random.default_rng(0)
    prev_scores = rng.normal(0.5, 0.3, 120)
    prev = [{"uri": uri(root, i), "score": float(s), "face_found": i % 7 != 0} for i, s in enumerate(prev_scores)]
    for i in (5, 17, 33):
        prev[i].update(status="error", score=None, error_code="truncated" if i != 33 else "not_an_image")
    cur = [dict(r) for r in prev[:110]]
    for r in cur[40:60]:
        if r.get("status", "ok") == "ok":
            r["score"] -= 1.0
    cur += [{"uri": uri(root, 200 + j), "score": float(rng.normal(0.2, 0.3))} for j in range(10)]
    cur[-1].update(status="error", score=None, error_code="not_an_image")
    for k, i in enumerate((1, 2, 3)):  # the three worst exist on disk, with thumbnails
        cur[i]["score"] = -5.0 + k
        Path(cur[i]["uri"]).parent.mkdir(parents=True, exist_ok=True)
        Path(cur[i]["uri"]).write_bytes(astronaut_jpeg_bytes(80, 300 + 40 * k, 260))
    gone = [{**r, "deleted": True, "deleted_at": T0} for r in prev[110:]]
    scored = cur[40:60] + cur[110:]
    out = tmp_path_factory.mktemp("report")
    counts = {"listed": 120, "new": 10, "changed": 17, "retry": 3, "unchanged": 90, "deleted": 10, "scored": 30}
    inp = ReportInput(run_id="run2", library=str(root), out=str(out), s3=S3Options(),
                      current=state_table(cur + gone), previous=state_table(prev), scored=state_table(scored),
                      counts=counts, model=MODEL, previous_run_id="run1", top_worst=8, prefix_depth=2,
                      alert_if_mean_drops=0.05, alert_if_error_rate=0.2)
    summary = write_report(inp)
    return {"out": out, "summary": summary, "cur": cur, "prev": prev, "scored": scored, "root": root}


def _ok(rows: list[dict]) -> np.ndarray:
    return np.array([r["score"] for r in rows if r.get("status", "ok") == "ok"])


def test_summary_json_numbers(synthetic: dict) -> None:
    s = json.loads((synthetic["out"] / "summary.json").read_text())
    cur, prev = _ok(synthetic["cur"]), _ok(synthetic["prev"])
    assert s["counts"] == {"listed": 120, "new": 10, "changed": 17, "retry": 3, "unchanged": 90, "deleted": 10,
                           "scored": 30}
    t = s["tonight"]
    assert (t["objects"], t["ok"], t["error"]) == (120, 116, 4)
    assert t["error_codes"] == {"not_an_image": 2, "truncated": 2}
    assert t["mean"] == pytest.approx(cur.mean()) and s["previous"]["mean"] == pytest.approx(prev.mean())
    assert t["quantiles"]["p10"] == pytest.approx(np.quantile(cur, 0.1))
    assert s["mean_shift"] == pytest.approx(cur.mean() - prev.mean())
    no_face = sum(1 for r in synthetic["cur"] if r.get("status", "ok") == "ok" and not r.get("face_found", True))
    assert t["no_face_rate"] == pytest.approx(no_face / 116)
    assert s["scored_this_run"]["objects"] == 30 and s["error_rate"] == pytest.approx(1 / 30)
    assert s["random_weights"] is True and s["random_weights_note"] == RANDOM_NOTE
    # Worst: the three planted scores first, in order, then the next lowest.
    order = sorted((r["score"], r["uri"]) for r in synthetic["cur"] if r.get("status", "ok") == "ok")
    assert [w["uri"] for w in s["worst"]] == [u for _, u in order[:8]]
    assert [w["thumbnail"] is not None for w in s["worst"]] == [True] * 3 + [False] * 5
    # Prefixes at depth 2 are the albums; files at the root are "(top level)".
    by = {p["prefix"]: p for p in s["prefixes"]}
    assert set(by) == {"2023/summer", "2023/winter", "2024/trip", "(top level)"}
    summer = [r for r in synthetic["cur"] if "/2023/summer/" in r["uri"]]
    ok = _ok(summer)
    assert by["2023/summer"]["count"] == len(summer) and by["2023/summer"]["mean"] == pytest.approx(ok.mean())
    assert by["2023/summer"]["p50"] == pytest.approx(np.median(ok))
    assert by["2023/summer"]["error_rate"] == pytest.approx((len(summer) - len(ok)) / len(summer))
    # The mean fell by ~0.16 (> 0.05); 1/30 errors is under 0.2.
    assert [a["kind"] for a in s["alerts"]] == ["mean_drop"]
    assert s["alerts"][0]["value"] == pytest.approx(prev.mean() - cur.mean())


def test_alert_rules() -> None:
    base = {"previous_run_id": "r1", "scored_this_run": {"error_rate": 0.02, "objects": 50}}
    assert check_alerts({**base, "mean_shift": -0.3}, 0.2, None)[0]["kind"] == "mean_drop"
    assert check_alerts({**base, "mean_shift": -0.1}, 0.2, None) == []
    assert check_alerts({**base, "mean_shift": +0.5}, 0.2, None) == []
    assert check_alerts({**base, "mean_shift": None}, 0.2, None) == []  # first run: nothing to compare
    none_ok = {**base, "mean_shift": None, "previous": {"objects": 100, "mean": 0.5}, "tonight": {"mean": None}}
    [alert] = check_alerts(none_ok, 0.2, None)  # e.g. every photo non_finite_score under new weights
    assert alert["kind"] == "mean_drop" and "no photo of the library has an ok score now" in alert["message"]
    assert check_alerts(none_ok, None, None) == []
    assert [a["kind"] for a in check_alerts({**base, "mean_shift": 0.0}, None, 0.01)] == ["error_rate"]
    assert check_alerts({**base, "mean_shift": -1.0}, None, None) == []
    gone = {**base, "mean_shift": None, "counts": {"deleted": 30}, "previous": {"objects": 100}}
    alert = check_alerts(gone, None, None, 0.25)
    assert [(a["kind"], a["value"]) for a in alert] == [("deleted", 0.3)]
    assert alert[0]["message"].startswith(
        "30 of the previous run's 100 objects are gone from the listing (0.3000 > 0.25)")
    assert check_alerts(gone, None, None, 0.3) == [] and check_alerts(gone, None, None, None) == []
    assert check_alerts({**gone, "previous": None}, None, None, 0.0) == []  # first run: nothing was there


def test_pngs_are_real_plots(synthetic: dict) -> None:
    s = synthetic["summary"]
    files = s["files"]["plots"] + s["files"]["thumbnails"]
    assert len(s["files"]["plots"]) == 3 and len(s["files"]["thumbnails"]) == 3
    for name in files:
        with Image.open(synthetic["out"] / name) as img:
            rgb = np.asarray(img.convert("RGB"))
        assert min(rgb.shape[:2]) >= 100, name
        assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50 and rgb.std() > 10, f"{name} looks blank"


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def test_html_is_self_contained(synthetic: dict) -> None:
    page = (synthetic["out"] / "report.html").read_text()
    parser = _Refs()
    parser.feed(page)
    assert len(parser.refs) == 6  # 3 plots + 3 thumbnails
    for ref in parser.refs:
        assert "://" not in ref and not ref.startswith("/"), ref
        assert (synthetic["out"] / ref).is_file(), ref
    assert RANDOM_NOTE in page and "ALERT: mean score dropped" in page
    assert "2023/summer" in page and "not_an_image" in page
    assert "<th>retried</th>" in page and "<td>17</td><td>3</td><td>90</td>" in page  # changed, retried, unchanged


def test_no_banner_for_real_weights(synthetic: dict) -> None:
    s = {**synthetic["summary"], "random_weights": False}
    assert RANDOM_NOTE not in render_html(s) and "trained with random" not in render_html(s)
    s["model"] = {**s["model"], "random_parts": ["face"]}  # trained without the RetinaFace weights
    assert "trained with random RetinaFace weights" in render_html(s) and RANDOM_NOTE not in render_html(s)


def test_a_run_from_a_cached_model_copy_says_so(synthetic: dict) -> None:
    assert synthetic["summary"]["model"]["cached_copy"] is None and "could not be read" not in render_html(
        synthetic["summary"])
    s = {**synthetic["summary"], "model": {**synthetic["summary"]["model"], "cached_copy": "/cache/piqa/<0123>"}}
    assert "scored with the copy cached in /cache/piqa/&lt;0123&gt;" in render_html(s)


def test_empty_library_first_run(tmp_path: Path) -> None:
    """Nothing to score and nothing before: the report still renders, with no numbers to compare."""
    empty = state_table([])
    s = write_report(ReportInput(run_id="r0", library=str(tmp_path), out=str(tmp_path / "rep"), s3=S3Options(),
                                 current=empty, previous=None, scored=empty, model={**MODEL, "random_init": False},
                                 counts={"listed": 0, "new": 0, "changed": 0, "unchanged": 0, "deleted": 0,
                                         "scored": 0}, alert_if_mean_drops=0.1, alert_if_error_rate=0.01))
    assert s["tonight"]["mean"] is None and s["mean_shift"] is None and s["alerts"] == [] and s["worst"] == []
    assert s["random_weights"] is False and s["random_weights_note"] is None
    assert all((tmp_path / "rep" / f).is_file() for f in ["report.html", "summary.json", *s["files"]["plots"]])


# ------------------------------------------------------------------------------ headless browser
@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed by tests/install_chromium.sh when missing (needs root + apt)."""
    script = Path(__file__).with_name("install_chromium.sh")
    proc = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not proc.stdout.strip():
        pytest.skip(f"chromium cannot be installed here: {proc.stderr.strip()[-400:]}")
    return proc.stdout.strip().splitlines()[-1]


def screenshot(chromium: str, page: Path, png: Path) -> np.ndarray:
    """Render ``page`` headless (offline flags) into ``png``; returns its RGB pixels."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1280,2000", page.as_uri()],
            capture_output=True, text=True, timeout=120)
    assert png.is_file(), f"no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    with Image.open(png) as img:
        return np.asarray(img.convert("RGB"))


def assert_rendered(pixels: np.ndarray, banner: bool = True) -> None:
    """Not blank: many colours, several busy 200-px bands (plots, tables), the red banner on top."""
    assert pixels.shape[:2] == (2000, 1280)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500
    bands = [pixels[y:y + 200].astype(float).std() for y in range(0, 2000, 200)]
    assert sum(b > 30 for b in bands) >= 4, bands
    red = (np.abs(pixels[:120].astype(int) - (176, 0, 32)).sum(axis=-1) < 40).sum()
    assert (red > 5000) == banner, red


def test_report_renders_in_headless_chromium(synthetic: dict, chromium: str) -> None:
    png = synthetic["out"] / "screenshot.png"
    pixels = screenshot(chromium, synthetic["out"] / "report.html", png)
    assert_rendered(pixels)
    # The plots, loaded from their files, appear on the page: tonight's blue bars and lines are drawn.
    rgb = pixels.astype(int)
    blue = ((rgb[..., 2] - rgb[..., 0] > 60) & (rgb[..., 2] > 150)).sum()
    assert blue > 5000, blue


def test_thumbnails_open_input_formats_only(tmp_path: Path, monkeypatch) -> None:
    """A file replaced by PostScript after scoring never reaches Ghostscript through the report."""
    from PIL import EpsImagePlugin

    from ray_jobs.report import thumbnail
    from tests.test_preprocess import EPS

    started = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: started.append(a))
    (tmp_path / "a.jpg").write_bytes(EPS)
    (tmp_path / "b.jpg").write_bytes(astronaut_jpeg_bytes())
    assert thumbnail(str(tmp_path / "a.jpg"), S3Options()) is None and started == []
    with Image.open(io.BytesIO(thumbnail(str(tmp_path / "b.jpg"), S3Options()))) as thumb:
        assert max(thumb.size) == 160
