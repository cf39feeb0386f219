"""`memlens report DIR`: one self-contained HTML page for a scan directory.

The page shows, per prompt, each generation with its BE overlay (and the training images when `--references` is
given), mean D and LD, label and type; the prompt cards re-sort by D, LD or prompt index with a few lines of inline
JavaScript; ROC curves appear when the records carry labels. Images are inlined as base64 PNG data URIs (downscaled
to `max_side` pixels) so the file can be mailed or archived alone; `--link` writes relative paths instead.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path

import numpy as np

from memlens.errors import InputError
from memlens.evaluate import detection_results, reference_images, roc_figure_png
from memlens.rundir import Generation, atomic_write_bytes, check_output_file, read_generations

__all__ = ["write_report"]

MAX_REFERENCES_SHOWN = 3


class _Images:
    """Turns image paths into `src` attributes, counting files that are missing or unreadable."""

    def __init__(self, out_dir: Path, inline: bool, max_side: int, vmax: float | None = None):
        self.out_dir, self.inline, self.max_side, self.vmax = out_dir, inline, max_side, vmax
        self.problems: list[str] = []

    def tag(self, path: Path, alt: str, be_map: Path | None = None) -> str:
        """An <img> for `path`; with `be_map` (inline mode), that map drawn over the image on the page's scale."""
        found = self._src(path, be_map)
        if found is None:
            name = html.escape(path.name)
            return f'<div class="missing" title="{html.escape(str(path))}">missing<br>{name}</div>'
        src, side = found
        # Blocky upscaling only for images smaller than their tile, where smoothing would blur the pixels away.
        cls = ' class="px"' if side < 150 else ""
        return f'<img src="{src}"{cls} alt="{html.escape(alt)}" loading="lazy">'

    def _src(self, path: Path, be_map: Path | None = None) -> tuple[str, int] | None:
        from PIL import Image

        for needed in (path, be_map):
            if needed is not None and not needed.is_file():
                self.problems.append(f"missing: {needed}")
                return None
        try:
            with Image.open(path) as im:
                if not self.inline:
                    return html.escape(Path(os.path.relpath(path, self.out_dir)).as_posix()), max(im.size)
                im = im.convert("RGB")
                if be_map is not None:
                    from memlens.maps import overlay

                    im = overlay(im, np.load(be_map), vmax=self.vmax)
                if max(im.size) > self.max_side:
                    im.thumbnail((self.max_side, self.max_side), Image.LANCZOS)
                buf = io.BytesIO()
                im.save(buf, format="PNG", optimize=True)
        except (OSError, ValueError) as err:
            self.problems.append(f"unreadable: {path} ({err})")
            return None
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), max(im.size)


def _mean(values) -> float | None:
    # The page shows what it can; malformed values are reported by `memlens evaluate`, not here.
    try:
        return float(np.mean(np.asarray(values, dtype=np.float64))) if isinstance(values, list) and values else None
    except (TypeError, ValueError):
        return None


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _prompt_groups(records: list[Generation]) -> dict[int, list[Generation]]:
    groups: dict[int, list[Generation]] = {}
    for r in records:
        groups.setdefault(r.prompt_index, []).append(r)
    return groups


def _roc_section(scan_dir: Path) -> str:
    try:
        result = detection_results([scan_dir])
    except InputError as err:
        return f'<p class="note">No ROC curves: {html.escape(str(err))}</p>'
    curves = {k: v for k, v in result.curves.items() if k[2] == "generation"}
    if not curves:
        return '<p class="note">No ROC curves: the labels hold only one class.</p>'
    png = base64.b64encode(roc_figure_png(curves, "ROC per generation")).decode("ascii")
    rows = [r for r in result.report["results"] if "auc" in r and r["level"] == "generation"]
    head = "<tr><th>signal</th><th>T</th><th>subset</th><th>AUC</th><th>ACC (Wen)</th><th>best F1</th>"
    head += "<th>TPR@1%FPR (Wen)</th><th>TPR@~1%FPR (nearest)</th></tr>"

    def table(selected: list[dict]) -> str:
        body = "".join(
            f"<tr><td>{r['signal']}</td><td>{r['T']}</td><td>{html.escape(r['subset'])}</td><td>{r['auc']:.3f}</td>"
            f"<td>{r['acc_wen']:.3f}</td><td>{r['f1_best']:.3f}</td><td>{r['tpr_at_1pct_fpr_wen']:.3f}</td>"
            f"<td>{r['tpr_at_1pct_fpr_nearest']:.3f}</td></tr>"
            for r in selected
        )
        return f'<table class="metrics">{head}{body}</table>'

    by_type = [r for r in rows if r["subset"] != "all"]
    extra = (
        f"<details><summary>per type (positives of the type vs. all negatives)</summary>{table(by_type)}</details>"
        if by_type
        else ""
    )
    return (
        f'<img class="roc" src="data:image/png;base64,{png}" alt="ROC curves">'
        f'{table([r for r in rows if r["subset"] == "all"])}{extra}'
        '<p class="note">Per-generation scores; per-prompt numbers: <code>memlens evaluate detection</code>.</p>'
    )


def _card(prompt_index: int, recs: list[Generation], images: _Images, references: Path | None) -> str:
    d = [m for m in (_mean(r.D) for r in recs) if m is not None]
    ld = [m for m in (_mean(r.LD) for r in recs) if m is not None]
    d_mean = float(np.mean(d)) if d else None
    ld_mean = float(np.mean(ld)) if ld else None
    first = recs[0]
    badges = []
    labels = {r.label for r in recs} - {None}
    if labels:
        text = "memorized" if labels == {1} else "not memorized" if labels == {0} else "mixed labels"
        badges.append(f'<span class="badge {"mem" if 1 in labels else "non"}">{text}</span>')
    for t in sorted({str(r.type) for r in recs if r.type is not None}):
        badges.append(f'<span class="badge type">{html.escape(t)}</span>')
    if first.index is not None:
        badges.append(f'<span class="badge">index {html.escape(str(first.index))}</span>')

    tiles = []
    for r in recs:
        cap = f"image {r.image_index} · seed {r.get('seed', '?')}<br>"
        cap += f"D {_fmt(_mean(r.D))} · LD {_fmt(_mean(r.LD))}"
        if r.label is not None:
            cap += f" · label {r.label}"
        pics = images.tag(r.path("image"), "generation") if r.image else ""
        if images.inline and r.image and r.be_map:
            pics += images.tag(r.path("image"), "BE overlay", be_map=r.path("be_map"))
        elif r.overlay:
            pics += images.tag(r.path("overlay"), "BE overlay")
        cap = "generation" + (" | BE overlay" if (r.overlay or r.be_map) else "") + "<br>" + cap
        tiles.append(f'<figure class="gen">{pics}<figcaption>{cap}</figcaption></figure>')
    if references is not None:
        refs = reference_images(references, first)
        ref_tags = "".join(images.tag(p, "reference") for p in refs[:MAX_REFERENCES_SHOWN])
        more = f" (+{len(refs) - MAX_REFERENCES_SHOWN} more)" if len(refs) > MAX_REFERENCES_SHOWN else ""
        label = f"training image{'s' if len(refs) != 1 else ''}{more}" if refs else "no training image found"
        tiles.append(f'<figure class="gen ref">{ref_tags}<figcaption>{label}</figcaption></figure>')

    data_d = "" if d_mean is None else f"{d_mean:.6g}"
    data_ld = "" if ld_mean is None else f"{ld_mean:.6g}"
    return (
        f'<section class="card" data-p="{prompt_index}" data-d="{data_d}" data-ld="{data_ld}">'
        f'<h2><span class="pidx">#{prompt_index}</span> {html.escape(str(first.get("prompt", "")))}</h2>'
        f'<div class="scores">mean D <b>{_fmt(d_mean)}</b> · mean LD <b>{_fmt(ld_mean)}</b> · '
        f'{len(recs)} generation{"s" if len(recs) != 1 else ""} {" ".join(badges)}</div>'
        f'<div class="grid">{"".join(tiles)}</div></section>'
    )


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .3em} h2{font-size:1.05em;margin:.2em 0 .4em;word-break:break-word}
.pidx{color:#888;font-weight:normal} .note{color:#666}
.controls{position:sticky;top:0;background:#fafafa;padding:.5em 0;border-bottom:1px solid #ddd;z-index:1}
.controls button{margin-right:.4em;padding:.3em .8em;border:1px solid #999;border-radius:4px;background:#fff;
 cursor:pointer}
.controls button.active{background:#2a6ebb;color:#fff;border-color:#2a6ebb}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.7em 1em;margin:.8em 0}
.scores{font-size:.9em;color:#444;margin-bottom:.5em}
.badge{display:inline-block;padding:0 .5em;margin-left:.3em;border-radius:3px;background:#eee;font-size:.85em}
.badge.mem{background:#c62828;color:#fff} .badge.non{background:#2e7d32;color:#fff}
.badge.type{background:#6a1b9a;color:#fff}
.grid{display:flex;flex-wrap:wrap;gap:.8em}
figure.gen{margin:0;padding:.3em;border:1px solid #eee;border-radius:4px}
figure.gen img,.missing{width:150px;height:auto;display:inline-block;margin:1px}
img.px{image-rendering:pixelated}
figure.ref{background:#fff8e1}
.missing{height:150px;background:#eee;color:#999;font-size:.8em;text-align:center;padding-top:60px;
 box-sizing:border-box}
figcaption{font-size:.78em;color:#555;margin-top:.2em}
img.roc{max-width:100%;border:1px solid #ddd;background:#fff}
table.metrics{border-collapse:collapse;font-size:.85em;margin:.6em 0}
table.metrics td,table.metrics th{border:1px solid #ddd;padding:.15em .5em;text-align:right}
pre{background:#f0f0f0;padding:.6em;overflow:auto}
"""

# Sorting moves the prompt cards; cards with no value for the key go last.
_JS = """
function sortCards(key, button){
  var box=document.getElementById('cards');
  var cards=Array.prototype.slice.call(box.children);
  var asc = key==='p';
  cards.sort(function(a,b){
    var x=a.dataset[key], y=b.dataset[key];
    if(x===''&&y==='') return 0; if(x==='') return 1; if(y==='') return -1;
    x=parseFloat(x); y=parseFloat(y);
    return asc ? x-y : y-x;
  });
  cards.forEach(function(c){box.appendChild(c);});
  document.querySelectorAll('.controls button').forEach(function(b){b.classList.remove('active');});
  if(button) button.classList.add('active');
}
// A link to report.html#sort=ld opens already sorted (also how the browser test checks sorting).
(function(){
  var m=/sort=(d|ld|p)/.exec(window.location.hash);
  if(m) sortCards(m[1], document.getElementById('sort-'+m[1]));
})();
"""


def _page_vmax(records: list[Generation]) -> float | None:
    """The largest BE value among the page's maps: the top of its one colour scale."""
    top = None
    for r in records:
        if r.be_map and r.path("be_map").is_file():
            try:
                m = float(np.max(np.load(r.path("be_map"))))
            except (OSError, ValueError):
                continue  # counted as unreadable when its overlay is drawn
            if np.isfinite(m):
                top = m if top is None else max(top, m)
    return top


def _scale_note(vmax: float | None, inline: bool) -> str:
    if not inline:
        return "BE overlays: the scan's overlay files, each scaled to its own map's range (jet: blue low, red high)."
    if vmax is None:
        return "No BE maps to draw."
    return (f"BE overlays share one colour scale on this page (jet): blue = 0, red = {vmax:.4g}, the largest "
            "end-token attention among these maps; a map with little attention looks dark.")


def write_report(
    scan_dir: Path,
    out_path: Path | None = None,
    references: Path | None = None,
    inline: bool = True,
    max_side: int = 256,
) -> Path:
    """Write the HTML page for `scan_dir` (default `scan_dir/report.html`) and return its path."""
    scan_dir = Path(scan_dir)
    out_path = Path(out_path) if out_path is not None else scan_dir / "report.html"
    check_output_file(out_path, "out_path")
    if references is not None and not Path(references).is_dir():
        raise InputError(f"{references}: references directory not found")
    if max_side < 16:
        raise InputError(f"`max_side` must be at least 16 pixels, got {max_side}")
    records = read_generations(scan_dir)
    groups = _prompt_groups(records)
    vmax = _page_vmax(records) if inline else None
    images = _Images(out_path.parent.resolve(), inline, max_side, vmax)
    cards = "".join(_card(p, recs, images, references) for p, recs in groups.items())

    run_json = scan_dir / "run.json"
    settings = ""
    if run_json.is_file():
        try:
            settings = json.dumps(json.loads(run_json.read_text(encoding="utf-8")), indent=2)
        except (OSError, json.JSONDecodeError) as err:
            settings = f"(run.json unreadable: {err})"
    n_lab = sum(1 for r in records if r.get("label") is not None)
    problems = ""
    if images.problems:
        items = "".join(f"<li>{html.escape(p)}</li>" for p in images.problems[:20])
        summary = f"{len(images.problems)} image(s) missing or unreadable"
        problems = f"<details><summary>{summary}</summary><ul>{items}</ul></details>"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>memlens report: {html.escape(scan_dir.name)}</title>
<style>{_CSS}</style></head>
<body>
<h1>memlens report: {html.escape(str(scan_dir))}</h1>
<p>{len(groups)} prompts, {len(records)} generations, {n_lab} labelled.
D = Wen's magnitude ‖ε<sub>c</sub>−ε<sub>u</sub>‖₂ and LD = the BE-masked magnitude,
each averaged over all steps.</p>
<p class="note" id="colour-scale">{_scale_note(vmax, inline)}</p>
{problems}
{"<details><summary>run.json</summary><pre>" + html.escape(settings) + "</pre></details>" if settings else ""}
<h2>Detection</h2>
{_roc_section(scan_dir)}
<div class="controls">Sort prompts by:
<button id="sort-d" onclick="sortCards('d', this)">mean D ↓</button>
<button id="sort-ld" onclick="sortCards('ld', this)">mean LD ↓</button>
<button id="sort-p" class="active" onclick="sortCards('p', this)">prompt index</button></div>
<div id="cards">{cards}</div>
<script>{_JS}</script>
</body></html>
"""
    atomic_write_bytes(out_path, page.encode("utf-8"))
    return out_path
