"""The static site of ``densenet teach``: one HTML page, its stylesheet and script, its images.

The page needs no server and no network: stylesheet, script and images sit next to it and are
referenced relatively, so ``DIR/index.html`` opens from disk. Code is highlighted by Pygments
when the page is built; the script only switches a row between the four columns and one.
"""

from __future__ import annotations

import html
import importlib.metadata
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import resources
from common.config import D2L, DenseNetConfig, count_bn_stats, count_params
from common.errors import DenseNetError
from common.teach import book, facts, notes
from common.teach.sources import BACKEND_ORDER, ROWS, Piece, Source, extract

__all__ = ["SiteOptions", "build_site"]

STATIC = Path(__file__).with_name("static")
# Short column titles, in BACKEND_ORDER; the book's tab names.
TITLES = {"torch": "PyTorch", "mxnet": "MXNet Gluon", "jax": "JAX/Flax", "tf": "TensorFlow/Keras"}
# Distributions whose versions the page states (read from metadata: nothing is imported).
DISTRIBUTIONS = {"torch": ("torch",), "mxnet": ("mxnet",), "jax": ("jax", "flax"), "tf": ("tensorflow-cpu", "keras")}


@dataclass
class SiteOptions:
    """What goes into the page besides the code: where the facts come from."""

    config: DenseNetConfig = D2L
    input_size: int = 96
    docs: Path = field(default_factory=resources.docs_dir)
    parity: list[Path] = field(default_factory=list)
    benchmark: Path | None = None
    measured: list[facts.BackendFacts] | None = None
    parity_reports: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# small HTML helpers


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def inline_md(text: str) -> str:
    """The Markdown of a docs table cell (code spans, bold) as HTML, everything else escaped."""
    parts = re.split(r"(`[^`]+`)", text)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(f"<code>{esc(part[1:-1])}</code>")
        else:
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", esc(part)))
    return "".join(out)


def table(headers: list[str], rows: list[list[str]], cls: str = "facts", raw: bool = False) -> str:
    """A table; cells are escaped unless ``raw`` (then they are trusted HTML)."""
    cell = (lambda c: c) if raw else esc
    head = "".join(f"<th scope='col'>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    inner = f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
    return f"<div class='table-wrap'><table class='{cls}'>{inner}</table></div>"


class Highlighter:
    """Pygments, imported only when a page is built (the ``teach`` extra)."""

    def __init__(self) -> None:
        from pygments import highlight
        from pygments.formatters import HtmlFormatter
        from pygments.lexers import PythonLexer

        self._highlight = highlight
        self._lexer = PythonLexer()
        self._formatter = HtmlFormatter(nowrap=True)
        self.css = HtmlFormatter(style="default").get_style_defs(".hl")

    def __call__(self, code: str) -> str:
        return self._highlight(code, self._lexer, self._formatter)


def _code(hl: Highlighter, source: Source, backend: str) -> str:
    p = source.piece
    span = f"{source.first_line}-{source.last_line}"
    return (
        f"<figure class='piece' data-backend='{backend}'>"
        f"<figcaption><code>{esc(p.selector.split('::')[0])}</code> "
        f"<span class='where'>{esc(source.relpath)}:{span}</span></figcaption>"
        f"<pre class='code hl' data-module='{esc(p.module)}' data-selector='{esc(p.selector)}' "
        f"data-file='{esc(source.relpath)}' data-lines='{span}'><code>{hl(source.text)}</code></pre></figure>"
    )


def _book_code(hl: Highlighter, framework: str, code: str) -> str:
    return (
        f"<figure class='piece book'><figcaption>the book ({esc(framework)})</figcaption>"
        f"<pre class='book-code hl'><code>{hl(code)}</code></pre></figure>"
    )


def _switch(target: str, label: str) -> str:
    buttons = [("all", "side by side")] + [(b, TITLES[b]) for b in BACKEND_ORDER]
    inner = "".join(
        f"<button type='button' data-view='{v}' aria-pressed='{'true' if v == 'all' else 'false'}'>{esc(t)}</button>"
        for v, t in buttons
    )
    return f"<div class='switch' role='group' aria-label='{esc(label)}' data-target='{target}'>{inner}</div>"


# --------------------------------------------------------------------------------------------
# sections


def _rows_section(hl: Highlighter, ctx: notes.Context) -> str:
    out = []
    for row in ROWS:
        cells = []
        for backend in BACKEND_ORDER:
            pieces = "".join(_code(hl, extract(p), backend) for p in row.cells[backend])
            cells.append(
                f"<div class='cell' data-backend='{backend}'><h3 class='col-title'>{TITLES[backend]}</h3>{pieces}</div>"
            )
        note_rows = [[f"<strong>{esc(a)}</strong>", d, w] for a, d, w in notes.row_notes(row.key, ctx)]
        out.append(
            f"<section class='row' id='{row.key}' data-view='all'>"
            f"<header class='row-head'><h2>{esc(row.title)}</h2><p>{esc(row.book)}</p>"
            f"{_switch(row.key, row.title + ': columns')}</header>"
            f"<div class='grid'>{''.join(cells)}</div>"
            f"<aside class='notes' aria-label='what differs'><h3>What differs, and why it matters</h3>"
            f"{table(['', 'what differs', 'why it matters, measured'], note_rows, 'notes-table', raw=True)}</aside>"
            "</section>"
        )
    return "".join(out)


def _stage_table(ctx: notes.Context, measured: list[facts.BackendFacts] | None) -> str:
    ran = [m for m in measured or [] if m.status == "ok"]
    headers = ["stage", "NCHW (PyTorch, MXNet)", "NHWC (JAX, TF)", "parameters", "M multiply-adds"]
    headers += [f"{TITLES[m.name]} (NCHW)" for m in ran]
    rows = []
    for s in ctx.stages:
        row = [s.stage, str(s.nchw), str(s.nhwc), f"{s.params:,}", f"{s.macs / 1e6:.1f}"]
        for m in ran:
            got = m.stages.get(s.stage)
            row.append(("" if got == s.nchw else "DIFFERS: ") + str(got))
        rows.append(row)
    total = ["total", "", "", f"{count_params(ctx.config):,}", f"{sum(s.macs for s in ctx.stages) / 1e6:.1f}"]
    return table(headers, [*rows, total + [""] * len(ran)])


def _params_table(ctx: notes.Context, measured: list[facts.BackendFacts] | None) -> str:
    if not measured:
        return (
            "<p class='muted'>Per-backend counts were not measured for this build (<code>densenet teach "
            "--measure</code> builds every installed backend); the plan's counts are above, and "
            "<code>densenet compare</code> checks every backend against them.</p>"
        )
    headers = ["stage", "plan"] + [TITLES[m.name] for m in measured]
    rows = []
    for s in ctx.stages:
        row = [s.stage, f"{s.params:,}"]
        for m in measured:
            row.append(f"{m.params.get(s.stage, 0):,}" if m.status == "ok" else m.status)
        rows.append(row)
    rows.append(
        ["total", f"{count_params(ctx.config):,}"]
        + [f"{m.num_params:,}" if m.num_params is not None else (m.error or m.status)[:80] for m in measured]
    )
    return table(headers, rows)


def _parity_section(reports: list[facts.ParityResults]) -> str:
    if not reports:
        return (
            "<p class='muted'>No parity results in this build: pass <code>--parity FILE</code> (the output of "
            "<code>densenet parity --json</code>) or <code>--run-parity</code>.</p>"
        )
    out = []
    for r in sorted(reports, key=lambda r: r.dtype):
        d = r.data
        config = DenseNetConfig.from_dict(d["config"])
        h, w = d["input_size"]
        rows = []
        for c in r.worst():
            margin = "exact" if c["margin"] is None else f"{c['margin']:.1f}x"
            rows.append(
                [c["check"], f"{c['a']} vs {c['b']}", f"{c['error']:.2e}", f"{c['bound']:.2e}", margin, c["worst"]]
                + ["pass" if c["passed"] else "FAIL"]
            )
        verdict = "every comparison within its bound" if d.get("ok") else "FAILED"
        out.append(
            f"<h3>{esc(r.dtype)}: {verdict}</h3>"
            f"<p>{esc(config.describe())}; input {d['batch']}x{config.in_channels}x{h}x{w}, seed {d['seed']}, "
            f"lr {d['lr']:g}, {d['steps']} lockstep steps; participants {esc(', '.join(d['participants']))}. "
            f"The worst comparison of each check over the oracle and every pair "
            f"(<span class='where'>{esc(Path(r.source).name)}</span>).</p>"
            + table(["check", "worst pair", "error", "bound", "margin", "worst tensor", "result"], rows)
        )
    return "".join(out)


def _naive_table(rows: list[dict[str, Any]]) -> str:
    body = [[r["default"], r["frameworks"], r["affects"], f"{r['max_abs']:.1e}", f"{r['max_rel']:.1e}"] for r in rows]
    return table(["framework default", "frameworks", "changes", "max abs", "max rel"], body)


def _bar_chart(data: dict[str, Any]) -> str:
    """Inline SVG bars, one group per numeric metric (no plotting library, no script)."""
    rows = [r for r in data["rows"] if "error" not in r]
    if not rows:
        return f"<h3>{esc(data.get('title', 'benchmark'))}</h3><p class='muted'>every run failed</p>"
    numeric = [k for k in rows[0] if k != "backend" and all(isinstance(r.get(k), (int, float)) for r in rows)]
    metrics = [k for k in data.get("metrics", numeric) if k in numeric]
    labels = data.get("labels", {})
    charts = []
    for metric in metrics:
        top = max(float(r[metric]) for r in rows) or 1.0
        bar_h, gap, label_w, width = 22, 8, 150, 420
        height = len(rows) * (bar_h + gap)
        bars = []
        for i, r in enumerate(rows):
            y = i * (bar_h + gap)
            w = max(1.0, width * float(r[metric]) / top)
            name = TITLES.get(str(r["backend"]), str(r["backend"]))
            bars.append(
                f"<text x='{label_w - 8}' y='{y + 15}' text-anchor='end'>{esc(name)}</text>"
                f"<rect class='bar bar-{esc(r['backend'])}' x='{label_w}' y='{y}' width='{w:.1f}' height='{bar_h}'/>"
                f"<text x='{label_w + w + 6:.1f}' y='{y + 15}'>{float(r[metric]):,.4g}</text>"
            )
        charts.append(
            f"<figure class='chart'><figcaption>{esc(labels.get(metric, metric.replace('_', ' ')))}</figcaption>"
            f"<svg role='img' aria-label='{esc(metric)}' viewBox='0 0 {label_w + width + 90} {height}' "
            f"width='{label_w + width + 90}' height='{height}'>{''.join(bars)}</svg></figure>"
        )
    note = f"<p>{inline_md(str(data['note']))}</p>" if data.get("note") else ""
    return f"<h3>{esc(data.get('title', 'benchmark'))}</h3>{note}<div class='charts'>{''.join(charts)}</div>"


def _departures_section(hl: Highlighter, docs: Path) -> str:
    path = docs / "departures.md"
    if not path.is_file():
        return f"<p class='muted'>{esc(path)} is missing, so the departures are not shown.</p>"
    rows = book.read_departures(path)
    out = []
    for d in rows:
        book_code = "".join(_book_code(hl, fw, code) for fw, code in book.BOOK.get(d.number, ()))
        ours = "".join(
            _code(hl, extract(p), p.module.split(".")[0].removeprefix("densenet_")) for p in book.OURS.get(d.number, ())
        )
        tests = "".join(f"<li><code>{esc(t)}</code></li>" for t in book.pinned_tests(d)) or "<li>(none named)</li>"
        out.append(
            f"<article class='departure' id='departure-{d.number}'>"
            f"<h3>{d.number}. {inline_md(d.why[:1].upper() + d.why[1:])}</h3>"
            f"<dl><dt>book</dt><dd>{inline_md(d.book)}</dd><dt>here</dt><dd>{inline_md(d.here)}</dd></dl>"
            f"<div class='pair'><div>{book_code}</div><div>{ours}</div></div>"
            f"<p class='pinned'>pinned by</p><ul class='tests'>{tests}</ul></article>"
        )
    return "".join(out)


def _versions() -> str:
    parts = []
    for backend in BACKEND_ORDER:
        found = []
        for dist in DISTRIBUTIONS[backend]:
            try:
                found.append(f"{dist} {importlib.metadata.version(dist)}")
            except importlib.metadata.PackageNotFoundError:
                pass
        parts.append(f"{TITLES[backend]}: {', '.join(found) or 'not installed'}")
    return "; ".join(parts)


def _commit() -> str:
    """The checkout's commit, or what stands in for it: an installed package has no commit."""
    root = resources.checkout_root()
    if root is None:
        return "none: built from the installed package, not from a git checkout"
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown: git could not run ({exc})"
    if done.returncode != 0:
        return f"unknown: {root} is not a git checkout"
    return done.stdout.strip()


# --------------------------------------------------------------------------------------------
# the page


def _page(hl: Highlighter, options: SiteOptions, curves: bool, say: Callable[[str], None]) -> str:
    config = options.config
    say("facts: plan, padding and the --naive figures (numpy)")
    ctx = notes.Context(
        config,
        options.input_size,
        facts.stage_facts(config, options.input_size),
        facts.padding_facts(options.input_size),
        facts.naive_rows(config),
    )
    parity = [facts.read_parity(p) for p in options.parity]
    parity += [facts.ParityResults("computed by --run-parity", d) for d in options.parity_reports]
    benchmark = facts.read_benchmark(options.benchmark) if options.benchmark else None
    say("code: every row and departure, read from the files")
    rows = _rows_section(hl, ctx)
    departures = _departures_section(hl, options.docs)
    commit = _commit()
    nav = "".join(f"<a href='#{r.key}'>{esc(r.title)}</a>" for r in ROWS)
    nav += "<a href='#facts'>Measured facts</a><a href='#departures'>The book next to ours</a>"
    curves_html = (
        "<figure class='curves'><img src='training_curves.png' alt='training curves of the four frameworks: loss "
        "and test accuracy per epoch' width='1210' height='440'><figcaption>5 epochs at 32x32, batch 128, SGD 0.1 "
        "with cosine annealing, seed 0 (docs/training.md)</figcaption></figure>"
        if curves
        else f"<p class='muted'>{esc(options.docs / 'training_curves.png')} is missing.</p>"
    )
    bench_html = (
        _bar_chart(benchmark)
        if benchmark
        else (
            "<p class='muted'>No benchmark results in this build: <code>densenet teach --benchmark FILE</code> charts "
            "a results file such as the one <code>densenet exercise memory --save FILE</code> writes.</p>"
        )
    )
    naive_note = (
        f"The book's network, {facts.NAIVE_SETUP['batch']}x{config.in_channels}x{facts.NAIVE_SETUP['input_size']}"
        f"x{facts.NAIVE_SETUP['input_size']}, seed {facts.NAIVE_SETUP['seed']}: the numpy oracle with the aligned "
        "conventions against the same oracle with one framework's default, so each row measures the default "
        "itself (<code>densenet parity --naive --config d2l</code>, computed while this page was built)."
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>DenseNet in four frameworks, side by side</title>
<link rel="stylesheet" href="site.css">
<link rel="stylesheet" href="pygments.css">
</head>
<body>
<header class="top">
<h1>DenseNet in four frameworks, side by side</h1>
<p>The DenseNet of <em>Dive into Deep Learning</em>, section 8.7, as this suite writes it in PyTorch, MXNet Gluon,
JAX/Flax and TensorFlow/Keras. Every code cell is the current source of the object it names, read from the
package with <code>ast</code> when this page was built (<code>densenet teach</code>), so the page cannot drift
from the code. Beside each row: what differs, and why it matters, with measured numbers.</p>
<p class="muted">Network: {esc(config.describe())}, {count_params(config):,} parameters and
{count_bn_stats(config):,} BatchNorm running statistics; input {options.input_size}x{options.input_size}.
{esc(_versions())}. Commit {esc(commit)}.</p>
<nav class="toc">{nav}</nav>
<div class="global">Every row: {_switch("*", "every row: columns")}</div>
</header>
<main>
{rows}
<section id="facts" class="facts-section">
<h2>Measured facts of this checkout</h2>
<h3>Stage by stage</h3>
<p>The plan <code>densenet compare</code> checks every backend against (<code>common.arch.walk</code>), for one
{options.input_size}x{options.input_size} image, with each stage's trainable parameters and multiply-adds.</p>
{_stage_table(ctx, options.measured)}
<h3>Parameters per stage, per backend</h3>
{_params_table(ctx, options.measured)}
<h2 class="sub">Numerical parity</h2>
<p>Identical canonical weights and inputs in every backend and in the float64 numpy oracle
(<a href="#departures">departures 3 and 7</a> make this possible). Error = max |a - b| / scale of the tensor;
the float32 bound is C x unit roundoff, the float64 bound the suite's claim (docs/parity.md).</p>
{_parity_section(parity)}
<h3>What each framework's default would cost</h3>
<p>{naive_note}</p>
{_naive_table(ctx.naive)}
<h2 class="sub">Training</h2>
{curves_html}
<h2 class="sub">Speed and memory</h2>
{bench_html}
</section>
<section id="departures" class="departures">
<h2>The book's code next to ours</h2>
<p>Each intentional departure from the book (docs/departures.md): the book's lines, ours as the files hold them
now, and the test that pins it.</p>
{departures}
</section>
</main>
<footer><p>Generated by <code>densenet teach</code>; works offline, no server, no network.</p></footer>
<script src="site.js"></script>
</body>
</html>
"""


# Marks a directory as a site this command wrote, which a later build may replace.
SITE_MARKER = ".densenet-teach"


def build_site(
    out: str | Path, options: SiteOptions | None = None, progress: Callable[[str], None] | None = None
) -> Path:
    """Write the site into ``out`` (created if needed) and return the path of its ``index.html``."""
    options = options or SiteOptions()
    say = progress or (lambda message: None)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DenseNetError(f"--out {out} is a file; name a directory for the site")
    if out.is_dir() and any(out.iterdir()) and not (out / SITE_MARKER).is_file():
        # Never write over what a person made: only an earlier site of this command is replaced.
        raise DenseNetError(
            f"--out {out} is not empty and holds no earlier `densenet teach` site; name a new directory"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DenseNetError(f"--out {out}: cannot create the directory ({exc.strerror or exc})") from None
    hl = Highlighter()
    curves_src = options.docs / "training_curves.png"
    curves = curves_src.is_file()
    page = _page(hl, options, curves, say)
    for name in ("site.css", "site.js"):
        shutil.copyfile(STATIC / name, out / name)
    (out / "pygments.css").write_text(hl.css + "\n", encoding="utf-8")
    if curves:
        shutil.copyfile(curves_src, out / "training_curves.png")
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    (out / SITE_MARKER).write_text("written by `densenet teach`; it may replace this directory's files\n")
    say(f"wrote {index}")
    return index


def source_pieces() -> list[Piece]:
    """Every piece the page shows, rows and departures (for tests and tools)."""
    pieces = [p for row in ROWS for b in BACKEND_ORDER for p in row.cells[b]]
    return pieces + [p for ps in book.OURS.values() for p in ps]
