// Which build this is, as page text: NEXT_PUBLIC_BUILD_LABEL, inlined by `next build` into the
// server's pages and the browser's JavaScript alike ("A" when unset). The rolling-deploy test
// (tests/e2e/rolling_deploy.rs) builds the app twice, A and B, and tells them apart by it.
export const BUILD_LABEL = process.env.NEXT_PUBLIC_BUILD_LABEL || "A";
