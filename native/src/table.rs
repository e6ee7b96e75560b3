//! The coalescing table: the newest event per (account, service or kind).
//!
//! Same contract as coalesce.PyTable (the fallback when this module is not
//! built): `put` keeps the newest time and, on equal times, the later call.
//! Keys stay bytes until `take`, which decodes the survivors once and hands
//! them out sorted by key, the order SQLite's B-tree inserts fastest; a
//! `take` with a limit hands out that many at a time (the rest stays as it is,
//! not decoded), so a big table is written without a Python row for each entry.

use std::collections::HashMap;

use ahash::RandomState;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

pub struct Entry {
    pub t: i64,
    pub digits: i64,
    pub ip: Option<Box<[u8]>>,
    pub node: PyObject,
    pub service: Py<PyString>,
    pub detail: Option<Py<PyString>>,
}

/// Newest value per key; a key is [len(second)] + second + user, unambiguous for any bytes.
#[pyclass(module = "harvester._fastscan")]
pub struct Table {
    map: HashMap<Box<[u8]>, Entry, RandomState>,
    buf: Vec<u8>,
    /// What a limited `take` left: the entries moved out of `map`, sorted once, handed out in order.
    /// Its keys are never in `map` (a put first moves them back), so the two together are the table.
    rest: Rest,
}

/// Entries in `slots`, their key order in `order`; `order[at..]` are the ones not handed out yet.
#[derive(Default)]
struct Rest {
    slots: Vec<Option<(Box<[u8]>, Entry)>>,
    order: Vec<u32>,
    at: usize,
}

impl Rest {
    fn len(&self) -> usize {
        self.order.len() - self.at
    }

    /// The entries not handed out yet, in key order.
    fn iter(&self) -> impl Iterator<Item = (&[u8], &Entry)> {
        self.order[self.at..].iter().map(|&i| {
            let (k, e) = self.slots[i as usize].as_ref().expect("an entry not handed out yet");
            (&k[..], e)
        })
    }

    /// Drop the first `n` entries (handed out), and the rest's memory once none is left.
    fn forget_first(&mut self, n: usize) {
        let end = self.at + n.min(self.len());
        for &i in &self.order[self.at..end] {
            self.slots[i as usize] = None;
        }
        self.at = end;
        if self.len() == 0 {
            *self = Rest::default();
        }
    }
}

impl Table {
    fn key(&mut self, user: &[u8], second: &[u8]) -> &[u8] {
        self.buf.clear();
        self.buf.push(second.len().min(255) as u8);
        self.buf.extend_from_slice(&second[..second.len().min(255)]);
        self.buf.extend_from_slice(user);
        &self.buf
    }

    /// Keep `entry` unless a newer one is stored (equal times: this one wins).
    pub fn put_entry(&mut self, user: &[u8], second: &[u8], entry: Entry) {
        if self.rest.len() > 0 {
            self.unsort(); // a put after a limited take (not the daemon's way): one place to look
        }
        let t = entry.t;
        self.key(user, second);
        if let Some(cur) = self.map.get_mut(self.buf.as_slice()) {
            if t >= cur.t {
                *cur = entry;
            }
            return;
        }
        let key: Box<[u8]> = self.buf.as_slice().into();
        self.map.insert(key, entry);
    }
}

impl Table {
    /// Entries sorted by (user, second): the order SQLite's B-tree inserts fastest.
    pub fn sorted(&self) -> Vec<(&[u8], &Entry)> {
        if self.map.is_empty() {
            return self.rest.iter().collect(); // sorted already
        }
        let entries: Vec<(&[u8], &Entry)> = self.entries().collect();
        key_order(entries.iter().map(|(k, _)| *k)).into_iter().map(|i| entries[i as usize]).collect()
    }

    /// Every entry, newest per key (what `put` keeps) in any order.
    fn entries(&self) -> impl Iterator<Item = (&[u8], &Entry)> {
        self.map.iter().map(|(k, e)| (&k[..], e)).chain(self.rest.iter())
    }

    /// Move what a limited take left back into `map`.
    fn unsort(&mut self) {
        let rest = std::mem::take(&mut self.rest);
        for (k, e) in rest.slots.into_iter().flatten() {
            self.map.insert(k, e);
        }
    }

    /// Move `map` into `rest`, sorted (with what `rest` held); `map`'s memory goes.
    fn sort_into_rest(&mut self) {
        if self.rest.len() > 0 {
            self.unsort();
        }
        let map = std::mem::replace(&mut self.map, HashMap::with_hasher(RandomState::new()));
        let slots: Vec<Option<(Box<[u8]>, Entry)>> = map.into_iter().map(Some).collect();
        let order = key_order(slots.iter().map(|s| &s.as_ref().unwrap().0[..]));
        self.rest = Rest { slots, order, at: 0 };
    }

    /// Forget every entry (once they are safely stored).
    pub fn clear(&mut self) {
        self.map.clear();
        self.rest = Rest::default();
    }
}

/// The indexes of `keys` in (user, second) order.
fn key_order<'a>(keys: impl Iterator<Item = &'a [u8]>) -> Vec<u32> {
    let keys: Vec<&[u8]> = keys.collect();
    // Sort (16-byte prefix of the user, index): most comparisons never touch the keys' memory.
    let mut order: Vec<(u128, u32)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let user = split(k).1;
            let mut head = [0u8; 16];
            let n = user.len().min(16);
            head[..n].copy_from_slice(&user[..n]);
            (u128::from_be_bytes(head), i as u32)
        })
        .collect();
    order.sort_unstable_by(|a, b| {
        a.0.cmp(&b.0).then_with(|| {
            let (sa, ua) = split(keys[a.1 as usize]);
            let (sb, ub) = split(keys[b.1 as usize]);
            ua.cmp(ub).then(sa.cmp(sb))
        })
    });
    order.into_iter().map(|(_, i)| i).collect()
}

pub fn split(key: &[u8]) -> (&[u8], &[u8]) {
    let n = key[0] as usize;
    (&key[1..1 + n], &key[1 + n..])
}

fn value<'py>(py: Python<'py>, e: &Entry) -> PyResult<Bound<'py, PyTuple>> {
    let ip = match &e.ip {
        Some(b) => PyBytes::new(py, b).into_any(),
        None => py.None().into_bound(py),
    };
    (e.t, e.digits, ip, e.node.clone_ref(py), e.service.clone_ref(py), e.detail.as_ref().map(|d| d.clone_ref(py)))
        .into_pyobject(py)
}

#[pymethods]
impl Table {
    #[new]
    fn new() -> Self {
        Table { map: HashMap::with_hasher(RandomState::new()), buf: Vec::with_capacity(256), rest: Rest::default() }
    }

    fn __len__(&self) -> usize {
        self.map.len() + self.rest.len()
    }

    /// The newest event time in the table (0 when empty), for the daemon's newest-stored gauge without
    /// a Python object per entry.
    fn newest(&self) -> i64 {
        self.entries().map(|(_, e)| e.t).max().unwrap_or(0)
    }

    /// Store (t, digits, ip, node, service, detail) for (user, second) unless a newer one is there.
    #[pyo3(signature = (user, second, t, digits, ip, node, service, detail=None))]
    #[allow(clippy::too_many_arguments)]
    fn put(
        &mut self,
        user: &[u8],
        second: &str,
        t: i64,
        digits: i64,
        ip: Option<&[u8]>,
        node: PyObject,
        service: Py<PyString>,
        detail: Option<Py<PyString>>,
    ) {
        let entry = Entry { t, digits, ip: ip.map(|b| b.into()), node, service, detail };
        self.put_entry(user, second.as_bytes(), entry);
    }

    /// [((user, second), value), ...] in no particular order (to ship a segment's rows).
    fn items<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for (k, e) in self.entries() {
            let (second, user) = split(k);
            let key = (PyBytes::new(py, user), PyString::new(py, &String::from_utf8_lossy(second)));
            out.append((key, value(py, e)?))?;
        }
        Ok(out)
    }

    /// Every entry as one bytes object, in key order, to ship a segment's rows to another process
    /// at memcpy speed (items() + pickle cost as much as parsing the segment did). The parent
    /// either `merge`s it or hands it to SqliteWriter.write, which merges sorted runs as it writes.
    fn dumps<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let mut out: Vec<u8> = Vec::with_capacity(self.__len__() * 96);
        let put = |out: &mut Vec<u8>, b: &[u8]| {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        };
        let opt = |out: &mut Vec<u8>, tag: u8, b: Option<&[u8]>| match b {
            Some(b) => {
                out.push(tag);
                put(out, b);
            }
            None => out.push(0),
        };
        for (k, e) in self.sorted() {
            let r = e.record(py, k)?;
            put(&mut out, r.key);
            out.extend_from_slice(&r.t.to_le_bytes());
            out.push(r.digits as u8);
            opt(&mut out, 1, r.ip);
            match r.node {
                Some((tag, b)) => opt(&mut out, tag, Some(b)),
                None => out.push(0),
            }
            put(&mut out, r.service);
            opt(&mut out, 1, r.detail);
        }
        Ok(PyBytes::new(py, &out))
    }

    /// Apply what `dumps` gave, as a later part (equal times: it wins), as `put` would one by one.
    fn merge(&mut self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        let mut r = Reader { data, at: 0 };
        let mut strings: HashMap<Vec<u8>, Py<PyString>, RandomState> = HashMap::default();
        let mut nodes: HashMap<Vec<u8>, PyObject, RandomState> = HashMap::default();
        while let Some(rec) = r.record()? {
            let node = match rec.node {
                None => py.None(),
                Some((tag, b)) => {
                    let mut tagged = vec![tag];
                    tagged.extend_from_slice(b);
                    nodes
                        .entry(tagged)
                        .or_insert_with(|| {
                            if tag == 1 {
                                PyBytes::new(py, b).into_any().unbind()
                            } else {
                                PyString::new(py, &String::from_utf8_lossy(b)).into_any().unbind()
                            }
                        })
                        .clone_ref(py)
                }
            };
            let service = text(py, &mut strings, rec.service);
            let detail = rec.detail.map(|d| text(py, &mut strings, d));
            let entry = Entry { t: rec.t, digits: rec.digits, ip: rec.ip.map(Box::from), node, service, detail };
            let (second, user) = split(rec.key);
            self.put_entry(user, second, entry);
        }
        Ok(())
    }

    /// Apply items of a later part (equal times: they win), as `put` would one by one.
    fn update(&mut self, items: &Bound<'_, PyList>) -> PyResult<()> {
        for item in items.iter() {
            let ((user, second), (t, digits, ip, node, service, detail)): (
                (Vec<u8>, String),
                (i64, i64, Option<Vec<u8>>, PyObject, Py<PyString>, Option<Py<PyString>>),
            ) = item.extract()?;
            self.put(&user, &second, t, digits, ip.as_deref(), node, service, detail);
        }
        Ok(())
    }

    /// Empty the table into `row_type` tuples sorted by (user, second), the order SQLite's
    /// B-tree takes fastest: (user, service, kind, t, digits, ip, node, detail), where kind is
    /// `kind` or, when None, the key's second part. Returns (rows, [undecodable user, ...]).
    ///
    /// With `limit`, only the first `limit` entries in that order (undecodable ones included) go;
    /// the others stay, undecoded: the first limited take sorts the table once, the next ones go
    /// on from there. On an error nothing is taken.
    #[pyo3(signature = (row_type, kind, limit=None))]
    fn take<'py>(
        &mut self,
        py: Python<'py>,
        row_type: &Bound<'py, PyAny>,
        kind: Option<Bound<'py, PyString>>,
        limit: Option<usize>,
    ) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>)> {
        if limit.is_some() && !self.map.is_empty() {
            self.sort_into_rest();
        }
        let n = limit.unwrap_or(usize::MAX).min(self.__len__());
        let entries = match limit {
            Some(_) => self.rest.iter().take(n).collect(),
            None => self.sorted(),
        };
        let new = py.get_type::<PyTuple>().getattr("__new__")?;
        let rows = PyList::empty(py);
        let bad = PyList::empty(py);
        let mut seconds: HashMap<Vec<u8>, Py<PyString>, RandomState> = HashMap::default();
        let mut texts: HashMap<Vec<u8>, Py<PyString>, RandomState> = HashMap::default();
        for (k, e) in entries {
            let (second, user) = split(k);
            let u = match std::str::from_utf8(user) {
                Ok(u) => u,
                Err(_) => {
                    bad.append(PyBytes::new(py, user))?;
                    continue;
                }
            };
            let kind = match &kind {
                Some(k) => k.clone().unbind(),
                None => seconds
                    .entry(second.to_vec())
                    .or_insert_with(|| PyString::new(py, &String::from_utf8_lossy(second)).unbind())
                    .clone_ref(py),
            };
            let ip = e.ip.as_ref().map(|b| text(py, &mut texts, b));
            let node = match e.node.bind(py).downcast::<PyBytes>() {
                Ok(b) => text(py, &mut texts, b.as_bytes()).into_any(),
                Err(_) => e.node.clone_ref(py),
            };
            let detail = e.detail.as_ref().map(|d| d.clone_ref(py));
            let fields =
                (PyString::new(py, u), e.service.clone_ref(py), kind, e.t, e.digits, ip, node, detail).into_pyobject(py)?;
            rows.append(new.call1((row_type, fields))?)?;
        }
        match limit {
            Some(_) => self.rest.forget_first(n),
            None => self.clear(),
        }
        Ok((rows, bad))
    }
}

/// Decoded text of an IP or host name, shared between rows (there are few distinct ones).
fn text(py: Python<'_>, cache: &mut HashMap<Vec<u8>, Py<PyString>, RandomState>, b: &[u8]) -> Py<PyString> {
    if let Some(s) = cache.get(b) {
        return s.clone_ref(py);
    }
    let s = PyString::new(py, &String::from_utf8_lossy(b)).unbind();
    if cache.len() < 100_000 {
        cache.insert(b.to_vec(), s.clone_ref(py));
    }
    s
}

impl Entry {
    /// This entry under `key` as a Record, its texts borrowed from the Python objects it holds.
    pub fn record<'a, 'py: 'a>(&'a self, py: Python<'py>, key: &'a [u8]) -> PyResult<Record<'a>> {
        let node = if self.node.is_none(py) {
            None
        } else if let Ok(b) = self.node.downcast_bound::<PyBytes>(py) {
            Some((1, b.as_bytes()))
        } else {
            Some((2, self.node.downcast_bound::<PyString>(py)?.to_str()?.as_bytes()))
        };
        let detail = match &self.detail {
            Some(d) => Some(d.bind(py).to_str()?.as_bytes()),
            None => None,
        };
        Ok(Record {
            key,
            t: self.t,
            digits: self.digits,
            ip: self.ip.as_deref(),
            node,
            service: self.service.bind(py).to_str()?.as_bytes(),
            detail,
        })
    }
}

/// One entry of a `dumps` value (or of a table), borrowed from it.
pub struct Record<'a> {
    pub key: &'a [u8],
    pub t: i64,
    pub digits: i64,
    pub ip: Option<&'a [u8]>,
    pub node: Option<(u8, &'a [u8])>, // (1: bytes, 2: str, as it was in the table), the text
    pub service: &'a [u8],
    pub detail: Option<&'a [u8]>,
}

/// Reads the entries of a `dumps` value in order.
pub struct Reader<'a> {
    pub data: &'a [u8],
    pub at: usize,
}

impl<'a> Reader<'a> {
    /// The next entry, None at the end, an error when `data` is not what `dumps` writes.
    pub fn record(&mut self) -> PyResult<Option<Record<'a>>> {
        if self.at >= self.data.len() {
            return Ok(None);
        }
        self.parse().map(Some).ok_or_else(|| pyo3::exceptions::PyValueError::new_err("not a Table.dumps() value"))
    }

    fn parse(&mut self) -> Option<Record<'a>> {
        let key = self.chunk()?;
        let t = i64::from_le_bytes(self.take(8)?.try_into().ok()?);
        let digits = self.take(1)?[0] as i64;
        let ip = match self.take(1)?[0] {
            0 => None,
            _ => Some(self.chunk()?),
        };
        let node = match self.take(1)?[0] {
            0 => None,
            tag => Some((tag, self.chunk()?)),
        };
        let service = self.chunk()?;
        let detail = match self.take(1)?[0] {
            0 => None,
            _ => Some(self.chunk()?),
        };
        Some(Record { key, t, digits, ip, node, service, detail })
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let b = self.data.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(b)
    }

    fn chunk(&mut self) -> Option<&'a [u8]> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        self.take(n)
    }
}
