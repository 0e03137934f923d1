//! The trace build's timeline (`QFUSE_CUDA_TRACE=1`, [`KernelBuild::trace`](crate::kernels::KernelBuild::trace)):
//! every kernel's first thread stamps %globaltimer before and after its programmatic-dependent-
//! launch wait into its module's ring (`common.cuh`). A kernel's wait returns once the kernels
//! before it have finished, so the time from one kernel's wait returning to the next one's is
//! that kernel's share of the critical path: its work after the wait, its completion and the
//! release of the next. Summed over a step, the shares are the step.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::kernels::first_source_line;
#[cfg(test)]
use crate::kernels::KernelBuild;
use crate::CudaBackend;

/// The ring's length in records (`QFUSE_TRACE_RECORDS` in `common.cuh`) and a record's words.
const RING: usize = 4096;
const WORDS: usize = 4;

/// What separates two steps: a step's first kernel is launched by the host after the step
/// before has finished, so it finds nothing to wait for, and it starts well after the last wait
/// returned. (Inside a step a kernel may also start long after the one before it passed its
/// wait, as one that follows the multi-wave lm_head, but then it waits for that kernel.)
const STEP_GAP_NS: u64 = 20_000;
const NO_WAIT_NS: u64 = 1_000;

/// One kernel launch's stamps.
#[derive(Clone, Debug, PartialEq)]
struct Stamp {
    /// `file:function` of the wait, from its source line.
    kernel: String,
    grid: (u64, u64),
    block: u64,
    /// %globaltimer (ns) before and after the first block's wait.
    t0: u64,
    t1: u64,
    /// When the launch's last block started, where it has more than one.
    last_start: Option<u64>,
}

impl Stamp {
    fn label(&self) -> String {
        format!(
            "{} {}x{}/{}",
            self.kernel, self.grid.0, self.grid.1, self.block
        )
    }
}

/// The function whose body holds line `line` (1-based) of `src`: the nearest line at or above
/// it that declares a `__global__` or `__device__` function, by the name before its parameter
/// list (which may start on a later line, after a `__launch_bounds__(..)`).
fn function_at(src: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = src.lines().collect();
    let upto = line.min(lines.len());
    let declaration = (0..upto).rev().find(|&i| {
        let l = lines[i].trim_start();
        !l.starts_with("//") && (l.contains("__global__") || l.contains("__device__"))
    })?;
    let mut text = lines[declaration..(declaration + 3).min(lines.len())].join(" ");
    if let Some(at) = text.find("__launch_bounds__(") {
        let close = at + text[at..].find(')')?;
        text.replace_range(at..=close, "");
    }
    let head = &text[..text.find('(')?];
    let name = head
        .trim_end()
        .rsplit(|c: char| !(c.is_alphanumeric() || c == '_'))
        .next()?;
    (!name.is_empty()).then(|| name.to_string())
}

/// A ring's records (`count` written, the last `RING` kept), oldest first, named from `src`,
/// with each last block's record folded into its launch's.
fn decode_ring(file: &str, src: &str, first_line: usize, count: u32, words: &[u64]) -> Vec<Stamp> {
    let kept = (count as usize).min(RING);
    let start = count as usize - kept;
    let (mut firsts, mut lasts) = (Vec::new(), Vec::new());
    // A ring holds thousands of records from a few waits: each wait's line is named once.
    let mut kernels: BTreeMap<usize, String> = BTreeMap::new();
    for r in (start..count as usize)
        .filter_map(|i| words.get((i % RING) * WORDS..(i % RING + 1) * WORDS))
    {
        let line = ((r[3] >> 32) & 0x7fff_ffff) as usize;
        let kernel = kernels.entry(line).or_insert_with(|| {
            let own = line.checked_sub(first_line).map(|l| l + 1);
            let function = own
                .and_then(|l| function_at(src, l))
                .unwrap_or_else(|| "?".into());
            format!("{}:{function}", file.trim_end_matches(".cu"))
        });
        let stamp = Stamp {
            kernel: kernel.clone(),
            grid: (r[2] & 0xffff_ffff, r[2] >> 32),
            block: r[3] & 0xffff_ffff,
            t0: r[0],
            t1: r[1],
            last_start: None,
        };
        if r[3] >> 63 == 1 {
            lasts.push(stamp);
        } else {
            firsts.push(stamp);
        }
    }
    fold_last_blocks(&mut firsts, &lasts);
    firsts
}

/// Gives each launch its last block's start. Every block's wait returns before its launch
/// completes, and no block of a later launch passes its wait before that, so by wait return
/// the two records of one launch are adjacent among its kernel's records (in either order;
/// block 0 need not start first). A record left without its partner (the ring dropped it) is
/// skipped.
fn fold_last_blocks(firsts: &mut [Stamp], lasts: &[Stamp]) {
    /// A launch's first block (its index in `firsts`) or a last block's start.
    type Record = Result<usize, u64>;
    let key = |s: &Stamp| (s.kernel.clone(), s.grid, s.block);
    // (wait return, record) by kernel.
    let mut by_kernel: BTreeMap<_, Vec<(u64, Record)>> = BTreeMap::new();
    for (i, f) in firsts.iter().enumerate() {
        by_kernel.entry(key(f)).or_default().push((f.t1, Ok(i)));
    }
    for l in lasts {
        by_kernel.entry(key(l)).or_default().push((l.t1, Err(l.t0)));
    }
    for records in by_kernel.values_mut() {
        records.sort_by_key(|r| r.0);
        let mut pending: Option<Record> = None;
        for &(_, r) in records.iter() {
            pending = match (pending, r) {
                (Some(Ok(i)), Err(start)) | (Some(Err(start)), Ok(i)) => {
                    firsts[i].last_start = Some(start);
                    None
                }
                _ => Some(r),
            };
        }
    }
}

/// The stamps of every ring (each with whether it wrapped) from when all of them hold every
/// launch: a ring that wrapped lost its older stamps, so before its oldest kept one the other
/// rings' stamps would make partial steps.
fn complete_window(rings: Vec<(Vec<Stamp>, bool)>) -> Vec<Stamp> {
    let horizon = rings
        .iter()
        .filter(|(_, wrapped)| *wrapped)
        .filter_map(|(stamps, _)| stamps.iter().map(|s| s.t1).min())
        .max()
        .unwrap_or(0);
    rings
        .into_iter()
        .flat_map(|(stamps, _)| stamps)
        .filter(|s| s.t1 >= horizon)
        .collect()
}

/// Splits stamps (sorted by wait return) into steps at the host's gaps.
fn steps(stamps: &[Stamp]) -> Vec<&[Stamp]> {
    let mut out = Vec::new();
    let mut begin = 0;
    for i in 1..stamps.len() {
        let waited = stamps[i].t1.saturating_sub(stamps[i].t0);
        if stamps[i].t0 > stamps[i - 1].t1 + STEP_GAP_NS && waited < NO_WAIT_NS {
            out.push(&stamps[begin..i]);
            begin = i;
        }
    }
    if begin < stamps.len() {
        out.push(&stamps[begin..]);
    }
    out
}

/// Where the last step of the most common length (a decode step, not a prompt) spent its time,
/// from stamps sorted by wait return.
fn report(stamps: &[Stamp]) -> String {
    let steps = steps(stamps);
    let mut lengths: BTreeMap<usize, usize> = BTreeMap::new();
    for s in &steps {
        *lengths.entry(s.len()).or_default() += 1;
    }
    let Some((&common, _)) = lengths.iter().max_by_key(|(len, n)| (**n, **len)) else {
        return "kernel trace: no kernel stamped".into();
    };
    let Some(step) = steps.iter().rev().find(|s| s.len() == common) else {
        return "kernel trace: no step".into();
    };
    let us = |ns: u64| ns as f64 / 1e3;
    let mut out = format!(
        "kernel trace: {} launches in {} steps; the last step of {common} kernels, {:.1} µs from \
         its first wait's return to its last's\n",
        stamps.len(),
        steps.len(),
        us(step[step.len() - 1].t1 - step[0].t1),
    );
    // Per kernel: launches, mean share of the critical path, total, mean time waited, and when
    // the last block started relative to the wait's return (after it: a later wave).
    let signed_us = |a: u64, b: u64| (a as f64 - b as f64) / 1e3;
    let mut by_kernel: BTreeMap<String, (usize, u64, u64, f64)> = BTreeMap::new();
    for pair in step.windows(2) {
        let e = by_kernel.entry(pair[0].label()).or_default();
        e.0 += 1;
        e.1 += pair[1].t1 - pair[0].t1;
        e.2 += pair[0].t1.saturating_sub(pair[0].t0);
        e.3 += pair[0].last_start.map_or(0.0, |l| signed_us(l, pair[0].t1));
    }
    let mut rows: Vec<_> = by_kernel.into_iter().collect();
    rows.sort_by_key(|(_, (_, share, _, _))| std::cmp::Reverse(*share));
    let _ = writeln!(
        out,
        "  {:<48} {:>5} {:>9} {:>9} {:>9} {:>10}",
        "kernel grid/block", "n", "µs each", "µs total", "waited", "last block"
    );
    for (label, (n, share, waited, last)) in rows {
        let _ = writeln!(
            out,
            "  {label:<48} {n:>5} {:>9.2} {:>9.1} {:>9.2} {:>+10.2}",
            us(share) / n as f64,
            us(share),
            us(waited) / n as f64,
            last / n as f64
        );
    }
    let _ = writeln!(
        out,
        "  the step in order (µs from its first wait's return: launched, wait returned, last \
         block started; share):"
    );
    let origin = step[0].t1;
    for (i, s) in step.iter().enumerate() {
        let share = step.get(i + 1).map_or(0.0, |n| us(n.t1 - s.t1));
        let last = s.last_start.map_or(String::from("-"), |l| {
            format!("{:.2}", signed_us(l, origin))
        });
        let _ = writeln!(
            out,
            "  {:>9.2} {:>9.2} {last:>9} {share:>7.2}  {}",
            signed_us(s.t0, origin),
            us(s.t1 - origin),
            s.label()
        );
    }
    out.truncate(out.trim_end().len());
    out
}

/// What a trace build's rings held, read once: every launch's stamps in the order their waits
/// returned.
pub struct KernelTrace {
    stamps: Vec<Stamp>,
}

impl KernelTrace {
    fn new(mut stamps: Vec<Stamp>) -> Self {
        stamps.sort_by_key(|s| s.t1);
        KernelTrace { stamps }
    }

    /// The last decode step's kernels: each one's share of the critical path, how long it
    /// waited, when its last block started, and the step in order.
    pub fn report(&self) -> String {
        report(&self.stamps)
    }

    /// Every stamp, one launch a line (`t0_ns t1_ns kernel grid_x grid_yz block
    /// last_block_start_ns`, 0 for a launch of one block), for offline analysis.
    pub fn lines(&self) -> String {
        let mut out = String::new();
        for s in &self.stamps {
            let _ = writeln!(
                out,
                "{} {} {} {} {} {} {}",
                s.t0,
                s.t1,
                s.kernel,
                s.grid.0,
                s.grid.1,
                s.block,
                s.last_start.unwrap_or(0)
            );
        }
        out
    }
}

impl CudaBackend {
    /// With `QFUSE_CUDA_TRACE=1`: every module's ring, read; `None` when not traced or the
    /// rings cannot be read.
    pub fn kernel_trace(&self) -> Option<KernelTrace> {
        self.kernel_stamps().map(KernelTrace::new)
    }

    fn kernel_stamps(&self) -> Option<Vec<Stamp>> {
        if !self.inner.options.kernel_build.trace {
            return None;
        }
        let defines = self.inner.options.kernel_build.defines();
        let first_line = first_source_line(&defines);
        let stream = self.stream();
        stream.synchronize().ok()?;
        let mut rings = Vec::new();
        for (file, src, module) in &self.inner.kernels.modules {
            // A module none of whose kernels waits has no ring.
            let Ok(count) = module.get_global("qfuse_trace_count", stream) else {
                continue;
            };
            let count = stream.clone_dtoh(&count).ok()?;
            let count = u32::from_le_bytes(count.get(..4)?.try_into().ok()?);
            let ring = module.get_global("qfuse_trace_records", stream).ok()?;
            let words: Vec<u64> = stream
                .clone_dtoh(&ring)
                .ok()?
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                .collect();
            let wrapped = count as usize > RING;
            rings.push((decode_ring(file, src, first_line, count, &words), wrapped));
        }
        Some(complete_window(rings))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "// a file\n\
        __device__ __forceinline__ float helper(float x) { return x; }\n\
        template <int N>\n\
        __device__ void body(const float* x) {\n\
            pdl_wait();\n\
        }\n\
        extern \"C\" __global__ void __launch_bounds__(128)\n\
            entry(const float* x) {\n\
            pdl_begin();\n\
        }\n";

    #[test]
    fn the_ring_is_the_headers_and_lines_count_from_the_file() {
        assert_eq!(
            RING,
            crate::kernels::define(crate::kernels::COMMON, "QFUSE_TRACE_RECORDS")
        );
        let header_lines = crate::kernels::COMMON.matches('\n').count();
        assert_eq!(first_source_line(""), header_lines + 2);
        assert_eq!(
            first_source_line("#define QFUSE_TRACE 1\n"),
            header_lines + 3
        );
    }

    #[test]
    fn builds_are_named_by_trigger_and_trace() {
        let b = |s| KernelBuild::from_spec(s).map(|b| (b.pdl_trigger, b.trace));
        assert_eq!(b("0"), Some((0, false)));
        assert_eq!(b("2"), Some((2, false)));
        assert_eq!(b("t"), Some((1, true)));
        assert_eq!(b("0t"), Some((0, true)));
        assert_eq!(b("3"), None);
        assert_eq!(b(""), None);
        assert_eq!(b("x"), None);
        assert_eq!(b("2t"), Some((2, true)));
        let w = |s| KernelBuild::from_spec(s).map(|b| (b.pdl_trigger, b.gemv_t1_warps, b.trace));
        assert_eq!(w("w4"), Some((1, 4, false)));
        assert_eq!(w("0w2t"), Some((0, 2, true)));
        assert_eq!(w("w3"), None);
        assert_eq!(w("w"), None);
        assert_eq!(w("w4x"), None);
        assert_eq!(
            KernelBuild::from_spec("w4").unwrap().defines(),
            "#define GEMV_T1_WARPS 4\n"
        );
        assert_eq!(
            KernelBuild::from_spec("t").unwrap().defines(),
            "#define QFUSE_TRACE 1\n"
        );
    }

    #[test]
    fn a_wait_is_named_by_its_enclosing_function() {
        let at = |line| function_at(SRC, line);
        assert_eq!(at(5).as_deref(), Some("body"));
        // An entry whose name follows its launch bounds, on the next line.
        assert_eq!(at(9).as_deref(), Some("entry"));
        assert_eq!(at(2).as_deref(), Some("helper"));
        assert_eq!(at(1), None);
    }

    #[test]
    fn every_wait_in_the_kernel_files_names_its_kernel() {
        let files = crate::kernels::SOURCES
            .iter()
            .chain(crate::kernels::SM90A_SOURCES);
        let mut waits = 0;
        for (file, src, _) in files {
            for (i, l) in src.lines().enumerate() {
                let code = l.split("//").next().unwrap_or("");
                if code.contains("pdl_wait()") || code.contains("pdl_begin()") {
                    if code.contains("#define") {
                        continue;
                    }
                    let name = function_at(src, i + 1).unwrap_or_default();
                    assert!(
                        name.len() > 2 && !name.starts_with("__"),
                        "{file}:{} named `{name}`",
                        i + 1
                    );
                    waits += 1;
                }
            }
        }
        assert!(waits >= 30, "{waits} waits");
    }

    fn stamp(t0: u64, t1: u64) -> Stamp {
        Stamp {
            kernel: "k".into(),
            grid: (1, 1),
            block: 32,
            t0,
            t1,
            last_start: None,
        }
    }

    #[test]
    fn steps_split_at_the_hosts_gaps() {
        // Two steps of three kernels, each kernel launched before the one before it finished,
        // but the third one of the first step only 40 µs after the second passed its wait.
        let s = [
            stamp(0, 100),
            stamp(500, 5_000),
            stamp(45_000, 49_000),
            stamp(100_000, 100_100),
            stamp(100_050, 104_000),
            stamp(103_000, 110_000),
        ];
        let split = steps(&s);
        assert_eq!(split.len(), 2);
        assert_eq!(split[0].len(), 3);
        assert_eq!(split[1][0], s[3]);
    }

    #[test]
    fn a_last_block_joins_the_launch_beside_it_in_wait_order() {
        let with = |kernel: &str, t0: u64, t1: u64| Stamp {
            kernel: kernel.into(),
            ..stamp(t0, t1)
        };
        // Two launches of `a` with `b` between: the first `a`'s last block passed its wait
        // before block 0 did; the second `a` had a later wave; `c` lost its first block.
        let mut firsts = vec![with("a", 0, 10), with("b", 50, 60), with("a", 100, 110)];
        let lasts = [
            with("a", 1, 8),
            with("b", 51, 61),
            with("a", 130, 130),
            with("c", 70, 71),
        ];
        fold_last_blocks(&mut firsts, &lasts);
        let got: Vec<_> = firsts.iter().map(|s| s.last_start).collect();
        assert_eq!(got, [Some(1), Some(51), Some(130)]);
    }

    #[test]
    fn a_ring_folds_the_flagged_last_block_into_its_launch() {
        let words = [
            5,
            8,
            4 | 1 << 32,
            128 | 15 << 32,
            9,
            9,
            4 | 1 << 32,
            128 | 15 << 32 | 1 << 63,
        ];
        let stamps = decode_ring("f.cu", SRC, 11, 2, &words);
        assert_eq!(stamps.len(), 1);
        assert_eq!((stamps[0].t0, stamps[0].last_start), (5, Some(9)));
        assert_eq!(stamps[0].kernel, "f:body");
    }

    #[test]
    fn only_the_span_every_ring_still_holds_is_kept() {
        let ring = |ts: &[u64]| ts.iter().map(|&t| stamp(t, t)).collect::<Vec<_>>();
        let rings = vec![
            (ring(&[10, 20, 30]), false),
            (ring(&[15, 25]), true),
            (ring(&[5, 40]), true),
            (ring(&[1, 50]), false),
        ];
        let kept: Vec<u64> = complete_window(rings).iter().map(|s| s.t1).collect();
        assert_eq!(kept, [20, 30, 15, 25, 40, 50]);
    }

    #[test]
    fn the_ring_keeps_the_last_records_in_order() {
        let mut words = vec![0u64; RING * WORDS];
        // RING + 2 records written: the first two slots were overwritten by the last two.
        for i in 0..RING + 2 {
            let slot = i % RING;
            words[slot * WORDS] = i as u64;
            words[slot * WORDS + 1] = i as u64 + 1;
            words[slot * WORDS + 2] = 3 | 2 << 32;
            words[slot * WORDS + 3] = 256 | 15 << 32;
        }
        let stamps = decode_ring("f.cu", SRC, 11, RING as u32 + 2, &words);
        assert_eq!(stamps.len(), RING);
        assert_eq!(stamps[0].t0, 2);
        assert_eq!(stamps[RING - 1].t0, RING as u64 + 1);
        assert_eq!(stamps[0].grid, (3, 2));
        assert_eq!(stamps[0].block, 256);
        // Line 15 of the program is the file's line 5: inside `body`.
        assert_eq!(stamps[0].kernel, "f:body");
    }

    #[test]
    fn the_report_gives_each_kernel_its_share_of_the_last_decode_step() {
        let mut s = vec![
            // A prompt step of two kernels, then two decode steps of three.
            stamp(0, 1_000),
            stamp(0, 50_000),
            stamp(100_000, 100_000),
            stamp(100_000, 104_000),
            stamp(101_000, 110_000),
            stamp(200_000, 200_000),
            stamp(200_000, 203_000),
            stamp(202_000, 211_000),
        ];
        for (i, st) in s.iter_mut().enumerate() {
            st.kernel = format!("k{}", i % 3);
        }
        let r = KernelTrace::new(s).report();
        assert!(r.contains("8 launches in 3 steps"), "{r}");
        assert!(r.contains("11.0 µs from"), "{r}");
        // k2 (index 5) took 3 µs of the last step, k0 (index 6) 8 µs.
        let line = |k: &str| r.lines().find(|l| l.trim_start().starts_with(k)).unwrap();
        assert!(line("k2 1x1/32").contains("3.00"), "{r}");
        assert!(line("k0 1x1/32").contains("8.00"), "{r}");
    }
}
