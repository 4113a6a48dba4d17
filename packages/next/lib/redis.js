'use strict';
// The few Redis commands @isrgate/next sends, over the RESP2 protocol on node's own `net` and
// `tls`: no dependency, so `npm install <repo>/packages/next` (a link, whose dependencies npm does
// not install) works as it is. URLs are the gateway's (`redis.url`, fred's format):
//   redis://[user:password@]host:port[/db]        rediss://… for TLS
//   redis-sentinel://host:port[/db]?sentinelServiceName=NAME[&node=host:port…]
//   redis-cluster://host:port[?node=host:port…]   (and rediss-sentinel://, rediss-cluster://)
// Every command has a deadline; a connection that missed one is closed (its replies can no
// longer be matched) and the next command opens another.

const net = require('node:net');
const tls = require('node:tls');

/** An error reply from Redis (`-ERR …`), as opposed to a connection that failed. */
class ReplyError extends Error {}

const SCHEMES = {
  'redis:': ['standalone', false],
  'rediss:': ['standalone', true],
  'redis-sentinel:': ['sentinel', false],
  'rediss-sentinel:': ['sentinel', true],
  'redis-cluster:': ['cluster', false],
  'rediss-cluster:': ['cluster', true],
};

/**
 * Reads a Redis URL into `{ kind, tls, nodes, db, username, password, service }`. Throws an
 * error that names the problem and never the password.
 */
function parseUrl(text) {
  const bad = (why) =>
    new Error(
      `ISRGATE_REDIS_URL ${why}; write redis://[user:password@]host:port[/db] (rediss:// for TLS; or redis-sentinel://host:port?sentinelServiceName=NAME, redis-cluster://host:port)`,
    );
  let url;
  try {
    url = new URL(text);
  } catch {
    throw bad('is not a URL');
  }
  const scheme = SCHEMES[url.protocol];
  if (!scheme) throw bad(`has the scheme ${JSON.stringify(url.protocol)}`);
  const [kind, useTls] = scheme;
  const defaultPort = kind === 'sentinel' ? 26379 : 6379;
  const node = (host, port) => {
    const n = Number(port || defaultPort);
    if (!host || !Number.isInteger(n) || n < 1 || n > 65535) throw bad(`names the node ${JSON.stringify(`${host}:${port}`)}`);
    return { host: host.replace(/^\[|\]$/g, ''), port: n };
  };
  const nodes = [node(url.hostname, url.port)];
  for (const extra of url.searchParams.getAll('node')) {
    const at = extra.lastIndexOf(':');
    nodes.push(at < 0 ? node(extra, '') : node(extra.slice(0, at), extra.slice(at + 1)));
  }
  const path = url.pathname.replace(/^\//, '');
  const db = path === '' ? 0 : Number(path);
  if (!Number.isInteger(db) || db < 0) throw bad(`has the database ${JSON.stringify(path)}`);
  const service = url.searchParams.get('sentinelServiceName') || undefined;
  if (kind === 'sentinel' && !service) throw bad('is a Sentinel URL without ?sentinelServiceName=');
  return {
    kind,
    tls: useTls,
    nodes,
    db,
    username: url.username ? decodeURIComponent(url.username) : undefined,
    password: url.password ? decodeURIComponent(url.password) : undefined,
    sentinelUsername: url.searchParams.get('sentinelUsername') || undefined,
    sentinelPassword: url.searchParams.get('sentinelPassword') || undefined,
    service,
  };
}

/** A URL with its password replaced, for messages. */
function redactUrl(text) {
  try {
    const url = new URL(text);
    if (url.password) url.password = '***';
    return url.toString();
  } catch {
    return '(not a URL)';
  }
}

function encode(args) {
  const parts = [`*${args.length}\r\n`];
  for (const a of args) {
    const s = String(a);
    parts.push(`$${Buffer.byteLength(s)}\r\n`, s, '\r\n');
  }
  return parts.join('');
}

/** RESP2 replies from a byte stream: `push` bytes, then `next()` until it says `undefined`. */
class Parser {
  constructor() {
    this.buf = Buffer.alloc(0);
  }
  push(chunk) {
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
  }
  next() {
    const r = this.#value(0);
    if (r === undefined) return undefined;
    this.buf = this.buf.subarray(r.end);
    return r;
  }
  #line(at) {
    const end = this.buf.indexOf('\r\n', at);
    return end < 0 ? undefined : { text: this.buf.toString('utf8', at + 1, end), end: end + 2 };
  }
  #value(at) {
    if (at >= this.buf.length) return undefined;
    const type = String.fromCharCode(this.buf[at]);
    const line = this.#line(at);
    if (line === undefined) return undefined;
    switch (type) {
      case '+':
        return { value: line.text, end: line.end };
      case '-':
        return { value: new ReplyError(line.text), end: line.end };
      case ':':
        return { value: Number(line.text), end: line.end };
      case '$': {
        const n = Number(line.text);
        if (n < 0) return { value: null, end: line.end };
        if (this.buf.length < line.end + n + 2) return undefined;
        return { value: this.buf.toString('utf8', line.end, line.end + n), end: line.end + n + 2 };
      }
      case '*': {
        const n = Number(line.text);
        if (n < 0) return { value: null, end: line.end };
        const items = [];
        let end = line.end;
        for (let i = 0; i < n; i++) {
          const item = this.#value(end);
          if (item === undefined) return undefined;
          items.push(item.value);
          end = item.end;
        }
        return { value: items, end };
      }
      default:
        throw new Error(`Redis sent an unknown reply type ${JSON.stringify(type)}`);
    }
  }
}

/** One connection: commands answered in order; `onPush` gets pub/sub messages. */
class Connection {
  constructor(socket) {
    this.socket = socket;
    this.parser = new Parser();
    this.pending = [];
    this.closed = false;
    this.onPush = null;
    this.onClose = null;
    socket.on('data', (chunk) => this.#read(chunk));
    socket.on('error', (e) => this.close(e));
    socket.on('end', () => this.close(new Error('connection closed by Redis')));
    socket.on('close', () => this.close(new Error('connection closed')));
  }

  static open({ host, port }, useTls, timeoutMs) {
    return new Promise((resolve, reject) => {
      const socket = useTls
        ? tls.connect({ host, port, servername: net.isIP(host) ? undefined : host })
        : net.connect({ host, port });
      socket.setNoDelay(true);
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`could not connect to ${host}:${port} within ${timeoutMs} ms`));
      }, timeoutMs);
      socket.once(useTls ? 'secureConnect' : 'connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        // An idle connection does not hold the process open (a pending command's timer does).
        socket.unref();
        resolve(new Connection(socket));
      });
      socket.once('error', (e) => {
        clearTimeout(timer);
        reject(new Error(`could not connect to ${host}:${port}: ${e.message}`));
      });
    });
  }

  /** Sends one command; its reply, or an error after `timeoutMs` (which closes the connection). */
  send(args, timeoutMs) {
    if (this.closed) return Promise.reject(new Error('connection closed'));
    return new Promise((resolve, reject) => {
      const waiter = { resolve, reject, timer: null };
      waiter.timer = setTimeout(() => {
        this.close(new Error(`Redis did not answer ${args[0]} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.push(waiter);
      this.socket.write(encode(args));
    });
  }

  close(error) {
    if (this.closed) return;
    this.closed = true;
    this.socket.destroy();
    for (const w of this.pending.splice(0)) {
      clearTimeout(w.timer);
      w.reject(error);
    }
    if (this.onClose) this.onClose(error);
  }

  #read(chunk) {
    this.parser.push(chunk);
    let r;
    try {
      while ((r = this.parser.next()) !== undefined) {
        const v = r.value;
        if (this.onPush && Array.isArray(v) && v[0] === 'message') {
          this.onPush(v);
          continue;
        }
        const w = this.pending.shift();
        if (!w) continue;
        clearTimeout(w.timer);
        if (v instanceof ReplyError) w.reject(v);
        else w.resolve(v);
      }
    } catch (e) {
      this.close(e);
    }
  }
}

/**
 * Opens a ready connection to the server `target` names (for Sentinel, its current primary):
 * authenticated and on the right database. `node` picks a Cluster node other than the first.
 */
async function connect(target, timeoutMs, node) {
  let address = node || target.nodes[0];
  if (!node && target.kind === 'sentinel') address = await primaryOf(target, timeoutMs);
  const conn = await Connection.open(address, target.tls, timeoutMs);
  try {
    if (target.password) {
      const auth = target.username ? ['AUTH', target.username, target.password] : ['AUTH', target.password];
      await conn.send(auth, timeoutMs);
    }
    if (target.db && target.kind !== 'cluster') await conn.send(['SELECT', target.db], timeoutMs);
    return conn;
  } catch (e) {
    conn.close(e);
    throw e;
  }
}

/** Asks each Sentinel in turn for the primary's address. */
async function primaryOf(target, timeoutMs) {
  let last;
  for (const sentinel of target.nodes) {
    let conn;
    try {
      conn = await Connection.open(sentinel, target.tls, timeoutMs);
      if (target.sentinelPassword) {
        const auth = target.sentinelUsername
          ? ['AUTH', target.sentinelUsername, target.sentinelPassword]
          : ['AUTH', target.sentinelPassword];
        await conn.send(auth, timeoutMs);
      }
      const addr = await conn.send(['SENTINEL', 'get-master-addr-by-name', target.service], timeoutMs);
      if (Array.isArray(addr) && addr.length === 2) return { host: addr[0], port: Number(addr[1]) };
      last = new Error(`Sentinel ${sentinel.host}:${sentinel.port} does not know ${target.service}`);
    } catch (e) {
      last = e;
    } finally {
      if (conn) conn.close(new Error('done'));
    }
  }
  throw last || new Error('no Sentinel answered');
}

/**
 * A client for single commands: one connection, opened when needed, again after a failure.
 * In a Cluster it follows `MOVED` to the node that owns the key.
 */
class Client {
  constructor(target, { timeoutMs = 1000 } = {}) {
    this.target = target;
    this.timeoutMs = timeoutMs;
    this.conn = null;
    this.opening = null;
    this.node = null;
  }

  async command(args) {
    for (let hop = 0; ; hop++) {
      const conn = await this.#connection();
      try {
        return await conn.send(args, this.timeoutMs);
      } catch (e) {
        const moved = e instanceof ReplyError && /^(MOVED|ASK) \d+ (\S+):(\d+)$/.exec(e.message);
        if (!moved || hop >= 3) throw e;
        this.node = { host: moved[2], port: Number(moved[3]) };
        conn.close(new Error('moved'));
      }
    }
  }

  close() {
    if (this.conn) this.conn.close(new Error('client closed'));
  }

  #connection() {
    if (this.conn && !this.conn.closed) return this.conn;
    if (!this.opening) {
      this.opening = connect(this.target, this.timeoutMs, this.node)
        .then((conn) => {
          this.conn = conn;
          return conn;
        })
        .finally(() => {
          this.opening = null;
        });
    }
    return this.opening;
  }
}

module.exports = { parseUrl, redactUrl, connect, Client, Connection, Parser, ReplyError };
