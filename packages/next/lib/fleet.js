'use strict';
// This replica's link to the isrgate fleet, one per process (every handler Next constructs, one
// per request, shares it): it records the app's revalidations for every gateway and replica by
// calling the gateways' own Redis function (`isrgate_invalidate_v2`, which every gateway loads;
// the fleet has one implementation of that step; `isrgate_invalidate_v1` where an older
// gateway's library is the one loaded), and hands the revalidations made elsewhere, read from
// the gateways' bus (`isr:bus`), to this replica's cache.
//
// Redis down never stops the app: a revalidation waits for one attempt (bounded by the command
// timeout), then is retried in the background for `retryForMs` and logged as lost after that.

const os = require('node:os');
const { parseUrl, redactUrl, connect, Client, ReplyError } = require('./redis');

const FUNCTION = 'isrgate_invalidate_v2';
/** The same function as gateways from before the index load it (one key). */
const FUNCTION_V1 = 'isrgate_invalidate_v1';
const INV_KEY = 'isr:inv';
/** The records by epoch (a sorted set), written by the function; same Cluster slot as isr:inv. */
const INDEX_KEY = 'isr:{isr:inv}:z';
/** Fields (or index members) asked for per page of isr:inv (HSCAN) or its index. */
const SCAN_PAGE = 10000;
const BUILDS_KEY = 'isr:builds';
/** How often a replica reports its build (the gateways forget one unseen for 5 minutes). */
const REPORT_EVERY_MS = 30000;
/** Builds unseen this long are removed from the hash by whichever replica reports next. */
const FORGET_BUILD_AFTER_MS = 24 * 3600 * 1000;
const CHANNEL = 'isr:bus';
/** Next's own limits (`NEXT_CACHE_TAG_MAX_ITEMS`, `NEXT_CACHE_TAG_MAX_LENGTH`); the gateway's too. */
const MAX_TAGS = 128;
const MAX_TAG_BYTES = 256;
/** More invalidations than this to catch up on at once: everything is treated as invalidated. */
const MAX_CATCH_UP = 10000;

/** A pause; `keepAlive: false` lets the process exit meanwhile (no server, e.g. `next build`). */
const sleep = (ms, keepAlive = true) =>
  new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    if (!keepAlive) t.unref();
  });

/**
 * Tags as the fleet can carry them: strings without whitespace (the bus separates by spaces),
 * at most 256 bytes, at most 128, no duplicates. The others are reported once and skipped.
 */
function cleanTags(tags, warn) {
  const out = [];
  for (const raw of tags) {
    const tag = typeof raw === 'string' ? raw.trim() : '';
    if (tag === '') continue;
    if (/\s/.test(tag) || Buffer.byteLength(tag) > MAX_TAG_BYTES) {
      warn(`[isrgate] tag ${JSON.stringify(tag.slice(0, 80))} cannot reach the fleet (whitespace, or over ${MAX_TAG_BYTES} bytes); it stays local to this replica`);
      continue;
    }
    if (!out.includes(tag)) out.push(tag);
  }
  if (out.length > MAX_TAGS) {
    warn(`[isrgate] ${out.length} tags in one revalidation; the fleet takes the first ${MAX_TAGS}`);
    out.length = MAX_TAGS;
  }
  return out;
}

class Fleet {
  /**
   * `url`: the fleet's Redis (ISRGATE_REDIS_URL). `apply(tags, mode)` is called with every
   * revalidation made by another replica or a gateway; `since()` is the epoch (UNIX ms) from
   * which to catch up on invalidations recorded before this process subscribed.
   */
  constructor(url, { timeoutMs = 1000, retryForMs = 60000, log = console, origin } = {}) {
    this.target = parseUrl(url);
    this.url = redactUrl(url);
    this.timeoutMs = timeoutMs;
    this.retryForMs = retryForMs;
    this.log = log;
    this.client = new Client(this.target, { timeoutMs });
    this.origin = origin || `next:${os.hostname().replace(/\s+/g, '-')}:${process.pid}`;
    this.knownEpoch = 0;
    this.apply = null;
    this.since = () => 0;
    this.subscribed = false;
    this.stopped = false;
    this.background = new Set();
    this.warned = new Set();
    this.listeners = new Set();
  }

  /** Starts following the bus (once); `apply` and `since` as in the constructor. */
  follow(apply, since) {
    if (this.apply) return;
    this.apply = apply;
    if (since) this.since = since;
    this.#track(this.#subscribe());
  }

  /**
   * Records that `tags` are invalidated (`mode` 'soft': stale, served while re-rendered;
   * 'hard': gone) on every gateway and replica. Resolves `true` once Redis recorded it, `false`
   * when it is being retried in the background; never rejects.
   */
  async invalidate(tags, mode) {
    const clean = cleanTags(tags, (m) => this.#warnOnce(m));
    if (clean.length === 0) return true;
    try {
      await this.#call(clean, mode);
      return true;
    } catch (e) {
      this.#track(this.#retry(clean, mode, e));
      return false;
    }
  }

  /**
   * Reports this replica's build in `isr:builds` now and every 30 s, so the gateways know the
   * builds and their `previewModeId` without configuration. `build`: `{ id, build_id, built_ms,
   * deployment_id, next, preview_mode_id }`; `id`, the build's identity (what its responses carry
   * in `x-isrgate-build`), is the hash field, the rest plus `seen_ms` its JSON value. Builds
   * unseen for a day are removed.
   */
  reportBuild(build) {
    if (this.reporting || !build || !build.id) return;
    const write = async () => {
      const value = JSON.stringify({ ...build, id: undefined, seen_ms: Date.now() });
      try {
        await this.client.command(['HSET', BUILDS_KEY, build.id, value]);
        const all = await this.client.command(['HGETALL', BUILDS_KEY]);
        for (let i = 0; i + 1 < all.length; i += 2) {
          let seen = 0;
          try {
            seen = JSON.parse(all[i + 1]).seen_ms || 0;
          } catch {
            // Not ours to read: leave it.
            continue;
          }
          if (seen + FORGET_BUILD_AFTER_MS < Date.now()) await this.client.command(['HDEL', BUILDS_KEY, all[i]]);
        }
      } catch (e) {
        this.#warnOnce(`[isrgate] could not report this replica's build to ${this.url}: ${explain(e)}; retrying`);
      }
    };
    this.#track(write());
    this.reporting = setInterval(write, REPORT_EVERY_MS);
    this.reporting.unref();
  }

  /** Waits for the background work (retries) to end; for tests and shutdown. */
  async settled() {
    while (this.background.size > 0) await Promise.allSettled([...this.background]);
  }

  /** Stops following the bus and retrying. */
  stop() {
    this.stopped = true;
    if (this.reporting) clearInterval(this.reporting);
    this.client.close();
    if (this.subscriber) this.subscriber.close(new Error('stopped'));
  }

  /**
   * Calls `fn` with every bus event: `{ type: 'subscribed', via }` (how the catch-up read what
   * was missed: `'index'` or `'scan'`), `{ type: 'inv', … }`.
   */
  on(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  async #call(tags, mode) {
    const args = [this.origin, mode, CHANNEL, String(this.knownEpoch), ...tags];
    let epoch;
    try {
      epoch = await this.client.command(['FCALL', FUNCTION, '2', INV_KEY, INDEX_KEY, ...args]);
    } catch (e) {
      // An older gateway's library is loaded (during a rolling upgrade): its one name.
      if (!isNotFound(e)) throw e;
      epoch = await this.client.command(['FCALL', FUNCTION_V1, '1', INV_KEY, ...args]);
    }
    this.#observe(Number(epoch));
  }

  async #retry(tags, mode, first) {
    const what = `revalidation of ${tags.join(' ')}`;
    this.log.warn(`[isrgate] could not record the ${what} in ${this.url}: ${explain(first)}; retrying for ${Math.round(this.retryForMs / 1000)} s`);
    const deadline = Date.now() + this.retryForMs;
    let wait = 200;
    for (;;) {
      await sleep(wait);
      if (this.stopped) return;
      try {
        await this.#call(tags, mode);
        this.log.warn(`[isrgate] the ${what} reached the fleet after a retry`);
        return;
      } catch (e) {
        if (Date.now() + wait >= deadline) {
          this.log.error(`[isrgate] LOST the ${what}: ${explain(e)} for ${Math.round(this.retryForMs / 1000)} s; other replicas and the gateways keep their copies until they expire or are purged again`);
          return;
        }
        wait = Math.min(wait * 2, 5000);
      }
    }
  }

  async #subscribe() {
    let caughtUpTo = null;
    let wait = 200;
    while (!this.stopped) {
      let conn;
      try {
        conn = await connect(this.target, this.timeoutMs);
        this.subscriber = conn;
        const closed = new Promise((resolve) => {
          conn.onClose = resolve;
        });
        conn.onPush = (m) => this.#onMessage(m[2]);
        await conn.send(['SUBSCRIBE', CHANNEL], this.timeoutMs);
        // Messages from now on arrive; what was recorded before (while away) is read once.
        const via = await this.#catchUp(caughtUpTo === null ? this.since() : caughtUpTo);
        this.subscribed = true;
        wait = 200;
        this.#emit({ type: 'subscribed', via });
        await closed;
      } catch (e) {
        this.#warnOnce(`[isrgate] cannot follow revalidations on ${this.url}: ${explain(e)}; retrying`);
      }
      if (this.subscribed) caughtUpTo = this.knownEpoch;
      this.subscribed = false;
      if (conn) conn.close(new Error('resubscribing'));
      if (this.stopped) return;
      await sleep(wait, false);
      wait = Math.min(wait * 2, 5000);
    }
  }

  /**
   * Applies the invalidations recorded after epoch `since` (ms), all at once: from the index
   * when it holds every one of them, else from a scan of isr:inv (a page at a time: one HGETALL
   * of a long history is one slow command on a shared Redis).
   */
  async #catchUp(since) {
    const found = (await this.#sinceFromIndex(since)) || (await this.#sinceFromScan(since));
    if (found.n > MAX_CATCH_UP) {
      this.apply(['*'], 'hard');
    } else {
      for (const mode of ['hard', 'soft']) if (found.byMode[mode].length) this.apply(found.byMode[mode], mode);
    }
    return found.via;
  }

  /** Collects a record `field` (`s:<tag>` / `h:<tag>`) at `epoch` if newer than `since`. */
  static #collect(found, field, epoch, since) {
    const mode = field.startsWith('h:') ? 'hard' : field.startsWith('s:') ? 'soft' : null;
    if (!mode || !(epoch > since)) return;
    if (found.n < MAX_CATCH_UP) found.byMode[mode].push(field.slice(2));
    found.n++;
  }

  async #sinceFromScan(since) {
    const found = { via: 'scan', byMode: { soft: [], hard: [] }, n: 0 };
    let cursor = '0';
    do {
      const [next, flat] = await this.client.command(['HSCAN', INV_KEY, cursor, 'COUNT', String(SCAN_PAGE)]);
      cursor = String(next);
      for (let i = 0; i + 1 < flat.length; i += 2) {
        const [field, epoch] = [flat[i], Number(flat[i + 1])];
        if (field === '_epoch') this.#observe(epoch);
        else Fleet.#collect(found, field, epoch, since);
      }
    } while (cursor !== '0');
    return found;
  }

  /**
   * The records after `since` from the index, or `null` when it may miss one (the gateways'
   * src/invalidate/load.rs): a write by an older library since (`_unindexed`, or `_epoch` past
   * `_indexed`), the index trimmed past `since` by a snapshot (`_snapped`), or the index lost
   * (evicted) — it must hold the newest indexed write.
   */
  async #sinceFromIndex(since) {
    const marks = await this.client.command(['HMGET', INV_KEY, '_epoch', '_indexed', '_unindexed', '_snapped']);
    const [counter, indexed, unindexed, snapped] = marks.map((v) => (v === null ? 0 : Number(v)));
    if (![counter, indexed, unindexed, snapped].every(Number.isSafeInteger)) return null;
    const missing = counter > indexed ? Math.max(counter, unindexed) : unindexed;
    if (missing > since || snapped > since) return null;
    const found = { via: 'index', byMode: { soft: [], hard: [] }, n: 0 };
    let [min, count, newest] = [`(${since}`, SCAN_PAGE, 0];
    for (;;) {
      const flat = await this.client.command(['ZRANGEBYSCORE', INDEX_KEY, min, '+inf', 'WITHSCORES', 'LIMIT', '0', String(count)]);
      for (let i = 0; i + 1 < flat.length; i += 2) Fleet.#collect(found, flat[i], Number(flat[i + 1]), since);
      if (flat.length === 0) break;
      const last = flat[flat.length - 1];
      newest = Math.max(newest, Number(last));
      if (flat.length / 2 < count) break;
      // Again from the last score (a member of it may be unread); one score only: a larger page.
      if (last === min) count *= 2;
      min = last;
    }
    const now = await this.client.command(['HGET', INV_KEY, '_snapped']);
    if (Number(now || 0) !== snapped || (indexed > since && newest < indexed)) return null;
    this.#observe(counter);
    return found;
  }

  #onMessage(text) {
    if (typeof text !== 'string' || !text.startsWith('inv ')) return;
    const [, epoch, origin, mode, ...tags] = text.split(' ');
    this.#observe(Number(epoch));
    if (origin === this.origin || (mode !== 'soft' && mode !== 'hard') || tags.length === 0) return;
    try {
      this.apply(tags, mode);
    } catch (e) {
      this.log.error(`[isrgate] could not apply a revalidation from ${origin}: ${e.message}`);
    }
    this.#emit({ type: 'inv', epoch: Number(epoch), origin, mode, tags });
  }

  #observe(epoch) {
    if (Number.isFinite(epoch) && epoch > this.knownEpoch) this.knownEpoch = epoch;
  }

  #track(promise) {
    this.background.add(promise);
    promise.finally(() => this.background.delete(promise)).catch(() => {});
  }

  #emit(event) {
    for (const fn of this.listeners) fn(event);
  }

  #warnOnce(message) {
    if (this.warned.has(message)) return;
    if (this.warned.size > 100) this.warned.clear();
    this.warned.add(message);
    this.log.warn(message);
  }
}

function isNotFound(e) {
  return e instanceof ReplyError && /Function not found/i.test(e.message);
}

function explain(e) {
  if (isNotFound(e)) {
    return 'no isrgate gateway has loaded its function into this Redis yet (start a gateway whose redis.url is this Redis; it needs Redis 7 or Valkey)';
  }
  return e.message;
}

/** The process's fleet link when ISRGATE_REDIS_URL is set, else `null`. */
function fleetFromEnv() {
  const url = process.env.ISRGATE_REDIS_URL;
  if (!url) return null;
  const key = Symbol.for('@isrgate/next.fleet');
  const held = globalThis[key];
  if (held && held.rawUrl === url) return held.fleet;
  const fleet = new Fleet(url);
  globalThis[key] = { rawUrl: url, fleet };
  return fleet;
}

module.exports = { Fleet, fleetFromEnv, cleanTags, FUNCTION, FUNCTION_V1, INV_KEY, INDEX_KEY, CHANNEL, BUILDS_KEY };
