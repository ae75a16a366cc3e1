// switchboard.js itself in a real browser: headless Chromium driven by
// playwright-core, against a plain server that mounts switchboard_warp::routes
// (trusting the client's name, heartbeat 1.5 s + 1.5 s, HTTP publish API on).
// Run by examples/tests/jobs_browser.rs:
//
//   CLIENT_URL            the server (its `/` is a blank page to load the client into)
//   CLIENT_BUFFERING_URL  the same server behind a proxy that holds SSE answers' bodies
//   CLIENT_PUSH_ONLY_URL  a server that takes no client frames over SSE
//   CLIENT_API_KEY        the publish API's bearer key (of both servers)
//
// Each test opens its own tab; playwright's routes stand in for a network
// that refuses, drops, duplicates or goes silent.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { launch, watch, post, eventually } from "./harness.mjs";

const CLIENT_URL = process.env.CLIENT_URL;
const BUFFERING_URL = process.env.CLIENT_BUFFERING_URL;
const PUSH_ONLY_URL = process.env.CLIENT_PUSH_ONLY_URL;
const API_KEY = process.env.CLIENT_API_KEY;
const WAIT = 10_000;

let browser;
const errors = [];

before(async () => {
  assert.ok(
    CLIENT_URL && BUFFERING_URL && PUSH_ONLY_URL && API_KEY,
    "set CLIENT_URL, CLIENT_BUFFERING_URL, CLIENT_PUSH_ONLY_URL and CLIENT_API_KEY (examples/tests/jobs_browser.rs does)",
  );
  browser = await launch();
});

after(async () => {
  if (browser) await browser.close();
});

/** A fresh tab on the blank page, with the client module loaded as `window.sbmod`. */
async function tab(name, base = CLIENT_URL) {
  const context = await browser.newContext();
  const page = watch(await context.newPage(), name, errors);
  await page.goto(base);
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

async function publish(room, data, base = CLIENT_URL, event = undefined) {
  const body = { room, data, ...(event && { event }) };
  return JSON.parse(await post(new URL("api/publish", base), body, { authorization: `Bearer ${API_KEY}` }));
}

/** Publishes `[event, n]` pairs to `room`, `data` being `{ n }`, in order. */
async function publishEvents(room, events) {
  for (const [event, n] of events) await publish(room, { n }, CLIENT_URL, event);
}

/** Runs `room.publish(data, options)` in the page; resolves with how it
 * settled ({ok} or {code, status}) and how long that took. */
function publishFromPage(page, room, data, options = {}) {
  return page.evaluate(
    async ({ room, data, options }) => {
      const t0 = Date.now();
      try {
        await window.sb.rooms.get(room).publish(data, options);
        return { ok: true, took: Date.now() - t0 };
      } catch (e) {
        return { ok: false, code: e.code, status: e.status, message: e.message, took: Date.now() - t0 };
      }
    },
    { room, data, options },
  );
}

function waitForMessages(page, n, timeout = WAIT) {
  return page.waitForFunction((n) => window.log.messages.length >= n, n, { timeout });
}

/** Routes that let the test drop the tab's connections and refuse new ones:
 * `network.down()` closes the open WebSockets and refuses (or aborts) every
 * new attempt until `network.up()`. */
async function controlledNetwork(page, { duplicate = false } = {}) {
  // `fromServer(frame)` may drop (return null) or rewrite a server frame;
  // `sent` records the client's frames; `mute` drops them.
  const network = { blocked: false, links: [], attempts: [], sent: [], fromServer: (frame) => frame, mute: false };
  await page.routeWebSocket(/\/ws(\?|$)/, (ws) => {
    network.attempts.push({ transport: "websocket", at: Date.now() });
    if (network.blocked) return ws.close();
    const server = ws.connectToServer();
    const link = { ws, server, frozen: false };
    network.links.push(link);
    ws.onMessage((m) => {
      if (link.frozen || network.mute) return;
      network.sent.push(JSON.parse(m));
      server.send(m);
    });
    server.onMessage((m) => {
      if (link.frozen) return;
      const frame = network.fromServer(JSON.parse(m));
      if (!frame) return;
      const text = JSON.stringify(frame);
      ws.send(text);
      if (duplicate && frame.type === "message") ws.send(text); // the network delivers it twice
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

test("after a fallback it goes back up to WebSocket (upgradeAfterMs), losing nothing", { timeout: 40_000 }, async () => {
  const room = "upgrade";
  const page = await tab(room);
  // WebSocket refused at first (SSE and long-poll pass).
  const network = { blocked: true, attempts: [] };
  await page.routeWebSocket(/\/ws(\?|$)/, (ws) => {
    network.attempts.push(Date.now());
    if (network.blocked) return ws.close();
    ws.connectToServer();
  });
  network.up = () => (network.blocked = false);
  await start(page, "olga", { upgradeAfterMs: 1500, backoffBaseMs: 200 }, room);
  await connected(page, "sse");
  await joined(page, room);
  await publish(room, { n: 1 });
  await waitForMessages(page, 1);
  // The first try to go back up finds WebSocket still refused: back to SSE.
  await eventually(() => network.attempts.length >= 2, { timeout: WAIT, what: "a second WebSocket attempt" });
  await connected(page, "sse");
  await joined(page, room);
  await publish(room, { n: 2 });
  await waitForMessages(page, 2);
  network.up();
  await page.waitForFunction(() => window.sb.transport === "websocket" && window.sb.state === "connected", null, {
    timeout: WAIT,
  });
  await publish(room, { n: 3 }); // may land while it rejoins: since covers it
  await joined(page, room);
  await publish(room, { n: 4 });
  await waitForMessages(page, 4);
  const attempts = network.attempts.length;
  await page.waitForTimeout(2000); // on the best transport it stays put
  assert.equal(network.attempts.length, attempts, "no upgrade attempts once on WebSocket");
  assert.equal(await page.evaluate(() => window.sb.transport), "websocket");
  const { messages, states, resets } = await log(page);
  assert.deepEqual(messages.map((m) => m.data.n), [1, 2, 3, 4], "every message once, in order, across the switches");
  assert.deepEqual(resets, []);
  const connectedOn = states.filter((s) => s.state === "connected").map((s) => s.transport);
  assert.deepEqual(connectedOn.slice(0, 2), ["sse", "sse"]);
  assert.equal(connectedOn.at(-1), "websocket");
  await page.context().close();
});

test("a proxy that buffers SSE: the stream opens, nothing arrives, it falls back to long-poll", { timeout: 30_000 }, async () => {
  const room = "buffered";
  const page = await tab(room, BUFFERING_URL);
  await page.routeWebSocket(/\/ws(\?|$)/, (ws) => ws.close()); // WebSocket refused too
  const sse = [];
  page.on("response", (r) => {
    if (new URL(r.url()).pathname === "/sse") sse.push({ status: r.status(), type: r.headers()["content-type"] });
  });
  const t0 = Date.now();
  await start(page, "pia", { connectTimeoutMs: 1500 }, room);
  await connected(page, "longpoll");
  const took = Date.now() - t0;
  assert.deepEqual(sse, [{ status: 200, type: "text/event-stream" }], "the SSE answer's head came through the proxy");
  assert.ok(took >= 1400, `SSE had its connectTimeoutMs (${took} ms)`);
  const { welcomes, states } = await log(page);
  assert.equal(welcomes.length, 1, "no welcome ever came over the buffered stream");
  assert.ok(!states.some((s) => s.state === "connected" && s.transport !== "longpoll"));
  await joined(page, room);
  await publish(room, { n: 1 });
  await waitForMessages(page, 1);
  const sent = await publishFromPage(page, room, { n: 2 });
  assert.ok(sent.ok, "and it can publish over long-poll through the proxy");
  await waitForMessages(page, 2);
  await page.context().close();
});

test("a transport that sends welcome and then nothing is given up after maxSilentFailures", { timeout: 40_000 }, async () => {
  const page = await tab("mute");
  const attempts = [];
  await page.routeWebSocket(/\/ws(\?|$)/, (ws) => {
    attempts.push(Date.now());
    // A proxy that lets the first frame through and holds the rest.
    ws.send(JSON.stringify({ type: "welcome", sid: `mute-${attempts.length}`, heartbeat: { interval_ms: 1000, timeout_ms: 1000 } }));
  });
  await start(page, "quinn", { backoffBaseMs: 100, backoffMaxMs: 300, maxSilentFailures: 2 }, "mute");
  await page.waitForFunction(() => window.sb.transport === "sse" && window.sb.state === "connected", null, { timeout: 20_000 });
  await joined(page, "mute");
  assert.equal(attempts.length, 2, "two silent WebSocket connections, then the next transport");
  const { welcomes } = await log(page);
  assert.deepEqual(welcomes.slice(0, 2), ["mute-1", "mute-2"]);
  await publish("mute", { n: 1 });
  await waitForMessages(page, 1);
  await page.waitForTimeout(3500); // more than SSE's own heartbeat window: a working stream stays
  assert.equal(await page.evaluate(() => window.sb.transport), "sse");
  assert.equal(attempts.length, 2, "not back to the silent transport before upgradeAfterMs");
  assert.equal((await log(page)).welcomes.length, 3);
  await page.context().close();
});

test("SSE: a send that fails (network, 5xx, refused) rejects at once with a clear code; the stream stays", { timeout: 30_000 }, async () => {
  const room = "sse-send";
  const page = await tab(room);
  let mode = "pass";
  await page.route(
    (url) => url.pathname === "/sse/send",
    (route) => {
      if (route.request().postData().includes('"type":"ping"')) return route.continue(); // keep the heartbeat out of it
      if (mode === "abort") return route.abort("connectionreset");
      if (mode === "502") return route.fulfill({ status: 502, contentType: "text/html", body: "<h1>Bad Gateway</h1>" });
      if (mode === "413")
        return route.fulfill({
          status: 413,
          contentType: "application/json",
          body: JSON.stringify({ error: { code: "frame_too_large", message: "body larger than 262144 bytes" } }),
        });
      return route.continue();
    },
  );
  await start(page, "rita", { transports: ["sse"] }, room);
  await connected(page, "sse");
  await joined(page, room);
  const sid = await page.evaluate(() => window.sb.sid);
  mode = "abort";
  const lost = await publishFromPage(page, room, { n: 1 });
  assert.equal(lost.ok, false);
  assert.equal(lost.code, "send_failed");
  assert.ok(lost.took < 2000, `rejected at once (${lost.took} ms)`);
  mode = "502";
  const bad = await publishFromPage(page, room, { n: 2 });
  assert.deepEqual([bad.ok, bad.code, bad.status], [false, "send_failed", 502]);
  mode = "413";
  const big = await publishFromPage(page, room, { n: 3 });
  assert.deepEqual([big.ok, big.code, big.status], [false, "frame_too_large", 413]);
  mode = "pass";
  const ok = await publishFromPage(page, room, { n: 4 });
  assert.ok(ok.ok, "then it publishes again");
  await waitForMessages(page, 1);
  const { messages, welcomes } = await log(page);
  assert.deepEqual(messages.map((m) => m.data.n), [4], "only what was accepted arrived");
  assert.equal(welcomes.length, 1, "the stream stayed");
  assert.equal(await page.evaluate(() => window.sb.sid), sid);
  assert.notEqual(await page.evaluate(() => window.sb.conn.canSense), false, "a failed send is not a push-only server");
  await page.context().close();
});

test("a publish whose answer was lost, sent again with its idempotencyKey, is published once", { timeout: 30_000 }, async () => {
  const room = "idem";
  const page = await tab(room);
  const network = await controlledNetwork(page);
  await start(page, "ivy", { transports: ["websocket"] }, room);
  await connected(page, "websocket");
  await joined(page, room);
  // The server takes the publish; its answer never reaches the page, whose
  // connection then drops.
  network.fromServer = (frame) => (frame.type === "ack" ? null : frame);
  const first = publishFromPage(page, room, { n: 1 }, { idempotencyKey: "ivy-1" });
  await eventually(() => network.sent.some((f) => f.type === "publish"), { what: "the publish to be sent" });
  await waitForMessages(page, 1);
  await network.down();
  const lost = await first;
  assert.deepEqual([lost.ok, lost.code], [false, "connection_lost"], "its fate is unknown to the page");
  network.fromServer = (frame) => frame;
  network.up();
  await connected(page, "websocket");
  await eventually(() => network.sent.filter((f) => f.type === "join").length >= 2, { what: "the rejoin" });
  await joined(page, room);
  const retry = await publishFromPage(page, room, { n: 1 }, { idempotencyKey: "ivy-1" });
  assert.ok(retry.ok, `the retry is acked (${retry.code})`);
  await publish(room, { n: 2 });
  await waitForMessages(page, 2);
  await page.waitForTimeout(300);
  assert.deepEqual((await log(page)).messages.map((m) => [m.data.n, m.seq]), [
    [1, 1],
    [2, 2],
  ]);
  await page.context().close();
});

test("long-poll: a failed send rejects every request of its batch, and the queue goes on", { timeout: 30_000 }, async () => {
  const room = "poll-send";
  const page = await tab(room);
  let failing = false;
  await page.route(
    (url) => url.pathname === "/poll/send",
    (route) => (failing ? route.abort("connectionreset") : route.continue()),
  );
  await start(page, "sam", { transports: ["longpoll"] }, room);
  await connected(page, "longpoll");
  await joined(page, room);
  failing = true;
  const results = await page.evaluate(async (room) => {
    const r = window.sb.rooms.get(room);
    const settle = (p) => p.then(() => "ok", (e) => e.code);
    return Promise.all([settle(r.publish({ n: 1 })), settle(r.publish({ n: 2 })), settle(r.publish({ n: 3 }))]);
  }, room);
  assert.deepEqual(results, ["send_failed", "send_failed", "send_failed"], "none of them hangs");
  failing = false;
  const ok = await publishFromPage(page, room, { n: 4 });
  assert.ok(ok.ok, `the next one goes through (${ok.code})`);
  await waitForMessages(page, 1);
  assert.deepEqual((await log(page)).messages.map((m) => m.data.n), [4]);
  assert.equal((await log(page)).welcomes.length, 1, "same session");
  await page.context().close();
});

test("a request with no answer rejects after requestTimeoutMs", { timeout: 30_000 }, async () => {
  const room = "timeout";
  const page = await tab(room);
  // Long-poll: a send that the network holds forever.
  await page.route(
    (url) => url.pathname === "/poll/send",
    () => {},
  );
  await start(page, "tom", { transports: ["longpoll"], requestTimeoutMs: 1000 }, room);
  await connected(page, "longpoll");
  const t0 = Date.now();
  const code = await page.evaluate(() => window.sb.direct({ user: "nobody" }, { hi: 1 }).then(() => "ok", (e) => e.code));
  const took = Date.now() - t0;
  assert.equal(code, "timeout");
  assert.ok(took >= 900 && took < 4000, `after about 1 s (${took} ms)`);
  await page.context().close();

  // WebSocket: the frame leaves, its answer never comes.
  const ws = await tab(`${room}-ws`);
  const network = await controlledNetwork(ws);
  await start(ws, "tom", { transports: ["websocket"], requestTimeoutMs: 1000 }, room);
  await connected(ws, "websocket");
  await joined(ws, room);
  network.mute = true;
  const r = await publishFromPage(ws, room, { n: 1 });
  assert.deepEqual([r.ok, r.code], [false, "timeout"]);
  assert.ok(r.took >= 900 && r.took < 4000, `after about 1 s (${r.took} ms)`);
  await ws.context().close();
});

test("SSE: a 403 for a stale sid is not taken for a push-only server: it reconnects", { timeout: 30_000 }, async () => {
  const room = "stale";
  const page = await tab(room);
  let stale = false;
  const probes = [];
  await page.route(
    (url) => url.pathname === "/sse/send",
    (route) => {
      const url = new URL(route.request().url());
      if (!url.searchParams.has("sid")) probes.push(route.request().postData());
      if (stale && url.searchParams.has("sid")) {
        stale = false;
        url.searchParams.set("sid", "AAAAAAAAAAAAAAAAAAAAAA"); // a session the server does not know
        return route.continue({ url: url.toString() });
      }
      return route.continue();
    },
  );
  await start(page, "una", { transports: ["sse"], backoffBaseMs: 200 }, room);
  await connected(page, "sse");
  await joined(page, room);
  const first = await page.evaluate(() => window.sb.sid);
  stale = true;
  const r = await publishFromPage(page, room, { n: 1 });
  assert.deepEqual([r.ok, r.code], [false, "connection_lost"]);
  assert.equal(probes.length, 1, "it asked once, without a sid, which 403 it was");
  await page.waitForFunction((first) => window.sb.state === "connected" && window.sb.sid !== first, first, { timeout: WAIT });
  await joined(page, room);
  assert.notEqual(await page.evaluate(() => window.sb.conn.canSense), false, "heartbeat detection stays on");
  const ok = await publishFromPage(page, room, { n: 2 });
  assert.ok(ok.ok);
  await waitForMessages(page, 1);
  // And silence is still noticed on the new stream: it pings, and gets pong.
  const pongs = await page.evaluate(
    () =>
      new Promise((resolve) => {
        const before = window.sb.connHealthy;
        setTimeout(() => resolve({ before, after: window.sb.connHealthy }), 2500);
      }),
  );
  assert.equal(pongs.after, true, "a ping after 1.5 s of silence was answered over the stream");
  await page.context().close();
});

test("push-only SSE server: rooms ride on the URL (late joins too), no pings, requests refused", { timeout: 30_000 }, async () => {
  const page = await tab("push-only", PUSH_ONLY_URL);
  await start(page, "vera", { transports: ["sse"] }, "po-a");
  await connected(page, "sse");
  await joined(page, "po-a");
  // Its first ping is refused: from then on it listens only.
  await page.waitForFunction(() => window.sb.conn && window.sb.conn.canSense === false, null, { timeout: WAIT });
  await page.evaluate(() => {
    window.sb.join("po-b", (data, frame) => window.log.messages.push({ seq: frame.seq, room: "po-b", data }), {
      onError: (e) => window.log.errors.push(e.code),
    });
  });
  await joined(page, "po-b");
  await joined(page, "po-a");
  await publish("po-a", { n: 1 }, PUSH_ONLY_URL);
  await publish("po-b", { n: 2 }, PUSH_ONLY_URL);
  await waitForMessages(page, 2);
  const refused = await publishFromPage(page, "po-a", { n: 3 });
  assert.deepEqual([refused.ok, refused.code], [false, "forbidden"]);
  const welcomes = (await log(page)).welcomes.length;
  await page.waitForTimeout(4000); // past the heartbeat window: silence (to the page) is not a reason to leave
  const after = await log(page);
  assert.equal(after.welcomes.length, welcomes, "stayed connected");
  assert.deepEqual(after.errors, [], "the late join was not dropped");
  assert.deepEqual(after.messages.map((m) => m.data.n), [1, 2]);
  await page.context().close();
});

test("a hole in a room's seq on a live connection: rejoin with since, replayed in order", { timeout: 30_000 }, async () => {
  const room = "hole";
  const page = await tab(room);
  const network = await controlledNetwork(page);
  await start(page, "walt", { transports: ["websocket"] }, room);
  await connected(page, "websocket");
  await joined(page, room);
  // The network loses one message (3), once.
  let dropped = false;
  network.fromServer = (frame) => {
    if (!dropped && frame.type === "message" && frame.data.n === 3) {
      dropped = true;
      return null;
    }
    return frame;
  };
  for (let n = 1; n <= 6; n++) await publish(room, { n });
  await waitForMessages(page, 6);
  await page.waitForTimeout(300);
  const { messages, welcomes, resets } = await log(page);
  assert.ok(dropped);
  assert.deepEqual(messages.map((m) => m.data.n), [1, 2, 3, 4, 5, 6], "every message once, in order");
  assert.deepEqual(messages.map((m) => m.seq), [1, 2, 3, 4, 5, 6]);
  assert.equal(welcomes.length, 1, "on the same connection");
  assert.deepEqual(resets, []);
  const rejoins = network.sent.filter((f) => f.type === "join" && f.since);
  assert.equal(rejoins.length, 1, "one rejoin");
  assert.equal(rejoins[0].since.seq, 2, "since the last seq it had without a hole");
  await page.context().close();
});

test("an epoch change on a live connection: rejoin with since", { timeout: 30_000 }, async () => {
  const room = "epoch";
  const page = await tab(room);
  const network = await controlledNetwork(page);
  await start(page, "xena", { transports: ["websocket"] }, room);
  await connected(page, "websocket");
  await joined(page, room);
  let epoch = null;
  let changed = false;
  network.fromServer = (frame) => {
    if (frame.type === "message") epoch = frame.epoch;
    if (!changed && frame.type === "message" && frame.data.n === 3) {
      changed = true;
      return { ...frame, epoch: "another-epoch" }; // as if the room's history had been lost
    }
    return frame;
  };
  for (let n = 1; n <= 4; n++) await publish(room, { n });
  await waitForMessages(page, 4);
  const { messages } = await log(page);
  assert.deepEqual(messages.map((m) => [m.data.n, m.epoch]), [1, 2, 3, 4].map((n) => [n, epoch]));
  const rejoins = network.sent.filter((f) => f.type === "join" && f.since);
  assert.deepEqual(rejoins.map((f) => f.since), [{ seq: 2, epoch }], "rejoined from where it was");
  await page.context().close();
});

test("a hole the server can no longer fill: recovered false, onReset, and on from there", { timeout: 40_000 }, async () => {
  const room = "hole-reset";
  const page = await tab(room);
  const network = await controlledNetwork(page);
  await start(page, "yuri", { transports: ["websocket"] }, room);
  await connected(page, "websocket");
  await joined(page, room);
  await publish(room, { n: 1 });
  await waitForMessages(page, 1);
  // 2..102 are lost on the way: more than the room's 100 of history.
  network.fromServer = (frame) => (frame.type === "message" && frame.data.n >= 2 && frame.data.n <= 102 ? null : frame);
  for (let n = 2; n <= 103; n++) await publish(room, { n });
  await page.waitForFunction(() => window.log.resets.length > 0, null, { timeout: WAIT });
  await publish(room, { n: 104 });
  await waitForMessages(page, 2);
  const { messages, resets, welcomes } = await log(page);
  assert.equal(resets.length, 1);
  assert.equal(resets[0].recovered, false);
  assert.equal(resets[0].seq, 103);
  assert.deepEqual(messages.map((m) => m.data.n), [1, 104], "the page reloads the rest by other means");
  assert.equal(welcomes.length, 1, "same connection");
  await page.context().close();
});

test("echo: false is no hole: no rejoin for one's own unechoed publishes", { timeout: 30_000 }, async () => {
  const room = "noecho";
  const page = await tab(room);
  const network = await controlledNetwork(page);
  await start(page, "zoe", { transports: ["websocket"] }, room);
  await connected(page, "websocket");
  await joined(page, room);
  await publish(room, { n: 1 });
  await waitForMessages(page, 1);
  for (const n of [2, 3]) assert.ok((await publishFromPage(page, room, { n }, { echo: false })).ok);
  await publish(room, { n: 4 });
  await waitForMessages(page, 2);
  await page.waitForTimeout(300);
  const { messages } = await log(page);
  assert.deepEqual(messages.map((m) => [m.data.n, m.seq]), [
    [1, 1],
    [4, 4],
  ]);
  assert.deepEqual(network.sent.filter((f) => f.type === "join" && f.since), [], "no rejoin");
  await page.context().close();
});

// Rooms named `latest…` are latest-value rooms on the test server.

test("latest-value room: a join replays its state, gaps in seq and all, and that is no hole", { timeout: 30_000 }, async () => {
  const room = "latest-replay";
  // a@1 is replaced by a@3, then by a@4: the room keeps b@2 and a@4.
  await publishEvents(room, [["a", 1], ["b", 2], ["a", 3], ["a", 4]]);
  const page = await tab(room);
  const network = await controlledNetwork(page);
  await start(page, "ada", { transports: ["websocket"] }, room);
  await connected(page, "websocket");
  await joined(page, room);
  await waitForMessages(page, 2);
  await publishEvents(room, [["b", 5]]);
  await waitForMessages(page, 3);
  await page.waitForTimeout(300);
  const { messages, resets } = await log(page);
  assert.deepEqual(messages.map((m) => [m.data.n, m.seq]), [
    [2, 2],
    [4, 4],
    [5, 5],
  ]);
  assert.equal(await page.evaluate((room) => window.sb.rooms.get(room).latest, room), true, "joined said latest");
  assert.deepEqual(network.sent.filter((f) => f.type === "join" && f.since), [], "no rejoin for the gap");
  assert.deepEqual(resets, []);
  await page.context().close();
});

test("latest-value room over long-poll: values queued while it does not poll are replaced; it gets the newest, no rejoin", { timeout: 30_000 }, async () => {
  const room = "latest-poll";
  const page = await tab(room);
  // Polls wait while `held` is set; the client's frames are recorded.
  let held = null;
  let polls = 0;
  const sent = [];
  await page.route(
    (url) => url.pathname === "/poll",
    async (route) => {
      await held;
      polls += 1;
      await route.continue();
    },
  );
  await page.route(
    (url) => url.pathname === "/poll/send",
    async (route) => {
      sent.push(...JSON.parse(route.request().postData()));
      await route.continue();
    },
  );
  await start(page, "bea", { transports: ["longpoll"] }, room);
  await connected(page, "longpoll");
  await joined(page, room);
  await publishEvents(room, [["a", 1]]);
  await waitForMessages(page, 1);
  // Once the poll after a@1 has gone out, hold the ones after it: the
  // outstanding poll takes a@2, and the next one waits.
  const before = polls;
  await eventually(() => polls > before, { what: "the poll after a@1" });
  let release;
  held = new Promise((resolve) => (release = resolve));
  await publishEvents(room, [["a", 2]]);
  await waitForMessages(page, 2);
  // Queued, unsent: a@3 is replaced by a@5; b@4 stays.
  await publishEvents(room, [["a", 3], ["b", 4], ["a", 5]]);
  release();
  held = null;
  await waitForMessages(page, 4);
  await publishEvents(room, [["a", 6]]);
  await waitForMessages(page, 5);
  await page.waitForTimeout(300);
  const { messages, resets } = await log(page);
  assert.deepEqual(messages.map((m) => [m.data.n, m.seq]), [
    [1, 1],
    [2, 2],
    [4, 4],
    [5, 5],
    [6, 6],
  ]);
  assert.deepEqual(sent.filter((f) => f.type === "join" && f.since), [], "no rejoin for the gap");
  assert.deepEqual(resets, []);
  await page.context().close();
});

test("no page had an uncaught error", () => {
  assert.deepEqual(errors, []);
});
