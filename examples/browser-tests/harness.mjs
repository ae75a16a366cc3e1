// What the browser tests share: launching the system's headless Chromium
// (not a downloaded one) through playwright-core, screenshots, and watching
// pages for uncaught errors.
//
// Environment:
//   CHROMIUM_PATH   the browser (default /usr/bin/chromium: `apt-get install -y chromium`)
//   SCREENSHOT_DIR  where to write screenshots (optional)

import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import path from "node:path";
import { chromium } from "playwright-core";

export const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
export const SCREENSHOT_DIR = process.env.SCREENSHOT_DIR;

/** Headless Chromium with a fresh temporary profile (removed on close). */
export async function launch() {
  assert.ok(existsSync(CHROMIUM), `no browser at ${CHROMIUM}: apt-get install -y chromium (or set CHROMIUM_PATH)`);
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--disable-quic",
    ],
  });
}

/** Writes a screenshot of `page` to SCREENSHOT_DIR/name, if set. */
export async function shoot(page, name, options = {}) {
  if (!SCREENSHOT_DIR) return;
  mkdirSync(SCREENSHOT_DIR, { recursive: true });
  await page.screenshot({ path: path.join(SCREENSHOT_DIR, name), ...options });
}

/** Collects `page`'s uncaught errors into `errors`, tagged with `who`. */
export function watch(page, who, errors) {
  page.on("pageerror", (error) => errors.push(`${who}: ${error.message}`));
  page.on("dialog", (dialog) => {
    errors.push(`${who}: unexpected dialog ${dialog.message()}`);
    dialog.dismiss().catch(() => {});
  });
  return page;
}

/** POSTs to `url` and returns the answer's text; fails on a non-2xx status. */
export async function post(url, body, headers = {}) {
  const response = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  assert.ok(response.ok, `POST ${url}: ${response.status} ${text}`);
  return text;
}

/** The open sessions of the server at `base`, from its Prometheus `/metrics`. */
export async function sessionCount(base) {
  const text = await (await fetch(new URL("metrics", base))).text();
  const line = text.split("\n").find((l) => l.startsWith("switchboard_sessions "));
  assert.ok(line, "switchboard_sessions in /metrics");
  return Number(line.split(" ")[1]);
}

/** Polls `check` (async, truthy when done) every `every` ms for up to `timeout` ms. */
export async function eventually(check, { timeout = 10_000, every = 100, what = "condition" } = {}) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) assert.fail(`timed out after ${timeout} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, every));
  }
}
