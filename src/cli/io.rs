//! Tensor files of the CLI: `.npy` (read and written by hand) and `.safetensors` (through the
//! `safetensors` crate), converted to the f32 tensors and bit-packed masks that blockflash runs.
//!
//! `.npy`: format versions 1–3, C order, little-endian `<f4` (float32), `<f2` (float16), `|b1`
//! (bool) and `|u1` (uint8), as `np.save` writes them. Fortran order, big-endian data and other
//! dtypes are refused with a message that says how to convert. `.safetensors`: `F32`, `F16`,
//! `BF16`, `BOOL` and `U8` tensors, as `safetensors.torch.save_file` and `safetensors.numpy`
//! write them.

use std::collections::HashMap;
use std::path::Path;

use blockflash::{Error, Mask, Result};
use safetensors::{Dtype as StDtype, SafeTensors};

/// Element type of a tensor read from a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// IEEE float32.
    F32,
    /// IEEE float16.
    F16,
    /// bfloat16 (safetensors only).
    BF16,
    /// One byte per element, 0 or 1.
    Bool,
    /// One byte per element.
    U8,
}

impl Dtype {
    /// Bytes per element.
    fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::Bool | Dtype::U8 => 1,
        }
    }

    /// The name numpy and PyTorch users know.
    fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::BF16 => "bfloat16",
            Dtype::Bool => "bool",
            Dtype::U8 => "uint8",
        }
    }
}

/// A tensor as stored in a file: its shape, element type and little-endian bytes (C order).
#[derive(Clone, Debug)]
pub struct Tensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: Dtype,
    /// `product(shape) * dtype size` bytes.
    bytes: Vec<u8>,
    /// Where the tensor came from, for messages (`file` or `file:name`).
    pub source: String,
}

/// `[a, b, c]`
pub fn dims(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

fn io_error(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::Io(format!("{}: {why}", path.display()))
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| io_error(path, format!("cannot read: {e}")))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| io_error(path, format!("cannot write: {e}")))
}

impl Tensor {
    fn new(shape: Vec<usize>, dtype: Dtype, bytes: Vec<u8>, source: String) -> Result<Tensor> {
        let want = shape
            .iter()
            .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::Io(format!("{source}: shape {} overflows", dims(&shape))))?;
        if bytes.len() != want {
            return Err(Error::Io(format!(
                "{source}: shape {} of {} needs {want} bytes of data, the file has {}",
                dims(&shape),
                dtype.name(),
                bytes.len()
            )));
        }
        Ok(Tensor {
            shape,
            dtype,
            bytes,
            source,
        })
    }

    /// The elements as f32 (float32, float16 and bfloat16 tensors); `what` names the tensor in
    /// the error for other dtypes.
    pub fn to_f32(&self, what: &str) -> Result<Vec<f32>> {
        let halves = |f: fn(u16) -> f32| -> Vec<f32> {
            self.bytes
                .chunks_exact(2)
                .map(|c| f(u16::from_le_bytes([c[0], c[1]])))
                .collect()
        };
        match self.dtype {
            Dtype::F32 => Ok(self
                .bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()),
            Dtype::F16 => Ok(halves(|b| half::f16::from_bits(b).to_f32())),
            Dtype::BF16 => Ok(halves(|b| half::bf16::from_bits(b).to_f32())),
            other => Err(Error::Io(format!(
                "{} ({what}): expected float32, float16 or bfloat16, got {}",
                self.source,
                other.name()
            ))),
        }
    }

    /// The tensor as an attention mask (nonzero = allowed): `[Nq, Nk]` shared by the batch,
    /// `[B, Nq, Nk]` one per batch element (`B = 1`: shared), or `[B, 1, Nq, Nk]` as
    /// `scaled_dot_product_attention` takes it. Bool or uint8 only.
    pub fn to_mask(&self) -> Result<Mask> {
        if !matches!(self.dtype, Dtype::Bool | Dtype::U8) {
            return Err(Error::Io(format!(
                "{} (mask): expected bool or uint8 (true/nonzero = may attend), got {}; an \
                 additive float mask is not supported",
                self.source,
                self.dtype.name()
            )));
        }
        let (batches, nq, nk) = match self.shape[..] {
            [nq, nk] => (1, nq, nk),
            [b, nq, nk] | [b, 1, nq, nk] => (b, nq, nk),
            _ => {
                return Err(Error::Io(format!(
                    "{} (mask): expected shape [Nq, Nk], [B, Nq, Nk] or [B, 1, Nq, Nk], got {}",
                    self.source,
                    dims(&self.shape)
                )))
            }
        };
        if batches == 0 || nq == 0 || nk == 0 {
            return Err(Error::Empty("mask"));
        }
        let per = nq * nk;
        let masks = self
            .bytes
            .chunks_exact(per)
            .map(|m| pack_mask(nq, nk, m))
            .collect::<Result<Vec<Mask>>>()?;
        if batches == 1 {
            Ok(masks.into_iter().next().expect("one mask"))
        } else {
            Mask::per_batch(masks)
        }
    }
}

/// Packs row-major bytes (nonzero = allowed) into a [`Mask`].
fn pack_mask(nq: usize, nk: usize, bytes: &[u8]) -> Result<Mask> {
    let mut words = Vec::with_capacity(nq * nk.div_ceil(32));
    for row in bytes.chunks_exact(nk) {
        words.extend(row.chunks(32).map(|c| {
            c.iter()
                .enumerate()
                .fold(0u32, |w, (i, &b)| w | (u32::from(b != 0) << i))
        }));
    }
    Mask::from_words(nq, nk, words)
}

/// The file formats the CLI reads and writes, told by the file name's extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// numpy's `.npy`: one tensor.
    Npy,
    /// `.safetensors`: named tensors.
    Safetensors,
}

impl Format {
    /// The format of `path` by its extension (`.npy` or `.safetensors`).
    pub fn of(path: &Path) -> Result<Format> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("npy") => Ok(Format::Npy),
            Some("safetensors") => Ok(Format::Safetensors),
            _ => Err(io_error(
                path,
                "unknown file type: the name must end in .npy or .safetensors",
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// .npy

const NPY_MAGIC: &[u8] = b"\x93NUMPY";

/// The value that follows `'key':` in a numpy header dictionary, up to the next top-level comma
/// or closing brace (a tuple counts as one value).
fn npy_field<'h>(header: &'h str, key: &str) -> Option<&'h str> {
    let at = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = header[at + key.len() + 2..].trim_start();
    let rest = rest.strip_prefix(':')?.trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')')? + 1
    } else {
        rest.find([',', '}']).unwrap_or(rest.len())
    };
    Some(rest[..end].trim())
}

/// Reads one `.npy` file.
pub fn read_npy(path: &Path) -> Result<Tensor> {
    let mut bytes = read_file(path)?;
    let bad = |why: String| io_error(path, why);
    if bytes.len() < 10 || &bytes[..6] != NPY_MAGIC {
        return Err(bad("not a .npy file (no \\x93NUMPY magic)".into()));
    }
    let (header_len, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        2 | 3 => return Err(bad("truncated .npy header".into())),
        v => return Err(bad(format!(".npy format version {v} is not supported"))),
    };
    let end = start.saturating_add(header_len);
    let header = bytes
        .get(start..end)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("truncated or unreadable .npy header".into()))?;
    let field = |key: &str| {
        npy_field(header, key).ok_or_else(|| bad(format!("the .npy header has no '{key}'")))
    };
    let descr = field("descr")?.trim_matches(|c| c == '\'' || c == '"');
    let dtype = match descr {
        "<f4" => Dtype::F32,
        "<f2" => Dtype::F16,
        "|b1" | "<b1" | ">b1" => Dtype::Bool,
        "|u1" | "<u1" | ">u1" => Dtype::U8,
        d if d.starts_with('>') => {
            return Err(bad(format!(
            "big-endian data ({d}) is not supported; save arr.astype(arr.dtype.newbyteorder('<'))"
        )))
        }
        d => {
            return Err(bad(format!(
                "dtype {d} is not supported (float32 <f4, float16 <f2, bool |b1 or uint8 |u1)"
            )))
        }
    };
    match field("fortran_order")? {
        "False" => {}
        "True" => {
            return Err(bad(
                "Fortran-order array is not supported; save np.ascontiguousarray(arr)".into(),
            ))
        }
        other => return Err(bad(format!("fortran_order is {other}, not True or False"))),
    }
    let shape = field("shape")?
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<std::result::Result<Vec<usize>, _>>()
        .map_err(|e| bad(format!("unreadable shape in the .npy header: {e}")))?;
    bytes.drain(..end);
    Tensor::new(shape, dtype, bytes, path.display().to_string())
}

/// The bytes of a float32 `.npy` file (format 1.0, or 2.0 for very long headers).
fn npy_bytes(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let shape_text = match shape {
        [n] => format!("({n},)"),
        s => format!(
            "({})",
            s.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Magic, version, length field, header and a newline come to a multiple of 64 bytes.
    let v1 = header.len() + 11 < 65536;
    let prefix = if v1 { 10 } else { 12 };
    let padded = (prefix + header.len() + 1).next_multiple_of(64) - prefix - 1;
    header.extend(std::iter::repeat_n(' ', padded - header.len()));
    header.push('\n');
    let mut out = Vec::with_capacity(prefix + header.len() + data.len() * 4);
    out.extend_from_slice(NPY_MAGIC);
    if v1 {
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&[2, 0]);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    out.extend(data.iter().flat_map(|x| x.to_le_bytes()));
    out
}

// ---------------------------------------------------------------------------------------------
// .safetensors

/// Every tensor of a `.safetensors` file, by name.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = read_file(path)?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| io_error(path, format!("not a readable .safetensors file: {e}")))?;
    file.iter()
        .map(|(name, view)| {
            let source = format!("{}:{name}", path.display());
            let dtype = match view.dtype() {
                StDtype::F32 => Dtype::F32,
                StDtype::F16 => Dtype::F16,
                StDtype::BF16 => Dtype::BF16,
                StDtype::BOOL => Dtype::Bool,
                StDtype::U8 => Dtype::U8,
                other => {
                    return Err(Error::Io(format!(
                        "{source}: dtype {other:?} is not supported (F32, F16, BF16, BOOL or U8)"
                    )))
                }
            };
            let t = Tensor::new(view.shape().to_vec(), dtype, view.data().to_vec(), source)?;
            Ok((name.to_string(), t))
        })
        .collect()
}

/// The bytes of a `.safetensors` file holding one float32 tensor.
fn safetensors_bytes(name: &str, shape: &[usize], data: &[f32]) -> Result<Vec<u8>> {
    let raw: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(StDtype::F32, shape.to_vec(), &raw)
        .map_err(|e| Error::Io(format!("cannot build tensor {name}: {e}")))?;
    safetensors::serialize([(name, view)], None)
        .map_err(|e| Error::Io(format!("cannot serialise tensor {name}: {e}")))
}

// ---------------------------------------------------------------------------------------------
// By extension

/// Reads the tensor of a `.npy` file, or the tensor `name` of a `.safetensors` file (its only
/// tensor when it holds one).
pub fn read_tensor(path: &Path, name: &str) -> Result<Tensor> {
    match Format::of(path)? {
        Format::Npy => read_npy(path),
        Format::Safetensors => {
            let mut all = read_safetensors(path)?;
            if all.len() == 1 {
                return Ok(all.drain().next().expect("one tensor").1);
            }
            all.remove(name).ok_or_else(|| {
                io_error(
                    path,
                    format!("holds no single tensor and none named {name:?}"),
                )
            })
        }
    }
}

/// Writes a float32 tensor as `.npy`, or as `.safetensors` under `name`, by the extension.
pub fn write_f32(path: &Path, name: &str, shape: &[usize], data: &[f32]) -> Result<()> {
    debug_assert_eq!(shape.iter().product::<usize>(), data.len());
    let bytes = match Format::of(path)? {
        Format::Npy => npy_bytes(shape, data),
        Format::Safetensors => safetensors_bytes(name, shape, data)?,
    };
    write_file(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trip_and_header_alignment() {
        let dir = std::env::temp_dir().join(format!("blockflash-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.npy");
        let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        write_f32(&path, "x", &[2, 3, 4], &data).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let t = read_npy(&path).unwrap();
        assert_eq!((t.shape.clone(), t.dtype), (vec![2, 3, 4], Dtype::F32));
        assert_eq!(t.to_f32("x").unwrap(), data);
        write_f32(&path, "x", &[24], &data).unwrap();
        assert_eq!(read_npy(&path).unwrap().shape, vec![24]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn npy_fields_of_numpy_headers() {
        let h = "{'descr': '<f2', 'fortran_order': False, 'shape': (1, 2, 3), }";
        assert_eq!(npy_field(h, "descr"), Some("'<f2'"));
        assert_eq!(npy_field(h, "fortran_order"), Some("False"));
        assert_eq!(npy_field(h, "shape"), Some("(1, 2, 3)"));
        let scalar = "{'descr': '|b1', 'fortran_order': True, 'shape': ()}";
        assert_eq!(npy_field(scalar, "shape"), Some("()"));
        assert_eq!(npy_field(scalar, "fortran_order"), Some("True"));
    }

    #[test]
    fn masks_pack_rows_across_words() {
        let (nq, nk) = (3, 40);
        let bytes: Vec<u8> = (0..nq * nk).map(|i| (i % 3 == 0) as u8 * 7).collect();
        let t = Tensor::new(vec![nq, nk], Dtype::U8, bytes.clone(), "t".into()).unwrap();
        let m = t.to_mask().unwrap();
        assert_eq!(m, Mask::from_bytes(nq, nk, &bytes).unwrap());
        let per = Tensor::new(vec![2, 1, 3, 20], Dtype::Bool, bytes, "t".into()).unwrap();
        let m = per.to_mask().unwrap();
        assert!(m.is_per_batch() && m.batches() == 2);
    }
}
