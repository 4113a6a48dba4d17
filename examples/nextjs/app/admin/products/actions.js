"use server";
// A server action that changes a product and revalidates its tag: with @isrgate/next the
// revalidation reaches every gateway and every replica, not only the one that ran the action.
import { revalidateTag } from "next/cache";
import { redirect } from "next/navigation";
import { writeProduct } from "../../../lib/products";

export async function updatePrice(formData) {
  const id = String(formData.get("id"));
  const price = Number(formData.get("price"));
  writeProduct({ id, price });
  revalidateTag(`product-${id}`);
  redirect(`/admin/products/${id}?saved=${price}`);
}
