//! Kernel sources embedded at build time, compiled by NVRTC for the GPU present, once per process.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

use crate::error::{CudaError, CudaResultExt};

pub(crate) const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// Every kernel file with its entry points.
pub const SOURCES: &[(&str, &str, &[&str])] = &[
    (
        "elementwise.cu",
        include_str!("../../../kernels/elementwise.cu"),
        &[
            "gather_rows_bf16",
            "gather_rows_f32",
            "add_f32",
            "silu_mul_f32",
            "slice_columns_f32",
            "cast_f32_bf16",
            "split_f32_bf16x3",
            "split_f32_bf16x3_v8",
            "sum3_f32",
            "sum3_add_f32",
            "sum3_silu_mul_f32",
            "cast_bf16_f32",
            "argmax_partial_f32",
            "argmax_final_f32",
        ],
    ),
    (
        "rms_norm.cu",
        include_str!("../../../kernels/rms_norm.cu"),
        &[
            "rms_norm_f32",
            "rms_norm_split_bf16x3",
            "rms_norm_split_bf16x3_v8",
        ],
    ),
    (
        "gemv.cu",
        include_str!("../../../kernels/gemv.cu"),
        &[
            "gemv_bf16_vec_t1",
            "gemv_bf16_vec_t8",
            "gemv_bf16_any_t1",
            "gemv_bf16_any_t8",
            "gemv_f32_vec_t1",
            "gemv_f32_vec_t8",
            "gemv_f32_any_t1",
            "gemv_f32_any_t8",
            "gemv_add_bf16_vec_t1",
            "gemv_add_bf16_vec_t8",
            "gemv_add_bf16_any_t1",
            "gemv_add_bf16_any_t8",
            "gemv_add_f32_vec_t1",
            "gemv_add_f32_vec_t8",
            "gemv_add_f32_any_t1",
            "gemv_add_f32_any_t8",
            "gemv_silu_mul_bf16_vec_t1",
            "gemv_silu_mul_bf16_vec_t8",
            "gemv_silu_mul_bf16_any_t1",
            "gemv_silu_mul_bf16_any_t8",
            "gemv_silu_mul_f32_vec_t1",
            "gemv_silu_mul_f32_vec_t8",
            "gemv_silu_mul_f32_any_t1",
            "gemv_silu_mul_f32_any_t8",
            "rms_norm_gemv_bf16_vec_t1",
            "rms_norm_gemv_bf16_vec_t8",
            "rms_norm_gemv_bf16_any_t1",
            "rms_norm_gemv_bf16_any_t8",
            "rms_norm_gemv_f32_vec_t1",
            "rms_norm_gemv_f32_vec_t8",
            "rms_norm_gemv_f32_any_t1",
            "rms_norm_gemv_f32_any_t8",
            "rms_norm_gemv_silu_mul_bf16_vec_t1",
            "rms_norm_gemv_silu_mul_bf16_vec_t8",
            "rms_norm_gemv_silu_mul_bf16_any_t1",
            "rms_norm_gemv_silu_mul_bf16_any_t8",
            "rms_norm_gemv_silu_mul_f32_vec_t1",
            "rms_norm_gemv_silu_mul_f32_vec_t8",
            "rms_norm_gemv_silu_mul_f32_any_t1",
            "rms_norm_gemv_silu_mul_f32_any_t8",
            "gemv_t1_r4_k4",
            "gemv_t1_r2_k4",
            "gemv_t1_r2_k8",
            "gemv_t1_r1_k4",
            "gemv_t1_r1_k8",
            "gemv_t1_r1_k16",
            "gemv_t8_r4_k4",
            "gemv_t8_r2_k4",
            "gemv_t8_r2_k8",
            "gemv_t8_r1_k4",
            "gemv_t8_r1_k8",
            "gemv_t8_r1_k16",
            "gemv_add_t1_r4_k4",
            "gemv_add_t1_r2_k4",
            "gemv_add_t1_r2_k8",
            "gemv_add_t1_r1_k4",
            "gemv_add_t1_r1_k8",
            "gemv_add_t1_r1_k16",
            "gemv_add_t8_r4_k4",
            "gemv_add_t8_r2_k4",
            "gemv_add_t8_r2_k8",
            "gemv_add_t8_r1_k4",
            "gemv_add_t8_r1_k8",
            "gemv_add_t8_r1_k16",
            "rms_norm_gemv_t1_r4_k4",
            "rms_norm_gemv_t1_r2_k4",
            "rms_norm_gemv_t1_r2_k8",
            "rms_norm_gemv_t1_r1_k4",
            "rms_norm_gemv_t1_r1_k8",
            "rms_norm_gemv_t1_r1_k16",
            "rms_norm_gemv_t8_r4_k4",
            "rms_norm_gemv_t8_r2_k4",
            "rms_norm_gemv_t8_r2_k8",
            "rms_norm_gemv_t8_r1_k4",
            "rms_norm_gemv_t8_r1_k8",
            "rms_norm_gemv_t8_r1_k16",
            "gemv_silu_mul_t1_r2_k4",
            "gemv_silu_mul_t1_r1_k4",
            "gemv_silu_mul_t1_r1_k8",
            "gemv_silu_mul_t8_r2_k4",
            "gemv_silu_mul_t8_r1_k4",
            "gemv_silu_mul_t8_r1_k8",
            "rms_norm_gemv_silu_mul_t1_r2_k4",
            "rms_norm_gemv_silu_mul_t1_r1_k4",
            "rms_norm_gemv_silu_mul_t1_r1_k8",
            "rms_norm_gemv_silu_mul_t8_r2_k4",
            "rms_norm_gemv_silu_mul_t8_r1_k4",
            "rms_norm_gemv_silu_mul_t8_r1_k8",
        ],
    ),
    (
        "gemm_x3.cu",
        include_str!("../../../kernels/gemm_x3.cu"),
        &crate::x3::ENTRIES,
    ),
    (
        "layer.cu",
        include_str!("../../../kernels/layer.cu"),
        &[
            "decoder_layer_t1_kvf32_g2",
            "decoder_layer_t1_kvf32_g4",
            "decoder_layer_t1_kvf32_g8",
            "decoder_layer_t1_kvbf16_g2",
            "decoder_layer_t1_kvbf16_g4",
            "decoder_layer_t1_kvbf16_g8",
        ],
    ),
    (
        "flash.cu",
        include_str!("../../../kernels/flash.cu"),
        &[
            "flash_gather_kv_kvf32",
            "flash_gather_kv_kvbf16",
            "flash_prefill_d32",
            "flash_prefill_d64",
            "flash_prefill_d128",
            "flash_tc_gather_kv_kvf32_d32",
            "flash_tc_gather_kv_kvbf16_d32",
            "flash_tc_prefill_d32",
            "flash_tc_gather_kv_kvf32_d64",
            "flash_tc_gather_kv_kvbf16_d64",
            "flash_tc_prefill_d64",
            "flash_tc_gather_kv_kvf32_d128",
            "flash_tc_gather_kv_kvbf16_d128",
            "flash_tc_prefill_d128",
            "flash_h_gather_kv_kvf32_d32",
            "flash_h_gather_kv_kvbf16_d32",
            "flash_h_prefill_d32",
            "flash_h_gather_kv_kvf32_d64",
            "flash_h_gather_kv_kvbf16_d64",
            "flash_h_prefill_d64",
            "flash_h_gather_kv_kvf32_d128",
            "flash_h_gather_kv_kvbf16_d128",
            "flash_h_prefill_d128",
            "flash_hh_gather_kv_kvf32_d32",
            "flash_hh_gather_kv_kvbf16_d32",
            "flash_hh_prefill_d32",
            "flash_hh_gather_kv_kvf32_d64",
            "flash_hh_gather_kv_kvbf16_d64",
            "flash_hh_prefill_d64",
            "flash_hh_gather_kv_kvf32_d128",
            "flash_hh_gather_kv_kvbf16_d128",
            "flash_hh_prefill_d128",
            "flash_hh_gather_v_kvf32_d32",
            "flash_hh_gather_v_kvbf16_d32",
            "flash_hh_gather_v_kvf32_d64",
            "flash_hh_gather_v_kvbf16_d64",
            "flash_hh_gather_v_kvf32_d128",
            "flash_hh_gather_v_kvbf16_d128",
        ],
    ),
    (
        "attention.cu",
        include_str!("../../../kernels/attention.cu"),
        &[
            "rope_f32",
            "write_kv_kvf32",
            "qk_norm_rope_write_kv_kvf32",
            "qk_norm_rope_write_kv_rows_d128_kvf32",
            "attention_paged_kvf32_g1_d1_k2",
            "attention_paged_kvf32_g1_d1_k8",
            "attention_paged_kvf32_g1_d2_k2",
            "attention_paged_kvf32_g1_d2_k8",
            "attention_paged_kvf32_g1_d4_k2",
            "attention_paged_kvf32_g1_d4_k8",
            "attention_paged_kvf32_g1_d8_k2",
            "attention_paged_kvf32_g1_d8_k8",
            "attention_paged_kvf32_g2_d1_k2",
            "attention_paged_kvf32_g2_d1_k8",
            "attention_paged_kvf32_g2_d2_k2",
            "attention_paged_kvf32_g2_d2_k8",
            "attention_paged_kvf32_g2_d4_k2",
            "attention_paged_kvf32_g2_d4_k8",
            "attention_paged_kvf32_g2_d8_k2",
            "attention_paged_kvf32_g2_d8_k8",
            "attention_paged_kvf32_g4_d1_k2",
            "attention_paged_kvf32_g4_d1_k8",
            "attention_paged_kvf32_g4_d2_k2",
            "attention_paged_kvf32_g4_d2_k8",
            "attention_paged_kvf32_g4_d4_k2",
            "attention_paged_kvf32_g4_d4_k8",
            "attention_paged_kvf32_g4_d8_k2",
            "attention_paged_kvf32_g4_d8_k8",
            "attention_paged_kvf32_g8_d1_k2",
            "attention_paged_kvf32_g8_d1_k8",
            "attention_paged_kvf32_g8_d2_k2",
            "attention_paged_kvf32_g8_d2_k8",
            "attention_paged_kvf32_g8_d4_k2",
            "attention_paged_kvf32_g8_d4_k8",
            "attention_paged_kvf32_g8_d8_k2",
            "attention_paged_kvf32_g8_d8_k8",
            "write_kv_kvbf16",
            "attention_many_kvf32_g1",
            "attention_many_kvf32_g2",
            "attention_many_kvf32_g4",
            "attention_many_kvf32_g8",
            "attention_many_kvbf16_g1",
            "attention_many_kvbf16_g2",
            "attention_many_kvbf16_g4",
            "attention_many_kvbf16_g8",
            "attention_many_qkn_kvf32_g1",
            "attention_many_qkn_kvf32_g2",
            "attention_many_qkn_kvf32_g4",
            "attention_many_qkn_kvf32_g8",
            "attention_many_qkn_kvbf16_g1",
            "attention_many_qkn_kvbf16_g2",
            "attention_many_qkn_kvbf16_g4",
            "attention_many_qkn_kvbf16_g8",
            "attention_many_w16_kvbf16_g1",
            "attention_many_w16_kvbf16_g2",
            "attention_many_qkn_w16_kvbf16_g1",
            "attention_many_qkn_w16_kvbf16_g2",
            "attention_gemm_gather_q",
            "attention_gemm_gather_kv_kvf32",
            "attention_gemm_gather_kv_kvbf16",
            "attention_gemm_softmax",
            "attention_gemm_scatter",
            "qk_norm_rope_write_kv_kvbf16",
            "qk_norm_rope_write_kv_rows_d128_kvbf16",
            "attention_paged_kvbf16_g1_d1_k2",
            "attention_paged_kvbf16_g1_d1_k8",
            "attention_paged_kvbf16_g1_d2_k2",
            "attention_paged_kvbf16_g1_d2_k8",
            "attention_paged_kvbf16_g1_d4_k2",
            "attention_paged_kvbf16_g1_d4_k8",
            "attention_paged_kvbf16_g1_d8_k2",
            "attention_paged_kvbf16_g1_d8_k8",
            "attention_paged_kvbf16_g2_d1_k2",
            "attention_paged_kvbf16_g2_d1_k8",
            "attention_paged_kvbf16_g2_d2_k2",
            "attention_paged_kvbf16_g2_d2_k8",
            "attention_paged_kvbf16_g2_d4_k2",
            "attention_paged_kvbf16_g2_d4_k8",
            "attention_paged_kvbf16_g2_d8_k2",
            "attention_paged_kvbf16_g2_d8_k8",
            "attention_paged_kvbf16_g4_d1_k2",
            "attention_paged_kvbf16_g4_d1_k8",
            "attention_paged_kvbf16_g4_d2_k2",
            "attention_paged_kvbf16_g4_d2_k8",
            "attention_paged_kvbf16_g4_d4_k2",
            "attention_paged_kvbf16_g4_d4_k8",
            "attention_paged_kvbf16_g4_d8_k2",
            "attention_paged_kvbf16_g4_d8_k8",
            "attention_paged_kvbf16_g8_d1_k2",
            "attention_paged_kvbf16_g8_d1_k8",
            "attention_paged_kvbf16_g8_d2_k2",
            "attention_paged_kvbf16_g8_d2_k8",
            "attention_paged_kvbf16_g8_d4_k2",
            "attention_paged_kvbf16_g8_d4_k8",
            "attention_paged_kvbf16_g8_d8_k2",
            "attention_paged_kvbf16_g8_d8_k8",
        ],
    ),
];

/// Kernel files that use Hopper's architecture-specific instructions (`wgmma`): compiled for
/// `sm_90a` and loaded only on compute capability 9.0, each with `kernels/hopper.cuh` (their
/// shared helpers) before it.
pub const SM90A_SOURCES: &[(&str, &str, &[&str])] = &[
    (
        "gemm_wgmma.cu",
        concat!(
            include_str!("../../../kernels/hopper.cuh"),
            "\n",
            include_str!("../../../kernels/gemm_wgmma.cu")
        ),
        &WGMMA_ENTRIES,
    ),
    (
        "flash_wgmma.cu",
        concat!(
            include_str!("../../../kernels/hopper.cuh"),
            "\n",
            include_str!("../../../kernels/flash_wgmma.cu")
        ),
        &FLASH_WGMMA_ENTRIES,
    ),
    (
        "gemm_x3_wg.cu",
        concat!(
            include_str!("../../../kernels/hopper.cuh"),
            "\n#define X3_WGMMA 1\n",
            include_str!("../../../kernels/gemm_x3.cu")
        ),
        &crate::x3::WG_ENTRIES,
    ),
];

/// `flash_wgmma.cu`'s entry points: the two gathers (fp32 and bf16 cache) and the prompt
/// attention for head sizes up to 128.
pub const FLASH_WGMMA_ENTRIES: [&str; 3] = [
    "flash_wg_gather_kvf32",
    "flash_wg_gather_kvbf16",
    "flash_wg_prefill_d128",
];

/// `gemm_wgmma.cu`'s entry points.
pub const WGMMA_ENTRIES: [&str; 10] = [
    "wgmma_x3",
    "wgmma_x3_add",
    "wgmma_x3_silu_mul",
    "wgmma_x3_silu_mul_parts",
    "wgmma_x2",
    "wgmma_x2_add",
    "wgmma_x2_silu_mul",
    "wgmma_x2_silu_mul_parts",
    "wgmma_x3_rows64",
    "wgmma_x2_rows64",
];

/// Choices compiled into the kernels, as preprocessor lines before each file
/// ([`KernelBuild::defines`]); the defaults are the headers' own, so the default build needs no
/// define and keeps its cache key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelBuild {
    /// `common.cuh`'s `QFUSE_PDL_TRIGGER`: when a kernel lets the next one launch under
    /// programmatic dependent launch (`QFUSE_CUDA_PDL_TRIGGER=0|1|2`): 0 once its own wait has
    /// returned; 1 (default) as soon as a decode product kernel (`gemv_t1`, `gemm_x3`) has
    /// requested its weights, so the next kernel's weight loads start under this one's wait
    /// (batch-1 decode 0.907 → 0.838 ms/step on the H200); 2 also every other kernel before its
    /// wait (no better).
    pub pdl_trigger: u8,
    /// `common.cuh`'s `QFUSE_TRACE`, a measurement build (`QFUSE_CUDA_TRACE=1`): every kernel's
    /// first thread stamps %globaltimer before and after its wait into its module's ring, so
    /// [`CudaBackend::kernel_trace`](crate::CudaBackend::kernel_trace) can show where a captured
    /// decode step's time goes.
    pub trace: bool,
    /// `gemv.cu`'s `GEMV_T1_WARPS`: warps of a batch-1 product block
    /// (`QFUSE_CUDA_GEMV_T1_WARPS=2|4|8`, default 8). At the products' ~96 registers a thread an
    /// SM holds two 8-warp blocks or five 4-warp ones.
    pub gemv_t1_warps: u8,
}

impl Default for KernelBuild {
    fn default() -> Self {
        KernelBuild {
            pdl_trigger: 1,
            trace: false,
            gemv_t1_warps: 8,
        }
    }
}

impl KernelBuild {
    /// The build the `QFUSE_CUDA_*` knobs ask for (see each field); the default where unset.
    pub fn from_env() -> Self {
        let default = KernelBuild::default();
        KernelBuild {
            pdl_trigger: qfuse_core::knobs::env_knob("QFUSE_CUDA_PDL_TRIGGER", 0..=2)
                .map_or(default.pdl_trigger, |n| n as u8),
            trace: qfuse_core::knobs::env_flag("QFUSE_CUDA_TRACE"),
            gemv_t1_warps: match qfuse_core::knobs::env_knob("QFUSE_CUDA_GEMV_T1_WARPS", 2..=8) {
                Some(w @ (2 | 4)) => w as u8,
                _ => default.gemv_t1_warps,
            },
        }
    }

    /// A build named as `scripts/gpu-bundle`'s `BUILDS=` names it: an optional `pdl_trigger`
    /// digit, an optional `w` and a batch-1 product block's warps, then `t` for the trace build
    /// (`0`, `2`, `t`, `0t`, `w4`, `w4t`); `None` for anything else or nothing.
    pub fn from_spec(spec: &str) -> Option<Self> {
        let mut build = KernelBuild::default();
        let mut rest = spec;
        if let Some(t) = rest.chars().next().and_then(|c| c.to_digit(10)) {
            build.pdl_trigger = u8::try_from(t).ok().filter(|&t| t <= 2)?;
            rest = &rest[1..];
        }
        if let Some(after) = rest.strip_prefix('w') {
            let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            build.gemv_t1_warps = after[..digits]
                .parse()
                .ok()
                .filter(|w| [2, 4, 8].contains(w))?;
            rest = &after[digits..];
        }
        if let Some(after) = rest.strip_prefix('t') {
            build.trace = true;
            rest = after;
        }
        (rest.is_empty() && !spec.is_empty()).then_some(build)
    }

    /// The preprocessor lines for the choices that differ from the headers' defaults.
    pub fn defines(&self) -> String {
        let default = KernelBuild::default();
        let mut lines = String::new();
        if self.pdl_trigger != default.pdl_trigger {
            lines += &format!("#define QFUSE_PDL_TRIGGER {}\n", self.pdl_trigger);
        }
        if self.trace {
            lines += "#define QFUSE_TRACE 1\n";
        }
        if self.gemv_t1_warps != default.gemv_t1_warps {
            lines += &format!("#define GEMV_T1_WARPS {}\n", self.gemv_t1_warps);
        }
        lines
    }
}

/// NVRTC flags besides the architecture (part of the cache key).
const COMPILE_FLAGS: [&str; 1] = ["--std=c++17"];

/// Compiles one kernel file (with `defines`, then the shared header, prepended) to PTX for `arch`
/// (e.g. `sm_90`).
pub fn compile(
    file: &'static str,
    src: &str,
    arch: &'static str,
    defines: &str,
) -> Result<Ptx, CudaError> {
    let opts = CompileOptions {
        arch: Some(arch),
        options: COMPILE_FLAGS.iter().map(|f| f.to_string()).collect(),
        name: Some(file.into()),
        ..Default::default()
    };
    compile_ptx_with_opts(format!("{}{src}", prelude(defines)), opts)
        .map_err(|err| CudaError::Nvrtc { file, err })
}

/// What `compile` puts before a kernel file: the defines, then the shared header.
fn prelude(defines: &str) -> String {
    format!("{defines}{COMMON}\n")
}

/// The line of a compiled program (what `__LINE__` says) that holds a kernel file's first line.
pub fn first_source_line(defines: &str) -> usize {
    prelude(defines).matches('\n').count() + 1
}

/// `compile`'s PTX for a file, from the on-disk cache where an identical compile (same header,
/// source, architecture and NVRTC version) left it, else compiled and stored there; with whether
/// it came from the cache. The cache lives in `QFUSE_KERNEL_CACHE` (`off` disables it), else
/// `$XDG_CACHE_HOME/qfuse/kernels`, else `~/.cache/qfuse/kernels`. A cache that cannot be read
/// or written only costs the compile.
pub fn cached_ptx(
    file: &'static str,
    src: &str,
    arch: &'static str,
    defines: &str,
) -> Result<(Ptx, bool), CudaError> {
    cached_ptx_in(cache_dir().as_deref(), file, src, arch, defines)
}

/// [`cached_ptx`] with the cache in `dir` (none: compile).
pub fn cached_ptx_in(
    dir: Option<&Path>,
    file: &'static str,
    src: &str,
    arch: &'static str,
    defines: &str,
) -> Result<(Ptx, bool), CudaError> {
    if let Some(path) = dir.map(|d| cache_path(d, file, src, arch, defines)) {
        if let Ok(text) = std::fs::read_to_string(&path) {
            if text.contains(".entry") {
                return Ok((Ptx::from_src(text), true));
            }
        }
    }
    Ok((compile_and_cache(dir, file, src, arch, defines)?, false))
}

/// `compile`, storing the result where [`cached_ptx_in`] looks in `dir` (written to a temporary
/// name and renamed, so a concurrent reader never sees half a file).
fn compile_and_cache(
    dir: Option<&Path>,
    file: &'static str,
    src: &str,
    arch: &'static str,
    defines: &str,
) -> Result<Ptx, CudaError> {
    let ptx = compile(file, src, arch, defines)?;
    if let Some(dir) = dir {
        let path = cache_path(dir, file, src, arch, defines);
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        let stored = std::fs::create_dir_all(dir).is_ok()
            && std::fs::write(&tmp, ptx.to_src()).is_ok()
            && std::fs::rename(&tmp, &path).is_ok();
        if !stored {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(ptx)
}

/// The directory [`cached_ptx`] uses, if any.
fn cache_dir() -> Option<PathBuf> {
    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    match env("QFUSE_KERNEL_CACHE") {
        Some(v) if v == "off" => None,
        Some(v) => Some(PathBuf::from(v)),
        None => match env("XDG_CACHE_HOME") {
            Some(v) => Some(PathBuf::from(v).join("qfuse/kernels")),
            None => Some(PathBuf::from(env("HOME")?).join(".cache/qfuse/kernels")),
        },
    }
}

/// Where the cache in `dir` keeps a file's PTX: named by the file, the architecture and a hash
/// of everything that decides the output.
fn cache_path(dir: &Path, file: &str, src: &str, arch: &str, defines: &str) -> PathBuf {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-parameters that outlive the call; only reached once the backend has
    // checked that libnvrtc is present (or from a compile, which needs it anyway).
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    let key = format!("{defines}{COMMON}\0{src}\0{arch}\0{major}.{minor}\0{COMPILE_FLAGS:?}");
    dir.join(format!("{file}.{arch}.{:016x}.ptx", fnv1a(key.as_bytes())))
}

/// 64-bit FNV-1a: a hash that stays the same across builds and Rust versions (the cache's key).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The `sm_XY` name NVRTC wants for a compute capability.
pub fn arch_name(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (9, 0) => "sm_90",
        (8, 9) => "sm_89",
        (8, 6) => "sm_86",
        (8, 0) => "sm_80",
        (10, 0) => "sm_100",
        (12, 0) => "sm_120",
        (7, 5) => "sm_75",
        _ => "sm_80",
    }
}

/// Every entry point, loaded.
pub struct Kernels {
    functions: HashMap<&'static str, CudaFunction>,
    /// Every loaded module with its file name and source, for reading a trace build's rings.
    pub(crate) modules: Vec<(&'static str, &'static str, Arc<CudaModule>)>,
}

impl Kernels {
    /// Compiles (or finds in the cache, [`cached_ptx`]) and loads every kernel file for `ctx`'s
    /// device, each with `defines` (preprocessor lines, [`KernelBuild::defines`]) before it.
    pub fn load(ctx: &Arc<CudaContext>, defines: &str) -> Result<Self, CudaError> {
        let (major, minor) = ctx.compute_capability()?;
        let arch = arch_name(major, minor);
        let mut functions = HashMap::new();
        let mut modules = Vec::new();
        let hopper: &[_] = if (major, minor) == (9, 0) {
            SM90A_SOURCES
        } else {
            &[]
        };
        let files: Vec<_> = SOURCES
            .iter()
            .map(|f| (f, arch))
            .chain(hopper.iter().map(|f| (f, "sm_90a")))
            .collect();
        // NVRTC takes most of a backend's start-up (a minute for every file at once on one
        // core), so the files not cached compile in parallel.
        let ptx: Vec<(Ptx, bool)> = std::thread::scope(|scope| {
            let jobs: Vec<_> = files
                .iter()
                .map(|((file, src, _), arch)| {
                    scope.spawn(move || cached_ptx(file, src, arch, defines))
                })
                .collect();
            jobs.into_iter()
                .map(|j| j.join().unwrap_or(Err(CudaError::CompilerPanicked)))
                .collect::<Result<_, _>>()
        })?;
        for (((file, src, names), arch), (ptx, from_cache)) in files.into_iter().zip(ptx) {
            let module = match ctx.load_module(ptx) {
                Ok(m) => m,
                // A cached file the driver rejects (truncated, or from another driver) is
                // compiled afresh.
                Err(_) if from_cache => {
                    let dir = cache_dir();
                    ctx.load_module(compile_and_cache(dir.as_deref(), file, src, arch, defines)?)?
                }
                Err(e) => return Err(e.into()),
            };
            for name in *names {
                let f = module
                    .load_function(name)
                    .map_err(|_| CudaError::MissingKernel {
                        name: name.to_string(),
                    })?;
                functions.insert(*name, f);
            }
            modules.push((*file, *src, module));
        }
        Ok(Kernels { functions, modules })
    }

    /// Lets each entry point in `names` take the device's opt-in shared memory (kernels that
    /// stage more than the default 48 KiB); returns the dynamic shared memory all of them may
    /// use.
    pub(crate) fn allow_optin_smem<I>(
        &self,
        ctx: &Arc<CudaContext>,
        names: I,
    ) -> qfuse_core::Result<usize>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let optin = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .cuda()?;
        let mut most = usize::MAX;
        for name in names {
            let f = self.get(name.as_ref()).cuda()?;
            let fixed = f
                .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
                .cuda()?;
            let dynamic = (optin - fixed).max(0);
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                dynamic,
            )
            .cuda()?;
            most = most.min(dynamic as usize);
        }
        Ok(most)
    }

    /// An entry point by name.
    pub fn get(&self, name: &str) -> Result<&CudaFunction, CudaError> {
        self.functions
            .get(name)
            .ok_or_else(|| CudaError::MissingKernel {
                name: name.to_string(),
            })
    }
}

/// The value of `#define NAME VALUE` in a kernel source, for tests that hold the Rust side's
/// layout constants to the kernels'.
#[cfg(test)]
pub(crate) fn define(src: &str, name: &str) -> usize {
    let line = src
        .lines()
        .find(|l| l.starts_with(&format!("#define {name} ")))
        .unwrap_or_else(|| panic!("no #define {name}"));
    line.split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("#define {name} is not a number"))
}
