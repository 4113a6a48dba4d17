import { rendered, replicaId } from "../../lib/renders";

export async function getStaticPaths() {
  return { paths: [{ params: { id: "1" } }], fallback: "blocking" };
}

export async function getStaticProps({ params }) {
  const n = rendered(`/legacy/${params.id}`);
  return { props: { id: params.id, replica: replicaId, n }, revalidate: 30 };
}

export default function Legacy({ id, replica, n }) {
  return <p id="render" data-replica={replica} data-count={n}>legacy {id}, {replica}, {n}</p>;
}
