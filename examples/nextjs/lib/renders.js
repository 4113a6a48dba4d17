// Which replica rendered a page, and how many times each path was rendered by this process.
const counts = (globalThis.__isrgateRenders ??= new Map());

export const replicaId = process.env.REPLICA_ID || "local";

export function rendered(path) {
  const n = (counts.get(path) || 0) + 1;
  counts.set(path, n);
  return n;
}

export function allRenders() {
  return Object.fromEntries(counts);
}
