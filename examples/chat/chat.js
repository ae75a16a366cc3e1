// The chat page. Plain ES module, no build step, no framework.
//
// All traffic goes through the project's browser client, /switchboard.js,
// which speaks the wire protocol (docs/PROTOCOL.md): it answers the server's
// `ping` with `pong`, reconnects with backoff and jitter when the connection
// drops or the server falls silent for the heartbeat window, rejoins every
// room with `since` so nothing is lost (and drops duplicates by `seq`), and
// falls back from WebSocket to SSE to long-poll.
//
// Protocol frames used, and how they show:
// - room messages: `publish` (echo on). Your own message is drawn when it
//   comes back as the echoed `message`, like everyone else's, so every tab
//   shows one order (the room's `seq` order) and a message is only ever shown
//   once it really reached the room. If the publish is refused (`error` with
//   our `id`), the text goes back into the box with the reason.
// - private messages: `direct` to `{user}`; the server delivers it to every
//   tab of that user. The sender draws it when the server acks it (there is no
//   echo for `direct`); an `unknown_target` error means nobody of that name is
//   online, and nothing was delivered. Then a copy goes to the sender's own
//   user (`direct` to `{user: me}`, event `private_sent`), so the sender's
//   other tabs show it too; the tab that sent it skips its own copy (by sid).
// - who is here: `presence` request on every (re)join for the list, then the
//   room's `presence` join/leave events keep it current and show as centred
//   notices with the member count. `joined.members` gives the count on join.
//
// Escaping: every piece of user data reaches the page through textContent or
// dataset, never innerHTML, so `<script>` in a message or a name is text.

import { Switchboard } from "/switchboard.js";

const $ = (id) => document.getElementById(id);
const ROOM_NAME = /^[A-Za-z0-9_.:/-]{1,128}$/;
const HISTORY_URL = "/history";
const STATE_TEXT = {
  idle: "Connecting…",
  connecting: "Connecting…",
  connected: "Connected",
  reconnecting: "Reconnecting…",
  closed: "Disconnected",
};
const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const fullFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });

/** @type {{me: string|null, sb: Switchboard|null, convs: Map<string, any>, active: any}} */
const state = { me: null, sb: null, convs: new Map(), active: null };

// ---- small DOM helpers (text only) -----------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function hue(name) {
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.codePointAt(0)) % 360;
  return h;
}

function avatar(name) {
  const node = el("span", "avatar", [...name][0]?.toUpperCase() || "?");
  node.style.setProperty("--hue", hue(name));
  node.setAttribute("aria-hidden", "true");
  return node;
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

// ---- sign in ----------------------------------------------------------------

function saveSession() {
  if (!state.me) return;
  const rooms = [...state.convs.values()].filter((c) => c.kind === "room").map((c) => c.name);
  const active = state.active ? state.active.key : null;
  sessionStorage.setItem("chat", JSON.stringify({ name: state.me, rooms, active }));
}

function boot() {
  const saved = JSON.parse(sessionStorage.getItem("chat") || "null");
  if (saved && saved.name) return start(saved.name, saved.rooms || [], saved.active);
  const params = new URLSearchParams(location.search);
  $("login-name").value = params.get("name") || localStorage.getItem("chat-name") || "";
  if (params.get("room")) $("login-room").value = params.get("room");
  $("login").hidden = false;
  $("login-name").focus();
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("login-name").value.trim();
    const room = $("login-room").value.trim();
    if (!name || new TextEncoder().encode(name).length > 64) {
      $("login-error").textContent = "Pick a name of 1 to 32 characters.";
      return;
    }
    if (!ROOM_NAME.test(room)) {
      $("login-error").textContent = "Room names use letters, digits and _ - . : / only.";
      return;
    }
    localStorage.setItem("chat-name", name);
    start(name, [room], `room:${room}`);
  });
}

function start(name, rooms, active) {
  state.me = name;
  $("login").hidden = true;
  $("app").hidden = false;
  $("me-name").textContent = name;
  $("me-avatar").replaceWith(Object.assign(avatar(name), { id: "me-avatar" }));

  // Demo authentication: the name goes as the `token` query parameter and the
  // server's TrustClientName authenticator takes it as the user id. A real
  // app sends a real credential (a session cookie or a signed token) that its
  // server-side Authenticator verifies.
  const sb = new Switchboard({ token: name });
  state.sb = sb;
  sb.on("state", ({ state: s }) => showStatus(s));
  sb.on("direct", onDirect);
  // Errors about a room show in that room (its onError); the rest here.
  sb.on("error", (e) => e.room || showComposerError(describe(e)));
  sb.on("close", (frame) => {
    if (frame.code === 1008) showComposerError(`The server refused this session: ${frame.reason}`);
  });
  showStatus(sb.state);

  for (const room of rooms) joinRoom(room, false);
  const first = state.convs.get(active) || state.convs.values().next().value;
  activate(first || null);
  wireUi();
}

function showStatus(s) {
  const node = $("status");
  node.dataset.state = s;
  $("status-text").textContent = STATE_TEXT[s] || s;
  $("message").disabled = s === "closed";
}

// ---- conversations ------------------------------------------------------------

function createConv(kind, name) {
  const key = `${kind}:${name}`;
  const log = el("section", "log");
  log.dataset.conv = key;
  log.setAttribute("role", "log");
  log.setAttribute("aria-live", "polite");
  log.hidden = true;
  $("logs").append(log);

  const item = el("li", "conv");
  item.dataset.conv = key;
  const button = el("button", "conv-button");
  button.type = "button";
  if (kind === "room") button.append(el("span", "hash", "#"));
  else button.append(avatar(name));
  button.append(el("span", "conv-name", name), el("span", "badge"));
  button.addEventListener("click", () => activate(conv));
  item.append(button);
  $(kind === "room" ? "room-list" : "dm-list").append(item);

  const conv = { key, kind, name, log, item, unread: 0, members: new Set(), count: null, seen: new Set(), joined: false };
  state.convs.set(key, conv);
  if (kind === "dm") $("dm-empty").hidden = true;
  return conv;
}

function removeConv(conv) {
  state.convs.delete(conv.key);
  conv.log.remove();
  conv.item.remove();
  if (![...state.convs.values()].some((c) => c.kind === "dm")) $("dm-empty").hidden = false;
  if (state.active === conv) activate(state.convs.values().next().value || null);
  saveSession();
}

function joinRoom(name, focus = true) {
  const existing = state.convs.get(`room:${name}`);
  if (existing) return focus && activate(existing);
  const conv = createConv("room", name);
  conv.room = state.sb.join(name, (data, frame) => onRoomMessage(conv, frame), {
    onJoined: (frame) => onJoined(conv, frame),
    onPresence: (frame) => onPresence(conv, frame),
    onReset: (frame) => onReset(conv, frame),
    onError: (error) => notice(conv, describe(error), "error"),
  });
  if (focus) activate(conv);
  saveSession();
  return conv;
}

function openDm(user) {
  const conv = state.convs.get(`dm:${user}`) || createConv("dm", user);
  activate(conv);
  return conv;
}

function activate(conv) {
  state.active = conv;
  for (const c of state.convs.values()) {
    const on = c === conv;
    c.log.hidden = !on;
    c.item.classList.toggle("active", on);
  }
  $("empty").hidden = Boolean(conv);
  $("composer").hidden = !conv;
  $("leave-room").hidden = !conv;
  if (!conv) {
    $("conv-title").textContent = "No conversation";
    $("conv-subtitle").textContent = "";
    renderMembers();
    saveSession();
    return;
  }
  conv.unread = 0;
  renderBadge(conv);
  $("conv-title").textContent = conv.kind === "room" ? `# ${conv.name}` : conv.name;
  $("leave-room").textContent = conv.kind === "room" ? "Leave room" : "Close";
  $("message").placeholder = conv.kind === "room" ? `Message #${conv.name}` : `Private message to ${conv.name}`;
  renderSubtitle(conv);
  renderMembers();
  conv.log.scrollTop = conv.log.scrollHeight;
  $("composer-error").textContent = "";
  if (!$("message").disabled) $("message").focus();
  saveSession();
}

function renderSubtitle(conv) {
  if (conv !== state.active) return;
  $("conv-subtitle").textContent =
    conv.kind === "room"
      ? conv.count === null
        ? "Joining…"
        : plural(conv.count, "member")
      : "Private conversation: only you two see it";
}

function renderBadge(conv) {
  const badge = conv.item.querySelector(".badge");
  badge.textContent = conv.unread ? String(conv.unread) : "";
  conv.item.classList.toggle("unread", conv.unread > 0);
}

function renderMembers() {
  const conv = state.active;
  const list = $("member-list");
  list.replaceChildren();
  $("member-count").textContent = "";
  if (!conv) return ($("members-hint").textContent = "");
  if (conv.kind === "dm") {
    $("members-hint").textContent =
      `Messages here go only to ${conv.name}, in every tab they have open. ` +
      "They are not stored: someone who is offline does not get them.";
    return;
  }
  $("members-hint").textContent = conv.members.size > 1 ? "Click someone to message them privately." : "";
  $("member-count").textContent = conv.members.size ? String(conv.members.size) : "";
  const names = [...conv.members].sort((a, b) => a.localeCompare(b));
  for (const user of names) {
    const item = el("li", "member");
    item.dataset.user = user;
    const mine = user === state.me;
    const body = el(mine ? "div" : "button", "member-button");
    body.append(avatar(user), el("span", "member-name", user));
    if (mine) body.append(el("span", "you", "you"));
    else {
      body.type = "button";
      body.title = `Message ${user} privately`;
      body.addEventListener("click", () => openDm(user));
    }
    item.append(body);
    list.append(item);
  }
}

// ---- rendering messages --------------------------------------------------------

/** One message row: others' on the left (white), one's own on the right (blue). */
function messageRow({ user, text, ts, mine, privateTo, privateFrom, seq, epoch }) {
  const row = el("div", `msg ${mine ? "mine" : "theirs"}`);
  row.dataset.user = user;
  if (seq !== undefined) {
    row.dataset.seq = String(seq);
    row.dataset.epoch = epoch;
  }
  const isPrivate = privateTo !== undefined || privateFrom !== undefined;
  if (isPrivate) row.classList.add("private");
  if (!mine) row.append(avatar(user));
  const bubble = el("div", "bubble");
  const meta = el("div", "meta");
  if (!mine) {
    const author = el("span", "author", user);
    author.style.setProperty("--hue", hue(user));
    meta.append(author);
  }
  if (isPrivate) meta.append(el("span", "tag", mine ? `Private to ${privateTo}` : "Private"));
  if (meta.childElementCount) bubble.append(meta);
  bubble.append(el("div", "text", text));
  const time = el("time", "time", timeFormat.format(ts));
  time.dateTime = new Date(ts).toISOString();
  time.title = fullFormat.format(ts);
  bubble.append(time);
  row.append(bubble);
  return row;
}

/** Groups a run of messages from one person: the name and avatar show once. */
function groupWith(row, prev) {
  if (
    prev &&
    prev.classList.contains("msg") &&
    prev.dataset.user === row.dataset.user &&
    prev.classList.contains("mine") === row.classList.contains("mine") &&
    prev.classList.contains("private") === row.classList.contains("private")
  ) {
    row.classList.add("cont");
  }
}

function append(conv, row) {
  const log = conv.log;
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 80;
  groupWith(row, log.lastElementChild);
  log.append(row);
  if (atBottom || row.classList.contains("mine")) log.scrollTop = log.scrollHeight;
}

function notice(conv, text, kind = "") {
  const row = el("div", `notice ${kind}`.trim());
  row.append(el("span", null, text));
  append(conv, row);
}

function bump(conv) {
  if (conv === state.active && document.visibilityState === "visible") return;
  conv.unread += 1;
  renderBadge(conv);
}

function textOf(data) {
  if (data && typeof data.text === "string") return data.text;
  return JSON.stringify(data);
}

function rowOfMessage(frame) {
  const from = frame.from || {};
  const user = from.server ? "server" : from.user || "anonymous";
  return messageRow({
    user,
    text: textOf(frame.data),
    ts: frame.ts || Date.now(),
    mine: !from.server && user === state.me,
    seq: frame.seq,
    epoch: frame.epoch,
  });
}

function onRoomMessage(conv, frame) {
  const id = `${frame.epoch}:${frame.seq}`;
  if (conv.seen.has(id)) return;
  conv.seen.add(id);
  append(conv, rowOfMessage(frame));
  bump(conv);
}

// ---- room events -------------------------------------------------------------------

function onJoined(conv, frame) {
  if (!state.convs.has(conv.key)) return; // left meanwhile
  if (frame.members !== undefined) conv.count = frame.members;
  if (!conv.joined) {
    conv.joined = true;
    notice(conv, `You joined #${conv.name}${frame.members !== undefined ? ` · ${plural(frame.members, "member")}` : ""}`);
    // What was said before we came: the room's retained messages, up to the
    // position `joined` reported (later ones arrive live).
    loadHistory(conv, frame, "prepend");
  }
  // On every (re)join: the member list as it is now.
  conv.room
    .presence()
    .then((members) => {
      conv.members = new Set(members);
      conv.count = conv.members.size;
      if (conv === state.active) renderMembers();
      renderSubtitle(conv);
    })
    .catch(() => {});
  renderSubtitle(conv);
}

function onPresence(conv, frame) {
  if (frame.action === "join") conv.members.add(frame.user);
  else if (frame.action === "leave") conv.members.delete(frame.user);
  else return;
  conv.count = frame.count;
  const verb = frame.action === "join" ? "joined" : "left";
  notice(conv, `${frame.user} ${verb} · ${plural(frame.count, "member")}`, "presence");
  renderSubtitle(conv);
  if (conv === state.active) renderMembers();
}

function onReset(conv, frame) {
  // The server could not replay what we missed (it restarted, or the gap was
  // longer than the room's history): say so, and reload what it still has.
  notice(conv, "Reconnected. Some messages may have been missed.", "warning");
  loadHistory(conv, frame, "append");
}

async function loadHistory(conv, joined, where) {
  let body;
  try {
    const response = await fetch(`${HISTORY_URL}?room=${encodeURIComponent(conv.name)}`, { cache: "no-store" });
    if (!response.ok) return;
    body = await response.json();
  } catch {
    return;
  }
  const older = body.messages.filter(
    (m) => m.epoch === joined.epoch && m.seq <= joined.seq && !conv.seen.has(`${m.epoch}:${m.seq}`),
  );
  if (!older.length || !state.convs.has(conv.key)) return;
  if (where === "append") {
    for (const m of older) onRoomMessage(conv, m);
    return;
  }
  const fragment = document.createDocumentFragment();
  let prev = null;
  for (const m of older) {
    conv.seen.add(`${m.epoch}:${m.seq}`);
    const row = rowOfMessage(m);
    groupWith(row, prev);
    fragment.append(row);
    prev = row;
  }
  conv.log.prepend(fragment);
  conv.log.scrollTop = conv.log.scrollHeight;
}

// ---- private messages ------------------------------------------------------------

function onDirect(frame) {
  const from = frame.from || {};
  if (frame.event === "private_sent") {
    // What this user sent from another tab. Only our own user can send it
    // (the server sets `from`); the sending tab drew it already.
    if (from.user !== state.me || from.sid === state.sb.sid) return;
    const to = frame.data && frame.data.to;
    if (typeof to !== "string" || !to) return;
    const conv = state.convs.get(`dm:${to}`) || createConv("dm", to);
    append(conv, messageRow({ user: state.me, text: textOf(frame.data), ts: Date.now(), mine: true, privateTo: to }));
    return;
  }
  const user = from.server ? "server" : from.user || "anonymous";
  const conv = state.convs.get(`dm:${user}`) || createConv("dm", user);
  append(conv, messageRow({ user, text: textOf(frame.data), ts: Date.now(), mine: false, privateFrom: user }));
  bump(conv);
}

// ---- sending -------------------------------------------------------------------------

function describe(error) {
  switch (error && error.code) {
    case "unknown_target":
      return "Nobody of that name is online: the message was not delivered.";
    case "rate_limited":
      return "Slow down: too many messages at once.";
    case "not_connected":
    case "connection_lost":
      return "Not connected: the message was not sent. Try again in a moment.";
    case "frame_too_large":
      return "That message is too long.";
    default:
      return (error && error.message) || "Something went wrong.";
  }
}

function showComposerError(text) {
  $("composer-error").textContent = text;
}

async function send(event) {
  event.preventDefault();
  const conv = state.active;
  const input = $("message");
  const text = input.value.trim();
  if (!conv || !text) return;
  input.value = "";
  showComposerError("");
  try {
    if (conv.kind === "room") {
      // Drawn when the echo arrives (see the top of this file).
      await conv.room.publish({ text }, { event: "chat" });
    } else {
      await state.sb.direct({ user: conv.name }, { text }, { event: "private" });
      append(conv, messageRow({ user: state.me, text, ts: Date.now(), mine: true, privateTo: conv.name }));
      if (conv.name !== state.me) {
        // For this user's other tabs (best effort: the message itself went).
        state.sb.direct({ user: state.me }, { text, to: conv.name }, { event: "private_sent" }).catch(() => {});
      }
    }
  } catch (error) {
    if (!input.value) input.value = text;
    showComposerError(describe(error));
  }
}

// ---- wiring ---------------------------------------------------------------------------

function wireUi() {
  $("composer").addEventListener("submit", send);
  $("join-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("join-room").value.trim().replace(/^#/, "");
    if (!ROOM_NAME.test(name)) {
      showComposerError("Room names use letters, digits and _ - . : / only.");
      return;
    }
    $("join-room").value = "";
    joinRoom(name);
  });
  $("leave-room").addEventListener("click", () => {
    const conv = state.active;
    if (!conv) return;
    if (conv.kind === "room") conv.room.leave().catch(() => {});
    removeConv(conv);
  });
  $("sign-out").addEventListener("click", () => {
    state.sb.close();
    sessionStorage.removeItem("chat");
    location.reload();
  });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && state.active) {
      state.active.unread = 0;
      renderBadge(state.active);
    }
  });
}

boot();
