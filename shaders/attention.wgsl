// Causal attention with a KV cache (CONTRACT.md §9.6), for the rows of one
// sequence: row r (at position pos0 + r) and head h attend over cache
// positions 0..=pos. Six entry points, run in order, each with short work
// per thread (no thread runs a whole head, which is slow and which
// lavapipe does not finish for long spans):
//   scores  per (row, head, t): q·k in 256-chunks, times the scale;
//   stats   per (row, head): any NaN, and the maximum;
//   exps    per (row, head, t): e^(s - max);
//   sums    per (row, head): Σ e in 256-chunks of positions;
//   probs   per (row, head, t): e / Σ (all NaN if any score was);
//   mix     per (row, head, d): Σ p_t·v_t in 256-chunks of positions.
// That is softmax_spec and attention_spec operation for operation.
// Needs prim.wgsl.

struct Params {
    // This sequence's first row in q/out, the position of that row, rows.
    row0: u32,
    pos0: u32,
    rows: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    // Positions the scratch holds per (row, head): pos0 + rows.
    span: u32,
    // 1/√head_dim, from the host (prim::div and prim::sqrt).
    scale: u32,
}

@group(0) @binding(0) var<storage, read> q: array<u32>;
@group(0) @binding(1) var<storage, read> keys: array<u32>;
@group(0) @binding(2) var<storage, read> values: array<u32>;
// [rows·heads, span] scores, then per (row, head): NaN flag or max, sum.
@group(0) @binding(3) var<storage, read_write> scratch: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<u32>;
@group(0) @binding(5) var<uniform> p: Params;

fn stat(rh: u32) -> u32 {
    return p.rows * p.n_heads * p.span + 2u * rh;
}

fn kv_head(h: u32) -> u32 {
    return h / (p.n_heads / p.n_kv_heads);
}

// Row and head of a (row, head) index.
fn position_of(rh: u32) -> u32 {
    return p.pos0 + rh / p.n_heads;
}

@compute @workgroup_size(64)
fn scores(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x;
    let rh = gid.y;
    if (rh >= p.rows * p.n_heads || t > position_of(rh)) { return; }
    let r = rh / p.n_heads;
    let h = rh % p.n_heads;
    let hd = p.head_dim;
    let qo = (p.row0 + r) * p.n_heads * hd + h * hd;
    let ko = t * p.n_kv_heads * hd + kv_head(h) * hd;
    var total = 0u;
    for (var d0 = 0u; d0 < hd; d0 = d0 + K_CHUNK) {
        let dend = min(d0 + K_CHUNK, hd);
        var acc = 0u;
        for (var d = d0; d < dend; d = d + 1u) { acc = mac(q[qo + d], keys[ko + d], acc); }
        total = add(total, acc);
    }
    scratch[rh * p.span + t] = mul(total, p.scale);
}

@compute @workgroup_size(64)
fn stats(@builtin(global_invocation_id) gid: vec3<u32>) {
    let rh = gid.x;
    if (rh >= p.rows * p.n_heads) { return; }
    let so = rh * p.span;
    var m = F_NEG_INF;
    var nan = false;
    for (var t = 0u; t <= position_of(rh); t = t + 1u) {
        let s = scratch[so + t];
        nan = nan || is_nan(s);
        if (!is_nan(s) && f_gt(s, m)) { m = s; }
    }
    scratch[stat(rh)] = select(m, SF_NAN, nan);
}

@compute @workgroup_size(64)
fn exps(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x;
    let rh = gid.y;
    if (rh >= p.rows * p.n_heads || t > position_of(rh)) { return; }
    let m = scratch[stat(rh)];
    if (is_nan(m)) { return; }
    let at = rh * p.span + t;
    scratch[at] = fexp(sub(scratch[at], m));
}

@compute @workgroup_size(64)
fn sums(@builtin(global_invocation_id) gid: vec3<u32>) {
    let rh = gid.x;
    if (rh >= p.rows * p.n_heads) { return; }
    let so = rh * p.span;
    let n = position_of(rh) + 1u;
    var sum = 0u;
    for (var t0 = 0u; t0 < n; t0 = t0 + K_CHUNK) {
        let tend = min(t0 + K_CHUNK, n);
        var acc = 0u;
        for (var t = t0; t < tend; t = t + 1u) { acc = add(acc, scratch[so + t]); }
        sum = add(sum, acc);
    }
    scratch[stat(rh) + 1u] = sum;
}

@compute @workgroup_size(64)
fn probs(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x;
    let rh = gid.y;
    if (rh >= p.rows * p.n_heads || t > position_of(rh)) { return; }
    let at = rh * p.span + t;
    if (is_nan(scratch[stat(rh)])) {
        scratch[at] = SF_NAN;
        return;
    }
    scratch[at] = canon(fdiv(scratch[at], scratch[stat(rh) + 1u]));
}

@compute @workgroup_size(64)
fn mix(@builtin(global_invocation_id) gid: vec3<u32>) {
    let d = gid.x;
    let rh = gid.y;
    if (rh >= p.rows * p.n_heads || d >= p.head_dim) { return; }
    let r = rh / p.n_heads;
    let h = rh % p.n_heads;
    let hd = p.head_dim;
    let kvd = p.n_kv_heads * hd;
    let vo = kv_head(h) * hd + d;
    let so = rh * p.span;
    let n = position_of(rh) + 1u;
    var total = 0u;
    for (var t0 = 0u; t0 < n; t0 = t0 + K_CHUNK) {
        let tend = min(t0 + K_CHUNK, n);
        var acc = 0u;
        for (var t = t0; t < tend; t = t + 1u) {
            acc = mac(scratch[so + t], values[t * kvd + vo], acc);
        }
        total = add(total, acc);
    }
    out[(p.row0 + r) * p.n_heads * hd + h * hd + d] = canon(total);
}
