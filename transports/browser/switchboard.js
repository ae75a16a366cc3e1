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
// duplicates by `seq`. A live message that shows a hole in a room's `seq`
// (or a new `epoch`) makes it rejoin that room with `since` = the last seq it
// has without a hole, so the server replays what is missing (or answers
// `recovered: false`, and `onReset` fires); in a latest-value room
// (`joined.latest`) a gap is a value the server replaced by a newer one, not a
// loss, so it is not chased. After the server's `interval_ms`
// of silence it pings; after `interval_ms + timeout_ms` it reconnects, and a
// transport whose connections keep going silent (`maxSilentFailures` in a
// row: a proxy that passes `welcome` and then holds everything) is given up
// for the next one. A join the server refuses (`forbidden`, `invalid_room`,
// ...) reaches the room's `onError` and the room is dropped, not rejoined on
// every reconnect; a join refused for now (`rate_limited`, `unavailable`) or
// lost on the way is sent again after a backoff.
//
// Every request (publish, direct, presence, leave) settles: with the `ack`,
// with the server's `error`, or with a SwitchboardError whose `code` is
// `send_failed` (the request carrying it failed on the network or with a 5xx;
// it may or may not have reached the server), the code of the server's HTTP
// error answer, `connection_lost` (the session ended before the answer),
// `timeout` (no answer within `requestTimeoutMs`) or `not_connected`.
//
// With `shareTabs: true` the tabs of one origin and user share one
// connection: a leader tab holds it, the others go through it (see "shared
// tabs" below).

const TRANSPORTS = ["websocket", "sse", "longpoll"];
// Error codes of requests that fail for want of a connection, or for now: a
// join that failed this way is sent again on reconnect, silently.
const TRANSIENT = new Set([
  "connection_lost",
  "not_connected",
  "closed",
  "rate_limited",
  "unavailable",
  "send_failed",
  "timeout",
]);
// Of those, the ones that mean the connection is gone: the reconnect rejoins.
const GONE = new Set(["connection_lost", "not_connected", "closed"]);

/** A connection to a Switchboard server. */
export class Switchboard {
  /**
   * @param {object} [options]
   * @param {string} [options.url] base URL of the server's Switchboard routes (default: this page's origin)
   * @param {string} [options.token] credential, sent as the `token` query parameter
   * @param {() => (string|Promise<string>)} [options.getToken] returns a fresh credential: called before
   *   the current one expires (sent in band as `refresh`, no reconnect) and before every reconnect
   * @param {string[]} [options.transports] transports in order of preference
   * @param {number} [options.connectTimeoutMs] how long a transport may take to deliver `welcome`
   * @param {number} [options.backoffBaseMs] first reconnect delay cap
   * @param {number} [options.backoffMaxMs] largest reconnect delay
   * @param {number} [options.upgradeAfterMs] how long to stay on a fallback before trying a better transport
   * @param {number} [options.requestTimeoutMs] how long a request may wait for its answer (0: forever)
   * @param {number} [options.maxSilentFailures] connections of one transport in a row that may go silent before the next transport is tried
   * @param {boolean} [options.autoConnect] connect now (default true)
   * @param {boolean} [options.shareTabs] one connection for all tabs of this origin and user: a leader tab holds it, the others go through it (default false)
   * @param {string} [options.shareKey] what tabs share a connection by, besides the origin and `url` (default: the token's `sub`, or the token)
   */
  constructor(options = {}) {
    this.url = new URL(options.url || "/", globalThis.location ? globalThis.location.href : undefined);
    if (!this.url.pathname.endsWith("/")) this.url.pathname += "/";
    this.token = options.token;
    this.getToken = options.getToken;
    this.transports = (options.transports || TRANSPORTS).filter((t) => TRANSPORTS.includes(t));
    this.connectTimeoutMs = options.connectTimeoutMs ?? 5000;
    this.backoffBaseMs = options.backoffBaseMs ?? 500;
    this.backoffMaxMs = options.backoffMaxMs ?? 15000;
    this.upgradeAfterMs = options.upgradeAfterMs ?? 60000;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 10000;
    this.maxSilentFailures = options.maxSilentFailures ?? 2;

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
    this.welcomedAt = 0;
    // Whether the connection in use has shown that it carries more than its
    // `welcome` (a pong, a ping, or traffic after a whole heartbeat window),
    // and how many connections of this transport in a row went silent.
    this.connHealthy = false;
    this.silentFailures = 0;
    // One of each at a time (several piled up across reconnects before).
    this.heartbeatTimer = null;
    this.reconnectTimer = null;
    this.upgradeTimer = null;
    // Shared tabs: this tab's connection is a virtual one to the leader tab.
    this.share = options.shareTabs && canShareTabs() ? new TabShare(this, options) : null;
    if (this.share) this.transports = ["tabs"];
    if (options.autoConnect !== false) this.connect();
  }

  /** With `shareTabs`: whether this tab holds the shared connection. */
  get isLeader() {
    return !!(this.share && this.share.mux);
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
    if (this.getToken && !this.token) return void this.withFreshToken(() => this.tryLevel(this.level));
    this.tryLevel(this.level);
  }

  /** Closes the connection for good. */
  close() {
    this.stopped = true;
    this.clearTimers();
    if (this.conn) this.conn.close();
    this.conn = null;
    if (this.share) this.share.close();
    this.share = null;
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
      const timer =
        this.requestTimeoutMs > 0
          ? this.later(() => {
              if (!this.pending.has(id)) return;
              this.pending.delete(id);
              reject(new SwitchboardError("timeout", `no answer from the server within ${this.requestTimeoutMs} ms`));
            }, this.requestTimeoutMs)
          : null;
      this.pending.set(id, { resolve, reject, frame, timer });
      if (!this.send({ ...frame, id })) {
        this.pending.delete(id);
        this.clearTimer(timer);
        reject(new SwitchboardError("not_connected", "not connected"));
      }
    });
  }

  send(frame) {
    if (!this.conn || this.state !== "connected") return false;
    this.conn.send(JSON.stringify(frame), frame);
    this.lastSent = Date.now();
    return true;
  }

  /** A transport could not deliver `frames` (the request carrying them
   * failed, or was refused): their requests fail with `error`. */
  sendFailed(frames, error) {
    for (const frame of frames) if (frame && frame.id !== undefined) this.settle(frame.id, false, error);
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
    if (TRANSIENT.has(error.code)) {
      // Refused for now, or lost on the way, on a connection that is still
      // up: again after a while (a join is idempotent; replays are deduped).
      if (!GONE.has(error.code) && this.state === "connected") this.retryJoin(room);
      return;
    }
    if (this.rooms.get(room.name) === room) this.rooms.delete(room.name);
    room.joined = false;
    room.recovering = false;
    this.clearTimer(room.retryTimer);
    room.emitError(error);
  }

  retryJoin(room) {
    const conn = this.conn;
    const cap = Math.min(this.backoffMaxMs, this.backoffBaseMs * 2 ** room.retries);
    room.retries = Math.min(room.retries + 1, 16);
    this.clearTimer(room.retryTimer);
    room.retryTimer = this.later(() => {
      room.retryTimer = null;
      const wanted = this.rooms.get(room.name) === room && (!room.joined || room.recovering);
      if (wanted && this.conn === conn && this.state === "connected") this.recoverRoom(room);
    }, Math.random() * cap);
  }

  /** Joins `room` again with `since` on the connection in use: after a hole
   * in its seq, an epoch change, or a join that did not go through. */
  recoverRoom(room) {
    if (!this.conn || this.state !== "connected") return; // the reconnect rejoins it
    // Push-only SSE sends nothing: its rooms (and positions) ride on the URL.
    if (this.conn.canSense === false) return this.reconnectSoon();
    this.sendJoin(room);
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
        this.markHealthy(); // the server heard us recently enough to ask
        return this.send({ type: "pong" });
      case "pong":
        return this.markHealthy();
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
    this.clearTimer(waiter.timer);
    if (ok) waiter.resolve(value);
    else waiter.reject(value);
  }

  failPending(code) {
    const waiters = [...this.pending.values()];
    this.pending.clear();
    for (const waiter of waiters) {
      this.clearTimer(waiter.timer);
      waiter.reject(new SwitchboardError(code, code === "closed" ? "closed" : "connection lost"));
    }
  }

  /** The connection in use carries frames both ways, not just its welcome. */
  markHealthy() {
    this.connHealthy = true;
    this.silentFailures = 0;
  }

  onWelcome(frame) {
    this.sid = frame.sid;
    this.user = frame.user;
    const hb = frame.heartbeat || {};
    this.heartbeatIntervalMs = hb.interval_ms || 25000;
    this.heartbeatWindowMs = this.heartbeatIntervalMs + (hb.timeout_ms || 20000);
    this.lastHeard = Date.now();
    this.welcomedAt = this.lastHeard;
    this.connHealthy = false;
    this.attempt = 0;
    this.setState("connected");
    this.emit("welcome", frame);
    this.scheduleRefresh(frame.expires_in_ms);
    for (const room of this.rooms.values()) room.resetSession(); // not joined until its `joined` comes
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
    // A tab sharing a connection waits for its leader as long as it takes.
    const giveUp = conn.patient
      ? null
      : this.later(() => {
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
        if (this.level !== level) this.silentFailures = 0; // counted per transport
        this.level = level;
      }
      this.handleFrame(frame);
    };
    conn.onclose = (info = {}) => {
      if (this.conn !== conn) return;
      this.conn = null;
      this.clearTimer(giveUp);
      const close = this.closeFrame;
      // An expired token is not a refusal when getToken can bring a new one.
      const renewable = this.getToken && close && close.reason === "token_expired";
      if (!renewable && (info.fatal || (close && close.code === 1008) || info.code === 1008)) {
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
    this.reconnectTimer = this.later(() => this.withFreshToken(() => this.tryLevel(this.level)), delay);
  }

  /** Closes the current transport without reporting it (its callbacks are cut). */
  dropConnection() {
    const conn = this.conn;
    this.conn = null;
    if (conn) conn.close();
  }

  /** Reopens the current transport at once (push-only SSE joining a new
   * room, or recovering one): the new stream's URL carries every room and
   * position. What was waiting for an answer went with the old session. */
  reconnectSoon() {
    if (!this.conn) return;
    this.failPending("connection_lost");
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
        return this.silenceFailed();
      } else {
        // Alive past a whole window and heard lately: more than a welcome.
        if (!this.connHealthy && now - this.welcomedAt > this.heartbeatWindowMs && silent < this.heartbeatIntervalMs)
          this.markHealthy();
        if (silent >= this.heartbeatIntervalMs && now - this.lastSent >= this.heartbeatIntervalMs / 2)
          this.send({ type: "ping" });
      }
      this.heartbeatTimer = this.later(check, every);
    };
    this.heartbeatTimer = this.later(check, every);
  }

  /** The connection went silent for the heartbeat window. One that never
   * carried more than its welcome counts against its transport: after
   * `maxSilentFailures` of those in a row, the next transport is tried (a
   * proxy that passes the first bytes of a stream and then holds the rest
   * would otherwise be reconnected to forever); going back up is tried
   * after `upgradeAfterMs` as usual. */
  silenceFailed() {
    this.silentFailures = this.connHealthy ? 1 : this.silentFailures + 1;
    if (this.silentFailures >= this.maxSilentFailures && this.level + 1 < this.transports.length) {
      this.silentFailures = 0;
      this.level += 1;
    }
    this.reconnect();
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

  // ---- token refresh (options.getToken) ---------------------------------------
  // Before the token expires (the server's `expires_in_ms`, else the JWT's
  // `exp`), a fresh one from getToken() goes over the open connection as a
  // `refresh` frame; its `ack` makes it the token for later requests and
  // reconnects. A refused refresh is reported as an `error` event; the
  // session then closes `token_expired` and reconnects with getToken().

  scheduleRefresh(expiresInMs) {
    this.clearTimer(this.refreshTimer);
    this.refreshTimer = null;
    const ms = expiresInMs ?? jwtExpiresInMs(this.token);
    if (!this.getToken || typeof ms !== "number") return;
    // Half-way for short tokens, 30 s ahead for long ones.
    this.refreshTimer = this.later(() => this.refreshToken(), Math.max(ms / 2, ms - 30000));
  }

  async refreshToken() {
    const conn = this.conn;
    let token;
    try {
      token = await this.getToken();
    } catch (e) {
      return this.emit("error", new SwitchboardError("token_unavailable", String(e)));
    }
    if (!token || this.conn !== conn || this.state !== "connected") return; // a reconnect brings it
    this.request({ type: "refresh", token }).then(
      (ack) => {
        this.token = token;
        this.scheduleRefresh(ack.expires_in_ms);
      },
      (error) => {
        if (!GONE.has(error.code)) this.emit("error", error);
      },
    );
  }

  /** Runs `fn` once getToken() (if given) has replaced the token. */
  withFreshToken(fn) {
    if (!this.getToken) return fn();
    Promise.resolve()
      .then(() => this.getToken())
      .then(
        (token) => {
          if (token) this.token = token;
        },
        (e) => this.emit("error", new SwitchboardError("token_unavailable", String(e))),
      )
      .then(() => {
        if (!this.stopped) fn();
      });
  }

  endpoint(path, params = {}) {
    const url = new URL(path, this.url);
    if (this.token) url.searchParams.set("token", this.token);
    for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null) url.searchParams.set(k, v);
    return url;
  }
}

/** A JWT's payload (readable without the key), or null. */
function jwtPayload(token) {
  try {
    const payload = String(token).split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(payload.padEnd(Math.ceil(payload.length / 4) * 4, "=")));
  } catch {
    return null;
  }
}

/** Milliseconds until a JWT's `exp`, or null. */
function jwtExpiresInMs(token) {
  const exp = jwtPayload(token)?.exp;
  return typeof exp === "number" ? exp * 1000 - Date.now() : null;
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
    this.latest = false; // a latest-value room (`joined.latest`): its seq has gaps by design
    this.recovering = false; // rejoining with `since` after a hole or a new epoch
    this.unechoed = 0; // our publishes with `echo: false` on this session: holes in seq we expect
    this.retries = 0;
    this.retryTimer = null;
  }

  /** Publishes `data` to the room. Resolves on `ack`. With
   * `idempotencyKey` (a string of 1 to 64 bytes, unique per message), a
   * publish sent again with the same key within a minute, after a failure
   * that left its fate unknown (`connection_lost`, `timeout`,
   * `unavailable`), is acked and not published twice, through any node. */
  publish(data, { event, echo, idempotencyKey } = {}) {
    const frame = { type: "publish", room: this.name, data };
    if (event) frame.event = event;
    if (idempotencyKey !== undefined) frame.idempotency_key = idempotencyKey;
    if (echo === false) {
      // Its seq will be a hole in what this session sees: an expected one.
      frame.echo = false;
      this.unechoed += 1;
      return this.client.request(frame).catch((e) => {
        this.unechoed = Math.max(0, this.unechoed - 1);
        throw e;
      });
    }
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
    this.client.clearTimer(this.retryTimer);
    this.joined = false;
    this.recovering = false;
    if (this.client.state === "connected") return this.client.request({ type: "leave", room: this.name });
    return Promise.resolve();
  }

  /** A new session: nothing joined yet, no hole expected. */
  resetSession() {
    this.joined = false;
    this.recovering = false;
    this.unechoed = 0;
    this.retries = 0;
    this.client.clearTimer(this.retryTimer);
    this.retryTimer = null;
  }

  onJoined(frame) {
    const resumed = this.epoch !== null;
    const lost = resumed && (frame.recovered === false || frame.epoch !== this.epoch);
    this.joined = true;
    this.latest = frame.latest === true;
    this.recovering = false;
    this.retries = 0;
    this.epoch = frame.epoch;
    if (lost || !resumed || frame.seq < this.seq) this.seq = frame.seq;
    if (frame.members !== undefined) this.members = frame.members;
    if (this.options.onJoined) this.options.onJoined(frame);
    if (lost && this.options.onReset) this.options.onReset(frame);
  }

  onMessage(frame) {
    if (this.epoch !== null) {
      // A new epoch: the room's history was lost. Rejoin with where we
      // are; the server answers `recovered: false` and `onReset` fires.
      if (frame.epoch !== this.epoch) return this.recover();
      // At most once, in order: drop what was already seen in this epoch.
      if (frame.seq <= this.seq) return;
      // No hole is a loss in a replay (what precedes `joined`: the server
      // replays all it has, or says `recovered: false`), nor in a
      // latest-value room, where a value replaced by a newer one is never sent.
      const hole = this.joined && !this.latest ? frame.seq - this.seq - 1 : 0;
      if (hole > 0) {
        // A hole is ours when this session published that many messages
        // with `echo: false`; any other hole is messages we missed: keep
        // this one back too, and rejoin with `since` = the last seq we
        // have, so the server replays them all in order.
        if (hole > this.unechoed) return this.recover();
        this.unechoed -= hole;
      }
    }
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

  recover() {
    if (this.recovering) return; // the rejoin is on its way; its replay brings this message
    this.recovering = true;
    this.client.recoverRoom(this);
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

// ---- shared tabs (`shareTabs: true`) ------------------------------------------
//
// One connection for all the tabs of one origin and user. The tabs elect a
// leader with a Web Lock (`navigator.locks`): the tab holding the lock is the
// leader, the others queue for it, and the browser hands it to the next one
// when the leader closes (or crashes). The leader runs the one real connection
// (`Upstream`: a plain Switchboard, every transport with its fallback and
// backoff) and a `Mux` in front of it; every tab, the leader's own included,
// talks to the mux through a `TabTransport` over a BroadcastChannel, as if
// the mux were the server: `welcome`, `joined`, `message`, `ack`, `error`...
// So a tab's Switchboard is the same client as ever, its rooms, `since`,
// dedupe by `seq`, requests and errors untouched, and a new leader is just a
// reconnect: every tab rejoins its rooms with `since` from its own position,
// so nothing is lost, and what two tabs' replays bring twice is dropped by
// room and seq in each tab.
//
// Not a SharedWorker: it could not call the page's `getToken()` (a function
// does not cross to a worker, so tokens could not be refreshed), its script
// must be a file of the page's own origin (a client served by a Switchboard
// server on another origin cannot start one, nor can a page under a
// `worker-src` policy), and some browsers lack it (Chrome on Android).
// BroadcastChannel and Web Locks are in every current browser and run the
// same transport code in a tab. See docs/PROTOCOL.md ("Shared tabs").
//
// Channel messages (`k`): a tab's `open` (a virtual session), `frame` (a
// client frame of that session) and `bye` go to the leader; the leader's
// `welcome`, `srv` (server frames), `fail` (a request that could not be
// sent) and `down` (the session ended) go to sessions named in `to`;
// `leader` announces a new leader (every session ends and opens again).

/** Whether this browser has what `shareTabs` needs. */
function canShareTabs() {
  return typeof BroadcastChannel === "function" && !!(globalThis.navigator && navigator.locks && navigator.locks.request);
}

/** The user a token names, for the share key: a JWT's `sub`, else the token
 * itself (the trust authenticator's user name, or an opaque key). */
function tokenSubject(token) {
  if (typeof token !== "string" || !token) return "";
  const sub = token.split(".").length === 3 ? jwtPayload(token)?.sub : undefined;
  return typeof sub === "string" ? sub : token;
}

function randomId() {
  if (globalThis.crypto && crypto.randomUUID) return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

const ENCODER = new TextEncoder();

/** One tab's part in sharing: its channel, its locks, its virtual
 * connection, and the mux while it leads. */
class TabShare {
  constructor(client, options) {
    this.client = client;
    this.options = options;
    const user = options.shareKey ?? tokenSubject(options.token);
    this.name = `switchboard.js|${client.url.href}|${user}`;
    this.tabId = randomId();
    this.sessions = 0; // virtual sessions opened by this tab
    this.conn = null; // this tab's TabTransport in use
    this.mux = null; // while this tab leads
    this.closed = false;
    this.abort = new AbortController();
    this.channel = new BroadcastChannel(this.name);
    this.channel.onmessage = (event) => this.receive(event.data);
    // This tab's own lock, held while it lives: the leader queues for it and
    // so learns when the tab is gone, closed or crashed.
    this.alive = new Promise((held) => {
      navigator.locks
        .request(`${this.name}|tab|${this.tabId}`, { signal: this.abort.signal }, () => {
          held();
          return new Promise((release) => (this.releaseTab = release));
        })
        .catch(() => {});
    });
    // Leadership: queue for the leader lock, and hold it until closed.
    navigator.locks
      .request(`${this.name}|leader`, { signal: this.abort.signal }, () => this.lead())
      .catch(() => {});
  }

  /** This tab holds the leader lock: run the connection until closed. */
  lead() {
    if (this.closed) return undefined;
    this.mux = new Mux(this);
    this.post({ k: "leader", from: this.tabId });
    if (this.conn) this.conn.leaderChanged();
    return new Promise((release) => (this.releaseLeader = release));
  }

  transport() {
    return new TabTransport(this);
  }

  /** What the leader's real connection is opened with: this tab's options,
   * and its newest token (with getToken, a fresh one is fetched first). */
  upstreamOptions() {
    const token = this.client.getToken ? undefined : this.client.token;
    return { ...this.options, url: this.client.url.href, token, shareTabs: false, autoConnect: true };
  }

  /** To the leader: this tab's mux, or the channel. */
  toLeader(message) {
    if (this.mux) {
      const mux = this.mux;
      queueMicrotask(() => mux.fromTab(message));
    } else {
      this.post(message);
    }
  }

  /** From the leader to sessions: this tab's own directly, others over the channel. */
  toSessions(keys, message) {
    if (!keys.length) return;
    message.to = keys;
    const own = `${this.tabId}:`;
    if (keys.some((key) => !key.startsWith(own))) this.post(message);
    if (keys.some((key) => key.startsWith(own))) queueMicrotask(() => this.receive(message));
  }

  post(message) {
    if (!this.closed) this.channel.postMessage(message);
  }

  receive(message) {
    if (!message || this.closed) return;
    if (message.to) {
      if (this.conn && message.to.includes(this.conn.key)) this.conn.fromLeader(message);
    } else if (message.k === "leader") {
      if (this.conn) this.conn.leaderChanged();
    } else if (this.mux) {
      this.mux.fromTab(message);
    }
  }

  /** Stops sharing: a leader ends its connection (every session is told),
   * then hands the lock on. */
  close() {
    if (this.closed) return;
    if (this.mux) this.mux.stop();
    this.mux = null;
    this.closed = true;
    this.abort.abort();
    if (this.releaseLeader) this.releaseLeader();
    if (this.releaseTab) this.releaseTab();
    this.channel.close();
  }
}

/** A tab's connection to the leader's mux, seen by its Switchboard as a
 * transport like WebSocket's: open(), send(), close(), onframe, onclose. */
class TabTransport {
  constructor(share) {
    this.share = share;
    this.client = share.client;
    this.key = `${share.tabId}:${++share.sessions}`;
    this.state = "new"; // opening | open | closed
    this.joinedRooms = new Set(); // none ride on a URL
    // Waits for the leader as long as it takes: no connect timeout, no
    // fallback (the leader's connection has its own).
    this.patient = true;
  }

  open() {
    this.state = "opening";
    this.share.conn = this;
    this.share.alive.then(() => this.hello());
  }

  hello() {
    if (this.state === "opening") this.share.toLeader({ k: "open", session: this.key });
  }

  /** A new leader: a session with the old one is over; an opening one asks the new one. */
  leaderChanged() {
    if (this.state === "opening") this.hello();
    else if (this.state === "open") this.end({});
  }

  send(text, frame) {
    if (this.state === "open") this.share.toLeader({ k: "frame", session: this.key, frame });
    else this.client.sendFailed([frame], new SwitchboardError("connection_lost", "the leader tab is gone"));
  }

  fromLeader(message) {
    if (this.state === "closed") return;
    switch (message.k) {
      case "welcome":
        if (this.state !== "opening") return;
        this.state = "open";
        this.client.transport = message.transport; // the leader's, for `state` events
        return this.onframe(message.frame);
      case "srv":
        if (this.state === "open") this.onframe(message.frame);
        return;
      case "fail": {
        const error = new SwitchboardError(message.code, message.message);
        if (message.status !== undefined) error.status = message.status;
        return this.client.sendFailed([{ id: message.id }], error);
      }
      case "down":
        return this.end({ fatal: message.fatal });
      default:
        return;
    }
  }

  end(info) {
    if (this.state === "closed") return;
    this.state = "closed";
    if (this.share.conn === this) this.share.conn = null;
    this.onclose(info);
  }

  close() {
    if (this.state === "closed") return;
    this.state = "closed";
    if (this.share.conn === this) this.share.conn = null;
    this.share.toLeader({ k: "bye", session: this.key });
  }
}

/** The leader's real connection: a Switchboard of its own, with no rooms,
 * whose frames the mux routes. */
class Upstream extends Switchboard {
  constructor(mux, options) {
    super({ ...options, autoConnect: false });
    this.mux = mux;
    this.connect();
  }

  handleFrame(frame) {
    super.handleFrame(frame);
    this.mux.fromServer(frame);
  }

  /** Called when a push-only SSE stream is asked to join: its joins ride on
   * its URL, but the tabs' rooms are not this client's. The next
   * transport, else a reconnect after backoff (not a loop of reopenings). */
  reconnectSoon() {
    if (!this.conn) return;
    if (this.level + 1 < this.transports.length) {
      this.level += 1;
      return super.reconnectSoon();
    }
    this.reconnect();
  }

  sendFailed(frames, error) {
    super.sendFailed(frames, error); // its own (`refresh`)
    for (const frame of frames) if (frame && frame.id !== undefined) this.mux.failed(frame.id, error);
  }
}

/** The leader's side: the tabs' virtual sessions over one real session.
 * It joins the union of their rooms, counted per session, and routes each
 * server frame to the sessions it is for. */
class Mux {
  constructor(share) {
    this.share = share;
    this.sessions = new Map(); // key -> {key, tab, welcomed, rooms: Map<room, Entry>}
    // room -> {members: Map<key, Entry>, joined, seq, epoch, joins, lists, publishes}:
    // `joined`/`seq`/`epoch` are the real session's; the FIFOs hold the ids
    // of its joins and presence requests (answered by frames without an id,
    // in order) and of its publishes (to tell whose echo a message is).
    // An Entry is one session in a room: {state: pending|joined, presence}.
    this.rooms = new Map();
    this.requests = new Map(); // upstream id -> {session, id, kind, room, prev}
    this.welcome = null;
    this.watched = new Set();
    this.abort = new AbortController();
    this.upstream = new Upstream(this, share.upstreamOptions());
    this.unwatch = this.upstream.on("state", ({ state }) => {
      // Closed by itself: refused for good (authentication, policy).
      if (state !== "connected") this.upstreamDown(state === "closed");
    });
  }

  stop() {
    this.abort.abort();
    this.unwatch();
    this.upstream.close();
    this.upstreamDown(false, true);
  }

  // ---- from the tabs

  fromTab(message) {
    switch (message.k) {
      case "open":
        return this.open(message.session);
      case "bye":
        return this.drop(message.session);
      case "frame": {
        const session = this.sessions.get(message.session);
        // Frames of a session this leader did not welcome belong to an old one.
        if (session && session.welcomed && message.frame && typeof message.frame === "object") this.fromSession(session, message.frame);
        return;
      }
      default:
        return;
    }
  }

  open(key) {
    if (this.sessions.has(key)) return; // asked twice (a new leader came while it was asking)
    const tab = key.slice(0, key.lastIndexOf(":"));
    for (const other of [...this.sessions.values()]) if (other.tab === tab) this.drop(other.key); // replaced
    const session = { key, tab, welcomed: false, rooms: new Map() };
    this.sessions.set(key, session);
    this.watch(tab);
    if (this.upstream.stopped) return this.share.toSessions([key], { k: "down", fatal: true });
    if (this.welcome) this.greet(session);
  }

  greet(session) {
    session.welcomed = true;
    this.share.toSessions([session.key], { k: "welcome", frame: this.welcome, transport: this.upstream.transport });
  }

  /** Ends a tab's sessions when its lock comes free: the tab is gone. */
  watch(tab) {
    if (tab === this.share.tabId || this.watched.has(tab)) return;
    this.watched.add(tab);
    navigator.locks
      .request(`${this.share.name}|tab|${tab}`, { signal: this.abort.signal }, () => {
        this.watched.delete(tab);
        for (const session of [...this.sessions.values()]) if (session.tab === tab) this.drop(session.key);
      })
      .catch(() => {});
  }

  /** A session ended: its rooms are left, the real session's once no session is in them. */
  drop(key) {
    const session = this.sessions.get(key);
    if (!session) return;
    this.sessions.delete(key);
    for (const name of session.rooms.keys()) {
      const room = this.rooms.get(name);
      if (room) {
        room.members.delete(key);
        this.leaveIfEmpty(name, room);
      }
    }
  }

  leaveIfEmpty(name, room) {
    if (room.members.size) return;
    // A join on its way: decide when its `joined` comes.
    if (room.joined && !room.joins.length && this.welcome) {
      room.joined = false;
      room.seq = null;
      this.forward(null, { type: "leave", room: name }, "internal", name);
    }
    if (!room.joined && !room.joins.length && !room.lists.length && !room.publishes.length) this.rooms.delete(name);
  }

  room(name) {
    let room = this.rooms.get(name);
    if (!room) {
      room = { members: new Map(), joined: false, seq: null, epoch: null, joins: [], lists: [], publishes: [] };
      this.rooms.set(name, room);
    }
    return room;
  }

  reply(session, frame) {
    this.share.toSessions([session.key], { k: "srv", frame });
  }

  fromSession(session, frame) {
    const max = this.welcome && this.welcome.limits && this.welcome.limits.max_frame_bytes;
    if (max && ENCODER.encode(JSON.stringify(frame)).length > max) {
      // Refused here as the server would, without an id: sent on, it would
      // close the shared session (WebSocket 1009) under every tab.
      return this.reply(session, { type: "error", code: "frame_too_large", message: `frame larger than ${max} bytes` });
    }
    const name = typeof frame.room === "string" ? frame.room : null;
    const answer = frame.id !== undefined ? { type: "ack", id: frame.id } : null;
    switch (frame.type) {
      case "ping":
        // The leader answers: the real session has its own heartbeat.
        this.reply(session, { type: "pong" });
        if (answer) this.reply(session, answer);
        return;
      case "pong":
        return;
      case "refresh":
        // The shared session's token is the leader's (its getToken keeps it
        // fresh); a follower's refresh only renews what it will lead with.
        if (answer) this.reply(session, answer);
        return;
      case "join": {
        if (name === null) break;
        const prev = session.rooms.get(name);
        const entry = { state: "pending", presence: frame.presence !== false };
        const room = this.room(name);
        session.rooms.set(name, entry);
        room.members.set(session.key, entry);
        const presence = [...room.members.values()].some((e) => e.presence);
        const upId = this.forward(session, { ...frame, presence: presence ? undefined : false }, "join", name, prev);
        if (upId !== null) room.joins.push(upId);
        return;
      }
      case "leave":
      case "presence": {
        if (name === null) break;
        const room = this.rooms.get(name);
        const entry = session.rooms.get(name);
        if (!entry && room && room.members.size) {
          // The real session is in the room for other tabs, this one is not.
          return this.reply(session, {
            type: "error",
            code: "not_joined",
            message: "this session is not in that room",
            room: name,
            ...(frame.id !== undefined ? { id: frame.id } : {}),
          });
        }
        if (frame.type === "presence") {
          const upId = this.forward(session, frame, "presence", name);
          if (upId !== null) this.room(name).lists.push(upId);
          return;
        }
        if (entry) {
          session.rooms.delete(name);
          room.members.delete(session.key);
          if (room.members.size || room.joins.length) {
            // Others stay; or a join is on its way, whose `joined` leaves.
            if (answer) this.reply(session, answer);
            return;
          }
          // The last one out: the real session leaves, and the server answers.
          room.joined = false;
          room.seq = null;
        }
        this.forward(session, frame, "leave", name);
        if (room) this.leaveIfEmpty(name, room);
        return;
      }
      case "publish": {
        if (name === null) break;
        // Always echoed to the real session: the other tabs in the room are
        // other sessions as far as the page knows, and get it; the mux keeps
        // it from the publishing tab when it asked for `echo: false`.
        const upId = this.forward(session, { ...frame, echo: undefined }, "publish", name);
        if (upId !== null) this.room(name).publishes.push({ upId, session: session.key, echo: frame.echo !== false });
        return;
      }
      default:
        break;
    }
    this.forward(session, frame, frame.type, name);
  }

  /** Sends `frame` on the real session under an id of the mux; its answer
   * goes back to `session` under the tab's own id. */
  forward(session, frame, kind, room, prev) {
    // The upstream's own counter: its own requests (`refresh`) share the ids.
    const upId = this.upstream.nextId++;
    this.requests.set(upId, { session: session && session.key, id: frame.id, kind, room, prev });
    if (!this.upstream.send({ ...frame, id: upId })) {
      this.failed(upId, new SwitchboardError("not_connected", "not connected"));
      return null;
    }
    return upId;
  }

  // ---- from the server

  fromServer(frame) {
    switch (frame.type) {
      case "welcome": {
        if (this.welcome) this.upstreamDown(false); // a new session without a state change in between
        this.welcome = frame;
        for (const session of this.sessions.values()) if (!session.welcomed) this.greet(session);
        return;
      }
      case "message":
        return this.onMessage(frame);
      case "joined":
        return this.onJoined(frame);
      case "presence": {
        const room = this.rooms.get(frame.room);
        if (!room) return;
        if (frame.action === "list") {
          const request = this.requests.get(room.lists.shift());
          if (request && request.session) this.toKeys([request.session], frame);
          return;
        }
        const keys = [...room.members].filter(([, e]) => e.state === "joined" && e.presence).map(([key]) => key);
        return this.toKeys(keys, frame);
      }
      case "ack": {
        const request = this.take(frame.id);
        if (!request) return;
        if (request.kind === "publish") {
          // Not echoed (the real session is not in the room): no message will claim it.
          const room = this.rooms.get(request.room);
          if (room) {
            room.publishes = room.publishes.filter((p) => p.upId !== frame.id);
            this.leaveIfEmpty(request.room, room);
          }
        }
        if (request.session && request.id !== undefined) this.toKeys([request.session], { ...frame, id: request.id });
        return;
      }
      case "error": {
        const request = frame.id !== undefined ? this.take(frame.id) : null;
        if (request) {
          this.undo(request, frame.id);
          if (!request.session) return;
          const { id, ...rest } = frame;
          return this.toKeys([request.session], request.id !== undefined ? { ...rest, id: request.id } : rest);
        }
        return this.toKeys(this.welcomedKeys(), frame);
      }
      case "ping":
      case "pong":
        return; // the real session's heartbeat
      default:
        // `direct`, `close`, and frame types newer than this client.
        return this.toKeys(this.welcomedKeys(), frame);
    }
  }

  /** A live message goes to every tab joined to the room; a replay (at or
   * below what the real session has seen in this epoch, or before its first
   * `joined`) to the tab whose join asked for it: the server sends a join's
   * replay, then its `joined`, so it is the oldest join still unanswered.
   * A tab whose join is on its way gets no live message: what was published
   * before the server took its join is in its replay (after its `since`), as
   * for a session of its own; one taken earlier would hide the replay's
   * older messages behind it. Each tab's Room drops what it has by seq. */
  onMessage(frame) {
    const room = this.rooms.get(frame.room);
    if (!room) return;
    const live = room.joined && (frame.epoch !== room.epoch || frame.seq > room.seq);
    if (!live) {
      const request = room.joins.length ? this.requests.get(room.joins[0]) : null;
      if (request && room.members.has(request.session)) this.toKeys([request.session], frame);
      return;
    }
    room.seq = frame.seq;
    room.epoch = frame.epoch;
    let skip = null;
    if (frame.from && frame.from.sid === this.welcome.sid && room.publishes.length) {
      // The server answers in order: our own live message is the echo of
      // the oldest publish still unanswered.
      const publish = room.publishes.shift();
      if (!publish.echo) skip = publish.session;
    }
    const keys = [];
    for (const [key, entry] of room.members) if (entry.state === "joined" && key !== skip) keys.push(key);
    this.toKeys(keys, frame);
  }

  onJoined(frame) {
    const name = frame.room;
    const room = this.rooms.get(name);
    if (!room) return;
    room.joined = true;
    if (room.epoch !== frame.epoch || room.seq === null || frame.seq > room.seq) room.seq = frame.seq;
    room.epoch = frame.epoch;
    const request = room.joins.length ? this.requests.get(room.joins.shift()) : null;
    const settle = (entry) => (entry.state = "joined");
    if (request) {
      const session = this.sessions.get(request.session);
      const entry = session && session.rooms.get(name);
      if (entry) {
        settle(entry);
        this.toKeys([session.key], frame);
      }
    } else {
      // Unasked (the room moved to a new epoch): for every session in it.
      const keys = [];
      for (const [key, entry] of room.members) {
        if (entry.state !== "joined") continue;
        settle(entry);
        keys.push(key);
      }
      this.toKeys(keys, frame);
    }
    this.leaveIfEmpty(name, room);
  }

  take(id) {
    const request = this.requests.get(id);
    if (request) this.requests.delete(id);
    return request;
  }

  /** A forwarded frame was refused or not sent: what the mux counted for it is undone. */
  undo(request, upId) {
    const room = request.room !== null && request.room !== undefined ? this.rooms.get(request.room) : null;
    if (!room) return;
    const without = (list) => list.filter((item) => (item.upId ?? item) !== upId);
    if (request.kind === "join") {
      room.joins = without(room.joins);
      const session = this.sessions.get(request.session);
      const entry = session && session.rooms.get(request.room);
      if (session && entry && entry.state === "pending") {
        if (request.prev) {
          session.rooms.set(request.room, request.prev);
          room.members.set(session.key, request.prev);
        } else {
          session.rooms.delete(request.room);
          room.members.delete(session.key);
        }
      }
    } else if (request.kind === "presence") {
      room.lists = without(room.lists);
    } else if (request.kind === "publish") {
      room.publishes = without(room.publishes);
    }
    this.leaveIfEmpty(request.room, room);
  }

  /** The real connection could not send a forwarded frame. */
  failed(upId, error) {
    const request = this.take(upId);
    if (!request) return;
    this.undo(request, upId);
    if (request.session && request.id !== undefined) {
      this.share.toSessions([request.session], { k: "fail", id: request.id, code: error.code, message: error.message, status: error.status });
    }
  }

  /** The real session ended: so does every tab's; they open again and are
   * welcomed by the next one (with `since`, as after any reconnect). A
   * connection refused for good (closed) ends them for good. */
  upstreamDown(fatal, all = false) {
    const keys = [];
    for (const session of [...this.sessions.values()]) {
      if (!session.welcomed && !fatal && !all) continue; // still waiting for a welcome: keeps waiting
      keys.push(session.key);
      this.sessions.delete(session.key);
    }
    this.welcome = null;
    this.rooms.clear();
    this.requests.clear();
    this.share.toSessions(keys, { k: "down", fatal });
  }

  welcomedKeys() {
    return [...this.sessions.values()].filter((s) => s.welcomed).map((s) => s.key);
  }

  toKeys(keys, frame) {
    this.share.toSessions(keys, { k: "srv", frame });
  }
}

// ---- transports --------------------------------------------------------------
// Each has open(), send(text, frame), close(), and calls onframe(frame) /
// onclose(info); a send that fails calls client.sendFailed([frame], error).

function makeTransport(name, client) {
  if (name === "tabs") return client.share.transport();
  if (name === "websocket") return new WebSocketTransport(client);
  if (name === "sse") return new SseTransport(client);
  return new LongPollTransport(client);
}

/** POSTs `body` (client frames) to `path`; resolves on a 2xx answer, else
 * throws a SwitchboardError: `timeout` after `requestTimeoutMs`,
 * `send_failed` for a network error or a 5xx without a code, else the code
 * of the server's `{"error": {"code", "message"}}` (with `status`). */
async function postFrames(client, path, sid, body) {
  let response;
  try {
    response = await fetch(client.endpoint(path, { sid }), {
      method: "POST",
      headers: { "content-type": "application/json" },
      body,
      cache: "no-store",
      ...(client.requestTimeoutMs > 0 ? { signal: AbortSignal.timeout(client.requestTimeoutMs) } : {}),
    });
  } catch (e) {
    if (e && e.name === "TimeoutError")
      throw new SwitchboardError("timeout", `POST ${path}: no answer within ${client.requestTimeoutMs} ms`);
    throw new SwitchboardError("send_failed", `POST ${path} failed (${(e && e.message) || e}); it may not have reached the server`);
  }
  if (response.ok) return response;
  let code = response.status >= 500 ? "send_failed" : `http_${response.status}`;
  let message = `POST ${path} answered ${response.status}`;
  try {
    const error = (await response.json()).error;
    if (error && typeof error.code === "string") {
      code = error.code;
      if (typeof error.message === "string") message = error.message;
    }
  } catch {
    // not a Switchboard answer (a proxy's error page)
  }
  const error = new SwitchboardError(code, message);
  error.status = response.status;
  throw error;
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

  send(text, frame) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(text);
    // Closing: its onclose follows, and the session with it.
    else this.client.sendFailed([frame], new SwitchboardError("connection_lost", "the WebSocket is closing"));
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
const PUSH_ONLY = "this server takes no client frames over SSE (server push only)";

class SseTransport {
  constructor(client) {
    this.client = client;
    this.joinedRooms = new Set();
    this.canSense = true;
    this.closed = false;
    // Whether the server takes client frames over SSE: unknown (null) until
    // a send is refused.
    this.pushOnly = null;
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

  current() {
    return !this.closed && this.client.conn === this;
  }

  send(text, frame) {
    if (this.pushOnly) return this.pushOnlyRefused(frame);
    postFrames(this.client, "sse/send", this.client.sid, text).catch(async (error) => {
      if (!this.current()) return; // its requests went with the old session
      if (error.status !== 403) return this.client.sendFailed([frame], error);
      // 403 `forbidden` has two causes that answer alike: a server that
      // takes no client frames over SSE, or one that no longer knows our
      // sid (the session ended, or the request reached another node). Ask
      // without a sid: a push-only server refuses that too (403), any
      // other answers 400 (`sid` missing).
      if (this.pushOnly === null) this.pushOnly = await this.probePushOnly();
      if (!this.current()) return;
      if (this.pushOnly) return this.pushOnlyRefused(frame);
      if (this.pushOnly === null) return this.client.sendFailed([frame], error); // the probe failed: unknown
      // The session is gone: so is this stream (reconnect, rejoin with since).
      this.client.sendFailed([frame], new SwitchboardError("connection_lost", "the server no longer knows this session"));
      this.close();
      this.onclose({});
    });
  }

  async probePushOnly() {
    try {
      await postFrames(this.client, "sse/send", undefined, "[]");
      return false;
    } catch (error) {
      if (error.status === 403) return true;
      if (error.status) return false; // 400: it takes frames, it just wants a sid
      return null;
    }
  }

  /** Push-only server: no client frames, so no pings either (its keepalives
   * are comments the page cannot see). Joins ride on the stream's URL. */
  pushOnlyRefused(frame) {
    this.canSense = false;
    if (frame.type === "join") {
      const room = this.client.rooms.get(frame.room);
      if (!this.joinedRooms.has(frame.room) || (room && room.recovering)) return this.client.reconnectSoon();
      // Already joined by this stream's URL.
      if (frame.id !== undefined) this.client.settle(frame.id, true, { type: "ack", id: frame.id });
      return;
    }
    if (frame.id !== undefined) this.client.settle(frame.id, false, new SwitchboardError("forbidden", PUSH_ONLY));
  }

  close() {
    this.closed = true;
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
    this.outbox = []; // {text, frame}
    this.sending = false;
  }

  async open() {
    this.abort = new AbortController();
    try {
      const response = await fetch(this.client.endpoint("poll/open"), { method: "POST", signal: this.abort.signal });
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

  send(text, frame) {
    this.outbox.push({ text, frame });
    if (!this.sending) this.flush();
  }

  /** Sends what is queued, one POST at a time. A POST that fails fails the
   * requests it carried (none is sent twice: a publish that may have
   * arrived must not be published again); the queue goes on. */
  async flush() {
    this.sending = true;
    while (this.outbox.length && !this.closed) {
      const batch = this.outbox.splice(0, this.outbox.length);
      try {
        await postFrames(this.client, "poll/send", this.sid, `[${batch.map((b) => b.text).join(",")}]`);
      } catch (error) {
        if (this.closed) break; // its requests went with the old session
        const frames = batch.map((b) => b.frame);
        if (error.status === 403) {
          // The server no longer knows this sid: the session ended.
          this.client.sendFailed(frames, new SwitchboardError("connection_lost", "the server no longer knows this session"));
          this.close();
          this.onclose({});
          break;
        }
        this.client.sendFailed(frames, error);
      }
    }
    this.sending = false;
  }

  close() {
    this.closed = true;
    if (this.abort) this.abort.abort();
  }
}
