//! LMTP sessions by process id: which MTA address an LMTP process is serving,
//! and the deliveries it made so far (re-stamped if XCLIENT changes the address).
//!
//! The same contract as parse.PySessions (the fallback in Python); the native
//! scanner uses it without a Python object per line, parse.Parser.event through
//! its methods.

use std::collections::HashMap;

use ahash::RandomState;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

/// Deliveries remembered per session for a possible re-stamp (as parse.py: 1000).
const MAX_DELIVERIES: usize = 1000;

pub struct Delivery {
    user: Option<Box<[u8]>>,
    t: i64,
    digits: i64,
    node: PyObject,
}

pub struct Open {
    pub ip: Option<Box<[u8]>>,
    deliveries: Vec<Delivery>,
}

struct Slot {
    seq: u64,
    open: Option<Open>, // None: closed (its Disconnect was seen, in segment mode)
}

/// What a delivery found for its pid.
pub enum Found<'a> {
    Open(&'a Option<Box<[u8]>>),
    Closed,
    Absent,
}

#[pyclass(module = "harvester._fastscan")]
pub struct Sessions {
    map: HashMap<Box<[u8]>, Slot, RandomState>,
    seq: u64,
    max: usize,
}

fn bytes_or_none<'py>(py: Python<'py>, b: &Option<Box<[u8]>>) -> PyObject {
    match b {
        Some(b) => PyBytes::new(py, b).into_any().unbind(),
        None => py.None(),
    }
}

/// [(user, t, digits, node), ...] of an open session, for Python.
fn deliveries<'py>(py: Python<'py>, open: &Open) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for d in &open.deliveries {
        list.append((bytes_or_none(py, &d.user), d.t, d.digits, d.node.clone_ref(py)))?;
    }
    Ok(list)
}

impl Sessions {
    pub fn start_native(&mut self, pid: &[u8], ip: Option<&[u8]>) {
        self.seq += 1;
        let slot = Slot { seq: self.seq, open: Some(Open { ip: ip.map(|b| b.into()), deliveries: Vec::new() }) };
        self.map.insert(pid.into(), slot);
        if self.map.len() > self.max {
            self.drop_oldest();
        }
    }

    /// Record a delivery of `pid`'s open session; say what the pid had.
    pub fn deliver_native(&mut self, pid: &[u8], user: Option<&[u8]>, t: i64, digits: i64,
                          node: &Bound<'_, PyAny>) -> Found<'_> {
        match self.map.get_mut(pid) {
            None => Found::Absent,
            Some(Slot { open: None, .. }) => Found::Closed,
            Some(Slot { open: Some(open), .. }) => {
                if open.deliveries.len() < MAX_DELIVERIES {
                    open.deliveries.push(Delivery { user: user.map(|u| u.into()), t, digits, node: node.clone().unbind() });
                }
                Found::Open(&open.ip)
            }
        }
    }

    /// The open session's address, if `pid` has an open session.
    pub fn open_ip(&self, pid: &[u8]) -> Option<&Option<Box<[u8]>>> {
        self.map.get(pid).and_then(|s| s.open.as_ref()).map(|o| &o.ip)
    }

    pub fn remove(&mut self, pid: &[u8]) {
        self.map.remove(pid);
    }

    fn drop_oldest(&mut self) {
        let mut seqs: Vec<u64> = self.map.values().map(|s| s.seq).collect();
        let half = seqs.len() / 2;
        seqs.select_nth_unstable(half);
        let cut = seqs[half];
        self.map.retain(|_, s| s.seq >= cut);
    }
}

#[pymethods]
impl Sessions {
    #[new]
    fn new(max: usize) -> Self {
        Sessions { map: HashMap::default(), seq: 0, max }
    }

    fn __len__(&self) -> usize {
        self.map.len()
    }

    /// An LMTP process connected (from `ip`, None for a local socket).
    #[pyo3(signature = (pid, ip))]
    fn start(&mut self, pid: &[u8], ip: Option<&[u8]>) {
        self.start_native(pid, ip);
    }

    /// A delivery of `pid`: ("open", ip) after recording it, ("closed", None) or ("absent", None).
    #[pyo3(signature = (pid, user, t, digits, node))]
    fn deliver(&mut self, py: Python<'_>, pid: &[u8], user: Option<&[u8]>, t: i64, digits: i64,
               node: &Bound<'_, PyAny>) -> (&'static str, PyObject) {
        match self.deliver_native(pid, user, t, digits, node) {
            Found::Open(ip) => ("open", bytes_or_none(py, ip)),
            Found::Closed => ("closed", py.None()),
            Found::Absent => ("absent", py.None()),
        }
    }

    /// End `pid`'s session: (ip, [(user, t, digits, node), ...]) if it was open, else None.
    fn pop<'py>(&mut self, py: Python<'py>, pid: &[u8]) -> PyResult<Option<(PyObject, Bound<'py, PyList>)>> {
        match self.map.remove(pid) {
            Some(Slot { open: Some(open), .. }) => Ok(Some((bytes_or_none(py, &open.ip), deliveries(py, &open)?))),
            _ => Ok(None),
        }
    }

    /// Mark `pid` closed: later deliveries of it without a Connect get no IP (segment mode).
    fn close(&mut self, pid: &[u8]) {
        self.seq += 1;
        self.map.insert(pid.into(), Slot { seq: self.seq, open: None });
    }

    /// {pid: [ip, [(user, t, digits, node), ...]]} of the open sessions, oldest first.
    fn open<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let mut slots: Vec<(&Box<[u8]>, &Slot)> = self.map.iter().filter(|(_, s)| s.open.is_some()).collect();
        slots.sort_by_key(|(_, s)| s.seq);
        let out = PyDict::new(py);
        for (pid, slot) in slots {
            let open = slot.open.as_ref().expect("filtered");
            let list = deliveries(py, open)?.into_any().unbind();
            out.set_item(PyBytes::new(py, pid), PyList::new(py, [bytes_or_none(py, &open.ip), list])?)?;
        }
        Ok(out)
    }

    /// Every pid: {pid: None (closed) or (ip, deliveries)}, to compare engines in tests.
    fn state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (pid, slot) in &self.map {
            let v: PyObject = match &slot.open {
                None => py.None(),
                Some(open) => (bytes_or_none(py, &open.ip), deliveries(py, open)?).into_pyobject(py)?.into_any().unbind(),
            };
            out.set_item(PyBytes::new(py, pid), v)?;
        }
        Ok(out)
    }
}
