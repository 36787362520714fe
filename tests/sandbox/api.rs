//! The SupportBee-shaped API: auth, JSON shapes, replies, archive/trash/delete, faults.

use std::time::Duration;

use serde_json::Value;

use crate::common::*;

async fn ticket_for(sb: &mailcanary::sandbox::Sandbox, tok: &str) -> Value {
    send(
        sb,
        "dora@customer.test",
        &format!("Need help {tok}"),
        "body text",
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(5), "ticket", || async {
        search(sb, tok).await.into_iter().next()
    })
    .await
}

async fn post(url: &str, body: &str) -> (u16, Value) {
    let r = http()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn token_is_required_and_checked() {
    let sb = start().await;
    let base = sb.api_url();
    assert_eq!(get_json(&format!("{base}/tickets")).await.0, 401);
    assert_eq!(
        get_json(&format!("{base}/tickets?auth_token=wrong"))
            .await
            .0,
        401
    );
    assert_eq!(
        get_json(&format!("{base}/tickets/search?query=x")).await.0,
        401
    );
    let (s, body) = get_json(&format!("{base}/tickets?auth_token={TOKEN}")).await;
    assert_eq!(s, 200);
    assert_eq!(body["total"], 0);
    assert!(body["tickets"].as_array().unwrap().is_empty());
    // /health and /sandbox/* need no token.
    assert_eq!(get_json(&format!("{base}/health")).await.0, 200);
    assert_eq!(get_json(&format!("{base}/sandbox/faults")).await.0, 200);
    sb.shutdown().await;
}

#[tokio::test]
async fn reply_archive_trash_delete() {
    let sb = start().await;
    let tok = token();
    let t = ticket_for(&sb, &tok).await;
    let id = t["id"].as_u64().unwrap();
    let base = sb.api_url();

    // Malformed JSON and a wrong shape are 400; an unknown ticket is 404.
    let url = format!("{base}/tickets/{id}/replies?auth_token={TOKEN}");
    assert_eq!(post(&url, "{not json").await.0, 400);
    assert_eq!(post(&url, r#"{"reply":{"body":"x"}}"#).await.0, 400);
    let missing = format!("{base}/tickets/999999/replies?auth_token={TOKEN}");
    let ok_body = r#"{"reply":{"content_attributes":{"body":"On it."}}}"#;
    assert_eq!(post(&missing, ok_body).await.0, 404);

    let (s, reply) = post(&url, ok_body).await;
    assert_eq!(s, 201);
    assert_eq!(reply["reply"]["content"]["body"], "On it.");
    let ev = eventually(Duration::from_secs(5), "delivery event", || async {
        sb.events()
            .into_iter()
            .find(|e| e.ticket_id == Some(id) && e.delivered_at.is_some())
    })
    .await;
    assert!(ev.reply_posted_at.unwrap() <= ev.delivered_at.unwrap());
    assert!(ev.received_at <= ev.ticket_created_at.unwrap());

    // Deleting an untrashed ticket is refused; archive hides it from the default list.
    let del = format!("{base}/tickets/{id}?auth_token={TOKEN}");
    assert_eq!(http().delete(&del).send().await.unwrap().status(), 422);
    let arch = format!("{base}/tickets/{id}/archive?auth_token={TOKEN}");
    assert_eq!(post(&arch, "").await.0, 204);
    let (_, list) = get_json(&format!("{base}/tickets?auth_token={TOKEN}")).await;
    assert_eq!(list["total"], 0);
    let (_, list) = get_json(&format!("{base}/tickets?auth_token={TOKEN}&archived=true")).await;
    assert_eq!(list["total"], 1);
    let trash = format!("{base}/tickets/{id}/trash?auth_token={TOKEN}");
    assert_eq!(post(&trash, "").await.0, 204);
    assert_eq!(http().delete(&del).send().await.unwrap().status(), 204);
    assert_eq!(http().delete(&del).send().await.unwrap().status(), 404);
    sb.shutdown().await;
}

#[tokio::test]
async fn api_error_is_500_and_health_follows_only_the_api_fault() {
    let sb = start().await;
    let base = sb.api_url();
    // Every other stage faulted: the web app still looks healthy (the seed's outage).
    set_fault(
        &sb,
        r#"{"inbound":"error","import":"stall","outbound":"drop","mailbox":"error"}"#,
    )
    .await;
    assert_eq!(get_json(&format!("{base}/health")).await.0, 200);
    assert_eq!(
        get_json(&format!("{base}/tickets?auth_token={TOKEN}"))
            .await
            .0,
        200
    );

    set_fault(&sb, r#"{"api":"error"}"#).await;
    assert_eq!(get_json(&format!("{base}/health")).await.0, 500);
    assert_eq!(
        get_json(&format!("{base}/tickets?auth_token={TOKEN}"))
            .await
            .0,
        500
    );
    // The control endpoints are never faulted, so the fault can be cleared.
    let (s, faults) = get_json(&format!("{base}/sandbox/faults")).await;
    assert_eq!(s, 200);
    assert_eq!(faults["api"], "error");
    assert_eq!(faults["import"], "stall");
    let r = set_fault(&sb, r#"{"api":"ok"}"#).await;
    assert_eq!(r.status(), 200);
    assert_eq!(get_json(&format!("{base}/health")).await.0, 200);
    sb.shutdown().await;
}

#[tokio::test]
async fn bad_fault_requests_change_nothing() {
    let sb = start().await;
    assert_eq!(set_fault(&sb, "{oops").await.status(), 400);
    assert_eq!(
        set_fault(&sb, r#"{"import":"explode"}"#).await.status(),
        400
    );
    assert_eq!(
        set_fault(&sb, r#"{"import":"stall","nonsense":"ok"}"#)
            .await
            .status(),
        400
    );
    let (_, faults) = get_json(&format!("{}/sandbox/faults", sb.api_url())).await;
    assert_eq!(
        faults["import"], "ok",
        "a rejected request must not half-apply"
    );
    let r = set_fault(&sb, r#"{"outbound":"delay:250ms"}"#).await;
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["outbound"], "delay:250ms");
    sb.shutdown().await;
}

/// `search_lag`: a new ticket is hidden from search endpoints for a while, as a vendor's
/// search index lags; the list sees it at once.
#[tokio::test]
async fn search_lags_and_the_list_does_not() {
    let sb = start_with(|c| c.search_lag = Duration::from_millis(1_500)).await;
    send(&sb, "lag@example.com", "lagging-7f3", "body")
        .await
        .unwrap();
    let list = format!("{}/tickets?auth_token={TOKEN}&per_page=100", sb.api_url());
    let t0 = std::time::Instant::now();
    eventually(Duration::from_secs(5), "the ticket in the list", || async {
        let (_, v) = get_json(&list).await;
        v["tickets"]
            .as_array()?
            .iter()
            .find(|t| t["subject"] == "lagging-7f3")
            .cloned()
    })
    .await;
    assert!(
        search(&sb, "lagging-7f3").await.is_empty(),
        "search saw it at once"
    );
    eventually(Duration::from_secs(5), "search to catch up", || async {
        (!search(&sb, "lagging-7f3").await.is_empty()).then_some(())
    })
    .await;
    assert!(t0.elapsed() >= Duration::from_millis(1_000));
    sb.shutdown().await;
}

/// `rate_limit`: past N requests a minute, 429 with `Retry-After`; until then, answered.
#[tokio::test]
async fn past_the_rate_limit_the_api_answers_429_with_retry_after() {
    let sb = start_with(|c| c.rate_limit = Some(3)).await;
    let list = format!("{}/tickets?auth_token={TOKEN}", sb.api_url());
    for _ in 0..3 {
        assert_eq!(get_json(&list).await.0, 200);
    }
    let r = http().get(&list).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    // The sandbox's own control endpoints are never limited: a fault can always be cleared.
    assert_eq!(
        set_fault(&sb, r#"{"api":"ok"}"#).await.status().as_u16(),
        200
    );
    sb.shutdown().await;
}

/// `webhook_url`: every new ticket is pushed, in the `--api` dialect's scheme (SupportBee:
/// `{"ticket": …}` with the bearer secret).
#[tokio::test]
async fn a_new_ticket_is_pushed_to_the_webhook_url() {
    use axum::{Router, body::Bytes, http::HeaderMap, routing::post};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Value)>();
    let app = Router::new().route(
        "/hook",
        post(move |headers: HeaderMap, body: Bytes| {
            let tx = tx.clone();
            async move {
                let auth = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let _ = tx.send((auth, serde_json::from_slice(&body).unwrap_or(Value::Null)));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let sb = start_with(|c| {
        c.webhook_url = Some(url);
        c.webhook_secret = "hook-s3cret".into();
    })
    .await;
    send(&sb, "hook@example.com", "pushed-91c", "body")
        .await
        .unwrap();
    let (auth, v) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a webhook within 5 s")
        .unwrap();
    assert_eq!(auth, "Bearer hook-s3cret");
    assert_eq!(v["ticket"]["subject"], "pushed-91c", "{v}");
    sb.shutdown().await;
}

/// Zammad's dialect: its query search is the lagging index, its condition search and its
/// ticket list are the database (seen at once); `/api/v1/` lives beside django-helpdesk's
/// `/api/` and needs `Token token=…`.
#[tokio::test]
async fn zammad_query_search_lags_and_its_condition_search_does_not() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sb = start_with(|c| c.search_lag = Duration::from_secs(60)).await;
    send(&sb, "lag@example.com", "zammad-lag-5c1", "body")
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let api = sb.api_url();
    let condition = || {
        client
            .post(format!("{api}/api/v1/tickets/search?expand=true"))
            .header("authorization", format!("Token token={TOKEN}"))
            .json(&serde_json::json!({
                "condition": {"ticket.title": {"operator": "contains", "value": "zammad-lag-5c1"}},
                "sort_by": "created_at", "order_by": "desc", "limit": 20,
            }))
            .send()
    };
    let found = eventually(Duration::from_secs(5), "the condition search", || async {
        let v: Value = condition().await.ok()?.json().await.ok()?;
        v.as_array()?.first().cloned()
    })
    .await;
    assert_eq!(found["title"], "zammad-lag-5c1");
    assert_eq!(found["state"], "new");
    let query: Value = client
        .get(format!(
            "{api}/api/v1/tickets/search?query=%22zammad-lag-5c1%22&expand=true"
        ))
        .header("authorization", format!("Token token={TOKEN}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(query, serde_json::json!([]), "the index has not caught up");
    let denied = client
        .get(format!("{api}/api/v1/tickets"))
        .header("authorization", format!("Token {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 401, "Zammad's scheme is `Token token=…`");
    sb.shutdown().await;
}
