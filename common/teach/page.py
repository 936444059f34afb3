"""The static site of ``densenet teach``: one HTML page, its stylesheet and script, its images.

The page needs no server and no network: stylesheet, script and images sit next to it and are
referenced relatively, so ``DIR/index.html`` opens from disk. The page is rendered by Jinja2 from
``templates/page.html.j2`` with autoescape on: this module gathers plain data (text, numbers,
tables as lists of strings) and the template escapes all of it; the only markup passed in is
Pygments' highlighted code and what :func:`inline_md` makes of a note. The script only switches
a row between the four columns and one.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import resources
from common.arch import count_bn_stats, count_params
from common.config import D2L, DenseNetConfig
from common.errors import DenseNetError, Failed
from common.teach import book, facts, notes
from common.teach.sources import BACKEND_ORDER, ROWS, Piece, Source, extract

if TYPE_CHECKING:  # markupsafe comes with Jinja2, in the `teach` extra: imported when a page is built
    from markupsafe import Markup

__all__ = ["SiteOptions", "build_site"]

STATIC = Path(__file__).with_name("static")
TEMPLATES = Path(__file__).with_name("templates")
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
# rendering: Jinja2 and Pygments, imported only when a page is built (the `teach` extra)


def _teach_extra(name: str) -> Failed:
    return Failed(f"densenet teach needs {name}, which is not installed: pip install 'densenet-suite[teach]'")


_CODE_SPAN = re.compile(r"(`[^`]+`)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
# Only links to the page's own sections: the page is offline, and a docs cell's relative link
# (``[teach.md](teach.md)``) would be dangling here, so it stays text.
_ANCHOR = re.compile(r"\[([^\]]+)\]\((#[\w-]+)\)")


def inline_md(text: object) -> Markup:
    """The Markdown of a note or a docs table cell as markup: code spans, bold and links to the
    page's own sections; everything else escaped (a note's text can never break the page)."""
    from markupsafe import Markup, escape

    out = []
    for part in _CODE_SPAN.split(str(text)):
        if len(part) > 1 and part.startswith("`") and part.endswith("`"):
            out.append(Markup("<code>%s</code>") % part[1:-1])
        else:
            # Escaped first, so the patterns only ever wrap text that is already safe.
            safe = _BOLD.sub(r"<strong>\1</strong>", str(escape(part)))
            out.append(Markup(_ANCHOR.sub(r"<a href='\2'>\1</a>", safe)))
    return Markup("").join(out)


class Highlighter:
    """Pygments, whose HTML goes into the page as it is (``Markup``)."""

    def __init__(self) -> None:
        from markupsafe import Markup  # Jinja2's own dependency: there whenever the template is

        try:
            from pygments import highlight
            from pygments.formatters import HtmlFormatter
            from pygments.lexers import PythonLexer
        except ImportError:
            raise _teach_extra("Pygments") from None

        self._markup = Markup
        self._highlight = highlight
        self._lexer = PythonLexer()
        self._formatter = HtmlFormatter(nowrap=True)
        self.css = HtmlFormatter(style="default").get_style_defs(".hl")

    def __call__(self, code: str) -> Markup:
        # Pygments escapes the code it wraps in spans, so its output is trusted as markup.
        return self._markup(self._highlight(code, self._lexer, self._formatter))


def _environment() -> Any:
    """The Jinja2 environment of ``templates/``, with the page's two filters."""
    try:
        import jinja2
    except ImportError:
        raise _teach_extra("Jinja2") from None
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,  # every value is text unless it arrives as Markup
        undefined=jinja2.StrictUndefined,  # a misspelt field fails the build instead of vanishing
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["md"] = inline_md
    env.filters["thousands"] = lambda n: f"{n:,}"
    return env


# --------------------------------------------------------------------------------------------
# what the template shows: plain data


@dataclass
class Table:
    """A table of text (the template's ``table`` macro); every cell is escaped."""

    headers: list[str]
    rows: list[list[str]]
    cls: str = "facts"


@dataclass
class Code:
    """One highlighted piece of our code, with the file and lines it was read from."""

    backend: str
    name: str
    relpath: str
    lines: str
    module: str
    selector: str
    html: Markup

    @classmethod
    def of(cls, hl: Highlighter, source: Source, backend: str) -> Code:
        p = source.piece
        return cls(
            backend,
            p.selector.split("::")[0],
            source.relpath,
            f"{source.first_line}-{source.last_line}",
            p.module,
            p.selector,
            hl(source.text),
        )


def _rows(hl: Highlighter, ctx: notes.Context) -> list[dict[str, Any]]:
    return [
        {
            "key": row.key,
            "title": row.title,
            "book": row.book,
            "cells": [
                {
                    "backend": backend,
                    "title": TITLES[backend],
                    "pieces": [Code.of(hl, extract(p), backend) for p in row.cells[backend]],
                }
                for backend in BACKEND_ORDER
            ],
            "notes": notes.row_notes(row.key, ctx),
        }
        for row in ROWS
    ]


def _stage_table(ctx: notes.Context, measured: list[facts.BackendFacts] | None) -> Table:
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
    return Table(headers, [*rows, total + [""] * len(ran)])


def _params_table(ctx: notes.Context, measured: list[facts.BackendFacts] | None) -> Table | None:
    if not measured:
        return None
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
    return Table(headers, rows)


def _parity(reports: list[facts.ParityResults]) -> list[dict[str, Any]]:
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
        headers = ["check", "worst pair", "error", "bound", "margin", "worst tensor", "result"]
        out.append(
            {
                "dtype": r.dtype,
                "ok": bool(d.get("ok")),
                "network": config.describe(),
                "input": f"{d['batch']}x{config.in_channels}x{h}x{w}",
                "seed": d["seed"],
                "lr": f"{d['lr']:g}",
                "steps": d["steps"],
                "participants": d["participants"],
                "source": Path(r.source).name,
                "table": Table(headers, rows),
            }
        )
    return out


def _naive(ctx: notes.Context) -> dict[str, Any]:
    rows = [
        [r["default"], r["frameworks"], r["affects"], f"{r['max_abs']:.1e}", f"{r['max_rel']:.1e}"] for r in ctx.naive
    ]
    return {
        "batch": facts.NAIVE_SETUP["batch"],
        "channels": ctx.config.in_channels,
        "size": facts.NAIVE_SETUP["input_size"],
        "seed": facts.NAIVE_SETUP["seed"],
        "table": Table(["framework default", "frameworks", "changes", "max abs", "max rel"], rows),
    }


def _bar_chart(data: dict[str, Any]) -> dict[str, Any]:
    """Inline SVG bars, one chart per numeric metric (no plotting library, no script): the
    geometry is worked out here, the template only places it."""
    title = data.get("title", "benchmark")
    rows = [r for r in data["rows"] if "error" not in r]
    if not rows:
        return {"title": title, "failed": True}
    numeric = [k for k in rows[0] if k != "backend" and all(isinstance(r.get(k), (int, float)) for r in rows)]
    labels = data.get("labels", {})
    bar_h, gap, label_w, width = 22, 8, 150, 420
    charts = []
    for metric in (k for k in data.get("metrics", numeric) if k in numeric):
        top = max(float(r[metric]) for r in rows) or 1.0
        bars = []
        for i, r in enumerate(rows):
            y = i * (bar_h + gap)
            w = max(1.0, width * float(r[metric]) / top)
            bars.append(
                {
                    "name": TITLES.get(str(r["backend"]), str(r["backend"])),
                    "backend": r["backend"],
                    "label_x": label_w - 8,
                    "text_y": y + 15,
                    "x": label_w,
                    "y": y,
                    "width": f"{w:.1f}",
                    "height": bar_h,
                    "value_x": f"{label_w + w + 6:.1f}",
                    "value": f"{float(r[metric]):,.4g}",
                }
            )
        label = labels.get(metric, metric.replace("_", " "))
        height = len(rows) * (bar_h + gap)
        charts.append({"label": label, "metric": metric, "width": label_w + width + 90, "height": height, "bars": bars})
    return {"title": title, "failed": False, "note": data.get("note"), "charts": charts}


def _departures(hl: Highlighter, rows: list[book.Departure]) -> list[dict[str, Any]]:
    return [
        {
            "number": d.number,
            "why": d.why[:1].upper() + d.why[1:],
            "book": d.book,
            "here": d.here,
            "book_code": [(fw, hl(code)) for fw, code in book.BOOK.get(d.number, ())],
            "ours": [
                Code.of(hl, extract(p), p.module.split(".")[0].removeprefix("densenet_"))
                for p in book.OURS.get(d.number, ())
            ],
            "tests": book.pinned_tests(d),
        }
        for d in rows
    ]


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


def _context(hl: Highlighter, options: SiteOptions, curves: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Everything ``templates/page.html.j2`` shows, computed and read now."""
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
    departures_md = options.docs / "departures.md"
    return {
        "network": {"describe": config.describe(), "params": count_params(config), "bn_stats": count_bn_stats(config)},
        "input_size": options.input_size,
        "versions": _versions(),
        "commit": _commit(),
        "switch_buttons": [("all", "side by side")] + [(b, TITLES[b]) for b in BACKEND_ORDER],
        "rows": _rows(hl, ctx),
        "stage_table": _stage_table(ctx, options.measured),
        "params_table": _params_table(ctx, options.measured),
        "parity": _parity(parity),
        "naive": _naive(ctx),
        "curves": curves,
        "curves_path": str(options.docs / "training_curves.png"),
        "benchmark": _bar_chart(benchmark) if benchmark else None,
        "departures": _departures(hl, book.read_departures(departures_md)) if departures_md.is_file() else None,
        "departures_path": str(departures_md),
    }


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
    # Both before anything is computed or created: a missing `teach` extra fails at once.
    env, hl = _environment(), Highlighter()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DenseNetError(f"--out {out}: cannot create the directory ({exc.strerror or exc})") from None
    curves_src = options.docs / "training_curves.png"
    curves = curves_src.is_file()
    page = env.get_template("page.html.j2").render(_context(hl, options, curves, say))
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
