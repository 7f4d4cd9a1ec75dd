// Rotary position embedding (CONTRACT.md §9.4), in place, on rows of heads:
// each pair (a, b) at pair index i of a head becomes
// (fma(a, cos_i, -(b·sin_i)), fma(a, sin_i, b·cos_i)), with the row's
// cos/sin tables computed on the host (ln and sin/cos stay there).

struct Params {
    // Values per row, head dim, rows.
    width: u32,
    head_dim: u32,
    rows: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<u32>;
@group(0) @binding(1) var<storage, read> cos_t: array<u32>;
@group(0) @binding(2) var<storage, read> sin_t: array<u32>;
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let pair = gid.x;
    let row = gid.y;
    let half = p.width / 2u;
    if (pair >= half || row >= p.rows) { return; }
    let i = pair % (p.head_dim / 2u);
    let c = cos_t[row * (p.head_dim / 2u) + i];
    let s = sin_t[row * (p.head_dim / 2u) + i];
    let at = row * p.width + 2u * pair;
    let a = x[at];
    let b = x[at + 1u];
    x[at] = canon(mac(a, c, mul(b, s) ^ F_SIGN));
    x[at + 1u] = canon(mac(a, s, mul(b, c)));
}
