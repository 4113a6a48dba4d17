//! The `isrgate` command: parse the CLI, load and validate the configuration, set up logging,
//! and run the gateway until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use isrgate::config::{self, Config, Override, ProcessEnv};
use isrgate::warm::Variant;
use isrgate::warm::report::MaxFailed;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc malloc: the proxy allocates and frees a response-sized read buffer
/// per exchange, the pattern glibc handles worst (`malloc_consolidate`, arena locks). Measured
/// in the issue notes; the allocator is set in the binary only, so embedders keep their own.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Front-door cache for self-hosted Next.js.
///
/// Configuration is read from --config (default: config/isrgate.toml when it exists, otherwise
/// built-in defaults), then ISRGATE__SECTION__KEY environment variables, then the flags below.
#[derive(Parser, Debug)]
#[command(name = "isrgate", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Validate the configuration and exit: 0 when valid, 1 with every problem listed otherwise
    /// (like `nginx -t`).
    CheckConfig(ConfigArgs),
    /// Invalidate paths and tags on every gateway: through a running gateway's admin API, the
    /// webhook's whole path (acknowledgements, replica fan-out, re-warm with --host, the
    /// revalidation log); with --redis, only the invalidation, straight through Redis (every
    /// gateway down). Exits 0 with the report, or 1 with the reason.
    Purge(PurgeArgs),
    /// What the cache holds for a URL, variant by variant, as a running gateway sees it: key,
    /// build, state and age, size at rest, tags, the gateway that filled it, and whether a purge
    /// covers it.
    Inspect(InspectArgs),
    /// Re-read the configuration of a running gateway and apply what can change live
    /// (replicas, health, cache policy and routes, webhook, log level), through its admin API:
    /// the same as SIGHUP. An invalid file changes nothing (exit 1, every problem listed).
    Reload(ReloadArgs),
    /// Follow requests as they are answered, one line each, like `varnishlog -q`: on every
    /// gateway of the fleet through Redis, or on one gateway through its admin API (--admin,
    /// or when no Redis is configured). Stop with Ctrl-C.
    Tail(TailArgs),
    /// The rollout of builds, through Redis: which build is current on every gateway.
    Deploy(DeployArgs),
    /// Print the debug token for the admin token in ISRGATE_ADMIN_TOKEN: sent as
    /// x-isrgate-debug-token with x-isrgate-debug: 1, it gets the debug header from any address
    /// (and nothing else). Rotating the admin token revokes it.
    DebugToken(AdminToken),
    /// Render the pages of a sitemap, a sitemap index or a list of paths through a gateway, so
    /// they are cached before users ask. Exits 0 when warmed, 1 when more targets failed than
    /// --max-failed allows, 2 when a flag or the source is unusable (nothing warmed).
    Warm(WarmArgs),
}

#[derive(Args, Debug)]
struct DeployArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Shared store, redis://… (overrides redis.url).
    #[arg(long, global = true, value_name = "URL")]
    redis: Option<String>,
    #[command(subcommand)]
    action: DeployAction,
}

#[derive(Subcommand, Debug)]
enum DeployAction {
    /// The current build, whether an operator holds it, and the builds the fleet knows.
    Status,
    /// Make BUILD current on every gateway now and hold it there (the rollout stops choosing
    /// until `isrgate deploy auto`): a rollback, or a switch without waiting.
    Switch {
        /// The build (as the replicas' x-isrgate-build names it).
        build: String,
    },
    /// Hand the choice of the current build back to the rollout.
    Auto,
}

#[derive(Args, Debug)]
struct WarmArgs {
    /// sitemap.xml, a sitemap index, or a list of paths (one a line, # comments): a file or
    /// an http:// URL; gzip or not.
    #[arg(value_name = "SOURCE")]
    source: String,
    #[command(flatten)]
    config: ConfigArgs,
    /// The gateway to render through, http://HOST:PORT. Default: the configuration's
    /// listen.addr (127.0.0.1 when it listens on all addresses), else http://127.0.0.1:8080.
    #[arg(long, value_name = "URL")]
    gateway: Option<String>,
    /// Host header for every page. Default: the host of each page's URL in the sitemap.
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
    /// Warm this build's replicas: sent as x-deployment-id.
    #[arg(long, value_name = "ID")]
    build: Option<String>,
    /// Renders in flight at most.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Renders started per second at most (e.g. 20, 0.5). Default: no limit.
    #[arg(long, value_name = "PER_SECOND", value_parser = positive_rate)]
    rate: Option<f64>,
    /// Which answers of each page: html, rsc or html,rsc.
    #[arg(long, value_name = "LIST", default_value = "html,rsc", value_parser = variants)]
    variants: Variants,
    /// Failures allowed before exiting 1: a count (0, 3) or a share of the targets (5%).
    #[arg(long, value_name = "N|P%", default_value = "0")]
    max_failed: MaxFailed,
    /// Most time one render (or one sitemap download) may take.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
}

/// `--variants`, parsed (a newtype so clap takes the list as one value).
#[derive(Debug, Clone)]
struct Variants(Vec<Variant>);

fn variants(s: &str) -> Result<Variants, String> {
    Variant::parse_list(s).map(Variants)
}

fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "{s:?}: expected a number of renders per second above 0"
        )),
    }
}

/// The admin token, from `--token` or the environment.
#[derive(Args, Debug)]
struct AdminToken {
    /// The gateway's admin token.
    #[arg(
        long,
        env = "ISRGATE_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,
}

/// How the command line reaches a gateway's admin API.
#[derive(Args, Debug)]
struct AdminArgs {
    /// The gateway's admin listener, http://HOST:PORT. Default: the configuration's
    /// admin.listen (127.0.0.1 when it listens on all addresses).
    #[arg(long, value_name = "URL")]
    gateway: Option<String>,
    #[command(flatten)]
    token: AdminToken,
    /// Print the gateway's JSON answer as it is.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct TailArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Only these statuses: a code or a class (404, 5xx); repeat or separate with commas.
    #[arg(long, value_name = "STATUS")]
    status: Vec<String>,
    /// Only paths matching this pattern (`*` for any run of characters): /blog/*, *.rsc.
    #[arg(long, value_name = "PATTERN")]
    path: Option<String>,
    /// Only these cache outcomes (hit, miss, stale, bypass, …); repeat or separate with commas.
    #[arg(long, value_name = "OUTCOME")]
    outcome: Vec<String>,
    /// Only the gateway with this id (or the start of it; the `gateway` field of each line).
    #[arg(long, value_name = "ID")]
    gateway: Option<String>,
    /// Follow the fleet through this Redis (overrides redis.url).
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// Follow one gateway through its admin API instead, http://HOST:PORT.
    #[arg(long, value_name = "URL")]
    admin: Option<String>,
    /// The gateway's admin token (with --admin).
    #[command(flatten)]
    token: AdminToken,
    /// Print each line as the JSON object it came as.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ReloadArgs {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(Args, Debug)]
struct InspectArgs {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    admin: AdminArgs,
    /// A path (/blog/a?x=1) or a whole URL (https://shop.example/blog/a).
    url: String,
    /// The site's host, when URL is a path.
    #[arg(long)]
    host: Option<String>,
    /// Only the RSC payload (same as --variant rsc).
    #[arg(long)]
    rsc: bool,
    /// html, rsc or prefetch; repeat for several. Default: all three.
    #[arg(long = "variant", value_name = "VARIANT")]
    variants: Vec<String>,
}

#[derive(Args, Debug)]
struct PurgeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    admin: AdminArgs,
    /// Apply straight through this Redis instead of a gateway (overrides redis.url): only the
    /// invalidation; no fan-out, re-warm or log entry by a gateway.
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// The site's public host: purged pages are re-rendered for it (re-warm).
    #[arg(long)]
    host: Option<String>,
    /// A pathname: every variant of it (HTML, RSC, data). Repeat for several.
    #[arg(long = "path", value_name = "PATH")]
    paths: Vec<String>,
    /// A tag (from Cache-Tag, Next's _N_T_ tags, or * for everything). Repeat for several.
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// Hard: the next request waits for a render (default soft: served stale while one
    /// refresh runs).
    #[arg(long)]
    hard: bool,
}

#[derive(Args, Debug)]
struct ConfigArgs {
    /// Configuration file (TOML). Default: config/isrgate.toml when it exists.
    #[arg(long, short = 'c', env = "ISRGATE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Public listen address, HOST:PORT, HOST an IP or a name such as localhost (overrides
    /// listen.addr).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// A Next.js replica, http://HOST:PORT; repeat for several (replaces upstream.replicas).
    #[arg(long = "upstream", value_name = "URL")]
    upstreams: Vec<String>,
    /// Admin listen address, HOST:PORT (an IP or a name); "" disables it (overrides
    /// admin.listen).
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,
    /// Shared store, redis://[user:password@]HOST:PORT[/DB] (overrides redis.url). Without it
    /// each gateway caches in its own memory.
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
}

impl ServeArgs {
    fn overrides(&self) -> Vec<Override> {
        let mut out = Vec::new();
        let s = |v: &str| toml::Value::String(v.to_owned());
        if let Some(v) = &self.listen {
            out.push(Override {
                key: "listen.addr",
                flag: "--listen",
                value: s(v),
            });
        }
        if !self.upstreams.is_empty() {
            let list = self.upstreams.iter().map(|u| s(u)).collect();
            out.push(Override {
                key: "upstream.replicas",
                flag: "--upstream",
                value: toml::Value::Array(list),
            });
        }
        if let Some(v) = &self.redis {
            out.push(Override {
                key: "redis.url",
                flag: "--redis",
                value: s(v),
            });
        }
        if let Some(v) = &self.admin_listen {
            out.push(Override {
                key: "admin.listen",
                flag: "--admin-listen",
                value: s(v),
            });
        }
        out
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig(args) => {
            match config::load(args.config.as_deref(), &ProcessEnv, &[]) {
                Ok((_, file)) => {
                    println!("configuration ok ({})", describe(file.as_deref()));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Purge(args) => purge(args),
        Command::Inspect(args) => inspect(args),
        Command::Reload(args) => reload(args),
        Command::Tail(args) => tail(args),
        Command::Deploy(args) => deploy(args),
        Command::Warm(args) => warm(args),
        Command::DebugToken(args) => debug_token(args),
        Command::Serve(args) => {
            let (config, file) = match config::load(
                args.config.config.as_deref(),
                &ProcessEnv,
                &args.overrides(),
            ) {
                Ok(loaded) => loaded,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            // Held until the process exits: its drop writes the lines still buffered.
            let _flusher = isrgate::logging::init(&config.log);
            tracing::info!(config = %describe(file.as_deref()), "configuration loaded");
            let overrides = args.overrides();
            let path = args.config.config.clone();
            // A reload reads the same sources again: the file, the environment, these flags.
            let loader: isrgate::reload::Loader = std::sync::Arc::new(move || {
                config::load(path.as_deref(), &ProcessEnv, &overrides)
                    .map(|(config, file)| (config, describe(file.as_deref())))
            });
            match serve(config, loader) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// A client for the admin API the flags (or the configuration) name.
fn admin_client(
    config: Option<&std::path::Path>,
    args: &AdminArgs,
    timeout: std::time::Duration,
) -> Result<isrgate::admin::client::AdminClient, String> {
    let base = match &args.gateway {
        Some(g) => g.clone(),
        None => {
            let (c, _) = config::load(config, &ProcessEnv, &[]).map_err(|e| e.to_string())?;
            let admin = c.admin.ok_or(
                "the configuration has no admin listener (admin.listen = \"\"): pass --gateway",
            )?;
            gateway_of(admin.listen)
        }
    };
    isrgate::admin::client::AdminClient::new(&base, args.token.token.clone(), timeout)
        .map_err(|e| e.to_string())
}

/// Runs `call` with a client of the gateway `admin` names (bounded by `timeout`) and prints
/// what it answered: the one path of `isrgate inspect`, `reload` and `purge`.
fn through_admin<F, Fut, E>(
    config: Option<&std::path::Path>,
    admin: &AdminArgs,
    timeout: std::time::Duration,
    call: F,
) -> ExitCode
where
    F: FnOnce(isrgate::admin::client::AdminClient) -> Fut,
    Fut: std::future::Future<Output = Result<String, E>>,
    E: std::fmt::Display,
{
    let client = match admin_client(config, admin, timeout) {
        Ok(c) => c,
        Err(e) => return finish(Err(e)),
    };
    let Some(runtime) = command_runtime() else {
        return ExitCode::FAILURE;
    };
    finish(runtime.block_on(call(client)))
}

/// Prints what a command answered; 0, or 1 with the error.
fn finish(done: Result<String, impl std::fmt::Display>) -> ExitCode {
    match done {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn inspect(args: InspectArgs) -> ExitCode {
    let mut variants = args.variants.clone();
    if args.rsc && !variants.iter().any(|v| v == "rsc") {
        variants.push("rsc".into());
    }
    let timeout = std::time::Duration::from_secs(10);
    let config = args.config.config.as_deref();
    through_admin(config, &args.admin, timeout, |client| async move {
        let host = args.host.as_deref();
        isrgate::admin::commands::inspect(&client, &args.url, host, &variants, args.admin.json)
            .await
    })
}

fn tail(args: TailArgs) -> ExitCode {
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let mut query = Vec::new();
    query.extend(args.status.iter().map(|s| format!("status={}", enc(s))));
    query.extend(args.path.iter().map(|p| format!("path={}", enc(p))));
    query.extend(args.outcome.iter().map(|o| format!("outcome={}", enc(o))));
    query.extend(args.gateway.iter().map(|g| format!("gateway={}", enc(g))));
    let query = query.join("&");
    let filter = match isrgate::logging::tail::Filter::parse(&query) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: --{e}");
            return ExitCode::from(2);
        }
    };
    let json = args.json;
    let print = move |line: &[u8]| {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = if json {
            out.write_all(line)
        } else {
            match serde_json::from_slice::<serde_json::Value>(line) {
                Ok(v) => writeln!(out, "{}", isrgate::logging::tail::human(&v)),
                Err(_) => out.write_all(line),
            }
        };
        let _ = out.flush();
    };
    let Some(runtime) = command_runtime() else {
        return ExitCode::FAILURE;
    };
    let config = args.config.config.as_deref();
    let overrides = redis_override(args.redis.as_ref());
    let redis = match (&args.admin, config::load(config, &ProcessEnv, &overrides)) {
        (Some(_), _) => None,
        (None, Ok((c, _))) => c.redis,
        // Without --redis a configuration that does not load only means "no Redis to use".
        (None, Err(e)) if args.redis.is_some() => return finish(Err(e)),
        (None, Err(_)) => None,
    };
    let done = match redis {
        Some(redis) => {
            let settings = isrgate::cache::store::RedisSettings::for_cli(&redis);
            eprintln!("following every gateway through Redis (Ctrl-C to stop)");
            let stop = tokio_util::sync::CancellationToken::new();
            runtime
                .block_on(isrgate::logging::tail::follow_fleet(
                    &settings, &filter, print, stop,
                ))
                .map_err(|e| format!("cannot follow through Redis: {e}"))
        }
        None => {
            let admin = AdminArgs {
                gateway: args.admin.clone(),
                token: args.token,
                json,
            };
            let client = match admin_client(config, &admin, std::time::Duration::from_secs(10)) {
                Ok(c) => c,
                Err(e) => return finish(Err(e)),
            };
            eprintln!("following one gateway through its admin API (Ctrl-C to stop)");
            let path = format!("/api/tail?{}", filter.to_query());
            runtime
                .block_on(client.lines(&path, print))
                .map_err(|e| e.to_string())
        }
    };
    finish(done.map(|()| String::new()))
}

fn debug_token(args: AdminToken) -> ExitCode {
    // Trimmed as the gateway reads it (a token mounted from a file ends with a newline).
    match args
        .token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        Some(token) => {
            println!("{}", isrgate::admin::debug_token(token));
            ExitCode::SUCCESS
        }
        None => {
            eprintln!(
                "no admin token (--token or ISRGATE_ADMIN_TOKEN): the debug token is derived from it"
            );
            ExitCode::FAILURE
        }
    }
}

fn reload(args: ReloadArgs) -> ExitCode {
    let timeout = std::time::Duration::from_secs(30);
    let config = args.config.config.as_deref();
    through_admin(config, &args.admin, timeout, |client| async move {
        isrgate::admin::commands::reload(&client, args.admin.json).await
    })
}

fn purge(args: PurgeArgs) -> ExitCode {
    if args.redis.is_none() {
        // Acknowledgements, fan-out and re-warm take their time: the webhook's own bounds.
        let timeout = std::time::Duration::from_secs(120);
        let ask = isrgate::admin::commands::Purge {
            paths: args.paths,
            tags: args.tags,
            hard: args.hard,
            host: args.host,
        };
        let config = args.config.config.as_deref();
        return through_admin(config, &args.admin, timeout, |client| async move {
            isrgate::admin::commands::purge(&client, &ask, args.admin.json).await
        });
    }
    let overrides = redis_override(args.redis.as_ref());
    let config = match config::load(args.config.config.as_deref(), &ProcessEnv, &overrides) {
        Ok((c, _)) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mode = if args.hard {
        isrgate::cache::epochs::Mode::Hard
    } else {
        isrgate::cache::epochs::Mode::Soft
    };
    let Some(runtime) = command_runtime() else {
        return ExitCode::FAILURE;
    };
    let done = runtime.block_on(isrgate::invalidate::purge(
        &config, args.paths, args.tags, mode,
    ));
    match done {
        Ok((epoch, tags)) => {
            println!(
                "invalidated ({}) at epoch {epoch}: {}\n(through Redis: the running gateways apply it from the bus; no replica fan-out, re-warm or log entry)",
                mode.as_str(),
                tags.join(" ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--redis URL` as the override of `redis.url` (none without the flag).
fn redis_override(redis: Option<&String>) -> Vec<Override> {
    let redis = redis.map(|v| Override {
        key: "redis.url",
        flag: "--redis",
        value: toml::Value::String(v.clone()),
    });
    redis.into_iter().collect()
}

/// The config with `--redis` applied, and a runtime for one command-line call.
fn cli_setup(
    config: Option<&std::path::Path>,
    redis: Option<&String>,
) -> Result<(Config, tokio::runtime::Runtime), String> {
    let overrides = redis_override(redis);
    let (config, _) = config::load(config, &ProcessEnv, &overrides).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("error: {e}"))?;
    Ok((config, runtime))
}

fn deploy(args: DeployArgs) -> ExitCode {
    use isrgate::deploy::operator;
    let (config, runtime) = match cli_setup(args.config.config.as_deref(), args.redis.as_ref()) {
        Ok(setup) => setup,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let done = runtime.block_on(async {
        match &args.action {
            DeployAction::Status => operator::status(&config).await,
            DeployAction::Switch { build } => operator::switch(&config, build).await.map(|()| {
                format!(
                    "build {build} is current on every gateway, held until `isrgate deploy auto`\n"
                )
            }),
            DeployAction::Auto => operator::auto(&config)
                .await
                .map(|()| "the rollout chooses the current build again\n".to_owned()),
        }
    });
    finish(done)
}

fn warm(args: WarmArgs) -> ExitCode {
    let unusable = ExitCode::from(isrgate::warm::command::Exit::Unusable.code());
    let gateway = match args.gateway {
        Some(g) => g,
        None => match config::load(args.config.config.as_deref(), &ProcessEnv, &[]) {
            Ok((c, _)) => gateway_of(c.listen.addr),
            Err(e) => {
                eprintln!("{e}");
                return unusable;
            }
        },
    };
    let command = isrgate::warm::command::Warm {
        source: args.source,
        gateway,
        host: args.host,
        build: args.build,
        variants: args.variants.0,
        concurrency: usize::from(args.concurrency),
        rate: args.rate,
        max_failed: args.max_failed,
        timeout: args.timeout,
    };
    let Some(runtime) = command_runtime() else {
        return unusable;
    };
    let stop = CancellationToken::new();
    runtime.spawn(signal_shutdown(stop.clone(), None));
    let exit = runtime.block_on(isrgate::warm::command::run(command, stop));
    ExitCode::from(exit.code())
}

/// The one-thread runtime of a command that talks to the network (`purge`, `warm`); `None`
/// once it has said why there is none.
fn command_runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("error: cannot start a runtime: {e}");
            None
        }
    }
}

/// `http://` + the gateway's listen address, on loopback when it listens on every address.
fn gateway_of(listen: std::net::SocketAddr) -> String {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("http://{addr}")
}

fn describe(file: Option<&std::path::Path>) -> String {
    file.map_or_else(
        || "built-in defaults".to_owned(),
        |f| f.display().to_string(),
    )
}

fn serve(config: Config, loader: isrgate::reload::Loader) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    // Set once the gateway is bound; a SIGHUP before is answered with a log line.
    let reloads = std::sync::Arc::new(std::sync::OnceLock::new());
    let hup = std::sync::Arc::clone(&reloads);
    // Signals are watched on a small runtime of their own; the workers have theirs.
    let signals = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal runtime")?;
    let token = shutdown.clone();
    let (installed, handlers) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("isrgate-signals".into())
        .spawn(move || {
            signals.block_on(async move {
                tokio::join!(
                    signal_shutdown(token.clone(), Some(installed)),
                    hangups(hup, token)
                )
            })
        })
        .context("cannot start the signal thread")?;
    // Handlers in place before the listeners bind: a SIGTERM from an orchestrator that saw
    // the port open drains, never kills.
    let _ = handlers.recv_timeout(std::time::Duration::from_secs(2));
    #[cfg(target_os = "linux")]
    raise_descriptor_limit();
    let options = isrgate::Options {
        reload: Some(loader),
        ..Default::default()
    };
    let server = isrgate::Server::bind(config, options).context("cannot start")?;
    let _ = reloads.set(server.state().reloads.clone());
    server.run_workers(shutdown).context("cannot start")
}

/// Raises the soft limit on open descriptors to the hard one, as Go's runtime does and nginx's
/// `worker_rlimit_nofile` is for: a proxy holds one per client connection, one per upstream
/// connection and one per sealed body (`cache::sealed`, which takes at most a quarter of the
/// limit), and the usual soft default of 1,024 is a few hundred clients.
#[cfg(target_os = "linux")]
fn raise_descriptor_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    let (Some(soft), Some(hard)) = (limit.current, limit.maximum) else {
        return;
    };
    if soft >= hard {
        return;
    }
    limit.current = Some(hard);
    match setrlimit(Resource::Nofile, limit) {
        Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-descriptor limit"),
        Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open-descriptor limit"),
    }
}

/// SIGHUP, until `shutdown`: a reload (`isrgate::reload`; `systemctl reload`, `kill -HUP`, as
/// with nginx), never the signal's default action (which kills). The reload logs its own
/// result.
async fn hangups(
    reloads: std::sync::Arc<std::sync::OnceLock<isrgate::reload::Reloads>>,
    shutdown: CancellationToken,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot watch SIGHUP: it would stop the gateway");
            return;
        };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = hup.recv() => {}
            }
            tracing::info!("SIGHUP received: reloading the configuration");
            match reloads.get() {
                // The result (applied, or why not) is logged by the reload itself.
                Some(reloads) => drop(reloads.reload().await),
                None => tracing::warn!("SIGHUP before the gateway started: nothing reloaded"),
            }
        }
    }
    #[cfg(not(unix))]
    {
        drop(reloads);
        shutdown.cancelled().await;
    }
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT; a second one exits at once (an operator
/// who asks twice does not want to wait out the accept grace and the drain).
async fn signal_shutdown(
    shutdown: CancellationToken,
    installed: Option<std::sync::mpsc::Sender<()>>,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let handlers = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        if let Some(installed) = installed {
            let _ = installed.send(());
        }
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            return;
        };
        for round in 0..2 {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            if round == 0 {
                tracing::info!(
                    "{name} received: stopping (not ready, accepting for listen.accept_grace, then draining; send it again to exit at once)"
                );
                shutdown.cancel();
            } else {
                tracing::warn!("{name} received again: exiting without finishing the drain");
                std::process::exit(130);
            }
        }
    }
    #[cfg(not(unix))]
    {
        drop(installed);
        let _ = tokio::signal::ctrl_c().await;
        shutdown.cancel();
    }
}
