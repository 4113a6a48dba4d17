import { allRenders, replicaId } from "../../../lib/renders";

export const dynamic = "force-dynamic";

export function GET() {
  return Response.json({ replica: replicaId, renders: allRenders(), revalidations: globalThis.__isrgateRevalidations ?? [] });
}
