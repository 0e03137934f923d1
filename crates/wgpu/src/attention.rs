//! Attention on wgpu: the decode attention (its q/k-norm + RoPE prologue, the context split
//! across workgroups, the combine), the query-blocked prompt attention, the RoPE table, and the
//! prefetch of a layer's next weights that rides in the decode attention's dispatch.
use super::*;

/// The decode attention with its reductions in workgroup memory and barriers (adapters without
/// subgroup operations of 4 to 32 threads).
pub(super) const ATTENTION: &str = concat!(
    include_str!("../../../kernels/wgsl/attention.wgsl"),
    include_str!("../../../kernels/wgsl/attention_wg.wgsl")
);
/// The decode attention with its reductions in subgroup operations (subgroups of 4 to 32).
pub(super) const ATTENTION_SG: &str = concat!(
    include_str!("../../../kernels/wgsl/attention.wgsl"),
    include_str!("../../../kernels/wgsl/attention_sg.wgsl")
);

/// Prompt attention, query-blocked (`attention_flash.wgsl`); needs more workgroup memory than
/// WebGPU's default limit, so it exists only where the adapter allows [`FLASH_WORKGROUP_BYTES`].
pub(super) const FLASH_PIPELINE: Pipeline = (
    "attention_flash",
    include_str!("../../../kernels/wgsl/attention_flash.wgsl"),
    "main",
    &[],
);
pub(super) const FLASH_WORKGROUP_BYTES: u32 = 30 * 1024;
/// Tokens of a sequence one `attention_flash.wgsl` workgroup serves (its `QB`).
const FLASH_QUERIES: usize = 8;
/// Fewest tokens in a batch whose (prompt) attention takes the flash shader by default
/// (`QFUSE_WGPU_FLASH_FROM`).
pub(super) const FLASH_FROM: usize = 32;

/// Fewest keys in a decode attention split by default (`QFUSE_WGPU_ATTENTION_MIN_CHUNK`): one
/// 32-key tile. The attention's tiles run one after another in a workgroup (~6 µs each on the
/// H200), so more, shorter splits finish sooner once their combine merges splits in parallel
/// (docs/perf.md, 17th session: with it, attention + combine at 160 keys 23.3 → 16.7 µs a layer).
pub(super) const ATTENTION_MIN_CHUNK: usize = 32;
/// Most head dims the attention shader's private accumulator holds.
const MAX_HEAD_DIM: usize = 256;
/// Query heads one attention workgroup serves (`MAX_G` in attention.wgsl); a KV head with more
/// gets several workgroups.
const ATTENTION_MAX_GROUP: usize = 4;

/// The decode attention's pipelines, without and with the q/k-norm prologue (QKN), and with it
/// and the prefetch's workgroups (entry point `main_pf`), by build: workgroup reductions,
/// subgroup reductions, subgroup reductions at 256 threads.
const ATTENTION_PIPELINES: [[&str; 3]; 3] = [
    ["attention", "attention_sg", "attention_256_sg"],
    ["attention_qkn", "attention_qkn_sg", "attention_qkn_256_sg"],
    [
        "attention_qkn_pf",
        "attention_qkn_pf_sg",
        "attention_qkn_pf_256_sg",
    ],
];

/// Storage buffers the prefetching pipelines bind (the others bind 13, within the 16 many
/// adapters allow a stage).
pub(super) const PREFETCH_STORAGE_BUFFERS: u32 = 18;
/// Prefetching workgroups where the adapter runs the prefetch by default
/// ([`prefetch_by_default`]): on the H200 (docs/perf.md, 22nd session) 128 with o_proj, gate/up
/// and down gained 2.2% at batch 1 (1.257 ms/step against 1.282-1.290, three interleaved
/// rounds), 64 nothing, 192 1.3%.
pub(super) const PREFETCH_WORKGROUPS: usize = 128;

/// Whether the prefetch runs unasked on this adapter: NVIDIA's Hopper data-centre parts, whose
/// 50-60 MB L2 holds a layer's o_proj, gate/up and down weights (23 MB at the 0.6B shape) with
/// room to spare. wgpu does not report an L2's size, so the adapter's name decides; elsewhere
/// the reads would only add traffic.
pub(super) fn prefetch_by_default(adapter: &str) -> bool {
    ["H100", "H200", "H800"].iter().any(|n| adapter.contains(n))
}

/// Weights read ahead into L2 by decode attentions (`QFUSE_WGPU_PREFETCH`; by default on
/// [`prefetch_by_default`] adapters). A batch-1 product waits on DRAM after the barrier before
/// it. Attention moves little and is latency-bound, so its dispatch gets extra workgroups that
/// read one word of every 32-byte sector of the layer's o_proj, gate/up and down weights (and,
/// asked, the next layer's QKV: 31.5 MB in all at the 0.6B shape, within a 50 MB L2), in the
/// one dispatch: a dispatch of its own would be ordered behind a barrier of its own. On the
/// H200 it gains 2.2% at batch 1, less than the 8% bound `gemv_lab` puts on weights from L2:
/// the reads slow the attention (docs/perf.md, 22nd session).
#[derive(Default)]
pub(super) struct Prefetch {
    /// Per thread: the weight buffers its next decode attention reads ahead (set by
    /// `decoder_layer` for the attention inside it).
    pub(super) plans: HashMap<std::thread::ThreadId, Vec<wgpu::Buffer>>,
    /// Per thread: the QKV weights of the layer it ran last.
    last_qkv: HashMap<std::thread::ThreadId, wgpu::Buffer>,
    /// A layer's QKV weights to the next layer's, as the layers last ran: the one product after
    /// a layer's attention that `decoder_layer` is not given.
    next_qkv: HashMap<wgpu::Buffer, wgpu::Buffer>,
    /// The last prefetch's output: each prefetching thread's XOR of the words it read.
    sink: Option<WgpuTensor>,
}

/// Layer-to-layer QKV links [`Prefetch`] keeps before it forgets them all (they keep their
/// weight buffers alive; a model has one a layer).
const PREFETCH_LINKS: usize = 1024;

/// Which weights [`Prefetch`] reads, from letters of `ogdq` (o_proj, gate/up, down, the next
/// layer's QKV); where unset, the first three: adding the next layer's QKV took the 2.2% gain
/// to nothing on the H200 (22nd session), its reads evicting what the products were about to
/// use.
pub(super) fn prefetch_weights(letters: Option<&str>) -> Result<[bool; 4]> {
    let Some(letters) = letters else {
        return Ok([true, true, true, false]);
    };
    let mut on = [false; 4];
    for c in letters.chars() {
        match "ogdq".find(c) {
            Some(i) => on[i] = true,
            None => {
                return Err(Error::invalid(
                    "wgpu",
                    format!("QFUSE_WGPU_PREFETCH_WEIGHTS={letters}: expected letters of `ogdq`"),
                ))
            }
        }
    }
    Ok(on)
}

/// attention.wgsl's params: [T, H, KV, d, block_size, max_blocks, scale (f32 bits), splits,
/// chunk, q/k-norm eps (f32 bits), the prefetch's 32-byte sectors of each of its four buffers]
/// (attention_flash.wgsl reads the first seven).
fn attention_params(
    batch: &WgpuBatch,
    cfg: &AttentionConfig,
    t: usize,
    splits: usize,
    chunk: usize,
    prefetch_sectors: [u32; 4],
) -> Result<[u32; 14]> {
    Ok([
        u32_of(t)?,
        u32_of(cfg.num_heads)?,
        u32_of(cfg.num_kv_heads)?,
        u32_of(cfg.head_dim)?,
        u32_of(batch.info.block_size())?,
        u32_of(batch.max_blocks)?,
        f32_bits(cfg.scale()),
        u32_of(splits)?,
        u32_of(chunk)?,
        f32_bits(cfg.qk_norm_eps),
        prefetch_sectors[0],
        prefetch_sectors[1],
        prefetch_sectors[2],
        prefetch_sectors[3],
    ])
}

/// The bindings both attention shaders open with: q, the cache's keys and values, the batch's
/// positions, token sequences and block tables, the output.
fn attention_buffers<'a>(
    q: &'a WgpuTensor,
    cache: &'a LayerKv<WgpuTensor>,
    batch: &'a WgpuBatch,
    out: &'a WgpuTensor,
) -> Result<[&'a wgpu::Buffer; 7]> {
    Ok([
        q.buf()?,
        cache.k.buf()?,
        cache.v.buf()?,
        &batch.positions,
        &batch.token_seq,
        &batch.tables,
        out.buf()?,
    ])
}

/// Attention workgroups a token (and split): each KV head's query heads in groups of up to
/// four, one per vec4 lane.
fn head_groups(cfg: &AttentionConfig) -> usize {
    let (h, kvh) = (cfg.num_heads, cfg.num_kv_heads);
    kvh * (h / kvh).div_ceil(ATTENTION_MAX_GROUP)
}

/// (cos, sin) of every token's position for each of the d/2 frequencies, computed in f64.
pub(super) fn rope_table(batch: &BatchInfo, head_dim: usize, theta: f64) -> Vec<f32> {
    let half = head_dim / 2;
    let mut cs = Vec::with_capacity(batch.num_tokens() * half * 2);
    for &pos in batch.positions() {
        for i in 0..half {
            let (s, c) =
                (f64::from(pos) * theta.powf(-((2 * i) as f64) / head_dim as f64)).sin_cos();
            cs.push(c as f32);
            cs.push(s as f32);
        }
    }
    cs
}

impl WgpuBackend {
    /// The words the last decode attention's prefetch read, XORed per prefetching thread:
    /// thread i of n read word 8 s of each planned buffer for every sector s = i, i + n, ...
    /// (`None` before any prefetch). For tests: the prefetch's only visible output.
    pub fn prefetch_sums(&self) -> Result<Option<Vec<u32>>> {
        let sink = lock(&self.inner.prefetch).sink.clone();
        let Some(sink) = sink else {
            return Ok(None);
        };
        let mut words = bytemuck::pod_collect_to_vec::<u8, u32>(&self.read_bytes(sink.buf()?)?);
        words.truncate(sink.shape.numel());
        Ok(Some(words))
    }

    /// Plans the prefetch for the decode attention inside the layer `w`: its o_proj, gate/up
    /// and down weights, and the QKV weights of the layer that ran after it last time (learnt
    /// here, from the order layers run in).
    pub(super) fn plan_prefetch(&self, w: &LayerWeights<'_, WgpuTensor>) {
        let thread = std::thread::current().id();
        let mut pf = lock(&self.inner.prefetch);
        let mut next = None;
        if let Some(qkv) = w.qkv.parts.first() {
            if let Some(prev) = pf.last_qkv.insert(thread, qkv.clone()) {
                if prev != *qkv {
                    if pf.next_qkv.len() >= PREFETCH_LINKS {
                        pf.next_qkv.clear();
                    }
                    pf.next_qkv.insert(prev, qkv.clone());
                }
            }
            next = pf.next_qkv.get(qkv).cloned();
        }
        let [o, g, d, q] = self.inner.prefetch_weights;
        let plan = [(o, w.o_proj), (g, w.gate_up), (d, w.down)]
            .into_iter()
            .filter(|(on, _)| *on)
            .flat_map(|(_, t)| t.parts.iter().cloned())
            .chain(next.filter(|_| q))
            .take(4)
            .collect();
        pf.plans.insert(thread, plan);
    }

    /// The attention dispatch (and combine) of [`Backend::attention`] on q `[t, H d]`, or with
    /// `qkn` (q_norm, k_norm), of [`Backend::qk_norm_rope_attention`] on the QKV projection of a
    /// decode step, forming q and the new keys in the shader and writing them to `cache`.
    pub(super) fn attention_dispatch(
        &self,
        input: &WgpuTensor,
        t: usize,
        cache: &LayerKv<WgpuTensor>,
        batch: &WgpuBatch,
        cfg: &AttentionConfig,
        qkn: Option<(&WgpuTensor, &WgpuTensor)>,
    ) -> Result<WgpuTensor> {
        let (h, kvh, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let c = h * d;
        if t != batch.info.num_tokens() || kvh == 0 || h == 0 || h % kvh != 0 || d > MAX_HEAD_DIM {
            return Err(Error::invalid(
                "attention",
                format!(
                    "q {} for {h} heads of {d} over {kvh} kv heads and {t} tokens",
                    input.shape
                ),
            ));
        }
        let slots = cache.k.shape.cache_slots(kvh * d, "attention")?;
        batch.info.check_blocks_within(slots, "attention")?;
        let out = self.output([t, c])?;
        // Split the context so there are a few hundred workgroups even at batch 1 (one per KV
        // head would leave most of a GPU idle), each split a whole number of 32-key tiles and
        // at least `attention_min_chunk` keys: a split's partials cost a combine dispatch.
        let max_ctx = batch.info.max_context().max(1);
        let head_groups = head_groups(cfg);
        let want = (self.inner.attention_workgroups / (head_groups * t).max(1)).max(1);
        let chunk = (32 * max_ctx.div_ceil(32 * want))
            .max(self.inner.attention_min_chunk.next_multiple_of(32));
        let splits = max_ctx.div_ceil(chunk);
        // Partials [o, max, sum] per (token, head, split); one split writes `out` directly.
        let part = if splits > 1 {
            self.output([t * h * splits, d + 2])?
        } else {
            self.output([1])?
        };
        // 256 threads only while the splits stay below the workgroup target: at 1,024 and
        // 2,048 keys (32 splits a head group) they were slower (attention_lab on an H100,
        // 22.8 → 24.2 and 30.8 → 33.5 µs), at 64-288 keys faster (15.5 → 14.7 at 160).
        let wide =
            self.inner.attention_256 && head_groups * t * splits < self.inner.attention_workgroups;
        let build = match (self.inner.subgroups == Subgroups::UpTo32, wide) {
            (true, true) => 2,
            (true, false) => 1,
            _ => 0,
        };
        // The workgroup's threads (WG): 256 in the wide subgroup build.
        let threads = if build == 2 { 256 } else { 128 };
        let plan = match qkn {
            Some(_) if self.inner.prefetch_workgroups > 0 => lock(&self.inner.prefetch)
                .plans
                .remove(&std::thread::current().id()),
            _ => None,
        };
        let mut sectors = [0u32; 4];
        let slices = match &plan {
            Some(bufs) => {
                for (n, b) in sectors.iter_mut().zip(bufs) {
                    *n = u32_of((b.size() / 4).div_ceil(8) as usize)?;
                }
                self.inner
                    .prefetch_workgroups
                    .div_ceil(head_groups * t)
                    .min(MAX_GROUPS - splits)
            }
            None => 0,
        };
        let kernel = match (qkn.is_some(), slices > 0) {
            (true, true) => ATTENTION_PIPELINES[2][build],
            (true, false) => ATTENTION_PIPELINES[1][build],
            (false, _) => ATTENTION_PIPELINES[0][build],
        };
        let sink = (slices > 0)
            .then(|| self.output([slices * head_groups * t * threads]))
            .transpose()?;
        let params = attention_params(batch, cfg, t, splits, chunk, sectors)?;
        // Without qkn the prologue's bindings get stand-ins (read-only, never read).
        let (q_norm, k_norm, cs) = match qkn {
            Some((qn, kn)) => (
                qn.buf()?.clone(),
                kn.buf()?.clone(),
                self.rope_table(batch, cfg)?,
            ),
            None => {
                let stand_in = input.buf()?.clone();
                (stand_in.clone(), stand_in.clone(), stand_in)
            }
        };
        let [qb, kb, vb, positions, token_seq, tables, ob] =
            attention_buffers(input, cache, batch, &out)?;
        let mut buffers = vec![
            qb,
            kb,
            vb,
            positions,
            token_seq,
            tables,
            ob,
            part.buf()?,
            &q_norm,
            &k_norm,
            &cs,
            &batch.slots,
        ];
        if let (Some(plan), Some(sink)) = (&plan, &sink) {
            // A plan of fewer than four buffers repeats q in the rest (their sectors 0: unread).
            buffers.extend((0..4).map(|i| plan.get(i).unwrap_or(qb)));
            buffers.push(sink.buf()?);
        }
        self.run_3d(kernel, &params, &buffers, (head_groups, t, splits + slices))?;
        if sink.is_some() {
            lock(&self.inner.prefetch).sink = sink;
        }
        if splits > 1 {
            self.run(
                "attention_combine",
                &params,
                &[part.buf()?, out.buf()?],
                (h, t),
            )?;
        }
        Ok(out)
    }

    /// A prompt batch's attention on `attention_flash.wgsl` (query blocks of [`FLASH_QUERIES`]
    /// tokens of one sequence, each key and value row read once a block); `None` where it does
    /// not apply: a decode step, fewer tokens than `flash_from`, a head size past 128 or not a
    /// multiple of 4, or an adapter without the pipeline.
    pub(super) fn flash_dispatch(
        &self,
        q: &WgpuTensor,
        t: usize,
        cache: &LayerKv<WgpuTensor>,
        batch: &WgpuBatch,
        cfg: &AttentionConfig,
    ) -> Result<Option<WgpuTensor>> {
        let (h, kvh, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let fits = self.inner.flash_from.is_some_and(|from| t >= from)
            && !batch.info.is_decode_step()
            && t == batch.info.num_tokens()
            && kvh > 0
            && h > 0
            && h.is_multiple_of(kvh)
            && d > 0
            && d <= 128
            && d.is_multiple_of(4);
        if !fits {
            return Ok(None);
        }
        let slots = cache.k.shape.cache_slots(kvh * d, "attention")?;
        batch.info.check_blocks_within(slots, "attention")?;
        let Some((blocks, count)) = self.flash_blocks(batch)? else {
            return Ok(None);
        };
        let out = self.output([t, h * d])?;
        let params = attention_params(batch, cfg, t, 1, 0, [0; 4])?;
        let [qb, kb, vb, positions, token_seq, tables, ob] =
            attention_buffers(q, cache, batch, &out)?;
        self.run(
            "attention_flash",
            &params,
            &[qb, kb, vb, positions, token_seq, tables, ob, &blocks],
            (head_groups(cfg), count),
        )?;
        Ok(Some(out))
    }

    /// The batch's flash query blocks: each sequence's new tokens in runs of [`FLASH_QUERIES`],
    /// as [first token, tokens] pairs, and how many; made once per batch. `None` when there are
    /// more blocks than a dispatch dimension takes.
    fn flash_blocks(&self, batch: &WgpuBatch) -> Result<Option<(wgpu::Buffer, usize)>> {
        let mut cached = lock(&batch.flash_blocks);
        if let Some((count, buf)) = cached.as_ref() {
            return Ok(Some((buf.clone(), *count)));
        }
        let mut pairs = Vec::new();
        for s in 0..batch.info.seqs().len() {
            let rows = batch.info.rows(s);
            for first in rows.clone().step_by(FLASH_QUERIES) {
                pairs.push(u32_of(first)?);
                pairs.push(u32_of(FLASH_QUERIES.min(rows.end - first))?);
            }
        }
        let count = pairs.len() / 2;
        if count > MAX_GROUPS {
            return Ok(None);
        }
        let buf = self.u32s(&pairs)?;
        *cached = Some((count, buf.clone()));
        Ok(Some((buf, count)))
    }

    /// The batch's RoPE table for `cfg`, computed (in f64) once per batch.
    pub(super) fn rope_table(
        &self,
        batch: &WgpuBatch,
        cfg: &AttentionConfig,
    ) -> Result<wgpu::Buffer> {
        let mut cached = batch
            .rope
            .lock()
            .map_err(|_| Error::invalid("rope", "table lock poisoned"))?;
        let key = (cfg.head_dim, cfg.rope_theta.to_bits());
        if let Some((d, theta, table)) = cached.as_ref() {
            if (*d, *theta) == key {
                return Ok(table.buf()?.clone());
            }
        }
        let values = rope_table(&batch.info, cfg.head_dim, cfg.rope_theta);
        let table = self.upload_pooled(bytemuck::cast_slice(&values))?;
        let buf = table.buf()?.clone();
        *cached = Some((key.0, key.1, table));
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_weights_are_chosen_by_letter() -> Result<()> {
        assert_eq!(prefetch_weights(None)?, [true, true, true, false]);
        assert!(prefetch_by_default("NVIDIA H200"));
        assert!(prefetch_by_default("NVIDIA H100 80GB HBM3"));
        assert!(!prefetch_by_default("llvmpipe (LLVM 15.0.6, 256 bits)"));
        assert!(!prefetch_by_default("NVIDIA GeForce RTX 4090"));
        assert_eq!(prefetch_weights(Some("q"))?, [false, false, false, true]);
        assert_eq!(prefetch_weights(Some("go"))?, [true, true, false, false]);
        assert_eq!(prefetch_weights(Some(""))?, [false; 4]);
        let bad = prefetch_weights(Some("ogx")).map(|_| ()).unwrap_err();
        assert!(
            bad.to_string().contains("QFUSE_WGPU_PREFETCH_WEIGHTS=ogx"),
            "{bad}"
        );
        Ok(())
    }
}
