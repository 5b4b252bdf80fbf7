//! GGUF files (llama.cpp's format, version 2 and 3): the header, the metadata key/values, the
//! tensor directory, and the tensors themselves dequantized to fp32 (F32, F16, BF16, Q8_0, Q4_0,
//! Q4_1). The whole file is read into memory; tensor data starts at the first multiple of
//! `general.alignment` (default 32) after the directory, and each tensor's offset is relative
//! to that start. Dimensions are stored fastest-varying first (`ne0`), so a tensor of dims
//! `[in, out]` is the row-major `[out, in]` matrix [`Gguf::tensor`] returns.

use crate::{LmError, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Bounds that keep a corrupt header from asking for absurd allocations.
const MAX_DIMS: u32 = 4;
const MAX_COUNT: u64 = 1 << 24;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any integer type (non-negative), as u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The ggml tensor types this reader dequantizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    BF16,
}

impl GgmlType {
    fn from_u32(t: u32) -> Option<Self> {
        Some(match t {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// Elements per block and bytes per block.
    fn block(self) -> (u64, u64) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q8_0 => (32, 34),
        }
    }
}

/// The name llama.cpp gives a ggml type number (for error messages).
fn ggml_type_name(t: u32) -> &'static str {
    match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16..=23 | 29 => "IQ*",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        30 => "BF16",
        _ => "unknown",
    }
}

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as stored: fastest-varying first.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    fn n_bytes(&self) -> u64 {
        let (per, bytes) = self.ggml_type.block();
        self.n_elements() / per * bytes
    }

    /// The row-major (PyTorch) shape: the stored dimensions reversed.
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }
}

/// A parsed GGUF file, its bytes kept for [`Gguf::tensor`].
pub struct Gguf {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    data_start: usize,
    bytes: Vec<u8>,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: u64, what: &str) -> std::result::Result<&[u8], String> {
        let end = usize::try_from(n).ok().and_then(|n| self.pos.checked_add(n)).filter(|&e| e <= self.b.len());
        let Some(end) = end else {
            return Err(format!(
                "truncated: {what} needs {n} bytes at offset {}, the file has {}",
                self.pos,
                self.b.len()
            ));
        };
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        Ok(self.take(N as u64, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let n = self.u64(what)?;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn value(&mut self, ty: u32, what: &str, depth: u32) -> std::result::Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>(what)?[0]),
            1 => Value::I8(i8::from_le_bytes(self.arr(what)?)),
            2 => Value::U16(u16::from_le_bytes(self.arr(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.arr(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.arr(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.arr(what)?)),
            7 => Value::Bool(self.arr::<1>(what)?[0] != 0),
            8 => Value::String(self.string(what)?),
            9 if depth == 0 => {
                let ety = self.u32(what)?;
                let n = self.u64(what)?;
                if n > MAX_COUNT {
                    return Err(format!("{what}: array of {n} elements"));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(ety, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.arr(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(what)?)),
            _ => return Err(format!("{what}: unknown metadata value type {ty}")),
        })
    }
}

fn f16_to_f32(b: [u8; 2]) -> f32 {
    half::f16::from_le_bytes(b).to_f32()
}

/// Dequantizes `n` elements of type `ty` from `raw` (exactly `n / block * bytes` bytes).
fn dequantize(ty: GgmlType, raw: &[u8], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    match ty {
        GgmlType::F32 => out.extend(raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()))),
        GgmlType::F16 => out.extend(raw.chunks_exact(2).map(|c| f16_to_f32([c[0], c[1]]))),
        GgmlType::BF16 => out.extend(raw.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())),
        GgmlType::Q8_0 => {
            for blk in raw.chunks_exact(34) {
                let d = f16_to_f32([blk[0], blk[1]]);
                out.extend(blk[2..].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
        GgmlType::Q4_0 => {
            for blk in raw.chunks_exact(18) {
                let d = f16_to_f32([blk[0], blk[1]]);
                let q = &blk[2..];
                out.extend(q.iter().map(|&b| (f32::from(b & 0xF) - 8.0) * d));
                out.extend(q.iter().map(|&b| (f32::from(b >> 4) - 8.0) * d));
            }
        }
        GgmlType::Q4_1 => {
            for blk in raw.chunks_exact(20) {
                let d = f16_to_f32([blk[0], blk[1]]);
                let m = f16_to_f32([blk[2], blk[3]]);
                let q = &blk[4..];
                out.extend(q.iter().map(|&b| f32::from(b & 0xF) * d + m));
                out.extend(q.iter().map(|&b| f32::from(b >> 4) * d + m));
            }
        }
    }
    out
}

impl Gguf {
    /// Reads and parses `path` (the header and directory; tensors are dequantized on demand).
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|e| LmError::File { path: path.to_path_buf(), msg: format!("cannot read: {e}") })?;
        Self::parse(path, bytes)
    }

    /// Parses a GGUF file's `bytes`; `path` only names it in errors.
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let err = |msg: String| LmError::File { path: path.to_path_buf(), msg: format!("GGUF: {msg}") };
        let mut r = Reader { b: &bytes, pos: 0 };
        let magic = r.arr::<4>("the magic").map_err(err)?;
        if &magic != MAGIC {
            return Err(err(format!("bad magic {magic:02x?} (expected \"GGUF\"): not a GGUF file")));
        }
        let version = r.u32("the version").map_err(err)?;
        if !(2..=3).contains(&version) {
            return Err(err(format!("version {version} is not supported (2 or 3)")));
        }
        let n_tensors = r.u64("the tensor count").map_err(err)?;
        let n_kv = r.u64("the metadata count").map_err(err)?;
        if n_tensors > MAX_COUNT || n_kv > MAX_COUNT {
            return Err(err(format!("implausible counts: {n_tensors} tensors, {n_kv} metadata entries")));
        }
        let mut metadata = HashMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key {i}")).map_err(err)?;
            let ty = r.u32(&format!("the type of {key}")).map_err(err)?;
            let v = r.value(ty, &key, 0).map_err(err)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = r.string(&format!("tensor {i}'s name")).map_err(err)?;
            let nd = r.u32(&format!("tensor {name}'s rank")).map_err(err)?;
            if nd == 0 || nd > MAX_DIMS {
                return Err(err(format!("tensor {name} has {nd} dimensions")));
            }
            let dims =
                (0..nd).map(|_| r.u64(&format!("tensor {name}'s dims"))).collect::<std::result::Result<Vec<_>, _>>();
            let dims = dims.map_err(err)?;
            let raw_ty = r.u32(&format!("tensor {name}'s type")).map_err(err)?;
            let ggml_type = GgmlType::from_u32(raw_ty).ok_or_else(|| {
                err(format!(
                    "tensor {name} has ggml type {raw_ty} ({}), not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1)",
                    ggml_type_name(raw_ty)
                ))
            })?;
            let offset = r.u64(&format!("tensor {name}'s offset")).map_err(err)?;
            let n = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).filter(|&n| n > 0 && n < 1 << 40);
            let Some(n) = n else {
                return Err(err(format!("tensor {name} has implausible dims {dims:?}")));
            };
            let (per, _) = ggml_type.block();
            if dims[0] % per != 0 {
                return Err(err(format!(
                    "tensor {name}: first dim {} is not a multiple of the {per}-element block",
                    dims[0]
                )));
            }
            debug_assert!(n % per == 0);
            tensors.push(TensorInfo { name, dims, ggml_type, offset });
        }
        let align = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_u64()
                .filter(|&a| a > 0 && a.is_power_of_two())
                .ok_or_else(|| err(format!("bad general.alignment {v:?}")))?,
        };
        let data_start = (r.pos as u64).div_ceil(align) * align;
        let data_len = (bytes.len() as u64).saturating_sub(data_start);
        for t in &tensors {
            if t.offset % align != 0 {
                return Err(err(format!("tensor {} at offset {} is not {align}-byte aligned", t.name, t.offset)));
            }
            if t.offset.checked_add(t.n_bytes()).is_none_or(|end| end > data_len) {
                return Err(err(format!(
                    "truncated: tensor {} needs bytes {}..{} of the data section, which has {data_len}",
                    t.name,
                    t.offset,
                    t.offset.saturating_add(t.n_bytes())
                )));
            }
        }
        let by_name = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            by_name,
            data_start: data_start as usize,
            bytes,
        })
    }

    fn err(&self, msg: String) -> LmError {
        LmError::File { path: self.path.clone(), msg: format!("GGUF: {msg}") }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required integer metadata value.
    pub fn u64(&self, key: &str) -> Result<u64> {
        self.get(key).and_then(Value::as_u64).ok_or_else(|| self.err(format!("no integer metadata {key}")))
    }

    /// A required string metadata value.
    pub fn str(&self, key: &str) -> Result<&str> {
        self.get(key).and_then(Value::as_str).ok_or_else(|| self.err(format!("no string metadata {key}")))
    }

    /// A required array of strings.
    pub fn strings(&self, key: &str) -> Result<Vec<&str>> {
        let a = self.get(key).and_then(Value::as_array).ok_or_else(|| self.err(format!("no array metadata {key}")))?;
        a.iter().map(|v| v.as_str().ok_or_else(|| self.err(format!("{key} holds a non-string")))).collect()
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// Tensor `name` dequantized to fp32, in row-major shape (the stored dims reversed).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let t = self.info(name).ok_or_else(|| self.err(format!("missing tensor {name}")))?;
        let start = self.data_start + t.offset as usize;
        let raw = &self.bytes[start..start + t.n_bytes() as usize];
        let v = dequantize(t.ggml_type, raw, t.n_elements() as usize);
        Ok(Tensor::from_slice(&v).view(t.shape().as_slice()).to_kind(Kind::Float))
    }

    /// Tensor `name`, checked to have row-major shape `shape`.
    pub fn tensor_shaped(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let info = self.info(name).ok_or_else(|| self.err(format!("missing tensor {name}")))?;
        if info.shape() != shape {
            return Err(self.err(format!("tensor {name} has shape {:?}, the metadata implies {shape:?}", info.shape())));
        }
        self.tensor(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small GGUF file: the given metadata (already encoded) and tensors (name, dims, type,
    /// data), laid out as llama.cpp writes them.
    pub(crate) fn build(kv: &[(&str, u32, Vec<u8>)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(kv.len() as u64).to_le_bytes());
        let s = |b: &mut Vec<u8>, x: &str| {
            b.extend_from_slice(&(x.len() as u64).to_le_bytes());
            b.extend_from_slice(x.as_bytes());
        };
        for (k, ty, v) in kv {
            s(&mut b, k);
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(v);
        }
        let mut off = 0u64;
        let mut offs = Vec::new();
        for (name, dims, ty, data) in tensors {
            s(&mut b, name);
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(&off.to_le_bytes());
            offs.push(off);
            off += (data.len() as u64).div_ceil(32) * 32;
        }
        while b.len() % 32 != 0 {
            b.push(0);
        }
        for (_, _, _, data) in tensors {
            b.extend_from_slice(data);
            while b.len() % 32 != 0 {
                b.push(0);
            }
        }
        b
    }

    fn string_value(x: &str) -> Vec<u8> {
        let mut v = (x.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(x.as_bytes());
        v
    }

    fn f16(x: f32) -> [u8; 2] {
        half::f16::from_f32(x).to_le_bytes()
    }

    fn parse(b: Vec<u8>) -> Result<Gguf> {
        Gguf::parse(Path::new("/models/test.gguf"), b)
    }

    fn values(g: &Gguf, name: &str) -> Vec<f32> {
        let t = g.tensor(name).unwrap().flatten(0, -1);
        Vec::<f32>::try_from(&t).unwrap()
    }

    #[test]
    fn reads_metadata_and_dequantizes_every_type() {
        // Q4_1: d = 0.5, m = -1: nibble j of byte i is weight i (low) or i + 16 (high).
        let mut q41 = Vec::new();
        q41.extend_from_slice(&f16(0.5));
        q41.extend_from_slice(&f16(-1.0));
        q41.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        // Q4_0: d = 2, (nibble - 8) * d.
        let mut q40 = f16(2.0).to_vec();
        q40.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        // Q8_0: d = 0.25, signed bytes.
        let mut q80 = f16(0.25).to_vec();
        q80.extend((0..32i8).map(|i| (i - 16) as u8));
        let f32s: Vec<u8> = [1.5f32, -2.0, 3.25, 0.0, 7.0, 8.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let f16s: Vec<u8> = [0.5f32, -0.25].iter().flat_map(|&x| f16(x)).collect();
        let mut arr = 8u32.to_le_bytes().to_vec(); // array of strings
        arr.extend_from_slice(&2u64.to_le_bytes());
        arr.extend(string_value("a"));
        arr.extend(string_value("b c"));
        let b = build(
            &[
                ("general.architecture", 8, string_value("llama")),
                ("llama.block_count", 4, 30u32.to_le_bytes().to_vec()),
                ("llama.rope.freq_base", 6, 100000f32.to_le_bytes().to_vec()),
                ("tokenizer.ggml.merges", 9, arr),
                ("flag", 7, vec![1]),
            ],
            &[
                ("q41", vec![32], 3, q41),
                ("q40", vec![32], 2, q40),
                ("q80", vec![32], 8, q80),
                ("f32", vec![3, 2], 0, f32s),
                ("f16", vec![2], 1, f16s),
            ],
        );
        let g = parse(b).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.str("general.architecture").unwrap(), "llama");
        assert_eq!(g.u64("llama.block_count").unwrap(), 30);
        assert_eq!(g.get("llama.rope.freq_base").and_then(Value::as_f64), Some(100000.0));
        assert_eq!(g.strings("tokenizer.ggml.merges").unwrap(), ["a", "b c"]);
        assert_eq!(g.get("flag").and_then(Value::as_bool), Some(true));
        let want: Vec<f32> =
            (0..16).map(|i| i as f32 * 0.5 - 1.0).chain((0..16).map(|i| (15 - i) as f32 * 0.5 - 1.0)).collect();
        assert_eq!(values(&g, "q41"), want);
        let want: Vec<f32> =
            (0..16).map(|i| (i as f32 - 8.0) * 2.0).chain((0..16).map(|i| (7 - i) as f32 * 2.0)).collect();
        assert_eq!(values(&g, "q40"), want);
        let want: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.25).collect();
        assert_eq!(values(&g, "q80"), want);
        // dims [3, 2] (ne0 = 3 fastest) are the row-major [2, 3].
        let t = g.tensor("f32").unwrap();
        assert_eq!(t.size(), [2, 3]);
        assert_eq!(t.double_value(&[1, 0]), 0.0);
        assert_eq!(values(&g, "f16"), [0.5, -0.25]);
        let e = g.tensor_shaped("f32", &[3, 2]).err().unwrap().to_string();
        assert!(e.contains("test.gguf") && e.contains("shape [2, 3]"), "{e}");
        assert!(g.tensor("nope").err().unwrap().to_string().contains("missing tensor nope"));
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let good = build(&[("general.architecture", 8, string_value("llama"))], &[("w", vec![4], 0, vec![0u8; 16])]);
        assert!(parse(good.clone()).is_ok());
        let msg = |b: Vec<u8>| parse(b).err().expect("must fail").to_string();

        let mut bad = good.clone();
        bad[..4].copy_from_slice(b"GGML");
        let e = msg(bad);
        assert!(e.contains("/models/test.gguf") && e.contains("bad magic"), "{e}");

        let mut bad = good.clone();
        bad[4..8].copy_from_slice(&7u32.to_le_bytes());
        assert!(msg(bad).contains("version 7 is not supported"));

        // Cut inside the metadata, inside the tensor directory, and inside the tensor data.
        for cut in [30, good.len() - 60, good.len() - 20] {
            let e = msg(good[..cut].to_vec());
            assert!(e.contains("/models/test.gguf") && e.contains("truncated"), "cut at {cut}: {e}");
        }
        let e = msg(Vec::new());
        assert!(e.contains("truncated") && e.contains("magic"), "{e}");

        let k = build(&[], &[("w", vec![32], 12, vec![0u8; 144])]); // Q4_K
        let e = msg(k);
        assert!(e.contains("tensor w has ggml type 12 (Q4_K), not supported"), "{e}");

        let v = build(&[("x", 99, vec![0; 8])], &[]);
        assert!(msg(v).contains("x: unknown metadata value type 99"));

        let q = build(&[], &[("w", vec![31], 3, vec![0u8; 20])]);
        assert!(msg(q).contains("not a multiple of the 32-element block"));
    }
}
