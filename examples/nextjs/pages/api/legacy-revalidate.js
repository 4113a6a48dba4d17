// The Pages Router's on-demand revalidation: res.revalidate regenerates the page on this replica,
// and @isrgate/next reports it, so the gateways and the other replicas drop their copies too.
export default async function handler(req, res) {
  if (req.headers["x-revalidate-secret"] !== process.env.REVALIDATE_SECRET) {
    return res.status(401).json({ error: "bad secret" });
  }
  const path = String(req.query.path || "");
  if (!path.startsWith("/legacy/")) return res.status(400).json({ error: "path must be /legacy/…" });
  await res.revalidate(path);
  return res.json({ revalidated: true, path });
}
