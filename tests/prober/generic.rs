//! The generic HTTP adapter (`api = "http"`) against the sandbox's SupportBee API, from config
//! alone: a whole canary life (find by search, reply, trash), the acknowledgement told apart,
//! and the same faults every adapter meets (401, 5xx) blamed on the right stage. The same
//! adapter probes real django-helpdesk in tests/realmail/helpdesks.rs.

use std::time::Duration;

use mailcanary::config;
use serde_json::Value;

use crate::common::*;

const COMPLETED: &str = "mailcanary_canaries_completed_total";

/// SupportBee's API described as the generic adapter sees it: no SupportBee code involved.
const SUPPORTBEE_AS_HTTP: &str = include_str!("../files/supportbee-as-http.toml");

pub fn generic_text(sb: &mailcanary::sandbox::Sandbox, k: &Knobs) -> String {
    vendor_text(sb, k, "http", SUPPORTBEE_AS_HTTP)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_http_adapter_runs_a_canary_life_on_the_sandbox_supportbee_api() {
    let sb = sandbox_with(|c| c.auto_ack = Some(true)).await;
    let text = generic_text(&sb, &Knobs::default());
    let cfg = config::parse_str(&text, "generic.toml").unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&cfg, dir.path()).await;
    let s = until(d.addr, Duration::from_secs(30), "3 canaries", |s| {
        v(s, COMPLETED, &[]) >= 3.0
    })
    .await;
    assert!(
        v(
            &s,
            "mailcanary_messages_ignored_total",
            &[("reason", "acknowledgement")]
        ) >= 3.0
    );
    assert_eq!(
        s.family("mailcanary_stage_failures_total")
            .iter()
            .filter(|x| x.value > 0.0)
            .count(),
        0,
        "no failure"
    );
    // The finished canaries' tickets went to the trash through the cleanup template.
    let status: Value = status(d.addr.port()).await.expect("status");
    let ids: Vec<String> = status["probes"][0]["recent"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| !c["outcome"].is_null())
        .filter_map(|c| c["ticket_id"].as_str().map(str::to_string))
        .collect();
    assert!(!ids.is_empty());
    let oldest = ids.last().unwrap();
    let mut trashed = false;
    for _ in 0..50 {
        let t = get_json(&format!(
            "{}/tickets/{oldest}?auth_token=sandbox",
            sb.api_url()
        ))
        .await;
        if t["ticket"]["trash"] == true {
            trashed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(trashed, "ticket {oldest} trashed");
    d.stop().await;
}

/// 401 is `auth` on import; the sandbox's API error (500) is `api`; both clear by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_http_adapter_blames_auth_and_api_errors_on_import() {
    use mailcanary::sandbox::{Fault, Stage};
    let sb = sandbox().await;
    let k = Knobs {
        api_token: "wrong".into(),
        ..Knobs::default()
    };
    let cfg = config::parse_str(&generic_text(&sb, &k), "generic.toml").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&cfg, dir.path()).await;
    until(
        d.addr,
        Duration::from_secs(20),
        "import auth failure",
        |s| {
            v(
                s,
                "mailcanary_stage_failures_total",
                &[("stage", "import"), ("reason", "auth")],
            ) >= 1.0
        },
    )
    .await;
    d.stop().await;

    let cfg = config::parse_str(&generic_text(&sb, &Knobs::default()), "generic.toml").unwrap();
    let dir = tempfile::tempdir().unwrap();
    sb.faults().set(Stage::Api, Fault::Error);
    let d = daemon(&cfg, dir.path()).await;
    until(d.addr, Duration::from_secs(20), "import api failure", |s| {
        v(
            s,
            "mailcanary_stage_failures_total",
            &[("stage", "import"), ("reason", "api")],
        ) >= 1.0
    })
    .await;
    sb.faults().set(Stage::Api, Fault::Ok);
    until(
        d.addr,
        Duration::from_secs(30),
        "a canary after the fault",
        |s| v(s, COMPLETED, &[]) >= 1.0,
    )
    .await;
    d.stop().await;
}

/// Every vendor adapter through a whole canary life on the sandbox speaking its dialect, with
/// the helpdesk's auto-acknowledgement on: the acknowledgement is recorded as such, delivery
/// waits for the agent's reply, nothing fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_vendor_adapter_runs_a_canary_life_past_the_acknowledgement() {
    for (api, table) in [
        ("supportbee", ""),
        ("rt", "[probe.helpdesk.rt]\nqueue = \"General\"\n"),
        (
            "django-helpdesk",
            "[probe.helpdesk.django-helpdesk]\nqueue = 1\n",
        ),
        (
            "front",
            "[probe.helpdesk.front]\ninbox_id = \"inb_sandbox\"\n",
        ),
        (
            "helpscout",
            "[probe.helpdesk.helpscout]\nclient_id = \"app\"\nmailbox_id = 1\n",
        ),
        (
            "zendesk",
            "[probe.helpdesk.zendesk]\nemail = \"agent@helpdesk.test\"\n",
        ),
        ("freshdesk", ""),
        ("zammad", ""),
    ] {
        // The sandbox speaks the vendor's dialect where two claim the same paths (Zendesk's and
        // Freshdesk's /api/v2/).
        let sb = sandbox_with(|c| {
            c.auto_ack = Some(true);
            if mailcanary::sandbox::api::dialect(api).is_some() {
                c.api = api.into();
            }
        })
        .await;
        let text = vendor_text(&sb, &Knobs::default(), api, table);
        let cfg = config::parse_str(&text, "life.toml").unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::tempdir().unwrap();
        let d = daemon(&cfg, dir.path()).await;
        let s = until(d.addr, Duration::from_secs(30), "2 canaries", |s| {
            v(s, COMPLETED, &[]) >= 2.0
        })
        .await;
        let ignored = |r: &str| v(&s, "mailcanary_messages_ignored_total", &[("reason", r)]);
        assert!(
            ignored("acknowledgement") >= 2.0,
            "{api}: {}",
            ignored("acknowledgement")
        );
        assert_eq!(ignored("duplicate"), 0.0, "{api}");
        let failed: Vec<_> = s
            .family("mailcanary_stage_failures_total")
            .into_iter()
            .filter(|x| x.value > 0.0)
            .collect();
        assert!(failed.is_empty(), "{api}: {failed:?}");
        // Which mail the ticket was made from, where the vendor says: the canary's own.
        let mid = |s: &mailcanary::metrics::testing::Samples, r: &str| {
            v(s, "mailcanary_import_message_id_total", &[("result", r)])
        };
        if ["supportbee", "freshdesk"].contains(&api) {
            assert_eq!(mid(&s, "match") + mid(&s, "absent"), 0.0, "{api}");
        } else {
            let s = until(d.addr, Duration::from_secs(15), "a Message-ID match", |s| {
                mid(s, "match") >= 1.0
            })
            .await;
            assert_eq!(mid(&s, "mismatch") + mid(&s, "absent"), 0.0, "{api}");
        }
        d.stop().await;
        sb.shutdown().await;
    }
}

/// A proxy to the sandbox's API whose answers to reply POSTs come `late` after the sandbox
/// handled them: the reply is saved and mailed, the prober's request times out.
async fn slow_reply_proxy(sb: &mailcanary::sandbox::Sandbox, late: Duration) -> String {
    use axum::{body::Bytes, extract::Request, http::StatusCode, response::IntoResponse};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let upstream = sb.api_url();
    let client = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |req: Request| {
        let (upstream, client) = (upstream.clone(), client.clone());
        async move {
            let (parts, body) = req.into_parts();
            let body: Bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
            let path = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            let reply =
                parts.method == axum::http::Method::POST && parts.uri.path().ends_with("/replies");
            let mut r = client.request(parts.method.clone(), format!("{upstream}{path}"));
            if let Some(ct) = parts.headers.get(axum::http::header::CONTENT_TYPE) {
                r = r.header(axum::http::header::CONTENT_TYPE, ct.as_bytes());
            }
            let answer = r.body(body).send().await.unwrap();
            let status = StatusCode::from_u16(answer.status().as_u16()).unwrap();
            let bytes = answer.bytes().await.unwrap();
            if reply {
                tokio::time::sleep(late).await;
            }
            (status, bytes).into_response()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    url
}

/// A reply POST that times out after the helpdesk saved (and mailed) the reply: the prober
/// never posts a second reply. An adapter that can look (SupportBee) finds it on the ticket; one
/// that cannot (the generic adapter without a replies request) waits, and the reply's arrival
/// ends the reply stage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_post_that_timed_out_is_never_sent_twice() {
    for api in ["supportbee", "http"] {
        // The reply mail takes longer than the POST's timeout: the prober decides whether to
        // post again before the reply can arrive.
        let sb = sandbox_with(|c| {
            c.outbound_delay = mailcanary::sandbox::DelayRange::fixed(Duration::from_secs(3))
        })
        .await;
        let proxy = slow_reply_proxy(&sb, Duration::from_secs(2)).await;
        let k = Knobs {
            interval: "1h",
            ..Knobs::default()
        };
        let mut file = match api {
            "http" => vendor_file(&sb, &k, "http", SUPPORTBEE_AS_HTTP),
            _ => config_file(&sb, &k),
        };
        let hd = file.probe_mut(PROBE).helpdesk_mut();
        hd.base_url = proxy.clone();
        hd.cleanup = some("none");
        hd.timeout = some("1s");
        let text = file.render();
        let cfg = config::parse_str(&text, "slow.toml").unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::tempdir().unwrap();
        let d = daemon(&cfg, dir.path()).await;
        until(
            d.addr,
            Duration::from_secs(30),
            "the canary completed",
            |s| v(s, COMPLETED, &[]) >= 1.0,
        )
        .await;
        // Long enough for a second POST to have been made and answered, had there been one.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let status: Value = status(d.addr.port()).await.expect("status");
        let id = status["probes"][0]["recent"][0]["ticket_id"]
            .as_str()
            .expect("a ticket")
            .to_string();
        let t = get_json(&format!("{}/tickets/{id}?auth_token=sandbox", sb.api_url())).await;
        assert_eq!(t["ticket"]["replies_count"], 1, "{api}: one reply: {t}");
        d.stop().await;
        sb.shutdown().await;
    }
}
