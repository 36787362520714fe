//! IMAP server tests (being written).
