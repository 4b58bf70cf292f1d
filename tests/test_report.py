"""The HTML run report: every figure embedded and saved beside it, no external resources, ensembles."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digitlab.cli import main
from digitlab.data import DigitData
from digitlab.report import FIGURE_FILES, REPORT_SECTIONS, smooth, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def eval_data(mnist_test: DigitData) -> DigitData:
    return mnist_test.subset(np.arange(1000), "mnist:test[:1000]")


@pytest.fixture(scope="module")
def report(tiny_run: Path, eval_data: DigitData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(tiny_run, eval_data, tmp_path_factory.mktemp("report") / "report.html")


def embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_every_figure_embedded_and_saved(report: Path) -> None:
    html = report.read_text()
    pngs = embedded_pngs(html)
    figures = [png for png in pngs if Image.open(io.BytesIO(png)).size[0] > 300]
    # every figure but the mistakes grid (HTML tiles with text captions, 28x28 images) is embedded
    assert len(figures) == len(FIGURE_FILES) - 1 == 5
    for section in REPORT_SECTIONS:
        assert f'<section id="{section}">' in html
    for key, name in FIGURE_FILES.items():
        path = report.parent / name
        assert path.is_file() and path.read_bytes().startswith(PNG_MAGIC)
        if key != "mistakes":
            assert path.read_bytes() in figures  # the file beside the HTML is the very figure embedded
    tiles = [png for png in pngs if Image.open(io.BytesIO(png)).size == (28, 28)]
    assert len(tiles) == len(pngs) - len(figures) > 0


def test_self_contained(report: Path) -> None:
    html = report.read_text()
    links = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert links and all(link.startswith(("data:", "#")) for link in links)
    assert "http://" not in html and "https://" not in html and "<script" not in html


def test_contents(report: Path, eval_data: DigitData) -> None:
    html = report.read_text()
    assert "mnist:test[:1000]" in html and eval_data.fingerprint in html
    assert "Total params: 594,922" in html  # the model summary table
    assert "&quot;optimizer&quot;: &quot;adam&quot;" in html  # the run's configuration, escaped
    assert "versions now: torch" in html and "training time" in html
    assert "most confident first" in html


@pytest.mark.slow
def test_cli_default_out(tiny_run: Path, tmp_path: Path, eval_data: DigitData,
                         capsys: pytest.CaptureFixture) -> None:
    from digitlab.data import write_idx_dir

    run = shutil.copytree(tiny_run, tmp_path / "run")  # the report goes inside the run folder
    write_idx_dir(tmp_path / "idx", eval_data.subset(np.arange(300)), split="test")
    assert main(["report", str(run), "--data", f"idx:{tmp_path / 'idx'}:test"]) == 0
    out = run / "report" / "report.html"
    assert f"wrote {out}" in capsys.readouterr().out
    figures = [p for p in embedded_pngs(out.read_text()) if Image.open(io.BytesIO(p)).size[0] > 300]
    assert len(figures) == len(FIGURE_FILES) - 1  # all but the mistakes grid, which is HTML
    assert all((run / "report" / name).is_file() for name in FIGURE_FILES.values())


def test_metrics_cut_by_a_kill_keep_the_records_before_the_cut(tiny_run: Path, tmp_path: Path,
                                                               eval_data: DigitData, caplog) -> None:
    from digitlab.data import write_idx_dir
    from digitlab.rundir import METRICS_FILE, read_metrics

    run = shutil.copytree(tiny_run, tmp_path / "run")
    metrics = run / METRICS_FILE
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines)[:-20])  # the last record half written
    assert read_metrics(run) == [json.loads(line) for line in lines[:-1]]
    write_idx_dir(tmp_path / "idx", eval_data.subset(np.arange(100)), split="test")
    assert main(["report", str(run), "--data", f"idx:{tmp_path / 'idx'}:test", "--out",
                 str(tmp_path / "r.html")]) == 0
    warning = f"{metrics}: line {len(lines)} is cut or corrupt; read the {len(lines) - 1} records before it"
    assert caplog.text.count(warning) == 2  # the read above, then the report's one read of the run


@pytest.mark.slow
def test_ensemble_report(tiny_run: Path, eval_data: DigitData, tmp_path: Path) -> None:
    ensemble = tmp_path / "ens"
    ensemble.mkdir()
    (ensemble / "ensemble.json").write_text(json.dumps({"members": [str(tiny_run), str(tiny_run)]}))
    html = write_report(ensemble, eval_data.subset(np.arange(200))).read_text()
    figures = [p for p in embedded_pngs(html) if Image.open(io.BytesIO(p)).size[0] > 300]
    assert "ensemble of 2" in html and len(figures) == 4  # an uncalibrated ensemble: no reliability figure
    assert "Showing 2 of 2 members" in html


def test_not_html_is_an_error(tiny_run: Path, eval_data: DigitData, tmp_path: Path) -> None:
    from digitlab.errors import DigitlabError

    with pytest.raises(DigitlabError, match=r"report\.pdf: the report is HTML"):
        write_report(tiny_run, eval_data, tmp_path / "report.pdf")


def test_smooth() -> None:
    np.testing.assert_allclose(smooth(np.full(50, 3.0)), 3.0)  # bias-corrected: no ramp from zero
    assert smooth(np.array([1.0, 0.0]))[1] == pytest.approx(0.9 / 1.9)


@pytest.mark.browser
def test_report_renders_in_chromium(report: Path, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        if os.environ.get("DIGITLAB_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} missing and DIGITLAB_REQUIRE_BROWSER=1")
        pytest.skip(f"{CHROMIUM} not installed (`make browser` installs it)")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         f"--screenshot={shot}", "--window-size=1200,2400", report.as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2400, 1200)
    # the sample grid and confusion matrix put large dark areas on the page; a page whose images
    # failed to load would be nearly all white text background
    assert (pixels < 60).mean() > 0.02


def test_per_class_chart_legend_clear_of_bars_and_counts_on_both_series(tiny_run: Path,
                                                                        eval_data: DigitData) -> None:
    from digitlab.evaluate import evaluate_run
    from digitlab.inference import load_predictor
    from digitlab.report import per_class_error_figure

    result = evaluate_run(load_predictor(tiny_run), eval_data)
    fig = per_class_error_figure(result)
    ax = fig.axes[0]
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    for bar in ax.patches:
        assert not legend.overlaps(bar.get_window_extent()), "the legend covers a bar"
    counts = [int(t.get_text()) for t in ax.texts]
    missed = result.confusion.sum(axis=1) - np.diag(result.confusion)
    false = result.confusion.sum(axis=0) - np.diag(result.confusion)
    assert sorted(counts) == sorted([*missed.tolist(), *false.tolist()])


def test_train_and_validation_curves_differ_in_colour(tiny_run: Path) -> None:
    from digitlab.report import training_curves_figure
    from digitlab.train import read_metrics

    fig = training_curves_figure({"run": read_metrics(tiny_run)})
    lines = {line.get_label(): line.get_color() for line in fig.axes[1].get_lines()}
    assert lines["train"] != lines["validation"]


def test_calibration_section_shows_ece_before_and_after(report: Path) -> None:
    html = report.read_text()
    section = html[html.index('<section id="calibration">'):]
    assert "before" in section and "after" in section and "Temperature" in section
