//! journalctl's JSON lines -> log lines of the pack's RFC 3339 syslog shape (sources/journal.py's
//! Entries.convert is the definition; this is its fast path).

use std::borrow::Cow;

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use serde::Deserialize;

use crate::rfc3339_into;

/// A field as journalctl prints it: text, binary data (an array of byte values), or several values.
#[derive(Deserialize)]
#[serde(untagged)]
enum Field<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Bytes(Vec<u8>),
    Many(#[allow(dead_code)] Vec<serde::de::IgnoredAny>),
}

impl Field<'_> {
    fn bytes(&self) -> Cow<'_, [u8]> {
        match self {
            Field::Text(s) => Cow::Borrowed(s.as_bytes()),
            Field::Bytes(b) => Cow::Borrowed(b.as_slice()),
            Field::Many(_) => Cow::Borrowed(b""),
        }
    }
}

#[derive(Deserialize)]
struct Entry<'a> {
    #[serde(rename = "__REALTIME_TIMESTAMP", borrow)]
    realtime: Cow<'a, str>,
    #[serde(rename = "__CURSOR", borrow)]
    cursor: Cow<'a, str>,
    #[serde(rename = "MESSAGE", borrow, default)]
    message: Option<Field<'a>>,
    #[serde(rename = "_HOSTNAME", borrow, default)]
    hostname: Option<Field<'a>>,
    #[serde(rename = "MESSAGE_ID", borrow, default)]
    message_id: Option<Field<'a>>,
}

/// (lines, cursor of the last entry or None, its realtime stamp in us, lines that were no entry,
/// MESSAGEs of the entries whose MESSAGE_ID is `note_id`) of complete JSON lines.
#[pyfunction]
pub fn journal_lines<'py>(
    py: Python<'py>,
    data: &[u8],
    note_id: &str,
) -> (Bound<'py, PyBytes>, Option<String>, i64, usize, Vec<Bound<'py, PyBytes>>) {
    let mut out: Vec<u8> = Vec::with_capacity(data.len() / 2);
    let mut cursor: Option<String> = None;
    let mut last_t: i64 = 0;
    let mut bad = 0usize;
    let mut notes = Vec::new();
    let mut stamp = [0u8; 32];
    for raw in data.split(|&c| c == b'\n') {
        if raw.is_empty() {
            continue;
        }
        let e = match serde_json::from_slice::<Entry>(raw) {
            Ok(e) => e,
            Err(_) => {
                bad += 1;
                continue;
            }
        };
        let t = match e.realtime.parse::<i64>() {
            Ok(t) => t,
            Err(_) => {
                bad += 1;
                continue;
            }
        };
        cursor = Some(e.cursor.into_owned());
        last_t = t;
        let msg = e.message.as_ref().map(|m| m.bytes()).unwrap_or(Cow::Borrowed(b""));
        if e.message_id.as_ref().map_or(false, |m| m.bytes().as_ref() == note_id.as_bytes()) {
            notes.push(PyBytes::new(py, &msg));
            continue;
        }
        let n = match rfc3339_into(t, 6, &mut stamp) {
            Some(n) => n,
            None => {
                bad += 1;
                continue;
            }
        };
        out.extend_from_slice(&stamp[..n]);
        out.push(b' ');
        match e.hostname.as_ref().map(|h| h.bytes()) {
            Some(h) if !h.is_empty() => out.extend(h.iter().map(|&c| if c == b' ' { b'_' } else { c })),
            _ => out.push(b'-'),
        }
        out.extend_from_slice(b" dovecot: ");
        out.extend(msg.iter().map(|&c| if c == b'\n' || c == b'\r' { b' ' } else { c }));
        out.push(b'\n');
    }
    (PyBytes::new(py, &out), cursor, last_t, bad, notes)
}
