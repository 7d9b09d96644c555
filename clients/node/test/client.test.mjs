// The Node client against real imlinkd daemons and the reference IM service (no mocks).
//   IMLINKD_BIN_DIR=target/debug node --test clients/node/test/
// (as root: the role test runs a client as another uid; tests/clients.rs runs it in the suite).
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { createRequire } from 'node:module';

import { REPO, World, rpc, waitUntil } from './harness.mjs';

const require = createRequire(import.meta.url);
const imlinkd = require('../dist/index.js');
const { Client, InboxConsumer, ImlinkError, PermissionDenied, NotLoggedIn, CursorError, InvalidParams, MethodNotFound, DaemonUnavailable } =
  imlinkd;

let world;
let A; // kiosk-0042, as in ./scripts/demo
let B; // kiosk-0043, its peer

before(async () => {
  world = await World.start('node');
  A = await world.daemon('kiosk-0042');
  B = await world.daemon('kiosk-0043');
});
after(async () => {
  await world?.close();
});

/** Every method docs/api.md has a heading for (several per heading). */
function documentedMethods() {
  const names = [];
  for (const line of fs.readFileSync(path.join(REPO, 'docs/api.md'), 'utf8').split('\n')) {
    if (line.startsWith('### ')) for (const m of line.matchAll(/`([a-z_]+)`/g)) names.push(m[1]);
  }
  return names;
}

/** The next event called `name` (matching `pred`) from a watch iterator, within `ms`. */
async function nextEvent(it, name, pred = () => true, ms = 20_000) {
  let timer;
  const timeout = new Promise((_, rej) => {
    timer = setTimeout(() => rej(new Error(`no ${name} within ${ms} ms`)), ms);
  });
  const find = (async () => {
    for (;;) {
      const r = await it.next();
      if (r.done) throw new Error(`the watch ended before ${name}`);
      if (r.value.name === name && pred(r.value)) return r.value;
    }
  })();
  try {
    return await Promise.race([find, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

describe('results', () => {
  it('ignore unknown fields and survive missing ones', () => {
    const s = imlinkd.toStatus({ phase: 'online', login_status: 1, future_field: { x: 1 }, last_error: { code: 6208, class: 'kicked', message: 'm', new: 1 } });
    assert.deepEqual([s.phase, s.login_status, s.user_id, s.sig], ['online', 1, '', null]);
    assert.deepEqual(s.last_error, { code: 6208, class: 'kicked', message: 'm' });
    assert.deepEqual(s.raw.future_field, { x: 1 });
    const m = imlinkd.toMessage({ seq: 3, id: 'X', body: 'b', reactions: [] });
    assert.deepEqual([m.seq, m.kind, m.code, m.raw.reactions], [3, 'text', null, []]);
    assert.equal(imlinkd.toStatus('not an object').phase, '');
  });
});

describe('methods', () => {
  it('has a client method for every method docs/api.md and the daemon list', async () => {
    const docs = documentedMethods();
    for (const m of ['read_inbox', 'ack_inbox', 'get_login_status', 'metrics']) assert.ok(docs.includes(m), m);
    const err = (await rpc(A.socket, 'no_such_method')).error;
    assert.equal(err.code, -32601);
    const served = err.message.split('methods:')[1].split(',').map((s) => s.trim());
    assert.deepEqual([...docs].sort(), [...served].sort(), 'docs/api.md and the daemon list the same methods');
    for (const m of docs) assert.equal(typeof Client.prototype[m], 'function', `Client.${m}`);
    // The shipped declarations name them too.
    const dts = fs.readFileSync(new URL('../dist/index.d.ts', import.meta.url), 'utf8');
    for (const m of docs) assert.match(dts, new RegExp(`\\b${m}\\(`), `index.d.ts: ${m}`);
  });

  it('session methods', async () => {
    const c = new Client(A.socket);
    const v = await c.version();
    assert.deepEqual([v.name, v.api], ['imlinkd', 1]);
    const s = await c.status();
    assert.equal(s.phase, 'online');
    assert.equal(s.inbox_subscribed, true);
    assert.deepEqual([s.user_id, s.login_user, s.login_status], ['kiosk-0042', 'kiosk-0042', 1]);
    assert.equal(s.last_error, null);
    assert.match(s.sig.fingerprint, /^sha256:/);
    assert.ok(s.counters.logins > 0);
    assert.ok('summary' in s.raw);
    assert.equal(await c.get_login_user(), 'kiosk-0042');
    assert.equal(await c.get_login_status(), 1);
    const m = await c.metrics();
    assert.match(m, /imlinkd_phase\{phase="online"\} 1/);
    const r = await c.login();
    assert.deepEqual([r.login_user, r.login_status], ['kiosk-0042', 1]);
    c.close();
  });

  it('messaging methods', async () => {
    const body = `hello ${Date.now()}`;
    const a = new Client(A.socket);
    const b = new Client(B.socket);
    const bw = b.watch();
    const snap = (await bw.next()).value;
    assert.equal(snap.name, 'snapshot');
    assert.equal(snap.status.user_id, 'kiosk-0043');
    const aw = a.watch();
    await aw.next();
    const sent = await a.send_message('kiosk-0043', body);
    assert.deepEqual([sent.to, sent.state, sent.id.length], ['kiosk-0043', 'queued', 26]);
    const ok = await nextEvent(aw, 'message_sent', (e) => e.params.id === sent.id);
    assert.equal(ok.params.to, 'kiosk-0043');
    const got = await nextEvent(bw, 'message_received', (e) => e.params.id === sent.id);
    assert.deepEqual([got.params.from, got.params.body, got.params.kind], ['kiosk-0042', body, 'text']);
    await bw.return();
    await aw.return();

    let page = await b.get_conversations({ limit: 10 });
    const conv = page.conversations.find((c) => c.peer === 'kiosk-0042');
    assert.ok(conv.unread >= 1);
    assert.deepEqual([conv.last.body, conv.last.direction], [body, 'in']);
    const hist = await b.get_history('kiosk-0042', { limit: 5 });
    assert.deepEqual([hist.messages[0].id, hist.messages[0].state], [sent.id, 'unread']);
    const older = await b.get_history('kiosk-0042', { before: sent.id, limit: 5 });
    assert.ok(!older.messages.some((m) => m.id === sent.id));
    const mine = await a.get_history('kiosk-0043', { limit: 1 });
    assert.deepEqual([mine.messages[0].direction, mine.messages[0].state], ['out', 'sent']);

    const inbox = await b.read_inbox({ cursor: 'kiosk-0043:0', limit: 100 });
    assert.equal(inbox.user_id, 'kiosk-0043');
    assert.ok(inbox.messages.some((m) => m.id === sent.id));
    assert.match(inbox.cursor, /^kiosk-0043:\d+$/);
    assert.ok((await b.mark_read('kiosk-0042')) >= 1);
    page = await b.get_conversations();
    assert.equal(page.conversations.find((c) => c.peer === 'kiosk-0042').unread, 0);
    const ack = await b.ack_inbox(inbox.cursor);
    assert.deepEqual([ack.user_id, ack.cursor], ['kiosk-0043', inbox.cursor]);
    assert.equal((await a.send_message('kiosk-0043', '{"k":1}', 'custom')).state, 'queued');
    a.close();
    b.close();
  });

  it('errors carry the IM code and class', async () => {
    const c = new Client(A.socket);
    await assert.rejects(c.read_inbox({ cursor: 'not a cursor' }), (e) => e instanceof CursorError && e.code === 6017 && /USER:POSITION/.test(e.message));
    await assert.rejects(c.send_message('kiosk-0043', 'x', 'bogus'), (e) => e instanceof InvalidParams && e.code === -32602);
    await assert.rejects(c.call('no_such_method'), MethodNotFound);
    await assert.rejects(c.send_message('not a user id!', 'x'), (e) => e instanceof ImlinkError && e.code === 7003);
    const sig = JSON.parse(await world.sandbox.admin('/issue-sig?user_id=kiosk-9999')).user_sig;
    await assert.rejects(c.login({ user_id: 'kiosk-0042', user_sig: sig }), (e) => {
      assert.equal(e.code, 70013);
      assert.ok(!e.message.includes(sig), 'the UserSig is never quoted back');
      return true;
    });
    assert.equal((await c.status()).phase, 'online');
    c.close();
  });

  it('login, logout, not logged in, a refused login, a kick', async () => {
    const d = await world.daemon('kiosk-0044');
    const c = new Client(d.socket);
    const w = c.watch();
    await w.next();
    assert.equal(await c.logout(), 3);
    await nextEvent(w, 'state_changed', (e) => e.params.phase === 'idle');
    await assert.rejects(c.send_message('kiosk-0043', 'x'), (e) => e instanceof NotLoggedIn && e.code === 6014);
    await world.sandbox.admin('/ban?user_id=kiosk-0044');
    await assert.rejects(c.login(), (e) => e instanceof ImlinkError && e.code === 70051 && e.cls === 'fatal');
    await world.sandbox.admin('/unban?user_id=kiosk-0044');
    const r = await c.login();
    assert.deepEqual([r.login_user, r.login_status], ['kiosk-0044', 1]);
    await nextEvent(w, 'connect_success');
    await nextEvent(w, 'state_changed', (e) => e.params.phase === 'online');
    await world.sandbox.admin('/kick?user_id=kiosk-0044');
    const k = await nextEvent(w, 'kicked_offline');
    assert.deepEqual([k.params.reason, k.params.code], ['kicked_by_admin', 6208]);
    const st = await nextEvent(w, 'state_changed', (e) => e.params.phase === 'kicked');
    assert.deepEqual([st.error.code, st.error.class], [6208, 'kicked']);
    await w.return();
    c.close();
    await d.stop();
  });

  it('watch and calls come back after a daemon restart', async () => {
    const d = await world.daemon('kiosk-0045');
    const c = new Client(d.socket, { reconnectForMs: 30_000 });
    assert.equal((await c.status()).phase, 'online');
    const w = c.watch();
    const first = (await w.next()).value;
    assert.deepEqual([first.name, first.reconnected], ['snapshot', false]);
    for (const how of ['kill9', 'sigterm']) {
      await (how === 'kill9' ? d.kill9() : d.stop());
      await assert.rejects(c.status(), DaemonUnavailable);
      await d.start();
      const snap = await nextEvent(w, 'snapshot');
      assert.equal(snap.reconnected, true, how);
      if (snap.status.phase !== 'online') await nextEvent(w, 'state_changed', (e) => e.params.phase === 'online');
      assert.equal((await c.status()).user_id, 'kiosk-0045');
    }
    await w.return();
    c.close();
    await d.stop();
  });

  it('watch without reconnect ends with the reason; unreachable sockets say why', async () => {
    const d = await world.daemon('kiosk-0046', { online: false });
    const c = new Client(d.socket);
    const w = c.watch({ reconnect: false });
    await w.next();
    await d.kill9();
    await assert.rejects(
      (async () => {
        for (;;) if ((await w.next()).done) return;
      })(),
      (e) => e instanceof DaemonUnavailable && e.reason === 'lost',
    );
    await assert.rejects(new Client(path.join(d.dir, 'nope.sock')).status(), (e) => e.reason === 'missing');
    await assert.rejects(new Client(d.socket).status(), (e) => e.reason === 'refused');
  });
});

describe('inbox consumer', () => {
  it('acknowledges only after the handler', async () => {
    const d = await world.daemon('kiosk-0047');
    const b = new Client(B.socket);
    const c = new Client(d.socket);
    for (let i = 0; i < 3; i++) await b.send_message('kiosk-0047', `c-${i}`);
    await waitUntil('3 received', async () => (await d.status()).messages.received >= 3);
    const seen = [];
    await assert.rejects(
      c
        .inboxConsumer((u, m) => {
          seen.push(m.body);
          throw new Error('the app crashed');
        })
        .run(),
      /the app crashed/,
    );
    assert.deepEqual(seen, ['c-0']);
    const got = [];
    const cons = c.inboxConsumer(
      async (u, m) => {
        assert.equal(u, 'kiosk-0047');
        got.push(m.body);
        if (got.length === 3) cons.stop();
      },
      { limit: 2 },
    );
    await cons.run();
    assert.deepEqual(got, ['c-0', 'c-1', 'c-2']);
    const left = await c.read_inbox();
    assert.deepEqual(left.messages, []);
    assert.equal(cons.acknowledged, left.cursor);
    b.close();
    c.close();
    await d.stop();
  });

  it('stops after the message being handled, the rest of the page left unacknowledged', async () => {
    // A backlog of 6 in one page (limit 100): stop() in the handler of the second ends run()
    // there, those two acknowledged, the other four left for the next consumer.
    const d = await world.daemon('kiosk-0052');
    const b = new Client(B.socket);
    const c = new Client(d.socket);
    for (let i = 0; i < 6; i++) await b.send_message('kiosk-0052', `s-${i}`);
    await waitUntil('6 received', async () => (await d.status()).messages.received >= 6);
    const got = [];
    const cons = c.inboxConsumer(async (u, m) => {
      got.push(m);
      if (got.length === 2) cons.stop();
    });
    await cons.run();
    assert.deepEqual(
      got.map((m) => m.body),
      ['s-0', 's-1'],
    );
    assert.equal(cons.handled, 2);
    assert.equal(cons.acknowledged, `kiosk-0052:${got[1].seq}`);
    const rest = await c.read_inbox();
    assert.deepEqual(
      rest.messages.map((m) => m.body),
      ['s-2', 's-3', 's-4', 's-5'],
    );
    b.close();
    c.close();
    await d.stop();
  });

  it('loses nothing across kill -9 of the app and of the daemon', async () => {
    const d = await world.daemon('kiosk-0048');
    const out = path.join(d.dir, 'handled.jsonl');
    const handled = () =>
      fs.existsSync(out)
        ? fs
            .readFileSync(out, 'utf8')
            .split('\n')
            .filter((l) => l.endsWith('}'))
            .map((l) => JSON.parse(l).body)
        : [];
    const startApp = async () => {
      const p = spawn(process.execPath, [new URL('./consumer-app.js', import.meta.url).pathname, d.socket, out], {
        stdio: ['ignore', 'pipe', 'inherit'],
      });
      await new Promise((r) => p.stdout.once('data', r));
      p.exited = new Promise((r) => p.on('exit', r));
      return p;
    };
    const bodies = Array.from({ length: 60 }, (_, i) => `m-${String(i).padStart(3, '0')}`);
    const b = new Client(B.socket);
    let app = await startApp();
    for (const m of bodies.slice(0, 20)) await b.send_message('kiosk-0048', m);
    await waitUntil('8 handled', () => handled().length >= 8);
    app.kill('SIGKILL'); // the app dies mid-stream
    await app.exited;
    for (const m of bodies.slice(20, 40)) await b.send_message('kiosk-0048', m);
    app = await startApp();
    await waitUntil('28 handled', () => new Set(handled()).size >= 28);
    await d.kill9(); // the daemon dies mid-stream; the app stays and reconnects
    for (const m of bodies.slice(40)) await b.send_message('kiosk-0048', m);
    await d.start();
    await waitUntil('all 60 handled', () => bodies.every((x) => handled().includes(x)), 60_000);
    assert.equal(app.exitCode, null, 'the app reconnected by itself');
    await waitUntil('the inbox acknowledged', async () => (await rpc(d.socket, 'read_inbox', {})).result.messages.length === 0);
    app.kill('SIGKILL');
    await app.exited;
    const h = handled();
    assert.deepEqual(new Set(h), new Set(bodies), 'nothing lost, nothing invented');
    const first = new Map();
    h.forEach((x, i) => first.has(x) || first.set(x, i));
    assert.deepEqual([...bodies].sort((x, y) => first.get(x) - first.get(y)), bodies, 'in order apart from redeliveries');
    console.error(`# consumer: 60 messages, ${h.length} handlings (${h.length - 60} redelivered)`);
    b.close();
    await d.stop();
  });
});

describe('roles', () => {
  it('a reader socket refuses operator methods with PermissionDenied', async () => {
    assert.equal(process.getuid(), 0, 'this test runs a client as another uid: run it as root (CI does)');
    const GID = 61201;
    const READER = 61202;
    const d = await world.daemon('kiosk-0049', { apiExtra: `group = "${GID}"` });
    fs.chmodSync(d.dir, 0o755);
    // The client where that uid can read it (the checkout may be under a 0700 directory).
    const lib = path.join(world.root, 'lib');
    fs.mkdirSync(lib, { recursive: true, mode: 0o755 });
    fs.copyFileSync(new URL('../dist/index.js', import.meta.url), path.join(lib, 'index.js'));
    fs.chmodSync(path.join(lib, 'index.js'), 0o644);
    const script = `
      const { Client, PermissionDenied } = require(${JSON.stringify(path.join(lib, 'index.js'))});
      (async () => {
        const c = new Client(${JSON.stringify(d.socket)});
        const r = { phase: (await c.status()).phase };
        for (const [name, f] of [['send_message', () => c.send_message('kiosk-0043', 'x')], ['logout', () => c.logout()], ['ack_inbox', () => c.ack_inbox('kiosk-0049:0')]]) {
          try { await f(); r[name] = 'allowed'; }
          catch (e) { r[name] = { denied: e instanceof PermissionDenied, code: e.code, message: e.message }; }
        }
        console.log(JSON.stringify(r));
        c.close();
      })().catch((e) => { console.log(JSON.stringify({ exception: String(e) })); });`;
    const run = (uid, gid) => JSON.parse(execFileSync(process.execPath, ['-e', script], { uid, gid, cwd: '/' }).toString());
    const r = run(READER, GID);
    assert.equal(r.phase, 'online', JSON.stringify(r));
    for (const m of ['send_message', 'logout', 'ack_inbox']) {
      assert.equal(r[m].denied, true, JSON.stringify(r));
      assert.equal(r[m].code, -32001);
      assert.match(r[m].message, /needs an operator/);
      assert.match(r[m].message, new RegExp(`uid ${READER}`));
    }
    assert.equal((await d.status()).phase, 'online', 'not logged out');
    const o = JSON.parse(
      execFileSync(
        process.execPath,
        ['-e', `require(${JSON.stringify(path.join(lib, 'index.js'))}).defaultSocket; new (require(${JSON.stringify(path.join(lib, 'index.js'))}).Client)(${JSON.stringify(d.socket)}).status().then(() => console.log('{}'), (e) => console.log(JSON.stringify({ reason: e.reason })))`],
        { uid: 61203, gid: 61203, cwd: '/' },
      ).toString(),
    );
    assert.equal(o.reason, 'denied', 'outside the group: not even a connection');
    await d.stop();
  });
});

describe('docs', () => {
  it("docs/clients.md's Node example runs against the demo's daemons", async () => {
    const text = fs.readFileSync(path.join(REPO, 'docs/clients.md'), 'utf8');
    const m = text.match(/<!-- node-example -->\n```\w+\n([\s\S]*?)```\n<!-- \/node-example -->/);
    assert.ok(m, 'no node example in docs/clients.md');
    const code = m[1];
    assert.ok(code.split('\n').filter((l) => l.trim()).length <= 12, 'about ten lines');
    // As a newcomer installs it: `npm install ./clients/node` in an app's directory, offline.
    const app = fs.mkdtempSync(path.join(world.root, 'app-'));
    fs.writeFileSync(path.join(app, 'package.json'), '{"name":"app","version":"1.0.0","private":true}');
    execFileSync('npm', ['install', '--offline', '--no-audit', '--no-fund', '-q', path.join(REPO, 'clients/node')], { cwd: app, stdio: 'inherit' });
    fs.writeFileSync(path.join(app, 'example.mjs'), code);
    const p = spawn(process.execPath, ['example.mjs', A.socket], { cwd: app, stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    p.stdout.on('data', (x) => (out += x));
    const exited = new Promise((r) => p.on('exit', r));
    const b = new Client(B.socket);
    await waitUntil('the example\'s message', async () =>
      (await b.get_history('kiosk-0042', { limit: 5 })).messages.some((x) => x.body === 'hello from Node'),
    );
    await b.send_message('kiosk-0042', 'hello back');
    b.close();
    assert.equal(await exited, 0, out);
    assert.match(out, /online as kiosk-0042/);
    assert.match(out, /kiosk-0043: hello back/);
  });
});
