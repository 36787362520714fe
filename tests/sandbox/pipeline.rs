//! The background jobs: import and outbound under faults, ordering, bursts, bounded memory.

use std::time::Duration;

use mailcanary::sandbox::{Fault, Stage};

use crate::common::*;

#[tokio::test]
async fn import_stall_queues_and_clearing_releases_in_arrival_order() {
    let sb = start().await;
    set_fault(&sb, r#"{"import":"stall"}"#).await;
    let tok = token();
    for i in 0..20 {
        send(&sb, "e@customer.test", &format!("{tok} n{i:02}"), "b")
            .await
            .expect("the MX accepts mail while import is stalled");
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        search(&sb, &tok).await.is_empty(),
        "no ticket while stalled"
    );
    let (status, _) = get_json(&format!("{}/health", sb.api_url())).await;
    assert_eq!(status, 200, "the web app looks healthy");

    sb.faults().set(Stage::Import, Fault::Ok);
    let tickets = eventually(Duration::from_secs(5), "all 20 tickets", || async {
        let t = search(&sb, &tok).await;
        (t.len() == 20).then_some(t)
    })
    .await;
    // Newest first in the API; ids grow in creation order, which must be arrival order.
    let mut by_id: Vec<(u64, String)> = tickets
        .iter()
        .map(|t| {
            (
                t["id"].as_u64().unwrap(),
                t["subject"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    by_id.sort();
    let subjects: Vec<String> = by_id.into_iter().map(|(_, s)| s).collect();
    let expected: Vec<String> = (0..20).map(|i| format!("{tok} n{i:02}")).collect();
    assert_eq!(subjects, expected);
    sb.shutdown().await;
}

#[tokio::test]
async fn import_error_retries_until_cleared_and_counts_failures() {
    let sb = start().await;
    sb.faults().set(Stage::Import, Fault::Error);
    let tok = token();
    send(&sb, "f@customer.test", &tok, "b").await.unwrap();
    eventually(Duration::from_secs(5), "two failed attempts", || async {
        sb.events()
            .first()
            .filter(|e| e.import_failures >= 2)
            .cloned()
    })
    .await;
    assert!(search(&sb, &tok).await.is_empty());
    sb.faults().set(Stage::Import, Fault::Ok);
    eventually(Duration::from_secs(5), "ticket after retry", || async {
        (!search(&sb, &tok).await.is_empty()).then_some(())
    })
    .await;
    sb.shutdown().await;
}

#[tokio::test]
async fn outbound_drop_never_delivers_and_events_say_dropped() {
    let sb = start().await;
    sb.faults().set(Stage::Outbound, Fault::Drop);
    let tok = token();
    send(&sb, "g@customer.test", &tok, "b").await.unwrap();
    let t = eventually(Duration::from_secs(5), "ticket", || async {
        search(&sb, &tok).await.into_iter().next()
    })
    .await;
    let id = t["id"].as_u64().unwrap();
    let r = http()
        .post(format!(
            "{}/tickets/{id}/replies?auth_token={TOKEN}",
            sb.api_url()
        ))
        .json(&serde_json::json!({"reply": {"content_attributes": {"body": "hi"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let ev = eventually(Duration::from_secs(5), "dropped event", || async {
        sb.events().into_iter().find(|e| e.dropped.is_some())
    })
    .await;
    assert_eq!(ev.dropped.unwrap().stage, Stage::Outbound);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(sb.events()[0].delivered_at.is_none());
    let (_, body) = get_json(&format!("{}/sandbox/events", sb.api_url())).await;
    assert_eq!(body["events"][0]["dropped"]["stage"], "outbound");
    sb.shutdown().await;
}

#[tokio::test]
async fn burst_of_1000_messages_all_become_tickets_once() {
    let sb = start().await;
    let tok = token();
    // Ten concurrent senders, a hundred mails each, over pooled connections.
    let transport = smtp(&sb);
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..10 {
        let t = transport.clone();
        let tok = tok.clone();
        tasks.spawn(async move {
            for i in 0..100 {
                let m = mail("burst@customer.test", &format!("{tok} s{s} i{i}"), "b");
                lettre::AsyncTransport::send(&t, m).await.expect("accepted");
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let events = eventually(Duration::from_secs(30), "1000 tickets", || async {
        let ev = sb.events();
        (ev.iter().filter(|e| e.ticket_id.is_some()).count() == 1000).then_some(ev)
    })
    .await;
    assert_eq!(events.len(), 1000, "none lost, none duplicated at the MX");
    let mut ids: Vec<u64> = events.iter().filter_map(|e| e.ticket_id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 1000, "one ticket per message");
    let mut subjects: Vec<&str> = events.iter().map(|e| e.subject.as_str()).collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), 1000);
    // The API agrees.
    let (_, list) = get_json(&format!(
        "{}/tickets?auth_token={TOKEN}&per_page=1",
        sb.api_url()
    ))
    .await;
    assert_eq!(list["total"], 1000);
    sb.shutdown().await;
}

#[tokio::test]
async fn deleted_tickets_are_freed_and_events_are_capped() {
    let sb = start_with(|c| c.event_capacity = 5).await;
    let tok = token();
    for i in 0..8 {
        send(&sb, "h@customer.test", &format!("{tok} {i}"), "b")
            .await
            .unwrap();
    }
    let tickets = eventually(Duration::from_secs(5), "8 tickets", || async {
        let t = search(&sb, &tok).await;
        (t.len() == 8).then_some(t)
    })
    .await;
    assert_eq!(sb.events().len(), 5, "the event log keeps only the newest");
    let c = http();
    for t in &tickets {
        let id = t["id"].as_u64().unwrap();
        let base = format!("{}/tickets/{id}", sb.api_url());
        c.post(format!("{base}/trash?auth_token={TOKEN}"))
            .send()
            .await
            .unwrap();
        let r = c
            .delete(format!("{base}?auth_token={TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    let (_, list) = get_json(&format!(
        "{}/tickets?auth_token={TOKEN}&trash=true",
        sb.api_url()
    ))
    .await;
    assert_eq!(
        list["total"], 0,
        "deleted tickets are gone, not just hidden"
    );
    sb.shutdown().await;
}

/// The whole pipeline with independent clients at both ends: lettre in, the API's reply out,
/// read by async-imap and by Python's imaplib; the reply threads to the original.
#[tokio::test]
async fn reply_reaches_the_requester_mailbox_threaded_to_the_original() {
    use futures::TryStreamExt;

    let sb = start().await;
    let tok = token();
    let original_id = format!("{tok}@customer.test");
    let m = lettre::Message::builder()
        .from("erin@customer.test".parse().unwrap())
        .to("support@helpdesk.test".parse().unwrap())
        .subject(format!("Question {tok}"))
        .message_id(Some(format!("<{original_id}>")))
        .body("Where is my order?".to_string())
        .unwrap();
    lettre::AsyncTransport::send(&smtp(&sb), m).await.unwrap();
    let t = eventually(Duration::from_secs(5), "ticket", || async {
        search(&sb, &tok).await.into_iter().next()
    })
    .await;
    let id = t["id"].as_u64().unwrap();
    let r = http()
        .post(format!("{}/tickets/{id}/replies?auth_token={TOKEN}", sb.api_url()))
        .json(&serde_json::json!({"reply": {"content_attributes": {"body": format!("Shipped. {tok}")}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    eventually(Duration::from_secs(5), "delivery", || async {
        sb.events().into_iter().find(|e| e.delivered_at.is_some())
    })
    .await;

    // async-imap
    let tcp = tokio::net::TcpStream::connect(sb.imap_addr).await.unwrap();
    let mut client = async_imap::Client::new(tcp);
    client.read_response().await.unwrap().unwrap();
    let mut session = client
        .login("erin@customer.test", "sandbox")
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    session.select("INBOX").await.unwrap();
    let uids = session
        .uid_search(format!("SUBJECT \"{tok}\""))
        .await
        .unwrap();
    assert_eq!(uids.len(), 1);
    let uid = *uids.iter().next().unwrap();
    let fetched: Vec<_> = session
        .uid_fetch(uid.to_string(), "BODY.PEEK[]")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let raw = fetched[0].body().unwrap().to_vec();
    let msg = mail_parser::MessageParser::default().parse(&raw).unwrap();
    assert_eq!(msg.subject(), Some(format!("Re: Question {tok}").as_str()));
    assert_eq!(msg.in_reply_to().as_text(), Some(original_id.as_str()));
    assert!(
        msg.references()
            .as_text_list()
            .is_some_and(|l| l.iter().any(|r| r == original_id.as_str()))
            || msg.references().as_text() == Some(original_id.as_str()),
        "References must name the original"
    );
    assert!(msg.message_id().is_some_and(|id| id != original_id));
    assert!(msg.date().is_some());
    assert!(msg.body_text(0).unwrap().contains("Shipped."));
    session.logout().await.unwrap();

    // Python's imaplib reads (and removes) the same message.
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/sandbox/imaplib_client.py"
    );
    let port = sb.imap_addr.port().to_string();
    let tok2 = tok.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args([
                script,
                "127.0.0.1",
                &port,
                "erin@customer.test",
                "sandbox",
                &tok2,
            ])
            .output()
    })
    .await
    .unwrap()
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "imaplib: {stdout}");
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(r["found_uids"], serde_json::json!([uid]));
    assert_eq!(r["size_matches"], true);
    sb.shutdown().await;
}
