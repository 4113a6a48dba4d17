'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const { withIsrgate } = require('..');
const { pageOfKey } = require('../cache-handler');

const HANDLER = path.join(__dirname, '..', 'cache-handler.js');

/** Runs `fn` (sync or async) with these environment variables (`undefined`: unset), then restores them. */
async function withEnv(vars, fn) {
  const old = {};
  for (const [k, v] of Object.entries(vars)) {
    old[k] = process.env[k];
    if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  }
  try {
    return await fn();
  } finally {
    for (const [k, v] of Object.entries(old)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
}

const NO_ENV = { ISRGATE_REDIS_URL: undefined, NEXT_DEPLOYMENT_ID: undefined };
const BUILD_ID = Symbol.for('@isrgate/next.buildId');

/** A fresh process as far as the build id goes (Next builds once per process). */
function newProcess() {
  delete globalThis[BUILD_ID];
}

/** The `x-isrgate-build` rule a config's headers() ends with, and the rest. */
async function headersOf(config) {
  const all = await config.headers();
  const ours = all.at(-1);
  assert.equal(ours.source, '/:path*');
  assert.equal(ours.headers.length, 1);
  assert.equal(ours.headers[0].key, 'x-isrgate-build');
  return { value: ours.headers[0].value, theirs: all.slice(0, -1) };
}

test('without ISRGATE_REDIS_URL: no cache handler, the rest kept, responses still marked', () =>
  withEnv(NO_ENV, async () => {
    newProcess();
    const config = withIsrgate({ poweredByHeader: false });
    assert.equal(config.poweredByHeader, false);
    assert.equal(config.cacheHandler, undefined);
    const { value } = await headersOf(config);
    assert.equal(value, await config.generateBuildId());
  }));

test('with it, the cache handler is set and the rest kept', () =>
  withEnv({ ...NO_ENV, ISRGATE_REDIS_URL: 'redis://cache:6379' }, async () => {
    const config = withIsrgate({ poweredByHeader: false, cacheMaxMemorySize: 1 });
    assert.equal(config.cacheHandler, HANDLER);
    assert.equal(config.poweredByHeader, false);
    assert.equal(config.cacheMaxMemorySize, 1);
    assert.equal(withIsrgate().cacheHandler, HANDLER);
    await headersOf(config);
  }));

test('a config function (next.config phases) is wrapped too, with or without the fleet', async () => {
  for (const url of [undefined, 'redis://cache:6379']) {
    await withEnv({ ...NO_ENV, ISRGATE_REDIS_URL: url }, async () => {
      newProcess();
      const wrapped = withIsrgate(async (phase) => ({ env: { phase }, generateBuildId: () => `b-${phase}` }));
      const config = await wrapped('phase-production-build', {});
      assert.deepEqual(config.env, { phase: 'phase-production-build' });
      assert.equal(config.cacheHandler, url ? HANDLER : undefined);
      assert.equal(await config.generateBuildId(), 'b-phase-production-build');
      assert.equal((await headersOf(config)).value, 'b-phase-production-build');
    });
  }
});

test('a config promise is wrapped too', () =>
  withEnv(NO_ENV, async () => {
    newProcess();
    const config = await withIsrgate(Promise.resolve({ generateBuildId: () => 'p1' }));
    assert.equal((await headersOf(config)).value, 'p1');
  }));

test("the user's headers are kept, the build's rule comes last", () =>
  withEnv(NO_ENV, async () => {
    newProcess();
    const theirs = [{ source: '/a', headers: [{ key: 'x-a', value: '1' }] }];
    const config = withIsrgate({
      generateBuildId: async () => 'b1',
      marker: 'this',
      async headers() {
        assert.equal(this.marker, 'this', 'called on their config');
        return theirs;
      },
    });
    assert.deepEqual(await headersOf(config), { value: 'b1', theirs });
  }));

test("the user's build id is kept (trimmed, as Next trims it) and generated once", () =>
  withEnv(NO_ENV, async () => {
    newProcess();
    let calls = 0;
    const config = withIsrgate({ generateBuildId: async () => (calls++, ' from-git-abc123 ') });
    assert.equal(await config.generateBuildId(), 'from-git-abc123');
    assert.equal((await headersOf(config)).value, 'from-git-abc123');
    assert.equal(await config.generateBuildId(), 'from-git-abc123');
    assert.equal(calls, 1);
  }));

test("a random id, like Next's own, when there is none or it returns null/undefined", async () => {
  for (const generateBuildId of [undefined, () => null, async () => undefined]) {
    await withEnv(NO_ENV, async () => {
      newProcess();
      const config = withIsrgate({ generateBuildId });
      const id = await config.generateBuildId();
      assert.match(id, /^[A-Za-z0-9_-]{21}$/);
      assert.doesNotMatch(id, /ad/i, 'ad blockers');
      assert.equal((await headersOf(config)).value, id);
    });
  }
  newProcess();
  const a = await withIsrgate({}).generateBuildId();
  newProcess();
  assert.notEqual(await withIsrgate({}).generateBuildId(), a, 'one per build');
});

test('headers() and generateBuildId agree whatever order Next calls them in, and across config loads', () =>
  withEnv(NO_ENV, async () => {
    newProcess();
    const first = withIsrgate({});
    const header = (await headersOf(first)).value;
    assert.equal(await first.generateBuildId(), header);
    // Next loads next.config more than once in one process: the same id from every load.
    assert.equal(await withIsrgate({}).generateBuildId(), header);

    newProcess();
    const second = withIsrgate({});
    const [id, h] = await Promise.all([second.generateBuildId(), headersOf(second)]);
    assert.equal(h.value, id);
    assert.notEqual(id, header);
  }));

test('with a deployment id the responses carry it, and generateBuildId is left alone', async () => {
  await withEnv(NO_ENV, async () => {
    newProcess();
    const config = withIsrgate({ deploymentId: 'dep-1' });
    assert.equal((await headersOf(config)).value, 'dep-1');
    assert.equal('generateBuildId' in config, false, 'Next 16.2+ then uses its constant BUILD_ID');
    const own = () => 'b7';
    assert.equal(withIsrgate({ deploymentId: 'dep-1', generateBuildId: own }).generateBuildId, own);
  });
  // NEXT_DEPLOYMENT_ID, as Next does, wins over the config's.
  await withEnv({ ...NO_ENV, NEXT_DEPLOYMENT_ID: 'dep-x' }, async () => {
    for (const config of [withIsrgate({}), withIsrgate({ deploymentId: 'dep-1' })]) {
      assert.equal((await headersOf(config)).value, 'dep-x');
      assert.equal(config.generateBuildId, undefined);
    }
  });
  assert.equal(globalThis[BUILD_ID], undefined, 'no build id generated');
});

test('a static export (no server) is left unmarked', () =>
  withEnv(NO_ENV, () => {
    const config = { output: 'export' };
    assert.equal(withIsrgate(config), config);
  }));

test('conflicts and bad URLs stop the server at start, with the reason', async () => {
  await withEnv({ ISRGATE_REDIS_URL: 'redis://cache:6379' }, () => {
    assert.throws(() => withIsrgate({ cacheHandler: '/app/my-handler.js' }), /already sets cacheHandler \(\/app\/my-handler.js\)/);
  });
  await withEnv({ ISRGATE_REDIS_URL: 'http://u:pw@cache' }, () => {
    assert.throws(() => withIsrgate({}), (e) => /ISRGATE_REDIS_URL has the scheme "http:"/.test(e.message) && !e.message.includes('pw'));
  });
});

test('ESM import gives the same function', async () => {
  const esm = await import('../index.mjs');
  assert.equal(esm.withIsrgate, withIsrgate);
  assert.equal(esm.default, withIsrgate);
});

test('page paths from Next incremental-cache keys', () => {
  for (const [key, page] of [
    ['/route-cache/PAGES/2c1f/$/legacy/1', '/legacy/1'],
    ['/route-cache/APP_PAGE/ab12/$/index', '/'],
    ['/legacy/1', '/legacy/1'],
    ['/index', '/'],
    ['/blog/', '/blog'],
    ['/', '/'],
    ['0f3a9c', null],
    ['/route-cache/APP_PAGE/ab12', null],
  ]) {
    assert.equal(pageOfKey(key), page, key);
  }
});
