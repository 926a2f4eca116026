"""The run report: one Markdown file and one standalone HTML page beside the figures.

Why both: ``report.md`` reads well on GitHub and in a terminal and diffs cleanly between
runs; ``report.html`` opens in any browser from the output directory with no server,
no JavaScript and nothing fetched from the network (the figures are relative links, so
the directory can be copied or archived as a whole).

The HTML is converted here from a small, safe Markdown subset — headings, paragraphs,
lists, emphasis, inline code, fenced code blocks, links and images — instead of
depending on the ``markdown`` package (not a dependency of the project). All text is
HTML-escaped before any markup is applied, and links are kept only for http(s), mailto
and relative targets, so a label or file name can never inject markup or script.
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
        Free text in Markdown (the subset :func:`markdown_to_html` understands).
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
# Markdown subset → HTML
# ---------------------------------------------------------------------------

_SAFE_SCHEMES = {"", "http", "https", "mailto"}
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_IMAGE = re.compile(r"!\[([^\]\n]*)\]\(([^)\s]+)\)")
_LINK = re.compile(r"\[([^\]\n]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
_ITALIC = re.compile(r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![\w*])|(?<![\w_])_(?=\S)([^_\n]+?)(?<=\S)_(?![\w_])")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_ULIST = re.compile(r"^\s*[-*+]\s+(.*)$")
_OLIST = re.compile(r"^\s*\d+[.)]\s+(.*)$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_RULE = re.compile(r"^\s*([-*_])(\s*\1){2,}\s*$")


def _safe_url(url: str) -> str | None:
    """The URL if its scheme is harmless (no ``javascript:``/``data:``), else None."""
    url = html.unescape(url).strip()
    scheme = urlsplit(url).scheme.lower()
    if scheme not in _SAFE_SCHEMES or re.match(r"^[a-zA-Z]:[\\/]", url):
        # a Windows drive letter looks like a scheme: treat it as unsafe, it is not portable anyway
        return None
    return url


def _inline(text: str) -> str:
    """Escape ``text`` and apply the inline markup (code spans first: nothing inside them is markup)."""
    spans: list[str] = []

    def _keep(m: re.Match[str]) -> str:
        spans.append(f"<code>{html.escape(m.group(1))}</code>")
        return f"\x00{len(spans) - 1}\x00"

    text = _CODE_SPAN.sub(_keep, text)
    out = html.escape(text, quote=True)

    def _image(m: re.Match[str]) -> str:
        url = _safe_url(m.group(2))
        if url is None:
            return m.group(0)
        return f'<img src="{html.escape(url, quote=True)}" alt="{m.group(1)}">'

    def _link(m: re.Match[str]) -> str:
        url = _safe_url(m.group(2))
        if url is None:
            return m.group(1)
        return f'<a href="{html.escape(url, quote=True)}">{m.group(1)}</a>'

    out = _IMAGE.sub(_image, out)
    out = _LINK.sub(_link, out)
    out = _BOLD.sub(r"<strong>\1</strong>", out)
    out = _ITALIC.sub(lambda m: f"<em>{m.group(1) or m.group(2)}</em>", out)
    return re.sub(r"\x00(\d+)\x00", lambda m: spans[int(m.group(1))], out)


def markdown_to_html(text: str, *, heading_offset: int = 0) -> str:
    """Convert the Markdown subset to HTML, escaping everything else.

    Supported: ATX headings (``#``), paragraphs (blank-line separated), ``-``/``*``/``+``
    and numbered lists (one level), fenced code blocks, horizontal rules, ``**bold**``,
    ``*italic*``/``_italic_``, ```code```, ``[text](url)`` and ``![alt](src)``.
    Anything else (raw HTML included) is shown as text. ``heading_offset`` demotes
    headings (a section's ``#`` becomes ``<h3>`` under the section's ``<h2>``).
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out: list[str] = []
    para: list[str] = []
    list_kind: str | None = None
    i = 0

    def flush_para() -> None:
        if para:
            out.append(f"<p>{_inline(' '.join(s.strip() for s in para))}</p>")
            para.clear()

    def close_list() -> None:
        nonlocal list_kind
        if list_kind:
            out.append(f"</{list_kind}>")
            list_kind = None

    while i < len(lines):
        line = lines[i]
        if _FENCE.match(line):
            flush_para()
            close_list()
            fence = _FENCE.match(line).group(1)  # type: ignore[union-attr]
            body: list[str] = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence):
                body.append(lines[i])
                i += 1
            out.append(f"<pre><code>{html.escape(chr(10).join(body))}</code></pre>")
            i += 1
            continue
        if not line.strip():
            flush_para()
            close_list()
        elif m := _HEADING.match(line):
            flush_para()
            close_list()
            level = min(6, len(m.group(1)) + heading_offset)
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
        elif _RULE.match(line) and not para:
            close_list()
            out.append("<hr>")
        elif (m := _ULIST.match(line)) or (m2 := _OLIST.match(line)):
            flush_para()
            kind = "ul" if m else "ol"
            item = (m or m2).group(1)  # type: ignore[union-attr]
            if list_kind != kind:
                close_list()
                out.append(f"<{kind}>")
                list_kind = kind
            out.append(f"<li>{_inline(item)}</li>")
        elif list_kind and line.startswith((" ", "\t")):
            # continuation of the previous list item
            out[-1] = out[-1][: -len("</li>")] + " " + _inline(line.strip()) + "</li>"
        else:
            close_list()
            para.append(line)
        i += 1
    flush_para()
    close_list()
    return "\n".join(out)


# ---------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 70rem; margin: 2rem auto;
       padding: 0 1rem; line-height: 1.5; color: #1a1a1a; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .2rem; margin-top: 2.5rem; }
pre { background: #f6f8fa; padding: .8rem; overflow-x: auto; font-size: .85rem; line-height: 1.3; }
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
            body.append(f"<pre>{html.escape(table.rstrip())}</pre>")
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
