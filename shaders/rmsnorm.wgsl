// RMSNorm (CONTRACT.md §9.3) of each row of x: y = x · (1/√(mean(x²)+eps)) · w.
// One workgroup per row: its first thread forms the sum of squares in the
// contract's chunk order, then all write. Needs prim.wgsl.

struct Params {
    dim: u32,
    rows: u32,
    eps: u32,
}

@group(0) @binding(0) var<storage, read> x: array<u32>;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read_write> y: array<u32>;
@group(0) @binding(3) var<uniform> p: Params;

var<workgroup> inv: u32;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = wg.x;
    if (row >= p.rows) { return; }
    let o = row * p.dim;
    if (lid.x == 0u) {
        var ss = 0u;
        for (var k0 = 0u; k0 < p.dim; k0 = k0 + K_CHUNK) {
            let kend = min(k0 + K_CHUNK, p.dim);
            var acc = 0u;
            for (var k = k0; k < kend; k = k + 1u) { acc = mac(x[o + k], x[o + k], acc); }
            ss = add(ss, acc);
        }
        inv = fdiv(F_ONE, fsqrt(add(fdiv(ss, f_from_u32(p.dim)), p.eps)));
    }
    workgroupBarrier();
    let s = inv;
    for (var i = lid.x; i < p.dim; i = i + 64u) {
        y[o + i] = canon(mul(mul(x[o + i], s), w[i]));
    }
}
