"""Screenshots of a study in the real MLflow UI, taken with headless Chromium (DevTools protocol).

Starts ``mlflow ui`` on the study's tracking store and Chromium with a debugging port, opens the
study's experiment, expands the parent run so its nested trial runs show (with their Dataset
column), then opens the compare view of the trial runs with its parallel-coordinates plot set to the
searched parameters against source-validation Dice (``objective``) and every unseen site's Dice,
and the chart view
(metrics grouped by name prefix: ``site/<site>/...``), and saves one PNG of each::

    python docs/mlflow_screenshots.py --study ~/dualssl-studies/dualssl-study --out docs

Needs ``chromium`` on the PATH (Debian: ``apt-get install chromium``); only aiohttp (a Ray
dependency) on the Python side.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 300.0) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


class Page:
    """One Chromium tab over the DevTools protocol."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json()
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 60.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.5)
        raise TimeoutError(f"the page never satisfied: {expression}")

    async def shot(self, path: Path) -> None:
        data = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(data["data"]))
        print(f"wrote {path}")


CLICK_TEXT = """(() => { const want = %s;
  const els = [...document.querySelectorAll('button, [role=button], a, span')];
  const el = els.find(e => want.some(w => (e.getAttribute('aria-label') || e.textContent || '').trim() === w));
  if (el) { el.click(); return true; } return false; })()"""

EXPAND = """(() => { const row = [...document.querySelectorAll('[role=row], .ag-row')]
    .find(r => r.textContent.includes(%s));
  if (!row) return false;
  const btn = row.querySelector('button, [role=button]');
  if (btn) { btn.click(); return true; } return false; })()"""


FOCUS_SELECT = """(() => { const label = [...document.querySelectorAll('label, div, span')]
    .find(e => e.children.length === 0 && e.textContent.trim() === %s);
  if (!label) return false;
  // the first input after the label in document order: the selector the label names
  const input = [...document.querySelectorAll('input')]
    .find(i => label.compareDocumentPosition(i) & Node.DOCUMENT_POSITION_FOLLOWING);
  if (!input) return false;
  input.focus(); input.click(); return true; })()"""
"""Focus the search input of the parallel-coordinates selector labelled ``%s`` ("Metrics:")."""

REMOVE_TAG = """(() => { const want = %s;
  const tag = [...document.querySelectorAll('span, div')].find(e => e.children.length === 0
      && e.textContent.trim() === want && e.closest('[class*=select]'));
  if (!tag) return false;
  let box = tag.parentElement;
  for (let i = 0; i < 3 && box; i++, box = box.parentElement) {
    const x = box.querySelector('[aria-label*=emove], [class*=remove], [class*=close], button, [role=button]');
    if (x) { x.dispatchEvent(new MouseEvent('mousedown', {bubbles: true})); x.click(); return true; } }
  return false; })()"""
"""Remove the chosen option ``%s`` (e.g. MLflow's default ``epoch``) from a multi-select."""


async def choose_metrics(page: "Page", metrics: list[str], drop: list[str]) -> None:
    """Pick ``metrics`` in the compare view's parallel-coordinates plot (type each, Enter) and
    remove the preselected ``drop``: the plot then shows the searched params against these."""
    for name in metrics:
        if not await page.js(FOCUS_SELECT % json.dumps("Metrics:")):
            print("compare view: no Metrics selector found; keeping MLflow's default metric")
            return
        await page.call("Input.insertText", text=name)
        await asyncio.sleep(1)
        for kind in ("keyDown", "keyUp"):
            await page.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)
        await asyncio.sleep(1)
    for name in drop:
        await page.js(REMOVE_TAG % json.dumps(name))
        await asyncio.sleep(1)
    await page.call("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape", windowsVirtualKeyCode=27)


SCROLL_TO = """(() => { const want = %s;
  const el = [...document.querySelectorAll('td, th, div, span, a')].find(e => e.children.length === 0
      && e.textContent.trim().startsWith(want));
  if (el) { el.scrollIntoView({block: 'center'}); return true; } return false; })()"""


async def capture(ui: str, experiment_id: str, parent_name: str, run_ids: list[str], out: Path,
                  compare_metrics: list[str] = ()) -> None:
    port = free_port()
    profile = tempfile.mkdtemp(prefix="dualssl-chromium-")
    chrome = subprocess.Popen([shutil.which("chromium") or "chromium", "--headless=new", "--no-sandbox",
                               "--disable-gpu", f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
                               "--window-size=1700,1000", "about:blank"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/json/version")
        async with aiohttp.ClientSession() as session:
            tabs = await (await session.get(f"http://127.0.0.1:{port}/json")).json()
            tab = next(t for t in tabs if t.get("type") == "page")
            async with session.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                await page.call("Page.enable")
                await page.call("Emulation.setDeviceMetricsOverride", width=1700, height=1000,
                                deviceScaleFactor=1, mobile=False)
                await page.call("Page.navigate", url=f"{ui}/#/experiments/{experiment_id}/runs")
                await page.wait_for(f"document.body.innerText.includes({json.dumps(parent_name)})")
                await asyncio.sleep(2)
                await page.js(CLICK_TEXT % json.dumps(["Close", "Close assistant"]))
                await page.js(EXPAND % json.dumps(parent_name))
                await asyncio.sleep(3)
                await page.shot(out / "mlflow_study.png")
                runs = json.dumps(run_ids)
                await page.call("Page.navigate", url=f"{ui}/#/compare-runs?runs={runs}&experiments=[\"{experiment_id}\"]")
                await page.wait_for("document.body.innerText.includes('Parameters')")
                await asyncio.sleep(3)
                await choose_metrics(page, list(compare_metrics), drop=["epoch"])
                await asyncio.sleep(2)
                await page.shot(out / "mlflow_compare.png")
                await page.call("Page.navigate", url=f"{ui}/#/experiments/{experiment_id}/runs?compareRunsMode=CHART")
                await page.wait_for(f"document.body.innerText.includes({json.dumps(parent_name)})")
                await asyncio.sleep(6)
                await page.shot(out / "mlflow_charts.png")
    finally:
        chrome.kill()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, required=True, help="study folder (holds study.json)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    manifest = json.loads((args.study / "study.json").read_text())
    uri = manifest["tracking_uri"]
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(manifest["experiment"])
    parent = client.get_run(manifest["parent_run_id"])
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    ui_port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                           "--port", str(ui_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)  # its uvicorn workers go with it
    try:
        wait_http(f"http://127.0.0.1:{ui_port}/health")
        # the compare view's plot: searched params against source-val Dice and every unseen site's Dice
        sites = sorted({k.split("/")[1] for r in children for k in r.data.metrics if k.startswith("site/")}
                       - set(manifest["source_sites"]))
        metrics = ["objective", *[f"site/{s}/dice_mean" for s in sites]]
        asyncio.run(capture(f"http://127.0.0.1:{ui_port}", experiment.experiment_id, parent.info.run_name,
                            [r.info.run_id for r in children], args.out, metrics))
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
