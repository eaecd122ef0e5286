"""report/index.html: one self-contained page of everything report/ holds, opened from disk with
no server and no network. The figures are embedded (data: URIs), the styles are inline, and a
few lines of script count the images that loaded (the browser test reads it back).

    the LDS table of `magic score` and its plots (LDS against drop fraction, predicted against
    actual change), each method's cost in seconds, and every `magic explain` gallery with its
    table and, after --verify, its verification table.

Rewritten by `magic score` and by `magic explain` from the files they wrote; nothing else is read.
"""

from __future__ import annotations

import base64
import html
import json

from magic_cli.core.metrics import COST_IDS, cost_of
from magic_cli.run_dir import RunDir, save_text

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; line-height: 1.4 }
h1 { font-size: 1.6em } h2 { margin-top: 2em; border-bottom: 1px solid #ccc } h3 { margin-top: 1.5em }
table { border-collapse: collapse; margin: 0.8em 0 } th, td { border: 1px solid #ccc; padding: 0.25em 0.6em }
th { background: #f3f3f3 } td.num { text-align: right; font-variant-numeric: tabular-nums }
img { max-width: 100%; border: 1px solid #eee } .figures img { max-width: 32%; margin: 0.3em }
.note { color: #555; font-size: 0.92em } code { background: #f6f6f6; padding: 0 0.2em }
"""

# Counts the images that decoded (naturalWidth > 0) into <body data-images="loaded/total">.
SCRIPT = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', loaded + '/' + images.length);
});
"""


def _img(path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _table(header: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{html.escape(str(c))}</td>' if i in numeric else f"<td>{html.escape(str(c))}</td>"
        for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _score_section(run: RunDir) -> list[str]:
    path = run.report_file("summary.json")
    if not path.is_file():
        return ["<h2>LDS</h2>", '<p class="note">No LDS yet: run <code>magic score</code>.</p>']
    summary = json.loads(path.read_text())
    rows = []
    for method, per_drop in summary["lds"].items():
        secs = summary["seconds"].get(method)
        for p, s in per_drop.items():
            rows.append([method, p, f"{s['mean']:.3f}", f"{s['ci_low']:.3f} – {s['ci_high']:.3f}", s["n_test"],
                         s["n_subsets"], f"{s['pearson']:.3f}", f"{s['slope']:.3f}",
                         "-" if secs is None else f"{secs:.1f}"])
    out = ["<h2>LDS</h2>",
           f'<p class="note">Output <code>{html.escape(summary["output"])}</code>; test accuracy '
           f'{summary["test_accuracy"]:.4f}. LDS: Spearman correlation of predicted and actual change of the output '
           "over retrainings with random subsets dropped, averaged over test examples (95 % bootstrap CI); slope: "
           "median regression slope of actual on predicted change (1 is the right scale).</p>",
           _table(["method", "drop", "mean LDS", "95 % CI", "n test", "subsets", "Pearson", "slope", "seconds"], rows,
                  numeric={2, 4, 5, 6, 7, 8})]
    lds = run.report_file("lds_vs_drop.png")
    if lds.is_file():
        out.append(f'<div class="figures">{_img(lds, "LDS against drop fraction")}</div>')
    split = summary.get("cost") or {}
    costs = [[m, "-" if s is None else f"{s:.1f}",
              *((f"{split[m]['fixed']:.2f}", f"{split[m]['per_id']:.3f}",
                 *(f"{cost_of(split[m], n):.1f}" for n in COST_IDS)) if split.get(m) else ("-",) * (2 + len(COST_IDS)))]
             for m, s in summary["seconds"].items()]
    out += ["<h3>Cost</h3>",
            '<p class="note">Seconds each method took to attribute its test ids, split into a fixed part (the '
            "training set's side: gradients, factors) and a part per test id; the seconds for 1 to 256 ids are "
            "extrapolated from that split. MAGIC's per-id cost is that of a reverse pass shared by a batch of ids: "
            "one id alone costs more.</p>",
            _table(["method", "seconds", "fixed s", "s per id", *(f"{n} ids (extrap.)" for n in COST_IDS)], costs,
                   numeric=set(range(1, 4 + len(COST_IDS))))]
    frontier = run.report_file("lds_vs_cost.png")
    if frontier.is_file():
        out.append(f'<div class="figures">{_img(frontier, "LDS against cost")}</div>')
    scatters = sorted(run.report_file("index.html").parent.glob("scatter_*.png"))
    if scatters:
        out += ["<h3>Predicted against actual change</h3>",
                '<div class="figures">' + "".join(_img(p, p.stem) for p in scatters) + "</div>"]
    return out


def _explain_section(run: RunDir) -> list[str]:
    tables = sorted(run.explain_dir.glob("*.json")) if run.explain_dir.is_dir() else []
    if not tables:
        return []
    out = ["<h2>Explanations</h2>",
           '<p class="note">A <b>proponent</b> of a test example is a training example whose dropping is predicted to '
           "raise its loss the most (the most negative scores d loss / d w); an <b>opponent</b> one whose dropping is "
           "predicted to lower it the most.</p>"]
    for path in tables:
        data = json.loads(path.read_text())
        method, stem, groups = data["method"], data.get("stem", data["method"]), data.get("groups")
        title = f"{method}, groups of {groups}" if groups else method
        for j in sorted({r["test_id"] for r in data["rows"]}):
            out.append(f"<h3>{html.escape(title)}: test id {j}</h3>")
            gallery = run.explain_file(f"{stem}_{j}.png")
            if gallery.is_file():
                out.append(_img(gallery, f"{title} test {j}"))
            mine = [r for r in data["rows"] if r["test_id"] == j]
            if groups:
                rows = [[r["kind"], r["rank"], r["group"], r["size"], r["train_id"], f"{r['score']:+.4g}"]
                        for r in mine]
                out.append(_table(["kind", "rank", "group", "size", "e.g. train id", "score"], rows,
                                  numeric={1, 3, 4, 5}))
            else:
                rows = [[r["kind"], r["rank"], r["train_id"], r["label"] or "-", f"{r['score']:+.4g}"] for r in mine]
                out.append(_table(["kind", "rank", "train id", "label", "score"], rows, numeric={1, 2, 4}))
            checks = [c for c in data.get("verify", []) if c["test_id"] == j]
            if checks:
                out.append('<p class="note">Retrained without k examples: predicted and actual change.</p>')
                out.append(_table(["dropped", "k", "predicted", "actual", "actual / predicted", "class flips"],
                                  [[c["kind"], c["k"], f"{c['predicted']:+.4f}", f"{c['actual']:+.4f}",
                                    f"{c['ratio']:.2f}", "yes" if c["flipped"] else "no"] for c in checks],
                                  numeric={1, 2, 3, 4}))
    return out


def write_index(run: RunDir, name: str) -> None:
    """Write report/index.html from what report/ holds now."""
    body = [f"<h1>magic report: {html.escape(name)}</h1>", *_score_section(run), *_explain_section(run)]
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>magic report: {html.escape(name)}</title><style>{STYLE}</style>"
            f"<script>{SCRIPT}</script></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    save_text(run.report_file("index.html"), page)
