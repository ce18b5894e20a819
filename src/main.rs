//! The `kernelbox` command line: `serve`, `setup`, `image`, `schema`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use kernelbox::api::{self, ApiToken, AppState, KernelSpecs, Token, Tokens};
use kernelbox::sandbox::docker::{self, DockerConfig, DockerSandbox, EngineLocation};
use kernelbox::sandbox::local::{LocalSandbox, venv};
use kernelbox::sandbox::{PackagePolicy, Sandbox, SandboxError};
use kernelbox::session::{ReplayLimits, SessionManager, SessionOptions, SessionStore};

/// A server that gives every client session its own sandboxed Jupyter kernel.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Create the local backend's Python venv (ipykernel, matplotlib, numpy, pandas).
    Setup {
        /// The python used to create the venv.
        #[arg(long, default_value = "python3")]
        python: PathBuf,
    },
    /// The Docker kernel image.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// An interactive REPL on a session of a running server.
    Repl(ReplArgs),
    /// Print the native protocol's JSON Schema (or write it to a file).
    Schema {
        /// Write to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build the kernel image offline (debootstrap + pip; no registry needed) unless the image
    /// for the current inputs exists already.
    Build {
        /// Rebuild even when the image exists.
        #[arg(long)]
        force: bool,
    },
    /// Print the tag the current image inputs hash to.
    Tag,
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    /// Docker when an engine is configured (`--docker-host`, `DOCKER_HOST` or a socket at
    /// `--docker-socket`), refusing to start if it does not answer; local (NOT isolated, with a
    /// warning) only where no engine is installed at all.
    Auto,
    /// Plain local processes running as the server's own user: no isolation at all (for
    /// development on one's own machine).
    Local,
    /// A hardened container per session.
    Docker,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "KERNELBOX_BIND", default_value = "127.0.0.1:8888")]
    bind: SocketAddr,
    /// API token; generated and printed when not set.
    #[arg(long, env = "KERNELBOX_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// API tokens, each owning its own sessions: a JSON file
    /// `[{"name": "alice", "token": "…", "max_sessions": 5}, …]` (used instead of --token).
    #[arg(long, env = "KERNELBOX_TOKENS_FILE")]
    tokens_file: Option<PathBuf>,
    /// Most sessions the --token principal may hold (per-token limits come from --tokens-file).
    #[arg(long, env = "KERNELBOX_MAX_SESSIONS_PER_TOKEN")]
    max_sessions_per_token: Option<usize>,
    /// HTTP requests (REST calls and WebSocket upgrades) per second each token may make.
    #[arg(long, env = "KERNELBOX_RATE_LIMIT", default_value_t = 100)]
    rate_limit: u32,
    /// Browser origins allowed to call the API besides the server's own page (repeatable;
    /// `*` allows any — not recommended).
    #[arg(
        long = "allowed-origin",
        env = "KERNELBOX_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    allowed_origins: Vec<String>,
    /// Where kernels run.
    #[arg(long, env = "KERNELBOX_BACKEND", value_enum, default_value = "auto")]
    backend: Backend,
    /// Docker engine address (`unix:///…`, `tcp://…`); default `DOCKER_HOST`, else the socket
    /// at --docker-socket.
    #[arg(long, env = "KERNELBOX_DOCKER_HOST")]
    docker_host: Option<String>,
    /// The local Docker engine's socket, used when no engine address is set. With
    /// `--backend auto`, its absence (and no address) is what means "no engine installed".
    #[arg(long, env = "KERNELBOX_DOCKER_SOCKET", default_value = docker::DEFAULT_SOCKET)]
    docker_socket: PathBuf,
    /// OCI runtime for kernel, keeper and installer containers (e.g. gVisor's `runsc`); the
    /// engine must know it (`docker info` → Runtimes). Default: the engine's default.
    #[arg(long, env = "KERNELBOX_RUNTIME")]
    runtime: Option<String>,
    /// The uid kernel containers run as; refused if it is 0 or the server's own uid.
    #[arg(long, env = "KERNELBOX_KERNEL_UID", default_value_t = docker::DEFAULT_KERNEL_UID)]
    kernel_uid: u32,
    /// The gid kernel containers run as; refused if it is 0.
    #[arg(long, env = "KERNELBOX_KERNEL_GID", default_value_t = docker::DEFAULT_KERNEL_UID)]
    kernel_gid: u32,
    /// Python with ipykernel for the local backend (default: the venv `kernelbox setup` makes).
    #[arg(long, env = "KERNELBOX_PYTHON")]
    python: Option<PathBuf>,
    /// Kernel image for the Docker backend (default: the tag `kernelbox image build` makes).
    #[arg(long, env = "KERNELBOX_IMAGE")]
    image: Option<String>,
    /// Memory limit per kernel container, in MiB (swap is not allowed).
    #[arg(long, env = "KERNELBOX_MEMORY_MB", default_value_t = 1024)]
    memory_mb: i64,
    /// CPU quota per kernel container, in CPUs.
    #[arg(long, env = "KERNELBOX_CPUS", default_value_t = 1.0)]
    cpus: f64,
    /// Process/thread limit per kernel container.
    #[arg(long, env = "KERNELBOX_PIDS_LIMIT", default_value_t = 256)]
    pids_limit: i64,
    /// Let sessions ask for network access (`{"network": true}`); refused otherwise.
    #[arg(long, env = "KERNELBOX_ALLOW_NETWORK")]
    allow_network: bool,
    /// Ready kernels kept waiting for new sessions.
    #[arg(long, env = "KERNELBOX_POOL_SIZE", default_value_t = 2)]
    pool_size: usize,
    /// Most sessions at once.
    #[arg(long, env = "KERNELBOX_MAX_SESSIONS", default_value_t = 256)]
    max_sessions: usize,
    /// Kernelspecs Jupyter clients may start: a JSON file
    /// `{"default": "python3", "kernelspecs": {"name": {"display_name", "language", "image", "argv"}}}`.
    #[arg(long, env = "KERNELBOX_KERNELSPECS")]
    kernelspecs: Option<PathBuf>,
    /// Events each session keeps for clients that reconnect and resume.
    #[arg(long, env = "KERNELBOX_REPLAY_EVENTS", default_value_t = 10_000)]
    replay_events: usize,
    /// Bytes (MiB) of events each session keeps for clients that reconnect and resume. Events a
    /// connected client has not read yet may take 4× this before the slowest client is cut off.
    #[arg(long, env = "KERNELBOX_REPLAY_MB", default_value_t = 8)]
    replay_mb: usize,
    /// Time limit (seconds) for cells that set none (`timeout_s`); unlimited when not set. A
    /// timed-out cell is interrupted, and the kernel restarted if it does not stop.
    #[arg(long, env = "KERNELBOX_CELL_TIMEOUT_S")]
    cell_timeout_s: Option<f64>,
    /// Seconds a timed-out cell may take to stop after its interrupt before the kernel is
    /// restarted.
    #[arg(long, env = "KERNELBOX_TIMEOUT_RESTART_GRACE_S", default_value_t = 5.0)]
    timeout_restart_grace_s: f64,
    /// Output (MiB) one cell may produce; beyond it output is dropped and the client told.
    #[arg(long, env = "KERNELBOX_MAX_CELL_OUTPUT_MB", default_value_t = 64)]
    max_cell_output_mb: usize,
    /// Largest message (MiB) a kernel may send on any of its sockets, checked before anything
    /// is allocated for it; a kernel that sends more is disconnected and reported dead.
    #[arg(long, env = "KERNELBOX_MAX_KERNEL_MESSAGE_MB", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    max_kernel_message_mb: u32,
    /// Bytes (MiB) of code and forwarded Jupyter messages each session may hold queued (a cell
    /// counts until it is sent to the kernel); beyond it new cells are refused (a `Rejected`
    /// error event; a Jupyter client gets an error reply) until queued ones run.
    #[arg(long, env = "KERNELBOX_MAX_QUEUED_MB", default_value_t = 64)]
    max_queued_mb: usize,
    /// Close sessions idle this many seconds (0: never). Busy sessions are never culled.
    #[arg(long, env = "KERNELBOX_CULL_IDLE_S", default_value_t = 3600)]
    cull_idle_s: u64,
    /// Cull idle sessions even while a client is connected.
    #[arg(long, env = "KERNELBOX_CULL_CONNECTED")]
    cull_connected: bool,
    /// The session store (SQLite) that lets sessions outlive a server restart (Docker backend):
    /// a stopped server leaves their containers running and the next one re-adopts them.
    /// Default: `sessions.db` in the Docker backend's state dir.
    #[arg(long, env = "KERNELBOX_STATE_DB")]
    state_db: Option<PathBuf>,
    /// Keep no session store: stopping the server removes every session's container.
    #[arg(long, env = "KERNELBOX_EPHEMERAL", conflicts_with = "state_db")]
    ephemeral: bool,
    /// Let sessions install Python packages (`"packages"` at creation, `install` messages,
    /// `POST /v1/sessions/{id}/packages`); refused otherwise. On Docker, pip runs in a
    /// short-lived installer container with network access; the kernel never gets any.
    #[arg(long, env = "KERNELBOX_ALLOW_PACKAGE_INSTALLS")]
    allow_package_installs: bool,
    /// Package index for installs (pip's --index-url: a mirror or proxy); default PyPI.
    #[arg(long, env = "KERNELBOX_PACKAGE_INDEX_URL")]
    package_index_url: Option<String>,
    /// A CA bundle pip should trust for installs (e.g. behind a TLS-intercepting proxy);
    /// mounted read-only into the installer only.
    #[arg(long, env = "KERNELBOX_PACKAGE_CA_BUNDLE")]
    package_ca_bundle: Option<PathBuf>,
    /// Let installs build source distributions (their build code runs with the installer's
    /// network); by default pip installs wheels only (`--only-binary :all:`).
    #[arg(long, env = "KERNELBOX_ALLOW_SDIST_INSTALLS")]
    allow_sdist_installs: bool,
    /// The Docker network installer containers join.
    #[arg(long, env = "KERNELBOX_PACKAGE_NETWORK", default_value = "bridge")]
    package_network: String,
    /// Largest file upload accepted (`PUT /v1/sessions/{id}/files/{path}`), in MiB; `413`
    /// beyond.
    #[arg(long, env = "KERNELBOX_MAX_UPLOAD_MB", default_value_t = 100)]
    max_upload_mb: u64,
    /// Bytes (MiB) that uploads in progress may hold together, server-wide; an upload that
    /// does not fit gets `503` until others finish. At least `--max-upload-mb`.
    #[arg(long, env = "KERNELBOX_MAX_UPLOADS_MB", default_value_t = 1024)]
    max_uploads_mb: u64,
    /// Most open connections (WebSockets included); more are closed at once.
    #[arg(long, env = "KERNELBOX_MAX_CONNECTIONS", default_value_t = api::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Seconds a client may take to send a request's headers (and a kept-alive connection may
    /// wait for its next request) before the connection is closed.
    #[arg(long, env = "KERNELBOX_HEADER_READ_TIMEOUT_S", default_value_t = 10.0)]
    header_read_timeout_s: f64,
    /// Print logs as JSON lines.
    #[arg(long)]
    log_json: bool,
}

#[derive(clap::Args)]
struct ReplArgs {
    /// The server's URL.
    #[arg(default_value = "http://127.0.0.1:8888")]
    url: String,
    /// API token.
    #[arg(long, env = "KERNELBOX_TOKEN", hide_env_values = true)]
    token: String,
    /// Reopen this session instead of starting a new one (it is kept on exit).
    #[arg(long)]
    session: Option<String>,
    /// Where images are saved (default: a temporary directory).
    #[arg(long)]
    image_dir: Option<PathBuf>,
    /// Keep the new session when the REPL exits.
    #[arg(long)]
    keep: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Setup { python } => venv::ensure(&python)
            .await
            .map(|p| {
                println!("kernel python: {}", p.display());
            })
            .map_err(|e| e.to_string()),
        Command::Image {
            command: ImageCommand::Build { force },
        } => docker::build_image(force)
            .await
            .map(|tag| println!("{tag}"))
            .map_err(|e| e.to_string()),
        Command::Image {
            command: ImageCommand::Tag,
        } => {
            println!("{}", docker::default_image_tag());
            Ok(())
        }
        Command::Schema { out } => schema(out),
        Command::Repl(args) => kernelbox::repl::run(kernelbox::repl::ReplOptions {
            url: args.url,
            token: args.token,
            session: args.session,
            image_dir: args.image_dir,
            keep: args.keep,
        })
        .await
        .map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("kernelbox: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KERNELBOX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: a log file or collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn local_sandbox(
    python: Option<PathBuf>,
    packages: PackagePolicy,
) -> Result<Arc<dyn Sandbox>, String> {
    let python = match python {
        Some(p) => p,
        None => venv::ensure(std::path::Path::new("python3"))
            .await
            .map_err(|e| e.to_string())?,
    };
    let sandbox = LocalSandbox::new(python, kernelbox::config::state_dir())
        .map_err(|e| e.to_string())?
        .with_packages(packages);
    Ok(Arc::new(sandbox))
}

fn docker_config(args: &ServeArgs) -> DockerConfig {
    let mut config = DockerConfig::default();
    if let Some(image) = &args.image {
        config.image.clone_from(image);
    }
    config.memory_bytes = args.memory_mb.saturating_mul(1 << 20);
    config.cpus = args.cpus;
    config.pids_limit = args.pids_limit;
    config.allow_network_requests = args.allow_network;
    config.packages = package_policy(args);
    config.docker_host.clone_from(&args.docker_host);
    config.socket.clone_from(&args.docker_socket);
    config.runtime.clone_from(&args.runtime);
    config.uid = args.kernel_uid;
    config.gid = args.kernel_gid;
    config
}

/// Says, on stderr and in the log, that kernels will run unisolated (the local backend), and
/// why the server chose it.
fn warn_unisolated(why: &str) {
    tracing::warn!(
        why,
        "kernels are NOT isolated: the local backend runs them as plain processes with the \
         server's own user, files and network"
    );
    eprintln!(
        "kernelbox: WARNING: kernels are NOT isolated ({why}): they run as plain local processes \
         with this server's own user, files and network. Use --backend docker for isolation."
    );
}

fn package_policy(args: &ServeArgs) -> PackagePolicy {
    PackagePolicy {
        allow: args.allow_package_installs,
        index_url: args.package_index_url.clone(),
        ca_bundle: args.package_ca_bundle.clone(),
        network: args.package_network.clone(),
        allow_sdist: args.allow_sdist_installs,
        ..PackagePolicy::default()
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    init_logging(args.log_json);
    // Before any session exists, so that every metric handle records.
    if let Err(e) = api::metrics::install() {
        tracing::warn!(error = %e, "metrics are disabled: /metrics will answer 503");
    }
    if let Some(ca) = &args.package_ca_bundle
        && !ca.is_file()
    {
        return Err(format!(
            "--package-ca-bundle {} is not a readable file",
            ca.display()
        ));
    }
    let limits = connection_limits(&args)?;
    let sandbox: Arc<dyn Sandbox> = match args.backend {
        Backend::Local => {
            warn_unisolated("--backend local");
            local_sandbox(args.python.clone(), package_policy(&args)).await?
        }
        Backend::Docker => Arc::new(
            DockerSandbox::new(docker_config(&args))
                .await
                .map_err(|e| e.to_string())?,
        ),
        Backend::Auto => {
            let config = docker_config(&args);
            match EngineLocation::of(&config) {
                EngineLocation::NotInstalled => {
                    warn_unisolated(&format!(
                        "--backend auto: no Docker engine installed (no DOCKER_HOST, no socket \
                         at {})",
                        config.socket.display()
                    ));
                    local_sandbox(args.python.clone(), package_policy(&args)).await?
                }
                // A configured engine that does not answer (or lacks the image) is a fault to
                // fix, never a reason to run user code unisolated.
                EngineLocation::Configured(place) => Arc::new(
                    DockerSandbox::new(config)
                        .await
                        .map_err(|e| auto_refusal(&place, &e))?,
                ),
            }
        }
    };
    let store = session_store(&args, sandbox.as_ref())?;
    let kernelspecs = match &args.kernelspecs {
        Some(path) => KernelSpecs::from_file(path).map_err(|e| e.to_string())?,
        None => KernelSpecs::default(),
    };
    let options = SessionOptions {
        max_sessions: args.max_sessions,
        pool_size: args.pool_size,
        replay: ReplayLimits {
            events: args.replay_events,
            bytes: args.replay_mb.saturating_mul(1 << 20),
        },
        default_cell_timeout: seconds("--cell-timeout-s", args.cell_timeout_s)?,
        timeout_restart_grace: seconds(
            "--timeout-restart-grace-s",
            Some(args.timeout_restart_grace_s),
        )?
        .unwrap_or_default(),
        max_cell_output_bytes: args.max_cell_output_mb.saturating_mul(1 << 20),
        max_queued_bytes: args.max_queued_mb.saturating_mul(1 << 20),
        cull_idle: (args.cull_idle_s > 0).then(|| Duration::from_secs(args.cull_idle_s)),
        cull_connected: args.cull_connected,
        client: kernelbox::kernel::ClientOptions {
            max_message_size: (args.max_kernel_message_mb as usize).saturating_mul(1 << 20),
            ..Default::default()
        },
        ..SessionOptions::default()
    };
    let (sessions, startup) = SessionManager::open(sandbox, options, store)
        .await
        .map_err(|e| e.to_string())?;
    if !startup.adopted.is_empty() {
        eprintln!(
            "kernelbox: re-adopted {} session(s) from the previous run",
            startup.adopted.len()
        );
    }
    let tokens = match (&args.tokens_file, &args.token) {
        (Some(path), _) => api::auth::read_tokens_file(path).map_err(|e| e.to_string())?,
        (None, Some(t)) if !t.is_empty() => vec![ApiToken::new(
            "default",
            &Token::new(t),
            args.max_sessions_per_token,
        )],
        (None, _) => {
            let token = Token::generate();
            eprintln!("kernelbox: no --token given; generated one for this run:");
            eprintln!("    {}", token.expose());
            vec![ApiToken::new(
                "default",
                &token,
                args.max_sessions_per_token,
            )]
        }
    };
    let tokens = Tokens::new(tokens, std::num::NonZeroU32::new(args.rate_limit));
    let listener = tokio::net::TcpListener::bind(args.bind)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.bind))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%addr, backend = sessions.backend(), "kernelbox listening");
    eprintln!(
        "kernelbox: serving on http://{addr}/ ({} backend)",
        sessions.backend()
    );
    let state = AppState::new(sessions.clone(), Token::generate())
        .with_tokens(tokens)
        .with_allowed_origins(args.allowed_origins.clone())
        .with_kernelspecs(kernelspecs)
        .with_max_upload_bytes(args.max_upload_mb.saturating_mul(1 << 20))
        .with_upload_budget_bytes(args.max_uploads_mb.saturating_mul(1 << 20));
    let result = api::serve_with(listener, state, limits, shutdown_signal()).await;
    if sessions.persistent() {
        tracing::info!("shutting down: sessions keep running for the next start");
        sessions.detach().await;
    } else {
        tracing::info!("shutting down: closing every session");
        sessions.shutdown().await;
    }
    result.map_err(|e| format!("server failed: {e}"))
}

/// Why `--backend auto` will not start when the engine it found configured at `place` failed.
fn auto_refusal(place: &str, err: &SandboxError) -> String {
    format!(
        "{err}\n--backend auto found a Docker engine configured ({place}) but cannot use it, and \
         will not fall back to kernels that are NOT isolated. Fix the engine (or the setting \
         that points at it), or run with --backend local to accept unisolated kernels."
    )
}

/// The session store for the Docker backend unless `--ephemeral`; none for the local backend,
/// whose kernels are child processes that end with the server.
fn session_store(args: &ServeArgs, sandbox: &dyn Sandbox) -> Result<Option<SessionStore>, String> {
    if args.ephemeral {
        return Ok(None);
    }
    if sandbox.name() != "docker" {
        if let Some(path) = &args.state_db {
            tracing::warn!(path = %path.display(), "--state-db is ignored: local kernels end with the server");
        }
        return Ok(None);
    }
    let path = match &args.state_db {
        Some(path) => path.clone(),
        None => docker_config(args).state_dir.join("sessions.db"),
    };
    let store = SessionStore::open(&path).map_err(|e| e.to_string())?;
    tracing::info!(path = %path.display(), "session store");
    Ok(Some(store))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
}

/// The connection limits the flags ask for, and a check of the upload budget, before anything
/// starts (a message naming the flag when a value cannot work).
fn connection_limits(args: &ServeArgs) -> Result<api::ConnectionLimits, String> {
    if args.max_uploads_mb < args.max_upload_mb {
        return Err(format!(
            "--max-uploads-mb ({}) must be at least --max-upload-mb ({}): no upload would fit",
            args.max_uploads_mb, args.max_upload_mb
        ));
    }
    if args.max_connections == 0 {
        return Err("--max-connections must be at least 1".into());
    }
    Ok(api::ConnectionLimits {
        max_connections: args.max_connections,
        header_read_timeout: seconds("--header-read-timeout-s", Some(args.header_read_timeout_s))?
            .unwrap_or(api::DEFAULT_HEADER_READ_TIMEOUT),
    })
}

/// A positive number of seconds from the command line, or a message naming the flag.
fn seconds(flag: &str, value: Option<f64>) -> Result<Option<Duration>, String> {
    match value {
        None => Ok(None),
        Some(s) if s.is_finite() && s > 0.0 => Ok(Some(Duration::from_secs_f64(s))),
        Some(s) => Err(format!(
            "{flag} must be a positive number of seconds, not {s}"
        )),
    }
}

fn schema(out: Option<PathBuf>) -> Result<(), String> {
    let text = kernelbox::api::native::protocol::schema_text();
    match out {
        Some(path) => {
            std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))
        }
        None => {
            print!("{text}");
            Ok(())
        }
    }
}
