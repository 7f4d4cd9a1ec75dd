//! llama2.c checkpoints (`../shared/README.md`): a header of seven i32,
//! then f32 arrays in a fixed order.

use std::path::Path;

use super::{Config, Model, Raw};
use crate::contract::quant::Format;
use crate::error::{Error, Result};

pub(super) fn load(path: &Path) -> Result<Model> {
    use std::io::{Read, Seek, SeekFrom};
    let source = path.display().to_string();
    let cannot = |e: std::io::Error| Error::model(format!("cannot read {source}: {e}"));
    // The header now; each array slice when the builder asks for it (the
    // model is packed from one tensor at a time, never the whole file).
    let mut file = std::fs::File::open(path).map_err(cannot)?;
    let len = file.metadata().map_err(cannot)?.len() as usize;
    let mut bytes = [0u8; 28];
    if len < 28 {
        return Err(Error::model(format!(
            "{source}: neither a GGUF file nor a llama2.c checkpoint (too short)"
        )));
    }
    file.read_exact(&mut bytes).map_err(cannot)?;
    let h: Vec<i32> = bytes
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let bad_header = || {
        Error::model(format!(
            "{source}: neither a GGUF file nor a llama2.c checkpoint (header {h:?})"
        ))
    };
    if h.iter().enumerate().any(|(i, &v)| v <= 0 && i != 5) || h[5] == 0 {
        return Err(bad_header());
    }
    let tied = h[5] > 0;
    let u = |v: i32| v.unsigned_abs() as usize;
    let config = Config {
        dim: u(h[0]),
        hidden_dim: u(h[1]),
        n_layers: u(h[2]),
        n_heads: u(h[3]),
        n_kv_heads: u(h[4]),
        vocab_size: u(h[5]),
        max_seq: u(h[6]),
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
    };
    config.check().map_err(|_| bad_header())?;
    let c = &config;
    let (d, hd, l, kv, v) = (c.dim, c.hidden_dim, c.n_layers, c.kv_dim(), c.vocab_size);
    // Offsets, in f32s after the header, of each array.
    let sizes = [
        ("token_embd", v * d),
        ("attn_norm", l * d),
        ("attn_q", l * d * d),
        ("attn_k", l * kv * d),
        ("attn_v", l * kv * d),
        ("attn_output", l * d * d),
        ("ffn_norm", l * d),
        ("ffn_gate", l * hd * d),
        ("ffn_down", l * d * hd),
        ("ffn_up", l * hd * d),
        ("output_norm", d),
        ("rope_tables", c.max_seq * c.head_dim()),
        ("output", if tied { 0 } else { v * d }),
    ];
    let mut offsets = std::collections::HashMap::new();
    let mut at = 0usize;
    for (name, n) in sizes {
        offsets.insert(name, at);
        at = at
            .checked_add(n)
            .ok_or_else(|| Error::model(format!("{source}: sizes overflow")))?;
    }
    let need = at
        .checked_mul(4)
        .and_then(|n| n.checked_add(28))
        .ok_or_else(|| Error::model(format!("{source}: sizes overflow")))?;
    if len < need {
        return Err(Error::model(format!(
            "{source}: truncated llama2.c checkpoint ({len} bytes, the header implies {need})"
        )));
    }
    Model::build(
        config.clone(),
        tied,
        source.clone(),
        None,
        |name, rows, cols| {
            // "blk.<l>.<what>" → the l-th slice of that array.
            let (what, layer) = match name.strip_prefix("blk.") {
                Some(rest) => {
                    let (l, w) = rest.split_once('.').expect("blk.<l>.<what>");
                    (w, l.parse::<usize>().expect("layer number"))
                }
                None => (name, 0),
            };
            let off = offsets[what] + layer * rows * cols;
            let mut data = vec![0u8; rows * cols * 4];
            file.seek(SeekFrom::Start(28 + off as u64 * 4))
                .and_then(|_| file.read_exact(&mut data))
                .map_err(cannot)?;
            Ok(Raw {
                format: Format::F32,
                rows,
                cols,
                bytes: data,
            })
        },
    )
}
