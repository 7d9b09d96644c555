// The kiosk board in a real headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core), against two real imlinkd daemons and the reference IM service:
// the page shows "online"; a message from the second daemon appears on it; a message typed
// on the page reaches the second daemon; an admin kick shows as "kicked" with its reason.
//   IMLINKD_BIN_DIR=target/debug node --test examples/kiosk-board/test/kiosk.test.mjs
// KIOSK_SCREENSHOT=docs/kiosk-board.png writes the screenshot there (else a temporary file).
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { after, before, it } from 'node:test';

import { World } from '../../../clients/node/test/harness.mjs';

const require = createRequire(import.meta.url);
const { chromium } = require('playwright-core');
const { Client } = require('imlinkd-client');

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
// As the machine notes say: root needs --no-sandbox; the rest keeps Chromium off the network.
const FLAGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

let world;
let board; // kiosk-0042: the kiosk whose board this is
let peer; // kiosk-0043
let server;
let browser;

before(async () => {
  assert.ok(fs.existsSync(CHROMIUM), `${CHROMIUM} is missing: scripts/setup installs Debian's chromium`);
  world = await World.start('kiosk');
  board = await world.daemon('kiosk-0042');
  peer = await world.daemon('kiosk-0043');
  server = spawn(process.execPath, [new URL('../server.js', import.meta.url).pathname], {
    env: { ...process.env, IMLINKD_SOCKET: board.socket, PORT: '0' },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  server.url = await new Promise((resolve, reject) => {
    let out = '';
    server.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/listening on (http:\/\/127\.0\.0\.1:\d+)/);
      if (m) resolve(m[1]);
    });
    server.on('exit', (code) => reject(new Error(`the board's server exited ${code}: ${out}`)));
  });
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: FLAGS });
});

after(async () => {
  await browser?.close();
  server?.kill('SIGTERM');
  await world?.close();
});

/** Wait until the element's text matches `re` (the page updates by itself: SSE). */
async function textOf(page, selector, re, what) {
  try {
    await page.locator(selector).filter({ hasText: re }).first().waitFor({ timeout: 20_000 });
  } catch (e) {
    throw new Error(`${what}: ${selector} is ${JSON.stringify(await page.textContent(selector))}, not ${re} (${e.message})`);
  }
  return page.textContent(selector);
}

it('shows the session live, receives, sends, and shows a kick with its reason', async () => {
  const page = await browser.newPage({ viewport: { width: 1100, height: 640 } });
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(server.url);

  // 1. Online.
  assert.equal(await textOf(page, '#state', /^online$/, 'online'), 'online');
  assert.match(await page.textContent('#who'), /kiosk-0042/);

  // 2. A message from the other daemon appears, with its unread count.
  const p = new Client(peer.socket);
  await p.send_message('kiosk-0042', 'Hello board, this is kiosk-0043');
  await textOf(page, '#conversations', /Hello board, this is kiosk-0043/, 'the received message');
  const row = page.locator('li.conv', { hasText: 'kiosk-0043' });
  assert.equal((await row.locator('.unread').textContent()).trim(), '1');

  // 3. A message typed on the page reaches the other daemon.
  const watch = p.watch();
  await watch.next();
  await page.fill('#to', 'kiosk-0043');
  await page.fill('#body', 'Hello from the kiosk page');
  await page.click('#sendButton');
  await textOf(page, '#sendResult', /^queued for kiosk-0043/, 'the send result');
  for (;;) {
    const ev = (await watch.next()).value;
    if (ev.name === 'message_received' && ev.params.body === 'Hello from the kiosk page') {
      assert.equal(ev.params.from, 'kiosk-0042');
      break;
    }
  }
  await watch.return();
  await p.send_message('kiosk-0042', 'Got it, thanks!');
  await textOf(page, '#conversations', /Got it, thanks!/, 'the reply');
  await textOf(page, 'li.conv .unread', /^2$/, 'two unread');
  p.close();

  const shot = process.env.KIOSK_SCREENSHOT || path.join(world.root, 'kiosk-board.png');
  await page.screenshot({ path: shot });
  assert.ok(fs.statSync(shot).size > 10_000, 'a screenshot with something on it');

  // 4. Clicking the conversation marks it read.
  await row.click();
  await textOf(page, 'li.conv .unread', /^0$/, 'read');

  // 5. A kick by the IM service's admin: "kicked" with its reason.
  await world.sandbox.admin('/kick?user_id=kiosk-0042');
  await textOf(page, '#state', /^kicked$/, 'kicked');
  const detail = await page.textContent('#detail');
  assert.match(detail, /^kicked_by_admin: kicked offline by an administrator/);
  assert.equal(await page.getAttribute('#session', 'class'), 'bad');
  await page.screenshot({ path: shot.replace(/\.png$/, '-kicked.png') });

  // 6. Logged in again (an operator's `login`): online again on the same page.
  await new Client(board.socket).login();
  await textOf(page, '#state', /^online$/, 'online again');
  assert.deepEqual(errors, [], 'no errors in the page');
  await page.close();
});

it("labels every state the page can show (the server's describe())", () => {
  const { describe: label } = require('../server.js');
  const st = (status, extra = {}) => label({ reachable: true, status, kick: null, ...extra });
  assert.deepEqual(
    [st({ phase: 'online', summary: 'online as k' }).state, st({ phase: 'online', summary: '' }).tone],
    ['online', 'good'],
  );
  assert.equal(st({ phase: 'subscribing', summary: '' }).state, 'subscribing');
  const renewing = st({ phase: 'online', summary: 'online as k', sig: { refreshing: true } });
  assert.deepEqual([renewing.state, renewing.tone], ['UserSig renewing', 'wait']);
  const kicked = st(
    { phase: 'kicked', summary: '', last_error: { class: 'kicked', code: 6208, message: 'm' } },
    { kick: { reason: 'logged_in_elsewhere', message: 'another device logged in' } },
  );
  assert.deepEqual([kicked.state, kicked.reason, kicked.detail], ['kicked', 'logged_in_elsewhere', 'logged_in_elsewhere: another device logged in']);
  assert.equal(st({ phase: 'idle', summary: '' }).state, 'logged out');
  assert.equal(label({ reachable: false, unreachable: 'no socket' }).state, 'daemon unreachable');
});
