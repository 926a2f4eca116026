"""The run report: Markdown and standalone HTML, escaped, with relative figure links."""

from __future__ import annotations

import html.parser

import pytest

from mastar_vac.report import Section, markdown_to_html, write_report


class _Collector(html.parser.HTMLParser):
    """Tags, attributes and text of a page (to check structure without string matching)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):  # noqa: ANN001
        self.tags.append((tag, dict(attrs)))
        if tag not in ("img", "meta", "hr", "br", "link"):
            self.open.append(tag)

    def handle_endtag(self, tag):  # noqa: ANN001
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()

    def handle_data(self, data):  # noqa: ANN001
        self.text.append(data)


def _parse(page: str) -> _Collector:
    c = _Collector()
    c.feed(page)
    c.close()
    assert not c.open, f"unclosed tags {c.open}"
    return c


@pytest.fixture
def figures(tmp_path):
    figs = tmp_path / "out" / "figures"
    figs.mkdir(parents=True)
    for name in ("kiel.png", "cmd plot.png"):
        (figs / name).write_bytes(b"\x89PNG\r\n\x1a\n")
    return figs


def test_write_report(tmp_path, figures):
    out = tmp_path / "out"
    sections = [
        Section("Summary", "The run fitted **59,266** visits; `VALID` for *most*.\n\n- one\n- two <b>not bold</b>",
                tables=["label  offset  scatter\nTEFF     12.0     95.1\nLOGG <x> 0.01 0.10"],
                figures=[figures / "kiel.png", (figures / "cmd plot.png", "Gaia CMD <coloured>")]),
        Section("Comparison & <script>alert('x')</script>", "See [LAMOST](https://www.lamost.org/) and "
                "[bad](javascript:alert(1)).", figures=["figures/kiel.png"]),
        Section("Summary", ""),  # a repeated heading gets its own anchor
    ]
    md, page = write_report(out, title="MaStar VAC <demo>", sections=sections, generated="2024-01-01 00:00 UTC")
    assert md == out / "report.md" and page == out / "report.html"
    assert not [p for p in out.iterdir() if ".part-" in p.name]

    text = md.read_text()
    assert text.startswith("# MaStar VAC <demo>\n")
    assert "## Summary" in text and "**59,266**" in text
    assert "![kiel](<figures/kiel.png>)" in text
    assert "![Gaia CMD <coloured>](<figures/cmd plot.png>)" in text
    assert "```\nlabel  offset  scatter\n" in text

    source = page.read_text()
    doc = _parse(source)
    assert "<script>" not in source and "javascript:" not in source
    imgs = [a["src"] for t, a in doc.tags if t == "img"]
    assert imgs == ["figures/kiel.png", "figures/cmd%20plot.png", "figures/kiel.png"]
    assert all(not s.startswith("/") for s in imgs)  # relative links only
    links = [a["href"] for t, a in doc.tags if t == "a"]
    assert "https://www.lamost.org/" in links
    ids = [a["id"] for t, a in doc.tags if t == "section"]
    assert ids == ["summary", "comparison-script-alert-x-script", "summary-2"]
    body = "".join(doc.text)
    assert "MaStar VAC <demo>" in body  # shown as text, escaped in the source
    assert "two <b>not bold</b>" in body
    assert "LOGG <x> 0.01" in body
    assert ("strong", {}) in doc.tags and ("code", {}) in doc.tags and ("pre", {"class": "table"}) in doc.tags


def test_missing_figure_is_linked_with_a_warning(tmp_path, caplog):
    md, page = write_report(tmp_path, title="t", sections=[Section("A", "x", figures=["nope.png"])])
    assert "nope.png" in md.read_text() and 'src="nope.png"' in page.read_text()
    assert any("does not exist" in r.message for r in caplog.records)


def test_rewrite_replaces(tmp_path):
    write_report(tmp_path, title="first", sections=[Section("A", "one")])
    md, _ = write_report(tmp_path, title="second", sections=[Section("B", "two")])
    assert md.read_text().startswith("# second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.md"]


@pytest.mark.parametrize("src,expect", [
    ("# H1", "<h1>H1</h1>"),
    ("a *b* c_d_e **f**", "<p>a <em>b</em> c_d_e <strong>f</strong></p>"),
    ("`<x> **y**`", "<p><code>&lt;x&gt; **y**</code></p>"),
    ("```\n<raw>\n```", "<pre><code>&lt;raw&gt;\n</code></pre>"),
    ("[a](http://x.org/?a=1&b=2)", '<p><a href="http://x.org/?a=1&amp;b=2">a</a></p>'),
    ("[a](data:text/html,evil)", "<p><span>a</span></p>"),
    ("![x](javascript:alert(1))", "<p><span>x</span></p>"),
    ('![a"b](fig.png)', '<p><img alt="a&quot;b" src="fig.png"></p>'),
    ("1. x\n2. y", "<ol>\n<li>x</li>\n<li>y</li>\n</ol>"),
    ("<img src=x onerror=alert(1)>", "<p>&lt;img src=x onerror=alert(1)&gt;</p>"),
    ("<div>\n<script>alert(1)</script>\n</div>", "<p>&lt;div&gt;\n&lt;script&gt;alert(1)&lt;/script&gt;\n&lt;/div&gt;</p>"),
])
def test_markdown(src, expect):
    assert markdown_to_html(src) == expect


def test_markdown_headings_are_demoted_under_the_section():
    assert markdown_to_html("# a\n\n## b", heading_offset=2) == "<h3>a</h3>\n<h4>b</h4>"


def test_pipe_tables_render_as_html_tables(tmp_path):
    """A Markdown table in a section's text is a real <table> in the HTML (and stays a
    readable pipe table in report.md); no Markdown markup is left over in the page."""
    text = ("**3** flags set:\n\n| bit | name | visits |\n|---:|---|---:|\n| 0 | CHI2_HIGH | 12 |\n"
            "| 2 | AT_BOUND <b> | 16 |")
    md, page = write_report(tmp_path, title="t", sections=[Section("Summary", text)])
    source = page.read_text()
    doc = _parse(source)
    tags = [t for t, _ in doc.tags]
    assert tags.count("table") == 1 and tags.count("tr") == 3 and tags.count("th") == 3
    cells = [d.strip() for d in doc.text if d.strip()]
    assert "CHI2_HIGH" in cells and "AT_BOUND <b>" in cells  # escaped, shown as text
    body = source[source.index("<body>"):]
    assert "|---" not in body and "**" not in body and "---:" not in body
    assert "| 0 | CHI2_HIGH | 12 |" in md.read_text()


def test_flag_table_is_a_real_table(tmp_path):
    """The Summary's FLAG table is a Markdown table: an HTML <table>, one row per bit,
    the counts right-aligned, a '|' in a description escaped rather than splitting a cell."""
    from mastar_vac.report_build import flag_table

    bits = [(0, "CHI2_HIGH", "reduced chi2 > 100; VALID=0"), (4, "LOW_SNR", "S/N < 15 | unknown")]
    text = flag_table(bits, {"CHI2_HIGH": 1234})
    _, page = write_report(tmp_path, title="t", sections=[Section("Summary", text)])
    source = page.read_text()
    doc = _parse(source)
    rows = [a for t, a in doc.tags if t == "tr"]
    assert len(rows) == 3
    tds = [a for t, a in doc.tags if t == "td"]
    assert len(tds) == 8 and tds[2].get("style") == "text-align: right;"
    body = "".join(doc.text)
    assert "1,234" in body and "S/N < 15 | unknown" in body and "|---" not in source


def test_preformatted_tables_wrap_long_title_lines(tmp_path):
    """A column-aligned table stays in <pre> (alignment kept), with a class whose CSS wraps a
    line too long for the page (a long file path in a title line ran off the page)."""
    _, page = write_report(tmp_path, title="t", sections=[Section("A", tables=["x" * 300 + "\na  b\n1  2"])])
    source = page.read_text()
    assert '<pre class="table">' in source
    css = source[source.index("<style>"):source.index("</style>")]
    assert "pre.table { white-space: pre-wrap" in css


def test_comparison_figures_are_found_in_their_folder_with_captions(tmp_path, monkeypatch):
    """The compare stage records its figures relative to the build's working directory;
    the report finds them in the compare folder whatever directory it is rebuilt from,
    and gives each a caption (not the file name)."""
    from mastar_vac.report_build import comparison_figures

    out = tmp_path / "run" / "output" / "demo" / "compare"
    out.mkdir(parents=True)
    for name in ("compare_published.png", "cmd_by_label.png"):
        (out / name).write_bytes(b"\x89PNG\r\n\x1a\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the directory the build ran in
    figs = comparison_figures(out, ["output/demo/compare/compare_published.png", "output/demo/compare/cmd_by_label.png"])
    assert [p for p, _ in figs] == [out / "compare_published.png", out / "cmd_by_label.png"]
    assert all(p.is_file() for p, _ in figs)
    assert "VAC vs PUBLISHED" in figs[0][1] and "colour–magnitude" in figs[1][1]
    _, page = write_report(tmp_path / "run" / "output" / "demo" / "report", title="t",
                           sections=[Section("Comparisons", figures=figs)])
    doc = _parse(page.read_text())
    assert [a["src"] for t, a in doc.tags if t == "img"] == ["../compare/compare_published.png",
                                                            "../compare/cmd_by_label.png"]
