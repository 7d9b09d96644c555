// Real components for the Node client's tests (and the kiosk board's): the reference IM
// service (`imlink-sandbox`) and real `imlinkd` daemons from the workspace's build
// ($IMLINKD_BIN_DIR, else target/debug). No mocks. The harness checks state with raw
// JSON-RPC lines of its own, not with the client under test.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

export function binDir() {
  const d = process.env.IMLINKD_BIN_DIR || path.join(REPO, 'target', 'debug');
  for (const b of ['imlinkd', 'imlinkctl', 'imlink-sandbox']) {
    if (!fs.existsSync(path.join(d, b))) {
      throw new Error(`${path.join(d, b)} is missing: cargo build --workspace --bins, or set IMLINKD_BIN_DIR`);
    }
  }
  return d;
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Poll another process's state (short sleeps, a deadline). */
export async function waitUntil(what, pred, timeoutMs = 20_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await pred();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`${what}: not within ${timeoutMs} ms`);
    await sleep(20);
  }
}

/** One raw request on a fresh connection: the whole answer object. */
export function rpc(sock, method, params = {}) {
  return new Promise((resolve, reject) => {
    const s = net.createConnection({ path: sock });
    let buf = '';
    s.setEncoding('utf8');
    s.on('error', reject);
    s.on('connect', () => s.write(JSON.stringify({ jsonrpc: '2.0', id: 1, method, params }) + '\n'));
    s.on('data', (d) => {
      buf += d;
      const i = buf.indexOf('\n');
      if (i >= 0) {
        s.destroy();
        resolve(JSON.parse(buf.slice(0, i)));
      }
    });
    s.on('close', () => reject(new Error('closed')));
  });
}

export class Sandbox {
  static async start(root) {
    const sb = new Sandbox();
    sb.dir = path.join(root, 'sandbox');
    const log = fs.openSync(path.join(root, 'sandbox.log'), 'w');
    sb.proc = spawn(path.join(binDir(), 'imlink-sandbox'), ['--state-dir', sb.dir], { stdio: ['ignore', 'ignore', log] });
    fs.closeSync(log);
    const envFile = path.join(sb.dir, 'endpoints.env');
    await waitUntil('the sandbox', () => fs.existsSync(envFile) && fs.statSync(envFile).size > 0);
    sb.env = {};
    for (const line of fs.readFileSync(envFile, 'utf8').split('\n')) {
      const i = line.indexOf('=');
      if (i > 0) sb.env[line.slice(0, i)] = line.slice(i + 1).replace(/^'|'$/g, '');
    }
    return sb;
  }

  async admin(p) {
    const r = await fetch(this.env.ADMIN_URL + p, {
      method: 'POST',
      headers: { Authorization: 'Bearer ' + this.env.ADMIN_TOKEN },
    });
    return r.text();
  }

  stop() {
    this.proc.kill('SIGKILL');
  }
}

export class Daemon {
  constructor(sb, root, user, apiExtra = '') {
    this.sb = sb;
    this.user = user;
    this.dir = fs.mkdtempSync(path.join(root, user.slice(0, 8) + '-'));
    this.socket = path.join(this.dir, 'api.sock');
    this.config = path.join(this.dir, 'imlinkd.toml');
    this.starts = 0;
    this.proc = null;
    fs.writeFileSync(
      this.config,
      `user_id = "${user}"
sdk_app_id = ${sb.env.SDK_APP_ID}
state_dir = "${this.dir}/state"
log_level = "debug"

[broker]
url = "${sb.env.MQTT_URL}"
ca_file = "${sb.env.CA_PATH}"
keepalive = "30s"
connect_timeout = "5s"

[provisioning]
url = "${sb.env.PROVISIONING_URL_TEMPLATE}"
token_file = "${sb.dir}/device-token"
ca_file = "${sb.env.CA_PATH}"
timeout = "5s"

[session]
backoff_base = "200ms"
backoff_cap = "2s"

[api]
socket = "${this.socket}"
${apiExtra}
`,
    );
  }

  async start() {
    this.starts++;
    const log = fs.openSync(path.join(this.dir, `imlinkd-${this.starts}.log`), 'w');
    const proc = spawn(path.join(binDir(), 'imlinkd'), ['--config', this.config], { stdio: ['ignore', 'ignore', log] });
    fs.closeSync(log);
    this.proc = proc;
    let exited = null;
    proc.on('exit', (code) => {
      exited = code;
    });
    this.exited = new Promise((r) => proc.on('exit', r));
    await waitUntil(`${this.user}'s API`, async () => {
      if (exited !== null) throw new Error(`imlinkd exited ${exited}:\n${this.logText()}`);
      try {
        return 'result' in (await rpc(this.socket, 'version'));
      } catch {
        return false;
      }
    });
    return this;
  }

  logText() {
    return fs
      .readdirSync(this.dir)
      .filter((f) => f.startsWith('imlinkd-'))
      .sort()
      .map((f) => fs.readFileSync(path.join(this.dir, f), 'utf8'))
      .join('\n');
  }

  async status() {
    return (await rpc(this.socket, 'status')).result;
  }

  /** Wait for `phase` on a raw `watch` (woken by its notifications); the status then. */
  waitPhase(phase, timeoutMs = 20_000) {
    return new Promise((resolve, reject) => {
      const s = net.createConnection({ path: this.socket });
      let buf = '';
      let current = '';
      const timer = setTimeout(() => {
        s.destroy();
        reject(new Error(`${this.user}: still ${current}, not ${phase}\n${this.logText().slice(-4000)}`));
      }, timeoutMs);
      s.setEncoding('utf8');
      s.on('error', reject);
      s.on('connect', () => s.write('{"jsonrpc":"2.0","id":1,"method":"watch"}\n'));
      s.on('data', (d) => {
        buf += d;
        let i;
        while ((i = buf.indexOf('\n')) >= 0) {
          const m = JSON.parse(buf.slice(0, i));
          buf = buf.slice(i + 1);
          if (m.id === 1) current = m.result.status.phase;
          else if (m.method === 'state_changed') current = m.params.phase;
          if (current === phase) {
            clearTimeout(timer);
            s.destroy();
            this.status().then(resolve, reject);
            return;
          }
        }
      });
    });
  }

  async kill9() {
    const p = this.proc;
    this.proc = null;
    p.kill('SIGKILL');
    await this.exited;
  }

  async stop() {
    const p = this.proc;
    if (!p) return;
    this.proc = null;
    p.kill('SIGTERM');
    const t = setTimeout(() => p.kill('SIGKILL'), 20_000);
    await this.exited;
    clearTimeout(t);
  }
}

/** One sandbox and the daemons of a test file (shared between its tests). */
export class World {
  static async start(tag = 'node') {
    const w = new World();
    w.root = fs.mkdtempSync(path.join('/tmp', `imlk-${tag}-`));
    fs.chmodSync(w.root, 0o755);
    w.sandbox = await Sandbox.start(w.root);
    w.daemons = [];
    return w;
  }

  async daemon(user, { apiExtra = '', online = true } = {}) {
    const d = await new Daemon(this.sandbox, this.root, user, apiExtra).start();
    this.daemons.push(d);
    if (online) await d.waitPhase('online');
    return d;
  }

  async close() {
    for (const d of this.daemons) await d.stop();
    this.sandbox.stop();
    if (process.env.IMLINKD_KEEP_TEST_DIRS !== '1') fs.rmSync(this.root, { recursive: true, force: true });
  }
}
