//! The sandbox's mailboxes: one INBOX per address, with UIDs as RFC 3501 says, and a `Junk`
//! folder beside it (marked `\Junk` in LIST) that mail to an address goes to once
//! [`Mailboxes::file_into_junk`] says so, as a provider's spam filter would.
//!
//! This is a store, not a protocol: it knows UIDs, flags and delivery times, and nothing of IMAP's
//! sequence numbers or wire types (each IMAP session keeps its own sequence-number view and syncs
//! it against [`Mailbox::snapshot`]). Every change bumps a per-mailbox `watch` counter so that
//! sessions in IDLE wake within a scheduler tick of [`Mailboxes::deliver`].
//!
//! Architecture invariant: critical sections are short and never await. `deliver` is called from
//! the outbound mailer's tokio task, so a std `Mutex` around plain data is the right tool; bodies
//! sit behind `Arc` so that snapshots copy pointers, not mail. Expunged messages are dropped from
//! the map at once (and freed when the last snapshot referring to them is gone): memory stays flat
//! on a sandbox that runs for days.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::{SystemTime, UNIX_EPOCH},
};

use chrono::{DateTime, FixedOffset, Local, SubsecRound};
use tokio::sync::watch;

/// Every mailbox of the sandbox, by lowercased address.
pub struct Mailboxes {
    password: String,
    boxes: Mutex<HashMap<String, Arc<Mailbox>>>,
    /// Addresses whose mail is held (a receiving provider deferring it), with what waits.
    held: Mutex<HashMap<String, Vec<Vec<u8>>>>,
    /// Each address's Junk folder, made on first use.
    junk: Mutex<HashMap<String, Arc<Mailbox>>>,
    /// Addresses whose mail is filed into Junk.
    junked: Mutex<BTreeSet<String>>,
}

/// The name of every address's Junk folder.
pub const JUNK: &str = "Junk";

impl Mailboxes {
    pub fn new(password: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            password: password.into(),
            boxes: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            junk: Mutex::new(HashMap::new()),
            junked: Mutex::new(BTreeSet::new()),
        })
    }

    /// Stores a message in `address`'s INBOX (creating the mailbox), wakes IDLE clients, and
    /// returns its UID; 0 if the address's mail is held ([`Mailboxes::hold`]).
    pub fn deliver(&self, address: &str, raw: Vec<u8>) -> u32 {
        let key = address.trim().to_lowercase();
        if let Some(queue) = lock(&self.held).get_mut(&key) {
            queue.push(raw);
            return 0;
        }
        self.store(&key, raw)
    }

    /// Into the INBOX, or the Junk folder for an address whose mail is filed there.
    fn store(&self, key: &str, raw: Vec<u8>) -> u32 {
        let folder = if lock(&self.junked).contains(key) {
            self.junk(key)
        } else {
            self.open(key)
        };
        folder.append(raw, Flags::default(), None)
    }

    /// Files mail to `address` into its Junk folder from now on (`false`: into the INBOX).
    pub fn file_into_junk(&self, address: &str, junk: bool) {
        let key = address.trim().to_lowercase();
        let mut junked = lock(&self.junked);
        if junk {
            junked.insert(key);
        } else {
            junked.remove(&key);
        }
    }

    /// The Junk folder of `address`, created empty if it does not exist yet.
    pub fn junk(&self, address: &str) -> Arc<Mailbox> {
        let key = address.trim().to_lowercase();
        Arc::clone(
            lock(&self.junk)
                .entry(key)
                .or_insert_with_key(|key| Arc::new(Mailbox::new(key.clone()))),
        )
    }

    /// Holds every message for `address` from now on, as a provider that defers one
    /// recipient's mail while others' flows: one mailbox late, the rest on time.
    pub fn hold(&self, address: &str) {
        lock(&self.held)
            .entry(address.trim().to_lowercase())
            .or_default();
    }

    /// Delivers what was held for `address`, in order, and stops holding; returns the UIDs.
    pub fn release(&self, address: &str) -> Vec<u32> {
        let queued = lock(&self.held)
            .remove(&address.trim().to_lowercase())
            .unwrap_or_default();
        let key = address.trim().to_lowercase();
        queued
            .into_iter()
            .map(|raw| self.store(&key, raw))
            .collect()
    }

    /// Whether `password` is the one every mailbox takes.
    pub fn password_matches(&self, password: &[u8]) -> bool {
        // Not constant-time on purpose: this is a sandbox password printed in the docs.
        password == self.password.as_bytes()
    }

    /// The mailbox of `address`, created empty if it does not exist yet.
    pub fn open(&self, address: &str) -> Arc<Mailbox> {
        let key = address.trim().to_lowercase();
        let mut boxes = lock(&self.boxes);
        Arc::clone(
            boxes
                .entry(key)
                .or_insert_with_key(|key| Arc::new(Mailbox::new(key.clone()))),
        )
    }

    /// The mailbox of `address`, if it exists.
    pub fn get(&self, address: &str) -> Option<Arc<Mailbox>> {
        lock(&self.boxes)
            .get(&address.trim().to_lowercase())
            .cloned()
    }

    /// Every address that has a mailbox, sorted.
    pub fn addresses(&self) -> Vec<String> {
        let mut all: Vec<String> = lock(&self.boxes).keys().cloned().collect();
        all.sort();
        all
    }
}

/// Locks `m`, shrugging off poisoning: every critical section here leaves the data consistent
/// before anything can panic, so a poisoned lock holds good data.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One address's INBOX.
pub struct Mailbox {
    address: String,
    uid_validity: u32,
    inner: Mutex<Inner>,
    /// Bumped after every change (delivery, expunge, flags); IDLE sessions wait on it.
    changes: watch::Sender<u64>,
}

struct Inner {
    uid_next: u32,
    messages: BTreeMap<u32, Entry>,
}

struct Entry {
    message: Arc<Message>,
    flags: Flags,
    /// RFC 3501 `\Recent`: no session has been told about this message yet.
    recent: bool,
}

/// A stored message; immutable once delivered.
#[derive(Debug)]
pub struct Message {
    pub uid: u32,
    /// Exactly the bytes delivered.
    pub raw: Vec<u8>,
    /// Delivery time (IMAP INTERNALDATE), whole seconds.
    pub internal_date: DateTime<FixedOffset>,
}

/// The flags of a message. `\Recent` is not here: it belongs to sessions (see [`Mailbox::claim_recent`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Flags {
    pub seen: bool,
    pub answered: bool,
    pub flagged: bool,
    pub deleted: bool,
    pub draft: bool,
    /// Keywords as the client spelt them.
    pub keywords: BTreeSet<String>,
}

/// How a STORE changes flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlagChange {
    Replace,
    Add,
    Remove,
}

impl Flags {
    fn apply(&mut self, change: FlagChange, given: &Flags) {
        let set = |mine: &mut bool, theirs: bool| match change {
            FlagChange::Replace => *mine = theirs,
            FlagChange::Add => *mine |= theirs,
            FlagChange::Remove => *mine &= !theirs,
        };
        set(&mut self.seen, given.seen);
        set(&mut self.answered, given.answered);
        set(&mut self.flagged, given.flagged);
        set(&mut self.deleted, given.deleted);
        set(&mut self.draft, given.draft);
        match change {
            FlagChange::Replace => self.keywords = given.keywords.clone(),
            FlagChange::Add => self.keywords.extend(given.keywords.iter().cloned()),
            FlagChange::Remove => self
                .keywords
                .retain(|k| !given.keywords.iter().any(|g| g.eq_ignore_ascii_case(k))),
        }
    }
}

/// One message as seen at one moment.
#[derive(Clone, Debug)]
pub struct MessageState {
    pub message: Arc<Message>,
    pub flags: Flags,
}

/// The whole mailbox at one moment, messages in ascending UID order.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub uid_validity: u32,
    pub uid_next: u32,
    pub messages: Vec<MessageState>,
    /// How many messages still carry `\Recent` (no session claimed them).
    pub unclaimed_recent: u32,
}

impl Snapshot {
    /// The state of the message with `uid`, if it still exists.
    pub fn get(&self, uid: u32) -> Option<&MessageState> {
        self.messages
            .binary_search_by_key(&uid, |m| m.message.uid)
            .ok()
            .map(|i| &self.messages[i])
    }
}

impl Mailbox {
    fn new(address: String) -> Self {
        // UIDVALIDITY: seconds since the epoch at creation, as many servers do. A sandbox restarted
        // within the same second would reuse it, but then its mailboxes are empty anyway.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1);
        let uid_validity = u32::try_from(now).unwrap_or(u32::MAX).max(1);
        Self {
            address,
            uid_validity,
            inner: Mutex::new(Inner {
                uid_next: 1,
                messages: BTreeMap::new(),
            }),
            changes: watch::Sender::new(0),
        }
    }

    /// The lowercased address this mailbox belongs to.
    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn uid_validity(&self) -> u32 {
        self.uid_validity
    }

    /// Stores a message (IMAP APPEND, or a delivery) and returns its UID. `date` defaults to now.
    pub fn append(&self, raw: Vec<u8>, flags: Flags, date: Option<DateTime<FixedOffset>>) -> u32 {
        // IMAP dates have whole seconds.
        let internal_date = date
            .unwrap_or_else(|| Local::now().fixed_offset())
            .trunc_subsecs(0);
        let uid = {
            let mut inner = lock(&self.inner);
            let uid = inner.uid_next;
            // UIDs are never reused; 2^32 deliveries is beyond any sandbox's life.
            inner.uid_next = uid.saturating_add(1);
            inner.messages.insert(
                uid,
                Entry {
                    message: Arc::new(Message {
                        uid,
                        raw,
                        internal_date,
                    }),
                    flags,
                    recent: true,
                },
            );
            uid
        };
        self.changed();
        uid
    }

    /// The mailbox as it is now.
    pub fn snapshot(&self) -> Snapshot {
        let inner = lock(&self.inner);
        Snapshot {
            uid_validity: self.uid_validity,
            uid_next: inner.uid_next,
            messages: inner
                .messages
                .values()
                .map(|e| MessageState {
                    message: Arc::clone(&e.message),
                    flags: e.flags.clone(),
                })
                .collect(),
            unclaimed_recent: inner.messages.values().filter(|e| e.recent).count() as u32,
        }
    }

    /// Changes the flags of those of `uids` that still exist; returns their new flags.
    pub fn store_flags(
        &self,
        uids: &[u32],
        change: FlagChange,
        flags: &Flags,
    ) -> Vec<(u32, Flags)> {
        let out: Vec<(u32, Flags)> = {
            let mut inner = lock(&self.inner);
            uids.iter()
                .filter_map(|uid| {
                    let entry = inner.messages.get_mut(uid)?;
                    entry.flags.apply(change, flags);
                    Some((*uid, entry.flags.clone()))
                })
                .collect()
        };
        if !out.is_empty() {
            self.changed();
        }
        out
    }

    /// Removes the messages flagged `\Deleted` (only those among `only`, if given); returns the
    /// UIDs removed, ascending.
    pub fn expunge(&self, only: Option<&[u32]>) -> Vec<u32> {
        let removed: Vec<u32> = {
            let mut inner = lock(&self.inner);
            let doomed: Vec<u32> = inner
                .messages
                .iter()
                .filter(|(uid, e)| e.flags.deleted && only.is_none_or(|o| o.contains(uid)))
                .map(|(uid, _)| *uid)
                .collect();
            for uid in &doomed {
                inner.messages.remove(uid);
            }
            doomed
        };
        if !removed.is_empty() {
            self.changed();
        }
        removed
    }

    /// Takes `\Recent` off those of `uids` that still carry it and returns them: the calling
    /// session is the one that reports them as recent (RFC 3501 2.3.2).
    pub fn claim_recent(&self, uids: &[u32]) -> Vec<u32> {
        let mut inner = lock(&self.inner);
        uids.iter()
            .copied()
            .filter(|uid| {
                inner
                    .messages
                    .get_mut(uid)
                    .is_some_and(|e| std::mem::replace(&mut e.recent, false))
            })
            .collect()
    }

    /// A receiver that wakes after every change of this mailbox.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junked_mail_goes_to_the_junk_folder_with_its_own_uids() {
        let boxes = Mailboxes::new("pw");
        assert_eq!(boxes.deliver("a@x.test", b"1".to_vec()), 1);
        boxes.file_into_junk("A@x.test", true);
        assert_eq!(boxes.deliver("a@x.test", b"2".to_vec()), 1);
        assert_eq!(boxes.junk("a@x.test").snapshot().messages.len(), 1);
        assert_eq!(boxes.open("a@x.test").snapshot().messages.len(), 1);
        boxes.file_into_junk("a@x.test", false);
        assert_eq!(boxes.deliver("a@x.test", b"3".to_vec()), 2);
    }

    #[test]
    fn held_mail_waits_in_order_while_other_addresses_get_theirs() {
        let boxes = Mailboxes::new("pw");
        assert_eq!(boxes.deliver("a@x.test", b"1".to_vec()), 1);
        boxes.hold("A@x.test");
        assert_eq!(boxes.deliver("a@x.test", b"2".to_vec()), 0);
        assert_eq!(boxes.deliver("a@x.test", b"3".to_vec()), 0);
        assert_eq!(boxes.deliver("z@x.test", b"m".to_vec()), 1);
        assert_eq!(boxes.open("a@x.test").snapshot().messages.len(), 1);
        assert_eq!(boxes.release("a@x.test"), vec![2, 3]);
        assert_eq!(boxes.deliver("a@x.test", b"4".to_vec()), 4);
    }

    #[test]
    fn uids_ascend_and_are_never_reused() {
        let boxes = Mailboxes::new("pw");
        assert_eq!(boxes.deliver("A@x.test", b"1".to_vec()), 1);
        assert_eq!(boxes.deliver("a@x.test", b"2".to_vec()), 2);
        let inbox = boxes.get("a@X.TEST").expect("mailbox created by delivery");
        inbox.store_flags(
            &[2],
            FlagChange::Add,
            &Flags {
                deleted: true,
                ..Flags::default()
            },
        );
        assert_eq!(inbox.expunge(None), vec![2]);
        assert_eq!(boxes.deliver("a@x.test", b"3".to_vec()), 3);
        let snap = inbox.snapshot();
        assert_eq!(snap.uid_next, 4);
        let uids: Vec<u32> = snap.messages.iter().map(|m| m.message.uid).collect();
        assert_eq!(uids, vec![1, 3]);
    }

    #[test]
    fn uid_expunge_takes_only_the_given_deleted_uids() {
        let boxes = Mailboxes::new("pw");
        let inbox = boxes.open("b@x.test");
        for _ in 0..3 {
            boxes.deliver("b@x.test", b"m".to_vec());
        }
        let deleted = Flags {
            deleted: true,
            ..Flags::default()
        };
        inbox.store_flags(&[1, 2], FlagChange::Add, &deleted);
        assert_eq!(inbox.expunge(Some(&[2, 3])), vec![2]);
        assert_eq!(inbox.snapshot().messages.len(), 2);
    }

    #[test]
    fn recent_is_claimed_once() {
        let boxes = Mailboxes::new("pw");
        boxes.deliver("c@x.test", b"m".to_vec());
        let inbox = boxes.open("c@x.test");
        assert_eq!(inbox.claim_recent(&[1]), vec![1]);
        assert!(inbox.claim_recent(&[1]).is_empty());
    }

    #[test]
    fn keywords_are_removed_case_insensitively() {
        let mut f = Flags::default();
        let kw = Flags {
            keywords: ["$Junk".to_string()].into(),
            ..Flags::default()
        };
        f.apply(FlagChange::Add, &kw);
        let lower = Flags {
            keywords: ["$junk".to_string()].into(),
            ..Flags::default()
        };
        f.apply(FlagChange::Remove, &lower);
        assert!(f.keywords.is_empty());
    }
}
