//! A strict reader of the zip archives that `torch.save` writes: the member table, checked
//! before any offset is trusted, and nothing else.
//!
//! `torch.save` (through miniz) writes every member STORED (uncompressed), each local header
//! padded so the data starts on a 64-byte boundary, a data descriptor after each member's data,
//! the central directory, and, when there are more than 65,535 members or offsets past 4 GiB,
//! the zip64 end records. This reader accepts exactly that shape of archive and reports
//! anything else as a typed error: it never guesses. Checked here:
//!
//! - the end-of-central-directory record ends exactly at the end of the file, the central
//!   directory lies before it and is followed by it (or by the zip64 end records) directly;
//! - one disk only; zip64 end records and zip64 extra fields are read, and must be complete;
//! - every central entry is complete, its extra fields well formed, its member neither
//!   encrypted nor compressed, its sizes consistent;
//! - every local header exists, has the right signature, method and name, and its data lies
//!   before the central directory;
//! - members do not overlap one another (header, name, padding and data included);
//! - no name appears twice; every name lies under the archive's directory (the directory of
//!   the first member, as torch's reader defines it), without `..`, `.`, empty components,
//!   backslashes or NUL bytes.
//!
//! Member data is never read here; [`crc32`] checks the small records that the caller reads.
//!
//! A file read in part (a remote checkpoint fetched by byte range into a sparse buffer) is
//! parsed with [`parse_known`]: bytes outside the [`Known`] ranges are never read. Where the
//! end records or the central directory are not at hand, the result is an
//! [`ZipErrorKind::Unfetched`] error naming the ranges to fetch; a member whose local header
//! is not at hand is listed unlocated (its data offset a lower bound) and checked once it is.

use std::collections::HashSet;
use std::fmt;

/// Largest archive comment: the end record is searched for in this many bytes plus its own.
const MAX_COMMENT: usize = 0xFFFF;
const EOCD_LEN: usize = 22;
const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_LOCATOR_LEN: usize = 20;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_EOCD_LEN: usize = 56;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const CENTRAL_LEN: usize = 46;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_LEN: usize = 30;
const LOCAL_SIG: u32 = 0x0403_4b50;
const ZIP64_EXTRA_ID: u16 = 0x0001;
/// Traditional, strong and central-directory encryption.
const FLAGS_ENCRYPTED: u16 = 0x0001 | 0x0040 | 0x2000;
/// The MS-DOS directory bit of the external attributes.
const ATTRIBUTE_DIRECTORY: u32 = 0x10;
const METHOD_STORED: u16 = 0;

/// What is wrong with an archive: one variant per check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ZipErrorKind {
    /// No end-of-central-directory record that ends at the end of the file.
    NoEndRecord,
    /// Zip64 end records that are missing, cut short or inconsistent.
    BadZip64,
    /// An archive split over several disks.
    MultiDisk,
    /// A central directory that does not fit where the end record says, is cut short, or
    /// holds a different number of entries than announced.
    BadCentralDirectory,
    /// A central entry with malformed extra fields or sizes.
    BadEntry,
    /// An encrypted member.
    Encrypted,
    /// A compressed (not STORED) member.
    Compressed,
    /// A local header that is missing, cut short, or disagrees with its central entry.
    BadLocalHeader,
    /// Member data that reaches past the central directory or the end of the file.
    Truncated,
    /// Two members sharing bytes.
    Overlap,
    /// A member name that appears twice.
    DuplicateName,
    /// A member name outside the archive directory, or with `..`, `.` or empty components.
    BadName,
    /// An archive without members.
    Empty,
    /// (A file read in part) bytes the parse needs are not fetched yet: see `ZipError::need`.
    Unfetched,
}

impl ZipErrorKind {
    /// Every kind, for tests and documentation.
    pub const ALL: [ZipErrorKind; 14] = [
        ZipErrorKind::NoEndRecord,
        ZipErrorKind::BadZip64,
        ZipErrorKind::MultiDisk,
        ZipErrorKind::BadCentralDirectory,
        ZipErrorKind::BadEntry,
        ZipErrorKind::Encrypted,
        ZipErrorKind::Compressed,
        ZipErrorKind::BadLocalHeader,
        ZipErrorKind::Truncated,
        ZipErrorKind::Overlap,
        ZipErrorKind::DuplicateName,
        ZipErrorKind::BadName,
        ZipErrorKind::Empty,
        ZipErrorKind::Unfetched,
    ];

    /// A stable snake_case name, the `kind` seen from Python.
    pub fn name(self) -> &'static str {
        match self {
            ZipErrorKind::NoEndRecord => "no_end_record",
            ZipErrorKind::BadZip64 => "bad_zip64",
            ZipErrorKind::MultiDisk => "multi_disk",
            ZipErrorKind::BadCentralDirectory => "bad_central_directory",
            ZipErrorKind::BadEntry => "bad_entry",
            ZipErrorKind::Encrypted => "encrypted_member",
            ZipErrorKind::Compressed => "compressed_member",
            ZipErrorKind::BadLocalHeader => "bad_local_header",
            ZipErrorKind::Truncated => "member_truncated",
            ZipErrorKind::Overlap => "overlapping_members",
            ZipErrorKind::DuplicateName => "duplicate_member",
            ZipErrorKind::BadName => "bad_member_name",
            ZipErrorKind::Empty => "empty_archive",
            ZipErrorKind::Unfetched => "unfetched",
        }
    }
}

impl fmt::Display for ZipErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A rejected archive: which check failed and the specifics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZipError {
    pub kind: ZipErrorKind,
    pub detail: String,
    /// For [`ZipErrorKind::Unfetched`]: the byte ranges to fetch before parsing again.
    pub need: Vec<(u64, u64)>,
}

impl ZipError {
    fn new(kind: ZipErrorKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
            need: Vec::new(),
        }
    }

    /// The error that asks for bytes `need` of a file read in part.
    pub fn unfetched(need: Vec<(u64, u64)>) -> Self {
        let detail = format!("{} byte range(s) are not fetched yet", need.len());
        Self {
            kind: ZipErrorKind::Unfetched,
            detail,
            need,
        }
    }
}

/// Which bytes of the buffer being parsed hold the file's bytes.
#[derive(Clone, Copy, Debug)]
pub enum Known<'a> {
    /// All of them: a whole file.
    All,
    /// Only these ranges (sorted, not overlapping): a file fetched in part, the rest holes.
    Ranges(&'a [(u64, u64)]),
}

impl Known<'_> {
    /// Whether bytes `[start, end)` are at hand.
    pub fn has(&self, start: u64, end: u64) -> bool {
        match self {
            Known::All => true,
            Known::Ranges(ranges) => {
                if start >= end {
                    return true;
                }
                let i = ranges.partition_point(|&(s, _)| s <= start);
                i > 0 && ranges[i - 1].1 >= end
            }
        }
    }

    /// `Err(Unfetched)` unless bytes `[start, end)` are at hand.
    fn need(&self, start: u64, end: u64) -> ZipResult<()> {
        if self.has(start, end) {
            Ok(())
        } else {
            Err(ZipError::unfetched(vec![(start, end)]))
        }
    }
}

impl fmt::Display for ZipError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

type ZipResult<T> = Result<T, ZipError>;

/// One member: where its name and data are in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The name's bytes in the file (in the central directory).
    pub name: (usize, usize),
    /// Offset of the local header.
    pub header: u64,
    /// Offset of the first data byte.
    pub data: u64,
    /// Size of the data (stored, so compressed and uncompressed sizes are equal).
    pub size: u64,
    /// The CRC-32 the central directory gives for the data.
    pub crc32: u32,
    /// Whether `data` comes from the local header (always, for a whole file). When false
    /// (its local header not fetched), `data` is a lower bound: the header without extra
    /// fields.
    pub located: bool,
}

impl Member {
    /// The absolute byte range of the data.
    pub fn range(&self) -> (u64, u64) {
        // Checked when the member was read: data + size <= file size.
        (self.data, self.data + self.size)
    }
}

/// A validated archive: members in central-directory order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Archive {
    pub members: Vec<Member>,
    /// The archive directory: the first member's name up to its first `/`.
    pub prefix: (usize, usize),
    /// Where the central directory starts.
    pub central_directory: u64,
    /// Whether zip64 end records were present.
    pub zip64: bool,
}

impl Archive {
    /// The name of member `i` (bytes; torch writes UTF-8).
    pub fn name<'a>(&self, bytes: &'a [u8], i: usize) -> &'a [u8] {
        self.members
            .get(i)
            .and_then(|m| bytes.get(m.name.0..m.name.1))
            .unwrap_or_default()
    }

    /// The archive directory's name (without the slash).
    pub fn prefix<'a>(&self, bytes: &'a [u8]) -> &'a [u8] {
        bytes.get(self.prefix.0..self.prefix.1).unwrap_or_default()
    }

    /// The data of member `i`.
    pub fn data<'a>(&self, bytes: &'a [u8], i: usize) -> &'a [u8] {
        self.members
            .get(i)
            .and_then(|m| {
                let (a, b) = m.range();
                bytes.get(usize::try_from(a).ok()?..usize::try_from(b).ok()?)
            })
            .unwrap_or_default()
    }
}

/// Little-endian reads that fail instead of panicking.
struct Reader<'a> {
    bytes: &'a [u8],
    known: Known<'a>,
}

impl<'a> Reader<'a> {
    fn slice(&self, at: usize, len: usize) -> Option<&'a [u8]> {
        self.bytes.get(at..at.checked_add(len)?)
    }
    fn u16(&self, at: usize) -> Option<u16> {
        Some(u16::from_le_bytes(self.slice(at, 2)?.try_into().ok()?))
    }
    fn u32(&self, at: usize) -> Option<u32> {
        Some(u32::from_le_bytes(self.slice(at, 4)?.try_into().ok()?))
    }
    fn u64(&self, at: usize) -> Option<u64> {
        Some(u64::from_le_bytes(self.slice(at, 8)?.try_into().ok()?))
    }
}

/// The end records' view of the central directory.
struct End {
    entries: u64,
    cd_offset: u64,
    cd_size: u64,
    /// Where the central directory must end: the first end record.
    cd_end: u64,
    zip64: bool,
}

/// Parses and validates the archive `bytes` (the whole file; member data is never read).
pub fn parse(bytes: &[u8]) -> ZipResult<Archive> {
    parse_known(bytes, Known::All)
}

/// [`parse`] of a file of which only the `known` bytes are at hand (`bytes` is as long as
/// the file; see the module docs).
pub fn parse_known(bytes: &[u8], known: Known<'_>) -> ZipResult<Archive> {
    let r = Reader { bytes, known };
    let end = find_end(&r)?;
    let members = read_central_directory(&r, &end)?;
    let prefix = check_names(bytes, &members)?;
    check_layout(&members, end.cd_offset)?;
    Ok(Archive {
        members,
        prefix,
        central_directory: end.cd_offset,
        zip64: end.zip64,
    })
}

fn find_end(r: &Reader<'_>) -> ZipResult<End> {
    use ZipErrorKind as K;
    let len = r.bytes.len();
    if len < EOCD_LEN {
        return Err(ZipError::new(
            K::NoEndRecord,
            format!("the file has {len} bytes, fewer than a zip end record's {EOCD_LEN}"),
        ));
    }
    // The record whose comment ends exactly at the end of the file; the last one wins, as a
    // comment could itself contain the signature.
    let lowest = len.saturating_sub(EOCD_LEN + MAX_COMMENT);
    r.known.need(lowest as u64, len as u64)?;
    let eocd = (lowest..=len - EOCD_LEN)
        .rev()
        .find(|&at| {
            r.u32(at) == Some(EOCD_SIG)
                && r.u16(at + 20).map(|c| at + EOCD_LEN + usize::from(c)) == Some(len)
        })
        .ok_or_else(|| {
            ZipError::new(
                K::NoEndRecord,
                "no zip end-of-central-directory record ends at the end of the file: the file \
                 is truncated, has bytes appended, or is not a zip archive",
            )
        })?;
    let field16 = |off: usize| r.u16(eocd + off).unwrap_or_default();
    let field32 = |off: usize| r.u32(eocd + off).unwrap_or_default();
    let (disk, cd_disk) = (field16(4), field16(6));
    let (disk_entries, entries) = (field16(8), field16(10));
    let (cd_size, cd_offset) = (field32(12), field32(16));
    let locator = eocd.checked_sub(ZIP64_LOCATOR_LEN);
    if let Some(at) = locator {
        r.known.need(at as u64, eocd as u64)?;
    }
    let has_locator = locator.is_some_and(|at| r.u32(at) == Some(ZIP64_LOCATOR_SIG));
    if !has_locator {
        let saturated = entries == u16::MAX || cd_size == u32::MAX || cd_offset == u32::MAX;
        if saturated {
            return Err(ZipError::new(
                K::BadZip64,
                "the end record points to zip64 end records, but there are none",
            ));
        }
        if disk != 0 || cd_disk != 0 || disk_entries != entries {
            return Err(ZipError::new(
                K::MultiDisk,
                format!("the archive spans several disks (disk {disk}, directory on {cd_disk})"),
            ));
        }
        return Ok(End {
            entries: entries.into(),
            cd_offset: cd_offset.into(),
            cd_size: cd_size.into(),
            cd_end: eocd as u64,
            zip64: false,
        });
    }
    let locator = locator.unwrap_or_default();
    // The classic fields hold 0 or, saturated, defer to the zip64 record.
    if ![0, u16::MAX].contains(&disk) || ![0, u16::MAX].contains(&cd_disk) {
        return Err(ZipError::new(
            K::MultiDisk,
            format!("the archive spans several disks (disk {disk}, directory on {cd_disk})"),
        ));
    }
    let loc_disk = r.u32(locator + 4).unwrap_or(u32::MAX);
    let loc_offset = r.u64(locator + 8).unwrap_or(u64::MAX);
    let loc_disks = r.u32(locator + 16).unwrap_or(u32::MAX);
    if loc_disk != 0 || loc_disks != 1 {
        return Err(ZipError::new(
            K::MultiDisk,
            format!("the zip64 locator names disk {loc_disk} of {loc_disks}"),
        ));
    }
    let at = usize::try_from(loc_offset)
        .ok()
        .filter(|&at| at.checked_add(ZIP64_EOCD_LEN).is_some_and(|e| e <= locator))
        .ok_or_else(|| {
            ZipError::new(
                K::BadZip64,
                format!(
                    "the zip64 locator points to offset {loc_offset}, where no complete zip64 \
                     end record fits before the locator at {locator}"
                ),
            )
        })?;
    r.known.need(at as u64, locator as u64)?;
    if r.u32(at) != Some(ZIP64_EOCD_SIG) {
        return Err(ZipError::new(
            K::BadZip64,
            format!("no zip64 end record signature at offset {at}"),
        ));
    }
    let record_size = r.u64(at + 4).unwrap_or(u64::MAX);
    // The record's own size field counts what follows it (12 bytes of signature and size).
    let record_end = record_size
        .checked_add(12)
        .and_then(|n| n.checked_add(at as u64));
    if record_size < (ZIP64_EOCD_LEN - 12) as u64 || record_end != Some(locator as u64) {
        return Err(ZipError::new(
            K::BadZip64,
            format!(
                "the zip64 end record at {at} claims {record_size} bytes, which does not end at \
                 the locator ({locator})"
            ),
        ));
    }
    let entries_small = entries;
    let disk = r.u32(at + 16).unwrap_or(u32::MAX);
    let cd_disk = r.u32(at + 20).unwrap_or(u32::MAX);
    let disk_entries = r.u64(at + 24).unwrap_or(u64::MAX);
    let entries = r.u64(at + 32).unwrap_or(u64::MAX);
    if disk != 0 || cd_disk != 0 || disk_entries != entries {
        return Err(ZipError::new(
            K::MultiDisk,
            format!("the archive spans several disks (disk {disk}, directory on {cd_disk})"),
        ));
    }
    let cd_size64 = r.u64(at + 40).unwrap_or(u64::MAX);
    let cd_offset64 = r.u64(at + 48).unwrap_or(u64::MAX);
    // The classic record's fields must agree with the zip64 ones unless saturated.
    let agrees = |small: u64, saturated: u64, big: u64| small == saturated || small == big;
    if !(agrees(entries_small.into(), 0xFFFF, entries)
        && agrees(cd_size.into(), 0xFFFF_FFFF, cd_size64)
        && agrees(cd_offset.into(), 0xFFFF_FFFF, cd_offset64))
    {
        return Err(ZipError::new(
            K::BadZip64,
            format!(
                "the end record ({entries_small} members, directory of {cd_size} bytes at \
                 {cd_offset}) contradicts the zip64 end record ({entries} members, {cd_size64} \
                 bytes at {cd_offset64})"
            ),
        ));
    }
    Ok(End {
        entries,
        cd_size: cd_size64,
        cd_offset: cd_offset64,
        cd_end: at as u64,
        zip64: true,
    })
}

fn read_central_directory(r: &Reader<'_>, end: &End) -> ZipResult<Vec<Member>> {
    use ZipErrorKind as K;
    if end.cd_offset.checked_add(end.cd_size) != Some(end.cd_end) {
        return Err(ZipError::new(
            K::BadCentralDirectory,
            format!(
                "the central directory ({} bytes at offset {}) does not end where the end \
                 record starts ({}): the file is truncated or was modified",
                end.cd_size, end.cd_offset, end.cd_end
            ),
        ));
    }
    r.known.need(end.cd_offset, end.cd_end)?;
    // Both fit in usize: they are at most end.cd_end, an offset into `bytes`.
    let start = end.cd_offset as usize;
    let stop = end.cd_end as usize;
    // Every entry takes at least CENTRAL_LEN bytes: a count beyond that is a lie, and
    // reserving for it would let a 22-byte file ask for gigabytes.
    let max_entries = ((stop - start) / CENTRAL_LEN) as u64;
    if end.entries > max_entries {
        return Err(ZipError::new(
            K::BadCentralDirectory,
            format!(
                "the end record announces {} members, but the central directory of {} bytes \
                 can hold at most {max_entries}",
                end.entries, end.cd_size
            ),
        ));
    }
    let mut members = Vec::with_capacity(end.entries as usize);
    let mut at = start;
    for index in 0..end.entries {
        let member = read_entry(r, at, stop, index)?;
        at = member.1;
        members.push(member.0);
    }
    if at != stop {
        return Err(ZipError::new(
            K::BadCentralDirectory,
            format!(
                "the central directory holds {} bytes after its {} announced entries",
                stop - at,
                end.entries
            ),
        ));
    }
    Ok(members)
}

/// Reads the central entry at `at` (which must end by `stop`) and its local header; returns
/// the member and where the next entry starts.
fn read_entry(r: &Reader<'_>, at: usize, stop: usize, index: u64) -> ZipResult<(Member, usize)> {
    use ZipErrorKind as K;
    let cut = || {
        ZipError::new(
            K::BadCentralDirectory,
            format!("central directory entry {index} at offset {at} is cut short"),
        )
    };
    if at.checked_add(CENTRAL_LEN).is_none_or(|e| e > stop) || r.u32(at) != Some(CENTRAL_SIG) {
        return Err(if r.u32(at) == Some(CENTRAL_SIG) {
            cut()
        } else {
            ZipError::new(
                K::BadCentralDirectory,
                format!("no central directory entry signature at offset {at} (entry {index})"),
            )
        });
    }
    let f16 = |off: usize| r.u16(at + off).unwrap_or_default();
    let f32 = |off: usize| r.u32(at + off).unwrap_or_default();
    let flags = f16(8);
    let method = f16(10);
    let crc32 = f32(16);
    let mut compressed = u64::from(f32(20));
    let mut size = u64::from(f32(24));
    let name_len = usize::from(f16(28));
    let extra_len = usize::from(f16(30));
    let comment_len = usize::from(f16(32));
    let disk = f16(34);
    let attributes = f32(38);
    let mut header = u64::from(f32(42));
    let name_at = at + CENTRAL_LEN;
    let extra_at = name_at + name_len;
    let next = extra_at + extra_len + comment_len;
    if next > stop {
        return Err(cut());
    }
    let name = (name_at, extra_at);
    let shown = String::from_utf8_lossy(r.slice(name_at, name_len).unwrap_or_default());
    // The zip64 extra field holds, in this order, each value whose 32-bit field is saturated.
    let extra = r.slice(extra_at, extra_len).unwrap_or_default();
    if let Some(z64) = find_extra(extra, ZIP64_EXTRA_ID).map_err(|detail| {
        ZipError::new(
            K::BadEntry,
            format!("member {shown:?}: malformed extra fields ({detail})"),
        )
    })? {
        let mut fields = z64
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(<[u8; 8]>::try_from(c).unwrap_or_default()));
        let sat = u64::from(u32::MAX);
        let flags = [size == sat, compressed == sat, header == sat];
        for (value, saturated) in [&mut size, &mut compressed, &mut header]
            .into_iter()
            .zip(flags)
        {
            if saturated {
                *value = fields.next().ok_or_else(|| {
                    ZipError::new(
                        K::BadEntry,
                        format!("member {shown:?}: its zip64 extra field is too short"),
                    )
                })?;
            }
        }
    } else if [size, compressed, header].contains(&u64::from(u32::MAX)) {
        return Err(ZipError::new(
            K::BadEntry,
            format!("member {shown:?}: a saturated size or offset without a zip64 extra field"),
        ));
    }
    if disk != 0 && disk != u16::MAX {
        return Err(ZipError::new(
            K::MultiDisk,
            format!("member {shown:?} starts on disk {disk}"),
        ));
    }
    if flags & FLAGS_ENCRYPTED != 0 {
        return Err(ZipError::new(
            K::Encrypted,
            format!("member {shown:?} is encrypted"),
        ));
    }
    if attributes & ATTRIBUTE_DIRECTORY != 0 {
        return Err(ZipError::new(
            K::BadEntry,
            format!("member {shown:?} is marked as a directory"),
        ));
    }
    if method != METHOD_STORED {
        return Err(ZipError::new(
            K::Compressed,
            format!(
                "member {shown:?} is compressed (zip method {method}); torch.save stores every \
                 member uncompressed, and only uncompressed members can be mapped"
            ),
        ));
    }
    if compressed != size {
        return Err(ZipError::new(
            K::BadEntry,
            format!(
                "member {shown:?} is stored, but its sizes differ ({compressed} stored, {size} \
                 uncompressed)"
            ),
        ));
    }
    let (data, located) = match read_local_header(r, header, name, method, &shown)? {
        Some(data) => (data, true),
        // Not fetched: at least the fixed header and the central entry's name precede it.
        None => (
            header.saturating_add((LOCAL_LEN + name.1 - name.0) as u64),
            false,
        ),
    };
    let data_end = data.checked_add(size);
    if data_end.is_none_or(|e| e > r.bytes.len() as u64) {
        return Err(ZipError::new(
            K::Truncated,
            format!(
                "member {shown:?} needs {size} bytes at offset {data}, past the end of the file \
                 ({} bytes): the file is truncated",
                r.bytes.len()
            ),
        ));
    }
    Ok((
        Member {
            name,
            header,
            data,
            size,
            crc32,
            located,
        },
        next,
    ))
}

/// The data of the extra field `id`, if present; an error when the fields are malformed.
fn find_extra(extra: &[u8], id: u16) -> Result<Option<&[u8]>, String> {
    let mut at = 0usize;
    let mut found = None;
    while at < extra.len() {
        let head = extra
            .get(at..at + 4)
            .ok_or_else(|| format!("{} stray bytes at the end", extra.len() - at))?;
        let field = u16::from_le_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_le_bytes([head[2], head[3]]));
        let data = extra
            .get(at + 4..at + 4 + len)
            .ok_or_else(|| format!("field {field:#06x} claims {len} bytes past the end"))?;
        if field == id {
            if found.is_some() {
                return Err(format!("field {field:#06x} appears twice"));
            }
            found = Some(data);
        }
        at += 4 + len;
    }
    Ok(found)
}

/// Checks the local header at `header` against its central entry; returns where the data
/// starts (None: a file read in part whose local header is not fetched).
fn read_local_header(
    r: &Reader<'_>,
    header: u64,
    name: (usize, usize),
    method: u16,
    shown: &str,
) -> ZipResult<Option<u64>> {
    use ZipErrorKind as K;
    let bad = |what: String| {
        ZipError::new(
            K::BadLocalHeader,
            format!("member {shown:?}: {what} (local header at offset {header})"),
        )
    };
    let fixed_end = header.saturating_add(LOCAL_LEN as u64);
    if !r.known.has(header, fixed_end) {
        return Ok(None);
    }
    let local_name_len = r.u16(header as usize + 26).unwrap_or(0);
    let central_len = name.1 - name.0;
    if !r
        .known
        .has(fixed_end, fixed_end.saturating_add(local_name_len.into()))
    {
        // The name is compared once fetched; a length that differs fails now (else the
        // reader would ask for bytes that can never locate the member).
        if r.u32(header as usize) == Some(LOCAL_SIG) && usize::from(local_name_len) != central_len {
            return Err(ZipError::new(
                K::BadLocalHeader,
                format!(
                    "member {shown:?}: the local header names a different member (a name of \
                     {local_name_len} bytes, {central_len} in the central directory; local \
                     header at offset {header})"
                ),
            ));
        }
        return Ok(None);
    }
    let at = usize::try_from(header)
        .ok()
        .filter(|&at| r.slice(at, LOCAL_LEN).is_some())
        .ok_or_else(|| bad("the local header lies past the end of the file".to_owned()))?;
    if r.u32(at) != Some(LOCAL_SIG) {
        return Err(bad("no local header signature".to_owned()));
    }
    let local_flags = r.u16(at + 6).unwrap_or(u16::MAX);
    let local_method = r.u16(at + 8).unwrap_or(u16::MAX);
    let name_len = usize::from(r.u16(at + 26).unwrap_or_default());
    let extra_len = usize::from(r.u16(at + 28).unwrap_or_default());
    if local_flags & FLAGS_ENCRYPTED != 0 {
        return Err(ZipError::new(
            K::Encrypted,
            format!("member {shown:?}: its local header says it is encrypted"),
        ));
    }
    if local_method != method {
        return Err(bad(format!(
            "the local header says method {local_method}, the central directory {method}"
        )));
    }
    let central_name = r.slice(name.0, name.1 - name.0).unwrap_or_default();
    match r.slice(at + LOCAL_LEN, name_len) {
        Some(local) if local == central_name => {}
        Some(_) => return Err(bad("the local header names a different member".to_owned())),
        None => return Err(bad("the local header is cut short".to_owned())),
    }
    // at < len, and name/extra lengths are 16-bit: no overflow.
    let data = (at + LOCAL_LEN + name_len + extra_len) as u64;
    if data > r.bytes.len() as u64 {
        return Err(bad("the local header is cut short".to_owned()));
    }
    Ok(Some(data))
}

/// Checks every name; returns the archive directory (the first name up to its first `/`).
fn check_names(bytes: &[u8], members: &[Member]) -> ZipResult<(usize, usize)> {
    use ZipErrorKind as K;
    let first = members
        .first()
        .ok_or_else(|| ZipError::new(K::Empty, "the archive has no members"))?;
    let name_of = |m: &Member| bytes.get(m.name.0..m.name.1).unwrap_or_default();
    let first_name = name_of(first);
    let slash = first_name.iter().position(|&b| b == b'/');
    let prefix_len = match slash {
        Some(n) if n > 0 => n,
        _ => {
            return Err(ZipError::new(
                K::BadName,
                format!(
                    "the first member {:?} is not inside a directory (torch.save puts every \
                     member under one)",
                    String::from_utf8_lossy(first_name)
                ),
            ))
        }
    };
    let prefix = &first_name[..prefix_len];
    let mut seen: HashSet<&[u8]> = HashSet::with_capacity(members.len());
    for m in members {
        let name = name_of(m);
        let shown = || String::from_utf8_lossy(name).into_owned();
        let inside = name.len() > prefix_len + 1
            && name.starts_with(prefix)
            && name.get(prefix_len) == Some(&b'/');
        let clean = name
            .split(|&b| b == b'/')
            .all(|part| !part.is_empty() && part != b"." && part != b"..")
            && !name.iter().any(|&b| b == b'\\' || b == 0);
        if !inside || !clean {
            return Err(ZipError::new(
                K::BadName,
                format!(
                    "member {:?} is not a plain path inside the archive directory {:?}",
                    shown(),
                    String::from_utf8_lossy(prefix)
                ),
            ));
        }
        if !seen.insert(name) {
            return Err(ZipError::new(
                K::DuplicateName,
                format!("member {:?} appears more than once", shown()),
            ));
        }
    }
    Ok((first.name.0, first.name.0 + prefix_len))
}

/// Checks that members (local header through data) do not overlap each other and end before
/// the central directory.
fn check_layout(members: &[Member], cd_offset: u64) -> ZipResult<()> {
    use ZipErrorKind as K;
    let mut spans: Vec<(u64, u64, usize)> = members
        .iter()
        .enumerate()
        .map(|(i, m)| (m.header, m.range().1, i))
        .collect();
    spans.sort_unstable();
    let mut previous: Option<(u64, usize)> = None;
    for &(start, end, i) in &spans {
        if let Some((prev_end, prev)) = previous {
            if start < prev_end {
                return Err(ZipError::new(
                    K::Overlap,
                    format!(
                        "members {prev} and {i} overlap: member {i}'s header starts at {start}, \
                         before member {prev}'s data ends at {prev_end}"
                    ),
                ));
            }
        }
        previous = Some((end, i));
    }
    // Checked after overlaps: a member that runs into the next one is an overlap first.
    if let Some(&(_, end, i)) = spans.iter().find(|s| s.1 > cd_offset) {
        return Err(ZipError::new(
            K::Truncated,
            format!(
                "member {i}'s data ends at {end}, inside the central directory (which starts \
                 at {cd_offset})"
            ),
        ));
    }
    Ok(())
}

// --- CRC-32 ----------------------------------------------------------------------------------

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut tables = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        tables[0][i] = c;
        i += 1;
    }
    let mut t = 1;
    while t < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = tables[t - 1][i];
            tables[t][i] = (prev >> 8) ^ tables[0][(prev & 0xFF) as usize];
            i += 1;
        }
        t += 1;
    }
    tables
}

static CRC_TABLES: [[u32; 256]; 8] = crc_tables();

/// The CRC-32 (zip's, IEEE 802.3) of `data`, eight bytes at a time.
pub fn crc32(data: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut crc = !0u32;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ crc;
        let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        crc = t[7][(lo & 0xFF) as usize]
            ^ t[6][((lo >> 8) & 0xFF) as usize]
            ^ t[5][((lo >> 16) & 0xFF) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xFF) as usize]
            ^ t[2][((hi >> 8) & 0xFF) as usize]
            ^ t[1][((hi >> 16) & 0xFF) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        crc = t[0][((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

// --- a writer for tests ----------------------------------------------------------------------

/// Writes archives shaped like torch.save's (for tests and fuzz seeds): 64-byte aligned data,
/// data descriptors, optional zip64 end records.
#[cfg(test)]
pub mod testing {
    use super::*;

    /// One member to write.
    #[derive(Clone, Debug)]
    pub struct Entry {
        pub name: Vec<u8>,
        pub data: Vec<u8>,
        pub method: u16,
        pub flags: u16,
    }

    impl Entry {
        /// A stored member.
        pub fn new(name: impl AsRef<[u8]>, data: impl AsRef<[u8]>) -> Self {
            Self {
                name: name.as_ref().to_vec(),
                data: data.as_ref().to_vec(),
                method: 0,
                flags: 0x0808,
            }
        }
    }

    /// Offsets of what [`write`] wrote, for tests that damage it.
    #[derive(Clone, Debug, Default)]
    pub struct Layout {
        pub headers: Vec<usize>,
        pub data: Vec<usize>,
        pub central: Vec<usize>,
        pub cd_offset: usize,
        pub eocd: usize,
        pub zip64_eocd: Option<usize>,
    }

    /// An archive of `entries`; `zip64` forces the zip64 end records.
    pub fn write(entries: &[Entry], zip64: bool) -> (Vec<u8>, Layout) {
        let mut out = Vec::new();
        let mut layout = Layout::default();
        for e in entries {
            let header = out.len();
            layout.headers.push(header);
            // Pad with an extra field so the data starts on a 64-byte boundary, as miniz does.
            let base = header + LOCAL_LEN + e.name.len() + 4;
            let pad = (64 - base % 64) % 64;
            out.extend_from_slice(&LOCAL_SIG.to_le_bytes());
            out.extend_from_slice(&20u16.to_le_bytes());
            out.extend_from_slice(&e.flags.to_le_bytes());
            out.extend_from_slice(&e.method.to_le_bytes());
            out.extend_from_slice(&[0; 4]); // time, date
            out.extend_from_slice(&[0; 12]); // crc and sizes: in the data descriptor
            out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            out.extend_from_slice(&((pad + 4) as u16).to_le_bytes());
            out.extend_from_slice(&e.name);
            out.extend_from_slice(&0x4246u16.to_le_bytes()); // "FB", miniz's padding id
            out.extend_from_slice(&(pad as u16).to_le_bytes());
            out.extend(std::iter::repeat_n(b'Z', pad));
            layout.data.push(out.len());
            out.extend_from_slice(&e.data);
            out.extend_from_slice(&0x0807_4b50u32.to_le_bytes());
            out.extend_from_slice(&crc32(&e.data).to_le_bytes());
            out.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
        }
        layout.cd_offset = out.len();
        for (e, &header) in entries.iter().zip(&layout.headers) {
            layout.central.push(out.len());
            out.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
            out.extend_from_slice(&20u16.to_le_bytes());
            out.extend_from_slice(&20u16.to_le_bytes());
            out.extend_from_slice(&e.flags.to_le_bytes());
            out.extend_from_slice(&e.method.to_le_bytes());
            out.extend_from_slice(&[0; 4]);
            out.extend_from_slice(&crc32(&e.data).to_le_bytes());
            out.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            out.extend_from_slice(&[0; 4]); // extra and comment lengths
            out.extend_from_slice(&[0; 8]); // disk, attributes
            out.extend_from_slice(&(header as u32).to_le_bytes());
            out.extend_from_slice(&e.name);
        }
        let cd_size = out.len() - layout.cd_offset;
        let n = entries.len();
        if zip64 {
            let at = out.len();
            layout.zip64_eocd = Some(at);
            out.extend_from_slice(&ZIP64_EOCD_SIG.to_le_bytes());
            out.extend_from_slice(&44u64.to_le_bytes());
            out.extend_from_slice(&[45, 0, 45, 0]);
            out.extend_from_slice(&[0; 8]);
            out.extend_from_slice(&(n as u64).to_le_bytes());
            out.extend_from_slice(&(n as u64).to_le_bytes());
            out.extend_from_slice(&(cd_size as u64).to_le_bytes());
            out.extend_from_slice(&(layout.cd_offset as u64).to_le_bytes());
            out.extend_from_slice(&ZIP64_LOCATOR_SIG.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&(at as u64).to_le_bytes());
            out.extend_from_slice(&1u32.to_le_bytes());
        }
        layout.eocd = out.len();
        let sat16 = |v: usize| if zip64 { u16::MAX } else { v as u16 };
        let sat32 = |v: usize| if zip64 { u32::MAX } else { v as u32 };
        out.extend_from_slice(&EOCD_SIG.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&sat16(n).to_le_bytes());
        out.extend_from_slice(&sat16(n).to_le_bytes());
        out.extend_from_slice(&sat32(cd_size).to_le_bytes());
        out.extend_from_slice(&sat32(layout.cd_offset).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        (out, layout)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{write, Entry};
    use super::*;
    use proptest::prelude::*;

    fn entries() -> Vec<Entry> {
        vec![
            Entry::new("archive/data.pkl", b"\x80\x02}q\x00."),
            Entry::new("archive/byteorder", "little"),
            Entry::new("archive/data/0", [1u8; 16]),
            Entry::new("archive/version", "3\n"),
        ]
    }

    fn kind(bytes: &[u8]) -> ZipErrorKind {
        match parse(bytes) {
            Ok(a) => panic!("accepted: {a:?}"),
            Err(e) => {
                assert!(!e.detail.is_empty());
                e.kind
            }
        }
    }

    fn put16(bytes: &mut [u8], at: usize, v: u16) {
        bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put32(bytes: &mut [u8], at: usize, v: u32) {
        bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn reads_members_in_order_with_aligned_data() {
        for zip64 in [false, true] {
            let (bytes, layout) = write(&entries(), zip64);
            let a = parse(&bytes).unwrap();
            assert_eq!(a.zip64, zip64);
            assert_eq!(a.prefix(&bytes), b"archive");
            assert_eq!(a.members.len(), 4);
            assert_eq!(a.name(&bytes, 2), b"archive/data/0");
            assert_eq!(a.data(&bytes, 2), [1u8; 16]);
            assert_eq!(a.data(&bytes, 1), b"little");
            for (m, &d) in a.members.iter().zip(&layout.data) {
                assert_eq!(m.data as usize, d);
                assert_eq!(m.data % 64, 0);
            }
            assert_eq!(a.central_directory as usize, layout.cd_offset);
            assert_eq!(a.members[1].crc32, crc32(b"little"));
        }
    }

    #[test]
    fn crc32_matches_the_reference_values() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        let long: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        // Byte-at-a-time reference.
        let mut c = !0u32;
        for &b in &long {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        assert_eq!(crc32(&long), !c);
    }

    #[test]
    fn no_end_record() {
        assert_eq!(kind(b""), ZipErrorKind::NoEndRecord);
        assert_eq!(kind(&[0u8; 100]), ZipErrorKind::NoEndRecord);
        let (mut bytes, _) = write(&entries(), false);
        bytes.extend_from_slice(b"trailing");
        assert_eq!(kind(&bytes), ZipErrorKind::NoEndRecord);
        let (bytes, _) = write(&entries(), false);
        assert_eq!(kind(&bytes[..bytes.len() - 1]), ZipErrorKind::NoEndRecord);
    }

    #[test]
    fn truncated_anywhere_is_an_error_never_a_panic() {
        for zip64 in [false, true] {
            let (bytes, _) = write(&entries(), zip64);
            for cut in 0..bytes.len() {
                assert!(parse(&bytes[..cut]).is_err(), "cut at {cut}");
            }
        }
    }

    #[test]
    fn bad_zip64() {
        let (bytes, layout) = write(&entries(), true);
        let z = layout.zip64_eocd.unwrap();
        let mut b = bytes.clone();
        put32(&mut b, z, 0);
        assert_eq!(kind(&b), ZipErrorKind::BadZip64);
        let mut b = bytes.clone();
        b[z + 4] = 40; // record size that does not reach the locator
        assert_eq!(kind(&b), ZipErrorKind::BadZip64);
        let mut b = bytes.clone();
        put32(&mut b, layout.eocd - 12, 0xFFFF_FF00); // locator offset past the file
        assert_eq!(kind(&b), ZipErrorKind::BadZip64);
        // Classic fields that contradict the zip64 ones.
        let mut b = bytes.clone();
        put16(&mut b, layout.eocd + 10, 3);
        put16(&mut b, layout.eocd + 8, 3);
        assert_eq!(kind(&b), ZipErrorKind::BadZip64);
        // Saturated fields without a locator.
        let (mut b, layout) = write(&entries(), false);
        put16(&mut b, layout.eocd + 10, u16::MAX);
        put16(&mut b, layout.eocd + 8, u16::MAX);
        assert_eq!(kind(&b), ZipErrorKind::BadZip64);
    }

    #[test]
    fn multi_disk() {
        let (mut b, layout) = write(&entries(), false);
        put16(&mut b, layout.eocd + 4, 1);
        assert_eq!(kind(&b), ZipErrorKind::MultiDisk);
        let (mut b, layout) = write(&entries(), false);
        put16(&mut b, layout.central[1] + 34, 2);
        assert_eq!(kind(&b), ZipErrorKind::MultiDisk);
        let (mut b, layout) = write(&entries(), true);
        put32(&mut b, layout.zip64_eocd.unwrap() + 16, 1);
        assert_eq!(kind(&b), ZipErrorKind::MultiDisk);
        let (mut b, layout) = write(&entries(), true);
        put32(&mut b, layout.eocd - 4, 0); // the locator's count of disks
        assert_eq!(kind(&b), ZipErrorKind::MultiDisk);
        let (mut b, layout) = write(&entries(), true);
        put16(&mut b, layout.eocd + 4, 2);
        assert_eq!(kind(&b), ZipErrorKind::MultiDisk);
    }

    #[test]
    fn bad_central_directory() {
        let (mut b, layout) = write(&entries(), false);
        put32(&mut b, layout.eocd + 16, layout.cd_offset as u32 - 1);
        assert_eq!(kind(&b), ZipErrorKind::BadCentralDirectory);
        let (mut b, layout) = write(&entries(), false);
        put16(&mut b, layout.eocd + 8, 3);
        put16(&mut b, layout.eocd + 10, 3);
        assert_eq!(kind(&b), ZipErrorKind::BadCentralDirectory);
        let (mut b, layout) = write(&entries(), false);
        put16(&mut b, layout.eocd + 8, 60_000);
        put16(&mut b, layout.eocd + 10, 60_000);
        assert_eq!(kind(&b), ZipErrorKind::BadCentralDirectory);
        let (mut b, layout) = write(&entries(), false);
        put32(&mut b, layout.central[2], 0);
        assert_eq!(kind(&b), ZipErrorKind::BadCentralDirectory);
        let (mut b, layout) = write(&entries(), false);
        put16(&mut b, layout.central[3] + 32, 500); // comment past the directory
        assert_eq!(kind(&b), ZipErrorKind::BadCentralDirectory);
    }

    #[test]
    fn bad_entry() {
        let (mut b, layout) = write(&entries(), false);
        put32(&mut b, layout.central[2] + 20, 15); // stored sizes that differ
        assert_eq!(kind(&b), ZipErrorKind::BadEntry);
        let (mut b, layout) = write(&entries(), false);
        put32(&mut b, layout.central[2] + 24, u32::MAX); // saturated without zip64 extra
        put32(&mut b, layout.central[2] + 20, u32::MAX);
        assert_eq!(kind(&b), ZipErrorKind::BadEntry);
    }

    #[test]
    fn directory_members() {
        let (mut b, layout) = write(&entries(), false);
        put32(&mut b, layout.central[2] + 38, 0x10);
        assert_eq!(kind(&b), ZipErrorKind::BadEntry);
    }

    #[test]
    fn malformed_extra_fields() {
        assert!(find_extra(&[1, 0, 9, 0, 1], 1).is_err());
        assert!(find_extra(&[1, 0], 1).is_err());
        assert!(find_extra(&[1, 0, 0, 0, 1, 0, 0, 0], 1).is_err());
        assert_eq!(find_extra(&[2, 0, 1, 0, 7], 1), Ok(None));
        assert_eq!(find_extra(&[1, 0, 1, 0, 7], 1), Ok(Some(&[7u8][..])));
    }

    #[test]
    fn encrypted_and_compressed_members() {
        let mut e = entries();
        e[2].flags |= 1;
        assert_eq!(kind(&write(&e, false).0), ZipErrorKind::Encrypted);
        let mut e = entries();
        e[2].method = 8;
        assert_eq!(kind(&write(&e, false).0), ZipErrorKind::Compressed);
        let mut e = entries();
        e[1].flags |= 0x2000;
        assert_eq!(kind(&write(&e, false).0), ZipErrorKind::Encrypted);
        let (mut b, layout) = write(&entries(), false);
        put16(&mut b, layout.headers[3] + 6, 0x0809); // encrypted in the local header only
        assert_eq!(kind(&b), ZipErrorKind::Encrypted);
    }

    #[test]
    fn bad_local_header() {
        let (mut b, layout) = write(&entries(), false);
        put32(&mut b, layout.headers[2], 0);
        assert_eq!(kind(&b), ZipErrorKind::BadLocalHeader);
        let (mut b, layout) = write(&entries(), false);
        put16(&mut b, layout.headers[2] + 8, 8); // method differs from the central one
        assert_eq!(kind(&b), ZipErrorKind::BadLocalHeader);
        let (mut b, layout) = write(&entries(), false);
        b[layout.headers[2] + LOCAL_LEN] = b'X'; // another name
        assert_eq!(kind(&b), ZipErrorKind::BadLocalHeader);
        let (mut b, layout) = write(&entries(), false);
        put32(&mut b, layout.central[2] + 42, 0xFFFF_0000); // header past the end
        assert_eq!(kind(&b), ZipErrorKind::BadLocalHeader);
    }

    #[test]
    fn truncated_member() {
        let (mut b, layout) = write(&entries(), false);
        put32(&mut b, layout.central[3] + 20, 5000);
        put32(&mut b, layout.central[3] + 24, 5000);
        assert_eq!(kind(&b), ZipErrorKind::Truncated);
        // Data that runs into the central directory.
        let (mut b, layout) = write(&entries(), false);
        let size = (layout.cd_offset - layout.data[3] + 1) as u32;
        put32(&mut b, layout.central[3] + 20, size);
        put32(&mut b, layout.central[3] + 24, size);
        assert_eq!(kind(&b), ZipErrorKind::Truncated);
    }

    #[test]
    fn overlapping_members() {
        let (mut b, layout) = write(&entries(), false);
        put32(&mut b, layout.central[2] + 20, 200);
        put32(&mut b, layout.central[2] + 24, 200);
        assert_eq!(kind(&b), ZipErrorKind::Overlap);
        // Two central entries pointing at one local header.
        let mut e = entries();
        e[3].name = e[2].name.clone();
        let (mut b, layout) = write(&e, false);
        put32(&mut b, layout.central[3] + 42, layout.headers[2] as u32);
        put32(&mut b, layout.central[3] + 20, 16);
        put32(&mut b, layout.central[3] + 24, 16);
        b[layout.central[3] + CENTRAL_LEN + 13] = b'1';
        b[layout.headers[3] + LOCAL_LEN + 13] = b'1';
        assert_eq!(kind(&b), ZipErrorKind::BadLocalHeader);
    }

    #[test]
    fn duplicate_names() {
        let mut e = entries();
        e.push(Entry::new("archive/data/0", [2u8; 16]));
        assert_eq!(kind(&write(&e, false).0), ZipErrorKind::DuplicateName);
    }

    #[test]
    fn bad_names() {
        for bad in [
            "other/data/1",
            "archive/../x",
            "archive/./x",
            "archive//x",
            "archive/x/",
            "archive",
            "archive/",
            "archive/a\\b",
            "archive/a\0b",
            "/archive/x",
        ] {
            let mut e = entries();
            e.push(Entry::new(bad, b""));
            assert_eq!(kind(&write(&e, false).0), ZipErrorKind::BadName, "{bad}");
        }
        let mut e = entries();
        e[0].name = b"data.pkl".to_vec();
        assert_eq!(kind(&write(&e, false).0), ZipErrorKind::BadName);
        let mut e = entries();
        e[0].name = b"/data.pkl".to_vec();
        assert_eq!(kind(&write(&e, false).0), ZipErrorKind::BadName);
    }

    #[test]
    fn empty_archive() {
        assert_eq!(kind(&write(&[], false).0), ZipErrorKind::Empty);
    }

    #[test]
    fn every_kind_has_a_distinct_name() {
        let names: HashSet<&str> = ZipErrorKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), ZipErrorKind::ALL.len());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn flipped_bytes_never_panic_and_accepted_members_stay_in_bounds(
            at in any::<prop::sample::Index>(),
            value in any::<u8>(),
            zip64 in any::<bool>(),
        ) {
            let (mut bytes, _) = write(&entries(), zip64);
            let i = at.index(bytes.len());
            bytes[i] = value;
            if let Ok(a) = parse(&bytes) {
                let mut spans: Vec<(u64, u64)> =
                    a.members.iter().map(|m| (m.header, m.range().1)).collect();
                spans.sort_unstable();
                for w in spans.windows(2) {
                    prop_assert!(w[0].1 <= w[1].0);
                }
                for m in &a.members {
                    prop_assert!(m.range().1 <= a.central_directory);
                    prop_assert!(m.data >= m.header + LOCAL_LEN as u64);
                }
            }
        }

        #[test]
        fn written_archives_round_trip(
            sizes in proptest::collection::vec(0usize..300, 1..20),
            zip64 in any::<bool>(),
        ) {
            let e: Vec<Entry> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| Entry::new(format!("a/data/{i}"), vec![i as u8; n]))
                .collect();
            let (bytes, _) = write(&e, zip64);
            let a = parse(&bytes).unwrap();
            for (i, entry) in e.iter().enumerate() {
                prop_assert_eq!(a.name(&bytes, i), &entry.name[..]);
                prop_assert_eq!(a.data(&bytes, i), &entry.data[..]);
            }
        }
    }
}
