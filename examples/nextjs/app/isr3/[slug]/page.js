import { rendered } from "../../../lib/renders";

// A 3 s revalidate, for the "one render per expiry, never back in time" end-to-end test.
// `/isr3/a` is prerendered by `next build` (its stamp ends in `-build`); other slugs render on
// first request (dynamic params allowed).
export const revalidate = 3;

export function generateStaticParams() {
  return [{ slug: "a" }];
}

// REPLICA_ID is unset during `next build`: the build render says so.
const who = process.env.REPLICA_ID || "build";

// The render identity: wall-clock ms, strictly increasing within this process, plus who
// rendered. Replicas share the machine's clock, so later renders carry larger stamps.
let last = 0;
function stamp() {
  last = Math.max(Date.now(), last + 1);
  return `${last}-${who}`;
}

export default async function Isr3({ params }) {
  const { slug } = await params;
  const n = rendered(`/isr3/${slug}`);
  const s = stamp();
  return (
    <main>
      <h1>ISR 3 s {slug}</h1>
      <p id="render" data-replica={who} data-count={n} data-stamp={s}>
        rendered by {who}, render {n}, stamp {s}
      </p>
    </main>
  );
}
