// Elementwise check of prim.wgsl: for each triple (a, b, c), writes
// fdiv(a, b), fsqrt(a) and fexp(c). Tests run it on both paths against the
// CPU's correctly rounded / and sqrt and the contract's exp.

@group(0) @binding(0) var<storage, read> triples: array<u32>;
@group(0) @binding(1) var<storage, read_write> results: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i * 3u + 2u >= arrayLength(&triples)) { return; }
    let a = triples[i * 3u];
    let b = triples[i * 3u + 1u];
    let c = triples[i * 3u + 2u];
    results[i * 3u] = canon(fdiv(a, b));
    results[i * 3u + 1u] = canon(fsqrt(a));
    results[i * 3u + 2u] = canon(fexp(c));
}
