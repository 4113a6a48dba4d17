import { unstable_cache } from "next/cache";
import { rendered, replicaId } from "../../../lib/renders";

export const revalidate = 3600;

export function generateStaticParams() {
  return [{ id: "1" }];
}

const product = (id) =>
  unstable_cache(async () => ({ id, price: Math.round(Math.random() * 1000) }), ["product", id], {
    tags: [`product-${id}`, "products"],
  })();

export default async function Tagged({ params }) {
  const { id } = await params;
  const p = await product(id);
  const n = rendered(`/tagged/${id}`);
  return (
    <main>
      <h1>Product {p.id}</h1>
      <p id="render" data-replica={replicaId} data-count={n}>
        price {p.price}, rendered by {replicaId}, render {n}
      </p>
    </main>
  );
}
