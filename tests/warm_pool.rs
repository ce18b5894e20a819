//! The warm pool hands ready kernels to new sessions and refills itself.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TestServer, python, temp_state_dir};
use kernelbox::sandbox::local::LocalSandbox;
use kernelbox::session::SessionOptions;

async fn wait_for_pool(server: &TestServer, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.sessions.pool_ready() < n {
        assert!(
            Instant::now() < deadline,
            "pool never reached {n} ready kernels"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_takes_a_ready_kernel_and_the_pool_refills() {
    let sandbox = LocalSandbox::new(python(), temp_state_dir()).expect("sandbox");
    let options = SessionOptions {
        pool_size: 2,
        ..SessionOptions::default()
    };
    let server = TestServer::start(Arc::new(sandbox), options).await;
    wait_for_pool(&server, 2).await;

    let id = server.create_session().await;
    let session = server.sessions.get(&id).expect("session");
    assert_eq!(
        session.info().state.as_str(),
        "idle",
        "a pooled kernel is ready at once"
    );
    assert!(server.sessions.pool_ready() <= 1);
    let mut ws = server.ws(&id).await;
    assert_eq!(ws.run("6 * 7").await.result_text().as_deref(), Some("42"));

    wait_for_pool(&server, 2).await;
    server.stop().await;
}
