'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const { parseUrl, redactUrl, Client, Parser, ReplyError } = require('../lib/redis');
const { RedisServer } = require('./support');

test('URLs in the gateway format', () => {
  assert.deepEqual(parseUrl('redis://u:p%40ss@cache:6380/2'), {
    kind: 'standalone', tls: false, nodes: [{ host: 'cache', port: 6380 }], db: 2,
    username: 'u', password: 'p@ss', sentinelUsername: undefined, sentinelPassword: undefined, service: undefined,
  });
  assert.equal(parseUrl('rediss://cache').tls, true);
  assert.deepEqual(parseUrl('redis://cache').nodes, [{ host: 'cache', port: 6379 }]);
  const s = parseUrl('redis-sentinel://s1:26380?sentinelServiceName=mymaster&node=s2:26381&node=s3');
  assert.equal(s.kind, 'sentinel');
  assert.equal(s.service, 'mymaster');
  assert.deepEqual(s.nodes, [{ host: 's1', port: 26380 }, { host: 's2', port: 26381 }, { host: 's3', port: 26379 }]);
  const c = parseUrl('rediss-cluster://n1:7000?node=n2:7001');
  assert.equal(c.kind, 'cluster');
  assert.equal(c.tls, true);
  assert.equal(c.nodes.length, 2);
});

test('a wrong URL is refused with the reason, never the password', () => {
  for (const [url, why] of [
    ['http://u:secret@x', /scheme "http:"/],
    ['not a url', /is not a URL/],
    ['redis-sentinel://u:secret@s1:26379/mymaster', /database "mymaster"|sentinelServiceName/],
    ['redis-sentinel://s1:26379', /sentinelServiceName/],
    ['redis://x:99999', /not a URL|node/],
  ]) {
    assert.throws(() => parseUrl(url), (e) => why.test(e.message) && !e.message.includes('secret'), url);
  }
  assert.equal(redactUrl('redis://u:secret@x:1'), 'redis://u:***@x:1');
});

test('replies split anywhere are read whole', () => {
  const bytes = Buffer.from('*3\r\n$7\r\nmessage\r\n$-1\r\n*2\r\n:42\r\n-ERR no\r\n+OK\r\n');
  for (let cut = 0; cut <= bytes.length; cut++) {
    const p = new Parser();
    const got = [];
    for (const part of [bytes.subarray(0, cut), bytes.subarray(cut)]) {
      p.push(part);
      let r;
      while ((r = p.next()) !== undefined) got.push(r.value);
    }
    assert.equal(got.length, 2, `cut at ${cut}`);
    assert.deepEqual(got[0].slice(0, 2), ['message', null]);
    assert.equal(got[0][2][0], 42);
    assert.ok(got[0][2][1] instanceof ReplyError);
    assert.equal(got[1], 'OK');
  }
});

test('every command has a deadline, and the client reconnects after a failure', async (t) => {
  const r = await RedisServer.start();
  t.after(() => r.stop());
  const client = new Client(parseUrl(r.url), { timeoutMs: 300 });
  t.after(() => client.close());
  assert.equal(await client.command(['SET', 'k', 'v']), 'OK');
  assert.equal(await client.command(['GET', 'k']), 'v');
  await assert.rejects(client.command(['NOPE']), ReplyError);

  r.freeze();
  await assert.rejects(client.command(['GET', 'k']), /did not answer GET within 300 ms/);
  r.thaw();
  assert.equal(await client.command(['GET', 'k']), 'v');

  await r.stop();
  await assert.rejects(client.command(['GET', 'k']), /could not connect|closed|ended|did not answer/);
  await r.spawn();
  assert.equal(await client.command(['PING']), 'PONG');
});
