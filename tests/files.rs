//! The files API: a session's working directory over REST, and the files a cell writes listed in
//! its `done` event. Every promise runs against real Docker sessions (the tmpfs working dir
//! served through the keeper container, and the host-dir variant) and the local backend.
//! Needs the kernel image (`kernel-image/build.sh`) and the local venv (`kernelbox setup`).

mod common;

use std::sync::Arc;

use common::TestServer;
use kernelbox::sandbox::Sandbox;
use kernelbox::sandbox::docker::{DockerConfig, DockerSandbox, WorkDirStorage};
use kernelbox::sandbox::local::LocalSandbox;
use kernelbox::session::SessionOptions;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The upload limit of the test servers: 1 MiB.
const LIMIT: u64 = 1 << 20;

async fn server_on(sandbox: Arc<dyn Sandbox>) -> TestServer {
    TestServer::start_configured(sandbox, SessionOptions::default(), |state| {
        state.with_max_upload_bytes(LIMIT)
    })
    .await
}

async fn docker_server(work_dir: WorkDirStorage) -> TestServer {
    let sandbox = DockerSandbox::new(DockerConfig {
        state_dir: common::temp_state_dir(),
        work_dir,
        ..DockerConfig::default()
    })
    .await
    .unwrap_or_else(|err| panic!("{err} (build the image: kernel-image/build.sh)"));
    server_on(Arc::new(sandbox)).await
}

async fn local_server() -> TestServer {
    let sandbox = LocalSandbox::new(common::python(), common::temp_state_dir()).expect("local");
    server_on(Arc::new(sandbox)).await
}

/// Runs `body`, then stops the server (removing its containers) even if `body` panicked.
async fn run_against(server: TestServer, body: impl AsyncFnOnce(&TestServer)) {
    use futures::FutureExt;
    let outcome = std::panic::AssertUnwindSafe(body(&server))
        .catch_unwind()
        .await;
    server.stop().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

fn files_url(server: &TestServer, id: &str, path: &str) -> String {
    server.url(&format!("/v1/sessions/{id}/files/{path}"))
}

async fn put(server: &TestServer, id: &str, path: &str, body: Vec<u8>) -> (u16, Value) {
    let resp = server
        .http()
        .put(files_url(server, id, path))
        .bearer_auth(&server.token)
        .body(body)
        .send()
        .await
        .expect("PUT");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn get(server: &TestServer, id: &str, path: &str) -> (u16, Vec<u8>) {
    let resp = server
        .http()
        .get(files_url(server, id, path))
        .bearer_auth(&server.token)
        .send()
        .await
        .expect("GET");
    let status = resp.status().as_u16();
    (status, resp.bytes().await.expect("body").to_vec())
}

async fn list(server: &TestServer, id: &str, dir: Option<&str>) -> (u16, Value) {
    let mut request = server
        .http()
        .get(server.url(&format!("/v1/sessions/{id}/files")))
        .bearer_auth(&server.token);
    if let Some(dir) = dir {
        request = request.query(&[("path", dir)]);
    }
    let resp = request.send().await.expect("list");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn delete(server: &TestServer, id: &str, path: &str) -> u16 {
    server
        .http()
        .delete(files_url(server, id, path))
        .bearer_auth(&server.token)
        .send()
        .await
        .expect("DELETE")
        .status()
        .as_u16()
}

/// Sends a request exactly as written (HTTP clients normalise `..` and `%2e%2e` away) and
/// returns the status and body.
async fn raw(server: &TestServer, method: &str, target: &str, body: &[u8]) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        server.addr,
        server.token,
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    // The server may answer (and close) before reading the whole body.
    let _ = stream.write_all(body).await;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

fn names(listing: &Value) -> Vec<String> {
    listing["entries"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter_map(|e| e["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Upload → read it in a cell → the cell writes `output/result.txt` → `done.files` lists it →
/// download it and compare; list; delete.
async fn upload_compute_download(server: &TestServer) {
    let (id, mut ws) = server.session().await;
    let csv = b"a,b\n1,2\n3,4\n".to_vec();
    let (status, entry) = put(server, &id, "data/input.csv", csv.clone()).await;
    assert_eq!(status, 201, "upload: {entry}");
    assert_eq!(entry["path"], "data/input.csv");
    assert_eq!(entry["size"], csv.len());

    let cell = ws
        .run(
            "import os, csv\n\
             rows = list(csv.reader(open('data/input.csv')))\n\
             os.makedirs('output', exist_ok=True)\n\
             total = sum(int(r[0]) + int(r[1]) for r in rows[1:])\n\
             open('output/result.txt', 'w').write(f'total={total}\\n')\n\
             print(len(rows))",
        )
        .await;
    assert_eq!(cell.status(), "ok", "{:?}", cell.events);
    assert_eq!(cell.stdout(), "3\n");
    let done = cell.events.last().expect("done");
    let files = done["files"].as_array().expect("done.files");
    assert_eq!(files.len(), 1, "{done}");
    assert_eq!(files[0]["path"], "output/result.txt");
    assert_eq!(files[0]["size"], "total=10\n".len());
    assert!(
        files[0]["modified"]
            .as_str()
            .is_some_and(|m| m.ends_with('Z'))
    );

    // A cell that writes nothing lists nothing.
    let quiet = ws.run("x = 1").await;
    assert_eq!(
        quiet.events.last().expect("done")["files"],
        serde_json::json!([])
    );

    // A cell that fails still reports what it wrote before failing.
    let failing = ws
        .run("open('output/zz_partial.txt', 'w').write('half'); 1/0")
        .await;
    assert_eq!(failing.status(), "error", "{:?}", failing.events);
    let done = failing.events.last().expect("done");
    assert_eq!(done["files"][0]["path"], "output/zz_partial.txt", "{done}");
    assert_eq!(done["files"].as_array().map(Vec::len), Some(1), "{done}");

    let (status, bytes) = get(server, &id, "output/result.txt").await;
    assert_eq!(status, 200);
    assert_eq!(bytes, b"total=10\n");
    let (status, bytes) = get(server, &id, "data/input.csv").await;
    assert_eq!((status, bytes), (200, csv));

    let (status, root) = list(server, &id, None).await;
    assert_eq!(status, 200, "{root}");
    let root_names = names(&root);
    assert!(root_names.contains(&"data".to_owned()), "{root}");
    assert!(root_names.contains(&"output".to_owned()), "{root}");
    let data = root["entries"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == "data"))
        .expect("data entry");
    assert_eq!(data["is_dir"], true);
    let (status, output) = list(server, &id, Some("output")).await;
    assert_eq!(status, 200);
    let result = &output["entries"][0];
    assert_eq!(result["name"], "result.txt");
    assert_eq!(result["path"], "output/result.txt");
    assert_eq!(result["size"], 9);
    assert_eq!(result["is_dir"], false);

    assert_eq!(delete(server, &id, "output/result.txt").await, 204);
    assert_eq!(get(server, &id, "output/result.txt").await.0, 404);
    assert_eq!(delete(server, &id, "output/result.txt").await, 404);
    assert_eq!(delete(server, &id, "data").await, 204);
    let cell = ws.run("import os; print(os.path.exists('data'))").await;
    assert_eq!(cell.stdout(), "False\n");

    // Missing things are 404 with a message.
    let (status, body) = raw(
        server,
        "GET",
        &format!("/v1/sessions/{id}/files/nope.txt"),
        b"",
    )
    .await;
    assert_eq!(status, 404);
    assert!(body.contains("no such file"), "{body}");
    assert_eq!(list(server, &id, Some("nope")).await.0, 404);
    assert_eq!(get(server, "no-such-session", "x").await.0, 404);
}

/// `..`, its percent-encoded form, absolute paths and symlinks leading out are refused with 400.
async fn traversal_is_rejected(server: &TestServer) {
    let (id, mut ws) = server.session().await;
    let base = format!("/v1/sessions/{id}/files");
    for target in [
        format!("{base}/../x"),
        format!("{base}/a/../../x"),
        format!("{base}/%2e%2e/x"),
        format!("{base}/%2E%2E%2Fx"),
        format!("{base}//etc/passwd"),
        format!("{base}/%2Fetc%2Fpasswd"),
        format!("{base}?path=..%2F.."),
        format!("{base}?path=%2Fetc"),
    ] {
        // The listing (`?path=`) only answers GET.
        let methods: &[&str] = if target.contains('?') {
            &["GET"]
        } else {
            &["GET", "PUT", "DELETE"]
        };
        for method in methods {
            let (status, body) = raw(server, method, &target, b"x").await;
            assert_eq!(status, 400, "{method} {target}: {body}");
            assert!(
                body.contains("not allowed"),
                "{method} {target}: unclear message {body}"
            );
        }
    }
    // A symlink the kernel made, pointing out of the working dir.
    let cell = ws
        .run("import os; os.symlink('/etc', 'etc_link'); os.symlink('/', 'root_link')")
        .await;
    assert_eq!(cell.status(), "ok", "{:?}", cell.events);
    for path in ["etc_link/passwd", "root_link/tmp/x"] {
        let (status, body) = raw(server, "GET", &format!("{base}/{path}"), b"").await;
        assert_eq!(status, 400, "GET {path}: {body}");
        assert!(body.contains("outside"), "{body}");
        let (status, body) = raw(server, "PUT", &format!("{base}/{path}"), b"x").await;
        assert_eq!(status, 400, "PUT {path}: {body}");
    }
    let (status, body) = raw(server, "GET", &format!("{base}?path=etc_link"), b"").await;
    assert_eq!(status, 400, "{body}");
    // Deleting the link removes the link, not what it points to.
    assert_eq!(delete(server, &id, "etc_link").await, 204);
    let cell = ws
        .run("import os; print(os.path.lexists('etc_link'), os.path.exists('/etc/passwd'))")
        .await;
    assert_eq!(cell.stdout(), "False True\n");
    // Special files are not served (a FIFO would block a reader forever).
    let cell = ws.run("import os; os.mkfifo('pipe')").await;
    assert_eq!(cell.status(), "ok", "{:?}", cell.events);
    let (status, body) = raw(server, "GET", &format!("{base}/pipe"), b"").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a regular file"), "{body}");
    // A symlink staying inside is followed.
    assert_eq!(
        put(server, &id, "real/f.txt", b"inside".to_vec()).await.0,
        201
    );
    let cell = ws.run("import os; os.symlink('real', 'alias')").await;
    assert_eq!(cell.status(), "ok");
    assert_eq!(
        get(server, &id, "alias/f.txt").await,
        (200, b"inside".to_vec())
    );
}

/// Uploads over the limit get 413 with a message, whether the size is declared or not, and
/// leave nothing behind.
async fn oversize_upload_is_413(server: &TestServer) {
    let (id, _ws) = server.session().await;
    let big = vec![b'x'; (LIMIT + 1) as usize];
    let (status, body) = put(server, &id, "big.bin", big).await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|m| m.contains("upload limit of 1048576 bytes")),
        "{body}"
    );
    // Without a Content-Length (chunked), the server counts and stops.
    let chunks = futures::stream::iter(
        (0..20).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'y'; 100_000]))),
    );
    let resp = server
        .http()
        .put(files_url(server, &id, "chunked.bin"))
        .bearer_auth(&server.token)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    if let Ok(resp) = resp {
        assert_eq!(resp.status(), 413);
    }
    assert_eq!(get(server, &id, "big.bin").await.0, 404);
    assert_eq!(get(server, &id, "chunked.bin").await.0, 404);
    let (_, root) = list(server, &id, None).await;
    assert_eq!(names(&root), Vec::<String>::new(), "{root}");
    // Just under the limit is fine, and comes back intact.
    let payload: Vec<u8> = (0..LIMIT).map(|i| (i % 251) as u8).collect();
    assert_eq!(put(server, &id, "max.bin", payload.clone()).await.0, 201);
    let (status, bytes) = get(server, &id, "max.bin").await;
    assert_eq!(status, 200);
    assert!(bytes == payload, "the download differs from the upload");
}

/// Files stay reachable while the kernel restarts and after it died.
async fn files_outlive_the_kernel(server: &TestServer) {
    let (id, mut ws) = server.session().await;
    assert_eq!(put(server, &id, "keep.txt", b"kept".to_vec()).await.0, 201);
    ws.send(serde_json::json!({"type": "restart"})).await;
    ws.wait_kernel("restarting").await;
    assert_eq!(get(server, &id, "keep.txt").await, (200, b"kept".to_vec()));
    ws.wait_kernel("idle").await;
    let cell = ws.run("print(open('keep.txt').read())").await;
    assert_eq!(cell.stdout(), "kept\n");
    ws.submit("import os; os._exit(1)").await;
    ws.wait_kernel("dead").await;
    assert_eq!(get(server, &id, "keep.txt").await, (200, b"kept".to_vec()));
    assert_eq!(put(server, &id, "after.txt", b"x".to_vec()).await.0, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_upload_compute_download() {
    run_against(
        docker_server(WorkDirStorage::KeptTmpfs).await,
        upload_compute_download,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_traversal_is_rejected() {
    run_against(
        docker_server(WorkDirStorage::KeptTmpfs).await,
        traversal_is_rejected,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_oversize_upload_is_413() {
    run_against(
        docker_server(WorkDirStorage::KeptTmpfs).await,
        oversize_upload_is_413,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_files_outlive_the_kernel() {
    run_against(
        docker_server(WorkDirStorage::KeptTmpfs).await,
        files_outlive_the_kernel,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_host_dir_upload_compute_download_and_traversal() {
    run_against(docker_server(WorkDirStorage::HostDir).await, async |s| {
        upload_compute_download(s).await;
        traversal_is_rejected(s).await;
    })
    .await;
}

/// A kernel started through the Jupyter API is a session too: the same endpoints serve its
/// working directory, with the kernel id as the session id.
async fn jupyter_kernels_have_files(server: &TestServer) {
    let resp = server
        .http()
        .post(server.url("/api/kernels"))
        .bearer_auth(&server.token)
        .json(&serde_json::json!({"name": "python3"}))
        .send()
        .await
        .expect("POST /api/kernels");
    assert_eq!(resp.status(), 201);
    let kernel: Value = resp.json().await.expect("json");
    let id = kernel["id"].as_str().expect("kernel id").to_owned();
    assert_eq!(
        put(server, &id, "from-rest.txt", b"hello".to_vec()).await.0,
        201
    );
    let base = format!("ws://{}/api/kernels/{id}/channels", server.addr);
    let mut ws = common::jupyter::JupyterWs::connect(&base, "files-test", &server.token).await;
    let run = ws
        .execute(
            "import os; os.makedirs('output', exist_ok=True)\n\
             open('output/echo.txt', 'w').write(open('from-rest.txt').read() * 2)",
        )
        .await;
    assert_eq!(run.reply["content"]["status"], "ok", "{:?}", run.reply);
    assert_eq!(
        get(server, &id, "output/echo.txt").await,
        (200, b"hellohello".to_vec())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_files() {
    run_against(local_server().await, async |s| {
        upload_compute_download(s).await;
        traversal_is_rejected(s).await;
        oversize_upload_is_413(s).await;
        jupyter_kernels_have_files(s).await;
    })
    .await;
}
