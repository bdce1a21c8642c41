"""l2l-scale report: sections from evaluation.json, crossval.json and model folders; renders in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from l2l_scale.cli import main
from l2l_scale.errors import InputError
from l2l_scale.evaluate.render import render_html
from l2l_scale.evaluate.report import load_results, report

from test_evaluate import build_results  # the same simulated evaluation (built once per session)

pytestmark = pytest.mark.timeout(300)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A copy of the evaluation with a cross-validation summary and a model folder with a training history."""
    src = build_results(tmp_path_factory) / "results"
    dst = tmp_path_factory.mktemp("report") / "results"
    shutil.copytree(src, dst)
    rng = np.random.default_rng(0)
    pairs = {str(n): {"nrmse_rel_change": (-0.1 * np.log2(n) + 0.03 * rng.normal(size=8 * r)).tolist(),
                      "ssim5_rel_change": (0.1 * np.log2(n) + 0.05 * rng.normal(size=8 * r)).tolist(), "repeats": r}
             for n, r in ((8, 4), (16, 2), (32, 2))}
    (dst / "crossval.json").write_text(json.dumps({"l2l_scale_crossval": 1, "dataset": "actin", "folds": 8,
                                                   "pairs": pairs}))
    model = dst / "models" / "l2l-ms-ssim3"
    (model / "logs").mkdir(parents=True)
    lines = ["epoch,loss,val_loss,learning_rate,seconds,best"]
    lines += [f"{e},{0.4 * np.exp(-e / 8) + 0.1},{0.4 * np.exp(-e / 10) + 0.12},{2e-4 if e < 20 else 1e-4},1.0,True"
              for e in range(1, 31)]
    (model / "logs" / "history.csv").write_text("\n".join(lines) + "\n")
    (model / "l2l_scale.json").write_text(json.dumps({"loss": {"name": "ms-ssim3"}, "channels": ["AC-15"]}))
    return dst


@pytest.fixture(scope="module")
def html_file(results, tmp_path_factory):
    """The report written by the CLI (rendered once for the tests below)."""
    out = tmp_path_factory.mktemp("html") / "report.html"
    assert main(["report", str(results), "--out", str(out)]) == 0
    assert main(["report", str(results), "--out", str(out)]) == 2  # exists: needs --overwrite
    return out


def _sections(page: str) -> set[str]:
    return set(re.findall(r'<section id="([a-z]+)"', page))


def test_report_on_a_folder_without_results_names_the_command(tmp_path, capsys):
    with pytest.raises(InputError, match=r"no evaluation results in .*; run 'l2l-scale evaluate .*' first"):
        report(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        report(tmp_path / "missing")
    assert main(["report", str(tmp_path)]) == 2
    assert "no evaluation results" in capsys.readouterr().err


def test_all_sections_and_only_embedded_images(html_file):
    page = html_file.read_text()
    assert _sections(page) == {"crops", "metrics", "contrast", "maps", "crossval", "training", "provenance"}
    srcs = re.findall(r'<img[^>]* src="([^"]*)"', page)
    # crops, contrast, maps, cross-validation, training: all embedded, nothing fetched
    assert len(srcs) == 5 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for name in ("input", "fake", "gauss", "identity", "target"):
        assert f"<th>{name}</th>" in page  # a metric-table row for every image
    assert "against the truth, 8 foreground patches" in page and "model l2l-ms-ssim3" in page
    assert page.count("<details>") == 1 + 6 + 3 + 1 + 1  # evaluation, images, maps, crossval, model


def test_sections_without_data_are_left_out(results, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(results, bare, ignore=shutil.ignore_patterns("crossval.json", "models", "maps"))
    ev = json.loads((bare / "evaluation.json").read_text())
    ev["images"][2]["path"] = str(tmp_path / "moved.zarr")  # a restoration that is gone: its panel is skipped
    (bare / "evaluation.json").write_text(json.dumps(ev))
    page = render_html(load_results(bare))
    assert _sections(page) == {"crops", "metrics", "contrast", "maps", "provenance"}
    assert "not readable any more (moved or deleted): fake" in page and "maps not readable" in page
    # Only a cross-validation summary: just that section.
    cv_only = tmp_path / "cv"
    cv_only.mkdir()
    shutil.copy(results / "crossval.json", cv_only)
    assert _sections(render_html(load_results(cv_only))) == {"crossval", "provenance"}
    (cv_only / "crossval.json").write_text(json.dumps({"pairs": {"eight": {}}}))
    with pytest.raises(InputError, match="not a number of training pairs"):
        load_results(cv_only)


def _chromium(*args, tmp_path, name):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / ('profile-' + name)}", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it in .ci/run: apt-get install "
                                             "-y chromium)")
def test_report_renders_in_chromium(html_file, tmp_path):
    from PIL import Image, ImageStat

    out = html_file
    n_img = out.read_text().count("<img ")
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", out.as_uri(), tmp_path=tmp_path, name="dom")
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stderr[-2000:]
    assert 'data-loaded="true"' in body.group(0)
    assert f'data-images="{n_img}"' in body.group(0) and f'data-images-ok="{n_img}"' in body.group(0)

    shot = tmp_path / "report.png"
    res = _chromium(f"--screenshot={shot}", "--window-size=1400,3000", out.as_uri(), tmp_path=tmp_path, name="shot")
    assert shot.is_file(), res.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1400, 3000)
    assert max(ImageStat.Stat(img).stddev) > 30  # not blank
    assert len(img.getcolors(maxcolors=1 << 20) or []) > 500  # figures, not just text on white
