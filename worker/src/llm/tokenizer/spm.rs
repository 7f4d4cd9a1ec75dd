//! SentencePiece BPE, as Llama 2, TinyLlama and Mistral (GGUF
//! `tokenizer.ggml.model = "llama"`) and llama2.c tokenizer files use it:
//! spaces become `▁`, a `▁` is put in front of the text, the text is split
//! into characters (user-defined pieces whole), and the adjacent pair whose
//! joined piece has the highest score is merged, leftmost first on ties,
//! until no joined pair is a piece. What is left and is no piece is spelled
//! in byte pieces (`<0x41>`), or `<unk>` without them. This is
//! SentencePiece's `bpe_model.cc` and llama.cpp's `llm_tokenizer_spm`; the
//! tests check it against the `sentencepiece` package itself.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use anyhow::{bail, Result};

/// What a piece is (GGUF `tokenizer.ggml.token_type`, SentencePiece's
/// `ModelProto.SentencePiece.Type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl Kind {
    /// From GGUF's numbering (1 normal … 6 byte).
    pub fn from_gguf(t: u64) -> Result<Self> {
        Ok(match t {
            1 => Kind::Normal,
            2 => Kind::Unknown,
            3 => Kind::Control,
            4 => Kind::UserDefined,
            5 => Kind::Unused,
            6 => Kind::Byte,
            t => bail!("token type {t} is not one of 1..=6"),
        })
    }
}

/// A SentencePiece BPE vocabulary.
pub struct Spm {
    /// Pieces with `▁` for spaces, as SentencePiece stores them.
    pieces: Vec<String>,
    scores: Vec<f32>,
    kinds: Vec<Kind>,
    /// Pieces a merge may produce (normal and user-defined).
    mergeable: HashMap<String, u32>,
    /// User-defined pieces, longest first: matched whole in the text.
    user: Vec<(String, u32)>,
    bytes: [Option<u32>; 256],
    unk: Option<u32>,
    add_space_prefix: bool,
}

/// A candidate merge: the pieces at `left` and `right` (adjacent symbols)
/// join into a piece of `score` that is `len` bytes long.
struct Pair {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialEq for Pair {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Pair {}
impl PartialOrd for Pair {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pair {
    /// Highest score first, then leftmost.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

/// A run of the text: bytes `start..end`, linked to its neighbours.
#[derive(Clone, Copy)]
struct Sym {
    start: usize,
    end: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Spm {
    /// A vocabulary from its pieces (spaces as `▁`), scores and kinds.
    pub fn new(
        pieces: Vec<String>,
        scores: Vec<f32>,
        kinds: Vec<Kind>,
        add_space_prefix: bool,
    ) -> Result<Self> {
        if pieces.len() != scores.len() || pieces.len() != kinds.len() {
            bail!(
                "{} pieces, {} scores and {} types: they must be as many",
                pieces.len(),
                scores.len(),
                kinds.len()
            );
        }
        if pieces.is_empty() || pieces.len() > u32::MAX as usize {
            bail!("the vocabulary has {} pieces", pieces.len());
        }
        let mut mergeable = HashMap::new();
        let mut user = Vec::new();
        let mut bytes = [None; 256];
        let mut unk = None;
        for (i, (p, k)) in pieces.iter().zip(&kinds).enumerate() {
            let id = i as u32;
            match k {
                Kind::Normal | Kind::UserDefined => {
                    if mergeable.insert(p.clone(), id).is_some() {
                        bail!("piece {p:?} is in the vocabulary twice");
                    }
                    if *k == Kind::UserDefined {
                        user.push((p.clone(), id));
                    }
                }
                Kind::Byte => {
                    let b = p
                        .strip_prefix("<0x")
                        .and_then(|h| h.strip_suffix('>'))
                        .filter(|h| h.len() == 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok());
                    match b {
                        Some(b) if bytes[b as usize].is_none() => bytes[b as usize] = Some(id),
                        _ => bail!("byte piece {p:?} (id {id}) is not a new <0xXX>"),
                    }
                }
                Kind::Unknown => {
                    unk.get_or_insert(id);
                }
                Kind::Control | Kind::Unused => {}
            }
        }
        user.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        Ok(Self {
            pieces,
            scores,
            kinds,
            mergeable,
            user,
            bytes,
            unk,
            add_space_prefix,
        })
    }

    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    /// Token ids of `text` (no BOS: the caller adds it).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let mut norm = String::with_capacity(text.len() + 3);
        if self.add_space_prefix {
            norm.push('▁');
        }
        norm.push_str(&text.replace(' ', "▁"));
        // Characters, user-defined pieces whole.
        let mut syms: Vec<Sym> = Vec::new();
        let mut at = 0;
        while at < norm.len() {
            let rest = &norm[at..];
            let len = self
                .user
                .iter()
                .find(|(p, _)| rest.starts_with(p.as_str()))
                .map(|(p, _)| p.len())
                .unwrap_or_else(|| rest.chars().next().map_or(1, char::len_utf8));
            let i = syms.len();
            syms.push(Sym {
                start: at,
                end: at + len,
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                syms[i - 1].next = Some(i);
            }
            at += len;
        }
        let mut queue = BinaryHeap::new();
        let try_pair = |queue: &mut BinaryHeap<Pair>, syms: &[Sym], l: usize, r: usize| {
            let joined = &norm[syms[l].start..syms[r].end];
            if let Some(&id) = self.mergeable.get(joined) {
                queue.push(Pair {
                    score: self.scores[id as usize],
                    left: l,
                    right: r,
                    len: joined.len(),
                });
            }
        };
        for i in 1..syms.len() {
            try_pair(&mut queue, &syms, i - 1, i);
        }
        while let Some(p) = queue.pop() {
            let (l, r) = (syms[p.left], syms[p.right]);
            // Stale: one side was merged into something else since.
            if l.end == l.start
                || r.end == r.start
                || l.next != Some(p.right)
                || (l.end - l.start) + (r.end - r.start) != p.len
            {
                continue;
            }
            syms[p.left].end = r.end;
            syms[p.left].next = r.next;
            syms[p.right].end = syms[p.right].start;
            if let Some(n) = r.next {
                syms[n].prev = Some(p.left);
            }
            if let Some(pv) = l.prev {
                try_pair(&mut queue, &syms, pv, p.left);
            }
            if let Some(n) = r.next {
                try_pair(&mut queue, &syms, p.left, n);
            }
        }
        let mut ids = Vec::new();
        let mut cur = Some(0);
        while let Some(i) = cur {
            let s = syms[i];
            let piece = &norm[s.start..s.end];
            match self.mergeable.get(piece) {
                Some(&id) => ids.push(id),
                None => {
                    for b in piece.bytes() {
                        match self.bytes[b as usize].or(self.unk) {
                            Some(id) => ids.push(id),
                            None => bail!(
                                "{piece:?} is in no piece, and the vocabulary has neither byte pieces nor <unk>"
                            ),
                        }
                    }
                }
            }
            cur = s.next;
        }
        Ok(ids)
    }

    /// The text of `ids`: control and unknown pieces dropped, byte pieces
    /// as bytes (invalid UTF-8 shown as U+FFFD), `▁` as spaces, and the
    /// space the prefix added dropped after a leading BOS.
    pub fn decode(&self, ids: &[u32], bos: Option<u32>) -> String {
        let mut out: Vec<u8> = Vec::new();
        // The first piece after a leading BOS loses the prefix's space.
        let mut strip = false;
        for (n, &id) in ids.iter().enumerate() {
            let Some(piece) = self.pieces.get(id as usize) else {
                continue;
            };
            match self.kinds[id as usize] {
                Kind::Control | Kind::Unknown | Kind::Unused => {
                    strip = n == 0 && Some(id) == bos && self.add_space_prefix;
                    continue;
                }
                Kind::Byte => {
                    let h = &piece[3..5];
                    out.push(u8::from_str_radix(h, 16).expect("checked in new"));
                }
                Kind::Normal | Kind::UserDefined => {
                    let text = piece.replace('▁', " ");
                    let text = if strip {
                        text.strip_prefix(' ').unwrap_or(&text)
                    } else {
                        &text
                    };
                    out.extend_from_slice(text.as_bytes());
                }
            }
            strip = false;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// A llama2.c tokenizer file: i32 `max_token_length`, then per token an
/// f32 score, an i32 byte length and the bytes. Its pieces have spaces
/// where SentencePiece has `▁`; id 0 is `<unk>`, 1 and 2 are BOS and EOS,
/// `<0xXX>` are byte pieces.
pub fn from_llama2c(bytes: &[u8], vocab_size: usize) -> Result<Spm> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8]> {
        let end = at.checked_add(n).filter(|&e| e <= bytes.len());
        let Some(end) = end else {
            bail!("the tokenizer file ends early (at byte {at})");
        };
        let s = &bytes[at..end];
        at = end;
        Ok(s)
    };
    let max_len = i32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
    if !(1..=1 << 16).contains(&max_len) {
        bail!("max_token_length {max_len} is not a sensible length");
    }
    let (mut pieces, mut scores, mut kinds) = (Vec::new(), Vec::new(), Vec::new());
    for id in 0..vocab_size {
        let score = f32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
        let len = i32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
        if !(0..=max_len).contains(&len) {
            bail!("token {id} is {len} bytes long, outside 0..={max_len}");
        }
        let text = std::str::from_utf8(take(len as usize)?)
            .map_err(|_| anyhow::anyhow!("token {id} is not UTF-8"))?;
        let is_byte = text.len() == 6 && text.starts_with("<0x") && text.ends_with('>');
        let kind = match id {
            0 => Kind::Unknown,
            1 | 2 => Kind::Control,
            _ if is_byte => Kind::Byte,
            _ => Kind::Normal,
        };
        pieces.push(if kind == Kind::Normal {
            text.replace(' ', "▁")
        } else {
            text.to_string()
        });
        scores.push(score);
        kinds.push(kind);
    }
    if at != bytes.len() {
        bail!(
            "the tokenizer file has {} bytes after its {vocab_size} tokens (is it the tokenizer of another model?)",
            bytes.len() - at
        );
    }
    Spm::new(pieces, scores, kinds, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(pieces: &[(&str, f32)]) -> Spm {
        let mut p = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
        let mut s = vec![0.0; 3];
        let mut k = vec![Kind::Unknown, Kind::Control, Kind::Control];
        for b in 0..=255u8 {
            p.push(format!("<0x{b:02X}>"));
            s.push(0.0);
            k.push(Kind::Byte);
        }
        for (t, sc) in pieces {
            p.push(t.to_string());
            s.push(*sc);
            k.push(Kind::Normal);
        }
        Spm::new(p, s, k, true).unwrap()
    }

    #[test]
    fn merges_by_score_leftmost_first_and_falls_back_to_bytes() {
        let v = vocab(&[
            ("▁", -1.0),
            ("a", -2.0),
            ("b", -3.0),
            ("ab", -4.0),
            ("▁a", -5.0),
            ("▁ab", -6.0),
        ]);
        let id = |t: &str| v.mergeable[t];
        // "▁ab": ab (-4) beats ▁a (-5), then ▁+ab → ▁ab.
        assert_eq!(v.encode("ab").unwrap(), vec![id("▁ab")]);
        // No joined pair is a piece: the characters.
        assert_eq!(v.encode("ba").unwrap(), vec![id("▁"), id("b"), id("a")]);
        // Two equal pairs (a a a): the left one first.
        let t = vocab(&[("▁", -1.0), ("a", -2.0), ("aa", -3.0)]);
        let tid = |x: &str| t.mergeable[x];
        assert_eq!(
            t.encode("aaa").unwrap(),
            vec![tid("▁"), tid("aa"), tid("a")]
        );
        // é is in no piece: its two UTF-8 bytes.
        assert_eq!(v.encode("é").unwrap(), vec![id("▁"), 3 + 0xC3, 3 + 0xA9]);
        assert_eq!(v.decode(&v.encode("ab é").unwrap(), None), " ab é");
        let mut with_bos = vec![1];
        with_bos.extend(v.encode("ab").unwrap());
        assert_eq!(v.decode(&with_bos, Some(1)), "ab");
        assert!(v.encode("").unwrap().is_empty());
    }

    #[test]
    fn bad_vocabularies_are_refused() {
        assert!(Spm::new(vec!["a".into()], vec![], vec![Kind::Normal], true).is_err());
        let dup = Spm::new(
            vec!["a".into(), "a".into()],
            vec![0.0, 0.0],
            vec![Kind::Normal, Kind::Normal],
            true,
        );
        assert!(dup.is_err());
        let bad_byte = Spm::new(vec!["<0xZZ>".into()], vec![0.0], vec![Kind::Byte], true);
        assert!(bad_byte.is_err());
        assert!(from_llama2c(&[1, 0, 0, 0, 0, 0], 1).is_err());
    }
}
