//! Configuration errors: every one names the file, the line and column, and the key.
//!
//! Display is `FILE:LINE:COL: KEY: message`, the shape compilers use, so editors and CI logs
//! turn it into a link. Errors that have no place in a file (an unreadable file, an empty
//! directory) drop the parts they lack: `FILE: message`.

use std::fmt;
use std::ops::Range;

/// A 1-based line and column (in characters) in a config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// One problem found in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}{}: {message}", at(.position), key_part(.key))]
pub struct ConfigError {
    /// The file (or the `origin` given to `parse_str`).
    pub file: String,
    /// Where in the file, when the error has a place.
    pub position: Option<Position>,
    /// Dotted key path, e.g. `probe[0].smtp.port` or `prober.listen`.
    pub key: Option<String>,
    pub message: String,
}

fn at(position: &Option<Position>) -> String {
    position.map(|p| format!(":{p}")).unwrap_or_default()
}

fn key_part(key: &Option<String>) -> String {
    key.as_deref()
        .filter(|k| !k.is_empty())
        .map(|k| format!(": {k}"))
        .unwrap_or_default()
}

impl ConfigError {
    /// An error about a whole file or directory (no line, no key).
    pub fn file(file: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.into(),
            position: None,
            key: None,
            message: message.into(),
        }
    }
}

/// Every error found in a configuration, in file order. Never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One error per line, so `mailcanary check` can print it as it is.
impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// The text of one config file and its name, to turn byte spans into positioned errors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Source<'a> {
    pub origin: &'a str,
    pub text: &'a str,
}

impl Source<'_> {
    /// Byte offset to 1-based line and column; the column counts characters, as editors do.
    pub fn position(&self, offset: usize) -> Position {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        Position { line, column }
    }

    pub fn error(
        &self,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        let key = key.into();
        ConfigError {
            file: self.origin.to_owned(),
            position: Some(self.position(span.start)),
            key: (!key.is_empty()).then_some(key),
            message: message.into(),
        }
    }
}
