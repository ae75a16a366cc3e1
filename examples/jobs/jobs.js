// The jobs page. Plain ES module, no build step, no framework.
//
// Sign in (POST /api/login answers a JWT), start jobs (POST /api/jobs), and
// watch each one's progress bar: the page follows a job by joining its room
// `job_{id}` through /switchboard.js, which picks WebSocket, SSE or
// long-poll, whichever the server and the network allow, and passes the JWT
// as `token`. Only the job's owner may join its room, and only the server
// publishes there: `job_progress` (10 starting, 30 working, 90 uploading, 100
// done), then `job_completed` with a result or `job_error`.
//
// Never losing the final state:
// - When the page starts following a job (its `joined`), it loads the job
//   from GET /api/jobs/{id}/status, so the steps taken before it joined show
//   too; live events then carry it on. Rendering is idempotent and only moves
//   forward, so an event the snapshot already covered changes nothing.
// - After a dropped connection the client rejoins with `since` and the room
//   replays what was missed, in order, before `joined` (nothing to do here).
// - When the server cannot replay (`joined` with recovered: false, e.g. it
//   restarted and lost the room's history), the room's `onReset` fires: the
//   page reloads the job from the status endpoint and says so.
// - A finished job is left: nothing more will happen in its room.
//
// Escaping: every piece of data reaches the page through textContent or
// dataset, never innerHTML.

import { Switchboard } from "/switchboard.js";

const $ = (id) => document.getElementById(id);
const AUTH_KEY = "jobs-auth";
const JOB_ID = /^[A-Za-z0-9]{1,64}$/;
const STEPS = [
  { step: "starting", progress: 10, label: "Starting" },
  { step: "working", progress: 30, label: "Working" },
  { step: "uploading", progress: 90, label: "Uploading results" },
  { step: "done", progress: 100, label: "Done" },
];
const STEP_LABEL = Object.fromEntries(STEPS.map((s) => [s.step, s.label]));
STEP_LABEL.queued = "Queued";
const STATE_LABEL = {
  queued: "Queued",
  running: "Running",
  completed: "Completed",
  failed: "Failed",
  forbidden: "Not yours",
  unknown: "Unknown",
  waiting: "Waiting",
};
const CONN_TEXT = {
  idle: "Not connected",
  connecting: "Connecting…",
  connected: "Connected",
  reconnecting: "Reconnecting…",
  closed: "Disconnected",
};
const TRANSPORT_NAME = { websocket: "WebSocket", sse: "Server-Sent Events", longpoll: "Long-polling" };
const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
const numberFormat = new Intl.NumberFormat();

const app = { user: null, token: null, sb: null, cards: new Map() };

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

// ---- sign in -------------------------------------------------------------------

function boot() {
  $("login-form").addEventListener("submit", onLogin);
  $("sign-out").addEventListener("click", () => signOut());
  $("banner-action").addEventListener("click", () => signOut());
  $("new-job").addEventListener("submit", onNewJob);
  $("follow-job").addEventListener("submit", onFollow);
  const saved = JSON.parse(sessionStorage.getItem(AUTH_KEY) || "null");
  if (saved && saved.token) return start(saved.user, saved.token);
  showLogin();
}

function showLogin(message = "") {
  $("app").hidden = true;
  $("who").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("login-name").value = localStorage.getItem("jobs-name") || "";
  $("login-name").focus();
}

async function onLogin(event) {
  event.preventDefault();
  const user = $("login-name").value.trim();
  if (!user) return;
  $("login-error").textContent = "";
  try {
    const response = await fetch("/api/login", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ user }),
    });
    const body = await response.json();
    if (!response.ok) return ($("login-error").textContent = body.error?.message || "Sign-in refused.");
    localStorage.setItem("jobs-name", body.user);
    sessionStorage.setItem(AUTH_KEY, JSON.stringify({ user: body.user, token: body.token }));
    start(body.user, body.token);
  } catch {
    $("login-error").textContent = "The server cannot be reached. Try again in a moment.";
  }
}

function signOut(message = "") {
  sessionStorage.removeItem(AUTH_KEY);
  const sb = app.sb;
  app.sb = null;
  if (sb) sb.close();
  for (const card of app.cards.values()) card.node.remove();
  app.cards.clear();
  showConn("idle", null);
  showLogin(message);
}

function start(user, token) {
  app.user = user;
  app.token = token;
  $("login").hidden = true;
  $("app").hidden = false;
  $("who").hidden = false;
  $("me-name").textContent = user;
  $("me-avatar").textContent = [...user][0]?.toUpperCase() || "?";
  hideBanner();

  // The JWT goes to the server as the `token` query parameter (browsers
  // cannot set headers on WebSocket or EventSource); its JwtAuthenticator
  // verifies it and the policy sees the user it names.
  const sb = new Switchboard({ token, backoffMaxMs: 8000 });
  app.sb = sb;
  sb.on("state", ({ state, transport }) => {
    showConn(state, transport);
    // Closed without the person signing out: the server refused the
    // session, and the client does not retry what retrying cannot fix.
    if (state === "closed" && app.sb === sb && $("banner").hidden) {
      banner("The server refused this connection (your sign-in may no longer be valid). Sign in again.", true);
    }
  });
  sb.on("close", (frame) => {
    if (frame.code === 1008) banner(`The server ended this session (${frame.reason}).`, true);
  });
  sb.on("error", (error) => {
    // A refused connection (a token the server no longer accepts, e.g. it
    // restarted with another signing key): the client stops retrying.
    if (!error.room && error.code === "forbidden") {
      banner("The server no longer accepts your sign-in (it may have restarted). Sign in again.", true);
    }
  });
  showConn(sb.state, sb.transport);
  loadJobs();
}

// ---- connection indicator ----------------------------------------------------------

function showConn(state, transport) {
  const node = $("conn");
  node.dataset.state = state;
  node.dataset.transport = state === "connected" ? transport || "" : "";
  $("conn-text").textContent = CONN_TEXT[state] || state;
  const name = TRANSPORT_NAME[transport] || "";
  $("conn-transport").textContent = state === "connected" ? name : "";
  $("transport-note").textContent =
    state === "connected"
      ? `Live updates arrive over ${name}.` +
        (transport === "websocket" ? "" : " WebSocket could not connect here, so the page fell back.")
      : state === "reconnecting"
        ? "The connection dropped. Reconnecting; nothing published meanwhile will be missed."
        : "";
}

function banner(text, signInAgain = false) {
  $("banner").hidden = false;
  $("banner-text").textContent = text;
  $("banner-action").hidden = !signInAgain;
}

function hideBanner() {
  $("banner").hidden = true;
}

// ---- the API ------------------------------------------------------------------------

/** Calls the app's API with the bearer JWT. Resolves with {status, body}. */
async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: {
      authorization: `Bearer ${app.token}`,
      ...(body ? { "content-type": "application/json" } : {}),
    },
    body: body ? JSON.stringify(body) : undefined,
    cache: "no-store",
  });
  let json = null;
  try {
    json = await response.json();
  } catch {
    json = null;
  }
  if (response.status === 401) {
    banner("Your sign-in is no longer valid (it expired, or the server restarted with a new key). Sign in again.", true);
  }
  return { status: response.status, body: json };
}

async function loadJobs() {
  try {
    const { status, body } = await api("GET", "/api/jobs");
    if (status !== 200) return;
    // Oldest first, each new card goes on top.
    for (const job of [...body.jobs].reverse()) {
      const card = addCard(job.id, job.name);
      applyStatus(card, job);
      if (!isFinal(card.state)) follow(card);
    }
  } catch {
    banner("The server cannot be reached. Your jobs will show when it is back.");
    setTimeout(() => app.sb && app.cards.size === 0 && loadJobs(), 3000);
  }
}

async function onNewJob(event) {
  event.preventDefault();
  $("new-job-error").textContent = "";
  const name = $("job-name").value.trim();
  const fail = $("job-fail").checked;
  try {
    const { status, body } = await api("POST", "/api/jobs", { name, fail });
    if (status !== 201) return ($("new-job-error").textContent = body?.error?.message || `Refused (${status}).`);
    $("job-name").value = "";
    $("job-fail").checked = false;
    const card = addCard(body.id, body.name);
    applyStatus(card, body);
    follow(card);
  } catch {
    $("new-job-error").textContent = "The server cannot be reached. Try again in a moment.";
  }
}

function onFollow(event) {
  event.preventDefault();
  const id = $("follow-id").value.trim();
  if (!JOB_ID.test(id)) return;
  $("follow-id").value = "";
  const existing = app.cards.get(id);
  if (existing) return existing.node.scrollIntoView({ block: "nearest" });
  const card = addCard(id, "Job");
  setState(card, "waiting");
  card.stepText.textContent = "Joining the job's room…";
  follow(card);
}

// ---- following a job ------------------------------------------------------------------

function follow(card) {
  card.synced = false;
  card.room = app.sb.join(`job_${card.id}`, (data, frame) => onEvent(card, data, frame), {
    presence: false,
    onJoined: () => {
      // First join: load what happened before it. Rejoins after a drop
      // replayed what was missed (or report a reset, below).
      if (!card.synced) {
        card.synced = true;
        reload(card, null);
      }
    },
    onReset: (frame) => reload(card, frame),
    onError: (error) => onRoomError(card, error),
  });
}

function onEvent(card, data, frame) {
  const when = frame.ts;
  if (frame.event === "job_progress") {
    apply(card, { state: "running", progress: data.progress, current_step: data.current_step }, "live", when);
  } else if (frame.event === "job_completed") {
    apply(card, { state: "completed", progress: 100, current_step: "done", result: data.result }, "live", when);
  } else if (frame.event === "job_error") {
    apply(
      card,
      { state: "failed", progress: data.progress, current_step: data.current_step, error: data.error },
      "live",
      when,
    );
  }
}

/** Loads the job from the status endpoint. `reset`: the `joined` frame that
 * said the server could not replay what this page missed. */
async function reload(card, reset) {
  let response;
  try {
    response = await api("GET", `/api/jobs/${encodeURIComponent(card.id)}/status`);
  } catch {
    note(card, "Could not load this job's state; trying again…", "warn");
    setTimeout(() => app.cards.get(card.id) === card && reload(card, reset), 2000);
    return;
  }
  const { status, body } = response;
  if (status === 200) {
    applyStatus(card, body);
    card.node.dataset.loaded = "true";
    if (reset) {
      note(
        card,
        "The connection came back, but the server could no longer replay the updates this page " +
          "missed (recovered: false; it restarted and lost their history, or no longer keeps them). " +
          `Reloaded the job from the server: ${describe(card)}.`,
        "reset",
      );
    }
  } else if (status === 403) {
    forbidden(card);
  } else if (status === 404) {
    setState(card, "unknown");
    note(card, "The server does not know this job (any more).", "warn");
    stopFollowing(card);
  }
}

function onRoomError(card, error) {
  if (error.code === "forbidden") return forbidden(card);
  note(card, `Live updates are not available for this job (${error.code}: ${error.message}).`, "warn");
}

function forbidden(card) {
  stopFollowing(card);
  setState(card, "forbidden");
  card.stepText.textContent = "";
  note(
    card,
    `You cannot follow this job: the server refused to let you join its room job_${card.id} (forbidden). ` +
      "Only the person who started a job receives its updates.",
    "forbidden",
  );
}

function stopFollowing(card) {
  if (card.room) card.room.leave().catch(() => {});
  card.room = null;
}

// ---- rendering -------------------------------------------------------------------------

function addCard(id, name) {
  const node = el("li", "job");
  node.dataset.job = id;
  const head = el("div", "job-head");
  const title = el("div", "job-title");
  const nameNode = el("span", "job-name", name);
  const idNode = el("span", "job-id", id);
  idNode.title = "Job id";
  title.append(nameNode, idNode);
  const badge = el("span", "badge");
  head.append(title, badge);

  const bar = el("div", "bar");
  bar.setAttribute("role", "progressbar");
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", "100");
  bar.setAttribute("aria-label", `Progress of ${name}`);
  const fill = el("div", "fill");
  bar.append(fill);

  const line = el("div", "job-line");
  const pct = el("span", "pct", "0%");
  const stepText = el("span", "step");
  line.append(pct, stepText);

  const timeline = el("ol", "timeline");
  const items = new Map();
  for (const s of STEPS) {
    const item = el("li", "tl");
    item.dataset.step = s.step;
    item.append(el("span", "tl-dot"), el("span", "tl-label", `${s.label} · ${s.progress}%`), el("time", "tl-time"));
    timeline.append(item);
    items.set(s.step, item);
  }

  const outcome = el("p", "outcome");
  outcome.hidden = true;
  const notes = el("div", "notes");
  node.append(head, bar, line, timeline, outcome, notes);
  $("job-list").prepend(node);

  const card = {
    id,
    node,
    nameNode,
    badge,
    bar,
    fill,
    pct,
    stepText,
    items,
    outcome,
    notes,
    state: null,
    progress: 0,
    room: null,
    synced: false,
  };
  app.cards.set(id, card);
  setState(card, "queued");
  setProgress(card, 0, "queued");
  renderCount();
  return card;
}

function renderCount() {
  const n = app.cards.size;
  $("job-count").textContent = n ? String(n) : "";
  $("empty").hidden = n > 0;
}

function isFinal(state) {
  return state === "completed" || state === "failed";
}

function setState(card, state) {
  card.state = state;
  card.node.dataset.state = state;
  card.badge.textContent = STATE_LABEL[state] || state;
}

function setProgress(card, progress, step) {
  card.progress = progress;
  card.node.dataset.progress = String(progress);
  card.node.dataset.step = step;
  card.fill.style.width = `${progress}%`;
  card.bar.setAttribute("aria-valuenow", String(progress));
  card.pct.textContent = `${progress}%`;
}

/** Applies a job's state, from a live event or the status endpoint. Only
 * moves forward: what is already shown is never undone. */
function apply(card, update, source, when) {
  if (isFinal(card.state)) return;
  if (update.progress < card.progress && !isFinal(update.state)) return;
  if (update.state === "queued" && card.progress > 0) return;
  // The steps this update reaches: with a live event, its own; with a
  // snapshot, every step up to it (marked as loaded, not seen live).
  for (const s of STEPS) {
    const reached = source === "live" ? s.step === update.current_step : s.progress <= update.progress;
    const item = card.items.get(s.step);
    if (reached && !item.classList.contains("reached")) {
      item.classList.add("reached");
      item.dataset.source = source;
      // Live: the message's time; loaded: when the server says the step was reached.
      const at = when ?? update.reached?.[s.step];
      if (at) {
        const time = item.querySelector("time");
        time.textContent = timeFormat.format(at);
        time.dateTime = new Date(at).toISOString();
      }
    }
  }
  setProgress(card, update.progress, update.current_step);
  setState(card, update.state);
  if (update.state === "completed") {
    card.stepText.textContent = "Completed";
    const result = update.result || {};
    showOutcome(card, `Result: ${result.file ?? "ready"} · ${numberFormat.format(result.rows ?? 0)} rows`, "ok");
  } else if (update.state === "failed") {
    const item = card.items.get(update.current_step);
    if (item) item.classList.add("failed");
    card.stepText.textContent = `Failed while ${(STEP_LABEL[update.current_step] || update.current_step).toLowerCase()}`;
    showOutcome(card, update.error || "The job failed.", "bad");
  } else {
    card.stepText.textContent = `${STEP_LABEL[update.current_step] || update.current_step}…`;
  }
  if (isFinal(update.state)) stopFollowing(card);
}

function applyStatus(card, status) {
  card.nameNode.textContent = status.name;
  card.bar.setAttribute("aria-label", `Progress of ${status.name}`);
  apply(
    card,
    {
      state: status.state,
      progress: status.progress,
      current_step: status.current_step,
      result: status.result,
      error: status.error,
      reached: status.reached,
    },
    "status",
    null,
  );
}

function showOutcome(card, text, kind) {
  card.outcome.hidden = false;
  card.outcome.className = `outcome ${kind}`;
  card.outcome.textContent = text;
}

function note(card, text, kind) {
  const node = el("p", `note ${kind}`);
  node.append(el("time", "note-time", timeFormat.format(Date.now())), ` ${text}`);
  node.dataset.kind = kind;
  card.notes.append(node);
}

function describe(card) {
  const state = STATE_LABEL[card.state] || card.state;
  if (isFinal(card.state)) return `${state.toLowerCase()}, ${card.progress}%`;
  return `${state.toLowerCase()}, ${card.progress}% (${(STEP_LABEL[card.node.dataset.step] || "").toLowerCase()})`;
}

boot();
