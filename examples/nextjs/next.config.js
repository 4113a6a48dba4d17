// @isrgate/next: with ISRGATE_REDIS_URL set (the fleet's Redis), revalidations made in this app
// reach every isrgate gateway and replica, and the gateways learn each page's tags. Unset, the
// config is unchanged.
const { withIsrgate } = require("@isrgate/next");

/** @type {import('next').NextConfig} */
module.exports = withIsrgate({
  poweredByHeader: false,
  // One build, several replicas: the same id everywhere (isrgate's cache.namespace).
  generateBuildId: async () => process.env.BUILD_ID || "isrgate-example",
});
