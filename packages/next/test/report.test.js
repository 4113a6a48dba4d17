'use strict';
// What a replica reports in `isr:builds`, read from its `.next` as `next build` left it: the field
// is the identity its responses carry in `x-isrgate-build` (routes-manifest.json), against a real
// redis-server.
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const Handler = require('../cache-handler');
const { Fleet, fleetFromEnv } = require('../lib/fleet');
const { RedisServer, until, memoryLog } = require('./support');

// Next's FileSystemCache is not needed to report (the real one runs in tests/e2e).
globalThis[Symbol.for('@isrgate/next.handler')].next = { FileSystemCache: class {}, manifest: null };

const BUILT = new Date(1700000000500);

/** A `.next` as `next build` writes it; returns its server directory. */
function dist(t, { buildId, marked, deploymentId }) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'isrgate-next-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const next = path.join(dir, '.next');
  fs.mkdirSync(path.join(next, 'server'), { recursive: true });
  fs.writeFileSync(path.join(next, 'BUILD_ID'), buildId);
  fs.utimesSync(path.join(next, 'BUILD_ID'), BUILT, BUILT);
  const headers = [{ source: '/a', headers: [{ key: 'x-a', value: '1' }], regex: '^/a$' }];
  if (marked) headers.push({ source: '/:path*', headers: [{ key: 'x-isrgate-build', value: marked }], regex: '^.*$' });
  fs.writeFileSync(path.join(next, 'routes-manifest.json'), JSON.stringify({ version: 3, headers }));
  fs.writeFileSync(path.join(next, 'required-server-files.json'), JSON.stringify({ config: { deploymentId } }));
  fs.writeFileSync(path.join(next, 'prerender-manifest.json'), JSON.stringify({ preview: { previewModeId: 'p1' } }));
  return path.join(next, 'server');
}

function withoutEnv(t, ...names) {
  for (const name of names) {
    const old = process.env[name];
    delete process.env[name];
    t.after(() => {
      if (old !== undefined) process.env[name] = old;
    });
  }
}

test('next start reports the build under the identity its responses carry, with build_id and built_ms', async (t) => {
  withoutEnv(t, 'NEXT_DEPLOYMENT_ID');
  const r = await RedisServer.start();
  t.after(() => r.stop());
  process.env.ISRGATE_REDIS_URL = r.url;
  t.after(() => {
    fleetFromEnv().stop();
    delete process.env.ISRGATE_REDIS_URL;
  });
  const server = dist(t, { buildId: 'dCc4Z2x9\n', marked: 'dCc4Z2x9' });
  Handler.joinAtStart(path.dirname(server));
  await until('reported', async () => (await r.cmd(['HEXISTS', 'isr:builds', 'dCc4Z2x9'])) === 1);
  const { seen_ms: seen, ...got } = JSON.parse(await r.cmd(['HGET', 'isr:builds', 'dCc4Z2x9']));
  assert.deepEqual(got, { build_id: 'dCc4Z2x9', built_ms: 1700000000500, deployment_id: null, next: null, preview_mode_id: 'p1' });
  assert.ok(Math.abs(seen - Date.now()) < 60000);
});

test('the identity: the marked one, else the deployment id, else the BUILD_ID', async (t) => {
  withoutEnv(t, 'NEXT_DEPLOYMENT_ID');
  const cases = [
    // Built with deploymentId (16.2+: constant BUILD_ID): the responses carry the deployment id.
    [{ buildId: 'build-TfctsWXpff2fKS', marked: 'dep-x', deploymentId: 'dep-x' }, 'dep-x'],
    // NEXT_DEPLOYMENT_ID at build only: in the manifest, not in required-server-files.
    [{ buildId: 'b2', marked: 'dep-y' }, 'dep-y'],
    // Built by an older @isrgate/next (no x-isrgate-build rule).
    [{ buildId: 'b3', deploymentId: 'dep-z' }, 'dep-z'],
    [{ buildId: 'b4' }, 'b4'],
  ];
  for (const [layout, identity] of cases) {
    const info = Handler.buildInfo(dist(t, layout));
    assert.equal(info.id, identity, JSON.stringify(layout));
    assert.equal(info.build_id, layout.buildId);
    assert.equal(info.built_ms, 1700000000500);
    assert.equal(info.deployment_id, layout.deploymentId || null);
  }

  // Written under that field; builds unseen for a day (old ones keyed by BUILD_ID too) are pruned.
  const r = await RedisServer.start();
  t.after(() => r.stop());
  await r.cmd(['HSET', 'isr:builds', 'old-build-id', JSON.stringify({ deployment_id: null, seen_ms: Date.now() - 25 * 3600 * 1000 })]);
  const fleet = new Fleet(r.url, { origin: 'next:a:1', timeoutMs: 300, log: memoryLog() });
  t.after(() => fleet.stop());
  fleet.reportBuild(Handler.buildInfo(dist(t, cases[0][0])));
  await fleet.settled();
  assert.deepEqual(await r.cmd(['HKEYS', 'isr:builds']), ['dep-x']);
  assert.equal(JSON.parse(await r.cmd(['HGET', 'isr:builds', 'dep-x'])).build_id, 'build-TfctsWXpff2fKS');
});
