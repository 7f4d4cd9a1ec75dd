// Contract arithmetic, exact on any conforming WGSL implementation: every
// value stays a u32 bit pattern and every rounding is done in integers.
// Used where the conformance probe fails (e.g. lavapipe splits fma()).

fn mac(a: u32, b: u32, acc: u32) -> u32 {
    return sf_fma(a, b, acc);
}

// x + y, one rounding: fma(x, 1.0, y), since x * 1 is exact.
fn add(x: u32, y: u32) -> u32 {
    return sf_fma(x, 0x3F800000u, y);
}

// x * y, one rounding: fma(x, y, -0.0) keeps the sign of a zero product.
fn mul(x: u32, y: u32) -> u32 {
    return sf_fma(x, y, 0x80000000u);
}
