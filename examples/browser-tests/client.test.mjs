// switchboard.js itself in a real browser: headless Chromium driven by
// playwright-core, against a plain server that mounts switchboard_warp::routes
// (trusting the client's name, heartbeat 1.5 s + 1.5 s, HTTP publish API on).
// Run by examples/tests/jobs_browser.rs:
//
//   CLIENT_URL       the server (its `/` is a blank page to load the client into)
//   CLIENT_API_KEY   the publish API's bearer key
//
// Each test opens its own tab; playwright's routes stand in for a network
// that refuses, drops, duplicates or goes silent.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { launch, watch, post, eventually } from "./harness.mjs";

const CLIENT_URL = process.env.CLIENT_URL;
const API_KEY = process.env.CLIENT_API_KEY;
const WAIT = 10_000;

let browser;
const errors = [];

before(async () => {
  assert.ok(CLIENT_URL && API_KEY, "set CLIENT_URL and CLIENT_API_KEY (examples/tests/jobs_browser.rs does)");
  browser = await launch();
});

after(async () => {
  if (browser) await browser.close();
});

/** A fresh tab on the blank page, with the client module loaded as `window.sbmod`. */
async function tab(name) {
  const context = await browser.newContext();
  const page = watch(await context.newPage(), name, errors);
  await page.goto(CLIENT_URL);
  await page.evaluate(async () => {
    window.sbmod = await import("/switchboard.js");
  });
  return page;
}

/** Starts a client in `page` as `user` with `options`, joined to `room` if
 * given, recording what it reports in `window.log`. */
function start(page, user, options = {}, room = null) {
  return page.evaluate(
    ({ user, options, room }) => {
      const log = (window.log = { states: [], messages: [], resets: [], errors: [], welcomes: [] });
      const sb = (window.sb = new window.sbmod.Switchboard({ token: user, ...options }));
      sb.on("state", ({ state, transport }) => log.states.push({ state, transport, at: Date.now() }));
      sb.on("welcome", (frame) => log.welcomes.push(frame.sid));
      if (room) {
        sb.join(room, (data, frame) => log.messages.push({ seq: frame.seq, epoch: frame.epoch, data }), {
          onReset: (frame) => log.resets.push(frame),
          onError: (error) => log.errors.push(error.code),
        });
      }
    },
    { user, options, room },
  );
}

const log = (page) => page.evaluate(() => window.log);

async function connected(page, transport) {
  await page.waitForFunction(() => window.sb.state === "connected", null, { timeout: WAIT });
  if (transport) assert.equal(await page.evaluate(() => window.sb.transport), transport);
}

/** Resolves once the client's room has its `joined`. */
function joined(page, room) {
  return page.waitForFunction((room) => window.sb.rooms.get(room)?.joined === true, room, { timeout: WAIT });
}

async function publish(room, data) {
  return JSON.parse(await post(new URL("api/publish", CLIENT_URL), { room, data }, { authorization: `Bearer ${API_KEY}` }));
}

function waitForMessages(page, n, timeout = WAIT) {
  return page.waitForFunction((n) => window.log.messages.length >= n, n, { timeout });
}

/** Routes that let the test drop the tab's connections and refuse new ones:
 * `network.down()` closes the open WebSockets and refuses (or aborts) every
 * new attempt until `network.up()`. */
async function controlledNetwork(page, { duplicate = false } = {}) {
  const network = { blocked: false, links: [], attempts: [] };
  await page.routeWebSocket(/\/ws(\?|$)/, (ws) => {
    network.attempts.push({ transport: "websocket", at: Date.now() });
    if (network.blocked) return ws.close();
    const server = ws.connectToServer();
    const link = { ws, server, frozen: false };
    network.links.push(link);
    ws.onMessage((m) => link.frozen || server.send(m));
    server.onMessage((m) => {
      if (link.frozen) return;
      ws.send(m);
      if (duplicate && JSON.parse(m).type === "message") ws.send(m); // the network delivers it twice
    });
  });
  await page.route(
    (url) => /^\/(sse|poll)(\/|$)/.test(url.pathname),
    (route) => (network.blocked ? route.abort() : route.continue()),
  );
  network.down = async () => {
    network.blocked = true;
    for (const { ws, server } of network.links.splice(0)) {
      server.close().catch(() => {});
      ws.close().catch(() => {});
    }
    // SSE and long-poll requests in flight cannot be cut from a route: the
    // client drops its transport as it would on a network error.
    await page.evaluate(() => window.sb.transport !== "websocket" && window.sb.reconnect());
  };
  network.up = () => {
    network.blocked = false;
  };
  return network;
}

test("fallback order: WebSocket, then SSE, then long-poll, and it says which one it uses", { timeout: 30_000 }, async () => {
  const page = await tab("fallback");
  const tried = [];
  await page.routeWebSocket(/\/ws(\?|$)/, (ws) => {
    tried.push("websocket");
    ws.close(); // refused
  });
  await page.route(
    (url) => url.pathname === "/sse",
    (route) => {
      tried.push("sse");
      route.abort();
    },
  );
  page.on("request", (r) => new URL(r.url()).pathname === "/poll/open" && tried.push("longpoll"));
  await start(page, "fiona", {}, "fallback");
  await connected(page, "longpoll");
  await joined(page, "fallback");
  assert.deepEqual(tried, ["websocket", "sse", "longpoll"]);
  const states = (await log(page)).states;
  assert.deepEqual(states.at(-1), { ...states.at(-1), state: "connected", transport: "longpoll" });
  await publish("fallback", { n: 1 });
  await waitForMessages(page, 1);
  await page.context().close();
});

test("a transport that connects but sends no welcome is given up after connectTimeoutMs", { timeout: 30_000 }, async () => {
  const page = await tab("silent");
  await page.routeWebSocket(/\/ws(\?|$)/, () => {
    // Accepted, and then nothing: a proxy that swallows the upgrade.
  });
  const t0 = Date.now();
  await start(page, "gina", { connectTimeoutMs: 800 });
  await connected(page, "sse");
  const took = Date.now() - t0;
  assert.ok(took >= 750, `gave WebSocket its ${800} ms (${took} ms)`);
  assert.ok(took < 5000, `then moved on (${took} ms)`);
  await page.context().close();
});

test("dedupe by seq: a message delivered twice reaches the page once, in order", { timeout: 30_000 }, async () => {
  const page = await tab("dedupe");
  await controlledNetwork(page, { duplicate: true });
  await start(page, "hank", { transports: ["websocket"] }, "dedupe");
  await connected(page, "websocket");
  await joined(page, "dedupe");
  for (let n = 1; n <= 5; n++) await publish("dedupe", { n });
  await waitForMessages(page, 5);
  await page.waitForTimeout(300); // room for a duplicate to show up
  const { messages } = await log(page);
  assert.deepEqual(
    messages.map((m) => [m.seq, m.data.n]),
    [
      [1, 1],
      [2, 2],
      [3, 3],
      [4, 4],
      [5, 5],
    ],
  );
  await page.context().close();
});

test("backoff after the server closes: exponential, full jitter, capped; then back", { timeout: 40_000 }, async () => {
  const page = await tab("backoff");
  const network = await controlledNetwork(page);
  const base = 200;
  const max = 1600;
  await start(page, "ivan", { transports: ["websocket"], backoffBaseMs: base, backoffMaxMs: max }, "backoff");
  await connected(page, "websocket");
  await joined(page, "backoff");
  const refusals = 6;
  const cutAt = Date.now();
  await network.down();
  await eventually(() => network.attempts.length >= 1 + refusals, { timeout: 20_000, what: `${refusals} refused attempts` });
  network.up();
  await connected(page, "websocket");
  const times = [cutAt, ...network.attempts.slice(1).map((a) => a.at)];
  const gaps = times.slice(1).map((t, i) => t - times[i]);
  // Attempt k waits a random time in [0, min(max, base * 2^k)).
  gaps.slice(0, refusals).forEach((gap, k) => {
    const cap = Math.min(max, base * 2 ** k);
    assert.ok(gap <= cap + 250, `attempt ${k + 1} came ${gap} ms after the previous one (cap ${cap} ms)`);
  });
  const waited = gaps.slice(0, refusals).reduce((a, b) => a + b, 0);
  assert.ok(waited > 400, `not a tight loop: ${waited} ms over ${refusals} attempts (${gaps.join(", ")})`);
  const { states, welcomes } = await log(page);
  assert.equal(welcomes.length, 2, "one new session once the server took it again");
  assert.ok(states.some((s) => s.state === "reconnecting"));
  await page.context().close();
});

for (const transport of ["websocket", "sse", "longpoll"]) {
  test(`${transport}: a dropped connection rejoins with since and loses nothing`, { timeout: 40_000 }, async () => {
    const room = `since-${transport}`;
    const page = await tab(room);
    const network = await controlledNetwork(page);
    await start(page, "judy", { transports: [transport], backoffBaseMs: 200, backoffMaxMs: 1000 }, room);
    await connected(page, transport);
    await joined(page, room);
    for (let n = 1; n <= 3; n++) await publish(room, { n });
    await waitForMessages(page, 3);

    await network.down();
    await page.waitForFunction(() => window.sb.state !== "connected", null, { timeout: WAIT });
    for (let n = 4; n <= 8; n++) await publish(room, { n }); // while it is away
    network.up();
    await connected(page, transport);
    await waitForMessages(page, 8);
    await publish(room, { n: 9 });
    await waitForMessages(page, 9);
    await page.waitForTimeout(200);
    const { messages, resets, errors: roomErrors, welcomes } = await log(page);
    assert.deepEqual(
      messages.map((m) => m.data.n),
      [1, 2, 3, 4, 5, 6, 7, 8, 9],
      "every message once, in order",
    );
    assert.deepEqual(
      messages.map((m) => m.seq),
      [1, 2, 3, 4, 5, 6, 7, 8, 9],
    );
    assert.deepEqual(resets, [], "recovered: no reset");
    assert.deepEqual(roomErrors, []);
    assert.equal(welcomes.length, 2, "one welcome per session");
    await page.context().close();
  });
}

test("onReset when the server cannot replay (more missed than the room keeps)", { timeout: 40_000 }, async () => {
  const room = "reset";
  const page = await tab(room);
  const network = await controlledNetwork(page);
  await start(page, "kim", { transports: ["websocket"], backoffBaseMs: 200, backoffMaxMs: 1000 }, room);
  await connected(page, "websocket");
  await joined(page, room);
  await publish(room, { n: 1 });
  await waitForMessages(page, 1);
  await network.down();
  await page.waitForFunction(() => window.sb.state !== "connected", null, { timeout: WAIT });
  // The room keeps 100 messages: 105 missed cannot all be replayed.
  for (let n = 2; n <= 106; n++) await publish(room, { n });
  network.up();
  await page.waitForFunction(() => window.log.resets.length > 0, null, { timeout: WAIT });
  const { resets, messages } = await log(page);
  assert.equal(resets.length, 1);
  assert.equal(resets[0].recovered, false);
  assert.equal(resets[0].seq, 106, "joined says where the room is");
  assert.deepEqual(messages.map((m) => m.data.n), [1], "nothing replayed: the page reloads by other means");
  const next = await publish(room, { n: 107 });
  await waitForMessages(page, 2);
  assert.equal((await log(page)).messages[1].seq, next.seq, "live messages go on from the new position");
  await page.context().close();
});

test("heartbeat: a connection that goes silent is replaced, and nothing is lost", { timeout: 40_000 }, async () => {
  const room = "silence";
  const page = await tab(room);
  const network = await controlledNetwork(page);
  await start(page, "lena", { transports: ["websocket"], backoffBaseMs: 200, backoffMaxMs: 1000 }, room);
  await connected(page, "websocket");
  await joined(page, room);
  // Frames stop both ways; the socket stays open (a laptop that lost its network).
  const frozenAt = Date.now();
  for (const link of network.links) link.frozen = true;
  await publish(room, { n: 1 }); // lost with the frozen link
  await page.waitForFunction(() => window.sb.state === "reconnecting", null, { timeout: WAIT });
  const noticed = Date.now() - frozenAt;
  // The server's window is 1.5 s + 1.5 s; the client pings after 1.5 s of silence.
  assert.ok(noticed >= 2000 && noticed <= 6000, `silence noticed after ${noticed} ms`);
  await connected(page, "websocket");
  await waitForMessages(page, 1);
  assert.deepEqual((await log(page)).messages.map((m) => m.data.n), [1], "recovered with since");
  await page.context().close();
});

test("long-poll: the first poll acknowledges the welcome, so there is one welcome per session", { timeout: 30_000 }, async () => {
  const page = await tab("ack");
  const polls = [];
  page.on("request", (r) => {
    const url = new URL(r.url());
    if (url.pathname === "/poll") polls.push(url.searchParams.get("ack"));
  });
  await start(page, "mona", { transports: ["longpoll"] }, "ack");
  await connected(page, "longpoll");
  await joined(page, "ack");
  await publish("ack", { n: 1 });
  await waitForMessages(page, 1);
  await page.waitForTimeout(500);
  assert.equal(polls[0], "1", "the [welcome] of poll/open is acknowledged");
  const { welcomes, messages } = await log(page);
  assert.equal(welcomes.length, 1);
  assert.equal(messages.length, 1);
  await page.context().close();
});

test("SSE: a refused join is reported, keeps the stream, and is not retried", { timeout: 30_000 }, async () => {
  const page = await tab("sse-error");
  await start(page, "nina", { transports: ["sse"] });
  await connected(page, "sse");
  const sid = await page.evaluate(() => window.sb.sid);
  const code = await page.evaluate(
    () =>
      new Promise((resolve) => {
        window.sb.join("not a room!", () => {}, { onError: (e) => resolve(e.code) });
      }),
  );
  assert.equal(code, "invalid_room");
  await page.waitForTimeout(1500);
  const { states } = await log(page);
  assert.deepEqual(
    states.map((s) => s.state),
    ["connected"],
    "the server's `error` event did not end the stream",
  );
  assert.equal(await page.evaluate(() => window.sb.sid), sid);
  assert.equal(await page.evaluate(() => window.sb.rooms.has("not a room!")), false, "dropped, not rejoined");
  await page.context().close();
});

test("no page had an uncaught error", () => {
  assert.deepEqual(errors, []);
});
