// A minimal kiosk board: one page showing imlinkd's session live (online / subscribing / kicked
// with its reason / UserSig renewing), the conversations with unread counts, and a send box.
// A small service on node's own `http` (no framework) using the Node client; the page gets
// live updates by Server-Sent Events.
//
//   IMLINKD_SOCKET=/run/imlinkd/api.sock PORT=8080 node server.js
//
// It listens on 127.0.0.1 only (a kiosk's browser runs on the same machine) and prints
// "listening on http://127.0.0.1:PORT" once it serves. Sending and marking read need an
// operator socket (docs/api.md, roles); a reader socket shows everything but cannot send.
'use strict';

const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');
const { Client, DaemonUnavailable } = require('imlinkd-client');

const PAGE = fs.readFileSync(path.join(__dirname, 'public', 'index.html'));
const MAX_BODY = 16 * 1024;

/** What the page shows, computed here so that every browser sees the same thing. */
function describe(view) {
  const s = view.status;
  if (!view.reachable) return { state: 'daemon unreachable', tone: 'bad', detail: view.unreachable || '' };
  if (!s) return { state: 'starting', tone: 'wait', detail: '' };
  if (s.phase === 'kicked') {
    const k = view.kick || {};
    const reason = k.reason || (s.last_error && s.last_error.class) || 'kicked';
    const message = k.message || (s.last_error && s.last_error.message) || '';
    return { state: 'kicked', tone: 'bad', detail: `${reason}${message ? ': ' + message : ''}`, reason };
  }
  if (s.sig && s.sig.refreshing) return { state: 'UserSig renewing', tone: 'wait', detail: s.summary };
  const tone = s.phase === 'online' ? 'good' : ['idle', 'stopped'].includes(s.phase) ? 'bad' : 'wait';
  const state = s.phase === 'idle' ? 'logged out' : s.phase;
  return { state, tone, detail: s.summary };
}

class Board {
  constructor(client) {
    this.client = client;
    this.view = { reachable: false, unreachable: 'connecting to imlinkd…', status: null, kick: null, conversations: [] };
    this.subscribers = new Set();
    this.refreshing = null;
    this.again = false;
  }

  snapshot() {
    const s = this.view.status;
    return {
      ...describe(this.view),
      user_id: s ? s.user_id : '',
      phase: s ? s.phase : '',
      sig_expires_at: s && s.sig ? s.sig.expires_at : null,
      conversations: this.view.conversations.map((c) => ({
        peer: c.peer,
        unread: c.unread,
        last: c.last && { body: c.last.body, kind: c.last.kind, direction: c.last.direction, state: c.last.state, ts: c.last.ts },
      })),
    };
  }

  publish() {
    const data = `data: ${JSON.stringify(this.snapshot())}\n\n`;
    for (const res of this.subscribers) res.write(data);
  }

  /** Status and conversations again (coalesced: one at a time, one more if asked meanwhile). */
  refresh() {
    if (this.refreshing) {
      this.again = true;
      return this.refreshing;
    }
    this.refreshing = (async () => {
      do {
        this.again = false;
        try {
          const [status, page] = await Promise.all([this.client.status(), this.client.get_conversations({ limit: 20 })]);
          this.view.status = status;
          this.view.conversations = page.conversations;
          if (status.phase !== 'kicked') this.view.kick = null;
          this.view.reachable = true;
        } catch (e) {
          if (e instanceof DaemonUnavailable) {
            this.view.reachable = false;
            this.view.unreachable = e.message;
          } else console.error('refresh:', e.message);
        }
        this.publish();
      } while (this.again);
      this.refreshing = null;
    })();
    return this.refreshing;
  }

  /** Follow the daemon's events for ever (the client reconnects after a daemon restart). */
  async follow() {
    for (;;) {
      try {
        for await (const ev of this.client.watch()) {
          if (ev.name === 'snapshot') {
            this.view.reachable = true;
            this.view.status = ev.status;
            const le = ev.status.last_event;
            this.view.kick = ev.status.phase === 'kicked' && le && le.event === 'kicked_offline' ? le : null;
          } else if (ev.name === 'kicked_offline') {
            this.view.kick = ev.params;
          }
          this.refresh();
        }
      } catch (e) {
        this.view.reachable = false;
        this.view.unreachable = e.message;
        this.publish();
        await new Promise((r) => setTimeout(r, 1000));
      }
    }
  }
}

function readJson(req) {
  return new Promise((resolve, reject) => {
    let size = 0;
    const chunks = [];
    req.on('data', (c) => {
      size += c.length;
      if (size > MAX_BODY) {
        reject(new Error('request too large'));
        req.destroy();
      } else chunks.push(c);
    });
    req.on('end', () => {
      try {
        resolve(JSON.parse(Buffer.concat(chunks).toString('utf8') || '{}'));
      } catch {
        reject(new Error('not JSON'));
      }
    });
    req.on('error', reject);
  });
}

function json(res, code, body) {
  res.writeHead(code, { 'Content-Type': 'application/json', 'Cache-Control': 'no-store' });
  res.end(JSON.stringify(body));
}

function serve(board, client) {
  return http.createServer(async (req, res) => {
    const url = new URL(req.url, 'http://localhost');
    try {
      if (req.method === 'GET' && url.pathname === '/') {
        res.writeHead(200, {
          'Content-Type': 'text/html; charset=utf-8',
          'Content-Security-Policy': "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'",
        });
        res.end(PAGE);
      } else if (req.method === 'GET' && url.pathname === '/events') {
        res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-store', Connection: 'keep-alive' });
        res.write(`retry: 1000\ndata: ${JSON.stringify(board.snapshot())}\n\n`);
        board.subscribers.add(res);
        const ping = setInterval(() => res.write(': ping\n\n'), 15_000);
        req.on('close', () => {
          clearInterval(ping);
          board.subscribers.delete(res);
        });
      } else if (req.method === 'GET' && url.pathname === '/api/state') {
        json(res, 200, board.snapshot());
      } else if (req.method === 'POST' && url.pathname === '/api/send') {
        const { to, body } = await readJson(req);
        if (typeof to !== 'string' || typeof body !== 'string' || !to || !body) {
          return json(res, 400, { error: 'to and body are required' });
        }
        const r = await client.send_message(to.trim(), body);
        json(res, 200, r);
        board.refresh();
      } else if (req.method === 'POST' && url.pathname === '/api/read') {
        const { peer } = await readJson(req);
        if (typeof peer !== 'string' || !peer) return json(res, 400, { error: 'peer is required' });
        json(res, 200, { marked: await client.mark_read(peer) });
        board.refresh();
      } else {
        json(res, 404, { error: 'not found' });
      }
    } catch (e) {
      // The daemon's error (its IM code and message) goes to the page as data.
      json(res, e.code !== undefined && typeof e.code === 'number' ? 409 : 400, { error: e.message, code: e.code ?? null });
    }
  });
}

function main() {
  const socket = process.env.IMLINKD_SOCKET || undefined;
  const port = Number(process.env.PORT ?? 8080);
  const client = new Client(socket, { reconnectForMs: null });
  const board = new Board(client);
  board.follow();
  const server = serve(board, client);
  server.listen(port, '127.0.0.1', () => {
    console.log(`listening on http://127.0.0.1:${server.address().port} (imlinkd at ${client.path})`);
  });
  const stop = () => {
    client.close();
    server.close();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

if (require.main === module) main();

module.exports = { describe, Board, serve };
