//! The REST API and authentication, against a real server on the local backend.

mod common;

use common::TestServer;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_can_be_created_listed_read_and_deleted() {
    let server = TestServer::local().await;
    let http = server.http();
    let resp = http
        .post(server.url("/v1/sessions"))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let created: Value = resp.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["ws_path"], format!("/v1/sessions/{id}/ws"));
    assert_eq!(
        created["ws_url"],
        format!("ws://{}/v1/sessions/{id}/ws", server.addr)
    );
    assert_eq!(created["backend"], "local");

    let list: Vec<Value> = http
        .get(server.url("/v1/sessions"))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(list.iter().any(|s| s["id"] == id.as_str()));

    let one = http
        .get(server.url(&format!("/v1/sessions/{id}")))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 200);

    let gone = http
        .delete(server.url(&format!("/v1/sessions/{id}")))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 204);
    let missing = http
        .get(server.url(&format!("/v1/sessions/{id}")))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains(&id));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_wrong_token_is_401_on_rest_and_websocket() {
    let server = TestServer::local().await;
    let http = server.http();
    let none = http.get(server.url("/v1/sessions")).send().await.unwrap();
    assert_eq!(none.status(), 401);
    let body: Value = none.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("token"));
    let wrong = http
        .get(server.url("/v1/sessions"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let create = http
        .post(server.url("/v1/sessions"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(create.status(), 401);

    let id = server.create_session().await;
    for url in [
        format!("ws://{}/v1/sessions/{id}/ws", server.addr),
        format!("ws://{}/v1/sessions/{id}/ws?token=wrong", server.addr),
    ] {
        let err = tokio_tungstenite::connect_async(url)
            .await
            .expect_err("upgrade must fail");
        match err {
            tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 401),
            other => panic!("expected HTTP 401, got {other:?}"),
        }
    }
    // The bearer header works for the upgrade too.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{}/v1/sessions/{id}/ws", server.addr)
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", server.token).parse().unwrap(),
    );
    tokio_tungstenite::connect_async(request)
        .await
        .expect("bearer upgrade");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sessions_and_bad_bodies_get_clear_errors() {
    let server = TestServer::local().await;
    let http = server.http();
    let resp = http
        .get(server.url("/v1/sessions/nope"))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let del = http
        .delete(server.url("/v1/sessions/nope"))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 404);
    let bad = http
        .post(server.url("/v1/sessions"))
        .bearer_auth(&server.token)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("invalid session request")
    );
    let ws = tokio_tungstenite::connect_async(format!(
        "ws://{}/v1/sessions/nope/ws?token={}",
        server.addr, server.token
    ))
    .await;
    match ws {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 404),
        other => panic!("expected 404, got {:?}", other.map(|_| ())),
    }
    let health: Value = http
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    server.stop().await;
}

/// No test of this binary installs a metrics recorder: `/metrics` says so instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_without_a_recorder_answer_503() {
    let server = TestServer::local().await;
    let resp = server
        .http()
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.text().await.unwrap().contains("not enabled"));
    server.stop().await;
}
