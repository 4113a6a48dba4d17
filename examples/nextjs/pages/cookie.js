export async function getServerSideProps({ res }) {
  res.setHeader("Set-Cookie", "session=abc; Path=/; HttpOnly");
  return { props: {} };
}

export default function Cookie() {
  return <p>a page that sets a cookie (never cached)</p>;
}
