/**
 * Wraps a Next.js config (an object, a promise of one, or a function of the phase returning one)
 * for an app behind isrgate gateways.
 *
 * Always (whether or not `ISRGATE_REDIS_URL` is set): every response carries
 * `x-isrgate-build: <identity>`, the deployment id when set (`NEXT_DEPLOYMENT_ID`, else
 * `deploymentId`), else the BUILD_ID. It appends a `/:path*` rule to the config's `headers()`
 * (the app's own rules are kept) and, without a deployment id, wraps `generateBuildId` (the
 * app's, else a random id as Next makes one) so the header and the BUILD_ID agree. A static
 * export (`output: 'export'`) is returned as it is.
 *
 * With `ISRGATE_REDIS_URL` set: in-app revalidations reach every isrgate gateway and replica
 * and the gateways learn each page's tags and each build. Sets `cacheHandler`; throws if the
 * config already names another cache handler.
 */
export declare function withIsrgate<C>(nextConfig?: C): C;
export default withIsrgate;
