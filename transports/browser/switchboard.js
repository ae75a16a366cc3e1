// switchboard.js — the browser client of Switchboard (protocol version 1).
//
// One small dependency-free ES module with one API whatever the transport:
//
//   import { Switchboard } from "/switchboard.js";
//   const sb = new Switchboard({ token });            // connects at once
//   sb.on("state", ({ state, transport }) => ...);    // connecting | connected | reconnecting | closed
//   const room = sb.join("lobby", (msg) => ..., { onPresence, onReset, onError });
//   await room.publish({ text: "hi" }, { event: "chat" });
//   await sb.direct({ user: "bob" }, { text: "psst" });
//   const members = await room.presence();
//
// It tries WebSocket, then SSE, then long-poll: a transport that cannot
// connect, or connects but delivers nothing (a proxy that buffers SSE), is
// given up after `connectTimeoutMs` and the next one is tried. On a lower
// transport it tries to go back up every `upgradeAfterMs`. Reconnects wait
// with exponential backoff and full jitter, capped, so a server restart is
// not met by a synchronized storm. After every reconnect it rejoins its rooms
// with `since`, so nothing is lost (or, when the server cannot replay, the
// room's `onReset` tells the page to reload its state), and it drops
// duplicates by `seq`. After the server's `interval_ms` of silence it pings;
// after `interval_ms + timeout_ms` it reconnects. A join the server refuses
// (`forbidden`, `invalid_room`, ...) reaches the room's `onError` and the room
// is dropped, not rejoined on every reconnect.

const TRANSPORTS = ["websocket", "sse", "longpoll"];
// Error codes of requests that fail for want of a connection, or for now: a
// join that failed this way is sent again on reconnect, silently.
const TRANSIENT = new Set(["connection_lost", "not_connected", "closed", "rate_limited", "unavailable"]);

/** A connection to a Switchboard server. */
export class Switchboard {
  /**
   * @param {object} [options]
   * @param {string} [options.url] base URL of the server's Switchboard routes (default: this page's origin)
   * @param {string} [options.token] credential, sent as the `token` query parameter
   * @param {string[]} [options.transports] transports in order of preference
   * @param {number} [options.connectTimeoutMs] how long a transport may take to deliver `welcome`
   * @param {number} [options.backoffBaseMs] first reconnect delay cap
   * @param {number} [options.backoffMaxMs] largest reconnect delay
   * @param {number} [options.upgradeAfterMs] how long to stay on a fallback before trying a better transport
   * @param {boolean} [options.autoConnect] connect now (default true)
   */
  constructor(options = {}) {
    this.url = new URL(options.url || "/", globalThis.location ? globalThis.location.href : undefined);
    if (!this.url.pathname.endsWith("/")) this.url.pathname += "/";
    this.token = options.token;
    this.transports = (options.transports || TRANSPORTS).filter((t) => TRANSPORTS.includes(t));
    this.connectTimeoutMs = options.connectTimeoutMs ?? 5000;
    this.backoffBaseMs = options.backoffBaseMs ?? 500;
    this.backoffMaxMs = options.backoffMaxMs ?? 15000;
    this.upgradeAfterMs = options.upgradeAfterMs ?? 60000;

    this.state = "idle";
    this.transport = null; // name of the transport in use
    this.sid = null;
    this.user = null;
    this.rooms = new Map(); // name -> Room
    this.listeners = new Map(); // event -> Set<fn>
    this.pending = new Map(); // id -> {resolve, reject}
    this.presenceWaiters = new Map(); // room -> [resolve]
    this.nextId = 1;
    this.level = 0; // index in `transports` to start from
    this.attempt = 0; // failed connection cycles in a row
    this.conn = null;
    this.timers = new Set();
    this.heartbeatIntervalMs = 25000;
    this.heartbeatWindowMs = 45000;
    this.lastHeard = 0;
    this.lastSent = 0;
    // One of each at a time (several piled up across reconnects before).
    this.heartbeatTimer = null;
    this.reconnectTimer = null;
    this.upgradeTimer = null;
    if (options.autoConnect !== false) this.connect();
  }

  /** Subscribes to `state`, `direct`, `error`, `welcome` or `close` events. Returns an unsubscribe function. */
  on(event, fn) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event).add(fn);
    return () => this.listeners.get(event).delete(fn);
  }

  emit(event, value) {
    for (const fn of this.listeners.get(event) || []) {
      try {
        fn(value);
      } catch (e) {
        console.error(e);
      }
    }
  }

  setState(state) {
    this.state = state;
    this.emit("state", { state, transport: this.transport });
  }

  /** Starts connecting (done by the constructor unless `autoConnect: false`). */
  connect() {
    if (this.state !== "idle" && this.state !== "closed") return;
    this.stopped = false;
    this.setState("connecting");
    this.tryLevel(this.level);
  }

  /** Closes the connection for good. */
  close() {
    this.stopped = true;
    this.clearTimers();
    if (this.conn) this.conn.close();
    this.conn = null;
    this.failPending("closed");
    this.setState("closed");
  }

  /**
   * Joins `room`; `onMessage(data, message)` gets every message once, in order.
   * @returns {Room}
   */
  join(name, onMessage, options = {}) {
    let room = this.rooms.get(name);
    if (!room) {
      room = new Room(this, name, options);
      this.rooms.set(name, room);
    }
    if (onMessage) room.handlers.add(onMessage);
    Object.assign(room.options, options);
    if (this.conn && this.state === "connected") this.sendJoin(room);
    return room;
  }

  /** Sends a direct message to `{user}` (all their tabs) or `{sid}`. Resolves on `ack`. */
  direct(to, data, { event } = {}) {
    return this.request({ type: "direct", to, data, ...(event ? { event } : {}) });
  }

  // ---- frames out --------------------------------------------------------

  request(frame) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, frame });
      if (!this.send({ ...frame, id })) {
        this.pending.delete(id);
        reject(new SwitchboardError("not_connected", "not connected"));
      }
    });
  }

  send(frame) {
    if (!this.conn || this.state !== "connected") return false;
    this.conn.send(JSON.stringify(frame));
    this.lastSent = Date.now();
    return true;
  }

  sendJoin(room) {
    const frame = { type: "join", room: room.name };
    if (room.epoch !== null) frame.since = { seq: room.seq, epoch: room.epoch };
    if (room.options.presence === false) frame.presence = false;
    room.joining = this.request(frame).catch((e) => this.joinFailed(room, e));
  }

  /** A join was refused: a refusal that retrying cannot change drops the room
   * (rejoining it on every reconnect would only spend the error budget); a
   * join cut short by a lost connection is simply sent again on reconnect. */
  joinFailed(room, error) {
    if (TRANSIENT.has(error.code)) return;
    if (this.rooms.get(room.name) === room) this.rooms.delete(room.name);
    room.joined = false;
    room.emitError(error);
  }

  // ---- frames in ---------------------------------------------------------

  handleFrame(frame) {
    this.lastHeard = Date.now();
    switch (frame.type) {
      case "welcome":
        return this.onWelcome(frame);
      case "message": {
        const room = this.rooms.get(frame.room);
        if (room) room.onMessage(frame);
        return;
      }
      case "joined": {
        const room = this.rooms.get(frame.room);
        if (room) room.onJoined(frame);
        return;
      }
      case "presence": {
        if (frame.action === "list") {
          const waiters = this.presenceWaiters.get(frame.room) || [];
          this.presenceWaiters.delete(frame.room);
          for (const resolve of waiters) resolve(frame.members);
          return;
        }
        const room = this.rooms.get(frame.room);
        if (room) room.onPresence(frame);
        return;
      }
      case "direct":
        return this.emit("direct", frame);
      case "ack":
        return this.settle(frame.id, true, frame);
      case "error": {
        const error = new SwitchboardError(frame.code, frame.message, frame.room);
        if (frame.id !== undefined && this.pending.has(frame.id)) return this.settle(frame.id, false, error);
        const room = frame.room && this.rooms.get(frame.room);
        // A refused join without an id: a room SSE joined from its URL.
        if (room && !room.joined) this.joinFailed(room, error);
        else if (room) room.emitError(error);
        return this.emit("error", error);
      }
      case "ping":
        return this.send({ type: "pong" });
      case "pong":
        return;
      case "close":
        this.emit("close", frame);
        this.closeFrame = frame;
        return;
      default:
        return; // newer server frame types are ignored
    }
  }

  settle(id, ok, value) {
    const waiter = this.pending.get(id);
    if (!waiter) return;
    this.pending.delete(id);
    if (ok) waiter.resolve(value);
    else waiter.reject(value);
  }

  failPending(code) {
    for (const [, waiter] of this.pending) waiter.reject(new SwitchboardError(code, "connection lost"));
    this.pending.clear();
  }

  onWelcome(frame) {
    this.sid = frame.sid;
    this.user = frame.user;
    const hb = frame.heartbeat || {};
    this.heartbeatIntervalMs = hb.interval_ms || 25000;
    this.heartbeatWindowMs = this.heartbeatIntervalMs + (hb.timeout_ms || 20000);
    this.lastHeard = Date.now();
    this.attempt = 0;
    this.setState("connected");
    this.emit("welcome", frame);
    for (const room of this.rooms.values()) room.joined = false; // until its `joined` comes
    // SSE joined its rooms in the URL; the others join now, with `since`.
    for (const room of [...this.rooms.values()]) {
      if (!(this.transport === "sse" && this.conn.joinedRooms.has(room.name))) this.sendJoin(room);
    }
    this.watchHeartbeat();
    this.clearTimer(this.upgradeTimer);
    if (this.level > 0) this.upgradeTimer = this.later(() => this.tryUpgrade(), this.upgradeAfterMs);
  }

  /** Called by transports on any sign of life from the server, frames or not. */
  heard() {
    this.lastHeard = Date.now();
  }

  // ---- connection lifecycle ------------------------------------------------

  tryLevel(level) {
    if (this.stopped) return;
    if (level >= this.transports.length) return this.scheduleReconnect();
    this.dropConnection(); // never two at once: the older one would linger as a ghost session
    const name = this.transports[level];
    this.transport = name;
    this.closeFrame = null;
    const conn = makeTransport(name, this);
    this.conn = conn;
    let welcomed = false;
    const giveUp = this.later(() => {
      if (!welcomed && this.conn === conn) {
        conn.close();
        this.conn = null;
        this.tryLevel(level + 1); // connected but silent: try the next transport
      }
    }, this.connectTimeoutMs);
    conn.onframe = (frame) => {
      if (this.conn !== conn) return;
      if (frame.type === "welcome") {
        welcomed = true;
        this.clearTimer(giveUp);
        this.level = level;
      }
      this.handleFrame(frame);
    };
    conn.onclose = (info = {}) => {
      if (this.conn !== conn) return;
      this.conn = null;
      this.clearTimer(giveUp);
      const close = this.closeFrame;
      if (info.fatal || (close && close.code === 1008) || info.code === 1008) {
        // Refused (authentication, origin, policy): retrying cannot help.
        this.failPending("closed");
        this.stopped = true;
        this.setState("closed");
        return;
      }
      if (!welcomed) return this.tryLevel(level + 1);
      this.failPending("connection_lost");
      this.scheduleReconnect();
    };
    conn.open();
  }

  scheduleReconnect() {
    if (this.stopped) return;
    this.setState("reconnecting");
    // Exponential backoff with full jitter, capped.
    const cap = Math.min(this.backoffMaxMs, this.backoffBaseMs * 2 ** this.attempt);
    const delay = Math.random() * cap;
    this.attempt = Math.min(this.attempt + 1, 16);
    this.clearTimer(this.reconnectTimer);
    this.reconnectTimer = this.later(() => this.tryLevel(this.level), delay);
  }

  /** Closes the current transport without reporting it (its callbacks are cut). */
  dropConnection() {
    const conn = this.conn;
    this.conn = null;
    if (conn) conn.close();
  }

  /** Reopens the current transport at once (push-only SSE joining a new room). */
  reconnectSoon() {
    if (!this.conn) return;
    this.tryLevel(this.level);
  }

  /** Reconnects now (drops the current transport), keeping rooms and positions. */
  reconnect() {
    if (this.stopped) return;
    this.dropConnection();
    this.failPending("connection_lost");
    this.scheduleReconnect();
  }

  tryUpgrade() {
    if (this.stopped || this.state !== "connected" || this.level === 0) return;
    // Planned move up: drop the fallback and start again from the top;
    // rejoining with `since` makes the switch lossless.
    this.dropConnection();
    this.failPending("connection_lost"); // their answers went with the old session
    this.setState("reconnecting");
    this.level = 0;
    this.tryLevel(0);
  }

  /** One watcher per client: pings after `interval_ms` of silence (the server
   * answers `pong`), reconnects after `interval_ms + timeout_ms`. */
  watchHeartbeat() {
    this.clearTimer(this.heartbeatTimer);
    const every = Math.max(250, Math.min(this.heartbeatIntervalMs, this.heartbeatWindowMs) / 4);
    const check = () => {
      this.heartbeatTimer = null;
      if (this.state !== "connected" || !this.conn) return;
      const now = Date.now();
      const silent = now - this.lastHeard;
      if (this.conn.canSense === false) {
        // Push-only SSE: keepalives are comments the page cannot see.
      } else if (silent > this.heartbeatWindowMs) {
        return this.reconnect();
      } else if (silent >= this.heartbeatIntervalMs && now - this.lastSent >= this.heartbeatIntervalMs / 2) {
        this.send({ type: "ping" });
      }
      this.heartbeatTimer = this.later(check, every);
    };
    this.heartbeatTimer = this.later(check, every);
  }

  later(fn, ms) {
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      fn();
    }, ms);
    this.timers.add(timer);
    return timer;
  }

  clearTimer(timer) {
    if (timer === null || timer === undefined) return;
    clearTimeout(timer);
    this.timers.delete(timer);
  }

  clearTimers() {
    for (const timer of this.timers) clearTimeout(timer);
    this.timers.clear();
  }

  endpoint(path, params = {}) {
    const url = new URL(path, this.url);
    if (this.token) url.searchParams.set("token", this.token);
    for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null) url.searchParams.set(k, v);
    return url;
  }
}

/** A room this client is in. */
export class Room {
  constructor(client, name, options) {
    this.client = client;
    this.name = name;
    this.options = { ...options };
    this.handlers = new Set();
    this.seq = 0;
    this.epoch = null;
    this.members = null;
    this.joined = false;
  }

  /** Publishes `data` to the room. Resolves on `ack`. */
  publish(data, { event, echo } = {}) {
    const frame = { type: "publish", room: this.name, data };
    if (event) frame.event = event;
    if (echo === false) frame.echo = false;
    return this.client.request(frame);
  }

  /** Asks for the member list. Resolves with the user ids. */
  presence() {
    return new Promise((resolve, reject) => {
      const waiters = this.client.presenceWaiters;
      if (!waiters.has(this.name)) waiters.set(this.name, []);
      waiters.get(this.name).push(resolve);
      this.client.request({ type: "presence", room: this.name }).catch((e) => {
        const list = waiters.get(this.name) || [];
        waiters.set(this.name, list.filter((r) => r !== resolve));
        reject(e);
      });
    });
  }

  /** Leaves the room. */
  leave() {
    this.client.rooms.delete(this.name);
    this.joined = false;
    if (this.client.state === "connected") return this.client.request({ type: "leave", room: this.name });
    return Promise.resolve();
  }

  onJoined(frame) {
    const resumed = this.epoch !== null;
    const lost = resumed && (frame.recovered === false || frame.epoch !== this.epoch);
    this.joined = true;
    this.epoch = frame.epoch;
    if (lost || !resumed || frame.seq < this.seq) this.seq = frame.seq;
    if (frame.members !== undefined) this.members = frame.members;
    if (this.options.onJoined) this.options.onJoined(frame);
    if (lost && this.options.onReset) this.options.onReset(frame);
  }

  onMessage(frame) {
    // At most once, in order: drop what was already seen in this epoch.
    if (frame.epoch === this.epoch && frame.seq <= this.seq) return;
    this.epoch = frame.epoch;
    this.seq = frame.seq;
    for (const handler of this.handlers) {
      try {
        handler(frame.data, frame);
      } catch (e) {
        console.error(e);
      }
    }
  }

  onPresence(frame) {
    this.members = frame.count;
    if (this.options.onPresence) this.options.onPresence(frame);
  }

  emitError(error) {
    if (this.options.onError) this.options.onError(error);
  }
}

/** A refusal from the server (`error` frame) or a lost connection. */
export class SwitchboardError extends Error {
  constructor(code, message, room) {
    super(message || code);
    this.code = code;
    this.room = room;
  }
}

// ---- transports --------------------------------------------------------------
// Each has open(), send(text), close(), and calls onframe(frame) / onclose(info).

function makeTransport(name, client) {
  if (name === "websocket") return new WebSocketTransport(client);
  if (name === "sse") return new SseTransport(client);
  return new LongPollTransport(client);
}

class WebSocketTransport {
  constructor(client) {
    this.client = client;
  }

  open() {
    const url = this.client.endpoint("ws");
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    try {
      this.ws = new WebSocket(url);
    } catch (e) {
      return queueMicrotask(() => this.onclose({}));
    }
    this.ws.onmessage = (event) => {
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      this.onframe(frame);
    };
    this.ws.onclose = (event) => this.onclose({ code: event.code });
  }

  send(text) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(text);
  }

  close() {
    if (this.ws) {
      this.ws.onclose = null;
      this.ws.onmessage = null;
      this.ws.close();
    }
  }
}

const SSE_EVENTS = ["welcome", "joined", "message", "direct", "presence", "ack", "error", "pong", "close"];

class SseTransport {
  constructor(client) {
    this.client = client;
    this.joinedRooms = new Set();
    this.canSense = true;
  }

  open() {
    const rooms = [...this.client.rooms.values()];
    this.joinedRooms = new Set(rooms.map((r) => r.name));
    const cursor = rooms
      .filter((r) => r.epoch !== null)
      .map((r) => `${r.name}~${r.epoch}~${r.seq}`)
      .join(",");
    const url = this.client.endpoint("sse", {
      rooms: rooms.map((r) => r.name).join(",") || undefined,
      since: cursor || undefined,
    });
    this.es = new EventSource(url);
    for (const type of SSE_EVENTS) {
      this.es.addEventListener(type, (event) => {
        let frame;
        try {
          frame = JSON.parse(event.data);
        } catch {
          return;
        }
        this.onframe(frame);
      });
    }
    // Our own reconnect (with fallback and backoff) replaces EventSource's.
    // A server `error` frame is an SSE event named "error" too, which
    // EventSource also hands to `onerror`: only a plain Event is the stream
    // failing (a refused join must not tear the connection down).
    this.es.onerror = (event) => {
      if (event instanceof MessageEvent) return;
      this.close();
      this.onclose({});
    };
  }

  send(text) {
    const sid = this.client.sid;
    fetch(this.client.endpoint("sse/send", { sid }), {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: text,
    })
      .then((response) => {
        if (response.status === 403) {
          // Push-only server: no client frames. Joins then ride on the URL.
          this.canSense = false;
          let frame;
          try {
            frame = JSON.parse(text);
          } catch {
            return;
          }
          if (frame.type === "join" && !this.joinedRooms.has(frame.room)) this.client.reconnectSoon();
          if (frame.id !== undefined)
            this.client.settle(frame.id, false, new SwitchboardError("forbidden", "server push only"));
        }
      })
      .catch(() => {});
  }

  close() {
    if (this.es) {
      this.es.onerror = null;
      this.es.close();
    }
  }
}

class LongPollTransport {
  constructor(client) {
    this.client = client;
    this.ack = 0;
    this.closed = false;
    this.outbox = [];
    this.sending = false;
  }

  async open() {
    try {
      const response = await fetch(this.client.endpoint("poll/open"), { method: "POST" });
      if (this.closed) return;
      if (response.status === 401 || response.status === 403) return this.onclose({ fatal: true });
      if (!response.ok) return this.onclose({});
      const frames = await response.json();
      this.sid = frames.length && frames[0].sid;
      // `[welcome]` is the first answer: the first poll acknowledges it (with
      // ack=0 the server sent the welcome again, and the client rejoined).
      this.ack = frames.length;
      this.deliver(frames);
      this.loop();
    } catch {
      if (!this.closed) this.onclose({});
    }
  }

  deliver(frames) {
    for (const frame of frames) {
      if (this.closed) return;
      this.onframe(frame);
    }
  }

  async loop() {
    let failures = 0;
    while (!this.closed) {
      const ack = this.ack;
      this.ack = 0; // an answer lost in transit was received by nobody: ack 0 next time
      this.abort = new AbortController();
      try {
        const response = await fetch(this.client.endpoint("poll", { sid: this.sid, ack }), {
          signal: this.abort.signal,
          cache: "no-store",
        });
        if (this.closed) return;
        if (!response.ok) return this.onclose({ fatal: response.status === 401 });
        const frames = await response.json();
        this.ack = frames.length;
        failures = 0;
        this.client.heard(); // an empty answer after the poll timeout is a sign of life too
        this.deliver(frames);
        if (frames.some((f) => f.type === "close")) {
          this.closed = true;
          return this.onclose({});
        }
      } catch {
        if (this.closed) return;
        if (++failures >= 3) return this.onclose({});
        await new Promise((resolve) => setTimeout(resolve, 250 * failures)); // not a tight loop
      }
    }
  }

  send(text) {
    this.outbox.push(text);
    if (!this.sending) this.flush();
  }

  async flush() {
    this.sending = true;
    while (this.outbox.length && !this.closed) {
      const batch = this.outbox.splice(0, this.outbox.length);
      try {
        await fetch(this.client.endpoint("poll/send", { sid: this.sid }), {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: `[${batch.join(",")}]`,
        });
      } catch {
        break;
      }
    }
    this.sending = false;
  }

  close() {
    this.closed = true;
    if (this.abort) this.abort.abort();
  }
}
