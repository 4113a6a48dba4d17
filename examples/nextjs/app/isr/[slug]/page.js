import { rendered, replicaId } from "../../../lib/renders";

export const revalidate = 30;

export function generateStaticParams() {
  return [{ slug: "one" }, { slug: "two" }];
}

export default async function Isr({ params }) {
  const { slug } = await params;
  const n = rendered(`/isr/${slug}`);
  return (
    <main>
      <h1>ISR {slug}</h1>
      <p id="render" data-replica={replicaId} data-count={n}>
        rendered by {replicaId}, render {n}, at {new Date().toISOString()}
      </p>
    </main>
  );
}
