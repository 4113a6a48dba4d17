'use strict';
// The `cacheHandler` that `withIsrgate` installs. It is Next's own FileSystemCache (the memory
// LRU bounded by `cacheMaxMemorySize`, the build's prerendered pages, the disk), with four
// additions, so nothing about how a replica caches changes except what the fleet needs:
//
// 1. `revalidateTag` (what revalidateTag / updateTag / revalidatePath / unstable_expire* turn
//    into, with Next 16's profile as `durations`) also records the tags for the whole fleet.
// 2. A page regenerated on demand by `res.revalidate(path)` (Next's in-process request with
//    `x-prerender-revalidate: <previewModeId>`) records `path:<path>` for the fleet; the
//    gateways' own refreshes say `x-isrgate-refresh` and are not reported back.
// 3. Revalidations made elsewhere (another replica, a gateway's webhook) drop this replica's
//    copies as Next's own immediate expiration would: Next's tags manifest for App Router
//    pages, route handlers and the data cache, a bounded map of paths for Pages Router pages.
// 4. Each page entry carries its tags in `x-isrgate-tags`, a header the gateway reads into its
//    entry (`cache.tag_headers`) and never passes to clients: a webhook or an in-app
//    revalidateTag('product-1') reaches the gateway's copy without `[tag_rules]`.
// 5. A page answered from this cache says how old it is, in ms, in `x-isrgate-age-ms` (Next
//    sends the full `s-maxage` whatever the copy's age): the gateway dates the copy at its
//    render, so it is fresh no longer than here and never stored over a newer render.
//
// Next constructs one handler per request; the process-wide state lives in `state` below.

const fs = require('node:fs');
const path = require('node:path');
const { createRequire } = require('node:module');
const { fleetFromEnv } = require('./lib/fleet');

const NEXT_TAGS = 'x-next-cache-tags';
const REPORTED_TAGS = 'x-isrgate-tags';
const REPORTED_AGE = 'x-isrgate-age-ms';
const PRERENDER_REVALIDATE = 'x-prerender-revalidate';
const GATEWAY_REFRESH = 'x-isrgate-refresh';
const BUILD_PHASE = 'phase-production-build';
/** Value kinds of whole pages and route handlers (15+; 14.x stores App pages as PAGE too). */
const PAGE_KINDS = new Set(['APP_PAGE', 'APP_ROUTE', 'PAGES', 'PAGE', 'ROUTE']);
/** Pages Router entries, which carry no tags: reached through `state.paths`. */
const PAGES_KINDS = new Set(['PAGES', 'PAGE']);
/** Paths remembered as invalidated; past this the oldest is folded into `state.floorAt`. */
const MAX_PATHS = 10000;
/**
 * Tags in Next's own manifest (one per tag ever revalidated, in this process or anywhere in the
 * fleet); past this it is folded into one "everything revalidated now", so it never grows
 * without bound (each page renders once more instead).
 */
const MAX_MANIFEST_TAGS = 50000;

const state = (globalThis[Symbol.for('@isrgate/next.handler')] ??= {
  next: null,
  local: null,
  previewModeId: undefined,
  paths: new Map(),
  floorAt: 0,
  // Tags for Next's manifest received before the first handler existed (see `joinAtStart`).
  pending: [],
});

/** Next's FileSystemCache and tags manifest, from the `next` this app runs. */
function nextInternals(serverDistDir) {
  if (state.next) return state.next;
  const base = serverDistDir ? path.join(serverDistDir, 'isrgate.js') : path.join(process.cwd(), 'isrgate.js');
  const load = createRequire(base);
  const fsCache = load('next/dist/server/lib/incremental-cache/file-system-cache.js');
  let manifest = null;
  try {
    // 15.x/16.x: one Map per process, shared with Next's `'use cache'` handler.
    manifest = load('next/dist/server/lib/incremental-cache/tags-manifest.external.js').tagsManifest;
  } catch {
    // 14.x keeps its manifest inside the FileSystemCache instance.
  }
  state.next = { FileSystemCache: fsCache.default || fsCache, manifest };
  return state.next;
}

/** The build's `previewModeId` (what `res.revalidate` sends), read once; never logged. */
function previewModeId(serverDistDir) {
  if (state.previewModeId === undefined) {
    state.previewModeId = null;
    try {
      const manifest = JSON.parse(fs.readFileSync(path.join(serverDistDir, '..', 'prerender-manifest.json'), 'utf8'));
      state.previewModeId = manifest?.preview?.previewModeId || null;
    } catch {
      // No manifest (dev): no on-demand revalidation to report.
    }
  }
  return state.previewModeId;
}

/**
 * This build as the gateways read it from `isr:builds`: `id`, its identity (the field), is the
 * `x-isrgate-build` value its responses carry, as `next build` wrote it into routes-manifest.json
 * (`withIsrgate`); a build made without it is named by its deployment id, else its BUILD_ID.
 */
function buildInfo(serverDistDir) {
  const dist = path.join(serverDistDir, '..');
  const read = (file) => {
    try {
      return fs.readFileSync(path.join(dist, file), 'utf8');
    } catch {
      return null;
    }
  };
  const buildId = (read('BUILD_ID') || '').trim();
  let deploymentId = process.env.NEXT_DEPLOYMENT_ID || null;
  try {
    deploymentId = deploymentId || JSON.parse(read('required-server-files.json')).config.deploymentId || null;
  } catch {
    // Older layouts: no deployment id.
  }
  let next = null;
  try {
    next = createRequire(path.join(serverDistDir, 'isrgate.js'))('next/package.json').version;
  } catch {
    // Unknown version: reported as null.
  }
  const built = builtAt(serverDistDir);
  return {
    id: markedIdentity(read('routes-manifest.json')) || deploymentId || buildId,
    build_id: buildId,
    built_ms: built ? Math.floor(built) : null,
    deployment_id: deploymentId,
    next,
    preview_mode_id: previewModeId(serverDistDir),
  };
}

/** The `x-isrgate-build` value of the build's header rules (the last one, as Next applies them). */
function markedIdentity(routesManifest) {
  let found = null;
  try {
    for (const rule of JSON.parse(routesManifest).headers || []) {
      for (const h of rule.headers || []) {
        if (typeof h.key === 'string' && h.key.toLowerCase() === 'x-isrgate-build' && typeof h.value === 'string' && h.value) found = h.value;
      }
    }
  } catch {
    // No manifest (dev) or another layout: not marked.
  }
  return found;
}

/** When this build was made (UNIX ms): invalidations older than that cannot concern its pages. */
function builtAt(serverDistDir) {
  try {
    return fs.statSync(path.join(serverDistDir, '..', 'BUILD_ID')).mtimeMs;
  } catch {
    return 0;
  }
}

/** The page path of an incremental-cache key (`/route-cache/<KIND>/<hash>/$/blog/a` on 15.5+/16, the path itself before); `null` for data-cache keys. */
function pageOfKey(key) {
  if (typeof key !== 'string' || !key.startsWith('/')) return null;
  let page = key;
  if (key.startsWith('/route-cache/')) {
    const at = key.indexOf('/$/');
    if (at < 0) return null;
    page = key.slice(at + 2);
  }
  if (page === '/index') return '/';
  return page.length > 1 && page.endsWith('/') ? page.slice(0, -1) : page;
}

/**
 * Applies a revalidation made elsewhere to this replica's cache. Soft or hard, the replica's
 * copy is dropped (Next's immediate expiration): the gateways in front serve their stale copy
 * while they refresh a soft one, and that refresh must get a new render, not this replica's old
 * copy served stale.
 */
function applyFromFleet(tags) {
  const now = Date.now();
  const nextTags = [];
  for (const tag of tags) {
    if (tag === '*') {
      state.floorAt = now;
      nextTags.push('_N_T_/layout');
    } else if (tag.startsWith('path:')) {
      const page = tag.slice('path:'.length);
      rememberPath(page, now);
      nextTags.push(`_N_T_${page}`);
    } else {
      nextTags.push(tag);
    }
  }
  if (state.local) {
    markTags(state.local, nextTags, undefined);
  } else if (state.pending.length + nextTags.length <= MAX_PATHS) {
    state.pending.push(...nextTags);
  } else {
    state.pending = ['_N_T_/layout'];
  }
}

function rememberPath(page, at) {
  state.paths.delete(page);
  state.paths.set(page, at);
  if (state.paths.size > MAX_PATHS) {
    const [oldest, when] = state.paths.entries().next().value;
    state.paths.delete(oldest);
    // Conservative: a page older than a forgotten invalidation counts as invalidated.
    state.floorAt = Math.max(state.floorAt, when);
  }
}

/**
 * Marks `tags` revalidated in Next's own manifest, as Next does for a local call. On 15.x
 * FileSystemCache only records a tag's first revalidation; the time is moved forward here so a
 * second revalidateTag of the same tag works too.
 */
function markTags(fsCache, tags, durations) {
  const { manifest } = state.next || {};
  if (manifest && manifest.size + tags.length > MAX_MANIFEST_TAGS) {
    manifest.clear();
    state.floorAt = Date.now();
    tags = ['_N_T_/layout'];
    durations = undefined;
  }
  const done = fsCache.revalidateTag(tags, durations);
  if (manifest) {
    const now = Date.now();
    for (const tag of tags) if (typeof manifest.get(tag) === 'number') manifest.set(tag, now);
  }
  return done;
}

/** Whether a Pages Router entry was invalidated by path (or by a purge of everything) after it was made. */
function invalidatedByPath(key, entry) {
  if (!entry || !entry.value || !PAGES_KINDS.has(entry.value.kind)) return false;
  const page = pageOfKey(key);
  const at = Math.max(state.floorAt, (page && state.paths.get(page)) || 0);
  return at > 0 && (entry.lastModified || 0) <= at;
}

/**
 * Follows the fleet's revalidations and reports the build (once per process). Best effort: a
 * failure here is logged, never thrown into `next start` or a request.
 */
function join(fleet, serverDistDir) {
  try {
    fleet.follow(applyFromFleet, () => builtAt(serverDistDir));
    fleet.reportBuild(buildInfo(serverDistDir));
  } catch (e) {
    if (!state.joinFailed) console.warn(`[isrgate] could not join the fleet: ${e && e.message}`);
    state.joinFailed = true;
  }
}

/**
 * Joins the fleet as `next start` loads the config, before the first request constructs a
 * handler, so the gateways know the build at once. Best effort: the first handler does it
 * otherwise.
 */
function joinAtStart(distDir) {
  const fleet = fleetFromEnv();
  const serverDistDir = path.join(distDir, 'server');
  if (!fleet || !fs.existsSync(path.join(distDir, 'BUILD_ID'))) return;
  try {
    nextInternals(serverDistDir);
  } catch {
    return;
  }
  join(fleet, serverDistDir);
}

/** Copies a page's tags into the header the gateway reads (Next sends its own only on Vercel). */
function reportTags(value) {
  const headers = value && value.headers;
  if (headers && typeof headers[NEXT_TAGS] === 'string' && headers[REPORTED_TAGS] === undefined) {
    headers[REPORTED_TAGS] = headers[NEXT_TAGS];
  }
}

/**
 * Says in the page's headers how long ago (ms) the copy `entry` was rendered. Next sends the
 * headers of the value it answers with, and builds them afresh for each render.
 */
function reportAge(entry) {
  const headers = entry.value && entry.value.headers;
  if (headers && typeof entry.lastModified === 'number' && entry.lastModified > 0) {
    headers[REPORTED_AGE] = String(Math.max(0, Date.now() - Math.floor(entry.lastModified)));
  }
}

class IsrgateCacheHandler {
  constructor(ctx) {
    const { FileSystemCache } = nextInternals(ctx.serverDistDir);
    this.inner = new FileSystemCache(ctx);
    // `next build` (prerendering) is not a replica: it neither follows nor reports to the fleet,
    // so a build made with ISRGATE_REDIS_URL set is never announced before it serves.
    this.fleet = process.env.NEXT_PHASE === BUILD_PHASE ? null : fleetFromEnv();
    if (!state.local) {
      state.local = this.inner;
      if (state.pending.length) markTags(this.inner, state.pending.splice(0), undefined);
    }
    if (this.fleet && !ctx.dev) join(this.fleet, ctx.serverDistDir);
    const headers = ctx._requestHeaders || {};
    const id = headers[PRERENDER_REVALIDATE] && previewModeId(ctx.serverDistDir);
    this.onDemand = Boolean(id) && headers[PRERENDER_REVALIDATE] === id && !headers[GATEWAY_REFRESH];
  }

  async get(key, ctx) {
    const entry = await this.inner.get(key, ctx);
    if (invalidatedByPath(key, entry)) return null;
    if (entry) {
      // Pages prerendered by `next build` were stored without the header.
      reportTags(entry.value);
      reportAge(entry);
    }
    return entry;
  }

  async set(key, data, ctx) {
    // Next sends the headers of the value it stores with the response it renders it for: a
    // render, not a copy, so no age.
    reportTags(data);
    if (data && data.headers) delete data.headers[REPORTED_AGE];
    await this.inner.set(key, data, ctx);
    if (this.onDemand && this.fleet && data && PAGE_KINDS.has(data.kind)) {
      const page = pageOfKey(key);
      if (page) await this.fleet.invalidate([`path:${page}`], 'hard');
    }
  }

  async revalidateTag(tags, durations) {
    const list = (Array.isArray(tags) ? tags : [tags]).filter((t) => typeof t === 'string');
    await markTags(this.inner, list, durations);
    // Next 16: a profile with an expiry marks stale (SWR); none, or `expire: 0`, expires now.
    const mode = durations && durations.expire !== 0 ? 'soft' : 'hard';
    if (this.fleet) await this.fleet.invalidate(list, mode);
  }

  resetRequestCache() {
    if (this.inner.resetRequestCache) this.inner.resetRequestCache();
  }
}

module.exports = IsrgateCacheHandler;
module.exports.default = IsrgateCacheHandler;
module.exports.pageOfKey = pageOfKey;
module.exports.applyFromFleet = applyFromFleet;
module.exports.joinAtStart = joinAtStart;
module.exports.buildInfo = buildInfo;
