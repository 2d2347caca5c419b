"""The sidebar's cost per streamed chunk, in a real Chromium, at conversation lengths 10 and 1,000.

Issue 20: the sidebar used to rebuild every item on each animation frame while a reply streamed,
so the browser's work per chunk grew with the conversation. This measures it from the outside
(no app instrumentation, so the same probes run on the old build and the new one):

* a real ``jupyter lab`` (tests/browser.py's ``LabServer``) with the demo agent, Debian's Chromium;
* per run: a new session, ``/fill N`` (one turn of N items: Markdown messages and edit tool
  cards), then ``/stream 2000`` (2,000 ``agent_message_chunk``s ``c0 c1 ...``), until its footer;
* CDP ``Performance.getMetrics`` before and after the stream: Δ TaskDuration (all main-thread
  work), ScriptDuration, LayoutDuration, RecalcStyleDuration and TaskOtherDuration (the rest:
  paint, GC, ...), divided by the chunks; the JSON also has the layout and style counts;
* a ``requestAnimationFrame`` loop: the frame intervals while the chunks arrive (p50, p95) and
  the wall time from the first chunk visible to the last;
* a MutationObserver on the log: the nodes touched in items *before* the streaming message
  (the earlier items; 0 means the stream leaves them alone).

The median of ``--runs`` runs per length is reported, with the 1000/10 ratio of the main-thread
time per chunk (1.0x: independent of the conversation's length). ``--labext DIR`` serves another
build of the labextension (the "before" figures come from the unchanged build); ``--label``
names the result, written to ``bench/results/chat_stream-<label>.json``. Timings, no asserts.

    .venv/bin/python bench/chat_stream.py --label before --labext /work/before-labext
    .venv/bin/python bench/chat_stream.py --label after
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # tests/browser.py (and the conftest it reads)

import browser  # noqa: E402
from harness import pct, table  # noqa: E402

METRICS = ("TaskDuration", "ScriptDuration", "LayoutDuration", "RecalcStyleDuration", "TaskOtherDuration")
#: counts (deltas over the stream, in the JSON only): how often layout and style ran
COUNTS = ("LayoutCount", "RecalcStyleCount")

#: Installed in the page just before the stream: the rAF loop and the MutationObserver.
PROBES = r"""(chunks) => {
  // Every probe costs what changed, never the log's length: the figures must show the sidebar's
  // growth with the conversation, not the probes' own (a querySelectorAll per frame did).
  const log = document.querySelector('#jupyter-acp-panel .jp-AcpPanel-log');
  const top = n => { while (n && n.parentNode !== log) n = n.parentNode; return n; };
  const earlier = new WeakSet();
  // the panel's own rows after the items ("working…", "starting…") are not items
  const ROWS = '.jp-AcpPanel-working, .jp-AcpPanel-starting';
  const AGENT = '.jp-AcpMsg-agent';
  const isAgent = n => n.nodeType === 1 && (n.matches(AGENT) || !!n.querySelector(AGENT));
  let stream = null;  // the streaming message: the last agent message added since the probes came
  // mark the items before the streaming message (all of them while there is none), walking back
  // from it to the first one already marked
  const markEarlier = () => {
    let c = stream ? stream.previousElementSibling : log.lastElementChild;
    for (; c && !earlier.has(c); c = c.previousElementSibling) if (!c.matches(ROWS)) earlier.add(c);
  };
  markEarlier();
  const p = window.__acpBench = {frames: [], first: null, last: null, touched: 0, records: 0, done: false,
                                 what: []};
  const note = (r, n) => {
    const where = n.className || n.nodeName;
    if (p.what.length < 10) p.what.push(`${r.type} ${r.attributeName || ''} in ${where}`);
  };
  const firstMark = 'c0 ', lastMark = `c${chunks - 1}`;
  const obs = new MutationObserver(records => {
    for (const r of records) if (r.target === log) for (const n of r.addedNodes) if (isAgent(n)) stream = n;
    const s = stream;
    for (const r of records) {
      p.records++;
      if (r.target === log) {
        for (const n of r.removedNodes) if (earlier.has(n)) { p.touched++; note(r, n); }
        for (const n of r.addedNodes) {
          const before = s && n !== s && (n.compareDocumentPosition(s) & Node.DOCUMENT_POSITION_FOLLOWING);
          if (n.isConnected && before && !(n.nodeType === 1 && n.matches(ROWS))) { p.touched++; note(r, n); }
        }
      } else if (earlier.has(top(r.target))) {
        p.touched += r.type === 'childList' ? r.addedNodes.length + r.removedNodes.length : 1;
        note(r, r.target);
      }
    }
    markEarlier();
  });
  obs.observe(log, {childList: true, subtree: true, attributes: true, characterData: true});
  const tick = t => {
    if (p.done) { obs.disconnect(); return; }
    p.frames.push(t);
    const text = stream ? stream.textContent : '';
    if (p.first === null && text.startsWith(firstMark)) p.first = t;
    if (p.first !== null && p.last === null && text.includes(lastMark)) p.last = t;
    requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
}"""


def metrics(cdp: Any) -> dict[str, float]:
    got = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    return {k: got.get(k, 0.0) for k in METRICS + COUNTS}


def turns(panel: Any) -> int:
    return panel.locator(".jp-AcpTurn").count()


def send(page: Any, panel: Any, text: str, timeout_ms: int) -> None:
    """Type ``text`` in the composer, send it, and wait for its turn footer."""
    before = turns(panel)
    composer = panel.locator("textarea.jp-AcpPanel-input")
    composer.fill(text)
    composer.press("Enter")
    page.wait_for_function(
        "n => document.querySelectorAll('#jupyter-acp-panel .jp-AcpTurn').length > n", arg=before,
        timeout=timeout_ms, polling=200)


def one_run(page: Any, panel: Any, n: int, chunks: int) -> dict[str, float]:
    from playwright.sync_api import expect

    current = panel.locator(".jp-AcpPanel-session.jp-mod-current")
    old = current.get_attribute("data-session-id") if current.count() else None
    panel.get_by_role("button", name="New session", exact=True).click()
    expect(panel.locator(".jp-AcpPanel-status")).to_contain_text("ready", timeout=browser.UI_TIMEOUT)
    if old is not None:
        expect(current).not_to_have_attribute("data-session-id", old, timeout=browser.UI_TIMEOUT)
    expect(panel.locator(".jp-AcpTurn")).to_have_count(0, timeout=browser.UI_TIMEOUT)
    send(page, panel, f"/fill {n}", 600_000)
    page.wait_for_timeout(1000)  # (let the fill's last frames and layout settle)
    cdp = page.context.new_cdp_session(page)
    cdp.send("Performance.enable")
    page.evaluate(PROBES, chunks)
    m0 = metrics(cdp)
    t0 = time.perf_counter()
    send(page, panel, f"/stream {chunks}", 600_000)
    page.wait_for_function("() => window.__acpBench.last !== null", timeout=600_000, polling=200)
    wall_to_footer = time.perf_counter() - t0
    m1 = metrics(cdp)
    probe = page.evaluate("() => { const p = window.__acpBench; p.done = true; return p; }")
    cdp.detach()
    frames = [b - a for a, b in zip(probe["frames"], probe["frames"][1:], strict=False)
              if probe["first"] is not None and probe["first"] <= a and b <= probe["last"]] or [0.0]
    return {
        "wall_ms": probe["last"] - probe["first"],
        "to_footer_s": wall_to_footer,
        **{f"{k}_ms_per_chunk": (m1[k] - m0[k]) * 1000 / chunks for k in METRICS},
        **{k: m1[k] - m0[k] for k in COUNTS},
        "frame_p50_ms": pct(frames, 0.5),
        "frame_p95_ms": pct(frames, 0.95),
        "frames": len(frames),
        "touched_outside_last": probe["touched"],
        "mutation_records": probe["records"],
        "touched_what": probe["what"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="after", help="names the result file (default: after)")
    parser.add_argument("--labext", default="", help="serve this labextension build instead of this tree's")
    parser.add_argument("--sizes", default="10,1000", help="conversation lengths in items (default 10,1000)")
    parser.add_argument("--chunks", type=int, default=2000, help="chunks in the reply (default 2000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per length; the median is reported")
    args = parser.parse_args()
    if args.labext:
        browser.LABEXTENSION = Path(args.labext).resolve()
    sync_playwright = browser.require_playwright()

    sizes = [int(s) for s in args.sizes.split(",")]
    raw: dict[int, list[dict[str, float]]] = {n: [] for n in sizes}
    server = browser.LabServer(Path(tempfile.mkdtemp(prefix="acp-bench-chat-")),
                               ["--UserSessionManager.max_sessions_per_user=0"])
    server.start()
    try:
        with sync_playwright() as pw, browser.chromium(pw) as (page, errors):
            version = page.context.browser.version
            panel = browser.open_panel(page, server.info())
            page.locator("select.jp-AcpPanel-agent option[value=demo]").wait_for(
                state="attached", timeout=browser.UI_TIMEOUT)
            panel.locator("select.jp-AcpPanel-agent").select_option("demo")
            for run in range(args.runs):
                for n in sizes:
                    started = time.perf_counter()
                    raw[n].append(one_run(page, panel, n, args.chunks))
                    shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in raw[n][-1].items()}
                    print(f"run {run + 1}/{args.runs} n={n}: {time.perf_counter() - started:.1f} s "
                          f"{json.dumps(shown)}", flush=True)
            if errors:
                print(f"errors in the page: {errors}")
    finally:
        server.stop()

    keys = [k for k, v in raw[sizes[0]][0].items() if isinstance(v, (int, float))]
    rows = [{"messages": n, **{k: statistics.median(r[k] for r in raw[n]) for k in keys}, "runs": raw[n]}
            for n in sizes]
    result = {"label": args.label, "labext": str(browser.LABEXTENSION), "chromium": version,
              "cores": os.cpu_count(), "chunks": args.chunks, "runs": args.runs, "rows": rows}
    out = HERE / "results" / f"chat_stream-{args.label}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")

    print(f"chat_stream label={args.label} chromium={version} cores={os.cpu_count()} "
          f"chunks={args.chunks} runs={args.runs} (medians)")
    cols = [("messages", "messages", "{:d}"), ("wall_ms", "wall_ms", "{:.0f}"),
            ("TaskDuration_ms_per_chunk", "main_ms/chunk", "{:.3f}"),
            ("ScriptDuration_ms_per_chunk", "script_ms/chunk", "{:.3f}"),
            ("LayoutDuration_ms_per_chunk", "layout_ms/chunk", "{:.3f}"),
            ("RecalcStyleDuration_ms_per_chunk", "style_ms/chunk", "{:.3f}"),
            ("frame_p50_ms", "frame_p50", "{:.1f}"), ("frame_p95_ms", "frame_p95", "{:.1f}"),
            ("touched_outside_last", "touched_outside_last", "{:.0f}")]
    print(table([[c[1] for c in cols]] + [[f.format(row[k]) for k, _, f in cols] for row in rows]))
    key = "TaskDuration_ms_per_chunk"
    if len(rows) > 1 and rows[0][key] > 0:
        first, last = rows[0], rows[-1]
        line = f"ratio main_ms/chunk {last['messages']}/{first['messages']}: {last[key] / first[key]:.1f}x"
        before = HERE / "results" / "chat_stream-before.json"
        if args.label != "before" and before.exists():
            prev = {r["messages"]: r[key] for r in json.loads(before.read_text())["rows"]}
            line += "   vs before: " + ", ".join(
                f"{r['messages']}: {prev[r['messages']] / r[key]:.1f}x less" for r in rows
                if prev.get(r["messages"]) and r[key] > 0)
        print(line)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
