//! torch zip checkpoints (`torch.save` since 1.6): the archive, the pickle and the storage
//! records, validated together, and the table of tensors they describe — without reading a
//! byte of tensor data.
//!
//! [`parse`] checks the archive ([`crate::zipfile`]), reads `<archive>/data.pkl` (CRC-checked),
//! `byteorder` and `version`, runs the pickle ([`crate::pickle`]), then checks every storage
//! and tensor against the records: a storage's record must exist and hold exactly numel x
//! itemsize bytes, and every tensor's sizes, strides and offset must stay inside its record
//! (computed with checked arithmetic, as torch's `set_` bounds check does). What the pickle
//! machine does not implement is not an error: the result is then [`Contents::Fallback`] with
//! the reason, and the caller hands the file to torch's own safe loader.
//!
//! A remote checkpoint is parsed from the parts fetched so far ([`parse_known`],
//! [`open_known`]): first the end records and central directory, then `data.pkl` and the
//! small records ([`ReadError::Unfetched`] names the ranges to fetch, and the caller parses
//! again), then, per load, the records of the tensors wanted ([`Record::fetch`]). Records
//! fetched this way have their CRC-32 checked, as they crossed a network.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::path::Path;

use crate::header::{io_error, ReadError as HeaderReadError};
use crate::pickle::{self, dtype, DtypeId, Node, Pickle, Span, V};
use crate::zipfile::{self, Archive, Known, ZipErrorKind};

/// Largest `data.pkl` accepted (its CRC is checked and it is parsed in memory).
pub const MAX_PICKLE_LEN: u64 = u32::MAX as u64;
/// Members outside `data/` up to this size have their CRC-32 checked.
const MAX_CHECKED_RECORD: u64 = 1 << 20;
/// Deepest container nesting the table walk follows.
const MAX_TABLE_DEPTH: usize = 256;
/// Bytes fetched past a local header's name when the header is not at hand yet: torch pads
/// the extra field so data starts on a 64-byte boundary (plus zip64 fields past 4 GiB). A
/// longer extra field costs one more fetch, of the data alone.
const LOCAL_EXTRA_GUESS: u64 = 128;

/// What is wrong with a checkpoint: one variant per check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PthErrorKind {
    /// The zip archive itself.
    Zip(ZipErrorKind),
    /// A record the checkpoint needs is not in the archive directory (`data.pkl`, `data/N`).
    MissingRecord,
    /// A small record (data.pkl, byteorder, version) whose CRC-32 does not match.
    CrcMismatch,
    /// A `byteorder` record that is neither `little` nor `big`.
    BadByteorder,
    /// A storage record whose size is not numel x itemsize of its persistent id.
    StorageSizeMismatch,
    /// A tensor whose sizes, strides and offset reach past its storage record.
    TensorOutOfBounds,
    /// Sizes whose byte counts do not fit in 63 bits.
    SizeOverflow,
    /// The file changed size between opening and loading.
    FileChanged,
}

impl PthErrorKind {
    /// Every kind outside the zip ones, for tests and documentation.
    pub const OWN: [PthErrorKind; 7] = [
        PthErrorKind::MissingRecord,
        PthErrorKind::CrcMismatch,
        PthErrorKind::BadByteorder,
        PthErrorKind::StorageSizeMismatch,
        PthErrorKind::TensorOutOfBounds,
        PthErrorKind::SizeOverflow,
        PthErrorKind::FileChanged,
    ];

    /// A stable snake_case name (`"storage_size_mismatch"`), the `kind` seen from Python.
    pub fn name(self) -> &'static str {
        match self {
            PthErrorKind::Zip(k) => k.name(),
            PthErrorKind::MissingRecord => "missing_record",
            PthErrorKind::CrcMismatch => "crc_mismatch",
            PthErrorKind::BadByteorder => "bad_byteorder",
            PthErrorKind::StorageSizeMismatch => "storage_size_mismatch",
            PthErrorKind::TensorOutOfBounds => "tensor_out_of_bounds",
            PthErrorKind::SizeOverflow => "size_overflow",
            PthErrorKind::FileChanged => "file_changed",
        }
    }
}

impl fmt::Display for PthErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A rejected checkpoint: which check failed and the specifics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PthError {
    pub kind: PthErrorKind,
    pub detail: String,
    /// For `Zip(Unfetched)`: the byte ranges to fetch before parsing again.
    pub need: Vec<(u64, u64)>,
}

impl PthError {
    fn new(kind: PthErrorKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
            need: Vec::new(),
        }
    }

    /// The error for the file at `path`.
    pub fn at(self, path: &str) -> ReadError {
        if self.kind == PthErrorKind::Zip(ZipErrorKind::Unfetched) {
            return ReadError::Unfetched {
                path: path.to_owned(),
                need: self.need,
            };
        }
        ReadError::Invalid {
            path: path.to_owned(),
            kind: self.kind,
            detail: self.detail,
        }
    }
}

impl From<zipfile::ZipError> for PthError {
    fn from(e: zipfile::ZipError) -> Self {
        Self {
            kind: PthErrorKind::Zip(e.kind),
            detail: e.detail,
            need: e.need,
        }
    }
}

impl fmt::Display for PthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

/// Why a checkpoint could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// A checkpoint that fails validation.
    #[error("{path}: invalid torch zip checkpoint ({kind}): {detail}")]
    Invalid {
        path: String,
        kind: PthErrorKind,
        detail: String,
    },
    /// An I/O failure, keeping its kind and errno (see [`crate::header::ReadError::Io`]).
    #[error("{0}")]
    Io(HeaderReadError),
    /// (A file read in part) the parse needs bytes that are not fetched yet.
    #[error("{path}: {} byte range(s) must be fetched first", need.len())]
    Unfetched { path: String, need: Vec<(u64, u64)> },
}

/// The byte order a checkpoint's `byteorder` record names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteOrder {
    Little,
    Big,
}

/// One storage record that the pickle uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The key (`"0"` for `<archive>/data/0`), in the pickle.
    pub key: Span,
    /// Absolute offset of its first byte.
    pub start: u64,
    /// Its size in bytes.
    pub size: u64,
    /// The dtype of its first reference (torch swaps bytes by it for big-endian files).
    pub dtype: DtypeId,
    /// The location its first reference names (`"cpu"`), in the pickle.
    pub location: Span,
    /// How many tensors of the pickle use it.
    pub tensors: u32,
    /// (A file read in part) the bytes to fetch before its data can be used: its local
    /// header and data, or its data alone; None when they are at hand (always, for a whole
    /// file).
    pub fetch: Option<(u64, u64)>,
}

/// A tensor, checked against its record (its sizes and strides: [`Parsed::shape`],
/// [`Parsed::stride`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tensor {
    /// Index into [`Parsed::records`].
    pub record: u32,
    pub dtype: DtypeId,
    /// Storage offset, in elements.
    pub offset: u64,
    pub requires_grad: bool,
    /// numel x itemsize (what `Tensor.nbytes` says).
    pub nbytes: u64,
    /// Absolute file offsets of the bytes its elements span (`start == end` when empty).
    pub start: u64,
    pub end: u64,
    /// The bytes its sizes and strides span from its first element (torch's
    /// `computeStorageNbytes`): 0 for an empty tensor.
    pub span: u64,
}

/// One tensor reachable through dicts, lists and tuples: the table's row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Where its dotted path (`"state_dict.layer.weight"`, as `ckptmap inspect` names
    /// tensors) lies in [`Table::names`].
    pub name: (u32, u32),
    /// Index into [`Parsed::tensors`].
    pub tensor: u32,
    /// The Parameter (index into the pickle's params) when the value is one.
    pub param: Option<u32>,
}

/// The tensors reachable through dicts, lists and tuples.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    pub entries: Vec<Entry>,
    /// Every entry's name, one after the other.
    pub names: String,
}

impl Table {
    /// The name of `e`.
    pub fn name(&self, e: &Entry) -> &str {
        let (a, n) = (e.name.0 as usize, e.name.1 as usize);
        self.names.get(a..a + n).unwrap_or_default()
    }
}

/// A checkpoint the reader can load itself.
#[derive(Clone, Debug)]
pub struct Parsed {
    pub pickle: Pickle,
    /// Where `data.pkl` starts in the file (string spans are relative to it).
    pub pickle_start: u64,
    pub pickle_len: u64,
    pub records: Vec<Record>,
    /// For every storage reference of the pickle, its record.
    pub storage_record: Vec<u32>,
    /// For every tensor of the pickle.
    pub tensors: Vec<Tensor>,
    /// Tensors reachable through containers, or why they could not be listed: made on
    /// first use ([`Parsed::table`]), as loading does not need it.
    table: std::sync::OnceLock<Result<Table, String>>,
    /// `None` when the archive has no `byteorder` record.
    pub byteorder: Option<ByteOrder>,
    /// The archive format version (`version` record).
    pub version: u64,
    /// The archive directory name.
    pub archive: String,
}

/// What [`parse`] found.
#[derive(Clone, Debug)]
pub enum Contents {
    /// Validated, with a pickle the machine ran completely.
    Ready(Box<Parsed>),
    /// A valid archive that torch must load; the reason says why.
    Fallback(String),
}

/// The archive format versions this reader knows (torch writes 3).
const KNOWN_VERSIONS: std::ops::RangeInclusive<u64> = 1..=3;

/// Parses and validates the checkpoint `bytes` (the whole file); `allowed` resolves globals
/// beyond the machine's own table.
pub fn parse(bytes: &[u8], allowed: &dyn pickle::Allowlist) -> Result<Contents, PthError> {
    parse_known(bytes, Known::All, allowed)
}

/// [`parse`] of a file of which only the `known` bytes are at hand (see the module docs).
pub fn parse_known(
    bytes: &[u8],
    known: Known<'_>,
    allowed: &dyn pickle::Allowlist,
) -> Result<Contents, PthError> {
    let archive = zipfile::parse_known(bytes, known)?;
    let prefix = String::from_utf8_lossy(archive.prefix(bytes)).into_owned();
    let mut records: Vec<(&[u8], usize)> = Vec::with_capacity(archive.members.len());
    let mut metadata: Vec<usize> = Vec::new();
    let mut data_pkl = None;
    let mut byteorder_member = None;
    let mut version_member = None;
    let mut data_version_member = None;
    let plen = archive.prefix.1 - archive.prefix.0 + 1;
    for i in 0..archive.members.len() {
        // Every name starts with "<prefix>/" (checked by the zip reader).
        let rest = archive.name(bytes, i).get(plen..).unwrap_or_default();
        match rest {
            b"data.pkl" => data_pkl = Some(i),
            b"byteorder" => byteorder_member = Some(i),
            b"version" => version_member = Some(i),
            b".data/version" => data_version_member = Some(i),
            _ => match rest.strip_prefix(b"data/") {
                Some(key) => records.push((key, i)),
                None => metadata.push(i),
            },
        }
    }
    let Some(data_pkl) = data_pkl else {
        return Err(PthError::new(
            PthErrorKind::MissingRecord,
            format!("the archive has no {prefix}/data.pkl (the checkpoint's pickle)"),
        ));
    };
    // The other small records (.format_version, .storage_alignment, serialization ids)
    // are not read here, but torch reads some of them: damage there is damage.
    metadata.retain(|&i| archive.members[i].size <= MAX_CHECKED_RECORD);
    // A file read in part: every record read below must be at hand first, asked for at once.
    let small_members = [
        Some(data_pkl),
        byteorder_member,
        version_member,
        data_version_member,
    ];
    let need: Vec<(u64, u64)> = small_members
        .into_iter()
        .flatten()
        .chain(metadata.iter().copied())
        .filter_map(|i| to_fetch(&archive, i, known))
        .collect();
    if !need.is_empty() {
        return Err(zipfile::ZipError::unfetched(need).into());
    }
    let small = |i: usize, what: &str| -> Result<&[u8], PthError> {
        let data = archive.data(bytes, i);
        let expected = archive.members[i].crc32;
        let actual = zipfile::crc32(data);
        if actual != expected {
            return Err(PthError::new(
                PthErrorKind::CrcMismatch,
                format!(
                    "{prefix}/{what} has CRC-32 {actual:#010x}, the archive says {expected:#010x}: \
                     its bytes were damaged"
                ),
            ));
        }
        Ok(data)
    };
    for &i in &metadata {
        let name = String::from_utf8_lossy(archive.name(bytes, i).get(plen..).unwrap_or_default());
        small(i, &name)?;
    }
    let byteorder = match byteorder_member {
        None => None,
        Some(i) => match small(i, "byteorder")? {
            b"little" => Some(ByteOrder::Little),
            b"big" => Some(ByteOrder::Big),
            other => {
                return Err(PthError::new(
                    PthErrorKind::BadByteorder,
                    format!(
                        "{prefix}/byteorder is {:?}, neither \"little\" nor \"big\"",
                        String::from_utf8_lossy(&other[..other.len().min(40)])
                    ),
                ))
            }
        },
    };
    let Some(version_at) = data_version_member.or(version_member) else {
        return Ok(Contents::Fallback(format!(
            "the archive has no {prefix}/version record"
        )));
    };
    let version_text = small(version_at, "version")?;
    let version = std::str::from_utf8(version_text)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let version = match version {
        Some(v) if KNOWN_VERSIONS.contains(&v) => v,
        _ => {
            return Ok(Contents::Fallback(format!(
                "archive format version {:?} (this reader knows {}-{})",
                String::from_utf8_lossy(&version_text[..version_text.len().min(20)]),
                KNOWN_VERSIONS.start(),
                KNOWN_VERSIONS.end()
            )))
        }
    };
    let pkl_member = &archive.members[data_pkl];
    if pkl_member.size > MAX_PICKLE_LEN {
        return Ok(Contents::Fallback(format!(
            "data.pkl is {} bytes, over the reader's limit",
            pkl_member.size
        )));
    }
    // The CRC and the pickle machine each read all of data.pkl: run them side by side.
    let pkl = archive.data(bytes, data_pkl);
    let (crc, pickle) = rayon::join(|| small(data_pkl, "data.pkl"), || pickle::run(pkl, allowed));
    crc?;
    let pickle = match pickle {
        Ok(p) => p,
        Err(e) => return Ok(Contents::Fallback(e.to_string())),
    };
    let index = RecordIndex::new(records);
    let (mut records, storage_record) =
        resolve_storages(bytes, known, &archive, &index, &pickle, pkl)?;
    let tensors = check_tensors(&pickle, pkl, &mut records, &storage_record)?;
    Ok(Contents::Ready(Box::new(Parsed {
        pickle_start: pkl_member.data,
        pickle_len: pkl_member.size,
        pickle,
        records,
        storage_record,
        tensors,
        table: std::sync::OnceLock::new(),
        byteorder,
        version,
        archive: prefix,
    })))
}

/// What to fetch of member `i` before its data can be read: None when it is at hand.
fn to_fetch(archive: &Archive, i: usize, known: Known<'_>) -> Option<(u64, u64)> {
    let m = &archive.members[i];
    let end = m.data.saturating_add(m.size);
    if m.located {
        return (!known.has(m.data, end)).then_some((m.data, end));
    }
    // The local header, its extra field (guessed) and the data, in one range.
    let guess = end
        .saturating_add(LOCAL_EXTRA_GUESS)
        .min(archive.central_directory);
    Some((m.header, guess.max(end)))
}

type Resolved = (Vec<Record>, Vec<u32>);

/// Record members by key: torch names them `data/0`, `data/1`, ... so decimal keys index a
/// vector; other keys go through a map.
struct RecordIndex<'a> {
    numeric: Vec<u32>,
    other: HashMap<&'a [u8], u32>,
}

impl<'a> RecordIndex<'a> {
    fn new(entries: Vec<(&'a [u8], usize)>) -> Self {
        let mut numeric = vec![u32::MAX; entries.len()];
        let mut other = HashMap::new();
        for (key, member) in entries {
            match decimal(key).filter(|&k| k < numeric.len()) {
                Some(k) => numeric[k] = member as u32,
                None => {
                    other.insert(key, member as u32);
                }
            }
        }
        Self { numeric, other }
    }

    fn get(&self, key: &[u8]) -> Option<usize> {
        let found = match decimal(key) {
            Some(k) => self.numeric.get(k).copied(),
            None => self.other.get(key).copied(),
        };
        found.filter(|&m| m != u32::MAX).map(|m| m as usize)
    }
}

/// `key` as a canonical decimal number (no sign, no leading zero), if it is one.
fn decimal(key: &[u8]) -> Option<usize> {
    if key.is_empty() || key.len() > 9 || (key[0] == b'0' && key.len() > 1) {
        return None;
    }
    key.iter().try_fold(0usize, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + usize::from(b - b'0'))
    })
}

/// Maps every storage reference to its record, checking that the record holds numel x
/// itemsize bytes.
fn resolve_storages(
    bytes: &[u8],
    known: Known<'_>,
    archive: &Archive,
    members: &RecordIndex<'_>,
    pickle: &Pickle,
    pkl: &[u8],
) -> Result<Resolved, PthError> {
    let prefix = String::from_utf8_lossy(archive.prefix(bytes));
    let mut by_member: Vec<u32> = vec![u32::MAX; archive.members.len()];
    let mut records: Vec<Record> = Vec::new();
    let mut storage_record = Vec::with_capacity(pickle.storages.len());
    for s in &pickle.storages {
        let key = s.key.of(pkl);
        let shown = || String::from_utf8_lossy(key);
        let Some(member) = members.get(key) else {
            return Err(PthError::new(
                PthErrorKind::MissingRecord,
                format!(
                    "the pickle uses storage {:?}, but the archive has no {prefix}/data/{}",
                    shown(),
                    shown()
                ),
            ));
        };
        let info = dtype(s.dtype);
        let itemsize = u64::from(info.itemsize.unwrap_or(1));
        let m = &archive.members[member];
        let nbytes = s.numel.checked_mul(itemsize).ok_or_else(|| {
            PthError::new(
                PthErrorKind::SizeOverflow,
                format!(
                    "storage {:?}: {} elements of torch.{} overflow",
                    shown(),
                    s.numel,
                    info.name
                ),
            )
        })?;
        if nbytes != m.size {
            return Err(PthError::new(
                PthErrorKind::StorageSizeMismatch,
                format!(
                    "storage {:?} holds {} elements of torch.{} ({nbytes} bytes), but its \
                     record {prefix}/data/{} has {} bytes",
                    shown(),
                    s.numel,
                    info.name,
                    shown(),
                    m.size
                ),
            ));
        }
        let slot = &mut by_member[member];
        if *slot == u32::MAX {
            *slot = records.len() as u32;
            let fetch = to_fetch(archive, member, known);
            if fetch.is_none() && matches!(known, Known::Ranges(_)) {
                // Fetched over a network: its CRC-32 is worth checking.
                let actual = zipfile::crc32(archive.data(bytes, member));
                if actual != m.crc32 {
                    return Err(PthError::new(
                        PthErrorKind::CrcMismatch,
                        format!(
                            "{prefix}/data/{} has CRC-32 {actual:#010x}, the archive says {:#010x}: \
                             its bytes were damaged in transit or at the source",
                            shown(),
                            m.crc32
                        ),
                    ));
                }
            }
            records.push(Record {
                key: s.key,
                start: m.data,
                size: m.size,
                dtype: s.dtype,
                location: s.location,
                tensors: 0,
                fetch,
            });
        }
        storage_record.push(*slot);
    }
    Ok((records, storage_record))
}

/// torch's `computeStorageNbytes`: the bytes a tensor's sizes and strides span (0 when it
/// has no element), or `None` on overflow.
pub fn storage_nbytes(shape: &[u64], stride: &[u64], itemsize: u64) -> Option<u64> {
    if shape.contains(&0) {
        return Some(0);
    }
    let mut last = 0u64;
    for (&size, &st) in shape.iter().zip(stride) {
        last = last.checked_add((size - 1).checked_mul(st)?)?;
    }
    last.checked_add(1)?.checked_mul(itemsize)
}

fn check_tensors(
    pickle: &Pickle,
    pkl: &[u8],
    records: &mut [Record],
    storage_record: &[u32],
) -> Result<Vec<Tensor>, PthError> {
    let mut out = Vec::with_capacity(pickle.tensors.len());
    for (i, t) in pickle.tensors.iter().enumerate() {
        let record = storage_record[t.storage as usize];
        let rec = &mut records[record as usize];
        let rec_key = rec.key;
        let key = || String::from_utf8_lossy(rec_key.of(pkl));
        let info = dtype(t.dtype);
        let itemsize = u64::from(info.itemsize.unwrap_or(1));
        let (shape, stride) = (pickle.shape(t), pickle.stride(t));
        let overflow = || {
            PthError::new(
                PthErrorKind::SizeOverflow,
                format!(
                    "tensor {i} (storage {:?}): sizes {shape:?}, strides {stride:?} and \
                     offset {} of torch.{} overflow",
                    key(),
                    t.offset,
                    info.name
                ),
            )
        };
        let numel = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(overflow)?;
        let nbytes = numel.checked_mul(itemsize).ok_or_else(overflow)?;
        let span = storage_nbytes(shape, stride, itemsize).ok_or_else(overflow)?;
        let offset_bytes = t.offset.checked_mul(itemsize).ok_or_else(overflow)?;
        let reach = offset_bytes.checked_add(span).ok_or_else(overflow)?;
        // torch keeps sizes in int64: the same limit here.
        if nbytes > i64::MAX as u64 || reach > i64::MAX as u64 {
            return Err(overflow());
        }
        if span > 0 && reach > rec.size {
            return Err(PthError::new(
                PthErrorKind::TensorOutOfBounds,
                format!(
                    "tensor {i}: sizes {shape:?}, strides {stride:?} and storage offset {} of \
                     torch.{} need {reach} bytes, but its storage {:?} holds {}",
                    t.offset,
                    info.name,
                    key(),
                    rec.size
                ),
            ));
        }
        rec.tensors += 1;
        let (start, end) = if span == 0 {
            let at = rec.start.saturating_add(offset_bytes.min(rec.size));
            (at, at)
        } else {
            (rec.start + offset_bytes, rec.start + reach)
        };
        out.push(Tensor {
            record,
            dtype: t.dtype,
            offset: t.offset,
            requires_grad: t.requires_grad,
            nbytes,
            start,
            end,
            span,
        });
    }
    Ok(out)
}

/// Lists the tensors reachable through dicts, lists and tuples, named by dotted paths as
/// `ckptmap inspect` names them; gives up (with the reason) on very deep or very shared
/// structures, whose paths can outnumber the pickle's bytes.
fn walk_table(pickle: &Pickle, pkl: &[u8]) -> Result<Table, String> {
    let mut walk = Walk {
        pickle,
        pkl,
        out: Table {
            entries: Vec::with_capacity(pickle.tensors.len()),
            names: String::with_capacity(pickle.tensors.len() * 32),
        },
        path: String::new(),
        budget: pickle
            .nodes
            .len()
            .saturating_mul(4)
            .saturating_add(1_000_000),
    };
    walk.visit(pickle.root(), 0)?;
    if u32::try_from(walk.out.names.len()).is_err() {
        return Err("tensor names longer than 4 GiB in all".to_owned());
    }
    Ok(walk.out)
}

struct Walk<'a> {
    pickle: &'a Pickle,
    pkl: &'a [u8],
    out: Table,
    path: String,
    budget: usize,
}

impl Walk<'_> {
    fn child(&mut self, key: &dyn fmt::Display, v: V, depth: usize) -> Result<(), String> {
        use std::fmt::Write;
        let len = self.path.len();
        if len > 0 {
            self.path.push('.');
        }
        let _ = write!(self.path, "{key}");
        let r = self.visit(v, depth + 1);
        self.path.truncate(len);
        r
    }

    fn visit(&mut self, v: V, depth: usize) -> Result<(), String> {
        if depth > MAX_TABLE_DEPTH {
            return Err(format!("containers nested over {MAX_TABLE_DEPTH} deep"));
        }
        self.budget = self
            .budget
            .checked_sub(1)
            .ok_or("containers shared so often that their paths outnumber the pickle")?;
        let p = self.pickle;
        let (tensor, param) = match p.node(v) {
            Some(&Node::Tensor(t)) => (t, None),
            Some(&Node::Param(i)) => (p.params[i as usize].tensor, Some(i)),
            _ => (u32::MAX, None),
        };
        if tensor != u32::MAX {
            let names = &mut self.out.names;
            let at = names.len();
            names.push_str(if self.path.is_empty() {
                "<top level>"
            } else {
                &self.path
            });
            let name = (at as u32, (names.len() - at) as u32);
            self.out.entries.push(Entry {
                name,
                tensor,
                param,
            });
            return Ok(());
        }
        match p.node(v) {
            Some(&Node::Dict(d)) => {
                for &(k, value) in &p.dicts[d as usize].items {
                    match (k, p.node(k)) {
                        (V::Int(i), _) => self.child(&i, value, depth)?,
                        (_, Some(&Node::Str(s))) => {
                            let key = std::str::from_utf8(s.of(self.pkl)).unwrap_or_default();
                            self.child(&key, value, depth)?;
                        }
                        _ => return Err("a dict key that is neither str nor int".to_owned()),
                    }
                }
            }
            Some(&Node::List(l)) => {
                for (i, &item) in p.lists[l as usize].items.iter().enumerate() {
                    self.child(&i, item, depth)?;
                }
            }
            Some(&Node::Tuple { start, len }) => {
                for (i, &item) in p.tuple_items(start, len).iter().enumerate() {
                    self.child(&i, item, depth)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl Parsed {
    /// The tensors reachable through dicts, lists and tuples, named by dotted paths as
    /// `ckptmap inspect` names them, or why they can not be listed (structures too deep or
    /// too shared); `bytes` is the whole file.
    pub fn table(&self, bytes: &[u8]) -> &Result<Table, String> {
        self.table
            .get_or_init(|| walk_table(&self.pickle, self.pickle_bytes(bytes)))
    }

    /// The sizes of tensor `i`.
    pub fn shape(&self, i: usize) -> &[u64] {
        self.pickle
            .tensors
            .get(i)
            .map_or(&[], |t| self.pickle.shape(t))
    }

    /// The strides of tensor `i`.
    pub fn stride(&self, i: usize) -> &[u64] {
        self.pickle
            .tensors
            .get(i)
            .map_or(&[], |t| self.pickle.stride(t))
    }

    /// The pickle's bytes within the whole file `bytes`.
    pub fn pickle_bytes<'a>(&self, bytes: &'a [u8]) -> &'a [u8] {
        let (a, b) = (
            self.pickle_start as usize,
            (self.pickle_start + self.pickle_len) as usize,
        );
        bytes.get(a..b).unwrap_or_default()
    }

    /// The distinct locations the records were saved from, in first-use order.
    pub fn locations<'a>(&self, bytes: &'a [u8]) -> Vec<&'a str> {
        // Few distinct locations: a linear search is the fastest set.
        let mut out: Vec<&str> = Vec::new();
        for r in &self.records {
            let text = self.text(bytes, r.location);
            if !out.contains(&text) {
                out.push(text);
            }
        }
        out
    }

    /// Text of a str span of the pickle.
    pub fn text<'a>(&self, bytes: &'a [u8], span: Span) -> &'a str {
        std::str::from_utf8(span.of(self.pickle_bytes(bytes))).unwrap_or_default()
    }
}

/// Swaps the bytes of every record of a big-endian checkpoint in `buffer` (the whole file),
/// element by element as torch does (`UntypedStorage.byteswap(dtype)`: complex numbers per
/// half, one-byte types untouched). `records` come from [`Parsed::records`].
pub fn byteswap_records(buffer: &mut [u8], records: &[Record]) {
    for r in records {
        let info = dtype(r.dtype);
        let itemsize = usize::from(info.itemsize.unwrap_or(1));
        let unit = if info.name.starts_with("complex") {
            itemsize / 2
        } else {
            itemsize
        };
        if unit <= 1 {
            continue;
        }
        let (a, b) = (r.start as usize, (r.start + r.size) as usize);
        if let Some(data) = buffer.get_mut(a..b) {
            for chunk in data.chunks_exact_mut(unit) {
                chunk.reverse();
            }
        }
    }
}

/// An opened checkpoint file: the descriptor, a read-only map for parsing, and the result.
pub struct Opened {
    pub file: File,
    /// The whole file, mapped read-only (or read, where it can not be mapped).
    pub bytes: FileBytes,
    pub contents: Contents,
}

/// The bytes of an opened file.
pub enum FileBytes {
    Map(memmap2::Mmap),
    Read(Vec<u8>),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Map(m) => m,
            FileBytes::Read(v) => v,
        }
    }
}

/// The member names of the archive at `path` below its directory (`"data.pkl"`,
/// `"data/0"`, ...), as torch's `PyTorchFileReader.get_all_records` lists them, after the
/// same validation as [`open`] gives the archive.
pub fn records(path: &Path) -> Result<Vec<String>, ReadError> {
    let shown = path.display().to_string();
    let (_, bytes) = map_path(path, &shown)?;
    let archive = zipfile::parse(&bytes).map_err(|e| PthError::from(e).at(&shown))?;
    let skip = archive.prefix.1 - archive.prefix.0 + 1;
    Ok((0..archive.members.len())
        .map(|i| String::from_utf8_lossy(archive.name(&bytes, i).get(skip..).unwrap_or_default()))
        .map(|name| name.into_owned())
        .collect())
}

/// Opens and parses the checkpoint at `path`.
pub fn open(path: &Path, allowed: &dyn pickle::Allowlist) -> Result<Opened, ReadError> {
    open_known(path, Known::All, allowed)
}

/// Opens and parses the file at `path`, of which only the `known` bytes hold the
/// checkpoint's (a remote checkpoint fetched in part into a sparse file of its size).
pub fn open_known(
    path: &Path,
    known: Known<'_>,
    allowed: &dyn pickle::Allowlist,
) -> Result<Opened, ReadError> {
    let shown = path.display().to_string();
    let (file, bytes) = map_path(path, &shown)?;
    let contents = parse_known(&bytes, known, allowed).map_err(|e| e.at(&shown))?;
    Ok(Opened {
        file,
        bytes,
        contents,
    })
}

/// Opens the regular file at `path` and maps it.
fn map_path(path: &Path, shown: &str) -> Result<(File, FileBytes), ReadError> {
    let io = |e: &io::Error| ReadError::Io(io_error(shown, e));
    let meta = std::fs::metadata(path).map_err(|e| io(&e))?;
    if meta.is_dir() && cfg!(unix) {
        return Err(io(&io::Error::from_raw_os_error(21)));
    }
    if !meta.is_file() {
        return Err(ReadError::Io(HeaderReadError::Io {
            path: shown.to_owned(),
            kind: io::ErrorKind::InvalidInput,
            errno: None,
            detail: "not a regular file".to_owned(),
        }));
    }
    let file = File::open(path).map_err(|e| io(&e))?;
    let bytes = read_all(&file).map_err(|e| io(&e))?;
    Ok((file, bytes))
}

/// Maps `file` read-only (reading it instead where it can not be mapped).
fn read_all(file: &File) -> io::Result<FileBytes> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(FileBytes::Read(Vec::new()));
    }
    // SAFETY: read-only and private to this reader. As with any mapped file (torch's
    // mmap=True included), the file must not be truncated while it is in use.
    match unsafe { memmap2::Mmap::map(file) } {
        Ok(map) => {
            #[cfg(unix)]
            {
                // Only the central directory and data.pkl are read: no read-ahead of tensors.
                let _ = map.advise(memmap2::Advice::Random);
            }
            Ok(FileBytes::Map(map))
        }
        Err(_) => {
            use std::io::Read;
            let mut out = Vec::with_capacity(len as usize);
            (&*file).read_to_end(&mut out)?;
            Ok(FileBytes::Read(out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pickle::tests::W;
    use crate::zipfile::testing::{write, Entry as ZipEntry};
    use proptest::prelude::*;

    fn archive(pkl: Vec<u8>, records: &[(&str, Vec<u8>)], byteorder: &str) -> Vec<u8> {
        let mut e = vec![ZipEntry::new("ck/data.pkl", pkl)];
        e.push(ZipEntry::new("ck/byteorder", byteorder));
        for (k, data) in records {
            e.push(ZipEntry::new(format!("ck/data/{k}"), data));
        }
        e.push(ZipEntry::new("ck/version", "3\n"));
        write(&e, false).0
    }

    /// `(name, key, numel, offset, shape, stride)`.
    type Spec<'a> = (&'a str, &'a str, i32, i32, &'a [i32], &'a [i32]);

    fn state_dict(tensors: &[Spec<'_>]) -> Vec<u8> {
        let mut w = W::new();
        w.op(b'}').op(b'(');
        for &(name, key, numel, offset, shape, stride) in tensors {
            w.str(name)
                .tensor("FloatStorage", key, numel, offset, shape, stride);
        }
        w.op(b'u');
        w.stop()
    }

    fn none() -> Vec<String> {
        Vec::new()
    }

    fn ready(bytes: &[u8]) -> Box<Parsed> {
        match parse(bytes, &none()).unwrap() {
            Contents::Ready(p) => p,
            Contents::Fallback(r) => panic!("fallback: {r}"),
        }
    }

    fn kind(bytes: &[u8]) -> PthErrorKind {
        match parse(bytes, &none()) {
            Err(e) => {
                assert!(!e.detail.is_empty());
                e.kind
            }
            Ok(Contents::Ready(_)) => panic!("accepted"),
            Ok(Contents::Fallback(r)) => panic!("fallback: {r}"),
        }
    }

    /// Parses `full` as a remote reader would: starting from `known`, fetching what each
    /// `Unfetched` error names (into a buffer that holds only fetched bytes) until it parses.
    fn parse_in_part(full: &[u8], mut known: Vec<(u64, u64)>) -> (Box<Parsed>, Vec<u8>, usize) {
        let mut sparse = vec![0u8; full.len()];
        let mut rounds = 0;
        loop {
            for &(a, b) in &known {
                sparse[a as usize..b as usize].copy_from_slice(&full[a as usize..b as usize]);
            }
            known.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::new();
            for (a, b) in known.drain(..) {
                match merged.last_mut() {
                    Some(last) if a <= last.1 => last.1 = last.1.max(b),
                    _ => merged.push((a, b)),
                }
            }
            known = merged;
            rounds += 1;
            assert!(rounds < 10, "no progress");
            match parse_known(&sparse, Known::Ranges(&known), &none()) {
                Ok(Contents::Ready(p)) => return (p, sparse, rounds),
                Ok(Contents::Fallback(r)) => panic!("fallback: {r}"),
                Err(e) if e.kind == PthErrorKind::Zip(ZipErrorKind::Unfetched) => {
                    assert!(!e.need.is_empty());
                    for &(a, b) in &e.need {
                        assert!(!Known::Ranges(&known).has(a, b), "asked again for {a}..{b}");
                    }
                    known.extend(e.need);
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn a_file_read_in_part_parses_as_the_whole_file() {
        let pkl = state_dict(&[
            ("a", "0", 25_000, 0, &[250, 100], &[100, 1]),
            ("b", "1", 25_000, 1, &[2], &[1]),
        ]);
        // Records larger than the end-record search window (64 KiB): the tail is not all.
        let (r0, r1) = (vec![1; 100_000], vec![2; 100_000]);
        let full = archive(pkl, &[("0", r0), ("1", r1)], "little");
        let whole = ready(&full);
        // From the last bytes only: the directory, then data.pkl and the small records.
        let tail = full.len() as u64 - 30;
        let (part, mut sparse, rounds) = parse_in_part(&full, vec![(tail, full.len() as u64)]);
        assert!(rounds >= 2);
        assert_eq!(part.tensors.len(), whole.tensors.len());
        assert_eq!(
            part.table(&sparse).as_ref().unwrap(),
            whole.table(&full).as_ref().unwrap()
        );
        // Records are not fetched: each names its local header and data.
        for (r, w) in part.records.iter().zip(&whole.records) {
            let (a, b) = r.fetch.expect("not fetched");
            assert!(a <= w.start && b >= w.start + w.size && w.fetch.is_none());
        }
        // Fetch one record: it is located, CRC-checked and matches the whole parse.
        let pkl_end = part.pickle_start + part.pickle_len;
        let need = part.records[0].fetch.unwrap();
        let (again, _, _) =
            parse_in_part(&full, vec![(tail, full.len() as u64), (0, pkl_end), need]);
        assert_eq!(again.records[0].fetch, None);
        assert_eq!(again.records[0].start, whole.records[0].start);
        assert!(again.records[1].fetch.is_some());
        // A record damaged in transit fails its CRC.
        sparse.copy_from_slice(&full);
        sparse[whole.records[0].start as usize] ^= 1;
        let everything = [(0, full.len() as u64)];
        match parse_known(&sparse, Known::Ranges(&everything), &none()) {
            Err(e) => assert_eq!(e.kind, PthErrorKind::CrcMismatch),
            Ok(_) => panic!("accepted a damaged record"),
        }
        // A whole file never CRC-checks its records (too costly); the damage is not seen.
        assert!(parse(&sparse, &none()).is_ok());
    }

    #[test]
    fn reads_the_table_with_byte_ranges() {
        let pkl = state_dict(&[
            ("a", "0", 6, 0, &[2, 3], &[3, 1]),
            ("b", "0", 6, 2, &[2, 2], &[1, 2]),
            ("c", "1", 2, 0, &[], &[]),
            ("d", "2", 0, 0, &[0, 4], &[4, 1]),
        ]);
        let bytes = archive(
            pkl,
            &[("0", vec![0; 24]), ("1", vec![0; 8]), ("2", vec![])],
            "little",
        );
        let p = ready(&bytes);
        assert_eq!(p.version, 3);
        assert_eq!(p.byteorder, Some(ByteOrder::Little));
        assert_eq!(p.archive, "ck");
        let table = p.table(&bytes).as_ref().unwrap();
        let names: Vec<&str> = table.entries.iter().map(|e| table.name(e)).collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
        assert_eq!(p.records.len(), 3);
        assert_eq!(p.records[0].tensors, 2);
        let a = &p.tensors[0];
        let b = &p.tensors[1];
        assert_eq!(a.end - a.start, 24);
        assert_eq!(a.start, p.records[0].start);
        assert_eq!(b.start, p.records[0].start + 8);
        assert_eq!(b.span, 4 * (1 + 1 + 2));
        assert_eq!(b.nbytes, 16);
        assert_eq!(p.tensors[2].nbytes, 4);
        assert_eq!((p.tensors[3].nbytes, p.tensors[3].span), (0, 0));
        assert_eq!(p.locations(&bytes), ["cpu"]);
    }

    #[test]
    fn nested_paths_follow_inspect() {
        // {"state_dict": {"w": t}, "opt": [{"s": t}], 3: t}
        let mut w = W::new();
        w.op(b'}')
            .put()
            .op(b'(')
            .str("state_dict")
            .op(b'}')
            .str("w");
        w.tensor("FloatStorage", "0", 1, 0, &[1], &[1])
            .put()
            .op(b's');
        w.str("opt")
            .op(b']')
            .op(b'}')
            .str("s")
            .get(1)
            .op(b's')
            .op(b'a');
        w.int(3).get(1).op(b'u');
        let bytes = archive(w.stop(), &[("0", vec![0; 4])], "little");
        let p = ready(&bytes);
        let table = p.table(&bytes).as_ref().unwrap();
        let names: Vec<&str> = table.entries.iter().map(|e| table.name(e)).collect();
        assert_eq!(names, ["state_dict.w", "opt.0.s", "3"]);
    }

    #[test]
    fn a_lone_tensor_is_the_top_level() {
        let mut w = W::new();
        w.tensor("FloatStorage", "0", 1, 0, &[1], &[1]);
        let bytes = archive(w.stop(), &[("0", vec![0; 4])], "big");
        let p = ready(&bytes);
        let table = p.table(&bytes).as_ref().unwrap();
        assert_eq!(table.name(&table.entries[0]), "<top level>");
        assert_eq!(p.byteorder, Some(ByteOrder::Big));
    }

    #[test]
    fn missing_records() {
        let pkl = state_dict(&[("a", "7", 1, 0, &[1], &[1])]);
        assert_eq!(
            kind(&archive(pkl, &[], "little")),
            PthErrorKind::MissingRecord
        );
        let e = vec![
            ZipEntry::new("ck/version", "3"),
            ZipEntry::new("ck/x/data.pkl", ""),
        ];
        assert_eq!(kind(&write(&e, false).0), PthErrorKind::MissingRecord);
    }

    #[test]
    fn crc_mismatch() {
        let pkl = state_dict(&[("a", "0", 1, 0, &[1], &[1])]);
        let mut bytes = archive(pkl, &[("0", vec![0; 4])], "little");
        let at = bytes.windows(3).position(|w| w == b"cpu").unwrap();
        bytes[at] = b'x';
        assert_eq!(kind(&bytes), PthErrorKind::CrcMismatch);
    }

    #[test]
    fn damaged_metadata_records_fail_their_crc() {
        let mut e = vec![
            ZipEntry::new("ck/data.pkl", state_dict(&[])),
            ZipEntry::new("ck/.storage_alignment", "64"),
            ZipEntry::new("ck/version", "3"),
        ];
        let (mut bytes, layout) = write(&e, false);
        bytes[layout.data[1]] = b'F';
        assert_eq!(kind(&bytes), PthErrorKind::CrcMismatch);
        e[1].data = b"65".to_vec();
        assert!(parse(&write(&e, false).0, &none()).is_ok());
    }

    #[test]
    fn bad_byteorder() {
        let pkl = state_dict(&[]);
        assert_eq!(
            kind(&archive(pkl, &[], "middle")),
            PthErrorKind::BadByteorder
        );
    }

    #[test]
    fn storage_size_mismatch() {
        let pkl = state_dict(&[("a", "0", 6, 0, &[6], &[1])]);
        let bytes = archive(pkl, &[("0", vec![0; 20])], "little");
        assert_eq!(kind(&bytes), PthErrorKind::StorageSizeMismatch);
    }

    #[test]
    fn tensor_out_of_bounds() {
        let cases: [(i32, &[i32], &[i32]); 4] = [
            (0, &[7], &[1]),
            (1, &[6], &[1]),
            (0, &[2, 3], &[4, 1]),
            (6, &[1], &[1]),
        ];
        for (offset, shape, stride) in cases {
            let pkl = state_dict(&[("a", "0", 6, offset, shape, stride)]);
            let bytes = archive(pkl, &[("0", vec![0; 24])], "little");
            assert_eq!(kind(&bytes), PthErrorKind::TensorOutOfBounds, "{shape:?}");
        }
        // Empty tensors may have any offset, as in torch.
        let pkl = state_dict(&[("a", "0", 6, 100, &[0], &[1])]);
        ready(&archive(pkl, &[("0", vec![0; 24])], "little"));
    }

    #[test]
    fn size_overflow() {
        let pkl = state_dict(&[("a", "0", 6, 0, &[i32::MAX, i32::MAX, i32::MAX], &[1, 1, 1])]);
        let bytes = archive(pkl, &[("0", vec![0; 24])], "little");
        assert_eq!(kind(&bytes), PthErrorKind::SizeOverflow);
    }

    #[test]
    fn zip_errors_keep_their_kind() {
        let pkl = state_dict(&[]);
        let bytes = archive(pkl, &[], "little");
        assert_eq!(
            kind(&bytes[..bytes.len() - 3]),
            PthErrorKind::Zip(ZipErrorKind::NoEndRecord)
        );
    }

    #[test]
    fn fallbacks_say_why() {
        let mut w = W::new();
        w.global("torch._utils", "_rebuild_qtensor")
            .op(b')')
            .op(b'R');
        let bytes = archive(w.stop(), &[], "little");
        match parse(&bytes, &none()).unwrap() {
            Contents::Fallback(r) => assert!(r.contains("torch._utils._rebuild_qtensor"), "{r}"),
            Contents::Ready(_) => panic!("ready"),
        }
        let e = vec![
            ZipEntry::new("ck/data.pkl", state_dict(&[])),
            ZipEntry::new("ck/version", "9"),
        ];
        match parse(&write(&e, false).0, &none()).unwrap() {
            Contents::Fallback(r) => assert!(r.contains("version"), "{r}"),
            Contents::Ready(_) => panic!("ready"),
        }
    }

    #[test]
    fn decimal_keys() {
        assert_eq!(decimal(b"0"), Some(0));
        assert_eq!(decimal(b"49193"), Some(49193));
        assert_eq!(decimal(b"007"), None);
        assert_eq!(decimal(b""), None);
        assert_eq!(decimal(b"-1"), None);
        assert_eq!(decimal(b"1234567890"), None);
        let index = RecordIndex::new(vec![(b"0", 3), (b"5", 4), (b"x", 5), (b"01", 6)]);
        assert_eq!(index.get(b"0"), Some(3));
        assert_eq!(index.get(b"5"), None);
        assert_eq!(index.get(b"1"), None);
        assert_eq!(index.get(b"x"), Some(5));
        assert_eq!(index.get(b"01"), Some(6));
    }

    #[test]
    fn every_kind_has_a_distinct_name() {
        let mut names: Vec<&str> = PthErrorKind::OWN.iter().map(|k| k.name()).collect();
        names.extend(ZipErrorKind::ALL.iter().map(|k| k.name()));
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n);
    }

    #[test]
    fn byteswap_follows_torch() {
        let mut buf: Vec<u8> = (0..16).collect();
        let span = Span { at: 0, len: 0 };
        let rec = |dtype: &str| Record {
            key: span,
            start: 0,
            size: 16,
            dtype: pickle::dtype_by_name(dtype).unwrap(),
            location: span,
            tensors: 1,
            fetch: None,
        };
        byteswap_records(&mut buf, &[rec("float32")]);
        assert_eq!(&buf[..8], &[3, 2, 1, 0, 7, 6, 5, 4]);
        let mut buf: Vec<u8> = (0..16).collect();
        byteswap_records(&mut buf, &[rec("complex64")]);
        assert_eq!(&buf[..8], &[3, 2, 1, 0, 7, 6, 5, 4]);
        let mut buf: Vec<u8> = (0..16).collect();
        byteswap_records(&mut buf, &[rec("uint8"), rec("bool")]);
        assert_eq!(buf, (0..16).collect::<Vec<u8>>());
    }

    proptest! {
        /// Accepted tensors always lie inside their records, whatever the sizes.
        #[test]
        fn accepted_tensors_lie_inside_their_records(
            numel in 0i32..64,
            offset in 0i32..70,
            shape in proptest::collection::vec(0i32..9, 0..4),
            stride in proptest::collection::vec(0i32..17, 4),
        ) {
            let stride = &stride[..shape.len()];
            let pkl = state_dict(&[("a", "0", numel, offset, &shape, stride)]);
            let bytes = archive(pkl, &[("0", vec![0; numel as usize * 4])], "little");
            match parse(&bytes, &none()) {
                Ok(Contents::Ready(p)) => {
                    let t = &p.tensors[0];
                    let r = &p.records[0];
                    if t.span > 0 {
                        prop_assert!(r.start <= t.start && t.end <= r.start + r.size);
                    }
                    prop_assert_eq!(t.end - t.start, t.span);
                }
                Ok(Contents::Fallback(r)) => prop_assert!(false, "fallback {}", r),
                Err(e) => prop_assert_eq!(e.kind, PthErrorKind::TensorOutOfBounds),
            }
        }

        #[test]
        fn parts_of_a_file_never_panic(
            cuts in prop::collection::vec((any::<prop::sample::Index>(), 0usize..70_000), 0..6),
        ) {
            let pkl = state_dict(&[("a", "0", 20_000, 0, &[20_000], &[1])]);
            let full = archive(pkl, &[("0", vec![7; 80_000])], "little");
            let mut known: Vec<(u64, u64)> = cuts
                .iter()
                .map(|(at, len)| {
                    let a = at.index(full.len());
                    (a as u64, (a + len).min(full.len()) as u64)
                })
                .collect();
            known.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::new();
            for (a, b) in known {
                match merged.last_mut() {
                    Some(last) if a <= last.1 => last.1 = last.1.max(b),
                    _ => merged.push((a, b)),
                }
            }
            let mut sparse = vec![0u8; full.len()];
            for &(a, b) in &merged {
                sparse[a as usize..b as usize].copy_from_slice(&full[a as usize..b as usize]);
            }
            match parse_known(&sparse, Known::Ranges(&merged), &none()) {
                Err(e) if e.kind == PthErrorKind::Zip(ZipErrorKind::Unfetched) => {
                    prop_assert!(e.need.iter().all(|&(a, b)| a < b && b <= full.len() as u64));
                    prop_assert!(e.need.iter().any(|&(a, b)| !Known::Ranges(&merged).has(a, b)));
                }
                Ok(Contents::Ready(p)) => prop_assert_eq!(p.tensors.len(), 1),
                other => prop_assert!(false, "{:?}", other.map(|_| ())),
            }
        }

        #[test]
        fn damaged_checkpoints_never_panic(at in any::<prop::sample::Index>(), value in any::<u8>()) {
            let pkl = state_dict(&[("a", "0", 6, 0, &[2, 3], &[3, 1]), ("b", "1", 2, 0, &[2], &[1])]);
            let mut bytes = archive(pkl, &[("0", vec![1; 24]), ("1", vec![2; 8])], "little");
            let i = at.index(bytes.len());
            bytes[i] = value;
            if let Ok(Contents::Ready(p)) = parse(&bytes, &none()) {
                for t in &p.tensors {
                    let r = &p.records[t.record as usize];
                    prop_assert!(t.span == 0 || (r.start <= t.start && t.end <= r.start + r.size));
                    prop_assert!(r.start + r.size <= bytes.len() as u64);
                }
            }
        }
    }
}
