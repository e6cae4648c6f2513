"""Open a page in headless Chromium (Debian's `chromium`, `apt-get install chromium`), act on it the way a reader
would, and read back what the browser computed: the pages are tested where people read them, not only as text.

:func:`open_page` injects a script into a copy of the page; after the page's own scripts ran (virtual time lets
timers and async rendering finish), the script runs the test's JavaScript and writes its result as JSON into a
``<pre>`` that ``--dump-dom`` returns. Every name is resolved to nothing (``--host-resolver-rules``), so a page
cannot load anything from outside its file; the probe still sees any attempt (resource timing entries, load
errors) and lists every external reference left in the rendered DOM and its style sheets.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

RESULT_ID = "tokenclean-browser-result"

# Runs first in <head>: catches a resource that fails to load (error events do not bubble: capture phase).
_WATCH = """<script>window.__failed = [];
addEventListener('error', e => { const t = e.target;
  if (t && t !== window) window.__failed.push(t.src || t.href || t.currentSrc || t.outerHTML.slice(0, 200)); }, true);
</script>"""

# Runs after load: the test's actions (the body of an async function returning a JSON-able value), then the probe.
_RUN = """<script>addEventListener('load', () => setTimeout(async () => {
  const out = document.createElement('pre'); out.id = '%s';
  let result;
  try { result = await (async () => { %s })(); } catch (e) { result = {error: String(e && e.stack || e)}; }
  const local = u => /^(data:|blob:|about:|javascript:|#)/.test(u) || u === '' || u === location.href;
  const refs = [];
  for (const el of document.querySelectorAll('[src],[href],[srcset],[poster],[data],object,embed')) {
    for (const a of ['src', 'href', 'srcset', 'poster', 'data']) {
      const v = el.getAttribute(a);
      if (v !== null && !local(v.trim())) refs.push(el.tagName.toLowerCase() + ' ' + a + '=' + v.slice(0, 200));
    }
  }
  const styles = [...document.querySelectorAll('[style]')].map(el => el.getAttribute('style'));
  for (const sheet of document.styleSheets) {
    try { for (const r of sheet.cssRules) styles.push(r.cssText); } catch (e) { refs.push('unreadable sheet'); }
  }
  for (const s of styles) for (const m of s.matchAll(/url\\(\\s*['"]?([^'")]*)|@import\\s+['"]([^'"]*)/g)) {
    const u = (m[1] || m[2] || '').trim();
    if (!local(u)) refs.push('css ' + u.slice(0, 200));
  }
  const loaded = performance.getEntriesByType('resource').map(e => e.name).filter(u => !local(u));
  out.textContent = JSON.stringify({result, loaded, failed: window.__failed, external: refs});
  document.body.appendChild(out);
}, 0));
</script>"""


def chromium_or_skip() -> str:
    """The browser; skipped without one, unless TOKENCLEAN_REQUIRE_BROWSER=1 (CI installs it) makes that a
    failure."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        reason = "chromium is not installed (Debian/Ubuntu: apt-get install chromium); the page tests need it"
        if os.environ.get("TOKENCLEAN_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + ", and TOKENCLEAN_REQUIRE_BROWSER=1")
        pytest.skip(reason)
    return exe


def open_page(page: Path, actions: str, workdir: Path, budget_ms: int = 5000) -> dict:
    """Open a copy of ``page`` in headless Chromium, run ``actions`` (JavaScript, the body of an async function)
    once the page has loaded, and return {"result": what it returned, "loaded": resources fetched from outside
    the file, "failed": resources that failed to load, "external": external references in the rendered DOM}."""
    exe = chromium_or_skip()
    text = page.read_text(encoding="utf-8")
    head = re.search(r"<head[^>]*>", text, re.IGNORECASE)
    assert head and "</body>" in text, f"{page} has no <head> or </body>"
    text = text[:head.end()] + _WATCH + text[head.end():]
    i = text.rindex("</body>")
    copy = workdir / f"browser-{page.name}"
    copy.write_text(text[:i] + _RUN % (RESULT_ID, actions) + text[i:], encoding="utf-8")
    # the browser's own files (profile, crash reports, dconf) under workdir, none in the user's HOME
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("XDG_")}, "HOME": str(workdir)}
    for attempt in range(2):  # seen once in ~40 runs: a headless start that never dumps the page; once more
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={workdir / f'chromium-profile-{attempt}'}",
               f"--virtual-time-budget={budget_ms}", "--window-size=1280,900", "--dump-dom", copy.resolve().as_uri()]
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=60)
            break
        except subprocess.TimeoutExpired:
            if attempt:
                raise
    found = re.search(rf'<pre id="{RESULT_ID}">(.*?)</pre>', proc.stdout, re.DOTALL)
    assert found, f"no result from the browser (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    out = json.loads(html.unescape(found.group(1)))
    assert not (isinstance(out["result"], dict) and "error" in out["result"]), out["result"]
    return out
