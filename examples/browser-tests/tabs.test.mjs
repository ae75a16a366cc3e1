// `shareTabs: true` in a real browser: three tabs of one user in one browser
// (one context: one origin's BroadcastChannel and Web Locks), against a
// plain server of its own (trusting the client's name, heartbeat 1.5 s +
// 1.5 s, HTTP publish API on) whose `/metrics` counts its sessions. Run by
// examples/tests/jobs_browser.rs:
//
//   TABS_URL      the server (its `/` is a blank page to load the client into)
//   TABS_API_KEY  the publish API's bearer key
//   TABS_PUSH_ONLY_URL  the same, taking no client frames over SSE

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { launch, watch, post, eventually, sessionCount } from "./harness.mjs";

const URL_ = process.env.TABS_URL;
const API_KEY = process.env.TABS_API_KEY;
const WAIT = 10_000;

let browser;
const errors = [];

before(async () => {
  assert.ok(URL_ && API_KEY, "set TABS_URL and TABS_API_KEY (examples/tests/jobs_browser.rs does)");
  browser = await launch();
});

after(async () => {
  if (browser) await browser.close();
  assert.deepEqual(errors, [], "no uncaught errors in the pages");
});

/** A tab in `context` with a shared-tabs client of `user` joined to `rooms`;
 * it records every frame its Switchboard is handed (`log.frames`), every
 * message per room, and its states. */
async function tab(context, name, user, rooms, options = {}, base = URL_) {
  const page = watch(await context.newPage(), name, errors);
  await page.goto(base);
  await page.evaluate(
    async ({ user, rooms, options }) => {
      const { Switchboard } = await import("/switchboard.js");
      const log = (window.log = { frames: [], messages: {}, states: [], welcomes: [], directs: [], roomErrors: {} });
      const sb = (window.sb = new Switchboard({ token: user, shareTabs: true, backoffBaseMs: 200, ...options }));
      const handle = sb.handleFrame.bind(sb);
      sb.handleFrame = (frame) => {
        log.frames.push(frame);
        handle(frame);
      };
      sb.on("state", ({ state, transport }) => log.states.push({ state, transport, at: Date.now() }));
      sb.on("welcome", (frame) => log.welcomes.push({ sid: frame.sid, at: Date.now() }));
      sb.on("direct", (frame) => log.directs.push(frame.data));
      window.joinRoom = (room, options = {}) => {
        log.messages[room] = [];
        sb.join(room, (data, frame) => log.messages[room].push({ seq: frame.seq, data }), {
          ...options,
          onError: (e) => (log.roomErrors[room] = e.code),
        });
      };
      for (const room of rooms) window.joinRoom(room);
    },
    { user, rooms, options },
  );
  return page;
}

const log = (page) => page.evaluate(() => window.log);

function allJoined(page) {
  return page.waitForFunction(
    () => window.sb.state === "connected" && [...window.sb.rooms.values()].every((r) => r.joined),
    null,
    { timeout: WAIT },
  );
}

async function publish(room, data, base = URL_) {
  return JSON.parse(await post(new URL("api/publish", base), { room, data }, { authorization: `Bearer ${API_KEY}` }));
}

const sessions = () => sessionCount(URL_);

function received(page, room, n) {
  return page.waitForFunction(({ room, n }) => (window.log.messages[room] || []).length >= n, { room, n }, { timeout: WAIT });
}

/** Runs `body` in the page with its `window.sb`; resolves with {ok, value} or {ok: false, code}. */
function inPage(page, body, arg) {
  return page.evaluate(
    async ({ body, arg }) => {
      try {
        return { ok: true, value: await new Function("sb", "arg", `return (async () => { ${body} })()`)(window.sb, arg) };
      } catch (e) {
        return { ok: false, code: e.code, message: e.message };
      }
    },
    { body, arg },
  );
}

test("three tabs, one session: each tab gets its own rooms and requests as a normal client", { timeout: 60_000 }, async () => {
  const context = await browser.newContext();
  try {
    await sharedSession(context);
  } finally {
    await context.close();
  }
  await eventually(async () => (await sessions()) === 0, { what: "the session to end with the tabs" });
});

async function sharedSession(context) {
  const one = await tab(context, "one", "tess", ["ta", "tall"]);
  const two = await tab(context, "two", "tess", ["tb", "tall"]);
  const three = await tab(context, "three", "tess", ["ta", "tc", "tall"]);
  const tabs = [one, two, three];
  for (const page of tabs) await allJoined(page);

  assert.equal(await sessions(), 1, "the server sees one session for three tabs");
  const leaders = await Promise.all(tabs.map((p) => p.evaluate(() => window.sb.isLeader)));
  assert.equal(leaders.filter(Boolean).length, 1, `one leader (${leaders})`);
  const sids = await Promise.all(tabs.map((p) => p.evaluate(() => window.sb.sid)));
  assert.equal(new Set(sids).size, 1, "every tab is on the one session");

  for (const room of ["ta", "tb", "tc", "tall"]) for (let n = 1; n <= 3; n++) await publish(room, { room, n });
  const want = { one: ["ta", "tall"], two: ["tall", "tb"], three: ["ta", "tall", "tc"] }; // sorted
  for (const [name, page] of [["one", one], ["two", two], ["three", three]]) {
    for (const room of want[name]) await received(page, room, 3);
  }
  await one.waitForTimeout(300); // room for a stray frame to show up
  for (const [name, page] of [["one", one], ["two", two], ["three", three]]) {
    const { frames, messages } = await log(page);
    const rooms = new Set(frames.filter((f) => f.type === "message").map((f) => f.room));
    assert.deepEqual([...rooms].sort(), want[name], `${name} is handed messages of its rooms only`);
    for (const room of want[name]) {
      assert.deepEqual(
        messages[room].map((m) => [m.seq, m.data.n]),
        [
          [1, 1],
          [2, 2],
          [3, 3],
        ],
        `${name} got ${room} once each, in order`,
      );
    }
    const joinedRooms = frames.filter((f) => f.type === "joined").map((f) => f.room).sort();
    assert.deepEqual(joinedRooms, want[name], `${name} is handed the joined of its own joins only`);
  }

  // A publish from a follower is acked; echo: false keeps it from its own tab only.
  const follower = tabs[leaders.indexOf(false)];
  assert.deepEqual(await inPage(follower, "await sb.rooms.get('tall').publish({ n: 4 }); return 'acked'"), { ok: true, value: "acked" });
  assert.deepEqual(await inPage(follower, "await sb.rooms.get('tall').publish({ n: 5 }, { echo: false }); return 'acked'"), {
    ok: true,
    value: "acked",
  });
  for (const page of tabs) await received(page, "tall", page === follower ? 4 : 5);
  await follower.waitForTimeout(300);
  for (const page of tabs) {
    const got = (await log(page)).messages.tall.map((m) => m.data.n);
    assert.deepEqual(got, page === follower ? [1, 2, 3, 4] : [1, 2, 3, 4, 5], "echo: false skips the publishing tab only");
  }

  // Errors reach the tab that caused them, as from the server.
  await follower.evaluate(() => window.joinRoom("not a room!"));
  await follower.waitForFunction(() => window.log.roomErrors["not a room!"], null, { timeout: WAIT });
  assert.equal((await log(follower)).roomErrors["not a room!"], "invalid_room");
  const refused = await inPage(follower, "await sb.direct({ user: 'nobody-here' }, {}); return 'acked'");
  assert.equal(refused.code, "unknown_target", "a refused request rejects with the server's code");

  // Leaving: a room another tab still holds is acked and stops reaching this
  // tab only; a room this tab is not in is `not_joined`.
  const before = (await log(three)).messages.ta.length;
  assert.deepEqual(await inPage(one, "await sb.rooms.get('ta').leave(); return 'left'"), { ok: true, value: "left" });
  const stale = await inPage(one, "return await sb.request({ type: 'leave', room: 'tc' })");
  assert.equal(stale.code, "not_joined", "one never joined tc (three did)");
  await publish("ta", { n: 4 });
  await received(three, "ta", before + 1);
  await one.waitForTimeout(300);
  assert.equal((await log(one)).frames.filter((f) => f.type === "message" && f.room === "ta" && f.seq === 4).length, 0);

  // A direct to the user reaches every tab; a ping is answered.
  await post(new URL("api/direct", URL_), { user: "tess", data: { hi: 1 } }, { authorization: `Bearer ${API_KEY}` });
  for (const page of tabs) await page.waitForFunction(() => window.log.directs.length === 1, null, { timeout: WAIT });
  for (const page of tabs) assert.deepEqual(await inPage(page, "await sb.request({ type: 'ping' }); return 'pong'"), { ok: true, value: "pong" });

  assert.equal(await sessions(), 1, "still one session");

  // A tab closed (not its Switchboard: the page goes away) is noticed by its
  // lock: the shared session leaves the rooms no other tab wants, as an
  // unshared client of another user sees by presence, and stays in the rest.
  const watcher = watch(await context.newPage(), "watcher", errors);
  await watcher.goto(URL_);
  await watcher.evaluate(async () => {
    const { Switchboard } = await import("/switchboard.js");
    window.events = [];
    const sb = (window.sb = new Switchboard({ token: "walt" }));
    sb.join("tonly", null, { onPresence: (frame) => window.events.push(`${frame.action} ${frame.user}`) });
  });
  await allJoined(watcher);
  await follower.evaluate(() => window.joinRoom("tonly"));
  await allJoined(follower);
  await watcher.waitForFunction(() => window.events.includes("join tess"), null, { timeout: WAIT });
  await follower.close();
  await watcher.waitForFunction(() => window.events.includes("leave tess"), null, { timeout: WAIT });
  const rest = tabs.filter((p) => p !== follower);
  const counts = await Promise.all(rest.map(async (p) => (await log(p)).messages.tall.length));
  await publish("tall", { n: 6 });
  for (const [i, page] of rest.entries()) await received(page, "tall", counts[i] + 1);
  assert.equal(await sessions(), 2, "the shared session and the watcher's");
  await watcher.close();
}

for (const transport of ["websocket", "sse", "longpoll"]) {
  test(`${transport}: closing the leader tab while messages flow: the others get each once, in order, from a new leader`, { timeout: 90_000 }, async () => {
    const context = await browser.newContext();
    try {
      await handover(context, transport);
    } finally {
      await context.close();
    }
  });
}

async function handover(context, transport) {
  const room = `flow-${transport}`;
  const tabs = [];
  for (const name of ["a", "b", "c"])
    tabs.push(await tab(context, `handover-${transport}-${name}`, `ursula-${transport}`, [room], { transports: [transport] }));
  for (const page of tabs) await allJoined(page);
  for (const page of tabs) assert.equal(await page.evaluate(() => window.sb.transport), transport, "the leader's transport");
  assert.equal(await sessions(), 1);
  const leaders = await Promise.all(tabs.map((p) => p.evaluate(() => window.sb.isLeader)));
  assert.equal(leaders.filter(Boolean).length, 1);
  const leader = tabs[leaders.indexOf(true)];
  const others = tabs.filter((p) => p !== leader);

  const total = 80;
  let closedAt = null;
  for (let n = 1; n <= total; n++) {
    await publish(room, { n });
    if (n === 20) {
      await leader.close(); // the tab goes away: its lock is released
      closedAt = Date.now();
    }
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
  for (const page of others) await received(page, room, total);
  await others[0].waitForTimeout(500); // room for a duplicate to show up
  for (const page of others) {
    const { messages, welcomes } = await log(page);
    assert.deepEqual(
      messages[room].map((m) => m.data.n),
      Array.from({ length: total }, (_, i) => i + 1),
      "every message once, in order",
    );
    assert.deepEqual(
      messages[room].map((m) => m.seq),
      Array.from({ length: total }, (_, i) => i + 1),
    );
    assert.equal(welcomes.length, 2, `one welcome from each leader: ${JSON.stringify(welcomes)}`);
  }
  const now = await Promise.all(others.map((p) => p.evaluate(() => window.sb.isLeader)));
  assert.equal(now.filter(Boolean).length, 1, "one of the others leads");
  // How long the takeover took (the new leader's welcome in each remaining
  // tab after the old leader's tab closed): shown, not asserted.
  for (const page of others) {
    const { welcomes } = await log(page);
    console.log(`takeover: welcomed by the new leader ${welcomes[1].at - closedAt} ms after the leader tab closed`);
  }
  assert.notEqual((await log(others[0])).welcomes[1].sid, (await log(others[0])).welcomes[0].sid, "a new session");
  const sids = await Promise.all(others.map((p) => p.evaluate(() => window.sb.sid)));
  assert.equal(new Set(sids).size, 1, "the remaining tabs share one session");
  // A closed page's long-poll session is not told; the server ends it
  // after its idle timeout. WebSocket and SSE sessions end with the page.
  if (transport !== "longpoll") await eventually(async () => (await sessions()) === 1, { what: "one session again" });
}

test("a push-only SSE server cannot take the leader's joins: the shared connection moves on to long-poll", { timeout: 60_000 }, async () => {
  const base = process.env.TABS_PUSH_ONLY_URL;
  assert.ok(base, "set TABS_PUSH_ONLY_URL (examples/tests/jobs_browser.rs does)");
  const context = await browser.newContext();
  try {
    const options = { transports: ["sse", "longpoll"] };
    const tabs = [await tab(context, "push-a", "pia", ["pushed"], options, base), await tab(context, "push-b", "pia", ["pushed"], options, base)];
    for (const page of tabs) await allJoined(page);
    for (const page of tabs) assert.equal(await page.evaluate(() => window.sb.transport), "longpoll");
    await publish("pushed", { n: 1 }, base);
    for (const page of tabs) await received(page, "pushed", 1);
  } finally {
    await context.close();
  }
});

test("the leader's page closes its client (sb.close()): the other tab takes over and the closed one hears nothing more", { timeout: 60_000 }, async () => {
  const context = await browser.newContext();
  try {
    const tabs = [await tab(context, "quit-a", "quinn", ["quit"]), await tab(context, "quit-b", "quinn", ["quit"])];
    for (const page of tabs) await allJoined(page);
    const leaders = await Promise.all(tabs.map((p) => p.evaluate(() => window.sb.isLeader)));
    const leader = tabs[leaders.indexOf(true)];
    const other = tabs[leaders.indexOf(false)];
    await publish("quit", { n: 1 });
    for (const page of tabs) await received(page, "quit", 1);
    // The server may still hold a closed page's long-poll session of an
    // earlier test (until its idle timeout): counted relative to now.
    const before = await sessions();
    await leader.evaluate(() => window.sb.close());
    await publish("quit", { n: 2 });
    await received(other, "quit", 2);
    assert.ok(await other.evaluate(() => window.sb.isLeader), "the other tab leads");
    assert.deepEqual((await log(other)).messages.quit.map((m) => m.data.n), [1, 2]);
    await publish("quit", { n: 3 });
    await received(other, "quit", 3);
    const closed = await leader.evaluate(() => ({ state: window.sb.state, leads: window.sb.isLeader, got: window.log.messages.quit.length }));
    assert.deepEqual(closed, { state: "closed", leads: false, got: 1 });
    await eventually(async () => (await sessions()) <= before, { what: "the closed leader's session to end (one session, the new leader's)" });
  } finally {
    await context.close();
  }
});
