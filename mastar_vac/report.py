"""The run report: one Markdown file and one standalone HTML page beside the figures.

Why both: ``report.md`` reads well on GitHub and in a terminal and diffs cleanly between
runs; ``report.html`` opens in any browser from the output directory with no server,
no JavaScript and nothing fetched from the network (the figures are relative links, so
the directory can be copied or archived as a whole).

The section texts are converted with Python-Markdown (the ``markdown`` package, with its
``tables`` and ``fenced_code`` extensions). Raw HTML in a text is escaped, not passed
through, and links and images are kept only for http(s), mailto and relative targets,
so a label or file name can never inject markup or script.
"""

from __future__ import annotations

import datetime as _dt
import html
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import quote, urlsplit
from xml.etree import ElementTree

import markdown
from markdown.extensions import Extension
from markdown.treeprocessors import Treeprocessor

from . import __version__
from .io.atomic import atomic_path

__all__ = ["Section", "write_report", "markdown_to_html"]

log = logging.getLogger(__name__)

FigureSpec = str | os.PathLike[str] | tuple[str | os.PathLike[str], str]


@dataclass
class Section:
    """One section of the report.

    Attributes
    ----------
    heading
        Section title (plain text).
    text
        Free text in Markdown (with pipe tables; see :func:`markdown_to_html`).
    tables
        Preformatted tables (e.g. ``DataFrame.to_string()``), shown monospaced as given.
    figures
        Image paths, or ``(path, caption)`` pairs. Absolute paths are turned into links
        relative to the report directory; relative paths are taken as relative to it.
    """

    heading: str
    text: str = ""
    tables: Sequence[str] = field(default_factory=list)
    figures: Sequence[FigureSpec] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Markdown → HTML (Python-Markdown, made safe)
# ---------------------------------------------------------------------------

_SAFE_SCHEMES = {"", "http", "https", "mailto"}
_MD_EXTENSIONS = ("tables", "fenced_code")


def _safe_url(url: str) -> str | None:
    """The URL if its scheme is harmless (no ``javascript:``/``data:``), else None."""
    url = html.unescape(url).strip()
    scheme = urlsplit(url).scheme.lower()
    if scheme not in _SAFE_SCHEMES or re.match(r"^[a-zA-Z]:[\\/]", url):
        # a Windows drive letter looks like a scheme: treat it as unsafe, it is not portable anyway
        return None
    return url


class _SafeTree(Treeprocessor):
    """Demote headings under the section's ``<h2>`` and defuse links and images whose
    target is not http(s), mailto or relative (they become plain text)."""

    def __init__(self, md: markdown.Markdown, heading_offset: int) -> None:
        super().__init__(md)
        self.heading_offset = heading_offset

    def run(self, root: ElementTree.Element) -> None:
        for el in root.iter():
            if re.fullmatch(r"h[1-6]", el.tag) and self.heading_offset:
                el.tag = f"h{min(6, int(el.tag[1]) + self.heading_offset)}"
            elif el.tag == "a" and _safe_url(el.get("href", "")) is None:
                el.tag = "span"
                el.attrib.clear()
            elif el.tag == "img" and _safe_url(el.get("src", "")) is None:
                alt = el.get("alt", "")
                el.tag = "span"
                el.attrib.clear()
                el.text = alt


class _SafeMarkdown(Extension):
    """Raw HTML in the text is shown as text, not passed through (a label or file name
    can never inject markup or script); see :class:`_SafeTree` for links and images."""

    def __init__(self, heading_offset: int = 0) -> None:
        super().__init__()
        self.heading_offset = heading_offset

    def extendMarkdown(self, md: markdown.Markdown) -> None:  # noqa: N802 - Python-Markdown's API name
        md.preprocessors.deregister("html_block")
        md.inlinePatterns.deregister("html")
        # after UnescapeTreeprocessor (priority 0), so the URLs checked are the final ones
        md.treeprocessors.register(_SafeTree(md, self.heading_offset), "mastar_vac_safe", -5)


def markdown_to_html(text: str, *, heading_offset: int = 0) -> str:
    """Markdown → HTML with Python-Markdown and its ``tables`` and ``fenced_code`` extensions.

    Raw HTML in ``text`` is escaped and shown, never passed through; links and images are
    kept only for http(s), mailto and relative targets. ``heading_offset`` demotes
    headings (a section's ``#`` becomes ``<h3>`` under the section's ``<h2>``).
    """
    md = markdown.Markdown(extensions=[*_MD_EXTENSIONS, _SafeMarkdown(heading_offset)], output_format="html")
    return md.convert(text)


# ---------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 70rem; margin: 2rem auto;
       padding: 0 1rem; line-height: 1.5; color: #1a1a1a; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .2rem; margin-top: 2.5rem; }
pre { background: #f6f8fa; padding: .8rem; overflow-x: auto; font-size: .85rem; line-height: 1.3; }
/* a preformatted table's title lines (file paths, long notes) wrap instead of running off the page */
pre.table { white-space: pre-wrap; overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: 1rem 0; font-size: .9rem; }
th, td { border: 1px solid #ddd; padding: .2rem .6rem; }
th { background: #f6f8fa; }
tbody tr:nth-child(even) { background: #fbfbfb; }
code { background: #f6f8fa; padding: 0 .2rem; }
pre code { background: none; padding: 0; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .9rem; color: #555; }
nav ul { columns: 2; }
.meta { color: #666; font-size: .9rem; }
"""


def _figure_link(directory: Path, fig: str | os.PathLike[str]) -> tuple[str, Path]:
    """(POSIX path relative to the report directory, absolute path) of a figure."""
    p = Path(fig)
    absolute = p if p.is_absolute() else directory / p
    rel = os.path.relpath(absolute, directory) if p.is_absolute() else os.fspath(p)
    return PurePosixPath(*Path(rel).parts).as_posix(), absolute


def _figures(directory: Path, figures: Sequence[FigureSpec]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for spec in figures:
        fig, caption = (spec if isinstance(spec, tuple) else (spec, ""))
        rel, absolute = _figure_link(directory, fig)
        if not absolute.exists():
            log.warning("report figure %s does not exist (linked anyway)", absolute)
        out.append((rel, caption or PurePosixPath(rel).stem.replace("_", " ")))
    return out


def _anchor(heading: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-") or "section"
    anchor, k = base, 2
    while anchor in used:
        anchor, k = f"{base}-{k}", k + 1
    used.add(anchor)
    return anchor


def _md_escape_alt(text: str) -> str:
    return text.replace("[", "(").replace("]", ")").replace("\n", " ")


def _fence_for(text: str) -> str:
    """A code fence longer than any backtick run inside the table."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def write_report(directory: str | os.PathLike[str], *, title: str, sections: Sequence[Section],
                 generated: str | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``directory`` (atomically); return both paths.

    ``generated`` is the time stamp shown under the title (default: now, UTC).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stamp = generated or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = f"generated {stamp} by mastar_vac {__version__}"

    md: list[str] = [f"# {title}", "", f"_{meta}_", ""]
    body: list[str] = []
    toc: list[str] = []
    used: set[str] = set()
    for sec in sections:
        figs = _figures(directory, sec.figures)
        anchor = _anchor(sec.heading, used)
        toc.append(f'<li><a href="#{anchor}">{html.escape(sec.heading)}</a></li>')
        md += [f"## {sec.heading}", ""]
        body.append(f'<section id="{anchor}">\n<h2>{html.escape(sec.heading)}</h2>')
        if sec.text.strip():
            md += [sec.text.strip(), ""]
            body.append(markdown_to_html(sec.text.strip(), heading_offset=2))
        for table in sec.tables:
            fence = _fence_for(table)
            md += [fence, table.rstrip("\n"), fence, ""]
            body.append(f'<pre class="table">{html.escape(table.rstrip())}</pre>')
        for rel, caption in figs:
            md += [f"![{_md_escape_alt(caption)}](<{rel}>)", ""]
            body.append(f'<figure><img src="{html.escape(quote(rel), quote=True)}" '
                        f'alt="{html.escape(caption, quote=True)}">'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        body.append("</section>")

    page = "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{html.escape(meta)}</p>',
        f"<nav><ul>{''.join(toc)}</ul></nav>" if len(toc) > 1 else "",
        *body,
        "</body>",
        "</html>",
        "",
    ])
    md_path, html_path = directory / "report.md", directory / "report.html"
    with atomic_path(md_path) as tmp:
        tmp.write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    with atomic_path(html_path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    log.info("wrote %s and %s (%d sections)", md_path, html_path, len(sections))
    return md_path, html_path
