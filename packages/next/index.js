'use strict';
// `withIsrgate(nextConfig)`: the one line a Next.js app adds behind isrgate gateways. Always: every
// response of the app carries `x-isrgate-build: <build identity>` (the deployment id when set, else
// the BUILD_ID), so a gateway knows which build each replica runs. With ISRGATE_REDIS_URL set (read
// when Next loads the config, `next build` or `next start`), also the cache handler that makes the
// app's revalidations reach every gateway and every replica (README "Revalidating from inside your
// app"); unset, that part is left out, so `next dev` and a plain `next start` cache as before.

const crypto = require('node:crypto');
const { parseUrl } = require('./lib/redis');

const HANDLER = require.resolve('./cache-handler.js');
const BUILD_HEADER = 'x-isrgate-build';
/** The per-process build id: one promise, whichever of `generateBuildId` and `headers` Next calls first. */
const BUILD_ID = Symbol.for('@isrgate/next.buildId');
/** Next's nanoid alphabet: 64 URL-safe characters. */
const ALPHABET = 'useandom-26T198340PX75pxJACKVERYMINDBUSHWOLF_GQZbfghjklqvwyzrict';

function withIsrgate(nextConfig = {}) {
  if (typeof nextConfig === 'function') {
    return async (...args) => configure(await nextConfig(...args));
  }
  if (nextConfig && typeof nextConfig.then === 'function') return nextConfig.then(configure);
  return configure(nextConfig);
}

function configure(config) {
  config = markBuild(config || {});
  const url = process.env.ISRGATE_REDIS_URL;
  if (!url) return config;
  // A wrong URL stops the server at start, with the reason, rather than at the first revalidation.
  parseUrl(url);
  const own = config.cacheHandler;
  if (own && own !== HANDLER) {
    throw new Error(
      `withIsrgate: next.config already sets cacheHandler (${own}); isrgate's handler is Next's own file-system cache plus the fleet link, and cannot be combined with another. Remove cacheHandler, or unset ISRGATE_REDIS_URL to run without isrgate.`,
    );
  }
  if (process.argv.slice(2).includes('start')) {
    // `next start`: join the fleet now rather than at the first request.
    const distDir = require('node:path').resolve(config.distDir || '.next');
    setImmediate(() => require('./cache-handler.js').joinAtStart(distDir));
  }
  return { ...config, cacheHandler: HANDLER };
}

/**
 * The deployment id Next will use: like Next's config loading, `NEXT_DEPLOYMENT_ID` wins over
 * `deploymentId` (it overwrites the config's, 14.2 to 16.x).
 */
function deploymentIdOf(config) {
  return process.env.NEXT_DEPLOYMENT_ID || config.deploymentId || null;
}

/**
 * Adds `x-isrgate-build` to every response through Next's own `headers()` (evaluated by
 * `next build` into routes-manifest.json, which `next start` serves from). Without a deployment
 * id, the value is the BUILD_ID, which `next build` asks `generateBuildId` for in the same
 * process: both go through one memoized promise. A static export (no server) is left alone.
 */
function markBuild(config) {
  const own = config.headers;
  // A static export has no server; a `headers` that is not a function is Next's to refuse.
  if (config.output === 'export' || (own !== undefined && typeof own !== 'function')) return config;
  const deploymentId = deploymentIdOf(config);
  const identity = deploymentId ? async () => deploymentId : () => buildIdOnce(config.generateBuildId);
  const marked = {
    ...config,
    async headers(...args) {
      const theirs = own ? await own.apply(this, args) : [];
      if (!Array.isArray(theirs)) return theirs; // Next reports what is wrong with it.
      const value = await identity();
      return [...theirs, { source: '/:path*', headers: [{ key: BUILD_HEADER, value: String(value) }] }];
    },
  };
  // With a deployment id, Next (16.2+) uses a constant BUILD_ID unless generateBuildId is set:
  // left as the user wrote it.
  if (!deploymentId) marked.generateBuildId = () => buildIdOnce(config.generateBuildId);
  return marked;
}

/**
 * This process's build id: the user's `generateBuildId` (called once), or, when it returns
 * null/undefined or there is none, a random id as Next makes one (21 URL-safe characters, never
 * containing "ad", which ad blockers take for an ad). Trimmed, as Next trims it.
 */
function buildIdOnce(generate) {
  globalThis[BUILD_ID] ??= (async () => {
    const id = typeof generate === 'function' ? await generate() : null;
    if (id === null || id === undefined) return randomId();
    // Not a string: returned as it is, for Next's own "generateBuildId did not return a string".
    return typeof id === 'string' ? id.trim() : id;
  })();
  return globalThis[BUILD_ID];
}

function randomId() {
  for (;;) {
    const id = Array.from(crypto.randomBytes(21), (b) => ALPHABET[b & 63]).join('');
    if (!/ad/i.test(id)) return id;
  }
}

module.exports = { withIsrgate };
module.exports.withIsrgate = withIsrgate;
