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
use std::cmp::Ordering;
use std::ffi::CStr;
use std::os::raw::c_int;
use std::sync::Mutex;
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use rusqlite::{ffi, Connection};

use crate::table::{split, Entry, Reader, Table};
use crate::{rfc3339, rfc3339_into};

fn err(e: rusqlite::Error) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

/// One connection that applies both tables in one transaction. Usable from any one thread at a time
/// (the daemon's writer thread): the connection sits behind a mutex, and the lock wait and the commit's
/// sync run without the GIL, so the rest of the process goes on meanwhile.
#[pyclass(module = "harvester._fastscan")]
pub struct SqliteWriter {
    db: Mutex<Connection>,
    login_sql: String,
    event_sql: String,
}

/// A statement driven through SQLite's C API: texts are bound SQLITE_STATIC (no copy, no
/// malloc per value; rusqlite always binds SQLITE_TRANSIENT), and one row is bound, stepped
/// and reset at a time, so the borrowed bytes outlive every use SQLite makes of them.
struct Raw {
    db: *mut ffi::sqlite3,
    stmt: *mut ffi::sqlite3_stmt,
}

impl Raw {
    fn new(db: &Connection, sql: &str) -> PyResult<Raw> {
        // SAFETY: the handle belongs to `db`, which outlives this statement (finalized on drop,
        // inside the write that made it).
        let handle = unsafe { db.handle() };
        let mut stmt = std::ptr::null_mut();
        let rc = unsafe {
            ffi::sqlite3_prepare_v2(
                handle,
                sql.as_ptr().cast(),
                sql.len() as c_int,
                &mut stmt,
                std::ptr::null_mut(),
            )
        };
        let raw = Raw { db: handle, stmt };
        raw.check(rc, ffi::SQLITE_OK)?;
        Ok(raw)
    }

    fn check(&self, rc: c_int, want: c_int) -> PyResult<()> {
        if rc == want {
            return Ok(());
        }
        // SAFETY: sqlite3_errmsg returns a NUL-terminated string owned by the connection.
        let msg = unsafe { CStr::from_ptr(ffi::sqlite3_errmsg(self.db)) }
            .to_string_lossy()
            .into_owned();
        Err(PyRuntimeError::new_err(msg))
    }

    fn text(&self, i: c_int, v: Option<&[u8]>) -> PyResult<()> {
        // SAFETY: `v` stays borrowed until `run` has stepped and reset the statement.
        let rc = unsafe {
            match v {
                Some(b) => ffi::sqlite3_bind_text(
                    self.stmt,
                    i,
                    b.as_ptr().cast(),
                    b.len() as c_int,
                    ffi::SQLITE_STATIC(),
                ),
                None => ffi::sqlite3_bind_null(self.stmt, i),
            }
        };
        self.check(rc, ffi::SQLITE_OK)
    }

    fn int(&self, i: c_int, v: i64) -> PyResult<()> {
        let rc = unsafe { ffi::sqlite3_bind_int64(self.stmt, i, v) };
        self.check(rc, ffi::SQLITE_OK)
    }

    /// Step the bound row to completion and make the statement ready for the next one.
    fn run(&self) -> PyResult<()> {
        let rc = unsafe { ffi::sqlite3_step(self.stmt) };
        unsafe { ffi::sqlite3_reset(self.stmt) };
        self.check(rc, ffi::SQLITE_DONE)
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        unsafe { ffi::sqlite3_finalize(self.stmt) };
    }
}

/// `b` as text for SQLite: as it is when it is UTF-8 (the usual case, checked fast), else with
/// replacement characters.
fn utf8(b: &[u8]) -> Cow<'_, [u8]> {
    match std::str::from_utf8(b) {
        Ok(_) => Cow::Borrowed(b),
        Err(_) => Cow::Owned(String::from_utf8_lossy(b).into_owned().into_bytes()),
    }
}

/// The stored time as text: in `buf` when the year has four digits, else allocated.
fn time_text(t: i64, digits: i64, buf: &mut [u8; 32]) -> Cow<'_, [u8]> {
    match rfc3339_into(t, digits, buf) {
        Some(n) => Cow::Borrowed(&buf[..n]),
        None => Cow::Owned(rfc3339(t, digits).into_bytes()),
    }
}

#[pymethods]
impl SqliteWriter {
    /// Open `path` (the schema must exist) for the upserts `login_sql` (?1-?6) and `event_sql` (?1-?8),
    /// with the Python connection's `pragmas` and lock wait (sinks/sqlite.py defines both).
    #[new]
    fn new(
        path: &str,
        login_sql: String,
        event_sql: String,
        pragmas: &str,
        busy_ms: u64,
    ) -> PyResult<Self> {
        let db = Connection::open(path).map_err(err)?;
        db.busy_timeout(Duration::from_millis(busy_ms))
            .map_err(err)?;
        db.execute_batch(pragmas).map_err(err)?;
        drop(Raw::new(&db, &login_sql)?); // fail here, at open, on a statement that cannot work
        drop(Raw::new(&db, &event_sql)?);
        Ok(SqliteWriter {
            db: Mutex::new(db),
            login_sql,
            event_sql,
        })
    }

    /// Upsert every entry of `logins` (key: user, service) and `others` (key: user, kind), and of
    /// the `dumps` runs of other processes' tables in `login_runs`/`other_runs` (oldest first), in
    /// one transaction, in key order, then empty both tables (the caller drops the runs).
    ///
    /// The tables and runs are merged as they are written, as if merged in that order first (a
    /// key's newest time wins; equal times: the later run), but without building a table of
    /// every key in this process. On an error nothing is committed and the tables keep their
    /// entries. Returns (rows written, [user name that is not UTF-8, ...]).
    #[pyo3(signature = (logins, others, login_runs=None, other_runs=None))]
    fn write<'py>(
        &mut self,
        py: Python<'py>,
        logins: &Bound<'py, Table>,
        others: &Bound<'py, Table>,
        login_runs: Option<Vec<Bound<'py, PyBytes>>>,
        other_runs: Option<Vec<Bound<'py, PyBytes>>>,
    ) -> PyResult<(usize, Bound<'py, PyList>)> {
        let bad = PyList::empty(py);
        let mut written = 0usize;
        let mut buf = [0u8; 32];
        {
            let (l, o) = (logins.borrow(), others.borrow());
            let guard = self
                .db
                .lock()
                .map_err(|_| PyRuntimeError::new_err("SQLite writer poisoned"))?;
            let db: &Connection = &guard;
            // Taking the write lock may wait for another process (up to busy_ms): without the GIL.
            let conn = SendConn(db);
            py.allow_threads(move || conn.batch("BEGIN IMMEDIATE"))
                .map_err(err)?;
            let body = (|| -> PyResult<()> {
                let st = Raw::new(db, &self.login_sql)?;
                written += merged(py, cursors(&l, login_runs.as_deref()), &bad, |v| {
                    st.text(1, Some(v.user))?;
                    st.text(2, Some(v.service))?;
                    st.text(3, Some(&time_text(v.t, v.digits, &mut buf)))?;
                    st.int(4, v.t)?;
                    st.text(5, v.ip.map(utf8).as_deref())?;
                    st.text(6, v.node.map(utf8).as_deref())?;
                    st.run()
                })?;
                let st = Raw::new(db, &self.event_sql)?;
                written += merged(py, cursors(&o, other_runs.as_deref()), &bad, |v| {
                    st.text(1, Some(v.user))?;
                    st.text(2, Some(&utf8(v.second)))?;
                    st.text(3, Some(v.service))?;
                    st.text(4, Some(&time_text(v.t, v.digits, &mut buf)))?;
                    st.int(5, v.t)?;
                    st.text(6, v.ip.map(utf8).as_deref())?;
                    st.text(7, v.node.map(utf8).as_deref())?;
                    st.text(8, v.detail)?;
                    st.run()
                })?;
                // The commit syncs the WAL (synchronous=FULL): without the GIL too.
                py.allow_threads(move || conn.batch("COMMIT")).map_err(err)
            })();
            if let Err(e) = body {
                if !db.is_autocommit() {
                    let _ = db.execute_batch("ROLLBACK");
                }
                return Err(e);
            }
        }
        logins.borrow_mut().clear();
        others.borrow_mut().clear();
        Ok((written, bad))
    }
}

/// A connection borrowed across `allow_threads`: only the statement given runs on it there, while the
/// caller holds the writer's mutex, so no other thread touches the connection meanwhile.
#[derive(Clone, Copy)]
struct SendConn<'a>(&'a Connection);

// SAFETY: see SendConn; rusqlite's Connection is Send, it is only not Sync (its statement cache), and
// the cache is not used by execute_batch.
unsafe impl Send for SendConn<'_> {}

impl SendConn<'_> {
    fn batch(self, sql: &str) -> rusqlite::Result<()> {
        self.0.execute_batch(sql)
    }
}

/// One entry to write, borrowed from a table or a run: service and detail are UTF-8 already.
struct View<'a> {
    user: &'a [u8],
    second: &'a [u8],
    t: i64,
    digits: i64,
    ip: Option<&'a [u8]>,
    node: Option<&'a [u8]>,
    service: &'a [u8],
    detail: Option<&'a [u8]>,
}

/// A source of entries in key order (user, then second).
enum Cursor<'a> {
    Table(std::vec::IntoIter<(&'a [u8], &'a Entry)>),
    Run(Reader<'a>),
}

/// The table's entries, then each run, as cursors (oldest first).
fn cursors<'a>(table: &'a Table, runs: Option<&'a [Bound<'_, PyBytes>]>) -> Vec<Cursor<'a>> {
    let mut c = vec![Cursor::Table(table.sorted().into_iter())];
    c.extend(runs.unwrap_or_default().iter().map(|b| {
        Cursor::Run(Reader {
            data: b.as_bytes(),
            at: 0,
        })
    }));
    c
}

impl<'a> Cursor<'a> {
    fn next<'py: 'a>(&mut self, py: Python<'py>) -> PyResult<Option<View<'a>>> {
        let record = match self {
            Cursor::Table(it) => match it.next() {
                Some((key, e)) => Some(e.record(py, key)?),
                None => None,
            },
            Cursor::Run(r) => r.record()?,
        };
        Ok(record.map(|rec| {
            let (second, user) = split(rec.key);
            View {
                user,
                second,
                t: rec.t,
                digits: rec.digits,
                ip: rec.ip,
                node: rec.node.map(|(_, b)| b),
                service: rec.service,
                detail: rec.detail,
            }
        }))
    }
}

fn key_order(a: &View<'_>, b: &View<'_>) -> Ordering {
    a.user.cmp(b.user).then_with(|| a.second.cmp(b.second))
}

/// Merge the sorted `cursors` (later ones win equal times) and `upsert` each key's newest entry,
/// skipping (and listing in `bad`) user names that are not UTF-8. Returns how many were upserted.
fn merged<'a, 'py: 'a>(
    py: Python<'py>,
    mut cursors: Vec<Cursor<'a>>,
    bad: &Bound<'_, PyList>,
    mut upsert: impl FnMut(&View<'a>) -> PyResult<()>,
) -> PyResult<usize> {
    let mut heads: Vec<Option<View<'a>>> = Vec::with_capacity(cursors.len());
    for c in cursors.iter_mut() {
        heads.push(c.next(py)?);
    }
    let mut written = 0;
    loop {
        // The smallest key among the heads; of the heads with that key, the newest (the later on ties).
        let mut low: Option<usize> = None;
        let mut win = 0;
        for (i, h) in heads.iter().enumerate() {
            let h = match h {
                Some(h) => h,
                None => continue,
            };
            match low.map(|j| key_order(h, heads[j].as_ref().unwrap())) {
                None | Some(Ordering::Less) => {
                    low = Some(i);
                    win = i;
                }
                Some(Ordering::Equal) if h.t >= heads[win].as_ref().unwrap().t => win = i,
                _ => {}
            }
        }
        let low = match low {
            Some(low) => low,
            None => break,
        };
        let v = heads[win].as_ref().unwrap();
        if std::str::from_utf8(v.user).is_ok() {
            upsert(v)?;
            written += 1;
        } else {
            bad.append(PyBytes::new(py, v.user))?;
        }
        // Advance every cursor that was at this key (the key's slices borrow the data, not `heads`).
        let key = (v.user, v.second);
        for i in low..heads.len() {
            if heads[i].as_ref().map_or(false, |h| (h.user, h.second) == key) {
                heads[i] = cursors[i].next(py)?;
            }
        }
    }
    Ok(written)
}
