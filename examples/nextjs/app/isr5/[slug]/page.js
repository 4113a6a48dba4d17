import { rendered, replicaId } from "../../../lib/renders";

// A short revalidate, for measuring renders under mixed traffic. No page is prerendered at
// build time; an empty generateStaticParams still makes each one ISR (rendered on first
// request, then cached), not dynamic.
export const revalidate = 5;

export function generateStaticParams() {
  return [];
}

export default async function Isr5({ params }) {
  const { slug } = await params;
  const n = rendered(`/isr5/${slug}`);
  return (
    <main>
      <h1>ISR 5 s {slug}</h1>
      <p id="render" data-replica={replicaId} data-count={n}>
        rendered by {replicaId}, render {n}, at {new Date().toISOString()}
      </p>
    </main>
  );
}
