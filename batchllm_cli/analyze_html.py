"""The `analyze --html` page: one self-contained file (inline CSS, JS and SVG) with the numbers and an
icicle chart of the prefix tree. No analysis happens here."""
from __future__ import annotations

import html
import json
import math
from typing import Any

from batchllm_cli import __version__
from batchllm_cli.analyze_types import AnalyzeReport, IcicleNode
from batchllm_cli.analyze_report import failures_line, group_line, one_line, pct, split_prefix


def shorten(text: str, width: int = 72) -> str:
    """`text` on one line, at most `width` characters: its start and its end around an ellipsis
    (nested prefixes start alike; their ends tell them apart)."""
    flat = one_line(text)
    if len(flat) <= width:
        return flat
    tail = max(8, width // 3)
    head = width - tail - 3
    return f"{flat[:head].rstrip()} … {flat[-tail:].lstrip()}"


def si(n: float) -> str:
    """1234567 -> '1.2M' (chart labels)."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


_CHART_W = 1100
_CHART_H = 420
_PALETTE = (210, 28, 150, 340, 265, 45, 185, 0, 95, 300)  # hues per top-level branch


def _icicle_layout(r: AnalyzeReport) -> tuple[list[dict[str, Any]], float]:
    """Boxes (x, y, w, h in chart units) for the kept trie nodes and their hidden remainders.

    x: rows (the root spans the full width), y: token depth. Kept children are laid out left to
    right under their parent in trie order; the parent's other rows (ending there, or in subtrees
    not drawn) follow as one gray box whose height is their unique tokens per row.
    """
    nodes = list(r.icicle)
    if not nodes or nodes[0].rows == 0:
        return [], 1.0
    by_id = {n.node: n for n in nodes}
    children: dict[int, list[IcicleNode]] = {}
    for n in nodes:
        if n.parent in by_id:
            children.setdefault(n.parent, []).append(n)
    root = nodes[0]
    depth_max = 1.0
    for n in nodes:
        tail = n.hidden_tokens / n.hidden_rows if n.hidden_rows else 0.0
        depth_max = max(depth_max, n.depth_end + tail)
    scale_x = _CHART_W / root.rows
    scale_y = _CHART_H / depth_max
    boxes: list[dict[str, Any]] = []
    top_branch: dict[int, int] = {}

    def place(n: IcicleNode, x: float, branch: int) -> None:
        w = n.rows * scale_x
        if n is not root:
            top_branch[n.node] = branch
            y0, y1 = n.depth_start * scale_y, n.depth_end * scale_y
            boxes.append({
                "kind": "node", "node": n.node, "parent": n.parent, "x": x, "y": y0, "w": w,
                "h": max(y1 - y0, 2.0), "rows": n.rows, "d0": n.depth_start, "d1": n.depth_end,
                "text": n.text, "branch": branch,
            })
        cx = x
        kids = children.get(n.node, [])
        for i, c in enumerate(kids):
            # Hues tell apart the subtrees of the first node that branches; above it, one neutral.
            place(c, cx, i if branch < 0 and len(kids) > 1 else branch)
            cx += c.rows * scale_x
        if n.hidden_rows:
            avg = n.hidden_tokens / n.hidden_rows
            boxes.append({
                "kind": "rest", "node": n.node, "x": cx, "y": n.depth_end * scale_y, "w": n.hidden_rows * scale_x,
                "h": max(avg * scale_y, 1.0 if avg else 0.0), "rows": n.hidden_rows, "tokens": n.hidden_tokens,
                "d0": n.depth_end, "branch": branch,
            })

    place(root, 0.0, -1)
    return boxes, depth_max


def _color(box_: dict[str, Any], depth_max: float) -> str:
    if box_["kind"] == "rest":
        return "url(#rest)"
    light = 40 + 32 * min(1.0, box_["d0"] / max(depth_max, 1.0))
    if box_["branch"] < 0:
        return f"hsl(215,22%,{light:.0f}%)"
    hue = _PALETTE[box_["branch"] % len(_PALETTE)]
    return f"hsl({hue},58%,{light:.0f}%)"


def _svg(r: AnalyzeReport) -> tuple[str, list[dict[str, Any]]]:
    boxes, depth_max = _icicle_layout(r)
    parts = [
        f'<svg id="icicle" viewBox="-54 -4 {_CHART_W + 60} {_CHART_H + 30}" width="100%" role="img" '
        'aria-label="Icicle chart of the prefix tree: width is rows, depth is tokens">',
        '<defs><pattern id="rest" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="6" height="6" fill="#eceff3"/>'
        '<line x1="0" y1="0" x2="0" y2="6" stroke="#d3d8df" stroke-width="3"/></pattern></defs>',
    ]
    # Depth axis (tokens).
    step = _nice_step(depth_max / 6)
    t = 0.0
    while t <= depth_max + 1e-9:
        y = t * _CHART_H / depth_max
        parts.append(f'<line class="grid" x1="0" x2="{_CHART_W}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="axis" x="-8" y="{y + 4:.1f}" text-anchor="end">{si(t)}</text>')
        t += step
    parts.append(
        f'<text class="axis" transform="translate(-44,{_CHART_H / 2:.0f}) rotate(-90)" text-anchor="middle">tokens</text>'
    )
    data = []
    for i, b in enumerate(boxes):
        if b["w"] < 0.4:
            continue  # narrower than a pixel: counted in the numbers, not drawn
        cls = "node" if b["kind"] == "node" else "rest"
        if b["kind"] == "node":
            title = f"{b['rows']:,} rows share tokens {b['d0']:,}–{b['d1']:,}: {shorten(b['text'], 160)}"
        else:
            title = f"{b['rows']:,} rows continue with {b['tokens']:,} unshared tokens in all (not drawn)"
        parts.append(
            f'<rect class="{cls}" data-i="{len(data)}" x="{b["x"]:.2f}" y="{b["y"]:.2f}" width="{max(b["w"] - 0.6, 0.4):.2f}" '
            f'height="{b["h"]:.2f}" fill="{_color(b, depth_max)}"><title>{html.escape(title)}</title></rect>'
        )
        if b["kind"] == "node" and b["w"] > 70 and b["h"] > 15:
            label = shorten(b["text"], max(6, int(b["w"] / 7)))
            parts.append(
                f'<text class="label" x="{b["x"] + 4:.1f}" y="{b["y"] + 12:.1f}">{html.escape(label)}</text>'
            )
        entry = {"kind": b["kind"], "rows": b["rows"], "d0": b["d0"]}
        if b["kind"] == "node":
            entry.update(d1=b["d1"], text=b["text"], node=b["node"], parent=b["parent"])
        else:
            entry.update(tokens=b["tokens"])
        data.append(entry)
    parts.append("</svg>")
    return "\n".join(parts), data


def _nice_step(raw: float) -> float:
    if raw <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return float(m * mag)
    return float(10 * mag)


def _json_for_script(data: Any) -> str:
    # Inside <script>, "</" would end the element; "<!--" could start a comment state.
    return json.dumps(data, ensure_ascii=False).replace("</", "<\\/").replace("<!--", "<\\!--")


_CSS = """
:root { --ink:#1d2733; --muted:#5b6878; --line:#e3e7ec; --ours:#1a7f4b; --bg:#f7f8fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink); background: var(--bg); }
main { max-width: 1180px; margin: 0 auto; padding: 28px 28px 48px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 30px 0 10px; }
.sub { color: var(--muted); margin: 0 0 20px; overflow-wrap: anywhere; }
.cards { display: grid; grid-template-columns: repeat(5, 1fr); gap: 12px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
.card .v { font-size: 24px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .n { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid var(--line); border-radius: 8px; overflow: hidden; }
th, td { padding: 7px 12px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { font-size: 12px; color: var(--muted); font-weight: 600; text-transform: uppercase; letter-spacing: .03em; background: #fbfcfd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.ours td { color: var(--ours); font-weight: 650; }
.bar { height: 10px; background: #e8ecf1; border-radius: 5px; min-width: 220px; position: relative; }
.bar span { position: absolute; left: 0; top: 0; bottom: 0; border-radius: 5px; background: #8aa4c2; }
tr.ours .bar span { background: var(--ours); }
.chartbox { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px 12px 6px; position: relative; }
svg text.axis { font-size: 11px; fill: var(--muted); }
svg text.label { font-size: 11px; fill: #fff; pointer-events: none; }
svg line.grid { stroke: #eef1f4; }
svg rect { stroke: #fff; stroke-width: .6; cursor: pointer; }
svg rect:hover { stroke: #1d2733; stroke-width: 1.5; }
.legend { color: var(--muted); font-size: 12px; margin: 6px 4px 4px; }
.legend i { display: inline-block; width: 12px; height: 10px; vertical-align: -1px; margin: 0 4px 0 12px; border-radius: 2px; }
#tip { position: absolute; pointer-events: none; background: #1d2733; color: #fff; font-size: 12px; padding: 8px 10px; border-radius: 6px; max-width: 460px; display: none; white-space: pre-wrap; z-index: 2; box-shadow: 0 4px 14px rgba(0,0,0,.2); }
#tip b { color: #9fe3bd; }
#picked { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; margin-top: 10px; }
#picked pre, td pre { margin: 0; white-space: pre-wrap; word-break: break-word; font: 12px/1.45 ui-monospace, SFMono-Regular, Menlo, monospace; }
table.top td pre { max-height: 9em; overflow: auto; }
table.top b { font-weight: 650; color: var(--ink); }
.muted { color: var(--muted); }
.warn { color: #a15c00; }
.hist { display: flex; gap: 6px; align-items: flex-end; height: 90px; padding: 8px 12px 0; background: #fff; border: 1px solid var(--line); border-radius: 8px; }
.hist div { flex: 1; display: flex; flex-direction: column; align-items: center; justify-content: flex-end; height: 100%; font-size: 11px; color: var(--muted); }
.hist div span { display: block; width: 100%; background: #8aa4c2; border-radius: 3px 3px 0 0; min-height: 2px; }
footer { color: var(--muted); font-size: 12px; margin-top: 30px; }
"""

_JS = """
(function () {
  var nodes = JSON.parse(document.getElementById('nodes').textContent);
  var tip = document.getElementById('tip'), box = document.querySelector('.chartbox');
  var picked = document.getElementById('picked-text'), pickedHead = document.getElementById('picked-head');
  var byNode = {};
  nodes.forEach(function (n) { if (n.kind === 'node') byNode[n.node] = n; });
  function fmt(x) { return x.toLocaleString('en-US'); }
  function esc(s) { return s.replace(/[&<>]/g, function (c) { return {'&': '&amp;', '<': '&lt;', '>': '&gt;'}[c]; }); }
  function clip(s, n) { return s.length > n ? s.slice(0, n) + ' \\u2026' : s; }
  function fullText(n) { var parts = []; while (n) { parts.unshift(n.text); n = byNode[n.parent]; } return parts.join(''); }
  function describe(n) {
    if (n.kind === 'rest') return '<b>' + fmt(n.rows) + ' rows</b> go on with unshared tokens (' + fmt(n.tokens) + ' in all) or end here';
    return '<b>' + fmt(n.rows) + ' rows</b> share tokens ' + fmt(n.d0) + '\\u2013' + fmt(n.d1) + ' (' + fmt(n.d1 - n.d0) + ' tokens)\\n' + esc(clip(n.text, 700));
  }
  document.querySelectorAll('#icicle rect[data-i]').forEach(function (r) {
    var n = nodes[+r.getAttribute('data-i')];
    var t = r.querySelector('title'); if (t) t.remove();
    r.addEventListener('mousemove', function (e) {
      var b = box.getBoundingClientRect();
      tip.innerHTML = describe(n); tip.style.display = 'block';
      var x = e.clientX - b.left + 14, y = e.clientY - b.top + 14;
      if (x + tip.offsetWidth > b.width) x = Math.max(0, e.clientX - b.left - tip.offsetWidth - 14);
      tip.style.left = x + 'px'; tip.style.top = y + 'px';
    });
    r.addEventListener('mouseleave', function () { tip.style.display = 'none'; });
    r.addEventListener('click', function () {
      if (n.kind !== 'node') return;
      pickedHead.textContent = fmt(n.rows) + ' rows share these ' + fmt(n.d1) + ' tokens (this box: tokens ' + fmt(n.d0) + '\\u2013' + fmt(n.d1) + '):';
      picked.textContent = fullText(n);
    });
  });
})();
"""


def _prefix_cell(p: Any, context: int = 160, limit: int = 900) -> str:
    """The prefix's text: what it inherits (dimmed, only its end) and its new part (bold)."""
    e = html.escape
    head, new = split_prefix(p.text, p.new_text)
    if len(new) > limit:
        new = new[: limit // 2] + " … " + new[-limit // 2 :]
    shown = ("…" + head[-context:]) if len(head) > context else head
    return f'<pre><span class="muted">{e(shown)}</span><b>{e(new)}</b></pre>'


def render_html(r: AnalyzeReport) -> str:
    """One HTML file: inline CSS, JS and SVG, no external references."""
    e = html.escape
    svg, nodes = _svg(r)
    cards = [
        ("rows", f"{r.rows_planned:,}", failures_line(r) or f"{r.rows:,} in the input"),
        ("prompt tokens", f"{r.prompt_tokens:,}", f"longest {r.max_prompt_tokens:,}"),
        ("unique prompt tokens", f"{r.unique_prompt_tokens:,}", "the least prefill possible"),
        ("sharing ratio", pct(r.sharing_ratio), "1 − unique / prompt"),
        ("shared groups", f"{r.groups.shared_groups:,}", f"{r.groups.rows_in_shared_groups:,} rows in them"),
    ]
    card_html = "".join(
        f'<div class="card"><div class="k">{e(k)}</div><div class="v">{e(v)}</div><div class="n">{e(n)}</div></div>'
        for k, v, n in cards
    )
    rows_html = []
    for key, label, tokens in r.comparison():
        share = tokens / r.prompt_tokens if r.prompt_tokens else 0.0
        cls = ' class="ours"' if key == "plan" else ""
        rows_html.append(
            f"<tr{cls}><td>{e(label)}</td><td class=num>{tokens:,}</td><td class=num>{pct(r.saved_fraction(tokens))}</td>"
            f'<td><div class="bar" title="prefill as a share of all prompt tokens"><span style="width:{100 * share:.2f}%"></span></div></td></tr>'
        )
    top_html = "".join(
        f"<tr><td class=num>{i}</td><td class=num>{p.rows:,}</td><td class=num>{p.tokens:,}</td>"
        f"<td class=num>{p.new_tokens:,}</td><td class=num>{p.saved_tokens:,}</td><td>{_prefix_cell(p)}</td></tr>"
        for i, p in enumerate(r.top_prefixes, 1)
    )
    hist = r.groups.histogram
    peak = max((c for _, _, c in hist), default=1)
    hist_html = "".join(
        f'<div title="{c:,} groups of {lo:,}–{hi:,} rows"><span style="height:{max(2.0, 60.0 * c / peak):.0f}px"></span>'
        f"{c:,}<br>{e(f'{lo:,}' if lo == hi else f'{si(lo)}–{si(hi)}')}</div>"
        for lo, hi, c in hist
    )
    errors_html = ""
    if r.rows_failed:
        items = "".join(f"<li>row {x.row}{f' (id {e(str(x.id))})' if r.has_ids else ''}: {e(x.error)}</li>" for x in r.first_errors)
        errors_html = f'<h2>Rows without a prompt</h2><p class="warn">{e(failures_line(r))}</p><ul>{items}</ul>'
    demo = " (the built-in demo model's, not your model's: pass --model or --tokenizer)" if r.demo_model else ""
    sub = (
        f"{r.input} · template {r.template} · tokenizer {r.tokenizer_dir}{demo} · chat template {'on' if r.chat else 'off'} · "
        f"KV block {r.block_size} tokens · LRU cache {r.kv_cache_tokens:,} tokens · max tokens {r.max_tokens:,}"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>batchllm analyze: {e(r.input)}</title>
<style>{_CSS}</style></head>
<body><main>
<h1>Prefix sharing report</h1>
<p class="sub">{e(sub)}</p>
<div class="cards">{card_html}</div>

<h2>Prefill work</h2>
<table class="cmp"><thead><tr><th>strategy</th><th style="text-align:right">prefill tokens</th><th style="text-align:right">saved</th><th>prefill / prompt tokens</th></tr></thead>
<tbody>{''.join(rows_html)}</tbody></table>

<h2>Prefix tree</h2>
<div class="chartbox">
{svg}
<div class="legend">Each box is a run of tokens shared by the rows below it: <b>width = rows</b>, <b>depth = tokens</b> (the {sum(1 for n in nodes if n["kind"] == "node"):,} largest of {r.trie_nodes:,} prefix-tree nodes).
<i style="background:hsl(215,22%,45%)"></i>shared by all its rows <i style="background:hsl(210,58%,50%)"></i><i style="background:hsl(28,58%,50%);margin-left:0"></i>one color per branch <i style="background:#e3e7ec"></i>rows that go on with tokens of their own (height: unshared tokens per row). Hover for the text; click to show the whole prefix.</div>
<div id="tip"></div>
</div>
<div id="picked"><div id="picked-head" class="muted">Click a box to see the whole prefix it ends.</div><pre id="picked-text"></pre></div>

<h2>Largest shared prefixes</h2>
<p class="muted">Ranked by the prefill each saves: its new tokens (those past the shorter shared prefix it extends, in bold) computed once instead of once per row.</p>
<table class="top"><thead><tr><th>#</th><th style="text-align:right">rows</th><th style="text-align:right">tokens</th><th style="text-align:right">new</th><th style="text-align:right">saved</th><th>text</th></tr></thead>
<tbody>{top_html or '<tr><td colspan=6 class="muted">no prefix is shared by two rows</td></tr>'}</tbody></table>

<h2>Group sizes</h2>
<p class="muted">{e(group_line(r.groups))}. BatchLLM's single-level plan: {e(group_line(r.batchllm_groups))}.</p>
{f'<div class="hist">{hist_html}</div>' if hist_html else ''}
{errors_html}
<footer>batchllm {e(__version__)} · {r.trie_nodes:,} trie nodes · planned {r.plan_mode} in {r.total_s:.1f} s (tokenize {r.tokenize_s:.1f} s, of which LRU simulation {r.lru_s:.1f} s; plan {r.plan_s:.1f} s; report {r.report_s:.1f} s)</footer>
</main>
<script type="application/json" id="nodes">{_json_for_script(nodes)}</script>
<script>{_JS}</script>
</body></html>
"""
