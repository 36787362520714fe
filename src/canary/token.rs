//! Authenticated canary tokens.
//!
//! A token names one canary and proves that this prober sent it:
//!
//! ```text
//! mc-<id>-<sent>-<mac>
//! mc-aqmzx54wxk-mjuohs00-34arghx7udmaskvesdncr25uzi
//! ```
//!
//! - `id`: 10 random characters of lowercase base32 (50 bits), fresh for every canary;
//! - `sent`: the send time in unix milliseconds, base36, no leading zeros;
//! - `mac`: HMAC-SHA256(key, probe ‖ 0x00 ‖ id ‖ 0x00 ‖ sent_ms as 8 bytes big-endian), truncated to
//!   16 bytes, lowercase base32 without padding (26 characters).
//!
//! The probe name is inside the MAC but not in the token: a token copied from one probe's mail does
//! not verify for another probe, and the token does not leak the configuration.
//!
//! Only lowercase ASCII letters, digits and `-` are used, because IMAP `SEARCH`, helpdesk subject
//! rewriting and quoted-printable line folding all mangle other characters. A system that
//! upper-cases the subject destroys the token there; the same token in the body still matches.
//!
//! Every token has exactly one spelling: [`Token::parse`] rejects leading zeros in the time and
//! non-zero padding bits in the mac, so a token string can be used as a key (ledger, dedup).

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use rand::RngExt;
use sha2::{Digest, Sha256};

/// Every token starts with this; it is what [`find_tokens`] scans for.
pub const PREFIX: &str = "mc-";
/// Length of the canary id in characters.
pub const ID_LEN: usize = 10;
/// Bytes of the HMAC-SHA256 output kept in the token.
const MAC_BYTES: usize = 16;
/// Length of the mac in characters: `ceil(16 * 8 / 5)`.
pub const MAC_LEN: usize = (MAC_BYTES * 8).div_ceil(5);
/// `u64::MAX` in base36 is 13 characters.
const MAX_TIME_LEN: usize = 13;
/// Name of the key file inside the state dir.
pub const SECRET_FILE: &str = "secret";

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
const BASE36: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

type HmacSha256 = Hmac<Sha256>;

/// The secret that authenticates tokens: 32 bytes.
///
/// Its `Debug` prints `Key(***)` so it can sit inside logged structs.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; 32]);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(***)")
    }
}

impl Key {
    /// A fresh random key.
    pub fn generate() -> Key {
        Key(rand::rng().random())
    }

    /// The key for a secret given in the configuration: SHA-256 of its UTF-8 bytes, so any
    /// length of secret gives a full-size key and replicas with the same secret agree.
    pub fn from_secret(secret: &str) -> Key {
        Key(Sha256::digest(secret.as_bytes()).into())
    }

    /// The key kept in `dir/secret` (64 hex digits), created on first start.
    ///
    /// The file is written to a temporary file with mode 0600 and then linked into place, so
    /// a crash never leaves a half-written secret and two processes racing on a fresh state dir
    /// end up with the same key (the loser reads the winner's). An existing file that is not a
    /// valid key is an error, never overwritten: replacing it would turn every in-flight canary
    /// into a forgery.
    pub fn load_or_create(dir: &Path) -> io::Result<Key> {
        let path = dir.join(SECRET_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => return Key::from_hex_file(&path, &text),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }

        let key = Key::generate();
        match key.install(dir)? {
            true => Ok(key),
            // Someone else created it between our read and our link: theirs wins.
            false => Key::from_hex_file(&path, &fs::read_to_string(&path)?),
        }
    }

    /// Writes this key to `dir` if no key file is there (the state dir was removed under the
    /// running prober): without it the next start would generate another key and take every
    /// canary in flight for a forgery. True if it wrote the file; an existing one is never
    /// replaced.
    pub fn save_if_missing(&self, dir: &Path) -> io::Result<bool> {
        if dir.join(SECRET_FILE).exists() {
            return Ok(false);
        }
        self.install(dir)
    }

    /// Writes the key file without clobbering one that appeared meanwhile; false if one did.
    fn install(&self, dir: &Path) -> io::Result<bool> {
        fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(
            ".{SECRET_FILE}.{}.tmp",
            rand::rng().random::<u64>()
        ));
        let written = write_private(&tmp, format!("{}\n", hex_encode(&self.0)).as_bytes())
            .and_then(|()| install_no_clobber(&tmp, &dir.join(SECRET_FILE)));
        // The temporary name is gone after a rename and still there after a link or a failure.
        let _ = fs::remove_file(&tmp);
        if written? {
            sync_dir(dir);
            return Ok(true);
        }
        Ok(false)
    }

    fn from_hex_file(path: &Path, text: &str) -> io::Result<Key> {
        hex_decode_32(text.trim()).map(Key).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: expected 64 hex digits (a mailcanary key); refusing to replace it",
                    path.display()
                ),
            )
        })
    }

    /// The mark the prober puts in the agent reply it posts for `token`, and that no
    /// acknowledgement can carry: a helpdesk's auto-acknowledgement quotes the canary (and so
    /// its token) before any reply exists, but cannot know this string, which is derived from
    /// the key. `mcreply-` and 16 base32 characters (80 bits of HMAC).
    pub fn reply_mark(&self, token: &Token) -> String {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(b"reply\0");
        mac.update(token.as_str().as_bytes());
        let tag = mac.finalize().into_bytes();
        let mut mark = String::from(REPLY_MARK_PREFIX);
        mark.push_str(&base32_encode(&tag[..10]));
        mark
    }

    fn mac(&self, probe: &str, id: &str, sent_at_ms: u64) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(probe.as_bytes());
        mac.update(&[0]);
        mac.update(id.as_bytes());
        mac.update(&[0]);
        mac.update(&sent_at_ms.to_be_bytes());
        mac
    }
}

/// Creates `path` (which must not exist) with mode 0600 and writes `data` durably.
fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(data)?;
    file.sync_all()
}

/// Moves `tmp` to `path` unless `path` exists. `Ok(false)` when it already existed.
///
/// A hard link fails on an existing target, which a plain rename would silently replace; on a
/// filesystem without hard links we fall back to the rename (last writer wins).
fn install_no_clobber(tmp: &Path, path: &Path) -> io::Result<bool> {
    match fs::hard_link(tmp, path) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(_) => fs::rename(tmp, path).map(|()| true),
    }
}

/// Makes the new directory entry durable; best effort, as not every platform can open a dir.
fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A token that is well formed; whether it is authentic is [`Token::verify`]'s business.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Token {
    /// The whole token, the only spelling of it.
    text: String,
    sent_at_ms: u64,
    mac: [u8; MAC_BYTES],
}

/// Why a string is not a token. Syntax only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("a token starts with `{PREFIX}`")]
    Prefix,
    #[error("a token is `{PREFIX}<id>-<time>-<mac>`")]
    Fields,
    #[error("the canary id must be {ID_LEN} lowercase base32 characters")]
    Id,
    #[error("the send time must be unix milliseconds in lowercase base36, without leading zeros")]
    SentAt,
    #[error("the mac must be {MAC_LEN} lowercase base32 characters with zero padding bits")]
    Mac,
}

impl Token {
    /// A token for a new canary of `probe` sent at `sent_at` (truncated to milliseconds).
    pub fn issue(key: &Key, probe: &str, sent_at: SystemTime) -> Token {
        let mut rng = rand::rng();
        let id: String = (0..ID_LEN)
            .map(|_| BASE32[rng.random_range(0..BASE32.len())] as char)
            .collect();
        let sent_at_ms = sent_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let tag = key.mac(probe, &id, sent_at_ms).finalize().into_bytes();
        let mut mac = [0; MAC_BYTES];
        mac.copy_from_slice(&tag[..MAC_BYTES]);
        let text = format!(
            "{PREFIX}{id}-{}-{}",
            base36_encode(sent_at_ms),
            base32_encode(&mac)
        );
        Token {
            text,
            sent_at_ms,
            mac,
        }
    }

    /// Checks the syntax of `s`; says nothing about who made it.
    pub fn parse(s: &str) -> Result<Token, TokenError> {
        let rest = s.strip_prefix(PREFIX).ok_or(TokenError::Prefix)?;
        let mut fields = rest.split('-');
        let (Some(id), Some(time), Some(mac), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(TokenError::Fields);
        };
        if id.len() != ID_LEN || !id.bytes().all(|b| BASE32.contains(&b)) {
            return Err(TokenError::Id);
        }
        let sent_at_ms = base36_decode(time).ok_or(TokenError::SentAt)?;
        let mac = base32_decode_mac(mac).ok_or(TokenError::Mac)?;
        Ok(Token {
            text: s.to_owned(),
            sent_at_ms,
            mac,
        })
    }

    /// Whether this token was issued with `key` for `probe`. Constant-time in the mac.
    pub fn verify(&self, key: &Key, probe: &str) -> bool {
        key.mac(probe, self.id(), self.sent_at_ms)
            .verify_truncated_left(&self.mac)
            .is_ok()
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The canary id: unique per canary, random.
    pub fn id(&self) -> &str {
        &self.text[PREFIX.len()..PREFIX.len() + ID_LEN]
    }

    /// The send time carried in the token, in unix milliseconds.
    pub fn sent_at_ms(&self) -> u64 {
        self.sent_at_ms
    }

    /// The send time carried in the token.
    pub fn sent_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.sent_at_ms)
    }

    /// The mac as it appears in the token.
    pub fn mac(&self) -> &str {
        &self.text[self.text.len() - MAC_LEN..]
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({})", self.text)
    }
}

impl FromStr for Token {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Token, TokenError> {
        Token::parse(s)
    }
}

impl AsRef<str> for Token {
    fn as_ref(&self) -> &str {
        &self.text
    }
}

impl serde::Serialize for Token {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for Token {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Token, D::Error> {
        let s = String::deserialize(d)?;
        Token::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Every substring of `text` that has a token's syntax, in order of appearance.
///
/// A candidate starts at `mc-` not preceded by an ASCII letter or digit and runs over the maximal
/// stretch of `[a-z0-9-]` (trailing `-` dropped, as in "see mc-…-." or a dash after it). So
/// punctuation, brackets, `Re:` and line breaks around a token are fine, while a token glued to
/// other word characters, or upper-cased by some relay, is not found (tokens are lowercase only).
/// Authenticity is not checked here.
/// Starts every reply mark ([`Key::reply_mark`]).
pub const REPLY_MARK_PREFIX: &str = "mcreply-";
/// Characters after the prefix.
const REPLY_MARK_LEN: usize = 16;

/// Every reply-mark-shaped string in `text` (whether it verifies is [`Key::reply_mark`]'s to
/// say).
pub fn find_reply_marks(text: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(offset) = text[from..].find(REPLY_MARK_PREFIX) {
        let start = from + offset;
        let end = start + REPLY_MARK_PREFIX.len() + REPLY_MARK_LEN;
        if let Some(mark) = text.get(start..end)
            && mark[REPLY_MARK_PREFIX.len()..]
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            found.push(mark);
        }
        from = start + REPLY_MARK_PREFIX.len();
    }
    found
}

pub fn find_tokens(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let is_token_byte = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-';
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(offset) = text[from..].find(PREFIX) {
        let start = from + offset;
        let mut end = start + PREFIX.len();
        while end < bytes.len() && is_token_byte(bytes[end]) {
            end += 1;
        }
        // `start` and `end` sit next to ASCII bytes, so they are char boundaries.
        let candidate = text[start..end].trim_end_matches('-');
        let glued = start > 0 && bytes[start - 1].is_ascii_alphanumeric();
        if !glued && Token::parse(candidate).is_ok() {
            found.push(candidate);
            from = end;
        } else {
            // A failed run may still hold a token after another `mc-`, as in `mc-mc-<token>`.
            from = start + PREFIX.len();
        }
    }
    found
}

fn base36_encode(mut n: u64) -> String {
    let mut digits = Vec::with_capacity(MAX_TIME_LEN);
    loop {
        digits.push(BASE36[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.reverse();
    String::from_utf8(digits).expect("base36 digits are ASCII")
}

/// Canonical base36 only: no empty string, no leading zero (except "0"), no overflow.
fn base36_decode(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > MAX_TIME_LEN || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.bytes().try_fold(0u64, |n, b| {
        let digit = BASE36.iter().position(|&d| d == b)? as u64;
        n.checked_mul(36)?.checked_add(digit)
    })
}

/// RFC 4648 base32, lowercase, no padding.
fn base32_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity((data.len() * 8).div_ceil(5));
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &byte in data {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(BASE32[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(BASE32[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// Decodes exactly a [`MAC_LEN`]-character mac; `None` on any other length, a character outside
/// the alphabet or non-zero padding bits (which would give a second spelling of one mac).
fn base32_decode_mac(s: &str) -> Option<[u8; MAC_BYTES]> {
    if s.len() != MAC_LEN {
        return None;
    }
    let mut out = [0u8; MAC_BYTES];
    let (mut buffer, mut bits, mut n) = (0u32, 0u32, 0);
    for b in s.bytes() {
        let value = BASE32.iter().position(|&d| d == b)? as u32;
        buffer = (buffer << 5) | value;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out[n] = (buffer >> bits) as u8;
            n += 1;
        }
        buffer &= (1 << bits) - 1;
    }
    (buffer == 0).then_some(out)
}

fn hex_encode(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode_32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(s.as_bytes().chunks(2)) {
        let pair = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn issue_parse_verify_round_trip() {
        let key = Key::generate();
        let sent = t(1_767_225_600_123);
        let token = Token::issue(&key, "helpdesk-eu", sent);
        let parsed = Token::parse(token.as_str()).unwrap();
        assert_eq!(parsed, token);
        assert_eq!(parsed.sent_at(), sent);
        assert_eq!(parsed.sent_at_ms(), 1_767_225_600_123);
        assert_eq!(parsed.id().len(), ID_LEN);
        assert_eq!(parsed.mac().len(), MAC_LEN);
        assert_eq!(parsed.to_string(), token.as_str());
        assert!(parsed.verify(&key, "helpdesk-eu"));
    }

    #[test]
    fn changed_mac_character_fails() {
        let key = Key::generate();
        let token = Token::issue(&key, "p", t(1_700_000_000_000));
        let text = token.as_str();
        // Change each position of the mac in turn (keeping the spelling canonical where the
        // last character's padding bits allow it).
        for i in text.len() - MAC_LEN..text.len() {
            for &c in BASE32 {
                if text.as_bytes()[i] == c {
                    continue;
                }
                let mut forged = text.as_bytes().to_vec();
                forged[i] = c;
                if let Ok(forged) = Token::parse(std::str::from_utf8(&forged).unwrap()) {
                    assert!(!forged.verify(&key, "p"), "{forged}");
                }
            }
        }
    }

    #[test]
    fn changed_id_or_time_fails() {
        let key = Key::generate();
        let token = Token::issue(&key, "p", t(1_700_000_000_000));
        let other_time = format!(
            "{PREFIX}{}-{}-{}",
            token.id(),
            base36_encode(token.sent_at_ms() + 1),
            token.mac()
        );
        assert!(!Token::parse(&other_time).unwrap().verify(&key, "p"));
        let other_id = format!(
            "{PREFIX}aaaaaaaaaa-{}-{}",
            base36_encode(token.sent_at_ms()),
            token.mac()
        );
        assert!(!Token::parse(&other_id).unwrap().verify(&key, "p"));
    }

    #[test]
    fn other_probe_or_key_fails() {
        let key = Key::generate();
        let token = Token::issue(&key, "mail-loop", t(1_700_000_000_000));
        assert!(!token.verify(&key, "mail-loo"));
        assert!(!token.verify(&key, "mail-loop2"));
        assert!(!token.verify(&key, ""));
        assert!(!token.verify(&Key::generate(), "mail-loop"));
        assert!(token.verify(&key, "mail-loop"));
    }

    #[test]
    fn from_secret_is_stable_and_distinct() {
        let a = Key::from_secret("hunter2");
        assert_eq!(a, Key::from_secret("hunter2"));
        assert_ne!(a, Key::from_secret("hunter3"));
        let token = Token::issue(&a, "p", SystemTime::now());
        assert!(token.verify(&Key::from_secret("hunter2"), "p"));
        assert_eq!(format!("{a:?}"), "Key(***)");
    }

    #[test]
    fn charset_and_shape_over_many_issues() {
        let key = Key::generate();
        let mut seen = std::collections::HashSet::new();
        for i in 0..2000u64 {
            // Spread times over the whole u64 range, including the extremes.
            let ms = match i {
                0 => 0,
                1 => u64::MAX,
                _ => rand::rng().random::<u64>() >> (i % 64),
            };
            let sent = UNIX_EPOCH
                .checked_add(Duration::from_millis(ms))
                .unwrap_or(UNIX_EPOCH);
            let token = Token::issue(&key, "probe", sent);
            let s = token.as_str();
            assert!(
                s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                "{s}"
            );
            assert!(s.starts_with(PREFIX));
            assert_eq!(s.matches('-').count(), 3, "{s}");
            assert_eq!(find_tokens(&format!("x {s} y")), vec![s]);
            assert!(Token::parse(s).unwrap().verify(&key, "probe"));
            assert!(seen.insert(token.id().to_owned()), "duplicate id {s}");
        }
    }

    #[test]
    fn time_before_epoch_saturates() {
        let token = Token::issue(&Key::generate(), "p", UNIX_EPOCH - Duration::from_secs(5));
        assert_eq!(token.sent_at_ms(), 0);
    }

    #[test]
    fn parse_rejects_bad_syntax() {
        let good = Token::issue(&Key::generate(), "p", t(1_700_000_000_000)).to_string();
        assert!(Token::parse(&good).is_ok());
        let (id, time, mac) = (
            &good[3..13],
            base36_encode(1_700_000_000_000),
            &good[good.len() - MAC_LEN..],
        );
        let cases = [
            (String::new(), TokenError::Prefix),
            (good.to_uppercase(), TokenError::Prefix),
            (good.replacen("mc-", "mc_", 1), TokenError::Prefix),
            (format!("mc-{id}-{time}"), TokenError::Fields),
            (format!("mc-{id}-{time}-{mac}-"), TokenError::Fields),
            (format!("mc-{id}-{time}-{mac}-x"), TokenError::Fields),
            (format!("mc-{}-{time}-{mac}", &id[1..]), TokenError::Id),
            (format!("mc-{}0-{time}-{mac}", &id[1..]), TokenError::Id),
            (format!("mc-{}A-{time}-{mac}", &id[1..]), TokenError::Id),
            (format!("mc-{id}--{mac}"), TokenError::SentAt),
            (format!("mc-{id}-0{time}-{mac}"), TokenError::SentAt),
            (format!("mc-{id}-zzzzzzzzzzzzz-{mac}"), TokenError::SentAt),
            (format!("mc-{id}-{time}-{}", &mac[1..]), TokenError::Mac),
            (format!("mc-{id}-{time}-{mac}a"), TokenError::Mac),
            (format!("mc-{id}-{time}-{}1", &mac[1..]), TokenError::Mac),
        ];
        for (s, want) in cases {
            assert_eq!(Token::parse(&s), Err(want), "{s:?}");
        }
        assert!(Token::parse(&format!("mc-{id}-0-{mac}")).is_ok());
    }

    #[test]
    fn mac_padding_bits_must_be_zero() {
        // 26 chars * 5 bits = 130 bits for 128: the last char carries 2 padding bits, so only
        // every fourth letter of the alphabet may end a mac.
        let mac = base32_encode(&[0xff; MAC_BYTES]);
        assert_eq!(mac.len(), MAC_LEN);
        assert_eq!(base32_decode_mac(&mac), Some([0xff; MAC_BYTES]));
        let mut bent = mac.into_bytes();
        *bent.last_mut().unwrap() = b'7'; // 31: low bits set
        assert_eq!(base32_decode_mac(std::str::from_utf8(&bent).unwrap()), None);
    }

    #[test]
    fn base32_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "my"),
            ("fo", "mzxq"),
            ("foo", "mzxw6"),
            ("foob", "mzxw6yq"),
            ("fooba", "mzxw6ytb"),
            ("foobar", "mzxw6ytboi"),
        ] {
            assert_eq!(base32_encode(input.as_bytes()), want);
        }
    }

    #[test]
    fn base36_round_trips() {
        for n in [0, 1, 35, 36, 1_700_000_000_000, u64::MAX] {
            assert_eq!(base36_decode(&base36_encode(n)), Some(n));
        }
        assert_eq!(base36_encode(u64::MAX).len(), MAX_TIME_LEN);
        assert_eq!(base36_decode("3w5e11264sgsg"), None); // u64::MAX + 1
    }

    #[test]
    fn load_or_create_creates_once_private_and_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = Key::load_or_create(&state).unwrap();
        let path = state.join(SECRET_FILE);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        assert_eq!(text.trim(), hex_encode(&first.0));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let second = Key::load_or_create(&state).unwrap();
        assert_eq!(first, second);
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![SECRET_FILE]);
    }

    #[test]
    fn load_or_create_refuses_a_damaged_secret() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(SECRET_FILE), "not hex\n").unwrap();
        let err = Key::load_or_create(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(
            fs::read_to_string(dir.path().join(SECRET_FILE)).unwrap(),
            "not hex\n"
        );
    }

    #[test]
    fn load_or_create_races_agree() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<Key> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| Key::load_or_create(dir.path()).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn find_tokens_in_noisy_text() {
        let key = Key::generate();
        let a = Token::issue(&key, "p", t(1_700_000_000_000)).to_string();
        let b = Token::issue(&key, "p", t(1_700_000_000_001)).to_string();
        let text = format!(
            "Re: [mailcanary] sandbox {a}\n\
             > quoted ({a}), then <{b}>. \"{b}\"; {b}-- end\n\
             RE: FWD: [MAILCANARY] SANDBOX {upper}\n\
             x{a} {a}x {a}_ {mixed_head}{mixed_tail} mc- mc-mc-\n\
             ticket #{b}.",
            upper = a.to_uppercase(),
            mixed_head = &a[..13],
            mixed_tail = a[13..].to_uppercase(),
        );
        let (a, b) = (a.as_str(), b.as_str());
        assert_eq!(find_tokens(&text), vec![a, a, b, b, b, a, b]);
        assert!(find_tokens("").is_empty());
        assert!(find_tokens("no tokens here, mc-nope").is_empty());
        assert!(find_tokens("ünïcödé mc-€ 🙂").is_empty());
        assert_eq!(find_tokens(&format!("ünï{a}é")), vec![a]);
        assert_eq!(find_tokens(&format!("mc-mc-{a} mc-x-{b}")), vec![a, b]);
    }

    #[test]
    fn serde_round_trip_as_string() {
        let token = Token::issue(&Key::generate(), "p", SystemTime::now());
        let json = serde_json::to_string(&token).unwrap();
        assert_eq!(json, format!("\"{token}\""));
        assert_eq!(serde_json::from_str::<Token>(&json).unwrap(), token);
        assert!(serde_json::from_str::<Token>("\"mc-x\"").is_err());
    }
}
