"""A search drawn as a picture: one self-contained HTML page, no scripts, no external assets.

Each search becomes a row of columns, one per step; each column lists that step's candidates
(the chunk they added, their score, whether they survived or finished) and the chosen path is
highlighted from the first chunk to the answer. Reading it answers the question users ask
first: why did the search pick this answer over that one?
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from proxy.search import Candidate, SearchResult

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#1d2330;background:#f6f7fb}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 4px}
.meta{color:#5a6275;font-size:13px;margin-bottom:10px}
.prompt,.answer{background:#fff;border:1px solid #d9dce6;border-radius:6px;padding:8px 10px;
 white-space:pre-wrap;font-size:13px;margin:6px 0;max-width:1100px}
.answer{border-color:#2f7d32;border-width:2px}
.tree{display:flex;gap:10px;overflow-x:auto;padding-bottom:8px;align-items:flex-start}
.step{min-width:220px;max-width:240px;flex:0 0 auto}
.step h3{font-size:12px;text-transform:uppercase;letter-spacing:.05em;color:#5a6275;margin:0 0 6px}
.node{background:#fff;border:1px solid #d9dce6;border-radius:6px;padding:6px 8px;margin-bottom:6px;font-size:12px}
.node.pruned{opacity:.55}
.node.kept{border-color:#3b6fd8}
.node.chosen{border:2px solid #2f7d32;background:#eef8ee}
.node .head{display:flex;justify-content:space-between;font-weight:600;margin-bottom:3px}
.node .chunk{white-space:pre-wrap;font-family:ui-monospace,Menlo,monospace;font-size:11.5px}
.tag{font-size:10px;border-radius:3px;padding:0 4px;margin-left:4px;color:#fff}
.tag.fin{background:#8a5cd6}.tag.kept{background:#3b6fd8}.tag.chosen{background:#2f7d32}.tag.pruned{background:#9aa0ad}
.legend{font-size:12px;color:#5a6275}
"""


@dataclass
class TracedSearch:
    title: str
    prompt: str
    result: SearchResult


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _score(c: Candidate) -> str:
    return "—" if c.score is None else f"{c.score:+.3f}"


def _node(c: Candidate, on_path: set[int], chosen: int) -> str:
    classes = ["node", "kept" if c.survived else "pruned"]
    tags = []
    if c.id == chosen:
        classes.append("chosen")
        tags.append('<span class="tag chosen">chosen</span>')
    elif c.id in on_path:
        classes.append("chosen")
    tags.append('<span class="tag kept">kept</span>' if c.survived else '<span class="tag pruned">pruned</span>')
    if c.finished:
        tags.append('<span class="tag fin">finished</span>')
    parent = "" if c.parent in (None, 0) else f" ← #{c.parent}"
    return (f'<div class="{" ".join(classes)}" id="n{c.id}"><div class="head"><span>#{c.id}{parent}</span>'
            f'<span>{_score(c)}{"".join(tags)}</span></div>'
            f'<div class="chunk">{escape(c.chunk) or "<i>(empty)</i>"}</div></div>')


def _search_section(t: TracedSearch) -> str:
    r = t.result
    on_path = set(r.path)
    cols = []
    for s in r.steps:
        nodes = "".join(_node(c, on_path, r.chosen) for c in s.candidates)
        carried = "".join(_node(r.nodes[i], on_path, r.chosen) for i in s.carried)
        if carried:
            nodes += f'<div class="legend">carried, not expanded:</div>{carried}'
        cols.append(f'<div class="step"><h3>step {s.step} · {len(s.candidates)} new · '
                    f'{_plural(s.calls, "call")}</h3>{nodes}</div>')
    score = "n/a" if r.score is None else f"{r.score:+.3f}"
    meta = (f"mode {escape(r.mode)} · score {score} · {'finished' if r.finished else 'unfinished'} · "
            f"{_plural(len(r.steps), 'step')} · {_plural(r.calls, 'upstream call')} · {r.usage.prompt_tokens} prompt + "
            f"{r.usage.completion_tokens} completion tokens · {r.wall_s:.2f}s")
    return (f'<section><h2>{escape(t.title)}</h2><div class="meta">{meta}</div>'
            f'<div class="prompt"><b>prompt</b>\n{escape(t.prompt)}</div>'
            f'<div class="tree">{"".join(cols)}</div>'
            f'<div class="answer"><b>answer</b>\n{escape(r.text)}</div></section>')


def render_trace(searches: Sequence[TracedSearch], title: str = "w2s search trace") -> str:
    body = "".join(_search_section(t) for t in searches)
    legend = ('<div class="legend">One column per step. Blue: kept for the next step; grey: pruned; '
              'green: the chosen path; purple tag: the beam finished.</div>')
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{_CSS}</style></head><body><h1>{escape(title)}</h1>{legend}{body}</body></html>")
