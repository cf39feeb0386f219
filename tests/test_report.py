"""`memlens report`: one self-contained HTML page, checked as text and (when chromium is installed) in a browser."""

import base64
import io
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _scan_factory import make_scan
from memlens.cli import main
from memlens.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
SCREENSHOT_KEEP = os.environ.get("MEMLENS_REPORT_SCREENSHOT")  # set to a path to keep the browser test's picture


def _chromium(*args, timeout=120):
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ]
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [CHROMIUM, *flags, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=timeout
        )


@pytest.fixture
def scan(tmp_path):
    recs = make_scan(tmp_path / "scan", n_prompts=4, per_prompt=2, size=24, types=["VM", "N", "TM", "N"])
    refs = tmp_path / "refs"
    (refs / "1000").mkdir(parents=True)
    Image.fromarray(np.full((30, 30, 3), (250, 120, 0), np.uint8)).save(refs / "1000" / "train.png")
    return tmp_path / "scan", refs, recs


def test_page_is_self_contained_and_escaped(scan, tmp_path):
    scan_dir, refs, recs = scan
    path = write_report(scan_dir, tmp_path / "out" / "r.html", references=refs)
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # 8 generations x (image + overlay) + 1 training image + the ROC plot, all inline
    assert page.count('src="data:image/png;base64,') == 8 * 2 + 1 + 1
    assert not re.search(r'(src|href)="(?!data:)', page)  # no external or relative asset
    assert "prompt number 0 &lt;b&gt;&amp;" in page and "<b>&" not in page.replace("<b>&#", "")
    assert page.count('<section class="card"') == 4
    assert "sortCards" in page and "ROC curves" in page
    assert "no training image found" in page  # prompts 1-3 have no reference folder
    # card attributes carry the mean scores used for sorting
    d0 = np.mean([np.mean(r["D"]) for r in recs if r["prompt_index"] == 0])
    assert f'data-p="0" data-d="{d0:.6g}"' in page
    assert sorted(os.listdir(path.parent)) == ["r.html"]


def test_unlabelled_scan_missing_images_link_mode_and_downscale(tmp_path):
    make_scan(tmp_path / "scan", n_prompts=2, per_prompt=1, size=600, labels=False)
    (tmp_path / "scan" / "be_maps" / "00001_00.npy").unlink()  # its overlay is drawn from the map
    page = write_report(tmp_path / "scan").read_text()  # default: DIR/report.html
    assert "No ROC curves" in page and "1 image(s) missing or unreadable" in page and ">missing<br>" in page
    big = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert max(Image.open(io.BytesIO(base64.b64decode(big))).size) == 256

    linked = write_report(tmp_path / "scan", tmp_path / "elsewhere" / "r.html", inline=False).read_text()
    srcs = re.findall(r'<img src="([^"]+)"', linked)
    assert srcs and all((tmp_path / "elsewhere" / s).resolve().is_file() for s in srcs)


def test_cli_report_and_errors(scan, tmp_path, capsys):
    scan_dir, refs, _ = scan
    main(["report", str(scan_dir), "--out", str(tmp_path / "x.html"), "--references", str(refs)])
    assert "report: wrote" in capsys.readouterr().out and (tmp_path / "x.html").is_file()
    with pytest.raises(SystemExit) as ex:
        main(["report", str(tmp_path / "not_a_scan")])
    assert ex.value.code == 2 and "generations.jsonl: not found" in capsys.readouterr().err


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_renders_in_headless_chromium(scan, tmp_path):
    scan_dir, refs, recs = scan
    path = write_report(scan_dir, tmp_path / "r.html", references=refs)
    shot = tmp_path / "shot.png"
    proc = _chromium(f"--screenshot={shot}", "--window-size=1280,2000", path.as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (2000, 1280)
    # not blank: plenty of non-background pixels and real variation (images, plot, text)
    assert (np.abs(pixels - pixels[5, 5]).sum(axis=2) > 30).mean() > 0.05
    assert pixels.std() > 20
    if SCREENSHOT_KEEP:
        shutil.copy(shot, SCREENSHOT_KEEP)

    # the sort script runs: opened with #sort=ld the cards come in decreasing mean LD
    dom = _chromium("--dump-dom", path.as_uri() + "#sort=ld").stdout
    order = [int(p) for p in re.findall(r'<section class="card" data-p="(\d+)"', dom)]
    mean_ld = {p: np.mean([np.mean(r["LD"]) for r in recs if r["prompt_index"] == p]) for p in range(4)}
    assert order == sorted(range(4), key=lambda p: -mean_ld[p])
    assert 'id="sort-ld" class="active"' in dom or re.search(r'id="sort-ld"[^>]*class="active"', dom)
