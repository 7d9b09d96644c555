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
import * as net from 'net';

export const DEFAULT_SOCKET = '/run/imlinkd/api.sock';

/** `$IMLINKD_SOCKET`, else `/run/imlinkd/api.sock` (as `imlinkctl`). */
export function defaultSocket(): string {
  return process.env.IMLINKD_SOCKET || DEFAULT_SOCKET;
}

type Json = Record<string, unknown>;

// --- results ------------------------------------------------------------------------------

/** An IM error: the code (docs/errors.md), its class (`network`, `kicked`, …) and text. */
export interface LastError {
  code: number;
  class: string | null;
  message: string;
}

/** What the daemon says about its UserSig (never the UserSig itself). */
export interface SigInfo {
  fingerprint: string;
  expires_at: number | null;
  valid_until: number | null;
  refresh_at: number | null;
  refreshing: boolean;
}

/** The daemon's whole state (`status`, and `watch`'s snapshot); `raw` keeps every field. */
export interface Status {
  phase: string;
  summary: string;
  login_status: number;
  login_user: string;
  user_id: string;
  sdk_app_id: number | null;
  broker: string;
  protocol: string | null;
  inbox_subscribed: boolean;
  since: number | null;
  last_error: LastError | null;
  sig: SigInfo | null;
  next_retry_at_ms: number | null;
  next_subscribe_at_ms: number | null;
  counters: Record<string, number>;
  messages: Record<string, number | boolean>;
  /** The last `kicked_offline` or `user_sig_expired` event, for late watchers. */
  last_event: Json | null;
  raw: Json;
}

/** A stored message (`get_history`, `read_inbox`, a conversation's `last`). */
export interface Message {
  seq: number;
  id: string;
  peer: string;
  direction: 'in' | 'out' | string;
  kind: 'text' | 'custom' | string;
  body: string;
  ts: number;
  state: 'queued' | 'sent' | 'failed' | 'unread' | 'read' | string;
  code: number | null;
  raw: Json;
}

export interface Conversation {
  peer: string;
  unread: number;
  last: Message | null;
  raw: Json;
}

export interface Version {
  name: string;
  version: string;
  api: number;
}

export interface LoginResult {
  login_user: string;
  login_status: number;
}

export interface SendResult {
  id: string;
  seq: number;
  to: string;
  state: string;
}

export interface ConversationPage {
  conversations: Conversation[];
  next_before: string | null;
}

export interface HistoryPage {
  messages: Message[];
  next_before: string | null;
}

/** `read_inbox`: whose inbox, its messages after the cursor (oldest first), where it ends. */
export interface InboxPage {
  user_id: string;
  messages: Message[];
  cursor: string;
}

export interface AckResult {
  user_id: string;
  cursor: string;
}

/** The notifications `watch` delivers (docs/api.md), plus this client's own `snapshot`. */
export type EventName =
  | 'snapshot'
  | 'connecting'
  | 'connect_success'
  | 'connect_failed'
  | 'kicked_offline'
  | 'user_sig_expired'
  | 'user_sig_refreshed'
  | 'state_changed'
  | 'message_received'
  | 'message_sent'
  | 'message_failed'
  | 'lagged';

/**
 * One item of `watch()`: `name` is the notification's method, or `snapshot` for the status
 * the daemon answers `watch` with — the first item, and again after every reconnect
 * (`reconnected` true: events in between were missed, take the snapshot as the truth).
 * `params` as sent; `status` for a snapshot; `error` for `connect_failed` and a
 * `state_changed` with a `last_error`.
 */
export interface WatchEvent {
  name: EventName | string;
  params: Record<string, any>;
  status: Status | null;
  reconnected: boolean;
  error: LastError | null;
}

const obj = (v: unknown): Json =>
  v !== null && typeof v === 'object' && !Array.isArray(v) ? (v as Json) : {};
const str = (v: unknown, d = ''): string => (typeof v === 'string' ? v : d);
const optStr = (v: unknown): string | null => (typeof v === 'string' ? v : null);
const int = (v: unknown, d = 0): number => (typeof v === 'number' && Number.isInteger(v) ? v : d);
const optInt = (v: unknown): number | null => (typeof v === 'number' && Number.isInteger(v) ? v : null);

export function toLastError(v: unknown): LastError | null {
  if (v === null || typeof v !== 'object') return null;
  const o = obj(v);
  return { code: int(o.code), class: optStr(o.class), message: str(o.message) };
}

function toSig(v: unknown): SigInfo | null {
  if (v === null || typeof v !== 'object') return null;
  const o = obj(v);
  return {
    fingerprint: str(o.fingerprint),
    expires_at: optInt(o.expires_at),
    valid_until: optInt(o.valid_until),
    refresh_at: optInt(o.refresh_at),
    refreshing: o.refreshing === true,
  };
}

function counts(v: unknown): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [k, x] of Object.entries(obj(v))) if (typeof x === 'number') out[k] = x;
  return out;
}

export function toStatus(v: unknown): Status {
  const o = obj(v);
  const messages: Record<string, number | boolean> = {};
  for (const [k, x] of Object.entries(obj(o.messages)))
    if (typeof x === 'number' || typeof x === 'boolean') messages[k] = x;
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

export function toMessage(v: unknown): Message {
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

function toConversation(v: unknown): Conversation {
  const o = obj(v);
  return {
    peer: str(o.peer),
    unread: int(o.unread),
    last: o.last && typeof o.last === 'object' ? toMessage(o.last) : null,
    raw: o,
  };
}

const list = <T>(v: unknown, f: (x: unknown) => T): T[] => (Array.isArray(v) ? v.map(f) : []);

function toEvent(name: string, params: Json, status: Status | null, reconnected: boolean): WatchEvent {
  let error: LastError | null = null;
  if (name === 'connect_failed') error = toLastError(params);
  else if (name === 'state_changed') error = toLastError(params.last_error);
  return { name, params, status, reconnected, error };
}

// --- errors -------------------------------------------------------------------------------

/**
 * An error answer: `code` (IM, docs/errors.md, or JSON-RPC), `message`, `cls` (`data.class`:
 * the class of a login error — `network`, `sig_rejected`, `fatal`, … — or null), `data`.
 */
export class ImlinkError extends Error {
  constructor(
    readonly code: number,
    message: string,
    readonly cls: string | null = null,
    readonly data: Json | null = null,
  ) {
    super(message);
    this.name = new.target.name;
  }
}
/** -32001: an operator method called by a reader (the message names the fix). */
export class PermissionDenied extends ImlinkError {}
/** -32601: no such method. */
export class MethodNotFound extends ImlinkError {}
/** -32602: bad params. */
export class InvalidParams extends ImlinkError {}
/** -32002: the daemon's client or watcher limit. */
export class TooManyClients extends ImlinkError {}
/** -32004: shutting down, or busy (try again). */
export class Unavailable extends ImlinkError {}
/** 6014: logged out, kicked or stopped. */
export class NotLoggedIn extends ImlinkError {}
/** 6017: an inbox cursor that cannot be used (the message says what to do). */
export class CursorError extends ImlinkError {}
/** 6022: the message store is full. */
export class StoreFull extends ImlinkError {}
/** 7003: not a valid UserID. */
export class InvalidUserId extends ImlinkError {}
/** 7501: a login is already in progress. */
export class LoginInProgress extends ImlinkError {}
/** 7502: a logout is in progress. */
export class LogoutInProgress extends ImlinkError {}
/** 9510: not online within timeout_ms; the login goes on (watch it). */
export class LoginTimeout extends ImlinkError {}

const BY_CODE: Record<number, typeof ImlinkError> = {
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
export function errorFromJson(e: unknown): ImlinkError {
  const o = obj(e);
  const code = int(o.code, -32603);
  const data = o.data && typeof o.data === 'object' ? obj(o.data) : null;
  const Cls = BY_CODE[code] ?? ImlinkError;
  return new Cls(code, str(o.message), data ? optStr(data.class) : null, data);
}

export type UnavailableReason = 'missing' | 'refused' | 'denied' | 'lost' | 'closed';

const HINTS: Record<UnavailableReason, string> = {
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
export class DaemonUnavailable extends Error {
  constructor(
    readonly path: string,
    readonly reason: UnavailableReason,
    detail = '',
  ) {
    super(`${path}: ${HINTS[reason]}${detail ? ` (${detail})` : ''}`);
    this.name = 'DaemonUnavailable';
  }
}

function retryable(e: unknown): boolean {
  if (e instanceof DaemonUnavailable) return e.reason !== 'denied' && e.reason !== 'closed';
  return e instanceof Unavailable;
}

// --- one connection -----------------------------------------------------------------------

/** A queue of notifications; `null` once the connection ended. */
class Queue<T> {
  private items: (T | null)[] = [];
  private waiters: ((v: T | null) => void)[] = [];
  private ended = false;
  push(v: T | null): void {
    if (this.ended) return;
    if (v === null) this.ended = true;
    const w = this.waiters.shift();
    if (w) w(v);
    else this.items.push(v);
    if (v === null) for (const x of this.waiters.splice(0)) x(null);
  }
  next(): Promise<T | null> {
    if (this.items.length > 0) return Promise.resolve(this.items.shift() as T | null);
    if (this.ended) return Promise.resolve(null);
    return new Promise((r) => this.waiters.push(r));
  }
}

interface Notification {
  method: string;
  params: Json;
}

class Conn {
  closed = false;
  closeError: Error | null = null;
  readonly notifications = new Queue<Notification>();
  private nextId = 1;
  private pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private buf: Buffer[] = [];

  private constructor(
    readonly path: string,
    private sock: net.Socket,
  ) {
    sock.on('data', (chunk: Buffer) => this.onData(chunk));
    sock.on('error', (e) => {
      if (!this.closeError) this.closeError = new DaemonUnavailable(this.path, 'lost', e.message);
    });
    sock.on('close', () => this.finish());
  }

  static open(path: string): Promise<Conn> {
    return new Promise((resolve, reject) => {
      const sock = net.createConnection({ path });
      const fail = (e: NodeJS.ErrnoException) => {
        const reason: UnavailableReason =
          e.code === 'ENOENT' ? 'missing' : e.code === 'EACCES' || e.code === 'EPERM' ? 'denied' : 'refused';
        reject(new DaemonUnavailable(path, reason, e.code === 'ECONNREFUSED' || e.code === 'ENOENT' ? '' : e.message));
      };
      sock.once('error', fail);
      sock.once('connect', () => {
        sock.off('error', fail);
        resolve(new Conn(path, sock));
      });
    });
  }

  private onData(chunk: Buffer): void {
    let start = 0;
    for (let i = chunk.indexOf(10); i !== -1; i = chunk.indexOf(10, start)) {
      this.buf.push(chunk.subarray(start, i));
      const line = Buffer.concat(this.buf).toString('utf8');
      this.buf = [];
      start = i + 1;
      this.onLine(line);
    }
    if (start < chunk.length) this.buf.push(chunk.subarray(start));
  }

  private onLine(line: string): void {
    let msg: Json;
    try {
      msg = obj(JSON.parse(line));
    } catch {
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
      if ((id === null || id === undefined) && 'error' in msg) this.closeError = errorFromJson(msg.error);
      return;
    }
    this.pending.delete(id as number);
    if ('error' in msg) p.reject(errorFromJson(msg.error));
    else p.resolve(msg.result);
  }

  private finish(): void {
    if (this.closed) return;
    this.closed = true;
    const err = this.lost();
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    this.notifications.push(null);
  }

  lost(): Error {
    return this.closeError ?? new DaemonUnavailable(this.path, 'lost');
  }

  call(method: string, params?: Json): Promise<any> {
    if (this.closed) return Promise.reject(this.lost());
    const id = this.nextId++;
    const req: Json = { jsonrpc: '2.0', id, method };
    if (params !== undefined) req.params = params;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.sock.write(JSON.stringify(req) + '\n');
    });
  }

  close(): void {
    if (!this.closeError) this.closeError = new DaemonUnavailable(this.path, 'closed');
    this.sock.destroy();
    this.finish();
  }
}

/** Reconnect pacing: 50 ms doubling to 2 s with jitter, for at most `total` ms (null: ever). */
class Backoff {
  private deadline: number | null;
  private delay = 50;
  constructor(total: number | null) {
    this.deadline = total === null ? null : Date.now() + total;
  }
  async wait(why: unknown): Promise<void> {
    const now = Date.now();
    if (this.deadline !== null && now >= this.deadline) throw why;
    let d = this.delay * (0.5 + Math.random() / 2);
    if (this.deadline !== null) d = Math.min(d, Math.max(0, this.deadline - now));
    await new Promise((r) => setTimeout(r, d));
    this.delay = Math.min(this.delay * 2, 2000);
  }
}

function params(p: Record<string, unknown>): Json {
  const out: Json = {};
  for (const [k, v] of Object.entries(p)) if (v !== undefined && v !== null) out[k] = v;
  return out;
}

export interface ClientOptions {
  /** How long `watch()` and the inbox consumer keep trying to reach a daemon that went away
   * (ms; null: for ever). Default 120 000. */
  reconnectForMs?: number | null;
}

export type InboxHandler = (userId: string, message: Message) => void | Promise<void>;

/**
 * A client of imlinkd's local API. Requests share one connection, opened on first use and
 * again after it was lost; a request in flight when it is lost rejects with
 * `DaemonUnavailable` (`reason: 'lost'`) and is not repeated (it may have been carried out).
 * `watch()` and the inbox consumer have connections of their own and reconnect by themselves.
 */
export class Client {
  readonly path: string;
  readonly reconnectForMs: number | null;
  private conn: Conn | null = null;
  private opening: Promise<Conn> | null = null;
  private closed = false;

  constructor(path?: string, options: ClientOptions = {}) {
    this.path = path || defaultSocket();
    this.reconnectForMs = options.reconnectForMs === undefined ? 120_000 : options.reconnectForMs;
  }

  close(): void {
    this.closed = true;
    this.conn?.close();
    this.conn = null;
  }

  private async connection(): Promise<Conn> {
    if (this.closed) throw new DaemonUnavailable(this.path, 'closed');
    if (this.conn && !this.conn.closed) return this.conn;
    if (!this.opening) {
      this.opening = Conn.open(this.path).finally(() => {
        this.opening = null;
      });
    }
    this.conn = await this.opening;
    return this.conn;
  }

  /** Any method by name: the `result`, or the error as an `ImlinkError`. */
  async call(method: string, p?: Json): Promise<any> {
    return (await this.connection()).call(method, p);
  }

  // --- the API's methods, one each (docs/api.md) ---------------------------------------------

  async version(): Promise<Version> {
    const o = obj(await this.call('version'));
    return { name: str(o.name), version: str(o.version), api: int(o.api) };
  }

  async status(): Promise<Status> {
    return toStatus(await this.call('status'));
  }

  async get_login_user(): Promise<string> {
    return str(await this.call('get_login_user'));
  }

  async get_login_status(): Promise<number> {
    return int(await this.call('get_login_status'), 3);
  }

  async metrics(): Promise<string> {
    return str(obj(await this.call('metrics')).text);
  }

  /** Log in (operator). `user_id` switches accounts; `user_sig` brings a UserSig (never
   * logged). Resolves at the CONNACK: the phase may still be `subscribing`. */
  async login(opts: { user_id?: string; user_sig?: string; timeout_ms?: number } = {}): Promise<LoginResult> {
    const o = obj(await this.call('login', params(opts)));
    return { login_user: str(o.login_user), login_status: int(o.login_status, 3) };
  }

  /** Log out cleanly and stay logged out (operator); the login status (3). */
  async logout(opts: { timeout_ms?: number } = {}): Promise<number> {
    return int(obj(await this.call('logout', params(opts))).login_status, 3);
  }

  /** Queue a C2C message (operator): committed when this resolves, sent when connected. */
  async send_message(to: string, body: string, kind?: 'text' | 'custom' | string): Promise<SendResult> {
    const o = obj(await this.call('send_message', params({ to, body, kind })));
    return { id: str(o.id), seq: int(o.seq), to: str(o.to), state: str(o.state) };
  }

  async get_conversations(opts: { limit?: number; before?: string | null } = {}): Promise<ConversationPage> {
    const o = obj(await this.call('get_conversations', params(opts)));
    return { conversations: list(o.conversations, toConversation), next_before: optStr(o.next_before) };
  }

  async get_history(peer: string, opts: { before?: string | null; limit?: number } = {}): Promise<HistoryPage> {
    const o = obj(await this.call('get_history', params({ peer, ...opts })));
    return { messages: list(o.messages, toMessage), next_before: optStr(o.next_before) };
  }

  /** Mark every message from `peer` read (operator); how many were marked. */
  async mark_read(peer: string): Promise<number> {
    return int(obj(await this.call('mark_read', { peer })).marked);
  }

  async read_inbox(opts: { cursor?: string; limit?: number } = {}): Promise<InboxPage> {
    const o = obj(await this.call('read_inbox', params(opts)));
    return { user_id: str(o.user_id), messages: list(o.messages, toMessage), cursor: str(o.cursor) };
  }

  async ack_inbox(cursor: string): Promise<AckResult> {
    const o = obj(await this.call('ack_inbox', { cursor }));
    return { user_id: str(o.user_id), cursor: str(o.cursor) };
  }

  /**
   * The status, then every notification. The first item is a `snapshot`; when the daemon
   * goes away (a restart, or it dropped this watcher after `lagged`) and `reconnect` is true,
   * it is reached again (backoff to 2 s, for at most `reconnectForMs`) and a fresh `snapshot`
   * with `reconnected: true` follows.
   */
  async *watch(opts: { reconnect?: boolean } = {}): AsyncGenerator<WatchEvent, void, undefined> {
    const reconnect = opts.reconnect ?? true;
    let conn: Conn | null = null;
    let reconnected = false;
    // One backoff from a loss until the next snapshot: its bound holds even when the daemon
    // accepts connections but cannot answer (shutting down).
    let backoff: Backoff | null = null;
    try {
      for (;;) {
        if (!conn) {
          if (!reconnected) conn = await Conn.open(this.path);
          else {
            backoff ??= new Backoff(this.reconnectForMs);
            conn = await this.reopen(backoff);
          }
        }
        let snap: Json;
        try {
          snap = obj(await conn.call('watch'));
        } catch (e) {
          if (!(reconnect && retryable(e))) throw e;
          conn.close();
          conn = null;
          reconnected = true;
          backoff ??= new Backoff(this.reconnectForMs);
          await backoff.wait(e);
          continue;
        }
        backoff = null;
        yield toEvent('snapshot', snap, toStatus(snap.status), reconnected);
        for (;;) {
          const n = await conn.notifications.next();
          if (n === null) break;
          yield toEvent(n.method, n.params, null, false);
        }
        const err = conn.lost();
        conn.close();
        conn = null;
        if (!reconnect) throw err;
        reconnected = true;
      }
    } finally {
      conn?.close();
    }
  }

  private async reopen(backoff: Backoff): Promise<Conn> {
    for (;;) {
      try {
        return await Conn.open(this.path);
      } catch (e) {
        if (!retryable(e)) throw e;
        await backoff.wait(e);
      }
    }
  }

  /** An `InboxConsumer` on this client's socket. */
  inboxConsumer(handler: InboxHandler, opts: { limit?: number } = {}): InboxConsumer {
    return new InboxConsumer(this.path, handler, { limit: opts.limit, reconnectForMs: this.reconnectForMs });
  }
}

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
export class InboxConsumer {
  readonly path: string;
  readonly limit: number;
  readonly reconnectForMs: number | null;
  /** The last acknowledged cursor ("USER:POSITION"). */
  acknowledged: string | null = null;
  /** How many messages the handler was given (redeliveries included). */
  handled = 0;
  private stopping = false;
  private wakeUp: (() => void) | null = null;

  constructor(
    path: string | undefined,
    readonly handler: InboxHandler,
    opts: { limit?: number; reconnectForMs?: number | null } = {},
  ) {
    this.path = path || defaultSocket();
    this.limit = opts.limit ?? 100;
    this.reconnectForMs = opts.reconnectForMs === undefined ? 120_000 : opts.reconnectForMs;
  }

  /**
   * End `run()` after the message being handled: the messages handled are acknowledged (up
   * to that one), the rest of its page is not (the next consumer gets it).
   */
  stop(): void {
    this.stopping = true;
    this.wakeUp?.();
  }

  async run(): Promise<void> {
    let first = true;
    let backoff: Backoff | null = null;
    while (!this.stopping) {
      let watch: Conn | null = null;
      let req: Conn | null = null;
      try {
        watch = await Conn.open(this.path);
        req = await Conn.open(this.path);
        await watch.call('watch');
        first = false;
        backoff = null;
        await this.consume(req, watch);
      } catch (e) {
        if (first || !retryable(e)) throw e;
        backoff ??= new Backoff(this.reconnectForMs);
        await backoff.wait(e);
      } finally {
        watch?.close();
        req?.close();
      }
    }
  }

  private async consume(req: Conn, watch: Conn): Promise<void> {
    let woken = false;
    let lost = false;
    // Drain the watch: every message_received / state_changed (or its end) wakes the loop.
    void (async () => {
      for (;;) {
        const n = await watch.notifications.next();
        if (n === null) lost = true;
        if (n === null || n.method === 'message_received' || n.method === 'state_changed' || n.method === 'lagged') {
          woken = true;
          this.wakeUp?.();
        }
        if (n === null) return;
      }
    })();
    while (!this.stopping) {
      woken = false;
      const o = obj(await req.call('read_inbox', { limit: this.limit }));
      const page: InboxPage = { user_id: str(o.user_id), messages: list(o.messages, toMessage), cursor: str(o.cursor) };
      let done = 0;
      for (const m of page.messages) {
        await this.handler(page.user_id, m);
        this.handled++;
        done++;
        if (this.stopping) break;
      }
      if (done > 0) {
        // Up to the last message handled: the whole page's cursor, or (stopped inside it)
        // that message's position, "USER:POSITION" (docs/api.md).
        const cursor = done === page.messages.length ? page.cursor : `${page.user_id}:${page.messages[done - 1].seq}`;
        this.acknowledged = str(obj(await req.call('ack_inbox', { cursor })).cursor);
      }
      if (this.stopping) return;
      if (page.messages.length >= this.limit) continue;
      if (lost) throw watch.lost();
      if (!woken && !this.stopping) {
        await new Promise<void>((r) => {
          this.wakeUp = r;
        });
        this.wakeUp = null;
      }
    }
  }
}
