//! The sandbox's IMAP server, on imap-next's sans-I/O state machine.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{faults::FaultBoard, mailbox::Mailboxes};

/// Serves IMAP on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    mailboxes: Arc<Mailboxes>,
    faults: FaultBoard,
    shutdown: CancellationToken,
) {
    let _ = (listener, mailboxes, faults);
    shutdown.cancelled().await;
}
