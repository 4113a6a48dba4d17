import { unstable_cache } from "next/cache";
import { readProduct } from "../../../lib/products";
import { rendered, replicaId } from "../../../lib/renders";

export const revalidate = 3600;

export function generateStaticParams() {
  return [{ id: "1" }];
}

// Next's data cache, tagged: an in-app revalidateTag('product-1') (the server action in
// app/admin) or a webhook {"tags":["product-1"]} reaches this page on every replica and
// gateway through @isrgate/next, with no [tag_rules] and no header of the app's own.
const product = (id) =>
  unstable_cache(async () => readProduct(id), ["product", id], {
    tags: [`product-${id}`, "products"],
  })();

export default async function Tagged({ params }) {
  const { id } = await params;
  const p = await product(id);
  const n = rendered(`/tagged/${id}`);
  return (
    <main>
      <h1>Product {p.id}</h1>
      <p id="render" data-replica={replicaId} data-count={n} data-price={p.price}>
        price {p.price}, rendered by {replicaId}, render {n}
      </p>
    </main>
  );
}
