import { rendered, replicaId } from "../../lib/renders";

// A page the size and shape of a real storefront listing (about 60 KB of HTML with its RSC
// payload): what `benches/nextjs.sh` measures bytes at rest on, next to the tiny test pages.
export const revalidate = 60;

const ADJECTIVES = ["Classic", "Organic", "Recycled", "Handmade", "Lightweight", "Everyday", "Premium", "Compact"];
const NOUNS = ["Backpack", "Water Bottle", "Desk Lamp", "Notebook", "Coffee Mug", "Running Shoe", "Rain Jacket", "Headphones"];
const COLORS = ["Slate", "Sand", "Forest", "Ocean", "Charcoal", "Sunset"];

// Deterministic data (a linear congruential generator): every replica renders the same page.
function products(count) {
  let seed = 42;
  const next = (n) => {
    seed = (seed * 1103515245 + 12345) % 2147483648;
    return seed % n;
  };
  return Array.from({ length: count }, (_, i) => {
    const name = `${ADJECTIVES[next(ADJECTIVES.length)]} ${NOUNS[next(NOUNS.length)]}`;
    return {
      id: 1000 + i,
      name,
      slug: `${name.toLowerCase().replace(/ /g, "-")}-${1000 + i}`,
      price: (9 + next(190) + next(100) / 100).toFixed(2),
      rating: (3 + next(20) / 10).toFixed(1),
      reviews: 5 + next(900),
      colors: COLORS.filter(() => next(2) === 1),
      stock: next(40),
      description: `The ${name.toLowerCase()} made for daily use: durable materials, a ${next(5) + 1}-year warranty and free returns within 30 days.`,
    };
  });
}

function Card({ p }) {
  return (
    <li className="group relative flex flex-col overflow-hidden rounded-lg border border-gray-200 bg-white">
      <a href={`/products/${p.slug}`} className="aspect-h-4 aspect-w-3 bg-gray-200 sm:aspect-none group-hover:opacity-75 sm:h-96">
        <img src={`/_next/image?url=%2Fimages%2F${p.id}.jpg&w=640&q=75`} alt={p.name} width={640} height={800} loading="lazy" className="h-full w-full object-cover object-center sm:h-full sm:w-full" />
      </a>
      <div className="flex flex-1 flex-col space-y-2 p-4">
        <h3 className="text-sm font-medium text-gray-900"><a href={`/products/${p.slug}`}>{p.name}</a></h3>
        <p className="text-sm text-gray-500">{p.description}</p>
        <div className="flex items-center gap-1 text-xs text-gray-600" aria-label={`Rated ${p.rating} out of 5`}>
          <span className="font-semibold">{p.rating}</span><span>({p.reviews} reviews)</span>
        </div>
        <ul className="flex gap-2 text-xs text-gray-500">{p.colors.map((c) => <li key={c} className="rounded-full border px-2 py-0.5">{c}</li>)}</ul>
        <div className="flex flex-1 flex-col justify-end">
          <p className="text-base font-medium text-gray-900">${p.price}</p>
          <p className={p.stock > 0 ? "text-xs text-green-700" : "text-xs text-red-700"}>{p.stock > 0 ? `${p.stock} in stock` : "Sold out"}</p>
        </div>
      </div>
    </li>
  );
}

export default async function Products() {
  const n = rendered("/products");
  const list = products(60);
  return (
    <div className="bg-white">
      <header className="sticky top-0 z-50 border-b bg-white">
        <nav className="mx-auto flex max-w-7xl items-center justify-between px-4 py-3" aria-label="Main">
          <a href="/" className="text-lg font-bold">Example Store</a>
          <ul className="flex gap-6 text-sm">{["New arrivals", "Bags", "Home", "Outdoor", "Sale"].map((l) => <li key={l}><a href={`/c/${l.toLowerCase().replace(/ /g, "-")}`} className="text-gray-700 hover:text-gray-900">{l}</a></li>)}</ul>
        </nav>
      </header>
      <main className="mx-auto max-w-7xl px-4 py-8">
        <h1 className="text-3xl font-bold tracking-tight text-gray-900">All products</h1>
        <p id="render" data-replica={replicaId} data-count={n} className="mt-2 text-sm text-gray-500">{list.length} products, rendered by {replicaId}</p>
        <ul className="mt-6 grid grid-cols-1 gap-x-6 gap-y-10 sm:grid-cols-2 lg:grid-cols-4">
          {list.map((p) => <Card key={p.id} p={p} />)}
        </ul>
      </main>
      <footer className="border-t py-8 text-center text-xs text-gray-500">© Example Store. Prices include VAT.</footer>
    </div>
  );
}
