//! Argmax (CONTRACT.md §9.9).

/// The index of the largest value; the lowest index wins ties (−0 and +0
/// are equal); a NaN counts as larger than every number, so the first NaN
/// wins. `None` for an empty row.
pub fn argmax_spec(x: &[f32]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &v) in x.iter().enumerate() {
        match best {
            None => best = Some(i),
            Some(b) => {
                let bv = x[b];
                if bv.is_nan() {
                    break;
                }
                if v.is_nan() || v > bv {
                    best = Some(i);
                }
            }
        }
    }
    best
}
