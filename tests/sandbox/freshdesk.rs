//! The Freshdesk dialect (`SandboxConfig.api = "freshdesk"`): basic auth with the API key,
//! bare arrays paged with a `link` header, Freshdesk's rate-limit headers, a search that lags
//! and cannot match a subject, a reply as a conversation, 405 for changing a deleted ticket.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

async fn call(
    sb: &mailcanary::sandbox::Sandbox,
    method: reqwest::Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut r = http()
        .request(method, format!("{}/api/v2/{path}", sb.api_url()))
        .basic_auth(key, Some("X"));
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    (status, headers, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn freshdesk_dialect_speaks_api_v2() {
    use reqwest::Method;
    let sb = start_with(|c| {
        c.api = "freshdesk".into();
        c.search_lag = Duration::from_secs(60);
        c.rate_limit = Some(1000);
    })
    .await;
    for i in 0..3 {
        send(
            &sb,
            "dora@customer.test",
            &format!("Help fd-{i}"),
            "body <b>",
        )
        .await
        .unwrap();
    }
    let list = eventually(Duration::from_secs(5), "3 tickets", || async {
        let (_, _, v) = call(&sb, Method::GET, "tickets?include=description", TOKEN, None).await;
        (v.as_array()?.len() == 3).then_some(v)
    })
    .await;
    assert_eq!(list[0]["subject"], "Help fd-2", "newest first: {list}");
    assert_eq!(list[0]["description_text"], "body <b>\r\n");
    assert_eq!(list[0]["source"], 1);
    assert_eq!(list[0]["status"], 2);

    // Auth: the key as the user, any password; another key is 401.
    let (s, _, _) = call(&sb, Method::GET, "tickets", "wrong-key", None).await;
    assert_eq!(s, 401);

    // Pages: a link to the next while more follow; Freshdesk's rate-limit headers.
    let (s, h, v) = call(&sb, Method::GET, "tickets?per_page=2", TOKEN, None).await;
    assert_eq!((s, v.as_array().unwrap().len()), (200, 2));
    let link = h["link"].to_str().unwrap();
    assert!(
        link.contains("page=2") && link.ends_with("rel=\"next\""),
        "{link}"
    );
    assert_eq!(h["x-ratelimit-total"], "1000");
    assert!(h.contains_key("x-ratelimit-remaining"));
    let (_, h, v) = call(&sb, Method::GET, "tickets?per_page=2&page=2", TOKEN, None).await;
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert!(!h.contains_key("link"));

    // Search: a minute behind, and no subject field at all.
    let (s, _, v) = call(
        &sb,
        Method::GET,
        "search/tickets?query=%22status:2%22",
        TOKEN,
        None,
    )
    .await;
    assert_eq!((s, &v["total"]), (200, &json!(0)), "{v}");
    let (s, _, v) = call(
        &sb,
        Method::GET,
        "search/tickets?query=%22subject:'fd-1'%22",
        TOKEN,
        None,
    )
    .await;
    assert_eq!(s, 400, "{v}");

    // A reply is an outgoing public conversation, mailed as text.
    let id = list[0]["id"].as_u64().unwrap();
    let (s, _, v) = call(
        &sb,
        Method::POST,
        &format!("tickets/{id}/reply"),
        TOKEN,
        Some(json!({"body": "<div>Hi &amp; bye<br>mcreply-x</div>"})),
    )
    .await;
    assert_eq!(
        (s, &v["incoming"], &v["private"]),
        (201, &json!(false), &json!(false)),
        "{v}"
    );
    assert_eq!(v["body_text"], "Hi & bye\nmcreply-x\n");
    let (_, _, v) = call(
        &sb,
        Method::GET,
        &format!("tickets/{id}/conversations"),
        TOKEN,
        None,
    )
    .await;
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");

    // Close, delete (to the trash), then changing it is 405 and deleting again 404.
    let (s, _, v) = call(
        &sb,
        Method::PUT,
        &format!("tickets/{id}"),
        TOKEN,
        Some(json!({"status": 5})),
    )
    .await;
    assert_eq!((s, &v["status"]), (200, &json!(5)));
    let (s, _, _) = call(&sb, Method::DELETE, &format!("tickets/{id}"), TOKEN, None).await;
    assert_eq!(s, 204);
    let (s, _, _) = call(
        &sb,
        Method::PUT,
        &format!("tickets/{id}"),
        TOKEN,
        Some(json!({"status": 2})),
    )
    .await;
    assert_eq!(s, 405);
    let (s, _, _) = call(&sb, Method::DELETE, &format!("tickets/{id}"), TOKEN, None).await;
    assert_eq!(s, 404);
    let (_, _, v) = call(&sb, Method::GET, "tickets", TOKEN, None).await;
    assert_eq!(
        v.as_array().unwrap().len(),
        2,
        "a deleted ticket is not listed"
    );
    let (_, _, v) = call(&sb, Method::GET, "tickets?filter=deleted", TOKEN, None).await;
    assert_eq!(v[0]["deleted"], true, "{v}");
    sb.shutdown().await;
}
