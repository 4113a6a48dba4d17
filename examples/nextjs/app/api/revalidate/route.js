// The endpoint isrgate fans a webhook out to (webhook.replica_path = "/api/revalidate").
import { revalidatePath, revalidateTag } from "next/cache";

export async function POST(request) {
  if (request.headers.get("x-revalidate-secret") !== process.env.REVALIDATE_SECRET) {
    return Response.json({ error: "bad secret" }, { status: 401 });
  }
  const { paths = [], tags = [] } = await request.json();
  for (const p of paths) revalidatePath(p);
  for (const t of tags) revalidateTag(t);
  (globalThis.__isrgateRevalidations ??= []).push({ paths, tags, at: Date.now() });
  return Response.json({ revalidated: true, paths, tags });
}
