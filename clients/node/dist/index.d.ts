export declare const DEFAULT_SOCKET = "/run/imlinkd/api.sock";
/** `$IMLINKD_SOCKET`, else `/run/imlinkd/api.sock` (as `imlinkctl`). */
export declare function defaultSocket(): string;
type Json = Record<string, unknown>;
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
export type EventName = 'snapshot' | 'connecting' | 'connect_success' | 'connect_failed' | 'kicked_offline' | 'user_sig_expired' | 'user_sig_refreshed' | 'state_changed' | 'message_received' | 'message_sent' | 'message_failed' | 'lagged';
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
export declare function toLastError(v: unknown): LastError | null;
export declare function toStatus(v: unknown): Status;
export declare function toMessage(v: unknown): Message;
/**
 * An error answer: `code` (IM, docs/errors.md, or JSON-RPC), `message`, `cls` (`data.class`:
 * the class of a login error — `network`, `sig_rejected`, `fatal`, … — or null), `data`.
 */
export declare class ImlinkError extends Error {
    readonly code: number;
    readonly cls: string | null;
    readonly data: Json | null;
    constructor(code: number, message: string, cls?: string | null, data?: Json | null);
}
/** -32001: an operator method called by a reader (the message names the fix). */
export declare class PermissionDenied extends ImlinkError {
}
/** -32601: no such method. */
export declare class MethodNotFound extends ImlinkError {
}
/** -32602: bad params. */
export declare class InvalidParams extends ImlinkError {
}
/** -32002: the daemon's client or watcher limit. */
export declare class TooManyClients extends ImlinkError {
}
/** -32004: shutting down, or busy (try again). */
export declare class Unavailable extends ImlinkError {
}
/** 6014: logged out, kicked or stopped. */
export declare class NotLoggedIn extends ImlinkError {
}
/** 6017: an inbox cursor that cannot be used (the message says what to do). */
export declare class CursorError extends ImlinkError {
}
/** 6022: the message store is full. */
export declare class StoreFull extends ImlinkError {
}
/** 7003: not a valid UserID. */
export declare class InvalidUserId extends ImlinkError {
}
/** 7501: a login is already in progress. */
export declare class LoginInProgress extends ImlinkError {
}
/** 7502: a logout is in progress. */
export declare class LogoutInProgress extends ImlinkError {
}
/** 9510: not online within timeout_ms; the login goes on (watch it). */
export declare class LoginTimeout extends ImlinkError {
}
/** The exception for a JSON-RPC `error` object. */
export declare function errorFromJson(e: unknown): ImlinkError;
export type UnavailableReason = 'missing' | 'refused' | 'denied' | 'lost' | 'closed';
/**
 * The daemon could not be reached, or the connection was lost (`reason`): `missing` (no
 * socket), `refused` (a stale socket), `denied` (the socket's group), `lost` (it stopped or
 * restarted; a request in flight may or may not have been carried out), `closed`.
 */
export declare class DaemonUnavailable extends Error {
    readonly path: string;
    readonly reason: UnavailableReason;
    constructor(path: string, reason: UnavailableReason, detail?: string);
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
export declare class Client {
    readonly path: string;
    readonly reconnectForMs: number | null;
    private conn;
    private opening;
    private closed;
    constructor(path?: string, options?: ClientOptions);
    close(): void;
    private connection;
    /** Any method by name: the `result`, or the error as an `ImlinkError`. */
    call(method: string, p?: Json): Promise<any>;
    version(): Promise<Version>;
    status(): Promise<Status>;
    get_login_user(): Promise<string>;
    get_login_status(): Promise<number>;
    metrics(): Promise<string>;
    /** Log in (operator). `user_id` switches accounts; `user_sig` brings a UserSig (never
     * logged). Resolves at the CONNACK: the phase may still be `subscribing`. */
    login(opts?: {
        user_id?: string;
        user_sig?: string;
        timeout_ms?: number;
    }): Promise<LoginResult>;
    /** Log out cleanly and stay logged out (operator); the login status (3). */
    logout(opts?: {
        timeout_ms?: number;
    }): Promise<number>;
    /** Queue a C2C message (operator): committed when this resolves, sent when connected. */
    send_message(to: string, body: string, kind?: 'text' | 'custom' | string): Promise<SendResult>;
    get_conversations(opts?: {
        limit?: number;
        before?: string | null;
    }): Promise<ConversationPage>;
    get_history(peer: string, opts?: {
        before?: string | null;
        limit?: number;
    }): Promise<HistoryPage>;
    /** Mark every message from `peer` read (operator); how many were marked. */
    mark_read(peer: string): Promise<number>;
    read_inbox(opts?: {
        cursor?: string;
        limit?: number;
    }): Promise<InboxPage>;
    ack_inbox(cursor: string): Promise<AckResult>;
    /**
     * The status, then every notification. The first item is a `snapshot`; when the daemon
     * goes away (a restart, or it dropped this watcher after `lagged`) and `reconnect` is true,
     * it is reached again (backoff to 2 s, for at most `reconnectForMs`) and a fresh `snapshot`
     * with `reconnected: true` follows.
     */
    watch(opts?: {
        reconnect?: boolean;
    }): AsyncGenerator<WatchEvent, void, undefined>;
    private reopen;
    /** An `InboxConsumer` on this client's socket. */
    inboxConsumer(handler: InboxHandler, opts?: {
        limit?: number;
    }): InboxConsumer;
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
export declare class InboxConsumer {
    readonly handler: InboxHandler;
    readonly path: string;
    readonly limit: number;
    readonly reconnectForMs: number | null;
    /** The last acknowledged cursor ("USER:POSITION"). */
    acknowledged: string | null;
    /** How many messages the handler was given (redeliveries included). */
    handled: number;
    private stopping;
    private wakeUp;
    constructor(path: string | undefined, handler: InboxHandler, opts?: {
        limit?: number;
        reconnectForMs?: number | null;
    });
    /**
     * End `run()` after the message being handled: the messages handled are acknowledged (up
     * to that one), the rest of its page is not (the next consumer gets it).
     */
    stop(): void;
    run(): Promise<void>;
    private consume;
}
export {};
