import { readProduct } from "../../../../lib/products";
import { updatePrice } from "../actions";

export const dynamic = "force-dynamic";

export default async function EditProduct({ params }) {
  const { id } = await params;
  const p = readProduct(id);
  return (
    <main>
      <h1>Edit product {id}</h1>
      <form action={updatePrice}>
        <input type="hidden" name="id" value={id} />
        <input name="price" type="number" defaultValue={p.price} />
        <button type="submit">Save</button>
      </form>
    </main>
  );
}
