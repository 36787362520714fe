//! The conformance test every helpdesk adapter runs: the same calls and the same faults,
//! against the sandbox speaking that vendor's dialect (`src/sandbox/api/`). Each adapter is
//! built the way the prober builds it, from a config's `[probe.helpdesk]` (so the registry and
//! the vendor tables are exercised too). Adding a vendor: one more [`Case`] here.
//!
//! What every adapter must do:
//! - find: nothing for a token no mail carried; the canary's ticket once the import made it;
//! - Message-ID: where the vendor exposes it, the ticket was made from the canary's mail;
//! - reply: a public reply the helpdesk mails to the requester (seen in the sandbox's ground
//!   truth), and `reply_posted` true afterwards where the vendor can tell;
//! - cleanup: archive, then delete, then delete again (already gone is done);
//! - 401: `auth` at once, one attempt, the secret nowhere in the error;
//! - 5xx: `api` after the retries for a read, one attempt for a reply (it may have been saved);
//! - 429 with `Retry-After`: retried, then `api`;
//! - HTML where JSON belongs: `api`, saying so.

use std::time::{Duration, SystemTime};

use mailcanary::{
    canary::life::Reason,
    config,
    edges::helpdesk::{self, CleanupMode, Helpdesk, HelpdeskError, RetryPolicy, TicketRef},
    sandbox::{Fault, Sandbox, Stage},
};
use serde_json::Value;

use crate::{API_TOKEN, eventually, probe_config as pc, sandbox, send_canary, token};

/// One adapter: its `[probe.helpdesk]` lines besides base_url and token.
struct Case {
    api: &'static str,
    tables: &'static str,
    /// Whether the vendor can say a reply is on the ticket already.
    tells_replies: bool,
    /// Whether the vendor's API says which mail (its Message-ID) a ticket was made from.
    tells_message_id: bool,
}

const CASES: &[Case] = &[
    Case {
        api: "supportbee",
        tables: "",
        tells_message_id: false,
        tells_replies: true,
    },
    Case {
        api: "rt",
        tables: "[probe.helpdesk.rt]\nqueue = \"General\"\n",
        tells_message_id: true,
        tells_replies: true,
    },
    Case {
        api: "django-helpdesk",
        tables: "[probe.helpdesk.django-helpdesk]\nqueue = 1\n",
        tells_message_id: true,
        tells_replies: true,
    },
    Case {
        api: "http",
        tables: include_str!("../files/supportbee-as-http.toml"),
        tells_message_id: false,
        tells_replies: false,
    },
    Case {
        api: "freshdesk",
        tables: "",
        tells_message_id: false,
        tells_replies: true,
    },
    Case {
        api: "zammad",
        tables: "",
        tells_message_id: true,
        tells_replies: true,
    },
    Case {
        api: "zendesk",
        tables: "[probe.helpdesk.zendesk]\nemail = \"agent@helpdesk.test\"\n",
        tells_message_id: true,
        tells_replies: true,
    },
    Case {
        api: "front",
        tables: "[probe.helpdesk.front]\ninbox_id = \"inb_sandbox\"\n",
        tells_message_id: true,
        tells_replies: true,
    },
    Case {
        api: "helpscout",
        tables: "[probe.helpdesk.helpscout]\nclient_id = \"conformance-app\"\nmailbox_id = 1\n",
        tells_message_id: true,
        tells_replies: true,
    },
];

/// The sandbox of `sandbox()`, speaking `case`'s dialect where dialects claim the same paths
/// (Zendesk's `/api/v2/` is Freshdesk's too).
async fn sandbox_for(case: &Case) -> Sandbox {
    if mailcanary::sandbox::api::dialect(case.api).is_none() {
        return sandbox().await;
    }
    let mut cfg = mailcanary::sandbox::SandboxConfig::ephemeral();
    cfg.api_token = API_TOKEN.into();
    cfg.api = case.api.into();
    cfg.import_delay =
        mailcanary::sandbox::DelayRange::new(Duration::from_millis(10), Duration::from_millis(50));
    cfg.outbound_delay = mailcanary::sandbox::DelayRange::fixed(Duration::from_millis(10));
    Sandbox::start(cfg).await.expect("sandbox starts")
}

/// The case of `api`.
fn case(api: &str) -> &'static Case {
    CASES.iter().find(|c| c.api == api).expect("a case")
}

/// The adapter of `case` for the sandbox at `url`, with `secret`, built as the prober does.
fn adapter(case: &Case, url: &str, secret: &str) -> Helpdesk {
    let mut hd = pc::Helpdesk {
        api: case.api.into(),
        base_url: url.into(),
        token: pc::some(secret),
        ..pc::Helpdesk::default()
    };
    if !case.tables.is_empty() {
        hd.add_tables(case.tables);
    }
    let smtp = pc::Smtp {
        host: "127.0.0.1".into(),
        from: pc::some("canary@prober.test"),
        to: pc::some("support@helpdesk.test"),
        ..pc::Smtp::default()
    };
    let probe = pc::Probe {
        helpdesk: Some(hd),
        imap: Some(pc::Imap {
            host: "127.0.0.1".into(),
            username: "canary@prober.test".into(),
            password: pc::some("pw"),
            ..pc::Imap::default()
        }),
        ..pc::Probe::new("c", "helpdesk", smtp)
    };
    let text = pc::ConfigFile::default().with(probe).render();
    let cfg = config::parse_str(&text, "conformance.toml").unwrap_or_else(|e| panic!("{e}"));
    let h = cfg.probes[0].helpdesk.as_ref().unwrap();
    helpdesk::build(helpdesk::Settings {
        base_url: h.base_url.to_string(),
        secret: h.token.expose().to_string(),
        timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            attempts: 3,
            base_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(1500),
        },
        extra_roots_pem: None,
        vendor: h.vendor.clone(),
    })
    .unwrap()
}

fn clean(case: &Case, err: &HelpdeskError) {
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(
            !text.contains(API_TOKEN),
            "{}: secret leaked: {text}",
            case.api
        );
    }
}

/// The sandbox's ground truth: what happened to each mail it received.
async fn events(sb: &Sandbox) -> Vec<Value> {
    let events: Value = reqwest::get(format!("{}/sandbox/events", sb.api_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    events["events"].as_array().unwrap().clone()
}

/// Whether the sandbox delivered a reply to the canary with `token` (ground truth).
async fn reply_delivered(sb: &Sandbox, token: &str) -> bool {
    events(sb).await.iter().any(|e| {
        e["message_id"].as_str().is_some_and(|m| m.contains(token)) && !e["delivered_at"].is_null()
    })
}

/// The Message-ID of the mail carrying `token` that the sandbox received (ground truth).
async fn sent_message_id(sb: &Sandbox, token: &str) -> String {
    events(sb)
        .await
        .iter()
        .filter_map(|e| e["message_id"].as_str())
        .find(|m| m.contains(token))
        .expect("the canary was received")
        .to_string()
}

async fn conformance(case: &Case) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sb = sandbox_for(case).await;
    let hd = adapter(case, &sb.api_url(), API_TOKEN);
    let api = case.api;
    let since = SystemTime::now() - Duration::from_secs(60);

    // find
    assert_eq!(
        hd.find_ticket(&token(), since).await.unwrap(),
        None,
        "{api}: nothing yet"
    );
    let tok = send_canary(&sb).await;
    let ticket: TicketRef = eventually(Duration::from_secs(5), "the ticket", || async {
        hd.find_ticket(&tok, since).await.expect("find")
    })
    .await;
    assert_eq!(
        hd.find_tickets(&tok, since).await.unwrap().len(),
        1,
        "{api}: one ticket"
    );

    // which mail the ticket was made from
    assert_eq!(hd.says_message_id(), case.tells_message_id, "{api}");
    let seen = hd
        .inbound_message_id(&ticket)
        .await
        .unwrap_or_else(|e| panic!("{api}: Message-ID: {e}"));
    if case.tells_message_id {
        let sent = sent_message_id(&sb, &tok).await;
        let seen = seen.unwrap_or_else(|| panic!("{api}: no Message-ID"));
        assert!(
            helpdesk::same_message_id(&seen, &sent),
            "{api}: {seen} is not the canary's {sent}"
        );
    } else {
        assert_eq!(seen, None, "{api}");
    }

    // reply
    let mark = "mcreply-conformance0000";
    if case.tells_replies {
        assert_eq!(
            hd.reply_posted(&ticket, mark).await.unwrap(),
            Some(false),
            "{api}"
        );
    } else {
        assert_eq!(hd.reply_posted(&ticket, mark).await.unwrap(), None, "{api}");
    }
    hd.post_reply(&ticket, &format!("Agent reply {tok}\n{mark}\n"))
        .await
        .unwrap_or_else(|e| panic!("{api}: reply: {e}"));
    eventually(Duration::from_secs(5), "the reply delivered", || async {
        reply_delivered(&sb, &tok).await.then_some(())
    })
    .await;
    if case.tells_replies {
        assert_eq!(
            hd.reply_posted(&ticket, mark).await.unwrap(),
            Some(true),
            "{api}"
        );
    }

    // faults: 5xx, 429, garbage
    sb.faults().set(Stage::Api, Fault::Error);
    let e = hd.find_ticket(&tok, since).await.unwrap_err();
    assert_eq!((e.reason(), e.attempts()), (Reason::Api, 3), "{api}: {e}");
    assert!(e.detail().contains("500"), "{api}: {e}");
    clean(case, &e);
    let e = hd.post_reply(&ticket, "again").await.unwrap_err();
    assert_eq!(
        (e.reason(), e.attempts()),
        (Reason::Api, 1),
        "{api}: a reply answered 500 may be saved: not sent twice: {e}"
    );
    sb.faults().set(Stage::Api, Fault::Throttle);
    let t = std::time::Instant::now();
    let e = hd.find_ticket(&tok, since).await.unwrap_err();
    assert_eq!((e.reason(), e.attempts()), (Reason::Api, 3), "{api}: {e}");
    assert!(e.detail().contains("429"), "{api}: {e}");
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "{api}: Retry-After (1 s) honoured between the 3 attempts: {:?}",
        t.elapsed()
    );
    sb.faults().set(Stage::Api, Fault::Garbage);
    let e = hd.find_ticket(&tok, since).await.unwrap_err();
    assert_eq!((e.reason(), e.attempts()), (Reason::Api, 1), "{api}: {e}");
    assert!(
        e.detail().contains("JSON"),
        "{api}: says what was wrong: {e}"
    );
    clean(case, &e);
    sb.faults().set(Stage::Api, Fault::Ok);

    // cleanup: archive, delete, delete again
    for how in [
        CleanupMode::Archive,
        CleanupMode::Delete,
        CleanupMode::Delete,
    ] {
        hd.cleanup(&ticket, how)
            .await
            .unwrap_or_else(|e| panic!("{api}: cleanup {how:?}: {e}"));
    }
    assert_eq!(
        hd.find_ticket(&tok, since).await.unwrap(),
        None,
        "{api}: a deleted ticket is not found again"
    );

    // 401
    let wrong = adapter(case, &sb.api_url(), "wrong-secret");
    let e = wrong.find_ticket(&tok, since).await.unwrap_err();
    assert_eq!((e.reason(), e.attempts()), (Reason::Auth, 1), "{api}: {e}");
    assert!(!e.to_string().contains("wrong-secret"), "{api}: {e}");
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supportbee_conforms() {
    conformance(&CASES[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_tracker_conforms() {
    conformance(&CASES[1]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_helpdesk_conforms() {
    conformance(&CASES[2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_http_conforms() {
    conformance(&CASES[3]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zammad_conforms() {
    conformance(CASES.iter().find(|c| c.api == "zammad").unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zendesk_conforms() {
    conformance(CASES.iter().find(|c| c.api == "zendesk").unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_conforms() {
    conformance(case("front")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helpscout_conforms() {
    conformance(case("helpscout")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshdesk_conforms() {
    conformance(case("freshdesk")).await;
}

/// Every vendor the config knows has a case here.
#[test]
fn every_adapter_has_a_case() {
    for api in [
        "supportbee",
        "rt",
        "django-helpdesk",
        "http",
        "zammad",
        "zendesk",
        "front",
        "helpscout",
        "freshdesk",
    ] {
        assert!(
            CASES.iter().any(|c| c.api == api),
            "{api} has no conformance case"
        );
    }
}
