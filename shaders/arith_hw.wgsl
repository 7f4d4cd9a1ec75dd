// Contract arithmetic on the GPU's own float units. Only used after the
// conformance probe has shown that fma() is fused and correctly rounded,
// that + and * are correctly rounded, and that subnormals are kept.

fn mac(a: u32, b: u32, acc: u32) -> u32 {
    return bitcast<u32>(fma(bitcast<f32>(a), bitcast<f32>(b), bitcast<f32>(acc)));
}

fn add(x: u32, y: u32) -> u32 {
    return bitcast<u32>(bitcast<f32>(x) + bitcast<f32>(y));
}

fn mul(x: u32, y: u32) -> u32 {
    return bitcast<u32>(bitcast<f32>(x) * bitcast<f32>(y));
}
