/** @type {import('next').NextConfig} */
module.exports = {
  poweredByHeader: false,
  // One build, several replicas: the same id everywhere (isrgate's cache.namespace).
  generateBuildId: async () => process.env.BUILD_ID || "isrgate-example",
  // Tags the gateway can purge by (Next itself never sends its tags from `next start`).
  async headers() {
    return [
      { source: "/tagged/:id", headers: [{ key: "Cache-Tag", value: "product-:id, products" }] },
    ];
  },
};
