//! Prints the Redis key hash of an HTML page, as a gateway with `cache.namespace =
//! isrgate-example` computes it (for `benches/nextjs.sh`, which reads the stored sizes).
//!
//! `cargo run --example keyhex -- HOST PATH`

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(host), Some(path)) = (args.next(), args.next()) else {
        eprintln!("usage: keyhex HOST PATH");
        std::process::exit(2);
    };
    let key = isrgate::cache::key::CacheKey::new(
        "isrgate-example",
        &host,
        &path,
        None,
        &isrgate::cache::key::Variant::Html,
    );
    println!("{}", key.hex());
}
