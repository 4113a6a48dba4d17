'use strict';
// The handler's own bookkeeping, bounded: Next's FileSystemCache is replaced by a stand-in that
// records what it is asked (the real one runs in the end-to-end tests, tests/e2e).
const test = require('node:test');
const assert = require('node:assert/strict');

const Handler = require('../cache-handler');

const state = globalThis[Symbol.for('@isrgate/next.handler')];
const revalidated = [];
const entries = new Map();
class StandIn {
  async get(key) {
    return entries.get(key) || null;
  }
  async set(key, data) {
    entries.set(key, { lastModified: Date.now(), value: data });
  }
  async revalidateTag(tags) {
    revalidated.push(...tags);
    for (const tag of tags) if (!manifest.has(tag)) manifest.set(tag, Date.now());
  }
}
const manifest = new Map();
state.next = { FileSystemCache: StandIn, manifest };

test('a path purged elsewhere drops a Pages Router copy made before it, not one made after', async () => {
  const h = new Handler({ serverDistDir: '/nowhere/.next/server' });
  const key = '/route-cache/PAGES/abc/$/legacy/1';
  entries.set(key, { lastModified: Date.now() - 1000, value: { kind: 'PAGES', html: 'old' } });
  Handler.applyFromFleet(['path:/legacy/1'], 'soft');
  assert.equal(await h.get(key, { kind: 'PAGES' }), null);
  assert.ok(revalidated.includes('_N_T_/legacy/1'), 'App Router pages of the path too');
  await new Promise((r) => setTimeout(r, 5));
  await h.set(key, { kind: 'PAGES', html: 'new', headers: {} }, {});
  assert.equal((await h.get(key, { kind: 'PAGES' })).value.html, 'new');
});

test('a second revalidation of the same tag counts (Next 15 keeps only the first)', async () => {
  const h = new Handler({ serverDistDir: '/nowhere/.next/server' });
  await h.revalidateTag('product-9');
  const first = manifest.get('product-9');
  await new Promise((r) => setTimeout(r, 5));
  await h.revalidateTag(['product-9']);
  assert.ok(manifest.get('product-9') > first);
});

test('tags reach the gateway in x-isrgate-tags, on new and on prerendered entries', async () => {
  const h = new Handler({ serverDistDir: '/nowhere/.next/server' });
  const value = { kind: 'APP_PAGE', headers: { 'x-next-cache-tags': '_N_T_/tagged/1,product-1' } };
  await h.set('/tagged/1', value, {});
  assert.equal(value.headers['x-isrgate-tags'], '_N_T_/tagged/1,product-1');
  entries.set('/built', { lastModified: 1, value: { kind: 'APP_PAGE', headers: { 'x-next-cache-tags': 't' } } });
  assert.equal((await h.get('/built', { kind: 'APP_PAGE' })).value.headers['x-isrgate-tags'], 't');
});

test('a copy from the cache says its age in x-isrgate-age-ms; a render says none', async () => {
  const h = new Handler({ serverDistDir: '/nowhere/.next/server' });
  const made = Date.now() - 20000;
  entries.set('/aged', { lastModified: made, value: { kind: 'APP_PAGE', headers: {} } });
  const age = Number((await h.get('/aged', { kind: 'APP_PAGE' })).value.headers['x-isrgate-age-ms']);
  assert.ok(age >= 20000 && age < 20000 + 60000, `age ${age}`);

  const value = { kind: 'APP_PAGE', headers: { 'x-isrgate-age-ms': '5' } };
  await h.set('/aged', value, {});
  assert.equal(value.headers['x-isrgate-age-ms'], undefined);
  entries.set('/undated', { lastModified: -1, value: { kind: 'APP_PAGE', headers: {} } });
  assert.equal((await h.get('/undated', { kind: 'APP_PAGE' })).value.headers['x-isrgate-age-ms'], undefined);
});

test('remembered paths and Next\'s manifest stay bounded; what is forgotten counts as purged', async () => {
  const h = new Handler({ serverDistDir: '/nowhere/.next/server' });
  for (let i = 0; i < 10050; i++) Handler.applyFromFleet([`path:/p/${i}`], 'hard');
  assert.equal(state.paths.size, 10000);
  assert.ok(state.floorAt > 0);
  const old = '/route-cache/PAGES/abc/$/p/0';
  entries.set(old, { lastModified: state.floorAt - 1, value: { kind: 'PAGES' } });
  assert.equal(await h.get(old, { kind: 'PAGES' }), null, 'a forgotten path is still purged');

  for (let i = manifest.size; i < 50000; i++) manifest.set(`t${i}`, 1);
  Handler.applyFromFleet(['one-more'], 'hard');
  assert.deepEqual([...manifest.keys()], ['_N_T_/layout'], 'folded into everything-revalidated-now');
});

test('during next build the handler stays off the fleet', (t) => {
  const old = { url: process.env.ISRGATE_REDIS_URL, phase: process.env.NEXT_PHASE };
  process.env.ISRGATE_REDIS_URL = 'redis://127.0.0.1:1';
  process.env.NEXT_PHASE = 'phase-production-build';
  t.after(() => {
    for (const [k, v] of [['ISRGATE_REDIS_URL', old.url], ['NEXT_PHASE', old.phase]]) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  });
  assert.equal(new Handler({ serverDistDir: '/nowhere/.next/server' }).fleet, null);
});
