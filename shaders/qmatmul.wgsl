// y[t, r] = W[r, :] · x[t, :] for a weight matrix stored packed, as the
// model file holds it (CONTRACT.md §9.1-9.2): F32, F16 and BF16 rows are
// dot products in the contract's 256-chunks; Q8_0 and Q4_1 rows are summed
// block by block, each block's quants widened exactly in the kernel.
// One thread per (row, token); a row's bits depend on nothing else.
// Needs mac(), add(), canon().

struct Dims {
    // Rows of W in this part, its columns, the tokens (rows of x).
    rows: u32,
    cols: u32,
    tokens: u32,
    // 0 f32, 1 f16, 2 bf16, 3 q8_0, 4 q4_1 (kernels/src/wgpu/ops.rs).
    format: u32,
    // Where this part's rows start in y's rows, and y's row length.
    row0: u32,
    y_cols: u32,
}

@group(0) @binding(0) var<storage, read> w: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read_write> y: array<u32>;
@group(0) @binding(3) var<uniform> dims: Dims;

fn w_byte(i: u32) -> u32 {
    return (w[i >> 2u] >> ((i & 3u) * 8u)) & 0xFFu;
}

// The 16-bit word at even byte offset i.
fn w_half(i: u32) -> u32 {
    return (w[i >> 2u] >> ((i & 2u) * 8u)) & 0xFFFFu;
}

// IEEE half to single, exactly (subnormal halves become normal singles).
fn f16_bits(h: u32) -> u32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1Fu;
    let m = h & 0x3FFu;
    if (e == 0u) {
        if (m == 0u) { return sign; }
        let p = 31u - countLeadingZeros(m); // m = 1.f·2^p, value m·2^-24
        return sign | ((p + 103u) << 23u) | ((m << (23u - p)) & 0x7FFFFFu);
    }
    if (e == 0x1Fu) {
        if (m == 0u) { return sign | 0x7F800000u; }
        return sign | 0x7FC00000u | (m << 13u);
    }
    return sign | ((e + 112u) << 23u) | (m << 13u);
}

// Small integer as an f32 bit pattern (exact).
fn int_bits(q: i32) -> u32 {
    return bitcast<u32>(f32(q));
}

fn dense_weight(r: u32, k: u32) -> u32 {
    let i = r * dims.cols + k;
    switch dims.format {
        case 1u: { return f16_bits(w_half(i * 2u)); }
        case 2u: { return w_half(i * 2u) << 16u; }
        default: { return w[i]; }
    }
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    let t = gid.y;
    if (r >= dims.rows || t >= dims.tokens) { return; }
    let xo = t * dims.cols;
    var total = 0u;
    if (dims.format <= 2u) {
        for (var k0 = 0u; k0 < dims.cols; k0 = k0 + K_CHUNK) {
            let kend = min(k0 + K_CHUNK, dims.cols);
            var acc = 0u;
            for (var k = k0; k < kend; k = k + 1u) {
                acc = mac(dense_weight(r, k), x[xo + k], acc);
            }
            total = add(total, acc);
        }
    } else if (dims.format == 3u) {
        let rb = dims.cols / 32u * 34u;
        for (var b = 0u; b < dims.cols / 32u; b = b + 1u) {
            let o = r * rb + b * 34u;
            let d = f16_bits(w_half(o));
            var s = 0u;
            for (var j = 0u; j < 32u; j = j + 1u) {
                let q = i32(w_byte(o + 2u + j) << 24u) >> 24u;
                s = mac(int_bits(q), x[xo + b * 32u + j], s);
            }
            total = mac(d, s, total);
        }
    } else {
        let rb = dims.cols / 32u * 20u;
        for (var b = 0u; b < dims.cols / 32u; b = b + 1u) {
            let o = r * rb + b * 20u;
            let d = f16_bits(w_half(o));
            let m = f16_bits(w_half(o + 2u));
            let xb = xo + b * 32u;
            var s = 0u;
            // Byte by byte: its low nibble (element j), then its high (j+16).
            for (var j = 0u; j < 16u; j = j + 1u) {
                let byte = w_byte(o + 4u + j);
                s = mac(int_bits(i32(byte & 15u)), x[xb + j], s);
                s = mac(int_bits(i32(byte >> 4u)), x[xb + j + 16u], s);
            }
            total = mac(d, s, total);
            var xs = 0u;
            for (var j = 0u; j < 32u; j = j + 1u) { xs = add(xs, x[xb + j]); }
            total = mac(m, xs, total);
        }
    }
    y[t * dims.y_cols + dims.row0 + r] = canon(total);
}
