//! Relay overhead: `kernel_info` and `1+1` round trips, a 20 MB stream (batched and flushed line
//! by line) and a 5 MB PNG, through every path, in interleaved rounds so drift hits all alike.
//! The floor is a direct ZeroMQ client on a kernel of its own, launched the same way.

use std::time::{Duration, Instant};

use crate::clients::{Client, Direct, Jupyter, Native, Outcome};
use crate::procs::Proc;
use crate::stats::{Table, millis, num, of, ratio};
use crate::{Bench, BoxError};

/// 10,000 lines of 2,048 bytes (newline included): 20,480,000 bytes of stdout.
const STREAM_BYTES: u64 = 20_480_000;
const STREAM_BATCHED: &str = "for _ in range(10000): print('x' * 2047)";
const STREAM_FLUSHED: &str = "for _ in range(10000): print('x' * 2047, flush=True)";

/// Builds `png` (an RGB noise image stored uncompressed, ~5 MB) and answers its SHA-256.
const PNG_SETUP: &str = r#"
import hashlib, os, struct, zlib
from IPython.display import Image, display
def _chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
_side = 1292
_rows = b''.join(b'\x00' + os.urandom(_side * 3) for _ in range(_side))
png = (b'\x89PNG\r\n\x1a\n' + _chunk(b'IHDR', struct.pack('>IIBBBBB', _side, _side, 8, 2, 0, 0, 0))
       + _chunk(b'IDAT', zlib.compress(_rows, 0)) + _chunk(b'IEND', b''))
hashlib.sha256(png).hexdigest()
"#;
const PNG_SHOW: &str = "display(Image(data=png))";

/// One path to a kernel and what it measured.
struct Path {
    name: String,
    client: Client,
    /// Kernel Gateway stock throttles output: its heavy cells get one try.
    throttled: bool,
    /// A Kernel Gateway path: its heavy cells get less patience.
    gateway: bool,
    info: Vec<Duration>,
    exec: Vec<Duration>,
}

impl Path {
    fn new(name: &str, client: Client, throttled: bool) -> Self {
        Self {
            gateway: name.starts_with("Kernel Gateway"),
            name: name.into(),
            client,
            throttled,
            info: Vec::new(),
            exec: Vec::new(),
        }
    }
}

/// Runs the relay scenarios; returns their section of the report.
pub async fn run(bench: &Bench) -> Result<String, BoxError> {
    let args = bench.local_args();
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(["--pool-size", "0"]);
    let server = Proc::kernelbox(&bench.bin, "kernelbox-relay", &args, &bench.logs).await?;
    let mut gateways = Vec::new();
    let mut paths = vec![
        Path::new(
            "direct ZeroMQ (floor)",
            Client::Direct(Box::new(
                Direct::launch(bench.local.as_ref(), "floor-relay").await?,
            )),
            false,
        ),
        Path::new(
            "kernelbox, native WS",
            Client::Native(Native::create(server.addr).await?),
            false,
        ),
        Path::new(
            "kernelbox, Jupyter WS",
            Client::Jupyter(Jupyter::create(server.addr).await?),
            false,
        ),
    ];
    if let Some((python, launcher)) = &bench.gateway {
        for mode in ["tuned", "stock"] {
            let gw =
                Proc::gateway(python, launcher, mode, &bench.kernel_python, &bench.logs).await?;
            let client = Client::Jupyter(Jupyter::create(gw.addr).await?);
            paths.push(Path::new(
                &format!("Kernel Gateway, {mode}"),
                client,
                mode == "stock",
            ));
            gateways.push(gw);
        }
    }

    let result = measure(bench, &mut paths).await;
    for path in paths {
        if let Client::Direct(direct) = path.client {
            direct.shutdown().await;
        }
    }
    server.stop().await;
    for gw in gateways {
        gw.stop().await;
    }
    result
}

/// Runs a heavy cell `samples` times on every path in turn (Kernel Gateway stock, which
/// throttles output, once; Kernel Gateway with less patience); returns each path's times and
/// outcomes.
async fn heavy_rounds(
    paths: &mut [Path],
    samples: usize,
    code: &str,
) -> Result<Vec<Vec<(Duration, Outcome)>>, BoxError> {
    let mut runs: Vec<Vec<(Duration, Outcome)>> = vec![Vec::new(); paths.len()];
    for round in 0..samples {
        for (i, path) in paths.iter_mut().enumerate() {
            if path.throttled && round > 0 {
                continue;
            }
            // Kernel Gateway may lose a cell's last messages (and so never see it end): it gets
            // a bound a few times what the cell takes, so that the run stays short.
            let patience = Duration::from_secs(if path.gateway { 30 } else { 120 });
            let t = Instant::now();
            let out = path
                .client
                .execute_within(code, patience)
                .await
                .map_err(|e| at(path, e))?;
            let took = t.elapsed();
            eprintln!(
                "  {}: {} stdout bytes, {} stream messages, png {:?} in {:.2} s",
                path.name,
                out.stdout_bytes,
                out.stream_msgs,
                out.png.as_ref().map(|p| p.1),
                took.as_secs_f64()
            );
            runs[i].push((took, out));
        }
    }
    Ok(runs)
}

/// An error of `path`, saying which path it was.
fn at(path: &Path, e: BoxError) -> BoxError {
    format!("{}: {e}", path.name).into()
}

async fn measure(bench: &Bench, paths: &mut [Path]) -> Result<String, BoxError> {
    // Warm-up: imports, the first history writes, connection set-up.
    for path in paths.iter_mut() {
        for _ in 0..20 {
            path.client.kernel_info().await.map_err(|e| at(path, e))?;
            path.client.execute("1+1").await.map_err(|e| at(path, e))?;
        }
    }
    let rounds = bench.samples(500, 30);
    for _ in 0..rounds {
        for path in paths.iter_mut() {
            let t = Instant::now();
            path.client.kernel_info().await.map_err(|e| at(path, e))?;
            path.info.push(t.elapsed());
            let t = Instant::now();
            let out = path.client.execute("1+1").await.map_err(|e| at(path, e))?;
            path.exec.push(t.elapsed());
            if out.result.as_deref() != Some("2") {
                return Err(format!("{}: 1+1 gave {:?}", path.name, out.result).into());
            }
        }
    }
    let mut text = String::from("## Relay overhead\n\n");
    let floor_info = millis(&paths[0].info).median;
    let floor_exec = millis(&paths[0].exec).median;
    let mut table = Table::new(
        &format!("Round trips, {rounds} interleaved samples per path (ms):"),
        &[
            "path",
            "kernel_info median",
            "p99",
            "× floor",
            "execute 1+1 median",
            "p99",
            "× floor",
        ],
    );
    for path in paths.iter() {
        let (info, exec) = (millis(&path.info), millis(&path.exec));
        table.row(&[
            path.name.clone(),
            num(info.median, 2),
            num(info.p99, 2),
            ratio(info.median, floor_info),
            num(exec.median, 2),
            num(exec.p99, 2),
            ratio(exec.median, floor_exec),
        ]);
    }
    text.push_str(&table.finish());

    // Stream relay. The batched cell is short and noisy: more runs.
    let (batched_runs, flushed_runs) = (bench.samples(9, 1), bench.samples(3, 1));
    let mut table = Table::new(
        &format!(
            "\nStream relay: a cell printing {STREAM_BYTES} bytes in 2 KB lines, {batched_runs} runs per path \
             batched, {flushed_runs} flushed (MB/s = stdout bytes received ÷ time to idle; bytes: the fewest \
             received in any run):"
        ),
        &[
            "path",
            "cell",
            "MB/s median",
            "worst",
            "× floor",
            "bytes received",
            "messages",
            "complete",
        ],
    );
    for (label, code, samples) in [
        ("batched", STREAM_BATCHED, batched_runs),
        ("flushed per line", STREAM_FLUSHED, flushed_runs),
    ] {
        let runs: Vec<Vec<(f64, Outcome)>> = heavy_rounds(paths, samples, code)
            .await?
            .into_iter()
            .map(|runs| {
                runs.into_iter()
                    .map(|(t, out)| (out.stdout_bytes as f64 / t.as_secs_f64() / 1e6, out))
                    .collect()
            })
            .collect();
        let floor = of(&runs[0].iter().map(|r| r.0).collect::<Vec<_>>()).median;
        for (path, runs) in paths.iter().zip(&runs) {
            let rates = of(&runs.iter().map(|r| r.0).collect::<Vec<_>>());
            let worst = runs.iter().map(|r| r.0).fold(f64::INFINITY, f64::min);
            let bytes = runs.iter().map(|r| r.1.stdout_bytes).min().unwrap_or(0);
            let msgs = runs.iter().map(|r| r.1.stream_msgs).max().unwrap_or(0);
            let complete = runs.iter().filter(|r| r.1.complete).count();
            let exact = if bytes == STREAM_BYTES {
                " (exact)"
            } else {
                ""
            };
            table.row(&[
                path.name.clone(),
                label.into(),
                num(rates.median, 1),
                num(worst, 1),
                ratio(rates.median, floor),
                format!("{bytes}{exact}"),
                msgs.to_string(),
                format!("{complete}/{}", runs.len()),
            ]);
        }
    }
    text.push_str(&table.finish());

    // A 5 MB PNG.
    let samples = bench.samples(9, 1);
    let mut expected = Vec::new();
    for path in paths.iter_mut() {
        let out = path
            .client
            .execute(PNG_SETUP)
            .await
            .map_err(|e| at(path, e))?;
        expected.push(out.result.unwrap_or_default().trim_matches('\'').to_owned());
    }
    let runs = heavy_rounds(paths, samples, PNG_SHOW).await?;
    let mut size = 0;
    let mut intact = vec![0usize; paths.len()];
    for (i, runs) in runs.iter().enumerate() {
        for (sha, len) in runs.iter().filter_map(|(_, out)| out.png.as_ref()) {
            size = *len;
            if *sha == expected[i] {
                intact[i] += 1;
            }
        }
    }
    let times: Vec<Vec<Duration>> = runs
        .iter()
        .map(|runs| runs.iter().map(|(t, _)| *t).collect())
        .collect();
    let floor = millis(&times[0]).median;
    let mut table = Table::new(
        &format!(
            "\nA {:.1} MB PNG (display_data) relayed, {samples} runs per path (ms; intact = SHA-256 of the decoded bytes matches the kernel's):",
            size as f64 / 1e6
        ),
        &["path", "median", "p99", "× floor", "intact"],
    );
    for (i, path) in paths.iter().enumerate() {
        let s = millis(&times[i]);
        table.row(&[
            path.name.clone(),
            num(s.median, 1),
            num(s.p99, 1),
            ratio(s.median, floor),
            format!("{}/{}", intact[i], times[i].len()),
        ]);
    }
    text.push_str(&table.finish());
    Ok(text)
}
