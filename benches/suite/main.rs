//! kernelbox's benchmark suite: every scenario of the performance table in the README, each
//! against a reference measured in the same run (a direct ZeroMQ client on the same kind of
//! kernel, and Jupyter Kernel Gateway stock and tuned).
//!
//! Run it with `benches/run.sh` (it builds what is needed and writes `target/bench/report.md`),
//! or `cargo bench --bench suite` with the environment below.
//!
//! Environment: `KERNELBOX_BIN` (the server binary; default `target/release/kernelbox`),
//! `KERNELBOX_PYTHON` (the kernels' Python; default the venv `kernelbox setup` makes),
//! `GATEWAY_PYTHON` (a Python with jupyter_kernel_gateway; without it the Kernel Gateway rows
//! are skipped), `SCENARIOS` (comma-separated subset of `relay,startup,scale`), `QUICK=1` (fewer
//! samples, for checking the harness).

mod clients;
mod procs;
mod relay;
mod scale;
mod startup;
mod stats;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use kernelbox::sandbox::Sandbox;
use kernelbox::sandbox::local::{LocalSandbox, venv};

/// Errors of a benchmark run.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What every scenario needs to know.
pub struct Bench {
    /// The kernelbox server binary.
    pub bin: PathBuf,
    /// The Python the kernels run on (kernelbox's local backend, the floor, Kernel Gateway).
    pub kernel_python: PathBuf,
    /// Kernel Gateway's Python and launcher, when available.
    pub gateway: Option<(PathBuf, PathBuf)>,
    /// Local kernels for the floor.
    pub local: Arc<dyn Sandbox>,
    /// Logs of the processes started.
    pub logs: PathBuf,
    /// Scratch space (kernel state dirs).
    pub scratch: PathBuf,
    /// Fewer samples.
    pub quick: bool,
}

impl Bench {
    /// `full` samples normally, `quick` with `QUICK=1`.
    pub fn samples(&self, full: usize, quick: usize) -> usize {
        if self.quick { quick } else { full }
    }

    /// The arguments that make a kernelbox server run local kernels on the same Python.
    pub fn local_args(&self) -> Vec<String> {
        vec![
            "--backend".into(),
            "local".into(),
            "--python".into(),
            self.kernel_python.display().to_string(),
        ]
    }
}

fn command_line(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// The machine and the versions measured, for the report's header.
fn machine(bench: &Bench) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0 / 1024.0);
    let python = bench.kernel_python.display().to_string();
    let ipykernel = command_line(
        &python,
        &["-c", "import ipykernel; print(ipykernel.__version__)"],
    );
    let gateway = bench.gateway.as_ref().map_or_else(
        || "not measured".to_owned(),
        |(py, _)| {
            command_line(
                &py.display().to_string(),
                &[
                    "-c",
                    "import kernel_gateway; print(kernel_gateway.__version__)",
                ],
            )
        },
    );
    format!(
        "Machine: {cpus} vCPU ({model}), {mem_gib:.0} GiB RAM, Linux {}, Docker {}; \
         ipykernel {ipykernel}, Jupyter Kernel Gateway {gateway}.\n",
        command_line("uname", &["-r"]),
        command_line("docker", &["version", "--format", "{{.Server.Version}}"]),
    )
}

/// Raises the soft open-files limit to the hard one (1,000 WebSockets need more than 1,024).
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let started = Instant::now();
    raise_nofile();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = procs::out_dir();
    let scratch = std::env::temp_dir().join(format!("kernelbox-bench-{}", std::process::id()));
    let kernel_python =
        std::env::var_os("KERNELBOX_PYTHON").map_or_else(venv::venv_python, Into::into);
    let bench = Bench {
        bin: std::env::var_os("KERNELBOX_BIN")
            .map_or_else(|| root.join("target/release/kernelbox"), Into::into),
        gateway: std::env::var_os("GATEWAY_PYTHON")
            .map(|py| (py.into(), root.join("benches/gateway/launch.py"))),
        local: Arc::new(LocalSandbox::new(
            kernel_python.clone(),
            scratch.join("floor"),
        )?),
        kernel_python,
        logs: out.join("logs"),
        scratch: scratch.clone(),
        quick: std::env::var("QUICK").is_ok_and(|v| v == "1"),
    };
    let wanted = std::env::var("SCENARIOS").unwrap_or_else(|_| "relay,startup,scale".into());
    let mut report = format!("# kernelbox benchmark\n\n{}", machine(&bench));
    println!("{report}");
    for scenario in wanted.split(',').map(str::trim) {
        let t = Instant::now();
        let section = match scenario {
            "relay" => relay::run(&bench).await,
            "startup" => startup::run(&bench).await,
            "scale" => scale::run(&bench).await,
            other => Err(format!("unknown scenario {other:?}").into()),
        };
        let section = match section {
            Ok(text) => text,
            Err(e) => format!("## {scenario}\n\nFAILED: {e}\n"),
        };
        let section = format!(
            "{section}\n_{scenario}: {:.0} s_\n",
            t.elapsed().as_secs_f64()
        );
        println!("{section}");
        report.push('\n');
        report.push_str(&section);
    }
    report.push_str(&format!(
        "\nWhole run: {:.0} s.\n",
        started.elapsed().as_secs_f64()
    ));
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("report.md"), &report)?;
    println!("report: {}", out.join("report.md").display());
    let _ = std::fs::remove_dir_all(scratch);
    Ok(())
}
