//! A small GGUF reader (versions 2 and 3): the metadata and the tensor
//! table. Every length and count read from the file is checked against the
//! file's size before anything is allocated, so a corrupt or hostile file
//! gives an error, never a panic or a huge allocation (fuzzed by `lockstep
//! bench fuzz`, target "gguf header"; bad files in `tests/tests/model.rs`).

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::UInt(v) => Some(v),
            Value::Int(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::Float(v) => Some(v as f32),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
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

/// One tensor's entry in the table.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the innermost (columns).
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Absolute offset of its data in the file.
    pub offset: u64,
}

/// A parsed GGUF header.
#[derive(Debug)]
pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub file_size: u64,
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
    /// The whole file's size (`buf` may be its first part).
    file_size: u64,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::model(format!("not a valid GGUF file: {}", msg.into()))
}

impl Reader<'_> {
    /// Bytes of the file after the cursor, given `left` in the buffer.
    fn file_left(&self, left: u64) -> u64 {
        left.max(self.file_size.saturating_sub(self.at as u64))
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| bad(format!("{TRUNCATED} {}", self.at)))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    /// A count of items of at least `min_bytes` each, checked against what
    /// is left of the header.
    fn count(&mut self, min_bytes: usize, what: &str) -> Result<usize> {
        let n = self.u64()?;
        let left = (self.buf.len() - self.at) as u64;
        let need = n.saturating_mul(min_bytes.max(1) as u64);
        if need > self.file_left(left) {
            return Err(bad(format!("{what} count {n} exceeds the file")));
        }
        if need > left {
            // Fits the file, not what was read of it.
            return Err(bad(format!("{TRUNCATED} {} ({what} count {n})", self.at)));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.count(1, "string length")?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| bad("a string is not UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::UInt(self.take(1)?[0] as u64),
            1 => Value::Int(self.take(1)?[0] as i8 as i64),
            2 => Value::UInt(u16::from_le_bytes(self.take(2)?.try_into().unwrap()) as u64),
            3 => Value::Int(i16::from_le_bytes(self.take(2)?.try_into().unwrap()) as i64),
            4 => Value::UInt(self.u32()? as u64),
            5 => Value::Int(self.u32()? as i32 as i64),
            6 => Value::Float(f32::from_bits(self.u32()?) as f64),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(bad("arrays nested too deeply"));
                }
                let et = self.u32()?;
                let n = self.count(1, "array")?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(et, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::UInt(self.u64()?),
            11 => Value::Int(self.u64()? as i64),
            12 => Value::Float(f64::from_bits(self.u64()?)),
            t => return Err(bad(format!("unknown metadata type {t}"))),
        })
    }
}

/// How much of a file's start to read for its header: grown until the
/// header fits.
const FIRST_READ: usize = 8 << 20;
/// The largest header read.
const MAX_HEADER: usize = 512 << 20;
/// The words of every error that more bytes could cure.
const TRUNCATED: &str = "truncated at byte";

impl Gguf {
    /// Reads the header of the file at `path`.
    pub fn open(path: &std::path::Path) -> Result<Gguf> {
        use std::io::Read;
        let mut f = std::fs::File::open(path)
            .map_err(|e| Error::model(format!("cannot open {}: {e}", path.display())))?;
        let size = f
            .metadata()
            .map_err(|e| Error::model(format!("cannot read {}: {e}", path.display())))?
            .len();
        let mut want = FIRST_READ;
        let mut buf = Vec::new();
        loop {
            let n = (want as u64).min(size) as usize;
            if buf.len() < n {
                let mut more = vec![0u8; n - buf.len()];
                f.read_exact(&mut more)
                    .map_err(|e| Error::model(format!("cannot read {}: {e}", path.display())))?;
                buf.extend_from_slice(&more);
            }
            match Gguf::parse(&buf, size) {
                // A header longer than what was read: read more, up to a
                // bound (real headers are a few MiB: the vocabulary).
                Err(e) if buf.len() < size as usize && e.message.contains(TRUNCATED) => {
                    if want >= MAX_HEADER {
                        return Err(bad(format!("header larger than {} MiB", MAX_HEADER >> 20)));
                    }
                    want = want.saturating_mul(4).min(MAX_HEADER);
                }
                r => return r,
            }
        }
    }

    /// Parses a header from the file's first bytes (`file_size` is the whole
    /// file's size, for the tensor bounds).
    pub fn parse(buf: &[u8], file_size: u64) -> Result<Gguf> {
        let mut r = Reader {
            buf,
            at: 0,
            file_size,
        };
        if r.take(4)? != b"GGUF" {
            return Err(bad("the magic is not GGUF"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!("version {version} (only 2 and 3 are read)")));
        }
        let n_tensors = r.count(24, "tensor")?;
        let n_kv = r.count(12, "metadata")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            if metadata.contains_key(&key) {
                return Err(bad(format!("metadata key {key} appears twice")));
            }
            metadata.insert(key, v);
        }
        let mut infos = Vec::with_capacity(n_tensors);
        let mut names = std::collections::BTreeSet::new();
        for _ in 0..n_tensors {
            let name = r.string()?;
            let nd = r.u32()?;
            if nd > 4 {
                return Err(bad(format!("tensor {name} has {nd} dimensions")));
            }
            let dims = (0..nd).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            if !names.insert(name.clone()) {
                return Err(bad(format!("tensor {name} is named twice")));
            }
            infos.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let align = match metadata.get("general.alignment") {
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two() && *a <= 1 << 16)
                .ok_or_else(|| bad("general.alignment"))?,
            None => 32,
        };
        let data_start = (r.at as u64).div_ceil(align) * align;
        for t in &mut infos {
            t.offset = t
                .offset
                .checked_add(data_start)
                .filter(|o| *o <= file_size)
                .ok_or_else(|| bad(format!("tensor {} starts beyond the file", t.name)))?;
        }
        Ok(Gguf {
            version,
            metadata,
            tensors: infos,
            file_size,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}
