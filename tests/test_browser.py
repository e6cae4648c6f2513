"""The token view in a real browser (headless Chromium): choosing a mask strikes exactly the tokens that mask
dropped, hovering a token shows its numbers, and the page loads nothing from outside its file. The report's
page (`snakemake --report`) is checked the same way in test_workflow.py, on the smoke run."""
from __future__ import annotations

import numpy as np
import pytest

from tests.browser import open_page
from tests.test_report import labelled_pool
from tokenclean.artifacts import TokenTable, save_array
from tokenclean.data import TOKEN_CLASSES

pytestmark = pytest.mark.slow  # a browser start per page: about a second each

# What a reader does: click each mask's label (the radio button it names), and look at each token: is it struck
# through as the browser draws it, and what does hovering show (the title attribute is the browser's tooltip).
CHOOSE_EACH_MASK = """
const tokens = [...document.querySelectorAll('main .tok')];
const struck = () => tokens.map(t => getComputedStyle(t).textDecorationLine.includes('line-through'));
const out = {initial: struck(), titles: tokens.map(t => t.getAttribute('title')), texts: tokens.map(t => t.textContent),
             options: []};
for (const input of document.querySelectorAll('input[name=mask]')) {
  const label = document.querySelector(`label[for="${input.id}"]`);
  label.click();
  out.options.push({label: label.textContent, checked: input.checked, struck: struck()});
}
return out;
"""


def test_the_probe_sees_what_a_page_loads_from_outside(tmp_path):
    """The check itself: a page that reaches outside its file is caught, by reference and by attempt."""
    page = tmp_path / "leaky.html"
    page.write_text("<!DOCTYPE html><html><head><link rel=\"stylesheet\" href=\"https://cdn.example.org/x.css\">"
                    "<style>body{background:url(http://example.org/bg.png)}</style></head><body>"
                    "<img src=\"https://example.org/a.png\"><img src=\"data:image/gif;base64,R0lGODlhAQABAAAAACw=\">"
                    "<script src=\"https://example.org/app.js\"></script></body></html>")
    seen = open_page(page, "return document.images.length;", tmp_path)
    assert seen["result"] == 2
    assert {r.split("=", 1)[-1] for r in seen["external"] if "=" in r} == {
        "https://cdn.example.org/x.css", "https://example.org/a.png", "https://example.org/app.js"}
    assert "css http://example.org/bg.png" in seen["external"]
    assert seen["failed"] or seen["loaded"]  # the browser tried (and, every name resolving to nothing, failed)


def test_choosing_a_mask_strikes_exactly_the_tokens_it_dropped(tmp_path, tiny_tokenizer_dir):
    """Two masks and an online run's weights (struck where weighted below 0.5), in Chromium, against the arrays
    the page was built from; the tooltip of every token has its score, class and who kept or dropped it."""
    from tokenclean.report.token_view import write_token_view
    from tokenclean.tokenization import load_tokenizer

    tokens, base, ref, masks, table = labelled_pool(tmp_path, load_tokenizer(str(tiny_tokenizer_dir)))
    fingerprint = TokenTable.load(tokens)[1]["fingerprint"]
    weights = np.where(table.loss_mask, np.random.default_rng(3).integers(0, 5, table.n_tokens) / 4,
                       np.nan).astype(np.float32)  # 0, .25, .5 (kept: the threshold is inclusive), .75, 1
    record = tmp_path / "models" / "sft" / "rho1_r0.6_s0" / "weights.npy"
    record.parent.mkdir(parents=True)
    save_array(record, weights, {"kind": "weights", "tokens_fingerprint": fingerprint})
    page = tmp_path / "view.html"
    shown = write_token_view(tokens, base, ref, [*masks, record], str(tiny_tokenizer_dir), page, n_samples=4)

    seen = open_page(page, CHOOSE_EACH_MASK, tmp_path)
    assert seen["loaded"] == [] and seen["failed"] == [] and seen["external"] == []
    view = seen["result"]
    positions = np.array([p for i in shown for p in range(table.offsets[i], table.offsets[i + 1])
                          if table.loss_mask[p]])
    assert len(view["titles"]) == len(positions) > 20
    kept = {"full": np.load(masks[0])[positions], "fixed_r0.6": np.load(masks[1])[positions],
            "rho1_r0.6_s0": weights[positions] >= 0.5}
    assert 0 < kept["fixed_r0.6"].sum() < len(positions) and 0 < kept["rho1_r0.6_s0"].sum() < len(positions)
    # the page opens on the fixed-ratio mask; then each choice strikes exactly what it dropped, "none" nothing
    assert view["initial"] == list(~kept["fixed_r0.6"])
    assert [o["label"] for o in view["options"]] == [*kept, "none (every token)"]
    for option in view["options"]:
        assert option["checked"], option["label"]
        dropped = ~kept[option["label"]] if option["label"] in kept else np.zeros(len(positions), bool)
        assert option["struck"] == list(dropped), option["label"]

    score = np.load(base)[positions] - np.load(ref)[positions]
    for title, p, s, k, w in zip(view["titles"], positions, score, zip(*kept.values()), weights[positions]):
        named = ["full", "fixed_r0.6", f"rho1_r0.6_s0 ({w:.2f})"]
        assert title == (f"score {s:+.3f} | class {TOKEN_CLASSES[table.extras['token_class'][p]]}"
                         f" | kept by: {', '.join(n for n, x in zip(named, k) if x) or '-'}"
                         f" | dropped by: {', '.join(n for n, x in zip(named, k) if not x) or '-'}"), title
    assert all(view["texts"])  # every token is visible, an empty one as a dot
