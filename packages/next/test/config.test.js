'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const { withIsrgate } = require('..');
const { pageOfKey } = require('../cache-handler');

const HANDLER = path.join(__dirname, '..', 'cache-handler.js');

function withEnv(url, fn) {
  const old = process.env.ISRGATE_REDIS_URL;
  if (url === undefined) delete process.env.ISRGATE_REDIS_URL;
  else process.env.ISRGATE_REDIS_URL = url;
  try {
    return fn();
  } finally {
    if (old === undefined) delete process.env.ISRGATE_REDIS_URL;
    else process.env.ISRGATE_REDIS_URL = old;
  }
}

test('without ISRGATE_REDIS_URL the config is returned as it is', () => {
  const config = { poweredByHeader: false };
  withEnv(undefined, () => assert.equal(withIsrgate(config), config));
});

test('with it, the cache handler is set and the rest kept', () => {
  withEnv('redis://cache:6379', () => {
    assert.deepEqual(withIsrgate({ poweredByHeader: false, cacheMaxMemorySize: 1 }), {
      poweredByHeader: false,
      cacheMaxMemorySize: 1,
      cacheHandler: HANDLER,
    });
    assert.deepEqual(withIsrgate(), { cacheHandler: HANDLER });
  });
});

test('a config function (next.config phases) is wrapped too', async (t) => {
  const old = process.env.ISRGATE_REDIS_URL;
  process.env.ISRGATE_REDIS_URL = 'redis://cache:6379';
  t.after(() => {
    if (old === undefined) delete process.env.ISRGATE_REDIS_URL;
    else process.env.ISRGATE_REDIS_URL = old;
  });
  const wrapped = withIsrgate(async (phase) => ({ env: { phase } }));
  assert.deepEqual(await wrapped('phase-production-server', {}), {
    env: { phase: 'phase-production-server' },
    cacheHandler: HANDLER,
  });
});

test('conflicts and bad URLs stop the server at start, with the reason', () => {
  withEnv('redis://cache:6379', () => {
    assert.throws(() => withIsrgate({ cacheHandler: '/app/my-handler.js' }), /already sets cacheHandler \(\/app\/my-handler.js\)/);
  });
  withEnv('http://u:pw@cache', () => {
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
