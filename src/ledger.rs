//! The ledger: canaries in flight, recently finished canaries and IMAP cursors, kept in one redb
//! file in the state dir (`state_dir/ledger.redb`), so that a restart (crash, `kill -9`, rolling
//! update) resumes what was in flight and never loses or double-counts a canary.
//!
//! The contract with the flow:
//!
//! - a canary is [`Ledger::put`] before its SMTP DATA is sent, and again after every transition;
//! - it leaves the in-flight table only through [`Ledger::finish`], which moves it to the recent
//!   table in the same transaction, so a crash between "finished" and "recorded" is impossible;
//! - on start, [`Ledger::in_flight`] is what to resume. The flags that stop a transition from
//!   being counted twice live inside [`Canary`] itself, so a resumed canary recounts nothing.
//!
//! Every method is one redb transaction and, for writes, durable when it returns (redb's default
//! `Durability::Immediate`: an fsync). They block: call them from `spawn_blocking` or accept a
//! millisecond or two on the runtime thread.
//!
//! Architecture invariant: the ledger stores and returns [`Canary`] values; it never decides
//! anything about them (that is `crate::canary::life`), and knows nothing of networking, config
//! or the flow.
//!
//! # Tables
//!
//! | table | key | value |
//! |---|---|---|
//! | `in_flight` | `probe \0 id` | the canary, serde_json |
//! | `finished` | `probe \0 id` | (sequence, the canary as serde_json) |
//! | `finished_order` | (probe, sequence) | id |
//! | `imap_cursors` | mailbox key | (uidvalidity, last seen uid) |
//! | `meta` | `"format"` | [`FORMAT`] |
//!
//! Finished canaries are ordered by a per-probe sequence number, not by their finish time: the
//! sequence is what makes "oldest evicted" exact even if the wall clock steps back.
//!
//! Values are JSON rather than a binary encoding so that a field added to [`Canary`] with
//! `#[serde(default)]` reads old records, and so an operator can inspect a record. A value that
//! does not decode (an older incompatible format, corruption) is skipped with one warning per key
//! and counted in [`Ledger::undecodable`]; it is never a panic and never blocks the others.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use crate::canary::life::Canary;

/// Name of the ledger file inside the state dir.
pub const FILE_NAME: &str = "ledger.redb";
/// On-disk format of this code. A ledger written by a newer format is refused, not misread; an
/// older one is migrated, one step of [`MIGRATIONS`] at a time, in the transaction that opens
/// it (all steps or none: a crash mid-way leaves the old format, migrated again next start).
///
/// - 1: in flight, finished, their order, IMAP cursors.
/// - 2: format 1 plus incidents and the per-hour history (tables a format-1 ledger may lack).
pub const FORMAT: u32 = 2;

/// One migration step: from format `from` to `from + 1`, inside the opening transaction.
type Migration = fn(&WriteTransaction) -> Result<(), redb::Error>;

/// `MIGRATIONS[i]` takes format `i + 1` to `i + 2`; there is one per format after the first.
const MIGRATIONS: [Migration; FORMAT as usize - 1] = [migrate_1_to_2];

/// Format 2 added the incidents and history tables: a format-1 ledger gets them, empty (the
/// records it has are read as they are).
fn migrate_1_to_2(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(INCIDENTS)?;
    txn.open_table(HISTORY)?;
    Ok(())
}
/// Finished canaries kept per probe for the status page; the oldest beyond this are evicted.
pub const RECENT_CAP: usize = 200;

const IN_FLIGHT: TableDefinition<&str, &[u8]> = TableDefinition::new("in_flight");
const FINISHED: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("finished");
const FINISHED_ORDER: TableDefinition<(&str, u64), &str> = TableDefinition::new("finished_order");
const CURSORS: TableDefinition<&str, (u32, u32)> = TableDefinition::new("imap_cursors");
/// The free space under which the ledger is called full ([`Ledger::check`]): redb grows its
/// file in steps of many pages, so a few KiB left are as good as none.
pub const SPACE_FLOOR: u64 = 64 * 1024;

const META: TableDefinition<&str, u32> = TableDefinition::new("meta");
/// Incidents (`crate::flow::incident`), JSON, by (probe, id); the newest `incident::KEEP` per
/// probe. Since format 2.
/// Per probe, stage and hour: `flow::history::Hour` as JSON, keyed `(probe, history::key)`.
const HISTORY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("history");
const INCIDENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("incidents");

/// What went wrong, with the file and the operation it happened in.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(
        "ledger {}: is in use by another mailcanary (only one process may own a state dir)",
        path.display()
    )]
    InUse { path: PathBuf },
    #[error("ledger {}: {operation}: {source}", path.display())]
    Io {
        path: PathBuf,
        operation: &'static str,
        source: std::io::Error,
    },
    #[error("ledger {}: {operation}: {source}", path.display())]
    Db {
        path: PathBuf,
        operation: &'static str,
        source: Box<redb::Error>,
    },
    #[error("ledger {}: {operation}: encoding {key:?}: {source}", path.display())]
    Encode {
        path: PathBuf,
        operation: &'static str,
        key: String,
        source: serde_json::Error,
    },
    #[error(
        "ledger {}: written in format {found}, this mailcanary reads format {FORMAT}; \
         run a newer mailcanary or move the file away",
        path.display()
    )]
    NewerFormat { path: PathBuf, found: u32 },
    #[error(
        "ledger {}: its format is {found}, which no mailcanary wrote; move the file away",
        path.display()
    )]
    UnknownFormat { path: PathBuf, found: u32 },
    #[error("ledger {}: {operation}: probe name {probe:?} contains a NUL byte", path.display())]
    InvalidProbe {
        path: PathBuf,
        operation: &'static str,
        probe: String,
    },
    #[error("ledger {}: {operation}: closed after an earlier error; waiting to reopen", path.display())]
    Closed {
        path: PathBuf,
        operation: &'static str,
    },
    #[error(
        "state dir {}: not writable by this process (uid {uid}): {error}; make it writable by \
         that user (chown or chmod it; on Kubernetes a securityContext fsGroup) or point \
         --state-dir at a writable directory",
        dir.display()
    )]
    NotWritable {
        dir: PathBuf,
        uid: u32,
        /// Not `source`: the message already says it, and `{:#}` would say it twice.
        error: std::io::Error,
    },
    #[error(
        "ledger {}: the file was deleted or replaced under the running prober",
        path.display()
    )]
    Gone { path: PathBuf },
    #[error(
        "ledger {}: its file system has {available} bytes free, under the {SPACE_FLOOR} the \
         ledger needs to grow: free space in the state dir",
        path.display()
    )]
    Full { path: PathBuf, available: u64 },
}

impl LedgerError {
    /// The `op` label of `mailcanary_ledger_errors_total` this error counts under: one of
    /// [`OPS`].
    pub fn op(&self) -> &'static str {
        match self {
            LedgerError::InUse { .. }
            | LedgerError::NewerFormat { .. }
            | LedgerError::UnknownFormat { .. }
            | LedgerError::NotWritable { .. } => "open",
            LedgerError::Gone { .. } | LedgerError::Full { .. } => "check",
            LedgerError::Io { operation, .. }
            | LedgerError::Db { operation, .. }
            | LedgerError::Encode { operation, .. }
            | LedgerError::InvalidProbe { operation, .. }
            | LedgerError::Closed { operation, .. } => op_of(operation),
        }
    }
}

/// The operations `mailcanary_ledger_errors_total{op}` counts: opening (and reopening) the
/// file, writing canaries and cursors, reading them, and the periodic check that the file on
/// disk is still the one open and its file system has room ([`SPACE_FLOOR`]).
pub const OPS: [&str; 4] = ["open", "write", "read", "check"];

fn op_of(operation: &str) -> &'static str {
    match operation {
        "create the state dir" | "open" | "initialise" | "reopen" => "open",
        "put" | "finish" | "write" | "set cursor" => "write",
        "check" => "check",
        _ => "read",
    }
}

/// What the ledger knows about one canary id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Still watched: a delivery of it is the real one.
    InFlight(Canary),
    /// Already finished (and still among the recent ones): a delivery of it is a duplicate.
    Finished(Canary),
    /// Never seen, or finished so long ago it was evicted.
    Unknown,
}

/// One write of a batch: a canary still in flight, or one that finished.
#[derive(Clone, Debug)]
pub enum Write {
    Put(Canary),
    Finish(Canary),
    Cursor {
        mailbox_key: String,
        uidvalidity: u32,
        last_uid: u32,
    },
    /// An incident, new or changed; the oldest beyond `incident::KEEP` of its probe go.
    Incident(crate::flow::incident::Incident),
    /// A stage's hour of history, new or changed; `None` deletes it.
    History {
        probe: String,
        stage: crate::canary::life::Stage,
        hour: u64,
        bucket: Option<crate::flow::history::Hour>,
    },
}

/// The embedded store. One per process and state dir; `Send + Sync`, share it with an `Arc`.
///
/// After an I/O error redb refuses every later transaction ("Previous I/O error occurred") until
/// the database is closed and opened again, so the handle can be closed ([`Ledger::close`]) and
/// reopened ([`Ledger::reopen`]) in place; in between every call answers
/// [`LedgerError::Closed`].
pub struct Ledger {
    db: RwLock<Option<Database>>,
    /// Device and inode of the file when it was opened: [`Ledger::check`] compares them with
    /// what the path names now, so a deleted or replaced file is found.
    identity: Mutex<Option<(u64, u64)>>,
    state_dir: PathBuf,
    path: PathBuf,
    /// Keys already warned about as undecodable, so a bad record is logged once, not per read.
    undecodable: Mutex<HashSet<String>>,
    /// Corrupt files moved aside and replaced by a fresh ledger, not yet taken by
    /// [`Ledger::take_recovered`].
    recovered: AtomicU64,
}

/// Fails with [`LedgerError::NotWritable`] if this process cannot create files in `state_dir`
/// (creating the dir first if it is missing): checked once at start, so that a state dir owned
/// by another user is one clear line rather than a redb or key-file error.
pub fn check_writable(state_dir: &Path) -> Result<(), LedgerError> {
    let fail = |error: std::io::Error| LedgerError::NotWritable {
        dir: state_dir.to_path_buf(),
        uid: rustix::process::geteuid().as_raw(),
        error,
    };
    std::fs::create_dir_all(state_dir).map_err(fail)?;
    let probe = state_dir.join(format!(".write-test-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe)
        .map_err(fail)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Whether opening the file failed because it is not a sound redb database (truncated,
/// overwritten, bit-rotted): such a file is moved aside, not retried forever. A file in use, of
/// an older redb format or of a newer ledger format is not corrupt and is refused instead.
fn is_corrupt(err: &redb::Error) -> bool {
    match err {
        redb::Error::Corrupted(_) => true,
        // redb answers a file that holds no database, or ends early, with an I/O error.
        redb::Error::Io(e) => matches!(
            e.kind(),
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").field("path", &self.path).finish()
    }
}

impl Ledger {
    /// Opens (or creates) `state_dir/ledger.redb`, creating `state_dir` if it is missing.
    ///
    /// A second process (or a second `open` in this one) on the same file gets
    /// [`LedgerError::InUse`]: two probers resuming the same canaries would count them twice.
    pub fn open(state_dir: &Path) -> Result<Ledger, LedgerError> {
        let ledger = Ledger {
            db: RwLock::new(None),
            identity: Mutex::new(None),
            state_dir: state_dir.to_path_buf(),
            path: state_dir.join(FILE_NAME),
            undecodable: Mutex::new(HashSet::new()),
            recovered: AtomicU64::new(0),
        };
        ledger.reopen()?;
        Ok(ledger)
    }

    /// Closes the file (if open) and opens it again, creating the state dir and the file if
    /// they vanished. What was written before a deletion is not in the new file: the caller
    /// writes again what it holds in memory.
    pub fn reopen(&self) -> Result<(), LedgerError> {
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        // redb allows one open handle per file and process: the old one must be gone first.
        drop(slot.take());
        let path = &self.path;
        std::fs::create_dir_all(&self.state_dir).map_err(|source| LedgerError::Io {
            path: path.clone(),
            operation: "create the state dir",
            source,
        })?;
        let db = match self.open_db() {
            Err((err, true)) => {
                let unix = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let aside = path.with_file_name(format!("{FILE_NAME}.corrupt-{unix}"));
                std::fs::rename(path, &aside).map_err(|source| LedgerError::Io {
                    path: path.clone(),
                    operation: "move the corrupt file aside",
                    source,
                })?;
                tracing::error!(
                    ledger = %path.display(),
                    moved_to = %aside.display(),
                    error = %err,
                    "the ledger file is corrupt: moved aside and a fresh ledger started (the canaries in flight in it are not resumed)"
                );
                self.recovered.fetch_add(1, Ordering::Relaxed);
                self.open_db().map_err(|(err, _)| err)?
            }
            other => other.map_err(|(err, _)| err)?,
        };
        *self.identity.lock().unwrap_or_else(|p| p.into_inner()) = identity(path);
        *slot = Some(db);
        Ok(())
    }

    /// Opens (or creates) the file and initialises it. On failure, with whether the file is
    /// corrupt ([`is_corrupt`]); a panic inside redb (its debug build asserts on some
    /// corruptions) counts as corruption.
    fn open_db(&self) -> Result<Database, (LedgerError, bool)> {
        let path = &self.path;
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let db = Database::create(path).map_err(|err| match err {
                redb::DatabaseError::DatabaseAlreadyOpen => {
                    (LedgerError::InUse { path: path.clone() }, false)
                }
                other => {
                    let source: redb::Error = other.into();
                    let corrupt = is_corrupt(&source);
                    let err = LedgerError::Db {
                        path: path.clone(),
                        operation: "open",
                        source: Box::new(source),
                    };
                    (err, corrupt)
                }
            })?;
            match self.init(&db) {
                Ok(()) => Ok(db),
                Err(e) => {
                    let corrupt =
                        matches!(&e, LedgerError::Db { source, .. } if is_corrupt(source));
                    Err((e, corrupt))
                }
            }
        }));
        opened.unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic")
                .to_string();
            Err((
                LedgerError::Db {
                    path: path.clone(),
                    operation: "open",
                    source: Box::new(redb::Error::Corrupted(format!("redb panicked: {what}"))),
                },
                true,
            ))
        })
    }

    /// How many corrupt files were moved aside since the last call (see [`Ledger::reopen`]).
    pub fn take_recovered(&self) -> u64 {
        self.recovered.swap(0, Ordering::Relaxed)
    }

    /// Closes the file after an error; every call fails with [`LedgerError::Closed`] until
    /// [`Ledger::reopen`] succeeds.
    pub fn close(&self) {
        drop(self.db.write().unwrap_or_else(|p| p.into_inner()).take());
    }

    /// Whether the file is open.
    pub fn is_open(&self) -> bool {
        self.db.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Fails if the file the ledger has open is no longer the one its path names (deleted,
    /// its state dir removed, or replaced): writes would go to an unlinked file and be gone at
    /// the next start.
    ///
    /// Also fails while the file system holding it has less than [`SPACE_FLOOR`] free. On a
    /// full disk redb goes on committing into pages its file already has and fails only when
    /// it must grow, so a full disk alone would make the ledger flap between writable and
    /// broken, and the probe between green and red, with every other canary skipped; a full
    /// state dir is one steady failure instead, until space is freed.
    pub fn check(&self) -> Result<(), LedgerError> {
        let open = *self.identity.lock().unwrap_or_else(|p| p.into_inner());
        if open.is_some() && identity(&self.path) != open {
            return Err(LedgerError::Gone {
                path: self.path.clone(),
            });
        }
        // A file system that cannot say (statvfs failing) is not called full.
        if let Ok(fs) = rustix::fs::statvfs(&self.state_dir) {
            let available = fs.f_bavail.saturating_mul(fs.f_frsize);
            if available < SPACE_FLOOR {
                return Err(LedgerError::Full {
                    path: self.path.clone(),
                    available,
                });
            }
        }
        Ok(())
    }

    fn with_db<R>(
        &self,
        operation: &'static str,
        f: impl FnOnce(&Database) -> Result<R, LedgerError>,
    ) -> Result<R, LedgerError> {
        let slot = self.db.read().unwrap_or_else(|p| p.into_inner());
        match slot.as_ref() {
            Some(db) => f(db),
            None => Err(LedgerError::Closed {
                path: self.path.clone(),
                operation,
            }),
        }
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the tables (so reads never meet a missing table) and checks the format.
    fn init(&self, db: &Database) -> Result<(), LedgerError> {
        const OP: &str = "initialise";
        let txn = db.begin_write().map_err(self.db_err(OP))?;
        {
            let mut meta = txn.open_table(META).map_err(self.db_err(OP))?;
            let found = meta
                .get("format")
                .map_err(self.db_err(OP))?
                .map(|v| v.value());
            match found {
                Some(found) if found > FORMAT => {
                    return Err(LedgerError::NewerFormat {
                        path: self.path.clone(),
                        found,
                    });
                }
                Some(0) => {
                    return Err(LedgerError::UnknownFormat {
                        path: self.path.clone(),
                        found: 0,
                    });
                }
                Some(FORMAT) => {}
                Some(older) => {
                    for step in &MIGRATIONS[older as usize - 1..] {
                        step(&txn).map_err(self.db_err("migrate"))?;
                    }
                    meta.insert("format", FORMAT).map_err(self.db_err(OP))?;
                    tracing::info!(ledger = %self.path.display(), from = older, to = FORMAT, "ledger migrated to this mailcanary's format");
                }
                None => {
                    meta.insert("format", FORMAT).map_err(self.db_err(OP))?;
                }
            }
            txn.open_table(IN_FLIGHT).map_err(self.db_err(OP))?;
            txn.open_table(FINISHED).map_err(self.db_err(OP))?;
            txn.open_table(FINISHED_ORDER).map_err(self.db_err(OP))?;
            txn.open_table(CURSORS).map_err(self.db_err(OP))?;
            txn.open_table(INCIDENTS).map_err(self.db_err(OP))?;
            txn.open_table(HISTORY).map_err(self.db_err(OP))?;
        }
        txn.commit().map_err(self.db_err(OP))
    }

    /// Inserts or replaces an in-flight canary. Durable when it returns.
    pub fn put(&self, canary: &Canary) -> Result<(), LedgerError> {
        self.write(&[Write::Put(canary.clone())])
    }

    /// Moves a canary from in flight to the recent ones of its probe, in one transaction, and
    /// evicts the oldest recent ones beyond [`RECENT_CAP`]. Finishing the same canary twice
    /// keeps one record (the later one).
    pub fn finish(&self, canary: &Canary) -> Result<(), LedgerError> {
        self.write(&[Write::Finish(canary.clone())])
    }

    /// Applies `writes` in order in one transaction: one fsync for the lot (group commit).
    /// Durable when it returns; on an error none of them is.
    pub fn write(&self, writes: &[Write]) -> Result<(), LedgerError> {
        const OP: &str = "write";
        self.with_db(OP, |db| {
            let txn = db.begin_write().map_err(self.db_err(OP))?;
            for w in writes {
                match w {
                    Write::Put(c) => self.put_in(&txn, c)?,
                    Write::Finish(c) => self.finish_in(&txn, c)?,
                    Write::Cursor {
                        mailbox_key,
                        uidvalidity,
                        last_uid,
                    } => {
                        let mut table = txn.open_table(CURSORS).map_err(self.db_err(OP))?;
                        table
                            .insert(mailbox_key.as_str(), (*uidvalidity, *last_uid))
                            .map_err(self.db_err(OP))?;
                    }
                    Write::History {
                        probe,
                        stage,
                        hour,
                        bucket,
                    } => {
                        self.check_probe(OP, probe)?;
                        let key = (probe.as_str(), crate::flow::history::key(*stage, *hour));
                        let mut table = txn.open_table(HISTORY).map_err(self.db_err(OP))?;
                        match bucket {
                            Some(b) => {
                                let bytes =
                                    serde_json::to_vec(b).map_err(|e| LedgerError::Encode {
                                        path: self.path.clone(),
                                        operation: OP,
                                        key: format!("history {stage} {hour} of {probe}"),
                                        source: e,
                                    })?;
                                table
                                    .insert(key, bytes.as_slice())
                                    .map_err(self.db_err(OP))?;
                            }
                            None => {
                                table.remove(key).map_err(self.db_err(OP))?;
                            }
                        }
                    }
                    Write::Incident(i) => {
                        self.check_probe(OP, &i.probe)?;
                        let bytes = serde_json::to_vec(i).map_err(|e| LedgerError::Encode {
                            path: self.path.clone(),
                            operation: OP,
                            key: format!("incident {} of {}", i.id, i.probe),
                            source: e,
                        })?;
                        let mut table = txn.open_table(INCIDENTS).map_err(self.db_err(OP))?;
                        table
                            .insert((i.probe.as_str(), i.id), bytes.as_slice())
                            .map_err(self.db_err(OP))?;
                        let keep = crate::flow::incident::KEEP as u64;
                        if i.id > keep {
                            let old = (i.probe.as_str(), 0u64)..(i.probe.as_str(), i.id - keep);
                            table
                                .retain_in(old, |_, _| false)
                                .map_err(self.db_err(OP))?;
                        }
                    }
                }
            }
            txn.commit().map_err(self.db_err(OP))
        })
    }

    fn put_in(&self, txn: &WriteTransaction, canary: &Canary) -> Result<(), LedgerError> {
        const OP: &str = "put";
        let key = self.key(OP, &canary.probe, &canary.id)?;
        let value = self.encode(OP, &key, canary)?;
        let mut table = txn.open_table(IN_FLIGHT).map_err(self.db_err(OP))?;
        table
            .insert(key.as_str(), value.as_slice())
            .map_err(self.db_err(OP))?;
        Ok(())
    }

    fn finish_in(&self, txn: &WriteTransaction, canary: &Canary) -> Result<(), LedgerError> {
        const OP: &str = "finish";
        let probe = canary.probe.as_str();
        let key = self.key(OP, probe, &canary.id)?;
        let value = self.encode(OP, &key, canary)?;
        let mut in_flight = txn.open_table(IN_FLIGHT).map_err(self.db_err(OP))?;
        let mut finished = txn.open_table(FINISHED).map_err(self.db_err(OP))?;
        let mut order = txn.open_table(FINISHED_ORDER).map_err(self.db_err(OP))?;

        in_flight.remove(key.as_str()).map_err(self.db_err(OP))?;
        let previous = finished
            .get(key.as_str())
            .map_err(self.db_err(OP))?
            .map(|v| v.value().0);
        if let Some(seq) = previous {
            order.remove((probe, seq)).map_err(self.db_err(OP))?;
        }
        let range = (probe, 0u64)..=(probe, u64::MAX);
        let next = order
            .range(range.clone())
            .map_err(self.db_err(OP))?
            .next_back()
            .transpose()
            .map_err(self.db_err(OP))?
            .map_or(0, |(k, _)| k.value().1 + 1);
        finished
            .insert(key.as_str(), (next, value.as_slice()))
            .map_err(self.db_err(OP))?;
        order
            .insert((probe, next), canary.id.as_str())
            .map_err(self.db_err(OP))?;

        // Evict the oldest beyond the cap. Collected first: a table cannot be changed while
        // a range over it is open.
        let mut kept = Vec::new();
        for entry in order.range(range).map_err(self.db_err(OP))? {
            let (k, v) = entry.map_err(self.db_err(OP))?;
            kept.push((k.value().1, v.value().to_string()));
        }
        let excess = kept.len().saturating_sub(RECENT_CAP);
        for (seq, id) in kept.into_iter().take(excess) {
            order.remove((probe, seq)).map_err(self.db_err(OP))?;
            finished
                .remove(join_key(probe, &id).as_str())
                .map_err(self.db_err(OP))?;
        }
        Ok(())
    }

    /// Every in-flight canary of every probe, oldest first (by `created_ms`): what to resume.
    pub fn in_flight(&self) -> Result<Vec<Canary>, LedgerError> {
        self.read_in_flight("read in-flight", None)
    }

    /// The in-flight canaries of one probe, oldest first.
    pub fn in_flight_of(&self, probe: &str) -> Result<Vec<Canary>, LedgerError> {
        self.read_in_flight("read in-flight of a probe", Some(probe))
    }

    fn read_in_flight(
        &self,
        op: &'static str,
        probe: Option<&str>,
    ) -> Result<Vec<Canary>, LedgerError> {
        let txn = self.begin_read(op)?;
        let table = txn.open_table(IN_FLIGHT).map_err(self.db_err(op))?;
        let range = match probe {
            Some(probe) => {
                self.check_probe(op, probe)?;
                // Keys of `probe` are exactly those in ["probe\0", "probe\x01").
                let lower = format!("{probe}\0");
                let upper = format!("{probe}\u{1}");
                table.range(lower.as_str()..upper.as_str())
            }
            None => table.iter(),
        }
        .map_err(self.db_err(op))?;
        let mut out = Vec::new();
        for entry in range {
            let (k, v) = entry.map_err(self.db_err(op))?;
            if let Some(canary) = self.decode(k.value(), v.value()) {
                out.push(canary);
            }
        }
        // Stable: equal times stay in key order, so the result is deterministic.
        out.sort_by_key(|c| c.created_ms);
        Ok(out)
    }

    /// Whether `probe`/`id` is in flight, recently finished, or unknown to this ledger.
    pub fn lookup(&self, probe: &str, id: &str) -> Result<Lookup, LedgerError> {
        const OP: &str = "lookup";
        let key = self.key(OP, probe, id)?;
        let txn = self.begin_read(OP)?;
        let in_flight = txn.open_table(IN_FLIGHT).map_err(self.db_err(OP))?;
        if let Some(v) = in_flight.get(key.as_str()).map_err(self.db_err(OP))?
            && let Some(canary) = self.decode(&key, v.value())
        {
            return Ok(Lookup::InFlight(canary));
        }
        let finished = txn.open_table(FINISHED).map_err(self.db_err(OP))?;
        if let Some(v) = finished.get(key.as_str()).map_err(self.db_err(OP))?
            && let Some(canary) = self.decode(&key, v.value().1)
        {
            return Ok(Lookup::Finished(canary));
        }
        Ok(Lookup::Unknown)
    }

    /// Up to `limit` finished canaries of `probe`, newest first.
    pub fn recent(&self, probe: &str, limit: usize) -> Result<Vec<Canary>, LedgerError> {
        const OP: &str = "read recent";
        self.check_probe(OP, probe)?;
        let txn = self.begin_read(OP)?;
        let order = txn.open_table(FINISHED_ORDER).map_err(self.db_err(OP))?;
        let finished = txn.open_table(FINISHED).map_err(self.db_err(OP))?;
        let mut out = Vec::new();
        let range = order
            .range((probe, 0u64)..=(probe, u64::MAX))
            .map_err(self.db_err(OP))?;
        for entry in range.rev() {
            if out.len() >= limit {
                break;
            }
            let (_, id) = entry.map_err(self.db_err(OP))?;
            let key = join_key(probe, id.value());
            if let Some(v) = finished.get(key.as_str()).map_err(self.db_err(OP))?
                && let Some(canary) = self.decode(&key, v.value().1)
            {
                out.push(canary);
            }
        }
        Ok(out)
    }

    /// The raw records of `probe` in a table keyed `(probe, n)`, in key order. A table
    /// missing from a ledger written before it existed (opened read-only) has none.
    fn probe_records(
        &self,
        op: &'static str,
        def: TableDefinition<'static, (&'static str, u64), &'static [u8]>,
        probe: &str,
    ) -> Result<Vec<(u64, Vec<u8>)>, LedgerError> {
        self.check_probe(op, probe)?;
        let txn = self.begin_read(op)?;
        let table = match txn.open_table(def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.db_err(op)(e)),
        };
        let mut out = Vec::new();
        for entry in table
            .range((probe, 0u64)..=(probe, u64::MAX))
            .map_err(self.db_err(op))?
        {
            let (k, v) = entry.map_err(self.db_err(op))?;
            out.push((k.value().1, v.value().to_vec()));
        }
        Ok(out)
    }

    /// The incidents of `probe`, oldest first (an open one last, if any).
    pub fn incidents(
        &self,
        probe: &str,
    ) -> Result<Vec<crate::flow::incident::Incident>, LedgerError> {
        let records = self.probe_records("read incidents", INCIDENTS, probe)?;
        Ok(records
            .iter()
            .filter_map(|(_, v)| serde_json::from_slice(v).ok())
            .collect())
    }

    /// The history of `probe`: per stage, its stored hours. A record this build cannot
    /// decode (a stage it does not know, a damaged value) is skipped.
    pub fn history(
        &self,
        probe: &str,
    ) -> Result<Vec<(crate::canary::life::Stage, u64, crate::flow::history::Hour)>, LedgerError>
    {
        let records = self.probe_records("read history", HISTORY, probe)?;
        Ok(records
            .iter()
            .filter_map(|(k, v)| {
                let (stage, hour) = crate::flow::history::from_key(*k)?;
                Some((stage, hour, serde_json::from_slice(v).ok()?))
            })
            .collect())
    }

    /// Every probe that has incidents recorded.
    pub fn incident_probes(&self) -> Result<Vec<String>, LedgerError> {
        const OP: &str = "read incidents";
        let txn = self.begin_read(OP)?;
        let table = match txn.open_table(INCIDENTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.db_err(OP)(e)),
        };
        let mut probes: Vec<String> = Vec::new();
        for entry in table.iter().map_err(self.db_err(OP))? {
            let (k, _) = entry.map_err(self.db_err(OP))?;
            let p = k.value().0.to_string();
            if probes.last() != Some(&p) {
                probes.push(p);
            }
        }
        Ok(probes)
    }

    /// The IMAP cursor of a mailbox: `(uidvalidity, last uid seen)`, for UID catch-up after a
    /// restart. `mailbox_key` is the caller's stable name for the mailbox (e.g. probe + folder).
    pub fn cursor(&self, mailbox_key: &str) -> Result<Option<(u32, u32)>, LedgerError> {
        const OP: &str = "read cursor";
        let txn = self.begin_read(OP)?;
        let table = txn.open_table(CURSORS).map_err(self.db_err(OP))?;
        Ok(table
            .get(mailbox_key)
            .map_err(self.db_err(OP))?
            .map(|v| v.value()))
    }

    /// Records the IMAP cursor of a mailbox. Durable when it returns.
    pub fn set_cursor(
        &self,
        mailbox_key: &str,
        uidvalidity: u32,
        last_uid: u32,
    ) -> Result<(), LedgerError> {
        self.write(&[Write::Cursor {
            mailbox_key: mailbox_key.to_string(),
            uidvalidity,
            last_uid,
        }])
    }

    fn begin_read(&self, op: &'static str) -> Result<redb::ReadTransaction, LedgerError> {
        self.with_db(op, |db| db.begin_read().map_err(self.db_err(op)))
    }

    /// How many distinct records were found undecodable (and skipped) since this ledger was
    /// opened. Each was logged once with its key.
    pub fn undecodable(&self) -> usize {
        self.undecodable
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }

    fn decode(&self, key: &str, bytes: &[u8]) -> Option<Canary> {
        match serde_json::from_slice::<Canary>(bytes) {
            Ok(canary) => Some(canary),
            Err(err) => {
                let first = self
                    .undecodable
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .insert(key.to_string());
                if first {
                    tracing::warn!(
                        ledger = %self.path.display(),
                        key = %key.replace('\0', "/"),
                        error = %err,
                        "skipping a ledger record that does not decode (older format or corruption)"
                    );
                }
                None
            }
        }
    }

    fn encode(&self, op: &'static str, key: &str, canary: &Canary) -> Result<Vec<u8>, LedgerError> {
        serde_json::to_vec(canary).map_err(|source| LedgerError::Encode {
            path: self.path.clone(),
            operation: op,
            key: key.replace('\0', "/"),
            source,
        })
    }

    fn key(&self, op: &'static str, probe: &str, id: &str) -> Result<String, LedgerError> {
        self.check_probe(op, probe)?;
        Ok(join_key(probe, id))
    }

    /// A NUL in a probe name would make `probe\0id` ambiguous and the per-probe range wrong.
    /// Config validation forbids it; this keeps the ledger correct on its own.
    fn check_probe(&self, op: &'static str, probe: &str) -> Result<(), LedgerError> {
        if probe.contains('\0') {
            return Err(LedgerError::InvalidProbe {
                path: self.path.clone(),
                operation: op,
                probe: probe.to_string(),
            });
        }
        Ok(())
    }

    fn db_err<E: Into<redb::Error>>(
        &self,
        operation: &'static str,
    ) -> impl FnOnce(E) -> LedgerError {
        let path = self.path.clone();
        move |err| LedgerError::Db {
            path,
            operation,
            source: Box::new(err.into()),
        }
    }
}

/// Device and inode of `path`, if it exists.
fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn join_key(probe: &str, id: &str) -> String {
    format!("{probe}\0{id}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canary::life::{Stage, tests::limits};

    fn canary(probe: &str, id: &str, now: u64) -> Canary {
        Canary::new(
            probe,
            id,
            &format!("mc-{id}-tok"),
            &format!("<{id}@prober.test>"),
            vec![Stage::Submit, Stage::Import, Stage::Delivery],
            limits(),
            now,
        )
    }

    fn finished(probe: &str, id: &str, now: u64) -> Canary {
        let mut c = canary(probe, id, now);
        c.observe(Stage::Submit, now + 10);
        c.observe(Stage::Import, now + 20);
        c.observe(Stage::Delivery, now + 30);
        assert!(c.is_finished());
        c
    }

    #[test]
    fn put_survives_a_reopen_and_resumes_equal() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut a = canary("p", "aaaa", 2_000);
        a.observe(Stage::Submit, 2_100);
        a.tick(7_200); // import overdue: a flag that must survive, or it is counted twice
        let b = canary("p", "bbbb", 1_000);
        let c = canary("q", "cccc", 3_000);
        {
            let ledger = Ledger::open(&state).unwrap();
            assert!(state.join(FILE_NAME).exists());
            for x in [&a, &b, &c] {
                ledger.put(x).unwrap();
            }
        }
        let ledger = Ledger::open(&state).unwrap();
        assert_eq!(
            ledger.in_flight().unwrap(),
            vec![b.clone(), a.clone(), c.clone()]
        );
        assert_eq!(ledger.in_flight_of("p").unwrap(), vec![b, a.clone()]);
        assert_eq!(ledger.in_flight_of("q").unwrap(), vec![c]);
        assert!(ledger.in_flight_of("").unwrap().is_empty());

        // An upsert replaces, never duplicates.
        a.observe(Stage::Import, 9_000);
        ledger.put(&a).unwrap();
        let p = ledger.in_flight_of("p").unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[1], a);
    }

    #[test]
    fn a_probe_prefix_of_another_is_not_mixed_up() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        ledger.put(&canary("p", "one", 1)).unwrap();
        ledger.put(&canary("p2", "two", 2)).unwrap();
        ledger.put(&canary("p-x", "three", 3)).unwrap();
        let ids = |v: Vec<Canary>| v.into_iter().map(|c| c.id).collect::<Vec<_>>();
        assert_eq!(ids(ledger.in_flight_of("p").unwrap()), ["one"]);
        assert_eq!(ids(ledger.in_flight_of("p2").unwrap()), ["two"]);
        ledger.finish(&finished("p", "four", 4)).unwrap();
        ledger.finish(&finished("p2", "five", 5)).unwrap();
        assert_eq!(ids(ledger.recent("p", 10).unwrap()), ["four"]);
        assert!(matches!(
            ledger.put(&canary("p\0x", "six", 6)),
            Err(LedgerError::InvalidProbe { .. })
        ));
    }

    #[test]
    fn history_hours_round_trip_per_probe_and_a_none_deletes() {
        use crate::flow::history::Hour;
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let hour = |ok| Hour {
            ok,
            ..Hour::default()
        };
        let put = |probe: &str, stage, h, b: Option<Hour>| Write::History {
            probe: probe.into(),
            stage,
            hour: h,
            bucket: b,
        };
        ledger
            .write(&[
                put("p", Stage::Import, 10, Some(hour(1))),
                put("p", Stage::EndToEnd, 10, Some(hour(2))),
                put("p", Stage::Import, 11, Some(hour(3))),
                put("p2", Stage::Import, 10, Some(hour(4))),
            ])
            .unwrap();
        ledger.write(&[put("p", Stage::Import, 10, None)]).unwrap();
        drop(ledger);
        let ledger = Ledger::open(dir.path()).unwrap();
        assert_eq!(
            ledger.history("p").unwrap(),
            vec![(Stage::EndToEnd, 10, hour(2)), (Stage::Import, 11, hour(3))]
        );
        assert_eq!(
            ledger.history("p2").unwrap(),
            vec![(Stage::Import, 10, hour(4))]
        );
        assert_eq!(ledger.history("q").unwrap(), vec![]);
    }

    #[test]
    fn finish_moves_it_out_of_flight_in_one_step() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let mut c = canary("p", "aaaa", 1_000);
        ledger.put(&c).unwrap();
        c.observe(Stage::Submit, 1_010);
        c.observe(Stage::Import, 1_020);
        c.observe(Stage::Delivery, 1_030);
        ledger.finish(&c).unwrap();
        assert!(ledger.in_flight().unwrap().is_empty());
        assert_eq!(ledger.recent("p", 10).unwrap(), vec![c.clone()]);
        drop(ledger);
        let ledger = Ledger::open(dir.path()).unwrap();
        assert!(
            ledger.in_flight().unwrap().is_empty(),
            "not resumed after a restart"
        );
        assert_eq!(ledger.recent("p", 10).unwrap(), vec![c.clone()]);
        // Finishing again (a retry after an error) keeps one record.
        ledger.finish(&c).unwrap();
        assert_eq!(ledger.recent("p", 10).unwrap().len(), 1);
    }

    #[test]
    fn recent_is_newest_first_and_capped_per_probe() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let n = RECENT_CAP + 5;
        for i in 0..n {
            let c = finished("p", &format!("id{i:04}"), i as u64 * 100);
            ledger.put(&c).unwrap();
            ledger.finish(&c).unwrap();
        }
        ledger.finish(&finished("q", "other", 1)).unwrap();

        let all = ledger.recent("p", usize::MAX).unwrap();
        assert_eq!(all.len(), RECENT_CAP);
        assert_eq!(all[0].id, format!("id{:04}", n - 1), "newest first");
        assert_eq!(all[RECENT_CAP - 1].id, "id0005", "the 5 oldest evicted");
        assert_eq!(ledger.lookup("p", "id0004").unwrap(), Lookup::Unknown);
        let three: Vec<_> = ledger
            .recent("p", 3)
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(three, ["id0204", "id0203", "id0202"]);
        assert_eq!(
            ledger.recent("q", 10).unwrap().len(),
            1,
            "another probe's cap"
        );
        assert!(ledger.recent("nobody", 10).unwrap().is_empty());
    }

    #[test]
    fn lookup_tells_in_flight_finished_and_unknown_apart() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let live = canary("p", "live", 1);
        let done = finished("p", "done", 2);
        ledger.put(&live).unwrap();
        ledger.put(&done).unwrap();
        ledger.finish(&done).unwrap();
        assert_eq!(ledger.lookup("p", "live").unwrap(), Lookup::InFlight(live));
        assert_eq!(ledger.lookup("p", "done").unwrap(), Lookup::Finished(done));
        assert_eq!(ledger.lookup("p", "never").unwrap(), Lookup::Unknown);
        assert_eq!(
            ledger.lookup("q", "live").unwrap(),
            Lookup::Unknown,
            "ids are per probe"
        );
    }

    #[test]
    fn cursor_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ledger = Ledger::open(dir.path()).unwrap();
            assert_eq!(ledger.cursor("p/INBOX").unwrap(), None);
            ledger.set_cursor("p/INBOX", 7, 41).unwrap();
            ledger.set_cursor("p/INBOX", 7, 42).unwrap();
            ledger.set_cursor("q/INBOX", u32::MAX, 1).unwrap();
        }
        let ledger = Ledger::open(dir.path()).unwrap();
        assert_eq!(ledger.cursor("p/INBOX").unwrap(), Some((7, 42)));
        assert_eq!(ledger.cursor("q/INBOX").unwrap(), Some((u32::MAX, 1)));
    }

    #[test]
    fn a_second_open_of_the_same_dir_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let first = Ledger::open(dir.path()).unwrap();
        let err = Ledger::open(dir.path()).unwrap_err();
        assert!(matches!(err, LedgerError::InUse { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("in use by another mailcanary"), "{msg}");
        assert!(msg.contains(FILE_NAME), "{msg}");
        drop(first);
        Ledger::open(dir.path()).expect("free again once the first is closed");
    }

    /// Set by [`another_process_is_refused_too`] for the copy of this test binary it starts.
    const CHILD_DIR_ENV: &str = "MAILCANARY_LEDGER_TEST_CHILD_DIR";

    /// The other half of [`another_process_is_refused_too`]; does nothing when run on its own.
    #[test]
    fn child_process_opens_the_ledger() {
        if let Some(dir) = std::env::var_os(CHILD_DIR_ENV) {
            match Ledger::open(Path::new(&dir)) {
                Ok(_) => println!("CHILD: opened"),
                Err(err) => println!("CHILD: {err}"),
            }
        }
    }

    #[test]
    fn another_process_is_refused_too() {
        let dir = tempfile::tempdir().unwrap();
        let _held = Ledger::open(dir.path()).unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "ledger::tests::child_process_opens_the_ledger",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR_ENV, dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("CHILD: ledger") && stdout.contains("is in use by another mailcanary"),
            "{stdout}"
        );
    }

    #[test]
    fn an_undecodable_record_is_skipped_and_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let good = canary("p", "good", 1);
        ledger.put(&good).unwrap();
        let txn = ledger
            .with_db("test", |db| Ok(db.begin_write().unwrap()))
            .unwrap();
        {
            let mut t = txn.open_table(IN_FLIGHT).unwrap();
            t.insert("p\0bad", &b"{\"probe\": \"p\", \"id\": 4"[..])
                .unwrap();
            t.insert("p\0old", &br#"{"probe":"p","id":"old"}"#[..])
                .unwrap();
        }
        txn.commit().unwrap();

        assert_eq!(ledger.in_flight().unwrap(), vec![good.clone()]);
        assert_eq!(ledger.in_flight_of("p").unwrap(), vec![good]);
        assert_eq!(
            ledger.undecodable(),
            2,
            "two distinct keys, however often read"
        );
        assert_eq!(ledger.lookup("p", "bad").unwrap(), Lookup::Unknown);
        // A put over a bad record repairs it.
        let fixed = canary("p", "bad", 5);
        ledger.put(&fixed).unwrap();
        assert_eq!(ledger.lookup("p", "bad").unwrap(), Lookup::InFlight(fixed));
    }

    #[test]
    fn a_newer_format_is_refused_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ledger = Ledger::open(dir.path()).unwrap();
            let txn = ledger
                .with_db("test", |db| Ok(db.begin_write().unwrap()))
                .unwrap();
            txn.open_table(META)
                .unwrap()
                .insert("format", FORMAT + 1)
                .unwrap();
            txn.commit().unwrap();
        }
        let err = Ledger::open(dir.path()).unwrap_err();
        assert!(matches!(err, LedgerError::NewerFormat { .. }), "{err}");
    }

    /// Writes `format` into the ledger of `dir` (as an older or broken mailcanary would have).
    fn set_format(dir: &Path, format: u32) {
        let ledger = Ledger::open(dir).unwrap();
        let txn = ledger
            .with_db("test", |db| Ok(db.begin_write().unwrap()))
            .unwrap();
        txn.open_table(META)
            .unwrap()
            .insert("format", format)
            .unwrap();
        txn.commit().unwrap();
    }

    fn format_of(ledger: &Ledger) -> u32 {
        ledger
            .with_db("test", |db| Ok(db.begin_read().unwrap()))
            .unwrap()
            .open_table(META)
            .unwrap()
            .get("format")
            .unwrap()
            .unwrap()
            .value()
    }

    #[test]
    fn an_older_format_is_migrated_and_its_records_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ledger = Ledger::open(dir.path()).unwrap();
            ledger.put(&canary("p", "held", 5)).unwrap();
        }
        // A format-1 ledger: no incidents or history tables, format 1 in meta.
        set_format(dir.path(), 1);
        {
            let ledger = Ledger::open(dir.path()).unwrap();
            let txn = ledger
                .with_db("test", |db| Ok(db.begin_write().unwrap()))
                .unwrap();
            txn.delete_table(INCIDENTS).unwrap();
            txn.delete_table(HISTORY).unwrap();
            txn.commit().unwrap();
        }
        let ledger = Ledger::open(dir.path()).unwrap();
        assert_eq!(format_of(&ledger), FORMAT);
        assert_eq!(
            ledger.lookup("p", "held").unwrap(),
            Lookup::InFlight(canary("p", "held", 5))
        );
        assert!(ledger.incidents("p").unwrap().is_empty());
    }

    #[test]
    fn a_format_no_mailcanary_wrote_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        set_format(dir.path(), 0);
        let err = Ledger::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, LedgerError::UnknownFormat { found: 0, .. }),
            "{err}"
        );
        assert!(
            corrupt_files(dir.path()).is_empty(),
            "refused, not moved aside"
        );
    }

    /// The files moved aside in `dir`.
    fn corrupt_files(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("ledger.redb.corrupt-")
            })
            .collect()
    }

    #[test]
    fn a_file_that_is_not_a_redb_database_is_moved_aside_and_a_fresh_ledger_started() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = b"this is not a redb database, just text an operator copied over it\n";
        std::fs::write(dir.path().join(FILE_NAME), garbage.repeat(100)).unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        assert_eq!(ledger.take_recovered(), 1);
        assert_eq!(ledger.take_recovered(), 0);
        let aside = corrupt_files(dir.path());
        assert_eq!(aside.len(), 1, "{aside:?}");
        // The bad file is kept as it was, for a post-mortem.
        assert_eq!(std::fs::read(&aside[0]).unwrap(), garbage.repeat(100));
        let c = canary("p", "a", 1);
        ledger.put(&c).unwrap();
        assert_eq!(ledger.in_flight().unwrap(), vec![c]);
    }

    #[test]
    fn a_truncated_ledger_is_moved_aside_and_a_fresh_ledger_started() {
        let mut moved = Vec::new();
        for keep in [0.5, 0.1, 0.01] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(FILE_NAME);
            {
                let ledger = Ledger::open(dir.path()).unwrap();
                for i in 0..50 {
                    ledger.put(&canary("p", &format!("c{i}"), i)).unwrap();
                }
            }
            let len = std::fs::metadata(&path).unwrap().len();
            let cut = (len as f64 * keep) as u64;
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(cut)
                .unwrap();
            // redb may repair a file whose header survived; either way the ledger opens.
            let ledger = Ledger::open(dir.path())
                .unwrap_or_else(|e| panic!("truncated to {cut} of {len} bytes: {e}"));
            let recovered = ledger.take_recovered();
            assert_eq!(
                corrupt_files(dir.path()).len() as u64,
                recovered,
                "truncated to {cut} of {len}"
            );
            ledger.put(&canary("p", "after", 99)).unwrap();
            moved.push(recovered);
        }
        // Measured with redb 4.6: every cut is taken for corrupt, none repaired in place.
        assert_eq!(moved, [1, 1, 1]);
    }

    #[test]
    fn a_ledger_in_use_or_of_a_newer_format_is_not_taken_for_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let first = Ledger::open(dir.path()).unwrap();
        let err = Ledger::open(dir.path()).unwrap_err();
        assert!(matches!(err, LedgerError::InUse { .. }), "{err:?}");
        drop(first);
        assert!(corrupt_files(dir.path()).is_empty());
    }

    #[test]
    fn a_state_dir_this_user_cannot_write_is_named_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "x").unwrap();
        // A path under a regular file can be neither created nor written, as root too.
        let err = check_writable(&file.join("state")).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, LedgerError::NotWritable { .. }), "{text}");
        assert!(text.contains("not-a-dir/state"), "{text}");
        assert!(text.contains("--state-dir"), "{text}");
        assert!(!text.contains('\n'), "{text}");
        check_writable(&dir.path().join("fresh")).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("fresh")).unwrap().count(),
            0
        );
    }
}
