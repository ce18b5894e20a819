//! Session limits hold under concurrency (issue 12): many `POST /v1/sessions` at once against a
//! small limit start exactly the limit's sessions, and the others get `429` with a message,
//! for the server's `max_sessions` and for a token's own limit.
//!
//! Real local kernels, started by a backend that takes half a second per launch: the window
//! in which concurrent creates used to pass the check before any of them was counted.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::TestServer;
use kernelbox::api::{ApiToken, Token, Tokens};
use kernelbox::sandbox::local::LocalSandbox;
use kernelbox::sandbox::{KernelProcess, LaunchSpec, Sandbox, SandboxError};
use kernelbox::session::SessionOptions;
use serde_json::Value;

const ALICE: &str = "alice-secret-0123456789";
const BOB: &str = "bob-secret-0123456789ab";

/// The local backend, each launch taking half a second longer.
struct SlowLaunch(LocalSandbox);

#[async_trait]
impl Sandbox for SlowLaunch {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    async fn launch(&self, spec: &LaunchSpec) -> Result<Box<dyn KernelProcess>, SandboxError> {
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.0.launch(spec).await
    }
    async fn cleanup_except(&self, keep: &HashSet<String>) -> Result<usize, SandboxError> {
        self.0.cleanup_except(keep).await
    }
}

async fn server(max_sessions: usize, alice_limit: Option<usize>) -> TestServer {
    let local = LocalSandbox::new(common::python(), common::temp_state_dir()).expect("sandbox");
    let options = SessionOptions {
        max_sessions,
        pool_size: 0,
        ..SessionOptions::default()
    };
    TestServer::start_configured(Arc::new(SlowLaunch(local)), options, move |state| {
        state.with_tokens(Tokens::new(
            vec![
                ApiToken::new("alice", &Token::new(ALICE), alice_limit),
                ApiToken::new("bob", &Token::new(BOB), None),
            ],
            None,
        ))
    })
    .await
}

/// Fires `n` creates by `token` at once; the statuses, and the 429s' messages.
async fn create_at_once(server: &TestServer, token: &str, n: usize) -> (Vec<u16>, Vec<String>) {
    let creates = (0..n).map(|_| async {
        let resp = server
            .http()
            .post(server.url("/v1/sessions"))
            .bearer_auth(token)
            .send()
            .await
            .expect("POST /v1/sessions");
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        (
            status,
            body["error"].as_str().unwrap_or_default().to_owned(),
        )
    });
    let outcomes = futures::future::join_all(creates).await;
    let statuses = outcomes.iter().map(|(s, _)| *s).collect();
    let refusals = outcomes
        .into_iter()
        .filter(|(s, _)| *s == 429)
        .map(|(_, m)| m)
        .collect();
    (statuses, refusals)
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_stop_at_the_server_limit() {
    common::run_against(server(3, None).await, async |server| {
        let (statuses, refusals) = create_at_once(server, BOB, 12).await;
        assert_eq!(count(&statuses, 201), 3, "{statuses:?}");
        assert_eq!(count(&statuses, 429), 9, "{statuses:?}");
        assert!(
            refusals.iter().all(|m| m.contains("maximum of 3 sessions")),
            "{refusals:?}"
        );
        assert_eq!(server.sessions.list().len(), 3);
        // A refused create took no slot: after closing one, one more fits.
        let id = server.sessions.list()[0].id.to_string();
        server.sessions.remove(&id).await.expect("remove");
        let (statuses, _) = create_at_once(server, BOB, 4).await;
        assert_eq!(count(&statuses, 201), 1, "{statuses:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_stop_at_the_tokens_limit() {
    common::run_against(server(20, Some(2)).await, async |server| {
        let (statuses, refusals) = create_at_once(server, ALICE, 10).await;
        assert_eq!(count(&statuses, 201), 2, "{statuses:?}");
        assert_eq!(count(&statuses, 429), 8, "{statuses:?}");
        assert!(
            refusals
                .iter()
                .all(|m| m.contains("this token holds its maximum of 2 sessions")),
            "{refusals:?}"
        );
        // Another token is not held back by alice's slots.
        let (statuses, _) = create_at_once(server, BOB, 2).await;
        assert_eq!(count(&statuses, 201), 2, "{statuses:?}");
    })
    .await;
}
