// C[M,N] = A[M,K] * B[K,N] under the lockstep contract (CONTRACT.md §4).
// Needs mac(), add() (from arith_hw.wgsl or arith_exact.wgsl) and canon().
//
// A workgroup of 16x16 threads computes a 64x64 tile of C; each thread a 4x4
// block (rows ly + 16i, columns lx + 16j). K runs in the contract's chunks of
// 256: per chunk every accumulator starts at +0.0 and takes one mac() per k in
// increasing order (staged through workgroup memory 16 k at a time), then
// total = add(total, acc). Values are u32 bit patterns throughout, so nothing
// is flushed or canonicalised along the way.

struct Dims {
    m: u32,
    k: u32,
    n: u32,
    // Rows of C this dispatch starts at, for work split into passes.
    row_offset: u32,
}

@group(0) @binding(0) var<storage, read> a: array<u32>;
@group(0) @binding(1) var<storage, read> b: array<u32>;
@group(0) @binding(2) var<storage, read_write> c: array<u32>;
@group(0) @binding(3) var<uniform> dims: Dims;

// MATMUL_TILE (64: 16x16 threads, 4x4 each) and K_CHUNK come from Rust.
const TILE: u32 = MATMUL_TILE;
const KT: u32 = 16u;

var<workgroup> a_tile: array<u32, 1024>; // [KT][TILE], k-major
var<workgroup> b_tile: array<u32, 1024>; // [KT][TILE]

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row0 = wg.y * TILE;
    let col0 = wg.x * TILE;
    let tid = lid.y * 16u + lid.x;
    var total: array<u32, 16>;
    var acc: array<u32, 16>;
    for (var k0 = 0u; k0 < dims.k; k0 = k0 + K_CHUNK) {
        let kend = min(k0 + K_CHUNK, dims.k);
        for (var t = 0u; t < 16u; t = t + 1u) { acc[t] = 0u; }
        for (var kt = k0; kt < kend; kt = kt + KT) {
            for (var l = 0u; l < 4u; l = l + 1u) {
                let idx = tid + l * 256u;
                let ar = idx / KT;
                let ak = idx % KT;
                var av = 0u;
                if (row0 + ar < dims.m && kt + ak < kend) {
                    av = a[(row0 + ar) * dims.k + kt + ak];
                }
                a_tile[ak * TILE + ar] = av;
                let bk = idx / TILE;
                let bc = idx % TILE;
                var bv = 0u;
                if (col0 + bc < dims.n && kt + bk < kend) {
                    bv = b[(kt + bk) * dims.n + col0 + bc];
                }
                b_tile[bk * TILE + bc] = bv;
            }
            workgroupBarrier();
            let kn = min(KT, kend - kt);
            for (var kk = 0u; kk < kn; kk = kk + 1u) {
                var ar: array<u32, 4>;
                var br: array<u32, 4>;
                for (var i = 0u; i < 4u; i = i + 1u) {
                    ar[i] = a_tile[kk * TILE + lid.y + 16u * i];
                    br[i] = b_tile[kk * TILE + lid.x + 16u * i];
                }
                for (var i = 0u; i < 4u; i = i + 1u) {
                    for (var j = 0u; j < 4u; j = j + 1u) {
                        acc[i * 4u + j] = mac(ar[i], br[j], acc[i * 4u + j]);
                    }
                }
            }
            workgroupBarrier();
        }
        for (var t = 0u; t < 16u; t = t + 1u) { total[t] = add(total[t], acc[t]); }
    }
    for (var i = 0u; i < 4u; i = i + 1u) {
        let r = row0 + lid.y + 16u * i;
        for (var j = 0u; j < 4u; j = j + 1u) {
            let col = col0 + lid.x + 16u * j;
            if (r < dims.m && col < dims.n) {
                c[r * dims.n + col] = canon(total[i * 4u + j]);
            }
        }
    }
}
