import { rendered, replicaId } from "../../lib/renders";

export const dynamic = "force-dynamic";

export default function Dynamic() {
  const n = rendered("/dynamic");
  return (
    <main>
      <p id="render" data-replica={replicaId} data-count={n}>dynamic, {replicaId}, {n}</p>
    </main>
  );
}
