"""A token-level view of the pool: one self-contained HTML page (no server, no script, no external file).

For a few samples of the pool, every response token is one ``<span class="tok">``: its background is its score
(base loss - reference loss; blue = positive, the reference learnt it; magenta = negative), its underline its
ground-truth class (embedded world), and radio buttons at the top (pure CSS) strike through the tokens the
chosen selection dropped: a mask's, or an online run's (a token it weighted below 0.5 on average, see
:func:`tokenclean.report.quality.load_kept`). Hovering a token shows its score, class and which selections kept it
(with the online runs' weights). Samples are picked
deterministically: in the embedded world, in turn one with corrupted tokens, one with garbage, one with novel
tokens (knowledge only the pool holds) and one clean, each the first of its kind not yet shown; otherwise the
first samples of the pool. Own data's samples are headed by the id of their record (``tokenclean data``).
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import numpy as np

from tokenclean.artifacts import TokenTable, atomic_file
from tokenclean.data import TOKEN_CLASSES
from tokenclean.report.figures import CLASS_COLORS

POSITIVE, NEGATIVE = (31, 119, 180), (197, 27, 125)


def pick_samples(table: TokenTable, n: int) -> list[int]:
    """Sample indices to show (see module docstring)."""
    n = min(n, table.n_samples)
    token_class = table.token_classes()
    if token_class is None:
        return list(range(n))
    shown_first = [TOKEN_CLASSES.index(c) for c in ("corrupted", "garbage", "novel")]
    kinds: list[list[int]] = [[] for _ in range(len(shown_first) + 1)]  # ... then clean
    for i in range(table.n_samples):
        c = token_class[table.offsets[i]:table.offsets[i + 1]]
        kinds[next((k for k, cls in enumerate(shown_first) if np.any(c == cls)), len(shown_first))].append(i)
    picked: list[int] = []
    while len(picked) < n:
        for k in kinds:
            if k and len(picked) < n:
                picked.append(k.pop(0))
    return sorted(picked)


def token_texts(tok: Any, ids: list[int]) -> list[str]:
    """The text each token adds to the decoded sample (spaces included, as the tokenizer writes them)."""
    out, prev = [], ""
    for i in range(len(ids)):
        cur = tok.decode(ids[:i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out.append(cur[len(prev):] if cur.startswith(prev) else tok.decode([ids[i]], skip_special_tokens=False))
        prev = cur
    return out


def _css_color(score: float, scale: float) -> str:
    rgb = POSITIVE if score >= 0 else NEGATIVE
    alpha = min(1.0, abs(score) / scale) * 0.85 if scale > 0 else 0.0
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.2f})"


def render(samples: list[dict[str, Any]], masks: list[str], title: str, scale: float) -> str:
    """The page: ``samples`` = [{"index", "id" (optional: the user's id of the record), "prompt", "tokens":
    [{"text", "score", "class", "kept": [bool per
    selection], "weight": [an online run's weight, else None, per selection] (optional)}]}]."""
    esc = html.escape
    default = next((i for i, m in enumerate(masks) if m.startswith("fixed")), 0)
    css = ["body{font-family:system-ui,sans-serif;max-width:70em;margin:1.5em auto;padding:0 1em;color:#222}",
           ".sample{border:1px solid #ddd;border-radius:6px;padding:.6em .9em;margin:.8em 0}",
           ".prompt{color:#666;font-family:monospace;white-space:pre-wrap;margin-bottom:.3em}",
           ".resp{font-family:monospace;font-size:15px;line-height:2.1}",
           ".tok{white-space:pre-wrap;padding:1px 0;border-bottom:3px solid transparent}",
           "label{margin-right:1em;white-space:nowrap}", ".legend span{margin-right:1.2em}",
           "input.mask{margin-left:.2em}"]
    css += [f".c-{c}{{border-bottom-color:{CLASS_COLORS[c]}}}" for c in TOKEN_CLASSES]
    css += [f"#m{i}:checked ~ main .tok:not(.k{i}){{text-decoration:line-through;opacity:.35}}"
            for i in range(len(masks))]
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{esc(title)}</title>",
             "<style>\n" + "\n".join(css) + "\n</style>\n</head>\n<body>", f"<h1>{esc(title)}</h1>",
             "<p>Each response token is coloured by its score = loss(base) − loss(reference): "
             f"<span style=\"background:{_css_color(scale, scale)}\">blue</span> where the reference learnt it "
             f"(positive), <span style=\"background:{_css_color(-scale, scale)}\">magenta</span> where it is worse "
             f"on it (negative); full colour at |score| ≥ {scale:.2f} nats. Choose a mask: the tokens it dropped are "
             "struck through. Hover over a token for its score, class and the masks that kept it.</p>"]
    if any(t["class"] for s in samples for t in s["tokens"]):
        parts.append("<p class=\"legend\">Underline = ground-truth class: " + "".join(
            f"<span class=\"c-{c}\" style=\"border-bottom:3px solid {CLASS_COLORS[c]}\">{c}</span>"
            for c in TOKEN_CLASSES) + "</p>")
    # the radio inputs are siblings of <main>, so the CSS rules above can strike tokens through
    parts.append("<span class=\"controls\">Mask:</span>")
    for i, m in enumerate(masks):
        parts.append(f"<input type=\"radio\" class=\"mask\" name=\"mask\" id=\"m{i}\""
                     f"{' checked' if i == default else ''}><label for=\"m{i}\">{esc(m)}</label>")
    parts.append("<input type=\"radio\" class=\"mask\" name=\"mask\" id=\"mnone\""
                 f"{'' if masks else ' checked'}><label for=\"mnone\">none (every token)</label>")
    body = ["<main>"]
    for s in samples:
        header = f" (id {esc(s['id'])})" if s.get("id") is not None else ""
        body.append(f"<div class=\"sample\" id=\"sample-{s['index']}\"><div class=\"prompt\">sample {s['index']}"
                    f"{header}: {esc(s['prompt'])}</div><div class=\"resp\">")
        spans = []
        for t in s["tokens"]:
            # a selection's name, with the online run's weight for this token where it has one
            named = [m + (f" ({w:.2f})" if w is not None else "")
                     for m, w in zip(masks, t.get("weight", [None] * len(masks)))]
            kept = [n for n, k in zip(named, t["kept"]) if k]
            dropped = [n for n, k in zip(named, t["kept"]) if not k]
            tip = (f"score {t['score']:+.3f}" + (f" | class {t['class']}" if t["class"] else "")
                   + f" | kept by: {', '.join(kept) or '-'} | dropped by: {', '.join(dropped) or '-'}")
            cls = " ".join(["tok"] + ([f"c-{t['class']}"] if t["class"] else [])
                           + [f"k{i}" for i, k in enumerate(t["kept"]) if k])
            spans.append(f"<span class=\"{cls}\" style=\"background:{_css_color(t['score'], scale)}\" "
                         f"title=\"{esc(tip)}\">{esc(t['text']) or '&#183;'}</span>")
        body.append("".join(spans) + "</div></div>")
    body.append("</main>")
    return "\n".join(parts + body + ["</body>\n</html>\n"])


def write_token_view(tokens: str | os.PathLike, base_loss: str | os.PathLike, ref_loss: str | os.PathLike,
                     masks: list[str | os.PathLike], tokenizer: str, out_html: str | os.PathLike,
                     n_samples: int = 12, trust_remote_code: bool = False, revision: str | None = None) -> list[int]:
    """Write the page for ``n_samples`` samples of ``tokens``; returns the sample indices shown (``revision``
    pins a hub tokenizer)."""
    from tokenclean.models import hub_commit
    from tokenclean.report.quality import KEPT_THRESHOLD, load_kept
    from tokenclean.selection import load_losses, scores
    from tokenclean.tokenization import load_tokenizer

    if n_samples < 1:
        raise ValueError(f"samples must be at least 1, got {n_samples}")
    table, meta = TokenTable.load(tokens)
    base, ref, _ = load_losses(tokens, meta, table, base_loss, ref_loss)
    score = scores(base, ref, table.loss_mask)
    keeps, names, online = [], [], []
    for path in masks:
        name, kept, record = load_kept(path, tokens, meta, table)
        keeps.append(kept)
        names.append(name)
        online.append(record == "weights")
    token_class = table.extras.get("token_class")
    tok = load_tokenizer(tokenizer, trust_remote_code, hub_commit(tokenizer, revision))
    picked = pick_samples(table, n_samples)
    samples = []
    for i in picked:
        a, b = int(table.offsets[i]), int(table.offsets[i + 1])
        ids = [int(x) for x in table.input_ids[a:b]]
        texts = token_texts(tok, ids)
        resp = np.flatnonzero(table.loss_mask[a:b])
        first = int(resp[0]) if resp.size else len(ids)
        record_id = table.extras.get("record_id")
        samples.append({"index": i, "id": None if record_id is None else str(record_id[i]),
                        "prompt": "".join(texts[:first]), "tokens": [
            {"text": texts[p], "score": float(score[a + p]),
             "class": (TOKEN_CLASSES[int(token_class[a + p])]
                       if token_class is not None and token_class[a + p] >= 0 else ""),
             "kept": [bool(k[a + p] >= KEPT_THRESHOLD) for k in keeps],
             "weight": [float(k[a + p]) if o else None for k, o in zip(keeps, online)]} for p in resp]})
    shown = np.array([t["score"] for s in samples for t in s["tokens"]])
    scale = float(np.quantile(np.abs(shown), 0.9)) if shown.size else 1.0
    page = render(samples, names, f"Token view: {len(samples)} samples of {Path(tokens).name}", scale or 1.0)
    with atomic_file(out_html, suffix=".html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return picked
