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
