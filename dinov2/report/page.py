"""The report page as data (sections of text, tables and pictures) and its two renderings.

Markdown references its pictures as files in ``figures/``; the HTML page carries them as base64 data URIs
and its style inline, so the one file opens anywhere (MLflow's artifact viewer, a mail attachment) with
nothing else to fetch. Text may hold ``code`` and **bold** spans, rendered in both.
"""

import base64
import html
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dinov2.atomic import output_folder, write_json

FIGURES = "figures"


@dataclass
class Text:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Picture:
    name: str  # file stem under figures/, unique in the page
    png: bytes
    caption: str


@dataclass
class Gallery:
    """Pictures next to each other (wrapping to the next line when the page is too narrow)."""

    pictures: list[Picture]


Block = Text | Table | Picture | Gallery


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Page:
    title: str
    notes: list[str]  # lines under the title: what was read, what is missing
    sections: list[Section]

    def pictures(self) -> Iterator[Picture]:
        for section in self.sections:
            for block in section.blocks:
                if isinstance(block, Picture):
                    yield block
                elif isinstance(block, Gallery):
                    yield from block.pictures


def render_markdown(page: Page) -> str:
    lines = [f"# {page.title}", ""]
    lines += [f"{note}  " for note in page.notes]
    for section in page.sections:
        lines += ["", f"## {section.title}"]
        for block in section.blocks:
            lines.append("")
            if isinstance(block, Text):
                lines.append(block.text)
            elif isinstance(block, Table):
                lines += _markdown_table(block.header, block.rows)
            elif isinstance(block, Picture):
                lines += [f"![{block.caption}]({FIGURES}/{block.name}.png)", "", f"*{block.caption}*"]
            else:
                # A one-row table puts the pictures side by side, each under its caption.
                images = [f"![{p.caption}]({FIGURES}/{p.name}.png)" for p in block.pictures]
                lines += _markdown_table([p.caption for p in block.pictures], [images])
    return "\n".join(lines) + "\n"


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def row(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"

    return [row(header), "|" + "---|" * len(header), *(row(cells) for cells in rows)]


# Cells right-aligned in HTML tables: numbers, shares, "2 of 6 (33.3%)", "9.1% \u2192 0.0%", "+4.0 pts", a dash.
_NUMBER = re.compile(r"^(?=.*\d)[\d\s.,%()+\-*\u2192]*(?:of|pts)?[\d\s.,%()+\-*\u2192]*$|^\u2014$")


def _inline(text: str) -> str:
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _html_picture(picture: Picture) -> str:
    caption = _inline(picture.caption)
    return (
        f'<figure><img src="{_data_uri(picture.png)}" alt="{html.escape(picture.caption)}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _html_table(table: Table) -> str:
    header = "".join(f"<th>{_inline(cell)}</th>" for cell in table.header)
    rows = []
    for cells in table.rows:
        tds = "".join(
            f'<td class="num">{_inline(cell)}</td>' if _NUMBER.match(cell) else f"<td>{_inline(cell)}</td>"
            for cell in cells
        )
        rows.append(f"<tr>{tds}</tr>")
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328; margin: 0;
       background: #f6f8fa; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 32px 48px; background: white; }
h1 { font-size: 26px; margin: 0 0 8px; }
h2 { font-size: 20px; margin: 32px 0 12px; padding-bottom: 4px; border-bottom: 2px solid #d0d7de; }
p { line-height: 1.5; margin: 8px 0; }
p.note { color: #57606a; font-size: 14px; margin: 2px 0; }
code { background: #eff1f3; padding: 1px 4px; border-radius: 4px; font-size: 90%; }
table { border-collapse: collapse; margin: 12px 0; font-size: 14px; }
th, td { border: 1px solid #d0d7de; padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: #f3f4f6; }
tbody tr:nth-child(even) { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
figure { margin: 8px 16px 8px 0; display: inline-block; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eaeef2; }
figcaption { font-size: 13px; color: #57606a; margin-top: 4px; max-width: 640px; }
.gallery { display: flex; flex-wrap: wrap; align-items: flex-start; }
"""


def render_html(page: Page) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(page.title)}</title>",
        f"<style>{STYLE}</style></head><body><main>",
        f"<h1>{html.escape(page.title)}</h1>",
        *(f'<p class="note">{_inline(note)}</p>' for note in page.notes),
    ]
    for section in page.sections:
        parts.append(f"<section><h2>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Text):
                parts.append(f"<p>{_inline(block.text)}</p>")
            elif isinstance(block, Table):
                parts.append(_html_table(block))
            elif isinstance(block, Picture):
                parts.append(_html_picture(block))
            else:
                parts.append(f'<div class="gallery">{"".join(map(_html_picture, block.pictures))}</div>')
        parts.append("</section>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def write_report(page: Page, metrics: dict[str, float], out: Path) -> Path:
    """``report.md``, ``report.html``, ``figures/`` and ``metrics.json`` in ``out``, written under
    ``.<out>.partial`` and renamed when complete, so a failed run never leaves a page that looks finished."""
    with output_folder(out, (FIGURES,)) as partial:
        for picture in page.pictures():
            (partial / FIGURES / f"{picture.name}.png").write_bytes(picture.png)
        (partial / "report.md").write_text(render_markdown(page))
        (partial / "report.html").write_text(render_html(page))
        write_json(metrics, partial / "metrics.json")
    return Path(out)
