'use strict';
// A real redis-server per test file, on a free port, that a test can stop, freeze and restart.
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const path = require('node:path');
const { connect, parseUrl } = require('../lib/redis');

const LIBRARY = fs.readFileSync(path.join(__dirname, '../../../src/invalidate/invalidate.lua'), 'utf8');
/** The library as gateways from before the index ship it (one name, v1; no index). */
const LIBRARY_V1 = fs.readFileSync(path.join(__dirname, '../../../tests/it/fixtures/invalidate_v1.lua'), 'utf8');

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

async function until(what, fn, ms = 10000) {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      if (await fn()) return;
    } catch {
      // not yet
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

class RedisServer {
  static async start() {
    const r = new RedisServer(await freePort());
    await r.spawn();
    return r;
  }
  constructor(port) {
    this.port = port;
    this.url = `redis://127.0.0.1:${port}`;
  }
  async spawn() {
    this.child = spawn('redis-server', ['--port', String(this.port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
    await until('redis-server', async () => (await this.cmd(['PING'])) === 'PONG');
  }
  /** One command on a fresh connection. */
  async cmd(args) {
    const conn = await connect(parseUrl(this.url), 1000);
    try {
      return await conn.send(args, 1000);
    } finally {
      conn.close(new Error('done'));
    }
  }
  /** What a gateway does at start: loads the fleet's invalidation function (an older one's). */
  loadLibrary(text = LIBRARY) {
    return this.cmd(['FUNCTION', 'LOAD', 'REPLACE', text]);
  }
  freeze() {
    this.child.kill('SIGSTOP');
  }
  thaw() {
    this.child.kill('SIGCONT');
  }
  async stop() {
    if (!this.child) return;
    const exited = new Promise((r) => this.child.once('exit', r));
    this.child.kill('SIGCONT');
    this.child.kill('SIGKILL');
    await exited;
    this.child = null;
  }
  async restart() {
    await this.stop();
    await this.spawn();
  }
}

/** A log that keeps its lines, for assertions. */
function memoryLog() {
  const lines = [];
  return { lines, warn: (m) => lines.push(`warn ${m}`), error: (m) => lines.push(`error ${m}`), info: (m) => lines.push(`info ${m}`) };
}

module.exports = { RedisServer, freePort, until, memoryLog, LIBRARY_V1 };
