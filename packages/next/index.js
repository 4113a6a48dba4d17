'use strict';
// `withIsrgate(nextConfig)`: the one line a Next.js app adds so its revalidations reach every
// isrgate gateway and every replica (README "Revalidating from inside your app"). It reads
// ISRGATE_REDIS_URL when Next loads the config (`next build`, `next start`); unset, it returns
// the config unchanged, so `next dev` and a plain `next start` behave as before.

const { parseUrl } = require('./lib/redis');

const HANDLER = require.resolve('./cache-handler.js');

function withIsrgate(nextConfig = {}) {
  if (typeof nextConfig === 'function') {
    return async (...args) => configure(await nextConfig(...args));
  }
  return configure(nextConfig);
}

function configure(config) {
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

module.exports = { withIsrgate };
module.exports.withIsrgate = withIsrgate;
