//! The pickle machine of the torch zip reader: it runs `data.pkl` into a graph of plain values
//! without calling anything.
//!
//! It implements the opcodes Python's pickler (protocols 2 to 5) emits for what `torch.save`
//! writes in state dicts and training checkpoints — dicts, `OrderedDict`s (with `_metadata`
//! set through BUILD), lists, tuples, sets, str, bytes, int, float, bool, None, tensors,
//! Parameters, storages by persistent id, dtypes — and nothing else. A global is looked up
//! in a fixed table ([`Global`]) or in the caller's allowlist of names; it is never imported.
//! Tensors are checked and recorded (`_rebuild_tensor_v2` and friends run here, on numbers);
//! the few other callables (`torch.Size`, `collections.Counter`, allowlisted classes...) are
//! recorded as deferred calls ([`Node::Call`], [`Node::New`], builds) that the Python layer
//! performs later with the very objects torch's `weights_only` unpickler would call, after
//! the same checks.
//!
//! Anything outside that set stops the machine with an [`Unsupported`] reason: the caller
//! then hands the file to torch's own safe loader. The machine runs in time and memory linear
//! in the pickle's size: every opcode does bounded work (containers grow by moving stack
//! items, a tensor copies at most [`MAX_DIMS`] sizes and strides, calls alias their
//! arguments instead of copying them), the memo must be dense, and nothing recurses.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;

/// Most dimensions a tensor may have here; more goes to torch.
pub const MAX_DIMS: usize = 64;
/// How far a memo index may run ahead of the memo (Python's pickler writes them densely).
const MEMO_SLACK: usize = 1024;
/// Dicts up to this size are searched linearly; larger ones get an index.
const SMALL_DICT: usize = 8;

/// A dtype torch pickles by name (`torch.float32`), with what the reader needs to know of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DtypeInfo {
    /// The name after `torch.` (`"bfloat16"`).
    pub name: &'static str,
    /// Bytes per element, where tensors of this dtype can be built here.
    pub itemsize: Option<u8>,
    /// The legacy storage class (`"FloatStorage"`), if torch has one.
    pub storage: Option<&'static str>,
    /// DLPack `(type code, bits)`, where DLPack has the type.
    pub dlpack: Option<(u8, u8)>,
}

const fn dt(
    name: &'static str,
    itemsize: Option<u8>,
    storage: Option<&'static str>,
    dlpack: Option<(u8, u8)>,
) -> DtypeInfo {
    DtypeInfo {
        name,
        itemsize,
        storage,
        dlpack,
    }
}

/// Every dtype in torch's `weights_only` allowlist. Those without an itemsize (quantized,
/// sub-byte and bit types) can appear as values, but their tensors go to torch.
pub const DTYPES: [DtypeInfo; 46] = [
    dt("float64", Some(8), Some("DoubleStorage"), Some((2, 64))),
    dt("float32", Some(4), Some("FloatStorage"), Some((2, 32))),
    dt("float16", Some(2), Some("HalfStorage"), Some((2, 16))),
    dt("bfloat16", Some(2), Some("BFloat16Storage"), Some((4, 16))),
    dt("int64", Some(8), Some("LongStorage"), Some((0, 64))),
    dt("int32", Some(4), Some("IntStorage"), Some((0, 32))),
    dt("int16", Some(2), Some("ShortStorage"), Some((0, 16))),
    dt("int8", Some(1), Some("CharStorage"), Some((0, 8))),
    dt("uint8", Some(1), Some("ByteStorage"), Some((1, 8))),
    dt("bool", Some(1), Some("BoolStorage"), Some((6, 8))),
    dt(
        "complex128",
        Some(16),
        Some("ComplexDoubleStorage"),
        Some((5, 128)),
    ),
    dt(
        "complex64",
        Some(8),
        Some("ComplexFloatStorage"),
        Some((5, 64)),
    ),
    dt("complex32", Some(4), None, None),
    dt("uint16", Some(2), None, Some((1, 16))),
    dt("uint32", Some(4), None, Some((1, 32))),
    dt("uint64", Some(8), None, Some((1, 64))),
    dt("float8_e4m3fn", Some(1), None, None),
    dt("float8_e5m2", Some(1), None, None),
    dt("float8_e4m3fnuz", Some(1), None, None),
    dt("float8_e5m2fnuz", Some(1), None, None),
    dt("float8_e8m0fnu", Some(1), None, None),
    dt("float4_e2m1fn_x2", Some(1), None, None),
    dt("qint8", None, Some("QInt8Storage"), None),
    dt("qint32", None, Some("QInt32Storage"), None),
    dt("quint8", None, Some("QUInt8Storage"), None),
    dt("quint4x2", None, Some("QUInt4x2Storage"), None),
    dt("quint2x4", None, Some("QUInt2x4Storage"), None),
    dt("bcomplex32", None, None, None),
    dt("bits8", None, None, None),
    dt("bits16", None, None, None),
    dt("bits1x8", None, None, None),
    dt("bits2x4", None, None, None),
    dt("bits4x2", None, None, None),
    dt("int1", None, None, None),
    dt("int2", None, None, None),
    dt("int3", None, None, None),
    dt("int4", None, None, None),
    dt("int5", None, None, None),
    dt("int6", None, None, None),
    dt("int7", None, None, None),
    dt("uint1", None, None, None),
    dt("uint2", None, None, None),
    dt("uint3", None, None, None),
    dt("uint4", None, None, None),
    dt("uint5", None, None, None),
    dt("uint6", None, None, None),
];

/// An index into [`DTYPES`].
pub type DtypeId = u8;

/// The row of `uint8`: what `torch.storage.UntypedStorage` holds.
pub const UINT8: DtypeId = 8;

/// The dtype `torch.<name>`.
pub fn dtype_by_name(name: &str) -> Option<DtypeId> {
    DTYPES
        .iter()
        .position(|d| d.name == name)
        .map(|i| i as DtypeId)
}

/// The dtype of [`DTYPES`] row `id`.
pub fn dtype(id: DtypeId) -> &'static DtypeInfo {
    DTYPES.get(usize::from(id)).unwrap_or(&DTYPES[0])
}

/// The globals this machine knows itself (a subset of torch's `weights_only` allowlist).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Global {
    /// `collections.OrderedDict`: `OrderedDict()` is built here, other calls are deferred.
    OrderedDict,
    /// `torch._utils._rebuild_tensor`.
    RebuildTensor,
    /// `torch._utils._rebuild_tensor_v2`.
    RebuildTensorV2,
    /// `torch._utils._rebuild_tensor_v3`.
    RebuildTensorV3,
    /// `torch._utils._rebuild_parameter`.
    RebuildParameter,
    /// `torch._utils._rebuild_parameter_with_state`.
    RebuildParameterWithState,
    /// `torch.<dtype>`.
    Dtype(DtypeId),
    /// `torch.<X>Storage`: a legacy typed storage class, seen in persistent ids.
    StorageType(DtypeId),
    /// `torch.storage.UntypedStorage`.
    UntypedStorage,
    /// A torch-allowlisted callable that the Python layer calls (see [`PyCallable`]).
    Py(PyCallable),
    /// Entry `i` of the caller's allowlist.
    User(u32),
}

/// The callables of torch's own allowlist that are called, not emulated, by the Python
/// layer: exactly what torch's unpickler calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PyCallable {
    Counter,
    Set,
    Complex,
    ByteArray,
    CodecsEncode,
    Size,
    Device,
}

impl PyCallable {
    /// Every one, in a fixed order (the binding keeps their objects in this order).
    pub const ALL: [PyCallable; 7] = [
        PyCallable::Counter,
        PyCallable::Set,
        PyCallable::Complex,
        PyCallable::ByteArray,
        PyCallable::CodecsEncode,
        PyCallable::Size,
        PyCallable::Device,
    ];

    /// `(module, attribute)` of the object.
    pub fn path(self) -> (&'static str, &'static str) {
        match self {
            PyCallable::Counter => ("collections", "Counter"),
            PyCallable::Set => ("builtins", "set"),
            PyCallable::Complex => ("builtins", "complex"),
            PyCallable::ByteArray => ("builtins", "bytearray"),
            PyCallable::CodecsEncode => ("_codecs", "encode"),
            PyCallable::Size => ("torch", "Size"),
            PyCallable::Device => ("torch", "device"),
        }
    }
}

/// Python 2 names, mapped as torch's unpickler maps them (`torch._utils.NAME_MAPPING`).
/// `(module, name)`.
type QualName = (&'static str, &'static str);

const NAME_MAPPING: [(QualName, QualName); 17] = [
    (("__builtin__", "xrange"), ("builtins", "range")),
    (("__builtin__", "reduce"), ("functools", "reduce")),
    (("__builtin__", "intern"), ("sys", "intern")),
    (("__builtin__", "unichr"), ("builtins", "chr")),
    (("__builtin__", "unicode"), ("builtins", "str")),
    (("__builtin__", "long"), ("builtins", "int")),
    (("itertools", "izip"), ("builtins", "zip")),
    (("itertools", "imap"), ("builtins", "map")),
    (("itertools", "ifilter"), ("builtins", "filter")),
    (("itertools", "ifilterfalse"), ("itertools", "filterfalse")),
    (("itertools", "izip_longest"), ("itertools", "zip_longest")),
    (
        ("UserDict", "IterableUserDict"),
        ("collections", "UserDict"),
    ),
    (("UserList", "UserList"), ("collections", "UserList")),
    (("UserString", "UserString"), ("collections", "UserString")),
    (("__builtin__", "basestring"), ("builtins", "str")),
    (("exceptions", "StandardError"), ("builtins", "Exception")),
    (("UserDict", "UserDict"), ("collections", "UserDict")),
];

/// Python 2 modules (`torch._utils.IMPORT_MAPPING`).
const IMPORT_MAPPING: [(&str, &str); 12] = [
    ("__builtin__", "builtins"),
    ("copy_reg", "copyreg"),
    ("Queue", "queue"),
    ("repr", "reprlib"),
    ("_abcoll", "collections.abc"),
    ("UserDict", "collections"),
    ("UserList", "collections"),
    ("UserString", "collections"),
    ("whichdb", "dbm"),
    ("StringIO", "io"),
    ("cStringIO", "io"),
    ("exceptions", "builtins"),
];

/// Modules torch's unpickler refuses whatever the allowlist says.
const BLOCKED_MODULES: [&str; 4] = ["sys", "os", "posix", "nt"];

/// The module and name torch's unpickler looks a global up by, after mapping Python 2 names
/// (`("__builtin__", "set")` is `("builtins", "set")`).
pub fn mapped_name<'a>(module: &'a str, name: &'a str) -> (&'a str, &'a str) {
    if let Some((_, (m, n))) = NAME_MAPPING
        .iter()
        .find(|((m, n), _)| *m == module && *n == name)
    {
        return (m, n);
    }
    let module = IMPORT_MAPPING
        .iter()
        .find(|(m, _)| *m == module)
        .map_or(module, |(_, to)| to);
    (module, name)
}

/// The full name torch's unpickler looks a global up by (`"builtins.set"`).
pub fn global_name(module: &str, name: &str) -> String {
    let (module, name) = mapped_name(module, name);
    format!("{module}.{name}")
}

/// The machine's own meaning of the global `full` (`"torch.float32"`), if it has one.
pub fn builtin_global(full: &str) -> Option<Global> {
    let g = match full {
        "collections.OrderedDict" => Global::OrderedDict,
        "collections.Counter" => Global::Py(PyCallable::Counter),
        "builtins.set" => Global::Py(PyCallable::Set),
        "builtins.complex" => Global::Py(PyCallable::Complex),
        "builtins.bytearray" => Global::Py(PyCallable::ByteArray),
        "_codecs.encode" => Global::Py(PyCallable::CodecsEncode),
        "torch.Size" => Global::Py(PyCallable::Size),
        "torch.device" => Global::Py(PyCallable::Device),
        "torch._utils._rebuild_tensor" => Global::RebuildTensor,
        "torch._utils._rebuild_tensor_v2" => Global::RebuildTensorV2,
        "torch._utils._rebuild_tensor_v3" => Global::RebuildTensorV3,
        "torch._utils._rebuild_parameter" => Global::RebuildParameter,
        "torch._utils._rebuild_parameter_with_state" => Global::RebuildParameterWithState,
        "torch.storage.UntypedStorage" => Global::UntypedStorage,
        _ => {
            let rest = full.strip_prefix("torch.")?;
            if let Some(id) = dtype_by_name(rest) {
                return Some(Global::Dtype(id));
            }
            let id = DTYPES.iter().position(|d| d.storage == Some(rest))?;
            return Some(Global::StorageType(id as DtypeId));
        }
    };
    Some(g)
}

/// A value on the machine's stack: small scalars inline, everything else a node.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum V {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Node(u32),
}

/// A byte range of the pickle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Span {
    pub at: u32,
    pub len: u32,
}

impl Span {
    /// The bytes of `data` this span covers.
    pub fn of(self, data: &[u8]) -> &[u8] {
        let at = self.at as usize;
        data.get(at..at + self.len as usize).unwrap_or_default()
    }
}

/// A node of the value graph.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Node {
    /// A str (UTF-8, checked).
    Str(Span),
    /// A bytes object (`bytearray` when the flag is set).
    Bytes(Span, bool),
    /// An int beyond 64 bits: little-endian two's complement.
    BigInt(Span),
    /// A tuple: `len` items of [`Pickle::items`] from `start`.
    Tuple { start: u32, len: u32 },
    /// A frozenset of [`Pickle::items`] (protocol 4's FROZENSET).
    FrozenSet { start: u32, len: u32 },
    /// `Pickle::lists[i]`.
    List(u32),
    /// `Pickle::dicts[i]`.
    Dict(u32),
    /// `Pickle::sets[i]` (protocol 4's EMPTY_SET / ADDITEMS).
    Set(u32),
    /// A global (as a value: a class, a dtype...).
    Global(Global),
    /// A storage reference: `Pickle::storages[i]`.
    Storage(u32),
    /// `Pickle::tensors[i]`.
    Tensor(u32),
    /// `Pickle::params[i]`.
    Param(u32),
    /// `Pickle::calls[i]`: a deferred REDUCE or NEWOBJ.
    Call(u32),
}

/// A list: its items and when it last changed (the opcode's offset).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct List {
    pub items: Vec<V>,
    pub changed: u32,
}

/// Which mapping type a dict node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DictKind {
    Dict,
    OrderedDict,
}

/// A key as Python's dict compares it (only str and int keys are kept here).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum DictKey<'a> {
    Str(&'a [u8]),
    Int(i64),
}

/// Passes on a hash computed elsewhere: dict indexes are keyed by SipHash values of the
/// keys (randomly keyed, as Python's str hashes are), computed once per key.
#[derive(Clone, Copy, Debug, Default)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed; fold anything else in for completeness.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type DictIndex = HashMap<u64, u32, std::hash::BuildHasherDefault<Prehashed>>;

/// A keyed hash of dict keys: multiply-fold rounds (as in foldhash) over 8-byte words, under
/// a secret random seed, so a crafted pickle can not aim keys at one bucket.
struct Keyer([u64; 2]);

impl Keyer {
    fn new() -> Self {
        let seed = std::collections::hash_map::RandomState::new();
        Keyer([seed.hash_one(0x5EED_u64), seed.hash_one(0xC0FFEE_u64)])
    }

    fn fold(a: u64, b: u64) -> u64 {
        let r = u128::from(a) * u128::from(b);
        (r as u64) ^ ((r >> 64) as u64)
    }

    fn hash(&self, key: DictKey<'_>) -> u64 {
        const K0: u64 = 0x243F_6A88_85A3_08D3;
        const K1: u64 = 0x1319_8A2E_0370_7344;
        let [s0, s1] = self.0;
        match key {
            DictKey::Int(i) => Self::fold(s0 ^ i as u64, s1 ^ K0),
            DictKey::Str(bytes) => {
                let mut h = s1 ^ (bytes.len() as u64).wrapping_mul(K1);
                let mut words = bytes.chunks_exact(8);
                for w in &mut words {
                    let w = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
                    h = Self::fold(h ^ w, s0 ^ K0);
                }
                let rest = words.remainder();
                if !rest.is_empty() {
                    let mut last = [0u8; 8];
                    last[..rest.len()].copy_from_slice(rest);
                    h = Self::fold(h ^ u64::from_le_bytes(last), s0 ^ K1);
                }
                Self::fold(h, s1 ^ K0)
            }
        }
    }
}

/// A dict or OrderedDict.
#[derive(Clone, Debug, PartialEq)]
pub struct Dict {
    pub kind: DictKind,
    /// Items in insertion order (a repeated key replaced the value in place, as in Python).
    pub items: Vec<(V, V)>,
    /// `__dict__.update(state)` calls from BUILD: `(state, offset of the BUILD)`.
    pub attrs: Vec<(V, u32)>,
    pub changed: u32,
    /// Key hash to position, for large dicts (a hash shared by two keys maps to the first;
    /// lookups check the key and search linearly on a mismatch).
    index: Option<Box<DictIndex>>,
}

/// A set (protocol 4).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Set {
    pub items: Vec<V>,
    pub changed: u32,
}

/// One persistent id: `('storage', storage_type, key, location, numel)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StorageRef {
    /// The record key (`"0"`: the record `data/0`).
    pub key: Span,
    /// The storage type's dtype (`uint8` for `UntypedStorage`).
    pub dtype: DtypeId,
    /// Where it was saved from (`"cpu"`, `"cuda:0"`).
    pub location: Span,
    /// Its size in elements of `dtype`.
    pub numel: u64,
}

/// A tensor rebuilt by `_rebuild_tensor*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorDef {
    /// Index into [`Pickle::storages`].
    pub storage: u32,
    pub dtype: DtypeId,
    pub offset: u64,
    /// Where its sizes, then its strides, start in [`Pickle::dims`].
    pub dims: u32,
    pub ndim: u8,
    pub requires_grad: bool,
}

/// A Parameter rebuilt by `_rebuild_parameter*`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParamDef {
    /// Index into [`Pickle::tensors`].
    pub tensor: u32,
    pub requires_grad: bool,
    /// `_rebuild_parameter_with_state`'s state, set by `torch._utils._set_obj_state`.
    pub state: Option<V>,
    /// The REDUCE's offset.
    pub at: u32,
}

/// What a deferred call does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    /// REDUCE: `func(*args)`.
    Reduce,
    /// NEWOBJ: `cls.__new__(cls, *args)`.
    NewObj,
}

/// A deferred REDUCE or NEWOBJ of a global, and the BUILDs applied to its result.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub kind: CallKind,
    pub func: Global,
    /// A tuple node.
    pub args: u32,
    /// The REDUCE / NEWOBJ's offset.
    pub at: u32,
    /// `(state, offset of the BUILD)`, in order.
    pub builds: Vec<(V, u32)>,
}

/// The machine's result: the value graph and the tables it refers to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pickle {
    pub root: Option<V>,
    pub nodes: Vec<Node>,
    pub items: Vec<V>,
    pub lists: Vec<List>,
    pub dicts: Vec<Dict>,
    pub sets: Vec<Set>,
    pub storages: Vec<StorageRef>,
    pub tensors: Vec<TensorDef>,
    /// Sizes and strides of the tensors.
    pub dims: Vec<u64>,
    pub params: Vec<ParamDef>,
    pub calls: Vec<Call>,
    /// The protocol of the PROTO opcode (0 when there is none).
    pub protocol: u8,
    /// A bit per node, set for nodes fetched from the memo: the only ones that can be
    /// reached twice (or from themselves), so the only ones a builder must remember.
    pub shared: Vec<u64>,
}

impl Pickle {
    /// The result (a run that returned `Ok` always has one).
    pub fn root(&self) -> V {
        self.root.unwrap_or(V::None)
    }

    /// Whether node `n` is reachable more than once (see [`Pickle::shared`]).
    pub fn is_shared(&self, n: u32) -> bool {
        self.shared
            .get(n as usize / 64)
            .is_some_and(|w| w & (1 << (n % 64)) != 0)
    }

    /// The node `v` refers to, if any.
    pub fn node(&self, v: V) -> Option<&Node> {
        match v {
            V::Node(i) => self.nodes.get(i as usize),
            _ => None,
        }
    }

    /// The sizes of tensor `t`.
    pub fn shape(&self, t: &TensorDef) -> &[u64] {
        let a = t.dims as usize;
        self.dims
            .get(a..a + usize::from(t.ndim))
            .unwrap_or_default()
    }

    /// The strides of tensor `t`.
    pub fn stride(&self, t: &TensorDef) -> &[u64] {
        let a = t.dims as usize + usize::from(t.ndim);
        self.dims
            .get(a..a + usize::from(t.ndim))
            .unwrap_or_default()
    }

    /// The items of a tuple or frozenset node.
    pub fn tuple_items(&self, start: u32, len: u32) -> &[V] {
        let s = start as usize;
        self.items.get(s..s + len as usize).unwrap_or_default()
    }
}

/// Why the machine stopped: something it does not implement (the caller falls back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsupported {
    pub reason: String,
    /// The offset in the pickle where it stopped.
    pub at: usize,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (data.pkl offset {})", self.reason, self.at)
    }
}

/// The caller's allowlist, by full name (`"numpy.dtype"`): each resolves to
/// [`Global::User`] with its position.
pub trait Allowlist: Sync {
    fn lookup(&self, full: &str) -> Option<u32>;
}

impl Allowlist for Vec<String> {
    fn lookup(&self, full: &str) -> Option<u32> {
        self.iter().position(|n| n == full).map(|i| i as u32)
    }
}

impl Allowlist for HashMap<String, u32> {
    fn lookup(&self, full: &str) -> Option<u32> {
        self.get(full).copied()
    }
}

mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const EMPTY_LIST: u8 = b']';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const BINFLOAT: u8 = b'G';
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const EMPTY_SET: u8 = 0x8f;
    pub const ADDITEMS: u8 = 0x90;
    pub const FROZENSET: u8 = 0x91;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
    pub const BYTEARRAY8: u8 = 0x96;
}

/// Runs the pickle `data`; globals outside the machine's table resolve through `allowed`.
pub fn run(data: &[u8], allowed: &dyn Allowlist) -> Result<Pickle, Unsupported> {
    if u32::try_from(data.len()).is_err() {
        return Err(Unsupported {
            reason: format!("data.pkl is {} bytes, over 4 GiB", data.len()),
            at: 0,
        });
    }
    let mut m = Machine {
        data,
        pos: 0,
        op_at: 0,
        allowed,
        out: Pickle::default(),
        stack: Vec::with_capacity(64),
        marks: Vec::with_capacity(16),
        memo: Vec::with_capacity(data.len() / 16),
        memo_count: 0,
        keyer: Keyer::new(),
        empty_tuple: None,
    };
    m.out.nodes.reserve(data.len() / 16);
    m.run()?;
    Ok(m.out)
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    op_at: usize,
    allowed: &'a dyn Allowlist,
    out: Pickle,
    stack: Vec<V>,
    marks: Vec<usize>,
    memo: Vec<Option<V>>,
    memo_count: usize,
    /// Keys the hashes of dict keys.
    keyer: Keyer,
    /// The node of `()`, once one was made.
    empty_tuple: Option<V>,
}

/// A tuple's items copied out (tensor and storage calls have at most 8 arguments).
#[derive(Clone, Copy)]
struct Small {
    items: [V; 8],
    len: usize,
}

impl Small {
    fn get(&self) -> &[V] {
        &self.items[..self.len]
    }
}

type Step<T> = Result<T, Unsupported>;

impl<'a> Machine<'a> {
    fn unsupported(&self, reason: impl Into<String>) -> Unsupported {
        Unsupported {
            reason: reason.into(),
            at: self.op_at,
        }
    }

    fn stop<T>(&self, reason: impl Into<String>) -> Step<T> {
        Err(self.unsupported(reason))
    }

    fn take(&mut self, n: usize) -> Step<&'a [u8]> {
        let data = self.data;
        match self
            .pos
            .checked_add(n)
            .and_then(|end| data.get(self.pos..end))
        {
            Some(bytes) => {
                self.pos += n;
                Ok(bytes)
            }
            None => self.stop("the pickle ends in the middle of an opcode"),
        }
    }

    fn take_array<const N: usize>(&mut self) -> Step<[u8; N]> {
        let bytes = self.take(N)?;
        Ok(bytes.try_into().unwrap_or([0; N]))
    }

    fn span(&mut self, n: usize) -> Step<Span> {
        let at = self.pos as u32;
        self.take(n)?;
        Ok(Span { at, len: n as u32 })
    }

    fn len_u32(&mut self) -> Step<usize> {
        Ok(u32::from_le_bytes(self.take_array()?) as usize)
    }

    fn len_u64(&mut self) -> Step<usize> {
        let n = u64::from_le_bytes(self.take_array()?);
        match usize::try_from(n) {
            Ok(n) => Ok(n),
            Err(_) => self.stop("a length beyond the pickle"),
        }
    }

    fn node(&mut self, node: Node) -> V {
        let id = self.out.nodes.len() as u32;
        self.out.nodes.push(node);
        V::Node(id)
    }

    fn push(&mut self, v: V) {
        self.stack.push(v);
    }

    fn pop(&mut self) -> Step<V> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.stop("stack underflow (a damaged pickle)");
        }
        Ok(self.stack.pop().unwrap_or(V::None))
    }

    fn top(&self) -> Step<V> {
        let floor = self.marks.last().copied().unwrap_or(0);
        match self.stack.last() {
            Some(&v) if self.stack.len() > floor => Ok(v),
            _ => self.stop("stack underflow (a damaged pickle)"),
        }
    }

    /// Pops the last MARK; returns where its items start on the stack (the caller takes
    /// them and truncates the stack there).
    fn pop_mark(&mut self) -> Step<usize> {
        match self.marks.pop() {
            Some(at) => Ok(at),
            None => self.stop("no MARK to pop to (a damaged pickle)"),
        }
    }

    /// The value just below the items of a MARK popped at `at` (the container they go to).
    fn below_mark(&self, at: usize) -> Step<V> {
        let floor = self.marks.last().copied().unwrap_or(0);
        match at.checked_sub(1).and_then(|i| self.stack.get(i)) {
            Some(&v) if at > floor => Ok(v),
            _ => self.stop("stack underflow (a damaged pickle)"),
        }
    }

    fn str_node(&mut self, n: usize) -> Step<()> {
        let span = self.span(n)?;
        if std::str::from_utf8(span.of(self.data)).is_err() {
            // Python reads lone surrogates (surrogatepass); leave those to torch.
            return self.stop("a str that is not strict UTF-8");
        }
        let v = self.node(Node::Str(span));
        self.push(v);
        Ok(())
    }

    fn bytes_node(&mut self, n: usize, bytearray: bool) -> Step<()> {
        let span = self.span(n)?;
        let v = self.node(Node::Bytes(span, bytearray));
        self.push(v);
        Ok(())
    }

    fn long(&mut self, n: usize) -> Step<()> {
        let span = self.span(n)?;
        let bytes = span.of(self.data);
        let v = if n <= 8 {
            let mut buf = if bytes.last().is_some_and(|&b| b & 0x80 != 0) {
                [0xFF; 8]
            } else {
                [0; 8]
            };
            buf[..n].copy_from_slice(bytes);
            V::Int(i64::from_le_bytes(buf))
        } else {
            self.node(Node::BigInt(span))
        };
        self.push(v);
        Ok(())
    }

    fn tuple_of(&mut self, items: &[V]) -> V {
        let start = self.out.items.len() as u32;
        self.out.items.extend_from_slice(items);
        self.node(Node::Tuple {
            start,
            len: items.len() as u32,
        })
    }

    fn tuple_n(&mut self, n: usize) -> Step<()> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() < floor + n {
            return self.stop("stack underflow (a damaged pickle)");
        }
        let at = self.stack.len() - n;
        let start = self.out.items.len() as u32;
        self.out.items.extend(self.stack.drain(at..));
        let v = self.node(Node::Tuple {
            start,
            len: n as u32,
        });
        self.push(v);
        Ok(())
    }

    fn memo_put(&mut self, index: usize) -> Step<()> {
        let v = self.top()?;
        if index == self.memo.len() {
            // What Python's pickler writes: the next index.
            self.memo.push(Some(v));
            self.memo_count += 1;
            return Ok(());
        }
        if index > self.memo.len() + MEMO_SLACK {
            return self.stop(format!(
                "a sparse memo (index {index} with {} entries)",
                self.memo.len()
            ));
        }
        if index == self.memo.len() {
            self.memo.push(None);
        } else if index > self.memo.len() {
            self.memo.resize(index + 1, None);
        }
        if self.memo[index].replace(v).is_none() {
            self.memo_count += 1;
        }
        Ok(())
    }

    fn memo_get(&mut self, index: usize) -> Step<()> {
        match self.memo.get(index).copied().flatten() {
            Some(v) => {
                if let V::Node(n) = v {
                    let word = n as usize / 64;
                    if word >= self.out.shared.len() {
                        self.out.shared.resize(word + 1, 0);
                    }
                    self.out.shared[word] |= 1 << (n % 64);
                }
                self.push(v);
                Ok(())
            }
            None => self.stop(format!("memo entry {index} is not defined")),
        }
    }

    fn global(&mut self, module: &str, name: &str) -> Step<()> {
        let full = global_name(module, name);
        if BLOCKED_MODULES.contains(&mapped_name(module, name).0) {
            return self.stop(format!("global {full}, whose module torch always refuses"));
        }
        let g = match builtin_global(&full) {
            Some(g) => g,
            None => match self.allowed.lookup(&full) {
                Some(i) => Global::User(i),
                None => return self.stop(format!("global {full} is not in the allowlist")),
            },
        };
        let v = self.node(Node::Global(g));
        self.push(v);
        Ok(())
    }

    fn line(&mut self) -> Step<&'a str> {
        let data = self.data;
        let rest = data.get(self.pos..).unwrap_or_default();
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return self.stop("a GLOBAL without its newline");
        };
        self.pos += n + 1;
        match std::str::from_utf8(&rest[..n]) {
            Ok(s) => Ok(s),
            Err(_) => self.stop("a GLOBAL name that is not UTF-8"),
        }
    }

    fn str_of(&self, v: V) -> Option<&'a str> {
        match self.out.node(v) {
            Some(&Node::Str(span)) => std::str::from_utf8(span.of(self.data)).ok(),
            _ => None,
        }
    }

    /// `(start, len)` of a tuple node's items.
    fn tuple_range(&self, v: V) -> Option<(usize, usize)> {
        match self.out.node(v) {
            Some(&Node::Tuple { start, len }) => Some((start as usize, len as usize)),
            _ => None,
        }
    }

    /// The items of a tuple node of at most 8 items.
    fn small_tuple(&self, v: V) -> Option<Small> {
        let (start, len) = self.tuple_range(v)?;
        let mut items = [V::None; 8];
        items
            .get_mut(..len)?
            .copy_from_slice(self.out.items.get(start..start + len)?);
        Some(Small { items, len })
    }

    fn global_of(&self, v: V) -> Option<Global> {
        match self.out.node(v) {
            Some(&Node::Global(g)) => Some(g),
            _ => None,
        }
    }

    fn run(&mut self) -> Step<()> {
        loop {
            self.op_at = self.pos;
            let opcode = self.take(1)?[0];
            match opcode {
                op::PROTO => {
                    let p = self.take(1)?[0];
                    if !(2..=5).contains(&p) {
                        return self.stop(format!("pickle protocol {p}"));
                    }
                    self.out.protocol = p;
                }
                op::FRAME => {
                    self.take(8)?;
                }
                op::STOP => {
                    let v = self.pop()?;
                    self.out.root = Some(v);
                    return Ok(());
                }
                op::MARK => self.marks.push(self.stack.len()),
                op::POP => {
                    // POP of an empty stack pops the mark (as Python's unpickler does).
                    let floor = self.marks.last().copied();
                    if floor == Some(self.stack.len()) {
                        self.marks.pop();
                    } else {
                        self.pop()?;
                    }
                }
                op::POP_MARK => {
                    let at = self.pop_mark()?;
                    self.stack.truncate(at);
                }
                op::NONE => self.push(V::None),
                op::NEWTRUE => self.push(V::Bool(true)),
                op::NEWFALSE => self.push(V::Bool(false)),
                op::BININT => {
                    let v = i32::from_le_bytes(self.take_array()?);
                    self.push(V::Int(v.into()));
                }
                op::BININT1 => {
                    let v = self.take(1)?[0];
                    self.push(V::Int(v.into()));
                }
                op::BININT2 => {
                    let v = u16::from_le_bytes(self.take_array()?);
                    self.push(V::Int(v.into()));
                }
                op::LONG1 => {
                    let n = usize::from(self.take(1)?[0]);
                    self.long(n)?;
                }
                op::LONG4 => {
                    let n = i32::from_le_bytes(self.take_array()?);
                    let Ok(n) = usize::try_from(n) else {
                        return self.stop("LONG4 with a negative length");
                    };
                    self.long(n)?;
                }
                op::BINFLOAT => {
                    let v = f64::from_be_bytes(self.take_array()?);
                    self.push(V::Float(v));
                }
                op::BINUNICODE => {
                    let n = self.len_u32()?;
                    self.str_node(n)?;
                }
                op::SHORT_BINUNICODE | op::SHORT_BINSTRING => {
                    // torch.load decodes Python 2 strings as UTF-8, like str.
                    let n = usize::from(self.take(1)?[0]);
                    self.str_node(n)?;
                }
                op::BINUNICODE8 => {
                    let n = self.len_u64()?;
                    self.str_node(n)?;
                }
                op::SHORT_BINBYTES => {
                    let n = usize::from(self.take(1)?[0]);
                    self.bytes_node(n, false)?;
                }
                op::BINBYTES => {
                    let n = self.len_u32()?;
                    self.bytes_node(n, false)?;
                }
                op::BINBYTES8 => {
                    let n = self.len_u64()?;
                    self.bytes_node(n, false)?;
                }
                op::BYTEARRAY8 => {
                    let n = self.len_u64()?;
                    self.bytes_node(n, true)?;
                }
                op::EMPTY_TUPLE => {
                    // () is one object in Python too: one node serves every EMPTY_TUPLE.
                    let v = match self.empty_tuple {
                        Some(v) => v,
                        None => {
                            let v = self.tuple_of(&[]);
                            self.empty_tuple = Some(v);
                            v
                        }
                    };
                    self.push(v);
                }
                op::TUPLE => {
                    let at = self.pop_mark()?;
                    let start = self.out.items.len() as u32;
                    self.out.items.extend_from_slice(&self.stack[at..]);
                    let len = (self.stack.len() - at) as u32;
                    self.stack.truncate(at);
                    let v = self.node(Node::Tuple { start, len });
                    self.push(v);
                }
                op::TUPLE1 => self.tuple_n(1)?,
                op::TUPLE2 => self.tuple_n(2)?,
                op::TUPLE3 => self.tuple_n(3)?,
                op::EMPTY_LIST => {
                    let id = self.out.lists.len() as u32;
                    self.out.lists.push(List::default());
                    let v = self.node(Node::List(id));
                    self.push(v);
                }
                op::APPEND => {
                    let item = self.pop()?;
                    let target = self.top()?;
                    self.extend_list(target, std::slice::from_ref(&item))?;
                }
                op::APPENDS => {
                    let at = self.pop_mark()?;
                    let target = self.below_mark(at)?;
                    let items = std::mem::take(&mut self.stack);
                    let r = self.extend_list(target, &items[at..]);
                    self.stack = items;
                    self.stack.truncate(at);
                    r?;
                }
                op::EMPTY_DICT => {
                    let v = self.new_dict(DictKind::Dict);
                    self.push(v);
                }
                op::SETITEM => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    let target = self.top()?;
                    self.set_items(target, &[key, value])?;
                }
                op::SETITEMS => {
                    let at = self.pop_mark()?;
                    if (self.stack.len() - at) % 2 != 0 {
                        return self.stop("SETITEMS with an odd number of items");
                    }
                    let target = self.below_mark(at)?;
                    // Lent out while the dict takes the items (the stack is not touched).
                    let items = std::mem::take(&mut self.stack);
                    let r = self.set_items(target, &items[at..]);
                    self.stack = items;
                    self.stack.truncate(at);
                    r?;
                }
                op::EMPTY_SET => {
                    let id = self.out.sets.len() as u32;
                    self.out.sets.push(Set::default());
                    let v = self.node(Node::Set(id));
                    self.push(v);
                }
                op::ADDITEMS => {
                    let at = self.pop_mark()?;
                    let target = self.below_mark(at)?;
                    let changed = self.op_at as u32;
                    match self.out.node(target) {
                        Some(&Node::Set(id)) => {
                            let set = &mut self.out.sets[id as usize];
                            set.items.extend_from_slice(&self.stack[at..]);
                            set.changed = changed;
                        }
                        _ => return self.stop("ADDITEMS to something that is not a set"),
                    }
                    self.stack.truncate(at);
                }
                op::FROZENSET => {
                    let at = self.pop_mark()?;
                    let start = self.out.items.len() as u32;
                    self.out.items.extend_from_slice(&self.stack[at..]);
                    let len = (self.stack.len() - at) as u32;
                    self.stack.truncate(at);
                    let v = self.node(Node::FrozenSet { start, len });
                    self.push(v);
                }
                op::BINPUT => {
                    let i = usize::from(self.take(1)?[0]);
                    self.memo_put(i)?;
                }
                op::LONG_BINPUT => {
                    let i = self.len_u32()?;
                    self.memo_put(i)?;
                }
                op::MEMOIZE => self.memo_put(self.memo_count)?,
                op::BINGET => {
                    let i = usize::from(self.take(1)?[0]);
                    self.memo_get(i)?;
                }
                op::LONG_BINGET => {
                    let i = self.len_u32()?;
                    self.memo_get(i)?;
                }
                op::GLOBAL => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (self.str_of(module), self.str_of(name)) {
                        (Some(module), Some(name)) => self.global(module, name)?,
                        _ => return self.stop("STACK_GLOBAL of values that are not str"),
                    }
                }
                op::BINPERSID => {
                    let pid = self.pop()?;
                    let v = self.persistent(pid)?;
                    self.push(v);
                }
                op::REDUCE => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.reduce(func, args)?;
                    self.push(v);
                }
                op::NEWOBJ => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.newobj(cls, args)?;
                    self.push(v);
                }
                op::BUILD => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    self.build(target, state)?;
                }
                other => {
                    return self.stop(format!("pickle opcode {:?} ({other:#04x})", other as char))
                }
            }
        }
    }

    fn extend_list(&mut self, target: V, items: &[V]) -> Step<()> {
        let at = self.op_at as u32;
        match self.out.node(target) {
            Some(&Node::List(id)) => {
                let list = &mut self.out.lists[id as usize];
                list.items.extend_from_slice(items);
                list.changed = at;
                Ok(())
            }
            _ => self.stop("APPEND to something that is not a list"),
        }
    }

    fn new_dict(&mut self, kind: DictKind) -> V {
        let id = self.out.dicts.len() as u32;
        self.out.dicts.push(Dict {
            kind,
            items: Vec::new(),
            attrs: Vec::new(),
            changed: self.op_at as u32,
            index: None,
        });
        self.node(Node::Dict(id))
    }

    fn dict_key(&self, key: V) -> Step<DictKey<'a>> {
        let data = self.data;
        match (key, self.out.node(key)) {
            (V::Int(i), _) => Ok(DictKey::Int(i)),
            (_, Some(&Node::Str(span))) => Ok(DictKey::Str(span.of(data))),
            _ => self.stop("a dict key that is neither str nor int"),
        }
    }

    fn set_items(&mut self, target: V, pairs: &[V]) -> Step<()> {
        let Some(&Node::Dict(id)) = self.out.node(target) else {
            return self.stop("SETITEM on something that is not a dict");
        };
        let at = self.op_at as u32;
        let data = self.data;
        for pair in pairs.chunks_exact(2) {
            let (key, value) = (pair[0], pair[1]);
            let k = self.dict_key(key)?;
            let nodes = &self.out.nodes;
            let key_of = |v: V| match (
                v,
                nodes.get(match v {
                    V::Node(n) => n as usize,
                    _ => usize::MAX,
                }),
            ) {
                (V::Int(i), _) => Some(DictKey::Int(i)),
                (_, Some(&Node::Str(s))) => Some(DictKey::Str(s.of(data))),
                _ => None,
            };
            let dict = &mut self.out.dicts[id as usize];
            dict.changed = at;
            let scan = |items: &[(V, V)]| items.iter().position(|&(e, _)| key_of(e) == Some(k));
            let hash = dict.index.as_ref().map(|_| self.keyer.hash(k));
            let found = match (&dict.index, hash) {
                (Some(index), Some(h)) => match index.get(&h) {
                    Some(&i) if key_of(dict.items[i as usize].0) == Some(k) => Some(i as usize),
                    Some(_) => scan(&dict.items),
                    None => None,
                },
                _ => scan(&dict.items),
            };
            if let Some(i) = found {
                // Python keeps the first key object and its position.
                dict.items[i].1 = value;
                continue;
            }
            let position = dict.items.len() as u32;
            dict.items.push((key, value));
            if let (Some(index), Some(h)) = (&mut dict.index, hash) {
                index.entry(h).or_insert(position);
            } else if dict.items.len() > SMALL_DICT {
                let mut index =
                    DictIndex::with_capacity_and_hasher(dict.items.len() * 2, Default::default());
                for (i, &(existing, _)) in dict.items.iter().enumerate() {
                    if let Some(k) = key_of(existing) {
                        index.entry(self.keyer.hash(k)).or_insert(i as u32);
                    }
                }
                dict.index = Some(Box::new(index));
            }
        }
        Ok(())
    }

    fn persistent(&mut self, pid: V) -> Step<V> {
        let Some(items) = self.small_tuple(pid) else {
            return self.stop("a persistent id that is not a short tuple");
        };
        let [tag, kind, key, location, numel] = *items.get() else {
            return self
                .stop("a persistent id that is not ('storage', type, key, location, numel)");
        };
        if !matches!(self.out.node(tag), Some(&Node::Str(s)) if s.of(self.data) == b"storage") {
            return self.stop("a persistent id that is not a storage");
        }
        let dtype = match self.global_of(kind) {
            Some(Global::StorageType(d)) if dtype(d).itemsize.is_some() => d,
            Some(Global::UntypedStorage) => UINT8,
            _ => return self.stop("a storage of a type this reader does not build"),
        };
        let (Some(&Node::Str(key)), Some(&Node::Str(location))) =
            (self.out.node(key), self.out.node(location))
        else {
            return self.stop("a storage whose key or location is not a str");
        };
        let V::Int(numel) = numel else {
            return self.stop("a storage whose size is not an int");
        };
        let Ok(numel) = u64::try_from(numel) else {
            return self.stop("a storage of negative size");
        };
        let id = self.out.storages.len() as u32;
        self.out.storages.push(StorageRef {
            key,
            dtype,
            location,
            numel,
        });
        Ok(self.node(Node::Storage(id)))
    }

    fn reduce(&mut self, func: V, args: V) -> Step<V> {
        let Some(g) = self.global_of(func) else {
            return self.stop("REDUCE of something that is not an allowed global");
        };
        let Some((_, len)) = self.tuple_range(args) else {
            return self.stop("REDUCE with arguments that are not a tuple");
        };
        let small = || {
            self.small_tuple(args)
                .ok_or_else(|| self.unsupported("a tensor rebuild call with too many arguments"))
        };
        match g {
            Global::OrderedDict if len == 0 => Ok(self.new_dict(DictKind::OrderedDict)),
            Global::RebuildTensor | Global::RebuildTensorV2 | Global::RebuildTensorV3 => {
                let items = small()?;
                let tensor = self.rebuild_tensor(g, items.get())?;
                Ok(self.node(Node::Tensor(tensor)))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                let items = small()?;
                self.rebuild_parameter(g, items.get())
            }
            Global::OrderedDict | Global::Py(_) | Global::User(_) => {
                Ok(self.deferred(CallKind::Reduce, g, args))
            }
            Global::Dtype(_) | Global::StorageType(_) | Global::UntypedStorage => {
                self.stop("REDUCE of a dtype or storage type")
            }
        }
    }

    fn newobj(&mut self, cls: V, args: V) -> Step<V> {
        match self.global_of(cls) {
            Some(g @ (Global::User(_) | Global::Py(_) | Global::OrderedDict))
                if self.tuple_range(args).is_some() =>
            {
                // As torch's NEWOBJ for allowed classes: cls.__new__(cls, *args), later.
                Ok(self.deferred(CallKind::NewObj, g, args))
            }
            _ => self.stop("NEWOBJ of something that is not an allowlisted class"),
        }
    }

    fn deferred(&mut self, kind: CallKind, func: Global, args: V) -> V {
        let V::Node(args) = args else {
            unreachable!("args were checked to be a tuple node")
        };
        let id = self.out.calls.len() as u32;
        self.out.calls.push(Call {
            kind,
            func,
            args,
            at: self.op_at as u32,
            builds: Vec::new(),
        });
        self.node(Node::Call(id))
    }

    fn build(&mut self, target: V, state: V) -> Step<()> {
        let at = self.op_at as u32;
        match self.out.node(target) {
            Some(&Node::Call(id)) => {
                self.out.calls[id as usize].builds.push((state, at));
                Ok(())
            }
            Some(&Node::Dict(id)) if self.out.dicts[id as usize].kind == DictKind::OrderedDict => {
                if !matches!(self.out.node(state), Some(Node::Dict(s))
                    if self.out.dicts[*s as usize].kind == DictKind::Dict)
                {
                    return self.stop("BUILD of an OrderedDict with a state that is not a dict");
                }
                let dict = &mut self.out.dicts[id as usize];
                dict.attrs.push((state, at));
                dict.changed = at;
                Ok(())
            }
            _ => self.stop("BUILD of something other than an OrderedDict or allowlisted object"),
        }
    }

    /// Appends the ints of tuple `v` to [`Pickle::dims`]; returns how many there were.
    fn ints(&mut self, v: V, what: &str) -> Step<usize> {
        let Some((start, len)) = self.tuple_range(v) else {
            return self.stop(format!("a tensor {what} that is not a tuple"));
        };
        if len > MAX_DIMS {
            return self.stop(format!("a tensor of {len} dimensions"));
        }
        for i in start..start + len {
            match self.out.items[i] {
                V::Int(n) if n >= 0 => self.out.dims.push(n as u64),
                V::Int(_) => return self.stop(format!("a negative tensor {what}")),
                _ => return self.stop(format!("a tensor {what} that is not ints")),
            }
        }
        Ok(len)
    }

    fn empty_hooks(&self, v: V) -> bool {
        matches!(self.out.node(v), Some(&Node::Dict(id))
            if self.out.dicts[id as usize].items.is_empty()
                && self.out.dicts[id as usize].attrs.is_empty())
    }

    /// `_rebuild_tensor(storage, offset, size, stride)`,
    /// `_rebuild_tensor_v2(..., requires_grad, backward_hooks[, metadata])`,
    /// `_rebuild_tensor_v3(..., requires_grad, backward_hooks, dtype[, metadata])`.
    fn rebuild_tensor(&mut self, g: Global, args: &[V]) -> Step<u32> {
        let (base, rest) = match (g, args.len()) {
            (Global::RebuildTensor, 4) => (&args[..4], &args[4..]),
            (Global::RebuildTensorV2, 6 | 7) | (Global::RebuildTensorV3, 7 | 8) => {
                (&args[..4], &args[4..])
            }
            _ => return self.stop("a tensor rebuild call with unexpected arguments"),
        };
        let Some(&Node::Storage(storage)) = self.out.node(base[0]) else {
            return self.stop("a tensor whose storage is not a persistent storage");
        };
        let offset = match base[1] {
            V::Int(n) if n >= 0 => n as u64,
            _ => return self.stop("a tensor whose storage offset is not a non-negative int"),
        };
        let dims = self.out.dims.len();
        let ndim = self.ints(base[2], "size")?;
        if self.ints(base[3], "stride")? != ndim {
            return self.stop("a tensor whose size and stride differ in length");
        }
        let storage_dtype = self.out.storages[storage as usize].dtype;
        let mut requires_grad = false;
        let mut dtype_id = storage_dtype;
        if let [rg, hooks, tail @ ..] = rest {
            let V::Bool(rg) = *rg else {
                return self.stop("a tensor whose requires_grad is not a bool");
            };
            requires_grad = rg;
            if !self.empty_hooks(*hooks) {
                return self.stop("a tensor with backward hooks");
            }
            let metadata = if g == Global::RebuildTensorV3 {
                let Some(Global::Dtype(d)) = tail.first().and_then(|&v| self.global_of(v)) else {
                    return self.stop("_rebuild_tensor_v3 without a dtype");
                };
                dtype_id = d;
                tail.get(1)
            } else {
                tail.first()
            };
            if let Some(&m) = metadata {
                let empty = matches!(self.out.node(m), Some(&Node::Dict(id))
                    if self.out.dicts[id as usize].items.is_empty());
                if !empty {
                    return self.stop("a tensor with metadata (conj or neg bits)");
                }
            }
        }
        if dtype(dtype_id).itemsize.is_none() {
            return self.stop(format!("a tensor of dtype torch.{}", dtype(dtype_id).name));
        }
        let id = self.out.tensors.len() as u32;
        self.out.tensors.push(TensorDef {
            storage,
            dtype: dtype_id,
            offset,
            dims: dims as u32,
            ndim: ndim as u8,
            requires_grad,
        });
        Ok(id)
    }

    /// `_rebuild_parameter(data, requires_grad, backward_hooks)` and
    /// `_rebuild_parameter_with_state(data, requires_grad, backward_hooks, state)`.
    fn rebuild_parameter(&mut self, g: Global, args: &[V]) -> Step<V> {
        let (data, rg, hooks, state) = match (g, args) {
            (Global::RebuildParameter, &[d, rg, h]) => (d, rg, h, None),
            (Global::RebuildParameterWithState, &[d, rg, h, s]) => (d, rg, h, Some(s)),
            _ => return self.stop("a Parameter rebuild call with unexpected arguments"),
        };
        let Some(&Node::Tensor(tensor)) = self.out.node(data) else {
            return self.stop("a Parameter whose data is not a plain tensor");
        };
        let V::Bool(requires_grad) = rg else {
            return self.stop("a Parameter whose requires_grad is not a bool");
        };
        if !self.empty_hooks(hooks) {
            return self.stop("a Parameter with backward hooks");
        }
        let id = self.out.params.len() as u32;
        self.out.params.push(ParamDef {
            tensor,
            requires_grad,
            state,
            at: self.op_at as u32,
        });
        Ok(self.node(Node::Param(id)))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A tiny pickle writer (protocol 2 opcodes, like `torch.save`).
    #[derive(Default)]
    pub(crate) struct W {
        pub out: Vec<u8>,
        memo: u32,
    }

    impl W {
        pub fn new() -> Self {
            let mut w = W::default();
            w.out.extend_from_slice(&[op::PROTO, 2]);
            w
        }
        pub fn op(&mut self, o: u8) -> &mut Self {
            self.out.push(o);
            self
        }
        pub fn put(&mut self) -> &mut Self {
            self.out.push(op::BINPUT);
            self.out.push(self.memo as u8);
            self.memo += 1;
            self
        }
        pub fn get(&mut self, i: u8) -> &mut Self {
            self.out.extend_from_slice(&[op::BINGET, i]);
            self
        }
        pub fn str(&mut self, s: &str) -> &mut Self {
            self.out.push(op::BINUNICODE);
            self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            self.out.extend_from_slice(s.as_bytes());
            self
        }
        pub fn int(&mut self, v: i32) -> &mut Self {
            self.out.push(op::BININT);
            self.out.extend_from_slice(&v.to_le_bytes());
            self
        }
        pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
            self.out.push(op::GLOBAL);
            self.out
                .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
            self
        }
        pub fn ints(&mut self, v: &[i32]) -> &mut Self {
            self.op(op::MARK);
            for &i in v {
                self.int(i);
            }
            self.op(op::TUPLE)
        }
        /// `_rebuild_tensor_v2(('storage', FloatStorage-like, key, 'cpu', numel), ...)`.
        pub fn tensor(
            &mut self,
            storage: &str,
            key: &str,
            numel: i32,
            offset: i32,
            shape: &[i32],
            stride: &[i32],
        ) -> &mut Self {
            self.global("torch._utils", "_rebuild_tensor_v2")
                .op(op::MARK)
                .op(op::MARK)
                .str("storage")
                .global("torch", storage)
                .str(key)
                .str("cpu")
                .int(numel)
                .op(op::TUPLE)
                .op(op::BINPERSID)
                .int(offset)
                .ints(shape)
                .ints(stride)
                .op(op::NEWFALSE)
                .global("collections", "OrderedDict")
                .op(op::EMPTY_TUPLE)
                .op(op::REDUCE)
                .op(op::TUPLE)
                .op(op::REDUCE)
        }
        pub fn stop(&mut self) -> Vec<u8> {
            self.out.push(op::STOP);
            std::mem::take(&mut self.out)
        }
    }

    fn no_allowlist() -> Vec<String> {
        Vec::new()
    }

    fn ok(data: &[u8]) -> Pickle {
        run(data, &no_allowlist()).unwrap()
    }

    fn unsupported(data: &[u8]) -> String {
        run(data, &no_allowlist()).unwrap_err().reason
    }

    #[test]
    fn state_dict_with_metadata() {
        let mut w = W::new();
        w.global("collections", "OrderedDict")
            .put()
            .op(op::EMPTY_TUPLE)
            .op(op::REDUCE)
            .put()
            .op(op::MARK)
            .str("a.weight")
            .tensor("FloatStorage", "0", 6, 0, &[2, 3], &[3, 1])
            .str("a.bias")
            .tensor("FloatStorage", "1", 2, 0, &[2], &[1])
            .op(op::SETITEMS)
            .op(op::EMPTY_DICT)
            .str("_metadata")
            .op(op::EMPTY_DICT)
            .str("a")
            .op(op::EMPTY_DICT)
            .str("version")
            .int(1)
            .op(op::SETITEM)
            .op(op::SETITEM)
            .op(op::SETITEM)
            .op(op::BUILD);
        let p = ok(&w.stop());
        assert_eq!(p.protocol, 2);
        let Some(&Node::Dict(d)) = p.node(p.root()) else {
            panic!("{:?}", p.root())
        };
        let dict = &p.dicts[d as usize];
        assert_eq!(dict.kind, DictKind::OrderedDict);
        assert_eq!(dict.items.len(), 2);
        assert_eq!(dict.attrs.len(), 1);
        assert_eq!(p.tensors.len(), 2);
        assert_eq!(p.shape(&p.tensors[0]), [2, 3]);
        assert_eq!(p.stride(&p.tensors[0]), [3, 1]);
        assert_eq!(p.tensors[0].dtype, dtype_by_name("float32").unwrap());
        assert_eq!(p.storages[1].numel, 2);
    }

    #[test]
    fn scalars_and_containers() {
        let mut w = W::new();
        w.op(op::MARK)
            .op(op::NONE)
            .op(op::NEWTRUE)
            .op(op::NEWFALSE)
            .int(-5)
            .op(op::BININT1)
            .op(200)
            .op(op::BININT2)
            .op(1)
            .op(1)
            .op(op::LONG1)
            .op(2)
            .op(0xFF)
            .op(0x7F)
            .op(op::LONG1)
            .op(9)
            .op(1)
            .op(0)
            .op(0)
            .op(0)
            .op(0)
            .op(0)
            .op(0)
            .op(0)
            .op(0x80)
            .op(op::BINFLOAT);
        w.out.extend_from_slice(&1.5f64.to_be_bytes());
        w.op(op::EMPTY_LIST)
            .op(op::MARK)
            .int(1)
            .int(2)
            .op(op::APPENDS)
            .op(op::TUPLE);
        let p = ok(&w.stop());
        let Some(&Node::Tuple { start, len }) = p.node(p.root()) else {
            panic!()
        };
        let items = p.tuple_items(start, len);
        assert_eq!(
            &items[..7],
            &[
                V::None,
                V::Bool(true),
                V::Bool(false),
                V::Int(-5),
                V::Int(200),
                V::Int(257),
                V::Int(0x7FFF)
            ]
        );
        assert!(matches!(p.node(items[7]), Some(Node::BigInt(s)) if s.len == 9));
        assert_eq!(items[8], V::Float(1.5));
        let Some(&Node::List(l)) = p.node(items[9]) else {
            panic!()
        };
        assert_eq!(p.lists[l as usize].items, [V::Int(1), V::Int(2)]);
    }

    #[test]
    fn negative_long1() {
        let p = ok(&[op::PROTO, 2, op::LONG1, 1, 0xFF, op::STOP]);
        assert_eq!(p.root(), V::Int(-1));
        let p = ok(&[op::PROTO, 2, op::LONG1, 0, op::STOP]);
        assert_eq!(p.root(), V::Int(0));
    }

    #[test]
    fn repeated_dict_keys_keep_the_first_position() {
        for n in [3usize, 20] {
            let mut w = W::new();
            w.op(op::EMPTY_DICT).op(op::MARK);
            for i in 0..n {
                w.str(&format!("k{i}")).int(i as i32);
            }
            w.str("k1").int(99).int(7).int(1).int(7).int(2);
            w.op(op::SETITEMS);
            let p = ok(&w.stop());
            let Some(&Node::Dict(d)) = p.node(p.root()) else {
                panic!()
            };
            let items = &p.dicts[d as usize].items;
            assert_eq!(items.len(), n + 1);
            assert_eq!(items[1].1, V::Int(99));
            assert_eq!(items[n], (V::Int(7), V::Int(2)));
        }
    }

    #[test]
    fn memo_shares_nodes() {
        let mut w = W::new();
        w.op(op::EMPTY_LIST)
            .put()
            .op(op::EMPTY_LIST)
            .get(0)
            .op(op::APPEND)
            .get(0)
            .op(op::TUPLE2);
        let p = ok(&w.stop());
        let Some(&Node::Tuple { start, len }) = p.node(p.root()) else {
            panic!()
        };
        let items = p.tuple_items(start, len);
        let Some(&Node::List(inner)) = p.node(items[0]) else {
            panic!()
        };
        assert_eq!(p.lists[inner as usize].items, [items[1]]);
    }

    #[test]
    fn protocol_4_opcodes() {
        // What pickle.dumps({'a': (1, b'xy', {3}), 'b': frozenset()}, protocol=4) uses.
        let data = [
            0x80, 4, 0x95, 0, 0, 0, 0, 0, 0, 0, 0, b'}', 0x94, b'(', 0x8c, 1, b'a', 0x94, b'K', 1,
            b'C', 2, b'x', b'y', 0x94, 0x8f, 0x94, b'(', b'K', 3, 0x90, 0x87, 0x94, 0x8c, 1, b'b',
            0x94, b'(', 0x91, 0x94, b'u', b'.',
        ];
        let p = ok(&data);
        let Some(&Node::Dict(d)) = p.node(p.root()) else {
            panic!()
        };
        assert_eq!(p.dicts[d as usize].items.len(), 2);
        assert_eq!(p.sets[0].items, [V::Int(3)]);
    }

    #[test]
    fn globals_resolve_through_the_table_and_the_allowlist() {
        assert_eq!(global_name("__builtin__", "set"), "builtins.set");
        assert_eq!(global_name("__builtin__", "unicode"), "builtins.str");
        assert_eq!(global_name("numpy", "dtype"), "numpy.dtype");
        assert_eq!(
            builtin_global("torch.BFloat16Storage"),
            Some(Global::StorageType(dtype_by_name("bfloat16").unwrap()))
        );
        assert_eq!(
            builtin_global("torch.uint16"),
            dtype_by_name("uint16").map(Global::Dtype)
        );
        assert_eq!(
            builtin_global("torch.storage.UntypedStorage"),
            Some(Global::UntypedStorage)
        );
        assert_eq!(builtin_global("torch.Tensor"), None);
        assert_eq!(builtin_global("torch._utils._rebuild_qtensor"), None);
        assert_eq!(builtin_global("builtins.getattr"), None);
        let mut w = W::new();
        w.global("numpy", "dtype")
            .str("f8")
            .op(op::TUPLE1)
            .op(op::REDUCE);
        let data = w.stop();
        assert!(unsupported(&data).contains("numpy.dtype"));
        let mut w = W::new();
        w.global("os", "getcwd");
        let blocked = run(&w.stop(), &vec!["os.getcwd".to_owned()]).unwrap_err();
        assert!(blocked.reason.contains("refuses"), "{}", blocked.reason);
        let allowed = vec!["numpy.dtype".to_owned()];
        let p = run(&data, &allowed).unwrap();
        assert_eq!(p.calls.len(), 1);
        assert_eq!(p.calls[0].func, Global::User(0));
    }

    #[test]
    fn code_execution_is_never_reachable() {
        for (module, name) in [
            ("os", "system"),
            ("posix", "system"),
            ("builtins", "eval"),
            ("__builtin__", "eval"),
            ("builtins", "getattr"),
            ("subprocess", "Popen"),
            ("torch", "load"),
        ] {
            let mut w = W::new();
            w.global(module, name)
                .str("echo hi")
                .op(op::TUPLE1)
                .op(op::REDUCE);
            let reason = unsupported(&w.stop());
            assert!(
                reason.contains("not in the allowlist") || reason.contains("refuses"),
                "{reason}"
            );
        }
        // STACK_GLOBAL built from str values is looked up the same way.
        let mut data = vec![0x80, 4];
        for s in ["os", "system"] {
            data.extend_from_slice(&[0x8c, s.len() as u8]);
            data.extend_from_slice(s.as_bytes());
        }
        data.extend_from_slice(&[0x93, b'.']);
        assert!(unsupported(&data).contains("os.system"));
        // REDUCE of a value that is not a global.
        let mut w = W::new();
        w.str("x").op(op::EMPTY_TUPLE).op(op::REDUCE);
        assert!(unsupported(&w.stop()).contains("REDUCE"));
    }

    #[test]
    fn unsupported_constructs_stop_the_machine() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0x80, 2, b'I', b'1', b'\n', b'.'], "opcode"),
            (vec![0x80, 1, b'.'], "protocol"),
            (vec![0x80, 2], "ends"),
            (vec![0x80, 2, b'.'], "underflow"),
            (vec![0x80, 2, b'e', b'.'], "MARK"),
            (vec![0x80, 2, b'h', 3, b'.'], "memo"),
            (vec![0x80, 2, b'N', b'r', 0, 0, 0, 1, b'.'], "sparse memo"),
            (vec![0x80, 2, b'X', 2, 0, 0, 0, 0xED, 0xA0, b'.'], "UTF-8"),
            (vec![0x80, 2, b'N', b'N', b'a', b'.'], "APPEND"),
            (vec![0x80, 2, b'N', b'N', b'N', b's', b'.'], "SETITEM"),
            (vec![0x80, 2, b'}', b'N', b'N', b's', b'.'], "dict key"),
            (vec![0x80, 2, b'N', b'}', b'b', b'.'], "BUILD"),
            (vec![0x80, 2, b'c', b'o', b's'], "newline"),
            (vec![0x80, 2, b'N', b'Q', b'.'], "persistent"),
        ];
        for (data, needle) in cases {
            let reason = unsupported(&data);
            assert!(reason.contains(needle), "{needle}: {reason}");
        }
    }

    #[test]
    fn tensor_arguments_are_checked() {
        let bad_shapes: [(&[i32], &[i32]); 3] = [(&[2, 3], &[3]), (&[-1], &[1]), (&[2], &[-1])];
        for (shape, stride) in bad_shapes {
            let mut w = W::new();
            w.tensor("FloatStorage", "0", 6, 0, shape, stride);
            assert!(unsupported(&w.stop()).contains("tensor"));
        }
        let mut w = W::new();
        w.tensor("FloatStorage", "0", 6, -1, &[1], &[1]);
        assert!(unsupported(&w.stop()).contains("offset"));
        let mut w = W::new();
        w.tensor("QInt8Storage", "0", 6, 0, &[1], &[1]);
        assert!(unsupported(&w.stop()).contains("storage"));
        let dims: Vec<i32> = vec![1; MAX_DIMS + 1];
        let mut w = W::new();
        w.tensor("FloatStorage", "0", 6, 0, &dims, &dims);
        assert!(unsupported(&w.stop()).contains("dimensions"));
    }

    #[test]
    fn parameters() {
        let mut w = W::new();
        w.global("torch._utils", "_rebuild_parameter")
            .op(op::MARK)
            .tensor("HalfStorage", "0", 4, 0, &[4], &[1])
            .op(op::NEWTRUE)
            .global("collections", "OrderedDict")
            .op(op::EMPTY_TUPLE)
            .op(op::REDUCE)
            .op(op::TUPLE)
            .op(op::REDUCE);
        let p = ok(&w.stop());
        assert_eq!(p.params.len(), 1);
        assert!(p.params[0].requires_grad);
        assert!(matches!(p.node(p.root()), Some(Node::Param(0))));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = run(&data, &no_allowlist());
        }

        #[test]
        fn damaged_state_dicts_never_panic(at in any::<prop::sample::Index>(), value in any::<u8>()) {
            let mut w = W::new();
            w.op(op::EMPTY_DICT).put().op(op::MARK);
            for i in 0..3 {
                w.str(&format!("t{i}")).tensor("FloatStorage", &i.to_string(), 4, 0, &[2, 2], &[2, 1]);
            }
            w.op(op::SETITEMS);
            let mut data = w.stop();
            let i = at.index(data.len());
            data[i] = value;
            if let Ok(p) = run(&data, &no_allowlist()) {
                for t in &p.tensors {
                    prop_assert!((t.storage as usize) < p.storages.len());
                    prop_assert_eq!(p.shape(t).len(), p.stride(t).len());
                }
            }
        }

        #[test]
        fn many_small_dicts_and_one_big_one_keep_python_order(n in 0usize..200) {
            let mut w = W::new();
            w.op(op::EMPTY_DICT);
            for i in 0..n {
                w.str(&format!("k{}", i % 150)).int(i as i32).op(op::SETITEM);
            }
            let p = ok(&w.stop());
            let Some(&Node::Dict(d)) = p.node(p.root()) else { panic!() };
            let items = &p.dicts[d as usize].items;
            prop_assert_eq!(items.len(), n.min(150));
            for (i, &(_, v)) in items.iter().enumerate() {
                let last = (0..n).filter(|j| j % 150 == i).max().unwrap();
                prop_assert_eq!(v, V::Int(last as i64));
            }
        }
    }
}
