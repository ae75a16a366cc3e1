// The chat example in a real browser: headless Chromium (the system's, not a
// downloaded one) driven by playwright-core, under node's own test runner.
//
//   CHAT_URL=http://127.0.0.1:8080/ node --test examples/browser-tests/chat.test.mjs
//
// Environment:
//   CHAT_URL        the running chat (required)
//   CHROMIUM_PATH   the browser (default /usr/bin/chromium: `apt-get install -y chromium`)
//   SCREENSHOT_DIR  where to write screenshots (optional)
//
// Three tabs as two users: alice in two tabs of one browser, bob in another
// browser, all in room `lobby`. The tests run in order and share the tabs.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import path from "node:path";
import { chromium } from "playwright-core";

const CHAT_URL = process.env.CHAT_URL;
const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const SCREENSHOT_DIR = process.env.SCREENSHOT_DIR;
const VIEWPORT = { width: 1000, height: 650 };
const ROOM = "room:lobby";
const WAIT = 10_000;

let browser;
let aliceBrowser; // one browser profile for both of alice's tabs
let bobBrowser;
let a1;
let a2;
let b1;
const dialogs = [];
const pageErrors = [];

before(async () => {
  assert.ok(CHAT_URL, "set CHAT_URL to the chat's address, e.g. http://127.0.0.1:8080/");
  assert.ok(existsSync(CHROMIUM), `no browser at ${CHROMIUM}: apt-get install -y chromium (or set CHROMIUM_PATH)`);
  // playwright gives every launch a fresh temporary user data dir (profile)
  // and removes it on close.
  browser = await chromium.launch({
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
  aliceBrowser = await browser.newContext({ viewport: VIEWPORT });
  bobBrowser = await browser.newContext({ viewport: VIEWPORT });
});

after(async () => {
  if (browser) await browser.close();
});

function watch(page, who) {
  page.on("dialog", (dialog) => {
    dialogs.push(`${who}: ${dialog.message()}`);
    dialog.dismiss().catch(() => {});
  });
  page.on("pageerror", (error) => pageErrors.push(`${who}: ${error.message}`));
  return page;
}

async function open(context, who) {
  const page = watch(await context.newPage(), who);
  return page;
}

async function signIn(page, name, room = "lobby") {
  await page.goto(CHAT_URL);
  await page.fill("#login-name", name);
  await page.fill("#login-room", room);
  await click(page, "#login-form button[type=submit]");
  await page.locator('#status[data-state="connected"]').waitFor({ timeout: WAIT });
  await waitForNotice(page, ROOM, `You joined #${room}`);
}

/** Rows of a conversation's log, as the page shows them. */
function readLog(page, conv) {
  return page.$$eval(`.log[data-conv="${conv}"] > *`, (rows) => {
    return rows.map((row) => {
      if (row.classList.contains("notice")) return { notice: row.textContent };
      const style = getComputedStyle(row);
      const bubble = row.querySelector(".bubble");
      const box = row.getBoundingClientRect();
      const log = row.parentElement.getBoundingClientRect();
      return {
        text: row.querySelector(".text").textContent,
        user: row.dataset.user,
        seq: row.dataset.seq === undefined ? undefined : Number(row.dataset.seq),
        mine: row.classList.contains("mine"),
        theirs: row.classList.contains("theirs"),
        private: row.classList.contains("private"),
        tag: row.querySelector(".tag")?.textContent,
        time: row.querySelector("time")?.textContent,
        alignSelf: style.alignSelf,
        background: getComputedStyle(bubble).backgroundColor,
        gapLeft: box.left - log.left,
        gapRight: log.right - box.right,
        visible: box.width > 0,
      };
    });
  });
}

async function messages(page, conv) {
  return (await readLog(page, conv)).filter((row) => row.text !== undefined);
}

function waitForMessage(page, conv, text, timeout = WAIT) {
  return page.waitForFunction(
    ([conv, text]) =>
      [...document.querySelectorAll(`.log[data-conv="${conv}"] .msg .text`)].some((t) => t.textContent === text),
    [conv, text],
    { timeout },
  );
}

/** Waits until the log holds more than `already` notices containing `text`. */
function waitForNotice(page, conv, text, timeout = WAIT, already = 0) {
  return page.waitForFunction(
    ([conv, text, already]) =>
      [...document.querySelectorAll(`.log[data-conv="${conv}"] .notice`)].filter((n) => n.textContent.includes(text))
        .length > already,
    [conv, text, already],
    { timeout },
  );
}

async function countNotices(page, conv, text) {
  return (await readLog(page, conv)).filter((r) => r.notice && r.notice.includes(text)).length;
}

/** Clicks like a person: on the tab in front (a background tab's animation
 * frames are throttled, which playwright's stability check waits on). */
async function click(page, selector) {
  await page.bringToFront();
  await page.click(selector);
}

async function send(page, text) {
  await page.fill("#message", text);
  await page.press("#message", "Enter");
}

function members(page) {
  return page.$$eval("#member-list .member", (items) => items.map((i) => i.dataset.user));
}

async function shoot(page, name) {
  if (!SCREENSHOT_DIR) return;
  mkdirSync(SCREENSHOT_DIR, { recursive: true });
  await page.screenshot({ path: path.join(SCREENSHOT_DIR, name) });
}

/** Records every change of the connection indicator from now on. */
function recordStatus(page) {
  return page.evaluate(() => {
    window.__states = [];
    const status = document.getElementById("status");
    new MutationObserver(() => window.__states.push(status.dataset.state)).observe(status, {
      attributes: true,
      attributeFilter: ["data-state"],
    });
  });
}

const BLUE = "rgb(37, 99, 235)";
const WHITE = "rgb(255, 255, 255)";

// Alice's second tab goes through a WebSocket route the test controls, so it
// can cut that tab's connection and hold it down.
let a2Blocked = false;
const a2Links = [];

test("three tabs, two users, one room: everyone signs in and sees who is here", { timeout: 60_000 }, async () => {
  a1 = await open(aliceBrowser, "alice/1");
  await signIn(a1, "alice");
  b1 = await open(bobBrowser, "bob/1");
  await signIn(b1, "bob");
  await waitForNotice(a1, ROOM, "bob joined · 2 members");

  a2 = await open(aliceBrowser, "alice/2");
  await a2.routeWebSocket(/\/ws(\?|$)/, (ws) => {
    if (a2Blocked) return ws.close();
    const server = ws.connectToServer();
    a2Links.push({ ws, server });
  });
  await a2.route(
    (url) => /^\/(sse|poll)(\/|$)/.test(url.pathname),
    (route) => (a2Blocked ? route.abort() : route.continue()),
  );
  await signIn(a2, "alice");
  await waitForNotice(a2, ROOM, "You joined #lobby · 2 members");

  // Alice's second tab is not a new member: nobody hears her join again.
  const a1Notices = (await readLog(a1, ROOM)).filter((r) => r.notice).map((r) => r.notice);
  assert.deepEqual(a1Notices, ["You joined #lobby · 1 member", "bob joined · 2 members"]);
  const b1Notices = (await readLog(b1, ROOM)).filter((r) => r.notice).map((r) => r.notice);
  assert.deepEqual(b1Notices, ["You joined #lobby · 2 members"]);

  for (const page of [a1, a2, b1]) {
    await page.waitForFunction(() => document.querySelectorAll("#member-list .member").length === 2);
    assert.deepEqual(await members(page), ["alice", "bob"]);
    assert.equal(await page.textContent("#conv-subtitle"), "2 members");
    assert.equal(await page.textContent("#status-text"), "Connected");
  }
});

test("everyone sees every message; one's own on the right in blue, others' on the left in white", { timeout: 60_000 }, async () => {
  const sent = [
    [a1, "alice", "Hi everyone! Who is up for lunch?"],
    [b1, "bob", "Me! The usual place at noon?"],
    [a2, "alice", "Perfect, see you there."],
  ];
  for (const [page, , text] of sent) {
    await send(page, text);
    for (const p of [a1, a2, b1]) await waitForMessage(p, ROOM, text);
  }
  const logs = {};
  for (const [name, page, me] of [
    ["a1", a1, "alice"],
    ["a2", a2, "alice"],
    ["b1", b1, "bob"],
  ]) {
    const rows = await messages(page, ROOM);
    logs[name] = rows;
    assert.deepEqual(
      rows.map((r) => [r.user, r.text]),
      sent.map(([, user, text]) => [user, text]),
      `${name} shows every message once, in order`,
    );
    for (const row of rows) {
      assert.ok(row.visible, `${name}: ${row.text} is on screen`);
      assert.match(row.time, /\d{1,2}:\d{2}/, "a message shows its time");
      if (row.user === me) {
        assert.ok(row.mine && !row.theirs, `${name}: own message "${row.text}" is marked mine`);
        assert.equal(row.alignSelf, "flex-end");
        assert.equal(row.background, BLUE);
        assert.ok(row.gapRight < 60 && row.gapLeft > 100, `${name}: own message sits on the right`);
      } else {
        assert.ok(row.theirs && !row.mine, `${name}: ${row.user}'s message is marked theirs`);
        assert.equal(row.alignSelf, "flex-start");
        assert.equal(row.background, WHITE);
        assert.ok(row.gapLeft < 60 && row.gapRight > 100, `${name}: others' message sits on the left`);
      }
    }
  }
  // One order everywhere: the room's seq.
  const seqs = logs.a1.map((r) => r.seq);
  assert.deepEqual(
    seqs,
    [...seqs].sort((x, y) => x - y),
  );
  assert.deepEqual(logs.a2.map((r) => r.seq), seqs);
  assert.deepEqual(logs.b1.map((r) => r.seq), seqs);
});

test("a private message from bob reaches both of alice's tabs, and bob sees it as sent", { timeout: 60_000 }, async () => {
  const secret = "psst, alice: the lunch is my treat today";
  await click(b1, '#member-list .member[data-user="alice"] button');
  await b1.locator('#conv-title:text-is("alice")').waitFor({ timeout: WAIT });
  await send(b1, secret);

  // Bob: drawn once the server acked it, in his private conversation with alice.
  await waitForMessage(b1, "dm:alice", secret);
  const mine = await messages(b1, "dm:alice");
  assert.deepEqual(
    mine.map((r) => [r.text, r.mine, r.private, r.tag]),
    [[secret, true, true, "Private to alice"]],
  );

  for (const [name, page] of [
    ["a1", a1],
    ["a2", a2],
  ]) {
    await waitForMessage(page, "dm:bob", secret);
    // Still in the room: the new private conversation shows an unread badge.
    assert.equal(await page.textContent('#dm-list .conv[data-conv="dm:bob"] .badge'), "1", `${name} badge`);
    const rows = await messages(page, "dm:bob");
    assert.deepEqual(
      rows.map((r) => [r.user, r.text, r.theirs, r.private, r.tag]),
      [["bob", secret, true, true, "Private"]],
      `${name} shows it once, as private from bob`,
    );
  }
  // Nowhere else: not in the room on any tab, not in another conversation.
  for (const [name, page] of [
    ["a1", a1],
    ["a2", a2],
    ["b1", b1],
  ]) {
    assert.ok(!(await messages(page, ROOM)).some((r) => r.text === secret), `${name}: not in the room`);
    const everywhere = await page.$$eval(".msg .text", (ts) => ts.map((t) => t.textContent));
    assert.equal(everywhere.filter((t) => t === secret).length, 1, `${name}: shown exactly once`);
  }

  await click(b1, '#room-list .conv[data-conv="room:lobby"] button');
  // The picture for docs/chat.png: alice's first tab, the room, a private
  // message waiting in the sidebar.
  await a1.locator("#message").fill("");
  await shoot(a1, "chat.png");
  await click(a2, '#dm-list .conv[data-conv="dm:bob"] button');
  assert.equal(await a2.textContent('#dm-list .conv[data-conv="dm:bob"] .badge'), "", "opening it clears the badge");
  await shoot(a2, "chat-private.png");
  await click(a2, '#room-list .conv[data-conv="room:lobby"] button');
});

test("a private message alice sends shows in her other tab too, as sent", { timeout: 60_000 }, async () => {
  const reply = "thanks bob, see you at noon";
  await click(a1, '#member-list .member[data-user="bob"] button');
  await a1.locator('#conv-title:text-is("bob")').waitFor({ timeout: WAIT });
  await send(a1, reply);
  await waitForMessage(b1, "dm:alice", reply);
  await waitForMessage(a2, "dm:bob", reply);
  await a1.waitForTimeout(300); // room for a duplicate to show up
  for (const [name, page, conv, expected] of [
    ["a1", a1, "dm:bob", ["alice", reply, true, true, "Private to bob"]],
    ["a2", a2, "dm:bob", ["alice", reply, true, true, "Private to bob"]],
    ["b1", b1, "dm:alice", ["alice", reply, false, true, "Private"]],
  ]) {
    const rows = (await messages(page, conv)).filter((r) => r.text === reply);
    assert.deepEqual(
      rows.map((r) => [r.user, r.text, r.mine, r.private, r.tag]),
      [expected],
      `${name} shows it once, in the conversation with the other user`,
    );
    const everywhere = await page.$$eval(".msg .text", (ts) => ts.map((t) => t.textContent));
    assert.equal(everywhere.filter((t) => t === reply).length, 1, `${name}: shown exactly once`);
  }
  await click(a1, '#room-list .conv[data-conv="room:lobby"] button');
});

test("markup in a message is shown as text and never runs", { timeout: 60_000 }, async () => {
  const nasty = ["<script>alert(1)</script>", '<img src=x onerror="window.__pwned=1;alert(2)">', "<b>bold?</b> & &amp;"];
  for (const text of nasty) {
    await send(b1, text);
    for (const page of [a1, a2, b1]) await waitForMessage(page, ROOM, text);
  }
  for (const page of [a1, a2, b1]) {
    const shown = (await messages(page, ROOM)).map((r) => r.text);
    for (const text of nasty) assert.ok(shown.includes(text), `"${text}" is shown as typed`);
    assert.equal(await page.locator(".log script, .log img, .log b").count(), 0, "no element was made from a message");
    assert.equal(await page.evaluate(() => window.__pwned), undefined, "no handler ran");
  }
  assert.deepEqual(dialogs, [], "no script opened a dialog");
});

test("several rooms: join another, talk there, unread badges, leave", { timeout: 60_000 }, async () => {
  const RANDOM = "room:random";
  for (const page of [b1, a1]) {
    await page.fill("#join-room", "random");
    await page.press("#join-room", "Enter");
    await page.locator('#conv-title:text-is("# random")').waitFor({ timeout: WAIT });
    await waitForNotice(page, RANDOM, "You joined #random");
  }
  await waitForNotice(b1, RANDOM, "alice joined · 2 members");
  assert.deepEqual(await members(a1), ["alice", "bob"]);
  // Alice's other tab stays where it was: rooms are per tab.
  assert.equal(await a2.locator('#room-list .conv[data-conv="room:random"]').count(), 0);

  await send(b1, "Anyone seen my umbrella?");
  await waitForMessage(a1, RANDOM, "Anyone seen my umbrella?");
  assert.ok(!(await messages(a1, ROOM)).some((r) => r.text === "Anyone seen my umbrella?"), "stays in its room");
  assert.ok(!(await messages(a2, ROOM)).some((r) => r.text === "Anyone seen my umbrella?"));

  // A message in a room not on screen counts as unread there.
  await click(b1, '#room-list .conv[data-conv="room:lobby"] button');
  await send(b1, "Back in the lobby");
  await waitForMessage(a1, ROOM, "Back in the lobby");
  assert.equal(await a1.textContent('#room-list .conv[data-conv="room:lobby"] .badge'), "1");
  await click(a1, '#room-list .conv[data-conv="room:lobby"] button');
  assert.equal(await a1.textContent('#room-list .conv[data-conv="room:lobby"] .badge'), "");

  // Leaving: alice's only tab in #random leaves, so bob sees her go.
  await click(a1, '#room-list .conv[data-conv="room:random"] button');
  await click(a1, "#leave-room");
  await a1.locator('#conv-title:text-is("# lobby")').waitFor({ timeout: WAIT });
  assert.equal(await a1.locator('#room-list .conv[data-conv="room:random"]').count(), 0);
  await click(b1, '#room-list .conv[data-conv="room:random"] button');
  await waitForNotice(b1, RANDOM, "alice left · 1 member");
  assert.deepEqual(await members(b1), ["bob"]);
  await click(b1, "#leave-room");
  await b1.locator('#conv-title:text-is("# lobby")').waitFor({ timeout: WAIT });
});

test("a tab that loses its connection reconnects and gets what it missed (since)", { timeout: 90_000 }, async () => {
  // Cut alice's second tab off, and keep every new attempt failing for a while.
  a2Blocked = true;
  for (const { ws, server } of a2Links.splice(0)) {
    server.close();
    ws.close();
  }
  await a2.locator('#status[data-state="reconnecting"]').waitFor({ timeout: WAIT });
  assert.equal(await a2.textContent("#status-text"), "Reconnecting…");
  await shoot(a2, "chat-reconnecting.png");

  const missed = ["Said while alice's tab was away (1)", "Said while alice's tab was away (2)"];
  for (const text of missed) {
    await send(b1, text);
    await waitForMessage(a1, ROOM, text);
  }
  assert.ok(!(await messages(a2, ROOM)).some((r) => missed.includes(r.text)));

  a2Blocked = false;
  await a2.locator('#status[data-state="connected"]').waitFor({ timeout: 40_000 });
  for (const text of missed) await waitForMessage(a2, ROOM, text);
  const a1Rows = await messages(a1, ROOM);
  const a2Rows = await messages(a2, ROOM);
  assert.deepEqual(
    a2Rows.map((r) => [r.seq, r.text]),
    a1Rows.map((r) => [r.seq, r.text]),
    "after the rejoin with since, the tab shows exactly what the others show",
  );
  const warnings = (await readLog(a2, ROOM)).filter((r) => r.notice && r.notice.includes("missed"));
  assert.deepEqual(warnings, [], "the server replayed the gap: nothing was lost");
  // Alice never left (her first tab stayed): nobody saw her go.
  assert.ok(!(await readLog(b1, ROOM)).some((r) => r.notice && r.notice.includes("alice left")));
});

test("closing bob's tab shows alice's tabs a leave notice with the new count", { timeout: 60_000 }, async () => {
  await b1.close();
  for (const page of [a1, a2]) {
    await waitForNotice(page, ROOM, "bob left · 1 member");
    await page.waitForFunction(() => document.querySelectorAll("#member-list .member").length === 1);
    assert.deepEqual(await members(page), ["alice"]);
    assert.equal(await page.textContent("#conv-subtitle"), "1 member");
  }
  await shoot(a1, "chat-after-leave.png");

  // A private message to somebody no longer online is refused, not lost silently.
  await click(a1, '#dm-list .conv[data-conv="dm:bob"] button');
  const sentBefore = (await messages(a1, "dm:bob")).filter((r) => r.mine).length;
  await send(a1, "are you still there?");
  await a1.waitForFunction(() => document.getElementById("composer-error").textContent.includes("not delivered"));
  assert.equal(await a1.inputValue("#message"), "are you still there?", "the text is kept to try again");
  assert.equal((await messages(a1, "dm:bob")).filter((r) => r.mine).length, sentBefore, "not drawn as sent");
  assert.ok(!(await messages(a2, "dm:bob")).some((r) => r.text === "are you still there?"), "nor in the other tab");
  await a1.fill("#message", "");
  await click(a1, '#room-list .conv[data-conv="room:lobby"] button');
});

test("heartbeat: idle tabs stay connected, a tab that vanished leaves within the window", { timeout: 90_000 }, async () => {
  // Bob again, in a tab whose connection the test can freeze: frames stop in
  // both directions but the socket stays open, like a laptop that lost its
  // network. Only the heartbeat can tell.
  const b2 = await open(bobBrowser, "bob/2");
  let frozen = false;
  await b2.routeWebSocket(/\/ws(\?|$)/, (ws) => {
    if (frozen) return; // its reconnects get nowhere either
    const server = ws.connectToServer();
    ws.onMessage((m) => frozen || server.send(m));
    server.onMessage((m) => frozen || ws.send(m));
  });
  // Nor may it come back through the fallbacks.
  await b2.route(
    (url) => /^\/(sse|poll)(\/|$)/.test(url.pathname),
    (route) => (frozen ? route.abort() : route.continue()),
  );
  await signIn(b2, "bob");
  for (const page of [a1, a2]) await waitForNotice(page, ROOM, "bob joined · 2 members");

  // A newcomer gets the room's recent history (GET /history), above its
  // "You joined", and bob's earlier messages (from his closed tab) are his own.
  await b2.waitForFunction(() => document.querySelectorAll('.log[data-conv="room:lobby"] .msg').length > 0);
  const history = await messages(b2, ROOM);
  const a1Rows = await messages(a1, ROOM);
  assert.deepEqual(
    history.map((r) => [r.seq, r.text]),
    a1Rows.map((r) => [r.seq, r.text]),
  );
  for (const row of history) assert.equal(row.mine, row.user === "bob", `b2: "${row.text}" side`);
  const b2Log = await readLog(b2, ROOM);
  assert.ok(b2Log.at(-1).notice.startsWith("You joined #lobby · 2 members"), "history comes before the join notice");
  for (const page of [a1, a2]) await recordStatus(page);
  const left = "bob left · 1 member";
  const before = [await countNotices(a1, ROOM, left), await countNotices(a2, ROOM, left)];

  frozen = true;
  const start = Date.now();
  // The chat's heartbeat: ping after 10 s of silence, closed 10 s later.
  await waitForNotice(a1, ROOM, left, 35_000, before[0]);
  await waitForNotice(a2, ROOM, left, 35_000, before[1]);
  const took = Date.now() - start;
  assert.ok(took >= 15_000 && took <= 32_000, `bob was dropped after ${took} ms`);
  for (const page of [a1, a2]) {
    // Meanwhile alice's tabs, silent just as long, answered the server's pings.
    assert.deepEqual(await page.evaluate(() => window.__states), [], "alice's tabs never lost their connection");
    assert.equal(await page.textContent("#status-text"), "Connected");
    assert.deepEqual(await members(page), ["alice"]);
  }
  await b2.close();
  assert.deepEqual(pageErrors, [], "no uncaught error in any page");
});
