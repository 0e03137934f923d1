// out[t, h, :] = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M) over the splits attention.wgsl
// left in `part` ([o (d), max, sum] per (token, head, split)); splits without keys (sum 0) are
// skipped. A workgroup per (head, token), a thread per dim (and dim + 128): each thread merges
// the splits itself, online (rescaling when a larger max arrives), four splits' loads at a time,
// so there is no barrier and no serial chain of one round trip a split. params: as
// attention.wgsl's. dispatch (H, T); d <= 256.
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> part: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

const WG: u32 = 128u;
const LOW: f32 = -3.4e38;

// One split's share: its max (LOW where it has no keys), sum, and output dims i and i + WG.
struct Split {
    m: f32,
    l: f32,
    o0: f32,
    o1: f32,
}

fn split_at(pb: u32, d: u32, i: u32, ok: bool) -> Split {
    var r = Split(LOW, 0.0, 0.0, 0.0);
    if (ok) {
        r.l = part[pb + d + 1u];
        r.m = select(LOW, part[pb + d], r.l > 0.0);
        if (i < d) { r.o0 = part[pb + i]; }
        if (i + WG < d) { r.o1 = part[pb + i + WG]; }
    }
    return r;
}

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let heads = p[1];
    let d = p[3];
    let splits = p[7];
    let h = wg.x;
    let t = wg.y;
    if (h >= heads || t >= p[0]) { return; }
    let base = (t * heads + h) * splits;
    let stride = d + 2u;
    var m = LOW;
    var den = 0.0;
    var num0 = 0.0;
    var num1 = 0.0;
    for (var s = 0u; s < splits; s += 4u) {
        let a = split_at((base + s) * stride, d, lid, true);
        let b = split_at((base + s + 1u) * stride, d, lid, s + 1u < splits);
        let c = split_at((base + s + 2u) * stride, d, lid, s + 2u < splits);
        let e = split_at((base + s + 3u) * stride, d, lid, s + 3u < splits);
        let big = max(max(m, a.m), max(max(b.m, c.m), e.m));
        // Splits without keys have l = 0 (and m = LOW): their terms vanish.
        let fa = exp(a.m - big);
        let fb = exp(b.m - big);
        let fc = exp(c.m - big);
        let fe = exp(e.m - big);
        let corr = exp(m - big);
        m = big;
        den = den * corr + a.l * fa + b.l * fb + c.l * fc + e.l * fe;
        num0 = num0 * corr + a.o0 * fa + b.o0 * fb + c.o0 * fc + e.o0 * fe;
        num1 = num1 * corr + a.o1 * fa + b.o1 * fb + c.o1 * fc + e.o1 * fe;
    }
    let ob = (t * heads + h) * d;
    if (lid < d) { out[ob + lid] = num0 / den; }
    if (lid + WG < d) { out[ob + lid + WG] = num1 / den; }
}
