//! The SupportBee client against the sandbox, and against axum apps that misbehave on purpose.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, SystemTime},
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use mailcanary::{
    canary::life::Reason,
    edges::helpdesk::{
        CleanupMode, Helpdesk, HelpdeskError, RetryPolicy, SupportBee, SupportBeeParams, TicketRef,
    },
    sandbox::{Fault, Sandbox, Stage},
};
use serde_json::{Value, json};

use crate::{API_TOKEN, closed_port, eventually, sandbox, send_canary, serve, token};

fn params(base_url: String) -> SupportBeeParams {
    SupportBeeParams {
        timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            attempts: 3,
            base_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(500),
        },
        ..SupportBeeParams::new(base_url, API_TOKEN)
    }
}

fn helpdesk(base_url: String) -> Helpdesk {
    Helpdesk::new(SupportBee::new(params(base_url)).unwrap())
}

/// Every error detail is free of the API token, however it was produced.
fn assert_no_token(err: &HelpdeskError) {
    for text in [
        err.to_string(),
        err.detail().to_string(),
        format!("{err:?}"),
    ] {
        assert!(!text.contains(API_TOKEN), "token leaked: {text}");
    }
}

async fn find(hd: &Helpdesk, tok: &str, since: SystemTime) -> TicketRef {
    eventually(Duration::from_secs(5), "the canary's ticket", || async {
        hd.find_ticket(tok, since).await.expect("find_ticket")
    })
    .await
}

/// `GET /tickets/{id}` straight from the sandbox (status, ticket JSON).
async fn ticket_json(sb: &Sandbox, id: &str) -> (u16, Value) {
    let url = format!("{}/tickets/{id}?auth_token={API_TOKEN}", sb.api_url());
    let r = reqwest_client().get(url).send().await.unwrap();
    let status = r.status().as_u16();
    (
        status,
        r.json::<Value>().await.unwrap_or(Value::Null)["ticket"].clone(),
    )
}

fn reqwest_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

#[tokio::test]
async fn finds_the_canary_ticket_then_replies() {
    let sb = sandbox().await;
    let hd = helpdesk(sb.api_url());
    let since = SystemTime::now();
    assert_eq!(
        hd.find_ticket(&token(), since).await.unwrap(),
        None,
        "nothing yet"
    );

    let tok = send_canary(&sb).await;
    let ticket = find(&hd, &tok, since).await;
    assert!(ticket.created_at.is_some());
    let (status, json) = ticket_json(&sb, &ticket.id).await;
    assert_eq!(status, 200);
    assert!(json["subject"].as_str().unwrap().contains(&tok));

    hd.post_reply(&ticket, &format!("Agent reply to {tok}"))
        .await
        .unwrap();
    assert_eq!(ticket_json(&sb, &ticket.id).await.1["replies_count"], 1);
    sb.shutdown().await;
}

#[tokio::test]
async fn cleanup_in_every_mode() {
    let sb = sandbox().await;
    let hd = helpdesk(sb.api_url());
    let since = SystemTime::now();
    for mode in [
        CleanupMode::None,
        CleanupMode::Archive,
        CleanupMode::Trash,
        CleanupMode::Delete,
    ] {
        let tok = send_canary(&sb).await;
        let ticket = find(&hd, &tok, since).await;
        hd.cleanup(&ticket, mode).await.unwrap();
        let (status, json) = ticket_json(&sb, &ticket.id).await;
        match mode {
            CleanupMode::None => {
                assert_eq!(
                    (json["archived"].clone(), json["trash"].clone()),
                    (json!(false), json!(false))
                )
            }
            CleanupMode::Archive => assert_eq!(json["archived"], true, "{mode:?}"),
            CleanupMode::Trash => assert_eq!(json["trash"], true, "{mode:?}"),
            CleanupMode::Delete => assert_eq!(status, 404, "{mode:?}: {json}"),
        }
        // Cleaning up again is fine (a restart may repeat it), even once the ticket is gone.
        hd.cleanup(&ticket, mode).await.unwrap();
    }
    sb.shutdown().await;
}

#[tokio::test]
async fn wrong_token_is_auth_without_retry() {
    let sb = sandbox().await;
    let hd = Helpdesk::new(
        SupportBee::new(SupportBeeParams {
            auth_token: "wrong-token-99".into(),
            ..params(sb.api_url())
        })
        .unwrap(),
    );
    let err = hd
        .find_ticket(&token(), SystemTime::now())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), Reason::Auth, "{err}");
    assert_eq!(err.attempts(), 1);
    assert!(err.detail().contains("401"), "{err}");
    assert!(!err.to_string().contains("wrong-token-99"), "{err}");
    sb.shutdown().await;
}

#[tokio::test]
async fn api_error_fault_is_api_after_retries() {
    let sb = sandbox().await;
    let hd = helpdesk(sb.api_url());
    let tok = send_canary(&sb).await;
    let ticket = find(&hd, &tok, SystemTime::now() - Duration::from_secs(60)).await;
    sb.faults().set(Stage::Api, Fault::Error);
    for err in [
        hd.find_ticket(&tok, SystemTime::now()).await.unwrap_err(),
        hd.cleanup(&ticket, CleanupMode::Archive).await.unwrap_err(),
    ] {
        assert_eq!(err.reason(), Reason::Api, "{err}");
        assert_eq!(err.attempts(), 3, "{err}");
        assert!(err.detail().contains("500"), "{err}");
        assert_no_token(&err);
    }
    // A reply POST answered 500 may have been saved (django-helpdesk does): not sent again.
    let err = hd.post_reply(&ticket, "reply").await.unwrap_err();
    assert_eq!(err.reason(), Reason::Api, "{err}");
    assert_eq!(err.attempts(), 1, "{err}");
    assert_no_token(&err);
    sb.faults().set(Stage::Api, Fault::Ok);
    hd.post_reply(&ticket, "reply")
        .await
        .expect("works again once the fault clears");
    sb.shutdown().await;
}

/// How a fake endpoint answers its n-th request (1-based).
type Answer = fn(u32) -> Response;

/// Counts requests; answers with `f(n)` for the n-th.
fn counting(path: &str, f: Answer) -> (Router, Arc<AtomicU32>) {
    let count = Arc::new(AtomicU32::new(0));
    let app = Router::new()
        .route(
            path,
            get(
                |State((count, f)): State<(Arc<AtomicU32>, Answer)>| async move {
                    let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                    f(n)
                },
            ),
        )
        .with_state((count.clone(), f));
    (app, count)
}

fn one_ticket(subject: &str) -> Response {
    Json(json!({
        "total": 1,
        "total_pages": 1,
        "tickets": [{
            "id": 42,
            "subject": subject,
            "created_at": "2026-01-02T03:04:05.678Z",
            "content": {"text": "", "html": ""},
        }],
    }))
    .into_response()
}

#[tokio::test]
async fn two_500s_then_success_is_success_on_the_third_attempt() {
    let (app, count) = counting("/tickets/search", |n| {
        if n <= 2 {
            (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response()
        } else {
            one_ticket("Canary mc-fixed-token")
        }
    });
    let addr = serve(app).await;
    let hd = helpdesk(format!("http://{addr}"));
    let found = hd
        .find_ticket("mc-fixed-token", SystemTime::now())
        .await
        .unwrap();
    let found = found.expect("found on the third attempt");
    assert_eq!(found.id, "42");
    assert_eq!(
        found.created_at,
        Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_767_323_045_678))
    );
    assert_eq!(count.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn nonsense_json_is_api_and_says_what_was_wrong() {
    let (app, count) = counting("/tickets/search", |_| {
        Json(json!({"tickets": "nonsense"})).into_response()
    });
    let addr = serve(app).await;
    let err = helpdesk(format!("http://{addr}"))
        .find_ticket(&token(), SystemTime::now())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), Reason::Api, "{err}");
    assert!(err.detail().contains("unexpected JSON"), "{err}");
    assert!(err.detail().contains("invalid type"), "{err}");
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "a wrong shape is not retried"
    );
    assert_no_token(&err);
}

#[tokio::test]
async fn html_instead_of_json_is_api() {
    let (app, _) = counting("/tickets/search", |_| {
        (
            [(header::CONTENT_TYPE, "text/html")],
            "<html>maintenance</html>",
        )
            .into_response()
    });
    let addr = serve(app).await;
    let err = helpdesk(format!("http://{addr}"))
        .find_ticket(&token(), SystemTime::now())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), Reason::Api, "{err}");
}

/// Search is full-text and may match loosely: a hit whose subject and body lack the token is
/// not the canary's ticket.
#[tokio::test]
async fn a_fuzzy_search_hit_without_the_token_is_not_a_match() {
    let (app, _) = counting("/tickets/search", |_| one_ticket("Canary mc-other"));
    let addr = serve(app).await;
    let hd = Helpdesk::new(
        SupportBee::new(SupportBeeParams {
            list_fallback: false,
            ..params(format!("http://{addr}"))
        })
        .unwrap(),
    );
    assert_eq!(
        hd.find_ticket("mc-wanted", SystemTime::now())
            .await
            .unwrap(),
        None
    );
}

/// No search endpoint (404): the ticket list since the canary was sent is scanned instead.
#[tokio::test]
async fn without_search_the_list_is_scanned() {
    let (app, count) = counting("/tickets", |_| one_ticket("Canary mc-listed"));
    let addr = serve(app).await;
    let found = helpdesk(format!("http://{addr}"))
        .find_ticket("mc-listed", SystemTime::now())
        .await
        .unwrap();
    assert_eq!(found.map(|t| t.id), Some("42".into()));
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn retry_after_is_honoured_up_to_the_cap() {
    // Asks for an hour; the cap (500 ms here) wins, so the call still ends quickly.
    let (app, count) = counting("/tickets/search", |n| {
        if n == 1 {
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, "3600")],
                "slow down",
            )
                .into_response()
        } else {
            one_ticket("mc-after")
        }
    });
    let addr = serve(app).await;
    let started = tokio::time::Instant::now();
    let found = helpdesk(format!("http://{addr}"))
        .find_ticket("mc-after", SystemTime::now())
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(found.is_some());
    assert_eq!(count.load(Ordering::SeqCst), 2);
    // Honoured: the wait was the cap, not the 20 ms backoff.
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "took {took:?}"
    );
}

#[tokio::test]
async fn closed_port_is_connect_after_retries() {
    let port = closed_port().await;
    let err = helpdesk(format!("http://127.0.0.1:{port}"))
        .find_ticket(&token(), SystemTime::now())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), Reason::Connect, "{err}");
    assert_eq!(err.attempts(), 3);
    assert_no_token(&err);
}

#[tokio::test]
async fn a_slow_api_is_timeout() {
    let app = Router::new().route(
        "/tickets/search",
        get(|| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            "late"
        }),
    );
    let addr = serve(app).await;
    let hd = Helpdesk::new(
        SupportBee::new(SupportBeeParams {
            timeout: Duration::from_millis(200),
            retry: RetryPolicy {
                attempts: 2,
                base_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(10),
            },
            ..params(format!("http://{addr}"))
        })
        .unwrap(),
    );
    let started = tokio::time::Instant::now();
    let err = hd
        .find_ticket(&token(), SystemTime::now())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), Reason::Timeout, "{err}");
    assert_eq!(err.attempts(), 2);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_no_token(&err);
}
