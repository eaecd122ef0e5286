"""report/index.html in a real browser: Debian's headless Chromium opens the page from disk (no
server, no network). The test reads back the rendered DOM (--dump-dom) and a screenshot. Every
image must have decoded, the LDS, cost, explanation and verification tables must be present,
and the screenshot must not be blank.

Run by `make test-browser`, which installs Chromium from Debian's packages (CI does, as root)."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

import magic_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (run `make test-browser`)")]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=10000"]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A report with everything the page shows: the default digits run (one epoch), MAGIC and TRAK
    scores, a small ground truth, LDS, and two explanations with --verify."""
    out = tmp_path_factory.mktemp("browser") / "run"
    cfg = magic_cli.compose(["train.epochs=1", "ground_truth.drop_fractions=[0.05]", "ground_truth.num_subsets=4",
                             f"out_dir={out}"])
    magic_cli.train(cfg)
    magic_cli.attribute(cfg, test_ids="0:4")
    magic_cli.attribute(cfg, test_ids="0:4", method="trak")
    magic_cli.retrain_ground_truth(cfg)
    magic_cli.score(cfg)
    magic_cli.explain(cfg, test_ids=[0, 1], k=4, verify=True)
    return out / "report" / "index.html"


def _chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=180)


def test_the_page_renders_every_image_and_table(page, tmp_path):
    dom = _chromium(tmp_path, "--dump-dom", page.as_uri()).stdout
    images = len(re.findall(r"<img\b", dom))
    assert images >= 5  # LDS plot, 2 scatter plots, 2 galleries
    assert f'data-images="{images}/{images}"' in dom, "an image did not load"
    for heading in ("LDS", "Cost", "Explanations", "mean LDS", "actual / predicted", "proponent", "opponent"):
        assert heading in dom, heading
    assert dom.count("<table") >= 2 + 2 * 2  # LDS, cost; per test id: the examples and the verification


def test_the_screenshot_is_not_blank(page, tmp_path):
    from PIL import Image

    shot = tmp_path / "page.png"
    _chromium(tmp_path, "--window-size=1280,2400", f"--screenshot={shot}", page.as_uri())
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2400, 1280)
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.01  # text, tables and figures, not a white page
