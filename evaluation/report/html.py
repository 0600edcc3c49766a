"""Small HTML building blocks for the report: escaped text, tables, figures, thumbnail grids, the page shell."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape

# No network: a strict policy makes any accidental remote reference a visible console error, not a fetch.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

CSS = """
:root { --fg: #1d2430; --muted: #5f6b7a; --line: #dde2e8; --bg: #f6f7f9; --blue: #2f6db5; --red: #b8483a; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.5 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--fg);
       background: var(--bg); }
header { background: #fff; border-bottom: 1px solid var(--line); padding: 18px 32px 10px; }
header h1 { margin: 0 0 2px; font-size: 22px; }
header .sub { color: var(--muted); font-size: 13px; }
nav { margin-top: 10px; display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 13px; }
nav a { color: var(--blue); text-decoration: none; }
main { max-width: 1180px; margin: 0 auto; padding: 8px 32px 40px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 16px 22px 18px;
          margin: 18px 0; }
section h2 { margin: 0 0 4px; font-size: 18px; }
section h3 { margin: 16px 0 6px; font-size: 15px; }
p.lead, p.note { color: var(--muted); margin: 2px 0 10px; max-width: 900px; }
p.note.warn { color: var(--red); font-weight: 600; }
p.missing { color: var(--muted); font-style: italic; }
.row { display: flex; flex-wrap: wrap; gap: 18px 28px; align-items: flex-start; }
figure { margin: 6px 0; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 12px; margin-top: 2px; max-width: 560px; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
.scroll { overflow-x: auto; max-width: 100%; }
td.nowrap { white-space: nowrap; }
th small { display: block; font-weight: 400; color: var(--muted); }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: #fafbfc; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.best { font-weight: 700; color: var(--blue); }
tr.total td { font-weight: 700; border-top: 2px solid var(--line); }
tr.grp td { border-top: 2px solid #c5ccd6; }
.kpis { display: flex; flex-wrap: wrap; gap: 10px; margin: 12px 0 0; }
.kpi { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 6px 12px; min-width: 120px; }
.kpi b { display: block; font-size: 18px; }
.kpi span { color: var(--muted); font-size: 12px; }
.grid { display: flex; flex-wrap: wrap; gap: 8px; }
.thumb { width: 96px; text-align: center; font-size: 11px; color: var(--muted); }
.thumb img { width: 88px; height: 88px; object-fit: contain; background: #000; border: 2px solid transparent;
             border-radius: 4px; image-rendering: pixelated; }
.thumb.photo img { image-rendering: auto; background: #fff; }
.thumb.mark img { border-color: var(--blue); }
.thumb.warn img { border-color: var(--red); }
.groups { display: flex; flex-wrap: wrap; gap: 10px; }
.group { border: 1px solid var(--line); border-radius: 6px; padding: 6px 8px 4px; }
.group .title { font-size: 12px; color: var(--muted); margin-bottom: 4px; }
.badge { display: inline-block; font-size: 11px; padding: 0 6px; border-radius: 9px; background: #eef2f7; }
.state-completed { color: #2e7d4f; } .state-failed { color: var(--red); } .state-pending, .state-partial { color: var(--muted); }
footer { color: var(--muted); font-size: 12px; text-align: center; padding: 10px; }
"""


def esc(x: object) -> str:
    return escape(str(x), quote=True)


def fmt_num(x: object, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 1000):
        return f"{int(x):,}"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return esc(x)


def table(header: Sequence[str], rows: Iterable[Sequence[object]], numeric: Sequence[bool] | None = None,
          row_classes: Sequence[str] | None = None, cell_classes: Sequence[Sequence[str]] | None = None) -> str:  # fmt: skip
    numeric = numeric or [False] * len(header)
    head = "".join(f'<th class="num">{_cell(h)}</th>' if n else f"<th>{_cell(h)}</th>" for h, n in zip(header, numeric, strict=True))
    body = []
    for i, r in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = []
        for j, (v, n) in enumerate(zip(r, numeric, strict=True)):
            extra = cell_classes[i][j] if cell_classes else ""
            classes = " ".join(c for c in ("num" if n else "", extra) if c)
            text = fmt_num(v) if n else _cell(v)
            cells.append(f'<td class="{classes}">{text}</td>' if classes else f"<td>{text}</td>")
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _cell(v: object) -> str:
    return v.html if isinstance(v, Raw) else esc(v)


@dataclass(frozen=True)
class Raw:
    """Trusted HTML (built by these helpers) to put in a table cell."""

    html: str


def figure(uri: str, alt: str, caption: str = "", width: int | None = None) -> str:
    style = f' style="width:{width}px"' if width else ""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure{style}><img src="{uri}" alt="{esc(alt)}">{cap}</figure>'


def thumb(uri: str, label: str, title: str = "", cls: str = "") -> str:
    return (f'<div class="thumb {cls}" title="{esc(title or label)}"><img src="{uri}" alt="{esc(title or label)}">'
            f"<div>{esc(label)}</div></div>")  # fmt: skip


def grid(items: Iterable[str]) -> str:
    return f'<div class="grid">{"".join(items)}</div>'


def kpis(items: Iterable[tuple[str, str]]) -> str:
    return '<div class="kpis">' + "".join(f'<div class="kpi"><b>{esc(v)}</b><span>{esc(k)}</span></div>' for k, v in items) + "</div>"


def section(sid: str, title: str, lead: str, body: str) -> str:
    lead_html = f'<p class="lead">{esc(lead)}</p>' if lead else ""
    return f'<section id="{esc(sid)}"><h2>{esc(title)}</h2>{lead_html}{body}</section>'


def missing(text: str) -> str:
    return f'<p class="missing">{esc(text)}</p>'


def page(title: str, subtitle: str, nav: Sequence[tuple[str, str]], body: str, footer: str, kpi_html: str = "") -> str:
    links = "".join(f'<a href="#{esc(i)}">{esc(t)}</a>' for i, t in nav)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style></head>
<body><header><h1>{esc(title)}</h1><div class="sub">{esc(subtitle)}</div>{kpi_html}<nav>{links}</nav></header>
<main>{body}</main><footer>{esc(footer)}</footer></body></html>
"""
