//! Secrets: a value that never reaches a log, and the `${ENV}` / `*_file` ways to give one.

use std::fmt;
use std::path::Path;

/// A password, token or key. `Debug` and `Display` print `***`; only [`Secret::expose`]
/// gives the value, so every use of it is a greppable call.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value itself: for the wire, never for a log line.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Replaces every `${NAME}` in `value` by the environment variable `NAME` (looked up by `env`).
/// `$${` stands for a literal `${`; a `$` not followed by `{` is kept as it is.
pub(crate) fn expand_env(
    value: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(after) = after.strip_prefix("${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = after.strip_prefix('{') {
            let end = after
                .find('}')
                .ok_or_else(|| "unterminated `${` (write `$${` for a literal `${`)".to_owned())?;
            let name = &after[..end];
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!(
                    "`${{{name}}}` is not a valid environment variable name"
                ));
            }
            let found =
                env(name).ok_or_else(|| format!("environment variable `{name}` is not set"))?;
            out.push_str(&found);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Reads a secret file, trimming one trailing newline (`echo secret > file` adds one).
pub(crate) fn read_secret_file(path: &Path) -> Result<String, String> {
    let mut text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}
