//! The inbound MX: lettre delivers, bad input gets protocol-correct errors.

use std::time::Duration;

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

use crate::common::*;

/// A raw SMTP dialogue: send a line, read the (possibly multi-line) reply, return its code.
struct Raw {
    rd: BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: tokio::net::tcp::OwnedWriteHalf,
}

impl Raw {
    async fn connect(addr: std::net::SocketAddr) -> Raw {
        let (rd, wr) = TcpStream::connect(addr).await.unwrap().into_split();
        let mut raw = Raw {
            rd: BufReader::new(rd),
            wr,
        };
        assert_eq!(raw.reply().await, 220);
        raw
    }

    async fn reply(&mut self) -> u16 {
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), self.rd.read_line(&mut line))
                .await
                .expect("reply in time")
                .unwrap();
            assert!(n > 0, "connection closed");
            if line.as_bytes().get(3) != Some(&b'-') {
                return line[..3]
                    .parse()
                    .unwrap_or_else(|_| panic!("bad reply {line:?}"));
            }
        }
    }

    async fn cmd(&mut self, bytes: &[u8]) -> u16 {
        self.wr.write_all(bytes).await.unwrap();
        self.reply().await
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.wr.write_all(bytes).await.unwrap();
    }
}

#[tokio::test]
async fn lettre_mail_becomes_a_ticket_found_by_list_and_search() {
    let sb = start().await;
    let tok = token();
    send(
        &sb,
        "alice@customer.test",
        &format!("Help {tok}"),
        "my printer is on fire",
    )
    .await
    .unwrap();
    let found = eventually(Duration::from_secs(5), "ticket by search", || async {
        let t = search(&sb, &tok).await;
        (!t.is_empty()).then_some(t)
    })
    .await;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0]["requester"]["email"], "alice@customer.test");
    assert!(
        found[0]["content"]["body"]
            .as_str()
            .unwrap()
            .contains("printer")
    );

    // The list, filtered by requester, finds it too; another requester does not.
    let (_, list) = get_json(&format!(
        "{}/tickets?auth_token={TOKEN}&requester_emails=alice@customer.test",
        sb.api_url()
    ))
    .await;
    assert_eq!(list["total"], 1);
    assert!(
        list["tickets"][0]["subject"]
            .as_str()
            .unwrap()
            .contains(&tok)
    );
    let (_, other) = get_json(&format!(
        "{}/tickets?auth_token={TOKEN}&requester_emails=bob@customer.test",
        sb.api_url()
    ))
    .await;
    assert_eq!(other["total"], 0);
    sb.shutdown().await;
}

#[tokio::test]
async fn unknown_recipient_gets_550_and_the_session_goes_on() {
    let sb = start().await;
    let mut c = Raw::connect(sb.smtp_addr).await;
    assert_eq!(c.cmd(b"EHLO client.test\r\n").await, 250);
    assert_eq!(c.cmd(b"MAIL FROM:<a@customer.test>\r\n").await, 250);
    assert_eq!(c.cmd(b"RCPT TO:<nobody@helpdesk.test>\r\n").await, 550);
    assert_eq!(c.cmd(b"RCPT TO:<support@helpdesk.test>\r\n").await, 250);
    assert_eq!(c.cmd(b"RSET\r\n").await, 250);
    assert_eq!(c.cmd(b"NOOP\r\n").await, 250);
    assert_eq!(c.cmd(b"QUIT\r\n").await, 221);
    sb.shutdown().await;
}

#[tokio::test]
async fn garbage_and_8bit_junk_get_5xx_while_other_clients_are_served() {
    let sb = start().await;
    let mut c = Raw::connect(sb.smtp_addr).await;
    let code = c.cmd(b"HELLO?? WHAT IS THIS\r\n").await;
    assert!((500..600).contains(&code), "garbage answered {code}");
    let code = c.cmd(b"\xff\xfe\x80junk\x00\r\n").await;
    assert!((500..600).contains(&code), "8-bit junk answered {code}");
    let long = format!("EHLO {}\r\n", "x".repeat(10_000));
    let code = c.cmd(long.as_bytes()).await;
    assert!((500..600).contains(&code), "overlong line answered {code}");
    // The same connection still works.
    assert_eq!(c.cmd(b"EHLO client.test\r\n").await, 250);
    // And another client is served meanwhile.
    send(&sb, "carol@customer.test", "still here", "body")
        .await
        .unwrap();
    sb.shutdown().await;
}

#[tokio::test]
async fn message_over_the_size_limit_gets_552_and_nothing_is_queued() {
    let sb = start_with(|c| c.max_message_size = 64 * 1024).await;
    let mut c = Raw::connect(sb.smtp_addr).await;
    assert_eq!(c.cmd(b"EHLO client.test\r\n").await, 250);
    assert_eq!(c.cmd(b"MAIL FROM:<big@customer.test>\r\n").await, 250);
    assert_eq!(c.cmd(b"RCPT TO:<support@helpdesk.test>\r\n").await, 250);
    assert_eq!(c.cmd(b"DATA\r\n").await, 354);
    c.send_raw(b"Subject: huge\r\n\r\n").await;
    let line = format!("{}\r\n", "a".repeat(998));
    for _ in 0..100 {
        c.send_raw(line.as_bytes()).await;
    }
    assert_eq!(c.cmd(b".\r\n").await, 552);
    // The session is usable afterwards and a normal message goes through.
    assert_eq!(c.cmd(b"MAIL FROM:<small@customer.test>\r\n").await, 250);
    assert_eq!(c.cmd(b"RCPT TO:<support@helpdesk.test>\r\n").await, 250);
    assert_eq!(c.cmd(b"DATA\r\n").await, 354);
    assert_eq!(c.cmd(b"Subject: small\r\n\r\nhello\r\n.\r\n").await, 250);
    let events = sb.events();
    assert_eq!(events.len(), 1, "only the small message was received");
    assert_eq!(events[0].subject, "small");
    sb.shutdown().await;
}

#[tokio::test]
async fn inbound_error_answers_451() {
    let sb = start_with(|c| {
        c.faults = vec![(
            mailcanary::sandbox::Stage::Inbound,
            mailcanary::sandbox::Fault::Error,
        )]
    })
    .await;
    let err = send(&sb, "a@customer.test", "x", "y").await.unwrap_err();
    assert!(err.contains("451"), "expected 451, got {err}");
    assert!(sb.events().is_empty());
    // Cleared live, mail flows again.
    assert!(
        set_fault(&sb, r#"{"inbound":"ok"}"#)
            .await
            .status()
            .is_success()
    );
    send(&sb, "a@customer.test", "x", "y").await.unwrap();
    sb.shutdown().await;
}

#[tokio::test]
async fn inbound_stall_holds_the_end_of_data_until_cleared() {
    let sb = start().await;
    set_fault(&sb, r#"{"inbound":"stall"}"#).await;
    let tok = token();
    let subject = format!("held {tok}");
    let sending = {
        let t = smtp(&sb);
        let m = mail("a@customer.test", &subject, "b");
        tokio::spawn(async move { lettre::AsyncTransport::send(&t, m).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!sending.is_finished(), "a stalled MX must not answer");
    set_fault(&sb, r#"{"inbound":"ok"}"#).await;
    sending.await.unwrap().expect("accepted once cleared");
    sb.shutdown().await;
}
