//! The GEMV family of shaders: the five fusions (plain, norm first, residual added, SiLU·up,
//! norm and SiLU·up) of each build (f32 weights, bf16, and the vectorised bf16 layouts), which
//! build a product of a given shape takes, and the dispatch.
use super::*;

/// The five fusions of one GEMV shader build, in [`Gemv`]'s order, named `{fusion}{suffix}`.
macro_rules! gemv_builds {
    ($suffix:literal, $src:expr) => {
        [
            (concat!("matmul", $suffix), $src, "main", &[]),
            (
                concat!("rms_norm_matmul", $suffix),
                $src,
                "main",
                &[("NORM", 1.0)],
            ),
            (
                concat!("matmul_add", $suffix),
                $src,
                "main",
                &[("EPI", 1.0)],
            ),
            (
                concat!("matmul_silu_mul", $suffix),
                $src,
                "main",
                &[("EPI", 2.0)],
            ),
            (
                concat!("rms_norm_matmul_silu_mul", $suffix),
                $src,
                "main",
                &[("NORM", 1.0), ("EPI", 2.0)],
            ),
        ]
    };
}

/// The GEMV pipelines by build ([`ShaderBuild::row`]: f32 weights, bf16, bf16 vectorised: v8,
/// wide, subgroup, tiled) and fusion ([`Gemv`]).
pub(super) const GEMVS: [[Pipeline; 5]; 7] = [
    gemv_builds!("", MATMUL_F32),
    gemv_builds!("_bf16", MATMUL_BF16),
    gemv_builds!("_bf16_v8", MATMUL_BF16_V8),
    gemv_builds!("_bf16_wide", MATMUL_BF16_WIDE),
    gemv_builds!("_bf16_sg", MATMUL_BF16_SG),
    gemv_builds!("_bf16_tiled", MATMUL_BF16_TILED),
    gemv_builds!("_bf16_wide_sg", MATMUL_BF16_WIDE_SG),
];

const MATMUL_F32: &str = concat!(
    include_str!("../../../kernels/wgsl/matmul.wgsl"),
    include_str!("../../../kernels/wgsl/matmul_body.wgsl")
);
const MATMUL_BF16: &str = concat!(
    include_str!("../../../kernels/wgsl/matmul_bf16.wgsl"),
    include_str!("../../../kernels/wgsl/matmul_body.wgsl")
);
const MATMUL_BF16_V8: &str = concat!(
    include_str!("../../../kernels/wgsl/matmul_bf16_vec.wgsl"),
    include_str!("../../../kernels/wgsl/matmul_bf16_v8.wgsl")
);
const MATMUL_BF16_SG: &str = concat!(
    include_str!("../../../kernels/wgsl/matmul_bf16_vec.wgsl"),
    include_str!("../../../kernels/wgsl/matmul_bf16_sg_sums.wgsl"),
    include_str!("../../../kernels/wgsl/matmul_bf16_sg.wgsl")
);
const MATMUL_BF16_TILED: &str = concat!(
    include_str!("../../../kernels/wgsl/matmul_bf16_vec.wgsl"),
    include_str!("../../../kernels/wgsl/matmul_bf16_tiled.wgsl")
);
const MATMUL_BF16_WIDE: &str = concat!(
    include_str!("../../../kernels/wgsl/matmul_bf16_vec.wgsl"),
    include_str!("../../../kernels/wgsl/matmul_bf16_wide.wgsl")
);
const MATMUL_BF16_WIDE_SG: &str = concat!(
    include_str!("../../../kernels/wgsl/matmul_bf16_vec.wgsl"),
    include_str!("../../../kernels/wgsl/matmul_bf16_sg_sums.wgsl"),
    include_str!("../../../kernels/wgsl/matmul_bf16_wide_sg.wgsl")
);

/// The tiled GEMM's tile (`matmul_bf16_tiled.wgsl`): rows (tokens) and output columns.
const TILE_ROWS: usize = 64;
const TILE_COLUMNS: usize = 64;
/// Fewest rows whose products take the tiled GEMM by default. On the H200 (docs/perf.md) it made
/// 2,048- and 512-token prefills 2.5x and 3.4x faster and a batch-64 decode step 27%, but a
/// batch-16 step 2.4x slower and a 32-token prefill 1.8x slower: a product's 64-column tiles
/// are too few workgroups there, where the GEMV builds read each weight once a row.
pub(super) const TILED_FROM: usize = 64;

/// The vectorised bf16 GEMV shaders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum GemvBuild {
    V8,
    Wide,
    /// V8's layout reduced with subgroup sums (adapters with SUBGROUP).
    Subgroup,
    /// A tiled GEMM, 64 rows × 64 columns a workgroup: prompt-sized T.
    Tiled,
    /// Wide's layout reduced with subgroup sums (subgroups of at most 32 threads).
    WideSubgroup,
}

impl GemvBuild {
    /// Whether an adapter with `subgroups` runs this build.
    pub(super) fn runs_with(self, subgroups: Subgroups) -> bool {
        match self {
            GemvBuild::Subgroup => subgroups != Subgroups::None,
            GemvBuild::WideSubgroup => subgroups == Subgroups::UpTo32,
            _ => true,
        }
    }
}

/// A GEMV shader build: its row of [`GEMVS`] and its workgroup layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ShaderBuild {
    F32,
    Bf16,
    /// 16-byte bf16 weight loads, in one of the vectorised layouts.
    Vec(GemvBuild),
}

impl ShaderBuild {
    fn row(self) -> usize {
        match self {
            ShaderBuild::F32 => 0,
            ShaderBuild::Bf16 => 1,
            ShaderBuild::Vec(GemvBuild::V8) => 2,
            ShaderBuild::Vec(GemvBuild::Wide) => 3,
            ShaderBuild::Vec(GemvBuild::Subgroup) => 4,
            ShaderBuild::Vec(GemvBuild::Tiled) => 5,
            ShaderBuild::Vec(GemvBuild::WideSubgroup) => 6,
        }
    }

    /// Output columns one workgroup covers.
    fn columns_per_workgroup(self) -> usize {
        match self {
            ShaderBuild::Vec(GemvBuild::Wide | GemvBuild::WideSubgroup) => 16,
            ShaderBuild::Vec(GemvBuild::Tiled) => TILE_COLUMNS,
            ShaderBuild::Vec(_) => 2,
            _ => 4,
        }
    }
}

/// Which fusion of the matmul shader a product runs (its override constants).
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub(super) enum Gemv {
    Plain,
    /// RMSNorm of x with a gain first.
    Norm,
    /// Plus a residual.
    Add,
    /// silu(gate) * up from the two halves of the weight's rows.
    SiluMul,
    NormSiluMul,
}

impl Gemv {
    /// The shader build of this fusion for `t` rows (tokens) and `n` output columns of weights
    /// of `w` with rows of `k` elements: bf16 rows of whole 8-element (16-byte) loads take a
    /// vectorised build: the tiled GEMM from `tiled_from` rows (a prompt: the GEMV builds read
    /// every weight once a row), `_wide` (16 columns a 256-thread workgroup) from 16,384
    /// columns (the lm_head: 0.446 → 0.219 ms on the H200, where the per-layer matrices were
    /// slower: too few workgroups), reduced with subgroup sums where subgroups are at most 32
    /// threads (`wide_sg`: the final norm + lm_head 144 → 122 µs, 18th session), which also
    /// serves products of 4,096+ columns of rows of at most 1,024 without SiLU (the 0.6B's
    /// norm + QKV 9.37 → 7.65 µs a dependent dispatch, where o_proj, gate/up and down were
    /// slower on it: too few workgroups); below it the subgroup build where the adapter has
    /// subgroups (per dispatch on the H200: o_proj/down 12.8 → 11.1 µs, gate/up 19.5 → 16.4 µs
    /// against v8), else `_v8`; `force` overrides (measurements, tests).
    fn build(
        self,
        w: DType,
        (t, k, n): (usize, usize, usize),
        tiled_from: usize,
        force: Option<GemvBuild>,
        subgroups: Subgroups,
    ) -> ShaderBuild {
        match (w, k.is_multiple_of(8)) {
            (DType::BF16, true) => ShaderBuild::Vec(match force {
                Some(b) => b,
                None if t >= tiled_from => GemvBuild::Tiled,
                None if n >= 16_384 && subgroups == Subgroups::UpTo32 => GemvBuild::WideSubgroup,
                None if n >= 16_384 => GemvBuild::Wide,
                None if n >= 4_096
                    && k <= 1_024
                    && !self.silu()
                    && subgroups == Subgroups::UpTo32 =>
                {
                    GemvBuild::WideSubgroup
                }
                None if subgroups != Subgroups::None => GemvBuild::Subgroup,
                None => GemvBuild::V8,
            }),
            (DType::BF16, false) => ShaderBuild::Bf16,
            _ => ShaderBuild::F32,
        }
    }

    /// This fusion's pipeline in `build`.
    fn pipeline(self, build: ShaderBuild) -> &'static str {
        GEMVS[build.row()][self as usize].0
    }

    fn silu(self) -> bool {
        matches!(self, Gemv::SiluMul | Gemv::NormSiluMul)
    }
}

/// The vectorised bf16 GEMV builds by the name `QFUSE_WGPU_GEMV` and [`WgpuOptions::gemv`] use.
pub(super) const GEMV_BUILD_NAMES: [(&str, GemvBuild); 5] = [
    ("v8", GemvBuild::V8),
    ("wide", GemvBuild::Wide),
    ("sg", GemvBuild::Subgroup),
    ("tiled", GemvBuild::Tiled),
    ("wide_sg", GemvBuild::WideSubgroup),
];

/// The GEMV build `name`, if this adapter can run it.
pub(super) fn gemv_build_named(name: &str, subgroups: Subgroups) -> Result<GemvBuild> {
    match GEMV_BUILD_NAMES.iter().find(|(n, _)| *n == name) {
        Some((_, build)) if build.runs_with(subgroups) => Ok(*build),
        Some(_) => Err(Error::invalid(
            "wgpu",
            format!("GEMV build `{name}` needs subgroup operations (wide_sg: of at most 32 threads), which this adapter lacks"),
        )),
        None => {
            let known: Vec<&str> = GEMV_BUILD_NAMES.iter().map(|(n, _)| *n).collect();
            Err(Error::invalid(
                "wgpu",
                format!("unknown GEMV build `{name}` ({})", known.join(", ")),
            ))
        }
    }
}

impl WgpuBackend {
    /// `x [T, K] · w [N, K]ᵀ` through the matmul shader build `kind`; `aux` is the norm gain
    /// `[K]` (Norm kinds) or the residual `[T, N]` (Add). `None` when the shapes do not fit the
    /// fused form (the caller composes it instead).
    pub(super) fn gemv(
        &self,
        kind: Gemv,
        x: &WgpuTensor,
        w: &WgpuTensor,
        aux: Option<&WgpuTensor>,
        eps: f64,
    ) -> Result<Option<WgpuTensor>> {
        let (t, k) = matrix(x, "matmul")?;
        let (n, k2) = matrix(w, "matmul")?;
        let out_cols = if kind.silu() { n / 2 } else { n };
        let aux_fits = match (kind, aux) {
            (Gemv::Plain | Gemv::SiluMul, None) => true,
            (Gemv::Norm | Gemv::NormSiluMul, Some(g)) => g.shape.dims() == [k],
            (Gemv::Add, Some(r)) => r.shape.dims() == [t, n],
            _ => false,
        };
        let silu_fits = !kind.silu() || (n % 2 == 0 && w.parts.len() == 1);
        if k != k2 || !aux_fits || !silu_fits {
            return Ok(None);
        }
        let out = self.output([t, out_cols])?;
        let aux_buf = match aux {
            Some(a) => a.buf()?,
            None => x.buf()?,
        };
        for (i, part) in w.parts.iter().enumerate() {
            let start = i * w.rows_per_part;
            let rows = if kind.silu() {
                out_cols
            } else {
                w.rows_per_part.min(n - start)
            };
            let params = [
                u32_of(t)?,
                u32_of(k)?,
                u32_of(rows)?,
                u32_of(out_cols)?,
                u32_of(start)?,
                f32_bits(eps),
            ];
            let build = kind.build(
                w.dtype,
                (t, k, rows),
                self.inner.tiled_from,
                self.inner.gemv_build,
                self.inner.subgroups,
            );
            // The vectorised builds take a 2-D grid (the lm_head's columns pass 65,535 groups),
            // the tiled one (column tiles, row tiles).
            let groups = rows.div_ceil(build.columns_per_workgroup());
            let groups = match build {
                ShaderBuild::Vec(GemvBuild::Tiled) => (groups, t.div_ceil(TILE_ROWS)),
                ShaderBuild::Vec(_) => (groups.min(MAX_GROUPS), groups.div_ceil(MAX_GROUPS)),
                _ => (groups, 1),
            };
            self.run(
                kind.pipeline(build),
                &params,
                &[x.buf()?, part, out.buf()?, aux_buf],
                groups,
            )?;
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_take_the_build_measured_fastest_for_their_shape() {
        use GemvBuild::{Subgroup, Tiled, Wide, WideSubgroup, V8};
        let pick = |kind: Gemv, (t, k, n), subgroups| {
            kind.build(DType::BF16, (t, k, n), TILED_FROM, None, subgroups)
        };
        let up32 = Subgroups::UpTo32;
        let cases = [
            // The 0.6B's final norm + lm_head, QKV, gate/up (output columns), o_proj, down.
            (Gemv::Norm, (1, 1024, 151_936), up32, WideSubgroup),
            (Gemv::Norm, (1, 1024, 151_936), Subgroups::Other, Wide),
            (Gemv::Norm, (1, 1024, 151_936), Subgroups::None, Wide),
            (Gemv::Norm, (1, 1024, 4096), up32, WideSubgroup),
            (Gemv::Norm, (1, 1024, 4096), Subgroups::Other, Subgroup),
            (Gemv::Norm, (1, 1024, 4096), Subgroups::None, V8),
            (Gemv::NormSiluMul, (1, 1024, 3072), up32, Subgroup),
            (Gemv::NormSiluMul, (1, 1024, 8192), up32, Subgroup),
            (Gemv::Add, (1, 2048, 1024), up32, Subgroup),
            (Gemv::Add, (1, 3072, 1024), up32, Subgroup),
            // Rows longer than measured keep the subgroup build (an 8B's o_proj).
            (Gemv::Add, (1, 4096, 4096), up32, Subgroup),
            (Gemv::Norm, (TILED_FROM, 1024, 4096), up32, Tiled),
        ];
        for (kind, shape, subgroups, want) in cases {
            assert_eq!(
                pick(kind, shape, subgroups),
                ShaderBuild::Vec(want),
                "{shape:?} {subgroups:?}"
            );
        }
    }
}
