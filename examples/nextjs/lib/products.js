// The example's product data: what a CMS or a database would hold. With PRODUCTS_DIR set (the
// end-to-end tests point every replica at one directory) it is shared by every replica, as a
// real database would be; otherwise each process keeps its own.
import fs from "node:fs";
import path from "node:path";

const memory = (globalThis.__isrgateProducts ??= new Map());

function file(id) {
  return process.env.PRODUCTS_DIR && path.join(process.env.PRODUCTS_DIR, `product-${id}.json`);
}

export function readProduct(id) {
  const f = file(id);
  if (f) {
    try {
      return JSON.parse(fs.readFileSync(f, "utf8"));
    } catch {
      // Not written yet: the default below.
    }
  } else if (memory.has(id)) {
    return memory.get(id);
  }
  return { id, price: 100 + Number(id || 0) };
}

export function writeProduct(product) {
  const f = file(product.id);
  if (f) {
    fs.writeFileSync(`${f}.tmp`, JSON.stringify(product));
    fs.renameSync(`${f}.tmp`, f);
  } else {
    memory.set(product.id, product);
  }
}
