//! The safetensors header reader: map a file read-only, validate its header completely, and
//! describe every tensor (name, dtype, shape, byte range) without touching tensor data.
//!
//! A safetensors file is an 8-byte little-endian header length `n`, `n` bytes of UTF-8 JSON,
//! then the data section. The JSON is an object: `"__metadata__"` (string to string, optional)
//! and one entry per tensor, `{"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}`
//! with offsets relative to the data section.
//!
//! Nothing in the header is trusted before it is checked: the length is capped and checked
//! against the file size before any allocation, every size is computed with checked
//! arithmetic, and the byte ranges must match their shapes, be ordered without holes or
//! overlaps, and cover the data section exactly. Unlike a plain `serde_json` map, a tensor name
//! that appears twice is an error: the JSON is walked with our own visitors, which see every
//! entry. Nothing here panics on any input; `cargo fuzz run header` in `fuzz/` checks that.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::path::Path;

use serde::de::{
    self, Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor,
};

/// The largest header accepted, in bytes (the limit of the safetensors crate).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// The header key that holds free-form string metadata instead of a tensor.
pub const METADATA_KEY: &str = "__metadata__";

/// Size of the little-endian header length that starts every file.
const LEN_PREFIX: u64 = 8;

/// Every element type of the safetensors format (0.8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    F4,
    F6E2M3,
    F6E3M2,
    U8,
    I8,
    F8E5M2,
    F8E4M3,
    F8E8M0,
    F8E4M3Fnuz,
    F8E5M2Fnuz,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    C64,
    F64,
    I64,
    U64,
}

/// `(dtype, name in safetensors headers, torch-style name, bits per element)`.
///
/// The torch-style names are `torch.<name>` where torch has the type; the sub-byte floats
/// (F4, F6_*) follow the same scheme (`float4_e2m1fn`, ...), though torch has no
/// one-element-per-value type for them.
const DTYPES: [(Dtype, &str, &str, u64); 22] = [
    (Dtype::Bool, "BOOL", "bool", 8),
    (Dtype::F4, "F4", "float4_e2m1fn", 4),
    (Dtype::F6E2M3, "F6_E2M3", "float6_e2m3fn", 6),
    (Dtype::F6E3M2, "F6_E3M2", "float6_e3m2fn", 6),
    (Dtype::U8, "U8", "uint8", 8),
    (Dtype::I8, "I8", "int8", 8),
    (Dtype::F8E5M2, "F8_E5M2", "float8_e5m2", 8),
    (Dtype::F8E4M3, "F8_E4M3", "float8_e4m3fn", 8),
    (Dtype::F8E8M0, "F8_E8M0", "float8_e8m0fnu", 8),
    (Dtype::F8E4M3Fnuz, "F8_E4M3FNUZ", "float8_e4m3fnuz", 8),
    (Dtype::F8E5M2Fnuz, "F8_E5M2FNUZ", "float8_e5m2fnuz", 8),
    (Dtype::I16, "I16", "int16", 16),
    (Dtype::U16, "U16", "uint16", 16),
    (Dtype::F16, "F16", "float16", 16),
    (Dtype::BF16, "BF16", "bfloat16", 16),
    (Dtype::I32, "I32", "int32", 32),
    (Dtype::U32, "U32", "uint32", 32),
    (Dtype::F32, "F32", "float32", 32),
    (Dtype::C64, "C64", "complex64", 64),
    (Dtype::F64, "F64", "float64", 64),
    (Dtype::I64, "I64", "int64", 64),
    (Dtype::U64, "U64", "uint64", 64),
];

impl Dtype {
    /// Every dtype, in the order of the safetensors crate.
    pub fn all() -> impl Iterator<Item = Dtype> {
        DTYPES.iter().map(|row| row.0)
    }

    /// The dtype a header names (`"F32"`), if it is one.
    pub fn from_name(name: &str) -> Option<Dtype> {
        DTYPES.iter().find(|row| row.1 == name).map(|row| row.0)
    }

    fn row(self) -> &'static (Dtype, &'static str, &'static str, u64) {
        // Every variant has exactly one row; the fallback is unreachable but keeps this total.
        DTYPES
            .iter()
            .find(|row| row.0 == self)
            .unwrap_or(&DTYPES[0])
    }

    /// The name in safetensors headers (`"BF16"`).
    pub fn name(self) -> &'static str {
        self.row().1
    }

    /// The torch-style name (`"bfloat16"`).
    pub fn torch_name(self) -> &'static str {
        self.row().2
    }

    /// Bits per element (sub-byte types pack several elements per byte).
    pub fn bits(self) -> u64 {
        self.row().3
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What is wrong with a header: one variant per check, so callers can branch on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HeaderErrorKind {
    /// Fewer than the 8 bytes of the header length.
    FileTooSmall,
    /// Header length 0.
    EmptyHeader,
    /// Header length over [`MAX_HEADER_LEN`].
    HeaderTooLarge,
    /// Header length past the end of the file.
    HeaderPastEof,
    /// Header bytes that are not UTF-8.
    NotUtf8,
    /// Header text that is not JSON (or has text after the JSON value).
    NotJson,
    /// JSON whose top level is not an object.
    NotAnObject,
    /// `__metadata__` that is not an object of strings (or repeats a key).
    InvalidMetadata,
    /// A tensor name (or `__metadata__`) that appears twice.
    DuplicateName,
    /// A tensor entry that is not an object, or a field of the wrong type.
    InvalidEntry,
    /// A tensor entry without `dtype`, `shape` or `data_offsets`.
    MissingField,
    /// A dtype that safetensors does not define.
    UnknownDtype,
    /// A shape that is not a list of non-negative integers.
    InvalidShape,
    /// `data_offsets` that are not two non-negative integers.
    InvalidOffsets,
    /// A shape whose size in bytes does not fit in 64 bits.
    SizeOverflow,
    /// `data_offsets` with end < begin.
    OffsetsReversed,
    /// A byte range whose length is not what the shape and dtype imply.
    SizeMismatch,
    /// Two tensors sharing bytes.
    Overlap,
    /// Bytes between two tensors (or before the first) that belong to none.
    Hole,
    /// Tensors reaching past the end of the file.
    DataTruncated,
    /// Bytes after the last tensor.
    TrailingBytes,
}

impl HeaderErrorKind {
    /// Every kind, for tests and documentation.
    pub const ALL: [HeaderErrorKind; 21] = [
        HeaderErrorKind::FileTooSmall,
        HeaderErrorKind::EmptyHeader,
        HeaderErrorKind::HeaderTooLarge,
        HeaderErrorKind::HeaderPastEof,
        HeaderErrorKind::NotUtf8,
        HeaderErrorKind::NotJson,
        HeaderErrorKind::NotAnObject,
        HeaderErrorKind::InvalidMetadata,
        HeaderErrorKind::DuplicateName,
        HeaderErrorKind::InvalidEntry,
        HeaderErrorKind::MissingField,
        HeaderErrorKind::UnknownDtype,
        HeaderErrorKind::InvalidShape,
        HeaderErrorKind::InvalidOffsets,
        HeaderErrorKind::SizeOverflow,
        HeaderErrorKind::OffsetsReversed,
        HeaderErrorKind::SizeMismatch,
        HeaderErrorKind::Overlap,
        HeaderErrorKind::Hole,
        HeaderErrorKind::DataTruncated,
        HeaderErrorKind::TrailingBytes,
    ];

    /// A stable snake_case name (`"header_too_large"`), the `kind` seen from Python.
    pub fn name(self) -> &'static str {
        match self {
            HeaderErrorKind::FileTooSmall => "file_too_small",
            HeaderErrorKind::EmptyHeader => "empty_header",
            HeaderErrorKind::HeaderTooLarge => "header_too_large",
            HeaderErrorKind::HeaderPastEof => "header_past_eof",
            HeaderErrorKind::NotUtf8 => "not_utf8",
            HeaderErrorKind::NotJson => "not_json",
            HeaderErrorKind::NotAnObject => "not_an_object",
            HeaderErrorKind::InvalidMetadata => "invalid_metadata",
            HeaderErrorKind::DuplicateName => "duplicate_name",
            HeaderErrorKind::InvalidEntry => "invalid_entry",
            HeaderErrorKind::MissingField => "missing_field",
            HeaderErrorKind::UnknownDtype => "unknown_dtype",
            HeaderErrorKind::InvalidShape => "invalid_shape",
            HeaderErrorKind::InvalidOffsets => "invalid_offsets",
            HeaderErrorKind::SizeOverflow => "size_overflow",
            HeaderErrorKind::OffsetsReversed => "offsets_reversed",
            HeaderErrorKind::SizeMismatch => "size_mismatch",
            HeaderErrorKind::Overlap => "overlap",
            HeaderErrorKind::Hole => "hole",
            HeaderErrorKind::DataTruncated => "data_truncated",
            HeaderErrorKind::TrailingBytes => "trailing_bytes",
        }
    }
}

impl fmt::Display for HeaderErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A rejected header: which check failed and the specifics (names, numbers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderError {
    pub kind: HeaderErrorKind,
    pub detail: String,
}

impl HeaderError {
    fn new(kind: HeaderErrorKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }

    /// The error for the file at `path`.
    pub fn at(self, path: &str) -> ReadError {
        ReadError::Header {
            path: path.to_owned(),
            kind: self.kind,
            detail: self.detail,
        }
    }
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

/// Why a file's header could not be read.
///
/// Kept beside [`crate::error::CoreError`] rather than inside it, so that adding it does not
/// touch the exhaustive matches on `CoreError` elsewhere; `py/errors.rs` converts both.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// A header that fails validation.
    #[error("{path}: invalid safetensors header ({kind}): {detail}")]
    Header {
        path: String,
        kind: HeaderErrorKind,
        detail: String,
    },
    /// An I/O failure, keeping its kind and errno so Python raises the right `OSError`.
    #[error("{path}: {detail}")]
    Io {
        path: String,
        kind: io::ErrorKind,
        errno: Option<i32>,
        detail: String,
    },
}

pub type ReadResult<T> = Result<T, ReadError>;

/// One tensor as the header describes it (offsets relative to the data section).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub begin: u64,
    pub end: u64,
}

/// A validated header: the tensors in file order and the metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The tensors in the order the JSON lists them.
    pub tensors: Vec<TensorEntry>,
    /// `__metadata__` in file order; `None` when absent or `null`.
    pub metadata: Option<Vec<(String, String)>>,
    /// The JSON's length in bytes (the file's first 8 bytes).
    pub header_len: u64,
    /// The size of the whole file.
    pub file_size: u64,
}

impl Header {
    /// Where the data section starts in the file.
    pub fn data_offset(&self) -> u64 {
        // header_len <= MAX_HEADER_LEN, so this cannot overflow.
        LEN_PREFIX + self.header_len
    }

    /// The absolute file byte range `(start, end)` of tensor `i`.
    pub fn file_range(&self, i: usize) -> Option<(u64, u64)> {
        let t = self.tensors.get(i)?;
        let base = self.data_offset();
        Some((base.checked_add(t.begin)?, base.checked_add(t.end)?))
    }
}

/// Parses and validates the safetensors file `bytes` (the whole file: the data section is
/// only measured, never read).
pub fn parse(bytes: &[u8]) -> Result<Header, HeaderError> {
    let file_size = bytes.len() as u64;
    let prefix: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| too_small(file_size))?;
    let header_len = header_len_of(prefix, file_size)?;
    // header_len_of checked 8 + header_len <= file_size, so the slice exists.
    let json = usize::try_from(LEN_PREFIX + header_len)
        .ok()
        .and_then(|end| bytes.get(8..end))
        .ok_or_else(|| past_eof(header_len, file_size))?;
    parse_header(json, file_size)
}

/// The header length that a file's first 8 bytes give, checked against the size of the whole
/// file: not 0, not over [`MAX_HEADER_LEN`], not past the end. For a file read in pieces (by
/// byte range): these 8 bytes first, then the header itself for [`parse_header`].
pub fn header_len_of(prefix: [u8; 8], file_size: u64) -> Result<u64, HeaderError> {
    use HeaderErrorKind as K;
    if file_size < LEN_PREFIX {
        return Err(too_small(file_size));
    }
    let header_len = u64::from_le_bytes(prefix);
    if header_len == 0 {
        return Err(HeaderError::new(K::EmptyHeader, "the header length is 0"));
    }
    if header_len > MAX_HEADER_LEN {
        return Err(HeaderError::new(
            K::HeaderTooLarge,
            format!("the header length {header_len} is over the limit of {MAX_HEADER_LEN} bytes"),
        ));
    }
    if LEN_PREFIX + header_len > file_size {
        return Err(past_eof(header_len, file_size));
    }
    Ok(header_len)
}

/// Parses and validates a header from its JSON bytes alone (the `header_len` bytes after the
/// length prefix), for a file of `file_size` bytes whose data section is not at hand: the
/// tensors' byte ranges are checked against the size of the data section that `file_size`
/// implies, exactly as [`parse`] checks them against the file it is given.
pub fn parse_header(json: &[u8], file_size: u64) -> Result<Header, HeaderError> {
    use HeaderErrorKind as K;
    let header_len = json.len() as u64;
    // The same checks of the length as for a whole file: not 0, capped, inside the file.
    header_len_of(header_len.to_le_bytes(), file_size)?;
    let text = std::str::from_utf8(json).map_err(|e| {
        HeaderError::new(
            K::NotUtf8,
            format!(
                "the header is not UTF-8 (invalid byte at header offset {})",
                e.valid_up_to()
            ),
        )
    })?;
    let (tensors, metadata) = parse_json(text)?;
    let header = Header {
        tensors,
        metadata,
        header_len,
        file_size,
    };
    // header_len_of checked data_offset <= file_size.
    validate_layout(&header.tensors, file_size - header.data_offset())?;
    Ok(header)
}

fn too_small(file_size: u64) -> HeaderError {
    HeaderError::new(
        HeaderErrorKind::FileTooSmall,
        format!("the file has {file_size} bytes, fewer than the 8 of the header length"),
    )
}

fn past_eof(header_len: u64, file_size: u64) -> HeaderError {
    HeaderError::new(
        HeaderErrorKind::HeaderPastEof,
        format!(
            "the header length {header_len} reaches past the end of the file ({file_size} bytes)"
        ),
    )
}

/// Maps the file at `path` read-only and parses its header.
pub fn read_path(path: &Path) -> ReadResult<Header> {
    let shown = path.display().to_string();
    // Stat first: opening a FIFO would block, and a directory opens fine on Linux.
    let meta = std::fs::metadata(path).map_err(|e| io_error(&shown, &e))?;
    check_regular(&shown, &meta)?;
    let file = File::open(path).map_err(|e| io_error(&shown, &e))?;
    read_file(&file, &shown)
}

/// Maps the open `file` read-only and parses its header; `path` is only for messages.
pub fn read_file(file: &File, path: &str) -> ReadResult<Header> {
    let meta = file.metadata().map_err(|e| io_error(path, &e))?;
    check_regular(path, &meta)?;
    if meta.len() < LEN_PREFIX {
        // Too small to map usefully; report it the same way as any short file.
        return parse(&[0u8; 8][..meta.len() as usize]).map_err(|e| e.at(path));
    }
    // SAFETY: the map is read-only and private to this call. Like every reader of mapped
    // files, it assumes the file is not truncated or rewritten while it is being parsed.
    let map = unsafe { memmap2::Mmap::map(file) }.map_err(|e| io_error(path, &e))?;
    advise_header_only(&map);
    parse(&map).map_err(|e| e.at(path))
}

/// Asks the kernel to read the header and nothing else: without this, the fault on the
/// first page reads the whole read-around window (often megabytes) of tensor data too.
/// Advice only: failures change nothing but speed.
fn advise_header_only(map: &memmap2::Mmap) {
    #[cfg(unix)]
    {
        use memmap2::Advice;
        let _ = map.advise(Advice::Random);
        let header_len = map
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
            .filter(|&n| n <= MAX_HEADER_LEN);
        if let Some(n) = header_len {
            // n <= MAX_HEADER_LEN, so this fits in usize and cannot overflow.
            let end = (LEN_PREFIX + n).min(map.len() as u64) as usize;
            let _ = map.advise_range(Advice::WillNeed, 0, end);
        }
    }
    #[cfg(not(unix))]
    let _ = map;
}

fn check_regular(path: &str, meta: &std::fs::Metadata) -> ReadResult<()> {
    if meta.is_file() {
        return Ok(());
    }
    if meta.is_dir() && cfg!(unix) {
        // EISDIR, so that Python raises IsADirectoryError.
        return Err(io_error(path, &io::Error::from_raw_os_error(21)));
    }
    Err(ReadError::Io {
        path: path.to_owned(),
        kind: io::ErrorKind::InvalidInput,
        errno: None,
        detail: "not a regular file".to_owned(),
    })
}

/// An I/O failure, keeping its kind and errno.
pub fn io_error(path: &str, err: &io::Error) -> ReadError {
    ReadError::Io {
        path: path.to_owned(),
        kind: err.kind(),
        errno: err.raw_os_error(),
        detail: err.to_string(),
    }
}

/// Checks sizes against shapes, then that the ranges tile `[0, data_len)` exactly.
fn validate_layout(tensors: &[TensorEntry], data_len: u64) -> Result<(), HeaderError> {
    use HeaderErrorKind as K;
    for t in tensors {
        let overflow = || {
            HeaderError::new(
                K::SizeOverflow,
                format!(
                    "tensor {:?}: shape {:?} of {} does not fit in 64 bits of bytes",
                    t.name, t.shape, t.dtype
                ),
            )
        };
        let numel = t
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(overflow)?;
        let bits = numel.checked_mul(t.dtype.bits()).ok_or_else(overflow)?;
        if t.end < t.begin {
            return Err(HeaderError::new(
                K::OffsetsReversed,
                format!(
                    "tensor {:?}: data_offsets [{}, {}] end before they begin",
                    t.name, t.begin, t.end
                ),
            ));
        }
        let len = t.end - t.begin;
        if bits % 8 != 0 || bits / 8 != len {
            return Err(HeaderError::new(
                K::SizeMismatch,
                format!(
                    "tensor {:?}: shape {:?} of {} needs {} bits, but data_offsets [{}, {}] \
                     hold {} bytes",
                    t.name, t.shape, t.dtype, bits, t.begin, t.end, len
                ),
            ));
        }
    }
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_unstable_by_key(|&i| tensors.get(i).map(|t| (t.begin, t.end)));
    let mut covered = 0u64;
    let mut last: Option<&TensorEntry> = None;
    for t in order.iter().filter_map(|&i| tensors.get(i)) {
        if t.begin > covered {
            let after = last.map_or_else(
                || "the start of the data".to_owned(),
                |p| format!("tensor {:?}", p.name),
            );
            return Err(HeaderError::new(
                K::Hole,
                format!(
                    "bytes {covered}..{} of the data belong to no tensor (between {after} and \
                     tensor {:?})",
                    t.begin, t.name
                ),
            ));
        }
        if t.begin < covered {
            let p = last.map_or("", |p| p.name.as_str());
            return Err(HeaderError::new(
                K::Overlap,
                format!(
                    "tensors {p:?} and {:?} overlap (data_offsets of {:?} begin at {}, before \
                     byte {covered})",
                    t.name, t.name, t.begin
                ),
            ));
        }
        covered = t.end;
        last = Some(t);
    }
    if covered > data_len {
        return Err(HeaderError::new(
            K::DataTruncated,
            format!(
                "the tensors need {covered} bytes of data but the file holds {data_len}: it is \
                 truncated"
            ),
        ));
    }
    if covered < data_len {
        return Err(HeaderError::new(
            K::TrailingBytes,
            format!(
                "the file has {} bytes after the last tensor (data section of {data_len} \
                 bytes, tensors cover {covered})",
                data_len - covered
            ),
        ));
    }
    Ok(())
}

// --- JSON ------------------------------------------------------------------------------------

type Metadata = Option<Vec<(String, String)>>;

/// Parses the header JSON, keeping every entry so duplicates are seen.
///
/// The visitors record why they stopped (`fault`): either a check of ours failed, or a
/// nested value had the wrong type (recorded where it happened, so the kind says which
/// field). Broken JSON is classified here, from `serde_json`'s own error category.
fn parse_json(text: &str) -> Result<(Vec<TensorEntry>, Metadata), HeaderError> {
    let mut fault = None;
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = TopSeed {
        fault: &mut fault,
        text_len: text.len(),
    }
    .deserialize(&mut de)
    .and_then(|value| de.end().map(|()| value));
    match parsed {
        Ok(value) => Ok(value),
        Err(e) if e.is_syntax() || e.is_eof() || e.is_io() => Err(HeaderError::new(
            HeaderErrorKind::NotJson,
            format!("the header is not valid JSON: {e}"),
        )),
        Err(e) => Err(fault.unwrap_or_else(|| {
            HeaderError::new(
                HeaderErrorKind::NotAnObject,
                format!("the header must be a JSON object: {e}"),
            )
        })),
    }
}

/// Records a failed check of ours; returns the error that stops `serde_json`.
fn fail<E: de::Error>(fault: &mut Option<HeaderError>, err: HeaderError) -> E {
    let message = err.detail.clone();
    fault.get_or_insert(err);
    E::custom(message)
}

/// On an error from a nested value, records `kind` unless a deeper level already recorded
/// something. (If the error turns out to be broken JSON, `parse_json` ignores the record.)
fn nested<E: de::Error>(
    fault: &mut Option<HeaderError>,
    err: E,
    kind: HeaderErrorKind,
    what: impl FnOnce() -> String,
) -> E {
    if fault.is_none() {
        *fault = Some(HeaderError::new(kind, format!("{} ({err})", what())));
    }
    err
}

struct TopSeed<'f> {
    fault: &'f mut Option<HeaderError>,
    text_len: usize,
}

impl<'de> DeserializeSeed<'de> for TopSeed<'_> {
    type Value = (Vec<TensorEntry>, Metadata);

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(TopVisitor {
            fault: self.fault,
            text_len: self.text_len,
        })
    }
}

struct TopVisitor<'f> {
    fault: &'f mut Option<HeaderError>,
    text_len: usize,
}

impl<'de> Visitor<'de> for TopVisitor<'_> {
    type Value = (Vec<TensorEntry>, Metadata);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of tensor entries")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let fault = self.fault;
        // An entry takes at least ~50 bytes of JSON: reserve for that many, at most.
        let mut tensors: Vec<TensorEntry> = Vec::with_capacity(self.text_len / 64);
        let mut metadata: Metadata = None;
        let mut seen_metadata = false;
        while let Some(key) = map.next_key::<String>()? {
            if key == METADATA_KEY {
                if seen_metadata {
                    return Err(fail(
                        fault,
                        HeaderError::new(
                            HeaderErrorKind::DuplicateName,
                            "\"__metadata__\" appears twice",
                        ),
                    ));
                }
                seen_metadata = true;
                metadata = map
                    .next_value_seed(MetadataSeed { fault: &mut *fault })
                    .map_err(|e| {
                        nested(&mut *fault, e, HeaderErrorKind::InvalidMetadata, || {
                            "\"__metadata__\" must be an object of strings".to_owned()
                        })
                    })?;
            } else {
                let entry = map
                    .next_value_seed(EntrySeed {
                        name: &key,
                        fault: &mut *fault,
                    })
                    .map_err(|e| {
                        nested(&mut *fault, e, HeaderErrorKind::InvalidEntry, || {
                            format!("tensor {key:?} must be an object")
                        })
                    })?;
                tensors.push(TensorEntry {
                    name: key,
                    dtype: entry.0,
                    shape: entry.1,
                    begin: entry.2 .0,
                    end: entry.2 .1,
                });
            }
        }
        if let Some(name) = first_duplicate(&tensors) {
            return Err(fail(
                fault,
                HeaderError::new(
                    HeaderErrorKind::DuplicateName,
                    format!("tensor {name:?} appears more than once"),
                ),
            ));
        }
        Ok((tensors, metadata))
    }
}

/// The first name that an earlier entry already has.
fn first_duplicate(tensors: &[TensorEntry]) -> Option<&str> {
    let mut seen: HashMap<&str, ()> = HashMap::with_capacity(tensors.len());
    tensors
        .iter()
        .find(|t| seen.insert(t.name.as_str(), ()).is_some())
        .map(|t| t.name.as_str())
}

struct MetadataSeed<'f> {
    fault: &'f mut Option<HeaderError>,
}

impl<'de> DeserializeSeed<'de> for MetadataSeed<'_> {
    type Value = Metadata;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for MetadataSeed<'_> {
    type Value = Metadata;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of string values, or null")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut items: Vec<(String, String)> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let value: String = map.next_value().map_err(|e| {
                nested(
                    &mut *self.fault,
                    e,
                    HeaderErrorKind::InvalidMetadata,
                    || format!("\"__metadata__\" value of {key:?} must be a string"),
                )
            })?;
            items.push((key, value));
        }
        let mut seen: HashMap<&str, ()> = HashMap::with_capacity(items.len());
        if let Some((key, _)) = items
            .iter()
            .find(|(k, _)| seen.insert(k.as_str(), ()).is_some())
        {
            let err = HeaderError::new(
                HeaderErrorKind::InvalidMetadata,
                format!("\"__metadata__\" has the key {key:?} more than once"),
            );
            return Err(fail(self.fault, err));
        }
        Ok(Some(items))
    }
}

type EntryValue = (Dtype, Vec<u64>, (u64, u64));

struct EntrySeed<'a, 'f> {
    name: &'a str,
    fault: &'f mut Option<HeaderError>,
}

impl<'de> DeserializeSeed<'de> for EntrySeed<'_, '_> {
    type Value = EntryValue;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EntrySeed<'_, '_> {
    type Value = EntryValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object with dtype, shape and data_offsets")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        use HeaderErrorKind as K;
        let name = self.name;
        let fault = self.fault;
        let mut dtype: Option<Dtype> = None;
        let mut shape: Option<Vec<u64>> = None;
        let mut offsets: Option<(u64, u64)> = None;
        while let Some(field) = map.next_key::<Field>()? {
            let repeated = match field {
                Field::Dtype => dtype.is_some(),
                Field::Shape => shape.is_some(),
                Field::DataOffsets => offsets.is_some(),
                Field::Other => false,
            };
            if repeated {
                let err = HeaderError::new(
                    K::InvalidEntry,
                    format!("tensor {name:?}: field {:?} appears twice", field.name()),
                );
                return Err(fail(fault, err));
            }
            match field {
                Field::Dtype => {
                    let value: DtypeValue = map.next_value().map_err(|e| {
                        nested(&mut *fault, e, K::InvalidEntry, || {
                            format!("tensor {name:?}: dtype must be a string")
                        })
                    })?;
                    match value {
                        DtypeValue::Known(d) => dtype = Some(d),
                        DtypeValue::Unknown(text) => {
                            let known: Vec<&str> = DTYPES.iter().map(|row| row.1).collect();
                            let err = HeaderError::new(
                                K::UnknownDtype,
                                format!(
                                    "tensor {name:?}: unknown dtype {text:?} (safetensors \
                                     defines {})",
                                    known.join(", ")
                                ),
                            );
                            return Err(fail(fault, err));
                        }
                    }
                }
                Field::Shape => {
                    let value: Vec<u64> = map.next_value().map_err(|e| {
                        nested(&mut *fault, e, K::InvalidShape, || {
                            format!(
                                "tensor {name:?}: shape must be a list of non-negative integers"
                            )
                        })
                    })?;
                    shape = Some(value);
                }
                Field::DataOffsets => {
                    let value = map
                        .next_value_seed(OffsetsSeed {
                            name,
                            fault: &mut *fault,
                        })
                        .map_err(|e| {
                            nested(&mut *fault, e, K::InvalidOffsets, || {
                                format!(
                                    "tensor {name:?}: data_offsets must be two non-negative \
                                     integers"
                                )
                            })
                        })?;
                    offsets = Some(value);
                }
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        match (dtype, shape, offsets) {
            (Some(d), Some(s), Some(o)) => Ok((d, s, o)),
            (d, s, o) => {
                let missing: Vec<&str> = [
                    ("dtype", d.is_none()),
                    ("shape", s.is_none()),
                    ("data_offsets", o.is_none()),
                ]
                .iter()
                .filter(|(_, absent)| *absent)
                .map(|(f, _)| *f)
                .collect();
                let err = HeaderError::new(
                    K::MissingField,
                    format!("tensor {name:?} has no {}", missing.join(", no ")),
                );
                Err(fail(fault, err))
            }
        }
    }
}

/// A field of a tensor entry, read without allocating.
#[derive(Clone, Copy)]
enum Field {
    Dtype,
    Shape,
    DataOffsets,
    Other,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::Dtype => "dtype",
            Field::Shape => "shape",
            Field::DataOffsets => "data_offsets",
            Field::Other => "?",
        }
    }
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldVisitor;
        impl Visitor<'_> for FieldVisitor {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Field, E> {
                Ok(match v {
                    "dtype" => Field::Dtype,
                    "shape" => Field::Shape,
                    "data_offsets" => Field::DataOffsets,
                    _ => Field::Other,
                })
            }
        }
        d.deserialize_identifier(FieldVisitor)
    }
}

/// A dtype string: a known dtype (read without allocating), or the unknown text.
enum DtypeValue {
    Known(Dtype),
    Unknown(String),
}

impl<'de> Deserialize<'de> for DtypeValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct DtypeVisitor;
        impl Visitor<'_> for DtypeVisitor {
            type Value = DtypeValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a dtype name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DtypeValue, E> {
                Ok(Dtype::from_name(v)
                    .map_or_else(|| DtypeValue::Unknown(v.to_owned()), DtypeValue::Known))
            }
        }
        d.deserialize_str(DtypeVisitor)
    }
}

struct OffsetsSeed<'a, 'f> {
    name: &'a str,
    fault: &'f mut Option<HeaderError>,
}

impl<'de> DeserializeSeed<'de> for OffsetsSeed<'_, '_> {
    type Value = (u64, u64);

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for OffsetsSeed<'_, '_> {
    type Value = (u64, u64);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of two non-negative integers")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let begin = seq.next_element::<u64>()?;
        let end = match begin {
            Some(_) => seq.next_element::<u64>()?,
            None => None,
        };
        let extra = match end {
            Some(_) => seq.next_element::<IgnoredAny>()?.is_some(),
            None => false,
        };
        match (begin, end) {
            (Some(b), Some(e)) if !extra => Ok((b, e)),
            _ => {
                let count = if extra {
                    "more than 2 entries".to_owned()
                } else {
                    format!("{} entries", usize::from(begin.is_some()))
                };
                let err = HeaderError::new(
                    HeaderErrorKind::InvalidOffsets,
                    format!(
                        "tensor {:?}: data_offsets must be [begin, end], got {count}",
                        self.name
                    ),
                );
                Err(fail(self.fault, err))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A file: the header JSON, padded with `pad` spaces, then `data` zero bytes.
    fn file(json: &str, pad: usize, data: usize) -> Vec<u8> {
        let mut out = ((json.len() + pad) as u64).to_le_bytes().to_vec();
        out.extend_from_slice(json.as_bytes());
        out.extend(std::iter::repeat_n(b' ', pad));
        out.extend(std::iter::repeat_n(0u8, data));
        out
    }

    fn kind_of(bytes: &[u8]) -> HeaderErrorKind {
        match parse(bytes) {
            Ok(h) => panic!("accepted: {h:?}"),
            Err(e) => {
                assert!(!e.detail.is_empty());
                e.kind
            }
        }
    }

    fn kind_of_json(json: &str, data: usize) -> HeaderErrorKind {
        kind_of(&file(json, 0, data))
    }

    const GOOD: &str = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},"a":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]}}"#;

    #[test]
    fn parses_a_valid_header_in_file_order() {
        let bytes = file(GOOD, 3, 16);
        let h = parse(&bytes).unwrap();
        assert_eq!(h.header_len, GOOD.len() as u64 + 3);
        assert_eq!(h.data_offset(), 8 + GOOD.len() as u64 + 3);
        assert_eq!(h.file_size, bytes.len() as u64);
        let names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["b", "a"]);
        assert_eq!(h.tensors[1].dtype, Dtype::BF16);
        assert_eq!(h.tensors[1].shape, [2, 2]);
        assert_eq!(
            h.file_range(0),
            Some((h.data_offset() + 8, h.data_offset() + 16))
        );
        assert_eq!(h.file_range(2), None);
        assert_eq!(h.metadata, Some(vec![("format".into(), "pt".into())]));
    }

    #[test]
    fn accepts_empty_files_null_metadata_scalars_and_zero_sized_tensors() {
        assert!(parse(&file("{}", 0, 0)).unwrap().tensors.is_empty());
        let h = parse(&file(r#"{"__metadata__":null}"#, 0, 0)).unwrap();
        assert_eq!(h.metadata, None);
        let json = r#"{"s":{"dtype":"I64","shape":[],"data_offsets":[0,8]},"z":{"dtype":"F32","shape":[0,4],"data_offsets":[8,8]},"e":{"dtype":"U8","shape":[0],"data_offsets":[8,8]}}"#;
        let h = parse(&file(json, 0, 8)).unwrap();
        assert_eq!(h.tensors.len(), 3);
        assert_eq!(h.tensors[0].shape, Vec::<u64>::new());
    }

    #[test]
    fn ignores_unknown_fields_like_safetensors() {
        let json = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"extra":[[{"x":1}]]}}"#;
        assert_eq!(parse(&file(json, 0, 1)).unwrap().tensors.len(), 1);
    }

    #[test]
    fn sub_byte_dtypes_need_whole_bytes() {
        let json = r#"{"a":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}"#;
        assert_eq!(
            parse(&file(json, 0, 2)).unwrap().tensors[0].dtype,
            Dtype::F4
        );
        let json = r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#;
        assert_eq!(kind_of_json(json, 2), HeaderErrorKind::SizeMismatch);
        let json = r#"{"a":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[0,3]}}"#;
        assert!(parse(&file(json, 0, 3)).is_ok());
    }

    #[test]
    fn every_dtype_round_trips_its_names() {
        for d in Dtype::all() {
            assert_eq!(Dtype::from_name(d.name()), Some(d));
            assert!(d.bits() > 0 && !d.torch_name().is_empty());
            assert_eq!(d.to_string(), d.name());
        }
        assert_eq!(Dtype::from_name("f32"), None);
        assert_eq!(Dtype::all().count(), DTYPES.len());
    }

    #[test]
    fn kind_names_are_unique_snake_case() {
        let names: std::collections::HashSet<&str> =
            HeaderErrorKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), HeaderErrorKind::ALL.len());
        assert!(names.iter().all(|n| n
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')));
    }

    // --- one test per error kind ---

    #[test]
    fn file_too_small() {
        for n in 0..8 {
            assert_eq!(kind_of(&vec![0u8; n]), HeaderErrorKind::FileTooSmall);
        }
    }

    #[test]
    fn empty_header() {
        assert_eq!(kind_of(&[0u8; 8]), HeaderErrorKind::EmptyHeader);
        assert_eq!(kind_of(&[0u8; 64]), HeaderErrorKind::EmptyHeader);
    }

    #[test]
    fn header_too_large() {
        for n in [MAX_HEADER_LEN + 1, u64::MAX, u64::MAX - 7, 1 << 63] {
            let mut bytes = n.to_le_bytes().to_vec();
            bytes.extend_from_slice(b"{}");
            assert_eq!(kind_of(&bytes), HeaderErrorKind::HeaderTooLarge, "{n}");
        }
    }

    #[test]
    fn header_past_eof() {
        let mut bytes = 3u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert_eq!(kind_of(&bytes), HeaderErrorKind::HeaderPastEof);
        let mut bytes = MAX_HEADER_LEN.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert_eq!(kind_of(&bytes), HeaderErrorKind::HeaderPastEof);
    }

    #[test]
    fn not_utf8() {
        let mut bytes = 4u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{\"\xff\"");
        assert_eq!(kind_of(&bytes), HeaderErrorKind::NotUtf8);
    }

    #[test]
    fn not_json() {
        for json in [
            "{",
            "{\"a\"",
            "{\"a\":}",
            "nonsense",
            "{} {}",
            "{}x",
            "{,}",
            "{\"a\":{\"dtype\":\"F32\",}}",
            "\u{0}",
        ] {
            assert_eq!(kind_of_json(json, 0), HeaderErrorKind::NotJson, "{json}");
        }
        // Numbers past f64 are broken JSON for serde_json.
        let json = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1e400]}}"#;
        assert_eq!(kind_of_json(json, 1), HeaderErrorKind::NotJson);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        for (json, kind) in [
            (deep.clone(), HeaderErrorKind::NotAnObject),
            (
                format!(r#"{{"a":{{"x":{deep}}}}}"#),
                HeaderErrorKind::MissingField,
            ),
            (format!(r#"{{"a":{deep}}}"#), HeaderErrorKind::InvalidEntry),
            (
                format!(r#"{{"__metadata__":{{"k":{deep}}}}}"#),
                HeaderErrorKind::InvalidMetadata,
            ),
            ("{\"a\":".repeat(100_000), HeaderErrorKind::NotJson),
        ] {
            assert_eq!(kind_of_json(&json, 0), kind);
        }
    }

    #[test]
    fn not_an_object() {
        for json in ["[]", "1", "\"x\"", "null", "true", "[{}]"] {
            assert_eq!(
                kind_of_json(json, 0),
                HeaderErrorKind::NotAnObject,
                "{json}"
            );
        }
    }

    #[test]
    fn invalid_metadata() {
        for json in [
            r#"{"__metadata__":{"a":1}}"#,
            r#"{"__metadata__":{"a":null}}"#,
            r#"{"__metadata__":{"a":{"b":"c"}}}"#,
            r#"{"__metadata__":[]}"#,
            r#"{"__metadata__":"x"}"#,
            r#"{"__metadata__":{"a":"1","a":"2"}}"#,
        ] {
            assert_eq!(
                kind_of_json(json, 0),
                HeaderErrorKind::InvalidMetadata,
                "{json}"
            );
        }
    }

    #[test]
    fn duplicate_name() {
        let t = r#"{"dtype":"U8","shape":[1],"data_offsets":[0,1]}"#;
        let json = format!(r#"{{"a":{t},"a":{t}}}"#);
        let err = parse(&file(&json, 0, 1)).unwrap_err();
        assert_eq!(err.kind, HeaderErrorKind::DuplicateName);
        assert!(err.detail.contains("\"a\""), "{}", err.detail);
        let json = r#"{"__metadata__":{},"__metadata__":{}}"#;
        assert_eq!(kind_of_json(json, 0), HeaderErrorKind::DuplicateName);
        // The same name spelled with an escape is the same name.
        let json = format!(r#"{{"a":{t},"\u0061":{t}}}"#);
        assert_eq!(kind_of_json(&json, 1), HeaderErrorKind::DuplicateName);
    }

    #[test]
    fn invalid_entry() {
        for json in [
            r#"{"a":1}"#,
            r#"{"a":"F32"}"#,
            r#"{"a":[]}"#,
            r#"{"a":null}"#,
            r#"{"a":{"dtype":5,"shape":[1],"data_offsets":[0,1]}}"#,
            r#"{"a":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
        ] {
            assert_eq!(
                kind_of_json(json, 1),
                HeaderErrorKind::InvalidEntry,
                "{json}"
            );
        }
    }

    #[test]
    fn missing_field() {
        for json in [
            r#"{"a":{}}"#,
            r#"{"a":{"shape":[1],"data_offsets":[0,1]}}"#,
            r#"{"a":{"dtype":"U8","data_offsets":[0,1]}}"#,
            r#"{"a":{"dtype":"U8","shape":[1]}}"#,
        ] {
            assert_eq!(
                kind_of_json(json, 1),
                HeaderErrorKind::MissingField,
                "{json}"
            );
        }
    }

    #[test]
    fn unknown_dtype() {
        for dtype in ["F128", "f32", "", "C128", "F32 "] {
            let json = format!(r#"{{"a":{{"dtype":"{dtype}","shape":[1],"data_offsets":[0,4]}}}}"#);
            assert_eq!(
                kind_of_json(&json, 4),
                HeaderErrorKind::UnknownDtype,
                "{dtype}"
            );
        }
    }

    #[test]
    fn invalid_shape() {
        for shape in [
            "[-1]",
            "[1.5]",
            "[1e3]",
            "[18446744073709551616]",
            "4",
            "null",
            "[\"1\"]",
            "{}",
        ] {
            let json = format!(r#"{{"a":{{"dtype":"U8","shape":{shape},"data_offsets":[0,1]}}}}"#);
            assert_eq!(
                kind_of_json(&json, 1),
                HeaderErrorKind::InvalidShape,
                "{shape}"
            );
        }
    }

    #[test]
    fn invalid_offsets() {
        for offsets in [
            "[]",
            "[0]",
            "[0,1,2]",
            "[-1,0]",
            "[0,1.0]",
            "[0,18446744073709551616]",
            "1",
            "{\"0\":0}",
            "null",
        ] {
            let json = format!(r#"{{"a":{{"dtype":"U8","shape":[1],"data_offsets":{offsets}}}}}"#);
            assert_eq!(
                kind_of_json(&json, 1),
                HeaderErrorKind::InvalidOffsets,
                "{offsets}"
            );
        }
    }

    #[test]
    fn size_overflow() {
        for (dtype, shape) in [
            ("U8", "[4294967296,4294967296]"),
            ("F64", "[2305843009213693952]"),
            ("U8", "[18446744073709551615,2]"),
            ("F4", "[18446744073709551615]"),
        ] {
            let json =
                format!(r#"{{"a":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[0,8]}}}}"#);
            assert_eq!(
                kind_of_json(&json, 8),
                HeaderErrorKind::SizeOverflow,
                "{shape}"
            );
        }
    }

    #[test]
    fn offsets_reversed() {
        let json = r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}"#;
        assert_eq!(kind_of_json(json, 4), HeaderErrorKind::OffsetsReversed);
    }

    #[test]
    fn size_mismatch() {
        for offsets in ["[0,3]", "[0,5]", "[0,0]"] {
            let json = format!(r#"{{"a":{{"dtype":"F32","shape":[1],"data_offsets":{offsets}}}}}"#);
            assert_eq!(
                kind_of_json(&json, 4),
                HeaderErrorKind::SizeMismatch,
                "{offsets}"
            );
        }
    }

    #[test]
    fn overlap() {
        let json = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#;
        assert_eq!(kind_of_json(json, 6), HeaderErrorKind::Overlap);
        // Two names for the same bytes.
        let json = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
        assert_eq!(kind_of_json(json, 4), HeaderErrorKind::Overlap);
    }

    #[test]
    fn hole() {
        let json = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[6,10]}}"#;
        assert_eq!(kind_of_json(json, 10), HeaderErrorKind::Hole);
        let json = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#;
        assert_eq!(kind_of_json(json, 6), HeaderErrorKind::Hole);
    }

    #[test]
    fn data_truncated() {
        let json = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        assert_eq!(kind_of_json(json, 15), HeaderErrorKind::DataTruncated);
        assert_eq!(kind_of_json(json, 0), HeaderErrorKind::DataTruncated);
        let json = r#"{"a":{"dtype":"U8","shape":[1152921504606846976],"data_offsets":[0,1152921504606846976]}}"#;
        assert_eq!(kind_of_json(json, 1), HeaderErrorKind::DataTruncated);
    }

    #[test]
    fn trailing_bytes() {
        let json = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        assert_eq!(kind_of_json(json, 17), HeaderErrorKind::TrailingBytes);
        assert_eq!(kind_of_json("{}", 1), HeaderErrorKind::TrailingBytes);
    }

    #[test]
    fn every_kind_has_a_test_case() {
        // One input per kind, in the order of ALL: keeps ALL (and so the Python names) in step
        // with the enum, and proves each kind is reachable.
        let t = |dtype: &str, shape: &str, offsets: &str| {
            format!(r#"{{"dtype":"{dtype}","shape":{shape},"data_offsets":{offsets}}}"#)
        };
        let f32_4 = t("F32", "[]", "[0,4]");
        let mut not_utf8 = 2u64.to_le_bytes().to_vec();
        not_utf8.extend([0xff, 0xfe]);
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0; 8],
            u64::MAX.to_le_bytes().to_vec(),
            file("{}", 0, 0)[..9].to_vec(),
            not_utf8,
            file("{x", 0, 0),
            file("[]", 0, 0),
            file(r#"{"__metadata__":{"a":1}}"#, 0, 0),
            file(&format!(r#"{{"a":{f32_4},"a":{f32_4}}}"#), 0, 4),
            file(r#"{"a":5}"#, 0, 0),
            file(r#"{"a":{"dtype":"F32","shape":[]}}"#, 0, 4),
            file(&format!(r#"{{"a":{}}}"#, t("X9", "[]", "[0,4]")), 0, 4),
            file(&format!(r#"{{"a":{}}}"#, t("F32", "[-1]", "[0,4]")), 0, 4),
            file(&format!(r#"{{"a":{}}}"#, t("F32", "[]", "[0]")), 0, 4),
            file(
                &format!(
                    r#"{{"a":{}}}"#,
                    t("F32", "[4294967296,4294967296]", "[0,4]")
                ),
                0,
                4,
            ),
            file(&format!(r#"{{"a":{}}}"#, t("F32", "[]", "[4,0]")), 0, 4),
            file(&format!(r#"{{"a":{}}}"#, t("F32", "[]", "[0,2]")), 0, 2),
            file(
                &format!(r#"{{"a":{f32_4},"b":{}}}"#, t("F32", "[]", "[2,6]")),
                0,
                6,
            ),
            file(&format!(r#"{{"a":{}}}"#, t("F32", "[]", "[2,6]")), 0, 6),
            file(&format!(r#"{{"a":{f32_4}}}"#), 0, 2),
            file(&format!(r#"{{"a":{f32_4}}}"#), 0, 5),
        ];
        let seen: Vec<HeaderErrorKind> = cases.iter().map(|c| kind_of(c)).collect();
        assert_eq!(seen, HeaderErrorKind::ALL);
    }

    // --- a header fetched apart from its file (remote reads by byte range) ---

    /// Parses `bytes` the way a reader by byte range does: the 8-byte prefix, then the header
    /// alone, with only the file size known.
    fn parse_in_pieces(bytes: &[u8]) -> Result<Header, HeaderError> {
        let size = bytes.len() as u64;
        let prefix: [u8; 8] = match bytes.get(..8) {
            Some(p) => p.try_into().unwrap(),
            None => [0; 8],
        };
        let n = header_len_of(prefix, size)?;
        parse_header(&bytes[8..8 + n as usize], size)
    }

    #[test]
    fn header_len_of_checks_the_length_against_the_file_size() {
        use HeaderErrorKind as K;
        let kind =
            |prefix: u64, size: u64| header_len_of(prefix.to_le_bytes(), size).unwrap_err().kind;
        assert_eq!(header_len_of(10u64.to_le_bytes(), 18), Ok(10));
        assert_eq!(header_len_of(10u64.to_le_bytes(), 1 << 40), Ok(10));
        assert_eq!(kind(10, 7), K::FileTooSmall);
        assert_eq!(kind(0, 100), K::EmptyHeader);
        assert_eq!(kind(MAX_HEADER_LEN + 1, u64::MAX), K::HeaderTooLarge);
        assert_eq!(kind(u64::MAX, u64::MAX), K::HeaderTooLarge);
        assert_eq!(kind(11, 18), K::HeaderPastEof);
        assert_eq!(
            header_len_of(MAX_HEADER_LEN.to_le_bytes(), u64::MAX),
            Ok(MAX_HEADER_LEN)
        );
    }

    #[test]
    fn parse_header_measures_the_data_section_from_the_file_size() {
        use HeaderErrorKind as K;
        let json = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let n = json.len() as u64;
        let h = parse_header(json.as_bytes(), 8 + n + 16).unwrap();
        assert_eq!(h, parse(&file(json, 0, 16)).unwrap());
        assert_eq!(h.file_range(0), Some((8 + n, 8 + n + 16)));
        let kind = |size: u64| parse_header(json.as_bytes(), size).unwrap_err().kind;
        assert_eq!(kind(8 + n + 15), K::DataTruncated);
        assert_eq!(kind(8 + n + 17), K::TrailingBytes);
        assert_eq!(kind(8 + n - 1), K::HeaderPastEof);
        assert_eq!(kind(7), K::FileTooSmall);
        assert_eq!(parse_header(b"", 100).unwrap_err().kind, K::EmptyHeader);
        assert_eq!(parse_header(b"{\xff}", 100).unwrap_err().kind, K::NotUtf8);
        assert_eq!(parse_header(b"{x", 100).unwrap_err().kind, K::NotJson);
    }

    #[test]
    fn parse_in_pieces_agrees_with_parse_on_every_kind() {
        // The inputs of every_kind_has_a_test_case and the corpus files give the same header
        // or the same error either way.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/header");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            assert_eq!(parse_in_pieces(&bytes), parse(&bytes));
            seen += 1;
        }
        assert!(seen > 40, "{seen} corpus files");
    }

    // --- files ---

    fn temp_path(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("ckptmap-header-{}-{tag}", std::process::id()))
    }

    #[test]
    fn reads_files_and_keeps_io_error_kinds() {
        let path = temp_path("good");
        std::fs::write(&path, file(GOOD, 0, 16)).unwrap();
        let h = read_path(&path).unwrap();
        assert_eq!(h.tensors.len(), 2);
        let short = temp_path("short");
        std::fs::write(&short, [1u8, 2]).unwrap();
        match read_path(&short) {
            Err(ReadError::Header { kind, path, .. }) => {
                assert_eq!(kind, HeaderErrorKind::FileTooSmall);
                assert!(path.ends_with("short"));
            }
            other => panic!("{other:?}"),
        }
        std::fs::write(&short, []).unwrap();
        assert!(matches!(read_path(&short), Err(ReadError::Header { .. })));
        let missing = temp_path("missing");
        match read_path(&missing) {
            Err(ReadError::Io { kind, errno, .. }) => {
                assert_eq!(kind, io::ErrorKind::NotFound);
                assert_eq!(errno, Some(2));
            }
            other => panic!("{other:?}"),
        }
        match read_path(&std::env::temp_dir()) {
            Err(ReadError::Io { errno, .. }) => assert_eq!(errno, Some(21)),
            other => panic!("{other:?}"),
        }
        let err = read_path(Path::new("/dev/null")).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        for p in [path, short] {
            std::fs::remove_file(p).unwrap();
        }
    }

    // --- round trip ---

    fn json_string(s: &str) -> String {
        serde_json::to_string(s).unwrap()
    }

    /// Writes a header for `tensors` laid out in `layout` order, with `pad` trailing spaces.
    fn write(
        tensors: &[(String, Dtype, Vec<u64>)],
        layout: &[usize],
        metadata: &Option<Vec<(String, String)>>,
        pad: usize,
    ) -> (Vec<u8>, Vec<TensorEntry>) {
        let mut offsets = vec![(0u64, 0u64); tensors.len()];
        let mut at = 0u64;
        for &i in layout {
            let (_, dtype, shape) = &tensors[i];
            let len = shape.iter().product::<u64>() * dtype.bits() / 8;
            offsets[i] = (at, at + len);
            at += len;
        }
        let mut parts = Vec::new();
        if let Some(items) = metadata {
            let inner: Vec<String> = items
                .iter()
                .map(|(k, v)| format!("{}:{}", json_string(k), json_string(v)))
                .collect();
            parts.push(format!("\"__metadata__\":{{{}}}", inner.join(",")));
        }
        let mut expected = Vec::new();
        for (i, (name, dtype, shape)) in tensors.iter().enumerate() {
            let (b, e) = offsets[i];
            parts.push(format!(
                "{}:{{\"dtype\":\"{}\",\"shape\":{:?},\"data_offsets\":[{b},{e}]}}",
                json_string(name),
                dtype.name(),
                shape
            ));
            expected.push(TensorEntry {
                name: name.clone(),
                dtype: *dtype,
                shape: shape.clone(),
                begin: b,
                end: e,
            });
        }
        let json = format!("{{{}}}", parts.join(","));
        (file(&json, pad, at as usize), expected)
    }

    fn dtype() -> impl Strategy<Value = Dtype> {
        // Whole-byte types only: sub-byte shapes need an even element count (tested above).
        prop::sample::select(
            Dtype::all()
                .filter(|d| d.bits() % 8 == 0)
                .collect::<Vec<_>>(),
        )
    }

    fn tensors() -> impl Strategy<Value = Vec<(String, Dtype, Vec<u64>)>> {
        prop::collection::btree_map(
            "[a-z0-9._\\\\\"é😀]{1,12}".prop_filter("not metadata", |n| n != METADATA_KEY),
            (dtype(), prop::collection::vec(0u64..5, 0..4)),
            0..12,
        )
        .prop_map(|m| m.into_iter().map(|(n, (d, s))| (n, d, s)).collect())
        .prop_shuffle()
    }

    proptest! {
        #[test]
        fn round_trip(
            tensors in tensors(),
            seed in any::<u64>(),
            metadata in prop::option::of(prop::collection::btree_map("[a-z\"\\\\]{0,6}", "[ -~é]{0,6}", 0..4)),
            pad in 0usize..9,
        ) {
            let mut layout: Vec<usize> = (0..tensors.len()).collect();
            // A deterministic shuffle: data order differs from header order.
            layout.sort_by_key(|&i| (i as u64 + 1).wrapping_mul(seed | 1).rotate_left(17));
            let metadata = metadata.map(|m| m.into_iter().collect::<Vec<_>>());
            let (bytes, expected) = write(&tensors, &layout, &metadata, pad);
            let h = parse(&bytes).unwrap();
            prop_assert_eq!(&h.tensors, &expected);
            prop_assert_eq!(&h.metadata, &metadata);
            prop_assert_eq!(h.file_size, bytes.len() as u64);
            for i in 0..h.tensors.len() {
                let (s, e) = h.file_range(i).unwrap();
                prop_assert!(s >= h.data_offset() && e <= h.file_size && s <= e);
            }
        }

        #[test]
        fn header_in_pieces_equals_the_whole_file(
            tensors in tensors(),
            pad in 0usize..9,
            i in 0usize..300,
            b in any::<u8>(),
            cut in 0usize..40,
        ) {
            let layout: Vec<usize> = (0..tensors.len()).collect();
            let (mut bytes, _) = write(&tensors, &layout, &None, pad);
            if let Some(x) = bytes.get_mut(i) {
                *x = b;
            }
            bytes.truncate(bytes.len().saturating_sub(cut));
            prop_assert_eq!(parse_in_pieces(&bytes), parse(&bytes));
        }

        #[test]
        fn arbitrary_headers_and_sizes_never_panic(
            json in prop::collection::vec(any::<u8>(), 0..64),
            size in any::<u64>(),
        ) {
            if let Ok(h) = parse_header(&json, size) {
                for i in 0..h.tensors.len() {
                    let (s, e) = h.file_range(i).unwrap();
                    prop_assert!(h.data_offset() <= s && s <= e && e <= h.file_size);
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn mangled_valid_files_never_panic(i in 0usize..200, b in any::<u8>(), cut in 0usize..200) {
            let mut bytes = file(GOOD, 2, 16);
            if let Some(x) = bytes.get_mut(i) {
                *x = b;
            }
            bytes.truncate(bytes.len().saturating_sub(cut % 24));
            if let Ok(h) = parse(&bytes) {
                for i in 0..h.tensors.len() {
                    let (s, e) = h.file_range(i).unwrap();
                    prop_assert!(e <= h.file_size && s <= e);
                }
            }
        }
    }
}
