//! A real jupyter_server (from PyPI) with `--gateway-url` pointing at kernelbox: kernels that
//! Jupyter clients start through jupyter_server's own REST API run in kernelbox containers.
//! The venv with jupyter_server is made by `tests/tools/ensure-venv.sh` (cached by hash).

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::jupyter::JupyterWs;
use kernelbox::sandbox::docker::{DockerConfig, DockerSandbox};
use kernelbox::session::SessionOptions;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

/// The bin dir of the venv holding jupyter_server.
fn jupyter_bin() -> PathBuf {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new(format!("{root}/tests/tools/ensure-venv.sh"))
        .args([
            "jupyter",
            &format!("{root}/tests/tools/jupyter-requirements.txt"),
        ])
        .stderr(Stdio::inherit())
        .output()
        .expect("run tests/tools/ensure-venv.sh");
    assert!(
        out.status.success(),
        "making the jupyter_server venv failed"
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A running `jupyter server` using kernelbox as its gateway.
struct JupyterServer {
    child: Child,
    port: u16,
    token: String,
    _dir: PathBuf,
}

impl JupyterServer {
    async fn start(gateway: &common::TestServer) -> Self {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            probe.local_addr().expect("addr").port()
        };
        let dir = common::temp_state_dir();
        let token = format!("jsrv-{}", uuid::Uuid::new_v4().simple());
        let mut command = Command::new(jupyter_bin().join("jupyter"));
        command
            .arg("server")
            .args([
                "--no-browser",
                "--ip=127.0.0.1",
                "--port-retries=0",
                "--allow-root",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--IdentityProvider.token={token}"))
            .arg(format!("--gateway-url=http://{}", gateway.addr))
            .arg(format!("--GatewayClient.auth_token={}", gateway.token))
            .arg(format!("--ServerApp.root_dir={}", dir.display()))
            .env("JUPYTER_CONFIG_DIR", dir.join("config"))
            .env("JUPYTER_DATA_DIR", dir.join("data"))
            .env("JUPYTER_RUNTIME_DIR", dir.join("runtime"))
            .env("HOME", &dir)
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("jupyter.log")).expect("log file"),
            ))
            .kill_on_drop(true);
        let child = command.spawn().expect("start jupyter server");
        let server = Self {
            child,
            port,
            token,
            _dir: dir.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(resp) = server.request("GET", "/api/status", None).await
                && resp.0 == 200
            {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "jupyter server did not start; its log:\n{}",
                std::fs::read_to_string(dir.join("jupyter.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), reqwest::Error> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = reqwest::Client::new()
            .request(method, format!("http://127.0.0.1:{}{path}", self.port))
            .header("Authorization", format!("token {}", self.token));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.request(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }
}

fn containers_of(session: &str) -> Vec<String> {
    let out = std::process::Command::new("docker")
        .args(["ps", "-q", "--filter"])
        .arg(format!("label=kernelbox.session={session}"))
        .args(["--filter", "label=kernelbox.role=kernel"])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jupyter_server_runs_notebook_kernels_in_kernelbox_containers() {
    let sandbox = DockerSandbox::new(DockerConfig {
        state_dir: common::temp_state_dir(),
        ..DockerConfig::default()
    })
    .await
    .unwrap_or_else(|err| panic!("{err} (build the image: kernel-image/build.sh)"));
    let gateway = common::TestServer::start(Arc::new(sandbox), SessionOptions::default()).await;
    let mut jupyter = JupyterServer::start(&gateway).await;

    let (status, specs) = jupyter.call("GET", "/api/kernelspecs", None).await;
    assert_eq!(status, 200, "{specs}");
    assert_eq!(
        specs["kernelspecs"]["python3"]["spec"]["display_name"], "Python 3 (kernelbox)",
        "kernelspecs come from kernelbox: {specs}"
    );

    let (status, kernel) = jupyter
        .call("POST", "/api/kernels", Some(json!({"name": "python3"})))
        .await;
    assert_eq!(status, 201, "{kernel}");
    let id = kernel["id"].as_str().expect("id").to_owned();
    assert!(
        gateway.sessions.get(&id).is_some(),
        "the kernel is a kernelbox session"
    );
    assert_eq!(
        containers_of(&id).len(),
        1,
        "the kernel runs in a container"
    );
    let (status, list) = jupyter.call("GET", "/api/kernels", None).await;
    assert_eq!(status, 200, "{list}");
    assert!(
        list.as_array()
            .is_some_and(|l| l.iter().any(|k| k["id"] == id.as_str()))
    );

    let url = format!("ws://127.0.0.1:{}/api/kernels/{id}/channels", jupyter.port);
    let mut ws = JupyterWs::connect(&url, "notebook-1", &jupyter.token).await;
    assert_eq!(ws.execute("x = 41").await.reply["content"]["status"], "ok");
    assert_eq!(
        ws.execute("x + 1").await.result_text().as_deref(),
        Some("42")
    );
    let plot = ws
        .execute(
            "import matplotlib.pyplot as plt\nplt.plot([3, 1, 2]); plt.title('图表'); plt.show()",
        )
        .await;
    let displays = plot.of("display_data");
    let png = displays
        .first()
        .and_then(|d| d["content"]["data"]["image/png"].as_str())
        .unwrap_or_else(|| panic!("no PNG in {:?}", plot.iopub));
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(png.trim())
        .expect("base64");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
    let inside = ws
        .execute("import os; print(os.getuid(), open('/proc/1/cgroup').read().strip()[-20:])")
        .await;
    assert!(
        !inside.stdout().starts_with("0 "),
        "not root in the container: {}",
        inside.stdout()
    );

    // Interrupt through jupyter_server's REST API.
    let sleeping = ws.submit("import time; time.sleep(60)").await;
    ws.until(|m| {
        m["msg_type"] == "execute_input" && m["parent_header"]["msg_id"] == sleeping.as_str()
    })
    .await;
    let started = Instant::now();
    let (status, _) = jupyter
        .call(
            "POST",
            &format!("/api/kernels/{id}/interrupt"),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 204);
    let interrupted = ws.collect(&sleeping).await;
    assert_eq!(interrupted.reply["content"]["ename"], "KeyboardInterrupt");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(ws.execute("x").await.result_text().as_deref(), Some("41"));

    // Restart through jupyter_server: the notebook sees `restarting`, then a fresh kernel.
    let (status, _) = jupyter
        .call(
            "POST",
            &format!("/api/kernels/{id}/restart"),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 200);
    ws.until(|m| m["channel"] == "iopub" && m["content"]["execution_state"] == "restarting")
        .await;
    let after = ws.execute("x").await;
    assert_eq!(after.reply["content"]["ename"], "NameError");
    assert_eq!(
        ws.execute("2 ** 10").await.result_text().as_deref(),
        Some("1024")
    );

    let (status, _) = jupyter
        .call("DELETE", &format!("/api/kernels/{id}"), None)
        .await;
    assert_eq!(status, 204);
    assert!(
        gateway.sessions.get(&id).is_none(),
        "deleting the kernel ends the session"
    );
    let _ = jupyter.child.kill().await;
    gateway.stop().await;
    assert!(containers_of(&id).is_empty(), "no container is left behind");
}
