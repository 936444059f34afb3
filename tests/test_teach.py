"""``densenet teach``: the side-by-side site, its code cells against the files, a real browser render."""

from __future__ import annotations

import ast
import fcntl
import html
import importlib
import inspect
import json
import os
import re
import select
import shutil
import subprocess
import sys
import textwrap
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from common.cli import main
from common.config import D2L
from common.teach import book, facts, page
from common.teach.notes import book_jax_params
from common.teach.sources import BACKEND_ORDER, ROWS, Piece, SourceError, extract, find_node, parse_selector

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORK_MODULES = ("torch", "mxnet", "jax", "flax", "tensorflow", "keras")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site as ``densenet teach`` builds it from this checkout (parity from docs/results)."""
    out = tmp_path_factory.mktemp("site")
    assert main(["teach", "--out", str(out), "--quiet"]) == 0
    return out


class _Cells(HTMLParser):
    """Every ``<pre class="code">`` of the page: its data attributes and its text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.cells: list[dict[str, str]] = []
        self.rows: dict[str, list[str]] = {}
        self._in: dict[str, str] | None = None
        self._row: str | None = None
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        for key in ("src", "href"):
            if key in a:
                self.refs.append(a[key])
        if tag == "section" and "row" in a.get("class", "").split():
            self._row = a["id"]
            self.rows[self._row] = []
        if tag == "div" and "cell" in a.get("class", "").split() and self._row:
            self.rows[self._row].append(a["data-backend"])
        if tag == "pre" and "code" in a.get("class", "").split():
            self._in = {**a, "text": ""}

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre" and self._in is not None:
            self.cells.append(self._in)
            self._in = None
        if tag == "section":
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._in is not None:
            self._in["text"] += data


def parse_site(site: Path) -> _Cells:
    parser = _Cells()
    parser.feed((site / "index.html").read_text(encoding="utf-8"))
    return parser


# ---------------------------------------------------------------------------------------------
# the code cells


def test_every_row_has_the_four_columns(site: Path) -> None:
    parsed = parse_site(site)
    assert list(parsed.rows) == [r.key for r in ROWS]
    for key, backends in parsed.rows.items():
        assert backends == list(BACKEND_ORDER), key
    text = (site / "index.html").read_text(encoding="utf-8")
    for title in ("PyTorch", "MXNet Gluon", "JAX/Flax", "TensorFlow/Keras"):
        assert f"<h3 class='col-title'>{title}</h3>" in text


def test_every_code_cell_equals_the_current_source(site: Path) -> None:
    """Each cell is exactly the lines it names in its file now, and those lines are exactly the
    object (or statements) it names: found here with a separate walk over the file's ast."""
    cells = parse_site(site).cells
    expected = len(page.source_pieces())
    assert len(cells) == expected, f"{len(cells)} code cells, {expected} pieces"
    for cell in cells:
        path = ROOT / cell["data-file"]
        lines = path.read_text(encoding="utf-8").splitlines()
        first, last = (int(v) for v in cell["data-lines"].split("-"))
        current = textwrap.dedent("\n".join(lines[first - 1 : last]))
        shown = cell["text"].rstrip("\n")
        assert shown == current, f"{cell['data-file']}:{cell['data-lines']} ({cell['data-selector']}) is stale"
        qualname, start_marker, end_marker = parse_selector(cell["data-selector"])
        node = _node(ast.parse("\n".join(lines)), qualname)
        if start_marker is None:
            decorators = [d.lineno for d in getattr(node, "decorator_list", [])]
            assert (min([node.lineno, *decorators]), node.end_lineno) == (first, last), cell["data-selector"]
        else:  # statements of a function: inside it, from the first marker to the last
            assert node.lineno < first <= last <= node.end_lineno
            assert start_marker in current and end_marker in current


def _node(tree: ast.Module, qualname: str) -> ast.AST:
    """The test's own lookup (not the builder's): walk classes and functions by name."""
    scope: list[ast.stmt] = tree.body
    found: ast.AST | None = None
    for part in qualname.split("."):
        found = None
        for stmt in scope:
            names = [getattr(stmt, "name", None)]
            if isinstance(stmt, ast.Assign):
                names = [t.id for t in stmt.targets if isinstance(t, ast.Name)]
            if part in names:
                found = stmt
        assert found is not None, f"{qualname}: {part} not found"
        scope = getattr(found, "body", [])
    return found


def test_cells_equal_inspect_getsource(backend_name: str, native, site: Path) -> None:
    """With the framework installed, every whole class or function cell of this backend is what
    ``inspect.getsource`` returns for the live object."""
    checked = 0
    for cell in parse_site(site).cells:
        module_name, selector = cell["data-module"], cell["data-selector"]
        if not module_name.startswith(native.__name__ + ".") or "::" in selector:
            continue
        obj = importlib.import_module(module_name)
        for part in selector.split("."):
            obj = getattr(obj, part)
        obj = inspect.unwrap(obj) if not isinstance(obj, type) else obj
        if isinstance(obj, staticmethod):
            obj = obj.__func__
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # a constant such as _BN_LEAVES: the line check above covers it
        if hasattr(obj, "__wrapped__") or type(obj).__name__ == "PjitFunction":
            continue
        assert textwrap.dedent(inspect.getsource(obj)).rstrip("\n") == cell["text"].rstrip("\n"), selector
        checked += 1
    assert checked >= 8, f"only {checked} cells of {backend_name} checked against inspect"


def test_a_missing_piece_fails_the_build_naming_it() -> None:
    with pytest.raises(SourceError, match=r"densenet_torch/model.py: NoSuchBlock"):
        extract(Piece("densenet_torch.model", "NoSuchBlock"))
    with pytest.raises(SourceError, match="no statement containing"):
        extract(Piece("densenet_torch.model", "DenseNet.__init__::no such text"))


def test_extract_reads_files_without_importing_frameworks() -> None:
    code = (
        "import sys\nfrom common.teach import build_site, extract\nfrom common.teach.sources import ROWS\n"
        "[extract(p) for r in ROWS for ps in r.cells.values() for p in ps]\n"
        f"print(sorted(m for m in {FRAMEWORK_MODULES!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"


def test_find_node_includes_decorators() -> None:
    tree = ast.parse("class A:\n    @staticmethod\n    def b():\n        pass\n")
    assert find_node(tree, "A.b").lineno == 3
    source = extract(Piece("densenet_torch.model", "DenseNet.b1"))
    assert source.text.startswith("@staticmethod\ndef b1(")


# ---------------------------------------------------------------------------------------------
# the facts and the departures


def test_padding_facts() -> None:
    assert facts.same_padding(96, 7, 2) == (2, 3)
    assert facts.same_padding(48, 3, 2) == (0, 1)
    assert facts.same_padding(97, 7, 2) == (3, 3)  # odd sides: symmetric
    conv, pool = facts.padding_facts(96)
    assert (conv.same, conv.explicit, pool.input_side, pool.same) == ((2, 3), (3, 3), 48, (0, 1))


def test_stage_facts_add_up() -> None:
    stages = facts.stage_facts(D2L, 96)
    assert [s.stage for s in stages][:3] == ["stem", "dense1", "transition1"]
    assert stages[0].nchw == (1, 64, 24, 24) and stages[0].nhwc == (1, 24, 24, 64)
    assert sum(s.params for s in stages) == 758_226


def test_book_jax_network_is_the_documented_one() -> None:
    assert book_jax_params(D2L) == 700_586  # docs/departures.md, row 1


def test_departures_match_the_docs_and_name_existing_tests() -> None:
    rows = book.read_departures(ROOT / "docs" / "departures.md")
    assert [d.number for d in rows] == sorted(book.BOOK) == sorted(book.OURS)
    for d in rows:
        tests = book.pinned_tests(d)
        assert tests, f"departure {d.number} names no test"
        for test in tests:
            file, _, name = test.partition("::")
            path = ROOT / file
            assert path.is_file(), test
            if name:
                defined = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
                assert name in defined, f"departure {d.number}: {test} does not exist"


def test_parity_results_files_are_parity_output() -> None:
    results = [facts.read_parity(ROOT / "docs" / "results" / f"parity_{d}.json") for d in ("float32", "float64")]
    assert [r.dtype for r in results] == ["float32", "float64"]
    for r in results:
        assert r.data["ok"] and set(r.data["participants"]) == {"numpy", "torch", "mxnet", "jax", "tf"}
        assert {c["check"] for c in r.worst()} >= {"inference", "grad-params", "lockstep"}


def test_page_states_the_measured_facts(site: Path) -> None:
    text = html.unescape((site / "index.html").read_text(encoding="utf-8"))
    assert "700,586 parameters against 758,226" in text
    assert "(2, 3) for the 7x7/2 conv and (0, 1) for the 3x3/2 pool" in text
    assert "float32: every comparison within its bound" in text
    assert "float64: every comparison within its bound" in text
    naive = facts.naive_rows()
    same = next(r for r in naive if r["default"].startswith("'same'"))
    assert f"max abs {same['max_abs']:.1e}" in text
    assert "training_curves.png" in text and (site / "training_curves.png").is_file()


def test_notes_are_text_the_page_escapes() -> None:
    """The notes hold no HTML: code spans and in-page links are Markdown-ish, which the template's
    ``md`` filter turns into markup after escaping everything else."""
    from common.teach import notes

    config = D2L
    ctx = notes.Context(config, 96, facts.stage_facts(config, 96), facts.padding_facts(96), facts.naive_rows(config))
    for row in ROWS:
        for note in notes.row_notes(row.key, ctx):
            for text in note:
                assert "<" not in text and "&" not in text and text.count("`") % 2 == 0, (row.key, text)
    md = str(page.inline_md("a `x<y>` **b** & [c](#stem) [d](d.md) <i>"))
    assert md == "a <code>x&lt;y&gt;</code> <strong>b</strong> &amp; <a href='#stem'>c</a> [d](d.md) &lt;i&gt;"


def test_benchmark_chart(tmp_path: Path) -> None:
    bench = tmp_path / "bench.json"
    rows = [{"backend": "torch", "peak_mb": 512.0}, {"backend": "tf", "peak_mb": 1024.5}]
    bench.write_text(json.dumps({"title": "memory", "rows": rows}))
    out = tmp_path / "site"
    assert main(["teach", "--out", str(out), "--benchmark", str(bench), "--quiet"]) == 0
    text = (out / "index.html").read_text(encoding="utf-8")
    assert "<svg role='img' aria-label='peak_mb'" in text and "1,024" in text


def test_site_is_offline(site: Path) -> None:
    parsed = parse_site(site)
    assert parsed.refs, "no references parsed"
    for ref in parsed.refs:
        assert not re.match(r"^[a-z]+:|^//", ref), f"external reference {ref}"
        if not ref.startswith("#"):
            assert (site / ref).is_file(), f"{ref} is referenced but not written"
    ids = set(re.findall(r"id=['\"]([^'\"]+)['\"]", (site / "index.html").read_text(encoding="utf-8")))
    for ref in parsed.refs:
        if ref.startswith("#"):
            assert ref[1:] in ids, f"dangling link {ref}"


# ---------------------------------------------------------------------------------------------
# a real browser


def find_browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class DevTools:
    """The Chrome DevTools protocol over ``--remote-debugging-pipe`` (fds 3 and 4): no port, no
    websocket library. Every wait is bounded; :meth:`close` always kills the browser."""

    def __init__(self, browser: str, profile: Path, log: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # The browser's ends, moved above 3 and 4 so that placing them there cannot overwrite one
        # with the other (a fresh process's pipes are often exactly fds 3 and 4).
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser_r, from_browser_w)]
        for fd in (to_browser_r, from_browser_w):
            os.close(fd)

        def wire() -> None:  # in the child, before exec: the protocol's fixed fds, inheritable
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        args = [
            browser,
            "--headless",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--disable-extensions",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, preexec_fn=wire, close_fds=False
        )
        for fd in high:
            os.close(fd)
        self._buffer = b""
        self._next = 0
        self.events: list[dict] = []
        self.session: str | None = None

    def send(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params or {}}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        reply = self._until(lambda m: m.get("id") == self._next, timeout, method)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, timeout: float = 30.0) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        return self._until(lambda m: m.get("method") == method, timeout, method)

    def _until(self, done, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if done(message):
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer to {what} within {timeout:g} s")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"the browser closed the pipe while waiting for {what}")
                self._buffer += chunk

    def evaluate(self, expression: str) -> object:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def problems(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions and failed loads seen so far."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails'].get('text')} {p['exceptionDetails'].get('exception')}")
            elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                out.append(f"console.{p['type']}: {[a.get('value') for a in p.get('args', [])]}")
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                out.append(f"log {p['entry']['level']}: {p['entry']['text']} {p['entry'].get('url', '')}")
        return out

    def close(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=10)
        finally:
            for fd in (self._to_browser, self._from_browser):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._log.close()


@pytest.fixture
def browser() -> str:
    path = find_browser()
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no chromium: .ci/setup installs it (apt-get install chromium)")
        pytest.skip("no headless browser here: apt-get install chromium (as .ci/setup does)")
    return path


def test_page_renders_in_a_real_browser(site: Path, browser: str, tmp_path: Path) -> None:
    """Chromium loads the page from disk: four columns in every row, the switch works, no
    console error, exception or failed load; a screenshot for people to look at."""
    tools = DevTools(browser, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        tools.session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            tools.send(f"{domain}.enable")
        tools.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1600, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
        )
        tools.send("Page.navigate", {"url": (site / "index.html").as_uri()})
        tools.wait_event("Page.loadEventFired", timeout=60)

        assert tools.evaluate("document.documentElement.classList.contains('js')") is True
        columns = tools.evaluate(
            "Array.from(document.querySelectorAll('section.row')).map(r => "
            "Array.from(r.querySelectorAll('.cell')).filter(c => c.offsetWidth > 200).map(c => "
            "c.querySelector('.col-title').textContent))"
        )
        assert columns == [["PyTorch", "MXNet Gluon", "JAX/Flax", "TensorFlow/Keras"]] * len(ROWS)
        # One framework at a time, then back; then the switch for every row.
        tools.evaluate("document.querySelector('#stem .switch button[data-view=jax]').click()")
        visible = tools.evaluate(
            "Array.from(document.querySelectorAll('#stem .cell')).filter(c => c.offsetParent !== null)"
            ".map(c => [c.dataset.backend, c.offsetWidth])"
        )
        assert [b for b, _ in visible] == ["jax"] and visible[0][1] > 1000
        assert tools.evaluate("document.querySelector('#conv-block .cell[data-backend=torch]').offsetParent !== null")
        tools.evaluate("document.querySelector('.global .switch button[data-view=tf]').click()")
        assert tools.evaluate(
            "Array.from(document.querySelectorAll('section.row')).every(r => r.dataset.view === 'tf')"
        )
        tools.evaluate("document.querySelector('.global .switch button[data-view=all]').click()")
        assert tools.evaluate("document.querySelector('img[src=\"training_curves.png\"]').naturalWidth") > 0

        shot = tools.send("Page.captureScreenshot", {"format": "png"}, timeout=60)["data"]
        import base64

        png = base64.b64decode(shot)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
        path = Path(os.environ.get("DENSENET_TEACH_SCREENSHOT", tmp_path / "teach.png"))
        path.write_bytes(png)
        time.sleep(0.2)  # let late console messages arrive before judging
        tools.evaluate("1")
        assert tools.problems() == []
    finally:
        tools.close()


def test_devtools_reports_console_errors(browser: str, tmp_path: Path) -> None:
    """The browser check can fail: a page with a script error is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><title>x</title><img src='missing.png'><script>console.error('boom');nope();</script>"
    )
    tools = DevTools(browser, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        tools.session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            tools.send(f"{domain}.enable")
        tools.send("Page.navigate", {"url": bad.as_uri()})
        tools.wait_event("Page.loadEventFired", timeout=60)
        tools.evaluate("1")
        problems = "\n".join(tools.problems())
        assert "boom" in problems and "nope" in problems and "missing.png" in problems
    finally:
        tools.close()


# ---------------------------------------------------------------------------------------------
# the notebooks


def test_notebooks_match_their_scripts() -> None:
    from common.teach.notebooks import notebook_paths, sync

    scripts = notebook_paths(ROOT / "notebooks")
    assert [p.stem for p in scripts] == sorted(f"densenet_{b}" for b in BACKEND_ORDER)
    assert sync(ROOT / "notebooks", check=True) == [], "run `densenet notebooks` after editing a script"


NOTEBOOK_HEADER = (
    "# ---\n# jupyter:\n#   jupytext:\n#     formats: ipynb,py:percent\n#   kernelspec:\n"
    "#     display_name: Python 3\n#     language: python\n#     name: python3\n# ---\n"
)


def test_percent_script_conversion() -> None:
    """Jupytext's reading of a percent script, with ids that make the file a function of the script."""
    from common.teach.notebooks import code_of, dumps, to_notebook

    text = NOTEBOOK_HEADER + "\n# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n\nx\n"
    nb = to_notebook(text)
    assert [c["cell_type"] for c in nb["cells"]] == ["markdown", "code"]
    assert [c["id"] for c in nb["cells"]] == ["cell-1", "cell-2"]
    assert nb["cells"][0]["source"] == "# Title\n\ntext"
    assert code_of(nb) == "x = 1\n\n\nx\n"
    written = dumps(nb)
    assert written == dumps(to_notebook(text)) and written.endswith("}\n")
    saved = json.loads(written)
    assert saved["metadata"]["jupytext"] == {"formats": "ipynb,py:percent"}
    assert saved["metadata"]["kernelspec"]["name"] == "python3" and saved["nbformat_minor"] == 5
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in saved["cells"] if c["cell_type"] == "code")
    # Code before the first marker is a cell of its own, as jupytext (and Jupyter with it) reads it.
    assert [c["source"] for c in to_notebook("x = 1\n# %%\ny = 2\n")["cells"]] == ["x = 1", "y = 2"]


def test_notebooks_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``densenet notebooks`` writes what differs, ``--check`` only reports it; a script jupytext
    cannot read is named."""
    script = tmp_path / "densenet_x.py"
    script.write_text(NOTEBOOK_HEADER + "# %%\nx = 1\n", encoding="utf-8")
    assert main(["notebooks", "--dir", str(tmp_path), "--check"]) == 1
    assert "densenet_x.ipynb differs from its script" in capsys.readouterr().err
    assert main(["notebooks", "--dir", str(tmp_path)]) == 0
    assert f"wrote {tmp_path / 'densenet_x.ipynb'}" in capsys.readouterr().out
    for _ in range(2):  # stable: nothing to write, nothing differs
        assert main(["notebooks", "--dir", str(tmp_path), "--check"]) == 0
    assert main(["notebooks", "--dir", str(tmp_path)]) == 0
    assert "every notebook already matches its script" in capsys.readouterr().out
    script.write_text("# ---\n# jupyter:\n#   kernelspec:\n#     name: python3\n# ---\n# %%\nx = 1\n")
    assert main(["notebooks", "--dir", str(tmp_path), "--check"]) == 2
    assert "densenet_x.py: jupytext cannot make a valid notebook of it" in capsys.readouterr().err


def test_teach_extra_missing_is_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Without the ``teach`` extra the commands say what to install (None in sys.modules makes
    the import fail, as a missing package does)."""
    (tmp_path / "densenet_x.py").write_text(NOTEBOOK_HEADER + "# %%\nx = 1\n", encoding="utf-8")
    monkeypatch.setitem(sys.modules, "jupytext", None)
    assert main(["notebooks", "--dir", str(tmp_path), "--check"]) == 1
    assert "needs jupytext" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "jinja2", None)
    assert main(["teach", "--out", str(tmp_path / "site"), "--quiet"]) == 1
    assert "densenet teach needs Jinja2" in capsys.readouterr().err


@pytest.mark.slow
def test_notebook_executes(backend_name: str, adapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend's notebook run by a real Jupyter kernel (nbclient), every cell in order, with the
    tiny settings CI uses (the kernel inherits this process's environment)."""
    import nbclient
    import nbformat

    notebook = nbformat.read(ROOT / "notebooks" / f"densenet_{backend_name}.ipynb", as_version=4)
    monkeypatch.setenv("DENSENET_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    client = nbclient.NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if one fails
    stdout = "".join(
        out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    assert "epoch 1: train loss" in stdout
    assert "evaluated in" in stdout and "numpy reference" in stdout


# ---------------------------------------------------------------------------------------------
# the book's exercises (docs/exercises.md)


def test_resnet_counts_match_the_published_and_the_book() -> None:
    from common.teach.exercises import BOOK_RESNET18, RESNET50, RESNET50_PUBLISHED, resnet_stages

    assert sum(p for _, p, _ in resnet_stages(RESNET50)) == RESNET50_PUBLISHED
    assert abs(sum(m for _, _, m in resnet_stages(RESNET50)) - 4.09e9) < 0.01e9  # the published "4.1 GFLOPs"
    assert sum(p for _, p, _ in resnet_stages(BOOK_RESNET18)) == 11_178_378


@pytest.mark.torch
def test_book_resnet18_count_in_torch(request: pytest.FixtureRequest) -> None:
    """The book's ResNet-18 (d2l 8.6), built with lazy modules, has the count the exercise uses."""
    from tests.conftest import get_adapter

    get_adapter("torch", request.config)
    import torch
    from torch import nn

    from common.teach.exercises import BOOK_RESNET18, resnet_stages

    class Residual(nn.Module):
        def __init__(self, num_channels: int, use_1x1conv: bool = False, strides: int = 1) -> None:
            super().__init__()
            self.conv1 = nn.LazyConv2d(num_channels, kernel_size=3, padding=1, stride=strides)
            self.conv2 = nn.LazyConv2d(num_channels, kernel_size=3, padding=1)
            self.conv3 = nn.LazyConv2d(num_channels, kernel_size=1, stride=strides) if use_1x1conv else None
            self.bn1, self.bn2 = nn.LazyBatchNorm2d(), nn.LazyBatchNorm2d()

        def forward(self, X: torch.Tensor) -> torch.Tensor:
            Y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(X)))))
            return torch.relu(Y + (self.conv3(X) if self.conv3 else X))

    layers: list[nn.Module] = [
        nn.LazyConv2d(64, kernel_size=7, stride=2, padding=3),
        nn.LazyBatchNorm2d(),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    ]
    for i, (n, channels) in enumerate(BOOK_RESNET18.arch):
        layers += [
            Residual(channels, use_1x1conv=j == 0 and i > 0, strides=2 if j == 0 and i > 0 else 1) for j in range(n)
        ]
    layers += [nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.LazyLinear(10)]
    net = nn.Sequential(*layers)
    net(torch.zeros(1, 1, 96, 96))
    assert sum(p.numel() for p in net.parameters()) == sum(p for _, p, _ in resnet_stages(BOOK_RESNET18))


def test_densenet_stage_rows_add_up() -> None:
    from common.arch import count_macs, count_params
    from common.config import CONFIGS
    from common.teach.exercises import densenet_stage_params, family_rows

    for name in ("d2l", "densenet121"):
        rows = densenet_stage_params(CONFIGS[name], 224)
        assert [r[0] for r in rows] == ["stem", "stage1", "stage2", "stage3", "stage4", "head"]
        assert sum(r[1] for r in rows) == count_params(CONFIGS[name])
        assert sum(r[2] for r in rows) == count_macs(CONFIGS[name], 224)
    family = {r["name"]: r for r in family_rows()}
    assert family["densenet121"]["params"] == family["densenet121"]["published"] == 7_978_856
    assert family["densenet121"]["depth"] == 121 and family["densenet169"]["depth"] == 169


@pytest.mark.parametrize("name", ["torch", "tf"])
def test_max_pool_transitions(name: str, request: pytest.FixtureRequest) -> None:
    """The pooling exercise's swap: same weights and shapes, another function."""
    import numpy as np

    from common.config import DenseNetConfig
    from tests.conftest import get_adapter

    adapter = get_adapter(name, request.config)
    config = DenseNetConfig(num_channels=8, growth_rate=8, arch=(2, 2, 2))
    X = np.random.default_rng(0).random((2, 1, 32, 32), dtype=np.float32)
    avg = adapter.build(config, seed=0)
    swapped = adapter.build(config, seed=0)
    assert adapter.use_max_pool_in_transitions(swapped) == 2
    a, b = adapter.stages(avg, X), adapter.stages(swapped, X)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    np.testing.assert_array_equal(a["dense1"], b["dense1"])
    assert not np.allclose(a["transition1"], b["transition1"])
    assert np.all(b["transition1"] >= a["transition1"] - 1e-6)  # a max is at least the mean
    jax = get_adapter("jax", request.config)
    with pytest.raises(Exception, match="PyTorch or TensorFlow"):
        jax.use_max_pool_in_transitions(None)


@pytest.mark.slow
def test_pooling_exercise_runs(tmp_path: Path, request: pytest.FixtureRequest, capsys) -> None:
    from tests.conftest import get_adapter

    get_adapter("torch", request.config)
    argv = ["exercise", "pooling", "--epochs", "1", "--limit", "256", "--test-limit", "256", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "avg" in out and "max" in out and (tmp_path / "curves.png").is_file()
    assert (tmp_path / "pool-max" / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_memory_exercise_runs(tmp_path: Path, request: pytest.FixtureRequest, capsys) -> None:
    from tests.conftest import get_adapter

    get_adapter("torch", request.config)
    save = tmp_path / "memory.json"
    argv = ["exercise", "memory", "--backends", "torch", "--input-size", "32", "--batch-size", "2", "--save", str(save)]
    assert main(argv) == 0
    (row,) = facts.read_benchmark(save)["rows"]
    assert row["backend"] == "torch" and row["step_peak_mb"] > 0 and row["peak_mb"] >= row["rss_after_build_mb"]


def test_dense_mlp_exercise_runs(request: pytest.FixtureRequest) -> None:
    from common.teach.exercises import dem_regression, run_dense_mlp
    from tests.conftest import get_adapter

    d = dem_regression()
    assert d["X_train"].shape == (4000, 2) and d["y_test"].shape == (4000,)
    get_adapter("torch", request.config)
    rows = run_dense_mlp({"plain": (2, 8), "dense": (2, 8)}, epochs=2)
    assert [r["model"] for r in rows] == ["plain", "dense", "mean (no model)"]
    assert rows[1]["params"] == (2 * 8 + 8) + (10 * 8 + 8) + (18 + 1)  # widths 2, 2+8, then 2+16 to the output


def test_every_exercise_is_answered_with_a_command() -> None:
    text = (ROOT / "docs" / "exercises.md").read_text(encoding="utf-8")
    for command in ("pooling", "params", "memory", "family", "dense-mlp"):
        assert f"densenet exercise {command}" in text
    for n in range(1, 6):
        assert f"## {n}." in text
    assert not re.search(r"[A-Z]+_(OUTPUT|DISCUSSION)", text), "a placeholder is left"
    assert "$ densenet exercise memory" in text and (ROOT / "docs" / "results" / "memory_224.json").is_file()
