//! Safetensors files read strictly and tensor by tensor. The header is
//! checked whole before any weight is used (every name once, every dtype
//! and shape known, every tensor's bytes inside the file, the data covered
//! exactly: no overlap, no gap, nothing after the last tensor), with one
//! message per defect; then each tensor is read when the model builder
//! asks for it, so loading holds the packed model plus one tensor, never a
//! whole shard.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::de::{Deserializer, MapAccess, Visitor};

use crate::error::{Error, Result};

/// The largest header accepted (the safetensors format's own limit).
const MAX_HEADER: u64 = 100 << 20;

/// One tensor's entry in the header.
#[derive(Clone, Debug)]
pub struct Entry {
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Byte range in the file (absolute).
    start: u64,
    end: u64,
}

/// A safetensors file whose header has been checked.
#[derive(Debug)]
pub struct StFile {
    pub path: PathBuf,
    pub tensors: BTreeMap<String, Entry>,
}

/// The header's entries in file order, duplicates kept (serde_json's map
/// would keep only the last).
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = m.next_entry::<String, serde_json::Value>()? {
                    v.push((k, val));
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

impl StFile {
    /// Reads and checks the header of `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let p = path.display();
        let cannot = |e: std::io::Error| Error::model(format!("cannot read {p}: {e}"));
        let mut f = std::fs::File::open(path).map_err(cannot)?;
        let len = f.metadata().map_err(cannot)?.len();
        // The length field and the header it announces (or what there is).
        let mut prefix = Vec::new();
        (&mut f).take(8).read_to_end(&mut prefix).map_err(cannot)?;
        if prefix.len() == 8 {
            let n = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
            let want = n.min(MAX_HEADER).min(len.saturating_sub(8));
            (&mut f)
                .take(want)
                .read_to_end(&mut prefix)
                .map_err(cannot)?;
        }
        Self::from_prefix(path, len, &prefix)
    }

    /// Checks a header: `prefix` is the file's first bytes (at least the
    /// length field and the header, when the file has them), `len` the
    /// whole file's size. Nothing else is read.
    pub fn from_prefix(path: &Path, len: u64, prefix: &[u8]) -> Result<Self> {
        let p = path.display();
        let bad = |msg: String| Error::model(format!("{p}: {msg}"));
        if len < 8 || prefix.len() < 8 {
            return Err(bad(format!(
                "{len} bytes: too short for a safetensors header (truncated?)"
            )));
        }
        let n = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
        if n > MAX_HEADER {
            return Err(bad(format!("a header of {n} bytes is over the {MAX_HEADER}-byte limit: not a safetensors file?")));
        }
        if 8 + n > len || 8 + n > prefix.len() as u64 {
            return Err(bad(format!(
                "the header ({n} bytes) runs past the end of the file ({len} bytes): the file is truncated"
            )));
        }
        let header = &prefix[8..8 + n as usize];
        let entries: Entries = serde_json::from_slice(header)
            .map_err(|e| bad(format!("the header is not a JSON object: {e}")))?;
        let data_start = 8 + n;
        let mut tensors = BTreeMap::new();
        for (name, v) in entries.0 {
            if name == "__metadata__" {
                // Free-form strings (format, producer): not part of the maths.
                if !v
                    .as_object()
                    .is_some_and(|o| o.values().all(|s| s.is_string()))
                {
                    return Err(bad("__metadata__ is not a map of strings".into()));
                }
                continue;
            }
            let o = v
                .as_object()
                .ok_or_else(|| bad(format!("tensor {name}: its entry is not an object")))?;
            let dtype = o
                .get("dtype")
                .and_then(|d| d.as_str())
                .ok_or_else(|| bad(format!("tensor {name} has no dtype")))?
                .to_string();
            let size = dtype_size(&dtype)
                .ok_or_else(|| bad(format!("tensor {name}: unknown dtype {dtype:?}")))?;
            let shape: Vec<usize> = o
                .get("shape")
                .and_then(|s| serde_json::from_value(s.clone()).ok())
                .ok_or_else(|| bad(format!("tensor {name} has no shape of whole numbers")))?;
            let offsets: [u64; 2] = o
                .get("data_offsets")
                .and_then(|s| serde_json::from_value(s.clone()).ok())
                .ok_or_else(|| bad(format!("tensor {name} has no data_offsets [begin, end]")))?;
            if let Some(k) = o
                .keys()
                .find(|k| !matches!(k.as_str(), "dtype" | "shape" | "data_offsets"))
            {
                return Err(bad(format!("tensor {name}: unknown field {k:?}")));
            }
            let need = shape
                .iter()
                .try_fold(size, |a, &d| a.checked_mul(d as u64))
                .ok_or_else(|| bad(format!("tensor {name}: shape {shape:?} overflows")))?;
            let [b, e] = offsets;
            if e < b || e - b != need {
                return Err(bad(format!(
                    "tensor {name}: {dtype} {shape:?} is {need} bytes, but data_offsets [{b}, {e}] hold {}",
                    e.saturating_sub(b)
                )));
            }
            let (start, end) = (data_start + b, data_start.saturating_add(e));
            if end > len {
                return Err(bad(format!(
                    "tensor {name} ends at byte {end}, past the end of the file ({len} bytes): the file is truncated"
                )));
            }
            let entry = Entry {
                dtype,
                shape,
                start,
                end,
            };
            if tensors.insert(name.clone(), entry).is_some() {
                return Err(bad(format!("tensor {name} is named twice in the header")));
            }
        }
        // The data is covered exactly, in some order of the tensors.
        let mut spans: Vec<(u64, u64, &str)> = tensors
            .iter()
            .map(|(n, t)| (t.start, t.end, n.as_str()))
            .collect();
        spans.sort();
        let mut at = data_start;
        let mut last = "";
        for (s, e, name) in spans {
            if s < at {
                return Err(bad(format!("tensors {last} and {name} overlap")));
            }
            if s > at {
                return Err(bad(format!(
                    "bytes {}..{} (before tensor {name}) belong to no tensor",
                    at - data_start,
                    s - data_start
                )));
            }
            at = e;
            last = name;
        }
        if at != len {
            return Err(bad(format!(
                "{} bytes after the last tensor belong to no tensor",
                len - at
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
        })
    }

    /// The stored bytes of tensor `name` (read from the file now).
    pub fn read(&self, name: &str) -> Result<Vec<u8>> {
        let p = self.path.display();
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::model(format!("{p}: no tensor {name}")))?;
        let mut f = std::fs::File::open(&self.path)
            .map_err(|e| Error::model(format!("cannot read {p}: {e}")))?;
        let mut buf = vec![0u8; (t.end - t.start) as usize];
        f.seek(SeekFrom::Start(t.start))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(|e| {
                Error::model(format!("{p}: reading {name}: {e} (did the file change?)"))
            })?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: &[u8]) -> tempfile::NamedTempFile {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend(header.as_bytes());
        b.extend(data);
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b).unwrap();
        f
    }

    fn err(header: &str, data: &[u8]) -> String {
        match StFile::open(file(header, data).path()) {
            Ok(_) => panic!("{header} should be refused"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn every_defect_has_its_own_message() {
        let t = |name: &str, b: u64, e: u64| {
            format!(
                r#""{name}":{{"dtype":"F32","shape":[{}],"data_offsets":[{b},{e}]}}"#,
                (e - b) / 4
            )
        };
        let ok = format!("{{{},{}}}", t("a", 0, 8), t("b", 8, 16));
        let f = file(&ok, &[1u8; 16]);
        let st = StFile::open(f.path()).unwrap();
        assert_eq!(st.read("b").unwrap(), vec![1u8; 8]);
        let e = err(&ok, &[0u8; 12]);
        assert!(
            e.contains("tensor b ends at byte") && e.contains("the file is truncated"),
            "{e}"
        );
        assert!(err(&ok, &[0u8; 20]).contains("4 bytes after the last tensor"));
        assert!(err(
            &format!("{{{},{}}}", t("a", 0, 8), t("a", 8, 16)),
            &[0u8; 16]
        )
        .contains("tensor a is named twice"));
        assert!(err(
            &format!("{{{},{}}}", t("a", 0, 8), t("b", 4, 12)),
            &[0u8; 16]
        )
        .contains("overlap"));
        assert!(err(
            &format!("{{{},{}}}", t("a", 0, 8), t("b", 12, 20)),
            &[0u8; 20]
        )
        .contains("bytes 8..12 (before tensor b) belong to no tensor"));
        assert!(err(
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            &[0u8; 8]
        )
        .contains("is 12 bytes, but data_offsets [0, 8] hold 8"));
        assert!(err(
            r#"{"a":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}}"#,
            &[0u8; 8]
        )
        .contains("unknown dtype"));
        assert!(err("[1,2]", &[]).contains("not a JSON object"));
        let short = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(short.path(), [200u8, 0, 0, 0, 0, 0, 0, 0, b'{']).unwrap();
        assert!(StFile::open(short.path())
            .unwrap_err()
            .to_string()
            .contains("runs past the end"));
    }
}
