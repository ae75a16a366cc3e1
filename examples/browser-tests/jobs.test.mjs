// The jobs example in a real browser: headless Chromium driven by
// playwright-core, under node's own test runner. Run by
// examples/tests/jobs_browser.rs, which starts the servers:
//
//   JOBS_URL          the jobs app with every transport, through a TCP proxy the test can cut
//   JOBS_DIRECT_URL   the same app, not through the proxy
//   JOBS_SSE_URL      the jobs app with WebSocket refused (sse,longpoll)
//   JOBS_POLL_URL     the jobs app with only long-poll
//   JOBS_CONTROL_URL  POST cut, restore (the proxy), restart (the app behind it)
//
// The tests run in order and share alice's tab.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { launch, shoot, watch, post, eventually } from "./harness.mjs";

const env = (name) => {
  const value = process.env[name];
  assert.ok(value, `set ${name} (examples/tests/jobs_browser.rs does)`);
  return value;
};
const JOBS_URL = env("JOBS_URL");
const JOBS_DIRECT_URL = env("JOBS_DIRECT_URL");
const JOBS_SSE_URL = env("JOBS_SSE_URL");
const JOBS_POLL_URL = env("JOBS_POLL_URL");
const CONTROL = env("JOBS_CONTROL_URL");
const VIEWPORT = { width: 1100, height: 720 };
const WAIT = 15_000;
/** What a job that runs to its end renders, in order (after its queued card).
 * `100% done` and the completion often arrive together (one long-poll
 * answer) and are drawn in one go, so the log skips the former; the card's
 * timeline shows the step was reached. */
const ALL_STEPS = ["10% starting running", "30% working running", "90% uploading running", "100% done completed"];

let browser;
const errors = [];
let alice; // alice's tab on JOBS_URL, shared by the tests in order
const jobs = {}; // name -> id

before(async () => {
  browser = await launch();
});

after(async () => {
  if (browser) await browser.close();
});

/** A new browser profile, signed in as `user` on `base`. */
async function signIn(base, user) {
  const context = await browser.newContext({ viewport: VIEWPORT });
  const page = watch(await context.newPage(), user, errors);
  await page.goto(base);
  await page.fill("#login-name", user);
  if (user === "alice") await shoot(page, "jobs-sign-in.png");
  await page.click("#login-form button[type=submit]");
  await page.locator('#conn[data-state="connected"]').waitFor({ timeout: WAIT });
  assert.equal(await page.textContent("#me-name"), user);
  await recordRendering(page);
  return page;
}

/** From now on, records every state of every job card the page renders,
 * as "progress% step state", one entry per change. */
function recordRendering(page) {
  return page.evaluate(() => {
    window.__rendered = {};
    const entry = (node) => `${node.dataset.progress}% ${node.dataset.step} ${node.dataset.state}`;
    new MutationObserver((records) => {
      for (const node of new Set(records.map((r) => r.target))) {
        if (!node.classList.contains("job")) continue;
        const log = (window.__rendered[node.dataset.job] ||= []);
        if (log.at(-1) !== entry(node)) log.push(entry(node));
      }
    }).observe(document.getElementById("job-list"), {
      subtree: true,
      attributes: true,
      attributeFilter: ["data-progress", "data-step", "data-state"],
    });
  });
}

/** The states the page rendered for job `id`, without the queued card it
 * starts as (and `100% done running`, see ALL_STEPS). */
async function rendered(page, id) {
  const log = await page.evaluate((id) => window.__rendered[id] || [], id);
  return log.filter((e) => !e.endsWith(" queued") && e !== "100% done running");
}

async function startJob(page, name, { fail = false } = {}) {
  await page.fill("#job-name", name);
  if (fail) await page.check("#job-fail");
  const [response] = await Promise.all([
    page.waitForResponse((r) => new URL(r.url()).pathname === "/api/jobs" && r.request().method() === "POST"),
    page.click("#new-job button[type=submit]"),
  ]);
  assert.equal(response.status(), 201);
  const job = await response.json();
  await page.locator(`.job[data-job="${job.id}"]`).waitFor({ timeout: WAIT });
  jobs[name] = job.id;
  return job.id;
}

function waitForState(page, id, state, timeout = WAIT) {
  return page.locator(`.job[data-job="${id}"][data-state="${state}"]`).waitFor({ timeout });
}

function waitForProgress(page, id, atLeast, timeout = WAIT) {
  return page.waitForFunction(
    ([id, atLeast]) => Number(document.querySelector(`.job[data-job="${id}"]`)?.dataset.progress) >= atLeast,
    [id, atLeast],
    { timeout },
  );
}

/** A card as the person sees it. */
function readCard(page, id) {
  return page.$eval(`.job[data-job="${id}"]`, (node) => ({
    state: node.dataset.state,
    badge: node.querySelector(".badge").textContent,
    progress: Number(node.dataset.progress),
    pct: node.querySelector(".pct").textContent,
    step: node.querySelector(".step").textContent,
    width: node.querySelector(".fill").style.width,
    outcome: node.querySelector(".outcome").hidden ? null : node.querySelector(".outcome").textContent,
    timeline: [...node.querySelectorAll(".tl")].map((li) => ({
      step: li.dataset.step,
      reached: li.classList.contains("reached"),
      source: li.dataset.source,
    })),
    notes: [...node.querySelectorAll(".note")].map((n) => ({ kind: n.dataset.kind, text: n.textContent })),
  }));
}

/** Every step of the job's timeline reached, the ones after the first seen live. */
async function assertTimelineLive(page, id) {
  const card = await readCard(page, id);
  for (const item of card.timeline) {
    assert.ok(item.reached, `${item.step} reached`);
    // The first step may come from the status the page loads when it starts
    // following the job; every later one comes from the room.
    if (item.step !== "starting") assert.equal(item.source, "live", `${item.step} came from the room`);
  }
}

async function token(page) {
  return page.evaluate(() => JSON.parse(sessionStorage.getItem("jobs-auth")).token);
}

/** GET /api/jobs/{id}/status as a client that only polls would. */
async function status(base, id, bearer) {
  const response = await fetch(new URL(`/api/jobs/${id}/status`, base), {
    headers: bearer ? { authorization: `Bearer ${bearer}` } : {},
  });
  return { status: response.status, body: await response.json() };
}

async function connection(page) {
  return page.evaluate(() => ({
    state: document.getElementById("conn").dataset.state,
    transport: document.getElementById("conn").dataset.transport,
    text: document.getElementById("conn-text").textContent,
    name: document.getElementById("conn-transport").textContent,
  }));
}

test("over WebSocket: several jobs at once, each with its own live progress bar, to 100%", { timeout: 60_000 }, async () => {
  alice = await signIn(JOBS_URL, "alice");
  assert.deepEqual(await connection(alice), {
    state: "connected",
    transport: "websocket",
    text: "Connected",
    name: "WebSocket",
  });

  const a = await startJob(alice, "Quarterly sales export");
  await waitForProgress(alice, a, 30);
  const b = await startJob(alice, "Invoice batch", { fail: true });
  await waitForState(alice, a, "completed");
  await waitForState(alice, b, "failed");
  const c = await startJob(alice, "Product thumbnails");
  await waitForProgress(alice, c, 30);
  // The picture for docs/jobs.png: one done, one failed, one on its way.
  await alice.mouse.move(0, 0);
  await alice.waitForTimeout(500); // the bars' width transition
  await shoot(alice, "jobs.png");

  await waitForState(alice, c, "completed");
  for (const id of [a, c]) {
    assert.deepEqual(await rendered(alice, id), ALL_STEPS, "every step rendered once, in order");
    const card = await readCard(alice, id);
    assert.equal(card.badge, "Completed");
    assert.equal(card.pct, "100%");
    assert.equal(card.width, "100%");
    assert.equal(card.step, "Completed");
    assert.match(card.outcome, /^Result: .*-[0-9a-f]{12}\.csv · [\d,.\s]+ rows$/);
    await assertTimelineLive(alice, id);
  }
  const failed = await readCard(alice, b);
  assert.deepEqual(await rendered(alice, b), ["10% starting running", "30% working running", "30% uploading failed"]);
  assert.equal(failed.badge, "Failed");
  assert.equal(failed.step, "Failed while uploading results");
  assert.match(failed.outcome, /Upload failed/);

  // The REST status endpoint agrees, with the room position of the last event.
  const done = await status(JOBS_DIRECT_URL, a, await token(alice));
  assert.equal(done.status, 200);
  assert.equal(done.body.state, "completed");
  assert.equal(done.body.progress, 100);
  assert.equal(done.body.current_step, "done");
  assert.equal(done.body.seq, 5, "five events: four steps and the completion");
  assert.ok(done.body.epoch);
  assert.equal((await status(JOBS_DIRECT_URL, b, await token(alice))).body.error.startsWith("Upload failed"), true);
  assert.equal((await status(JOBS_DIRECT_URL, a)).status, 401, "no token, no status");
});

test("the connection is cut mid-job: the page reconnects by itself and shows every step", { timeout: 90_000 }, async () => {
  const id = await startJob(alice, "Nightly backup");
  await waitForProgress(alice, id, 10);
  // The page has loaded the job's status (it does when it starts following).
  await alice.locator(`.job[data-job="${id}"][data-loaded="true"]`).waitFor({ timeout: WAIT });
  await post(new URL("cut", CONTROL));
  await alice.locator('#conn[data-state="reconnecting"]').waitFor({ timeout: WAIT });
  const during = await readCard(alice, id);
  assert.ok(during.progress < 100, "cut before the job finished");
  await shoot(alice, "jobs-reconnecting.png");

  // The job goes on without the page; the server has it all.
  const bearer = await token(alice);
  await eventually(async () => (await status(JOBS_DIRECT_URL, id, bearer)).body.state === "completed", {
    timeout: 20_000,
    what: "the job to complete on the server",
  });
  assert.equal((await readCard(alice, id)).state, "running", "the page could not know yet");

  await post(new URL("restore", CONTROL));
  await waitForState(alice, id, "completed", 40_000);
  await alice.locator('#conn[data-state="connected"]').waitFor({ timeout: WAIT });
  const log = await rendered(alice, id);
  const shownBefore = during.progress;
  assert.deepEqual(
    log,
    ALL_STEPS,
    `every step rendered once, in order (the cut came after ${shownBefore}%)`,
  );
  // Replayed by the room (rejoined with since), not reloaded from the status endpoint.
  await assertTimelineLive(alice, id);
  assert.deepEqual((await readCard(alice, id)).notes, [], "recovered: nothing to explain");
});

test("a server restart: recovered:false, the page reloads the job from the status endpoint and says so", { timeout: 90_000 }, async () => {
  const id = await startJob(alice, "Search index rebuild");
  await waitForProgress(alice, id, 30);
  await post(new URL("restart", CONTROL)); // answers once the new server listens
  await alice.locator(`.job[data-job="${id}"] .note[data-kind="reset"]`).waitFor({ timeout: 40_000 });
  // The job resumed after the restart and finishes live.
  await waitForState(alice, id, "completed", 30_000);
  const card = await readCard(alice, id);
  assert.equal(card.notes.length, 1);
  assert.match(card.notes[0].text, /recovered: false/);
  assert.match(card.notes[0].text, /Reloaded the job from the server: (running|completed), \d+%/);
  assert.equal(card.badge, "Completed");
  assert.equal((await connection(alice)).state, "connected");
  await alice.waitForTimeout(500); // the bars' width transition
  await shoot(alice, "jobs-restarted.png");

  // The earlier jobs are as they were; a reload of the page lists them all
  // from the server (GET /api/jobs), finished.
  await alice.reload();
  await alice.locator('#conn[data-state="connected"]').waitFor({ timeout: WAIT });
  for (const [name, jobId] of Object.entries(jobs)) {
    await alice.locator(`.job[data-job="${jobId}"]`).waitFor({ timeout: WAIT });
    const reloaded = await readCard(alice, jobId);
    assert.equal(reloaded.state, name === "Invoice batch" ? "failed" : "completed", name);
  }
});

test("another user may not follow alice's job: the room refuses, and the page says so", { timeout: 60_000 }, async () => {
  const bob = await signIn(JOBS_URL, "bob");
  const id = jobs["Quarterly sales export"];
  await bob.fill("#follow-id", id);
  await bob.click("#follow-job button[type=submit]");
  await waitForState(bob, id, "forbidden");
  const card = await readCard(bob, id);
  assert.equal(card.badge, "Not yours");
  assert.equal(card.notes.length, 1);
  assert.equal(card.notes[0].kind, "forbidden");
  assert.match(card.notes[0].text, new RegExp(`refused to let you join its room job_${id} \\(forbidden\\)`));
  assert.ok(card.timeline.every((t) => !t.reached), "nothing of alice's job shows");
  // Refused rooms cost nothing else: bob stays connected.
  assert.equal((await connection(bob)).state, "connected");
  await shoot(bob, "jobs-forbidden.png");
  // And the status endpoint refuses bob too.
  const answer = await status(JOBS_DIRECT_URL, id, await token(bob));
  assert.equal(answer.status, 403);
  assert.equal(answer.body.error.code, "forbidden");
  await bob.context().close();
});

test("WebSocket refused by the server: the page falls back to SSE and runs a job to 100%", { timeout: 60_000 }, async () => {
  const context = await browser.newContext({ viewport: VIEWPORT });
  const page = watch(await context.newPage(), "carol", errors);
  const sockets = [];
  page.on("websocket", (ws) => sockets.push(ws.url()));
  await page.goto(JOBS_SSE_URL);
  await page.fill("#login-name", "carol");
  await page.click("#login-form button[type=submit]");
  await page.locator('#conn[data-state="connected"]').waitFor({ timeout: WAIT });
  await recordRendering(page);
  assert.ok(sockets.length >= 1 && sockets.every((u) => new URL(u).pathname === "/ws"), "it tried WebSocket first");
  assert.deepEqual(await connection(page), {
    state: "connected",
    transport: "sse",
    text: "Connected",
    name: "Server-Sent Events",
  });
  assert.match(await page.textContent("#transport-note"), /over Server-Sent Events/);
  const id = await startJob(page, "Report over SSE");
  await waitForState(page, id, "completed");
  assert.deepEqual(await rendered(page, id), ALL_STEPS);
  await assertTimelineLive(page, id);
  await page.waitForTimeout(500); // the bars' width transition
  await shoot(page, "jobs-sse.png");
  await context.close();
});

test("SSE refused too: the page falls back to long-poll and runs a job to 100%", { timeout: 60_000 }, async () => {
  const context = await browser.newContext({ viewport: VIEWPORT });
  const page = watch(await context.newPage(), "dave", errors);
  const refused = [];
  page.on("response", (r) => {
    const path = new URL(r.url()).pathname;
    if (path === "/sse") refused.push(r.status());
  });
  const sockets = [];
  page.on("websocket", (ws) => sockets.push(ws.url()));
  await page.goto(JOBS_POLL_URL);
  await page.fill("#login-name", "dave");
  await page.click("#login-form button[type=submit]");
  await page.locator('#conn[data-state="connected"]').waitFor({ timeout: WAIT });
  await recordRendering(page);
  assert.ok(sockets.length >= 1, "it tried WebSocket first");
  assert.deepEqual(refused, [404], "then SSE, which the server refused");
  assert.deepEqual(await connection(page), {
    state: "connected",
    transport: "longpoll",
    text: "Connected",
    name: "Long-polling",
  });
  const id = await startJob(page, "Report over long-poll");
  await waitForState(page, id, "completed");
  assert.deepEqual(await rendered(page, id), ALL_STEPS);
  await assertTimelineLive(page, id);
  await page.waitForTimeout(500); // the bars' width transition
  await shoot(page, "jobs-longpoll.png");
  await context.close();
});

test("no page had an uncaught error", () => {
  assert.deepEqual(errors, []);
});
