//! The one error type of blockflash: every bad input and every GPU failure becomes a variant here.

use std::fmt;

/// Everything that can go wrong in blockflash.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// No GPU adapter was found (on Linux without a GPU: `apt-get install mesa-vulkan-drivers`).
    NoAdapter(String),
    /// The adapter refused to create a device.
    RequestDevice(String),
    /// The device was lost or a GPU operation failed (validation, out of memory, map failure).
    Device(String),
    /// A tensor or mask has another shape or length than the problem needs.
    ShapeMismatch {
        /// Which tensor or argument.
        what: &'static str,
        /// The shape or length that was expected.
        expected: String,
        /// The shape or length that was given.
        got: String,
    },
    /// The number of query heads is not a multiple of the number of key/value heads.
    HeadsNotDivisible {
        /// Query heads.
        heads: usize,
        /// Key/value heads.
        kv_heads: usize,
    },
    /// The head dimension is not one the kernels support.
    UnsupportedHeadDim(usize),
    /// A tensor has a zero-sized dimension.
    Empty(&'static str),
    /// An argument is outside its valid range (window size, density, tile size, ...).
    InvalidArgument {
        /// Which argument.
        what: &'static str,
        /// Why it is invalid.
        why: String,
    },
    /// Document lengths do not add up to the sequence length.
    DocumentLengths {
        /// The sum of the given lengths.
        sum: usize,
        /// The sequence length they must add up to.
        seq: usize,
    },
    /// A tree parent array is invalid (out-of-range parent, cycle).
    InvalidTree(String),
    /// An operation needs a square mask (Nq == Nk), such as Reverse Cuthill–McKee.
    NotSquare {
        /// Query length.
        seq_q: usize,
        /// Key length.
        seq_k: usize,
    },
    /// A forced dispatch path cannot run on this mask (e.g. run-length on a mask that is not
    /// run-length eligible).
    PathNotEligible(String),
    /// A buffer would exceed a limit of the adapter and cannot be split further.
    TooLarge {
        /// Which buffer.
        what: &'static str,
        /// Its size in bytes.
        bytes: u64,
        /// The adapter limit it exceeds.
        limit_name: &'static str,
        /// The limit's value.
        limit: u64,
    },
    /// A kernel tier was requested that the adapter or the input cannot use.
    TierUnavailable(String),
    /// An I/O or file-format error (CLI and file readers).
    Io(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoAdapter(why) => write!(
                f,
                "no GPU adapter found ({why}); on Linux without a GPU install a software Vulkan \
                 driver: apt-get install mesa-vulkan-drivers libvulkan1"
            ),
            Error::RequestDevice(why) => write!(f, "the adapter refused to create a device: {why}"),
            Error::Device(why) => write!(f, "GPU error: {why}"),
            Error::ShapeMismatch {
                what,
                expected,
                got,
            } => write!(f, "{what}: expected {expected}, got {got}"),
            Error::HeadsNotDivisible { heads, kv_heads } => write!(
                f,
                "{heads} query heads are not a multiple of {kv_heads} key/value heads"
            ),
            Error::UnsupportedHeadDim(d) => write!(
                f,
                "head dimension {d} is not supported (supported: 32, 64, 96, 128, 256)"
            ),
            Error::Empty(what) => write!(f, "{what} has a zero-sized dimension"),
            Error::InvalidArgument { what, why } => write!(f, "invalid {what}: {why}"),
            Error::DocumentLengths { sum, seq } => write!(
                f,
                "document lengths add up to {sum}, but the sequence length is {seq}"
            ),
            Error::InvalidTree(why) => write!(f, "invalid tree: {why}"),
            Error::NotSquare { seq_q, seq_k } => {
                write!(f, "operation needs a square mask, got {seq_q} x {seq_k}")
            }
            Error::PathNotEligible(why) => write!(f, "path not eligible: {why}"),
            Error::TooLarge {
                what,
                bytes,
                limit_name,
                limit,
            } => write!(
                f,
                "{what} needs {bytes} bytes, over the adapter's {limit_name} of {limit} bytes, \
                 and cannot be split further"
            ),
            Error::TierUnavailable(why) => write!(f, "kernel tier unavailable: {why}"),
            Error::Io(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for Error {}

/// Result with blockflash's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
