'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const { Fleet, cleanTags, INV_KEY, INDEX_KEY } = require('../lib/fleet');
const { RedisServer, until, memoryLog, LIBRARY_V1 } = require('./support');

/** A replica's fleet link that records what it is told to apply. */
function replica(r, origin, opts = {}) {
  const applied = [];
  const fleet = new Fleet(r.url, { origin, timeoutMs: 300, log: memoryLog(), ...opts });
  fleet.follow((tags, mode) => applied.push({ tags, mode }));
  return { fleet, applied };
}

async function subscribed(fleet) {
  await until('subscribed', () => fleet.subscribed);
}

/** A Redis with the gateways' function, and replicas a and b following its bus. */
async function twoReplicas(t) {
  const r = await RedisServer.start();
  t.after(() => r.stop());
  await r.loadLibrary();
  const a = replica(r, 'next:a:1');
  const b = replica(r, 'next:b:1');
  t.after(() => [a, b].forEach((x) => x.fleet.stop()));
  await Promise.all([subscribed(a.fleet), subscribed(b.fleet)]);
  return { r, a, b };
}

test('a revalidation reaches every other replica, through the gateways\' function', async (t) => {
  const { r, a, b } = await twoReplicas(t);

  assert.equal(await a.fleet.invalidate(['product-1', '_N_T_/isr/one'], 'hard'), true);
  await until('b applied it', () => b.applied.length === 1);
  assert.deepEqual(b.applied[0], { tags: ['product-1', '_N_T_/isr/one'], mode: 'hard' });
  // Recorded as the gateways record a webhook, under the epoch the function chose.
  const epoch = await r.cmd(['HGET', 'isr:inv', 'h:product-1']);
  assert.equal(await r.cmd(['HGET', 'isr:inv', '_epoch']), epoch);
  assert.equal(a.fleet.knownEpoch, Number(epoch));
  // Its own message is not applied again.
  assert.equal(a.applied.length, 0);

  await b.fleet.invalidate(['products'], 'soft');
  await until('a applied the soft one', () => a.applied.length === 1);
  assert.deepEqual(a.applied[0], { tags: ['products'], mode: 'soft' });
});

test('tags the bus cannot carry are skipped and reported, the rest go', () => {
  const warned = [];
  const many = Array.from({ length: 130 }, (_, i) => `t${i}`);
  assert.deepEqual(cleanTags(['a', ' b ', 'has space', '', 'a', 'x'.repeat(257), 7], (m) => warned.push(m)), ['a', 'b']);
  assert.equal(warned.length, 2);
  assert.equal(cleanTags(many, (m) => warned.push(m)).length, 128);
});

test('Redis down: the call returns at once, is retried, and lands when Redis is back', async (t) => {
  const r = await RedisServer.start();
  t.after(() => r.stop());
  await r.loadLibrary();
  const log = memoryLog();
  const fleet = new Fleet(r.url, { origin: 'next:a:1', timeoutMs: 300, retryForMs: 30000, log });
  t.after(() => fleet.stop());
  await r.stop();

  assert.equal(await fleet.invalidate(['product-1'], 'hard'), false, 'not recorded yet');
  assert.match(log.lines[0], /could not record the revalidation of product-1 .*retrying for 30 s/);
  await r.spawn();
  // Redis came back empty: the gateways load their function again when they reconnect.
  await r.loadLibrary();
  await fleet.settled();
  assert.ok(await r.cmd(['HGET', 'isr:inv', 'h:product-1']), 'recorded after the retry');
  assert.match(log.lines.at(-1), /reached the fleet after a retry/);
});

test('a revalidation that cannot be recorded in time is logged as lost', async (t) => {
  const r = await RedisServer.start();
  t.after(() => r.stop());
  const log = memoryLog();
  // No gateway loaded the function into this Redis.
  const fleet = new Fleet(r.url, { origin: 'next:a:1', timeoutMs: 300, retryForMs: 500, log });
  t.after(() => fleet.stop());
  assert.equal(await fleet.invalidate(['product-1'], 'hard'), false);
  await fleet.settled();
  assert.match(log.lines[0], /no isrgate gateway has loaded its function/);
  assert.match(log.lines.at(-1), /^error \[isrgate\] LOST the revalidation of product-1/);
});

test('revalidations missed while the bus was away are applied on reconnect', async (t) => {
  const { r, a, b } = await twoReplicas(t);
  await a.fleet.invalidate(['before'], 'hard');
  await until('b saw the first', () => b.applied.length === 1);

  // b's subscription drops; a revalidates meanwhile.
  await r.cmd(['CLIENT', 'KILL', 'TYPE', 'pubsub']);
  await until('b noticed', () => !b.fleet.subscribed);
  await a.fleet.invalidate(['while-away'], 'soft');
  await until('b back', () => b.fleet.subscribed);
  await until('b caught up', () => b.applied.some((x) => x.tags.includes('while-away')));
  const caught = b.applied.find((x) => x.tags.includes('while-away'));
  assert.equal(caught.mode, 'soft');
  assert.ok(!caught.tags.includes('before'), 'only what was missed');
});

test('a replica reports its build for the gateways, and forgets builds gone for a day', async (t) => {
  const r = await RedisServer.start();
  t.after(() => r.stop());
  await r.cmd(['HSET', 'isr:builds', 'ancient', JSON.stringify({ seen_ms: 1 }), 'other', JSON.stringify({ seen_ms: Date.now() })]);
  const fleet = new Fleet(r.url, { origin: 'next:a:1', timeoutMs: 300, log: memoryLog() });
  t.after(() => fleet.stop());
  fleet.reportBuild({ id: 'd1', build_id: 'b1', built_ms: 1700000000123, deployment_id: 'd1', next: '15.5.28', preview_mode_id: 'abc' });
  await fleet.settled();
  // The field is the identity (what the responses carry in x-isrgate-build).
  assert.equal(await r.cmd(['HEXISTS', 'isr:builds', 'b1']), 0);
  const { seen_ms: seen, ...got } = JSON.parse(await r.cmd(['HGET', 'isr:builds', 'd1']));
  assert.deepEqual(got, { build_id: 'b1', built_ms: 1700000000123, deployment_id: 'd1', next: '15.5.28', preview_mode_id: 'abc' });
  assert.ok(Math.abs(seen - Date.now()) < 60000);
  assert.equal(await r.cmd(['HEXISTS', 'isr:builds', 'ancient']), 0);
  assert.equal(await r.cmd(['HEXISTS', 'isr:builds', 'other']), 1);
});

test('an older gateway\'s library loaded (rolling upgrade): a revalidation lands through its v1', async (t) => {
  const r = await RedisServer.start();
  t.after(() => r.stop());
  await r.loadLibrary(LIBRARY_V1);
  const { fleet } = replica(r, 'next:a:1');
  t.after(() => fleet.stop());
  assert.equal(await fleet.invalidate(['by-v1'], 'hard'), true);
  assert.ok(await r.cmd(['HGET', INV_KEY, 'h:by-v1']));
  assert.equal(await r.cmd(['ZSCORE', INDEX_KEY, 'h:by-v1']), null, 'the old library has no index');

  // Today's library: v2, the record indexed under its epoch.
  await r.loadLibrary();
  assert.equal(await fleet.invalidate(['by-v2'], 'hard'), true);
  const epoch = await r.cmd(['HGET', INV_KEY, 'h:by-v2']);
  assert.equal(await r.cmd(['ZSCORE', INDEX_KEY, 'h:by-v2']), epoch);
  assert.equal(await r.cmd(['HGET', INV_KEY, '_unindexed']), await r.cmd(['HGET', INV_KEY, 'h:by-v1']), 'the v1 write is marked');
});

test('a starting replica catches up from the index when it holds everything, else by scanning', async (t) => {
  const r = await RedisServer.start();
  t.after(() => r.stop());
  await r.loadLibrary();
  const writer = new Fleet(r.url, { origin: 'next:w:1', timeoutMs: 300, log: memoryLog() });
  t.after(() => writer.stop());
  await writer.invalidate(['before-the-build'], 'hard');
  const built = Number(await r.cmd(['HGET', INV_KEY, '_epoch']));
  await writer.invalidate(['after-the-build'], 'soft');

  /** A replica whose build is from `built`: what it applied and how it caught up. */
  const start = async (origin) => {
    const fleet = new Fleet(r.url, { origin, timeoutMs: 300, log: memoryLog() });
    t.after(() => fleet.stop());
    const applied = [];
    let via;
    fleet.on((e) => {
      if (e.type === 'subscribed') via = e.via;
    });
    fleet.follow((tags, mode) => applied.push({ tags, mode }), () => built);
    await until('subscribed', () => fleet.subscribed);
    return { via, applied };
  };

  const fast = await start('next:c:1');
  assert.equal(fast.via, 'index');
  assert.deepEqual(fast.applied, [{ tags: ['after-the-build'], mode: 'soft' }]);

  // A gateway's snapshot newer than the build trimmed the index up to it: scanning.
  await r.cmd(['HSET', INV_KEY, '_snapped', String(built + 1)]);
  assert.equal((await start('next:d:1')).via, 'scan');
  await r.cmd(['HDEL', INV_KEY, '_snapped']);

  // An older gateway's library again, and a write through it: the index misses it.
  await r.loadLibrary(LIBRARY_V1);
  await writer.invalidate(['through-v1'], 'hard');
  const scanned = await start('next:e:1');
  assert.equal(scanned.via, 'scan');
  assert.deepEqual(scanned.applied, [
    { tags: ['through-v1'], mode: 'hard' },
    { tags: ['after-the-build'], mode: 'soft' },
  ]);
  // Pretending the index is complete does not fool it: its newest write is not there.
  await r.cmd(['HSET', INV_KEY, '_indexed', await r.cmd(['HGET', INV_KEY, '_epoch'])]);
  assert.equal((await start('next:f:1')).via, 'scan');
});
