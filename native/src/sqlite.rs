//! SQLite upserts straight from the coalescing tables.
//!
//! sinks/sqlite.py defines the schema and the upserts; this writes the same
//! parameters (see its `params`) without building a Python row, a parameter
//! tuple or a Python string per row: a third of a backfill's write time.
//!
//! It links the system's libsqlite3, the very library Python's sqlite3 module
//! loads, so both connections share one SQLite and its file locks (two copies
//! of SQLite in one process could break each other's POSIX locks).

use std::borrow::Cow;
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString};
use rusqlite::{params, Connection, TransactionBehavior};

use crate::rfc3339;
use crate::table::{split, Entry, Table};

fn err(e: rusqlite::Error) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

/// One connection that applies both tables in one transaction.
#[pyclass(module = "harvester._fastscan", unsendable)]
pub struct SqliteWriter {
    db: Connection,
    login_sql: String,
    event_sql: String,
}

fn node_text<'a>(py: Python<'a>, node: &'a PyObject) -> PyResult<Option<Cow<'a, str>>> {
    if node.is_none(py) {
        return Ok(None);
    }
    if let Ok(bytes) = node.downcast_bound::<PyBytes>(py) {
        return Ok(Some(String::from_utf8_lossy(bytes.as_bytes())));
    }
    Ok(Some(Cow::Borrowed(node.downcast_bound::<PyString>(py)?.to_str()?)))
}

#[pymethods]
impl SqliteWriter {
    /// Open `path` (the schema must exist) for the upserts `login_sql` (?1-?6) and `event_sql` (?1-?8).
    #[new]
    fn new(path: &str, login_sql: String, event_sql: String) -> PyResult<Self> {
        let db = Connection::open(path).map_err(err)?;
        db.busy_timeout(Duration::from_secs(30)).map_err(err)?;
        db.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA cache_size=-65536;").map_err(err)?;
        db.prepare_cached(&login_sql).map_err(err)?;
        db.prepare_cached(&event_sql).map_err(err)?;
        Ok(SqliteWriter { db, login_sql, event_sql })
    }

    /// Upsert every entry of `logins` (key: user, service) and `others` (key: user, kind) in one
    /// transaction, in key order, then empty both tables. On an error nothing is committed and
    /// the tables keep their entries. Returns (rows written, [user name that is not UTF-8, ...]).
    fn write<'py>(
        &mut self,
        py: Python<'py>,
        logins: &Bound<'py, Table>,
        others: &Bound<'py, Table>,
    ) -> PyResult<(usize, Bound<'py, PyList>)> {
        let bad = PyList::empty(py);
        let mut written = 0usize;
        {
            let (l, o) = (logins.borrow(), others.borrow());
            let tx = self.db.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
            {
                let mut st = tx.prepare_cached(&self.login_sql).map_err(err)?;
                for (k, e) in l.sorted() {
                    let Some((user, _, e)) = decoded(py, k, e, &bad)? else { continue };
                    let ip = e.ip.as_deref().map(String::from_utf8_lossy);
                    let node = node_text(py, &e.node)?;
                    let service = e.service.bind(py).to_str()?;
                    st.execute(params![user, service, rfc3339(e.t, e.digits), e.t, ip, node]).map_err(err)?;
                    written += 1;
                }
                let mut st = tx.prepare_cached(&self.event_sql).map_err(err)?;
                for (k, e) in o.sorted() {
                    let Some((user, kind, e)) = decoded(py, k, e, &bad)? else { continue };
                    let ip = e.ip.as_deref().map(String::from_utf8_lossy);
                    let node = node_text(py, &e.node)?;
                    let service = e.service.bind(py).to_str()?;
                    let detail = match &e.detail {
                        Some(d) => Some(d.bind(py).to_str()?),
                        None => None,
                    };
                    st.execute(params![user, kind, service, rfc3339(e.t, e.digits), e.t, ip, node, detail])
                        .map_err(err)?;
                    written += 1;
                }
            }
            tx.commit().map_err(err)?;
        }
        logins.borrow_mut().clear();
        others.borrow_mut().clear();
        Ok((written, bad))
    }
}

/// The key's user (None, and listed in `bad`, when it is not UTF-8) and second part.
fn decoded<'k>(
    py: Python<'_>,
    key: &'k [u8],
    e: &'k Entry,
    bad: &Bound<'_, PyList>,
) -> PyResult<Option<(&'k str, Cow<'k, str>, &'k Entry)>> {
    let (second, user) = split(key);
    match std::str::from_utf8(user) {
        Ok(u) => Ok(Some((u, String::from_utf8_lossy(second), e))),
        Err(_) => {
            bad.append(PyBytes::new(py, user))?;
            Ok(None)
        }
    }
}
