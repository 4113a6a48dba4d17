/**
 * Wraps a Next.js config (an object, or a function of the phase returning one) so that, when
 * `ISRGATE_REDIS_URL` is set, in-app revalidations reach every isrgate gateway and replica and
 * the gateways learn each page's tags. Without `ISRGATE_REDIS_URL` the config is returned as it is.
 *
 * Sets `cacheHandler`; throws if the config already names another cache handler.
 */
export declare function withIsrgate<C>(nextConfig?: C): C;
export default withIsrgate;
