// switchboard.js with expiring JWTs, in a real browser: headless Chromium
// driven by playwright-core, against a server taking HS256 JWTs whose
// `GET /token?user=…&ttl=…` signs one for the page. Run by
// examples/tests/jobs_browser.rs, which sets:
//
//   TOKEN_URL  that server (its `/` is a blank page to load the client into)
//
// Tokens live 3 s: without getToken() the session is closed `token_expired`;
// with it the client refreshes in band and keeps its one session past `exp`.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { launch, watch } from "./harness.mjs";

const TOKEN_URL = process.env.TOKEN_URL;
const WAIT = 15_000;

let browser;
const errors = [];

before(async () => {
  assert.ok(TOKEN_URL, "set TOKEN_URL (examples/tests/jobs_browser.rs does)");
  browser = await launch();
});

after(async () => {
  if (browser) await browser.close();
  assert.deepEqual(errors, [], "no uncaught errors in the pages");
});

/** A fresh tab on the blank page with the client module as `window.sbmod`
 * and `window.token(user, ttl)` fetching a signed token. */
async function tab(name) {
  const context = await browser.newContext();
  const page = watch(await context.newPage(), name, errors);
  await page.goto(TOKEN_URL);
  await page.evaluate(async () => {
    window.sbmod = await import("/switchboard.js");
    window.token = async (user, ttl) => (await fetch(`/token?user=${user}&ttl=${ttl}`)).text();
  });
  return page;
}

/** Starts a client in `page` with `options` (getToken as a list of
 * [user, ttl] answers, the last repeated), recording what it reports in
 * `window.log`, and resolves once it is connected. */
async function start(page, transport, options) {
  await page.evaluate(
    async ({ transport, token, answers }) => {
      const log = (window.log = { welcomes: [], closes: [], errors: [], states: [], tokens: 0, got: [] });
      const getToken = answers
        ? () => {
            const [user, ttl] = answers[Math.min(log.tokens++, answers.length - 1)];
            return window.token(user, ttl);
          }
        : undefined;
      const sb = (window.sb = new window.sbmod.Switchboard({
        token: token ? await window.token(...token) : undefined,
        getToken,
        transports: [transport],
      }));
      sb.on("welcome", (frame) => log.welcomes.push({ sid: frame.sid, user: frame.user, expires: frame.expires_in_ms }));
      sb.on("close", (frame) => log.closes.push(frame.reason));
      sb.on("error", (error) => log.errors.push(error.code));
      sb.on("state", ({ state }) => log.states.push(state));
      sb.join("clock", (data) => log.got.push(data));
    },
    { transport, ...options },
  );
  await page.waitForFunction(() => window.sb.state === "connected", null, { timeout: WAIT });
}

const log = (page) => page.evaluate(() => window.log);

/** Waits in the page past the first token's expiry (3 s), plus a margin. */
const pastExpiry = (page) => page.evaluate(() => new Promise((resolve) => setTimeout(resolve, 4500)));

for (const transport of ["websocket", "sse", "longpoll"]) {
  test(`${transport}: without getToken the session is closed token_expired at exp`, async () => {
    const page = await tab(`expire-${transport}`);
    await start(page, transport, { token: ["alice", 3] });
    assert.ok((await log(page)).welcomes[0].expires <= 3000, "welcome tells the time left");
    await page.waitForFunction(() => window.sb.state === "closed", null, { timeout: WAIT });
    const seen = await log(page);
    assert.deepEqual(seen.closes, ["token_expired"]);
    assert.equal(seen.welcomes.length, 1, "an expired token is not retried");
    await page.context().close();
  });

  test(`${transport}: with getToken it refreshes in band and keeps its session past exp`, async () => {
    const page = await tab(`refresh-${transport}`);
    await start(page, transport, { answers: [["alice", 3]] });
    await page.waitForFunction(() => window.sb.rooms.get("clock").joined, null, { timeout: WAIT });
    await pastExpiry(page);
    // Still the same session, and it still carries frames both ways.
    const published = await page.evaluate(() => window.sb.rooms.get("clock").publish({ after: "exp" }).then(() => true));
    assert.ok(published);
    await page.waitForFunction(() => window.log.got.some((d) => d.after === "exp"), null, { timeout: WAIT });
    const seen = await log(page);
    assert.deepEqual(seen.closes, [], "never closed");
    assert.equal(seen.welcomes.length, 1, "never reconnected");
    assert.ok(seen.tokens >= 2, `getToken was called again before exp (${seen.tokens} calls)`);
    assert.deepEqual(seen.errors, []);
    await page.context().close();
  });
}

test("a refresh naming another user is refused; the session expires and reconnects with getToken", async () => {
  const page = await tab("another-user");
  // First token alice (3 s), then bob's offered as its refresh, then alice again.
  await start(page, "websocket", { answers: [["alice", 3], ["bob", 60], ["alice", 60]] });
  await page.waitForFunction(() => window.log.welcomes.length >= 2, null, { timeout: WAIT });
  const seen = await log(page);
  assert.ok(seen.errors.includes("forbidden"), `refused: ${JSON.stringify(seen.errors)}`);
  assert.deepEqual(seen.closes, ["token_expired"]);
  assert.deepEqual(
    seen.welcomes.map((w) => w.user),
    ["alice", "alice"],
    "bob never took over; the reconnect used a fresh alice token",
  );
  await page.context().close();
});
