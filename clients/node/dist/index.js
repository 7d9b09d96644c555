"use strict";
Object.defineProperty(exports, "__esModule", { value: true });
exports.InboxConsumer = exports.Client = exports.DaemonUnavailable = exports.LoginTimeout = exports.LogoutInProgress = exports.LoginInProgress = exports.InvalidUserId = exports.StoreFull = exports.CursorError = exports.NotLoggedIn = exports.Unavailable = exports.TooManyClients = exports.InvalidParams = exports.MethodNotFound = exports.PermissionDenied = exports.ImlinkError = exports.DEFAULT_SOCKET = void 0;
exports.defaultSocket = defaultSocket;
exports.toLastError = toLastError;
exports.toStatus = toStatus;
exports.toMessage = toMessage;
exports.errorFromJson = errorFromJson;
/**
 * imlinkd's local API from Node.js (no dependencies: `net`): a client with one method per API
 * method, `watch()` as an async iterator that comes back by itself when the daemon restarts,
 * and an at-least-once inbox consumer. docs/api.md is the protocol, docs/clients.md the guide.
 *
 * ```js
 * const { Client } = require('imlinkd-client');
 * const c = new Client('/run/imlinkd/api.sock');
 * console.log((await c.status()).summary);
 * for await (const ev of c.watch()) console.log(ev.name, ev.params);
 * ```
 */
const net = require("net");
exports.DEFAULT_SOCKET = '/run/imlinkd/api.sock';
/** `$IMLINKD_SOCKET`, else `/run/imlinkd/api.sock` (as `imlinkctl`). */
function defaultSocket() {
    return process.env.IMLINKD_SOCKET || exports.DEFAULT_SOCKET;
}
const obj = (v) => v !== null && typeof v === 'object' && !Array.isArray(v) ? v : {};
const str = (v, d = '') => (typeof v === 'string' ? v : d);
const optStr = (v) => (typeof v === 'string' ? v : null);
const int = (v, d = 0) => (typeof v === 'number' && Number.isInteger(v) ? v : d);
const optInt = (v) => (typeof v === 'number' && Number.isInteger(v) ? v : null);
function toLastError(v) {
    if (v === null || typeof v !== 'object')
        return null;
    const o = obj(v);
    return { code: int(o.code), class: optStr(o.class), message: str(o.message) };
}
function toSig(v) {
    if (v === null || typeof v !== 'object')
        return null;
    const o = obj(v);
    return {
        fingerprint: str(o.fingerprint),
        expires_at: optInt(o.expires_at),
        valid_until: optInt(o.valid_until),
        refresh_at: optInt(o.refresh_at),
        refreshing: o.refreshing === true,
    };
}
function counts(v) {
    const out = {};
    for (const [k, x] of Object.entries(obj(v)))
        if (typeof x === 'number')
            out[k] = x;
    return out;
}
function toStatus(v) {
    const o = obj(v);
    const messages = {};
    for (const [k, x] of Object.entries(obj(o.messages)))
        if (typeof x === 'number' || typeof x === 'boolean')
            messages[k] = x;
    return {
        phase: str(o.phase),
        summary: str(o.summary),
        login_status: int(o.login_status, 3),
        login_user: str(o.login_user),
        user_id: str(o.user_id),
        sdk_app_id: optInt(o.sdk_app_id),
        broker: str(o.broker),
        protocol: optStr(o.protocol),
        inbox_subscribed: o.inbox_subscribed === true,
        since: optInt(o.since),
        last_error: toLastError(o.last_error),
        sig: toSig(o.sig),
        next_retry_at_ms: optInt(o.next_retry_at_ms),
        next_subscribe_at_ms: optInt(o.next_subscribe_at_ms),
        counters: counts(o.counters),
        messages,
        last_event: o.last_event && typeof o.last_event === 'object' ? obj(o.last_event) : null,
        raw: o,
    };
}
function toMessage(v) {
    const o = obj(v);
    return {
        seq: int(o.seq),
        id: str(o.id),
        peer: str(o.peer),
        direction: str(o.direction),
        kind: str(o.kind, 'text'),
        body: str(o.body),
        ts: int(o.ts),
        state: str(o.state),
        code: optInt(o.code),
        raw: o,
    };
}
function toConversation(v) {
    const o = obj(v);
    return {
        peer: str(o.peer),
        unread: int(o.unread),
        last: o.last && typeof o.last === 'object' ? toMessage(o.last) : null,
        raw: o,
    };
}
const list = (v, f) => (Array.isArray(v) ? v.map(f) : []);
function toEvent(name, params, status, reconnected) {
    let error = null;
    if (name === 'connect_failed')
        error = toLastError(params);
    else if (name === 'state_changed')
        error = toLastError(params.last_error);
    return { name, params, status, reconnected, error };
}
// --- errors -------------------------------------------------------------------------------
/**
 * An error answer: `code` (IM, docs/errors.md, or JSON-RPC), `message`, `cls` (`data.class`:
 * the class of a login error — `network`, `sig_rejected`, `fatal`, … — or null), `data`.
 */
class ImlinkError extends Error {
    constructor(code, message, cls = null, data = null) {
        super(message);
        this.code = code;
        this.cls = cls;
        this.data = data;
        this.name = new.target.name;
    }
}
exports.ImlinkError = ImlinkError;
/** -32001: an operator method called by a reader (the message names the fix). */
class PermissionDenied extends ImlinkError {
}
exports.PermissionDenied = PermissionDenied;
/** -32601: no such method. */
class MethodNotFound extends ImlinkError {
}
exports.MethodNotFound = MethodNotFound;
/** -32602: bad params. */
class InvalidParams extends ImlinkError {
}
exports.InvalidParams = InvalidParams;
/** -32002: the daemon's client or watcher limit. */
class TooManyClients extends ImlinkError {
}
exports.TooManyClients = TooManyClients;
/** -32004: shutting down, or busy (try again). */
class Unavailable extends ImlinkError {
}
exports.Unavailable = Unavailable;
/** 6014: logged out, kicked or stopped. */
class NotLoggedIn extends ImlinkError {
}
exports.NotLoggedIn = NotLoggedIn;
/** 6017: an inbox cursor that cannot be used (the message says what to do). */
class CursorError extends ImlinkError {
}
exports.CursorError = CursorError;
/** 6022: the message store is full. */
class StoreFull extends ImlinkError {
}
exports.StoreFull = StoreFull;
/** 7003: not a valid UserID. */
class InvalidUserId extends ImlinkError {
}
exports.InvalidUserId = InvalidUserId;
/** 7501: a login is already in progress. */
class LoginInProgress extends ImlinkError {
}
exports.LoginInProgress = LoginInProgress;
/** 7502: a logout is in progress. */
class LogoutInProgress extends ImlinkError {
}
exports.LogoutInProgress = LogoutInProgress;
/** 9510: not online within timeout_ms; the login goes on (watch it). */
class LoginTimeout extends ImlinkError {
}
exports.LoginTimeout = LoginTimeout;
const BY_CODE = {
    [-32001]: PermissionDenied,
    [-32601]: MethodNotFound,
    [-32602]: InvalidParams,
    [-32002]: TooManyClients,
    [-32004]: Unavailable,
    6014: NotLoggedIn,
    6017: CursorError,
    6022: StoreFull,
    7003: InvalidUserId,
    7501: LoginInProgress,
    7502: LogoutInProgress,
    9510: LoginTimeout,
};
/** The exception for a JSON-RPC `error` object. */
function errorFromJson(e) {
    const o = obj(e);
    const code = int(o.code, -32603);
    const data = o.data && typeof o.data === 'object' ? obj(o.data) : null;
    const Cls = BY_CODE[code] ?? ImlinkError;
    return new Cls(code, str(o.message), data ? optStr(data.class) : null, data);
}
const HINTS = {
    missing: 'no socket there: is imlinkd running, and is this its api.socket?',
    refused: 'nothing listens on it (a stale socket): is imlinkd running?',
    denied: "permission denied: add your user to the socket's group (imlinkd-clients)",
    lost: 'the connection to imlinkd closed (it stopped or restarted)',
    closed: 'this client was closed',
};
/**
 * The daemon could not be reached, or the connection was lost (`reason`): `missing` (no
 * socket), `refused` (a stale socket), `denied` (the socket's group), `lost` (it stopped or
 * restarted; a request in flight may or may not have been carried out), `closed`.
 */
class DaemonUnavailable extends Error {
    constructor(path, reason, detail = '') {
        super(`${path}: ${HINTS[reason]}${detail ? ` (${detail})` : ''}`);
        this.path = path;
        this.reason = reason;
        this.name = 'DaemonUnavailable';
    }
}
exports.DaemonUnavailable = DaemonUnavailable;
function retryable(e) {
    if (e instanceof DaemonUnavailable)
        return e.reason !== 'denied' && e.reason !== 'closed';
    return e instanceof Unavailable;
}
// --- one connection -----------------------------------------------------------------------
/** A queue of notifications; `null` once the connection ended. */
class Queue {
    constructor() {
        this.items = [];
        this.waiters = [];
        this.ended = false;
    }
    push(v) {
        if (this.ended)
            return;
        if (v === null)
            this.ended = true;
        const w = this.waiters.shift();
        if (w)
            w(v);
        else
            this.items.push(v);
        if (v === null)
            for (const x of this.waiters.splice(0))
                x(null);
    }
    next() {
        if (this.items.length > 0)
            return Promise.resolve(this.items.shift());
        if (this.ended)
            return Promise.resolve(null);
        return new Promise((r) => this.waiters.push(r));
    }
}
class Conn {
    constructor(path, sock) {
        this.path = path;
        this.sock = sock;
        this.closed = false;
        this.closeError = null;
        this.notifications = new Queue();
        this.nextId = 1;
        this.pending = new Map();
        this.buf = [];
        sock.on('data', (chunk) => this.onData(chunk));
        sock.on('error', (e) => {
            if (!this.closeError)
                this.closeError = new DaemonUnavailable(this.path, 'lost', e.message);
        });
        sock.on('close', () => this.finish());
    }
    static open(path) {
        return new Promise((resolve, reject) => {
            const sock = net.createConnection({ path });
            const fail = (e) => {
                const reason = e.code === 'ENOENT' ? 'missing' : e.code === 'EACCES' || e.code === 'EPERM' ? 'denied' : 'refused';
                reject(new DaemonUnavailable(path, reason, e.code === 'ECONNREFUSED' || e.code === 'ENOENT' ? '' : e.message));
            };
            sock.once('error', fail);
            sock.once('connect', () => {
                sock.off('error', fail);
                resolve(new Conn(path, sock));
            });
        });
    }
    onData(chunk) {
        let start = 0;
        for (let i = chunk.indexOf(10); i !== -1; i = chunk.indexOf(10, start)) {
            this.buf.push(chunk.subarray(start, i));
            const line = Buffer.concat(this.buf).toString('utf8');
            this.buf = [];
            start = i + 1;
            this.onLine(line);
        }
        if (start < chunk.length)
            this.buf.push(chunk.subarray(start));
    }
    onLine(line) {
        let msg;
        try {
            msg = obj(JSON.parse(line));
        }
        catch {
            return;
        }
        if (typeof msg.method === 'string' && !('id' in msg)) {
            this.notifications.push({ method: msg.method, params: obj(msg.params) });
            return;
        }
        const id = msg.id;
        const p = typeof id === 'number' ? this.pending.get(id) : undefined;
        if (!p) {
            // An error for the connection (too many clients, idle, line too long): it closes next.
            if ((id === null || id === undefined) && 'error' in msg)
                this.closeError = errorFromJson(msg.error);
            return;
        }
        this.pending.delete(id);
        if ('error' in msg)
            p.reject(errorFromJson(msg.error));
        else
            p.resolve(msg.result);
    }
    finish() {
        if (this.closed)
            return;
        this.closed = true;
        const err = this.lost();
        for (const p of this.pending.values())
            p.reject(err);
        this.pending.clear();
        this.notifications.push(null);
    }
    lost() {
        return this.closeError ?? new DaemonUnavailable(this.path, 'lost');
    }
    call(method, params) {
        if (this.closed)
            return Promise.reject(this.lost());
        const id = this.nextId++;
        const req = { jsonrpc: '2.0', id, method };
        if (params !== undefined)
            req.params = params;
        return new Promise((resolve, reject) => {
            this.pending.set(id, { resolve, reject });
            this.sock.write(JSON.stringify(req) + '\n');
        });
    }
    close() {
        if (!this.closeError)
            this.closeError = new DaemonUnavailable(this.path, 'closed');
        this.sock.destroy();
        this.finish();
    }
}
/** Reconnect pacing: 50 ms doubling to 2 s with jitter, for at most `total` ms (null: ever). */
class Backoff {
    constructor(total) {
        this.delay = 50;
        this.deadline = total === null ? null : Date.now() + total;
    }
    async wait(why) {
        const now = Date.now();
        if (this.deadline !== null && now >= this.deadline)
            throw why;
        let d = this.delay * (0.5 + Math.random() / 2);
        if (this.deadline !== null)
            d = Math.min(d, Math.max(0, this.deadline - now));
        await new Promise((r) => setTimeout(r, d));
        this.delay = Math.min(this.delay * 2, 2000);
    }
}
function params(p) {
    const out = {};
    for (const [k, v] of Object.entries(p))
        if (v !== undefined && v !== null)
            out[k] = v;
    return out;
}
/**
 * A client of imlinkd's local API. Requests share one connection, opened on first use and
 * again after it was lost; a request in flight when it is lost rejects with
 * `DaemonUnavailable` (`reason: 'lost'`) and is not repeated (it may have been carried out).
 * `watch()` and the inbox consumer have connections of their own and reconnect by themselves.
 */
class Client {
    constructor(path, options = {}) {
        this.conn = null;
        this.opening = null;
        this.closed = false;
        this.path = path || defaultSocket();
        this.reconnectForMs = options.reconnectForMs === undefined ? 120000 : options.reconnectForMs;
    }
    close() {
        this.closed = true;
        this.conn?.close();
        this.conn = null;
    }
    async connection() {
        if (this.closed)
            throw new DaemonUnavailable(this.path, 'closed');
        if (this.conn && !this.conn.closed)
            return this.conn;
        if (!this.opening) {
            this.opening = Conn.open(this.path).finally(() => {
                this.opening = null;
            });
        }
        this.conn = await this.opening;
        return this.conn;
    }
    /** Any method by name: the `result`, or the error as an `ImlinkError`. */
    async call(method, p) {
        return (await this.connection()).call(method, p);
    }
    // --- the API's methods, one each (docs/api.md) ---------------------------------------------
    async version() {
        const o = obj(await this.call('version'));
        return { name: str(o.name), version: str(o.version), api: int(o.api) };
    }
    async status() {
        return toStatus(await this.call('status'));
    }
    async get_login_user() {
        return str(await this.call('get_login_user'));
    }
    async get_login_status() {
        return int(await this.call('get_login_status'), 3);
    }
    async metrics() {
        return str(obj(await this.call('metrics')).text);
    }
    /** Log in (operator). `user_id` switches accounts; `user_sig` brings a UserSig (never
     * logged). Resolves at the CONNACK: the phase may still be `subscribing`. */
    async login(opts = {}) {
        const o = obj(await this.call('login', params(opts)));
        return { login_user: str(o.login_user), login_status: int(o.login_status, 3) };
    }
    /** Log out cleanly and stay logged out (operator); the login status (3). */
    async logout(opts = {}) {
        return int(obj(await this.call('logout', params(opts))).login_status, 3);
    }
    /** Queue a C2C message (operator): committed when this resolves, sent when connected. */
    async send_message(to, body, kind) {
        const o = obj(await this.call('send_message', params({ to, body, kind })));
        return { id: str(o.id), seq: int(o.seq), to: str(o.to), state: str(o.state) };
    }
    async get_conversations(opts = {}) {
        const o = obj(await this.call('get_conversations', params(opts)));
        return { conversations: list(o.conversations, toConversation), next_before: optStr(o.next_before) };
    }
    async get_history(peer, opts = {}) {
        const o = obj(await this.call('get_history', params({ peer, ...opts })));
        return { messages: list(o.messages, toMessage), next_before: optStr(o.next_before) };
    }
    /** Mark every message from `peer` read (operator); how many were marked. */
    async mark_read(peer) {
        return int(obj(await this.call('mark_read', { peer })).marked);
    }
    async read_inbox(opts = {}) {
        const o = obj(await this.call('read_inbox', params(opts)));
        return { user_id: str(o.user_id), messages: list(o.messages, toMessage), cursor: str(o.cursor) };
    }
    async ack_inbox(cursor) {
        const o = obj(await this.call('ack_inbox', { cursor }));
        return { user_id: str(o.user_id), cursor: str(o.cursor) };
    }
    /**
     * The status, then every notification. The first item is a `snapshot`; when the daemon
     * goes away (a restart, or it dropped this watcher after `lagged`) and `reconnect` is true,
     * it is reached again (backoff to 2 s, for at most `reconnectForMs`) and a fresh `snapshot`
     * with `reconnected: true` follows.
     */
    async *watch(opts = {}) {
        const reconnect = opts.reconnect ?? true;
        let conn = null;
        let reconnected = false;
        // One backoff from a loss until the next snapshot: its bound holds even when the daemon
        // accepts connections but cannot answer (shutting down).
        let backoff = null;
        try {
            for (;;) {
                if (!conn) {
                    if (!reconnected)
                        conn = await Conn.open(this.path);
                    else {
                        backoff ?? (backoff = new Backoff(this.reconnectForMs));
                        conn = await this.reopen(backoff);
                    }
                }
                let snap;
                try {
                    snap = obj(await conn.call('watch'));
                }
                catch (e) {
                    if (!(reconnect && retryable(e)))
                        throw e;
                    conn.close();
                    conn = null;
                    reconnected = true;
                    backoff ?? (backoff = new Backoff(this.reconnectForMs));
                    await backoff.wait(e);
                    continue;
                }
                backoff = null;
                yield toEvent('snapshot', snap, toStatus(snap.status), reconnected);
                for (;;) {
                    const n = await conn.notifications.next();
                    if (n === null)
                        break;
                    yield toEvent(n.method, n.params, null, false);
                }
                const err = conn.lost();
                conn.close();
                conn = null;
                if (!reconnect)
                    throw err;
                reconnected = true;
            }
        }
        finally {
            conn?.close();
        }
    }
    async reopen(backoff) {
        for (;;) {
            try {
                return await Conn.open(this.path);
            }
            catch (e) {
                if (!retryable(e))
                    throw e;
                await backoff.wait(e);
            }
        }
    }
    /** An `InboxConsumer` on this client's socket. */
    inboxConsumer(handler, opts = {}) {
        return new InboxConsumer(this.path, handler, { limit: opts.limit, reconnectForMs: this.reconnectForMs });
    }
}
exports.Client = Client;
/**
 * At-least-once delivery of received messages to `handler(userId, message)`.
 *
 * The loop of docs/api.md: `read_inbox {}` (the current account's messages after its
 * acknowledged position), the handler for each message in order, then `ack_inbox` with the
 * page's cursor — only once the handler resolved for every message of the page. If the app
 * dies first, the daemon still holds the page unacknowledged and the next consumer gets it
 * again: a message may be handled twice, never lost. The cursor names its user, so an account
 * switch between the read and the ack acknowledges what was read for the user it came from.
 * Woken by `message_received` / `state_changed` on a watch of its own; when the daemon
 * restarts it reconnects (backoff, bounded by `reconnectForMs`) and reads again from the
 * acknowledged position. `run()` resolves after `stop()`, once the message being handled is
 * (the messages handled acknowledged, the rest of the page left unacknowledged for the next
 * consumer); a handler's error rejects it (nothing of that page acknowledged). Needs an
 * operator (`ack_inbox`).
 */
class InboxConsumer {
    constructor(path, handler, opts = {}) {
        this.handler = handler;
        /** The last acknowledged cursor ("USER:POSITION"). */
        this.acknowledged = null;
        /** How many messages the handler was given (redeliveries included). */
        this.handled = 0;
        this.stopping = false;
        this.wakeUp = null;
        this.path = path || defaultSocket();
        this.limit = opts.limit ?? 100;
        this.reconnectForMs = opts.reconnectForMs === undefined ? 120000 : opts.reconnectForMs;
    }
    /**
     * End `run()` after the message being handled: the messages handled are acknowledged (up
     * to that one), the rest of its page is not (the next consumer gets it).
     */
    stop() {
        this.stopping = true;
        this.wakeUp?.();
    }
    async run() {
        let first = true;
        let backoff = null;
        while (!this.stopping) {
            let watch = null;
            let req = null;
            try {
                watch = await Conn.open(this.path);
                req = await Conn.open(this.path);
                await watch.call('watch');
                first = false;
                backoff = null;
                await this.consume(req, watch);
            }
            catch (e) {
                if (first || !retryable(e))
                    throw e;
                backoff ?? (backoff = new Backoff(this.reconnectForMs));
                await backoff.wait(e);
            }
            finally {
                watch?.close();
                req?.close();
            }
        }
    }
    async consume(req, watch) {
        let woken = false;
        let lost = false;
        // Drain the watch: every message_received / state_changed (or its end) wakes the loop.
        void (async () => {
            for (;;) {
                const n = await watch.notifications.next();
                if (n === null)
                    lost = true;
                if (n === null || n.method === 'message_received' || n.method === 'state_changed' || n.method === 'lagged') {
                    woken = true;
                    this.wakeUp?.();
                }
                if (n === null)
                    return;
            }
        })();
        while (!this.stopping) {
            woken = false;
            const o = obj(await req.call('read_inbox', { limit: this.limit }));
            const page = { user_id: str(o.user_id), messages: list(o.messages, toMessage), cursor: str(o.cursor) };
            let done = 0;
            for (const m of page.messages) {
                await this.handler(page.user_id, m);
                this.handled++;
                done++;
                if (this.stopping)
                    break;
            }
            if (done > 0) {
                // Up to the last message handled: the whole page's cursor, or (stopped inside it)
                // that message's position, "USER:POSITION" (docs/api.md).
                const cursor = done === page.messages.length ? page.cursor : `${page.user_id}:${page.messages[done - 1].seq}`;
                this.acknowledged = str(obj(await req.call('ack_inbox', { cursor })).cursor);
            }
            if (this.stopping)
                return;
            if (page.messages.length >= this.limit)
                continue;
            if (lost)
                throw watch.lost();
            if (!woken && !this.stopping) {
                await new Promise((r) => {
                    this.wakeUp = r;
                });
                this.wakeUp = null;
            }
        }
    }
}
exports.InboxConsumer = InboxConsumer;
